//! Publishing an archive while the appliance runs (an update made on demand): its .torrent
//! (made and cached as the configured archives' are), the seed, the tracker and the served map,
//! so that `/torrents/<name>.torrent` and `/api/swarm/<name>` answer for it at once.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use super::api_http::{ServedMap, lookup};
use super::seed::{self, Seed, SeedError, Served, TorrentMaker};
use super::tracker_http::SharedTracker;
use crate::types::ImageName;

/// What publishing needs of the running swarm.
pub struct Publisher {
    /// The served map the routes read.
    pub served: ServedMap,
    /// The appliance's seed (`None`: it started with nothing to seed).
    pub seed: Option<Arc<Seed>>,
    /// The tracker.
    pub tracker: SharedTracker,
    /// Where the seed listens (registered in the tracker at once).
    pub seed_addr: SocketAddrV4,
    /// The tracker's announce URL, written into the .torrent.
    pub announce: String,
    /// The .torrent cache (`<state_dir>/swarm/torrents`).
    pub cache_dir: PathBuf,
    /// The torrent builder (the image store's).
    pub make: TorrentMaker,
}

impl Publisher {
    /// Publishes `archive` under its file name less `.tar.zst`, for `expected_nodes` nodes (the
    /// `done` count of `/api/swarm/<name>`). Publishing the same archive again only sets the
    /// count.
    ///
    /// # Errors
    /// [`SeedError::NoSeed`], [`SeedError::DuplicateName`] (another archive under that name), and
    /// the hashing and seeding errors.
    pub async fn publish(&self, archive: &Path, expected_nodes: Option<u32>) -> Result<Served, SeedError> {
        let name = seed::name_of(archive)?;
        let mut s = seed::prepare(archive, &self.announce, &self.cache_dir, &self.make).await?;
        s.expected_nodes = expected_nodes;
        if let Some(old) = lookup(&self.served, &name) {
            if old.info_hash != s.info_hash {
                return Err(SeedError::DuplicateName(name));
            }
            self.set_expected(&name, expected_nodes);
            return Ok(s);
        }
        let seed = self.seed.as_ref().ok_or_else(|| SeedError::NoSeed(name.clone()))?;
        seed.add(&s).await?;
        seed::restamp(std::slice::from_ref(&s), &self.announce, &self.cache_dir)?;
        {
            let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
            t.register(s.info_hash);
            // The seed is in the tracker before the first node asks (the refresh loop keeps it).
            let _ = t.announce(&seed::seed_announce(s.info_hash, self.seed_addr), std::time::Instant::now(), &mut rand::rng());
        }
        self.served.write().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), s.clone());
        info!(%name, info_hash = %s.info_hash, size = s.size, ?expected_nodes, "published");
        Ok(s)
    }

    /// Sets how many nodes a published archive waits for.
    pub fn set_expected(&self, name: &ImageName, expected_nodes: Option<u32>) {
        if let Some(s) = self.served.write().unwrap_or_else(|e| e.into_inner()).get_mut(name) {
            s.expected_nodes = expected_nodes;
        }
    }
}
