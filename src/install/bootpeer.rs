//! Peer-served boot files, the node's side: fetch the kernel and initrd once (from the appliance
//! or the peer it redirects to), check size and SHA-256 against the appliance's
//! `/boot/digests`, keep them in `<dir>/boot/` (tmpfs in the initramfs: about 22 MB), serve them
//! over HTTP (Range, HEAD, conditional GET: tower-http's `ServeFile`) on the port the digests
//! name, and announce that to the appliance until stopped (before the reboot).
//!
//! A redirected fetch that fails (no connection, bad status, wrong size or digest) is reported
//! to the appliance ([`BootPeerNote::BadPeer`], which drops that peer) and fetched again from
//! the appliance itself with `?direct=1`. Bytes that do not match the digests are never served.
//!
//! Owns: that sequence. Must not: fail the install; every error here is the caller's to log.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::net::http_client::{self, HttpError, Request};
use crate::types::MacAddr;
use crate::types::node_api::{BOOT_PEER_ANNOUNCE_SECS, BootDigests, BootPeerNote, FileDigest};

/// The two files, by their key under `/boot/`.
pub const FILES: [&str; 2] = ["vmlinuz", "initrd.img"];

/// Time limit of one file's transfer (22 MB at 10 Mbit/s takes 18 s).
const FETCH_LIMIT: Duration = Duration::from_secs(120);
/// Time limit of a note to the appliance.
const NOTE_LIMIT: Duration = Duration::from_secs(5);

/// Errors of the node's boot-file serving.
#[derive(Debug, thiserror::Error)]
pub enum BootPeerError {
    /// `/boot/digests` could not be fetched.
    #[error("boot digests from the appliance")]
    Digests(#[source] HttpError),
    /// `/boot/digests` is not the JSON we know.
    #[error("boot digests from the appliance: {0}")]
    DigestsJson(#[source] serde_json::Error),
    /// The appliance does not redirect to peers (`boot.peer_serve = false`).
    #[error("the appliance does not use peer-served boot files")]
    Off,
    /// A file could not be fetched from the appliance.
    #[error("/boot/{file} from {from}")]
    Fetch {
        /// The key.
        file: &'static str,
        /// Who was asked.
        from: SocketAddr,
        /// The cause.
        #[source]
        source: HttpError,
    },
    /// The appliance answered something else than the file or a redirect.
    #[error("/boot/{file} from {from}: HTTP {status}")]
    Status {
        /// The key.
        file: &'static str,
        /// Who answered.
        from: SocketAddr,
        /// The status.
        status: u16,
    },
    /// The bytes are not the published ones.
    #[error("/boot/{file} from {from}: {why}")]
    Mismatch {
        /// The key.
        file: &'static str,
        /// Who sent them.
        from: SocketAddr,
        /// Size or digest, both values.
        why: String,
    },
    /// A verified file could not be stored.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The serving port could not be opened.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Who this node is to the appliance.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// The appliance.
    pub server: SocketAddr,
    /// This node's MAC.
    pub mac: MacAddr,
    /// This node's token.
    pub token: String,
    /// Where the files go (`<dir>/boot/<key>`): tmpfs.
    pub dir: PathBuf,
}

/// Where one file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The appliance served it (no peer free, or none yet).
    Appliance,
    /// The peer the appliance redirected to.
    Peer(Ipv4Addr),
    /// The appliance, after the peer it redirected to failed.
    FallbackFrom(Ipv4Addr),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Appliance => f.write_str("appliance"),
            Origin::Peer(ip) => write!(f, "peer:{ip}"),
            Origin::FallbackFrom(ip) => write!(f, "appliance-after-bad-peer:{ip}"),
        }
    }
}

/// Verified copies on disk, ready to serve.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The port to serve on (from the digests).
    pub port: u16,
    /// Where each of [`FILES`] came from.
    pub origins: [Origin; 2],
}

/// `Err(why)` unless `body` is `want` (size first, then SHA-256).
pub fn check(body: &[u8], want: &FileDigest) -> Result<(), String> {
    if body.len() as u64 != want.size {
        return Err(format!("{} bytes, want {}", body.len(), want.size));
    }
    let got = hex::encode(sha2::Sha256::digest(body));
    if !got.eq_ignore_ascii_case(&want.sha256) {
        return Err(format!("digest mismatch: sha256 {got}, want {}", want.sha256));
    }
    Ok(())
}

