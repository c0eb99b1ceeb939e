//! Table tests for `decide`: one row per firmware / architecture / user class, and the RFC 2131
//! request states. Built with dhcproto setters; no sockets, the clock is a number.

use super::*;
use crate::dhcp::classify::{parse, tests::request};
use crate::dhcp::leases::{Change, Leases};
use dhcproto::v4::Architecture;
use proptest::prelude::*;

const NOW: u64 = 1_000_000;

fn iface() -> Iface {
    Iface {
        name: "eth9".into(),
        index: 9,
        mac: None,
        ip: Ipv4Addr::new(10, 66, 0, 1),
        net: "10.66.0.0/24".parse().unwrap(),
    }
}

fn config(extra: &str) -> Config {
    let text = format!(
        "[http]\nport = 8080\n[dhcp]\nprobe = false\n{extra}\n\
         [[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.66.0.11\"\nhostname = \"node01\"\n"
    );
    Config::from_toml(&text, std::path::Path::new("test")).unwrap()
}

fn policy(extra: &str) -> Policy {
    Policy::new(&config(extra), &iface())
}

fn pxe(arch: u16) -> Vec<DhcpOption> {
    vec![
        DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes()),
        DhcpOption::ClientSystemArchitecture(Architecture(arch)),
    ]
}

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

fn run(p: &Policy, l: &Leases, kind: MessageType, mac: [u8; 6], opts: Vec<DhcpOption>) -> Decision {
    let req = parse(&request(kind, mac, opts)).unwrap();
    decide(&req, Via::Dhcp, l, p, NOW)
}

