use super::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

const IH: InfoHash = InfoHash([7; 20]);

fn enc(b: &[u8]) -> String {
    percent_encoding::percent_encode(b, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn q(ih: &[u8], pid: u8, port: u16, left: u64, extra: &str) -> String {
    format!("info_hash={}&peer_id={}&port={port}&uploaded=0&downloaded=0&left={left}&compact=1{extra}", enc(ih), enc(&[pid; 20]))
}

fn tracker() -> Tracker {
    let mut t = Tracker::new(TrackerPolicy {
        subnets: vec!["10.0.0.0/16".parse().unwrap()],
        ..TrackerPolicy::default()
    });
    t.register(IH);
    t
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn parses_raw_byte_info_hash_and_keys() {
    // Bytes that are not UTF-8 and include '&', '=' and '%' once encoded.
    let raw: Vec<u8> = (0..20).map(|i| [0xff, b'&', b'=', b'%', 0x00][i % 5]).collect();
    let a = Announce::parse(&q(&raw, 1, 6881, 100, "&event=started&numwant=10000"), ip("10.0.0.5")).unwrap();
    assert_eq!(a.info_hash.0.to_vec(), raw);
    assert_eq!(a.addr, "10.0.0.5:6881".parse().unwrap());
    assert_eq!(a.left, 100);
    assert_eq!(a.event, Event::Started);
    assert_eq!(a.numwant, MAX_NUMWANT, "huge numwant is capped");
}

#[test]
fn malformed_announces_are_refused_with_the_key() {
    let good = q(&[7; 20], 1, 6881, 0, "");
    let cases: Vec<(String, &str)> = vec![
        (good.replace("info_hash=", "x="), "info_hash"),
        (good.replace(&format!("info_hash={}", enc(&[7; 20])), "info_hash=%07%07"), "info_hash"),
        (good.replace("peer_id=", "y="), "peer_id"),
        (good.replace("port=6881", "port=0"), "port"),
        (good.replace("port=6881", "port=70000"), "port"),
        (good.replace("port=6881", "port=-1"), "port"),
        (good.replace("&left=0", ""), "left"),
        (good.replace("left=0", "left=abc"), "left"),
        (format!("{good}&event=exploded"), "event"),
        (String::new(), "info_hash"),
        ("%%%&&&===".to_owned(), "info_hash"),
    ];
    for (query, key) in cases {
        let e = Announce::parse(&query, ip("10.0.0.5")).unwrap_err();
        assert!(e.to_string().contains(key), "{query:?} -> {e}");
    }
}

#[test]
fn foreign_hash_and_foreign_address_are_refused() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let a = Announce::parse(&q(&[9; 20], 1, 6881, 5, ""), ip("10.0.0.5")).unwrap();
    assert!(matches!(t.announce(&a, now, &mut rng), Err(Refusal::UnknownTorrent(_))));
    let a = Announce::parse(&q(&[7; 20], 1, 6881, 5, ""), ip("192.0.2.9")).unwrap();
    assert!(matches!(t.announce(&a, now, &mut rng), Err(Refusal::Foreign(_))));
    let reason = String::from_utf8(encode_failure(&Refusal::Foreign(ip("192.0.2.9")))).unwrap();
    assert!(reason.starts_with("d14:failure reason"), "{reason}");
}

#[test]
fn never_returns_the_requester_and_prefers_its_rack() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(2);
    let now = Instant::now();
    // 10 leechers in rack 10.0.1.x, 10 in rack 10.0.2.x.
    for i in 0..10u8 {
        for rack in [1u8, 2] {
            let a = Announce::parse(&q(&[7; 20], rack * 50 + i, 6881, 1000, ""), Ipv4Addr::new(10, 0, rack, 10 + i)).unwrap();
            t.announce(&a, now, &mut rng).unwrap();
        }
    }
    let me = Announce::parse(&q(&[7; 20], 200, 6881, 1000, "&numwant=8"), ip("10.0.1.99")).unwrap();
    let r = t.announce(&me, now, &mut rng).unwrap();
    assert_eq!(r.peers.len(), 8);
    assert!(!r.peers.contains(&me.addr));
    // Three quarters from its own rack, first; a quarter from the other.
    assert!(r.peers[..6].iter().all(|p| p.ip().octets()[2] == 1), "same rack first: {:?}", r.peers);
    assert!(r.peers[6..].iter().all(|p| p.ip().octets()[2] == 2), "{:?}", r.peers);
    assert_eq!((r.complete, r.incomplete), (0, 21));
}

#[test]
fn leechers_get_some_seeds_and_seeds_get_only_leechers() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(3);
    let now = Instant::now();
    for i in 0..8u8 {
        let left = if i < 4 { 0 } else { 10 };
        let a = Announce::parse(&q(&[7; 20], i + 1, 6881, left, ""), Ipv4Addr::new(10, 0, 0, 10 + i)).unwrap();
        t.announce(&a, now, &mut rng).unwrap();
    }
    let leech = Announce::parse(&q(&[7; 20], 100, 6881, 10, "&numwant=8"), ip("10.0.0.100")).unwrap();
    let r = t.announce(&leech, now, &mut rng).unwrap();
    let seeds: Vec<_> = r.peers.iter().filter(|p| p.ip().octets()[3] < 14).collect();
    assert!(!seeds.is_empty() && seeds.len() <= 4, "{:?}", r.peers);
    let seed = Announce::parse(&q(&[7; 20], 1, 6881, 0, ""), ip("10.0.0.10")).unwrap();
    let r = t.announce(&seed, now, &mut rng).unwrap();
    assert!(r.peers.iter().all(|p| p.ip().octets()[3] >= 14), "a seed gets leechers only: {:?}", r.peers);
}

