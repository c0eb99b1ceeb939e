//! The fuzz targets: every parser that reads bytes from the network or from a file a stranger
//! may have written, driven the way the services drive them.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, Architecture, DhcpOption, MessageType};
use dhcproto::{Encodable, Encoder};
use si_appliance::config::{Config, Enroll};
use si_appliance::types::node_api::Phase;
use si_appliance::types::MacAddr;
use si_appliance::dhcp::classify;
use si_appliance::dhcp::leases::{self, Leases};
use si_appliance::dhcp::policy::{self, Decision, Policy, Via};
use si_appliance::net::Iface;
use si_appliance::swarm::tracker::{self, Announce, Tracker, TrackerPolicy};

use super::engine::{shape, sig, variant, State, Target};

/// Every target, in the order the bench runs them.
pub const ALL: &[Target] = &[
    Target { name: "dhcp", max_len: 1500, seeds: dhcp_seeds, run: dhcp_run },
    Target { name: "journal", max_len: 8192, seeds: journal_seeds, run: journal_run },
    Target { name: "tftp", max_len: 600, seeds: tftp_seeds, run: tftp_run },
    Target { name: "tftp-server", max_len: 600, seeds: tftp_seeds, run: tftp_server_run },
    Target { name: "tracker", max_len: 1024, seeds: tracker_seeds, run: tracker_run },
    Target { name: "torrent", max_len: 4096, seeds: torrent_seeds, run: torrent_run },
    Target { name: "wire", max_len: 512, seeds: wire_seeds, run: wire_run },
    Target { name: "tar", max_len: 64 << 10, seeds: tar_seeds, run: tar_run },
];

// ---------------------------------------------------------------------------------------------
// DHCP: datagram → classify::parse → classify → policy::decide (against a lease table that the
// accepted changes update, as the service does) → encode_reply. Oracles: the lease table's
// invariants hold after every change; a reply the policy built always encodes.

struct Dhcp {
    policy: Policy,
    leases: Leases,
    now: u64,
}

fn dhcp_policy() -> Policy {
    let text = "[http]\nport = 8080\n[dhcp]\nprobe = false\n\
                [[dhcp.pool]]\nsubnet = \"10.66.0.0/24\"\nrange = [\"10.66.0.100\", \"10.66.0.119\"]\n\
                [[dhcp.pool]]\nsubnet = \"10.67.0.0/24\"\nrouter = \"10.67.0.1\"\n\
                [[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.66.0.11\"\nhostname = \"node01\"\n";
    let cfg = Config::from_toml(text, Path::new("fuzz")).expect("the fuzz config is valid");
    let iface = Iface { name: "eth9".into(), index: 9, mac: None, ip: Ipv4Addr::new(10, 66, 0, 1), net: "10.66.0.0/24".parse().expect("net") };
    Policy::new(&cfg, &iface)
}

fn dhcp_msg(kind: MessageType, mac: [u8; 6], opts: Vec<DhcpOption>, giaddr: Ipv4Addr, ciaddr: Ipv4Addr) -> Vec<u8> {
    let mut m = v4::Message::default();
    m.set_opcode(v4::Opcode::BootRequest);
    m.set_chaddr(&mac);
    m.set_xid(0x1234_5678);
    m.set_giaddr(giaddr);
    m.set_ciaddr(ciaddr);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o);
    }
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).expect("seed encodes");
    buf
}

fn pxe_opts(arch: u16) -> Vec<DhcpOption> {
    vec![
        DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes()),
        DhcpOption::ClientSystemArchitecture(Architecture(arch)),
        DhcpOption::Unknown(v4::UnknownOption::new(v4::OptionCode::from(97), vec![0; 17])),
    ]
}

