//! The swarm's read-only HTTP face besides the tracker: `GET /torrents/<name>.torrent` (the
//! served .torrent bytes; the name is an [`ImageName`] key, never a path) and the JSON state
//! for the monitor and the clients: `GET /api/swarm` (every torrent) and `GET /api/swarm/<name>`
//! (one torrent; `done` is the "swarm done" signal the fetchers poll to stop seeding), and
//! `GET /images/<name>.tar.zst`: the archive itself over plain HTTP (Range, HEAD), for recovery
//! and as the unicast baseline of the swarm benchmark.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tower::ServiceExt as _;
use tower_http::services::ServeFile;

use super::seed::{Seed, SeedStats, Served};
use super::tracker::PeerState;
use super::tracker_http::SharedTracker;
use crate::types::ImageName;

/// The served archives by name, shared by the routes, the seed's tracker refresh and the
/// publisher of updates.
pub type ServedMap = Arc<std::sync::RwLock<BTreeMap<ImageName, Served>>>;

/// One served archive by name (a copy: the lock is not held across I/O).
pub fn lookup(map: &ServedMap, name: &ImageName) -> Option<Served> {
    map.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
}

/// What the routes read.
pub struct SwarmApi {
    /// The served archives by name (updates are added while the appliance runs).
    pub served: ServedMap,
    /// The tracker.
    pub tracker: SharedTracker,
    /// The appliance's seed (None while it is not running).
    pub seed: Option<Arc<Seed>>,
    /// Where the seed listens (handed to clients as a fallback peer).
    pub seed_addr: SocketAddrV4,
    /// How long nodes seed at most after their download (`swarm.client_seed_limit`).
    pub client_seed_limit_secs: u64,
    /// Nodes of the deployment (`swarm.expected_nodes`; 0 = unknown).
    pub expected_nodes: u32,
    /// `swarm.seed_peers`: how many nodes the tracker gives the seed (0 = all).
    pub seed_peers: u32,
}

/// Peers listed per torrent in `/api/swarm`: the JSON stays small whatever the swarm's size
/// (nodes poll it for `done` while they seed).
pub const VIEW_PEERS: usize = 256;

/// One torrent's state as `/api/swarm` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TorrentView {
    /// Image name.
    pub name: String,
    /// Info-hash, hex.
    pub info_hash: String,
    /// Archive size in bytes.
    pub size: u64,
    /// The appliance seed's address.
    pub seed_addr: SocketAddrV4,
    /// The appliance seed's figures.
    #[serde(skip_deserializing)]
    pub seed: Option<SeedStats>,
    /// The seed's upload so far, in bytes (also inside `seed`, here for clients' convenience).
    pub seed_uploaded_bytes: u64,
    /// The other peers, as the tracker last heard of them: the first [`VIEW_PEERS`] by address
    /// (the counts below cover all of them).
    #[serde(skip_deserializing)]
    pub peers: Vec<PeerState>,
    /// How many peers there are in all (`peers` lists at most [`VIEW_PEERS`]).
    #[serde(default)]
    pub peers_total: usize,
    /// Peers (other than the appliance) that reported `left == 0`.
    pub complete: usize,
    /// Peers still downloading.
    pub incomplete: usize,
    /// Distinct node addresses (other than the appliance) that ever reported `left == 0`.
    #[serde(default)]
    pub completed_nodes: usize,
    /// Nodes of the deployment (`swarm.expected_nodes`; 0 = unknown).
    #[serde(default)]
    pub expected_nodes: u32,
    /// How many nodes the tracker gives the appliance's seed (0 = every node; then clients also
    /// take `seed_addr` as their first peer).
    #[serde(default)]
    pub seed_peers: u32,
    /// Clients may stop seeding: `expected_nodes` distinct nodes completed; with
    /// `expected_nodes == 0`, at least one peer joined and every peer the tracker knows has
    /// completed.
    pub done: bool,
    /// Seconds a node keeps seeding at most after its download, waiting for `done`.
    pub seed_limit_secs: u64,
}

