//! Progress of a long pack or unpack: an indicatif bar on a terminal, otherwise a plain `info!`
//! line every few seconds (the installer runs without a TTY and its log goes to the appliance).

use std::io::{self, IsTerminal};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Bar on stderr when it is a terminal, log lines otherwise.
    Auto,
    /// Log lines only.
    Log,
    /// Nothing (tests, benchmarks).
    Off,
}

/// A running progress display over a byte count.
pub struct Progress {
    bar: Option<ProgressBar>,
    log: bool,
    what: &'static str,
    total: Option<u64>,
    done: u64,
    last_log: Instant,
}

/// Interval between plain log lines.
const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// Starts a display for `what` (`packing`, `unpacking`) of `total` bytes when known.
    pub fn new(mode: ProgressMode, what: &'static str, total: Option<u64>) -> Progress {
        let tty = mode == ProgressMode::Auto && io::stderr().is_terminal();
        let bar = tty.then(|| {
            let bar = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            let tpl = if total.is_some() {
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{msg} {spinner} {bytes} {bytes_per_sec}"
            };
            if let Ok(style) = ProgressStyle::with_template(tpl) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what);
            bar
        });
        Progress { bar, log: mode != ProgressMode::Off && !tty, what, total, done: 0, last_log: Instant::now() }
    }

    /// Adds `n` bytes.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.log && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            match self.total {
                Some(t) if t > 0 => {
                    info!(what = self.what, done = self.done, total = t, "{}: {}%", self.what, self.done * 100 / t)
                }
                _ => info!(what = self.what, done = self.done, "{}: {} bytes", self.what, self.done),
            }
        }
    }

    /// Bytes counted so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Ends the display.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_without_a_terminal() {
        let mut p = Progress::new(ProgressMode::Off, "t", Some(10));
        p.add(3);
        p.add(4);
        assert_eq!(p.done(), 7);
        p.finish();
    }
}
