//! Safe streaming unpack of an archive (tar or tar.zst, detected by magic) from any `Read` into a
//! target root. This is what the installer runs on bytes arriving from the swarm, so it treats
//! the archive as hostile:
//! - entry names are split into components; absolute names and `..` are refused;
//! - no parent of an entry may be a symbolic link (checked with lstat, never followed), so a
//!   symlink in the archive can point anywhere (root file systems are full of absolute links) but
//!   nothing is ever written through one;
//! - hard-link targets must name an existing non-directory inside the root by the same rules;
//! - files are created with O_EXCL after removing what was there, so an existing symlink is
//!   replaced, never followed.
//!
//! It restores numeric owners, modes (after chown, which clears set-uid bits), xattrs (after the
//! data and chown, which clear `security.capability`), ACLs, hard links, devices, fifos, holes of
//! sparse entries and mtimes (directories last). A diff archive starts with a deletion list
//! ([`super::pack::DELETIONS_NAME`]), applied before its entries.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;
use tracing::{debug, warn};

use super::acl;
use super::error::{ImageError, Refusal};
use super::manifest::Manifest;
use super::pack::{self, DELETIONS_NAME};
use super::path::{components, escape, join};
use super::progress::{Progress, ProgressMode};
use super::scan::{self, ScanOptions};
use super::tarr::{Head, TarReader};

/// zstd frame magic (RFC 8878 section 3.1.1).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest deletion list accepted (bytes).
const MAX_DELETIONS: u64 = 256 << 20;
const CHUNK: usize = 1 << 20;

/// How to unpack.
#[derive(Clone, Debug)]
pub struct UnpackOptions {
    /// Progress display.
    pub progress: ProgressMode,
    /// Expected bytes of file data, for the progress bar.
    pub total: Option<u64>,
    /// Restore numeric owners (default: when running as root).
    pub restore_owners: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        UnpackOptions { progress: ProgressMode::Auto, total: None, restore_owners: root }
    }
}

/// What an unpack did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackReport {
    /// Entries restored.
    pub entries: u64,
    /// File bytes written (logical).
    pub bytes: u64,
    /// Paths deleted by a diff's deletion list.
    pub deleted: u64,
    /// xattrs the target file system could not hold (logged).
    pub xattrs_unsupported: u64,
}

struct Deferred {
    path: PathBuf,
    mode: u32,
    mtime: i64,
    mtime_ns: u32,
    default_acl: Option<Vec<u8>>,
}

struct Unpacker<'a> {
    root: &'a Path,
    opts: &'a UnpackOptions,
    /// Directories under the root already checked to be real directories; cleared whenever a
    /// directory is removed, so a directory replaced by a symlink is checked again.
    verified: HashSet<PathBuf>,
    deferred: Vec<Deferred>,
    /// Existing directories whose contents changed, with their mtime before.
    touched: HashMap<PathBuf, FileTime>,
    report: UnpackReport,
}

