//! The store's directory layout and the operations behind `si-appliance image …`.
//!
//! ```text
//! <store>/images/NAME/                 image tree (chroot-able root of a golden client)
//! <store>/overrides/NAME/              override tree (per-group overlay applied after the image)
//! <store>/excludes/NAME                rsync exclude patterns for `image capture` (optional)
//! <store>/archives/NAME.tar.zst        packed image (.tar when compression is off)
//! <store>/archives/NAME.manifest       its manifest (JSON Lines)
//! <store>/archives/NAME.torrent        its .torrent
//! <store>/archives/NAME.statcache      change-detection cache (stat keys -> digests)
//! <store>/archives/NAME.diff.tar.zst   changes since NAME.tar.zst (+ .manifest, .torrent)
//! <store>/archives/overrides/NAME.*    the same for override trees
//! ```
//! Every archive, manifest and torrent is written under a temporary name and renamed into
//! place, so the previous one stays usable until the new one is complete.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::error::ImageError;
use super::manifest::{self, Manifest};
use super::pack::{self, AtomicFile, DigestCache, PackOptions};
use super::path::{escape, unescape};
use super::scan::{self, ScanOptions, StatKey};
use super::torrent;
use super::unpack::{self, UnpackOptions, UnpackReport};
use crate::types::ImageName;

/// Which kind of tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeKind {
    /// `images/NAME`.
    Image,
    /// `overrides/NAME`.
    Override,
}

/// The image store rooted at a directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// One line of `image list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TreeInfo {
    /// Name.
    pub name: String,
    /// `image` or `override`.
    pub kind: &'static str,
    /// Archive size when packed.
    pub archive_bytes: Option<u64>,
    /// Entries in the manifest when packed.
    pub entries: Option<usize>,
    /// File bytes in the manifest when packed.
    pub file_bytes: Option<u64>,
    /// Info-hash of the .torrent when there is one.
    pub info_hash: Option<String>,
    /// Whether a diff archive exists.
    pub diff: bool,
}

/// Result of [`Store::pack`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackOutcome {
    /// The tree matches the existing archive's manifest; nothing was written.
    Unchanged {
        /// The archive.
        archive: PathBuf,
    },
    /// A new archive was written.
    Packed {
        /// The archive.
        archive: PathBuf,
        /// Its size.
        bytes: u64,
        /// Manifest entries.
        entries: usize,
    },
}

/// Result of [`Store::diff`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffOutcome {
    /// The diff archive.
    pub archive: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Entries added or changed.
    pub changed: usize,
    /// Paths deleted.
    pub deleted: usize,
}

/// What a diff archive carries: the scanned entries that changed since the base (by their raw
/// relative paths, as the packer selects them) and the deleted paths (raw).
fn diff_parts(current: &Manifest, nodes: &[scan::Node], ch: &manifest::Changes) -> (HashSet<Vec<u8>>, Vec<Vec<u8>>) {
    let changed: HashSet<&str> = ch.changed.iter().map(String::as_str).collect();
    let only = current.entries.iter().zip(nodes).filter(|(e, _)| changed.contains(e.path.as_str())).map(|(_, n)| n.rel.clone()).collect();
    let deletions = ch.deleted.iter().filter_map(|p| unescape(p)).collect();
    (only, deletions)
}

/// Above this share of the image's file bytes, an update archive is the whole tree rather than
/// a diff (a node far behind fetches about as much either way, and the full one serves all).
pub const FULL_RATHER_THAN_DIFF: f64 = 0.8;

/// An archive made by [`Store::update_archive`].
#[derive(Clone, Debug)]
pub struct UpdateArchive {
    /// The archive (`.tar.zst`).
    pub archive: PathBuf,
    /// Its manifest (a diff's names the base and the deletions).
    pub manifest_path: PathBuf,
    /// That manifest.
    pub manifest: Manifest,
    /// The version it brings a node to (SHA-256 of the tree's full manifest).
    pub target: String,
    /// A diff (else the whole tree).
    pub diff: bool,
    /// Its size.
    pub bytes: u64,
}

/// Where `image capture` pulls a root from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureSource {
    /// `root@HOST:/` over ssh.
    Ssh {
        /// Host name or address.
        host: String,
        /// ssh port.
        port: Option<u16>,
    },
    /// A local directory (rsync local mode; tests and chroots).
    Local(PathBuf),
}

