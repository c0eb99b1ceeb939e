//! The socket loop: receive a batch, decode, `decide`, apply the changes, commit the journal
//! once (group commit), then send the batch's replies. No protocol logic lives here.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::arp;
use super::classify;
use super::error::DhcpError;
use super::guard::Limiter;
use super::leases::{Change, Journal, Lease, LeaseState, Leases};
use super::policy::{Decision, Dest, Guard, Policy, Via, Why, decide_guarded, encode_reply};
use crate::types::MacAddr;
use crate::types::events::{EventSink, NodeEvent};

/// Most datagrams handled per batch (one fsync, then their replies).
const BATCH: usize = 256;
/// Receive buffer: larger than any packet we accept, so an oversized one is seen as such.
const BUF: usize = 4096;

/// Unix seconds now. The policy gets time only from here.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How often a journal that cannot be written is tried again (a compaction: a fresh file).
const JOURNAL_RETRY: Duration = Duration::from_secs(2);
/// Repeated warnings (new clients refused, journal still failing) at most this often.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// An episode of refused new clients ends after this long without a refusal.
const EPISODE_GAP: Duration = Duration::from_secs(60);

/// Whether a MAC is an enrolled node (the node book, set by the app); reservations are known
/// without it.
pub type KnownNodes = Arc<dyn Fn(MacAddr) -> bool + Send + Sync>;

/// An offer held back for its ARP check.
struct Probed {
    out: Outgoing,
    mac: MacAddr,
    ip: Ipv4Addr,
    answered: std::io::Result<Option<MacAddr>>,
}

/// ARP checks running at once; more offers than this go out unchecked (logged).
const MAX_PROBES: usize = 256;

/// A reply waiting for the batch's commit.
struct Outgoing {
    bytes: Vec<u8>,
    to: Dest,
    pxe_port: bool,
    /// Its change was staged in the journal: it goes only if the commit succeeds.
    durable: bool,
}

/// The journal failed: since when, and what was refused meanwhile.
struct Degraded {
    since: Instant,
    retry_at: Instant,
    refused: u64,
    warned: Instant,
    failures: u64,
}

/// One run of refusals of one kind (pool exhausted for new clients, rate-limited), warned about
/// once when it starts and summed up when it ends.
#[derive(Default)]
struct Episode {
    /// First and last refusal, and the count.
    open: Option<(Instant, Instant, u64)>,
}

impl Episode {
    /// Counts a refusal; returns true when it opens an episode (warn then).
    fn refuse(&mut self, now: Instant) -> bool {
        match &mut self.open {
            Some((_, last, n)) if now.duration_since(*last) < EPISODE_GAP => {
                *last = now;
                *n += 1;
                false
            }
            _ => {
                self.open = Some((now, now, 1));
                true
            }
        }
    }

    /// Closes the episode (a new client was served, or it went quiet); returns (duration, refused).
    fn close(&mut self) -> Option<(Duration, u64)> {
        self.open.take().map(|(first, last, n)| (last.duration_since(first), n))
    }
}

/// The running service: its sockets, the table and the journal.
pub struct Service {
    pub(super) policy: Policy,
    pub(super) leases: Leases,
    /// None in proxy mode (no addresses, nothing to remember).
    pub(super) journal: Option<Journal>,
    pub(super) iface: String,
    pub(super) sock: UdpSocket,
    pub(super) pxe_sock: Option<UdpSocket>,
    /// MACs already told "TFTP disabled" etc., so the notice is logged once per client.
    noted: std::collections::HashSet<MacAddr>,
    /// Where answered clients are reported to the monitor (never waits).
    pub(super) events: EventSink,
    /// MAC → address as we saw it: the boot services bind node scripts to it.
    pub(super) addrs: std::sync::Arc<crate::types::addrs::ClientAddrs>,
    /// Enrolled nodes (exempt from the starvation guard).
    pub(super) known: KnownNodes,
    /// New clients per relay.
    limiter: Limiter,
    /// The limiter's clock.
    epoch: Instant,
    /// Set while the journal cannot be written.
    degraded: Option<Degraded>,
    /// Table entries to put back if this batch's commit fails.
    undo: Vec<(Ipv4Addr, Option<Lease>)>,
    /// New clients refused because the pool is exhausted (or held for known nodes).
    exhausted: Episode,
    /// New clients refused by the limiter.
    limited: Episode,
    /// Offers waiting for their ARP check (`dhcp.arp_probe`).
    probes: tokio::task::JoinSet<Probed>,
    /// The clients those offers are for, and until when (a second past the check's wait): a
    /// DISCOVER again meanwhile (a client retransmits within a few hundred ms) is answered by the
    /// checked offer, not by a second one sent at once (its lease now names the address, so it
    /// would not be checked again).
    probing: std::collections::HashMap<MacAddr, Instant>,
}

