//! The swarm simulator's driver (not a test; no root, no network): `si_appliance::swarm::sim`
//! runs the engine's own `Core` on every node and the tracker's own peer choice over a max-min
//! fair flow model (see that module's doc). A bench rather than an `si-appliance sim` subcommand:
//! the privileged binary that ships to the appliance and the nodes gets no modelling code paths,
//! and its figures sit beside the emulated runs' (`cargo bench --bench swarm`), which calibrate it.
//!
//!     cargo bench --bench swarm_sim -- MODE=calibrate RUNS=a.json,b.json   # fit RTT and CPU
//!     cargo bench --bench swarm_sim -- MODE=predict N=128 C=10 GOODPUT=0.95 RTT_MS=4 HASH_MS=2
//!     cargo bench --bench swarm_sim -- MODE=project RTT_MS=30 HASH_MS=0.5 START_MS=400 EFF=0.94 SEEDS=1
//!                                      # 1000 × 2.7 GB, 1 GbE (SCALE.md stop 44; ~27 min a row)
//!     cargo bench --bench swarm_sim -- MODE=agg RUNS=...                   # agg = 16 vs 1
//!
//! Options (`KEY=VALUE` arguments or environment): `N`, `C` Mbit/s, `S` MiB (default 64), `SLOW`
//! percent of nodes on C/4 (spread like the swarm bench's), `GOODPUT` one TCP stream's goodput as a
//! share of C (default 0.95; calibrate: S / T* measured), `RTT_MS`, `HASH_MS` hashing per MiB,
//! `START_MS` a node's start delay, `CORES` cores the nodes share (0: own CPU each, as real
//! nodes), `CPU_S_PER_64MIB` their CPU seconds per 64 MiB delivered, `AGG` block aggregation (project: default four Core blocks per piece), `SEEDS` runs per case (default 3),
//! `RUNS` the swarm bench's `JSON` files (calibrate / agg), `CPU=0` (calibrate) fits without the
//! runs' measured CPU (the network alone), `OUT` a file for the JSON result,
//! `PIECE` piece length in bytes (predict; default the project's `piece_length`), `SEED_SLOTS`
//! the seed's upload slots rotating per piece (predict; 0 = every connection at once, as
//! librqbit's seed), `SEED_SLOTS_S` those slots for the first seconds only, `START_SPREAD_MS` (predict) the nodes
//! start one after another over that time (the makespan is also given from the last start),
//! `JOIN_DELAY_MS` (predict) the tracker's `swarm.join_delay`, `RAMP=1` (predict)
//! prints the pieces all nodes verified in each second, the seed's repeats and what the
//! nodes' downloads waited on,
//! `VARIANTS=0,2` (project) runs only those rows of the sensitivity table (0 = base),
//! `CLAIMS=0` runs the nodes without `si_claim` (as before it), `EFF` the nodes' links'
//! efficiency in the swarm's middle (default 1; measured from a traced run, SCALE.md stop 41).

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

use si_appliance::swarm::sim::{self, Params};

const MIB: u64 = 1 << 20;

struct Knobs(BTreeMap<String, String>);

impl Knobs {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    fn f(&self, k: &str, d: f64) -> f64 {
        self.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
    }
    fn u(&self, k: &str, d: u64) -> u64 {
        self.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
    }
}

fn knobs() -> Knobs {
    let mut kv = BTreeMap::new();
    for k in ["MODE", "CORES", "CPU_S_PER_64MIB", "N", "C", "S", "SLOW", "GOODPUT", "RTT_MS", "HASH_MS", "START_MS", "AGG", "SEEDS", "RUNS", "OUT", "SIZE_BYTES", "PIECE", "SEED_SLOTS", "SEED_SLOTS_S", "NODE_SLOTS", "RAMP", "CPU", "VARIANTS", "CLAIMS", "EFF", "START_SPREAD_MS", "JOIN_DELAY_MS"] {
        if let Ok(v) = std::env::var(k) {
            kv.insert(k.to_owned(), v);
        }
    }
    for a in std::env::args().skip(1) {
        if let Some((k, v)) = a.split_once('=') {
            kv.insert(k.to_uppercase(), v.to_owned());
        }
    }
    Knobs(kv)
}

