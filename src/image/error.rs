//! The image store's error type: one variant per operation, each carrying the object it failed on
//! (a path in the tree, an archive entry, an image name). Callers print chains with `{:#}`.

use std::io;
use std::path::PathBuf;

use crate::types::ImageName;

/// Why an archive entry was refused by the safe unpacker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The entry's path is absolute (`/etc/passwd`).
    AbsolutePath,
    /// The entry's path contains a `..` component.
    DotDot,
    /// A parent directory of the entry is a symbolic link (writing through it could escape).
    ThroughSymlink(String),
    /// A parent of the entry exists and is not a directory.
    ParentNotDirectory(String),
    /// A hard link whose target is absolute or climbs out with `..`.
    HardLinkOutside(String),
    /// A hard link whose target does not exist (yet) inside the root.
    HardLinkMissing(String),
    /// A tar entry type we do not restore (GNU volume labels, multi-volume continuations, ...).
    UnsupportedType(u8),
    /// The diff deletion list appears somewhere other than first in the archive.
    MisplacedDeletions,
    /// A name with a NUL byte or an empty name where one is needed.
    BadName,
    /// A uid or gid that does not fit 32 bits.
    OwnerOutOfRange,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::AbsolutePath => f.write_str("absolute path"),
            Refusal::DotDot => f.write_str("path contains '..'"),
            Refusal::ThroughSymlink(p) => write!(f, "parent {p} is a symbolic link"),
            Refusal::ParentNotDirectory(p) => write!(f, "parent {p} is not a directory"),
            Refusal::HardLinkOutside(t) => write!(f, "hard link target {t} lies outside the root"),
            Refusal::HardLinkMissing(t) => write!(f, "hard link target {t} does not exist"),
            Refusal::UnsupportedType(t) => write!(f, "unsupported tar entry type {:?}", *t as char),
            Refusal::MisplacedDeletions => f.write_str("diff deletion list is not the first entry"),
            Refusal::BadName => f.write_str("empty or invalid name"),
            Refusal::OwnerOutOfRange => f.write_str("uid or gid out of range"),
        }
    }
}

/// Errors of the image store, packing, unpacking, diffs and torrents.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading a file, directory or attribute of the tree being packed or scanned.
    #[error("reading {path}")]
    ReadTree {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file changed size while it was being packed.
    #[error("{path} changed while it was being packed (expected {expected} bytes)")]
    ChangedDuringPack {
        /// The file.
        path: PathBuf,
        /// The size seen when the tree was scanned.
        expected: u64,
    },
    /// Writing the archive (or its temporary file) failed.
    #[error("writing archive {path}")]
    WriteArchive {
        /// The archive (or `-` for a stream).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the archive stream failed: truncated data, a corrupt zstd frame or a bad tar header.
    #[error("reading archive {what}")]
    ReadArchive {
        /// Which archive or which entry.
        what: String,
        /// The cause (zstd and tar report corruption as I/O errors).
        #[source]
        source: io::Error,
    },
    /// A hostile or unsupported archive entry was refused; nothing was written for it.
    #[error("refusing archive entry {entry}: {why}")]
    Refused {
        /// The entry's path as stored in the archive (escaped).
        entry: String,
        /// Why.
        why: Refusal,
    },
    /// Creating or changing a file under the unpack target failed.
    #[error("writing {path}")]
    WriteTree {
        /// The file under the target root.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A manifest file could not be read or parsed.
    #[error("manifest {path}: {why}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong (line number and cause).
        why: String,
    },
    /// The unpacked tree does not match the manifest.
    #[error("{root}: {count} difference(s) from the manifest, first: {first}")]
    VerifyMismatch {
        /// The unpacked root.
        root: PathBuf,
        /// How many entries differ.
        count: usize,
        /// The first difference, described.
        first: String,
    },
    /// The named image has no tree in the store.
    #[error("no image {name} in store {store}")]
    NoSuchImage {
        /// The image.
        name: ImageName,
        /// The store root.
        store: PathBuf,
    },
    /// The named image already exists (import/capture refuse to merge into a different image).
    #[error("image {name} already exists in store {store}")]
    ImageExists {
        /// The image.
        name: ImageName,
        /// The store root.
        store: PathBuf,
    },
    /// `image diff` needs a packed base archive first.
    #[error("image {name} has no packed base archive; run `image pack {name}` first")]
    NoBase {
        /// The image.
        name: ImageName,
    },
    /// A store directory or file operation failed.
    #[error("store: {op} {path}")]
    Store {
        /// What was being done (`creating`, `removing`, `renaming`, ...).
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An external command (rsync) could not be started or failed.
    #[error("{command} {status}")]
    Command {
        /// The command line, for the log.
        command: String,
        /// Its exit status or the start error.
        status: String,
    },
    /// An import source is neither a directory nor a readable (compressed) tarball.
    #[error("import source {path} is not a directory or a tar(.zst) file")]
    BadImportSource {
        /// The source.
        path: PathBuf,
    },
    /// The announce URL for a .torrent is not `http://host:port/announce`.
    #[error("bad announce URL {url:?}: want http://<server>:<port>/announce")]
    BadAnnounce {
        /// The URL given.
        url: String,
    },
}

impl ImageError {
    pub(crate) fn read_tree(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::ReadTree { path, source }
    }
    pub(crate) fn write_tree(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::WriteTree { path, source }
    }
    pub(crate) fn store(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Store { op, path, source }
    }
}
