//! Image store acceptance tests (issue 3), run as root with real tools: round trip of every file
//! type compared by diff/stat/getfattr/getfacl, deterministic bytes, GNU tar interop both ways,
//! base + diff, hostile archives, rsync capture, the CLI, and a debootstrap-made Debian image that
//! must chroot after a round trip.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use si_appliance::image::error::{ImageError, Refusal};
use si_appliance::image::manifest::Manifest;
use si_appliance::image::pack::{self, PackOptions};
use si_appliance::image::progress::ProgressMode;
use si_appliance::image::scan::{self, ScanOptions};
use si_appliance::image::store::{CaptureSource, PackOutcome, Store, TreeKind};
use si_appliance::image::torrent;
use si_appliance::image::unpack::{self, UnpackOptions};
use si_appliance::types::ImageName;

fn sh(cmd: &str, args: &[&OsStr]) -> Vec<u8> {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("starting {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(cmd).current_dir(dir).args(args).output().unwrap_or_else(|e| panic!("starting {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn quiet() -> PackOptions {
    PackOptions { zstd_level: Some(3), threads: 2, progress: ProgressMode::Off }
}

fn uquiet() -> UnpackOptions {
    UnpackOptions { progress: ProgressMode::Off, ..UnpackOptions::default() }
}

/// Builds a tree holding every file type a root file system needs.
fn rich_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/sub")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("etc/hostname"), b"golden\n").unwrap();
    fs::write(root.join("etc/sub/data"), vec![7u8; 300_000]).unwrap();
    fs::write(root.join("usr/bin/ping"), b"\x7fELF not really").unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.link")).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("usr/hostname.2")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../etc/sub", root.join("usr/rel-link")).unwrap();
    std::os::unix::fs::symlink("dangling/target", root.join("dangling")).unwrap();
    let r = |p: &str| root.join(p).into_os_string();
    sh("mknod", &[&r("dev/null"), os("c"), os("1"), os("3")]);
    sh("mknod", &[&r("dev/sda"), os("b"), os("8"), os("0")]);
    sh("mkfifo", &[&r("dev/initctl")]);
    // A sparse file: holes at the start, middle and end around two data blocks.
    sh("truncate", &[os("-s"), os("64M"), &r("sparse")]);
    let mut f = fs::OpenOptions::new().write(true).open(root.join("sparse")).unwrap();
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.write_all(&[1u8; 10000]).unwrap();
    f.seek(SeekFrom::Start(40 << 20)).unwrap();
    f.write_all(b"middle").unwrap();
    drop(f);
    // Modes, owners.
    sh("chmod", &[os("4755"), &r("usr/bin/ping")]);
    sh("chmod", &[os("1777"), &r("etc/sub")]);
    sh("chmod", &[os("0640"), &r("etc/sub/data")]);
    sh("chown", &[os("1234:5678"), &r("etc/sub/data")]);
    sh("chown", &[os("-h"), os("42:43"), &r("usr/rel-link")]);
    // xattrs: a capability (needs set after chown/chmod), user.*, an ACL and a default ACL.
    sh("setcap", &[os("cap_net_raw+ep"), &r("usr/bin/ping")]);
    sh("setfattr", &[os("-n"), os("user.checksum"), os("-v"), os("0xdeadbeef00ff"), &r("etc/hostname")]);
    sh("setfattr", &[os("-n"), os("user.dir"), os("-v"), os("yes"), &r("etc")]);
    sh("setfacl", &[os("-m"), os("u:1000:rw,g:100:r"), &r("etc/sub/data")]);
    sh("setfacl", &[os("-d"), os("-m"), os("u:1000:rx"), &r("etc/sub")]);
    // Long names: a >100-byte component, a >255-byte path, a >100-byte symlink target.
    let long_dir = "d".repeat(120);
    let long_file = "f".repeat(200);
    fs::create_dir_all(root.join(&long_dir).join(&long_dir)).unwrap();
    fs::write(root.join(&long_dir).join(&long_dir).join(&long_file), b"deep").unwrap();
    std::os::unix::fs::symlink(format!("{long_dir}/{long_dir}/{long_file}"), root.join("long-link")).unwrap();
    fs::hard_link(root.join(&long_dir).join(&long_dir).join(&long_file), root.join(&long_dir).join("hl")).unwrap();
    // Names that are not UTF-8, short and long.
    let bad = OsStr::from_bytes(b"bad-\xff\xfe-name");
    fs::write(root.join(bad), b"latin1").unwrap();
    let mut long_bad = b"\xe9".repeat(150);
    long_bad.extend_from_slice(b".txt");
    fs::write(root.join(&long_dir).join(OsStr::from_bytes(&long_bad)), b"x").unwrap();
    // Sub-second mtimes and an old one.
    sh("touch", &[os("-h"), os("-d"), os("2001-02-03 04:05:06.123456789"), &r("abs-link")]);
    sh("touch", &[os("-d"), os("1999-12-31 23:59:59.5"), &r("etc/hostname")]);
}

/// Everything `stat` says that must survive, per path (directory sizes and block counts aside:
/// they depend on the file system's history, not on the tree).
fn stat_listing(root: &Path) -> String {
    // One stat call over every path (sorted, NUL-separated so any name survives).
    let out =
        run_in(root, "sh", &["-c", "find . -print0 | sort -z | xargs -0 stat -c '%n|%F|%a|%u|%g|%y|%t,%T|%h|%s'"]);
    let mut text = String::new();
    for line in String::from_utf8_lossy(&out).lines() {
        let mut l = line.to_string();
        if l.contains("|directory|") {
            l.truncate(l.rfind('|').unwrap_or(l.len()));
        }
        text.push_str(&l);
        text.push('\n');
    }
    text
}

fn xattr_listing(root: &Path) -> String {
    String::from_utf8_lossy(&run_in(root, "getfattr", &["-d", "-m", "-", "-h", "-R", "-e", "hex", "."])).into_owned()
}

fn acl_listing(root: &Path) -> String {
    String::from_utf8_lossy(&run_in(root, "getfacl", &["-R", "-P", "-n", "."])).into_owned()
}

/// Asserts two trees are identical by real tools.
fn assert_same_tree(a: &Path, b: &Path) {
    let d =
        Command::new("diff").args([os("-r"), os("--no-dereference"), a.as_os_str(), b.as_os_str()]).output().unwrap();
    // diff -r reports "File x is a fifo/character special file while ..." for special files
    // even when equal; everything else is a real difference.
    let text = String::from_utf8_lossy(&d.stdout);
    let real: Vec<&str> = text
        .lines()
        .filter(|l| {
            !(l.starts_with("File ") && (l.contains(" is a fifo while ") || l.contains(" special file while ")))
        })
        .collect();
    assert!(real.is_empty(), "diff -r {} {}:\n{}", a.display(), b.display(), real.join("\n"));
    similar("stat", &stat_listing(a), &stat_listing(b));
    similar("getfattr", &xattr_listing(a), &xattr_listing(b));
    similar("getfacl", &acl_listing(a), &acl_listing(b));
}

fn similar(what: &str, a: &str, b: &str) {
    if a != b {
        let al: BTreeSet<&str> = a.lines().collect();
        let bl: BTreeSet<&str> = b.lines().collect();
        let only_a: Vec<_> = al.difference(&bl).collect();
        let only_b: Vec<_> = bl.difference(&al).collect();
        panic!("{what} listings differ\nonly in first: {only_a:#?}\nonly in second: {only_b:#?}");
    }
}

fn pack_to_file(tree: &Path, dest: &Path, opts: &PackOptions) -> Manifest {
    let nodes = scan::scan(tree, &ScanOptions::default()).unwrap();
    let f = fs::File::create(dest).unwrap();
    let (digests, f) = pack::write_archive(tree, &nodes, None, None, opts, dest, f).unwrap();
    f.sync_all().unwrap();
    pack::manifest_of(&nodes, &digests, pack::full_header(opts))
}

fn blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).unwrap().blocks()
}

