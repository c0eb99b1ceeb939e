//! The admin routes and their credential.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/admin/nodes` | every record of the book, and the discovered (not enrolled) PXE clients |
//! | `POST /api/admin/nodes` | enrol: `{"macs": [...], "hostname"?, "disk"?, "group"?}` |
//! | `POST /api/admin/reimage` | `{"macs": [...]}`, `{"group": "G"}` or `"all"`: install again at the next boot |
//! | `GET /api/admin/nodes/{mac}/log` | the node's installer console, as it streamed it |
//!
//! Every admin route (and `POST /api/report`, guarded through [`AdminAuth::check`]) wants
//! `Authorization: Bearer <admin token>`; the token is `<state_dir>/admin-token` (created at
//! the first start, mode 0600), which the CLI reads. With `admin.trust_loopback`, requests
//! from 127.0.0.1 need none.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{Enrol, NodeBook, NodesError, Selector};
use crate::types::MacAddr;

/// File name of the admin token in the state directory.
pub const ADMIN_TOKEN: &str = "admin-token";
/// Largest admin request body.
const MAX_BODY: usize = 64 << 10;

/// The admin credential.
#[derive(Clone, Debug)]
pub struct AdminAuth {
    token: String,
    trust_loopback: bool,
}

/// Reads `<state_dir>/admin-token`, creating it (32 random bytes, hex, mode 0600) when absent.
///
/// # Errors
/// The file cannot be read or written.
pub fn load_or_create_token(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join(ADMIN_TOKEN);
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(state_dir)?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    crate::private_file::write(&path, token.as_bytes()).map_err(|(_, e)| e)?;
    Ok(token)
}

/// Reads the admin token of a state directory (the CLI).
///
/// # Errors
/// The file cannot be read.
pub fn read_token(state_dir: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(state_dir.join(ADMIN_TOKEN))?.trim().to_owned())
}

impl AdminAuth {
    /// The credential: the token, and whether loopback is trusted.
    pub fn new(token: String, trust_loopback: bool) -> AdminAuth {
        AdminAuth { token, trust_loopback }
    }

    /// `Ok` for a request with the admin token (or from loopback when trusted); otherwise the
    /// refusal to send (401 without a token, 403 with a wrong one), logged.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, headers: &HeaderMap, peer: Option<SocketAddr>, what: &str) -> Result<(), Response> {
        if self.trust_loopback && peer.is_some_and(|p| p.ip().is_loopback()) {
            return Ok(());
        }
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let client = peer.map(tracing::field::display);
        match given {
            None => {
                warn!(client, what, "admin request refused: no admin token");
                Err((StatusCode::UNAUTHORIZED, "admin token required (Authorization: Bearer <state_dir>/admin-token)\n").into_response())
            }
            Some(t) if constant_time_eq(t.trim().as_bytes(), self.token.as_bytes()) => Ok(()),
            Some(_) => {
                warn!(client, what, "admin request refused: wrong admin token");
                Err((StatusCode::FORBIDDEN, "wrong admin token\n").into_response())
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A PXE client seen on the network that is not enrolled.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Discovered {
    /// Its MAC.
    pub mac: MacAddr,
    /// Its address, if one was handed out.
    pub ip: Option<std::net::Ipv4Addr>,
    /// Architecture (option 93).
    pub arch: Option<String>,
    /// Vendor class (option 60).
    pub vendor_class: Option<String>,
    /// First seen, ms since the Unix epoch.
    pub first_seen_ms: u64,
    /// Last seen.
    pub last_seen_ms: u64,
}

/// Where the routes find the discovered clients and the node consoles (the monitor's).
pub trait Observed: Send + Sync {
    /// The PXE clients seen that are not in the book.
    fn discovered(&self) -> Vec<Discovered>;
    /// A node's console text, if it sent any.
    fn console(&self, mac: MacAddr) -> Option<String>;
}

struct Api {
    book: Arc<NodeBook>,
    auth: AdminAuth,
    observed: Arc<dyn Observed>,
}

/// The admin routes (see the module docs).
pub fn routes(book: Arc<NodeBook>, auth: AdminAuth, observed: Arc<dyn Observed>) -> Router {
    Router::new()
        .route("/api/admin/nodes", get(list).post(enrol))
        .route("/api/admin/reimage", post(reimage))
        .route("/api/admin/nodes/{mac}/log", get(console))
        .with_state(Arc::new(Api { book, auth, observed }))
}

type Peer = Option<Extension<ConnectInfo<SocketAddr>>>;

fn peer(p: &Peer) -> Option<SocketAddr> {
    p.as_ref().map(|c| c.0.0)
}

fn error(e: &NodesError) -> Response {
    let code = match e {
        NodesError::Io { .. } => StatusCode::SERVICE_UNAVAILABLE,
        NodesError::Unknown(_) => StatusCode::NOT_FOUND,
        NodesError::Invalid { .. } => StatusCode::BAD_REQUEST,
    };
    (code, format!("{e}\n")).into_response()
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    if body.len() > MAX_BODY {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "body too large\n").into_response());
    }
    serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("malformed request: {e}\n")).into_response())
}

