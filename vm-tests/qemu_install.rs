//! The main job in the test command, as a real rack would run it: QEMU VMs, enrolled by MAC
//! in the appliance's reservations and booting from the network first at every power-on,
//! PXE-boot into the client initramfs (pxe-assets/build-client.sh), `si-appliance install`
//! writes the demo image (qemu/make-demo-image.sh) onto their blank virtual disks through the
//! swarm, they reboot, the appliance answers their next network boot with "boot from your disk"
//! (iPXE `exit`), and the serial console shows each node's own host name in its login prompt
//! (`rack-01 login:`), the name of its reservation.
//!
//! VM 2 runs OVMF (UEFI: GPT with an ESP, GRUB x86_64-efi `--removable`), the others SeaBIOS.
//!
//! Faults, in the same run to keep it cheap (one appliance, one image pack, VMs in parallel):
//! - one VM is reset (QEMU monitor `system_reset`) while it downloads: it boots from the network
//!   again and completes a clean install;
//! - one VM has a disk too small for the image: its installer refuses it with the reason, the
//!   appliance hears `failed`, the disk stays blank, `si-appliance node log` prints its console,
//!   and the other VMs complete;
//! - the appliance is killed (SIGKILL) and restarted when the first VM reboots after its
//!   install: the installed nodes still boot from their disks;
//! - `si-appliance node reimage` of VM 1 once it is up, then a reset: it installs again and
//!   comes back to its login prompt;
//! - a rogue host beside the nodes runs a DHCP server (dnsmasq) handing out another subnet's
//!   addresses to every client, the installers' included: every node still boots and installs
//!   from the appliance, which warns about the foreign server.
//!
//! QEMU runs with `-no-reboot`, NIC first in the boot order: a reboot ends QEMU and the test
//! powers the VM on again, always from the network.
//!
//! Every wait is bounded; QEMU runs under TCG inside the lab's switch namespace, `-nodefaults`.
//! Times are host-clock seconds from the serial logs, printed, never asserted.
mod common;

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, Proc, Serial, login_name, strip_ansi};
use si_appliance::types::MacAddr;

/// Bound for the whole deployment (all VMs, firmware to login). Measured: see the printed table.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(1200);
const SERVER: &str = "10.79.0.1";
const IMAGE: &str = "demo";

/// Client kernel + initramfs around this very binary, and the demo image tree (both cached).
fn ensure_assets() -> (PathBuf, PathBuf) {
    (common::client_boot_dir(), common::demo_image())
}

/// The VM's firmware.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Firmware {
    /// SeaBIOS, QEMU's iPXE as the NIC's option ROM.
    Bios,
    /// OVMF (Debian's `ovmf`), the same ROM's EFI driver.
    Uefi,
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// What a power-on is expected to do (QEMU always boots the NIC first).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Boot {
    /// Run the installer.
    Install,
    /// Be told "boot from your disk" and reach the installed system.
    Local,
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum State {
    Installing,
    LocalBoot,
    Up(String),
    Failed(String),
}

/// One VM: its QEMU (respawned per power-on), its serial lines stamped on the host clock.
struct Vm {
    n: usize,
    firmware: Firmware,
    mac: MacAddr,
    tap: String,
    disk: PathBuf,
    qemu: Option<Proc>,
    /// (what it was for, when, install round: 1, or 2 after `node reimage`).
    boots: Vec<(Boot, f64, u32)>,
    round: u32,
    /// Its serial lines (seconds since the test's VMs started), over every boot.
    serial: Serial,
    /// Index into `lines` where the current boot starts.
    boot_start: usize,
    state: State,
    reset_at: Option<f64>,
}

