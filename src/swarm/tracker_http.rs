//! The tracker's HTTP face: `GET /announce` and `GET /scrape` on the appliance's HTTP server.
//! Thin: raw query + peer address in, [`tracker`](super::tracker) decides, bencoded bytes out.
//! Refusals are bencoded `failure reason`s with status 200, as BEP 3 clients expect.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tracing::{debug, info};

use super::tracker::{self, Announce, Refusal, Tracker};
use crate::types::events::{EventSink, NodeEvent};

/// Shared tracker state.
pub type SharedTracker = Arc<Mutex<Tracker>>;

/// `/announce` and `/scrape`. The server must be run with
/// `into_make_service_with_connect_info::<SocketAddr>()` (the peer's address is taken from the
/// connection, never from the query).
/// Every accepted announce is also reported to the monitor through `events` (never waits).
pub fn routes(tracker: SharedTracker, events: EventSink) -> Router {
    let announce_routes = Router::new().route("/announce", get(announce)).with_state((tracker.clone(), events));
    Router::new().route("/scrape", get(scrape)).with_state(tracker).merge(announce_routes)
}

fn bencoded(body: Vec<u8>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain")], body)
}

fn v4(addr: SocketAddr) -> Result<std::net::Ipv4Addr, Refusal> {
    match addr.ip() {
        IpAddr::V4(ip) => Ok(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped().ok_or(Refusal::Bad { key: "address", why: "IPv6 peers are not served" }),
    }
}

async fn announce(
    State((t, events)): State<(SharedTracker, EventSink)>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> impl IntoResponse {
    let result = v4(remote).and_then(|ip| Announce::parse(q.as_deref().unwrap_or(""), ip)).and_then(|a| {
        // A poisoned lock means a panic mid-update; the map is still structurally sound.
        let mut guard = t.lock().unwrap_or_else(|e| e.into_inner());
        // A lookup by peer id, not `peers()` (a copy and a sort of the whole swarm per announce).
        let before = guard.is_seed(&a.info_hash, &a.peer_id);
        let r = guard.announce(&a, Instant::now(), &mut rand::rng())?;
        drop(guard);
        if a.left == 0 && !before {
            info!(peer = %a.addr, info_hash = %a.info_hash, "peer is a seed");
        }
        debug!(peer = %a.addr, info_hash = %a.info_hash, left = a.left, event = ?a.event, peers = r.peers.len(), "announce");
        events.send(NodeEvent::Announce {
            ip: *a.addr.ip(),
            info_hash: a.info_hash,
            downloaded: a.downloaded,
            uploaded: a.uploaded,
            left: a.left,
        });
        Ok(r)
    });
    match result {
        Ok(r) => bencoded(tracker::encode_reply(&r)),
        Err(why) => {
            info!(%remote, "announce refused: {why}");
            bencoded(tracker::encode_failure(&why))
        }
    }
}

async fn scrape(
    State(t): State<SharedTracker>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
) -> impl IntoResponse {
    let result = v4(remote).and_then(|ip| {
        let guard = t.lock().unwrap_or_else(|e| e.into_inner());
        if !guard.allows(ip) {
            return Err(Refusal::Foreign(ip));
        }
        let hashes = tracker::parse_scrape(q.as_deref().unwrap_or(""))?;
        Ok(guard.scrape(&hashes))
    });
    match result {
        Ok(stats) => bencoded(tracker::encode_scrape(&stats)),
        Err(why) => {
            info!(%remote, "scrape refused: {why}");
            bencoded(tracker::encode_failure(&why))
        }
    }
}
