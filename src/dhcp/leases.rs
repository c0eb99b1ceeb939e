//! The lease table (in memory, pure) and its journal on disk. The crash rules are in LEASES.md
//! beside this file; read them before changing the record format or the commit order.
//!
//! Invariants kept by [`Leases::apply`]: an address has at most one entry (so at most one
//! MAC), and a MAC has at most one entry. Times are Unix seconds so they survive restarts.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::types::MacAddr;

/// State of one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Offered, not yet requested. Held briefly in memory, never journaled.
    Offered,
    /// Acknowledged: the client holds it until `expires`.
    Bound,
    /// Released by the client: free for anyone, but its MAC gets it back first.
    Released,
    /// Declined (someone else answers ARP for it): on probation until `expires`, no owner.
    Declined,
}

/// One address's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Holder (for `Declined`: the client that declined it).
    pub mac: MacAddr,
    /// The address.
    pub ip: Ipv4Addr,
    /// End of the lease, offer hold or probation (Unix seconds); release time for `Released`.
    pub expires: u64,
    /// State.
    pub state: LeaseState,
    /// Host name sent to the client (option 12), if any.
    pub hostname: Option<String>,
}

/// A change to the table, produced by the policy and applied by the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Hold `ip` for `mac` until `until` (memory only).
    Offer {
        /// Client.
        mac: MacAddr,
        /// Address.
        ip: Ipv4Addr,
        /// End of the hold.
        until: u64,
    },
    /// Bind (journaled and fsync'd before the ACK leaves).
    Bind(Lease),
    /// The client released its address (journaled).
    Release {
        /// Client.
        mac: MacAddr,
        /// Address.
        ip: Ipv4Addr,
        /// When.
        at: u64,
    },
    /// The client declined the address: probation until `until` (journaled).
    Decline {
        /// Client.
        mac: MacAddr,
        /// Address.
        ip: Ipv4Addr,
        /// End of probation.
        until: u64,
    },
    /// The client chose another server: drop our offer (memory only).
    ForgetOffer {
        /// Client.
        mac: MacAddr,
    },
}

impl Change {
    /// Whether the change must reach the disk before its reply is sent.
    pub fn is_durable(&self) -> bool {
        matches!(self, Change::Bind(_) | Change::Release { .. } | Change::Decline { .. })
    }
}

/// The lease table.
#[derive(Clone, Debug, Default)]
pub struct Leases {
    by_ip: HashMap<Ipv4Addr, Lease>,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
}

impl Leases {
    /// An empty table.
    pub fn new() -> Leases {
        Leases::default()
    }

    /// The entry for an address.
    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// The entry owned by a MAC (not `Declined` ones).
    pub fn of_mac(&self, mac: MacAddr) -> Option<&Lease> {
        let ip = self.by_mac.get(&mac)?;
        self.by_ip.get(ip).filter(|l| l.mac == mac)
    }

    /// Whether `mac` may be given `ip` at `now`: nobody else holds it (bound or offered and
    /// unexpired) and it is not on probation.
    pub fn available_to(&self, ip: Ipv4Addr, mac: MacAddr, now: u64) -> bool {
        match self.by_ip.get(&ip) {
            None => true,
            Some(l) => match l.state {
                LeaseState::Declined => l.expires <= now,
                LeaseState::Released => true,
                LeaseState::Bound | LeaseState::Offered => l.mac == mac || l.expires <= now,
            },
        }
    }

    /// Whether `ip` was never used (preferred for new clients, RFC 2131 §4.3.1).
    pub fn is_unused(&self, ip: Ipv4Addr) -> bool {
        !self.by_ip.contains_key(&ip)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// All entries (any order).
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_ip.values()
    }

    fn remove_ip(&mut self, ip: Ipv4Addr) {
        if let Some(old) = self.by_ip.remove(&ip) {
            if self.by_mac.get(&old.mac) == Some(&ip) {
                self.by_mac.remove(&old.mac);
            }
        }
    }