fn dhcp_seeds() -> Vec<Vec<u8>> {
    let z = Ipv4Addr::UNSPECIFIED;
    let reserved = [0x52, 0x54, 0, 0, 0, 1];
    let other = [2, 0, 0, 0, 0, 9];
    let mut ipxe = pxe_opts(7);
    ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
    ipxe.push(DhcpOption::Unknown(v4::UnknownOption::new(v4::OptionCode::from(175), vec![1, 1, 1])));
    let mut v = Vec::new();
    for (mac, arch) in [(reserved, 0), (other, 7), (other, 9), (other, 11), (other, 16)] {
        v.push(dhcp_msg(MessageType::Discover, mac, pxe_opts(arch), z, z));
    }
    v.push(dhcp_msg(MessageType::Discover, other, ipxe.clone(), z, z));
    v.push(dhcp_msg(MessageType::Discover, other, vec![DhcpOption::ClassIdentifier(b"si-appliance".to_vec())], z, z));
    v.push(dhcp_msg(MessageType::Discover, other, vec![], z, z));
    let sel = vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 66, 0, 100)), DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 66, 0, 1))];
    v.push(dhcp_msg(MessageType::Request, other, [pxe_opts(0), sel.clone()].concat(), z, z));
    v.push(dhcp_msg(MessageType::Request, other, vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 66, 0, 105))], z, z));
    v.push(dhcp_msg(MessageType::Request, reserved, vec![], z, Ipv4Addr::new(10, 66, 0, 11)));
    v.push(dhcp_msg(MessageType::Release, other, vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 66, 0, 1))], z, Ipv4Addr::new(10, 66, 0, 100)));
    v.push(dhcp_msg(MessageType::Decline, other, sel, z, z));
    v.push(dhcp_msg(MessageType::Inform, other, vec![], z, Ipv4Addr::new(10, 66, 0, 50)));
    v.push(dhcp_msg(MessageType::Discover, other, pxe_opts(7), Ipv4Addr::new(10, 67, 0, 1), z));
    v.push(dhcp_msg(MessageType::Discover, other, pxe_opts(7), Ipv4Addr::BROADCAST, z));
    v
}

fn dhcp_run(st: &mut State, input: &[u8]) -> u64 {
    let s = st.any.get_or_insert_with(|| Box::new(Dhcp { policy: dhcp_policy(), leases: Leases::new(), now: 1_000_000 }));
    let Some(d) = s.downcast_mut::<Dhcp>() else { return 0 };
    d.now += 1;
    let req = match classify::parse(input) {
        Ok(r) => r,
        Err(e) => return sig(("malformed", shape(&format!("{e:?}")))),
    };
    let client = classify::classify(&req);
    // The last byte picks the port it came in on (67, or 4011 from the client's address).
    let via = if input.last().is_some_and(|b| b & 1 == 1) {
        Via::PxeService(SocketAddrV4::new(Ipv4Addr::new(10, 66, 0, 100), 4011))
    } else {
        Via::Dhcp
    };
    // The byte before it sets what the service knows beyond the table (journal health, the
    // new-client limiter, enrolment, the packet's source address).
    let g = input.len().checked_sub(2).map_or(0, |i| input[i]);
    let guard = policy::Guard {
        journal_ok: g & 2 == 0,
        new_allowed: g & 4 == 0,
        known: g & 8 != 0,
        src: (g & 16 != 0).then(|| Ipv4Addr::new(10, 66, 0, 100 + (g >> 5))),
    };
    let decision = policy::decide_guarded(&req, via, &d.leases, &d.policy, d.now, &guard);
    let change = match &decision {
        Decision::Reply { msg, change, .. } => {
            if let Err(e) = policy::encode_reply(msg) {
                panic!("a reply the policy built does not encode: {e}");
            }
            // An address handed out is a pool address (10.66.0.100–119, or the relay pool's
            // 10.67.0.0/24 less its network, broadcast and router addresses) or the reservation.
            let y = msg.yiaddr();
            let o = y.octets();
            let ok = y.is_unspecified()
                || y == Ipv4Addr::new(10, 66, 0, 11)
                || (o[..3] == [10, 66, 0] && (100..=119).contains(&o[3]))
                || (o[..3] == [10, 67, 0] && o[3] > 1 && o[3] < 255);
            assert!(ok, "offered {y}, outside every pool, to {:?}", req.mac);
            change.clone()
        }
        Decision::Record(c) => Some(c.clone()),
        Decision::Ignore(_) => None,
    };
    if let Some(c) = &change {
        // A journal that cannot be written gets nothing to write: no new lease, no release.
        assert!(guard.journal_ok || !c.is_durable(), "a durable change while the journal is down: {c:?} for {:?}", req.kind);
        d.leases.apply(c);
        if let Err(e) = d.leases.check_invariants() {
            panic!("lease table broken after {c:?}: {e}");
        }
    }
    let what = match &decision {
        Decision::Reply { msg, note, .. } => format!("reply {:?} {:?} {}", msg.opts().msg_type(), note.as_ref().map(|n| shape(&format!("{n:?}"))), d.leases.len().min(4)),
        Decision::Record(c) => format!("record {}", variant(&format!("{c:?}"))),
        Decision::Ignore(w) => format!("ignore {}", shape(&format!("{w:?}"))),
    };
    sig((format!("{:?}", client.stage), what))
}

