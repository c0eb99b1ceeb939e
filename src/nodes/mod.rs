//! The node book: which nodes this appliance may install and what each one is — enrolled,
//! installing, installed (image, manifest digest, time) or failed — kept across restarts and
//! `kill -9` in `<state_dir>/nodes.journal`. Every boot decision about a node (installer or
//! local disk) and every plan is answered from it.
//!
//! Enrolment is explicit: the DHCP reservations of the configuration (`[[dhcp.reservation]]`,
//! origin `config`), `si-appliance node add` / `POST /api/admin/nodes` (origin `added`), or,
//! with `enroll = "any"` (lab use), any node that asks for its boot script (origin `any`).
//! A PXE client that is not enrolled is told to boot locally and shown as `discovered`.
//!
//! # Journal
//! One line per change: 8 hex digits of the CRC-32 of the JSON, a space, the JSON, `\n`;
//! appended and `fdatasync`'d before the change is applied in memory and before the caller
//! answers. At open, lines replay in order (the last one per MAC wins); a line whose CRC or JSON
//! is wrong is skipped and the replay goes on with the next line, a last line without its
//! newline (a torn append) is dropped. Then the journal is rewritten compacted (temporary
//! file, fsync, rename, fsync of the directory); a damaged journal is first kept aside as
//! `nodes.journal.damaged-<ms>`.

pub mod client;
pub mod http;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{Enroll, Reservation};
use crate::types::node_api::Phase;
use crate::types::events::{Enrolment, EventSink, NodeEvent};
use crate::types::{ImageName, MacAddr};

/// The journal's file name in the state directory.
pub const JOURNAL: &str = "nodes.journal";
/// Longest host name, group or disk name accepted.
const MAX_FIELD: usize = 64;
/// Console bytes kept per node on disk (and twice that with the previous file).
pub const CONSOLE_FILE_MAX: u64 = 1 << 20;
/// Longest failure text kept in a record.
const MAX_ERROR: usize = 512;

/// Errors of the node book.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    /// The journal could not be read, written or synced.
    #[error("node journal {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A reimage named MACs that are not in the book.
    #[error("not enrolled: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    Unknown(Vec<MacAddr>),
    /// A field of an enrolment is not acceptable.
    #[error("{field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Where a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// A `[[dhcp.reservation]]` of the configuration (removed when it leaves the file).
    Config,
    /// `node add` / the admin API / the dashboard.
    Added,
    /// `enroll = "any"`: the node asked for its boot script.
    Any,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum NodeState {
    /// May install; has not fetched a plan since it was enrolled or marked for re-imaging.
    Enrolled,
    /// Its installer fetched a plan.
    Installing {
        /// The image of the plan.
        image: ImageName,
        /// When, ms since the Unix epoch.
        since_ms: u64,
    },
    /// Its installer reported the image on disk and the boot loader in place.
    Installed {
        /// The image.
        image: ImageName,
        /// The image manifest's digest (what exactly was installed), when the archive has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<String>,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// Its installer reported a failure.
    Failed {
        /// Why.
        error: String,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
}

impl NodeState {
    /// The name shown by `node list` and the dashboard.
    pub fn name(&self) -> &'static str {
        match self {
            NodeState::Enrolled => "enrolled",
            NodeState::Installing { .. } => "installing",
            NodeState::Installed { .. } => "installed",
            NodeState::Failed { .. } => "failed",
        }
    }
}

/// One node's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node.
    pub mac: MacAddr,
    /// Host name of the installed system (default: `node-` and the last MAC bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Disk to install on (default: `install.disk`, else the installer's choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Group, for `node reimage --group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Where the record came from.
    pub origin: Origin,
    /// What the node is.
    #[serde(flatten)]
    pub state: NodeState,
    /// Marked for a new install at its next boot (`node reimage`).
    #[serde(default)]
    pub reimage: bool,
    /// Installs completed.
    #[serde(default)]
    pub installs: u32,
    /// Last change, ms since the Unix epoch.
    pub updated_ms: u64,
    /// An update ordered by `node update` and not yet done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateOrder>,
    /// How the node's last update ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<UpdateOutcome>,
}

/// An update ordered for an installed node (`node update`): its agent acts on it at its next
/// poll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOrder {
    /// Run the group's profile steps again too.
    #[serde(default)]
    pub profile: bool,
    /// When it was ordered, ms since the Unix epoch.
    pub at_ms: u64,
    /// Failed attempts so far (the order is dropped at [`UPDATE_ATTEMPTS`]).
    #[serde(default)]
    pub failures: u32,
}

/// Failed attempts after which an update order is dropped (the node stays as it is; `node
/// update` orders it again).
pub const UPDATE_ATTEMPTS: u32 = 3;

/// The outcome of a node's last update, as it reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOutcome {
    /// It worked.
    pub ok: bool,
    /// The version (manifest SHA-256) it ran before.
    pub from: String,
    /// The version it runs now.
    pub to: String,
    /// Entries added, changed, deleted.
    pub added: u64,
    /// See `added`.
    pub changed: u64,
    /// See `added`.
    pub deleted: u64,
    /// Archive bytes the node fetched.
    pub fetched_bytes: u64,
    /// Why it failed (the failing step's name for a profile step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