    fn insert(&mut self, lease: Lease) {
        // One entry per MAC: its previous address is given up.
        if let Some(prev) = self.by_mac.get(&lease.mac).copied() {
            if prev != lease.ip {
                self.remove_ip(prev);
            }
        }
        // One MAC per address: whoever had it before loses it.
        self.remove_ip(lease.ip);
        if lease.state != LeaseState::Declined {
            self.by_mac.insert(lease.mac, lease.ip);
        }
        self.by_ip.insert(lease.ip, lease);
    }

    /// Applies a change; returns whether it changed anything.
    pub fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::Offer { mac, ip, until } => {
                if let Some(l) = self.by_ip.get(ip) {
                    // Never downgrade the client's own binding to an offer.
                    if l.mac == *mac && l.state == LeaseState::Bound && l.expires >= *until {
                        return false;
                    }
                }
                let hostname = self.by_ip.get(ip).filter(|l| l.mac == *mac).and_then(|l| l.hostname.clone());
                self.insert(Lease { mac: *mac, ip: *ip, expires: *until, state: LeaseState::Offered, hostname });
                true
            }
            Change::Bind(l) => {
                self.insert(l.clone());
                true
            }
            Change::Release { mac, ip, at } => match self.by_ip.get_mut(ip) {
                Some(l) if l.mac == *mac && l.state != LeaseState::Declined => {
                    l.state = LeaseState::Released;
                    l.expires = *at;
                    true
                }
                _ => false,
            },
            Change::Decline { mac, ip, until } => {
                self.insert(Lease { mac: *mac, ip: *ip, expires: *until, state: LeaseState::Declined, hostname: None });
                true
            }
            Change::ForgetOffer { mac } => match self.of_mac(*mac) {
                Some(l) if l.state == LeaseState::Offered => {
                    let ip = l.ip;
                    self.remove_ip(ip);
                    true
                }
                _ => false,
            },
        }
    }

    /// Puts back `old` as the entry of `ip` (or none): undoes a change whose record did not
    /// reach the journal. Restore the entries a change touched in reverse order.
    pub fn restore(&mut self, ip: Ipv4Addr, old: Option<Lease>) {
        self.remove_ip(ip);
        if let Some(o) = old {
            self.insert(o);
        }
    }

    /// The entries a change may touch, for [`Leases::restore`]: its address and the address
    /// its MAC held before (first to restore last).
    pub fn touched_by(&self, change: &Change) -> Vec<(Ipv4Addr, Option<Lease>)> {
        let (mac, ip) = match change {
            Change::Bind(l) => (l.mac, l.ip),
            Change::Offer { mac, ip, .. } | Change::Release { mac, ip, .. } | Change::Decline { mac, ip, .. } => (*mac, *ip),
            Change::ForgetOffer { mac } => match self.by_mac.get(mac) {
                Some(ip) => (*mac, *ip),
                None => return Vec::new(),
            },
        };
        let mut v = Vec::with_capacity(2);
        if let Some(prev) = self.by_mac.get(&mac).copied().filter(|p| *p != ip) {
            v.push((prev, self.by_ip.get(&prev).cloned()));
        }
        v.push((ip, self.by_ip.get(&ip).cloned()));
        v
    }

    /// Checks the table's invariants (for tests): the two maps agree.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (mac, ip) in &self.by_mac {
            match self.by_ip.get(ip) {
                Some(l) if l.mac == *mac && l.state != LeaseState::Declined => {}
                other => return Err(format!("by_mac {mac} -> {ip} but by_ip has {other:?}")),
            }
        }
        for (ip, l) in &self.by_ip {
            if l.ip != *ip {
                return Err(format!("entry under {ip} says {}", l.ip));
            }
            if l.state != LeaseState::Declined && self.by_mac.get(&l.mac) != Some(ip) {
                return Err(format!("{ip} held by {} which maps elsewhere", l.mac));
            }
        }
        Ok(())
    }
}

