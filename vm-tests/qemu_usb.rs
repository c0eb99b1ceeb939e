//! The appliance on its USB stick (pxe-assets/build-usb.sh), as an operator uses it: the stick
//! image is prepared on a workstation (`si-appliance usb add-image … --default --enroll`), a
//! machine boots it as its only disk (QEMU, the stick on a USB xHCI controller, SeaBIOS), the
//! appliance comes up by itself on the first wired interface with carrier in the safe default
//! mode (probe for another DHCP server, PXE clients only, enrolled nodes only), and a rack node
//! (a QEMU VM booting from the network first) installs the image from it and reaches its login
//! prompt. Then the appliance machine loses power (QEMU killed), the stick is read offline
//! (leases, node records, the node's console, the end-of-run report are on its data
//! partition), and the stick boots again, this time under UEFI with Secure Boot on (OVMF with
//! Microsoft's keys enrolled, as machines ship: the stick's shim → signed GRUB → Debian's
//! kernel): the node, powered on again from the network, is told to boot from its disk, with
//! the same address as before.
//!
//! Every wait is bounded; both VMs run under TCG in the lab's switch namespace. Times are
//! host-clock seconds, printed (the per-phase table compares with qemu_install's, where the
//! appliance runs in a namespace), never asserted.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, Proc, Serial};
use si_appliance::types::MacAddr;

/// The stick's address when its interface has none (network.conf on the data partition).
const STICK_IP: &str = "10.0.0.1";
const IMAGE: &str = "demo";
const NODE_MAC: &str = "52:54:00:0a:01:01";
const NODE_NAME: &str = "usbnode1";
/// The stick is made this big (a 2 GiB stick written with dd); the data partition grows to it.
const STICK_BYTES: u64 = 2 << 30;
/// OVMF built with Secure Boot (SMM) and a variable store with Microsoft's keys enrolled and
/// Secure Boot on (package ovmf).
const OVMF_SB_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
const OVMF_SB_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Firmware {
    Bios,
    /// OVMF with Secure Boot on.
    UefiSecureBoot,
}

/// One QEMU run (a power-on until power-off); killed on drop.
struct Qemu {
    proc: Proc,
    serial: Serial,
    started: Instant,
}

impl Qemu {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn drain(&mut self) {
        let t = self.now();
        self.serial.drain(t);
    }

    fn exited(&mut self) -> bool {
        matches!(self.proc.child.try_wait(), Ok(Some(_)))
    }