impl Service {
    /// Wraps bound sockets and an opened journal.
    pub fn new(
        policy: Policy,
        leases: Leases,
        journal: Option<Journal>,
        iface: String,
        sock: UdpSocket,
        pxe_sock: Option<UdpSocket>,
    ) -> Service {
        Service {
            policy,
            leases,
            journal,
            iface,
            sock,
            pxe_sock,
            noted: Default::default(),
            events: EventSink::disabled(),
            addrs: Default::default(),
            known: Arc::new(|_| false),
            limiter: Limiter::unlimited(),
            epoch: Instant::now(),
            degraded: None,
            undo: Vec::new(),
            exhausted: Episode::default(),
            limited: Episode::default(),
            probes: tokio::task::JoinSet::new(),
            probing: std::collections::HashMap::new(),
        }
    }

    /// Sets the new-client limiter (`dhcp.new_client_rate`, `dhcp.new_client_burst`).
    pub fn set_limiter(&mut self, limiter: Limiter) {
        self.limiter = limiter;
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Serves until `shutdown`.
    ///
    /// # Errors
    /// A journal write failure (replies are then withheld) or a fatal receive error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), DhcpError> {
        let mut buf = vec![0u8; BUF];
        let mut buf2 = vec![0u8; BUF];
        let mut out: Vec<Outgoing> = Vec::with_capacity(BATCH);
        loop {
            // CANCEL-SAFETY: UdpSocket::recv_from is cancel-safe: a datagram not returned stays
            // queued. Nothing else is in flight across this select.
            let retry_at = self.degraded.as_ref().map(|d| d.retry_at);
            // None: an offer's ARP check finished (handled here); nothing was received.
            let got = tokio::select! {
                _ = shutdown.cancelled() => break,
                // CANCEL-SAFETY: a sleep; the retry runs after the select, nothing is lost.
                _ = sleep_opt(retry_at) => {
                    self.retry_journal();
                    continue;
                }
                // CANCEL-SAFETY: JoinSet::join_next is cancel-safe; a finished check stays queued.
                Some(done) = self.probes.join_next(), if !self.probes.is_empty() => {
                    if let Ok(p) = done {
                        self.probed(p, unix_now(), &mut out);
                    }
                    None
                }
                r = self.sock.recv_from(&mut buf) => Some((r.map(|(n, a)| (buf[..n].to_vec(), a)), false)),
                r = recv_opt(self.pxe_sock.as_ref(), &mut buf2) => Some((r.map(|(n, a)| (buf2[..n].to_vec(), a)), true)),
            };
            let now = unix_now();
            if let Some((first, pxe)) = got {
                match first {
                    Ok((bytes, src)) => self.handle(&bytes, src, pxe, now, &mut out),
                    Err(e) => self.recv_error(e, pxe)?,
                }
                // Drain what is already queued: these replies share one fsync.
                for _ in 0..BATCH {
                    match self.sock.try_recv_from(&mut buf) {
                        Ok((n, src)) => {
                            let bytes = buf[..n].to_vec();
                            self.handle(&bytes, src, false, now, &mut out);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            self.recv_error(e, false)?;
                            break;
                        }
                    }
                }
            }
            if let Some(j) = self.journal.as_mut() {
                // The ACKs of this batch leave only after their bindings are on disk.
                if let Err(e) = j.commit() {
                    // Not fatal: the batch's changes are undone, their replies withheld, and
                    // the service degrades until the journal can be written again.
                    out.retain(|o| !o.durable);
                    for (ip, old) in self.undo.drain(..).rev() {
                        self.leases.restore(ip, old);
                    }
                    self.degrade(&e);
                }
            }
            self.undo.clear();
            for o in out.drain(..) {
                self.send(o).await;
            }
            if let Some(j) = self.journal.as_mut() {
                if self.degraded.is_none() && j.wants_compaction(self.leases.len()) {
                    match j.compact(&self.leases, now) {
                        Ok(()) => info!(leases = self.leases.len(), "lease journal compacted"),
                        Err(e) => self.degrade(&e),
                    }
                }
            }
        }
        info!("dhcp service stopped");
        Ok(())
    }

