//! Updating an installed tree in place (issue 17, the node's side of `si-appliance update`):
//! the equivalent of SystemImager's si_updateclient, from a diff (or full) archive of the image
//! store instead of rsync.
//!
//! The node knows what it runs: `<root>/var/lib/si-appliance/installed.manifest` (the manifest
//! of the archive it was installed or last updated from) and `installed.json` (image name and
//! that manifest's digest). An update:
//! 1. computes the plan: [`manifest::changes`] between the installed manifest and the target's,
//!    split into added / changed / deleted, minus the excluded paths ([`Excludes`]);
//! 2. unpacks the archive (through the image store's hostile-archive-safe unpacker) into a
//!    staging directory on the same file system (`<root>/.si-appliance/update-stage`), and checks
//!    every staged entry the plan needs against the target manifest (content digest, type,
//!    mode, owner, mtime, xattrs): a bad archive fails here, with nothing under the root changed;
//! 3. applies it: each operation is appended to a journal (`<root>/.si-appliance/update.journal`,
//!    fsync'd) *before* it is done; files, links and nodes are renamed from the stage over their
//!    old version (atomic per path), deletions deepest first, directories' metadata last;
//! 4. writes the new installed manifest and record, then removes the journal and the stage.
//!
//! A failure before step 3 leaves the tree as it was; a failure during step 3 leaves the
//! journal, which lists exactly the paths changed (the last line may be the one that failed).
//! Running the update again from the same base brings the tree to the target (every operation
//! is idempotent).

pub mod client;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::image::manifest::{self, Entry, Manifest};
use crate::image::path::unescape;
use crate::image::unpack::{self, UnpackOptions};
use crate::image::{pack, scan, ImageError};

pub mod serve;

/// Where, under the root, the installed record lives.
pub const STATE_DIR: &str = "var/lib/si-appliance";
/// Where, under the root, the stage and journal live (never part of an image).
pub const WORK_DIR: &str = ".si-appliance";

/// Paths an update never touches unless the exclude list is replaced (SystemImager's
/// updateclient.local.exclude): per-node identity, network configuration, logs, users' data.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "/etc/hostname",
    "/etc/hosts",
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/ssh/ssh_host_*",
    "/etc/fstab",
    "/etc/network/interfaces",
    "/etc/network/interfaces.d",
    "/etc/systemd/network",
    "/etc/netplan",
    "/var/log",
    "/home",
];

/// Paths excluded always: the update's own state.
const ALWAYS_EXCLUDED: &[&str] = &["/.si-appliance", "/var/lib/si-appliance"];

/// Errors of an update.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Reading, unpacking or scanning through the image store failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A file system operation under the root failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// An exclude pattern is malformed.
    #[error("{origin}: line {line}: {why}")]
    BadExclude {
        /// The file.
        origin: PathBuf,
        /// 1-based line.
        line: usize,
        /// Why.
        why: String,
    },
    /// The target is a diff against another base than the one installed.
    #[error("the update is a diff against manifest {want}, but this node runs {have}")]
    WrongBase {
        /// The diff's base manifest digest.
        want: String,
        /// The installed manifest's digest.
        have: String,
    },
    /// A staged entry does not match the target manifest (nothing under the root was changed).
    #[error("the archive does not match its manifest at {path}: {why} (nothing was changed)")]
    StagedMismatch {
        /// Escaped path.
        path: String,
        /// The difference.
        why: String,
    },
    /// Applying failed part-way; the journal lists the paths changed.
    #[error("update failed after {done} change(s), listed in {journal}: {source}")]
    Partial {
        /// Operations completed (journal lines, the last one possibly incomplete).
        done: usize,
        /// The journal file.
        journal: PathBuf,
        /// The failure.
        source: Box<UpdateError>,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UpdateError + 'a {
    move |source| UpdateError::Io { op, path: path.to_path_buf(), source }
}

/// Paths (absolute, as on the node) an update must not touch. A pattern matches a path when its
/// components glob-match (`*`, `?`) the path's first components: `/var/log` covers everything
/// under it, `/etc/ssh/ssh_host_*` the host keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Excludes {
    patterns: Vec<Vec<Vec<u8>>>,
}

