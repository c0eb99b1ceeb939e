//! DHCP rate benchmark: si-appliance vs dnsmasq vs Kea (kea-dhcp4, memfile), measured in the
//! same run with the same load generator (Kea's perfdhcp) in network namespaces.
//!
//! Run (as root): `cargo bench --bench dhcp_rate`
//! Knobs: `BENCH_RATES=1000,2000,4000,8000` (offered DORA/s), `BENCH_SECS=3` (per run).
//!
//! Boot storm (as root): `cargo bench --bench dhcp_rate -- storm` (`BENCH_STORM_NODES=1000`).
//! N nodes power on at once: perfdhcp's avalanche scenario sends a DISCOVER for each of N
//! distinct clients back to back, then retransmits with back-off until every client holds a
//! lease, as firmware does. Three rounds with the same N MACs, as a PXE node boots: the ROM
//! (vendor class PXEClient, option 93), iPXE (the same plus user class iPXE), the installer's
//! udhcpc (vendor class si-appliance). Per server and round: the time until all N were bound,
//! the requests sent, the retransmissions (a request not answered within perfdhcp's back-off
//! timer, whether the answer was late or lost), the answers, and perfdhcp's drop counts
//! (DISCOVER-OFFER, REQUEST-ACK: exchanges that never got their answer). si-appliance runs with its lease
//! journal's fdatasync on, as deployed, and `swarm.expected_nodes = N` (the rack declared, so its
//! starvation guard lets N new clients in at once: with the default burst of 100 and 20 new
//! clients a second the ROM round took 81 s).
//!
//! Each run starts the server fresh (empty lease state) on 10.66.0.1/20 and runs perfdhcp from
//! 10.66.0.2/20 as a relay (giaddr set, unicast to the server, as a relay agent does), with
//! `-n rate×secs` DISCOVERs and a 2 s wait for late answers. Completed leases/s is perfdhcp's
//! "Rate" (4-way exchanges per second); drop rates are its DISCOVER-OFFER and REQUEST-ACK ones.
//! Durability differs and is printed: si-appliance fdatasyncs every batch of ACKs before
//! sending them; Kea's memfile and dnsmasq's lease file are written without fsync.
#[path = "common/mod.rs"]
mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::{Lab, Proc, cpu_secs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    SiAppliance,
    Dnsmasq,
    Kea,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::SiAppliance => "si-appliance",
            Server::Dnsmasq => "dnsmasq",
            Server::Kea => "kea-dhcp4",
        }
    }
    fn durability(self) -> &'static str {
        match self {
            Server::SiAppliance => "journal, fdatasync per batch before ACK",
            Server::Dnsmasq => "lease file, no fsync",
            Server::Kea => "memfile CSV, no fsync",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Run {
    rate: f64,
    do_sent: u64,
    do_drops: u64,
    ra_sent: u64,
    ra_recv: u64,
    ra_drops: u64,
    /// Server CPU time (user + system) over the run, seconds.
    cpu: f64,
}

impl Run {
    fn drop_pct(&self) -> f64 {
        // A lease is lost if either its DISCOVER or its REQUEST went unanswered.
        if self.do_sent == 0 { 100.0 } else { 100.0 * (self.do_sent.saturating_sub(self.ra_recv)) as f64 / self.do_sent as f64 }
    }
}

fn parse(out: &str) -> Run {
    let mut r = Run::default();
    let mut section = 0;
    for l in out.lines() {
        let l = l.trim();
        if l.starts_with("***Statistics for: DISCOVER-OFFER") {
            section = 1;
        } else if l.starts_with("***Statistics for: REQUEST-ACK") {
            section = 2;
        }
        let num = |p: &str| l.strip_prefix(p).and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(v) = l.strip_prefix("Rate:").and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()) {
            r.rate = v;
        }
        match section {
            1 => {
                if let Some(v) = num("sent packets:") { r.do_sent = v; }
                if let Some(v) = num("drops:") { r.do_drops = v; }
            }
            2 => {
                if let Some(v) = num("sent packets:") { r.ra_sent = v; }
                if let Some(v) = num("received packets:") { r.ra_recv = v; }
                if let Some(v) = num("drops:") { r.ra_drops = v; }
            }
            _ => {}
        }
    }
    r
}

