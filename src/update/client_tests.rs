use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as AxPath, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;

use super::*;
use crate::types::ImageName;
use crate::types::node_api::StepReport;

const MAC: &str = "52:54:00:aa:bb:01";

fn creds(server: SocketAddr) -> NodeCredentials {
    NodeCredentials { server, mac: MAC.parse().unwrap(), token: "node-token".into(), iface: None }
}

fn manifest_of(tree: &Path) -> Manifest {
    use crate::image::{pack, scan};
    let nodes = scan::scan(tree, &scan::ScanOptions::default()).unwrap();
    let digests = pack::digests_for(tree, &nodes, &Default::default(), true).unwrap().unwrap_or_default();
    pack::manifest_of(&nodes, &digests, pack::full_header(&Default::default()))
}

#[test]
fn credentials_are_written_private_read_back_and_refused_when_others_can_read_them() {
    let d = tempfile::tempdir().unwrap();
    let c = creds("10.1.2.3:8080".parse().unwrap());
    write_credentials(d.path(), &c).unwrap();
    let p = credentials_path(d.path());
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(read_credentials(d.path()).unwrap(), c);
    // Flags override the file.
    let r = resolve(d.path(), Some("127.0.0.1:9".parse().unwrap()), None, Some("other".into())).unwrap();
    assert_eq!((r.server.port(), r.mac, r.token.as_str()), (9, c.mac, "other"));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = read_credentials(d.path()).unwrap_err();
    assert!(matches!(e, ClientError::CredentialsMode { mode: 0o644, .. }), "{e}");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&p, "{\"server\":\"10.1.2.3:8080\",\"mac\":\"nope\",\"token\":\"t\"}").unwrap();
    let e = read_credentials(d.path()).unwrap_err().to_string();
    assert!(e.contains("node.json") && e.contains("MAC"), "{e}");
    std::fs::write(&p, "{\"server\":\"10.1.2.3:8080\",\"mac\":\"52:54:00:aa:bb:01\",\"token\":\"t\",\"extra\":1}").unwrap();
    assert!(read_credentials(d.path()).is_err(), "unknown fields are refused");
    // Without the file: all three flags, or an error naming the file.
    let e2 = tempfile::tempdir().unwrap();
    let all = resolve(e2.path(), Some("127.0.0.1:9".parse().unwrap()), Some(c.mac), Some("t".into())).unwrap();
    assert_eq!((all.token.as_str(), all.iface), ("t", None));
    let e = resolve(e2.path(), Some("127.0.0.1:9".parse().unwrap()), None, None).unwrap_err().to_string();
    assert!(e.contains("node.json"), "{e}");
}

#[test]
fn the_interface_is_found_by_mac_skipping_bridge_ports() {
    let d = tempfile::tempdir().unwrap();
    let mk = |name: &str, addr: &str| {
        std::fs::create_dir_all(d.path().join(name)).unwrap();
        std::fs::write(d.path().join(name).join("address"), format!("{addr}\n")).unwrap();
    };
    mk("lo", "00:00:00:00:00:00");
    mk("eth0", "52:54:00:aa:bb:02");
    mk("br0", "52:54:00:AA:BB:01");
    mk("aa-port", "52:54:00:aa:bb:01");
    std::os::unix::fs::symlink("../br0", d.path().join("aa-port/master")).unwrap();
    let mac: MacAddr = MAC.parse().unwrap();
    assert_eq!(iface_by_mac(d.path(), mac).as_deref(), Some("br0"), "the bridge, not its port");
    std::fs::remove_file(d.path().join("aa-port/master")).unwrap();
    assert_eq!(iface_by_mac(d.path(), mac).as_deref(), Some("aa-port"), "first by name");
    assert_eq!(iface_by_mac(d.path(), "52:54:00:00:00:09".parse().unwrap()), None);
    assert_eq!(iface_by_mac(&d.path().join("absent"), mac), None);
}

#[test]
fn the_offered_manifest_must_hash_to_the_offers_digest() {
    use sha2::Digest as _;
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), "x").unwrap();
    let bytes = manifest_of(d.path()).to_bytes();
    let want = hex::encode(sha2::Sha256::digest(&bytes));
    assert_eq!(check_manifest(&bytes, &want).unwrap().to_bytes(), bytes);
    let mut other = bytes.clone();
    other.push(b'\n');
    let e = check_manifest(&other, &want).unwrap_err();
    assert!(matches!(e, ClientError::ManifestDigest { .. }) && e.to_string().contains("nothing was changed"), "{e}");
    assert!(check_manifest(b"garbage", &hex::encode(sha2::Sha256::digest(b"garbage"))).is_err());
}

