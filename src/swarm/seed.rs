//! The appliance's initial seed: one librqbit [`Session`] seeding every served archive. This file
//! and [`fetch`](super::fetch) are the only places that import librqbit; what crosses out of
//! here is [`Served`] (name, archive, torrent bytes, info-hash) and [`SeedStats`].
//!
//! Choices, each for a reason:
//! - Bound to the provisioning interface (`bind_device_name`) and listening on its address only:
//!   the seed must not answer on the site network.
//! - No DHT, no local service discovery (BEP 14 multicast), no UPnP: the appliance's tracker is
//!   the only discovery, so nothing leaks beyond the provisioning segment.
//! - The session does not announce to any tracker (`disable_trackers`): the appliance registers
//!   its own seed in its tracker directly ([`seed_announce`]), which avoids connecting to our own
//!   address through a socket bound to the interface.
//! - Persistence + fastresume in `<state_dir>/swarm/session`: on a restart librqbit trusts the
//!   stored piece bitfield after a spot check instead of re-hashing the archive. The .torrent
//!   of an archive is cached in `<state_dir>/swarm/torrents` keyed by the archive's size and
//!   mtime, so a restart does not re-hash to create it either.
//! - The .torrent comes from the caller ([`TorrentMaker`]: the image store's builder, private,
//!   ~8192 pieces). librqbit's `create_torrent` is not used: it cannot set the `private` flag,
//!   writes no `announce` key, and appends a surplus piece hash when the size is a multiple of the
//!   piece length (aria2c then refuses the torrent).

use std::collections::HashSet;
use std::error::Error as StdError;
use std::net::{SocketAddr, SocketAddrV4};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerMode, ListenerOptions, ManagedTorrent, Session,
    SessionOptions, SessionPersistenceConfig,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::tracker::{Announce, Event, InfoHash};
use crate::image::torrent::{self, TorrentError};
use crate::types::ImageName;

/// librqbit reports errors as `anyhow::Error`; they are kept as the source of our typed
/// variants (boxed, so anyhow does not appear in this module's API).
pub type LibError = Box<dyn StdError + Send + Sync + 'static>;

fn lib(e: anyhow::Error) -> LibError {
    e.into()
}

