//! A minimal HTTP/1.0 client for the node API (plan GET, report POST) with a Bearer token:
//! bounded in size and time, no redirects, no chunked encoding (HTTP/1.0 answers end at close).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest answer accepted.
const MAX_ANSWER: u64 = 1 << 20;

/// Errors of a request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, writing or reading failed.
    #[error("{method} http://{addr}{path}: {source}")]
    Io {
        /// Method.
        method: &'static str,
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer in time.
    #[error("{method} http://{addr}{path}: no answer within {limit:?}")]
    Timeout {
        /// Method.
        method: &'static str,
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// The limit.
        limit: Duration,
    },
    /// Not an HTTP answer.
    #[error("{method} http://{addr}{path}: {why}")]
    Bad {
        /// Method.
        method: &'static str,
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl HttpError {
    /// The I/O cause, if the request failed at the socket (for "connection refused" messages).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            HttpError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// An answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Sends one request (`body` as JSON when given) and returns the answer, whatever its status.
///
/// # Errors
/// [`HttpError`] when no well-formed answer arrives within `limit`.
pub async fn request(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    token: &str,
    body: Option<&[u8]>,
    limit: Duration,
) -> Result<Answer, HttpError> {
    let io = |source| HttpError::Io { method, addr, path: path.to_owned(), source };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n");
        if let Some(b) = body {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(body.unwrap_or_default());
        s.write_all(&out).await.map_err(io)?;
        let mut buf = Vec::new();
        (&mut s).take(MAX_ANSWER + 1).read_to_end(&mut buf).await.map_err(io)?;
        Ok(buf)
    };
    let buf = tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| HttpError::Timeout { method, addr, path: path.to_owned(), limit })??;
    parse(&buf).map_err(|why| HttpError::Bad { method, addr, path: path.to_owned(), why })
}

/// Splits a raw answer into status and body.
fn parse(buf: &[u8]) -> Result<Answer, String> {
    if buf.len() as u64 > MAX_ANSWER {
        return Err("answer too big".into());
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "headers are not text")?;
    let status = head
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or("no status line")?;
    Ok(Answer { status, body: buf[end + 4..].to_vec() })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn answers_split_and_garbage_is_refused() {
        let a = parse(b"HTTP/1.1 404 Not Found\r\nA: b\r\n\r\nnope").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (404, &b"nope"[..]));
        assert_eq!(parse(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap().status, 204);
        for bad in [&b"garbage"[..], b"\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"SMTP 200\r\n\r\n"] {
            assert!(parse(bad).is_err());
        }
    }
}
