//! Packing: a scanned tree (see [`super::scan`]) -> deterministic tar (see [`super::tarw`]),
//! optionally through a multithreaded zstd encoder, with the content digests for the manifest
//! computed while the bytes stream past. Also the atomic "write to a temporary name, fsync, rename"
//! used for every file the store publishes. Knows nothing of the store's layout.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::ImageError;
use super::manifest::{Entry, Header, Manifest, VERSION};
use super::progress::{Progress, ProgressMode};
use super::scan::{Kind, Node, StatKey};
use super::tarw::{self, TarWriter};

/// Archive name of the diff control entry holding the deletion list (NUL-terminated paths).
pub const DELETIONS_NAME: &[u8] = b"./.si-appliance-diff-deletions";

/// How to pack.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// zstd level (1..=22); `None` writes a plain tar.
    pub zstd_level: Option<i32>,
    /// zstd worker threads (at least 1; the output does not depend on the number).
    pub threads: u32,
    /// Progress display.
    pub progress: ProgressMode,
}

impl Default for PackOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        PackOptions { zstd_level: Some(3), threads, progress: ProgressMode::Auto }
    }
}

/// Content digests already known (from a previous pack), keyed by relative path and valid while
/// the file's [`StatKey`] is unchanged.
pub type DigestCache = HashMap<Vec<u8>, (StatKey, [u8; 32])>;

/// SHA-256 of file contents by relative path.
pub type Digests = HashMap<Vec<u8>, [u8; 32]>;

const CHUNK: usize = 1 << 20;

/// The tree at `dir` as a plain tar in memory, less its root entry (so unpacking it over another
/// root leaves that root's own owner, mode and mtime alone): a group overlay as the appliance
/// hands it to installers.
///
/// # Errors
/// [`ImageError`] when the tree cannot be read.
pub fn plain_tar(dir: &Path) -> Result<Vec<u8>, ImageError> {
    let nodes: Vec<_> = super::scan::scan(dir, &super::scan::ScanOptions::default())?.into_iter().filter(|n| !n.rel.is_empty()).collect();
    let opts = PackOptions { zstd_level: None, threads: 1, progress: super::progress::ProgressMode::Off };
    let (_, tar) = write_archive(dir, &nodes, None, None, &opts, dir, Vec::new())?;
    Ok(tar)
}

/// Writes `nodes` (all, or those whose relative path is in `only`) from `root` as an archive to
/// `out`, preceded by the diff deletion list when `deletions` is given. Returns the SHA-256 of
/// each regular file written, by relative path, and the writer.
///
/// # Errors
/// [`ImageError::ReadTree`] / [`ImageError::ChangedDuringPack`] for the tree,
/// [`ImageError::WriteArchive`] (naming `archive`) for the output.
pub fn write_archive<W: Write + Send>(
    root: &Path,
    nodes: &[Node],
    only: Option<&HashSet<Vec<u8>>>,
    deletions: Option<&[Vec<u8>]>,
    opts: &PackOptions,
    archive: &Path,
    out: W,
) -> Result<(Digests, W), ImageError> {
    let werr = |source: io::Error| ImageError::WriteArchive { path: archive.to_path_buf(), source };
    match opts.zstd_level {
        Some(level) => {
            let mut enc = zstd::stream::write::Encoder::new(out, level).map_err(werr)?;
            enc.multithread(opts.threads.max(1)).map_err(werr)?;
            enc.include_checksum(true).map_err(werr)?;
            // Reading and hashing files (this thread) overlaps with feeding the compressor (a
            // second thread), as `tar -c | zstd` overlaps two processes.
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
            std::thread::scope(|s| {
                let feeder = s.spawn(move || -> io::Result<W> {
                    for chunk in rx {
                        enc.write_all(&chunk)?;
                    }
                    enc.finish()
                });
                let mut tar = TarWriter::new(ChannelWriter { tx: Some(tx), buf: Vec::with_capacity(CHUNK) });
                // Dropping the writer (on either path) closes the channel so the feeder ends.
                let written = match write_entries(&mut tar, root, nodes, only, deletions, opts, archive) {
                    Ok(d) => tar.finish().and_then(|mut w| w.close()).map(|()| d).map_err(werr),
                    Err(e) => {
                        drop(tar);
                        Err(e)
                    }
                };
                let fed = feeder.join().unwrap_or_else(|_| Err(io::Error::other("compression thread panicked")));
                match (written, fed) {
                    (Ok(d), Ok(out)) => Ok((d, out)),
                    // The compressor's own error explains a broken channel better.
                    (_, Err(e)) => Err(werr(e)),
                    (Err(e), Ok(_)) => Err(e),
                }
            })
        }
        None => {
            let mut tar = TarWriter::new(BufWriter::with_capacity(CHUNK, out));
            let digests = write_entries(&mut tar, root, nodes, only, deletions, opts, archive)?;
            let buf = tar.finish().map_err(werr)?;
            Ok((digests, buf.into_inner().map_err(|e| werr(e.into_error()))?))
        }
    }
}

