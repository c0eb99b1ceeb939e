//! The download side of the swarm (`si-appliance fetch` and the installer): fetch an image's
//! .torrent from the appliance, join the swarm through its tracker (with the appliance's seed as
//! an initial peer) with our own engine ([`engine`](super::engine)), upload while downloading,
//! verify every piece, move the finished file to its destination and keep seeding until the
//! appliance says the swarm is done or a deadline passes.
//!
//! Discovery is the tracker only: no DHT, no local service discovery, no UPnP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api_http::TorrentView;
use super::engine::{DEFAULT_DEPTH, Engine, EngineError, EngineOptions, Meta};
use super::http_get::{self, GetError};
use crate::types::ImageName;

/// Errors of a fetch.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// An HTTP request to the appliance failed.
    #[error(transparent)]
    Get(#[from] GetError),
    /// The appliance's JSON does not parse.
    #[error("swarm state of {name} from the appliance")]
    Api {
        /// Image.
        name: ImageName,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The .torrent is unusable, the data file or the listening socket cannot be used, or the
    /// download stopped on an error.
    #[error("{name}")]
    Engine {
        /// Image.
        name: ImageName,
        /// The engine's error.
        #[source]
        source: EngineError,
    },
    /// The interface cannot be used.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// The download did not finish in time.
    #[error("downloading {name}: not complete after {limit:?} ({have} of {total} bytes)")]
    Timeout {
        /// Image.
        name: ImageName,
        /// The limit.
        limit: Duration,
        /// Bytes verified.
        have: u64,
        /// Bytes wanted.
        total: u64,
    },
    /// The .torrent is not the one the image's seal names.
    #[error("{name}: the .torrent's info-hash is {got}, the signed seal says {want}")]
    InfoHash {
        /// Image.
        name: ImageName,
        /// Sealed.
        want: String,
        /// Served.
        got: String,
    },
    /// Stopped by a signal before completion.
    #[error("downloading {0}: interrupted")]
    Interrupted(ImageName),
    /// Preparing or moving the output file failed.
    #[error("output {path}")]
    Output {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What to fetch and how.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// The appliance's HTTP address.
    pub server: SocketAddr,
    /// The image.
    pub image: ImageName,
    /// Destination file.
    pub out: PathBuf,
    /// Interface to bind to (SO_BINDTODEVICE) and listen on; None: all addresses.
    pub iface: Option<String>,
    /// TCP port for incoming peers.
    pub listen_port: u16,
    /// Extra peers to connect to.
    pub peers: Vec<SocketAddr>,
    /// Use the appliance's tracker and seed (false: only `peers`).
    pub use_tracker: bool,
    /// After completion, seed until the appliance reports the swarm done.
    pub seed_until_done: bool,
    /// After completion, seed at most this long (None and not `seed_until_done`: stop at once).
    pub seed_for: Option<Duration>,
    /// Progress line period.
    pub progress_every: Duration,
    /// Give up downloading after this long.
    pub timeout: Duration,
}

/// Longest seeding phase when only `seed_until_done` is given (the appliance's
/// `swarm.client_seed_limit` applies when it is shorter): loops are bounded.
pub const MAX_SEED_UNTIL_DONE: Duration = Duration::from_secs(3600);
/// How often the appliance is asked whether the swarm is done.
const DONE_POLL: Duration = Duration::from_secs(2);
const HTTP_LIMIT: Duration = Duration::from_secs(20);

/// Figures of a finished fetch.
#[derive(Clone, Debug)]
pub struct FetchReport {
    /// The file.
    pub out: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Seconds from joining to the last verified piece.
    pub download_secs: f64,
    /// Seconds seeded after completion.
    pub seed_secs: f64,
    /// Bytes uploaded to other peers.
    pub uploaded_bytes: u64,
    /// Why seeding stopped.
    pub stopped_because: &'static str,
}

/// The appliance's view of the swarm, on hedged connections ([`http_get::get_retrying_hedged`]),
/// asked again while the appliance does not answer for `wait` (zero: one attempt); `token` ends
/// the wait.
async fn swarm_view(server: SocketAddr, name: &ImageName, wait: Duration, token: &CancellationToken) -> Result<TorrentView, FetchError> {
    let body = http_get::get_retrying_hedged(server, &format!("/api/swarm/{name}"), HTTP_LIMIT, wait, token).await?;
    serde_json::from_slice(&body).map_err(|source| FetchError::Api { name: name.clone(), source })
}

/// The image's .torrent, asked again while the appliance does not answer (a rack joins at once).
async fn torrent_of(server: SocketAddr, name: &ImageName, token: &CancellationToken) -> Result<Vec<u8>, FetchError> {
    Ok(http_get::get_retrying_hedged(server, &format!("/torrents/{name}.torrent"), HTTP_LIMIT, http_get::RETRY_FOR, token).await?)
}

/// Blocks asked of one peer at a time: [`DEFAULT_DEPTH`], or `SI_SWARM_DEPTH` (1..=256) for
/// benchmarking other values.
fn depth() -> usize {
    std::env::var("SI_SWARM_DEPTH").ok().and_then(|v| v.parse().ok()).filter(|d| (1..=256).contains(d)).unwrap_or(DEFAULT_DEPTH)
}

fn engine_err(name: &ImageName) -> impl Fn(EngineError) -> FetchError + '_ {
    move |source| FetchError::Engine { name: name.clone(), source }
}

/// Runs a fetch to completion and through its seeding phase.
///
/// # Errors
/// [`FetchError`]; the partial file is kept (a rerun resumes it after re-checking).
pub async fn run(opts: &FetchOptions, token: &CancellationToken) -> Result<FetchReport, FetchError> {
    let name = &opts.image;
    let torrent = torrent_of(opts.server, name, token).await?;
    let meta = Meta::from_torrent(&torrent).map_err(engine_err(name))?;
    let mut initial: Vec<SocketAddr> = opts.peers.clone();
    let mut seed_limit = MAX_SEED_UNTIL_DONE;
    // The appliance (it served the .torrent) and its seed: never banned by the engine.
    let mut trusted = vec![opts.server.ip()];
    if opts.use_tracker {
        seed_limit = seed_peer_and_limit(opts.server, name, &mut initial, &mut trusted, token).await;
    }
    let own_ip = own_ip(opts.iface.as_deref())?;
    let listen = SocketAddr::V4(SocketAddrV4::new(own_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), opts.listen_port));
    let part_dir = staging(&opts.out)?;
    std::fs::create_dir_all(&part_dir).map_err(|source| FetchError::Output { path: part_dir.clone(), source })?;
    let eopts = EngineOptions {
        listen,
        iface: opts.iface.clone(),
        peers: initial,
        trusted,
        tracker: opts.use_tracker.then_some(opts.server),
        depth: depth(),
        label: name.to_string(),
    };
    let file = part_dir.join(&meta.file_name);
    let engine = Engine::start(meta, &file, eopts, token).await.map_err(engine_err(name))?;
    let result = download_and_seed(opts, &engine, &part_dir, seed_limit, token).await;
    engine.stop().await;
    result
}

