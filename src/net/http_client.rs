//! The one HTTP/1.1 client of the crate: the installer's plan GET and report POST, the swarm's
//! `.torrent`, manifest and `/api/swarm` GETs and the tracker announce, and the CLI's calls to a
//! running appliance (`status`, `report`, `node …`).
//!
//! Plain HTTP to the appliance on the provisioning segment or loopback, one request per
//! connection (`Connection: close`). Hand-written on tokio because the installer runs from a
//! static musl initramfs and needs nothing more: no TLS, no redirects, no keep-alive, no
//! proxies. hyper's client would bring hyper-util and a connection pool for one request per
//! connection; ureq is blocking and brings its own TLS/proxy layers; neither adds what we need.
//!
//! Bounded everywhere: the whole exchange runs under one time limit, the response head is at
//! most [`MAX_HEAD`] bytes and the body at most the caller's `max_body` — a larger body is an
//! error ([`Failure::TooBig`]), never a silent truncation. Bodies delimited by Content-Length,
//! by chunked transfer coding or by the end of the connection are all read. The parsing is the
//! pure [`Decoder`] (bytes in, a [`Response`] or a typed [`ParseError`] out), fed by a thin
//! read loop.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 1024;

/// Why a response could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The head is longer than [`MAX_HEAD`].
    #[error("response head longer than {MAX_HEAD} bytes")]
    HeadTooBig,
    /// The head is not UTF-8 text.
    #[error("response head is not text")]
    HeadNotText,
    /// The first line is not `HTTP/1.x NNN …`.
    #[error("no HTTP status line")]
    StatusLine,
    /// A header line has no `name: value` shape.
    #[error("malformed header line")]
    Header,
    /// Content-Length is not a number, or given twice with different values.
    #[error("bad Content-Length")]
    ContentLength,
    /// A transfer coding other than chunked.
    #[error("unsupported transfer coding {0:?}")]
    TransferCoding(String),
    /// A chunk-size line that is not hex, too long or overflows.
    #[error("bad chunk size line")]
    ChunkSize,
    /// Chunk data not followed by CRLF, or a trailer line too long.
    #[error("bad chunk framing")]
    ChunkFraming,
    /// The connection ended before the response was complete.
    #[error("connection closed after {got} bytes, before the response was complete")]
    Truncated {
        /// Bytes received in all.
        got: u64,
    },
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The `Location` header (redirects), as sent.
    pub location: Option<String>,
}

/// What a [`Decoder`] wants after a [`Decoder::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The response is not complete yet: read more (or call [`Decoder::finish`] at the end of
    /// the connection).
    More,
    /// The response is complete: call [`Decoder::finish`].
    Done,
}

/// Where the decoder is in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Content-Length: this many body bytes still to come.
    Length(u64),
    /// No length: the body ends with the connection.
    UntilClose,
    ChunkSize,
    /// Inside a chunk: this many bytes still to come.
    ChunkData(u64),
    /// After a chunk's data: its CRLF.
    ChunkEnd,
    Trailers,
    Done,
}

/// Why a body was refused as too big (the decoder's side of [`Failure::TooBig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooBig {
    /// The limit.
    pub limit: usize,
}

/// A pure, incremental HTTP/1.x response decoder: push bytes as they arrive, in any split.
///
/// It never reads past the response it decodes (bytes after it are ignored) and never holds
/// more than [`MAX_HEAD`] + `max_body` bytes.
#[derive(Debug)]
pub struct Decoder {
    max_body: usize,
    state: State,
    /// Bytes not yet consumed (the head, a chunk-size or trailer line in progress).
    pending: Vec<u8>,
    status: u16,
    body: Vec<u8>,
    got: u64,
    location: Option<String>,
}

/// What went wrong inside the decoder: a malformed response or a too-big body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Malformed.
    Parse(ParseError),
    /// The body is larger than allowed.
    TooBig(TooBig),
}

impl From<ParseError> for DecodeError {
    fn from(e: ParseError) -> Self {
        DecodeError::Parse(e)
    }
}

