//! The planner's HTTP side: `GET /api/nodes/{mac}/plan[?firmware=uefi|bios]` (token, address
//! and enrolment checks, the node book's gate, then [`Planner::plan`]) and
//! `GET /manifests/<image>.manifest`, and the profile routes a node's installer fetches with
//! its token: `GET /api/nodes/{mac}/scripts/{name}` (only a script of the node's group's
//! profile, from `<store>/scripts/`) and `GET /api/nodes/{mac}/overlay` (the group's overlay
//! tree `<store>/groups/<group>/overlay/` as a plain tar, 404 when there is none). Wired into the
//! appliance's router by `app.rs`.

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

use super::Planner;
use crate::nodes::{NodeBook, PlanGate};
use crate::types::addrs::{self, ClientAddrs};
use crate::types::events::{EventSink, NodeEvent};
use crate::types::node_api::{self, AuthError};
use crate::types::{Firmware, MacAddr};

/// What the plan route reads; immutable after start.
pub struct PlanApi {
    planner: Planner,
    secret: Vec<u8>,
    events: EventSink,
    nodes: Arc<NodeBook>,
    /// MAC -> address as our DHCP saw it; None with `dhcp.mode = "off"` (plans not bound).
    addrs: Option<Arc<ClientAddrs>>,
    /// The image store (profile scripts, group overlays); `None`: no profile routes answer.
    store: Option<PathBuf>,
    /// Packs an overlay directory into a plain tar (the image store's packer, given by `app.rs`).
    pack_overlay: Option<OverlayPacker>,
}

/// Packs a directory into a plain tar in memory, or says why not.
pub type OverlayPacker = Arc<dyn Fn(&Path) -> Result<Vec<u8>, String> + Send + Sync>;

use node_api::OVERLAY_MAX;

#[derive(Debug, Deserialize)]
struct PlanQuery {
    firmware: Option<Firmware>,
}

impl PlanApi {
    /// The route's state: the planner, the node-token secret and the node book.
    pub fn new(planner: Planner, secret: Vec<u8>, nodes: Arc<NodeBook>) -> PlanApi {
        PlanApi { planner, secret, events: EventSink::disabled(), nodes, addrs: None, store: None, pack_overlay: None }
    }

    /// Where profile scripts and group overlays are (`<store>/scripts`, `<store>/groups`), and
    /// how an overlay tree is packed for the installer.
    pub fn with_store(mut self, store: PathBuf, pack_overlay: OverlayPacker) -> PlanApi {
        self.store = Some(store);
        self.pack_overlay = Some(pack_overlay);
        self
    }

    /// Plans go only to the address DHCP gave the node (`None`: not bound).
    pub fn with_addrs(mut self, addrs: Option<Arc<ClientAddrs>>) -> PlanApi {
        self.addrs = addrs;
        self
    }

    /// The node routes' checks (token, address), for other node routes.
    pub fn node_auth(&self) -> NodeAuth {
        NodeAuth::new(self.secret.clone(), self.addrs.clone())
    }

    /// The planner (profiles of groups, for updates that run them again).
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Sends a `PlanFetched` event to the monitor for every plan handed out.
    pub fn with_events(mut self, events: EventSink) -> PlanApi {
        self.events = events;
        self
    }
}

/// `GET /api/nodes/{mac}/plan`, and `GET /manifests/<image>.manifest` (the served image's
/// manifest, public like its .torrent; the installer checks it against the signed digest).
pub fn routes(api: Arc<PlanApi>) -> Router {
    Router::new()
        .route("/api/nodes/{mac}/plan", get(plan))
        .route("/api/nodes/{mac}/scripts/{name}", get(script))
        .route("/api/nodes/{mac}/overlay", get(overlay))
        .route("/manifests/{file}", get(manifest_file))
        .with_state(api)
}

/// The connection's peer, as axum's `ConnectInfo` gives it (absent in unit tests).
pub type Connect = Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>;