#[test]
fn stopped_and_silent_peers_leave_and_completion_is_counted() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(4);
    let t0 = Instant::now();
    let a = Announce::parse(&q(&[7; 20], 1, 6881, 10, "&event=started"), ip("10.0.0.2")).unwrap();
    t.announce(&a, t0, &mut rng).unwrap();
    let done = Announce::parse(&q(&[7; 20], 1, 6881, 0, ""), ip("10.0.0.2")).unwrap();
    t.announce(&done, t0 + Duration::from_secs(3), &mut rng).unwrap();
    let s = t.scrape(&[IH]);
    assert_eq!(s[0].1, ScrapeStats { complete: 1, downloaded: 1, incomplete: 0 });
    assert_eq!(t.peers(&IH)[0].completed_after, Some(3.0));
    let b = Announce::parse(&q(&[7; 20], 2, 6881, 10, ""), ip("10.0.0.3")).unwrap();
    t.announce(&b, t0 + Duration::from_secs(100), &mut rng).unwrap();
    assert_eq!(t.peers(&IH).len(), 1, "the silent peer timed out");
    let stop = Announce::parse(&q(&[7; 20], 2, 6881, 10, "&event=stopped"), ip("10.0.0.3")).unwrap();
    t.announce(&stop, t0 + Duration::from_secs(101), &mut rng).unwrap();
    assert!(t.peers(&IH).is_empty());
}

#[test]
fn a_restarted_node_replaces_its_old_entry() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(5);
    let t0 = Instant::now();
    let old = Announce::parse(&q(&[7; 20], 1, 6881, 10, "&event=started"), ip("10.0.0.2")).unwrap();
    t.announce(&old, t0, &mut rng).unwrap();
    let other_port = Announce::parse(&q(&[7; 20], 3, 6882, 10, ""), ip("10.0.0.2")).unwrap();
    t.announce(&other_port, t0, &mut rng).unwrap();
    let new = Announce::parse(&q(&[7; 20], 2, 6881, 0, "&event=started"), ip("10.0.0.2")).unwrap();
    t.announce(&new, t0 + Duration::from_secs(1), &mut rng).unwrap();
    let peers = t.peers(&IH);
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(peers.iter().any(|p| p.addr.port() == 6881 && p.left == 0));
}