#[test]
fn round_trip_keeps_every_file_type() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    for level in [Some(3), None] {
        let opts = PackOptions { zstd_level: level, ..quiet() };
        let archive = t.path().join("a.tar.zst");
        let manifest = pack_to_file(&src, &archive, &opts);
        let out = t.path().join(format!("out-{level:?}"));
        fs::create_dir(&out).unwrap();
        let report = unpack::unpack_verified(fs::File::open(&archive).unwrap(), &out, &uquiet(), &manifest).unwrap();
        assert_eq!(report.entries as usize, manifest.entries.len());
        assert_same_tree(&src, &out);
        // The sparse file is still sparse: 64 MiB logical, about 12 KiB of data.
        assert!(blocks(&out.join("sparse")) * 512 < 1 << 20, "holes lost: {} blocks", blocks(&out.join("sparse")));
        assert!(sh("getcap", &[out.join("usr/bin/ping").as_os_str()]).ends_with(b"cap_net_raw=ep\n"));
    }
}

#[test]
fn packing_twice_gives_identical_bytes_and_info_hash() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    let a = t.path().join("a.tar.zst");
    let b = t.path().join("b.tar.zst");
    let c = t.path().join("c.tar.zst");
    let ma = pack_to_file(&src, &a, &quiet());
    // Another thread count, and a copy of the tree (other inodes, other creation order).
    let mb = pack_to_file(&src, &b, &PackOptions { threads: 1, ..quiet() });
    let copy = t.path().join("copy");
    fs::create_dir(&copy).unwrap();
    si_appliance::image::store::copy_tree(&src, &copy).unwrap();
    let mc = pack_to_file(&copy, &c, &quiet());
    let (ba, bb, bc) = (fs::read(&a).unwrap(), fs::read(&b).unwrap(), fs::read(&c).unwrap());
    assert!(ba == bb, "two packs of one tree differ");
    assert!(ba == bc, "pack of an exact copy differs");
    assert_eq!(ma, mb);
    assert_eq!(ma, mc);
    let announce = "http://10.0.0.1:8080/announce";
    let ta = torrent::make(&a, "img.tar.zst", announce).unwrap();
    let tc = torrent::make(&c, "img.tar.zst", announce).unwrap();
    assert_eq!(ta, tc);
    assert_eq!(ta.piece_length, torrent::piece_length(fs::metadata(&a).unwrap().len()));
    assert_eq!(torrent::info_hash_of(&ta.bytes).as_deref(), Some(ta.info_hash.as_str()));
}

