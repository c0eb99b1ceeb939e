//! Updates over the swarm (issue 17), in network namespaces this test creates (10.76.x.x): eight
//! installed-node stand-ins (the v1 archive unpacked in a directory per node, with the installed
//! record and node.json an install leaves, one node per namespace, each with its own MAC) run the
//! update agent (`si-appliance update --watch`); the operator changes the golden tree and runs
//! `si-appliance node update --all`; the appliance makes the diff from the nodes' version,
//! publishes it in its swarm, and the agents fetch it (seeding to each other) and apply it.
//! Checked: every tree equals v2 outside the excluded paths, the excluded file is untouched, each
//! node's record and the appliance's node book name the new version, `--dry-run` lists the
//! changes and writes nothing, the appliance's link carries about one copy of the diff (its eth0
//! tx bytes), and an update cut off by killing the appliance leaves the node's tree on its
//! version, with no journal.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Lab, Netns, Proc, RemoveOnSuccess, appliance_bin, node_bin, random_file, start_appliance, wait_for};
use si_appliance::config::Enroll;
use si_appliance::image::manifest::{Entry, Manifest};
use si_appliance::image::{pack, scan};
use si_appliance::nodes::{Enrol, NodeBook};
use si_appliance::types::node_api::{NodeCredentials, Phase};
use si_appliance::types::{MacAddr, NodeToken};
use si_appliance::update::{self, Excludes};

const MIB: u64 = 1 << 20;
const HTTP_PORT: u16 = 8080;
const SEED_PORT: u16 = 6881;
const N: usize = 8;

