//! DHCP and PXE: the pure policy (`decide`), the lease journal, and the service loop for full
//! and proxyDHCP modes. See LEASES.md beside this file for the journal's crash rules.
//!
//! # Layout
//! - `classify`: bytes → validated `Request` → `Client` (boot stage, architecture).
//! - `policy`: `decide(request, via, leases, policy, now) -> Decision`: pure, table-tested.
//! - `leases`: the in-memory table and the append-only, fsync'd journal.
//! - `service`: the thin socket loop (group commit, RFC 2131 §4.1 delivery).
//! - `guard`: the new-client limiter (token buckets per relay) of the starvation guard.
//! - `probe`: the start-up check for other DHCP servers. `arp`: SIOCSARP injection.
//!
//! This module must not touch sockets inside the policy, nor import other service modules.

pub mod arp;
pub mod classify;
pub mod error;
pub mod guard;
pub mod leases;
pub mod policy;
pub mod probe;
pub mod service;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, DhcpMode};
use crate::net::{self, Iface};
pub use error::DhcpError;

/// The DHCP service: probed, lease store opened, sockets bound.
pub struct DhcpServer {
    service: service::Service,
    /// The interface and period of the watch for foreign servers (full mode, `dhcp.watch_every`).
    watch: Option<(Iface, Duration, Duration)>,
}

/// Receive buffer asked for: a burst of PXE clients powering on together (or a relay flushing
/// its queue) arrives while a batch is being fsync'd; the default ~200 KiB holds a few hundred
/// packets only.
const RCVBUF: usize = 4 << 20;

fn tokio_sock(iface: &Iface, port: u16) -> Result<tokio::net::UdpSocket, DhcpError> {
    let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let s = net::udp_on(&iface.name, addr)?;
    grow_rcvbuf(&s);
    tokio::net::UdpSocket::from_std(s).map_err(|source| DhcpError::Register { addr: SocketAddr::V4(addr), source })
}

/// SO_RCVBUFFORCE (root may exceed net.core.rmem_max), else SO_RCVBUF; failure only costs
/// drops under bursts, so it is logged, not fatal.
fn grow_rcvbuf(s: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let v = RCVBUF as libc::c_int;
    // SAFETY: a valid descriptor, a c_int option value that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        if let Err(e) = socket2::SockRef::from(s).set_recv_buffer_size(RCVBUF) {
            tracing::warn!("cannot grow the DHCP receive buffer: {e}");
        }
    }
}

impl DhcpServer {
    /// Probes the segment (full mode), opens the lease journal and binds the sockets.
    ///
    /// # Errors
    /// [`DhcpError::OtherServer`] (another DHCP server answers in full mode), a journal or
    /// socket error.
    pub async fn start(cfg: Arc<Config>, iface: Iface) -> Result<DhcpServer, DhcpError> {
        let mut policy = policy::Policy::new(&cfg, &iface);
        // Offer only loaders that exist: a client offered a missing one fails with a TFTP
        // error and nothing in our log.
        let dirs = cfg.boot.loader_dirs.clone();
        let (served, missing) = tokio::task::spawn_blocking(move || crate::boot::file::available_loaders(&dirs))
            .await
            .unwrap_or_else(|_| (Vec::new(), crate::types::Loader::ALL.to_vec()));
        let archs = |ls: &[crate::types::Loader]| {
            use crate::types::Loader as L;
            let arch = |l: &L| match l {
                L::Undionly | L::Pxelinux => "x86 BIOS",
                L::IpxeEfi | L::SnpOnly => "x86-64 UEFI",
                L::IpxeArm64Efi => "ARM64 UEFI",
            };
            ls.iter().map(|l| format!("{} ({})", l.tftp_name(), arch(l))).collect::<Vec<_>>().join(", ")
        };
        info!(loaders = %archs(&served), "boot loaders served");
        if !missing.is_empty() {
            tracing::warn!(loaders = %archs(&missing), dirs = ?cfg.boot.loader_dirs, "boot loaders missing: clients that need them are not offered a boot file");
        }
        policy.missing_loaders = missing;
        let full = cfg.dhcp.mode == DhcpMode::Full;
        if full && cfg.dhcp.probe {
            info!(iface = %iface.name, "probing for other DHCP servers");
            let offers = probe::probe(&iface, cfg.dhcp.probe_timeout).await?;
            if !offers.is_empty() {
                return Err(DhcpError::OtherServer { iface: iface.name.clone(), offers });
            }
            let listened = cfg.dhcp.probe_timeout.max(probe::MIN_LISTEN);
            info!(iface = %iface.name, ?listened, "probe: no other DHCP server answered");
        }
        let (journal, leases) = if full {
            let (j, l, rep) = leases::Journal::open(&cfg.state_dir, service::unix_now())?;
            info!(
                path = %j.path().display(), leases = l.len(), records = rep.records,
                dropped_bytes = rep.dropped_bytes, "lease journal replayed"
            );
            if let Some(aside) = &rep.kept_aside {
                let lost: usize = rep.damaged.iter().map(|(_, n)| n).sum();
                warn!(
                    path = %j.path().display(), kept = %aside.display(), stretches = rep.damaged.len(), lost_bytes = lost,
                    "LEASE JOURNAL DAMAGED: replay skipped damaged records and recovered every good record after them; \
                     the damaged file is kept; leases in the damaged stretches are lost (their clients will be NAK'd or get \
                     a new address at renewal)"
                );
            }
            (Some(j), l)
        } else {
            (None, leases::Leases::new())
        };
        let sock = tokio_sock(&iface, 67)?;
        let pxe_sock = if cfg.dhcp.mode == DhcpMode::Proxy { Some(tokio_sock(&iface, 4011)?) } else { None };
        for p in &policy.pools {
            info!(subnet = %p.subnet, first = %p.first, last = %p.last, "dhcp pool");
        }
        info!(mode = ?cfg.dhcp.mode, answer = ?cfg.dhcp.answer, iface = %iface.name, "dhcp serving");
        let mut service = service::Service::new(policy, leases, journal, iface.name.clone(), sock, pxe_sock);
        let limiter =
            guard::Limiter::for_deployment(cfg.dhcp.new_client_rate, cfg.dhcp.new_client_burst, cfg.swarm.expected_nodes);
        let burst = limiter.burst();
        service.set_limiter(limiter);
        info!(
            new_client_rate = cfg.dhcp.new_client_rate, new_client_burst = burst,
            expected_nodes = cfg.swarm.expected_nodes,
            known_reserve_percent = cfg.dhcp.known_reserve_percent, "dhcp starvation guard"
        );
        let every = cfg.dhcp.watch_every;
        let watch = (full && !every.is_zero()).then(|| (iface, every, cfg.dhcp.probe_timeout));
        Ok(DhcpServer { service, watch })
    }

