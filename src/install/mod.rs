//! The client role, `si-appliance install`, run by the nodes' initramfs: orders from the kernel
//! command line (flags override them), the node's plan from the appliance (retried with capped
//! exponential backoff while the appliance is unreachable), then the disk: check its size,
//! partition, mkfs, mount; download through the swarm and unpack AT THE SAME TIME (the swarm
//! engine keeps the archive on the target root, the unpacker reads it from offset 0 as pieces are
//! verified, so no RAM copy is needed); per-node settings; the node's group profile (overlay and
//! post-install steps in the chroot, [`profile`]); the image's boot loader; seeding until the
//! deployment is done; unmount, sync, and the plan's finish.
//!
//! Any failure after partitioning started wipes the partition table (a half-written disk is
//! never booted) and reports `failed` with the reason. Reports never block the install.
//!
//! Owns: the step sequence and its error type. Must not: depend on appliance-only modules
//! beyond the shared node API (`types::node_api`, `types::Firmware`), the swarm's download side and the
//! image unpacker.

pub mod agent;
pub mod bootloader;
pub mod bootpeer;
pub mod cmdline;
pub mod console;
pub mod disk;
pub mod http;
pub mod profile;
pub mod report;
pub mod seal;
pub mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::image::unpack::{UnpackOptions, unpack};
use crate::types::node_api::{DiskLayout, Finish, NodePlan, Phase, TableKind};
use crate::types::Firmware;
use crate::swarm::fetch::{FetchError, StreamOptions, SwarmStream};
use crate::types::MacAddr;
use disk::DiskError;
use report::Reporter;