impl NodeRecord {
    fn new(mac: MacAddr, origin: Origin, now: u64) -> NodeRecord {
        NodeRecord {
            mac,
            hostname: None,
            disk: None,
            group: None,
            origin,
            state: NodeState::Enrolled,
            reimage: false,
            installs: 0,
            updated_ms: now,
            update: None,
            last_update: None,
        }
    }

    /// What the monitor shows for it.
    pub fn enrolment(&self) -> Enrolment {
        match (&self.state, self.reimage) {
            (_, true) => Enrolment::Reimage,
            (NodeState::Enrolled, _) => Enrolment::Enrolled,
            (NodeState::Installing { .. }, _) => Enrolment::Installing,
            (NodeState::Installed { .. }, _) => Enrolment::Installed,
            (NodeState::Failed { .. }, _) => Enrolment::Failed,
        }
    }
}

/// What a node's boot script (or pxelinux config) says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootAction {
    /// Boot the installer.
    Install,
    /// Boot from the local disk.
    Local(LocalWhy),
}

/// Why a node boots locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalWhy {
    /// It is not enrolled (discovered).
    NotEnrolled,
    /// It is installed and not marked for re-imaging.
    Installed {
        /// Its image.
        image: ImageName,
        /// When it was installed, ms since the Unix epoch.
        at_ms: u64,
    },
}

impl std::fmt::Display for LocalWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalWhy::NotEnrolled => f.write_str("not enrolled on this appliance"),
            LocalWhy::Installed { image, .. } => write!(f, "installed with image {image}"),
        }
    }
}

/// Whether a plan may be handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanGate {
    /// Yes; the node is now `installing`.
    Allowed(NodeRecord),
    /// The node is not enrolled.
    NotEnrolled,
    /// The node is installed and not marked for re-imaging.
    Installed(ImageName),
}

/// Which nodes a re-image is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    /// These MACs (each must be enrolled).
    Macs(Vec<MacAddr>),
    /// Every node of a group.
    Group(String),
    /// Every enrolled node.
    All,
}

/// A new enrolment (`node add`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrol {
    /// The nodes.
    pub macs: Vec<MacAddr>,
    /// Host name (only with one MAC).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Disk.
    #[serde(default)]
    pub disk: Option<String>,
    /// Group.
    #[serde(default)]
    pub group: Option<String>,
}

/// What an enrolment did per MAC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Enrolled {
    /// The node.
    pub mac: MacAddr,
    /// `added`, `updated` or `unchanged`.
    pub outcome: &'static str,
    /// Its state now.
    pub state: &'static str,
}

/// What replaying the journal found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Lines applied.
    pub applied: usize,
    /// Lines skipped as damaged (CRC or JSON wrong).
    pub damaged: usize,
    /// A torn last line was dropped.
    pub torn_tail: bool,
}

#[derive(Serialize, Deserialize)]
struct Line {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    set: Option<NodeRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remove: Option<MacAddr>,
}

/// Encodes one journal line.
fn encode(line: &Line) -> Vec<u8> {
    let json = serde_json::to_vec(line).unwrap_or_default();
    let mut out = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    out.extend_from_slice(&json);
    out.push(b'\n');
    out
}

/// Replays journal bytes into `nodes`.
pub fn replay(bytes: &[u8], nodes: &mut BTreeMap<MacAddr, NodeRecord>) -> Replay {
    let mut r = Replay::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            r.torn_tail = true;
            break;
        };
        let (line, tail) = (&rest[..nl], &rest[nl + 1..]);
        rest = tail;
        if line.is_empty() {
            continue;
        }
        let ok = (|| {
            let (crc, json) = (line.get(..8)?, line.get(9..)?);
            let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
            (line.get(8) == Some(&b' ') && crc32fast::hash(json) == crc).then_some(())?;
            serde_json::from_slice::<Line>(json).ok()
        })();
        match ok {
            Some(Line { set: Some(rec), .. }) => {
                nodes.insert(rec.mac, rec);
                r.applied += 1;
            }
            Some(Line { remove: Some(mac), .. }) => {
                nodes.remove(&mac);
                r.applied += 1;
            }
            _ => r.damaged += 1,
        }
    }
    r
}

struct Inner {
    nodes: BTreeMap<MacAddr, NodeRecord>,
    /// `None`: in memory only (tests).
    file: Option<File>,
    lines: usize,
}

/// The book. Share it as `Arc<NodeBook>`; every method takes a short lock, and a change is on
/// disk before the method returns.
pub struct NodeBook {
    mode: Enroll,
    path: PathBuf,
    /// `<state_dir>/consoles`: each node's installer console (`None`: in memory only).
    consoles: Option<PathBuf>,
    inner: Mutex<Inner>,
    events: std::sync::OnceLock<EventSink>,
}

impl std::fmt::Debug for NodeBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBook").field("mode", &self.mode).field("path", &self.path).finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    crate::monitor::registry::now_ms()
}

