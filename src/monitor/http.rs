//! The monitor's HTTP face (the only monitor file that imports axum):
//!
//! | route | what |
//! |---|---|
//! | `GET /`, `/dashboard` | the dashboard (HTML, JS, CSS embedded in the binary; no CDN) |
//! | `GET /api/nodes` | every node (JSON array) |
//! | `GET /api/nodes/<mac>` | one node, with its rate history `rates: [[ms, bytes/s], …]` |
//! | `POST /api/nodes/<mac>/report` | an installer's [`NodeReport`] (Bearer token) → 204 |
//! | `GET /api/deployment` | counts per phase, rates, ETA, seed share, dropped events |
//! | `GET /api/samples` | the aggregate samples (for charts) |
//! | `GET /api/rates` | every node's rate history `{mac: [[ms, bytes/s], …]}` (last 300) |
//! | `GET /api/events` | server-sent events: `node` (a node changed), `sample` (every `sample_interval`) |
//! | `POST /api/report` | write the report now → `{"dir": …}` |
//! | `GET /metrics` | Prometheus (OpenMetrics text) |

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::{Extension, Json};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::broadcast::error::RecvError;
use tracing::warn;

use super::Shared;
use crate::types::node_api::{self, AuthError, NodeReport, Phase};
use crate::types::MacAddr;
use crate::types::events::NodeEvent;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// The routes; see the module docs.
pub fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/dashboard", get(index))
        .route("/dashboard/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/dashboard/app.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS) }))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{mac}", get(one_node))
        .route("/api/nodes/{mac}/report", post(report).layer(DefaultBodyLimit::max(REPORT_BODY_MAX)))
        .route("/api/deployment", get(deployment))
        .route("/api/samples", get(samples))
        .route("/api/rates", get(rates))
        .route("/api/events", get(events))
        .route("/api/report", post(write_report))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML)
}

fn json_bytes(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn nodes(State(s): State<Arc<Shared>>) -> Response {
    let r = s.lock();
    let list: Vec<_> = r.nodes().collect();
    json_bytes(serde_json::to_vec(&list).unwrap_or_default())
}

async fn one_node(State(s): State<Arc<Shared>>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return (StatusCode::BAD_REQUEST, "not a MAC address\n").into_response();
    };
    let r = s.lock();
    let Some(n) = r.node(mac) else {
        return (StatusCode::NOT_FOUND, "no such node\n").into_response();
    };
    let mut v = serde_json::to_value(n).unwrap_or_default();
    v["rates"] = serde_json::to_value(&n.rate_history).unwrap_or_default();
    drop(r);
    Json(v).into_response()
}

async fn deployment(State(s): State<Arc<Shared>>) -> Response {
    Json(s.deployment()).into_response()
}

async fn samples(State(s): State<Arc<Shared>>) -> Response {
    let body = serde_json::to_vec(s.lock().samples()).unwrap_or_default();
    json_bytes(body)
}

async fn rates(State(s): State<Arc<Shared>>) -> Response {
    let r = s.lock();
    let map: std::collections::BTreeMap<String, Vec<(u64, u64)>> = r
        .nodes()
        .filter(|n| !n.rate_history.is_empty())
        .map(|n| (n.mac.to_string(), n.rate_history.iter().rev().take(300).rev().copied().collect()))
        .collect();
    drop(r);
    json_bytes(serde_json::to_vec(&map).unwrap_or_default())
}

