//! The node API: what the appliance and its installers say to each other over HTTP. Shared by
//! both roles (the `install` module speaks it, the appliance's `monitor` and plan routes answer
//! it), so it holds only serde types and their rules, no I/O.
//!
//! | route | who | body |
//! |---|---|---|
//! | `GET /api/nodes/<mac>/plan` | installer → appliance | → [`NodePlan`] |
//! | `POST /api/nodes/<mac>/report` | installer → appliance | [`NodeReport`] → 204 |
//! | `GET /boot/digests` | installer → appliance (no token) | → [`BootDigests`] |
//! | `POST /api/nodes/<mac>/boot-peer` | installer → appliance | [`BootPeerNote`] → 204 |
//! | `GET /api/nodes/<mac>/scripts/<name>` | installer → appliance | → a profile script (bytes) |
//! | `GET /api/nodes/<mac>/overlay` | installer → appliance | → the group's overlay (tar), 404 without one |
//! | `GET /api/nodes/<mac>/update?have=<sha256>[&asked=1]` | installed node → appliance | → [`UpdateOffer`] |
//! | `GET /api/nodes/<mac>/update/manifest` | installed node → appliance | → the offered target's manifest |
//! | `POST /api/nodes/<mac>/update` | installed node → appliance | [`UpdateResult`] → 204 |
//!
//! `<mac>` is `aa:bb:cc:dd:ee:ff` (or hyphenated). Both routes need the node's token
//! ([`crate::types::NodeToken`], given to the node on its kernel command line as `si.token=`)
//! in `Authorization: Bearer <token>`; a token that is not the one derived for `<mac>` gets 403,
//! a missing one 401, a malformed body 400 (and a log line), never a crash.

use serde::{Deserialize, Serialize};

use crate::types::{ImageName, MacAddr, NodeToken};

/// Why a node API request was not authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header (HTTP 401).
    #[error("no bearer token")]
    Missing,
    /// A token that is not this node's (HTTP 403).
    #[error("token does not belong to this node")]
    Wrong,
}

/// Checks an `Authorization` header value against the token derived for `mac`.
///
/// # Errors
/// [`AuthError::Missing`] without a `Bearer` value, [`AuthError::Wrong`] for another token.
pub fn authorize(header: Option<&str>, secret: &[u8], mac: MacAddr) -> Result<(), AuthError> {
    let presented = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim).ok_or(AuthError::Missing)?;
    if NodeToken::derive(secret, mac).matches(presented) { Ok(()) } else { Err(AuthError::Wrong) }
}

/// Where a node is in its life, in order. The appliance's own observations give the first three
/// (`Dhcp`, `BootFiles`, and `Installer` at the first plan request); the installer's reports give
/// the rest. `Failed` can follow any phase; a node that boots again (reset) starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Seen by DHCP (discover/request).
    Dhcp,
    /// Fetching its boot loader, kernel or initrd (TFTP/HTTP).
    BootFiles,
    /// The installer runs (plan fetched).
    Installer,
    /// Partitioning and making file systems.
    Partitioning,
    /// Downloading the archive from the swarm and unpacking it as the bytes arrive.
    Downloading,
    /// Overrides and per-node settings (hostname, network, machine-id, ssh host keys).
    Configuring,
    /// Installing the boot loader.
    BootLoader,
    /// Installed; seeding to the other nodes until the deployment is done.
    Seeding,
    /// Rebooting (or powering off) into the installed system: the end of a good install.
    Done,
    /// Stopped with an error (the report's `error` says why).
    Failed,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 10] = [
        Phase::Dhcp,
        Phase::BootFiles,
        Phase::Installer,
        Phase::Partitioning,
        Phase::Downloading,
        Phase::Configuring,
        Phase::BootLoader,
        Phase::Seeding,
        Phase::Done,
        Phase::Failed,
    ];

    /// The kebab-case name used on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Dhcp => "dhcp",
            Phase::BootFiles => "boot-files",
            Phase::Installer => "installer",
            Phase::Partitioning => "partitioning",
            Phase::Downloading => "downloading",
            Phase::Configuring => "configuring",
            Phase::BootLoader => "boot-loader",
            Phase::Seeding => "seeding",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// `Done` or `Failed`.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One installer report: sent at every phase change and every `report_every` while a phase