/// The peer and path of a redirect's `Location`; only what the appliance writes is accepted:
/// `http://A.B.C.D:PORT/path`.
pub fn parse_location(loc: &str) -> Option<(SocketAddrV4, String)> {
    let rest = loc.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let addr: SocketAddrV4 = host.parse().ok()?;
    Some((addr, format!("/{path}")))
}

async fn get(addr: SocketAddr, path: &str, max: u64) -> Result<http_client::Response, HttpError> {
    http_client::request(addr, Request::get(path), usize::try_from(max).unwrap_or(usize::MAX), FETCH_LIMIT).await
}

/// Tells the appliance `note`; failures are logged, never fatal.
async fn tell(o: &PeerOptions, note: &BootPeerNote) -> bool {
    let Ok(body) = serde_json::to_vec(note) else { return false };
    let path = format!("/api/nodes/{}/boot-peer", o.mac);
    let req = Request { method: "POST", path: &path, bearer: Some(&o.token), json: Some(&body) };
    match http_client::request(o.server, req, 4096, NOTE_LIMIT).await {
        Ok(a) if (200..300).contains(&a.status) => true,
        Ok(a) => {
            warn!(status = a.status, body = %String::from_utf8_lossy(&a.body).trim(), ?note, "boot-peer: the appliance refused the note");
            false
        }
        Err(e) => {
            debug!(?note, "boot-peer: note not sent: {e}");
            false
        }
    }
}

/// One file: ask the appliance; follow its redirect to a peer; on a failed peer, report it and
/// ask the appliance directly.
async fn fetch_one(o: &PeerOptions, file: &'static str, want: &FileDigest) -> Result<(Vec<u8>, Origin), BootPeerError> {
    // verify=1: every copy is checked against /boot/digests before it is kept; peer=1: this node
    // serves the files once checked, the appliance puts it ahead of the line.
    let path = format!("/boot/{file}?mac={}&verify=1&peer=1", o.mac.hyphenated());
    // The body of a redirect is a line; of the file, exactly its size.
    let max = want.size.max(4096);
    let a = get(o.server, &path, max).await.map_err(|source| BootPeerError::Fetch { file, from: o.server, source })?;
    let peer = match (a.status, a.location.as_deref()) {
        (200, _) => {
            check(&a.body, want).map_err(|why| BootPeerError::Mismatch { file, from: o.server, why })?;
            return Ok((a.body, Origin::Appliance));
        }
        (301 | 302 | 303 | 307 | 308, Some(loc)) => parse_location(loc),
        (status, _) => return Err(BootPeerError::Status { file, from: o.server, status }),
    };
    let why = match &peer {
        None => format!("unusable redirect {:?}", a.location),
        Some((addr, p)) => match get(SocketAddr::V4(*addr), p, want.size).await {
            Ok(r) if r.status == 200 => match check(&r.body, want) {
                Ok(()) => {
                    info!(file, peer = %addr, bytes = r.body.len(), "boot-peer: fetched from a peer, digest checked");
                    return Ok((r.body, Origin::Peer(*addr.ip())));
                }
                Err(why) => why,
            },
            Ok(r) => format!("HTTP {}", r.status),
            Err(e) => format!("{e}"),
        },
    };
    let Some((addr, _)) = peer else {
        return Err(BootPeerError::Mismatch { file, from: o.server, why });
    };
    warn!(file, peer = %addr, why, "boot-peer: the peer failed: reporting it, fetching from the appliance directly");
    tell(o, &BootPeerNote::BadPeer { peer: *addr.ip(), why: format!("/boot/{file}: {why}") }).await;
    let direct = format!("{path}&direct=1");
    let a = get(o.server, &direct, want.size).await.map_err(|source| BootPeerError::Fetch { file, from: o.server, source })?;
    if a.status != 200 {
        return Err(BootPeerError::Status { file, from: o.server, status: a.status });
    }
    check(&a.body, want).map_err(|why| BootPeerError::Mismatch { file, from: o.server, why })?;
    Ok((a.body, Origin::FallbackFrom(*addr.ip())))
}

