//! Thin connection I/O: sockets, the accept loop, dialling, handshakes, and per connection a
//! reader (parses a message, hands it to the [`Core`](super::core::Core) under the lock,
//! carries out the actions) and a writer (frames, and blocks read from the file when their turn
//! comes) joined by a bounded queue. No protocol decision is taken here.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::core::Action;
use super::file;
use super::guard::Admit;
use super::picker::{Block, PeerKey};
use super::wire::{self, Handshake, Msg, WireError};
use super::{EngineOptions, Fatal, Shared, St};

/// Incoming connections waiting for their handshake, at most (more are closed at once).
const MAX_HANDSHAKES: usize = 32;
/// A connection silent this long is closed (peers send keep-alives every 2 min at most).
const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
const KEEPALIVE: Duration = Duration::from_secs(90);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HAVEs wait this long at most for another write to ride on (a request, a block) before they
/// are sent on their own. Sent one by one they were 3 in 4 of a swarm's writes, each its own
/// packet that woke its receiver (measured at N = 32: 347 k of 441 k sends under 18 bytes).
pub(super) const HAVE_DELAY: Duration = Duration::from_millis(100);
/// Uploads one peer may have queued before it is dropped as abusive.
pub(super) const MAX_QUEUED_UPLOADS: u64 = 2048;
/// Messages queued to one connection's writer, at most: its uploads plus this many frames
/// (requests, HAVEs). A peer that does not read fills it and is closed.
pub(super) const SEND_QUEUE: usize = MAX_QUEUED_UPLOADS as usize + 1024;

