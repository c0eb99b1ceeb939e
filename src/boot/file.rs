//! Boot file names are keys: [`BootFile::parse`] turns the text of a TFTP request or an HTTP
//! path into one of a fixed set of variants, and only [`open`] maps a variant to a file on disk
//! (a boot loader found through `boot.loader_dirs`, the configured kernel or initrd) or to a
//! rendered text. Request text is never joined onto the file system: the only names that reach
//! a directory lookup are the fixed loader names and syslinux module names of a restricted
//! alphabet (no `/`, no leading dot). A symlink in a loader directory is followed only when its
//! target stays inside one of the loader directories.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::boot::BootContext;
use crate::boot::error::{BadName, OpenError};
use crate::boot::script;
use crate::nodes::{BootAction, LocalWhy};
use tracing::{info, warn};
use crate::types::events::BootStep;
use crate::types::{Loader, MacAddr};

/// Longest name we look at; longer requests are refused before any parsing.
const MAX_NAME: usize = 128;

/// A syslinux module (`ldlinux.c32`, `menu.c32` ...): 1–32 characters of `[A-Za-z0-9_-]`
/// followed by `.c32`. pxelinux 6 fetches these next to `pxelinux.0`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Com32(String);

impl Com32 {
    fn parse(s: &str) -> Option<Com32> {
        let stem = s.strip_suffix(".c32")?;
        let ok = (1..=32).contains(&stem.len())
            && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Com32(s.to_owned()))
    }

    /// The file name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Every file the boot services can serve. Parsed from request text; the only way from a
/// request to a file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BootFile {
    /// A boot loader by its TFTP name (`undionly.kpxe`, `snponly.efi`, `pxelinux.0` ...).
    Loader(Loader),
    /// A syslinux module (`ldlinux.c32` ...), searched in the loader directories.
    Com32(Com32),
    /// `pxelinux.cfg/01-<mac>` (`Some`) or `pxelinux.cfg/default` (`None`), rendered.
    PxelinuxCfg(Option<MacAddr>),
    /// The clients' kernel: `vmlinuz`.
    Kernel,
    /// The clients' initramfs: `initrd.img`.
    Initrd,
    /// A node's iPXE script: `<mac>.ipxe` (`52-54-00-12-34-56.ipxe`), rendered.
    NodeScript(MacAddr),
    /// `boot.ipxe`: chains to the node script by `${mac:hexhyp}`, rendered.
    ChainScript,
}

impl BootFile {
    /// The TFTP name of the kernel (pxelinux configs refer to it).
    pub const KERNEL: &'static str = BootStep::KERNEL;
    /// The TFTP name of the initrd.
    pub const INITRD: &'static str = BootStep::INITRD;

