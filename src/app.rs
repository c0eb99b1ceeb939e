//! The appliance role: resolves the interface, loads state, starts every service as a task
//! under one cancellation token and waits for a signal or the first failure. This is the only
//! place where the service modules meet.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

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
    /// The image-signing key or the initrd that carries it.
    #[error("image signing")]
    Sign(#[from] crate::image::sign::SignError),
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

/// How this machine booted, from sysfs (`efi` = `/sys/firmware/efi`): "BIOS", "UEFI", or
/// "UEFI, Secure Boot on" when the SecureBoot variable (4 attribute bytes, then the value) is 1.
fn own_firmware(efi: &std::path::Path) -> String {
    if !efi.is_dir() {
        return "BIOS".to_owned();
    }
    let var = efi.join("efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c");
    match std::fs::read(var) {
        Ok(b) if b.get(4) == Some(&1) => "UEFI, Secure Boot on".to_owned(),
        _ => "UEFI".to_owned(),
    }
}

/// The environment variable that says how the interface was chosen (set by the USB stick's
/// start script, shown on the dashboard and by `si-appliance status`).
pub const IFACE_CHOSEN_ENV: &str = "SI_IFACE_CHOSEN";

/// Runs the appliance until SIGINT/SIGTERM or the first service failure.
///
/// # Errors
/// The first error that stopped a service, or a start-up error.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    raise_open_file_limit();
    let iface_name = cfg.iface.clone().ok_or(AppError::NoIface)?;
    let iface = net::discover(&iface_name, cfg.server_ip)?;
    raise_neighbour_limits(&cfg, &iface);
    let secret = load_or_create_secret(&cfg.state_dir)?;
    // What the swarm serves: `swarm.archives` (file and --seed) and the default image's archive.
    let mut archives = cfg.swarm.archives.clone();
    if let Some(a) = pack_default_image(&cfg).await? {
        if !archives.contains(&a) {
            archives.push(a);
        }
    }
    // Before anything is served: a bad `<store>/<image>.layout.toml` stops start-up with its reason.
    let mut facts = cfg.image.as_ref().and_then(|i| archive_facts(&archives, i));
    let manifest = facts.as_ref().and_then(|f| f.manifest.clone());
    let signing = crate::image::sign::SigningKey::load_or_create(&cfg.state_dir)?;
    info!(public_key = %signing.public_hex(), "image signing key (its public half is in the nodes' initramfs)");
    let book = Arc::new(NodeBook::open(&cfg.state_dir, cfg.enroll, &cfg.dhcp.reservations)?);
    let token_path = cfg.state_dir.join(crate::nodes::http::ADMIN_TOKEN);
    let admin_token = crate::nodes::http::load_or_create_token(&cfg.state_dir)
        .map_err(|source| AppError::State { path: token_path.clone(), source })?;
    let admin = AdminAuth::new(admin_token.clone(), cfg.admin.trust_loopback);
    let cfg = Arc::new(cfg);
    let shutdown = CancellationToken::new();
    let mut tasks: JoinSet<Result<(), AppError>> = JoinSet::new();
    // MAC -> address as DHCP saw it: node scripts (tokens), plans and reports go only to it.
    let addrs = Arc::new(crate::types::addrs::ClientAddrs::default());
    // The monitor first: every service gets its event sink.
    let monitor = crate::monitor::Monitor::new(&cfg.monitor, secret.clone(), cfg.report_dir(), cfg.swarm.announce_interval);
    monitor.attach(book.clone(), manifest, admin.clone());
    // How the interface was chosen: the USB stick's start script picks one by itself and says
    // why in SI_IFACE_CHOSEN; otherwise it was named (--iface or `iface`).
    let chosen = std::env::var(IFACE_CHOSEN_ENV).ok().filter(|s| !s.trim().is_empty());
    let chosen = chosen.unwrap_or_else(|| "configured (--iface or `iface` in the config file)".to_owned());
    let firmware = own_firmware(std::path::Path::new("/sys/firmware/efi"));
    info!(iface = %iface.name, ip = %iface.ip, %chosen, %firmware, "provisioning interface");
    monitor.set_serving(crate::monitor::registry::Serving { iface: iface.name.clone(), ip: iface.ip, chosen, firmware });
    let events = monitor.sink();
    // The swarm first: its info-hashes go into the signed seal of every plan and boot script.
    let mut swarm_router = None;
    let mut publisher = None;
    if cfg.swarm.enable {
        let (router, hashes, p) = start_swarm(&cfg, &archives, &iface, &shutdown, &mut tasks, &events).await?;
        swarm_router = Some(router);
        publisher = Some(p);
        if let (Some(image), Some(f)) = (&cfg.image, facts.as_mut()) {
            f.seal = hashes.get(image).map(|ih| seal(&signing, image, ih, f.manifest.as_deref()));
        }
    }
    let seal = facts.as_ref().and_then(|f| f.seal.clone());
    let planner = crate::plan::Planner::new(&cfg, facts)?;
    let pack_overlay: crate::plan::http::OverlayPacker = Arc::new(|dir| crate::image::pack::plain_tar(dir).map_err(|e| format!("{e:#}")));
    let plan_api = crate::plan::http::PlanApi::new(planner, secret.clone(), book.clone()).with_store(cfg.store.clone(), pack_overlay);
    let bound = (cfg.dhcp.bind_nodes && cfg.dhcp.mode != DhcpMode::Off).then(|| addrs.clone());
    if let Some(a) = &bound {
        monitor.attach_addrs(a.clone());
    }
    let plan_api = Arc::new(plan_api.with_events(events.clone()).with_addrs(bound));
    // Updates of installed nodes to the image's tree as it is when ordered, over the swarm.
    let updates = match (&cfg.image, publisher) {
        (Some(image), Some(publisher)) => {
            let store = crate::image::store::Store::new(cfg.store.clone());
            let (planner, store_dir) = (plan_api.planner().clone(), cfg.store.clone());
            let profile_of: crate::update::serve::ProfileOf = Arc::new(move |g: &str| {
                planner.profile(g, crate::plan::overlay_dir(&store_dir, g).is_some_and(|d| d.is_dir()))
            });
            Some(Arc::new(crate::update::serve::UpdateService::new(
                store,
                image.clone(),
                publisher,
                book.clone(),
                plan_api.node_auth(),
                admin.clone(),
                cfg.install.update_poll.as_secs(),
                profile_of,
            )))
        }
        _ => None,
    };

    if cfg.dhcp.mode != DhcpMode::Off {
        // Probing and opening the lease journal happen before anything is served, so a refusal
        // (another DHCP server in full mode) stops start-up with its message. A restart does
        // the same again (replaying what was committed) and rebinds.
        let known = book.clone();
        let hooks = DhcpHooks { events: events.clone(), addrs: addrs.clone(), known: Arc::new(move |mac| known.get(mac).is_some()) };
        let server = start_dhcp(cfg.clone(), iface.clone(), hooks.clone()).await?;
        let token = shutdown.clone();
        let first = { let t = token.clone(); async move { server.run(t).await.map_err(AppError::from) } };
        let (cfg2, iface2) = (cfg.clone(), iface.clone());
        let again = move || {
            let (cfg, iface, hooks, t) = (cfg2.clone(), iface2.clone(), hooks.clone(), token.clone());
            async move { start_dhcp(cfg, iface, hooks).await?.run(t).await.map_err(AppError::from) }
        };
        tasks.spawn(supervise("dhcp", shutdown.clone(), first, again).instrument(info_span!("dhcp", iface = %iface.name)));
    }

    // IPv6 router advertisements spare iPXE its ~15 s wait for a router. Best effort: any
    // failure is logged and the appliance serves on without them.
    match net::ra::RouterAdvertiser::open(&iface) {
        Ok(Some(ra)) => {
            let token = shutdown.clone();
            tasks.spawn(
                async move {
                    ra.run(token).await;
                    Ok(())
                }
                .instrument(info_span!("ra")),
            );
        }
        Ok(None) => {}
        Err(e) => warn!("no IPv6 router advertisements: {e:#}"),
    }

    let mut ctx = BootContext::new(&cfg, &iface, secret, book.clone());
    ctx.events = events.clone();
    ctx.addrs = addrs.clone();
    ctx.seal = seal;
    ctx.initrd = initrd_with_key(&cfg, &ctx.initrd, &signing)?;
    let ctx = Arc::new(ctx);
    if cfg.tftp.enable {
        let addr = SocketAddrV4::new(iface.ip, cfg.tftp.port);
        let socket = net::udp_on(&iface.name, addr)?;
        let (ctx, token, tftp) = (ctx.clone(), shutdown.clone(), cfg.tftp.clone());
        let first = { let (ctx, t, tftp) = (ctx.clone(), token.clone(), tftp.clone()); async move { boot::serve_tftp(ctx, &tftp, socket, t).await.map_err(AppError::from) } };
        let name = iface.name.clone();
        let again = move || {
            let (ctx, t, tftp, name) = (ctx.clone(), token.clone(), tftp.clone(), name.clone());
            async move {
                let socket = net::udp_on(&name, addr)?;
                boot::serve_tftp(ctx, &tftp, socket, t).await.map_err(AppError::from)
            }
        };
        tasks.spawn(supervise("tftp", shutdown.clone(), first, again).instrument(info_span!("tftp", %addr)));
    }

    let mut router = boot::http_routes(ctx.clone());
    if let Some(r) = swarm_router {
        router = router.merge(r);
    }
    router = router.merge(monitor.routes());
    let observed: Arc<dyn crate::nodes::http::Observed> = monitor.shared();
    router = router.merge(crate::nodes::http::routes(book.clone(), admin, observed));
    {
        let token = shutdown.clone();
        tasks.spawn(
            async move {
                monitor.run(token).await;
                Ok(())
            }
            .instrument(info_span!("monitor")),
        );
    }
    router = router.merge(crate::plan::http::routes(plan_api));
    if let Some(u) = updates {
        router = router.merge(crate::update::serve::routes(u));
    }
    for ip in [iface.ip, Ipv4Addr::LOCALHOST] {
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, cfg.http.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Http { addr, source })?;
        let (router, token) = (router.clone(), shutdown.clone());
        let limits = crate::http_serve::Limits { max_connections: cfg.http.max_connections, header_timeout: cfg.http.header_timeout };
        tasks.spawn(
            async move {
                // Connect info: the boot routes log each client's address; the tracker needs it.
                crate::http_serve::serve(listener, router, limits, token).await;
                Ok(())
            }
            .instrument(info_span!("http", %addr)),
        );
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

    // Services do not stop each other: DHCP and TFTP are supervised (restarted with backoff);
    // any other task that ends is logged and the rest serve on. Only a signal stops the appliance.
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            // CANCEL-SAFETY: the signal future is pinned outside the loop; join_next is cancel-safe.
            _ = &mut signal => {
                info!("signal received, shutting down");
                break;
            }
            Some(done) = tasks.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!("a service stopped: {e:#}; the others serve on"),
                Err(e) if e.is_panic() => error!("a service panicked: {e}; the others serve on"),
                Err(_) => {}
            },
        }
    }
    shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Err(e)) => warn!("while shutting down: {e:#}"),
            Err(e) if e.is_panic() => warn!("while shutting down, a task panicked: {e}"),
            _ => {}
        }
    }
    Ok(())
}

