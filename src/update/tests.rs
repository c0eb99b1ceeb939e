use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::image::pack::PackOptions;
use crate::image::progress::ProgressMode;
use crate::image::store::{Store, TreeKind};
use crate::types::ImageName;

fn opts() -> PackOptions {
    PackOptions { progress: ProgressMode::Off, ..PackOptions::default() }
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A store with image `img` packed at v1; returns (store, name, golden tree).
fn store_v1(dir: &Path) -> (Store, ImageName, PathBuf) {
    let store = Store::new(dir.join("store"));
    let name: ImageName = "img".parse().unwrap();
    let tree = store.tree_dir(TreeKind::Image, &name);
    write(&tree, "etc/app.conf", "threads = 1\n");
    write(&tree, "etc/hostname", "golden\n");
    write(&tree, "usr/bin/tool", "tool v1\n");
    write(&tree, "usr/share/old/readme", "old\n");
    write(&tree, "var/log/syslog", "golden log\n");
    write(&tree, "var/lib/dpkg/status", "");
    store.pack(TreeKind::Image, &name, &opts(), None, true).unwrap();
    (store, name, tree)
}

/// A node installed from the store's current archive.
fn node_from(store: &Store, name: &ImageName, at: &Path) -> Manifest {
    let a = store.archive(TreeKind::Image, name).unwrap();
    fs::create_dir_all(at).unwrap();
    unpack::unpack(File::open(a).unwrap(), at, &UnpackOptions::default()).unwrap();
    let m = Manifest::load(&store.archive_file(TreeKind::Image, name, ".manifest")).unwrap();
    record_installed(at, name.as_str(), &m).unwrap();
    m
}

/// v2: a file added, a tree deleted, a config edited, an excluded file changed.
fn make_v2(tree: &Path) {
    write(tree, "usr/bin/new-tool", "new\n");
    fs::remove_dir_all(tree.join("usr/share/old")).unwrap();
    write(tree, "etc/app.conf", "threads = 8\n");
    write(tree, "etc/hostname", "golden-v2\n");
}

fn diff_of(store: &Store, name: &ImageName) -> (PathBuf, Manifest) {
    let d = store.diff(TreeKind::Image, name, &opts(), None).unwrap();
    let m = Manifest::load(&store.archive_file(TreeKind::Image, name, ".diff.manifest")).unwrap();
    (d.archive, m)
}

/// The tree's manifest without excluded paths and the update's own state.
fn comparable(root: &Path, x: &Excludes) -> Vec<Entry> {
    let nodes = scan::scan(root, &scan::ScanOptions::default()).unwrap();
    let digests = pack::digests_for(root, &nodes, &Default::default(), true).unwrap().unwrap_or_default();
    let m = pack::manifest_of(&nodes, &digests, pack::full_header(&opts()));
    // `var/lib` holds the node's own record (var/lib/si-appliance): its mtime is the node's.
    m.entries.into_iter().filter(|e| !x.matches(&e.path) && e.path != "." && e.path != "var/lib").collect()
}

#[test]
fn excludes_match_prefixes_and_globs() {
    let x = Excludes::defaults();
    for p in ["etc/hostname", "etc/ssh/ssh_host_rsa_key", "var/log", "var/log/apt/history.log", "home/u/.bashrc",
        ".si-appliance/update.journal", "var/lib/si-appliance/installed.json", "etc/netplan/01.yaml"] {
        assert!(x.matches(p), "{p}");
    }
    for p in ["etc", "etc/hostname2", "etc/ssh/sshd_config", "var/logs", "usr/bin/tool", "."] {
        assert!(!x.matches(p), "{p}");
    }
    let mut y = Excludes::default();
    y.add_text(b"# site\n- /opt/*/cache\n\n/srv/data?\n", Path::new("x")).unwrap();
    assert!(y.matches("opt/a/cache/f") && y.matches("srv/data1") && !y.matches("opt/a/b") && !y.matches("srv/data"));
    let e = y.add_text(b"/ok\nrelative/path\n", Path::new("f")).unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
    assert!(y.add_text(b"/\n", Path::new("f")).is_err());
}

#[test]
fn a_diff_brings_the_node_to_v2_except_excluded_paths_and_dry_run_plans_it() {
    let t = tempfile::tempdir().unwrap();
    let (store, name, tree) = store_v1(t.path());
    let node = t.path().join("node");
    node_from(&store, &name, &node);
    write(&node, "etc/hostname", "node-07\n");
    write(&node, "var/log/syslog", "node log\n");
    make_v2(&tree);
    let (archive, target) = diff_of(&store, &name);
    let x = Excludes::defaults();

    let before = comparable(&node, &Excludes::default());
    let p = plan(&installed_manifest(&node).unwrap(), &target, &x).unwrap();
    assert_eq!(p.added, ["usr/bin/new-tool"]);
    assert!(p.changed.contains(&"etc/app.conf".to_owned()), "{p:?}");
    assert_eq!(p.deleted, ["usr/share/old/readme", "usr/share/old"]);
    assert_eq!(p.excluded, ["etc/hostname"]);
    assert!(p.lines().contains("A usr/bin/new-tool\n") && p.lines().contains("X etc/hostname\n"));
    // Planning wrote nothing.
    assert_eq!(before, comparable(&node, &Excludes::default()));

    let done = apply(&node, name.as_str(), &archive, &target, &x).unwrap();
    assert_eq!(done.plan, p);
    assert_eq!(comparable(&node, &x), comparable(&tree, &x));
    assert_eq!(fs::read_to_string(node.join("etc/hostname")).unwrap(), "node-07\n");
    assert_eq!(fs::read_to_string(node.join("var/log/syslog")).unwrap(), "node log\n");
    assert!(!node.join(".si-appliance/update.journal").exists());
    assert!(!node.join(".si-appliance/update-stage").exists());
    assert_eq!(installed_manifest(&node).unwrap().digest(), done.manifest_sha256);
    // The same diff again is refused: the node is no longer on its base.
    assert!(matches!(apply(&node, name.as_str(), &archive, &target, &x), Err(UpdateError::WrongBase { .. })));
}

#[test]
fn a_corrupt_archive_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (store, name, tree) = store_v1(t.path());
    let node = t.path().join("node");
    node_from(&store, &name, &node);
    make_v2(&tree);
    let (archive, mut target) = diff_of(&store, &name);
    let x = Excludes::defaults();
    let before = comparable(&node, &Excludes::default());
    // A manifest that says the new file has other content: the staged copy is refused.
    let e = target.entries.iter_mut().find(|e| e.path == "usr/bin/new-tool").unwrap();
    e.sha256 = Some("00".repeat(32));
    let err = apply(&node, name.as_str(), &archive, &target, &x).unwrap_err();
    assert!(matches!(err, UpdateError::StagedMismatch { .. }), "{err}");
    // A truncated archive: refused by the unpacker.
    let (_, target) = diff_of(&store, &name);
    let bytes = fs::read(&archive).unwrap();
    let cut = t.path().join("cut.tar.zst");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(apply(&node, name.as_str(), &cut, &target, &x).is_err());
    assert_eq!(before, comparable(&node, &Excludes::default()));
    assert!(!node.join(".si-appliance/update.journal").exists());
}

