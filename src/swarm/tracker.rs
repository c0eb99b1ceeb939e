//! The tracker's logic, free of I/O: parse an announce from the raw query string, update the
//! swarm, pick peers, and build the bencoded answer. Time is passed in.
//!
//! Private by construction: it answers only for info-hashes the appliance registered (its own
//! archives) and only to peers whose address lies in the configured subnets. Every refusal is a
//! bencoded `failure reason` (BEP 3), never a dropped connection, so clients log why.
//!
//! Peer selection prefers peers of the requester's rack (its /24), random within it, with a
//! quarter of each list from other racks at random (so that racks larger than a list are not
//! islands), and gives a leecher mostly leechers plus a few seeds: leechers upload to each
//! other what they already have, and the appliance's seed is not everyone's first choice.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use percent_encoding::percent_decode;
use rand::seq::SliceRandom;
use serde::Serialize;

/// The info-hash type is shared with the monitor and the seal; it lives in `types`.
pub use crate::types::InfoHash;

/// A 20-byte peer id.
pub type PeerId = [u8; 20];

/// The announce `event` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// First announce.
    Started,
    /// The download finished.
    Completed,
    /// The peer leaves.
    Stopped,
    /// A regular re-announce.
    None,
}

/// Why an announce or scrape is refused; its Display is the bencoded `failure reason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A required key is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A key's value cannot be parsed.
    #[error("bad {key}: {why}")]
    Bad {
        /// The key.
        key: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// The info-hash is not one of the appliance's archives.
    #[error("unknown info_hash {0} (this private tracker serves only the appliance's images)")]
    UnknownTorrent(InfoHash),
    /// The peer's address is outside the provisioning subnets.
    #[error("address {0} is outside the provisioning subnets")]
    Foreign(Ipv4Addr),
    /// The address already holds [`MAX_PEERS_PER_IP`] entries in this swarm (one node runs one
    /// client; a host announcing from thousands of ports is flooding).
    #[error("address {0} already has {MAX_PEERS_PER_IP} peers in this swarm")]
    TooManyFromAddress(Ipv4Addr),
    /// The swarm holds `max_peers` entries.
    #[error("the swarm is full ({0} peers)")]
    SwarmFull(usize),
}

/// Entries one address may hold in one swarm.
pub const MAX_PEERS_PER_IP: usize = 4;

/// A parsed announce (BEP 3 keys; `ip` from the connection, never from the query).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announce {
    /// Torrent.
    pub info_hash: InfoHash,
    /// Peer id.
    pub peer_id: PeerId,
    /// The peer's address and listen port.
    pub addr: SocketAddrV4,
    /// Bytes uploaded so far.
    pub uploaded: u64,
    /// Bytes downloaded so far.
    pub downloaded: u64,
    /// Bytes left (0 = seed).
    pub left: u64,
    /// Event.
    pub event: Event,
    /// Peers wanted, already capped.
    pub numwant: usize,
}

/// Most peers handed out in one answer, whatever `numwant` says.
pub const MAX_NUMWANT: usize = 80;
/// Peers handed out when `numwant` is absent.
pub const DEFAULT_NUMWANT: usize = 50;

