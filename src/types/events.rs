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

use super::node_api::NodeReport;
use super::{Arch, InfoHash, Loader, MacAddr};

/// How a boot file went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootVia {
    /// TFTP.
    Tftp,
    /// HTTP.
    Http,
}

/// The DHCP message a client sent (the client-to-server kinds the DHCP service accepts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DhcpKind {
    /// DHCPDISCOVER.
    Discover,
    /// DHCPREQUEST.
    Request,
    /// DHCPDECLINE.
    Decline,
    /// DHCPRELEASE.
    Release,
    /// DHCPINFORM.
    Inform,
}

/// A boot file that marks a step of a node's network boot, by its key (the name it is asked
/// for): what a [`NodeEvent::BootFile`] reports. Helper files (syslinux modules, the generic
/// `boot.ipxe`) are no step and send no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootStep {
    /// A boot loader (`undionly.kpxe`, `snponly.efi`, `pxelinux.0` ...).
    Loader(Loader),
    /// `pxelinux.cfg/01-<mac>` (`Some`) or `pxelinux.cfg/default` (`None`).
    PxelinuxCfg(Option<MacAddr>),
    /// The kernel, `vmlinuz`.
    Kernel,
    /// The initramfs, `initrd.img`.
    Initrd,
    /// The node's iPXE script, `<mac-hyphenated>.ipxe`.
    NodeScript(MacAddr),
}

impl BootStep {
    /// The kernel's key.
    pub const KERNEL: &'static str = "vmlinuz";
    /// The initramfs's key.
    pub const INITRD: &'static str = "initrd.img";
}

impl std::fmt::Display for BootStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootStep::Loader(l) => f.write_str(l.tftp_name()),
            BootStep::PxelinuxCfg(None) => f.write_str("pxelinux.cfg/default"),
            BootStep::PxelinuxCfg(Some(m)) => write!(f, "pxelinux.cfg/01-{}", m.hyphenated()),
            BootStep::Kernel => f.write_str(Self::KERNEL),
            BootStep::Initrd => f.write_str(Self::INITRD),
            BootStep::NodeScript(m) => write!(f, "{}.ipxe", m.hyphenated()),
        }
    }
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
        /// The DHCP message type.
        kind: DhcpKind,
    },
    /// A boot file was sent. TFTP and HTTP see only the client's address; the registry maps
    /// it to a MAC from what DHCP told it, unless the request named the node.
    BootFile {
        /// Client address.
        ip: Ipv4Addr,
        /// The node, when the file names it (per-node script, `?mac=`).
        mac: Option<MacAddr>,
        /// The file, shown by its key (`undionly.kpxe`, `vmlinuz`, `52-54-...ipxe`).
        file: BootStep,
        /// Size in bytes.
        size: u64,
        /// TFTP or HTTP.
        via: BootVia,
    },
    /// A tracker announce from a peer.
    Announce {
        /// Peer address.
        ip: Ipv4Addr,
        /// The torrent announced.
        info_hash: InfoHash,
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
    fn boot_steps_show_as_the_keys_they_are_asked_by() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let rows = [
            (BootStep::Loader(Loader::Undionly), "undionly.kpxe"),
            (BootStep::PxelinuxCfg(None), "pxelinux.cfg/default"),
            (BootStep::PxelinuxCfg(Some(mac)), "pxelinux.cfg/01-52-54-00-12-34-56"),
            (BootStep::Kernel, "vmlinuz"),
            (BootStep::Initrd, "initrd.img"),
            (BootStep::NodeScript(mac), "52-54-00-12-34-56.ipxe"),
        ];
        for (step, key) in rows {
            assert_eq!(step.to_string(), key);
        }
    }

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
