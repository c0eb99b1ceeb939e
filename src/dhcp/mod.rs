//! DHCP and PXE: the pure policy (`decide`), the lease journal, and the service loop for full
//! and proxyDHCP modes. See LEASES.md beside this file for the journal's crash rules.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::net::Iface;

/// Errors of the DHCP service.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// Placeholder until the service exists.
    #[error("dhcp service not implemented yet")]
    NotImplemented,
}

/// The DHCP service: probed, lease store opened, sockets bound.
pub struct DhcpServer {
    _cfg: Arc<Config>,
    _iface: Iface,
}

impl DhcpServer {
    /// Probes the segment (full mode), opens the lease journal and binds the sockets.
    ///
    /// # Errors
    /// A refusal (another DHCP server answers in full mode), a journal or socket error.
    pub async fn start(cfg: Arc<Config>, iface: Iface) -> Result<DhcpServer, DhcpError> {
        Ok(DhcpServer { _cfg: cfg, _iface: iface })
    }

    /// Serves until `shutdown`.
    ///
    /// # Errors
    /// A socket failure that cannot be recovered from.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DhcpError> {
        shutdown.cancelled().await;
        Err(DhcpError::NotImplemented)
    }
}
