//! The node-to-node BitTorrent engine of the download side (`fetch` and the installer): our own
//! piece scheduler ([`picker`]) on the standard wire ([`wire`]), so aria2c, transmission and the
//! appliance's librqbit seed are ordinary peers.
//!
//! Why not librqbit here: librqbit 9.1.0 picks pieces in file order and its per-peer requester
//! sleeps up to 5 s when a peer has nothing new (a HAVE does not wake it), which in a flash
//! crowd leaves leecher-to-leecher links idle and sends most bytes through the seed (see
//! SWARM.md). Here every event that can give a connection work re-plans its requests at once,
//! pieces go rarest-first with a random tie-break, and endgame duplicates the last blocks.
//!
//! Shape: one `Mutex<St>` (the picker, the connections, the known addresses) never held across
//! an await; per connection a reader task (parses, updates the state, queues requests to the
//! connection's writer) and a writer task (frames, and blocks read from the file when their turn
//! comes, so queued uploads cost no memory). Blocks are written to the file as they arrive; a
//! complete piece is read back and hashed off the runtime; a piece that fails its hash is
//! fetched again: a sole sender is banned, a piece with several senders is fetched whole from
//! one peer (the appliance's seed first) and the blocks that differ name the liars. Hostile
//! peers meet the rules of [`guard`]: connection caps (total and per address, after the
//! handshake too), a bounded send queue per connection, choke flapping cut off, and the
//! appliance's seed (`EngineOptions::trusted`) never banned.

pub mod guard;
pub mod picker;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::guard::{Admit, ChokeMeter, Cooloff, Failure};
pub use self::guard::{MAX_CONNS, MAX_CONNS_PER_IP};
use self::picker::{Block, Got, PeerKey, Picker};
use self::wire::{Handshake, Msg, WireError};
use super::http_get;

/// Blocks asked of one peer at a time (16 KiB each). Enough to keep a LAN link busy without
/// queueing seconds of data behind a shaped uplink (a piece is shared only once complete).
pub const DEFAULT_DEPTH: usize = 12;
/// Blocks asked of all peers together, at most (spread evenly, within MIN_DEPTH..=depth).
pub const DEPTH_BUDGET: usize = 96;
/// Blocks asked of any one peer at least (up to the configured depth).
pub const MIN_DEPTH: usize = 4;
/// Incoming connections waiting for their handshake, at most (more are closed at once).
const MAX_HANDSHAKES: usize = 32;
/// A request unanswered this long is asked of another peer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection silent this long is closed (peers send keep-alives every 2 min at most).
const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
const KEEPALIVE: Duration = Duration::from_secs(90);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Uploads one peer may have queued before it is dropped as abusive.
const MAX_QUEUED_UPLOADS: u64 = 2048;
/// Messages queued to one connection's writer, at most: its uploads plus this many frames
/// (requests, HAVEs). A peer that does not read fills it and is closed.
const SEND_QUEUE: usize = MAX_QUEUED_UPLOADS as usize + 1024;
/// Sequential readers make this much after their position the first choice.
const STREAM_WINDOW_BYTES: u64 = 8 << 20;
const HTTP_LIMIT: Duration = Duration::from_secs(10);

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The .torrent is unusable.
    #[error("torrent: {0}")]
    Torrent(String),
    /// The data file cannot be created, sized, read or written.
    #[error("data file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The listening socket cannot be opened.
    #[error("listening on {addr}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The download stopped (cancelled, or a fatal error recorded earlier).
    #[error("download stopped: {0}")]
    Stopped(String),
}

/// What the engine needs of a torrent.
#[derive(Clone, Debug)]
pub struct Meta {
    /// Info-hash.
    pub info_hash: [u8; 20],
    /// Piece length.
    pub piece_len: u32,
    /// File length.
    pub total: u64,
    /// SHA-1 of every piece.
    pub hashes: Vec<[u8; 20]>,
    /// The single file's name.
    pub file_name: String,
}

impl Meta {
    /// From .torrent bytes (a single-file v1 torrent; see [`super::seed::torrent_info`]).
    ///
    /// # Errors
    /// [`EngineError::Torrent`].
    pub fn from_torrent(bytes: &[u8]) -> Result<Meta, EngineError> {
        let ti = super::seed::torrent_info(bytes).map_err(EngineError::Torrent)?;
        Ok(Meta { info_hash: ti.info_hash.0, piece_len: ti.piece_len, total: ti.size, hashes: ti.hashes, file_name: ti.file_name })
    }
}

/// How to run.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Address to accept peers on (port 0: any).
    pub listen: SocketAddr,
    /// Interface to bind every socket to (SO_BINDTODEVICE).
    pub iface: Option<String>,
    /// Peers to connect to at once (the appliance's seed, `--peer`).
    pub peers: Vec<SocketAddr>,
    /// The appliance's addresses (its seed): never banned, always admitted, first choice to
    /// fetch again a piece that failed with several senders.
    pub trusted: Vec<IpAddr>,
    /// The appliance's HTTP address, whose `/announce` is the tracker (None: no tracker).
    pub tracker: Option<SocketAddr>,
    /// Blocks asked of one peer at a time.
    pub depth: usize,
    /// A label for the logs (the image name).
    pub label: String,
}

/// Counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Verified bytes.
    pub have: u64,
    /// File length.
    pub total: u64,
    /// Block bytes sent to peers.
    pub uploaded: u64,
    /// Connected peers.
    pub peers: u32,
    /// Every piece verified.
    pub finished: bool,
    /// Why it stopped, when it did.
    pub error: Option<String>,
    /// Pieces that failed their hash.
    pub hash_failures: u32,
    /// Peers banned.
    pub banned: u32,
}

enum Out {
    Frame(Vec<u8>),
    Block(Block),
}

struct Conn {
    tx: mpsc::Sender<Out>,
    /// Closes the connection (both its tasks).
    close: CancellationToken,
    ip: IpAddr,
    peer_id: [u8; 20],
    interested: bool,
    outgoing: bool,
    /// Block bytes received from it, sent to it.
    down: u64,
    up: Arc<AtomicU64>,
}

#[derive(Default)]
struct Known {
    next_try: Option<Instant>,
    fails: u32,
    connecting: bool,
    is_self: bool,
}

struct St {
    picker: Picker,
    conns: HashMap<PeerKey, Conn>,
    known: HashMap<SocketAddr, Known>,
    banned: HashSet<IpAddr>,
    /// Flapping peers' addresses, kept away for a while.
    cooloff: Cooloff,
    /// Suspect pieces: (sender, SHA-1) of each block of the copy that failed, until a copy
    /// from one peer verifies and names the liars.
    bad_copies: HashMap<u32, Vec<(IpAddr, [u8; 20])>>,
    /// Every connection's address, kept after it closes while its blocks are in unverified
    /// pieces (a failed piece names its senders).
    ip_of: HashMap<PeerKey, IpAddr>,
    rng: StdRng,
    next_key: PeerKey,
    error: Option<String>,
    hash_failures: u32,
}

