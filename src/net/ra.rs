//! A minimal IPv6 router advertiser for the provisioning interface.
//!
//! Why: iPXE configures IPv6 next to IPv4 and, before it boots anything, waits about 15 s for a
//! router advertisement (RFC 4861) unless one arrives. One RA on the link ends that wait. The RA
//! sent here says as little as possible: router lifetime 0 ("I am not a default router", §4.2),
//! no prefix (nobody derives an address or a route from it), M and O flags clear (no DHCPv6),
//! hop limit, reachable time and retransmit timer 0 ("unspecified"). So no host on the switch —
//! production machines included — routes through the appliance because of it.
//!
//! When: once at start, every [`FAST_INTERVAL`] during [`FAST_PHASE`], then every
//! [`SLOW_INTERVAL`], and in answer to every router solicitation (iPXE sends one when it opens
//! the NIC), at most one answer per [`MIN_ANSWER_GAP`]. Answers go to all nodes (§6.2.6 allows
//! it), so a solicitation is only a trigger and needs no further validation. Right after link
//! up the link-local address is still tentative (duplicate address detection) and sending
//! fails; the advertiser then retries every [`RETRY_INTERVAL`] and warns once only if that
//! lasts [`WARN_AFTER`].
//!
//! It owns one raw ICMPv6 socket bound to the interface; the kernel fills in the ICMPv6
//! checksum (RFC 3542 §3.1: always on for `IPPROTO_ICMPV6` raw sockets) and the link-local
//! source address. It never stops the appliance: without IPv6 on the interface it logs once and
//! the appliance serves on without it; later failures are logged and retried.

use std::io::Read;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::net::Iface;
use crate::types::MacAddr;

/// ICMPv6 type of a router solicitation (RFC 4861 §4.1).
const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 type of a router advertisement (RFC 4861 §4.2).
const ROUTER_ADVERTISEMENT: u8 = 134;
/// NDP option: source link-layer address (RFC 4861 §4.6.1).
const OPT_SOURCE_LINK_ADDR: u8 = 1;
/// All-nodes multicast group: where unsolicited (and our solicited) RAs go.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// All-routers multicast group: where router solicitations go; we join it to hear them.
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
/// NDP messages must carry hop limit 255 so receivers know they were not forwarded (§6.1.2).
const NDP_HOP_LIMIT: u32 = 255;