/// Starts server `s`; si-appliance is configured as for a deployment of `clients` nodes
/// (`swarm.expected_nodes`, which also sizes its new-client burst: a declared rack is let in at once).
fn start(lab: &Lab, s: Server, clients: u32) -> Proc {
    match s {
        Server::SiAppliance => {
            let cfg = format!(
                "iface = \"eth0\"\nenroll = \"any\"\nstate_dir = \"{}\"\nstore = \"{}\"\n[dhcp]\nanswer = \"all\"\nprobe = false\nlease_time = \"1h\"\n[http]\nport = 8080\n[tftp]\nenable = false\n[swarm]\nexpected_nodes = {clients}\n",
                lab.path("state").display(),
                lab.path("store").display()
            );
            // Logs as deployed (info: one line per lease state change), not the tests' debug.
            let cfgp = lab.path("si.toml");
            fs::write(&cfgp, cfg).expect("config");
            let mut c = lab.hosts[0].cmd(common::appliance_bin());
            c.arg("--config").arg(&cfgp).env("RUST_LOG", "info");
            let mut p = Proc::spawn("si", c, lab.path("si-bench.log"));
            p.wait_log("si-appliance ready", Duration::from_secs(30));
            p
        }
        Server::Dnsmasq => {
            let mut c = lab.hosts[0].cmd("dnsmasq");
            c.args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=eth0",
                "--bind-interfaces",
                "--user=root",
                "--group=root",
                // No ICMP check before offering (it costs about 3 s per new address; Kea and
                // si-appliance do not ping either) and room for every lease.
                "--no-ping",
                "--dhcp-lease-max=100000",
                "--dhcp-authoritative",
                "--dhcp-range=10.66.0.10,10.66.15.250,255.255.240.0,1h",
            ])
            .arg(format!("--dhcp-leasefile={}", lab.path("dnsmasq.leases").display()))
            .arg(format!("--pid-file={}", lab.path("dnsmasq.pid").display()));
            let mut p = Proc::spawn("dnsmasq", c, lab.path("dnsmasq.log"));
            p.wait_log("DHCP, IP range", Duration::from_secs(10));
            p
        }
        Server::Kea => {
            let conf = format!(
                r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["eth0"], "dhcp-socket-type": "udp"}},
  "lease-database": {{"type": "memfile", "persist": true, "name": "{leases}", "lfc-interval": 0}},
  "control-socket": {{"socket-type": "unix", "socket-name": "{sock}"}},
  "valid-lifetime": 3600,
  "subnet4": [{{"id": 1, "subnet": "10.66.0.0/20", "pools": [{{"pool": "10.66.0.10 - 10.66.15.250"}}]}}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "stdout"}}], "severity": "INFO"}}]
}}}}"#,
                leases = lab.path("kea-leases4.csv").display(),
                sock = lab.path("kea4.sock").display()
            );
            let path = lab.path("kea.json");
            fs::write(&path, conf).expect("kea config");
            let mut c = lab.hosts[0].cmd("kea-dhcp4");
            c.arg("-c").arg(&path).env("KEA_PIDFILE_DIR", &lab.dir).env("KEA_LOCKFILE_DIR", &lab.dir);
            let mut p = Proc::spawn("kea", c, lab.path("kea.log"));
            p.wait_log("DHCP4_STARTED", Duration::from_secs(20));
            p
        }
    }
}