/// Splits a raw query string into (key, raw value) pairs. Values stay percent-encoded: the
/// info-hash and peer id are raw bytes, not UTF-8, so no string decoding happens here.
fn pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split('&').filter(|s| !s.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

fn bytes20(raw: &str, key: &'static str) -> Result<[u8; 20], Refusal> {
    let v: Vec<u8> = percent_decode(raw.as_bytes()).collect();
    v.try_into().map_err(|_| Refusal::Bad { key, why: "must be 20 bytes" })
}

fn number(raw: &str, key: &'static str) -> Result<u64, Refusal> {
    raw.parse().map_err(|_| Refusal::Bad { key, why: "not a non-negative integer" })
}

impl Announce {
    /// Parses an announce query as sent by BitTorrent clients (`info_hash` and `peer_id`
    /// percent-encoded raw bytes), with the peer's address from the connection.
    ///
    /// # Errors
    /// A [`Refusal`] naming the missing or bad key.
    pub fn parse(query: &str, remote: Ipv4Addr) -> Result<Announce, Refusal> {
        let (mut ih, mut pid, mut port) = (None, None, None);
        let (mut up, mut down, mut left) = (None, None, None);
        let (mut event, mut numwant) = (Event::None, DEFAULT_NUMWANT);
        for (k, v) in pairs(query) {
            match k {
                "info_hash" => ih = Some(InfoHash(bytes20(v, "info_hash")?)),
                "peer_id" => pid = Some(bytes20(v, "peer_id")?),
                "port" => {
                    let p = number(v, "port")?;
                    if p == 0 || p > u16::MAX as u64 {
                        return Err(Refusal::Bad { key: "port", why: "must be 1..=65535" });
                    }
                    port = Some(p as u16);
                }
                "uploaded" => up = Some(number(v, "uploaded")?),
                "downloaded" => down = Some(number(v, "downloaded")?),
                "left" => left = Some(number(v, "left")?),
                "numwant" => {
                    // Huge values are capped, not refused: clients ask 200 or more by habit.
                    numwant = v.parse::<u64>().map_or(DEFAULT_NUMWANT, |n| n.min(MAX_NUMWANT as u64) as usize)
                }
                "event" => {
                    event = match v {
                        "started" => Event::Started,
                        "completed" => Event::Completed,
                        "stopped" => Event::Stopped,
                        "" | "empty" => Event::None,
                        _ => return Err(Refusal::Bad { key: "event", why: "not started/completed/stopped" }),
                    }
                }
                _ => {}
            }
        }
        Ok(Announce {
            info_hash: ih.ok_or(Refusal::Missing("info_hash"))?,
            peer_id: pid.ok_or(Refusal::Missing("peer_id"))?,
            addr: SocketAddrV4::new(remote, port.ok_or(Refusal::Missing("port"))?),
            uploaded: up.unwrap_or(0),
            downloaded: down.unwrap_or(0),
            left: left.ok_or(Refusal::Missing("left"))?,
            event,
            numwant,
        })
    }
}

/// Parses the info-hashes of a scrape query (zero or more `info_hash` keys).
///
/// # Errors
/// A bad info-hash.
pub fn parse_scrape(query: &str) -> Result<Vec<InfoHash>, Refusal> {
    pairs(query)
        .filter(|(k, _)| *k == "info_hash")
        .map(|(_, v)| bytes20(v, "info_hash").map(InfoHash))
        .collect()
}

/// What the tracker knows of one peer.
#[derive(Clone, Debug, Serialize)]
pub struct PeerState {
    /// Address and listen port.
    pub addr: SocketAddrV4,
    /// Bytes uploaded, as last reported.
    pub uploaded: u64,
    /// Bytes downloaded, as last reported.
    pub downloaded: u64,
    /// Bytes left, as last reported.
    pub left: u64,
    /// Seconds since the first announce of this peer, when it reported `left == 0` first.
    pub completed_after: Option<f64>,
    /// Whether its first announce had bytes left (a node that came to install, not a seed).
    #[serde(skip)]
    joined_downloading: bool,
    #[serde(skip)]
    first_seen: Instant,
    #[serde(skip)]
    last_seen: Instant,
}

/// One torrent's swarm.
#[derive(Debug, Default)]
struct Swarm {
    peers: HashMap<PeerId, PeerState>,
    /// Count of `completed` transitions seen (scrape's `downloaded`).
    completions: u64,
    /// Addresses of the nodes that ever reported `left == 0` (one node, one address): they
    /// stay counted after they stop seeding and time out of `peers`.
    completed_nodes: HashSet<Ipv4Addr>,
    /// When silent peers were last dropped (at most once per [`SWEEP_EVERY`], not per announce).
    last_sweep: Option<Instant>,
    /// The ring ([`AnnounceReply::ring`]): kept sorted as nodes join, rebuilt (a sort) only
    /// after one left, when next needed.
    ring: Vec<Ipv4Addr>,
    ring_stale: bool,
}

/// How often a swarm drops its silent peers: a silent peer leaves within `peer_timeout` plus this.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Tracker settings.
#[derive(Clone, Debug)]
pub struct TrackerPolicy {
    /// Subnets whose peers are answered.
    pub subnets: Vec<Ipv4Net>,
    /// Re-announce interval handed out (LAN: short, so joins and completions spread fast).
    pub interval: Duration,
    /// A peer silent for this long is dropped from the swarm.
    pub peer_timeout: Duration,
    /// The appliance's own seed (as registered by the appliance), for `seed_peers`.
    pub appliance_seed: Option<SocketAddrV4>,
    /// How many leechers get the appliance's seed in their peer lists: the first ones to join
    /// (plus any leecher that made no progress since its previous announce, and a leecher with no
    /// other peer). 0 = every leecher. The others get the archive from each other, so the seed
    /// sends fewer duplicate pieces.
    pub seed_peers: usize,
    /// For this long after its first announce, a leecher gets only seeds (and is told to announce
    /// again when it ends), so that peers meet in lists drawn from the whole swarm: without it
    /// the first leechers to join get lists of each other only, fill their connections with
    /// each other, and stay a cluster the rest reaches through few connections (simulated at
    /// N = 250 × 2.7 GB on 1 GbE: the first fifth finished last, 1.22 × T* against 1.16 for the
    /// median; with 1 s every node finished at 1.15, SCALE.md stop 47). It costs nothing while
    /// the seed's first pieces are not whole anyway (N × piece / C). Applied only when
    /// `expected_nodes` is more than one peer list holds (the requester's `numwant` + itself):
    /// a smaller swarm meets at once, and one of unknown size may be small. Zero: off.
    pub join_delay: Duration,
    /// Nodes of the deployment (`swarm.expected_nodes`; 0 = unknown).
    pub expected_nodes: usize,
    /// Most peers one swarm holds; a new peer beyond is refused (announces of known peers still
    /// work). Bounds the tracker's memory and the work per announce under a flood.
    pub max_peers: usize,
}

impl Default for TrackerPolicy {
    fn default() -> Self {
        TrackerPolicy {
            subnets: Vec::new(),
            interval: Duration::from_secs(15),
            peer_timeout: Duration::from_secs(60),
            appliance_seed: None,
            seed_peers: 0,
            join_delay: Duration::ZERO,
            expected_nodes: 0,
            max_peers: DEFAULT_MAX_PEERS,
        }
    }
}

/// Default [`TrackerPolicy::max_peers`]: room for several racks of nodes.
pub const DEFAULT_MAX_PEERS: usize = 16_384;

/// The answer to a successful announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceReply {
    /// Re-announce interval.
    pub interval: Duration,
    /// Seeds in the swarm.
    pub complete: usize,
    /// Leechers in the swarm.
    pub incomplete: usize,
    /// Peers for the requester (never itself).
    pub peers: Vec<SocketAddrV4>,
    /// Every node that joined the swarm downloading, by address, ascending (`x-si-ring`, our
    /// own key; other clients ignore it): sent to a downloading requester only when the swarm
    /// has more such nodes than it asked peers for, so that nodes that cannot all connect to
    /// each other still agree on how the seed's pieces are shared out (see the engine's
    /// picker). Empty otherwise; at most [`MAX_RING`].
    pub ring: Vec<Ipv4Addr>,
}

