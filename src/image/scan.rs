//! Walks an image tree into a sorted list of [`Node`]s: the one place that reads a tree's
//! metadata (lstat, xattrs, sparse extents, hard-link groups). The order is depth-first with the
//! children of each directory sorted by name bytes, so the same tree always gives the same list:
//! the basis of deterministic packing. Never follows symbolic links; by default does not descend
//! into other file systems (a golden client's /proc mounted in the tree must not be packed).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::error::ImageError;

/// What a node is, with what the archive needs to recreate it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file; `extents` lists the (offset, length) data ranges of a sparse file.
    File {
        /// Logical size.
        size: u64,
        /// Data extents when the file has holes.
        extents: Option<Vec<(u64, u64)>>,
    },
    /// A symbolic link and its target (bytes, never followed).
    Symlink(Vec<u8>),
    /// A further name of an inode already listed; holds that earlier node's relative path.
    HardLink(Vec<u8>),
    /// A character device (major, minor).
    Char(u32, u32),
    /// A block device (major, minor).
    Block(u32, u32),
    /// A named pipe.
    Fifo,
}

/// One entry of a tree: path relative to the root (empty for the root), kind and metadata.
#[derive(Clone, Debug)]
pub struct Node {
    /// Path relative to the root, `/`-separated bytes; empty for the root itself.
    pub rel: Vec<u8>,
    /// Kind.
    pub kind: Kind,
    /// Permission bits including set-uid, set-gid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, whole seconds.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_ns: u32,
    /// Extended attributes (including ACLs and capabilities), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Change-detection key: device, inode, ctime (s, ns), mtime ns, size.
    pub stat_key: StatKey,
}

/// Extended attributes as (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What must be unchanged for a file's content digest to be reused without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct StatKey {
    /// st_dev.
    pub dev: u64,
    /// st_ino.
    pub ino: u64,
    /// st_ctime seconds.
    pub ctime: i64,
    /// st_ctime nanoseconds.
    pub ctime_ns: i64,
    /// st_mtime nanoseconds part.
    pub mtime_ns: i64,
    /// st_size.
    pub size: u64,
}

impl StatKey {
    /// Whether both keys describe the same, unchanged file. The device number is left out: a
    /// tree never spans file systems (see [`ScanOptions`]), and the number of the one it is on
    /// changes when that file system is mounted from another device — the stick's data
    /// partition packed on a workstation (a loop device) and served from the stick (/dev/sdX)
    /// would otherwise be read and hashed whole again. Inode, ctime to the nanosecond, mtime
    /// nanoseconds and size all equal by chance on a different file system is not a case.
    pub fn same_file(&self, other: &StatKey) -> bool {
        (self.ino, self.ctime, self.ctime_ns, self.mtime_ns, self.size) == (other.ino, other.ctime, other.ctime_ns, other.mtime_ns, other.size)
    }
}

impl Node {
    /// Absolute path of this node under `root`.
    pub fn path_under(&self, root: &Path) -> PathBuf {
        if self.rel.is_empty() { root.to_path_buf() } else { root.join(std::ffi::OsStr::from_bytes(&self.rel)) }
    }
}

/// Options of [`scan`].
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Descend into directories on other file systems (off by default).
    pub cross_file_systems: bool,
}