fn check_field(field: &'static str, v: &Option<String>, ok: impl Fn(u8) -> bool) -> Result<(), NodesError> {
    match v {
        Some(s) if s.is_empty() || s.len() > MAX_FIELD || !s.bytes().all(&ok) => {
            Err(NodesError::Invalid { field, why: format!("{s:?}: 1-{MAX_FIELD} characters of the allowed set") })
        }
        _ => Ok(()),
    }
}

/// Checks the fields of an enrolment (host name: RFC 1123 label; group: `[A-Za-z0-9._-]`;
/// disk: a `/dev/` path).
pub fn check_enrol(e: &Enrol) -> Result<(), NodesError> {
    if e.macs.is_empty() {
        return Err(NodesError::Invalid { field: "macs", why: "no MAC given".into() });
    }
    if e.hostname.is_some() && e.macs.len() > 1 {
        return Err(NodesError::Invalid { field: "hostname", why: "a host name names one node: give one MAC".into() });
    }
    check_field("hostname", &e.hostname, |b| b.is_ascii_alphanumeric() || b == b'-')?;
    if e.hostname.as_deref().is_some_and(|h| h.starts_with('-') || h.ends_with('-')) {
        return Err(NodesError::Invalid { field: "hostname", why: "must not start or end with '-'".into() });
    }
    check_field("group", &e.group, |b| b.is_ascii_alphanumeric() || b"._-".contains(&b))?;
    check_field("disk", &e.disk, |b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))?;
    if e.disk.as_deref().is_some_and(|d| !d.starts_with("/dev/") || d.contains("..")) {
        return Err(NodesError::Invalid { field: "disk", why: "a /dev/ path".into() });
    }
    Ok(())
}

impl NodeBook {
    /// A book in memory only (tests, `enroll` checks without a state directory).
    pub fn in_memory(mode: Enroll) -> NodeBook {
        NodeBook {
            mode,
            path: PathBuf::from("(memory)"),
            consoles: None,
            inner: Mutex::new(Inner { nodes: BTreeMap::new(), file: None, lines: 0 }),
            events: std::sync::OnceLock::new(),
        }
    }

    /// Opens (or creates) `<dir>/nodes.journal`, replays it, applies the configuration's
    /// reservations (added or updated with origin `config`; a `config` record no longer in the
    /// file is removed) and rewrites the journal compacted.
    ///
    /// # Errors
    /// [`NodesError::Io`] when the directory or the journal cannot be read or written.
    pub fn open(dir: &Path, mode: Enroll, listed: &[Reservation]) -> Result<NodeBook, NodesError> {
        let path = dir.join(JOURNAL);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| NodesError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut nodes = BTreeMap::new();
        let r = replay(&bytes, &mut nodes);
        if r.damaged > 0 {
            let aside = dir.join(format!("{JOURNAL}.damaged-{}", now_ms()));
            fs::copy(&path, &aside).map_err(io(&aside))?;
            warn!(journal = %path.display(), kept = %aside.display(), damaged = r.damaged, applied = r.applied,
                  "node journal: damaged lines skipped; every other record recovered; the old file is kept aside");
        }
        if r.torn_tail {
            warn!(journal = %path.display(), "node journal: a torn last line (an interrupted write) was dropped");
        }
        let now = now_ms();
        let mut seen = std::collections::HashSet::new();
        for res in listed {
            seen.insert(res.mac);
            let rec = nodes.entry(res.mac).or_insert_with(|| NodeRecord::new(res.mac, Origin::Config, now));
            rec.origin = Origin::Config;
            rec.hostname = res.hostname.clone().or(rec.hostname.take());
            rec.disk = res.disk.clone().or(rec.disk.take());
            rec.group = res.group.clone().or(rec.group.take());
        }
        let gone: Vec<MacAddr> =
            nodes.values().filter(|n| n.origin == Origin::Config && !seen.contains(&n.mac)).map(|n| n.mac).collect();
        for mac in gone {
            info!(%mac, "node no longer in the configuration's reservations: no longer enrolled");
            nodes.remove(&mac);
        }
        let file = write_compacted(&path, &nodes)?;
        let counts = nodes.values().fold(BTreeMap::<&str, usize>::new(), |mut m, n| {
            *m.entry(n.state.name()).or_default() += 1;
            m
        });
        info!(journal = %path.display(), nodes = nodes.len(), ?counts, enroll = ?mode, "node book open");
        let lines = nodes.len();
        let consoles = Some(dir.join("consoles"));
        Ok(NodeBook { mode, path, consoles, inner: Mutex::new(Inner { nodes, file: Some(file), lines }), events: std::sync::OnceLock::new() })
    }

    /// Sends an `Enrolment` event to the monitor for every change from now on, and one for every
    /// record now (so the registry starts with the book's nodes).
    pub fn attach_events(&self, events: EventSink) {
        for r in self.list() {
            events.send(enrolment_event(&r));
        }
        let _ = self.events.set(events);
    }