#[test]
fn gnu_tar_interop_both_ways() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    rich_tree(&src);
    // GNU tar -> ours.
    let gnu = t.path().join("gnu.tar.zst");
    sh(
        "tar",
        &[
            os("--xattrs"),
            os("--xattrs-include=*"),
            os("--acls"),
            os("-I"),
            os("zstd"),
            os("-cf"),
            gnu.as_os_str(),
            os("-C"),
            src.as_os_str(),
            os("."),
        ],
    );
    let ours = t.path().join("from-gnu");
    fs::create_dir(&ours).unwrap();
    unpack::unpack(fs::File::open(&gnu).unwrap(), &ours, &uquiet()).unwrap();
    assert_same_tree(&src, &ours);
    // GNU tar --acls without --xattrs stores ACLs only as text (SCHILY.acl.*): still restored.
    let acls_only = t.path().join("acls-only.tar");
    sh("tar", &[os("--acls"), os("-cf"), acls_only.as_os_str(), os("-C"), src.as_os_str(), os(".")]);
    let o = t.path().join("acls-only");
    fs::create_dir(&o).unwrap();
    unpack::unpack(fs::File::open(&acls_only).unwrap(), &o, &uquiet()).unwrap();
    similar("getfacl", &acl_listing(&src), &acl_listing(&o));
    // GNU tar --sparse, in its PAX 1.0 and old-GNU sparse formats -> ours, holes kept.
    for (i, fmt) in ["--format=posix", "--format=gnu"].iter().enumerate() {
        let a = t.path().join(format!("sparse{i}.tar"));
        sh("tar", &[os(fmt), os("--sparse"), os("-cf"), a.as_os_str(), os("-C"), src.as_os_str(), os("./sparse")]);
        let o = t.path().join(format!("sparse-out{i}"));
        fs::create_dir(&o).unwrap();
        unpack::unpack(fs::File::open(&a).unwrap(), &o, &uquiet()).unwrap();
        assert_eq!(fs::read(o.join("sparse")).unwrap(), fs::read(src.join("sparse")).unwrap(), "{fmt}");
        assert!(blocks(&o.join("sparse")) * 512 < 1 << 20, "{fmt}: holes lost");
    }
    // Ours -> GNU tar.
    let archive = t.path().join("ours.tar.zst");
    pack_to_file(&src, &archive, &quiet());
    let by_gnu = t.path().join("by-gnu");
    fs::create_dir(&by_gnu).unwrap();
    sh(
        "tar",
        &[
            os("--xattrs"),
            os("--xattrs-include=*"),
            os("-I"),
            os("zstd"),
            os("-xpf"),
            archive.as_os_str(),
            os("-C"),
            by_gnu.as_os_str(),
        ],
    );
    assert_same_tree(&src, &by_gnu);
    // GNU tar understood our sparse entry (old-GNU 'S' header) as sparse.
    assert!(blocks(&by_gnu.join("sparse")) * 512 < 1 << 20);
}

