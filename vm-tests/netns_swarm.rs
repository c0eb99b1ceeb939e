//! The swarm with real clients, in network namespaces this test creates: the appliance's
//! tracker + librqbit seed serving an archive to `si-appliance fetch` clients and to aria2c,
//! `fetch` downloading from an aria2c seed, tracker abuse over HTTP with curl, and an appliance
//! restart mid-swarm. Figures (completion times, seed upload, CPU) are printed, never asserted
//! against a clock: they go in reports and, later, the benchmark.
mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Lab, Proc, RemoveOnSuccess, appliance_bin, cpu_secs, node_bin, random_file, start_appliance, strip_ansi};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const HTTP_PORT: u16 = 8080;
const SEED_PORT: u16 = 6881;

fn sha256(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// The appliance's config: no DHCP, no TFTP, HTTP on 8080, one archive, LAN-quick tracker.
fn config(lab: &Lab, tag: &str, archive: &Path, extra_swarm: &str) -> String {
    let state = lab.path(&format!("{tag}-state"));
    let store = lab.path(&format!("{tag}-store"));
    format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{}\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n\
         [http]\nport = {HTTP_PORT}\n[swarm]\narchives = [\"{}\"]\nlisten_port = {SEED_PORT}\n\
         announce_interval = \"3s\"\npeer_timeout = \"30s\"\n{extra_swarm}\n",
        store.display(),
        state.display(),
        archive.display()
    )
}

/// A command run in host `h`'s namespace, with its output (not asserted).
fn exec(lab: &Lab, h: usize, prog: &str, args: &[&str]) -> Output {
    lab.hosts[h].cmd(prog).args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"))
}

/// GET over curl from host `h` (bounded), body as bytes.
fn curl(lab: &Lab, h: usize, url: &str, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["-sS", "--max-time", "10"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = exec(lab, h, "curl", &args);
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn swarm_json(lab: &Lab, h: usize, server: &str) -> serde_json::Value {
    let body = curl(lab, h, &format!("http://{server}:{HTTP_PORT}/api/swarm"), &[]);
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("/api/swarm: {e}: {}", String::from_utf8_lossy(&body)))
}

/// Starts `si-appliance fetch` in host `h`.
fn fetch(lab: &Lab, h: usize, server: &str, image: &str, out: &Path, extra: &[&str]) -> Proc {
    let mut cmd = lab.hosts[h].cmd(node_bin());
    let srv = format!("{server}:{HTTP_PORT}");
    cmd.args(["fetch", "--server", &srv, "--image", image, "--iface", "eth0", "--out"])
        .arg(out)
        .args(extra)
        .env("RUST_LOG", "info");
    Proc::spawn(&format!("fetch{h}"), cmd, lab.path(&format!("fetch{h}.log")))
}

/// The `fetch-done …` summary line's `key=value` fields.
fn summary(p: &Proc) -> Vec<(String, String)> {
    let log = p.log_text();
    let line = log.lines().find(|l| l.starts_with("fetch-done ")).unwrap_or_else(|| panic!("no summary:\n{log}"));
    line.split_whitespace().skip(1).filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

fn field(s: &[(String, String)], k: &str) -> String {
    s.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap_or_default()
}

/// Peak RSS (VmHWM) of a running process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn mkdir(p: &Path) -> PathBuf {
    fs::create_dir_all(p).expect("mkdir");
    p.to_owned()
}

/// Acceptance 1: eight clients started together download one archive through the tracker and
/// the seed; every copy matches; the seed uploaded less than three copies.
#[test]
fn eight_clients_download_one_archive_through_the_swarm() {
    const N: usize = 8;
    let size = 32 * MIB;
    let mut lab = Lab::new("sw8");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.1.1/24"), None);
    for i in 0..N {
        lab.add_host(Some(&format!("10.69.1.{}/24", 11 + i)), None);
    }
    let archive = lab.path("img8.tar.zst");
    random_file(&archive, size);
    let want = sha256(&archive);
    let appliance = start_appliance(&lab, app, "appliance", &config(&lab, "a", &archive, "upload_limit = 4194304"), &[]);
    let cpu_app0 = cpu_secs(appliance.child.id()).unwrap_or(f64::NAN);

    let mut clients: Vec<(Proc, PathBuf)> = (1..=N)
        .map(|h| {
            let out = mkdir(&lab.path(&format!("c{h}"))).join("img8.tar.zst");
            (fetch(&lab, h, "10.69.1.1", "img8", &out, &["--seed-until-done", "--seed-for", "60s"]), out)
        })
        .collect();
    for (p, out) in clients.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(150));
        assert!(st.success(), "fetch failed ({st}):\n{}", p.log_text());
        assert_eq!(sha256(out), want, "{} differs", out.display());
    }
    let cpu_app = cpu_secs(appliance.child.id()).unwrap_or(f64::NAN) - cpu_app0;
    let rss_app = peak_rss_kib(appliance.child.id());
    let v = swarm_json(&lab, 1, "10.69.1.1");
    let t = &v[0];
    assert_eq!(t["name"], "img8");
    let up = t["seed_uploaded_bytes"].as_u64().expect("seed_uploaded_bytes");
    assert!(up < 3 * size, "the seed uploaded {up} bytes = {:.2} copies", up as f64 / size as f64);
    // Every node reported completion (they have left since: a node announces `stopped`).
    assert_eq!(t["completed_nodes"].as_u64(), Some(N as u64), "{v:#}");

    let mut times: Vec<String> = Vec::new();
    for (p, _) in &clients {
        let s = summary(p);
        times.push(format!("{}s(up {} MiB, {})", field(&s, "download_secs"), field(&s, "uploaded").parse::<u64>().unwrap_or(0) / MIB, field(&s, "stopped")));
    }
    let c1 = summary(&clients[0].0);
    eprintln!(
        "FIGURES n={N} size={} MiB: completion per client: {}\n  seed upload {:.2} copies; appliance CPU {cpu_app:.2}s, peak RSS {rss_app} KiB; client 1 CPU {}s, peak RSS {} KiB",
        size / MIB,
        times.join(", "),
        up as f64 / size as f64,
        field(&c1, "cpu_secs"),
        field(&c1, "peak_rss_kib")
    );
}

