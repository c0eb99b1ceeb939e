//! The tracker client: `started`, every interval the tracker gives, `completed` at once,
//! `stopped` on exit. The query and the answer go through the tracker's own codec
//! ([`Announce::to_query`], [`tracker::decode_reply`]); the peers it names join the known list
//! (dialled by the tick).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, warn};

use super::Shared;
use super::guard::MAX_CONNS;
use crate::swarm::http_get;
use crate::swarm::tracker::{self, Announce, BadReply, Event, InfoHash};

const HTTP_LIMIT: Duration = Duration::from_secs(10);

/// Why an announce failed.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The GET failed.
    #[error("announce")]
    Get(#[from] http_get::GetError),
    /// The answer is unusable or a refusal.
    #[error("announce")]
    Reply(#[from] BadReply),
}

/// Announces at start, at completion and every interval the tracker gives.
pub(super) async fn announce_loop(sh: Arc<Shared>, tracker: SocketAddr) {
    let mut event = Event::Started;
    let mut rx = sh.changes.subscribe();
    let mut was_complete = sh.lock().core.picker().complete();
    loop {
        let interval = match announce(&sh, tracker, event).await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %crate::swarm::engine::chain(&e), "announce failed");
                Duration::from_secs(5)
            }
        };
        event = Event::None;
        let deadline = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                // CANCEL-SAFETY: a sleep and a token hold nothing; `changed` only marks the
                // value seen when it returns.
                () = tokio::time::sleep_until(deadline) => break,
                () = sh.cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let now_complete = sh.lock().core.picker().complete();
            if now_complete && !was_complete {
                was_complete = true;
                event = Event::Completed;
                break;
            }
        }
    }
}

/// One announce; returns the interval to the next (the tracker's, within
/// [`tracker::CLIENT_INTERVAL`]).
pub(super) async fn announce(sh: &Shared, tracker: SocketAddr, event: Event) -> Result<Duration, AnnounceError> {
    // `downloaded` is the verified bytes (the monitor reads it as the node's progress), not the
    // raw count with endgame duplicates and failed pieces.
    let have = sh.lock().core.picker().have_bytes();
    let a = Announce {
        info_hash: InfoHash(sh.meta.info_hash),
        peer_id: sh.peer_id,
        addr: SocketAddrV4::new(sh.own.unwrap_or(Ipv4Addr::UNSPECIFIED), sh.listen_port),
        uploaded: sh.uploaded.load(Ordering::Relaxed),
        downloaded: have,
        left: sh.meta.total - have,
        event,
        numwant: MAX_CONNS,
    };
    let body = http_get::get(tracker, &format!("/announce?{}", a.to_query()), HTTP_LIMIT).await?;
    let r = tracker::decode_reply(&body)?;
    let own = sh.own.map(|ip| SocketAddrV4::new(ip, sh.listen_port));
    let added = {
        let mut g = sh.lock();
        g.core.set_ring(&r.ring);
        g.core.add_known(&r.peers, own)
    };
    debug!(?event, left = a.left, added, "announced");
    Ok(tracker::client_interval(r.interval))
}
