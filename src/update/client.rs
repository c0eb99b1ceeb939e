//! The installed node's side of updates over the swarm (`si-appliance update --server`, and the
//! agent `si-appliance update --watch` the installer enables): ask the appliance
//! (`GET /api/nodes/<mac>/update?have=<installed manifest digest>`, the node's token) what to
//! run, and when there is something to do:
//!
//! 1. a target version: its manifest (`GET …/update/manifest`) is checked against the offer's
//!    `manifest_sha256` and planned against the installed manifest before any byte is fetched;
//!    the archive comes through the swarm ([`SwarmStream`], bound to the interface that has the
//!    node's MAC) into `<root>/.si-appliance/` (the root's own file system, so [`super::apply`]
//!    renames from there); once complete it is applied while the node keeps seeding it to the
//!    other nodes; a fetch that fails (appliance gone, stall) leaves the tree untouched and says
//!    so;
//! 2. the group's profile steps (`node update --profile`), on the live system
//!    ([`crate::install::profile::run_step_live`]);
//! 3. one [`UpdateResult`] POSTed back, then seeding until the appliance says the swarm is done
//!    (bounded), and the archive deleted.
//!
//! [`decide`] is the pure rule of what an offer asks for; the agent acts only on `ordered`
//! offers, the one-shot command on any. Owns: `node.json` (the credentials the installer
//! writes, mode 0600). Must not: touch the tree other than through [`super::apply`].

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Excludes, Installed, Plan, UpdateError, STATE_DIR, WORK_DIR};
use crate::image::manifest::Manifest;
use crate::install::profile;
use crate::net::http_client::{self, HttpError, Request};
use crate::swarm::fetch::{FetchError, StreamOptions, SwarmStream};
use crate::types::node_api::{NodeCredentials, NodeProfile, ProfileStep, UpdateKind, UpdateOffer, UpdateResult, UpdateTarget};
use crate::types::MacAddr;

