//! Boot files: the TFTP service (async-tftp) over the boot loaders and rendered per-node files,
//! and the HTTP boot routes (iPXE scripts, kernel, initrd). Names are keys, never paths.
//!
//! # Layout
//! - `file.rs`: [`BootFile`], the only way from request text to a file (parse, then open).
//! - `script.rs`: rendering of iPXE scripts and pxelinux configs (pure, golden-tested).
//! - `tftp.rs`: the async-tftp handler and service loop (the only file that imports async-tftp).
//! - `http.rs`: the axum routes under `/boot/` (the only file here that imports axum), with
//!   `/boot/digests` and the node API's `POST /api/nodes/<mac>/boot-peer`.
//! - `peers.rs`: which serving node a kernel/initrd request is redirected to (pure).
//! - `error.rs`: the typed errors.
//!
//! This module knows nothing about images or torrents beyond the image *name* it puts on the
//! kernel command line.

pub mod error;
pub mod file;
mod http;
pub mod peers;
pub mod script;
pub mod tftp;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, TftpConfig};
use crate::net::Iface;
use crate::types::{ImageName, MacAddr, NodeToken};

pub use error::{BadName, BootError, OpenError};
pub use file::BootFile;

/// What the boot services need to know, shared by TFTP and HTTP.
#[derive(Debug)]
pub struct BootContext {
    /// The appliance's address (goes into scripts and command lines).
    pub server_ip: std::net::Ipv4Addr,
    /// HTTP port.
    pub http_port: u16,
    /// Default image.
    pub image: Option<ImageName>,
    /// Client kernel.
    pub kernel: PathBuf,
    /// Client initramfs.
    pub initrd: PathBuf,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Boot loader search path.
    pub loader_dirs: Vec<PathBuf>,
    /// Node-token secret.
    secret: Vec<u8>,
    /// Where boot-file fetches are reported to the monitor (never waits).
    pub events: crate::types::events::EventSink,
    /// Which node boots what (installer or local disk).
    pub nodes: Arc<crate::nodes::NodeBook>,
    /// MAC -> address as our DHCP saw it: a node's script (its token) goes only there.
    pub addrs: Arc<crate::types::addrs::ClientAddrs>,
    /// Whether node scripts are bound to `addrs` (false with `dhcp.mode = "off"`: another
    /// server leases, we cannot know who holds which address).
    pub bind_nodes: bool,
    /// The served image's signed seal (info-hash and manifest digest on the command line).
    pub seal: Option<crate::types::node_api::ImageSeal>,
    /// Peer-served boot files (`boot.peer_serve`): the serving nodes and the redirects in
    /// flight, and the port nodes serve on. `None`: the appliance serves every byte.
    pub peers: Option<PeerServe>,
    /// The last computed `/boot/digests`, with the (size, mtime) of both files it was made from.
    digests: Mutex<Option<(DigestStamp, crate::types::node_api::BootDigests)>>,
}

/// The appliance's side of peer-served boot files.
#[derive(Debug)]
pub struct PeerServe {
    /// Where nodes serve (`boot.peer_port`).
    pub port: u16,
    /// Nodes that cannot check a file are redirected too (`boot.peer_unverified`).
    pub unverified: bool,
    /// The scheduler.
    pub book: Mutex<peers::PeerBook>,
    /// Woken whenever a slot may have freed (a transfer ended, a peer announced, a hold
    /// ended early): waiting requests ask the book again.
    pub changed: tokio::sync::Notify,
    /// The next request's ticket.
    next: std::sync::atomic::AtomicU64,
}

impl PeerServe {
    /// An empty book with `policy`; nodes serve on `port`.
    pub fn new(port: u16, policy: peers::PeerPolicy, unverified: bool) -> PeerServe {
        PeerServe { port, unverified, book: Mutex::new(peers::PeerBook::new(policy)), changed: tokio::sync::Notify::new(), next: std::sync::atomic::AtomicU64::new(1) }
    }

    /// A fresh ticket for one request.
    pub fn ticket(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The book, even after a panic elsewhere (its data are plain maps, still consistent).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, peers::PeerBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// (size, mtime) of kernel and initrd: the digests are recomputed when either changes.
type DigestStamp = [(u64, Option<std::time::SystemTime>); 2];

fn stamp_of(p: &Path) -> std::io::Result<(u64, Option<std::time::SystemTime>)> {
    let m = std::fs::metadata(p)?;
    Ok((m.len(), m.modified().ok()))
}

fn digest_of(p: &Path) -> std::io::Result<crate::types::node_api::FileDigest> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut f = std::fs::File::open(p)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok(crate::types::node_api::FileDigest { size, sha256: hex::encode(h.finalize()) })
}

impl BootContext {
    /// Builds the context from the config, the interface and the node-token secret.
    pub fn new(cfg: &Config, iface: &Iface, secret: Vec<u8>, nodes: Arc<crate::nodes::NodeBook>) -> BootContext {
        BootContext {
            server_ip: iface.ip,
            http_port: cfg.http.port,
            image: cfg.image.clone(),
            kernel: cfg.kernel_path(),
            initrd: cfg.initrd_path(),
            cmdline: cfg.boot.cmdline.clone(),
            loader_dirs: cfg.boot.loader_dirs.clone(),
            secret,
            events: crate::types::events::EventSink::disabled(),
            nodes,
            addrs: Arc::default(),
            bind_nodes: cfg.dhcp.bind_nodes && cfg.dhcp.mode != crate::config::DhcpMode::Off,
            seal: None,
            peers: cfg.boot.peer_serve.then(|| {
                // A redirect holds its slot for the time both files take at the assumed rate.
                let bytes: u64 = [cfg.kernel_path(), cfg.initrd_path()].iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
                let secs = bytes as f64 * 8.0 / (f64::from(cfg.boot.peer_rate_mbit.max(1)) * 1e6);
                let policy = peers::PeerPolicy {
                    max_per_peer: cfg.boot.peer_serve_max as usize,
                    hold: Duration::from_secs_f64(secs) + Duration::from_secs(10),
                    prefix: iface.net.prefix_len(),
                    silence: Duration::from_secs(3 * crate::types::node_api::BOOT_PEER_ANNOUNCE_SECS),
                    here_max: cfg.boot.peer_appliance_max as usize,
                    wait: cfg.boot.peer_wait,
                };
                PeerServe::new(cfg.boot.peer_port, policy, cfg.boot.peer_unverified)
            }),
            digests: Mutex::new(None),
        }
    }

