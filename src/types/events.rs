//! What the serving paths tell the monitor: [`NodeEvent`]s through one cheap, cloneable
//! [`EventSink`]. It lives here (not in `monitor`) so `dhcp`, `boot` and `swarm` can send
//! without importing the monitor; `app.rs` creates the sink and hands it to every service.
//!
//! The sink wraps a bounded tokio mpsc and only ever `try_send`s: a full queue drops the event
//! and counts it, so a slow registry never slows a DHCP reply, a boot file or an announce.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use tokio::sync::mpsc;

use super::{Arch, MacAddr};
use crate::types::node_api::NodeReport;

/// How a boot file went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootVia {
    /// TFTP.
    Tftp,
    /// HTTP.
    Http,
}

/// What the node book says of a node (shown beside its phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enrolment {
    /// Seen on the network, not enrolled: told to boot from its disk, never installed.
    #[default]
    Discovered,
    /// Enrolled, not installed yet.
    Enrolled,
    /// Its installer runs.
    Installing,
    /// Installed: boots from its disk.
    Installed,
    /// Its last install failed.
    Failed,
    /// Marked for a new install at its next boot.
    Reimage,
}

/// One observation about a node.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// A DHCP packet from a client the appliance answered (or recorded).
    Dhcp {
        /// The client.
        mac: MacAddr,
        /// The address it was offered or bound (none in proxy mode).
        ip: Option<Ipv4Addr>,
        /// Host name (reservation or option 12).
        hostname: Option<String>,
        /// Architecture (option 93).
        arch: Arch,
        /// Vendor class (option 60), lossy UTF-8.
        vendor_class: Option<String>,
        /// The DHCP message type (`Discover`, `Request`, ...).
        kind: String,
    },
    /// A boot file was sent. TFTP and HTTP see only the client's address; the registry maps
    /// it to a MAC from what DHCP told it, unless the request named the node.
    BootFile {
        /// Client address.
        ip: Ipv4Addr,
        /// The node, when the file names it (per-node script, `?mac=`).
        mac: Option<MacAddr>,
        /// The file's key (`undionly.kpxe`, `vmlinuz`, `52-54-...ipxe`).
        file: String,
        /// Size in bytes.
        size: u64,
        /// TFTP or HTTP.
        via: BootVia,
    },
    /// A tracker announce from a peer.
    Announce {
        /// Peer address.
        ip: Ipv4Addr,
        /// Hex info-hash.
        info_hash: String,
        /// Bytes downloaded (the peer's own count).
        downloaded: u64,
        /// Bytes uploaded.
        uploaded: u64,
        /// Bytes left.
        left: u64,
    },
    /// The installer asked for its plan (the installer runs).
    PlanFetched {
        /// The node.
        mac: MacAddr,
    },
    /// An installer report (already authorized).
    Report {
        /// The node.
        mac: MacAddr,
        /// What it said.
        report: NodeReport,
    },
    /// The node book changed a node's record (or tells the registry at start).
    Enrolment {
        /// The node.
        mac: MacAddr,
        /// What it is now.
        state: Enrolment,
        /// Its host name, when the record has one.
        hostname: Option<String>,
    },
    /// A node's boot script told it to boot from its local disk.
    LocalBoot {
        /// The node.
        mac: MacAddr,
        /// Why, for the operator.
        why: String,
    },
    /// A foreign DHCP server answered the appliance's periodic watch (at most one event per
    /// server per watch period).
    ForeignDhcp {
        /// Its server identifier (else the offer's source address).
        server: Ipv4Addr,
        /// The address it offered.
        offered: Ipv4Addr,
    },
    /// The appliance's own seed: bytes uploaded so far (all torrents) and archive size.
    Seed {
        /// Bytes uploaded since start.
        uploaded: u64,
        /// Size of the largest served archive (what a node downloads).
        archive_size: u64,
    },
}

/// An event with the time it was seen.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// Wall-clock time of the observation.
    pub at: SystemTime,
    /// The observation.
    pub event: NodeEvent,
}

/// Counters of a sink, shared by all its clones.
#[derive(Debug, Default)]
pub struct SinkStats {
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl SinkStats {
    /// Events queued.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Events dropped because the queue was full (or the registry gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The sending side: clone freely; [`EventSink::send`] never waits.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: Option<mpsc::Sender<Stamped>>,
    stats: Arc<SinkStats>,
}

impl EventSink {
    /// A sink with a queue of `capacity` events and its receiving end.
    pub fn bounded(capacity: usize) -> (EventSink, mpsc::Receiver<Stamped>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (EventSink { tx: Some(tx), stats: Arc::default() }, rx)
    }

    /// A sink that discards everything (no monitor; tests of a single service).
    pub fn disabled() -> EventSink {
        EventSink { tx: None, stats: Arc::default() }
    }

    /// Queues `event` if there is room; otherwise drops and counts it.
    /// Returns whether it was queued.
    pub fn send(&self, event: NodeEvent) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(Stamped { at: SystemTime::now(), event }) {
            Ok(()) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The shared counters.
    pub fn stats(&self) -> Arc<SinkStats> {
        self.stats.clone()
    }
}

impl Default for EventSink {
    fn default() -> Self {
        EventSink::disabled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (sink, mut rx) = EventSink::bounded(2);
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        for _ in 0..5 {
            sink.clone().send(NodeEvent::PlanFetched { mac });
        }
        assert_eq!((sink.stats().sent(), sink.stats().dropped()), (2, 3));
        assert!(rx.try_recv().is_ok());
        assert!(EventSink::disabled().send(NodeEvent::PlanFetched { mac }) == false);
    }
}