struct Shared {
    meta: Meta,
    file: std::fs::File,
    path: PathBuf,
    peer_id: [u8; 20],
    own: Option<Ipv4Addr>,
    listen_port: u16,
    trusted: HashSet<IpAddr>,
    /// Incoming connections in their handshake.
    handshakes: std::sync::atomic::AtomicUsize,
    opts: EngineOptions,
    st: Mutex<St>,
    /// Bumped on every verified piece and on a fatal error (readers and waiters watch it).
    changes: watch::Sender<u64>,
    uploaded: AtomicU64,
    cancel: CancellationToken,
}

/// A running torrent: downloading until complete, then seeding until [`Engine::stop`].
pub struct Engine {
    sh: Arc<Shared>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        // A poisoned lock means a panic mid-update of plain data; carry on with it.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, why: String) {
        let mut st = self.lock();
        if st.error.is_none() {
            warn!(torrent = %self.opts.label, "download stopped: {why}");
            st.error = Some(why);
        }
        drop(st);
        self.changes.send_modify(|g| *g += 1);
        self.cancel.cancel();
    }
}

/// Queues `o` to a connection's writer; a full queue (the peer does not read) closes it.
fn send(c: &Conn, o: Out) {
    if let Err(mpsc::error::TrySendError::Full(_)) = c.tx.try_send(o) {
        if !c.close.is_cancelled() {
            warn!(ip = %c.ip, "peer closed: its send queue is full (it does not read)");
            c.close.cancel();
        }
    }
}

/// Re-plans `k`'s requests and interest; sends what is new.
fn plan(st: &mut St, k: PeerKey, depth: usize) {
    let want = st.picker.interested(k);
    // Shared out over the connections: with many peers, a few blocks each. Every peer (the
    // seed first) then serves many request-clocked flows that each have little queued, which
    // keeps a shaped uplink's queue short and its flows fair (measured: with 12 blocks to
    // each of 32 peers, some flows to the seed starved for seconds).
    let depth = (DEPTH_BUDGET / st.conns.len().max(1)).clamp(MIN_DEPTH.min(depth), depth);
    let reqs = st.picker.next_requests(k, depth, Instant::now(), &mut st.rng);
    let Some(c) = st.conns.get_mut(&k) else { return };
    if want != c.interested {
        c.interested = want;
        send(c, Out::Frame(if want { Msg::Interested } else { Msg::NotInterested }.encode()));
    }
    for b in reqs {
        send(c, Out::Frame(Msg::Request { piece: b.piece, begin: b.begin, len: b.len }.encode()));
    }
}

fn plan_all(st: &mut St, depth: usize) {
    for k in st.picker.peer_keys() {
        plan(st, k, depth);
    }
}

impl Engine {
    /// Opens (or creates, reserving the space) the data file at `path`, checks the pieces it
    /// already holds, listens, and starts connecting and announcing.
    ///
    /// # Errors
    /// [`EngineError`] when the file or the listening socket cannot be used.
    pub async fn start(meta: Meta, path: &Path, opts: EngineOptions, token: &CancellationToken) -> Result<Engine, EngineError> {
        let ferr = |source| EngineError::File { path: path.to_owned(), source };
        let (file, have) = {
            let (meta, path) = (meta.clone(), path.to_owned());
            tokio::task::spawn_blocking(move || open_and_check(&meta, &path))
                .await
                .map_err(|e| ferr(io::Error::other(e)))?
                .map_err(ferr)?
        };
        let resumed = have.iter().filter(|h| **h).count();
        let listener = listen(&opts).map_err(|source| EngineError::Listen { addr: opts.listen, source })?;
        let listen_port = listener.local_addr().map_err(|source| EngineError::Listen { addr: opts.listen, source })?.port();
        let mut peer_id = *b"-SI0100-000000000000";
        for b in &mut peer_id[8..] {
            *b = b"0123456789abcdefghijklmnopqrstuvwxyz"[rand::random_range(0..36)];
        }
        let mut picker = Picker::new(meta.piece_len, meta.total, &have);
        let mut known = HashMap::new();
        for p in &opts.peers {
            known.insert(*p, Known::default());
        }
        let own = match opts.listen.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        };
        if let Some(ip) = own {
            picker.set_own_order(u32::from(ip));
        }
        let sh = Arc::new(Shared {
            file,
            path: path.to_owned(),
            peer_id,
            own,
            listen_port,
            trusted: opts.trusted.iter().copied().collect(),
            handshakes: std::sync::atomic::AtomicUsize::new(0),
            st: Mutex::new(St {
                picker,
                conns: HashMap::new(),
                known,
                banned: HashSet::new(),
                cooloff: Cooloff::default(),
                bad_copies: HashMap::new(),
                ip_of: HashMap::new(),
                rng: StdRng::from_rng(&mut rand::rng()),
                next_key: 1,
                error: None,
                hash_failures: 0,
            }),
            changes: watch::channel(0).0,
            uploaded: AtomicU64::new(0),
            cancel: token.child_token(),
            meta,
            opts,
        });
        info!(
            torrent = %sh.opts.label, pieces = sh.meta.hashes.len(), piece_len = sh.meta.piece_len, resumed,
            port = listen_port, peers = ?sh.opts.peers, tracker = ?sh.opts.tracker, trusted = ?sh.opts.trusted, "swarm engine started"
        );
        tokio::spawn(accept_loop(sh.clone(), listener));
        tokio::spawn(tick_loop(sh.clone()));
        if let Some(t) = sh.opts.tracker {
            tokio::spawn(announce_loop(sh.clone(), t));
        }
        Ok(Engine { sh })
    }

    /// The counters now.
    pub fn stats(&self) -> EngineStats {
        let st = self.sh.lock();
        EngineStats {
            have: st.picker.have_bytes(),
            total: self.sh.meta.total,
            uploaded: self.sh.uploaded.load(Ordering::Relaxed),
            peers: st.conns.len() as u32,
            finished: st.picker.complete(),
            error: st.error.clone(),
            hash_failures: st.hash_failures,
            banned: st.banned.len() as u32,
        }
    }

    /// The port peers connect to.
    pub fn port(&self) -> u16 {
        self.sh.listen_port
    }

    /// The data file.
    pub fn path(&self) -> &Path {
        &self.sh.path
    }

    /// Waits until every piece is verified.
    ///
    /// # Errors
    /// [`EngineError::Stopped`] when the engine stops first.
    pub async fn wait_complete(&self) -> Result<(), EngineError> {
        let mut rx = self.sh.changes.subscribe();
        loop {
            {
                let st = self.sh.lock();
                if st.picker.complete() {
                    return Ok(());
                }
                if let Some(e) = &st.error {
                    return Err(EngineError::Stopped(e.clone()));
                }
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(EngineError::Stopped("engine gone".into())) },
                _ = self.sh.cancel.cancelled() => return Err(EngineError::Stopped("cancelled".into())),
            }
        }
    }

    /// A blocking reader of the file from offset 0 that returns only verified bytes, waiting
    /// for them (for a consumer outside the runtime, e.g. in `spawn_blocking`); its position
    /// makes the next pieces the first choice. `cancel` ends a read that waits.
    pub fn reader(&self, cancel: CancellationToken) -> Reader {
        Reader { sh: self.sh.clone(), pos: 0, rt: tokio::runtime::Handle::current(), cancel }
    }

    /// Leaves the swarm: tells the tracker (briefly), closes every connection.
    pub async fn stop(self) {
        if let Some(t) = self.sh.opts.tracker {
            let _ = tokio::time::timeout(Duration::from_secs(2), announce(&self.sh, t, "stopped")).await;
        }
        self.sh.cancel.cancel();
        let mut st = self.sh.lock();
        for c in st.conns.values() {
            debug!(ip = %c.ip, outgoing = c.outgoing, down = c.down, up = c.up.load(Ordering::Relaxed), "connection at stop");
            c.close.cancel();
        }
        st.conns.clear();
    }
}

