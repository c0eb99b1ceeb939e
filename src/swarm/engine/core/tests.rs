//! The core's rules, one row each: a state, an event, the actions expected (like picker.rs).

use super::*;
use rand::SeedableRng;
use super::super::picker::CLAIM_REFRESH;

/// Piece length in the tests: two blocks.
const PL: u32 = 2 * wire::BLOCK;
const N: u32 = 4;
const US: [u8; 20] = [5; 20];

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

fn core_with(have: Vec<bool>, trusted: &[u8], peers: Vec<SocketAddr>) -> Core {
    let cfg = CoreConfig {
        piece_len: PL,
        total: (N * PL) as u64,
        have,
        peer_id: US,
        depth: 12,
        trusted: trusted.iter().map(|l| ip(*l)).collect(),
        own: Some(Ipv4Addr::new(10, 0, 0, 100)),
        peers,
    };
    Core::new(cfg, StdRng::seed_from_u64(1))
}

fn empty() -> Core {
    core_with(vec![false; N as usize], &[9], Vec::new())
}

/// Registers a peer at 10.0.0.`last` with peer id [`last`; 20], incoming.
fn join(c: &mut Core, now: Instant, last: u8) -> PeerKey {
    c.register(now, ip(last), [last; 20], false, None, &mut Vec::new()).expect("registered")
}

fn requests(acts: &[Action], k: PeerKey) -> usize {
    acts.iter().filter(|a| matches!(a, Action::Send(x, Msg::Request { .. }) if *x == k)).count()
}

fn all_bits() -> Msg {
    Msg::Bitfield(wire::bitfield(&[true; N as usize]))
}

#[test]
fn message_dispatch_table() {
    let now = Instant::now();
    type Setup = fn(&mut Core, Instant, PeerKey);
    type Check = fn(&Result<(), PeerFault>, &[Action], PeerKey);
    let rows: Vec<(&str, Setup, Msg, Check)> = vec![
        ("a bitfield while choked: interested, no request", |_, _, _| {}, all_bits(), |r, a, k| {
            assert!(r.is_ok());
            assert_eq!(a, [Action::Send(k, Msg::Interested)]);
        }),
        (
            "an unchoke after a bitfield: requests",
            |c, now, k| c.handle(now, k, all_bits(), &mut Vec::new()).unwrap(),
            Msg::Unchoke,
            |r, a, k| {
                assert!(r.is_ok());
                assert!(requests(a, k) >= 2, "{a:?}");
            },
        ),
        ("a HAVE out of range closes", |_, _, _| {}, Msg::Have(N), |r, a, _| {
            assert_eq!(*r, Err(PeerFault::HaveOutOfRange(N)));
            assert!(a.is_empty());
        }),
        ("a bitfield of the wrong length closes", |_, _, _| {}, Msg::Bitfield(vec![0xff, 0xff]), |r, _, _| {
            assert_eq!(*r, Err(PeerFault::BadBitfield));
        }),
        ("a request for a piece we lack is ignored", |_, _, _| {}, Msg::Request { piece: 0, begin: 0, len: wire::BLOCK }, |r, a, _| {
            assert!(r.is_ok() && a.is_empty(), "{a:?}");
        }),
        ("a block nobody asked for is not written", |_, _, _| {}, Msg::Piece { piece: 1, begin: 0, data: vec![1; wire::BLOCK as usize] }, |r, a, _| {
            assert!(r.is_ok());
            assert!(!a.iter().any(|x| matches!(x, Action::Write { .. })), "{a:?}");
        }),
        ("keep-alive, interest, cancel and unknown ids change nothing", |_, _, _| {}, Msg::Other(20), |r, a, _| {
            assert!(r.is_ok() && a.is_empty());
        }),
    ];
    for (name, setup, msg, check) in rows {
        let mut c = empty();
        let k = join(&mut c, now, 1);
        setup(&mut c, now, k);
        let mut acts = Vec::new();
        let r = c.handle(now, k, msg, &mut acts);
        eprintln!("row: {name}");
        check(&r, &acts, k);
    }
}