    /// Records each client's address (lease, or ciaddr in proxy mode) in `addrs`, where the
    /// boot services check who may fetch a node's script.
    /// The leases kept over a restart are recorded at once.
    pub fn set_addrs(&mut self, addrs: std::sync::Arc<crate::types::addrs::ClientAddrs>) {
        for l in self.service.leases.iter().filter(|l| l.state == leases::LeaseState::Bound) {
            addrs.note(l.mac, l.ip);
        }
        self.service.addrs = addrs;
    }

    /// Tells the starvation guard which MACs are enrolled nodes (the node book): they are
    /// exempt from the new-client limiter and may take the addresses held back for known nodes.
    pub fn set_known(&mut self, known: service::KnownNodes) {
        self.service.known = known;
    }

    /// Reports every answered client to the monitor through `events` (default: nowhere).
    pub fn set_events(&mut self, events: crate::types::events::EventSink) {
        self.service.events = events;
    }

    /// Serves until `shutdown`.
    ///
    /// # Errors
    /// A journal write failure or a socket failure that cannot be recovered from.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DhcpError> {
        let Some((iface, every, listen)) = self.watch else { return self.service.run(shutdown).await };
        let stop = shutdown.clone();
        let events = self.service.events.clone();
        let (served, ()) = tokio::join!(self.service.run(shutdown), watch(iface, every, listen, events, stop));
        served
    }
}

/// How often one foreign server is warned about while it keeps answering.
const WARN_AGAIN: Duration = Duration::from_secs(3600);

/// Probes the segment every `every` (the start-up probe's DISCOVER, from the appliance's own
/// MAC, which our service ignores) and logs a WARN line for each foreign server that answers:
/// on a production switch a DHCP server plugged in after start hands out addresses next to
/// ours. Each server is named again after [`WARN_AGAIN`] if it is still there, and its
/// disappearance is logged. Every sighting also goes to the monitor (`/api/deployment`
/// `foreign_dhcp_servers`): one event per server per watch. Ends with `shutdown`.
async fn watch(iface: Iface, every: Duration, listen: Duration, events: crate::types::events::EventSink, shutdown: CancellationToken) {
    let mut warned: std::collections::HashMap<Ipv4Addr, tokio::time::Instant> = std::collections::HashMap::new();
    let mut bind_warned = false;
    // The first look soon after start (the start-up probe may be off), then every `every`.
    let mut next = tokio::time::Instant::now() + Duration::from_secs(10).min(every);
    loop {
        // CANCEL-SAFETY: a sleep or a probe in progress is dropped whole; the probe's socket
        // closes with it and nothing is half-done.
        let offers = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = async {
                tokio::time::sleep_until(next).await;
                probe::probe(&iface, listen).await
            } => r,
        };
        next = tokio::time::Instant::now() + every;
        let offers = match offers {
            Ok(o) => o,
            Err(e) => {
                if !bind_warned {
                    warn!(iface = %iface.name, "cannot watch for foreign DHCP servers: {e:#}");
                    bind_warned = true;
                }
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        let seen: Vec<_> = offers.into_iter().filter(|o| o.from != iface.ip && o.server_id != Some(iface.ip)).collect();
        for o in &seen {
            let server = o.server_id.unwrap_or(o.from);
            events.send(crate::types::events::NodeEvent::ForeignDhcp { server, offered: o.offered });
            if warned.get(&server).is_none_or(|t| now.duration_since(*t) >= WARN_AGAIN) {
                warn!(
                    iface = %iface.name, %server, offered = %o.offered,
                    "foreign DHCP server {o} answers on this segment: its clients get addresses and boot \
                     settings that are not ours"
                );
                warned.insert(server, now);
            }
        }
        warned.retain(|server, _| {
            let here = seen.iter().any(|o| o.server_id.unwrap_or(o.from) == *server);
            if !here {
                info!(iface = %iface.name, %server, "foreign DHCP server no longer answers");
            }
            here
        });
    }
}
