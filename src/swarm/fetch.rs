//! The download side of the swarm (the swarm half of the future installer): fetch an image's
//! .torrent from the appliance, join the swarm through its tracker (with the appliance's seed as
//! an initial peer), upload while downloading, let librqbit verify every piece, move the
//! finished file to its destination and keep seeding until the appliance says the swarm is done
//! or a deadline passes. Like [`seed`](super::seed), one of the two files importing librqbit.
//!
//! Discovery is the tracker only: no DHT, no local service discovery, no UPnP.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use librqbit::{AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, Session, SessionOptions};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api_http::TorrentView;
use super::http_get::{self, GetError};
use super::seed::{LibError, TorrentInfo, torrent_info};
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
    /// The .torrent is unusable.
    #[error("torrent of {name}: {why}")]
    BadTorrent {
        /// Image.
        name: ImageName,
        /// What is wrong.
        why: String,
    },
    /// The interface cannot be used.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// The librqbit session could not start.
    #[error("starting the BitTorrent session on {listen}")]
    Session {
        /// Listen address.
        listen: SocketAddr,
        /// librqbit's error.
        #[source]
        source: LibError,
    },
    /// The torrent could not be added or failed while downloading.
    #[error("downloading {name}")]
    Download {
        /// Image.
        name: ImageName,
        /// librqbit's error.
        #[source]
        source: LibError,
    },
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

fn lib(e: anyhow::Error) -> LibError {
    e.into()
}

async fn swarm_view(server: SocketAddr, name: &ImageName) -> Result<TorrentView, FetchError> {
    let body = http_get::get(server, &format!("/api/swarm/{name}"), HTTP_LIMIT).await?;
    serde_json::from_slice(&body).map_err(|source| FetchError::Api { name: name.clone(), source })
}

/// Runs a fetch to completion and through its seeding phase.
///
/// # Errors
/// [`FetchError`]; the partial file is kept (a rerun resumes it after re-checking).
pub async fn run(opts: &FetchOptions, token: &CancellationToken) -> Result<FetchReport, FetchError> {
    let name = &opts.image;
    let torrent = http_get::get(opts.server, &format!("/torrents/{name}.torrent"), HTTP_LIMIT).await?;
    let ti: TorrentInfo = torrent_info(&torrent).map_err(|why| FetchError::BadTorrent { name: name.clone(), why })?;
    let mut initial: Vec<SocketAddr> = opts.peers.clone();
    let mut seed_limit = MAX_SEED_UNTIL_DONE;
    if opts.use_tracker {
        seed_limit = seed_peer_and_limit(opts.server, name, &mut initial).await;
    }
    let own_ip = own_ip(opts.iface.as_deref())?;
    let listen = SocketAddr::V4(SocketAddrV4::new(own_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), opts.listen_port));
    let part_dir = staging(&opts.out)?;
    std::fs::create_dir_all(&part_dir).map_err(|source| FetchError::Output { path: part_dir.clone(), source })?;

    let session_token = token.child_token();
    let sopts = session_options(opts.iface.clone(), opts.use_tracker, listen, &session_token);
    let session = Session::new_with_opts(part_dir.clone(), sopts)
        .await
        .map_err(|e| FetchError::Session { listen, source: lib(e) })?;
    let result = download_and_seed(opts, &session, torrent, &ti, initial, own_ip, &part_dir, seed_limit, token).await;
    session.stop().await;
    session_token.cancel();
    result
}

/// The session of a node: no DHT, no local discovery, no UPnP, TCP on `listen` only, the
/// appliance's tracker unless `use_tracker` is false.
fn session_options(iface: Option<String>, use_tracker: bool, listen: SocketAddr, token: &CancellationToken) -> SessionOptions {
    SessionOptions {
        dht: None,
        bind_device_name: iface,
        disable_trackers: !use_tracker,
        persistence: None,
        listen: Some(ListenerOptions {
            mode: ListenerMode::TcpOnly,
            listen_addr: listen,
            enable_upnp_port_forwarding: false,
            announce_port: Some(listen.port()),
            ipv4_only: true,
            ..Default::default()
        }),
        cancellation_token: Some(token.clone()),
        disable_local_service_discovery: true,
        ipv4_only: true,
        ..Default::default()
    }
}