#[test]
fn requests_for_what_we_have_become_uploads() {
    let now = Instant::now();
    let mut c = core_with(vec![true; N as usize], &[], Vec::new());
    let mut acts = Vec::new();
    let k = c.register(now, ip(1), [1; 20], false, None, &mut acts).unwrap();
    // A complete node announces its bitfield and unchokes.
    assert!(matches!(acts[0], Action::Send(x, Msg::Bitfield(_)) if x == k), "{acts:?}");
    assert_eq!(acts[1], Action::Send(k, Msg::Unchoke));
    acts.clear();
    c.handle(now, k, Msg::Request { piece: 2, begin: wire::BLOCK, len: wire::BLOCK }, &mut acts).unwrap();
    assert_eq!(acts, [Action::Upload(k, Block { piece: 2, begin: wire::BLOCK, len: wire::BLOCK })]);
}

/// A block is written outside the core; the piece is hashed only once all its taken blocks are
/// reported written, whatever order the writes finish in.
#[test]
fn a_piece_is_hashed_only_after_every_block_is_written() {
    let now = Instant::now();
    let mut c = empty();
    let k = join(&mut c, now, 1);
    c.handle(now, k, all_bits(), &mut Vec::new()).unwrap();
    let mut acts = Vec::new();
    c.handle(now, k, Msg::Unchoke, &mut acts).unwrap();
    let asked: Vec<(u32, u32)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Send(_, Msg::Request { piece, begin, .. }) => Some((*piece, *begin)),
            _ => None,
        })
        .collect();
    let piece = asked[0].0;
    let blocks: Vec<u32> = asked.iter().filter(|(p, _)| *p == piece).map(|(_, b)| *b).collect();
    assert_eq!(blocks.len(), 2, "a whole piece asked of one peer: {asked:?}");
    let mut writes = 0;
    for b in &blocks {
        let mut acts = Vec::new();
        c.handle(now, k, Msg::Piece { piece, begin: *b, data: vec![0; wire::BLOCK as usize] }, &mut acts).unwrap();
        writes += acts.iter().filter(|a| matches!(a, Action::Write { .. })).count();
        assert!(!acts.iter().any(|a| matches!(a, Action::Verify { .. })), "hashed before written: {acts:?}");
    }
    assert_eq!(writes, 2);
    // The same block again is not written twice.
    let mut acts = Vec::new();
    c.handle(now, k, Msg::Piece { piece, begin: blocks[0], data: vec![0; wire::BLOCK as usize] }, &mut acts).unwrap();
    assert!(!acts.iter().any(|a| matches!(a, Action::Write { .. })), "{acts:?}");
    let mut acts = Vec::new();
    c.written(piece, &mut acts);
    assert!(acts.is_empty(), "one block still being written: {acts:?}");
    c.written(piece, &mut acts);
    assert_eq!(acts, [Action::Verify { piece, blocks: false }]);
}

/// (our id vs theirs, who dialled the new connection) -> whether the new one replaces the old.
#[test]
fn duplicate_connection_table() {
    let now = Instant::now();
    // US = [5; 20]; a peer id of [1; 20] is smaller, [9; 20] larger.
    let rows = [
        // Our id smaller: keep the connection we opened (outgoing).
        (9u8, true, true),
        (9, false, false),
        // Their id smaller: keep the one they opened (incoming).
        (1, true, false),
        (1, false, true),
    ];
    for (id, outgoing, keep_new) in rows {
        let mut c = empty();
        let old = c.register(now, ip(id), [id; 20], !outgoing, None, &mut Vec::new()).unwrap();
        let mut acts = Vec::new();
        let r = c.register(now, ip(id), [id; 20], outgoing, None, &mut acts);
        if keep_new {
            let new = r.expect("the new connection is kept");
            assert!(acts.contains(&Action::Close(old)), "old closed: {acts:?}");
            assert!(c.peers().contains_key(&new) && !c.peers().contains_key(&old));
        } else {
            assert_eq!(r, Err(Refused::Duplicate), "id {id} outgoing {outgoing}");
            assert!(c.peers().contains_key(&old) && acts.is_empty());
        }
    }
}