/// Whether node i is slow with `pct` % slow nodes (the swarm bench's rule).
fn slow(i: usize, pct: usize) -> bool {
    (i + 1) * pct / 100 > i * pct / 100
}

/// The physical parameters tuned on emulated runs.
#[derive(Clone, Copy, Debug)]
struct Phys {
    /// Cores the nodes shared in the run (0: unlimited) and CPU seconds per byte delivered.
    cores: f64,
    cpu_per_byte: f64,
    rtt: f64,
    hash_per_mib: f64,
    start: f64,
    /// The nodes' links' efficiency: the share of one stream's goodput a node's link carries
    /// in the swarm's steady middle (request-clocked TCP flows, many per link), as measured on
    /// a traced emulated run (`EFF`; 1: the fluid model's full share). The seed's link is not
    /// scaled (traced: it stays full).
    eff: f64,
}

/// A case: N nodes, C Mbit/s, S bytes, slow share, link goodput (bytes/s).
#[derive(Clone, Debug, Default)]
struct Case {
    n: usize,
    mbit: f64,
    size: u64,
    slow_pct: usize,
    goodput: f64,
    piece_len: Option<u32>,
    /// The seed's upload slots (0: every connection at once, as librqbit).
    seed_slots: usize,
    node_slots: usize,
    /// The nodes claim what they ask the seed for (`CLAIMS=0`: as before `si_claim`).
    claims: bool,
    /// `SEED_SLOTS_S`: the seed's slots hold only for the first seconds (0: always).
    seed_slots_for: f64,
    /// Sample what the nodes' downloads wait on (`RAMP=1`).
    diag: bool,
    /// `START_SPREAD_MS`: the nodes start one after another over this many seconds (node i at
    /// `START_MS` + i / (N - 1) of it), as a rack whose nodes come out of their boot over seconds.
    start_spread: f64,
    /// `JOIN_DELAY_MS`: the tracker's `join_delay` (a node gets only the seed for that long).
    join_delay: f64,
}

fn params(c: &Case, ph: Phys, agg: u32, seed: u64) -> Params {
    let mut p = Params::new(c.n, c.size, c.goodput);
    if let Some(pl) = c.piece_len {
        p.piece_len = pl;
    }
    p.factor = (0..c.n).map(|i| if slow(i, c.slow_pct) { 0.25 } else { 1.0 } * ph.eff).collect();
    p.rtt = ph.rtt;
    p.hash_secs_per_mib = ph.hash_per_mib;
    p.cpu_cores = ph.cores;
    p.cpu_secs_per_byte = ph.cpu_per_byte;
    p.start_delay = ph.start;
    p.join_delay = c.join_delay;
    p.start_gap = if c.n > 1 { c.start_spread / (c.n - 1) as f64 } else { 0.0 };
    p.agg = agg;
    p.seed_slots = c.seed_slots;
    p.seed_slots_for = c.seed_slots_for;
    p.node_slots = c.node_slots;
    p.claims = c.claims;
    p.diag = c.diag;
    p.seed = seed;
    // Rate recomputation: finer than a block's time at full rate.
    p.quantum = (f64::from(16 * 1024 * agg) / c.goodput / 4.0).clamp(1e-5, 2e-3);
    p
}

/// What [`simulate`] found over its runs.
struct Sims {
    /// Mean makespan, seconds.
    mean: f64,
    min: f64,
    max: f64,
    /// Mean seed copies.
    copies: f64,
    /// Wall seconds of all the runs.
    wall: f64,
    /// The first run's per-node completion times.
    done: Vec<f64>,
    /// The first run's pieces verified per second, all nodes together.
    ramp: Vec<u32>,
    /// The first run's connections per node when the last node finished.
    conns: Vec<usize>,
    /// The first run's nodes' neighbours at the end (host indices, 0 the seed).
    peers: Vec<Vec<usize>>,
    /// The first run's seed repeats per second, in pieces.
    repeats: Vec<f64>,
    /// The first run's waits per second (`RAMP=1`).
    waits: Vec<si_appliance::swarm::sim::Waits>,
}

