//! The planner: turns the configuration (`image`, `[install]`, DHCP reservations), the served
//! archive's facts and the image's disk layout into one node's [`NodePlan`]. Pure: it reads no
//! socket and asks no other module; what the image store and the swarm publish (size, manifest,
//! seal) reaches it as plain values ([`ArchiveFacts`]) from `app.rs`. Its HTTP route
//! (`GET /api/nodes/<mac>/plan[?firmware=uefi|bios]`, `GET /manifests/<image>.manifest`) is
//! [`http`].
//!
//! The disk layout is `<store>/<image>.layout.toml` when that file exists (checked once at
//! start by [`load_layout`]: an invalid layout stops the appliance with the reason), else the
//! default for the node's firmware ([`DiskLayout::default_bios`] / [`DiskLayout::default_uefi`]).

pub mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::config::{Config, InstallConfig};
use crate::nodes::NodeRecord;
use crate::types::node_api::{self, DiskLayout, NodePlan};
use crate::types::{Firmware, ImageName, MacAddr};

/// Errors that stop the appliance at start (a bad layout file).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The layout file exists but cannot be read.
    #[error("disk layout {path}")]
    LayoutRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The layout file is not TOML of a layout.
    #[error("disk layout {path}")]
    LayoutParse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The layout file breaks a layout rule.
    #[error("disk layout {path}: {why}")]
    LayoutInvalid {
        /// The file.
        path: PathBuf,
        /// The rule broken, in words.
        why: String,
    },
}

/// The archive the nodes install, as far as a plan needs it: what the image store and the
/// swarm publish, gathered by `app.rs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveFacts {
    /// Archive size in bytes.
    pub size: u64,
    /// File bytes of the unpacked tree (manifest), 0 when the archive has no manifest.
    pub unpacked: u64,
    /// The manifest's digest (recorded with each installed node), when there is a manifest.
    pub manifest: Option<String>,
    /// The manifest file, served to installers at `/manifests/<image>.manifest`.
    pub manifest_file: Option<PathBuf>,
    /// The signed facts handed out with every plan (set once the swarm knows the info-hash).
    pub seal: Option<node_api::ImageSeal>,
}

/// The pure planner; immutable after start.
#[derive(Clone, Debug)]
pub struct Planner {
    image: Option<ImageName>,
    archive: Option<ArchiveFacts>,
    layout: Option<DiskLayout>,
    hostnames: HashMap<MacAddr, String>,
    install: InstallConfig,
    boot_peer_port: Option<u16>,
    profiles: HashMap<String, crate::config::ProfileConfig>,
}

/// `<store>/groups/<group>/overlay`: the group's overlay tree; `None` for a group name that
/// cannot name a directory there.
pub fn overlay_dir(store: &Path, group: &str) -> Option<PathBuf> {
    node_api::is_group_dir_name(group).then(|| store.join("groups").join(group).join("overlay"))
}

/// `<store>/scripts/<name>`: a profile script; `None` for a name that is not a plain file name.
pub fn script_path(store: &Path, name: &str) -> Option<PathBuf> {
    node_api::is_script_name(name).then(|| store.join("scripts").join(name))
}

/// `<store>/<image>.layout.toml`.
pub fn layout_path(store: &Path, image: &ImageName) -> PathBuf {
    store.join(format!("{image}.layout.toml"))
}

/// Loads and checks an image's layout file; `Ok(None)` when there is none.
///
/// # Errors
/// [`PlanError`] when the file exists but is unreadable, not TOML, or breaks a layout rule.
pub fn load_layout(store: &Path, image: &ImageName) -> Result<Option<DiskLayout>, PlanError> {
    let path = layout_path(store, image);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PlanError::LayoutRead { path, source }),
    };
    let layout: DiskLayout =
        toml::from_str(&text).map_err(|e| PlanError::LayoutParse { path: path.clone(), source: Box::new(e) })?;
    layout.validate().map_err(|why| PlanError::LayoutInvalid { path, why })?;
    Ok(Some(layout))
}

