//! The target disk: choosing it, checking its size, partitioning it from a [`DiskLayout`]
//! (an sfdisk script: MBR or GPT, ESP and bios-grub types), making the file systems (mkfs.*),
//! mounting them under a work directory, and wiping the partition table when an install fails
//! so a half-written disk is never booted (as coreos-installer does).
//!
//! The script and partition-name rules are pure functions; the rest calls util-linux and the
//! mkfs tools, which the clients' initramfs carries.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::types::node_api::{DiskLayout, FsKind, Partition, TableKind};

const MIB: u64 = 1 << 20;

/// Errors of the disk steps.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// No disk was named and none qualifies.
    #[error("no disk to install on: {0}")]
    NoDisk(String),
    /// The disk cannot hold the layout and the image.
    #[error("disk {disk} is too small: {have_mib} MiB, the layout and the image need at least {need_mib} MiB")]
    TooSmall {
        /// The disk.
        disk: PathBuf,
        /// Its size.
        have_mib: u64,
        /// What is needed.
        need_mib: u64,
    },
    /// The layout cannot be used.
    #[error("disk layout: {0}")]
    Layout(String),
    /// A tool failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Tool {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// A tool could not be started.
    #[error("{cmd}: cannot run it")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file or device operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A partition's device node did not appear after the table was re-read.
    #[error("partition {0} did not appear after re-reading the partition table")]
    NoPartition(PathBuf),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DiskError {
    let path = path.to_owned();
    move |source| DiskError::Io { op, path, source }
}

