//! Pack and unpack throughput of si-appliance's image store against GNU tar + zstd on the same
//! tree, in one run, reported as ratios (ours / theirs; goal >= 1.0).
//!
//!     cargo bench --bench bench_image            # tree: the cached debootstrap image
//!     SI_BENCH_TREE=/some/dir cargo bench --bench bench_image
//!
//! Both sides use zstd level 3 with all cores (`zstd -T0`). Each measurement is the median of
//! three runs after one warm-up run (page cache warm, so this measures CPU and the write path).
//! Run as root (the tree has root-owned files and device nodes).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use si_appliance::image::pack::{self, PackOptions};
use si_appliance::image::progress::ProgressMode;
use si_appliance::image::scan::{self, ScanOptions};
use si_appliance::image::unpack::{self, UnpackOptions};

const RUNS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn measure(mut f: impl FnMut() -> Duration) -> Duration {
    f();
    median((0..RUNS).map(|_| f()).collect())
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
    let tree = std::env::var_os("SI_BENCH_TREE").map(PathBuf::from).unwrap_or_else(|| {
        let dir = PathBuf::from("/var/cache/si-appliance-test/bookworm-minbase");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-tests/make-debian-image.sh");
        assert!(Command::new(&script).arg(&dir).status().expect("make-debian-image.sh").success());
        dir
    });
    let work = tempfile::tempdir().expect("tempdir");
    let ours_archive = work.path().join("ours.tar.zst");
    let gnu_archive = work.path().join("gnu.tar.zst");
    let out = work.path().join("out");
    let threads = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let opts = PackOptions { zstd_level: Some(3), threads, progress: ProgressMode::Off };
    let uopts = UnpackOptions { progress: ProgressMode::Off, ..UnpackOptions::default() };

    let nodes = scan::scan(&tree, &ScanOptions::default()).expect("scan");
    let bytes: u64 = nodes.iter().map(si_appliance::image::tarw::stored_size).sum();
    let mb = bytes as f64 / 1e6;

    let ours_pack = measure(|| {
        let t = Instant::now();
        let nodes = scan::scan(&tree, &ScanOptions::default()).expect("scan");
        let f = fs::File::create(&ours_archive).expect("create");
        pack::write_archive(&tree, &nodes, None, None, &opts, &ours_archive, f).expect("pack");
        t.elapsed()
    });
    let gnu_pack = measure(|| {
        let t = Instant::now();
        sh(r#"tar -cf - -C "$1" . | zstd -T0 -3 -q -f -o "$2""#, &[&tree, &gnu_archive]);
        t.elapsed()
    });
    let ours_unpack = measure(|| {
        fresh(&out);
        let t = Instant::now();
        unpack::unpack(fs::File::open(&ours_archive).expect("open"), &out, &uopts).expect("unpack");
        t.elapsed()
    });
    let gnu_unpack = measure(|| {
        fresh(&out);
        let t = Instant::now();
        sh(r#"zstd -d -q -c "$1" | tar -xpf - -C "$2""#, &[&gnu_archive, &out]);
        t.elapsed()
    });
    let _ = fs::remove_dir_all(&out);

    let rate = |d: Duration| mb / d.as_secs_f64();
    println!(
        "tree: {} ({} entries, {:.1} MB of file data), {} threads, zstd -3",
        tree.display(),
        nodes.len(),
        mb,
        threads
    );
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
