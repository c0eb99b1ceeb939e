//! Boot-storm benchmark (not a test): N nodes power on together and fetch kernel + initrd over
//! HTTP through the appliance, unicast against peer-served; one command, run as root:
//!
//!     cargo bench --bench boot_storm                 # N=8, C=100 Mbit/s
//!     N=32 cargo bench --bench boot_storm            # or: cargo bench --bench boot_storm -- N=32
//!
//! Builds a star in network namespaces it creates (10.74.0.0/16): a switch namespace with a
//! bridge, the appliance (10.74.0.1) and N node namespaces; every veth end is shaped with HTB
//! (rate = ceil = C) and a byte-limited bfifo in both directions, so every host, the appliance
//! included, has upload C and download C. The kernel and initrd are random files of the real
//! sizes (8 247 232 and 11 843 249 B; the appliance appends its key to the initrd). Each node
//! "powers on" at a random instant within `SPREAD` seconds of the start and fetches both files
//! with `curl -L` (a real client that follows the 302, as iPXE does; on failure it retries with
//! `&direct=1`, the iPXE script's fallback), each under `timeout`, then says so with
//! `GET /boot/fetched` (the node script's last request: it frees the node's slot at its peer).
//! Then, in the peer-served run, it waits the boot delay `B` and runs `si-appliance boot-peer`
//! (the installer's code path: fetch again through the appliance with `?peer=1`, check against
//! /boot/digests, serve on :8081, announce). Methods, in the same run: `unicast` (`boot.peer_serve = false`) and `ours`
//! (`boot.peer_serve = true`, `peer_serve_max = K`, `peer_appliance_max = A`, `peer_wait = WAIT`).
//!
//! Printed per method: makespan (the start to the last node holding both files, from each
//! node's own `date` stamp after its second curl), median, the bytes sent on the appliance's
//! link in copies of kernel + initrd (framing included, until the last node is done), ratio to
//! the bound (size/C)(1 + ⌈log2 N⌉) + ⌈log2 N⌉·B and to unicast, CPU seconds of the appliance,
//! redirects (the nodes' curl and their installers' fetches) and requests served after the
//! longest wait, from its log, and every copy's SHA-256 checked (a bad copy fails the
//! run). The machine's load average is printed at the end. Namespaces and processes are removed
//! on exit and on Ctrl-C / SIGTERM.
//!
//! Options (environment or `KEY=VALUE` arguments): `N` nodes (default 8, at most 200), `C` link
//! rate in Mbit/s (default 100 for N ≤ 8, else 40), `B` boot delay in seconds (default 2),
//! `SPREAD` power-on spread in seconds (default 2), `K` peer_serve_max (default 1, as the
//! appliance's), `A` peer_appliance_max (default 1, as the appliance's), `WAIT` peer_wait in
//! seconds (default 60), `KERNEL` and `INITRD` sizes in bytes, `METHODS` (default `unicast,ours`), `CAP` seconds a method may run
//! (default 2 × N·size/C + 60), `KEEP=1` keeps the logs.
#[path = "common/mod.rs"]
mod common;

use common::interrupt::{install_cleanup, register, register_ns, set_scratch};

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Lab, Netns, Proc, appliance_bin, cpu_secs, start_appliance, strip_ansi};
use sha2::{Digest, Sha256};
use si_appliance::types::{MacAddr, NodeToken};

const APP_IP: &str = "10.74.0.1";

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    n: usize,
    mbit: u32,
    boot_delay: f64,
    spread: f64,
    k: u32,
    a: u32,
    wait: u64,
    kernel: u64,
    initrd: u64,
    methods: Vec<String>,
    cap: Option<f64>,
}