    /// Size and SHA-256 of the kernel and initrd as served, computed again only when a file
    /// changed (size or mtime). Blocking (reads both files): call from a blocking thread.
    ///
    /// # Errors
    /// [`OpenError::Io`]: a file cannot be read.
    pub fn digests(&self) -> Result<crate::types::node_api::BootDigests, OpenError> {
        let io = |path: &Path| { let path = path.to_owned(); move |source| OpenError::Io { path, source } };
        let stamp = [stamp_of(&self.kernel).map_err(io(&self.kernel))?, stamp_of(&self.initrd).map_err(io(&self.initrd))?];
        if let Some((s, d)) = &*self.digests.lock().unwrap_or_else(|e| e.into_inner()) {
            if *s == stamp {
                return Ok(d.clone());
            }
        }
        let d = crate::types::node_api::BootDigests {
            kernel: digest_of(&self.kernel).map_err(io(&self.kernel))?,
            initrd: digest_of(&self.initrd).map_err(io(&self.initrd))?,
            peer_port: self.peers.as_ref().map(|p| p.port),
        };
        *self.digests.lock().unwrap_or_else(|e| e.into_inner()) = Some((stamp, d.clone()));
        Ok(d)
    }

    /// Whether `client` may have `mac`'s installer script (and token): it is the address our
    /// DHCP leased to `mac` (proxy mode: the address `mac` asked us from). Logs a WARN with both
    /// addresses when not.
    pub fn may_serve(&self, mac: MacAddr, client: Option<std::net::Ipv4Addr>, via: &str) -> bool {
        use crate::types::addrs::Binding;
        if !self.bind_nodes {
            return true;
        }
        let Some(client) = client else {
            tracing::warn!(%mac, via, "boot: node script asked by an unknown address: told to boot locally");
            return false;
        };
        match self.addrs.check(mac, client) {
            Binding::Bound => true,
            Binding::Elsewhere(leased) => {
                tracing::warn!(%mac, %client, %leased, via, "boot: node script asked from another address than the node's: told to boot locally, no token");
                false
            }
            Binding::Unknown => {
                tracing::warn!(%mac, %client, via, "boot: node script asked for a MAC our DHCP never saw with an address: told to boot locally, no token");
                false
            }
        }
    }

    /// The node-token secret.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The appliance as rendered files describe it.
    pub fn server(&self) -> script::Server<'_> {
        script::Server {
            ip: self.server_ip,
            http_port: self.http_port,
            image: self.image.as_ref(),
            cmdline: &self.cmdline,
            seal: self.seal.as_ref(),
            peers: None,
        }
    }

    /// One node as its boot files name it (MAC and derived token).
    pub fn node(&self, mac: MacAddr) -> script::NodeBoot {
        script::NodeBoot { mac, token: NodeToken::derive(&self.secret, mac) }
    }

    /// A context for unit tests: loaders in `loader_dirs`, kernel and initrd at `kernel`.
    #[cfg(test)]
    pub(crate) fn for_tests(loader_dirs: Vec<PathBuf>, kernel: PathBuf) -> BootContext {
        BootContext {
            server_ip: std::net::Ipv4Addr::new(10, 0, 0, 1),
            http_port: 80,
            image: "test-image".parse().ok(),
            initrd: kernel.clone(),
            kernel,
            cmdline: "console=ttyS0".to_owned(),
            loader_dirs,
            secret: b"test-secret".to_vec(),
            events: crate::types::events::EventSink::disabled(),
            nodes: Arc::new(crate::nodes::NodeBook::in_memory(crate::config::Enroll::Any)),
            addrs: Arc::default(),
            bind_nodes: false,
            seal: None,
            peers: None,
            digests: Mutex::new(None),
        }
    }
}

/// Tells the monitor a node step went out (`client` is the peer's address).
pub(crate) fn note_boot_file(
    ctx: &BootContext,
    client: std::net::SocketAddr,
    f: &BootFile,
    mac: Option<MacAddr>,
    size: u64,
    via: crate::types::events::BootVia,
) {
    let ip = match client.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip) => ip,
            None => return,
        },
    };
    if let Some(step) = f.node_step() {
        ctx.events.send(crate::types::events::NodeEvent::BootFile { ip, mac, file: step, size, via });
    }
}

/// Serves TFTP on `socket` (bound to the interface's address, port 69) until `shutdown`.
///
/// # Errors
/// The server could not start, or its listening socket failed.
pub async fn serve_tftp(
    ctx: Arc<BootContext>,
    cfg: &TftpConfig,
    socket: std::net::UdpSocket,
    shutdown: CancellationToken,
) -> Result<(), BootError> {
    tftp::serve(ctx, cfg, socket, shutdown).await
}

/// The HTTP boot routes (`/boot/...`).
pub fn http_routes(ctx: Arc<BootContext>) -> axum::Router {
    http::routes(ctx)
}