/// Errors of the lease journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Creating the state directory or opening/reading the journal failed.
    #[error("opening lease journal {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Appending or fsync'ing failed: the batch's ACKs are not sent.
    #[error("writing lease journal {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the compacted journal or renaming it into place failed.
    #[error("compacting lease journal {path}")]
    Compact {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What replaying the journal found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Records applied.
    pub records: usize,
    /// Bytes dropped at the end (a torn or corrupt tail).
    pub dropped_bytes: usize,
    /// Damaged stretches in the middle, skipped to the next good record: (offset in the file,
    /// length). Empty for a journal that is whole or only torn at its end.
    pub damaged: Vec<(usize, usize)>,
    /// Where the damaged journal was kept before compaction rewrote it (only when `damaged`).
    pub kept_aside: Option<PathBuf>,
}

const FILE_MAGIC: &[u8; 8] = b"SIALEAS1";
const KIND_BIND: u8 = 1;
const KIND_RELEASE: u8 = 2;
const KIND_DECLINE: u8 = 3;
/// Record header: payload length (u16 LE) + CRC-32 of the payload (u32 LE).
const REC_HEADER: usize = 6;

/// CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320), table built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Encodes one durable change as a framed record; `None` for memory-only changes.
pub fn encode_record(change: &Change, out: &mut Vec<u8>) -> bool {
    let (kind, mac, ip, t, host) = match change {
        Change::Bind(l) => (KIND_BIND, l.mac, l.ip, l.expires, l.hostname.as_deref()),
        Change::Release { mac, ip, at } => (KIND_RELEASE, *mac, *ip, *at, None),
        Change::Decline { mac, ip, until } => (KIND_DECLINE, *mac, *ip, *until, None),
        Change::Offer { .. } | Change::ForgetOffer { .. } => return false,
    };
    let host = host.map(str::as_bytes).unwrap_or_default();
    let host = &host[..host.len().min(255)];
    let mut p = Vec::with_capacity(20 + host.len());
    p.push(kind);
    p.extend_from_slice(&mac.0);
    p.extend_from_slice(&ip.octets());
    p.extend_from_slice(&t.to_le_bytes());
    p.push(host.len() as u8);
    p.extend_from_slice(host);
    out.extend_from_slice(&(p.len() as u16).to_le_bytes());
    out.extend_from_slice(&crc32(&p).to_le_bytes());
    out.extend_from_slice(&p);
    true
}

fn decode_payload(p: &[u8]) -> Option<Change> {
    if p.len() < 20 {
        return None;
    }
    let mac = MacAddr(p[1..7].try_into().ok()?);
    let ip = Ipv4Addr::new(p[7], p[8], p[9], p[10]);
    let t = u64::from_le_bytes(p[11..19].try_into().ok()?);
    let hl = p[19] as usize;
    let host = p.get(20..20 + hl)?;
    let hostname = if hl == 0 { None } else { Some(String::from_utf8_lossy(host).into_owned()) };
    match p[0] {
        KIND_BIND => Some(Change::Bind(Lease { mac, ip, expires: t, state: LeaseState::Bound, hostname })),
        KIND_RELEASE => Some(Change::Release { mac, ip, at: t }),
        KIND_DECLINE => Some(Change::Decline { mac, ip, until: t }),
        _ => None,
    }
}

/// Largest record payload: the fixed fields and a 255-byte host name.
const MAX_PAYLOAD: usize = 20 + 255;

/// The record at `at` in `body`, with its framed length, if it is whole and checks out.
fn record_at(body: &[u8], at: usize) -> Option<(Change, usize)> {
    let h = body.get(at..at + REC_HEADER)?;
    let len = u16::from_le_bytes([h[0], h[1]]) as usize;
    if !(20..=MAX_PAYLOAD).contains(&len) {
        return None;
    }
    let crc = u32::from_le_bytes([h[2], h[3], h[4], h[5]]);
    let p = body.get(at + REC_HEADER..at + REC_HEADER + len)?;
    if crc32(p) != crc {
        return None;
    }
    Some((decode_payload(p)?, REC_HEADER + len))
}