fn names_in(archive: &Path) -> BTreeSet<String> {
    let out = sh("tar", &[os("-I"), os("zstd"), os("-tf"), archive.as_os_str()]);
    String::from_utf8_lossy(&out)
        .lines()
        .map(|l| l.trim_start_matches("./").trim_end_matches('/').to_string())
        .collect()
}

#[test]
fn diff_holds_only_changes_and_base_plus_diff_is_the_tree() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::new(t.path().join("store"));
    let name: ImageName = "img".parse().unwrap();
    let tree = store.tree_dir(TreeKind::Image, &name);
    rich_tree(&tree);
    fs::create_dir_all(tree.join("var/old")).unwrap();
    fs::write(tree.join("var/old/gone"), b"bye").unwrap();
    fs::write(tree.join("var/unchanged"), b"same").unwrap();
    fs::write(tree.join("var/becomes-link"), b"file").unwrap();
    // Old mtimes on the parents, so the edits below are visible even within one second.
    for d in ["var", "etc", "usr", "."] {
        sh("touch", &[os("-d"), os("2020-01-01"), tree.join(d).as_os_str()]);
    }
    let opts = quiet();
    assert!(matches!(store.pack(TreeKind::Image, &name, &opts, None, false).unwrap(), PackOutcome::Packed { .. }));
    let base_archive = store.archive(TreeKind::Image, &name).unwrap();
    let base_copy = t.path().join("base.tar.zst");
    fs::copy(&base_archive, &base_copy).unwrap();
    // A node installed from the base.
    let node = t.path().join("node");
    fs::create_dir(&node).unwrap();
    unpack::unpack(fs::File::open(&base_copy).unwrap(), &node, &uquiet()).unwrap();

    // Modify, add, delete, change type, metadata and xattrs.
    fs::write(tree.join("etc/sub/data"), b"new content").unwrap();
    sh("chmod", &[os("0600"), tree.join("usr/bin/ping").as_os_str()]);
    sh("setcap", &[os("cap_net_admin+ep"), tree.join("usr/bin/ping").as_os_str()]);
    fs::create_dir(tree.join("var/new")).unwrap();
    fs::write(tree.join("var/new/file"), b"added").unwrap();
    fs::remove_dir_all(tree.join("var/old")).unwrap();
    fs::remove_file(tree.join("dangling")).unwrap();
    fs::remove_file(tree.join("var/becomes-link")).unwrap();
    std::os::unix::fs::symlink("unchanged", tree.join("var/becomes-link")).unwrap();
    fs::hard_link(tree.join("var/unchanged"), tree.join("var/unchanged.hl")).unwrap();
    sh("setfattr", &[os("-n"), os("user.checksum"), os("-v"), os("changed"), tree.join("etc/hostname").as_os_str()]);

    let d = store.diff(TreeKind::Image, &name, &opts, None).unwrap();
    let names = names_in(&d.archive);
    // The changed inode's every name travels (hard links share the xattr change).
    for want in [
        "etc/sub/data",
        "usr/bin/ping",
        "var/new",
        "var/new/file",
        "var/becomes-link",
        "var/unchanged.hl",
        "etc/hostname",
        "etc/hostname.link",
        "usr/hostname.2",
        ".si-appliance-diff-deletions",
    ] {
        assert!(names.contains(want), "{want} missing from diff: {names:?}");
    }
    for unchanged in ["sparse", "dev/null", "abs-link", "etc/sub", "var/unchanged"] {
        assert!(!names.contains(unchanged), "{unchanged} is in the diff: {names:?}");
    }
    assert_eq!(d.deleted, 3, "var/old, var/old/gone, dangling");
    let dm = Manifest::load(&store.archive_file(TreeKind::Image, &name, ".diff.manifest")).unwrap();

    // Diff applied to the node installed from base: exactly the tree.
    unpack::unpack_verified(fs::File::open(&d.archive).unwrap(), &node, &uquiet(), &dm).unwrap();
    assert_same_tree(&tree, &node);
    // base + diff on an empty root == fresh pack unpacked.
    let fresh_root = t.path().join("fresh");
    fs::create_dir(&fresh_root).unwrap();
    let fresh = t.path().join("fresh.tar.zst");
    pack_to_file(&tree, &fresh, &opts);
    unpack::unpack(fs::File::open(&fresh).unwrap(), &fresh_root, &uquiet()).unwrap();
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    unpack::unpack(fs::File::open(&base_copy).unwrap(), &empty, &uquiet()).unwrap();
    unpack::unpack(fs::File::open(&d.archive).unwrap(), &empty, &uquiet()).unwrap();
    assert_same_tree(&fresh_root, &empty);
    assert_same_tree(&tree, &empty);
}