// ---------------------------------------------------------------------------------------------
// The journals read at start: the DHCP lease journal and the node book. Oracles: replay never
// panics, and what it yields satisfies the lease table's invariants.

fn journal_seeds() -> Vec<Vec<u8>> {
    let mut leases = Leases::new();
    let mut v = Vec::new();
    // Real records, through the policy, as the service writes them.
    let mut st = State::default();
    for s in dhcp_seeds() {
        dhcp_run(&mut st, &s);
    }
    if let Some(d) = st.any.as_ref().and_then(|a| a.downcast_ref::<Dhcp>()) {
        v.push(leases::snapshot(&d.leases, 1_000_100));
        for l in d.leases.iter() {
            leases.apply(&leases::Change::Bind(l.clone()));
        }
    }
    v.push(leases::snapshot(&leases, 0));
    // A node book journal as the appliance writes it: enrolments, a plan, reports, a re-image.
    if let Ok(dir) = tempfile::tempdir() {
        use si_appliance::nodes::{Enrol, NodeBook, Selector};
        let macs: Vec<MacAddr> = ["52:54:00:00:00:01", "52:54:00:00:00:02"].iter().filter_map(|m| m.parse().ok()).collect();
        if let Ok(book) = NodeBook::open(dir.path(), Enroll::Listed, &[]) {
            let _ = book.enrol(&Enrol { macs: macs.clone(), hostname: None, disk: Some("/dev/vda".into()), group: Some("rack1".into()) });
            if let Ok(image) = "demo".parse() {
                let _ = book.plan_fetched(macs[0], &image);
            }
            let _ = book.reported(macs[0], Phase::Seeding, None, Some("ab12"));
            let _ = book.reported(macs[1], Phase::Failed, Some("disk too small"), None);
            let _ = book.reimage(&Selector::Group("rack1".into()));
        }
        if let Ok(b) = std::fs::read(dir.path().join(si_appliance::nodes::JOURNAL)) {
            v.push([&[b'N'][..], &b].concat());
        }
    }
    v
}

fn journal_run(_: &mut State, input: &[u8]) -> u64 {
    // The first byte picks the journal.
    let (kind, body) = input.split_first().unwrap_or((&0, &[]));
    if *kind == b'N' {
        let mut nodes = BTreeMap::new();
        let r = si_appliance::nodes::replay(body, &mut nodes);
        let states: Vec<String> = nodes.values().take(4).map(|n| shape(&format!("{:?}", n.enrolment()))).collect();
        return sig(("nodes", nodes.len().min(8), r.applied.min(8), r.damaged.min(4), r.torn_tail, states));
    }
    let (changes, used) = leases::read_records(body);
    assert!(used <= body.len(), "read_records used {used} of {} bytes", body.len());
    let mut l = Leases::new();
    let r = leases::replay(body, &mut l);
    if let Err(e) = l.check_invariants() {
        panic!("replayed lease table broken: {e}");
    }
    let states: Vec<String> = l.iter().take(4).map(|x| format!("{:?}", x.state)).collect();
    sig(("leases", changes.len().min(8), l.len().min(8), r.records.min(8), r.dropped_bytes > 0, states))
}

// ---------------------------------------------------------------------------------------------
// TFTP: a read request's file name and options as async-tftp hands them to our handler
// (`BootFile::parse`), from a whole RRQ datagram split the way RFC 1350 lays it out.