/// Why a connection did not get past its handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket, connect, read or write.
    #[error("connecting")]
    Io(#[from] io::Error),
    /// The peer's handshake does not parse.
    #[error("handshake")]
    Wire(#[from] WireError),
    /// No connection or no handshake in time.
    #[error("timed out")]
    Timeout,
    /// Another torrent.
    #[error("another torrent")]
    OtherTorrent,
    /// Our own peer id: we dialled ourselves (an address of ours the tracker handed out).
    #[error("connected to ourselves")]
    Ourselves,
}

/// What a connection's writer sends.
#[derive(Debug)]
pub(super) enum Out {
    Frame(Vec<u8>),
    /// A frame that may wait (HAVE): sent with the next write, or after [`HAVE_DELAY`].
    Lazy(Vec<u8>),
    Block(Block),
}

/// The I/O side of a registered connection.
pub(super) struct ConnIo {
    pub(super) tx: mpsc::Sender<Out>,
    /// Closes the connection (both its tasks).
    pub(super) close: CancellationToken,
    pub(super) ip: IpAddr,
    /// Uploads queued and not yet sent.
    pub(super) queued_up: Arc<AtomicU64>,
    /// Block bytes sent to it.
    pub(super) up: Arc<AtomicU64>,
}

/// Queues `o` to a connection's writer; a full queue (the peer does not read) closes it.
pub(super) fn send(c: &ConnIo, o: Out) {
    if let Err(mpsc::error::TrySendError::Full(_)) = c.tx.try_send(o) {
        if !c.close.is_cancelled() {
            warn!(ip = %c.ip, "peer closed: its send queue is full (it does not read)");
            c.close.cancel();
        }
    }
}

/// Carries out the actions that only queue or close (under the lock: none blocks); returns
/// the others (write, verify, dial) for the caller to do after releasing it.
pub(super) fn apply(st: &mut St, acts: &mut Vec<Action>) -> Vec<Action> {
    let mut later = Vec::new();
    for a in acts.drain(..) {
        match a {
            Action::Send(k, m) => {
                if let Some(c) = st.io.get(&k) {
                    let f = m.encode();
                    send(c, if matches!(m, Msg::Have(_)) { Out::Lazy(f) } else { Out::Frame(f) });
                }
            }
            Action::Upload(k, b) => {
                if let Some(c) = st.io.get(&k) {
                    if c.queued_up.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_UPLOADS {
                        if !c.close.is_cancelled() {
                            warn!(ip = %c.ip, "peer closed: too many queued requests");
                            c.close.cancel();
                        }
                    } else {
                        send(c, Out::Block(b));
                    }
                }
            }
            Action::Close(k) => {
                if let Some(c) = st.io.remove(&k) {
                    c.close.cancel();
                }
            }
            other => later.push(other),
        }
    }
    later
}

/// A connection's span (`peer{addr}` under the engine's); while debug spans are off, the
/// engine's own span, so that what a connection logs still names its torrent.
fn peer_span(sh: &Shared, addr: SocketAddr, outgoing: bool) -> tracing::Span {
    let span = tracing::debug_span!(parent: &sh.span, "peer", %addr, outgoing);
    if span.is_disabled() { sh.span.clone() } else { span }
}

/// Starts what [`apply`] left: a hash on the blocking pool, a dial. (Writes are done by the
/// connection that received the block, in [`read_loop`].)
pub(super) fn spawn_later(sh: &Arc<Shared>, later: Vec<Action>) {
    for a in later {
        match a {
            Action::Verify { piece, blocks } => {
                let sh2 = sh.clone();
                sh.tasks.spawn(sh.span.clone(), "verify", super::verify(sh2, piece, blocks));
            }
            Action::Dial(addr) => {
                sh.tasks.spawn(peer_span(sh, addr, true), "dial", connect(sh.clone(), addr));
            }
            other => debug!(?other, "action out of place: ignored"),
        }
    }
}

fn socket(opts: &EngineOptions) -> io::Result<TcpSocket> {
    let s = TcpSocket::new_v4()?;
    if let Some(i) = &opts.iface {
        s.bind_device(Some(i.as_bytes()))?;
    }
    Ok(s)
}

pub(super) fn listen(opts: &EngineOptions) -> io::Result<TcpListener> {
    let s = socket(opts)?;
    s.set_reuseaddr(true)?;
    s.bind(opts.listen)?;
    s.listen(256)
}

pub(super) async fn accept_loop(sh: Arc<Shared>, l: TcpListener) {
    loop {
        let (s, addr) = tokio::select! {
            // CANCEL-SAFETY: `accept` is cancel-safe (no connection is taken unless it returns);
            // the other arm ends the loop.
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: keep serving the connections we have.
                    warn!(error = %e, "accepting a peer");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            () = sh.cancel.cancelled() => return,
        };
        let trusted = sh.trusted.contains(&addr.ip());
        let verdict = sh.lock().core.admit_incoming(addr.ip(), Instant::now());
        let pending = sh.handshakes.load(Ordering::Relaxed);
        if verdict != Admit::Yes || (pending >= MAX_HANDSHAKES && !trusted) {
            debug!(%addr, ?verdict, pending, "incoming peer refused");
            continue;
        }
        sh.handshakes.fetch_add(1, Ordering::Relaxed);
        let sh2 = sh.clone();
        sh.tasks.spawn(peer_span(&sh, addr, false), "peer", async move {
            let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&sh2, s, false)).await;
            sh2.handshakes.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(Ok((s, hs))) => run_conn(sh2, s, addr, hs, false, None).await,
                Ok(Err(e)) => debug!(%addr, error = %e, "incoming handshake refused"),
                Err(_) => debug!(%addr, "incoming handshake timed out"),
            }
        });
    }
}

/// Exchanges handshakes; outgoing sends first. Refuses another torrent and ourselves.
async fn handshake(sh: &Shared, mut s: TcpStream, outgoing: bool) -> Result<(TcpStream, Handshake), HandshakeError> {
    let ours = Handshake { info_hash: sh.meta.info_hash, peer_id: sh.peer_id, extensions: true }.encode();
    if outgoing {
        s.write_all(&ours).await?;
    }
    let mut b = [0u8; wire::HANDSHAKE_LEN];
    s.read_exact(&mut b).await?;
    let hs = Handshake::decode(&b)?;
    if hs.info_hash != sh.meta.info_hash {
        return Err(HandshakeError::OtherTorrent);
    }
    if hs.peer_id == sh.peer_id {
        if !outgoing {
            // We dialled ourselves: answer with our handshake anyway (best effort), so that the
            // dialling side sees its own peer id and stops dialling this address, instead of an
            // early end of stream that it would retry forever.
            let _ = s.write_all(&ours).await;
        }
        return Err(HandshakeError::Ourselves);
    }
    if !outgoing {
        s.write_all(&ours).await?;
    }
    Ok((s, hs))
}