/// Most addresses in [`AnnounceReply::ring`] (16 KiB of the answer).
pub const MAX_RING: usize = 4096;

/// Per-torrent counts for scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ScrapeStats {
    /// Seeds.
    pub complete: usize,
    /// Completed downloads seen.
    pub downloaded: u64,
    /// Leechers.
    pub incomplete: usize,
}

/// The tracker's state: registered torrents and their swarms.
#[derive(Debug)]
pub struct Tracker {
    policy: TrackerPolicy,
    swarms: HashMap<InfoHash, Swarm>,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(policy: TrackerPolicy) -> Tracker {
        Tracker { policy, swarms: HashMap::new() }
    }

    /// Starts serving `ih` (one of the appliance's archives).
    pub fn register(&mut self, ih: InfoHash) {
        self.swarms.entry(ih).or_default();
    }

    /// Stops serving `ih` and forgets its swarm.
    pub fn unregister(&mut self, ih: &InfoHash) {
        self.swarms.remove(ih);
    }

    /// Handles an announce at `now`.
    ///
    /// # Errors
    /// [`Refusal::UnknownTorrent`] or [`Refusal::Foreign`].
    pub fn announce<R: rand::Rng>(&mut self, a: &Announce, now: Instant, rng: &mut R) -> Result<AnnounceReply, Refusal> {
        let ip = *a.addr.ip();
        if !self.policy.subnets.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::Foreign(ip));
        }
        let timeout = self.policy.peer_timeout;
        let swarm = self.swarms.get_mut(&a.info_hash).ok_or(Refusal::UnknownTorrent(a.info_hash))?;
        // Silent peers leave (a pass over the swarm at most once a second, not per announce);
        // so does an older peer id at the same address and port, looked for only when the peer id
        // is new: that node restarted (a new process, a new peer id) and its old entry would never
        // complete.
        if swarm.last_sweep.is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY) {
            swarm.last_sweep = Some(now);
            let before = swarm.peers.len();
            swarm.peers.retain(|_, p| now.saturating_duration_since(p.last_seen) < timeout);
            swarm.ring_stale |= swarm.peers.len() != before;
        }
        if !swarm.peers.contains_key(&a.peer_id) {
            let before = swarm.peers.len();
            swarm.peers.retain(|id, p| *id == a.peer_id || p.addr != a.addr);
            swarm.ring_stale |= swarm.peers.len() != before;
        }
        // No progress since the previous announce of this peer: it may be starving.
        let stalled = swarm.peers.get(&a.peer_id).is_some_and(|p| a.left > 0 && a.left >= p.left);
        if a.event == Event::Stopped {
            swarm.ring_stale |= swarm.peers.remove(&a.peer_id).is_some();
        } else {
            if !swarm.peers.contains_key(&a.peer_id) {
                // A new entry: an address may hold a few, a swarm a bounded number.
                if swarm.peers.values().filter(|p| *p.addr.ip() == ip).count() >= MAX_PEERS_PER_IP {
                    return Err(Refusal::TooManyFromAddress(ip));
                }
                if swarm.peers.len() >= self.policy.max_peers {
                    return Err(Refusal::SwarmFull(swarm.peers.len()));
                }
                if a.left > 0 && !swarm.ring_stale {
                    if let Err(at) = swarm.ring.binary_search(&ip) {
                        swarm.ring.insert(at, ip);
                    }
                }
            }
            let p = swarm.peers.entry(a.peer_id).or_insert_with(|| PeerState {
                joined_downloading: a.left > 0,
                addr: a.addr,
                uploaded: 0,
                downloaded: 0,
                left: a.left,
                completed_after: None,
                first_seen: now,
                last_seen: now,
            });
            // Clients rarely send `completed` (rqbit never does): a drop of `left` to 0 counts.
            if a.left == 0 && p.completed_after.is_none() {
                if p.left > 0 || a.event == Event::Completed {
                    swarm.completions += 1;
                }
                p.completed_after = Some(now.duration_since(p.first_seen).as_secs_f64());
            }
            if a.left == 0 {
                swarm.completed_nodes.insert(ip);
            }
            swarm.ring_stale |= p.joined_downloading && p.addr.ip() != a.addr.ip();
            p.addr = a.addr;
            p.uploaded = a.uploaded;
            p.downloaded = a.downloaded;
            p.left = a.left;
            p.last_seen = now;
        }
        let (complete, incomplete) = counts(swarm);
        let mut peers = pick_peers(swarm, a, self.policy.appliance_seed, rng);
        let mut interval = self.policy.interval;
        if let Some(me) = swarm.peers.get(&a.peer_id) {
            let age = now.duration_since(me.first_seen);
            // Only a swarm larger than one peer list has clusters to avoid.
            let large = self.policy.expected_nodes > a.numwant.saturating_add(1);
            if a.left > 0 && age < self.policy.join_delay && large {
                let seeds: Vec<SocketAddrV4> =
                    swarm.peers.values().filter(|p| p.left == 0 && p.addr != a.addr).map(|p| p.addr).collect();
                peers.retain(|p| seeds.contains(p));
                interval = interval.min((self.policy.join_delay - age).max(Duration::from_secs(1)));
            }
        }
        if let (Some(seed), n @ 1..) = (self.policy.appliance_seed, self.policy.seed_peers) {
            if a.left > 0 && !stalled && peers.iter().any(|p| *p != seed) && !among_first(swarm, a, seed, n) {
                peers.retain(|p| *p != seed);
            }
        }
        let mut ring = Vec::new();
        if a.left > 0 && a.event != Event::Stopped {
            if swarm.ring_stale {
                let mut r: Vec<Ipv4Addr> = swarm.peers.values().filter(|p| p.joined_downloading).map(|p| *p.addr.ip()).collect();
                r.sort_unstable();
                r.dedup();
                swarm.ring = r;
                swarm.ring_stale = false;
            }
            if swarm.ring.len() > a.numwant {
                ring.extend(swarm.ring.iter().take(MAX_RING));
            }
        }
        Ok(AnnounceReply { interval, complete, incomplete, peers, ring })
    }

    /// Scrape counts for `hashes` (all registered torrents when empty); unknown ones are left out.
    pub fn scrape(&self, hashes: &[InfoHash]) -> Vec<(InfoHash, ScrapeStats)> {
        let mut out: Vec<(InfoHash, ScrapeStats)> = self
            .swarms
            .iter()
            .filter(|(ih, _)| hashes.is_empty() || hashes.contains(ih))
            .map(|(ih, s)| {
                let (complete, incomplete) = counts(s);
                (*ih, ScrapeStats { complete, incomplete, downloaded: s.completions })
            })
            .collect();
        out.sort_by_key(|(ih, _)| *ih);
        out
    }

    /// The peers of one torrent, as the tracker last heard of them (for the monitor).
    pub fn peers(&self, ih: &InfoHash) -> Vec<PeerState> {
        let mut v: Vec<PeerState> = self.swarms.get(ih).map(|s| s.peers.values().cloned().collect()).unwrap_or_default();
        v.sort_by_key(|p| p.addr);
        v
    }

    /// The addresses of every node that reported `left == 0` for `ih` since the appliance started
    /// (sorted), including those no longer announcing.
    pub fn completed_nodes(&self, ih: &InfoHash) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self.swarms.get(ih).map(|s| s.completed_nodes.iter().copied().collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// Whether `peer` is listed in `ih`'s swarm as a seed (`left == 0`); a map lookup, for every
    /// announce.
    pub fn is_seed(&self, ih: &InfoHash, peer: &PeerId) -> bool {
        self.swarms.get(ih).and_then(|s| s.peers.get(peer)).is_some_and(|p| p.left == 0)
    }

    /// Whether the address may use the tracker (for scrape).
    pub fn allows(&self, ip: Ipv4Addr) -> bool {
        self.policy.subnets.iter().any(|n| n.contains(&ip))
    }
}