fn reply(d: Decision) -> (v4::Message, Dest, Option<Change>) {
    match d {
        Decision::Reply { msg, to, change, .. } => (*msg, to, change),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn opt_bytes(m: &v4::Message, code: OptionCode) -> Option<Vec<u8>> {
    match m.opts().get(code)? {
        DhcpOption::BootfileName(b) | DhcpOption::ClassIdentifier(b) | DhcpOption::VendorExtensions(b) => Some(b.clone()),
        DhcpOption::Unknown(u) => Some(u.data().to_vec()),
        _ => None,
    }
}

#[test]
fn discover_rows_per_firmware() {
    let p = policy("answer = \"pxe\"");
    let l = Leases::new();
    let url = "http://10.66.0.1:8080/boot/02-00-00-00-00-07.ipxe";
    // (name, options, boot file, option 43 present, 175 present)
    type Row<'a> = (&'a str, Vec<DhcpOption>, Option<&'a str>, bool, bool);
    let rows: Vec<Row> = vec![
        ("BIOS PXE (no 93)", vec![DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec())], Some("undionly.kpxe"), true, false),
        ("BIOS PXE (93=0)", pxe(0), Some("undionly.kpxe"), true, false),
        ("UEFI x64 (7)", pxe(7), Some("snponly.efi"), false, false),
        ("UEFI x64 BC (9)", pxe(9), Some("snponly.efi"), false, false),
        ("ARM64 (11)", pxe(11), Some("ipxe-arm64.efi"), false, false),
        ("unknown arch (25)", pxe(25), None, false, false),
        ("iPXE", [pxe(0), vec![DhcpOption::UserClass(b"iPXE".to_vec())]].concat(), Some(url), false, true),
        ("installer", vec![DhcpOption::ClassIdentifier(b"si-appliance".to_vec())], None, false, false),
        (
            "UEFI HTTP boot (16)",
            vec![
                DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec()),
                DhcpOption::ClientSystemArchitecture(Architecture(16)),
            ],
            Some("http://10.66.0.1:8080/boot/ipxe.efi"),
            false,
            false,
        ),
    ];
    for (name, opts, file, o43, o175) in rows {
        let (m, to, change) = reply(run(&p, &l, MessageType::Discover, MAC, opts));
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer), "{name}");
        assert!(p.pools[0].in_range(m.yiaddr()), "{name}");
        assert!(matches!(to, Dest::Arp { ip, .. } if ip == m.yiaddr()), "{name}: {to:?}");
        assert!(matches!(change, Some(Change::Offer { .. })), "{name}");
        assert_eq!(opt_bytes(&m, OptionCode::BootfileName).as_deref(), file.map(str::as_bytes), "{name}");
        assert_eq!(m.fname(), file.map(str::as_bytes), "{name}");
        if file.is_some() {
            assert_eq!(m.siaddr(), p.server_ip, "{name}");
        }
        assert_eq!(m.opts().contains(OptionCode::VendorExtensions), o43, "{name}");
        assert_eq!(m.opts().contains(OptionCode::Unknown(175)), o175, "{name}");
        if o175 {
            // iPXE priority 127 first (a foreign server's offer does not win the iPXE stage).
            let ipxe = opt_bytes(&m, OptionCode::Unknown(175)).unwrap();
            assert_eq!(&ipxe[..3], &[1, 1, 127], "{name}");
        }
        // Option 60 back: to BIOS ROMs (and iPXE on BIOS) and HTTP boot; never to UEFI PXE in
        // a full DHCP answer (EDK2 would take it for a port-4011 "BINL" offer: add_boot).
        let class_60 = !matches!(name, "installer" | "UEFI x64 (7)" | "UEFI x64 BC (9)" | "ARM64 (11)" | "unknown arch (25)");
        assert_eq!(opt_bytes(&m, OptionCode::ClassIdentifier).is_some(), class_60, "{name}");
        assert!(encode_reply(&m).unwrap().len() >= BOOTP_MIN_LEN, "{name}");
    }
    // UEFI HTTP boot clients get `HTTPClient` back as vendor class (UEFI 2.5 §24.7.2).
    let http = vec![
        DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec()),
        DhcpOption::ClientSystemArchitecture(Architecture(16)),
    ];
    let (m, _, _) = reply(run(&p, &l, MessageType::Discover, MAC, http.clone()));
    assert_eq!(opt_bytes(&m, OptionCode::ClassIdentifier).as_deref(), Some(&b"HTTPClient"[..]));
    let pp = policy("mode = \"proxy\"");
    let (m, _, _) = reply(run(&pp, &l, MessageType::Discover, MAC, http));
    assert_eq!(opt_bytes(&m, OptionCode::BootfileName).as_deref(), Some(&b"http://10.66.0.1:8080/boot/ipxe.efi"[..]), "proxy mode too");
    // A plain OS client with answer = "pxe" is ignored.
    let d = run(&p, &l, MessageType::Discover, MAC, vec![DhcpOption::ClassIdentifier(b"udhcp 1.36.1".to_vec())]);
    assert!(matches!(d, Decision::Ignore(Why::NotPxe)), "{d:?}");
    // A client we leased to (as PXE) may renew without its class; a stranger may not.
    let mut bound = Leases::new();
    let ip = Ipv4Addr::new(10, 66, 0, 50);
    bound.apply(&Change::Bind(Lease { mac: MacAddr(MAC), ip, expires: NOW + 100, state: LeaseState::Bound, hostname: None }));
    for (mac, ok) in [(MAC, true), ([2, 0, 0, 0, 0, 8], false)] {
        let mut m = v4::Message::new_with_id(9, ip, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &mac);
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
        let req = parse(&encode_reply(&m).unwrap()).unwrap();
        let d = decide(&req, Via::Dhcp, &bound, &p, NOW);
        assert_eq!(matches!(d, Decision::Reply { .. }), ok, "{mac:?}: {d:?}");
    }
    // ...and answered with answer = "all", without boot information.
    let pa = policy("answer = \"all\"");
    let (m, _, _) = reply(run(&pa, &l, MessageType::Discover, MAC, vec![]));
    assert!(!m.opts().contains(OptionCode::BootfileName));
}