impl Drop for Engine {
    /// An engine dropped without [`Engine::stop`] (an error path) still ends its tasks and
    /// connections.
    fn drop(&mut self) {
        self.sh.cancel.cancel();
    }
}

/// See [`Engine::reader`].
pub struct Reader {
    sh: Arc<Shared>,
    pos: u64,
    rt: tokio::runtime::Handle,
    cancel: CancellationToken,
}

impl io::Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let sh = &self.sh;
        if self.pos >= sh.meta.total || buf.is_empty() {
            return Ok(0);
        }
        let plen = sh.meta.piece_len as u64;
        let piece = (self.pos / plen) as u32;
        let mut rx = sh.changes.subscribe();
        loop {
            {
                let mut st = sh.lock();
                if st.picker.has(piece) {
                    break;
                }
                if let Some(e) = &st.error {
                    return Err(io::Error::other(format!("download stopped: {e}")));
                }
                let w = STREAM_WINDOW_BYTES.div_ceil(plen).max(2) as u32;
                st.picker.set_window(piece, w);
            }
            let cancel = &self.cancel;
            // Not `Interrupted`: readers retry on that kind, and a cancelled download must end them.
            self.rt.block_on(async {
                tokio::select! {
                    r = rx.changed() => r.map_err(|_| io::Error::other("download stopped")),
                    _ = cancel.cancelled() => Err(io::Error::other("download stopped")),
                    _ = sh.cancel.cancelled() => Err(io::Error::other("download stopped")),
                }
            })?;
        }
        let end = ((piece as u64 + 1) * plen).min(sh.meta.total);
        let n = ((end - self.pos) as usize).min(buf.len());
        sh.file.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Opens or creates the file, reserves its length, and hashes what it holds (a resumed
/// download keeps its verified pieces).
fn open_and_check(meta: &Meta, path: &Path) -> io::Result<(std::fs::File, Vec<bool>)> {
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    let len = f.metadata()?.len();
    let n = meta.hashes.len();
    if len != meta.total {
        f.set_len(0)?;
        reserve(&f, meta.total)?;
        return Ok((f, vec![false; n]));
    }
    let mut have = vec![false; n];
    let mut buf = vec![0u8; meta.piece_len as usize];
    for (i, h) in have.iter_mut().enumerate() {
        let start = i as u64 * meta.piece_len as u64;
        let size = (meta.total - start).min(meta.piece_len as u64) as usize;
        f.read_exact_at(&mut buf[..size], start)?;
        *h = Sha1::digest(&buf[..size]).as_slice() == meta.hashes[i];
    }
    Ok((f, have))
}

/// Allocates the file's blocks now, so a full disk is an error at the start rather than in the
/// middle (falls back to a sparse length where the file system cannot allocate).
fn reserve(f: &std::fs::File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: a plain syscall on an open descriptor we own; no memory is passed.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len as libc::off_t) };
    match r {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => f.set_len(len),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

fn socket(opts: &EngineOptions) -> io::Result<TcpSocket> {
    let s = TcpSocket::new_v4()?;
    if let Some(i) = &opts.iface {
        s.bind_device(Some(i.as_bytes()))?;
    }
    Ok(s)
}

fn listen(opts: &EngineOptions) -> io::Result<TcpListener> {
    let s = socket(opts)?;
    s.set_reuseaddr(true)?;
    s.bind(opts.listen)?;
    s.listen(256)
}

async fn accept_loop(sh: Arc<Shared>, l: TcpListener) {
    loop {
        let (s, addr) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: keep serving the connections we have.
                    warn!(torrent = %sh.opts.label, "accepting a peer: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = sh.cancel.cancelled() => return,
        };
        let trusted = sh.trusted.contains(&addr.ip());
        let verdict = {
            let st = sh.lock();
            let ip = addr.ip();
            let distrusted = st.banned.contains(&ip) || st.cooloff.holds(&ip, Instant::now());
            let from_ip = st.conns.values().filter(|c| c.ip == ip).count();
            guard::admit(trusted, distrusted, st.conns.len(), from_ip)
        };
        let pending = sh.handshakes.load(Ordering::Relaxed);
        if verdict != Admit::Yes || (pending >= MAX_HANDSHAKES && !trusted) {
            debug!(%addr, ?verdict, pending, "incoming peer refused");
            continue;
        }
        sh.handshakes.fetch_add(1, Ordering::Relaxed);
        let sh2 = sh.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&sh2, s, false)).await;
            sh2.handshakes.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(Ok((s, hs))) => run_conn(sh2, s, addr, hs, false, None).await,
                Ok(Err(e)) => debug!(%addr, "incoming handshake: {e}"),
                Err(_) => debug!(%addr, "incoming handshake timed out"),
            }
        });
    }
}

/// Exchanges handshakes; outgoing sends first. Refuses another torrent and ourselves.
async fn handshake(sh: &Shared, mut s: TcpStream, outgoing: bool) -> Result<(TcpStream, Handshake), WireError> {
    let ours = Handshake { info_hash: sh.meta.info_hash, peer_id: sh.peer_id }.encode();
    if outgoing {
        s.write_all(&ours).await?;
    }
    let mut b = [0u8; wire::HANDSHAKE_LEN];
    s.read_exact(&mut b).await?;
    let hs = Handshake::decode(&b)?;
    if hs.info_hash != sh.meta.info_hash {
        return Err(WireError::Io(io::Error::other("another torrent")));
    }
    if hs.peer_id == sh.peer_id {
        return Err(WireError::Io(io::Error::other("connected to ourselves")));
    }
    if !outgoing {
        s.write_all(&ours).await?;
    }
    Ok((s, hs))
}

