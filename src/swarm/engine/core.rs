//! The engine's decisions, sans I/O (in the manner of quinn-proto): events in, [`Action`]s out.
//! No sockets, no tokio, no locks, no disk; time is passed in. The I/O side (`conn`, `file`,
//! `announce` and the engine's tasks) feeds it what happened — a connection's handshake, a
//! message, a block written, a piece hashed, a dial that failed, a tick, an announce's peers —
//! and carries out what it answers: queue a message or an upload to a connection, close one,
//! write a block, hash a piece, dial an address.
//!
//! It owns the [`Picker`], the connections' protocol state, the known addresses, bans and the
//! cool-off of flapping peers, the suspect pieces' failed copies, and the rules that sit around
//! them: message dispatch, the duplicate-connection rule, the admission caps of [`guard`], the
//! ban policy after a failed piece, and the dial choice.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use tracing::{debug, info, trace, warn};

use super::guard::{self, Admit, ChokeMeter, Cooloff, Failure, MAX_CONNS, MAX_INCOMING, MAX_OUTGOING};
use super::picker::{Block, Got, PeerKey, Picker};
use super::wire::{self, Msg};

/// Blocks asked of all peers together, at most (spread evenly, within MIN_DEPTH..=depth).
pub const DEPTH_BUDGET: usize = 96;
/// Blocks asked of any one peer at least (up to the configured depth).
pub const MIN_DEPTH: usize = 4;
/// Blocks asked of the appliance's seed by all nodes together, about: each node asks it for
/// this many over the nodes it knows, within MIN_DEPTH..=depth (see `Core::plan`).
pub const SEED_BUDGET: usize = 16;
/// A request unanswered this long is asked of another peer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Our number for the `si_claim` extension (BEP 10): the id peers put on the claims they send
/// us. A claim's payload is the piece index (4 bytes, big-endian): "I am asking the appliance's
/// seed for this piece" (see [`Picker::claim`]).
pub const CLAIM_EXT: u8 = 3;
/// The extension's name in the extension handshake.
pub const CLAIM_NAME: &str = "si_claim";

/// A BEP 10 extension handshake: `m` maps extension names to the numbers the sender wants on
/// the messages it receives (other keys, as `v` or `reqq`, are skipped).
#[derive(serde::Serialize, serde::Deserialize)]
struct ExtHandshake {
    #[serde(default)]
    m: std::collections::BTreeMap<String, serde_bencode::value::Value>,
}

/// Ours: `d1:md8:si_claimi3eee`.
fn ext_handshake() -> Vec<u8> {
    let m = [(CLAIM_NAME.to_owned(), serde_bencode::value::Value::Int(CLAIM_EXT.into()))].into();
    serde_bencode::to_bytes(&ExtHandshake { m }).expect("bencoding a map of one integer")
}

/// The number a peer's extension handshake gives `si_claim` (None: it does not speak it, or
/// the handshake is not a bencoded dictionary with an `m` dictionary; 0 disables, BEP 10).
fn peer_claim_id(payload: &[u8]) -> Option<u8> {
    // A hostile peer's handshake could nest lists deep enough to exhaust the stack of
    // serde_bencode's recursive reader: checked first (depth 32).
    if !crate::image::torrent::well_formed(payload) {
        return None;
    }
    let hs: ExtHandshake = serde_bencode::from_bytes(payload).ok()?;
    match hs.m.get(CLAIM_NAME)? {
        serde_bencode::value::Value::Int(n) => u8::try_from(*n).ok().filter(|n| *n != 0),
        _ => None,
    }
}

/// What the I/O side is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Queue a message to a connection's writer.
    Send(PeerKey, Msg),
    /// Queue an upload to a connection's writer (it reads the block from the file when its
    /// turn comes, so queued uploads cost no memory).
    Upload(PeerKey, Block),
    /// Close a connection (it is already forgotten here).
    Close(PeerKey),
    /// Write a received block to the file, then report [`Core::written`].
    Write {
        /// Piece.
        piece: u32,
        /// Offset in the piece.
        begin: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Hash a complete piece, then report [`Core::verified`]; `blocks`: hash every block too
    /// (a suspect piece's new copy is compared block by block with its failed one).
    Verify {
        /// Piece.
        piece: u32,
        /// Also hash each block.
        blocks: bool,
    },
    /// Connect to a known address, then report [`Core::register`] or [`Core::dial_failed`].
    Dial(SocketAddr),
}

