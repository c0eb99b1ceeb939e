//! The download side's GETs (the .torrent, the manifest, `/api/swarm/<name>` and the tracker
//! announce): a thin front of [`crate::net::http_client`] with the swarm's body limit.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::net::http_client::HttpError as GetError;

/// Largest body accepted (a larger one is an error, not a cut answer).
pub const MAX_BODY: usize = 16 << 20;

/// GETs `path` from `addr` and returns the body of a 200 answer.
///
/// # Errors
/// [`GetError`]: no connection, a timeout, a malformed or too-big answer, or a status other
/// than 200 ([`crate::net::http_client::Failure::Status`]).
pub async fn get(addr: SocketAddr, path: &str, limit: Duration) -> Result<Vec<u8>, GetError> {
    crate::net::http_client::get(addr, path, MAX_BODY, limit).await
}

/// How long the download side keeps asking for the .torrent and the swarm's view when the
/// appliance does not answer: a rack of nodes asks at once, and a lost SYN alone costs 1 + 2 +
/// 4 s of retransmissions (measured: with 128 emulated nodes starting together one GET had no
/// answer within 20 s, and that node's fetch ended there).
pub const RETRY_FOR: Duration = Duration::from_secs(120);

/// Whether a failed GET is worth asking again: no connection, a timeout, a cut or garbled
/// answer, a 5xx (a 503 while the archive is being made). A 4xx or a body over the limit is final.
pub fn transient(e: &GetError) -> bool {
    use crate::net::http_client::Failure;
    match &e.failure {
        Failure::Connect(_) | Failure::Io(_) | Failure::Timeout(_) | Failure::Parse(_) => true,
        Failure::TooBig { .. } => false,
        Failure::Status { status, .. } => *status >= 500,
    }
}

/// [`get`], asked again after a transient failure ([`transient`]) with a 1 s back-off doubling
/// to 8 s, each attempt within `attempt`, for at most `wait`; `token` ends the wait.
///
/// # Errors
/// The last [`GetError`] (a final one at once; a transient one once `wait` is spent or `token`
/// is cancelled).
pub async fn get_retrying(addr: SocketAddr, path: &str, attempt: Duration, wait: Duration, token: &tokio_util::sync::CancellationToken) -> Result<Vec<u8>, GetError> {
    retrying(addr, path, attempt, wait, false, token).await
}

/// When a small answer is late, another connection is opened beside the first: after this
/// long, then twice as long again, at most [`HEDGES`] connections in all.
pub const HEDGE_AFTER: Duration = Duration::from_secs(2);
/// Most connections one hedged GET holds at once.
pub const HEDGES: usize = 3;

/// [`get_retrying`] for answers of a few KiB (the .torrent, the swarm's view): an attempt that
/// has no answer after [`HEDGE_AFTER`] gets a second connection beside it (and a third 4 s
/// later); the first complete answer wins and the others are dropped. A lost SYN or a
/// response in retransmission back-off costs 1 + 2 + 4 + 8 s on one connection: with 64
/// emulated nodes starting together behind the seed's full uplink queue, 2 nodes of 64 started
/// 21 s late that way (measured, SCALE.md), while a fresh connection got through at once. Not
/// for large answers (a manifest): a second copy would add to the load that made it late.
///
/// # Errors
/// As [`get_retrying`].
pub async fn get_retrying_hedged(addr: SocketAddr, path: &str, attempt: Duration, wait: Duration, token: &tokio_util::sync::CancellationToken) -> Result<Vec<u8>, GetError> {
    retrying(addr, path, attempt, wait, true, token).await
}

async fn retrying(addr: SocketAddr, path: &str, attempt: Duration, wait: Duration, hedge: bool, token: &tokio_util::sync::CancellationToken) -> Result<Vec<u8>, GetError> {
    let t0 = tokio::time::Instant::now();
    let mut pause = Duration::from_secs(1);
    loop {
        let tried = if hedge { hedged(addr, path, attempt).await } else { get(addr, path, attempt).await };
        let e = match tried {
            Ok(b) => return Ok(b),
            Err(e) => e,
        };
        if !transient(&e) || t0.elapsed() + pause >= wait {
            return Err(e);
        }
        tracing::warn!(error = %e, retry_in = ?pause, "the appliance did not answer; asking again");
        tokio::select! {
            // CANCEL-SAFETY: a sleep and a cancellation carry no state.
            () = tokio::time::sleep(pause) => {}
            () = token.cancelled() => return Err(e),
        }
        pause = (pause * 2).min(Duration::from_secs(8));
    }
}

