//! The boot loader the image carries, installed from inside the image (chroot with /dev, /proc
//! and /sys bound in): GRUB (`grub-install` for i386-pc on BIOS, x86_64-efi `--removable` on
//! UEFI, then `update-grub` or `grub-mkconfig`), or extlinux (`extlinux --install` and the
//! syslinux MBR). An image without either is left alone ("skipped", logged).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use tracing::info;

use super::disk::{self, DiskError, Mounts};
use crate::types::Firmware;

/// Which loader an image carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loader {
    /// GRUB 2 (`grub-install` in the image).
    Grub,
    /// extlinux (syslinux).
    Extlinux,
    /// None found.
    None,
}

fn exists_any(root: &Path, paths: &[&str]) -> Option<String> {
    paths.iter().find(|p| root.join(p).exists()).map(|p| format!("/{p}"))
}

/// Finds the loader in the unpacked root.
pub fn detect(root: &Path) -> Loader {
    if exists_any(root, &["usr/sbin/grub-install", "sbin/grub-install"]).is_some() {
        Loader::Grub
    } else if exists_any(root, &["usr/bin/extlinux", "sbin/extlinux", "usr/sbin/extlinux"]).is_some() {
        Loader::Extlinux
    } else {
        Loader::None
    }
}

/// `/dev/disk/by-uuid/<uuid>` links for the new file systems, on a tmpfs over the chroot's
/// `/dev/disk`: grub-mkconfig writes `root=UUID=…` only when that link exists, and an initramfs
/// without udev has none (it would write `root=/dev/vda1`, which breaks when disks are renamed).
/// Returns whether it created the `/dev/disk` directory (in the bound /dev), for [`unbind_by_uuid`].
fn by_uuid(binds: &mut Mounts, root: &Path, uuids: &[(PathBuf, String)]) -> Result<bool, DiskError> {
    let dir = root.join("dev/disk");
    let created = !dir.exists();
    binds.mount(Path::new("tmpfs"), &dir, Some("tmpfs"))?;
    let links = dir.join("by-uuid");
    std::fs::create_dir_all(&links).map_err(|source| DiskError::Io { op: "creating", path: links.clone(), source })?;
    for (dev, uuid) in uuids {
        let l = links.join(uuid);
        std::os::unix::fs::symlink(dev, &l).map_err(|source| DiskError::Io { op: "linking", path: l.clone(), source })?;
    }
    Ok(created)
}

/// Undoes [`by_uuid`] (the tmpfs is the last mount), leaving /dev as it was.
fn unbind_by_uuid(binds: &mut Mounts, root: &Path, created: bool) {
    binds.unmount_last();
    if created {
        let _ = std::fs::remove_dir(root.join("dev/disk"));
    }
}

/// Binds /dev, /proc and /sys into `root` for chrooted tools; unbound when dropped.
///
/// # Errors
/// [`DiskError`] from mount(2).
pub fn bind_system(root: &Path) -> Result<Mounts, DiskError> {
    let mut m = Mounts::default();
    for d in ["dev", "proc", "sys"] {
        m.mount(Path::new(&format!("/{d}")), &root.join(d), None)?;
    }
    Ok(m)
}

fn chroot(root: &Path, args: &[&str]) -> Result<String, DiskError> {
    let mut a: Vec<&OsStr> = vec![root.as_os_str()];
    a.extend(args.iter().map(OsStr::new));
    disk::tool("chroot", &a, None)
}