/// Why a connection ends on a message of its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerFault {
    /// The connection was closed here already (banned, replaced, stopping).
    #[error("closed")]
    Closed,
    /// It chokes and unchokes again and again (each unchoke re-asks every request).
    #[error("choke flapping")]
    ChokeFlapping,
    /// A HAVE for a piece that does not exist.
    #[error("HAVE {0} out of range")]
    HaveOutOfRange(u32),
    /// A bitfield of the wrong length or with spare bits set.
    #[error("bad bitfield")]
    BadBitfield,
}

/// Why a connection that finished its handshake is not registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Another connection to the same peer id is kept (the one opened by the smaller id).
    #[error("duplicate connection")]
    Duplicate,
    /// The admission caps ([`guard::admit`]).
    #[error("refused: {0:?}")]
    Admit(Admit),
}

/// A connection's protocol state.
#[derive(Debug)]
pub struct Peer {
    /// Its address.
    pub ip: IpAddr,
    /// Its peer id.
    pub peer_id: [u8; 20],
    /// Dialled by us.
    pub outgoing: bool,
    /// The appliance's seed.
    pub trusted: bool,
    /// Whether we told it we are interested.
    interested: bool,
    /// Block bytes received from it.
    pub down: u64,
    chokes: ChokeMeter,
    /// Its number for `si_claim` (it speaks it: it gets our claims).
    claim_id: Option<u8>,
}

/// A known address (from `--peer` or the tracker).
#[derive(Debug, Default)]
struct Known {
    next_try: Option<Instant>,
    fails: u32,
    connecting: bool,
    /// It answered with our own peer id: never dialled again.
    is_self: bool,
}

/// What the core starts from.
#[derive(Debug)]
pub struct CoreConfig {
    /// Piece length.
    pub piece_len: u32,
    /// File length.
    pub total: u64,
    /// Pieces already verified.
    pub have: Vec<bool>,
    /// Our peer id.
    pub peer_id: [u8; 20],
    /// Blocks asked of one peer at a time, at most.
    pub depth: usize,
    /// The appliance's addresses: never banned, always admitted.
    pub trusted: HashSet<IpAddr>,
    /// Our own address (orders the shares towards a seed).
    pub own: Option<Ipv4Addr>,
    /// Addresses to connect to at once.
    pub peers: Vec<SocketAddr>,
}

/// How far `a` lies after `own` in the ring of IPv4 addresses (other families: last).
fn ring_distance(own: u32, a: &SocketAddr) -> u64 {
    match a.ip() {
        IpAddr::V4(v4) => u64::from(u32::from(v4).wrapping_sub(own).wrapping_sub(1)),
        IpAddr::V6(_) => u64::MAX,
    }
}

/// The engine's state and rules (see the module doc).
#[derive(Debug)]
pub struct Core {
    picker: Picker,
    peers: HashMap<PeerKey, Peer>,
    known: HashMap<SocketAddr, Known>,
    banned: HashSet<IpAddr>,
    /// Flapping peers' addresses, kept away for a while.
    cooloff: Cooloff,
    /// Suspect pieces: (sender, SHA-1) of each block of the copy that failed, until a copy
    /// from one peer verifies and names the liars.
    bad_copies: HashMap<u32, Vec<(IpAddr, [u8; 20])>>,
    /// Every connection's address, kept after it closes while its blocks are in unverified
    /// pieces (a failed piece names its senders).
    ip_of: HashMap<PeerKey, IpAddr>,
    /// Blocks taken and handed out to be written, per piece, not yet reported written.
    writing: HashMap<u32, u32>,
    /// Pieces with every block received whose hash waits for their writes.
    complete_unwritten: HashSet<u32>,
    trusted: HashSet<IpAddr>,
    peer_id: [u8; 20],
    depth: usize,
    rng: StdRng,
    next_key: PeerKey,
    hash_failures: u32,
    /// Our own address as a number (0: unknown): the dialling order starts after it.
    own: u32,
}