/// runs. Counters are totals since the installer started, so a lost report loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    /// The phase the node is in now.
    pub phase: Option<Phase>,
    /// Archive bytes downloaded and verified so far.
    #[serde(default)]
    pub bytes_done: u64,
    /// Archive size (0 until known).
    #[serde(default)]
    pub bytes_total: u64,
    /// Bytes uploaded to other peers so far.
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// Bytes of the archive unpacked onto the disk so far.
    #[serde(default)]
    pub bytes_unpacked: u64,
    /// Current download rate, bytes/s.
    #[serde(default)]
    pub down_bps: u64,
    /// Current upload rate, bytes/s.
    #[serde(default)]
    pub up_bps: u64,
    /// Connected peers.
    #[serde(default)]
    pub peers: u32,
    /// A human line for the operator (e.g. "mkfs.ext4 /dev/vda1", "waiting for appliance").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why the node failed (with `phase: failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The installer's console output since its previous report (and, with `failed`, the last
    /// kernel messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// The profile steps finished so far, in order (every report carries them all, so a lost
    /// report loses nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
}

/// Largest profile script handed out, bytes.
pub const SCRIPT_MAX: usize = 1 << 20;
/// Largest group overlay handed out (as a tar), bytes.
pub const OVERLAY_MAX: usize = 256 << 20;

/// Most steps in one profile.
pub const MAX_STEPS: usize = 32;
/// Output kept of a failed step (its last bytes).
pub const STEP_OUTPUT_MAX: usize = 4096;
/// Output kept of a step that succeeded (its last bytes), so a report of every step stays small.
pub const STEP_OUTPUT_OK_MAX: usize = 512;

/// One post-install step of a group's profile, as written in the configuration
/// (`{ script = "10-tune.sh" }`, `{ packages = ["htop"] }`, `{ enable = ["chrony.service"] }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ProfileStep {
    /// Run `<store>/scripts/NAME` (an executable, usually with a `#!` line) in the installed
    /// system's chroot.
    Script(String),
    /// `apt-get update` and `apt-get install -y` these packages in the chroot.
    Packages(Vec<String>),
    /// `systemctl enable` these units in the chroot (or their `WantedBy=` symlinks).
    Enable(Vec<String>),
}

impl ProfileStep {
    /// The step's name in reports and errors: the script's name, `packages a b`, `enable u`.
    pub fn name(&self) -> String {
        match self {
            ProfileStep::Script(s) => s.clone(),
            ProfileStep::Packages(p) => format!("packages {}", p.join(" ")),
            ProfileStep::Enable(u) => format!("enable {}", u.join(" ")),
        }
    }

    /// Checks the names in the step: a script is a plain file name in `<store>/scripts/`
    /// (`[A-Za-z0-9._+-]`, not starting with `.` or `-`: no paths, no `..`); a package or unit
    /// name never starts with `-` (no option injection) and has no `/` or white space.
    ///
    /// # Errors
    /// The first bad name, in words.
    pub fn validate(&self) -> Result<(), String> {
        let word = |kind: &str, w: &str, extra: &[u8]| -> Result<(), String> {
            let ok = !w.is_empty()
                && w.len() <= 128
                && !w.starts_with(['-', '.'])
                && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b) || extra.contains(&b));
            if ok { Ok(()) } else { Err(format!("{kind} {w:?}: want a plain name ([A-Za-z0-9._+-], not starting with . or -)")) }
        };
        match self {
            ProfileStep::Script(s) => word("script", s, b""),
            ProfileStep::Packages(p) if p.is_empty() => Err("packages: empty list".into()),
            ProfileStep::Packages(p) => p.iter().try_for_each(|w| word("package", w, b":=~")),
            ProfileStep::Enable(u) if u.is_empty() => Err("enable: empty list".into()),
            ProfileStep::Enable(u) => u.iter().try_for_each(|w| word("unit", w, b"@:\\")),
        }
    }
}

/// A checked script name ([`ProfileStep::validate`]'s rule), for the script route.
pub fn is_script_name(name: &str) -> bool {
    ProfileStep::Script(name.to_owned()).validate().is_ok()
}