/// Fetches the digests and both files, checks them and stores them under `<dir>/boot/`.
///
/// # Errors
/// [`BootPeerError`]; [`BootPeerError::Off`] when the appliance does not use peers.
pub async fn prepare(o: &PeerOptions) -> Result<Prepared, BootPeerError> {
    let body = http_client::get(o.server, "/boot/digests", 64 * 1024, NOTE_LIMIT).await.map_err(BootPeerError::Digests)?;
    let d: BootDigests = serde_json::from_slice(&body).map_err(BootPeerError::DigestsJson)?;
    let port = d.peer_port.ok_or(BootPeerError::Off)?;
    let dir = o.dir.join("boot");
    tokio::fs::create_dir_all(&dir).await.map_err(|source| BootPeerError::Write { path: dir.clone(), source })?;
    let mut origins = [Origin::Appliance; 2];
    for (i, (file, want)) in FILES.iter().zip([&d.kernel, &d.initrd]).enumerate() {
        let (bytes, from) = fetch_one(o, file, want).await?;
        let (tmp, path) = (dir.join(format!(".{file}.part")), dir.join(file));
        tokio::fs::write(&tmp, &bytes).await.map_err(|source| BootPeerError::Write { path: tmp.clone(), source })?;
        tokio::fs::rename(&tmp, &path).await.map_err(|source| BootPeerError::Write { path: path.clone(), source })?;
        origins[i] = from;
    }
    info!(port, kernel = %origins[0], initrd = %origins[1], "boot-peer: kernel and initrd verified");
    Ok(Prepared { port, origins })
}

/// The routes: `GET /boot/vmlinuz`, `GET /boot/initrd.img`; anything else is a 404.
fn routes(dir: PathBuf) -> axum::Router {
    use axum::extract::{ConnectInfo, Path as UrlPath, Request};
    use axum::response::IntoResponse;
    use tower::ServiceExt as _;
    let serve = move |UrlPath(name): UrlPath<String>, req: Request| {
        let dir = dir.clone();
        async move {
            let Some(file) = FILES.iter().find(|f| **f == name) else {
                return (axum::http::StatusCode::NOT_FOUND, "not found\n").into_response();
            };
            let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
            let range = req.headers().get(axum::http::header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
            info!(?client, file, range, "boot-peer: sending");
            match tower_http::services::ServeFile::new(dir.join(file)).oneshot(req).await {
                Ok(resp) => resp.map(axum::body::Body::new),
                Err(never) => match never {},
            }
        }
    };
    axum::Router::new().route("/boot/{name}", axum::routing::get(serve))
}

/// Serves `<dir>/boot/` on `port` (all addresses) and announces it every
/// [`BOOT_PEER_ANNOUNCE_SECS`] until `stop`; then tells the appliance it stopped.
///
/// # Errors
/// [`BootPeerError::Listen`].
pub async fn serve(o: &PeerOptions, port: u16, stop: CancellationToken) -> Result<(), BootPeerError> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| BootPeerError::Listen { addr, source })?;
    let limits = crate::http_serve::Limits { max_connections: 64, header_timeout: Duration::from_secs(10) };
    let server = tokio::spawn(crate::http_serve::serve(listener, routes(o.dir.join("boot")), limits, stop.clone()));
    info!(port, "boot-peer: serving kernel and initrd");
    let mut tick = tokio::time::interval(Duration::from_secs(BOOT_PEER_ANNOUNCE_SECS));
    let mut first = true;
    loop {
        tokio::select! {
            // CANCEL-SAFETY: ticks and cancellation carry no state.
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                // The first announce is retried a few times: until it lands nobody is sent here.
                for attempt in 0..if first { 5 } else { 1 } {
                    if tell(o, &BootPeerNote::Serving { port }).await {
                        if first {
                            info!(port, "boot-peer: announced to the appliance");
                        }
                        break;
                    }
                    if attempt < 4 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                first = false;
            }
        }
    }
    tell(o, &BootPeerNote::Stopped).await;
    let _ = tokio::time::timeout(Duration::from_secs(6), server).await;
    Ok(())
}

/// [`prepare`] then [`serve`] until `stop`.
///
/// # Errors
/// [`BootPeerError`].
pub async fn run(o: &PeerOptions, stop: CancellationToken, on_ready: impl FnOnce(&Prepared)) -> Result<(), BootPeerError> {
    let p = tokio::select! {
        // CANCEL-SAFETY: an interrupted prepare leaves at most a `.part` file behind.
        r = prepare(o) => r?,
        _ = stop.cancelled() => return Ok(()),
    };
    on_ready(&p);
    serve(o, p.port, stop).await
}

