//! Which node serves a kernel/initrd request: the pure scheduler of peer-served boot files.
//! No I/O, no clock reads (the caller passes `now`), table-tested like the swarm core.
//!
//! Nodes whose installer holds verified copies announce themselves ([`PeerBook::serving`]);
//! a request from a node is answered with a redirect to a serving peer that has a free slot,
//! else by the appliance itself ([`PeerBook::pick`]). Rules:
//! - never the requester itself; peers on the requester's subnet first, then the least loaded,
//!   then the lowest address (deterministic);
//! - each peer is given at most `max_per_peer` requesters at once (its uplink is shared); a
//!   requester keeps its peer for all its boot files (kernel, then initrd) while its hold lasts;
//! - a hold ends when the requester itself announces that it serves (it has both files), when
//!   it asks the appliance directly (`?direct=1`, its fallback after a failed peer), or at its
//!   deadline (`hold` after its last request: size / assumed rate, see `boot.peer_rate_mbit`);
//! - a peer reported bad by a requester that was sent to it is dropped, as is one that stops
//!   or stays silent for [`PeerBook::silence`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

/// The rules' numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Requesters one peer serves at once, at most (`boot.peer_serve_max`).
    pub max_per_peer: usize,
    /// How long a redirect holds its slot after the requester's last request.
    pub hold: Duration,
    /// Prefix length of "the same subnet".
    pub prefix: u8,
    /// A peer not heard of for this long is dropped.
    pub silence: Duration,
}

/// Why a request is served by the appliance itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeHere {
    /// No node serves the boot files (yet).
    NoPeer,
    /// Every serving peer (other than the requester) has all its slots taken.
    AllBusy,
}

impl std::fmt::Display for ServeHere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServeHere::NoPeer => "no serving peer",
            ServeHere::AllBusy => "every peer busy",
        })
    }
}

#[derive(Clone, Debug)]
struct Peer {
    port: u16,
    heard: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Hold {
    peer: Ipv4Addr,
    until: Instant,
}

/// The serving peers and the redirects in flight.
#[derive(Debug)]
pub struct PeerBook {
    policy: PeerPolicy,
    peers: BTreeMap<Ipv4Addr, Peer>,
    /// Requester -> the peer it was sent to.
    holds: BTreeMap<Ipv4Addr, Hold>,
}

impl PeerBook {
    /// An empty book.
    pub fn new(policy: PeerPolicy) -> PeerBook {
        PeerBook { policy, peers: BTreeMap::new(), holds: BTreeMap::new() }
    }

    /// `peer` serves verified copies on `port` (first announce or a refresh). Its own hold ends:
    /// it has both files.
    pub fn serving(&mut self, peer: Ipv4Addr, port: u16, now: Instant) {
        self.peers.insert(peer, Peer { port, heard: now });
        self.holds.remove(&peer);
    }

    /// `peer` stops serving (reboots): dropped, and the holds on it end.
    pub fn stopped(&mut self, peer: Ipv4Addr) -> bool {
        self.drop_peer(peer)
    }

    /// `requester` says the peer it was sent to failed it. Believed only from a requester
    /// holding a slot at that very peer (anyone else's word would let one node evict all
    /// peers); then the peer is dropped. Returns whether it was.
    pub fn bad(&mut self, requester: Ipv4Addr, peer: Ipv4Addr) -> bool {
        match self.holds.get(&requester) {
            Some(h) if h.peer == peer => self.drop_peer(peer),
            _ => false,
        }
    }

    /// `requester` says the file it just fetched where it was sent (a failed fetch, or a copy
    /// whose SHA-256 is wrong) failed it: the peer it holds a slot at is dropped and its hold
    /// ends. Returns that peer. Only the requester's own hold is believed, as in [`Self::bad`].
    pub fn bad_held(&mut self, requester: Ipv4Addr) -> Option<Ipv4Addr> {
        let peer = self.holds.get(&requester)?.peer;
        self.drop_peer(peer);
        Some(peer)
    }

    /// `requester` asks the appliance directly (its fallback): its hold ends.
    pub fn direct(&mut self, requester: Ipv4Addr) {
        self.holds.remove(&requester);
    }