fn opts() -> Opts {
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    for k in ["N", "C", "B", "SPREAD", "K", "A", "WAIT", "KERNEL", "INITRD", "METHODS", "CAP"] {
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
    let flt = |k: &str, d: f64| kv.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(d);
    let n = num("N", 8).clamp(1, 200) as usize;
    Opts {
        n,
        mbit: num("C", if n <= 8 { 100 } else { 40 }).clamp(1, 10_000) as u32,
        boot_delay: flt("B", 2.0).clamp(0.0, 120.0),
        spread: flt("SPREAD", 2.0).clamp(0.0, 120.0),
        k: num("K", 1).clamp(1, 64) as u32,
        a: num("A", 1).clamp(0, 64) as u32,
        wait: num("WAIT", 60).clamp(1, 300),
        kernel: num("KERNEL", 8_247_232).clamp(1, 1 << 30),
        initrd: num("INITRD", 11_843_249).clamp(1, 1 << 30),
        methods: kv.get("METHODS").map_or("unicast,ours", |s| s.as_str()).split(',').map(|s| s.trim().to_owned()).collect(),
        cap: kv.get("CAP").and_then(|v| v.parse().ok()),
    }
}

// ---------------------------------------------------------------------------------------------
// Lab

fn node_ip(i: usize) -> String {
    format!("10.74.{}.{}", 1 + i / 200, 10 + i % 200)
}

fn node_mac(i: usize) -> String {
    format!("52:54:00:74:{:02x}:{:02x}", i / 256, i % 256)
}

fn shape(ns: &Netns, dev: &str, mbit: u32) {
    // A byte-limited FIFO: ~30 ms of data, at least 64 KiB (offload packets are up to 64 KiB).
    let limit = ((mbit as u64 * 1_000_000 / 8) * 30 / 1000).max(64 * 1024);
    let rate = format!("{mbit}mbit");
    let q = format!("{}", (mbit as u64 * 1_000_000 / 8 / 1000).clamp(1514, 60_000));
    for args in [
        vec!["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"],
        vec!["class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", &rate, "ceil", &rate, "quantum", &q],
        vec!["qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "bfifo", "limit", &limit.to_string()],
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

/// Bytes sent on `eth0` of a namespace.
fn tx_bytes(ns: &Netns) -> u64 {
    let out = ns.cmd("cat").arg("/sys/class/net/eth0/statistics/tx_bytes").output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(0)
}

fn epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Power-on offsets in [0, spread), spread evenly then shuffled (reproducible per N).
fn offsets(n: usize, spread: f64) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n).map(|i| spread * i as f64 / n as f64).collect();
    // A fixed LCG shuffle: the same order for the same N in every method.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..n).rev() {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        v.swap(i, (x >> 33) as usize % (i + 1));
    }
    v
}

/// The shell a node runs: wait its power-on offset, fetch both files (curl -L; `&direct=1` on
/// failure), stamp the time, then (peer-served runs) wait the boot delay and serve.
const NODE_SH: &str = r#"
sleep "$OFFSET"
get() {
  timeout "$LIMIT" curl -sS -L --max-redirs 3 -o "$2" "$1" || timeout "$LIMIT" curl -sS -o "$2" "$1&direct=1"
}
get "http://$SERVER/boot/vmlinuz?mac=$MACQ&verify=1" "$DIR/vmlinuz" || exit 3
get "http://$SERVER/boot/initrd.img?mac=$MACQ&verify=1" "$DIR/initrd.img" || exit 4
date +%s.%N > "$DIR/done.tmp" && mv "$DIR/done.tmp" "$DIR/done"
timeout 10 curl -sS -o /dev/null "http://$SERVER/boot/fetched?mac=$MACQ" || true
[ "$PEER" = 1 ] || exit 0
sleep "$BOOT"
exec "$BIN" boot-peer --server "$SERVER:80" --mac "$MAC" --dir "$DIR/peer"
"#;

/// The appliance's config; every run shares one state directory (one secret, so one served
/// initrd: the appliance appends its key to it).
fn config(lab: &Lab, o: &Opts, peer: bool) -> String {
    let d = |p: PathBuf| p.display().to_string();
    format!(
        "iface = \"eth0\"\nenroll = \"any\"\nimage = \"test-img\"\nstore = \"{store}\"\nstate_dir = \"{state}\"\n\
         [dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n[http]\nport = 80\n\
         [boot]\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\ncmdline = \"console=ttyS0\"\n\
         peer_serve = {peer}\npeer_serve_max = {k}\npeer_appliance_max = {a}\npeer_wait = \"{w}s\"\npeer_rate_mbit = {c}\n",
        store = d(lab.path("store")),
        state = d(lab.path("state")),
        kernel = d(lab.path("kernel.bin")),
        initrd = d(lab.path("initrd.bin")),
        k = o.k,
        a = o.a,
        w = o.wait,
        c = o.mbit,
    )
}

struct Outcome {
    method: String,
    /// Seconds from the start to each node holding both files (None: not done).
    done: Vec<Option<f64>>,
    app_tx: u64,
    app_cpu: f64,
    bad_copies: usize,
    redirects: usize,
    waited_out: usize,
    wall: f64,
}

fn run(lab: &Lab, o: &Opts, method: &str, want: &[String; 2], cap: f64, no: usize) -> Outcome {
    let peer = method == "ours";
    let tag = format!("r{no}-{method}");
    let app = start_appliance(lab, 0, &format!("{tag}-app"), &config(lab, o, peer), &[]);
    register(&app);
    let secret = fs::read(lab.path("state/secret")).expect("appliance secret");
    let served_initrd = lab.path("state/boot/initrd.img");
    assert_eq!(sha256(&served_initrd), want[1], "the served initrd differs from the first run's");
    let cpu0 = cpu_secs(app.child.id()).unwrap_or(0.0);
    let tx0 = tx_bytes(&lab.hosts[0]);
    let offs = offsets(o.n, o.spread);
    let limit = (cap as u64).max(30).to_string();
    let dirs: Vec<PathBuf> = (0..o.n).map(|i| lab.path(&format!("{tag}-n{i}"))).collect();
    let t0 = epoch();
    let start = Instant::now();
    let mut nodes: Vec<Proc> = (0..o.n)
        .map(|i| {
            fs::create_dir_all(&dirs[i]).expect("node dir");
            let mac = node_mac(i);
            let m: MacAddr = mac.parse().expect("mac");
            let mut c = lab.hosts[1 + i].cmd("sh");
            c.args(["-c", NODE_SH])
                .env("OFFSET", format!("{:.3}", offs[i]))
                .env("LIMIT", &limit)
                .env("SERVER", APP_IP)
                .env("MAC", &mac)
                .env("MACQ", mac.replace(':', "-"))
                .env("DIR", &dirs[i])
                .env("PEER", if peer { "1" } else { "0" })
                .env("BOOT", format!("{:.3}", o.boot_delay))
                .env("BIN", appliance_bin())
                .env("SI_NODE_TOKEN", NodeToken::derive(&secret, m).as_str())
                .env("RUST_LOG", "info")
                .current_dir(&lab.dir);
            let p = Proc::spawn(&format!("{tag}-node{i}"), c, lab.path(&format!("{tag}-node{i}.log")));
            register(&p);
            p
        })
        .collect();
    let mut done: Vec<Option<f64>> = vec![None; o.n];
    // Bounded: every node is done or `cap` seconds pass; a node whose shell exits without its
    // stamp failed.
    loop {
        for (i, d) in done.iter_mut().enumerate() {
            if d.is_none() {
                if let Some(t) = fs::read_to_string(dirs[i].join("done")).ok().and_then(|s| s.trim().parse::<f64>().ok()) {
                    *d = Some(t - t0);
                }
            }
        }
        let failed = nodes.iter_mut().zip(&done).filter_map(|(p, d)| (d.is_none() && matches!(p.child.try_wait(), Ok(Some(_)))).then_some(())).count();
        if done.iter().all(Option::is_some) || failed > 0 || start.elapsed().as_secs_f64() > cap {
            if failed > 0 {
                eprintln!("boot storm: {method}: {failed} node(s) exited without both files (see {tag}-node*.log)");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = start.elapsed().as_secs_f64();
    let app_tx = tx_bytes(&lab.hosts[0]) - tx0;
    let app_cpu = cpu_secs(app.child.id()).unwrap_or(0.0) - cpu0;
    drop(nodes);
    let log = strip_ansi(&app.log_text());
    drop(app);
    let bad_copies = dirs
        .iter()
        .zip(&done)
        .filter(|(d, t)| t.is_some() && (sha256(&d.join("vmlinuz")) != want[0] || sha256(&d.join("initrd.img")) != want[1]))
        .count();
    let redirects = log.lines().filter(|l| l.contains("http: redirected to a boot peer")).count();
    let waited_out = log.lines().filter(|l| l.contains("waited the longest allowed")).count();
    Outcome { method: method.into(), done, app_tx, app_cpu, bad_copies, redirects, waited_out, wall }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    if std::fs::read_to_string("/proc/self/status")
        .map(|s| !s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(true)
    {
        eprintln!("boot storm: run as root (it creates network namespaces)");
        std::process::exit(2);
    }
    let o = opts();
    // Scratch on tmpfs when there is one (2N copies of the files): the disk is not measured.
    if std::env::var_os("TMPDIR").is_none() && Path::new("/dev/shm").is_dir() {
        // SAFETY: single-threaded here (before the watcher thread starts).
        unsafe { std::env::set_var("TMPDIR", "/dev/shm") };
    }
    install_cleanup("boot storm");
    let t_setup = Instant::now();
    let mut lab = Lab::new("bst");
    register_ns(&lab.switch);
    set_scratch(lab.dir.clone());
    let a = lab.add_host(Some(&format!("{APP_IP}/16")), Some("52:54:00:74:ff:01"));
    register_ns(&lab.hosts[a]);
    for i in 0..o.n {
        let h = lab.add_host(Some(&format!("{}/16", node_ip(i))), Some(&node_mac(i)));
        register_ns(&lab.hosts[h]);
    }
    for h in 0..lab.hosts.len() {
        shape(&lab.hosts[h], "eth0", o.mbit);
        shape(&lab.switch, &format!("p{h}"), o.mbit);
    }
    let kernel = common::random_file(&lab.path("kernel.bin"), o.kernel);
    common::random_file(&lab.path("initrd.bin"), o.initrd);
    // The served initrd carries the appliance's key: its digest is taken from the first run.
    let probe = start_appliance(&lab, 0, "probe-app", &config(&lab, &o, false), &[]);
    let served = fs::read(lab.path("state/boot/initrd.img")).expect("served initrd");
    drop(probe);
    let size = o.kernel + served.len() as u64;
    let want = [hex::encode(Sha256::digest(&kernel)), hex::encode(Sha256::digest(&served))];
    let copy = size as f64 * 8.0 / (f64::from(o.mbit) * 1e6);
    let rounds = (o.n as f64).log2().ceil();
    let bound = copy * (1.0 + rounds) + rounds * o.boot_delay;
    let unicast_bound = o.n as f64 * copy;
    let cap = o.cap.unwrap_or(2.0 * unicast_bound + 60.0);
    eprintln!(
        "boot storm: N={} C={} Mbit/s size={size} B (one copy {copy:.2} s) B={} s spread={} s; lab {} ready in {:.1} s",
        o.n,
        o.mbit,
        o.boot_delay,
        o.spread,
        lab.dir.display(),
        t_setup.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    for (no, m) in o.methods.iter().enumerate() {
        if m != "unicast" && m != "ours" {
            eprintln!("boot storm: unknown method {m:?} (unicast, ours)");
            continue;
        }
        eprintln!("boot storm: running {m}");
        results.push(run(&lab, &o, m, &want, cap, no));
    }
    let unicast = results.iter().find(|r| r.method == "unicast").and_then(|r| r.done.iter().copied().collect::<Option<Vec<f64>>>()).map(|v| v.into_iter().fold(0.0, f64::max));
    println!();
    println!("load average at the end: {}", fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!(
        "N={} C={} Mbit/s kernel+initrd={size} B (one copy at C: {copy:.2} s) boot delay B={} s power-on spread {} s K={} A={} wait={} s",
        o.n, o.mbit, o.boot_delay, o.spread, o.k, o.a, o.wait
    );
    println!("bound (size/C)(1+⌈log2 N⌉)+⌈log2 N⌉·B = {bound:.1} s; unicast N·size/C = {unicast_bound:.1} s");
    println!("| method | done | median s | makespan s | makespan / bound | makespan / unicast | appliance link (copies) | appliance CPU s | redirects | served after the wait | bad copies |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let mut got: Vec<f64> = r.done.iter().flatten().copied().collect();
        let finished = got.len();
        let makespan = got.iter().copied().fold(0.0, f64::max);
        let med = median(&mut got);
        let ms = if finished == o.n { format!("{makespan:.1}") } else { format!("> {:.0} (unfinished)", r.wall) };
        let vs_unicast = match unicast {
            Some(u) if finished == o.n => format!("{:.2}", makespan / u),
            _ => "-".into(),
        };
        let vs_bound = if finished == o.n { format!("{:.2}", makespan / bound) } else { "-".into() };
        println!(
            "| {} | {finished}/{} | {med:.1} | {ms} | {vs_bound} | {vs_unicast} | {:.2} | {:.2} | {} | {} | {} |",
            r.method,
            o.n,
            r.app_tx as f64 / size as f64,
            r.app_cpu,
            r.redirects,
            r.waited_out,
            r.bad_copies
        );
    }
    let failed = results.iter().any(|r| r.bad_copies > 0 || r.done.iter().any(Option::is_none));
    let dir = lab.dir.clone();
    drop(lab);
    if std::env::var_os("KEEP").is_none() {
        let _ = fs::remove_dir_all(&dir);
    } else {
        eprintln!("boot storm: logs kept in {}", dir.display());
    }
    if failed {
        std::process::exit(1);
    }
}