async fn dial(sh: &Shared, addr: SocketAddr) -> Result<(TcpStream, Handshake), HandshakeError> {
    let s = socket(&sh.opts)?;
    if let Some(ip) = sh.own {
        s.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))?;
    }
    let s = tokio::time::timeout(CONNECT_TIMEOUT, s.connect(addr)).await.map_err(|_| HandshakeError::Timeout)??;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(sh, s, true)).await.map_err(|_| HandshakeError::Timeout)?
}

async fn connect(sh: Arc<Shared>, addr: SocketAddr) {
    match dial(&sh, addr).await {
        Ok((s, hs)) => run_conn(sh, s, addr, hs, true, Some(addr)).await,
        Err(e) => {
            debug!(%addr, error = %e, "connecting");
            let is_self = matches!(e, HandshakeError::Ourselves);
            sh.lock().core.dial_failed(Instant::now(), addr, is_self);
        }
    }
}

/// Registers a connection (or refuses it: see [`Core::register`](super::core::Core::register)),
/// then runs it until it ends.
async fn run_conn(sh: Arc<Shared>, s: TcpStream, addr: SocketAddr, hs: Handshake, outgoing: bool, known: Option<SocketAddr>) {
    let _ = s.set_nodelay(true);
    let (rd, wr) = s.into_split();
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    let close = sh.cancel.child_token();
    let queued_up = Arc::new(AtomicU64::new(0));
    let up = Arc::new(AtomicU64::new(0));
    let ip = addr.ip();
    let key = {
        let mut st = sh.lock();
        if st.error.is_some() || sh.cancel.is_cancelled() {
            return;
        }
        let mut acts = Vec::new();
        let key = match st.core.register(Instant::now(), ip, hs.peer_id, outgoing, known, &mut acts) {
            Ok(k) => k,
            Err(why) => {
                debug!(%addr, %why, "peer refused after its handshake");
                return;
            }
        };
        if hs.extensions {
            st.core.extensions(key, &mut acts);
        }
        st.io.insert(key, ConnIo { tx, close: close.clone(), ip, queued_up: queued_up.clone(), up: up.clone() });
        let later = apply(&mut st, &mut acts);
        drop(st);
        spawn_later(&sh, later);
        key
    };
    debug!(%addr, key, outgoing, "peer connected");
    let writer = sh.tasks.spawn(tracing::Span::current(), "peer writer", write_loop(sh.clone(), wr, rx, queued_up, up.clone(), close.clone()));
    let why = read_loop(&sh, key, rd, &close).await;
    close.cancel();
    {
        let mut st = sh.lock();
        st.io.remove(&key);
        let mut acts = Vec::new();
        if let Some(p) = st.core.disconnect(Instant::now(), key, known, &mut acts) {
            debug!(%addr, key, down = p.down, up = up.load(Ordering::Relaxed), why, "peer gone");
        }
        let later = apply(&mut st, &mut acts);
        drop(st);
        spawn_later(&sh, later);
    }
    let _ = writer.await;
}

/// Below this many missing bytes of a block, the reader wakes as data comes (a low-water
/// mark costs a system call; two segments are not worth one).
const LOWAT_MIN: usize = 3000;
/// The low-water mark at most (the kernel grows the receive buffer to twice the mark).
const LOWAT_MAX: usize = 256 * 1024;

/// A connection's read half that, told how many bytes of a block are still to come, waits for
/// them in one wake-up: the socket's receive low-water mark (`SO_RCVLOWAT`) is set to what is
/// missing before it is polled, and lowered back as bytes come (to 1 once the block is in).
/// A block trickling in from a peer that uploads to many others otherwise woke its reader for
/// every segment or two (measured at N = 32 / 10 Mbit/s: 8 reads and 8 `epoll_wait` per 16 KiB
/// block). Never above what the current message still needs, so no read waits for bytes that
/// are not on their way; the kernel signals at once when the mark is lowered to what it holds.
struct LowatRead {
    inner: tokio::net::tcp::OwnedReadHalf,
    /// Bytes of the current block not yet read from the socket (0: none expected).
    want: usize,
    /// The mark the socket has (1: the kernel's default).
    set: usize,
    /// The kernel refused a mark: reads go on without one.
    off: bool,
    /// Reads that returned bytes.
    #[cfg(test)]
    reads: usize,
}