impl Excludes {
    /// The default list ([`DEFAULT_EXCLUDES`]) plus the update's own state.
    pub fn defaults() -> Excludes {
        let mut x = Excludes::default();
        for p in DEFAULT_EXCLUDES {
            x.push(p.as_bytes());
        }
        x
    }

    fn push(&mut self, p: &[u8]) {
        self.patterns.push(p.split(|b| *b == b'/').filter(|c| !c.is_empty()).map(<[u8]>::to_vec).collect());
    }

    /// Adds the patterns of an exclude file: one absolute path pattern per line, `#` comments,
    /// blank lines ignored; an rsync-style leading `- ` is accepted.
    ///
    /// # Errors
    /// [`UpdateError::Io`], [`UpdateError::BadExclude`] for a relative or empty pattern.
    pub fn add_file(&mut self, path: &Path) -> Result<(), UpdateError> {
        let text = fs::read(path).map_err(io_err("reading", path))?;
        self.add_text(&text, path)
    }

    /// As [`Excludes::add_file`], from the file's bytes.
    ///
    /// # Errors
    /// [`UpdateError::BadExclude`].
    pub fn add_text(&mut self, text: &[u8], origin: &Path) -> Result<(), UpdateError> {
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            let line = line.trim_ascii();
            let line = line.strip_prefix(b"- ").unwrap_or(line).trim_ascii();
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            if !line.starts_with(b"/") || line.split(|b| *b == b'/').all(<[u8]>::is_empty) {
                return Err(UpdateError::BadExclude {
                    origin: origin.to_path_buf(),
                    line: i + 1,
                    why: format!("{:?} is not an absolute path below /", String::from_utf8_lossy(line)),
                });
            }
            self.push(line);
        }
        Ok(())
    }

    /// Whether the escaped manifest path (relative, `a/b`) is excluded.
    pub fn matches(&self, escaped: &str) -> bool {
        let Some(raw) = unescape(escaped) else { return true };
        let comps: Vec<&[u8]> = raw.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
        let always = ALWAYS_EXCLUDED.iter().any(|p| {
            let pc: Vec<&[u8]> = p.as_bytes().split(|b| *b == b'/').filter(|c| !c.is_empty()).collect();
            prefix_match(&pc, &comps)
        });
        always
            || self.patterns.iter().any(|p| prefix_match(&p.iter().map(Vec::as_slice).collect::<Vec<_>>(), &comps))
    }
}

fn prefix_match(pattern: &[&[u8]], comps: &[&[u8]]) -> bool {
    !pattern.is_empty() && pattern.len() <= comps.len() && pattern.iter().zip(comps).all(|(p, c)| glob(p, c))
}

/// `*` (any run, within one component) and `?` (one byte).
fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// What an update does (escaped paths, manifest order; deletions deepest first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// New entries.
    pub added: Vec<String>,
    /// Entries whose content or metadata changed.
    pub changed: Vec<String>,
    /// Entries gone from the target.
    pub deleted: Vec<String>,
    /// Entries that would be added, changed or deleted but are excluded.
    pub excluded: Vec<String>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.deleted.is_empty()
    }

    /// One line per path: `A path`, `M path`, `D path`, `X path` (excluded), as `--dry-run` prints.
    pub fn lines(&self) -> String {
        let mut out = String::new();
        for (tag, list) in [("A", &self.added), ("M", &self.changed), ("D", &self.deleted), ("X", &self.excluded)] {
            for p in list {
                out.push_str(tag);
                out.push(' ');
                out.push_str(p);
                out.push('\n');
            }
        }
        out
    }
}

/// Computes the plan from the installed manifest to the target one.
///
/// # Errors
/// [`UpdateError::WrongBase`] when the target is a diff against another manifest.
pub fn plan(base: &Manifest, target: &Manifest, excludes: &Excludes) -> Result<Plan, UpdateError> {
    if let Some(want) = &target.header.base_manifest_sha256 {
        let have = base.digest();
        if *want != have {
            return Err(UpdateError::WrongBase { want: want.clone(), have });
        }
    }
    let ch = manifest::changes(base, target);
    let old: HashSet<&str> = base.entries.iter().map(|e| e.path.as_str()).collect();
    let mut p = Plan::default();
    for path in ch.changed {
        if excludes.matches(&path) {
            p.excluded.push(path);
        } else if old.contains(path.as_str()) {
            p.changed.push(path);
        } else {
            p.added.push(path);
        }
    }
    for path in ch.deleted {
        if excludes.matches(&path) {
            p.excluded.push(path);
        } else {
            p.deleted.push(path);
        }
    }
    Ok(p)
}

