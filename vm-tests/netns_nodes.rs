//! Enrolment and the node book against real clients in network namespaces: a PXE client that
//! is not enrolled (busybox udhcpc with vendor class PXEClient) is shown as discovered, its
//! boot script and pxelinux config boot the local disk, its plan is refused (403, logged);
//! `si-appliance node add` enrols it and its script then boots the installer; an installer
//! report of `seeding` makes it installed (local boot again), which survives `kill -9` of the
//! appliance; `node reimage` makes the next boot an install; a failed install's console is
//! printed by `node log`; the admin routes refuse a host without the admin token.
//!
//! Run as root: `cargo nextest run --release --profile ci -E 'binary(netns_nodes)'`.
mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::{Lab, Proc, start_appliance, strip_ansi, wait_for};
use si_appliance::types::{MacAddr, NodeToken};

const T: Duration = Duration::from_secs(20);
const SERVER: &str = "10.68.0.1";
const NODE_MAC: &str = "02:68:00:00:01:01";
const LISTED_MAC: &str = "02:68:00:00:02:02";

fn config(lab: &Lab) -> String {
    format!(
        "iface = \"eth0\"\nimage = \"tiny\"\nstate_dir = \"{state}\"\nstore = \"{store}\"\n\
         [dhcp]\nprobe = false\n\
         [[dhcp.pool]]\nsubnet = \"10.68.0.0/24\"\nrange = [\"10.68.0.100\", \"10.68.0.150\"]\n\
         [[dhcp.reservation]]\nmac = \"{LISTED_MAC}\"\nhostname = \"listed\"\ngroup = \"rack1\"\n\
         [http]\nport = 8080\n[tftp]\nenable = true\nport = 6969\n\
         [swarm]\nlisten_port = 6882\n",
        state = lab.path("state").display(),
        store = lab.path("store").display(),
    )
}

