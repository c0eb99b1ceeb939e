//! The monitor: a node registry fed by the serving paths' [`NodeEvent`]s and the installers'
//! reports, and what shows it — the JSON API, server-sent events, Prometheus `/metrics`, the
//! dashboard, a terminal summary and the end-of-run report.
//!
//! It must never block a serving path: services only `try_send` into a bounded queue
//! ([`EventSink`]); one registry task owns the state and applies events in batches; HTTP
//! handlers read it under a short lock; SSE subscribers that fall behind skip events
//! (tokio broadcast lag), they do not slow the registry.
//!
//! [`NodeEvent`]: crate::types::events::NodeEvent

pub mod client;
pub mod http;
mod metrics;
pub mod node;
pub mod registry;
pub mod report;
pub(crate) mod terminal;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::MonitorConfig;
use crate::types::events::{EventSink, SinkStats, Stamped};
use registry::{Registry, now_ms};

/// Errors of the monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Writing the report failed.
    #[error(transparent)]
    Report(#[from] report::ReportError),
    /// Talking to a running appliance (`status`, `report`) failed.
    #[error(transparent)]
    Client(#[from] client::ClientError),
    /// Another report is being written (one at a time: each is a blocking job that writes every
    /// node's JSON and charts on the disk that also holds the lease journal).
    #[error("a report is being written; ask again when it is done")]
    ReportBusy,
}

/// SSE messages buffered per subscriber before it lags (and skips).
const SSE_BUFFER: usize = 4096;
/// Events applied per registry lock.
const BATCH: usize = 512;

/// What the HTTP handlers and the registry task share.
#[derive(Debug)]
pub struct Shared {
    registry: Mutex<Registry>,
    sink_stats: Arc<SinkStats>,
    /// Installer reports refused.
    rejected: AtomicU64,
    /// `(event name, JSON)` pushed to SSE subscribers.
    pub(crate) updates: broadcast::Sender<(&'static str, Arc<str>)>,
    /// Node-token secret (installer reports).
    secret: Vec<u8>,
    /// Where reports go.
    report_dir: PathBuf,
    /// The sink services send to (reports from the HTTP route go through it too).
    sink: EventSink,
    /// Cancelled when the registry task ends: SSE streams close, so the HTTP server can stop.
    closing: CancellationToken,
    /// The node book and the served image's manifest digest (attached by app.rs): final
    /// reports (seeding, done, failed) change the node's record.
    book: std::sync::OnceLock<(Arc<crate::nodes::NodeBook>, Option<String>)>,
    /// The admin credential `POST /api/report` wants (attached by app.rs).
    admin: std::sync::OnceLock<crate::nodes::http::AdminAuth>,
    /// Held while a report is written: one at a time.
    writing: tokio::sync::Mutex<()>,
    /// MAC -> address as our DHCP saw it (attached by app.rs unless `dhcp.mode = "off"`):
    /// reports are bound to it.
    addrs: std::sync::OnceLock<Arc<crate::types::addrs::ClientAddrs>>,
    /// The interface served on and why (attached by app.rs).
    serving: std::sync::OnceLock<registry::Serving>,
}

impl crate::nodes::http::Observed for Shared {
    fn discovered(&self) -> Vec<crate::nodes::http::Discovered> {
        self.lock()
            .nodes()
            .filter(|n| n.enrolment == crate::types::events::Enrolment::Discovered)
            .map(|n| crate::nodes::http::Discovered {
                mac: n.mac,
                ip: n.ip,
                arch: n.arch.clone(),
                vendor_class: n.vendor_class.clone(),
                first_seen_ms: n.first_seen_ms,
                last_seen_ms: n.last_seen_ms,
            })
            .collect()
    }

    fn console(&self, mac: crate::types::MacAddr) -> Option<String> {
        self.lock().node(mac).and_then(|n| (!n.console.is_empty()).then(|| n.console_text()))
    }
}

impl Shared {
    /// The registry, locked. A poisoned lock means a panic mid-update; the maps stay sound.
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The deployment aggregate now.
    pub fn deployment(&self) -> registry::Deployment {
        let (dropped, rejected) = (self.sink_stats.dropped(), self.rejected.load(Ordering::Relaxed));
        let mut d = self.lock().deployment(now_ms(), dropped, rejected);
        d.serving = self.serving.get().cloned();
        d
    }

    /// Writes a report now; returns its directory.
    ///
    /// # Errors
    /// The directory or a file could not be written.
    ///
    /// # Errors
    /// [`MonitorError::ReportBusy`] while another report is being written, or the write's error.
    pub async fn write_report(self: &Arc<Self>) -> Result<PathBuf, MonitorError> {
        let Ok(_one) = self.writing.try_lock() else { return Err(MonitorError::ReportBusy) };
        let data = report::ReportData::capture(self);
        let dir = self.report_dir.clone();
        let path = tokio::task::spawn_blocking(move || report::write(&dir, &data))
            .await
            .map_err(|e| report::ReportError::Task(e.to_string()))??;
        info!(dir = %path.display(), "report written");
        Ok(path)
    }
}

/// The running monitor: the sink for the services, the routes for the HTTP server, and the
/// registry task to spawn.
pub struct Monitor {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Stamped>,
    cfg: MonitorConfig,
}

impl Monitor {
    /// Creates the registry and its bounded queue. `secret` checks installer tokens; reports
    /// go to `report_dir`.
    pub fn new(cfg: &MonitorConfig, secret: Vec<u8>, report_dir: PathBuf, announce_interval: Duration) -> Monitor {
        let (sink, rx) = EventSink::bounded(cfg.queue_size);
        let fresh = (announce_interval * 3).as_millis() as u64;
        let registry = Registry::new(now_ms(), cfg.stuck_after.as_millis() as u64, fresh);
        let (updates, _) = broadcast::channel(SSE_BUFFER);
        let shared = Arc::new(Shared {
            registry: Mutex::new(registry),
            sink_stats: sink.stats(),
            rejected: AtomicU64::new(0),
            updates,
            secret,
            report_dir,
            sink,
            closing: CancellationToken::new(),
            book: std::sync::OnceLock::new(),
            admin: std::sync::OnceLock::new(),
            writing: tokio::sync::Mutex::new(()),
            addrs: std::sync::OnceLock::new(),
            serving: std::sync::OnceLock::new(),
        });
        Monitor { shared, rx, cfg: cfg.clone() }
    }

    /// Connects the node book (final reports change records; the registry starts with the
    /// book's nodes) and the admin credential of `POST /api/report`.
    pub fn attach(&self, book: Arc<crate::nodes::NodeBook>, manifest: Option<String>, admin: crate::nodes::http::AdminAuth) {
        book.attach_events(self.shared.sink.clone());
        let _ = self.shared.book.set((book, manifest));
        let _ = self.shared.admin.set(admin);
    }

    /// Says which interface the appliance serves on and why that one (the deployment view, the
    /// dashboard's header and `si-appliance status` show it).
    pub fn set_serving(&self, serving: registry::Serving) {
        let _ = self.shared.serving.set(serving);
    }

    /// Binds node reports to the address our DHCP saw for the node.
    pub fn attach_addrs(&self, addrs: Arc<crate::types::addrs::ClientAddrs>) {
        let _ = self.shared.addrs.set(addrs);
    }

    /// The sink to hand to the services.
    pub fn sink(&self) -> EventSink {
        self.shared.sink.clone()
    }

    /// The shared state (tests, app.rs).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The monitor's HTTP routes (see [`http`]).
    pub fn routes(&self) -> axum::Router {
        http::routes(self.shared.clone())
    }

    /// The registry task: applies events, samples every `sample_interval`, flags stuck nodes,
    /// keeps the terminal summary, and writes the report when every node is done or failed.
    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let shared = self.shared.clone();
        let mut tick = tokio::time::interval(self.cfg.sample_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term = self.cfg.terminal.then(terminal::Terminal::new);
        let mut reported_at: Option<u64> = None;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                // CANCEL-SAFETY: recv_many and interval ticks lose nothing when cancelled.
                _ = shutdown.cancelled() => break,
                n = self.rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 { break; }
                    self.apply(&mut batch);
                }
                _ = tick.tick() => {
                    let now = now_ms();
                    let (sample, stuck, completed) = {
                        let mut r = shared.lock();
                        let (s, stuck) = r.tick(now);
                        let stuck: Vec<_> = stuck.iter().filter_map(|m| r.node(*m).cloned()).collect();
                        (s, stuck, r.completed())
                    };
                    for n in &stuck {
                        warn!(mac = %n.mac, phase = %n.phase, "node stuck: no progress for {:?}", self.cfg.stuck_after);
                        publish_node(&shared, n);
                    }
                    let d = shared.deployment();
                    if let Some(t) = term.as_mut() {
                        t.update(&d);
                    }
                    if let Ok(json) = serde_json::to_string(&serde_json::json!({ "sample": sample, "deployment": d })) {
                        let _ = shared.updates.send(("sample", json.into()));
                    }
                    if self.cfg.auto_report && completed.is_some() && reported_at != completed {
                        reported_at = completed;
                        info!(nodes = d.nodes, done = d.phases.get("done").copied().unwrap_or(0),
                              failed = d.phases.get("failed").copied().unwrap_or(0), "deployment complete");
                        // Written off the registry task: a big rack's charts take a while.
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            if let Err(e) = shared.write_report().await {
                                warn!("end-of-run report: {e:#}");
                            }
                        });
                    }
                }
            }
        }
        shared.closing.cancel();
        if let Some(t) = term.take() {
            t.finish();
        }
    }

    fn apply(&mut self, batch: &mut Vec<Stamped>) {
        let changed: Vec<node::Node> = {
            let mut r = self.shared.lock();
            let macs: Vec<_> = batch.drain(..).filter_map(|ev| r.apply(&ev)).collect();
            let mut seen = std::collections::HashSet::new();
            macs.into_iter().filter(|m| seen.insert(*m)).filter_map(|m| r.node(m).cloned()).collect()
        };
        for n in &changed {
            log_phase(n);
            publish_node(&self.shared, n);
        }
    }
}

/// One info line per phase change (the node's last phase stamp is as new as its update).
fn log_phase(n: &node::Node) {
    if let Some(last) = n.phases.last() {
        if last.at_ms == n.updated_ms {
            let (bytes, err) = (n.bytes_done, n.error.as_deref().unwrap_or(""));
            let ip = n.ip.map(tracing::field::display);
            if n.phase == crate::types::node_api::Phase::Failed {
                warn!(mac = %n.mac, ip, phase = %n.phase, error = err, "node failed");
            } else {
                info!(mac = %n.mac, ip, phase = %n.phase, bytes, "node phase");
            }
        }
    }
}

fn publish_node(shared: &Shared, n: &node::Node) {
    if shared.updates.receiver_count() == 0 {
        return;
    }
    if let Ok(json) = serde_json::to_string(n) {
        let _ = shared.updates.send(("node", json.into()));
    }
}
