//! The swarm: the appliance's private HTTP tracker (BEP 3 announce and scrape, BEP 23 compact
//! peers), its librqbit initial seed, the swarm's HTTP/JSON face, and the download side used by
//! `si-appliance fetch` (later by the installer). Knows info-hashes and peers, never packs images.
//! librqbit appears only in `seed.rs` (the appliance's seed); the download side runs our own
//! engine ([`engine`]), which parses .torrent files with `image::torrent::parse` and speaks to
//! the tracker through the tracker's own codec (`tracker::Announce::to_query`,
//! `tracker::decode_reply`), so the nodes' engine does not link the seed.

pub mod api_http;
pub mod engine;
pub mod fetch;
pub mod http_get;
pub mod publish;
pub mod seed;
pub mod sim;
pub mod tracker;
pub mod tracker_http;

pub use tracker::{Tracker, TrackerPolicy};
