//! Rendering of the per-node boot files: the iPXE script, the generic iPXE chain script and the
//! pxelinux config. Pure functions of their inputs (no I/O, no clock), compared whole against
//! golden files in the tests (`UPDATE_GOLDEN=1` rewrites them).
//!
//! The kernel command line carries what the installer needs to find the appliance and prove
//! who it is: `si.server=IP:PORT si.mac=MAC si.image=NAME [si.infohash=HEX si.manifest=HEX]
//! si.token=TOKEN`, then `boot.cmdline`.
//! Dotted keys are not passed to /init's environment by the kernel; the installer reads
//! `/proc/cmdline`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::boot::file::BootFile;
use crate::types::{ImageName, MacAddr, NodeToken};

/// What every rendered file needs to know about the appliance.
#[derive(Clone, Debug)]
pub struct Server<'a> {
    /// The appliance's address.
    pub ip: Ipv4Addr,
    /// Its HTTP port.
    pub http_port: u16,
    /// The image nodes install.
    pub image: Option<&'a ImageName>,
    /// `boot.cmdline`.
    pub cmdline: &'a str,
    /// The image's signed seal: its info-hash and manifest digest go on the command line, so the
    /// installer holds them before it asks the network for anything.
    pub seal: Option<&'a crate::types::node_api::ImageSeal>,
    /// Kernel and initrd may be redirected to a peer (`boot.peer_serve`): the SHA-256 the
    /// script checks them against (an iPXE with digest commands), and the appliance's own copy
    /// as the last resort.
    pub peers: Option<PeerCheck<'a>>,
}

/// What a node script checks peer-served boot files against: the SHA-256 (lower-case hex) of
/// the kernel and initrd the appliance serves, as `/boot/digests` publishes them.
#[derive(Clone, Copy, Debug)]
pub struct PeerCheck<'a> {
    /// The kernel's SHA-256.
    pub kernel_sha256: &'a str,
    /// The initrd's SHA-256.
    pub initrd_sha256: &'a str,
}

impl Server<'_> {
    /// `http://IP[:PORT]/boot`.
    fn base_url(&self) -> String {
        if self.http_port == 80 {
            format!("http://{}/boot", self.ip)
        } else {
            format!("http://{}:{}/boot", self.ip, self.http_port)
        }
    }
}

/// One node, as its boot files name it.
#[derive(Clone, Debug)]
pub struct NodeBoot {
    /// Its MAC.
    pub mac: MacAddr,
    /// Its token.
    pub token: NodeToken,
}

/// The `si.*` words of the kernel command line, then the configured extra words.
pub fn kernel_args(s: &Server<'_>, node: Option<&NodeBoot>) -> String {
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let mut a = format!("si.server={}:{}", s.ip, s.http_port);
    if let Some(n) = node {
        let _ = write!(a, " si.mac={}", n.mac);
    }
    if let Some(img) = s.image {
        let _ = write!(a, " si.image={img}");
        if let Some(seal) = s.seal {
            let _ = write!(a, " si.infohash={}", seal.info_hash);
            if let Some(m) = &seal.manifest_sha256 {
                let _ = write!(a, " si.manifest={m}");
            }
        }
    }
    if let Some(n) = node {
        let _ = write!(a, " si.token={}", n.token.as_str());
    }
    let extra = s.cmdline.trim();
    if !extra.is_empty() {
        a.push(' ');
        a.push_str(extra);
    }
    a
}

/// The node's iPXE script (`/boot/<mac>.ipxe`). Kernel and initrd come over HTTP with the MAC
/// in the query, so the appliance can attribute the fetches in its log. `initrd=initrd.img`
/// on the command line is what iPXE's UEFI build needs to hand the initrd to the kernel; BIOS
/// ignores it. A failed step retries after a pause instead of dropping to the next boot device.
///
/// With peers ([`Server::peers`]) see [`ipxe_node_peers`].
pub fn ipxe_node(s: &Server<'_>, n: &NodeBoot) -> String {
    if let Some(check) = s.peers {
        return ipxe_node_peers(s, n, check);
    }
    let base = s.base_url();
    let q = format!("?mac={}", n.mac.hyphenated());
    let (k, i) = (BootFile::KERNEL, BootFile::INITRD);
    let line_args = node_line_args(s, n);
    format!(
        "#!ipxe\n\
         # si-appliance boot script for {mac}. Generated; do not edit.\n\
         :retry\n\
         kernel --name {k} {base}/{k}{q} {line_args} || goto failed\n\
         initrd --name {i} {base}/{i}{q} || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo si-appliance: boot failed, retrying in 10 seconds\n\
         sleep 10\n\
         goto retry\n",
        mac = n.mac,
    )
}

