//! The TFTP service: an async-tftp [`Handler`](async_tftp::server::Handler) over [`BootFile`]
//! keys, read-only. The only file that imports async-tftp.
//!
//! What async-tftp does and how we use it (crate 0.4.2, read from its source):
//! - Options: blksize (RFC 2348, capped at `tftp.max_blksize`), timeout and tsize (RFC 2349),
//!   windowsize (RFC 7440, capped at `tftp.max_windowsize`, default 8). Windowing was tested
//!   with atftp 0.8 (windows 2..64, byte-identical, 3-5x the lock-step rate) and with a lossy
//!   client on loopback (`windowsize_survives_lost_blocks`): a block lost inside a window is
//!   resent at once, but a loss of the *first* block of a window costs one full timeout,
//!   because async-tftp ignores the client's ACK of the block just before its window and
//!   waits for its timer. Correct, not broken; lock-step TFTP pays a timeout per loss anyway.
//! - Threading: `serve()` runs its own executor; we drive it with `async_io::block_on` on a
//!   dedicated blocking thread, so TFTP never occupies a tokio worker and the thread polls
//!   the async-io reactor itself. All transfers share that thread.
//! - The handler sits behind one mutex and `read_req_open` runs under it, so concurrent
//!   requests are serialised through it. Ours parses the name (pure), then does one
//!   `stat`/`open`/`fstat` on the blocking pool (microseconds) or renders a few hundred bytes;
//!   the file is read later, outside the lock, through a bounded read-ahead buffer.
//! - Every transfer runs as a task with its own socket on the server's address.
//! - async-tftp ignores ERROR packets from the client during a transfer (upstream issue #18):
//!   a firmware that aborts after the OACK (the usual `tsize` probe) or a client that gives
//!   up leaves the task retransmitting until `max_send_retries` runs out. The crate's default
//!   is 100 retries (× the 3 s timeout = 5 minutes); we use [`MAX_SEND_RETRIES`], which ends
//!   such a task after `(MAX_SEND_RETRIES + 1) × timeout` (18 s with the default timeout) while
//!   still riding out several lost packets in a row on a live transfer.
//! - Write requests, unknown names and traversal attempts get a TFTP ERROR packet; packets
//!   that are not requests, or do not parse, are dropped by async-tftp without an answer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use async_tftp::packet;
use async_tftp::server::{Handler, TftpServerBuilder};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::boot::error::{BadName, BootError};
use crate::boot::file::{self, BootFile, Source};
use crate::boot::BootContext;
use crate::config::TftpConfig;

/// Retransmissions of one block (or window) before a transfer is abandoned. See the module
/// docs: async-tftp cannot see a client's ERROR packet, so this bounds how long a dead
/// transfer lingers.
pub const MAX_SEND_RETRIES: u32 = 5;

/// Read-ahead per transfer: the file is read on the blocking pool in chunks of this size.
const READ_AHEAD: usize = 128 * 1024;

/// async-tftp's own error (server set-up or the listening socket), kept behind this type so
/// the crate's types do not leave this file.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TftpError(#[from] async_tftp::Error);

/// The handler: maps request names to boot files.
struct BootHandler {
    ctx: Arc<BootContext>,
    slots: Arc<Slots>,
}

/// Running transfers, per client address and in all, against `tftp.max_transfers*`.
#[derive(Debug)]
struct Slots {
    per_client_max: usize,
    total_max: usize,
    state: std::sync::Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    total: usize,
    per_client: std::collections::HashMap<std::net::IpAddr, usize>,
    /// Refusals since the last WARN, and when that was (WARN at most every [`BUSY_WARN_EVERY`]).
    refused: u64,
    warned: Option<std::time::Instant>,
}

/// Busy refusals are WARNed at most this often (each one is a debug line).
const BUSY_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// One running transfer's place; given back on drop (the transfer task drops its reader when it
/// ends, however it ends).
struct Slot {
    slots: Arc<Slots>,
    ip: std::net::IpAddr,
}