/// The staging directory `<dir of out>/.<out name>.part` librqbit writes into (same file system
/// as `out`, so the finished file is renamed, not copied).
/// Asks the appliance for the swarm's view: adds its seed to `initial` (unless the tracker hands
/// the seed out itself, `swarm.seed_peers`) and returns how long to seed after completion
/// (`MAX_SEED_UNTIL_DONE` when the appliance does not answer: the tracker alone then).
async fn seed_peer_and_limit(server: SocketAddr, name: &ImageName, initial: &mut Vec<SocketAddr>) -> Duration {
    match swarm_view(server, name).await {
        Ok(v) => {
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

/// The node's own address on `iface` (librqbit listens there, so peers see that address), if any.
fn own_ip(iface: Option<&str>) -> Result<Option<Ipv4Addr>, FetchError> {
    Ok(match iface {
        Some(i) => Some(crate::net::discover(i, None)?.ip),
        None => None,
    })
}

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

#[allow(clippy::too_many_arguments)]
async fn download_and_seed(
    opts: &FetchOptions,
    session: &std::sync::Arc<Session>,
    torrent: Vec<u8>,
    ti: &TorrentInfo,
    initial: Vec<SocketAddr>,
    own_ip: Option<Ipv4Addr>,
    part_dir: &Path,
    seed_limit: Duration,
    token: &CancellationToken,
) -> Result<FetchReport, FetchError> {
    let name = &opts.image;
    let dl_err = |e: anyhow::Error| FetchError::Download { name: name.clone(), source: lib(e) };
    let part_str = part_dir.to_str().ok_or_else(|| FetchError::Output {
        path: part_dir.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not UTF-8"),
    })?;
    let aopts = AddTorrentOptions {
        // Resume: a partial file from an earlier run is checked and kept.
        overwrite: true,
        output_folder: Some(part_str.to_owned()),
        initial_peers: Some(initial.clone()),
        ..Default::default()
    };
    let t0 = Instant::now();
    let handle = session
        .add_torrent(AddTorrent::from_bytes(torrent), Some(aopts))
        .await
        .map_err(dl_err)?
        .into_handle()
        .ok_or_else(|| FetchError::Download { name: name.clone(), source: "list-only response".into() })?;
    info!(%name, info_hash = %ti.info_hash, size = ti.size, peers = ?initial, tracker = opts.use_tracker, "joined the swarm");

    // Download, with a progress line every period, in this node's rotated piece order.
    let mut last = (Instant::now(), 0u64);
    let deadline = tokio::time::Instant::now() + opts.timeout;
    {
        let start = rotation_start(ti.size, own_ip);
        let rotation = rotate(handle.clone(), start, ti.size);
        tokio::pin!(rotation);
        let mut rotating = true;
        info!(%name, start, "piece order rotated");
        let done = handle.wait_until_completed();
        tokio::pin!(done);
        let mut tick = tokio::time::interval(opts.progress_every);
        loop {
            tokio::select! {
                r = &mut done => { r.map_err(dl_err)?; break; }
                // CANCEL-SAFETY: the rotation only reads; dropping it mid-read loses nothing.
                r = &mut rotation, if rotating => {
                    rotating = false;
                    if let Err(e) = r { warn!(%name, "piece order rotation stopped, file order from here: {e:#}") }
                }
                _ = tick.tick() => last = progress(name, &handle, last),
                _ = tokio::time::sleep_until(deadline) => {
                    let st = handle.stats();
                    return Err(FetchError::Timeout { name: name.clone(), limit: opts.timeout, have: st.progress_bytes, total: st.total_bytes });
                }
                _ = token.cancelled() => return Err(FetchError::Interrupted(name.clone())),
            }
        }
    }
    let download_secs = t0.elapsed().as_secs_f64();
    // The file stays open in librqbit (seeding goes on from the same inode), so renaming it is safe.
    let done_file = part_dir.join(&ti.file_name);
    std::fs::rename(&done_file, &opts.out).map_err(|source| FetchError::Output { path: opts.out.clone(), source })?;
    let st = handle.stats();
    info!(
        %name, bytes = st.total_bytes, secs = format!("{download_secs:.2}"),
        mbit_s = format!("{:.1}", st.total_bytes as f64 * 8.0 / 1e6 / download_secs.max(1e-3)),
        uploaded = st.uploaded_bytes, out = %opts.out.display(), "download complete"
    );

    // Seed until the appliance says done, or the deadline.
    let t1 = Instant::now();
    let limit = match (opts.seed_for, opts.seed_until_done) {
        (Some(d), _) => d,
        (None, true) => seed_limit,
        (None, false) => Duration::ZERO,
    };
    let seed_deadline = tokio::time::Instant::now() + limit;
    let mut stopped_because = "seed-time-over";
    if !limit.is_zero() {
        let mut poll = tokio::time::interval(DONE_POLL);
        let mut tick = tokio::time::interval(opts.progress_every);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(seed_deadline) => break,
                _ = token.cancelled() => { stopped_because = "signal"; break; }
                _ = tick.tick() => last = progress(name, &handle, last),
                _ = poll.tick(), if opts.seed_until_done && opts.use_tracker => {
                    match swarm_view(opts.server, name).await {
                        Ok(v) if v.done => { stopped_because = "swarm-done"; break; }
                        Ok(_) => {}
                        Err(e) => warn!(%name, "asking the appliance whether the swarm is done: {e:#}"),
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir(part_dir);
    let st = handle.stats();
    let seed_secs = t1.elapsed().as_secs_f64();
    info!(%name, uploaded = st.uploaded_bytes, seed_secs = format!("{seed_secs:.2}"), reason = stopped_because, "stopped seeding");
    Ok(FetchReport {
        out: opts.out.clone(),
        bytes: st.total_bytes,
        download_secs,
        seed_secs,
        uploaded_bytes: st.uploaded_bytes,
        stopped_because,
    })
}

/// Where this node starts in the file, so that nodes starting together want different pieces
/// first (librqbit otherwise picks in file order, and a flash crowd asks the seed for the same
/// pieces at the same time: unicast again). From the node's address by the golden-ratio (Weyl)
/// sequence, which spreads consecutive addresses (DHCP hands them out in order) evenly over the
/// file; random without an address.
fn rotation_start(len: u64, ip: Option<Ipv4Addr>) -> u64 {
    if len == 0 {
        return 0;
    }
    let frac = match ip {
        Some(ip) => (u32::from(ip) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) as f64 / u64::MAX as f64,
        None => rand::random::<f64>(),
    };
    ((len as f64 * frac) as u64).min(len - 1)
}

/// Imposes the piece order start..len, then 0..start, through librqbit's public streaming hook:
/// a stream's next 32 MiB are priority pieces for every peer connection, and reading it (the
/// data is discarded) slides that window as pieces are verified. Later the unpacker will be the
/// reader (in file order); this is the download-only order.
async fn rotate(handle: std::sync::Arc<librqbit::ManagedTorrent>, start: u64, len: u64) -> Result<(), LibError> {
    use std::io::SeekFrom;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut s = handle.stream(0).await.map_err(lib)?;
    let mut buf = vec![0u8; 256 * 1024];
    for (from, to) in [(start, len), (0, start)] {
        s.seek(SeekFrom::Start(from)).await?;
        let mut at = from;
        // Bounded: each read advances by at least one byte or ends the segment.
        while at < to {
            let want = ((to - at) as usize).min(buf.len());
            let n = s.read(&mut buf[..want]).await?;
            if n == 0 {
                break;
            }
            at += n as u64;
        }
    }
    Ok(())
}

fn progress(name: &ImageName, h: &librqbit::ManagedTorrent, (t, b): (Instant, u64)) -> (Instant, u64) {
    let st = h.stats();
    let now = Instant::now();
    let dt = now.duration_since(t).as_secs_f64().max(1e-3);
    let rate = st.progress_bytes.saturating_sub(b) as f64 * 8.0 / 1e6 / dt;
    let peers = st.live.as_ref().map_or(0, |l| l.snapshot.peer_stats.live);
    let pct = if st.total_bytes == 0 { 100.0 } else { st.progress_bytes as f64 * 100.0 / st.total_bytes as f64 };
    info!(
        %name, have = st.progress_bytes, total = st.total_bytes, pct = format!("{pct:.1}"),
        mbit_s = format!("{rate:.1}"), uploaded = st.uploaded_bytes, peers, "progress"
    );
    (now, st.progress_bytes)
}

// ---------------------------------------------------------------------------------------------
// The installer's streaming download: the archive is stored by librqbit in a directory the
// caller chooses (the target disk, so it is seeded afterwards without a RAM copy) while a reader
// hands its bytes, in file order and only once verified, to a synchronous consumer (the unpacker).

/// What a streaming download needs.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// The appliance's HTTP address.
    pub server: SocketAddr,
    /// The image.
    pub image: ImageName,
    /// Directory librqbit keeps the archive in (created if missing).
    pub dir: PathBuf,
    /// Interface to bind to (SO_BINDTODEVICE) and listen on; None: all addresses.
    pub iface: Option<String>,
    /// TCP port for incoming peers.
    pub listen_port: u16,
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
    /// librqbit's error, when the torrent stopped with one.
    pub error: Option<String>,
}

/// A running download joined to the swarm (tracker + the appliance's seed as initial peer).
/// Uploads to other nodes from the moment it has pieces until [`SwarmStream::stop`].
pub struct SwarmStream {
    name: ImageName,
    server: SocketAddr,
    session: std::sync::Arc<Session>,
    session_token: CancellationToken,
    handle: std::sync::Arc<librqbit::ManagedTorrent>,
    file: PathBuf,
    seed_limit: Duration,
}

/// A blocking [`std::io::Read`] over the archive from offset 0, for a consumer running in
/// `spawn_blocking` (or any thread outside the runtime): each read waits for the next verified
/// bytes. The stream's position makes the next 32 MiB priority pieces for every peer connection.
pub struct ArchiveReader {
    // librqbit's FileStream (its type is not exported).
    stream: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    rt: tokio::runtime::Handle,
    cancel: CancellationToken,
}

impl std::io::Read for ArchiveReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        let (stream, cancel) = (&mut self.stream, &self.cancel);
        // Not `Interrupted`: readers retry on that kind, and a cancelled download must end them.
        self.rt.block_on(async {
            tokio::select! {
                // CANCEL-SAFETY: a read dropped on cancellation consumed nothing the caller sees.
                r = stream.read(buf) => r,
                _ = cancel.cancelled() => Err(std::io::Error::other("download stopped")),
            }
        })
    }
}

impl SwarmStream {
    /// Fetches the .torrent, starts a session and adds the torrent (its file under `opts.dir`).
    ///
    /// # Errors
    /// [`FetchError`] when the appliance, the torrent or librqbit fail.
    pub async fn start(opts: &StreamOptions, token: &CancellationToken) -> Result<SwarmStream, FetchError> {
        let name = &opts.image;
        let torrent = http_get::get(opts.server, &format!("/torrents/{name}.torrent"), HTTP_LIMIT).await?;
        let ti: TorrentInfo = torrent_info(&torrent).map_err(|why| FetchError::BadTorrent { name: name.clone(), why })?;
        let mut initial = Vec::new();
        let seed_limit = seed_peer_and_limit(opts.server, name, &mut initial).await;
        let own_ip = own_ip(opts.iface.as_deref())?;
        let listen = SocketAddr::V4(SocketAddrV4::new(own_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), opts.listen_port));
        std::fs::create_dir_all(&opts.dir).map_err(|source| FetchError::Output { path: opts.dir.clone(), source })?;
        let dir_str = opts.dir.to_str().ok_or_else(|| FetchError::Output {
            path: opts.dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not UTF-8"),
        })?;
        let session_token = token.child_token();
        let sopts = session_options(opts.iface.clone(), true, listen, &session_token);
        let session = Session::new_with_opts(opts.dir.clone(), sopts)
            .await
            .map_err(|e| FetchError::Session { listen, source: lib(e) })?;
        let aopts = AddTorrentOptions {
            overwrite: true,
            output_folder: Some(dir_str.to_owned()),
            initial_peers: Some(initial.clone()),
            ..Default::default()
        };
        let added = session.add_torrent(AddTorrent::from_bytes(torrent), Some(aopts)).await;
        let handle = match added.map(|r| r.into_handle()) {
            Ok(Some(h)) => h,
            Ok(None) => {
                session.stop().await;
                return Err(FetchError::Download { name: name.clone(), source: "list-only response".into() });
            }
            Err(e) => {
                session.stop().await;
                return Err(FetchError::Download { name: name.clone(), source: lib(e) });
            }
        };
        info!(%name, info_hash = %ti.info_hash, size = ti.size, peers = ?initial, dir = %opts.dir.display(), "joined the swarm (streaming)");
        Ok(SwarmStream {
            name: name.clone(),
            server: opts.server,
            session,
            session_token,
            handle,
            file: opts.dir.join(&ti.file_name),
            seed_limit,
        })
    }

    /// A reader of the whole archive from offset 0; `cancel` ends a read that waits.
    ///
    /// # Errors
    /// [`FetchError::Download`] when librqbit cannot open the stream.
    pub async fn reader(&self, cancel: CancellationToken) -> Result<ArchiveReader, FetchError> {
        let stream = self
            .handle
            .clone()
            .stream(0)
            .await
            .map_err(|e| FetchError::Download { name: self.name.clone(), source: lib(e) })?;
        Ok(ArchiveReader { stream: Box::pin(stream), rt: tokio::runtime::Handle::current(), cancel })
    }

    /// The counters now.
    pub fn stats(&self) -> StreamStats {
        let st = self.handle.stats();
        StreamStats {
            have: st.progress_bytes,
            total: st.total_bytes,
            uploaded: st.uploaded_bytes,
            peers: st.live.as_ref().map_or(0, |l| l.snapshot.peer_stats.live as u32),
            finished: st.finished,
            error: st.error.clone(),
        }
    }

    /// Where librqbit keeps the archive.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Waits until every piece is verified.
    ///
    /// # Errors
    /// [`FetchError::Download`] when the torrent fails.
    pub async fn wait_complete(&self) -> Result<(), FetchError> {
        self.handle
            .wait_until_completed()
            .await
            .map_err(|e| FetchError::Download { name: self.name.clone(), source: lib(e) })
    }

    /// Seeds until the appliance reports the swarm done, `limit` (capped by the appliance's
    /// `swarm.client_seed_limit`) passes, or `token` is cancelled; returns why it stopped.
    pub async fn seed_until_done(&self, limit: Duration, token: &CancellationToken) -> &'static str {
        let limit = limit.min(self.seed_limit);
        if limit.is_zero() {
            return "seed-time-over";
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut poll = tokio::time::interval(DONE_POLL);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return "seed-time-over",
                _ = token.cancelled() => return "signal",
                _ = poll.tick() => match swarm_view(self.server, &self.name).await {
                    Ok(v) if v.done => return "swarm-done",
                    Ok(_) => {}
                    Err(e) => warn!(name = %self.name, "asking the appliance whether the swarm is done: {e:#}"),
                },
            }
        }
    }

    /// Leaves the swarm and closes the archive file.
    pub async fn stop(self) {
        self.session.stop().await;
        self.session_token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_addresses_start_far_apart() {
        let len = 1 << 30;
        let mut starts: Vec<u64> = (11..19).map(|i| rotation_start(len, Some(Ipv4Addr::new(10, 0, 0, i)))).collect();
        starts.sort();
        let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        // Eight golden-ratio points on a circle: no two closer than a twentieth of the file.
        assert!(gaps.iter().all(|g| *g > len / 20), "{starts:?}");
        assert!(starts.iter().all(|s| *s < len));
        assert_eq!(rotation_start(0, None), 0);
        assert!(rotation_start(1, None) == 0);
    }

    #[test]
    fn staging_is_next_to_the_output() {
        assert_eq!(staging(Path::new("/a/b/img.tar.zst")).unwrap(), Path::new("/a/b/.img.tar.zst.part"));
        assert_eq!(staging(Path::new("img")).unwrap(), Path::new("./.img.part"));
        assert!(staging(Path::new("/")).is_err());
    }
}
