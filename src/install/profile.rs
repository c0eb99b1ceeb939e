//! A group's service profile, run by the installer after the per-node settings and before the
//! boot loader: the group's overlay tree (fetched with the node's token, unpacked over the
//! installed root by the image unpacker), then each step in the installed system's chroot with
//! /dev, /proc and /sys bound ([`super::bootloader::bind_system`]), one at a time, each with the
//! profile's time limit:
//!
//! - `script`: fetched from the appliance (`GET /api/nodes/<mac>/scripts/<name>`), written to
//!   `/.si-profile/<name>` in the root (mode 0700) and executed there, then deleted;
//! - `packages`: `apt-get update` then `apt-get install -y` (with a `policy-rc.d` that keeps
//!   services from starting in the chroot), from the repositories the image's /etc/apt names;
//! - `enable`: `systemctl enable` in the chroot when the image has systemctl (offline, it only
//!   makes symlinks); otherwise the installer writes the `[Install] WantedBy=`/`RequiredBy=`
//!   symlinks under /etc/systemd/system itself (the step's output says which).
//!
//! Every step runs in its own process group with a clean environment; its stdout and stderr
//! go through one pipe whose end is kept (and logged, so `node log` shows it). Processes a step
//! leaves behind are killed when it ends. The first step that does not exit 0 stops the
//! profile: [`ProfileError`] names it, and the install fails (the caller wipes the disk).

use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::bootloader;
use crate::net::http_client::{self, Request};
use crate::types::MacAddr;
use crate::types::node_api::{self, ProfileStep, StepReport};

/// Why a profile stopped the install.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A step exited with a status other than 0.
    #[error("profile step {name} failed (exit {code})")]
    Exit {
        /// The step ([`ProfileStep::name`]).
        name: String,
        /// Its exit status.
        code: i32,
    },
    /// A step still ran at the time limit (it was killed).
    #[error("profile step {name} failed (timed out after {secs} s)")]
    Timeout {
        /// The step.
        name: String,
        /// The limit.
        secs: u64,
    },
    /// A step could not run or ended without an exit status (a signal, a missing tool).
    #[error("profile step {name} failed ({why})")]
    Step {
        /// The step.
        name: String,
        /// Why, in words.
        why: String,
    },
    /// A script or the overlay could not be fetched.
    #[error("profile of group {group}: fetching {what}: {why}")]
    Fetch {
        /// The group.
        group: String,
        /// `script NAME` or `the overlay`.
        what: String,
        /// Why.
        why: String,
    },
    /// The overlay did not unpack.
    #[error("profile of group {group}: applying the overlay")]
    Overlay {
        /// The group.
        group: String,
        /// The unpacker's error.
        #[source]
        source: crate::image::ImageError,
    },
}

/// Where the node API is, and who asks.
#[derive(Clone, Debug)]
pub struct Api {
    /// The appliance.
    pub server: SocketAddr,
    /// This node.
    pub mac: MacAddr,
    /// Its token.
    pub token: String,
}

/// Output bytes kept while a step runs (the report keeps less: [`node_api::STEP_OUTPUT_MAX`]).
const KEEP: usize = 64 << 10;
/// Where scripts are put in the installed root while they run.
const SCRIPT_DIR: &str = ".si-profile";