#[test]
fn a_failure_while_applying_leaves_a_journal_of_what_changed_and_a_rerun_finishes() {
    let t = tempfile::tempdir().unwrap();
    let (store, name, tree) = store_v1(t.path());
    let node = t.path().join("node");
    node_from(&store, &name, &node);
    make_v2(&tree);
    let (archive, target) = diff_of(&store, &name);
    let x = Excludes::defaults();
    // The third journalled operation fails (injected).
    FAIL_AT.with(|f| f.set(Some(3)));
    let err = apply(&node, name.as_str(), &archive, &target, &x).unwrap_err();
    let UpdateError::Partial { done, journal, .. } = &err else { panic!("{err}") };
    let text = fs::read_to_string(journal).unwrap();
    assert_eq!(text.lines().count(), *done, "{text}");
    assert!(*done >= 1, "{err}");
    // The installed record still names v1.
    assert_eq!(installed_manifest(&node).unwrap().digest(), target.header.base_manifest_sha256.clone().unwrap());
    assert_eq!(text.lines().count(), 3);
    // Running again finishes the update.
    FAIL_AT.with(|f| f.set(None));
    apply(&node, name.as_str(), &archive, &target, &x).unwrap();
    assert!(node.join(".si-appliance/update.journal.prev").exists());
    assert_eq!(fs::read_to_string(node.join("usr/bin/new-tool")).unwrap(), "new\n");
}