/// Errors of the seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The archive cannot be read.
    #[error("archive {path}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The archive path has no usable file name or parent directory.
    #[error("archive {0}: not a file path with a directory and a name")]
    ArchivePath(PathBuf),
    /// The image name derived from the archive's file name is not valid.
    #[error("archive {path}")]
    Name {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: crate::types::BadImageName,
    },
    /// Two archives would be served under one name.
    #[error("two archives are named {0}")]
    DuplicateName(ImageName),
    /// An archive is to be published while the appliance seeds nothing (it started without an
    /// image).
    #[error("cannot publish {0}: the appliance's seed is not running (start it with an image)")]
    NoSeed(ImageName),
    /// Creating the .torrent (hashing the archive) failed.
    #[error("creating the torrent of {path}")]
    CreateTorrent {
        /// The archive.
        path: PathBuf,
        /// The builder's error.
        #[source]
        source: crate::image::error::ImageError,
    },
    /// The task hashing the archive failed (panicked).
    #[error("creating the torrent of {path}: the hashing task")]
    CreateTorrentTask {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Torrent bytes that do not parse or describe something other than one file.
    #[error("torrent of {name}")]
    BadTorrent {
        /// The image.
        name: ImageName,
        /// What is wrong.
        #[source]
        source: TorrentError,
    },
    /// The torrent cache in the state directory cannot be written.
    #[error("torrent cache {path}")]
    Cache {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The librqbit session could not start (listener, persistence folder).
    #[error("starting the seed session on {listen}")]
    Session {
        /// The listen address.
        listen: SocketAddr,
        /// librqbit's error.
        #[source]
        source: LibError,
    },
    /// Adding or checking a torrent failed.
    #[error("seeding {name}")]
    Add {
        /// The image.
        name: ImageName,
        /// librqbit's error.
        #[source]
        source: LibError,
    },
}

/// One archive the appliance serves: handed to the seed (and the tracker and the HTTP routes)
/// from outside. Today built from `[swarm] archives`; later from the image store.
#[derive(Clone, Debug)]
pub struct Served {
    /// The key clients ask for (`/torrents/<name>.torrent`).
    pub name: ImageName,
    /// The archive on disk.
    pub archive: PathBuf,
    /// The .torrent file's bytes, as served to clients.
    pub torrent: Vec<u8>,
    /// Its info-hash.
    pub info_hash: InfoHash,
    /// The archive's size in bytes.
    pub size: u64,
    /// Nodes expected to fetch it, when it is not `swarm.expected_nodes` (an update's archive:
    /// the nodes ordered to fetch it); `done` in `/api/swarm` counts against it.
    pub expected_nodes: Option<u32>,
}

/// The image name of an archive: its file name less `.tar.zst` (or the whole file name).
///
/// # Errors
/// [`SeedError::ArchivePath`] or [`SeedError::Name`].
pub fn name_of(archive: &Path) -> Result<ImageName, SeedError> {
    let file = archive.file_name().and_then(|f| f.to_str()).ok_or_else(|| SeedError::ArchivePath(archive.into()))?;
    let stem = file.strip_suffix(".tar.zst").unwrap_or(file);
    stem.parse().map_err(|source| SeedError::Name { path: archive.into(), source })
}

/// What identifies an archive's contents for the torrent cache: path, size, mtime, announce URL.
fn stamp_of(archive: &Path, meta: &std::fs::Metadata, announce: &str) -> String {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    format!("{}\n{}\n{}\n{}\n", archive.display(), meta.len(), mtime, announce)
}

/// Records the archives' stamps again once the seed runs. librqbit's storage sets the length of
/// every file it opens (`ftruncate` to the same size), which bumps the mtime: without this,
/// every start would miss the cache and hash the archive again.
///
/// # Errors
/// [`SeedError::Cache`] or [`SeedError::Archive`].
pub fn restamp(served: &[Served], announce: &str, cache_dir: &Path) -> Result<(), SeedError> {
    for s in served {
        let meta = std::fs::metadata(&s.archive).map_err(|source| SeedError::Archive { path: s.archive.clone(), source })?;
        let spath = cache_dir.join(format!("{}.stamp", s.name));
        std::fs::write(&spath, stamp_of(&s.archive, &meta, announce))
            .map_err(|source| SeedError::Cache { path: spath, source })?;
    }
    Ok(())
}

/// Makes the .torrent of an archive: `(archive, file name in the torrent, announce URL)` →
/// torrent bytes. Handed in by the caller (the appliance uses the image store's builder), so one
/// builder makes every torrent the appliance publishes. Called on a blocking thread.
pub type TorrentMaker = Arc<dyn Fn(&Path, &str, &str) -> Result<Vec<u8>, crate::image::error::ImageError> + Send + Sync>;

/// Builds [`Served`] for an archive named in the configuration: loads its .torrent from the
/// cache in `cache_dir` when the archive's size, mtime and the announce URL are unchanged,
/// otherwise hashes the archive with `make` and caches the result.
///
/// # Errors
/// [`SeedError`] for an unreadable archive, hashing or cache failures.
pub async fn prepare(archive: &Path, announce: &str, cache_dir: &Path, make: &TorrentMaker) -> Result<Served, SeedError> {
    let name = name_of(archive)?;
    let meta = std::fs::metadata(archive).map_err(|source| SeedError::Archive { path: archive.into(), source })?;
    if !meta.is_file() {
        return Err(SeedError::ArchivePath(archive.into()));
    }
    let stamp = stamp_of(archive, &meta, announce);
    let cache_err = |path: &Path| {
        let path = path.to_owned();
        move |source| SeedError::Cache { path, source }
    };
    std::fs::create_dir_all(cache_dir).map_err(cache_err(cache_dir))?;
    let tpath = cache_dir.join(format!("{name}.torrent"));
    let spath = cache_dir.join(format!("{name}.stamp"));
    if std::fs::read_to_string(&spath).ok().as_deref() == Some(stamp.as_str()) {
        if let Ok(bytes) = std::fs::read(&tpath) {
            match torrent::parse(&bytes) {
                Ok(ti) if ti.size == meta.len() => {
                    let info_hash = InfoHash(ti.info_hash);
                    info!(%name, %info_hash, "torrent loaded from cache");
                    return Ok(Served { name, archive: archive.into(), torrent: bytes, info_hash, size: ti.size, expected_nodes: None });
                }
                _ => warn!(%name, "cached torrent unusable, hashing again"),
            }
        }
    }
    let t0 = Instant::now();
    let file_name = archive
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .ok_or_else(|| SeedError::ArchivePath(archive.into()))?;
    let (make, path, ann) = (make.clone(), archive.to_owned(), announce.to_owned());
    let bytes = tokio::task::spawn_blocking(move || make(&path, &file_name, &ann))
        .await
        .map_err(|source| SeedError::CreateTorrentTask { path: archive.into(), source })?
        .map_err(|source| SeedError::CreateTorrent { path: archive.into(), source })?;
    let ti = torrent::parse(&bytes).map_err(|source| SeedError::BadTorrent { name: name.clone(), source })?;
    let info_hash = InfoHash(ti.info_hash);
    info!(%name, %info_hash, size = ti.size, elapsed_ms = t0.elapsed().as_millis() as u64, "torrent created");
    std::fs::write(&tpath, &bytes).map_err(cache_err(&tpath))?;
    std::fs::write(&spath, stamp).map_err(cache_err(&spath))?;
    Ok(Served { name, archive: archive.into(), torrent: bytes, info_hash, size: ti.size, expected_nodes: None })
}

/// How the seed runs.
#[derive(Clone, Debug)]
pub struct SeedOptions {
    /// Provisioning interface (SO_BINDTODEVICE).
    pub iface: String,
    /// Listen address (the appliance's address on the interface).
    pub listen: SocketAddrV4,
    /// Where the session keeps its persistence and fastresume files.
    pub session_dir: PathBuf,
    /// Use persisted piece bitfields on restart instead of re-hashing.
    pub fastresume: bool,
    /// Upload limit in bytes per second (None: unlimited).
    pub upload_bps: Option<NonZeroU32>,
}

/// Per-torrent figures of the seed, for `/api/swarm`.
#[derive(Clone, Debug, Serialize)]
pub struct SeedStats {
    /// librqbit's state: initializing, live, paused, error.
    pub state: String,
    /// Bytes the seed uploaded since the appliance started.
    pub uploaded_bytes: u64,
    /// Bytes verified present.
    pub have_bytes: u64,
    /// Peers connected now.
    pub live_peers: u32,
    /// Upload rate, Mbit/s.
    pub upload_mbps: f64,
    /// An error, if the torrent stopped on one.
    pub error: Option<String>,
}

/// The running seed.
pub struct Seed {
    session: Arc<Session>,
    torrents: std::sync::Mutex<Vec<(InfoHash, Arc<ManagedTorrent>)>>,
    token: CancellationToken,
}

impl Seed {
    /// Starts the session and seeds every archive of `served`; returns when all are checked
    /// and live. Torrents persisted from an earlier run that are no longer served are dropped
    /// (their files are kept).
    ///
    /// # Errors
    /// [`SeedError::Session`] or [`SeedError::Add`].
    pub async fn start(opts: &SeedOptions, served: &[Served], token: &CancellationToken) -> Result<Seed, SeedError> {
        let t0 = Instant::now();
        let listen = SocketAddr::V4(opts.listen);
        let session_err = |e: anyhow::Error| SeedError::Session { listen, source: lib(e) };
        std::fs::create_dir_all(&opts.session_dir)
            .map_err(|e| SeedError::Session { listen, source: Box::new(e) })?;
        let token = token.child_token();
        let sopts = SessionOptions {
            dht: None,
            bind_device_name: Some(opts.iface.clone()),
            disable_trackers: true,
            fastresume: opts.fastresume,
            persistence: Some(SessionPersistenceConfig::Json { folder: Some(opts.session_dir.clone()) }),
            listen: Some(ListenerOptions {
                mode: ListenerMode::TcpOnly,
                listen_addr: listen,
                enable_upnp_port_forwarding: false,
                announce_port: Some(opts.listen.port()),
                ipv4_only: true,
                ..Default::default()
            }),
            cancellation_token: Some(token.clone()),
            ratelimits: librqbit::limits::LimitsConfig { upload_bps: opts.upload_bps, download_bps: None },
            disable_local_service_discovery: true,
            ipv4_only: true,
            ..Default::default()
        };
        let default_dir = opts.session_dir.join("downloads");
        let session = Session::new_with_opts(default_dir, sopts).await.map_err(session_err)?;
        let restored = session.with_torrents(|it| it.count());
        debug!(restored, elapsed_ms = t0.elapsed().as_millis() as u64, "seed session started");

        let wanted: HashSet<[u8; 20]> = served.iter().map(|s| s.info_hash.0).collect();
        let stale: Vec<usize> =
            session.with_torrents(|it| it.filter(|(_, t)| !wanted.contains(&t.info_hash().0)).map(|(id, _)| id).collect());
        for id in stale {
            if let Err(e) = session.delete(id.into(), false).await {
                warn!(id, "dropping a torrent no longer served: {e:#}");
            }
        }

        let mut torrents = Vec::new();
        for s in served {
            torrents.push((s.info_hash, add_one(&session, s).await?));
        }
        info!(
            torrents = torrents.len(),
            restored,
            fastresume = opts.fastresume,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "seed ready"
        );
        Ok(Seed { session, torrents: std::sync::Mutex::new(torrents), token })
    }

    /// Seeds one more archive (an update published while the appliance runs); returns when it
    /// is checked and live. An archive already seeded is not added twice.
    ///
    /// # Errors
    /// [`SeedError::Add`], [`SeedError::ArchivePath`].
    pub async fn add(&self, s: &Served) -> Result<(), SeedError> {
        if self.torrents.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|(i, _)| *i == s.info_hash) {
            return Ok(());
        }
        let handle = add_one(&self.session, s).await?;
        let mut t = self.torrents.lock().unwrap_or_else(|e| e.into_inner());
        if !t.iter().any(|(i, _)| *i == s.info_hash) {
            t.push((s.info_hash, handle));
        }
        Ok(())
    }

    /// Current figures of one torrent.
    pub fn stats(&self, ih: &InfoHash) -> Option<SeedStats> {
        let h = self.torrents.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(i, _)| i == ih)?.1.clone();
        let st = h.stats();
        let live = st.live.as_ref();
        Some(SeedStats {
            state: st.state.to_string(),
            uploaded_bytes: st.uploaded_bytes,
            have_bytes: st.progress_bytes,
            live_peers: live.map_or(0, |l| l.snapshot.peer_stats.live),
            upload_mbps: live.map_or(0.0, |l| l.upload_speed.mbps),
            error: st.error,
        })
    }

    /// Stops the session (pauses torrents so fastresume state is flushed).
    pub async fn stop(&self) {
        self.session.stop().await;
        self.token.cancel();
    }
}