#[test]
fn tftp_disabled_gives_address_but_notes_it() {
    let cfg = config("answer = \"pxe\"\n[tftp]\nenable = false");
    let p = Policy::new(&cfg, &iface());
    match run(&p, &Leases::new(), MessageType::Discover, MAC, pxe(0)) {
        Decision::Reply { note: Some(Why::TftpDisabled), msg, .. } => assert!(!msg.opts().contains(OptionCode::BootfileName)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_loader_is_not_offered_and_noted() {
    let mut p = policy("answer = \"pxe\"");
    p.missing_loaders = vec![Loader::IpxeArm64Efi];
    match run(&p, &Leases::new(), MessageType::Discover, MAC, pxe(11)) {
        Decision::Reply { note: Some(Why::LoaderMissing(Loader::IpxeArm64Efi)), msg, .. } => {
            assert!(!msg.opts().contains(OptionCode::BootfileName));
        }
        other => panic!("{other:?}"),
    }
    // Other architectures still get theirs.
    let (m, _, _) = reply(run(&p, &Leases::new(), MessageType::Discover, MAC, pxe(7)));
    assert_eq!(opt_bytes(&m, OptionCode::BootfileName).as_deref(), Some(&b"snponly.efi"[..]));
}

#[test]
fn reservation_gets_fixed_address_and_hostname() {
    let p = policy("answer = \"all\"");
    let l = Leases::new();
    let (m, _, _) = reply(run(&p, &l, MessageType::Discover, [0x52, 0x54, 0, 0, 0, 1], vec![]));
    assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 66, 0, 11));
    assert!(matches!(m.opts().get(OptionCode::Hostname), Some(DhcpOption::Hostname(h)) if h == "node01"));
    // Nobody else is ever offered the reserved address, even when asking for it.
    let (m2, _, _) = reply(run(&p, &l, MessageType::Discover, MAC, vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 66, 0, 11))]));
    assert_ne!(m2.yiaddr(), Ipv4Addr::new(10, 66, 0, 11));
}

#[test]
fn reservation_loader_overrides_arch_and_ipxe_script() {
    let text = "[dhcp]\nprobe = false\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:02\"\n\
                ip = \"10.66.0.12\"\nloader = \"pxelinux\"\n";
    let p = Policy::new(&Config::from_toml(text, std::path::Path::new("t")).unwrap(), &iface());
    let l = Leases::new();
    let mac = [0x52, 0x54, 0, 0, 0, 2];
    let ipxe = [pxe(0), vec![DhcpOption::UserClass(b"iPXE".to_vec())]].concat();
    for opts in [pxe(7), ipxe] {
        let (m, _, _) = reply(run(&p, &l, MessageType::Discover, mac, opts));
        assert_eq!(opt_bytes(&m, OptionCode::BootfileName).as_deref(), Some(&b"pxelinux.0"[..]));
    }
    // Other nodes still boot by architecture.
    let (m, _, _) = reply(run(&p, &l, MessageType::Discover, MAC, pxe(7)));
    assert_eq!(opt_bytes(&m, OptionCode::BootfileName).as_deref(), Some(&b"snponly.efi"[..]));
}

#[test]
fn dora_then_request_states() {
    let p = policy("answer = \"all\"");
    let mut l = Leases::new();
    let (offer, _, ch) = reply(run(&p, &l, MessageType::Discover, MAC, vec![]));
    l.apply(&ch.unwrap());
    let ip = offer.yiaddr();
    let sid = DhcpOption::ServerIdentifier(p.server_ip);
    // SELECTING.
    let (ack, _, ch) = reply(run(&p, &l, MessageType::Request, MAC, vec![sid.clone(), DhcpOption::RequestedIpAddress(ip)]));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), ip);
    let Some(Change::Bind(lease)) = ch else { panic!("no bind") };
    assert_eq!(lease.expires, NOW + 3600);
    l.apply(&Change::Bind(lease));
    // Another MAC asking for that address in INIT-REBOOT is NAK'd, broadcast.
    let (nak, to, ch) = reply(run(&p, &l, MessageType::Request, [2, 0, 0, 0, 0, 8], vec![DhcpOption::RequestedIpAddress(ip)]));
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!((to, ch), (Dest::Broadcast, None));
    // Wrong subnet: NAK.
    let (nak, _, _) = reply(run(&p, &l, MessageType::Request, MAC, vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 1, 5))]));
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    // SELECTING another server: our offer is withdrawn, no reply.
    let d = run(&p, &l, MessageType::Request, [2, 0, 0, 0, 0, 9], vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 66, 0, 99)), DhcpOption::RequestedIpAddress(ip)]);
    assert!(matches!(d, Decision::Record(Change::ForgetOffer { .. })), "{d:?}");
    // RENEWING: ciaddr set, unicast ACK to ciaddr.
    let mut m = v4::Message::new_with_id(9, ip, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &MAC);
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
    let req = parse(&encode_reply(&m).unwrap()).unwrap();
    let (ack, to, _) = reply(decide(&req, Via::Dhcp, &l, &p, NOW + 1800));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(to, Dest::Unicast(ip));
    // RELEASE with the wrong server id is ignored; with ours it frees the address.
    let mut rel = v4::Message::new_with_id(10, ip, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &MAC);
    rel.opts_mut().insert(DhcpOption::MessageType(MessageType::Release));
    rel.opts_mut().insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 66, 0, 99)));
    let req = parse(&encode_reply(&rel).unwrap()).unwrap();
    assert!(matches!(decide(&req, Via::Dhcp, &l, &p, NOW), Decision::Ignore(Why::OtherServer(_))));
    rel.opts_mut().insert(sid);
    let req = parse(&encode_reply(&rel).unwrap()).unwrap();
    let Decision::Record(ch) = decide(&req, Via::Dhcp, &l, &p, NOW) else { panic!() };
    assert!(matches!(ch, Change::Release { .. }));
    l.apply(&ch);
    assert!(l.available_to(ip, MacAddr([2, 0, 0, 0, 0, 8]), NOW));
}

