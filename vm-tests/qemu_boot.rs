//! Acceptance 6: a real PXE client — QEMU's iPXE NIC ROM in a VM — boots the client kernel and
//! initramfs from the appliance, and its /init shows the command line the appliance rendered.
//!
//! Also here: the boot files boot at all (QEMU `-kernel`, no network), and the appliance's IPv6
//! router advertisement, which spares iPXE its ≈15 s wait for a router, reaches the link and
//! routes nobody through the appliance.
//!
//! Each boot runs QEMU under TCG (a whole core while it runs), inside the lab's switch namespace
//! on a tap of its bridge, with `-nodefaults` so QEMU adds no NIC of its own. Times are taken on
//! the host clock from the serial log and the appliance log and printed, never asserted.
//!
//! The boot files come from `pxe-assets/build-test-boot.sh` (Debian's cloud kernel + a busybox
//! initramfs), cached outside the repository (`SI_TEST_BOOT_DIR`, default
//! `/var/cache/si-appliance/test-boot`).
mod common;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, Proc, strip_ansi};
use si_appliance::types::{MacAddr, NodeToken};

/// What the test initramfs prints, followed by ` cmdline: ` and /proc/cmdline.
const MARKER: &str = "SI-APPLIANCE-INITRD-OK";
/// Upper bound for one PXE boot, firmware to poweroff (≈ 10–20 s measured; TCG on a shared
/// 2-core machine can be several times slower).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The client kernel and initramfs built (or found up to date) by the project's script.
struct BootFiles {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Runs `pxe-assets/build-test-boot.sh` so a fresh clone works; it returns at once when its
/// cached outputs are up to date.
fn ensure_boot_assets() -> BootFiles {
    let dir = common::test_boot_dir();
    let files = BootFiles { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
    assert!(files.kernel.is_file() && files.initrd.is_file(), "no boot files in {}", dir.display());
    files
}

/// QEMU's accelerator: TCG, the one every machine of this project has (`SI_QEMU_ACCEL` may
/// say `kvm` where /dev/kvm is usable).
fn accel() -> String {
    std::env::var("SI_QEMU_ACCEL").unwrap_or_else(|_| "tcg".to_owned())
}

/// The options every VM gets: no default devices (no user-mode NIC that would reach the host's
/// network), firmware and console on the serial file, poweroff or panic ends QEMU.
fn qemu_base(cmd: &mut Command, serial: &Path) {
    cmd.args(["-nodefaults", "-machine", "pc,graphics=off", "-accel", &accel(), "-display", "none"])
        .args(["-m", "256", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
}

/// One VM PXE-booting from tap `tap` on the switch bridge, spawned directly (not through a
/// wrapper) inside the switch namespace so the harness kills QEMU itself by PID.
fn spawn_pxe_vm(lab: &Lab, tap: &str, mac: MacAddr, serial: &Path) -> Proc {
    lab.switch.ip(&["tuntap", "add", tap, "mode", "tap"]);
    lab.switch.ip(&["link", "set", tap, "master", "br0"]);
    lab.switch.ip(&["link", "set", tap, "up"]);
    let mut cmd = lab.switch.cmd("qemu-system-x86_64");
    qemu_base(&mut cmd, serial);
    cmd.args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex=1")])
        .args(["-boot", "n"]);
    Proc::spawn("qemu", cmd, lab.path("qemu.log"))
}

/// Where a phase is seen.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Serial,
    Appliance,
}

/// One step of a boot, seen at the first poll where a line of its source matches.
struct Phase {
    name: &'static str,
    source: Source,
    matches: Box<dyn Fn(&str) -> bool>,
    seen: Option<Duration>,
}

impl Phase {
    fn new(name: &'static str, source: Source, matches: impl Fn(&str) -> bool + 'static) -> Phase {
        Phase { name, source, matches: Box::new(matches), seen: None }
    }
}

/// A line (of either log) that contains every one of `words`.
fn line_with(words: &'static [&'static str]) -> impl Fn(&str) -> bool {
    move |line| words.iter().all(|w| line.contains(w))
}

/// How a watched boot ended.
struct Boot {
    serial: String,
    /// The line the test initramfs printed.
    marker_line: Option<String>,
    /// QEMU's exit, if it exited in time.
    exit: Option<std::process::ExitStatus>,
    elapsed: Duration,
}

/// Polls the serial log and the appliance log about every 100 ms until QEMU exits or `timeout`
/// passes (then QEMU is killed), stamping each phase with the host time since `start`.
fn watch_boot(
    qemu: &mut Proc,
    serial: &Path,
    appliance: &Proc,
    phases: &mut [Phase],
    start: Instant,
    timeout: Duration,
) -> Boot {
    let scan = |phases: &mut [Phase], serial: &str, app: &str| {
        let t = start.elapsed();
        for p in phases.iter_mut().filter(|p| p.seen.is_none()) {
            let text = if p.source == Source::Serial { serial } else { app };
            if text.lines().any(|l| (p.matches)(l)) {
                p.seen = Some(t);
            }
        }
    };
    let exit = common::wait_for(timeout, || {
        let exited = qemu.child.try_wait().ok().flatten();
        let text = String::from_utf8_lossy(&fs::read(serial).unwrap_or_default()).into_owned();
        scan(phases, &text, &strip_ansi(&appliance.log_text()));
        std::thread::sleep(Duration::from_millis(50));
        exited
    });
    if exit.is_none() {
        qemu.kill();
    }
    let elapsed = start.elapsed();
    let serial = String::from_utf8_lossy(&fs::read(serial).unwrap_or_default()).into_owned();
    let marker_line = serial.lines().find_map(|l| l.find(MARKER).map(|i| l[i..].trim_end().to_owned()));
    Boot { serial, marker_line, exit, elapsed }
}


/// A line of the appliance log naming `mac` and containing every one of `words`.
fn app_line(mac: MacAddr, words: &'static [&'static str]) -> impl Fn(&str) -> bool {
    let mac = mac.to_string();
    let hyph = mac.replace(':', "-");
    move |line| (line.contains(&mac) || line.contains(&hyph)) && words.iter().all(|w| line.contains(w))
}

/// After a passing test: stops its processes (by PID) and removes the lab's files. A failing
/// test never gets here and keeps them for reading.
fn passed(lab: Lab, procs: Vec<Proc>) {
    drop(procs);
    let _ = fs::remove_dir_all(&lab.dir);
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The phase table, host seconds since QEMU started.
fn phase_table(title: &str, phases: &[Phase], boot: &Boot) -> String {
    let mut s = format!("{title}: host-clock phases, seconds since QEMU start\n");
    for p in phases {
        let src = if p.source == Source::Serial { "serial" } else { "appliance" };
        match p.seen {
            Some(t) => writeln!(s, "  {:<28} {:>7.2}  ({src})", p.name, t.as_secs_f64()),
            None => writeln!(s, "  {:<28} {:>7}  ({src})", p.name, "-"),
        }
        .unwrap();
    }
    writeln!(s, "  {:<28} {:>7.2}", "QEMU exited", boot.elapsed.as_secs_f64()).unwrap();
    s
}

/// Asserts a finished boot: marker printed, the rendered command line carried the appliance's
/// address, the node's token and the configured words, and the VM powered off (no panic).
/// On failure the serial tail and the appliance log are part of the message.
fn check_boot(boot: &Boot, appliance: &Proc, server: &str, token: &NodeToken, table: &str) {
    let context = || {
        format!(
            "{table}\n--- serial log (tail) ---\n{}\n--- appliance log (tail) ---\n{}",
            tail(&boot.serial, 60),
            tail(&strip_ansi(&appliance.log_text()), 80)
        )
    };
    let Some(line) = &boot.marker_line else {
        panic!("no {MARKER} line on the serial console\n{}", context());
    };
    let cmdline = line.split_once(" cmdline: ").map(|(_, c)| c).unwrap_or("");
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    assert!(
        words.iter().any(|w| w.contains(server)),
        "command line does not name the appliance {server}: {cmdline:?}\n{}",
        context()
    );
    assert!(
        words.iter().any(|w| w.contains(token.as_str())),
        "command line does not carry the node's token: {cmdline:?}\n{}",
        context()
    );
    for w in ["console=ttyS0", "panic=1"] {
        assert!(words.contains(&w), "command line lacks the configured {w}: {cmdline:?}\n{}", context());
    }
    assert!(!boot.serial.contains("Kernel panic"), "the kernel panicked\n{}", context());
    assert!(
        boot.serial.contains("reboot: Power down"),
        "the VM did not power off (exit: {:?})\n{}",
        boot.exit,
        context()
    );
    assert!(boot.exit.is_some_and(|s| s.success()), "QEMU exit {:?}\n{}", boot.exit, context());
}

/// The node token the appliance derives for `mac` from its secret in `state_dir`.
fn token_of(state_dir: &Path, mac: MacAddr) -> NodeToken {
    let secret = fs::read(state_dir.join("secret")).expect("appliance secret");
    NodeToken::derive(&secret, mac)
}

/// Appliance config for the boot tests: full DHCP for PXE clients only (no probe: the lab has
/// no other server), TFTP and HTTP on, the built boot files, and `extra` appended.
fn boot_config(lab: &Lab, files: &BootFiles, extra: &str) -> String {
    format!(
        r#"iface = "eth0"
enroll = "any"
store = "{store}"
state_dir = "{state}"

[dhcp]
mode = "full"
answer = "pxe"
probe = false

[[dhcp.pool]]
subnet = "10.68.0.0/24"
range = ["10.68.0.100", "10.68.0.150"]
{extra}
[tftp]
enable = true

[http]
port = 80

[boot]
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 panic=1"
"#,
        store = lab.path("store").display(),
        state = lab.path("state").display(),
        kernel = files.kernel.display(),
        initrd = files.initrd.display(),
    )
}

const SERVER: &str = "10.68.0.1";

/// The lab of the boot tests: the appliance on host 0 (10.68.0.1/24), QEMU on tap0. Its
/// link-local address is usable before anything starts, as on an appliance whose link has been
/// up for a while (right after link up, RAs wait for duplicate address detection).
fn boot_lab(tag: &str) -> Lab {
    let mut lab = Lab::new(tag);
    lab.add_host(Some(&format!("{SERVER}/24")), Some("52:54:00:68:00:01"));
    wait_link_local(&lab.hosts[0]);
    lab
}

/// Acceptance 6: DHCP → iPXE script over HTTP → kernel + initrd over HTTP → /init runs.
#[test]
fn pxe_boot_over_http_reaches_the_initramfs() {
    let files = ensure_boot_assets();
    let lab = boot_lab("qb");
    let appliance = common::start_appliance(&lab, 0, "appliance", &boot_config(&lab, &files, ""), &[]);
    let mac: MacAddr = "52:54:00:68:00:10".parse().unwrap();
    let serial = lab.path("serial.log");
    let start = Instant::now();
    let mut qemu = spawn_pxe_vm(&lab, "tap0", mac, &serial);
    let mut phases = vec![
        Phase::new("DHCP offer sent", Source::Appliance, app_line(mac, &["offered"])),
        Phase::new("DHCP lease bound", Source::Appliance, app_line(mac, &["lease bound"])),
        Phase::new(
            "router solicitation answered",
            Source::Appliance,
            app_line(mac, &["answered a router solicitation"]),
        ),
        Phase::new("iPXE configured (DHCP)", Source::Serial, line_with(&["Configuring (net0", "ok"])),
        Phase::new("script requested", Source::Appliance, app_line(mac, &["http: sending", ".ipxe"])),
        Phase::new("kernel requested", Source::Appliance, app_line(mac, &["http: sending", "file=vmlinuz"])),
        Phase::new("kernel fetched", Source::Serial, line_with(&["/boot/vmlinuz", "ok"])),
        Phase::new("initrd requested", Source::Appliance, app_line(mac, &["http: sending", "file=initrd.img"])),
        Phase::new("initrd fetched", Source::Serial, line_with(&["/boot/initrd.img", "ok"])),
        Phase::new("kernel running", Source::Serial, line_with(&["Linux version"])),
        Phase::new("marker (/init ran)", Source::Serial, line_with(&[MARKER])),
        Phase::new("powered off", Source::Serial, line_with(&["reboot: Power down"])),
    ];
    let boot = watch_boot(&mut qemu, &serial, &appliance, &mut phases, start, BOOT_TIMEOUT);
    let table = phase_table("PXE boot over HTTP", &phases, &boot);
    println!("{table}");
    check_boot(&boot, &appliance, SERVER, &token_of(&lab.path("state"), mac), &table);
    // Not asserted: whether iPXE gets an RA in answer to its solicitation or a periodic one is
    // a race (once in about ten runs no solicitation from the VM was logged, and the boot was
    // just as fast). The solicited path is asserted with rdisc6 in
    // `router_advertisement_reaches_the_link_and_routes_nobody`; without any RA this boot takes
    // about 23 s instead of 6–8 s (measured by disabling IPv6 on the appliance's interface).
    passed(lab, vec![qemu, appliance]);
}

/// The same boot through TFTP only: a reservation sends this node `pxelinux.0` even though
/// its ROM is iPXE; pxelinux fetches its config, kernel and initrd by TFTP.
#[test]
fn pxe_boot_through_pxelinux_over_tftp() {
    let files = ensure_boot_assets();
    let lab = boot_lab("qt");
    let mac: MacAddr = "52:54:00:68:00:20".parse().unwrap();
    let reservation = format!(
        "\n[[dhcp.reservation]]\nmac = \"{mac}\"\nip = \"10.68.0.20\"\nhostname = \"tftp-node\"\nloader = \"pxelinux\"\n"
    );
    let config = boot_config(&lab, &files, &reservation);
    let appliance = common::start_appliance(&lab, 0, "appliance", &config, &[]);
    let serial = lab.path("serial.log");
    let start = Instant::now();
    let mut qemu = spawn_pxe_vm(&lab, "tap0", mac, &serial);
    let mut phases = vec![
        Phase::new("DHCP offer sent", Source::Appliance, app_line(mac, &["offered"])),
        Phase::new("DHCP lease bound", Source::Appliance, app_line(mac, &["lease bound"])),
        Phase::new("iPXE configured (DHCP)", Source::Serial, line_with(&["Configuring (net0", "ok"])),
        Phase::new("pxelinux.0 requested", Source::Appliance, line_with(&["tftp: sending", "file=pxelinux.0"])),
        Phase::new("pxelinux running", Source::Serial, line_with(&["PXELINUX"])),
        Phase::new(
            "pxelinux.cfg requested",
            Source::Appliance,
            line_with(&["tftp: sending", "file=pxelinux.cfg/01-52-54-00-68-00-20"]),
        ),
        Phase::new("kernel requested", Source::Appliance, line_with(&["tftp: sending", "file=vmlinuz"])),
        Phase::new("initrd requested", Source::Appliance, line_with(&["tftp: sending", "file=initrd.img"])),
        Phase::new("kernel running", Source::Serial, line_with(&["Linux version"])),
        Phase::new("marker (/init ran)", Source::Serial, line_with(&[MARKER])),
        Phase::new("powered off", Source::Serial, line_with(&["reboot: Power down"])),
    ];
    let boot = watch_boot(&mut qemu, &serial, &appliance, &mut phases, start, BOOT_TIMEOUT);
    let table = phase_table("PXE boot through pxelinux/TFTP", &phases, &boot);
    println!("{table}");
    assert!(
        phases.iter().any(|p| p.name == "pxelinux.0 requested" && p.seen.is_some()),
        "the node was not sent pxelinux.0\n{table}\n{}\n{}",
        tail(&boot.serial, 60),
        tail(&strip_ansi(&appliance.log_text()), 80)
    );
    check_boot(&boot, &appliance, SERVER, &token_of(&lab.path("state"), mac), &table);
    passed(lab, vec![qemu, appliance]);
}

/// Peer-served boot files in a stampede: iPXE holds its kernel request open while the appliance
/// makes it wait for a free slot. A host beside the node takes the appliance's one transfer slot
/// (`boot.peer_appliance_max = 1`) with a kernel fetch throttled to 100 KB/s (about 140 s), its
/// receive window kept small so the appliance's send really lasts that long; the
/// VM's iPXE (QEMU's 2019 ROM: no digest command, so `peer_unverified = true` lets its requests
/// queue) asks for the kernel, waits the whole `boot.peer_wait` (its default, 60 s) on the open
/// connection, is then served anyway, and boots. Asserted: the appliance served the VM's kernel
/// after waiting at least 55 s, the VM never fell back (`bad=1`, `direct=1`), /init ran.
#[test]
fn ipxe_holds_its_request_open_through_the_longest_wait() {
    longest_wait(Firmware::Bios);
}

/// The same wait with UEFI firmware: OVMF's own PXE client (the NIC's option ROM removed, as on
/// a rack server) loads Debian's iPXE 2.0 `snponly.efi` over TFTP, whose kernel request waits
/// the whole `boot.peer_wait` on its open connection through the firmware's network driver.
#[test]
fn uefi_ipxe_holds_its_request_open_through_the_longest_wait() {
    longest_wait(Firmware::UefiPxe);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Firmware {
    /// SeaBIOS with QEMU's iPXE ROM (2019) on the NIC.
    Bios,
    /// OVMF with no option ROM on the NIC: the firmware's PXE loads iPXE 2.0's snponly.efi.
    UefiPxe,
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// One VM booting from OVMF's own PXE client on tap `tap` (IPv4 PXE only, no option ROM).
fn spawn_uefi_pxe_vm(lab: &Lab, tap: &str, mac: MacAddr, serial: &Path) -> Proc {
    lab.switch.ip(&["tuntap", "add", tap, "mode", "tap"]);
    lab.switch.ip(&["link", "set", tap, "master", "br0"]);
    lab.switch.ip(&["link", "set", tap, "up"]);
    let vars = lab.path("ovmf-vars.fd");
    fs::copy(OVMF_VARS, &vars).expect("OVMF_VARS.fd (package ovmf)");
    let mut cmd = lab.switch.cmd("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-machine", "pc,graphics=off", "-accel", &accel(), "-display", "none"])
        .args(["-m", "512", "-no-reboot"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
    for k in ["IPv6PXESupport", "IPv6Support"] {
        cmd.arg("-fw_cfg").arg(format!("name=opt/org.tianocore/{k},string=no"));
    }
    cmd.args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex=1,romfile=")])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
    Proc::spawn("qemu", cmd, lab.path("qemu.log"))
}

fn longest_wait(firmware: Firmware) {
    let files = ensure_boot_assets();
    let mut lab = boot_lab(if firmware == Firmware::Bios { "qw" } else { "qx" });
    let hog_mac = "52:54:00:68:00:31";
    let hog = lab.add_host(Some("10.68.0.31/24"), Some(hog_mac));
    let mut config = format!(
        "{}peer_serve = true\npeer_unverified = true\npeer_appliance_max = 1\n",
        boot_config(&lab, &files, "")
    );
    if firmware == Firmware::UefiPxe {
        let efi = common::ipxe_efi_dir();
        config.push_str(&format!("loader_dirs = [\"{}\", \"/usr/lib/ipxe\"]\n", efi.display()));
    }
    let appliance = common::start_appliance(&lab, 0, "appliance", &config, &[]);
    // A small receive window on the throttled host: otherwise the socket buffers of both ends
    // take most of the kernel at once, the appliance's response body ends (and its slot frees)
    // within seconds, and the rest drains from the buffers at the throttled rate.
    common::run(lab.hosts[hog].cmd("sysctl").args(["-qw", "net.ipv4.tcp_rmem=4096 32768 32768"]));
    let mut throttled = lab.hosts[hog].cmd("curl");
    throttled.args(["-sS", "--limit-rate", "100K", "-o", "/dev/null"]).arg(format!(
        "http://{SERVER}/boot/vmlinuz?mac={}&verify=1",
        hog_mac.replace(':', "-")
    ));
    let throttled = Proc::spawn("throttled-curl", throttled, lab.path("throttled-curl.log"));
    common::wait_for(Duration::from_secs(20), || {
        strip_ansi(&appliance.log_text()).lines().any(|l| l.contains("http: sending") && l.contains("file=vmlinuz") && l.contains("10.68.0.31")).then_some(())
    })
    .expect("the throttled fetch never took the appliance's slot");
    let mac: MacAddr = "52:54:00:68:00:30".parse().unwrap();
    let serial = lab.path("serial.log");
    let start = Instant::now();
    let mut qemu = match firmware {
        Firmware::Bios => spawn_pxe_vm(&lab, "tap0", mac, &serial),
        Firmware::UefiPxe => spawn_uefi_pxe_vm(&lab, "tap0", mac, &serial),
    };
    let mut phases = vec![Phase::new("DHCP lease bound", Source::Appliance, app_line(mac, &["lease bound"]))];
    if firmware == Firmware::UefiPxe {
        phases.push(Phase::new("snponly.efi over TFTP", Source::Appliance, line_with(&["tftp", "snponly.efi"])));
    }
    phases.extend([
        Phase::new("script requested", Source::Appliance, app_line(mac, &["http: sending", ".ipxe"])),
        Phase::new("kernel request waits", Source::Appliance, line_with(&["waiting for a free slot", "file=vmlinuz"])),
        Phase::new("kernel served after the wait", Source::Appliance, line_with(&["waited the longest allowed", "file=vmlinuz"])),
        Phase::new("initrd requested", Source::Appliance, app_line(mac, &["http: sending", "file=initrd.img"])),
        Phase::new("kernel running", Source::Serial, line_with(&["Linux version"])),
        Phase::new("marker (/init ran)", Source::Serial, line_with(&[MARKER])),
        Phase::new("powered off", Source::Serial, line_with(&["reboot: Power down"])),
    ]);
    let title = match firmware {
        Firmware::Bios => "iPXE waiting for a free slot (SeaBIOS, 2019 ROM)",
        Firmware::UefiPxe => "iPXE waiting for a free slot (OVMF, iPXE 2.0 snponly.efi)",
    };
    let boot = watch_boot(&mut qemu, &serial, &appliance, &mut phases, start, BOOT_TIMEOUT);
    let table = phase_table(title, &phases, &boot);
    println!("{table}");
    let log = strip_ansi(&appliance.log_text());
    let context = || format!("{table}\n--- serial log (tail) ---\n{}\n--- appliance log (tail) ---\n{}", tail(&boot.serial, 40), tail(&log, 60));
    let waited: Option<f64> = log
        .lines()
        .filter(|l| l.contains("waited the longest allowed") && l.contains("file=vmlinuz") && !l.contains("10.68.0.31"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("waited=")).and_then(|v| v.trim_matches('"').parse().ok()));
    println!("the VM's kernel request waited {waited:?} s on its open connection");
    assert!(waited.is_some_and(|w| w >= 55.0), "the VM's kernel was not served after the longest wait: {waited:?}\n{}", context());
    let fell_back = log.lines().any(|l| l.contains("file=vmlinuz") && (l.contains("bad=1") || l.contains("direct=1")) && !l.contains("10.68.0.31"));
    assert!(!fell_back, "the VM fell back instead of waiting\n{}", context());
    check_boot(&boot, &appliance, SERVER, &token_of(&lab.path("state"), mac), &table);
    passed(lab, vec![qemu, throttled, appliance]);
}

/// Acceptance 4's boot half: dnsmasq hands out the addresses on the segment, the appliance runs in
/// proxyDHCP mode and only adds boot information; QEMU's iPXE ROM takes its address from dnsmasq and
/// its boot script from us, and boots to the initramfs.
#[test]
fn pxe_boot_through_proxy_dhcp_next_to_dnsmasq() {
    let files = ensure_boot_assets();
    let mut lab = boot_lab("qp");
    lab.add_host(Some("10.68.0.2/24"), Some("52:54:00:68:00:02"));
    let mut dq = lab.hosts[1].cmd("dnsmasq");
    dq.args(["--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=eth0", "--bind-interfaces"])
        .args(["--user=root", "--group=root", "--log-dhcp", "--log-facility=-"])
        .arg("--dhcp-range=10.68.0.160,10.68.0.180,1h")
        .arg(format!("--dhcp-leasefile={}", lab.path("dnsmasq.leases").display()))
        .arg(format!("--pid-file={}", lab.path("dnsmasq.pid").display()));
    let mut dnsmasq = Proc::spawn("dnsmasq", dq, lab.path("dnsmasq.log"));
    dnsmasq.wait_log("DHCP, IP range", Duration::from_secs(20));
    let config = boot_config(&lab, &files, "").replace("mode = \"full\"", "mode = \"proxy\"");
    assert!(config.contains("mode = \"proxy\""));
    let appliance = common::start_appliance(&lab, 0, "appliance", &config, &[]);
    let mac: MacAddr = "52:54:00:68:00:30".parse().unwrap();
    let serial = lab.path("serial.log");
    let start = Instant::now();
    let mut qemu = spawn_pxe_vm(&lab, "tap0", mac, &serial);
    let mut phases = vec![
        Phase::new("iPXE configured (DHCP)", Source::Serial, line_with(&["Configuring (net0", "ok"])),
        Phase::new("script requested", Source::Appliance, app_line(mac, &["http: sending", ".ipxe"])),
        Phase::new("kernel requested", Source::Appliance, app_line(mac, &["http: sending", "file=vmlinuz"])),
        Phase::new("kernel running", Source::Serial, line_with(&["Linux version"])),
        Phase::new("marker (/init ran)", Source::Serial, line_with(&[MARKER])),
        Phase::new("powered off", Source::Serial, line_with(&["reboot: Power down"])),
    ];
    let boot = watch_boot(&mut qemu, &serial, &appliance, &mut phases, start, BOOT_TIMEOUT);
    let table = phase_table("PXE boot through proxyDHCP (addresses from dnsmasq)", &phases, &boot);
    println!("{table}");
    check_boot(&boot, &appliance, SERVER, &token_of(&lab.path("state"), mac), &table);
    // The address came from dnsmasq's range, not from us (proxy mode hands out none).
    let leases = fs::read_to_string(lab.path("dnsmasq.leases")).unwrap_or_default();
    assert!(leases.contains("52:54:00:68:00:30") && leases.contains("10.68.0.1"), "dnsmasq leases:\n{leases}\n{table}");
    assert!(
        !strip_ansi(&appliance.log_text()).contains("lease bound"),
        "proxy mode bound a lease:\n{}",
        tail(&strip_ansi(&appliance.log_text()), 40)
    );
    passed(lab, vec![qemu, appliance, dnsmasq]);
}

/// The boot files boot: QEMU `-kernel`/`-initrd`, no NIC at all, and /init prints the marker
/// with the command line it was given, then powers off.
#[test]
fn boot_files_boot_directly() {
    let files = ensure_boot_assets();
    let dir = tempfile::tempdir().expect("tempdir");
    let serial = dir.path().join("serial.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    qemu_base(&mut cmd, &serial);
    cmd.arg("-kernel").arg(&files.kernel).arg("-initrd").arg(&files.initrd);
    cmd.args(["-append", "console=ttyS0 panic=1 si.server=192.0.2.1 si.token=direct-check"]);
    let start = Instant::now();
    let mut qemu = Proc::spawn("qemu", cmd, dir.path().join("qemu.log"));
    let status = qemu.wait_exit(Duration::from_secs(120));
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).into_owned();
    println!("direct -kernel boot: QEMU start to exit {:.2} s (accel {})", elapsed.as_secs_f64(), accel());
    let line = text
        .lines()
        .find(|l| l.contains(MARKER))
        .unwrap_or_else(|| panic!("no marker (QEMU {status}):\n{}\n{}", tail(&text, 60), qemu.log_text()));
    assert!(line.contains("si.server=192.0.2.1 si.token=direct-check"), "{line}");
    assert!(text.contains("reboot: Power down") && !text.contains("Kernel panic"), "{}", tail(&text, 30));
    assert!(status.success(), "QEMU {status}");
}

/// Waits until `ns`'s eth0 has a link-local IPv6 address past duplicate address detection.
fn wait_link_local(ns: &common::Netns) {
    let ok = common::wait_for(Duration::from_secs(10), || {
        let out = ns.cmd("ip").args(["-6", "addr", "show", "dev", "eth0", "scope", "link"]).output().ok()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        (s.contains("fe80::") && !s.contains("tentative")).then_some(())
    });
    assert!(ok.is_some(), "{}: no usable link-local address on eth0", ns.name);
}

/// The appliance advertises itself as an IPv6 non-router on its interface: unsolicited to
/// ff02::1 from its link-local address with hop limit 255, lifetime 0 and no prefix, and in
/// answer to a router solicitation (rdisc6, a real NDP client). A host that accepts RAs gets
/// neither a default route nor an address from it.
#[test]
fn router_advertisement_reaches_the_link_and_routes_nobody() {
    let mut lab = Lab::new("qr");
    let appliance_mac = "52:54:00:68:01:01";
    lab.add_host(Some("10.68.1.1/24"), Some(appliance_mac));
    lab.add_host(Some("10.68.1.2/24"), None);
    let client = &lab.hosts[1];
    // The client accepts RAs as any Linux host does (not forwarding: accept_ra 1).
    client.ip(&["link", "set", "eth0", "down"]);
    run_sysctl(client, "net.ipv6.conf.eth0.accept_ra=1");
    client.ip(&["link", "set", "eth0", "up"]);
    wait_link_local(client);

    let mut dump = client.cmd("tcpdump");
    dump.args(["-i", "eth0", "-n", "-l", "-v", "-c", "1", "icmp6 and ip6[40] == 134"]);
    let mut dump = Proc::spawn("tcpdump", dump, lab.path("tcpdump.log"));
    dump.wait_log("listening on", Duration::from_secs(10));

    let config = format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{}\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n[http]\nport = 8080\n",
        lab.path("store").display(),
        lab.path("state").display()
    );
    let appliance = common::start_appliance(&lab, 0, "appliance", &config, &[]);
    // Unsolicited: at start (or, if the link-local address was still tentative, 3 s later).
    dump.wait_exit(Duration::from_secs(20));
    let seen = dump.log_text();
    println!("{seen}");
    assert!(seen.contains("router advertisement"), "no RA captured:\n{seen}\n{}", appliance.log_text());
    assert!(seen.contains("> ff02::1:"), "not sent to all-nodes:\n{seen}");
    assert!(seen.contains("IP6 (") && seen.contains("fe80::"), "not from a link-local address:\n{seen}");
    assert!(seen.contains("hlim 255"), "hop limit must be 255 (RFC 4861 §6.1.2):\n{seen}");
    assert!(seen.contains("icmp6 sum ok"), "kernel checksum missing:\n{seen}");
    assert!(seen.contains("router lifetime 0s"), "must not offer itself as default router:\n{seen}");
    assert!(!seen.contains("prefix info"), "must carry no prefix:\n{seen}");
    assert!(seen.contains(appliance_mac), "source link-layer address option missing:\n{seen}");

    // Solicited: rdisc6 sends router solicitations to ff02::2 and prints the first answer.
    let mut rdisc = client.cmd("rdisc6");
    rdisc.args(["-1", "-r", "3", "-w", "1000", "eth0"]);
    let mut rdisc = Proc::spawn("rdisc6", rdisc, lab.path("rdisc6.log"));
    let status = rdisc.wait_exit(Duration::from_secs(15));
    let answer = rdisc.log_text();
    println!("{answer}");
    assert!(status.success(), "rdisc6 got no advertisement ({status}):\n{answer}\n{}", appliance.log_text());
    let lifetime = answer.lines().find(|l| l.contains("Router lifetime")).unwrap_or_default();
    assert!(lifetime.contains(" 0 (0x"), "router lifetime must be 0: {lifetime:?}");
    assert!(
        common::wait_for(Duration::from_secs(5), || {
            appliance.log_text().contains("answered a router solicitation").then_some(())
        })
        .is_some(),
        "the appliance did not answer the solicitation:\n{}",
        appliance.log_text()
    );

    // Nobody routes through the appliance: no default route, no address from the RA.
    let routes = client.ip(&["-6", "route", "show", "default"]);
    assert!(routes.stdout.is_empty(), "RA installed a default route: {}", String::from_utf8_lossy(&routes.stdout));
    let addrs = client.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
    assert!(addrs.stdout.is_empty(), "RA created an address: {}", String::from_utf8_lossy(&addrs.stdout));
    passed(lab, vec![dump, rdisc, appliance]);
}

fn run_sysctl(ns: &common::Netns, setting: &str) {
    common::run(ns.cmd("sysctl").args(["-q", "-w", setting]));
}

/// Without IPv6 on its interface the appliance logs that once and serves on.
#[test]
fn appliance_without_ipv6_starts_and_says_why() {
    let mut lab = Lab::new("q6");
    lab.add_host(Some("10.68.2.1/24"), None);
    run_sysctl(&lab.hosts[0], "net.ipv6.conf.eth0.disable_ipv6=1");
    let config = format!(
        "iface = \"eth0\"\nenroll = \"any\"\nstore = \"{}\"\nstate_dir = \"{}\"\n[dhcp]\nmode = \"off\"\n[tftp]\nenable = false\n[http]\nport = 8080\n",
        lab.path("store").display(),
        lab.path("state").display()
    );
    let mut appliance = common::start_appliance(&lab, 0, "appliance", &config, &[]);
    let log = strip_ansi(&appliance.log_text());
    assert!(log.contains("IPv6 is disabled on the interface"), "{log}");
    assert!(appliance.child.try_wait().ok().flatten().is_none(), "appliance stopped:\n{log}");
    appliance.terminate();
    passed(lab, vec![appliance]);
}
