//! Peer-served boot files in network namespaces this test creates: the appliance (DHCP off,
//! `boot.peer_serve = true`, `peer_serve_max = 2`) on 10.73.0.1, a corrupt peer on 10.73.0.5
//! (python3's http.server over copies with one byte flipped, announced with its node token),
//! and 8 nodes on 10.73.0.11-18. Each node does what a booting node does: fetch kernel and
//! initrd with `curl -L` through the appliance (a real client following its redirects, as iPXE
//! does), then run `si-appliance boot-peer` (the installer's boot-file code path: fetch through
//! the appliance, check against /boot/digests, serve, announce).
//!
//! Nodes come in waves of 1, 1, 2 and 4 (each wave after the previous one serves). Asserted:
//! every copy is byte-identical to the appliance's files; the corrupt peer is caught by its
//! digest, reported, dropped, and the node falls back to the appliance; at least half of the
//! 8 × (kernel + initrd) bytes the nodes' curl fetched came from peers (the appliance's own
//! bytes are summed from its "http: sending" log lines); a peer answers Range requests; a
//! stopped peer is dropped; a dead peer (announced, connection refused) fails `curl -L`; the
//! iPXE script's second try (`&bad=1`) drops it and is sent to a live peer, its last resort
//! (`&direct=1`) gets the appliance's bytes; the installer path reports the dead peer (announced
//! again) and falls back. The curl nodes ask with `verify=1`, as a node script whose iPXE can
//! check digests does. Every client runs under `timeout(1)`, every wait is bounded.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Lab, Proc, random_file, start_appliance, strip_ansi};
use sha2::{Digest, Sha256};
use si_appliance::types::{MacAddr, NodeToken};

const SERVER: &str = "10.73.0.1";
const CORRUPT: &str = "10.73.0.5";
const CORRUPT_MAC: &str = "52:54:00:73:00:05";
const NODES: usize = 8;
const KERNEL_SIZE: u64 = 16 * 1024 * 1024 + 3;
const INITRD_SIZE: u64 = 6 * 1024 * 1024 + 1;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn sha_file(p: &Path) -> Option<String> {
    fs::read(p).ok().map(|d| sha(&d))
}

fn text(o: &Output) -> String {
    format!("status {}\nstdout: {}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn node_ip(i: usize) -> String {
    format!("10.73.0.{}", 11 + i)
}

fn node_mac(i: usize) -> String {
    format!("52:54:00:73:00:{:02x}", 0x11 + i)
}

struct Setup {
    lab: Lab,
    app: Proc,
    /// Host index of node 0.
    first: usize,
    secret: Vec<u8>,
    kernel_sha: String,
    initrd_sha: String,
}

impl Setup {
    fn token(&self, mac: &str) -> String {
        let m: MacAddr = mac.parse().expect("mac");
        NodeToken::derive(&self.secret, m).as_str().to_owned()
    }

    /// `args` on host `h` under `timeout 60`.
    fn on(&self, h: usize, args: &[&str]) -> Output {
        let mut c = self.lab.hosts[h].cmd("timeout");
        c.arg("60").args(args).current_dir(&self.lab.dir);
        c.output().unwrap_or_else(|e| panic!("spawning {args:?}: {e}"))
    }

    /// Node `i` fetches kernel and initrd with `curl -L` through the appliance, as its iPXE
    /// would; returns the files and where curl ended up.
    fn curl_boot(&self, i: usize) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for (file, want) in [("vmlinuz", &self.kernel_sha), ("initrd.img", &self.initrd_sha)] {
            let dest = self.lab.path(&format!("node{i}-curl-{file}"));
            // verify=1: this node checks what it gets (as an iPXE with digest commands does).
            let url = format!("http://{SERVER}/boot/{file}?mac={}&verify=1", node_mac(i).replace(':', "-"));
            let o = self.on(self.first + i, &["curl", "-sS", "-L", "--max-redirs", "2", "-o", &dest.display().to_string(), "-w", "%{url_effective}", &url]);
            assert!(o.status.success(), "node {i} curl {file}: {}", text(&o));
            assert_eq!(sha_file(&dest).as_deref(), Some(want.as_str()), "node {i}: curl's {file} differs from the appliance's");
            out.push((dest, String::from_utf8_lossy(&o.stdout).into_owned()));
        }
        out
    }

    /// Starts node `i`'s `si-appliance boot-peer` (its `run`-th, with a directory and log of
    /// its own) and waits for its ready line.
    fn boot_peer(&self, i: usize, run: usize) -> (Proc, String) {
        let mac = node_mac(i);
        let mut c = self.lab.hosts[self.first + i].cmd(common::node_bin());
        c.args(["boot-peer", "--server", &format!("{SERVER}:80"), "--mac", &mac, "--dir"])
            .arg(self.lab.path(&format!("node{i}-peer{run}")))
            .env("SI_NODE_TOKEN", self.token(&mac))
            .env("RUST_LOG", "info,si_appliance=debug");
        let mut p = Proc::spawn(&format!("boot-peer {i}"), c, self.lab.path(&format!("node{i}-peer{run}.log")));
        let ready = p.wait_line("boot-peer-ready", Duration::from_secs(60), |l| l.starts_with("boot-peer-ready "));
        p.wait_log("announced to the appliance", Duration::from_secs(30));
        for (file, want) in [("vmlinuz", &self.kernel_sha), ("initrd.img", &self.initrd_sha)] {
            let f = self.lab.path(&format!("node{i}-peer{run}/boot/{file}"));
            assert_eq!(sha_file(&f).as_deref(), Some(want.as_str()), "node {i}: boot-peer's {file}");
        }
        (p, ready)
    }

    fn app_log(&self) -> String {
        strip_ansi(&self.app.log_text())
    }
}

