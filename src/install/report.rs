//! Progress reports to the appliance (`POST /api/nodes/<mac>/report`, [`NodeReport`] JSON):
//! one at every phase change and one every `report_every` with the current counters. Reports
//! never block or fail the install: they go through a bounded queue (a full queue drops the
//! report and counts it) to one sender task whose requests are bounded in time. Until the
//! appliance has its report route, its 404 is logged at debug level and ignored.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::http;
use crate::types::node_api::{NodeReport, Phase};
use crate::types::MacAddr;

/// Time limit of one report request.
const POST_LIMIT: Duration = Duration::from_secs(5);
/// Reports queued at most.
const QUEUE: usize = 32;

/// The installer's report state and the task that sends it.
pub struct Reporter {
    state: Arc<Mutex<NodeReport>>,
    tx: mpsc::Sender<NodeReport>,
    dropped: Arc<AtomicU64>,
    stop_ticks: CancellationToken,
    sender: tokio::task::JoinHandle<()>,
}

fn lock(m: &Mutex<NodeReport>) -> std::sync::MutexGuard<'_, NodeReport> {
    // A poisoned lock means a panic mid-update of plain counters: the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reporter {
    /// Starts the sender task and the periodic report (every `every`).
    pub fn start(server: SocketAddr, mac: MacAddr, token: String, every: Duration) -> Reporter {
        let state = Arc::new(Mutex::new(NodeReport::default()));
        let (tx, mut rx) = mpsc::channel::<NodeReport>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let path = format!("/api/nodes/{mac}/report");
        let sender = tokio::spawn(async move {
            let mut warned = false;
            while let Some(r) = rx.recv().await {
                let Ok(body) = serde_json::to_vec(&r) else { continue };
                match http::request(server, "POST", &path, &token, Some(&body), POST_LIMIT).await {
                    Ok(a) if (200..300).contains(&a.status) => {}
                    Ok(a) if a.status == 404 => debug!("report: the appliance has no report route (404)"),
                    Ok(a) => {
                        if !warned {
                            warn!(status = a.status, body = %String::from_utf8_lossy(&a.body).trim(), "report refused");
                            warned = true;
                        }
                    }
                    Err(e) => debug!("report not sent: {e}"),
                }
            }
        });
        let stop_ticks = CancellationToken::new();
        let (st, t, d, stop) = (state.clone(), tx.clone(), dropped.clone(), stop_ticks.clone());
        let every = every.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    // CANCEL-SAFETY: ticks and cancellation carry no state.
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let mut snap = lock(&st).clone();
                        if snap.phase.is_some() {
                            snap.console = super::console::take();
                        }
                        if snap.phase.is_some() && t.try_send(snap).is_err() {
                            d.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Reporter { state, tx, dropped, stop_ticks, sender }
    }

    /// Enters a phase: logs it on the console and reports it at once.
    pub fn phase(&self, phase: Phase, message: impl Into<String>) {
        let message = message.into();
        info!(%phase, "{message}");
        let snap = {
            let mut s = lock(&self.state);
            s.phase = Some(phase);
            s.message = Some(message);
            s.clone()
        };
        self.queue(NodeReport { console: super::console::take(), ..snap });
    }

    /// Updates the counters (sent with the next periodic report).
    pub fn update(&self, f: impl FnOnce(&mut NodeReport)) {
        f(&mut lock(&self.state));
    }

    fn queue(&self, r: NodeReport) {
        if self.tx.try_send(r).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends the last report (`failed` with `error`, or `done`) and waits at most `limit` for the
    /// queue to drain.
    pub async fn finish(self, phase: Phase, message: String, error: Option<String>, limit: Duration) {
        self.stop_ticks.cancel();
        let last = {
            let mut s = lock(&self.state);
            s.phase = Some(phase);
            s.message = Some(message);
            s.error = error;
            s.clone()
        };
        let mut console = super::console::take().unwrap_or_default();
        if phase == Phase::Failed {
            // The error itself is printed by the binary's edge after this report: say it here.
            if let Some(e) = &last.error {
                console.push_str(&format!("si-appliance install: FAILED: {e}\n"));
            }
            let k = super::console::kernel_tail(40);
            if !k.is_empty() {
                console.push_str("--- last kernel messages ---\n");
                console.push_str(&k);
            }
        }
        let last = NodeReport { console: (!console.is_empty()).then_some(console), ..last };
        let _ = tokio::time::timeout(limit, self.tx.send(last)).await;
        drop(self.tx);
        let mut sender = self.sender;
        if tokio::time::timeout(limit, &mut sender).await.is_err() {
            sender.abort();
            debug!("report queue not drained in {limit:?}");
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            debug!(dropped, "reports dropped (queue full)");
        }
    }
}