/// Whether `group` can name a directory under `<store>/groups/`: 1-63 of `[A-Za-z0-9._-]`, not
/// starting with `.` (so never `.` or `..`).
pub fn is_group_dir_name(group: &str) -> bool {
    !group.is_empty() && group.len() <= 63 && !group.starts_with('.') && group.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// What a node of a group does after the image is configured and before its boot loader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeProfile {
    /// The node's group.
    pub group: String,
    /// Whether the group has an overlay tree (`GET /api/nodes/<mac>/overlay`).
    #[serde(default)]
    pub overlay: bool,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<ProfileStep>,
    /// Longest run of one step, seconds.
    pub step_timeout_secs: u64,
}

/// One finished profile step, as reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepReport {
    /// Its name ([`ProfileStep::name`]).
    pub name: String,
    /// It succeeded.
    pub ok: bool,
    /// Its exit code; `None` when it did not run to an exit (timeout, signal, not started).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The last bytes of its output (stdout and stderr together), and why when it did not run.
    #[serde(default)]
    pub output: String,
    /// Seconds it took.
    #[serde(default)]
    pub secs: f64,
}

/// `text`'s last `max` bytes (on a character boundary), marked when cut.
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = text.len() - max;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    format!("[… {cut} bytes cut]\n{}", &text[cut..])
}

/// What a node is to do: answered by the appliance to the installer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePlan {
    /// The node's host name (reservation, or `node-<mac-hyphen>`).
    pub hostname: String,
    /// The image to install.
    pub image: ImageName,
    /// Path of its .torrent on the appliance (`/torrents/<image>.torrent`).
    pub torrent: String,
    /// Archive size in bytes.
    pub archive_size: u64,
    /// Bytes of file data in the unpacked tree (from the archive's manifest; 0 when unknown), so
    /// the installer can refuse a disk that is too small before writing anything.
    #[serde(default)]
    pub unpacked_size: u64,
    /// The disk to install on (`/dev/vda`); `None`: the installer picks the first non-removable
    /// disk large enough.
    #[serde(default)]
    pub disk: Option<String>,
    /// How to lay the disk out.
    pub layout: DiskLayout,
    /// What to do at the end.
    #[serde(default)]
    pub finish: Finish,
    /// Keep seeding after the install until the appliance says the deployment is done, at most
    /// this many seconds (0: don't seed after the install).
    #[serde(default)]
    pub seed_for_secs: u64,
    /// Seconds between progress reports.
    #[serde(default = "default_report_every")]
    pub report_every_secs: u64,
    /// What the appliance vouches for about the image (signed); `None` from an appliance that
    /// could not compute it (no swarm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<ImageSeal>,
    /// Where the installer serves the kernel and initrd it fetched and checked
    /// (`boot.peer_port`); `None`: the appliance does not use peer-served boot files, the
    /// installer fetches and serves nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_peer_port: Option<u16>,
    /// The node's group's profile (overlay and post-install steps); `None`: no group, or a
    /// group with neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<NodeProfile>,
}

/// The image as the appliance signed it (see [`crate::image::sign`]): the installer checks the
/// signature with the key baked into its initramfs, the info-hash against the command line and
/// the .torrent, the manifest against its digest and the unpacked tree against the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSeal {
    /// The torrent's info-hash (40 hex digits).
    pub info_hash: String,
    /// The manifest's SHA-256 (64 hex digits), served at `/manifests/<image>.manifest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    /// Ed25519 signature (128 hex digits) over [`crate::image::sign::Statement`].
    pub signature: String,
}

/// Size and SHA-256 of one boot file as the appliance serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Bytes.
    pub size: u64,
    /// SHA-256, 64 lower-case hex digits.
    pub sha256: String,
}

/// `GET /boot/digests`: what the kernel and initrd the appliance serves are, so a node can check
/// copies it got from a peer (and serve them on only when they match).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootDigests {
    /// `/boot/vmlinuz`.
    pub kernel: FileDigest,
    /// `/boot/initrd.img` (with the appliance's key appended, as served).
    pub initrd: FileDigest,
    /// Where installers serve the boot files to their peers (`boot.peer_port`); `None` when the
    /// appliance does not redirect to peers (`boot.peer_serve = false`): then nobody serves.
    #[serde(default)]
    pub peer_port: Option<u16>,
}