fn counts(s: &Swarm) -> (usize, usize) {
    let seeds = s.peers.values().filter(|p| p.left == 0).count();
    (seeds, s.peers.len() - seeds)
}

/// Whether the announcing peer is among the first `n` peers (other than the appliance's seed)
/// to have joined the swarm.
fn among_first(swarm: &Swarm, a: &Announce, seed: SocketAddrV4, n: usize) -> bool {
    let Some(me) = swarm.peers.get(&a.peer_id) else { return false };
    let earlier = swarm
        .peers
        .iter()
        .filter(|(id, p)| p.addr != seed && **id != a.peer_id && (p.first_seen, p.addr) < (me.first_seen, me.addr))
        .count();
    earlier < n
}

/// The leading bits two addresses of one rack share: a /24 is one rack (one switch).
pub const RACK_BITS: u32 = 24;

/// Common leading bits of two addresses, at most [`RACK_BITS`]: peers of one rack are all
/// equally close. (Counted further, every node got the peers whose last octet is nearest its
/// own: with 80 peers of 128 in one rack, blocks of 64 addresses connected among themselves.
/// In the simulator at N = 128 / 3 Mbit/s, random within the rack: 281.8 s against 284.3 s;
/// SCALE.md, stop 45.)
fn closeness(a: Ipv4Addr, b: Ipv4Addr) -> u32 {
    (u32::from(a) ^ u32::from(b)).leading_zeros().min(RACK_BITS)
}

