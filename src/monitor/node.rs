//! One node's state: identity (MAC, address, host name, firmware), its phase sequence with
//! timestamps, counters, rates, and stuck detection. Pure: every method takes the time it
//! acts at (ms since the Unix epoch); the registry task is the only caller. Transition rules:
//! `STATE.md` next to this file.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::types::node_api::{self, NodeReport, Phase, StepReport};
use crate::types::MacAddr;

/// Rate samples kept per node for its chart (at one per sample interval: 15 min at 1 s).
pub const RATE_HISTORY: usize = 900;
/// Boot files remembered per node (the latest ones).
const BOOT_FILES: usize = 12;
/// A rate an installer reported counts as current for this long; after it, tracker-derived
/// rates take over (a node that stopped reporting).
const REPORT_FRESH_MS: u64 = 10_000;

/// When a node entered a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PhaseStamp {
    /// The phase.
    pub phase: Phase,
    /// Entered at, ms since the Unix epoch.
    pub at_ms: u64,
}

/// The latest tracker announce of a node, for rates from successive samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TrackerSample {
    /// When.
    pub at_ms: u64,
    /// The peer's downloaded count.
    pub downloaded: u64,
    /// The peer's uploaded count.
    pub uploaded: u64,
    /// Bytes left.
    pub left: u64,
}

/// A node as the dashboard and the API show it.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// Hardware address (the key).
    pub mac: MacAddr,
    /// Its address (DHCP).
    pub ip: Option<Ipv4Addr>,
    /// Host name (DHCP reservation/option 12, or the installer's).
    pub hostname: Option<String>,
    /// Firmware architecture (option 93).
    pub arch: Option<String>,
    /// DHCP vendor class (`PXEClient:Arch:00000...`, `si-appliance`, ...).
    pub vendor_class: Option<String>,
    /// The phase it is in.
    pub phase: Phase,
    /// What the node book says of it (`discovered`: not enrolled, never installed here).
    pub enrolment: crate::types::events::Enrolment,
    /// Every phase it entered, in order (a reboot that starts over appends again).
    pub phases: Vec<PhaseStamp>,
    /// First seen, ms since the Unix epoch.
    pub first_seen_ms: u64,
    /// Last event of any kind.
    pub last_seen_ms: u64,
    /// Last progress (phase change, more bytes, a new boot file).
    pub last_progress_ms: u64,
    /// Last state change pushed to the dashboard.
    pub updated_ms: u64,
    /// The latest boot files sent (TFTP/HTTP).
    pub boot_files: Vec<String>,
    /// Archive bytes downloaded.
    pub bytes_done: u64,
    /// Archive size (0 until known).
    pub bytes_total: u64,
    /// Bytes uploaded to other peers.
    pub bytes_uploaded: u64,
    /// Bytes unpacked onto the disk.
    pub bytes_unpacked: u64,
    /// Download rate, bytes/s (installer's, else from successive tracker announces).
    pub down_bps: u64,
    /// Upload rate, bytes/s.
    pub up_bps: u64,
    /// Connected peers (installer's count).
    pub peers: u32,
    /// The installer's latest human line.
    pub message: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Its group's profile steps finished so far (name, exit code, end of output); the last one
    /// is the failed one when a step failed the node.
    pub steps: Vec<StepReport>,
    /// No progress for `monitor.stuck_after` while not done or failed.
    pub stuck: bool,
    /// Installer reports received.
    pub reports: u64,
    /// Latest tracker announce.
    pub tracker: Option<TrackerSample>,
    /// When the installer last reported (rates from it are preferred while fresh).
    #[serde(skip)]
    last_report_ms: u64,
    /// The installer's last report carried rates (it is downloading or seeding).
    #[serde(skip)]
    report_rates: bool,
    /// (ms, down bytes/s) samples for the per-node chart.
    #[serde(skip)]
    pub rate_history: VecDeque<(u64, u64)>,
    /// The installer's console output (its last [`CONSOLE_MAX`] bytes).
    #[serde(skip)]
    pub console: VecDeque<String>,
    #[serde(skip)]
    console_bytes: usize,
}

