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
//! Shape (as quinn-proto): the decisions are in [`core`], pure (events in, actions out: message
//! dispatch, the picker, duplicate and admission rules, bans, the dial choice), table-tested;
//! the I/O around it is thin: [`conn`] (sockets, handshakes, per connection a reader and a
//! writer joined by a bounded queue), [`file`] (check, reserve, write, hash, the blocking
//! [`Reader`]) and [`announce`] (the tracker client, on the tracker's own codec). One
//! `Mutex<St>` (the core and the connections' queues) is never held across an await nor
//! across a disk write. Every task of an engine runs in one [`Tasks`] set, inside the engine's
//! span (info-hash) and, for a connection, the peer's span; [`Engine::stop`] joins them.
//! Hostile peers meet the rules of [`guard`]; the appliance's seed (`EngineOptions::trusted`)
//! is never banned.

pub mod announce;
pub mod conn;
pub mod core;
pub mod file;
pub mod guard;
pub mod picker;
pub mod wire;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Span, info, warn};

use self::conn::ConnIo;
use self::core::{Core, CoreConfig};
pub use self::core::{DEPTH_BUDGET, MIN_DEPTH};
pub use self::file::Reader;
pub use self::guard::{MAX_CONNS, MAX_CONNS_PER_IP};
use self::picker::PeerKey;
use crate::image::torrent::{self, TorrentError};
use crate::swarm::tracker::Event;
use crate::task::Tasks;

/// Blocks asked of one peer at a time (16 KiB each). Enough to keep a LAN link busy without
/// queueing seconds of data behind a shaped uplink (a piece is shared only once complete).
pub const DEFAULT_DEPTH: usize = 12;
/// Sequential readers make this much after their position the first choice.
const STREAM_WINDOW_BYTES: u64 = 8 << 20;
/// How long the `stopped` announce may take when the engine stops.
const STOP_ANNOUNCE: Duration = Duration::from_secs(2);