/// The node's record of what it runs (`<root>/var/lib/si-appliance/installed.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Image name.
    pub image: String,
    /// SHA-256 of the installed manifest (`installed.manifest` next to this file).
    pub manifest_sha256: String,
}

/// Paths of the record and manifest under a root.
pub fn installed_paths(root: &Path) -> (PathBuf, PathBuf) {
    let d = root.join(STATE_DIR);
    (d.join("installed.json"), d.join("installed.manifest"))
}

/// Writes the installed record and manifest (temp + rename).
///
/// # Errors
/// [`UpdateError::Io`].
pub fn record_installed(root: &Path, image: &str, m: &Manifest) -> Result<Installed, UpdateError> {
    let (json, man) = installed_paths(root);
    let dir = root.join(STATE_DIR);
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let rec = Installed { image: image.to_owned(), manifest_sha256: m.digest() };
    pack::AtomicFile::write(&man, &m.to_bytes())?;
    pack::AtomicFile::write(&json, &serde_json::to_vec_pretty(&rec).unwrap_or_default())?;
    Ok(rec)
}

/// The version a (diff or full) manifest describes: the full manifest of the tree it brings a
/// node to (a diff's base and deletion list dropped). Its SHA-256 is the version's name on the
/// appliance (the image store's history) and in the node's record, however the node got there.
pub fn version_of(m: &Manifest) -> Manifest {
    let mut v = m.clone();
    v.header.kind = "full".into();
    v.header.base_manifest_sha256 = None;
    v.header.deletions.clear();
    v
}

/// Reads the installed manifest.
///
/// # Errors
/// [`UpdateError::Image`] when missing or malformed.
pub fn installed_manifest(root: &Path) -> Result<Manifest, UpdateError> {
    Ok(Manifest::load(&installed_paths(root).1)?)
}

/// What [`apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The plan carried out.
    pub plan: Plan,
    /// Directories that were to be deleted but still hold files the image does not have.
    pub kept_dirs: Vec<String>,
    /// The new installed manifest digest.
    pub manifest_sha256: String,
}

/// Applies `archive` (a diff against the installed manifest, or a full archive) whose manifest
/// is `target` to the tree at `root`. See the module doc for the order and guarantees.
///
/// # Errors
/// [`UpdateError::StagedMismatch`] and unpack errors before anything changed;
/// [`UpdateError::Partial`] after.
pub fn apply(
    root: &Path,
    image: &str,
    archive: &Path,
    target: &Manifest,
    excludes: &Excludes,
) -> Result<Applied, UpdateError> {
    let base = installed_manifest(root)?;
    let plan = plan(&base, target, excludes)?;
    let work = root.join(WORK_DIR);
    let stage = work.join("update-stage");
    let journal_path = work.join("update.journal");
    if journal_path.exists() {
        let prev = work.join("update.journal.prev");
        warn!(journal = %journal_path.display(), "an earlier update did not finish; applying again over it");
        fs::rename(&journal_path, &prev).map_err(io_err("renaming", &journal_path))?;
    }
    if stage.exists() {
        fs::remove_dir_all(&stage).map_err(io_err("removing", &stage))?;
    }
    fs::create_dir_all(&stage).map_err(io_err("creating", &stage))?;
    let result = stage_and_apply(root, &stage, &journal_path, archive, target, &plan);
    let _ = fs::remove_dir_all(&stage);
    let kept_dirs = result?;
    let rec = record_installed(root, image, &version_of(target))?;
    fs::remove_file(&journal_path).map_err(io_err("removing", &journal_path))?;
    info!(image, manifest = %rec.manifest_sha256, added = plan.added.len(), changed = plan.changed.len(),
        deleted = plan.deleted.len(), excluded = plan.excluded.len(), "update applied");
    Ok(Applied { plan, kept_dirs, manifest_sha256: rec.manifest_sha256 })
}

