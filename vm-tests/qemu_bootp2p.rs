//! Peer-served boot files with real firmware: three QEMU VMs PXE-boot from the appliance
//! (`boot.peer_serve = true`); the 2nd and 3rd get their kernel and initrd from the 1st, whose
//! installer serves the copies it checked, and all three install and boot their disks.
//!
//! - VM 1, SeaBIOS with QEMU's iPXE ROM (2019: no digest command): nobody serves yet, so the
//!   appliance sends it both files; its installer then serves them (`boot-peer: serving`).
//! - A lying peer beside the nodes, with a lower address than VM 1 (so the scheduler picks it
//!   first): a host that leased from the appliance and announces itself with its node token,
//!   serving copies with one byte flipped (python3's http.server).
//! - VM 2, OVMF with the NIC's option ROM removed, as on a rack server: the firmware's own PXE
//!   gets `snponly.efi` over TFTP, iPXE 2.0 from Debian (pxe-assets/fetch-ipxe-efi.sh), which has
//!   digest commands. Its script follows the 302 to the lying peer, finds the SHA-256 wrong,
//!   asks again with `bad=1` (the appliance drops the liar) and follows the next 302 to VM 1.
//! - VM 3, SeaBIOS with the 2019 ROM again, started once the liar is gone: it cannot check a
//!   file (`boot.peer_unverified = true` lets the appliance send it to a peer anyway) and
//!   follows the 302 to VM 1.
//!
//! Asserted: VM 2 and VM 3 each got a 302 to VM 1 for both files and the appliance sent neither
//! of them a kernel or initrd byte; VM 1's console shows it sending them; VM 2's console shows the
//! wrong digest caught and its iPXE 2.0; the appliance dropped the liar on VM 2's word; every VM
//! installs and comes up at its login prompt under its reservation's name.
//!
//! Then the golden-node round trip (issue 17): VM 1, installed and running, is changed live (a
//! marker file, a hard link, an xattr, an ACL, junk in /tmp, a tmpfs mounted on /mnt) and
//! captured with `si-appliance image capture golden --from VM1 --ssh-identity KEY` (its sshd,
//! rsync over ssh; the test's key is in the image's /root/.ssh); the capture keeps the hard link,
//! xattr and ACL and leaves out /proc, /sys, /dev, /run, /tmp and the tmpfs's contents; the
//! appliance restarts serving it, VM 3 is re-imaged with it and boots it under its own name.
//!
//! Every wait is bounded; QEMU runs under TCG inside the lab's switch namespace, `-nodefaults`,
//! `-no-reboot` (the test powers a VM on again, network first). Times are printed, not asserted.
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Lab, Proc, Serial, login_name, random_file, strip_ansi};
use si_appliance::types::{MacAddr, NodeToken};