/// Percent-encodes raw bytes for a tracker query.
fn pct(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// Acceptance 3: malformed or foreign announces get a bencoded `failure reason`, and the
/// tracker keeps serving; torrent names are keys, never paths.
#[test]
fn tracker_refuses_abuse_and_keeps_serving() {
    let mut lab = Lab::new("swt");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.3.1/24"), None);
    let cl = lab.add_host(Some("10.69.3.20/24"), None);
    // A second address outside the appliance's subnets, and a route back to it.
    lab.hosts[cl].ip(&["addr", "add", "10.69.4.20/24", "dev", "eth0"]);
    lab.hosts[app].ip(&["route", "add", "10.69.4.0/24", "dev", "eth0"]);
    let archive = lab.path("small.tar.zst");
    random_file(&archive, 3 * MIB);
    // This one names its archive with --seed instead of the config file.
    let cfg = config(&lab, "t", &archive, "").replace(&format!("archives = [\"{}\"]", archive.display()), "archives = []");
    assert!(cfg.contains("archives = []"));
    let seed_flag = archive.display().to_string();
    let _appliance = start_appliance(&lab, app, "appliance", &cfg, &["--seed", &seed_flag]);

    let v = swarm_json(&lab, cl, "10.69.3.1");
    let ih = hex::decode(v[0]["info_hash"].as_str().expect("info_hash")).expect("hex");
    let ih = pct(&ih);
    let pid = pct(b"-XX0001-abcdefghijkl");
    let base = "http://10.69.3.1:8080/announce";
    let ann = |q: &str, extra: &[&str]| String::from_utf8_lossy(&curl(&lab, cl, &format!("{base}?{q}"), extra)).into_owned();

    let cases: Vec<(String, &str)> = vec![
        (format!("peer_id={pid}&port=6881&left=0"), "missing info_hash"),
        (format!("info_hash=%01%02%03&peer_id={pid}&port=6881&left=0"), "bad info_hash"),
        (format!("info_hash={ih}&peer_id={pid}&port=0&left=0"), "bad port"),
        (format!("info_hash={ih}&peer_id={pid}&port=70000&left=0"), "bad port"),
        (format!("info_hash={ih}&peer_id={pid}&port=http&left=0"), "bad port"),
        (format!("info_hash={ih}&peer_id={pid}&port=6881"), "missing left"),
        (format!("info_hash={}&peer_id={pid}&port=6881&left=0", pct(&[0xAB; 20])), "unknown info_hash"),
    ];
    for (q, why) in &cases {
        let r = ann(q, &[]);
        assert!(r.starts_with("d14:failure reason") && r.contains(why), "{q} -> {r}");
    }
    // From an address outside the subnets.
    let q = format!("info_hash={ih}&peer_id={pid}&port=6881&left=100");
    let r = ann(&q, &["--interface", "10.69.4.20"]);
    assert!(r.contains("failure reason") && r.contains("outside the provisioning subnets"), "{r}");
    // A huge numwant is capped, not refused: a normal answer listing the seed.
    let r = curl(&lab, cl, &format!("{base}?{q}&numwant=99999999999999999999"), &[]);
    let text = String::from_utf8_lossy(&r);
    assert!(!text.contains("failure reason") && text.contains("8:interval"), "{text}");
    let seed = [10u8, 69, 3, 1, (SEED_PORT >> 8) as u8, SEED_PORT as u8];
    assert!(r.windows(6).any(|w| w == seed), "the seed is not in the peer list: {text}");
    // Garbage after all that: the tracker still serves, scrape too.
    let r = ann(&format!("info_hash={ih}&peer_id={pid}&port=6881&left=0&event=started"), &[]);
    assert!(r.contains("8:interval"), "{r}");
    let r = String::from_utf8_lossy(&curl(&lab, cl, &format!("http://10.69.3.1:8080/scrape?info_hash={ih}"), &[])).into_owned();
    assert!(r.starts_with("d5:filesd20:") && r.contains("8:completei"), "{r}");
    // Names are keys: no path ever reaches the filesystem.
    for bad in ["/torrents/..%2Fsecret.torrent", "/torrents/nope.torrent", "/torrents/small", "/api/swarm/..%2F.."] {
        let out = exec(&lab, cl, "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", &format!("http://10.69.3.1:8080{bad}")]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "{bad}");
    }
    let t = curl(&lab, cl, "http://10.69.3.1:8080/torrents/small.torrent", &[]);
    assert!(t.starts_with(b"d") && t.windows(9).any(|w| w == b"announce-"), "not a torrent");
}