    /// `enroll`.
    pub fn mode(&self) -> Enroll {
        self.mode
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One record.
    pub fn get(&self, mac: MacAddr) -> Option<NodeRecord> {
        self.lock().nodes.get(&mac).cloned()
    }

    /// Every record, by MAC.
    pub fn list(&self) -> Vec<NodeRecord> {
        self.lock().nodes.values().cloned().collect()
    }

    /// Writes `recs` (journal first, then memory) and tells the monitor.
    fn commit(&self, inner: &mut Inner, recs: Vec<NodeRecord>) -> Result<(), NodesError> {
        if recs.is_empty() {
            return Ok(());
        }
        if let Some(f) = inner.file.as_mut() {
            let mut buf = Vec::new();
            for r in &recs {
                buf.extend(encode(&Line { set: Some(r.clone()), remove: None }));
            }
            let io = |source| NodesError::Io { path: self.path.clone(), source };
            f.write_all(&buf).map_err(io)?;
            f.sync_data().map_err(io)?;
            inner.lines += recs.len();
        }
        for r in recs {
            if let Some(ev) = self.events.get() {
                ev.send(enrolment_event(&r));
            }
            inner.nodes.insert(r.mac, r);
        }
        if inner.file.is_some() && inner.lines > 4 * inner.nodes.len() + 1024 {
            match write_compacted(&self.path, &inner.nodes) {
                Ok(f) => {
                    inner.file = Some(f);
                    inner.lines = inner.nodes.len();
                }
                // The appended journal is intact; compaction is retried at the next change.
                Err(e) => warn!("node journal compaction: {e:#}"),
            }
        }
        Ok(())
    }

    fn console_path(&self, mac: MacAddr) -> Option<PathBuf> {
        self.consoles.as_ref().map(|d| d.join(format!("{}.log", mac.hyphenated())))
    }

    /// Appends installer console text to the node's console file (`<state_dir>/consoles/<mac>.log`,
    /// kept across restarts; beyond [`CONSOLE_FILE_MAX`] the file is started anew, the previous
    /// one kept as `.log.1`). Best effort: a failure is logged, never stops a report.
    pub fn append_console(&self, mac: MacAddr, text: &str) {
        let Some(path) = self.console_path(mac) else { return };
        let r = (|| -> std::io::Result<()> {
            if let Some(d) = path.parent() {
                fs::create_dir_all(d)?;
            }
            if fs::metadata(&path).map(|m| m.len() > CONSOLE_FILE_MAX).unwrap_or(false) {
                fs::rename(&path, path.with_extension("log.1"))?;
            }
            OpenOptions::new().create(true).append(true).open(&path)?.write_all(text.as_bytes())
        })();
        if let Err(e) = r {
            warn!(%mac, path = %path.display(), "node console not kept: {e}");
        }
    }

    /// The node's console as kept on disk (its last [`CONSOLE_FILE_MAX`] bytes at most).
    pub fn console(&self, mac: MacAddr) -> Option<String> {
        let path = self.console_path(mac)?;
        let bytes = fs::read(&path).ok()?;
        let from = bytes.len().saturating_sub(CONSOLE_FILE_MAX as usize);
        Some(String::from_utf8_lossy(&bytes[from..]).into_owned())
    }

    /// What the boot script of `mac` says. With `enroll = "any"` an unknown node is enrolled
    /// here (origin `any`).
    ///
    /// # Errors
    /// The enrolment of an unknown node under `enroll = "any"` could not be written.
    pub fn boot_action(&self, mac: MacAddr) -> Result<BootAction, NodesError> {
        let mut inner = self.lock();
        match inner.nodes.get(&mac) {
            None if self.mode == Enroll::Any => {
                let rec = NodeRecord::new(mac, Origin::Any, now_ms());
                info!(%mac, "node enrolled (enroll = \"any\")");
                self.commit(&mut inner, vec![rec])?;
                Ok(BootAction::Install)
            }
            None => Ok(BootAction::Local(LocalWhy::NotEnrolled)),
            Some(r) => Ok(boot_action_of(r)),
        }
    }

    /// Enrols (or updates) nodes.
    ///
    /// # Errors
    /// A bad field, or the journal could not be written.
    pub fn enrol(&self, e: &Enrol) -> Result<Vec<Enrolled>, NodesError> {
        check_enrol(e)?;
        let now = now_ms();
        let mut inner = self.lock();
        let mut out = Vec::new();
        let mut recs = Vec::new();
        for &mac in &e.macs {
            let old = inner.nodes.get(&mac).cloned();
            let mut rec = old.clone().unwrap_or_else(|| NodeRecord::new(mac, Origin::Added, now));
            if rec.origin == Origin::Any {
                rec.origin = Origin::Added;
            }
            rec.hostname = e.hostname.clone().or(rec.hostname);
            rec.disk = e.disk.clone().or(rec.disk);
            rec.group = e.group.clone().or(rec.group);
            let outcome = match &old {
                None => "added",
                Some(o) if *o == rec => "unchanged",
                Some(_) => "updated",
            };
            if outcome != "unchanged" {
                rec.updated_ms = now;
                recs.push(rec.clone());
            }
            info!(%mac, outcome, state = rec.state.name(), "node enrolment");
            out.push(Enrolled { mac, outcome, state: rec.state.name() });
        }
        self.commit(&mut inner, recs)?;
        Ok(out)
    }

    /// Marks nodes for a new install at their next boot; returns them.
    ///
    /// # Errors
    /// [`NodesError::Unknown`] for MACs not in the book (nothing is marked then), or the
    /// journal could not be written.
    pub fn reimage(&self, sel: &Selector) -> Result<Vec<MacAddr>, NodesError> {
        let now = now_ms();
        let mut inner = self.lock();
        let macs = select(&inner.nodes, sel)?;
        let recs: Vec<NodeRecord> = macs
            .iter()
            .filter_map(|m| inner.nodes.get(m))
            .filter(|r| !r.reimage)
            .map(|r| NodeRecord { reimage: true, updated_ms: now, ..r.clone() })
            .collect();
        for r in &recs {
            info!(mac = %r.mac, was = r.state.name(), "node marked for re-imaging at its next boot");
        }
        self.commit(&mut inner, recs)?;
        Ok(macs)
    }

    /// Orders an update for the nodes among `sel` installed with `image` (their agents act at
    /// their next poll); returns the nodes ordered and those skipped (not installed, or with
    /// another image).
    ///
    /// # Errors
    /// [`NodesError::Unknown`] for MACs not in the book (nothing is ordered then), or the
    /// journal could not be written.
    pub fn order_update(&self, sel: &Selector, image: &ImageName, profile: bool) -> Result<(Vec<MacAddr>, Vec<MacAddr>), NodesError> {
        let now = now_ms();
        let mut inner = self.lock();
        let macs = select(&inner.nodes, sel)?;
        let (mut ordered, mut skipped, mut recs) = (Vec::new(), Vec::new(), Vec::new());
        for m in macs {
            let Some(r) = inner.nodes.get(&m) else { continue };
            if !matches!(&r.state, NodeState::Installed { image: i, .. } if i == image) || r.reimage {
                skipped.push(m);
                continue;
            }
            ordered.push(m);
            let order = UpdateOrder { profile: profile || r.update.as_ref().is_some_and(|o| o.profile), at_ms: now, failures: 0 };
            info!(mac = %m, profile = order.profile, "update ordered: the node's agent applies it at its next poll");
            recs.push(NodeRecord { update: Some(order), updated_ms: now, ..r.clone() });
        }
        self.commit(&mut inner, recs)?;
        Ok((ordered, skipped))
    }

    /// A node reports the end of an update: success records its new version and clears the
    /// order; a failure is recorded and the order kept for another attempt (dropped after
    /// [`UPDATE_ATTEMPTS`]).
    ///
    /// # Errors
    /// The change could not be written.
    pub fn update_reported(&self, mac: MacAddr, r: &crate::types::node_api::UpdateResult) -> Result<(), NodesError> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(rec) = inner.nodes.get(&mac).cloned() else { return Ok(()) };
        let NodeState::Installed { image, at_ms, .. } = &rec.state else { return Ok(()) };
        let mut error = r.error.clone();
        if let Some(e) = error.as_mut().filter(|e| e.len() > MAX_ERROR) {
            let mut cut = MAX_ERROR;
            while !e.is_char_boundary(cut) {
                cut -= 1;
            }
            e.truncate(cut);
        }
        let outcome = UpdateOutcome {
            ok: r.ok,
            from: r.from_manifest_sha256.clone(),
            to: r.manifest_sha256.clone(),
            added: r.added,
            changed: r.changed,
            deleted: r.deleted,
            fetched_bytes: r.fetched_bytes,
            error,
            at_ms: now,
        };
        let manifest = (!r.manifest_sha256.is_empty()).then(|| r.manifest_sha256.clone());
        let state = NodeState::Installed { image: image.clone(), manifest: manifest.or_else(|| match &rec.state {
            NodeState::Installed { manifest, .. } => manifest.clone(),
            _ => None,
        }), at_ms: *at_ms };
        let update = match (&rec.update, r.ok) {
            (_, true) | (None, false) => None,
            (Some(o), false) if o.failures + 1 >= UPDATE_ATTEMPTS => {
                warn!(%mac, attempts = o.failures + 1, "update failed again: order dropped (`node update` orders it again)");
                None
            }
            (Some(o), false) => Some(UpdateOrder { failures: o.failures + 1, ..o.clone() }),
        };
        if r.ok {
            info!(%mac, from = %r.from_manifest_sha256, to = %r.manifest_sha256, added = r.added, changed = r.changed, deleted = r.deleted, "node updated");
        } else {
            warn!(%mac, error = r.error.as_deref().unwrap_or("?"), "node update failed");
        }
        self.commit(&mut inner, vec![NodeRecord { state, update, last_update: Some(outcome), updated_ms: now, ..rec }])
    }