impl Vm {
    fn new(lab: &Lab, n: usize, disk_bytes: u64, firmware: Firmware) -> Vm {
        let mac = vm_mac(n);
        let tap = format!("tap{n}");
        lab.switch.ip(&["tuntap", "add", &tap, "mode", "tap"]);
        lab.switch.ip(&["link", "set", &tap, "master", "br0"]);
        lab.switch.ip(&["link", "set", &tap, "up"]);
        let disk = lab.path(&format!("disk-{n}.img"));
        let f = fs::File::create(&disk).expect("disk image");
        f.set_len(disk_bytes).expect("sparse disk");
        if firmware == Firmware::Uefi {
            // Its own variable store, kept across its power-ons.
            fs::copy(OVMF_VARS, lab.path(&format!("ovmf-vars-{n}.fd"))).expect("OVMF_VARS.fd (package ovmf)");
        }
        Vm {
            n,
            firmware,
            mac,
            tap,
            disk,
            qemu: None,
            boots: Vec::new(),
            round: 1,
            serial: Serial::new(PathBuf::new()),
            boot_start: 0,
            state: State::Installing,
            reset_at: None,
        }
    }

    fn monitor(&self, lab: &Lab) -> PathBuf {
        lab.path(&format!("monitor-{}.sock", self.n))
    }

