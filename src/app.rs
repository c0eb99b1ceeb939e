//! The appliance role: resolves the interface, loads state, starts every service as a task
//! under one cancellation token and waits for a signal or the first failure. This is the only
//! place where the service modules meet.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::boot::{self, BootContext};
use crate::config::{Config, DhcpMode};
use crate::dhcp;
use crate::net::{self, NetError};

/// Errors that stop the appliance.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No `iface` in the file and no `--iface`.
    #[error("no provisioning interface: pass --iface or set `iface` in the config file")]
    NoIface,
    /// Interface lookup or socket setup failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The state directory or the secret could not be read or written.
    #[error("state {path}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The DHCP service failed.
    #[error("dhcp")]
    Dhcp(#[from] dhcp::DhcpError),
    /// The boot services (TFTP/HTTP) failed.
    #[error("boot")]
    Boot(#[from] boot::BootError),
    /// The HTTP listener could not be bound or failed.
    #[error("http on {addr}")]
    Http {
        /// The listen address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the appliance until SIGINT/SIGTERM or the first service failure.
///
/// # Errors
/// The first error that stopped a service, or a start-up error.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let iface_name = cfg.iface.clone().ok_or(AppError::NoIface)?;
    let iface = net::discover(&iface_name, cfg.server_ip)?;
    let secret = load_or_create_secret(&cfg.state_dir)?;
    let cfg = Arc::new(cfg);
    let shutdown = CancellationToken::new();
    let mut tasks: JoinSet<Result<(), AppError>> = JoinSet::new();

    if cfg.dhcp.mode != DhcpMode::Off {
        // Probing and opening the lease journal happen before anything is served, so a refusal
        // (another DHCP server in full mode) stops start-up with its message.
        let server = dhcp::DhcpServer::start(cfg.clone(), iface.clone()).await?;
        let token = shutdown.clone();
        tasks.spawn(async move { server.run(token).await.map_err(AppError::from) });
    }

    // IPv6 router advertisements spare iPXE its ~15 s wait for a router. Best effort: any
    // failure is logged and the appliance serves on without them.
    match net::ra::RouterAdvertiser::open(&iface) {
        Ok(Some(ra)) => {
            let token = shutdown.clone();
            tasks.spawn(async move {
                ra.run(token).await;
                Ok(())
            });
        }
        Ok(None) => {}
        Err(e) => warn!("no IPv6 router advertisements: {e:#}"),
    }

    let ctx = Arc::new(BootContext::new(&cfg, &iface, secret));
    if cfg.tftp.enable {
        let addr = SocketAddrV4::new(iface.ip, cfg.tftp.port);
        let socket = net::udp_on(&iface.name, addr)?;
        let (ctx, token, tftp) = (ctx.clone(), shutdown.clone(), cfg.tftp.clone());
        tasks.spawn(async move { boot::serve_tftp(ctx, &tftp, socket, token).await.map_err(AppError::from) });
    }

    let router = boot::http_routes(ctx.clone());
    for ip in [iface.ip, Ipv4Addr::LOCALHOST] {
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, cfg.http.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Http { addr, source })?;
        let (router, token) = (router.clone(), shutdown.clone());
        tasks.spawn(async move {
            // Connect info: the boot routes log each client's address.
            axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .map_err(|source| AppError::Http { addr, source })
        });
    }

    info!(
        iface = %iface.name, ip = %iface.ip, net = %iface.net, dhcp = ?cfg.dhcp.mode,
        tftp = cfg.tftp.enable, http_port = cfg.http.port, "si-appliance ready"
    );

    let mut result = Ok(());
    tokio::select! {
        _ = shutdown_signal() => info!("signal received, shutting down"),
        Some(first) = tasks.join_next() => {
            result = flatten(first);
            if let Err(e) = &result { error!("service failed: {e:#}"); }
        }
    }
    shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        if let (Ok(()), Err(e)) = (&result, flatten(r)) {
            result = Err(e);
        }
    }
    result
}

fn flatten(r: Result<Result<(), AppError>, tokio::task::JoinError>) -> Result<(), AppError> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Ok(()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The node-token secret: 32 random bytes in `<state_dir>/secret`, created (mode 0600) on the
/// first start and kept, so tokens handed out before a restart stay valid.
fn load_or_create_secret(state_dir: &Path) -> Result<Vec<u8>, AppError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let st = |path: &Path| {
        let path = path.to_owned();
        move |source| AppError::State { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(st(state_dir))?;
    let path = state_dir.join("secret");
    match std::fs::read(&path) {
        Ok(b) if b.len() >= 32 => return Ok(b),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AppError::State { path, source: e }),
    }
    let secret: [u8; 32] = rand::random();
    let tmp = state_dir.join("secret.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(st(&tmp))?;
    f.write_all(&secret).and_then(|()| f.sync_all()).map_err(st(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(st(&path))?;
    Ok(secret.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_secret(dir.path()).unwrap();
        let b = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
    }
}