    /// A node's installer asks for its plan of `image`: allowed for an enrolled node that is
    /// not installed (or is marked for re-imaging), which is then `installing`.
    ///
    /// # Errors
    /// The change could not be written (the plan must not go out then).
    pub fn plan_fetched(&self, mac: MacAddr, image: &ImageName) -> Result<PlanGate, NodesError> {
        let now = now_ms();
        let mut inner = self.lock();
        let rec = match inner.nodes.get(&mac) {
            None if self.mode == Enroll::Any => NodeRecord::new(mac, Origin::Any, now),
            None => return Ok(PlanGate::NotEnrolled),
            Some(r) => r.clone(),
        };
        if let (NodeState::Installed { image, .. }, false) = (&rec.state, rec.reimage) {
            return Ok(PlanGate::Installed(image.clone()));
        }
        if matches!(&rec.state, NodeState::Installing { image: i, .. } if i == image) && !rec.reimage {
            // A retry of the same install (installer restarted): no new line.
            return Ok(PlanGate::Allowed(rec));
        }
        let rec = NodeRecord { state: NodeState::Installing { image: image.clone(), since_ms: now }, reimage: false, updated_ms: now, ..rec };
        self.commit(&mut inner, vec![rec.clone()])?;
        Ok(PlanGate::Allowed(rec))
    }