fn tftp_seeds() -> Vec<Vec<u8>> {
    let rrq = |name: &str, opts: &[(&str, &str)]| {
        let mut v = vec![0, 1];
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        v.extend_from_slice(b"octet\0");
        for (k, val) in opts {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v
    };
    vec![
        rrq("undionly.kpxe", &[("tsize", "0"), ("blksize", "1468")]),
        rrq("ipxe.efi", &[("blksize", "65535"), ("windowsize", "64")]),
        rrq("pxelinux.0", &[]),
        rrq("pxelinux.cfg/01-52-54-00-00-00-01", &[]),
        rrq("pxelinux.cfg/default", &[]),
        rrq("ldlinux.c32", &[]),
        rrq("boot/vmlinuz", &[]),
        rrq("boot/initrd.img", &[]),
        rrq("../../etc/passwd", &[]),
        rrq("/etc/shadow", &[]),
        rrq("pxelinux.cfg/C0A80001", &[]),
    ]
}

fn tftp_run(_: &mut State, input: &[u8]) -> u64 {
    // opcode, then NUL-separated fields: name, mode, option pairs.
    let Some(body) = input.get(2..) else { return sig("short") };
    let mut fields = body.split(|b| *b == 0);
    let name = fields.next().unwrap_or(&[]);
    let Ok(name) = std::str::from_utf8(name) else { return sig("not utf-8") };
    let r = si_appliance::boot::file::BootFile::parse(name);
    if let Ok(f) = &r {
        // What a parsed name maps to must be printable and, for per-node names, carry a MAC.
        let _ = (f.kind(), f.mac(), f.is_node_step());
    }
    sig(shape(&format!("{r:?}")))
}

// ---------------------------------------------------------------------------------------------
// Tracker: an announce query from a peer on the subnet (or off it), parsed and applied to a
// tracker that keeps state across executions. Oracles: a reply never hands a peer itself, never
// more than MAX_NUMWANT peers, and complete + incomplete never exceed the peers it knows.

struct Trk {
    t: Tracker,
    rng: rand::rngs::StdRng,
    now: Instant,
}

const IH: [u8; 20] = [0xab; 20];

fn pct(b: &[u8]) -> String {
    b.iter().map(|x| format!("%{x:02X}")).collect()
}

fn tracker_seeds() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for (i, (event, left)) in [("started", 100), ("", 50), ("completed", 0), ("stopped", 0), ("", 0)].iter().enumerate() {
        let mut q = format!(
            "info_hash={}&peer_id={}&port={}&uploaded=0&downloaded=10&left={left}&compact=1&numwant=80",
            pct(&IH),
            pct(&[i as u8; 20]),
            6881 + i
        );
        if !event.is_empty() {
            q.push_str(&format!("&event={event}"));
        }
        // The last byte picks the source address (see tracker_run).
        q.push(char::from(b'0' + i as u8));
        v.push(q.into_bytes());
    }
    v.push(format!("info_hash={}&info_hash={}", pct(&IH), pct(&[1; 20])).into_bytes());
    v
}

fn tracker_run(st: &mut State, input: &[u8]) -> u64 {
    use rand::SeedableRng;
    let s = st.any.get_or_insert_with(|| {
        let mut t = Tracker::new(TrackerPolicy {
            subnets: vec!["10.66.0.0/24".parse().expect("net")],
            appliance_seed: Some(SocketAddrV4::new(Ipv4Addr::new(10, 66, 0, 1), 6881)),
            seed_peers: 2,
            ..TrackerPolicy::default()
        });
        t.register(tracker::InfoHash(IH));
        Box::new(Trk { t, rng: rand::rngs::StdRng::seed_from_u64(7), now: Instant::now() })
    });
    let Some(k) = s.downcast_mut::<Trk>() else { return 0 };
    k.now += Duration::from_secs(1);
    let (last, query) = input.split_last().unwrap_or((&0, &[]));
    let Ok(query) = std::str::from_utf8(query) else { return sig("not utf-8") };
    let remote = Ipv4Addr::new(10, if last & 0x80 == 0 { 66 } else { 99 }, 0, 2 + (last & 7));
    let _ = tracker::parse_scrape(query);
    let a = match Announce::parse(query, remote) {
        Ok(a) => a,
        Err(e) => return sig(("refused", shape(&format!("{e:?}")))),
    };
    match k.t.announce(&a, k.now, &mut k.rng) {
        Ok(r) => {
            assert!(!r.peers.contains(&a.addr), "a peer was handed itself: {a:?}");
            assert!(r.peers.len() <= tracker::MAX_NUMWANT, "{} peers", r.peers.len());
            let known = k.t.peers(&a.info_hash).len();
            assert!(r.complete + r.incomplete <= known + 1, "{} + {} > {known}", r.complete, r.incomplete);
            sig(("reply", r.peers.len().min(3), format!("{:?}", a.event), a.left == 0))
        }
        Err(e) => sig(("refused-announce", shape(&format!("{e:?}")))),
    }
}