/// One attempt on up to [`HEDGES`] connections started [`HEDGE_AFTER`], then twice that, … apart: the
/// first answer wins; a final error ends it at once; when every started connection failed
/// transiently, the last error (the caller backs off). The others are aborted when it returns.
async fn hedged(addr: SocketAddr, path: &str, limit: Duration) -> Result<Vec<u8>, GetError> {
    let mut set = tokio::task::JoinSet::new();
    let mut started = 0;
    let mut gap = HEDGE_AFTER;
    let mut next = tokio::time::Instant::now();
    loop {
        if started < HEDGES && tokio::time::Instant::now() >= next {
            let p = path.to_owned();
            set.spawn(async move { get(addr, &p, limit).await });
            if started > 0 {
                tracing::debug!(path, connections = started + 1, "no answer yet: asking on another connection too");
            }
            started += 1;
            next = tokio::time::Instant::now() + gap;
            gap *= 2;
        }
        tokio::select! {
            // CANCEL-SAFETY: join_next only takes a finished task's result; a sleep has no state.
            Some(done) = set.join_next() => match done {
                Ok(Ok(body)) => return Ok(body),
                Ok(Err(e)) if !transient(&e) || set.is_empty() => return Err(e),
                Ok(Err(_)) => {}
                // A GET does not panic; were it to, the other connections still decide.
                Err(_) if !set.is_empty() => {}
                Err(j) => return Err(GetError { method: "GET", addr, path: path.to_owned(), failure: crate::net::http_client::Failure::Io(std::io::Error::other(j.to_string())) }),
            },
            () = tokio::time::sleep_until(next), if started < HEDGES => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server that takes the first connection and never answers it, and answers the next:
    /// the hedged GET gets the body from the second connection after [`HEDGE_AFTER`], long
    /// before the attempt's limit; the plain GET waits for the limit.
    #[tokio::test]
    async fn a_late_answer_is_asked_on_another_connection_too() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            for i in 0..3 {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                if i == 1 {
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
                } else {
                    held.push(s);
                }
            }
            held
        });
        let t = tokio_util::sync::CancellationToken::new();
        let t0 = std::time::Instant::now();
        let body = get_retrying_hedged(addr, "/torrents/x.torrent", Duration::from_secs(20), RETRY_FOR, &t).await.unwrap();
        assert_eq!(body, b"ok");
        let took = t0.elapsed();
        assert!(took >= HEDGE_AFTER && took < HEDGE_AFTER + Duration::from_secs(2), "answered after {took:?}");
        // The plain GET has no second connection: the held one runs into its limit.
        let e = get(addr, "/y", Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e.failure, crate::net::http_client::Failure::Timeout(_)), "{e}");
        drop(server.await.unwrap());
    }

    /// A server that cuts the first two connections and answers the third: the GET gets the
    /// body; a 404 is final at once; nothing listening gives up when the wait is spent.
    #[tokio::test]
    async fn transient_failures_are_asked_again_and_a_4xx_is_final() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for i in 0..4 {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                match i {
                    0 | 1 => drop(s),
                    2 => s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap(),
                    _ => s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnone").await.unwrap(),
                }
            }
        });
        let t = tokio_util::sync::CancellationToken::new();
        let t0 = std::time::Instant::now();
        assert_eq!(get_retrying(addr, "/torrents/x.torrent", Duration::from_secs(5), RETRY_FOR, &t).await.unwrap(), b"ok");
        assert!(t0.elapsed() >= Duration::from_secs(3), "backed off 1 s then 2 s: {:?}", t0.elapsed());
        let t1 = std::time::Instant::now();
        let e = get_retrying(addr, "/torrents/y.torrent", Duration::from_secs(5), RETRY_FOR, &t).await.unwrap_err();
        assert_eq!(e.status(), Some(404));
        assert!(t1.elapsed() < Duration::from_secs(1), "a 4xx is not asked again");
        server.await.unwrap();
        // Nobody listens any more: refused connections are retried until the wait is spent.
        let t2 = std::time::Instant::now();
        let e = get_retrying(addr, "/x", Duration::from_secs(5), Duration::from_secs(2), &t).await.unwrap_err();
        assert!(transient(&e) && t2.elapsed() < Duration::from_secs(3), "{e} after {:?}", t2.elapsed());
    }
}