/// Console bytes kept per node.
pub const CONSOLE_MAX: usize = 64 << 10;

/// Phase stamps kept per node (the first and the latest).
pub const MAX_PHASES: usize = 64;
/// Longest `message`/`error` kept from a report, in bytes (a longer one is cut with a marker).
pub const MAX_TEXT: usize = 1024;

/// `text`, cut at [`MAX_TEXT`] bytes on a character boundary, marked when cut.
pub fn capped(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut cut = MAX_TEXT;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{} [… {} bytes cut]", &text[..cut], text.len() - cut)
}

impl Node {
    /// A node first seen at `now`, in `phase`.
    pub fn new(mac: MacAddr, phase: Phase, now: u64) -> Node {
        Node {
            mac,
            ip: None,
            hostname: None,
            arch: None,
            vendor_class: None,
            phase,
            enrolment: crate::types::events::Enrolment::Discovered,
            phases: vec![PhaseStamp { phase, at_ms: now }],
            first_seen_ms: now,
            last_seen_ms: now,
            last_progress_ms: now,
            updated_ms: now,
            boot_files: Vec::new(),
            bytes_done: 0,
            bytes_total: 0,
            bytes_uploaded: 0,
            bytes_unpacked: 0,
            down_bps: 0,
            up_bps: 0,
            peers: 0,
            message: None,
            error: None,
            steps: Vec::new(),
            stuck: false,
            reports: 0,
            tracker: None,
            last_report_ms: 0,
            report_rates: false,
            rate_history: VecDeque::new(),
            console: VecDeque::new(),
            console_bytes: 0,
        }
    }

