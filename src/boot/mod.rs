//! Boot files: the TFTP service (async-tftp) over the boot loaders and rendered per-node files,
//! and the HTTP boot routes (iPXE scripts, kernel, initrd). Names are keys, never paths.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, TftpConfig};
use crate::net::Iface;
use crate::types::ImageName;

/// Errors of the boot services.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Placeholder until the service exists.
    #[error("tftp service not implemented yet")]
    NotImplemented,
}

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
}

impl BootContext {
    /// Builds the context from the config, the interface and the node-token secret.
    pub fn new(cfg: &Config, iface: &Iface, secret: Vec<u8>) -> BootContext {
        BootContext {
            server_ip: iface.ip,
            http_port: cfg.http.port,
            image: cfg.image.clone(),
            kernel: cfg.kernel_path(),
            initrd: cfg.initrd_path(),
            cmdline: cfg.boot.cmdline.clone(),
            loader_dirs: cfg.boot.loader_dirs.clone(),
            secret,
        }
    }

    /// The node-token secret.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }
}

/// Serves TFTP on `socket` until `shutdown`.
///
/// # Errors
/// The server could not start.
pub async fn serve_tftp(
    _ctx: Arc<BootContext>,
    _cfg: &TftpConfig,
    _socket: std::net::UdpSocket,
    shutdown: CancellationToken,
) -> Result<(), BootError> {
    shutdown.cancelled().await;
    Ok(())
}

/// The HTTP boot routes (`/boot/...`).
pub fn http_routes(_ctx: Arc<BootContext>) -> axum::Router {
    axum::Router::new()
}