/// `k` leechers for `me`: at least a quarter of them (and all that its own rack cannot fill)
/// from other racks, at random, the rest from its own rack (random within it). With lists of
/// the own rack alone, a rack holding more nodes than a list was joined to the others only
/// by the lists its first nodes got before their rack filled (join order), or by nothing.
fn mixed<R: rand::Rng>(v: Vec<SocketAddrV4>, me: Ipv4Addr, k: usize, rng: &mut R) -> Vec<SocketAddrV4> {
    let (near, mut far): (Vec<SocketAddrV4>, Vec<SocketAddrV4>) = v.into_iter().partition(|p| closeness(me, *p.ip()) >= RACK_BITS);
    let k = k.min(near.len() + far.len());
    let n_far = (k / 4).max(k.saturating_sub(near.len())).min(far.len());
    let mut out = closest(near, me, k - n_far, rng);
    let (sample, _) = far.partial_shuffle(rng, n_far);
    out.extend_from_slice(sample);
    out
}

/// Picks up to `numwant` peers for the requester: leechers of its rack and of others
/// ([`mixed`]). A seed gets only leechers. A leecher gets leechers first and at most a quarter of
/// its list in seeds (at least one, so it can always make progress), the appliance's own seed
/// first among them: seeds announced by others (a node that finished, or a host that lies
/// about `left`) never push it out.
fn pick_peers<R: rand::Rng>(swarm: &Swarm, a: &Announce, appliance: Option<SocketAddrV4>, rng: &mut R) -> Vec<SocketAddrV4> {
    let me = *a.addr.ip();
    let mut seeds = Vec::new();
    let mut leechers = Vec::new();
    for (id, p) in &swarm.peers {
        if *id == a.peer_id || p.addr == a.addr {
            continue;
        }
        if p.left == 0 { seeds.push(p.addr) } else { leechers.push(p.addr) }
    }
    let want = a.numwant;
    if a.left == 0 {
        return mixed(leechers, me, want, rng);
    }
    // The appliance's seed first among the seeds, then the closest others.
    let ap = appliance.and_then(|ap| seeds.iter().position(|p| *p == ap)).map(|i| seeds.swap_remove(i));
    let seed_quota = (want / 4).max(1).min(seeds.len() + usize::from(ap.is_some()));
    let take_leechers = leechers.len().min(want - seed_quota.min(want));
    let mut out = mixed(leechers, me, take_leechers, rng);
    let room = want - out.len();
    out.extend(ap.into_iter().chain(closest(seeds, me, room, rng)).take(room));
    out
}