/// Unpacks `input` into `root` (which must exist).
///
/// # Errors
/// [`ImageError::ReadArchive`] for truncated or corrupt input, [`ImageError::Refused`] for a
/// hostile entry (nothing is written for it, and unpacking stops), [`ImageError::WriteTree`] for
/// failures under the root.
pub fn unpack<R: Read + Send>(input: R, root: &Path, opts: &UnpackOptions) -> Result<UnpackReport, ImageError> {
    let mut input = BufReader::with_capacity(CHUNK, input);
    let head = input.fill_buf().map_err(read_err("input"))?;
    if !head.starts_with(&ZSTD_MAGIC) {
        return unpack_tar(&mut input, root, opts);
    }
    // Decompress on a second thread (like `zstd -d | tar -x`), handing over 1 MiB chunks through
    // a bounded channel, so decoding and writing files overlap.
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut dec = match zstd::stream::read::Decoder::with_buffer(input) {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            loop {
                let mut chunk = vec![0u8; CHUNK];
                match read_full(&mut dec, &mut chunk) {
                    Ok(0) => return,
                    Ok(n) => {
                        chunk.truncate(n);
                        if tx.send(Ok(chunk)).is_err() {
                            return; // the unpacker stopped (error); nothing more to do
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let mut reader = ChannelReader { rx, chunk: Vec::new(), pos: 0 };
        let report = unpack_tar(&mut reader, root, opts)?;
        // Read to the end of the stream so the frame checksum is verified.
        io::copy(&mut reader, &mut io::sink()).map_err(read_err("zstd stream"))?;
        Ok(report)
    })
}

/// Reads until `buf` is full or the end of the stream.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `Read` over chunks arriving on a channel; a closed channel is the end of the stream.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(c)) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Unpacks, then checks the tree under `root` against `manifest`.
///
/// # Errors
/// As [`unpack`] and [`verify`].
pub fn unpack_verified<R: Read + Send>(
    input: R,
    root: &Path,
    opts: &UnpackOptions,
    manifest: &Manifest,
) -> Result<UnpackReport, ImageError> {
    let r = unpack(input, root, opts)?;
    verify(root, manifest)?;
    Ok(r)
}

/// Whether `dir` is missing or an empty directory: a target that an unpack may clear again when
/// it fails (see [`clear_after_failure`]).
pub fn is_fresh_target(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(mut d) => d.next().is_none(),
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// After a failed unpack into a target that was fresh before it ([`is_fresh_target`]): removes
/// everything the unpack wrote under `root` (never following symlinks), so a refused or broken
/// archive leaves no partial tree behind. `root` itself stays.
///
/// # Errors
/// [`ImageError::WriteTree`] naming what could not be removed.
pub fn clear_after_failure(root: &Path) -> Result<(), ImageError> {
    let entries = match fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::write_tree(root)(e)),
    };
    for e in entries {
        let e = e.map_err(ImageError::write_tree(root))?;
        let p = e.path();
        // A read-only directory written by the archive (mode 0500) still lets root remove its
        // entries; file_type() does not follow a symlink.
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        r.map_err(ImageError::write_tree(&p))?;
    }
    Ok(())
}

/// Scans `root`, hashing every file, and compares it with `manifest` entry by entry.
///
/// # Errors
/// [`ImageError::VerifyMismatch`] with the first difference, or a scan error.
pub fn verify(root: &Path, manifest: &Manifest) -> Result<(), ImageError> {
    let nodes = scan::scan(root, &ScanOptions::default())?;
    let digests = pack::digests_for(root, &nodes, &Default::default(), true)?.unwrap_or_default();
    let actual = pack::manifest_of(&nodes, &digests, manifest.header.clone());
    let diffs = manifest.differences(&actual);
    if let Some(first) = diffs.first() {
        return Err(ImageError::VerifyMismatch { root: root.to_path_buf(), count: diffs.len(), first: first.clone() });
    }
    Ok(())
}

fn read_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::ReadArchive { what, source }
}

fn refused(name: &[u8], why: Refusal) -> ImageError {
    ImageError::Refused { entry: escape(name), why }
}

fn unpack_tar<R: Read>(input: R, root: &Path, opts: &UnpackOptions) -> Result<UnpackReport, ImageError> {
    let mut tar = TarReader::new(input);
    let mut u = Unpacker {
        root,
        opts,
        verified: HashSet::new(),
        deferred: Vec::new(),
        touched: HashMap::new(),
        report: UnpackReport::default(),
    };
    let mut progress = Progress::new(opts.progress, "unpacking", opts.total);
    let mut buf = vec![0u8; CHUNK];
    let mut index = 0usize;
    while let Some(head) = tar.next_entry().map_err(read_err("tar stream"))? {
        u.entry(&mut tar, head, index, &mut buf, &mut progress)?;
        index += 1;
    }
    progress.finish();
    u.finish()?;
    Ok(u.report)
}

enum What {
    File,
    Dir,
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    Node(libc::mode_t, u64),
}

impl Unpacker<'_> {
    fn entry<R: Read>(
        &mut self,
        tar: &mut TarReader<R>,
        head: Head,
        index: usize,
        buf: &mut [u8],
        progress: &mut Progress,
    ) -> Result<(), ImageError> {
        let name = head.name;
        let what = match head.typeflag {
            b'0' | 0 | b'7' => What::File,
            b'5' => What::Dir,
            b'2' => What::Symlink(head.link),
            b'1' => What::HardLink(head.link),
            b'3' => What::Node(libc::S_IFCHR, libc::makedev(head.devmajor, head.devminor)),
            b'4' => What::Node(libc::S_IFBLK, libc::makedev(head.devmajor, head.devminor)),
            b'6' => What::Node(libc::S_IFIFO, 0),
            other => return Err(refused(&name, Refusal::UnsupportedType(other))),
        };
        let (mode, mtime, mtime_ns) = (head.mode, head.mtime, head.mtime_ns);
        let uid = u32::try_from(head.uid).map_err(|_| refused(&name, Refusal::OwnerOutOfRange))?;
        let gid = u32::try_from(head.gid).map_err(|_| refused(&name, Refusal::OwnerOutOfRange))?;
        let mut xattrs = head.xattrs;
        for (text, key) in
            [(&head.acl_access, &b"system.posix_acl_access"[..]), (&head.acl_default, b"system.posix_acl_default")]
        {
            if let Some(text) = text {
                if !xattrs.iter().any(|(k, _)| k == key) {
                    match acl::text_to_xattr(text, &|db, n| self.lookup(db, n)) {
                        Some(v) => xattrs.push((key.to_vec(), v)),
                        None => {
                            self.report.xattrs_unsupported += 1;
                            warn!(entry = %escape(&name), acl = %String::from_utf8_lossy(text), "cannot convert ACL text; skipped");
                        }
                    }
                }
            }
        }
        let comps = components(&name).map_err(|why| refused(&name, why))?;
        if comps == [&DELETIONS_NAME[2..]] {
            if index != 0 {
                return Err(refused(&name, Refusal::MisplacedDeletions));
            }
            return self.deletions(tar, head.size, &name);
        }
        let path = join(self.root, &comps);
        if !comps.is_empty() {
            self.ensure_parents(&comps, &name)?;
            self.touch_parent(&comps);
        }
        // Remove what is in the way (never following it).
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && matches!(what, What::Dir) => {}
            Ok(_) if comps.is_empty() => {}
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&path).map_err(ImageError::write_tree(&path))?;
                self.verified.clear();
            }
            Ok(_) => fs::remove_file(&path).map_err(ImageError::write_tree(&path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::WriteTree { path, source: e }),
        }
        let mut is_dir = false;
        match what {
            What::File => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(ImageError::write_tree(&path))?;
                let logical = copy_data(tar, &mut f, &path, &name, head.size, head.sparse.as_ref(), buf, progress)?;
                self.report.bytes += logical;
            }
            What::Dir => {
                is_dir = true;
                if !comps.is_empty() {
                    match fs::create_dir(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(ImageError::WriteTree { path, source: e }),
                    }
                    self.verified.insert(path.clone());
                }
            }
            What::Symlink(target) => {
                if target.is_empty() || target.contains(&0) {
                    return Err(refused(&name, Refusal::BadName));
                }
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &path)
                    .map_err(ImageError::write_tree(&path))?;
            }
            What::HardLink(target) => {
                let tcomps =
                    components(&target).map_err(|_| refused(&name, Refusal::HardLinkOutside(escape(&target))))?;
                if tcomps.is_empty() {
                    return Err(refused(&name, Refusal::HardLinkOutside(escape(&target))));
                }
                let tpath = join(self.root, &tcomps);
                self.check_parents(&tcomps, &target)?;
                match fs::symlink_metadata(&tpath) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(refused(&name, Refusal::HardLinkMissing(escape(&target)))),
                }
                fs::hard_link(&tpath, &path).map_err(ImageError::write_tree(&path))?;
                // A hard link shares the inode's metadata, restored with its first name.
                self.report.entries += 1;
                return Ok(());
            }
            What::Node(kind, dev) => {
                let c = std::ffi::CString::new(path.as_os_str().as_bytes())
                    .map_err(|_| refused(&name, Refusal::BadName))?;
                // SAFETY: `c` is a valid NUL-terminated path; mknod takes no other pointers.
                if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) } != 0 {
                    return Err(ImageError::WriteTree { path, source: io::Error::last_os_error() });
                }
            }
        }
        let is_symlink = fs::symlink_metadata(&path).map(|m| m.file_type().is_symlink()).unwrap_or(false);
        if self.opts.restore_owners {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(ImageError::write_tree(&path))?;
        }
        let mut default_acl = None;
        if is_dir {
            if let Some(i) = xattrs.iter().position(|(k, _)| k == b"system.posix_acl_default") {
                // Set last, or it would give every file created inside an inherited ACL.
                default_acl = Some(xattrs.remove(i).1);
            }
            self.deferred.push(Deferred { path: path.clone(), mode, mtime, mtime_ns, default_acl });
        } else if !is_symlink {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(ImageError::write_tree(&path))?;
        }
        for (k, v) in &xattrs {
            self.set_xattr(&path, k, v)?;
        }
        if !is_dir {
            let t = FileTime::from_unix_time(mtime, mtime_ns);
            filetime::set_symlink_file_times(&path, t, t).map_err(ImageError::write_tree(&path))?;
        }
        self.report.entries += 1;
        Ok(())
    }

    /// Resolves a user or group name of a text ACL: in the image being unpacked (its
    /// etc/passwd, etc/group, when already there as regular files), else on this host.
    fn lookup(&self, db: acl::Db, name: &str) -> Option<u32> {
        let file = match db {
            acl::Db::User => "etc/passwd",
            acl::Db::Group => "etc/group",
        };
        let in_image = self.root.join(file);
        let image_db =
            fs::symlink_metadata(&in_image).ok().filter(|m| m.is_file()).and_then(|_| fs::read(&in_image).ok());
        if let Some(id) = image_db.and_then(|c| acl::lookup_in(&c, name)) {
            return Some(id);
        }
        fs::read(Path::new("/").join(file)).ok().and_then(|c| acl::lookup_in(&c, name))
    }

    /// Remembers the mtime of an existing parent directory about to change, so a diff that does
    /// not carry the directory itself leaves its mtime as it was.
    fn touch_parent(&mut self, comps: &[&[u8]]) {
        let parent = join(self.root, &comps[..comps.len() - 1]);
        if self.touched.contains_key(&parent) {
            return;
        }
        if let Ok(m) = fs::symlink_metadata(&parent) {
            self.touched.insert(parent, FileTime::from_last_modification_time(&m));
        }
    }

    fn set_xattr(&mut self, path: &Path, k: &[u8], v: &[u8]) -> Result<(), ImageError> {
        match xattr::set(path, std::ffi::OsStr::from_bytes(k), v) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.report.xattrs_unsupported += 1;
                warn!(path = %path.display(), xattr = %escape(k), "file system does not support this xattr; skipped");
                Ok(())
            }
            Err(e) => Err(ImageError::WriteTree { path: path.to_path_buf(), source: e }),
        }
    }

    /// Creates missing parents of an entry and refuses symlinked or non-directory parents.
    fn ensure_parents(&mut self, comps: &[&[u8]], name: &[u8]) -> Result<(), ImageError> {
        self.walk_parents(comps, name, true).map(|_| ())
    }

    /// Like `ensure_parents` but creates nothing (hard-link targets and deletions): `false` when
    /// a parent is missing.
    fn check_parents(&mut self, comps: &[&[u8]], name: &[u8]) -> Result<bool, ImageError> {
        self.walk_parents(comps, name, false)
    }

    /// Walks the parents of an entry from the root down, refusing a symlink or non-directory on
    /// the way (an archive must never write through a link it planted). Missing parents are
    /// created when `create`, else the walk answers `false`. Verified directories are remembered.
    fn walk_parents(&mut self, comps: &[&[u8]], name: &[u8], create: bool) -> Result<bool, ImageError> {
        for i in 1..comps.len() {
            let p = join(self.root, &comps[..i]);
            if self.verified.contains(&p) {
                continue;
            }
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refused(name, Refusal::ThroughSymlink(escape(&comps[..i].join(&b'/')))));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refused(name, Refusal::ParentNotDirectory(escape(&comps[..i].join(&b'/'))))),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&p).map_err(ImageError::write_tree(&p))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(ImageError::WriteTree { path: p, source: e }),
            }
            self.verified.insert(p);
        }
        Ok(true)
    }

    fn deletions<R: Read>(&mut self, tar: &mut TarReader<R>, size: u64, name: &[u8]) -> Result<(), ImageError> {
        if size > MAX_DELETIONS {
            return Err(ImageError::ReadArchive {
                what: escape(name),
                source: io::Error::new(io::ErrorKind::InvalidData, "deletion list too large"),
            });
        }
        let mut list = vec![0u8; size as usize];
        let mut got = 0;
        while got < list.len() {
            got += tar.read_data(&mut list[got..]).map_err(read_err(escape(name)))?;
        }
        for d in list.split(|b| *b == 0).filter(|d| !d.is_empty()) {
            let comps = components(d).map_err(|why| refused(d, why))?;
            if comps.is_empty() {
                return Err(refused(d, Refusal::BadName));
            }
            if !self.check_parents(&comps, d)? {
                continue;
            }
            let p = join(self.root, &comps);
            self.touch_parent(&comps);
            let r = match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
                Ok(_) => fs::remove_file(&p),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => Err(e),
            };
            r.map_err(ImageError::write_tree(&p))?;
            debug!(path = %escape(d), "deleted");
            self.verified.clear();
            self.report.deleted += 1;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        // Directories changed but not listed in the archive keep their mtime (listed ones get
        // theirs from the archive just below).
        for (dir, t) in self.touched.drain() {
            match filetime::set_symlink_file_times(&dir, t, t) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::WriteTree { path: dir, source: e }),
            }
        }
        for d in self.deferred.drain(..).rev() {
            fs::set_permissions(&d.path, fs::Permissions::from_mode(d.mode))
                .map_err(ImageError::write_tree(&d.path))?;
            if let Some(acl) = &d.default_acl {
                match xattr::set(&d.path, "system.posix_acl_default", acl) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.report.xattrs_unsupported += 1,
                    Err(e) => return Err(ImageError::WriteTree { path: d.path.clone(), source: e }),
                }
            }
            let t = FileTime::from_unix_time(d.mtime, d.mtime_ns);
            filetime::set_symlink_file_times(&d.path, t, t).map_err(ImageError::write_tree(&d.path))?;
        }
        Ok(())
    }
}

