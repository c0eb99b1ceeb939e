//! The fuzz campaign: every target of `vm-tests/fuzz/targets.rs` for a set time.
//!
//!     cargo bench --bench fuzz                           # 60 s per target
//!     FUZZ_SECS=600 cargo bench --bench fuzz             # the campaign figures in README
//!     FUZZ_TARGETS=dhcp,tar FUZZ_JOBS=2 cargo bench --bench fuzz
//!
//! FUZZ_SEED makes a run reproducible (default: the clock); FUZZ_OUT (default /tmp/si-fuzz)
//! receives crashing inputs; FUZZ_JOBS runs that many targets at once (one thread each).
//! Prints one row per target (executions, rate, seeds, corpus, distinct outcomes, crashes) and
//! exits 1 when any input crashed or hung.

#[path = "fuzz/mod.rs"]
mod fuzz;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuzz::engine::{self, Outcome};
use fuzz::targets::ALL;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() {
    let secs: u64 = env("FUZZ_SECS", 60);
    let jobs: usize = env("FUZZ_JOBS", 1).max(1);
    let seed: u64 = env("FUZZ_SEED", SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    let out = PathBuf::from(std::env::var("FUZZ_OUT").unwrap_or_else(|_| "/tmp/si-fuzz".into()));
    let want: Option<Vec<String>> = std::env::var("FUZZ_TARGETS").ok().map(|v| v.split(',').map(str::to_owned).collect());
    let targets: Vec<_> = ALL.iter().filter(|t| want.as_ref().is_none_or(|w| w.iter().any(|n| n == t.name))).collect();
    if targets.is_empty() {
        eprintln!("fuzz: no target matches FUZZ_TARGETS (have: {})", ALL.iter().map(|t| t.name).collect::<Vec<_>>().join(","));
        std::process::exit(2);
    }
    println!("fuzz: {} targets, {secs} s each, {jobs} at a time, seed {seed}, crashes to {}", targets.len(), out.display());
    engine::quiet_panics();
    let queue = Mutex::new(targets.into_iter());
    let results: Mutex<Vec<(&'static str, Outcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let Some(t) = queue.lock().ok().and_then(|mut q| q.next()) else { break };
                let o = engine::run(t, Duration::from_secs(secs), u64::MAX, seed, &out);
                println!(
                    "fuzz: {:<8} {:>6.0} s {:>11} execs {:>9.0}/s  seeds {:>3}  corpus {:>5}  outcomes {:>5}  crashes {}",
                    t.name,
                    o.elapsed.as_secs_f64(),
                    o.execs,
                    o.execs as f64 / o.elapsed.as_secs_f64().max(1e-9),
                    o.seeds,
                    o.corpus,
                    o.signatures,
                    o.crashes.len()
                );
                if let Some(m) = &o.first_panic {
                    println!("fuzz: {} first panic: {m}", t.name);
                }
                for c in &o.crashes {
                    println!("fuzz: {} crashed on {}", t.name, c.display());
                }
                if let Ok(mut r) = results.lock() {
                    r.push((t.name, o));
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    let crashes: usize = results.iter().map(|(_, o)| o.crashes.len()).sum();
    let execs: u64 = results.iter().map(|(_, o)| o.execs).sum();
    println!("fuzz: total {execs} executions, {crashes} crashing inputs");
    if crashes > 0 {
        std::process::exit(1);
    }
}