/// Asks the appliance for the swarm's view: adds its seed to `initial` (unless the tracker hands
/// the seed out itself, `swarm.seed_peers`) and its address to `trusted`, and returns how long
/// to seed after completion (`MAX_SEED_UNTIL_DONE` when the appliance does not answer: the
/// tracker alone then).
async fn seed_peer_and_limit(
    server: SocketAddr,
    name: &ImageName,
    initial: &mut Vec<SocketAddr>,
    trusted: &mut Vec<IpAddr>,
    token: &CancellationToken,
) -> Duration {
    match swarm_view(server, name, http_get::RETRY_FOR, token).await {
        Ok(v) => {
            let seed_ip = IpAddr::V4(*v.seed_addr.ip());
            if !trusted.contains(&seed_ip) {
                trusted.push(seed_ip);
            }
            if v.seed_peers == 0 {
                initial.push(SocketAddr::V4(v.seed_addr));
            }
            Duration::from_secs(v.seed_limit_secs).min(MAX_SEED_UNTIL_DONE)
        }
        Err(e) => {
            warn!(%name, "no seed address from the appliance, tracker only: {e:#}");
            MAX_SEED_UNTIL_DONE
        }
    }
}

/// The node's own address on `iface` (the engine listens there, so peers see that address), if any.
fn own_ip(iface: Option<&str>) -> Result<Option<Ipv4Addr>, FetchError> {
    Ok(match iface {
        Some(i) => Some(crate::net::discover(i, None)?.ip),
        None => None,
    })
}

/// The staging directory `<dir of out>/.<out name>.part` the download is written in (same file
/// system as `out`, so the finished file is renamed, not copied).
fn staging(out: &Path) -> Result<PathBuf, FetchError> {
    let bad = || FetchError::Output {
        path: out.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    };
    let file = out.file_name().and_then(|f| f.to_str()).ok_or_else(bad)?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok(dir.join(format!(".{file}.part")))
}

