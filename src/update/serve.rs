//! The appliance's side of updates over the swarm (issue 17): which version each installed node
//! is to run, the archive from the node's version to it (made once per base by the image store
//! and published in the swarm), the orders (`node update`) and the nodes' results.
//!
//! | route | who | what |
//! |---|---|---|
//! | `POST /api/admin/update` | operator (admin token) | `{"nodes": {"macs": [..]} \| {"group": "G"} \| "all", "profile": bool}`: order |
//! | `GET /api/nodes/<mac>/update?have=<sha256>[&asked=1]` | node (its token) | → [`UpdateOffer`] (503 while the archive is being made) |
//! | `GET /api/nodes/<mac>/update/manifest[?name=N]` | node | the offered archive's manifest |
//! | `POST /api/nodes/<mac>/update` | node | [`UpdateResult`] → 204 |
//!
//! The target is the image's tree in the store as it is when the update is ordered (its
//! manifest's SHA-256 is the version; the store keeps every version's manifest). A node whose
//! version the store knows gets the diff from it; another gets the whole tree. Each archive is
//! published under `IMAGE.<base12>-<target12>` (or `IMAGE.<target12>`) for as many nodes as were
//! ordered from that base, so `/api/swarm/<name>` says `done` when they all have it.
//! The node routes answer only to installed nodes, with their token, from their address. A node
//! with no order gets an offer only when it asks itself (`asked=1`: `si-appliance update
//! --server` run on it); its agent (`update --watch`) acts only on orders.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tracing::{info, warn};

use crate::image::store::{Store, TreeKind};
use crate::nodes::http::AdminAuth;
use crate::nodes::{NodeBook, NodeState, Selector};
use crate::plan::http::{Connect, NodeAuth};
use crate::swarm::publish::Publisher;
use crate::types::node_api::{NodeProfile, UPDATE_RESULT_MAX, UpdateKind, UpdateOffer, UpdateResult, UpdateTarget};
use crate::types::{ImageName, MacAddr};

/// A group's profile for re-running its steps (`None`: the group has none).
pub type ProfileOf = Arc<dyn Fn(&str) -> Option<NodeProfile> + Send + Sync>;

/// What the routes share.
pub struct UpdateService {
    store: Store,
    image: ImageName,
    publisher: Arc<Publisher>,
    book: Arc<NodeBook>,
    auth: NodeAuth,
    admin: AdminAuth,
    poll_secs: u64,
    profile_of: ProfileOf,
    state: Mutex<Versions>,
}

/// A published update archive.
#[derive(Clone, Debug)]
struct Ready {
    target: UpdateTarget,
    manifest: PathBuf,
}

#[derive(Default)]
struct Versions {
    /// The version nodes update to (set by an order, or by the first node that asks).
    target: Option<String>,
    /// Published archives by (base version or "" for a full one, target version).
    ready: HashMap<(String, String), Ready>,
    /// Archives being made.
    preparing: HashSet<(String, String)>,
    /// The last archive offered to each node (the manifest route's default).
    offered: HashMap<MacAddr, Ready>,
    /// Why the last attempt at an archive failed, by key (said to the nodes that ask).
    failed: HashMap<(String, String), String>,
}