async fn connect(sh: Arc<Shared>, addr: SocketAddr) {
    let r = async {
        let s = socket(&sh.opts)?;
        if let Some(ip) = sh.own {
            s.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))?;
        }
        let s = tokio::time::timeout(CONNECT_TIMEOUT, s.connect(addr)).await.map_err(|_| io::Error::other("connect timed out"))??;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&sh, s, true))
            .await
            .map_err(|_| io::Error::other("handshake timed out"))?
            .map_err(io::Error::other)
    }
    .await;
    match r {
        Ok((s, hs)) => run_conn(sh, s, addr, hs, true, Some(addr)).await,
        Err(e) => {
            debug!(%addr, "connecting: {e}");
            let mut st = sh.lock();
            let self_conn = e.to_string().contains("ourselves");
            if let Some(k) = st.known.get_mut(&addr) {
                k.connecting = false;
                k.fails += 1;
                k.is_self |= self_conn;
                k.next_try = Some(Instant::now() + backoff(k.fails));
            }
        }
    }
}

fn backoff(fails: u32) -> Duration {
    Duration::from_millis(500u64 << fails.min(6)).min(Duration::from_secs(30))
}

/// Registers a connection (or refuses a duplicate), then runs it until it ends.
async fn run_conn(sh: Arc<Shared>, s: TcpStream, addr: SocketAddr, hs: Handshake, outgoing: bool, known: Option<SocketAddr>) {
    let _ = s.set_nodelay(true);
    let (rd, wr) = s.into_split();
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    let close = sh.cancel.child_token();
    let queued_up = Arc::new(AtomicU64::new(0));
    let up = Arc::new(AtomicU64::new(0));
    let depth = sh.opts.depth;
    let ip = addr.ip();
    let trusted = sh.trusted.contains(&ip);
    let key = {
        let mut st = sh.lock();
        if let Some(k) = known.and_then(|a| st.known.get_mut(&a)) {
            k.connecting = false;
        }
        if st.error.is_some() || sh.cancel.is_cancelled() {
            return;
        }
        // One connection per peer id: of two, keep the one opened by the smaller id (both
        // sides decide the same way).
        let keep_new = (sh.peer_id < hs.peer_id) == outgoing;
        let dup = st.conns.iter().find(|(_, c)| c.peer_id == hs.peer_id).map(|(k, _)| *k);
        if dup.is_some() && !keep_new {
            debug!(%addr, "duplicate connection dropped");
            return;
        }
        // The caps again, now that the handshake is done (many may have been in flight); a
        // duplicate about to be replaced does not count.
        let distrusted = st.banned.contains(&ip) || st.cooloff.holds(&ip, Instant::now());
        let others = st.conns.iter().filter(|(k, _)| Some(**k) != dup);
        let (total, from_ip) = others.fold((0, 0), |(t, f), (_, c)| (t + 1, f + usize::from(c.ip == ip)));
        let verdict = guard::admit(trusted, distrusted, total, from_ip);
        if verdict != Admit::Yes {
            debug!(%addr, ?verdict, "peer refused after its handshake");
            return;
        }
        if let Some(old) = dup {
            if let Some(c) = st.conns.remove(&old) {
                c.close.cancel();
            }
            if st.picker.remove_peer(old) {
                plan_all(&mut st, depth);
            }
        }
        let key = st.next_key;
        st.next_key += 1;
        st.picker.add_peer(key);
        if trusted {
            st.picker.set_trusted(key);
        }
        if let IpAddr::V4(ip) = ip {
            st.picker.set_order(key, u32::from(ip));
        }
        st.ip_of.insert(key, ip);
        let c = Conn { tx, close: close.clone(), ip, peer_id: hs.peer_id, interested: false, outgoing, down: 0, up: up.clone() };
        if st.picker.have_count() > 0 {
            send(&c, Out::Frame(Msg::Bitfield(wire::bitfield(&st.picker.have_flags())).encode()));
        }
        // A LAN swarm of cooperating nodes: everyone is unchoked, always.
        send(&c, Out::Frame(Msg::Unchoke.encode()));
        st.conns.insert(key, c);
        if let Some(k) = known.and_then(|a| st.known.get_mut(&a)) {
            k.fails = 0;
        }
        key
    };
    debug!(%addr, key, outgoing, "peer connected");
    let writer = tokio::spawn(write_loop(sh.clone(), wr, rx, queued_up.clone(), up, close.clone()));
    let why = read_loop(&sh, key, ip, trusted, rd, &queued_up, &close).await;
    close.cancel();
    {
        let mut st = sh.lock();
        let gone = st.conns.remove(&key);
        if let Some(c) = &gone {
            debug!(%addr, key, outgoing, down = c.down, up = c.up.load(Ordering::Relaxed), "peer gone: {why}");
        }
        if gone.is_some() && st.picker.remove_peer(key) {
            plan_all(&mut st, depth);
        } else {
            st.picker.remove_peer(key);
        }
        // Its address is kept only while its blocks wait for a verdict (a peer reconnecting
        // again and again must not grow the map).
        if !st.picker.holds_blocks_from(key) {
            st.ip_of.remove(&key);
        }
        if let Some(k) = known.and_then(|a| st.known.get_mut(&a)) {
            k.next_try = Some(Instant::now() + backoff(k.fails));
        }
    }
    let _ = writer.await;
}

