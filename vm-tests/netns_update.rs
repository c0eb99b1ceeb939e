//! Updates over the swarm (issue 17), in network namespaces this test creates (10.76.x.x): eight
//! installed-node stand-ins (v1 trees unpacked in directories, one node per namespace) fetch the
//! store's v1→v2 diff archive through the appliance's tracker and seed (`si-appliance fetch
//! --seed-until-done`), then apply it with `si-appliance update`. Checked: every tree equals v2
//! outside the excluded paths, the excluded file is untouched, `--dry-run` lists the changes and
//! writes nothing, the appliance's link carries about one copy of the diff (its eth0 tx bytes),
//! and a fetch cut off by killing the appliance leaves the node's tree on v1.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Lab, Netns, Proc, RemoveOnSuccess, appliance_bin, random_file, start_appliance};
use si_appliance::image::manifest::{Entry, Manifest};
use si_appliance::image::{pack, scan};
use si_appliance::update::{self, Excludes};

const MIB: u64 = 1 << 20;
const HTTP_PORT: u16 = 8080;
const SEED_PORT: u16 = 6881;

fn cli(args: &[&str]) -> String {
    let out = Command::new(appliance_bin()).args(args).output().expect("si-appliance");
    assert!(out.status.success(), "si-appliance {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
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

fn config(lab: &Lab, archive: &Path) -> String {
    format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{}\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n\
         [http]\nport = {HTTP_PORT}\n[swarm]\narchives = [\"{}\"]\nlisten_port = {SEED_PORT}\n\
         announce_interval = \"3s\"\npeer_timeout = \"30s\"\nupload_limit = 4194304\n",
        lab.path("app-store").display(),
        lab.path("app-state").display(),
        archive.display()
    )
}

/// A node on v1: the v1 archive unpacked under `dir/root` with its installed record.
fn install_v1(store: &Path, dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(&root).unwrap();
    let archive = store.join("archives/img.tar.zst");
    cli(&["image", "unpack", archive.to_str().unwrap(), "--to", root.to_str().unwrap()]);
    let m = Manifest::load(&store.join("archives/img.manifest")).unwrap();
    update::record_installed(&root, "img", &m).unwrap();
    // Per-node files the update must keep.
    write(&root, "etc/hostname", format!("{}\n", dir.file_name().unwrap().to_string_lossy()).as_bytes());
    root
}

fn fetch(lab: &Lab, h: usize, out: &Path, extra: &[&str]) -> Proc {
    let mut cmd = lab.hosts[h].cmd(appliance_bin());
    let srv = format!("10.76.1.1:{HTTP_PORT}");
    cmd.args(["fetch", "--server", &srv, "--image", "img.diff", "--iface", "eth0", "--out"])
        .arg(out)
        .args(extra)
        .env("RUST_LOG", "info");
    Proc::spawn(&format!("fetch{h}"), cmd, lab.path(&format!("fetch{h}.log")))
}

#[test]
fn eight_nodes_update_together_over_the_swarm() {
    const N: usize = 8;
    let mut lab = Lab::new("up8");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.76.1.1/24"), None);
    for i in 0..N {
        lab.add_host(Some(&format!("10.76.1.{}/24", 11 + i)), None);
    }
    // The golden tree v1, packed; v2 = a file added (16 MiB, the bulk of the diff), a file
    // deleted, a config edited, an excluded file changed.
    let store = lab.path("store");
    let s = store.display().to_string();
    let golden = lab.path("golden");
    write(&golden, "etc/app.conf", b"threads = 1\n");
    write(&golden, "etc/hostname", b"golden\n");
    write(&golden, "usr/bin/tool", b"tool v1\n");
    write(&golden, "var/lib/dpkg/status", b"");
    write(&golden, "usr/share/doc/old.txt", b"old\n");
    fs::create_dir_all(golden.join("usr/lib")).unwrap();
    random_file(&golden.join("usr/lib/base.bin"), 4 * MIB);
    cli(&["--store", &s, "image", "import", "img", "--from", golden.to_str().unwrap()]);
    cli(&["--store", &s, "image", "pack", "img", "--force"]);
    let tree = store.join("images/img");
    random_file(&tree.join("usr/lib/new.bin"), 16 * MIB);
    fs::remove_file(tree.join("usr/share/doc/old.txt")).unwrap();
    write(&tree, "etc/app.conf", b"threads = 8\n");
    write(&tree, "etc/hostname", b"golden-v2\n");
    cli(&["--store", &s, "image", "diff", "img", "--announce", &format!("http://10.76.1.1:{HTTP_PORT}/announce")]);
    let diff = store.join("archives/img.diff.tar.zst");
    let diff_manifest = store.join("archives/img.diff.manifest");
    let diff_bytes = fs::metadata(&diff).unwrap().len();

    let x = Excludes::defaults();
    let roots: Vec<PathBuf> = (1..=N).map(|h| install_v1(&store, &lab.path(&format!("node{h}")))).collect();
    let v1 = comparable(&roots[0], &x);

    // Dry run: the plan, nothing written.
    let before = comparable(&roots[0], &Excludes::default());
    let plan = cli(&[
        "update",
        "--root",
        roots[0].to_str().unwrap(),
        "--archive",
        diff.to_str().unwrap(),
        "--manifest",
        diff_manifest.to_str().unwrap(),
        "--dry-run",
    ]);
    for line in ["A usr/lib/new.bin", "M etc/app.conf", "D usr/share/doc/old.txt", "X etc/hostname"] {
        assert!(plan.lines().any(|l| l == line), "no {line:?} in the plan:\n{plan}");
    }
    assert_eq!(before, comparable(&roots[0], &Excludes::default()), "the dry run changed the tree");

    let appliance = start_appliance(&lab, app, "appliance", &config(&lab, &diff), &[]);
    let tx0 = tx_bytes(&lab.hosts[app]);
    let mut fetches: Vec<(Proc, PathBuf)> = (1..=N)
        .map(|h| {
            let out = lab.path(&format!("node{h}")).join("img.diff.tar.zst");
            (fetch(&lab, h, &out, &["--seed-until-done", "--seed-for", "60s"]), out)
        })
        .collect();
    for (p, _) in fetches.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(150));
        assert!(st.success(), "fetch failed ({st}):\n{}", p.log_text());
    }
    let app_tx = tx_bytes(&lab.hosts[app]) - tx0;
    for ((_, out), root) in fetches.iter().zip(&roots) {
        let done = cli(&[
            "update",
            "--root",
            root.to_str().unwrap(),
            "--archive",
            out.to_str().unwrap(),
            "--manifest",
            diff_manifest.to_str().unwrap(),
        ]);
        assert!(done.contains("update-done added=1 "), "{done}");
    }
    let v2 = comparable(&tree, &x);
    assert_ne!(v1, v2);
    for (h, root) in roots.iter().enumerate() {
        assert_eq!(comparable(root, &x), v2, "node {} differs from v2", h + 1);
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), format!("node{}\n", h + 1));
        let rec = update::installed_manifest(root).unwrap();
        assert_eq!(rec.digest(), Manifest::load(&diff_manifest).unwrap().digest());
    }
    let copies = app_tx as f64 / diff_bytes as f64;
    eprintln!("FIGURES n={N} diff={diff_bytes} bytes: appliance eth0 tx {app_tx} bytes = {copies:.2} copies of the diff");
    assert!(copies < 2.0, "the appliance sent {copies:.2} copies of the diff");

    // Interrupted: a ninth fetch from node 1's v1 twin, the appliance killed mid-fetch: no
    // archive, no update, the tree still v1.
    drop(appliance);
    let late = install_v1(&store, &lab.path("late"));
    let late_v1 = comparable(&late, &Excludes::default());
    let mut appliance = start_appliance(&lab, app, "appliance2", &config(&lab, &diff), &[]);
    let out = lab.path("late").join("img.diff.tar.zst");
    let mut f = fetch(&lab, 1, &out, &["--timeout", "20s", "--progress-every", "300ms"]);
    f.wait_line("a first piece", Duration::from_secs(30), |l| l.contains("progress") && !l.contains("have=0 "));
    appliance.kill();
    let st = f.wait_exit(Duration::from_secs(60));
    assert!(!st.success(), "the fetch finished although the appliance was killed:\n{}", f.log_text());
    let r = Command::new(appliance_bin())
        .args(["update", "--root", late.to_str().unwrap(), "--archive", out.to_str().unwrap(), "--manifest"])
        .arg(&diff_manifest)
        .output()
        .unwrap();
    assert!(!r.status.success(), "an update from a partial download succeeded");
    assert_eq!(late_v1, comparable(&late, &Excludes::default()), "the interrupted node's tree changed");
}
