//! Test harness shared by the network tests: network namespaces wired to a bridge, processes
//! that are killed by PID when dropped, and the appliance started inside a namespace.
//!
//! Rules (the project's): traffic stays inside namespaces this harness creates; every wait is
//! bounded; only processes we started are killed, by PID; leftovers of earlier runs (namespaces
//! named `sia…` whose creator PID is gone) are removed first.
#![allow(dead_code)]

pub mod interrupt;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Panics unless we run as root with `ip` available: these tests need namespaces.
pub fn require_root() {
    let uid = unsafe_getuid();
    assert_eq!(uid, 0, "network tests need root (run them through vm-tests/run.sh)");
}

fn unsafe_getuid() -> u32 {
    // /proc/self/status avoids a libc dependency.
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ip` with arguments.
pub fn ip(args: &[&str]) -> Output {
    run(Command::new("ip").args(args))
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces `sia<tag>-<pid>…` left by test processes that no longer run.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("sia") else { continue };
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !pid_alive(pid) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name (`ip netns exec NAME …`).
    pub name: String,
}

impl Netns {
    /// Creates `sia<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("sia{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs `prog` inside this namespace.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// `ip …` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A child process killed (SIGKILL, by PID) and reaped on drop; its output goes to a log file.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Combined stdout+stderr log.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let f = fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc { child, log, name: name.to_owned() }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log after `timeout`, or if the
    /// process exits first.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let ok = wait_for(timeout, || {
            if self.log_text().contains(needle) {
                return Some(true);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited ({st}) before {needle:?}:\n{}", self.name, self.log_text());
            }
            None
        });
        assert!(ok.is_some(), "{} never logged {needle:?}:\n{}", self.name, self.log_text());
    }

    /// Waits until a line of the log (colours stripped) satisfies `pred` and returns it; panics
    /// with the log after `timeout`, or if the process exits first. `what` names the wait.
    pub fn wait_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let line = wait_for(timeout, || {
            if let Some(l) = strip_ansi(&self.log_text()).lines().find(|l| pred(l)) {
                return Some(l.to_owned());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{} exited ({st}) before {what}:\n{}", self.name, self.log_text());
            }
            None
        });
        line.unwrap_or_else(|| panic!("{} never logged {what} within {timeout:?}:\n{}", self.name, self.log_text()))
    }

    /// Waits for the process to exit within `timeout`; kills it and panics otherwise.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match wait_for(timeout, || self.child.try_wait().ok().flatten()) {
            Some(st) => st,
            None => {
                self.kill();
                panic!("{} did not exit within {timeout:?}:\n{}", self.name, self.log_text());
            }
        }
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM by PID (graceful stop), then wait up to 10 s, then SIGKILL.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        if wait_for(Duration::from_secs(10), || self.child.try_wait().ok().flatten()).is_none() {
            self.kill();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A switch namespace with a bridge and hosts attached by veth pairs. Host 0 is usually the
/// appliance. Everything is removed on drop (namespaces first deleted take their veths along).
pub struct Lab {
    /// The namespace holding the bridge `br0`.
    pub switch: Netns,
    /// The hosts, in attach order; each has its end of the link named `eth0`.
    pub hosts: Vec<Netns>,
    /// A scratch directory for logs, configs and state (kept on failure for reading).
    pub dir: PathBuf,
    /// Neighbour-table limits this lab raised (first value before, last value set per file),
    /// put back on drop.
    neigh_raised: Vec<si_appliance::net::neigh::Raised>,
}

/// The kernel's ARP and NDP tables are one per machine, shared by every namespace, and sized
/// only in the initial namespace (see `si_appliance::net::neigh`). A lab of `hosts` hosts that
/// all talk to each other holds up to hosts² entries: beyond gc_thresh3 a new neighbour cannot
/// be created (ENOBUFS), so SYNs to a peer never leave its host. Measured here: at N = 128 swarm
/// nodes the table sat at its 1024 limit with 31 955 entries allocated and 30 884 destroyed, and
/// most nodes had 2–5 connections open against 25 SYNs pending. Raises the limits to fit hosts²
/// neighbours with the appliance's own rule (never lowers them); returns what it changed.
pub fn raise_neigh_limits(hosts: usize) -> Vec<si_appliance::net::neigh::Raised> {
    let n = (hosts * hosts) as u64;
    let changed = si_appliance::net::neigh::raise_under(Path::new("/proc/sys/net"), n).unwrap_or_else(|e| {
        eprintln!("lab: cannot raise the neighbour-table limits ({e}): large labs may stall");
        Vec::new()
    });
    if !changed.is_empty() {
        let w = si_appliance::net::neigh::wanted(n);
        eprintln!("lab: neighbour-table limits raised for {hosts} hosts (shared by all namespaces): gc_thresh1/2/3 = {}/{}/{}", w.thresh1, w.thresh2, w.thresh3);
    }
    changed
}

impl Drop for Lab {
    /// Puts back the neighbour-table limits this lab raised, unless someone changed them since.
    fn drop(&mut self) {
        for r in self.neigh_raised.iter().rev() {
            if fs::read_to_string(&r.file).ok().and_then(|v| v.trim().parse::<u64>().ok()) == Some(r.now) {
                let _ = fs::write(&r.file, r.was.to_string());
            }
        }
    }
}

impl Lab {
    /// Creates the switch. `tag` (≤ 3 chars) keeps namespace names short and recognisable.
    pub fn new(tag: &str) -> Lab {
        require_root();
        remove_stale_namespaces();
        let switch = Netns::new(&format!("{tag}s"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        // No STP, no forwarding delay: ports forward at once.
        switch.ip(&["link", "set", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let dir = std::env::temp_dir().join(format!("{}-{}", switch.name, unique_suffix()));
        fs::create_dir_all(&dir).expect("lab dir");
        Lab { switch, hosts: Vec::new(), dir, neigh_raised: Vec::new() }
    }

    /// Adds a host with an `eth0` on the bridge, with `addr` (CIDR) if given, and returns its
    /// index. `mac` fixes the hardware address (clients are identified by it).
    pub fn add_host(&mut self, addr: Option<&str>, mac: Option<&str>) -> usize {
        let i = self.hosts.len();
        let ns = Netns::new(&format!("{}h{i}", &self.switch.name[3..self.switch.name.len().min(5)]));
        let port = format!("p{i}");
        self.switch.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name]);
        self.switch.ip(&["link", "set", &port, "master", "br0"]);
        self.switch.ip(&["link", "set", &port, "up"]);
        if let Some(mac) = mac {
            ns.ip(&["link", "set", "eth0", "address", mac]);
        }
        if let Some(a) = addr {
            ns.ip(&["addr", "add", a, "dev", "eth0"]);
        }
        ns.ip(&["link", "set", "eth0", "up"]);
        self.hosts.push(ns);
        // Up to 16 hosts (256 entries) fit the defaults; above, in steps of 32 hosts (one
        // message per step, not per host).
        let n = self.hosts.len();
        let more = if n > 16 { raise_neigh_limits(n.div_ceil(32) * 32) } else { Vec::new() };
        // Keep the first value seen per file: that is what to put back.
        for m in more {
            match self.neigh_raised.iter_mut().find(|r| r.file == m.file) {
                Some(r) => r.now = m.now,
                None => self.neigh_raised.push(m),
            }
        }
        i
    }

    /// Path of a file in the lab directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// The si-appliance binary built with these tests.
pub fn appliance_bin() -> &'static str {
    env!("CARGO_BIN_EXE_si-appliance")
}

/// The node build (`src/bin/si-appliance-node`): what the nodes' initramfs carries and the
/// installer copies into installed systems; the tests run every node role with it.
pub fn node_bin() -> &'static str {
    env!("CARGO_BIN_EXE_si-appliance-node")
}

/// The cache roots, as the project's scripts read them (pxe-assets/cache-lib.sh): `SI_CACHE`
/// (downloaded packages, client boot files) and `SI_TEST_CACHE` (debootstrap trees).
pub fn cache_root() -> PathBuf {
    std::env::var_os("SI_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache/si-appliance"))
}

pub fn test_cache_root() -> PathBuf {
    std::env::var_os("SI_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/si-appliance-test"))
}

