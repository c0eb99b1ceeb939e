//! HTTP boot routes: `GET /boot/<key>` for every [`BootFile`] (node iPXE scripts, the chain
//! script, kernel, initrd, boot loaders, syslinux modules, pxelinux configs). The path is
//! percent-decoded by axum, then parsed as a key; anything that is not a key is a 404, so
//! `/boot/../..` and `/boot/%2e%2e/...` never reach the file system. Files on disk are served by
//! tower-http's `ServeFile` on the resolved path (Range requests, HEAD, conditional GET);
//! rendered files are plain text. The only file of this module that imports axum.
//!
//! With `boot.peer_serve`, a kernel or initrd request is answered with a 302 to a node that
//! serves verified copies when [`crate::boot::peers`] finds one with a free slot (`?direct=1`
//! always gets the appliance's bytes), `GET /boot/digests` publishes size and SHA-256 of both,
//! and nodes announce themselves with `POST /api/nodes/<mac>/boot-peer` (their token, from the
//! address they serve on).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceExt as _;
use tower_http::services::ServeFile;
use tracing::{debug, info, warn};

use crate::boot::BootContext;
use crate::boot::file::{self, BootFile, Source};
use crate::boot::peers::Decision;
use crate::types::MacAddr;

/// The routes; see the module docs.
pub(crate) fn routes(ctx: Arc<BootContext>) -> Router {
    Router::new()
        .route("/boot/digests", get(digests))
        .route("/boot/fetched", get(fetched))
        .route("/boot/{*name}", get(boot_file))
        .route("/api/nodes/{mac}/boot-peer", post(boot_peer).layer(axum::extract::DefaultBodyLimit::max(4096)))
        .with_state(ctx)
}