/// Errors of an install.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The orders file (`/proc/cmdline`) cannot be read.
    #[error("reading {path}")]
    Cmdline {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A `si.*` word is malformed.
    #[error(transparent)]
    BadWord(#[from] cmdline::BadWord),
    /// An order is missing from both the command line and the flags.
    #[error("no {0}: pass it on the kernel command line or as a flag")]
    Missing(&'static str),
    /// The appliance refused the plan request or answered nonsense.
    #[error("plan from {server}: {why}")]
    Plan {
        /// The appliance.
        server: SocketAddr,
        /// Why.
        why: String,
    },
    /// The appliance stayed unreachable.
    #[error("plan from {server}: appliance unreachable for {waited:?}, giving up")]
    Unreachable {
        /// The appliance.
        server: SocketAddr,
        /// How long it was tried.
        waited: Duration,
    },
    /// Disk steps.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The swarm download.
    #[error("swarm download")]
    Swarm(#[from] FetchError),
    /// Unpacking the archive.
    #[error("unpacking the image")]
    Unpack(#[from] crate::image::ImageError),
    /// The download made no progress for too long, or the swarm engine stopped on an error.
    #[error("download of {image}: {why}")]
    Download {
        /// The image.
        image: String,
        /// Why (printed in the message, so not chained as a source).
        why: DownloadFailure,
    },
    /// Per-node settings.
    #[error("per-node settings")]
    Settings(#[from] settings::SettingsError),
    /// The image is not the one the appliance signed (or the one the boot line pinned).
    #[error("image refused")]
    Seal(#[from] seal::SealError),
    /// The installed record, credentials or update agent could not be written.
    #[error("leaving the node's update state")]
    Agent(#[from] agent::AgentError),
    /// The group's profile (overlay or a post-install step).
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    /// Stopped by a signal.
    #[error("interrupted")]
    Interrupted,
    /// A blocking step panicked or was cancelled.
    #[error("{0}: worker thread failed")]
    Join(&'static str),
}

/// Why the swarm download of the image stopped ([`InstallError::Download`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownloadFailure {
    /// The swarm engine stopped on an error (its status reports it as text).
    #[error("swarm: {0}")]
    Swarm(String),
    /// No verified byte for `limit`.
    #[error("no progress for {limit:?} ({have} of {total} bytes)")]
    Stalled {
        /// The stall limit.
        limit: Duration,
        /// Bytes verified.
        have: u64,
        /// Bytes wanted.
        total: u64,
    },
    /// The reader saw the end of the image but the engine does not call it complete.
    #[error("read to the end but not complete")]
    Incomplete,
}

/// What the command line and flags say.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the orders are (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// Overrides `si.server`.
    pub server: Option<SocketAddr>,
    /// Overrides `si.mac`.
    pub mac: Option<MacAddr>,
    /// Overrides `si.token`.
    pub token: Option<String>,
    /// Overrides `si.disk` and the plan's disk.
    pub disk: Option<String>,
    /// Overrides `si.finish` and the plan's finish.
    pub finish: Option<Finish>,
    /// Work directory (the target root is mounted at `<workdir>/root`).
    pub workdir: PathBuf,
    /// Overrides the firmware seen in /sys/firmware/efi.
    pub firmware: Option<Firmware>,
    /// Interface for the swarm (SO_BINDTODEVICE); None: any.
    pub iface: Option<String>,
    /// TCP port for incoming peers.
    pub listen_port: u16,
    /// How long to wait for the appliance at most.
    pub plan_wait: Duration,
    /// Give up when the download makes no progress for this long.
    pub stall_limit: Duration,
    /// The appliance's image-signing public key (hex), baked into the initramfs.
    pub trust_key: PathBuf,
    /// Install even when no trusted key is there (the command line's pins still hold).
    pub allow_unsigned: bool,
}

/// Where the initramfs holds the trusted key.
pub fn default_trust_key() -> PathBuf {
    Path::new("/").join(crate::image::sign::INITRAMFS_PUB)
}

/// The outcome of a good install.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// What to do now.
    pub finish: Finish,
    /// Host name written.
    pub hostname: String,
    /// The disk written.
    pub disk: PathBuf,
    /// Archive bytes.
    pub archive_bytes: u64,
    /// Seconds per phase, in order.
    pub phase_secs: Vec<(Phase, f64)>,
    /// Bytes uploaded to other nodes.
    pub uploaded: u64,
    /// Why seeding stopped.
    pub seed_stop: &'static str,
}

/// Longest wait between two plan requests.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The resolved orders.
#[derive(Clone, Debug)]
struct Resolved {
    server: SocketAddr,
    mac: MacAddr,
    token: String,
    disk: Option<String>,
    finish: Option<Finish>,
    info_hash: Option<String>,
    manifest: Option<String>,
}

fn resolve(opts: &Options) -> Result<Resolved, InstallError> {
    let text = match std::fs::read_to_string(&opts.cmdline) {
        Ok(t) => t,
        // Without the file every order must come from the flags (tests, manual runs).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && opts.server.is_some() => String::new(),
        Err(source) => return Err(InstallError::Cmdline { path: opts.cmdline.clone(), source }),
    };
    let o = cmdline::parse(&text)?;
    Ok(Resolved {
        server: opts.server.or(o.server).ok_or(InstallError::Missing("appliance address (si.server=IP:PORT, --server)"))?,
        mac: opts.mac.or(o.mac).ok_or(InstallError::Missing("MAC address (si.mac=, --mac)"))?,
        token: opts.token.clone().or(o.token).ok_or(InstallError::Missing("node token (si.token=, --token)"))?,
        disk: opts.disk.clone().or(o.disk),
        finish: opts.finish.or(o.finish),
        info_hash: o.info_hash,
        manifest: o.manifest,
    })
}

/// The firmware this node booted with.
pub fn detect_firmware() -> Firmware {
    if Path::new("/sys/firmware/efi").exists() { Firmware::Uefi } else { Firmware::Bios }
}

/// Fetches the plan, retrying connection failures and 5xx answers with exponential backoff
/// (1 s doubling, capped at 30 s) for at most `wait`; 4xx answers are final.
async fn fetch_plan(r: &Resolved, firmware: Firmware, wait: Duration, token: &CancellationToken) -> Result<NodePlan, InstallError> {
    let path = format!("/api/nodes/{}/plan?firmware={firmware}", r.mac);
    let t0 = Instant::now();
    let mut delay = Duration::from_secs(1);
    loop {
        let why = match http::request(r.server, "GET", &path, &r.token, None, Duration::from_secs(10)).await {
            Ok(a) if a.status == 200 => {
                return serde_json::from_slice::<NodePlan>(&a.body)
                    .map_err(|e| InstallError::Plan { server: r.server, why: format!("unreadable plan: {e}") });
            }
            Ok(a) if (400..500).contains(&a.status) => {
                return Err(InstallError::Plan {
                    server: r.server,
                    why: format!("refused ({}): {}", a.status, String::from_utf8_lossy(&a.body).trim()),
                });
            }
            Ok(a) => format!("answers {} ({})", a.status, String::from_utf8_lossy(&a.body).trim()),
            Err(e) => match e.io_kind() {
                Some(std::io::ErrorKind::ConnectionRefused) => "unreachable (connection refused)".to_owned(),
                Some(k) => format!("unreachable ({k})"),
                None => format!("unreachable ({e})"),
            },
        };
        if t0.elapsed() + delay > wait {
            return Err(InstallError::Unreachable { server: r.server, waited: t0.elapsed() });
        }
        warn!("appliance {} {why}, retry in {} s", r.server, delay.as_secs());
        tokio::select! {
            // CANCEL-SAFETY: a sleep and a cancellation carry no state.
            _ = tokio::time::sleep(delay) => {}
            _ = token.cancelled() => return Err(InstallError::Interrupted),
        }
        delay = (delay * 2).min(BACKOFF_CAP);
    }
}

/// Runs the install; the caller performs [`Outcome::finish`] (see [`finish`]).
///
/// # Errors
/// [`InstallError`]; it has been reported to the appliance (best effort) and the disk wiped
/// when partitioning had started.
pub async fn run(opts: &Options, token: &CancellationToken) -> Result<Outcome, InstallError> {
    let r = resolve(opts)?;
    // Before the network is asked anything: without a trusted key nothing will be installed.
    let key = seal::trusted_key(&opts.trust_key, opts.allow_unsigned)?;
    let firmware = opts.firmware.unwrap_or_else(detect_firmware);
    info!(server = %r.server, mac = %r.mac, ?firmware, "si-appliance installer: asking the appliance for this node's plan");
    let plan = fetch_plan(&r, firmware, opts.plan_wait, token).await?;
    let reporter = Reporter::start(r.server, r.mac, r.token.clone(), Duration::from_secs(plan.report_every_secs.max(1)));
    reporter.phase(Phase::Installer, format!("plan: image {}, host name {}", plan.image, plan.hostname));
    // The kernel and initrd this node booted, fetched again, checked and served to the nodes
    // booting after it while the install runs (when the appliance uses peers; never fatal).
    let peer = plan.boot_peer_port.map(|_| {
        bootpeer::Background::start(
            bootpeer::PeerOptions { server: r.server, mac: r.mac, token: r.token.clone(), dir: bootpeer::dir_in(&opts.workdir) },
            token,
        )
    });
    let checked = match check_image(&r, &plan, key.as_ref(), token).await {
        Ok(t) => install(opts, &r, &plan, &t, firmware, &reporter, token).await,
        Err(e) => Err(e),
    };
    if let Some(p) = peer {
        p.stop().await;
    }
    match checked {
        Ok(o) => {
            let msg = format!("installed {} on {} as {}", plan.image, o.disk.display(), o.hostname);
            reporter.finish(Phase::Done, msg, None, Duration::from_secs(5)).await;
            Ok(o)
        }
        Err(e) => {
            let why = format!("{:#}", anyhow_like(&e));
            reporter.finish(Phase::Failed, "install failed".into(), Some(why), Duration::from_secs(5)).await;
            Err(e)
        }
    }
}

/// Checks before anything is written: the plan's seal, the command line's pins, the manifest.
async fn check_image(r: &Resolved, plan: &NodePlan, key: Option<&[u8; 32]>, token: &CancellationToken) -> Result<seal::Trusted, InstallError> {
    let (info_hash, manifest) = seal::check_plan(plan, key, r.info_hash.as_deref(), r.manifest.as_deref())?;
    let image = plan.image.to_string();
    let manifest = match manifest {
        Some(want) => {
            let path = format!("/manifests/{image}.manifest");
            let http_get = crate::swarm::http_get::get_retrying;
            let bytes = http_get(r.server, &path, Duration::from_secs(60), crate::swarm::http_get::RETRY_FOR, token)
                .await
                .map_err(|source| seal::SealError::Fetch { image: image.clone(), source: Box::new(source) })?;
            Some(seal::check_manifest(&image, &bytes, &want)?)
        }
        None => {
            warn!(image, "the image has no manifest: the unpacked tree cannot be verified");
            None
        }
    };
    match (&info_hash, key) {
        (Some(ih), Some(_)) => info!(image, info_hash = %ih, "image signature verified"),
        (Some(ih), None) => warn!(image, info_hash = %ih, "image NOT signature-checked (no trusted key); held to its info-hash"),
        (None, _) => warn!(image, "image NOT signature-checked and no info-hash pinned"),
    }
    Ok(seal::Trusted { info_hash: info_hash.as_deref().and_then(seal::info_hash_bytes), manifest })
}

/// The error and its causes on one line (`a: b: c`), as `{:#}` prints an anyhow chain.
fn anyhow_like(e: &InstallError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Phase timing.
struct Phases {
    at: Instant,
    current: Option<Phase>,
    done: Vec<(Phase, f64)>,
}

impl Phases {
    fn enter(&mut self, reporter: &Reporter, p: Phase, msg: String) {
        let now = Instant::now();
        if let Some(c) = self.current {
            self.done.push((c, now.duration_since(self.at).as_secs_f64()));
        }
        self.current = Some(p);
        self.at = now;
        reporter.phase(p, msg);
    }
    fn close(&mut self) -> Vec<(Phase, f64)> {
        if let Some(c) = self.current.take() {
            self.done.push((c, self.at.elapsed().as_secs_f64()));
        }
        std::mem::take(&mut self.done)
    }
}

async fn blocking<T: Send + 'static>(what: &'static str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, InstallError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| InstallError::Join(what))
}

async fn install(
    opts: &Options,
    r: &Resolved,
    plan: &NodePlan,
    trusted: &seal::Trusted,
    firmware: Firmware,
    reporter: &Reporter,
    token: &CancellationToken,
) -> Result<Outcome, InstallError> {
    let layout = plan.layout.clone();
    let need = disk::need_mib(&layout, plan.unpacked_size, plan.archive_size)?;
    let disk_path = match r.disk.clone().or_else(|| plan.disk.clone()) {
        Some(d) => PathBuf::from(d),
        None => disk::pick_disk(Path::new("/sys/block"), need << 20)?,
    };
    let have = disk::size_of(&disk_path)?;
    if have < need << 20 {
        return Err(DiskError::TooSmall { disk: disk_path, have_mib: have >> 20, need_mib: need }.into());
    }
    let mut phases = Phases { at: Instant::now(), current: None, done: Vec::new() };
    phases.enter(reporter, Phase::Partitioning, format!("partitioning {} ({} MiB, {:?})", disk_path.display(), have >> 20, layout.table));
    let root = opts.workdir.join("root");
    let result = write_disk(opts, r, plan, trusted, &layout, firmware, &disk_path, &root, reporter, &mut phases, token).await;
    match result {
        Ok((uploaded, seed_stop)) => {
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            Ok(Outcome {
                finish: r.finish.unwrap_or(plan.finish),
                hostname: plan.hostname.clone(),
                disk: disk_path,
                archive_bytes: plan.archive_size,
                phase_secs: phases.close(),
                uploaded,
                seed_stop,
            })
        }
        Err(e) => {
            warn!("install failed after partitioning started: {}", anyhow_like(&e));
            let d = disk_path.clone();
            let _ = blocking("wiping", move || disk::wipe_table(&d)).await;
            Err(e)
        }
    }
}

/// A reader that counts what passes through it.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// Everything from partitioning to the unmount; the mounts are undone on every path (drop).
#[allow(clippy::too_many_arguments)]
async fn write_disk(
    opts: &Options,
    r: &Resolved,
    plan: &NodePlan,
    trusted: &seal::Trusted,
    layout: &DiskLayout,
    firmware: Firmware,
    disk_path: &Path,
    root: &Path,
    reporter: &Reporter,
    phases: &mut Phases,
    token: &CancellationToken,
) -> Result<(u64, &'static str), InstallError> {
    let (d, l) = (disk_path.to_owned(), layout.clone());
    let parts = blocking("partitioning", move || -> Result<Vec<PathBuf>, DiskError> {
        let parts = disk::partition(&d, &l)?;
        for (dev, p) in parts.iter().zip(&l.partitions) {
            disk::mkfs(dev, p)?;
        }
        Ok(parts)
    })
    .await??;
    let mut mounts = disk::mount_layout(layout, &parts, root)?;

    // Download and unpack at the same time.
    phases.enter(reporter, Phase::Downloading, format!("downloading {} ({} bytes) through the swarm and unpacking", plan.image, plan.archive_size));
    let sopts = StreamOptions {
        server: r.server,
        image: plan.image.clone(),
        dir: store_dir(root),
        iface: opts.iface.clone(),
        listen_port: opts.listen_port,
        info_hash: trusted.info_hash,
    };
    let dl = SwarmStream::start(&sopts, token).await?;
    let result = download_and_unpack(opts, plan, &dl, root, reporter, token).await;
    let result = match (result, &trusted.manifest) {
        (Ok(xattrs_unsupported), Some(m)) => {
            reporter.update(|x| x.message = Some("verifying the unpacked tree against the image's manifest".into()));
            let (root2, m, l) = (root.to_owned(), m.clone(), layout.clone());
            let store = STORE_DIR.to_owned();
            blocking("verifying", move || seal::verify_tree(&root2, &m, &l, &store, xattrs_unsupported > 0)).await?.map_err(InstallError::from)
        }
        (r, _) => r.map(|_| ()),
    };
    let result = match result {
        Ok(()) => leave_update_state(r, plan, root, trusted.manifest.clone()).await,
        Err(e) => Err(e),
    };
    let result = match result {
        Ok(()) => configure_and_seed(r, plan, layout, firmware, disk_path, root, &parts, &dl, reporter, phases, token).await,
        Err(e) => Err(e),
    };
    let uploaded = dl.stats().uploaded;
    let file = dl.file().to_owned();
    dl.stop().await;
    remove_store(root, &file);
    mounts.unmount_all();
    result.map(|stop| (uploaded, stop))
}

/// What the node needs for updates over the swarm ([`agent`]): the installed record of the
/// verified tree, its credentials, and the update agent when the image has systemd.
async fn leave_update_state(r: &Resolved, plan: &NodePlan, root: &Path, manifest: Option<crate::image::manifest::Manifest>) -> Result<(), InstallError> {
    let creds = crate::types::node_api::NodeCredentials { server: r.server, mac: r.mac, token: r.token.clone(), iface: None };
    let (root2, image) = (root.to_owned(), plan.image.to_string());
    let exe = PathBuf::from("/proc/self/exe");
    blocking("update agent", move || agent::install(&root2, &image, manifest.as_ref(), &creds, &exe)).await??;
    Ok(())
}

/// Where the swarm engine keeps the archive: a directory at the top of the target root (so it is there
/// whatever the image holds, and on the root file system the size check counted it on).
fn store_dir(root: &Path) -> PathBuf {
    root.join(STORE_DIR)
}

/// [`store_dir`] relative to the target root.
const STORE_DIR: &str = ".si-appliance";

/// Deletes the stored archive and its directory, then gives the root directory back the mtime
/// the unpacker restored, so the installed tree matches the image's manifest.
fn remove_store(root: &Path, file: &Path) {
    let mtime = std::fs::symlink_metadata(root).ok().map(|m| filetime::FileTime::from_last_modification_time(&m));
    if let Err(e) = std::fs::remove_file(file) {
        warn!(file = %file.display(), "removing the stored archive: {e}");
    }
    if std::fs::remove_dir(store_dir(root)).is_ok() {
        if let Some(t) = mtime {
            let _ = filetime::set_symlink_file_times(root, t, t);
        }
    }
}

async fn download_and_unpack(
    opts: &Options,
    plan: &NodePlan,
    dl: &SwarmStream,
    root: &Path,
    reporter: &Reporter,
    token: &CancellationToken,
) -> Result<u64, InstallError> {
    let cancel = token.child_token();
    let reader = dl.reader(cancel.clone()).await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let counting = Counting { inner: reader, n: consumed.clone() };
    let uopts = UnpackOptions {
        progress: crate::image::progress::ProgressMode::Off,
        total: (plan.unpacked_size > 0).then_some(plan.unpacked_size),
        restore_owners: true,
    };
    let target = root.to_owned();
    let t0 = Instant::now();
    let mut task = tokio::task::spawn_blocking(move || unpack(counting, &target, &uopts));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last_have, mut last_progress) = (0u64, Instant::now());
    let (mut prev_have, mut prev_up, mut prev_t) = (0u64, 0u64, Instant::now());
    let mut log_every = 0u32;
    let outcome = loop {
        tokio::select! {
            // CANCEL-SAFETY: `task` is polled by reference and survives the other arm; a tick
            // carries no state.
            res = &mut task => break res.map_err(|_| InstallError::Join("unpacking")),
            _ = tick.tick() => {
                let st = dl.stats();
                let now = Instant::now();
                let dt = now.duration_since(prev_t).as_secs_f64().max(1e-3);
                let down = (st.have.saturating_sub(prev_have) as f64 / dt) as u64;
                let up = (st.uploaded.saturating_sub(prev_up) as f64 / dt) as u64;
                (prev_have, prev_up, prev_t) = (st.have, st.uploaded, now);
                let unpacked = consumed.load(Ordering::Relaxed);
                reporter.update(|rep| {
                    rep.bytes_done = st.have;
                    rep.bytes_total = st.total;
                    rep.bytes_uploaded = st.uploaded;
                    rep.bytes_unpacked = unpacked;
                    rep.down_bps = down;
                    rep.up_bps = up;
                    rep.peers = st.peers;
                });
                log_every += 1;
                if log_every.is_multiple_of(5) {
                    info!(have = st.have, total = st.total, unpacked, peers = st.peers, mbit_s = format!("{:.1}", down as f64 * 8.0 / 1e6), "downloading + unpacking");
                }
                if st.have > last_have {
                    (last_have, last_progress) = (st.have, now);
                }
                let why = if let Some(e) = st.error {
                    Some(DownloadFailure::Swarm(e))
                } else if !st.finished && now.duration_since(last_progress) > opts.stall_limit {
                    Some(DownloadFailure::Stalled { limit: opts.stall_limit, have: st.have, total: st.total })
                } else {
                    None
                };
                if let Some(why) = why {
                    cancel.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(30), &mut task).await;
                    return Err(InstallError::Download { image: plan.image.to_string(), why });
                }
            }
            _ = token.cancelled() => {
                cancel.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(30), &mut task).await;
                return Err(InstallError::Interrupted);
            }
        }
    };
    let rep = outcome??;
    // The reader saw every byte, so every piece is verified; this returns at once.
    tokio::time::timeout(Duration::from_secs(60), dl.wait_complete())
        .await
        .map_err(|_| InstallError::Download { image: plan.image.to_string(), why: DownloadFailure::Incomplete })??;
    let secs = t0.elapsed().as_secs_f64();
    let st = dl.stats();
    reporter.update(|x| {
        x.bytes_done = st.have;
        x.bytes_unpacked = consumed.load(Ordering::Relaxed);
    });
    info!(
        entries = rep.entries, file_bytes = rep.bytes, archive_bytes = st.total, secs = format!("{secs:.2}"),
        mbit_s = format!("{:.1}", st.total as f64 * 8.0 / 1e6 / secs.max(1e-3)), "downloaded and unpacked"
    );
    Ok(rep.xattrs_unsupported)
}

#[allow(clippy::too_many_arguments)]
async fn configure_and_seed(
    r: &Resolved,
    plan: &NodePlan,
    layout: &DiskLayout,
    firmware: Firmware,
    disk_path: &Path,
    root: &Path,
    parts: &[PathBuf],
    dl: &SwarmStream,
    reporter: &Reporter,
    phases: &mut Phases,
    token: &CancellationToken,
) -> Result<&'static str, InstallError> {
    phases.enter(reporter, Phase::Configuring, format!("host name {}, fstab, machine-id, ssh keys, network", plan.hostname));
    let (root2, layout2, parts2, hostname, mac) = (root.to_owned(), layout.clone(), parts.to_vec(), plan.hostname.clone(), r.mac);
    let (root_uuid, uuids) = blocking("configuring", move || -> Result<(String, Vec<(PathBuf, String)>), InstallError> {
        let mut with_uuid = Vec::new();
        let mut uuids = Vec::new();
        let mut root_uuid = String::new();
        for (p, dev) in layout2.partitions.iter().zip(&parts2) {
            if p.fs == crate::types::node_api::FsKind::BiosGrub {
                continue;
            }
            let u = disk::uuid_of(dev)?;
            if p.mount.as_deref() == Some("/") {
                root_uuid = u.clone();
            }
            uuids.push((dev.clone(), u.clone()));
            with_uuid.push((p, u));
        }
        settings::replace_file(&root2.join("etc/fstab"), &settings::render_fstab(&with_uuid))?;
        settings::write_identity(&root2, &hostname)?;
        let net = settings::write_network(&root2, mac)?;
        info!("network: {net}");
        if root2.join("usr/bin/ssh-keygen").exists() {
            let _binds = bootloader::bind_system(&root2)?;
            disk::tool("chroot", &[root2.as_os_str(), std::ffi::OsStr::new("ssh-keygen"), std::ffi::OsStr::new("-A")], None)?;
            info!("fresh ssh host keys (ssh-keygen -A)");
        }
        Ok((root_uuid, uuids))
    })
    .await??;

    if let Some(p) = &plan.profile {
        run_profile(r, plan, p, root, reporter, token).await?;
    }

    phases.enter(reporter, Phase::BootLoader, "boot loader".into());
    let (root2, d, gpt) = (root.to_owned(), disk_path.to_owned(), layout.table == TableKind::Gpt);
    let what = blocking("boot loader", move || bootloader::install(&root2, &d, firmware, &uuids, &root_uuid, gpt)).await??;
    info!("boot loader: {what}");
    reporter.update(|x| x.message = Some(format!("boot loader: {what}")));

    phases.enter(reporter, Phase::Seeding, format!("seeding to the other nodes for at most {} s", plan.seed_for_secs));
    let seed = dl.seed_until_done(Duration::from_secs(plan.seed_for_secs), token);
    tokio::pin!(seed);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let stop = loop {
        tokio::select! {
            // CANCEL-SAFETY: `seed` is pinned outside the loop and polled by reference; a tick
            // carries no state.
            s = &mut seed => break s,
            _ = tick.tick() => {
                let st = dl.stats();
                reporter.update(|x| { x.bytes_uploaded = st.uploaded; x.peers = st.peers; });
            }
        }
    };
    info!(reason = stop, uploaded = dl.stats().uploaded, "stopped seeding");
    Ok(stop)
}

