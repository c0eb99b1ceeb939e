//! Tracker benchmark at full N (issue 15, part 4): N peers (1000 and 5000 by default) announce
//! to the appliance's tracker and, side by side in the same run and under the same load, to
//! opentracker (Debian's package). Prints per tracker and N: announce latency (p50/p99/max,
//! connect → last byte of the answer), announces/s sustained at the paced load and flat out, the
//! tracker process's CPU seconds per announce, its RSS at N, and checks of every answer (the
//! asker never in its list, numwant respected, leechers get seeds and leechers, the share of
//! same-/24 "rack" peers against the population's share).
//!
//! Run (as root): `cargo bench --bench tracker`
//! Knobs: `BENCH_PEERS=1000,5000`, `BENCH_ROUNDS=4` (round 0 is `event=started`, the others
//! periodic), `BENCH_ROUND_SECS=5` (one announce interval's worth of announces, N, spread evenly
//! over this many seconds: the LAN interval is 15 s, so 5 s compresses time 3×),
//! `BENCH_FLAT_SECS=4` and `BENCH_CONC=32` (the flat-out phase: 32 clients announcing back to
//! back), `BENCH_RACK=40` (peers per /24), `BENCH_SEED_PCT=10`, `BENCH_NUMWANT=80` (the
//! installer's: its MAX_CONNS), `BENCH_TRACKERS=si,opentracker`.
//!
//! Everything runs in one private network namespace with only loopback: the tracker on
//! 127.0.0.1, every peer from its own 127.1.r.h source address (the whole /8 is local). Our
//! tracker runs as a child process (this binary in role `server`): the appliance's own
//! [`tracker_http::routes`] on the appliance's own server loop ([`http_serve::serve`]) in a
//! current-thread runtime like the appliance's, with the tracker policy built from the
//! appliance's default `[swarm]` config — the same code path as in app.rs, minus the DHCP, TFTP,
//! seed and monitor it does not need — so its CPU time and RSS are its own, measured exactly like
//! opentracker's (`/proc/PID/stat`, `/proc/PID/status`). The load generator is this binary again
//! (role `load`) in the same namespace, on the same 2 cores.
#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Lab, Proc, cpu_secs};
use serde::{Deserialize, Serialize};
use si_appliance::swarm::tracker::{self, Announce, Event, InfoHash};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SI_PORT: u16 = 7070;
const OT_PORT: u16 = 6969;
const PEER_PORT: u16 = 6881;
const IH: InfoHash = InfoHash(*b"si-tracker-bench-ih!");
const ARCHIVE: u64 = 2 << 30;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    match std::env::var("SI_TRACKER_BENCH_ROLE").as_deref() {
        Ok("server") => return server(),
        Ok("load") => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            let r = rt.block_on(load());
            println!("RESULT {}", serde_json::to_string(&r).expect("json"));
            return;
        }
        _ => {}
    }
    common::require_root();
    let peers: Vec<usize> = std::env::var("BENCH_PEERS")
        .unwrap_or_else(|_| "1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|n| (2..=10_000).contains(n))
        .collect();
    let trackers: Vec<String> =
        std::env::var("BENCH_TRACKERS").unwrap_or_else(|_| "si,opentracker".into()).split(',').map(|s| s.trim().to_owned()).collect();
    let mut lab = Lab::new("trk");
    let h = lab.add_host(None, None);
    let mut rows = Vec::new();
    for &n in &peers {
        for t in &trackers {
            let (mut proc, port) = match t.as_str() {
                "si" => (start_si(&lab, h), SI_PORT),
                "opentracker" => (start_ot(&lab, h), OT_PORT),
                other => panic!("BENCH_TRACKERS: unknown tracker {other}"),
            };
            let pid = proc.child.id();
            let exe = std::env::current_exe().expect("current exe");
            let mut g = lab.hosts[h].cmd(exe.to_str().expect("utf-8 path"));
            g.env("SI_TRACKER_BENCH_ROLE", "load")
                .env("LOAD_TARGET", format!("127.0.0.1:{port}"))
                .env("LOAD_PEERS", n.to_string())
                .env("LOAD_SERVER_PID", pid.to_string());
            for k in ["BENCH_ROUNDS", "BENCH_ROUND_SECS", "BENCH_FLAT_SECS", "BENCH_CONC", "BENCH_RACK", "BENCH_SEED_PCT", "BENCH_NUMWANT"] {
                if let Ok(v) = std::env::var(k) {
                    g.env(k, v);
                }
            }
            let mut load = Proc::spawn("load", g, lab.path(&format!("load-{t}-{n}.log")));
            let line = load.wait_line("the load's RESULT", Duration::from_secs(300), |l| l.starts_with("RESULT "));
            load.wait_exit(Duration::from_secs(10));
            let r: LoadResult = serde_json::from_str(&line["RESULT ".len()..]).expect("load result");
            eprintln!("{t} N={n}: {}", serde_json::to_string(&r).expect("json"));
            proc.kill();
            rows.push((t.clone(), n, r));
        }
    }
    println!("\nTracker benchmark: N peers from distinct 127.1.r.h addresses (/24 = rack of {} peers), {}% seeds, numwant {},", env_num("BENCH_RACK", 40), env_num("BENCH_SEED_PCT", 10), env_num("BENCH_NUMWANT", 80));
    println!(
        "{} rounds of N announces each spread over {} s (round 0 event=started), then {} clients flat out for {} s.\n",
        env_num("BENCH_ROUNDS", 4),
        env_num("BENCH_ROUND_SECS", 5),
        env_num("BENCH_CONC", 32),
        env_num("BENCH_FLAT_SECS", 4)
    );
    println!("| tracker | N | announces ok/sent | paced ann/s | p50 ms | p99 ms | max ms | CPU µs/ann (paced) | flat-out ann/s | CPU µs/ann (flat) | RSS MiB idle → at N |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (t, n, r) in &rows {
        println!(
            "| {t} | {n} | {}/{} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} → {:.1} |",
            r.ok, r.sent, r.paced_rate, r.p50_ms, r.p99_ms, r.max_ms, r.cpu_us_paced, r.flat_rate, r.cpu_us_flat, r.rss_idle_mib, r.rss_mib
        );
    }
    println!("\nAnswers (periodic rounds): | tracker | N | errors | asker in own list | over numwant | mean list | leecher lists with seeds and leechers | seed lists with seeds | same-/24 share vs population | duplicates | unknown peers |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (t, n, r) in &rows {
        println!(
            "| {t} | {n} | {} | {} | {} | {:.1} | {:.1} % | {:.1} % | {:.1} % vs {:.1} % | {} | {} |",
            r.errors,
            r.self_listed,
            r.over_numwant,
            r.mean_list,
            r.leecher_mixed_pct,
            r.seed_gets_seeds_pct,
            r.same24_pct,
            r.same24_pop_pct,
            r.duplicates,
            r.unknown
        );
        if !r.first_error.is_empty() {
            println!("  ({t} N={n} first error: {})", r.first_error);
        }
    }
}

