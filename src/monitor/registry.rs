//! The registry: every node by MAC, the address → MAC map learnt from DHCP (TFTP, HTTP and the
//! tracker see only addresses), the appliance's seed counters and the aggregate samples the
//! charts draw. Owned by the registry task (the only writer); HTTP handlers read it under a
//! short lock. Pure: events carry their time, `tick` takes it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::node::{Node, TrackerSample};
use crate::types::node_api::Phase;
use crate::types::MacAddr;
use crate::types::events::{Enrolment, NodeEvent, Stamped};

/// Aggregate samples kept (at one per `sample_interval`: 2 h at 1 s).
pub const SAMPLES: usize = 7200;
/// Nodes kept at most: beyond it, events about new MACs are counted as unmatched, not stored
/// (a flood of random MACs must not grow the appliance's memory without bound).
pub const MAX_NODES: usize = 65_536;

/// Milliseconds since the Unix epoch.
pub fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    ms(SystemTime::now())
}

/// One aggregate sample.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// Sum of the nodes' download rates, bytes/s.
    pub down_bps: u64,
    /// Sum of the nodes' upload rates, bytes/s.
    pub up_bps: u64,
    /// The appliance seed's upload rate, bytes/s.
    pub seed_bps: u64,
    /// Seed uploaded / bytes the nodes downloaded (0..1), when anything was downloaded.
    pub seed_share: Option<f64>,
    /// Seconds until every downloading node has the archive at the current rate.
    pub eta_secs: Option<u64>,
    /// Nodes done.
    pub done: usize,
    /// Nodes known.
    pub nodes: usize,
}

/// `/api/deployment`.
#[derive(Debug, Clone, Serialize)]
pub struct Deployment {
    /// Nodes of the deployment (enrolled, installing, installed, failed).
    pub nodes: usize,
    /// PXE clients seen that are not enrolled (told to boot locally; not in `nodes`).
    pub discovered: usize,
    /// Nodes per phase (every phase present, 0 included).
    pub phases: BTreeMap<&'static str, usize>,
    /// Nodes flagged stuck.
    pub stuck: usize,
    /// Every known node is done or failed (and there is at least one).
    pub complete: bool,
    /// Aggregate download rate, bytes/s.
    pub down_bps: u64,
    /// Aggregate upload rate of the nodes, bytes/s.
    pub up_bps: u64,
    /// Bytes the nodes downloaded in total.
    pub downloaded_bytes: u64,
    /// Bytes still to download.
    pub remaining_bytes: u64,
    /// Seconds until done at the current rate.
    pub eta_secs: Option<u64>,
    /// The appliance's seed: bytes uploaded since start.
    pub seed_uploaded_bytes: u64,
    /// Seed uploaded / bytes downloaded by the nodes (1.0: everything came from the seed).
    pub seed_share: Option<f64>,
    /// The archive's size (largest served).
    pub archive_bytes: u64,
    /// Events received by the registry.
    pub events: u64,
    /// Events dropped because the monitor's queue was full.
    pub dropped_events: u64,
    /// Events about an address no DHCP packet explained (static addresses, foreign peers).
    pub unmatched_events: u64,
    /// Installer reports refused (bad token, malformed body).
    pub rejected_reports: u64,
    /// Monitor start, ms since the Unix epoch.
    pub started_ms: u64,
    /// When every node was done or failed.
    pub completed_ms: Option<u64>,
    /// Server time of this answer.
    pub now_ms: u64,
    /// Foreign DHCP servers seen on the segment (at most 16, the latest first).
    pub foreign_dhcp_servers: Vec<ForeignDhcp>,
    /// The interface the appliance serves on, and why that one (set by app.rs at start).
    pub serving: Option<Serving>,
}

/// The provisioning interface and why it was chosen (the USB stick picks one by itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Serving {
    /// Interface name.
    pub iface: String,
    /// The appliance's address on it.
    pub ip: Ipv4Addr,
    /// How it was chosen, e.g. "first wired interface with carrier" or "configured".
    pub chosen: String,
    /// How the appliance's own machine booted: "BIOS", "UEFI" or "UEFI, Secure Boot on".
    #[serde(default)]
    pub firmware: String,
}

/// A foreign DHCP server seen by the DHCP service's watch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ForeignDhcp {
    /// Its server identifier.
    pub server: Ipv4Addr,
    /// The address it offered to the watch.
    pub offered: Ipv4Addr,
    /// When it last answered, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

/// Foreign DHCP servers kept for `/api/deployment`.
const MAX_FOREIGN_DHCP: usize = 16;