impl Decoder {
    /// A decoder that accepts bodies up to `max_body` bytes.
    pub fn new(max_body: usize) -> Decoder {
        Decoder { max_body, state: State::Head, pending: Vec::new(), status: 0, body: Vec::new(), got: 0, location: None }
    }

    /// Feeds the next bytes of the connection.
    ///
    /// # Errors
    /// [`DecodeError`] as soon as the response is known to be malformed or too big.
    pub fn push(&mut self, data: &[u8]) -> Result<Progress, DecodeError> {
        self.got += data.len() as u64;
        if self.state != State::Head {
            return self.push_body(data);
        }
        // The end of the head can straddle reads: look from 3 bytes before the new ones.
        let mut from = self.pending.len().saturating_sub(3);
        self.pending.extend_from_slice(data);
        loop {
            let Some(i) = find(&self.pending[from..], b"\r\n\r\n") else {
                if self.pending.len() > MAX_HEAD {
                    return Err(ParseError::HeadTooBig.into());
                }
                return Ok(Progress::More);
            };
            let end = from + i;
            if end + 4 > MAX_HEAD {
                return Err(ParseError::HeadTooBig.into());
            }
            let rest = self.pending.split_off(end + 4);
            let head = std::mem::replace(&mut self.pending, rest);
            self.head(&head[..end])?;
            if self.state != State::Head {
                let rest = std::mem::take(&mut self.pending);
                return self.push_body(&rest);
            }
            // A 1xx interim answer was skipped: the real head follows in what is left.
            from = 0;
        }
    }

