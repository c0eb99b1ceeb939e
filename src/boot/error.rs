//! Errors of the boot services: one enum for the services (what stops them), one for a single
//! file lookup (what a client is told). Neither names a third-party type: async-tftp's error
//! stays behind [`crate::boot::tftp::TftpError`].

use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors that stop a boot service (returned to `app`).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The TFTP server could not be set up or its listening socket failed.
    #[error("tftp server on {addr}")]
    Tftp {
        /// The listening address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: crate::boot::tftp::TftpError,
    },
    /// The thread running the TFTP server panicked or was cancelled.
    #[error("tftp server thread: {0}")]
    TftpThread(String),
    /// The listening socket handed to the TFTP service has no local address.
    #[error("tftp listening socket")]
    TftpSocket(#[source] std::io::Error),
}

/// Why a request name is not one of our boot files. Every case is answered "not found"
/// (TFTP error 1/2, HTTP 404); the reason is only logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    /// Empty, too long, or not UTF-8.
    #[error("malformed name")]
    Malformed,
    /// Contains `..`, a backslash, a NUL, or is an absolute path to something that is not a
    /// key: a traversal attempt.
    #[error("path traversal attempt")]
    Traversal,
    /// Well-formed but not a file we serve.
    #[error("not a boot file")]
    Unknown,
}

/// Why a known boot file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No loader directory holds this file (or the configured kernel/initrd is missing).
    #[error("{name} not found in {searched:?}")]
    NotFound {
        /// The key.
        name: String,
        /// What was searched.
        searched: Vec<PathBuf>,
    },
    /// The file is a symlink whose target lies outside every loader directory.
    #[error("{path} resolves to {target}, outside the loader directories")]
    Escapes {
        /// The entry in the loader directory.
        path: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// Not a regular file (a directory, a device, a FIFO).
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    /// The file exists but could not be opened or inspected.
    #[error("opening {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// This file needs the client's MAC, which the request does not carry.
    #[error("{0} needs the client's MAC address")]
    NeedsMac(&'static str),
}

impl OpenError {
    /// True when the client simply asked for something we do not have (logged at debug),
    /// false for configuration or disk problems (logged at warn).
    pub fn is_not_found(&self) -> bool {
        matches!(self, OpenError::NotFound { .. } | OpenError::NeedsMac(_))
    }
}