async fn read_loop(
    sh: &Arc<Shared>,
    key: PeerKey,
    ip: IpAddr,
    trusted: bool,
    rd: tokio::net::tcp::OwnedReadHalf,
    queued_up: &AtomicU64,
    close: &CancellationToken,
) -> String {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut buf = Vec::new();
    let max = wire::max_body(sh.meta.hashes.len() as u32);
    let depth = sh.opts.depth;
    let mut chokes = ChokeMeter::default();
    loop {
        let msg = tokio::select! {
            // CANCEL-SAFETY: read_msg keeps a partial message in `rd`/`buf` only for this
            // connection, which ends on either of the other arms.
            r = tokio::time::timeout(IDLE_TIMEOUT, wire::read_msg(&mut rd, &mut buf, max)) => match r {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return "idle".into(),
            },
            _ = close.cancelled() => return "closed".into(),
        };
        let mut st = sh.lock();
        if !st.conns.contains_key(&key) {
            return "closed".into();
        }
        match msg {
            Msg::KeepAlive | Msg::Interested | Msg::NotInterested | Msg::Other(_) | Msg::Cancel { .. } => {}
            Msg::Choke => {
                if chokes.choke(Instant::now()) && !trusted {
                    // Each choke frees its requests and each unchoke asks again: cut it off.
                    st.cooloff.add(ip, Instant::now());
                    warn!(torrent = %sh.opts.label, %ip, cooloff_secs = guard::FLAP_COOLOFF.as_secs(), "peer closed: it chokes too often");
                    return "choke flapping".into();
                }
                if st.picker.choked(key, true) {
                    plan_all(&mut st, depth);
                }
            }
            Msg::Unchoke => {
                st.picker.choked(key, false);
                plan(&mut st, key, depth);
            }
            Msg::Have(i) => {
                if st.picker.have(key, i).is_none() {
                    return format!("HAVE {i} out of range");
                }
                plan(&mut st, key, depth);
            }
            Msg::Bitfield(b) => {
                let Some(bits) = wire::parse_bitfield(&b, sh.meta.hashes.len() as u32) else {
                    return "bad bitfield".into();
                };
                st.picker.bitfield(key, bits);
                plan(&mut st, key, depth);
            }
            Msg::Request { piece, begin, len } => {
                if !st.picker.can_serve(piece, begin, len) {
                    debug!(key, piece, begin, len, "request for what we do not have: ignored");
                    continue;
                }
                if queued_up.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_UPLOADS {
                    return "too many queued requests".into();
                }
                if let Some(c) = st.conns.get(&key) {
                    send(c, Out::Block(Block { piece, begin, len }));
                }
            }
            Msg::Piece { piece, begin, data } => {
                match st.picker.got(key, piece, begin, data.len()) {
                    Got::Unexpected => {}
                    Got::Take { complete, cancel } => {
                        if let Some(c) = st.conns.get_mut(&key) {
                            c.down += data.len() as u64;
                        }
                        let off = piece as u64 * sh.meta.piece_len as u64 + begin as u64;
                        if let Err(e) = sh.file.write_all_at(&data, off) {
                            drop(st);
                            sh.fail(format!("writing {}: {e}", sh.path.display()));
                            return "write failed".into();
                        }
                        for (k, b) in cancel {
                            if let Some(c) = st.conns.get(&k) {
                                send(c, Out::Frame(Msg::Cancel { piece: b.piece, begin: b.begin, len: b.len }.encode()));
                            }
                            plan(&mut st, k, depth);
                        }
                        if complete {
                            tokio::spawn(verify(sh.clone(), piece));
                        }
                    }
                }
                plan(&mut st, key, depth);
            }
        }
    }
}

async fn write_loop(
    sh: Arc<Shared>,
    wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    queued_up: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    close: CancellationToken,
) {
    let mut wr = wr;
    let mut buf: Vec<u8> = Vec::with_capacity(128 * 1024);
    let plen = sh.meta.piece_len as u64;
    loop {
        let first = tokio::select! {
            // CANCEL-SAFETY: recv is cancel-safe; on close the queue is dropped.
            r = tokio::time::timeout(KEEPALIVE, rx.recv()) => match r {
                Ok(Some(o)) => o,
                Ok(None) => break,
                Err(_) => Out::Frame(Msg::KeepAlive.encode()),
            },
            _ = close.cancelled() => break,
        };
        buf.clear();
        let mut next = Some(first);
        // Gather what is ready (up to 256 KiB) into one write.
        while let Some(o) = next.take() {
            match o {
                Out::Frame(f) => buf.extend_from_slice(&f),
                Out::Block(b) => {
                    queued_up.fetch_sub(1, Ordering::Relaxed);
                    let at = buf.len();
                    buf.extend_from_slice(&wire::piece_header(b.piece, b.begin, b.len));
                    buf.resize(at + 13 + b.len as usize, 0);
                    if let Err(e) = sh.file.read_exact_at(&mut buf[at + 13..], b.piece as u64 * plen + b.begin as u64) {
                        warn!(torrent = %sh.opts.label, "reading a block to upload: {e}");
                        buf.truncate(at);
                        continue;
                    }
                    sh.uploaded.fetch_add(b.len as u64, Ordering::Relaxed);
                    up.fetch_add(b.len as u64, Ordering::Relaxed);
                }
            }
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        let w = tokio::select! {
            // CANCEL-SAFETY: a write cut short ends the connection, so its stream state no
            // longer matters.
            r = wr.write_all(&buf) => r,
            _ = close.cancelled() => break,
        };
        if w.is_err() {
            break;
        }
    }
    // A peer that does not read must not hold this task: the shutdown is bounded.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

/// Hashes a complete piece off the runtime; then it is ours (HAVE to every peer) or fetched
/// again, its senders judged by [`guard::failed_piece`]; a suspect piece that verifies names
/// the liars of its failed copy ([`guard::liars`]).
async fn verify(sh: Arc<Shared>, piece: u32) {
    let sh2 = sh.clone();
    let suspect = sh.lock().bad_copies.contains_key(&piece);
    let ok = tokio::task::spawn_blocking(move || {
        let plen = sh2.meta.piece_len as u64;
        let start = piece as u64 * plen;
        let size = (sh2.meta.total - start).min(plen) as usize;
        let mut buf = vec![0u8; size];
        sh2.file.read_exact_at(&mut buf, start)?;
        let ok = Sha1::digest(&buf).as_slice() == sh2.meta.hashes[piece as usize];
        // Block hashes only when they may be compared: a failed copy, or a suspect piece's new one.
        let blocks: Vec<[u8; 20]> =
            if ok && !suspect { Vec::new() } else { buf.chunks(wire::BLOCK as usize).map(|b| Sha1::digest(b).into()).collect() };
        Ok::<_, io::Error>((ok, blocks))
    })
    .await;
    let (ok, blocks) = match ok {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            sh.fail(format!("reading back piece {piece}: {e}"));
            return;
        }
        Err(e) => {
            sh.fail(format!("hashing piece {piece}: {e}"));
            return;
        }
    };
    let depth = sh.opts.depth;
    let mut st = sh.lock();
    let senders = st.picker.verified(piece, ok);
    let ips: Vec<IpAddr> = senders.iter().map(|k| st.ip_of.get(k).copied().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))).collect();
    if ok {
        if let Some(bad) = st.bad_copies.remove(&piece) {
            let liars = guard::liars(&bad, &blocks, &sh.trusted);
            let mut from = ips.clone();
            from.dedup();
            info!(torrent = %sh.opts.label, piece, from = ?from, liars = ?liars, "suspect piece {piece} verified from one peer: its failed copy names the liars");
            for ip in liars {
                ban(&mut st, &sh, ip, "its blocks differ from the verified piece");
            }
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            let from: Vec<IpAddr> = senders.iter().filter_map(|k| st.ip_of.get(k).copied()).collect();
            tracing::trace!(piece, ?from, "piece verified");
        }
        // HAVE only to peers that lack the piece (those that have it never ask for it; half
        // the small packets of a swarm that spreads pieces rarest-first).
        let have = Msg::Have(piece).encode();
        for (k, c) in &st.conns {
            if !st.picker.peer_has_piece(*k, piece) {
                send(c, Out::Frame(have.clone()));
            }
        }
        if st.picker.complete() {
            info!(torrent = %sh.opts.label, bytes = sh.meta.total, "every piece verified");
            // We want nothing more from anyone.
            plan_all(&mut st, depth);
        }
    } else {
        st.hash_failures += 1;
        let mut distinct = ips.clone();
        distinct.sort();
        distinct.dedup();
        warn!(torrent = %sh.opts.label, piece, senders = ?distinct, "piece {piece} did not validate (SHA-1 mismatch): fetching it again");
        match guard::failed_piece(&ips, &sh.trusted, &st.banned) {
            Failure::Explained => {}
            Failure::Ban(ip) => ban(&mut st, &sh, ip, "it alone sent a piece that failed the hash"),
            Failure::TrustedSent => {
                warn!(torrent = %sh.opts.label, piece, "the appliance's seed alone sent a piece that failed the hash: not banned (check its disk); fetching it again")
            }
            Failure::Suspect => {
                // Keep the first failed copy until a copy from one peer verifies.
                if !st.bad_copies.contains_key(&piece) && blocks.len() == ips.len() {
                    st.bad_copies.insert(piece, ips.into_iter().zip(blocks).collect());
                }
                st.picker.set_suspect(piece);
                info!(torrent = %sh.opts.label, piece, senders = ?distinct, "several senders: fetching piece {piece} again from one peer (the seed first) to find the liar");
            }
        }
        plan_all(&mut st, depth);
    }
    // Senders that left and have nothing else waiting for a verdict: their addresses go.
    let mut done = senders;
    done.sort_unstable();
    done.dedup();
    for k in done {
        if !st.conns.contains_key(&k) && !st.picker.holds_blocks_from(k) {
            st.ip_of.remove(&k);
        }
    }
    drop(st);
    sh.changes.send_modify(|g| *g += 1);
}