// ---- hostile archives ----

/// A raw ustar header (test-only encoder, independent of the production writer).
fn raw_header(name: &[u8], typeflag: u8, link: &[u8], size: usize) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// (name, type flag, link target, data).
type RawEntry<'a> = (&'a [u8], u8, &'a [u8], &'a [u8]);

fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, ty, link, data) in entries {
        out.extend(raw_header(name, *ty, link, data.len()));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend([0u8; 1024]);
    out
}

/// Everything under `dir`, as relative paths.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            out.insert(p.strip_prefix(base).unwrap().to_path_buf());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn hostile_archives_are_refused_and_nothing_escapes() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"keep").unwrap();
    let outside_abs = outside.join("abs-written");
    let abs_name = outside_abs.as_os_str().as_bytes().to_vec();
    let outside_link = outside.as_os_str().as_bytes().to_vec();
    type Case = (&'static str, Vec<u8>, fn(&ImageError) -> bool);
    let cases: Vec<Case> = vec![
        ("traversal", raw_archive(&[(b"../x", b'0', b"", b"evil")]), |e| {
            matches!(e, ImageError::Refused { why: Refusal::DotDot, .. })
        }),
        ("nested traversal", raw_archive(&[(b"a/../../x", b'0', b"", b"evil")]), |e| {
            matches!(e, ImageError::Refused { why: Refusal::DotDot, .. })
        }),
        ("absolute", raw_archive(&[(&abs_name, b'0', b"", b"evil")]), |e| {
            matches!(e, ImageError::Refused { why: Refusal::AbsolutePath, .. })
        }),
        (
            "symlink escape then write through",
            raw_archive(&[(b"link", b'2', &outside_link, b""), (b"link/secret", b'0', b"", b"pwned")]),
            |e| matches!(e, ImageError::Refused { why: Refusal::ThroughSymlink(_), .. }),
        ),
        (
            "relative symlink escape then write through",
            raw_archive(&[(b"up", b'2', b"..", b""), (b"up/outside/secret", b'0', b"", b"pwned")]),
            |e| matches!(e, ImageError::Refused { why: Refusal::ThroughSymlink(_), .. }),
        ),
        ("hardlink to outside (relative)", raw_archive(&[(b"hl", b'1', b"../outside/secret", b"")]), |e| {
            matches!(e, ImageError::Refused { why: Refusal::HardLinkOutside(_), .. })
        }),
        (
            "hardlink to outside (absolute)",
            raw_archive(&[(b"hl", b'1', &[&outside_link[..], b"/secret"].concat(), b"")]),
            |e| matches!(e, ImageError::Refused { why: Refusal::HardLinkOutside(_), .. }),
        ),
        (
            "hardlink through a symlink",
            raw_archive(&[(b"link", b'2', &outside_link, b""), (b"hl", b'1', b"link/secret", b"")]),
            |e| matches!(e, ImageError::Refused { why: Refusal::ThroughSymlink(_), .. }),
        ),
        ("GNU volume label", raw_archive(&[(b"vol", b'V', b"", b"")]), |e| {
            matches!(e, ImageError::Refused { why: Refusal::UnsupportedType(b'V'), .. })
        }),
        (
            "misplaced deletion list",
            raw_archive(&[
                (b"a", b'0', b"", b"x"),
                (b"./.si-appliance-diff-deletions", b'0', b"", b"../outside/secret\0"),
            ]),
            |e| matches!(e, ImageError::Refused { why: Refusal::MisplacedDeletions, .. }),
        ),
        (
            "deletion outside",
            raw_archive(&[(b"./.si-appliance-diff-deletions", b'0', b"", b"../outside/secret\0")]),
            |e| matches!(e, ImageError::Refused { why: Refusal::DotDot, .. }),
        ),
    ];
    let before = listing(&outside);
    for (what, bytes, expected) in cases {
        let root = t.path().join("root");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir(&root).unwrap();
        for data in [bytes.clone(), zstd::encode_all(&bytes[..], 3).unwrap()] {
            let err = unpack::unpack(&data[..], &root, &uquiet()).expect_err(what);
            assert!(expected(&err), "{what}: unexpected error {err:#}");
            assert!(!format!("{err}").is_empty());
        }
        assert_eq!(listing(&outside), before, "{what} wrote outside");
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"keep", "{what}");
        assert!(!t.path().join("x").exists(), "{what}");
    }

    // Truncated and corrupt input from a real archive.
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut noise = Vec::new();
    for i in 0..400_000u32 {
        noise.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
    }
    fs::write(src.join("big"), &noise).unwrap();
    fs::write(src.join("small"), b"x").unwrap();
    let good = t.path().join("good.tar.zst");
    pack_to_file(&src, &good, &quiet());
    let bytes = fs::read(&good).unwrap();
    let plain = zstd::decode_all(&bytes[..]).unwrap();
    let root = t.path().join("root2");
    for (what, data) in [
        ("truncated zstd", bytes[..bytes.len() / 2].to_vec()),
        ("truncated tar", plain[..plain.len() / 2].to_vec()),
        ("truncated header", plain[..700].to_vec()),
        ("corrupt zstd frame", {
            let mut b = bytes.clone();
            let mid = b.len() / 2;
            for x in &mut b[mid..mid + 64] {
                *x ^= 0x5a;
            }
            b
        }),
        ("corrupt tar checksum", {
            let mut b = plain.clone();
            b[0] ^= 1;
            b
        }),
    ] {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir(&root).unwrap();
        let err = unpack::unpack(&data[..], &root, &uquiet()).expect_err(what);
        assert!(matches!(err, ImageError::ReadArchive { .. }), "{what}: {err:#}");
        assert_eq!(listing(&outside), before);
    }
}

