//! The manifest of an archive: one line per entry (path, type, size, mode, owner, mtime, content
//! digest, link target, device numbers, xattrs) in archive order, after a header line naming the
//! packing parameters. Used for change detection (is the tree still what was packed?), for diffs
//! (what changed since the base?) and for verification on the node (is what we unpacked what was
//! packed?). JSON Lines; paths and xattr names use the reversible escaping of [`super::path`], so
//! names that are not UTF-8 survive.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::ImageError;
use super::path::{escape, unescape};
use super::scan::{Kind, Node};

/// Format version written in the header line.
pub const VERSION: u32 = 1;

/// The header line: what the archive is and how it was packed (a change here forces a repack).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`VERSION`].
    pub si_appliance_manifest: u32,
    /// `full` or `diff`.
    pub kind: String,
    /// zstd level, `None` for an uncompressed tar.
    pub zstd_level: Option<i32>,
    /// For a diff: SHA-256 of the base archive's manifest it applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_manifest_sha256: Option<String>,
    /// For a diff: escaped paths deleted since the base.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deletions: Vec<String>,
}

/// One entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Escaped path relative to the root; `.` for the root.
    pub path: String,
    /// `dir`, `file`, `symlink`, `hardlink`, `char`, `block` or `fifo`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Logical size of a file (0 otherwise).
    pub size: u64,
    /// Permission bits, octal text.
    pub mode: String,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mtime_ns: u32,
    /// SHA-256 of a file's content (hex); for a hard link, of the content it shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Escaped symlink target, or for a hard link the path of the first name of the inode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device numbers `[major, minor]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<[u32; 2]>,
    /// Escaped xattr name -> hex value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

/// A whole manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Header line.
    pub header: Header,
    /// Entries in archive order.
    pub entries: Vec<Entry>,
}

impl Entry {
    /// The manifest entry of a scanned node; `sha256` is the content digest of a file (or of the
    /// file a hard link names).
    pub fn of(node: &Node, sha256: Option<[u8; 32]>) -> Entry {
        let (kind, size, target, rdev) = match &node.kind {
            Kind::Dir => ("dir", 0, None, None),
            Kind::File { size, .. } => ("file", *size, None, None),
            Kind::Symlink(t) => ("symlink", 0, Some(escape(t)), None),
            Kind::HardLink(t) => ("hardlink", 0, Some(escape(t)), None),
            Kind::Char(a, b) => ("char", 0, None, Some([*a, *b])),
            Kind::Block(a, b) => ("block", 0, None, Some([*a, *b])),
            Kind::Fifo => ("fifo", 0, None, None),
        };
        Entry {
            path: if node.rel.is_empty() { ".".to_owned() } else { escape(&node.rel) },
            kind: kind.to_owned(),
            size,
            mode: format!("{:04o}", node.mode),
            uid: node.uid,
            gid: node.gid,
            mtime: node.mtime,
            mtime_ns: node.mtime_ns,
            sha256: sha256.map(hex::encode),
            target,
            rdev,
            xattrs: node.xattrs.iter().map(|(k, v)| (escape(k), hex::encode(v))).collect(),
        }
    }
}