/// Adds one archive to the session and waits until librqbit has checked it whole.
async fn add_one(session: &Arc<Session>, s: &Served) -> Result<Arc<ManagedTorrent>, SeedError> {
    let add_err = |e: anyhow::Error| SeedError::Add { name: s.name.clone(), source: lib(e) };
    let dir = s.archive.parent().and_then(|p| p.to_str()).ok_or_else(|| SeedError::ArchivePath(s.archive.clone()))?;
    let aopts = AddTorrentOptions { overwrite: true, output_folder: Some(dir.to_owned()), ..Default::default() };
    let resp = session.add_torrent(AddTorrent::from_bytes(s.torrent.clone()), Some(aopts)).await.map_err(add_err)?;
    let handle =
        resp.into_handle().ok_or_else(|| SeedError::Add { name: s.name.clone(), source: "list-only response".into() })?;
    handle.wait_until_initialized().await.map_err(add_err)?;
    let st = handle.stats();
    if st.progress_bytes != st.total_bytes {
        return Err(SeedError::Add {
            name: s.name.clone(),
            source: format!("archive fails its own piece hashes ({} of {} bytes good)", st.progress_bytes, st.total_bytes).into(),
        });
    }
    info!(name = %s.name, info_hash = %s.info_hash, size = s.size, "seeding");
    Ok(handle)
}

