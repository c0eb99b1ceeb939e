//! Which node serves a kernel/initrd request: the pure scheduler of peer-served boot files.
//! No I/O, no clock reads (the caller passes `now`), table-tested like the swarm core.
//!
//! Nodes whose installer holds verified copies announce themselves ([`PeerBook::serving`]);
//! a request from a node is answered with a redirect to a serving peer that has a free slot,
//! by the appliance itself while it has a free slot, or waits in a FIFO for the first free slot
//! ([`PeerBook::pick`]). Rules:
//! - never the requester itself; peers on the requester's subnet first, then the least loaded,
//!   then the lowest address (deterministic); a free peer before the appliance;
//! - each peer is given at most `max_per_peer` requesters at once (its uplink is shared); a
//!   requester keeps its peer for all its boot files (kernel, then initrd) while its hold lasts;
//! - a hold ends when the requester says it has both files (`GET /boot/fetched`, the node
//!   script's last request before it boots: the peer's upload is free again), when it announces
//!   that it serves, when it asks the appliance directly (`?direct=1`, its fallback after a
//!   failed peer), or at its deadline (`hold` after its last request: size / assumed rate, see
//!   `boot.peer_rate_mbit`);
//! - the stampede rule: the appliance sends at most `here_max` transfers at once (counted from
//!   the request to the end of the response body, [`PeerBook::done_here`]); a request that finds
//!   no free slot anywhere waits, first come first served, for the first slot that frees (the
//!   appliance's or a peer's, whichever comes first), at most `wait`; then the appliance serves
//!   it anyway. The appliance's link never idles while requests wait (its own slots are always
//!   in use then), so the appliance's work is never more than unicast's, and a peer that comes
//!   online takes waiters off it;
//! - an installer's own fetch (`?peer=1`: it will serve the files once checked) goes ahead of
//!   the line, behind the installers already waiting: it is a source more for the next round;
//! - a requester whose kernel the appliance sent gets its initrd there too without queueing
//!   while its hold lasts (one node finishing beats two half-done), unless a peer has a free
//!   slot; a new kernel request (the installer's fetch after boot) queues like any other;
//! - a peer reported bad by a requester that was sent to it is dropped, as is one that stops
//!   or stays silent for [`PeerBook::silence`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
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
    /// Transfers the appliance sends at once before requests wait (`boot.peer_appliance_max`);
    /// 0 = no limit, requests never wait.
    pub here_max: usize,
    /// The longest a request waits for a free slot (`boot.peer_wait`); then the appliance
    /// serves it anyway.
    pub wait: Duration,
}

/// Why a request is served by the appliance itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeHere {
    /// No node serves the boot files (yet), and the appliance has a free slot.
    NoPeer,
    /// Every serving peer (other than the requester) has all its slots taken, and the
    /// appliance has a free slot.
    AllBusy,
    /// The appliance served this requester's previous file and its hold lasts.
    Held,
    /// The request waited `wait` without a free slot: served anyway.
    WaitedOut,
}

impl std::fmt::Display for ServeHere {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServeHere::NoPeer => "no serving peer",
            ServeHere::AllBusy => "every peer busy",
            ServeHere::Held => "it served this node's previous file",
            ServeHere::WaitedOut => "waited the longest allowed for a free slot",
        })
    }
}

/// The answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Redirect to this peer (its slot is taken, or the requester's refreshed).
    Peer(SocketAddrV4),
    /// The appliance serves, in a slot of its own: call [`PeerBook::done_here`] with the ticket
    /// when the response body ends.
    Here(ServeHere),
    /// No free slot: ask again when one frees ([`PeerBook`]'s state changed) or at `until` at
    /// the latest, when the answer is [`ServeHere::WaitedOut`]. Call [`PeerBook::leave`] if the
    /// request goes away meanwhile.
    Wait {
        /// When waiting ends.
        until: Instant,
    },
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

