//! The installer's checks that the image is the one its appliance signed, before anything is
//! written and after the tree is unpacked:
//! 1. the plan's seal verifies with the public key baked into the initramfs
//!    (`/etc/si-appliance/image-signing.pub`, put there by the appliance that served the initrd);
//! 2. the seal's info-hash and manifest digest equal the ones on the kernel command line
//!    (`si.infohash=`, `si.manifest=`), which came with the boot script;
//! 3. the manifest fetched from the appliance hashes to the sealed digest;
//! 4. the .torrent's info-hash is the sealed one (the swarm's piece hashes then pin every byte);
//! 5. after unpacking, the tree on the target disk matches the manifest entry for entry
//!    ([`verify_tree`]), before the boot loader makes the disk bootable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::image::manifest::{Entry, Manifest};
use crate::image::scan::{self, ScanOptions};
use crate::image::sign::{self, SignError, Statement};
use crate::types::node_api::{DiskLayout, FsKind, NodePlan};

/// Why an image is refused.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// No trusted key in the initramfs (and unsigned images are not allowed).
    #[error("no trusted image key at {path} ({why}): refusing to install an image nobody vouches for (--allow-unsigned to override)")]
    NoKey {
        /// Where it was looked for.
        path: PathBuf,
        /// Why it could not be used.
        why: String,
    },
    /// The plan carries no seal but a key is trusted.
    #[error("the appliance's plan for image {0} carries no signature")]
    Unsealed(String),
    /// The signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignError),
    /// The seal names another image than the command line pinned.
    #[error("{what} of image {image}: the appliance offers {offered}, the boot command line pinned {pinned}")]
    Pinned {
        /// `info-hash` or `manifest digest`.
        what: &'static str,
        /// The image.
        image: String,
        /// From the plan.
        offered: String,
        /// From the command line.
        pinned: String,
    },
    /// The manifest could not be fetched.
    #[error("fetching the manifest of {image}")]
    Fetch {
        /// The image.
        image: String,
        /// The HTTP client's error (its message holds the status or the I/O cause).
        #[source]
        source: Box<crate::net::http_client::HttpError>,
    },
    /// The manifest does not hash to the sealed digest.
    #[error("the manifest of {image} hashes to {got}, the seal says {want}")]
    ManifestDigest {
        /// The image.
        image: String,
        /// Sealed.
        want: String,
        /// Computed.
        got: String,
    },
    /// The manifest does not parse.
    #[error("manifest of {image}")]
    Manifest {
        /// The image.
        image: String,
        /// The cause.
        #[source]
        source: crate::image::ImageError,
    },
    /// The unpacked tree differs from the manifest.
    #[error("the unpacked tree differs from the image's manifest in {count} entries, first: {first}")]
    TreeDiffers {
        /// How many differences.
        count: usize,
        /// The first few, `; `-separated.
        first: String,
    },
    /// The tree could not be scanned.
    #[error("verifying the unpacked tree")]
    Scan(#[source] crate::image::ImageError),
}

/// What the install may trust once the checks before writing passed.
#[derive(Clone, Debug, Default)]
pub struct Trusted {
    /// The info-hash the .torrent must have.
    pub info_hash: Option<[u8; 20]>,
    /// The manifest the unpacked tree must match.
    pub manifest: Option<Manifest>,
}

/// Reads the trusted public key; `Ok(None)` when it is missing and `allow_unsigned`.
///
/// # Errors
/// [`SealError::NoKey`].
pub fn trusted_key(path: &Path, allow_unsigned: bool) -> Result<Option<[u8; 32]>, SealError> {
    let no = |why: String| SealError::NoKey { path: path.to_owned(), why };
    match std::fs::read_to_string(path) {
        Ok(t) => sign::parse_public(&t).map(Some).map_err(|e| no(e.to_string())),
        Err(e) if allow_unsigned => {
            warn!(path = %path.display(), "no trusted image key ({e}); --allow-unsigned: the image's signature is NOT checked");
            Ok(None)
        }
        Err(e) => Err(no(e.to_string())),
    }
}