#[test]
fn garbage_input_never_panics() {
    use proptest::prelude::*;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 128, ..ProptestConfig::default() });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..4096), |bytes| {
            let _ = fs::remove_dir_all(&root);
            fs::create_dir(&root).unwrap();
            let _ = unpack::unpack(&bytes[..], &root, &uquiet());
            let mut framed = raw_header(b"f", b'0', b"", bytes.len());
            framed.extend_from_slice(&bytes);
            let _ = unpack::unpack(&framed[..], &root, &uquiet());
            Ok(())
        })
        .unwrap();
}

#[test]
fn capture_uses_rsync_and_skips_pseudo_file_systems() {
    let t = tempfile::tempdir().unwrap();
    let golden = t.path().join("golden");
    rich_tree(&golden);
    for d in ["proc/1", "sys/kernel", "dev/pts", "run/lock", "tmp/junk", "var/cache/apt"] {
        fs::create_dir_all(golden.join(d)).unwrap();
    }
    fs::write(golden.join("proc/1/status"), b"pid").unwrap();
    fs::write(golden.join("tmp/junk/x"), b"tmp").unwrap();
    fs::write(golden.join("var/cache/apt/pkgcache.bin"), b"cache").unwrap();
    let store = Store::new(t.path().join("store"));
    let name: ImageName = "captured".parse().unwrap();
    fs::create_dir_all(store.root().join("excludes")).unwrap();
    fs::write(store.root().join("excludes/captured"), b"/var/cache/apt/*\n").unwrap();
    store.capture(&name, &CaptureSource::Local(golden.clone())).unwrap();
    let img = store.tree_dir(TreeKind::Image, &name);
    for kept in ["etc/hostname", "usr/bin/ping", "proc", "sys", "dev", "run", "tmp", "var/cache/apt"] {
        assert!(fs::symlink_metadata(img.join(kept)).is_ok(), "{kept} missing");
    }
    for gone in ["proc/1", "sys/kernel", "dev/null", "run/lock", "tmp/junk", "var/cache/apt/pkgcache.bin"] {
        assert!(fs::symlink_metadata(img.join(gone)).is_err(), "{gone} captured");
    }
    // What rsync copied keeps owners, hard links, xattrs and ACLs.
    similar("getfacl", &acl_listing(&golden.join("etc")), &acl_listing(&img.join("etc")));
    similar("getfattr", &xattr_listing(&golden.join("usr")), &xattr_listing(&img.join("usr")));
}