/// Runs a tool, with `stdin` fed if given; its stdout on success.
///
/// # Errors
/// [`DiskError::Spawn`] or [`DiskError::Tool`] (with the end of stderr).
pub fn tool(prog: &str, args: &[&std::ffi::OsStr], stdin: Option<&str>) -> Result<String, DiskError> {
    let cmd = std::iter::once(prog.to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    debug!(%cmd, "running");
    let mut c = Command::new(prog);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = c.spawn().map_err(|source| DiskError::Spawn { cmd: cmd.clone(), source })?;
    if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(text.as_bytes()).map_err(|source| DiskError::Spawn { cmd: cmd.clone(), source })?;
    }
    let out = child.wait_with_output().map_err(|source| DiskError::Spawn { cmd: cmd.clone(), source })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err.trim().chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(DiskError::Tool { cmd, status: out.status.to_string(), stderr: tail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// Size of a block device (or file) in bytes.
///
/// # Errors
/// [`DiskError::Io`] when it cannot be opened.
pub fn size_of(disk: &Path) -> Result<u64, DiskError> {
    let mut f = std::fs::File::open(disk).map_err(io_err("opening", disk))?;
    f.seek(SeekFrom::End(0)).map_err(io_err("sizing", disk))
}

/// MiB the root file system needs: the unpacked tree plus 15 % for metadata and block rounding,
/// the archive (kept on the root while it is seeded), and 64 MiB for the journal and reserve.
pub fn root_need_mib(unpacked: u64, archive: u64) -> u64 {
    let bytes = unpacked + unpacked / 100 * 15 + archive;
    bytes.div_ceil(MIB) + 64
}

/// The smallest disk for `layout` with an image of these sizes; an error when a fixed-size
/// partition holding `/` is itself too small.
///
/// # Errors
/// [`DiskError::Layout`] naming the partition.
pub fn need_mib(layout: &DiskLayout, unpacked: u64, archive: u64) -> Result<u64, DiskError> {
    let root = root_need_mib(unpacked, archive);
    let mut rest_min = 1;
    for p in &layout.partitions {
        if p.mount.as_deref() == Some("/") {
            match p.size_mib {
                Some(s) if s < root => {
                    return Err(DiskError::Layout(format!(
                        "the / partition ({s} MiB) is too small for the image (needs {root} MiB)"
                    )));
                }
                Some(_) => {}
                None => rest_min = root,
            }
        }
    }
    Ok(layout.min_disk_mib(rest_min))
}

/// The first non-removable disk in `sys_block` (`/sys/block`) of at least `min_bytes`, by name;
/// loop, ram, zram, optical (sr), md and device-mapper devices are never chosen.
///
/// # Errors
/// [`DiskError::NoDisk`] listing what was seen.
pub fn pick_disk(sys_block: &Path, min_bytes: u64) -> Result<PathBuf, DiskError> {
    let rd = std::fs::read_dir(sys_block).map_err(io_err("listing", sys_block))?;
    let mut names: Vec<String> = rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect();
    names.sort();
    let mut seen = Vec::new();
    for n in names {
        if ["loop", "ram", "zram", "sr", "md", "dm-", "fd"].iter().any(|p| n.starts_with(p)) {
            continue;
        }
        let read = |f: &str| std::fs::read_to_string(sys_block.join(&n).join(f)).unwrap_or_default();
        if read("removable").trim() == "1" {
            seen.push(format!("{n} (removable)"));
            continue;
        }
        let bytes = read("size").trim().parse::<u64>().unwrap_or(0) * 512;
        if bytes < min_bytes {
            seen.push(format!("{n} ({} MiB)", bytes / MIB));
            continue;
        }
        return Ok(PathBuf::from("/dev").join(n));
    }
    Err(DiskError::NoDisk(format!(
        "none of at least {} MiB (seen: {})",
        min_bytes.div_ceil(MIB),
        if seen.is_empty() { "no disks".to_owned() } else { seen.join(", ") }
    )))
}

/// The device of partition `n` (1-based) of `disk`: `sda` → `sda1`, `nvme0n1`/`loop0` → `…p1`.
pub fn partition_path(disk: &Path, n: usize) -> PathBuf {
    let s = disk.as_os_str().to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) { PathBuf::from(format!("{s}p{n}")) } else { PathBuf::from(format!("{s}{n}")) }
}

/// GPT type GUIDs and MBR type bytes.
fn part_type(table: TableKind, p: &Partition) -> &'static str {
    let esp = p.mount.as_deref() == Some("/boot/efi");
    match (table, p.fs) {
        (TableKind::Gpt, FsKind::Vfat) if esp => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        (TableKind::Gpt, FsKind::Vfat) => "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        (TableKind::Gpt, FsKind::Swap) => "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
        (TableKind::Gpt, FsKind::BiosGrub) => "21686148-6449-6E6F-744E-656564454649",
        (TableKind::Gpt, FsKind::Ext4 | FsKind::Xfs) => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        (TableKind::Mbr, FsKind::Vfat) if esp => "ef",
        (TableKind::Mbr, FsKind::Vfat) => "c",
        (TableKind::Mbr, FsKind::Swap) => "82",
        // Refused by `DiskLayout::validate`; a Linux type keeps this total.
        (TableKind::Mbr, FsKind::BiosGrub | FsKind::Ext4 | FsKind::Xfs) => "83",
    }
}

/// The sfdisk script for a layout: 1 MiB-aligned partitions in order, the last without a size
/// taking the rest; on MBR the partition holding `/boot` (else `/`) is marked bootable, on GPT
/// each partition is named after its label.
///
/// # Errors
/// [`DiskError::Layout`] for a layout sfdisk cannot express (more than 4 partitions on MBR, a
/// label with a quote).
pub fn sfdisk_script(layout: &DiskLayout) -> Result<String, DiskError> {
    layout.validate().map_err(DiskError::Layout)?;
    if layout.table == TableKind::Mbr && layout.partitions.len() > 4 {
        return Err(DiskError::Layout("an mbr table holds at most 4 partitions here".into()));
    }
    let boot = layout
        .partitions
        .iter()
        .position(|p| p.mount.as_deref() == Some("/boot"))
        .or_else(|| layout.partitions.iter().position(|p| p.mount.as_deref() == Some("/")));
    let mut s = String::from(match layout.table {
        TableKind::Mbr => "label: dos\n",
        TableKind::Gpt => "label: gpt\n",
    });
    for (i, p) in layout.partitions.iter().enumerate() {
        let mut fields = Vec::new();
        if let Some(mib) = p.size_mib {
            fields.push(format!("size={mib}MiB"));
        }
        fields.push(format!("type={}", part_type(layout.table, p)));
        if layout.table == TableKind::Mbr && Some(i) == boot {
            fields.push("bootable".into());
        }
        if let (TableKind::Gpt, Some(l)) = (layout.table, &p.label) {
            if l.contains(['"', '\n', '\\']) {
                return Err(DiskError::Layout(format!("partition {}: label {l:?} has a quote or newline", i + 1)));
            }
            fields.push(format!("name=\"{l}\""));
        }
        s.push_str(&fields.join(", "));
        s.push('\n');
    }
    Ok(s)
}

/// Partitions `disk` (after wiping every signature on it), makes the kernel re-read the table
/// and waits for the partition devices. Returns them in layout order.
///
/// # Errors
/// [`DiskError`] from the tools or when a partition device does not appear in 10 s.
pub fn partition(disk: &Path, layout: &DiskLayout) -> Result<Vec<PathBuf>, DiskError> {
    let script = sfdisk_script(layout)?;
    let d = disk.as_os_str();
    // Old signatures (file systems, RAID, LVM, partition tables) go first; sfdisk's own --wipe
    // covers them where wipefs is missing (a busybox initramfs).
    match tool("wipefs", &[os("--all"), os("--force"), d], None) {
        Err(DiskError::Spawn { .. }) => debug!("no wipefs here; sfdisk --wipe always does the wiping"),
        other => {
            other?;
        }
    }
    tool("sfdisk", &[os("--wipe"), os("always"), os("--wipe-partitions"), os("always"), os("--no-reread"), os("-q"), d], Some(&script))?;
    reread(disk);
    let parts: Vec<PathBuf> = (1..=layout.partitions.len()).map(|n| partition_path(disk, n)).collect();
    // Bounded: 2 s after BLKRRPART, then (some kernels answer BLKRRPART on a loop device
    // without adding partitions) partx, and 10 s more.
    if !wait_blocks(&parts, Duration::from_secs(2)) {
        debug!(disk = %disk.display(), "partitions not there after BLKRRPART; adding them with partx");
        let _ = tool("partx", &[os("-u"), d], None);
        let _ = tool("partx", &[os("-a"), d], None);
        let _ = tool("udevadm", &[os("settle"), os("--timeout=10")], None);
    }
    if !wait_blocks(&parts, Duration::from_secs(10)) {
        let missing = parts.iter().find(|p| !is_block(p)).cloned().unwrap_or_default();
        return Err(DiskError::NoPartition(missing));
    }
    info!(disk = %disk.display(), table = ?layout.table, partitions = parts.len(), "partitioned");
    Ok(parts)
}

/// Waits until every path is a block device, at most `limit`.
fn wait_blocks(parts: &[PathBuf], limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if parts.iter().all(|p| is_block(p)) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_block(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).map(|m| m.file_type().is_block_device()).unwrap_or(false)
}

/// Asks the kernel to re-read the partition table (BLKRRPART via blockdev, else partx), then
/// lets udev settle where there is one. Failures are logged: the caller checks the devices.
fn reread(disk: &Path) {
    let d = disk.as_os_str();
    if let Err(e) = tool("blockdev", &[os("--rereadpt"), d], None) {
        debug!("blockdev --rereadpt: {e}; trying partx");
        if let Err(e) = tool("partx", &[os("-u"), d], None) {
            warn!("re-reading the partition table of {}: {e}", disk.display());
        }
    }
    let _ = tool("udevadm", &[os("settle"), os("--timeout=10")], None);
}

/// Makes the file system of one partition.
///
/// # Errors
/// [`DiskError`] from the mkfs tool.
pub fn mkfs(dev: &Path, p: &Partition) -> Result<(), DiskError> {
    let d = dev.as_os_str();
    let label = p.label.as_deref();
    let mut args: Vec<&std::ffi::OsStr> = Vec::new();
    let prog = match p.fs {
        FsKind::Ext4 => {
            args.extend([os("-F"), os("-q")]);
            if let Some(l) = label {
                args.extend([os("-L"), os(l)]);
            }
            "mkfs.ext4"
        }
        FsKind::Xfs => {
            args.extend([os("-f"), os("-q")]);
            if let Some(l) = label {
                args.extend([os("-L"), os(l)]);
            }
            "mkfs.xfs"
        }
        FsKind::Vfat => {
            if p.size_mib.unwrap_or(u64::MAX) >= 64 {
                args.extend([os("-F"), os("32")]);
            }
            if let Some(l) = label {
                args.extend([os("-n"), os(l)]);
            }
            "mkfs.vfat"
        }
        FsKind::Swap => {
            if let Some(l) = label {
                args.extend([os("-L"), os(l)]);
            }
            "mkswap"
        }
        FsKind::BiosGrub => return Ok(()),
    };
    args.push(d);
    tool(prog, &args, None)?;
    info!(dev = %dev.display(), fs = ?p.fs, "file system made");
    Ok(())
}

/// Mounted file systems under a root, unmounted (in reverse) by [`Mounts::unmount_all`] or on drop.
#[derive(Debug, Default)]
pub struct Mounts {
    targets: Vec<PathBuf>,
}

fn cstr(p: &Path) -> Result<CString, DiskError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| DiskError::Io {
        op: "naming",
        path: p.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"),
    })
}