    /// Adds console text from a report (the oldest text goes beyond [`CONSOLE_MAX`]).
    pub fn add_console(&mut self, text: &str) {
        let mut text = text;
        if text.len() > CONSOLE_MAX {
            let mut cut = text.len() - CONSOLE_MAX;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text = &text[cut..];
        }
        self.console_bytes += text.len();
        self.console.push_back(text.to_owned());
        while self.console_bytes > CONSOLE_MAX {
            match self.console.pop_front() {
                Some(old) => self.console_bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The console text kept.
    pub fn console_text(&self) -> String {
        self.console.iter().map(String::as_str).collect()
    }

    /// Moves to `phase` (recording it) when it differs from the current one.
    /// Returns whether it changed.
    pub fn enter(&mut self, phase: Phase, now: u64) -> bool {
        if phase == self.phase {
            return false;
        }
        self.phase = phase;
        if self.phases.len() >= MAX_PHASES {
            // A node that flaps (an installer in a reboot loop, a forged stream of reports)
            // keeps its first phase and the latest ones: bounded memory and JSON per node.
            self.phases.remove(1);
        }
        self.phases.push(PhaseStamp { phase, at_ms: now });
        self.progress(now);
        true
    }

    /// Moves forward to `phase` only if the node is before it (observations from the side
    /// never move a node back; reports and reboots do).
    pub fn advance(&mut self, phase: Phase, now: u64) -> bool {
        if self.phase < phase && !self.phase.is_final() { self.enter(phase, now) } else { false }
    }

    fn progress(&mut self, now: u64) {
        self.last_progress_ms = now;
        self.stuck = false;
    }

    /// A DHCP packet. A node that was done or failed and comes back from PXE firmware is
    /// booting again: it starts over.
    pub fn on_dhcp(&mut self, ip: Option<Ipv4Addr>, hostname: Option<String>, arch: String, vendor: Option<String>, now: u64) -> bool {
        let firmware = vendor.as_deref().is_some_and(|v| v.starts_with("PXEClient") || v.starts_with("HTTPClient"));
        let mut changed = false;
        if self.phase.is_final() && firmware {
            self.restart(now);
            changed = true;
        }
        if ip.is_some() && self.ip != ip {
            self.ip = ip;
            changed = true;
        }
        if hostname.is_some() && self.hostname != hostname {
            self.hostname = hostname;
            changed = true;
        }
        if firmware || self.arch.is_none() {
            changed |= self.arch.as_deref() != Some(arch.as_str());
            self.arch = Some(arch);
        }
        if vendor.is_some() && self.vendor_class != vendor && (firmware || self.vendor_class.is_none()) {
            self.vendor_class = vendor;
            changed = true;
        }
        changed
    }

    /// Back to `Dhcp`: a new boot of the same machine. Counters reset; the phase list keeps
    /// the earlier run.
    fn restart(&mut self, now: u64) {
        self.enter(Phase::Dhcp, now);
        self.bytes_done = 0;
        self.bytes_unpacked = 0;
        self.bytes_uploaded = 0;
        self.down_bps = 0;
        self.up_bps = 0;
        self.peers = 0;
        self.error = None;
        self.steps.clear();
        self.message = None;
        self.tracker = None;
        self.boot_files.clear();
    }

    /// A boot file went out to it.
    pub fn on_boot_file(&mut self, file: &str, now: u64) -> bool {
        let mut changed = self.advance(Phase::BootFiles, now);
        if self.boot_files.last().map(String::as_str) != Some(file) {
            if self.boot_files.len() >= BOOT_FILES {
                self.boot_files.remove(0);
            }
            self.boot_files.push(file.to_owned());
            self.progress(now);
            changed = true;
        }
        changed
    }

    /// A tracker announce: counters (the larger of the installer's and the tracker's: both
    /// count the same download), rates from the previous announce unless the installer's are
    /// fresh, and `Downloading` for a node that has not said otherwise.
    pub fn on_announce(&mut self, s: TrackerSample, now: u64) -> bool {
        let tracker_rates = !self.report_rates || now.saturating_sub(self.last_report_ms) > REPORT_FRESH_MS;
        if let Some(prev) = self.tracker {
            let dt = s.at_ms.saturating_sub(prev.at_ms);
            if dt >= 200 && tracker_rates {
                self.down_bps = s.downloaded.saturating_sub(prev.downloaded) * 1000 / dt;
                self.up_bps = s.uploaded.saturating_sub(prev.uploaded) * 1000 / dt;
            }
        }
        let total = self.bytes_total.max(s.downloaded.saturating_add(s.left));
        if s.left == 0 {
            if self.bytes_done < total {
                self.progress(now);
            }
            self.bytes_done = total;
            if tracker_rates {
                self.down_bps = 0;
            }
        } else if s.downloaded > self.bytes_done {
            self.bytes_done = s.downloaded;
            self.progress(now);
        }
        self.bytes_total = total;
        self.bytes_uploaded = self.bytes_uploaded.max(s.uploaded);
        if s.left > 0 {
            self.advance(Phase::Downloading, now);
        }
        self.tracker = Some(s);
        true
    }

    /// An installer report (authorized by the caller). Every report changes what the node
    /// shows (counters, rates), so there is no return value.
    pub fn on_report(&mut self, r: &NodeReport, now: u64) {
        self.reports += 1;
        if let Some(c) = &r.console {
            self.add_console(c);
        }
        self.last_report_ms = now;
        self.report_rates = r.down_bps > 0 || r.up_bps > 0;
        if let Some(p) = r.phase {
            if self.phase.is_final() && !p.is_final() && p != self.phase {
                // A report after done/failed: the installer runs again (a retry without DHCP).
                self.bytes_done = 0;
                self.error = None;
                self.steps.clear();
            }
            self.enter(p, now);
        }
        if r.bytes_done > self.bytes_done || r.bytes_unpacked > self.bytes_unpacked {
            self.progress(now);
        }
        self.bytes_done = r.bytes_done;
        self.bytes_total = if r.bytes_total > 0 { r.bytes_total } else { self.bytes_total };
        self.bytes_uploaded = r.bytes_uploaded;
        self.bytes_unpacked = r.bytes_unpacked;
        if self.report_rates || self.tracker.is_none() {
            self.down_bps = r.down_bps;
            self.up_bps = r.up_bps;
        }
        self.peers = r.peers;
        if let Some(m) = &r.message {
            self.message = Some(capped(m));
        }
        if let Some(e) = &r.error {
            self.error = Some(capped(e));
        }
        if !r.steps.is_empty() {
            // Every report carries all steps so far: the latest list replaces the kept one, held
            // to the installer's own bounds whatever a report claims.
            self.steps = r
                .steps
                .iter()
                .take(node_api::MAX_STEPS)
                .map(|s| StepReport {
                    name: capped(&s.name),
                    output: node_api::tail(&s.output, node_api::STEP_OUTPUT_MAX),
                    ..s.clone()
                })
                .collect();
        }
        if r.phase == Some(Phase::Failed) && self.error.is_none() {
            self.error = Some("failed (no reason given)".to_owned());
        }
    }

    /// Rates go stale: a node whose rate source went quiet reports 0.
    pub fn expire_rates(&mut self, now: u64, announce_fresh_ms: u64) {
        let report_stale = !self.report_rates || now.saturating_sub(self.last_report_ms) > REPORT_FRESH_MS;
        let tracker_stale = self.tracker.is_none_or(|t| now.saturating_sub(t.at_ms) > announce_fresh_ms);
        if (report_stale && tracker_stale) || self.phase.is_final() {
            self.down_bps = 0;
            if self.phase.is_final() && self.phase != Phase::Done {
                self.up_bps = 0;
            }
        }
    }

    /// Records a rate sample for the chart.
    pub fn sample_rate(&mut self, now: u64) {
        if self.down_bps == 0 && self.rate_history.back().is_none_or(|&(_, r)| r == 0) {
            return;
        }
        if self.rate_history.len() >= RATE_HISTORY {
            self.rate_history.pop_front();
        }
        self.rate_history.push_back((now, self.down_bps));
    }

    /// Flags the node stuck when it is not final and made no progress for `after_ms`.
    /// Returns true when it just became stuck.
    pub fn check_stuck(&mut self, now: u64, after_ms: u64) -> bool {
        let stuck = !self.phase.is_final() && self.phase != Phase::Seeding && now.saturating_sub(self.last_progress_ms) >= after_ms;
        let newly = stuck && !self.stuck;
        self.stuck = stuck;
        newly
    }

    /// Bytes still to download (archive size known from the node, else `archive_size`).
    pub fn remaining(&self, archive_size: u64) -> u64 {
        if self.phase.is_final() || self.phase > Phase::Downloading {
            return 0;
        }
        let total = if self.bytes_total > 0 { self.bytes_total } else { archive_size };
        total.saturating_sub(self.bytes_done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, 1])
    }

    #[test]
    fn side_observations_only_move_forward_and_reports_set_the_phase() {
        let mut n = Node::new(mac(), Phase::Dhcp, 1000);
        assert!(n.on_boot_file("undionly.kpxe", 1100));
        assert_eq!(n.phase, Phase::BootFiles);
        let r = NodeReport { phase: Some(Phase::Partitioning), ..Default::default() };
        n.on_report(&r, 1200);
        // A late boot file or DHCP packet from the installer does not move it back.
        n.on_boot_file("initrd.img", 1300);
        n.on_dhcp(None, None, "bios".into(), Some("si-appliance".into()), 1300);
        assert_eq!(n.phase, Phase::Partitioning);
        let r = NodeReport { phase: Some(Phase::Downloading), bytes_done: 10, bytes_total: 100, down_bps: 5, ..Default::default() };
        n.on_report(&r, 1400);
        let r = NodeReport { phase: Some(Phase::Done), bytes_done: 100, bytes_total: 100, ..Default::default() };
        n.on_report(&r, 1500);
        let seq: Vec<Phase> = n.phases.iter().map(|p| p.phase).collect();
        assert_eq!(seq, [Phase::Dhcp, Phase::BootFiles, Phase::Partitioning, Phase::Downloading, Phase::Done]);
        // PXE firmware again: a new boot starts over.
        n.on_dhcp(None, None, "bios".into(), Some("PXEClient:Arch:00000:UNDI:002001".into()), 2000);
        assert_eq!(n.phase, Phase::Dhcp);
        assert_eq!(n.bytes_done, 0);
    }

    /// Issue 13: a report's `message`/`error` and the phase list were kept whole, so a forged
    /// or looping stream of reports grew a node without bound.
    #[test]
    fn report_text_and_phase_history_are_bounded() {
        let mut n = Node::new(mac(), Phase::Dhcp, 0);
        let long = "é".repeat(10_000);
        let r = NodeReport { message: Some(long.clone()), error: Some(long), ..Default::default() };
        n.on_report(&r, 1);
        for t in [&n.message, &n.error] {
            let t = t.as_deref().unwrap();
            assert!(t.len() <= MAX_TEXT + 32 && t.ends_with("bytes cut]"), "{} bytes", t.len());
        }
        for i in 0..10_000u64 {
            let phase = if i % 2 == 0 { Phase::Downloading } else { Phase::Configuring };
            n.on_report(&NodeReport { phase: Some(phase), ..Default::default() }, 10 + i);
        }
        assert_eq!(n.phases.len(), MAX_PHASES);
        assert_eq!(n.phases[0].phase, Phase::Dhcp, "the first phase is kept");
        assert_eq!(n.phases.last().unwrap().at_ms, 10 + 9_999, "and the latest");
        assert_eq!(capped("short"), "short");
    }

    #[test]
    fn profile_steps_are_kept_bounded_and_cleared_by_a_new_run() {
        let mut n = Node::new(mac(), Phase::Installer, 0);
        let step = |name: &str, ok: bool, output: String| StepReport { name: name.into(), ok, exit_code: Some(if ok { 0 } else { 3 }), output, secs: 0.1 };
        let r = NodeReport { phase: Some(Phase::Configuring), steps: vec![step("10-a.sh", true, "fine\n".into())], ..Default::default() };
        n.on_report(&r, 1);
        // A report without steps (a periodic one from before) does not erase them.
        n.on_report(&NodeReport { phase: Some(Phase::Configuring), ..Default::default() }, 2);
        assert_eq!(n.steps.len(), 1);
        let forged = NodeReport {
            phase: Some(Phase::Failed),
            error: Some("profile step 20-b.sh failed (exit 3)".into()),
            steps: (0..100).map(|i| step(&format!("s{i}"), false, "x".repeat(100_000))).collect(),
            ..Default::default()
        };
        n.on_report(&forged, 3);
        assert_eq!(n.steps.len(), node_api::MAX_STEPS);
        assert!(n.steps.iter().all(|s| s.output.len() <= node_api::STEP_OUTPUT_MAX + 32));
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(json["steps"][0]["exit_code"], 3, "{}", json["steps"][0]);
        n.on_report(&NodeReport { phase: Some(Phase::Partitioning), ..Default::default() }, 4);
        assert!(n.steps.is_empty(), "a new run starts without the old steps");
    }

    #[test]
    fn tracker_rates_come_from_successive_announces() {
        let mut n = Node::new(mac(), Phase::Dhcp, 0);
        n.on_announce(TrackerSample { at_ms: 20_000, downloaded: 0, uploaded: 0, left: 1000 }, 20_000);
        assert_eq!(n.phase, Phase::Downloading);
        n.on_announce(TrackerSample { at_ms: 22_000, downloaded: 400, uploaded: 100, left: 600 }, 22_000);
        assert_eq!((n.down_bps, n.up_bps, n.bytes_done, n.bytes_total), (200, 50, 400, 1000));
        n.on_announce(TrackerSample { at_ms: 23_000, downloaded: 1000, uploaded: 100, left: 0 }, 23_000);
        assert_eq!((n.bytes_done, n.down_bps), (1000, 0));
    }

    #[test]
    fn stuck_after_no_progress_and_cleared_by_progress() {
        let mut n = Node::new(mac(), Phase::Dhcp, 0);
        assert!(!n.check_stuck(5_000, 10_000));
        assert!(n.check_stuck(10_000, 10_000));
        assert!(!n.check_stuck(11_000, 10_000), "only reported once");
        n.on_boot_file("vmlinuz", 12_000);
        assert!(!n.stuck);
        n.enter(Phase::Failed, 13_000);
        assert!(!n.check_stuck(60_000, 10_000));
    }
}
