//! Swarm benchmark (not a test): one command, run as root,
//!
//!     cargo bench --bench swarm                 # N=8, C=100 Mbit/s, S=64 MiB
//!     N=32 C=40 cargo bench --bench swarm       # or: cargo bench --bench swarm -- N=32 C=40
//!
//! Builds a star in network namespaces it creates: a switch namespace with a bridge, the
//! appliance (10.70.0.1) and N client namespaces. Every veth end is shaped with HTB
//! (rate = ceil = C) and a byte-limited bfifo, in both directions, so every host has upload C and
//! download C and the appliance's link equals a client's. Then, in the same run, it distributes
//! one S-byte random archive by
//!
//! - `http`:   N × curl in parallel from the appliance's `/images/<name>.tar.zst` route;
//! - `ours`:   the appliance (tracker + librqbit seed) and N `si-appliance fetch --seed-until-done`;
//! - `aria2c`: opentracker + an aria2c seed on the appliance host and N aria2c clients,
//!
//! and prints per method: per-client completion times (from each client's own signal: curl's
//! exit, fetch's "download complete" log line, aria2c's on-bt-download-complete hook), makespan,
//! T* (S / the goodput of one TCP stream over one shaped link, measured first in the same run),
//! makespan / T*, the seed's upload in copies of S (bytes sent on the appliance's link, framing
//! included), CPU seconds (server, clients, per client per 64 MiB and its user part, the machine's busy share
//! with a saturation flag) and peak RSS of the server and of one client. Every copy is checked
//! by sha256. Namespaces and processes are removed on exit and on Ctrl-C / SIGTERM.
//!
//! Options (environment or `KEY=VALUE` arguments): `N` clients (default 8), `C` link rate in
//! Mbit/s (default 100), `S` archive size in MiB (default 64), `METHODS` (default
//! `http,ours,aria2c`; a method may repeat), `SWARM` extra `[swarm]` lines for the appliance in
//! the `ours` runs (design experiments; `||` separates variants for successive `ours` runs, e.g.
//! `METHODS=ours,ours SWARM='seed_peers = 0||seed_peers = 2'`), `BINS` the clients' binary per `ours`
//! run, `||`-separated and cycled like `SWARM`, empty = the one built (before/after in one run:
//! `METHODS=ours,ours BINS='/var/tmp/si-appliance-before||'`; the appliance is always the one
//! built), `KEEP=1` keeps the logs, `FETCH_LOG` is the clients' RUST_LOG (default info), `CAP` seconds a method may run at most (default
//! max(90, 12 × T*); an unfinished HTTP run is extrapolated from the bytes delivered, and says so),
//! `QUEUE_MS` each link's queue in milliseconds of data at its rate (default 30; the packets the
//! switch's port queues dropped are printed per method), `CC` the TCP congestion control of every
//! namespace (default cubic, the default of the nodes' Debian kernel: a new namespace would take
//! the build machine's, BBR on this one; the bench adds it to the host's
//! `tcp_allowed_congestion_control` for the run and puts the list back after), `SYSCTL` extra
//! `key=value` sysctls (comma-separated) set in every namespace, the switch's too (emulation
//! experiments, e.g. `SYSCTL=net.ipv4.tcp_min_tso_segs=16`), `HOST_QDISC=pfifo` each host's own
//! egress queue as a Linux NIC's (1000 packets) instead of the `QUEUE_MS` byte FIFO the switch
//! ports keep (this kernel has no fq_codel to emulate a systemd host's).
//!
//! Scenarios (percentages of the N clients, spread over the address range, client 1 never: it
//! measures T*), applied alike to every method of the run:
//! - `SLOW=20`: those clients' links (both directions) run at C/4; the fast clients' makespan
//!   is reported apart (they must not wait for the slow ones), the slow ones' against 4 × T*.
//! - `LATE=10`: those clients start min(30 s, 2 × T*) after the others (the delay is printed);
//!   their completion is reported from their own start too.
//! - `KILL=10`: those clients are killed with SIGKILL once their link received S/2 bytes
//!   (about half the download); the makespan is that of the others, which must all complete.
//!   For `ours` the appliance then expects N minus the killed nodes for its swarm-done signal.
//! - `JSON=FILE`: writes the run's figures (N, C, S, the scenario, T*, per method the per-client
//!   completion times, makespan, seed copies, machine busy share, load average) for the
//!   simulator's calibration (`cargo bench --bench swarm_sim`).
#[path = "common/mod.rs"]
mod common;

use common::interrupt::{install_cleanup, register, register_ns, set_scratch};

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Lab, Netns, Proc, appliance_bin, cpu_secs, cpu_split, start_appliance, wait_for};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const APP_IP: &str = "10.70.0.1";
const HTTP_PORT: u16 = 8080;
const OT_PORT: u16 = 6969;

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    n: usize,
    mbit: u32,
    size: u64,
    methods: Vec<String>,
    swarm_extra: String,
    bins: String,
    cap: Option<f64>,
    slow_pct: u64,
    late_pct: u64,
    kill_pct: u64,
    json: Option<PathBuf>,
    /// Each link's queue (bfifo) in milliseconds of data at its rate.
    queue_ms: u64,
    /// The queue of each host's own egress shaping.
    host_queue: HostQueue,
    /// TCP congestion control in every namespace.
    cc: String,
    /// Extra `key=value` sysctls set in every namespace (the switch's too).
    sysctls: Vec<String>,
}

/// Who is what in a scenario run (index = client - 1).
#[derive(Default)]
struct Scenario {
    slow: Vec<bool>,
    late: Vec<bool>,
    kill: Vec<bool>,
    /// Seconds the late clients start after the others.
    late_delay: f64,
}

impl Scenario {
    fn new(o: &Opts) -> Scenario {
        Scenario { slow: spread(o.n, o.slow_pct, 0), late: spread(o.n, o.late_pct, 1), kill: spread(o.n, o.kill_pct, 2), late_delay: 0.0 }
    }

