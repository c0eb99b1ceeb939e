//! The start-up probe (full mode): broadcast one DISCOVER and listen for offers from other
//! servers. A full server next to another one on the same segment hands out conflicting
//! addresses; the appliance refuses that and suggests proxy mode instead.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use dhcproto::v4::{self, DhcpOption, Flags, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::time::Instant;

use super::error::DhcpError;
use crate::net::{self, Iface};

/// An offer heard from another server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignOffer {
    /// Source address of the offer.
    pub from: Ipv4Addr,
    /// Its option 54.
    pub server_id: Option<Ipv4Addr>,
    /// The address it offered.
    pub offered: Ipv4Addr,
}

impl fmt::Display for ForeignOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.from)?;
        if let Some(s) = self.server_id.filter(|s| *s != self.from) {
            write!(f, " (server id {s})")?;
        }
        write!(f, " offered {}", self.offered)
    }
}

/// The probe listens at least this long whatever `dhcp.probe_timeout` says: dnsmasq pings an
/// address (about 3 s) before it offers it, so a shorter probe misses the commonest server on a
/// lab switch and would start a second full server next to it.
pub const MIN_LISTEN: Duration = Duration::from_secs(4);

/// At most this many offers are collected (the loop is bounded in count as well as time).
const MAX_OFFERS: usize = 16;

/// Broadcasts a DISCOVER on `iface` and collects the offers heard within `timeout` (at least
/// [`MIN_LISTEN`]).
///
/// # Errors
/// [`DhcpError::Socket`] if port 68 cannot be bound, [`DhcpError::Probe`] if sending fails.
pub async fn probe(iface: &Iface, timeout: Duration) -> Result<Vec<ForeignOffer>, DhcpError> {
    let std_sock = net::udp_on(&iface.name, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))?;
    let perr = |source| DhcpError::Probe { iface: iface.name.clone(), source };
    let sock = tokio::net::UdpSocket::from_std(std_sock).map_err(perr)?;
    let xid: u32 = rand::random();
    let mac = iface.mac.map(|m| m.0).unwrap_or_else(|| {
        let mut m: [u8; 6] = rand::random();
        m[0] = (m[0] & 0xfe) | 0x02;
        m
    });
    let mut d = v4::Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    d.set_flags(Flags::default().set_broadcast());
    d.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
    d.opts_mut().insert(DhcpOption::ParameterRequestList(vec![OptionCode::SubnetMask, OptionCode::Router]));
    let mut bytes = Vec::new();
    // Encoding a message we built from fixed values cannot fail; map it anyway.
    d.encode(&mut Encoder::new(&mut bytes)).map_err(|e| perr(std::io::Error::other(e.to_string())))?;
    sock.send_to(&bytes, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)).await.map_err(perr)?;
    let deadline = Instant::now() + timeout.max(MIN_LISTEN);
    let mut offers = Vec::new();
    let mut buf = vec![0u8; 2048];
    while offers.len() < MAX_OFFERS {
        let Ok(r) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await else { break };
        let (n, from) = r.map_err(perr)?;
        let Ok(m) = v4::Message::decode(&mut Decoder::new(&buf[..n])) else { continue };
        // A proxyDHCP offer (no yiaddr) hands out no addresses: it does not conflict.
        if m.opcode() != Opcode::BootReply
            || m.xid() != xid
            || !m.opts().has_msg_type(MessageType::Offer)
            || m.yiaddr().is_unspecified()
        {
            continue;
        }
        let server_id = match m.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
            _ => None,
        };
        let from = match from {
            std::net::SocketAddr::V4(a) => *a.ip(),
            std::net::SocketAddr::V6(_) => continue,
        };
        let o = ForeignOffer { from, server_id, offered: m.yiaddr() };
        if !offers.contains(&o) {
            offers.push(o);
        }
    }
    Ok(offers)
}
