//! The pure DHCP/PXE policy: `decide(request, leases, policy, now) -> Decision`. No sockets, no
//! clock, no files: the service loop passes the time in and applies the returned change.
//!
//! RFC 2131 §4.3 (server behaviour) and §4.1 (where replies go), the PXE specification 2.1
//! (proxyDHCP, option 43) and iPXE's option 175 are followed; each rule cites its source.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{self, DhcpOption, Flags, HType, MessageType, Opcode, OptionCode, UnknownOption};
use ipnet::Ipv4Net;

use super::classify::{BootStage, Client, Malformed, Request, classify};
use super::leases::{Change, Lease, LeaseState, Leases};
use crate::config::{Answer, Config, DhcpMode};
use crate::net::Iface;
use crate::types::{Arch, Loader, MacAddr, ipxe_script_path};

/// BOOTP's minimum message size (RFC 951/1542): some ROMs and relays drop shorter replies.
pub const BOOTP_MIN_LEN: usize = 300;
/// How long an offered address is held for the client's REQUEST.
pub const OFFER_HOLD_SECS: u64 = 60;
/// How long a declined address stays out of use (RFC 2131 §3.1.5 leaves it to the server).
pub const PROBATION_SECS: u64 = 600;
/// A DECLINE is honoured only this long after the ACK (RFC 2131 §4.4.1: the client checks the
/// address right after it is bound): later, a DECLINE with a victim's MAC would take its address.
pub const DECLINE_WINDOW_SECS: u64 = 60;
/// Declined addresses on probation at once, per pool: at most this share (1/n) of the pool, and
/// at least [`QUARANTINE_MIN`]. Beyond it DECLINEs are ignored, so declines cannot empty a pool.
pub const QUARANTINE_SHARE: u32 = 8;
/// See [`QUARANTINE_SHARE`].
pub const QUARANTINE_MIN: u32 = 4;

/// What the service knows beyond the table and the configuration, passed to [`decide_guarded`]
/// so that `decide` stays pure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guard {
    /// The lease journal accepts writes. When false: no new leases (no offer, no ACK), renewals
    /// of journaled leases are acknowledged for the time the journal already holds, nothing is
    /// released or declined.
    pub journal_ok: bool,
    /// The new-client limiter of the packet's relay (giaddr, 0.0.0.0 locally) has a token.
    pub new_allowed: bool,
    /// The MAC is a known node (reservation or enrolled): exempt from the limiter and the reserve.
    pub known: bool,
    /// The packet's IPv4 source address (RELEASE must come from the released address).
    pub src: Option<Ipv4Addr>,
}

impl Guard {
    /// No limiter, no reserve, a writable journal: [`decide`]'s behaviour.
    pub const OPEN: Guard = Guard { journal_ok: true, new_allowed: true, known: true, src: None };
}

/// Why a packet got no reply. Displayed in the debug log line of each ignored packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// Dropped before the policy.
    Malformed(Malformed),
    /// `answer = "pxe"` and the client is neither PXE, iPXE nor our installer.
    NotPxe,
    /// A relayed request whose giaddr lies in no pool.
    NoPoolForRelay(Ipv4Addr),
    /// No pool covers the appliance's own segment.
    NoLocalPool,
    /// Every address of the pool is taken.
    PoolExhausted(Ipv4Net),
    /// The request names another server (option 54).
    OtherServer(Ipv4Addr),
    /// A REQUEST/DECLINE without the address it is about.
    NoAddress,
    /// RELEASE/DECLINE of an address the client does not hold.
    NoSuchLease(Ipv4Addr),
    /// proxyDHCP: no boot loader for this architecture.
    UnknownArch(Arch),
    /// proxyDHCP: TFTP is disabled, a PXE ROM would get nothing.
    TftpDisabled,
    /// The loader for this client is in none of `boot.loader_dirs`.
    LoaderMissing(Loader),
    /// proxyDHCP: the message type is not one proxyDHCP answers.
    NotForProxy(MessageType),
    /// A packet on port 4011 while not in proxy mode.
    NotProxyMode,
    /// A message type the full server does not handle.
    Unsupported(MessageType),
    /// Our own watch for foreign DHCP servers (sent from the appliance's MAC).
    OwnProbe,
    /// Too many new clients from this relay (0.0.0.0: the local segment) just now.
    RateLimited(Ipv4Addr),
    /// The free addresses left in the pool are held back for reserved and enrolled nodes.
    HeldForKnown {
        /// The pool.
        subnet: Ipv4Net,
        /// Free addresses left.
        free: u32,
    },
    /// The lease journal cannot be written: no new leases until it can.
    JournalDown,
    /// INIT-REBOOT for an address we have no record of for this client (RFC 2131 §4.3.2: silent).
    NoRecord(Ipv4Addr),
    /// A DECLINE long after the address was acknowledged.
    DeclineTooLate(Ipv4Addr),
    /// Too many declined addresses already on probation in this pool.
    QuarantineFull(Ipv4Net),
    /// A RELEASE sent from another address than the one released.
    ReleaseFrom(Ipv4Addr),
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Malformed(m) => write!(f, "malformed: {m}"),
            Why::NotPxe => f.write_str("not a PXE/iPXE/installer client and answer = \"pxe\""),
            Why::NoPoolForRelay(g) => write!(f, "relayed via {g}, which is in no dhcp.pool subnet"),
            Why::NoLocalPool => f.write_str("no dhcp.pool covers the appliance's own subnet"),
            Why::PoolExhausted(n) => write!(f, "pool {n} is exhausted"),
            Why::OtherServer(s) => write!(f, "client chose server {s}"),
            Why::NoAddress => f.write_str("no requested address (option 50) or ciaddr"),
            Why::NoSuchLease(ip) => write!(f, "client holds no lease on {ip}"),
            Why::UnknownArch(a) => write!(f, "no boot loader for architecture {a}"),
            Why::TftpDisabled => f.write_str("TFTP is disabled: a PXE ROM would get no boot loader"),
            Why::LoaderMissing(l) => write!(f, "its boot loader {} is in none of boot.loader_dirs", l.tftp_name()),
            Why::NotForProxy(t) => write!(f, "proxyDHCP does not answer {t:?}"),
            Why::NotProxyMode => f.write_str("port 4011 is served only in proxy mode"),
            Why::Unsupported(t) => write!(f, "message type {t:?} is not handled"),
            Why::OwnProbe => f.write_str("our own probe for foreign DHCP servers"),
            Why::RateLimited(g) => write!(f, "new clients via {g} are rate-limited (dhcp.new_client_rate)"),
            Why::HeldForKnown { subnet, free } => {
                write!(f, "pool {subnet} exhausted for new clients: its {free} free addresses are held for known nodes")
            }
            Why::JournalDown => f.write_str("the lease journal cannot be written: no new leases"),
            Why::NoRecord(ip) => write!(f, "INIT-REBOOT for {ip}, which this client does not hold"),
            Why::DeclineTooLate(ip) => write!(f, "DECLINE of {ip} long after its ACK"),
            Why::QuarantineFull(n) => write!(f, "too many declined addresses on probation in {n}"),
            Why::ReleaseFrom(src) => write!(f, "RELEASE sent from {src}, not from the released address"),
        }
    }
}

