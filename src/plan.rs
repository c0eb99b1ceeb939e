//! The appliance's answer to an installer: `GET /api/nodes/<mac>/plan[?firmware=uefi|bios]`
//! ([`NodePlan`]). Owns the rules that turn the configuration (`image`, `[install]`, DHCP
//! reservations), the served archive and the image's disk layout into one node's plan; it does
//! no disk or swarm work itself.
//!
//! The disk layout is `<store>/<image>.layout.toml` when that file exists (checked once at
//! start: an invalid layout stops the appliance with the reason), else the default for the
//! node's firmware ([`DiskLayout::default_bios`] / [`DiskLayout::default_uefi`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::config::{Config, InstallConfig};
use crate::nodes::{NodeBook, NodeRecord, PlanGate};
use crate::node_api::{self, AuthError, DiskLayout, NodePlan};
use crate::types::{ImageName, MacAddr};

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
    /// The layout file does not parse or breaks a layout rule.
    #[error("disk layout {path}: {why}")]
    LayoutInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The archive the nodes install, as far as a plan needs it.
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

/// What the plan route reads; immutable after start.
pub struct PlanApi {
    secret: Vec<u8>,
    image: Option<ImageName>,
    archive: Option<ArchiveFacts>,
    layout: Option<DiskLayout>,
    hostnames: HashMap<MacAddr, String>,
    install: InstallConfig,
    events: crate::types::events::EventSink,
    nodes: Arc<NodeBook>,
    /// MAC -> address as our DHCP saw it; None with `dhcp.mode = "off"` (plans not bound).
    addrs: Option<Arc<crate::types::addrs::ClientAddrs>>,
}

/// Firmware of the node, as the installer sees it (`/sys/firmware/efi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS.
    Bios,
    /// UEFI.
    Uefi,
}

#[derive(Debug, Deserialize)]
struct PlanQuery {
    firmware: Option<Firmware>,
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
        toml::from_str(&text).map_err(|e| PlanError::LayoutInvalid { path: path.clone(), why: e.to_string() })?;
    layout.validate().map_err(|why| PlanError::LayoutInvalid { path, why })?;
    Ok(Some(layout))
}

/// Size and unpacked size of the served archive named `image` among `archives` (named by file
/// name less `.tar.zst`, as the swarm publishes them). The manifest is `NAME.manifest` next to it.
pub fn archive_facts(archives: &[PathBuf], image: &ImageName) -> Option<ArchiveFacts> {
    let archive = archives.iter().find(|a| crate::swarm::seed::name_of(a).ok().as_ref() == Some(image))?;
    let size = std::fs::metadata(archive).ok()?.len();
    let file = archive.with_file_name(format!("{image}.manifest"));
    let (unpacked, manifest, manifest_file) = match crate::image::manifest::Manifest::load(&file) {
        Ok(m) => (m.file_bytes(), Some(m.digest()), Some(file)),
        Err(e) => {
            warn!(manifest = %file.display(), "no manifest: the plan has no unpacked size and nodes cannot verify the unpacked tree: {e:#}");
            (0, None, None)
        }
    };
    Some(ArchiveFacts { size, unpacked, manifest, manifest_file, seal: None })
}

/// The host name of a node without a reserved one: `node-` and the last three MAC bytes.
pub fn default_hostname(mac: MacAddr) -> String {
    let b = mac.0;
    format!("node-{:02x}{:02x}{:02x}", b[3], b[4], b[5])
}

impl PlanApi {
    /// Builds the plan source from the validated configuration, the node-token secret and the
    /// served archive's facts; loads the image's layout file.
    ///
    /// # Errors
    /// [`PlanError`] for an invalid layout file.
    pub fn new(cfg: &Config, secret: Vec<u8>, archive: Option<ArchiveFacts>, nodes: Arc<NodeBook>) -> Result<PlanApi, PlanError> {
        let layout = match &cfg.image {
            Some(img) => load_layout(&cfg.store, img)?,
            None => None,
        };
        if let (Some(img), Some(_)) = (&cfg.image, &layout) {
            info!(image = %img, path = %layout_path(&cfg.store, img).display(), "disk layout of the image");
        }
        let hostnames =
            cfg.dhcp.reservations.iter().filter_map(|r| Some((r.mac, r.hostname.clone()?))).collect();
        Ok(PlanApi { secret, image: cfg.image.clone(), archive, layout, hostnames, install: cfg.install.clone(), events: crate::types::events::EventSink::disabled(), nodes, addrs: None })
    }

    /// Sends a `PlanFetched` event to the monitor for every plan handed out.
    pub fn with_addrs(mut self, addrs: Option<Arc<crate::types::addrs::ClientAddrs>>) -> PlanApi {
        self.addrs = addrs;
        self
    }

    /// Plans fetched are reported to the monitor through `events`.
    pub fn with_events(mut self, events: crate::types::events::EventSink) -> PlanApi {
        self.events = events;
        self
    }

    /// The manifest digest of the served archive, if known.
    pub fn manifest(&self) -> Option<&str> {
        self.archive.as_ref().and_then(|a| a.manifest.as_deref())
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
        })
    }
}

/// `GET /api/nodes/{mac}/plan`, and `GET /manifests/<image>.manifest` (the served image's
/// manifest, public like its .torrent; the installer checks it against the signed digest).
pub fn routes(api: Arc<PlanApi>) -> Router {
    Router::new().route("/api/nodes/{mac}/plan", get(plan)).route("/manifests/{file}", get(manifest_file)).with_state(api)
}