    fn killed_count(&self) -> usize {
        self.kill.iter().filter(|k| **k).count()
    }
}

/// `pct` % of `n` clients (at least one when `pct` > 0), spread evenly from the top of the
/// address range down, `offset` below it (knobs use different offsets); never client 1 (index 0).
fn spread(n: usize, pct: u64, offset: usize) -> Vec<bool> {
    let mut v = vec![false; n];
    if pct == 0 || n < 2 {
        return v;
    }
    let k = ((n as u64 * pct + 50) / 100).max(1) as usize;
    let step = (n / k).max(1);
    for j in 0..k {
        if let Some(i) = (n - 1).checked_sub(j * step + offset) {
            if i > 0 {
                v[i] = true;
            }
        }
    }
    v
}

fn opts() -> Opts {
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    for k in ["N", "C", "S", "METHODS", "SWARM", "BINS", "CAP", "SLOW", "LATE", "KILL", "JSON", "QUEUE_MS", "CC", "HOST_QDISC"] {
        if let Ok(v) = std::env::var(k) {
            kv.insert(k.into(), v);
        }
    }
    for a in std::env::args().skip(1) {
        if let Some((k, v)) = a.split_once('=') {
            kv.insert(k.to_uppercase(), v.into());
        }
    }
    let num = |k: &str, d: u64| kv.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(d);
    Opts {
        n: num("N", 8).clamp(1, 240) as usize,
        mbit: num("C", 100).clamp(1, 10_000) as u32,
        size: num("S", 64).clamp(1, 4096) * MIB,
        methods: kv.get("METHODS").map_or("http,ours,aria2c", |s| s.as_str()).split(',').map(|s| s.trim().to_owned()).collect(),
        swarm_extra: kv.get("SWARM").cloned().unwrap_or_default().replace("\\n", "\n"),
        bins: kv.get("BINS").cloned().unwrap_or_default(),
        cap: kv.get("CAP").and_then(|v| v.parse().ok()),
        slow_pct: num("SLOW", 0).min(90),
        late_pct: num("LATE", 0).min(90),
        kill_pct: num("KILL", 0).min(90),
        json: kv.get("JSON").filter(|v| !v.is_empty()).map(PathBuf::from),
        queue_ms: num("QUEUE_MS", 30).clamp(1, 10_000),
        host_queue: match kv.get("HOST_QDISC").map(String::as_str) {
            None | Some("bfifo") => HostQueue::Bfifo,
            Some("pfifo") => HostQueue::Pfifo,
            Some(other) => panic!("swarm bench: HOST_QDISC={other}: bfifo or pfifo"),
        },
        cc: kv.get("CC").cloned().unwrap_or_else(|| "cubic".into()),
        sysctls: kv.get("SYSCTL").map(|v| v.split([',', ' ']).filter(|s| s.contains('=')).map(str::to_owned).collect()).unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------
// /proc figures

/// VmHWM in KiB (0 for a zombie).
fn hwm_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// (busy, total) jiffies of the whole machine.
fn machine_jiffies() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Bytes sent on `eth0` of a namespace.
fn tx_bytes(ns: &Netns) -> u64 {
    let out = ns.cmd("cat").arg("/sys/class/net/eth0/statistics/tx_bytes").output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(0)
}

/// (dropped, sent) packets of every queue in a namespace (`tc -s qdisc`, leaf bfifos only).
fn queue_drops(ns: &Netns) -> (u64, u64) {
    let out = ns.cmd("tc").args(["-s", "qdisc", "show"]).output().ok();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let (mut dropped, mut sent) = (0, 0);
    let mut leaf = false;
    for line in text.lines() {
        if line.starts_with("qdisc ") {
            leaf = line.starts_with("qdisc bfifo");
        } else if leaf && line.trim_start().starts_with("Sent ") {
            // " Sent 71848601 bytes 57547 pkt (dropped 214, overlimits 0 requeues 0)"
            let w: Vec<&str> = line.split_whitespace().collect();
            sent += w.get(3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            dropped += w.get(6).and_then(|v| v.trim_end_matches(',').parse::<u64>().ok()).unwrap_or(0);
        }
    }
    (dropped, sent)
}

/// A new namespace may only choose a congestion control the initial namespace allows
/// (`tcp_allowed_congestion_control`); this adds `cc` there for the lab's life and puts the
/// list back on drop (unless someone changed it since).
struct AllowCc {
    was: Option<String>,
    now: String,
}

const ALLOWED_CC: &str = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";

impl AllowCc {
    fn new(cc: &str) -> AllowCc {
        let was = fs::read_to_string(ALLOWED_CC).unwrap_or_default().trim().to_owned();
        if was.split_whitespace().any(|c| c == cc) {
            return AllowCc { was: None, now: was };
        }
        let now = format!("{was} {cc}");
        if let Err(e) = fs::write(ALLOWED_CC, &now) {
            eprintln!("swarm bench: cannot allow {cc} in namespaces ({e})");
            return AllowCc { was: None, now: was };
        }
        let now = fs::read_to_string(ALLOWED_CC).unwrap_or_default().trim().to_owned();
        eprintln!("swarm bench: {ALLOWED_CC}: {was:?} -> {now:?} for this run");
        AllowCc { was: Some(was), now }
    }
}

impl Drop for AllowCc {
    fn drop(&mut self) {
        if let Some(was) = &self.was {
            if fs::read_to_string(ALLOWED_CC).unwrap_or_default().trim() == self.now {
                let _ = fs::write(ALLOWED_CC, was);
            }
        }
    }
}

/// The last figures seen of a watched process.
#[derive(Default, Clone, Copy)]
struct Seen {
    cpu: f64,
    /// Of `cpu`, user time (the rest is system time: syscalls and the emulated network's
    /// packet processing charged to the process).
    user: f64,
    hwm: u64,
}

fn sample(pid: u32, s: &mut Seen) {
    if let Some((u, k)) = cpu_split(pid) {
        s.cpu = s.cpu.max(u + k);
        s.user = s.user.max(u);
    }
    s.hwm = s.hwm.max(hwm_kib(pid));
}

// ---------------------------------------------------------------------------------------------
// Lab

fn client_ip(i: usize) -> String {
    format!("10.70.{}.{}", 1 + i / 200, 10 + i % 200)
}

/// The queue behind a link's rate limit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostQueue {
    /// A byte FIFO of `QUEUE_MS` (what the switch ports always have).
    Bfifo,
    /// 1000 packets: a Linux host's NIC queue (pfifo_fast, txqueuelen 1000).
    Pfifo,
}

/// Shapes `dev` to `kbit` kbit/s (kbit, not Mbit: a slow link is C/4, and at C = 10 whole
/// Mbit/s made it 2, not 2.5 — until stop 43 every C = 10 run's slow nodes were on 0.8 × C/4).
fn shape(ns: &Netns, dev: &str, kbit: u64, queue_ms: u64, leaf: HostQueue) {
    // A byte-limited FIFO: `queue_ms` (default 30) of data, at least one 64 KiB offload packet
    // with its headers and two full frames (a floor of exactly 64 KiB held no full-size offload
    // packet: at 10 Mbit/s one TCP stream moved 0.4 Mbit/s).
    let limit = ((kbit * 1000 / 8) * queue_ms / 1000).max(64 * 1024 + 2 * 1514);
    let lim = limit.to_string();
    let rate = format!("{kbit}kbit");
    let q = format!("{}", (kbit * 1000 / 8 / 1000).clamp(1514, 60_000));
    for args in [
        vec!["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"],
        vec!["class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", &rate, "ceil", &rate, "quantum", &q],
        if leaf == HostQueue::Pfifo {
            vec!["qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "pfifo", "limit", "1000"]
        } else {
            vec!["qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "bfifo", "limit", &lim]
        },
    ] {
        common::run(ns.cmd("tc").args(&args));
    }
}

fn sha256(path: &Path) -> String {
    let Ok(mut f) = fs::File::open(path) else { return String::new() };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => h.update(&buf[..n]),
        }
    }
    hex::encode(h.finalize())
}

fn mkdir(p: &Path) -> PathBuf {
    fs::create_dir_all(p).expect("mkdir");
    p.to_owned()
}

/// Which method run this is (methods may be repeated: `METHODS=ours,ours`): names of logs,
/// state and output directories carry it.
static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn run_no() -> usize {
    RUN.load(Ordering::Relaxed)
}

fn spawn(lab: &Lab, name: &str, mut cmd: std::process::Command) -> Proc {
    cmd.current_dir(&lab.dir);
    let name = format!("r{}-{name}", run_no());
    let p = Proc::spawn(&name, cmd, lab.path(&format!("{name}.log")));
    register(&p);
    p
}

// ---------------------------------------------------------------------------------------------
// One method's run

#[derive(Default)]
struct Outcome {
    method: String,
    /// Seconds from the start to each client's completion (None: not finished).
    done: Vec<Option<f64>>,
    /// Makespan extrapolated from delivered bytes (unfinished HTTP runs only).
    extrapolated: Option<f64>,
    seed_tx: u64,
    server: Seen,
    clients: Vec<Seen>,
    busy_frac: f64,
    wall: f64,
    bad_copies: usize,
    /// (packets dropped, packets sent) by the switch's port queues (the hosts' downlinks).
    switch_drops: (u64, u64),
    note: String,
    /// Clients killed mid-download (KILL).
    killed: Vec<bool>,
    /// Bytes the seed sent to each client address (its TCP connections' `bytes_acked`, from
    /// `ss` on the appliance, sampled every second; the largest value seen per connection).
    seed_to: BTreeMap<String, u64>,
}

/// `bytes_acked` of every established connection from `port` in namespace `ns`, by
/// (peer address, peer port).
fn seed_flows(ns: &Netns, port: u16) -> Vec<(String, u64)> {
    let Ok(o) = ns.cmd("ss").args(["-Htin", "state", "established", &format!("sport = :{port}")]).output() else { return Vec::new() };
    let text = String::from_utf8_lossy(&o.stdout);
    let mut out = Vec::new();
    let mut peer: Option<String> = None;
    for tok in text.split_whitespace() {
        // Local and peer `addr:port` (IPv4, or IPv4-mapped `[::ffff:a.b.c.d]:port`); the
        // local one ends with the seed's port.
        let t = tok.replace("[::ffff:", "").replace(']', "");
        if t.contains(':') && t.chars().next().is_some_and(|c| c.is_ascii_digit()) && !t.ends_with(&format!(":{port}")) {
            peer = Some(t);
        }
        if let (Some(v), Some(p)) = (tok.strip_prefix("bytes_acked:"), &peer) {
            if let Ok(n) = v.parse() {
                out.push((p.clone(), n));
            }
        }
    }
    out
}

/// Bytes received on `eth0` by the namespace of process `pid`, once it runs its program (not
/// while `ip netns exec` or the late start's `sh` still holds the pid).
fn rx_bytes_of(pid: u32) -> Option<u64> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if matches!(comm.trim(), "ip" | "sh" | "sleep") {
        return None;
    }
    let dev = fs::read_to_string(format!("/proc/{pid}/net/dev")).ok()?;
    let line = dev.lines().find(|l| l.trim_start().starts_with("eth0:"))?;
    line.split_once(':')?.1.split_whitespace().next()?.parse().ok()
}

/// What [`watch`] saw.
struct Watched {
    done: Vec<Option<f64>>,
    server: Seen,
    clients: Vec<Seen>,
    busy: f64,
    wall: f64,
    killed: Vec<bool>,
    seed_to: BTreeMap<String, u64>,
}

/// Polls until every client is done or killed (or `cap`): `is_done(i)` says whether client i
/// finished; processes are sampled every 50 ms. Clients marked in `sc.kill` get SIGKILL once
/// their link received `size / 2` bytes.
fn watch(
    server_pids: &[u32],
    clients: &mut [Proc],
    cap: f64,
    sc: &Scenario,
    size: u64,
    seed: Option<(&Netns, u16)>,
    mut is_done: impl FnMut(usize, &mut Proc) -> bool,
) -> Watched {
    let mut flows: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_ss = Instant::now();
    let t0 = Instant::now();
    let j0 = machine_jiffies();
    let mut done: Vec<Option<f64>> = vec![None; clients.len()];
    let mut killed = vec![false; clients.len()];
    // The namespace's counter at the client's start (earlier methods' traffic is not counted).
    let mut rx0: Vec<Option<u64>> = vec![None; clients.len()];
    let mut server = Seen::default();
    let mut seen = vec![Seen::default(); clients.len()];
    loop {
        for pid in server_pids {
            server.hwm = server.hwm.max(hwm_kib(*pid));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            sample(c.child.id(), &mut seen[i]);
            if sc.kill.get(i).copied().unwrap_or(false) && !killed[i] && done[i].is_none() {
                let rx = rx_bytes_of(c.child.id());
                if rx0[i].is_none() {
                    rx0[i] = rx;
                }
                if rx.zip(rx0[i]).is_some_and(|(b, b0)| b.saturating_sub(b0) >= size / 2) {
                    let _ = c.child.kill();
                    killed[i] = true;
                    eprintln!("  client {} killed (SIGKILL) at {:.2} s, S/2 received", i + 1, t0.elapsed().as_secs_f64());
                    continue;
                }
            }
            if done[i].is_none() && !killed[i] && is_done(i, c) {
                done[i] = Some(t0.elapsed().as_secs_f64());
            }
        }
        let finished = (0..done.len()).all(|i| done[i].is_some() || killed[i]) || t0.elapsed().as_secs_f64() > cap;
        if let Some((ns, port)) = seed {
            if finished || last_ss.elapsed() >= Duration::from_secs(1) {
                last_ss = Instant::now();
                for (peer, n) in seed_flows(ns, port) {
                    let e = flows.entry(peer).or_default();
                    *e = (*e).max(n);
                }
            }
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = t0.elapsed().as_secs_f64();
    let j1 = machine_jiffies();
    let busy = (j1.0 - j0.0) as f64 / ((j1.1 - j0.1).max(1)) as f64;
    // Per client address: the sum over its connections.
    let mut seed_to: BTreeMap<String, u64> = BTreeMap::new();
    for (peer, n) in flows {
        let ip = peer.rsplit_once(':').map_or(peer.clone(), |(a, _)| a.to_owned());
        *seed_to.entry(ip).or_default() += n;
    }
    Watched { done, server, clients: seen, busy, wall, killed, seed_to }
}

/// The command for client `h` (1-based) running `prog`: a late client starts after the delay
/// (`sh` execs the program, so the pid stays the one watched).
fn client_cmd(lab: &Lab, sc: &Scenario, h: usize, prog: &str) -> std::process::Command {
    if sc.late.get(h - 1).copied().unwrap_or(false) {
        let mut c = lab.hosts[h].cmd("sh");
        c.args(["-c", &format!("sleep {:.2}; exec \"$0\" \"$@\"", sc.late_delay), prog]);
        c
    } else {
        lab.hosts[h].cmd(prog)
    }
}

fn server_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_secs(*p)).sum()
}

// ---------------------------------------------------------------------------------------------

fn appliance_config(lab: &Lab, tag: &str, archive: &Path, n: usize, extra: &str) -> String {
    format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{}\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n\
         [http]\nport = {HTTP_PORT}\n[swarm]\narchives = [\"{}\"]\nlisten_port = 6881\n\
         announce_interval = \"5s\"\npeer_timeout = \"30s\"\nexpected_nodes = {n}\n{extra}\n",
        lab.path(&format!("{tag}-store")).display(),
        lab.path(&format!("{tag}-state")).display(),
        archive.display()
    )
}

/// One TCP stream over one shaped link: curl of the archive from the appliance by client 1.
fn measure_tstar(lab: &Lab, size: u64) -> f64 {
    let url = format!("http://{APP_IP}:{HTTP_PORT}/images/img.tar.zst");
    let out = lab.hosts[1].cmd("curl").args(["-sS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", "--max-time", "600", &url]).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    let got: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let secs: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    assert_eq!(got, size, "T* probe: curl got {got} bytes: {}", String::from_utf8_lossy(&out.stderr));
    secs
}

fn run_http(lab: &Lab, o: &Opts, sc: &Scenario, archive: &Path, want: &str, cap: f64) -> Outcome {
    let appliance = start_appliance(lab, 0, &format!("r{}-app-http", run_no()), &appliance_config(lab, &format!("r{}-h", run_no()), archive, o.n, ""), &[]);
    register(&appliance);
    let pids = [appliance.child.id()];
    let cpu0 = server_cpu(&pids);
    let tx0 = tx_bytes(&lab.hosts[0]);
    let url = format!("http://{APP_IP}:{HTTP_PORT}/images/img.tar.zst");
    let outs: Vec<PathBuf> = (1..=o.n).map(|h| mkdir(&lab.path(&format!("r{}-http-c{h}", run_no()))).join("img.tar.zst")).collect();
    let mut clients: Vec<Proc> = (1..=o.n)
        .map(|h| {
            let mut c = client_cmd(lab, sc, h, "curl");
            c.args(["-sS", "--max-time", "3600", "-o"]).arg(&outs[h - 1]).arg(&url);
            spawn(lab, &format!("curl{h}"), c)
        })
        .collect();
    let w = watch(&pids, &mut clients, cap, sc, o.size, None, |_, c| matches!(c.child.try_wait(), Ok(Some(_))));
    let (wall, mut server) = (w.wall, w.server);
    server.cpu = server_cpu(&pids) - cpu0;
    let seed_tx = tx_bytes(&lab.hosts[0]) - tx0;
    let mut out = Outcome { method: "http".into(), done: w.done, seed_tx, server, clients: w.clients, busy_frac: w.busy, wall, killed: w.killed, ..Default::default() };
    if (0..o.n).any(|i| out.done[i].is_none() && !out.killed[i]) {
        // Unfinished (the server's uplink is the limit): extrapolate from the bytes delivered.
        let got: u64 = outs.iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
        if got > 0 {
            out.extrapolated = Some(wall * (o.n as u64 * o.size) as f64 / got as f64);
        }
        out.note = format!("stopped after {wall:.0} s, {:.0} % delivered; makespan extrapolated", got as f64 * 100.0 / (o.n as u64 * o.size) as f64);
    }
    drop(clients);
    drop(appliance);
    out.bad_copies = if out.extrapolated.is_some() { 0 } else { outs.iter().enumerate().filter(|(i, p)| !out.killed[*i] && sha256(p) != want).count() };
    for p in &outs {
        let _ = fs::remove_file(p);
    }
    out
}

fn run_ours(lab: &Lab, o: &Opts, sc: &Scenario, archive: &Path, want: &str, cap: f64, k: usize) -> Outcome {
    // `SWARM` may hold variants separated by `||`, one per `ours` run (cycled).
    let variants: Vec<&str> = o.swarm_extra.split("||").map(str::trim).collect();
    let extra = variants[k % variants.len()];
    let bins: Vec<&str> = o.bins.split("||").map(str::trim).collect();
    let bin = match bins[k % bins.len()] {
        "" => appliance_bin().to_owned(),
        b => b.to_owned(),
    };
    // Killed nodes never complete: the swarm is done when the others are.
    let expected = o.n - sc.killed_count();
    let appliance = start_appliance(lab, 0, &format!("r{}-app-ours", run_no()), &appliance_config(lab, &format!("r{}-o", run_no()), archive, expected, extra), &[]);
    register(&appliance);
    let pids = [appliance.child.id()];
    let cpu0 = server_cpu(&pids);
    let tx0 = tx_bytes(&lab.hosts[0]);
    let srv = format!("{APP_IP}:{HTTP_PORT}");
    let outs: Vec<PathBuf> = (1..=o.n).map(|h| mkdir(&lab.path(&format!("r{}-ours-c{h}", run_no()))).join("img.tar.zst")).collect();
    let mut clients: Vec<Proc> = (1..=o.n)
        .map(|h| {
            let mut c = client_cmd(lab, sc, h, &bin);
            c.args(["fetch", "--server", &srv, "--image", "img", "--iface", "eth0", "--seed-until-done", "--seed-for", "900s", "--out"])
                .arg(&outs[h - 1])
                .env("RUST_LOG", std::env::var("FETCH_LOG").unwrap_or_else(|_| "info".into()));
            spawn(lab, &format!("fetch{h}"), c)
        })
        .collect();
    let w = watch(&pids, &mut clients, cap, sc, o.size, Some((&lab.hosts[0], 6881)), |_, c| c.log_text().contains("download complete"));
    let mut server = w.server;
    server.cpu = server_cpu(&pids) - cpu0;
    let seed_tx = tx_bytes(&lab.hosts[0]) - tx0;
    // The clients stop by themselves once the appliance says the swarm is done.
    let stopped = wait_for(Duration::from_secs(15), || {
        clients.iter_mut().all(|c| matches!(c.child.try_wait(), Ok(Some(_)))).then_some(())
    });
    let by_done = clients.iter().filter(|c| c.log_text().contains("stopped=swarm-done")).count();
    let note = format!(
        "{by_done}/{expected} clients stopped on the appliance's swarm-done signal{}",
        if stopped.is_none() { " (others still seeding after 15 s)" } else { "" }
    );
    drop(clients);
    drop(appliance);
    let bad = outs.iter().enumerate().filter(|(i, p)| !w.killed[*i] && sha256(p) != want).count();
    for p in &outs {
        let _ = fs::remove_file(p);
    }
    let mut method = if extra.is_empty() { "ours".into() } else { format!("ours ({})", extra.replace('\n', "; ")) };
    if bin != appliance_bin() {
        method.push_str(&format!(" [{bin}]"));
    }
    Outcome { method, done: w.done, seed_tx, server, clients: w.clients, busy_frac: w.busy, wall: w.wall, bad_copies: bad, note, killed: w.killed, seed_to: w.seed_to, ..Default::default() }
}

fn run_aria2c(lab: &Lab, o: &Opts, sc: &Scenario, archive: &Path, want: &str, cap: f64) -> Outcome {
    // A torrent announcing to opentracker, and its info-hash whitelisted.
    let announce = format!("http://{APP_IP}:{OT_PORT}/announce");
    let t = si_appliance::image::torrent::make(archive, "img.tar.zst", &announce).expect("torrent");
    let torrent = lab.path("ot.torrent");
    fs::write(&torrent, &t.bytes).expect("torrent");
    let otdir = mkdir(&lab.path("opentracker"));
    fs::write(otdir.join("whitelist"), format!("{}\n", t.info_hash)).expect("whitelist");
    let mut ot = lab.hosts[0].cmd("opentracker");
    // Debian's opentracker refuses to stay root: it chroots to -d and drops to -u itself.
    ot.args(["-i", APP_IP, "-p", &OT_PORT.to_string(), "-P", &OT_PORT.to_string(), "-d"])
        .arg(&otdir)
        .args(["-u", "nobody", "-w", "whitelist"]);
    let mut ot = spawn(lab, "opentracker", ot);
    let up = wait_for(Duration::from_secs(10), || {
        let o = lab.hosts[0].cmd("ss").args(["-Hltn", &format!("sport = :{OT_PORT}")]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).contains(&OT_PORT.to_string()).then_some(())
    });
    if up.is_none() {
        let _ = ot.child.try_wait();
        return Outcome { method: "aria2c+opentracker".into(), note: format!("opentracker did not start: {}", ot.log_text()), done: vec![None; o.n], ..Default::default() };
    }
    let base = [
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--file-allocation=none",
        "--seed-ratio=0.0",
        "--listen-port=6881",
    ];
    let sdir = archive.parent().expect("archive dir");
    let mut seed = lab.hosts[0].cmd("aria2c");
    seed.args(base).arg("--check-integrity=true").arg(format!("--dir={}", sdir.display())).arg(&torrent);
    let seed = spawn(lab, "aria2c-seed", seed);
    let listening = wait_for(Duration::from_secs(60), || {
        let o = lab.hosts[0].cmd("ss").args(["-Hltn", "sport = :6881"]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).contains("6881").then_some(())
    });
    assert!(listening.is_some(), "aria2c seed never listened:\n{}", seed.log_text());
    let hook = lab.path("aria2c-done.sh");
    fs::write(&hook, "#!/bin/sh\n: > \"$3.done\"\n").expect("hook");
    common::run(std::process::Command::new("chmod").arg("+x").arg(&hook));
    let pids = [seed.child.id(), ot.child.id()];
    let cpu0 = server_cpu(&pids);
    let tx0 = tx_bytes(&lab.hosts[0]);
    let outs: Vec<PathBuf> = (1..=o.n).map(|h| mkdir(&lab.path(&format!("r{}-aria-c{h}", run_no()))).join("img.tar.zst")).collect();
    let mut clients: Vec<Proc> = (1..=o.n)
        .map(|h| {
            let mut c = client_cmd(lab, sc, h, "aria2c");
            c.args(base)
                .arg(format!("--on-bt-download-complete={}", hook.display()))
                .arg(format!("--dir={}", outs[h - 1].parent().expect("dir").display()))
                .arg(&torrent);
            spawn(lab, &format!("aria2c{h}"), c)
        })
        .collect();
    let marks: Vec<PathBuf> = outs.iter().map(|p| PathBuf::from(format!("{}.done", p.display()))).collect();
    let w = watch(&pids, &mut clients, cap, sc, o.size, Some((&lab.hosts[0], 6881)), |i, _| marks[i].exists());
    let mut server = w.server;
    server.cpu = server_cpu(&pids) - cpu0;
    let seed_tx = tx_bytes(&lab.hosts[0]) - tx0;
    drop(clients);
    drop(seed);
    drop(ot);
    let bad = outs.iter().enumerate().filter(|(i, p)| !w.killed[*i] && sha256(p) != want).count();
    for p in outs.iter().chain(marks.iter()) {
        let _ = fs::remove_file(p);
    }
    Outcome { method: "aria2c+opentracker".into(), done: w.done, seed_tx, server, clients: w.clients, busy_frac: w.busy, wall: w.wall, bad_copies: bad, killed: w.killed, seed_to: w.seed_to, ..Default::default() }
}

// ---------------------------------------------------------------------------------------------

/// Makespan over the clients `pick` selects (NaN unless every selected one finished), shifted
/// by `minus` seconds (a late start).
fn makespan_of(r: &Outcome, pick: impl Fn(usize) -> bool, minus: f64) -> (f64, usize) {
    let sel: Vec<usize> = (0..r.done.len()).filter(|i| pick(*i)).collect();
    let t: Vec<f64> = sel.iter().filter_map(|i| r.done[*i]).collect();
    let m = if t.len() == sel.len() { t.iter().copied().fold(f64::NAN, f64::max) - minus } else { f64::NAN };
    (m, sel.len())
}

/// The scenario's groups, one line each (below the table).
fn report_groups(sc: &Scenario, tstar: f64, r: &Outcome) -> Vec<String> {
    let mut v = Vec::new();
    let killed = |i: usize| r.killed.get(i).copied().unwrap_or(false);
    if sc.slow.iter().any(|x| *x) {
        let (f, nf) = makespan_of(r, |i| !sc.slow[i] && !killed(i), 0.0);
        let (s, ns) = makespan_of(r, |i| sc.slow[i] && !killed(i), 0.0);
        v.push(format!(
            "{}: SLOW: {nf} fast clients' makespan {f:.2} s = {:.2} × T*; {ns} slow (C/4) clients' makespan {s:.2} s = {:.2} × 4T*",
            r.method,
            f / tstar,
            s / (4.0 * tstar)
        ));
    }
    if sc.late.iter().any(|x| *x) {
        let (e, ne) = makespan_of(r, |i| !sc.late[i] && !killed(i), 0.0);
        let (l, nl) = makespan_of(r, |i| sc.late[i] && !killed(i), sc.late_delay);
        v.push(format!(
            "{}: LATE: {ne} on-time clients' makespan {e:.2} s = {:.2} × T*; {nl} clients {:.1} s late: done {l:.2} s after their start = {:.2} × T*",
            r.method,
            e / tstar,
            sc.late_delay,
            l / tstar
        ));
    }
    if sc.kill.iter().any(|x| *x) {
        let k = r.killed.iter().filter(|x| **x).count();
        let (m, n) = makespan_of(r, |i| !killed(i), 0.0);
        v.push(format!("{}: KILL: {k} clients killed at S/2 received; the other {n}: makespan {m:.2} s = {:.2} × T*", r.method, m / tstar));
    }
    v
}

fn report(o: &Opts, tstar: f64, r: &Outcome) {
    let alive = (0..r.done.len()).filter(|i| !r.killed.get(*i).copied().unwrap_or(false)).count();
    let mut times: Vec<f64> = r.done.iter().flatten().copied().collect();
    times.sort_by(f64::total_cmp);
    let finished = times.len();
    let makespan = r.extrapolated.unwrap_or_else(|| if finished == alive { times.last().copied().unwrap_or(f64::NAN) } else { f64::NAN });
    let client_cpu: f64 = r.clients.iter().map(|s| s.cpu).sum();
    let per = client_cpu / o.n as f64 * (64 * MIB) as f64 / o.size as f64;
    let per_user = r.clients.iter().map(|s| s.user).sum::<f64>() / o.n as f64 * (64 * MIB) as f64 / o.size as f64;
    let sat = if r.busy_frac >= 0.9 { " CPU-SATURATED" } else { "" };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let own = (r.server.cpu + client_cpu) / (r.wall.max(1e-3) * cores);
    let med = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "| {} | {}/{} | {:.2} | {:.2} | {:.2} | {:.2}{} | {:.2} | {:.1} | {:.1} | {:.2} ({:.2} user) | {:.0} % ({:.0} % ours){} | {} | {} |",
        r.method,
        finished,
        alive,
        times.first().copied().unwrap_or(f64::NAN),
        med,
        makespan,
        makespan / tstar,
        if r.extrapolated.is_some() { " (extrap.)" } else { "" },
        r.seed_tx as f64 / o.size as f64,
        r.server.cpu,
        client_cpu,
        per,
        per_user,
        r.busy_frac * 100.0,
        own * 100.0,
        sat,
        r.server.hwm / 1024,
        r.clients.first().map_or(0, |s| s.hwm / 1024),
    );
    let list: Vec<String> = r.done.iter().map(|d| d.map_or("-".into(), |t| format!("{t:.2}"))).collect();
    eprintln!("  {} per-client completion (s, client 1..N; watched {:.1} s): {}", r.method, r.wall, list.join(" "));
    let (dropped, sent) = r.switch_drops;
    eprintln!(
        "  {}: the switch's port queues (downlinks) dropped {dropped} of {} packets ({:.2} %)",
        r.method,
        sent + dropped,
        dropped as f64 * 100.0 / (sent + dropped).max(1) as f64
    );
    if r.bad_copies > 0 {
        eprintln!("  {}: {} copies FAIL their sha256", r.method, r.bad_copies);
    }
    if !r.note.is_empty() {
        eprintln!("  {}: {}", r.method, r.note);
    }
    if !r.seed_to.is_empty() {
        let mut v: Vec<(u64, &String)> = r.seed_to.iter().map(|(a, n)| (*n, a)).collect();
        v.sort();
        let s = o.size as f64;
        let total: u64 = v.iter().map(|x| x.0).sum();
        let per = |x: u64| x as f64 / s;
        let by_client: Vec<String> = (0..o.n).map(|i| format!("{:.2}", per(r.seed_to.get(&client_ip(i)).copied().unwrap_or(0)))).collect();
        eprintln!(
            "  {}: seed → clients (ss bytes_acked, in S): {} clients, total {:.2}, min {:.3} median {:.3} max {:.3}; per client 1..N: {}",
            r.method,
            v.len(),
            per(total),
            per(v.first().map_or(0, |x| x.0)),
            per(v[v.len() / 2].0),
            per(v.last().map_or(0, |x| x.0)),
            by_client.join(" ")
        );
    }
}