/// The serving peers, the redirects in flight, the appliance's transfers and the waiters.
#[derive(Debug)]
pub struct PeerBook {
    policy: PeerPolicy,
    peers: BTreeMap<Ipv4Addr, Peer>,
    /// Requester -> the peer it was sent to.
    holds: BTreeMap<Ipv4Addr, Hold>,
    /// Requester -> until when the appliance serves it without queueing.
    here_holds: BTreeMap<Ipv4Addr, Instant>,
    /// Tickets of the appliance's transfers in flight.
    here: BTreeSet<u64>,
    /// Waiting requests, first come first: (ticket, arrival); installers' requests first.
    queue: VecDeque<(u64, Instant)>,
    /// Tickets in `queue` of installers that will serve.
    firsts: BTreeSet<u64>,
}

impl PeerBook {
    /// An empty book.
    pub fn new(policy: PeerPolicy) -> PeerBook {
        PeerBook { policy, peers: BTreeMap::new(), holds: BTreeMap::new(), here_holds: BTreeMap::new(), here: BTreeSet::new(), queue: VecDeque::new(), firsts: BTreeSet::new() }
    }

    /// `peer` serves verified copies on `port` (first announce or a refresh). Its own hold ends:
    /// it has both files.
    pub fn serving(&mut self, peer: Ipv4Addr, port: u16, now: Instant) {
        self.peers.insert(peer, Peer { port, heard: now });
        self.holds.remove(&peer);
        self.here_holds.remove(&peer);
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

    /// `requester` says it holds both files, checked (`GET /boot/fetched`, the node script's last
    /// request before it boots): the slot it held at a peer (or the appliance's hold for its
    /// initrd) frees now rather than at the hold's deadline. Only the requester's own hold ends.
    /// Returns the peer whose slot freed.
    pub fn fetched(&mut self, requester: Ipv4Addr) -> Option<Ipv4Addr> {
        self.here_holds.remove(&requester);
        self.holds.remove(&requester).map(|h| h.peer)
    }

    /// `requester` asks the appliance directly (its fallback): its hold ends, and the transfer
    /// `ticket` is the appliance's (no waiting: it already waited or failed once).
    pub fn direct(&mut self, requester: Ipv4Addr, ticket: u64) {
        self.holds.remove(&requester);
        self.here_holds.remove(&requester);
        self.here.insert(ticket);
    }

    /// The appliance's transfer `ticket` ended (body sent or connection gone): its slot frees.
    pub fn done_here(&mut self, ticket: u64) {
        self.here.remove(&ticket);
    }

    /// Waiting request `ticket` went away (client gone): out of the queue.
    pub fn leave(&mut self, ticket: u64) {
        self.queue.retain(|(t, _)| *t != ticket);
        self.firsts.remove(&ticket);
    }

    fn drop_peer(&mut self, peer: Ipv4Addr) -> bool {
        self.holds.retain(|_, h| h.peer != peer);
        self.peers.remove(&peer).is_some()
    }

    /// Ends holds past their deadline and forgets silent peers.
    fn expire(&mut self, now: Instant) {
        self.holds.retain(|_, h| h.until > now);
        self.here_holds.retain(|_, until| *until > now);
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

    /// The appliance's transfers in flight.
    pub fn here_load(&self) -> usize {
        self.here.len()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Serving peers other than `requester` with a free slot, best first.
    fn free_peers(&self, requester: Ipv4Addr) -> Vec<Ipv4Addr> {
        let subnet = |ip: Ipv4Addr| u32::from(ip).checked_shr(32 - u32::from(self.policy.prefix.min(32))).unwrap_or(0);
        let mut v: Vec<(bool, usize, Ipv4Addr)> = self
            .peers
            .keys()
            .copied()
            .filter(|ip| *ip != requester)
            .map(|ip| (subnet(ip) != subnet(requester), self.load(ip), ip))
            .filter(|(_, load, _)| *load < self.policy.max_per_peer)
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, _, ip)| ip).collect()
    }

    fn redirect(&mut self, requester: Ipv4Addr, peer: Ipv4Addr, now: Instant) -> Decision {
        self.holds.insert(requester, Hold { peer, until: now + self.policy.hold });
        self.here_holds.remove(&requester);
        Decision::Peer(SocketAddrV4::new(peer, self.peers[&peer].port))
    }

    fn here(&mut self, requester: Ipv4Addr, ticket: u64, why: ServeHere, now: Instant) -> Decision {
        self.leave(ticket);
        self.here.insert(ticket);
        self.here_holds.insert(requester, now + self.policy.hold);
        Decision::Here(why)
    }

    /// Where request `ticket` of `requester` goes (see the module docs). Asked again with the
    /// same ticket after a [`Decision::Wait`]. `first`: the request of an installer that will
    /// serve the files once it has them (it goes to the head of the line: each such node is a
    /// source more, which is what doubles the sources per round).
    /// `follows`: the file after the kernel (the initrd): it goes to the appliance again without
    /// waiting when the appliance sent this requester's previous file.
    pub fn pick(&mut self, requester: Ipv4Addr, ticket: u64, first: bool, follows: bool, now: Instant) -> Decision {
        self.expire(now);
        if let Some(h) = self.holds.get_mut(&requester) {
            if let Some(p) = self.peers.get(&h.peer) {
                h.until = now + self.policy.hold;
                let to = SocketAddrV4::new(h.peer, p.port);
                self.leave(ticket);
                return Decision::Peer(to);
            }
        }
        let free = self.free_peers(requester);
        if follows && self.here_holds.contains_key(&requester) {
            if let Some(&peer) = free.first() {
                self.leave(ticket);
                return self.redirect(requester, peer, now);
            }
            return self.here(requester, ticket, ServeHere::Held, now);
        }
        let free_here = match self.policy.here_max {
            0 => usize::MAX,
            max => max.saturating_sub(self.here.len()),
        };
        let free_slots: usize = free.iter().map(|ip| self.policy.max_per_peer.saturating_sub(self.load(*ip))).sum();
        let mut pos = self.queue.iter().position(|(t, _)| *t == ticket);
        if first && pos.is_none() {
            let at = self.queue.iter().take_while(|(t, _)| self.firsts.contains(t)).count();
            self.queue.insert(at, (ticket, now));
            self.firsts.insert(ticket);
            pos = Some(at);
        }
        let ahead = pos.unwrap_or(self.queue.len());
        if ahead < free_slots.saturating_add(free_here) {
            self.leave(ticket);
            if let Some(&peer) = free.first() {
                return self.redirect(requester, peer, now);
            }
            let why = if self.peers.keys().any(|ip| *ip != requester) { ServeHere::AllBusy } else { ServeHere::NoPeer };
            return self.here(requester, ticket, why, now);
        }
        let arrived = match pos {
            Some(i) => self.queue[i].1,
            None => {
                self.queue.push_back((ticket, now));
                now
            }
        };
        let until = arrived + self.policy.wait;
        if now >= until {
            return self.here(requester, ticket, ServeHere::WaitedOut, now);
        }
        Decision::Wait { until }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn book(k: usize) -> PeerBook {
        book_here(k, 0)
    }

    /// `here`: the appliance's own slots (0 = no limit); requests wait 5 s at most.
    fn book_here(k: usize, here: usize) -> PeerBook {
        PeerBook::new(PeerPolicy {
            max_per_peer: k,
            hold: Duration::from_secs(10),
            prefix: 24,
            silence: Duration::from_secs(90),
            here_max: here,
            wait: Duration::from_secs(5),
        })
    }

    /// What a stampede row expects.
    #[derive(Debug, PartialEq)]
    enum Want {
        Peer(u8),
        Here(ServeHere),
        /// Waits until this second.
        Wait(u64),
    }

    /// One row: an action at a time offset and what `pick` must answer.
    enum Step {
        Serving(u8),
        Stopped(u8),
        Bad(u8, u8),
        Direct(u8),
        Pick(u8, Result<u8, ServeHere>),
        /// Request `ticket` of a node (asked again with the same ticket while it waits).
        Ask(u8, u64, Want),
        /// The same, for the file after the kernel (the initrd).
        AskNext(u8, u64, Want),
        /// The same, by an installer that will serve (`?peer=1`).
        AskFirst(u8, u64, Want),
        /// The appliance's transfer `ticket` ended.
        Done(u64),
        /// Waiting request `ticket` went away.
        Leave(u64),
    }

    fn play(k: usize, rows: &[(u64, Step)]) {
        play_here(k, 0, rows);
    }

    fn play_here(k: usize, here: usize, rows: &[(u64, Step)]) {
        let t0 = Instant::now();
        let mut b = book_here(k, here);
        let mut ticket = 1000;
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
                Step::Direct(r) => {
                    ticket += 1;
                    b.direct(ip(*r), ticket);
                }
                Step::Pick(r, want) => {
                    ticket += 1;
                    let got = match b.pick(ip(*r), ticket, false, true, now) {
                        Decision::Peer(a) => Ok(a.ip().octets()[3]),
                        Decision::Here(why) => Err(why),
                        Decision::Wait { .. } => panic!("row {i}: .{r} waits"),
                    };
                    assert_eq!(&got, want, "row {i}: pick for .{r}");
                }
                Step::Ask(r, t, want) | Step::AskFirst(r, t, want) | Step::AskNext(r, t, want) => {
                    let first = matches!(step, Step::AskFirst(..));
                    let follows = matches!(step, Step::AskNext(..));
                    let got = match b.pick(ip(*r), *t, first, follows, now) {
                        Decision::Peer(a) => Want::Peer(a.ip().octets()[3]),
                        Decision::Here(why) => Want::Here(why),
                        Decision::Wait { until } => Want::Wait(until.duration_since(t0).as_secs()),
                    };
                    assert_eq!(&got, want, "row {i}: request {t} of .{r}");
                }
                Step::Done(t) => b.done_here(*t),
                Step::Leave(t) => b.leave(*t),
            }
        }
    }