#[test]
fn admission_caps_apply_after_the_handshake_too() {
    let now = Instant::now();
    let mut c = empty();
    for i in 0..guard::MAX_CONNS_PER_IP as u8 {
        c.register(now, ip(1), [10 + i; 20], false, None, &mut Vec::new()).unwrap();
    }
    assert_eq!(c.admit_incoming(ip(1), now), Admit::TooManyFromIp);
    assert_eq!(c.register(now, ip(1), [30; 20], false, None, &mut Vec::new()), Err(Refused::Admit(Admit::TooManyFromIp)));
    // The trusted seed is always admitted.
    for i in 0..4 {
        c.register(now, ip(9), [40 + i; 20], false, None, &mut Vec::new()).expect("trusted");
    }
}

#[test]
fn choke_flapping_closes_and_keeps_the_address_away_but_never_the_seed() {
    let now = Instant::now();
    for (last, closed) in [(1u8, true), (9, false)] {
        let mut c = empty();
        let k = join(&mut c, now, last);
        let mut r = Ok(());
        for _ in 0..=guard::FLAP_CHOKES {
            c.handle(now, k, Msg::Unchoke, &mut Vec::new()).unwrap();
            r = c.handle(now, k, Msg::Choke, &mut Vec::new());
        }
        assert_eq!(r.is_err(), closed, "peer .{last}");
        assert_eq!(c.cooling_off(&ip(last), now), closed);
        assert_eq!(c.admit_incoming(ip(last), now) == Admit::Distrusted, closed);
    }
}

/// Drives one piece from peer `k` through to its hash result.
fn deliver_piece(c: &mut Core, now: Instant, k: PeerKey, ok: bool) -> (u32, Vec<Action>) {
    let mut acts = Vec::new();
    c.handle(now, k, Msg::Unchoke, &mut acts).unwrap();
    let asked: Vec<(u32, u32)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Send(x, Msg::Request { piece, begin, .. }) if *x == k => Some((*piece, *begin)),
            _ => None,
        })
        .collect();
    let piece = asked[0].0;
    for (p, b) in asked.iter().filter(|(p, _)| *p == piece) {
        c.handle(now, k, Msg::Piece { piece: *p, begin: *b, data: vec![0; wire::BLOCK as usize] }, &mut Vec::new()).unwrap();
        c.written(piece, &mut Vec::new());
    }
    let mut acts = Vec::new();
    c.verified(now, piece, ok, vec![[0; 20]; 2], &mut acts);
    (piece, acts)
}

#[test]
fn a_sole_sender_of_a_bad_piece_is_banned_and_closed_and_a_good_piece_is_announced() {
    let now = Instant::now();
    let mut c = empty();
    let liar = join(&mut c, now, 1);
    let other = join(&mut c, now, 2);
    c.handle(now, liar, all_bits(), &mut Vec::new()).unwrap();
    let (_, acts) = deliver_piece(&mut c, now, liar, false);
    assert_eq!(c.hash_failures(), 1);
    assert!(c.banned().contains(&ip(1)));
    assert!(acts.contains(&Action::Close(liar)), "{acts:?}");
    assert_eq!(c.admit_incoming(ip(1), now), Admit::Distrusted);
    // A good piece: HAVE to the peers that lack it.
    let mut c = empty();
    let seed = join(&mut c, now, 9);
    let other2 = join(&mut c, now, 2);
    c.handle(now, seed, all_bits(), &mut Vec::new()).unwrap();
    let (piece, acts) = deliver_piece(&mut c, now, seed, true);
    assert!(acts.contains(&Action::Send(other2, Msg::Have(piece))), "{acts:?}");
    assert!(!acts.contains(&Action::Send(seed, Msg::Have(piece))), "the seed has it: {acts:?}");
    let _ = other;
}