impl CaptureSource {
    /// Parses `--from`: an absolute path is local, anything else a host (`host` or `host:port`).
    pub fn parse(s: &str) -> CaptureSource {
        if s.starts_with('/') {
            return CaptureSource::Local(PathBuf::from(s));
        }
        match s.rsplit_once(':').and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h, p))) {
            Some((h, p)) => CaptureSource::Ssh { host: h.to_owned(), port: Some(p) },
            None => CaptureSource::Ssh { host: s.to_owned(), port: None },
        }
    }
}

/// Directories whose contents a capture never copies (the directories themselves are kept as
/// mount points).
pub const CAPTURE_EXCLUDES: [&str; 5] = ["/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*"];

/// File systems a golden node's system lives on: mounts of these are captured (`/boot`,
/// `/boot/efi`, a separate `/var` …). Every other mount (network file systems, tmpfs, proc,
/// cgroup, fuse, overlay, squashfs, ISO images …) is a mount of another file system: its mount
/// point is kept, its contents are not captured.
pub const CAPTURE_DISK_FS: [&str; 11] = ["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "f2fs", "jfs", "reiserfs", "zfs", "exfat"];

/// rsync exclude patterns (`/MOUNT/*`, relative to the captured root `root`) for the mounts in
/// `mounts` (the text of `/proc/self/mounts`) that lie strictly below `root` and are not of a
/// [`CAPTURE_DISK_FS`] type. Mount points are unescaped (`\040` is a space) and then rsync's
/// wildcard characters escaped. Malformed lines are skipped.
pub fn mount_excludes(mounts: &str, root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_dev), Some(mp), Some(fstype)) = (f.next(), f.next(), f.next()) else { continue };
        if CAPTURE_DISK_FS.contains(&fstype) {
            continue;
        }
        let mp = PathBuf::from(unescape_mount(mp));
        let Ok(rel) = mp.strip_prefix(root) else { continue };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let rel = rel.to_string_lossy().replace('\\', "\\\\").replace('*', "\\*").replace('?', "\\?").replace('[', "\\[");
        let pat = format!("/{rel}/*");
        if !out.contains(&pat) {
            out.push(pat);
        }
    }
    out
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How `image capture` reaches a golden node over ssh.
#[derive(Clone, Debug, Default)]
pub struct SshOptions {
    /// `ssh -i`: the key to log in as root with (default: root's own keys and agent).
    pub identity: Option<PathBuf>,
    /// `UserKnownHostsFile`: the golden nodes' host keys, learnt on first contact
    /// (`StrictHostKeyChecking=accept-new`) and checked after that.
    pub known_hosts: Option<PathBuf>,
}

impl SshOptions {
    /// The ssh command line (program and options, no host).
    fn command(&self, port: Option<u16>) -> Vec<String> {
        let mut c = vec!["ssh".to_owned(), "-o".into(), "BatchMode=yes".into()];
        if let Some(p) = port {
            c.extend(["-p".into(), p.to_string()]);
        }
        if let Some(i) = &self.identity {
            c.extend(["-i".into(), i.display().to_string(), "-o".into(), "IdentitiesOnly=yes".into()]);
        }
        if let Some(k) = &self.known_hosts {
            c.extend(["-o".into(), format!("UserKnownHostsFile={}", k.display()), "-o".into(), "StrictHostKeyChecking=accept-new".into()]);
        }
        c
    }
}

/// The rsync arguments (without the program) that copy `src` into `dest`: archive mode with hard
/// links, ACLs, xattrs and sparse files, numeric ids, deleting what the source no longer has.
pub fn capture_args(src: &CaptureSource, dest: &Path, exclude_file: Option<&Path>) -> Vec<OsString> {
    capture_args_with(src, dest, exclude_file, &[], &SshOptions::default())
}

/// [`capture_args`] with extra exclude patterns (the mounts of other file systems) and ssh
/// options.
pub fn capture_args_with(src: &CaptureSource, dest: &Path, exclude_file: Option<&Path>, extra: &[String], ssh: &SshOptions) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["-aHAXS", "--numeric-ids", "--delete", "--delete-excluded", "--timeout=300"]
        .iter()
        .map(OsString::from)
        .collect();
    for e in CAPTURE_EXCLUDES {
        a.push(format!("--exclude={e}").into());
    }
    for e in extra {
        a.push(format!("--exclude={e}").into());
    }
    if let Some(f) = exclude_file {
        let mut o = OsString::from("--exclude-from=");
        o.push(f);
        a.push(o);
    }
    match src {
        CaptureSource::Ssh { host, port } => {
            a.push("-e".into());
            a.push(ssh.command(*port).join(" ").into());
            a.push(format!("root@{host}:/").into());
        }
        CaptureSource::Local(p) => {
            let mut s = p.clone().into_os_string();
            s.push("/");
            a.push(s);
        }
    }
    let mut d = dest.to_path_buf().into_os_string();
    d.push("/");
    a.push(d);
    a
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    path: String,
    key: StatKey,
    sha256: String,
}

