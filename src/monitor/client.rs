//! A tiny HTTP/1.1 client for `si-appliance status` and `si-appliance report`: one request
//! to a running appliance's monitor API (loopback by default), `Connection: close`, bounded
//! in time and size. No TLS, no redirects: the API is plain HTTP on the appliance.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest answer read (the node list of a big rack is a few MB).
const MAX_BODY: u64 = 64 << 20;

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
        source: std::io::Error,
    },
    /// The exchange failed or timed out.
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

/// Sends one request and returns the status and body.
///
/// # Errors
/// No connection, a timeout, or an answer that is not HTTP.
pub async fn request(addr: SocketAddr, method: &'static str, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), ClientError> {
    request_with(addr, method, path, None, b"", timeout).await
}

/// [`request`] with a bearer token and a JSON body.
///
/// # Errors
/// No connection, a timeout, or an answer that is not HTTP.
pub async fn request_with(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    bearer: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let fail = |why: String| ClientError::Exchange { method, path: path.to_owned(), addr, why };
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
        let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let ctype = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}{ctype}Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        s.write_all(&req).await.map_err(|e| fail(e.to_string()))?;
        let mut buf = Vec::new();
        s.take(MAX_BODY).read_to_end(&mut buf).await.map_err(|e| fail(e.to_string()))?;
        parse(&buf).ok_or_else(|| fail("not an HTTP answer".into()))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// Status and body of a whole HTTP/1.1 answer (plain or chunked).
fn parse(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &buf[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let (mut out, mut rest) = (Vec::new(), body);
    loop {
        let nl = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).ok()?.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[nl + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_chunked_and_garbage() {
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"), Some((200, b"{}".to_vec())));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"), Some((200, b"abcd".to_vec())));
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), None);
        assert_eq!(parse(b"garbage"), None);
    }
}

/// `si-appliance status`: the deployment and its nodes from a running appliance, as text (a
/// summary line and a table) or, with `json`, as `{"deployment": …, "nodes": […]}`.
///
/// # Errors
/// The appliance did not answer, or not with JSON.
pub async fn status(addr: SocketAddr, json: bool) -> Result<String, ClientError> {
    let t = Duration::from_secs(10);
    let get = |path: &'static str| async move {
        let (code, body) = request(addr, "GET", path, t).await?;
        let bad = |why: String| ClientError::Exchange { method: "GET", path: path.to_owned(), addr, why };
        if code != 200 {
            return Err(bad(format!("HTTP {code}: {}", String::from_utf8_lossy(&body).trim())));
        }
        serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| bad(format!("not JSON: {e}")))
    };
    let d = get("/api/deployment").await?;
    let nodes = get("/api/nodes").await?;
    if json {
        let v = serde_json::json!({ "deployment": d, "nodes": nodes });
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut out = String::new();
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
            if let Some(p) = crate::node_api::Phase::ALL.iter().find(|p| p.as_str() == k) {
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
    let (code, body) = request_with(addr, "POST", "/api/report", admin_token, b"", Duration::from_secs(120)).await?;
    let bad = |why: String| ClientError::Exchange { method: "POST", path: "/api/report".into(), addr, why };
    if code != 200 {
        return Err(bad(format!("HTTP {code}: {}", String::from_utf8_lossy(&body).trim())));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(format!("not JSON: {e}")))?;
    v["dir"].as_str().map(std::path::PathBuf::from).ok_or_else(|| bad("no \"dir\" in the answer".into()))
}