#[test]
fn the_trusted_seed_alone_sending_a_bad_piece_is_not_banned() {
    let now = Instant::now();
    let mut c = empty();
    let seed = join(&mut c, now, 9);
    c.handle(now, seed, all_bits(), &mut Vec::new()).unwrap();
    let (_, acts) = deliver_piece(&mut c, now, seed, false);
    assert_eq!(c.hash_failures(), 1);
    assert!(c.banned().is_empty());
    assert!(!acts.contains(&Action::Close(seed)));
}

/// Which known addresses a tick dials.
#[test]
fn dial_choice_table() {
    let now = Instant::now();
    let a = |last: u8| SocketAddr::from(([10, 0, 0, last], 6881));
    let mut c = core_with(vec![false; N as usize], &[9], vec![a(1), a(2), a(3), a(4), a(9)]);
    // .2 is connected already (incoming), .3 answered with our own peer id, .4 failed just now.
    join(&mut c, now, 2);
    c.dial_failed(now, a(3), true);
    c.dial_failed(now, a(4), false);
    let mut acts = Vec::new();
    c.tick(now, &mut acts);
    assert_eq!(acts, [Action::Dial(a(9)), Action::Dial(a(1))], "trusted first, then by address");
    // Dials in flight are not started again; after the back-off .4 is due, never .3 (ourselves).
    let mut acts = Vec::new();
    c.tick(now + Duration::from_secs(60), &mut acts);
    assert_eq!(acts, [Action::Dial(a(4))]);
    c.dial_failed(now, a(1), false);
    c.dial_failed(now, a(4), false);
    let mut acts = Vec::new();
    c.tick(now + Duration::from_secs(600), &mut acts);
    assert!(!acts.contains(&Action::Dial(a(3))), "ourselves dialled again: {acts:?}");
    assert!(acts.contains(&Action::Dial(a(1))) && acts.contains(&Action::Dial(a(4))));
}

#[test]
fn banned_and_flapping_addresses_are_not_dialled_unless_trusted() {
    let now = Instant::now();
    let a = |last: u8| SocketAddr::from(([10, 0, 0, last], 6881));
    let mut c = core_with(vec![false; N as usize], &[9], vec![]);
    let liar = join(&mut c, now, 1);
    c.handle(now, liar, all_bits(), &mut Vec::new()).unwrap();
    deliver_piece(&mut c, now, liar, false);
    assert!(c.banned().contains(&ip(1)));
    let flap = join(&mut c, now, 3);
    for _ in 0..=guard::FLAP_CHOKES {
        let _ = c.handle(now, flap, Msg::Choke, &mut Vec::new());
    }
    c.disconnect(now, flap, None, &mut Vec::new());
    let own = Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 6881));
    let peers: Vec<SocketAddrV4> = [1u8, 3, 5, 100].iter().map(|l| SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, *l), 6881)).collect();
    assert_eq!(c.add_known(&peers, own), 3, "our own address is skipped");
    let mut acts = Vec::new();
    c.tick(now, &mut acts);
    assert_eq!(acts, [Action::Dial(a(5))]);
}

#[test]
fn a_peer_leaving_gives_its_requests_to_others() {
    let now = Instant::now();
    let mut c = empty();
    let a = join(&mut c, now, 1);
    let b = join(&mut c, now, 2);
    for k in [a, b] {
        c.handle(now, k, all_bits(), &mut Vec::new()).unwrap();
    }
    c.handle(now, a, Msg::Unchoke, &mut Vec::new()).unwrap();
    let mut acts = Vec::new();
    c.handle(now, b, Msg::Unchoke, &mut acts).unwrap();
    let before = requests(&acts, b);
    let mut acts = Vec::new();
    assert!(c.disconnect(now, a, None, &mut acts).is_some());
    assert!(requests(&acts, b) > 0 || before == 2 * N as usize, "{acts:?}");
    assert!(c.handle(now, a, Msg::KeepAlive, &mut Vec::new()) == Err(PeerFault::Closed));
}

