//! The appliance's HTTP server loop (hyper, HTTP/1.1) with the limits a shared segment needs,
//! which `axum::serve` does not offer: a header-read timeout (a connection that sends no
//! complete request head within `http.header_timeout` is closed, so idle or half-open
//! connections cannot pile up), a cap on open connections (`http.max_connections`: beyond it a
//! new connection is closed at once and counted), and accept errors (EMFILE, ENFILE, ENOBUFS)
//! that are logged, at most once every 10 s, and retried after a pause, never the end of the
//! server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// `[http]` limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once, at most.
    pub max_connections: usize,
    /// Time a client has to send a request's head.
    pub header_timeout: Duration,
}

/// How long a closing connection may take to finish its response at shutdown.
const DRAIN: Duration = Duration::from_secs(5);
/// Between two warnings about refused connections or accept errors.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, router: axum::Router, limits: Limits, shutdown: CancellationToken) {
    let conns = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut make = router.into_make_service_with_connect_info::<SocketAddr>();
    let (mut refused, mut accept_errors) = (0u64, 0u64);
    let mut last_warn: Option<Instant> = None;
    let local = listener.local_addr().ok();
    let mut warn_now = |what: &str, n: u64| {
        if last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            last_warn = Some(Instant::now());
            warn!(listen = ?local, count = n, max = limits.max_connections, "http: {what}");
        }
    };
    loop {
        let (stream, peer) = tokio::select! {
            // CANCEL-SAFETY: TcpListener::accept is cancel-safe; a cancelled accept loses nothing.
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    accept_errors += 1;
                    warn_now(&format!("accept failed ({e}); retrying"), accept_errors);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            refused += 1;
            warn_now("connection limit reached: new connections are closed", refused);
            drop(stream);
            continue;
        };
        let svc = match tower::Service::call(&mut make, peer).await {
            Ok(s) => TowerToHyperService::new(s),
            Err(never) => match never {},
        };
        let token = shutdown.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                // CANCEL-SAFETY: on shutdown the connection is not dropped but told to finish.
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        // Debug, for the cause: hyper's Display says only "connection error".
                        debug!(%peer, "http connection: {e:?}");
                    }
                }
                _ = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    if refused > 0 || accept_errors > 0 {
        info!(listen = ?local, refused, accept_errors, "http: stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(max: usize, header_timeout: Duration) -> (SocketAddr, CancellationToken) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let r = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let t = CancellationToken::new();
        tokio::spawn(serve(l, r, Limits { max_connections: max, header_timeout }, t.clone()));
        (addr, t)
    }

    async fn get(addr: SocketAddr) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.ok()?.ok()?;
        (!out.is_empty()).then_some(out)
    }

    #[tokio::test]
    async fn idle_connections_are_closed_and_capped_while_requests_are_served() {
        let (addr, stop) = start(8, Duration::from_millis(300)).await;
        // Eight idle connections fill the cap: a ninth is closed at once.
        let mut idle = Vec::new();
        for _ in 0..8 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(get(addr).await, None, "a connection beyond the cap is closed");
        // The header timeout closes the idle ones; then requests are served again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        for mut s in idle {
            let mut b = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await.expect("closed by the server");
            assert!(n.map(|n| n == 0 || String::from_utf8_lossy(&b[..n]).contains("408")).unwrap_or(true));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = get(addr).await.expect("served after the idle ones were closed");
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok"), "{r}");
        stop.cancel();
    }
}