/// The kernel's command line in a node script: the initrd's name, the `si.*` words, and the
/// address iPXE got (the installer starts with it instead of asking DHCP again).
fn node_line_args(s: &Server<'_>, n: &NodeBoot) -> String {
    let i = BootFile::INITRD;
    format!("initrd={i} {} si.ip=${{ip}} si.netmask=${{netmask}} si.gw=${{gateway}}", kernel_args(s, Some(n)))
}

/// The node script when kernel and initrd may come from a peer node (`boot.peer_serve`).
///
/// First it finds out whether this iPXE can check a file: it fetches `/boot/digests` as a
/// probe image and hashes it with `sha256sum --set` (iPXE 2.0's EFI builds have it; older
/// builds and BIOS builds have no digest command). Every kernel and initrd request carries
/// `verify=1` or `verify=0`: the appliance sends only a verifying node to a peer (unless
/// `boot.peer_unverified`). Each file is then fetched and, when the node can, its SHA-256
/// compared with the appliance's (`iseq`) before anything boots:
/// 1. where the appliance says (itself or a peer, by a 302 that iPXE follows);
/// 2. on a failed fetch or a wrong digest, again with `bad=1`: the appliance drops the peer it
///    had given this node (a dead or lying peer) and picks again;
/// 3. then the appliance's own copy (`direct=1`, still checked); if that fails too, the whole
///    script starts over after 10 s.
pub fn ipxe_node_peers(s: &Server<'_>, n: &NodeBoot, check: PeerCheck<'_>) -> String {
    let base = s.base_url();
    let q = format!("?mac={}", n.mac.hyphenated());
    let line_args = node_line_args(s, n);
    let mut out = format!(
        "#!ipxe\n\
         # si-appliance boot script for {mac}. Generated; do not edit.\n\
         # Kernel and initrd may come from a peer node: each is checked against the appliance's\n\
         # SHA-256 when this iPXE has digest commands, refetched elsewhere when it fails.\n\
         set si-v 0\n\
         imgfetch --name si-probe {base}/digests{q} && sha256sum --set si-probe si-probe && set si-v 1 || echo si-appliance: this iPXE cannot check SHA-256: boot files from the appliance\n\
         imgfree si-probe ||\n\
         :retry\n",
        mac = n.mac,
    );
    for (cmd, name, args, sha, next) in [
        ("kernel", BootFile::KERNEL, format!(" {line_args}"), check.kernel_sha256, "initrd"),
        ("initrd", BootFile::INITRD, String::new(), check.initrd_sha256, "boot"),
    ] {
        let url = format!("{base}/{name}{q}");
        let ok = format!("iseq ${{si-v}} 1 || goto {next}\nsha256sum --set si-d {name} && iseq ${{si-d}} {sha} && goto {next} ||\n");
        let _ = write!(
            out,
            ":{cmd}\n\
             {cmd} --name {name} {url}&verify=${{si-v}}{args} && goto {cmd}-1 || goto {cmd}-again\n\
             :{cmd}-1\n\
             {ok}\
             echo si-appliance: {name} did not arrive or does not match its SHA-256: asking again\n\
             :{cmd}-again\n\
             imgfree {name} ||\n\
             {cmd} --name {name} {url}&verify=${{si-v}}&bad=1{args} && goto {cmd}-2 || goto {cmd}-direct\n\
             :{cmd}-2\n\
             {ok}\
             :{cmd}-direct\n\
             imgfree {name} ||\n\
             {cmd} --name {name} {url}&direct=1&bad=1{args} || goto failed\n\
             {ok}\
             echo si-appliance: the appliance's own {name} does not match its SHA-256\n\
             goto failed\n"
        );
    }
    // Both files are here (and checked): the slot this node held at a peer frees now.
    let _ = write!(out, ":boot\nimgfetch --name si-done {base}/fetched{q} && imgfree si-done ||\n");
    out.push_str(
        "boot || goto failed\n\
         :failed\n\
         echo si-appliance: boot failed, retrying in 10 seconds\n\
         imgfree ||\n\
         sleep 10\n\
         goto retry\n",
    );
    out
}