/// `si-appliance node …` in the appliance's namespace (it reads the admin token from the state
/// directory and talks to 127.0.0.1:8080).
fn node_cmd(lab: &Lab, args: &[&str]) -> (bool, String) {
    let out = lab.hosts[0]
        .cmd(common::appliance_bin())
        .args(["--state-dir"])
        .arg(lab.path("state"))
        .args(["--http-port", "8080", "node"])
        .args(args)
        .output()
        .expect("si-appliance node");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// curl from host `h`: (HTTP status, body).
fn curl(lab: &Lab, h: usize, args: &[&str], url: &str) -> (u16, String) {
    let out = lab.hosts[h]
        .cmd("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn token(lab: &Lab, mac: MacAddr) -> String {
    let secret = fs::read(lab.path("state").join("secret")).expect("appliance secret");
    NodeToken::derive(&secret, mac).as_str().to_owned()
}

fn script(lab: &Lab, mac: MacAddr) -> String {
    let (code, body) = curl(lab, 1, &[], &format!("http://{SERVER}:8080/boot/{}.ipxe", mac.hyphenated()));
    assert_eq!(code, 200, "{body}");
    body
}

fn plan(lab: &Lab, mac: MacAddr) -> (u16, String) {
    let auth = format!("Authorization: Bearer {}", token(lab, mac));
    curl(lab, 1, &["-H", &auth], &format!("http://{SERVER}:8080/api/nodes/{mac}/plan?firmware=bios"))
}

fn report(lab: &Lab, mac: MacAddr, body: &str) -> u16 {
    let auth = format!("Authorization: Bearer {}", token(lab, mac));
    let url = format!("http://{SERVER}:8080/api/nodes/{mac}/report");
    curl(lab, 1, &["-H", &auth, "-H", "Content-Type: application/json", "--data-binary", body], &url).0
}

/// busybox udhcpc on host `h` as a PXE ROM would ask (vendor class PXEClient), once; the
/// environment its script saw at `bound` (boot_file=, ip=, …). The address is not configured.
fn pxe_udhcpc(lab: &Lab, h: usize) -> String {
    use std::os::unix::fs::PermissionsExt;
    let ev = lab.path(&format!("udhcpc{h}.env"));
    let hook = lab.path(&format!("udhcpc{h}.sh"));
    fs::write(&hook, format!("#!/bin/sh\nenv | sort > {}.$1\nexit 0\n", ev.display())).unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let out = lab.hosts[h]
        .cmd("udhcpc")
        .args(["-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "2", "-V", "PXEClient:Arch:00000:UNDI:002001", "-s"])
        .arg(&hook)
        .output()
        .expect("udhcpc");
    assert!(out.status.success(), "udhcpc: {}", String::from_utf8_lossy(&out.stderr));
    fs::read_to_string(format!("{}.bound", ev.display())).unwrap_or_default()
}

fn log(p: &Proc) -> String {
    strip_ansi(&p.log_text())
}

fn node_json(lab: &Lab, mac: MacAddr) -> serde_json::Value {
    let (code, body) = curl(lab, 0, &[], &format!("http://127.0.0.1:8080/api/nodes/{mac}"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("node JSON")
}

#[test]
fn unenrolled_pxe_clients_boot_locally_until_added_and_installed_nodes_stay_local() {
    let mut lab = Lab::new("nb");
    lab.add_host(Some(&format!("{SERVER}/24")), Some("02:68:00:00:00:01"));
    lab.add_host(None, Some(NODE_MAC));
    let mac: MacAddr = NODE_MAC.parse().unwrap();
    // A tiny image, packed at start, so plans can be handed out.
    let tree = lab.path("tiny-tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), "tiny\n").unwrap();
    common::run(
        Command::new(common::appliance_bin()).arg("--store").arg(lab.path("store")).args(["image", "import", "tiny", "--from"]).arg(&tree),
    );
    let mut app = start_appliance(&lab, 0, "app", &config(&lab), &[]);
    assert!(log(&app).contains("admin token"), "{}", log(&app));

    // 1. A PXE ROM that is not enrolled: udhcpc with the PXE vendor class gets an address and
    //    the boot loader (the ROM's only way to a script), and the appliance lists it as
    //    discovered.
    let bound = pxe_udhcpc(&lab, 1);
    assert!(bound.contains("boot_file=undionly.kpxe"), "{bound}");
    // The hook only records: configure the address it was given, as a ROM would use it.
    let ip = bound.lines().find_map(|l| l.strip_prefix("ip=")).unwrap_or_else(|| panic!("{bound}"));
    lab.hosts[1].ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    let ok = wait_for(T, || (node_json(&lab, mac)["enrolment"] == "discovered").then_some(()));
    assert!(ok.is_some(), "{}", node_json(&lab, mac));
    let (ok, list) = node_cmd(&lab, &["list"]);
    assert!(ok, "{list}");
    assert!(list.contains("discovered (not enrolled") && list.contains(NODE_MAC) && list.contains("PXEClient"), "{list}");
    assert!(list.contains(LISTED_MAC) && list.contains("listed") && list.contains("config"), "{list}");

    // Its script and pxelinux config boot the local disk; its plan is refused and logged.
    let s = script(&lab, mac);
    assert!(s.contains("\nexit 1\n") && !s.contains("kernel") && !s.contains("si.token"), "{s}");
    let cfg = lab.hosts[1]
        .cmd("tftp")
        .args([SERVER, "6969", "-c", "get", &format!("pxelinux.cfg/01-{}", mac.hyphenated())])
        .arg(lab.path("pxe.cfg"))
        .output()
        .expect("tftp");
    assert!(cfg.status.success(), "tftp: {}", String::from_utf8_lossy(&cfg.stderr));
    let pxe = fs::read_to_string(lab.path("pxe.cfg")).unwrap();
    assert!(pxe.contains("LOCALBOOT 0") && !pxe.contains("si.token"), "{pxe}");
    let (code, body) = plan(&lab, mac);
    assert_eq!(code, 403, "{body}");
    // The dashboard, opened with the admin token in its URL, offers "enrol" for it.
    let admin = fs::read_to_string(lab.path("state").join("admin-token")).unwrap();
    let dom = common::chromium(&lab, 1, &format!("http://{SERVER}:8080/dashboard?events=2#admin={}", admin.trim()), None);
    assert!(dom.contains(&format!("data-act=\"enrol\" data-mac=\"{NODE_MAC}\"")), "no enrol button:\n{dom}");
    let dom = common::chromium(&lab, 1, &format!("http://{SERVER}:8080/dashboard?events=2"), None);
    assert!(!dom.contains("data-act=\"enrol\""), "an enrol button without the admin token:\n{dom}");
    assert!(log(&app).contains("plan refused: not enrolled"), "{}", log(&app));

    // The admin routes want the admin token, from any host on the segment.
    let (code, _) = curl(&lab, 1, &[], &format!("http://{SERVER}:8080/api/admin/nodes"));
    assert_eq!(code, 401);
    let add = format!("{{\"macs\":[\"{NODE_MAC}\"]}}");
    let (code, _) = curl(&lab, 1, &["-H", "Authorization: Bearer 0000", "--data-binary", &add], &format!("http://{SERVER}:8080/api/admin/nodes"));
    assert_eq!(code, 403);
    let (code, _) = curl(&lab, 1, &["-X", "POST"], &format!("http://{SERVER}:8080/api/report"));
    assert_eq!(code, 401, "writing a report wants the admin token");
    let (code, _) = curl(&lab, 1, &["-X", "POST", "-H", "Authorization: Bearer bogus"], &format!("http://{SERVER}:8080/api/report"));
    assert_eq!(code, 403, "a bogus admin token is refused");
    // Issue 13: 50 report requests at once from the segment made 50 report directories (each a
    // blocking job on the disk that holds the lease journal). Now one at a time: the others get
    // 429 while one is written, and no more directories appear than requests succeeded.
    let url = format!("http://{SERVER}:8080/api/report");
    let auth = format!("Authorization: Bearer {}", admin.trim());
    let report_dirs = || {
        fs::read_dir(lab.path("store").join("reports"))
            .map(|d| d.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).count())
            .unwrap_or(0)
    };
    let before = report_dirs();
    let mut args: Vec<&str> = vec!["-sS", "--max-time", "30", "-Z", "--parallel-max", "50", "-w", "%{http_code}\n"];
    for _ in 0..50 {
        args.extend(["-o", "/dev/null", "-X", "POST", "-H", &auth, &url]);
    }
    let out = lab.hosts[1].cmd("curl").args(&args).output().expect("curl");
    let codes: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    let ok = codes.iter().filter(|c| *c == "200").count();
    let busy = codes.iter().filter(|c| *c == "429").count();
    let dirs = report_dirs() - before;
    println!("50 concurrent report requests: {ok} written, {busy} refused busy (429), {dirs} new report directories");
    assert_eq!(ok + busy, 50, "codes: {codes:?}");
    assert!(ok >= 1 && busy >= 1, "codes: {codes:?}");
    assert_eq!(dirs, ok, "one directory per report written");

    // 2. `node add`: the script now boots the installer, and the plan goes out.
    let (ok, out) = node_cmd(&lab, &["add", NODE_MAC, "--hostname", "n101", "--group", "rack1"]);
    assert!(ok && out.contains("added"), "{out}");
    let s = script(&lab, mac);
    assert!(s.contains("kernel ") && s.contains(&format!("si.token={}", token(&lab, mac))), "{s}");
    let (code, body) = plan(&lab, mac);
    assert_eq!(code, 200, "{body}");
    let p: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["hostname"], "n101");

    // 3. The installer reports the disk done: installed, local boot, a second plan refused.
    assert_eq!(report(&lab, mac, r#"{"phase":"seeding","message":"installed","console":"si-appliance installer: seeding\n"}"#), 204);
    let s = script(&lab, mac);
    assert!(s.contains("\nexit 1\n") && s.contains("installed with image tiny"), "{s}");
    assert_eq!(plan(&lab, mac).0, 409);

    // kill -9 and restart: the record is on disk, the node still boots locally.
    app.kill();
    let mut app = start_appliance(&lab, 0, "app2", &config(&lab), &[]);
    let s = script(&lab, mac);
    assert!(s.contains("\nexit 1\n") && s.contains("installed"), "after kill -9: {s}");
    let (_, list) = node_cmd(&lab, &["list"]);
    let line = list.lines().find(|l| l.starts_with(NODE_MAC)).unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains("installed") && line.contains("tiny") && line.contains("n101"), "{list}");
    // The registry starts with the book's nodes.
    let ok = wait_for(T, || (node_json(&lab, mac)["enrolment"] == "installed").then_some(()));
    assert!(ok.is_some(), "{}", node_json(&lab, mac));

    // 4. `node reimage --group`: the next boot installs again.
    let (ok, out) = node_cmd(&lab, &["reimage", "--group", "rack1"]);
    assert!(ok && out.contains(NODE_MAC) && out.contains(LISTED_MAC), "{out}");
    let (ok, out) = node_cmd(&lab, &["reimage", "02:68:00:00:09:09"]);
    assert!(!ok && out.contains("not enrolled"), "{out}");
    let s = script(&lab, mac);
    assert!(s.contains("kernel "), "{s}");
    assert_eq!(plan(&lab, mac).0, 200);

    // 5. A failed install: its console (what it printed, the kernel's last lines) is kept.
    let fail = r#"{"phase":"failed","error":"disk /dev/vda: 64 MiB, too small","console":"partitioning /dev/vda\nERROR: too small\n--- last kernel messages ---\nvirtio_blk virtio1: [vda] 131072 512-byte logical blocks\n"}"#;
    assert_eq!(report(&lab, mac, fail), 204);
    let got = wait_for(T, || {
        let (ok, out) = node_cmd(&lab, &["log", NODE_MAC]);
        (ok && out.contains("ERROR: too small")).then_some(out)
    });
    let text = got.unwrap_or_else(|| panic!("node log: {}", node_cmd(&lab, &["log", NODE_MAC]).1));
    assert!(text.contains("[vda] 131072") && text.contains("partitioning /dev/vda"), "{text}");
    let (_, list) = node_cmd(&lab, &["list"]);
    assert!(list.lines().any(|l| l.starts_with(NODE_MAC) && l.contains("failed") && l.contains("too small")), "{list}");
    // The dashboard offers its console and a re-image.
    let dom = common::chromium(&lab, 1, &format!("http://{SERVER}:8080/dashboard?events=2#admin={}", admin.trim()), None);
    for act in ["log", "reimage"] {
        assert!(dom.contains(&format!("data-act=\"{act}\" data-mac=\"{NODE_MAC}\"")), "no {act} button:\n{dom}");
    }
    assert!(script(&lab, mac).contains("kernel "), "a failed node installs again at its next boot");
    app.terminate();
}

/// Issue 13 item 1: a node's installer script, pxelinux config (its token), plan and reports
/// go only to the address our DHCP leased to its MAC. Another host on the segment that asks
/// for the victim's files (curl, tftp-hpa) gets "boot locally" and no token, logged with both
/// addresses; with the victim's token (stolen) its plan and report are refused (403).
#[test]
fn node_token_plan_and_report_only_from_the_address_leased_to_the_node() {
    let mut lab = Lab::new("nt");
    lab.add_host(Some(&format!("{SERVER}/24")), Some("02:68:00:00:00:01"));
    lab.add_host(None, Some(LISTED_MAC));
    lab.add_host(Some("10.68.0.200/24"), Some("02:68:00:00:03:03"));
    let victim: MacAddr = LISTED_MAC.parse().unwrap();
    let tree = lab.path("tiny-tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), "tiny\n").unwrap();
    common::run(
        Command::new(common::appliance_bin()).arg("--store").arg(lab.path("store")).args(["image", "import", "tiny", "--from"]).arg(&tree),
    );
    let app = start_appliance(&lab, 0, "app", &config(&lab), &[]);

    // The victim (listed, so it installs) leases an address with busybox udhcpc.
    let bound = pxe_udhcpc(&lab, 1);
    let ip = bound.lines().find_map(|l| l.strip_prefix("ip=")).unwrap_or_else(|| panic!("{bound}")).to_owned();
    lab.hosts[1].ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    let stolen = token(&lab, victim);
    let script_url = format!("http://{SERVER}:8080/boot/{}.ipxe", victim.hyphenated());
    let tftp_get = |h: usize, out: &str| {
        let r = lab.hosts[h]
            .cmd("tftp")
            .args([SERVER, "6969", "-c", "get", &format!("pxelinux.cfg/01-{}", victim.hyphenated())])
            .arg(lab.path(out))
            .output()
            .expect("tftp");
        assert!(r.status.success(), "tftp: {}", String::from_utf8_lossy(&r.stderr));
        fs::read_to_string(lab.path(out)).unwrap_or_default()
    };

    // The other host: local boot, no token, over HTTP and TFTP; its plan and report refused.
    let (code, s) = curl(&lab, 2, &[], &script_url);
    assert_eq!(code, 200, "{s}");
    assert!(s.contains("\nexit 1\n") && !s.contains("si.token") && !s.contains(&stolen), "another host got the script:\n{s}");
    let pxe = tftp_get(2, "attacker.cfg");
    assert!(pxe.contains("LOCALBOOT 0") && !pxe.contains(&stolen), "another host got the pxelinux config:\n{pxe}");
    let auth = format!("Authorization: Bearer {stolen}");
    let (code, body) = curl(&lab, 2, &["-H", &auth], &format!("http://{SERVER}:8080/api/nodes/{victim}/plan?firmware=bios"));
    assert_eq!(code, 403, "plan with a stolen token: {body}");
    let (code, body) = curl(
        &lab,
        2,
        &["-H", &auth, "-H", "Content-Type: application/json", "--data-binary", r#"{"phase":"failed","message":"forged"}"#],
        &format!("http://{SERVER}:8080/api/nodes/{victim}/report"),
    );
    assert_eq!(code, 403, "report with a stolen token: {body}");
    let text = log(&app);
    assert!(
        text.lines().any(|l| l.contains("WARN") && l.contains("another address than the node's") && l.contains("10.68.0.200") && l.contains(&ip)),
        "no WARN with both addresses:\n{text}"
    );
    assert!(text.contains("plan refused") && text.contains("report refused"), "{text}");

    // The victim itself: its installer script and token, its plan.
    let (code, s) = curl(&lab, 1, &[], &script_url);
    assert_eq!(code, 200, "{s}");
    assert!(s.contains(&format!("si.token={stolen}")), "the node did not get its script:\n{s}");
    let pxe = tftp_get(1, "victim.cfg");
    assert!(pxe.contains(&format!("si.token={stolen}")), "the node did not get its pxelinux config:\n{pxe}");
    let (code, body) = plan(&lab, victim);
    assert_eq!(code, 200, "{body}");
}