/// Pauses between restarts of a failed service.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    /// The first pause; it doubles up to `max`.
    first: std::time::Duration,
    /// The longest pause.
    max: std::time::Duration,
    /// A run this long resets the pause to `first`.
    healthy: std::time::Duration,
}

/// 1 s doubling to 60 s, reset after 5 min of service.
const BACKOFF: Backoff = Backoff {
    first: std::time::Duration::from_secs(1),
    max: std::time::Duration::from_secs(60),
    healthy: std::time::Duration::from_secs(300),
};

async fn supervise<First, Again, F>(name: &'static str, shutdown: CancellationToken, first: First, again: F) -> Result<(), AppError>
where
    First: std::future::Future<Output = Result<(), AppError>> + Send + 'static,
    Again: std::future::Future<Output = Result<(), AppError>> + Send + 'static,
    F: FnMut() -> Again,
{
    supervise_with(name, shutdown, first, again, BACKOFF).await
}

/// Runs `first`, and whenever the service ends while the appliance is up (an error, a panic or
/// an early return), logs it loudly and starts `again()` after a pause (1 s doubling to 60 s;
/// back to 1 s after a run of 5 min), so one failing service (a journal on a full disk, a socket
/// error) never takes the others down and comes back by itself. Each run is its own task, so a
/// panic is caught here. Returns when `shutdown` is cancelled.
async fn supervise_with<First, Again, F>(
    name: &'static str,
    shutdown: CancellationToken,
    first: First,
    mut again: F,
    backoff: Backoff,
) -> Result<(), AppError>
where
    First: std::future::Future<Output = Result<(), AppError>> + Send + 'static,
    Again: std::future::Future<Output = Result<(), AppError>> + Send + 'static,
    F: FnMut() -> Again,
{
    // Each run is its own task (a panic is caught here) in the supervisor's span.
    let mut run = tokio::spawn(first.instrument(tracing::Span::current()));
    let mut pause = backoff.first;
    let mut restarts = 0u64;
    loop {
        let started = tokio::time::Instant::now();
        // CANCEL-SAFETY: on shutdown the run is given the same token and is awaited below.
        let ended = tokio::select! {
            r = &mut run => r,
            _ = shutdown.cancelled() => {
                let _ = (&mut run).await;
                return Ok(());
            }
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if started.elapsed() >= backoff.healthy {
            pause = backoff.first;
        }
        restarts += 1;
        match ended {
            Ok(Ok(())) => error!(service = name, restarts, "service ended on its own; starting it again in {pause:?}"),
            Ok(Err(e)) => error!(service = name, restarts, "service failed: {e:#}; starting it again in {pause:?}"),
            Err(e) => error!(service = name, restarts, "service panicked: {e}; starting it again in {pause:?}"),
        }
        tokio::select! {
            // CANCEL-SAFETY: a sleep carries no state.
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        pause = (pause * 2).min(backoff.max);
        run = tokio::spawn(again().instrument(tracing::Span::current()));
    }
}

/// The tracker, the seed of every served archive and their routes (`/announce`, `/scrape`,
/// `/torrents/<name>.torrent`, `/api/swarm`). The seed is registered in the tracker directly
/// and refreshed every announce interval; it stops (flushing fastresume state) on shutdown.
/// Packs the default image (`image` / `--image`) when its tree is in the store and changed since
/// the last pack (an unchanged tree costs a scan, not a repack), and returns its archive for the
/// swarm to serve, published under the image's name. The previous archive stays in place until
/// the new one is complete (the store writes to a temporary name and renames).
async fn pack_default_image(cfg: &Config) -> Result<Option<PathBuf>, AppError> {
    use crate::image::pack::PackOptions;
    use crate::image::store::{PackOutcome, Store, TreeKind};
    let Some(name) = cfg.image.clone() else { return Ok(None) };
    let store = Store::new(cfg.store.clone());
    if !store.tree_dir(TreeKind::Image, &name).is_dir() {
        let archive = store.archive(TreeKind::Image, &name);
        if archive.is_none() {
            warn!(image = %name, store = %cfg.store.display(), "image has no tree and no archive in the store");
        }
        return Ok(archive);
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
    Ok(Some(archive))
}

async fn start_swarm(
    cfg: &Config,
    archives: &[PathBuf],
    iface: &net::Iface,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<Result<(), AppError>>,
    events: &crate::types::events::EventSink,
) -> Result<(axum::Router, std::collections::BTreeMap<crate::types::ImageName, swarm::tracker::InfoHash>, Arc<swarm::publish::Publisher>), AppError> {
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
        expected_nodes: sw.expected_nodes as usize,
        max_peers: sw.max_peers as usize,
    };
    let tracker: SharedTracker = Arc::new(std::sync::Mutex::new(swarm::Tracker::new(policy)));
    let announce = format!("http://{}:{}/announce", iface.ip, cfg.http.port);
    let swarm_dir = cfg.state_dir.join("swarm");
    let mut served = BTreeMap::new();
    // One torrent builder for everything the appliance publishes: the image store's.
    let make: swarm::seed::TorrentMaker = Arc::new(|archive: &Path, name: &str, announce: &str| {
        crate::image::torrent::make(archive, name, announce).map(|t| t.bytes)
    });
    for a in archives {
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
    let served: swarm::api_http::ServedMap = Arc::new(std::sync::RwLock::new(served));
    let hashes_now = {
        let served = served.clone();
        move || served.read().unwrap_or_else(|e| e.into_inner()).values().map(|s| (s.info_hash, s.size)).collect::<Vec<_>>()
    };
    if let Some(seed) = seed.clone() {
        // The seed's upload counter for the monitor (seed upload share, the aggregate chart).
        let (token, events, every) = (shutdown.clone(), events.clone(), cfg.monitor.sample_interval);
        let seed = seed.clone();
        let hashes_now = hashes_now.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    // CANCEL-SAFETY: interval ticks and cancellation carry no state.
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let hashes = hashes_now();
                        let archive_size = hashes.iter().map(|h| h.1).max().unwrap_or(0);
                        let uploaded = hashes.iter().filter_map(|(ih, _)| seed.stats(ih)).map(|s| s.uploaded_bytes).sum();
                        events.send(crate::types::events::NodeEvent::Seed { uploaded, archive_size });
                    }
                }
            }
            Ok(())
        }.instrument(info_span!("seed-stats")));
    }
    if let Some(seed) = seed.clone() {
        let (token, tracker, interval) = (shutdown.clone(), tracker.clone(), sw.announce_interval);
        let hashes_now = hashes_now.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    // CANCEL-SAFETY: interval ticks and cancellation carry no state.
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        // Every served archive, those published since the start (updates) too.
                        let hashes = hashes_now();
                        let mut t = tracker.lock().unwrap_or_else(|e| e.into_inner());
                        for (ih, _) in &hashes {
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
        }.instrument(info_span!("seed-refresh", seed = %seed_addr)));
    }
    let (n, hashes) = {
        let m = served.read().unwrap_or_else(|e| e.into_inner());
        (m.len(), m.values().map(|s| (s.name.clone(), s.info_hash)).collect())
    };
    info!(archives = n, %announce, seed = %seed_addr, "swarm ready");
    let client_seed_limit_secs = sw.client_seed_limit.as_secs();
    let (expected_nodes, seed_peers) = (sw.expected_nodes, sw.seed_peers);
    let publisher = Arc::new(swarm::publish::Publisher {
        served: served.clone(),
        seed: seed.clone(),
        tracker: tracker.clone(),
        seed_addr,
        announce: announce.clone(),
        cache_dir: swarm_dir.join("torrents"),
        make: make.clone(),
    });
    let api =
        Arc::new(SwarmApi { served, tracker: tracker.clone(), seed, seed_addr, client_seed_limit_secs, expected_nodes, seed_peers });
    Ok((swarm::tracker_http::routes(tracker, events.clone()).merge(swarm::api_http::routes(api)), hashes, publisher))
}

