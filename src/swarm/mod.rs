//! The swarm: the appliance's private HTTP tracker (BEP 3 announce and scrape, BEP 23 compact
//! peers) and, later, the librqbit initial seed. Knows info-hashes and peers, never packs images.

pub mod tracker;
pub mod tracker_http;

pub use tracker::{Tracker, TrackerPolicy};
