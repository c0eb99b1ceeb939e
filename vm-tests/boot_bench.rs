//! Boot-services throughput benchmark (not a test): one command, run as root,
//!
//!     cargo bench --bench boot_throughput
//!
//! In namespaces it creates (a bridge, the appliance on 10.67.1.1, tftp-hpa's `in.tftpd` on
//! 10.67.1.2, a client on 10.67.1.3) it fetches the same 20 MB random file
//! - over TFTP from ours and from in.tftpd with the same client (curl, blksize 1468), one at a
//!   time and four at once;
//! - over TFTP with RFC 7440 windowsize (atftp, blksize 1468, windowsize 16) from both (in.tftpd
//!   5.2 ignores windowsize, so it is lock-step there);
//! - over TFTP from ours with atftp at windowsize 1, 4 and 64 (the appliance allows up to 64),
//! - over HTTP from ours (curl),
//!
//! and prints MB/s (median of `ROUNDS` runs, 1 MB = 10^6 bytes) and ratios. Wall-clock time of
//! the client process, so process start-up is included for every row alike.
//! `BENCH_ROUNDS=N` changes the number of rounds.
#[path = "common/mod.rs"]
mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Lab, Proc, cpu_secs, start_appliance, wait_for};
use rand::RngCore;
use sha2::{Digest, Sha256};

const OURS: &str = "10.67.1.1";
const HPA: &str = "10.67.1.2";
const SIZE: usize = 20 * 1024 * 1024;