fn write_entries<W: Write>(
    tar: &mut TarWriter<W>,
    root: &Path,
    nodes: &[Node],
    only: Option<&HashSet<Vec<u8>>>,
    deletions: Option<&[Vec<u8>]>,
    opts: &PackOptions,
    archive: &Path,
) -> Result<Digests, ImageError> {
    let werr = |source: io::Error| ImageError::WriteArchive { path: archive.to_path_buf(), source };
    let selected = |n: &Node| only.is_none_or(|s| s.contains(&n.rel));
    let total: u64 = nodes.iter().filter(|n| selected(n)).map(tarw::stored_size).sum();
    let mut progress = Progress::new(opts.progress, "packing", Some(total));
    if let Some(dels) = deletions {
        let mut body = Vec::new();
        for d in dels {
            body.extend_from_slice(d);
            body.push(0);
        }
        let control = Node {
            rel: DELETIONS_NAME[2..].to_vec(),
            kind: Kind::File { size: body.len() as u64, extents: None },
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_ns: 0,
            xattrs: Vec::new(),
            stat_key: StatKey { dev: 0, ino: 0, ctime: 0, ctime_ns: 0, mtime_ns: 0, size: 0 },
        };
        tar.header_named(&control, DELETIONS_NAME).map_err(werr)?;
        tar.data(&body).map_err(werr)?;
        tar.pad(body.len() as u64).map_err(werr)?;
    }
    // SHA-256 of the files runs on its own thread (it is the most expensive thing this thread
    // would do besides reading), fed the same buffers that went into the archive; emptied
    // buffers come back for reuse.
    let (htx, hrx) = std::sync::mpsc::sync_channel::<HashMsg>(16);
    let (btx, brx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let hasher = s.spawn(move || {
            let mut h = Sha256::new();
            let mut out = Digests::new();
            for m in hrx {
                match m {
                    HashMsg::Data(v, n) => {
                        h.update(&v[..n]);
                        let _ = btx.send(v);
                    }
                    HashMsg::Zeros(n) => hash_zeros(&mut h, n),
                    HashMsg::End(rel) => {
                        out.insert(rel, h.finalize_reset().into());
                    }
                }
            }
            out
        });
        let pipe = HashPipe { tx: htx, recycled: brx };
        let mut run = || -> Result<(), ImageError> {
            for node in nodes.iter().filter(|n| selected(n)) {
                tar.header(node).map_err(werr)?;
                if let Kind::File { size, extents } = &node.kind {
                    let path = node.path_under(root);
                    copy_file(tar, &path, *size, extents.as_deref(), &pipe, &mut progress, &werr)?;
                    pipe.send(HashMsg::End(node.rel.clone()), &werr)?;
                    tar.pad(tarw::stored_size(node)).map_err(werr)?;
                }
            }
            Ok(())
        };
        let result = run();
        drop(pipe);
        let digests = hasher.join().map_err(|_| werr(io::Error::other("hashing thread panicked")));
        result?;
        progress.finish();
        digests
    })
}