/// `POST /api/nodes/<mac>/boot-peer`: a node's word about peer-served boot files. The serving
/// address is the one the request comes from, never a claim in the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "event", rename_all = "kebab-case")]
pub enum BootPeerNote {
    /// The node holds verified copies and serves them on `port` (sent again every
    /// [`BOOT_PEER_ANNOUNCE_SECS`]; a node silent for three times that is dropped).
    Serving {
        /// TCP port.
        port: u16,
    },
    /// The node stops serving (it is about to reboot).
    Stopped,
    /// The peer the appliance redirected this node to failed it: no connection, a bad answer,
    /// or bytes whose digest is not the published one.
    BadPeer {
        /// The peer's address (from the redirect).
        peer: std::net::Ipv4Addr,
        /// What went wrong.
        why: String,
    },
}

/// Seconds between two [`BootPeerNote::Serving`] of one node.
pub const BOOT_PEER_ANNOUNCE_SECS: u64 = 30;

fn default_report_every() -> u64 {
    2
}

/// The end of an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Finish {
    /// Reboot into the installed system.
    #[default]
    Reboot,
    /// Power off.
    Poweroff,
    /// Stay in the initramfs (debugging).
    Shell,
}

/// A declarative disk layout, stored with the image (`<store>/<image>.layout.toml`) or the
/// default for the node's firmware.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLayout {
    /// Partition table type.
    pub table: TableKind,
    /// Partitions in order; at most one may have no size (it takes the rest).
    pub partitions: Vec<Partition>,
}

/// Partition table type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// MBR / dos (BIOS boot).
    Mbr,
    /// GPT (UEFI, or BIOS with a `bios-grub` partition).
    Gpt,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Size in MiB; `None` for "the rest of the disk".
    #[serde(default)]
    pub size_mib: Option<u64>,
    /// What goes on it.
    pub fs: FsKind,
    /// Mount point in the installed system (`/`, `/boot/efi`); none for swap and bios-grub.
    #[serde(default)]
    pub mount: Option<String>,
    /// File system label.
    #[serde(default)]
    pub label: Option<String>,
}

/// What a partition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsKind {
    /// ext4.
    Ext4,
    /// XFS.
    Xfs,
    /// FAT (EFI system partition).
    Vfat,
    /// Swap space.
    Swap,
    /// GRUB's BIOS boot partition on GPT (no file system).
    BiosGrub,
}

impl DiskLayout {
    /// BIOS: MBR, one ext4 root on the whole disk.
    pub fn default_bios() -> DiskLayout {
        DiskLayout {
            table: TableKind::Mbr,
            partitions: vec![Partition { size_mib: None, fs: FsKind::Ext4, mount: Some("/".into()), label: Some("root".into()) }],
        }
    }

    /// UEFI: GPT, a 256 MiB EFI system partition and an ext4 root.
    pub fn default_uefi() -> DiskLayout {
        DiskLayout {
            table: TableKind::Gpt,
            partitions: vec![
                Partition { size_mib: Some(256), fs: FsKind::Vfat, mount: Some("/boot/efi".into()), label: Some("EFI".into()) },
                Partition { size_mib: None, fs: FsKind::Ext4, mount: Some("/".into()), label: Some("root".into()) },
            ],
        }
    }