#[test]
fn decline_puts_address_on_probation() {
    let p = policy("answer = \"all\"");
    let mut l = Leases::new();
    let (offer, _, ch) = reply(run(&p, &l, MessageType::Discover, MAC, vec![]));
    l.apply(&ch.unwrap());
    let ip = offer.yiaddr();
    let d = run(&p, &l, MessageType::Decline, MAC, vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(ip)]);
    let Decision::Record(ch) = d else { panic!("{d:?}") };
    l.apply(&ch);
    // The same client is offered another address now.
    let (offer2, _, _) = reply(run(&p, &l, MessageType::Discover, MAC, vec![]));
    assert_ne!(offer2.yiaddr(), ip);
}

#[test]
fn relay_uses_pool_of_giaddr_or_ignores() {
    let p = policy(
        "answer = \"all\"\n[[dhcp.pool]]\nsubnet = \"10.66.0.0/24\"\n[[dhcp.pool]]\nsubnet = \"10.67.0.0/24\"\nrouter = \"10.67.0.1\"",
    );
    for (giaddr, want) in [(Ipv4Addr::new(10, 67, 0, 1), Some("10.67.0.0/24")), (Ipv4Addr::new(10, 99, 0, 1), None)] {
        let mut m = v4::Message::new_with_id(1, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, giaddr, &MAC);
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
        let req = parse(&encode_reply(&m).unwrap()).unwrap();
        match (decide(&req, Via::Dhcp, &Leases::new(), &p, NOW), want) {
            (Decision::Reply { msg, to, .. }, Some(net)) => {
                assert!(net.parse::<Ipv4Net>().unwrap().contains(&msg.yiaddr()));
                assert_eq!(to, Dest::Relay(giaddr));
                assert_ne!(msg.yiaddr(), Ipv4Addr::new(10, 67, 0, 1), "router excluded");
            }
            (Decision::Ignore(Why::NoPoolForRelay(g)), None) => assert_eq!(g, giaddr),
            (d, w) => panic!("{giaddr}: {d:?} want {w:?}"),
        }
    }
}

