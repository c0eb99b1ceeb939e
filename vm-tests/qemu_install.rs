//! The main job in the test command: QEMU VMs PXE-boot from the appliance into the client
//! initramfs (pxe-assets/build-client.sh), `si-appliance install` writes the demo image
//! (qemu/make-demo-image.sh) onto their blank virtual disks through the swarm, they reboot from
//! those disks into the installed Debian, and the serial console shows each node's own host name
//! in its login prompt (`node-… login:`), the name the appliance's plan gave it.
//!
//! Faults, in the same run to keep it cheap (one appliance, one image pack, VMs in parallel):
//! - one VM is reset (QEMU monitor `system_reset`) while it downloads: it boots from the network
//!   again and completes a clean install;
//! - one VM has a disk too small for the image: its installer refuses it with the reason, the
//!   appliance hears `failed`, the disk stays blank, and the other VMs complete.
//!
//! QEMU runs with `-no-reboot`, NIC first in the boot order: a reboot ends QEMU and the test
//! powers the VM on again, from its disk when the installer finished (its serial shows the
//! installer's `install-done` line and the kernel's restart), from the network otherwise. The
//! appliance does not yet answer an installed node's iPXE with "boot locally", which is what
//! would make a warm reboot work.
//!
//! Every wait is bounded; QEMU runs under TCG inside the lab's switch namespace, `-nodefaults`.
//! Times are host-clock seconds from the serial logs, printed, never asserted.
mod common;

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, Proc, strip_ansi};
use si_appliance::types::{MacAddr, NodeToken};

/// Bound for the whole deployment (all VMs, firmware to login). Measured: see the printed table.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(1200);
const SERVER: &str = "10.79.0.1";
const IMAGE: &str = "demo";