/// Errors of the node's update client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `node.json` is missing or does not parse.
    #[error("{path}: {why}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// `node.json` can be read by others than its owner.
    #[error("{path} is readable by group or others (mode {mode:o}): it holds the node's token; chmod 600 it")]
    CredentialsMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No installed record: the node does not know what it runs.
    #[error("no installed record under {root} (var/lib/si-appliance/installed.json): this tree was not installed by si-appliance")]
    NoRecord {
        /// The root.
        root: PathBuf,
    },
    /// An HTTP exchange with the appliance failed.
    #[error(transparent)]
    Http(Box<HttpError>),
    /// The appliance answered with an error status.
    #[error("{what}: the appliance answers {status} ({body})")]
    Status {
        /// Which request.
        what: &'static str,
        /// Its status.
        status: u16,
        /// The start of its body.
        body: String,
    },
    /// The appliance's JSON does not parse.
    #[error("{what}: unreadable answer")]
    Parse {
        /// Which request.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest served is not the one offered.
    #[error("the offered manifest hashes to {got}, the offer says {want} (nothing was changed)")]
    ManifestDigest {
        /// From the offer.
        want: String,
        /// Computed.
        got: String,
    },
    /// The manifest does not parse.
    #[error("the offered manifest")]
    Manifest(#[source] crate::image::ImageError),
    /// The offer cannot be applied to this node.
    #[error("the offer cannot be applied: {0}")]
    Refused(String),
    /// Planning or applying.
    #[error(transparent)]
    Update(Box<UpdateError>),
    /// Joining the swarm failed.
    #[error("fetching {name} through the swarm (nothing was changed)")]
    Fetch {
        /// The archive's swarm name.
        name: String,
        /// The cause.
        #[source]
        source: Box<FetchError>,
    },
    /// The download stopped.
    #[error("fetching {name} through the swarm: {why} (nothing was changed)")]
    Download {
        /// The archive's swarm name.
        name: String,
        /// Why.
        why: String,
    },
    /// Stopped by a signal.
    #[error("interrupted")]
    Interrupted,
    /// A blocking step panicked.
    #[error("{0}: worker thread failed")]
    Join(&'static str),
}

impl From<HttpError> for ClientError {
    fn from(e: HttpError) -> ClientError {
        ClientError::Http(Box::new(e))
    }
}

impl From<UpdateError> for ClientError {
    fn from(e: UpdateError) -> ClientError {
        ClientError::Update(Box::new(e))
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ClientError + 'a {
    move |source| ClientError::Io { op, path: path.to_owned(), source }
}

/// The error and its causes on one line (`a: b: c`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Credentials.

/// `<root>/var/lib/si-appliance/node.json`.
pub fn credentials_path(root: &Path) -> PathBuf {
    root.join(STATE_DIR).join("node.json")
}

/// Writes `node.json` (mode 0600, temp + rename).
///
/// # Errors
/// [`ClientError::Io`].
pub fn write_credentials(root: &Path, c: &NodeCredentials) -> Result<(), ClientError> {
    let dir = root.join(STATE_DIR);
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let mut text = serde_json::to_vec_pretty(c).unwrap_or_default();
    text.push(b'\n');
    crate::private_file::write(&credentials_path(root), &text).map_err(|(path, e)| io("writing", &path)(e))
}

/// Reads `node.json`, refusing a file others may read.
///
/// # Errors
/// [`ClientError::Credentials`], [`ClientError::CredentialsMode`].
pub fn read_credentials(root: &Path) -> Result<NodeCredentials, ClientError> {
    let path = credentials_path(root);
    let bad = |why: String| ClientError::Credentials { path: path.clone(), why };
    let meta = std::fs::metadata(&path).map_err(|e| bad(e.to_string()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ClientError::CredentialsMode { path, mode });
    }
    let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))
}

/// The credentials to use: `node.json` under `root` with the flags laid over it (all three
/// flags given: the file is not needed).
///
/// # Errors
/// As [`read_credentials`] when the file is needed.
pub fn resolve(root: &Path, server: Option<SocketAddr>, mac: Option<MacAddr>, token: Option<String>) -> Result<NodeCredentials, ClientError> {
    let file = match (server, mac, &token) {
        (Some(_), Some(_), Some(_)) if !credentials_path(root).exists() => None,
        _ => Some(read_credentials(root)?),
    };
    let mut c = match file {
        Some(c) => c,
        None => NodeCredentials { server: server.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))), mac: mac.unwrap_or(MacAddr([0; 6])), token: String::new(), iface: None },
    };
    if let Some(s) = server {
        c.server = s;
    }
    if let Some(m) = mac {
        c.mac = m;
    }
    if let Some(t) = token {
        c.token = t;
    }
    Ok(c)
}

/// The interface whose hardware address is `mac`, from `sys_net` (`/sys/class/net`):
/// interfaces enslaved to another (`master` link: a bridge or bond port) are skipped, since the
/// address lives on their master, which has the same MAC.
pub fn iface_by_mac(sys_net: &Path, mac: MacAddr) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_net).ok()?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names.into_iter().find(|n| {
        let d = sys_net.join(n);
        let has = std::fs::read_to_string(d.join("address")).ok().and_then(|a| a.trim().parse::<MacAddr>().ok()) == Some(mac);
        has && std::fs::symlink_metadata(d.join("master")).is_err()
    })
}

/// The installed manifest's digest, from `installed.json`.
///
/// # Errors
/// [`ClientError::NoRecord`] or [`ClientError::Credentials`]-like parse errors as `Io`.
pub fn installed_digest(root: &Path) -> Result<Installed, ClientError> {
    let (json, _) = super::installed_paths(root);
    let bytes = match std::fs::read(&json) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ClientError::NoRecord { root: root.to_owned() }),
        Err(source) => return Err(ClientError::Io { op: "reading", path: json, source }),
    };
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Credentials { path: json, why: e.to_string() })
}

// ---------------------------------------------------------------------------------------------
// What an offer asks for (pure).