impl UpdateService {
    /// The service for `image` of `store`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        image: ImageName,
        publisher: Arc<Publisher>,
        book: Arc<NodeBook>,
        auth: NodeAuth,
        admin: AdminAuth,
        poll_secs: u64,
        profile_of: ProfileOf,
    ) -> UpdateService {
        UpdateService { store, image, publisher, book, auth, admin, poll_secs, profile_of, state: Mutex::new(Versions::default()) }
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, Versions> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Scans the image's tree and makes its version the target.
    async fn refresh_target(self: &Arc<Self>) -> Result<String, String> {
        let me = self.clone();
        let v = tokio::task::spawn_blocking(move || me.store.current_version(TreeKind::Image, &me.image))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))?;
        let mut st = self.versions();
        if st.target.as_deref() != Some(v.as_str()) {
            info!(image = %self.image, version = %v, "update target");
            st.target = Some(v.clone());
        }
        Ok(v)
    }

    /// Nodes ordered to update that run `base`.
    fn ordered_from(&self, base: &str) -> u32 {
        let n = self
            .book
            .list()
            .iter()
            .filter(|r| r.update.is_some())
            .filter(|r| matches!(&r.state, NodeState::Installed { manifest: Some(m), .. } if m == base))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Makes and publishes the archive from `base` to `target` (in the background; the nodes
    /// asking meanwhile get 503).
    fn prepare(self: &Arc<Self>, base: String, target: String) {
        let key = (base.clone(), target.clone());
        {
            let mut st = self.versions();
            if st.ready.contains_key(&key) || !st.preparing.insert(key.clone()) {
                return;
            }
            st.failed.remove(&key);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let r = me.make(&base, &target).await;
            let mut st = me.versions();
            st.preparing.remove(&key);
            match r {
                Ok(ready) => {
                    st.ready.insert(key, ready);
                }
                Err(why) => {
                    warn!(image = %me.image, base = %base, "update archive: {why}");
                    st.failed.insert(key, why);
                }
            }
        });
    }

    async fn make(self: &Arc<Self>, base: &str, target: &str) -> Result<Ready, String> {
        let me = self.clone();
        let b = base.to_owned();
        let made = tokio::task::spawn_blocking(move || {
            let base_m = (!b.is_empty()).then(|| me.store.version(TreeKind::Image, &me.image, &b)).flatten();
            me.store.update_archive(TreeKind::Image, &me.image, base_m.as_ref())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
        if made.target != target {
            // The tree changed since the order: the archive is for the newer version, which
            // becomes the target.
            warn!(image = %self.image, ordered = %target, now = %made.target, "the image changed since the update was ordered");
            self.versions().target = Some(made.target.clone());
        }
        let expected = self.ordered_from(base).max(1);
        let served = self.publisher.publish(&made.archive, Some(expected)).await.map_err(|e| format!("{e:#}"))?;
        let bytes = std::fs::read(&made.manifest_path).map_err(|e| format!("reading {}: {e}", made.manifest_path.display()))?;
        let sha = {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        let target = UpdateTarget {
            image: self.image.clone(),
            kind: if made.diff { UpdateKind::Diff } else { UpdateKind::Full },
            name: served.name.clone(),
            bytes: served.size,
            manifest_sha256: sha,
            base_manifest_sha256: made.manifest.header.base_manifest_sha256.clone(),
        };
        info!(name = %served.name, kind = ?target.kind, bytes = served.size, expected, "update published");
        Ok(Ready { target, manifest: made.manifest_path })
    }
}

/// The routes.
pub fn routes(svc: Arc<UpdateService>) -> Router {
    Router::new()
        .route("/api/admin/update", post(order))
        .route("/api/nodes/{mac}/update", get(offer).post(result))
        .route("/api/nodes/{mac}/update/manifest", get(manifest))
        .with_state(svc)
}

/// `POST /api/admin/update`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// Which nodes.
    pub nodes: Selector,
    /// Run their group's profile steps again too.
    #[serde(default)]
    pub profile: bool,
}

type Peer = Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>;

async fn order(State(svc): State<Arc<UpdateService>>, p: Peer, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if let Err(r) = svc.admin.check(&headers, p.as_ref().map(|c| c.0.0), "update") {
        return r;
    }
    if body.len() > 64 << 10 {
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large\n").into_response();
    }
    let req: OrderRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("malformed request: {e}\n")).into_response(),
    };
    // The target first: an image that cannot be scanned orders nothing.
    let target = match svc.refresh_target().await {
        Ok(v) => v,
        Err(why) => return (StatusCode::SERVICE_UNAVAILABLE, format!("the image cannot be read: {why}\n")).into_response(),
    };
    let book = svc.book.clone();
    let image = svc.image.clone();
    let (ordered, skipped) = match tokio::task::spawn_blocking(move || book.order_update(&req.nodes, &image, req.profile)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let code = if matches!(e, crate::nodes::NodesError::Unknown(_)) { StatusCode::NOT_FOUND } else { StatusCode::SERVICE_UNAVAILABLE };
            return (code, format!("{e}\n")).into_response();
        }
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    // The archives for the ordered nodes' versions, made before their agents ask.
    let bases: HashSet<String> = ordered
        .iter()
        .filter_map(|m| svc.book.get(*m))
        .filter_map(|r| match r.state {
            NodeState::Installed { manifest, .. } => Some(manifest.unwrap_or_default()),
            _ => None,
        })
        .filter(|b| *b != target)
        .collect();
    for b in bases {
        let b = if svc.store.version(TreeKind::Image, &svc.image, &b).is_some() { b } else { String::new() };
        svc.prepare(b, target.clone());
    }
    let current: Vec<MacAddr> = ordered
        .iter()
        .copied()
        .filter(|m| svc.book.get(*m).is_some_and(|r| matches!(r.state, NodeState::Installed { manifest: Some(ref v), .. } if *v == target)))
        .collect();
    Json(serde_json::json!({ "ordered": ordered, "skipped": skipped, "already_current": current, "target": target }))
        .into_response()
}

#[derive(Debug, Deserialize)]
struct OfferQuery {
    have: Option<String>,
    #[serde(default)]
    asked: Option<u8>,
}

