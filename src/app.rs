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
use crate::nodes::NodeBook;
use crate::nodes::http::AdminAuth;
use crate::swarm::{self, api_http::SwarmApi, seed::{Seed, SeedError, SeedOptions}, tracker_http::SharedTracker};

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
    /// The swarm (torrents, seed) could not start.
    #[error("swarm")]
    Swarm(#[from] SeedError),
    /// Packing the default image at start failed.
    #[error("image store")]
    Image(#[from] crate::image::ImageError),
    /// The node book could not be opened.
    #[error("node book")]
    Nodes(#[from] crate::nodes::NodesError),
    /// The node plans cannot be served (an invalid disk layout file).
    #[error("node plans")]
    Plan(#[from] crate::plan::PlanError),
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
    raise_open_file_limit();
    let iface_name = cfg.iface.clone().ok_or(AppError::NoIface)?;
    let iface = net::discover(&iface_name, cfg.server_ip)?;
    let secret = load_or_create_secret(&cfg.state_dir)?;
    let mut cfg = cfg;
    pack_default_image(&mut cfg).await?;
    // Before anything is served: a bad `<store>/<image>.layout.toml` stops start-up with its reason.
    let facts = cfg.image.as_ref().and_then(|i| crate::plan::archive_facts(&cfg.swarm.archives, i));
    let manifest = facts.as_ref().and_then(|f| f.manifest.clone());
    let book = Arc::new(NodeBook::open(&cfg.state_dir, cfg.enroll, &cfg.dhcp.reservations)?);
    let token_path = cfg.state_dir.join(crate::nodes::http::ADMIN_TOKEN);
    let admin_token = crate::nodes::http::load_or_create_token(&cfg.state_dir)
        .map_err(|source| AppError::State { path: token_path.clone(), source })?;
    let admin = AdminAuth::new(admin_token.clone(), cfg.admin.trust_loopback);
    let plan_api = crate::plan::PlanApi::new(&cfg, secret.clone(), facts, book.clone())?;
    let cfg = Arc::new(cfg);
    let shutdown = CancellationToken::new();
    let mut tasks: JoinSet<Result<(), AppError>> = JoinSet::new();
    // MAC -> address as DHCP saw it: node scripts (tokens), plans and reports go only to it.
    let addrs = Arc::new(crate::types::addrs::ClientAddrs::default());
    // The monitor first: every service gets its event sink.
    let monitor = crate::monitor::Monitor::new(&cfg.monitor, secret.clone(), cfg.report_dir(), cfg.swarm.announce_interval);
    monitor.attach(book.clone(), manifest, admin.clone());
    let events = monitor.sink();
    let bound = (cfg.dhcp.bind_nodes && cfg.dhcp.mode != DhcpMode::Off).then(|| addrs.clone());
    if let Some(a) = &bound {
        monitor.attach_addrs(a.clone());
    }
    let plan_api = Arc::new(plan_api.with_events(events.clone()).with_addrs(bound));

    if cfg.dhcp.mode != DhcpMode::Off {
        // Probing and opening the lease journal happen before anything is served, so a refusal
        // (another DHCP server in full mode) stops start-up with its message.
        let mut server = dhcp::DhcpServer::start(cfg.clone(), iface.clone()).await?;
        server.set_events(events.clone());
        server.set_addrs(addrs.clone());
        let known = book.clone();
        server.set_known(Arc::new(move |mac| known.get(mac).is_some()));
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

    let mut ctx = BootContext::new(&cfg, &iface, secret, book.clone());
    ctx.events = events.clone();
    ctx.addrs = addrs.clone();
    let ctx = Arc::new(ctx);
    if cfg.tftp.enable {
        let addr = SocketAddrV4::new(iface.ip, cfg.tftp.port);
        let socket = net::udp_on(&iface.name, addr)?;
        let (ctx, token, tftp) = (ctx.clone(), shutdown.clone(), cfg.tftp.clone());
        tasks.spawn(async move { boot::serve_tftp(ctx, &tftp, socket, token).await.map_err(AppError::from) });
    }

    let mut router = boot::http_routes(ctx.clone());
    if cfg.swarm.enable {
        router = router.merge(start_swarm(&cfg, &iface, &shutdown, &mut tasks, &events).await?);
    }
    router = router.merge(monitor.routes());
    let observed: Arc<dyn crate::nodes::http::Observed> = monitor.shared();
    router = router.merge(crate::nodes::http::routes(book.clone(), admin, observed));
    {
        let token = shutdown.clone();
        tasks.spawn(async move {
            monitor.run(token).await;
            Ok(())
        });
    }
    router = router.merge(crate::plan::routes(plan_api));
    for ip in [iface.ip, Ipv4Addr::LOCALHOST] {
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, cfg.http.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Http { addr, source })?;
        let (router, token) = (router.clone(), shutdown.clone());
        let limits = crate::http_serve::Limits { max_connections: cfg.http.max_connections, header_timeout: cfg.http.header_timeout };
        tasks.spawn(async move {
            // Connect info: the boot routes log each client's address; the tracker needs it.
            crate::http_serve::serve(listener, router, limits, token).await;
            Ok(())
        });
    }

    info!(
        iface = %iface.name, ip = %iface.ip, net = %iface.net, dhcp = ?cfg.dhcp.mode,
        tftp = cfg.tftp.enable, http_port = cfg.http.port, enroll = ?cfg.enroll, "si-appliance ready"
    );
    let port = if cfg.http.port == 80 { String::new() } else { format!(":{}", cfg.http.port) };
    info!(
        token = %token_path.display(),
        "admin: `si-appliance node ...` reads the admin token; dashboard with admin actions: http://{}{port}/dashboard#admin={admin_token}",
        iface.ip
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

/// The tracker, the seed of every served archive and their routes (`/announce`, `/scrape`,
/// `/torrents/<name>.torrent`, `/api/swarm`). The seed is registered in the tracker directly
/// and refreshed every announce interval; it stops (flushing fastresume state) on shutdown.
/// Packs the default image (`image` / `--image`) when its tree is in the store and changed since
/// the last pack (an unchanged tree costs a scan, not a repack), and adds its archive to what the
/// swarm serves, published under the image's name. The previous archive stays in place until the
/// new one is complete (the store writes to a temporary name and renames).
async fn pack_default_image(cfg: &mut Config) -> Result<(), AppError> {
    use crate::image::pack::PackOptions;
    use crate::image::store::{PackOutcome, Store, TreeKind};
    let Some(name) = cfg.image.clone() else { return Ok(()) };
    let store = Store::new(cfg.store.clone());
    if !store.tree_dir(TreeKind::Image, &name).is_dir() {
        match store.archive(TreeKind::Image, &name) {
            Some(a) => add_archive(cfg, a),
            None => warn!(image = %name, store = %cfg.store.display(), "image has no tree and no archive in the store"),
        }
        return Ok(());
    }
    let outcome = tokio::task::spawn_blocking(move || store.pack(TreeKind::Image, &name, &PackOptions::default(), None, false))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .map_err(|source| AppError::State { path: cfg.store.clone(), source })??;
    let archive = match outcome {
        PackOutcome::Packed { archive, bytes, entries } => {
            info!(archive = %archive.display(), bytes, entries, "image packed");
            archive
        }
        PackOutcome::Unchanged { archive } => archive,
    };
    add_archive(cfg, archive);
    Ok(())
}

fn add_archive(cfg: &mut Config, archive: PathBuf) {
    if !cfg.swarm.archives.contains(&archive) {
        cfg.swarm.archives.push(archive);
    }
}

async fn start_swarm(
    cfg: &Config,
    iface: &net::Iface,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<Result<(), AppError>>,
    events: &crate::types::events::EventSink,
) -> Result<axum::Router, AppError> {
    use std::collections::BTreeMap;
    let sw = &cfg.swarm;
    let mut subnets = vec![iface.net];
    subnets.extend(cfg.dhcp.pools.iter().map(|p| p.subnet));
    let policy = swarm::TrackerPolicy {
        subnets,
        interval: sw.announce_interval,
        peer_timeout: sw.peer_timeout,
        appliance_seed: Some(SocketAddrV4::new(iface.ip, sw.listen_port)),
        seed_peers: sw.seed_peers as usize,
        join_delay: sw.join_delay,
        max_peers: sw.max_peers as usize,
    };
    let tracker: SharedTracker = Arc::new(std::sync::Mutex::new(swarm::Tracker::new(policy)));
    let announce = format!("http://{}:{}/announce", iface.ip, cfg.http.port);
    let swarm_dir = cfg.state_dir.join("swarm");
    let mut served = BTreeMap::new();
    // One torrent builder for everything the appliance publishes: the image store's.
    let make: swarm::seed::TorrentMaker = Arc::new(|archive: &Path, name: &str, announce: &str| {
        crate::image::torrent::make(archive, name, announce).map(|t| t.bytes).map_err(|e| format!("{e:#}"))
    });
    for a in &sw.archives {
        let s = swarm::seed::prepare(a, &announce, &swarm_dir.join("torrents"), &make).await?;
        if served.contains_key(&s.name) {
            return Err(SeedError::DuplicateName(s.name).into());
        }
        tracker.lock().unwrap_or_else(|e| e.into_inner()).register(s.info_hash);
        served.insert(s.name.clone(), s);
    }
    let seed_addr = SocketAddrV4::new(iface.ip, sw.listen_port);
    let seed = if served.is_empty() {
        None
    } else {
        let opts = SeedOptions {
            iface: iface.name.clone(),
            listen: seed_addr,
            session_dir: swarm_dir.join("session"),
            fastresume: sw.fastresume,
            upload_bps: std::num::NonZeroU32::new(sw.upload_limit),
        };
        let list: Vec<_> = served.values().cloned().collect();
        let seed = Seed::start(&opts, &list, shutdown).await?;
        swarm::seed::restamp(&list, &announce, &swarm_dir.join("torrents"))?;
        Some(Arc::new(seed))
    };
    if let Some(seed) = seed.clone() {
        // The seed's upload counter for the monitor (seed upload share, the aggregate chart).
        let (token, events, every) = (shutdown.clone(), events.clone(), cfg.monitor.sample_interval);
        let hashes: Vec<_> = served.values().map(|s| s.info_hash).collect();
        let archive_size = served.values().map(|s| s.size).max().unwrap_or(0);
        let seed = seed.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    // CANCEL-SAFETY: interval ticks and cancellation carry no state.
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let uploaded = hashes.iter().filter_map(|ih| seed.stats(ih)).map(|s| s.uploaded_bytes).sum();
                        events.send(crate::types::events::NodeEvent::Seed { uploaded, archive_size });
                    }
                }
            }
            Ok(())
        });
    }
    if let Some(seed) = seed.clone() {
        let (token, tracker, interval) = (shutdown.clone(), tracker.clone(), sw.announce_interval);
        let hashes: Vec<_> = served.values().map(|s| s.info_hash).collect();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    // CANCEL-SAFETY: interval ticks and cancellation carry no state.
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
                        for ih in &hashes {
                            let a = swarm::seed::seed_announce(*ih, seed_addr);
                            if let Err(why) = t.announce(&a, std::time::Instant::now(), &mut rand::rng()) {
                                error!(%ih, "registering the seed in the tracker: {why}");
                            }
                        }
                    }
                }
            }
            seed.stop().await;
            Ok(())
        });
    }
    info!(archives = served.len(), %announce, seed = %seed_addr, "swarm ready");
    let client_seed_limit_secs = sw.client_seed_limit.as_secs();
    let (expected_nodes, seed_peers) = (sw.expected_nodes, sw.seed_peers);
    let api =
        Arc::new(SwarmApi { served, tracker: tracker.clone(), seed, seed_addr, client_seed_limit_secs, expected_nodes, seed_peers });
    Ok(swarm::tracker_http::routes(tracker, events.clone()).merge(swarm::api_http::routes(api)))
}

fn flatten(r: Result<Result<(), AppError>, tokio::task::JoinError>) -> Result<(), AppError> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Ok(()),
    }
}

/// Raises the soft limit of open files to the hard limit: a systemd unit's default soft limit
/// (1024) is reached by a thousand idle HTTP connections, after which accepts and TFTP
/// transfers fail with EMFILE.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read the one struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        warn!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        return;
    }
    let was = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            warn!(soft = was, hard = lim.rlim_max, "cannot raise the open-file limit: {}", std::io::Error::last_os_error());
            return;
        }
    }
    info!(was, now = lim.rlim_cur, "open-file limit");
}

/// Resolves on SIGINT or SIGTERM (also used by `si-appliance fetch`).
pub async fn shutdown_signal() {
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