impl Manifest {
    /// Serialises to JSON Lines.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Serialising plain structs of strings and integers cannot fail.
        out.extend(serde_json::to_vec(&self.header).unwrap_or_default());
        out.push(b'\n');
        for e in &self.entries {
            out.extend(serde_json::to_vec(e).unwrap_or_default());
            out.push(b'\n');
        }
        out
    }

    /// Parses JSON Lines; `origin` names the source in errors.
    ///
    /// # Errors
    /// [`ImageError::Manifest`] with the line number.
    pub fn parse(bytes: &[u8], origin: &Path) -> Result<Manifest, ImageError> {
        let bad = |line: usize, why: String| ImageError::Manifest {
            path: origin.to_path_buf(),
            why: format!("line {line}: {why}"),
        };
        let mut lines = bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        let header: Header = serde_json::from_slice(lines.next().ok_or_else(|| bad(1, "empty".into()))?)
            .map_err(|e| bad(1, e.to_string()))?;
        if header.si_appliance_manifest != VERSION {
            return Err(bad(1, format!("unsupported version {}", header.si_appliance_manifest)));
        }
        let mut entries = Vec::new();
        for (i, l) in lines.enumerate() {
            let e: Entry = serde_json::from_slice(l).map_err(|e| bad(i + 2, e.to_string()))?;
            if unescape(&e.path).is_none() {
                return Err(bad(i + 2, format!("bad path escape {:?}", e.path)));
            }
            entries.push(e);
        }
        Ok(Manifest { header, entries })
    }

    /// Reads a manifest file.
    ///
    /// # Errors
    /// [`ImageError::Manifest`] when unreadable or malformed.
    pub fn load(path: &Path) -> Result<Manifest, ImageError> {
        let bytes =
            fs::read(path).map_err(|e| ImageError::Manifest { path: path.to_path_buf(), why: e.to_string() })?;
        Manifest::parse(&bytes, path)
    }

    /// SHA-256 of the serialised manifest (hex): identifies a packed tree.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.to_bytes()))
    }

    /// Total logical bytes of the files.
    pub fn file_bytes(&self) -> u64 {
        self.entries.iter().filter(|e| e.kind == "file").map(|e| e.size).sum()
    }

    /// Differences between `self` (expected) and `actual`, described one per line; empty when the
    /// entries are equal (headers are not compared).
    pub fn differences(&self, actual: &Manifest) -> Vec<String> {
        let want: HashMap<&str, &Entry> = self.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let have: HashMap<&str, &Entry> = actual.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let mut out = Vec::new();
        for e in &self.entries {
            match have.get(e.path.as_str()) {
                None => out.push(format!("{}: missing", e.path)),
                Some(a) if *a != e => out.push(format!("{}: expected {}, found {}", e.path, brief(e), brief(a))),
                Some(_) => {}
            }
        }
        for a in &actual.entries {
            if !want.contains_key(a.path.as_str()) {
                out.push(format!("{}: unexpected", a.path));
            }
        }
        out
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn brief(e: &Entry) -> String {
    serde_json::to_string(e).unwrap_or_default()
}

/// What changed between a base manifest and the current tree's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Escaped paths of entries added or changed (to be written into the diff), in tree order.
    pub changed: Vec<String>,
    /// Escaped paths present in the base and gone now, deepest first.
    pub deleted: Vec<String>,
}

/// Compares `base` with `current`. A hard link counts as changed when the name it points to
/// changed, so a node that rewrites that file also relinks every other name of it.
pub fn changes(base: &Manifest, current: &Manifest) -> Changes {
    let old: HashMap<&str, &Entry> = base.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let mut changed_set: HashSet<&str> = HashSet::new();
    let mut changed = Vec::new();
    for e in &current.entries {
        let mut is_changed = old.get(e.path.as_str()) != Some(&e);
        if !is_changed && e.kind == "hardlink" {
            if let Some(t) = &e.target {
                is_changed = changed_set.contains(t.as_str());
            }
        }
        if is_changed {
            changed_set.insert(e.path.as_str());
            changed.push(e.path.clone());
        }
    }
    let now: HashSet<&str> = current.entries.iter().map(|e| e.path.as_str()).collect();
    let mut deleted: Vec<String> =
        base.entries.iter().filter(|e| !now.contains(e.path.as_str())).map(|e| e.path.clone()).collect();
    deleted.reverse();
    Changes { changed, deleted }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::scan::StatKey;

    fn node(rel: &[u8], kind: Kind) -> Node {
        Node {
            rel: rel.to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            mtime_ns: 5,
            xattrs: vec![(b"user.k".to_vec(), b"\xff".to_vec())],
            stat_key: StatKey { dev: 0, ino: 0, ctime: 0, ctime_ns: 0, mtime_ns: 0, size: 0 },
        }
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        let header = Header {
            si_appliance_manifest: VERSION,
            kind: "full".into(),
            zstd_level: Some(3),
            base_manifest_sha256: None,
            deletions: vec![],
        };
        Manifest { header, entries }
    }

    #[test]
    fn round_trip_and_garbage() {
        let m = manifest(vec![
            Entry::of(&node(b"", Kind::Dir), None),
            Entry::of(&node(b"a\xffb", Kind::File { size: 3, extents: None }), Some([7; 32])),
            Entry::of(&node(b"l", Kind::HardLink(b"a\xffb".to_vec())), Some([7; 32])),
        ]);
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse(&bytes, Path::new("m")).unwrap(), m);
        for bad in [&b""[..], b"{}", b"not json", &bytes[..bytes.len() / 2]] {
            assert!(Manifest::parse(bad, Path::new("m")).is_err());
        }
    }

    #[test]
    fn changes_propagate_to_hard_links() {
        let f = |sha: u8| Entry::of(&node(b"a", Kind::File { size: 1, extents: None }), Some([sha; 32]));
        let l = Entry::of(&node(b"b", Kind::HardLink(b"a".to_vec())), None);
        let gone = Entry::of(&node(b"c", Kind::Fifo), None);
        let base = manifest(vec![f(1), l.clone(), gone]);
        let cur = manifest(vec![f(2), l]);
        let c = changes(&base, &cur);
        assert_eq!(c.changed, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(c.deleted, vec!["c".to_string()]);
        assert_eq!(changes(&cur, &cur), Changes::default());
    }
}