impl LowatRead {
    fn new(inner: tokio::net::tcp::OwnedReadHalf) -> LowatRead {
        LowatRead {
            inner,
            want: 0,
            set: 1,
            off: false,
            #[cfg(test)]
            reads: 0,
        }
    }

    /// Applies `mark` to the socket. Linux checks nothing but the descriptor (a socket we hold
    /// open); should it fail anyway, no mark is tried again.
    fn mark(&mut self, mark: usize) {
        use std::os::fd::AsRawFd;
        let fd = self.inner.as_ref().as_raw_fd();
        let v = mark as libc::c_int;
        // SAFETY: a plain setsockopt on a descriptor the stream owns for the call's length, with
        // a pointer to a live c_int and its size.
        let r = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&raw const v).cast(), size_of::<libc::c_int>() as libc::socklen_t) };
        if r == 0 {
            self.set = mark;
        } else {
            debug!(error = %io::Error::last_os_error(), "SO_RCVLOWAT: reading without it");
            self.off = true;
        }
    }
}

impl tokio::io::AsyncRead for LowatRead {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        let mark = if this.want >= LOWAT_MIN { this.want.min(LOWAT_MAX) } else { 1 };
        if mark != this.set && !this.off {
            this.mark(mark);
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        this.want = this.want.saturating_sub(got);
        #[cfg(test)]
        if got > 0 {
            this.reads += 1;
        }
        r
    }
}

/// Told that `n` bytes of a block are to come: the socket owes them less what the buffer holds.
fn block_body(r: &mut BufReader<LowatRead>, n: usize) {
    let missing = n.saturating_sub(r.buffer().len());
    r.get_mut().want = missing;
}

/// Reads messages until the connection ends; returns why it ended.
async fn read_loop(sh: &Arc<Shared>, key: PeerKey, rd: tokio::net::tcp::OwnedReadHalf, close: &CancellationToken) -> String {
    let mut rd = BufReader::with_capacity(64 * 1024, LowatRead::new(rd));
    let mut buf = Vec::new();
    let max = wire::max_body(sh.meta.hashes.len() as u32);
    let mut acts = Vec::new();
    loop {
        let msg = tokio::select! {
            // CANCEL-SAFETY: read_msg keeps a partial message in `rd`/`buf` only for this
            // connection, which ends on either of the other arms.
            r = tokio::time::timeout(IDLE_TIMEOUT, wire::read_msg_hinted(&mut rd, &mut buf, max, block_body)) => match r {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return "idle".into(),
            },
            () = close.cancelled() => return "closed".into(),
        };
        let later = {
            let mut st = sh.lock();
            if let Err(fault) = st.core.handle(Instant::now(), key, msg, &mut acts) {
                acts.clear();
                return fault.to_string();
            }
            apply(&mut st, &mut acts)
        };
        for a in later {
            match a {
                // Outside the lock: the block is taken (no other copy is written), and the
                // piece is hashed only once every taken block is reported written.
                Action::Write { piece, begin, data } => {
                    if let Err(source) = sh.store_block(piece, begin, data) {
                        sh.fail(Fatal::Write { path: sh.path.clone(), source });
                        return "write failed".into();
                    }
                    let later = {
                        let mut st = sh.lock();
                        st.core.written(piece, &mut acts);
                        apply(&mut st, &mut acts)
                    };
                    spawn_later(sh, later);
                }
                other => spawn_later(sh, vec![other]),
            }
        }
    }
}