/// The routes; state shared with the app.
pub fn routes(api: Arc<SwarmApi>) -> Router {
    Router::new()
        .route("/torrents/{file}", get(torrent))
        .route("/images/{file}", get(archive))
        .route("/api/swarm", get(all))
        .route("/api/swarm/{name}", get(one))
        .with_state(api)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such image\n").into_response()
}

async fn torrent(State(api): State<Arc<SwarmApi>>, Path(file): Path<String>) -> Response {
    let Some(name) = file.strip_suffix(".torrent").and_then(|n| n.parse::<ImageName>().ok()) else {
        return not_found();
    };
    match lookup(&api.served, &name) {
        Some(s) => ([(CONTENT_TYPE, "application/x-bittorrent")], s.torrent.clone()).into_response(),
        None => not_found(),
    }
}

async fn archive(State(api): State<Arc<SwarmApi>>, Path(file): Path<String>, req: Request) -> Response {
    let Some(name) = file.strip_suffix(".tar.zst").and_then(|n| n.parse::<ImageName>().ok()) else {
        return not_found();
    };
    let Some(s) = lookup(&api.served, &name) else { return not_found() };
    // The path comes from the served map (a key lookup), never from the request.
    match ServeFile::new(&s.archive).oneshot(req).await {
        Ok(resp) => resp.map(axum::body::Body::new),
        Err(never) => match never {},
    }
}

/// Builds the view of one served archive.
pub fn view(api: &SwarmApi, s: &Served) -> TorrentView {
    let (peers, completed_nodes): (Vec<PeerState>, usize) = {
        // A poisoned lock means a panic mid-update; the map is still structurally sound.
        let t = api.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let peers = t.peers(&s.info_hash).into_iter().filter(|p| p.addr != api.seed_addr).collect();
        let nodes = t.completed_nodes(&s.info_hash).into_iter().filter(|ip| ip != api.seed_addr.ip()).count();
        (peers, nodes)
    };
    let complete = peers.iter().filter(|p| p.left == 0).count();
    let expected = s.expected_nodes.unwrap_or(api.expected_nodes);
    let seed = api.seed.as_ref().and_then(|seed| seed.stats(&s.info_hash));
    TorrentView {
        name: s.name.to_string(),
        info_hash: s.info_hash.to_string(),
        size: s.size,
        seed_addr: api.seed_addr,
        seed_uploaded_bytes: seed.as_ref().map_or(0, |x| x.uploaded_bytes),
        seed,
        complete,
        incomplete: peers.len() - complete,
        done: if expected > 0 {
            completed_nodes >= expected as usize
        } else {
            // Some node finished and no one is still downloading (nodes that finished and left,
            // announcing `stopped`, still count).
            completed_nodes > 0 && complete == peers.len()
        },
        completed_nodes,
        expected_nodes: expected,
        seed_peers: api.seed_peers,
        seed_limit_secs: api.client_seed_limit_secs,
        peers_total: peers.len(),
        peers: peers.into_iter().take(VIEW_PEERS).collect(),
    }
}

async fn all(State(api): State<Arc<SwarmApi>>) -> Json<Vec<TorrentView>> {
    let all: Vec<Served> = api.served.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
    Json(all.iter().map(|s| view(&api, s)).collect())
}