impl Core {
    /// A core for one torrent.
    pub fn new(cfg: CoreConfig, rng: StdRng) -> Core {
        let mut picker = Picker::new(cfg.piece_len, cfg.total, &cfg.have);
        if let Some(ip) = cfg.own {
            picker.set_own_order(u32::from(ip));
        }
        Core {
            picker,
            peers: HashMap::new(),
            known: cfg.peers.into_iter().map(|a| (a, Known::default())).collect(),
            banned: HashSet::new(),
            cooloff: Cooloff::default(),
            bad_copies: HashMap::new(),
            ip_of: HashMap::new(),
            writing: HashMap::new(),
            complete_unwritten: HashSet::new(),
            trusted: cfg.trusted,
            peer_id: cfg.peer_id,
            depth: cfg.depth,
            rng,
            next_key: 1,
            hash_failures: 0,
            own: cfg.own.map_or(0, u32::from),
        }
    }

    /// The picker (read-only: counters, what we have).
    pub fn picker(&self) -> &Picker {
        &self.picker
    }

    /// The tracker's ring of the swarm's downloading nodes (empty: none sent), for the shares
    /// of the seed's pieces ([`Picker::set_ring`]).
    pub fn set_ring(&mut self, ring: &[Ipv4Addr]) {
        let orders: Vec<u32> = ring.iter().map(|ip| u32::from(*ip)).collect();
        self.picker.set_ring(&orders);
    }

    /// Connected peers.
    pub fn peers(&self) -> &HashMap<PeerKey, Peer> {
        &self.peers
    }

    /// Pieces that failed their hash so far.
    pub fn hash_failures(&self) -> u32 {
        self.hash_failures
    }

    /// Addresses banned.
    pub fn banned(&self) -> &HashSet<IpAddr> {
        &self.banned
    }

    /// Whether `ip` is kept away for flapping at `now`.
    pub fn cooling_off(&self, ip: &IpAddr, now: Instant) -> bool {
        self.cooloff.holds(ip, now)
    }

    /// Whether `addr` answered with our own peer id (never dialled again).
    pub fn is_self(&self, addr: &SocketAddr) -> bool {
        self.known.get(addr).is_some_and(|k| k.is_self)
    }

    /// A sequential reader waits at `piece`: the next `n` pieces become the first choice.
    pub fn set_window(&mut self, piece: u32, n: u32) {
        self.picker.set_window(piece, n);
    }

    fn distrusted(&self, ip: &IpAddr, now: Instant) -> bool {
        self.banned.contains(ip) || self.cooloff.holds(ip, now)
    }

    /// Whether an incoming connection from `ip` may start its handshake.
    pub fn admit_incoming(&self, ip: IpAddr, now: Instant) -> Admit {
        let from_ip = self.peers.values().filter(|c| c.ip == ip).count();
        let trusted = self.trusted.contains(&ip);
        match guard::admit(trusted, self.distrusted(&ip, now), self.peers.len(), from_ip) {
            Admit::Yes if !trusted && self.incoming(None) >= MAX_INCOMING => Admit::Full,
            Admit::Full if self.evictable(None).is_some() => Admit::Yes,
            v => v,
        }
    }

    /// Untrusted connections peers dialled to us (but `except`: one being replaced), against
    /// [`MAX_INCOMING`].
    fn incoming(&self, except: Option<PeerKey>) -> usize {
        self.peers.iter().filter(|(k, c)| !c.outgoing && !c.trusted && Some(**k) != except).count()
    }

