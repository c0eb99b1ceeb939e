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

/// Received blocks of pieces not yet verified, kept in memory: a complete piece is hashed from
/// here and written to the file only once it verified (one copy into the file, no read-back).
/// Beyond [`PENDING_CAP`] bytes a block goes to the file at once (and is read back to hash).
#[derive(Debug, Default)]
pub(super) struct Pending {
    pieces: std::collections::HashMap<u32, Vec<Option<Vec<u8>>>>,
    bytes: usize,
}

/// Bytes of unverified blocks held in memory, at most (the installer runs in RAM).
pub(super) const PENDING_CAP: usize = 32 << 20;

impl Pending {
    /// Keeps block `begin` of `piece` (`blocks` in the piece); gives it back when memory is
    /// full, for the caller to write to the file (an older copy of that block held here is
    /// dropped then, so the file's copy counts).
    pub(super) fn put(&mut self, piece: u32, blocks: u32, begin: u32, data: Vec<u8>) -> Result<(), Vec<u8>> {
        let idx = (begin / wire::BLOCK) as usize;
        let slots = self.pieces.entry(piece).or_insert_with(|| vec![None; blocks as usize]);
        let Some(slot) = slots.get_mut(idx) else { return Err(data) };
        if let Some(old) = slot.take() {
            self.bytes -= old.len();
        }
        if self.bytes + data.len() > PENDING_CAP {
            return Err(data);
        }
        self.bytes += data.len();
        *slot = Some(data);
        Ok(())
    }

    /// Takes the blocks held for `piece` (to hash it; a failed piece's blocks are dropped).
    pub(super) fn take(&mut self, piece: u32) -> Vec<Option<Vec<u8>>> {
        let v = self.pieces.remove(&piece).unwrap_or_default();
        self.bytes -= v.iter().flatten().map(Vec::len).sum::<usize>();
        v
    }

