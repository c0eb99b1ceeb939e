//! Per-node settings written into the unpacked root: fstab (by UUID), host name and hosts,
//! an empty machine-id (systemd makes a fresh one at first boot), fresh ssh host keys, and DHCP
//! on the boot NIC when the image uses systemd-networkd or ifupdown. Rendering is pure; the
//! writers replace files (never write through an existing symlink).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::types::node_api::{FsKind, Partition};
use crate::types::MacAddr;

/// Errors writing the settings.
#[derive(Debug, thiserror::Error)]
#[error("writing {path}")]
pub struct SettingsError {
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// `/etc/fstab` for the partitions (with their file system UUIDs), in layout order.
pub fn render_fstab(parts: &[(&Partition, String)]) -> String {
    let mut s = String::from("# /etc/fstab: written by si-appliance install\n# <file system> <mount point> <type> <options> <dump> <pass>\n");
    for (p, uuid) in parts {
        let line = match (p.fs, p.mount.as_deref()) {
            (FsKind::Swap, _) => format!("UUID={uuid} none swap sw 0 0"),
            (FsKind::Ext4, Some("/")) => format!("UUID={uuid} / ext4 errors=remount-ro 0 1"),
            (FsKind::Ext4, Some(m)) => format!("UUID={uuid} {m} ext4 defaults 0 2"),
            // fsck.xfs does nothing: pass 0.
            (FsKind::Xfs, Some(m)) => format!("UUID={uuid} {m} xfs defaults 0 0"),
            (FsKind::Vfat, Some(m)) => format!("UUID={uuid} {m} vfat umask=0077 0 1"),
            (FsKind::BiosGrub, _) | (_, None) => continue,
        };
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// `/etc/hosts` with `127.0.1.1 <hostname>` (Debian's convention), keeping the image's other
/// lines; a fresh file when the image has none.
pub fn render_hosts(existing: Option<&str>, hostname: &str) -> String {
    let own = format!("127.0.1.1\t{hostname}");
    let Some(text) = existing else {
        return format!("127.0.0.1\tlocalhost\n{own}\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n");
    };
    let mut out = String::new();
    let mut placed = false;
    for line in text.lines() {
        if line.split_whitespace().next() == Some("127.0.1.1") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if !placed && line.split_whitespace().next() == Some("127.0.0.1") {
            out.push_str(&own);
            out.push('\n');
            placed = true;
        }
    }
    if !placed {
        out = format!("{own}\n{out}");
    }
    out
}

/// A systemd-networkd unit: DHCP on the NIC with this MAC.
pub fn render_networkd(mac: MacAddr) -> String {
    format!("# Written by si-appliance install: DHCP on the NIC the node installed through.\n[Match]\nMACAddress={mac}\n\n[Network]\nDHCP=yes\n")
}

/// Replaces `path` (a symlink there is removed, not followed) with `text`.
///
/// # Errors
/// [`SettingsError`].
pub fn replace_file(path: &Path, text: &str) -> Result<(), SettingsError> {
    let err = |source| SettingsError { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(err(std::io::Error::new(std::io::ErrorKind::IsADirectory, "a directory is in the way")));
        }
        Ok(_) => std::fs::remove_file(path).map_err(err)?,
        Err(_) => {}
    }
    std::fs::write(path, text).map_err(err)
}

fn remove_if_there(path: &Path) -> Result<bool, SettingsError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(SettingsError { path: path.to_owned(), source }),
    }
}

/// Host name, hosts, machine-id, and removal of the image's ssh host keys. Returns the names
/// of the removed keys' files.
///
/// # Errors
/// [`SettingsError`] for the first file that cannot be written.
pub fn write_identity(root: &Path, hostname: &str) -> Result<usize, SettingsError> {
    replace_file(&root.join("etc/hostname"), &format!("{hostname}\n"))?;
    let hosts = root.join("etc/hosts");
    let existing = std::fs::read_to_string(&hosts).ok();
    replace_file(&hosts, &render_hosts(existing.as_deref(), hostname))?;
    // Empty, not absent: systemd then writes a fresh id at first boot ("uninitialized" in newer
    // systemd also works, but an empty file is understood by every version).
    replace_file(&root.join("etc/machine-id"), "")?;
    remove_if_there(&root.join("var/lib/dbus/machine-id"))?;
    let mut removed = 0;
    let ssh = root.join("etc/ssh");
    if let Ok(rd) = std::fs::read_dir(&ssh) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") && remove_if_there(&e.path())? {
                removed += 1;
            }
        }
    }
    info!(hostname, ssh_keys_removed = removed, "identity written (hostname, hosts, empty machine-id)");
    Ok(removed)
}