fn cli(store: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_si-appliance"))
        .arg("--store")
        .arg(store)
        .arg("image")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "image {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_import_pack_skip_unchanged_torrent_list_rm() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("store");
    let golden = t.path().join("golden");
    rich_tree(&golden);
    let announce = "--announce=http://10.9.8.7:8080/announce";
    assert!(cli(&store, &["import", "g", "--from", golden.to_str().unwrap()]).starts_with("imported"));
    assert_same_tree(&golden, &store.join("images/g"));
    let first = cli(&store, &["pack", "g", announce]);
    assert!(first.starts_with("packed:"), "{first}");
    let archive = store.join("archives/g.tar.zst");
    let before = fs::read(&archive).unwrap();
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let ino_before = ino(&archive);
    assert!(cli(&store, &["pack", "g", announce]).starts_with("unchanged:"));
    assert_eq!(ino(&archive), ino_before, "unchanged tree was rewritten");
    fs::write(store.join("images/g/etc/hostname"), b"changed\n").unwrap();
    assert!(cli(&store, &["pack", "g", announce]).starts_with("packed:"));
    assert_ne!(fs::read(&archive).unwrap(), before);
    // A diff against that base, with its own torrent.
    fs::write(store.join("images/g/etc/new-file"), b"new\n").unwrap();
    let d = cli(&store, &["diff", "g", announce]);
    assert!(d.starts_with("diff:") && d.contains("deleted"), "{d}");
    assert!(names_in(&store.join("archives/g.diff.tar.zst")).contains("etc/new-file"));
    assert!(fs::read(store.join("archives/g.diff.torrent")).unwrap().starts_with(b"d8:announce29:http://10.9.8.7"));
    assert!(cli(&store, &["pack", "g"]).starts_with("packed:"));
    let list = cli(&store, &["list"]);
    assert!(list.contains("image") && list.contains(" g ") && list.contains("info-hash "), "{list}");
    let tor = fs::read(store.join("archives/g.torrent")).unwrap();
    assert!(tor.windows(11).any(|w| w == b"7:privatei1"), "not private");
    let want = b"d8:announce29:http://10.9.8.7:8080/announce13:announce-listll29:http://10.9.8.7:8080/announceee4:info";
    assert!(tor.starts_with(want), "{}", String::from_utf8_lossy(&tor[..60.min(tor.len())]));
    // Import from the archive we made, then unpack with verification via the CLI.
    assert!(cli(&store, &["import", "g2", "--from", archive.to_str().unwrap()]).starts_with("imported"));
    assert_same_tree(&store.join("images/g"), &store.join("images/g2"));
    let out = t.path().join("out");
    let v = cli(
        &store,
        &[
            "unpack",
            archive.to_str().unwrap(),
            "--to",
            out.to_str().unwrap(),
            "--verify",
            store.join("archives/g.manifest").to_str().unwrap(),
        ],
    );
    assert!(v.contains("verified"), "{v}");
    // Change detection notices metadata-only changes.
    sh("chmod", &[os("0700"), store.join("images/g/etc/hostname").as_os_str()]);
    assert!(cli(&store, &["pack", "g"]).starts_with("packed:"));
    // Override trees live beside images and pack the same way.
    let ov = t.path().join("ov");
    fs::create_dir_all(ov.join("etc")).unwrap();
    fs::write(ov.join("etc/motd"), b"rack 7\n").unwrap();
    assert!(cli(&store, &["import", "rack7", "--override", "--from", ov.to_str().unwrap()]).starts_with("imported"));
    assert!(cli(&store, &["pack", "rack7", "--override", "--no-compress"]).starts_with("packed:"));
    assert!(store.join("archives/overrides/rack7.tar").is_file());
    assert!(cli(&store, &["list"]).contains("override  rack7"));
    cli(&store, &["rm", "g"]);
    assert!(!store.join("images/g").exists() && !archive.exists() && !store.join("archives/g.torrent").exists());
}

