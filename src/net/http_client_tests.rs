//! Tests of the HTTP client: the decoder by table and by property, the exchange on loopback.

use super::*;
use proptest::prelude::*;

/// Feeds `bytes` in pieces cut at `cuts` (positions, any order) and finishes at the end.
fn decode(bytes: &[u8], cuts: &[usize], max_body: usize) -> Result<Response, DecodeError> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.push(bytes.len());
    at.sort_unstable();
    let mut d = Decoder::new(max_body);
    let mut prev = 0;
    for c in at {
        if d.push(&bytes[prev..c])? == Progress::Done {
            break;
        }
        prev = c;
    }
    d.finish().map_err(DecodeError::Parse)
}

fn ok(status: u16, body: &[u8]) -> Result<Response, DecodeError> {
    Ok(Response { status, body: body.to_vec(), location: None })
}

fn parse_err(e: ParseError) -> Result<Response, DecodeError> {
    Err(DecodeError::Parse(e))
}

#[test]
fn responses_decode_by_framing_and_malformed_ones_are_typed_errors() {
    let too_big = Err(DecodeError::TooBig(TooBig { limit: 8 }));
    let cases: &[(&[u8], Result<Response, DecodeError>)] = &[
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", ok(200, b"{}")),
        // Bytes after a Content-Length body are not part of it.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}junk", ok(200, b"{}")),
        (b"HTTP/1.0 404 Not Found\r\nA: b\r\n\r\nnope", ok(404, b"nope")),
        (b"HTTP/1.1 204 No Content\r\n\r\n", ok(204, b"")),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1;x=y\r\nd\r\n0\r\n\r\n", ok(200, b"abcd")),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nTrailer: t\r\n\r\n", ok(200, b"abc")),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\nContent-Length: 99\r\n\r\n1\r\nz\r\n0\r\n\r\n", ok(200, b"z")),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nk", ok(201, b"k")),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 12345678\r\n\r\n", too_big.clone()),
        (b"HTTP/1.1 200 OK\r\n\r\n0123456789", too_big.clone()),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n", too_big),
        (b"garbage", parse_err(ParseError::Truncated { got: 7 })),
        (b"garbage\r\n\r\n", parse_err(ParseError::StatusLine)),
        (b"\r\n\r\n", parse_err(ParseError::StatusLine)),
        (b"HTTP/1.1 abc\r\n\r\n", parse_err(ParseError::StatusLine)),
        (b"SMTP 200\r\n\r\n", parse_err(ParseError::StatusLine)),
        (b"HTTP/1.1 2000 OK\r\n\r\n", parse_err(ParseError::StatusLine)),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", parse_err(ParseError::Header)),
        (b"HTTP/1.1 200 \xff\r\n\r\n", parse_err(ParseError::HeadNotText)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", parse_err(ParseError::ContentLength)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", parse_err(ParseError::ContentLength)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", parse_err(ParseError::TransferCoding("gzip".into()))),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", parse_err(ParseError::ChunkSize)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n", parse_err(ParseError::ChunkFraming)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", parse_err(ParseError::Truncated { got: 41 })),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", parse_err(ParseError::Truncated { got: 55 })),
    ];
    for (i, (input, want)) in cases.iter().enumerate() {
        assert_eq!(&decode(input, &[], 8), want, "case {i}: {:?}", String::from_utf8_lossy(input));
        // The same answer byte by byte.
        let cuts: Vec<usize> = (0..input.len()).collect();
        assert_eq!(&decode(input, &cuts, 8), want, "case {i} byte by byte");
    }
}

#[test]
fn an_endless_head_is_refused_at_its_limit() {
    let mut d = Decoder::new(8);
    let line = b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    assert_eq!(d.push(b"HTTP/1.1 200 OK\r\n"), Ok(Progress::More));
    let mut pushed = 17;
    let err = loop {
        match d.push(line) {
            Ok(Progress::More) => pushed += line.len(),
            other => break other,
        }
        assert!(pushed <= MAX_HEAD + line.len(), "head grew past the limit");
    };
    assert_eq!(err, Err(DecodeError::Parse(ParseError::HeadTooBig)));
}

/// How a generated response frames its body.
#[derive(Debug, Clone)]
enum Framing {
    Length,
    /// Chunk sizes (cycled until the body is used up).
    Chunked(Vec<usize>),
    Close,
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        Just(Framing::Length),
        prop::collection::vec(1usize..300, 1..6).prop_map(Framing::Chunked),
        Just(Framing::Close),
    ]
}

/// A response as a server would write it.
fn encode(status: u16, headers: &[(String, String)], body: &[u8], framing: &Framing) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} Whatever Reason\r\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    match framing {
        Framing::Length => out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes()),
        Framing::Chunked(_) => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n"),
        Framing::Close => out.extend_from_slice(b"\r\n"),
    }
    match framing {
        Framing::Chunked(sizes) => {
            let mut rest = body;
            for &n in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, r) = rest.split_at(n.min(rest.len()));
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
                rest = r;
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
        _ => out.extend_from_slice(body),
    }
    out
}