/// Interval between unsolicited RAs right after start.
pub const FAST_INTERVAL: Duration = Duration::from_secs(3);
/// How long the fast interval lasts.
pub const FAST_PHASE: Duration = Duration::from_secs(60);
/// Interval between unsolicited RAs after the fast phase.
pub const SLOW_INTERVAL: Duration = Duration::from_secs(30);
/// Minimum time between two RAs sent in answer to solicitations (a flood of RSs must not turn
/// into a flood of RAs).
pub const MIN_ANSWER_GAP: Duration = Duration::from_millis(300);
/// How long sending may fail before one warning: right after link up it fails while the
/// link-local address is tentative, which is normal.
pub const WARN_AFTER: Duration = Duration::from_secs(10);
/// Delay before the next unsolicited RA while a failure streak is younger than [`WARN_AFTER`].
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the router advertiser. None of them stops the appliance.
#[derive(Debug, thiserror::Error)]
pub enum RaError {
    /// The raw ICMPv6 socket could not be created or configured.
    #[error("raw ICMPv6 socket on {iface}: {what}")]
    Socket {
        /// The interface.
        iface: String,
        /// Which step failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The bytes of our router advertisement (ICMPv6 message, checksum left 0 for the kernel).
///
/// With `mac`, a source link-layer address option follows, so receivers need no neighbour
/// solicitation to learn our address.
pub fn router_advertisement(mac: Option<MacAddr>) -> Vec<u8> {
    #[rustfmt::skip]
    let mut p = vec![
        ROUTER_ADVERTISEMENT,
        0, // code
        0, 0, // checksum: the kernel computes it
        0, // cur hop limit: unspecified
        0, // flags: M = 0 (no DHCPv6 addresses), O = 0 (no DHCPv6 options)
        0, 0, // router lifetime 0: not a default router
        0, 0, 0, 0, // reachable time: unspecified
        0, 0, 0, 0, // retrans timer: unspecified
    ];
    if let Some(mac) = mac {
        p.extend_from_slice(&[OPT_SOURCE_LINK_ADDR, 1]); // length in units of 8 bytes
        p.extend_from_slice(&mac.0);
    }
    p
}

/// Whether an ICMPv6 message (as a raw ICMPv6 socket returns it: no IPv6 header) is a router
/// solicitation: type 133, code 0, at least its 8 fixed bytes (RFC 4861 §6.1.1).
pub fn is_router_solicitation(msg: &[u8]) -> bool {
    msg.len() >= 8 && msg[0] == ROUTER_SOLICITATION && msg[1] == 0
}

/// The link-layer address a router solicitation carries in its source link-layer address
/// option (iPXE and Linux include it unless they solicit from the unspecified address), for the
/// logs. `None` when there is none or the options are malformed (RFC 4861 §4.6: a zero length
/// or one running past the end invalidates the message).
pub fn solicitor_mac(msg: &[u8]) -> Option<MacAddr> {
    let mut opts = msg.get(8..)?;
    while opts.len() >= 2 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == OPT_SOURCE_LINK_ADDR {
            return MacAddr::from_chaddr(&opts[2..len]);
        }
        opts = &opts[len..];
    }
    None
}

/// The delay before the next unsolicited RA, given the time since start.
pub fn unsolicited_interval(since_start: Duration) -> Duration {
    if since_start < FAST_PHASE { FAST_INTERVAL } else { SLOW_INTERVAL }
}

/// The router advertiser of one interface: a raw ICMPv6 socket bound to it, and the packet.
pub struct RouterAdvertiser {
    iface: String,
    dest: SocketAddrV6,
    packet: Vec<u8>,
    socket: AsyncFd<Socket>,
}

impl RouterAdvertiser {
    /// Opens the socket on `iface`. `Ok(None)` when IPv6 is off (kernel or interface): that is
    /// logged here, once, and the appliance goes on without RAs.
    ///
    /// # Errors
    /// [`RaError::Socket`] naming the step that failed (e.g. no `CAP_NET_RAW`).
    pub fn open(iface: &Iface) -> Result<Option<RouterAdvertiser>, RaError> {
        if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
            info!(iface = %iface.name, "the kernel has no IPv6: no router advertisements (iPXE may wait ~15 s for one)");
            return Ok(None);
        }
        if ipv6_disabled_on(&iface.name) {
            info!(iface = %iface.name, "IPv6 is disabled on the interface: no router advertisements (iPXE may wait ~15 s for one)");
            return Ok(None);
        }
        let err = |what: &'static str| {
            let iface = iface.name.clone();
            move |source| RaError::Socket { iface, what, source }
        };
        let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(err("socket"))?;
        socket.bind_device(Some(iface.name.as_bytes())).map_err(err("SO_BINDTODEVICE"))?;
        socket.set_multicast_if_v6(iface.index).map_err(err("IPV6_MULTICAST_IF"))?;
        socket.set_multicast_hops_v6(NDP_HOP_LIMIT).map_err(err("IPV6_MULTICAST_HOPS"))?;
        socket.set_unicast_hops_v6(NDP_HOP_LIMIT).map_err(err("IPV6_UNICAST_HOPS"))?;
        socket.set_multicast_loop_v6(false).map_err(err("IPV6_MULTICAST_LOOP"))?;
        // Not fatal: without the group we still advertise, we just hear no solicitations.
        if let Err(e) = socket.join_multicast_v6(&ALL_ROUTERS, iface.index) {
            warn!(iface = %iface.name, "cannot join ff02::2, router solicitations go unanswered: {e}");
        }
        socket.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
        // SAFETY: `Socket` owns its descriptor, keeps it open until dropped and always returns
        // the same one from `as_raw_fd`; the `AsyncFd` owns the `Socket` for its whole life.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| err("register with tokio")(e.into_parts().1))?;
        Ok(Some(RouterAdvertiser {
            iface: iface.name.clone(),
            dest: SocketAddrV6::new(ALL_NODES, 0, 0, iface.index),
            packet: router_advertisement(iface.mac),
            socket,
        }))
    }

    /// Advertises until `shutdown`. Send and receive failures are logged (at debug, and once
    /// at warn when they last [`WARN_AFTER`]) and never end the task early: a finished task
    /// would stop the appliance.
    pub async fn run(self, shutdown: CancellationToken) {
        let start = Instant::now();
        let mut next = start;
        let mut last_answer: Option<Instant> = None;
        let mut failures = Failures::default();
        let mut sent = 0u64;
        let mut buf = [0u8; 1500];
        info!(iface = %self.iface, "sending IPv6 router advertisements (lifetime 0, no prefix)");
        loop {
            tokio::select! {
                // CANCEL-SAFETY: cancellation and a deadline (`next` lives outside the loop)
                // carry no state.
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(next) => {
                    self.send(Why::Periodic, &mut sent, &mut failures).await;
                    let now = Instant::now();
                    // Right after link up the link-local address is tentative (duplicate address
                    // detection, a second or two): retry soon rather than a whole interval later.
                    let wait = if failures.retry_soon(now) { RETRY_INTERVAL } else { unsolicited_interval(now - start) };
                    next = now + wait;
                }
                // CANCEL-SAFETY: `async_io` only waits for readiness and then reads without
                // awaiting; dropping it loses no datagram.
                r = self.socket.async_io(Interest::READABLE, |s| {
                    let mut s: &Socket = s;
                    s.read(&mut buf)
                }) => match r {
                    Ok(n) if is_router_solicitation(&buf[..n]) => {
                        let now = Instant::now();
                        let from = solicitor_mac(&buf[..n]);
                        if last_answer.is_none_or(|t| now.duration_since(t) >= MIN_ANSWER_GAP) {
                            last_answer = Some(now);
                            if !self.send(Why::Solicited(from), &mut sent, &mut failures).await {
                                // The soliciting node still waits: the next periodic RA (to all
                                // nodes) comes soon.
                                next = next.min(now + RETRY_INTERVAL);
                            }
                        } else {
                            debug!(iface = %self.iface, from = %Solicitor(from), "router solicitation: answered one moments ago");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.note_failure(&mut failures, "receive", &e);
                        // A persistent receive error must not spin.
                        // CANCEL-SAFETY: a pause; nothing in flight.
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(RETRY_INTERVAL) => {}
                        }
                    }
                }
            }
        }
        debug!(iface = %self.iface, sent, failures = failures.total, "router advertiser stopped");
    }

    /// Sends the RA to all nodes; false when that failed (logged).
    async fn send(&self, why: Why, sent: &mut u64, failures: &mut Failures) -> bool {
        let dest = self.dest.into();
        let r = self.socket.async_io(Interest::WRITABLE, |s| s.send_to(&self.packet, &dest)).await;
        match r {
            Ok(_) => {
                *sent += 1;
                if failures.succeeded() {
                    info!(iface = %self.iface, "router advertisements go out again");
                }
                match why {
                    Why::Solicited(from) => {
                        debug!(iface = %self.iface, from = %Solicitor(from), "answered a router solicitation")
                    }
                    Why::Periodic if *sent == 1 => debug!(iface = %self.iface, "first router advertisement sent"),
                    Why::Periodic => {}
                }
                true
            }
            // EADDRNOTAVAIL until the link-local address has passed duplicate address detection,
            // or for good when there is none.
            Err(e) => {
                self.note_failure(failures, "send", &e);
                false
            }
        }
    }

    fn note_failure(&self, failures: &mut Failures, op: &str, e: &std::io::Error) {
        if failures.failed(Instant::now()) {
            warn!(iface = %self.iface, "router advertisement {op} keeps failing (no usable IPv6 link-local address?): {e}; retrying quietly");
        } else {
            debug!(iface = %self.iface, "router advertisement {op} failed: {e}");
        }
    }
}