    /// Waits (bounded) until `done` says yes about the serial console, or QEMU stops.
    fn wait(&mut self, what: &str, timeout: Duration, done: impl Fn(&Serial) -> bool) -> Result<f64, String> {
        let end = Instant::now() + timeout;
        loop {
            self.drain();
            if done(&self.serial) {
                return Ok(self.now());
            }
            if self.exited() {
                self.drain();
                if done(&self.serial) {
                    return Ok(self.now());
                }
                return Err(format!("QEMU stopped before {what}\n{}", self.serial.tail(60)));
            }
            if Instant::now() > end {
                return Err(format!("no {what} within {timeout:?}\n{}", self.serial.tail(60)));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn firmware_args(cmd: &mut Command, fw: Firmware, vars: &Path) {
    match fw {
        Firmware::Bios => {
            cmd.args(["-machine", "pc"]);
        }
        // The secure variable store needs SMM, which needs q35.
        Firmware::UefiSecureBoot => {
            cmd.args(["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
    }
    if fw == Firmware::UefiSecureBoot {
        cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_SB_CODE}"));
        cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
        // OVMF's own network boot options would be tried for minutes before the next entry.
        for k in ["IPv4PXESupport", "IPv6PXESupport", "IPv4Support", "IPv6Support"] {
            cmd.arg("-fw_cfg").arg(format!("name=opt/org.tianocore/{k},string=no"));
        }
    }
}

/// The appliance machine: the stick as its only disk (USB mass storage on xHCI), one NIC on the
/// lab switch without a boot ROM (it boots the stick, never the network).
fn boot_stick(lab: &Lab, stick: &Path, fw: Firmware, run: usize) -> Qemu {
    let serial = lab.path(&format!("appliance-serial-{run}.log"));
    let mut cmd = lab.switch.cmd("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-accel", "tcg", "-display", "none", "-m", "1024"]);
    firmware_args(&mut cmd, fw, &lab.path("appliance-vars.fd"));
    cmd.args(["-drive", &format!("file={},format=raw,if=none,id=stick,cache=writeback", stick.display())])
        .args(["-device", "qemu-xhci,id=xhci", "-device", "usb-storage,bus=xhci.0,drive=stick,bootindex=1"])
        .args(["-netdev", "tap,id=n0,ifname=tapa,script=no,downscript=no"])
        .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:0a:00:01,romfile="])
        .args(["-device", "virtio-rng-pci"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
    let proc = Proc::spawn(&format!("appliance-vm-{run}"), cmd, lab.path(&format!("appliance-qemu-{run}.log")));
    Qemu { proc, serial: Serial::new(serial), started: Instant::now() }
}

/// The rack node: NIC first in the boot order at every power-on, a blank 2 GiB disk, SeaBIOS;
/// `-no-reboot`: a reboot ends QEMU and the test powers it on again.
fn power_on_node(lab: &Lab, disk: &Path, run: usize) -> Qemu {
    let serial = lab.path(&format!("node-serial-{run}.log"));
    let mut cmd = lab.switch.cmd("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-machine", "pc,graphics=off", "-accel", "tcg", "-display", "none", "-m", "512", "-no-reboot"])
        .args(["-netdev", "tap,id=n0,ifname=tapn,script=no,downscript=no"])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={NODE_MAC},bootindex=1")])
        .args(["-drive", &format!("file={},format=raw,if=none,id=d0", disk.display())])
        .args(["-device", "virtio-blk-pci,drive=d0,bootindex=2"])
        .args(["-device", "virtio-rng-pci"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()));
    let proc = Proc::spawn(&format!("node-{run}"), cmd, lab.path(&format!("node-qemu-{run}.log")));
    Qemu { proc, serial: Serial::new(serial), started: Instant::now() }
}

/// `si-appliance status --json` against the stick, from the operator's host; None while it
/// does not answer.
fn status(lab: &Lab) -> Option<serde_json::Value> {
    let out = lab.hosts[0]
        .cmd(common::appliance_bin())
        .args(["status", "--json", "--server", &format!("{STICK_IP}:80")])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits until the appliance on the stick answers; returns the status and the seconds since
/// the machine's power-on.
fn wait_ready(lab: &Lab, vm: &mut Qemu, timeout: Duration) -> (serde_json::Value, f64) {
    let got = common::wait_for(timeout, || {
        vm.drain();
        if vm.exited() {
            return Some(None);
        }
        status(lab).map(Some)
    });
    match got.flatten() {
        Some(s) => (s, vm.now()),
        None => panic!("the appliance on the stick did not answer within {timeout:?}\n{}", vm.serial.tail(80)),
    }
}

/// The IPv4 address iPXE reports for its network device (`net0: 10.0.0.123/255.255.255.0 …`).
fn ipxe_address(s: &Serial) -> Option<String> {
    s.lines.iter().find_map(|(_, l)| {
        let rest = l.trim().strip_prefix("net0: ")?;
        let ip = rest.split(['/', ' ']).next()?;
        ip.parse::<std::net::Ipv4Addr>().ok().map(|a| a.to_string())
    })
}

fn login_name(s: &Serial) -> Option<String> {
    s.lines.iter().find_map(|(_, l)| common::login_name(l))
}

#[test]
fn the_stick_boots_bios_and_uefi_images_a_node_and_keeps_its_state_across_a_power_cut() {
    let t_all = Instant::now();
    let client = common::client_boot_dir();
    let demo = common::demo_image();
    let cached = common::cache_root().join("usb/si-appliance-usb.img");
    common::run_builder(
        "pxe-assets/build-usb.sh",
        &[&cached],
        &[("SI_APPLIANCE_BIN", common::appliance_bin()), ("SI_CLIENT_BOOT", &client.to_string_lossy())],
    );
    let built_s = t_all.elapsed().as_secs_f64();
    let mut lab = Lab::new("qu");
    let _cleanup = common::RemoveOnSuccess(lab.dir.clone());
    // The operator's workstation on the same switch (reads the dashboard's API).
    lab.add_host(Some("10.0.0.250/24"), Some("52:54:00:0a:00:fa"));
    for tap in ["tapa", "tapn"] {
        lab.switch.ip(&["tuntap", "add", tap, "mode", "tap"]);
        lab.switch.ip(&["link", "set", tap, "master", "br0"]);
        lab.switch.ip(&["link", "set", tap, "up"]);
    }

    // On the workstation: a copy of the built image as "the stick", made as big as a 2 GiB
    // stick, with the demo image added as the default and the node enrolled.
    let stick = lab.path("stick.img");
    common::run(Command::new("cp").arg("--sparse=always").arg(&cached).arg(&stick));
    fs::OpenOptions::new().write(true).open(&stick).and_then(|f| f.set_len(STICK_BYTES)).expect("stick size");
    let t = Instant::now();
    let out = common::run(
        Command::new(common::appliance_bin())
            .args(["usb", "add-image"])
            .arg(&stick)
            .arg(IMAGE)
            .arg(&demo)
            .args(["--default", "--enroll", &format!("{NODE_MAC}={NODE_NAME}")]),
    );
    let add_s = t.elapsed().as_secs_f64();
    println!("usb add-image: {add_s:.1} s\n{}", String::from_utf8_lossy(&out.stdout));

    // 1. SeaBIOS boots the stick; the appliance picks its interface by itself.
    let mut app = boot_stick(&lab, &stick, Firmware::Bios, 1);
    let (st, bios_ready) = wait_ready(&lab, &mut app, Duration::from_secs(300));
    let serving = &st["deployment"]["serving"];
    println!("stick (SeaBIOS) ready after {bios_ready:.1} s: serving {serving}");
    assert!(
        serving["chosen"].as_str().is_some_and(|c| c.contains("carrier")) && serving["ip"] == STICK_IP,
        "the appliance should say it picked the first wired interface with carrier: {st}"
    );

    // 2. The node installs from it and boots its disk.
    let disk = lab.path("node-disk.img");
    fs::File::create(&disk).and_then(|f| f.set_len(2 << 30)).expect("node disk");
    let mut node = power_on_node(&lab, &disk, 1);
    let install = node.wait("the install's reboot", Duration::from_secs(900), |s| {
        (s.has("install-done ") || s.has("phase=seeding")) && s.has("reboot: Restarting system")
    });
    let install_s = install.unwrap_or_else(|e| panic!("node install: {e}\n--- appliance serial ---\n{}", app.serial.tail(30)));
    assert!(!node.serial.has("si-init: FAILED"), "{}", node.serial.tail(60));
    let _ = node.proc.wait_exit(Duration::from_secs(30));
    let first_ip = ipxe_address(&node.serial);
    let phases: Vec<(String, Option<f64>)> = [
        ("files", "/boot/initrd.img"),
        ("kernel", "Kernel command line:"),
        ("init", "si-init: running"),
        ("plan", "phase=installer"),
        ("part", "phase=partitioning"),
        ("dl+unp", "phase=downloading"),
        ("config", "phase=configuring"),
        ("loader", "phase=boot-loader"),
        ("done", "install-done "),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), node.serial.first_after(n, 0.0)))
    .collect();
    let mut node2 = power_on_node(&lab, &disk, 2);
    let login1 = node2.wait("the login prompt", Duration::from_secs(300), |s| login_name(s).is_some());
    let login1 = login1.unwrap_or_else(|e| panic!("node's first boot from disk: {e}"));
    assert_eq!(login_name(&node2.serial).as_deref(), Some(NODE_NAME), "{}", node2.serial.tail(20));
    drop(node2);
    let before = status(&lab).expect("status before the power cut");
    let nodes = before["nodes"].as_array().cloned().unwrap_or_default();
    let rec = nodes.iter().find(|n| n["mac"] == NODE_MAC).cloned().unwrap_or_default();
    assert_eq!(rec["phase"], "done", "the dashboard's view of the node: {before}");

    // 3. Power cut: QEMU killed, no shutdown. The stick read offline, as on a workstation.
    drop(app);
    let (leases, records, console, reports, log) = {
        let data = si_appliance::usb::DataPartition::mount(&stick).expect("mount the stick's data partition");
        let root = data.path();
        let mut leases = si_appliance::dhcp::leases::Leases::new();
        let bytes = fs::read(root.join("state").join(si_appliance::dhcp::leases::Journal::FILE)).expect("lease journal");
        si_appliance::dhcp::leases::replay(&bytes, &mut leases);
        let mut records = std::collections::BTreeMap::new();
        let bytes = fs::read(root.join("state").join(si_appliance::nodes::JOURNAL)).expect("node journal");
        si_appliance::nodes::replay(&bytes, &mut records);
        let console = fs::read_dir(root.join("state/consoles"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| fs::read_to_string(e.path()).unwrap_or_default()).collect::<String>())
            .unwrap_or_default();
        let reports: Vec<PathBuf> = fs::read_dir(root.join("store/reports"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("report.json").is_file()).collect())
            .unwrap_or_default();
        let log = fs::read_to_string(root.join("log/appliance.log")).unwrap_or_default();
        (leases, records, console, reports, log)
    };
    let mac: MacAddr = NODE_MAC.parse().unwrap();
    let lease = leases.of_mac(mac).unwrap_or_else(|| panic!("no lease of {mac} on the stick after the power cut"));
    println!("after the power cut: lease {} ({:?}), {} node record(s), {} report(s)", lease.ip, lease.state, records.len(), reports.len());
    assert_eq!(Some(lease.ip.to_string()), first_ip, "the journaled lease is the address the node booted with");
    let r = records.get(&mac).unwrap_or_else(|| panic!("no node record of {mac} on the stick"));
    assert_eq!((r.state.name(), r.installs, r.hostname.as_deref()), ("installed", 1, Some(NODE_NAME)), "{r:?}");
    assert!(console.contains("install-done") || console.contains("phase"), "the node's console is not on the stick: {console:.300}");
    assert!(!reports.is_empty(), "no end-of-run report on the stick");
    assert!(log.contains("si-appliance ready"), "the appliance's log on the stick:\n{log:.2000}");

    // 4. The stick boots again, under UEFI with Secure Boot on this time; the node is told to
    // boot its disk and keeps its address.
    fs::copy(OVMF_SB_VARS, lab.path("appliance-vars.fd")).expect("OVMF_VARS_4M.ms.fd (package ovmf)");
    let mut app2 = boot_stick(&lab, &stick, Firmware::UefiSecureBoot, 2);
    let (st2, uefi_ready) = wait_ready(&lab, &mut app2, Duration::from_secs(300));
    println!("stick (OVMF, Secure Boot on) ready after {uefi_ready:.1} s: {}", st2["deployment"]["serving"]);
    assert_eq!(st2["deployment"]["serving"]["firmware"], "UEFI, Secure Boot on", "{st2}");
    assert_eq!(st["deployment"]["serving"]["firmware"], "BIOS", "{st}");
    let nodes2 = st2["nodes"].as_array().cloned().unwrap_or_default();
    assert!(nodes2.iter().any(|n| n["mac"] == NODE_MAC), "the node is not on the rebooted appliance's dashboard: {st2}");
    let mut node3 = power_on_node(&lab, &disk, 3);
    let login2 = node3.wait("the login prompt", Duration::from_secs(300), |s| login_name(s).is_some() || s.has("si-init: running"));
    let login2 = login2.unwrap_or_else(|e| panic!("node's boot after the appliance's power cut: {e}"));
    assert!(!node3.serial.has("si-init: running"), "the node was installed again:\n{}", node3.serial.tail(40));
    assert_eq!(login_name(&node3.serial).as_deref(), Some(NODE_NAME));
    assert_eq!(ipxe_address(&node3.serial), first_ip, "the node's address changed across the appliance's power cut");
    drop(node3);
    drop(app2);

    let mut table = format!(
        "qemu_usb: stick built/checked {built_s:.1} s, add-image {add_s:.1} s, stick ready SeaBIOS {bios_ready:.1} s, OVMF + Secure Boot {uefi_ready:.1} s\n\
         node (SeaBIOS) from the stick appliance, s since power-on:\n"
    );
    for (k, t) in &phases {
        table.push_str(&format!(" {k} {}", t.map_or("-".to_owned(), |t| format!("{t:.1}"))));
    }
    table.push_str(&format!(
        " reboot {install_s:.1} login +{login1:.1} (after reboot); after the power cut: login {login2:.1}\n"
    ));
    println!("{table}");
}