/// What the DHCP service reports to and asks of the rest of the appliance.
#[derive(Clone)]
struct DhcpHooks {
    events: crate::types::events::EventSink,
    addrs: Arc<crate::types::addrs::ClientAddrs>,
    known: dhcp::service::KnownNodes,
}

/// Starts the DHCP server (probe, journal replay, sockets) and wires it to the appliance.
async fn start_dhcp(cfg: Arc<Config>, iface: net::Iface, hooks: DhcpHooks) -> Result<dhcp::DhcpServer, AppError> {
    let mut server = dhcp::DhcpServer::start(cfg, iface).await?;
    server.set_events(hooks.events);
    server.set_addrs(hooks.addrs);
    server.set_known(hooks.known);
    Ok(server)
}

/// What the planner needs of the served archive named `image` among `archives` (named by file
/// name less `.tar.zst`, as the swarm publishes them): its size and its manifest
/// (`NAME.manifest` next to it). The swarm's naming and the manifest reader meet here, not in
/// the planner.
fn archive_facts(archives: &[PathBuf], image: &crate::types::ImageName) -> Option<crate::plan::ArchiveFacts> {
    let archive = archives.iter().find(|a| swarm::seed::name_of(a).ok().as_ref() == Some(image))?;
    let size = std::fs::metadata(archive).ok()?.len();
    let file = archive.with_file_name(format!("{image}.manifest"));
    let (unpacked, manifest, manifest_file) = match crate::image::manifest::Manifest::load(&file) {
        Ok(m) => (m.file_bytes(), Some(m.digest()), Some(file)),
        Err(e) => {
            warn!(manifest = %file.display(), "no manifest: the plan has no unpacked size and nodes cannot verify the unpacked tree: {e:#}");
            (0, None, None)
        }
    };
    Some(crate::plan::ArchiveFacts { size, unpacked, manifest, manifest_file, seal: None })
}