impl Slots {
    fn new(cfg: &TftpConfig) -> Slots {
        Slots { per_client_max: cfg.max_transfers_per_client, total_max: cfg.max_transfers, state: Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for a transfer to `client`, or None (logged, rate-limited) when a cap is reached.
    fn take(self: &Arc<Self>, client: &SocketAddr, name: &str) -> Option<Slot> {
        let ip = client.ip();
        let mut st = self.lock();
        let mine = st.per_client.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_client_max || st.total >= self.total_max {
            st.refused += 1;
            let (total, refused) = (st.total, st.refused);
            debug!(%client, name, running = mine, total, "tftp: busy: refused");
            if st.warned.is_none_or(|t| t.elapsed() >= BUSY_WARN_EVERY) {
                st.warned = Some(std::time::Instant::now());
                st.refused = 0;
                warn!(
                    %client, running = mine, total, per_client_max = self.per_client_max, max = self.total_max, refused,
                    "tftp: busy: transfers refused (tftp.max_transfers_per_client / tftp.max_transfers)"
                );
            }
            return None;
        }
        st.total += 1;
        *st.per_client.entry(ip).or_insert(0) += 1;
        Some(Slot { slots: self.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.slots.lock();
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.per_client.remove(&self.ip);
            }
        }
    }
}

/// A transfer's reader with its [`Slot`].
struct Counted {
    inner: Reader,
    _slot: Slot,
}

impl futures_lite::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

type Reader = Box<dyn futures_lite::AsyncRead + Unpin + Send>;

impl Handler for BootHandler {
    type Reader = Reader;
    type Writer = futures_lite::io::Sink;

    async fn read_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
    ) -> Result<(Self::Reader, Option<u64>), packet::Error> {
        // async-tftp hands the name over as a Path; it was a UTF-8 string on the wire.
        let name = path.to_str().unwrap_or("");
        let f = match BootFile::parse(name) {
            Ok(f) => f,
            Err(why) => {
                debug!(%client, name, %why, "tftp: refused");
                return Err(match why {
                    BadName::Traversal => packet::Error::PermissionDenied,
                    BadName::Malformed | BadName::Unknown => packet::Error::FileNotFound,
                });
            }
        };
        let Some(slot) = self.slots.take(client, name) else {
            return Err(packet::Error::Msg("busy".to_owned()));
        };
        let ctx = self.ctx.clone();
        let key = f.clone();
        let ip = crate::types::addrs::v4(*client);
        let src = blocking::unblock(move || file::open(&ctx, &key, ip, "tftp")).await;
        let src = match src {
            Ok(s) => s,
            Err(e) if e.is_not_found() => {
                debug!(%client, file = %f, "tftp: not found: {e}");
                return Err(packet::Error::FileNotFound);
            }
            Err(e) => {
                warn!(%client, file = %f, "tftp: refused: {e:#}");
                return Err(packet::Error::FileNotFound);
            }
        };
        let size = src.len();
        let mac = f.mac().map(tracing::field::display);
        crate::boot::note_boot_file(&self.ctx, *client, &f, f.mac(), size, crate::types::events::BootVia::Tftp);
        if f.is_node_step() {
            info!(%client, file = %f, kind = f.kind(), mac, size, "tftp: sending");
        } else {
            debug!(%client, file = %f, kind = f.kind(), size, "tftp: sending");
        }
        let reader: Reader = match src {
            Source::Disk { file, .. } => Box::new(ChunkReader::new(file)),
            Source::Rendered(bytes) => Box::new(futures_lite::io::Cursor::new(bytes)),
        };
        Ok((Box::new(Counted { inner: reader, _slot: slot }), Some(size)))
    }

    async fn write_req_open(
        &mut self,
        client: &SocketAddr,
        path: &Path,
        _size: Option<u64>,
    ) -> Result<Self::Writer, packet::Error> {
        debug!(%client, name = %path.display(), "tftp: write request refused (read-only server)");
        Err(packet::Error::IllegalOperation)
    }
}

/// Reads a file in [`READ_AHEAD`] chunks on the blocking pool and hands them out block by
/// block. One thread hop per chunk: `blocking::Unblock` refills its pipe as it drains, which
/// costs a wake-up per TFTP block and measured twice the CPU per lock-step transfer.
struct ChunkReader {
    /// The file, while no read is running.
    file: Option<std::fs::File>,
    /// The current chunk and how much of it was handed out.
    chunk: Vec<u8>,
    pos: usize,
    /// A read on the blocking pool: gives back the file and the next chunk.
    reading: Option<blocking::Task<(std::fs::File, std::io::Result<Vec<u8>>)>>,
    eof: bool,
}

impl ChunkReader {
    fn new(file: std::fs::File) -> ChunkReader {
        ChunkReader { file: Some(file), chunk: Vec::new(), pos: 0, reading: None, eof: false }
    }
}

impl futures_lite::AsyncRead for ChunkReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::future::Future as _;
        use std::io::Read as _;
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if this.pos < this.chunk.len() {
                let n = out.len().min(this.chunk.len() - this.pos);
                out[..n].copy_from_slice(&this.chunk[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(n));
            }
            if this.eof {
                return Poll::Ready(Ok(0));
            }
            if let Some(task) = this.reading.as_mut() {
                let (file, r) = std::task::ready!(std::pin::Pin::new(task).poll(cx));
                this.reading = None;
                this.file = Some(file);
                let chunk = r?;
                this.eof = chunk.is_empty();
                this.chunk = chunk;
                this.pos = 0;
                continue;
            }
            let Some(mut file) = this.file.take() else {
                return Poll::Ready(Err(std::io::Error::other("tftp reader lost its file")));
            };
            let mut buf = std::mem::take(&mut this.chunk);
            this.reading = Some(blocking::unblock(move || {
                buf.resize(READ_AHEAD, 0);
                let mut len = 0;
                let r = loop {
                    match file.read(&mut buf[len..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            len += n;
                            if len == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(len);
                (file, r.map(|()| buf))
            }));
        }
    }
}

/// Runs the TFTP server on `socket` until `shutdown`. See [`crate::boot::serve_tftp`].
///
/// # Errors
/// [`BootError::Tftp`] when the server cannot be built or its socket fails.
pub async fn serve(
    ctx: Arc<BootContext>,
    cfg: &TftpConfig,
    socket: std::net::UdpSocket,
    shutdown: CancellationToken,
) -> Result<(), BootError> {
    let addr = socket.local_addr().map_err(BootError::TftpSocket)?;
    let err = |e: async_tftp::Error| BootError::Tftp { addr, source: TftpError(e) };
    let slots = Arc::new(Slots::new(cfg));
    let server = TftpServerBuilder::with_handler(BootHandler { ctx, slots })
        .std_socket(socket)
        .map_err(err)?
        .timeout(cfg.timeout)
        .block_size_limit(cfg.max_blksize)
        .window_size_limit(cfg.max_windowsize)
        .max_send_retries(MAX_SEND_RETRIES)
        .build()
        .await
        .map_err(err)?;
    info!(
        %addr, max_blksize = cfg.max_blksize, max_windowsize = cfg.max_windowsize,
        max_transfers_per_client = cfg.max_transfers_per_client, max_transfers = cfg.max_transfers, "tftp: serving"
    );
    // async-tftp runs its transfers on its own executor inside `serve()`, and its sockets on
    // the async-io reactor. Driving it with `async_io::block_on` on a thread of its own lets
    // that thread poll the reactor itself: one thread hop less per block than polling it from
    // a tokio task, which matters for lock-step TFTP where every block waits for an ACK.
    let stop = shutdown.clone();
    let served = tokio::task::spawn_blocking(move || {
        async_io::block_on(futures_lite::future::or(
            async move { Some(server.serve().await) },
            // CANCEL-SAFETY: dropping `serve()` drops its executor and with it every transfer
            // task and socket; nothing is half-written (the server is read-only).
            async move {
                stop.cancelled().await;
                None
            },
        ))
    });
    match served.await {
        Ok(Some(r)) => r.map_err(err),
        Ok(None) => {
            debug!("tftp: shut down");
            Ok(())
        }
        Err(e) => Err(BootError::TftpThread(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    /// A minimal lock-step RRQ client on loopback: returns the file or the ERROR code.
    fn fetch(server: SocketAddr, name: &str, opcode: u8) -> Result<Vec<u8>, u16> {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = vec![0, opcode];
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(b"\0octet\0");
        s.send_to(&req, server).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 600];
        for _ in 0..10_000 {
            let (n, from) = s.recv_from(&mut buf).expect("reply within 5 s");
            match buf[1] {
                3 => {
                    out.extend_from_slice(&buf[4..n]);
                    s.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
                    if n < 4 + 512 {
                        return Ok(out);
                    }
                }
                5 => return Err(u16::from_be_bytes([buf[2], buf[3]])),
                other => panic!("unexpected opcode {other}"),
            }
        }
        panic!("transfer did not end");
    }

    /// An RFC 7440 client that pretends to lose the first delivery of the DATA blocks in
    /// `lose`. Like tftp-hpa/U-Boot it ACKs at the end of each window, ACKs the last in-order
    /// block once when it sees a gap, and re-ACKs it when nothing arrives for a second.
    fn fetch_windowed(server: SocketAddr, name: &str, windowsize: u16, lose: &[u16]) -> Vec<u8> {
        const BLK: usize = 512;
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut req = vec![0, 1];
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(format!("\0octet\0blksize\0{BLK}\0windowsize\0{windowsize}\0").as_bytes());
        s.send_to(&req, server).unwrap();
        let mut lost: Vec<u16> = Vec::new();
        let (mut out, mut expected, mut in_window, mut gap_acked) = (Vec::new(), 1u16, 0u16, 0u16);
        let mut peer = None;
        let mut buf = [0u8; BLK + 4];
        for _ in 0..100_000 {
            let (n, from) = match s.recv_from(&mut buf) {
                Ok(r) => r,
                Err(_) => {
                    // Our own timeout: say again what we have.
                    if let Some(p) = peer {
                        s.send_to(&[0, 4, (expected - 1).to_be_bytes()[0], (expected - 1).to_be_bytes()[1]], p).unwrap();
                    }
                    continue;
                }
            };
            peer = Some(from);
            let ack = |b: u16| s.send_to(&[0, 4, b.to_be_bytes()[0], b.to_be_bytes()[1]], from).unwrap();
            match buf[1] {
                6 => {
                    ack(0);
                }
                3 => {
                    let blk = u16::from_be_bytes([buf[2], buf[3]]);
                    if lose.contains(&blk) && !lost.contains(&blk) {
                        lost.push(blk);
                        continue;
                    }
                    if blk == expected {
                        out.extend_from_slice(&buf[4..n]);
                        expected += 1;
                        in_window += 1;
                        if n < 4 + BLK {
                            ack(blk);
                            assert_eq!(lost.len(), lose.len(), "every chosen loss happened");
                            return out;
                        }
                        if in_window == windowsize {
                            ack(blk);
                            in_window = 0;
                        }
                    } else if blk > expected && gap_acked != expected {
                        ack(expected - 1);
                        gap_acked = expected;
                        in_window = 0;
                    }
                }
                other => panic!("unexpected opcode {other}"),
            }
        }
        panic!("windowed transfer did not end");
    }

    /// Windowsize with losses: the server must resend from the first missing block, whether the
    /// loss is inside a window (the client's ACK of the last in-order block moves the window)
    /// or the first block of a window (async-tftp ignores that ACK, which lies just before its
    /// window, and resends the whole window after its timeout: correct, but a stall of one
    /// timeout per such loss; printed below, see the README).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn windowsize_survives_lost_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&kernel, &data).unwrap();
        let ctx = Arc::new(BootContext::for_tests(vec![dir.path().to_owned()], kernel));
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let token = CancellationToken::new();
        let t2 = token.clone();
        let cfg = TftpConfig { max_windowsize: 8, timeout: Duration::from_secs(1), ..TftpConfig::default() };
        let task = tokio::spawn(async move { serve(ctx, &cfg, socket, t2).await });

        let want = data.clone();
        tokio::task::spawn_blocking(move || {
            let cases: [(&str, &[u16]); 6] = [
                ("no loss", &[]),
                ("one mid-window loss", &[5]),
                ("one mid-window loss later", &[100]),
                ("first block of a window lost", &[9]),
                ("several losses", &[5, 13, 100, 390]),
                ("last block lost", &[391]),
            ];
            for (what, lose) in cases {
                let t = std::time::Instant::now();
                assert!(fetch_windowed(addr, "vmlinuz", 8, lose) == want, "{what}: wrong bytes");
                eprintln!("windowsize 8, {what}: {:?}", t.elapsed());
            }
        })
        .await
        .unwrap();
        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// The UEFI `tsize` probe: RRQ with options, OACK, then the client sends ERROR 8 and goes
    /// away. async-tftp does not read that ERROR (upstream #18), so the transfer retransmits
    /// its OACK; with [`MAX_SEND_RETRIES`] it gives up after that many retries and ends with an
    /// ERROR of its own, instead of 100 retries (5 minutes) by default.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_error_after_oack_ends_after_bounded_retries() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, vec![7u8; 100_000]).unwrap();
        let ctx = Arc::new(BootContext::for_tests(vec![dir.path().to_owned()], kernel));
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let token = CancellationToken::new();
        let t2 = token.clone();
        let cfg = TftpConfig { timeout: Duration::from_secs(1), ..TftpConfig::default() };
        let task = tokio::spawn(async move { serve(ctx, &cfg, socket, t2).await });

        let (oacks, ended_with_error) = tokio::task::spawn_blocking(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.send_to(b"\0\x01vmlinuz\0octet\0tsize\00\0blksize\01468\0", addr).unwrap();
            let mut buf = [0u8; 1600];
            let (_, tid) = s.recv_from(&mut buf).expect("OACK");
            assert_eq!(buf[1], 6, "expected an OACK");
            s.send_to(b"\0\x05\0\x08tsize probe done\0", tid).unwrap();
            let mut oacks = 1u32;
            // Bounded: at most 100 packets, each within 5 s.
            for _ in 0..100 {
                match s.recv_from(&mut buf) {
                    Ok((_, from)) if from == tid && buf[1] == 6 => oacks += 1,
                    Ok((_, from)) if from == tid && buf[1] == 5 => return (oacks, true),
                    Ok(_) => {}
                    Err(_) => return (oacks, false),
                }
            }
            (oacks, false)
        })
        .await
        .unwrap();
        eprintln!("OACKs sent after the client's ERROR: {}", oacks - 1);
        assert!(oacks <= MAX_SEND_RETRIES + 1, "{oacks} OACKs");
        assert!(ended_with_error || oacks == 1, "the transfer neither ended nor honoured the ERROR");
        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// Transfers that stay open (the client never ACKs) hold their place: with a cap of 2 per
    /// client, a third RRQ from the same address gets ERROR "busy", another address does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfers_over_the_per_client_cap_get_busy() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, vec![7u8; 100_000]).unwrap();
        let ctx = Arc::new(BootContext::for_tests(vec![dir.path().to_owned()], kernel));
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let port = socket.local_addr().unwrap().port();
        let token = CancellationToken::new();
        let t2 = token.clone();
        let cfg = TftpConfig { timeout: Duration::from_secs(1), max_transfers_per_client: 2, ..TftpConfig::default() };
        let task = tokio::spawn(async move { serve(ctx, &cfg, socket, t2).await });

        let first_reply = move |from: &str| -> (u8, Vec<u8>) {
            let s = UdpSocket::bind(format!("{from}:0")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.send_to(b"\0\x01vmlinuz\0octet\0", format!("{from}:{port}")).unwrap();
            let mut buf = [0u8; 600];
            let (n, _) = s.recv_from(&mut buf).expect("a reply within 5 s");
            (buf[1], buf[4..n].to_vec())
        };
        let r = tokio::task::spawn_blocking(move || {
            // Never ACKed: each transfer stays open for its retries (6 s here).
            [first_reply("127.0.0.1"), first_reply("127.0.0.1"), first_reply("127.0.0.1"), first_reply("127.0.0.2")]
        })
        .await
        .unwrap();
        assert_eq!((r[0].0, r[1].0), (3, 3), "the first two get DATA");
        assert_eq!(r[2].0, 5, "the third gets an ERROR");
        assert!(r[2].1.starts_with(b"busy"), "{:?}", String::from_utf8_lossy(&r[2].1));
        assert_eq!(r[3].0, 3, "another address is not capped by this one");
        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loopback_reads_keys_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&kernel, &data).unwrap();
        let ctx = Arc::new(BootContext::for_tests(vec![dir.path().to_owned()], kernel));
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let token = CancellationToken::new();
        let t2 = token.clone();
        let task = tokio::spawn(async move { serve(ctx, &TftpConfig::default(), socket, t2).await });

        let r = tokio::task::spawn_blocking(move || {
            (
                fetch(addr, "vmlinuz", 1),
                fetch(addr, "boot.ipxe", 1),
                fetch(addr, "../etc/passwd", 1),
                fetch(addr, "nothing", 1),
                fetch(addr, "vmlinuz", 2),
            )
        })
        .await
        .unwrap();
        assert_eq!(r.0.unwrap(), data);
        assert!(String::from_utf8(r.1.unwrap()).unwrap().starts_with("#!ipxe"));
        assert_eq!(r.2, Err(2));
        assert_eq!(r.3, Err(1));
        assert_eq!(r.4, Err(4));
        token.cancel();
        task.await.unwrap().unwrap();
    }
}