    /// An installer's report: reaching `seeding` or `done` makes the node `installed` (its disk
    /// is complete and bootable then), `failed` makes it `failed`. Other phases change nothing.
    ///
    /// # Errors
    /// The change could not be written.
    pub fn reported(&self, mac: MacAddr, phase: Phase, error: Option<&str>, manifest: Option<&str>) -> Result<(), NodesError> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(rec) = inner.nodes.get(&mac).cloned() else { return Ok(()) };
        let state = match (phase, &rec.state) {
            (Phase::Seeding | Phase::Done, NodeState::Installing { image, .. }) => {
                NodeState::Installed { image: image.clone(), manifest: manifest.map(str::to_owned), at_ms: now }
            }
            (Phase::Failed, NodeState::Installing { .. } | NodeState::Enrolled) => {
                let mut e = error.unwrap_or("failed (no reason given)").to_owned();
                if e.len() > MAX_ERROR {
                    let mut cut = MAX_ERROR;
                    while !e.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    e.truncate(cut);
                }
                NodeState::Failed { error: e, at_ms: now }
            }
            _ => return Ok(()),
        };
        let installs = rec.installs + u32::from(matches!(state, NodeState::Installed { .. }));
        match &state {
            NodeState::Installed { image, .. } => info!(%mac, %image, "node installed: its next boot is from its disk"),
            NodeState::Failed { error, .. } => warn!(%mac, error, "node install failed: its next boot runs the installer again"),
            _ => {}
        }
        self.commit(&mut inner, vec![NodeRecord { state, installs, updated_ms: now, ..rec }])
    }
}

/// The MACs a selector names (all of them must be in the book).
fn select(nodes: &BTreeMap<MacAddr, NodeRecord>, sel: &Selector) -> Result<Vec<MacAddr>, NodesError> {
    Ok(match sel {
        Selector::Macs(m) => {
            let unknown: Vec<MacAddr> = m.iter().filter(|m| !nodes.contains_key(m)).copied().collect();
            if !unknown.is_empty() {
                return Err(NodesError::Unknown(unknown));
            }
            m.clone()
        }
        Selector::Group(g) => nodes.values().filter(|n| n.group.as_deref() == Some(g)).map(|n| n.mac).collect(),
        Selector::All => nodes.keys().copied().collect(),
    })
}

fn boot_action_of(r: &NodeRecord) -> BootAction {
    match (&r.state, r.reimage) {
        (NodeState::Installed { image, at_ms, .. }, false) => {
            BootAction::Local(LocalWhy::Installed { image: image.clone(), at_ms: *at_ms })
        }
        _ => BootAction::Install,
    }
}

fn enrolment_event(r: &NodeRecord) -> NodeEvent {
    NodeEvent::Enrolment { mac: r.mac, state: r.enrolment(), hostname: r.hostname.clone() }
}