impl Mounts {
    /// mount(2) `dev` on `target` (created) with `fstype`, or a bind mount when `fstype` is None.
    ///
    /// # Errors
    /// [`DiskError::Io`] with the errno.
    pub fn mount(&mut self, dev: &Path, target: &Path, fstype: Option<&str>) -> Result<(), DiskError> {
        std::fs::create_dir_all(target).map_err(io_err("creating", target))?;
        let (src, tgt) = (cstr(dev)?, cstr(target)?);
        let ty = fstype.map(|t| CString::new(t).unwrap_or_default());
        let flags = if fstype.is_none() { libc::MS_BIND | libc::MS_REC } else { 0 };
        // SAFETY: every pointer is a valid NUL-terminated string (or null for the type of a
        // bind mount and for the data), alive for the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                ty.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
                flags,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(DiskError::Io { op: "mounting", path: target.to_owned(), source: e });
        }
        self.targets.push(target.to_owned());
        if fstype.is_none() {
            // A bind of a shared mount joins its peer group: whatever is mounted below the bind
            // (the by-uuid tmpfs for GRUB) would appear on the host's /dev too. Private stops that.
            // SAFETY: a valid NUL-terminated target; null source, type and data are allowed for
            // a propagation change.
            let rc = unsafe {
                libc::mount(std::ptr::null(), tgt.as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null())
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(DiskError::Io { op: "making private", path: target.to_owned(), source: e });
            }
        }
        debug!(dev = %dev.display(), target = %target.display(), ?fstype, "mounted");
        Ok(())
    }

    /// Unmounts the last mount only.
    pub fn unmount_last(&mut self) {
        if let Some(t) = self.targets.pop() {
            let mut one = Mounts { targets: vec![t] };
            one.unmount_all();
        }
    }

    /// Unmounts everything, last mounted first (lazily when busy).
    pub fn unmount_all(&mut self) {
        while let Some(t) = self.targets.pop() {
            let Ok(c) = cstr(&t) else { continue };
            // SAFETY: a valid NUL-terminated path.
            let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                warn!(target = %t.display(), "unmount: {e}; detaching");
                // SAFETY: as above.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// The mount-type name of a file system.
pub fn fstype(fs: FsKind) -> Option<&'static str> {
    match fs {
        FsKind::Ext4 => Some("ext4"),
        FsKind::Xfs => Some("xfs"),
        FsKind::Vfat => Some("vfat"),
        FsKind::Swap | FsKind::BiosGrub => None,
    }
}

/// `root` joined with an absolute mount point (validated: no `..`).
pub fn under(root: &Path, mount: &str) -> PathBuf {
    let rel = mount.trim_start_matches('/');
    if rel.is_empty() { root.to_owned() } else { root.join(rel) }
}

/// Mounts every file system of the layout under `root`, `/` first, then by depth.
///
/// # Errors
/// [`DiskError`] from mount(2); what was mounted is unmounted when the returned error drops
/// the [`Mounts`].
pub fn mount_layout(layout: &DiskLayout, parts: &[PathBuf], root: &Path) -> Result<Mounts, DiskError> {
    let mut order: Vec<(usize, &str)> =
        layout.partitions.iter().enumerate().filter_map(|(i, p)| Some((i, p.mount.as_deref()?))).collect();
    order.sort_by_key(|(_, m)| m.split('/').filter(|c| !c.is_empty()).count());
    let mut mounts = Mounts::default();
    for (i, m) in order {
        let p = &layout.partitions[i];
        let Some(ty) = fstype(p.fs) else { continue };
        mounts.mount(&parts[i], &under(root, m), Some(ty))?;
    }
    Ok(mounts)
}

/// The UUID of a file system (blkid; util-linux or busybox output).
///
/// # Errors
/// [`DiskError`] when blkid fails or prints no UUID.
pub fn uuid_of(dev: &Path) -> Result<String, DiskError> {
    let out = match tool("blkid", &[os("-o"), os("value"), os("-s"), os("UUID"), dev.as_os_str()], None) {
        Ok(o) => o,
        Err(_) => tool("blkid", &[dev.as_os_str()], None)?,
    };
    parse_uuid(&out).ok_or_else(|| DiskError::Tool {
        cmd: format!("blkid {}", dev.display()),
        status: "ok".into(),
        stderr: format!("no UUID in {out:?}"),
    })
}

/// The UUID from `blkid -o value -s UUID` (the value alone) or plain `blkid` (`UUID="…"`).
pub fn parse_uuid(out: &str) -> Option<String> {
    // `UUID="` at the start of a word (not PARTUUID, not UUID_SUB).
    let word = out.match_indices("UUID=\"").map(|(i, _)| i).find(|&i| i == 0 || out.as_bytes()[i - 1] == b' ');
    let v = match word {
        Some(i) => {
            let rest = &out[i..];
            let start = rest.find('"')? + 1;
            let len = rest[start..].find('"')?;
            rest[start..start + len].to_owned()
        }
        None => out.lines().next()?.trim().to_owned(),
    };
    let ok = !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then_some(v)
}

/// Makes the disk unbootable after a failed install: zeroes its first and last MiB (MBR, GPT
/// header and its backup) and tells the kernel. Best effort: every failure is logged.
pub fn wipe_table(disk: &Path) {
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).open(disk)?;
        let size = f.seek(SeekFrom::End(0))?;
        let zeros = vec![0u8; MIB as usize];
        let n = MIB.min(size) as usize;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&zeros[..n])?;
        if size > MIB {
            let at = size.saturating_sub(MIB).max(MIB);
            f.seek(SeekFrom::Start(at))?;
            f.write_all(&zeros[..(size - at) as usize])?;
        }
        f.sync_all()
    })();
    match result {
        Ok(()) => warn!(disk = %disk.display(), "partition table wiped: the disk will not boot a half-written system"),
        Err(e) => warn!(disk = %disk.display(), "wiping the partition table failed: {e}"),
    }
    reread(disk);
    // Where BLKRRPART leaves stale partitions (loop devices on some kernels), drop them.
    let _ = tool("partx", &[os("-d"), disk.as_os_str()], None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_for_the_default_layouts() {
        assert_eq!(
            sfdisk_script(&DiskLayout::default_bios()).unwrap(),
            "label: dos\ntype=83, bootable\n"
        );
        assert_eq!(
            sfdisk_script(&DiskLayout::default_uefi()).unwrap(),
            "label: gpt\nsize=256MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI\"\n\
             type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n"
        );
    }

    #[test]
    fn scripts_for_bios_grub_swap_and_boot() {
        let p = |size: Option<u64>, fs, mount: Option<&str>| Partition {
            size_mib: size,
            fs,
            mount: mount.map(Into::into),
            label: None,
        };
        let gpt = DiskLayout {
            table: TableKind::Gpt,
            partitions: vec![p(Some(1), FsKind::BiosGrub, None), p(Some(512), FsKind::Swap, None), p(None, FsKind::Xfs, Some("/"))],
        };
        assert_eq!(
            sfdisk_script(&gpt).unwrap(),
            "label: gpt\nsize=1MiB, type=21686148-6449-6E6F-744E-656564454649\n\
             size=512MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        );
        let mbr = DiskLayout {
            table: TableKind::Mbr,
            partitions: vec![p(Some(512), FsKind::Ext4, Some("/boot")), p(Some(256), FsKind::Swap, None), p(None, FsKind::Ext4, Some("/"))],
        };
        assert_eq!(sfdisk_script(&mbr).unwrap(), "label: dos\nsize=512MiB, type=83, bootable\nsize=256MiB, type=82\ntype=83\n");
        let five = DiskLayout { table: TableKind::Mbr, partitions: vec![p(Some(1), FsKind::Swap, None); 4].into_iter().chain([p(None, FsKind::Ext4, Some("/"))]).collect() };
        assert!(sfdisk_script(&five).unwrap_err().to_string().contains("at most 4"));
        let mut bad = DiskLayout::default_uefi();
        bad.partitions[0].label = Some("a\"b".into());
        assert!(sfdisk_script(&bad).is_err());
    }

    #[test]
    fn partition_names() {
        assert_eq!(partition_path(Path::new("/dev/sda"), 1), Path::new("/dev/sda1"));
        assert_eq!(partition_path(Path::new("/dev/vda"), 2), Path::new("/dev/vda2"));
        assert_eq!(partition_path(Path::new("/dev/nvme0n1"), 1), Path::new("/dev/nvme0n1p1"));
        assert_eq!(partition_path(Path::new("/dev/loop7"), 3), Path::new("/dev/loop7p3"));
    }

    #[test]
    fn sizes_needed() {
        let mib = 1 << 20;
        assert_eq!(root_need_mib(100 * mib, 40 * mib), 100 + 15 + 40 + 64);
        // BIOS default: the root takes the rest, plus 2 MiB for the table.
        assert_eq!(need_mib(&DiskLayout::default_bios(), 100 * mib, 40 * mib).unwrap(), 2 + 219);
        assert_eq!(need_mib(&DiskLayout::default_uefi(), 100 * mib, 40 * mib).unwrap(), 2 + 256 + 219);
        let mut fixed = DiskLayout::default_bios();
        fixed.partitions[0].size_mib = Some(100);
        assert!(need_mib(&fixed, 100 * mib, 40 * mib).unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn disks_are_picked_by_rules() {
        let d = tempfile::tempdir().unwrap();
        let mk = |n: &str, sectors: u64, removable: &str| {
            std::fs::create_dir_all(d.path().join(n)).unwrap();
            std::fs::write(d.path().join(n).join("size"), format!("{sectors}\n")).unwrap();
            std::fs::write(d.path().join(n).join("removable"), removable).unwrap();
        };
        mk("loop0", 1 << 30, "0");
        mk("sr0", 1 << 30, "1");
        mk("sda", 2048, "0"); // 1 MiB
        mk("sdb", 1 << 22, "1"); // removable
        mk("vda", 1 << 22, "0"); // 2 GiB
        assert_eq!(pick_disk(d.path(), 1 << 30).unwrap(), Path::new("/dev/vda"));
        let e = pick_disk(d.path(), 1 << 40).unwrap_err().to_string();
        assert!(e.contains("sda (1 MiB)") && e.contains("sdb (removable)") && !e.contains("loop0"), "{e}");
    }

    #[test]
    fn uuids_from_both_blkids() {
        assert_eq!(parse_uuid("0b1c-22aa\n").as_deref(), Some("0b1c-22aa"));
        assert_eq!(
            parse_uuid("/dev/vda1: LABEL=\"root\" UUID=\"6f1e2c3d-aaaa-bbbb-cccc-0123456789ab\" TYPE=\"ext4\"\n").as_deref(),
            Some("6f1e2c3d-aaaa-bbbb-cccc-0123456789ab")
        );
        assert_eq!(parse_uuid(""), None);
        assert_eq!(parse_uuid("not a uuid\n"), None);
    }
}