async fn one(State(api): State<Arc<SwarmApi>>, Path(name): Path<String>) -> Response {
    let Ok(name) = name.parse::<ImageName>() else { return not_found() };
    match lookup(&api.served, &name) {
        Some(s) => Json(view(&api, &s)).into_response(),
        None => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::swarm::seed::seed_announce;
    use crate::swarm::tracker::{Announce, Event, InfoHash, Tracker, TrackerPolicy};

    fn api() -> (SwarmApi, Served) {
        let ih = InfoHash([3; 20]);
        let mut t = Tracker::new(TrackerPolicy { subnets: vec!["10.0.0.0/24".parse().unwrap()], ..Default::default() });
        t.register(ih);
        let s = Served { name: "img".parse().unwrap(), archive: "/x/img.tar.zst".into(), torrent: b"d4:infod".to_vec(), info_hash: ih, size: 10, expected_nodes: None };
        let seed_addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 6881);
        let mut served = BTreeMap::new();
        served.insert(s.name.clone(), s.clone());
        (SwarmApi { served: Arc::new(std::sync::RwLock::new(served)), tracker: Arc::new(Mutex::new(t)), seed: None, seed_addr, client_seed_limit_secs: 60, expected_nodes: 0, seed_peers: 0 }, s)
    }

    fn announce(api: &SwarmApi, a: &Announce) {
        api.tracker.lock().unwrap().announce(a, Instant::now(), &mut rand::rng()).unwrap();
    }

    fn peer(last: u8, left: u64) -> Announce {
        Announce {
            info_hash: InfoHash([3; 20]),
            peer_id: [last; 20],
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 6881),
            uploaded: 0,
            downloaded: 0,
            left,
            event: Event::None,
            numwant: 10,
        }
    }

    #[test]
    fn done_needs_peers_and_all_of_them_complete_and_ignores_the_seed() {
        let (api, s) = api();
        announce(&api, &seed_announce(s.info_hash, api.seed_addr));
        let v = view(&api, &s);
        assert!(!v.done && v.peers.is_empty(), "the seed alone is not a finished swarm");
        announce(&api, &peer(11, 0));
        announce(&api, &peer(12, 5));
        let v = view(&api, &s);
        assert_eq!((v.complete, v.incomplete, v.done), (1, 1, false));
        announce(&api, &peer(12, 0));
        let v = view(&api, &s);
        assert_eq!((v.complete, v.incomplete, v.done), (2, 0, true));
        // What fetch reads back parses.
        let back: TorrentView = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert!(back.done && back.seed_addr == api.seed_addr && back.seed_limit_secs == 60);
    }

    #[test]
    fn with_expected_nodes_done_waits_for_that_many_distinct_completed_nodes() {
        let (mut api, s) = api();
        api.expected_nodes = 3;
        announce(&api, &seed_announce(s.info_hash, api.seed_addr));
        announce(&api, &peer(11, 0));
        announce(&api, &peer(12, 0));
        let v = view(&api, &s);
        assert_eq!((v.completed_nodes, v.done), (2, false), "every peer heard of is complete, but only 2 of 3 nodes");
        // The same node again (a restarted process, a new peer id) is not a new node.
        let mut again = peer(12, 0);
        again.peer_id = [99; 20];
        announce(&api, &again);
        assert!(!view(&api, &s).done);
        announce(&api, &peer(13, 7));
        assert!(!view(&api, &s).done);
        announce(&api, &peer(13, 0));
        let v = view(&api, &s);
        assert_eq!((v.completed_nodes, v.expected_nodes, v.done), (3, 3, true));
    }

    /// Issue 13: `/api/swarm/<name>` listed every peer; a flooded swarm made every node's poll
    /// for `done` a multi-megabyte answer. Now at most VIEW_PEERS, with the total and the counts
    /// over all of them.
    #[test]
    fn the_view_lists_a_bounded_number_of_peers_and_counts_all() {
        let (mut api, s) = api();
        let mut t = Tracker::new(TrackerPolicy { subnets: vec!["10.0.0.0/16".parse().unwrap()], ..Default::default() });
        t.register(s.info_hash);
        api.tracker = Arc::new(Mutex::new(t));
        for n in 0..1000u32 {
            let mut a = peer(0, u64::from(n % 2));
            a.addr = SocketAddrV4::new(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 8, 0)) + n), 6881);
            a.peer_id[..4].copy_from_slice(&n.to_be_bytes());
            announce(&api, &a);
        }
        let v = view(&api, &s);
        assert_eq!((v.peers.len(), v.peers_total, v.complete, v.incomplete), (VIEW_PEERS, 1000, 500, 500));
        assert!(serde_json::to_vec(&v).unwrap().len() < 64 << 10);
    }
}