/// `GET /boot/digests`: [`crate::types::node_api::BootDigests`] as JSON.
async fn digests(State(ctx): State<Arc<BootContext>>) -> Response {
    match tokio::task::spawn_blocking(move || ctx.digests()).await {
        Ok(Ok(d)) => axum::Json(d).into_response(),
        Ok(Err(e)) => {
            warn!("http: boot digests: {e:#}");
            (StatusCode::SERVICE_UNAVAILABLE, "boot files unreadable\n").into_response()
        }
        Err(e) => {
            warn!("http: boot digests task failed: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// `GET /boot/fetched?mac=<mac>`: the node script's last request before it boots (it holds both
/// files, checked). The slot the asking address held at a peer frees at once instead of at the
/// hold's deadline. Only the asker's own hold ends (by its address, as every boot request is
/// counted), so it needs no token; always 200, also without peer-served boot files.
async fn fetched(State(ctx): State<Arc<BootContext>>, connect: Option<axum::Extension<ConnectInfo<SocketAddr>>>, axum::extract::RawQuery(q): axum::extract::RawQuery) -> Response {
    let ip = connect.as_ref().and_then(|c| crate::types::addrs::v4(c.0.0));
    if let (Some(peers), Some(ip)) = (&ctx.peers, ip) {
        let mac = mac_from_query(q.as_deref()).map(tracing::field::display);
        let freed = peers.lock().fetched(ip);
        if let Some(peer) = freed {
            debug!(client = %ip, mac, %peer, "http: the node has its boot files: its slot at the peer is free");
        }
        peers.changed.notify_waiters();
    }
    (StatusCode::OK, "ok\n").into_response()
}

/// `POST /api/nodes/<mac>/boot-peer`: a node serves, stops, or reports a bad peer. Needs the
/// node's token and, when our DHCP leases, the node's own address.
async fn boot_peer(
    State(ctx): State<Arc<BootContext>>,
    Path(mac): Path<String>,
    connect: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::types::node_api::{AuthError, BootPeerNote, authorize};
    let ip = connect.as_ref().and_then(|c| crate::types::addrs::v4(c.0.0));
    let refuse = |code: StatusCode, why: String| {
        warn!(client = ?ip, node = %mac, status = code.as_u16(), "boot-peer refused: {why}");
        (code, format!("{why}\n")).into_response()
    };
    let m: MacAddr = match mac.parse() {
        Ok(m) => m,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("{e}")),
    };
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match authorize(auth, ctx.secret(), m) {
        Ok(()) => {}
        Err(e @ AuthError::Missing) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
        Err(e @ AuthError::Wrong) => return refuse(StatusCode::FORBIDDEN, e.to_string()),
    }
    let Some(ip) = ip else { return refuse(StatusCode::FORBIDDEN, "no IPv4 client address".into()) };
    if ctx.bind_nodes {
        if let Err(why) = crate::types::addrs::check_node_source(Some(&ctx.addrs), m, Some(ip)) {
            return refuse(StatusCode::FORBIDDEN, why);
        }
    }
    let note: BootPeerNote = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed boot-peer note: {e}")),
    };
    let Some(peers) = &ctx.peers else {
        debug!(node = %m, %ip, ?note, "boot-peer: ignored, boot.peer_serve is off");
        return (StatusCode::CONFLICT, "peer-served boot files are off on this appliance\n").into_response();
    };
    let now = std::time::Instant::now();
    let mut book = peers.lock();
    match note {
        BootPeerNote::Serving { port } if port == peers.port => {
            let new = book.peers();
            book.serving(ip, port, now);
            if book.peers() > new {
                info!(node = %m, peer = %ip, port, peers = book.peers(), "boot-peer: serving boot files");
            }
        }
        BootPeerNote::Serving { port } => {
            drop(book);
            return refuse(StatusCode::BAD_REQUEST, format!("serves on port {port}, not boot.peer_port {}", peers.port));
        }
        BootPeerNote::Stopped => {
            if book.stopped(ip) {
                info!(node = %m, peer = %ip, peers = book.peers(), "boot-peer: stopped serving");
            }
        }
        BootPeerNote::BadPeer { peer, why } => {
            if book.bad(ip, peer) {
                warn!(node = %m, reporter = %ip, %peer, why, peers = book.peers(), "boot-peer: peer dropped: it failed a node it was given");
            } else {
                warn!(node = %m, reporter = %ip, %peer, why, "boot-peer: bad-peer report ignored: this node was not sent to that peer");
            }
        }
    }
    drop(book);
    peers.changed.notify_waiters();
    StatusCode::NO_CONTENT.into_response()
}

/// How often a waiting request asks again without a wake-up (holds end by time).
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// One of the appliance's transfer slots: freed (and the waiters woken) on drop.
struct Slot {
    ctx: Arc<BootContext>,
    ticket: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = &self.ctx.peers {
            p.lock().done_here(self.ticket);
            p.changed.notify_waiters();
        }
    }
}

/// A waiting request: out of the queue on drop (the client went away) unless disarmed.
struct Queued {
    ctx: Arc<BootContext>,
    ticket: u64,
    armed: bool,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let (true, Some(p)) = (self.armed, &self.ctx.peers) {
            p.lock().leave(self.ticket);
            p.changed.notify_waiters();
        }
    }
}

/// `flag` in the query: `direct=1` (the node wants the appliance's own bytes), `verify=1` (it
/// checks what it gets against `/boot/digests`), `bad=1` (where it was sent last failed it),
/// `peer=1` (an installer's fetch: it will serve the files, it goes ahead of the line).
fn flag_in_query(query: Option<&str>, flag: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|kv| kv == flag))
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// `mac=<aa-bb-..>` from the query: the node scripts add it to kernel and initrd URLs so the
/// log can say which node fetched them. A claim by whoever asks: logged, and the monitor
/// believes it only for a known node at that address (`monitor::registry`).
fn mac_from_query(query: Option<&str>) -> Option<MacAddr> {
    query?.split('&').find_map(|kv| kv.strip_prefix("mac=")).and_then(|m| m.parse().ok())
}