/// What [`scan`] found in journal bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// The good records, in order.
    pub records: Vec<Change>,
    /// Damaged stretches followed by good records: (offset in the file, length).
    pub damaged: Vec<(usize, usize)>,
    /// Bytes at the end after the last good record (a torn append).
    pub tail: usize,
}

/// Decodes journal bytes into their records, in order. A record that is short, fails its
/// checksum or has an unknown kind starts a damaged stretch: the scan looks for the next offset
/// where a whole, checksummed record begins and goes on from there, so one bad sector or a
/// corrupted record in the middle costs only what it overwrote. Damage with no good record after
/// it is a torn tail (a crash while appending).
pub fn scan(bytes: &[u8]) -> Scan {
    let Some(body) = bytes.strip_prefix(FILE_MAGIC.as_slice()) else {
        return Scan { tail: bytes.len(), ..Scan::default() };
    };
    let mut out = Scan::default();
    let mut i = 0;
    while i < body.len() {
        if let Some((change, n)) = record_at(body, i) {
            out.records.push(change);
            i += n;
            continue;
        }
        // Damage at i: the next good record, if any.
        match (i + 1..body.len()).find(|&j| record_at(body, j).is_some()) {
            Some(j) => {
                out.damaged.push((FILE_MAGIC.len() + i, j - i));
                i = j;
            }
            None => {
                out.tail = body.len() - i;
                break;
            }
        }
    }
    out
}

/// The good records of journal bytes and the number of bytes that were not (see [`scan`]).
pub fn read_records(bytes: &[u8]) -> (Vec<Change>, usize) {
    let s = scan(bytes);
    let lost = s.tail + s.damaged.iter().map(|(_, n)| n).sum::<usize>();
    (s.records, lost)
}

/// Replays journal bytes into `leases` (see [`scan`] for what is skipped).
pub fn replay(bytes: &[u8], leases: &mut Leases) -> Replay {
    let s = scan(bytes);
    for c in &s.records {
        leases.apply(c);
    }
    Replay { records: s.records.len(), dropped_bytes: s.tail, damaged: s.damaged, kept_aside: None }
}

/// Snapshot records of a table: what compaction writes. Offers are not kept; expired
/// probations are dropped; bound and released entries are kept so clients get their address
/// back.
pub fn snapshot(leases: &Leases, now: u64) -> Vec<u8> {
    let mut out = FILE_MAGIC.to_vec();
    let mut all: Vec<&Lease> = leases.iter().collect();
    all.sort_by_key(|l| l.ip);
    for l in all {
        let ch = match l.state {
            LeaseState::Offered => continue,
            LeaseState::Declined if l.expires <= now => continue,
            LeaseState::Declined => Change::Decline { mac: l.mac, ip: l.ip, until: l.expires },
            LeaseState::Bound => Change::Bind(l.clone()),
            LeaseState::Released => {
                // A release is a bind followed by a release record.
                encode_record(&Change::Bind(Lease { state: LeaseState::Bound, ..l.clone() }), &mut out);
                Change::Release { mac: l.mac, ip: l.ip, at: l.expires }
            }
        };
        encode_record(&ch, &mut out);
    }
    out
}

/// The append-only journal. Durable changes are staged, then written and fsync'd together by
/// [`Journal::commit`] (group commit: one fsync per batch of ACKs).
pub struct Journal {
    path: PathBuf,
    file: File,
    staged: Vec<u8>,
    records: usize,
    /// Bytes known to be in the file: a failed append is cut back to this.
    len: u64,
}

impl Journal {
    /// The journal's file name under the state directory.
    pub const FILE: &'static str = "dhcp-leases.journal";