    use ServeHere::{AllBusy, NoPeer};
    use Step::{Ask, AskFirst, AskNext, Bad, Direct, Done, Leave, Pick, Serving, Stopped};

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
    fn a_requester_that_has_both_files_frees_its_peers_slot_at_once() {
        let t0 = Instant::now();
        let mut b = book(1);
        b.serving(ip(1), 8081, t0);
        assert_eq!(b.pick(ip(10), 1, false, false, t0), Decision::Peer(SocketAddrV4::new(ip(1), 8081)));
        assert_eq!(b.pick(ip(11), 2, false, false, t0), Decision::Here(ServeHere::AllBusy));
        // Someone else's word does not free .10's slot; .10's own does, long before its deadline.
        assert_eq!(b.fetched(ip(11)), None);
        assert_eq!(b.load(ip(1)), 1);
        assert_eq!(b.fetched(ip(10)), Some(ip(1)));
        assert_eq!(b.load(ip(1)), 0);
        assert_eq!(b.pick(ip(12), 3, false, false, t0 + Duration::from_secs(1)), Decision::Peer(SocketAddrV4::new(ip(1), 8081)));
        assert_eq!(b.fetched(ip(10)), None, "said twice: nothing more to free");
    }

    #[test]
    fn the_same_subnet_first_then_the_lowest_address() {
        let t0 = Instant::now();
        let mut b = book(4);
        b.serving(Ipv4Addr::new(10, 0, 1, 9), 8081, t0);
        b.serving(ip(200), 8081, t0);
        b.serving(ip(100), 8081, t0);
        assert_eq!(b.pick(ip(7), 1, false, false, t0), Decision::Peer(SocketAddrV4::new(ip(100), 8081)));
        assert_eq!(b.pick(Ipv4Addr::new(10, 0, 1, 50), 2, false, false, t0), Decision::Peer(SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 9), 8081)));
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
        let peer = |d: Decision| match d {
            Decision::Peer(a) => Some(*a.ip()),
            _ => None,
        };
        assert_eq!(peer(b.pick(ip(20), 1, false, false, t)), Some(ip(5)));
        assert_eq!(b.bad_held(ip(20)), Some(ip(5)));
        assert_eq!(b.peers(), 1);
        assert_eq!(peer(b.pick(ip(20), 2, false, false, t)), Some(ip(6)));
        assert_eq!(b.bad_held(ip(20)), Some(ip(6)));
        assert_eq!(b.pick(ip(20), 3, false, false, t), Decision::Here(ServeHere::NoPeer));
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

    #[test]
    fn a_stampede_waits_first_come_first_served_for_the_appliances_slot() {
        use ServeHere::Held;
        play_here(
            2,
            1,
            &[
                (0, Ask(10, 1, Want::Here(NoPeer))),
                (0, Ask(11, 2, Want::Wait(5))),
                (0, Ask(12, 3, Want::Wait(5))),
                (0, Ask(11, 2, Want::Wait(5))),
                // .10's kernel is sent: its initrd does not queue behind the others.
                (0, Done(1)),
                (0, AskNext(10, 4, Want::Here(Held))),
                // The slot went to nobody yet (.10 holds its own): .11 is first in line, .12
                // and a newcomer wait behind it.
                (0, Done(4)),
                (0, Ask(12, 3, Want::Wait(5))),
                (0, Ask(13, 5, Want::Wait(5))),
                (0, Ask(11, 2, Want::Here(NoPeer))),
                (1, Ask(12, 3, Want::Wait(5))),
                // .10 booted and fetches its kernel again: that waits like any request.
                (2, Done(2)),
                (2, Ask(10, 6, Want::Wait(7))),
                (2, Ask(12, 3, Want::Here(NoPeer))),
            ],
        );
    }

    #[test]
    fn a_peer_coming_online_takes_waiters_off_the_appliance_and_the_wait_is_bounded() {
        use ServeHere::WaitedOut;
        play_here(
            2,
            1,
            &[
                (0, Ask(10, 1, Want::Here(NoPeer))),
                (0, Ask(11, 2, Want::Wait(5))),
                (1, Ask(12, 3, Want::Wait(6))),
                (1, Ask(13, 4, Want::Wait(6))),
                (2, Ask(14, 5, Want::Wait(7))),
                // .10 has booted and serves 2: the first two in line go to it, in order.
                (3, Serving(10)),
                (3, Ask(11, 2, Want::Peer(10))),
                (3, Ask(12, 3, Want::Peer(10))),
                (3, Ask(13, 4, Want::Wait(6))),
                // .13 gave up (client gone): .14 is next, and after 5 s it is served anyway
                // although the appliance's one slot is still taken.
                (4, Leave(4)),
                (6, Ask(14, 5, Want::Wait(7))),
                (7, Ask(14, 5, Want::Here(WaitedOut))),
            ],
        );
    }

    #[test]
    fn without_a_limit_of_its_own_the_appliance_serves_every_request_at_once() {
        play_here(
            1,
            0,
            &[
                (0, Ask(10, 1, Want::Here(NoPeer))),
                (0, Ask(11, 2, Want::Here(NoPeer))),
                (0, Ask(12, 3, Want::Here(NoPeer))),
                (1, Serving(10)),
                (1, Ask(13, 4, Want::Peer(10))),
                (1, Ask(14, 5, Want::Here(AllBusy))),
            ],
        );
    }

    #[test]
    fn an_installer_that_will_serve_goes_ahead_of_the_line() {
        play_here(
            4,
            1,
            &[
                (0, Ask(10, 1, Want::Here(NoPeer))),
                (0, Ask(11, 2, Want::Wait(5))),
                (0, Ask(12, 3, Want::Wait(5))),
                (1, AskFirst(13, 4, Want::Wait(6))),
                (1, AskFirst(14, 5, Want::Wait(6))),
                (1, Done(1)),
                (1, Ask(11, 2, Want::Wait(5))),
                (1, AskFirst(14, 5, Want::Wait(6))),
                (1, AskFirst(13, 4, Want::Here(NoPeer))),
                (2, Done(4)),
                (2, AskFirst(14, 5, Want::Here(NoPeer))),
            ],
        );
    }
}