async fn list(State(api): State<Arc<Api>>, p: Peer, headers: HeaderMap) -> Response {
    if let Err(r) = api.auth.check(&headers, peer(&p), "list nodes") {
        return r;
    }
    let nodes = api.book.list();
    let discovered: Vec<Discovered> =
        api.observed.discovered().into_iter().filter(|d| api.book.get(d.mac).is_none()).collect();
    Json(serde_json::json!({ "enroll": api.book.mode(), "nodes": nodes, "discovered": discovered })).into_response()
}

/// A mutating admin request: the credential, a JSON body of type `T`, then `f` on the book off
/// the async threads (it writes the journal).
async fn mutate<T: serde::de::DeserializeOwned + Send + 'static>(
    api: Arc<Api>,
    p: Peer,
    headers: HeaderMap,
    body: axum::body::Bytes,
    what: &'static str,
    f: fn(&NodeBook, T) -> Result<serde_json::Value, NodesError>,
) -> Response {
    if let Err(r) = api.auth.check(&headers, peer(&p), what) {
        return r;
    }
    let req: T = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let book = api.book.clone();
    match tokio::task::spawn_blocking(move || f(&book, req)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error(&e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn enrol(State(api): State<Arc<Api>>, p: Peer, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    mutate(api, p, headers, body, "enrol", |book, e: Enrol| Ok(serde_json::json!({ "enrolled": book.enrol(&e)? }))).await
}

async fn reimage(State(api): State<Arc<Api>>, p: Peer, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    mutate(api, p, headers, body, "reimage", |book, sel: Selector| Ok(serde_json::json!({ "marked": book.reimage(&sel)? }))).await
}

async fn console(State(api): State<Arc<Api>>, p: Peer, headers: HeaderMap, UrlPath(mac): UrlPath<String>) -> Response {
    if let Err(r) = api.auth.check(&headers, peer(&p), "node log") {
        return r;
    }
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return (StatusCode::BAD_REQUEST, "not a MAC address\n").into_response();
    };
    match api.book.console(mac).or_else(|| api.observed.console(mac)) {
        Some(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no console output from {mac}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;

    struct Nothing;
    impl Observed for Nothing {
        fn discovered(&self) -> Vec<Discovered> {
            vec![Discovered { mac: "52:54:00:00:00:09".parse().unwrap(), ip: None, arch: Some("x86-bios".into()), vendor_class: None, first_seen_ms: 1, last_seen_ms: 2 }]
        }
        fn console(&self, _: MacAddr) -> Option<String> {
            None
        }
    }

    async fn call(r: &Router, method: &str, uri: &str, token: Option<&str>, body: &str) -> (StatusCode, String) {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = r.clone().oneshot(b.body(Body::from(body.to_owned())).unwrap()).await.unwrap();
        let st = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (st, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn admin_routes_want_the_token_and_change_the_book() {
        let book = Arc::new(NodeBook::in_memory(crate::config::Enroll::Listed));
        let r = routes(book.clone(), AdminAuth::new("t0k".into(), false), Arc::new(Nothing));
        assert_eq!(call(&r, "GET", "/api/admin/nodes", None, "").await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&r, "GET", "/api/admin/nodes", Some("bad"), "").await.0, StatusCode::FORBIDDEN);
        let add = r#"{"macs":["52:54:00:00:00:09"],"hostname":"n9","group":"g"}"#;
        assert_eq!(call(&r, "POST", "/api/admin/nodes", Some("bad"), add).await.0, StatusCode::FORBIDDEN);
        assert!(book.list().is_empty());
        let (st, body) = call(&r, "GET", "/api/admin/nodes", Some("t0k"), "").await;
        assert_eq!(st, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["discovered"][0]["mac"], "52:54:00:00:00:09", "{body}");
        let (st, body) = call(&r, "POST", "/api/admin/nodes", Some("t0k"), add).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert!(body.contains("\"outcome\":\"added\""), "{body}");
        let (_, body) = call(&r, "GET", "/api/admin/nodes", Some("t0k"), "").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["discovered"].as_array().map(Vec::len), Some(0), "{body}");
        assert_eq!(v["nodes"][0]["hostname"], "n9", "{body}");
        let (st, _) = call(&r, "POST", "/api/admin/reimage", Some("t0k"), r#"{"macs":["52:54:00:00:00:01"]}"#).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, body) = call(&r, "POST", "/api/admin/reimage", Some("t0k"), r#"{"group":"g"}"#).await;
        assert_eq!((st, body.contains("52:54:00:00:00:09")), (StatusCode::OK, true), "{body}");
        let (st, _) = call(&r, "POST", "/api/admin/reimage", Some("t0k"), r#""all""#).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(call(&r, "POST", "/api/admin/nodes", Some("t0k"), "{").await.0, StatusCode::BAD_REQUEST);
        assert_eq!(call(&r, "POST", "/api/admin/nodes", Some("t0k"), r#"{"macs":["x"]}"#).await.0, StatusCode::BAD_REQUEST);
        assert_eq!(call(&r, "GET", "/api/admin/nodes/52:54:00:00:00:09/log", Some("t0k"), "").await.0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_token_is_created_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create_token(d.path()).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(load_or_create_token(d.path()).unwrap(), a);
        assert_eq!(read_token(d.path()).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(d.path().join(ADMIN_TOKEN)).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