/// Installs the image's loader for `disk`; returns what was done (for the log and report).
///
/// # Errors
/// [`DiskError`] from the loader's tools.
pub fn install(
    root: &Path,
    disk: &Path,
    firmware: Firmware,
    uuids: &[(PathBuf, String)],
    root_uuid: &str,
    table_gpt: bool,
) -> Result<String, DiskError> {
    let loader = detect(root);
    let d = disk.to_string_lossy();
    match loader {
        Loader::None => Ok("skipped: the image carries no boot loader (no grub-install, no extlinux)".into()),
        Loader::Grub => {
            let mut binds = bind_system(root)?;
            let created = by_uuid(&mut binds, root, uuids)?;
            let result = (|| {
                match firmware {
                    Firmware::Bios => chroot(root, &["grub-install", "--target=i386-pc", "--recheck", &d])?,
                    Firmware::Uefi => chroot(
                        root,
                        &["grub-install", "--target=x86_64-efi", "--efi-directory=/boot/efi", "--removable", "--no-nvram", &d],
                    )?,
                };
                if exists_any(root, &["usr/sbin/update-grub", "sbin/update-grub"]).is_some() {
                    chroot(root, &["update-grub"])
                } else {
                    chroot(root, &["grub-mkconfig", "-o", "/boot/grub/grub.cfg"])
                }
            })();
            unbind_by_uuid(&mut binds, root, created);
            result?;
            info!(?firmware, disk = %d, "grub installed");
            Ok(format!("grub ({firmware:?}) on {d}"))
        }
        Loader::Extlinux => {
            if firmware == Firmware::Uefi {
                return Ok("skipped: extlinux boots BIOS only and this node is UEFI".into());
            }
            let _binds = bind_system(root)?;
            std::fs::create_dir_all(root.join("boot/extlinux"))
                .map_err(|source| DiskError::Io { op: "creating", path: root.join("boot/extlinux"), source })?;
            chroot(root, &["extlinux", "--install", "/boot/extlinux"])?;
            let conf = root.join("boot/extlinux/extlinux.conf");
            if !conf.exists() {
                let text = extlinux_conf(root, root_uuid);
                std::fs::write(&conf, text).map_err(|source| DiskError::Io { op: "writing", path: conf.clone(), source })?;
            }
            let mbr = if table_gpt { "gptmbr.bin" } else { "mbr.bin" };
            let mbr_path = ["usr/lib/syslinux/mbr", "usr/lib/EXTLINUX", "usr/share/syslinux"]
                .iter()
                .map(|d| root.join(d).join(mbr))
                .find(|p| p.is_file());
            if let Some(p) = mbr_path {
                write_mbr_code(&p, disk)?;
            }
            info!(disk = %d, "extlinux installed");
            Ok(format!("extlinux on {d}"))
        }
    }
}

/// An extlinux.conf booting the image's newest kernel (`/boot/vmlinuz-*`) with root by UUID.
fn extlinux_conf(root: &Path, root_uuid: &str) -> String {
    let mut kernels: Vec<String> = std::fs::read_dir(root.join("boot"))
        .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    kernels.retain(|k| k.starts_with("vmlinuz-"));
    kernels.sort();
    let k = kernels.last().cloned().unwrap_or_else(|| "vmlinuz".into());
    let initrd = k.replacen("vmlinuz", "initrd.img", 1);
    format!(
        "# Written by si-appliance install.\nDEFAULT linux\nTIMEOUT 10\nLABEL linux\n  KERNEL /boot/{k}\n  INITRD /boot/{initrd}\n  APPEND root=UUID={root_uuid} ro console=ttyS0 console=tty0\n"
    )
}

/// Writes the boot code (first 440 bytes) of a syslinux MBR image to the disk.
fn write_mbr_code(mbr: &Path, disk: &Path) -> Result<(), DiskError> {
    use std::io::Write;
    let code = std::fs::read(mbr).map_err(|source| DiskError::Io { op: "reading", path: mbr.to_owned(), source })?;
    let n = code.len().min(440);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(|source| DiskError::Io { op: "opening", path: disk.to_owned(), source })?;
    f.write_all(&code[..n]).map_err(|source| DiskError::Io { op: "writing boot code to", path: disk.to_owned(), source })?;
    f.sync_all().map_err(|source| DiskError::Io { op: "syncing", path: disk.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaders_are_detected_and_configured() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(detect(d.path()), Loader::None);
        std::fs::create_dir_all(d.path().join("usr/bin")).unwrap();
        std::fs::write(d.path().join("usr/bin/extlinux"), "").unwrap();
        assert_eq!(detect(d.path()), Loader::Extlinux);
        std::fs::create_dir_all(d.path().join("boot")).unwrap();
        for k in ["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-10-amd64", "config-6.1.0-10-amd64"] {
            std::fs::write(d.path().join("boot").join(k), "").unwrap();
        }
        let c = extlinux_conf(d.path(), "u-1");
        assert!(c.contains("KERNEL /boot/vmlinuz-6.1.0-9-amd64") || c.contains("KERNEL /boot/vmlinuz-6.1.0-10-amd64"));
        assert!(c.contains("APPEND root=UUID=u-1 ro"));
        std::fs::create_dir_all(d.path().join("usr/sbin")).unwrap();
        std::fs::write(d.path().join("usr/sbin/grub-install"), "").unwrap();
        assert_eq!(detect(d.path()), Loader::Grub);
    }
}