fn stage_and_apply(
    root: &Path,
    stage: &Path,
    journal_path: &Path,
    archive: &Path,
    target: &Manifest,
    plan: &Plan,
) -> Result<Vec<String>, UpdateError> {
    let f = File::open(archive).map_err(io_err("opening", archive))?;
    let opts = UnpackOptions { progress: crate::image::progress::ProgressMode::Off, ..UnpackOptions::default() };
    unpack::unpack(f, stage, &opts)?;
    let want: HashMap<&str, &Entry> = target.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    check_stage(stage, plan, &want, opts.restore_owners)?;
    let mut journal = Journal::create(journal_path)?;
    let r = apply_staged(root, stage, plan, &want, &mut journal);
    r.map_err(|e| UpdateError::Partial { done: journal.lines, journal: journal_path.to_path_buf(), source: Box::new(e) })
}

/// Every added/changed entry must be in the stage exactly as the target manifest says.
fn check_stage(
    stage: &Path,
    plan: &Plan,
    want: &HashMap<&str, &Entry>,
    owners: bool,
) -> Result<(), UpdateError> {
    let nodes = scan::scan(stage, &scan::ScanOptions::default())?;
    let digests = pack::digests_for(stage, &nodes, &Default::default(), true)?.unwrap_or_default();
    let staged = pack::manifest_of(&nodes, &digests, pack::full_header(&Default::default()));
    let have: HashMap<&str, &Entry> = staged.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for path in plan.added.iter().chain(&plan.changed) {
        let Some(w) = want.get(path.as_str()) else {
            return Err(UpdateError::StagedMismatch { path: path.clone(), why: "not in the manifest".into() });
        };
        let Some(h) = have.get(path.as_str()) else {
            return Err(UpdateError::StagedMismatch { path: path.clone(), why: "missing from the archive".into() });
        };
        let mut h = (*h).clone();
        if !owners {
            h.uid = w.uid;
            h.gid = w.gid;
        }
        if w.kind == "dir" {
            // Directories are not moved: their metadata is set from the manifest.
            h.mtime = w.mtime;
            h.mtime_ns = w.mtime_ns;
        }
        if h != **w {
            return Err(UpdateError::StagedMismatch {
                path: path.clone(),
                why: format!("expected {}, found {}", brief(w), brief(&h)),
            });
        }
    }
    Ok(())
}

fn brief(e: &Entry) -> String {
    serde_json::to_string(e).unwrap_or_default()
}

/// Append-only list of operations, each line fsync'd before the operation it names.
struct Journal {
    file: File,
    path: PathBuf,
    lines: usize,
}

impl Journal {
    fn create(path: &Path) -> Result<Journal, UpdateError> {
        let file =
            OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(io_err("creating", path))?;
        Ok(Journal { file, path: path.to_path_buf(), lines: 0 })
    }

    fn note(&mut self, op: &str, path: &str) -> Result<(), UpdateError> {
        let line = serde_json::json!({ "op": op, "path": path }).to_string();
        self.file.write_all(format!("{line}\n").as_bytes()).map_err(io_err("writing", &self.path))?;
        self.file.sync_data().map_err(io_err("syncing", &self.path))?;
        self.lines += 1;
        #[cfg(test)]
        if FAIL_AT.with(std::cell::Cell::get) == Some(self.lines) {
            return Err(UpdateError::Io {
                op: "injected failure at",
                path: self.path.clone(),
                source: io::Error::other("test"),
            });
        }
        Ok(())
    }
}

fn under(root: &Path, escaped: &str) -> Result<PathBuf, UpdateError> {
    let raw = unescape(escaped)
        .ok_or_else(|| UpdateError::StagedMismatch { path: escaped.to_owned(), why: "bad path escape".into() })?;
    if escaped == "." {
        return Ok(root.to_path_buf());
    }
    Ok(root.join(std::ffi::OsStr::from_bytes(&raw)))
}

