//! HTTP boot routes: `GET /boot/<key>` for every [`BootFile`] (node iPXE scripts, the chain
//! script, kernel, initrd, boot loaders, syslinux modules, pxelinux configs). The path is
//! percent-decoded by axum, then parsed as a key; anything that is not a key is a 404, so
//! `/boot/../..` and `/boot/%2e%2e/...` never reach the file system. Files on disk are served by
//! tower-http's `ServeFile` on the resolved path (Range requests, HEAD, conditional GET);
//! rendered files are plain text. The only file of this module that imports axum.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceExt as _;
use tower_http::services::ServeFile;
use tracing::{debug, info, warn};

use crate::boot::BootContext;
use crate::boot::file::{self, BootFile, Source};
use crate::types::MacAddr;

/// The routes; see the module docs.
pub(crate) fn routes(ctx: Arc<BootContext>) -> Router {
    Router::new().route("/boot/{*name}", get(boot_file)).with_state(ctx)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// `mac=<aa-bb-..>` from the query: the node scripts add it to kernel and initrd URLs so the
/// log can say which node fetched them. A claim by whoever asks: logged, and the monitor
/// believes it only for a known node at that address (`monitor::registry`).
fn mac_from_query(query: Option<&str>) -> Option<MacAddr> {
    query?.split('&').find_map(|kv| kv.strip_prefix("mac=")).and_then(|m| m.parse().ok())
}

async fn boot_file(
    State(ctx): State<Arc<BootContext>>,
    name: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    // Present when app.rs serves with `into_make_service_with_connect_info`.
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| tracing::field::display(c.0));
    debug!(client, method = %req.method(), uri = %req.uri(), "http: request");
    let Ok(Path(name)) = name else {
        debug!(client, uri = %req.uri(), "http: refused: undecodable path");
        return not_found();
    };
    let f = match BootFile::parse(&name) {
        Ok(f) => f,
        Err(why) => {
            debug!(client, name, %why, "http: refused");
            return not_found();
        }
    };
    let (c, key) = (ctx.clone(), f.clone());
    let ip = req.extensions().get::<ConnectInfo<SocketAddr>>().and_then(|c| crate::types::addrs::v4(c.0));
    let src = match tokio::task::spawn_blocking(move || file::open(&c, &key, ip, "http")).await {
        Ok(Ok(src)) => src,
        Ok(Err(e)) if e.is_not_found() => {
            debug!(client, file = %f, "http: not found: {e}");
            return not_found();
        }
        Ok(Err(e)) => {
            warn!(client, file = %f, "http: refused: {e:#}");
            return not_found();
        }
        Err(e) => {
            warn!(client, file = %f, "http: open task failed: {e}");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let mac = f.mac().or_else(|| mac_from_query(req.uri().query())).map(tracing::field::display);
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        let m = f.mac().or_else(|| mac_from_query(req.uri().query()));
        super::note_boot_file(&ctx, *addr, &f, m, src.len(), crate::types::events::BootVia::Http);
    }
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if f.is_node_step() {
        info!(client, file = %f, kind = f.kind(), mac, size = src.len(), range, "http: sending");
    } else {
        debug!(client, file = %f, kind = f.kind(), size = src.len(), range, "http: sending");
    }
    match src {
        Source::Rendered(bytes) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response(),
        Source::Disk { path, file, .. } => {
            // ServeFile reopens by path; the path is the canonical one `open` checked.
            drop(file);
            match ServeFile::new(path).oneshot(req).await {
                Ok(resp) => resp.map(axum::body::Body::new),
                Err(never) => match never {},
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn get(router: &Router, uri: &str, range: Option<&str>) -> (StatusCode, Vec<u8>) {
        let mut b = axum::http::Request::builder().uri(uri);
        if let Some(r) = range {
            b = b.header(header::RANGE, r);
        }
        let resp = router.clone().oneshot(b.body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 24).await.unwrap();
        (status, body.to_vec())
    }

    #[tokio::test]
    async fn routes_serve_keys_ranges_and_404_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"0123456789").unwrap();
        let ctx = Arc::new(BootContext::for_tests(vec![dir.path().to_owned()], kernel));
        let r = routes(ctx.clone());

        let (st, body) = get(&r, "/boot/52-54-00-12-34-56.ipxe", None).await;
        assert_eq!(st, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert!(text.contains(&format!("si.token={}", ctx.node(mac).token.as_str())), "{text}");

        assert_eq!(get(&r, "/boot/vmlinuz", None).await, (StatusCode::OK, b"0123456789".to_vec()));
        assert_eq!(get(&r, "/boot/vmlinuz?mac=52-54-00-12-34-56", Some("bytes=2-4")).await,
                   (StatusCode::PARTIAL_CONTENT, b"234".to_vec()));
        for bad in ["/boot/../../etc/passwd", "/boot/%2e%2e/%2e%2e/etc/passwd", "/boot/%2e%2e%2fk",
                    "/boot/k", "/boot/", "/boot/pxelinux.cfg/../../k", "/boot/%ff", "/etc/passwd"] {
            assert_eq!(get(&r, bad, None).await.0, StatusCode::NOT_FOUND, "{bad}");
        }
    }

    async fn get_from(router: &Router, uri: &str, from: &str) -> String {
        let mut req = axum::http::Request::builder().uri(uri).body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(from.parse().unwrap()));
        let resp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn node_script_and_token_only_to_the_nodes_leased_address() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"0123456789").unwrap();
        let mut ctx = BootContext::for_tests(vec![dir.path().to_owned()], kernel);
        ctx.bind_nodes = true;
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        ctx.addrs.note(mac, "10.0.0.5".parse().unwrap());
        let token = ctx.node(mac).token.as_str().to_owned();
        let r = routes(Arc::new(ctx));
        let own = get_from(&r, "/boot/52-54-00-12-34-56.ipxe", "10.0.0.5:1234").await;
        assert!(own.contains(&format!("si.token={token}")), "{own}");
        let other = get_from(&r, "/boot/52-54-00-12-34-56.ipxe", "10.0.0.6:1234").await;
        assert!(other.contains("\nexit\n") && !other.contains("si.token"), "{other}");
        let unknown = get_from(&r, "/boot/52-54-00-ab-cd-ef.ipxe", "10.0.0.5:1234").await;
        assert!(!unknown.contains("si.token"), "{unknown}");
        let pxe = get_from(&r, "/boot/pxelinux.cfg/01-52-54-00-12-34-56", "10.0.0.6:1234").await;
        assert!(pxe.contains("LOCALBOOT") && !pxe.contains("si.token"), "{pxe}");
    }

    #[test]
    fn query_mac() {
        assert_eq!(mac_from_query(Some("x=1&mac=52-54-00-12-34-56")), "52:54:00:12:34:56".parse().ok());
        assert_eq!(mac_from_query(Some("mac=junk")), None);
        assert_eq!(mac_from_query(None), None);
    }
}
