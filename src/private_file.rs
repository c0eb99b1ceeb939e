//! Secrets in the state directory (node-token secret, admin token, image-signing key): written
//! whole to a temporary name with mode 0600, synced, then renamed over the old name, so a crash
//! never leaves a half-written secret and nobody else can read it at any moment.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` as described in the module docs.
///
/// # Errors
/// The failing step's error and the file it concerned (the temporary one or `path`).
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), (PathBuf, std::io::Error)> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let at = |p: &Path| {
        let p = p.to_owned();
        move |e| (p, e)
    };
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(at(&tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(at(path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_secret_is_written_whole_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        super::write(&p, b"one").unwrap();
        super::write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!d.path().join("secret.tmp").exists());
        let e = super::write(&d.path().join("missing/secret"), b"x").unwrap_err();
        assert!(e.0.ends_with("missing/secret.tmp"));
    }
}