/// The iPXE script of a node that boots from its own disk (installed, or not enrolled): `exit 1`
/// hands control back to the firmware, which tries the next boot device (the disk, with the
/// network first in the boot order). On SeaBIOS (iPXE as the NIC's option ROM) and on OVMF
/// (iPXE's EFI driver) this is what boots the disk; `sanboot --drive 0x80` would work on BIOS
/// only. The exit status must be an error: an iPXE EFI application (snponly.efi, ipxe.efi) that
/// returns EFI_SUCCESS makes the UEFI boot manager stop and show its menu instead of trying the
/// next Boot#### (UEFI 2.x §3.1.1; EDK2 `BdsEntry.c`, `BootBootOptions`); iPXE returns the
/// script's exit status from `autoboot`.
pub fn ipxe_local(mac: MacAddr, why: &str) -> String {
    format!(
        "#!ipxe\n\
         # si-appliance boot script for {mac}: {why}. Generated; do not edit.\n\
         echo si-appliance: {mac} {why}: booting from the local disk\n\
         exit 1\n"
    )
}

/// The pxelinux config of a node that boots from its own disk: `LOCALBOOT 0`.
pub fn pxelinux_local(mac: Option<MacAddr>, why: &str) -> String {
    let who = mac.map(|m| m.to_string()).unwrap_or_else(|| "any node (default)".to_owned());
    format!(
        "# si-appliance pxelinux config for {who}: {why}. Generated; do not edit.\n\
         DEFAULT local\n\
         PROMPT 0\n\
         TIMEOUT 0\n\
         LABEL local\n\
         \x20 LOCALBOOT 0\n"
    )
}

/// `/boot/boot.ipxe`: for an iPXE that was pointed at the appliance without a per-node URL.
pub fn ipxe_chain(s: &Server<'_>) -> String {
    format!(
        "#!ipxe\n\
         # si-appliance: chain to this node's own script. Generated; do not edit.\n\
         chain {}/${{mac:hexhyp}}.ipxe\n",
        s.base_url()
    )
}