    /// Runs body bytes through the body states.
    fn push_body(&mut self, mut data: &[u8]) -> Result<Progress, DecodeError> {
        loop {
            match self.state {
                State::Done => return Ok(Progress::Done),
                // push() parses the head before any body byte is looked at.
                State::Head => return Err(ParseError::StatusLine.into()),
                State::Length(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    self.take_body(&data[..n])?;
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 { State::Done } else { State::Length(left) };
                }
                State::UntilClose => {
                    self.take_body(data)?;
                    return Ok(Progress::More);
                }
                State::ChunkSize | State::Trailers => {
                    let Some((line, used)) = self.line(data)? else { return Ok(Progress::More) };
                    data = &data[used..];
                    if self.state == State::Trailers {
                        if line.is_empty() {
                            self.state = State::Done;
                        }
                    } else {
                        let size = chunk_size(&line)?;
                        if size > (self.max_body - self.body.len()) as u64 {
                            return Err(DecodeError::TooBig(TooBig { limit: self.max_body }));
                        }
                        self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                    }
                }
                State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    self.take_body(&data[..n])?;
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData(left) };
                }
                State::ChunkEnd => {
                    let n = (2 - self.pending.len()).min(data.len());
                    self.pending.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.pending.len() == 2 {
                        if self.pending != b"\r\n" {
                            return Err(ParseError::ChunkFraming.into());
                        }
                        self.pending.clear();
                        self.state = State::ChunkSize;
                    }
                }
            }
            if data.is_empty() && self.state != State::Done {
                return Ok(Progress::More);
            }
        }
    }

    /// Appends to the body, refusing to go past the limit.
    fn take_body(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        if self.body.len() + data.len() > self.max_body {
            return Err(DecodeError::TooBig(TooBig { limit: self.max_body }));
        }
        self.body.extend_from_slice(data);
        Ok(())
    }

    /// One CRLF-terminated line (chunk size or trailer) out of `pending` + `data`: the line
    /// without its CRLF and how many bytes of `data` it used; None when incomplete.
    fn line(&mut self, data: &[u8]) -> Result<Option<(Vec<u8>, usize)>, DecodeError> {
        let old = self.pending.len();
        let from = old.saturating_sub(1);
        let look = data.len().min(MAX_LINE + 2);
        self.pending.extend_from_slice(&data[..look]);
        match find(&self.pending[from..], b"\r\n") {
            Some(i) => {
                let end = from + i;
                let used = end + 2 - old;
                let mut line = std::mem::take(&mut self.pending);
                line.truncate(end);
                if line.len() > MAX_LINE {
                    return Err(self.line_error());
                }
                Ok(Some((line, used)))
            }
            None if self.pending.len() > MAX_LINE => Err(self.line_error()),
            None => Ok(None),
        }
    }

    fn line_error(&self) -> DecodeError {
        match self.state {
            State::Trailers => ParseError::ChunkFraming.into(),
            _ => ParseError::ChunkSize.into(),
        }
    }

    /// Reads the status line and headers; sets the body state.
    fn head(&mut self, head: &[u8]) -> Result<(), DecodeError> {
        let head = std::str::from_utf8(head).map_err(|_| ParseError::HeadNotText)?;
        let mut lines = head.split("\r\n");
        let status = lines.next().and_then(status_line).ok_or(ParseError::StatusLine)?;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut location = None;
        for l in lines {
            let (name, value) = l.split_once(':').ok_or(ParseError::Header)?;
            if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                return Err(ParseError::Header.into());
            }
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n: u64 = value.parse().map_err(|_| ParseError::ContentLength)?;
                if !value.bytes().all(|b| b.is_ascii_digit()) || length.is_some_and(|m| m != n) {
                    return Err(ParseError::ContentLength.into());
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case("location") {
                location = Some(value.to_owned());
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // RFC 9112 §6.1: chunked must be the last coding; we know no other.
                for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                    if !coding.eq_ignore_ascii_case("chunked") || chunked {
                        return Err(ParseError::TransferCoding(coding.to_owned()).into());
                    }
                    chunked = true;
                }
            }
        }
        if (100..200).contains(&status) {
            // Interim answer (RFC 9110 §15.2): skip it, the final one follows.
            return Ok(());
        }
        self.status = status;
        self.location = location;
        // RFC 9112 §6.3: no body for 204 and 304; chunked wins over Content-Length.
        self.state = if status == 204 || status == 304 {
            State::Done
        } else if chunked {
            State::ChunkSize
        } else if let Some(n) = length {
            if n > self.max_body as u64 {
                return Err(DecodeError::TooBig(TooBig { limit: self.max_body }));
            }
            if n == 0 { State::Done } else { State::Length(n) }
        } else {
            State::UntilClose
        };
        Ok(())
    }

    /// True once the response is complete (no need to wait for the end of the connection).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The response, at the end of the connection or once [`Progress::Done`].
    ///
    /// # Errors
    /// [`ParseError::Truncated`] when the connection ended inside the response.
    pub fn finish(self) -> Result<Response, ParseError> {
        match self.state {
            State::Done | State::UntilClose => Ok(Response { status: self.status, body: self.body, location: self.location }),
            _ => Err(ParseError::Truncated { got: self.got }),
        }
    }
}

/// Position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The status code of `HTTP/1.x NNN reason`.
fn status_line(l: &str) -> Option<u16> {
    let rest = l.strip_prefix("HTTP/1.")?;
    let mut parts = rest.splitn(3, ' ');
    let minor = parts.next()?;
    let code = parts.next()?;
    if minor.len() != 1 || !minor.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    (100..600).contains(&code).then_some(code)
}

/// The size of a `hex[;ext]` chunk-size line.
fn chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::ChunkSize)?;
    let hex = line.split(';').next().unwrap_or_default().trim();
    if hex.is_empty() || hex.len() > 15 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ParseError::ChunkSize);
    }
    u64::from_str_radix(hex, 16).map_err(|_| ParseError::ChunkSize)
}

/// What is wrong with an exchange (the request it belongs to is in [`HttpError`]).
///
/// The causes are printed in the message and not chained as `source()`: callers that keep
/// only a string (log lines, the engine's announce) still get the whole reason, and `{:#}`
/// prints it once.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// No TCP connection.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// Writing the request or reading the response failed.
    #[error("connection failed: {0}")]
    Io(std::io::Error),
    /// No complete response within the limit.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The response is not well-formed HTTP.
    #[error("bad answer: {0}")]
    Parse(ParseError),
    /// The body is larger than the limit (it is refused, not cut).
    #[error("answer body larger than {limit} bytes")]
    TooBig {
        /// The limit.
        limit: usize,
    },
    /// A status the caller does not accept (only [`get`] checks; [`request`] returns any).
    #[error("status {status}: {excerpt}")]
    Status {
        /// The code.
        status: u16,
        /// The start of the body (for the message).
        excerpt: String,
    },
}