/// The state.
#[derive(Debug)]
pub struct Registry {
    foreign_dhcp: Vec<ForeignDhcp>,
    nodes: BTreeMap<MacAddr, Node>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    samples: VecDeque<Sample>,
    seed_uploaded: u64,
    seed_prev: Option<(u64, u64)>,
    seed_bps: u64,
    archive_size: u64,
    events: u64,
    unmatched: u64,
    started_ms: u64,
    completed_ms: Option<u64>,
    stuck_after_ms: u64,
    announce_fresh_ms: u64,
}

impl Registry {
    /// An empty registry started at `now`; nodes without progress for `stuck_after_ms` are
    /// flagged, tracker rates count for `announce_fresh_ms`.
    pub fn new(now: u64, stuck_after_ms: u64, announce_fresh_ms: u64) -> Registry {
        Registry {
            foreign_dhcp: Vec::new(),
            nodes: BTreeMap::new(),
            by_ip: HashMap::new(),
            samples: VecDeque::new(),
            seed_uploaded: 0,
            seed_prev: None,
            seed_bps: 0,
            archive_size: 0,
            events: 0,
            unmatched: 0,
            started_ms: now,
            completed_ms: None,
            stuck_after_ms,
            announce_fresh_ms,
        }
    }

    /// One node.
    pub fn node(&self, mac: MacAddr) -> Option<&Node> {
        self.nodes.get(&mac)
    }

    /// Every node, by MAC.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// The aggregate samples, oldest first.
    pub fn samples(&self) -> &VecDeque<Sample> {
        &self.samples
    }

    fn node_mut(&mut self, mac: MacAddr, now: u64) -> &mut Node {
        self.nodes.entry(mac).or_insert_with(|| Node::new(mac, Phase::Dhcp, now))
    }

    fn mac_of(&self, ip: Ipv4Addr, named: Option<MacAddr>) -> Option<MacAddr> {
        named.or_else(|| self.by_ip.get(&ip).copied())
    }

    /// The node a boot-file fetch from `ip` belongs to. A MAC the request names (a per-node
    /// file name, `?mac=`) is only a claim by whoever asks: it is believed for a node already
    /// known (from DHCP, the node book or a report) that has no address yet or this one. Else
    /// the fetch goes to the node DHCP gave the address to, or to nobody (counted unmatched):
    /// a fetch never creates a node and never moves an address to another node.
    fn boot_file_owner(&self, ip: Ipv4Addr, claimed: Option<MacAddr>) -> Option<MacAddr> {
        let believed = claimed.filter(|m| self.nodes.get(m).is_some_and(|n| n.ip.is_none_or(|known| known == ip)));
        believed.or_else(|| self.by_ip.get(&ip).copied())
    }