/// Distrusts `ip`: its connections close, the blocks it sent to unfinished pieces are fetched
/// again, and it is never connected to or accepted again. Never the appliance's seed.
fn ban(st: &mut St, sh: &Shared, ip: IpAddr, why: &str) {
    if sh.trusted.contains(&ip) || ip.is_unspecified() {
        warn!(torrent = %sh.opts.label, %ip, "not banning the appliance's seed ({why})");
        return;
    }
    if !st.banned.insert(ip) {
        return;
    }
    warn!(torrent = %sh.opts.label, %ip, "peer banned: {why}");
    let gone: Vec<PeerKey> = st.ip_of.iter().filter(|(_, a)| **a == ip).map(|(k, _)| *k).collect();
    for k in gone {
        if let Some(c) = st.conns.remove(&k) {
            c.close.cancel();
        }
        st.picker.remove_peer(k);
        st.picker.drop_blocks_from(k);
    }
}

/// Every 250 ms: gives up requests that waited too long, and connects to known peers.
async fn tick_loop(sh: Arc<Shared>) {
    let mut t = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = t.tick() => {}
            _ = sh.cancel.cancelled() => return,
        }
        let now = Instant::now();
        let mut dial = Vec::new();
        {
            let mut st = sh.lock();
            let expired = st.picker.expire(now, REQUEST_TIMEOUT);
            if !expired.is_empty() {
                debug!(peers = expired.len(), "requests timed out, asked of others");
                plan_all(&mut st, sh.opts.depth);
            }
            if st.picker.complete() {
                continue;
            }
            st.cooloff.prune(now);
            let mut room = MAX_CONNS.saturating_sub(st.conns.len());
            let connected: HashSet<IpAddr> = st.conns.values().map(|c| c.ip).collect();
            let St { known, banned, cooloff, .. } = &mut *st;
            for (a, k) in known.iter_mut() {
                let ip = a.ip();
                let trusted = sh.trusted.contains(&ip);
                if room == 0 && !trusted {
                    continue;
                }
                let due = k.next_try.is_none_or(|t| t <= now);
                let away = !trusted && (banned.contains(&ip) || cooloff.holds(&ip, now));
                if due && !k.connecting && !k.is_self && !connected.contains(&ip) && !away {
                    k.connecting = true;
                    dial.push(*a);
                    room = room.saturating_sub(1);
                }
            }
        }
        for a in dial {
            tokio::spawn(connect(sh.clone(), a));
        }
    }
}

