//! A minimal HTTP/1.0 GET for the download side (the .torrent and `/api/swarm/<name>` from the
//! appliance). Plain HTTP on the provisioning segment; bounded in size and time. Not a general
//! client: no redirects, no chunked encoding (HTTP/1.0 responses are delimited by close).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Errors of a GET.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// Connecting, writing or reading failed.
    #[error("GET http://{addr}{path}")]
    Io {
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer within the time limit.
    #[error("GET http://{addr}{path}: no answer within {limit:?}")]
    Timeout {
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// The limit.
        limit: Duration,
    },
    /// The answer is not HTTP, too big, or its status is not 200.
    #[error("GET http://{addr}{path}: {why}")]
    Bad {
        /// Server.
        addr: SocketAddr,
        /// Path.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Largest body accepted.
pub const MAX_BODY: usize = 16 << 20;

/// GETs `path` from `addr` and returns the body of a 200 answer.
///
/// # Errors
/// [`GetError`].
pub async fn get(addr: SocketAddr, path: &str, limit: Duration) -> Result<Vec<u8>, GetError> {
    let io = |source| GetError::Io { addr, path: path.to_owned(), source };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(io)?;
        let mut buf = Vec::new();
        (&mut s).take((MAX_BODY + 64 * 1024) as u64).read_to_end(&mut buf).await.map_err(io)?;
        Ok(buf)
    };
    let buf = tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| GetError::Timeout { addr, path: path.to_owned(), limit })??;
    parse(&buf).map_err(|why| GetError::Bad { addr, path: path.to_owned(), why })
}

/// Splits a raw HTTP answer; the body of a 200, or why not.
fn parse(buf: &[u8]) -> Result<Vec<u8>, String> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "headers are not text")?;
    let status = head.lines().next().and_then(|l| l.split_whitespace().nth(1)).ok_or("no status line")?;
    if status != "200" {
        return Err(format!("status {status}"));
    }
    let body = &buf[end + 4..];
    if body.len() > MAX_BODY {
        return Err("answer too big".into());
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn answers_are_split_and_refused_by_status() {
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody").unwrap(), b"body");
        assert!(parse(b"HTTP/1.1 404 Not Found\r\n\r\nx").unwrap_err().contains("404"));
        assert!(parse(b"garbage").is_err());
        assert!(parse(b"\r\n\r\n").is_err());
    }
}