/// DHCP on the boot NIC: a networkd unit when the image has systemd-networkd, else an
/// ifupdown stanza (the NIC named `lan0` by a systemd .link file matching its MAC, since the
/// installed kernel's name for it is not known here). Returns what was done, for the log.
///
/// # Errors
/// [`SettingsError`].
pub fn write_network(root: &Path, mac: MacAddr) -> Result<String, SettingsError> {
    let has = |p: &str| root.join(p).exists();
    let networkd = ["lib/systemd/system/systemd-networkd.service", "usr/lib/systemd/system/systemd-networkd.service"]
        .iter()
        .any(|p| has(p));
    if networkd {
        replace_file(&root.join("etc/systemd/network/20-si-appliance.network"), &render_networkd(mac))?;
        return Ok("systemd-networkd: DHCP on the boot NIC".into());
    }
    if has("etc/network/interfaces") {
        let mut link = String::new();
        // `write!` into a String cannot fail.
        let _ = write!(link, "# Written by si-appliance install.\n[Match]\nMACAddress={mac}\n\n[Link]\nName=lan0\n");
        replace_file(&root.join("etc/systemd/network/10-si-appliance.link"), &link)?;
        replace_file(
            &root.join("etc/network/interfaces.d/si-appliance"),
            "# Written by si-appliance install: DHCP on the NIC the node installed through.\nallow-hotplug lan0\niface lan0 inet dhcp\n",
        )?;
        let ifaces = root.join("etc/network/interfaces");
        let text = std::fs::read_to_string(&ifaces).unwrap_or_default();
        if !text.lines().any(|l| l.trim_start().starts_with("source") && l.contains("interfaces.d")) {
            replace_file(&ifaces, &format!("{text}\nsource /etc/network/interfaces.d/*\n"))?;
        }
        return Ok("ifupdown: DHCP on lan0 (the boot NIC, named by MAC)".into());
    }
    Ok("skipped: the image has neither systemd-networkd nor ifupdown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::node_api::DiskLayout;

    #[test]
    fn fstab_by_uuid() {
        let l = DiskLayout::default_uefi();
        let swap = Partition { size_mib: Some(64), fs: FsKind::Swap, mount: None, label: None };
        let grub = Partition { size_mib: Some(1), fs: FsKind::BiosGrub, mount: None, label: None };
        let xfs = Partition { size_mib: None, fs: FsKind::Xfs, mount: Some("/srv".into()), label: None };
        let t = render_fstab(&[
            (&l.partitions[0], "AB12-CD34".into()),
            (&l.partitions[1], "1111-2222".into()),
            (&swap, "s-1".into()),
            (&grub, "x".into()),
            (&xfs, "x-1".into()),
        ]);
        let body: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            body,
            [
                "UUID=AB12-CD34 /boot/efi vfat umask=0077 0 1",
                "UUID=1111-2222 / ext4 errors=remount-ro 0 1",
                "UUID=s-1 none swap sw 0 0",
                "UUID=x-1 /srv xfs defaults 0 0",
            ]
        );
    }

    #[test]
    fn hosts_keep_the_image_lines() {
        let t = render_hosts(Some("127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n::1 localhost\n"), "node01");
        assert_eq!(t, "127.0.0.1\tlocalhost\n127.0.1.1\tnode01\n::1 localhost\n");
        assert!(render_hosts(None, "n").contains("127.0.1.1\tn\n"));
        assert_eq!(render_hosts(Some("::1 x\n"), "n"), "127.0.1.1\tn\n::1 x\n");
    }

    #[test]
    fn identity_and_network_files() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/ssh")).unwrap();
        std::fs::create_dir_all(r.join("var/lib/dbus")).unwrap();
        std::fs::write(r.join("etc/machine-id"), "0123\n").unwrap();
        std::os::unix::fs::symlink("/etc/machine-id", r.join("var/lib/dbus/machine-id")).unwrap();
        std::fs::write(r.join("etc/ssh/ssh_host_ed25519_key"), "k").unwrap();
        std::fs::write(r.join("etc/ssh/ssh_host_ed25519_key.pub"), "k").unwrap();
        std::fs::write(r.join("etc/ssh/sshd_config"), "c").unwrap();
        // A symlink in the image is replaced, never written through.
        std::os::unix::fs::symlink("/nonexistent/elsewhere", r.join("etc/hostname")).unwrap();
        assert_eq!(write_identity(r, "node07").unwrap(), 2);
        assert_eq!(std::fs::read_to_string(r.join("etc/hostname")).unwrap(), "node07\n");
        assert_eq!(std::fs::read_to_string(r.join("etc/machine-id")).unwrap(), "");
        assert!(!r.join("var/lib/dbus/machine-id").exists() && r.join("etc/ssh/sshd_config").exists());
        let mac: MacAddr = "52:54:00:00:00:07".parse().unwrap();
        assert!(write_network(r, mac).unwrap().starts_with("skipped"));
        std::fs::create_dir_all(r.join("etc/network")).unwrap();
        std::fs::write(r.join("etc/network/interfaces"), "auto lo\niface lo inet loopback\n").unwrap();
        assert!(write_network(r, mac).unwrap().starts_with("ifupdown"));
        assert!(std::fs::read_to_string(r.join("etc/network/interfaces")).unwrap().contains("source /etc/network/interfaces.d/*"));
        std::fs::create_dir_all(r.join("lib/systemd/system")).unwrap();
        std::fs::write(r.join("lib/systemd/system/systemd-networkd.service"), "").unwrap();
        assert!(write_network(r, mac).unwrap().starts_with("systemd-networkd"));
        assert!(std::fs::read_to_string(r.join("etc/systemd/network/20-si-appliance.network")).unwrap().contains("MACAddress=52:54:00:00:00:07"));
    }
}