async fn download_and_seed(
    opts: &FetchOptions,
    engine: &Engine,
    part_dir: &Path,
    seed_limit: Duration,
    token: &CancellationToken,
) -> Result<FetchReport, FetchError> {
    let name = &opts.image;
    let t0 = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let deadline = tokio::time::Instant::now() + opts.timeout;
    {
        let done = engine.wait_complete();
        tokio::pin!(done);
        let mut tick = tokio::time::interval(opts.progress_every);
        loop {
            tokio::select! {
                // CANCEL-SAFETY: `done` is pinned outside the loop and polled again, never
                // rebuilt; a token, an interval tick (not consumed unless returned) and a sleep
                // until a fixed deadline hold nothing.
                biased;
                _ = token.cancelled() => return Err(FetchError::Interrupted(name.clone())),
                r = &mut done => { r.map_err(engine_err(name))?; break; }
                _ = tick.tick() => last = progress(name, engine, last),
                _ = tokio::time::sleep_until(deadline) => {
                    let st = engine.stats();
                    return Err(FetchError::Timeout { name: name.clone(), limit: opts.timeout, have: st.have, total: st.total });
                }
            }
        }
    }
    let download_secs = t0.elapsed().as_secs_f64();
    // The engine keeps the file open (seeding goes on from the same inode), so renaming it is safe.
    std::fs::rename(engine.path(), &opts.out).map_err(|source| FetchError::Output { path: opts.out.clone(), source })?;
    let st = engine.stats();
    info!(
        %name, bytes = st.total, secs = format!("{download_secs:.2}"),
        mbit_s = format!("{:.1}", st.total as f64 * 8.0 / 1e6 / download_secs.max(1e-3)),
        uploaded = st.uploaded, hash_failures = st.hash_failures, banned = st.banned, out = %opts.out.display(), "download complete"
    );

    // Seed until the appliance says done, or the deadline.
    let t1 = Instant::now();
    let limit = match (opts.seed_for, opts.seed_until_done) {
        (Some(d), _) => d,
        (None, true) => seed_limit,
        (None, false) => Duration::ZERO,
    };
    let seed_deadline = tokio::time::Instant::now() + limit;
    let stopped_because = if limit.is_zero() {
        "seed-time-over"
    } else {
        let ask = opts.seed_until_done && opts.use_tracker;
        let mut show = || last = progress(name, engine, last);
        seed_phase(opts.server, name, ask, seed_deadline, token, Some((opts.progress_every, &mut show))).await
    };
    let _ = std::fs::remove_dir(part_dir);
    let st = engine.stats();
    let seed_secs = t1.elapsed().as_secs_f64();
    info!(%name, uploaded = st.uploaded, seed_secs = format!("{seed_secs:.2}"), reason = stopped_because, "stopped seeding");
    Ok(FetchReport {
        out: opts.out.clone(),
        bytes: st.total,
        download_secs,
        seed_secs,
        uploaded_bytes: st.uploaded,
        stopped_because,
    })
}

/// The seeding phase after completion: until `deadline`, `token`, or (with `ask`) the appliance
/// saying the swarm is done; `progress` is called at its period. Returns why it stopped.
///
/// The appliance is asked every [`DONE_POLL`] by a task of its own (cancelled when the phase
/// ends) on hedged connections ([`http_get::get_retrying_hedged`]), so an answer that is late
/// (a lost SYN in back-off behind a full uplink: seen for 11-15 of 128 emulated nodes,
/// SCALE.md) neither holds the deadline and the token up nor costs more than
/// [`http_get::HEDGE_AFTER`] before another connection asks.
async fn seed_phase(
    server: SocketAddr,
    name: &ImageName,
    ask: bool,
    deadline: tokio::time::Instant,
    token: &CancellationToken,
    mut progress: Option<(Duration, &mut dyn FnMut())>,
) -> &'static str {
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    // The poller ends with this phase (the guard cancels it on every way out).
    let stop = token.child_token();
    let _stop_poller = stop.clone().drop_guard();
    if ask {
        let (name, again) = (name.clone(), stop.clone());
        crate::task::spawn_with_cancel(tracing::info_span!("done-poll"), "swarm done poll", stop, async move {
            let mut poll = tokio::time::interval(DONE_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                poll.tick().await;
                match swarm_view(server, &name, Duration::ZERO, &again).await {
                    Ok(v) if v.done => {
                        let _ = done_tx.send(());
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(%name, "asking the appliance whether the swarm is done: {e:#}"),
                }
            }
        });
    }
    let period = progress.as_ref().map_or(Duration::from_secs(3600), |p| p.0);
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            // CANCEL-SAFETY: a sleep until a fixed deadline, a token, an interval tick and a
            // oneshot receiver (polled by reference, kept across turns) hold nothing.
            biased;
            _ = token.cancelled() => break "signal",
            _ = tokio::time::sleep_until(deadline) => break "seed-time-over",
            Ok(()) = &mut done_rx, if ask => break "swarm-done",
            _ = tick.tick() => {
                if let Some((_, f)) = progress.as_mut() {
                    f();
                }
            }
        }
    }
}