    /// Enters (or stays in) degraded mode after a journal error.
    fn degrade(&mut self, e: &super::leases::JournalError) {
        let now = Instant::now();
        let cause = std::error::Error::source(e).map(ToString::to_string).unwrap_or_default();
        match &mut self.degraded {
            None => {
                error!(
                    error = %e, %cause, retry_every = ?JOURNAL_RETRY,
                    "LEASE JOURNAL NOT WRITABLE: no new leases until it is (new clients get no offer); \
                     renewals of journaled leases are acknowledged for the time already on disk; DHCP keeps serving"
                );
                self.degraded = Some(Degraded { since: now, retry_at: now + JOURNAL_RETRY, refused: 0, warned: now, failures: 1 });
            }
            Some(d) => {
                d.failures += 1;
                d.retry_at = now + JOURNAL_RETRY;
                if now.duration_since(d.warned) >= WARN_EVERY {
                    d.warned = now;
                    error!(error = %e, %cause, failures = d.failures, refused = d.refused, down_for = ?now.duration_since(d.since), "lease journal still not writable");
                }
            }
        }
    }

    /// Degraded: tries a compaction (a fresh file from the table); success ends degraded mode.
    fn retry_journal(&mut self) {
        let Some(j) = self.journal.as_mut() else {
            self.degraded = None;
            return;
        };
        match j.compact(&self.leases, unix_now()) {
            Ok(()) => {
                if let Some(d) = self.degraded.take() {
                    info!(
                        down_for = ?d.since.elapsed(), refused = d.refused, leases = self.leases.len(),
                        "lease journal writable again: new leases are served"
                    );
                }
            }
            Err(e) => self.degrade(&e),
        }
    }

    /// Logs a refused new client: once per episode of each kind, with counts.
    fn refused(&mut self, why: &Why, giaddr: Ipv4Addr, now: u64) {
        let t = Instant::now();
        match why {
            Why::JournalDown => {
                if let Some(d) = self.degraded.as_mut() {
                    d.refused += 1;
                    if t.duration_since(d.warned) >= WARN_EVERY || d.refused == 1 {
                        d.warned = t;
                        warn!(refused = d.refused, down_for = ?t.duration_since(d.since), "new client refused: the lease journal cannot be written");
                    }
                }
            }
            // Each arm's guard counts the refusal; the body runs when it opens an episode.
            Why::RateLimited(g) if self.limited.refuse(t) => {
                warn!(relay = %g, "new DHCP clients rate-limited (dhcp.new_client_rate): a starvation attack or a mass power-on; known nodes are still served");
            }
            Why::HeldForKnown { .. } | Why::PoolExhausted(_) if self.exhausted.refuse(t) => {
                let pool = self.policy.pool_for_relay(giaddr);
                let (size, free, reserve) = match pool {
                    Some(p) => (p.size_of(), self.policy.free_in(p, &self.leases, now), self.policy.reserve_of(p)),
                    None => (0, 0, 0),
                };
                warn!(
                    size, free, held_for_known = reserve, leases = self.leases.len(),
                    "pool exhausted: {why}; new clients get no address until leases expire"
                );
            }
            _ => {}
        }
    }

