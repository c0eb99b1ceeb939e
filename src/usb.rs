//! The appliance's USB stick, seen from a workstation: `si-appliance usb add-image STICK NAME
//! SOURCE` puts an image (a directory tree or a tar / tar.zst) into the stick's image store and
//! packs it there, so that the stick comes up ready to serve it. STICK is the image file that
//! `pxe-assets/build-usb.sh` wrote, or the stick's block device (/dev/sdX).
//!
//! The stick's data partition (ext4, label `SI-DATA`) is found by its label, mounted on a
//! private temporary directory (an image file through a loop device) and always unmounted and
//! detached again, also when the import fails. The configuration on it
//! (`si-appliance.toml`) is edited as text, keeping the operator's comments: the new image can
//! become the default (`image = …`) and nodes can be enrolled (`[[dhcp.reservation]]`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::image::pack::PackOptions;
use crate::image::store::{PackOutcome, Store, TreeKind};
use crate::types::{ImageName, MacAddr};

/// The data partition's file-system label (set by build-usb.sh).
pub const DATA_LABEL: &str = "SI-DATA";
/// The configuration file on the data partition.
pub const CONFIG: &str = "si-appliance.toml";

/// Errors of the stick commands.
#[derive(Debug, thiserror::Error)]
pub enum UsbError {
    /// A helper program could not be run or failed.
    #[error("{program} {args}: {why}")]
    Command { program: &'static str, args: String, why: String },
    /// No partition with the data label.
    #[error("{stick}: no partition labelled {DATA_LABEL} (is it an si-appliance stick?)")]
    NoDataPartition { stick: PathBuf },
    /// STICK is neither a regular file nor a block device.
    #[error("{0}: not an image file or a block device")]
    NotAStick(PathBuf),
    /// A file on the data partition.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration on the stick cannot take the change.
    #[error("{CONFIG} on the stick: {0}")]
    Config(String),
    /// The image store.
    #[error("the stick's image store")]
    Store(#[from] crate::image::error::ImageError),
}

fn run(program: &'static str, args: &[&str]) -> Result<String, UsbError> {
    let shown = args.join(" ");
    let out = Command::new(program).args(args).output().map_err(|e| UsbError::Command {
        program,
        args: shown.clone(),
        why: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(UsbError::Command {
            program,
            args: shown,
            why: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The stick's data partition, mounted; unmounted (and its loop device detached) on drop.
pub struct DataPartition {
    mount: PathBuf,
    loop_dev: Option<String>,
    mounted: bool,
}

impl DataPartition {
    /// Finds and mounts the data partition of `stick` (an image file or a block device).
    pub fn mount(stick: &Path) -> Result<Self, UsbError> {
        use std::os::unix::fs::FileTypeExt;
        let meta = fs::metadata(stick).map_err(|source| UsbError::Io { path: stick.to_owned(), source })?;
        let stick_s = stick.to_string_lossy().into_owned();
        let mut me = DataPartition { mount: PathBuf::new(), loop_dev: None, mounted: false };
        let disk = if meta.file_type().is_block_device() {
            stick_s.clone()
        } else if meta.is_file() {
            let dev = run("losetup", &["--find", "--show", "--partscan", &stick_s])?;
            me.loop_dev = Some(dev.clone());
            // Some kernels (seen in a VM sandbox) set the partscan flag but add no partitions:
            // partx reads the table and adds them itself.
            std::thread::sleep(std::time::Duration::from_millis(200));
            if data_partition(&dev)?.is_none() {
                let _ = run("partx", &["-a", &dev]);
            }
            dev
        } else {
            return Err(UsbError::NotAStick(stick.to_owned()));
        };
        // The kernel creates a loop device's partitions a moment after `losetup --partscan`.
        let mut part = None;
        for _ in 0..50 {
            part = data_partition(&disk)?;
            if part.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let part = part.ok_or_else(|| UsbError::NoDataPartition { stick: stick.to_owned() })?;
        let dir = std::env::temp_dir().join(format!("si-usb.{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|source| UsbError::Io { path: dir.clone(), source })?;
        me.mount = dir;
        grow(&disk, &part)?;
        run("mount", &["-t", "ext4", &part, &me.mount.to_string_lossy()])?;
        me.mounted = true;
        Ok(me)
    }

    /// Where the partition is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for DataPartition {
    fn drop(&mut self) {
        if self.mounted {
            let m = self.mount.to_string_lossy().into_owned();
            let _ = run("sync", &[]);
            if let Err(e) = run("umount", &[&m]) {
                tracing::error!("{e}: the stick's data partition stays mounted on {m}");
                return;
            }
        }
        if !self.mount.as_os_str().is_empty() {
            let _ = fs::remove_dir(&self.mount);
        }
        if let Some(dev) = &self.loop_dev {
            let _ = run("partx", &["-d", dev]);
            if let Err(e) = run("losetup", &["--detach", dev]) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Grows the (not yet mounted) data partition `part` to the end of `disk` and its ext4 file system with
/// it, as the stick does at its first boot: a stick written with `dd` (or an image file made
/// bigger with `truncate`) can take images bigger than the data partition build-usb.sh made.
/// Nothing to do when it already ends near the end of the disk.
fn grow(disk: &str, part: &str) -> Result<(), UsbError> {
    let read = |p: PathBuf| -> Result<u64, UsbError> {
        let t = fs::read_to_string(&p).map_err(|source| UsbError::Io { path: p.clone(), source })?;
        t.trim().parse().map_err(|_| UsbError::Io { path: p, source: std::io::Error::other("not a number") })
    };
    let sys = |dev: &str| Path::new("/sys/class/block").join(Path::new(dev).file_name().unwrap_or_default());
    let size = read(sys(disk).join("size"))?;
    let (start, len, num) = (read(sys(part).join("start"))?, read(sys(part).join("size"))?, read(sys(part).join("partition"))?);
    if !worth_growing(size, start, len) {
        return Ok(());
    }
    let num = num.to_string();
    let mut child = Command::new("sfdisk")
        .args(["--no-reread", "--no-tell-kernel", "-q", "--force", "-N", &num, disk])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| UsbError::Command { program: "sfdisk", args: format!("-N {num} {disk}"), why: e.to_string() })?;
    if let Some(mut i) = child.stdin.take() {
        use std::io::Write;
        let _ = i.write_all(b", +\n");
    }
    let out = child.wait_with_output().map_err(|e| UsbError::Command { program: "sfdisk", args: disk.to_owned(), why: e.to_string() })?;
    if !out.status.success() {
        return Err(UsbError::Command { program: "sfdisk", args: format!("-N {num} {disk}"), why: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    run("partx", &["-u", "-n", &num, disk])?;
    // Offline, before the mount: resize2fs wants a freshly checked file system then (and online
    // resizing is refused by some kernels).
    run("e2fsck", &["-f", "-p", part])?;
    run("resize2fs", &[part])?;
    Ok(())
}

/// Whether a partition at `start` of `len` sectors on a disk of `size` sectors leaves more than
/// 1 MiB (plus the 33 sectors of the backup GPT) unused behind it.
fn worth_growing(size: u64, start: u64, len: u64) -> bool {
    start + len + 2048 + 34 < size
}

/// The partition of `disk` whose file system is labelled [`DATA_LABEL`].
fn data_partition(disk: &str) -> Result<Option<String>, UsbError> {
    // The kernel's partition list (sysfs) and blkid on each: no udev database needed, so this
    // also works in a container or right after `losetup --partscan`.
    let base = Path::new(disk).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sys = Path::new("/sys/class/block").join(&base);
    let mut parts: Vec<String> = fs::read_dir(&sys)
        .map_err(|source| UsbError::Io { path: sys.clone(), source })?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("partition").exists())
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .collect();
    parts.sort();
    for p in parts {
        if let Ok(label) = run("blkid", &["-o", "value", "-s", "LABEL", &p]) {
            if label == DATA_LABEL {
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

/// What `usb add-image` does besides importing.
#[derive(Debug, Default)]
pub struct AddImage {
    /// Make it the default image (`image = NAME`).
    pub default: bool,
    /// Nodes to enrol: MAC and an optional host name.
    pub enroll: Vec<(MacAddr, Option<String>)>,
}

/// What was done, for the operator.
#[derive(Debug)]
pub struct Added {
    pub entries: u64,
    pub bytes: u64,
    pub archive: PathBuf,
    pub archive_bytes: Option<u64>,
}

/// Imports `source` as image `name` into the stick's store, packs it, and applies `opts` to the
/// stick's configuration.
pub fn add_image(stick: &Path, name: &ImageName, source: &Path, opts: &AddImage) -> Result<Added, UsbError> {
    let data = DataPartition::mount(stick)?;
    let store = Store::new(&data.path().join("store"));
    let imported = store.import(TreeKind::Image, name, source)?;
    let (archive, archive_bytes) = match store.pack(TreeKind::Image, name, &PackOptions::default(), None, false)? {
        PackOutcome::Unchanged { archive } => (archive, None),
        PackOutcome::Packed { archive, bytes, .. } => (archive, Some(bytes)),
    };
    let archive = archive.strip_prefix(data.path()).map(|p| Path::new("/srv/si").join(p)).unwrap_or(archive);
    if opts.default || !opts.enroll.is_empty() {
        let path = data.path().join(CONFIG);
        let text = fs::read_to_string(&path).map_err(|source| UsbError::Io { path: path.clone(), source })?;
        let mut text = if opts.default { set_default_image(&text, name)? } else { text };
        for (mac, host) in &opts.enroll {
            text = enrol(&text, *mac, host.as_deref());
        }
        let tmp = path.with_extension("toml.tmp");
        fs::write(&tmp, &text).map_err(|source| UsbError::Io { path: tmp.clone(), source })?;
        fs::rename(&tmp, &path).map_err(|source| UsbError::Io { path: path.clone(), source })?;
    }
    Ok(Added { entries: imported.entries, bytes: imported.bytes, archive, archive_bytes })
}

/// Sets the top-level `image = "…"` key (before the first table), keeping everything else.
pub fn set_default_image(config: &str, name: &ImageName) -> Result<String, UsbError> {
    let mut out = String::with_capacity(config.len() + 32);
    let mut done = false;
    let mut in_table = false;
    for line in config.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with('[') {
            if !done {
                out.push_str(&format!("image = \"{name}\"\n"));
                done = true;
            }
            in_table = true;
        }
        if !in_table && !done && is_key(t, "image") {
            out.push_str(&format!("image = \"{name}\"\n"));
            done = true;
            continue;
        }
        out.push_str(line);
    }
    if !done {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("image = \"{name}\"\n"));
    }
    check_toml(&out)?;
    Ok(out)
}

/// Appends a `[[dhcp.reservation]]` for `mac` unless one for it is there already.
pub fn enrol(config: &str, mac: MacAddr, hostname: Option<&str>) -> String {
    let want = mac.to_string();
    let already = config.lines().any(|l| {
        let t = l.trim_start();
        is_key(t, "mac") && t.split_once('=').is_some_and(|(_, v)| v.trim().trim_matches('"').eq_ignore_ascii_case(&want))
    });
    if already {
        return config.to_owned();
    }
    let mut out = config.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!("\n[[dhcp.reservation]]\nmac = \"{want}\"\n"));
    if let Some(h) = hostname {
        out.push_str(&format!("hostname = \"{}\"\n", h.replace(['"', '\\'], "")));
    }
    out
}

fn is_key(line: &str, key: &str) -> bool {
    line.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
}

fn check_toml(text: &str) -> Result<(), UsbError> {
    toml::from_str::<toml::Table>(text).map(|_| ()).map_err(|e| UsbError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ImageName {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_image_is_replaced_at_top_level_only() {
        let c = "# comment\nimage = \"RHEL5.1\"\nstore = \"/srv/si/store\"\n\n[boot]\nimage = \"x\"\n";
        let out = set_default_image(c, &name("debian12")).unwrap();
        assert_eq!(out, "# comment\nimage = \"debian12\"\nstore = \"/srv/si/store\"\n\n[boot]\nimage = \"x\"\n");
    }

    #[test]
    fn a_missing_default_image_is_added_before_the_first_table() {
        let out = set_default_image("store = \"/s\"\n[dhcp]\nmode = \"full\"\n", &name("img")).unwrap();
        assert_eq!(out, "store = \"/s\"\nimage = \"img\"\n[dhcp]\nmode = \"full\"\n");
        assert_eq!(set_default_image("", &name("img")).unwrap(), "image = \"img\"\n");
        let commented = set_default_image("# image = \"old\"\nx = 1", &name("img")).unwrap();
        assert_eq!(commented, "# image = \"old\"\nx = 1\nimage = \"img\"\n");
    }

    #[test]
    fn only_a_partition_with_more_than_a_mebibyte_behind_it_is_grown() {
        assert!(!worth_growing(10_000, 2048, 10_000 - 2048 - 2048 - 34));
        assert!(worth_growing(10_000, 2048, 10_000 - 2048 - 2048 - 35));
        assert!(!worth_growing(1000, 0, 5000));
    }

    #[test]
    fn enrolling_appends_a_reservation_once() {
        let mac: MacAddr = "52:54:00:AA:00:01".parse().unwrap();
        let once = enrol("enroll = \"listed\"", mac, Some("node\"1"));
        assert!(once.ends_with("\n[[dhcp.reservation]]\nmac = \"52:54:00:aa:00:01\"\nhostname = \"node1\"\n"), "{once}");
        let t: toml::Table = toml::from_str(&once).unwrap();
        assert_eq!(t["dhcp"]["reservation"].as_array().unwrap().len(), 1);
        assert_eq!(enrol(&once, mac, None), once);
    }
}