/// A full node takes an incoming connection in place of the outgoing one it received the least
/// from while it holds more than `MAX_OUTGOING` outgoing connections, and refuses it after; its
/// own dials never take a place. (A swarm of 81 nodes left one with the seed alone without it.)
#[test]
fn a_full_node_gives_up_dialled_connections_beyond_its_share_for_incoming_ones() {
    let now = Instant::now();
    let mut c = empty();
    let out = guard::MAX_OUTGOING + 2;
    let mut keys = Vec::new();
    for i in 0..guard::MAX_CONNS {
        // 10.0.0.10 and up: not the trusted .9.
        let last = 10 + i as u8;
        let k = c.register(now, ip(last), [100 + i as u8; 20], i < out, None, &mut Vec::new()).unwrap();
        keys.push(k);
    }
    // The first outgoing one has sent us a block: it is not the one given up.
    c.handle(now, keys[0], all_bits(), &mut Vec::new()).unwrap();
    c.peers.get_mut(&keys[0]).unwrap().down = 1;
    assert_eq!(c.register(now, ip(200), [200; 20], true, None, &mut Vec::new()), Err(Refused::Admit(Admit::Full)), "our own dial");
    for (n, last) in [(0, 201u8), (1, 202)] {
        assert_eq!(c.admit_incoming(ip(last), now), Admit::Yes);
        let mut acts = Vec::new();
        let k = c.register(now, ip(last), [last; 20], false, None, &mut acts).expect("admitted");
        let gone = keys[out - 1 - n];
        assert!(acts.contains(&Action::Close(gone)), "the newest outgoing idle one closed: {acts:?}");
        assert!(c.peers().contains_key(&k) && !c.peers().contains_key(&gone) && c.peers().len() == guard::MAX_CONNS);
    }
    assert!(c.peers().contains_key(&keys[0]));
    assert_eq!(c.admit_incoming(ip(203), now), Admit::Full);
    assert_eq!(c.register(now, ip(203), [203; 20], false, None, &mut Vec::new()), Err(Refused::Admit(Admit::Full)));
}

/// Peers dialling in get at most `MAX_INCOMING` places (the rest stays for our own dials);
/// the appliance's seed always gets one, and our own dials fill up to `MAX_CONNS`.
#[test]
fn peers_dialling_in_take_at_most_their_share_of_the_places() {
    let now = Instant::now();
    let mut c = empty();
    for i in 0..guard::MAX_INCOMING {
        let last = 10 + i as u8;
        assert_eq!(c.admit_incoming(ip(last), now), Admit::Yes);
        c.register(now, ip(last), [100 + i as u8; 20], false, None, &mut Vec::new()).expect("admitted");
    }
    let next = 10 + guard::MAX_INCOMING as u8;
    assert_eq!(c.admit_incoming(ip(next), now), Admit::Full);
    assert_eq!(c.register(now, ip(next), [next; 20], false, None, &mut Vec::new()), Err(Refused::Admit(Admit::Full)));
    assert_eq!(c.admit_incoming(ip(9), now), Admit::Yes, "the trusted seed");
    c.register(now, ip(9), [9; 20], false, None, &mut Vec::new()).expect("the seed");
    let mut last = 200u8;
    while c.peers().len() < guard::MAX_CONNS {
        c.register(now, ip(last), [last; 20], true, None, &mut Vec::new()).expect("our own dial");
        last += 1;
    }
    assert_eq!(c.register(now, ip(last), [last; 20], true, None, &mut Vec::new()), Err(Refused::Admit(Admit::Full)));
}

