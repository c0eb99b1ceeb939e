//! Property tests of the decoders that read untrusted or crash-damaged bytes, against the
//! library's public API (kept out of the modules so that work on them does not collide):
//! the DHCP lease journal, the tar reader and the BitTorrent wire decoder. For each: arbitrary
//! bytes never panic; what our own encoder writes decodes back to the same value; a truncated
//! input is an error or "need more", never a wrong value. (The HTTP response parser's
//! properties live next to it, in src/net/http_client_tests.rs.)
//! No root and no network: an ordinary test binary.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use si_appliance::dhcp::leases::{self, Change, Lease, LeaseState};
use si_appliance::image::tarr::TarReader;
use si_appliance::swarm::engine::wire::{self, Handshake, Msg};
use si_appliance::types::MacAddr;

// ---- lease journal ----

fn change() -> impl Strategy<Value = Change> {
    let mac = any::<[u8; 6]>().prop_map(MacAddr);
    let ip = any::<u32>().prop_map(Ipv4Addr::from);
    prop_oneof![
        (mac.clone(), ip.clone(), any::<u64>(), proptest::option::of("[a-z0-9-]{1,40}")).prop_map(|(mac, ip, expires, hostname)| {
            Change::Bind(Lease { mac, ip, expires, state: LeaseState::Bound, hostname })
        }),
        (mac.clone(), ip.clone(), any::<u64>()).prop_map(|(mac, ip, at)| Change::Release { mac, ip, at }),
        (mac, ip, any::<u64>()).prop_map(|(mac, ip, until)| Change::Decline { mac, ip, until }),
    ]
}

/// A journal file as the service writes it: the header of a snapshot of an empty table, then
/// the records.
fn journal(changes: &[Change]) -> Vec<u8> {
    let mut out = leases::snapshot(&leases::Leases::new(), 0);
    for c in changes {
        assert!(leases::encode_record(c, &mut out), "durable change");
    }
    out
}

proptest! {
    #[test]
    fn journal_scan_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..700), magic in any::<bool>()) {
        let bytes = if magic { [journal(&[]), bytes].concat() } else { bytes };
        let s = leases::scan(&bytes);
        // Every byte is a record, damage or tail: nothing is counted twice or lost.
        let (_, lost) = leases::read_records(&bytes);
        prop_assert!(lost <= bytes.len());
        prop_assert!(s.tail <= bytes.len());
    }

    #[test]
    fn journal_records_round_trip(changes in prop::collection::vec(change(), 0..20)) {
        let s = leases::scan(&journal(&changes));
        prop_assert_eq!(s.records, changes);
        prop_assert!(s.damaged.is_empty());
        prop_assert_eq!(s.tail, 0);
    }

    #[test]
    fn a_torn_journal_keeps_a_prefix_of_its_records_and_counts_the_rest(
        changes in prop::collection::vec(change(), 1..12),
        cut in any::<prop::sample::Index>(),
    ) {
        let full = journal(&changes);
        let head = journal(&[]).len();
        let keep = head + cut.index(full.len() - head);
        let s = leases::scan(&full[..keep]);
        // Never a record that was not written, never a changed one: a prefix, and the torn
        // bytes are reported as the tail.
        prop_assert!(s.records.len() < changes.len());
        prop_assert_eq!(&s.records[..], &changes[..s.records.len()]);
        prop_assert_eq!(journal(&s.records).len() + s.tail, keep);
    }
}

// ---- tar reader ----

/// Reads a whole archive: every entry's name and data, or the first error. Bounded: a reader
/// that loops would hit the entry cap and fail the test.
fn read_tar(bytes: &[u8]) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut t = TarReader::new(bytes);
    let mut out = Vec::new();
    while let Some(h) = t.next_entry()? {
        assert!(out.len() < 10_000, "reader does not advance");
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = t.read_data(&mut buf)?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        out.push((h.name, data));
    }
    Ok(out)
}

/// What the crate's packer writes for a tree of regular files (uncompressed).
fn pack(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    for (name, data) in files {
        std::fs::write(root.join(name), data).expect("write");
    }
    let nodes = si_appliance::image::scan::scan(&root, &Default::default()).expect("scan");
    let opts = si_appliance::image::pack::PackOptions { zstd_level: None, ..Default::default() };
    let (_, out) = si_appliance::image::pack::write_archive(&root, &nodes, None, None, &opts, &dir.path().join("a.tar"), Vec::new())
        .expect("pack");
    out
}