/// The host name of a node without a reserved one: `node-` and the last three MAC bytes.
pub fn default_hostname(mac: MacAddr) -> String {
    let b = mac.0;
    format!("node-{:02x}{:02x}{:02x}", b[3], b[4], b[5])
}

impl Planner {
    /// Builds the planner from the validated configuration and the served archive's facts;
    /// loads the image's layout file.
    ///
    /// # Errors
    /// [`PlanError`] for an invalid layout file.
    pub fn new(cfg: &Config, archive: Option<ArchiveFacts>) -> Result<Planner, PlanError> {
        let layout = match &cfg.image {
            Some(img) => load_layout(&cfg.store, img)?,
            None => None,
        };
        if let (Some(img), Some(_)) = (&cfg.image, &layout) {
            info!(image = %img, path = %layout_path(&cfg.store, img).display(), "disk layout of the image");
        }
        let hostnames =
            cfg.dhcp.reservations.iter().filter_map(|r| Some((r.mac, r.hostname.clone()?))).collect();
        Ok(Planner { image: cfg.image.clone(), archive, layout, hostnames, install: cfg.install.clone(), boot_peer_port: cfg.boot.peer_serve.then_some(cfg.boot.peer_port),
            profiles: cfg.profiles.iter().map(|p| (p.group.clone(), p.clone())).collect(),
        })
    }

    /// The image to install, when there is an archive of it to hand out.
    pub fn ready_image(&self) -> Option<&ImageName> {
        self.image.as_ref().filter(|_| self.archive.is_some())
    }

    /// The served image's manifest file, when `file` is its name (`<image>.manifest`).
    pub fn manifest_file(&self, file: &str) -> Option<&Path> {
        let wanted = self.image.as_ref().map(|i| format!("{i}.manifest"));
        self.archive.as_ref().and_then(|a| a.manifest_file.as_deref()).filter(|_| wanted.as_deref() == Some(file))
    }

    /// The plan of one node; `None` when there is no image (or no archive of it) to install.
    /// The node's record (host name, disk) wins over the reservation and `[install]`.
    pub fn plan(&self, mac: MacAddr, firmware: Firmware, record: Option<&NodeRecord>) -> Option<NodePlan> {
        let image = self.image.clone()?;
        let archive = self.archive.as_ref()?;
        let layout = self.layout.clone().unwrap_or_else(|| match firmware {
            Firmware::Bios => DiskLayout::default_bios(),
            Firmware::Uefi => DiskLayout::default_uefi(),
        });
        Some(NodePlan {
            hostname: record
                .and_then(|r| r.hostname.clone())
                .or_else(|| self.hostnames.get(&mac).cloned())
                .unwrap_or_else(|| default_hostname(mac)),
            torrent: format!("/torrents/{image}.torrent"),
            image,
            archive_size: archive.size,
            unpacked_size: archive.unpacked,
            disk: record.and_then(|r| r.disk.clone()).or_else(|| self.install.disk.clone()),
            layout,
            finish: self.install.finish,
            seed_for_secs: self.install.seed_for.as_secs(),
            report_every_secs: self.install.report_every.as_secs().max(1),
            seal: archive.seal.clone(),
            boot_peer_port: self.boot_peer_port,
            profile: record.and_then(|r| r.group.as_deref()).and_then(|g| self.profile(g, false)),
        })
    }

    /// The profile of `group`: its `[[profile]]` steps, and `overlay` when the group has an
    /// overlay tree; `None` when it has neither.
    pub fn profile(&self, group: &str, overlay: bool) -> Option<node_api::NodeProfile> {
        let p = self.profiles.get(group);
        (p.is_some() || overlay).then(|| node_api::NodeProfile {
            group: group.to_owned(),
            overlay,
            steps: p.map(|p| p.steps.clone()).unwrap_or_default(),
            step_timeout_secs: p.map_or(600, |p| p.step_timeout.as_secs()),
        })
    }