/// Writes the compacted journal next to `path` and renames it over; returns it open for appends.
fn write_compacted(path: &Path, nodes: &BTreeMap<MacAddr, NodeRecord>) -> Result<File, NodesError> {
    let io = |p: &Path| {
        let path = p.to_owned();
        move |source| NodesError::Io { path, source }
    };
    let tmp = path.with_extension("journal.tmp");
    let mut buf = Vec::new();
    for r in nodes.values() {
        buf.extend(encode(&Line { set: Some(r.clone()), remove: None }));
    }
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&buf).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    OpenOptions::new().append(true).open(path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }
    fn img() -> ImageName {
        "demo".parse().unwrap()
    }
    fn res(n: u8, host: &str) -> Reservation {
        Reservation { mac: mac(n), ip: None, hostname: Some(host.into()), loader: None, disk: None, group: Some("rack1".into()) }
    }

    #[test]
    fn install_once_then_local_until_reimaged() {
        let book = NodeBook::in_memory(Enroll::Listed);
        assert_eq!(book.boot_action(mac(1)).unwrap(), BootAction::Local(LocalWhy::NotEnrolled));
        assert_eq!(book.plan_fetched(mac(1), &img()).unwrap(), PlanGate::NotEnrolled);
        book.enrol(&Enrol { macs: vec![mac(1)], ..Default::default() }).unwrap();
        assert_eq!(book.boot_action(mac(1)).unwrap(), BootAction::Install);
        assert!(matches!(book.plan_fetched(mac(1), &img()).unwrap(), PlanGate::Allowed(_)));
        book.reported(mac(1), Phase::Downloading, None, None).unwrap();
        assert_eq!(book.get(mac(1)).unwrap().state.name(), "installing");
        book.reported(mac(1), Phase::Seeding, None, Some("abc")).unwrap();
        let r = book.get(mac(1)).unwrap();
        assert!(matches!(&r.state, NodeState::Installed { manifest: Some(m), .. } if m == "abc"), "{r:?}");
        assert_eq!(r.installs, 1);
        assert!(matches!(book.boot_action(mac(1)).unwrap(), BootAction::Local(LocalWhy::Installed { .. })));
        assert_eq!(book.plan_fetched(mac(1), &img()).unwrap(), PlanGate::Installed(img()));
        // A later `done` does not count a second install.
        book.reported(mac(1), Phase::Done, None, None).unwrap();
        assert_eq!(book.get(mac(1)).unwrap().installs, 1);
        assert!(matches!(book.reimage(&Selector::Macs(vec![mac(2)])), Err(NodesError::Unknown(m)) if m == [mac(2)]));
        assert_eq!(book.reimage(&Selector::Macs(vec![mac(1)])).unwrap(), [mac(1)]);
        assert_eq!(book.get(mac(1)).unwrap().enrolment(), Enrolment::Reimage);
        assert_eq!(book.boot_action(mac(1)).unwrap(), BootAction::Install);
        assert!(matches!(book.plan_fetched(mac(1), &img()).unwrap(), PlanGate::Allowed(r) if !r.reimage));
        book.reported(mac(1), Phase::Failed, Some("disk too small"), None).unwrap();
        assert!(matches!(book.get(mac(1)).unwrap().state, NodeState::Failed { .. }));
        assert_eq!(book.boot_action(mac(1)).unwrap(), BootAction::Install, "a failed node tries again");
    }

    #[test]
    fn updates_are_ordered_for_installed_nodes_and_recorded_when_reported() {
        use crate::types::node_api::UpdateResult;
        let dir = tempfile::tempdir().unwrap();
        let book = NodeBook::open(dir.path(), Enroll::Listed, &[]).unwrap();
        book.enrol(&Enrol { macs: vec![mac(1), mac(2)], group: Some("web".into()), ..Default::default() }).unwrap();
        book.plan_fetched(mac(1), &img()).unwrap();
        book.reported(mac(1), Phase::Done, None, Some(&"1".repeat(64))).unwrap();
        let (ordered, skipped) = book.order_update(&Selector::Group("web".into()), &img(), true).unwrap();
        assert_eq!((ordered, skipped), (vec![mac(1)], vec![mac(2)]), "only installed nodes are ordered");
        assert!(matches!(book.order_update(&Selector::Macs(vec![mac(9)]), &img(), false), Err(NodesError::Unknown(_))));
        let o = book.get(mac(1)).unwrap().update.unwrap();
        assert!(o.profile && o.failures == 0);
        // Failures keep the order until the last attempt, and the version.
        let bad = UpdateResult { ok: false, from_manifest_sha256: "1".repeat(64), manifest_sha256: "1".repeat(64), error: Some("fetch: appliance gone".into()), ..Default::default() };
        for i in 1..UPDATE_ATTEMPTS {
            book.update_reported(mac(1), &bad).unwrap();
            assert_eq!(book.get(mac(1)).unwrap().update.unwrap().failures, i);
        }
        book.update_reported(mac(1), &bad).unwrap();
        let r = book.get(mac(1)).unwrap();
        assert!(r.update.is_none() && r.last_update.as_ref().is_some_and(|u| !u.ok), "{r:?}");
        // Ordered again, and done: the new version is the record's, across a restart.
        assert_eq!(book.order_update(&Selector::All, &"other".parse().unwrap(), false).unwrap().0, [] as [MacAddr; 0], "another image's nodes are not ordered");
        book.order_update(&Selector::All, &img(), false).unwrap();
        let good = UpdateResult { ok: true, from_manifest_sha256: "1".repeat(64), manifest_sha256: "2".repeat(64), added: 3, ..Default::default() };
        book.update_reported(mac(1), &good).unwrap();
        drop(book);
        let book = NodeBook::open(dir.path(), Enroll::Listed, &[]).unwrap();
        let r = book.get(mac(1)).unwrap();
        assert!(matches!(&r.state, NodeState::Installed { manifest: Some(m), .. } if *m == "2".repeat(64)), "{r:?}");
        assert!(r.update.is_none() && r.last_update.as_ref().is_some_and(|u| u.ok && u.added == 3));
        assert_eq!(book.boot_action(mac(1)).unwrap(), BootAction::Local(LocalWhy::Installed { image: img(), at_ms: match r.state { NodeState::Installed { at_ms, .. } => at_ms, _ => 0 } }));
        // A node that is not installed reports nothing into its record.
        book.update_reported(mac(2), &good).unwrap();
        assert!(book.get(mac(2)).unwrap().last_update.is_none());
    }

    #[test]
    fn enroll_any_enrols_at_the_boot_script() {
        let book = NodeBook::in_memory(Enroll::Any);
        assert_eq!(book.boot_action(mac(9)).unwrap(), BootAction::Install);
        assert_eq!(book.get(mac(9)).unwrap().origin, Origin::Any);
        assert!(matches!(book.plan_fetched(mac(8), &img()).unwrap(), PlanGate::Allowed(_)));
    }

    #[test]
    fn enrolment_fields_are_checked() {
        let book = NodeBook::in_memory(Enroll::Listed);
        let bad = [
            Enrol { macs: vec![], ..Default::default() },
            Enrol { macs: vec![mac(1), mac(2)], hostname: Some("a".into()), ..Default::default() },
            Enrol { macs: vec![mac(1)], hostname: Some("a b".into()), ..Default::default() },
            Enrol { macs: vec![mac(1)], hostname: Some("-a".into()), ..Default::default() },
            Enrol { macs: vec![mac(1)], disk: Some("vda".into()), ..Default::default() },
            Enrol { macs: vec![mac(1)], disk: Some("/dev/../etc".into()), ..Default::default() },
            Enrol { macs: vec![mac(1)], group: Some("x/y".into()), ..Default::default() },
        ];
        for e in bad {
            assert!(book.enrol(&e).is_err(), "{e:?}");
        }
        assert!(book.list().is_empty());
        let out = book.enrol(&Enrol { macs: vec![mac(1), mac(2)], group: Some("r1".into()), ..Default::default() }).unwrap();
        assert_eq!(out.iter().map(|o| o.outcome).collect::<Vec<_>>(), ["added", "added"]);
        let out = book.enrol(&Enrol { macs: vec![mac(1)], group: Some("r1".into()), ..Default::default() }).unwrap();
        assert_eq!(out[0].outcome, "unchanged");
        assert_eq!(book.reimage(&Selector::Group("r1".into())).unwrap().len(), 2);
        assert_eq!(book.reimage(&Selector::Group("none".into())).unwrap().len(), 0);
    }

    #[test]
    fn the_journal_survives_restarts_torn_tails_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let listed = [res(1, "n1"), res(2, "n2")];
        {
            let book = NodeBook::open(dir.path(), Enroll::Listed, &listed).unwrap();
            book.enrol(&Enrol { macs: vec![mac(3)], hostname: Some("n3".into()), ..Default::default() }).unwrap();
            book.plan_fetched(mac(1), &img()).unwrap();
            book.reported(mac(1), Phase::Seeding, None, Some("d1")).unwrap();
            book.plan_fetched(mac(2), &img()).unwrap();
        }
        let path = dir.path().join(JOURNAL);
        // A torn append at the end.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"0000abcd {\"set\":{\"mac\":\"52:54").unwrap();
        drop(f);
        let book = NodeBook::open(dir.path(), Enroll::Listed, &listed).unwrap();
        assert!(matches!(book.get(mac(1)).unwrap().state, NodeState::Installed { .. }));
        assert_eq!(book.get(mac(2)).unwrap().state.name(), "installing");
        assert_eq!(book.get(mac(3)).unwrap().hostname.as_deref(), Some("n3"));
        book.reimage(&Selector::Macs(vec![mac(1)])).unwrap();
        drop(book);
        // Damage in the middle: that line is lost, every other one is recovered.
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let mut damaged = lines.clone();
        let broken = damaged[1].replace("n2", "nX");
        damaged[1] = &broken;
        fs::write(&path, damaged.join("\n") + "\n").unwrap();
        let book = NodeBook::open(dir.path(), Enroll::Listed, &listed).unwrap();
        assert!(book.get(mac(1)).unwrap().reimage, "the line after the damage is recovered");
        assert_eq!(book.get(mac(2)).unwrap().state.name(), "enrolled", "the damaged line's node is back from the config");
        assert_eq!(book.get(mac(3)).unwrap().hostname.as_deref(), Some("n3"));
        let aside: Vec<_> = fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("damaged")).collect();
        assert_eq!(aside.len(), 1, "the damaged journal is kept aside");
        drop(book);
        // A reservation removed from the config un-enrols its node; added ones stay.
        let book = NodeBook::open(dir.path(), Enroll::Listed, &listed[..1]).unwrap();
        assert!(book.get(mac(2)).is_none());
        assert!(book.get(mac(3)).is_some());
    }

    #[test]
    fn replay_skips_bad_lines_and_keeps_going() {
        let a = NodeRecord::new(mac(1), Origin::Added, 1);
        let b = NodeRecord::new(mac(2), Origin::Added, 2);
        let mut bytes = encode(&Line { set: Some(a.clone()), remove: None });
        bytes.extend(b"zzzzzzzz not json\n");
        bytes.extend(b"\n");
        bytes.extend(encode(&Line { set: Some(b.clone()), remove: None }));
        bytes.extend(encode(&Line { set: None, remove: Some(mac(1)) }));
        let mut nodes = BTreeMap::new();
        let r = replay(&bytes, &mut nodes);
        assert_eq!((r.applied, r.damaged, r.torn_tail), (3, 1, false));
        assert_eq!(nodes.into_values().collect::<Vec<_>>(), [b]);
    }
}