/// Where a reply goes (RFC 2131 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// To the relay agent, port 67.
    Relay(Ipv4Addr),
    /// Unicast to a configured client (ciaddr), port 68.
    Unicast(Ipv4Addr),
    /// 255.255.255.255:68.
    Broadcast,
    /// Unicast to `ip` (port 68) after an ARP entry for `mac` is injected; broadcast if that fails.
    Arp {
        /// yiaddr.
        ip: Ipv4Addr,
        /// chaddr.
        mac: MacAddr,
    },
    /// Back to the sender (PXE boot server requests on port 4011).
    Source(SocketAddrV4),
}

/// The policy's answer for one packet.
#[derive(Clone, Debug)]
pub enum Decision {
    /// Send `msg` to `to` after applying `change` (and, if durable, committing it to disk).
    Reply {
        /// The reply.
        msg: Box<v4::Message>,
        /// Its destination.
        to: Dest,
        /// The lease change it announces.
        change: Option<Change>,
        /// Something the operator should know (e.g. TFTP disabled for a PXE ROM).
        note: Option<Why>,
    },
    /// No reply, but a change (RELEASE, DECLINE, an offer the client turned down).
    Record(Change),
    /// No reply, nothing changes.
    Ignore(Why),
}

/// The port a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Port 67.
    Dhcp,
    /// Port 4011 (PXE boot server), from `src`.
    PxeService(SocketAddrV4),
}

/// An address pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// First address handed out.
    pub first: Ipv4Addr,
    /// Last address handed out (inclusive).
    pub last: Ipv4Addr,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// No `range` was configured: the whole subnet, where hosts the appliance does not know
    /// may sit (addresses are ARP-checked before an offer, `dhcp.arp_probe`).
    pub implicit: bool,
}

impl Pool {
    /// Addresses in the range.
    pub fn size_of(&self) -> u32 {
        self.size()
    }
    fn size(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&ip)
    }
}

/// A static reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved {
    /// Fixed address, if any.
    pub ip: Option<Ipv4Addr>,
    /// Option 12.
    pub hostname: Option<String>,
    /// Boot loader forced for this node (`dhcp.reservation.loader`).
    pub loader: Option<Loader>,
}

/// Everything `decide` needs to know about the configuration, resolved once at start.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Our address: option 54, siaddr, TFTP/HTTP server.
    pub server_ip: Ipv4Addr,
    /// full or proxy.
    pub mode: DhcpMode,
    /// pxe or all.
    pub answer: Answer,
    /// Option 51, seconds.
    pub lease_secs: u32,
    /// Pools; the local one contains `server_ip`.
    pub pools: Vec<Pool>,
    /// Reservations by MAC.
    pub reservations: HashMap<MacAddr, Reserved>,
    /// Option 15.
    pub domain: Option<String>,
    /// TFTP is served (PXE ROMs can fetch a loader).
    pub tftp: bool,
    /// HTTP port for iPXE script URLs.
    pub http_port: u16,
    /// Send iPXE option 175.176 = 1.
    pub ipxe_no_pxedhcp: bool,
    /// The appliance's own MAC: its watch for foreign DHCP servers sends DISCOVERs from it,
    /// which the service must not answer.
    pub own_mac: Option<MacAddr>,
    /// Loaders not found in `boot.loader_dirs` at start: never offered (set by the server
    /// after its check; empty in `new`).
    pub missing_loaders: Vec<Loader>,
    /// Percent of each pool kept from new clients (`dhcp.known_reserve_percent`).
    pub known_reserve_percent: u8,
    /// `dhcp.arp_probe`.
    pub arp_probe: std::time::Duration,
}