    /// Checks the layout's own rules: one root (`/`), at most one rest-of-disk partition (last),
    /// mount points absolute and unique, none on swap/bios-grub.
    ///
    /// # Errors
    /// The first rule broken, in words.
    pub fn validate(&self) -> Result<(), String> {
        let mut mounts = std::collections::BTreeSet::new();
        for (i, p) in self.partitions.iter().enumerate() {
            if p.size_mib.is_none() && i + 1 != self.partitions.len() {
                return Err(format!("partition {}: only the last partition may omit size_mib", i + 1));
            }
            if p.size_mib == Some(0) {
                return Err(format!("partition {}: size_mib must be > 0", i + 1));
            }
            match (p.fs, &p.mount) {
                (FsKind::Swap | FsKind::BiosGrub, Some(m)) => {
                    return Err(format!("partition {}: {:?} cannot be mounted at {m}", i + 1, p.fs));
                }
                (_, Some(m)) if !m.starts_with('/') || m.split('/').any(|c| c == "..") => {
                    return Err(format!("partition {}: mount point {m:?} must be absolute", i + 1));
                }
                (_, Some(m)) if !mounts.insert(m.clone()) => {
                    return Err(format!("partition {}: mount point {m} used twice", i + 1));
                }
                _ => {}
            }
            if p.fs == FsKind::BiosGrub && self.table != TableKind::Gpt {
                return Err(format!("partition {}: bios-grub needs a gpt table", i + 1));
            }
        }
        if !mounts.contains("/") {
            return Err("no partition is mounted at /".into());
        }
        Ok(())
    }

    /// The smallest disk (MiB) this layout fits on, with `rest_min_mib` for the rest-of-disk
    /// partition and 2 MiB for alignment and the partition table(s).
    pub fn min_disk_mib(&self, rest_min_mib: u64) -> u64 {
        2 + self.partitions.iter().map(|p| p.size_mib.unwrap_or(rest_min_mib)).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        for l in [DiskLayout::default_bios(), DiskLayout::default_uefi()] {
            l.validate().unwrap();
            let s = toml::to_string(&l).unwrap();
            assert_eq!(toml::from_str::<DiskLayout>(&s).unwrap(), l);
        }
    }

    #[test]
    fn bad_layouts_are_refused_in_words() {
        let mut l = DiskLayout::default_uefi();
        l.partitions.swap(0, 1);
        assert!(l.validate().unwrap_err().contains("only the last"));
        let mut l = DiskLayout::default_bios();
        l.partitions[0].mount = Some("/boot".into());
        assert!(l.validate().unwrap_err().contains("no partition is mounted at /"));
        let mut l = DiskLayout::default_bios();
        l.partitions.insert(0, Partition { size_mib: Some(1), fs: FsKind::BiosGrub, mount: None, label: None });
        assert!(l.validate().unwrap_err().contains("needs a gpt"));
        let mut l = DiskLayout::default_bios();
        l.partitions[0].mount = Some("../x".into());
        assert!(l.validate().unwrap_err().contains("absolute"));
    }