#[test]
fn proxy_mode_rows() {
    let p = policy("mode = \"proxy\"");
    let l = Leases::new();
    let bios = vec![DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()), DhcpOption::ClientSystemArchitecture(Architecture(0))];
    let (m, to, change) = reply(run(&p, &l, MessageType::Discover, MAC, bios));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!((to, change), (Dest::Broadcast, None));
    assert_eq!(m.fname(), Some(&b"undionly.kpxe"[..]));
    assert_eq!(opt_bytes(&m, OptionCode::VendorExtensions), Some(vec![6, 1, 8, 255]));
    assert_eq!(opt_bytes(&m, OptionCode::ClassIdentifier), Some(b"PXEClient".to_vec()));
    assert!(!m.opts().contains(OptionCode::AddressLeaseTime));
    // Non-PXE clients are never answered in proxy mode.
    assert!(matches!(run(&p, &l, MessageType::Discover, MAC, vec![]), Decision::Ignore(Why::NotPxe)));
    // Port 4011: a UEFI REQUEST gets an ACK back to its source.
    let src = SocketAddrV4::new(Ipv4Addr::new(10, 66, 0, 50), 68);
    let req = parse(&request(MessageType::Request, MAC, pxe(7))).unwrap();
    let (m, to, _) = reply(decide(&req, Via::PxeService(src), &l, &p, NOW));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(to, Dest::Source(src));
    assert_eq!(m.fname(), Some(&b"snponly.efi"[..]));
    // proxyDHCP answers always say PXEClient (a UEFI client then asks on port 4011, as above).
    assert_eq!(opt_bytes(&m, OptionCode::ClassIdentifier), Some(b"PXEClient".to_vec()));
    let (m, _, _) = reply(run(&p, &l, MessageType::Discover, MAC, pxe(7)));
    assert_eq!((m.fname(), opt_bytes(&m, OptionCode::ClassIdentifier)), (Some(&b"snponly.efi"[..]), Some(b"PXEClient".to_vec())));
    // A REQUEST on port 67 to the real server is not ours.
    let d = run(&p, &l, MessageType::Request, MAC, [pxe(7), vec![DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 66, 0, 99))]].concat());
    assert!(matches!(d, Decision::Ignore(Why::OtherServer(_))));
}

#[test]
fn broadcast_flag_and_inform() {
    let p = policy("answer = \"all\"");
    let mut m = v4::Message::new_with_id(1, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &MAC);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
    let (_, to, _) = reply(decide(&parse(&encode_reply(&m).unwrap()).unwrap(), Via::Dhcp, &Leases::new(), &p, NOW));
    assert_eq!(to, Dest::Broadcast);
    let ci = Ipv4Addr::new(10, 66, 0, 200);
    let mut inf = v4::Message::new_with_id(2, ci, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &MAC);
    inf.opts_mut().insert(DhcpOption::MessageType(MessageType::Inform));
    let (ack, to, ch) = reply(decide(&parse(&encode_reply(&inf).unwrap()).unwrap(), Via::Dhcp, &Leases::new(), &p, NOW));
    assert_eq!((ack.yiaddr(), to, ch), (Ipv4Addr::UNSPECIFIED, Dest::Unicast(ci), None));
    assert!(!ack.opts().contains(OptionCode::AddressLeaseTime));
}

