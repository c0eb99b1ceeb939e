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
//! fetched again and its senders are banned (sole sender) or struck (two strikes: banned).

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
/// Most connections of a node.
pub const MAX_CONNS: usize = 80;
/// A request unanswered this long is asked of another peer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection silent this long is closed (peers send keep-alives every 2 min at most).
const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
const KEEPALIVE: Duration = Duration::from_secs(90);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Uploads one peer may have queued before it is dropped as abusive.
const MAX_QUEUED_UPLOADS: u64 = 2048;
/// Sequential readers make this much after their position the first choice.
const STREAM_WINDOW_BYTES: u64 = 8 << 20;
/// Failed hashes a peer may take part in before it is banned (sole sender: at once).
const STRIKES: u32 = 2;
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
    Close,
}

struct Conn {
    tx: mpsc::UnboundedSender<Out>,
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
    strikes: HashMap<IpAddr, u32>,
    /// Every connection's address, kept after it closes (a failed piece names its senders).
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
        let _ = c.tx.send(Out::Frame(if want { Msg::Interested } else { Msg::NotInterested }.encode()));
    }
    for b in reqs {
        let _ = c.tx.send(Out::Frame(Msg::Request { piece: b.piece, begin: b.begin, len: b.len }.encode()));
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
            st: Mutex::new(St {
                picker,
                conns: HashMap::new(),
                known,
                banned: HashSet::new(),
                strikes: HashMap::new(),
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
            port = listen_port, peers = ?sh.opts.peers, tracker = ?sh.opts.tracker, "swarm engine started"
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
            let _ = c.tx.send(Out::Close);
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
        let refuse = {
            let st = sh.lock();
            st.banned.contains(&addr.ip()) || st.conns.len() >= MAX_CONNS
        };
        if refuse {
            debug!(%addr, "incoming peer refused (banned or too many)");
            continue;
        }
        let sh2 = sh.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&sh2, s, false)).await {
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
    let (tx, rx) = mpsc::unbounded_channel();
    let queued_up = Arc::new(AtomicU64::new(0));
    let up = Arc::new(AtomicU64::new(0));
    let depth = sh.opts.depth;
    let key = {
        let mut st = sh.lock();
        if let Some(k) = known.and_then(|a| st.known.get_mut(&a)) {
            k.connecting = false;
        }
        if st.banned.contains(&addr.ip()) || st.error.is_some() || sh.cancel.is_cancelled() {
            return;
        }
        // One connection per peer id: of two, keep the one opened by the smaller id (both
        // sides decide the same way).
        let keep_new = (sh.peer_id < hs.peer_id) == outgoing;
        if let Some((&old, _)) = st.conns.iter().find(|(_, c)| c.peer_id == hs.peer_id) {
            if !keep_new {
                debug!(%addr, "duplicate connection dropped");
                return;
            }
            if let Some(c) = st.conns.remove(&old) {
                let _ = c.tx.send(Out::Close);
            }
            if st.picker.remove_peer(old) {
                plan_all(&mut st, depth);
            }
        }
        let key = st.next_key;
        st.next_key += 1;
        st.picker.add_peer(key);
        if let IpAddr::V4(ip) = addr.ip() {
            st.picker.set_order(key, u32::from(ip));
        }
        st.ip_of.insert(key, addr.ip());
        if st.picker.have_count() > 0 {
            let _ = tx.send(Out::Frame(Msg::Bitfield(wire::bitfield(&st.picker.have_flags())).encode()));
        }
        // A LAN swarm of cooperating nodes: everyone is unchoked, always.
        let _ = tx.send(Out::Frame(Msg::Unchoke.encode()));
        st.conns.insert(key, Conn { tx: tx.clone(), ip: addr.ip(), peer_id: hs.peer_id, interested: false, outgoing, down: 0, up: up.clone() });
        if let Some(k) = known.and_then(|a| st.known.get_mut(&a)) {
            k.fails = 0;
        }
        key
    };
    debug!(%addr, key, outgoing, "peer connected");
    let writer = tokio::spawn(write_loop(sh.clone(), wr, rx, queued_up.clone(), up));
    let why = read_loop(&sh, key, rd, &queued_up).await;
    let _ = tx.send(Out::Close);
    drop(tx);
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
        if let Some(k) = known.and_then(|a| st.known.get_mut(&a)) {
            k.next_try = Some(Instant::now() + backoff(k.fails));
        }
    }
    let _ = writer.await;
}