fn status() -> impl Strategy<Value = u16> {
    (200u16..600).prop_filter("no body by definition", |s| *s != 204 && *s != 304)
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("X-[A-Za-z0-9-]{1,12}", "[ -~]{0,40}"), 0..5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_or_fail_typed_whatever_the_read_boundaries(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        max_body in 0usize..100,
    ) {
        // No panic, and the same answer whichever way the bytes were cut.
        prop_assert_eq!(decode(&bytes, &cuts, max_body), decode(&bytes, &[], max_body));
    }

    #[test]
    fn mangled_valid_answers_never_panic(
        status in status(),
        body in prop::collection::vec(any::<u8>(), 0..300),
        framing in framing(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = encode(status, &[], &body, &framing);
        for (at, b) in flips {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        prop_assert_eq!(decode(&bytes, &cuts, 1000), decode(&bytes, &[], 1000));
    }

    #[test]
    fn generated_answers_round_trip_at_any_read_boundaries(
        status in status(),
        headers in headers(),
        body in prop::collection::vec(any::<u8>(), 0..2000),
        framing in framing(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let bytes = encode(status, &headers, &body, &framing);
        prop_assert_eq!(decode(&bytes, &cuts, body.len()), ok(status, &body));
    }

    #[test]
    fn a_cut_off_answer_is_an_error_never_a_shorter_body(
        status in status(),
        body in prop::collection::vec(any::<u8>(), 1..500),
        chunked in any::<bool>(),
        keep in any::<prop::sample::Index>(),
    ) {
        let framing = if chunked { Framing::Chunked(vec![37, 5, 200]) } else { Framing::Length };
        let bytes = encode(status, &[], &body, &framing);
        let cut = &bytes[..keep.index(bytes.len())];
        let got = decode(cut, &[], body.len());
        prop_assert!(matches!(got, Err(DecodeError::Parse(ParseError::Truncated { .. }))), "{:?}", got);
    }

    #[test]
    fn a_body_over_the_limit_is_refused_never_cut(
        body in prop::collection::vec(any::<u8>(), 1..500),
        framing in framing(),
        under in 1usize..500,
    ) {
        let limit = body.len().saturating_sub(under);
        let bytes = encode(200, &[], &body, &framing);
        prop_assert_eq!(decode(&bytes, &[], limit), Err(DecodeError::TooBig(TooBig { limit })));
    }
}

/// A one-shot server on loopback: answers the first request with `answer` and closes (or
/// holds the connection open without answering when `answer` is None).
async fn serve_once(answer: Option<Vec<u8>>) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while find(&req, b"\r\n\r\n").is_none() {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        match answer {
            Some(a) => {
                s.write_all(&a).await.expect("write");
                s.shutdown().await.ok();
            }
            None => {
                // Hold the connection until the client gives up.
                let _ = s.read(&mut buf).await;
            }
        }
        req
    });
    (addr, h)
}

#[tokio::test]
async fn a_request_carries_token_and_body_and_a_chunked_answer_is_read() {
    let (addr, server) = serve_once(Some(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec())).await;
    let req = Request { method: "POST", path: "/api/x?y=1", bearer: Some("tok"), json: Some(b"{\"a\":1}") };
    let r = request(addr, req, 100, Duration::from_secs(10)).await.expect("answer");
    assert_eq!(r, Response { status: 201, body: b"ok".to_vec(), location: None });
    let sent = String::from_utf8(server.await.expect("server")).expect("text");
    assert!(sent.starts_with("POST /api/x?y=1 HTTP/1.1\r\n"), "{sent}");
    assert!(sent.contains("Authorization: Bearer tok\r\n") && sent.contains("Content-Length: 7\r\n"), "{sent}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_an_error_not_a_truncated_answer() {
    // Delimited by the end of the connection: the old monitor client returned the first
    // `limit` bytes as if they were the whole answer.
    let (addr, _server) = serve_once(Some([&b"HTTP/1.1 200 OK\r\n\r\n"[..], &[b'x'; 5000]].concat())).await;
    let e = get(addr, "/big", 1000, Duration::from_secs(10)).await.expect_err("too big");
    assert!(matches!(e.failure, Failure::TooBig { limit: 1000 }), "{e:?}");
}

#[tokio::test]
async fn a_refused_status_is_a_typed_error_with_the_code() {
    let (addr, _server) = serve_once(Some(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno such x".to_vec())).await;
    let e = get(addr, "/missing", 1000, Duration::from_secs(10)).await.expect_err("404");
    assert_eq!(e.status(), Some(404));
    assert_eq!(format!("{e:#}"), format!("GET http://{addr}/missing: status 404: no such x"));
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_times_out() {
    let (addr, _server) = serve_once(None).await;
    let e = get(addr, "/slow", 1000, Duration::from_secs(30)).await.expect_err("timeout");
    assert!(matches!(e.failure, Failure::Timeout(d) if d == Duration::from_secs(30)), "{e:?}");
}

#[tokio::test]
async fn no_listener_is_a_connect_error() {
    // Bind then drop: the port is closed (nothing else binds ephemeral ports this quickly).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let e = get(addr, "/", 10, Duration::from_secs(10)).await.expect_err("refused");
    assert!(matches!(e.failure, Failure::Connect(_)), "{e:?}");
    assert_eq!(e.io_kind(), Some(std::io::ErrorKind::ConnectionRefused));
}

#[test]
fn a_redirect_keeps_its_location() {
    let r = decode(b"HTTP/1.1 302 Found\r\nlocation: http://10.0.0.7:8081/boot/vmlinuz\r\nContent-Length: 3\r\n\r\nxyz", &[5, 40], 100)
        .expect("decodes");
    assert_eq!((r.status, r.location.as_deref()), (302, Some("http://10.0.0.7:8081/boot/vmlinuz")));
    assert_eq!(decode(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &[], 10).expect("decodes").location, None);
}