fn progress(name: &ImageName, e: &Engine, (t, b): (Instant, u64)) -> (Instant, u64) {
    let st = e.stats();
    let now = Instant::now();
    let dt = now.duration_since(t).as_secs_f64().max(1e-3);
    let rate = st.have.saturating_sub(b) as f64 * 8.0 / 1e6 / dt;
    let pct = if st.total == 0 { 100.0 } else { st.have as f64 * 100.0 / st.total as f64 };
    info!(
        %name, have = st.have, total = st.total, pct = format!("{pct:.1}"),
        mbit_s = format!("{rate:.1}"), uploaded = st.uploaded, peers = st.peers, "progress"
    );
    (now, st.have)
}

// ---------------------------------------------------------------------------------------------
// The installer's streaming download: the archive is stored by the engine in a directory the
// caller chooses (the target disk, so it is seeded afterwards without a RAM copy) while a reader
// hands its bytes, in file order and only once verified, to a synchronous consumer (the unpacker).

/// What a streaming download needs.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// The appliance's HTTP address.
    pub server: SocketAddr,
    /// The image.
    pub image: ImageName,
    /// Directory the archive is kept in (created if missing).
    pub dir: PathBuf,
    /// Interface to bind to (SO_BINDTODEVICE) and listen on; None: all addresses.
    pub iface: Option<String>,
    /// TCP port for incoming peers.
    pub listen_port: u16,
    /// The info-hash the .torrent must have (the image's signed seal); None: any.
    pub info_hash: Option<[u8; 20]>,
}

/// Counters of a streaming download.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes downloaded and verified.
    pub have: u64,
    /// Archive size.
    pub total: u64,
    /// Bytes uploaded to other peers.
    pub uploaded: u64,
    /// Connected peers.
    pub peers: u32,
    /// Every piece verified.
    pub finished: bool,
    /// The engine's error, when it stopped with one.
    pub error: Option<String>,
}

/// A running download joined to the swarm (tracker + the appliance's seed as initial peer).
/// Uploads to other nodes from the moment it has pieces until [`SwarmStream::stop`].
pub struct SwarmStream {
    name: ImageName,
    server: SocketAddr,
    engine: Engine,
    seed_limit: Duration,
}

/// A blocking [`std::io::Read`] over the archive from offset 0, for a consumer running in
/// `spawn_blocking` (or any thread outside the runtime): each read waits for the next verified
/// bytes, and its position makes the next pieces the first choice.
pub type ArchiveReader = super::engine::Reader;