/// What to do with an offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing (why, in words).
    Idle(String),
    /// The offer cannot be carried out here (why); reported when it was ordered.
    Refuse(String),
    /// Update to `target` (when some), then run `profile` (when some).
    Act {
        /// The version to fetch and apply.
        target: Option<UpdateTarget>,
        /// The steps to run again.
        profile: Option<NodeProfile>,
    },
}

/// The rule: the agent (`asked` false) acts only on `ordered` offers, the one-shot command on
/// any; a target the node already runs is no target; a diff against another base than `have`
/// is refused (applying it would fail with `WrongBase` after fetching it).
pub fn decide(offer: &UpdateOffer, have: &str, asked: bool) -> Decision {
    if !offer.ordered && !asked {
        return Decision::Idle("no update ordered".into());
    }
    let target = offer.target.clone().filter(|t| t.manifest_sha256 != have);
    if let Some(t) = &target {
        if t.kind == UpdateKind::Diff {
            match &t.base_manifest_sha256 {
                Some(b) if b == have => {}
                Some(b) => return Decision::Refuse(format!("the offered diff {} is against manifest {b}, this node runs {have}", t.name)),
                None => return Decision::Refuse(format!("the offered diff {} names no base manifest", t.name)),
            }
        }
    }
    if target.is_none() && offer.profile.is_none() {
        let why = if offer.target.is_some() { "already runs the offered version" } else { "up to date" };
        return Decision::Idle(why.into());
    }
    Decision::Act { target, profile: offer.profile.clone() }
}

/// Checks the served manifest against the offer's digest, then parses it.
///
/// # Errors
/// [`ClientError::ManifestDigest`], [`ClientError::Manifest`].
pub fn check_manifest(bytes: &[u8], want: &str) -> Result<Manifest, ClientError> {
    use sha2::Digest as _;
    let got = hex::encode(sha2::Sha256::digest(bytes));
    if !got.eq_ignore_ascii_case(want) {
        return Err(ClientError::ManifestDigest { want: want.to_owned(), got });
    }
    Manifest::parse(bytes, Path::new("offered manifest")).map_err(ClientError::Manifest)
}

// ---------------------------------------------------------------------------------------------
// The node API.

const API_LIMIT: Duration = Duration::from_secs(20);
/// Largest manifest accepted (one line per entry: ~200 bytes × a million entries).
const MANIFEST_MAX: usize = 256 << 20;

/// The appliance, as this node speaks to it.
#[derive(Clone, Debug)]
pub struct Api {
    /// Address and identity.
    pub creds: NodeCredentials,
}

impl Api {
    async fn call(&self, what: &'static str, method: &'static str, path: &str, json: Option<&[u8]>, max: usize, limit: Duration) -> Result<Vec<u8>, ClientError> {
        let req = Request { method, path, bearer: Some(&self.creds.token), json };
        let a = http_client::request(self.creds.server, req, max, limit).await?;
        if !(200..300).contains(&a.status) {
            return Err(ClientError::Status { what, status: a.status, body: http_client::excerpt(&a.body) });
        }
        Ok(a.body)
    }

    /// `GET /api/nodes/<mac>/update?have=…[&asked=1]`.
    ///
    /// # Errors
    /// [`ClientError::Http`], [`ClientError::Status`], [`ClientError::Parse`].
    pub async fn offer(&self, have: &str, asked: bool) -> Result<UpdateOffer, ClientError> {
        let path = format!("/api/nodes/{}/update?have={have}{}", self.creds.mac, if asked { "&asked=1" } else { "" });
        let body = self.call("update offer", "GET", &path, None, 1 << 20, API_LIMIT).await?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Parse { what: "update offer", source })
    }

    /// `GET /api/nodes/<mac>/update/manifest`, checked against `want`.
    ///
    /// # Errors
    /// As [`Api::offer`], and [`check_manifest`]'s.
    pub async fn manifest(&self, want: &str) -> Result<Manifest, ClientError> {
        let path = format!("/api/nodes/{}/update/manifest", self.creds.mac);
        let body = self.call("offered manifest", "GET", &path, None, MANIFEST_MAX, Duration::from_secs(120)).await?;
        check_manifest(&body, want)
    }

    /// `POST /api/nodes/<mac>/update` (tried 3 times, 2 s apart).
    ///
    /// # Errors
    /// The last attempt's.
    pub async fn report(&self, r: &UpdateResult) -> Result<(), ClientError> {
        let path = format!("/api/nodes/{}/update", self.creds.mac);
        let body = serde_json::to_vec(r).unwrap_or_default();
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            match self.call("update result", "POST", &path, Some(&body), 1 << 16, API_LIMIT).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    warn!("reporting the update result: {}", chain(&e));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(ClientError::Interrupted))
    }
}

