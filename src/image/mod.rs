//! The image store (issue 3): image trees under the store root, deterministic packing to
//! tar(.zst) with a manifest, change detection, base + diff archives, safe streaming unpack and
//! .torrent files.
//!
//! # Ownership
//! This module owns everything under the store root (`images/`, `overrides/`, `archives/`,
//! `excludes/`) and the archive format. It must not know about nodes, DHCP or the network: the
//! swarm module gets finished archives and .torrent files from it, the installer calls
//! [`unpack::unpack`] on a byte stream.
//!
//! # Layout of the module
//! `scan` reads a tree, `tarw` encodes tar headers, `tarr` parses them, `pack` streams a tree into an archive,
//! `unpack` restores one safely, `manifest` describes an archive, `store` is the directory layout
//! and the `image` subcommands, `torrent` writes .torrent files, `progress` shows progress.

pub mod acl;
pub mod error;
pub mod manifest;
pub mod pack;
pub mod path;
pub mod progress;
pub mod scan;
pub mod sign;
pub mod store;
pub mod tarr;
pub mod tarw;
pub mod torrent;
pub mod unpack;

pub use error::{ImageError, Refusal};
