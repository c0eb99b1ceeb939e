//! The installer's calls to the node API (plan GET, report POST) with its Bearer token: a thin
//! front of [`crate::net::http_client`] with the installer's body limit.

use std::net::SocketAddr;
use std::time::Duration;

use crate::net::http_client::{self, Request};
pub use crate::net::http_client::{HttpError, Response as Answer};

/// Largest answer body accepted (a plan is a few KB; a larger body is an error).
const MAX_ANSWER: usize = 1 << 20;

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
    http_client::request(addr, Request { method, path, bearer: Some(token), json: body }, MAX_ANSWER, limit).await
}