/// The signed seal of the served image.
fn seal(key: &crate::image::sign::SigningKey, image: &crate::types::ImageName, ih: &swarm::tracker::InfoHash, manifest: Option<&str>) -> crate::types::node_api::ImageSeal {
    let info_hash = ih.to_string();
    let st = crate::image::sign::Statement { image: image.as_str(), info_hash: &info_hash, manifest };
    let signature = key.sign(&st);
    info!(image = %image, %info_hash, manifest = manifest.unwrap_or("none"), "image sealed: nodes check this signature, info-hash and manifest");
    crate::types::node_api::ImageSeal { info_hash, manifest_sha256: manifest.map(str::to_owned), signature }
}

/// The initrd the nodes get: the configured one with the image-signing public key appended as
/// a second cpio archive, written to `<state_dir>/boot/initrd.img` at every start. A missing
/// configured initrd stays missing (the boot services say so).
fn initrd_with_key(cfg: &Config, base: &Path, key: &crate::image::sign::SigningKey) -> Result<PathBuf, AppError> {
    if !base.is_file() {
        return Ok(base.to_owned());
    }
    let dest = cfg.state_dir.join("boot").join(crate::boot::BootFile::INITRD);
    let bytes = crate::image::sign::write_initrd_with_key(base, &dest, &key.public_hex())?;
    info!(initrd = %dest.display(), base = %base.display(), bytes, "initrd with the image-signing key");
    Ok(dest)
}

