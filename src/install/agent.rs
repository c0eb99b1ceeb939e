//! What the installer leaves on the node for updates over the swarm (issue 17): the installed
//! record (`var/lib/si-appliance/installed.manifest` + `installed.json`, via
//! [`crate::update::record_installed`]), the node's credentials (`var/lib/si-appliance/node.json`,
//! mode 0600: appliance address, MAC, token), and the update agent: this very binary copied to
//! `/usr/local/sbin/si-appliance` and a systemd unit running `si-appliance update --watch`,
//! enabled by its `multi-user.target.wants` symlink. The agent is only installed in an image
//! that has systemd (anything else gets a log line saying so; `si-appliance update --server`
//! still works by hand there).
//!
//! Owns: the files above, written temp + rename. Must not: touch anything else in the root.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::image::manifest::Manifest;
use crate::types::node_api::NodeCredentials;

/// Where the agent's binary goes, relative to the root.
pub const AGENT_BIN: &str = "usr/local/sbin/si-appliance";
/// The agent's unit, relative to the root.
pub const AGENT_UNIT: &str = "etc/systemd/system/si-appliance-update.service";
/// The unit's enablement link, relative to the root.
pub const AGENT_WANTS: &str = "etc/systemd/system/multi-user.target.wants/si-appliance-update.service";

/// The unit file's text.
pub const UNIT_TEXT: &str = "\
# Written by the si-appliance installer: the update agent asks the appliance for updates
# (si-appliance update --watch) and applies them over the swarm when an operator orders one.
[Unit]
Description=si-appliance update agent (updates over the swarm)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=/usr/local/sbin/si-appliance update --watch
Restart=on-failure
RestartSec=30s

[Install]
WantedBy=multi-user.target
";

/// Errors writing the node's update state.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A file could not be written.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The installed record could not be written.
    #[error("the installed record")]
    Record(#[source] Box<crate::update::UpdateError>),
    /// The credentials file.
    #[error(transparent)]
    Credentials(Box<crate::update::client::ClientError>),
}

impl From<crate::update::UpdateError> for AgentError {
    fn from(e: crate::update::UpdateError) -> AgentError {
        AgentError::Record(Box::new(e))
    }
}

impl From<crate::update::client::ClientError> for AgentError {
    fn from(e: crate::update::client::ClientError) -> AgentError {
        AgentError::Credentials(Box::new(e))
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AgentError + 'a {
    move |source| AgentError::Io { op, path: path.to_owned(), source }
}

/// What was written, for the log and the tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The installed record was written (there was a manifest).
    pub record: bool,
    /// The agent (binary + unit) was installed (the image has systemd).
    pub agent: bool,
}

/// Whether the image under `root` runs systemd.
pub fn has_systemd(root: &Path) -> bool {
    ["lib/systemd/systemd", "usr/lib/systemd/systemd", "bin/systemctl", "usr/bin/systemctl"]
        .iter()
        .any(|p| root.join(p).exists())
}

/// Writes the record (when the image has a manifest), `node.json`, and the agent (binary copied
/// from `exe`, normally `/proc/self/exe`; unit; link) when the image has systemd.
///
/// # Errors
/// [`AgentError`] naming the file.
pub fn install(root: &Path, image: &str, manifest: Option<&Manifest>, creds: &NodeCredentials, exe: &Path) -> Result<Written, AgentError> {
    let record = match manifest {
        Some(m) => {
            let rec = crate::update::record_installed(root, image, m)?;
            info!(image, manifest = %rec.manifest_sha256, "installed record written (var/lib/si-appliance)");
            true
        }
        None => {
            warn!(image, "the image has no manifest: no installed record, `si-appliance update` will not work on this node");
            false
        }
    };
    crate::update::client::write_credentials(root, creds)?;
    if !has_systemd(root) {
        info!("the image has no systemd: update agent not installed (`si-appliance update --server` by hand only)");
        return Ok(Written { record, agent: false });
    }
    copy_atomic(exe, &root.join(AGENT_BIN), 0o755)?;
    write_atomic(&root.join(AGENT_UNIT), UNIT_TEXT.as_bytes(), 0o644)?;
    let link = root.join(AGENT_WANTS);
    let dir = link.parent().unwrap_or(root);
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    if fs::symlink_metadata(&link).is_ok() {
        fs::remove_file(&link).map_err(io("replacing", &link))?;
    }
    std::os::unix::fs::symlink(format!("/{AGENT_UNIT}"), &link).map_err(io("linking", &link))?;
    info!(unit = AGENT_UNIT, bin = AGENT_BIN, "update agent installed and enabled (si-appliance update --watch)");
    Ok(Written { record, agent: true })
}