fn aria2c_args(dir: &Path, torrent: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--bt-tracker-connect-timeout=10",
        "--bt-tracker-timeout=10",
        "--summary-interval=0",
        "--console-log-level=notice",
        "--file-allocation=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push(format!("--dir={}", dir.display()));
    v.push(torrent.display().to_string());
    v
}

/// Acceptance 2: aria2c downloads from the appliance through its tracker, and `fetch`
/// downloads from an aria2c seed (given to it with --peer, tracker off, so the appliance's
/// seed cannot be the source).
#[test]
fn interop_with_aria2c_both_ways() {
    let mut lab = Lab::new("swa");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.2.1/24"), None);
    let leech = lab.add_host(Some("10.69.2.11/24"), None);
    let seeder = lab.add_host(Some("10.69.2.12/24"), None);
    let fetcher = lab.add_host(Some("10.69.2.13/24"), None);
    let archive = lab.path("inter.tar.zst");
    random_file(&archive, 16 * MIB);
    let want = sha256(&archive);
    let _appliance = start_appliance(&lab, app, "appliance", &config(&lab, "i", &archive, ""), &[]);
    let torrent = lab.path("inter.torrent");
    fs::write(&torrent, curl(&lab, leech, "http://10.69.2.1:8080/torrents/inter.torrent", &[])).expect("torrent");

    // aria2c <- appliance (tracker + seed).
    let dir = mkdir(&lab.path("aria-leech"));
    let mut a = lab.hosts[leech].cmd("aria2c");
    a.args(aria2c_args(&dir, &torrent, &["--seed-time=0", "--listen-port=6881"]));
    let mut a = Proc::spawn("aria2c-leech", a, lab.path("aria2c-leech.log"));
    let st = a.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "aria2c failed ({st}):\n{}", a.log_text());
    assert_eq!(sha256(&dir.join("inter.tar.zst")), want);

    // fetch <- aria2c seed (a verified copy of the archive, seeding until killed).
    let sdir = mkdir(&lab.path("aria-seed"));
    fs::copy(&archive, sdir.join("inter.tar.zst")).expect("copy");
    let mut s = lab.hosts[seeder].cmd("aria2c");
    s.args(aria2c_args(&sdir, &torrent, &["--check-integrity=true", "--seed-ratio=0.0", "--listen-port=6882"]));
    let mut s = Proc::spawn("aria2c-seed", s, lab.path("aria2c-seed.log"));
    // aria2c listens once it has checked the file: wait for the port.
    let up = common::wait_for(Duration::from_secs(60), || {
        let o = exec(&lab, seeder, "ss", &["-Hltn", "sport = :6882"]);
        String::from_utf8_lossy(&o.stdout).contains("6882").then_some(())
    });
    assert!(up.is_some(), "aria2c seed never listened:\n{}", s.log_text());
    let out = mkdir(&lab.path("f")).join("inter.tar.zst");
    let mut f = fetch(&lab, fetcher, "10.69.2.1", "inter", &out, &["--no-tracker", "--peer", "10.69.2.12:6882"]);
    let st = f.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "fetch failed ({st}):\n{}", f.log_text());
    assert_eq!(sha256(&out), want);
    s.kill();
}

