//! Which block to ask which peer for: the node-to-node engine's piece scheduler, pure (no I/O,
//! time passed in), so every rule is unit-tested.
//!
//! Rules, in order, each time a peer can take more requests:
//! 1. Blocks of a piece already in progress that this peer has (finish pieces before starting
//!    new ones: only whole pieces can be passed on).
//! 2. The streaming window: missing pieces just after the reader's position, lowest first.
//! 3. A new piece, rarest first among the pieces the peer has (availability = connected peers
//!    holding it), ties broken by a random starting point, so nodes that start together
//!    (flash crowd) ask the seed for different pieces and have something to trade at once.
//!    From the appliance's seed: our share first (see [`Picker::set_own_order`]), then as a
//!    helper the pieces still only on the seed that their owners are not about to fetch
//!    (`helper_pieces`); never a piece another node claimed ([`Picker::claim`]: it is asking
//!    the seed for it), nor, once shares apply, a piece a connected peer has; and every piece
//!    we start from the seed we claim to our peers.
//! 4. Endgame: when no piece is missing any more (all in progress), blocks already asked of
//!    another peer, at most [`ENDGAME_DUPES`] askers per block; the first copy wins and the
//!    others are cancelled. Never of the appliance's seed: at N = 128 every node's endgame
//!    through it cost the swarm 19 % of its makespan in the simulator (190.7 → 154.3 s).
//!
//! A *suspect* piece (it failed its hash with blocks from several senders) is fetched again
//! whole from one peer, to find the liar: a trusted peer (the appliance's seed) takes it first,
//! others only when no unchoked trusted peer has it; no endgame copies; if its peer leaves,
//! chokes or times out, the piece starts over (never finished by a second sender).
//!
//! Requests expire ([`Picker::expire`]) when their peer has sent nothing for the timeout (a
//! peer that keeps sending is serving a queue), or after [`STUCK_FACTOR`] timeouts regardless.
//!
//! A peer's requests are re-planned on every event that can give it work: its HAVE or
//! BITFIELD, its unchoke, a block arriving, a piece failing its hash, another peer leaving or
//! timing out with blocks asked. Nothing waits on a timer to find new work.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rand::Rng;

use super::wire::{BLOCK, MAX_REQUEST};

