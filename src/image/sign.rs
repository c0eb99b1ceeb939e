//! Signed images: what the appliance vouches for, and the check the installer makes.
//!
//! The appliance holds an Ed25519 key in its state directory (`image-signing.key`, the 32-byte
//! seed, mode 0600, made on the first start and kept) and signs, for every image it serves, one
//! [`Statement`]: the image's name, the info-hash of its torrent (which pins every byte of the
//! archive through the piece hashes) and the SHA-256 of its manifest (which pins the unpacked
//! tree). The public key goes into the initramfs the appliance serves (a small cpio archive
//! appended to the configured initrd, see [`key_cpio`]), so a node that PXE-booted from this
//! appliance refuses an image that another appliance, or anybody between the two, offers.
//!
//! Pure apart from [`SigningKey::load_or_create`].

use std::io::Write as _;
use std::path::{Path, PathBuf};

use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// The seed file in the state directory.
pub const KEY_FILE: &str = "image-signing.key";
/// The public key (hex) next to it, for operators and tests.
pub const PUB_FILE: &str = "image-signing.pub";
/// Where the public key is inside the nodes' initramfs.
pub const INITRAMFS_PUB: &str = "etc/si-appliance/image-signing.pub";

/// Errors of signing and checking.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key file cannot be read or written.
    #[error("image signing key {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file holds something that is not a key.
    #[error("image signing key {path}: {why}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A public key or signature is not well-formed hex of the right length.
    #[error("{what}: want {len} hex digits")]
    Malformed {
        /// The public key or the signature.
        what: &'static str,
        /// Digits expected.
        len: usize,
    },
    /// The signature does not verify: the image was not signed by the trusted key.
    #[error("the signature of image {image} does not verify with the trusted key {key_id}: not the image this appliance signed")]
    Forged {
        /// The image.
        image: String,
        /// The first 16 digits of the trusted key.
        key_id: String,
    },
}

/// What the appliance vouches for about one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement<'a> {
    /// The image name.
    pub image: &'a str,
    /// The torrent's info-hash, 40 lowercase hex digits.
    pub info_hash: &'a str,
    /// The manifest's SHA-256 (64 hex digits); `None` for an archive served without a manifest.
    pub manifest: Option<&'a str>,
}

impl Statement<'_> {
    /// The signed bytes: a versioned, line-based text that no two statements share.
    pub fn to_bytes(&self) -> Vec<u8> {
        format!(
            "si-appliance image statement v1\nimage {}\ninfo-hash {}\nmanifest-sha256 {}\n",
            self.image,
            self.info_hash.to_ascii_lowercase(),
            self.manifest.map(str::to_ascii_lowercase).unwrap_or_else(|| "none".into())
        )
        .into_bytes()
    }
}

/// The appliance's signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("public", &self.public_hex()).finish()
    }
}

impl SigningKey {
    /// From a 32-byte seed.
    ///
    /// # Errors
    /// [`SignError::BadKey`] when the seed is rejected.
    pub fn from_seed(seed: &[u8; 32], origin: &Path) -> Result<SigningKey, SignError> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map(|pair| SigningKey { pair })
            .map_err(|e| SignError::BadKey { path: origin.to_owned(), why: e.to_string() })
    }

    /// Loads `<state_dir>/image-signing.key`, or makes it (mode 0600, written to a temporary name
    /// and renamed) on the first start; (re)writes `image-signing.pub` (hex) beside it.
    ///
    /// # Errors
    /// [`SignError::Io`] or [`SignError::BadKey`] (a key file of the wrong size is never replaced:
    /// images signed with it would stop verifying).
    pub fn load_or_create(state_dir: &Path) -> Result<SigningKey, SignError> {
        let path = state_dir.join(KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SignError::Io { path, source }
        };
        let key = match std::fs::read(&path) {
            Ok(b) => {
                let seed: [u8; 32] = b.as_slice().try_into().map_err(|_| SignError::BadKey {
                    path: path.clone(),
                    why: format!("{} bytes, want a 32-byte Ed25519 seed", b.len()),
                })?;
                SigningKey::from_seed(&seed, &path)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
                let seed: [u8; 32] = rand::random();
                let key = SigningKey::from_seed(&seed, &path)?;
                crate::private_file::write(&path, &seed).map_err(|(path, source)| SignError::Io { path, source })?;
                key
            }
            Err(e) => return Err(SignError::Io { path, source: e }),
        };
        let pub_path = state_dir.join(PUB_FILE);
        std::fs::write(&pub_path, format!("{}\n", key.public_hex())).map_err(io(&pub_path))?;
        Ok(key)
    }

    /// The public key, 64 hex digits.
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// The public key's raw 32 bytes.
    pub fn public(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// Signs a statement: 128 hex digits.
    pub fn sign(&self, s: &Statement<'_>) -> String {
        hex::encode(self.pair.sign(&s.to_bytes()).as_ref())
    }
}

/// A public key from its hex text (surrounding white space ignored).
///
/// # Errors
/// [`SignError::Malformed`].
pub fn parse_public(text: &str) -> Result<[u8; 32], SignError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|_| SignError::Malformed { what: "public key", len: 64 })?;
    Ok(out)
}

