//! The download side's GETs (the .torrent, the manifest, `/api/swarm/<name>` and the tracker
//! announce): a thin front of [`crate::net::http_client`] with the swarm's body limit.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::net::http_client::HttpError as GetError;

/// Largest body accepted (a larger one is an error, not a cut answer).
pub const MAX_BODY: usize = 16 << 20;

/// GETs `path` from `addr` and returns the body of a 200 answer.
///
/// # Errors
/// [`GetError`]: no connection, a timeout, a malformed or too-big answer, or a status other
/// than 200 ([`crate::net::http_client::Failure::Status`]).
pub async fn get(addr: SocketAddr, path: &str, limit: Duration) -> Result<Vec<u8>, GetError> {
    crate::net::http_client::get(addr, path, MAX_BODY, limit).await
}