/// The `k` addresses of `v` closest to `me` (longest common prefix), closest first and in random
/// order within equal closeness: the first `k` of a shuffle stably sorted by closeness, in O(len)
/// with O(k) random draws (an announce at 5000 peers must not sort 5000 addresses).
fn closest<R: rand::Rng>(v: Vec<SocketAddrV4>, me: Ipv4Addr, k: usize, rng: &mut R) -> Vec<SocketAddrV4> {
    if k == 0 {
        return Vec::new();
    }
    // Peers per closeness (0..=32 common bits) and the closeness at which the k-th one falls.
    let mut per = [0usize; 33];
    for p in &v {
        per[closeness(me, *p.ip()) as usize] += 1;
    }
    let (mut cut, mut above) = (0usize, 0usize);
    for c in (0..=32).rev() {
        if above + per[c] >= k {
            cut = c;
            break;
        }
        above += per[c];
    }
    // All peers closer than the cut, and a random sample of the cut's own bucket for the rest.
    let (mut out, mut edge): (Vec<(u32, SocketAddrV4)>, Vec<SocketAddrV4>) = (Vec::with_capacity(k), Vec::new());
    for p in v {
        let c = closeness(me, *p.ip());
        match (c as usize).cmp(&cut) {
            std::cmp::Ordering::Greater => out.push((c, p)),
            std::cmp::Ordering::Equal => edge.push(p),
            std::cmp::Ordering::Less => {}
        }
    }
    out.shuffle(rng);
    out.sort_by_key(|(c, _)| std::cmp::Reverse(*c));
    let room = k.saturating_sub(out.len()).min(edge.len());
    let (sample, _) = edge.partial_shuffle(rng, room);
    out.into_iter().map(|(_, p)| p).chain(sample.iter().copied()).collect()
}

