//! The planner's HTTP side: `GET /api/nodes/{mac}/plan[?firmware=uefi|bios]` (token, address
//! and enrolment checks, the node book's gate, then [`Planner::plan`]) and
//! `GET /manifests/<image>.manifest`. Wired into the appliance's router by `app.rs`.

use std::path::Path;
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
}

#[derive(Debug, Deserialize)]
struct PlanQuery {
    firmware: Option<Firmware>,
}

impl PlanApi {
    /// The route's state: the planner, the node-token secret and the node book.
    pub fn new(planner: Planner, secret: Vec<u8>, nodes: Arc<NodeBook>) -> PlanApi {
        PlanApi { planner, secret, events: EventSink::disabled(), nodes, addrs: None }
    }

    /// Plans go only to the address DHCP gave the node (`None`: not bound).
    pub fn with_addrs(mut self, addrs: Option<Arc<ClientAddrs>>) -> PlanApi {
        self.addrs = addrs;
        self
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
    Router::new().route("/api/nodes/{mac}/plan", get(plan)).route("/manifests/{file}", get(manifest_file)).with_state(api)
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
    let client = connect.and_then(|c| addrs::v4(c.0.0));
    if let Err(why) = addrs::check_node_source(api.addrs.as_deref(), mac, client) {
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
        Some(p) => {
            info!(%mac, hostname = %p.hostname, image = %p.image, ?firmware, "plan sent");
            api.events.send(NodeEvent::PlanFetched { mac });
            Json(p).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no image archive to install yet\n").into_response(),
    }
}