impl Api {
    async fn get(&self, path: &str, max: usize) -> Result<Vec<u8>, String> {
        let req = Request { method: "GET", path, bearer: Some(&self.token), json: None };
        match http_client::request(self.server, req, max, Duration::from_secs(120)).await {
            Ok(a) if a.status == 200 => Ok(a.body),
            Ok(a) => Err(format!("{} ({})", a.status, String::from_utf8_lossy(&a.body).trim())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A script of this node's profile.
    pub async fn script(&self, group: &str, name: &str) -> Result<Vec<u8>, ProfileError> {
        self.get(&format!("/api/nodes/{}/scripts/{name}", self.mac), node_api::SCRIPT_MAX)
            .await
            .map_err(|why| ProfileError::Fetch { group: group.to_owned(), what: format!("script {name}"), why })
    }

    /// The group's overlay (a plain tar).
    pub async fn overlay(&self, group: &str) -> Result<Vec<u8>, ProfileError> {
        self.get(&format!("/api/nodes/{}/overlay", self.mac), node_api::OVERLAY_MAX)
            .await
            .map_err(|why| ProfileError::Fetch { group: group.to_owned(), what: "the overlay".into(), why })
    }
}

/// Unpacks the overlay `tar` over `root` (owners restored: the installer runs as root).
///
/// # Errors
/// [`ProfileError::Overlay`] with the unpacker's reason.
pub fn apply_overlay(group: &str, tar: &[u8], root: &Path) -> Result<u64, ProfileError> {
    let opts = crate::image::unpack::UnpackOptions { progress: crate::image::progress::ProgressMode::Off, total: None, restore_owners: true };
    let rep = crate::image::unpack::unpack(tar, root, &opts).map_err(|source| ProfileError::Overlay { group: group.to_owned(), source })?;
    Ok(rep.entries)
}

/// How a process ended.
enum Ended {
    Exit(i32),
    Signal(i32),
    Timeout,
}

/// Runs `chroot root argv…` (or `argv…` itself on the live system, `root` `None`) in its own
/// process group with a clean environment, its output in `out`; kills the group at `limit` and
/// whatever it left running at the end.
fn run_in_chroot(root: Option<&Path>, argv: &[&str], env: &[(&str, String)], limit: Duration, out: &Arc<Mutex<Vec<u8>>>) -> Result<Ended, String> {
    let (reader, writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let w2 = writer.try_clone().map_err(|e| format!("pipe: {e}"))?;
    let (program, args): (&std::ffi::OsStr, Vec<&std::ffi::OsStr>) = match root {
        Some(r) => ("chroot".as_ref(), std::iter::once(r.as_os_str()).chain(argv.iter().map(|a| a.as_ref())).collect()),
        None => (argv.first().copied().unwrap_or_default().as_ref(), argv.iter().skip(1).map(|a| a.as_ref()).collect()),
    };
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().current_dir("/").stdin(Stdio::null()).stdout(writer).stderr(w2).process_group(0);
    cmd.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").env("LANG", "C.UTF-8").env("HOME", "/root");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("running {}: {e}", program.to_string_lossy()))?;
    drop(cmd); // our copies of the pipe's write end: EOF comes when the step's processes close theirs
    let pgid = child.id() as libc::pid_t;
    let sink = out.clone();
    let drain = std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(reader);
        let mut buf = [0u8; 8192];
        let mut line = Vec::new();
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut o = sink.lock().unwrap_or_else(|e| e.into_inner());
            o.extend_from_slice(&buf[..n]);
            if o.len() > KEEP {
                let cut = o.len() - KEEP;
                o.drain(..cut);
            }
            drop(o);
            for &b in &buf[..n] {
                if b == b'\n' || line.len() >= 400 {
                    info!(target: "si_appliance::install::profile::output", "| {}", String::from_utf8_lossy(&line).trim_end());
                    line.clear();
                }
                if b != b'\n' {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            info!(target: "si_appliance::install::profile::output", "| {}", String::from_utf8_lossy(&line));
        }
    });
    let t0 = Instant::now();
    let ended = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st.code().map(Ended::Exit).unwrap_or(Ended::Signal(st.signal().unwrap_or(0))),
            Ok(None) if t0.elapsed() >= limit => {
                // SAFETY: kill(2) on the step's own process group; no memory is involved.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                break Ended::Timeout;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for the step: {e}")),
        }
    };
    // What the step started and left running (a daemon) would keep the binds busy.
    // SAFETY: as above; ESRCH (nothing left) is fine.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    // The reader ends at EOF; a process outside the group holding the pipe does not hold us.
    let t1 = Instant::now();
    while !drain.is_finished() && t1.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if drain.is_finished() {
        let _ = drain.join();
    }
    Ok(ended)
}

/// The `.wants`/`.requires` symlinks `systemctl enable` would make, written by hand (an image
/// without systemctl). Returns what was done, in words.
fn enable_by_hand(root: &Path, unit: &str) -> Result<String, String> {
    let dirs = ["etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"];
    let rel = dirs.iter().map(|d| format!("{d}/{unit}")).find(|p| root.join(p).is_file()).ok_or_else(|| format!("unit {unit} not found in {}", dirs.join(", ")))?;
    let text = std::fs::read_to_string(root.join(&rel)).map_err(|e| format!("reading /{rel}: {e}"))?;
    let mut section = "";
    let mut links = Vec::new();
    for l in text.lines().map(str::trim) {
        if l.starts_with('[') {
            section = l;
        } else if section == "[Install]" {
            for (key, suffix) in [("WantedBy=", "wants"), ("RequiredBy=", "requires")] {
                if let Some(v) = l.strip_prefix(key) {
                    links.extend(v.split_whitespace().map(|t| format!("{t}.{suffix}")));
                }
            }
        }
    }
    if links.is_empty() {
        return Err(format!("/{rel} has no [Install] WantedBy= or RequiredBy=: nothing to enable"));
    }
    let mut said = Vec::new();
    for dir in links {
        if dir.contains('/') || dir.starts_with('.') {
            return Err(format!("/{rel}: bad target {dir:?}"));
        }
        let d = root.join("etc/systemd/system").join(&dir);
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        let l = d.join(unit);
        if std::fs::symlink_metadata(&l).is_ok() {
            std::fs::remove_file(&l).map_err(|e| format!("replacing {}: {e}", l.display()))?;
        }
        std::os::unix::fs::symlink(format!("/{rel}"), &l).map_err(|e| format!("linking {}: {e}", l.display()))?;
        said.push(format!("/etc/systemd/system/{dir}/{unit} -> /{rel}"));
    }
    Ok(format!("systemctl is not in the image: created {}\n", said.join(", ")))
}

/// What one step needs besides the root.
pub struct StepInput {
    /// The step.
    pub step: ProfileStep,
    /// A script's bytes (fetched before).
    pub script: Option<Vec<u8>>,
    /// Its time limit.
    pub limit: Duration,
    /// `SI_GROUP`, `SI_HOSTNAME`, `SI_MAC` for the step's environment.
    pub env: Vec<(&'static str, String)>,
}

/// Runs one step in the installed root (binds /dev, /proc, /sys for its time). Returns its
/// report and, when it failed, the error that fails the install.
pub fn run_step(root: &Path, input: &StepInput) -> (StepReport, Option<ProfileError>) {
    run_step_at(Where::Chroot(root), input)
}

/// Runs one step on the live system (an installed node re-running its group's profile, `node
/// update --profile`): no chroot and no bind mounts; commands run as they are, a script from
/// `scratch` (a private directory the caller owns), `enable` makes the units start at the next
/// boot (`systemctl enable`, not `--now`), `packages` installs with the live system's apt-get
/// (services start as the packages say: no `policy-rc.d` is written). Same report and error as
/// [`run_step`].
pub fn run_step_live(scratch: &Path, input: &StepInput) -> (StepReport, Option<ProfileError>) {
    run_step_at(Where::Live { scratch }, input)
}

/// Where a step runs.
#[derive(Clone, Copy)]
enum Where<'a> {
    /// In the installed root's chroot, /dev, /proc, /sys bound.
    Chroot(&'a Path),
    /// On the running system; scripts are written under `scratch`.
    Live { scratch: &'a Path },
}

fn run_step_at(at: Where<'_>, input: &StepInput) -> (StepReport, Option<ProfileError>) {
    let (root, chroot) = match at {
        Where::Chroot(r) => (r, Some(r)),
        Where::Live { .. } => (Path::new("/"), None),
    };
    let name = input.step.name();
    let t0 = Instant::now();
    let out = Arc::new(Mutex::new(Vec::new()));
    let env: Vec<(&str, String)> = input.env.iter().map(|(k, v)| (*k, v.clone())).chain([("DEBIAN_FRONTEND", "noninteractive".to_owned())]).collect();
    let result = (|| -> Result<Ended, String> {
        let _binds = match chroot {
            Some(root) => {
                for d in ["dev", "proc", "sys"] {
                    let p = root.join(d);
                    if !p.exists() {
                        std::fs::create_dir(&p).map_err(|e| format!("creating /{d}: {e}"))?;
                    }
                }
                Some(bootloader::bind_system(root).map_err(|e| format!("binding /dev, /proc, /sys: {e}"))?)
            }
            None => None,
        };
        match &input.step {
            ProfileStep::Script(s) => {
                // In the chroot: `/.si-profile` of the installed root; live: the caller's scratch.
                let (dir, seen) = match at {
                    Where::Chroot(r) => (r.join(SCRIPT_DIR), format!("/{SCRIPT_DIR}/{s}")),
                    Where::Live { scratch } => (scratch.join(SCRIPT_DIR), scratch.join(SCRIPT_DIR).join(s).to_string_lossy().into_owned()),
                };
                let file = dir.join(s);
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                let r = (|| {
                    use std::os::unix::fs::PermissionsExt as _;
                    std::fs::write(&file, input.script.as_deref().unwrap_or_default()).map_err(|e| format!("writing the script: {e}"))?;
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).map_err(|e| format!("chmod: {e}"))?;
                    run_in_chroot(chroot, &[&seen], &env, input.limit, &out)
                })();
                let _ = std::fs::remove_dir_all(&dir);
                r
            }
            ProfileStep::Packages(pkgs) => {
                if !["usr/bin/apt-get", "bin/apt-get"].iter().any(|p| root.join(p).exists()) {
                    return Err("apt-get is not in the image".into());
                }
                let policy = root.join("usr/sbin/policy-rc.d");
                let ours = chroot.is_some() && !policy.exists();
                if ours {
                    use std::os::unix::fs::PermissionsExt as _;
                    let _ = std::fs::create_dir_all(root.join("usr/sbin"));
                    std::fs::write(&policy, "#!/bin/sh\n# si-appliance: no service starts in the installer's chroot\nexit 101\n")
                        .and_then(|()| std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755)))
                        .map_err(|e| format!("writing policy-rc.d: {e}"))?;
                }
                let deadline = Instant::now() + input.limit;
                let mut r = run_in_chroot(chroot, &["apt-get", "update"], &env, input.limit, &out);
                if matches!(r, Ok(Ended::Exit(0))) {
                    let mut argv = vec!["apt-get", "install", "-y", "-o", "Dpkg::Options::=--force-confold", "--"];
                    argv.extend(pkgs.iter().map(String::as_str));
                    r = run_in_chroot(chroot, &argv, &env, deadline.saturating_duration_since(Instant::now()), &out);
                }
                if ours {
                    let _ = std::fs::remove_file(&policy);
                }
                r
            }
            ProfileStep::Enable(units) => {
                if ["usr/bin/systemctl", "bin/systemctl"].iter().any(|p| root.join(p).exists()) {
                    let mut argv = vec!["systemctl", "enable", "--"];
                    argv.extend(units.iter().map(String::as_str));
                    run_in_chroot(chroot, &argv, &env, input.limit, &out)
                } else {
                    let mut said = String::new();
                    for u in units {
                        said.push_str(&enable_by_hand(root, u)?);
                    }
                    info!("{}", said.trim_end());
                    out.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(said.as_bytes());
                    Ok(Ended::Exit(0))
                }
            }
        }
    })();
    let mut text = String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let (exit_code, err) = match result {
        Ok(Ended::Exit(0)) => (Some(0), None),
        Ok(Ended::Exit(code)) => (Some(code), Some(ProfileError::Exit { name: name.clone(), code })),
        Ok(Ended::Signal(s)) => (None, Some(ProfileError::Step { name: name.clone(), why: format!("killed by signal {s}") })),
        Ok(Ended::Timeout) => (None, Some(ProfileError::Timeout { name: name.clone(), secs: input.limit.as_secs() })),
        Err(why) => {
            text.push_str(&format!("si-appliance: {why}\n"));
            (None, Some(ProfileError::Step { name: name.clone(), why }))
        }
    };
    let max = if err.is_none() { node_api::STEP_OUTPUT_OK_MAX } else { node_api::STEP_OUTPUT_MAX };
    let secs = t0.elapsed().as_secs_f64();
    match &err {
        None => info!(step = name, secs = format!("{secs:.1}"), "profile step done"),
        Some(e) => warn!(step = name, secs = format!("{secs:.1}"), "{e}"),
    }
    (StepReport { name, ok: err.is_none(), exit_code, output: node_api::tail(&text, max), secs }, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_lands_over_the_root_and_leaves_the_roots_own_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let (o, r) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::create_dir_all(o.path().join("etc/systemd/system")).unwrap();
        std::fs::write(o.path().join("etc/systemd/system/x.service"), "[Install]\nWantedBy=multi-user.target\n").unwrap();
        std::fs::write(o.path().join("etc/motd"), "overlay\n").unwrap();
        std::fs::set_permissions(o.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::create_dir_all(r.path().join("etc")).unwrap();
        std::fs::write(r.path().join("etc/motd"), "image\n").unwrap();
        std::fs::write(r.path().join("etc/keep"), "kept\n").unwrap();
        std::fs::set_permissions(r.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let tar = crate::image::pack::plain_tar(o.path()).unwrap();
        let n = apply_overlay("g", &tar, r.path()).unwrap();
        assert_eq!(n, 5, "etc, etc/motd, etc/systemd, etc/systemd/system, the unit; not the top directory");
        assert_eq!(std::fs::read_to_string(r.path().join("etc/motd")).unwrap(), "overlay\n");
        assert_eq!(std::fs::read_to_string(r.path().join("etc/keep")).unwrap(), "kept\n");
        assert!(r.path().join("etc/systemd/system/x.service").is_file());
        assert_eq!(std::fs::metadata(r.path()).unwrap().permissions().mode() & 0o777, 0o755);
        let e = apply_overlay("g", b"not a tar at all, just some bytes that are long enough", r.path()).unwrap_err();
        assert!(e.to_string().contains("profile of group g: applying the overlay"), "{e}");
    }

    #[test]
    fn units_are_enabled_by_hand_from_their_install_section() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
        std::fs::write(root.join("etc/systemd/system/a.service"), "[Unit]\nDescription=a\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\nRequiredBy=b.target\n").unwrap();
        let said = enable_by_hand(root, "a.service").unwrap();
        assert!(said.contains("systemctl is not in the image"), "{said}");
        let l = root.join("etc/systemd/system/multi-user.target.wants/a.service");
        assert_eq!(std::fs::read_link(&l).unwrap(), Path::new("/etc/systemd/system/a.service"));
        assert!(std::fs::symlink_metadata(root.join("etc/systemd/system/b.target.requires/a.service")).is_ok());
        enable_by_hand(root, "a.service").expect("again: the link is replaced");
        std::fs::write(root.join("etc/systemd/system/c.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
        assert!(enable_by_hand(root, "c.service").unwrap_err().contains("no [Install]"));
        assert!(enable_by_hand(root, "nope.service").unwrap_err().contains("not found"));
    }

    #[test]
    fn live_steps_run_without_chroot_and_a_failing_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let mark = d.path().join("ran");
        let ok = StepInput {
            step: ProfileStep::Script("10-ok.sh".into()),
            script: Some(format!("#!/bin/sh\necho \"group=$SI_GROUP\" > '{}'\necho hello\n", mark.display()).into_bytes()),
            limit: Duration::from_secs(20),
            env: vec![("SI_GROUP", "web".into())],
        };
        let (rep, err) = run_step_live(d.path(), &ok);
        assert!(err.is_none(), "{err:?} {rep:?}");
        assert_eq!((rep.name.as_str(), rep.ok, rep.exit_code), ("10-ok.sh", true, Some(0)));
        assert!(rep.output.contains("hello"), "{rep:?}");
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), "group=web\n", "the script ran on the live system with its environment");
        assert!(!d.path().join(SCRIPT_DIR).exists(), "the script is removed after its run");
        let bad = StepInput { step: ProfileStep::Script("20-bad.sh".into()), script: Some(b"#!/bin/sh\necho broken >&2\nexit 3\n".to_vec()), ..ok };
        let (rep, err) = run_step_live(d.path(), &bad);
        assert_eq!((rep.ok, rep.exit_code), (false, Some(3)));
        assert!(rep.output.contains("broken"), "{rep:?}");
        let e = err.expect("a failing step is an error").to_string();
        assert!(e.contains("20-bad.sh") && e.contains("exit 3"), "{e}");
    }
}