/// Scans the tree at `root` (which must be a directory).
///
/// # Errors
/// [`ImageError::ReadTree`] naming the path whose metadata, directory listing or xattrs could not
/// be read.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<Vec<Node>, ImageError> {
    let meta = fs::symlink_metadata(root).map_err(ImageError::read_tree(root))?;
    if !meta.is_dir() {
        return Err(ImageError::ReadTree {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut out = Vec::new();
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let root_dev = meta.dev();
    walk(root, Vec::new(), meta, root_dev, opts, &mut links, &mut out)?;
    Ok(out)
}

fn walk(
    path: &Path,
    rel: Vec<u8>,
    meta: Metadata,
    root_dev: u64,
    opts: &ScanOptions,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    out: &mut Vec<Node>,
) -> Result<(), ImageError> {
    let node = node_of(path, rel.clone(), &meta, links)?;
    let is_dir = node.kind == Kind::Dir;
    out.push(node);
    if !is_dir {
        return Ok(());
    }
    if meta.dev() != root_dev && !opts.cross_file_systems {
        debug!(path = %path.display(), "not descending into another file system");
        return Ok(());
    }
    let mut names: Vec<OsString> = fs::read_dir(path)
        .map_err(ImageError::read_tree(path))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(ImageError::read_tree(path))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let child = path.join(&name);
        let cmeta = fs::symlink_metadata(&child).map_err(ImageError::read_tree(&child))?;
        if cmeta.file_type().is_socket() {
            warn!(path = %child.display(), "skipping socket (tar cannot hold sockets)");
            continue;
        }
        let mut crel = rel.clone();
        if !crel.is_empty() {
            crel.push(b'/');
        }
        crel.extend_from_slice(&name.into_vec());
        walk(&child, crel, cmeta, root_dev, opts, links, out)?;
    }
    Ok(())
}

fn node_of(
    path: &Path,
    rel: Vec<u8>,
    meta: &Metadata,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
) -> Result<Node, ImageError> {
    let ft = meta.file_type();
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let mut kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink(fs::read_link(path).map_err(ImageError::read_tree(path))?.into_os_string().into_vec())
    } else if ft.is_char_device() {
        Kind::Char(major, minor)
    } else if ft.is_block_device() {
        Kind::Block(major, minor)
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        let size = meta.size();
        let extents = if meta.blocks().saturating_mul(512) < size { data_extents(path, size)? } else { None };
        // A "sparse" file whose data covers it all (compressed file systems) is packed dense.
        let extents = extents.filter(|e| e[..] != [(0, size)]);
        Kind::File { size, extents }
    };
    if !ft.is_dir() && meta.nlink() > 1 {
        match links.get(&(meta.dev(), meta.ino())) {
            Some(first) => kind = Kind::HardLink(first.clone()),
            None => {
                links.insert((meta.dev(), meta.ino()), rel.clone());
            }
        }
    }
    let xattrs = read_xattrs(path)?;
    Ok(Node {
        rel,
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        mtime_ns: meta.mtime_nsec() as u32,
        xattrs,
        stat_key: StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_ns: meta.ctime_nsec(),
            mtime_ns: meta.mtime_nsec(),
            size: meta.size(),
        },
    })
}

/// Reads all extended attributes of `path` without following a symlink, sorted by name.
///
/// # Errors
/// [`ImageError::ReadTree`]; a file system without xattr support yields an empty list.
pub fn read_xattrs(path: &Path) -> Result<Xattrs, ImageError> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::ReadTree { path: path.to_path_buf(), source: e }),
    };
    let mut out = Vec::new();
    for name in names {
        // An attribute removed between list and get is simply gone.
        if let Some(v) = xattr::get(path, &name).map_err(ImageError::read_tree(path))? {
            out.push((name.into_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

/// The data extents of a file with holes, by SEEK_DATA/SEEK_HOLE. `None` when the file system
/// cannot tell (then the file is packed dense).
fn data_extents(path: &Path, size: u64) -> Result<Option<Vec<(u64, u64)>>, ImageError> {
    let f = File::open(path).map_err(ImageError::read_tree(path))?;
    let fd = f.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    let end = i64::try_from(size).unwrap_or(i64::MAX);
    while pos < end {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole remains
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => return Ok(None),
                _ => return Err(ImageError::ReadTree { path: path.to_path_buf(), source: e }),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(ImageError::ReadTree { path: path.to_path_buf(), source: std::io::Error::last_os_error() });
        }
        let hole = hole.min(end);
        if hole > data {
            // Cast: both are non-negative offsets returned by lseek.
            extents.push((data as u64, (hole - data) as u64));
        }
        pos = hole;
    }
    Ok(Some(extents))
}

#[cfg(test)]
mod tests {
    use super::StatKey;

    #[test]
    fn a_file_is_the_same_on_another_device_number_but_not_after_a_change() {
        let k = StatKey { dev: 2049, ino: 12, ctime: 1_700_000_000, ctime_ns: 5, mtime_ns: 7, size: 100 };
        assert!(k.same_file(&StatKey { dev: 1793, ..k }));
        assert!(!k.same_file(&StatKey { ctime_ns: 6, ..k }));
        assert!(!k.same_file(&StatKey { ino: 13, ..k }));
        assert!(!k.same_file(&StatKey { size: 101, ..k }));
        assert!(!k.same_file(&StatKey { mtime_ns: 8, ..k }));
    }
}
