//! Pack and unpack throughput of si-appliance's image store against GNU tar + zstd on the same
//! tree, in one run, reported as ratios (ours / theirs; goal >= 1.0).
//!
//!     cargo bench --bench bench_image            # tree: the cached debootstrap image
//!     SI_BENCH_TREE=/some/dir cargo bench --bench bench_image
//!     SI_BENCH_THREADS=4 cargo bench --bench bench_image   # zstd workers for ours (default: cores)
//!
//! Both sides use zstd level 3 with all cores (`zstd -T0`). Each figure is the median of five
//! runs, ours and theirs alternating, after one warm-up each (page cache warm, so this measures
//! CPU and the write path, and load from other processes hits both sides alike).
//! Run as root (the tree has root-owned files and device nodes).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use si_appliance::image::pack::{self, PackOptions};
use si_appliance::image::progress::ProgressMode;
use si_appliance::image::scan::{self, ScanOptions};
use si_appliance::image::unpack::{self, UnpackOptions};

const RUNS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `ours` and `theirs` alternately (after one warm-up each), so load from other processes
/// on a shared machine hits both alike; returns the medians.
fn measure_pair(mut ours: impl FnMut() -> Duration, mut theirs: impl FnMut() -> Duration) -> (Duration, Duration) {
    ours();
    theirs();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        a.push(ours());
        b.push(theirs());
    }
    (median(a), median(b))
}

/// CPU seconds (user + system) used so far by this process's threads and by its waited-for
/// children.
fn cpu() -> (f64, f64) {
    let get = |who| {
        // SAFETY: getrusage fills the zeroed struct we pass; no other memory is touched.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    };
    (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN))
}

fn sh(script: &str, args: &[&Path]) {
    let st = Command::new("sh").arg("-c").arg(script).arg("sh").args(args).status().expect("sh");
    assert!(st.success(), "{script} failed");
}

fn fresh(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("mkdir");
}

fn main() {
    let tree = std::env::var_os("SI_BENCH_TREE").map(PathBuf::from).unwrap_or_else(common::debian_image);
    let work = tempfile::tempdir().expect("tempdir");
    let ours_archive = work.path().join("ours.tar.zst");
    let gnu_archive = work.path().join("gnu.tar.zst");
    let out = work.path().join("out");
    let threads = std::env::var("SI_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
    let opts = PackOptions { zstd_level: Some(3), threads, progress: ProgressMode::Off };
    let uopts = UnpackOptions { progress: ProgressMode::Off, ..UnpackOptions::default() };

    let nodes = scan::scan(&tree, &ScanOptions::default()).expect("scan");
    let bytes: u64 = nodes.iter().map(si_appliance::image::tarw::stored_size).sum();
    let mb = bytes as f64 / 1e6;

    let c0 = cpu();
    let (ours_pack, gnu_pack) = measure_pair(
        || {
            let t = Instant::now();
            let nodes = scan::scan(&tree, &ScanOptions::default()).expect("scan");
            let f = fs::File::create(&ours_archive).expect("create");
            pack::write_archive(&tree, &nodes, None, None, &opts, &ours_archive, f).expect("pack");
            t.elapsed()
        },
        || {
            let t = Instant::now();
            sh(r#"tar -cf - -C "$1" . | zstd -T0 -3 -q -f -o "$2""#, &[&tree, &gnu_archive]);
            t.elapsed()
        },
    );
    let c1 = cpu();
    let (ours_unpack, gnu_unpack) = measure_pair(
        || {
            fresh(&out);
            let t = Instant::now();
            unpack::unpack(fs::File::open(&ours_archive).expect("open"), &out, &uopts).expect("unpack");
            t.elapsed()
        },
        || {
            fresh(&out);
            let t = Instant::now();
            sh(r#"zstd -d -q -c "$1" | tar -xpf - -C "$2""#, &[&gnu_archive, &out]);
            t.elapsed()
        },
    );
    let c2 = cpu();
    let _ = fs::remove_dir_all(&out);
    // Per run (warm-up included: RUNS + 1 of each). Ours is this process, so its figure also
    // holds the scan and, for unpack, both sides' `fresh()` (rm -rf of the previous tree).
    let per = |a: f64, b: f64| (b - a) / (RUNS + 1) as f64;
    let (pack_cpu_ours, pack_cpu_gnu) = (per(c0.0, c1.0), per(c0.1, c1.1));
    let (unpack_cpu_ours, unpack_cpu_gnu) = (per(c1.0, c2.0), per(c1.1, c2.1));

    let rate = |d: Duration| mb / d.as_secs_f64();
    println!(
        "tree: {} ({} entries, {:.1} MB of file data), {} threads, zstd -3",
        tree.display(),
        nodes.len(),
        mb,
        threads
    );
    println!(
        "CPU seconds per run: pack ours {pack_cpu_ours:.2} / theirs {pack_cpu_gnu:.2}; unpack ours {unpack_cpu_ours:.2} / theirs {unpack_cpu_gnu:.2}"
    );
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average during the run: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!(
        "archive sizes: ours {:.1} MB, tar|zstd {:.1} MB",
        fs::metadata(&ours_archive).map(|m| m.len()).unwrap_or(0) as f64 / 1e6,
        fs::metadata(&gnu_archive).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );
    println!(
        "pack:   ours {:>7.3} s {:>7.1} MB/s | tar -c | zstd -T0   {:>7.3} s {:>7.1} MB/s | ratio {:.2}",
        ours_pack.as_secs_f64(),
        rate(ours_pack),
        gnu_pack.as_secs_f64(),
        rate(gnu_pack),
        gnu_pack.as_secs_f64() / ours_pack.as_secs_f64()
    );
    println!(
        "unpack: ours {:>7.3} s {:>7.1} MB/s | zstd -d | tar -x     {:>7.3} s {:>7.1} MB/s | ratio {:.2}",
        ours_unpack.as_secs_f64(),
        rate(ours_unpack),
        gnu_unpack.as_secs_f64(),
        rate(gnu_unpack),
        gnu_unpack.as_secs_f64() / ours_unpack.as_secs_f64()
    );
}