/// The failure state of one advertiser: a streak of failures is normal for a second or two
/// after link up (tentative link-local address) and only worth a warning once it lasts.
#[derive(Debug, Default)]
struct Failures {
    total: u64,
    /// Start of the current streak of failures.
    since: Option<Instant>,
    warned: bool,
}

impl Failures {
    /// Records a failure at `now`; true when this one deserves the streak's single warning.
    fn failed(&mut self, now: Instant) -> bool {
        self.total += 1;
        let since = *self.since.get_or_insert(now);
        if !self.warned && now.duration_since(since) >= WARN_AFTER {
            self.warned = true;
            return true;
        }
        false
    }

    /// Records a success; true when it ends a streak that was warned about.
    fn succeeded(&mut self) -> bool {
        self.since = None;
        std::mem::take(&mut self.warned)
    }

    /// Whether the next unsolicited RA should come after [`RETRY_INTERVAL`]: during a young
    /// streak of failures.
    fn retry_soon(&self, now: Instant) -> bool {
        self.since.is_some_and(|s| now.duration_since(s) < WARN_AFTER)
    }
}

/// Why an RA is sent (for the logs).
#[derive(Clone, Copy, Debug)]
enum Why {
    Periodic,
    /// In answer to a solicitation from this link-layer address (if it said).
    Solicited(Option<MacAddr>),
}