/// The appliance seed as a tracker announce (refreshed by the caller every interval so the
/// tracker does not time it out).
pub fn seed_announce(ih: InfoHash, addr: SocketAddrV4) -> Announce {
    Announce { info_hash: ih, peer_id: *SEED_PEER_ID, addr, uploaded: 0, downloaded: 0, left: 0, event: Event::None, numwant: 0 }
}

/// The peer id under which the tracker lists the appliance's own seed.
pub const SEED_PEER_ID: &[u8; 20] = b"-SI0001-appliance-00";

#[cfg(test)]
mod tests {
    use super::*;

    /// A single-file torrent with `name` (test fixture; hostile names included).
    fn torrent_named(name: &[u8]) -> Vec<u8> {
        #[derive(Serialize)]
        struct Info<'a> {
            length: u64,
            #[serde(with = "serde_bytes")]
            name: &'a [u8],
            #[serde(rename = "piece length")]
            piece_length: u64,
            #[serde(with = "serde_bytes")]
            pieces: &'a [u8],
        }
        #[derive(Serialize)]
        struct Meta<'a> {
            info: Info<'a>,
        }
        let info = Info { length: 10, name, piece_length: 16384, pieces: &[1u8; 20] };
        serde_bencode::to_bytes(&Meta { info }).unwrap()
    }

    #[test]
    fn torrent_names_must_be_plain_file_names() {
        assert!(torrent::parse(&torrent_named(b"a.tar.zst")).is_ok());
        for bad in [&b"../x"[..], b"a/b", b"/abs", b".."] {
            assert!(torrent::parse(&torrent_named(bad)).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(torrent::parse(b"garbage").is_err());
    }

    /// The engine's parser (serde_bencode, `image::torrent::parse`) and the seed's librqbit
    /// agree on the info-hash: of the appliance's own torrents, and of one whose info dictionary
    /// has keys neither reads, in the file's order.
    #[test]
    fn the_engine_and_librqbit_agree_on_info_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("img.tar.zst");
        std::fs::write(&f, vec![9u8; 700_000]).unwrap();
        let ours = crate::image::torrent::make(&f, "img.tar.zst", "http://10.0.0.1:80/announce").unwrap().bytes;
        let info = [&b"d6:lengthi5e4:name1:x12:piece lengthi16384e6:pieces20:"[..], &[7; 20], b"7:privatei1e3:zzzli1ei2eee"].concat();
        let odd = [&b"d8:announce3:abc4:info"[..], &info, b"7:comment2:hie"].concat();
        for t in [ours, odd, torrent_named(b"a.tar.zst")] {
            let lib = librqbit::torrent_from_bytes(&t).unwrap();
            assert_eq!(torrent::parse(&t).unwrap().info_hash, lib.info_hash.0);
        }
    }

    #[test]
    fn names_come_from_archive_file_names() {
        assert_eq!(name_of(Path::new("/srv/rhel5.tar.zst")).unwrap().as_str(), "rhel5");
        assert_eq!(name_of(Path::new("/srv/blob.bin")).unwrap().as_str(), "blob.bin");
        assert!(name_of(Path::new("/srv/.hidden.tar.zst")).is_err());
    }

    #[tokio::test]
    async fn prepared_torrents_are_cached_until_the_archive_changes() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("img.tar.zst");
        std::fs::write(&archive, vec![5u8; 3 << 20]).unwrap();
        let cache = dir.path().join("cache");
        // The appliance's builder (app.rs hands the image store's in the same way).
        let make: TorrentMaker = Arc::new(|p: &Path, name: &str, ann: &str| {
            crate::image::torrent::make(p, name, ann).map(|t| t.bytes)
        });
        let a = prepare(&archive, "http://10.0.0.1:80/announce", &cache, &make).await.unwrap();
        assert_eq!((a.name.as_str(), a.size), ("img", 3 << 20));
        let b = prepare(&archive, "http://10.0.0.1:80/announce", &cache, &make).await.unwrap();
        assert_eq!(a.torrent, b.torrent);
        std::fs::write(&archive, vec![6u8; 3 << 20]).unwrap();
        let c = prepare(&archive, "http://10.0.0.1:80/announce", &cache, &make).await.unwrap();
        assert_ne!(a.info_hash, c.info_hash);
        let d = prepare(&archive, "http://10.0.0.2:80/announce", &cache, &make).await.unwrap();
        assert_ne!(c.torrent, d.torrent);
    }
}
