//! Bytes → validated [`Request`] → [`Client`]: the only place that looks at raw packet bytes.
//!
//! dhcproto's option decoder silently stops at the first option it cannot read, so a packet with
//! a bad option length would come out as a shorter, plausible message. We walk the option TLVs
//! ourselves first and refuse the packet instead (RFC 2131 §4.1: a server silently discards
//! malformed messages). Only then is the packet decoded with dhcproto.

use std::fmt;
use std::net::Ipv4Addr;

use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder};

use crate::types::events::DhcpKind;
use crate::types::{Arch, MacAddr};

/// Fixed BOOTP header (236 bytes) plus the magic cookie.
pub const HEADER_LEN: usize = 240;
/// Largest datagram we accept: an Ethernet MTU. Anything bigger was not sent by a boot ROM.
pub const MAX_LEN: usize = 1500;
/// RFC 1497 / 2131 magic cookie.
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// Why a datagram was refused before it reached the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than the BOOTP header and cookie.
    Truncated(usize),
    /// Longer than [`MAX_LEN`].
    Oversized(usize),
    /// `op` is not BOOTREQUEST (1).
    WrongOp(u8),
    /// `htype`/`hlen` is not Ethernet (1/6): we key leases by 6-byte MACs.
    NotEthernet {
        /// htype.
        htype: u8,
        /// hlen.
        hlen: u8,
    },
    /// The magic cookie is missing.
    BadMagic,
    /// An option runs past the end of the packet or has an impossible length.
    BadOption {
        /// Option code.
        code: u8,
        /// Its length byte.
        len: u8,
    },
    /// dhcproto refused what our walk accepted.
    Undecodable(String),
    /// No option 53 (a plain BOOTP request; we do not serve BOOTP).
    NoMessageType,
    /// Option 53 is a server-to-client or unknown type.
    NotClientMessage(u8),
    /// giaddr is set but is no relay agent's address (broadcast, multicast, loopback, this
    /// network, class E): an answer would go to the whole segment or nowhere (RFC 1542 §4.1.1:
    /// giaddr is the relay's own IP address).
    BadRelay(Ipv4Addr),
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::Truncated(n) => write!(f, "truncated ({n} bytes < {HEADER_LEN})"),
            Malformed::Oversized(n) => write!(f, "oversized ({n} bytes > {MAX_LEN})"),
            Malformed::WrongOp(op) => write!(f, "op {op} is not BOOTREQUEST"),
            Malformed::NotEthernet { htype, hlen } => write!(f, "htype {htype} hlen {hlen} is not Ethernet"),
            Malformed::BadMagic => f.write_str("no DHCP magic cookie"),
            Malformed::BadOption { code, len } => write!(f, "option {code} has bad length {len}"),
            Malformed::Undecodable(e) => write!(f, "undecodable: {e}"),
            Malformed::NoMessageType => f.write_str("no message type (BOOTP is not served)"),
            Malformed::NotClientMessage(t) => write!(f, "message type {t} is not sent by clients"),
            Malformed::BadRelay(g) => write!(f, "giaddr {g} is not a relay agent's unicast address"),
        }
    }
}

/// The exact lengths RFC 2132/4578 fix for options whose values we read. A wrong length is a
/// malformed packet, not something to guess around.
fn length_ok(code: u8, len: u8) -> bool {
    match code {
        53 => len == 1,
        50 | 54 | 51 => len == 4,
        57 => len == 2,
        93 => len >= 2 && len.is_multiple_of(2),
        61 => len >= 2,
        12 | 60 | 77 => len >= 1,
        _ => true,
    }
}

