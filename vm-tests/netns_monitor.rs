//! The monitor with real clients in network namespaces this test creates: udhcpc gets its
//! address from the appliance, curl fetches boot files, `si-appliance fetch` downloads through
//! the tracker and the seed, and curl POSTs installer reports; the registry must show every
//! node's phase sequence and final state (issue 6, acceptance 1). Headless Chromium, inside a
//! client's namespace (it can reach nothing but the appliance), loads the dashboard during the
//! run; its DOM must hold the node rows and the chart lines, and a screenshot is kept
//! (acceptance 2). Forged and malformed reports get 4xx and a log line (acceptance 4). The
//! end-of-run report exists and its SVGs parse as XML with an `<svg>` root (acceptance 5).
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Lab, Proc, RemoveOnSuccess, appliance_bin, random_file, start_appliance, strip_ansi, wait_for};
use si_appliance::types::{MacAddr, NodeToken};

const HTTP_PORT: u16 = 8080;
const MIB: u64 = 1 << 20;

fn exec(lab: &Lab, h: usize, prog: &str, args: &[&str]) -> Output {
    lab.hosts[h].cmd(prog).args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"))
}

/// curl from host `h`: (HTTP status, body).
fn curl(lab: &Lab, h: usize, args: &[&str]) -> (u16, String) {
    let mut a = vec!["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let out = exec(lab, h, "curl", &a);
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn get_json(lab: &Lab, h: usize, url: &str) -> serde_json::Value {
    let (code, body) = curl(lab, h, &[url]);
    assert_eq!(code, 200, "{url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
}

/// POSTs a report for `mac` with `token` (None: no Authorization header); returns the status.
fn post_report(lab: &Lab, h: usize, server: &str, mac: &str, token: Option<&str>, body: &str) -> u16 {
    let url = format!("http://{server}:{HTTP_PORT}/api/nodes/{mac}/report");
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec!["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body];
    if let Some(a) = &auth {
        args.extend_from_slice(&["-H", a]);
    }
    args.push(&url);
    curl(lab, h, &args).0
}

fn secret(lab: &Lab, state: &str) -> Vec<u8> {
    fs::read(lab.path(state).join("secret")).expect("appliance secret")
}

fn token(secret: &[u8], mac: &str) -> String {
    let m: MacAddr = mac.parse().expect("mac");
    NodeToken::derive(secret, m).as_str().to_owned()
}

fn phases(node: &serde_json::Value) -> Vec<String> {
    node["phases"].as_array().expect("phases").iter().map(|p| p["phase"].as_str().unwrap_or("?").to_owned()).collect()
}

fn node<'a>(nodes: &'a serde_json::Value, mac: &str) -> Option<&'a serde_json::Value> {
    nodes.as_array()?.iter().find(|n| n["mac"] == mac)
}

/// Where artefacts (the dashboard screenshot) are kept after the lab is removed.
fn artefact_dir() -> PathBuf {
    let d = std::env::var_os("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir).join("si-monitor-artefacts");
    fs::create_dir_all(&d).expect("artefact dir");
    d
}

/// Checks that `path` parses as XML with an `<svg>` root and holds drawn elements.
fn check_svg(path: &Path) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{} is not XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg", "{}", path.display());
    let drawn = doc.descendants().filter(|n| matches!(n.tag_name().name(), "polyline" | "path" | "rect" | "line")).count();
    assert!(drawn > 3, "{} draws nothing", path.display());
}

/// Acceptances 1, 2 and 5 in one run: four nodes from DHCP to done (one to failed), the
/// dashboard in Chromium mid-run, the report at the end.
#[test]
fn registry_follows_a_netns_run_dashboard_renders_and_report_is_written() {
    const N: usize = 4;
    let mut lab = Lab::new("mon");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.71.0.1/24"), Some("02:71:00:00:00:01"));
    let macs: Vec<String> = (1..=N).map(|i| format!("02:71:00:00:01:{i:02x}")).collect();
    for m in &macs {
        lab.add_host(None, Some(m));
    }
    let size = 8 * MIB;
    let archive = lab.path("mon.tar.zst");
    random_file(&archive, size);
    let (kernel, initrd) = (lab.path("vmlinuz"), lab.path("initrd.img"));
    fs::write(&kernel, vec![1u8; 300_000]).expect("kernel");
    fs::write(&initrd, vec![2u8; 500_000]).expect("initrd");
    let reports = lab.path("reports");
    let cfg = format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{store}\"\nstate_dir = \"{state}\"\n\
         [dhcp]\nprobe = false\nanswer = \"all\"\nlease_time = \"10m\"\n\
         [tftp]\nenable = false\n[http]\nport = {HTTP_PORT}\n\
         [boot]\nkernel = \"{kernel}\"\ninitrd = \"{initrd}\"\n\
         [swarm]\narchives = [\"{archive}\"]\nannounce_interval = \"2s\"\npeer_timeout = \"30s\"\nupload_limit = 4194304\n\
         [monitor]\nstuck_after = \"5m\"\nsample_interval = \"500ms\"\nreport_dir = \"{reports}\"\n",
        store = lab.path("store").display(),
        state = lab.path("state").display(),
        kernel = kernel.display(),
        initrd = initrd.display(),
        archive = archive.display(),
        reports = reports.display(),
    );
    let appliance = start_appliance(&lab, app, "appliance", &cfg, &[]);
    let server = "10.71.0.1";
    let base = format!("http://{server}:{HTTP_PORT}");
    let secret = secret(&lab, "state");

    // DHCP: udhcpc in every client, configuring the address it gets.
    let script = lab.path("udhcpc.sh");
    fs::write(&script, "#!/bin/sh\ncase \"$1\" in\n bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask dev $interface ;;\nesac\nexit 0\n").expect("script");
    Command::new("chmod").arg("755").arg(&script).status().expect("chmod");
    let mut dhcp: Vec<Proc> = Vec::new();
    for h in 1..=N {
        let mut c = lab.hosts[h].cmd("udhcpc");
        c.args(["-f", "-i", "eth0", "-t", "10", "-T", "1", "-A", "1", "-s"]).arg(&script);
        dhcp.push(Proc::spawn(&format!("udhcpc{h}"), c, lab.path(&format!("udhcpc{h}.log"))));
    }
    let ips: Vec<String> = (1..=N)
        .map(|h| {
            let got = wait_for(Duration::from_secs(30), || {
                let out = exec(&lab, h, "ip", &["-4", "-o", "addr", "show", "dev", "eth0"]);
                let s = String::from_utf8_lossy(&out.stdout).into_owned();
                s.split("inet ").nth(1).and_then(|r| r.split('/').next()).map(str::to_owned)
            });
            got.unwrap_or_else(|| panic!("host {h} got no address:\n{}", strip_ansi(&appliance.log_text())))
        })
        .collect();

    // Boot files over HTTP: the per-node script names the node; kernel and initrd are matched
    // by address (the registry learnt it from DHCP).
    for (i, m) in macs.iter().enumerate() {
        let h = i + 1;
        let hy = m.replace(':', "-");
        for path in [format!("/boot/{hy}.ipxe"), "/boot/vmlinuz".to_owned(), "/boot/initrd.img".to_owned()] {
            let (code, _) = curl(&lab, h, &[&format!("{base}{path}")]);
            assert_eq!(code, 200, "{path}");
        }
        let t = token(&secret, m);
        assert_eq!(post_report(&lab, h, server, m, Some(&t), r#"{"phase":"installer","message":"installer started"}"#), 204);
        assert_eq!(post_report(&lab, h, server, m, Some(&t), r#"{"phase":"partitioning","message":"mkfs.ext4 /dev/vda1"}"#), 204);
    }

    // The swarm: every node downloads through the tracker (announces drive the registry).
    let mut fetches: Vec<(Proc, PathBuf)> = (1..=N)
        .map(|h| {
            let out = lab.path(&format!("c{h}.tar.zst"));
            let mut cmd = lab.hosts[h].cmd(appliance_bin());
            cmd.args(["fetch", "--server", &format!("{server}:{HTTP_PORT}"), "--image", "mon", "--iface", "eth0", "--seed-for", "4s", "--out"])
                .arg(&out)
                .env("RUST_LOG", "info");
            (Proc::spawn(&format!("fetch{h}"), cmd, lab.path(&format!("fetch{h}.log"))), out)
        })
        .collect();

    // Acceptance 2: the dashboard, mid-run, in Chromium inside client 1's namespace.
    let shot = artefact_dir().join("dashboard.png");
    let _ = fs::remove_file(&shot);
    // `?events=3`: the page closes its event stream after three events, so the headless clock
    // (which stands still while a request is open) can run out its budget and dump the DOM.
    let dom = common::chromium(&lab, 1, &format!("{base}/?events=3"), Some(&shot));
    let rows = dom.matches("<tr class=\"node").count();
    assert_eq!(rows, N, "node rows in the dashboard DOM:\n{dom}");
    for m in &macs {
        assert!(dom.contains(&format!("data-mac=\"{m}\"")), "no row for {m}");
    }
    let agg = dom.split("id=\"chart-agg\"").nth(1).and_then(|s| s.split("</svg>").next()).unwrap_or("");
    assert!(agg.contains("<path class=\"line\""), "aggregate chart has no line:\n{agg}");
    eprintln!("ARTEFACT dashboard screenshot: {} ({} bytes); {rows} node rows in the DOM", shot.display(), fs::metadata(&shot).map(|m| m.len()).unwrap_or(0));

    for (p, out) in fetches.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(120));
        assert!(st.success(), "fetch failed ({st}):\n{}", p.log_text());
        assert_eq!(fs::metadata(out).map(|m| m.len()).unwrap_or(0), size);
    }
    let nodes = get_json(&lab, 1, &format!("{base}/api/nodes"));
    for m in &macs {
        let n = node(&nodes, m).unwrap_or_else(|| panic!("{m} not in /api/nodes: {nodes:#}"));
        assert_eq!(n["bytes_done"].as_u64(), Some(size), "{m} downloaded (tracker): {n:#}");
    }

    // The installers finish: three nodes done, the last one fails.
    let s = size.to_string();
    for (i, m) in macs.iter().enumerate() {
        let h = i + 1;
        let t = token(&secret, m);
        let counters = format!(r#""bytes_done":{s},"bytes_total":{s},"bytes_unpacked":{s}"#);
        if i + 1 == N {
            let body = format!(r#"{{"phase":"failed","error":"grub-install: /dev/vda: no such device",{counters}}}"#);
            assert_eq!(post_report(&lab, h, server, m, Some(&t), &body), 204);
            continue;
        }
        for p in ["configuring", "boot-loader", "seeding", "done"] {
            assert_eq!(post_report(&lab, h, server, m, Some(&t), &format!(r#"{{"phase":"{p}",{counters}}}"#)), 204);
        }
    }

    // Acceptance 1: every node's phase sequence and final state.
    let done = wait_for(Duration::from_secs(20), || {
        let d = get_json(&lab, 1, &format!("{base}/api/deployment"));
        (d["complete"] == true).then_some(d)
    });
    let d = done.unwrap_or_else(|| panic!("deployment never complete: {:#}", get_json(&lab, 1, &format!("{base}/api/nodes"))));
    assert_eq!((d["phases"]["done"].as_u64(), d["phases"]["failed"].as_u64()), (Some(N as u64 - 1), Some(1)), "{d:#}");
    assert_eq!(d["dropped_events"].as_u64(), Some(0), "{d:#}");
    let nodes = get_json(&lab, 1, &format!("{base}/api/nodes"));
    let ok_seq = ["dhcp", "boot-files", "installer", "partitioning", "downloading", "configuring", "boot-loader", "seeding", "done"];
    let fail_seq = ["dhcp", "boot-files", "installer", "partitioning", "downloading", "failed"];
    for (i, m) in macs.iter().enumerate() {
        let n = node(&nodes, m).expect("node");
        let want: &[&str] = if i + 1 == N { &fail_seq } else { &ok_seq };
        assert_eq!(phases(n), want, "{m}: {n:#}");
        assert_eq!(n["ip"], ips[i].as_str(), "{m}");
        assert!(n["boot_files"].as_array().is_some_and(|b| b.len() == 3), "{m} boot files: {n:#}");
        assert_eq!(n["bytes_done"].as_u64(), Some(size));
        if i + 1 == N {
            assert_eq!(n["error"], "grub-install: /dev/vda: no such device");
        }
    }
    let share = d["seed_share"].as_f64().unwrap_or(f64::NAN);

    // `status` from a client, against the appliance.
    let st = exec(&lab, 1, appliance_bin(), &["status", "--server", &format!("{server}:{HTTP_PORT}")]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success(), "status: {}", String::from_utf8_lossy(&st.stderr));
    assert!(text.contains(&format!("{N} nodes: done {}, failed 1", N - 1)) && macs.iter().all(|m| text.contains(m.as_str())), "{text}");
    let metrics = curl(&lab, 1, &[&format!("{base}/metrics")]).1;
    assert!(metrics.contains("si_nodes{phase=\"done\"} 3"), "{metrics}");

    // Acceptance 5: the end-of-run report, written by itself once every node was final.
    let latest = wait_for(Duration::from_secs(20), || {
        let p = fs::canonicalize(reports.join("latest")).ok()?;
        p.join("timeline.svg").is_file().then_some(p)
    });
    let dir = latest.unwrap_or_else(|| panic!("no report in {}:\n{}", reports.display(), strip_ansi(&appliance.log_text())));
    let rep: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("report.json")).expect("report.json")).expect("report JSON");
    assert_eq!(rep["nodes"].as_array().map(Vec::len), Some(N));
    assert!(rep["samples"].as_array().is_some_and(|s| !s.is_empty()));
    for svg in ["node-rates.svg", "aggregate.svg", "timeline.svg"] {
        check_svg(&dir.join(svg));
    }
    // On demand, through the command: a second report, named by `report`.
    // It wants the admin token (read from the appliance's state directory).
    let state = lab.path("state").display().to_string();
    let out = exec(&lab, 1, appliance_bin(), &["--state-dir", &state, "report", "--server", &format!("{server}:{HTTP_PORT}")]);
    let named = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success() && Path::new(&named).join("report.json").is_file(), "report: {named} {}", String::from_utf8_lossy(&out.stderr));
    let keep = artefact_dir().join("report");
    let _ = fs::remove_dir_all(&keep);
    fs::create_dir_all(&keep).expect("mkdir");
    for f in ["report.json", "node-rates.svg", "aggregate.svg", "timeline.svg"] {
        fs::copy(dir.join(f), keep.join(f)).expect("copy report");
    }
    let log = strip_ansi(&appliance.log_text());
    assert!(log.contains("deployment complete"), "{log}");
    eprintln!("ARTEFACT report: {} (copied to {}); seed upload share {share:.2}", dir.display(), keep.display());
}

/// Acceptance 4: no token (401), another node's token (403), a bad MAC, malformed JSON and an
/// unknown field (400) are refused and logged; the appliance keeps serving and accepts the
/// node's own report.
#[test]
fn forged_and_malformed_reports_are_refused_and_logged() {
    let mut lab = Lab::new("mof");
    let _clean = RemoveOnSuccess(lab.dir.clone());
    let app = lab.add_host(Some("10.71.1.1/24"), None);
    let cl = lab.add_host(Some("10.71.1.20/24"), None);
    let cfg = format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{}\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n\
         [http]\nport = {HTTP_PORT}\n[swarm]\nenable = false\n",
        lab.path("store").display(),
        lab.path("state").display()
    );
    let appliance = start_appliance(&lab, app, "appliance", &cfg, &[]);
    let server = "10.71.1.1";
    let secret = secret(&lab, "state");
    let (mac, other) = ("02:71:01:00:00:01", "02:71:01:00:00:02");
    let good = r#"{"phase":"downloading","bytes_done":1,"bytes_total":2}"#;
    let cases: [(&str, Option<String>, &str, u16); 6] = [
        (mac, None, good, 401),
        (mac, Some(token(&secret, other)), good, 403),
        (mac, Some("0000".into()), good, 403),
        ("not-a-mac", Some(token(&secret, mac)), good, 400),
        (mac, Some(token(&secret, mac)), r#"{"phase":"downloading","#, 400),
        (mac, Some(token(&secret, mac)), r#"{"phase":"flying","bogus":1}"#, 400),
    ];
    for (m, t, body, want) in &cases {
        assert_eq!(post_report(&lab, cl, server, m, t.as_deref(), body), *want, "{m} {t:?} {body}");
    }
    assert_eq!(post_report(&lab, cl, server, mac, Some(&token(&secret, mac)), good), 204);
    let base = format!("http://{server}:{HTTP_PORT}");
    let d = get_json(&lab, cl, &format!("{base}/api/deployment"));
    assert_eq!(d["rejected_reports"].as_u64(), Some(cases.len() as u64), "{d:#}");
    let got = wait_for(Duration::from_secs(10), || {
        let nodes = get_json(&lab, cl, &format!("{base}/api/nodes"));
        node(&nodes, mac).filter(|n| n["phase"] == "downloading").cloned()
    });
    assert!(got.is_some(), "the node's own report was not applied");
    let nodes = get_json(&lab, cl, &format!("{base}/api/nodes"));
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "forged reports created nodes: {nodes:#}");
    let log = strip_ansi(&appliance.log_text());
    let refused = log.lines().filter(|l| l.contains("report refused")).count();
    assert_eq!(refused, cases.len(), "{log}");
    for st in ["status=401", "status=403", "status=400"] {
        assert!(log.contains(st), "no {st} in the log:\n{log}");
    }
}
