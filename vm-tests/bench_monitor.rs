//! Monitor load benchmark (issue 6, acceptance 3): 1000 simulated installers each POST a
//! report every second for ~20 s over keep-alive connections, while perfdhcp runs DORAs and a
//! curl loop GETs a boot file. Prints the appliance's CPU cost (idle vs loaded), the dashboard's
//! update latency (a report's POST → its `node` server-sent event on /api/events, every report
//! measured), dropped events, and whether DHCP and HTTP were still served.
//!
//! Run (as root): `cargo bench --bench monitor`
//! Knobs: `BENCH_NODES=1000`, `BENCH_SECS=20`, `BENCH_DHCP_RATE=50` (DORA/s).
//!
//! The load generator is this binary again, run inside the load host's network namespace
//! (`SI_MONITOR_BENCH_ROLE=load`); it prints one `LOAD {json}` line.
#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fs;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Lab, Proc, cpu_secs};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HTTP_PORT: u16 = 8080;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    if std::env::var("SI_MONITOR_BENCH_ROLE").as_deref() == Ok("load") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(load());
        return;
    }
    common::require_root();
    let nodes = env_num("BENCH_NODES", 1000);
    let secs = env_num("BENCH_SECS", 20).clamp(2, 120);
    let dhcp_rate = env_num("BENCH_DHCP_RATE", 50).max(1);
    let mut lab = Lab::new("mob");
    let app = lab.add_host(Some("10.72.0.1/20"), Some("02:72:00:00:00:01"));
    let lg = lab.add_host(Some("10.72.0.2/20"), Some("02:72:00:00:00:02"));
    let cl = lab.add_host(Some("10.72.0.3/20"), Some("02:72:00:00:00:03"));
    let kernel = lab.path("vmlinuz");
    fs::write(&kernel, vec![7u8; 1 << 20]).expect("kernel");
    let cfg = format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{store}\"\nstate_dir = \"{state}\"\n\
         [dhcp]\nprobe = false\nanswer = \"all\"\nlease_time = \"10m\"\nbind_nodes = false\n\
         [tftp]\nenable = false\n[http]\nport = {HTTP_PORT}\n[boot]\nkernel = \"{k}\"\ninitrd = \"{k}\"\n\
         [swarm]\nenable = false\n[monitor]\nstuck_after = \"5m\"\nsample_interval = \"1s\"\n",
        store = lab.path("store").display(),
        state = lab.path("state").display(),
        k = kernel.display()
    );
    let cfg_path = lab.path("appliance.toml");
    fs::write(&cfg_path, cfg).expect("config");
    let mut cmd = lab.hosts[app].cmd(common::appliance_bin());
    cmd.arg("--config").arg(&cfg_path).env("RUST_LOG", "info");
    let mut appliance = Proc::spawn("appliance", cmd, lab.path("appliance.log"));
    appliance.wait_log("si-appliance ready", Duration::from_secs(30));
    let pid = appliance.child.id();

    let idle_secs = 5.0;
    let c0 = cpu_secs(pid).unwrap_or(f64::NAN);
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let idle_cpu = cpu_secs(pid).unwrap_or(f64::NAN) - c0;

    // Load: the installers, perfdhcp, and a curl loop, side by side.
    let exe = std::env::current_exe().expect("current exe");
    let mut g = lab.hosts[lg].cmd(exe.to_str().expect("utf-8 path"));
    g.env("SI_MONITOR_BENCH_ROLE", "load")
        .env("LOAD_SERVER", format!("10.72.0.1:{HTTP_PORT}"))
        .env("LOAD_NODES", nodes.to_string())
        .env("LOAD_SECS", secs.to_string())
        .env("LOAD_SECRET", lab.path("state").join("secret"));
    let n = (dhcp_rate * secs).to_string();
    let mut d = lab.hosts[cl].cmd("perfdhcp");
    d.args(["-4", "-l", "eth0", "-r", &dhcp_rate.to_string(), "-n", &n, "-R", &n, "-W", "2000000", "10.72.0.1"]);
    let url = format!("http://10.72.0.1:{HTTP_PORT}/boot/vmlinuz");
    let script = format!(
        "end=$(( $(date +%s) + {secs} )); while [ $(date +%s) -lt $end ]; do curl -s -o /dev/null --max-time 5 -w '%{{http_code}} %{{time_total}}\\n' {url}; sleep 0.1; done"
    );
    let mut h = lab.hosts[cl].cmd("sh");
    h.args(["-c", &script]);
    let c1 = cpu_secs(pid).unwrap_or(f64::NAN);
    let t1 = Instant::now();
    let mut gen_p = Proc::spawn("loadgen", g, lab.path("loadgen.log"));
    let mut dhcp_p = Proc::spawn("perfdhcp", d, lab.path("perfdhcp.log"));
    let mut http_p = Proc::spawn("httpget", h, lab.path("httpget.log"));
    let st = gen_p.wait_exit(Duration::from_secs(secs * 3 + 60));
    let wall = t1.elapsed().as_secs_f64();
    let load_cpu = cpu_secs(pid).unwrap_or(f64::NAN) - c1;
    dhcp_p.wait_exit(Duration::from_secs(secs * 2 + 30));
    http_p.wait_exit(Duration::from_secs(secs * 2 + 30));

    let glog = gen_p.log_text();
    let Some(line) = glog.lines().find_map(|l| l.strip_prefix("LOAD ")) else {
        panic!("load generator ({st}) printed no result:\n{glog}");
    };
    let r: serde_json::Value = serde_json::from_str(line).expect("load JSON");
    let dep = Command::new("ip")
        .args(["netns", "exec", &lab.hosts[lg].name, "curl", "-s", "--max-time", "10"])
        .arg(format!("http://10.72.0.1:{HTTP_PORT}/api/deployment"))
        .output()
        .expect("curl");
    let dep: serde_json::Value = serde_json::from_slice(&dep.stdout).unwrap_or_default();
    let pd = dhcp_p.log_text();
    let stat = |key: &str| pd.lines().filter(|l| l.contains(key)).map(|l| l.trim().to_owned()).collect::<Vec<_>>().join("; ");
    let hl = http_p.log_text();
    let mut gets: Vec<f64> = Vec::new();
    let mut get_ok = 0;
    for l in hl.lines() {
        let mut it = l.split_whitespace();
        if let (Some(code), Some(t)) = (it.next(), it.next()) {
            if code == "200" {
                get_ok += 1;
            }
            gets.push(t.parse().unwrap_or(f64::NAN));
        }
    }
    gets.sort_by(|a, b| a.total_cmp(b));
    let med = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(f64::NAN);

    println!("monitor benchmark: {nodes} simulated installers, one report per second each, for {secs} s; perfdhcp {dhcp_rate} DORA/s; curl GET of a 1 MiB boot file every ~0.1 s");
    println!("machine: {} CPUs, load average {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!(
        "reports: sent {} ok(204) {} other {} errors {} = {:.0}/s",
        r["sent"], r["ok"], r["other"], r["errors"],
        r["ok"].as_f64().unwrap_or(0.0) / r["secs"].as_f64().unwrap_or(1.0)
    );
    println!(
        "appliance CPU: idle {:.2}% of a core; under load {:.1}% of a core ({load_cpu:.2} s CPU over {wall:.1} s); {:.1} µs CPU per report",
        idle_cpu / idle_secs * 100.0,
        load_cpu / wall * 100.0,
        load_cpu * 1e6 / r["ok"].as_f64().unwrap_or(1.0).max(1.0)
    );
    println!(
        "dashboard update latency (POST sent → its SSE node event): p50 {} ms, p95 {} ms, p99 {} ms, max {} ms; {} of {} reports seen on the stream, {} lagged notices",
        r["lat_p50_ms"], r["lat_p95_ms"], r["lat_p99_ms"], r["lat_max_ms"], r["seen"], r["ok"], r["lagged"]
    );
    println!(
        "registry: {} nodes, {} events applied, {} dropped (queue full), {} reports rejected",
        dep["nodes"], dep["events"], dep["dropped_events"], dep["rejected_reports"]
    );
    println!("DHCP during the load (perfdhcp): {} | {}", stat("sent packets"), stat("received packets"));
    println!("DHCP drops: {}", stat("drops"));
    println!("HTTP GET during the load: {get_ok} of {} answered 200, median {:.1} ms, max {:.1} ms", gets.len(), med(&gets) * 1e3, gets.last().copied().unwrap_or(f64::NAN) * 1e3);
    drop(appliance);
}