/// Room in the machine's ARP/NDP tables for every node of the segment (see [`net::neigh`]): a
/// failure is logged and start-up goes on (the defaults serve a few hundred nodes).
fn raise_neighbour_limits(cfg: &Config, iface: &net::Iface) {
    let hosts = crate::dhcp::policy::Policy::new(cfg, iface).on_link_hosts();
    if hosts == 0 {
        return;
    }
    if let Err(e) = net::neigh::raise(hosts) {
        warn!(hosts, "cannot raise the neighbour-table limits ({e}): beyond about 1000 nodes on this link, some will not be reached (neighbour table overflow)");
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
    // CANCEL-SAFETY: whichever signal comes first ends the wait; the other listener is dropped
    // with nothing pending.
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The node-token secret: 32 random bytes in `<state_dir>/secret`, created (mode 0600) on the
/// first start and kept, so tokens handed out before a restart stay valid.
fn load_or_create_secret(state_dir: &Path) -> Result<Vec<u8>, AppError> {
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
    crate::private_file::write(&path, &secret).map_err(|(path, source)| AppError::State { path, source })?;
    Ok(secret.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_firmware_reads_the_secure_boot_variable() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(own_firmware(&d.path().join("absent")), "BIOS");
        let efi = d.path().join("efi");
        std::fs::create_dir_all(efi.join("efivars")).unwrap();
        assert_eq!(own_firmware(&efi), "UEFI");
        let var = efi.join("efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c");
        std::fs::write(&var, [6, 0, 0, 0, 0]).unwrap();
        assert_eq!(own_firmware(&efi), "UEFI");
        std::fs::write(&var, [6, 0, 0, 0, 1]).unwrap();
        assert_eq!(own_firmware(&efi), "UEFI, Secure Boot on");
    }

    #[tokio::test]
    async fn a_failing_or_panicking_service_is_started_again_until_shutdown() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let starts = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let (s, t) = (starts.clone(), shutdown.clone());
        // Run 1 fails, run 2 panics, run 3 returns early, run 4 serves until shutdown.
        let service = move || {
            let (s, t) = (s.clone(), t.clone());
            async move {
                match s.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(AppError::NoIface),
                    1 => panic!("a bug in a service"),
                    2 => Ok(()),
                    _ => {
                        t.cancelled().await;
                        Ok(())
                    }
                }
            }
        };
        let first = service.clone();
        let ms = std::time::Duration::from_millis;
        let backoff = Backoff { first: ms(10), max: ms(40), healthy: ms(60_000) };
        let sup = tokio::spawn(supervise_with("test", shutdown.clone(), first(), service, backoff));
        // Pauses of 10, 20 and 40 ms: the fourth run starts within a bounded wait.
        for _ in 0..500 {
            if starts.load(Ordering::SeqCst) >= 4 {
                break;
            }
            tokio::time::sleep(ms(10)).await;
        }
        tokio::time::sleep(ms(100)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 4, "three restarts, then it keeps serving");
        assert!(!sup.is_finished());
        shutdown.cancel();
        sup.await.unwrap().unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn secret_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_secret(dir.path()).unwrap();
        let b = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
    }
}