fn cli(ns: Option<&Netns>, args: &[&str]) -> String {
    let mut cmd = match ns {
        Some(ns) => ns.cmd(appliance_bin()),
        None => Command::new(appliance_bin()),
    };
    let out = cmd.args(args).output().expect("si-appliance");
    assert!(out.status.success(), "si-appliance {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

fn random_at(root: &Path, rel: &str, n: u64) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    random_file(&p, n);
}

/// Entries of a tree outside the excluded paths (the root's own entry aside).
fn comparable(root: &Path, x: &Excludes) -> Vec<Entry> {
    let nodes = scan::scan(root, &scan::ScanOptions::default()).unwrap();
    let digests = pack::digests_for(root, &nodes, &Default::default(), true).unwrap().unwrap_or_default();
    let m = pack::manifest_of(&nodes, &digests, pack::full_header(&Default::default()));
    // `var/lib` holds the node's own record (var/lib/si-appliance): its mtime is the node's.
    m.entries.into_iter().filter(|e| !x.matches(&e.path) && e.path != "." && e.path != "var/lib").collect()
}

fn tx_bytes(ns: &Netns) -> u64 {
    let out = ns.cmd("cat").arg("/sys/class/net/eth0/statistics/tx_bytes").output().expect("cat");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

fn mac(i: usize) -> String {
    format!("52:54:00:76:01:{:02x}", 0x11 + i)
}

fn config(lab: &Lab) -> String {
    format!(
        "iface = \"eth0\"\nenroll = \"listed\"\nimage = \"img\"\nstore = \"{}\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n\
         [http]\nport = {HTTP_PORT}\n[swarm]\nlisten_port = {SEED_PORT}\n\
         announce_interval = \"3s\"\npeer_timeout = \"30s\"\nupload_limit = 4194304\n[install]\nupdate_poll = \"2s\"\n",
        lab.path("store").display(),
        lab.path("state").display(),
    )
}

/// A node on v1: the v1 archive unpacked under `dir/root` with the record an install leaves.
fn install_v1(lab: &Lab, i: usize, secret: &[u8]) -> PathBuf {
    let root = lab.path(&format!("node{i}")).join("root");
    fs::create_dir_all(&root).unwrap();
    let store = lab.path("store");
    let archive = store.join("archives/img.tar.zst");
    cli(None, &["image", "unpack", archive.to_str().unwrap(), "--to", root.to_str().unwrap()]);
    let m = Manifest::load(&store.join("archives/img.manifest")).unwrap();
    update::record_installed(&root, "img", &m).unwrap();
    let m: MacAddr = mac(i).parse().unwrap();
    let creds = NodeCredentials {
        server: format!("10.76.1.1:{HTTP_PORT}").parse().unwrap(),
        mac: m,
        token: NodeToken::derive(secret, m).as_str().to_owned(),
        iface: None,
    };
    update::client::write_credentials(&root, &creds).unwrap();
    // A per-node file the update must keep.
    write(&root, "etc/hostname", format!("node{i}\n").as_bytes());
    root
}

fn agent(lab: &Lab, h: usize, root: &Path, name: &str, extra: &[&str]) -> Proc {
    let mut cmd = lab.hosts[h].cmd(node_bin());
    cmd.args(["update", "--watch", "--poll", "2s", "--root"]).arg(root).args(extra).env("RUST_LOG", "info");
    Proc::spawn(name, cmd, lab.path(&format!("{name}.log")))
}

/// The node book as `node list --json` shows it.
fn nodes(lab: &Lab, app: usize) -> serde_json::Value {
    let tok = fs::read_to_string(lab.path("state/admin-token")).unwrap();
    let out = cli(Some(&lab.hosts[app]), &["node", "--server", &format!("127.0.0.1:{HTTP_PORT}"), "--token", tok.trim(), "list", "--json"]);
    serde_json::from_str(&out).unwrap()
}

fn version_of(v: &serde_json::Value, m: &str) -> (Option<String>, bool) {
    let n = v["nodes"].as_array().unwrap().iter().find(|n| n["mac"] == m).unwrap();
    (n["manifest"].as_str().map(str::to_owned), n["update"].is_object())
}

#[test]
fn eight_nodes_update_together_over_the_swarm() {
    let mut lab = Lab::new("up8");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.76.1.1/24"), None);
    for i in 1..=N {
        lab.add_host(Some(&format!("10.76.1.{}/24", 10 + i)), Some(&mac(i)));
    }
    // The golden tree v1, packed (as the appliance packs it at start).
    let store = lab.path("store");
    let s = store.display().to_string();
    let golden = lab.path("golden");
    write(&golden, "etc/app.conf", b"threads = 1\n");
    write(&golden, "etc/hostname", b"golden\n");
    write(&golden, "usr/bin/tool", b"tool v1\n");
    write(&golden, "var/lib/dpkg/status", b"");
    write(&golden, "usr/share/doc/old.txt", b"old\n");
    random_at(&golden, "usr/lib/base.bin", 4 * MIB);
    cli(None, &["--store", &s, "image", "import", "img", "--from", golden.to_str().unwrap()]);
    cli(None, &["--store", &s, "image", "pack", "img", "--force"]);
    let v1_digest = Manifest::load(&store.join("archives/img.manifest")).unwrap().digest();

    // The node book as after the nodes' installs: enrolled, installed with v1.
    let state = lab.path("state");
    {
        let book = NodeBook::open(&state, Enroll::Listed, &[]).unwrap();
        let macs: Vec<MacAddr> = (1..=N).map(|i| mac(i).parse().unwrap()).collect();
        book.enrol(&Enrol { macs: macs.clone(), group: Some("web".into()), ..Default::default() }).unwrap();
        for m in macs {
            book.plan_fetched(m, &"img".parse().unwrap()).unwrap();
            book.reported(m, Phase::Done, None, Some(&v1_digest)).unwrap();
        }
    }
    let mut appliance = start_appliance(&lab, app, "appliance", &config(&lab), &[]);
    let secret = fs::read(state.join("secret")).expect("appliance secret");
    let roots: Vec<PathBuf> = (1..=N).map(|i| install_v1(&lab, i, &secret)).collect();
    let x = Excludes::defaults();
    let v1 = comparable(&roots[0], &x);

    // Agents with nothing ordered do nothing.
    let mut agents: Vec<Proc> = (1..=N).map(|i| agent(&lab, i, &roots[i - 1], &format!("agent{i}"), &[])).collect();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(comparable(&roots[0], &x), v1);

    // v2: a file added (16 MiB, the bulk of the diff), a file deleted, a config edited, an
    // excluded file changed.
    let tree = store.join("images/img");
    random_at(&tree, "usr/lib/new.bin", 16 * MIB);
    fs::remove_file(tree.join("usr/share/doc/old.txt")).unwrap();
    write(&tree, "etc/app.conf", b"threads = 8\n");
    write(&tree, "etc/hostname", b"golden-v2\n");

    // A dry run asked by a node itself (not ordered): the plan, nothing written.
    let before = comparable(&roots[0], &Excludes::default());
    let plan = wait_for(Duration::from_secs(60), || {
        let out = lab.hosts[1].cmd(node_bin()).args(["update", "--server", "--dry-run", "--root"]).arg(&roots[0]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("A usr/lib/new.bin")).then_some(text)
    })
    .expect("a dry run listing the plan");
    for line in ["A usr/lib/new.bin", "M etc/app.conf", "D usr/share/doc/old.txt", "X etc/hostname"] {
        assert!(plan.lines().any(|l| l == line), "no {line:?} in the plan:\n{plan}");
    }
    assert_eq!(before, comparable(&roots[0], &Excludes::default()), "the dry run changed the tree");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(comparable(&roots[0], &x), v1, "an agent acted without an order");

    let tx0 = tx_bytes(&lab.hosts[app]);
    let tok = fs::read_to_string(state.join("admin-token")).unwrap();
    let srv = format!("127.0.0.1:{HTTP_PORT}");
    let said = cli(Some(&lab.hosts[app]), &["node", "--server", &srv, "--token", tok.trim(), "update", "--all"]);
    assert!(said.contains(&format!("ordered ({N};")), "{said}");
    let target = said.lines().find_map(|l| l.strip_prefix("update target: ")).unwrap().trim().to_owned();
    assert_ne!(target, v1_digest);
    let t0 = std::time::Instant::now();
    let all_done = wait_for(Duration::from_secs(240), || {
        let v = nodes(&lab, app);
        (1..=N).all(|i| version_of(&v, &mac(i)) == (Some(target.clone()), false)).then_some(())
    });
    let secs = t0.elapsed().as_secs_f64();
    assert!(all_done.is_some(), "not every node reported the update:\n{}\n{}", serde_json::to_string_pretty(&nodes(&lab, app)).unwrap(), agents[0].log_text());
    let app_tx = tx_bytes(&lab.hosts[app]) - tx0;
    let diff = store.join(format!("archives/updates/img.{}-{}.tar.zst", &v1_digest[..12], &target[..12]));
    let diff_bytes = fs::metadata(&diff).unwrap_or_else(|e| panic!("{}: {e}", diff.display())).len();

    let v2 = comparable(&tree, &x);
    assert_ne!(v1, v2);
    for (h, root) in roots.iter().enumerate() {
        assert_eq!(comparable(root, &x), v2, "node {} differs from v2", h + 1);
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), format!("node{}\n", h + 1), "an excluded file was touched");
        assert_eq!(update::installed_manifest(root).unwrap().digest(), target);
    }
    let listed = {
        let out = lab.hosts[app].cmd(appliance_bin()).args(["node", "--server", &srv, "--token", tok.trim(), "list"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(listed.matches(&target[..12]).count(), N, "node list shows the version:\n{listed}");
    let copies = app_tx as f64 / diff_bytes as f64;
    eprintln!("FIGURES n={N} diff={diff_bytes} bytes, all updated {secs:.1} s after the order: appliance eth0 tx {app_tx} bytes = {copies:.2} copies of the diff");
    assert!(copies < 2.0, "the appliance sent {copies:.2} copies of the diff");
    for a in agents.iter_mut() {
        a.terminate();
    }

    // Interrupted: v3 ordered for node 1, the appliance killed while it fetches: the tree stays
    // on v2, whole, with no journal left; the node's record still names v2.
    random_at(&tree, "usr/lib/v3.bin", 24 * MIB);
    let said = cli(Some(&lab.hosts[app]), &["node", "--server", &srv, "--token", tok.trim(), "update", &mac(1)]);
    assert!(said.contains("ordered (1;"), "{said}");
    let offers = || appliance.log_text().matches("update offered").count();
    let before = offers();
    let mut a1 = agent(&lab, 1, &roots[0], "agent1-cut", &["--stall-limit", "10s", "--seed-for", "5s"]);
    assert!(wait_for(Duration::from_secs(120), || (offers() > before).then_some(())).is_some(), "v3 was never offered");
    std::thread::sleep(Duration::from_millis(1500));
    appliance.kill();
    let gave_up = wait_for(Duration::from_secs(90), || {
        let log = common::strip_ansi(&a1.log_text());
        log.lines().find(|l| l.contains("update to img.") && l.contains("failed")).map(str::to_owned)
    });
    let gave_up = gave_up.unwrap_or_else(|| panic!("the agent never said the update failed:\n{}", a1.log_text()));
    eprintln!("FIGURES cut off: {gave_up}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(comparable(&roots[0], &x), v2, "the interrupted node's tree changed");
    assert_eq!(update::installed_manifest(&roots[0]).unwrap().digest(), target);
    assert!(!roots[0].join(".si-appliance/update.journal").exists(), "a journal was left: the tree was touched");
    a1.terminate();
}