#[test]
fn compact_reply_encoding() {
    let r = AnnounceReply {
        interval: Duration::from_secs(15),
        complete: 1,
        incomplete: 2,
        peers: vec!["10.0.0.2:6881".parse().unwrap()],
        ring: Vec::new(),
    };
    let b = encode_reply(&r);
    let mut want = b"d8:completei1e10:incompletei2e8:intervali15e12:min intervali7e5:peers6:".to_vec();
    want.extend_from_slice(&[10, 0, 0, 2, 0x1a, 0xe1]);
    want.push(b'e');
    assert_eq!(b, want);
    let s = encode_scrape(&[(InfoHash([1; 20]), ScrapeStats { complete: 1, downloaded: 2, incomplete: 3 })]);
    assert!(s.starts_with(b"d5:filesd20:"));
}

/// The client's query (engine) and the tracker's parser are one codec: every event, raw
/// info-hash and peer id bytes that need escaping, a port, counters.
#[test]
fn announce_queries_round_trip() {
    for event in [Event::Started, Event::Completed, Event::Stopped, Event::None] {
        let a = Announce {
            info_hash: InfoHash([0, b'&', b'=', b'%', 0xff, b' ', b'+', 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
            peer_id: *b"-SI0100-ab&=%+ 09xyz",
            addr: "10.0.3.4:6881".parse().unwrap(),
            uploaded: 1 << 40,
            downloaded: 12345,
            left: 0,
            event,
            numwant: MAX_NUMWANT,
        };
        let q = a.to_query();
        assert_eq!(Announce::parse(&q, ip("10.0.3.4")).unwrap(), a, "{q}");
        assert_eq!(q.contains("event="), event != Event::None, "{q}");
    }
}

/// The tracker's answer and the client's decoder are one codec (compact peers both ways).
#[test]
fn announce_replies_round_trip() {
    let r = AnnounceReply {
        interval: Duration::from_secs(42),
        complete: 3,
        incomplete: 30,
        peers: vec!["10.0.0.2:6881".parse().unwrap(), "192.168.255.1:1".parse().unwrap(), "1.2.3.4:65535".parse().unwrap()],
        ring: Vec::new(),
    };
    assert_eq!(decode_reply(&encode_reply(&r)).unwrap(), r);
    let with_ring = AnnounceReply { ring: vec![ip("10.0.0.2"), ip("10.0.0.9"), ip("10.1.0.1")], ..r.clone() };
    let b = encode_reply(&with_ring);
    assert!(b.windows(16).any(|w| w == b"9:x-si-ring12:\x0a\x00"), "{}", String::from_utf8_lossy(&b));
    assert_eq!(decode_reply(&b).unwrap(), with_ring);
    let refused = decode_reply(&encode_failure(&Refusal::Foreign(ip("1.2.3.4")))).unwrap_err();
    assert!(matches!(&refused, BadReply::Refused(why) if why.contains("outside")), "{refused}");
    assert!(matches!(decode_reply(b"not bencode"), Err(BadReply::Bencode(_))));
    // A partial trailing entry is dropped, not misread.
    assert_eq!(decode_compact(&[10, 0, 0, 2, 0x1a, 0xe1, 10, 0]), vec!["10.0.0.2:6881".parse().unwrap()]);
    assert_eq!(decode_compact(&encode_compact(&r.peers)), r.peers);
}

proptest::proptest! {
    #[test]
    fn parse_never_panics(s in ".{0,300}") {
        let _ = Announce::parse(&s, Ipv4Addr::new(10, 0, 0, 1));
        let _ = parse_scrape(&s);
    }
}

#[test]
fn seed_peers_limits_who_gets_the_appliance_seed() {
    let seed: SocketAddrV4 = "10.0.0.1:6881".parse().unwrap();
    let mut t = Tracker::new(TrackerPolicy {
        subnets: vec!["10.0.0.0/16".parse().unwrap()],
        appliance_seed: Some(seed),
        seed_peers: 2,
        ..TrackerPolicy::default()
    });
    t.register(IH);
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = Instant::now();
    let ann = |pid: u8, left: u64| {
        let mut a = Announce::parse(&q(&IH.0, pid, 6881, left, ""), Ipv4Addr::new(10, 0, 0, pid)).unwrap();
        a.numwant = 50;
        a
    };
    // The seed registers itself (peer id 1 at 10.0.0.1).
    t.announce(&ann(1, 0), t0, &mut rng).unwrap();
    let has_seed = |r: &AnnounceReply| r.peers.contains(&seed);
    // The first leecher has no other peer: it gets the seed.
    assert!(has_seed(&t.announce(&ann(11, 100), t0, &mut rng).unwrap()));
    assert!(has_seed(&t.announce(&ann(12, 100), t0 + Duration::from_millis(1), &mut rng).unwrap()));
    // The third leecher does not: it has two others.
    let r = t.announce(&ann(13, 100), t0 + Duration::from_millis(2), &mut rng).unwrap();
    assert!(!has_seed(&r) && r.peers.len() == 2, "{r:?}");
    // ... until it makes no progress between two announces.
    let r = t.announce(&ann(13, 100), t0 + Duration::from_secs(5), &mut rng).unwrap();
    assert!(has_seed(&r), "a stalled leecher gets the seed");
    let r = t.announce(&ann(13, 50), t0 + Duration::from_secs(10), &mut rng).unwrap();
    assert!(!has_seed(&r), "progress again: back to the other peers");
    // The first two keep it.
    assert!(has_seed(&t.announce(&ann(11, 90), t0 + Duration::from_secs(5), &mut rng).unwrap()));
}

#[test]
fn join_delay_gives_new_leechers_only_seeds_and_a_short_interval() {
    let mut t = Tracker::new(TrackerPolicy {
        subnets: vec!["10.0.0.0/16".parse().unwrap()],
        join_delay: Duration::from_secs(3),
        expected_nodes: 1000,
        ..TrackerPolicy::default()
    });
    t.register(IH);
    let mut rng = StdRng::seed_from_u64(2);
    let t0 = Instant::now();
    let ann = |pid: u8, left: u64| Announce::parse(&q(&IH.0, pid, 6881, left, ""), Ipv4Addr::new(10, 0, 0, pid)).unwrap();
    t.announce(&ann(1, 0), t0, &mut rng).unwrap();
    t.announce(&ann(11, 100), t0, &mut rng).unwrap();
    let r = t.announce(&ann(12, 100), t0, &mut rng).unwrap();
    assert_eq!(r.peers, vec!["10.0.0.1:6881".parse::<SocketAddrV4>().unwrap()], "only the seed at first");
    assert_eq!(r.interval, Duration::from_secs(3));
    let r = t.announce(&ann(12, 90), t0 + Duration::from_secs(3), &mut rng).unwrap();
    assert_eq!(r.peers.len(), 2, "then everyone: {r:?}");
    assert_eq!(r.interval, Duration::from_secs(15));
}

/// A deployment whose nodes fit in one peer list, or of unknown size, has no join delay (every
/// node meets every other at once); one larger has it.
#[test]
fn join_delay_applies_only_to_swarms_larger_than_a_peer_list() {
    for (expected, delayed) in [(8, false), (81, false), (82, true), (1000, true), (0, false)] {
        let mut t = Tracker::new(TrackerPolicy {
            subnets: vec!["10.0.0.0/16".parse().unwrap()],
            join_delay: Duration::from_secs(1),
            expected_nodes: expected,
            ..TrackerPolicy::default()
        });
        t.register(IH);
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        // numwant 80, as the engine asks.
        let ann = |pid: u8| Announce::parse(&q(&IH.0, pid, 6881, 100, "&numwant=80"), Ipv4Addr::new(10, 0, 0, pid)).unwrap();
        t.announce(&ann(11), t0, &mut rng).unwrap();
        let r = t.announce(&ann(12), t0, &mut rng).unwrap();
        assert_eq!(r.peers.is_empty(), delayed, "expected_nodes {expected}: {r:?}");
        assert_eq!(r.interval < Duration::from_secs(15), delayed, "expected_nodes {expected}: {r:?}");
    }
}

/// A client asks again no sooner than 1 s (a join delay's second announce) and no later than
/// 300 s, whatever the answer says.
#[test]
fn a_client_keeps_the_interval_between_one_second_and_five_minutes() {
    assert_eq!(client_interval(Duration::ZERO), Duration::from_secs(1));
    assert_eq!(client_interval(Duration::from_millis(1500)), Duration::from_millis(1500));
    assert_eq!(client_interval(Duration::from_secs(86_400)), Duration::from_secs(300));
}

/// Issue 13: one address could hold an entry per port (65,535), so one host could fill the
/// swarm and the peer lists. Now four per address; the fifth port is refused.
#[test]
fn one_address_holds_at_most_four_entries() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    let mut refused = 0;
    for port in 1..=1000u16 {
        let a = Announce::parse(&q(&IH.0, (port % 250) as u8, port, 100, ""), ip("10.0.9.9")).unwrap();
        let mut a = a;
        a.peer_id = [(port >> 8) as u8, port as u8, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9];
        match t.announce(&a, now, &mut rng) {
            Ok(_) => {}
            Err(Refusal::TooManyFromAddress(x)) => {
                assert_eq!(x, ip("10.0.9.9"));
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 1000 - MAX_PEERS_PER_IP);
    assert_eq!(t.peers(&IH).len(), MAX_PEERS_PER_IP);
    // Known peers keep announcing.
    let mut a = Announce::parse(&q(&IH.0, 1, 1, 50, ""), ip("10.0.9.9")).unwrap();
    a.peer_id = [0, 1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9];
    assert!(t.announce(&a, now, &mut rng).is_ok());
}

#[test]
fn a_full_swarm_refuses_new_peers_only() {
    let mut t = Tracker::new(TrackerPolicy { subnets: vec!["10.0.0.0/16".parse().unwrap()], max_peers: 10, ..TrackerPolicy::default() });
    t.register(IH);
    let mut rng = StdRng::seed_from_u64(2);
    let now = Instant::now();
    for n in 0..10u8 {
        t.announce(&Announce::parse(&q(&IH.0, n, 6881, 100, ""), ip(&format!("10.0.1.{n}"))).unwrap(), now, &mut rng).unwrap();
    }
    let e = t.announce(&Announce::parse(&q(&IH.0, 99, 6881, 100, ""), ip("10.0.1.99")).unwrap(), now, &mut rng).unwrap_err();
    assert_eq!(e, Refusal::SwarmFull(10));
    assert!(t.announce(&Announce::parse(&q(&IH.0, 3, 6881, 10, ""), ip("10.0.1.3")).unwrap(), now, &mut rng).is_ok());
}

/// Issue 13: random ties let fake seeds (hosts announcing `left=0`) push the appliance's seed
/// out of a leecher's list. It now always comes first among the seeds a leecher gets, so it is
/// in every leecher's list.
#[test]
fn fake_seeds_never_push_the_appliance_seed_out() {
    let seed: SocketAddrV4 = "10.0.0.1:6881".parse().unwrap();
    let mut t = Tracker::new(TrackerPolicy { subnets: vec!["10.0.0.0/16".parse().unwrap()], appliance_seed: Some(seed), ..TrackerPolicy::default() });
    t.register(IH);
    let mut rng = StdRng::seed_from_u64(3);
    let now = Instant::now();
    t.announce(&Announce::parse(&q(&IH.0, 200, 6881, 0, ""), ip("10.0.0.1")).unwrap(), now, &mut rng).unwrap();
    // 1000 fake seeds, closer to the leechers' rack than the appliance is.
    for n in 0..1000u32 {
        let addr = Ipv4Addr::from(u32::from(ip("10.0.5.0")) + n);
        let mut a = Announce::parse(&q(&IH.0, 0, 7000, 0, ""), addr).unwrap();
        a.peer_id[..4].copy_from_slice(&n.to_be_bytes());
        t.announce(&a, now, &mut rng).unwrap();
    }
    for n in 0..50u8 {
        let r = t.announce(&Announce::parse(&q(&IH.0, 100 + n, 6881, 100, ""), ip(&format!("10.0.5.{}", 200 + n % 50))).unwrap(), now, &mut rng).unwrap();
        assert!(r.peers.contains(&seed), "leecher {n} did not get the appliance's seed: {:?}", r.peers);
    }
}

/// `closest` (the O(N) peer choice) hands out exactly the `k` closest peers, closest first,
/// and samples the boundary closeness uniformly: over many draws every peer of the boundary
/// rack is chosen, none of a farther one ever.
#[test]
fn closest_takes_the_k_nearest_and_samples_the_boundary_rack() {
    let me = ip("10.0.1.10");
    // 5 peers in my /24, 20 in 10.0.2.x (boundary for k = 10), 30 in 10.0.130.x (farther).
    let mut v: Vec<SocketAddrV4> = (11..16).map(|h| SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, h), 6881)).collect();
    v.extend((1..21).map(|h| SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, h), 6881)));
    v.extend((1..31).map(|h| SocketAddrV4::new(Ipv4Addr::new(10, 0, 130, h), 6881)));
    let mut rng = StdRng::seed_from_u64(9);
    let mut boundary_seen = HashSet::new();
    for _ in 0..200 {
        let out = closest(v.clone(), me, 10, &mut rng);
        assert_eq!(out.len(), 10);
        assert!(out[..5].iter().all(|p| p.ip().octets()[2] == 1), "own rack first: {out:?}");
        assert!(out[5..].iter().all(|p| p.ip().octets()[2] == 2), "then the next-closest rack only: {out:?}");
        assert_eq!(out.iter().collect::<HashSet<_>>().len(), 10, "no duplicates: {out:?}");
        boundary_seen.extend(out[5..].iter().copied());
        // Fewer peers than asked: all of them, closest first.
        let all = closest(v.clone(), me, 100, &mut rng);
        assert_eq!(all.len(), v.len());
        assert!(all.windows(2).all(|w| closeness(me, *w[0].ip()) >= closeness(me, *w[1].ip())), "{all:?}");
    }
    assert_eq!(boundary_seen.len(), 20, "every boundary peer is drawn sometime");
    assert!(closest(v, me, 0, &mut rng).is_empty());
}