/// Client kernel + initramfs around this very binary, and the demo image tree (both cached).
fn ensure_assets() -> (PathBuf, PathBuf) {
    (common::client_boot_dir(), common::demo_image())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Boot {
    Net,
    Disk,
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum State {
    Installing,
    DiskBoot,
    Up(String),
    Failed(String),
}

/// One VM: its QEMU (respawned per power-on), its serial lines stamped on the host clock.
struct Vm {
    n: usize,
    mac: MacAddr,
    tap: String,
    disk: PathBuf,
    qemu: Option<Proc>,
    boots: Vec<(Boot, f64)>,
    serial: PathBuf,
    offset: u64,
    partial: String,
    /// (seconds since the test's VMs started, line), over every boot.
    lines: Vec<(f64, String)>,
    /// Index into `lines` where the current boot starts.
    boot_start: usize,
    state: State,
    reset_at: Option<f64>,
}

impl Vm {
    fn new(lab: &Lab, n: usize, disk_bytes: u64) -> Vm {
        let mac: MacAddr = format!("52:54:00:79:01:{n:02x}").parse().expect("mac");
        let tap = format!("tap{n}");
        lab.switch.ip(&["tuntap", "add", &tap, "mode", "tap"]);
        lab.switch.ip(&["link", "set", &tap, "master", "br0"]);
        lab.switch.ip(&["link", "set", &tap, "up"]);
        let disk = lab.path(&format!("disk-{n}.img"));
        let f = fs::File::create(&disk).expect("disk image");
        f.set_len(disk_bytes).expect("sparse disk");
        Vm {
            n,
            mac,
            tap,
            disk,
            qemu: None,
            boots: Vec::new(),
            serial: PathBuf::new(),
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
            boot_start: 0,
            state: State::Installing,
            reset_at: None,
        }
    }

    fn monitor(&self, lab: &Lab) -> PathBuf {
        lab.path(&format!("monitor-{}.sock", self.n))
    }

    /// Powers the VM on (again), NIC or disk first in the boot order.
    fn power_on(&mut self, lab: &Lab, boot: Boot, t: f64) {
        self.drain(t);
        self.serial = lab.path(&format!("serial-{}-{}.log", self.n, self.boots.len() + 1));
        self.offset = 0;
        self.boot_start = self.lines.len();
        self.boots.push((boot, t));
        let (nic, disk) = if boot == Boot::Net { (1, 2) } else { (2, 1) };
        let mut cmd = lab.switch.cmd("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-machine", "pc,graphics=off", "-accel", "tcg", "-display", "none"])
            .args(["-m", "512", "-no-reboot"])
            .args(["-netdev", &format!("tap,id=n0,ifname={},script=no,downscript=no", self.tap)])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={},bootindex={nic}", self.mac)])
            .args(["-drive", &format!("file={},format=raw,if=none,id=d0", self.disk.display())])
            .args(["-device", &format!("virtio-blk-pci,drive=d0,bootindex={disk}")])
            // Entropy for the guest: without RDRAND (TCG) the kernel's pool starts empty and
            // getrandom(2) blocks the installer's swarm client.
            .args(["-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", self.serial.display()))
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", self.monitor(lab).display()));
        let log = lab.path(&format!("qemu-{}.log", self.n));
        self.qemu = Some(Proc::spawn(&format!("qemu-vm{}", self.n), cmd, log));
    }

    /// Reads what the serial file gained since the last call, stamping complete lines with `t`.
    fn drain(&mut self, t: f64) {
        let Ok(mut f) = fs::File::open(&self.serial) else { return };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            self.lines.push((t, strip_ansi(line.trim_end_matches(['\r', '\n']))));
        }
        // A login prompt waits for input after "login: ", with no newline.
        if self.partial.trim_end().ends_with("login:") {
            let line = std::mem::take(&mut self.partial);
            self.lines.push((t, strip_ansi(line.trim_end())));
        }
    }

    fn exited(&mut self) -> bool {
        match &mut self.qemu {
            Some(p) => matches!(p.child.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// Lines of the current boot.
    fn this_boot(&self) -> &[(f64, String)] {
        &self.lines[self.boot_start..]
    }

    /// First time (over all boots from `from` on) a line contains `needle`.
    fn first(&self, needle: &str, from: f64) -> Option<f64> {
        self.lines.iter().find(|(t, l)| *t >= from && l.contains(needle)).map(|(t, _)| *t)
    }

    fn text(&self) -> String {
        self.lines.iter().map(|(t, l)| format!("{t:8.2} {l}\n")).collect()
    }

    /// Sends `system_reset` on the QEMU monitor (with -no-reboot, QEMU then exits). Waits for the
    /// monitor's prompt before the command and after it, so the command is read and done before
    /// the connection closes (a command written before the banner and followed by a close was
    /// once dropped).
    fn reset(&self, lab: &Lab) {
        let mut s = UnixStream::connect(self.monitor(lab)).expect("QEMU monitor socket");
        s.set_read_timeout(Some(Duration::from_millis(500))).ok();
        read_until_prompt(&mut s);
        s.write_all(b"system_reset\n").expect("write to QEMU monitor");
        read_until_prompt(&mut s);
    }
}

/// Reads the QEMU monitor until its `(qemu)` prompt, at most 10 s.
fn read_until_prompt(s: &mut UnixStream) {
    let end = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains("(qemu)") {
                    return;
                }
            }
            Err(_) => {}
        }
    }
}

/// The host name in a `NAME login:` line.
fn login_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if words.peek() == Some(&"login:") {
            return Some(w.to_owned());
        }
    }
    None
}