async fn manifest_file(State(api): State<Arc<PlanApi>>, UrlPath(file): UrlPath<String>) -> Response {
    let wanted = api.image.as_ref().map(|i| format!("{i}.manifest"));
    let Some(path) = api.archive.as_ref().and_then(|a| a.manifest_file.clone()).filter(|_| wanted.as_deref() == Some(file.as_str())) else {
        return (StatusCode::NOT_FOUND, "no such manifest\n").into_response();
    };
    match tokio::fs::read(&path).await {
        Ok(b) => ([(axum::http::header::CONTENT_TYPE, "application/jsonl")], b).into_response(),
        Err(e) => {
            warn!(path = %path.display(), "serving the manifest: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "manifest unreadable\n").into_response()
        }
    }
}

async fn plan(
    State(api): State<Arc<PlanApi>>,
    UrlPath(mac): UrlPath<String>,
    query: Result<Query<PlanQuery>, axum::extract::rejection::QueryRejection>,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        debug!(%mac, "plan: not a MAC address");
        return (StatusCode::BAD_REQUEST, "not a MAC address (want aa:bb:cc:dd:ee:ff)\n").into_response();
    };
    let auth = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    match node_api::authorize(auth, &api.secret, mac) {
        Ok(()) => {}
        Err(e @ AuthError::Missing) => return (StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response(),
        Err(e @ AuthError::Wrong) => {
            warn!(%mac, "plan: {e}");
            return (StatusCode::FORBIDDEN, format!("{e}\n")).into_response();
        }
    }
    // A valid token is bound to the node's address too (a token seen elsewhere is no key).
    let client = connect.and_then(|c| crate::types::addrs::v4(c.0.0));
    if let Err(why) = crate::types::addrs::check_node_source(api.addrs.as_deref(), mac, client) {
        warn!(%mac, client = ?client, "plan refused: {why}");
        return (StatusCode::FORBIDDEN, "this token belongs to another address\n").into_response();
    }
    // A query that does not parse (`?firmware=amiga`) is refused, not guessed.
    let firmware = match query {
        Ok(Query(q)) => q.firmware.unwrap_or(Firmware::Bios),
        Err(_) => return (StatusCode::BAD_REQUEST, "bad query: firmware=uefi|bios\n").into_response(),
    };
    if api.nodes.mode() == crate::config::Enroll::Listed && api.nodes.get(mac).is_none() {
        warn!(%mac, "plan refused: not enrolled (si-appliance node add {mac})");
        return (StatusCode::FORBIDDEN, format!("{mac} is not enrolled on this appliance\n")).into_response();
    }
    let Some(image) = api.image.clone().filter(|_| api.archive.is_some()) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no image archive to install yet\n").into_response();
    };
    let nodes = api.nodes.clone();
    let img = image.clone();
    let gate = match tokio::task::spawn_blocking(move || nodes.plan_fetched(mac, &img)).await {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => {
            warn!(%mac, "plan refused: the node book cannot record it: {e:#}");
            return (StatusCode::SERVICE_UNAVAILABLE, "the appliance cannot record the install now; retry\n").into_response();
        }
        Err(e) => {
            warn!(%mac, "plan: {e}");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let record = match gate {
        PlanGate::Allowed(r) => r,
        PlanGate::NotEnrolled => {
            warn!(%mac, "plan refused: not enrolled (si-appliance node add {mac})");
            return (StatusCode::FORBIDDEN, format!("{mac} is not enrolled on this appliance\n")).into_response();
        }
        PlanGate::Installed(image) => {
            warn!(%mac, %image, "plan refused: installed (si-appliance node reimage {mac} to install again)");
            return (StatusCode::CONFLICT, format!("{mac} is installed with {image}; `si-appliance node reimage {mac}` first\n"))
                .into_response();
        }
    };
    match api.plan(mac, firmware, Some(&record)) {
        Some(p) => {
            info!(%mac, hostname = %p.hostname, image = %p.image, ?firmware, "plan sent");
            api.events.send(crate::types::events::NodeEvent::PlanFetched { mac });
            Json(p).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no image archive to install yet\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_api::{FsKind, TableKind};

    fn api(layout: Option<DiskLayout>) -> PlanApi {
        let mut cfg: Config = toml::from_str(
            "image = \"deb\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.0.0.11\"\nhostname = \"node01\"\n",
        )
        .unwrap();
        cfg.install.disk = Some("/dev/vda".into());
        let nodes = Arc::new(NodeBook::in_memory(crate::config::Enroll::Any));
        let mut a = PlanApi::new(&cfg, b"k".to_vec(), Some(ArchiveFacts { size: 10, unpacked: 30, manifest: None, manifest_file: None, seal: None }), nodes).unwrap();
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
    fn the_readme_layout_example_is_valid() {
        let text = "table = \"gpt\"\n[[partitions]]\nsize_mib = 1\nfs = \"bios-grub\"\n[[partitions]]\nsize_mib = 1024\nfs = \"swap\"\n[[partitions]]\nfs = \"xfs\"\nmount = \"/\"\nlabel = \"root\"\n";
        let l: DiskLayout = toml::from_str(text).unwrap();
        l.validate().unwrap();
        assert_eq!(l.partitions[0].fs, FsKind::BiosGrub);
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