// ---------------------------------------------------------------------------------------------
// Torrent metainfo as a node reads it (`Meta::from_torrent`, then the piece table it implies).

fn torrent_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = Vec::new();
    for (name, len) in [("a.tar.zst", 1usize), ("b.tar.zst", 300 << 10), ("c.tar.zst", 0)] {
        let p = dir.path().join(name);
        std::fs::write(&p, vec![7u8; len]).expect("write");
        if let Ok(t) = si_appliance::image::torrent::make(&p, name, "http://10.66.0.1:80/announce") {
            v.push(t.bytes);
        }
    }
    v
}

fn torrent_run(_: &mut State, input: &[u8]) -> u64 {
    let _ = si_appliance::image::torrent::info_hash_of(input);
    match si_appliance::swarm::engine::Meta::from_torrent(input) {
        Ok(m) => sig(("ok", m.hashes.len().min(3))),
        // The reason without its numbers and quoted values.
        Err(e) => sig(("err", shape(&e.to_string()).chars().take(40).collect::<String>())),
    }
}

// ---------------------------------------------------------------------------------------------
// The peer wire protocol: handshake, message bodies, bitfields.

fn wire_seeds() -> Vec<Vec<u8>> {
    use si_appliance::swarm::engine::wire::{self, Handshake, Msg};
    let hs = Handshake { info_hash: IH, peer_id: [3; 20], extensions: true };
    let mut v = vec![[&[0u8][..], &hs.encode()].concat()];
    for m in [
        Msg::Choke,
        Msg::Unchoke,
        Msg::Interested,
        Msg::Have(7),
        Msg::Bitfield(wire::bitfield(&[true, false, true, true, false, false, true, true, true])),
        Msg::Request { piece: 1, begin: 16384, len: 16384 },
        Msg::Piece { piece: 2, begin: 0, data: vec![9; 32] },
        Msg::Cancel { piece: 1, begin: 0, len: 16384 },
        Msg::Extended { id: 0, payload: b"d1:md8:si_claimi3eee".to_vec() },
        Msg::Extended { id: 3, payload: vec![0, 0, 0, 5] },
    ] {
        // encode() writes the length prefix; decode() takes the body after it.
        let framed = m.encode();
        v.push([&[1u8][..], &framed[4..]].concat());
    }
    v.push(vec![2, 0, 9, 0b1011_0000, 0b1000_0000]);
    v
}