/// Our tracker in role `server`: the appliance's routes on the appliance's server loop.
fn server() {
    let port: u16 = env_num("SERVER_PORT", SI_PORT as u64) as u16;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let sw = si_appliance::config::SwarmConfig::default();
        let http = si_appliance::config::HttpConfig::default();
        let policy = si_appliance::swarm::TrackerPolicy {
            subnets: vec!["127.0.0.0/8".parse().expect("net")],
            interval: sw.announce_interval,
            peer_timeout: sw.peer_timeout,
            appliance_seed: None,
            seed_peers: sw.seed_peers as usize,
            join_delay: sw.join_delay,
            expected_nodes: sw.expected_nodes as usize,
            max_peers: sw.max_peers as usize,
        };
        let mut t = si_appliance::swarm::Tracker::new(policy);
        t.register(IH);
        let shared = Arc::new(std::sync::Mutex::new(t));
        let router = si_appliance::swarm::tracker_http::routes(shared, si_appliance::types::events::EventSink::disabled());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        println!("READY {port}");
        let limits = si_appliance::http_serve::Limits { max_connections: http.max_connections, header_timeout: http.header_timeout };
        si_appliance::http_serve::serve(listener, router, limits, tokio_util::sync::CancellationToken::new()).await;
    });
}

fn start_si(lab: &Lab, h: usize) -> Proc {
    let exe = std::env::current_exe().expect("current exe");
    let mut c = lab.hosts[h].cmd(exe.to_str().expect("utf-8 path"));
    c.env("SI_TRACKER_BENCH_ROLE", "server").env("SERVER_PORT", SI_PORT.to_string());
    let mut p = Proc::spawn("si-tracker", c, lab.path("si-tracker.log"));
    p.wait_log("READY", Duration::from_secs(10));
    p
}

fn start_ot(lab: &Lab, h: usize) -> Proc {
    let dir = lab.path("opentracker");
    fs::create_dir_all(&dir).expect("opentracker dir");
    fs::write(dir.join("whitelist"), format!("{IH}\n")).expect("whitelist");
    let mut c = lab.hosts[h].cmd("opentracker");
    // Debian's opentracker refuses to stay root: it chroots to -d and drops to -u itself.
    c.args(["-i", "127.0.0.1", "-p", &OT_PORT.to_string(), "-P", &OT_PORT.to_string(), "-d"]).arg(&dir).args(["-u", "nobody", "-w", "whitelist"]);
    let mut p = Proc::spawn("opentracker", c, lab.path("opentracker.log"));
    let up = common::wait_for(Duration::from_secs(10), || {
        let o = lab.hosts[h].cmd("ss").args(["-Hltn", &format!("sport = :{OT_PORT}")]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).contains(&OT_PORT.to_string()).then_some(())
    });
    if up.is_none() {
        let _ = p.child.try_wait();
        panic!("opentracker did not start: {}", p.log_text());
    }
    p
}

