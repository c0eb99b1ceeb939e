//! `si-appliance node …`: the admin routes of a running appliance, from the command line.

use std::net::SocketAddr;
use std::time::Duration;

use crate::monitor::client::ClientError;

use super::{Enrol, Selector};

const LIMIT: Duration = Duration::from_secs(20);

fn fail(method: &'static str, path: &str, addr: SocketAddr, why: String) -> ClientError {
    ClientError::Exchange { method, path: path.to_owned(), addr, why }
}

async fn call(addr: SocketAddr, token: &str, method: &'static str, path: &str, body: &[u8]) -> Result<Vec<u8>, ClientError> {
    crate::monitor::client::call(addr, method, path, Some(token), body, LIMIT).await
}

fn json(method: &'static str, path: &str, addr: SocketAddr, body: &[u8]) -> Result<serde_json::Value, ClientError> {
    serde_json::from_slice(body).map_err(|e| fail(method, path, addr, format!("not JSON: {e}")))
}

/// Enrols nodes; returns one line per node.
///
/// # Errors
/// The appliance refused or did not answer.
pub async fn add(addr: SocketAddr, token: &str, e: &Enrol) -> Result<String, ClientError> {
    let body = serde_json::to_vec(e).unwrap_or_default();
    let out = call(addr, token, "POST", "/api/admin/nodes", &body).await?;
    let v = json("POST", "/api/admin/nodes", addr, &out)?;
    let mut s = String::new();
    for n in v["enrolled"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{} {} ({}): {}\n",
            n["mac"].as_str().unwrap_or("?"),
            n["outcome"].as_str().unwrap_or("?"),
            n["state"].as_str().unwrap_or("?"),
            if n["state"] == "installed" { "boots from its disk until `node reimage`" } else { "installs at its next network boot" }
        ));
    }
    Ok(s)
}

/// Marks nodes for re-imaging; returns what was marked.
///
/// # Errors
/// The appliance refused (e.g. a MAC that is not enrolled) or did not answer.
pub async fn reimage(addr: SocketAddr, token: &str, sel: &Selector) -> Result<String, ClientError> {
    let body = serde_json::to_vec(sel).unwrap_or_default();
    let out = call(addr, token, "POST", "/api/admin/reimage", &body).await?;
    let v = json("POST", "/api/admin/reimage", addr, &out)?;
    let macs: Vec<&str> = v["marked"].as_array().into_iter().flatten().filter_map(|m| m.as_str()).collect();
    if macs.is_empty() {
        return Ok("no node matched: nothing marked\n".to_owned());
    }
    Ok(format!("marked for re-imaging at their next network boot ({}): {}\n", macs.len(), macs.join(" ")))
}

/// Orders an update of installed nodes (their agents apply it at their next poll); returns
/// what was ordered.
///
/// # Errors
/// The appliance refused (a MAC that is not enrolled, the image unreadable) or did not answer.
pub async fn update(addr: SocketAddr, token: &str, sel: &Selector, profile: bool) -> Result<String, ClientError> {
    let body = serde_json::to_vec(&serde_json::json!({ "nodes": sel, "profile": profile })).unwrap_or_default();
    let out = call(addr, token, "POST", "/api/admin/update", &body).await?;
    let v = json("POST", "/api/admin/update", addr, &out)?;
    let list = |k: &str| -> Vec<String> { v[k].as_array().into_iter().flatten().filter_map(|m| m.as_str().map(str::to_owned)).collect() };
    let (ordered, skipped, current) = (list("ordered"), list("skipped"), list("already_current"));
    let mut s = format!("update target: {}\n", v["target"].as_str().unwrap_or("?"));
    if ordered.is_empty() {
        s.push_str("no installed node matched: nothing ordered\n");
    } else {
        s.push_str(&format!("ordered ({}; applied at their agents' next poll): {}\n", ordered.len(), ordered.join(" ")));
    }
    if !current.is_empty() {
        s.push_str(&format!("already at the target ({}){}: {}\n", current.len(), if profile { ", profile steps only" } else { "" }, current.join(" ")));
    }
    if !skipped.is_empty() {
        s.push_str(&format!("skipped, not installed with this image ({}): {}\n", skipped.len(), skipped.join(" ")));
    }
    Ok(s)
}