fn one_run(s: Server, rate: u32, secs: u32) -> Run {
    let mut lab = Lab::new("bn");
    lab.add_host(Some("10.66.0.1/20"), Some("02:66:00:00:00:01"));
    lab.add_host(Some("10.66.0.2/20"), Some("02:66:00:00:00:02"));
    let clients = rate * secs;
    let server = start(&lab, s, clients);
    let n = clients.to_string();
    let mut c = lab.hosts[1].cmd("perfdhcp");
    c.args(["-4", "-l", "eth0", "-r", &rate.to_string(), "-n", &n, "-R", &n, "-W", "2000000", "10.66.0.1"]);
    let t0 = std::time::Instant::now();
    let mut p = Proc::spawn("perfdhcp", c, lab.path("perfdhcp.log"));
    let st = p.wait_exit(Duration::from_secs(u64::from(secs) * 4 + 60));
    // perfdhcp's own "Rate" divides by the whole run including the 2 s wait for late answers;
    // completed leases/s here is ACKs received over the run less that wait.
    let busy = (t0.elapsed().as_secs_f64() - 2.0).max(0.1);
    let out = p.log_text();
    let cpu = cpu_secs(server.child.id()).unwrap_or(0.0);
    drop(server);
    let mut r = parse(&out);
    r.rate = r.ra_recv as f64 / busy;
    r.cpu = cpu;
    if r.do_sent == 0 {
        eprintln!("{} at {rate}/s: perfdhcp ({st}) printed no statistics:\n{out}", s.name());
    }
    r
}

/// One avalanche round's figures (perfdhcp's summary lines).
#[derive(Clone, Debug, Default)]
struct Round {
    secs: f64,
    sent: u64,
    resent: u64,
    received: u64,
    complete: bool,
}

