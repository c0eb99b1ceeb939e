//! Who to trust, and how far: the engine's defences against hostile peers, pure (no I/O, time
//! passed in) and table-tested, like the picker. The socket loops in `mod.rs` only apply the
//! verdicts.
//!
//! - Admission: at most [`MAX_CONNS`] connections, [`MAX_CONNS_PER_IP`] from one address, checked
//!   again after the handshake; the appliance's seed (trusted) is always admitted.
//! - Choke flapping: more than [`FLAP_CHOKES`] chokes within [`FLAP_WINDOW`] closes the
//!   connection and keeps its address away for [`FLAP_COOLOFF`] (each choke frees its requests
//!   and each unchoke re-plans them: a flapping peer turns into a request storm).
//! - Failed pieces: a sole untrusted sender is banned at once; a piece with several senders is
//!   fetched again from one peer (the seed when it is connected) and the copy that verifies
//!   names the liars block by block ([`liars`]); only they are banned. The appliance's seed is
//!   never banned (a piece only it sent that fails is logged loudly and fetched again).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most connections of a node.
pub const MAX_CONNS: usize = 80;
/// Untrusted connections a node dialled itself that it keeps when full: beyond these, a peer
/// dialling in takes the place of one of them (`Core::register`), so the rest of [`MAX_CONNS`]
/// is in the end the share of the peers that dial it (half, less the seed's). When every
/// node kept everything it dialled, a swarm one node larger than the cap allows (81 nodes,
/// started at once) filled every node before the last one's connections were registered: it
/// was refused by all, for good, and fetched the whole archive from the seed after the others
/// had finished (simulated, SCALE.md).
pub const MAX_OUTGOING: usize = (MAX_CONNS - 2) / 2;
/// Untrusted connections a node accepts from peers dialling it, at most: the rest of
/// [`MAX_CONNS`] (half of [`MAX_OUTGOING`]) stays for its own dials. Without it the first
/// nodes to join (every later node's first peer list holds them, and each dials its list at
/// once) filled up with each other's connections before they knew anyone else, and stayed a
/// cluster the rest of the swarm reached through few connections: in the simulator at
/// N = 250 × 2.7 GB on 1 GbE, the 40 first nodes to start were the last to finish, 1.26 × T*
/// against 1.20 for the median. With 41 places instead of 61, N = 250 took 1.19 × T* but
/// at N = 128 / 3 Mbit/s the last nodes to start found every place taken (1.68 against 1.47
/// without a cap; 61: 1.23 and 1.50). SCALE.md, stop 45.
pub const MAX_INCOMING: usize = MAX_CONNS - MAX_OUTGOING / 2;
/// Most connections from one IP address (two: a node and its restarted process overlap, or two
/// peers dial each other at once before one connection is dropped).
pub const MAX_CONNS_PER_IP: usize = 2;
/// Chokes tolerated within [`FLAP_WINDOW`]; one more closes the connection.
pub const FLAP_CHOKES: usize = 5;
/// The window in which chokes are counted.
pub const FLAP_WINDOW: Duration = Duration::from_secs(10);
/// How long a flapping peer's address is neither dialled nor accepted.
pub const FLAP_COOLOFF: Duration = Duration::from_secs(60);

/// Whether a connection that finished its handshake may stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Register it.
    Yes,
    /// The node has [`MAX_CONNS`] connections.
    Full,
    /// This address has [`MAX_CONNS_PER_IP`] connections.
    TooManyFromIp,
    /// Banned, or cooling off after flapping.
    Distrusted,
}

/// Admission of a connection from `ip`: `total` connections now, `from_ip` of them from `ip`
/// (a duplicate of the same peer id being replaced is not counted by the caller).
pub fn admit(trusted: bool, distrusted: bool, total: usize, from_ip: usize) -> Admit {
    if trusted {
        // The appliance's seed: always (a crowd of hostile addresses cannot lock it out).
        Admit::Yes
    } else if distrusted {
        Admit::Distrusted
    } else if total >= MAX_CONNS {
        Admit::Full
    } else if from_ip >= MAX_CONNS_PER_IP {
        Admit::TooManyFromIp
    } else {
        Admit::Yes
    }
}

