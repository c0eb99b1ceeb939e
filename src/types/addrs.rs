//! Which address each MAC was last seen at by DHCP: the lease we granted (full mode) or, in
//! proxy mode, the `ciaddr` of the node's own request to us. The boot services render a node's
//! token (its installer script) only to that address. Bounded; shared by DHCP (writer) and the
//! boot routes (readers).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::RwLock;

use crate::types::MacAddr;

/// At most this many MACs are remembered; past it, new MACs are not recorded (their scripts
/// are then refused, logged): the table cannot grow without bound under a flood of MACs.
pub const MAX_CLIENTS: usize = 65_536;

/// MAC → address, as DHCP saw it. See the module docs.
#[derive(Debug, Default)]
pub struct ClientAddrs {
    map: RwLock<HashMap<MacAddr, Ipv4Addr>>,
}

/// Whether `client` may be given `mac`'s per-node files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// `client` is the address DHCP saw for `mac`.
    Bound,
    /// DHCP saw `mac` at another address.
    Elsewhere(Ipv4Addr),
    /// DHCP never saw `mac` with an address.
    Unknown,
}

impl ClientAddrs {
    /// Records that `mac` holds `ip` (the latest holder wins).
    pub fn note(&self, mac: MacAddr, ip: Ipv4Addr) {
        if ip.is_unspecified() || ip.is_broadcast() {
            return;
        }
        let mut m = self.map.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= MAX_CLIENTS && !m.contains_key(&mac) {
            return;
        }
        m.insert(mac, ip);
    }

    /// The address recorded for `mac`.
    pub fn ip_of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&mac).copied()
    }

    /// Whether `client` is `mac`'s address.
    pub fn check(&self, mac: MacAddr, client: Ipv4Addr) -> Binding {
        match self.ip_of(mac) {
            Some(ip) if ip == client => Binding::Bound,
            Some(ip) => Binding::Elsewhere(ip),
            None => Binding::Unknown,
        }
    }
}

/// For the node API (plan, report): `Err(reason)` when a request carrying `mac`'s valid token
/// comes from `client` and `addrs` (present when our DHCP leases or proxies) says `mac` is
/// elsewhere or unknown. The caller answers 403 and logs the reason.
pub fn check_node_source(addrs: Option<&ClientAddrs>, mac: MacAddr, client: Option<Ipv4Addr>) -> Result<(), String> {
    let Some(addrs) = addrs else { return Ok(()) };
    let Some(client) = client else {
        return Err(format!("{mac}'s token from an unknown address"));
    };
    match addrs.check(mac, client) {
        Binding::Bound => Ok(()),
        Binding::Elsewhere(ip) => Err(format!("{mac}'s token from {client}, but {mac} holds {ip}")),
        Binding::Unknown => Err(format!("{mac}'s token from {client}, but our DHCP never saw {mac} with an address")),
    }
}

/// `addr` as an IPv4 address (v4-mapped v6 included).
pub fn v4(addr: std::net::SocketAddr) -> Option<Ipv4Addr> {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_recorded_address_is_bound() {
        let a = ClientAddrs::default();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let ip = Ipv4Addr::new(10, 0, 0, 5);
        assert_eq!(a.check(mac, ip), Binding::Unknown);
        a.note(mac, Ipv4Addr::UNSPECIFIED);
        assert_eq!(a.check(mac, ip), Binding::Unknown);
        a.note(mac, ip);
        assert_eq!(a.check(mac, ip), Binding::Bound);
        assert_eq!(a.check(mac, Ipv4Addr::new(10, 0, 0, 6)), Binding::Elsewhere(ip));
    }
}