/// Within a rack every peer is as close as another (no preference by the last octet), a
/// quarter of a list comes from other racks, and a rack smaller than the list is all in it.
#[test]
fn peers_mix_racks_and_are_random_within_one() {
    let me = ip("10.0.1.10");
    // 100 peers in my rack, 100 in 10.0.2.x, 100 in 10.0.9.x.
    let v: Vec<SocketAddrV4> = [1u8, 2, 9].iter().flat_map(|r| (100..200).map(move |h| SocketAddrV4::new(Ipv4Addr::new(10, 0, *r, h), 6881))).collect();
    let mut rng = StdRng::seed_from_u64(3);
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let out = mixed(v.clone(), me, 80, &mut rng);
        assert_eq!(out.len(), 80);
        assert_eq!(out.iter().collect::<HashSet<_>>().len(), 80, "no duplicates");
        assert!(out[..60].iter().all(|p| p.ip().octets()[2] == 1), "{out:?}");
        assert!(out[60..].iter().all(|p| p.ip().octets()[2] != 1), "{out:?}");
        seen.extend(out.iter().copied());
    }
    assert_eq!(seen.len(), 300, "every peer of every rack is drawn sometime");
    // A small rack: all of it, the rest from the others.
    let small: Vec<SocketAddrV4> = v.iter().copied().filter(|p| p.ip().octets()[2] != 1 || p.ip().octets()[3] < 110).collect();
    let out = mixed(small, me, 80, &mut rng);
    assert_eq!(out.iter().filter(|p| p.ip().octets()[2] == 1).count(), 10);
    assert_eq!(out.len(), 80);
    // Fewer peers than asked: all of them.
    assert_eq!(mixed(v[..30].to_vec(), me, 80, &mut rng).len(), 30);
    assert!(mixed(v, me, 0, &mut rng).is_empty());
}