async fn write_loop(
    sh: Arc<Shared>,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    queued_up: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    close: CancellationToken,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(128 * 1024);
    // HAVEs waiting for a write to ride on, and when they must go at the latest.
    let mut lazy: Vec<u8> = Vec::new();
    let mut lazy_until: Option<tokio::time::Instant> = None;
    loop {
        let first = tokio::select! {
            // CANCEL-SAFETY: recv is cancel-safe; on close the queue is dropped.
            r = tokio::time::timeout(KEEPALIVE, rx.recv()) => match r {
                Ok(Some(o)) => Some(o),
                Ok(None) => break,
                Err(_) => Some(Out::Frame(Msg::KeepAlive.encode())),
            },
            // CANCEL-SAFETY: a sleep holds nothing.
            () = tokio::time::sleep_until(lazy_until.unwrap_or_else(tokio::time::Instant::now)), if lazy_until.is_some() => None,
            () = close.cancelled() => break,
        };
        buf.clear();
        let mut next = first;
        // Gather what is ready (up to 256 KiB) into one write.
        while let Some(o) = next.take() {
            match o {
                Out::Frame(f) => buf.extend_from_slice(&f),
                Out::Lazy(f) => {
                    lazy.extend_from_slice(&f);
                    lazy_until.get_or_insert_with(|| tokio::time::Instant::now() + HAVE_DELAY);
                }
                Out::Block(b) => {
                    queued_up.fetch_sub(1, Ordering::Relaxed);
                    let at = buf.len();
                    buf.extend_from_slice(&wire::piece_header(b.piece, b.begin, b.len));
                    buf.resize(at + 13 + b.len as usize, 0);
                    if let Err(e) = file::read_block(&sh.file, &sh.meta, b.piece, b.begin, &mut buf[at + 13..]) {
                        warn!(error = %e, "reading a block to upload");
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
        // The HAVEs go with any write, or alone once due.
        let due = lazy_until.is_some_and(|t| t <= tokio::time::Instant::now());
        if !lazy.is_empty() && (!buf.is_empty() || due) {
            buf.extend_from_slice(&lazy);
            lazy.clear();
            lazy_until = None;
        }
        if buf.is_empty() {
            continue;
        }
        let w = tokio::select! {
            // CANCEL-SAFETY: a write cut short ends the connection, so its stream state no
            // longer matters.
            r = wr.write_all(&buf) => r,
            () = close.cancelled() => break,
        };
        if w.is_err() {
            break;
        }
    }
    // A peer that does not read must not hold this task: the shutdown is bounded.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block that trickles in (16 writes a few ms apart) is read in a few wake-ups, not one
    /// per segment, and the short message right behind it is read at once: the mark never
    /// waits for bytes that are not coming.
    #[tokio::test]
    async fn a_trickling_block_is_read_in_one_wake_up_and_what_follows_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let block = Msg::Piece { piece: 3, begin: 0, data: (0..wire::BLOCK).map(|i| (i % 251) as u8).collect() };
        let frame = block.encode();
        let sender = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            // The header and 1000 bytes, then the rest in 16 writes 5 ms apart.
            s.write_all(&frame[..13 + 1000]).await.unwrap();
            for c in frame[13 + 1000..].chunks(1000) {
                tokio::time::sleep(Duration::from_millis(5)).await;
                s.write_all(c).await.unwrap();
            }
            // A short message later, alone: read at once only if the mark went back to 1.
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(&Msg::Have(7).encode()).await.unwrap();
            // Open until the reader is done: nothing else comes.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let (s, _) = l.accept().await.unwrap();
        let (rd, _wr) = s.into_split();
        let mut rd = BufReader::with_capacity(64 * 1024, LowatRead::new(rd));
        let mut buf = Vec::new();
        let t = Duration::from_secs(5);
        let got = tokio::time::timeout(t, wire::read_msg_hinted(&mut rd, &mut buf, 1 << 20, block_body)).await.expect("the block in time").unwrap();
        assert_eq!(got, block);
        let reads = rd.get_ref().reads;
        let got = tokio::time::timeout(t, wire::read_msg_hinted(&mut rd, &mut buf, 1 << 20, block_body)).await.expect("the HAVE behind it in time").unwrap();
        assert_eq!(got, Msg::Have(7));
        assert_eq!(rd.get_ref().set, 1, "the mark is back at 1 for what follows the block");
        // The first read, the rest in one (or two, should the header's read race the mark).
        assert!(reads <= 3, "{reads} reads for one block");
        sender.abort();
    }
}