/// Copies an entry's stored data into `f`: contiguous, or for a sparse entry each extent at
/// its offset (the gaps stay holes). Returns the logical size.
#[allow(clippy::too_many_arguments)]
fn copy_data<R: Read>(
    tar: &mut TarReader<R>,
    f: &mut File,
    path: &Path,
    name: &[u8],
    stored: u64,
    sparse: Option<&(u64, Vec<(u64, u64)>)>,
    buf: &mut [u8],
    progress: &mut Progress,
) -> Result<u64, ImageError> {
    let whole = [(0, stored)];
    let (real, extents) = match sparse {
        Some((real, e)) => (*real, &e[..]),
        None => (stored, &whole[..]),
    };
    for &(off, len) in extents {
        if sparse.is_some() {
            f.seek(SeekFrom::Start(off)).map_err(ImageError::write_tree(path))?;
        }
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = tar.read_data(&mut buf[..want]).map_err(read_err(escape(name)))?;
            if n == 0 {
                return Err(ImageError::ReadArchive {
                    what: escape(name),
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "archive ends inside this entry"),
                });
            }
            f.write_all(&buf[..n]).map_err(ImageError::write_tree(path))?;
            left -= n as u64;
            progress.add(n as u64);
        }
    }
    if sparse.is_some() {
        f.set_len(real).map_err(ImageError::write_tree(path))?;
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_reader_reassembles_chunks_and_passes_errors() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(Ok(b"hel".to_vec())).unwrap();
        tx.send(Ok(Vec::new())).unwrap();
        tx.send(Ok(b"lo".to_vec())).unwrap();
        drop(tx);
        let mut out = Vec::new();
        ChannelReader { rx, chunk: Vec::new(), pos: 0 }.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        tx.send(Err(io::Error::other("corrupt"))).unwrap();
        let mut r = ChannelReader { rx, chunk: Vec::new(), pos: 0 };
        assert!(r.read(&mut [0u8; 4]).is_err());
    }
}