// ---------------------------------------------------------------------------------------------
// Acting on an offer.

/// How the client runs.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The installed system's root (`/`).
    pub root: PathBuf,
    /// Where the interfaces are listed (`/sys/class/net`).
    pub sys_net: PathBuf,
    /// Bind the swarm to this interface instead of the one with the node's MAC.
    pub iface: Option<String>,
    /// TCP port for incoming peers.
    pub listen_port: u16,
    /// The paths never touched.
    pub excludes: Excludes,
    /// Give up a download that makes no progress this long.
    pub stall_limit: Duration,
    /// Seed at most this long after the update (the appliance's limit applies when shorter).
    pub seed_limit: Duration,
}

/// What the one-shot command did.
#[derive(Clone, Debug)]
pub enum OneShot {
    /// Nothing to do (why).
    Idle(String),
    /// `--dry-run`: the plan against the offered manifest (nothing fetched or changed).
    DryRun {
        /// The offered target.
        target: UpdateTarget,
        /// What would change.
        plan: Plan,
        /// Profile steps that would run.
        steps: Vec<String>,
    },
    /// Done (or failed: `ok` false), as reported.
    Done(UpdateResult),
}

/// Asks once (`asked=1`) and acts on the answer. With `dry_run` prints nothing itself: returns
/// the plan.
///
/// # Errors
/// [`ClientError`] before anything was asked or for a refused offer; an update that fails is an
/// `Ok(OneShot::Done)` with `ok: false` (it was reported).
pub async fn once(opts: &ClientOptions, creds: &NodeCredentials, dry_run: bool, token: &CancellationToken) -> Result<OneShot, ClientError> {
    let api = Api { creds: creds.clone() };
    let have = installed_digest(&opts.root)?.manifest_sha256;
    let offer = api.offer(&have, true).await?;
    match decide(&offer, &have, true) {
        Decision::Idle(why) => Ok(OneShot::Idle(why)),
        Decision::Refuse(why) => Err(ClientError::Refused(why)),
        Decision::Act { target, profile } if dry_run => {
            let steps = profile.map(|p| p.steps.iter().map(ProfileStep::name).collect()).unwrap_or_default();
            match target {
                Some(t) => {
                    let m = api.manifest(&t.manifest_sha256).await?;
                    let base = super::installed_manifest(&opts.root)?;
                    let plan = super::plan(&base, &m, &opts.excludes)?;
                    Ok(OneShot::DryRun { target: t, plan, steps })
                }
                None => Ok(OneShot::Idle(format!("no new version; profile steps would run: {}", steps.join(", ")))),
            }
        }
        Decision::Act { target, profile } => Ok(OneShot::Done(act(opts, &api, &have, target, profile, token).await)),
    }
}

/// Shortest poll period of the agent, and the backoff bounds while the appliance is unreachable.
const POLL_MIN: Duration = Duration::from_secs(1);
const BACKOFF_START: Duration = Duration::from_secs(5);
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// Longest poll period an offer can ask for.
const POLL_MAX: Duration = Duration::from_secs(3600);