/// The group's overlay, then its steps one by one (still in the `configuring` phase, each
/// announced with a message and reported when done); the first failing step stops the install
/// before the boot loader.
async fn run_profile(
    r: &Resolved,
    plan: &NodePlan,
    p: &crate::types::node_api::NodeProfile,
    root: &Path,
    reporter: &Reporter,
    token: &CancellationToken,
) -> Result<(), InstallError> {
    let api = profile::Api { server: r.server, mac: r.mac, token: r.token.clone() };
    let group = p.group.clone();
    if p.overlay {
        reporter.phase(Phase::Configuring, format!("profile {group}: overlay"));
        let tar = api.overlay(&group).await?;
        let (g, root2) = (group.clone(), root.to_owned());
        let n = blocking("overlay", move || profile::apply_overlay(&g, &tar, &root2)).await??;
        info!(group, entries = n, "group overlay applied");
    }
    let n = p.steps.len();
    for (i, step) in p.steps.iter().enumerate() {
        if token.is_cancelled() {
            return Err(InstallError::Interrupted);
        }
        let name = step.name();
        reporter.phase(Phase::Configuring, format!("profile {group}: step {}/{n} {name}", i + 1));
        let script = match step {
            crate::types::node_api::ProfileStep::Script(s) => Some(api.script(&group, s).await?),
            _ => None,
        };
        let input = profile::StepInput {
            step: step.clone(),
            script,
            limit: Duration::from_secs(p.step_timeout_secs.max(1)),
            env: vec![("SI_GROUP", group.clone()), ("SI_HOSTNAME", plan.hostname.clone()), ("SI_MAC", r.mac.to_string())],
        };
        let root2 = root.to_owned();
        let (rep, err) = blocking("profile step", move || profile::run_step(&root2, &input)).await?;
        reporter.update(|x| x.steps.push(rep));
        if let Some(e) = err {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Whether `/` is an initramfs (ramfs or tmpfs): only there may the installer reboot or power
/// off the machine. Run by hand on a host, it never does.
pub fn in_initramfs() -> bool {
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c"/".as_ptr(), &mut st) };
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    rc == 0 && matches!(st.f_type as i64, RAMFS_MAGIC | TMPFS_MAGIC)
}

/// Performs the finish: reboot(2) or power off (only inside an initramfs), or returns for the
/// shell.
pub fn finish(f: Finish) {
    let cmd = match f {
        Finish::Shell => return,
        Finish::Reboot => libc::RB_AUTOBOOT,
        Finish::Poweroff => libc::RB_POWER_OFF,
    };
    if !in_initramfs() {
        warn!(?f, "not in an initramfs (/ is not ramfs/tmpfs): not touching this machine, staying up");
        return;
    }
    // The last lines (install-done) go through /init's tee to the console: give it a moment,
    // a reboot right after the write has lost them.
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::thread::sleep(std::time::Duration::from_secs(1));
    // SAFETY: sync and reboot have no memory preconditions; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(cmd);
    }
    warn!("{f:?} failed: {}", std::io::Error::last_os_error());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(cmdline: &Path) -> Options {
        Options {
            cmdline: cmdline.to_owned(),
            server: None,
            mac: None,
            token: None,
            disk: None,
            finish: None,
            workdir: "/tmp/x".into(),
            firmware: None,
            iface: None,
            listen_port: 6881,
            plan_wait: Duration::from_secs(1),
            stall_limit: Duration::from_secs(1),
            trust_key: default_trust_key(),
            allow_unsigned: false,
        }
    }

    #[test]
    fn flags_override_the_command_line() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("cmdline");
        std::fs::write(&f, "si.server=10.0.0.1:80 si.mac=52:54:00:00:00:01 si.token=ab si.disk=/dev/vda\n").unwrap();
        let mut o = opts(&f);
        let r = resolve(&o).unwrap();
        assert_eq!((r.server.port(), r.disk.as_deref()), (80, Some("/dev/vda")));
        o.disk = Some("/dev/loop3".into());
        o.server = Some("127.0.0.1:8080".parse().unwrap());
        let r = resolve(&o).unwrap();
        assert_eq!((r.server.port(), r.disk.as_deref(), r.token.as_str()), (8080, Some("/dev/loop3"), "ab"));
        std::fs::write(&f, "si.server=10.0.0.1:80\n").unwrap();
        assert!(resolve(&opts(&f)).unwrap_err().to_string().contains("MAC"));
    }
}