/// Runs one of the project's cache builders (each locks its artefact, checks it and returns at
/// once when it is good; see pxe-assets/cache-lib.sh), panicking with its output when it fails.
pub fn run_builder(rel: &str, args: &[&Path], env: &[(&str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let out = Command::new(&script)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed: {}\n{}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

/// A directory named by `var`, else `default`.
fn dir_from(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

/// The debootstrap minbase tree (`SI_TEST_DEBIAN_IMAGE`, default in the test cache), built on
/// first use by vm-tests/make-debian-image.sh.
pub fn debian_image() -> PathBuf {
    let dir = dir_from("SI_TEST_DEBIAN_IMAGE", test_cache_root().join("bookworm-minbase"));
    run_builder("vm-tests/make-debian-image.sh", &[&dir], &[]);
    dir
}

/// The lab's bootable demo tree (`SI_TEST_DEMO_IMAGE`, default in the test cache), built on
/// first use by qemu/make-demo-image.sh.
pub fn demo_image() -> PathBuf {
    let dir = dir_from("SI_TEST_DEMO_IMAGE", test_cache_root().join("demo-bookworm"));
    run_builder("qemu/make-demo-image.sh", &[&dir], &[]);
    dir
}

/// The clients' kernel + installer initramfs around this very binary (`SI_CLIENT_BOOT_DIR`,
/// default in the cache), built by pxe-assets/build-client.sh when its inputs changed.
pub fn client_boot_dir() -> PathBuf {
    let dir = dir_from("SI_CLIENT_BOOT_DIR", cache_root().join("client-boot"));
    run_builder("pxe-assets/build-client.sh", &[&dir], &[("SI_APPLIANCE_BIN", appliance_bin())]);
    dir
}

/// iPXE 2.0's UEFI binaries (`snponly.efi`, `ipxe.efi`: digest commands), from Debian's
/// package, checked against the archive's signature (`SI_IPXE_EFI_DIR`, default in the cache),
/// fetched by pxe-assets/fetch-ipxe-efi.sh when missing.
pub fn ipxe_efi_dir() -> PathBuf {
    let dir = dir_from("SI_IPXE_EFI_DIR", cache_root().join("ipxe-efi"));
    run_builder("pxe-assets/fetch-ipxe-efi.sh", &[&dir], &[]);
    dir
}

/// The test boot files (cloud kernel + a marker initramfs; `SI_TEST_BOOT_DIR`, default in the
/// cache), built by pxe-assets/build-test-boot.sh when its inputs changed.
pub fn test_boot_dir() -> PathBuf {
    let dir = dir_from("SI_TEST_BOOT_DIR", cache_root().join("test-boot"));
    run_builder("pxe-assets/build-test-boot.sh", &[&dir], &[]);
    dir
}

/// Starts the appliance inside `ns` with `config` (TOML text) and extra flags, and waits for
/// its "ready" line.
pub fn start_appliance(lab: &Lab, host: usize, name: &str, config: &str, args: &[&str]) -> Proc {
    start_appliance_under(lab, host, name, config, args, &[])
}

/// [`start_appliance`] through a wrapper command (e.g. `["prlimit", "--nofile=1024:", "--"]`).
pub fn start_appliance_under(lab: &Lab, host: usize, name: &str, config: &str, args: &[&str], wrapper: &[&str]) -> Proc {
    let cfg = lab.path(&format!("{name}.toml"));
    fs::write(&cfg, config).expect("write config");
    let mut cmd = match wrapper.split_first() {
        Some((prog, rest)) => {
            let mut c = lab.hosts[host].cmd(prog);
            c.args(rest).arg(appliance_bin());
            c
        }
        None => lab.hosts[host].cmd(appliance_bin()),
    };
    cmd.arg("--config").arg(&cfg).args(args).env("RUST_LOG", "info,si_appliance=debug");
    let mut p = Proc::spawn(name, cmd, lab.path(&format!("{name}.log")));
    p.wait_log("si-appliance ready", Duration::from_secs(30));
    p
}

/// Reads lines of a file that match a predicate (for lease files and logs).
pub fn grep_lines(path: &Path, pred: impl Fn(&str) -> bool) -> Vec<String> {
    match fs::File::open(path) {
        Ok(f) => BufReader::new(f).lines().map_while(Result::ok).filter(|l| pred(l)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Text without ANSI CSI escapes (ESC [ … letter). The appliance writes plain logs off a terminal;
/// this keeps log matching right for tools that colour regardless.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Headless Chromium in host `h`'s namespace: the dashboard's DOM after `budget_ms` of
/// (virtual) time, and a screenshot at `shot` if given. No sandbox (root), no background networking,
/// a new profile directory in the lab.
pub fn chromium(lab: &Lab, h: usize, url: &str, shot: Option<&Path>) -> String {
    // A new profile per call: nothing (localStorage, cache) carries over between calls.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let profile = lab.path(&format!("chromium-profile-{}", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--metrics-recording-only",
        "--virtual-time-budget=5000",
        "--window-size=1400,1100",
    ];
    let run = |extra: &str| -> Output {
        let mut c = lab.hosts[h].cmd("timeout");
        c.args(["60", "chromium"]).args(common).arg(format!("--user-data-dir={}", profile.display())).arg(extra).arg(url);
        c.env("HOME", lab.path("chromium-home"));
        c.output().expect("chromium (Debian package chromium; vm-tests/install-deps.sh)")
    };
    let dom = run("--dump-dom");
    assert!(dom.status.success(), "chromium --dump-dom: {}", String::from_utf8_lossy(&dom.stderr));
    if let Some(shot) = shot {
        let out = run(&format!("--screenshot={}", shot.display()));
        assert!(out.status.success() && shot.is_file(), "chromium --screenshot: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// utime + stime of a process (all its threads; a zombie's too) in seconds, from
/// `/proc/PID/stat` at the kernel's clock rate `sysconf(_SC_CLK_TCK)`; None once it is reaped.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|(user, sys)| user + sys)
}

/// CPU seconds a process used so far, apart: (user, system). System time includes the kernel's
/// packet processing that ran in the process's context (in the labs: the emulated links,
/// bridge and queues its sends pass through), not only its own syscalls.
pub fn cpu_split(pid: u32) -> Option<(f64, f64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from its end.
    // utime and stime are fields 14 and 15 of proc_pid_stat(5); after ") " comes field 3.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (f.len() == 2 && hz > 0).then(|| (f[0] as f64 / hz as f64, f[1] as f64 / hz as f64))
}

/// Removes a directory (a lab's archives, copies and state) when the test passes; a failed
/// test keeps it for reading. Declare it after the Lab, so it drops after every Proc.
pub struct RemoveOnSuccess(pub PathBuf);

impl Drop for RemoveOnSuccess {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes `n` random bytes to `path` and returns them.
pub fn random_file(path: &Path, n: u64) -> Vec<u8> {
    use rand::RngCore;
    let mut data = vec![0u8; usize::try_from(n).expect("size fits memory")];
    rand::rng().fill_bytes(&mut data);
    fs::write(path, &data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    data
}

/// A QEMU VM's serial console file, read as it grows: complete lines (ANSI sequences stripped)
/// stamped with the caller's clock, over every power-on (`switch_to` a new file per boot keeps
/// the earlier lines).
pub struct Serial {
    path: PathBuf,
    offset: u64,
    partial: String,
    /// (caller's seconds, line), in arrival order.
    pub lines: Vec<(f64, String)>,
}

impl Serial {
    /// A reader of `path` (which may not exist yet).
    pub fn new(path: PathBuf) -> Serial {
        Serial { path, offset: 0, partial: String::new(), lines: Vec::new() }
    }

    /// Reads `path` from its start from now on (a new boot's file); the lines so far stay.
    pub fn switch_to(&mut self, path: PathBuf) {
        self.path = path;
        self.offset = 0;
        self.partial.clear();
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes in what the file gained since the last call, stamping complete lines with `t`. A
    /// login prompt (`… login: `, no newline after it) counts as a line.
    pub fn drain(&mut self, t: f64) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = fs::File::open(&self.path) else { return };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            self.lines.push((t, strip_ansi(line.trim_end_matches(['\r', '\n']))));
        }
        if self.partial.trim_end().ends_with("login:") {
            let line = std::mem::take(&mut self.partial);
            self.lines.push((t, strip_ansi(line.trim_end())));
        }
    }

    /// When a line containing `needle` first came, at or after `from`.
    pub fn first_after(&self, needle: &str, from: f64) -> Option<f64> {
        self.lines.iter().find(|(t, l)| *t >= from && l.contains(needle)).map(|(t, _)| *t)
    }

    /// Whether any line contains `needle`.
    pub fn has(&self, needle: &str) -> bool {
        self.first_after(needle, f64::MIN).is_some()
    }

    /// The last `n` lines, stamped, for a failure message.
    pub fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        self.lines[from..].iter().map(|(t, l)| format!("{t:8.2} {l}\n")).collect()
    }
}

/// The host name in a `NAME login:` line (a getty's prompt on a serial console).
pub fn login_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if words.peek() == Some(&"login:") {
            return Some(w.to_owned());
        }
    }
    None
}
