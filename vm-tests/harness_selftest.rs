//! The harness itself: a lab with two hosts on one bridge can ping, and leaves nothing behind.
mod common;

use std::process::Command;

#[test]
fn two_hosts_on_a_bridge_reach_each_other_and_are_cleaned_up() {
    let names;
    {
        let mut lab = common::Lab::new("hs");
        lab.add_host(Some("10.200.0.1/24"), None);
        lab.add_host(Some("10.200.0.2/24"), None);
        let out = lab.hosts[1].cmd("ping").args(["-c", "1", "-W", "5", "10.200.0.1"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        names = [lab.switch.name.clone(), lab.hosts[0].name.clone(), lab.hosts[1].name.clone()];
    }
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} left behind");
    }
}

/// `common::cpu_secs` reads the kernel's clock rate: it agrees with getrusage for this process
/// (a wrong ticks-per-second would scale it away from the kernel's own figure).
#[test]
fn cpu_secs_agrees_with_getrusage() {
    let rusage = || {
        // SAFETY: getrusage writes only into the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    };
    // Burn CPU until the kernel counts 0.3 s, so both figures are well above one tick (bounded
    // in wall time on a busy machine).
    let t0 = std::time::Instant::now();
    let mut x = 0u64;
    while rusage() < 0.3 && t0.elapsed() < std::time::Duration::from_secs(60) {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    let ours = common::cpu_secs(std::process::id()).expect("own stat");
    let kernel = rusage();
    assert!(kernel >= 0.3, "burned only {kernel} s");
    // Same quantity, two roundings (ticks vs µs) and a few instructions apart.
    assert!((ours - kernel).abs() < 0.05 + kernel * 0.1, "cpu_secs {ours} vs getrusage {kernel}");
    assert!(common::cpu_secs(u32::MAX).is_none());
}

/// `random_file` writes what it returns, and two files differ.
#[test]
fn random_file_writes_what_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let da = common::random_file(&a, 100_003);
    let db = common::random_file(&b, 100_003);
    assert_eq!(std::fs::read(&a).expect("read a"), da);
    assert_eq!(da.len(), 100_003);
    assert_ne!(da, db);
    {
        let _keep = common::RemoveOnSuccess(dir.path().join("gone"));
        std::fs::create_dir(dir.path().join("gone")).expect("mkdir");
    }
    assert!(!dir.path().join("gone").exists(), "RemoveOnSuccess removes on success");
}