    /// Applies one event; returns the node it changed, if any.
    pub fn apply(&mut self, ev: &Stamped) -> Option<MacAddr> {
        let now = ms(ev.at);
        self.events += 1;
        let named = match &ev.event {
            NodeEvent::Dhcp { mac, .. }
            | NodeEvent::PlanFetched { mac }
            | NodeEvent::Report { mac, .. }
            | NodeEvent::Enrolment { mac, .. }
            | NodeEvent::LocalBoot { mac, .. } => Some(*mac),
            NodeEvent::BootFile { mac, .. } => *mac,
            _ => None,
        };
        if named.is_some_and(|m| !self.nodes.contains_key(&m)) && self.nodes.len() >= MAX_NODES {
            self.unmatched += 1;
            return None;
        }
        let (mac, changed) = match &ev.event {
            NodeEvent::Dhcp { mac, ip, hostname, arch, vendor_class, kind: _ } => {
                if let Some(ip) = ip {
                    // An address moves to its latest holder.
                    self.by_ip.insert(*ip, *mac);
                }
                let new = !self.nodes.contains_key(mac);
                let n = self.node_mut(*mac, now);
                let changed = n.on_dhcp(*ip, hostname.clone(), arch.to_string(), vendor_class.clone(), now);
                n.last_seen_ms = now;
                (*mac, changed || new)
            }
            NodeEvent::BootFile { ip, mac, file, .. } => {
                let Some(mac) = self.boot_file_owner(*ip, *mac) else {
                    self.unmatched += 1;
                    return None;
                };
                // A known node that names itself from a new address (no DHCP lease of ours:
                // proxy mode) teaches us its address.
                self.by_ip.entry(*ip).or_insert(mac);
                let n = self.node_mut(mac, now);
                n.ip.get_or_insert(*ip);
                n.last_seen_ms = now;
                (mac, n.on_boot_file(&file.to_string(), now))
            }
            NodeEvent::Announce { ip, downloaded, uploaded, left, .. } => {
                let Some(mac) = self.mac_of(*ip, None) else {
                    self.unmatched += 1;
                    return None;
                };
                let n = self.node_mut(mac, now);
                n.last_seen_ms = now;
                let s = TrackerSample { at_ms: now, downloaded: *downloaded, uploaded: *uploaded, left: *left };
                (mac, n.on_announce(s, now))
            }
            NodeEvent::PlanFetched { mac } => {
                let n = self.node_mut(*mac, now);
                n.last_seen_ms = now;
                // Only enrolled nodes get plans and tokens: whatever the book's events said.
                if n.enrolment == Enrolment::Discovered {
                    n.enrolment = Enrolment::Installing;
                }
                (*mac, n.advance(Phase::Installer, now))
            }
            NodeEvent::Report { mac, report } => {
                let n = self.node_mut(*mac, now);
                n.last_seen_ms = now;
                if n.enrolment == Enrolment::Discovered {
                    n.enrolment = Enrolment::Installing;
                }
                n.on_report(report, now);
                (*mac, true)
            }
            NodeEvent::Enrolment { mac, state, hostname } => {
                let new = !self.nodes.contains_key(mac);
                let n = self.node_mut(*mac, now);
                let mut changed = new || n.enrolment != *state;
                n.enrolment = *state;
                if hostname.is_some() && n.hostname != *hostname {
                    n.hostname = hostname.clone();
                    changed = true;
                }
                if new {
                    // Known from the book before anything was seen of it (a restart).
                    match state {
                        Enrolment::Installed => {
                            n.enter(Phase::Done, now);
                        }
                        Enrolment::Failed => {
                            n.enter(Phase::Failed, now);
                            n.error = Some("the last install failed (before the appliance restarted)".into());
                        }
                        _ => {}
                    }
                }
                (*mac, changed)
            }
            NodeEvent::LocalBoot { mac, why } => {
                let n = self.node_mut(*mac, now);
                n.last_seen_ms = now;
                n.message = Some(format!("booting from its disk: {why}"));
                if n.enrolment == Enrolment::Installed {
                    n.enter(Phase::Done, now);
                }
                (*mac, true)
            }
            NodeEvent::ForeignDhcp { server, offered } => {
                self.foreign_dhcp.retain(|f| f.server != *server);
                self.foreign_dhcp.insert(0, ForeignDhcp { server: *server, offered: *offered, last_seen_ms: now });
                self.foreign_dhcp.truncate(MAX_FOREIGN_DHCP);
                return None;
            }
            NodeEvent::Seed { uploaded, archive_size } => {
                if let Some((t0, u0)) = self.seed_prev {
                    let dt = now.saturating_sub(t0);
                    if dt > 0 {
                        self.seed_bps = uploaded.saturating_sub(u0) * 1000 / dt;
                    }
                }
                self.seed_prev = Some((now, *uploaded));
                self.seed_uploaded = *uploaded;
                self.archive_size = self.archive_size.max(*archive_size);
                return None;
            }
        };
        if changed {
            if let Some(n) = self.nodes.get_mut(&mac) {
                n.updated_ms = now;
            }
            if self.nodes.get(&mac).is_some_and(|n| !n.phase.is_final()) {
                self.completed_ms = None;
            }
            Some(mac)
        } else {
            None
        }
    }

    /// The periodic step: stale rates expire, rate samples, stuck flags, one aggregate sample.
    /// Returns the sample and the nodes that just became stuck.
    pub fn tick(&mut self, now: u64) -> (Sample, Vec<MacAddr>) {
        let mut newly_stuck = Vec::new();
        for n in self.nodes.values_mut() {
            n.expire_rates(now, self.announce_fresh_ms);
            n.sample_rate(now);
            if n.enrolment != Enrolment::Discovered && n.check_stuck(now, self.stuck_after_ms) {
                newly_stuck.push(n.mac);
            }
        }
        if self.seed_prev.is_some_and(|(t, _)| now.saturating_sub(t) > self.announce_fresh_ms) {
            self.seed_bps = 0;
        }
        let d = self.deployment(now, 0, 0);
        if d.complete && self.completed_ms.is_none() {
            self.completed_ms = Some(now);
        }
        let s = Sample {
            at_ms: now,
            down_bps: d.down_bps,
            up_bps: d.up_bps,
            seed_bps: self.seed_bps,
            seed_share: d.seed_share,
            eta_secs: d.eta_secs,
            done: d.phases.get(Phase::Done.as_str()).copied().unwrap_or(0),
            nodes: d.nodes,
        };
        if self.samples.len() >= SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
        (s, newly_stuck)
    }