    /// Parses a request name (TFTP file name, or an HTTP path below `/boot/`, already
    /// percent-decoded). One leading `/` is tolerated (some firmware sends `/pxelinux.0`);
    /// after it, the name must be exactly one of our keys.
    ///
    /// # Errors
    /// [`BadName`] saying why the name is refused; callers answer "not found" in every case.
    pub fn parse(name: &str) -> Result<BootFile, BadName> {
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(BadName::Malformed);
        }
        let key = name.strip_prefix('/').unwrap_or(name);
        if key.contains("..") || key.contains('\\') || key.contains('\0') || key.starts_with('/') {
            return Err(BadName::Traversal);
        }
        if let Some(l) = Loader::ALL.into_iter().find(|l| l.tftp_name() == key) {
            return Ok(BootFile::Loader(l));
        }
        match key {
            Self::KERNEL => return Ok(BootFile::Kernel),
            Self::INITRD => return Ok(BootFile::Initrd),
            "boot.ipxe" => return Ok(BootFile::ChainScript),
            "pxelinux.cfg/default" => return Ok(BootFile::PxelinuxCfg(None)),
            _ => {}
        }
        if let Some(hw) = key.strip_prefix("pxelinux.cfg/01-") {
            // pxelinux asks for the ARP type (01) and the MAC in lower-case hex with hyphens.
            return parse_mac(hw).map(|m| BootFile::PxelinuxCfg(Some(m)));
        }
        if let Some(hw) = key.strip_suffix(".ipxe") {
            return parse_mac(hw).map(BootFile::NodeScript);
        }
        if let Some(m) = Com32::parse(key) {
            return Ok(BootFile::Com32(m));
        }
        if key.contains('/') {
            // Only pxelinux.cfg/ has sub-names; anything else with a separator is someone
            // probing the file system.
            if !key.starts_with("pxelinux.cfg/") {
                return Err(BadName::Traversal);
            }
        }
        Err(BadName::Unknown)
    }

    /// A short label for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            BootFile::Loader(_) => "loader",
            BootFile::Com32(_) => "com32",
            BootFile::PxelinuxCfg(_) => "pxelinux-cfg",
            BootFile::Kernel => "kernel",
            BootFile::Initrd => "initrd",
            BootFile::NodeScript(_) => "script",
            BootFile::ChainScript => "chain-script",
        }
    }

    /// The node this file is for, when the name says so.
    pub fn mac(&self) -> Option<MacAddr> {
        match self {
            BootFile::PxelinuxCfg(m) => *m,
            BootFile::NodeScript(m) => Some(*m),
            _ => None,
        }
    }

    /// True for the files one node fetches once per boot (logged at info); syslinux modules
    /// and the generic chain script are logged at debug.
    pub fn is_node_step(&self) -> bool {
        self.node_step().is_some()
    }

    /// The step of the node's boot this file is (what the monitor hears of); `None` for
    /// syslinux modules and the generic chain script.
    pub fn node_step(&self) -> Option<BootStep> {
        match *self {
            BootFile::Loader(l) => Some(BootStep::Loader(l)),
            BootFile::PxelinuxCfg(m) => Some(BootStep::PxelinuxCfg(m)),
            BootFile::Kernel => Some(BootStep::Kernel),
            BootFile::Initrd => Some(BootStep::Initrd),
            BootFile::NodeScript(m) => Some(BootStep::NodeScript(m)),
            BootFile::Com32(_) | BootFile::ChainScript => None,
        }
    }
}

impl fmt::Display for BootFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootFile::Loader(l) => f.write_str(l.tftp_name()),
            BootFile::Com32(m) => f.write_str(m.as_str()),
            BootFile::PxelinuxCfg(None) => f.write_str("pxelinux.cfg/default"),
            BootFile::PxelinuxCfg(Some(m)) => write!(f, "pxelinux.cfg/01-{}", m.hyphenated()),
            BootFile::Kernel => f.write_str(Self::KERNEL),
            BootFile::Initrd => f.write_str(Self::INITRD),
            BootFile::NodeScript(m) => write!(f, "{}.ipxe", m.hyphenated()),
            BootFile::ChainScript => f.write_str("boot.ipxe"),
        }
    }
}

/// MACs in names use hyphens (`${mac:hexhyp}`, pxelinux); colons are not accepted in names.
fn parse_mac(s: &str) -> Result<MacAddr, BadName> {
    if s.contains(':') {
        return Err(BadName::Unknown);
    }
    s.parse().map_err(|_| BadName::Unknown)
}