impl Policy {
    /// Resolves the configuration against the interface. With no `dhcp.pool`, one pool covers
    /// the interface's subnet less network, broadcast and our own address.
    pub fn new(cfg: &Config, iface: &Iface) -> Policy {
        let d = &cfg.dhcp;
        let pools: Vec<Pool> = if d.pools.is_empty() {
            vec![default_pool(iface.net, None, d.router, d.dns.clone())]
        } else {
            d.pools
                .iter()
                .map(|p| {
                    let local = p.subnet.contains(&iface.ip);
                    let router = p.router.or(if local { d.router } else { None });
                    let dns = if p.dns.is_empty() { d.dns.clone() } else { p.dns.clone() };
                    default_pool(p.subnet, p.range, router, dns)
                })
                .collect()
        };
        Policy {
            server_ip: iface.ip,
            mode: d.mode,
            answer: d.answer,
            lease_secs: u32::try_from(d.lease_time.as_secs()).unwrap_or(u32::MAX),
            pools,
            reservations: d
                .reservations
                .iter()
                .map(|r| (r.mac, Reserved { ip: r.ip, hostname: r.hostname.clone(), loader: r.loader }))
                .collect(),
            domain: d.domain.clone(),
            tftp: cfg.tftp.enable,
            http_port: cfg.http.port,
            ipxe_no_pxedhcp: cfg.boot.ipxe_no_pxedhcp,
            own_mac: iface.mac,
            missing_loaders: Vec::new(),
            known_reserve_percent: d.known_reserve_percent.min(100),
            arp_probe: d.arp_probe,
        }
    }

    /// Addresses of `pool` kept from new clients.
    pub fn reserve_of(&self, pool: &Pool) -> u32 {
        let p = u64::from(self.known_reserve_percent);
        u32::try_from((u64::from(pool.size()) * p).div_ceil(100)).unwrap_or(u32::MAX)
    }

    /// Free addresses of `pool` at `now` (a count over the table, not the range: O(leases)):
    /// the range less our own address, the router, reserved addresses and entries that hold
    /// (bound or offered and unexpired, declined on probation).
    pub fn free_in(&self, pool: &Pool, leases: &Leases, now: u64) -> u32 {
        let mut taken: u32 = 0;
        let fixed = [Some(self.server_ip), pool.router];
        for ip in fixed.iter().flatten() {
            if pool.in_range(*ip) {
                taken += 1;
            }
        }
        let in_pool_reserved = self.reservations.values().filter_map(|r| r.ip).filter(|ip| pool.in_range(*ip) && !fixed.contains(&Some(*ip)));
        taken = taken.saturating_add(u32::try_from(in_pool_reserved.count()).unwrap_or(u32::MAX));
        let reserved = |ip: Ipv4Addr| fixed.contains(&Some(ip)) || self.reservations.values().any(|r| r.ip == Some(ip));
        for l in leases.iter() {
            if pool.in_range(l.ip) && l.expires > now && l.state != LeaseState::Released && !reserved(l.ip) {
                taken += 1;
            }
        }
        pool.size().saturating_sub(taken)
    }