    fn recv_error(&self, e: std::io::Error, pxe: bool) -> Result<(), DhcpError> {
        // ICMP port-unreachable from an earlier send and the like show up here: not fatal.
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused | ConnectionReset | Interrupted | WouldBlock => {
                debug!(error = %e, "recv");
                Ok(())
            }
            _ => {
                let s = if pxe { self.pxe_sock.as_ref() } else { Some(&self.sock) };
                let addr = s.and_then(|s| s.local_addr().ok()).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 67)));
                Err(DhcpError::Recv { addr, source: e })
            }
        }
    }

    fn handle(&mut self, bytes: &[u8], src: SocketAddr, pxe: bool, now: u64, out: &mut Vec<Outgoing>) {
        let req = match classify::parse(bytes) {
            Ok(r) => r,
            Err(m) => {
                debug!(%src, len = bytes.len(), "dropped: {}", Why::Malformed(m));
                return;
            }
        };
        let via = match (pxe, src) {
            (true, SocketAddr::V4(a)) => Via::PxeService(a),
            _ => Via::Dhcp,
        };
        let mac = req.mac;
        let xid = req.msg.xid();
        if self.policy.mode == crate::config::DhcpMode::Proxy {
            // Proxy mode leases nothing: the node's own word on its address (ciaddr, or the
            // address it requests from the real server, seen in its broadcast REQUEST) is what
            // binds its boot script. iPXE told `175.176 = 1` skips the port-4011 request.
            let ci = Some(req.msg.ciaddr()).filter(|a| !a.is_unspecified());
            if let Some(ip) = ci.or(if req.kind == dhcproto::v4::MessageType::Request { req.requested_ip } else { None }) {
                self.addrs.note(mac, ip);
            }
        }
        let giaddr = req.msg.giaddr();
        let new_client = self.leases.of_mac(mac).is_none();
        let known = !new_client || self.policy.reservations.contains_key(&mac) || (self.known)(mac);
        let ms = self.now_ms();
        let guard = Guard {
            journal_ok: self.degraded.is_none(),
            new_allowed: self.limiter.allows(giaddr, ms),
            known,
            src: match src {
                SocketAddr::V4(a) => Some(*a.ip()),
                SocketAddr::V6(_) => None,
            },
        };
        let decision = decide_guarded(&req, via, &self.leases, &self.policy, now, &guard);
        if new_client && !known {
            if let Decision::Reply { change: Some(Change::Offer { .. } | Change::Bind(_)), .. } = &decision {
                self.limiter.take(giaddr, ms);
                // A new client served: any refusal episode is over.
                for (e, what) in [(&mut self.exhausted, "pool exhausted"), (&mut self.limited, "rate limit")] {
                    if let Some((lasted, refused)) = e.close() {
                        info!(refused, lasted = ?lasted, "{what} episode over: new clients are served again");
                    }
                }
            }
        }
        match decision {
            Decision::Ignore(why) => {
                debug!(%mac, xid, msg_type = ?req.kind, %src, "ignored: {why}");
                self.refused(&why, giaddr, now);
            }
            Decision::Record(change) => {
                debug!(%mac, xid, msg_type = ?req.kind, "recorded: {change:?}");
                self.note_client(&req, None);
                self.apply(change);
            }
            Decision::Reply { msg, to, change, note } => {
                if matches!(change, Some(Change::Offer { .. })) && self.probing.get(&mac).is_some_and(|until| Instant::now() < *until) {
                    debug!(%mac, xid, "DISCOVER again while its offer waits for the ARP check: that offer answers it");
                    return;
                }
                if let Some(why) = note {
                    if self.noted.len() < 65536 && self.noted.insert(mac) {
                        warn!(%mac, arch = ?req.arch_code, "no boot file for this client: {why}");
                    }
                }
                let kind = msg.opts().msg_type();
                match encode_reply(&msg) {
                    Ok(bytes) => {
                        debug!(%mac, xid, msg_type = ?req.kind, reply = ?kind, yiaddr = %msg.yiaddr(), ?to, "reply");
                        let ip = Some(msg.yiaddr()).filter(|a| !a.is_unspecified());
                        self.note_client(&req, ip);
                        let durable = change.as_ref().is_some_and(Change::is_durable);
                        // A fresh offer from the whole subnet: ask the segment first.
                        let probe = match &change {
                            Some(Change::Offer { ip, .. }) if !pxe && self.policy.wants_arp_probe(giaddr, *ip, mac, &self.leases) => Some(*ip),
                            _ => None,
                        };
                        if let Some(c) = change {
                            self.apply(c);
                        }
                        let o = Outgoing { bytes, to, pxe_port: pxe, durable };
                        match probe {
                            Some(ip) if self.probes.len() < MAX_PROBES => {
                                let (iface, wait) = (self.iface.clone(), self.policy.arp_probe);
                                let now = Instant::now();
                                if self.probing.len() >= 2 * MAX_PROBES {
                                    self.probing.retain(|_, until| now < *until);
                                }
                                // The check's task reports back; should it not (a panic), the
                                // entry lapses a second after the check's wait.
                                self.probing.insert(mac, now + wait + Duration::from_secs(1));
                                self.probes.spawn(async move {
                                    let answered = arp::probe(&iface, ip, wait).await;
                                    Probed { out: o, mac, ip, answered }
                                });
                            }
                            Some(ip) => {
                                debug!(%mac, %ip, "too many ARP checks running: offered unchecked");
                                out.push(o);
                            }
                            None => out.push(o),
                        }
                    }
                    Err(e) => warn!(%mac, xid, "reply not encodable, dropped: {e}"),
                }
            }
        }
    }

    /// An offer's ARP check is done: send it, or, when another host answers for the address,
    /// put the address on probation (the client asks again and gets another one).
    fn probed(&mut self, p: Probed, now: u64, out: &mut Vec<Outgoing>) {
        self.probing.remove(&p.mac);
        match p.answered {
            Ok(Some(owner)) if owner != p.mac => {
                warn!(ip = %p.ip, %owner, client = %p.mac, "address in use on the segment (answers ARP), not offered; on probation");
                self.apply(Change::Decline { mac: p.mac, ip: p.ip, until: now + super::policy::PROBATION_SECS });
            }
            Ok(_) => out.push(p.out),
            Err(e) => {
                debug!(ip = %p.ip, "ARP check failed, offering anyway: {e}");
                out.push(p.out);
            }
        }
    }

    /// Tells the monitor about a client we answered or recorded (a bounded, non-blocking send).
    fn note_client(&self, req: &classify::Request, ip: Option<Ipv4Addr>) {
        // `classify::parse` admits only client kinds, so this is always `Some`.
        let Some(kind) = classify::client_kind(req.kind) else { return };
        let ip = ip.or_else(|| self.leases.of_mac(req.mac).map(|l| l.ip));
        // Full mode: only an address we lease binds a node. Proxy mode leases nothing: the
        // address the node itself put in its request (ciaddr, set by iPXE on port 4011) is all
        // there is.
        let bound = match self.policy.mode {
            crate::config::DhcpMode::Proxy => ip.or(Some(req.msg.ciaddr())),
            _ => ip,
        };
        if let Some(b) = bound {
            self.addrs.note(req.mac, b);
        }
        let hostname = req.hostname.clone().or_else(|| self.leases.of_mac(req.mac).and_then(|l| l.hostname.clone()));
        self.events.send(NodeEvent::Dhcp {
            mac: req.mac,
            ip,
            hostname,
            arch: crate::types::Arch::from_option93(req.arch_code),
            vendor_class: req.vendor_class.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()),
            kind,
        });
    }

    /// Applies a change to the table, stages it in the journal and logs state changes.
    fn apply(&mut self, change: Change) {
        let before = match &change {
            Change::Bind(l) => self.leases.get(l.ip).filter(|p| p.mac == l.mac).map(|p| p.state),
            _ => None,
        };
        let old_host = match &change {
            Change::Release { ip, .. } | Change::Decline { ip, .. } => self.leases.get(*ip).and_then(|l| l.hostname.clone()),
            _ => None,
        }
        .unwrap_or_default();
        let touched = if self.journal.is_some() && change.is_durable() { self.leases.touched_by(&change) } else { Vec::new() };
        if !self.leases.apply(&change) {
            return;
        }
        self.undo.extend(touched);
        if let Some(j) = self.journal.as_mut() {
            j.stage(&change);
        }
        match &change {
            Change::Bind(l) => {
                let host = l.hostname.as_deref().unwrap_or("");
                if before == Some(LeaseState::Bound) {
                    info!(mac = %l.mac, ip = %l.ip, hostname = host, expires = l.expires, "lease renewed");
                } else {
                    info!(mac = %l.mac, ip = %l.ip, hostname = host, expires = l.expires, "lease bound");
                }
            }
            Change::Release { mac, ip, .. } => info!(%mac, %ip, hostname = old_host, "lease released"),
            Change::Decline { mac, ip, until } => {
                warn!(%mac, %ip, hostname = old_host, probation_until = until, "address declined (in use by someone else?)")
            }
            Change::Offer { mac, ip, .. } => debug!(%mac, %ip, "offered"),
            Change::ForgetOffer { mac } => debug!(%mac, "offer withdrawn: client chose another server"),
        }
    }

    async fn send(&self, o: Outgoing) {
        const BCAST: Ipv4Addr = Ipv4Addr::BROADCAST;
        let addr = match o.to {
            Dest::Relay(ip) => SocketAddrV4::new(ip, 67),
            Dest::Unicast(ip) => SocketAddrV4::new(ip, 68),
            Dest::Broadcast => SocketAddrV4::new(BCAST, 68),
            Dest::Arp { ip, mac } => match arp::inject(&self.sock, &self.iface, ip, mac) {
                Ok(()) => SocketAddrV4::new(ip, 68),
                Err(e) => {
                    debug!(%mac, %ip, "ARP injection failed, broadcasting instead: {e}");
                    SocketAddrV4::new(BCAST, 68)
                }
            },
            Dest::Source(a) => a,
        };
        let sock = match (&self.pxe_sock, o.pxe_port) {
            (Some(p), true) => p,
            _ => &self.sock,
        };
        if let Err(e) = sock.send_to(&o.bytes, addr).await {
            warn!(%addr, "send failed: {e}");
        }
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn recv_opt(sock: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match sock {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The socket loop itself, on loopback in a private network namespace, under tokio's paused
    //! clock: the limiter's refill is driven by `tokio::time::advance`, not by waiting.

    use super::*;
    use crate::config::Config;
    use crate::dhcp::classify::tests::request;
    use crate::dhcp::leases::Journal;
    use crate::net::Iface;
    use dhcproto::v4::{Architecture, DhcpOption, MessageType, OptionCode};
    use dhcproto::Decodable;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 1);
    /// The relay agent (a second address on the namespace's loopback).
    const RELAY: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
    const RESERVED: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

    /// A PXE client's packet as a relay forwards it (giaddr = RELAY).
    fn relayed(kind: MessageType, mac: [u8; 6], extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut opts = vec![
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
            DhcpOption::ClientSystemArchitecture(Architecture(0)),
        ];
        opts.extend(extra);
        let mut b = request(kind, mac, opts);
        b[24..28].copy_from_slice(&RELAY.octets());
        b
    }

    /// The reply to `mac` within `wait` of paused time, or None.
    async fn reply(relay: &UdpSocket, wait: Duration) -> Option<v4::Message> {
        let mut buf = vec![0u8; BUF];
        let (n, from) = tokio::time::timeout(wait, relay.recv_from(&mut buf)).await.ok()?.expect("recv");
        assert_eq!(from, SocketAddr::from((SERVER, 67)), "replies come from the server port");
        Some(v4::Message::decode(&mut dhcproto::Decoder::new(&buf[..n])).expect("a reply decodes"))
    }

    use dhcproto::v4;

    async fn exchange(dir: &std::path::Path) {
        let cfg = Config::from_toml(
            "[http]\nport = 8080\n[dhcp]\nprobe = false\narp_probe = \"0s\"\nnew_client_rate = 1\nnew_client_burst = 2\n\
             [[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.66.0.11\"\nhostname = \"node01\"\n",
            std::path::Path::new("test"),
        )
        .expect("config");
        let iface = Iface { name: "lo".into(), index: 1, mac: None, ip: SERVER, net: "10.66.0.0/24".parse().unwrap() };
        let (journal, leases, _) = Journal::open(dir, unix_now()).expect("journal");
        let sock = UdpSocket::bind((SERVER, 67)).await.expect("server socket");
        let mut service = Service::new(Policy::new(&cfg, &iface), leases, Some(journal), "lo".into(), sock, None);
        service.set_limiter(Limiter::new(cfg.dhcp.new_client_rate, cfg.dhcp.new_client_burst));
        let stop = CancellationToken::new();
        let run = tokio::spawn(service.run(stop.clone()));
        let relay = UdpSocket::bind((RELAY, 67)).await.expect("relay socket");
        let to = SocketAddr::from((SERVER, 67));
        let offer = |mac: [u8; 6]| {
            let relay = &relay;
            async move {
                relay.send_to(&relayed(MessageType::Discover, mac, vec![]), to).await.expect("send");
                reply(relay, Duration::from_millis(100)).await
            }
        };
        let t0 = Instant::now();
        // The burst of two new clients is served; the third is held back by the rate limit.
        let a = offer([2, 0, 0, 0, 0, 0xa]).await.expect("first new client offered");
        assert_eq!(a.opts().msg_type(), Some(MessageType::Offer));
        assert!(offer([2, 0, 0, 0, 0, 0xb]).await.is_some(), "second new client (burst 2) offered");
        assert!(offer([2, 0, 0, 0, 0, 0xc]).await.is_none(), "third new client refused: rate limited");
        // A reserved node is exempt from the limit.
        let r = offer(RESERVED).await.expect("reserved node offered while new clients are limited");
        assert_eq!(r.yiaddr(), Ipv4Addr::new(10, 66, 0, 11));
        // One token a second: a second of paused time later the refused client is served.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(offer([2, 0, 0, 0, 0, 0xc]).await.is_some(), "refused client served after the refill");
        // Paused time moved only by the refused client's 100 ms wait and the advance: the
        // answered requests took no (virtual) time.
        let spent = Instant::now() - t0;
        assert!(spent >= Duration::from_millis(1100) && spent < Duration::from_millis(1200), "tokio's clock moved {spent:?}");
        // REQUEST → ACK, and the binding is on disk before the ACK leaves.
        let req = relayed(
            MessageType::Request,
            [2, 0, 0, 0, 0, 0xa],
            vec![DhcpOption::ServerIdentifier(SERVER), DhcpOption::RequestedIpAddress(a.yiaddr())],
        );
        relay.send_to(&req, to).await.expect("send");
        let ack = reply(&relay, Duration::from_millis(100)).await.expect("ack");
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), a.yiaddr());
        assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_some());
        let (_, on_disk, _) = Journal::open(dir, unix_now()).expect("journal reopens beside the running service");
        let l = on_disk.of_mac(MacAddr([2, 0, 0, 0, 0, 0xa])).expect("the acknowledged lease is journaled");
        assert_eq!((l.ip, l.state), (a.yiaddr(), LeaseState::Bound));
        // Garbage between requests is dropped; the service keeps answering.
        relay.send_to(b"\x01\x01\x06\x00garbage", to).await.expect("send");
        assert!(offer([2, 0, 0, 0, 0, 0xb]).await.is_some(), "still serving after a malformed datagram");
        stop.cancel();
        run.await.expect("joins").expect("stops cleanly");
    }

    /// udhcpc sent its DISCOVER again 170 ms after the first, while the first's offer waited
    /// for its ARP check: the second got the same address offered at once, unchecked (its
    /// lease already named it), and the client bound an address another host held.
    #[test]
    fn a_discover_again_during_the_arp_check_waits_for_the_checked_offer() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
        rt.block_on(async {
            let cfg = Config::from_toml(
                "enroll = \"any\"\n[http]\nport = 8080\n[dhcp]\nprobe = false\nanswer = \"all\"\nknown_reserve_percent = 0\n\
                 arp_probe = \"300ms\"\n[[dhcp.pool]]\nsubnet = \"10.66.0.0/29\"\n",
                std::path::Path::new("test"),
            )
            .expect("config");
            let iface = Iface { name: "lo".into(), index: 1, mac: None, ip: SERVER, net: "10.66.0.0/24".parse().unwrap() };
            let dir = tempfile::tempdir().expect("tempdir");
            let (journal, leases, _) = Journal::open(dir.path(), unix_now()).expect("journal");
            let sock = UdpSocket::bind("127.0.0.1:0").await.expect("socket");
            let mut service = Service::new(Policy::new(&cfg, &iface), leases, Some(journal), "lo".into(), sock, None);
            let discover = request(MessageType::Discover, [2, 0x66, 0, 0, 0xa, 1], vec![]);
            let src = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68));
            let mut out = Vec::new();
            service.handle(&discover, src, false, unix_now(), &mut out);
            assert!(out.is_empty(), "the offer waits for its ARP check");
            assert_eq!(service.probes.len(), 1);
            service.handle(&discover, src, false, unix_now(), &mut out);
            assert!(out.is_empty(), "the retransmission got an unchecked offer");
            assert_eq!(service.probes.len(), 1, "one check per client");
            // Once the check is done (the pending entry gone), a DISCOVER is answered as before.
            service.probing.clear();
            service.handle(&discover, src, false, unix_now(), &mut out);
            assert_eq!(out.len(), 1, "a DISCOVER after the check is answered");
        });
    }

    #[test]
    fn relayed_exchange_on_loopback_under_a_paused_clock() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a private network namespace needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_owned();
        // unshare(CLONE_NEWNET) moves only this thread (and what it spawns) into a new
        // namespace: ports 67 and the 10.66.0.0/24 addresses are its own.
        std::thread::spawn(move || {
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
            for args in [&["link", "set", "lo", "up"][..], &["addr", "add", "10.66.0.1/24", "dev", "lo"], &["addr", "add", "10.66.0.2/24", "dev", "lo"]] {
                let st = std::process::Command::new("ip").args(args).status().expect("ip");
                assert!(st.success(), "ip {args:?}");
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("runtime");
            rt.block_on(exchange(&path));
        })
        .join()
        .expect("the exchange passes");
    }
}