enum HashMsg {
    /// The first `n` bytes of the buffer are file content.
    Data(Vec<u8>, usize),
    /// That many zero bytes (a hole).
    Zeros(u64),
    /// End of the file with this relative path.
    End(Vec<u8>),
}

struct HashPipe {
    tx: std::sync::mpsc::SyncSender<HashMsg>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl HashPipe {
    fn buffer(&self) -> Vec<u8> {
        self.recycled.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK])
    }

    fn send(&self, m: HashMsg, werr: &dyn Fn(io::Error) -> ImageError) -> Result<(), ImageError> {
        self.tx.send(m).map_err(|_| werr(io::Error::other("hashing thread stopped")))
    }
}

/// Copies a file's stored bytes (all, or its data extents) into the archive and hands them, with
/// the holes as zeros, to the hashing thread.
fn copy_file<W: Write>(
    tar: &mut TarWriter<W>,
    path: &Path,
    size: u64,
    extents: Option<&[(u64, u64)]>,
    pipe: &HashPipe,
    progress: &mut Progress,
    werr: &dyn Fn(io::Error) -> ImageError,
) -> Result<(), ImageError> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(ImageError::read_tree(path))?;
    let whole = [(0, size)];
    let ranges = extents.unwrap_or(&whole);
    let mut logical = 0u64;
    for &(off, len) in ranges {
        if off > logical {
            pipe.send(HashMsg::Zeros(off - logical), werr)?;
        }
        if extents.is_some() {
            f.seek(SeekFrom::Start(off)).map_err(ImageError::read_tree(path))?;
        }
        let mut left = len;
        while left > 0 {
            let mut buf = pipe.buffer();
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want]).map_err(ImageError::read_tree(path))?;
            if n == 0 {
                return Err(ImageError::ChangedDuringPack { path: path.to_path_buf(), expected: size });
            }
            tar.data(&buf[..n]).map_err(werr)?;
            progress.add(n as u64);
            left -= n as u64;
            pipe.send(HashMsg::Data(buf, n), werr)?;
        }
        logical = off + len;
    }
    if size > logical {
        pipe.send(HashMsg::Zeros(size - logical), werr)?;
    }
    Ok(())
}

/// Zeros to hash for holes (static: allocating per file showed up as memset in profiles).
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