/// The cached debootstrap image (built by vm-tests/make-debian-image.sh on first use).
fn debian_image() -> PathBuf {
    common::debian_image()
}

#[test]
fn debootstrap_image_packs_unpacks_and_chroots() {
    let image = debian_image();
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("debian.tar.zst");
    let m = pack_to_file(&image, &archive, &quiet());
    assert!(m.entries.len() > 1000, "suspiciously small image: {} entries", m.entries.len());
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    unpack::unpack_verified(fs::File::open(&archive).unwrap(), &root, &uquiet(), &m).unwrap();
    assert_same_tree(&image, &root);
    let st = Command::new("timeout").args([os("60"), os("chroot"), root.as_os_str(), os("true")]).status().unwrap();
    assert!(st.success(), "chroot {} true failed", root.display());
    let out = Command::new("timeout")
        .args([os("60"), os("chroot"), root.as_os_str(), os("dpkg-query"), os("-W"), os("base-files")])
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("base-files"));
}

/// A ustar header block for `name` (`typeflag` b'0' file, b'5' directory) of `size` bytes.
fn ustar_header(name: &str, typeflag: u8, mode: u32, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let field = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0w$o}\0", w = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    field(&mut h, 100, 8, u64::from(mode));
    field(&mut h, 108, 8, 0);
    field(&mut h, 116, 8, 0);
    field(&mut h, 124, 12, size);
    field(&mut h, 136, 12, 0);
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// Issue 13: an archive the unpacker refuses part-way (here: a `../` entry after a directory
/// and a 256 KiB file of mode 0600) left its first entries in the target. `image unpack` into a
/// new or empty directory now removes what it wrote; into a directory that held files it says
/// that what was written stays.
#[test]
fn refused_archive_leaves_no_partial_tree() {
    let t = tempfile::tempdir().unwrap();
    let mut tar = Vec::new();
    tar.extend_from_slice(&ustar_header("dir/", b'5', 0o500, 0));
    tar.extend_from_slice(&ustar_header("dir/huge256.bin", b'0', 0o600, 256 << 10));
    tar.extend(std::iter::repeat_n(0x42u8, 256 << 10));
    tar.extend_from_slice(&ustar_header("../escape", b'0', 0o644, 0));
    tar.extend(std::iter::repeat_n(0u8, 1024));
    let archive = t.path().join("bad.tar");
    fs::write(&archive, &tar).unwrap();
    let run = |to: &Path| {
        Command::new(env!("CARGO_BIN_EXE_si-appliance"))
            .args(["--store"])
            .arg(t.path().join("store"))
            .args(["image", "unpack"])
            .arg(&archive)
            .arg("--to")
            .arg(to)
            .output()
            .unwrap()
    };
    // A new target: refused, and nothing is left of it.
    let fresh = t.path().join("new");
    let out = run(&fresh);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("escape"), "{err}");
    assert!(err.contains("nothing was left"), "{err}");
    let left: Vec<_> = fs::read_dir(&fresh).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "partial tree left: {left:?}");
    assert!(!t.path().join("escape").exists());
    // A target that held files keeps them, and what the archive wrote, and says so.
    let full = t.path().join("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("mine"), b"x").unwrap();
    let out = run(&full);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("held files before"), "{err}");
    assert!(full.join("mine").exists());
}