fn temp_of(dest: &Path) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.si-tmp"))
}

fn write_atomic(dest: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let dir = dest.parent().ok_or_else(|| AgentError::Io {
        op: "writing",
        path: dest.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no parent directory"),
    })?;
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = temp_of(dest);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io("writing", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, dest).map_err(io("renaming into place", dest))
}

fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> Result<(), AgentError> {
    let dir = dest.parent().ok_or_else(|| AgentError::Io {
        op: "writing",
        path: dest.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no parent directory"),
    })?;
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = temp_of(dest);
    let _ = fs::remove_file(&tmp);
    fs::copy(src, &tmp).map_err(io("copying the running binary to", &tmp))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("syncing", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, dest).map_err(io("renaming into place", dest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> NodeCredentials {
        NodeCredentials { server: "10.0.0.1:8080".parse().unwrap(), mac: "52:54:00:00:00:07".parse().unwrap(), token: "t0k".into(), iface: None }
    }

    fn manifest_of(tree: &Path) -> Manifest {
        use crate::image::{pack, scan};
        let nodes = scan::scan(tree, &scan::ScanOptions::default()).unwrap();
        let digests = pack::digests_for(tree, &nodes, &Default::default(), true).unwrap().unwrap_or_default();
        pack::manifest_of(&nodes, &digests, pack::full_header(&Default::default()))
    }

    #[test]
    fn a_systemd_image_gets_record_credentials_binary_and_enabled_unit() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        fs::write(root.join("usr/lib/systemd/systemd"), "elf").unwrap();
        let m = manifest_of(root);
        let exe = root.join("fake-exe");
        fs::write(&exe, "#!/bin/sh\necho agent\n").unwrap();
        let w = install(root, "demo", Some(&m), &creds(), &exe).unwrap();
        assert_eq!(w, Written { record: true, agent: true });
        assert_eq!(crate::update::installed_manifest(root).unwrap(), m);
        let rec: crate::update::Installed = serde_json::from_slice(&fs::read(root.join("var/lib/si-appliance/installed.json")).unwrap()).unwrap();
        assert_eq!((rec.image.as_str(), rec.manifest_sha256), ("demo", m.digest()));
        let nj = root.join("var/lib/si-appliance/node.json");
        assert_eq!(fs::metadata(&nj).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(crate::update::client::read_credentials(root).unwrap(), creds());
        let bin = root.join(AGENT_BIN);
        assert_eq!(fs::read(&bin).unwrap(), b"#!/bin/sh\necho agent\n");
        assert_eq!(fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
        let unit = fs::read_to_string(root.join(AGENT_UNIT)).unwrap();
        for want in ["ExecStart=/usr/local/sbin/si-appliance update --watch", "After=network-online.target", "Wants=network-online.target", "Restart=on-failure", "RestartSec=30s", "WantedBy=multi-user.target"] {
            assert!(unit.contains(want), "{want} not in\n{unit}");
        }
        assert_eq!(fs::read_link(root.join(AGENT_WANTS)).unwrap(), Path::new("/etc/systemd/system/si-appliance-update.service"));
        assert!(!root.join("usr/local/sbin/.si-appliance.si-tmp").exists());
        // Again (a re-run over the same root) replaces everything in place.
        install(root, "demo", Some(&m), &creds(), &exe).unwrap();
    }

    #[test]
    fn an_image_without_systemd_gets_the_record_but_no_agent() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        let exe = root.join("fake-exe");
        fs::write(&exe, "x").unwrap();
        let w = install(root, "demo", None, &creds(), &exe).unwrap();
        assert_eq!(w, Written { record: false, agent: false });
        assert!(root.join("var/lib/si-appliance/node.json").is_file());
        assert!(!root.join(AGENT_BIN).exists() && !root.join(AGENT_UNIT).exists());
        assert!(!has_systemd(root));
    }
}