/// What stopped a download (kept, so every waiter and reader sees the same cause).
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// A received block could not be written.
    #[error("writing {path}")]
    Write {
        /// The data file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A complete piece could not be read back.
    #[error("reading back piece {piece}")]
    ReadBack {
        /// The piece.
        piece: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The hashing task failed (panicked).
    #[error("hashing piece {piece}")]
    Hash {
        /// The piece.
        piece: u32,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The .torrent is unusable.
    #[error("torrent")]
    Torrent(#[from] TorrentError),
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
    /// The download stopped on an error.
    #[error("download stopped")]
    Stopped(#[source] Arc<Fatal>),
    /// The download was cancelled (or the engine stopped) first.
    #[error("download cancelled")]
    Cancelled,
}

/// An error and its sources, `: `-separated (for logs and counters that carry text).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
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
    /// From .torrent bytes (a single-file v1 torrent; see [`torrent::parse`]).
    ///
    /// # Errors
    /// [`EngineError::Torrent`].
    pub fn from_torrent(bytes: &[u8]) -> Result<Meta, EngineError> {
        let ti = torrent::parse(bytes)?;
        Ok(Meta { info_hash: ti.info_hash, piece_len: ti.piece_len, total: ti.size, hashes: ti.hashes, file_name: ti.file_name })
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
    /// Why it stopped, when it did (the error and its sources).
    pub error: Option<String>,
    /// Pieces that failed their hash.
    pub hash_failures: u32,
    /// Peers banned.
    pub banned: u32,
}

/// What the lock guards: the pure core, and each registered connection's queue.
struct St {
    core: Core,
    io: HashMap<PeerKey, ConnIo>,
    error: Option<Arc<Fatal>>,
}

struct Shared {
    meta: Meta,
    file: std::fs::File,
    path: PathBuf,
    peer_id: [u8; 20],
    own: Option<Ipv4Addr>,
    listen_port: u16,
    trusted: std::collections::HashSet<IpAddr>,
    /// Incoming connections in their handshake.
    handshakes: AtomicUsize,
    opts: EngineOptions,
    st: Mutex<St>,
    /// Received blocks of unverified pieces (hashed from memory, written once verified); its
    /// own lock, taken alone and briefly.
    pending: Mutex<file::Pending>,
    /// Bumped on every verified piece and on a fatal error (readers and waiters watch it).
    changes: watch::Sender<u64>,
    uploaded: AtomicU64,
    /// The engine's token (a child of the caller's); `tasks` watch it.
    cancel: CancellationToken,
    /// Every task of the engine.
    tasks: Tasks,
    /// The engine's span (info-hash, label); connections' spans are its children.
    span: Span,
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

    fn pending(&self) -> MutexGuard<'_, file::Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block the core took ([`core::Action::Write`]): kept in memory until its piece is
    /// hashed, or written to the file at once when memory is full.
    fn store_block(&self, piece: u32, begin: u32, data: Vec<u8>) -> io::Result<()> {
        let blocks = (self.meta.total - piece as u64 * self.meta.piece_len as u64).min(self.meta.piece_len as u64).div_ceil(wire::BLOCK as u64) as u32;
        let r = self.pending().put(piece, blocks, begin, data);
        match r {
            Ok(()) => Ok(()),
            Err(data) => file::write_block(&self.file, &self.meta, piece, begin, &data),
        }
    }

    fn fail(&self, why: Fatal) {
        let mut st = self.lock();
        if st.error.is_none() {
            warn!(error = %chain(&why), "download stopped");
            st.error = Some(Arc::new(why));
        }
        drop(st);
        self.changes.send_modify(|g| *g += 1);
        self.cancel.cancel();
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
            tokio::task::spawn_blocking(move || file::open_and_check(&meta, &path))
                .await
                .map_err(|e| ferr(io::Error::other(e)))?
                .map_err(ferr)?
        };
        let resumed = have.iter().filter(|h| **h).count();
        let listener = conn::listen(&opts).map_err(|source| EngineError::Listen { addr: opts.listen, source })?;
        let listen_port = listener.local_addr().map_err(|source| EngineError::Listen { addr: opts.listen, source })?.port();
        let mut peer_id = *b"-SI0100-000000000000";
        for b in &mut peer_id[8..] {
            *b = b"0123456789abcdefghijklmnopqrstuvwxyz"[rand::random_range(0..36)];
        }
        let own = match opts.listen.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        };
        let trusted: std::collections::HashSet<IpAddr> = opts.trusted.iter().copied().collect();
        let core = Core::new(
            CoreConfig {
                piece_len: meta.piece_len,
                total: meta.total,
                have,
                peer_id,
                depth: opts.depth,
                trusted: trusted.clone(),
                own,
                peers: opts.peers.clone(),
            },
            StdRng::from_rng(&mut rand::rng()),
        );
        let cancel = token.child_token();
        let span = tracing::info_span!("engine", info_hash = %hex::encode(meta.info_hash), torrent = %opts.label);
        let sh = Arc::new(Shared {
            file,
            path: path.to_owned(),
            peer_id,
            own,
            listen_port,
            trusted,
            handshakes: AtomicUsize::new(0),
            st: Mutex::new(St { core, io: HashMap::new(), error: None }),
            pending: Mutex::new(file::Pending::default()),
            changes: watch::channel(0).0,
            uploaded: AtomicU64::new(0),
            tasks: Tasks::new(cancel.clone()),
            cancel,
            span,
            meta,
            opts,
        });
        sh.span.in_scope(|| {
            info!(
                pieces = sh.meta.hashes.len(), piece_len = sh.meta.piece_len, resumed,
                port = listen_port, peers = ?sh.opts.peers, tracker = ?sh.opts.tracker, trusted = ?sh.opts.trusted, "swarm engine started"
            )
        });
        sh.tasks.spawn(sh.span.clone(), "accept", conn::accept_loop(sh.clone(), listener));
        sh.tasks.spawn(sh.span.clone(), "tick", tick_loop(sh.clone()));
        if let Some(t) = sh.opts.tracker {
            sh.tasks.spawn(sh.span.clone(), "announce", announce::announce_loop(sh.clone(), t));
        }
        Ok(Engine { sh })
    }

    /// The counters now.
    pub fn stats(&self) -> EngineStats {
        let st = self.sh.lock();
        EngineStats {
            have: st.core.picker().have_bytes(),
            total: self.sh.meta.total,
            uploaded: self.sh.uploaded.load(Ordering::Relaxed),
            peers: st.core.peers().len() as u32,
            finished: st.core.picker().complete(),
            error: st.error.as_ref().map(|e| chain(e.as_ref())),
            hash_failures: st.core.hash_failures(),
            banned: st.core.banned().len() as u32,
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
    /// [`EngineError::Stopped`] or [`EngineError::Cancelled`] when the engine stops first.
    pub async fn wait_complete(&self) -> Result<(), EngineError> {
        let mut rx = self.sh.changes.subscribe();
        loop {
            {
                let st = self.sh.lock();
                if st.core.picker().complete() {
                    return Ok(());
                }
                if let Some(e) = &st.error {
                    return Err(EngineError::Stopped(e.clone()));
                }
            }
            tokio::select! {
                // CANCEL-SAFETY: `changed` only marks the value seen when it returns; the loop
                // looks at the state again either way.
                r = rx.changed() => if r.is_err() { return Err(EngineError::Cancelled) },
                () = self.sh.cancel.cancelled() => {
                    // A fatal error cancels too: report it rather than a plain cancel.
                    return Err(self.sh.lock().error.clone().map_or(EngineError::Cancelled, EngineError::Stopped));
                }
            }
        }
    }

    /// A blocking reader of the file from offset 0 that returns only verified bytes, waiting
    /// for them (for a consumer outside the runtime, e.g. in `spawn_blocking`); its position
    /// makes the next pieces the first choice. `cancel` ends a read that waits.
    pub fn reader(&self, cancel: CancellationToken) -> Reader {
        Reader { sh: self.sh.clone(), pos: 0, rt: tokio::runtime::Handle::current(), cancel }
    }

    /// Leaves the swarm: tells the tracker (briefly), closes every connection, and waits until
    /// every task of the engine has ended.
    pub async fn stop(self) {
        if let Some(t) = self.sh.opts.tracker {
            let r = tokio::time::timeout(STOP_ANNOUNCE, announce::announce(&self.sh, t, Event::Stopped)).await;
            if let Ok(Err(e)) = r {
                self.sh.span.in_scope(|| tracing::debug!(error = %chain(&e), "stopped announce"));
            }
        }
        {
            let mut st = self.sh.lock();
            let mut acts = Vec::new();
            st.core.close_all(&mut acts);
            let _ = conn::apply(&mut st, &mut acts);
            for c in st.io.values() {
                tracing::debug!(ip = %c.ip, up = c.up.load(Ordering::Relaxed), "connection at stop");
                c.close.cancel();
            }
            st.io.clear();
        }
        self.sh.tasks.shutdown().await;
    }
}

impl Drop for Engine {
    /// An engine dropped without [`Engine::stop`] (an error path) still ends its tasks and
    /// connections (without waiting for them).
    fn drop(&mut self) {
        self.sh.cancel.cancel();
    }
}

/// Hashes a complete piece on the blocking pool (from its blocks held in memory, the others
/// read back), writes it to the file when it matches, then tells the core (see
/// [`Core::verified`]): a piece is verified only once it is on disk.
async fn verify(sh: Arc<Shared>, piece: u32, blocks: bool) {
    let sh2 = sh.clone();
    // No block of this piece can arrive before the core hears the verdict (it is being hashed).
    let held = sh.pending().take(piece);
    let r = sh.tasks.spawn_blocking("hash piece", move || {
        let (ok, hashes) = file::hash_piece(&sh2.file, &sh2.meta, piece, blocks, &held).map_err(|source| Fatal::ReadBack { piece, source })?;
        if ok {
            file::write_held(&sh2.file, &sh2.meta, piece, &held).map_err(|source| Fatal::Write { path: sh2.path.clone(), source })?;
        }
        Ok::<_, Fatal>((ok, hashes))
    });
    let (ok, hashes) = match r.await {
        Ok(Ok(x)) => x,
        Ok(Err(why)) => return sh.fail(why),
        Err(source) => return sh.fail(Fatal::Hash { piece, source }),
    };
    let later = {
        let mut st = sh.lock();
        let mut acts = Vec::new();
        st.core.verified(Instant::now(), piece, ok, hashes, &mut acts);
        conn::apply(&mut st, &mut acts)
    };
    conn::spawn_later(&sh, later);
    sh.changes.send_modify(|g| *g += 1);
}

/// Every 250 ms: the core gives up requests that waited too long and picks addresses to dial.
async fn tick_loop(sh: Arc<Shared>) {
    let mut t = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            // CANCEL-SAFETY: `tick` is cancel-safe (a tick not returned is not consumed); the
            // other arm ends the loop.
            _ = t.tick() => {}
            () = sh.cancel.cancelled() => return,
        }
        let later = {
            let mut st = sh.lock();
            let mut acts = Vec::new();
            st.core.tick(Instant::now(), &mut acts);
            conn::apply(&mut st, &mut acts)
        };
        conn::spawn_later(&sh, later);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::SocketAddrV4;

    use sha1::{Digest, Sha1};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket, TcpStream};
    use tokio::sync::mpsc;

    use self::conn::{Out, send};
    use self::wire::{Handshake, Msg, WireError};

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
                    s.write_all(&Handshake { info_hash: ih, peer_id: [9; 20], extensions: false }.encode()).await?;
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
        leech.sh.lock().core.add_known(&[SocketAddrV4::new(Ipv4Addr::LOCALHOST, seed.port())], None);
        within(leech.wait_complete()).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("l")).unwrap(), d);
        let st = leech.stats();
        assert!(st.hash_failures >= 1 && st.banned == 1, "{st:?}");
        // Banned: never connected again.
        assert!(leech.sh.lock().core.peers().values().all(|c| c.peer_id != [9; 20]));
        t.cancel();
    }

    #[tokio::test]
    async fn a_wrong_torrent_or_a_garbage_handshake_is_refused_and_serving_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(200_000);
        std::fs::write(dir.path().join("s"), &d).unwrap();
        let t = CancellationToken::new();
        let seed = Engine::start(meta_of(&d), &dir.path().join("s"), opts(vec![]), &t).await.unwrap();
        for bad in [vec![0u8; 68], Handshake { info_hash: [1; 20], peer_id: [2; 20], extensions: false }.encode().to_vec()] {
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
        s.write_all(&Handshake { info_hash: ih, peer_id: [id; 20], extensions: false }.encode()).await.unwrap();
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
            s.write_all(&Handshake { info_hash: [7; 20], peer_id: [30 + i; 20], extensions: false }.encode()).await.unwrap();
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
        assert!(leech.sh.lock().core.cooling_off(&IpAddr::from([127, 0, 0, 4]), Instant::now()));
        // Kept away: a new connection from that address is closed without a handshake.
        let s2 = TcpSocket::new_v4().unwrap();
        s2.bind(SocketAddr::from(([127, 0, 0, 4], 0))).unwrap();
        let mut s2 = s2.connect(local(leech.port())).await.unwrap();
        let _ = s2.write_all(&Handshake { info_hash: meta.info_hash, peer_id: [5; 20], extensions: false }.encode()).await;
        let mut b = Vec::new();
        assert_eq!(within(s2.read_to_end(&mut b)).await.unwrap_or(0), 0, "refused while cooling off");
        t.cancel();
    }

    /// An address of our own (the tracker hands out every peer, a node's own address among
    /// them when it listens on another) answers with our peer id: the typed
    /// `HandshakeError::Ourselves` marks it, and it is never dialled again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_address_of_our_own_is_recognised_and_not_dialled_again() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(200_000);
        let t = CancellationToken::new();
        let e = Engine::start(meta_of(&d), &dir.path().join("x"), opts(vec![]), &t).await.unwrap();
        let me = SocketAddr::from(([127, 0, 0, 1], e.port()));
        e.sh.lock().core.add_known(&[SocketAddrV4::new(Ipv4Addr::LOCALHOST, e.port())], None);
        within(async {
            while !e.sh.lock().core.is_self(&me) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(e.stats().peers, 0, "no connection to ourselves stays");
        t.cancel();
    }

    /// `stop` cancels and joins every task of the engine (accept, tick, connections, writers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_joins_every_task_of_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(1024 * 1024);
        std::fs::write(dir.path().join("s"), &d).unwrap();
        let t = CancellationToken::new();
        let seed = Engine::start(meta_of(&d), &dir.path().join("s"), opts(vec![]), &t).await.unwrap();
        let l = Engine::start(meta_of(&d), &dir.path().join("l"), opts(vec![local(seed.port())]), &t).await.unwrap();
        within(l.wait_complete()).await.unwrap();
        let sh = seed.sh.clone();
        // accept + tick + the connection's reader and writer, at least.
        assert!(sh.tasks.len() >= 4, "{} tasks", sh.tasks.len());
        within(seed.stop()).await;
        assert!(sh.tasks.is_empty(), "{} tasks left after stop", sh.tasks.len());
        t.cancel();
    }

    /// A connection whose queue is full (its peer does not read) is closed, not queued to
    /// without bound.
    #[tokio::test]
    async fn a_full_send_queue_closes_the_connection() {
        let (tx, _rx) = mpsc::channel(2);
        let c = ConnIo { tx, close: CancellationToken::new(), ip: IpAddr::from([127, 0, 0, 1]), queued_up: Arc::default(), up: Arc::default() };
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
                    s.write_all(&Handshake { info_hash: ih, peer_id: [9; 20], extensions: false }.encode()).await?;
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
        assert!(!st.core.banned().contains(&IpAddr::from([127, 0, 0, 1])), "the trusted seed was banned");
        if st.core.hash_failures() > 0 {
            assert!(st.core.banned().contains(&liar_addr.ip()), "the liar was not banned ({} failures)", st.core.hash_failures());
        }
        drop(st);
        t.cancel();
    }
}