/// A solicitor's MAC for the logs, `unknown` when its solicitation did not say.
struct Solicitor(Option<MacAddr>);

impl std::fmt::Display for Solicitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(m) => m.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// `net.ipv6.conf.<iface>.disable_ipv6` (per network namespace). Unreadable counts as enabled:
/// the socket calls then tell.
fn ipv6_disabled_on(iface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_bytes_without_and_with_link_address() {
        assert_eq!(
            router_advertisement(None),
            [134, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "type 134, lifetime 0, nothing else"
        );
        let mac = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(
            router_advertisement(Some(mac)),
            [
                134, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // RA header
                1, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // source link-layer address option
            ]
        );
    }

    #[test]
    fn solicitations_are_recognised_and_garbage_is_not() {
        // RS as iPXE sends it: type 133, code 0, checksum, reserved, source link-layer option.
        let rs = [133, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert!(is_router_solicitation(&rs));
        assert!(is_router_solicitation(&rs[..8]));
        assert!(!is_router_solicitation(&rs[..7]), "truncated");
        assert!(!is_router_solicitation(&[]));
        assert!(!is_router_solicitation(&[133, 1, 0, 0, 0, 0, 0, 0]), "code must be 0");
        assert!(!is_router_solicitation(&router_advertisement(None)), "an RA is not an RS");
    }

    #[test]
    fn failures_retry_soon_then_warn_once_and_reset_on_success() {
        let t0 = Instant::now();
        let mut f = Failures::default();
        assert!(!f.retry_soon(t0), "no streak, normal schedule");
        assert!(!f.failed(t0), "a fresh failure is not worth a warning");
        assert!(f.retry_soon(t0 + Duration::from_secs(1)));
        assert!(!f.failed(t0 + Duration::from_secs(2)));
        assert!(f.failed(t0 + WARN_AFTER), "a lasting streak warns");
        assert!(!f.failed(t0 + WARN_AFTER + Duration::from_secs(1)), "once");
        assert!(!f.retry_soon(t0 + WARN_AFTER), "a lasting streak goes back to the normal schedule");
        assert!(f.succeeded(), "recovery after a warning is reported");
        assert!(!f.succeeded());
        assert!(!f.failed(t0 + WARN_AFTER * 2), "a new streak starts quiet");
        assert_eq!(f.total, 5);
    }

    #[test]
    fn solicitor_mac_from_options_and_malformed_options() {
        let mac = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let rs = [133, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert_eq!(solicitor_mac(&rs), Some(mac));
        // An unknown option first (type 99, 8 bytes), then the address.
        let mut two = rs[..8].to_vec();
        two.extend_from_slice(&[99, 1, 0, 0, 0, 0, 0, 0]);
        two.extend_from_slice(&rs[8..]);
        assert_eq!(solicitor_mac(&two), Some(mac));
        assert_eq!(solicitor_mac(&rs[..8]), None, "no options");
        assert_eq!(solicitor_mac(&rs[..12]), None, "option runs past the end");
        assert_eq!(solicitor_mac(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), None, "zero length");
        assert_eq!(solicitor_mac(&[133, 0, 0]), None, "truncated header");
    }

    proptest::proptest! {
        #[test]
        fn solicitation_parsing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = is_router_solicitation(&bytes);
            let _ = solicitor_mac(&bytes);
        }
    }

    #[test]
    fn schedule_is_fast_then_slow() {
        assert_eq!(unsolicited_interval(Duration::ZERO), FAST_INTERVAL);
        assert_eq!(unsolicited_interval(FAST_PHASE - Duration::from_millis(1)), FAST_INTERVAL);
        assert_eq!(unsolicited_interval(FAST_PHASE), SLOW_INTERVAL);
        assert!(FAST_INTERVAL < Duration::from_secs(15), "must beat iPXE's IPv6 wait");
    }
}