/// The agent: asks every `poll` (default: the offer's `poll_secs`), backs off (5 s doubling to
/// 5 min) while the appliance is unreachable, acts on ordered offers. Returns when `token` is
/// cancelled.
///
/// # Errors
/// [`ClientError::NoRecord`] (nothing can ever be updated here).
pub async fn watch(opts: &ClientOptions, creds: &NodeCredentials, poll: Option<Duration>, token: &CancellationToken) -> Result<(), ClientError> {
    let api = Api { creds: creds.clone() };
    installed_digest(&opts.root)?;
    info!(server = %creds.server, mac = %creds.mac, "update agent: asking the appliance for ordered updates");
    let mut backoff = BACKOFF_START;
    let mut refused: Option<String> = None;
    loop {
        let have = installed_digest(&opts.root)?.manifest_sha256;
        let wait = match api.offer(&have, false).await {
            Ok(offer) => {
                backoff = BACKOFF_START;
                match decide(&offer, &have, false) {
                    Decision::Idle(_) => refused = None,
                    Decision::Refuse(why) => {
                        // Said once per offer, not at every poll.
                        if refused.as_deref() != Some(why.as_str()) {
                            warn!("{why}");
                            let r = UpdateResult { ok: false, from_manifest_sha256: have.clone(), manifest_sha256: have.clone(), error: Some(why.clone()), ..UpdateResult::default() };
                            let _ = api.report(&r).await;
                            refused = Some(why);
                        }
                    }
                    Decision::Act { target, profile } => {
                        refused = None;
                        let r = act(opts, &api, &have, target, profile, token).await;
                        if !r.ok {
                            warn!("update failed, tried again at a later poll: {}", r.error.as_deref().unwrap_or("?"));
                        }
                    }
                }
                poll.unwrap_or(Duration::from_secs(offer.poll_secs)).clamp(POLL_MIN, POLL_MAX)
            }
            Err(e) => {
                warn!("asking {} for updates: {}; again in {} s", creds.server, chain(&e), backoff.as_secs());
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_CAP);
                w
            }
        };
        tokio::select! {
            // CANCEL-SAFETY: a sleep and a cancellation hold nothing.
            _ = tokio::time::sleep(wait) => {}
            _ = token.cancelled() => return Ok(()),
        }
    }
}

/// Carries out an offer and reports it; never fails: the result says what happened.
async fn act(opts: &ClientOptions, api: &Api, have: &str, target: Option<UpdateTarget>, profile: Option<NodeProfile>, token: &CancellationToken) -> UpdateResult {
    let t0 = Instant::now();
    let mut res = UpdateResult { ok: true, from_manifest_sha256: have.to_owned(), manifest_sha256: have.to_owned(), ..UpdateResult::default() };
    let root_mtime = mtime_of(&opts.root);
    let mut seeding: Option<SwarmStream> = None;
    let mut new_root_mtime = None;
    if let Some(t) = &target {
        info!(image = %t.image, name = %t.name, kind = ?t.kind, bytes = t.bytes, "updating");
        match update_to(opts, api, t, &mut res, &mut seeding, token).await {
            Ok(m) => new_root_mtime = m,
            Err(e) => {
                let why = chain(&e);
                warn!("update to {} failed: {why}", t.name);
                res.ok = false;
                res.error = Some(why);
            }
        }
    }
    if res.ok {
        if let Some(p) = &profile {
            run_profile(opts, api, p, &mut res, token).await;
        }
    }
    res.secs = t0.elapsed().as_secs_f64();
    if let Some(s) = &seeding {
        res.uploaded_bytes = s.stats().uploaded;
    }
    if let Err(e) = api.report(&res).await {
        warn!("the appliance did not take the update result: {}", chain(&e));
    }
    if let Some(s) = seeding {
        let why = s.seed_until_done(opts.seed_limit, token).await;
        info!(reason = why, uploaded = s.stats().uploaded, "stopped seeding the update");
        let file = s.file().to_owned();
        s.stop().await;
        if let Err(e) = std::fs::remove_file(&file) {
            warn!(file = %file.display(), "removing the update archive: {e}");
        }
    }
    cleanup_work(&opts.root, new_root_mtime.or(root_mtime));
    if res.ok {
        info!(manifest = %res.manifest_sha256, added = res.added, changed = res.changed, deleted = res.deleted, excluded = res.excluded,
            fetched = res.fetched_bytes, uploaded = res.uploaded_bytes, secs = format!("{:.1}", res.secs), "update done");
    }
    res
}