impl SwarmStream {
    /// Fetches the .torrent and starts the engine (its file under `opts.dir`).
    ///
    /// # Errors
    /// [`FetchError`] when the appliance, the torrent or the engine fail.
    pub async fn start(opts: &StreamOptions, token: &CancellationToken) -> Result<SwarmStream, FetchError> {
        let name = &opts.image;
        let torrent = torrent_of(opts.server, name, token).await?;
        let meta = Meta::from_torrent(&torrent).map_err(engine_err(name))?;
        if let Some(want) = opts.info_hash {
            if meta.info_hash != want {
                return Err(FetchError::InfoHash { name: name.clone(), want: hex::encode(want), got: hex::encode(meta.info_hash) });
            }
        }
        let mut initial = Vec::new();
        let mut trusted = vec![opts.server.ip()];
        let seed_limit = seed_peer_and_limit(opts.server, name, &mut initial, &mut trusted, token).await;
        let own_ip = own_ip(opts.iface.as_deref())?;
        let listen = SocketAddr::V4(SocketAddrV4::new(own_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), opts.listen_port));
        std::fs::create_dir_all(&opts.dir).map_err(|source| FetchError::Output { path: opts.dir.clone(), source })?;
        let file = opts.dir.join(&meta.file_name);
        let eopts = EngineOptions {
            listen,
            iface: opts.iface.clone(),
            peers: initial.clone(),
            trusted,
            tracker: Some(opts.server),
            depth: depth(),
            label: name.to_string(),
        };
        let engine = Engine::start(meta, &file, eopts, token).await.map_err(engine_err(name))?;
        info!(%name, peers = ?initial, dir = %opts.dir.display(), "joined the swarm (streaming)");
        Ok(SwarmStream { name: name.clone(), server: opts.server, engine, seed_limit })
    }

    /// A reader of the whole archive from offset 0; `cancel` ends a read that waits.
    ///
    /// # Errors
    /// None today; kept fallible for the callers.
    pub async fn reader(&self, cancel: CancellationToken) -> Result<ArchiveReader, FetchError> {
        Ok(self.engine.reader(cancel))
    }

    /// The counters now.
    pub fn stats(&self) -> StreamStats {
        let st = self.engine.stats();
        StreamStats { have: st.have, total: st.total, uploaded: st.uploaded, peers: st.peers, finished: st.finished, error: st.error }
    }

    /// Where the archive is kept.
    pub fn file(&self) -> &Path {
        self.engine.path()
    }

    /// Waits until every piece is verified.
    ///
    /// # Errors
    /// [`FetchError::Engine`] when the download stops first.
    pub async fn wait_complete(&self) -> Result<(), FetchError> {
        self.engine.wait_complete().await.map_err(engine_err(&self.name))
    }

    /// Seeds until the appliance reports the swarm done, `limit` (capped by the appliance's
    /// `swarm.client_seed_limit`) passes, or `token` is cancelled; returns why it stopped.
    pub async fn seed_until_done(&self, limit: Duration, token: &CancellationToken) -> &'static str {
        let limit = limit.min(self.seed_limit);
        if limit.is_zero() {
            return "seed-time-over";
        }
        let deadline = tokio::time::Instant::now() + limit;
        seed_phase(self.server, &self.name, true, deadline, token, None).await
    }

    /// Leaves the swarm and closes the archive file.
    pub async fn stop(self) {
        self.engine.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_next_to_the_output() {
        assert_eq!(staging(Path::new("/a/b/img.tar.zst")).unwrap(), Path::new("/a/b/.img.tar.zst.part"));
        assert_eq!(staging(Path::new("img")).unwrap(), Path::new("./.img.part"));
        assert!(staging(Path::new("/")).is_err());
    }

    const DONE_VIEW: &str = r#"{"name":"img","info_hash":"00","size":1,"seed_addr":"10.0.0.1:6881","seed_uploaded_bytes":0,"complete":1,"incomplete":0,"done":true,"seed_limit_secs":60}"#;

    /// An appliance that takes the first connection and never answers it, and says done on the
    /// next: the seeding phase ends on "swarm-done" about [`http_get::HEDGE_AFTER`] after the
    /// first poll (it waited out the GET's 20 s limit before), and a token cancelled while a
    /// poll hangs ends it at once (it waited for the poll before).
    #[tokio::test]
    async fn a_hung_done_poll_neither_delays_done_nor_the_signal() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = l.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                if held.len() == 1 {
                    let r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{DONE_VIEW}", DONE_VIEW.len());
                    s.write_all(r.as_bytes()).await.unwrap();
                }
                held.push(s);
            }
        });
        let name: ImageName = "img".parse().unwrap();
        let token = CancellationToken::new();
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        let t0 = Instant::now();
        let mut ticks = 0;
        let mut count = || ticks += 1;
        let why = seed_phase(server, &name, true, far, &token, Some((Duration::from_millis(100), &mut count))).await;
        let took = t0.elapsed();
        assert_eq!(why, "swarm-done");
        assert!(took >= http_get::HEDGE_AFTER && took < http_get::HEDGE_AFTER + Duration::from_secs(2), "done after {took:?}");
        assert!(ticks >= 10, "progress shown while the poll hung: {ticks} ticks");
        held.abort();

        // Nothing answers at all: the signal ends the phase at once, mid-poll.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = l.local_addr().unwrap();
        let keep = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(l.accept().await.unwrap().0);
            }
        });
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            t.cancel();
        });
        let t0 = Instant::now();
        assert_eq!(seed_phase(silent, &name, true, far, &token, None).await, "signal");
        assert!(t0.elapsed() < Duration::from_secs(2), "stopped {:?} after the first poll", t0.elapsed());
        // And the deadline ends it when the appliance is not asked.
        let soon = tokio::time::Instant::now() + Duration::from_millis(300);
        assert_eq!(seed_phase(silent, &name, false, soon, &CancellationToken::new(), None).await, "seed-time-over");
        keep.abort();
    }
}