    /// Opens (or creates) `<dir>/dhcp-leases.journal`, replays it, and compacts it at once (so a
    /// torn tail is cut off before anything is appended after it).
    ///
    /// # Errors
    /// [`JournalError::Open`] or [`JournalError::Compact`].
    pub fn open(dir: &Path, now: u64) -> Result<(Journal, Leases, Replay), JournalError> {
        let path = dir.join(Self::FILE);
        let open_err = |source| JournalError::Open { path: path.clone(), source };
        fs::create_dir_all(dir).map_err(open_err)?;
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes).map_err(open_err)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e)),
        }
        let mut leases = Leases::new();
        let mut rep = if bytes.is_empty() { Replay::default() } else { replay(&bytes, &mut leases) };
        if !rep.damaged.is_empty() {
            // Compaction is about to rewrite the journal from what could be read: keep the
            // damaged file for a look (and for a better recovery by hand) first.
            let aside = path.with_extension(format!("journal.damaged-{now}"));
            fs::copy(&path, &aside).map_err(open_err)?;
            rep.kept_aside = Some(aside);
        }
        let snap = snapshot(&leases, now);
        let file = Self::write_compacted(&path, &snap)?;
        let records = leases.len();
        Ok((Journal { path, file, staged: Vec::new(), records, len: snap.len() as u64 }, leases, rep))
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_compacted(path: &Path, bytes: &[u8]) -> Result<File, JournalError> {
        let err = |source| JournalError::Compact { path: path.to_owned(), source };
        let tmp = path.with_extension("journal.tmp");
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            // A partial temp file would only hold the space a full disk needs back.
            let _ = fs::remove_file(&tmp);
            return Err(err(e));
        }
        fs::rename(&tmp, path).map_err(err)?;
        // The rename is durable only once the directory is synced.
        if let Some(parent) = path.parent() {
            File::open(parent).and_then(|d| d.sync_all()).map_err(err)?;
        }
        OpenOptions::new().append(true).open(path).map_err(err)
    }

    /// Stages a change's record if it is durable; returns whether it was.
    pub fn stage(&mut self, change: &Change) -> bool {
        let staged = encode_record(change, &mut self.staged);
        if staged {
            self.records += 1;
        }
        staged
    }

    /// Whether records wait for [`Journal::commit`].
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Writes the staged records and fsyncs (fdatasync). Replies whose changes were staged may
    /// be sent only after this returns Ok.
    ///
    /// # Errors
    /// [`JournalError::Write`]; the staged records are dropped and their replies must not go.
    pub fn commit(&mut self) -> Result<(), JournalError> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(&self.staged).and_then(|()| self.file.sync_data());
        let n = self.staged.len() as u64;
        self.staged.clear();
        match r {
            Ok(()) => {
                self.len += n;
                Ok(())
            }
            Err(source) => {
                // Cut off what part of the batch reached the file (a torn record would be a
                // damaged stretch for the next replay). Best effort: replay copes if this fails.
                let _ = self.file.set_len(self.len);
                Err(JournalError::Write { path: self.path.clone(), source })
            }
        }
    }

    /// Whether the journal has grown enough past the live table to be worth compacting.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.records > 4096 + 4 * live
    }

    /// Rewrites the journal as a snapshot of `leases` (temp file, fsync, rename, fsync dir).
    /// Call only with nothing staged.
    ///
    /// # Errors
    /// [`JournalError::Compact`].
    pub fn compact(&mut self, leases: &Leases, now: u64) -> Result<(), JournalError> {
        self.staged.clear();
        let snap = snapshot(leases, now);
        self.file = Self::write_compacted(&self.path, &snap)?;
        self.records = leases.len();
        self.len = snap.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }
    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }
    fn bind(m: u8, i: u8, exp: u64) -> Change {
        Change::Bind(Lease { mac: mac(m), ip: ip(i), expires: exp, state: LeaseState::Bound, hostname: None })
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn restart_keeps_leases_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, mut l, _) = Journal::open(dir.path(), 100).unwrap();
            for c in [bind(1, 10, 1000), bind(2, 11, 1000)] {
                l.apply(&c);
                assert!(j.stage(&c));
            }
            j.commit().unwrap();
        }
        // Simulate a crash in the middle of appending a third record.
        let path = dir.path().join(Journal::FILE);
        let mut rec = Vec::new();
        encode_record(&bind(3, 12, 1000), &mut rec);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&rec[..rec.len() - 3]).unwrap();
        drop(f);
        let (_j, l, rep) = Journal::open(dir.path(), 200).unwrap();
        assert_eq!(rep.records, 2);
        assert_eq!(rep.dropped_bytes, rec.len() - 3);
        assert_eq!(l.of_mac(mac(1)).unwrap().ip, ip(10));
        assert_eq!(l.of_mac(mac(2)).unwrap().ip, ip(11));
        assert!(l.of_mac(mac(3)).is_none());
        // The compaction on open cut the tail: a third open drops nothing.
        let (_j, _l, rep) = Journal::open(dir.path(), 200).unwrap();
        assert_eq!(rep.dropped_bytes, 0);
    }

    #[test]
    fn corrupt_last_record_is_a_torn_tail() {
        let mut bytes = FILE_MAGIC.to_vec();
        encode_record(&bind(1, 10, 1000), &mut bytes);
        let good = bytes.len();
        encode_record(&bind(2, 11, 1000), &mut bytes);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let mut l = Leases::new();
        let rep = replay(&bytes, &mut l);
        assert_eq!(rep.records, 1);
        assert_eq!(rep.dropped_bytes, bytes.len() - good);
        assert!(rep.damaged.is_empty());
    }

    /// Issue 13: a corrupt record in the middle stopped the replay, and the compaction at start
    /// then overwrote the journal with the shorter snapshot: every lease after the damage was
    /// lost. Now the replay resyncs on the next good record, and the damaged file is kept.
    #[test]
    fn damage_in_the_middle_skips_to_the_next_good_record_and_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(Journal::FILE);
        let mut bytes = FILE_MAGIC.to_vec();
        let mut offsets = Vec::new();
        for n in 1..=6u8 {
            offsets.push(bytes.len());
            encode_record(&bind(n, 10 + n, 5000), &mut bytes);
        }
        // Record 3: payload garbled (bad CRC); record 4: its length field smashed.
        bytes[offsets[2] + 12] ^= 0x5a;
        bytes[offsets[3]] = 0xff;
        bytes[offsets[3] + 1] = 0xff;
        fs::write(&path, &bytes).unwrap();
        let (_j, l, rep) = Journal::open(dir.path(), 100).unwrap();
        assert_eq!(rep.records, 4, "{rep:?}");
        assert_eq!(rep.damaged, vec![(offsets[2], offsets[4] - offsets[2])]);
        assert_eq!(rep.dropped_bytes, 0);
        for n in [1u8, 2, 5, 6] {
            assert_eq!(l.of_mac(mac(n)).map(|x| x.ip), Some(ip(10 + n)), "lease {n} after the damage was lost");
        }
        assert!(l.of_mac(mac(3)).is_none() && l.of_mac(mac(4)).is_none());
        let aside = rep.kept_aside.expect("the damaged journal was kept aside");
        assert_eq!(fs::read(&aside).unwrap(), bytes, "the kept file is the damaged journal as it was");
        // The rewritten journal holds the four leases and reads clean.
        let (_j, l2, rep2) = Journal::open(dir.path(), 100).unwrap();
        assert_eq!((rep2.records, rep2.damaged.len(), rep2.dropped_bytes), (4, 0, 0));
        assert_eq!(l2.len(), 4);
    }

    /// Garbage that happens to look like a record header is not taken for one (the CRC and the
    /// payload's kind must check out), and a scan of arbitrary bytes never panics.
    #[test]
    fn scan_of_garbage_finds_nothing() {
        let mut bytes = FILE_MAGIC.to_vec();
        bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
        let s = scan(&bytes);
        assert!(s.records.is_empty());
        assert_eq!(s.tail, 4096);
    }

    #[test]
    fn compaction_keeps_state_and_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, mut l, _) = Journal::open(dir.path(), 0).unwrap();
        for round in 0..50u64 {
            for c in [bind(1, 10, 1000 + round), bind(2, 11, 1000 + round)] {
                l.apply(&c);
                j.stage(&c);
            }
        }
        let rel = Change::Release { mac: mac(2), ip: ip(11), at: 500 };
        l.apply(&rel);
        j.stage(&rel);
        j.commit().unwrap();
        let path = dir.path().join(Journal::FILE);
        let before = fs::metadata(&path).unwrap().len();
        j.compact(&l, 600).unwrap();
        let after = fs::metadata(&path).unwrap().len();
        assert!(after < before / 10, "{before} -> {after}");
        drop(j);
        let (_j, l2, _) = Journal::open(dir.path(), 600).unwrap();
        assert_eq!(l2.of_mac(mac(1)).unwrap().expires, 1049);
        assert_eq!(l2.of_mac(mac(2)).unwrap().state, LeaseState::Released);
        assert!(l2.available_to(ip(11), mac(3), 600));
    }

    /// A batch whose commit failed is undone entry by entry: the table is as before it.
    #[test]
    fn undoing_a_failed_batch_restores_the_table() {
        let mut l = Leases::new();
        l.apply(&bind(1, 10, 100));
        l.apply(&bind(2, 11, 50));
        l.apply(&Change::Offer { mac: mac(3), ip: ip(12), until: 60 });
        let before: std::collections::BTreeMap<_, _> = l.iter().map(|x| (x.ip, x.clone())).collect();
        let batch = [
            bind(1, 11, 200), // MAC 1 moves onto MAC 2's (expired) address
            bind(3, 12, 200), // MAC 3 binds its offer
            Change::Release { mac: mac(3), ip: ip(12), at: 70 },
            Change::Decline { mac: mac(2), ip: ip(13), until: 90 },
        ];
        let mut undo = Vec::new();
        for c in &batch {
            undo.extend(l.touched_by(c));
            l.apply(c);
        }
        for (i, old) in undo.into_iter().rev() {
            l.restore(i, old);
        }
        let after: std::collections::BTreeMap<_, _> = l.iter().map(|x| (x.ip, x.clone())).collect();
        assert_eq!(before, after);
        l.check_invariants().unwrap();
        assert_eq!(l.of_mac(mac(1)).map(|x| x.ip), Some(ip(10)));
        assert_eq!(l.of_mac(mac(2)).map(|x| x.ip), Some(ip(11)));
    }

    #[test]
    fn no_address_is_held_by_two_macs() {
        let mut l = Leases::new();
        l.apply(&bind(1, 10, 1000));
        assert!(!l.available_to(ip(10), mac(2), 500));
        assert!(l.available_to(ip(10), mac(1), 500));
        // After expiry someone else may take it; the old holder loses it.
        assert!(l.available_to(ip(10), mac(2), 1000));
        l.apply(&bind(2, 10, 2000));
        assert!(l.of_mac(mac(1)).is_none());
        assert_eq!(l.get(ip(10)).unwrap().mac, mac(2));
        // A MAC moving to another address frees the first.
        l.apply(&bind(2, 11, 2000));
        assert!(l.get(ip(10)).is_none());
        l.check_invariants().unwrap();
    }

    #[test]
    fn expiry_and_probation_follow_the_injected_clock() {
        let mut l = Leases::new();
        l.apply(&Change::Offer { mac: mac(1), ip: ip(10), until: 160 });
        assert!(!l.available_to(ip(10), mac(2), 159));
        assert!(l.available_to(ip(10), mac(2), 160));
        l.apply(&Change::Decline { mac: mac(1), ip: ip(10), until: 700 });
        assert!(!l.available_to(ip(10), mac(1), 699));
        assert!(!l.available_to(ip(10), mac(2), 699));
        assert!(l.available_to(ip(10), mac(2), 700));
        assert!(l.of_mac(mac(1)).is_none());
        // An offer never downgrades a binding.
        l.apply(&bind(3, 12, 5000));
        assert!(!l.apply(&Change::Offer { mac: mac(3), ip: ip(12), until: 100 }));
        assert_eq!(l.get(ip(12)).unwrap().state, LeaseState::Bound);
        l.check_invariants().unwrap();
    }
}