    /// Powers the VM on (again), always NIC first in the boot order, as a rack's servers are set.
    fn power_on(&mut self, lab: &Lab, boot: Boot, t: f64) {
        self.drain(t);
        self.serial.switch_to(lab.path(&format!("serial-{}-{}.log", self.n, self.boots.len() + 1)));
        self.boot_start = self.serial.lines.len();
        self.boots.push((boot, t, self.round));
        let (nic, disk) = (1, 2);
        let mut cmd = lab.switch.cmd("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-machine", "pc,graphics=off", "-accel", "tcg", "-display", "none"])
            .args(["-m", "512", "-no-reboot"]);
        if self.firmware == Firmware::Uefi {
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"));
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", lab.path(&format!("ovmf-vars-{}.fd", self.n)).display()));
            // OVMF's own PXE/HTTP boot options (over iPXE's SNP) come after iPXE's and before the
            // disk: after iPXE's `exit` it would try each for minutes. Off, as in a rack's set-up.
            for k in ["IPv4PXESupport", "IPv6PXESupport", "IPv4Support", "IPv6Support"] {
                cmd.arg("-fw_cfg").arg(format!("name=opt/org.tianocore/{k},string=no"));
            }
        }
        cmd
            .args(["-netdev", &format!("tap,id=n0,ifname={},script=no,downscript=no", self.tap)])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={},bootindex={nic}", self.mac)])
            .args(["-drive", &format!("file={},format=raw,if=none,id=d0", self.disk.display())])
            .args(["-device", &format!("virtio-blk-pci,drive=d0,bootindex={disk}")])
            // Entropy for the guest: without RDRAND (TCG) the kernel's pool starts empty and
            // getrandom(2) blocks the installer's swarm client.
            .args(["-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", self.serial.path().display()))
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", self.monitor(lab).display()));
        let log = lab.path(&format!("qemu-{}.log", self.n));
        self.qemu = Some(Proc::spawn(&format!("qemu-vm{}", self.n), cmd, log));
    }

    /// Reads what the serial file gained since the last call, stamping complete lines with `t`.
    fn drain(&mut self, t: f64) {
        self.serial.drain(t);
    }

    fn exited(&mut self) -> bool {
        match &mut self.qemu {
            Some(p) => matches!(p.child.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// Lines of the current boot.
    fn this_boot(&self) -> &[(f64, String)] {
        &self.serial.lines[self.boot_start..]
    }

    /// First time (over all boots from `from` on) a line contains `needle`.
    fn first(&self, needle: &str, from: f64) -> Option<f64> {
        self.serial.first_after(needle, from)
    }

    fn text(&self) -> String {
        self.serial.tail(usize::MAX)
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


/// The host name of VM `n`'s reservation (what its plan names it).
fn hostname(n: usize) -> String {
    format!("rack-{n:02}")
}

fn vm_mac(n: usize) -> MacAddr {
    format!("52:54:00:79:01:{n:02x}").parse().expect("mac")
}

/// `si-appliance node …` in the appliance's namespace (admin token from the state directory).
fn node_cmd(lab: &Lab, args: &[&str]) -> String {
    let out = common::run(
        lab.hosts[0].cmd(common::appliance_bin()).arg("--state-dir").arg(lab.path("state")).arg("node").args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config(lab: &Lab, client: &Path) -> String {
    format!(
        r#"iface = "eth0"
image = "{IMAGE}"
store = "{store}"
state_dir = "{state}"
# enroll = "listed" (the default): only the reservations below are installed.

[dhcp]
mode = "full"
answer = "all"
probe = false

[[dhcp.pool]]
subnet = "10.79.0.0/24"
range = ["10.79.0.100", "10.79.0.150"]

[[dhcp.reservation]]
mac = "{m1}"
hostname = "{h1}"
group = "rack"

[[dhcp.reservation]]
mac = "{m2}"
hostname = "{h2}"
group = "rack"

[[dhcp.reservation]]
mac = "{m3}"
hostname = "{h3}"
group = "rack"

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
        m1 = vm_mac(1), m2 = vm_mac(2), m3 = vm_mac(3),
        h1 = hostname(1), h2 = hostname(2), h3 = hostname(3),
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
    // A rogue host beside the nodes, as on a production switch: a DHCP server (dnsmasq) that
    // hands out addresses of another subnet to anyone who asks, the installers' udhcpc included.
    // A node that took its lease could not reach the appliance. iPXE keeps our offer (option
    // 175: no-pxedhcp, priority 127); the initramfs accepts only the server named by si.server.
    lab.add_host(Some("10.80.0.250/24"), Some("52:54:00:80:00:fa"));
    let mut dq = lab.hosts[1].cmd("dnsmasq");
    dq.args(["--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=eth0", "--bind-interfaces"])
        .args(["--user=root", "--group=root", "--log-dhcp", "--log-facility=-", "--dhcp-authoritative", "--no-ping"])
        .arg("--dhcp-range=10.80.0.100,10.80.0.150,1h")
        .arg(format!("--dhcp-leasefile={}", lab.path("rogue.leases").display()))
        .arg(format!("--pid-file={}", lab.path("rogue.pid").display()));
    let mut rogue = Proc::spawn("rogue-dnsmasq", dq, lab.path("rogue.log"));
    rogue.wait_log("DHCP, IP range", Duration::from_secs(20));
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
    let cfg = config(&lab, &client);
    let mut appliance = common::start_appliance(&lab, 0, "appliance", &cfg, &[]);
    let ready_s = t.elapsed().as_secs_f64();
    // The appliance killed with SIGKILL and started again (when the first VM reboots).
    let mut restarted: Option<(f64, Proc)> = None;

    // VM 1 (BIOS): plain install, then re-imaged. VM 2 (UEFI, OVMF): reset while downloading.
    // VM 3 (BIOS): 64 MiB disk.
    const REIMAGE_VM: usize = 1;
    const RESET_VM: usize = 2;
    const SMALL_VM: usize = 3;
    let mut vms: Vec<Vm> = (1..=3)
        .map(|n| {
            let fw = if n == RESET_VM { Firmware::Uefi } else { Firmware::Bios };
            Vm::new(&lab, n, if n == SMALL_VM { 64 << 20 } else { 2 << 30 }, fw)
        })
        .collect();
    let start = Instant::now();
    for vm in &mut vms {
        vm.power_on(&lab, Boot::Install, 0.0);
    }
    let mut reimaged_at: Option<f64> = None;
    let done = common::wait_for(DEPLOY_TIMEOUT, || {
        let now = start.elapsed().as_secs_f64();
        for vm in vms.iter_mut() {
            vm.drain(now);
            match vm.state.clone() {
                State::Installing => {
                    let boot = vm.this_boot();
                    let failed = boot.iter().find(|(_, l)| l.contains("si-init: FAILED")).map(|(_, l)| l.clone());
                    let downloading = boot.iter().any(|(_, l)| l.contains("downloading + unpacking"));
                    // `install-done` is the installer's last line; `phase=seeding` means the disk
                    // is complete too (the line has been lost to a reboot right after it).
                    let finished = boot.iter().any(|(_, l)| l.contains("install-done ") || l.contains(&phase_mark("seeding")))
                        && boot.iter().any(|(_, l)| l.contains("reboot: Restarting system"));
                    if let Some(l) = failed {
                        vm.state = State::Failed(l);
                    } else if vm.n == RESET_VM && vm.reset_at.is_none() && downloading {
                        vm.reset(&lab);
                        vm.reset_at = Some(now);
                    } else if vm.exited() {
                        if finished {
                            if restarted.is_none() {
                                // Between an install and the reboot: the node records must be on disk.
                                appliance.kill();
                                let p = common::start_appliance(&lab, 0, "appliance-2", &cfg, &[]);
                                restarted = Some((start.elapsed().as_secs_f64(), p));
                            }
                            vm.state = State::LocalBoot;
                            vm.power_on(&lab, Boot::Local, start.elapsed().as_secs_f64());
                        } else if vm.boots.iter().filter(|b| b.2 == vm.round).count() < 4 {
                            vm.power_on(&lab, Boot::Install, now);
                        } else {
                            vm.state = State::Failed("powered off four times without finishing".into());
                        }
                    }
                }
                State::LocalBoot => {
                    if vm.this_boot().iter().any(|(_, l)| l.contains("si-init: running")) {
                        vm.state = State::Failed("its network boot ran the installer again instead of its disk".into());
                    } else if let Some(name) = vm.this_boot().iter().find_map(|(_, l)| login_name(l)) {
                        if vm.n == REIMAGE_VM && vm.round == 1 {
                            // Re-image on demand: marked, then reset; the next boot installs.
                            let out = node_cmd(&lab, &["reimage", &vm.mac.to_string()]);
                            assert!(out.contains("marked"), "node reimage: {out}");
                            reimaged_at = Some(now);
                            vm.round = 2;
                            vm.state = State::Installing;
                            vm.reset(&lab);
                        } else {
                            vm.state = State::Up(name);
                        }
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
    let app_log = strip_ansi(&format!(
        "{}{}",
        appliance.log_text(),
        restarted.as_ref().map(|(_, p)| p.log_text()).unwrap_or_default()
    ));

    // The table: host seconds since the install's power-on, one row per VM and install round.
    let mut table = format!(
        "qemu_install: import {import_s:.1} s, appliance ready (pack) {ready_s:.1} s, deployment {total:.1} s{}{}\n\
         {:<5} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  result\n",
        restarted.as_ref().map(|(t, _)| format!(", appliance killed -9 and restarted at {t:.1} s")).unwrap_or_default(),
        reimaged_at.map(|t| format!(", VM {REIMAGE_VM} re-imaged at {t:.1} s")).unwrap_or_default(),
        "vm", "files", "kernel", "init", "plan", "part", "dl+unp", "config", "loader", "done", "reboot", "login"
    );
    for vm in &vms {
        for round in 1..=vm.round {
            // The last install boot of the round (after a reset, the clean install).
            let Some(from) = vm.boots.iter().filter(|b| b.0 == Boot::Install && b.2 == round).map(|b| b.1).reduce(f64::max) else {
                continue;
            };
            let f = |n: &str| vm.first(n, from).map(|t| format!("{:.1}", t - from)).unwrap_or_else(|| "-".into());
            let reboot = vm.boots.iter().find(|b| b.0 == Boot::Local && b.2 == round).map(|b| b.1);
            let login = reboot.and_then(|r| vm.serial.lines.iter().find(|(t, l)| *t >= r && login_name(l).is_some()).map(|(t, _)| *t));
            let rel = |x: Option<f64>| x.map(|t| format!("{:.1}", t - from)).unwrap_or_else(|| "-".into());
            writeln!(
                table,
                "{:<5} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  {}{}",
                format!("{}.{round}{}", vm.n, if vm.firmware == Firmware::Uefi { "u" } else { "b" }),
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
                if round < vm.round { "re-imaged".to_owned() } else { format!("{:?}", vm.state) },
                vm.reset_at.filter(|_| round == 1).map(|t| format!(" (reset at {t:.1} s)")).unwrap_or_default(),
            )
            .unwrap();
        }
    }
    println!("{table}");
    let context = |vm: &Vm| {
        format!("{table}\n--- VM {} serial (tail) ---\n{}\n--- appliance (tail) ---\n{}", vm.n, tail(&vm.text(), 80), tail(&app_log, 60))
    };
    if done.is_none() {
        let v = vms.iter().find(|v| !matches!(v.state, State::Up(_) | State::Failed(_))).expect("an unfinished VM");
        panic!("deployment not finished within {DEPLOY_TIMEOUT:?}\n{}", context(v));
    }
    assert!(restarted.is_some(), "the appliance was never restarted\n{table}");

    // VMs 1 and 2 run the installed Debian under their reservations' host names, reached by a
    // network boot that the appliance answered with "boot from your disk".
    for vm in vms.iter().filter(|v| v.n != SMALL_VM) {
        let State::Up(name) = &vm.state else { panic!("VM {} did not come up: {:?}\n{}", vm.n, vm.state, context(vm)) };
        assert_eq!(name, &hostname(vm.n), "VM {}: login prompt host name vs reservation\n{}", vm.n, context(vm));
        let local = app_log.lines().filter(|l| l.contains("installed: told to boot from its disk") && l.contains(&vm.mac.to_string())).count();
        assert!(local >= 1, "VM {}: the appliance never told it to boot locally\n{}", vm.n, context(vm));
    }
    // VM 1 was re-imaged: installed twice, each time followed by a local boot to its prompt.
    let v1 = &vms[REIMAGE_VM - 1];
    assert_eq!(v1.round, 2, "VM 1 was not re-imaged\n{}", context(v1));
    assert_eq!(v1.boots.iter().filter(|b| b.0 == Boot::Local).count(), 2, "VM 1 boots: {:?}\n{}", v1.boots, context(v1));
    let list: serde_json::Value = serde_json::from_str(&node_cmd(&lab, &["list", "--json"])).expect("node list --json");
    let rec = |n: usize| {
        list["nodes"].as_array().into_iter().flatten().find(|r| r["mac"] == vm_mac(n).to_string()).cloned().unwrap_or_default()
    };
    assert_eq!((rec(1)["state"].as_str(), rec(1)["installs"].as_u64()), (Some("installed"), Some(2)), "{list}");
    assert_eq!((rec(2)["state"].as_str(), rec(2)["installs"].as_u64()), (Some("installed"), Some(1)), "{list}");
    assert_eq!(rec(3)["state"], "failed", "{list}");

    // VM 2 was reset while downloading, booted from the network again and installed cleanly.
    let v2 = &vms[RESET_VM - 1];
    assert!(v2.reset_at.is_some(), "VM 2 was never seen downloading, so never reset\n{}", context(v2));
    let installs = v2.boots.iter().filter(|b| b.0 == Boot::Install).count();
    assert!(installs >= 2, "VM 2 did not PXE-boot again after its reset\n{}", context(v2));

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
    // The appliance heard it (before its restart): the record says failed with the reason, and
    // `node log` prints the installer's console.
    assert!(rec(3)["error"].as_str().is_some_and(|e| e.contains("too small")), "{list}");
    let console = node_cmd(&lab, &["log", &v3.mac.to_string()]);
    println!("--- node log {} (VM 3) ---\n{}", v3.mac, tail(&console, 12));
    assert!(console.to_lowercase().contains("too small"), "node log of VM 3: {console}");

    // The rogue server was there all along and answered the nodes (its log has its offers), and
    // the appliance saw it and said so.
    let rogue_log = rogue.log_text();
    let rogue_offers = rogue_log.lines().filter(|l| l.contains("DHCPOFFER")).count();
    println!("rogue DHCP server: {rogue_offers} offers made");
    assert!(rogue_offers > 0, "the rogue DHCP server never answered:\n{}", tail(&rogue_log, 20));
    assert!(
        app_log.lines().any(|l| l.contains("WARN") && l.to_lowercase().contains("dhcp server") && l.contains("10.80.0.250")),
        "the appliance never warned about the foreign DHCP server 10.80.0.250\n{}",
        tail(&app_log, 40)
    );

    drop(vms);
    drop(appliance);
    drop(restarted);
    drop(rogue);
    let _ = fs::remove_dir_all(&lab.dir);
}