fn mtime_of(p: &Path) -> Option<filetime::FileTime> {
    std::fs::symlink_metadata(p).ok().map(|m| filetime::FileTime::from_last_modification_time(&m))
}

/// Removes `<root>/.si-appliance` when empty (a journal of a partial update keeps it) and gives
/// the root the mtime it should have.
fn cleanup_work(root: &Path, mtime: Option<filetime::FileTime>) {
    let work = root.join(WORK_DIR);
    let _ = std::fs::remove_dir(work.join("profile"));
    if std::fs::remove_dir(&work).is_ok() {
        if let Some(t) = mtime {
            let _ = filetime::set_symlink_file_times(root, t, t);
        }
    }
}

/// Fetch and apply; the stream is left in `seeding` (even when applying failed: the archive is
/// good and the other nodes want it). Returns the root's mtime per the target manifest.
async fn update_to(
    opts: &ClientOptions,
    api: &Api,
    t: &UpdateTarget,
    res: &mut UpdateResult,
    seeding: &mut Option<SwarmStream>,
    token: &CancellationToken,
) -> Result<Option<filetime::FileTime>, ClientError> {
    let manifest = api.manifest(&t.manifest_sha256).await?;
    let base = super::installed_manifest(&opts.root)?;
    let plan = super::plan(&base, &manifest, &opts.excludes)?;
    info!(added = plan.added.len(), changed = plan.changed.len(), deleted = plan.deleted.len(), excluded = plan.excluded.len(), "update plan");
    let iface = opts.iface.clone().or_else(|| {
        let i = iface_by_mac(&opts.sys_net, api.creds.mac);
        if i.is_none() {
            warn!(mac = %api.creds.mac, "no interface has the node's MAC: the swarm uses any address");
        }
        i
    });
    let name = t.name.to_string();
    let sopts = StreamOptions {
        server: api.creds.server,
        image: t.name.clone(),
        dir: opts.root.join(WORK_DIR),
        iface,
        listen_port: opts.listen_port,
        info_hash: None,
    };
    let stream = SwarmStream::start(&sopts, token).await.map_err(|source| ClientError::Fetch { name: name.clone(), source: Box::new(source) })?;
    if let Err(e) = wait_fetched(&stream, &name, opts.stall_limit, token).await {
        let file = stream.file().to_owned();
        stream.stop().await;
        let _ = std::fs::remove_file(&file);
        return Err(e);
    }
    let st = stream.stats();
    res.fetched_bytes = st.total;
    let file = stream.file().to_owned();
    *seeding = Some(stream);
    let (root, image, m2, x) = (opts.root.clone(), t.image.to_string(), manifest.clone(), opts.excludes.clone());
    let applied = tokio::task::spawn_blocking(move || super::apply(&root, &image, &file, &m2, &x)).await.map_err(|_| ClientError::Join("applying"))??;
    res.added = applied.plan.added.len() as u64;
    res.changed = applied.plan.changed.len() as u64;
    res.deleted = applied.plan.deleted.len() as u64;
    res.excluded = applied.plan.excluded.len() as u64;
    res.manifest_sha256 = applied.manifest_sha256;
    for d in &applied.kept_dirs {
        warn!(path = d, "deleted from the image but holds other files: kept");
    }
    Ok(manifest.entries.iter().find(|e| e.path == ".").map(|e| filetime::FileTime::from_unix_time(e.mtime, e.mtime_ns)))
}