    fn drop_peer(&mut self, peer: Ipv4Addr) -> bool {
        self.holds.retain(|_, h| h.peer != peer);
        self.peers.remove(&peer).is_some()
    }

    /// Ends holds past their deadline and forgets silent peers.
    fn expire(&mut self, now: Instant) {
        self.holds.retain(|_, h| h.until > now);
        let silence = self.policy.silence;
        let gone: Vec<Ipv4Addr> = self.peers.iter().filter(|(_, p)| now.saturating_duration_since(p.heard) >= silence).map(|(ip, _)| *ip).collect();
        for ip in gone {
            self.drop_peer(ip);
        }
    }

    /// Requesters currently given to `peer`.
    pub fn load(&self, peer: Ipv4Addr) -> usize {
        self.holds.values().filter(|h| h.peer == peer).count()
    }

    /// Serving peers.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Where `requester`'s boot-file request goes: a peer's address (the slot is taken, or the
    /// requester's existing one refreshed), or the appliance and why.
    ///
    /// # Errors
    /// [`ServeHere`]: the appliance serves it.
    pub fn pick(&mut self, requester: Ipv4Addr, now: Instant) -> Result<SocketAddrV4, ServeHere> {
        self.expire(now);
        let until = now + self.policy.hold;
        if let Some(h) = self.holds.get_mut(&requester) {
            if let Some(p) = self.peers.get(&h.peer) {
                h.until = until;
                return Ok(SocketAddrV4::new(h.peer, p.port));
            }
        }
        let others: Vec<Ipv4Addr> = self.peers.keys().copied().filter(|ip| *ip != requester).collect();
        if others.is_empty() {
            return Err(ServeHere::NoPeer);
        }
        let subnet = |ip: Ipv4Addr| u32::from(ip).checked_shr(32 - u32::from(self.policy.prefix.min(32))).unwrap_or(0);
        let best = others
            .into_iter()
            .map(|ip| (subnet(ip) != subnet(requester), self.load(ip), ip))
            .filter(|(_, load, _)| *load < self.policy.max_per_peer)
            .min();
        let Some((_, _, peer)) = best else { return Err(ServeHere::AllBusy) };
        self.holds.insert(requester, Hold { peer, until });
        Ok(SocketAddrV4::new(peer, self.peers[&peer].port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn book(k: usize) -> PeerBook {
        PeerBook::new(PeerPolicy { max_per_peer: k, hold: Duration::from_secs(10), prefix: 24, silence: Duration::from_secs(90) })
    }

    /// One row: an action at a time offset and what `pick` must answer.
    enum Step {
        Serving(u8),
        Stopped(u8),
        Bad(u8, u8),
        Direct(u8),
        Pick(u8, Result<u8, ServeHere>),
    }

    fn play(k: usize, rows: &[(u64, Step)]) {
        let t0 = Instant::now();
        let mut b = book(k);
        for (i, (at, step)) in rows.iter().enumerate() {
            let now = t0 + Duration::from_secs(*at);
            match step {
                Step::Serving(p) => b.serving(ip(*p), 8081, now),
                Step::Stopped(p) => {
                    b.stopped(ip(*p));
                }
                Step::Bad(r, p) => {
                    b.bad(ip(*r), ip(*p));
                }
                Step::Direct(r) => b.direct(ip(*r)),
                Step::Pick(r, want) => {
                    let got = b.pick(ip(*r), now).map(|a| a.ip().octets()[3]);
                    assert_eq!(&got, want, "row {i}: pick for .{r}");
                }
            }
        }
    }

    use ServeHere::{AllBusy, NoPeer};
    use Step::{Bad, Direct, Pick, Serving, Stopped};

    #[test]
    fn no_peer_then_the_appliance_and_never_the_requester_itself() {
        play(2, &[(0, Pick(5, Err(NoPeer))), (1, Serving(5)), (1, Pick(5, Err(NoPeer))), (1, Pick(6, Ok(5)))]);
    }

    #[test]
    fn each_peer_takes_at_most_k_and_then_the_appliance_serves() {
        play(
            2,
            &[
                (0, Serving(1)),
                (0, Pick(10, Ok(1))),
                (0, Pick(11, Ok(1))),
                (0, Pick(12, Err(AllBusy))),
                // A second peer: the least loaded first.
                (1, Serving(2)),
                (1, Pick(12, Ok(2))),
                (1, Pick(13, Ok(2))),
                (1, Pick(14, Err(AllBusy))),
            ],
        );
    }

    #[test]
    fn a_requester_keeps_its_peer_for_its_next_file_without_a_new_slot() {
        play(1, &[(0, Serving(1)), (0, Pick(10, Ok(1))), (1, Pick(10, Ok(1))), (2, Pick(11, Err(AllBusy)))]);
    }

    #[test]
    fn slots_free_when_the_requester_serves_asks_directly_or_its_hold_runs_out() {
        play(
            1,
            &[
                (0, Serving(1)),
                (0, Pick(10, Ok(1))),
                (1, Pick(11, Err(AllBusy))),
                // .10 has both files and serves: .1's slot is free, and .10 is a peer.
                (2, Serving(10)),
                (2, Pick(11, Ok(1))),
                (2, Pick(12, Ok(10))),
                (3, Direct(11)),
                (3, Pick(13, Ok(1))),
                // .11, .12 and .13 never come back: their holds end 10 s after their last request.
                (12, Pick(14, Ok(10))),
                (12, Pick(15, Err(AllBusy))),
                (13, Pick(15, Ok(1))),
            ],
        );
    }

    #[test]
    fn the_same_subnet_first_then_the_lowest_address() {
        let t0 = Instant::now();
        let mut b = book(4);
        b.serving(Ipv4Addr::new(10, 0, 1, 9), 8081, t0);
        b.serving(ip(200), 8081, t0);
        b.serving(ip(100), 8081, t0);
        assert_eq!(b.pick(ip(7), t0), Ok(SocketAddrV4::new(ip(100), 8081)));
        assert_eq!(b.pick(Ipv4Addr::new(10, 0, 1, 50), t0), Ok(SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 9), 8081)));
        assert_eq!(b.load(ip(100)), 1);
    }

    #[test]
    fn a_bad_peer_is_dropped_only_on_the_word_of_a_requester_sent_to_it() {
        play(
            4,
            &[
                (0, Serving(1)),
                (0, Serving(2)),
                (0, Pick(10, Ok(1))),
                // .11 was never sent to .1: its word does not count.
                (1, Bad(11, 1)),
                (1, Pick(11, Ok(2))),
                (2, Bad(10, 1)),
                (2, Pick(10, Ok(2))),
                (2, Pick(12, Ok(2))),
            ],
        );
    }

    #[test]
    fn a_bad_copy_drops_the_peer_the_requester_holds_and_the_next_pick_is_another() {
        let mut b = book(4);
        let t = Instant::now();
        b.serving(ip(5), 8081, t);
        b.serving(ip(6), 8081, t);
        assert_eq!(b.bad_held(ip(20)), None, "no hold: nothing to drop");
        assert_eq!(b.pick(ip(20), t).map(|a| *a.ip()), Ok(ip(5)));
        assert_eq!(b.bad_held(ip(20)), Some(ip(5)));
        assert_eq!(b.peers(), 1);
        assert_eq!(b.pick(ip(20), t).map(|a| *a.ip()), Ok(ip(6)));
        assert_eq!(b.bad_held(ip(20)), Some(ip(6)));
        assert_eq!(b.pick(ip(20), t), Err(ServeHere::NoPeer));
    }

    #[test]
    fn stopped_and_silent_peers_are_gone() {
        play(
            4,
            &[
                (0, Serving(1)),
                (0, Serving(2)),
                (0, Pick(10, Ok(1))),
                (1, Stopped(1)),
                // .10's hold went with .1: it gets the other peer.
                (1, Pick(10, Ok(2))),
                (60, Serving(3)),
                // .2 last heard at 0 s: silent for 90 s at 90 s.
                (89, Pick(11, Ok(2))),
                (90, Pick(12, Ok(3))),
            ],
        );
    }
}