/// A request that passed validation, with the raw values of the options that classify it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The decoded message.
    pub msg: v4::Message,
    /// Option 53.
    pub kind: MessageType,
    /// The client's MAC (chaddr; hlen is 6).
    pub mac: MacAddr,
    /// Option 60, raw.
    pub vendor_class: Option<Vec<u8>>,
    /// Option 77, raw (iPXE sends plain "iPXE", not RFC 3004 framing).
    pub user_class: Option<Vec<u8>>,
    /// First value of option 93.
    pub arch_code: Option<u16>,
    /// Option 97 (client GUID), echoed to PXE clients.
    pub guid: Option<Vec<u8>>,
    /// Option 175 is present (iPXE's own encapsulated settings: only iPXE sends it).
    pub ipxe_opts: bool,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Option 12.
    pub hostname: Option<String>,
}

/// Validates and decodes one datagram.
///
/// # Errors
/// [`Malformed`] naming the first problem; the caller drops the packet.
pub fn parse(bytes: &[u8]) -> Result<Request, Malformed> {
    if bytes.len() < HEADER_LEN {
        return Err(Malformed::Truncated(bytes.len()));
    }
    if bytes.len() > MAX_LEN {
        return Err(Malformed::Oversized(bytes.len()));
    }
    if bytes[0] != 1 {
        return Err(Malformed::WrongOp(bytes[0]));
    }
    if bytes[1] != 1 || bytes[2] != 6 {
        return Err(Malformed::NotEthernet { htype: bytes[1], hlen: bytes[2] });
    }
    if bytes[236..240] != MAGIC {
        return Err(Malformed::BadMagic);
    }
    let mut raw = RawOpts::default();
    let mut i = HEADER_LEN;
    while i < bytes.len() {
        let code = bytes[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = bytes.get(i + 1) else {
            return Err(Malformed::BadOption { code, len: 0 });
        };
        let end = i + 2 + len as usize;
        if end > bytes.len() || !length_ok(code, len) {
            return Err(Malformed::BadOption { code, len });
        }
        let val = &bytes[i + 2..end];
        match code {
            60 => raw.vendor_class = Some(val.to_vec()),
            77 => raw.user_class = Some(val.to_vec()),
            93 => raw.arch = Some(u16::from_be_bytes([val[0], val[1]])),
            97 => raw.guid = Some(val.to_vec()),
            175 => raw.ipxe = true,
            _ => {}
        }
        i = end;
    }
    let msg = v4::Message::decode(&mut Decoder::new(bytes)).map_err(|e| Malformed::Undecodable(e.to_string()))?;
    let kind = match msg.opts().get(OptionCode::MessageType) {
        Some(DhcpOption::MessageType(t)) => *t,
        _ => return Err(Malformed::NoMessageType),
    };
    if client_kind(kind).is_none() {
        return Err(Malformed::NotClientMessage(u8::from(kind)));
    }
    let giaddr = msg.giaddr();
    if !giaddr.is_unspecified() && !is_unicast_host(giaddr) {
        return Err(Malformed::BadRelay(giaddr));
    }
    // hlen == 6 was checked above, so chaddr has six bytes.
    let mac = MacAddr::from_chaddr(msg.chaddr()).ok_or(Malformed::NotEthernet { htype: 1, hlen: bytes[2] })?;
    let requested_ip = match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let hostname = match msg.opts().get(OptionCode::Hostname) {
        Some(DhcpOption::Hostname(h)) => Some(h.clone()),
        _ => None,
    };
    Ok(Request {
        msg,
        kind,
        mac,
        vendor_class: raw.vendor_class,
        user_class: raw.user_class,
        arch_code: raw.arch,
        guid: raw.guid,
        ipxe_opts: raw.ipxe,
        requested_ip,
        server_id,
        hostname,
    })
}

/// An address a host (here: a relay agent) can have: not 0.0.0.0/8, loopback, multicast,
/// class E or the limited broadcast.
fn is_unicast_host(ip: Ipv4Addr) -> bool {
    let first = ip.octets()[0];
    first != 0 && !ip.is_loopback() && !ip.is_multicast() && first < 240
}

#[derive(Default)]
struct RawOpts {
    vendor_class: Option<Vec<u8>>,
    user_class: Option<Vec<u8>>,
    arch: Option<u16>,
    guid: Option<Vec<u8>>,
    ipxe: bool,
}

/// The client-to-server message kinds served; `None` for the rest (offers, acks ... from a
/// client are refused by [`parse`]).
pub fn client_kind(kind: MessageType) -> Option<DhcpKind> {
    match kind {
        MessageType::Discover => Some(DhcpKind::Discover),
        MessageType::Request => Some(DhcpKind::Request),
        MessageType::Decline => Some(DhcpKind::Decline),
        MessageType::Release => Some(DhcpKind::Release),
        MessageType::Inform => Some(DhcpKind::Inform),
        _ => None,
    }
}

/// Which boot program sent the request: the stage of the node's network boot (PXE ROM, then
/// iPXE, then our installer), or something that is not booting from us at all. Not the node's
/// BIOS/UEFI firmware (that is [`crate::types::Firmware`]; the architecture is [`Arch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootStage {
    /// A PXE ROM (vendor class starts with `PXEClient`), not iPXE.
    Pxe,
    /// iPXE (user class `iPXE`): gets the boot script URL, never the loader again.
    Ipxe,
    /// UEFI HTTP boot (vendor class `HTTPClient`, option 93 = 16): gets the iPXE EFI binary's
    /// `http://` URL.
    HttpBoot,
    /// Our own installer (vendor class `si-appliance`).
    Installer,
    /// Anything else (an OS's DHCP client).
    Other,
}

