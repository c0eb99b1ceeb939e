//! A tiny HTTP/1.1 client for `si-appliance status` and `si-appliance report`: one request
//! to a running appliance's monitor API (loopback by default), `Connection: close`, bounded
//! in time and size. No TLS, no redirects: the API is plain HTTP on the appliance.

use std::net::SocketAddr;
use std::time::Duration;

use crate::net::http_client::{self, Failure, HttpError, Request};

/// Largest answer read (the node list of a big rack is a few MB); a larger one is an error.
const MAX_BODY: usize = 64 << 20;

/// Why a request to the appliance failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection.
    #[error("cannot reach the appliance at {addr} (is it running? --server)")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: HttpError,
    },
    /// The exchange failed: I/O, time limit, a malformed or too-big answer.
    #[error(transparent)]
    Http(HttpError),
    /// The appliance answered with a status that is not a success.
    #[error("{method} {path} on {addr}: HTTP {status}: {excerpt}")]
    Refused {
        /// GET/POST.
        method: &'static str,
        /// The path.
        path: String,
        /// Where.
        addr: SocketAddr,
        /// The status code.
        status: u16,
        /// The start of the body.
        excerpt: String,
    },
    /// The answer is not what the command expects (not JSON, a field missing).
    #[error("{method} {path} on {addr}: {why}")]
    Exchange {
        /// GET/POST.
        method: &'static str,
        /// The path.
        path: String,
        /// Where.
        addr: SocketAddr,
        /// What went wrong.
        why: String,
    },
}

impl From<HttpError> for ClientError {
    fn from(e: HttpError) -> Self {
        match e.failure {
            Failure::Connect(_) => ClientError::Connect { addr: e.addr, source: e },
            _ => ClientError::Http(e),
        }
    }
}

/// Sends one request and returns the status and body.
///
/// # Errors
/// No connection, a timeout, or an answer that is not HTTP or too big.
pub async fn request(addr: SocketAddr, method: &'static str, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), ClientError> {
    request_with(addr, method, path, None, b"", timeout).await
}

/// [`request`] with a bearer token and a JSON body.
///
/// # Errors
/// No connection, a timeout, or an answer that is not HTTP or too big.
pub async fn request_with(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let json = (!body.is_empty()).then_some(body);
    let r = http_client::request(addr, Request { method, path, bearer, json }, MAX_BODY, timeout).await?;
    Ok((r.status, r.body))
}

/// [`request_with`], and a status outside 2xx is [`ClientError::Refused`].
///
/// # Errors
/// As [`request_with`], and [`ClientError::Refused`].
pub async fn call(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let (status, out) = request_with(addr, method, path, bearer, body, timeout).await?;
    if !(200..300).contains(&status) {
        return Err(ClientError::Refused { method, path: path.to_owned(), addr, status, excerpt: http_client::excerpt(&out) });
    }
    Ok(out)
}

/// `si-appliance status`: the deployment and its nodes from a running appliance, as text (a
/// summary line and a table) or, with `json`, as `{"deployment": …, "nodes": […]}`.
///
/// # Errors
/// The appliance did not answer, or not with JSON.
pub async fn status(addr: SocketAddr, json: bool) -> Result<String, ClientError> {
    let t = Duration::from_secs(10);
    let get = |path: &'static str| async move {
        let body = call(addr, "GET", path, None, b"", t).await?;
        let bad = |why: String| ClientError::Exchange { method: "GET", path: path.to_owned(), addr, why };
        serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| bad(format!("not JSON: {e}")))
    };
    let d = get("/api/deployment").await?;
    let nodes = get("/api/nodes").await?;
    if json {
        let v = serde_json::json!({ "deployment": d, "nodes": nodes });
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut out = String::new();
    if let Ok(sv) = serde_json::from_value::<super::registry::Serving>(d["serving"].clone()) {
        let fw = if sv.firmware.is_empty() { String::new() } else { format!("; booted {}", sv.firmware) };
        out.push_str(&format!("serving on {} ({}): {}{fw}\n", sv.iface, sv.ip, sv.chosen));
    }
    let dep: Result<super::registry::Deployment, _> = serde_json::from_value::<DeploymentView>(d.clone()).map(Into::into);
    match dep {
        Ok(d) => out.push_str(&super::terminal::summary(&d)),
        Err(_) => out.push_str(&d.to_string()),
    }
    out.push('\n');
    out.push_str(&format!("{:<17} {:<15} {:<20} {:<12} {:>6} {:>10} {:>5}  {}\n", "MAC", "ADDRESS", "HOST", "PHASE", "DONE", "DOWN", "STUCK", "MESSAGE"));
    for n in nodes.as_array().into_iter().flatten() {
        let s = |k: &str| n[k].as_str().unwrap_or("-").to_owned();
        let u = |k: &str| n[k].as_u64().unwrap_or(0);
        let pct = if u("bytes_total") > 0 { format!("{}%", u("bytes_done") * 100 / u("bytes_total")) } else { "-".into() };
        let msg = if s("phase") == "failed" { s("error") } else { s("message") };
        out.push_str(&format!(
            "{:<17} {:<15} {:<20} {:<12} {:>6} {:>10} {:>5}  {}\n",
            s("mac"), s("ip"), s("hostname"), s("phase"), pct,
            format!("{:.1}MB/s", u("down_bps") as f64 / 1e6),
            if n["stuck"].as_bool() == Some(true) { "yes" } else { "" },
            msg
        ));
    }
    Ok(out)
}

/// The fields of `/api/deployment` the summary line needs (the rest is ignored).
#[derive(serde::Deserialize)]
struct DeploymentView {
    nodes: usize,
    phases: std::collections::BTreeMap<String, usize>,
    stuck: usize,
    down_bps: u64,
    eta_secs: Option<u64>,
    dropped_events: u64,
}

impl From<DeploymentView> for super::registry::Deployment {
    fn from(v: DeploymentView) -> Self {
        let mut d = super::registry::Registry::new(0, 0, 0).deployment(0, v.dropped_events, 0);
        d.nodes = v.nodes;
        for (k, n) in v.phases {
            if let Some(p) = crate::types::node_api::Phase::ALL.iter().find(|p| p.as_str() == k) {
                d.phases.insert(p.as_str(), n);
            }
        }
        d.stuck = v.stuck;
        d.down_bps = v.down_bps;
        d.eta_secs = v.eta_secs;
        d
    }
}

/// `si-appliance report`: asks a running appliance to write a report; returns its directory.
///
/// # Errors
/// The appliance did not answer, or failed to write the report.
pub async fn report(addr: SocketAddr, admin_token: Option<&str>) -> Result<std::path::PathBuf, ClientError> {
    let body = call(addr, "POST", "/api/report", admin_token, b"", Duration::from_secs(120)).await?;
    let bad = |why: String| ClientError::Exchange { method: "POST", path: "/api/report".into(), addr, why };
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(format!("not JSON: {e}")))?;
    v["dir"].as_str().map(std::path::PathBuf::from).ok_or_else(|| bad("no \"dir\" in the answer".into()))
}