fn target(kind: UpdateKind, manifest: &str, base: Option<&str>) -> UpdateTarget {
    UpdateTarget {
        image: "demo".parse().unwrap(),
        kind,
        name: "demo-v2.diff".parse::<ImageName>().unwrap(),
        bytes: 1000,
        manifest_sha256: manifest.into(),
        base_manifest_sha256: base.map(str::to_owned),
    }
}

#[test]
fn offers_are_acted_on_only_when_ordered_or_asked_and_only_from_the_right_base() {
    let have = "aa".repeat(32);
    let new = "bb".repeat(32);
    let prof = NodeProfile { group: "web".into(), overlay: false, steps: vec![ProfileStep::Script("a.sh".into())], step_timeout_secs: 5 };
    let offer = |ordered, t: Option<UpdateTarget>, p: Option<NodeProfile>| UpdateOffer { ordered, target: t, profile: p, poll_secs: 60 };
    let diff = target(UpdateKind::Diff, &new, Some(&have));
    let full = target(UpdateKind::Full, &new, None);
    let rows: Vec<(UpdateOffer, bool, &str)> = vec![
        (offer(false, Some(diff.clone()), None), false, "idle"),
        (offer(false, Some(diff.clone()), None), true, "act"),
        (offer(true, Some(diff.clone()), None), false, "act"),
        (offer(true, Some(full.clone()), None), false, "act"),
        (offer(true, Some(target(UpdateKind::Diff, &new, Some(&"cc".repeat(32)))), None), false, "refuse"),
        (offer(true, Some(target(UpdateKind::Diff, &new, None)), None), false, "refuse"),
        (offer(true, Some(target(UpdateKind::Full, &have, None)), None), false, "idle"),
        (offer(true, None, None), false, "idle"),
        (offer(true, None, Some(prof.clone())), false, "act"),
        (offer(true, Some(target(UpdateKind::Full, &have, None)), Some(prof.clone())), false, "act"),
        (offer(false, None, Some(prof.clone())), false, "idle"),
    ];
    for (i, (o, asked, want)) in rows.iter().enumerate() {
        let got = decide(o, &have, *asked);
        let kind = match &got {
            Decision::Idle(_) => "idle",
            Decision::Refuse(_) => "refuse",
            Decision::Act { .. } => "act",
        };
        assert_eq!(kind, *want, "row {i}: {got:?}");
    }
    // A target the node runs is dropped, the profile kept.
    match decide(&rows[9].0, &have, false) {
        Decision::Act { target, profile } => assert!(target.is_none() && profile.is_some()),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A stand-in for the appliance's node API (no swarm: its torrent route answers 404).

#[derive(Default)]
struct Fake {
    offer: Mutex<Option<UpdateOffer>>,
    manifest: Mutex<Vec<u8>>,
    scripts: Mutex<HashMap<String, String>>,
    gets: Mutex<Vec<String>>,
    results: Mutex<Vec<UpdateResult>>,
    unauthorized: Mutex<u32>,
}

fn authorized(f: &Fake, h: &HeaderMap) -> bool {
    let ok = h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer node-token");
    if !ok {
        *f.unauthorized.lock().unwrap() += 1;
    }
    ok
}

async fn fake_appliance(f: Arc<Fake>) -> SocketAddr {
    async fn offer(State(f): State<Arc<Fake>>, AxPath(mac): AxPath<String>, RawQuery(q): RawQuery, h: HeaderMap) -> Result<axum::Json<UpdateOffer>, StatusCode> {
        if !authorized(&f, &h) || mac != MAC {
            return Err(StatusCode::FORBIDDEN);
        }
        f.gets.lock().unwrap().push(q.unwrap_or_default());
        f.offer.lock().unwrap().clone().map(axum::Json).ok_or(StatusCode::NOT_FOUND)
    }
    async fn manifest(State(f): State<Arc<Fake>>, h: HeaderMap) -> Result<Vec<u8>, StatusCode> {
        if !authorized(&f, &h) {
            return Err(StatusCode::FORBIDDEN);
        }
        Ok(f.manifest.lock().unwrap().clone())
    }
    async fn result(State(f): State<Arc<Fake>>, h: HeaderMap, axum::Json(r): axum::Json<UpdateResult>) -> StatusCode {
        if !authorized(&f, &h) {
            return StatusCode::FORBIDDEN;
        }
        f.results.lock().unwrap().push(r);
        StatusCode::NO_CONTENT
    }
    async fn script(State(f): State<Arc<Fake>>, AxPath((_, name)): AxPath<(String, String)>, h: HeaderMap) -> Result<String, StatusCode> {
        if !authorized(&f, &h) {
            return Err(StatusCode::FORBIDDEN);
        }
        f.scripts.lock().unwrap().get(&name).cloned().ok_or(StatusCode::NOT_FOUND)
    }
    let app = axum::Router::new()
        .route("/api/nodes/{mac}/update", get(offer).post(result))
        .route("/api/nodes/{mac}/update/manifest", get(manifest))
        .route("/api/nodes/{mac}/scripts/{name}", get(script))
        .with_state(f);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// An installed stand-in (`root`) and a changed version of it (its manifest).
struct Node {
    _dir: tempfile::TempDir,
    root: PathBuf,
    have: String,
    target_bytes: Vec<u8>,
    target_sha: String,
}

fn node() -> Node {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let v2 = dir.path().join("v2");
    for t in [&root, &v2] {
        std::fs::create_dir_all(t.join("etc")).unwrap();
        std::fs::write(t.join("etc/hostname"), "node07\n").unwrap();
        std::fs::write(t.join("etc/app.conf"), "version=1\n").unwrap();
    }
    std::fs::write(v2.join("etc/app.conf"), "version=2\n").unwrap();
    std::fs::write(v2.join("etc/new"), "new\n").unwrap();
    let m1 = manifest_of(&root);
    let m2 = manifest_of(&v2);
    crate::update::record_installed(&root, "demo", &m1).unwrap();
    let target_bytes = m2.to_bytes();
    let target_sha = hex::encode(sha2::Sha256::digest(&target_bytes));
    Node { _dir: dir, root, have: m1.digest(), target_bytes, target_sha }
}

fn opts(root: &Path) -> ClientOptions {
    ClientOptions {
        root: root.to_owned(),
        sys_net: root.join("no-sysfs"),
        iface: None,
        listen_port: 0,
        excludes: Excludes::defaults(),
        stall_limit: Duration::from_secs(5),
        seed_limit: Duration::from_secs(1),
    }
}

#[tokio::test]
async fn a_failed_fetch_leaves_the_tree_untouched_and_is_reported() {
    let n = node();
    let f = Arc::new(Fake::default());
    *f.manifest.lock().unwrap() = n.target_bytes.clone();
    let mut t = target(UpdateKind::Full, &n.target_sha, None);
    t.name = "demo-v2".parse().unwrap();
    *f.offer.lock().unwrap() = Some(UpdateOffer { ordered: true, target: Some(t), profile: None, poll_secs: 60 });
    let server = fake_appliance(f.clone()).await;
    let mtime = mtime_of(&n.root);
    let dry = once(&opts(&n.root), &creds(server), true, &CancellationToken::new()).await.unwrap();
    match dry {
        OneShot::DryRun { plan, .. } => {
            // (`etc` and the root itself are changed too when the two trees' directories got
            // different mtimes: seen in a CI run, `.`.)
            assert_eq!(plan.added, ["etc/new"], "{plan:?}");
            assert!(plan.changed.contains(&"etc/app.conf".to_owned()) && plan.changed.iter().all(|p| p == "." || p == "etc" || p == "etc/app.conf"), "{plan:?}");
            assert!(plan.excluded.iter().all(|p| p == "etc/hostname"), "{plan:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(f.results.lock().unwrap().is_empty(), "a dry run reports nothing");
    let out = once(&opts(&n.root), &creds(server), false, &CancellationToken::new()).await.unwrap();
    let OneShot::Done(r) = out else { panic!("{out:?}") };
    assert!(!r.ok, "{r:?}");
    let e = r.error.clone().unwrap();
    assert!(e.contains("demo-v2") && e.contains("nothing was changed") && e.contains("404"), "{e}");
    assert_eq!((r.from_manifest_sha256.as_str(), r.manifest_sha256.as_str()), (n.have.as_str(), n.have.as_str()));
    assert_eq!(f.results.lock().unwrap().as_slice(), [r]);
    assert_eq!(std::fs::read_to_string(n.root.join("etc/app.conf")).unwrap(), "version=1\n");
    assert!(!n.root.join("etc/new").exists() && !n.root.join(WORK_DIR).exists());
    assert_eq!(mtime_of(&n.root), mtime, "the root's mtime is given back");
    assert_eq!(installed_digest(&n.root).unwrap().manifest_sha256, n.have);
    let gets = f.gets.lock().unwrap().clone();
    assert_eq!(gets, [format!("have={}&asked=1", n.have), format!("have={}&asked=1", n.have)]);
    assert_eq!(*f.unauthorized.lock().unwrap(), 0);
}

#[tokio::test]
async fn a_manifest_that_is_not_the_offered_one_is_refused_before_fetching() {
    let n = node();
    let f = Arc::new(Fake::default());
    let mut bad = n.target_bytes.clone();
    bad.extend_from_slice(b"\n");
    *f.manifest.lock().unwrap() = bad;
    *f.offer.lock().unwrap() = Some(UpdateOffer { ordered: true, target: Some(target(UpdateKind::Full, &n.target_sha, None)), profile: None, poll_secs: 60 });
    let server = fake_appliance(f.clone()).await;
    let OneShot::Done(r) = once(&opts(&n.root), &creds(server), false, &CancellationToken::new()).await.unwrap() else { panic!() };
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("hashes to"), "{r:?}");
    assert_eq!(std::fs::read_to_string(n.root.join("etc/app.conf")).unwrap(), "version=1\n");
}

#[tokio::test]
async fn profile_steps_run_live_and_the_failing_one_is_named() {
    let n = node();
    let f = Arc::new(Fake::default());
    let mark = n.root.join("ran-10");
    f.scripts.lock().unwrap().insert("10-ok.sh".into(), format!("#!/bin/sh\necho \"$SI_GROUP $SI_HOSTNAME $SI_MAC\" > '{}'\n", mark.display()));
    f.scripts.lock().unwrap().insert("20-bad.sh".into(), "#!/bin/sh\necho cannot >&2\nexit 4\n".into());
    f.scripts.lock().unwrap().insert("30-never.sh".into(), format!("#!/bin/sh\ntouch '{}'\n", n.root.join("ran-30").display()));
    let steps = ["10-ok.sh", "20-bad.sh", "30-never.sh"].map(|s| ProfileStep::Script(s.into())).to_vec();
    *f.offer.lock().unwrap() = Some(UpdateOffer {
        ordered: true,
        target: None,
        profile: Some(NodeProfile { group: "web".into(), overlay: false, steps, step_timeout_secs: 20 }),
        poll_secs: 60,
    });
    let server = fake_appliance(f.clone()).await;
    let OneShot::Done(r) = once(&opts(&n.root), &creds(server), false, &CancellationToken::new()).await.unwrap() else { panic!() };
    assert!(!r.ok, "{r:?}");
    assert!(r.error.as_deref().unwrap_or("").contains("20-bad.sh"), "{r:?}");
    let names: Vec<(&str, bool, Option<i32>)> = r.steps.iter().map(|s: &StepReport| (s.name.as_str(), s.ok, s.exit_code)).collect();
    assert_eq!(names, [("10-ok.sh", true, Some(0)), ("20-bad.sh", false, Some(4))]);
    assert!(r.steps[1].output.contains("cannot"), "{r:?}");
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), format!("web node07 {MAC}\n"));
    assert!(!n.root.join("ran-30").exists(), "steps after the failing one do not run");
    assert_eq!(f.results.lock().unwrap().len(), 1);
    assert!(!n.root.join(WORK_DIR).exists());
}

#[tokio::test]
async fn the_agent_polls_without_asking_and_acts_only_on_orders() {
    let n = node();
    let f = Arc::new(Fake::default());
    *f.manifest.lock().unwrap() = n.target_bytes.clone();
    *f.offer.lock().unwrap() = Some(UpdateOffer { ordered: false, target: Some(target(UpdateKind::Full, &n.target_sha, None)), profile: None, poll_secs: 1 });
    let server = fake_appliance(f.clone()).await;
    let token = CancellationToken::new();
    let t2 = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        t2.cancel();
    });
    tokio::time::timeout(Duration::from_secs(20), watch(&opts(&n.root), &creds(server), None, &token)).await.expect("the agent stops on cancel").unwrap();
    let gets = f.gets.lock().unwrap().clone();
    assert!((1..=4).contains(&gets.len()), "one poll a second, never a tight loop: {gets:?}");
    assert!(gets.iter().all(|q| *q == format!("have={}", n.have)), "{gets:?}");
    assert!(f.results.lock().unwrap().is_empty(), "nothing ordered, nothing done");
    // An unreachable appliance: the agent backs off (5 s), it does not spin.
    // (A listener held for the test that closes every connection at once: a freed port could
    // be taken by another test's stand-in, which this agent would then poll.)
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closer.local_addr().unwrap();
    let closes = Arc::new(Mutex::new(0u32));
    let c2 = closes.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = closer.accept().await {
            *c2.lock().unwrap() += 1;
            drop(s);
        }
    });
    let token = CancellationToken::new();
    let t2 = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        t2.cancel();
    });
    let t0 = Instant::now();
    watch(&opts(&n.root), &creds(dead), Some(Duration::from_secs(1)), &token).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(*closes.lock().unwrap(), 1, "one attempt, then a 5 s backoff (not the 1 s poll)");
    // Without an installed record the agent refuses to start.
    let e = tempfile::tempdir().unwrap();
    assert!(matches!(watch(&opts(e.path()), &creds(server), None, &CancellationToken::new()).await, Err(ClientError::NoRecord { .. })));
}