fn when(ms: Option<u64>) -> String {
    ms.map(|m| crate::monitor::report::timestamp(m)).unwrap_or_else(|| "-".into())
}

/// Every record and the discovered clients, as a table or JSON.
///
/// # Errors
/// The appliance refused or did not answer.
pub async fn list(addr: SocketAddr, token: &str, as_json: bool) -> Result<String, ClientError> {
    let out = call(addr, token, "GET", "/api/admin/nodes", b"").await?;
    let v = json("GET", "/api/admin/nodes", addr, &out)?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n");
    }
    let mut s = format!("enroll = {}\n", v["enroll"]);
    s.push_str(&format!("{:<17} {:<16} {:<11} {:<8} {:<16} {:<17} {:<8} {:<7} {:<14} {}\n", "MAC", "HOST", "STATE", "REIMAGE", "IMAGE", "SINCE", "GROUP", "ORIGIN", "VERSION", "UPDATE / ERROR"));
    for n in v["nodes"].as_array().into_iter().flatten() {
        let t = |k: &str| n[k].as_str().unwrap_or("-").to_owned();
        let since = n["at_ms"].as_u64().or(n["since_ms"].as_u64()).or(n["updated_ms"].as_u64());
        let version: String = n["manifest"].as_str().map_or_else(|| "-".to_owned(), |m| m.chars().take(12).collect());
        let lu = &n["last_update"];
        let update = match (n["update"].is_object(), lu.is_object()) {
            (true, _) => format!("ordered{}", if lu["ok"] == false { format!(" (last: failed: {})", lu["error"].as_str().unwrap_or("?")) } else { String::new() }),
            (false, true) if lu["ok"] == true => format!("updated {}", when(lu["at_ms"].as_u64())),
            (false, true) => format!("update failed: {}", lu["error"].as_str().unwrap_or("?")),
            _ => n["error"].as_str().unwrap_or("").to_owned(),
        };
        s.push_str(&format!(
            "{:<17} {:<16} {:<11} {:<8} {:<16} {:<17} {:<8} {:<7} {:<14} {}\n",
            t("mac"), t("hostname"), t("state"), if n["reimage"] == true { "yes" } else { "" }, t("image"), when(since), t("group"), t("origin"),
            version, update
        ));
    }
    let disc: Vec<_> = v["discovered"].as_array().into_iter().flatten().collect();
    if !disc.is_empty() {
        s.push_str(&format!("\ndiscovered (not enrolled; told to boot from their disks): {}\n", disc.len()));
        s.push_str(&format!("{:<17} {:<15} {:<12} {:<32} {:<17} {}\n", "MAC", "ADDRESS", "ARCH", "VENDOR CLASS", "FIRST SEEN", "LAST SEEN"));
        for d in disc {
            let t = |k: &str| d[k].as_str().unwrap_or("-").to_owned();
            s.push_str(&format!(
                "{:<17} {:<15} {:<12} {:<32} {:<17} {}\n",
                t("mac"), t("ip"), t("arch"), t("vendor_class"), when(d["first_seen_ms"].as_u64()), when(d["last_seen_ms"].as_u64())
            ));
        }
    }
    Ok(s)
}

/// A node's installer console.
///
/// # Errors
/// The appliance has none for it, refused, or did not answer.
pub async fn log(addr: SocketAddr, token: &str, mac: crate::types::MacAddr) -> Result<String, ClientError> {
    let out = call(addr, token, "GET", &format!("/api/admin/nodes/{mac}/log"), b"").await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