#[test]
fn small_pool_exhausts_without_duplicates() {
    let p = policy("answer = \"all\"\n[[dhcp.pool]]\nsubnet = \"10.66.0.0/24\"\nrange = [\"10.66.0.100\", \"10.66.0.104\"]");
    let mut l = Leases::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..5u8 {
        let (m, _, ch) = reply(run(&p, &l, MessageType::Discover, [2, 0, 0, 0, 1, i], vec![]));
        assert!(seen.insert(m.yiaddr()));
        l.apply(&ch.unwrap());
    }
    assert!(matches!(run(&p, &l, MessageType::Discover, [2, 0, 0, 0, 1, 9], vec![]), Decision::Ignore(Why::PoolExhausted(_))));
    // Offers expire: after the hold, the address is reusable.
    let req = parse(&request(MessageType::Discover, [2, 0, 0, 0, 1, 9], vec![])).unwrap();
    assert!(matches!(decide(&req, Via::Dhcp, &l, &p, NOW + OFFER_HOLD_SECS), Decision::Reply { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// Arbitrary bytes: parse either refuses or yields a request that decide handles without
    /// panicking, in both modes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700), kind in 1u8..=8) {
        let mut b = bytes;
        // Steer half of the inputs past the header checks so the option walk is exercised.
        if b.len() > 243 && kind % 2 == 0 {
            b[0] = 1; b[1] = 1; b[2] = 6;
            b[236..240].copy_from_slice(&crate::dhcp::classify::MAGIC);
            b[240] = 53; b[241] = 1; b[242] = kind;
        }
        if let Ok(req) = parse(&b) {
            let l = Leases::new();
            for p in [policy("answer = \"all\""), policy("mode = \"proxy\"")] {
                if let Decision::Reply { msg, .. } = decide(&req, Via::Dhcp, &l, &p, NOW) {
                    let _ = encode_reply(&msg);
                }
            }
        }
    }

    /// Structured traffic from a few MACs: no address outside the pool, none offered or bound
    /// to two MACs at once, reserved addresses only to their owner.
    #[test]
    fn never_offers_outside_pool_or_held_address(ops in proptest::collection::vec((0u8..12, 0u8..6, 0u8..8, 0u64..200), 1..80)) {
        let p = policy("answer = \"all\"\n[[dhcp.pool]]\nsubnet = \"10.66.0.0/24\"\nrange = [\"10.66.0.10\", \"10.66.0.17\"]");
        let mut l = Leases::new();
        let mut now = NOW;
        for (m, kind, ipn, dt) in ops {
            now += dt;
            let mac = [2, 0, 0, 0, 0, m];
            let ip = Ipv4Addr::new(10, 66, 0, 8 + ipn * 2);
            let opts = match kind {
                0 | 1 => (MessageType::Discover, vec![DhcpOption::RequestedIpAddress(ip)]),
                2 => (MessageType::Request, vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(ip)]),
                3 => (MessageType::Request, vec![DhcpOption::RequestedIpAddress(ip)]),
                4 => (MessageType::Decline, vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(ip)]),
                _ => (MessageType::Release, vec![DhcpOption::ServerIdentifier(p.server_ip)]),
            };
            let req = parse(&request(opts.0, mac, opts.1)).unwrap();
            let holder_before = |ip: Ipv4Addr| l.get(ip).filter(|x| x.expires > now && matches!(x.state, LeaseState::Bound | LeaseState::Offered)).map(|x| x.mac);
            match decide(&req, Via::Dhcp, &l, &p, now) {
                Decision::Reply { msg, change, .. } => {
                    let y = msg.yiaddr();
                    if !y.is_unspecified() {
                        let in_pool = p.pools[0].in_range(y) || y == Ipv4Addr::new(10, 66, 0, 11);
                        prop_assert!(in_pool, "{y} outside the pool");
                        if let Some(h) = holder_before(y) { prop_assert_eq!(h, MacAddr(mac), "{} held by another MAC", y); }
                        if y == Ipv4Addr::new(10, 66, 0, 11) { prop_assert_eq!(MacAddr(mac), "52:54:00:00:00:01".parse::<MacAddr>().unwrap()); }
                    }
                    if let Some(c) = change { l.apply(&c); }
                }
                Decision::Record(c) => { l.apply(&c); }
                Decision::Ignore(_) => {}
            }
            prop_assert!(l.check_invariants().is_ok(), "{:?}", l.check_invariants());
        }
    }
}

// ---- issue 13: the starvation guard, RELEASE/DECLINE with a victim's MAC, degraded journal ----

fn guarded(p: &Policy, l: &Leases, kind: MessageType, mac: [u8; 6], opts: Vec<DhcpOption>, now: u64, g: &Guard) -> Decision {
    let req = parse(&request(kind, mac, opts)).unwrap();
    decide_guarded(&req, Via::Dhcp, l, p, now, g)
}

const STRANGER: Guard = Guard { journal_ok: true, new_allowed: true, known: false, src: None };