/// The run's figures as JSON (the `JSON` option), for the simulator's calibration.
fn write_json(path: &Path, o: &Opts, sc: &Scenario, tstar: f64, results: &[Outcome]) {
    let runs: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let times: Vec<f64> = r.done.iter().flatten().copied().collect();
            let makespan = if times.len() == o.n { times.iter().copied().fold(0.0, f64::max) } else { f64::NAN };
            serde_json::json!({
                "method": r.method,
                "done": r.done,
                "makespan": if makespan.is_finite() { Some(makespan) } else { None },
                "seed_copies": r.seed_tx as f64 / o.size as f64,
                "busy": r.busy_frac,
                "saturated": r.busy_frac >= 0.9,
                "switch_drops": r.switch_drops.0,
                "switch_packets": r.switch_drops.0 + r.switch_drops.1,
                "wall": r.wall,
                "server_cpu": r.server.cpu,
                "clients_cpu": r.clients.iter().map(|c| c.cpu).sum::<f64>(),
                "clients_cpu_user": r.clients.iter().map(|c| c.user).sum::<f64>(),
            })
        })
        .collect();
    let v = serde_json::json!({
        "n": o.n,
        "mbit": o.mbit,
        "size": o.size,
        "piece_len": si_appliance::image::torrent::piece_length(o.size),
        "slow_pct": o.slow_pct,
        "slow": sc.slow.clone(),
        "tstar": tstar,
        "loadavg": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "runs": runs,
    });
    match fs::write(path, serde_json::to_vec_pretty(&v).unwrap_or_default()) {
        Ok(()) => eprintln!("swarm bench: figures written to {}", path.display()),
        Err(e) => eprintln!("swarm bench: cannot write {}: {e}", path.display()),
    }
}

