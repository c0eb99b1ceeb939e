//! si-appliance: one binary that turns a laptop on a rack switch into an imaging appliance
//! (DHCP/PXE, TFTP, HTTP, image store, BitTorrent tracker and seed) and, inside the clients'
//! initramfs, into their installer.
//!
//! # Layout
//! One module per arrow of the data flow (see `../shared/ARCHITECTURE.md` in the project's
//! workspace and README.md): `dhcp`, `boot`, `image`, … may import `types`, `config` and `net`
//! but not each other; `app` is where they meet.

pub mod app;
pub mod boot;
pub mod cli;
pub mod config;
pub mod dhcp;
pub mod http_serve;
pub mod image;
pub mod install;
pub mod monitor;
pub mod net;
pub mod node_api;
pub mod nodes;
pub mod plan;
pub mod private_file;
pub mod swarm;
pub mod task;
pub mod types;
pub mod usb;