/// The `elapsed_ms` of the last log line containing `needle` (figures for the report).
fn elapsed_ms(p: &Proc, needle: &str) -> String {
    let log = p.log_text();
    let line = log.lines().rev().find(|l| l.contains(needle)).unwrap_or("");
    let plain: String = strip_ansi(line);
    plain.split_whitespace().find_map(|w| w.strip_prefix("elapsed_ms=")).unwrap_or("?").to_owned()
}


/// The seed's upload so far, as `/api/swarm` reports it.
fn seed_uploaded(lab: &Lab, h: usize, server: &str) -> Option<u64> {
    let out = exec(lab, h, "curl", &["-sS", "--max-time", "5", &format!("http://{server}:{HTTP_PORT}/api/swarm")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["seed_uploaded_bytes"].as_u64()
}

/// Acceptance 4: the appliance killed (SIGKILL) and restarted mid-swarm, and a client killed
/// and restarted mid-download: everyone completes with the right bytes. The restart uses the
/// persisted bitfield (fastresume) instead of re-hashing; the figures of first start, restart
/// with fastresume and restart without are printed.
#[test]
fn appliance_and_client_restart_mid_swarm() {
    let size = 64 * MIB;
    let mut lab = Lab::new("swr");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.5.1/24"), None);
    lab.add_host(Some("10.69.5.11/24"), None);
    lab.add_host(Some("10.69.5.12/24"), None);
    let archive = lab.path("big.tar.zst");
    random_file(&archive, size);
    let want = sha256(&archive);
    // The seed at 4 MiB/s: the download lasts long enough to interrupt it.
    let cfg = config(&lab, "r", &archive, "upload_limit = 4194304");
    let mut appliance = start_appliance(&lab, app, "appliance", &cfg, &[]);
    let first = (elapsed_ms(&appliance, "torrent created"), elapsed_ms(&appliance, "seed ready"));

    let outs: Vec<PathBuf> = (1..=2).map(|h| mkdir(&lab.path(&format!("r{h}"))).join("big.tar.zst")).collect();
    let args = ["--seed-until-done", "--seed-for", "60s"];
    let mut c1 = fetch(&lab, 1, "10.69.5.1", "big", &outs[0], &args);
    let mut c2 = fetch(&lab, 2, "10.69.5.1", "big", &outs[1], &args);
    let moving = common::wait_for(Duration::from_secs(60), || seed_uploaded(&lab, 1, "10.69.5.1").filter(|b| *b >= 8 * MIB));
    assert!(moving.is_some(), "the swarm never started:\n{}", c1.log_text());
    // Kill both the appliance and client 2 mid-download, then bring them back.
    appliance.kill();
    c2.kill();
    assert!(!c1.log_text().contains("fetch-done"), "client 1 finished before the restart: make the seed slower");
    let appliance = start_appliance(&lab, app, "appliance2", &cfg, &[]);
    let restart = elapsed_ms(&appliance, "seed ready");
    let log2 = strip_ansi(&appliance.log_text());
    assert!(log2.contains("restored=1"), "{log2}");
    assert!(log2.contains("torrent loaded from cache"), "{log2}");
    let mut c2 = fetch(&lab, 2, "10.69.5.1", "big", &outs[1], &args);
    for (p, out) in [(&mut c1, &outs[0]), (&mut c2, &outs[1])] {
        let st = p.wait_exit(Duration::from_secs(150));
        assert!(st.success(), "fetch failed ({st}):\n{}", p.log_text());
        assert_eq!(sha256(out), want, "{} differs", out.display());
    }
    // Restart without fastresume: the archive is hashed again (figure only).
    drop(appliance);
    let cfg_nofr = config(&lab, "r", &archive, "upload_limit = 4194304\nfastresume = false");
    let appliance = start_appliance(&lab, app, "appliance3", &cfg_nofr, &[]);
    let nofr = elapsed_ms(&appliance, "seed ready");
    eprintln!(
        "FIGURES restart size={} MiB: first start: torrent created in {} ms, seed ready in {} ms; \
         restart with fastresume: seed ready in {restart} ms; without fastresume: {nofr} ms",
        size / MIB,
        first.0,
        first.1
    );
}

/// Acceptance 4 (first part): a peer that sends corrupt pieces (aria2c seeding a damaged copy
/// without checking it) is caught by the piece hashes and dropped; the download completes from
/// the appliance with the right bytes. librqbit disconnects such a peer but may retry it later
/// with backoff: it has no ban list to add it to.
#[test]
fn a_peer_sending_corrupt_pieces_is_caught_by_hash() {
    let mut lab = Lab::new("swc");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.6.1/24"), None);
    let bad = lab.add_host(Some("10.69.6.12/24"), None);
    let fetcher = lab.add_host(Some("10.69.6.13/24"), None);
    let archive = lab.path("pure.tar.zst");
    random_file(&archive, 16 * MIB);
    let want = sha256(&archive);
    let cfg = config(&lab, "c", &archive, "upload_limit = 4194304");
    let _appliance = start_appliance(&lab, app, "appliance", &cfg, &[]);
    let torrent = lab.path("pure.torrent");
    fs::write(&torrent, curl(&lab, bad, "http://10.69.6.1:8080/torrents/pure.torrent", &[])).expect("torrent");

    // A damaged copy: every byte inverted, so every piece it sends fails its hash.
    let sdir = mkdir(&lab.path("bad-seed"));
    let damaged: Vec<u8> = fs::read(&archive).expect("read").iter().map(|b| !b).collect();
    fs::write(sdir.join("pure.tar.zst"), damaged).expect("write");
    let mut s = lab.hosts[bad].cmd("aria2c");
    s.args(aria2c_args(&sdir, &torrent, &["--bt-seed-unverified=true", "--seed-ratio=0.0", "--listen-port=6882"]));
    let mut s = Proc::spawn("aria2c-bad", s, lab.path("aria2c-bad.log"));
    let up = common::wait_for(Duration::from_secs(60), || {
        let o = exec(&lab, bad, "ss", &["-Hltn", "sport = :6882"]);
        String::from_utf8_lossy(&o.stdout).contains("6882").then_some(())
    });
    assert!(up.is_some(), "aria2c never listened:\n{}", s.log_text());

    let out = mkdir(&lab.path("f")).join("pure.tar.zst");
    let seed = format!("10.69.6.1:{SEED_PORT}");
    let mut f = fetch(&lab, fetcher, "10.69.6.1", "pure", &out, &["--no-tracker", "--peer", "10.69.6.12:6882", "--peer", &seed]);
    let st = f.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "fetch failed ({st}):\n{}", f.log_text());
    assert_eq!(sha256(&out), want);
    let log = strip_ansi(&f.log_text());
    let caught = log.lines().filter(|l| l.contains("did not validate")).count();
    assert!(caught > 0, "no corrupt piece was detected (did aria2c send any?):\n{log}");
    eprintln!("FIGURES corrupt peer: {caught} pieces failed their hash and were fetched again");
    s.kill();
}

/// The default image's tree is packed when the appliance starts (and not repacked when it is
/// unchanged), published under its name, fetched through the swarm, and unpacks to the same tree.
#[test]
fn appliance_packs_its_image_at_start_and_a_node_fetches_it() {
    let mut lab = Lab::new("swi");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.7.1/24"), None);
    let cl = lab.add_host(Some("10.69.7.20/24"), None);
    let store = lab.path("i-store");
    let tree = mkdir(&store.join("images/demo"));
    mkdir(&tree.join("etc"));
    fs::write(tree.join("etc/hostname"), b"demo\n").unwrap();
    random_file(&tree.join("payload.bin"), 2 * MIB);
    std::os::unix::fs::symlink("etc/hostname", tree.join("link")).unwrap();
    let cfg = config(&lab, "i", Path::new("/unused"), "")
        .replace("archives = [\"/unused\"]", "archives = []")
        .replace("iface = \"eth0\"", "iface = \"eth0\"\nimage = \"demo\"");
    let archive = store.join("archives/demo.tar.zst");
    {
        let appliance = start_appliance(&lab, app, "appliance", &cfg, &[]);
        assert!(appliance.log_text().contains("image packed"), "{}", appliance.log_text());
        assert!(archive.is_file());
        let v = swarm_json(&lab, cl, "10.69.7.1");
        assert_eq!(v[0]["name"], "demo", "{v}");
        let out = lab.path("got.tar.zst");
        let mut f = fetch(&lab, cl, "10.69.7.1", "demo", &out, &["--seed-for", "1s"]);
        let st = f.wait_exit(Duration::from_secs(120));
        assert!(st.success(), "{}", f.log_text());
        assert_eq!(sha256(&out), sha256(&archive));
        let to = mkdir(&lab.path("unpacked"));
        let st = Command::new(appliance_bin()).arg("image").arg("unpack").arg(&out).arg("--to").arg(&to).status().unwrap();
        assert!(st.success());
        let diff = Command::new("diff").args(["-r", "--no-dereference"]).arg(&tree).arg(&to).output().unwrap();
        assert!(diff.status.success(), "{}", String::from_utf8_lossy(&diff.stdout));
    }
    // A restart with the tree unchanged keeps the archive (same inode), no repack.
    let ino = fs::metadata(&archive).unwrap().ino();
    let appliance = start_appliance(&lab, app, "appliance2", &cfg, &[]);
    assert!(!appliance.log_text().contains("image packed"), "{}", appliance.log_text());
    assert_eq!(fs::metadata(&archive).unwrap().ino(), ino);
}

/// Acceptance 2 (transmission-cli): transmission downloads an archive from the appliance through
/// its tracker; completion is transmission's own signal (its --finish script), then the copy is
/// compared. transmission-cli keeps seeding until killed.
#[test]
fn interop_transmission_downloads_through_the_tracker() {
    let mut lab = Lab::new("swx");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.8.1/24"), None);
    let cl = lab.add_host(Some("10.69.8.11/24"), None);
    let archive = lab.path("tr.tar.zst");
    random_file(&archive, 16 * MIB);
    let want = sha256(&archive);
    let _appliance = start_appliance(&lab, app, "appliance", &config(&lab, "x", &archive, ""), &[]);
    let torrent = lab.path("tr.torrent");
    fs::write(&torrent, curl(&lab, cl, "http://10.69.8.1:8080/torrents/tr.torrent", &[])).expect("torrent");
    let dir = mkdir(&lab.path("tr-dl"));
    let marker = lab.path("tr-finished");
    let script = lab.path("tr-finish.sh");
    fs::write(&script, format!("#!/bin/sh\n: > '{}'\n", marker.display())).expect("script");
    common::run(Command::new("chmod").arg("+x").arg(&script));
    // No DHT (it would look up outside bootstrap names), no local discovery, no PEX, no uTP.
    let cfg = mkdir(&lab.path("tr-config"));
    fs::write(
        cfg.join("settings.json"),
        r#"{"dht-enabled": false, "lpd-enabled": false, "pex-enabled": false, "utp-enabled": false, "encryption": 0, "port-forwarding-enabled": false}"#,
    )
    .expect("settings");
    let mut t = lab.hosts[cl].cmd("transmission-cli");
    t.args(["-g"]).arg(&cfg).args(["-w"]).arg(&dir);
    t.args(["-p", "51413", "-M", "-et", "-f"]).arg(&script).arg(&torrent);
    let mut t = Proc::spawn("transmission", t, lab.path("transmission.log"));
    let done = common::wait_for(Duration::from_secs(120), || marker.exists().then_some(()));
    let log = t.log_text();
    t.kill();
    assert!(done.is_some(), "transmission-cli never finished:\n{}", &log[log.len().saturating_sub(3000)..]);
    assert_eq!(sha256(&dir.join("tr.tar.zst")), want);
}

// ---- a rogue BitTorrent peer, written here (the attacker) ------------------------------------

/// What the rogue did, per alias address: garbage blocks accepted by the node's requests.
#[derive(Default)]
struct RogueLog {
    garbage_blocks: std::collections::BTreeMap<std::net::Ipv4Addr, u32>,
    connections: u32,
}

/// One rogue connection (blocking, bounded by `stop` and read timeouts): handshake (echoing the
/// node's info-hash), a bitfield claiming every piece, unchoke; then, in cycles, garbage blocks
/// in answer to requests until half a piece's worth went out, choke, a short pause, unchoke.
fn rogue_conn(
    mut s: std::net::TcpStream,
    me: std::net::Ipv4Addr,
    pieces: usize,
    piece_len: u32,
    log: &std::sync::Mutex<RogueLog>,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut hs = [0u8; 68];
    s.read_exact(&mut hs)?;
    let mut ours = hs;
    ours[48..56].copy_from_slice(b"-RG0001-");
    ours[56..60].copy_from_slice(&me.octets());
    s.write_all(&ours)?;
    let frame = |id: u8, body: &[u8]| {
        let mut f = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(id);
        f.extend_from_slice(body);
        f
    };
    let mut bits = vec![0u8; pieces.div_ceil(8)];
    for i in 0..pieces {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    s.write_all(&frame(5, &bits))?;
    s.write_all(&frame(1, &[]))?;
    let (mut choked, mut sent, mut cycles) = (false, 0u32, 0u32);
    let mut choked_at = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) && cycles < 200 {
        if choked && choked_at.elapsed() > Duration::from_millis(300) {
            s.write_all(&frame(1, &[]))?;
            (choked, sent) = (false, 0);
        }
        let mut len = [0u8; 4];
        match s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > 1 << 20 {
            return Ok(());
        }
        let mut body = vec![0u8; n];
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.read_exact(&mut body)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        // REQUEST: garbage of the asked length, until half a piece went out in this cycle.
        if n == 13 && body[0] == 6 && !choked {
            let blen = u32::from_be_bytes(body[9..13].try_into().expect("4 bytes"));
            let mut pb = body[1..9].to_vec();
            pb.extend(std::iter::repeat_n(0x5a, blen as usize));
            s.write_all(&frame(7, &pb))?;
            *log.lock().expect("rogue log").garbage_blocks.entry(me).or_default() += 1;
            sent += blen;
            if sent >= piece_len / 2 {
                s.write_all(&frame(0, &[]))?;
                (choked, choked_at) = (true, std::time::Instant::now());
                cycles += 1;
            }
        }
    }
    Ok(())
}

/// Issue 13 item 5: a rogue peer on four alias addresses of one host claims every piece,
/// answers with garbage for half a piece, then chokes (so the honest seed finishes the piece),
/// and repeats. The node still completes from the appliance's seed with the right SHA-256;
/// every rogue address that got garbage into a piece is banned; the seed is never banned.
#[test]
fn a_rogue_peer_on_alias_addresses_is_banned_and_the_seed_never_is() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut lab = Lab::new("swr");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.69.8.1/24"), None);
    let rogue = lab.add_host(Some("10.69.8.12/24"), None);
    let node = lab.add_host(Some("10.69.8.20/24"), None);
    let aliases: Vec<std::net::Ipv4Addr> = (12..16).map(|i| std::net::Ipv4Addr::new(10, 69, 8, i)).collect();
    for a in &aliases[1..] {
        lab.hosts[rogue].ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"]);
    }
    let archive = lab.path("rg.tar.zst");
    random_file(&archive, 16 * MIB);
    let want = sha256(&archive);
    // A slow seed (4 MiB/s), so the rogue takes part for seconds.
    let cfg = config(&lab, "r", &archive, "upload_limit = 4194304");
    let _appliance = start_appliance(&lab, app, "appliance", &cfg, &[]);
    let torrent = curl(&lab, rogue, "http://10.69.8.1:8080/torrents/rg.torrent", &[]);
    let ti = si_appliance::image::torrent::parse(&torrent).expect("torrent");
    let (pieces, piece_len) = (ti.hashes.len(), ti.piece_len);

    // The rogue: a listener per alias address, inside the rogue host's namespace.
    let log = Arc::new(Mutex::new(RogueLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let ns = lab.hosts[rogue].name.clone();
    let mut listeners = Vec::new();
    for a in aliases.clone() {
        let (log, stop, ns) = (log.clone(), stop.clone(), ns.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        listeners.push(std::thread::spawn(move || {
            let path = format!("/var/run/netns/{ns}");
            let fd = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this thread (and the
            // sockets it creates stay in that namespace).
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind((a, 6882)).expect("rogue bind");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        log.lock().expect("rogue log").connections += 1;
                        let (log, stop) = (log.clone(), stop.clone());
                        conns.push(std::thread::spawn(move || {
                            let _ = rogue_conn(s, a, pieces, piece_len, &log, &stop);
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        }));
        rx.recv_timeout(Duration::from_secs(10)).expect("rogue listening");
    }

    let out = mkdir(&lab.path("n")).join("rg.tar.zst");
    let mut extra = vec!["--timeout".to_string(), "90s".to_string()];
    for a in &aliases {
        extra.extend(["--peer".to_string(), format!("{a}:6882")]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut f = fetch(&lab, node, "10.69.8.1", "rg", &out, &extra);
    let st = f.wait_exit(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    for l in listeners {
        let _ = l.join();
    }
    let text = strip_ansi(&f.log_text());
    let banned: Vec<&str> = text.lines().filter(|l| l.contains("peer banned")).collect();
    let banned_ip = |ip: &str| banned.iter().any(|l| l.split_whitespace().any(|w| w == format!("ip={ip}")));
    assert!(!banned_ip("10.69.8.1"), "the appliance's seed was banned:\n{text}");
    assert!(st.success(), "fetch failed ({st}):\n{text}");
    assert_eq!(sha256(&out), want);
    let log = log.lock().expect("rogue log");
    let liars: Vec<String> = log.garbage_blocks.keys().map(|a| a.to_string()).collect();
    assert!(!liars.is_empty(), "the rogue never got a request (connections {}):\n{text}", log.connections);
    for a in &liars {
        assert!(banned_ip(a), "rogue {a} sent garbage and was not banned:\n{text}");
    }
    eprintln!(
        "FIGURES rogue peer: {} connections, garbage blocks per address {:?}; {} pieces failed their hash; banned: {}",
        log.connections,
        log.garbage_blocks,
        text.lines().filter(|l| l.contains("did not validate")).count(),
        banned.len()
    );
    for l in text.lines().filter(|l| l.contains("banned") || l.contains("several senders") || l.contains("from one peer") || l.contains("too often")) {
        eprintln!("  {}", l.split_once(": ").map_or(l, |(_, m)| m));
    }
}