fn files() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::btree_map("[a-z]{1,8}", prop::collection::vec(any::<u8>(), 0..1500), 1..5)
        .prop_map(|m| m.into_iter().collect())
}

/// The regular files of a read archive, by name (the packer adds the root directory).
fn regular(entries: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = entries
        .into_iter()
        .map(|(n, d)| (String::from_utf8_lossy(&n).trim_start_matches("./").trim_end_matches('/').to_owned(), d))
        .filter(|(n, _)| !n.is_empty() && n != ".")
        .collect();
    v.sort();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn tar_reader_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let _ = read_tar(&bytes);
    }

    #[test]
    fn tar_reader_never_panics_on_a_mangled_archive(
        files in files(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = pack(&files);
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        let _ = read_tar(&bytes);
    }

    #[test]
    fn tar_reader_reads_back_what_the_packer_wrote(files in files()) {
        let got = read_tar(&pack(&files)).expect("read");
        prop_assert_eq!(regular(got), files);
    }

    #[test]
    fn a_truncated_archive_is_an_error_never_short_data(files in files(), cut in any::<prop::sample::Index>()) {
        let bytes = pack(&files);
        let keep = cut.index(bytes.len());
        // An error, or (a cut in the end blocks) entries that are all whole: never a file read
        // short or a name that was not written.
        if let Ok(entries) = read_tar(&bytes[..keep]) {
            for (name, data) in &regular(entries) {
                let want = files.iter().find(|(n, _)| n == name).map(|(_, d)| d);
                prop_assert_eq!(Some(data), want, "entry {} read short", name);
            }
        }
    }
}

// ---- BitTorrent wire ----

fn msg() -> impl Strategy<Value = Msg> {
    let u = any::<u32>();
    prop_oneof![
        Just(Msg::KeepAlive),
        Just(Msg::Choke),
        Just(Msg::Unchoke),
        Just(Msg::Interested),
        Just(Msg::NotInterested),
        u.clone().prop_map(Msg::Have),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Msg::Bitfield),
        (u.clone(), u.clone(), u.clone()).prop_map(|(piece, begin, len)| Msg::Request { piece, begin, len }),
        (u.clone(), u.clone(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(piece, begin, data)| Msg::Piece { piece, begin, data }),
        (u.clone(), u.clone(), u).prop_map(|(piece, begin, len)| Msg::Cancel { piece, begin, len }),
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(id, payload)| Msg::Extended { id, payload }),
    ]
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime")
}

/// Every message in a byte stream, as the connection's read loop decodes it.
fn read_all(bytes: &[u8], max: u32) -> Result<Vec<Msg>, wire::WireError> {
    rt().block_on(async {
        let mut r = bytes;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while !r.is_empty() {
            out.push(wire::read_msg(&mut r, &mut buf, max).await?);
        }
        Ok(out)
    })
}

proptest! {
    #[test]
    fn wire_decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200), max in 0u32..400) {
        let _ = Msg::decode(&bytes);
        let _ = read_all(&bytes, max);
        if let Ok(b) = <[u8; wire::HANDSHAKE_LEN]>::try_from(&bytes[..bytes.len().min(wire::HANDSHAKE_LEN)]) {
            let _ = Handshake::decode(&b);
        }
        let _ = wire::parse_bitfield(&bytes, max);
    }

    #[test]
    fn wire_messages_round_trip_through_a_stream(msgs in prop::collection::vec(msg(), 0..10)) {
        let bytes: Vec<u8> = msgs.iter().flat_map(Msg::encode).collect();
        prop_assert_eq!(read_all(&bytes, 1 << 20).expect("decode"), msgs);
    }

    #[test]
    fn a_truncated_wire_message_is_an_error_never_a_shorter_message(m in msg(), cut in any::<prop::sample::Index>()) {
        let bytes = m.encode();
        let keep = cut.index(bytes.len());
        // A cut at 0 is an empty stream (no message), anything else must fail.
        prop_assume!(keep > 0);
        prop_assert!(read_all(&bytes[..keep], 1 << 20).is_err(), "{:?} cut at {}", m, keep);
    }

    #[test]
    fn handshakes_and_bitfields_round_trip(info_hash in any::<[u8; 20]>(), peer_id in any::<[u8; 20]>(), extensions in any::<bool>(), have in prop::collection::vec(any::<bool>(), 0..100)) {
        let h = Handshake { info_hash, peer_id, extensions };
        prop_assert_eq!(Handshake::decode(&h.encode()).expect("decode"), h);
        prop_assert_eq!(wire::parse_bitfield(&wire::bitfield(&have), have.len() as u32), Some(have));
    }
}