#[test]
fn a_node_two_versions_behind_updates_from_the_full_archive() {
    let t = tempfile::tempdir().unwrap();
    let (store, name, tree) = store_v1(t.path());
    let node = t.path().join("node");
    node_from(&store, &name, &node);
    make_v2(&tree);
    store.pack(TreeKind::Image, &name, &opts(), None, false).unwrap();
    write(&tree, "etc/app.conf", "threads = 16\n");
    fs::remove_file(tree.join("usr/bin/tool")).unwrap();
    // The v3 diff is against v2: refused for a v1 node.
    let (diff, dm) = diff_of(&store, &name);
    let x = Excludes::defaults();
    assert!(matches!(apply(&node, name.as_str(), &diff, &dm, &x), Err(UpdateError::WrongBase { .. })));
    store.pack(TreeKind::Image, &name, &opts(), None, false).unwrap();
    let full = store.archive(TreeKind::Image, &name).unwrap();
    let fm = Manifest::load(&store.archive_file(TreeKind::Image, &name, ".manifest")).unwrap();
    let done = apply(&node, name.as_str(), &full, &fm, &x).unwrap();
    assert!(done.plan.deleted.contains(&"usr/bin/tool".to_owned()), "{:?}", done.plan);
    assert_eq!(comparable(&node, &x), comparable(&tree, &x));
}

/// The appliance's archives per base (`Store::update_archive`): a chain v1 → v2 → v3 where one
/// node takes every step and another jumps from v1 to v3 (the store's history knows v1), a node of
/// an unknown version gets the whole tree, and every node ends on the version the store names.
#[test]
fn update_archives_per_base_bring_every_node_to_the_current_version() {
    let d = tempfile::tempdir().unwrap();
    let (store, name, tree) = store_v1(d.path());
    let x = Excludes::defaults();
    let v1 = node_from(&store, &name, &d.path().join("a"));
    node_from(&store, &name, &d.path().join("b"));
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let known = |digest: &str| store.version(TreeKind::Image, &name, digest);
    assert_eq!(known(&v1.digest()).as_ref(), Some(&v1), "packing keeps the version's manifest");
    assert!(known("00").is_none() && known(&"g".repeat(64)).is_none() && known(&"0".repeat(64)).is_none());

    make_v2(&tree);
    let u = store.update_archive(TreeKind::Image, &name, Some(&v1)).unwrap();
    assert!(u.diff, "a small change is a diff");
    assert_eq!(u.target, store.current_version(TreeKind::Image, &name).unwrap());
    assert!(u.archive.file_name().unwrap().to_str().unwrap().starts_with(&format!("img.{}-", &v1.digest()[..12])));
    let again = store.update_archive(TreeKind::Image, &name, Some(&v1)).unwrap();
    assert_eq!((again.archive.clone(), again.manifest.clone()), (u.archive.clone(), u.manifest.clone()), "made once per base");
    let done = apply(&a, "img", &u.archive, &u.manifest, &x).unwrap();
    assert_eq!(done.manifest_sha256, u.target, "the node records the version, not the diff's manifest");
    let v2 = known(&u.target).expect("the target version is kept");

    write(&tree, "usr/bin/tool", "tool v3\n");
    write(&tree, "opt/v3/data", "three\n");
    let step = store.update_archive(TreeKind::Image, &name, Some(&v2)).unwrap();
    let jump = store.update_archive(TreeKind::Image, &name, Some(&v1)).unwrap();
    assert!(step.diff && jump.diff);
    assert_eq!(step.target, jump.target);
    assert_eq!(step.manifest.header.base_manifest_sha256.as_deref(), Some(v2.digest().as_str()));
    apply(&a, "img", &step.archive, &step.manifest, &x).unwrap();
    apply(&b, "img", &jump.archive, &jump.manifest, &x).unwrap();
    let v3 = comparable(&tree, &x);
    assert_eq!(comparable(&a, &x), v3);
    assert_eq!(comparable(&b, &x), v3);
    for n in [&a, &b] {
        assert_eq!(installed_manifest(n).unwrap().digest(), step.target);
    }
    // A diff for the wrong base is refused with nothing changed.
    let e = apply(&a, "img", &jump.archive, &jump.manifest, &x).unwrap_err();
    assert!(matches!(e, UpdateError::WrongBase { .. }), "{e}");

    // Unknown base: the whole tree, which any node applies.
    let full = store.update_archive(TreeKind::Image, &name, None).unwrap();
    assert!(!full.diff);
    assert_eq!(full.manifest.header.kind, "full");
    let c = d.path().join("c");
    node_from(&store, &name, &c); // still the packed v1 archive
    apply(&c, "img", &full.archive, &full.manifest, &x).unwrap();
    assert_eq!(comparable(&c, &x), v3);

    // A change larger than FULL_RATHER_THAN_DIFF of the image: the whole tree too.
    let before = store.version(TreeKind::Image, &name, &step.target).unwrap();
    write(&tree, "usr/lib/big.bin", &"x".repeat(64 << 10));
    let big = store.update_archive(TreeKind::Image, &name, Some(&before)).unwrap();
    assert!(!big.diff, "a change of most of the bytes is sent whole");
}