fn hash_zeros(hash: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hash.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// `Write` that batches bytes into 1 MiB chunks sent over a bounded channel; `close` sends the
/// rest and ends the stream (dropping it also ends the stream).
struct ChannelWriter {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        match &self.tx {
            Some(tx) => tx.send(chunk).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "compressor stopped")),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        }
    }

    fn close(&mut self) -> io::Result<()> {
        self.send()?;
        self.tx = None;
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of a file's content, read from disk (for files not packed in this run).
///
/// # Errors
/// [`ImageError::ReadTree`].
pub fn digest_file(path: &Path) -> Result<[u8; 32], ImageError> {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(ImageError::read_tree(path))?;
    let mut hash = Sha256::new();
    io::copy(&mut f, &mut hash).map_err(ImageError::read_tree(path))?;
    Ok(hash.finalize().into())
}

/// The manifest of `nodes` given the digests of their files; hard links carry the digest of the
/// file they name.
pub fn manifest_of(nodes: &[Node], digests: &Digests, header: Header) -> Manifest {
    let entries = nodes
        .iter()
        .map(|n| {
            let d = match &n.kind {
                Kind::File { .. } => digests.get(&n.rel).copied(),
                Kind::HardLink(t) => digests.get(t).copied(),
                _ => None,
            };
            Entry::of(n, d)
        })
        .collect();
    Manifest { header, entries }
}

/// The header of a full archive packed with `opts`.
pub fn full_header(opts: &PackOptions) -> Header {
    Header {
        si_appliance_manifest: VERSION,
        kind: "full".into(),
        zstd_level: opts.zstd_level,
        base_manifest_sha256: None,
        deletions: Vec::new(),
    }
}

/// Computes the digests of all files from the cache where their stat key is unchanged and from
/// disk otherwise (`read_missing`), or returns `None` as soon as one is missing and
/// `read_missing` is false.
///
/// # Errors
/// [`ImageError::ReadTree`].
pub fn digests_for(
    root: &Path,
    nodes: &[Node],
    cache: &DigestCache,
    read_missing: bool,
) -> Result<Option<Digests>, ImageError> {
    let mut out = HashMap::new();
    for n in nodes {
        if let Kind::File { .. } = n.kind {
            match cache.get(&n.rel) {
                Some((key, d)) if key.same_file(&n.stat_key) => {
                    out.insert(n.rel.clone(), *d);
                }
                _ if read_missing => {
                    out.insert(n.rel.clone(), digest_file(&n.path_under(root))?);
                }
                _ => return Ok(None),
            }
        }
    }
    Ok(Some(out))
}

/// A file being written under a temporary name next to its final path; [`AtomicFile::commit`]
/// fsyncs and renames it into place, dropping it uncommitted removes it. So readers see the old
/// file or the complete new one, never a partial one.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Creates `<dest>.tmp.<pid>`.
    ///
    /// # Errors
    /// [`ImageError::Store`].
    pub fn create(dest: &Path) -> Result<AtomicFile, ImageError> {
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp.{}", std::process::id()));
        let tmp = dest.with_file_name(name);
        let file = File::create(&tmp).map_err(ImageError::store("creating", &tmp))?;
        Ok(AtomicFile { tmp, dest: dest.to_path_buf(), file: Some(file) })
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        // Only `commit` takes the file, and it consumes self.
        self.file.as_mut().expect("file present until commit")
    }

    /// Syncs and renames into place.
    ///
    /// # Errors
    /// [`ImageError::Store`].
    pub fn commit(mut self) -> Result<(), ImageError> {
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(ImageError::store("syncing", &self.tmp))?;
        }
        fs::rename(&self.tmp, &self.dest).map_err(ImageError::store("renaming", &self.tmp))?;
        if let Some(dir) = self.dest.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp.clear();
        Ok(())
    }

    /// Writes `bytes` to `dest` atomically.
    ///
    /// # Errors
    /// [`ImageError::Store`].
    pub fn write(dest: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let mut f = AtomicFile::create(dest)?;
        f.file().write_all(bytes).map_err(ImageError::store("writing", dest))?;
        f.commit()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_keeps_the_old_version_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("img.tar.zst");
        fs::write(&dest, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.file().write_all(b"half of the new").unwrap();
            assert_eq!(fs::read(&dest).unwrap(), b"old", "visible before commit");
            // Dropped without commit: a failed pack.
        }
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "temporary file left behind");
        AtomicFile::write(&dest, b"new").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn channel_writer_chunks_and_closes() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let mut w = ChannelWriter { tx: Some(tx), buf: Vec::new() };
        w.write_all(&vec![1u8; CHUNK + 10]).unwrap();
        w.close().unwrap();
        assert!(w.write_all(&[1u8; CHUNK]).is_err(), "write after close");
        let chunks: Vec<Vec<u8>> = rx.iter().collect();
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![CHUNK, 10]);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        drop(rx);
        let mut w = ChannelWriter { tx: Some(tx), buf: Vec::new() };
        assert!(w.write_all(&vec![0u8; CHUNK]).is_err(), "receiver gone");
    }

    #[test]
    fn hashing_zeros_matches_reading_them() {
        let mut a = Sha256::new();
        hash_zeros(&mut a, 150_000);
        assert_eq!(<[u8; 32]>::from(a.finalize()), <[u8; 32]>::from(Sha256::digest(vec![0u8; 150_000])));
    }
}