/// A known peer's announce costs no pass over the swarm for timeouts more than once a second,
/// and the silent still leave: within `peer_timeout` + [`SWEEP_EVERY`].
#[test]
fn silent_peers_leave_within_the_sweep_period() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(11);
    let t0 = Instant::now();
    let silent = Announce::parse(&q(&[7; 20], 1, 6881, 10, "&event=started"), ip("10.0.0.2")).unwrap();
    t.announce(&silent, t0, &mut rng).unwrap();
    let talker = Announce::parse(&q(&[7; 20], 2, 6881, 10, "&event=started"), ip("10.0.0.3")).unwrap();
    // Announces every 0.4 s: one pass a second at most, and the silent peer is gone by 61 s.
    let mut gone_at = None;
    for i in 1..200u64 {
        let now = t0 + Duration::from_millis(400 * i);
        let r = t.announce(&talker, now, &mut rng).unwrap();
        if r.peers.is_empty() && gone_at.is_none() {
            gone_at = Some(now - t0);
        }
    }
    let gone = gone_at.expect("the silent peer left");
    assert!(gone >= Duration::from_secs(60) && gone <= Duration::from_secs(61), "{gone:?}");
    assert!(!t.is_seed(&IH, &[2; 20]) && !t.is_seed(&IH, &[1; 20]));
    let done = Announce::parse(&q(&[7; 20], 2, 6881, 0, ""), ip("10.0.0.3")).unwrap();
    t.announce(&done, t0 + Duration::from_secs(90), &mut rng).unwrap();
    assert!(t.is_seed(&IH, &[2; 20]));
}