/// The makespan over `seeds` runs (mean, min, max), seed copies, wall time, the first run's detail.
fn simulate(c: &Case, ph: Phys, agg: u32, seeds: u64) -> Sims {
    let t0 = Instant::now();
    let mut ms = Vec::new();
    let mut copies = 0.0;
    let mut done = Vec::new();
    let mut ramp = Vec::new();
    let mut conns = Vec::new();
    let mut peers = Vec::new();
    let mut repeats = Vec::new();
    let mut waits = Vec::new();
    for s in 1..=seeds {
        match sim::run(&params(c, ph, agg, s)) {
            Ok(o) => {
                ms.push(o.makespan);
                copies += o.seed_copies;
                if done.is_empty() {
                    done = o.done;
                    ramp = o.verified_per_s;
                    conns = o.conns_at_end;
                    peers = o.peers_at_end;
                    repeats = o.repeats_per_s;
                    waits = o.waits_per_s;
                }
            }
            Err(e) => {
                eprintln!("swarm sim: N={} seed {s}: {e}", c.n);
                ms.push(f64::NAN);
            }
        }
    }
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ms.iter().copied().fold(0.0, f64::max);
    Sims { mean, min, max, copies: copies / seeds as f64, wall: t0.elapsed().as_secs_f64(), done, ramp, conns, peers, repeats, waits }
}

/// A swarm bench JSON file: the case (goodput from its T*) and the measured makespan of its
/// first `ours` run.
fn load_run(path: &str) -> Option<(Case, f64, String, (f64, f64))> {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    let n = v["n"].as_u64()? as usize;
    let size = v["size"].as_u64()?;
    let tstar = v["tstar"].as_f64()?;
    // Runs recorded before the bench wrote it had 256 KiB pieces (the floor of the time).
    let piece_len = v["piece_len"].as_u64().map_or(256 << 10, |p| p as u32);
    let run = v["runs"].as_array()?.iter().find(|r| r["method"].as_str().is_some_and(|m| m.starts_with("ours")))?;
    let makespan = run["makespan"].as_f64()?;
    let note = format!("busy {:.0} %{}, load {}", run["busy"].as_f64().unwrap_or(0.0) * 100.0, if run["saturated"].as_bool() == Some(true) { " SATURATED" } else { "" }, v["loadavg"].as_str().unwrap_or("?"));
    let case = Case { n, mbit: v["mbit"].as_f64()?, size, slow_pct: v["slow_pct"].as_u64().unwrap_or(0) as usize, goodput: size as f64 / tstar, piece_len: Some(piece_len), claims: true, ..Case::default() };
    // The run's CPU: the cores the nodes got (their CPU seconds over the run's wall time) and
    // their CPU seconds per byte delivered; both measured, none fitted.
    let cpu = run["clients_cpu"].as_f64().unwrap_or(0.0);
    let wall = run["wall"].as_f64().unwrap_or(0.0);
    let shared = if cpu > 0.0 && wall > 0.0 { (cpu / wall, cpu / (n as f64 * size as f64)) } else { (0.0, 0.0) };
    let note = format!("{note}, nodes' CPU {:.2} cores, {:.2} CPU-s/client/64 MiB", shared.0, shared.1 * (64 * MIB) as f64);
    Some((case, makespan, note, shared))
}

fn runs(k: &Knobs) -> Vec<(Case, f64, String, (f64, f64))> {
    k.get("RUNS").unwrap_or("").split(',').filter(|s| !s.is_empty()).filter_map(|p| {
        let r = load_run(p);
        if r.is_none() {
            eprintln!("swarm sim: cannot read a finished `ours` run from {p}");
        }
        r
    }).collect()
}

fn phys(k: &Knobs) -> Phys {
    Phys { cores: k.f("CORES", 0.0), cpu_per_byte: k.f("CPU_S_PER_64MIB", 0.0) / (64 * MIB) as f64, rtt: k.f("RTT_MS", 2.0) / 1e3, hash_per_mib: k.f("HASH_MS", 0.0) / 1e3, start: k.f("START_MS", 0.0) / 1e3, eff: k.f("EFF", 1.0) }
}