/// The checks every node route makes: a MAC, the node's own token, from the node's address.
/// Shared with the other node routes (updates).
#[derive(Clone)]
pub struct NodeAuth {
    secret: Vec<u8>,
    addrs: Option<Arc<ClientAddrs>>,
}

impl NodeAuth {
    /// The node-token secret, and MAC -> address as DHCP saw it (`None`: not bound).
    pub fn new(secret: Vec<u8>, addrs: Option<Arc<ClientAddrs>>) -> NodeAuth {
        NodeAuth { secret, addrs }
    }

    /// The node's MAC when the request carries its token and comes from its address; else the
    /// answer (400, 401, 403).
    pub fn check(&self, mac: &str, connect: Connect, headers: &HeaderMap, what: &str) -> Result<MacAddr, Response> {
        let Ok(mac) = mac.parse::<MacAddr>() else {
            debug!(%mac, "{what}: not a MAC address");
            return Err((StatusCode::BAD_REQUEST, "not a MAC address (want aa:bb:cc:dd:ee:ff)\n").into_response());
        };
        let auth = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        match node_api::authorize(auth, &self.secret, mac) {
            Ok(()) => {}
            Err(e @ AuthError::Missing) => return Err((StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response()),
            Err(e @ AuthError::Wrong) => {
                warn!(%mac, "{what}: {e}");
                return Err((StatusCode::FORBIDDEN, format!("{e}\n")).into_response());
            }
        }
        // A valid token is bound to the node's address too (a token seen elsewhere is no key).
        let client = connect.and_then(|c| addrs::v4(c.0.0));
        if let Err(why) = addrs::check_node_source(self.addrs.as_deref(), mac, client) {
            warn!(%mac, client = ?client, "{what} refused: {why}");
            return Err((StatusCode::FORBIDDEN, "this token belongs to another address\n").into_response());
        }
        Ok(mac)
    }
}

fn authorize_node(api: &PlanApi, mac: &str, connect: Connect, headers: &HeaderMap, what: &str) -> Result<MacAddr, Response> {
    api.node_auth().check(mac, connect, headers, what)
}

/// The node's group and the store, or the answer that there is none.
fn group_of(api: &PlanApi, mac: MacAddr) -> Result<(String, PathBuf), Response> {
    let store = api.store.clone().ok_or_else(|| (StatusCode::NOT_FOUND, "no profiles on this appliance\n").into_response())?;
    let group = api.nodes.get(mac).and_then(|r| r.group);
    let group = group.ok_or_else(|| (StatusCode::NOT_FOUND, format!("{mac} is in no group\n")).into_response())?;
    Ok((group, store))
}

/// `GET /api/nodes/{mac}/scripts/{name}`: a script of the node's group's profile.
async fn script(
    State(api): State<Arc<PlanApi>>,
    UrlPath((mac, name)): UrlPath<(String, String)>,
    connect: Connect,
    headers: HeaderMap,
) -> Response {
    let mac = match authorize_node(&api, &mac, connect, &headers, "script") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let (group, store) = match group_of(&api, mac) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let Some(path) = super::script_path(&store, &name) else {
        warn!(%mac, name, "script refused: not a plain file name");
        return (StatusCode::BAD_REQUEST, "a script is named by a plain file name\n").into_response();
    };
    if !api.planner.group_has_script(&group, &name) {
        warn!(%mac, group, name, "script refused: not a step of the group's profile");
        return (StatusCode::NOT_FOUND, format!("{name} is not a step of group {group}'s profile\n")).into_response();
    }
    match tokio::fs::read(&path).await {
        Ok(b) if b.len() > node_api::SCRIPT_MAX => {
            warn!(%mac, path = %path.display(), "profile script larger than {} bytes: refused", node_api::SCRIPT_MAX);
            (StatusCode::INTERNAL_SERVER_ERROR, "script too large\n").into_response()
        }
        Ok(b) => {
            info!(%mac, group, script = name, bytes = b.len(), "profile script sent");
            ([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], b).into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(%mac, path = %path.display(), "profile script missing from the store");
            (StatusCode::NOT_FOUND, format!("{} is not in the store\n", path.display())).into_response()
        }
        Err(e) => {
            warn!(path = %path.display(), "reading the profile script: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "script unreadable\n").into_response()
        }
    }
}

/// `GET /api/nodes/{mac}/overlay`: the node's group's overlay as a plain tar (the image
/// archive's format, without the tree's own root entry).
async fn overlay(State(api): State<Arc<PlanApi>>, UrlPath(mac): UrlPath<String>, connect: Connect, headers: HeaderMap) -> Response {
    let mac = match authorize_node(&api, &mac, connect, &headers, "overlay") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let (group, store) = match group_of(&api, mac) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let Some(dir) = super::overlay_dir(&store, &group).filter(|d| d.is_dir()) else {
        return (StatusCode::NOT_FOUND, format!("group {group} has no overlay\n")).into_response();
    };
    let Some(pack) = api.pack_overlay.clone() else {
        return (StatusCode::NOT_FOUND, "no profiles on this appliance\n").into_response();
    };
    let d = dir.clone();
    match tokio::task::spawn_blocking(move || pack(&d)).await {
        Ok(Ok(tar)) if tar.len() <= OVERLAY_MAX => {
            info!(%mac, group, bytes = tar.len(), "group overlay sent");
            ([(axum::http::header::CONTENT_TYPE, "application/x-tar")], tar).into_response()
        }
        Ok(Ok(tar)) => {
            warn!(%mac, dir = %dir.display(), bytes = tar.len(), "group overlay larger than {OVERLAY_MAX} bytes: refused");
            (StatusCode::INTERNAL_SERVER_ERROR, "group overlay too large\n").into_response()
        }
        Ok(Err(e)) => {
            warn!(%mac, dir = %dir.display(), "packing the group overlay: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "group overlay unreadable\n").into_response()
        }
        Err(e) => {
            warn!(%mac, "overlay: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn manifest_file(State(api): State<Arc<PlanApi>>, UrlPath(file): UrlPath<String>) -> Response {
    let Some(path) = api.planner.manifest_file(&file).map(Path::to_path_buf) else {
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
    connect: Connect,
    headers: HeaderMap,
) -> Response {
    let mac = match authorize_node(&api, &mac, connect, &headers, "plan") {
        Ok(m) => m,
        Err(r) => return r,
    };
    // A query that does not parse (`?firmware=amiga`) is refused, not guessed.
    let firmware = match query {
        Ok(Query(q)) => q.firmware.unwrap_or(Firmware::Bios),
        Err(_) => return (StatusCode::BAD_REQUEST, "bad query: firmware=uefi|bios\n").into_response(),
    };
    if api.nodes.mode() == crate::config::Enroll::Listed && api.nodes.get(mac).is_none() {
        warn!(%mac, "plan refused: not enrolled (si-appliance node add {mac})");
        return (StatusCode::FORBIDDEN, format!("{mac} is not enrolled on this appliance\n")).into_response();
    }
    let Some(image) = api.planner.ready_image().cloned() else {
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
    match api.planner.plan(mac, firmware, Some(&record)) {
        Some(mut p) => {
            // A group with an overlay tree in the store has a profile even without steps.
            let overlay = match (&record.group, &api.store) {
                (Some(g), Some(s)) => super::overlay_dir(s, g).is_some_and(|d| d.is_dir()),
                _ => false,
            };
            if let (true, Some(g)) = (overlay, &record.group) {
                p.profile = api.planner.profile(g, true);
            }
            info!(%mac, hostname = %p.hostname, image = %p.image, ?firmware, "plan sent");
            api.events.send(NodeEvent::PlanFetched { mac });
            Json(p).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no image archive to install yet\n").into_response(),
    }
}
