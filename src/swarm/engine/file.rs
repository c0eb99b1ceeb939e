//! The data file: opened and checked at start (a resumed download keeps its verified pieces),
//! its space reserved, blocks written and read at their offsets, pieces hashed; and the
//! blocking [`Reader`] of verified bytes.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use sha1::{Digest, Sha1};
use tokio_util::sync::CancellationToken;

use super::{EngineError, Meta, STREAM_WINDOW_BYTES, Shared};
use super::wire;

/// Opens or creates the file, reserves its length, and hashes what it holds (a resumed
/// download keeps its verified pieces).
pub(super) fn open_and_check(meta: &Meta, path: &Path) -> io::Result<(std::fs::File, Vec<bool>)> {
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

/// Writes a received block at its place.
pub(super) fn write_block(f: &std::fs::File, meta: &Meta, piece: u32, begin: u32, data: &[u8]) -> io::Result<()> {
    f.write_all_at(data, piece as u64 * meta.piece_len as u64 + begin as u64)
}

/// Reads a block to upload into `buf` (its length is the block's).
pub(super) fn read_block(f: &std::fs::File, meta: &Meta, piece: u32, begin: u32, buf: &mut [u8]) -> io::Result<()> {
    f.read_exact_at(buf, piece as u64 * meta.piece_len as u64 + begin as u64)
}

/// Reads a complete piece back and hashes it: whether it matches, and (when `blocks`, or when it
/// failed) the SHA-1 of each of its blocks. Blocking.
pub(super) fn hash_piece(f: &std::fs::File, meta: &Meta, piece: u32, blocks: bool) -> io::Result<(bool, Vec<[u8; 20]>)> {
    let plen = meta.piece_len as u64;
    let start = piece as u64 * plen;
    let size = (meta.total - start).min(plen) as usize;
    let mut buf = vec![0u8; size];
    f.read_exact_at(&mut buf, start)?;
    let ok = Sha1::digest(&buf).as_slice() == meta.hashes[piece as usize];
    // Block hashes only when they may be compared: a failed copy, or a suspect piece's new one.
    let hashes = if ok && !blocks { Vec::new() } else { buf.chunks(wire::BLOCK as usize).map(|b| Sha1::digest(b).into()).collect() };
    Ok((ok, hashes))
}

/// A blocking reader of the file from offset 0 that returns only verified bytes, waiting for
/// them; see [`super::Engine::reader`].
pub struct Reader {
    pub(super) sh: Arc<Shared>,
    pub(super) pos: u64,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) cancel: CancellationToken,
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
                if st.core.picker().has(piece) {
                    break;
                }
                if let Some(e) = &st.error {
                    return Err(io::Error::other(EngineError::Stopped(e.clone())));
                }
                let w = STREAM_WINDOW_BYTES.div_ceil(plen).max(2) as u32;
                st.core.set_window(piece, w);
            }
            let cancel = &self.cancel;
            // Not `Interrupted`: readers retry on that kind, and a cancelled download must end them.
            self.rt.block_on(async {
                tokio::select! {
                    // CANCEL-SAFETY: `changed` only marks the value seen when it returns; the
                    // other arms end the read with an error.
                    r = rx.changed() => r.map_err(|_| io::Error::other(EngineError::Cancelled)),
                    () = cancel.cancelled() => Err(io::Error::other(EngineError::Cancelled)),
                    () = sh.cancel.cancelled() => Err(io::Error::other(EngineError::Cancelled)),
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