/// What the load role measured, for one tracker at one N.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LoadResult {
    sent: usize,
    ok: usize,
    errors: usize,
    first_error: String,
    paced_rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_us_paced: f64,
    flat_rate: f64,
    cpu_us_flat: f64,
    rss_idle_mib: f64,
    rss_mib: f64,
    load_cpu_s: f64,
    self_listed: usize,
    over_numwant: usize,
    mean_list: f64,
    leecher_mixed_pct: f64,
    seed_gets_seeds_pct: f64,
    same24_pct: f64,
    same24_pop_pct: f64,
    duplicates: usize,
    unknown: usize,
}

/// The simulated population: peer `i`'s address, role and progress.
struct Population {
    n: usize,
    rack: usize,
    seed_every: usize,
    numwant: usize,
}

impl Population {
    fn ip(&self, i: usize) -> Ipv4Addr {
        let r = i / self.rack;
        Ipv4Addr::new(127, 1 + (r / 250) as u8, (r % 250) as u8, 10 + (i % self.rack) as u8)
    }
    fn is_seed(&self, i: usize) -> bool {
        i % self.seed_every == 0
    }
    fn announce(&self, i: usize, round: usize) -> Announce {
        let mut peer_id = *b"-BT0001-000000000000";
        peer_id[8..].copy_from_slice(format!("{i:012}").as_bytes());
        // Leechers advance 5 % of the archive a round from a spread of starting points and never
        // finish: the seed share stays what the knob says.
        let frac = if self.is_seed(i) { 1.0 } else { (((i * 37) % 50) as f64 / 100.0 + round as f64 * 0.05).min(0.95) };
        let downloaded = (ARCHIVE as f64 * frac) as u64;
        Announce {
            info_hash: IH,
            peer_id,
            addr: SocketAddrV4::new(self.ip(i), PEER_PORT),
            uploaded: downloaded / 2,
            downloaded,
            left: ARCHIVE - downloaded,
            event: if round == 0 { Event::Started } else { Event::None },
            numwant: self.numwant,
        }
    }
}

/// One announce over a fresh connection from the peer's own address: latency (connect → last
/// byte) and the peers answered, or why it failed.
async fn announce_once(target: SocketAddr, a: &Announce) -> (Duration, Result<Vec<SocketAddrV4>, String>) {
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let sock = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        sock.bind(SocketAddr::new((*a.addr.ip()).into(), 0)).map_err(|e| format!("bind {}: {e}", a.addr.ip()))?;
        let mut s = sock.connect(target).await.map_err(|e| format!("connect: {e}"))?;
        let req = format!("GET /announce?{} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n", a.to_query());
        s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        s.read_to_end(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
        let head = String::from_utf8_lossy(&buf[..split]);
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(format!("status: {}", head.lines().next().unwrap_or("")));
        }
        tracker::decode_reply(&buf[split + 4..]).map(|r| r.peers).map_err(|e| si_appliance::swarm::engine::chain(&e))
    })
    .await;
    (t0.elapsed(), r.unwrap_or_else(|_| Err("timeout (10 s)".into())))
}