/// Dials go to the known addresses after our own (10.0.0.100) first, in ring order, the
/// trusted seed before all: every node is the first choice of the node before it, not the
/// lowest address everyone's.
#[test]
fn dials_start_after_our_own_address() {
    let now = Instant::now();
    let a = |last: u8| SocketAddr::from(([10, 0, 0, last], 6881));
    let mut c = core_with(vec![false; N as usize], &[9], vec![a(1), a(99), a(150), a(101), a(9)]);
    let mut acts = Vec::new();
    c.tick(now, &mut acts);
    assert_eq!(acts, [Action::Dial(a(9)), Action::Dial(a(101)), Action::Dial(a(150)), Action::Dial(a(1)), Action::Dial(a(99))]);
}

/// `si_claim` (BEP 10): a peer whose extension handshake offers it gets a claim for each piece
/// we ask the appliance's seed for; a peer that does not (librqbit, aria2c: other extensions
/// only) gets none, nor does the seed; a claim we receive keeps that piece off our requests to
/// the seed. Malformed handshakes and claims are ignored and the connection kept.
#[test]
fn pieces_asked_of_the_seed_are_claimed_to_peers_that_speak_si_claim() {
    let now = Instant::now();
    // Us at .100 with peers .1 and .2 downloading: three shares (see `picker::Deal`).
    let setup = || {
        let mut c = empty();
        let seed = join(&mut c, now, 9);
        let a = join(&mut c, now, 1);
        let b = join(&mut c, now, 2);
        let mut acts = Vec::new();
        c.extensions(a, &mut acts);
        assert_eq!(acts, [Action::Send(a, Msg::Extended { id: 0, payload: b"d1:md8:si_claimi3eee".to_vec() })]);
        c.handle(now, a, Msg::Extended { id: 0, payload: b"d1:md8:si_claimi7ee1:v2:sie".to_vec() }, &mut Vec::new()).unwrap();
        c.handle(now, b, Msg::Extended { id: 0, payload: b"d1:md11:ut_metadatai1e6:ut_pexi2ee4:reqqi250ee".to_vec() }, &mut Vec::new()).unwrap();
        c.handle(now, seed, Msg::Extended { id: 0, payload: b"not bencode".to_vec() }, &mut Vec::new()).unwrap();
        c.handle(now, seed, Msg::Extended { id: 0, payload: b"d1:md8:si_claim3:badee".to_vec() }, &mut Vec::new()).unwrap();
        // Nested a million deep (serde_bencode alone would recurse until the stack is gone).
        let deep = [&b"d1:md8:si_claim"[..], &[b'l'; 1 << 20], &[b'e'; 1 << 20], b"ee"].concat();
        c.handle(now, seed, Msg::Extended { id: 0, payload: deep }, &mut Vec::new()).unwrap();
        for bad in [vec![1, 2], N.to_be_bytes().to_vec(), Vec::new()] {
            c.handle(now, a, Msg::Extended { id: CLAIM_EXT, payload: bad }, &mut Vec::new()).unwrap();
        }
        c.handle(now, a, Msg::Extended { id: 42, payload: vec![0; 4] }, &mut Vec::new()).unwrap();
        (c, seed, a)
    };
    let from_seed = |c: &mut Core, seed: PeerKey| {
        let mut acts = Vec::new();
        c.handle(now, seed, all_bits(), &mut acts).unwrap();
        c.handle(now, seed, Msg::Unchoke, &mut acts).unwrap();
        acts
    };
    // Unclaimed: our share from the seed (the pieces `ours`), each claimed to .1 only (in its
    // number for si_claim, 7).
    let (mut c, seed, a) = setup();
    let acts = from_seed(&mut c, seed);
    let mut ours: Vec<u32> = acts
        .iter()
        .filter_map(|x| match x {
            Action::Send(k, Msg::Request { piece, .. }) if *k == seed => Some(*piece),
            _ => None,
        })
        .collect();
    ours.dedup();
    assert!(!ours.is_empty() && ours.len() < N as usize, "{acts:?}");
    let claims: Vec<&Action> = acts.iter().filter(|x| matches!(x, Action::Send(_, Msg::Extended { .. }))).collect();
    let want: Vec<Action> = ours.iter().map(|i| Action::Send(a, Msg::Extended { id: 7, payload: i.to_be_bytes().to_vec() })).collect();
    assert_eq!(claims, want.iter().collect::<Vec<_>>());
    // Claimed by .1 first: those pieces are not asked of the seed.
    let (mut c, seed, a) = setup();
    for i in &ours {
        c.handle(now, a, Msg::Extended { id: CLAIM_EXT, payload: i.to_be_bytes().to_vec() }, &mut Vec::new()).unwrap();
    }
    let acts = from_seed(&mut c, seed);
    assert!(!acts.iter().any(|x| matches!(x, Action::Send(_, Msg::Request { piece, .. }) if ours.contains(piece))), "{acts:?}");
    let ours = ours[0];
    assert!(c.picker().holding(), "the seed's connection is planned again on ticks");
    // Its HAVE: fetched from .1.
    let mut acts = Vec::new();
    c.handle(now, a, Msg::Unchoke, &mut acts).unwrap();
    c.handle(now, a, Msg::Have(ours), &mut acts).unwrap();
    assert!(acts.iter().any(|x| matches!(x, Action::Send(k, Msg::Request { piece, .. }) if *piece == ours && *k == a)), "{acts:?}");
    // A peer that speaks si_claim and comes after we started that piece from the seed gets that
    // claim with its extension handshake; one that does not speak it gets nothing.
    let (mut c, seed, a) = setup();
    from_seed(&mut c, seed);
    // Still coming from the seed after CLAIM_REFRESH: claimed again to .1 on a tick.
    let mut acts = Vec::new();
    c.tick(now + CLAIM_REFRESH, &mut acts);
    assert!(acts.contains(&Action::Send(a, Msg::Extended { id: 7, payload: ours.to_be_bytes().to_vec() })), "{acts:?}");
    let late = join(&mut c, now, 3);
    let mut acts = Vec::new();
    c.handle(now, late, Msg::Extended { id: 0, payload: b"d1:md8:si_claimi5eee".to_vec() }, &mut acts).unwrap();
    let flight = c.picker().seed_pieces_in_flight();
    assert!(flight.contains(&ours), "{flight:?}");
    let want: Vec<Action> = flight.iter().map(|i| Action::Send(late, Msg::Extended { id: 5, payload: i.to_be_bytes().to_vec() })).collect();
    assert_eq!(acts, want);
    let other = join(&mut c, now, 4);
    let mut acts = Vec::new();
    c.handle(now, other, Msg::Extended { id: 0, payload: b"d1:md11:ut_metadatai1ee".to_vec() }, &mut acts).unwrap();
    assert!(acts.is_empty(), "{acts:?}");
}

/// The appliance's seed is asked for `SEED_BUDGET` blocks over the nodes we know (the
/// tracker's list, connected or not), `MIN_DEPTH` at least; another peer with every piece gets
/// its share of the budget over the connected peers (up to the configured depth).
#[test]
fn the_appliances_seed_is_asked_for_a_few_blocks_at_a_time() {
    let now = Instant::now();
    let eight: Vec<SocketAddr> = (1..=8).map(|l| SocketAddr::new(ip(l), 6881)).collect();
    for (last, known, want) in [(9u8, eight.clone(), MIN_DEPTH), (9, Vec::new(), 2 * N as usize), (1, eight, 2 * N as usize)] {
        let mut c = core_with(vec![false; N as usize], &[9], known);
        let k = join(&mut c, now, last);
        let mut acts = Vec::new();
        c.handle(now, k, all_bits(), &mut acts).unwrap();
        c.handle(now, k, Msg::Unchoke, &mut acts).unwrap();
        assert_eq!(requests(&acts, k), want, "peer .{last}: {acts:?}");
    }
}