const DEPLOY_TIMEOUT: Duration = Duration::from_secs(1500);
const SERVER: &str = "10.81.0.1";
const LIAR_IP: &str = "10.81.0.20";
const LIAR_MAC: &str = "52:54:00:81:00:14";
const PEER_PORT: u16 = 8081;
const IMAGE: &str = "demo";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Firmware {
    /// SeaBIOS, QEMU's iPXE ROM on the NIC.
    Bios,
    /// OVMF with no option ROM on the NIC: the firmware's own PXE client.
    UefiPxe,
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum State {
    Off,
    Installing,
    LocalBoot,
    Up(String),
    Failed(String),
}

struct Vm {
    n: usize,
    firmware: Firmware,
    mac: MacAddr,
    tap: String,
    disk: PathBuf,
    qemu: Option<Proc>,
    serial: Serial,
    boot_start: usize,
    boots: usize,
    powered_at: Option<f64>,
    state: State,
}

fn vm_mac(n: usize) -> MacAddr {
    format!("52:54:00:81:01:{n:02x}").parse().expect("mac")
}

fn hostname(n: usize) -> String {
    format!("peer-{n:02}")
}

impl Vm {
    fn new(lab: &Lab, n: usize, firmware: Firmware) -> Vm {
        let tap = format!("tap{n}");
        lab.switch.ip(&["tuntap", "add", &tap, "mode", "tap"]);
        lab.switch.ip(&["link", "set", &tap, "master", "br0"]);
        lab.switch.ip(&["link", "set", &tap, "up"]);
        let disk = lab.path(&format!("disk-{n}.img"));
        fs::File::create(&disk).and_then(|f| f.set_len(2 << 30)).expect("sparse disk");
        if firmware == Firmware::UefiPxe {
            fs::copy(OVMF_VARS, lab.path(&format!("ovmf-vars-{n}.fd"))).expect("OVMF_VARS.fd (package ovmf)");
        }
        Vm { n, firmware, mac: vm_mac(n), tap, disk, qemu: None, serial: Serial::new(PathBuf::new()), boot_start: 0, boots: 0, powered_at: None, state: State::Off }
    }

    /// Powers the VM on, the NIC first in the boot order.
    fn power_on(&mut self, lab: &Lab, t: f64) {
        self.serial.drain(t);
        self.boots += 1;
        self.serial.switch_to(lab.path(&format!("serial-{}-{}.log", self.n, self.boots)));
        self.boot_start = self.serial.lines.len();
        self.powered_at.get_or_insert(t);
        let mut cmd = lab.switch.cmd("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-machine", "pc,graphics=off", "-accel", "tcg", "-display", "none", "-m", "512", "-no-reboot"]);
        let rom = match self.firmware {
            Firmware::Bios => "",
            Firmware::UefiPxe => {
                cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"));
                cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", lab.path(&format!("ovmf-vars-{}.fd", self.n)).display()));
                // IPv4 PXE only: no IPv6 or HTTP boot attempts before the disk.
                for k in ["IPv6PXESupport", "IPv6Support"] {
                    cmd.arg("-fw_cfg").arg(format!("name=opt/org.tianocore/{k},string=no"));
                }
                // No iPXE option ROM: the firmware's own virtio-net driver and PXE client.
                ",romfile="
            }
        };
        cmd.args(["-netdev", &format!("tap,id=n0,ifname={},script=no,downscript=no", self.tap)])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={},bootindex=1{rom}", self.mac)])
            .args(["-drive", &format!("file={},format=raw,if=none,id=d0", self.disk.display())])
            .args(["-device", "virtio-blk-pci,drive=d0,bootindex=2", "-device", "virtio-rng-pci"])
            .arg("-serial")
            .arg(format!("file:{}", self.serial.path().display()));
        self.qemu = Some(Proc::spawn(&format!("qemu-vm{}", self.n), cmd, lab.path(&format!("qemu-{}.log", self.n))));
    }

    fn exited(&mut self) -> bool {
        self.qemu.as_mut().is_none_or(|p| matches!(p.child.try_wait(), Ok(Some(_))))
    }

    fn this_boot(&self) -> &[(f64, String)] {
        &self.serial.lines[self.boot_start..]
    }

    /// One step of the VM's life: install, power on again (network first), come up.
    fn step(&mut self, lab: &Lab, now: f64) {
        self.serial.drain(now);
        match self.state.clone() {
            State::Installing => {
                let boot = self.this_boot();
                let failed = boot.iter().find(|(_, l)| l.contains("si-init: FAILED")).map(|(_, l)| l.clone());
                let finished = boot.iter().any(|(_, l)| l.contains("install-done ") || l.contains("phase=seeding"))
                    && boot.iter().any(|(_, l)| l.contains("reboot: Restarting system"));
                if let Some(l) = failed {
                    self.state = State::Failed(l);
                } else if self.exited() {
                    if finished {
                        self.state = State::LocalBoot;
                        self.power_on(lab, now);
                    } else {
                        self.state = State::Failed("powered off before its install finished".into());
                    }
                }
            }
            State::LocalBoot => {
                if self.this_boot().iter().any(|(_, l)| l.contains("si-init: running")) {
                    self.state = State::Failed("its network boot ran the installer again".into());
                } else if let Some(name) = self.this_boot().iter().find_map(|(_, l)| login_name(l)) {
                    self.state = State::Up(name);
                } else if self.exited() {
                    self.state = State::Failed("QEMU stopped while booting from the disk".into());
                }
            }
            State::Off | State::Up(_) | State::Failed(_) => {}
        }
    }

    fn text(&self) -> String {
        self.serial.tail(usize::MAX)
    }
}