    /// Declined addresses of `pool` on probation at `now`.
    fn quarantined(pool: &Pool, leases: &Leases, now: u64) -> u32 {
        let n = leases.iter().filter(|l| l.state == LeaseState::Declined && l.expires > now && pool.subnet.contains(&l.ip)).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether an offer of `ip` to `mac` on the local segment (not relayed) wants an ARP check
    /// first: `dhcp.arp_probe` is on, `ip` comes from a pool without a configured range, it is
    /// nobody's reservation, and `mac` did not already hold it (checked when first offered).
    pub fn wants_arp_probe(&self, giaddr: Ipv4Addr, ip: Ipv4Addr, mac: MacAddr, leases: &Leases) -> bool {
        !self.arp_probe.is_zero()
            && leases.of_mac(mac).map(|l| l.ip) != Some(ip)
            && giaddr.is_unspecified()
            && self.pool_for(giaddr).is_ok_and(|p| p.implicit && p.in_range(ip))
            && !self.reservations.values().any(|r| r.ip == Some(ip))
    }

    /// Addresses of the pools on the appliance's own segment (the subnets holding its address):
    /// the nodes it reaches without a router, each one an entry in its neighbour table.
    pub fn on_link_hosts(&self) -> u64 {
        self.pools.iter().filter(|p| p.subnet.contains(&self.server_ip)).map(|p| u64::from(p.size())).sum()
    }

    /// The pool serving a relay (0.0.0.0: the local segment), if any.
    pub fn pool_for_relay(&self, giaddr: Ipv4Addr) -> Option<&Pool> {
        self.pool_for(giaddr).ok()
    }

    fn pool_for(&self, giaddr: Ipv4Addr) -> Result<&Pool, Why> {
        if giaddr.is_unspecified() {
            self.pools.iter().find(|p| p.subnet.contains(&self.server_ip)).ok_or(Why::NoLocalPool)
        } else {
            self.pools.iter().find(|p| p.subnet.contains(&giaddr)).ok_or(Why::NoPoolForRelay(giaddr))
        }
    }

    /// Whether `mac` may hold `ip` from `pool` at `now`, by configuration and by the table.
    fn allowed(&self, pool: &Pool, ip: Ipv4Addr, mac: MacAddr, leases: &Leases, now: u64) -> bool {
        if let Some(r) = self.reservations.get(&mac) {
            if r.ip == Some(ip) {
                return pool.subnet.contains(&ip) && leases.available_to(ip, mac, now);
            }
        }
        let excluded = ip == self.server_ip
            || ip == pool.subnet.network()
            || ip == pool.subnet.broadcast()
            || pool.router == Some(ip)
            || !pool.in_range(ip)
            || self.reservations.values().any(|r| r.ip == Some(ip));
        !excluded && leases.available_to(ip, mac, now)
    }

    /// Picks an address for `mac`: its reservation, its current or last address, the one it
    /// asks for, then a free one. The search starts at a point derived from the MAC, so a client
    /// tends to get the same address and the search is short in a sparse pool.
    fn choose(&self, pool: &Pool, req: &Request, leases: &Leases, now: u64) -> Result<Ipv4Addr, Why> {
        let mac = req.mac;
        if let Some(ip) = self.reservations.get(&mac).and_then(|r| r.ip) {
            if pool.subnet.contains(&ip) && leases.available_to(ip, mac, now) {
                return Ok(ip);
            }
        }
        if let Some(l) = leases.of_mac(mac) {
            if self.allowed(pool, l.ip, mac, leases, now) {
                return Ok(l.ip);
            }
        }
        if let Some(ip) = req.requested_ip {
            if self.allowed(pool, ip, mac, leases, now) && leases.is_unused(ip) {
                return Ok(ip);
            }
        }
        let size = pool.size();
        let base = u32::from(pool.first);
        let start = mac_hash(mac) % size;
        let mut reusable = None;
        for k in 0..size {
            let ip = Ipv4Addr::from(base + (start + k) % size);
            if self.allowed(pool, ip, mac, leases, now) {
                if leases.is_unused(ip) {
                    return Ok(ip);
                }
                reusable.get_or_insert(ip);
            }
        }
        reusable.ok_or(Why::PoolExhausted(pool.subnet))
    }
}

fn default_pool(subnet: Ipv4Net, range: Option<[Ipv4Addr; 2]>, router: Option<Ipv4Addr>, dns: Vec<Ipv4Addr>) -> Pool {
    let [first, last] = range.unwrap_or_else(|| {
        let n = u32::from(subnet.network());
        let b = u32::from(subnet.broadcast());
        // Config validation keeps prefixes ≤ 30; a /31 or /32 interface gets an empty-ish pool.
        [Ipv4Addr::from(n.saturating_add(1).min(b)), Ipv4Addr::from(b.saturating_sub(1).max(n))]
    });
    Pool { subnet, first, last, router, dns, implicit: range.is_none() }
}

fn mac_hash(mac: MacAddr) -> u32 {
    // FNV-1a.
    let mut h: u32 = 0x811c_9dc5;
    for b in mac.0 {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// What a client is told to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// A loader by TFTP.
    Loader(Loader),
    /// iPXE: the script URL (no chainload loop).
    Script(String),
    /// UEFI HTTP boot: the URL of the EFI binary.
    Url(String),
    /// Nothing (an OS client, the installer, or a PXE ROM we cannot serve).
    Nothing(Option<Why>),
}

/// The boot answer for a client. A reservation's `loader` wins over the architecture and over
/// iPXE's script URL (e.g. to boot a node through pxelinux), for boot firmware only.
pub fn boot_for(client: &Client, policy: &Policy) -> Boot {
    match boot_wanted(client, policy) {
        Boot::Loader(l) if policy.missing_loaders.contains(&l) => Boot::Nothing(Some(Why::LoaderMissing(l))),
        Boot::Url(u) if policy.missing_loaders.contains(&Loader::IpxeEfi) && u.ends_with(Loader::IpxeEfi.tftp_name()) => {
            Boot::Nothing(Some(Why::LoaderMissing(Loader::IpxeEfi)))
        }
        b => b,
    }
}

fn boot_wanted(client: &Client, policy: &Policy) -> Boot {
    let forced = policy.reservations.get(&client.mac).and_then(|r| r.loader);
    if let (Some(l), BootStage::Pxe | BootStage::Ipxe) = (forced, client.stage) {
        return if policy.tftp { Boot::Loader(l) } else { Boot::Nothing(Some(Why::TftpDisabled)) };
    }
    match client.stage {
        BootStage::Ipxe => Boot::Script(format!(
            "http://{}:{}{}",
            policy.server_ip,
            policy.http_port,
            ipxe_script_path(client.mac)
        )),
        // UEFI HTTP boot (UEFI 2.5 §24.7): the boot file is a URL of an EFI binary, here iPXE,
        // which then asks for its script as any iPXE does.
        BootStage::HttpBoot => match client.arch {
            Arch::X64UefiHttp | Arch::X64Uefi => {
                Boot::Url(format!("http://{}:{}/boot/{}", policy.server_ip, policy.http_port, Loader::IpxeEfi.tftp_name()))
            }
            other => Boot::Nothing(Some(Why::UnknownArch(other))),
        },
        BootStage::Pxe => match Loader::for_arch(client.arch) {
            None => Boot::Nothing(Some(Why::UnknownArch(client.arch))),
            Some(_) if !policy.tftp => Boot::Nothing(Some(Why::TftpDisabled)),
            Some(l) => Boot::Loader(l),
        },
        BootStage::Installer | BootStage::Other => Boot::Nothing(None),
    }
}

/// The pure decision for one validated request. `now` is Unix seconds. No starvation guard
/// ([`Guard::OPEN`]); the service calls [`decide_guarded`].
pub fn decide(req: &Request, via: Via, leases: &Leases, policy: &Policy, now: u64) -> Decision {
    decide_guarded(req, via, leases, policy, now, &Guard::OPEN)
}

/// [`decide`] with the service's state: the new-client limiter, known nodes, the journal's
/// health and the packet's source address.
pub fn decide_guarded(req: &Request, via: Via, leases: &Leases, policy: &Policy, now: u64, guard: &Guard) -> Decision {
    if policy.own_mac == Some(req.mac) {
        return Decision::Ignore(Why::OwnProbe);
    }
    let client = classify(req);
    match policy.mode {
        DhcpMode::Proxy => decide_proxy(req, &client, via, policy),
        DhcpMode::Full | DhcpMode::Off => {
            if via != Via::Dhcp {
                return Decision::Ignore(Why::NotProxyMode);
            }
            if policy.answer == Answer::Pxe && client.stage == BootStage::Other && !continues_our_lease(req, leases) {
                return Decision::Ignore(Why::NotPxe);
            }
            match decide_full(req, &client, leases, policy, now, guard) {
                Ok(d) => d,
                Err(why) => Decision::Ignore(why),
            }
        }
    }
}

/// With `answer = "pxe"`, a client we gave a lease to (while it said PXEClient, iPXE or
/// si-appliance) may renew, release or decline it without repeating its class: many clients
/// (busybox udhcpc without -V, for one) send option 60 only in DISCOVER/REQUEST-selecting.
/// New conversations (DISCOVER, INIT-REBOOT) from unclassified clients stay ignored.
fn continues_our_lease(req: &Request, leases: &Leases) -> bool {
    let Some(l) = leases.of_mac(req.mac) else { return false };
    if l.state != LeaseState::Bound {
        return false;
    }
    match req.kind {
        MessageType::Release => req.msg.ciaddr() == l.ip,
        MessageType::Decline => req.requested_ip == Some(l.ip),
        MessageType::Request => req.msg.ciaddr() == l.ip,
        _ => false,
    }
}

/// The client's journaled binding, unexpired at `now`: what a degraded server still confirms.
fn live_binding(leases: &Leases, mac: MacAddr, now: u64) -> Option<&Lease> {
    leases.of_mac(mac).filter(|l| l.state == LeaseState::Bound && l.expires > now)
}

/// A reply for a journaled binding while the journal cannot be written: the lease time is what
/// the journal holds (no extension that a crash would forget), no change.
fn degraded_reply(req: &Request, client: &Client, kind: MessageType, l: &Lease, pool: &Pool, policy: &Policy, now: u64) -> Decision {
    let (mut msg, note) = lease_reply(req, client, kind, l.ip, pool, policy);
    let t = u32::try_from(l.expires.saturating_sub(now)).unwrap_or(u32::MAX).max(1);
    let o = msg.opts_mut();
    o.insert(DhcpOption::AddressLeaseTime(t));
    o.insert(DhcpOption::Renewal(t / 2));
    o.insert(DhcpOption::Rebinding((t / 8).saturating_mul(7)));
    Decision::Reply { to: dest(&req.msg, l.ip, false), msg: Box::new(msg), change: None, note }
}

/// Whether `req` comes from a new client (no entry in the table) that the guard refuses:
/// rate-limited, or the pool's last free addresses are held for known nodes.
fn refuse_new(req: &Request, pool: &Pool, leases: &Leases, policy: &Policy, now: u64, guard: &Guard) -> Result<(), Why> {
    if guard.known || leases.of_mac(req.mac).is_some() {
        return Ok(());
    }
    if !guard.new_allowed {
        return Err(Why::RateLimited(req.msg.giaddr()));
    }
    let reserve = policy.reserve_of(pool);
    if reserve > 0 {
        let free = policy.free_in(pool, leases, now);
        if free <= reserve {
            return Err(Why::HeldForKnown { subnet: pool.subnet, free });
        }
    }
    Ok(())
}

fn decide_full(req: &Request, client: &Client, leases: &Leases, policy: &Policy, now: u64, guard: &Guard) -> Result<Decision, Why> {
    let m = &req.msg;
    let ours = policy.server_ip;
    match req.kind {
        MessageType::Discover => {
            let pool = policy.pool_for(m.giaddr())?;
            if !guard.journal_ok {
                let l = live_binding(leases, req.mac, now).filter(|l| pool.subnet.contains(&l.ip)).ok_or(Why::JournalDown)?;
                return Ok(degraded_reply(req, client, MessageType::Offer, l, pool, policy, now));
            }
            refuse_new(req, pool, leases, policy, now, guard)?;
            let ip = policy.choose(pool, req, leases, now)?;
            let (msg, note) = lease_reply(req, client, MessageType::Offer, ip, pool, policy);
            let change = Change::Offer { mac: req.mac, ip, until: now + OFFER_HOLD_SECS };
            Ok(Decision::Reply { to: dest(m, ip, false), msg: Box::new(msg), change: Some(change), note })
        }
        MessageType::Request => {
            // RFC 2131 §4.3.2: the client's state is told by option 54, ciaddr and option 50.
            if let Some(sid) = req.server_id {
                if sid != ours {
                    // SELECTING, another server chosen: our offer is void.
                    return Ok(Decision::Record(Change::ForgetOffer { mac: req.mac }));
                }
            }
            let ip = match (req.server_id, m.ciaddr().is_unspecified()) {
                // SELECTING or INIT-REBOOT: option 50 names the address.
                (Some(_), _) | (None, true) => req.requested_ip.ok_or(Why::NoAddress)?,
                // RENEWING / REBINDING: ciaddr.
                (None, false) => m.ciaddr(),
            };
            let pool = policy.pool_for(m.giaddr())?;
            // We are authoritative for our pools: the address is acknowledged if it is free for
            // this client (its offer, its binding, or an unused address after a restart lost
            // the offer), NAK'd if not (wrong subnet, held by another MAC, reserved for
            // another, outside the range). RFC 2131 §4.3.2.
            let nak = || {
                let nak = nak_reply(req, policy);
                Ok(Decision::Reply { to: dest(m, Ipv4Addr::UNSPECIFIED, true), msg: Box::new(nak), change: None, note: None })
            };
            if !policy.allowed(pool, ip, req.mac, leases, now) {
                return nak();
            }
            // The client's own entry for this address (offer, binding, release).
            let ours_to_confirm = leases.get(ip).is_some_and(|l| l.mac == req.mac && l.state != LeaseState::Declined);
            if !ours_to_confirm {
                if req.server_id.is_none() && m.ciaddr().is_unspecified() {
                    // INIT-REBOOT: a client we have no record of must hear nothing (RFC 2131
                    // §4.3.2); it falls back to DISCOVER, which the guard limits. A client that
                    // holds another address is wrong about its own: NAK.
                    if leases.of_mac(req.mac).is_some_and(|l| l.ip != ip) {
                        return nak();
                    }
                    return Err(Why::NoRecord(ip));
                }
                // SELECTING (an offer we lost in a restart) or RENEWING an address we do not
                // hold for it: a new binding, so the guard applies; refused → NAK (it restarts).
                if !guard.journal_ok || refuse_new(req, pool, leases, policy, now, guard).is_err() {
                    return nak();
                }
            }
            if !guard.journal_ok {
                let l = live_binding(leases, req.mac, now).filter(|l| l.ip == ip).ok_or(Why::JournalDown)?;
                return Ok(degraded_reply(req, client, MessageType::Ack, l, pool, policy, now));
            }
            let hostname = policy.reservations.get(&req.mac).filter(|r| r.ip.is_none_or(|r| r == ip)).and_then(|r| r.hostname.clone());
            let lease = Lease {
                mac: req.mac,
                ip,
                expires: now + u64::from(policy.lease_secs),
                state: LeaseState::Bound,
                hostname,
            };
            let (msg, note) = lease_reply(req, client, MessageType::Ack, ip, pool, policy);
            Ok(Decision::Reply { to: dest(m, ip, false), msg: Box::new(msg), change: Some(Change::Bind(lease)), note })
        }
        MessageType::Decline => {
            if req.server_id.is_some_and(|s| s != ours) {
                return Err(Why::OtherServer(req.server_id.unwrap_or(ours)));
            }
            let ip = req.requested_ip.ok_or(Why::NoAddress)?;
            if !guard.journal_ok {
                return Err(Why::JournalDown);
            }
            // Only an address just offered or acknowledged to this MAC: the ACK's time is
            // `expires - lease time`.
            let just = |l: &Lease| match l.state {
                LeaseState::Offered => l.expires > now,
                LeaseState::Bound => l.expires.saturating_sub(u64::from(policy.lease_secs)) + DECLINE_WINDOW_SECS >= now,
                _ => false,
            };
            match leases.get(ip) {
                Some(l) if l.mac == req.mac && just(l) => {
                    if let Some(pool) = policy.pools.iter().find(|p| p.subnet.contains(&ip)) {
                        if Policy::quarantined(pool, leases, now) >= (pool.size() / QUARANTINE_SHARE).max(QUARANTINE_MIN) {
                            return Err(Why::QuarantineFull(pool.subnet));
                        }
                    }
                    Ok(Decision::Record(Change::Decline { mac: req.mac, ip, until: now + PROBATION_SECS }))
                }
                Some(l) if l.mac == req.mac && l.state == LeaseState::Bound => Err(Why::DeclineTooLate(ip)),
                _ => Err(Why::NoSuchLease(ip)),
            }
        }
        MessageType::Release => {
            if req.server_id.is_some_and(|s| s != ours) {
                return Err(Why::OtherServer(req.server_id.unwrap_or(ours)));
            }
            let ip = m.ciaddr();
            if !guard.journal_ok {
                return Err(Why::JournalDown);
            }
            // Sent by the client from its address (RFC 2131 §4.4.6), unless relayed.
            if let Some(src) = guard.src.filter(|s| m.giaddr().is_unspecified() && *s != ip) {
                return Err(Why::ReleaseFrom(src));
            }
            match leases.get(ip) {
                Some(l) if l.mac == req.mac && l.state == LeaseState::Bound => {
                    Ok(Decision::Record(Change::Release { mac: req.mac, ip, at: now }))
                }
                _ => Err(Why::NoSuchLease(ip)),
            }
        }
        MessageType::Inform => {
            // RFC 2131 §4.3.5: configuration only, no lease, no yiaddr, to ciaddr.
            let pool = if m.giaddr().is_unspecified() {
                policy.pools.iter().find(|p| p.subnet.contains(&m.ciaddr())).ok_or(Why::NoLocalPool)?
            } else {
                policy.pool_for(m.giaddr())?
            };
            let (mut msg, note) = lease_reply(req, client, MessageType::Ack, Ipv4Addr::UNSPECIFIED, pool, policy);
            let o = msg.opts_mut();
            o.remove(OptionCode::AddressLeaseTime);
            o.remove(OptionCode::Renewal);
            o.remove(OptionCode::Rebinding);
            Ok(Decision::Reply { to: dest(m, Ipv4Addr::UNSPECIFIED, false), msg: Box::new(msg), change: None, note })
        }
        other => Err(Why::Unsupported(other)),
    }
}

/// proxyDHCP (PXE 2.1 §2.2.5 / §2.4): no addresses, boot information only, to PXE clients.
fn decide_proxy(req: &Request, client: &Client, via: Via, policy: &Policy) -> Decision {
    if !client.pxe_class && !matches!(client.stage, BootStage::Ipxe | BootStage::HttpBoot) {
        return Decision::Ignore(Why::NotPxe);
    }
    let boot = boot_for(client, policy);
    if let Boot::Nothing(why) = &boot {
        return Decision::Ignore(why.clone().unwrap_or(Why::NotPxe));
    }
    let m = &req.msg;
    let (kind, to) = match (via, req.kind) {
        (Via::Dhcp, MessageType::Discover) => (MessageType::Offer, dest(m, Ipv4Addr::UNSPECIFIED, false)),
        // A REQUEST on port 67 addressed to us (some ROMs do this instead of port 4011).
        (Via::Dhcp, MessageType::Request) if req.server_id == Some(policy.server_ip) => {
            (MessageType::Ack, dest(m, Ipv4Addr::UNSPECIFIED, false))
        }
        (Via::Dhcp, MessageType::Request) => return Decision::Ignore(Why::OtherServer(req.server_id.unwrap_or(Ipv4Addr::UNSPECIFIED))),
        (Via::PxeService(src), MessageType::Request | MessageType::Discover | MessageType::Inform) => {
            (MessageType::Ack, Dest::Source(src))
        }
        (_, other) => return Decision::Ignore(Why::NotForProxy(other)),
    };
    let mut r = base_reply(req, kind, Ipv4Addr::UNSPECIFIED, policy);
    r.set_ciaddr(m.ciaddr());
    add_boot(&mut r, req, client, &boot, policy, true);
    Decision::Reply { msg: Box::new(r), to, change: None, note: None }
}

fn base_reply(req: &Request, kind: MessageType, yiaddr: Ipv4Addr, policy: &Policy) -> v4::Message {
    let m = &req.msg;
    let mut r = v4::Message::new_with_id(m.xid(), Ipv4Addr::UNSPECIFIED, yiaddr, Ipv4Addr::UNSPECIFIED, m.giaddr(), m.chaddr());
    r.set_opcode(Opcode::BootReply).set_htype(HType::Eth).set_flags(m.flags());
    let o = r.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(policy.server_ip));
    // RFC 3046 §2.2: a server echoes the relay agent information option in its reply.
    if let Some(ri) = m.opts().get(OptionCode::RelayAgentInformation) {
        o.insert(ri.clone());
    }
    r
}

fn nak_reply(req: &Request, policy: &Policy) -> v4::Message {
    let mut r = base_reply(req, MessageType::Nak, Ipv4Addr::UNSPECIFIED, policy);
    // RFC 2131 §4.3.2: a NAK relayed through giaddr must be broadcast by the relay.
    if !req.msg.giaddr().is_unspecified() {
        r.set_flags(Flags::default().set_broadcast());
    }
    r
}

fn lease_reply(
    req: &Request,
    client: &Client,
    kind: MessageType,
    ip: Ipv4Addr,
    pool: &Pool,
    policy: &Policy,
) -> (v4::Message, Option<Why>) {
    let mut r = base_reply(req, kind, ip, policy);
    if kind == MessageType::Ack {
        r.set_ciaddr(req.msg.ciaddr());
    }
    let o = r.opts_mut();
    let t = policy.lease_secs;
    o.insert(DhcpOption::AddressLeaseTime(t));
    o.insert(DhcpOption::Renewal(t / 2));
    o.insert(DhcpOption::Rebinding((t / 8).saturating_mul(7)));
    o.insert(DhcpOption::SubnetMask(pool.subnet.netmask()));
    o.insert(DhcpOption::BroadcastAddr(pool.subnet.broadcast()));
    if let Some(gw) = pool.router {
        o.insert(DhcpOption::Router(vec![gw]));
    }
    if !pool.dns.is_empty() {
        o.insert(DhcpOption::DomainNameServer(pool.dns.clone()));
    }
    if let Some(d) = &policy.domain {
        o.insert(DhcpOption::DomainName(d.clone()));
    }
    if let Some(h) = policy.reservations.get(&req.mac).filter(|r| r.ip.is_none_or(|r| r == ip)).and_then(|r| r.hostname.clone()) {
        o.insert(DhcpOption::Hostname(h));
    }
    let boot = boot_for(client, policy);
    add_boot(&mut r, req, client, &boot, policy, false);
    let note = match boot {
        Boot::Nothing(Some(why)) => Some(why),
        _ => None,
    };
    (r, note)
}

/// Boot fields: siaddr, sname/file headers, 66/67, 60 echo (proxyDHCP, and BIOS ROMs), 43 for
/// BIOS PXE, 97 echo, 175. `proxy`: a proxyDHCP answer (no address).
fn add_boot(r: &mut v4::Message, req: &Request, client: &Client, boot: &Boot, policy: &Policy, proxy: bool) {
    let server = policy.server_ip.to_string();
    let file = match boot {
        Boot::Loader(l) => Some(l.tftp_name().to_owned()),
        Boot::Script(url) | Boot::Url(url) if url.len() <= 128 => Some(url.clone()),
        Boot::Script(_) | Boot::Url(_) | Boot::Nothing(_) => None,
    };
    if let Some(file) = &file {
        r.set_siaddr(policy.server_ip);
        // Old PXE ROMs read the BOOTP header fields, not options 66/67: set both.
        r.set_sname_str(&server);
        r.set_fname_str(file);
        let o = r.opts_mut();
        o.insert(DhcpOption::TFTPServerName(server.clone().into_bytes()));
        o.insert(DhcpOption::BootfileName(file.clone().into_bytes()));
    }
    let o = r.opts_mut();
    if client.stage == BootStage::HttpBoot {
        // UEFI HTTP boot: a server answering an HTTPClient echoes option 60 as `HTTPClient`.
        o.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
    }
    if client.pxe_class {
        // PXE 2.1 §2.4.1: a server answering a PXEClient must echo option 60. Except a full
        // DHCP answer (with an address) to a UEFI PXE client: EDK2's PXE (OVMF and most UEFI
        // servers' firmware) takes an offer with `PXEClient` and a boot file but no option 43
        // for a "DhcpBinl" offer and asks the boot file again on port 4011 (PxeBcDhcp4.c,
        // PxeBcParseDhcp4Packet / PxeBcRetryBinlOffer), which only proxy mode serves: it then
        // fails with "PXE-E16: No valid offer received". Without option 60 it is a DHCP-only
        // offer with a boot file, which it boots (PxeBcSelectDhcp4Offer, case 7): what ISC
        // dhcpd's `filename` and dnsmasq's `dhcp-boot` send.
        if proxy || client.arch == Arch::X86Bios {
            o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
        }
        if matches!(boot, Boot::Loader(_)) && client.arch == Arch::X86Bios {
            // PXE discovery control (sub-option 6) = 8: "use the boot file in this offer, no boot
            // server discovery". BIOS ROMs want it; UEFI firmware does fine without option 43 and
            // some mis-handle it, so it is sent to BIOS ROMs only (as Pixiecore does).
            o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        if let Some(g) = &req.guid {
            o.insert(DhcpOption::ClientMachineIdentifier(g.clone()));
        }
    }
    if client.stage == BootStage::Ipxe {
        o.insert(DhcpOption::Unknown(UnknownOption::new(OptionCode::Unknown(175), ipxe_settings(policy.ipxe_no_pxedhcp))));
    }
}

/// iPXE's encapsulated option 175 in our answers: setting 1 "priority" = 127, the highest, and
/// (when configured) setting 176 "no-pxedhcp" = 1.
///
/// iPXE keeps, of the DHCPOFFERs it collects, the one with the highest priority (a later offer of
/// equal priority replaces an earlier one), and with no-pxedhcp it stops collecting at once
/// (iPXE `src/net/udp/dhcp.c`, `dhcp_discovery_rx`). So a foreign DHCP server on the segment that
/// answers first does not win the node's iPXE stage: ours replaces its offer, unless it too sends
/// priority 127 and answers after us.
fn ipxe_settings(no_pxedhcp: bool) -> Vec<u8> {
    let mut v = vec![1, 1, 127];
    if no_pxedhcp {
        v.extend_from_slice(&[176, 1, 1]);
    }
    v
}

/// RFC 2131 §4.1 destination rules.
fn dest(m: &v4::Message, yiaddr: Ipv4Addr, nak: bool) -> Dest {
    if !m.giaddr().is_unspecified() {
        Dest::Relay(m.giaddr())
    } else if nak {
        Dest::Broadcast
    } else if !m.ciaddr().is_unspecified() {
        Dest::Unicast(m.ciaddr())
    } else if m.flags().broadcast() || yiaddr.is_unspecified() {
        Dest::Broadcast
    } else {
        match MacAddr::from_chaddr(m.chaddr()) {
            Some(mac) => Dest::Arp { ip: yiaddr, mac },
            None => Dest::Broadcast,
        }
    }
}

/// Encodes a reply padded to the BOOTP minimum of 300 bytes (dhcproto does not pad).
///
/// # Errors
/// dhcproto's encoder error (an option too long to encode).
pub fn encode_reply(msg: &v4::Message) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
    use dhcproto::Encodable;
    let mut v = Vec::with_capacity(BOOTP_MIN_LEN);
    msg.encode(&mut dhcproto::Encoder::new(&mut v))?;
    if v.len() < BOOTP_MIN_LEN {
        v.resize(BOOTP_MIN_LEN, 0);
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