    /// When we are full: the connection an incoming one may take the place of. A node may dial
    /// up to [`MAX_CONNS`] peers itself, but beyond [`MAX_OUTGOING`] those are borrowed from
    /// the peers that dial it: of our untrusted outgoing connections, the one we received the
    /// least from (the newest of equals), while we hold more than [`MAX_OUTGOING`] of them.
    /// Without it a swarm one node larger than the cap allows (81 nodes) filled every node
    /// before the last one's connections were registered: it was refused by all, for good,
    /// and fetched the whole archive from the seed after the others had finished (simulated,
    /// SCALE.md). `except`: a connection being replaced (not a candidate).
    fn evictable(&self, except: Option<PeerKey>) -> Option<PeerKey> {
        let out = self.peers.iter().filter(|(k, c)| c.outgoing && !c.trusted && Some(**k) != except);
        if out.clone().count() <= MAX_OUTGOING {
            return None;
        }
        out.min_by_key(|(k, c)| (c.down, std::cmp::Reverse(**k))).map(|(k, _)| *k)
    }

    /// A connection finished its handshake with `peer_id` at `ip` (`known`: the address we
    /// dialled). Registers it (one connection per peer id: of two, both sides keep the one
    /// opened by the smaller id; the caps again, as many handshakes may have been in flight; a
    /// duplicate being replaced does not count), or refuses it. Queues our bitfield and an
    /// unchoke (a LAN swarm of cooperating nodes: everyone is unchoked, always).
    ///
    /// # Errors
    /// [`Refused`]: close the connection.
    pub fn register(
        &mut self,
        now: Instant,
        ip: IpAddr,
        peer_id: [u8; 20],
        outgoing: bool,
        known: Option<SocketAddr>,
        out: &mut Vec<Action>,
    ) -> Result<PeerKey, Refused> {
        if let Some(k) = known.and_then(|a| self.known.get_mut(&a)) {
            k.connecting = false;
        }
        let keep_new = (self.peer_id < peer_id) == outgoing;
        let dup = self.peers.iter().find(|(_, c)| c.peer_id == peer_id).map(|(k, _)| *k);
        if dup.is_some() && !keep_new {
            return Err(Refused::Duplicate);
        }
        let trusted = self.trusted.contains(&ip);
        let others = self.peers.iter().filter(|(k, _)| Some(**k) != dup);
        let (total, from_ip) = others.fold((0, 0), |(t, f), (_, c)| (t + 1, f + usize::from(c.ip == ip)));
        let mut verdict = guard::admit(trusted, self.distrusted(&ip, now), total, from_ip);
        if verdict == Admit::Yes && !outgoing && !trusted && self.incoming(dup) >= MAX_INCOMING {
            verdict = Admit::Full;
        }
        if verdict == Admit::Full && !outgoing {
            if let Some(victim) = self.evictable(dup) {
                debug!(%ip, "full: an incoming connection takes the place of one we dialled");
                self.peers.remove(&victim);
                out.push(Action::Close(victim));
                if self.picker.remove_peer(victim) {
                    self.plan_all(now, out);
                }
                verdict = Admit::Yes;
            }
        }
        if verdict != Admit::Yes {
            return Err(Refused::Admit(verdict));
        }
        if let Some(old) = dup {
            self.peers.remove(&old);
            out.push(Action::Close(old));
            if self.picker.remove_peer(old) {
                self.plan_all(now, out);
            }
        }
        let key = self.next_key;
        self.next_key += 1;
        self.picker.add_peer(key);
        if trusted {
            self.picker.set_trusted(key);
        }
        if let IpAddr::V4(v4) = ip {
            self.picker.set_order(key, u32::from(v4));
        }
        self.ip_of.insert(key, ip);
        let peer = Peer { ip, peer_id, outgoing, trusted, interested: false, down: 0, chokes: ChokeMeter::default(), claim_id: None };
        self.peers.insert(key, peer);
        if self.picker.have_count() > 0 {
            out.push(Action::Send(key, Msg::Bitfield(wire::bitfield(&self.picker.have_flags()))));
        }
        out.push(Action::Send(key, Msg::Unchoke));
        if let Some(k) = known.and_then(|a| self.known.get_mut(&a)) {
            k.fails = 0;
        }
        Ok(key)
    }