fn config(lab: &Lab, client: &Path, ipxe_efi: &Path, image: &str, nodes: u32) -> String {
    let mut c = format!(
        r#"iface = "eth0"
image = "{image}"
store = "{store}"
state_dir = "{state}"

[dhcp]
mode = "full"
answer = "all"
probe = false

[[dhcp.pool]]
subnet = "10.81.0.0/24"
range = ["10.81.0.100", "10.81.0.150"]

# The lying peer: a host beside the nodes with an address below theirs.
[[dhcp.reservation]]
mac = "{LIAR_MAC}"
ip = "{LIAR_IP}"

[tftp]
enable = true

[http]
port = 80

[boot]
kernel = "{client}/vmlinuz"
initrd = "{client}/initrd.img"
cmdline = "console=ttyS0 panic=10 si.onfail=poweroff"
loader_dirs = ["{ipxe}", "/usr/lib/ipxe", "/usr/lib/PXELINUX", "/usr/lib/syslinux/modules/bios", "/boot"]
peer_serve = true
peer_unverified = true
peer_serve_max = 2
peer_port = {PEER_PORT}

[swarm]
expected_nodes = {nodes}

[install]
disk = "/dev/vda"
finish = "reboot"
seed_for = "900s"
report_every = "2s"
update_poll = "5s"
"#,
        store = lab.path("store").display(),
        state = lab.path("state").display(),
        client = client.display(),
        ipxe = ipxe_efi.display(),
    );
    for n in 1..=3 {
        c.push_str(&format!("\n[[dhcp.reservation]]\nmac = \"{}\"\nhostname = \"{}\"\n", vm_mac(n), hostname(n)));
    }
    c
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The lying peer: leases its address from the appliance (busybox udhcpc), serves copies of
/// kernel and initrd with one byte flipped on the peer port, and announces itself.
fn start_liar(lab: &Lab, h: usize, client: &Path) -> Proc {
    let script = lab.path("udhcpc.sh");
    fs::write(&script, "#!/bin/sh\n[ \"$1\" = bound ] && ip addr add \"$ip/$mask\" dev \"$interface\"\nexit 0\n").expect("udhcpc script");
    common::run(Command::new("chmod").arg("+x").arg(&script));
    common::run(lab.hosts[h].cmd("timeout").args(["60", "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "10", "-s"]).arg(&script));
    let addrs = String::from_utf8_lossy(&common::run(lab.hosts[h].cmd("ip").args(["-4", "addr", "show", "dev", "eth0"])).stdout).into_owned();
    assert!(addrs.contains(&format!("{LIAR_IP}/24")), "the liar did not lease {LIAR_IP}: {addrs}");
    let root = lab.path("liar");
    fs::create_dir_all(root.join("boot")).expect("liar dir");
    // The initrd as served is the configured one plus the appliance's key (state/boot/initrd.img).
    for (name, from) in [("vmlinuz", client.join("vmlinuz")), ("initrd.img", lab.path("state/boot/initrd.img"))] {
        let mut b = fs::read(&from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        fs::write(root.join("boot").join(name), b).expect("liar copy");
    }
    let mut py = lab.hosts[h].cmd("python3");
    py.args(["-m", "http.server", &PEER_PORT.to_string(), "--bind", LIAR_IP, "--directory"]).arg(&root);
    let p = Proc::spawn("liar-http", py, lab.path("liar.log"));
    common::wait_for(Duration::from_secs(20), || {
        let o = lab.hosts[h].cmd("curl").args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{LIAR_IP}:{PEER_PORT}/boot/vmlinuz")]).output().ok()?;
        (String::from_utf8_lossy(&o.stdout) == "200").then_some(())
    })
    .expect("the liar's http.server never answered");
    let secret = fs::read(lab.path("state/secret")).expect("appliance secret");
    let token = NodeToken::derive(&secret, LIAR_MAC.parse().expect("mac"));
    let o = common::run(lab.hosts[h].cmd("curl").args([
        "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H", &format!("Authorization: Bearer {}", token.as_str()),
        "-H", "Content-Type: application/json", "--data", &format!(r#"{{"event":"serving","port":{PEER_PORT}}}"#),
        &format!("http://{SERVER}/api/nodes/{LIAR_MAC}/boot-peer"),
    ]));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "204", "the liar's announce was refused");
    p
}

/// `addr` from a log line's `key=addr` / `key=addr:port` field.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(|v| v.trim_matches('"'))
}

#[test]
fn the_second_and_third_vm_boot_from_the_first_and_a_lying_peer_is_caught() {
    let client = common::client_boot_dir();
    let demo = common::demo_image();
    let ipxe_efi = common::ipxe_efi_dir();
    let mut lab = Lab::new("qp");
    lab.add_host(Some(&format!("{SERVER}/24")), Some("52:54:00:81:00:01"));
    let liar_host = lab.add_host(None, Some(LIAR_MAC));
    common::run(Command::new(common::appliance_bin()).arg("--store").arg(lab.path("store")).args(["image", "import", IMAGE, "--from"]).arg(&demo));
    // A key that lets the test in as root on the installed nodes (for the golden-node capture).
    let key = lab.path("id_ed25519");
    common::run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "qemu_bootp2p", "-f"]).arg(&key));
    let ssh_dir = lab.path("store/images").join(IMAGE).join("root/.ssh");
    fs::create_dir_all(&ssh_dir).expect("root/.ssh in the image");
    fs::copy(key.with_extension("pub"), ssh_dir.join("authorized_keys")).expect("authorized_keys");
    common::run(Command::new("chmod").args(["700"]).arg(&ssh_dir));
    common::run(Command::new("chmod").args(["600"]).arg(ssh_dir.join("authorized_keys")));
    let mut appliance = common::start_appliance(&lab, 0, "appliance", &config(&lab, &client, &ipxe_efi, IMAGE, 3), &[]);
    let app_log = |a: &Proc| strip_ansi(&a.log_text());

    let mut vms = vec![Vm::new(&lab, 1, Firmware::Bios), Vm::new(&lab, 2, Firmware::UefiPxe), Vm::new(&lab, 3, Firmware::Bios)];
    let start = Instant::now();
    let now = || start.elapsed().as_secs_f64();
    vms[0].state = State::Installing;
    vms[0].power_on(&lab, 0.0);
    let mut liar: Option<Proc> = None;
    let mut vm1_ip: Option<String> = None;
    let mut liar_dropped_at: Option<f64> = None;
    let done = common::wait_for(DEPLOY_TIMEOUT, || {
        let t = now();
        let log = app_log(&appliance);
        // VM 1's installer serves: the liar appears, then VM 2 powers on.
        if liar.is_none() {
            if let Some(l) = log.lines().find(|l| l.contains("boot-peer: serving boot files") && l.contains(&vm_mac(1).to_string())) {
                vm1_ip = field(l, "peer=").map(str::to_owned);
                liar = Some(start_liar(&lab, liar_host, &client));
                vms[1].state = State::Installing;
                vms[1].power_on(&lab, t);
            }
        }
        // The liar dropped on VM 2's word: VM 3 powers on.
        if liar_dropped_at.is_none() && log.lines().any(|l| l.contains("boot-peer: peer dropped") && l.contains(LIAR_IP)) {
            liar_dropped_at = Some(t);
            vms[2].state = State::Installing;
            vms[2].power_on(&lab, t);
        }
        for vm in vms.iter_mut() {
            vm.step(&lab, t);
        }
        let stuck = vms.iter().any(|v| matches!(v.state, State::Failed(_)));
        (stuck || vms.iter().all(|v| matches!(v.state, State::Up(_)))).then_some(())
    });
    let total = now();
    let log = app_log(&appliance);
    let context = |vm: &Vm| format!("--- VM {} serial (tail) ---\n{}\n--- appliance (tail) ---\n{}", vm.n, tail(&vm.text(), 60), tail(&log, 60));
    for vm in &vms {
        println!(
            "VM {} ({:?}): powered on at {:.1} s, {:?}",
            vm.n,
            vm.firmware,
            vm.powered_at.unwrap_or(f64::NAN),
            vm.state
        );
    }
    println!("deployment {total:.1} s; liar dropped at {}", liar_dropped_at.map(|t| format!("{t:.1} s")).unwrap_or_else(|| "-".into()));
    for vm in &vms {
        assert!(done.is_some() || matches!(vm.state, State::Up(_)), "not finished within {DEPLOY_TIMEOUT:?}: VM {} {:?}\n{}", vm.n, vm.state, context(vm));
        let State::Up(name) = &vm.state else { panic!("VM {} did not come up: {:?}\n{}", vm.n, vm.state, context(vm)) };
        assert_eq!(name, &hostname(vm.n), "VM {}\n{}", vm.n, context(vm));
    }
    let vm1_ip = vm1_ip.expect("VM 1's address from its announce");
    let vm1_peer = format!("{}:{PEER_PORT}", vm1_ip);

    // Redirects: VM 2 and VM 3 were sent to VM 1 for both files, and the appliance itself sent
    // them no kernel or initrd byte.
    let lines_for = |mac: MacAddr, what: &str| -> Vec<String> {
        log.lines().filter(|l| l.contains(what) && l.contains(&format!("mac={mac}"))).map(str::to_owned).collect()
    };
    for n in [2, 3] {
        let vm = &vms[n - 1];
        let redirects = lines_for(vm.mac, "http: redirected to a boot peer");
        for file in ["vmlinuz", "initrd.img"] {
            assert!(
                redirects.iter().any(|l| l.contains(&format!("file={file}")) && l.contains(&format!("peer={vm1_peer}"))),
                "VM {n}: no redirect of {file} to VM 1 ({vm1_peer}): {redirects:#?}\n{}",
                context(vm)
            );
        }
        let sent: Vec<String> = lines_for(vm.mac, "http: sending").into_iter().filter(|l| l.contains("file=vmlinuz") || l.contains("file=initrd.img")).collect();
        assert!(sent.is_empty(), "VM {n}: the appliance sent it boot files itself: {sent:#?}");
        println!("VM {n}: {} redirects, e.g. {}", redirects.len(), redirects.first().map(String::as_str).unwrap_or("-"));
    }
    // VM 1 fetched from the appliance (nobody served yet) and its console shows it serving both.
    let v1 = vms[0].text();
    for n in [2, 3] {
        let ip = log.lines().find(|l| l.contains("http: redirected to a boot peer") && l.contains(&format!("mac={}", vm_mac(n)))).and_then(|l| field(l, "client=")).and_then(|c| c.split(':').next()).map(str::to_owned).expect("client address");
        assert!(v1.lines().any(|l| l.contains("boot-peer: sending") && l.contains(&ip)), "VM 1's console never shows it sending to VM {n} ({ip})\n{}", tail(&v1, 60));
    }
    // VM 2: iPXE 2.0 caught the liar's copy by its SHA-256; the appliance dropped the liar on its word.
    let v2 = vms[1].text();
    assert!(v2.contains("iPXE 2."), "VM 2 did not run iPXE 2.x:\n{}", tail(&v2, 60));
    assert!(v2.contains("does not match its SHA-256"), "VM 2 never caught the liar's copy:\n{}", tail(&v2, 60));
    let dropped: Vec<&str> = log.lines().filter(|l| l.contains("boot-peer: peer dropped")).collect();
    assert!(dropped.len() == 1 && dropped[0].contains(LIAR_IP), "exactly the liar dropped: {dropped:#?}");
    let v3 = vms[2].text();
    assert!(v3.contains("cannot check SHA-256"), "VM 3's 2019 iPXE should say it cannot check:\n{}", tail(&v3, 40));

    // The golden-node round trip: VM 1, installed and running, is changed live, captured over
    // ssh + rsync (its sshd, our rsync client), packed, served, and installed on VM 3, which boots it.
    let vm1_ip = vm1_ip.as_str();
    let ssh_base = |ip: &str| -> Vec<String> {
        ["ssh", "-i", &key.display().to_string(), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", &format!("UserKnownHostsFile={}", lab.path("test_known_hosts").display()), "-o", "ConnectTimeout=10", &format!("root@{ip}")]
            .iter().map(|s| s.to_string()).collect()
    };
    let on_node = |ip: &str, script: &str| -> std::process::Output {
        let a = ssh_base(ip);
        let o = lab.hosts[0].cmd("timeout").arg("60").args(&a).arg(script).output().expect("ssh");
        assert!(o.status.success(), "ssh {ip} {script}: {} {}", o.status, String::from_utf8_lossy(&o.stderr));
        o
    };
    // Live changes: a marker, a hard link, an xattr, an ACL, junk in /tmp, and a tmpfs mounted
    // over /mnt (another file system: its contents must stay behind).
    on_node(vm1_ip, "set -e; echo golden-v2 > /etc/golden-marker; mkdir -p /srv/g; echo hello > /srv/g/a; ln -f /srv/g/a /srv/g/b; \
        setfattr -n user.si -v golden /srv/g/a; setfacl -m u:1234:r /srv/g/a; echo junk > /tmp/junk; \
        mount -t tmpfs si-scratch /mnt; echo inside > /mnt/inside-tmpfs; sync");
    let t = Instant::now();
    let cap = common::run(
        lab.hosts[0].cmd(common::appliance_bin()).arg("--store").arg(lab.path("store"))
            .args(["image", "capture", "golden", "--from", vm1_ip, "--ssh-identity"]).arg(&key),
    );
    let capture_s = t.elapsed().as_secs_f64();
    let cap_log = strip_ansi(&String::from_utf8_lossy(&cap.stderr));
    let g = lab.path("store/images/golden");
    assert_eq!(fs::read_to_string(g.join("etc/golden-marker")).ok().as_deref(), Some("golden-v2\n"), "capture log:\n{cap_log}");
    use std::os::unix::fs::MetadataExt as _;
    let (a, b) = (fs::metadata(g.join("srv/g/a")).expect("srv/g/a"), fs::metadata(g.join("srv/g/b")).expect("srv/g/b"));
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "the hard link was not kept");
    let attr = common::run(Command::new("getfattr").args(["--only-values", "-n", "user.si"]).arg(g.join("srv/g/a")));
    assert_eq!(String::from_utf8_lossy(&attr.stdout), "golden", "xattr");
    let acl = common::run(Command::new("getfacl").args(["-n", "-p"]).arg(g.join("srv/g/a")));
    assert!(String::from_utf8_lossy(&acl.stdout).contains("user:1234:r--"), "ACL: {}", String::from_utf8_lossy(&acl.stdout));
    assert!(g.join("mnt").is_dir() && !g.join("mnt/inside-tmpfs").exists(), "the tmpfs on /mnt was captured");
    assert!(cap_log.contains("/mnt/*"), "the capture did not say it left /mnt's mount out:\n{cap_log}");
    for d in ["proc", "sys", "dev", "run", "tmp"] {
        let n = fs::read_dir(g.join(d)).map(|r| r.count()).unwrap_or(usize::MAX);
        assert_eq!(n, 0, "/{d} in the capture is not an empty mount point");
    }
    assert!(fs::read_to_string(g.join("etc/hostname")).is_ok_and(|h| h.trim() == hostname(1)), "captured VM 1's own host name");
    // Served: the appliance restarted on the captured image; VM 3 re-imaged and powered on again.
    appliance.terminate();
    let t = Instant::now();
    let mut appliance = common::start_appliance(&lab, 0, "appliance-golden", &config(&lab, &client, &ipxe_efi, "golden", 1), &[]);
    let pack_s = t.elapsed().as_secs_f64();
    let out = common::run(lab.hosts[0].cmd(common::appliance_bin()).arg("--state-dir").arg(lab.path("state")).args(["node", "reimage", &vm_mac(3).to_string()]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("marked"), "node reimage: {}", String::from_utf8_lossy(&out.stdout));
    let v3 = &mut vms[2];
    if let Some(q) = v3.qemu.as_mut() {
        q.kill();
    }
    let t0 = now();
    v3.state = State::Installing;
    v3.power_on(&lab, t0);
    let up = common::wait_for(Duration::from_secs(900), || {
        v3.step(&lab, now());
        matches!(v3.state, State::Up(_) | State::Failed(_)).then_some(())
    });
    let golden_s = now() - t0;
    let glog = strip_ansi(&appliance.log_text());
    assert!(up.is_some() && v3.state == State::Up(hostname(3)), "VM 3 with the captured image: {:?}\n--- VM 3 ---\n{}\n--- appliance ---\n{}", v3.state, tail(&v3.text(), 60), tail(&glog, 40));
    let v3_ip = glog.lines().find(|l| l.contains("lease") && l.contains(&vm_mac(3).to_string())).and_then(|l| field(l, "ip=")).map(str::to_owned).expect("VM 3's lease");
    let o = on_node(&v3_ip, "cat /etc/golden-marker /etc/hostname; getfattr --only-values -n user.si /srv/g/a; echo; stat -c %h /srv/g/b; ls -A /mnt | wc -l");
    let got = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(got.split_whitespace().collect::<Vec<_>>(), ["golden-v2", hostname(3).as_str(), "golden", "2", "0"], "VM 3 runs the captured tree under its own name");
    println!("golden node: capture {capture_s:.1} s, appliance restart + pack {pack_s:.1} s, VM 3 re-imaged to its login prompt {golden_s:.1} s");

    // Updates over the swarm (issue 17): the golden tree changes (a program added, a file
    // deleted, a config edited, the excluded host name changed); `node update` brings VM 3 to
    // it through its update agent, with the diff's bytes only; VM 3 boots it.
    let admin = |args: &[&str]| -> String {
        let o = common::run(lab.hosts[0].cmd(common::appliance_bin()).arg("--state-dir").arg(lab.path("state")).arg("node").args(args));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let record = |mac: MacAddr| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&admin(&["list", "--json"])).expect("node list --json");
        v["nodes"].as_array().and_then(|a| a.iter().find(|n| n["mac"] == mac.to_string()).cloned()).expect("VM 3's record")
    };
    let v1_version = record(vm_mac(3))["manifest"].as_str().map(str::to_owned).expect("VM 3's installed version");
    let installed = String::from_utf8_lossy(&on_node(&v3_ip, "cat /var/lib/si-appliance/installed.json; systemctl is-active si-appliance-update.service").stdout).into_owned();
    assert!(installed.contains(&v1_version) && installed.trim_end().ends_with("active"), "VM 3's record and agent: {installed}");
    fs::copy(g.join("usr/bin/ls"), g.join("usr/local/bin/si-added-tool")).expect("a program added");
    fs::remove_file(g.join("srv/g/b")).expect("a file deleted");
    fs::write(g.join("etc/golden-marker"), "golden-v3\n").unwrap();
    fs::write(g.join("etc/hostname"), "not-a-node-name\n").unwrap();
    let said = admin(&["update", &vm_mac(3).to_string()]);
    let target = said.lines().find_map(|l| l.strip_prefix("update target: ")).map(str::to_owned).unwrap_or_else(|| panic!("node update: {said}"));
    assert!(said.contains("ordered (1;"), "node update: {said}");
    let t = Instant::now();
    let updated = common::wait_for(Duration::from_secs(300), || {
        let r = record(vm_mac(3));
        (r["manifest"] == target.as_str() && !r["update"].is_object()).then_some(r)
    });
    let update_s = t.elapsed().as_secs_f64();
    let r = updated.unwrap_or_else(|| panic!("VM 3 never reported the update:\n{}\n--- appliance ---\n{}", serde_json::to_string_pretty(&record(vm_mac(3))).unwrap(), tail(&strip_ansi(&appliance.log_text()), 40)));
    let fetched = r["last_update"]["fetched_bytes"].as_u64().unwrap_or(0);
    let diff = lab.path(&format!("store/archives/updates/golden.{}-{}.tar.zst", &v1_version[..12], &target[..12]));
    let diff_bytes = fs::metadata(&diff).unwrap_or_else(|e| panic!("{}: {e}", diff.display())).len();
    let full_bytes = fs::metadata(lab.path("store/archives/golden.tar.zst")).unwrap().len();
    let name = diff.file_name().unwrap().to_string_lossy().trim_end_matches(".tar.zst").to_owned();
    let view = common::run(lab.hosts[0].cmd("curl").args(["-sf", &format!("http://127.0.0.1/api/swarm/{name}")]));
    let view: serde_json::Value = serde_json::from_slice(&view.stdout).expect("/api/swarm/<update>");
    let seed_up = view["seed_uploaded_bytes"].as_u64().unwrap_or(u64::MAX);
    println!("update: VM 3 at the new version {update_s:.1} s after `node update`; diff {diff_bytes} bytes (full archive {full_bytes}); VM 3 fetched {fetched}, the appliance's seed uploaded {seed_up}");
    assert!(fetched >= diff_bytes && fetched <= diff_bytes + diff_bytes / 10 && seed_up <= diff_bytes + diff_bytes / 10, "more than the diff crossed the wire: fetched {fetched}, seed {seed_up}, diff {diff_bytes}");
    assert!(diff_bytes * 10 < full_bytes, "the diff ({diff_bytes}) is not small beside the image ({full_bytes})");
    let check = "cat /etc/golden-marker /etc/hostname; test -x /usr/local/bin/si-added-tool && echo added; test -e /srv/g/b || echo deleted; \
        test -e /.si-appliance/update.journal && echo journal; grep -o '[0-9a-f]\\{64\\}' /var/lib/si-appliance/installed.json";
    let h3 = hostname(3);
    let want = ["golden-v3", h3.as_str(), "added", "deleted", target.as_str()];
    let got = String::from_utf8_lossy(&on_node(&v3_ip, check).stdout).into_owned();
    assert_eq!(got.split_whitespace().collect::<Vec<_>>(), want, "VM 3 after the update");
    // It still boots, and shows the change.
    let v3 = &mut vms[2];
    let _ = lab.hosts[0].cmd("timeout").arg("30").args(ssh_base(&v3_ip)).arg("sync; (sleep 1; systemctl reboot) >/dev/null 2>&1 &").output();
    let t = Instant::now();
    let rebooted = common::wait_for(Duration::from_secs(120), || v3.exited().then_some(()));
    assert!(rebooted.is_some(), "VM 3 did not reboot:\n{}", tail(&v3.text(), 30));
    v3.state = State::LocalBoot;
    v3.power_on(&lab, now());
    let up = common::wait_for(Duration::from_secs(600), || {
        v3.step(&lab, now());
        matches!(v3.state, State::Up(_) | State::Failed(_)).then_some(())
    });
    assert!(up.is_some() && v3.state == State::Up(hostname(3)), "VM 3 after the update's reboot: {:?}\n{}", v3.state, tail(&v3.text(), 60));
    let reboot_s = t.elapsed().as_secs_f64();
    let got = String::from_utf8_lossy(&on_node(&v3_ip, check).stdout).into_owned();
    assert_eq!(got.split_whitespace().collect::<Vec<_>>(), want, "VM 3 after its reboot");
    println!("update: VM 3 rebooted to its login prompt in {reboot_s:.1} s, running the update");

    // A second update cut off: a 48 MiB file added, VM 3's link slowed to 16 Mbit/s, the
    // appliance killed while VM 3 fetches: VM 3 stays whole on the version it had.
    random_file(&g.join("usr/local/share/si-big.bin"), 48 << 20);
    let said = admin(&["update", &vm_mac(3).to_string()]);
    assert!(said.contains("ordered (1;"), "node update: {said}");
    common::run(lab.switch.cmd("tc").args(["qdisc", "add", "dev", &v3.tap, "root", "tbf", "rate", "16mbit", "burst", "64kb", "latency", "400ms"]));
    let offers = |a: &Proc| strip_ansi(&a.log_text()).matches("update offered").count();
    let before = offers(&appliance);
    let offered = common::wait_for(Duration::from_secs(120), || (offers(&appliance) > before).then_some(()));
    assert!(offered.is_some(), "the second update was never offered:\n{}", tail(&strip_ansi(&appliance.log_text()), 30));
    std::thread::sleep(Duration::from_secs(8));
    appliance.kill();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let got = String::from_utf8_lossy(&on_node(&v3_ip, &format!("{check}; test -e /usr/local/share/si-big.bin && echo big; ls /.si-appliance 2>/dev/null | wc -l")).stdout).into_owned();
    let mut want_cut: Vec<&str> = want.to_vec();
    want_cut.push("0");
    let journal = got.split_whitespace().any(|w| w == "journal" || w == "big");
    assert!(!journal, "VM 3 was changed by the cut-off update: {got}");
    assert_eq!(got.split_whitespace().collect::<Vec<_>>()[..5], want_cut[..5], "VM 3 after the cut-off update: {got}");
    println!("update cut off: VM 3 still whole on its version {:.1} s after the appliance was killed (its work dir holds {} entries)", t.elapsed().as_secs_f64(), got.split_whitespace().last().unwrap_or("?"));

    drop(vms);
    drop(liar);
    let _ = fs::remove_dir_all(&lab.dir);
}