async fn read_loop(sh: &Arc<Shared>, key: PeerKey, rd: tokio::net::tcp::OwnedReadHalf, queued_up: &AtomicU64) -> String {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut buf = Vec::new();
    let max = wire::max_body(sh.meta.hashes.len() as u32);
    let depth = sh.opts.depth;
    loop {
        let msg = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, wire::read_msg(&mut rd, &mut buf, max)) => match r {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return "idle".into(),
            },
            _ = sh.cancel.cancelled() => return "stopping".into(),
        };
        let mut st = sh.lock();
        if !st.conns.contains_key(&key) {
            return "closed".into();
        }
        match msg {
            Msg::KeepAlive | Msg::Interested | Msg::NotInterested | Msg::Other(_) | Msg::Cancel { .. } => {}
            Msg::Choke => {
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
                    let _ = c.tx.send(Out::Block(Block { piece, begin, len }));
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
                                let _ = c.tx.send(Out::Frame(Msg::Cancel { piece: b.piece, begin: b.begin, len: b.len }.encode()));
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
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued_up: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
) {
    let mut wr = wr;
    let mut buf: Vec<u8> = Vec::with_capacity(128 * 1024);
    let plen = sh.meta.piece_len as u64;
    loop {
        let first = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(_) => Out::Frame(Msg::KeepAlive.encode()),
        };
        buf.clear();
        let mut next = Some(first);
        // Gather what is ready (up to 256 KiB) into one write.
        while let Some(o) = next.take() {
            match o {
                Out::Close => {
                    let _ = wr.write_all(&buf).await;
                    let _ = wr.shutdown().await;
                    return;
                }
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
            r = wr.write_all(&buf) => r,
            _ = sh.cancel.cancelled() => return,
        };
        if w.is_err() {
            return;
        }
    }
}

/// Hashes a complete piece off the runtime; then it is ours (HAVE to every peer) or fetched
/// again, its senders struck or banned.
async fn verify(sh: Arc<Shared>, piece: u32) {
    let sh2 = sh.clone();
    let ok = tokio::task::spawn_blocking(move || {
        let plen = sh2.meta.piece_len as u64;
        let start = piece as u64 * plen;
        let size = (sh2.meta.total - start).min(plen) as usize;
        let mut buf = vec![0u8; size];
        sh2.file.read_exact_at(&mut buf, start).map(|()| Sha1::digest(&buf).as_slice() == sh2.meta.hashes[piece as usize])
    })
    .await;
    let ok = match ok {
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
    if ok {
        if tracing::enabled!(tracing::Level::TRACE) {
            let from: Vec<IpAddr> = senders.iter().filter_map(|k| st.ip_of.get(k).copied()).collect();
            tracing::trace!(piece, ?from, "piece verified");
        }
        // HAVE only to peers that lack the piece (those that have it never ask for it; half
        // the small packets of a swarm that spreads pieces rarest-first).
        let have = Msg::Have(piece).encode();
        for (k, c) in &st.conns {
            if !st.picker.peer_has_piece(*k, piece) {
                let _ = c.tx.send(Out::Frame(have.clone()));
            }
        }
        if st.picker.complete() {
            info!(torrent = %sh.opts.label, bytes = sh.meta.total, "every piece verified");
            // We want nothing more from anyone.
            plan_all(&mut st, depth);
        }
    } else {
        st.hash_failures += 1;
        let mut ips: Vec<IpAddr> = senders.iter().filter_map(|k| st.ip_of.get(k).copied()).collect();
        ips.sort();
        ips.dedup();
        warn!(torrent = %sh.opts.label, piece, senders = ?ips, "piece {piece} did not validate (SHA-1 mismatch): fetching it again");
        // A sender already banned explains the failure; otherwise a sole sender is banned at
        // once and shared senders collect strikes.
        if !ips.iter().any(|ip| st.banned.contains(ip)) {
            let sole = ips.len() == 1;
            for ip in ips {
                let s = st.strikes.entry(ip).or_insert(0);
                *s += 1;
                if sole || *s >= STRIKES {
                    ban(&mut st, &sh.opts.label, ip);
                }
            }
        }
        plan_all(&mut st, depth);
    }
    drop(st);
    sh.changes.send_modify(|g| *g += 1);
}

/// Distrusts `ip`: its connections close, the blocks it sent to unfinished pieces are fetched
/// again, and it is never connected to or accepted again.
fn ban(st: &mut St, label: &str, ip: IpAddr) {
    warn!(torrent = %label, %ip, "peer banned: sent data that failed the hash");
    st.banned.insert(ip);
    let gone: Vec<PeerKey> = st.ip_of.iter().filter(|(_, a)| **a == ip).map(|(k, _)| *k).collect();
    for k in gone {
        if let Some(c) = st.conns.remove(&k) {
            let _ = c.tx.send(Out::Close);
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
            let mut room = MAX_CONNS.saturating_sub(st.conns.len());
            let connected: HashSet<IpAddr> = st.conns.values().map(|c| c.ip).collect();
            let banned = st.banned.clone();
            for (a, k) in st.known.iter_mut() {
                if room == 0 {
                    break;
                }
                let due = k.next_try.is_none_or(|t| t <= now);
                if due && !k.connecting && !k.is_self && !connected.contains(&a.ip()) && !banned.contains(&a.ip()) {
                    k.connecting = true;
                    dial.push(*a);
                    room -= 1;
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
}