async fn offer(
    State(svc): State<Arc<UpdateService>>,
    UrlPath(mac): UrlPath<String>,
    query: Result<Query<OfferQuery>, axum::extract::rejection::QueryRejection>,
    connect: Connect,
    headers: HeaderMap,
) -> Response {
    let mac = match svc.auth.check(&mac, connect, &headers, "update offer") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Ok(Query(q)) = query else {
        return (StatusCode::BAD_REQUEST, "bad query: have=<manifest sha256>[&asked=1]\n").into_response();
    };
    let Some(rec) = svc.book.get(mac) else {
        return (StatusCode::NOT_FOUND, format!("{mac} is not in this appliance's node book\n")).into_response();
    };
    match &rec.state {
        NodeState::Installed { image, .. } if *image != svc.image => {
            return (StatusCode::CONFLICT, format!("{mac} runs image {image}; this appliance updates {} (re-image it to change images)\n", svc.image))
                .into_response();
        }
        NodeState::Installed { .. } => {}
        other => return (StatusCode::CONFLICT, format!("{mac} is {}, not installed\n", other.name())).into_response(),
    }
    let order = rec.update.clone();
    let none = |ordered| UpdateOffer { ordered, target: None, profile: None, poll_secs: svc.poll_secs };
    if order.is_none() && q.asked != Some(1) {
        return Json(none(false)).into_response();
    }
    let profile = match (&order, &rec.group) {
        (Some(o), Some(g)) if o.profile => (svc.profile_of)(g),
        _ => None,
    };
    let known = svc.versions().target.clone();
    let target = match known {
        Some(t) => t,
        None => match svc.refresh_target().await {
            Ok(t) => t,
            Err(why) => return (StatusCode::SERVICE_UNAVAILABLE, format!("the image cannot be read: {why}\n")).into_response(),
        },
    };
    let have = q.have.unwrap_or_default();
    if have == target {
        return Json(UpdateOffer { profile, ..none(order.is_some()) }).into_response();
    }
    // A version the store does not know (or no `have`): the whole tree.
    let base = if svc.store.version(TreeKind::Image, &svc.image, &have).is_some() { have } else { String::new() };
    let key = (base.clone(), target.clone());
    let ready = {
        let st = svc.versions();
        if let Some(why) = st.failed.get(&key) {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("the update archive could not be made: {why}\n")).into_response();
        }
        st.ready.get(&key).cloned()
    };
    match ready {
        Some(r) => {
            svc.versions().offered.insert(mac, r.clone());
            info!(%mac, name = %r.target.name, kind = ?r.target.kind, ordered = order.is_some(), "update offered");
            Json(UpdateOffer { ordered: order.is_some(), target: Some(r.target), profile, poll_secs: svc.poll_secs }).into_response()
        }
        None => {
            svc.prepare(base, target);
            (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "5")], "preparing the update archive; ask again\n").into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
struct ManifestQuery {
    name: Option<String>,
}

async fn manifest(
    State(svc): State<Arc<UpdateService>>,
    UrlPath(mac): UrlPath<String>,
    query: Result<Query<ManifestQuery>, axum::extract::rejection::QueryRejection>,
    connect: Connect,
    headers: HeaderMap,
) -> Response {
    let mac = match svc.auth.check(&mac, connect, &headers, "update manifest") {
        Ok(m) => m,
        Err(r) => return r,
    };
    let name = query.ok().and_then(|Query(q)| q.name);
    let found = {
        let st = svc.versions();
        match name {
            // By name: only among the published update archives (a key lookup, never a path).
            Some(n) => st.ready.values().find(|r| r.target.name.as_str() == n).cloned(),
            None => st.offered.get(&mac).cloned(),
        }
    };
    let Some(r) = found else { return (StatusCode::NOT_FOUND, "no such update\n").into_response() };
    match tokio::fs::read(&r.manifest).await {
        Ok(b) => ([(axum::http::header::CONTENT_TYPE, "application/jsonl")], b).into_response(),
        Err(e) => {
            warn!(path = %r.manifest.display(), "serving an update manifest: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "manifest unreadable\n").into_response()
        }
    }
}

async fn result(
    State(svc): State<Arc<UpdateService>>,
    UrlPath(mac): UrlPath<String>,
    connect: Connect,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let mac = match svc.auth.check(&mac, connect, &headers, "update result") {
        Ok(m) => m,
        Err(r) => return r,
    };
    if body.len() > UPDATE_RESULT_MAX {
        return (StatusCode::PAYLOAD_TOO_LARGE, "result too large\n").into_response();
    }
    let r: UpdateResult = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            warn!(%mac, "malformed update result: {e}");
            return (StatusCode::BAD_REQUEST, format!("malformed result: {e}\n")).into_response();
        }
    };
    let ok_digest = |d: &str| d.is_empty() || (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok_digest(&r.manifest_sha256) || !ok_digest(&r.from_manifest_sha256) {
        return (StatusCode::BAD_REQUEST, "manifest digests are 64 hex digits\n").into_response();
    }
    for s in &r.steps {
        info!(%mac, step = %s.name, ok = s.ok, exit = ?s.exit_code, "update: profile step");
    }
    let book = svc.book.clone();
    match tokio::task::spawn_blocking(move || book.update_reported(mac, &r)).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