    #[test]
    fn only_the_nodes_own_token_is_authorized() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let other: MacAddr = "52:54:00:12:34:57".parse().unwrap();
        let tok = NodeToken::derive(b"s3cret", mac);
        let good = format!("Bearer {}", tok.as_str());
        assert_eq!(authorize(Some(&good), b"s3cret", mac), Ok(()));
        assert_eq!(authorize(Some(&good), b"s3cret", other), Err(AuthError::Wrong));
        assert_eq!(authorize(Some(&good), b"other", mac), Err(AuthError::Wrong));
        assert_eq!(authorize(Some(tok.as_str()), b"s3cret", mac), Err(AuthError::Missing));
        assert_eq!(authorize(None, b"s3cret", mac), Err(AuthError::Missing));
    }

    #[test]
    fn profile_steps_parse_from_toml_and_refuse_paths() {
        #[derive(Deserialize)]
        struct P {
            steps: Vec<ProfileStep>,
        }
        let p: P = toml::from_str(r#"steps = [ { script = "10-tune.sh" }, { packages = ["htop"] }, { enable = ["chrony.service"] } ]"#).unwrap();
        assert_eq!(p.steps[0], ProfileStep::Script("10-tune.sh".into()));
        assert_eq!(p.steps.iter().map(ProfileStep::name).collect::<Vec<_>>(), ["10-tune.sh", "packages htop", "enable chrony.service"]);
        for s in &p.steps {
            s.validate().unwrap();
        }
        ProfileStep::Enable(vec!["getty@tty1.service".into()]).validate().unwrap();
        for bad in ["../x", "a/b", "..", ".hidden", "-rf", "", "a b"] {
            assert!(ProfileStep::Script(bad.into()).validate().is_err(), "{bad:?}");
            assert!(!is_script_name(bad), "{bad:?}");
        }
        assert!(ProfileStep::Packages(vec!["-o".into()]).validate().is_err());
        assert!(ProfileStep::Packages(vec![]).validate().is_err());
        assert!(ProfileStep::Enable(vec!["../../x.service".into()]).validate().is_err());
        assert!(toml::from_str::<P>(r#"steps = [ { script = "a", enable = ["b"] } ]"#).is_err());
        assert!(toml::from_str::<P>(r#"steps = [ { run = "a" } ]"#).is_err());
        assert_eq!(tail("abcdef", 3), "[… 3 bytes cut]\ndef");
        assert_eq!(tail("abc", 3), "abc");
    }

    #[test]
    fn reports_parse_strictly() {
        let r: NodeReport = serde_json::from_str(r#"{"phase":"downloading","bytes_done":5,"bytes_total":9}"#).unwrap();
        assert_eq!(r.phase, Some(Phase::Downloading));
        assert!(serde_json::from_str::<NodeReport>(r#"{"phase":"downloading","bogus":1}"#).is_err());
        assert!(serde_json::from_str::<NodeReport>(r#"{"phase":"flying"}"#).is_err());
        assert_eq!(Phase::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>().len(), 10);
        for p in Phase::ALL {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
    }
}

/// Where an installed node keeps what it needs to talk to its appliance after the install
/// (`<root>/var/lib/si-appliance/node.json`, mode 0600, written by the installer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCredentials {
    /// The appliance's HTTP address (`IP:PORT`).
    pub server: std::net::SocketAddr,
    /// The node's MAC (the one it installed with).
    pub mac: MacAddr,
    /// Its token.
    pub token: String,
    /// The interface it installed through (the swarm binds to it); `None`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface: Option<String>,
}

/// What archive an update fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// The entries changed since the node's base, and the deletions.
    Diff,
    /// The whole image (the node's base is unknown to the appliance).
    Full,
}

/// An image version to update to, published in the swarm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTarget {
    /// The image.
    pub image: ImageName,
    /// Diff from the node's base, or the full image.
    pub kind: UpdateKind,
    /// The swarm name of the archive (`GET /torrents/<name>.torrent`, `/api/swarm/<name>`).
    pub name: ImageName,
    /// The archive's size, bytes.
    pub bytes: u64,
    /// SHA-256 (hex) of the target manifest (`GET /api/nodes/<mac>/update/manifest`): the node
    /// checks the manifest it gets against it before using it.
    pub manifest_sha256: String,
    /// For a diff: the base manifest's SHA-256 (the node's `have`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_manifest_sha256: Option<String>,
}

/// The appliance's answer to `GET /api/nodes/<mac>/update`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateOffer {
    /// An operator ordered this node to update (`node update`); `false`: only the node asked.
    pub ordered: bool,
    /// The version to update to; `None`: the node already runs it (or nothing is ordered and
    /// the node did not ask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<UpdateTarget>,
    /// Run the group's profile steps again after the update (`node update --profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<NodeProfile>,
    /// When to ask again (the agent's poll period), seconds.
    pub poll_secs: u64,
}

/// What an installed node says after an update (or profile run) it was offered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateResult {
    /// It worked.
    pub ok: bool,
    /// The manifest the node ran before.
    pub from_manifest_sha256: String,
    /// The manifest it runs now (the old one when the update failed without a change).
    pub manifest_sha256: String,
    /// Entries added, changed, deleted; paths the excludes kept.
    #[serde(default)]
    pub added: u64,
    /// See `added`.
    #[serde(default)]
    pub changed: u64,
    /// See `added`.
    #[serde(default)]
    pub deleted: u64,
    /// See `added`.
    #[serde(default)]
    pub excluded: u64,
    /// Archive bytes fetched, and uploaded to other nodes.
    #[serde(default)]
    pub fetched_bytes: u64,
    /// See `fetched_bytes`.
    #[serde(default)]
    pub uploaded_bytes: u64,
    /// Seconds from the offer to the end.
    #[serde(default)]
    pub secs: f64,
    /// Why it failed, and whether the tree changed (the journal's paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Profile steps run (with `--profile`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
}

/// Largest [`UpdateResult`] body accepted, bytes.
pub const UPDATE_RESULT_MAX: usize = 256 << 10;