fn main() {
    if std::fs::read_to_string("/proc/self/status")
        .map(|s| !s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(true)
    {
        eprintln!("boot_throughput: run as root (it creates network namespaces)");
        std::process::exit(2);
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).clamp(1, 50);

    let mut lab = Lab::new("bb");
    let a = lab.add_host(Some(&format!("{OURS}/24")), None);
    let h = lab.add_host(Some(&format!("{HPA}/24")), None);
    let c = lab.add_host(Some("10.67.1.3/24"), None);

    let root = lab.path("tftproot");
    fs::create_dir_all(&root).expect("tftp root");
    let mut data = vec![0u8; SIZE];
    rand::rng().fill_bytes(&mut data);
    fs::write(root.join("vmlinuz"), &data).expect("test file");
    let want = hex::encode(Sha256::digest(&data));
    drop(data);

    let config = format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{store}\"\nstate_dir = \"{state}\"\n[dhcp]\nmode = \"off\"\n\
         [tftp]\nmax_windowsize = 64\n[http]\nport = 80\n[boot]\nkernel = \"{k}\"\ninitrd = \"{k}\"\n",
        store = lab.path("store").display(),
        state = lab.path("state").display(),
        k = root.join("vmlinuz").display(),
    );
    let ours = start_appliance(&lab, a, "appliance", &config, &[]);

    let mut cmd = lab.hosts[h].cmd("/usr/sbin/in.tftpd");
    cmd.args(["-L", "-s"]).arg(&root).args(["-a", &format!("{HPA}:69")]);
    let hpa = Proc::spawn("in.tftpd", cmd, lab.path("in.tftpd.log"));
    let probe = lab.path("probe.bin");
    let up = wait_for(Duration::from_secs(15), || {
        let ok = lab.hosts[c]
            .cmd("timeout")
            .args(["5", "curl", "-s", "-r", "0-0", "-o"])
            .arg(&probe)
            .arg(format!("tftp://{HPA}/vmlinuz"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(())
    });
    assert!(up.is_some(), "in.tftpd did not answer:\n{}", fs::read_to_string(lab.path("in.tftpd.log")).unwrap_or_default());

    let out = lab.path("out.bin");
    let client = |args: Vec<String>| -> f64 {
        let _ = fs::remove_file(&out);
        let t = Instant::now();
        let o = lab.hosts[c].cmd("timeout").arg("120").args(&args).output().expect("client");
        let secs = t.elapsed().as_secs_f64();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        check(&out, &want, &args);
        SIZE as f64 / 1e6 / secs
    };
    let o = out.display().to_string();
    let curl_tftp = |ip: &str| vec!["curl".into(), "-sS".into(), "--tftp-blksize".into(), "1468".into(), "-o".into(), o.clone(), format!("tftp://{ip}/vmlinuz")];
    let atftp_ws = |ip: &str, ws: u16| vec!["atftp".into(), "--option".into(), "blksize 1468".into(), "--option".into(), format!("windowsize {ws}"), "-g".into(), "-r".into(), "vmlinuz".into(), "-l".into(), o.clone(), ip.into()];
    let http = vec!["curl".to_owned(), "-sS".into(), "-o".into(), o.clone(), format!("http://{OURS}/boot/vmlinuz")];

    // Four clients at once: aggregate MB/s.
    let parallel = |ip: &str| -> f64 {
        let t = Instant::now();
        let procs: Vec<(std::path::PathBuf, Proc)> = (0..4)
            .map(|i| {
                let p = lab.path(&format!("par-{i}.bin"));
                let _ = fs::remove_file(&p);
                let mut cmd = lab.hosts[c].cmd("timeout");
                cmd.args(["120", "curl", "-sS", "--tftp-blksize", "1468", "-o"]).arg(&p).arg(format!("tftp://{ip}/vmlinuz"));
                (p.clone(), Proc::spawn(&format!("par-{i}"), cmd, lab.path(&format!("par-{i}.log"))))
            })
            .collect();
        for (p, mut pr) in procs {
            let st = pr.wait_exit(Duration::from_secs(150));
            assert!(st.success(), "parallel curl: {}", pr.log_text());
            check(&p, &want, &["parallel"]);
        }
        4.0 * SIZE as f64 / 1e6 / t.elapsed().as_secs_f64()
    };

    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("TFTP curl blksize 1468, ours", vec![]),
        ("TFTP curl blksize 1468, in.tftpd", vec![]),
        ("TFTP 4x curl parallel, ours (aggregate)", vec![]),
        ("TFTP 4x curl parallel, in.tftpd (aggregate)", vec![]),
        ("TFTP atftp windowsize 16, ours", vec![]),
        ("TFTP atftp windowsize 16, in.tftpd (ignores it)", vec![]),
        ("HTTP curl, ours", vec![]),
        ("TFTP atftp windowsize 1, ours", vec![]),
        ("TFTP atftp windowsize 4, ours", vec![]),
        ("TFTP atftp windowsize 64, ours", vec![]),
    ];
    // The appliance's CPU time per transfer: unlike MB/s it barely depends on what else the
    // machine is doing. `ip netns exec` execs, so the Proc's PID is the appliance's.
    let pid = ours.child.id();
    let mut cpu = [0f64; 3];
    let mut timed = |i: usize, f: &dyn Fn() -> f64| -> f64 {
        let before = cpu_secs(pid).unwrap_or(0.0);
        let r = f();
        cpu[i] += cpu_secs(pid).unwrap_or(0.0) - before;
        r
    };
    // Interleaved rounds, so drift in machine load hits every row alike.
    for _ in 0..rounds {
        rows[0].1.push(timed(0, &|| client(curl_tftp(OURS))));
        rows[1].1.push(client(curl_tftp(HPA)));
        rows[2].1.push(parallel(OURS));
        rows[3].1.push(parallel(HPA));
        rows[4].1.push(timed(1, &|| client(atftp_ws(OURS, 16))));
        rows[5].1.push(client(atftp_ws(HPA, 16)));
        rows[6].1.push(timed(2, &|| client(http.clone())));
        rows[7].1.push(client(atftp_ws(OURS, 1)));
        rows[8].1.push(client(atftp_ws(OURS, 4)));
        rows[9].1.push(client(atftp_ws(OURS, 64)));
    }
    let med: Vec<f64> = rows.iter().map(|(_, v)| median(v)).collect();
    println!("\nboot_throughput: 20 MiB file, {rounds} rounds, median MB/s (min..max)");
    for ((name, v), m) in rows.iter().zip(&med) {
        let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        println!("  {name:<48} {m:>8.1}   ({lo:.1}..{hi:.1})");
    }
    println!("ratios:");
    println!("  TFTP ours / in.tftpd (curl, 1 client)          {:>6.2}", med[0] / med[1]);
    println!("  TFTP ours / in.tftpd (curl, 4 clients)         {:>6.2}", med[2] / med[3]);
    println!("  TFTP ours windowsize 16 / ours lock-step       {:>6.2}", med[4] / med[0]);
    println!("  TFTP ours windowsize 16 / in.tftpd (atftp)     {:>6.2}", med[4] / med[5]);
    println!("  HTTP ours / TFTP ours (curl)                   {:>6.2}", med[6] / med[0]);
    println!("  HTTP ours / TFTP ours windowsize 16            {:>6.2}", med[6] / med[4]);
    println!("  TFTP ours atftp windowsize 4/16/64 vs 1        {:>6.2} {:.2} {:.2}", med[8] / med[7], med[4] / med[7], med[9] / med[7]);
    println!("appliance CPU per 20 MiB transfer (user+system, all threads):");
    for (i, what) in ["TFTP lock-step (curl)", "TFTP windowsize 16 (atftp)", "HTTP (curl)"].iter().enumerate() {
        println!("  {what:<46} {:>8.0} ms", cpu[i] / rounds as f64 * 1000.0);
    }
    let log = fs::read_to_string(&ours.log).unwrap_or_default();
    println!("(appliance log: {} lines, {} transfers logged)", log.lines().count(), log.matches("sending").count());
    drop(ours);
    drop(hpa);
    let _ = fs::remove_dir_all(&lab.dir);
}

fn check(p: &Path, want: &str, what: &[impl std::fmt::Debug]) {
    let got = fs::read(p).map(|d| hex::encode(Sha256::digest(&d))).unwrap_or_default();
    assert_eq!(got, want, "{what:?}: wrong bytes");
}


fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}