impl Store {
    /// The store at `root` (created lazily).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of a tree.
    pub fn tree_dir(&self, kind: TreeKind, name: &ImageName) -> PathBuf {
        match kind {
            TreeKind::Image => self.root.join("images").join(name.as_str()),
            TreeKind::Override => self.root.join("overrides").join(name.as_str()),
        }
    }

    fn archives_dir(&self, kind: TreeKind) -> PathBuf {
        match kind {
            TreeKind::Image => self.root.join("archives"),
            TreeKind::Override => self.root.join("archives").join("overrides"),
        }
    }

    /// Path of an archive-related file: `archives/NAME<suffix>`.
    pub fn archive_file(&self, kind: TreeKind, name: &ImageName, suffix: &str) -> PathBuf {
        self.archives_dir(kind).join(format!("{name}{suffix}"))
    }

    /// The packed archive of a tree (`.tar.zst` or `.tar`), when one exists.
    pub fn archive(&self, kind: TreeKind, name: &ImageName) -> Option<PathBuf> {
        [".tar.zst", ".tar"].iter().map(|s| self.archive_file(kind, name, s)).find(|p| p.is_file())
    }

    /// Lists image and override trees with their packed state.
    ///
    /// # Errors
    /// [`ImageError::Store`] when a directory cannot be read.
    pub fn list(&self) -> Result<Vec<TreeInfo>, ImageError> {
        let mut out = Vec::new();
        for (kind, dir, label) in [(TreeKind::Image, "images", "image"), (TreeKind::Override, "overrides", "override")]
        {
            let d = self.root.join(dir);
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageError::Store { op: "listing", path: d, source: e }),
            };
            let mut names: Vec<ImageName> =
                rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).collect();
            names.sort();
            for n in names {
                out.push(self.info(kind, label, &n));
            }
        }
        Ok(out)
    }

    fn info(&self, kind: TreeKind, label: &'static str, name: &ImageName) -> TreeInfo {
        let archive = self.archive(kind, name);
        let manifest = Manifest::load(&self.archive_file(kind, name, ".manifest")).ok();
        TreeInfo {
            name: name.to_string(),
            kind: label,
            archive_bytes: archive.as_ref().and_then(|a| fs::metadata(a).ok()).map(|m| m.len()),
            entries: manifest.as_ref().map(|m| m.entries.len()),
            file_bytes: manifest.as_ref().map(|m| m.file_bytes()),
            info_hash: fs::read(self.archive_file(kind, name, ".torrent")).ok().and_then(|b| torrent::info_hash_of(&b)),
            diff: self.archive_file(kind, name, ".diff.manifest").is_file(),
        }
    }

    /// Describes one tree.
    ///
    /// # Errors
    /// [`ImageError::NoSuchImage`].
    pub fn show(&self, kind: TreeKind, name: &ImageName) -> Result<TreeInfo, ImageError> {
        if !self.tree_dir(kind, name).is_dir() && self.archive(kind, name).is_none() {
            return Err(ImageError::NoSuchImage { name: name.clone(), store: self.root.clone() });
        }
        Ok(self.info(kind, if kind == TreeKind::Image { "image" } else { "override" }, name))
    }

    fn load_cache(&self, kind: TreeKind, name: &ImageName) -> DigestCache {
        let mut cache = DigestCache::new();
        let Ok(bytes) = fs::read(self.archive_file(kind, name, ".statcache")) else { return cache };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // A damaged cache only costs re-reading files.
            let Ok(l) = serde_json::from_slice::<CacheLine>(line) else { return DigestCache::new() };
            let (Some(p), Ok(d)) = (unescape(&l.path), hex::decode(&l.sha256)) else { return DigestCache::new() };
            let Ok(d) = <[u8; 32]>::try_from(d) else { return DigestCache::new() };
            cache.insert(p, (l.key, d));
        }
        cache
    }

    fn save_cache(
        &self,
        kind: TreeKind,
        name: &ImageName,
        nodes: &[scan::Node],
        digests: &pack::Digests,
    ) -> Result<(), ImageError> {
        let mut out = Vec::new();
        for n in nodes {
            if let Some(d) = digests.get(&n.rel) {
                let l = CacheLine { path: escape(&n.rel), key: n.stat_key, sha256: hex::encode(d) };
                out.extend(serde_json::to_vec(&l).unwrap_or_default());
                out.push(b'\n');
            }
        }
        AtomicFile::write(&self.archive_file(kind, name, ".statcache"), &out)
    }

    fn mkdirs(&self, dir: &Path) -> Result<(), ImageError> {
        fs::create_dir_all(dir).map_err(ImageError::store("creating", dir))
    }

    /// Packs a tree unless it is unchanged since the last pack with the same options (`force`
    /// packs anyway). With `announce`, also writes the .torrent.
    ///
    /// # Errors
    /// [`ImageError::NoSuchImage`], scan, write and torrent errors.
    pub fn pack(
        &self,
        kind: TreeKind,
        name: &ImageName,
        opts: &PackOptions,
        announce: Option<&str>,
        force: bool,
    ) -> Result<PackOutcome, ImageError> {
        if let Some(a) = announce {
            torrent::check_announce(a)?;
        }
        let tree = self.tree_dir(kind, name);
        if !tree.is_dir() {
            return Err(ImageError::NoSuchImage { name: name.clone(), store: self.root.clone() });
        }
        self.mkdirs(&self.archives_dir(kind))?;
        let ext = if opts.zstd_level.is_some() { ".tar.zst" } else { ".tar" };
        let archive = self.archive_file(kind, name, ext);
        let manifest_path = self.archive_file(kind, name, ".manifest");
        let nodes = scan::scan(&tree, &ScanOptions::default())?;
        let header = pack::full_header(opts);
        if !force && archive.is_file() {
            if let Ok(old) = Manifest::load(&manifest_path) {
                if old.header == header {
                    let cache = self.load_cache(kind, name);
                    if let Some(d) = pack::digests_for(&tree, &nodes, &cache, false)? {
                        if pack::manifest_of(&nodes, &d, header.clone()) == old {
                            info!(image = %name, archive = %archive.display(), "unchanged; not repacked");
                            self.remember(kind, name, &old)?;
                            if let Some(a) = announce {
                                self.write_torrent(kind, name, &archive, ext, a)?;
                            }
                            return Ok(PackOutcome::Unchanged { archive });
                        }
                    }
                }
            }
        }
        info!(image = %name, archive = %archive.display(), entries = nodes.len(), "packing");
        let mut af = AtomicFile::create(&archive)?;
        let (digests, _) = pack::write_archive(&tree, &nodes, None, None, opts, &archive, af.file())?;
        af.commit()?;
        let m = pack::manifest_of(&nodes, &digests, header);
        AtomicFile::write(&manifest_path, &m.to_bytes())?;
        self.remember(kind, name, &m)?;
        self.save_cache(kind, name, &nodes, &digests)?;
        // The other compression's archive (if any) is stale now.
        let other = self.archive_file(kind, name, if ext == ".tar" { ".tar.zst" } else { ".tar" });
        let _ = fs::remove_file(other);
        if let Some(a) = announce {
            self.write_torrent(kind, name, &archive, ext, a)?;
        }
        let bytes = fs::metadata(&archive).map_err(ImageError::store("reading", &archive))?.len();
        Ok(PackOutcome::Packed { archive, bytes, entries: m.entries.len() })
    }

    fn write_torrent(
        &self,
        kind: TreeKind,
        name: &ImageName,
        archive: &Path,
        ext: &str,
        announce: &str,
    ) -> Result<(), ImageError> {
        let stem =
            archive.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| format!("{name}{ext}"));
        let t = torrent::make(archive, &stem, announce)?;
        let suffix = if stem.contains(".diff.") { ".diff.torrent" } else { ".torrent" };
        let path = self.archive_file(kind, name, suffix);
        if fs::read(&path).ok().as_deref() != Some(&t.bytes[..]) {
            AtomicFile::write(&path, &t.bytes)?;
        }
        info!(image = %name, info_hash = %t.info_hash, piece_length = t.piece_length, "torrent {}", path.display());
        Ok(())
    }

    /// Where the manifests of every version of a tree that was packed or updated to are kept
    /// (`archives/history/NAME/<sha256>.manifest`): the bases updates are made from.
    fn history_dir(&self, kind: TreeKind, name: &ImageName) -> PathBuf {
        self.archives_dir(kind).join("history").join(name.as_str())
    }

    /// Keeps a version's manifest in the history (once per digest).
    ///
    /// # Errors
    /// [`ImageError::Store`].
    pub fn remember(&self, kind: TreeKind, name: &ImageName, m: &Manifest) -> Result<PathBuf, ImageError> {
        let dir = self.history_dir(kind, name);
        self.mkdirs(&dir)?;
        let path = dir.join(format!("{}.manifest", m.digest()));
        if !path.is_file() {
            AtomicFile::write(&path, &m.to_bytes())?;
        }
        Ok(path)
    }

    /// A version's manifest from the history, by its SHA-256 (hex); `None` when that version was
    /// never packed here (or `digest` is not a digest).
    pub fn version(&self, kind: TreeKind, name: &ImageName, digest: &str) -> Option<Manifest> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
        let m = Manifest::load(&self.history_dir(kind, name).join(format!("{digest}.manifest"))).ok()?;
        (m.digest() == digest).then_some(m)
    }

    /// The manifest of the tree as it is now (packing options: the default ones, as the appliance
    /// packs), kept in the history; with what writing archives of it needs.
    fn current(&self, kind: TreeKind, name: &ImageName) -> Result<(Manifest, Vec<scan::Node>), ImageError> {
        let tree = self.tree_dir(kind, name);
        if !tree.is_dir() {
            return Err(ImageError::NoSuchImage { name: name.clone(), store: self.root.clone() });
        }
        let nodes = scan::scan(&tree, &ScanOptions::default())?;
        let cache = self.load_cache(kind, name);
        let digests = pack::digests_for(&tree, &nodes, &cache, true)?.unwrap_or_default();
        let m = pack::manifest_of(&nodes, &digests, pack::full_header(&PackOptions::default()));
        self.save_cache(kind, name, &nodes, &digests)?;
        self.remember(kind, name, &m)?;
        Ok((m, nodes))
    }

    /// The version of the tree as it is now (its manifest's SHA-256), kept in the history.
    ///
    /// # Errors
    /// [`ImageError::NoSuchImage`], scan errors.
    pub fn current_version(&self, kind: TreeKind, name: &ImageName) -> Result<String, ImageError> {
        Ok(self.current(kind, name)?.0.digest())
    }

    /// The archive that brings a node from `base` (a version's manifest; `None`: unknown) to
    /// the tree as it is now: the diff from `base` (changed and new entries plus deletions), or
    /// the whole tree when the base is unknown or the diff's files would be more than
    /// [`FULL_RATHER_THAN_DIFF`] of the image's bytes. Written once per (base, target) under
    /// `archives/updates/` (named `NAME.<base12>-<target12>.tar.zst`, or `NAME.<target12>.tar.zst`
    /// for a full one) with its manifest beside it; a later call finds it.
    ///
    /// # Errors
    /// [`ImageError::NoSuchImage`], scan and write errors.
    pub fn update_archive(&self, kind: TreeKind, name: &ImageName, base: Option<&Manifest>) -> Result<UpdateArchive, ImageError> {
        let (current, nodes) = self.current(kind, name)?;
        let target = current.digest();
        let opts = PackOptions::default();
        let ch = base.map(|b| manifest::changes(b, &current));
        let changed_bytes: u64 = match &ch {
            Some(ch) => {
                let set: HashSet<&str> = ch.changed.iter().map(String::as_str).collect();
                current.entries.iter().filter(|e| e.kind == "file" && set.contains(e.path.as_str())).map(|e| e.size).sum()
            }
            None => 0,
        };
        let diff = match (base, ch) {
            (Some(b), Some(ch)) if (changed_bytes as f64) <= FULL_RATHER_THAN_DIFF * current.file_bytes() as f64 => Some((b.digest(), ch)),
            _ => None,
        };
        let short = |d: &str| d[..12].to_owned();
        // The published name is an image name (≤ 64 bytes): the image's name is cut to fit.
        let stem: String = name.as_str().chars().take(64 - 26).collect();
        let file = match &diff {
            Some((b, _)) => format!("{stem}.{}-{}", short(b), short(&target)),
            None => format!("{stem}.{}", short(&target)),
        };
        let dir = self.archives_dir(kind).join("updates");
        self.mkdirs(&dir)?;
        let archive = dir.join(format!("{file}.tar.zst"));
        let manifest_path = dir.join(format!("{file}.manifest"));
        if let (true, Ok(m)) = (archive.is_file(), Manifest::load(&manifest_path)) {
            let bytes = fs::metadata(&archive).map_err(ImageError::store("reading", &archive))?.len();
            info!(image = %name, archive = %archive.display(), "update archive already made");
            return Ok(UpdateArchive { archive, manifest_path, manifest: m, target, diff: diff.is_some(), bytes });
        }
        let tree = self.tree_dir(kind, name);
        let mut af = AtomicFile::create(&archive)?;
        let m = match &diff {
            Some((b, ch)) => {
                let (only, deletions) = diff_parts(&current, &nodes, ch);
                pack::write_archive(&tree, &nodes, Some(&only), Some(&deletions), &opts, &archive, af.file())?;
                let mut header = pack::full_header(&opts);
                header.kind = "diff".into();
                header.base_manifest_sha256 = Some(b.clone());
                header.deletions = ch.deleted.clone();
                Manifest { header, entries: current.entries.clone() }
            }
            None => {
                pack::write_archive(&tree, &nodes, None, None, &opts, &archive, af.file())?;
                current.clone()
            }
        };
        af.commit()?;
        AtomicFile::write(&manifest_path, &m.to_bytes())?;
        let bytes = fs::metadata(&archive).map_err(ImageError::store("reading", &archive))?.len();
        info!(image = %name, archive = %archive.display(), bytes, diff = diff.is_some(), "update archive written");
        Ok(UpdateArchive { archive, manifest_path, manifest: m, target, diff: diff.is_some(), bytes })
    }

    /// Writes the diff archive of a tree against its packed base: the entries added or changed
    /// since the base manifest plus the list of deleted paths.
    ///
    /// # Errors
    /// [`ImageError::NoBase`] when the tree was never packed, scan and write errors.
    pub fn diff(
        &self,
        kind: TreeKind,
        name: &ImageName,
        opts: &PackOptions,
        announce: Option<&str>,
    ) -> Result<DiffOutcome, ImageError> {
        if let Some(a) = announce {
            torrent::check_announce(a)?;
        }
        let tree = self.tree_dir(kind, name);
        if !tree.is_dir() {
            return Err(ImageError::NoSuchImage { name: name.clone(), store: self.root.clone() });
        }
        let base = Manifest::load(&self.archive_file(kind, name, ".manifest"))
            .map_err(|_| ImageError::NoBase { name: name.clone() })?;
        let nodes = scan::scan(&tree, &ScanOptions::default())?;
        let cache = self.load_cache(kind, name);
        let digests = pack::digests_for(&tree, &nodes, &cache, true)?.unwrap_or_default();
        let current = pack::manifest_of(&nodes, &digests, pack::full_header(opts));
        let ch = manifest::changes(&base, &current);
        let (only, deletions) = diff_parts(&current, &nodes, &ch);
        let ext = if opts.zstd_level.is_some() { ".diff.tar.zst" } else { ".diff.tar" };
        let archive = self.archive_file(kind, name, ext);
        let mut af = AtomicFile::create(&archive)?;
        pack::write_archive(&tree, &nodes, Some(&only), Some(&deletions), opts, &archive, af.file())?;
        af.commit()?;
        let mut header = pack::full_header(opts);
        header.kind = "diff".into();
        header.base_manifest_sha256 = Some(base.digest());
        header.deletions = ch.deleted.clone();
        let m = Manifest { header, entries: current.entries };
        AtomicFile::write(&self.archive_file(kind, name, ".diff.manifest"), &m.to_bytes())?;
        if let Some(a) = announce {
            self.write_torrent(kind, name, &archive, ext, a)?;
        }
        let bytes = fs::metadata(&archive).map_err(ImageError::store("reading", &archive))?.len();
        info!(image = %name, changed = ch.changed.len(), deleted = ch.deleted.len(), bytes, "diff {}", archive.display());
        Ok(DiffOutcome { archive, bytes, changed: ch.changed.len(), deleted: ch.deleted.len() })
    }

    /// Removes a tree and its archives (`archives_only` keeps the tree).
    ///
    /// # Errors
    /// [`ImageError::NoSuchImage`], [`ImageError::Store`].
    pub fn rm(&self, kind: TreeKind, name: &ImageName, archives_only: bool) -> Result<(), ImageError> {
        let tree = self.tree_dir(kind, name);
        if !tree.is_dir() && self.archive(kind, name).is_none() {
            return Err(ImageError::NoSuchImage { name: name.clone(), store: self.root.clone() });
        }
        for s in [
            ".tar.zst",
            ".tar",
            ".manifest",
            ".statcache",
            ".torrent",
            ".diff.tar.zst",
            ".diff.tar",
            ".diff.manifest",
            ".diff.torrent",
        ] {
            let p = self.archive_file(kind, name, s);
            match fs::remove_file(&p) {
                Ok(()) => debug!(path = %p.display(), "removed"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::Store { op: "removing", path: p, source: e }),
            }
        }
        if !archives_only && tree.is_dir() {
            fs::remove_dir_all(&tree).map_err(ImageError::store("removing", &tree))?;
        }
        Ok(())
    }

    /// Imports a tree from a directory (copied exactly, through our own pack/unpack) or from a
    /// tar / tar.zst file (unpacked safely). The tree appears under its name only when complete.
    ///
    /// # Errors
    /// [`ImageError::ImageExists`], [`ImageError::BadImportSource`], pack/unpack errors.
    pub fn import(&self, kind: TreeKind, name: &ImageName, source: &Path) -> Result<UnpackReport, ImageError> {
        let dest = self.tree_dir(kind, name);
        if dest.exists() {
            return Err(ImageError::ImageExists { name: name.clone(), store: self.root.clone() });
        }
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        self.mkdirs(&parent)?;
        let tmp = parent.join(format!(".{name}.import.{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(ImageError::store("creating", &tmp))?;
        let result = self.import_into(source, &tmp);
        match result {
            Ok(r) => {
                fs::rename(&tmp, &dest).map_err(ImageError::store("renaming", &tmp))?;
                Ok(r)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    fn import_into(&self, source: &Path, tmp: &Path) -> Result<UnpackReport, ImageError> {
        let meta = fs::metadata(source).map_err(|_| ImageError::BadImportSource { path: source.to_path_buf() })?;
        let uopts = UnpackOptions::default();
        if meta.is_file() {
            let f = File::open(source).map_err(ImageError::read_tree(source))?;
            return unpack::unpack(f, tmp, &uopts);
        }
        if !meta.is_dir() {
            return Err(ImageError::BadImportSource { path: source.to_path_buf() });
        }
        copy_tree(source, tmp)
    }

    /// Captures a golden client's root into `images/NAME` with rsync (created if missing;
    /// re-capturing updates it in place). Uses `excludes/NAME` when present.
    ///
    /// # Errors
    /// [`ImageError::Command`] when rsync cannot start or fails.
    pub fn capture(&self, name: &ImageName, src: &CaptureSource) -> Result<(), ImageError> {
        self.capture_with(name, src, &SshOptions::default())
    }

    /// [`Self::capture`] over ssh with `ssh` options. First reads the source's mount table
    /// (`/proc/self/mounts`: over ssh on the golden node, or this machine's for a local path) and
    /// leaves out the contents of every mount of another file system below the root (see
    /// [`mount_excludes`]), besides /proc, /sys, /dev, /run and /tmp.
    ///
    /// # Errors
    /// [`ImageError::Command`] when ssh or rsync cannot start or fails.
    pub fn capture_with(&self, name: &ImageName, src: &CaptureSource, ssh: &SshOptions) -> Result<(), ImageError> {
        let dest = self.tree_dir(TreeKind::Image, name);
        self.mkdirs(&dest)?;
        let excl = self.root.join("excludes").join(name.as_str());
        let (mounts, root) = match src {
            CaptureSource::Ssh { host, port } => {
                let mut c = ssh.command(*port);
                c.extend([format!("root@{host}"), "cat /proc/self/mounts".into()]);
                let shown = c.join(" ");
                let out = Command::new(&c[0])
                    .args(&c[1..])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .map_err(|e| ImageError::Command { command: shown.clone(), status: e.to_string() })?;
                if !out.status.success() {
                    let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                    return Err(ImageError::Command { command: shown, status: format!("{}: {why}", out.status) });
                }
                (String::from_utf8_lossy(&out.stdout).into_owned(), PathBuf::from("/"))
            }
            CaptureSource::Local(p) => (fs::read_to_string("/proc/self/mounts").unwrap_or_default(), p.clone()),
        };
        let extra = mount_excludes(&mounts, &root);
        if !extra.is_empty() {
            info!(image = %name, excluded = ?extra, "capture: contents of mounts of other file systems left out");
        }
        let args = capture_args_with(src, &dest, excl.is_file().then_some(excl.as_path()), &extra, ssh);
        let shown = format!("rsync {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
        info!(image = %name, "capturing: {shown}");
        let status = Command::new("rsync")
            .args(&args)
            .status()
            .map_err(|e| ImageError::Command { command: shown.clone(), status: e.to_string() })?;
        if !status.success() {
            return Err(ImageError::Command { command: shown, status: status.to_string() });
        }
        Ok(())
    }
}

/// Copies the tree at `src` into the existing empty directory `dest` exactly (owners, modes,
/// xattrs, hard links, devices, holes) by streaming our own uncompressed archive through a pipe.
///
/// # Errors
/// Scan, pack and unpack errors.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<UnpackReport, ImageError> {
    let nodes = scan::scan(src, &ScanOptions::default())?;
    let (reader, writer) = io::pipe().map_err(ImageError::store("creating a pipe for", src))?;
    let src_owned = src.to_path_buf();
    let packer = std::thread::spawn(move || {
        let opts = PackOptions { zstd_level: None, threads: 1, progress: super::progress::ProgressMode::Off };
        pack::write_archive(&src_owned, &nodes, None, None, &opts, Path::new("-"), writer).map(|_| ())
    });
    let uopts = UnpackOptions { progress: super::progress::ProgressMode::Off, ..UnpackOptions::default() };
    let unpacked = unpack::unpack(reader, dest, &uopts);
    let packed = packer.join().unwrap_or_else(|_| {
        Err(ImageError::WriteArchive { path: PathBuf::from("-"), source: io::Error::other("packing thread panicked") })
    });
    // A pack error explains a truncated stream better than the unpacker's view of it.
    packed?;
    unpacked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_command_line() {
        let a = capture_args(
            &CaptureSource::parse("node7:2222"),
            Path::new("/s/images/x"),
            Some(Path::new("/s/excludes/x")),
        );
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(a[0], "-aHAXS");
        assert!(a.contains(&"--numeric-ids".to_string()));
        for e in [
            "--exclude=/proc/*",
            "--exclude=/sys/*",
            "--exclude=/dev/*",
            "--exclude=/run/*",
            "--exclude=/tmp/*",
            "--exclude-from=/s/excludes/x",
        ] {
            assert!(a.contains(&e.to_string()), "{e}");
        }
        let n = a.len();
        assert_eq!(&a[n - 4..], ["-e", "ssh -o BatchMode=yes -p 2222", "root@node7:/", "/s/images/x/"]);
        let l = capture_args(&CaptureSource::parse("/srv/golden"), Path::new("/d"), None);
        assert_eq!(l.last().unwrap(), "/d/");
        assert_eq!(l[l.len() - 2], "/srv/golden/");
        assert_eq!(CaptureSource::parse("host"), CaptureSource::Ssh { host: "host".into(), port: None });
        let ssh = SshOptions { identity: Some("/k/id".into()), known_hosts: Some("/s/ssh_known_hosts".into()) };
        let a = capture_args_with(&CaptureSource::parse("10.0.0.5"), Path::new("/d"), None, &["/mnt/nfs/*".into()], &ssh);
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert!(a.contains(&"--exclude=/mnt/nfs/*".to_string()), "{a:?}");
        assert!(a.contains(&"ssh -o BatchMode=yes -i /k/id -o IdentitiesOnly=yes -o UserKnownHostsFile=/s/ssh_known_hosts -o StrictHostKeyChecking=accept-new".to_string()), "{a:?}");
    }

    #[test]
    fn mounts_of_other_file_systems_are_left_out_and_disk_file_systems_kept() {
        let mounts = "\
/dev/vda2 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid 0 0
sysfs /sys sysfs rw 0 0
/dev/vda1 /boot/efi vfat rw 0 0
/dev/vdb1 /var xfs rw 0 0
tmpfs /run tmpfs rw 0 0
nas:/export/home /home nfs4 rw 0 0
tmpfs /mnt/scratch\\040space tmpfs rw 0 0
fuse /mnt/a*b fuse.sshfs rw 0 0
broken line
";
        let got = mount_excludes(mounts, Path::new("/"));
        assert_eq!(got, ["/proc/*", "/sys/*", "/run/*", "/home/*", "/mnt/scratch space/*", "/mnt/a\\*b/*"]);
        // A local capture of /srv/g sees only what is below it, relative to it.
        let local = "tmpfs /srv/g/tmp tmpfs rw 0 0\nproc /srv/g/proc proc rw 0 0\ntmpfs /srv/other tmpfs rw 0 0\ntmpfs /srv/g tmpfs rw 0 0\n";
        assert_eq!(mount_excludes(local, Path::new("/srv/g")), ["/tmp/*", "/proc/*"]);
    }
}