/// Reads one HTTP/1.1 answer on a keep-alive connection; returns its status.
async fn read_answer(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(std::io::ErrorKind::InvalidData)?;
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(status)
}

type Sent = Arc<Mutex<HashMap<String, Instant>>>;

/// The load generator (runs in the load host's namespace).
async fn load() {
    let server: std::net::SocketAddr = std::env::var("LOAD_SERVER").expect("LOAD_SERVER").parse().expect("addr");
    let nodes = env_num("LOAD_NODES", 1000) as usize;
    let secs = env_num("LOAD_SECS", 20);
    let secret = fs::read(std::env::var("LOAD_SECRET").expect("LOAD_SECRET")).expect("secret");
    let sent: Sent = Arc::default();
    let lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let lagged = Arc::new(std::sync::atomic::AtomicU64::new(0));

    // The dashboard's view: one SSE subscriber matching each node event to its POST.
    let sse = {
        let (sent, lat, lagged) = (sent.clone(), lat.clone(), lagged.clone());
        let mut s = TcpStream::connect(server).await.expect("sse connect");
        s.write_all(format!("GET /api/events HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\r\n").as_bytes()).await.expect("sse");
        tokio::spawn(async move {
            let mut r = BufReader::new(s);
            let mut line = String::new();
            let mut event = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_owned();
                } else if let Some(data) = line.strip_prefix("data:") {
                    if event == "lagged" {
                        lagged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if event != "node" {
                        continue;
                    }
                    let now = Instant::now();
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
                    if let Some(m) = v["message"].as_str() {
                        if let Some(t0) = sent.lock().unwrap().remove(m) {
                            lat.lock().unwrap().push(now.duration_since(t0).as_secs_f64() * 1e3);
                        }
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let counts = Arc::new([(); 4].map(|_| std::sync::atomic::AtomicU64::new(0)));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..nodes {
        let mac = si_appliance::types::MacAddr([0x02, 0x72, 0x01, (i >> 8) as u8, i as u8, 0x01]);
        let token = si_appliance::types::NodeToken::derive(&secret, mac).as_str().to_owned();
        let (sent, counts) = (sent.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            // Spread the nodes over the second.
            tokio::time::sleep(Duration::from_micros((i as u64 * 1_000_000) / nodes as u64)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut conn: Option<(BufReader<tokio::net::tcp::OwnedReadHalf>, tokio::net::tcp::OwnedWriteHalf)> = None;
            let total: u64 = 1 << 30;
            for k in 0u64.. {
                tick.tick().await;
                if Instant::now() >= end {
                    break;
                }
                if conn.is_none() {
                    match TcpStream::connect(server).await {
                        Ok(s) => {
                            let (r, w) = s.into_split();
                            conn = Some((BufReader::new(r), w));
                        }
                        Err(_) => {
                            counts[3].fetch_add(1, Relaxed);
                            continue;
                        }
                    }
                }
                let Some((r, w)) = conn.as_mut() else { continue };
                let msg = format!("r{i}-{k}");
                let body = format!(
                    r#"{{"phase":"downloading","bytes_done":{},"bytes_total":{total},"down_bps":{},"up_bps":1000000,"peers":4,"message":"{msg}"}}"#,
                    (k * 20_000_000).min(total),
                    20_000_000 + i as u64
                );
                let req = format!(
                    "POST /api/nodes/{mac}/report HTTP/1.1\r\nHost: {server}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                sent.lock().unwrap().insert(msg, Instant::now());
                counts[0].fetch_add(1, Relaxed);
                let res = async {
                    w.write_all(req.as_bytes()).await?;
                    read_answer(r).await
                };
                match tokio::time::timeout(Duration::from_secs(5), res).await {
                    Ok(Ok(204)) => {
                        counts[1].fetch_add(1, Relaxed);
                    }
                    Ok(Ok(_)) => {
                        counts[2].fetch_add(1, Relaxed);
                    }
                    _ => {
                        counts[3].fetch_add(1, Relaxed);
                        conn = None;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sse.abort();
    let mut l = lat.lock().unwrap().clone();
    l.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).map_or(f64::NAN, |v| (v * 10.0).round() / 10.0);
    use std::sync::atomic::Ordering::Relaxed;
    let out = serde_json::json!({
        "secs": elapsed,
        "sent": counts[0].load(Relaxed), "ok": counts[1].load(Relaxed), "other": counts[2].load(Relaxed), "errors": counts[3].load(Relaxed),
        "seen": l.len(), "lagged": lagged.load(Relaxed),
        "lat_p50_ms": pct(0.5), "lat_p95_ms": pct(0.95), "lat_p99_ms": pct(0.99), "lat_max_ms": l.last().copied().unwrap_or(f64::NAN),
    });
    println!("LOAD {out}");
}