async fn boot_file(
    State(ctx): State<Arc<BootContext>>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    // Present when app.rs serves with `into_make_service_with_connect_info`.
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| tracing::field::display(c.0));
    debug!(client, method = %req.method(), uri = %req.uri(), "http: request");
    let Ok(Path(name)) = name else {
        debug!(client, uri = %req.uri(), "http: refused: undecodable path");
        return not_found();
    };
    let f = match BootFile::parse(&name) {
        Ok(f) => f,
        Err(why) => {
            debug!(client, name, %why, "http: refused");
            return not_found();
        }
    };
    let (c, key) = (ctx.clone(), f.clone());
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().and_then(|c| crate::types::addrs::v4(c.0));
    let src = match tokio::task::spawn_blocking(move || file::open(&c, &key, ip, "http")).await {
        Ok(Ok(src)) => src,
        Ok(Err(e)) if e.is_not_found() => {
            debug!(client, file = %f, "http: not found: {e}");
            return not_found();
        }
        Ok(Err(e)) => {
            warn!(client, file = %f, "http: refused: {e:#}");
            return not_found();
        }
        Err(e) => {
            warn!(client, file = %f, "http: open task failed: {e}");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let mac = f.mac().or_else(|| mac_from_query(req.uri().query())).map(tracing::field::display);
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        let m = f.mac().or_else(|| mac_from_query(req.uri().query()));
        super::note_boot_file(&ctx, *addr, &f, m, src.len(), crate::types::events::BootVia::Http);
    }
    // The appliance's transfer slot (peer_serve): freed when the response body ends.
    let mut slot: Option<Slot> = None;
    if let (Some(peers), Some(ip), BootFile::Kernel | BootFile::Initrd) = (&ctx.peers, ip, &f) {
        let q = req.uri().query();
        let ticket = peers.ticket();
        if flag_in_query(q, "bad=1") {
            let mut book = peers.lock();
            match book.bad_held(ip) {
                Some(peer) => warn!(client, file = %f, mac, %peer, peers = book.peers(), "boot-peer: peer dropped: the node's fetch from it failed or its copy did not match the SHA-256"),
                None => debug!(client, file = %f, mac, "http: bad=1 from a node holding no peer: ignored"),
            }
            drop(book);
            peers.changed.notify_waiters();
        }
        let direct = flag_in_query(q, "direct=1");
        if direct || (!flag_in_query(q, "verify=1") && !peers.unverified) {
            // The appliance's own bytes, now: the node's fallback (it already waited or failed
            // once), or a node that cannot check a peer's copy.
            peers.lock().direct(ip, ticket);
            slot = Some(Slot { ctx: ctx.clone(), ticket });
            peers.changed.notify_waiters();
            if direct {
                info!(client, file = %f, mac, "http: direct: the appliance serves (peer fallback)");
            } else {
                debug!(client, file = %f, mac, "http: the appliance serves: the node cannot check a peer's copy (no verify=1)");
            }
        } else {
            let mut queued = Queued { ctx: ctx.clone(), ticket, armed: true };
            let first = flag_in_query(q, "peer=1");
            let asked = std::time::Instant::now();
            // Bounded: `pick` answers Here once `boot.peer_wait` has passed since the first ask.
            loop {
                let changed = peers.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let (d, here, waiting) = {
                    let mut book = peers.lock();
                    let d = book.pick(ip, ticket, first, matches!(f, BootFile::Initrd), std::time::Instant::now());
                    (d, book.here_load(), book.waiting())
                };
                let waited = format!("{:.2}", asked.elapsed().as_secs_f64());
                match d {
                    Decision::Peer(peer) => {
                        queued.armed = false;
                        let load = peers.lock().load(*peer.ip());
                        let to = format!("http://{peer}/boot/{f}");
                        info!(client, file = %f, mac, %peer, load, waited, "http: redirected to a boot peer");
                        return (StatusCode::FOUND, [(header::LOCATION, to.clone())], format!("{to}\n")).into_response();
                    }
                    Decision::Here(why) => {
                        queued.armed = false;
                        slot = Some(Slot { ctx: ctx.clone(), ticket });
                        debug!(client, file = %f, here, waiting, waited, "http: the appliance serves: {why}");
                        break;
                    }
                    Decision::Wait { until } => {
                        let wake = until.min(std::time::Instant::now() + WAIT_POLL);
                        debug!(client, file = %f, here, waiting, "http: waiting for a free slot");
                        tokio::select! {
                            () = &mut changed => {}
                            () = tokio::time::sleep_until(wake.into()) => {}
                        }
                    }
                }
            }
        }
    }
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if f.is_node_step() {
        info!(client, file = %f, kind = f.kind(), mac, size = src.len(), range, "http: sending");
    } else {
        debug!(client, file = %f, kind = f.kind(), size = src.len(), range, "http: sending");
    }
    match src {
        Source::Rendered(bytes) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response(),
        Source::Disk { path, file, .. } => {
            // ServeFile reopens by path; the path is the canonical one `open` checked.
            drop(file);
            match ServeFile::new(path).oneshot(req).await {
                Ok(resp) => match slot {
                    None => resp.map(axum::body::Body::new),
                    // The slot lives as long as the body: dropped when sent or abandoned.
                    Some(slot) => resp.map(|b| {
                        use futures_lite::StreamExt as _;
                        let stream = axum::body::Body::new(b).into_data_stream().map(move |chunk| {
                            let _ = &slot;
                            chunk
                        });
                        axum::body::Body::from_stream(stream)
                    }),
                },
                Err(never) => match never {},
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn get(router: &Router, uri: &str, range: Option<&str>) -> (StatusCode, Vec<u8>) {
        let mut b = axum::http::Request::builder().uri(uri);
        if let Some(r) = range {
            b = b.header(header::RANGE, r);
        }
        let resp = router.clone().oneshot(b.body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 24).await.unwrap();
        (status, body.to_vec())
    }

    #[tokio::test]
    async fn routes_serve_keys_ranges_and_404_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"0123456789").unwrap();
        let ctx = Arc::new(BootContext::for_tests(vec![dir.path().to_owned()], kernel));
        let r = routes(ctx.clone());

        let (st, body) = get(&r, "/boot/52-54-00-12-34-56.ipxe", None).await;
        assert_eq!(st, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert!(text.contains(&format!("si.token={}", ctx.node(mac).token.as_str())), "{text}");

        assert_eq!(get(&r, "/boot/vmlinuz", None).await, (StatusCode::OK, b"0123456789".to_vec()));
        assert_eq!(get(&r, "/boot/vmlinuz?mac=52-54-00-12-34-56", Some("bytes=2-4")).await,
                   (StatusCode::PARTIAL_CONTENT, b"234".to_vec()));
        for bad in ["/boot/../../etc/passwd", "/boot/%2e%2e/%2e%2e/etc/passwd", "/boot/%2e%2e%2fk",
                    "/boot/k", "/boot/", "/boot/pxelinux.cfg/../../k", "/boot/%ff", "/etc/passwd"] {
            assert_eq!(get(&r, bad, None).await.0, StatusCode::NOT_FOUND, "{bad}");
        }
    }

    async fn get_from(router: &Router, uri: &str, from: &str) -> String {
        let mut req = axum::http::Request::builder().uri(uri).body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(from.parse().unwrap()));
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn node_script_and_token_only_to_the_nodes_leased_address() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"0123456789").unwrap();
        let mut ctx = BootContext::for_tests(vec![dir.path().to_owned()], kernel);
        ctx.bind_nodes = true;
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        ctx.addrs.note(mac, "10.0.0.5".parse().unwrap());
        let token = ctx.node(mac).token.as_str().to_owned();
        let r = routes(Arc::new(ctx));
        let own = get_from(&r, "/boot/52-54-00-12-34-56.ipxe", "10.0.0.5:1234").await;
        assert!(own.contains(&format!("si.token={token}")), "{own}");
        let other = get_from(&r, "/boot/52-54-00-12-34-56.ipxe", "10.0.0.6:1234").await;
        assert!(other.contains("\nexit 1\n") && !other.contains("si.token"), "{other}");
        let unknown = get_from(&r, "/boot/52-54-00-ab-cd-ef.ipxe", "10.0.0.5:1234").await;
        assert!(!unknown.contains("si.token"), "{unknown}");
        let pxe = get_from(&r, "/boot/pxelinux.cfg/01-52-54-00-12-34-56", "10.0.0.6:1234").await;
        assert!(pxe.contains("LOCALBOOT") && !pxe.contains("si.token"), "{pxe}");
    }

    async fn call(router: &Router, method: &str, uri: &str, from: &str, bearer: Option<&str>, body: &str) -> (StatusCode, Option<String>, Vec<u8>) {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = bearer {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let mut req = b.body(Body::from(body.to_owned())).unwrap();
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(from.parse().unwrap()));
        let resp = router.clone().oneshot(req).await.unwrap();
        let loc = resp.headers().get(header::LOCATION).map(|v| v.to_str().unwrap().to_owned());
        (resp.status(), loc, axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec())
    }

    #[tokio::test]
    async fn with_peers_kernel_requests_go_to_a_serving_node_and_digests_are_published() {
        use crate::boot::peers::PeerPolicy;
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"0123456789").unwrap();
        let mut ctx = BootContext::for_tests(vec![dir.path().to_owned()], kernel);
        let policy = PeerPolicy {
            max_per_peer: 1,
            hold: std::time::Duration::from_secs(60),
            prefix: 24,
            silence: std::time::Duration::from_secs(90),
            here_max: 0,
            wait: std::time::Duration::from_secs(5),
        };
        ctx.peers = Some(crate::boot::PeerServe::new(8081, policy, false));
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let token = ctx.node(mac).token.as_str().to_owned();
        let r = routes(Arc::new(ctx));

        let (st, _, body) = call(&r, "GET", "/boot/digests", "10.0.0.9:1", None, "").await;
        assert_eq!(st, StatusCode::OK);
        let d: crate::types::node_api::BootDigests = serde_json::from_slice(&body).unwrap();
        let want = "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882"; // sha256("0123456789")
        assert_eq!((d.kernel.size, d.kernel.sha256.as_str(), d.initrd.size, d.peer_port), (10, want, 10, Some(8081)));

        // No serving node yet: the appliance serves.
        assert_eq!(call(&r, "GET", "/boot/vmlinuz", "10.0.0.6:1", None, "").await.0, StatusCode::OK);
        // A node announces without or with a wrong token, then with its own.
        let serving = r#"{"event":"serving","port":8081}"#;
        let uri = "/api/nodes/52:54:00:12:34:56/boot-peer";
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", None, serving).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", Some("nope"), serving).await.0, StatusCode::FORBIDDEN);
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", Some(&token), "{\"event\":\"dance\"}").await.0, StatusCode::BAD_REQUEST);
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", Some(&token), r#"{"event":"serving","port":9}"#).await.0, StatusCode::BAD_REQUEST);
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", Some(&token), serving).await.0, StatusCode::NO_CONTENT);

        // A node that cannot check a copy (no verify=1) gets the appliance's bytes.
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?mac=52-54-00-ab-cd-ef&verify=0", "10.0.0.6:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz", "10.0.0.6:1", None, "").await.0, StatusCode::OK);
        let (st, loc, _) = call(&r, "GET", "/boot/vmlinuz?mac=52-54-00-ab-cd-ef&verify=1", "10.0.0.6:1", None, "").await;
        assert_eq!((st, loc.as_deref()), (StatusCode::FOUND, Some("http://10.0.0.5:8081/boot/vmlinuz")));
        let (st, loc, _) = call(&r, "GET", "/boot/initrd.img?verify=1", "10.0.0.6:1", None, "").await;
        assert_eq!((st, loc.as_deref()), (StatusCode::FOUND, Some("http://10.0.0.5:8081/boot/initrd.img")));
        // The peer is never sent to itself; its one slot is taken, so a third node gets the appliance.
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.5:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.7:1", None, "").await.0, StatusCode::OK);
        // The fallback: direct=1 is the appliance's bytes and frees the slot.
        let (st, _, body) = call(&r, "GET", "/boot/vmlinuz?mac=52-54-00-ab-cd-ef&direct=1", "10.0.0.6:1", None, "").await;
        assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"0123456789"[..]));
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.7:1", None, "").await.0, StatusCode::FOUND);
        // The asker says it has both files: its slot at the peer frees at once; a node that holds
        // no slot there frees nothing.
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.9:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/fetched?mac=52-54-00-ab-cd-ef", "10.0.0.9:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.9:1", None, "").await.0, StatusCode::OK, "still .7's");
        assert_eq!(call(&r, "GET", "/boot/fetched", "10.0.0.7:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.9:1", None, "").await.0, StatusCode::FOUND);
        assert_eq!(call(&r, "GET", "/boot/fetched", "10.0.0.9:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.7:1", None, "").await.0, StatusCode::FOUND);
        // bad=1 from a node that holds no slot drops nothing; from the one sent there, the peer.
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1&bad=1", "10.0.0.8:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.7:1", None, "").await.0, StatusCode::FOUND);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1&bad=1", "10.0.0.7:1", None, "").await.0, StatusCode::OK);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.6:1", None, "").await.0, StatusCode::OK, "dropped");
        // Announced again, then stopped: gone.
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", Some(&token), serving).await.0, StatusCode::NO_CONTENT);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.6:1", None, "").await.0, StatusCode::FOUND);
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", Some(&token), r#"{"event":"stopped"}"#).await.0, StatusCode::NO_CONTENT);
        assert_eq!(call(&r, "GET", "/boot/vmlinuz?verify=1", "10.0.0.7:1", None, "").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn with_unverified_allowed_a_node_without_digest_commands_is_redirected_too() {
        use crate::boot::peers::PeerPolicy;
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"0123456789").unwrap();
        let mut ctx = BootContext::for_tests(vec![dir.path().to_owned()], kernel);
        let policy = PeerPolicy {
            max_per_peer: 4,
            hold: std::time::Duration::from_secs(60),
            prefix: 24,
            silence: std::time::Duration::from_secs(90),
            here_max: 0,
            wait: std::time::Duration::from_secs(5),
        };
        ctx.peers = Some(crate::boot::PeerServe::new(8081, policy, true));
        let token = ctx.node("52:54:00:12:34:56".parse().unwrap()).token.as_str().to_owned();
        let r = routes(Arc::new(ctx));
        let uri = "/api/nodes/52:54:00:12:34:56/boot-peer";
        assert_eq!(call(&r, "POST", uri, "10.0.0.5:1", Some(&token), r#"{"event":"serving","port":8081}"#).await.0, StatusCode::NO_CONTENT);
        let (st, loc, _) = call(&r, "GET", "/boot/vmlinuz?verify=0", "10.0.0.6:1", None, "").await;
        assert_eq!((st, loc.as_deref()), (StatusCode::FOUND, Some("http://10.0.0.5:8081/boot/vmlinuz")));
    }

    #[tokio::test]
    async fn a_request_beyond_the_appliances_slots_waits_until_one_ends() {
        use crate::boot::peers::PeerPolicy;
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"0123456789").unwrap();
        let mut ctx = BootContext::for_tests(vec![dir.path().to_owned()], kernel);
        let policy = PeerPolicy {
            max_per_peer: 1,
            hold: std::time::Duration::from_secs(60),
            prefix: 24,
            silence: std::time::Duration::from_secs(90),
            here_max: 1,
            wait: std::time::Duration::from_secs(30),
        };
        ctx.peers = Some(crate::boot::PeerServe::new(8081, policy, false));
        let r = routes(Arc::new(ctx));
        // .6's transfer holds the one slot while its body is unread.
        // (verify=1: a node that cannot check a peer's copy is served at once, outside the slots.)
        let mut req = axum::http::Request::builder().uri("/boot/vmlinuz?verify=1").body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>("10.0.0.6:1".parse().unwrap()));
        let first = r.clone().oneshot(req).await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let r2 = r.clone();
        let second = tokio::spawn(async move { call(&r2, "GET", "/boot/vmlinuz?verify=1", "10.0.0.7:1", None, "").await });
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert!(!second.is_finished(), ".7 must wait while .6's transfer runs");
        let body = axum::body::to_bytes(first.into_body(), 1 << 20).await.unwrap();
        assert_eq!(&body[..], b"0123456789");
        let (st, _, body) = tokio::time::timeout(std::time::Duration::from_secs(5), second).await.expect("woken").unwrap();
        assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"0123456789"[..]));
    }

    #[test]
    fn query_mac() {
        assert_eq!(mac_from_query(Some("x=1&mac=52-54-00-12-34-56")), "52:54:00:12:34:56".parse().ok());
        assert_eq!(mac_from_query(Some("mac=junk")), None);
        assert_eq!(mac_from_query(None), None);
    }
}
