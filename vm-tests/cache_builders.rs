//! The cache builders themselves (pxe-assets/cache-lib.sh), each on an empty cache of its own:
//! two concurrent calls both succeed and leave one valid artefact; a cache whose content no
//! longer matches its marker is rebuilt; a builder stopped with SIGTERM mid-way leaves no mount
//! and no partial tree; a builder killed with SIGKILL together with its children (debootstrap
//! with /proc mounted in the tree) leaves a mount behind, and the next call removes it and
//! rebuilds. Real debootstrap, apt and zstd; nothing is mocked.
//!
//! Rules: every process is started here, in a session of its own, and killed by PID; every wait
//! is bounded; every mount left under the test's cache is removed when the test ends.
#![allow(dead_code)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One builder run: the script in its own session (PID = session id), output in a log file.
struct Builder {
    child: Option<Child>,
    log: PathBuf,
}

impl Builder {
    fn start(cache: &Cache, script: &str, args: &[&Path], env: &[(&str, &str)], log: &str) -> Builder {
        let log = cache.root.join(log);
        let out = fs::File::create(&log).expect("log file");
        let child = Command::new("setsid")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
            .args(args)
            .env("SI_CACHE", cache.root.join("cache"))
            .env("SI_TEST_CACHE", cache.root.join("test-cache"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("spawn builder");
        Builder { child: Some(child), log }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                self.child = None;
                return st;
            }
            if Instant::now() >= end {
                let log = self.log_text();
                self.kill_session();
                panic!("builder still running after {timeout:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_ok(&mut self, timeout: Duration) -> String {
        let st = self.wait(timeout);
        let log = self.log_text();
        assert!(st.success(), "builder failed ({st}):\n{log}");
        log
    }

    /// SIGKILL to every process of the builder's session: the builder, `timeout`, debootstrap,
    /// dpkg… (all started by this test), as a crash or a power cut would stop them.
    fn kill_session(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        let sid = child.id();
        for _ in 0..10 {
            let pids = session_members(sid);
            if pids.is_empty() {
                break;
            }
            for p in pids {
                unsafe_kill(p, 9);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.wait();
        self.child = None;
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        self.kill_session();
    }
}

/// PIDs whose session id (field 6 of /proc/PID/stat) is `sid`.
fn session_members(sid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { continue };
        // The command name (field 2) is in parentheses and may hold spaces: split after it.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(3).and_then(|s| s.parse::<u32>().ok()) == Some(sid) {
            out.push(pid);
        }
    }
    out
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Mount points at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(|m| m.replace("\\040", " ")))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .collect()
}

/// An empty cache (both roots) for one test, under /var/tmp; on drop every mount left inside
/// is removed, then the directory.
struct Cache {
    root: PathBuf,
}

impl Cache {
    fn new(tag: &str) -> Cache {
        common::require_root();
        let root = PathBuf::from(format!("/var/tmp/si-cache-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("cache")).expect("cache dir");
        fs::create_dir_all(root.join("test-cache")).expect("test cache dir");
        Cache { root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        let mut m = mounts_under(&self.root);
        m.sort();
        for p in m.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        if mounts_under(&self.root).is_empty() {
            let _ = Command::new("rm").args(["-rf", "--one-file-system"]).arg(&self.root).status();
        }
    }
}

/// Runs a builder with `--check` (exit 0: a valid finished artefact).
fn check(cache: &Cache, script: &str, dir: &Path) -> bool {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .arg("--check")
        .arg(dir)
        .env("SI_TEST_CACHE", cache.root.join("test-cache"))
        .stdin(Stdio::null())
        .status()
        .expect("check")
        .success()
}

/// Waits (bounded) until something is mounted below `dir`; panics with the log otherwise.
fn wait_mount(b: &Builder, dir: &Path, timeout: Duration) -> Vec<String> {
    common::wait_for(timeout, || {
        let m = mounts_under(dir);
        if m.is_empty() { None } else { Some(m) }
    })
    .unwrap_or_else(|| panic!("nothing mounted under {} within {timeout:?}:\n{}", dir.display(), b.log_text()))
}

/// Two concurrent callers of one tree builder on an empty cache.
fn concurrent_pair(cache: &Cache, script: &str, dir: &Path, limit: Duration) {
    let mut a = Builder::start(cache, script, &[dir], &[], "a.log");
    let mut b = Builder::start(cache, script, &[dir], &[], "b.log");
    let la = a.wait_ok(limit);
    let lb = b.wait_ok(limit);
    let built = [&la, &lb].iter().filter(|l| l.contains("done in")).count();
    let waited = [&la, &lb].iter().filter(|l| l.contains("built while we waited")).count();
    assert_eq!((built, waited), (1, 1), "expected one build and one waiter:\n--- a\n{la}\n--- b\n{lb}");
    assert!(check(cache, script, dir), "{} is not a valid tree after the pair", dir.display());
    assert!(mounts_under(&cache.root).is_empty(), "mounts left: {:?}", mounts_under(&cache.root));
    assert!(!Path::new(&format!("{}.tmp", dir.display())).exists(), "a partial tree is left");
}

const SCRIPT: &str = "vm-tests/make-debian-image.sh";

#[test]
fn debian_tree_builder_is_exclusive_checks_content_and_survives_kills() {
    let cache = Cache::new("deb");
    let dir = cache.path("test-cache/bookworm-minbase");
    let tmp = cache.path("test-cache/bookworm-minbase.tmp");
    let limit = Duration::from_secs(900);

    // 1. Two concurrent calls on an empty cache: one builds, the other waits and reuses.
    concurrent_pair(&cache, SCRIPT, &dir, limit);
    let t = Instant::now();
    Builder::start(&cache, SCRIPT, &[&dir], &[], "reuse.log").wait_ok(limit);
    assert!(t.elapsed() < Duration::from_secs(30), "reuse took {:?}", t.elapsed());

    // 2. Content no longer matching the marker (a file removed) is not reused.
    fs::remove_file(dir.join("usr/share/base-passwd/group.master")).expect("remove a file");
    assert!(!check(&cache, SCRIPT, &dir), "a damaged tree passed the check");

    // 3. SIGTERM while debootstrap has /proc mounted in the partial tree: the builder stops,
    //    unmounts and removes the partial tree.
    let mut b = Builder::start(&cache, SCRIPT, &[&dir], &[], "term.log");
    let m = wait_mount(&b, &tmp, Duration::from_secs(300));
    println!("mounted while building: {m:?}");
    unsafe_kill(b.pid(), 15);
    let st = b.wait(Duration::from_secs(90));
    assert!(!st.success(), "a builder stopped by SIGTERM reported success");
    assert!(mounts_under(&cache.root).is_empty(), "SIGTERM left mounts: {:?}\n{}", mounts_under(&cache.root), b.log_text());
    assert!(!tmp.exists(), "SIGTERM left the partial tree\n{}", b.log_text());
    assert!(!check(&cache, SCRIPT, &dir));

    // 4. SIGKILL of the builder and all its children (nothing can clean up): a mount is left in
    //    the partial tree; the next call unmounts it, removes it and builds a valid tree.
    let mut k = Builder::start(&cache, SCRIPT, &[&dir], &[], "kill.log");
    wait_mount(&k, &tmp, Duration::from_secs(300));
    k.kill_session();
    if mounts_under(&tmp).is_empty() {
        // debootstrap mounts and unmounts /proc around its chroot steps: the kill landed in a
        // gap. Leave the mount a kill at the wrong moment leaves, so the clean-up is tested.
        println!("the kill landed between debootstrap's mounts: mounting proc in the partial tree");
        fs::create_dir_all(tmp.join("proc")).expect("proc dir");
        let st = Command::new("mount").args(["-t", "proc", "proc"]).arg(tmp.join("proc")).status().expect("mount");
        assert!(st.success(), "mount proc");
    }
    assert!(!mounts_under(&tmp).is_empty(), "expected the killed debootstrap's mount to be left");
    let log = Builder::start(&cache, SCRIPT, &[&dir], &[], "after-kill.log").wait_ok(limit);
    assert!(log.contains("unmounting"), "{log}");
    assert!(check(&cache, SCRIPT, &dir), "no valid tree after the rebuild:\n{log}");
    assert!(mounts_under(&cache.root).is_empty(), "mounts left: {:?}", mounts_under(&cache.root));
    assert!(!tmp.exists());
    assert!(dir.join("usr/share/base-passwd/group.master").is_file());
}

#[test]
fn demo_tree_builder_is_exclusive() {
    let cache = Cache::new("demo");
    let dir = cache.path("test-cache/demo-bookworm");
    concurrent_pair(&cache, "qemu/make-demo-image.sh", &dir, Duration::from_secs(1200));
    assert!(dir.join("usr/sbin/grub-install").exists() && dir.join("etc/default/grub").is_file());
}

/// Both boot-file builders (the test boot files and the clients' installer initramfs around
/// this binary), each on an empty cache: a concurrent pair gives one build; outputs that no
/// longer match their recorded digests are rebuilt; a build killed mid-way (SIGKILL to the
/// whole session while it compresses) is never reused half-done.
#[test]
fn boot_file_builders_are_exclusive_and_check_their_outputs() {
    let cache = Cache::new("boot");
    let bin = [("SI_APPLIANCE_BIN", common::appliance_bin())];
    for (script, out, env) in [
        ("pxe-assets/build-test-boot.sh", cache.path("cache/test-boot"), &[][..]),
        ("pxe-assets/build-client.sh", cache.path("cache/client-boot"), &bin[..]),
    ] {
        let limit = Duration::from_secs(600);
        let mut a = Builder::start(&cache, script, &[&out], env, "a.log");
        let mut b = Builder::start(&cache, script, &[&out], env, "b.log");
        let (la, lb) = (a.wait_ok(limit), b.wait_ok(limit));
        let built = [&la, &lb].iter().filter(|l| l.contains(": built from")).count();
        assert_eq!(built, 1, "{script}: expected one build:\n--- a\n{la}\n--- b\n{lb}");
        let again = Builder::start(&cache, script, &[&out], env, "again.log").wait_ok(limit);
        assert!(again.contains("up to date"), "{script}: not reused:\n{again}");

        // An output changed after the build (a truncated copy) is rebuilt.
        let initrd = out.join("initrd.img");
        let len = fs::metadata(&initrd).expect("initrd").len();
        fs::OpenOptions::new().write(true).open(&initrd).expect("open").set_len(len / 2).expect("truncate");
        let log = Builder::start(&cache, script, &[&out], env, "damaged.log").wait_ok(limit);
        assert!(log.contains(": built from"), "{script}: a truncated initrd was reused:\n{log}");

        // Killed while building (after its scratch tree appeared): the next call rebuilds.
        fs::OpenOptions::new().write(true).open(&initrd).expect("open").set_len(len / 2).expect("truncate");
        let mut k = Builder::start(&cache, script, &[&out], env, "kill.log");
        common::wait_for(Duration::from_secs(300), || {
            fs::read_dir(&out).ok()?.flatten().find(|e| e.file_name().to_string_lossy().starts_with(".work.")).map(|_| ())
        })
        .unwrap_or_else(|| panic!("{script}: no scratch tree appeared:\n{}", k.log_text()));
        k.kill_session();
        let log = Builder::start(&cache, script, &[&out], env, "after-kill.log").wait_ok(limit);
        assert!(log.contains(": built from"), "{script}: not rebuilt after a kill:\n{log}");
        assert!(fs::metadata(&initrd).expect("initrd").len() == len, "{script}: the rebuilt initrd differs in size");
        assert!(
            !fs::read_dir(&out).expect("out").flatten().any(|e| e.file_name().to_string_lossy().starts_with(".work.")),
            "{script}: scratch tree left after a good build"
        );
    }
}