/// The installer's boot-file serving, in the background for the length of the install.
pub struct Background {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Background {
    /// Starts [`run`]; its errors are logged (the install goes on without serving).
    pub fn start(o: PeerOptions, parent: &CancellationToken) -> Background {
        let stop = parent.child_token();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            match run(&o, s, |_| {}).await {
                Ok(()) => {}
                Err(BootPeerError::Off) => debug!("boot-peer: off on the appliance"),
                Err(e) => warn!("boot-peer: not serving boot files: {}", crate::swarm::engine::chain(&e)),
            }
        });
        Background { stop, task }
    }

    /// Stops serving and tells the appliance (at most a few seconds).
    pub async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(10), &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Where the installer keeps the files: `<workdir>/boot-peer` (tmpfs in the initramfs).
pub fn dir_in(workdir: &Path) -> PathBuf {
    workdir.join("boot-peer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_published_bytes_pass() {
        let want = FileDigest { size: 10, sha256: "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882".into() };
        assert_eq!(check(b"0123456789", &want), Ok(()));
        assert!(check(b"0123456788", &want).unwrap_err().contains("digest mismatch"));
        assert!(check(b"012345678", &want).unwrap_err().contains("9 bytes, want 10"));
    }

    #[test]
    fn locations_are_an_ipv4_peer_and_a_path() {
        assert_eq!(parse_location("http://10.0.0.5:8081/boot/vmlinuz"), Some(("10.0.0.5:8081".parse().unwrap(), "/boot/vmlinuz".into())));
        for bad in ["https://10.0.0.5:8081/boot/vmlinuz", "http://host:80/x", "http://10.0.0.5/boot/x", "http://10.0.0.5:8081", "/boot/vmlinuz"] {
            assert_eq!(parse_location(bad), None, "{bad}");
        }
    }

    /// A loopback appliance that redirects to a peer serving `peer_bytes`, and serves the good
    /// bytes itself only with `direct=1`; the node must end with the good bytes either way.
    async fn fetch_through(peer_bytes: &'static [u8]) -> (Vec<u8>, Origin, Vec<String>) {
        use axum::extract::{Path as UrlPath, RawQuery};
        use axum::response::IntoResponse;
        let good: &'static [u8] = b"0123456789";
        let peer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = peer.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(peer, axum::Router::new().route("/boot/{n}", axum::routing::get(move || async move { peer_bytes }))).await });
        let notes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let n2 = notes.clone();
        let app = axum::Router::new()
            .route(
                "/boot/{n}",
                axum::routing::get(move |UrlPath(n): UrlPath<String>, RawQuery(q): RawQuery| async move {
                    if q.unwrap_or_default().contains("direct=1") {
                        good.into_response()
                    } else {
                        (axum::http::StatusCode::FOUND, [(axum::http::header::LOCATION, format!("http://{peer_addr}/boot/{n}"))], "").into_response()
                    }
                }),
            )
            .route(
                "/api/nodes/{mac}/boot-peer",
                axum::routing::post(move |body: String| async move {
                    n2.lock().unwrap().push(body);
                    axum::http::StatusCode::NO_CONTENT
                }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        let o = PeerOptions { server, mac: "52:54:00:00:00:01".parse().unwrap(), token: "t".into(), dir: "/nonexistent".into() };
        let want = FileDigest { size: 10, sha256: hex::encode(sha2::Sha256::digest(good)) };
        let (bytes, origin) = fetch_one(&o, "vmlinuz", &want).await.expect("fetched");
        let notes = notes.lock().unwrap().clone();
        (bytes, origin, notes)
    }

    #[tokio::test]
    async fn a_good_peer_is_used_and_a_corrupt_one_reported_and_bypassed() {
        let (bytes, origin, notes) = fetch_through(b"0123456789").await;
        assert_eq!((bytes.as_slice(), origin), (&b"0123456789"[..], Origin::Peer(Ipv4Addr::LOCALHOST)));
        assert!(notes.is_empty(), "{notes:?}");
        let (bytes, origin, notes) = fetch_through(b"0123456780").await;
        assert_eq!((bytes.as_slice(), origin), (&b"0123456789"[..], Origin::FallbackFrom(Ipv4Addr::LOCALHOST)));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("\"event\":\"bad-peer\"") && notes[0].contains("digest mismatch"), "{notes:?}");
    }
}