fn apply_staged(
    root: &Path,
    stage: &Path,
    plan: &Plan,
    want: &HashMap<&str, &Entry>,
    journal: &mut Journal,
) -> Result<Vec<String>, UpdateError> {
    let mut dirs = Vec::new();
    for path in plan.added.iter().chain(&plan.changed) {
        let e = want[path.as_str()];
        let dest = under(root, path)?;
        let old = fs::symlink_metadata(&dest).ok();
        if e.kind == "dir" {
            if old.as_ref().is_some_and(|m| !m.is_dir()) {
                journal.note("remove", path)?;
                fs::remove_file(&dest).map_err(io_err("removing", &dest))?;
            }
            if !dest.is_dir() {
                journal.note("mkdir", path)?;
                fs::create_dir(&dest).map_err(io_err("creating", &dest))?;
            }
            dirs.push(path.clone());
            continue;
        }
        if old.as_ref().is_some_and(fs::Metadata::is_dir) {
            journal.note("remove-tree", path)?;
            fs::remove_dir_all(&dest).map_err(io_err("removing", &dest))?;
        }
        let src = under(stage, path)?;
        journal.note("replace", path)?;
        fs::rename(&src, &dest).map_err(io_err("renaming into place", &dest))?;
    }
    let mut kept = Vec::new();
    for path in &plan.deleted {
        let dest = under(root, path)?;
        let Ok(m) = fs::symlink_metadata(&dest) else { continue };
        journal.note("delete", path)?;
        let r = if m.is_dir() { fs::remove_dir(&dest) } else { fs::remove_file(&dest) };
        match r {
            Ok(()) => {}
            Err(e) if m.is_dir() && e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                warn!(path, "directory deleted from the image still holds other files: kept");
                kept.push(path.clone());
            }
            Err(e) => return Err(UpdateError::Io { op: "deleting", path: dest, source: e }),
        }
    }
    // Directories' metadata last, deepest first, so their mtimes stay what the manifest says.
    for path in dirs.iter().rev() {
        journal.note("meta", path)?;
        set_dir_meta(&under(root, path)?, want[path.as_str()])?;
    }
    // Renames and deletions touched their parents' mtimes: put back the target's.
    let changed_dirs: HashSet<&str> = dirs.iter().map(String::as_str).collect();
    let mut parents: Vec<&str> = plan
        .added
        .iter()
        .chain(&plan.changed)
        .chain(&plan.deleted)
        .map(|p| p.rsplit_once('/').map_or(".", |(d, _)| d))
        .filter(|d| !changed_dirs.contains(d))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    parents.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count() + usize::from(*d != ".")));
    for d in parents {
        let Some(e) = want.get(d) else { continue };
        if e.kind != "dir" {
            continue;
        }
        let dest = under(root, d)?;
        let t = filetime::FileTime::from_unix_time(e.mtime, e.mtime_ns);
        filetime::set_symlink_file_times(&dest, t, t).map_err(io_err("setting the mtime of", &dest))?;
    }
    Ok(kept)
}

fn set_dir_meta(dest: &Path, e: &Entry) -> Result<(), UpdateError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::lchown(dest, Some(e.uid), Some(e.gid)).map_err(io_err("chown", dest))?;
    }
    let mode = u32::from_str_radix(&e.mode, 8).unwrap_or(0o755);
    fs::set_permissions(dest, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", dest))?;
    let have = scan::read_xattrs(dest)?;
    let want: Vec<(Vec<u8>, Vec<u8>)> = e
        .xattrs
        .iter()
        .filter_map(|(k, v)| Some((unescape(k)?, hex::decode(v).ok()?)))
        .collect();
    for (k, _) in &have {
        if !want.iter().any(|(w, _)| w == k) {
            xattr::remove(dest, std::ffi::OsStr::from_bytes(k)).map_err(io_err("removing an xattr of", dest))?;
        }
    }
    for (k, v) in &want {
        xattr::set(dest, std::ffi::OsStr::from_bytes(k), v).map_err(io_err("setting an xattr of", dest))?;
    }
    let t = filetime::FileTime::from_unix_time(e.mtime, e.mtime_ns);
    filetime::set_symlink_file_times(dest, t, t).map_err(io_err("setting the mtime of", dest))?;
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// Unit tests: the journal line whose operation fails.
    static FAIL_AT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
mod tests;