    /// Connection `key`'s handshake announced the extension protocol (BEP 10): queues our
    /// extension handshake, which offers `si_claim`.
    pub fn extensions(&mut self, key: PeerKey, out: &mut Vec<Action>) {
        if self.peers.contains_key(&key) {
            out.push(Action::Send(key, Msg::Extended { id: 0, payload: ext_handshake() }));
        }
    }

    /// A message from connection `key`.
    ///
    /// # Errors
    /// [`PeerFault`]: close the connection (it is forgotten by [`Core::disconnect`]).
    pub fn handle(&mut self, now: Instant, key: PeerKey, msg: Msg, out: &mut Vec<Action>) -> Result<(), PeerFault> {
        let Some(peer) = self.peers.get_mut(&key) else { return Err(PeerFault::Closed) };
        match msg {
            Msg::KeepAlive | Msg::Interested | Msg::NotInterested | Msg::Other(_) | Msg::Cancel { .. } => {}
            Msg::Extended { id: 0, payload } => {
                peer.claim_id = peer_claim_id(&payload);
                // A peer that speaks `si_claim` joined after we started pieces from the seed:
                // it gets those claims now (measured, N = 32 / 10 Mbit/s: 21 of 68 pieces the
                // seed sent twice went to a node that never had the first taker's claim).
                if let Some(id) = peer.claim_id.filter(|_| !peer.trusted) {
                    for i in self.picker.seed_pieces_in_flight() {
                        out.push(Action::Send(key, Msg::Extended { id, payload: i.to_be_bytes().to_vec() }));
                    }
                }
            }
            Msg::Extended { id: CLAIM_EXT, payload } => match <[u8; 4]>::try_from(payload.as_slice()) {
                Ok(b) => {
                    let i = u32::from_be_bytes(b);
                    trace!(ip = %peer.ip, piece = i, "claim received");
                    if !self.picker.claim(key, i, now) {
                        debug!(key, piece = i, "claim of a piece out of range: ignored");
                    }
                }
                Err(_) => debug!(key, len = payload.len(), "malformed claim: ignored"),
            },
            // Extensions we did not offer.
            Msg::Extended { .. } => {}
            Msg::Choke => {
                if peer.chokes.choke(now) && !peer.trusted {
                    // Each choke frees its requests and each unchoke asks again: cut it off.
                    let ip = peer.ip;
                    self.cooloff.add(ip, now);
                    warn!(%ip, cooloff_secs = guard::FLAP_COOLOFF.as_secs(), "peer closed: it chokes too often");
                    return Err(PeerFault::ChokeFlapping);
                }
                if self.picker.choked(key, true) {
                    self.plan_all(now, out);
                }
            }
            Msg::Unchoke => {
                self.picker.choked(key, false);
                self.plan(now, key, out);
            }
            Msg::Have(i) => {
                if self.picker.have(key, i).is_none() {
                    return Err(PeerFault::HaveOutOfRange(i));
                }
                self.plan(now, key, out);
            }
            Msg::Bitfield(b) => {
                let Some(bits) = wire::parse_bitfield(&b, self.picker.len()) else { return Err(PeerFault::BadBitfield) };
                self.picker.bitfield(key, bits);
                self.plan(now, key, out);
            }
            Msg::Request { piece, begin, len } => {
                if self.picker.can_serve(piece, begin, len) {
                    out.push(Action::Upload(key, Block { piece, begin, len }));
                } else {
                    debug!(key, piece, begin, len, "request for what we do not have: ignored");
                }
            }
            Msg::Piece { piece, begin, data } => {
                self.picker.heard(key, now);
                match self.picker.got(key, piece, begin, data.len()) {
                    Got::Unexpected => {}
                    Got::Take { complete, cancel } => {
                        peer.down += data.len() as u64;
                        *self.writing.entry(piece).or_default() += 1;
                        if complete {
                            self.complete_unwritten.insert(piece);
                        }
                        out.push(Action::Write { piece, begin, data });
                        for (k, b) in cancel {
                            if self.peers.contains_key(&k) {
                                out.push(Action::Send(k, Msg::Cancel { piece: b.piece, begin: b.begin, len: b.len }));
                            }
                            self.plan(now, k, out);
                        }
                    }
                }
                self.plan(now, key, out);
            }
        }
        Ok(())
    }