/// A classified client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    /// Its MAC.
    pub mac: MacAddr,
    /// Which boot program is asking.
    pub stage: BootStage,
    /// Its architecture (option 93; absent means BIOS).
    pub arch: Arch,
    /// Vendor class starts with `PXEClient` (iPXE sends it too): echo option 60.
    pub pxe_class: bool,
}

/// Classifies a validated request by options 60, 77, 93 and 175.
pub fn classify(req: &Request) -> Client {
    let vc = req.vendor_class.as_deref().unwrap_or_default();
    let pxe_class = vc.starts_with(b"PXEClient");
    let ipxe = req.ipxe_opts || req.user_class.as_deref().is_some_and(|u| u.windows(4).any(|w| w == b"iPXE"));
    let stage = if vc.starts_with(b"si-appliance") {
        BootStage::Installer
    } else if ipxe {
        BootStage::Ipxe
    } else if vc.starts_with(b"HTTPClient") {
        BootStage::HttpBoot
    } else if pxe_class {
        BootStage::Pxe
    } else {
        BootStage::Other
    };
    Client { mac: req.mac, stage, arch: Arch::from_option93(req.arch_code), pxe_class }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dhcproto::Encodable;

    /// A client request built with dhcproto setters (used by the policy tests too).
    pub(crate) fn request(kind: MessageType, mac: [u8; 6], opts: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = v4::Message::new_with_id(
            0x1234,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        let mut v = Vec::new();
        m.encode(&mut dhcproto::Encoder::new(&mut v)).expect("encodes");
        v
    }

    /// A relayed packet whose giaddr is no relay's address is dropped (issue 13: proxy mode
    /// answered giaddr 255.255.255.255).
    #[test]
    fn giaddr_must_be_a_relay_agents_unicast_address() {
        for (g, ok) in [
            ("0.0.0.0", true),
            ("10.67.0.1", true),
            ("192.0.2.9", true),
            ("255.255.255.255", false),
            ("224.0.0.1", false),
            ("127.0.0.1", false),
            ("0.1.2.3", false),
            ("240.0.0.1", false),
        ] {
            let ip: Ipv4Addr = g.parse().unwrap();
            let mut b = request(MessageType::Discover, [2, 0, 0, 0, 0, 1], vec![DhcpOption::ClassIdentifier(b"PXEClient".to_vec())]);
            b[24..28].copy_from_slice(&ip.octets());
            match parse(&b) {
                Ok(r) => assert!(ok, "{g} accepted: {:?}", r.msg.giaddr()),
                Err(e) => assert!(!ok && e == Malformed::BadRelay(ip), "{g}: {e}"),
            }
        }
    }

    #[test]
    fn valid_discover_parses() {
        let b = request(MessageType::Discover, [2, 0, 0, 0, 0, 1], vec![DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007".to_vec())]);
        let r = parse(&b).unwrap();
        assert_eq!(r.kind, MessageType::Discover);
        assert_eq!(classify(&r).stage, BootStage::Pxe);
    }

    #[test]
    fn hostile_inputs_are_refused() {
        let good = request(MessageType::Discover, [2, 0, 0, 0, 0, 1], vec![]);
        assert!(matches!(parse(&good[..100]), Err(Malformed::Truncated(100))));
        assert!(matches!(parse(&[]), Err(Malformed::Truncated(0))));
        let mut big = good.clone();
        big.resize(MAX_LEN + 1, 0);
        assert!(matches!(parse(&big), Err(Malformed::Oversized(_))));
        let mut op = good.clone();
        op[0] = 2;
        assert!(matches!(parse(&op), Err(Malformed::WrongOp(2))));
        let mut hl = good.clone();
        hl[2] = 16;
        assert!(matches!(parse(&hl), Err(Malformed::NotEthernet { .. })));
        let mut magic = good.clone();
        magic[236] = 0;
        assert!(matches!(parse(&magic), Err(Malformed::BadMagic)));
        // Option 53 with length 200 runs off the end.
        let mut opt = good[..HEADER_LEN].to_vec();
        opt.extend_from_slice(&[53, 200, 1]);
        assert!(matches!(parse(&opt), Err(Malformed::BadOption { code: 53, .. })));
        // Option 53 with length 2 is impossible.
        let mut opt2 = good[..HEADER_LEN].to_vec();
        opt2.extend_from_slice(&[53, 2, 1, 1, 255]);
        assert!(matches!(parse(&opt2), Err(Malformed::BadOption { code: 53, len: 2 })));
        // A lone code byte at the end.
        let mut opt3 = good[..HEADER_LEN].to_vec();
        opt3.extend_from_slice(&[53, 1, 1, 60]);
        assert!(matches!(parse(&opt3), Err(Malformed::BadOption { code: 60, .. })));
        // No message type: BOOTP.
        let mut bootp = good[..HEADER_LEN].to_vec();
        bootp.push(255);
        assert!(matches!(parse(&bootp), Err(Malformed::NoMessageType)));
        // A server message sent to us.
        let offer = request(MessageType::Offer, [2, 0, 0, 0, 0, 1], vec![]);
        assert!(matches!(parse(&offer), Err(Malformed::NotClientMessage(2))));
    }

    #[test]
    fn classification_rows() {
        let rows: Vec<(Vec<DhcpOption>, BootStage, Arch)> = vec![
            (vec![DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec())], BootStage::Pxe, Arch::X86Bios),
            (
                vec![
                    DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
                    DhcpOption::ClientSystemArchitecture(v4::Architecture(7)),
                ],
                BootStage::Pxe,
                Arch::X64Uefi,
            ),
            (
                vec![
                    DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
                    DhcpOption::UserClass(b"iPXE".to_vec()),
                ],
                BootStage::Ipxe,
                Arch::X86Bios,
            ),
            (vec![DhcpOption::ClassIdentifier(b"si-appliance/1".to_vec())], BootStage::Installer, Arch::X86Bios),
            (vec![DhcpOption::ClassIdentifier(b"udhcp 1.36".to_vec())], BootStage::Other, Arch::X86Bios),
            (vec![], BootStage::Other, Arch::X86Bios),
        ];
        for (opts, fw, arch) in rows {
            let b = request(MessageType::Discover, [2, 0, 0, 0, 0, 1], opts.clone());
            let c = classify(&parse(&b).unwrap());
            assert_eq!((c.stage, c.arch), (fw, arch), "{opts:?}");
        }
    }
}
