//! Interface discovery (pnet) and sockets bound to the provisioning interface. No protocol
//! knowledge lives here, except the crate's one plain HTTP/1.1 client ([`http_client`]).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use ipnet::Ipv4Net;
use socket2::{Domain, Protocol, Socket, Type};

use crate::types::MacAddr;

pub mod http_client;
pub mod neigh;
pub mod ra;

/// Errors from interface lookup and socket setup.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No interface of that name.
    #[error("no network interface named {0:?} (see `ip link`)")]
    NoSuchInterface(String),
    /// The interface has no IPv4 address (or not the one asked for).
    #[error("interface {iface} has no IPv4 address{}", want.map(|w| format!(" {w}")).unwrap_or_default())]
    NoAddress {
        /// The interface.
        iface: String,
        /// The address that was asked for, if any.
        want: Option<Ipv4Addr>,
    },
    /// The interface is down.
    #[error("interface {0} is down (ip link set {0} up)")]
    Down(String),
    /// A socket could not be created, configured or bound.
    #[error("socket {addr} on {iface}: {what}")]
    Socket {
        /// The interface.
        iface: String,
        /// The address.
        addr: SocketAddr,
        /// Which step failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The provisioning interface as the appliance uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    /// Kernel name, e.g. `eth1`.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Hardware address.
    pub mac: Option<MacAddr>,
    /// The appliance's address on it.
    pub ip: Ipv4Addr,
    /// The subnet of that address.
    pub net: Ipv4Net,
}

/// Finds `name` and the IPv4 address to serve on (`want`, or the first one).
///
/// # Errors
/// [`NetError::NoSuchInterface`], [`NetError::Down`] or [`NetError::NoAddress`].
pub fn discover(name: &str, want: Option<Ipv4Addr>) -> Result<Iface, NetError> {
    let all = pnet::datalink::interfaces();
    let itf = all
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| NetError::NoSuchInterface(name.to_owned()))?;
    if !itf.is_up() {
        return Err(NetError::Down(name.to_owned()));
    }
    let v4 = itf.ips.iter().filter_map(|n| match n {
        pnet::ipnetwork::IpNetwork::V4(v) => Some(*v),
        _ => None,
    });
    let chosen = v4
        .filter(|v| want.is_none_or(|w| v.ip() == w))
        .next()
        .ok_or_else(|| NetError::NoAddress { iface: name.to_owned(), want })?;
    let net = Ipv4Net::new(chosen.ip(), chosen.prefix())
        .expect("pnet prefixes are at most 32")
        .trunc();
    Ok(Iface {
        name: name.to_owned(),
        index: itf.index,
        mac: itf.mac.map(|m| MacAddr(m.octets())),
        ip: chosen.ip(),
        net,
    })
}

/// A UDP socket on `addr` bound to `iface` (SO_BINDTODEVICE), with SO_REUSEADDR and
/// SO_BROADCAST, non-blocking, ready for `tokio::net::UdpSocket::from_std`.
///
/// Binding to the device is what keeps a server on 0.0.0.0:67 from answering other segments,
/// and lets replies to 255.255.255.255 leave through the right interface.
///
/// # Errors
/// [`NetError::Socket`] naming the step that failed.
pub fn udp_on(iface: &str, addr: SocketAddrV4) -> Result<UdpSocket, NetError> {
    let sa = SocketAddr::V4(addr);
    let err = |what: &'static str| {
        let iface = iface.to_owned();
        move |source| NetError::Socket { iface, addr: sa, what, source }
    };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err("socket"))?;
    s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
    s.set_broadcast(true).map_err(err("SO_BROADCAST"))?;
    s.bind_device(Some(iface.as_bytes())).map_err(err("SO_BINDTODEVICE"))?;
    s.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    s.bind(&sa.into()).map_err(err("bind"))?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_unknown_is_refused() {
        let lo = discover("lo", None).expect("lo exists");
        assert_eq!(lo.ip, Ipv4Addr::LOCALHOST);
        assert_eq!(lo.net, "127.0.0.0/8".parse().unwrap());
        assert!(matches!(discover("no-such-if0", None), Err(NetError::NoSuchInterface(_))));
        assert!(matches!(
            discover("lo", Some(Ipv4Addr::new(10, 9, 9, 9))),
            Err(NetError::NoAddress { .. })
        ));
    }
}
