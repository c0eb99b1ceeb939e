//! The DHCP module's errors: one variant per operation, carrying the object it failed on.

use std::net::SocketAddr;

use super::leases::JournalError;
use super::probe::ForeignOffer;
use crate::net::NetError;

/// Errors of the DHCP service.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// Full mode was refused: the probe heard another DHCP server on the segment.
    #[error(
        "another DHCP server answers on {iface}: {}; refusing to start a full DHCP server next to it. \
         Use --dhcp-mode proxy (dhcp.mode = \"proxy\") to add only boot information alongside it, \
         or stop that server",
        offers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    OtherServer {
        /// The interface probed.
        iface: String,
        /// Who answered.
        offers: Vec<ForeignOffer>,
    },
    /// The probe could not send or receive.
    #[error("probing for other DHCP servers on {iface}")]
    Probe {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The lease journal failed (open, write/fsync, compaction).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A DHCP socket could not be set up.
    #[error("dhcp socket")]
    Socket(#[from] NetError),
    /// Turning a bound std socket into a tokio one failed.
    #[error("registering the socket on {addr} with tokio")]
    Register {
        /// The socket's address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed in a way that will not get better.
    #[error("receiving on {addr}")]
    Recv {
        /// The socket's address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
