//! Room in the kernel's neighbour tables (ARP, NDP) for every node of the segment.
//!
//! The appliance talks to every node on its link at once (boot files, the plan, the seed's
//! connections, the monitor), so its ARP table holds one entry per node. Linux sizes that table
//! per machine with `net.ipv4.neigh.default.gc_thresh1/2/3` (128/512/1024 by default): above
//! thresh2 it collects entries older than 5 s on every new one, and at thresh3 it cannot create
//! one at all ("neighbour table overflow"; a send gets ENOBUFS and the SYN or the DHCP ACK never
//! leaves). A rack of 1000 nodes plus the switch's other hosts is past both. Cluster tools tell
//! the admin to raise them (xCAT, Warewulf docs); the appliance, which owns the machine it boots
//! on, raises them itself at start to fit the segment (never lowers them) and says so.
//!
//! The same cap broke this project's own emulation: every network namespace shares the one
//! table, and N = 128 emulated nodes that all talk to each other need about N² entries.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{debug, info};

/// The three thresholds, as the kernel names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Below this many entries nothing is collected.
    pub thresh1: u64,
    /// Above this many, entries older than 5 s are collected.
    pub thresh2: u64,
    /// The hard cap.
    pub thresh3: u64,
}

/// Hosts besides the pools' that may share the segment (switches, BMCs, the admin's laptop).
pub const OTHER_HOSTS: u64 = 256;
/// Never asked for more than this (a /8 pool would ask for 16 M entries of ~340 bytes each).
pub const MAX_HOSTS: u64 = 1 << 20;

/// The limits that hold `hosts` neighbours with no collection and no overflow: every one of them
/// below thresh1 (no churn of live entries), thresh2 and thresh3 with room above.
pub fn wanted(hosts: u64) -> Limits {
    let n = hosts.saturating_add(OTHER_HOSTS).min(MAX_HOSTS);
    Limits { thresh1: n, thresh2: 2 * n, thresh3: 4 * n }
}

/// A limit that was raised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Raised {
    /// The sysctl file.
    pub file: PathBuf,
    /// Its value before.
    pub was: u64,
    /// Its value now.
    pub now: u64,
}

/// Errors raising a limit.
#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    /// A sysctl file could not be read, parsed or written.
    #[error("{}: {source}", file.display())]
    Sysctl {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Raises the IPv4 and IPv6 thresholds under `root` (`/proc/sys/net` on a real machine) to
/// [`wanted`]`(hosts)` where they are lower. A family whose files do not exist (IPv6 off, or a
/// network namespace other than the initial one, where the kernel does not show them) is skipped.
///
/// # Errors
/// [`NeighError`] when a file exists but cannot be read or written (not root); the thresholds
/// already raised stay raised.
pub fn raise_under(root: &Path, hosts: u64) -> Result<Vec<Raised>, NeighError> {
    let want = wanted(hosts);
    let mut out = Vec::new();
    for fam in ["ipv4", "ipv6"] {
        let dir = root.join(fam).join("neigh/default");
        if !dir.join("gc_thresh3").exists() {
            debug!(dir = %dir.display(), "no neighbour-table limits here: skipped");
            continue;
        }
        // The cap first, so that thresh2 is never above it in between.
        for (k, v) in [(3, want.thresh3), (2, want.thresh2), (1, want.thresh1)] {
            let file = dir.join(format!("gc_thresh{k}"));
            let err = |source| NeighError::Sysctl { file: file.clone(), source };
            let text = fs::read_to_string(&file).map_err(err)?;
            let was: u64 = text.trim().parse().map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            if was < v {
                fs::write(&file, v.to_string()).map_err(err)?;
                out.push(Raised { file, was, now: v });
            }
        }
    }
    Ok(out)
}

/// [`raise_under`] on this machine's `/proc/sys/net`, logged.
///
/// # Errors
/// As [`raise_under`].
pub fn raise(hosts: u64) -> Result<Vec<Raised>, NeighError> {
    let r = raise_under(Path::new("/proc/sys/net"), hosts)?;
    for x in &r {
        info!(file = %x.file.display(), was = x.was, now = x.now, hosts, "neighbour-table limit raised to hold every node of the segment");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(v4: [u64; 3], v6: Option<[u64; 3]>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (fam, vals) in [("ipv4", Some(v4)), ("ipv6", v6)] {
            let Some(vals) = vals else { continue };
            let dir = d.path().join(fam).join("neigh/default");
            fs::create_dir_all(&dir).unwrap();
            for (k, v) in (1..=3).zip(vals) {
                fs::write(dir.join(format!("gc_thresh{k}")), format!("{v}\n")).unwrap();
            }
        }
        d
    }

    fn read(d: &Path, fam: &str, k: u32) -> u64 {
        fs::read_to_string(d.join(fam).join(format!("neigh/default/gc_thresh{k}"))).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn a_rack_gets_room_and_nothing_is_lowered() {
        // The kernel's defaults and 1000 nodes: all three raised, both families.
        let d = tree([128, 512, 1024], Some([128, 512, 1024]));
        let r = raise_under(d.path(), 1000).unwrap();
        assert_eq!(r.len(), 6, "{r:?}");
        for fam in ["ipv4", "ipv6"] {
            assert_eq!([read(d.path(), fam, 1), read(d.path(), fam, 2), read(d.path(), fam, 3)], [1256, 2512, 5024]);
        }
        // Run again: nothing to do.
        assert!(raise_under(d.path(), 1000).unwrap().is_empty());
        // An admin's higher values stay; only what is below is raised.
        let d = tree([4096, 512, 65536], None);
        let r = raise_under(d.path(), 1000).unwrap();
        assert_eq!(r, vec![Raised { file: d.path().join("ipv4/neigh/default/gc_thresh2"), was: 512, now: 2512 }]);
        assert_eq!(read(d.path(), "ipv4", 1), 4096);
        assert_eq!(read(d.path(), "ipv4", 3), 65536);
    }

    #[test]
    fn a_small_segment_changes_nothing_and_absent_files_are_skipped() {
        // A /24: 254 + 256 fits the defaults' thresh3 but not thresh1/2 (GC churn above 128).
        assert_eq!(wanted(254), Limits { thresh1: 510, thresh2: 1020, thresh3: 2040 });
        // No IPv6 files (ipv6 disabled), no files at all (a non-initial namespace): fine.
        let d = tree([100_000, 200_000, 400_000], None);
        assert!(raise_under(d.path(), 254).unwrap().is_empty());
        let empty = tempfile::tempdir().unwrap();
        assert!(raise_under(empty.path(), 1000).unwrap().is_empty());
        // A huge pool is capped.
        assert_eq!(wanted(u64::MAX).thresh1, MAX_HOSTS);
    }

    #[test]
    fn an_unreadable_value_is_an_error_naming_the_file() {
        let d = tree([128, 512, 1024], None);
        fs::write(d.path().join("ipv4/neigh/default/gc_thresh2"), "lots\n").unwrap();
        let e = raise_under(d.path(), 1000).unwrap_err();
        assert!(e.to_string().contains("gc_thresh2"), "{e}");
    }
}