    /// Whether `script` is a step of `group`'s profile (only those are handed out).
    pub fn group_has_script(&self, group: &str, script: &str) -> bool {
        self.profiles.get(group).is_some_and(|p| p.steps.iter().any(|s| matches!(s, node_api::ProfileStep::Script(n) if n == script)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::node_api::{FsKind, TableKind};

    fn api(layout: Option<DiskLayout>) -> Planner {
        let cfg = Config::from_toml(
            "image = \"deb\"\n[install]\ndisk = \"/dev/vda\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.11\"\nhostname = \"node01\"\n",
            Path::new("test"),
        )
        .unwrap();
        let mut a = Planner::new(&cfg, Some(ArchiveFacts { size: 10, unpacked: 30, manifest: None, manifest_file: None, seal: None })).unwrap();
        a.layout = layout;
        a
    }

    #[test]
    fn plans_take_reservation_names_and_firmware_defaults() {
        let a = api(None);
        let p = a.plan("52:54:00:00:00:01".parse().unwrap(), Firmware::Uefi, None).unwrap();
        assert_eq!(p.hostname, "node01");
        assert_eq!(p.layout.table, TableKind::Gpt);
        assert_eq!((p.archive_size, p.unpacked_size, p.disk.as_deref()), (10, 30, Some("/dev/vda")));
        assert_eq!(p.torrent, "/torrents/deb.torrent");
        let p = a.plan("52:54:00:0a:0b:0c".parse().unwrap(), Firmware::Bios, None).unwrap();
        assert_eq!(p.hostname, "node-0a0b0c");
        assert_eq!(p.layout, DiskLayout::default_bios());
        let mut own = DiskLayout::default_bios();
        own.partitions[0].fs = FsKind::Xfs;
        let p = api(Some(own.clone())).plan("52:54:00:0a:0b:0c".parse().unwrap(), Firmware::Uefi, None).unwrap();
        assert_eq!(p.layout, own, "the image's layout wins over the firmware default");
    }

    #[test]
    fn the_plan_says_where_to_serve_boot_files_only_when_peers_are_on() {
        let facts = ArchiveFacts { size: 1, unpacked: 0, manifest: None, manifest_file: None, seal: None };
        let mac: MacAddr = "52:54:00:00:00:02".parse().unwrap();
        for (toml, want) in [("", None), ("[boot]\npeer_serve = true\n", Some(8081)), ("[boot]\npeer_serve = true\npeer_port = 9000\n", Some(9000))] {
            let cfg = Config::from_toml(&format!("image = \"deb\"\n{toml}"), Path::new("test")).unwrap();
            let p = Planner::new(&cfg, Some(facts.clone())).unwrap().plan(mac, Firmware::Bios, None).unwrap();
            assert_eq!(p.boot_peer_port, want, "{toml}");
        }
    }

    #[test]
    fn only_the_served_images_manifest_is_handed_out_and_plans_wait_for_an_archive() {
        let cfg = Config::from_toml("image = \"deb\"\n", Path::new("test")).unwrap();
        let facts = ArchiveFacts { size: 1, unpacked: 0, manifest: Some("d".into()), manifest_file: Some("/s/deb.manifest".into()), seal: None };
        let with = Planner::new(&cfg, Some(facts.clone())).unwrap();
        let rows = [("deb.manifest", true), ("other.manifest", false), ("deb", false), ("../deb.manifest", false)];
        for (file, served) in rows {
            assert_eq!(with.manifest_file(file).is_some(), served, "{file}");
        }
        assert_eq!(with.ready_image().map(ImageName::as_str), Some("deb"));
        let mac: MacAddr = "52:54:00:00:00:02".parse().unwrap();
        let without = Planner::new(&cfg, None).unwrap();
        assert_eq!((without.ready_image(), without.manifest_file("deb.manifest")), (None, None));
        assert!(without.plan(mac, Firmware::Bios, None).is_none(), "no archive, no plan");
        let no_image = Planner::new(&Config::from_toml("", Path::new("t")).unwrap(), Some(facts)).unwrap();
        assert!(no_image.ready_image().is_none() && no_image.plan(mac, Firmware::Bios, None).is_none());
    }

    #[test]
    fn the_readme_layout_example_is_valid() {
        let text = "table = \"gpt\"\n[[partitions]]\nsize_mib = 1\nfs = \"bios-grub\"\n[[partitions]]\nsize_mib = 1024\nfs = \"swap\"\n[[partitions]]\nfs = \"xfs\"\nmount = \"/\"\nlabel = \"root\"\n";
        let l: DiskLayout = toml::from_str(text).unwrap();
        l.validate().unwrap();
        assert_eq!(l.partitions[0].fs, FsKind::BiosGrub);
    }

    #[test]
    fn a_nodes_group_brings_its_profile_and_only_its_scripts() {
        let cfg = Config::from_toml(
            "image = \"deb\"\n[[profile]]\ngroup = \"compute\"\nsteps = [{ script = \"10-a.sh\" }, { enable = [\"x.service\"] }]\nstep_timeout = \"30s\"\n",
            Path::new("t"),
        )
        .unwrap();
        let facts = ArchiveFacts { size: 1, unpacked: 0, manifest: None, manifest_file: None, seal: None };
        let pl = Planner::new(&cfg, Some(facts)).unwrap();
        let mac: MacAddr = "52:54:00:00:00:02".parse().unwrap();
        let mut rec = NodeRecord {
            mac,
            hostname: None,
            disk: None,
            group: None,
            origin: crate::nodes::Origin::Added,
            state: crate::nodes::NodeState::Enrolled,
            reimage: false,
            installs: 0,
            updated_ms: 0,
            update: None,
            last_update: None,
        };
        assert_eq!(pl.plan(mac, Firmware::Bios, Some(&rec)).unwrap().profile, None);
        rec.group = Some("compute".into());
        let p = pl.plan(mac, Firmware::Bios, Some(&rec)).unwrap().profile.unwrap();
        assert_eq!((p.group.as_str(), p.steps.len(), p.step_timeout_secs, p.overlay), ("compute", 2, 30, false));
        rec.group = Some("storage".into());
        assert_eq!(pl.plan(mac, Firmware::Bios, Some(&rec)).unwrap().profile, None);
        assert_eq!(pl.profile("storage", true).unwrap().steps, vec![]);
        assert!(pl.group_has_script("compute", "10-a.sh"));
        assert!(!pl.group_has_script("compute", "20-b.sh") && !pl.group_has_script("storage", "10-a.sh"));
        assert_eq!(overlay_dir(Path::new("/s"), ".."), None);
        assert_eq!(overlay_dir(Path::new("/s"), "compute"), Some(PathBuf::from("/s/groups/compute/overlay")));
        assert_eq!(script_path(Path::new("/s"), "../x"), None);
        let dup = "[[profile]]\ngroup = \"a\"\n[[profile]]\ngroup = \"a\"\n";
        assert!(Config::from_toml(dup, Path::new("t")).unwrap_err().to_string().contains("profile[1].group"));
        let bad = "[[profile]]\ngroup = \"a\"\nsteps = [{ script = \"../../bin/sh\" }]\n";
        assert!(Config::from_toml(bad, Path::new("t")).unwrap_err().to_string().contains("profile[0].steps[0]"));
        let bad = "[[profile]]\ngroup = \"..\"\n";
        assert!(Config::from_toml(bad, Path::new("t")).unwrap_err().to_string().contains("profile[0].group"));
    }

    #[test]
    fn layout_files_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let img: ImageName = "deb".parse().unwrap();
        assert_eq!(load_layout(d.path(), &img).unwrap(), None);
        std::fs::write(layout_path(d.path(), &img), toml::to_string(&DiskLayout::default_uefi()).unwrap()).unwrap();
        assert_eq!(load_layout(d.path(), &img).unwrap(), Some(DiskLayout::default_uefi()));
        std::fs::write(layout_path(d.path(), &img), "table = \"gpt\"\npartitions = []\n").unwrap();
        let e = load_layout(d.path(), &img).unwrap_err().to_string();
        assert!(e.contains("no partition is mounted at /"), "{e}");
        std::fs::write(layout_path(d.path(), &img), "table = \"zip\"\n").unwrap();
        assert!(load_layout(d.path(), &img).is_err());
    }
}