fn main() {
    let k = knobs();
    let seeds = k.u("SEEDS", 3);
    let agg = k.u("AGG", 1) as u32;
    match k.get("MODE").unwrap_or("predict") {
        "calibrate" => calibrate(&k, seeds),
        "agg" => {
            // The aggregation's effect on the calibration cases: agg = AGG (default 16) vs 1.
            let a = k.u("AGG", 16) as u32;
            let ph = phys(&k);
            println!("| N, C | agg 1 makespan s | agg {a} makespan s | difference |");
            println!("|---|---|---|---|");
            for (c, _, _, cpu) in runs(&k) {
                let ph = Phys { cores: cpu.0, cpu_per_byte: cpu.1, ..ph };
                let fine = simulate(&c, ph, 1, seeds).mean;
                let coarse = simulate(&c, ph, a, seeds).mean;
                println!("| {}, {} | {fine:.2} | {coarse:.2} | {:+.1} % |", c.n, c.mbit, (coarse / fine - 1.0) * 100.0);
            }
        }
        "project" => project(&k, seeds),
        _ => {
            let mbit = k.f("C", 100.0);
            let size = k.u("S", 64) * MIB;
            let c = Case { n: k.u("N", 8) as usize, mbit, size, slow_pct: k.u("SLOW", 0) as usize, goodput: mbit * 1e6 / 8.0 * k.f("GOODPUT", 0.95), piece_len: k.get("PIECE").and_then(|v| v.parse().ok()), seed_slots: k.u("SEED_SLOTS", 0) as usize, node_slots: k.u("NODE_SLOTS", 0) as usize, claims: k.u("CLAIMS", 1) != 0, seed_slots_for: k.f("SEED_SLOTS_S", 0.0), diag: k.get("RAMP").is_some_and(|v| v != "0"), start_spread: k.f("START_SPREAD_MS", 0.0) / 1e3, join_delay: k.f("JOIN_DELAY_MS", 0.0) / 1e3 };
            let ph = phys(&k);
            let Sims { mean, min, max, copies, wall, done, ramp, conns, peers, repeats, waits } = simulate(&c, ph, agg, seeds);
            let tstar = size as f64 / c.goodput;
            println!("predicted N={} C={} S={} MiB piece {} KiB SLOW={} %: makespan {mean:.2} s (min {min:.2}, max {max:.2} over {seeds} seeds), T* {tstar:.2} s, makespan/T* {:.2}, seed copies {copies:.2}; wall {wall:.1} s", c.n, mbit, size / MIB, c.piece_len.unwrap_or(si_appliance::image::torrent::piece_length(size) as u32) / 1024, c.slow_pct, mean / tstar);
            if c.start_spread > 0.0 {
                // The swarm's own part once the last node is up (what a phase table adds).
                let own = mean - ph.start - c.start_spread;
                println!("  the nodes started over {:.2} s: makespan from the last node's start {own:.2} s, {:.2} × T*", c.start_spread, own / tstar);
            }
            if k.get("RAMP").is_some_and(|v| v != "0") {
                // The swarm's ramp, in the units of the emulated runs' progress lines.
                let piece = c.piece_len.unwrap_or(si_appliance::image::torrent::piece_length(size) as u32) as f64;
                let per_s: Vec<String> = ramp.iter().map(|p| format!("{:.0}", *p as f64 * piece * 8.0 / 1e6)).collect();
                println!("  all nodes' verified Mbit/s, per second of the first run: {}", per_s.join(" "));
                let rep: Vec<String> = repeats.iter().map(|p| format!("{p:.0}")).collect();
                println!("  the seed's repeats, pieces per second of the first run: {}", rep.join(" "));
                // What the nodes' downloads waited on (per second, % of the nodes not done).
                println!("  per second: nodes' upload used % | download full % | below, an unused source % | tied to busy senders % | nothing to ask % | uploads idle %");
                for (t, w) in waits.iter().enumerate().filter(|(_, w)| w.samples > 0) {
                    let a = |v: f64| v * 100.0 / f64::from(w.samples);
                    println!("    {t:>3} s: {:5.1} | {:5.1} | {:5.1} | {:5.1} | {:5.1} | {:5.1}", a(w.up_used), a(w.full), a(w.unused_source), a(w.tied), a(w.nothing), a(w.up_idle));
                }
                // Which nodes finish last (by start order: node 1 starts and announces first).
                let mut late: Vec<(usize, f64)> = done.iter().copied().enumerate().map(|(i, d)| (i + 1, d)).collect();
                late.sort_by(|a, b| b.1.total_cmp(&a.1));
                let late: Vec<String> = late.iter().take(late.len().div_ceil(10)).map(|(i, d)| format!("{i}:{:.2}", d / tstar)).collect();
                println!("  the last tenth of the nodes to finish (node: done / T*): {}", late.join(" "));
                let mut by = conns.clone();
                by.sort_unstable();
                let mut when = done.clone();
                when.sort_by(f64::total_cmp);
                let q = |v: &[f64], f: f64| v.get(((v.len() - 1) as f64 * f) as usize).copied().unwrap_or(0.0) / tstar;
                println!(
                    "  connections per node at the end (the seed's included): min {} median {} max {}; done / T*: first {:.2} p10 {:.2} median {:.2} p90 {:.2} last {:.2}",
                    by.first().unwrap_or(&0), by.get(by.len() / 2).unwrap_or(&0), by.last().unwrap_or(&0),
                    q(&when, 0.0), q(&when, 0.1), q(&when, 0.5), q(&when, 0.9), q(&when, 1.0)
                );
                // Nodes by the order they announced in (tenths): when they finished and how
                // many of their neighbours were themselves in the first tenth (a cluster of the
                // first to announce shows as a high share there and late finishes).
                let tenth = done.len().div_ceil(10).max(1);
                let rows: Vec<String> = (0..done.len()).step_by(tenth).map(|lo| {
                    let hi = (lo + tenth).min(done.len());
                    let mut d: Vec<f64> = done[lo..hi].to_vec();
                    d.sort_by(f64::total_cmp);
                    let (mut first, mut all) = (0usize, 0usize);
                    for nb in &peers[lo..hi] {
                        all += nb.iter().filter(|&&h| h != 0).count();
                        first += nb.iter().filter(|&&h| h != 0 && h <= tenth).count();
                    }
                    format!("{}-{}: {:.2}/{:.2} {:.0} %", lo + 1, hi, d[d.len() / 2] / tstar, d[d.len() - 1] / tstar, first as f64 * 100.0 / all.max(1) as f64)
                }).collect();
                println!("  by announce order (nodes: median/last done / T*, neighbours in the first tenth): {}", rows.join(" | "));
            }
            if c.slow_pct > 0 {
                let fast: f64 = done.iter().enumerate().filter(|(i, _)| !slow(*i, c.slow_pct)).map(|(_, d)| *d).fold(0.0, f64::max);
                println!("  fast nodes' last completion {fast:.2} s ({:.2} × T*)", fast / tstar);
            }
            if let Some(out) = k.get("OUT") {
                let v = serde_json::json!({"n": c.n, "mbit": mbit, "size": size, "slow_pct": c.slow_pct, "goodput": c.goodput, "rtt": ph.rtt, "hash_per_mib": ph.hash_per_mib, "start": ph.start, "agg": agg, "seeds": seeds, "makespan": mean, "min": min, "max": max, "seed_copies": copies});
                let _ = fs::write(out, serde_json::to_vec_pretty(&v).unwrap_or_default());
            }
        }
    }
}