#[test]
fn new_clients_leave_the_reserve_to_known_nodes() {
    // 20 addresses, 20 % held back: strangers get 16, a known node still gets one.
    let p = policy("answer = \"all\"\nknown_reserve_percent = 20\n[[dhcp.pool]]\nsubnet = \"10.66.0.0/24\"\nrange = [\"10.66.0.100\", \"10.66.0.119\"]");
    assert_eq!(p.reserve_of(&p.pools[0]), 4);
    let mut l = Leases::new();
    let mut got = 0;
    for i in 0..40u8 {
        match guarded(&p, &l, MessageType::Discover, [2, 9, 0, 0, 0, i], pxe(0), NOW, &STRANGER) {
            Decision::Reply { change: Some(c), .. } => {
                l.apply(&c);
                got += 1;
            }
            Decision::Ignore(Why::HeldForKnown { free: 4, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, 16);
    let known = Guard { known: true, ..STRANGER };
    let (offer, _, _) = reply(guarded(&p, &l, MessageType::Discover, [2, 9, 0, 0, 1, 1], pxe(0), NOW, &known));
    assert!(p.pools[0].in_range(offer.yiaddr()));
    // A stranger that already holds an entry (its own offer) is not new: it may go on.
    let (again, _, _) = reply(guarded(&p, &l, MessageType::Discover, [2, 9, 0, 0, 0, 0], pxe(0), NOW, &STRANGER));
    assert!(p.pools[0].in_range(again.yiaddr()));
}

#[test]
fn rate_limited_new_client_gets_nothing_but_known_and_leased_ones_do() {
    let p = policy("answer = \"all\"");
    let mut l = Leases::new();
    let limited = Guard { new_allowed: false, ..STRANGER };
    assert!(matches!(guarded(&p, &l, MessageType::Discover, MAC, vec![], NOW, &limited), Decision::Ignore(Why::RateLimited(_))));
    assert!(matches!(guarded(&p, &l, MessageType::Discover, MAC, vec![], NOW, &Guard { known: true, ..limited }), Decision::Reply { .. }));
    let (_, _, ch) = reply(guarded(&p, &l, MessageType::Discover, MAC, vec![], NOW, &STRANGER));
    l.apply(&ch.unwrap());
    assert!(matches!(guarded(&p, &l, MessageType::Discover, MAC, vec![], NOW, &limited), Decision::Reply { .. }));
}

#[test]
fn init_reboot_for_a_free_address_binds_nothing() {
    let p = policy("answer = \"all\"");
    let l = Leases::new();
    // One spoofed INIT-REBOOT per address used to bind each for the full lease time.
    let d = guarded(&p, &l, MessageType::Request, MAC, vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 66, 0, 50))], NOW, &STRANGER);
    assert!(matches!(d, Decision::Ignore(Why::NoRecord(_))), "{d:?}");
    // SELECTING an offer we do not know (lost in a restart) is a new binding: limited → NAK.
    let sel = vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 66, 0, 50))];
    let (nak, _, ch) = reply(guarded(&p, &l, MessageType::Request, MAC, sel.clone(), NOW, &Guard { new_allowed: false, ..STRANGER }));
    assert_eq!((nak.opts().msg_type(), ch), (Some(MessageType::Nak), None));
    let (ack, _, ch) = reply(guarded(&p, &l, MessageType::Request, MAC, sel, NOW, &STRANGER));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert!(matches!(ch, Some(Change::Bind(_))));
}

fn bound(p: &Policy, mac: [u8; 6], at: u64) -> (Leases, Ipv4Addr) {
    let mut l = Leases::new();
    let (offer, _, ch) = reply(guarded(p, &l, MessageType::Discover, mac, vec![], at, &STRANGER));
    l.apply(&ch.unwrap());
    let sel = vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(offer.yiaddr())];
    let (_, _, ch) = reply(guarded(p, &l, MessageType::Request, mac, sel, at, &STRANGER));
    l.apply(&ch.unwrap());
    (l, offer.yiaddr())
}

#[test]
fn release_with_a_victims_mac_from_elsewhere_is_ignored() {
    let p = policy("answer = \"all\"");
    let (l, ip) = bound(&p, MAC, NOW);
    let mut rel = v4::Message::new_with_id(10, ip, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &MAC);
    rel.opts_mut().insert(DhcpOption::MessageType(MessageType::Release));
    rel.opts_mut().insert(DhcpOption::ServerIdentifier(p.server_ip));
    let req = parse(&encode_reply(&rel).unwrap()).unwrap();
    let attacker = Guard { src: Some(Ipv4Addr::new(10, 66, 0, 200)), ..STRANGER };
    assert!(matches!(decide_guarded(&req, Via::Dhcp, &l, &p, NOW + 5, &attacker), Decision::Ignore(Why::ReleaseFrom(_))));
    let itself = Guard { src: Some(ip), ..STRANGER };
    assert!(matches!(decide_guarded(&req, Via::Dhcp, &l, &p, NOW + 5, &itself), Decision::Record(Change::Release { .. })));
}