fn rss_mib(pid: u32) -> f64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn self_cpu() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(f64::NAN)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn load() -> LoadResult {
    let target: SocketAddr = std::env::var("LOAD_TARGET").expect("LOAD_TARGET").parse().expect("LOAD_TARGET");
    let pid = env_num("LOAD_SERVER_PID", 0) as u32;
    let pop = Arc::new(Population {
        n: env_num("LOAD_PEERS", 1000) as usize,
        rack: env_num("BENCH_RACK", 40).clamp(2, 200) as usize,
        seed_every: (100 / env_num("BENCH_SEED_PCT", 10).clamp(1, 100)) as usize,
        numwant: env_num("BENCH_NUMWANT", tracker::MAX_NUMWANT as u64) as usize,
    });
    let rounds = env_num("BENCH_ROUNDS", 4).clamp(2, 20) as usize;
    let round_secs = env_num("BENCH_ROUND_SECS", 5).clamp(1, 60) as f64;
    let mut res = LoadResult { rss_idle_mib: rss_mib(pid), ..Default::default() };
    let load_cpu0 = self_cpu();

    // Paced: round r sends every peer's announce, spread evenly over the round.
    let step = Duration::from_secs_f64(round_secs / pop.n as f64);
    let cpu0 = cpu_secs(pid).unwrap_or(f64::NAN);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..rounds {
        for i in 0..pop.n {
            let at = start + step * (round * pop.n + i) as u32;
            tokio::time::sleep_until(at.into()).await;
            let pop = pop.clone();
            tasks.spawn(async move {
                let a = pop.announce(i, round);
                let (lat, r) = announce_once(target, &a).await;
                (round, i, lat, r)
            });
        }
    }
    let mut results = Vec::with_capacity(rounds * pop.n);
    while let Some(r) = tasks.join_next().await {
        results.push(r.expect("announce task"));
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu1 = cpu_secs(pid).unwrap_or(f64::NAN);
    res.rss_mib = rss_mib(pid);
    res.sent = results.len();

    // Checks of the answers.
    let index: HashMap<Ipv4Addr, usize> = (0..pop.n).map(|i| (pop.ip(i), i)).collect();
    let mut lat: Vec<f64> = Vec::with_capacity(results.len());
    let (mut listed, mut lists, mut same, mut mixed, mut leecher_lists, mut seed_lists, mut seed_seeds) = (0usize, 0usize, 0usize, 0, 0, 0, 0);
    let mut pop_share = 0.0;
    for (round, i, l, r) in &results {
        lat.push(l.as_secs_f64() * 1e3);
        let peers = match r {
            Ok(p) => p,
            Err(e) => {
                res.errors += 1;
                if res.first_error.is_empty() {
                    res.first_error = e.clone();
                }
                continue;
            }
        };
        res.ok += 1;
        if *round == 0 {
            continue;
        }
        let me = pop.ip(*i);
        lists += 1;
        listed += peers.len();
        if peers.iter().any(|p| *p.ip() == me) {
            res.self_listed += 1;
        }
        if peers.len() > pop.numwant {
            res.over_numwant += 1;
        }
        let mut seen = std::collections::HashSet::new();
        let (mut s, mut le) = (0, 0);
        for p in peers {
            if !seen.insert(*p) {
                res.duplicates += 1;
            }
            match index.get(p.ip()) {
                None => res.unknown += 1,
                Some(&j) => {
                    if pop.is_seed(j) { s += 1 } else { le += 1 }
                }
            }
            if p.ip().octets()[..3] == me.octets()[..3] {
                same += 1;
            }
        }
        let rack_start = *i / pop.rack * pop.rack;
        let in_rack = (rack_start + pop.rack).min(pop.n) - rack_start;
        pop_share += (in_rack - 1) as f64 / (pop.n - 1) as f64;
        if pop.is_seed(*i) {
            seed_lists += 1;
            seed_seeds += usize::from(s > 0);
        } else {
            leecher_lists += 1;
            mixed += usize::from(s > 0 && le > 0);
        }
    }
    lat.sort_by(f64::total_cmp);
    res.p50_ms = pct(&lat, 0.50);
    res.p99_ms = pct(&lat, 0.99);
    res.max_ms = lat.last().copied().unwrap_or(f64::NAN);
    res.paced_rate = res.ok as f64 / wall;
    res.cpu_us_paced = (cpu1 - cpu0) / res.ok.max(1) as f64 * 1e6;
    res.mean_list = listed as f64 / lists.max(1) as f64;
    res.same24_pct = 100.0 * same as f64 / listed.max(1) as f64;
    res.same24_pop_pct = 100.0 * pop_share / lists.max(1) as f64;
    res.leecher_mixed_pct = 100.0 * mixed as f64 / leecher_lists.max(1) as f64;
    res.seed_gets_seeds_pct = 100.0 * seed_seeds as f64 / seed_lists.max(1) as f64;

    // Flat out: `conc` clients announcing back to back (periodic announces of every peer in turn).
    let conc = env_num("BENCH_CONC", 32).clamp(1, 512) as usize;
    let flat = Duration::from_secs(env_num("BENCH_FLAT_SECS", 4).clamp(1, 60));
    let cpu0 = cpu_secs(pid).unwrap_or(f64::NAN);
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..conc {
        let pop = pop.clone();
        workers.spawn(async move {
            let mut ok = 0usize;
            let mut i = w;
            while start.elapsed() < flat {
                let (_, r) = announce_once(target, &pop.announce(i % pop.n, rounds)).await;
                ok += usize::from(r.is_ok());
                i += conc;
            }
            ok
        });
    }
    let mut flat_ok = 0;
    while let Some(r) = workers.join_next().await {
        flat_ok += r.expect("worker");
    }
    let flat_wall = start.elapsed().as_secs_f64();
    let cpu1 = cpu_secs(pid).unwrap_or(f64::NAN);
    res.flat_rate = flat_ok as f64 / flat_wall;
    res.cpu_us_flat = (cpu1 - cpu0) / flat_ok.max(1) as f64 * 1e6;
    res.load_cpu_s = self_cpu() - load_cpu0;
    res
}