/// Checks 1 and 2 (pure): the seal against the key and the command line's pins. Returns the
/// info-hash and manifest digest to hold the download to.
///
/// # Errors
/// [`SealError`].
pub fn check_plan(
    plan: &NodePlan,
    key: Option<&[u8; 32]>,
    pinned_info_hash: Option<&str>,
    pinned_manifest: Option<&str>,
) -> Result<(Option<String>, Option<String>), SealError> {
    let image = plan.image.to_string();
    let (info_hash, manifest) = match (&plan.seal, key) {
        (Some(seal), Some(key)) => {
            let st = Statement { image: &image, info_hash: &seal.info_hash, manifest: seal.manifest_sha256.as_deref() };
            sign::verify(key, &st, &seal.signature)?;
            (Some(seal.info_hash.to_ascii_lowercase()), seal.manifest_sha256.as_ref().map(|m| m.to_ascii_lowercase()))
        }
        (None, Some(_)) => return Err(SealError::Unsealed(image)),
        // Unsigned allowed: the pins still hold the download, when the command line has them.
        (seal, None) => (
            seal.as_ref().map(|s| s.info_hash.to_ascii_lowercase()).or(pinned_info_hash.map(str::to_owned)),
            seal.as_ref().and_then(|s| s.manifest_sha256.as_ref().map(|m| m.to_ascii_lowercase())).or(pinned_manifest.map(str::to_owned)),
        ),
    };
    for (what, offered, pinned) in [("info-hash", &info_hash, pinned_info_hash), ("manifest digest", &manifest, pinned_manifest)] {
        if let Some(p) = pinned {
            if offered.as_deref() != Some(p) {
                return Err(SealError::Pinned {
                    what,
                    image: image.clone(),
                    offered: offered.clone().unwrap_or_else(|| "none".into()),
                    pinned: p.to_owned(),
                });
            }
        }
    }
    Ok((info_hash, manifest))
}

/// Check 3: the fetched manifest's bytes against the sealed digest, then parsed.
///
/// # Errors
/// [`SealError::ManifestDigest`] or [`SealError::Manifest`].
pub fn check_manifest(image: &str, bytes: &[u8], want: &str) -> Result<Manifest, SealError> {
    use sha2::Digest as _;
    let got = hex::encode(sha2::Sha256::digest(bytes));
    if got != want {
        return Err(SealError::ManifestDigest { image: image.to_owned(), want: want.to_owned(), got });
    }
    Manifest::parse(bytes, Path::new("manifest")).map_err(|source| SealError::Manifest { image: image.to_owned(), source })
}

/// The info-hash text as bytes.
pub fn info_hash_bytes(hex_text: &str) -> Option<[u8; 20]> {
    let mut out = [0u8; 20];
    hex::decode_to_slice(hex_text, &mut out).ok().map(|()| out)
}