/// What a boot file resolves to.
#[derive(Debug)]
pub enum Source {
    /// A file on disk, already opened (so it cannot be swapped between check and read).
    Disk {
        /// The open file.
        file: File,
        /// Its canonical path (for HTTP, which serves Range requests by path).
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// A rendered text.
    Rendered(Vec<u8>),
}

impl Source {
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Source::Disk { len, .. } => *len,
            Source::Rendered(v) => v.len() as u64,
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves and opens a boot file. Blocking (a few `stat`/`open` calls); run it off the async
/// threads.
///
/// # Errors
/// [`OpenError`]: not found, a symlink escaping the loader directories, not a regular file, or
/// an I/O error.
///
/// A node's own files (iPXE script, pxelinux config) render its installer and token only when
/// `client` is the node's address ([`BootContext::may_serve`]); otherwise "boot locally".
pub fn open(ctx: &BootContext, f: &BootFile, client: Option<std::net::Ipv4Addr>, via: &str) -> Result<Source, OpenError> {
    const NOT_ITS_ADDRESS: &str = "asked from another address than the node's";
    match f {
        BootFile::Loader(l) => open_in_loader_dirs(&ctx.loader_dirs, l.tftp_name()),
        BootFile::Com32(m) => open_in_loader_dirs(&ctx.loader_dirs, m.as_str()),
        BootFile::Kernel => open_configured(&ctx.kernel, BootFile::KERNEL),
        BootFile::Initrd => open_configured(&ctx.initrd, BootFile::INITRD),
        // Without a MAC nothing says which node asks: boot locally (never an installer).
        BootFile::PxelinuxCfg(None) => {
            Ok(Source::Rendered(script::pxelinux_local(None, "no per-node config asked for").into_bytes()))
        }
        BootFile::PxelinuxCfg(Some(mac)) if !ctx.may_serve(*mac, client, via) => {
            Ok(Source::Rendered(script::pxelinux_local(Some(*mac), NOT_ITS_ADDRESS).into_bytes()))
        }
        BootFile::NodeScript(mac) if !ctx.may_serve(*mac, client, via) => {
            Ok(Source::Rendered(script::ipxe_local(*mac, NOT_ITS_ADDRESS).into_bytes()))
        }
        BootFile::PxelinuxCfg(Some(mac)) => Ok(Source::Rendered(match action(ctx, *mac) {
            BootAction::Install => script::pxelinux_cfg(&ctx.server(), Some(&ctx.node(*mac))),
            BootAction::Local(why) => script::pxelinux_local(Some(*mac), &why.to_string()),
        }
        .into_bytes())),
        BootFile::NodeScript(mac) => Ok(Source::Rendered(match action(ctx, *mac) {
            BootAction::Install => node_script(ctx, *mac),
            BootAction::Local(why) => script::ipxe_local(*mac, &why.to_string()),
        }
        .into_bytes())),
        BootFile::ChainScript => Ok(Source::Rendered(script::ipxe_chain(&ctx.server()).into_bytes())),
    }
}

/// The installer script of `mac`. With peer-served boot files it checks what a peer sends
/// against the digests of the appliance's own files; if those cannot be read, the script asks
/// only the appliance (no redirect without a check) and the error is logged.
fn node_script(ctx: &BootContext, mac: MacAddr) -> String {
    let mut server = ctx.server();
    let digests = match ctx.peers.as_ref().map(|_| ctx.digests()) {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            warn!(%mac, "boot: no digests of the boot files ({e:#}): the script names only the appliance");
            None
        }
        None => None,
    };
    server.peers = digests.as_ref().map(|d| script::PeerCheck { kernel_sha256: &d.kernel.sha256, initrd_sha256: &d.initrd.sha256 });
    script::ipxe_node(&server, &ctx.node(mac))
}

/// The node book's answer for `mac`, logged and told to the monitor when it is "boot locally".
/// A book that cannot record an `enroll = "any"` node answers "boot locally": a node whose
/// install the appliance could not remember would be reinstalled at every boot.
fn action(ctx: &BootContext, mac: MacAddr) -> BootAction {
    let a = ctx.nodes.boot_action(mac).unwrap_or_else(|e| {
        warn!(%mac, "node book: {e:#}; the node boots locally");
        BootAction::Local(LocalWhy::NotEnrolled)
    });
    if let BootAction::Local(why) = &a {
        match why {
            LocalWhy::NotEnrolled => info!(%mac, "boot: not enrolled: told to boot from its disk (discovered)"),
            LocalWhy::Installed { image, .. } => info!(%mac, %image, "boot: installed: told to boot from its disk"),
        }
        ctx.events.send(crate::types::events::NodeEvent::LocalBoot { mac, why: why.to_string() });
    }
    a
}

/// The loaders found in `dirs` (served) and those not (a client must not be offered them).
/// Blocking: one `stat`/`open` per loader; run at start.
pub fn available_loaders(dirs: &[PathBuf]) -> (Vec<crate::types::Loader>, Vec<crate::types::Loader>) {
    crate::types::Loader::ALL.iter().partition(|l| open_in_loader_dirs(dirs, l.tftp_name()).is_ok())
}

/// Looks for `name` (a key, never request text) in each loader directory in order.
fn open_in_loader_dirs(dirs: &[PathBuf], name: &str) -> Result<Source, OpenError> {
    // Canonical roots, so a symlink's target can be checked against them. A configured
    // directory that does not exist is skipped.
    let roots: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
    for dir in dirs {
        let candidate = dir.join(name);
        match candidate.symlink_metadata() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(OpenError::Io { path: candidate, source }),
        }
        let target = match candidate.canonicalize() {
            Ok(t) => t,
            // A dangling symlink: treat as absent.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(OpenError::Io { path: candidate, source }),
        };
        if !roots.iter().any(|r| target.starts_with(r)) {
            return Err(OpenError::Escapes { path: candidate, target });
        }
        return open_regular(&target);
    }
    Err(OpenError::NotFound { name: name.to_owned(), searched: dirs.to_vec() })
}