    /// Whether every known node is done or failed, and since when (set by `tick`).
    pub fn completed(&self) -> Option<u64> {
        self.completed_ms
    }

    /// The deployment's aggregate; `dropped`/`rejected` come from the shared counters.
    pub fn deployment(&self, now: u64, dropped: u64, rejected: u64) -> Deployment {
        let mut phases: BTreeMap<&'static str, usize> = Phase::ALL.iter().map(|p| (p.as_str(), 0)).collect();
        let (mut down, mut up, mut downloaded, mut remaining, mut stuck) = (0u64, 0u64, 0u64, 0u64, 0usize);
        let archive = self.archive_size.max(self.nodes.values().map(|n| n.bytes_total).max().unwrap_or(0));
        let members = || self.nodes.values().filter(|n| n.enrolment != Enrolment::Discovered);
        for n in members() {
            *phases.entry(n.phase.as_str()).or_insert(0) += 1;
            down += n.down_bps;
            up += n.up_bps;
            downloaded += n.bytes_done;
            remaining += n.remaining(archive);
            stuck += usize::from(n.stuck);
        }
        let count = members().count();
        let complete = count > 0 && members().all(|n| n.phase.is_final());
        let eta_secs = if remaining == 0 {
            if count == 0 { None } else { Some(0) }
        } else if down > 0 {
            Some(remaining.div_ceil(down))
        } else {
            None
        };
        let seed_share = (downloaded > 0).then(|| (self.seed_uploaded as f64 / downloaded as f64).min(1.0));
        Deployment {
            nodes: count,
            discovered: self.nodes.len() - count,
            phases,
            stuck,
            complete,
            down_bps: down,
            up_bps: up,
            downloaded_bytes: downloaded,
            remaining_bytes: remaining,
            eta_secs,
            seed_uploaded_bytes: self.seed_uploaded,
            seed_share,
            archive_bytes: archive,
            events: self.events,
            dropped_events: dropped,
            unmatched_events: self.unmatched,
            rejected_reports: rejected,
            started_ms: self.started_ms,
            completed_ms: self.completed_ms,
            now_ms: now,
            foreign_dhcp_servers: self.foreign_dhcp.clone(),
            serving: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::node_api::NodeReport;
    use crate::types::Arch;
    use crate::types::events::{BootStep, BootVia, DhcpKind};
    use std::time::Duration;

    fn at(ms: u64, event: NodeEvent) -> Stamped {
        Stamped { at: UNIX_EPOCH + Duration::from_millis(ms), event }
    }

    #[test]
    fn addresses_from_dhcp_attribute_boot_files_and_announces() {
        let mut r = Registry::new(0, 60_000, 30_000);
        let mac = MacAddr([2, 0, 0, 0, 0, 7]);
        let ip = Ipv4Addr::new(10, 0, 0, 7);
        let dhcp = NodeEvent::Dhcp { mac, ip: Some(ip), hostname: Some("n7".into()), arch: Arch::X86Bios, vendor_class: Some("PXEClient:Arch:00000".into()), kind: DhcpKind::Discover };
        assert_eq!(r.apply(&at(1_000, dhcp)), Some(mac));
        let bf = NodeEvent::BootFile { ip, mac: None, file: BootStep::Loader(crate::types::Loader::Undionly), size: 1, via: BootVia::Tftp };
        assert_eq!(r.apply(&at(2_000, bf)), Some(mac));
        let stranger = NodeEvent::BootFile { ip: Ipv4Addr::new(10, 0, 0, 99), mac: None, file: BootStep::Initrd, size: 1, via: BootVia::Http };
        assert_eq!(r.apply(&at(2_000, stranger)), None);
        // Issue 13: `?mac=` (or a per-node file name) from any host created a node for any MAC
        // and moved the asker's address to it. A claimed MAC is now believed only for a known
        // node at that address.
        let forged = MacAddr([2, 0, 0, 0, 0, 0x66]);
        let claim = |m: MacAddr, from: Ipv4Addr| NodeEvent::BootFile { ip: from, mac: Some(m), file: BootStep::Kernel, size: 1, via: BootVia::Http };
        assert_eq!(r.apply(&at(2_100, claim(forged, Ipv4Addr::new(10, 0, 0, 99)))), None, "a fetch created a node");
        assert!(r.node(forged).is_none());
        assert_eq!(r.apply(&at(2_100, claim(mac, Ipv4Addr::new(10, 0, 0, 98)))), None, "another host claimed a known node");
        assert_eq!(r.apply(&at(2_100, claim(forged, ip))), Some(mac), "the address's own node keeps it");
        let an = NodeEvent::Announce { ip, info_hash: crate::types::InfoHash([0xab; 20]), downloaded: 0, uploaded: 0, left: 100 };
        r.apply(&at(3_000, an));
        let rep = NodeReport { phase: Some(Phase::Done), bytes_done: 100, bytes_total: 100, ..Default::default() };
        r.apply(&at(4_000, NodeEvent::Report { mac, report: rep }));
        let n = r.node(mac).unwrap();
        let seq: Vec<Phase> = n.phases.iter().map(|p| p.phase).collect();
        assert_eq!(seq, [Phase::Dhcp, Phase::BootFiles, Phase::Downloading, Phase::Done]);
        r.tick(5_000);
        let d = r.deployment(5_000, 0, 0);
        assert!(d.complete);
        assert_eq!((d.unmatched_events, d.phases["done"], d.eta_secs), (3, 1, Some(0)));
        assert_eq!(r.completed(), Some(5_000));
    }

    #[test]
    fn boot_files_naming_unknown_macs_create_no_node() {
        let mut r = Registry::new(0, 60_000, 30_000);
        let mac = MacAddr([2, 0, 0, 0, 0, 7]);
        let ip = Ipv4Addr::new(10, 0, 0, 7);
        let dhcp = NodeEvent::Dhcp { mac, ip: Some(ip), hostname: None, arch: Arch::X86Bios, vendor_class: None, kind: DhcpKind::Request };
        r.apply(&at(1_000, dhcp));
        // `?mac=<random>` from a stranger's address, and from the node's own address.
        let random = MacAddr([2, 0xde, 0xad, 0, 0, 1]);
        let stranger = NodeEvent::BootFile { ip: Ipv4Addr::new(10, 0, 0, 99), mac: Some(random), file: BootStep::Kernel, size: 1, via: BootVia::Http };
        assert_eq!(r.apply(&at(2_000, stranger)), None);
        let own = NodeEvent::BootFile { ip, mac: Some(random), file: BootStep::Kernel, size: 1, via: BootVia::Http };
        assert_eq!(r.apply(&at(2_000, own)), Some(mac), "attributed to the address's holder");
        assert!(r.node(random).is_none());
        // Another known node's MAC named from this address does not move the address.
        let other = MacAddr([2, 0, 0, 0, 0, 8]);
        r.apply(&at(3_000, NodeEvent::Dhcp { mac: other, ip: Some(Ipv4Addr::new(10, 0, 0, 8)), hostname: None, arch: Arch::X86Bios, vendor_class: None, kind: DhcpKind::Request }));
        let lie = NodeEvent::BootFile { ip, mac: Some(other), file: BootStep::Kernel, size: 1, via: BootVia::Http };
        r.apply(&at(4_000, lie));
        assert_eq!(r.by_ip.get(&ip), Some(&mac), "the address stays with its holder");
        assert_eq!(r.node(other).and_then(|n| n.ip), Some(Ipv4Addr::new(10, 0, 0, 8)));
    }

    #[test]
    fn eta_and_seed_share_from_rates_and_counters() {
        let mut r = Registry::new(0, 60_000, 30_000);
        r.apply(&at(0, NodeEvent::Seed { uploaded: 0, archive_size: 1000 }));
        for i in 0..4u8 {
            let mac = MacAddr([2, 0, 0, 0, 0, i]);
            let rep = NodeReport { phase: Some(Phase::Downloading), bytes_done: 500, bytes_total: 1000, down_bps: 50, ..Default::default() };
            r.apply(&at(1_000, NodeEvent::Report { mac, report: rep }));
        }
        r.apply(&at(1_000, NodeEvent::Seed { uploaded: 1000, archive_size: 1000 }));
        let d = r.deployment(1_000, 3, 2);
        assert_eq!((d.down_bps, d.remaining_bytes, d.eta_secs), (200, 2000, Some(10)));
        assert_eq!(d.seed_share, Some(0.5));
        assert_eq!((d.dropped_events, d.rejected_reports, d.complete), (3, 2, false));
    }
}