/// A pxelinux config: `pxelinux.cfg/01-<mac>` (with the node's MAC and token) or
/// `pxelinux.cfg/default` (without: pxelinux asks for `01-<mac>` first, so `default` is only a
/// fallback). Kernel and initrd come by TFTP under their keys. `IPAPPEND 2` makes pxelinux add
/// `BOOTIF=01-<mac>` so even the default config tells the installer which NIC booted.
pub fn pxelinux_cfg(s: &Server<'_>, n: Option<&NodeBoot>) -> String {
    let who = n.map(|n| n.mac.to_string()).unwrap_or_else(|| "any node (default)".to_owned());
    format!(
        "# si-appliance pxelinux config for {who}. Generated; do not edit.\n\
         DEFAULT si\n\
         PROMPT 0\n\
         TIMEOUT 0\n\
         LABEL si\n\
         \x20 KERNEL {k}\n\
         \x20 APPEND initrd={i} {args}\n\
         \x20 IPAPPEND 2\n",
        k = BootFile::KERNEL,
        i = BootFile::INITRD,
        args = kernel_args(s, n),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn golden(name: &str, got: &str) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/boot/testdata").join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1 to create)", path.display()));
        assert_eq!(got, want, "{} differs (UPDATE_GOLDEN=1 to accept)", path.display());
    }

    fn fixture() -> (ImageName, NodeBoot) {
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let token = NodeToken::derive(b"golden-secret", mac);
        ("RHEL5.1".parse().unwrap(), NodeBoot { mac, token })
    }

    #[test]
    fn ipxe_node_script_golden() {
        let (img, n) = fixture();
        let s = Server { ip: "10.0.0.1".parse().unwrap(), http_port: 8080, image: Some(&img), cmdline: "console=ttyS0 quiet", seal: None, peers: None };
        golden("node.ipxe", &ipxe_node(&s, &n));
    }

    #[test]
    fn with_peers_the_script_checks_each_file_and_asks_again_golden() {
        let (img, n) = fixture();
        let check = PeerCheck { kernel_sha256: &"ab".repeat(32), initrd_sha256: &"cd".repeat(32) };
        let s = Server { ip: "10.0.0.1".parse().unwrap(), http_port: 80, image: Some(&img), cmdline: "", seal: None, peers: Some(check) };
        let text = ipxe_node(&s, &n);
        golden("node-peers.ipxe", &text);
        // Every label a `goto` names exists once; every request says whether the node checks.
        let labels: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix(':')).collect();
        for l in text.split("goto ").skip(1).map(|t| t.split([' ', '\n']).next().unwrap()) {
            assert_eq!(labels.iter().filter(|x| **x == l).count(), 1, "label {l}: {text}");
        }
        for l in text.lines().filter(|l| l.starts_with("kernel ") || l.starts_with("initrd ")) {
            assert!(l.contains("&verify=${si-v}") || l.contains("&direct=1&bad=1"), "{l}");
        }
        assert_eq!(text.matches(&format!("iseq ${{si-d}} {}", "ab".repeat(32))).count(), 3, "{text}");
        assert_eq!(text.matches(&format!("iseq ${{si-d}} {}", "cd".repeat(32))).count(), 3, "{text}");
    }

    #[test]
    fn ipxe_chain_golden() {
        let s = Server { ip: "10.0.0.1".parse().unwrap(), http_port: 80, image: None, cmdline: "", seal: None, peers: None };
        golden("boot.ipxe", &ipxe_chain(&s));
    }

    #[test]
    fn pxelinux_golden() {
        let (img, n) = fixture();
        let s = Server { ip: "10.0.0.1".parse().unwrap(), http_port: 80, image: Some(&img), cmdline: "console=ttyS0", seal: None, peers: None };
        golden("pxelinux-node.cfg", &pxelinux_cfg(&s, Some(&n)));
        golden("pxelinux-default.cfg", &pxelinux_local(None, "no per-node config asked for"));
    }

    #[test]
    fn local_boot_golden() {
        let (_, n) = fixture();
        golden("node-local.ipxe", &ipxe_local(n.mac, "installed with image RHEL5.1"));
        golden("pxelinux-node-local.cfg", &pxelinux_local(Some(n.mac), "not enrolled on this appliance"));
    }

    #[test]
    fn args_without_image_or_extra() {
        let (_, n) = fixture();
        let s = Server { ip: "10.0.0.1".parse().unwrap(), http_port: 80, image: None, cmdline: "  ", seal: None, peers: None };
        let a = kernel_args(&s, Some(&n));
        assert_eq!(a, format!("si.server=10.0.0.1:80 si.mac=52:54:00:12:34:56 si.token={}", n.token.as_str()));
    }

    #[test]
    fn the_seal_goes_on_the_line_after_the_image() {
        let (img, n) = fixture();
        let seal = crate::types::node_api::ImageSeal { info_hash: "ab".repeat(20), manifest_sha256: Some("cd".repeat(32)), signature: "ef".repeat(64) };
        let s = Server { ip: "10.0.0.1".parse().unwrap(), http_port: 80, image: Some(&img), cmdline: "", seal: Some(&seal), peers: None };
        let a = kernel_args(&s, Some(&n));
        let want = format!("si.image={img} si.infohash={} si.manifest={} si.token=", "ab".repeat(20), "cd".repeat(32));
        assert!(a.contains(&want), "{a}");
        assert!(!a.contains(&seal.signature), "the signature travels in the plan: {a}");
        let o = crate::install::cmdline::parse(&a).unwrap();
        assert_eq!((o.info_hash.as_deref(), o.manifest.as_deref()), (Some(seal.info_hash.as_str()), seal.manifest_sha256.as_deref()));
    }
}