/// Check 5: scans the tree under `root` (with the layout's other file systems mounted) and
/// compares it with `manifest`. What the installer itself put there is left out: its store
/// directory (`store`, relative to the root) and the `lost+found` that mkfs makes at the root of
/// each file system the image does not have. Under a FAT mount point only type, size and
/// content are compared (FAT holds no owners, modes or links). With `ignore_xattrs` (the target
/// file system refused some of the image's xattrs, already logged) xattrs are not compared.
///
/// # Errors
/// [`SealError::TreeDiffers`] with the count and the first differences, or [`SealError::Scan`].
pub fn verify_tree(root: &Path, manifest: &Manifest, layout: &DiskLayout, store: &str, ignore_xattrs: bool) -> Result<(), SealError> {
    let nodes = scan::scan(root, &ScanOptions { cross_file_systems: true }).map_err(SealError::Scan)?;
    let digests = crate::image::pack::digests_for(root, &nodes, &Default::default(), true).map_err(SealError::Scan)?.unwrap_or_default();
    let actual = crate::image::pack::manifest_of(&nodes, &digests, manifest.header.clone());
    let mounts: Vec<(String, FsKind)> = layout
        .partitions
        .iter()
        .filter_map(|p| Some((p.mount.as_deref()?.trim_matches('/').to_owned(), p.fs)))
        .collect();
    let in_image: std::collections::HashSet<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
    let under = |path: &str, dir: &str| {
        if dir.is_empty() { true } else { path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/')) }
    };
    // A mount point the image lacks (and its missing parents) was made by the installer to
    // mount the partition on.
    let made_dirs: std::collections::HashSet<String> = mounts
        .iter()
        .filter(|(m, _)| !m.is_empty())
        .flat_map(|(m, _)| {
            let parts: Vec<&str> = m.split('/').collect();
            (1..=parts.len()).map(move |k| parts[..k].join("/"))
        })
        .filter(|d| !in_image.contains(d.as_str()))
        .collect();
    let installer_made = |path: &str| {
        under(path, store)
            || made_dirs.contains(path)
            || mounts.iter().any(|(m, _)| {
                let lf = if m.is_empty() { "lost+found".to_owned() } else { format!("{m}/lost+found") };
                under(path, &lf) && !in_image.contains(lf.as_str())
            })
    };
    let on_fat = |path: &str| mounts.iter().any(|(m, fs)| *fs == FsKind::Vfat && !m.is_empty() && under(path, m));
    let project = |e: &Entry| -> Entry {
        let mut e = e.clone();
        if on_fat(&e.path) {
            e.mode = String::new();
            e.uid = 0;
            e.gid = 0;
            e.mtime = 0;
            e.mtime_ns = 0;
            e.xattrs = BTreeMap::new();
        } else if ignore_xattrs {
            e.xattrs = BTreeMap::new();
        }
        e
    };
    let want = Manifest { header: manifest.header.clone(), entries: manifest.entries.iter().map(project).collect() };
    let have = Manifest {
        header: actual.header.clone(),
        entries: actual.entries.iter().filter(|e| !installer_made(&e.path)).map(project).collect(),
    };
    let diffs = want.differences(&have);
    if !diffs.is_empty() {
        return Err(SealError::TreeDiffers { count: diffs.len(), first: diffs.iter().take(3).cloned().collect::<Vec<_>>().join("; ") });
    }
    info!(entries = want.entries.len(), files = digests.len(), "the unpacked tree matches the image's manifest");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::sign::SigningKey;
    use crate::types::node_api::ImageSeal;

    fn plan(seal: Option<ImageSeal>) -> NodePlan {
        NodePlan {
            hostname: "n1".into(),
            image: "deb12".parse().unwrap(),
            torrent: "/torrents/deb12.torrent".into(),
            archive_size: 1,
            unpacked_size: 0,
            disk: None,
            layout: DiskLayout::default_bios(),
            finish: Default::default(),
            seed_for_secs: 0,
            report_every_secs: 2,
            boot_peer_port: None,
            seal,
            profile: None,
        }
    }

    fn sealed(key: &SigningKey, ih: &str, m: Option<&str>) -> ImageSeal {
        let signature = key.sign(&Statement { image: "deb12", info_hash: ih, manifest: m });
        ImageSeal { info_hash: ih.into(), manifest_sha256: m.map(Into::into), signature }
    }

    #[test]
    fn seals_pins_and_keys_decide_together() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ours, theirs) = (SigningKey::load_or_create(d1.path()).unwrap(), SigningKey::load_or_create(d2.path()).unwrap());
        let (ih, ih2, m) = ("aa".repeat(20), "bb".repeat(20), "cc".repeat(32));
        let key = ours.public();
        // Ours, matching the pins: the hashes to hold the download to.
        let ok = check_plan(&plan(Some(sealed(&ours, &ih, Some(&m)))), Some(&key), Some(&ih), Some(&m)).unwrap();
        assert_eq!(ok, (Some(ih.clone()), Some(m.clone())));
        // No pins on the line (pxelinux default): the signature alone.
        assert!(check_plan(&plan(Some(sealed(&ours, &ih, Some(&m)))), Some(&key), None, None).is_ok());
        // Another appliance's key: refused whatever the pins say.
        let e = check_plan(&plan(Some(sealed(&theirs, &ih, Some(&m)))), Some(&key), None, None).unwrap_err();
        assert!(matches!(e, SealError::Signature(SignError::Forged { .. })), "{e}");
        // A seal whose fields were edited after signing.
        let mut edited = sealed(&ours, &ih, Some(&m));
        edited.info_hash = ih2.clone();
        assert!(matches!(check_plan(&plan(Some(edited)), Some(&key), None, None), Err(SealError::Signature(_))));
        // Ours, but not what the boot line pinned (the image changed after the node booted).
        let e = check_plan(&plan(Some(sealed(&ours, &ih2, Some(&m)))), Some(&key), Some(&ih), Some(&m)).unwrap_err();
        assert!(matches!(e, SealError::Pinned { what: "info-hash", .. }), "{e}");
        let e = check_plan(&plan(Some(sealed(&ours, &ih, None))), Some(&key), Some(&ih), Some(&m)).unwrap_err();
        assert!(matches!(e, SealError::Pinned { what: "manifest digest", .. }), "{e}");
        // No seal while a key is trusted.
        assert!(matches!(check_plan(&plan(None), Some(&key), None, None), Err(SealError::Unsealed(_))));
        // Unsigned allowed (no key): the line's pins still hold.
        assert_eq!(check_plan(&plan(None), None, Some(&ih), None).unwrap(), (Some(ih.clone()), None));
        assert!(check_plan(&plan(Some(sealed(&theirs, &ih2, None))), None, Some(&ih), None).is_err());
    }

    #[test]
    fn a_missing_key_is_refused_unless_unsigned_is_allowed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("none.pub");
        assert!(matches!(trusted_key(&p, false), Err(SealError::NoKey { .. })));
        assert_eq!(trusted_key(&p, true).unwrap(), None);
        std::fs::write(&p, "not hex\n").unwrap();
        assert!(matches!(trusted_key(&p, true), Err(SealError::NoKey { .. })), "a damaged key is never skipped");
    }

    #[test]
    fn a_manifest_must_hash_to_the_sealed_digest() {
        let text = b"{\"si_appliance_manifest\":1,\"kind\":\"full\",\"zstd_level\":3}\n";
        use sha2::Digest as _;
        let want = hex::encode(sha2::Sha256::digest(text));
        assert!(check_manifest("deb12", text, &want).is_ok());
        let mut other = text.to_vec();
        let n = other.len();
        other[n - 3] = b'4';
        assert!(matches!(check_manifest("deb12", &other, &want), Err(SealError::ManifestDigest { .. })));
    }

    #[test]
    fn the_tree_check_sees_a_changed_file_and_ignores_what_the_installer_made() {
        use crate::image::manifest::Header;
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/motd"), "hello\n").unwrap();
        std::os::unix::fs::symlink("motd", root.join("etc/motd.link")).unwrap();
        let nodes = scan::scan(root, &ScanOptions::default()).unwrap();
        let digests = crate::image::pack::digests_for(root, &nodes, &Default::default(), true).unwrap().unwrap_or_default();
        let header = Header { si_appliance_manifest: 1, kind: "full".into(), zstd_level: None, base_manifest_sha256: None, deletions: vec![] };
        let m = crate::image::pack::manifest_of(&nodes, &digests, header);
        let layout = DiskLayout::default_bios();
        let mtime = std::fs::symlink_metadata(root).unwrap();
        let keep = filetime::FileTime::from_last_modification_time(&mtime);
        std::fs::create_dir_all(root.join(".si-appliance")).unwrap();
        std::fs::write(root.join(".si-appliance/demo.tar.zst"), "archive").unwrap();
        std::fs::create_dir_all(root.join("lost+found")).unwrap();
        filetime::set_file_mtime(root, keep).unwrap();
        verify_tree(root, &m, &layout, ".si-appliance", false).unwrap();
        // UEFI: the installer made boot/efi (not in the image) to mount the ESP on.
        std::fs::create_dir_all(root.join("boot/efi/EFI")).unwrap();
        filetime::set_file_mtime(root, keep).unwrap();
        let uefi = DiskLayout::default_uefi();
        let e = verify_tree(root, &m, &uefi, ".si-appliance", false).unwrap_err();
        assert!(e.to_string().contains("boot/efi/EFI: unexpected"), "only what the mount point holds counts: {e}");
        std::fs::remove_dir(root.join("boot/efi/EFI")).unwrap();
        verify_tree(root, &m, &uefi, ".si-appliance", false).unwrap();
        std::fs::remove_dir_all(root.join("boot")).unwrap();
        filetime::set_file_mtime(root, keep).unwrap();
        // Same size, other content: found.
        let t = filetime::FileTime::from_last_modification_time(&std::fs::metadata(root.join("etc/motd")).unwrap());
        std::fs::write(root.join("etc/motd"), "HELLO\n").unwrap();
        filetime::set_file_mtime(root.join("etc/motd"), t).unwrap();
        let e = verify_tree(root, &m, &layout, ".si-appliance", false).unwrap_err();
        assert!(matches!(&e, SealError::TreeDiffers { count: 1, first } if first.starts_with("etc/motd:")), "{e}");
        // An extra file the image does not have: found too.
        std::fs::write(root.join("etc/motd"), "hello\n").unwrap();
        filetime::set_file_mtime(root.join("etc/motd"), t).unwrap();
        std::fs::write(root.join("etc/extra"), "x").unwrap();
        let e = verify_tree(root, &m, &layout, ".si-appliance", false).unwrap_err();
        assert!(e.to_string().contains("etc/extra: unexpected"), "{e}");
    }
}