/// Checks `signature` (hex) over `s` with the trusted `public` key.
///
/// # Errors
/// [`SignError::Malformed`] for a signature that is not 128 hex digits, [`SignError::Forged`]
/// when it does not verify.
pub fn verify(public: &[u8; 32], s: &Statement<'_>, signature_hex: &str) -> Result<(), SignError> {
    let mut sig = [0u8; 64];
    hex::decode_to_slice(signature_hex.trim(), &mut sig).map_err(|_| SignError::Malformed { what: "signature", len: 128 })?;
    UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(&s.to_bytes(), &sig)
        .map_err(|_| SignError::Forged { image: s.image.to_owned(), key_id: hex::encode(&public[..8]) })
}

/// A `newc` cpio archive holding [`INITRAMFS_PUB`] (the public key in hex, mode 0444, with its
/// directories): appended to an initrd (after zero padding to a multiple of 4 bytes), the kernel
/// unpacks it over the first archive, as it does any concatenation of cpio archives.
pub fn key_cpio(public_hex: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let body = format!("{public_hex}\n");
    let mut ino = 0x5100_0000u32;
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        ino += 1;
        // c_magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize (with the NUL), check: 13 fields of 8 hex digits after the magic.
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let fields = [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    entry(&mut out, "etc", 0o040755, b"");
    entry(&mut out, "etc/si-appliance", 0o040755, b"");
    entry(&mut out, INITRAMFS_PUB, 0o100444, body.as_bytes());
    entry(&mut out, "TRAILER!!!", 0, b"");
    // The kernel reads archives in 512-byte blocks' worth of padding happily; round up like cpio.
    while out.len() % 512 != 0 {
        out.push(0);
    }
    out
}

/// Writes `<dest>` = the initrd at `base`, zero padding to a multiple of 4 bytes, then
/// [`key_cpio`]; to a temporary name, then renamed.
///
/// # Errors
/// I/O errors, naming the file.
pub fn write_initrd_with_key(base: &Path, dest: &Path, public_hex: &str) -> Result<u64, SignError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SignError::Io { path, source }
    };
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = dest.with_extension("tmp");
    let mut src = std::fs::File::open(base).map_err(io(base))?;
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let n = std::io::copy(&mut src, &mut out).map_err(io(base))?;
    let pad = (4 - n % 4) % 4;
    out.write_all(&vec![0u8; pad as usize]).map_err(io(&tmp))?;
    let cpio = key_cpio(public_hex);
    out.write_all(&cpio).map_err(io(&tmp))?;
    out.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(n + pad + cpio.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st<'a>(ih: &'a str, m: Option<&'a str>) -> Statement<'a> {
        Statement { image: "deb12", info_hash: ih, manifest: m }
    }

    #[test]
    fn a_signature_verifies_only_for_its_statement_and_key() {
        let d = tempfile::tempdir().unwrap();
        let k = SigningKey::load_or_create(d.path()).unwrap();
        let again = SigningKey::load_or_create(d.path()).unwrap();
        assert_eq!(k.public_hex(), again.public_hex(), "the key is kept");
        let pubtext = std::fs::read_to_string(d.path().join(PUB_FILE)).unwrap();
        let public = parse_public(&pubtext).unwrap();
        let ih = "aa".repeat(20);
        let m = "bb".repeat(32);
        let sig = k.sign(&st(&ih, Some(&m)));
        verify(&public, &st(&ih, Some(&m)), &sig).unwrap();
        // Another info-hash, manifest, image name or key: refused.
        let other_ih = "ab".repeat(20);
        assert!(matches!(verify(&public, &st(&other_ih, Some(&m)), &sig), Err(SignError::Forged { .. })));
        assert!(matches!(verify(&public, &st(&ih, None), &sig), Err(SignError::Forged { .. })));
        let renamed = Statement { image: "deb13", ..st(&ih, Some(&m)) };
        assert!(verify(&public, &renamed, &sig).is_err());
        let d2 = tempfile::tempdir().unwrap();
        let k2 = SigningKey::load_or_create(d2.path()).unwrap();
        assert!(matches!(verify(&k2.public(), &st(&ih, Some(&m)), &sig), Err(SignError::Forged { .. })));
        assert!(matches!(verify(&public, &st(&ih, Some(&m)), "zz"), Err(SignError::Malformed { .. })));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(d.path().join(KEY_FILE)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_key_file_is_refused_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(KEY_FILE), b"short").unwrap();
        assert!(matches!(SigningKey::load_or_create(d.path()), Err(SignError::BadKey { .. })));
        assert_eq!(std::fs::read(d.path().join(KEY_FILE)).unwrap(), b"short");
    }

    #[test]
    fn the_key_archive_is_a_newc_cpio_that_cpio_lists() {
        let cpio = key_cpio(&"cd".repeat(32));
        assert_eq!(cpio.len() % 512, 0);
        assert!(cpio.starts_with(b"070701"));
        // Read it back with the same rules the kernel uses: header, name, pad, data, pad.
        let mut at = 0;
        let mut names = Vec::new();
        loop {
            let h = &cpio[at..at + 110];
            assert_eq!(&h[..6], b"070701");
            let field = |i: usize| u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap() as usize;
            let (size, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&cpio[at + 110..at + 110 + namesize - 1]).unwrap().to_owned();
            at = (at + 110 + namesize).div_ceil(4) * 4;
            let data = &cpio[at..at + size];
            at = (at + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                break;
            }
            if name == INITRAMFS_PUB {
                assert_eq!(data, format!("{}\n", "cd".repeat(32)).as_bytes());
            }
            names.push(name);
        }
        assert_eq!(names, ["etc", "etc/si-appliance", INITRAMFS_PUB]);
    }
}