/// Announces at start, at completion and every interval the tracker gives; peers it names
/// join the known list (connected by the tick).
async fn announce_loop(sh: Arc<Shared>, tracker: SocketAddr) {
    let mut event = "started";
    let mut rx = sh.changes.subscribe();
    let mut was_complete = sh.lock().picker.complete();
    loop {
        let interval = match announce(&sh, tracker, event).await {
            Ok(i) => i,
            Err(e) => {
                warn!(torrent = %sh.opts.label, "announce: {e}");
                Duration::from_secs(5)
            }
        };
        event = "";
        let deadline = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = sh.cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let now_complete = sh.lock().picker.complete();
            if now_complete && !was_complete {
                was_complete = true;
                event = "completed";
                break;
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct AnnounceReply {
    #[serde(rename = "failure reason")]
    failure: Option<String>,
    interval: Option<u64>,
    #[serde(default, with = "serde_bytes")]
    peers: Vec<u8>,
}

async fn announce(sh: &Shared, tracker: SocketAddr, event: &str) -> Result<Duration, String> {
    use percent_encoding::{NON_ALPHANUMERIC, percent_encode};
    // `downloaded` is the verified bytes (the monitor reads it as the node's progress), not the
    // raw count with endgame duplicates and failed pieces.
    let (left, uploaded, downloaded) = {
        let st = sh.lock();
        let have = st.picker.have_bytes();
        (sh.meta.total - have, sh.uploaded.load(Ordering::Relaxed), have)
    };
    let mut path = format!(
        "/announce?info_hash={}&peer_id={}&port={}&uploaded={uploaded}&downloaded={downloaded}&left={left}&compact=1&numwant={MAX_CONNS}",
        percent_encode(&sh.meta.info_hash, NON_ALPHANUMERIC),
        percent_encode(&sh.peer_id, NON_ALPHANUMERIC),
        sh.listen_port
    );
    if !event.is_empty() {
        path.push_str("&event=");
        path.push_str(event);
    }
    let body = http_get::get(tracker, &path, HTTP_LIMIT).await.map_err(|e| e.to_string())?;
    let r: AnnounceReply = serde_bencode::from_bytes(&body).map_err(|e| format!("tracker answer: {e}"))?;
    if let Some(f) = r.failure {
        return Err(format!("tracker refused: {f}"));
    }
    let mut st = sh.lock();
    let mut added = 0;
    for c in r.peers.chunks_exact(6) {
        let a = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(c[0], c[1], c[2], c[3]), u16::from_be_bytes([c[4], c[5]])));
        if Some(a.ip()) == sh.own.map(IpAddr::V4) && a.port() == sh.listen_port {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = st.known.entry(a) {
            e.insert(Known::default());
            added += 1;
        }
    }
    debug!(torrent = %sh.opts.label, event, left, added, "announced");
    Ok(Duration::from_secs(r.interval.unwrap_or(30).clamp(5, 300)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const PL: u32 = 64 * 1024;

    fn data(n: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn meta_of(d: &[u8]) -> Meta {
        Meta {
            info_hash: [7; 20],
            piece_len: PL,
            total: d.len() as u64,
            hashes: d.chunks(PL as usize).map(|c| Sha1::digest(c).into()).collect(),
            file_name: "x".into(),
        }
    }

    fn opts(peers: Vec<SocketAddr>) -> EngineOptions {
        EngineOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            iface: None,
            peers,
            trusted: Vec::new(),
            tracker: None,
            depth: DEFAULT_DEPTH,
            label: "test".into(),
        }
    }

    fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f).await.expect("timed out")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_seed_and_two_leechers_exchange_every_piece() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(3 * 1024 * 1024 + 1234);
        let meta = meta_of(&d);
        std::fs::write(dir.path().join("seed"), &d).unwrap();
        let t = CancellationToken::new();
        let seed = Engine::start(meta.clone(), &dir.path().join("seed"), opts(vec![]), &t).await.unwrap();
        assert!(seed.stats().finished, "a complete file is recognised at start");
        let a = Engine::start(meta.clone(), &dir.path().join("a"), opts(vec![local(seed.port())]), &t).await.unwrap();
        let b = Engine::start(meta.clone(), &dir.path().join("b"), opts(vec![local(seed.port()), local(a.port())]), &t)
            .await
            .unwrap();
        within(a.wait_complete()).await.unwrap();
        within(b.wait_complete()).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), d);
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), d);
        // The reader hands out the same bytes.
        let mut r = b.reader(CancellationToken::new());
        let got = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map(|_| v)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(got, d);
        let up = seed.stats().uploaded + a.stats().uploaded + b.stats().uploaded;
        assert!(up >= 2 * d.len() as u64, "{up}");
        // A restart keeps what was verified.
        b.stop().await;
        let b2 = Engine::start(meta, &dir.path().join("b"), opts(vec![]), &t).await.unwrap();
        assert!(b2.stats().finished);
        t.cancel();
    }

    /// A mock peer (unit test only) that claims every piece and answers every request with
    /// garbage: the pieces fail their hash, the liar is banned, the download completes from
    /// the honest seed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lying_peer_is_caught_by_hash_and_banned() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(1024 * 1024);
        let meta = meta_of(&d);
        // On its own loopback address: bans are per address.
        let liar = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let liar_addr = liar.local_addr().unwrap();
        let ih = meta.info_hash;
        let n = meta.hashes.len();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = liar.accept().await {
                tokio::spawn(async move {
                    let mut hs = [0u8; wire::HANDSHAKE_LEN];
                    s.read_exact(&mut hs).await?;
                    s.write_all(&Handshake { info_hash: ih, peer_id: [9; 20] }.encode()).await?;
                    s.write_all(&Msg::Bitfield(wire::bitfield(&vec![true; n])).encode()).await?;
                    s.write_all(&Msg::Unchoke.encode()).await?;
                    let mut buf = Vec::new();
                    loop {
                        if let Msg::Request { piece, begin, len } = wire::read_msg(&mut s, &mut buf, 1 << 20).await? {
                            s.write_all(&Msg::Piece { piece, begin, data: vec![0xa5; len as usize] }.encode()).await?;
                        }
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), WireError>(())
                });
            }
        });
        let t = CancellationToken::new();
        // The liar alone first, so it certainly sends pieces; the honest seed joins later.
        let leech = Engine::start(meta.clone(), &dir.path().join("l"), opts(vec![liar_addr]), &t).await.unwrap();
        within(async {
            while leech.stats().banned == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        std::fs::write(dir.path().join("seed"), &d).unwrap();
        let seed = Engine::start(meta, &dir.path().join("seed"), opts(vec![]), &t).await.unwrap();
        leech.sh.lock().known.insert(local(seed.port()), Known::default());
        within(leech.wait_complete()).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("l")).unwrap(), d);
        let st = leech.stats();
        assert!(st.hash_failures >= 1 && st.banned == 1, "{st:?}");
        // Banned: never connected again.
        assert!(leech.sh.lock().conns.values().all(|c| c.peer_id != [9; 20]));
        t.cancel();
    }

    #[tokio::test]
    async fn a_wrong_torrent_or_a_garbage_handshake_is_refused_and_serving_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(200_000);
        std::fs::write(dir.path().join("s"), &d).unwrap();
        let t = CancellationToken::new();
        let seed = Engine::start(meta_of(&d), &dir.path().join("s"), opts(vec![]), &t).await.unwrap();
        for bad in [vec![0u8; 68], Handshake { info_hash: [1; 20], peer_id: [2; 20] }.encode().to_vec()] {
            let mut s = TcpStream::connect(local(seed.port())).await.unwrap();
            s.write_all(&bad).await.unwrap();
            let mut b = Vec::new();
            let n = within(s.read_to_end(&mut b)).await.unwrap_or(0);
            assert_eq!(n, 0, "closed without a handshake");
        }
        let l = Engine::start(meta_of(&d), &dir.path().join("l"), opts(vec![local(seed.port())]), &t).await.unwrap();
        within(l.wait_complete()).await.unwrap();
        t.cancel();
    }

    /// A mock peer's connection from `from` to `port`: handshake done (peer id `id`).
    async fn mock_peer(from: [u8; 4], port: u16, ih: [u8; 20], id: u8) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((from, 0))).unwrap();
        let mut s = s.connect(local(port)).await.unwrap();
        s.write_all(&Handshake { info_hash: ih, peer_id: [id; 20] }.encode()).await.unwrap();
        let mut hs = [0u8; wire::HANDSHAKE_LEN];
        s.read_exact(&mut hs).await.unwrap();
        s
    }

    /// Reads until the engine closes the connection (bounded by `within`).
    async fn until_closed(s: &mut TcpStream) {
        let mut b = vec![0u8; 64 * 1024];
        within(async {
            while s.read(&mut b).await.is_ok_and(|n| n > 0) {}
        })
        .await;
    }

    /// Five connections from one address, all handshaking at once: at most
    /// MAX_CONNS_PER_IP stay; the others are closed (before or after their handshake).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_per_address_cap_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(300_000);
        std::fs::write(dir.path().join("s"), &d).unwrap();
        let t = CancellationToken::new();
        let seed = Engine::start(meta_of(&d), &dir.path().join("s"), opts(vec![]), &t).await.unwrap();
        let mut socks = Vec::new();
        for i in 0..5u8 {
            let s = TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::from(([127, 0, 0, 3], 0))).unwrap();
            let mut s = s.connect(local(seed.port())).await.unwrap();
            s.write_all(&Handshake { info_hash: [7; 20], peer_id: [30 + i; 20] }.encode()).await.unwrap();
            socks.push(s);
        }
        // Each socket either stays (a handshake, then the engine's unchoke) or is closed.
        let mut open = 0;
        for s in &mut socks {
            let mut hs = [0u8; wire::HANDSHAKE_LEN];
            if within(s.read_exact(&mut hs)).await.is_ok() {
                let mut buf = Vec::new();
                let closed = !matches!(within(wire::read_msg(s, &mut buf, 1 << 20)).await, Ok(Msg::Bitfield(_)));
                open += usize::from(!closed);
            }
        }
        assert!(open <= MAX_CONNS_PER_IP, "{open} connections from one address stayed");
        assert!(seed.stats().peers as usize <= MAX_CONNS_PER_IP, "{:?}", seed.stats());
        // Another address is still welcome.
        let l = Engine::start(meta_of(&d), &dir.path().join("l"), opts(vec![local(seed.port())]), &t).await.unwrap();
        within(l.wait_complete()).await.unwrap();
        t.cancel();
    }

    /// A peer that chokes and unchokes again and again (each unchoke re-asks every request) is
    /// closed, and its address is not accepted again for a while.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_flaps_choke_is_closed_and_kept_away() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(1024 * 1024);
        let meta = meta_of(&d);
        let t = CancellationToken::new();
        let leech = Engine::start(meta.clone(), &dir.path().join("l"), opts(vec![]), &t).await.unwrap();
        let mut s = mock_peer([127, 0, 0, 4], leech.port(), meta.info_hash, 4).await;
        s.write_all(&Msg::Bitfield(wire::bitfield(&vec![true; meta.hashes.len()])).encode()).await.unwrap();
        let mut flaps = Vec::new();
        for _ in 0..=guard::FLAP_CHOKES {
            flaps.extend(Msg::Unchoke.encode());
            flaps.extend(Msg::Choke.encode());
        }
        s.write_all(&flaps).await.unwrap();
        until_closed(&mut s).await;
        assert!(leech.sh.lock().cooloff.holds(&IpAddr::from([127, 0, 0, 4]), Instant::now()));
        // Kept away: a new connection from that address is closed without a handshake.
        let s2 = TcpSocket::new_v4().unwrap();
        s2.bind(SocketAddr::from(([127, 0, 0, 4], 0))).unwrap();
        let mut s2 = s2.connect(local(leech.port())).await.unwrap();
        let _ = s2.write_all(&Handshake { info_hash: meta.info_hash, peer_id: [5; 20] }.encode()).await;
        let mut b = Vec::new();
        assert_eq!(within(s2.read_to_end(&mut b)).await.unwrap_or(0), 0, "refused while cooling off");
        t.cancel();
    }

    /// A connection whose queue is full (its peer does not read) is closed, not queued to
    /// without bound.
    #[tokio::test]
    async fn a_full_send_queue_closes_the_connection() {
        let (tx, _rx) = mpsc::channel(2);
        let c = Conn {
            tx,
            close: CancellationToken::new(),
            ip: IpAddr::from([127, 0, 0, 1]),
            peer_id: [1; 20],
            interested: false,
            outgoing: false,
            down: 0,
            up: Arc::default(),
        };
        send(&c, Out::Frame(Msg::KeepAlive.encode()));
        send(&c, Out::Frame(Msg::KeepAlive.encode()));
        assert!(!c.close.is_cancelled());
        send(&c, Out::Frame(Msg::KeepAlive.encode()));
        assert!(c.close.is_cancelled());
    }

    /// The appliance's seed is trusted: a piece that fails with its blocks and a liar's is
    /// fetched again from it alone, and only the liar is banned (here the liar sends half a
    /// piece of garbage and chokes, on its own address; the seed runs with every piece).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_then_choke_bans_the_liar_and_never_the_trusted_seed() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(2 * 1024 * 1024);
        let meta = meta_of(&d);
        std::fs::write(dir.path().join("seed"), &d).unwrap();
        let t = CancellationToken::new();
        let seed = Engine::start(meta.clone(), &dir.path().join("seed"), opts(vec![]), &t).await.unwrap();
        let liar = TcpListener::bind("127.0.0.5:0").await.unwrap();
        let liar_addr = liar.local_addr().unwrap();
        let (ih, n, half) = (meta.info_hash, meta.hashes.len(), PL / 2);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = liar.accept().await {
                tokio::spawn(async move {
                    let mut hs = [0u8; wire::HANDSHAKE_LEN];
                    s.read_exact(&mut hs).await?;
                    s.write_all(&Handshake { info_hash: ih, peer_id: [9; 20] }.encode()).await?;
                    s.write_all(&Msg::Bitfield(wire::bitfield(&vec![true; n])).encode()).await?;
                    s.write_all(&Msg::Unchoke.encode()).await?;
                    let (mut buf, mut sent) = (Vec::new(), 0);
                    loop {
                        if let Msg::Request { piece, begin, len } = wire::read_msg(&mut s, &mut buf, 1 << 20).await? {
                            if sent < half {
                                s.write_all(&Msg::Piece { piece, begin, data: vec![0xa5; len as usize] }.encode()).await?;
                                sent += len;
                                if sent >= half {
                                    s.write_all(&Msg::Choke.encode()).await?;
                                }
                            }
                        }
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), WireError>(())
                });
            }
        });
        let mut o = opts(vec![liar_addr, local(seed.port())]);
        o.trusted = vec![IpAddr::from([127, 0, 0, 1])];
        let leech = Engine::start(meta, &dir.path().join("l"), o, &t).await.unwrap();
        within(leech.wait_complete()).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("l")).unwrap(), d);
        let st = leech.sh.lock();
        assert!(!st.banned.contains(&IpAddr::from([127, 0, 0, 1])), "the trusted seed was banned");
        if st.hash_failures > 0 {
            assert!(st.banned.contains(&liar_addr.ip()), "the liar was not banned ({} failures)", st.hash_failures);
        }
        drop(st);
        t.cancel();
    }
}