/// The kernel and initrd are named by the configuration (trusted), not by the request.
fn open_configured(path: &Path, name: &str) -> Result<Source, OpenError> {
    match path.canonicalize() {
        Ok(p) => open_regular(&p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(OpenError::NotFound { name: name.to_owned(), searched: vec![path.to_owned()] })
        }
        Err(source) => Err(OpenError::Io { path: path.to_owned(), source }),
    }
}

fn open_regular(path: &Path) -> Result<Source, OpenError> {
    let io = |source| OpenError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(OpenError::NotRegular(path.to_owned()));
    }
    Ok(Source::Disk { file, path: path.to_owned(), len: meta.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    #[test]
    fn keys_parse() {
        let ok = [
            ("undionly.kpxe", BootFile::Loader(Loader::Undionly)),
            ("/undionly.kpxe", BootFile::Loader(Loader::Undionly)),
            ("snponly.efi", BootFile::Loader(Loader::SnpOnly)),
            ("ipxe.efi", BootFile::Loader(Loader::IpxeEfi)),
            ("ipxe-arm64.efi", BootFile::Loader(Loader::IpxeArm64Efi)),
            ("pxelinux.0", BootFile::Loader(Loader::Pxelinux)),
            ("ldlinux.c32", BootFile::Com32(Com32("ldlinux.c32".into()))),
            ("vmlinuz", BootFile::Kernel),
            ("initrd.img", BootFile::Initrd),
            ("boot.ipxe", BootFile::ChainScript),
            ("pxelinux.cfg/default", BootFile::PxelinuxCfg(None)),
            ("pxelinux.cfg/01-52-54-00-12-34-56", BootFile::PxelinuxCfg(Some(MAC))),
            ("52-54-00-12-34-56.ipxe", BootFile::NodeScript(MAC)),
        ];
        for (name, want) in ok {
            let got = BootFile::parse(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn node_steps_are_the_files_a_node_fetches_once_and_keep_their_key() {
        let rows = [
            ("undionly.kpxe", true),
            ("pxelinux.0", true),
            ("vmlinuz", true),
            ("initrd.img", true),
            ("pxelinux.cfg/default", true),
            ("pxelinux.cfg/01-52-54-00-12-34-56", true),
            ("52-54-00-12-34-56.ipxe", true),
            ("ldlinux.c32", false),
            ("boot.ipxe", false),
        ];
        for (name, step) in rows {
            let f = BootFile::parse(name).unwrap();
            assert_eq!(f.node_step().is_some(), step, "{name}");
            if let Some(s) = f.node_step() {
                assert_eq!(s.to_string(), name, "the monitor shows the key the node asked for");
            }
        }
    }

    #[test]
    fn display_round_trips() {
        for name in ["undionly.kpxe", "menu.c32", "vmlinuz", "pxelinux.cfg/default",
                     "pxelinux.cfg/01-52-54-00-12-34-56", "52-54-00-12-34-56.ipxe", "boot.ipxe"] {
            assert_eq!(BootFile::parse(name).unwrap().to_string(), name);
        }
    }

    #[test]
    fn traversal_and_junk_refused() {
        let cases = [
            ("", BadName::Malformed),
            ("../etc/passwd", BadName::Traversal),
            ("/etc/passwd", BadName::Traversal),
            ("//etc/passwd", BadName::Traversal),
            ("pxelinux.cfg/../../x", BadName::Traversal),
            ("pxelinux.cfg/..", BadName::Traversal),
            ("..", BadName::Traversal),
            ("a\\..\\b", BadName::Traversal),
            ("vmlinuz\0x", BadName::Traversal),
            ("boot/vmlinuz", BadName::Traversal),
            ("./vmlinuz", BadName::Traversal),
            ("pxelinux.cfg/C0A80001", BadName::Unknown),
            ("pxelinux.cfg/01-52:54:00:12:34:56", BadName::Unknown),
            ("52:54:00:12:34:56.ipxe", BadName::Unknown),
            ("zz-54-00-12-34-56.ipxe", BadName::Unknown),
            (".c32", BadName::Unknown),
            (".hidden.c32", BadName::Unknown),
            ("VMLINUZ", BadName::Unknown),
            ("vmlinuz ", BadName::Unknown),
        ];
        for (name, want) in cases {
            assert_eq!(BootFile::parse(name), Err(want), "{name:?}");
        }
        assert_eq!(BootFile::parse(&"a".repeat(MAX_NAME + 1)), Err(BadName::Malformed));
    }

    proptest::proptest! {
        /// Whatever the text, a parsed name never carries a path separator into a directory
        /// lookup: loaders are fixed names and modules have a restricted alphabet.
        #[test]
        fn parse_never_yields_a_path(s in ".{0,160}") {
            match BootFile::parse(&s) {
                Ok(BootFile::Com32(m)) => proptest::prop_assert!(!m.as_str().contains('/') && !m.as_str().starts_with('.')),
                Ok(_) | Err(_) => {}
            }
        }
    }

    fn ctx_with_dirs(dirs: Vec<PathBuf>, kernel: PathBuf) -> BootContext {
        BootContext::for_tests(dirs, kernel)
    }

    #[test]
    fn symlinks_out_of_the_loader_dirs_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let loaders = root.path().join("loaders");
        std::fs::create_dir(&loaders).unwrap();
        std::fs::write(root.path().join("secret"), b"outside").unwrap();
        std::fs::write(loaders.join("undionly.kpxe"), b"ipxe").unwrap();
        std::fs::write(loaders.join("real.c32"), b"module").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), loaders.join("menu.c32")).unwrap();
        std::os::unix::fs::symlink("real.c32", loaders.join("ldlinux.c32")).unwrap();
        std::fs::create_dir(loaders.join("dir.c32")).unwrap();
        let ctx = ctx_with_dirs(vec![root.path().join("missing"), loaders.clone()], root.path().join("k"));

        let src = open(&ctx, &BootFile::parse("undionly.kpxe").unwrap(), None, "test").unwrap();
        assert_eq!(src.len(), 4);
        // A symlink inside the directory is fine.
        assert_eq!(open(&ctx, &BootFile::parse("ldlinux.c32").unwrap(), None, "test").unwrap().len(), 6);
        assert!(matches!(open(&ctx, &BootFile::parse("menu.c32").unwrap(), None, "test"), Err(OpenError::Escapes { .. })));
        assert!(matches!(open(&ctx, &BootFile::parse("dir.c32").unwrap(), None, "test"), Err(OpenError::NotRegular(_))));
        assert!(matches!(open(&ctx, &BootFile::parse("pxelinux.0").unwrap(), None, "test"), Err(OpenError::NotFound { .. })));
        assert!(matches!(open(&ctx, &BootFile::Kernel, None, "test"), Err(OpenError::NotFound { .. })));
    }
}