/// A swarm bigger than a node's peer list: downloading nodes get the ring (every node that
/// joined downloading, ascending, seeds left out); a seed or a small swarm gets none; a node
/// that leaves leaves the ring.
#[test]
fn a_swarm_bigger_than_the_peer_list_sends_the_ring() {
    let mut t = tracker();
    let mut rng = StdRng::seed_from_u64(9);
    let now = Instant::now();
    let ann = |pid: u8, addr: &str, left: u64, extra: &str| Announce::parse(&q(&[7; 20], pid, 6881, left, extra), ip(addr)).unwrap();
    // A seed, then 6 downloading nodes in a scrambled order.
    t.announce(&ann(1, "10.0.0.1", 0, ""), now, &mut rng).unwrap();
    for (i, last) in [7u8, 3, 9, 2, 8, 5].into_iter().enumerate() {
        t.announce(&ann(10 + i as u8, &format!("10.0.1.{last}"), 100, "&numwant=8"), now, &mut rng).unwrap();
    }
    let me = ann(11, "10.0.1.3", 50, "&numwant=4");
    let r = t.announce(&me, now, &mut rng).unwrap();
    let want: Vec<Ipv4Addr> = [2, 3, 5, 7, 8, 9].iter().map(|l| Ipv4Addr::new(10, 0, 1, *l)).collect();
    assert_eq!(r.ring, want, "every downloading node, ascending, the seed left out");
    assert!(decode_reply(&encode_reply(&r)).unwrap().ring == want);
    // The whole swarm fits the peer list: no ring.
    assert!(t.announce(&ann(11, "10.0.1.3", 50, "&numwant=8"), now, &mut rng).unwrap().ring.is_empty());
    // A seed asks for none.
    assert!(t.announce(&ann(1, "10.0.0.1", 0, "&numwant=4"), now, &mut rng).unwrap().ring.is_empty());
    // A node that completes stays in it (shares do not move); one that stops leaves it.
    t.announce(&ann(12, "10.0.1.9", 0, "&event=completed"), now, &mut rng).unwrap();
    t.announce(&ann(13, "10.0.1.2", 100, "&event=stopped"), now, &mut rng).unwrap();
    let r = t.announce(&me, now, &mut rng).unwrap();
    let want: Vec<Ipv4Addr> = [3, 5, 7, 8, 9].iter().map(|l| Ipv4Addr::new(10, 0, 1, *l)).collect();
    assert_eq!(r.ring, want);
}