impl Drop for Setup {
    /// The lab directory holds ~250 MB of copies: removed when the test passed, kept for
    /// reading when it failed.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.lab.dir);
        }
    }
}

/// The value of `key=` on a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

/// Bytes of kernel and initrd the appliance sent itself (its "http: sending" lines).
fn appliance_bytes(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("http: sending") && matches!(field(l, "file"), Some("vmlinuz" | "initrd.img")))
        .map(|l| {
            assert_eq!(field(l, "range"), None, "a whole-file fetch was expected: {l}");
            field(l, "size").and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| panic!("no size: {l}"))
        })
        .sum()
}

#[test]
fn eight_nodes_boot_files_mostly_from_peers_and_corrupt_or_dead_peers_are_caught() {
    let t0 = Instant::now();
    let mut lab = Lab::new("bp");
    let a = lab.add_host(Some(&format!("{SERVER}/24")), Some("52:54:00:73:00:01"));
    let corrupt_host = lab.add_host(Some(&format!("{CORRUPT}/24")), Some(CORRUPT_MAC));
    let first = lab.hosts.len();
    for i in 0..NODES {
        lab.add_host(Some(&format!("{}/24", node_ip(i))), Some(&node_mac(i)));
    }
    let kernel = random_file(&lab.path("kernel.bin"), KERNEL_SIZE);
    random_file(&lab.path("initrd.bin"), INITRD_SIZE);
    let d = |p: PathBuf| p.display().to_string();
    let config = format!(
        r#"iface = "eth0"
enroll = "any"
image = "test-img"
store = "{store}"
state_dir = "{state}"
[dhcp]
mode = "off"
[http]
port = 80
[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0"
peer_serve = true
peer_serve_max = 2
peer_port = 8081
"#,
        store = d(lab.path("store")),
        state = d(lab.path("state")),
        kernel = d(lab.path("kernel.bin")),
        initrd = d(lab.path("initrd.bin")),
    );
    let app = start_appliance(&lab, a, "appliance", &config, &[]);
    let secret = fs::read(lab.path("state/secret")).expect("appliance secret");
    // The initrd as served: the configured one plus the appliance's key (app.rs writes it here).
    let served_initrd = fs::read(lab.path("state/boot/initrd.img")).expect("the served initrd");
    let s = Setup { lab, app, first, secret, kernel_sha: sha(&kernel), initrd_sha: sha(&served_initrd) };
    let size = KERNEL_SIZE + served_initrd.len() as u64;

    // The published digests are those of the files served.
    let o = s.on(first, &["curl", "-sS", &format!("http://{SERVER}/boot/digests")]);
    assert!(o.status.success(), "digests: {}", text(&o));
    let dg: si_appliance::types::node_api::BootDigests = serde_json::from_slice(&o.stdout).expect("digests JSON");
    assert_eq!((dg.kernel.sha256.as_str(), dg.kernel.size), (s.kernel_sha.as_str(), KERNEL_SIZE));
    assert_eq!((dg.initrd.sha256.as_str(), dg.initrd.size), (s.initrd_sha.as_str(), served_initrd.len() as u64));
    assert_eq!(dg.peer_port, Some(8081));

    // Wave 1: node 0 boots while nobody serves: the appliance sends it all.
    let got = s.curl_boot(0);
    assert!(got.iter().all(|(_, url)| url.starts_with(&format!("http://{SERVER}/"))), "{got:?}");

    // A corrupt peer announces itself (a node with a valid token whose copies are bad).
    let cdir = s.lab.path("corrupt");
    fs::create_dir_all(cdir.join("boot")).expect("corrupt dir");
    let mut k = kernel.clone();
    k[1000] ^= 0xff;
    fs::write(cdir.join("boot/vmlinuz"), &k).expect("corrupt kernel");
    let mut i2 = served_initrd.clone();
    i2[7] ^= 0xff;
    fs::write(cdir.join("boot/initrd.img"), &i2).expect("corrupt initrd");
    let mut py = s.lab.hosts[corrupt_host].cmd("python3");
    py.args(["-m", "http.server", "8081", "--bind", CORRUPT, "--directory"]).arg(&cdir);
    let mut corrupt = Proc::spawn("corrupt peer", py, s.lab.path("corrupt.log"));
    let up = common::wait_for(Duration::from_secs(20), || {
        let o = s.on(first, &["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{CORRUPT}:8081/boot/vmlinuz")]);
        (String::from_utf8_lossy(&o.stdout) == "200").then_some(())
    });
    assert!(up.is_some(), "the corrupt peer never served");
    let o = s.on(corrupt_host, &[
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
        &format!("Authorization: Bearer {}", s.token(CORRUPT_MAC)), "-H", "Content-Type: application/json",
        "--data", r#"{"event":"serving","port":8081}"#, &format!("http://{SERVER}/api/nodes/{CORRUPT_MAC}/boot-peer"),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "204", "corrupt peer's announce: {}", text(&o));

    // Node 0's installer path is sent to the corrupt peer (the only other one), catches the
    // digest mismatch, reports it and falls back to the appliance.
    let mut peers = Vec::new();
    let (p0, ready) = s.boot_peer(0, 1);
    assert!(ready.contains(&format!("kernel_from=appliance-after-bad-peer:{CORRUPT}")), "{ready}\n{}", p0.log_text());
    assert!(p0.log_text().contains("digest mismatch"), "{}", p0.log_text());
    let log = s.app_log();
    assert!(log.lines().any(|l| l.contains("boot-peer: peer dropped") && l.contains(CORRUPT)), "{log}");
    assert!(log.contains("http: direct: the appliance serves"), "{log}");
    peers.push(p0);

    // Waves 2, 3, 4: 1, 2 and 4 nodes at once; each fetches from the nodes before it.
    for wave in [1..2, 2..4, 4..8] {
        let wave_nodes: Vec<usize> = wave.collect();
        let curls: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = wave_nodes.iter().map(|&i| { let s = &s; sc.spawn(move || s.curl_boot(i)) }).collect();
            hs.into_iter().map(|h| h.join().expect("curl thread")).collect()
        });
        for (i, got) in wave_nodes.iter().zip(&curls) {
            for (_, url) in got {
                assert!(url.contains(":8081/boot/") && !url.contains(CORRUPT), "node {i}: curl ended at {url}");
            }
        }
        for &i in &wave_nodes {
            let (p, ready) = s.boot_peer(i, 1);
            assert!(ready.contains("kernel_from=peer:") && ready.contains("initrd_from=peer:"), "node {i}: {ready}");
            peers.push(p);
        }
    }

    // A peer answers a Range request with exactly those bytes.
    let part = s.lab.path("range.bin");
    let o = s.on(first + 7, &["curl", "-sS", "-r", "1000-1999", "-o", &part.display().to_string(), "-w", "%{http_code}", &format!("http://{}:8081/boot/vmlinuz", node_ip(0))]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "206", "{}", text(&o));
    assert_eq!(fs::read(&part).expect("range"), &kernel[1000..2000]);

    // Bytes: node 0 got kernel + initrd twice from the appliance (curl, then its fallback
    // after the corrupt peer); everything else came from peers.
    let log = s.app_log();
    let served = appliance_bytes(&log);
    let redirects = log.lines().filter(|l| l.contains("http: redirected to a boot peer")).count();
    let curl_total = NODES as u64 * size;
    let all_total = 2 * NODES as u64 * size;
    println!(
        "figures: kernel+initrd {size} B; {NODES} nodes x (curl -L + boot-peer) = {all_total} B received; \
         appliance sent {served} B ({:.1}% of all, {:.1}% of the {curl_total} B the curl fetches took); {redirects} redirects; {:.1} s",
        100.0 * served as f64 / all_total as f64,
        100.0 * served as f64 / curl_total as f64,
        t0.elapsed().as_secs_f64()
    );
    assert!(served * 2 <= curl_total, "at least half of 8 x size must come from peers: appliance sent {served} of {curl_total}");
    assert_eq!(served, 2 * size, "only node 0's two fetches should reach the appliance");

    // A peer that stops (SIGTERM: its installer is about to reboot) is dropped at once.
    let mut last = peers.pop().expect("a peer");
    last.terminate();
    let gone = common::wait_for(Duration::from_secs(10), || s.app_log().contains("boot-peer: stopped serving").then_some(()));
    assert!(gone.is_some(), "{}", s.app_log());

    // A dead peer: 10.73.0.5 announces again but serves nothing (connection refused). Node 7
    // boots again: the appliance sends it there (lowest address, no load); curl fails to
    // connect, as iPXE would, and the script's fallback `&direct=1` gets the appliance's bytes;
    // then its installer path is sent there again, reports the dead peer and falls back.
    corrupt.kill();
    let o = s.on(corrupt_host, &[
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
        &format!("Authorization: Bearer {}", s.token(CORRUPT_MAC)), "-H", "Content-Type: application/json",
        "--data", r#"{"event":"serving","port":8081}"#, &format!("http://{SERVER}/api/nodes/{CORRUPT_MAC}/boot-peer"),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "204", "dead peer's announce: {}", text(&o));
    let q = format!("?mac={}&verify=1", node_mac(7).replace(':', "-"));
    let dest = s.lab.path("node7-again-vmlinuz");
    let o = s.on(first + 7, &["curl", "-sS", "-L", "-o", &dest.display().to_string(), &format!("http://{SERVER}/boot/vmlinuz{q}")]);
    assert_eq!(o.status.code(), Some(7), "curl must fail to connect to the dead peer: {}", text(&o));
    // The node script's second try: the same request with bad=1 drops the peer it was sent to
    // and is sent to a live peer.
    let o = s.on(first + 7, &["curl", "-sS", "-L", "-o", &dest.display().to_string(), "-w", "%{url_effective}", &format!("http://{SERVER}/boot/vmlinuz{q}&bad=1")]);
    assert!(o.status.success(), "{}", text(&o));
    let url = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(url.contains(":8081/boot/vmlinuz") && !url.contains(CORRUPT), "after bad=1 a live peer serves: {url}");
    assert_eq!(sha_file(&dest).as_deref(), Some(s.kernel_sha.as_str()));
    // Its last resort: the appliance's own copy.
    let o = s.on(first + 7, &["curl", "-sS", "-L", "-o", &dest.display().to_string(), "-w", "%{url_effective}", &format!("http://{SERVER}/boot/vmlinuz{q}&direct=1&bad=1")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("{SERVER}/boot/vmlinuz")), "{}", text(&o));
    assert_eq!(sha_file(&dest).as_deref(), Some(s.kernel_sha.as_str()));
    // The dead peer announces again; the installer path is sent there, reports it, falls back.
    let o = s.on(corrupt_host, &[
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
        &format!("Authorization: Bearer {}", s.token(CORRUPT_MAC)), "-H", "Content-Type: application/json",
        "--data", r#"{"event":"serving","port":8081}"#, &format!("http://{SERVER}/api/nodes/{CORRUPT_MAC}/boot-peer"),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "204", "dead peer's announce: {}", text(&o));
    let (_p7, ready) = s.boot_peer(7, 2);
    assert!(ready.contains(&format!("kernel_from=appliance-after-bad-peer:{CORRUPT}")), "{ready}");
    let log = s.app_log();
    let dropped = log.lines().filter(|l| l.contains("boot-peer: peer dropped") && l.contains(CORRUPT)).count();
    assert_eq!(dropped, 3, "the corrupt peer, then the dead one (by bad=1, then by the installer):\n{log}");
}