fn parse_avalanche(out: &str) -> Round {
    let mut r = Round::default();
    for l in out.lines() {
        let l = l.trim();
        let num = |p: &str| l.strip_prefix(p).and_then(|v| v.trim().parse::<u64>().ok());
        // "It took 00:00:02.043289 to provision 1000 clients."
        if let Some(t) = l.strip_prefix("It took ").and_then(|v| v.split_whitespace().next()) {
            let parts: Vec<f64> = t.split(':').filter_map(|x| x.parse().ok()).collect();
            if parts.len() == 3 {
                r.secs = parts[0] * 3600.0 + parts[1] * 60.0 + parts[2];
                r.complete = true;
            }
        }
        if let Some(v) = num("Requests sent + resent:") { r.sent = v; }
        if let Some(v) = num("Requests resent:") { r.resent = v; }
        if let Some(v) = num("Responses received:") { r.received = v; }
    }
    r
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The boot storm: see the module docs.
fn storm(nodes: u32) {
    let servers = [Server::SiAppliance, Server::Kea, Server::Dnsmasq];
    let rounds: [(&str, Vec<String>); 3] = [
        ("PXE ROM", vec![format!("60,{}", hex("PXEClient:Arch:00000:UNDI:002001")), "93,0000".into()]),
        ("iPXE", vec![format!("60,{}", hex("PXEClient:Arch:00000:UNDI:002001")), "93,0000".into(), format!("77,{}", hex("iPXE"))]),
        ("installer", vec![format!("60,{}", hex("si-appliance"))]),
    ];
    println!("DHCPv4 boot storm: {nodes} nodes at once (perfdhcp --scenario avalanche), three DORA rounds per node, fresh server per series");
    println!(
        "{:<14} {:<10} {:>10} {:>9} {:>9} {:>10} {:>6} {:>6}  {}",
        "server", "round", "all bound", "requests", "resent", "answers", "DO drp", "RA drp", "durability"
    );
    let mut worst = Vec::new();
    for s in servers {
        let mut lab = Lab::new("bs");
        lab.add_host(Some("10.66.0.1/20"), Some("02:66:00:00:00:01"));
        lab.add_host(Some("10.66.0.2/20"), Some("02:66:00:00:00:02"));
        let server = start(&lab, s, nodes);
        let mut max = 0f64;
        let mut resent = 0;
        for (i, (name, opts)) in rounds.iter().enumerate() {
            let mut c = lab.hosts[1].cmd("perfdhcp");
            c.args(["-4", "-l", "eth0", "--scenario", "avalanche", "-R", &nodes.to_string(), "-s", "7"]);
            for o in opts {
                c.args(["-o", o]);
            }
            c.arg("10.66.0.1");
            let mut p = Proc::spawn("perfdhcp", c, lab.path(&format!("storm-{i}.log")));
            let st = p.wait_exit(Duration::from_secs(120));
            let r = parse_avalanche(&p.log_text());
            let d = parse(&p.log_text());
            if !r.complete {
                eprintln!("{} {name}: perfdhcp ({st}) did not finish:\n{}", s.name(), p.log_text());
            }
            let bound = if r.complete { format!("{:.2} s", r.secs) } else { "never".into() };
            println!(
                "{:<14} {:<10} {:>10} {:>9} {:>9} {:>10} {:>6} {:>6}  {}",
                s.name(),
                name,
                bound,
                r.sent,
                r.resent,
                r.received,
                d.do_drops,
                d.ra_drops,
                s.durability()
            );
            max = max.max(if r.complete { r.secs } else { f64::INFINITY });
            resent += r.resent;
        }
        drop(server);
        worst.push((s, max, resent));
    }
    println!();
    let ours = worst[0].1;
    for (s, max, resent) in &worst {
        println!("  {:<13}: slowest round {max:.2} s ({:.2} × si-appliance's), {resent} retransmissions in all", s.name(), max / ours);
    }
    println!("goal: every round of {nodes} nodes bound within 5 s, 0 drops");
}

fn main() {
    // `cargo bench` passes "--bench"; "storm" picks the boot-storm benchmark.
    common::require_root();
    if std::env::args().any(|a| a == "storm") {
        let nodes = std::env::var("BENCH_STORM_NODES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000u32).clamp(1, 3000);
        storm(nodes);
        return;
    }
    let rates: Vec<u32> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "1000,2000,4000,8000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let secs: u32 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).clamp(1, 60);
    let servers = [Server::SiAppliance, Server::Dnsmasq, Server::Kea];
    let tool = Command::new("perfdhcp").arg("-v").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let load = || fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!("DHCPv4 DORA benchmark: perfdhcp {tool}, {secs} s per run, fresh server and lease state per run");
    println!("machine: {} CPUs, load average {} (perfdhcp shares them: completed/s is bounded by the machine, CPU µs/lease is each server's own cost)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), load());
    println!(
        "{:<14} {:>9} {:>12} {:>9} {:>9} {:>9} {:>14}",
        "server", "offered/s", "completed/s", "DO drop%", "RA drop%", "lost%", "CPU µs/lease"
    );
    let mut best = [0f64; 3];
    let mut table: Vec<(u32, [f64; 3])> = Vec::new();
    for &rate in &rates {
        let mut row = [0f64; 3];
        for (i, s) in servers.iter().enumerate() {
            let r = one_run(*s, rate, secs);
            let pct = |d: u64, n: u64| if n == 0 { 0.0 } else { 100.0 * d as f64 / n as f64 };
            let us = if r.ra_recv > 0 { r.cpu * 1e6 / r.ra_recv as f64 } else { 0.0 };
            println!(
                "{:<14} {:>9} {:>12.1} {:>9.2} {:>9.2} {:>9.2} {:>14.1}",
                s.name(),
                rate,
                r.rate,
                pct(r.do_drops, r.do_sent),
                pct(r.ra_drops, r.ra_sent),
                r.drop_pct(),
                us
            );
            row[i] = r.rate;
            best[i] = best[i].max(r.rate);
        }
        table.push((rate, row));
    }
    println!();
    println!("ratios (si-appliance / other, completed leases/s):");
    for (rate, row) in &table {
        let ratio = |o: f64| if o > 0.0 { format!("{:.2}", row[0] / o) } else { "n/a".into() };
        println!("  offered {rate:>6}/s: vs dnsmasq {}  vs kea {}", ratio(row[1]), ratio(row[2]));
    }
    let ratio = |o: f64| if o > 0.0 { format!("{:.2}", best[0] / o) } else { "n/a".into() };
    println!(
        "  best:  si-appliance {:.1}/s, dnsmasq {:.1}/s, kea {:.1}/s -> vs dnsmasq {}  vs kea {}",
        best[0], best[1], best[2], ratio(best[1]), ratio(best[2])
    );
    for s in servers {
        println!("  durability {:<13}: {}", s.name(), s.durability());
    }
    println!("load average at the end: {}", load());
}