/// The node's plan, as its installer gets it, through curl inside the appliance's namespace.
fn plan_hostname(lab: &Lab, mac: MacAddr) -> String {
    let secret = fs::read(lab.path("state").join("secret")).expect("appliance secret");
    let token = NodeToken::derive(&secret, mac);
    let out = common::run(
        lab.hosts[0]
            .cmd("curl")
            .args(["-sS", "--max-time", "10", "-H"])
            .arg(format!("Authorization: Bearer {}", token.as_str()))
            .arg(format!("http://{SERVER}/api/nodes/{mac}/plan?firmware=bios")),
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("plan for {mac} is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    plan["hostname"].as_str().unwrap_or_else(|| panic!("plan without hostname: {plan}")).to_owned()
}

fn config(lab: &Lab, client: &Path) -> String {
    format!(
        r#"iface = "eth0"
enroll = "any"
image = "{IMAGE}"
store = "{store}"
state_dir = "{state}"

[dhcp]
mode = "full"
answer = "all"
probe = false

[[dhcp.pool]]
subnet = "10.79.0.0/24"
range = ["10.79.0.100", "10.79.0.150"]

[tftp]
enable = false

[http]
port = 80

[boot]
kernel = "{client}/vmlinuz"
initrd = "{client}/initrd.img"
cmdline = "console=ttyS0 panic=10 si.onfail=poweroff"

[install]
disk = "/dev/vda"
finish = "reboot"
seed_for = "20s"
report_every = "2s"
"#,
        store = lab.path("store").display(),
        state = lab.path("state").display(),
        client = client.display(),
    )
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The installer's log lines name its phase as `phase=<name>`.
fn phase_mark(p: &str) -> String {
    format!("phase={p}")
}

#[test]
fn vms_install_over_the_swarm_and_boot_their_disks_with_faults() {
    let (client, demo) = ensure_assets();
    let mut lab = Lab::new("qi");
    lab.add_host(Some(&format!("{SERVER}/24")), Some("52:54:00:79:00:01"));
    // The RA that spares iPXE its IPv6 wait needs a usable link-local address.
    common::wait_for(Duration::from_secs(10), || {
        let out = lab.hosts[0].cmd("ip").args(["-6", "addr", "show", "dev", "eth0", "scope", "link"]).output().ok()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        (s.contains("fe80::") && !s.contains("tentative")).then_some(())
    });
    let store = lab.path("store");
    let t = Instant::now();
    common::run(
        Command::new(common::appliance_bin())
            .arg("--store")
            .arg(&store)
            .args(["image", "import", IMAGE, "--from"])
            .arg(&demo),
    );
    let import_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let appliance = common::start_appliance(&lab, 0, "appliance", &config(&lab, &client), &[]);
    let ready_s = t.elapsed().as_secs_f64();

    // VM 1: plain install. VM 2: reset while downloading. VM 3: 64 MiB disk, too small.
    const RESET_VM: usize = 2;
    const SMALL_VM: usize = 3;
    let mut vms: Vec<Vm> = (1..=3)
        .map(|n| Vm::new(&lab, n, if n == SMALL_VM { 64 << 20 } else { 2 << 30 }))
        .collect();
    let start = Instant::now();
    for vm in &mut vms {
        vm.power_on(&lab, Boot::Net, 0.0);
    }
    let done = common::wait_for(DEPLOY_TIMEOUT, || {
        let now = start.elapsed().as_secs_f64();
        for vm in vms.iter_mut() {
            vm.drain(now);
            match vm.state.clone() {
                State::Installing => {
                    let boot = vm.this_boot();
                    let failed = boot.iter().find(|(_, l)| l.contains("si-init: FAILED")).map(|(_, l)| l.clone());
                    let downloading = boot.iter().any(|(_, l)| l.contains("downloading + unpacking"));
                    let finished = boot.iter().any(|(_, l)| l.contains("install-done "))
                        && boot.iter().any(|(_, l)| l.contains("reboot: Restarting system"));
                    if let Some(l) = failed {
                        vm.state = State::Failed(l);
                    } else if vm.n == RESET_VM && vm.reset_at.is_none() && downloading {
                        vm.reset(&lab);
                        vm.reset_at = Some(now);
                    } else if vm.exited() {
                        if finished {
                            vm.state = State::DiskBoot;
                            vm.power_on(&lab, Boot::Disk, now);
                        } else if vm.boots.len() < 4 {
                            vm.power_on(&lab, Boot::Net, now);
                        } else {
                            vm.state = State::Failed("powered off four times without finishing".into());
                        }
                    }
                }
                State::DiskBoot => {
                    if let Some(name) = vm.this_boot().iter().find_map(|(_, l)| login_name(l)) {
                        vm.state = State::Up(name);
                    } else if vm.exited() {
                        vm.state = State::Failed("QEMU stopped while booting from the disk".into());
                    }
                }
                State::Up(_) | State::Failed(_) => {}
            }
        }
        vms.iter().all(|v| matches!(v.state, State::Up(_) | State::Failed(_))).then_some(())
    });
    let total = start.elapsed().as_secs_f64();
    let app_log = strip_ansi(&appliance.log_text());

    // The table: host seconds since the VMs were powered on.
    let mut table = format!(
        "qemu_install: import {import_s:.1} s, appliance ready (pack) {ready_s:.1} s, deployment {total:.1} s\n\
         {:<3} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  result\n",
        "vm", "files", "kernel", "init", "plan", "part", "dl+unp", "config", "loader", "done", "reboot", "login"
    );
    for vm in &vms {
        // Phases of the last network boot (after a reset, the clean install).
        let from = vm.boots.iter().filter(|(b, _)| *b == Boot::Net).map(|(_, t)| *t).fold(0.0, f64::max);
        let f = |n: &str| vm.first(n, from).map(|t| format!("{:.1}", t - from)).unwrap_or_else(|| "-".into());
        let reboot = vm.boots.iter().find(|(b, _)| *b == Boot::Disk).map(|(_, t)| *t);
        let login = reboot.and_then(|r| vm.lines.iter().find(|(t, l)| *t >= r && login_name(l).is_some()).map(|(t, _)| *t));
        let rel = |x: Option<f64>| x.map(|t| format!("{:.1}", t - from)).unwrap_or_else(|| "-".into());
        writeln!(
            table,
            "{:<3} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  {:?}{}",
            vm.n,
            f("/boot/initrd.img"),
            f("Kernel command line:"),
            f("si-init: running"),
            f(&phase_mark("installer")),
            f(&phase_mark("partitioning")),
            f(&phase_mark("downloading")),
            f(&phase_mark("configuring")),
            f(&phase_mark("boot-loader")),
            f("install-done "),
            rel(reboot),
            rel(login),
            vm.state,
            vm.reset_at.map(|t| format!(" (reset at {t:.1} s)")).unwrap_or_default(),
        )
        .unwrap();
    }
    println!("{table}");
    let context = |vm: &Vm| {
        format!("{table}\n--- VM {} serial (tail) ---\n{}\n--- appliance (tail) ---\n{}", vm.n, tail(&vm.text(), 80), tail(&app_log, 60))
    };
    if done.is_none() {
        let v = vms.iter().find(|v| !matches!(v.state, State::Up(_) | State::Failed(_))).expect("an unfinished VM");
        panic!("deployment not finished within {DEPLOY_TIMEOUT:?}\n{}", context(v));
    }

    // VMs 1 and 2 run the installed Debian under the host name their plan gave them.
    let mut names = Vec::new();
    for vm in vms.iter().filter(|v| v.n != SMALL_VM) {
        let State::Up(name) = &vm.state else { panic!("VM {} did not come up: {:?}\n{}", vm.n, vm.state, context(vm)) };
        let want = plan_hostname(&lab, vm.mac);
        assert_eq!(name, &want, "VM {}: login prompt host name vs plan\n{}", vm.n, context(vm));
        assert_ne!(name, "demo", "VM {} kept the image's host name\n{}", vm.n, context(vm));
        names.push(name.clone());
    }
    assert_ne!(names[0], names[1], "two nodes with one host name\n{table}");

    // VM 2 was reset while downloading, booted from the network again and installed cleanly.
    let v2 = &vms[RESET_VM - 1];
    assert!(v2.reset_at.is_some(), "VM 2 was never seen downloading, so never reset\n{}", context(v2));
    let net_boots = v2.boots.iter().filter(|(b, _)| *b == Boot::Net).count();
    assert!(net_boots >= 2, "VM 2 did not PXE-boot again after its reset\n{}", context(v2));

    // VM 3: refused with the reason, reported failed, disk left blank; the others completed.
    let v3 = &vms[SMALL_VM - 1];
    let State::Failed(why) = &v3.state else { panic!("VM 3 (64 MiB disk) did not fail: {:?}\n{}", v3.state, context(v3)) };
    assert!(
        v3.text().to_lowercase().contains("too small"),
        "VM 3 failed without saying the disk is too small: {why}\n{}",
        context(v3)
    );
    let mut head = vec![0u8; 1 << 20];
    fs::File::open(&v3.disk).and_then(|mut f| f.read_exact(&mut head)).expect("read VM 3 disk");
    assert!(head.iter().all(|b| *b == 0), "VM 3's disk was written to\n{}", context(v3));
    // The appliance heard it: its node API shows the failure with the reason (once the monitor's
    // routes are there; before, only the installer's console says it).
    let out = common::run(
        lab.hosts[0]
            .cmd("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg(format!("http://{SERVER}/api/nodes/{}", v3.mac)),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    if code == "404" {
        println!("the appliance has no /api/nodes/<mac> route yet: VM 3's failure checked on its console only");
    } else {
        assert_eq!(code, "200", "GET /api/nodes/{}: {text}", v3.mac);
        assert!(body.contains("failed") && body.contains("too small"), "VM 3 not reported failed with the reason: {body}\n{}", context(v3));
    }

    drop(vms);
    drop(appliance);
    let _ = fs::remove_dir_all(&lab.dir);
}