impl Event {
    /// The query value (`None`: the key is left out).
    pub fn as_query(self) -> Option<&'static str> {
        match self {
            Event::Started => Some("started"),
            Event::Completed => Some("completed"),
            Event::Stopped => Some("stopped"),
            Event::None => None,
        }
    }
}

impl Announce {
    /// The query string a client sends (`/announce?` + this): the inverse of
    /// [`Announce::parse`] (the address is the connection's; only its port is sent), compact
    /// peers asked for.
    pub fn to_query(&self) -> String {
        use percent_encoding::{NON_ALPHANUMERIC, percent_encode};
        let mut q = format!(
            "info_hash={}&peer_id={}&port={}&uploaded={}&downloaded={}&left={}&compact=1&numwant={}",
            percent_encode(&self.info_hash.0, NON_ALPHANUMERIC),
            percent_encode(&self.peer_id, NON_ALPHANUMERIC),
            self.addr.port(),
            self.uploaded,
            self.downloaded,
            self.left,
            self.numwant,
        );
        if let Some(e) = self.event.as_query() {
            q.push_str("&event=");
            q.push_str(e);
        }
        q
    }
}

/// Compact peers (BEP 23): 4 address bytes and 2 port bytes (big-endian) per peer.
pub fn encode_compact(peers: &[SocketAddrV4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(peers.len() * 6);
    for p in peers {
        out.extend_from_slice(&p.ip().octets());
        out.extend_from_slice(&p.port().to_be_bytes());
    }
    out
}

/// The inverse of [`encode_compact`]; a trailing partial entry is ignored.
pub fn decode_compact(b: &[u8]) -> Vec<SocketAddrV4> {
    b.chunks_exact(6).map(|c| SocketAddrV4::new(Ipv4Addr::new(c[0], c[1], c[2], c[3]), u16::from_be_bytes([c[4], c[5]]))).collect()
}

/// Re-announce interval a client uses when an answer gives none.
pub const DEFAULT_CLIENT_INTERVAL: Duration = Duration::from_secs(30);

/// The range a client keeps the tracker's interval in: no hammering however short the answer
/// (1 s: the appliance's tracker answers a joining rack's second announces at `join_delay`, at
/// least 1 s after the first), and no silence longer than the peer timeout's scale.
pub const CLIENT_INTERVAL: std::ops::RangeInclusive<Duration> = Duration::from_secs(1)..=Duration::from_secs(300);

/// `interval` kept within [`CLIENT_INTERVAL`].
pub fn client_interval(interval: Duration) -> Duration {
    interval.clamp(*CLIENT_INTERVAL.start(), *CLIENT_INTERVAL.end())
}

/// Why an announce answer is not usable by a client.
#[derive(Debug, thiserror::Error)]
pub enum BadReply {
    /// Not the bencoded dictionary of an answer.
    #[error("tracker answer")]
    Bencode(#[from] serde_bencode::Error),
    /// The tracker refused (its `failure reason`).
    #[error("tracker refused: {0}")]
    Refused(String),
}

/// Decodes an announce answer (the client side of [`encode_reply`] and [`encode_failure`]):
/// compact peers; an absent interval is [`DEFAULT_CLIENT_INTERVAL`].
///
/// # Errors
/// [`BadReply`].
pub fn decode_reply(body: &[u8]) -> Result<AnnounceReply, BadReply> {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(rename = "failure reason")]
        failure: Option<String>,
        interval: Option<u64>,
        complete: Option<u64>,
        incomplete: Option<u64>,
        #[serde(default, with = "serde_bytes")]
        peers: Vec<u8>,
        #[serde(default, rename = "x-si-ring", with = "serde_bytes")]
        ring: Vec<u8>,
    }
    let w: Wire = serde_bencode::from_bytes(body)?;
    if let Some(f) = w.failure {
        return Err(BadReply::Refused(f));
    }
    Ok(AnnounceReply {
        interval: w.interval.map_or(DEFAULT_CLIENT_INTERVAL, Duration::from_secs),
        complete: w.complete.unwrap_or(0) as usize,
        incomplete: w.incomplete.unwrap_or(0) as usize,
        peers: decode_compact(&w.peers),
        ring: w.ring.chunks_exact(4).take(MAX_RING).map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3])).collect(),
    })
}