/// Fits the physical parameters (RTT, hashing time per MiB, start delay) on the emulated runs: the
/// grid point with the smallest worst relative error. The algorithm is never tuned.
fn calibrate(k: &Knobs, seeds: u64) {
    let cases = runs(k);
    if cases.is_empty() {
        eprintln!("swarm sim: MODE=calibrate needs RUNS=file.json,… (the swarm bench's JSON output)");
        std::process::exit(2);
    }
    let agg = k.u("AGG", 1) as u32;
    // `CPU=0`: the network alone (for runs below saturation, and as the projection runs).
    let network_only = k.get("CPU") == Some("0");
    let mut best: Option<(f64, Phys, Vec<f64>)> = None;
    let eff = phys(k).eff;
    for rtt_ms in [1.0, 15.0, 30.0, 60.0] {
        for hash_ms in [0.0, 15.0, 30.0] {
            for start_ms in [100.0, 400.0, 800.0] {
                let ph = Phys { cores: 0.0, cpu_per_byte: 0.0, rtt: rtt_ms / 1e3, hash_per_mib: hash_ms / 1e3, start: start_ms / 1e3, eff };
                let preds: Vec<f64> = cases
                    .iter()
                    .map(|(c, _, _, cpu)| {
                        let cpu = if network_only { (0.0, 0.0) } else { *cpu };
                        simulate(c, Phys { cores: cpu.0, cpu_per_byte: cpu.1, ..ph }, agg, seeds).mean
                    })
                    .collect();
                let worst = cases.iter().zip(&preds).map(|((_, m, _, _), p)| (p / m - 1.0).abs()).fold(0.0, f64::max);
                eprintln!("  rtt {rtt_ms} ms, hash {hash_ms} ms/MiB, start {start_ms} ms: worst error {:.1} %", worst * 100.0);
                if best.as_ref().is_none_or(|b| worst < b.0) {
                    best = Some((worst, ph, preds));
                }
            }
        }
    }
    let Some((worst, ph, preds)) = best else { return };
    println!("fit: RTT_MS={} HASH_MS={} START_MS={} (worst error {:.1} %)", ph.rtt * 1e3, ph.hash_per_mib * 1e3, ph.start * 1e3, worst * 100.0);
    println!("| N, C | T* s | measured makespan s | simulated s | error | run |");
    println!("|---|---|---|---|---|---|");
    for ((c, m, note, _), p) in cases.iter().zip(&preds) {
        println!("| {}, {} | {:.2} | {m:.2} | {p:.2} | {:+.1} % | {note} |", c.n, c.mbit, c.size as f64 / c.goodput, (p / m - 1.0) * 100.0);
    }
}