/// Piece `i`'s weight for the node at place `order` (splitmix64 of both): the node with the
/// highest weight owns the piece ([`Deal`]).
fn weight(i: usize, order: u32) -> u64 {
    let mut z = ((u64::from(order) << 32) | i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed's pieces dealt out to the downloading nodes (the shares), by weight: every node
/// computes every share alike from the same places, so a node done with its own knows which
/// pieces an owner fetches next, and an owner fetches its pieces heaviest first.
///
/// Nodes learn of one another one by one as they join (connections, then the tracker's
/// ring), and each counts the shares over the nodes it knows. Dealt as index modulo the
/// count, every node joining moved nearly every piece to another owner, so pieces fetched
/// under the smaller count were fetched again by their new owners: in the simulator at
/// N = 250 × 2.7 GB, about 280 of the seed's ~700 repeated pieces came in the first 8 s,
/// while the nodes' rings grew (SCALE.md, stop 45). Here the (piece, node) pairs are taken
/// heaviest first ([`weight`]), each piece by the first node that still has room (⌊pieces /
/// nodes⌋ each; the pieces left then go to the heaviest node with room, ⌈pieces / nodes⌉ at
/// most), so no share is longer than another by more than one piece: a long share would be
/// the last the seed finishes (by weight alone, 5150 pieces over 250 nodes were 20.6 ± 4.5
/// each). A node's heaviest pieces are taken first, so
/// a node that knows few others fetches first the pieces it most likely keeps once it knows
/// all of them, and a node joining takes mostly the pieces it outweighs.
#[derive(Debug, Default)]
struct Deal {
    /// The places counted, ascending (ours among them); a share's rank is its place here.
    all: Vec<u32>,
    /// Pieces dealt (the count `all` was dealt for).
    n: usize,
    /// Per rank: its pieces, heaviest first.
    walks: Vec<Vec<u32>>,
}

/// The heaviest nodes considered for each piece before the others ([`Deal`]).
const DEAL_TOP: usize = 8;

impl Deal {
    /// The shares of `n` pieces over the places `all` (ascending, distinct).
    #[cfg(test)]
    fn new(all: &[u32], n: usize) -> Deal {
        let mut d = Deal::default();
        d.update(all, n);
        d
    }

    /// Deals again over `all` (ascending, distinct) when they or `n` changed.
    fn update(&mut self, all: &[u32], n: usize) {
        if self.all == all && self.n == n {
            return;
        }
        let m = all.len();
        self.all.clear();
        self.all.extend_from_slice(all);
        self.n = n;
        self.walks = vec![Vec::new(); m];
        if m == 0 {
            return;
        }
        let (floor, cap) = (n / m, n.div_ceil(m));
        let top = DEAL_TOP.min(m);
        // (weight, piece, rank) of each piece's `top` heaviest nodes.
        let mut pairs: Vec<(u64, u32, u32)> = Vec::with_capacity(n * top);
        let mut best: Vec<(u64, u32)> = Vec::with_capacity(top + 1);
        for i in 0..n {
            best.clear();
            for (r, o) in all.iter().enumerate() {
                let w = weight(i, *o);
                if best.len() < top || w > best[top - 1].0 {
                    let at = best.partition_point(|b| b.0 > w);
                    best.insert(at, (w, r as u32));
                    best.truncate(top);
                }
            }
            pairs.extend(best.iter().map(|(w, r)| (*w, i as u32, *r)));
        }
        pairs.sort_unstable_by(|a, b| b.cmp(a));
        let mut owner: Vec<Option<(u64, u32)>> = vec![None; n];
        let mut load = vec![0usize; m];
        for (w, i, r) in pairs {
            if owner[i as usize].is_none() && load[r as usize] < floor {
                owner[i as usize] = Some((w, r));
                load[r as usize] += 1;
            }
        }
        // The pieces left (those whose heaviest nodes were all full, and the remainder of the
        // division): the heaviest node with fewer than `floor`, else with fewer than `cap`.
        for i in 0..n {
            if owner[i].is_none() {
                let room = |lim: usize| all.iter().enumerate().filter(|(r, _)| load[*r] < lim).map(|(r, o)| (weight(i, *o), r as u32)).max();
                let (w, r) = room(floor).or_else(|| room(cap)).unwrap_or((0, 0));
                owner[i] = Some((w, r));
                load[r as usize] += 1;
            }
        }
        let mut by: Vec<(u32, u64, u32)> = owner.iter().enumerate().filter_map(|(i, o)| o.map(|(w, r)| (r, w, i as u32))).collect();
        by.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        for (r, _, i) in by {
            self.walks[r as usize].push(i);
        }
    }

    /// The pieces of the share at rank `r`, in the order its owner fetches them.
    fn walk(&self, r: usize) -> &[u32] {
        self.walks.get(r).map_or(&[], Vec::as_slice)
    }

    /// The owner's place of each piece.
    #[cfg(test)]
    fn owners(&self) -> Vec<u32> {
        let mut o = vec![0; self.n];
        for (r, w) in self.walks.iter().enumerate() {
            for i in w {
                o[*i as usize] = self.all[r];
            }
        }
        o
    }
}

/// A connection's key (unique for the engine's life).
pub type PeerKey = u64;

/// How long a node done with its share leaves the seed idle for the owners' next pieces
/// before it fetches them itself (an owner that does not: its view of the shares differs).
pub const HOLD: Duration = Duration::from_secs(3);

/// [`HOLD`] in a swarm bigger than a node's connections (the tracker sent its ring).
pub const HOLD_RING: Duration = Duration::from_secs(10);
/// How long another node's claim on a piece (it asked the appliance's seed for it: see
/// [`Picker::claim`]) keeps us from asking the seed for the same piece, at most, unless the
/// claimer claims it again: it does every [`CLAIM_REFRESH`] while the piece is still coming.
/// A piece from the seed reaches a node in about pieces in flight from the seed × piece / C:
/// 3.4 s at N = 64, 10 Mbit/s and 64 KiB with one piece each, but measured up to 16 s at
/// N = 64 / 5 Mbit/s (TCP flows on a full queue take turns).
pub const CLAIM_TTL: Duration = Duration::from_secs(10);
/// How often we claim again the pieces still coming from the seed (see [`CLAIM_TTL`]).
pub const CLAIM_REFRESH: Duration = Duration::from_secs(4);
/// A claim counts this long after its first, claimed again or not: a peer that claims pieces
/// and renews the claims without ever fetching them holds them back no longer (a request
/// expires after 60 s regardless; the slowest piece from the seed measured took 30 s).
pub const CLAIM_MAX: Duration = Duration::from_secs(60);
/// Claims kept per peer, at most (a new one replaces its oldest): a peer that claims every
/// piece and fetches none holds back this many, each for [`CLAIM_TTL`], or [`CLAIM_MAX`] if it renews them.
pub const CLAIMS_PER_PEER: usize = 8;
/// Most peers asked for one block in endgame.
pub const ENDGAME_DUPES: usize = 2;
/// A request to a peer that keeps sending expires after this many request timeouts.
pub const STUCK_FACTOR: u32 = 4;

/// The fewest pieces a downloading peer may have and not be slow: half the median of `counts`
/// (rounded up, so that `count >= floor` is `2 × count >= median`).
fn slow_floor(mut counts: Vec<u32>) -> u32 {
    counts.sort_unstable();
    counts.get(counts.len() / 2).map_or(0, |m| m.div_ceil(2))
}

/// A set of piece indices, one bit each (none set at or past the piece count). The scans that
/// ask "a piece the peer has and we lack" test 64 pieces a word: a 2.7 GB image has 5150
/// pieces, and at N = 1000 every node handles ~4·10^6 HAVEs, each of which re-plans its
/// sender (by perf, those O(pieces) scans were a third of the simulator's time, stop 44).
#[derive(Clone, Debug)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize, on: impl Fn(usize) -> bool) -> Bits {
        let mut b = Bits(vec![0; n.div_ceil(64)]);
        for i in (0..n).filter(|i| on(*i)) {
            b.set(i, true);
        }
        b
    }

    fn set(&mut self, i: usize, v: bool) {
        if let Some(w) = self.0.get_mut(i / 64) {
            if v {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Whether some index is in both sets.
    fn meets(&self, o: &Bits) -> bool {
        self.0.iter().zip(&o.0).any(|(a, b)| a & b != 0)
    }

    /// The indices in both sets, ascending from `start` and round to just before it (the
    /// rarest-first scan's order).
    fn both_from<'a>(&'a self, o: &'a Bits, start: usize) -> impl Iterator<Item = usize> + 'a {
        let (w0, at) = (start / 64, start % 64);
        let words = self.0.len();
        let first = (w0..words).map(move |w| (w, if w == w0 { !0u64 << at } else { !0 }));
        let wrap = (0..(w0 + 1).min(words)).map(move |w| (w, if w == w0 { (1u64 << at) - 1 } else { !0 }));
        first.chain(wrap).flat_map(move |(w, mask)| {
            let mut x = self.0[w] & o.0[w] & mask;
            std::iter::from_fn(move || {
                (x != 0).then(|| {
                    let t = x.trailing_zeros() as usize;
                    x &= x - 1;
                    w * 64 + t
                })
            })
        })
    }
}

/// One block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Block {
    /// Piece index.
    pub piece: u32,
    /// Offset in the piece.
    pub begin: u32,
    /// Length.
    pub len: u32,
}

#[derive(Debug)]
enum Bs {
    Free,
    Asked(Vec<PeerKey>),
    Got(PeerKey),
}

#[derive(Debug)]
struct Active {
    blocks: Vec<Bs>,
    got: u32,
    /// The peer that started it; None once that peer left, choked us or timed out.
    owner: Option<PeerKey>,
    /// Fetched from its owner alone (a suspect piece).
    single: bool,
}

#[derive(Debug)]
enum Ps {
    Missing,
    Active(Active),
    /// Complete, being hashed: the sender of each block.
    Verifying(Vec<PeerKey>),
    Have,
}

#[derive(Debug)]
struct PeerView {
    has: Bits,
    count: u32,
    choked: bool,
    asked: Vec<(Block, Instant)>,
    order: Option<u32>,
    /// It had every piece when it joined (a seed, not a downloading peer with a share).
    joined_complete: bool,
    /// The appliance's seed: first choice for suspect pieces.
    trusted: bool,
    /// When its last block arrived.
    last_block: Option<Instant>,
    /// The pieces it claimed (oldest first), at most [`CLAIMS_PER_PEER`].
    claims: Vec<u32>,
}

/// What a received block means.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    /// Not asked of this peer (or already received): drop it, do not write it.
    Unexpected,
    /// Take it (write it); `complete` when the piece now has every block (verify it next);
    /// `cancel` lists the other peers asked for the same block (endgame).
    Take {
        /// Every block of the piece is here.
        complete: bool,
        /// (peer, block) requests to cancel.
        cancel: Vec<(PeerKey, Block)>,
    },
}

/// The scheduler's state for one torrent.
#[derive(Debug)]
pub struct Picker {
    piece_len: u32,
    total: u64,
    pieces: Vec<Ps>,
    /// The indices of the `Ps::Active` pieces, ascending: the scans for a started piece walk
    /// these, not every piece (a 2.7 GB image has 5150 pieces, a few dozen in progress).
    active: BTreeSet<u32>,
    /// The pieces in state `Ps::Missing`, and those not `Ps::Have` (kept with `pieces`).
    missing_bits: Bits,
    lack_bits: Bits,
    avail: Vec<u16>,
    have_count: u32,
    missing: u32,
    peers: HashMap<PeerKey, PeerView>,
    window: Option<(u32, u32)>,
    own_order: Option<u32>,
    /// The tracker's ring (every node that joined downloading, as orders, ascending), when the
    /// swarm is bigger than the peers a node can be connected to (see [`Picker::set_ring`]).
    ring: Vec<u32>,
    /// The shares over the places last counted (see [`Deal`]).
    deal: Deal,
    /// Since when the seed has been left idle for the owners' next pieces (see
    /// [`Picker::holding`]).
    held_since: Option<Instant>,
    /// Pieces to fetch again from one peer (they failed with several senders).
    suspect: Vec<bool>,
    /// Per piece: the peer that claimed it and when (see [`Picker::claim`]).
    /// (claimer, its first claim, its last).
    claimed: Vec<Option<(PeerKey, Instant, Instant)>>,
    /// Pieces we started from the appliance's seed, not yet claimed to our peers.
    new_claims: Vec<u32>,
    /// Pieces we claimed and when we last did (see [`Picker::reclaims`]).
    own_claims: Vec<(u32, Instant)>,
    /// The last plan for the appliance's seed left it idle because every piece it could send
    /// was claimed by others: [`Picker::holding`] (the connection is planned again on ticks).
    claim_blocked: bool,
    /// Claims count only from peers with at least this many pieces (half the median of the
    /// downloading peers'), set when the seed's connection is planned.
    claim_floor: u32,
}

/// A claim first made at `first` and last at `last` still counts at `now` (see [`CLAIM_TTL`],
/// [`CLAIM_MAX`]).
fn claim_live(first: Instant, last: Instant, now: Instant) -> bool {
    now.duration_since(last) < CLAIM_TTL && now.duration_since(first) < CLAIM_MAX
}

impl Picker {
    /// A picker for `total` bytes in pieces of `piece_len`, with `have` already verified.
    pub fn new(piece_len: u32, total: u64, have: &[bool]) -> Picker {
        let pieces: Vec<Ps> = have.iter().map(|h| if *h { Ps::Have } else { Ps::Missing }).collect();
        let have_count = have.iter().filter(|h| **h).count() as u32;
        Picker {
            piece_len,
            total,
            avail: vec![0; pieces.len()],
            missing: pieces.len() as u32 - have_count,
            have_count,
            pieces,
            active: BTreeSet::new(),
            missing_bits: Bits::new(have.len(), |i| !have[i]),
            lack_bits: Bits::new(have.len(), |i| !have[i]),
            peers: HashMap::new(),
            window: None,
            own_order: None,
            ring: Vec::new(),
            deal: Deal::default(),
            held_since: None,
            suspect: vec![false; have.len()],
            claimed: vec![None; have.len()],
            new_claims: Vec::new(),
            own_claims: Vec::new(),
            claim_blocked: false,
            claim_floor: 0,
        }
    }

    /// Number of pieces.
    pub fn len(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// True when the torrent has no pieces.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Length of piece `i`.
    pub fn piece_size(&self, i: u32) -> u32 {
        let start = i as u64 * self.piece_len as u64;
        (self.total - start).min(self.piece_len as u64) as u32
    }

    fn blocks_in(&self, i: u32) -> u32 {
        self.piece_size(i).div_ceil(BLOCK)
    }

    fn block(&self, piece: u32, b: u32) -> Block {
        let begin = b * BLOCK;
        Block { piece, begin, len: (self.piece_size(piece) - begin).min(BLOCK) }
    }

    /// Verified pieces.
    pub fn have_count(&self) -> u32 {
        self.have_count
    }

    /// Whether piece `i` is verified.
    pub fn has(&self, i: u32) -> bool {
        matches!(self.pieces.get(i as usize), Some(Ps::Have))
    }

    /// Whether a peer's request is for bytes we have verified, within one piece and at most
    /// [`MAX_REQUEST`] long.
    pub fn can_serve(&self, piece: u32, begin: u32, len: u32) -> bool {
        self.has(piece) && len > 0 && len <= MAX_REQUEST && begin as u64 + len as u64 <= self.piece_size(piece) as u64
    }

    /// Verified pieces as flags.
    pub fn have_flags(&self) -> Vec<bool> {
        self.pieces.iter().map(|p| matches!(p, Ps::Have)).collect()
    }

    /// Verified bytes.
    pub fn have_bytes(&self) -> u64 {
        (0..self.len()).filter(|i| self.has(*i)).map(|i| self.piece_size(i) as u64).sum()
    }

    /// Every piece verified.
    pub fn complete(&self) -> bool {
        self.have_count == self.len()
    }

    /// Makes pieces `from..from+n` the first choice (a sequential reader's next pieces).
    pub fn set_window(&mut self, from: u32, n: u32) {
        self.window = Some((from, n));
    }

    /// A new connection (choked until it unchokes us, no pieces until its bitfield).
    pub fn add_peer(&mut self, k: PeerKey) {
        let n = self.pieces.len();
        self.peers.insert(k, PeerView { has: Bits::new(n, |_| false), count: 0, choked: true, asked: Vec::new(), order: None, joined_complete: false, trusted: false, last_block: None, claims: Vec::new() });
    }

    /// Marks the peer as the appliance's seed (see the module's notes on suspect pieces).
    pub fn set_trusted(&mut self, k: PeerKey) {
        if let Some(p) = self.peers.get_mut(&k) {
            p.trusted = true;
        }
    }

    /// Makes piece `i` suspect: fetched again whole from one peer, a trusted one first. Cleared
    /// when it verifies.
    pub fn set_suspect(&mut self, i: u32) {
        if let Some(s) = self.suspect.get_mut(i as usize) {
            *s = true;
        }
    }

    /// Whether piece `i` is suspect.
    pub fn is_suspect(&self, i: u32) -> bool {
        self.suspect.get(i as usize).copied().unwrap_or(false)
    }

    /// Whether `k` may start piece `i`: any piece, but a suspect one only a trusted peer, or
    /// anyone when no unchoked trusted peer has it.
    fn may_start(&self, k: PeerKey, i: usize) -> bool {
        !self.suspect[i]
            || self.peers.get(&k).is_some_and(|p| p.trusted)
            || !self.peers.values().any(|p| p.trusted && !p.choked && p.has.get(i))
    }

    /// Places the peer in the order that shares out the seed's pieces (its IPv4 address).
    pub fn set_order(&mut self, k: PeerKey, order: u32) {
        if let Some(p) = self.peers.get_mut(&k) {
            p.order = Some(order);
        }
    }

    /// Our own place in that order. With it, a seed (a peer with every piece) is asked first
    /// for our share of the pieces: those whose index is our rank modulo the number of
    /// downloading peers we are connected to (without every piece when they joined, and
    /// us), in the order [`share_walk`] gives. Nodes starting together then fetch disjoint
    /// pieces from the seed instead of colliding on the same rare pieces (a piece in flight is
    /// invisible until its HAVE), so the seed's upload carries new data; once our share is
    /// done, the pieces of other shares their owners are not about to fetch.
    pub fn set_own_order(&mut self, order: u32) {
        self.own_order = Some(order);
    }

    /// The tracker's ring: every node of the swarm that joined downloading, by address. Empty
    /// while the swarm fits a node's connections (the tracker sends none): the connected peers
    /// are then everyone. Beyond that each node would share the pieces out over the peers it
    /// happens to be connected to, every node over a different set, and a helper would take
    /// the pieces of owners it cannot see as nobody's. With the ring every node counts the same
    /// owners, and the owners we are not connected to are busy with their shares like the
    /// others: a helper holds off their pieces too, for at most [`HOLD_RING`] instead of
    /// [`HOLD`] (a piece takes longer to reach us in a bigger swarm: its holder serves every
    /// peer that asks at once, about connections × piece / C, 9 s at N = 128 and 10 Mbit/s).
    /// Measured at N = 128 / 10 Mbit/s beside the build without it: 1.73–1.76 × T* against
    /// 1.89–1.92 (SCALE.md, stop 35). The collisions of owners on one piece were not what it
    /// saved: an owner skips a piece a peer already has, and those were rare before too.
    pub fn set_ring(&mut self, ring: &[u32]) {
        self.ring.clear();
        self.ring.extend_from_slice(ring);
        self.ring.sort_unstable();
        self.ring.dedup();
    }

    /// (our rank, downloading peers including us) when shares apply: the connected peers that
    /// did not join complete. Peers that finish stay in the count (the shares do not move under
    /// the nodes still fetching theirs). Not the peers a tracker named but we are not
    /// connected to (a banned or unreachable one would hold a share nobody fetches), except
    /// in a swarm bigger than our connections: then the tracker's ring, whose unreachable
    /// owners' pieces helpers fetch after [`HOLD_RING`].
    #[cfg(test)]
    fn share(&self) -> Option<(usize, usize)> {
        self.share_orders().map(|(rank, all)| (rank, all.len()))
    }

    /// [`Picker::share`], with the shares dealt again over the places it counts.
    fn refresh_share(&mut self) -> Option<(usize, usize)> {
        let (rank, all) = self.share_orders()?;
        self.deal.update(&all, self.pieces.len());
        Some((rank, all.len()))
    }

    /// Our rank and the places of every downloading peer counted in the shares, ours
    /// included, sorted (see [`Deal`]).
    fn share_orders(&self) -> Option<(usize, Vec<u32>)> {
        let me = self.own_order?;
        let mut all: Vec<u32> = self.peers.values().filter(|p| !p.joined_complete).filter_map(|p| p.order).collect();
        all.extend_from_slice(&self.ring);
        all.retain(|o| *o != me);
        all.sort_unstable();
        all.dedup();
        let rank = all.partition_point(|o| *o < me);
        all.insert(rank, me);
        (all.len() > 1).then_some((rank, all))
    }

    /// The pieces still only on the seed that a node done with its own share may fetch from
    /// it, best first. A share is fetched in index order, skipping what others already
    /// announced, so its owner is at work on the first piece of its share that is still only
    /// on the seed (and may start the next): those two stay with it, or owner and helper
    /// would both be sent the piece by the seed (measured at N = 32: 0.2 copies of the seed's
    /// upload, all in the last third of the run). The others go farthest from their owner's
    /// position first. A slow owner keeps nothing and its pieces come first (still farthest
    /// from its position first: it is fetching them too); owners we are not connected to
    /// (their position unknown, or gone) count as not started.
    ///
    /// Helpers, each sorting alike, would all pick the same farthest piece and the seed would
    /// send it to each (the HAVE comes only when the piece is done: measured at N = 8, most of
    /// the seed's late second copies were two helpers on one piece). So each share's walk is
    /// dealt out from its far end to the helpers by their distance from its owner in the ring
    /// of shares: piece `q` of a walk of `len` is ours when `(len - 1 - q) % (m - 1)` is our
    /// distance less one. Our pieces sort `m - 1` places ahead of their own place (so ahead of
    /// the farthest piece of their share). Returns the list, the first of ours in it, and
    /// whether `hold` kept any piece back.
    /// `claims_at`: asking the appliance's seed at that time: pieces other nodes claimed are
    /// left out (and count as held back: the seed's connection is planned again on ticks).
    /// `me`: our rank in the deal [`Picker::refresh_share`] just made (its places are read
    /// from it, not counted again: at N = 1000 that is a sort of ~1000 places per plan).
    fn helper_pieces(&self, k: PeerKey, me: usize, hold: bool, claims_at: Option<Instant>) -> (Vec<u32>, Option<u32>, bool) {
        let all = &self.deal.all;
        let m = all.len();
        if m < 2 || me >= m {
            return (Vec::new(), None, false);
        }
        let peer_has = |i: usize| self.peers.get(&k).is_some_and(|p| p.has.get(i));
        let mut by_order: HashMap<u32, &PeerView> = HashMap::with_capacity(self.peers.len());
        for p in self.peers.values().filter(|p| !p.joined_complete) {
            if let Some(o) = p.order {
                by_order.entry(o).or_insert(p);
            }
        }
        let owners: Vec<Option<&PeerView>> = all.iter().enumerate().map(|(r, o)| if r == me { None } else { by_order.get(o).copied() }).collect();
        // A slow owner (fewer than half the pieces of the median owner: a slower link) keeps
        // nothing: the others would wait on it for the pieces it is fetching. Owners are
        // compared with each other, not with us: a peer does not announce the pieces we had
        // before it got them (HAVEs to peers that have the piece are not sent), so the counts
        // seen here fall short alike for every owner, and by more the further ahead we are
        // (measured at N = 8: a helper ahead of the others took every owner for slow and
        // fetched their pieces in index order, beside them: 0.16 copies of the seed's upload).
        let floor = slow_floor(owners.iter().flatten().map(|p| p.count).collect());
        let mut cand: Vec<((u8, usize), bool, u32)> = Vec::new();
        let mut held = false;
        for (o, owner) in owners.iter().enumerate() {
            if o == me {
                continue;
            }
            // An owner we are not connected to is only known from the tracker's ring: busy
            // with its share, as far as we can tell.
            let ringed = owner.is_none() && !self.ring.is_empty();
            let keep = owner.is_some_and(|v| v.count >= floor);
            let class = match owner {
                Some(_) if keep => 0,
                Some(_) => 1,
                None => 2,
            };
            let ours = (o + m - me) % m - 1;
            // Its pieces still only on the seed, in the order the owner fetches them.
            let walk = self.deal.walk(o);
            let len = walk.len();
            let mut place = 0;
            for (q, i) in walk.iter().map(|i| *i as usize).enumerate() {
                let s = &self.pieces[i];
                if self.avail[i] > 1 || matches!(s, Ps::Have) || owner.is_some_and(|v| v.has.get(i)) {
                    continue;
                }
                // In flight from the seed to another node: not ours, and not the owner's next.
                if matches!(s, Ps::Missing) && claims_at.is_some_and(|t| self.claimed_at(i, t)) {
                    held = true;
                    continue;
                }
                place += 1;
                if matches!(s, Ps::Missing) && peer_has(i) && self.may_start(k, i) {
                    // Its next two pieces are the owner's (all of them when we cannot see where
                    // it is).
                    if !hold || (!ringed && (!keep || place > 2)) {
                        let mine = (len - 1 - q) % (m - 1) == ours;
                        // Unknown owners' pieces have no place: only ours go first.
                        let at = match (class, mine) {
                            (2, _) => usize::from(mine),
                            (_, true) => place + m - 1,
                            (_, false) => place,
                        };
                        cand.push(((class, at), mine, i as u32));
                    } else {
                        held = true;
                    }
                }
            }
        }
        cand.sort_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
        let first = cand.iter().find(|c| c.1).map(|c| c.2);
        (cand.into_iter().map(|(_, _, i)| i).collect(), first, held)
    }

    /// A connection ended: its pieces leave the availability counts and its asked blocks are
    /// free again. Returns true when blocks were freed (other peers may have work now).
    pub fn remove_peer(&mut self, k: PeerKey) -> bool {
        let Some(p) = self.peers.remove(&k) else { return false };
        for i in p.has.both_from(&p.has, 0) {
            self.avail[i] = self.avail[i].saturating_sub(1);
        }
        let freed = !p.asked.is_empty();
        for (b, _) in p.asked {
            self.unask(k, b);
        }
        for i in p.claims {
            self.unclaim(k, i);
        }
        self.orphan(k);
        freed
    }

    /// Peer `k` asked the appliance's seed for piece `i` (its `si_claim` message: a piece in
    /// flight from the seed is otherwise invisible until its HAVE, and a second node asking
    /// the seed for it meanwhile costs the seed's upload a second copy). Until `k`'s HAVE for
    /// it, its leaving, or [`CLAIM_TTL`], we do not ask the seed for that piece (we fetch it
    /// from `k` once it has it); an earlier live claim by another peer stands. A peer's claims
    /// beyond [`CLAIMS_PER_PEER`] replace its oldest. Returns false for an index out of range.
    pub fn claim(&mut self, k: PeerKey, i: u32, now: Instant) -> bool {
        let n = self.pieces.len();
        let Some(p) = self.peers.get_mut(&k) else { return true };
        if i as usize >= n {
            return false;
        }
        if p.has.get(i as usize) {
            return true;
        }
        if p.claims.contains(&i) {
            // Claimed again (still coming from the seed): it lasts another CLAIM_TTL.
            if let Some((o, _, t)) = &mut self.claimed[i as usize] {
                if *o == k {
                    *t = now;
                }
            }
            return true;
        }
        if self.claimed[i as usize].is_some_and(|(o, first, last)| o != k && claim_live(first, last, now)) {
            return true;
        }
        p.claims.push(i);
        let old = (p.claims.len() > CLAIMS_PER_PEER).then(|| p.claims.remove(0));
        if let Some(o) = old {
            self.unclaim(k, o);
        }
        self.claimed[i as usize] = Some((k, now, now));
        true
    }

    fn unclaim(&mut self, k: PeerKey, i: u32) {
        if let Some(c) = self.claimed.get_mut(i as usize) {
            if c.is_some_and(|(o, _, _)| o == k) {
                *c = None;
            }
        }
    }

    /// Whether another peer's claim keeps us from asking the seed for piece `i` at `now`: a
    /// live claim by a peer that is not slow (at least `claim_floor` pieces). A slow node's
    /// piece takes long to arrive: in the model, honouring the claims of the 20 % of nodes on
    /// C/4 links held the fast nodes at 1.31 × T* against 1.10 without claims.
    fn claimed_at(&self, i: usize, now: Instant) -> bool {
        self.claimed[i].is_some_and(|(k, first, last)| {
            claim_live(first, last, now) && self.peers.get(&k).is_some_and(|p| p.count >= self.claim_floor)
        })
    }

    /// The pieces we started from the appliance's seed since the last call: the engine
    /// claims them to every peer that speaks `si_claim`.
    pub fn take_claims(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.new_claims)
    }

    /// The pieces we are fetching from the appliance's seed now (started from it, not yet
    /// verified): claimed to a peer whose extension handshake comes after we started them.
    pub fn seed_pieces_in_flight(&self) -> Vec<u32> {
        self.active.iter().copied().filter(|i| self.from_seed(*i)).collect()
    }

    /// Whether piece `i` is in progress from the appliance's seed.
    fn from_seed(&self, i: u32) -> bool {
        matches!(&self.pieces[i as usize], Ps::Active(a) if a.owner.is_some_and(|k| self.peers.get(&k).is_some_and(|p| p.trusted)))
    }

    /// Our claims to renew at `now`: pieces still coming from the seed that we last claimed
    /// [`CLAIM_REFRESH`] ago or more (a piece from the seed can take longer than
    /// [`CLAIM_TTL`]; without it, others asked the seed for it too). Claims of pieces no longer
    /// coming from the seed (verified, or their request went elsewhere) are dropped.
    pub fn reclaims(&mut self, now: Instant) -> Vec<u32> {
        let mut own = std::mem::take(&mut self.own_claims);
        own.retain(|(i, _)| self.from_seed(*i));
        let again = own
            .iter_mut()
            .filter(|(_, t)| now.duration_since(*t) >= CLAIM_REFRESH)
            .map(|(i, t)| {
                *t = now;
                *i
            })
            .collect();
        self.own_claims = own;
        again
    }

    /// Pieces `k` started may be continued by anyone now; a suspect piece it was fetching
    /// starts over (one sender per copy).
    fn orphan(&mut self, k: PeerKey) {
        let mut restart = Vec::new();
        for &i in &self.active {
            if let Ps::Active(a) = &mut self.pieces[i as usize] {
                if a.owner == Some(k) {
                    a.owner = None;
                    if a.single {
                        restart.push(i as usize);
                    }
                }
            }
        }
        for i in restart {
            self.pieces[i] = Ps::Missing;
            self.missing_bits.set(i, true);
            self.active.remove(&(i as u32));
            self.missing += 1;
            for p in self.peers.values_mut() {
                p.asked.retain(|(b, _)| b.piece as usize != i);
            }
        }
    }

    fn unask(&mut self, k: PeerKey, b: Block) {
        if let Some(Ps::Active(a)) = self.pieces.get_mut(b.piece as usize) {
            let slot = &mut a.blocks[(b.begin / BLOCK) as usize];
            if let Bs::Asked(v) = slot {
                v.retain(|x| *x != k);
                if v.is_empty() {
                    *slot = Bs::Free;
                }
            }
        }
    }

    /// The peer's bitfield. Returns whether we are interested in it.
    pub fn bitfield(&mut self, k: PeerKey, bits: Vec<bool>) -> bool {
        let Some(p) = self.peers.get_mut(&k) else { return false };
        for (i, new) in bits.iter().enumerate().take(self.pieces.len()) {
            match (p.has.get(i), *new) {
                (false, true) => self.avail[i] += 1,
                (true, false) => self.avail[i] = self.avail[i].saturating_sub(1),
                _ => {}
            }
        }
        let count = bits.iter().filter(|b| **b).count() as u32;
        if p.count == 0 && count == bits.len() as u32 {
            p.joined_complete = true;
        }
        p.count = count;
        p.has = Bits::new(bits.len().min(self.pieces.len()), |i| bits[i]);
        self.interested(k)
    }

    /// The peer announced piece `i`. Returns whether we are interested in it now; false for an
    /// index out of range (the caller drops such a peer).
    pub fn have(&mut self, k: PeerKey, i: u32) -> Option<bool> {
        let p = self.peers.get_mut(&k)?;
        if i as usize >= self.pieces.len() {
            return None;
        }
        if !p.has.get(i as usize) {
            p.has.set(i as usize, true);
            p.count += 1;
            self.avail[i as usize] += 1;
            if let Some(at) = p.claims.iter().position(|c| *c == i) {
                p.claims.remove(at);
                self.unclaim(k, i);
            }
        }
        Some(self.interested(k))
    }

    /// Whether the peer has a piece we lack.
    pub fn interested(&self, k: PeerKey) -> bool {
        let Some(p) = self.peers.get(&k) else { return false };
        if self.complete() {
            return false;
        }
        p.has.meets(&self.lack_bits)
    }

    /// Whether the peer has a piece we have not started (the simulator's diagnostics).
    pub fn startable(&self, k: PeerKey) -> bool {
        self.peers.get(&k).is_some_and(|p| p.has.meets(&self.missing_bits))
    }

    /// Whether the peer has every piece.
    pub fn is_seed(&self, k: PeerKey) -> bool {
        self.peers.get(&k).is_some_and(|p| p.count == self.len())
    }

    /// The peer choked (its asked blocks are dropped by it, so they are freed) or unchoked us.
    /// Returns true when blocks were freed.
    pub fn choked(&mut self, k: PeerKey, choked: bool) -> bool {
        let Some(p) = self.peers.get_mut(&k) else { return false };
        p.choked = choked;
        if !choked {
            return false;
        }
        let asked = std::mem::take(&mut p.asked);
        let freed = !asked.is_empty();
        for (b, _) in asked {
            self.unask(k, b);
        }
        self.orphan(k);
        freed
    }

    /// Blocks asked of `k` and not answered.
    pub fn asked(&self, k: PeerKey) -> usize {
        self.peers.get(&k).map_or(0, |p| p.asked.len())
    }

    /// Plans requests for `k` until it has `depth` outstanding; returns the new ones.
    pub fn next_requests(&mut self, k: PeerKey, depth: usize, now: Instant, rng: &mut impl Rng) -> Vec<Block> {
        let mut out = Vec::new();
        let Some(p) = self.peers.get(&k) else { return out };
        if p.choked || self.complete() {
            return out;
        }
        let mut room = depth.saturating_sub(p.asked.len());
        if p.trusted {
            self.claim_blocked = false;
            self.claim_floor = slow_floor(self.peers.values().filter(|p| !p.joined_complete).map(|p| p.count).collect());
        }
        if room == 0 {
            return out;
        }
        // The peer's pieces (as bits: 650 bytes for 5150 pieces), copied once per call, not once
        // per block (the simulator at N = 128 with 1024 pieces: 68 -> 49 s of wall time), and
        // only when there is room (most HAVEs come from a peer with its requests in flight).
        let Some(bits) = self.peers.get(&k).map(|p| p.has.clone()) else { return out };
        while room > 0 {
            let Some(b) = self.pick(k, &bits, now, rng) else { break };
            if let Some(Ps::Active(a)) = self.pieces.get_mut(b.piece as usize) {
                let slot = &mut a.blocks[(b.begin / BLOCK) as usize];
                match slot {
                    Bs::Asked(v) => v.push(k),
                    _ => *slot = Bs::Asked(vec![k]),
                }
            }
            if let Some(p) = self.peers.get_mut(&k) {
                p.asked.push((b, now));
            }
            out.push(b);
            room -= 1;
        }
        #[cfg(test)]
        self.check_active();
        out
    }

    /// Piece `i`, missing, is ours (a test's shortcut past fetching and verifying it).
    #[cfg(test)]
    fn mark_have(&mut self, i: usize) {
        assert!(matches!(self.pieces[i], Ps::Missing));
        self.pieces[i] = Ps::Have;
        self.have_count += 1;
        self.missing -= 1;
        self.missing_bits.set(i, false);
        self.lack_bits.set(i, false);
    }

    /// Every piece in progress is in the `active` index (checked in every test that asks).
    #[cfg(test)]
    fn check_active(&self) {
        for (i, s) in self.pieces.iter().enumerate() {
            assert_eq!(matches!(s, Ps::Active(_)), self.active.contains(&(i as u32)), "piece {i}: {s:?}");
            assert_eq!(matches!(s, Ps::Missing), self.missing_bits.get(i), "piece {i}: {s:?}");
            assert_eq!(!matches!(s, Ps::Have), self.lack_bits.get(i), "piece {i}: {s:?}");
        }
    }

    /// Whether peer `k` announced piece `i`.
    pub fn peer_has_piece(&self, k: PeerKey, i: u32) -> bool {
        self.peers.get(&k).is_some_and(|p| p.has.get(i as usize))
    }

    /// Whether a node done with its share is leaving the seed idle for the owners' next
    /// pieces: the seed's connection is then planned again on every tick, so that after
    /// [`HOLD`] it fetches them itself (no event from the idle seed would wake it).
    pub fn holding(&self) -> bool {
        self.held_since.is_some() || self.claim_blocked
    }

    fn pick(&mut self, k: PeerKey, bits: &Bits, now: Instant, rng: &mut impl Rng) -> Option<Block> {
        let n = self.pieces.len();
        // The peer's pieces, looked up once, not once per piece scanned (by perf at N = 32 and
        // 512 pieces, those lookups' SipHash was 5 % of the nodes' user time).
        let peer_has = |i: usize| bits.get(i);
        // 1. A free block of a piece in progress that this peer started, or whose starter is
        //    gone, the most advanced piece first. Not a piece another peer is sending: asking
        //    the seed for the rest of a piece a node is passing on would spend the seed's
        //    upload on data the swarm already has.
        //    In the endgame (nothing left to start), an untrusted peer may also take the free
        //    blocks of a piece another peer started: otherwise they wait for that one peer,
        //    and a stalled connection to it holds the last piece until its requests time out.
        let endgame = self.missing == 0 && !self.peers.get(&k).is_some_and(|p| p.trusted);
        let mut best: Option<(u32, u32)> = None;
        for &i in &self.active {
            if let Ps::Active(a) = &self.pieces[i as usize] {
                let mine = a.owner.is_none_or(|o| o == k) || (endgame && !a.single);
                if mine && peer_has(i as usize) && a.blocks.iter().any(|b| matches!(b, Bs::Free)) && best.is_none_or(|(_, g)| a.got > g) {
                    best = Some((i, a.got));
                }
            }
        }
        if let Some((i, _)) = best {
            if let Ps::Active(a) = &self.pieces[i as usize] {
                let b = a.blocks.iter().position(|b| matches!(b, Bs::Free)).unwrap_or(0) as u32;
                return Some(self.block(i, b));
            }
        }
        // Suspect pieces, from a trusted peer: before anything new.
        let mut chosen = None;
        if self.peers.get(&k).is_some_and(|p| p.trusted) {
            chosen = (0..n).find(|i| self.suspect[*i] && matches!(self.pieces[*i], Ps::Missing) && peer_has(*i)).map(|i| i as u32);
        }
        // 2. The streaming window.
        if let (None, Some((from, w))) = (chosen, self.window) {
            chosen = (from..from.saturating_add(w).min(n as u32)).find(|i| {
                matches!(self.pieces[*i as usize], Ps::Missing) && peer_has(*i as usize) && self.may_start(k, *i as usize)
            });
        }
        // 3. Rarest first, from a random starting point; from a seed, our share first. Not,
        //    from the appliance's seed, a piece another node claimed (it is asking the seed for
        //    it: we get it from that node).
        let share = if self.is_seed(k) { self.refresh_share() } else { None };
        let claims = self.peers.get(&k).is_some_and(|p| p.trusted);
        let mut skipped = false;
        for only_share in [true, false] {
            if chosen.is_some() || self.missing == 0 || n == 0 || (only_share && share.is_none()) {
                continue;
            }
            // After our share, from a seed: the pieces still only on the seed (their node is
            // slow or starved), first those dealt to us, so helpers spread out instead of all
            // fetching the same last pieces.
            if !only_share {
                if let Some((r, m)) = share {
                    // For at most HOLD. (Every node counts the same owners: the connected
                    // peers are everyone, or the tracker's ring says who.)
                    let hold_for = if self.ring.is_empty() { HOLD } else { HOLD_RING };
                    let waited = self.held_since.is_some_and(|t| now.duration_since(t) >= hold_for);
                    let (left, ours, held) = self.helper_pieces(k, r, !waited, claims.then_some(now));
                    if let Some(i) = ours {
                        chosen = Some(i);
                        self.held_since = None;
                        continue;
                    }
                    // None dealt to us: each helper at its own place in the list. When fewer
                    // pieces are left than helpers, only the first helper placed on each piece
                    // takes it: a piece fetched by every helper at once would share the seed's
                    // upload many ways, and the swarm passes it on anyway. Helpers whose lists
                    // differ (each sees other owners) might all leave a piece to another: after
                    // HOLD idle at the seed, we take ours anyway.
                    let len = left.len();
                    let pos = r * len / m;
                    if len > 0 && (waited || r == (pos * m).div_ceil(len)) {
                        chosen = Some(left[pos]);
                        self.held_since = None;
                        continue;
                    }
                    if len > 0 || held {
                        self.held_since.get_or_insert(now);
                        continue;
                    }
                    self.held_since = None;
                    // Every piece still only on the appliance's seed is in those lists: the rest
                    // are on peers we are connected to, and we get them from those, not from the
                    // seed, whose upload is the swarm's bottleneck (rarest first from the seed
                    // took them in a race with the peers' connections: in the simulator at
                    // N = 250 × 2.7 GB, 0.08 of the seed's 1.10 copies, all at the end while the
                    // last first copies were still going out; SCALE.md, stop 45).
                    if claims {
                        continue;
                    }
                }
            }
            // Our share in its order (see `Deal`): the first piece only the seed has.
            if only_share {
                if let Some((r, _)) = share {
                    chosen = self
                        .deal
                        .walk(r)
                        .iter()
                        .map(|i| *i as usize)
                        .find(|i| {
                            let open = matches!(self.pieces[*i], Ps::Missing) && self.avail[*i] <= 1 && peer_has(*i) && self.may_start(k, *i);
                            let taken = open && claims && self.claimed_at(*i, now);
                            skipped |= taken;
                            open && !taken
                        })
                        .map(|i| i as u32);
                }
                continue;
            }
            let start = rng.random_range(0..n);
            let mut best: Option<(usize, u16)> = None;
            // The missing pieces the peer has, from `start` round (as `(start + j) % n`).
            for i in self.missing_bits.both_from(bits, start) {
                if best.is_none_or(|(_, a)| self.avail[i] < a)
                    && self.may_start(k, i)
                    && !(claims && self.claimed_at(i, now) && {
                        skipped = true;
                        true
                    })
                {
                    best = Some((i, self.avail[i]));
                    if self.avail[i] <= 1 {
                        break;
                    }
                }
            }
            chosen = best.map(|(i, _)| i as u32);
        }
        if let Some(i) = chosen {
            let blocks = (0..self.blocks_in(i)).map(|_| Bs::Free).collect();
            let single = self.suspect[i as usize];
            self.pieces[i as usize] = Ps::Active(Active { blocks, got: 0, owner: Some(k), single });
            self.missing_bits.set(i as usize, false);
            self.active.insert(i);
            self.missing -= 1;
            if claims {
                self.new_claims.push(i);
                self.own_claims.push((i, now));
            }
            return Some(self.block(i, 0));
        }
        if skipped {
            self.claim_blocked = true;
        }
        // 4. Endgame: nothing missing, duplicate a block asked of someone else.
        if self.missing == 0 && !self.peers.get(&k).is_some_and(|p| p.trusted) {
            for &i in &self.active {
                let Ps::Active(a) = &self.pieces[i as usize] else { continue };
                if a.single || !peer_has(i as usize) {
                    continue;
                }
                let found = a.blocks.iter().position(|b| matches!(b, Bs::Asked(v) if v.len() < ENDGAME_DUPES && !v.contains(&k)));
                if let Some(b) = found {
                    return Some(self.block(i, b as u32));
                }
            }
        }
        None
    }

    /// A block (asked or not) arrived from `k` at `now`: it is serving its queue.
    pub fn heard(&mut self, k: PeerKey, now: Instant) {
        if let Some(p) = self.peers.get_mut(&k) {
            p.last_block = Some(now);
        }
    }

    /// A block arrived from `k`.
    pub fn got(&mut self, k: PeerKey, piece: u32, begin: u32, len: usize) -> Got {
        let expected = self.block_at(piece, begin).filter(|b| b.len as usize == len);
        let Some(b) = expected else { return Got::Unexpected };
        let Some(p) = self.peers.get_mut(&k) else { return Got::Unexpected };
        let Some(pos) = p.asked.iter().position(|(x, _)| *x == b) else { return Got::Unexpected };
        p.asked.swap_remove(pos);
        let Some(Ps::Active(a)) = self.pieces.get_mut(piece as usize) else { return Got::Unexpected };
        let slot = &mut a.blocks[(begin / BLOCK) as usize];
        if matches!(slot, Bs::Got(_)) {
            // Another peer's copy came first (endgame): keep the first, drop this one.
            return Got::Unexpected;
        }
        let others = match std::mem::replace(slot, Bs::Got(k)) {
            Bs::Asked(v) => v.into_iter().filter(|x| *x != k).collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        a.got += 1;
        let complete = a.got as usize == a.blocks.len();
        if complete {
            let from = a.blocks.iter().map(|b| if let Bs::Got(x) = b { *x } else { k }).collect();
            self.pieces[piece as usize] = Ps::Verifying(from);
            self.active.remove(&piece);
        }
        let mut cancel = Vec::new();
        for o in others {
            if let Some(op) = self.peers.get_mut(&o) {
                op.asked.retain(|(x, _)| *x != b);
                cancel.push((o, b));
            }
        }
        Got::Take { complete, cancel }
    }

    fn block_at(&self, piece: u32, begin: u32) -> Option<Block> {
        if piece >= self.len() || begin % BLOCK != 0 || begin >= self.piece_size(piece) {
            return None;
        }
        Some(self.block(piece, begin / BLOCK))
    }

    /// The hash check of a complete piece: on success it is ours (no longer suspect); on
    /// failure it is missing again. Returns the sender of each of its blocks, in order (on
    /// failure: to be judged, see `guard::failed_piece`).
    pub fn verified(&mut self, piece: u32, ok: bool) -> Vec<PeerKey> {
        let Some(slot) = self.pieces.get_mut(piece as usize) else { return Vec::new() };
        let from = match std::mem::replace(slot, if ok { Ps::Have } else { Ps::Missing }) {
            Ps::Verifying(from) => from,
            other => {
                *slot = other;
                return Vec::new();
            }
        };
        if ok {
            self.have_count += 1;
            self.suspect[piece as usize] = false;
            self.lack_bits.set(piece as usize, false);
            from
        } else {
            self.missing += 1;
            self.missing_bits.set(piece as usize, true);
            from
        }
    }

    /// Forgets every block `k` sent to pieces not yet complete (a distrusted peer's data is
    /// fetched again from others). Returns true when blocks were freed.
    pub fn drop_blocks_from(&mut self, k: PeerKey) -> bool {
        let mut freed = false;
        for &i in &self.active {
            if let Ps::Active(a) = &mut self.pieces[i as usize] {
                for b in &mut a.blocks {
                    if matches!(b, Bs::Got(x) if *x == k) {
                        *b = Bs::Free;
                        a.got -= 1;
                        freed = true;
                    }
                }
            }
        }
        freed
    }

    /// Requests older than `limit` to a peer that has sent no block for `limit` (silent), or
    /// older than [`STUCK_FACTOR`] × `limit` to any peer, are given up: they are freed for
    /// others. Returns the peers concerned (to re-plan, and to count against them).
    pub fn expire(&mut self, now: Instant, limit: Duration) -> Vec<(PeerKey, Vec<Block>)> {
        let mut out = Vec::new();
        for (k, p) in &mut self.peers {
            // A peer that keeps sending is serving its queue: a request waiting behind others
            // on its uplink is not lost, and asking it of someone else makes a duplicate (the
            // seed's upload, shared by every node, queues for tens of seconds on a slow link).
            // Only a peer silent for `limit` loses its requests, or a request unanswered for
            // STUCK_FACTOR × `limit` (a peer that skips one request).
            let quiet = p.last_block.is_none_or(|t| now.duration_since(t) > limit);
            let expired = |t: &Instant| {
                let age = now.duration_since(*t);
                age > limit && (quiet || age > limit * STUCK_FACTOR)
            };
            let old: Vec<Block> = p.asked.iter().filter(|(_, t)| expired(t)).map(|(b, _)| *b).collect();
            if !old.is_empty() {
                p.asked.retain(|(_, t)| !expired(t));
                out.push((*k, old));
            }
        }
        for (k, bs) in &out {
            for b in bs {
                self.unask(*k, *b);
            }
            self.orphan(*k);
        }
        out
    }

    /// Whether blocks from `k` sit in a piece not yet verified (its address is still needed to
    /// judge that piece).
    pub fn holds_blocks_from(&self, k: PeerKey) -> bool {
        self.pieces.iter().any(|s| match s {
            Ps::Active(a) => a.blocks.iter().any(|b| matches!(b, Bs::Got(x) if *x == k)),
            Ps::Verifying(from) => from.contains(&k),
            _ => false,
        })
    }

    /// Keys of the connected peers.
    pub fn peer_keys(&self) -> Vec<PeerKey> {
        self.peers.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// The shares of `n` pieces over `places` (ascending), per rank: each owner's walk.
    fn walks(places: &[u32], n: usize) -> Vec<Vec<usize>> {
        let d = Deal::new(places, n);
        (0..places.len()).map(|r| d.walk(r).iter().map(|i| *i as usize).collect()).collect()
    }
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const PL: u32 = 4 * BLOCK;

    fn all(n: usize) -> Vec<bool> {
        vec![true; n]
    }

    /// The helper list of the seed's connection (key 1), as `pick` makes it: the shares dealt
    /// first.
    fn helpers(p: &mut Picker) -> (Vec<u32>, Option<u32>, bool) {
        let me = p.refresh_share().expect("shares apply").0;
        p.helper_pieces(1, me, true, None)
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn bits_walk_the_common_indices_in_the_scans_order() {
        // Against the scan they replace: (start + j) % n for j in 0..n, both set.
        let mut r = rng();
        for n in [1, 2, 63, 64, 65, 127, 128, 129, 5150] {
            for _ in 0..20 {
                let (pa, pb) = (r.random_range(0.0..1.0), r.random_range(0.0..1.0));
                let a: Vec<bool> = (0..n).map(|_| r.random_bool(pa)).collect();
                let b: Vec<bool> = (0..n).map(|_| r.random_bool(pb)).collect();
                let (ba, bb) = (Bits::new(n, |i| a[i]), Bits::new(n, |i| b[i]));
                let start = r.random_range(0..n);
                let want: Vec<usize> = (0..n).map(|j| (start + j) % n).filter(|i| a[*i] && b[*i]).collect();
                assert_eq!(ba.both_from(&bb, start).collect::<Vec<_>>(), want, "n {n} start {start}");
                assert_eq!(ba.meets(&bb), !want.is_empty());
            }
        }
        assert_eq!(Bits::new(0, |_| true).both_from(&Bits::new(0, |_| true), 0).count(), 0);
    }

    #[test]
    fn sizes_and_last_piece() {
        let p = Picker::new(PL, 2 * PL as u64 + 100, &[false; 3]);
        assert_eq!(p.len(), 3);
        assert_eq!(p.piece_size(2), 100);
        assert_eq!(p.blocks_in(2), 1);
        assert_eq!(p.block(2, 0), Block { piece: 2, begin: 0, len: 100 });
    }

    #[test]
    fn a_peer_gets_whole_pieces_and_finishes_them_first() {
        let mut p = Picker::new(PL, 8 * PL as u64, &[false; 8]);
        let now = Instant::now();
        p.add_peer(1);
        assert!(p.bitfield(1, all(8)));
        assert!(p.next_requests(1, 4, now, &mut rng()).is_empty(), "choked");
        p.choked(1, false);
        let r = p.next_requests(1, 6, now, &mut rng());
        assert_eq!(r.len(), 6);
        // The first four are one piece, then a second piece starts.
        assert!(r[..4].iter().all(|b| b.piece == r[0].piece));
        assert_ne!(r[4].piece, r[0].piece);
        // A second peer starts its own piece: the unfinished one is peer 1's.
        p.add_peer(2);
        p.bitfield(2, all(8));
        p.choked(2, false);
        let r2 = p.next_requests(2, 1, now, &mut rng());
        assert!(r2[0].piece != r[4].piece && r2[0].piece != r[0].piece && r2[0].begin == 0, "{r2:?}");
        // Peer 1 continues its own piece first.
        let r1 = p.next_requests(1, 7, now, &mut rng());
        assert_eq!((r1[0].piece, r1[0].begin), (r[4].piece, 2 * BLOCK));
        // Once peer 1 leaves, peer 2 takes over its unfinished pieces before new ones.
        p.remove_peer(1);
        let started = [r[0].piece, r[4].piece, r2[0].piece];
        let more = p.next_requests(2, 4, now, &mut rng());
        assert_eq!(more.len(), 3);
        assert!(more.iter().all(|b| started.contains(&b.piece)), "{more:?}");
    }

    #[test]
    fn rarest_pieces_come_first() {
        let mut p = Picker::new(PL, 4 * PL as u64, &[false; 4]);
        for k in 1..=3 {
            p.add_peer(k);
            p.choked(k, false);
        }
        p.bitfield(1, all(4));
        p.bitfield(2, vec![true, true, false, true]);
        p.bitfield(3, vec![true, true, false, false]);
        // Availability: 3, 3, 1, 2. Peer 1 is asked for piece 2, then piece 3.
        let r = p.next_requests(1, 8, Instant::now(), &mut rng());
        let pieces: Vec<u32> = r.iter().map(|b| b.piece).collect();
        assert_eq!(pieces, vec![2, 2, 2, 2, 3, 3, 3, 3]);
    }

    #[test]
    fn flash_crowd_spreads_over_the_pieces() {
        // 16 nodes ask one seed for their first piece: random tie-breaks give mostly
        // different pieces.
        let mut firsts = std::collections::HashSet::new();
        let mut r = rng();
        for _ in 0..16 {
            let mut p = Picker::new(PL, 1024 * PL as u64, &vec![false; 1024]);
            p.add_peer(1);
            p.bitfield(1, all(1024));
            p.choked(1, false);
            firsts.insert(p.next_requests(1, 1, Instant::now(), &mut r)[0].piece);
        }
        assert!(firsts.len() >= 14, "{firsts:?}");
    }

    /// A picker for `n` pieces at our place 20, with these (key, place, pieces) peers unchoking us.
    fn at_20_with(n: usize, peers: Vec<(PeerKey, u32, Vec<bool>)>) -> Picker {
        let mut p = Picker::new(PL, n as u64 * PL as u64, &vec![false; n]);
        p.set_own_order(20);
        for (k, order, bits) in peers {
            p.add_peer(k);
            p.set_order(k, order);
            p.bitfield(k, bits);
            p.choked(k, false);
        }
        p
    }

    #[test]
    fn from_a_seed_each_node_takes_its_share_first() {
        let n = 12;
        // The seed (every piece), and two downloading peers ordered before and after us.
        let mut p = at_20_with(n, vec![(1, 1, all(n)), (2, 10, vec![false; n]), (3, 30, vec![false; n])]);
        // Rank 1 of 3: our share first, in its walk's order, then the others.
        let ours = walks(&[10, 20, 30], n).swap_remove(1);
        assert_eq!(ours.len(), 4);
        let r = p.next_requests(1, 4 * 6, Instant::now(), &mut rng());
        let first: Vec<usize> = r[..16].iter().step_by(4).map(|b| b.piece as usize).collect();
        assert_eq!(first, ours);
        assert!(r[16..].iter().all(|b| !ours.contains(&(b.piece as usize))));
    }

    /// A swarm bigger than a node's connections: with the tracker's ring, a node connected to
    /// one other peer counts every node's share (so nodes connected to different peers agree on
    /// who owns what), and done with its share it holds off the pieces of owners it cannot see,
    /// for at most `HOLD_RING`.
    #[test]
    fn with_the_trackers_ring_a_node_counts_every_share_and_holds_off_unseen_owners() {
        let n = 40;
        let ring = [40, 5, 10, 15, 20, 25, 30, 35];
        // Us at place 20, the seed (every piece) and, with `peer2`, a downloading peer at 10.
        let node = |have: &[bool], peer2: bool| {
            let mut p = Picker::new(PL, n as u64 * PL as u64, have);
            p.set_own_order(20);
            let peers = [(1, 1, all(n)), (2, 10, vec![false; n])];
            for (k, order, bits) in peers.into_iter().take(if peer2 { 2 } else { 1 }) {
                p.add_peer(k);
                p.set_order(k, order);
                p.bitfield(k, bits);
                p.choked(k, false);
            }
            p
        };
        let now = Instant::now();
        let mut p = node(&vec![false; n], true);
        // Without the ring: rank 1 of 2 (the odd pieces).
        assert_eq!(p.share(), Some((1, 2)));
        p.set_ring(&ring);
        assert_eq!(p.share(), Some((3, 8)));
        let ours = walks(&[5, 10, 15, 20, 25, 30, 35, 40], n).swap_remove(3);
        let r = p.next_requests(1, 4 * ours.len(), now, &mut rng());
        let mut first: Vec<usize> = r.iter().map(|b| b.piece as usize).collect();
        first.dedup();
        assert_eq!(first, ours, "our share of the ring's 8");
        // The ring gone (the swarm shrank below a peer list): back to the connected peers.
        p.set_ring(&[]);
        assert_eq!(p.share(), Some((1, 2)));
        // Our share done, connected to the seed only: every other owner is unseen, busy with
        // its share as far as we know: nothing is asked of the seed until HOLD_RING has passed.
        let mut have = vec![false; n];
        for i in ours {
            have[i] = true;
        }
        let mut p = node(&have, false);
        p.set_ring(&ring);
        assert!(p.next_requests(1, 4, now, &mut rng()).is_empty(), "the owners' pieces are held");
        assert!(p.next_requests(1, 4, now + HOLD + Duration::from_secs(1), &mut rng()).is_empty(), "held for HOLD_RING, not HOLD");
        let later = p.next_requests(1, 4, now + HOLD_RING + Duration::from_secs(1), &mut rng());
        assert_eq!(later.len(), 4, "after HOLD_RING the seed is asked: {later:?}");
    }

    #[test]
    fn done_with_its_share_a_node_leaves_each_owner_its_next_two_pieces() {
        let n = 24;
        let mut p = Picker::new(PL, n as u64 * PL as u64, &vec![false; n]);
        p.set_own_order(20);
        let [w2, ours, w3]: [Vec<usize>; 3] = walks(&[10, 20, 30], n).try_into().unwrap();
        assert_eq!((w2.len(), ours.len(), w3.len()), (8, 8, 8));
        // Our share (rank 1 of 3) is done: we hold it.
        for i in &ours {
            p.mark_have(*i);
        }
        // Owner 2 (rank 0, place 10) announced the first two pieces of its share's walk;
        // owner 3 (rank 2, place 30) none of its own. Both have half as many as we do (four
        // each): not slow.
        let mut two = vec![false; n];
        two[w2[0]] = true;
        two[w2[1]] = true;
        two[ours[0]] = true;
        two[ours[1]] = true;
        let mut three = vec![false; n];
        for i in &ours[..4] {
            three[*i] = true;
        }
        for (k, order, bits) in [(1, 1, all(n)), (2, 10, two), (3, 30, three)] {
            p.add_peer(k);
            p.set_order(k, order);
            p.bitfield(k, bits);
            p.choked(k, false);
        }
        // Each owner's next two pieces stay with it; the rest, farthest from its owner first.
        let h: Vec<usize> = helpers(&mut p).0.into_iter().map(|i| i as usize).collect();
        let mut want: Vec<usize> = w2[4..].iter().chain(&w3[2..]).copied().collect();
        let mut got = h.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "not {:?} nor {:?}", &w2[2..4], &w3[..2]);
        // Owner 3's last piece is the farthest; its next but one is dealt to the helper two
        // places from owner 3 in the ring (rank 0), so ours is the one after.
        assert_eq!(&h[..2], &[w3[7], w3[5]]);
        let asked: Vec<usize> = p.next_requests(1, 4, Instant::now(), &mut rng()).iter().map(|b| b.piece as usize).collect();
        assert!(asked.iter().all(|i| h.contains(i)), "{asked:?}");
        assert_eq!(asked[0], w3[7]);
        // Owner 3 with one piece against owner 2's four (a slow link): it keeps nothing, and
        // its pieces come first, the farthest from its position first (w3[7] is asked, w3[6]
        // dealt to the other helper).
        p.remove_peer(3);
        p.add_peer(3);
        p.set_order(3, 30);
        let mut slow = vec![false; n];
        slow[ours[0]] = true;
        p.bitfield(3, slow);
        let h = helpers(&mut p).0;
        assert!(w3.iter().filter(|i| matches!(p.pieces[**i], Ps::Missing)).all(|i| h.contains(&(*i as u32))), "{h:?}");
        assert_eq!(h[0] as usize, w3[5]);
    }

    #[test]
    fn a_helper_ahead_of_the_owners_still_leaves_them_their_next_pieces() {
        let n = 24;
        let mut p = Picker::new(PL, n as u64 * PL as u64, &vec![false; n]);
        p.set_own_order(20);
        let [w2, mut mine, w3]: [Vec<usize>; 3] = walks(&[10, 20, 30], n).try_into().unwrap();
        assert_eq!((w2.len(), mine.len(), w3.len()), (8, 8, 8));
        // Our share, and the first three pieces of each other share (each owner got those after
        // us, so it sent us no HAVE for them).
        mine.extend(&w2[..3]);
        mine.extend(&w3[..3]);
        for i in mine {
            p.mark_have(i);
        }
        let mut two = vec![false; n];
        two[w2[3]] = true;
        let mut three = vec![false; n];
        three[w3[3]] = true;
        for (k, order, bits) in [(1, 1, all(n)), (2, 10, two), (3, 30, three)] {
            p.add_peer(k);
            p.set_order(k, order);
            p.bitfield(k, bits);
            p.choked(k, false);
        }
        // One announced piece each against our fourteen: alike, so neither is slow; each
        // keeps its next two and the helper starts from the far end of each walk.
        let (h, _, held) = helpers(&mut p);
        let h: Vec<usize> = h.into_iter().map(|i| i as usize).collect();
        assert!(held);
        for i in [w2[4], w2[5], w3[4], w3[5]] {
            assert!(!h.contains(&i), "{i} is its owner's next: {h:?}");
        }
        // From the far end of each walk, the pieces dealt to us: owner 3's last, owner 2's
        // last but one (its last is dealt to rank 2, owner 3 itself).
        assert_eq!(&h[..2], &[w3[7], w2[6]], "{h:?}");
    }

    #[test]
    fn helpers_take_different_pieces_from_the_far_end_of_the_shares() {
        let n = 64;
        let orders = [10, 20, 30, 40];
        let walks = walks(&orders, n);
        // Ranks 1 and 3 are done with their shares; owners 0 and 2 have not started. Each
        // helper sees the same: the seed, both owners, the other helper with its share.
        let helper = |me: usize| {
            let other = 4 - me;
            let mut p = Picker::new(PL, n as u64 * PL as u64, &vec![false; n]);
            p.set_own_order(orders[me]);
            for i in &walks[me] {
                p.mark_have(*i);
            }
            let theirs: Vec<bool> = (0..n).map(|i| walks[other].contains(&i)).collect();
            let none = vec![false; n];
            for (k, order, bits) in [(1, 1, all(n)), (2, orders[0], none.clone()), (3, orders[2], none), (4, orders[other], theirs)] {
                p.add_peer(k);
                p.set_order(k, order);
                p.bitfield(k, bits);
                p.choked(k, false);
            }
            let r = p.next_requests(1, 4 * 4, Instant::now(), &mut rng());
            let mut got: Vec<usize> = r.iter().map(|b| b.piece as usize).collect();
            got.dedup();
            got
        };
        let (a, b) = (helper(1), helper(3));
        assert_eq!((a.len(), b.len()), (4, 4), "{a:?} {b:?}");
        assert!(a.iter().all(|i| !b.contains(i)), "both helpers fetch {a:?} ∩ {b:?}");
        // Each from the far ends: the last half of each walk.
        for i in a.iter().chain(&b) {
            let w = walks.iter().find(|w| w.contains(i)).unwrap();
            let q = w.iter().position(|x| x == i).unwrap();
            assert!(q >= w.len() / 2, "piece {i} is {q} of its walk of {}", w.len());
        }
    }

    #[test]
    fn an_owner_that_leaves_its_next_pieces_alone_loses_them_after_the_hold() {
        let n = 6;
        let mut p = Picker::new(PL, n as u64 * PL as u64, &vec![false; n]);
        p.set_own_order(20);
        let [w2, ours, w3]: [Vec<usize>; 3] = walks(&[10, 20, 30], n).try_into().unwrap();
        assert_eq!((w2.len(), ours.len(), w3.len()), (2, 2, 2));
        for i in &ours {
            p.mark_have(*i);
        }
        // The owners have what we have (ours): they are not slow.
        let ours_bits: Vec<bool> = (0..n).map(|i| ours.contains(&i)).collect();
        for (k, order, bits) in [(1, 1, all(n)), (2, 10, ours_bits.clone()), (3, 30, ours_bits)] {
            p.add_peer(k);
            p.set_order(k, order);
            p.bitfield(k, bits);
            p.choked(k, false);
        }
        // Every piece still only on the seed is one of its owner's next two: the seed waits.
        let t0 = Instant::now();
        assert!(p.next_requests(1, 4, t0, &mut rng()).is_empty());
        assert!(p.holding());
        assert!(p.next_requests(1, 4, t0 + HOLD / 2, &mut rng()).is_empty());
        // The owners did not fetch them: after HOLD we do.
        let r = p.next_requests(1, 4, t0 + HOLD, &mut rng());
        assert_eq!(r.len(), 4, "{r:?}");
        assert!(w2.contains(&(r[0].piece as usize)) || w3.contains(&(r[0].piece as usize)), "{r:?}");
    }

    /// A piece another node claimed (it is asking the appliance's seed for it) is not asked of
    /// the seed, in our share or as a helper: we get it from the claimer after its HAVE. A
    /// claim lapses with that HAVE, its claimer's leaving, or `CLAIM_TTL`; a peer holds at most
    /// `CLAIMS_PER_PEER`; only the appliance's (trusted) seed is spared this way.
    #[test]
    fn pieces_other_nodes_claimed_are_not_asked_of_the_seed() {
        let n = 12;
        let mut p = at_20_with(n, vec![(1, 1, all(n)), (2, 10, vec![false; n]), (3, 30, vec![false; n])]);
        p.set_trusted(1);
        let t0 = Instant::now();
        // Our share (rank 1 of 3) is four pieces: the others claim the last three.
        let ours: Vec<u32> = walks(&[10, 20, 30], n)[1].iter().map(|i| *i as u32).collect();
        assert_eq!(ours.len(), 4);
        for (k, i) in [(3, ours[1]), (3, ours[2]), (2, ours[3])] {
            assert!(p.claim(k, i, t0));
        }
        assert!(!p.claim(2, n as u32, t0), "out of range");
        let r = p.next_requests(1, 4, t0, &mut rng());
        assert!(r.iter().all(|b| b.piece == ours[0]), "{r:?}");
        assert_eq!(p.take_claims(), vec![ours[0]], "what we start from the seed, we claim");
        assert!(p.take_claims().is_empty());
        let r = p.next_requests(1, 4 * n, t0, &mut rng());
        assert!(r.iter().all(|b| !ours[1..].contains(&b.piece)), "{r:?}");
        // The claimer's HAVE: from it, not the seed.
        p.have(3, ours[1]);
        assert!(!p.claimed_at(ours[1] as usize, t0));
        let r = p.next_requests(3, 4, t0, &mut rng());
        assert!(!r.is_empty() && r.iter().all(|b| b.piece == ours[1]), "{r:?}");
        // Lapsed claims; the claimer leaving.
        let (c2, c3) = (ours[2] as usize, ours[3] as usize);
        assert!(p.claimed_at(c2, t0 + CLAIM_TTL / 2) && !p.claimed_at(c2, t0 + CLAIM_TTL));
        p.remove_peer(2);
        assert!(!p.claimed_at(c3, t0));
        // An untrusted seed (a node done with every piece) is not spared: no claims either.
        let mut q = at_20_with(n, vec![(1, 1, all(n)), (2, 10, vec![false; n]), (3, 30, vec![false; n])]);
        q.claim(3, ours[1], t0);
        let r = q.next_requests(1, 4 * n, t0, &mut rng());
        assert!(r.iter().any(|b| b.piece == ours[1]), "{r:?}");
        assert!(q.take_claims().is_empty());
        // At most CLAIMS_PER_PEER per peer: the oldest goes.
        let nine: Vec<u32> = (0..10).filter(|i| *i != ours[1]).collect();
        assert_eq!(nine.len(), CLAIMS_PER_PEER + 1);
        for i in &nine {
            q.claim(2, *i, t0);
        }
        let [first, second, last] = [nine[0], nine[1], nine[8]].map(|i| i as usize);
        assert!(!q.claimed_at(first, t0) && q.claimed_at(second, t0) && q.claimed_at(last, t0));
    }

    /// A piece from the seed can take longer than `CLAIM_TTL` to arrive: its claimer claims it
    /// again every `CLAIM_REFRESH` while it is still coming, and each claim again lasts
    /// another `CLAIM_TTL` at the peers; a piece no longer coming from the seed is not claimed.
    #[test]
    fn claims_of_pieces_still_coming_from_the_seed_are_renewed() {
        let n = 12;
        let mut p = at_20_with(n, vec![(1, 1, all(n)), (2, 10, vec![false; n]), (3, 30, vec![false; n])]);
        p.set_trusted(1);
        let t0 = Instant::now();
        let r = p.next_requests(1, 4, t0, &mut rng());
        let i = r[0].piece;
        assert!(r.iter().all(|b| b.piece == i), "{r:?}");
        assert_eq!(p.take_claims(), vec![i]);
        assert!(p.reclaims(t0 + CLAIM_REFRESH / 2).is_empty());
        assert_eq!(p.reclaims(t0 + CLAIM_REFRESH), vec![i]);
        assert!(p.reclaims(t0 + CLAIM_REFRESH + CLAIM_REFRESH / 2).is_empty());
        assert_eq!(p.seed_pieces_in_flight(), vec![i]);
        // The seed went away: piece 1 is no longer coming from it.
        p.remove_peer(1);
        assert!(p.reclaims(t0 + 3 * CLAIM_REFRESH).is_empty() && p.seed_pieces_in_flight().is_empty());
        // At a peer: a claim made again lasts CLAIM_TTL from then; another peer's does not
        // renew it.
        let j = (i + 1) % n as u32;
        p.claim(3, j, t0);
        p.claim(3, j, t0 + CLAIM_REFRESH);
        p.claim(2, j, t0 + 2 * CLAIM_REFRESH);
        assert!(p.claimed_at(j as usize, t0 + CLAIM_TTL));
        assert!(!p.claimed_at(j as usize, t0 + CLAIM_REFRESH + CLAIM_TTL));
        // Renewed on and on without the piece ever coming: it counts CLAIM_MAX at most.
        let mut t = t0 + CLAIM_REFRESH;
        while t < t0 + CLAIM_MAX + CLAIM_TTL {
            p.claim(3, j, t);
            assert_eq!(p.claimed_at(j as usize, t), t < t0 + CLAIM_MAX, "{:?}", t - t0);
            t += CLAIM_REFRESH;
        }
    }

    /// Once shares apply, the appliance's seed is not asked for a piece a connected peer has
    /// (we get it from that peer); another peer with every piece (a node done) is.
    #[test]
    fn the_appliances_seed_is_not_asked_for_what_a_peer_has() {
        let n = 12;
        let on_peer: Vec<bool> = (0..n).map(|i| i < 6).collect();
        for trusted in [true, false] {
            let mut p = at_20_with(n, vec![(1, 1, all(n)), (2, 10, vec![false; n]), (3, 30, on_peer.clone())]);
            if trusted {
                p.set_trusted(1);
            }
            // Everything not on peer 3 is ours already.
            for i in 6..n {
                p.mark_have(i);
            }
            let r = p.next_requests(1, 4 * n, Instant::now(), &mut rng());
            assert_eq!(r.is_empty(), trusted, "{r:?}");
            assert!(!p.next_requests(3, 4, Instant::now(), &mut rng()).is_empty());
        }
    }

    /// A slow node's claim (fewer than half the pieces of the median downloading peer) does not
    /// hold the others back: its piece would take long to arrive.
    #[test]
    fn a_slow_nodes_claims_are_not_waited_for() {
        let n = 16;
        let mut p = Picker::new(PL, n as u64 * PL as u64, &vec![false; n]);
        p.set_own_order(20);
        let some: Vec<bool> = (0..n).map(|i| i >= 8).collect();
        for (k, order, bits) in [(1, 1, all(n)), (2, 10, some.clone()), (3, 30, some), (4, 40, vec![false; n])] {
            p.add_peer(k);
            p.set_order(k, order);
            p.bitfield(k, bits);
            p.choked(k, false);
        }
        p.set_trusted(1);
        let t0 = Instant::now();
        // Our share (rank 1 of 4), less what the peers have already (pieces 8 and up): two
        // pieces. Peer 4 (0 pieces, the median has 8) claims the first, peer 2 the second.
        let ours: Vec<u32> = walks(&[10, 20, 30, 40], n)[1].iter().map(|i| *i as u32).filter(|i| *i < 8).collect();
        assert_eq!(ours.len(), 2);
        p.claim(4, ours[0], t0);
        p.claim(2, ours[1], t0);
        let r = p.next_requests(1, 4, t0, &mut rng());
        assert!(!r.is_empty() && r.iter().all(|b| b.piece == ours[0]), "{r:?}");
    }

    /// Every piece left on the seed claimed by others: nothing asked of it, and the picker says
    /// it is holding (the seed's connection is planned again on ticks) until the claims lapse.
    #[test]
    fn the_seed_waits_out_claims_on_the_last_pieces() {
        let n = 3;
        let mut p = at_20_with(n, vec![(1, 1, all(n)), (2, 10, vec![false; n])]);
        p.set_trusted(1);
        let t0 = Instant::now();
        for i in 0..n as u32 {
            p.claim(2, i, t0);
        }
        assert!(p.next_requests(1, 4, t0, &mut rng()).is_empty());
        assert!(p.holding());
        let r = p.next_requests(1, 4, t0 + CLAIM_TTL, &mut rng());
        assert_eq!(r.len(), 4, "{r:?}");
    }

    #[test]
    fn the_shares_cover_every_piece_once_heaviest_first() {
        let places = [1000, 1001, 1002, 1003];
        let d = Deal::new(&places, 18);
        let mut every: Vec<u32> = d.walks.concat();
        every.sort();
        assert_eq!(every, (0..18).collect::<Vec<_>>(), "the shares cover every piece once");
        for (r, w) in d.walks.iter().enumerate() {
            let ws: Vec<u64> = w.iter().map(|i| weight(*i as usize, places[r])).collect();
            assert!(ws.windows(2).all(|x| x[0] > x[1]), "heaviest first: {ws:?}");
        }
        assert!(Deal::new(&places, 0).walks.iter().all(Vec::is_empty));
    }

    /// Places joining move few pieces between the others (dealt as index modulo the count,
    /// nearly all of them moved); the shares stay within one piece of one another.
    #[test]
    fn a_node_joining_moves_few_pieces_between_the_others() {
        let n = 300;
        let full: Vec<u32> = (0..40).map(|i| 0x0A00_0000 + 7 * i).collect();
        let mut part = full.clone();
        part.remove(17);
        let (before, after) = (Deal::new(&part, n).owners(), Deal::new(&full, n).owners());
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a && **a != full[17]).count();
        let won = after.iter().filter(|a| **a == full[17]).count();
        assert!(moved * 10 <= n, "{moved} of {n} pieces moved between the others");
        assert!((7..=8).contains(&won), "{won}");
        for d in [Deal::new(&part, n), Deal::new(&full, n), Deal::new(&full[..3], 1000)] {
            let l: Vec<usize> = d.walks.iter().map(Vec::len).collect();
            assert!(l.iter().max().unwrap() - l.iter().min().unwrap() <= 1, "{l:?}");
        }
    }

    /// 1000 nodes (consecutive addresses), 5150 pieces (2.7 GB in 512 KiB): five or six each, and
    /// a node that knew only a tenth of the others when it started keeps most of the first
    /// pieces it fetched (dealt as index modulo the count, it kept almost none).
    #[test]
    fn a_thousand_nodes_share_5150_pieces_and_early_picks_mostly_stay() {
        let n = 5150;
        let full: Vec<u32> = (0..1000).map(|i| 0x0A00_0100 + i).collect();
        let d = Deal::new(&full, n);
        let sizes: Vec<usize> = d.walks.iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|l| (5..=6).contains(l)), "{:?}", (sizes.iter().min(), sizes.iter().max()));
        let owners = d.owners();
        let early: Vec<u32> = full.iter().copied().step_by(10).collect();
        let e = Deal::new(&early, n);
        let (mut kept, mut picks) = (0, 0);
        for (r, w) in e.walks.iter().enumerate() {
            for i in w.iter().take(2) {
                picks += 1;
                kept += usize::from(owners[*i as usize] == early[r]);
            }
        }
        assert!(kept * 2 > picks, "kept {kept} of {picks}");
    }

    #[test]
    fn blocks_complete_verify_and_a_bad_piece_names_its_senders() {
        let mut p = Picker::new(PL, PL as u64, &[false]);
        p.add_peer(1);
        p.bitfield(1, all(1));
        p.choked(1, false);
        let r = p.next_requests(1, 10, Instant::now(), &mut rng());
        assert_eq!(r.len(), 4);
        assert_eq!(p.got(1, 0, 0, 5), Got::Unexpected, "wrong length");
        assert_eq!(p.got(2, 0, 0, BLOCK as usize), Got::Unexpected, "not asked of it");
        for b in &r[..3] {
            assert_eq!(p.got(1, 0, b.begin, BLOCK as usize), Got::Take { complete: false, cancel: vec![] });
        }
        assert_eq!(p.got(1, 0, 0, BLOCK as usize), Got::Unexpected, "twice");
        assert_eq!(p.got(1, 0, r[3].begin, BLOCK as usize), Got::Take { complete: true, cancel: vec![] });
        assert_eq!(p.verified(0, false), vec![1; 4]);
        assert_eq!(p.have_count(), 0);
        // Asked again, and this time it verifies.
        let r = p.next_requests(1, 10, Instant::now(), &mut rng());
        assert_eq!(r.len(), 4);
        for b in &r {
            p.got(1, 0, b.begin, BLOCK as usize);
        }
        assert_eq!(p.verified(0, true), vec![1; 4]);
        assert!(p.complete());
        assert_eq!(p.have_bytes(), PL as u64);
        assert!(!p.interested(1));
    }

    #[test]
    fn a_distrusted_peers_blocks_are_fetched_again() {
        let mut p = Picker::new(PL, PL as u64, &[false]);
        for k in 1..=2 {
            p.add_peer(k);
            p.bitfield(k, all(1));
            p.choked(k, false);
        }
        let r = p.next_requests(1, 2, Instant::now(), &mut rng());
        for b in &r {
            p.got(1, 0, b.begin, BLOCK as usize);
        }
        p.remove_peer(1);
        assert!(p.drop_blocks_from(1));
        // All four blocks come from peer 2 now, and only it is named if the piece fails.
        let r = p.next_requests(2, 8, Instant::now(), &mut rng());
        assert_eq!(r.len(), 4);
        for b in &r {
            p.got(2, 0, b.begin, BLOCK as usize);
        }
        assert_eq!(p.verified(0, false), vec![2; 4]);
    }

    /// Peer 2 sends half a piece and chokes; the seed (1) finishes it: the failed piece names
    /// each block's sender. Made suspect, it is fetched again whole from the trusted seed, not
    /// from peer 3, and not duplicated in endgame.
    #[test]
    fn a_suspect_piece_is_fetched_again_whole_from_the_trusted_seed() {
        let mut p = Picker::new(PL, PL as u64, &[false]);
        let now = Instant::now();
        for k in 1..=3 {
            p.add_peer(k);
            p.bitfield(k, all(1));
            p.choked(k, false);
        }
        p.set_trusted(1);
        let r = p.next_requests(2, 2, now, &mut rng());
        for b in &r {
            p.got(2, 0, b.begin, BLOCK as usize);
        }
        p.choked(2, true);
        let r = p.next_requests(1, 8, now, &mut rng());
        assert_eq!(r.iter().map(|b| b.begin / BLOCK).collect::<Vec<_>>(), vec![2, 3], "the seed finishes the orphan");
        for b in &r {
            p.got(1, 0, b.begin, BLOCK as usize);
        }
        assert!(p.holds_blocks_from(2));
        assert_eq!(p.verified(0, false), vec![2, 2, 1, 1]);
        assert!(!p.holds_blocks_from(2), "a judged piece no longer needs its senders");
        p.set_suspect(0);
        assert!(p.next_requests(3, 8, now, &mut rng()).is_empty(), "untrusted peer 3 waits for the seed");
        let r = p.next_requests(1, 8, now, &mut rng());
        assert_eq!(r.len(), 4, "the seed fetches all of it");
        assert!(p.next_requests(3, 8, now, &mut rng()).is_empty(), "no endgame copy of a suspect piece");
        for b in &r {
            p.got(1, 0, b.begin, BLOCK as usize);
        }
        assert_eq!(p.verified(0, true), vec![1; 4]);
        assert!(!p.is_suspect(0));
    }

    /// Without a trusted peer, any one peer takes a suspect piece; if it chokes half-way the
    /// piece starts over, and the next peer fetches every block.
    #[test]
    fn a_suspect_piece_whose_sender_chokes_starts_over() {
        let mut p = Picker::new(PL, 2 * PL as u64, &[false; 2]);
        let now = Instant::now();
        for k in 2..=3 {
            p.add_peer(k);
            p.bitfield(k, all(2));
            p.choked(k, false);
        }
        p.set_suspect(0);
        p.set_window(0, 1);
        let r = p.next_requests(2, 4, now, &mut rng());
        assert!(r.iter().all(|b| b.piece == 0) && r.len() == 4, "{r:?}");
        for b in &r[..2] {
            p.got(2, 0, b.begin, BLOCK as usize);
        }
        // Peer 3 neither continues nor duplicates it.
        assert!(p.next_requests(3, 8, now, &mut rng()).iter().all(|b| b.piece == 1));
        assert!(p.choked(2, true));
        let r = p.next_requests(3, 8, now, &mut rng());
        let zero: Vec<u32> = r.iter().filter(|b| b.piece == 0).map(|b| b.begin / BLOCK).collect();
        assert_eq!(zero, vec![0, 1, 2, 3], "{r:?}");
        for b in r.iter().filter(|b| b.piece == 0) {
            p.got(3, 0, b.begin, BLOCK as usize);
        }
        assert_eq!(p.verified(0, false), vec![3; 4], "a sole sender, named alone");
    }

    #[test]
    fn endgame_duplicates_and_cancels() {
        let mut p = Picker::new(PL, PL as u64, &[false]);
        for k in 1..=3 {
            p.add_peer(k);
            p.bitfield(k, all(1));
            p.choked(k, false);
        }
        let now = Instant::now();
        assert_eq!(p.next_requests(1, 10, now, &mut rng()).len(), 4);
        // Nothing is missing: peer 2 duplicates, peer 3 too, then no more than two askers.
        assert_eq!(p.next_requests(2, 10, now, &mut rng()).len(), 4);
        assert!(p.next_requests(3, 10, now, &mut rng()).is_empty());
        match p.got(2, 0, 0, BLOCK as usize) {
            Got::Take { cancel, .. } => assert_eq!(cancel, vec![(1, Block { piece: 0, begin: 0, len: BLOCK })]),
            g => panic!("{g:?}"),
        }
        assert_eq!(p.asked(1), 3);
        assert_eq!(p.got(1, 0, 0, BLOCK as usize), Got::Unexpected, "cancelled copy");
    }

    #[test]
    fn in_the_endgame_others_take_the_free_blocks_of_a_started_piece() {
        let mut p = Picker::new(PL, PL as u64, &[false]);
        for k in 1..=3 {
            p.add_peer(k);
            p.bitfield(k, all(1));
            p.choked(k, false);
        }
        p.set_trusted(3);
        let now = Instant::now();
        // Peer 1 starts the only piece and has room for two of its four blocks.
        let r1 = p.next_requests(1, 2, now, &mut rng());
        assert_eq!(r1.iter().map(|b| b.begin / BLOCK).collect::<Vec<_>>(), vec![0, 1]);
        // Peer 2 takes the two free blocks first, then duplicates peer 1's.
        let r2: Vec<u32> = p.next_requests(2, 4, now, &mut rng()).iter().map(|b| b.begin / BLOCK).collect();
        assert_eq!(r2, vec![2, 3, 0, 1]);
        // The trusted seed is not asked for blocks the swarm is already sending.
        let mut p2 = Picker::new(PL, PL as u64, &[false]);
        for k in [1, 3] {
            p2.add_peer(k);
            p2.bitfield(k, all(1));
            p2.choked(k, false);
        }
        p2.set_trusted(3);
        assert_eq!(p2.next_requests(1, 2, now, &mut rng()).len(), 2);
        assert!(p2.next_requests(3, 4, now, &mut rng()).is_empty());
    }

    #[test]
    fn leaving_choking_and_timing_out_free_blocks() {
        let mut p = Picker::new(PL, 2 * PL as u64, &[false; 2]);
        let t0 = Instant::now();
        for k in 1..=2 {
            p.add_peer(k);
            p.bitfield(k, all(2));
            p.choked(k, false);
        }
        assert_eq!(p.next_requests(1, 8, t0, &mut rng()).len(), 8);
        assert!(p.next_requests(2, 8, t0, &mut rng()).len() == 8, "endgame duplicates");
        assert!(p.remove_peer(1));
        assert_eq!(p.avail, vec![1, 1]);
        assert!(p.choked(2, true));
        assert_eq!(p.asked(2), 0);
        p.choked(2, false);
        assert_eq!(p.next_requests(2, 8, t0, &mut rng()).len(), 8);
        let later = t0 + Duration::from_secs(30);
        let exp = p.expire(later, Duration::from_secs(10));
        assert_eq!(exp.len(), 1);
        assert_eq!(exp[0].1.len(), 8);
        assert_eq!(p.asked(2), 0);
        assert_eq!(p.next_requests(2, 8, later, &mut rng()).len(), 8);
    }

    #[test]
    fn a_peer_that_keeps_sending_keeps_its_queued_requests() {
        let mut p = Picker::new(PL, 4 * PL as u64, &[false; 4]);
        let t0 = Instant::now();
        for k in 1..=2 {
            p.add_peer(k);
            p.bitfield(k, all(4));
            p.choked(k, false);
        }
        let r1 = p.next_requests(1, 8, t0, &mut rng());
        assert_eq!(p.next_requests(2, 8, t0, &mut rng()).len(), 8);
        // Peer 1 sends a block at 25 s (its uplink is slow, its queue long); peer 2 is silent.
        let t25 = t0 + Duration::from_secs(25);
        p.heard(1, t25);
        assert!(matches!(p.got(1, r1[0].piece, r1[0].begin, BLOCK as usize), Got::Take { .. }));
        let exp = p.expire(t0 + Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(exp.iter().map(|(k, b)| (*k, b.len())).collect::<Vec<_>>(), vec![(2, 8)], "only the silent peer's requests");
        assert_eq!(p.asked(1), 7);
        // Still sending, but a request unanswered for STUCK_FACTOR × the limit goes too.
        p.heard(1, t0 + Duration::from_secs(39));
        let exp = p.expire(t0 + Duration::from_secs(41), Duration::from_secs(10));
        assert_eq!(exp.iter().map(|(k, b)| (*k, b.len())).collect::<Vec<_>>(), vec![(1, 7)]);
    }

    #[test]
    fn no_endgame_copies_are_asked_of_the_appliances_seed() {
        let mut p = Picker::new(PL, 2 * PL as u64, &[false; 2]);
        let t0 = Instant::now();
        for k in 1..=3 {
            p.add_peer(k);
            p.bitfield(k, all(2));
            p.choked(k, false);
        }
        p.set_trusted(1);
        // Peer 2 is asked for every block: nothing is missing any more (endgame).
        assert_eq!(p.next_requests(2, 8, t0, &mut rng()).len(), 8);
        // The appliance's seed gets no copies (its upload is the one every node shares) …
        assert!(p.next_requests(1, 8, t0, &mut rng()).is_empty());
        // … another peer does.
        assert_eq!(p.next_requests(3, 8, t0, &mut rng()).len(), 8);
    }

    #[test]
    fn the_streaming_window_comes_before_rarity() {
        let mut p = Picker::new(PL, 8 * PL as u64, &[false; 8]);
        p.add_peer(1);
        p.bitfield(1, all(8));
        p.choked(1, false);
        p.set_window(5, 2);
        let r = p.next_requests(1, 8, Instant::now(), &mut rng());
        assert!(r[..4].iter().all(|b| b.piece == 5) && r[4..].iter().all(|b| b.piece == 6), "{r:?}");
    }

    #[test]
    fn only_verified_bytes_within_a_piece_are_served() {
        let mut p = Picker::new(PL, PL as u64 + 100, &[true, false]);
        assert!(p.can_serve(0, 0, BLOCK) && p.can_serve(0, PL - 10, 10));
        assert!(!p.can_serve(0, PL - 10, 11), "past the piece");
        assert!(!p.can_serve(0, 0, 0) && !p.can_serve(0, 0, MAX_REQUEST + 1));
        assert!(!p.can_serve(1, 0, 10), "not verified");
        assert!(!p.can_serve(2, 0, 10), "no such piece");
        p.add_peer(1);
        assert!(!p.can_serve(u32::MAX, 0, 1));
    }

    #[test]
    fn have_out_of_range_is_reported() {
        let mut p = Picker::new(PL, PL as u64, &[false]);
        p.add_peer(1);
        assert_eq!(p.have(1, 5), None);
        assert_eq!(p.have(1, 0), Some(true));
        assert!(p.is_seed(1));
    }
}