/// Bencoded announce answer (compact peers, BEP 23).
pub fn encode_reply(r: &AnnounceReply) -> Vec<u8> {
    #[derive(Serialize)]
    struct Wire {
        complete: u64,
        incomplete: u64,
        interval: u64,
        #[serde(rename = "min interval")]
        min_interval: u64,
        #[serde(with = "serde_bytes")]
        peers: Vec<u8>,
        #[serde(rename = "x-si-ring", with = "serde_bytes", skip_serializing_if = "Vec::is_empty")]
        ring: Vec<u8>,
    }
    let peers = encode_compact(&r.peers);
    let secs = r.interval.as_secs().max(1);
    let w = Wire {
        complete: r.complete as u64,
        incomplete: r.incomplete as u64,
        interval: secs,
        min_interval: (secs / 2).max(1),
        peers,
        ring: r.ring.iter().flat_map(|ip| ip.octets()).collect(),
    };
    // Encoding a struct of integers and bytes cannot fail.
    serde_bencode::to_bytes(&w).expect("bencoding a plain struct")
}

/// Bencoded failure (`failure reason`).
pub fn encode_failure(why: &Refusal) -> Vec<u8> {
    #[derive(Serialize)]
    struct Wire {
        #[serde(rename = "failure reason")]
        reason: String,
    }
    serde_bencode::to_bytes(&Wire { reason: why.to_string() }).expect("bencoding a plain struct")
}

/// Bencoded scrape answer.
pub fn encode_scrape(stats: &[(InfoHash, ScrapeStats)]) -> Vec<u8> {
    #[derive(Serialize)]
    struct File {
        complete: u64,
        downloaded: u64,
        incomplete: u64,
    }
    #[derive(Serialize)]
    struct Wire {
        files: std::collections::BTreeMap<serde_bytes::ByteBuf, File>,
    }
    let files = stats
        .iter()
        .map(|(ih, s)| {
            let f = File { complete: s.complete as u64, downloaded: s.downloaded, incomplete: s.incomplete as u64 };
            (serde_bytes::ByteBuf::from(ih.0.to_vec()), f)
        })
        .collect();
    serde_bencode::to_bytes(&Wire { files }).expect("bencoding a plain struct")
}

#[cfg(test)]
mod tests;