/// Waits for every piece, giving up on an engine error or `stall` without progress.
async fn wait_fetched(s: &SwarmStream, name: &str, stall: Duration, token: &CancellationToken) -> Result<(), ClientError> {
    let done = s.wait_complete();
    tokio::pin!(done);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last_have, mut last_progress) = (0u64, Instant::now());
    let mut n = 0u32;
    loop {
        tokio::select! {
            // CANCEL-SAFETY: `done` is pinned outside the loop and polled by reference; a tick
            // and a cancellation hold nothing.
            biased;
            _ = token.cancelled() => return Err(ClientError::Interrupted),
            r = &mut done => return r.map_err(|source| ClientError::Fetch { name: name.to_owned(), source: Box::new(source) }),
            _ = tick.tick() => {
                let st = s.stats();
                if let Some(e) = st.error {
                    return Err(ClientError::Download { name: name.to_owned(), why: e });
                }
                if st.have > last_have {
                    (last_have, last_progress) = (st.have, Instant::now());
                } else if last_progress.elapsed() > stall {
                    return Err(ClientError::Download { name: name.to_owned(), why: format!("no progress for {stall:?} ({} of {} bytes)", st.have, st.total) });
                }
                n += 1;
                if n.is_multiple_of(5) {
                    info!(name, have = st.have, total = st.total, peers = st.peers, uploaded = st.uploaded, "fetching the update");
                }
            }
        }
    }
}

/// The group's overlay (over the root) and steps (on the live system), each step's report in
/// `res`; the first failing step stops them and fails the result with its name.
async fn run_profile(opts: &ClientOptions, api: &Api, p: &NodeProfile, res: &mut UpdateResult, token: &CancellationToken) {
    let papi = profile::Api { server: api.creds.server, mac: api.creds.mac, token: api.creds.token.clone() };
    let group = p.group.clone();
    if p.overlay {
        let r = match papi.overlay(&group).await {
            Ok(tar) => {
                let (g, root) = (group.clone(), opts.root.clone());
                tokio::task::spawn_blocking(move || profile::apply_overlay(&g, &tar, &root)).await.unwrap_or_else(|_| {
                    Err(profile::ProfileError::Step { name: "overlay".into(), why: "worker thread failed".into() })
                })
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(n) => info!(group, entries = n, "group overlay applied"),
            Err(e) => {
                res.ok = false;
                res.error = Some(chain(&e));
                return;
            }
        }
    }
    let hostname = std::fs::read_to_string(opts.root.join("etc/hostname")).map(|h| h.trim().to_owned()).unwrap_or_default();
    let scratch = opts.root.join(WORK_DIR).join("profile");
    let n = p.steps.len();
    for (i, step) in p.steps.iter().enumerate() {
        let name = step.name();
        if token.is_cancelled() {
            res.ok = false;
            res.error = Some(format!("interrupted before profile step {name}"));
            return;
        }
        info!(group, "profile step {}/{n}: {name}", i + 1);
        let script = match step {
            ProfileStep::Script(s) => match papi.script(&group, s).await {
                Ok(b) => Some(b),
                Err(e) => {
                    let why = chain(&e);
                    res.steps.push(crate::types::node_api::StepReport { name: name.clone(), ok: false, exit_code: None, output: why.clone(), secs: 0.0 });
                    res.ok = false;
                    res.error = Some(format!("profile step {name} failed ({why})"));
                    return;
                }
            },
            _ => None,
        };
        let input = profile::StepInput {
            step: step.clone(),
            script,
            limit: Duration::from_secs(p.step_timeout_secs.max(1)),
            env: vec![("SI_GROUP", group.clone()), ("SI_HOSTNAME", hostname.clone()), ("SI_MAC", api.creds.mac.to_string())],
        };
        let sc = scratch.clone();
        let (rep, err) = match tokio::task::spawn_blocking(move || profile::run_step_live(&sc, &input)).await {
            Ok(x) => x,
            Err(_) => {
                res.ok = false;
                res.error = Some(format!("profile step {name}: worker thread failed"));
                return;
            }
        };
        res.steps.push(rep);
        if let Some(e) = err {
            res.ok = false;
            res.error = Some(e.to_string());
            return;
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