#[test]
fn decline_only_right_after_the_ack_and_quarantine_is_bounded() {
    let p = policy("answer = \"all\"");
    let (l, ip) = bound(&p, MAC, NOW);
    let dec = vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(ip)];
    assert!(matches!(guarded(&p, &l, MessageType::Decline, MAC, dec.clone(), NOW + 5, &STRANGER), Decision::Record(Change::Decline { .. })));
    // A DECLINE with the victim's MAC an hour... or ten minutes later: ignored.
    let late = NOW + DECLINE_WINDOW_SECS + 1;
    assert!(matches!(guarded(&p, &l, MessageType::Decline, MAC, dec, late, &STRANGER), Decision::Ignore(Why::DeclineTooLate(_))));
    // At most max(pool/8, 4) addresses on probation: 253 / 8 = 31.
    let mut l = Leases::new();
    for i in 0..31u8 {
        l.apply(&Change::Decline { mac: MacAddr([2, 8, 0, 0, 0, i]), ip: Ipv4Addr::new(10, 66, 0, 100 + i), until: NOW + PROBATION_SECS });
    }
    let (offer, _, ch) = reply(guarded(&p, &l, MessageType::Discover, MAC, vec![], NOW, &STRANGER));
    l.apply(&ch.unwrap());
    let dec = vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(offer.yiaddr())];
    assert!(matches!(guarded(&p, &l, MessageType::Decline, MAC, dec, NOW, &STRANGER), Decision::Ignore(Why::QuarantineFull(_))));
}

#[test]
fn journal_down_refuses_new_leases_and_acks_renewals_without_extending() {
    let p = policy("answer = \"all\"");
    let (l, ip) = bound(&p, MAC, NOW);
    let down = Guard { journal_ok: false, ..STRANGER };
    // A new client: nothing, whatever it sends.
    let other = [2, 0, 0, 0, 0, 8];
    assert!(matches!(guarded(&p, &l, MessageType::Discover, other, vec![], NOW, &down), Decision::Ignore(Why::JournalDown)));
    // RENEWING half way through: ACK, no change, the lease time left on disk (1800 s).
    let mut m = v4::Message::new_with_id(9, ip, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &MAC);
    m.opts_mut().insert(DhcpOption::MessageType(MessageType::Request));
    let req = parse(&encode_reply(&m).unwrap()).unwrap();
    let (ack, to, ch) = reply(decide_guarded(&req, Via::Dhcp, &l, &p, NOW + 1800, &down));
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!((to, ch), (Dest::Unicast(ip), None));
    assert!(matches!(ack.opts().get(OptionCode::AddressLeaseTime), Some(DhcpOption::AddressLeaseTime(1800))));
    // Its DISCOVER after a reboot: offered its address, for the time left.
    let (offer, _, ch) = reply(guarded(&p, &l, MessageType::Discover, MAC, vec![], NOW + 600, &down));
    assert_eq!((offer.yiaddr(), ch), (ip, None));
    // RELEASE/DECLINE are not recorded while nothing can be written.
    let dec = vec![DhcpOption::ServerIdentifier(p.server_ip), DhcpOption::RequestedIpAddress(ip)];
    assert!(matches!(guarded(&p, &l, MessageType::Decline, MAC, dec, NOW, &down), Decision::Ignore(Why::JournalDown)));
}

/// The neighbour-table room the appliance asks for counts the pools on its own segment only
/// (relayed nodes sit behind a router: one entry).
#[test]
fn on_link_hosts_count_the_local_pools_only() {
    assert_eq!(policy("").on_link_hosts(), 254, "no pool: the interface's /24 less network and broadcast");
    let p = policy("[[dhcp.pool]]\nsubnet = \"10.66.0.0/24\"\nrange = [\"10.66.0.100\", \"10.66.0.199\"]\n[[dhcp.pool]]\nsubnet = \"10.67.0.0/16\"\nrouter = \"10.67.0.1\"");
    assert_eq!(p.on_link_hosts(), 100);
    // Only relayed pools (the reservation's subnet kept so that the config is valid, but moved
    // off the appliance's address).
    let cfg = config("[[dhcp.pool]]\nsubnet = \"10.66.0.0/24\"\n[[dhcp.pool]]\nsubnet = \"10.67.0.0/16\"\nrouter = \"10.67.0.1\"");
    let elsewhere = Iface { ip: Ipv4Addr::new(10, 99, 0, 1), net: "10.99.0.0/24".parse().unwrap(), ..iface() };
    assert_eq!(Policy::new(&cfg, &elsewhere).on_link_hosts(), 0);
}