fn main() {
    if std::fs::read_to_string("/proc/self/status")
        .map(|s| !s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(true)
    {
        eprintln!("swarm bench: run as root (it creates network namespaces)");
        std::process::exit(2);
    }
    let o = opts();
    let mut sc = Scenario::new(&o);
    // Scratch on tmpfs when there is one (N copies of the archive): the disk is not measured.
    if std::env::var_os("TMPDIR").is_none() && Path::new("/dev/shm").is_dir() {
        // SAFETY: single-threaded here (before the watcher thread starts).
        unsafe { std::env::set_var("TMPDIR", "/dev/shm") };
    }
    install_cleanup("swarm bench");
    let _allow_cc = AllowCc::new(&o.cc);
    let t_setup = Instant::now();
    let mut lab = Lab::new("bs");
    register_ns(&lab.switch);
    set_scratch(lab.dir.clone());
    let a = lab.add_host(Some(&format!("{APP_IP}/16")), None);
    register_ns(&lab.hosts[a]);
    for i in 0..o.n {
        let h = lab.add_host(Some(&format!("{}/16", client_ip(i))), None);
        register_ns(&lab.hosts[h]);
    }
    for h in 0..lab.hosts.len() {
        // A new namespace takes the host's default congestion control (BBR on some build
        // machines); the nodes run Debian's kernel, whose default is cubic.
        common::run(lab.hosts[h].cmd("sysctl").args(["-q", "-w", &format!("net.ipv4.tcp_congestion_control={}", o.cc)]));
        // Host 0 is the appliance; host h the client h (index h - 1).
        let slow = h > 0 && sc.slow[h - 1];
        let kbit = u64::from(o.mbit) * 1000;
        let rate = if slow { kbit / 4 } else { kbit };
        shape(&lab.hosts[h], "eth0", rate, o.queue_ms, o.host_queue);
        shape(&lab.switch, &format!("p{h}"), rate, o.queue_ms, HostQueue::Bfifo);
    }
    for ns in std::iter::once(&lab.switch).chain(&lab.hosts) {
        for kv in &o.sysctls {
            common::run(ns.cmd("sysctl").args(["-q", "-w", kv]));
        }
    }
    let archive_dir = mkdir(&lab.path("archive"));
    let archive = archive_dir.join("img.tar.zst");
    {
        let mut data = Vec::with_capacity(o.size as usize);
        fs::File::open("/dev/urandom").expect("urandom").take(o.size).read_to_end(&mut data).expect("urandom");
        fs::write(&archive, &data).expect("archive");
    }
    let want = sha256(&archive);
    eprintln!("swarm bench: N={} C={} Mbit/s S={} MiB SLOW={} %; lab {} ready in {:.1} s", o.n, o.mbit, o.size / MIB, o.slow_pct, lab.dir.display(), t_setup.elapsed().as_secs_f64());

    // T*: one TCP stream over one shaped link, from the appliance's HTTP server.
    let tstar = {
        let appliance = start_appliance(&lab, 0, "app-tstar", &appliance_config(&lab, "t", &archive, o.n, ""), &[]);
        let t = measure_tstar(&lab, o.size);
        drop(appliance);
        t
    };
    let ideal = o.size as f64 * 8.0 / (o.mbit as f64 * 1e6);
    eprintln!("swarm bench: T* = {tstar:.2} s measured (goodput {:.1} Mbit/s; raw S/C = {ideal:.2} s)", o.size as f64 * 8.0 / tstar / 1e6);
    sc.late_delay = (2.0 * tstar).min(30.0);
    let cap = o.cap.unwrap_or((12.0 * tstar).max(90.0) + if o.late_pct > 0 { sc.late_delay } else { 0.0 });
    let names = |v: &[bool]| (0..v.len()).filter(|i| v[*i]).map(|i| (i + 1).to_string()).collect::<Vec<_>>().join(",");
    if o.slow_pct + o.late_pct + o.kill_pct > 0 {
        eprintln!(
            "swarm bench: scenario SLOW={} % (clients {}, C/4) LATE={} % (clients {}, {:.1} s = min(30 s, 2 T*) late) KILL={} % (clients {})",
            o.slow_pct, names(&sc.slow), o.late_pct, names(&sc.late), sc.late_delay, o.kill_pct, names(&sc.kill)
        );
    }

    let mut results = Vec::new();
    let mut ours_runs = 0;
    for m in &o.methods {
        RUN.fetch_add(1, Ordering::Relaxed);
        let drops0 = queue_drops(&lab.switch);
        let mut r = match m.as_str() {
            "http" => run_http(&lab, &o, &sc, &archive, &want, cap),
            "ours" => {
                ours_runs += 1;
                run_ours(&lab, &o, &sc, &archive, &want, cap, ours_runs - 1)
            }
            "aria2c" => run_aria2c(&lab, &o, &sc, &archive, &want, cap),
            other => {
                eprintln!("swarm bench: unknown method {other:?} (http, ours, aria2c)");
                continue;
            }
        };
        let drops1 = queue_drops(&lab.switch);
        r.switch_drops = (drops1.0.saturating_sub(drops0.0), drops1.1.saturating_sub(drops0.1));
        results.push(r);
    }
    println!();
    println!("load average at the end: {}", fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!("N={} C={} Mbit/s S={} MiB T*={tstar:.2} s (one TCP stream over one shaped link; S/C = {ideal:.2} s) queues {} ms, TCP {}{}{}", o.n, o.mbit, o.size / MIB, o.queue_ms, o.cc, if o.slow_pct + o.late_pct + o.kill_pct > 0 { format!(" SLOW={} LATE={} KILL={}", o.slow_pct, o.late_pct, o.kill_pct) } else { String::new() }, if o.swarm_extra.is_empty() { String::new() } else { format!(" swarm: {}", o.swarm_extra.replace('\n', "; ")) });
    println!("| method | done | first s | median s | makespan s | makespan/T* | seed copies | server CPU s | clients CPU s | CPU s/client/64MiB (of it user) | machine busy (this run's processes) | server RSS MiB | client RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        report(&o, tstar, r);
    }
    let groups: Vec<String> = results.iter().flat_map(|r| report_groups(&sc, tstar, r)).collect();
    if !groups.is_empty() {
        println!();
        println!("scenario SLOW={} LATE={} KILL={} (% of N):", o.slow_pct, o.late_pct, o.kill_pct);
        for g in groups {
            println!("- {g}");
        }
    }
    if let Some(path) = &o.json {
        write_json(path, &o, &sc, tstar, &results);
    }
    let failed = results.iter().any(|r| r.bad_copies > 0);
    let dir = lab.dir.clone();
    drop(lab);
    if std::env::var_os("KEEP").is_none() {
        let _ = fs::remove_dir_all(&dir);
    } else {
        eprintln!("swarm bench: logs kept in {}", dir.display());
    }
    if failed {
        std::process::exit(1);
    }
}