/// A failed exchange: which request, and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{method} http://{addr}{path}: {failure}")]
pub struct HttpError {
    /// Method.
    pub method: &'static str,
    /// Server.
    pub addr: SocketAddr,
    /// Path and query.
    pub path: String,
    /// What went wrong.
    pub failure: Failure,
}

impl HttpError {
    /// The I/O cause, if the request failed at the socket (for "connection refused" messages).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match &self.failure {
            Failure::Connect(e) | Failure::Io(e) => Some(e.kind()),
            _ => None,
        }
    }

    /// The status of a refused answer ([`Failure::Status`]).
    pub fn status(&self) -> Option<u16> {
        match self.failure {
            Failure::Status { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET`, `POST`, …
    pub method: &'static str,
    /// Path and query.
    pub path: &'a str,
    /// Sent as `Authorization: Bearer …` when given.
    pub bearer: Option<&'a str>,
    /// A JSON body (sent with Content-Type and Content-Length) when given.
    pub json: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
    /// A GET without token.
    pub fn get(path: &'a str) -> Request<'a> {
        Request { method: "GET", path, bearer: None, json: None }
    }

    /// The request bytes.
    fn encode(&self, addr: SocketAddr) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n", self.method, self.path);
        if let Some(t) = self.bearer {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        match self.json {
            Some(b) => head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len())),
            // A POST without body still says so (some servers want a length on every POST).
            None if self.method != "GET" && self.method != "HEAD" => head.push_str("Content-Length: 0\r\n"),
            None => {}
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.json.unwrap_or_default());
        out
    }
}

/// Sends `req` to `addr` and returns the response, whatever its status, with a body of at most
/// `max_body` bytes; the whole exchange must end within `limit`.
///
/// # Errors
/// [`HttpError`]: no connection, an I/O error, the time limit, a malformed answer or a body
/// over `max_body`.
pub async fn request(addr: SocketAddr, req: Request<'_>, max_body: usize, limit: Duration) -> Result<Response, HttpError> {
    let fail = |failure| HttpError { method: req.method, addr, path: req.path.to_owned(), failure };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(Failure::Connect)?;
        s.write_all(&req.encode(addr)).await.map_err(Failure::Io)?;
        let mut dec = Decoder::new(max_body);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.map_err(Failure::Io)?;
            if n == 0 {
                break;
            }
            match dec.push(&buf[..n]) {
                Ok(Progress::More) => {}
                Ok(Progress::Done) => break,
                Err(DecodeError::Parse(e)) => return Err(Failure::Parse(e)),
                Err(DecodeError::TooBig(t)) => return Err(Failure::TooBig { limit: t.limit }),
            }
        }
        dec.finish().map_err(Failure::Parse)
    };
    tokio::time::timeout(limit, exchange).await.map_err(|_| fail(Failure::Timeout(limit)))?.map_err(fail)
}

/// GETs `path` from `addr` and returns the body of a 200 answer (at most `max_body` bytes,
/// within `limit`).
///
/// # Errors
/// As [`request`], and [`Failure::Status`] for any other status.
pub async fn get(addr: SocketAddr, path: &str, max_body: usize, limit: Duration) -> Result<Vec<u8>, HttpError> {
    let r = request(addr, Request::get(path), max_body, limit).await?;
    if r.status != 200 {
        return Err(HttpError { method: "GET", addr, path: path.to_owned(), failure: Failure::Status { status: r.status, excerpt: excerpt(&r.body) } });
    }
    Ok(r.body)
}

/// The start of a body as one line of text, for error messages.
pub fn excerpt(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]);
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[path = "http_client_tests.rs"]
mod tests;