/// N = 1000 × 2.7 GB on 1 GbE: the swarm's makespan and its sensitivity band.
fn project(k: &Knobs, seeds: u64) {
    let n = k.u("N", 1000) as usize;
    let size = k.u("SIZE_BYTES", 2_700_000_000);
    let mbit = k.f("C", 1000.0);
    let goodput = mbit * 1e6 / 8.0 * k.f("GOODPUT", 0.95);
    let ph = phys(k);
    let pl = si_appliance::image::torrent::piece_length(size) as u32;
    // Four Core blocks per piece by default (the validated aggregation: SCALE.md).
    let agg = k.u("AGG", u64::from((pl / (64 << 10)).max(1))) as u32;
    let base = Case { n, mbit, size, slow_pct: 0, goodput, piece_len: None, claims: k.u("CLAIMS", 1) != 0, ..Case::default() };
    let tstar = size as f64 / goodput;
    println!("projected: N={n} S={size} B C={mbit} Mbit/s goodput {:.1} MB/s T*={tstar:.1} s piece {} KiB agg {agg}", goodput / 1e6, pl >> 10);
    println!("| variant | projected makespan s | / T* | seed copies | wall s |");
    println!("|---|---|---|---|---|");
    let variants: Vec<(&str, Case)> = vec![
        ("base", base.clone()),
        ("piece × 0.5", Case { piece_len: Some(pl / 2), ..base.clone() }),
        ("piece × 2", Case { piece_len: Some(pl * 2), ..base.clone() }),
        ("goodput − 5 % (loss)", Case { goodput: goodput * 0.95, ..base.clone() }),
        ("link spread ±10 % (half the nodes at 0.9 C)", Case { slow_pct: 50, ..base.clone() }),
    ];
    // `VARIANTS=0,3`: only those rows (each N = 1000 variant takes tens of minutes on one core).
    let only: Option<Vec<usize>> = k.get("VARIANTS").map(|v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect());
    for (i, (name, c)) in variants.into_iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        let r = if name.starts_with("link spread") {
            // Every other node at 0.9 C, others at 1.1 C (the appliance at C).
            let mut sum = 0.0;
            let mut copies = 0.0;
            let t0 = Instant::now();
            for s in 1..=seeds {
                let mut p = params(&c, ph, agg, s);
                p.factor = (0..n).map(|i| if i % 2 == 0 { 0.9 } else { 1.1 } * ph.eff).collect();
                match sim::run(&p) {
                    Ok(o) => {
                        sum += o.makespan;
                        copies += o.seed_copies;
                    }
                    Err(e) => {
                        eprintln!("swarm sim: {name}: {e}");
                        sum = f64::NAN;
                    }
                }
            }
            (sum / seeds as f64, copies / seeds as f64, t0.elapsed().as_secs_f64())
        } else {
            let a = if c.piece_len.is_some_and(|p| p < pl) { agg / 2 } else { agg };
            let Sims { mean, copies, wall, .. } = simulate(&c, ph, a.max(1), seeds);
            (mean, copies, wall)
        };
        println!("| {name} | {:.1} | {:.2} | {:.2} | {:.0} |", r.0, r.0 / tstar, r.1, r.2);
    }
}