    /// Bytes held.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Hashes a complete piece from its blocks held in memory (`held`, by block index) and, for
/// those not held, the file: whether it matches, and (when `blocks`, or when it failed) the
/// SHA-1 of each of its blocks. Blocking.
pub(super) fn hash_piece(f: &std::fs::File, meta: &Meta, piece: u32, blocks: bool, held: &[Option<Vec<u8>>]) -> io::Result<(bool, Vec<[u8; 20]>)> {
    let plen = meta.piece_len as u64;
    let start = piece as u64 * plen;
    let size = (meta.total - start).min(plen) as usize;
    let bl = wire::BLOCK as usize;
    let mut parts: Vec<std::borrow::Cow<'_, [u8]>> = Vec::with_capacity(size.div_ceil(bl));
    for (b, at) in (0..size).step_by(bl).enumerate() {
        let len = (size - at).min(bl);
        match held.get(b).and_then(Option::as_ref) {
            Some(d) if d.len() == len => parts.push(std::borrow::Cow::Borrowed(d)),
            _ => {
                let mut v = vec![0u8; len];
                f.read_exact_at(&mut v, start + at as u64)?;
                parts.push(std::borrow::Cow::Owned(v));
            }
        }
    }
    let mut whole = Sha1::new();
    for p in &parts {
        whole.update(p);
    }
    let ok = whole.finalize().as_slice() == meta.hashes[piece as usize];
    // Block hashes only when they may be compared: a failed copy, or a suspect piece's new one.
    let hashes = if ok && !blocks { Vec::new() } else { parts.iter().map(|p| Sha1::digest(p).into()).collect() };
    Ok((ok, hashes))
}

/// Writes the blocks of `piece` held in memory to the file (once it verified). Blocking.
pub(super) fn write_held(f: &std::fs::File, meta: &Meta, piece: u32, held: &[Option<Vec<u8>>]) -> io::Result<()> {
    let start = piece as u64 * meta.piece_len as u64;
    for (b, d) in held.iter().enumerate() {
        if let Some(d) = d {
            f.write_all_at(d, start + b as u64 * wire::BLOCK as u64)?;
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_of(d: &[u8], plen: u32) -> Meta {
        Meta {
            info_hash: [1; 20],
            piece_len: plen,
            total: d.len() as u64,
            hashes: d.chunks(plen as usize).map(|c| Sha1::digest(c).into()).collect(),
            file_name: "x".into(),
        }
    }

    #[test]
    fn held_blocks_are_replaced_taken_and_capped() {
        let mut p = Pending::default();
        let b = wire::BLOCK;
        p.put(3, 4, 0, vec![1; b as usize]).unwrap();
        p.put(3, 4, b, vec![2; b as usize]).unwrap();
        // A second copy of a block replaces the first (a banned sender's block fetched again).
        p.put(3, 4, b, vec![3; b as usize]).unwrap();
        assert_eq!(p.bytes(), 2 * b as usize);
        assert_eq!(p.put(3, 4, 9 * b, vec![0; 1]), Err(vec![0; 1]), "a block beyond the piece is given back");
        let t = p.take(3);
        assert_eq!(t.len(), 4);
        assert_eq!(t[1].as_deref(), Some(&vec![3u8; b as usize][..]));
        assert!(t[2].is_none() && p.bytes() == 0 && p.take(3).is_empty());
        // Full: the block is given back (to be written), and an older copy held is dropped.
        let big = PENDING_CAP / b as usize;
        for i in 0..big as u32 {
            p.put(100 + i, 1, 0, vec![0; b as usize]).unwrap();
        }
        p.put(7, 2, b, vec![5; 10]).unwrap_err();
        assert!(p.take(7).iter().all(Option::is_none));
        p.take(100);
        p.put(7, 2, b, vec![5; 10]).unwrap();
        p.put(101, 1, 0, vec![6; 20]).unwrap();
        p.put(7, 2, b, vec![9; 2 * b as usize + 100]).unwrap_err();
        assert!(p.take(7).iter().all(Option::is_none), "the older copy is dropped when the new one goes to the file");
    }

    #[test]
    fn a_piece_hashes_from_memory_and_the_file_and_is_written_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let plen = 4 * wire::BLOCK;
        let d: Vec<u8> = (0..2 * plen as usize + 5000).map(|i| (i * 7 % 251) as u8).collect();
        let meta = meta_of(&d, plen);
        let (f, have) = open_and_check(&meta, &dir.path().join("f")).unwrap();
        assert!(have.iter().all(|h| !h));
        let bl = wire::BLOCK as usize;
        // Piece 1: blocks 0 and 3 in memory, 1 and 2 in the file.
        let p1 = &d[plen as usize..2 * plen as usize];
        let held: Vec<Option<Vec<u8>>> = vec![Some(p1[..bl].to_vec()), None, None, Some(p1[3 * bl..].to_vec())];
        write_block(&f, &meta, 1, wire::BLOCK, &p1[bl..2 * bl]).unwrap();
        write_block(&f, &meta, 1, 2 * wire::BLOCK, &p1[2 * bl..3 * bl]).unwrap();
        let (ok, hashes) = hash_piece(&f, &meta, 1, false, &held).unwrap();
        assert!(ok && hashes.is_empty());
        let (ok, hashes) = hash_piece(&f, &meta, 1, true, &held).unwrap();
        assert!(ok && hashes.len() == 4 && hashes[3] == <[u8; 20]>::from(Sha1::digest(&p1[3 * bl..])));
        // Not yet on disk: block 0 of piece 1 is still zero there.
        let mut b = vec![0u8; bl];
        read_block(&f, &meta, 1, 0, &mut b).unwrap();
        assert!(b.iter().all(|x| *x == 0));
        write_held(&f, &meta, 1, &held).unwrap();
        read_block(&f, &meta, 1, 0, &mut b).unwrap();
        assert_eq!(b, p1[..bl]);
        // A wrong block fails the piece and names every block's hash; the short last piece too.
        let mut bad = held.clone();
        bad[0] = Some(vec![0xa5; bl]);
        let (ok, hashes) = hash_piece(&f, &meta, 1, false, &bad).unwrap();
        assert!(!ok && hashes.len() == 4);
        let last = &d[2 * plen as usize..];
        let (ok, _) = hash_piece(&f, &meta, 2, false, &[Some(last.to_vec())]).unwrap();
        assert!(ok);
    }
}