/// A connection's recent chokes.
#[derive(Debug, Default)]
pub struct ChokeMeter {
    at: VecDeque<Instant>,
}

impl ChokeMeter {
    /// The peer choked us at `now`: true when it flaps (more than [`FLAP_CHOKES`] chokes in
    /// [`FLAP_WINDOW`]).
    pub fn choke(&mut self, now: Instant) -> bool {
        while self.at.front().is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW) {
            self.at.pop_front();
        }
        self.at.push_back(now);
        if self.at.len() > FLAP_CHOKES {
            self.at.pop_front();
            return true;
        }
        false
    }
}

/// What a piece that failed its hash means.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// A sender already banned explains it: fetch it again, nothing more.
    Explained,
    /// One untrusted sender: it lied; ban it.
    Ban(IpAddr),
    /// Only the appliance's seed sent it: never banned; log loudly and fetch again.
    TrustedSent,
    /// Several senders: keep each block's sender and hash, fetch the piece again from one peer,
    /// and compare ([`liars`]).
    Suspect,
}

/// Judges a failed piece from its blocks' senders (one per block, in order).
pub fn failed_piece(senders: &[IpAddr], trusted: &HashSet<IpAddr>, banned: &HashSet<IpAddr>) -> Failure {
    if senders.iter().any(|ip| banned.contains(ip)) {
        return Failure::Explained;
    }
    match senders.first() {
        None => Failure::Explained,
        Some(first) if senders.iter().all(|ip| ip == first) => {
            if trusted.contains(first) {
                Failure::TrustedSent
            } else {
                Failure::Ban(*first)
            }
        }
        Some(_) => Failure::Suspect,
    }
}

/// The senders of a bad copy whose blocks differ from the verified copy: `bad` is (sender,
/// block hash) per block of the failed copy, `good` the block hashes of the copy that verified.
/// Trusted addresses are never named. Distinct, in block order.
pub fn liars(bad: &[(IpAddr, [u8; 20])], good: &[[u8; 20]], trusted: &HashSet<IpAddr>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for ((ip, h), g) in bad.iter().zip(good) {
        if h != g && !trusted.contains(ip) && !out.contains(ip) {
            out.push(*ip);
        }
    }
    out
}

/// Addresses kept away until a time (flapping peers); expired entries are pruned on lookup.
#[derive(Debug, Default)]
pub struct Cooloff {
    until: HashMap<IpAddr, Instant>,
}

impl Cooloff {
    /// Keeps `ip` away until `now + FLAP_COOLOFF`.
    pub fn add(&mut self, ip: IpAddr, now: Instant) {
        self.until.insert(ip, now + FLAP_COOLOFF);
    }

    /// Whether `ip` is kept away at `now`.
    pub fn holds(&self, ip: &IpAddr, now: Instant) -> bool {
        self.until.get(ip).is_some_and(|t| *t > now)
    }

