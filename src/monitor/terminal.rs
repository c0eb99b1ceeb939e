//! The terminal summary: on a TTY an indicatif line redrawn every sample (nodes per phase,
//! aggregate rate, ETA); without one, an info log line whenever the summary changes.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

use super::registry::Deployment;

/// The summary's sink.
pub(super) struct Terminal {
    bar: Option<ProgressBar>,
    last: String,
}

impl Terminal {
    pub(super) fn new() -> Terminal {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(2));
            b.set_style(ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
            b
        });
        Terminal { bar, last: String::new() }
    }

    pub(super) fn update(&mut self, d: &Deployment) {
        let line = summary(d);
        match &self.bar {
            Some(b) => {
                b.set_message(line.clone());
                b.tick();
            }
            None if line != self.last && d.nodes > 0 => info!("monitor: {line}"),
            None => {}
        }
        self.last = line;
    }

    pub(super) fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// `12 nodes: downloading 8, done 3, failed 1 | 93.1 MB/s | ETA 42s | stuck 0`
/// (rates and ETA rounded so the log line changes only when something did).
pub fn summary(d: &Deployment) -> String {
    let phases: Vec<String> = crate::types::node_api::Phase::ALL
        .iter()
        .filter_map(|p| d.phases.get(p.as_str()).filter(|n| **n > 0).map(|n| format!("{p} {n}")))
        .collect();
    let eta = d.eta_secs.map_or("-".to_owned(), |s| if s >= 120 { format!("{}m", s / 60) } else { format!("{s}s") });
    format!(
        "{} nodes: {} | {:.1} MB/s | ETA {eta} | stuck {}{}",
        d.nodes,
        if phases.is_empty() { "-".to_owned() } else { phases.join(", ") },
        d.down_bps as f64 / 1e6,
        d.stuck,
        if d.dropped_events > 0 { format!(" | dropped events {}", d.dropped_events) } else { String::new() }
    )
}