// ---------------------------------------------------------------------------------------------
// The whole path on loopback: a stand-in appliance serving the diff's .torrent and swarm view,
// our own engine seeding the diff (the appliance's seed), the client fetching and applying it.

#[derive(Default)]
struct Swarm {
    torrent: Vec<u8>,
    view: serde_json::Value,
}

async fn fake_with_swarm(f: Arc<Fake>, s: Arc<Swarm>) -> SocketAddr {
    let api = fake_appliance(f).await;
    let s2 = s.clone();
    let app = axum::Router::new()
        .route("/torrents/{file}", get(move || { let s = s.clone(); async move { s.torrent.clone() } }))
        .route("/api/swarm/{name}", get(move || { let s = s2.clone(); async move { axum::Json(s.view.clone()) } }))
        .fallback(move |req: axum::extract::Request| async move {
            // The node API goes on to the other stand-in (same token checks).
            let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let bearer = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::to_owned);
            let method = if req.method() == axum::http::Method::POST { "POST" } else { "GET" };
            let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap_or_default();
            let r = http_client::request(api, Request { method, path: &path, bearer: bearer.as_deref(), json: (method == "POST").then_some(&body[..]) }, 64 << 20, Duration::from_secs(10))
                .await
                .unwrap();
            (StatusCode::from_u16(r.status).unwrap(), r.body)
        });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_diff_is_fetched_through_the_swarm_applied_and_reported() {
    use crate::image::pack::PackOptions;
    use crate::image::progress::ProgressMode;
    use crate::image::store::{Store, TreeKind};
    use crate::swarm::engine::{DEFAULT_DEPTH, Engine, EngineOptions, Meta};
    let dir = tempfile::tempdir().unwrap();
    let popts = PackOptions { progress: ProgressMode::Off, ..PackOptions::default() };
    let store = Store::new(dir.path().join("store"));
    let name: ImageName = "img".parse().unwrap();
    let tree = store.tree_dir(TreeKind::Image, &name);
    let write = |rel: &str, text: &str| {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("etc/app.conf", "threads = 1\n");
    write("etc/hostname", "golden\n");
    write("usr/share/old/readme", "old\n");
    write("usr/bin/big", &"x".repeat(300_000));
    store.pack(TreeKind::Image, &name, &popts, None, true).unwrap();
    // The node, installed from v1.
    let root = dir.path().join("node");
    std::fs::create_dir_all(&root).unwrap();
    let a1 = store.archive(TreeKind::Image, &name).unwrap();
    crate::image::unpack::unpack(std::fs::File::open(a1).unwrap(), &root, &crate::image::unpack::UnpackOptions::default()).unwrap();
    let m1 = Manifest::load(&store.archive_file(TreeKind::Image, &name, ".manifest")).unwrap();
    crate::update::record_installed(&root, "img", &m1).unwrap();
    std::fs::write(root.join("etc/hostname"), "node07\n").unwrap();
    let root_mtime = mtime_of(&root);
    // v2 and its diff.
    write("etc/app.conf", "threads = 8\n");
    write("etc/hostname", "golden-v2\n");
    write("usr/bin/new-tool", "new\n");
    std::fs::remove_dir_all(tree.join("usr/share/old")).unwrap();
    let d = store.diff(TreeKind::Image, &name, &popts, None).unwrap();
    let man_bytes = std::fs::read(store.archive_file(TreeKind::Image, &name, ".diff.manifest")).unwrap();
    let m2 = Manifest::parse(&man_bytes, Path::new("m")).unwrap();
    // The appliance's seed: our engine on the finished diff.
    let t = crate::image::torrent::make(&d.archive, "img.diff.tar.zst", "http://127.0.0.1:9/announce").unwrap();
    let meta = Meta::from_torrent(&t.bytes).unwrap();
    let seed_tok = CancellationToken::new();
    let eopts = EngineOptions { listen: "127.0.0.1:0".parse().unwrap(), iface: None, peers: vec![], trusted: vec![], tracker: None, depth: DEFAULT_DEPTH, label: "seed".into() };
    let seed = Engine::start(meta, &d.archive, eopts, &seed_tok).await.unwrap();
    assert!(seed.stats().finished);
    let size = std::fs::metadata(&d.archive).unwrap().len();
    let view = serde_json::json!({
        "name": "img.diff", "info_hash": t.info_hash, "size": size, "seed_addr": format!("127.0.0.1:{}", seed.port()),
        "seed_uploaded_bytes": 0, "complete": 1, "incomplete": 0, "seed_peers": 0, "done": true, "seed_limit_secs": 5,
    });
    let f = Arc::new(Fake::default());
    *f.manifest.lock().unwrap() = man_bytes.clone();
    let target = UpdateTarget {
        image: name.clone(),
        kind: UpdateKind::Diff,
        name: "img.diff".parse().unwrap(),
        bytes: size,
        manifest_sha256: { use sha2::Digest as _; hex::encode(sha2::Sha256::digest(&man_bytes)) },
        base_manifest_sha256: Some(m1.digest()),
    };
    *f.offer.lock().unwrap() = Some(UpdateOffer { ordered: true, target: Some(target), profile: None, poll_secs: 60 });
    let server = fake_with_swarm(f.clone(), Arc::new(Swarm { torrent: t.bytes.clone(), view })).await;
    let out = tokio::time::timeout(Duration::from_secs(60), once(&opts(&root), &creds(server), false, &CancellationToken::new())).await.unwrap().unwrap();
    let OneShot::Done(r) = out else { panic!("{out:?}") };
    assert!(r.ok, "{r:?}");
    // Changed: etc/app.conf and the directories whose entries changed (usr/bin, usr/share, when
    // their mtimes moved past the file system's timestamp granularity).
    assert_eq!((r.added, r.deleted, r.excluded), (1, 2, 1), "{r:?}");
    assert!((1..=3).contains(&r.changed), "{r:?}");
    assert_eq!((r.fetched_bytes, r.manifest_sha256.as_str(), r.from_manifest_sha256.as_str()), (size, crate::update::version_of(&m2).digest().as_str(), m1.digest().as_str()), "the version the diff brings the node to");
    assert_eq!(f.results.lock().unwrap().as_slice(), [r]);
    assert_eq!(std::fs::read_to_string(root.join("etc/app.conf")).unwrap(), "threads = 8\n");
    assert_eq!(std::fs::read_to_string(root.join("usr/bin/new-tool")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "node07\n", "excluded");
    assert!(!root.join("usr/share/old").exists());
    assert!(!root.join(WORK_DIR).exists(), "the archive and its directory are removed");
    assert_eq!(installed_digest(&root).unwrap().manifest_sha256, crate::update::version_of(&m2).digest());
    // The root's mtime is the target's (when its manifest has the root), else what it was:
    // not the time .si-appliance was removed.
    let want = m2.entries.iter().find(|e| e.path == ".").map(|e| filetime::FileTime::from_unix_time(e.mtime, e.mtime_ns)).or(root_mtime);
    assert_eq!(mtime_of(&root), want);
    seed.stop().await;
}