fn wire_run(_: &mut State, input: &[u8]) -> u64 {
    use si_appliance::swarm::engine::wire::{self, Handshake, Msg, HANDSHAKE_LEN};
    let (kind, body) = input.split_first().unwrap_or((&0, &[]));
    match kind % 3 {
        0 => {
            let mut b = [0u8; HANDSHAKE_LEN];
            let n = body.len().min(HANDSHAKE_LEN);
            b[..n].copy_from_slice(&body[..n]);
            sig(("hs", Handshake::decode(&b).is_ok()))
        }
        1 => match Msg::decode(body) {
            Ok(m) => {
                // What decodes re-encodes to the same body.
                let again = m.encode();
                if !matches!(m, Msg::KeepAlive | Msg::Other(_)) {
                    assert_eq!(&again[4..], body, "{m:?} does not round-trip");
                }
                sig(("msg", shape(&format!("{m:?}"))))
            }
            Err(e) => sig(("msg-err", shape(&format!("{e:?}")))),
        },
        _ => {
            let n = body.first().map_or(0, |b| u32::from(*b)) * 3;
            let bits = wire::parse_bitfield(body.get(1..).unwrap_or(&[]), n);
            if let Some(b) = &bits {
                assert_eq!(b.len(), n as usize);
            }
            sig(("bitfield", bits.is_some()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tar: GNU tar's own archives (ustar, PAX, GNU long names, sparse, links) read entry by entry
// with their data, as the unpacker does. Bounded: at most 1 MiB of data read per input.

fn tar_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("t");
    std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
    std::fs::write(root.join("d/file"), b"hello\n").expect("write");
    std::fs::write(root.join("d/e/".to_owned() + &"long-name-".repeat(12)), b"x").expect("write");
    let _ = std::os::unix::fs::symlink("file", root.join("d/link"));
    let _ = std::fs::hard_link(root.join("d/file"), root.join("d/hard"));
    let sparse = root.join("d/sparse");
    if let Ok(f) = std::fs::File::create(&sparse) {
        let _ = f.set_len(1 << 20);
    }
    let mut v = Vec::new();
    for format in ["ustar", "pax", "gnu", "oldgnu"] {
        let out = dir.path().join(format!("{format}.tar"));
        // ustar cannot hold sparse files; the others can.
        let sparse = if format == "ustar" { "--no-recursion" } else { "--sparse" };
        let ok = Command::new("tar")
            .args(["--format", format, sparse, "-C"])
            .arg(&root)
            .args(["-cf"])
            .arg(&out)
            .arg(".")
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            if let Ok(b) = std::fs::read(&out) {
                v.push(b);
            }
        }
    }
    v
}

fn tar_run(_: &mut State, input: &[u8]) -> u64 {
    let mut r = si_appliance::image::tarr::TarReader::new(Cursor::new(input));
    let mut buf = vec![0u8; 64 << 10];
    let (mut entries, mut data) = (0usize, 0usize);
    let mut kinds = Vec::new();
    loop {
        match r.next_entry() {
            Ok(Some(h)) => {
                entries += 1;
                if kinds.len() < 4 {
                    kinds.push(h.typeflag);
                }
                let mut got = 0u64;
                loop {
                    match r.read_data(&mut buf) {
                        Ok(0) => {
                            // An entry yields exactly the data it stores (for a sparse file: its
                            // extents' bytes, the holes are the unpacker's), and a sparse map
                            // never claims more data than is stored.
                            assert_eq!(got, h.size, "entry {:?}: read {got} bytes of {}", String::from_utf8_lossy(&h.name), h.size);
                            if let Some((logical, extents)) = &h.sparse {
                                let stored: u64 = extents.iter().map(|(_, len)| *len).sum();
                                assert_eq!(stored, h.size, "sparse map of {:?} holds {stored} bytes, {} stored", String::from_utf8_lossy(&h.name), h.size);
                                assert!(extents.iter().all(|(off, len)| off.checked_add(*len).is_some_and(|end| end <= *logical)), "sparse extent past the logical size {logical}: {extents:?}");
                            }
                            break;
                        }
                        Ok(n) => {
                            got += n as u64;
                            data += n;
                            if data > 1 << 20 {
                                return sig(("data-cap", kinds));
                            }
                        }
                        Err(e) => return sig(("data-err", kinds, e.kind())),
                    }
                }
                if entries > 10_000 {
                    return sig("entry-cap");
                }
            }
            Ok(None) => return sig(("end", entries.min(8), kinds)),
            Err(e) => return sig(("err", entries.min(4), kinds, e.kind(), shape(&e.to_string()).chars().take(32).collect::<String>())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The TFTP server itself (async-tftp's packet parser and our handler): each input is one
// datagram sent to the appliance's TFTP service on 127.0.0.1. Datagrams are fired without waiting
// (the server answers asynchronously); every 256 of them a probe from another address fetches a
// real loader and must get its first block within 3 s, or the target panics: a datagram that
// crashes the server task, wedges its executor or leaks it out of sockets shows up there.

struct TftpSrv {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    server: std::net::SocketAddr,
    /// Senders, used in turn: async-tftp ignores a request from an address:port that still has
    /// a transfer running, so one sender would reach our handler a few times a second only.
    fuzz: Vec<std::net::UdpSocket>,
    probe: std::net::UdpSocket,
    sent: u64,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), si_appliance::boot::BootError>>>,
}

impl Drop for TftpSrv {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn tftp_server() -> TftpSrv {
    use si_appliance::boot::{serve_tftp, BootContext};
    use std::sync::Arc;
    raise_nofile();
    let dir = tempfile::tempdir().expect("tempdir");
    let loaders = dir.path().join("loaders");
    std::fs::create_dir_all(&loaders).expect("mkdir");
    std::fs::write(loaders.join("undionly.kpxe"), vec![0x55u8; 70_000]).expect("write");
    let text = format!(
        "store = \"{store}\"\n[http]\nport = 8080\n[dhcp]\nprobe = false\n[boot]\nloader_dirs = [\"{loaders}\"]\n[tftp]\ntimeout = \"1s\"\n",
        store = dir.path().display(),
        loaders = loaders.display()
    );
    let cfg = Config::from_toml(&text, Path::new("fuzz")).expect("the fuzz config is valid");
    let iface = Iface { name: "lo".into(), index: 1, mac: None, ip: Ipv4Addr::LOCALHOST, net: "127.0.0.0/8".parse().expect("net") };
    let nodes = Arc::new(si_appliance::nodes::NodeBook::in_memory(Enroll::Any));
    let ctx = Arc::new(BootContext::new(&cfg, &iface, b"fuzz-secret".to_vec(), nodes));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let server = sock.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let tftp = cfg.tftp.clone();
    let token = stop.clone();
    let task = Some(rt.spawn(async move { serve_tftp(ctx, &tftp, sock, token).await }));
    let fuzz = (0..64).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind")).collect();
    let probe = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    probe.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let mut srv = TftpSrv { rt, _dir: dir, server, fuzz, probe, sent: 0, stop, task };
    assert!(probe_once(&mut srv), "the TFTP server does not answer a plain read request");
    srv
}

/// Transfers use a socket each: let the process have every descriptor its hard limit allows.
fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the one struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Asks for undionly.kpxe from the probe address, from a new port each time (async-tftp drops a
/// request from an address:port that still has a transfer running); true when block 1 (or an
/// OACK) comes back within 3 s. The transfer is then abandoned with an ERROR packet.
fn probe_once(s: &mut TftpSrv) -> bool {
    let Ok(probe) = std::net::UdpSocket::bind("127.0.0.2:0") else { return false };
    if probe.set_read_timeout(Some(Duration::from_millis(200))).is_err() {
        return false;
    }
    s.probe = probe;
    let mut rrq = vec![0, 1];
    rrq.extend_from_slice(b"undionly.kpxe\0octet\0");
    if s.probe.send_to(&rrq, s.server).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, from)) = s.probe.recv_from(&mut buf) {
            if n >= 4 && (buf[1] == 3 || buf[1] == 6) {
                let _ = s.probe.send_to(b"\0\x05\0\0done\0", from);
                return true;
            }
        }
    }
    false
}

fn tftp_server_run(st: &mut State, input: &[u8]) -> u64 {
    let s = st.any.get_or_insert_with(|| Box::new(tftp_server()));
    let Some(s) = s.downcast_mut::<TftpSrv>() else { return 0 };
    let _ = s.fuzz[(s.sent % 64) as usize].send_to(input, s.server);
    s.sent += 1;
    if s.sent % 256 == 0 {
        // Let the server work through what was sent, then check it still serves.
        std::thread::sleep(Duration::from_millis(20));
        if !probe_once(s) {
            // Say whether the service ended (and why) or is alive but silent.
            let ended = match s.task.take() {
                Some(t) if t.is_finished() => format!("the service ended: {:?}", s.rt.block_on(t)),
                other => {
                    s.task = other;
                    "the service still runs".to_owned()
                }
            };
            panic!("the TFTP server stopped answering after {} datagrams ({ended})", s.sent);
        }
    }
    // Its answers are not read (a fuzzer has no time for them): the signature is what was sent.
    let opcode = input.get(..2).map(|o| u16::from_be_bytes([o[0], o[1]])).unwrap_or(u16::MAX);
    let fields = input.get(2..).map_or(0, |b| b.split(|x| *x == 0).count().min(8));
    sig(("tftp-server", opcode.min(7), fields))
}