    /// A block of `piece` handed out by [`Action::Write`] is on disk: once every block of a
    /// complete piece is, the piece is hashed ([`Action::Verify`]).
    pub fn written(&mut self, piece: u32, out: &mut Vec<Action>) {
        let left = match self.writing.get_mut(&piece) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            self.writing.remove(&piece);
            if self.complete_unwritten.remove(&piece) {
                out.push(Action::Verify { piece, blocks: self.bad_copies.contains_key(&piece) });
            }
        }
    }

    /// The hash of a complete piece: `ok`, and `blocks` (the SHA-1 of each block, when asked
    /// for or when it failed). Verified: HAVE to every peer that lacks it; a suspect piece's
    /// failed copy names the liars ([`guard::liars`]). Failed: fetched again, its senders
    /// judged by [`guard::failed_piece`].
    pub fn verified(&mut self, now: Instant, piece: u32, ok: bool, blocks: Vec<[u8; 20]>, out: &mut Vec<Action>) {
        let senders = self.picker.verified(piece, ok);
        let ips: Vec<IpAddr> = senders.iter().map(|k| self.ip_of.get(k).copied().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))).collect();
        if ok {
            if let Some(bad) = self.bad_copies.remove(&piece) {
                let liars = guard::liars(&bad, &blocks, &self.trusted);
                let mut from = ips.clone();
                from.dedup();
                info!(piece, from = ?from, liars = ?liars, "suspect piece {piece} verified from one peer: its failed copy names the liars");
                for ip in liars {
                    self.ban(ip, "its blocks differ from the verified piece", out);
                }
            }
            if tracing::enabled!(tracing::Level::TRACE) {
                let from: Vec<IpAddr> = senders.iter().filter_map(|k| self.ip_of.get(k).copied()).collect();
                trace!(piece, ?from, "piece verified");
            }
            // HAVE only to peers that lack the piece (those that have it never ask for it; half
            // the small packets of a swarm that spreads pieces rarest-first).
            for k in self.peers.keys() {
                if !self.picker.peer_has_piece(*k, piece) {
                    out.push(Action::Send(*k, Msg::Have(piece)));
                }
            }
            if self.picker.complete() {
                info!(bytes = self.picker.have_bytes(), "every piece verified");
                // We want nothing more from anyone.
                self.plan_all(now, out);
            }
        } else {
            self.hash_failures += 1;
            let mut distinct = ips.clone();
            distinct.sort();
            distinct.dedup();
            warn!(piece, senders = ?distinct, "piece {piece} did not validate (SHA-1 mismatch): fetching it again");
            match guard::failed_piece(&ips, &self.trusted, &self.banned) {
                Failure::Explained => {}
                Failure::Ban(ip) => self.ban(ip, "it alone sent a piece that failed the hash", out),
                Failure::TrustedSent => {
                    warn!(piece, "the appliance's seed alone sent a piece that failed the hash: not banned (check its disk); fetching it again")
                }
                Failure::Suspect => {
                    // Keep the first failed copy until a copy from one peer verifies.
                    if !self.bad_copies.contains_key(&piece) && blocks.len() == ips.len() {
                        self.bad_copies.insert(piece, ips.into_iter().zip(blocks).collect());
                    }
                    self.picker.set_suspect(piece);
                    info!(piece, senders = ?distinct, "several senders: fetching piece {piece} again from one peer (the seed first) to find the liar");
                }
            }
            self.plan_all(now, out);
        }
        // Senders that left and have nothing else waiting for a verdict: their addresses go.
        let mut done = senders;
        done.sort_unstable();
        done.dedup();
        for k in done {
            if !self.peers.contains_key(&k) && !self.picker.holds_blocks_from(k) {
                self.ip_of.remove(&k);
            }
        }
    }

    /// Connection `key` ended (`known`: the address we dialled, retried after a back-off).
    pub fn disconnect(&mut self, now: Instant, key: PeerKey, known: Option<SocketAddr>, out: &mut Vec<Action>) -> Option<Peer> {
        let gone = self.peers.remove(&key);
        if self.picker.remove_peer(key) && gone.is_some() {
            self.plan_all(now, out);
        }
        // Its address is kept only while its blocks wait for a verdict (a peer reconnecting
        // again and again must not grow the map).
        if !self.picker.holds_blocks_from(key) {
            self.ip_of.remove(&key);
        }
        if let Some(k) = known.and_then(|a| self.known.get_mut(&a)) {
            k.next_try = Some(now + backoff(k.fails));
        }
        gone
    }

    /// Dialling `addr` failed before a connection was registered (`is_self`: it was us).
    pub fn dial_failed(&mut self, now: Instant, addr: SocketAddr, is_self: bool) {
        if let Some(k) = self.known.get_mut(&addr) {
            k.connecting = false;
            k.fails += 1;
            k.is_self |= is_self;
            k.next_try = Some(now + backoff(k.fails));
        }
    }

    /// Peers a tracker named; ours (`own`) is skipped. Returns how many are new.
    pub fn add_known(&mut self, peers: &[SocketAddrV4], own: Option<SocketAddrV4>) -> usize {
        let mut added = 0;
        for a in peers {
            if Some(*a) == own {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.known.entry(SocketAddr::V4(*a)) {
                e.insert(Known::default());
                added += 1;
            }
        }
        added
    }

    /// Every 250 ms or so: gives up requests that waited too long (asked of others), and picks
    /// the known addresses to dial (due, not connecting, not ourselves, not connected, not
    /// banned or cooling off unless trusted, within [`MAX_CONNS`] unless trusted), in ring
    /// order after our own address.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let expired = self.picker.expire(now, REQUEST_TIMEOUT);
        if !expired.is_empty() {
            debug!(peers = expired.len(), "requests timed out, asked of others");
            self.plan_all(now, out);
        }
        if self.picker.complete() {
            return;
        }
        let again = self.picker.reclaims(now);
        if !again.is_empty() {
            trace!(pieces = ?again, "claimed again");
            self.send_claims(&again, None, out);
        }
        if self.picker.holding() {
            let seeds: Vec<PeerKey> = self.peers.iter().filter(|(_, p)| p.trusted).map(|(k, _)| *k).collect();
            for k in seeds {
                self.plan(now, k, out);
            }
        }
        self.cooloff.prune(now);
        let mut room = MAX_CONNS.saturating_sub(self.peers.len());
        let connected: HashSet<IpAddr> = self.peers.values().map(|c| c.ip).collect();
        // With no room, only the appliance's seed may be dialled: the rest is not sorted (at
        // N = 1000 a node knows ~1000 addresses and ticks 4 times a second).
        let mut addrs: Vec<SocketAddr> = self.known.keys().copied().filter(|a| room > 0 || self.trusted.contains(&a.ip())).collect();
        // A stable order (the map's is random): trusted first, then the addresses after our own
        // in ring order, so that each node is the first choice of the node before it, not the
        // lowest addresses everyone's (they fill up first and refuse the rest: see
        // `MAX_OUTGOING` for what keeps a node from being refused by all).
        let own = self.own;
        addrs.sort_by_key(|a| (!self.trusted.contains(&a.ip()), ring_distance(own, a), *a));
        for a in addrs {
            let ip = a.ip();
            let trusted = self.trusted.contains(&ip);
            if room == 0 && !trusted {
                continue;
            }
            let away = !trusted && self.distrusted(&ip, now);
            let Some(k) = self.known.get_mut(&a) else { continue };
            let due = k.next_try.is_none_or(|t| t <= now);
            if due && !k.connecting && !k.is_self && !connected.contains(&ip) && !away {
                k.connecting = true;
                out.push(Action::Dial(a));
                room = room.saturating_sub(1);
            }
        }
    }

    /// Closes every connection (the engine stops).
    pub fn close_all(&mut self, out: &mut Vec<Action>) {
        for (k, p) in self.peers.drain() {
            debug!(ip = %p.ip, outgoing = p.outgoing, down = p.down, "connection at stop");
            self.picker.remove_peer(k);
            out.push(Action::Close(k));
        }
    }

    /// Distrusts `ip`: its connections close, the blocks it sent to unfinished pieces are fetched
    /// again, and it is never connected to or accepted again. Never the appliance's seed.
    fn ban(&mut self, ip: IpAddr, why: &str, out: &mut Vec<Action>) {
        if self.trusted.contains(&ip) || ip.is_unspecified() {
            warn!(%ip, "not banning the appliance's seed ({why})");
            return;
        }
        if !self.banned.insert(ip) {
            return;
        }
        warn!(%ip, "peer banned: {why}");
        let gone: Vec<PeerKey> = self.ip_of.iter().filter(|(_, a)| **a == ip).map(|(k, _)| *k).collect();
        for k in gone {
            if self.peers.remove(&k).is_some() {
                out.push(Action::Close(k));
            }
            self.picker.remove_peer(k);
            self.picker.drop_blocks_from(k);
        }
    }

    /// Re-plans `k`'s requests and interest; queues what is new.
    fn plan(&mut self, now: Instant, k: PeerKey, out: &mut Vec<Action>) {
        let want = self.picker.interested(k);
        // Shared out over the connections: with many peers, a few blocks each. Every peer (the
        // seed first) then serves many request-clocked flows that each have little queued, which
        // keeps a shaped uplink's queue short and its flows fair (measured: with 12 blocks to
        // each of 32 peers, some flows to the seed starved for seconds).
        // The appliance's seed: SEED_BUDGET over the nodes we know (the tracker's list counts,
        // not only the connected), so MIN_DEPTH from 4 nodes up. At the start a node is connected
        // to few and asked the seed for 12 blocks (three 64 KiB pieces), so its uplink was
        // shared by about three pieces per node, and more of them went twice (measured, SCALE.md
        // stop 40: N = 8 / 100 Mbit/s 1.12 → 1.09 × T*, N = 32 / 10 1.44 → 1.40, seed copies
        // 1.35 → 1.28). A lone node keeps up to `depth`.
        let depth = if self.peers.get(&k).is_some_and(|p| p.trusted) {
            let nodes = self.peers.len().max(self.known.len()).max(1);
            (SEED_BUDGET / nodes).clamp(MIN_DEPTH.min(self.depth), self.depth)
        } else {
            (DEPTH_BUDGET / self.peers.len().max(1)).clamp(MIN_DEPTH.min(self.depth), self.depth)
        };
        let reqs = self.picker.next_requests(k, depth, now, &mut self.rng);
        let Some(c) = self.peers.get_mut(&k) else { return };
        if want != c.interested {
            c.interested = want;
            out.push(Action::Send(k, if want { Msg::Interested } else { Msg::NotInterested }));
        }
        for b in reqs {
            out.push(Action::Send(k, Msg::Request { piece: b.piece, begin: b.begin, len: b.len }));
        }
        // Pieces just asked of the appliance's seed: claimed to every peer that speaks
        // `si_claim`, so that none asks the seed for them too.
        let new = self.picker.take_claims();
        for i in &new {
            trace!(piece = i, "started from the seed");
        }
        self.send_claims(&new, Some(k), out);
    }

    /// Claims `pieces` to every peer that speaks `si_claim` (but `except`).
    fn send_claims(&self, pieces: &[u32], except: Option<PeerKey>, out: &mut Vec<Action>) {
        for i in pieces {
            for (pk, p) in &self.peers {
                if let Some(id) = p.claim_id.filter(|_| Some(*pk) != except && !p.trusted) {
                    out.push(Action::Send(*pk, Msg::Extended { id, payload: i.to_be_bytes().to_vec() }));
                }
            }
        }
    }

    fn plan_all(&mut self, now: Instant, out: &mut Vec<Action>) {
        for k in self.picker.peer_keys() {
            self.plan(now, k, out);
        }
    }
}

/// How long to wait before dialling an address again after `fails` failures.
pub fn backoff(fails: u32) -> Duration {
    Duration::from_millis(500u64 << fails.min(6)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests;