/// `POST /api/nodes/<mac>/report`: 204 accepted; 400 bad MAC or body; 401 no token; 403 another
/// node's token; 503 when the monitor's queue is full (the installer sends the next one).
async fn report(
    State(s): State<Arc<Shared>>,
    Path(mac): Path<String>,
    connect: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = connect.as_ref().map(|c| tracing::field::display(c.0.0));
    let refuse = |code: StatusCode, why: String| {
        s.rejected.fetch_add(1, Ordering::Relaxed);
        warn!(client, node = %mac, status = code.as_u16(), "report refused: {why}");
        (code, format!("{why}\n")).into_response()
    };
    let m: MacAddr = match mac.parse() {
        Ok(m) => m,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match node_api::authorize(auth, &s.secret, m) {
        Ok(()) => {}
        Err(e @ AuthError::Missing) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
        Err(e @ AuthError::Wrong) => return refuse(StatusCode::FORBIDDEN, e.to_string()),
    }
    let ip = connect.as_ref().and_then(|c| crate::types::addrs::v4(c.0.0));
    if let Err(why) = crate::types::addrs::check_node_source(s.addrs.get().map(|a| &**a), m, ip) {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    let report: NodeReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed report: {e}")),
    };
    if let (Some(text), Some((book, _))) = (report.console.clone(), s.book.get()) {
        let book = book.clone();
        let text = truncate_console(text);
        let _ = tokio::task::spawn_blocking(move || book.append_console(m, &text)).await;
    }
    if let (Some(phase @ (Phase::Seeding | Phase::Done | Phase::Failed)), Some((book, manifest))) = (report.phase, s.book.get()) {
        let (book, manifest, error) = (book.clone(), manifest.clone(), report.error.clone());
        match tokio::task::spawn_blocking(move || book.reported(m, phase, error.as_deref(), manifest.as_deref())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(node = %m, "report not recorded in the node book: {e:#}");
                return (StatusCode::SERVICE_UNAVAILABLE, "the appliance cannot record this now; send it again\n").into_response();
            }
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        }
    }
    if s.sink.send(NodeEvent::Report { mac: m, report }) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "monitor busy, report dropped\n").into_response()
    }
}

/// Largest report body accepted (413 beyond). An installer's report is a few hundred bytes
/// plus the console text printed since the previous one (at most 12 KiB before JSON escaping,
/// `install::console::PENDING_MAX`) and, in a failure report, the reason and 40 kernel lines;
/// with a profile, its finished steps (at most 32 × 512 bytes of output, 4 KiB for a failed one).
pub const REPORT_BODY_MAX: usize = 128 << 10;

/// Console text per report at most (an installer sends about 12 KiB at most).
const CONSOLE_PER_REPORT: usize = 32 << 10;

fn truncate_console(mut text: String) -> String {
    if text.len() > CONSOLE_PER_REPORT {
        let mut cut = CONSOLE_PER_REPORT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[... console text of this report cut ...]\n");
    }
    text
}

async fn events(State(s): State<Arc<Shared>>) -> Sse<impl futures_lite::Stream<Item = Result<Event, Infallible>>> {
    let rx = s.updates.subscribe();
    let closing = s.closing.clone();
    let stream = futures_lite::stream::unfold((rx, closing), |(mut rx, closing)| async move {
        let ev = tokio::select! {
            // CANCEL-SAFETY: broadcast recv is cancel-safe; cancellation ends the stream.
            _ = closing.cancelled() => return None,
            r = rx.recv() => match r {
                Ok((name, data)) => Event::default().event(name).data(&*data),
                // A subscriber that does not keep up is dropped (the dashboard's EventSource
                // reconnects and starts from a fresh snapshot); it never holds events back.
                Err(RecvError::Lagged(n)) => {
                    warn!(missed = n, "dashboard event stream too slow, closed");
                    return None;
                }
                Err(RecvError::Closed) => return None,
            },
        };
        Some((Ok(ev), (rx, closing)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn write_report(
    State(s): State<Arc<Shared>>,
    connect: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    if let Some(auth) = s.admin.get() {
        if let Err(r) = auth.check(&headers, connect.map(|c| c.0.0), "write report") {
            return r;
        }
    }
    match s.write_report().await {
        Ok(dir) => Json(serde_json::json!({ "dir": dir })).into_response(),
        Err(e @ super::MonitorError::ReportBusy) => {
            (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "5")], format!("{e}\n")).into_response()
        }
        Err(e) => {
            warn!("report: {e:#}");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("report failed: {e:#}\n")).into_response()
        }
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    match super::metrics::text(&s) {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")).into_response(),
    }
}