    /// Forgets expired entries (called every tick: the map stays as small as the flappers).
    pub fn prune(&mut self, now: Instant) {
        self.until.retain(|_, t| *t > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn set(ips: &[u8]) -> HashSet<IpAddr> {
        ips.iter().map(|i| ip(*i)).collect()
    }

    #[test]
    fn admission_table() {
        let full = MAX_CONNS;
        let one_ip = MAX_CONNS_PER_IP;
        // (trusted, distrusted, total, from_ip) -> verdict
        let cases = [
            (false, false, 0, 0, Admit::Yes),
            (false, false, full - 1, one_ip - 1, Admit::Yes),
            (false, false, full, 0, Admit::Full),
            (false, false, 3, one_ip, Admit::TooManyFromIp),
            (false, true, 0, 0, Admit::Distrusted),
            (true, false, full + 5, one_ip + 5, Admit::Yes),
            (true, true, 0, 0, Admit::Yes),
        ];
        for (t, d, total, from, want) in cases {
            assert_eq!(admit(t, d, total, from), want, "trusted={t} distrusted={d} total={total} from_ip={from}");
        }
    }

    #[test]
    fn chokes_within_the_window_flap_and_spaced_chokes_do_not() {
        let t0 = Instant::now();
        let mut m = ChokeMeter::default();
        for i in 0..FLAP_CHOKES {
            assert!(!m.choke(t0 + Duration::from_millis(i as u64 * 100)), "choke {i}");
        }
        assert!(m.choke(t0 + Duration::from_secs(1)), "one more within the window");
        // Spaced out beyond the window: never.
        let mut m = ChokeMeter::default();
        for i in 0..50u64 {
            assert!(!m.choke(t0 + FLAP_WINDOW / 2 * i as u32 + Duration::from_millis(i)), "choke {i}");
        }
    }

    #[test]
    fn failed_piece_table() {
        let seed = set(&[1]);
        let none = HashSet::new();
        let cases: Vec<(Vec<u8>, HashSet<IpAddr>, Failure)> = vec![
            // sole untrusted sender: banned at once
            (vec![9, 9, 9, 9], none.clone(), Failure::Ban(ip(9))),
            // sole sender is the seed: never banned
            (vec![1, 1, 1, 1], none.clone(), Failure::TrustedSent),
            // garbage for half a piece, then the seed finished it: nobody is banned yet
            (vec![9, 9, 1, 1], none.clone(), Failure::Suspect),
            // two untrusted senders
            (vec![9, 8, 8, 8], none.clone(), Failure::Suspect),
            // a sender already banned explains it
            (vec![9, 9, 1, 1], set(&[9]), Failure::Explained),
            (vec![], none.clone(), Failure::Explained),
        ];
        for (senders, banned, want) in cases {
            let s: Vec<IpAddr> = senders.iter().map(|i| ip(*i)).collect();
            assert_eq!(failed_piece(&s, &seed, &banned), want, "{senders:?} banned {banned:?}");
        }
    }

    #[test]
    fn liars_are_the_senders_of_blocks_that_differ() {
        let (g, x) = ([1u8; 20], [2u8; 20]);
        let seed = set(&[1]);
        let good = [g, g, g, g];
        // (bad copy per block, expected liars)
        let cases: Vec<(Vec<(u8, [u8; 20])>, Vec<u8>)> = vec![
            (vec![(9, x), (9, x), (1, g), (1, g)], vec![9]),
            (vec![(9, g), (8, x), (1, g), (1, g)], vec![8]),
            (vec![(9, x), (8, x), (9, x), (1, g)], vec![9, 8]),
            // an honest node's blocks matched: not named
            (vec![(7, g), (7, g), (9, x), (9, x)], vec![9]),
            // the seed is never named, even if its block differs (disk trouble on the appliance)
            (vec![(1, x), (9, g), (9, g), (9, g)], vec![]),
        ];
        for (bad, want) in cases {
            let b: Vec<(IpAddr, [u8; 20])> = bad.iter().map(|(i, h)| (ip(*i), *h)).collect();
            let w: Vec<IpAddr> = want.iter().map(|i| ip(*i)).collect();
            assert_eq!(liars(&b, &good, &seed), w, "{want:?}");
        }
    }

    #[test]
    fn cooloff_expires() {
        let t0 = Instant::now();
        let mut c = Cooloff::default();
        c.add(ip(9), t0);
        assert!(c.holds(&ip(9), t0 + FLAP_COOLOFF / 2));
        assert!(!c.holds(&ip(8), t0));
        assert!(!c.holds(&ip(9), t0 + FLAP_COOLOFF));
        c.prune(t0 + FLAP_COOLOFF);
        assert!(c.until.is_empty());
    }
}
