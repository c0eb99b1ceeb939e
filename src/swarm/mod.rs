//! The swarm: the appliance's private HTTP tracker (BEP 3 announce and scrape, BEP 23 compact
//! peers), its librqbit initial seed, the swarm's HTTP/JSON face, and the download side used by
//! `si-appliance fetch` (later by the installer). Knows info-hashes and peers, never packs images.
//! librqbit types appear only in `seed.rs` (the appliance's seed) and in `engine::Meta` (torrent
//! parsing); the download side runs our own engine ([`engine`]).

pub mod api_http;
pub mod engine;
pub mod fetch;
pub mod http_get;
pub mod seed;
pub mod tracker;
pub mod tracker_http;

pub use tracker::{Tracker, TrackerPolicy};
