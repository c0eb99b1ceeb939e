//! Command-line flags (clap). Raw flags only: `config.rs` merges them into the validated Config.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// si-appliance: DHCP/PXE, TFTP/HTTP boot, image store and BitTorrent swarm in one binary.
///
/// Without a subcommand it runs the appliance on --iface.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML); see config/si-appliance.toml.
    #[arg(long, short = 'c', global = true, env = "SI_APPLIANCE_CONFIG")]
    pub config: Option<PathBuf>,

    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(long, short = 'v', action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Appliance flags (the default action).
    #[command(flatten)]
    pub appliance: ApplianceFlags,

    /// What to do; default: run the appliance.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags of the appliance; each overrides the same key of the config file.
#[derive(Debug, Default, clap::Args)]
pub struct ApplianceFlags {
    /// Provisioning interface (key `iface`).
    #[arg(long)]
    pub iface: Option<String>,
    /// Image the nodes install (key `image`).
    #[arg(long)]
    pub image: Option<String>,
    /// Image store root (key `store`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// State directory: leases, secret (key `state_dir`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The appliance's address on the interface (key `server_ip`).
    #[arg(long)]
    pub server_ip: Option<Ipv4Addr>,
    /// DHCP mode (key `dhcp.mode`).
    #[arg(long, value_enum)]
    pub dhcp_mode: Option<DhcpModeArg>,
    /// Which clients to answer (key `dhcp.answer`).
    #[arg(long, value_enum)]
    pub answer: Option<AnswerArg>,
    /// Skip the probe for other DHCP servers (key `dhcp.probe = false`).
    #[arg(long)]
    pub no_probe: bool,
    /// HTTP port (key `http.port`).
    #[arg(long)]
    pub http_port: Option<u16>,
    /// TFTP port (key `tftp.port`).
    #[arg(long)]
    pub tftp_port: Option<u16>,
    /// Client kernel (key `boot.kernel`).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Client initramfs (key `boot.initrd`).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Serve and seed this archive (repeatable; adds to key `swarm.archives`).
    #[arg(long, value_name = "FILE")]
    pub seed: Vec<PathBuf>,
}

/// `--dhcp-mode`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DhcpModeArg {
    /// Full DHCP server.
    Full,
    /// proxyDHCP only.
    Proxy,
    /// No DHCP.
    Off,
}

/// `--answer`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AnswerArg {
    /// Only PXE firmware, iPXE and our installer.
    Pxe,
    /// Every DHCP client.
    All,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the configuration (file + flags) and print it as the appliance would use it.
    CheckConfig,
    /// Manage the image store: image trees, archives, diffs, .torrent files.
    Image {
        /// What to do.
        #[command(subcommand)]
        action: ImageAction,
    },
    /// Download an image through the appliance's swarm (the swarm half of the installer),
    /// uploading to other nodes meanwhile, and keep seeding afterwards.
    Fetch(FetchArgs),
    /// The installer (run by the nodes' initramfs): orders from /proc/cmdline, plan from the
    /// appliance, partition + mkfs, swarm download unpacked as it arrives, per-node settings,
    /// boot loader, seeding, then reboot/poweroff/shell. Flags override the kernel command line.
    Install(InstallArgs),
    /// The installer's boot-file serving alone: fetch the kernel and initrd through the
    /// appliance (or the peer it redirects to), check them against /boot/digests, serve them on
    /// boot.peer_port and announce that, until SIGINT/SIGTERM.
    BootPeer(BootPeerArgs),
    /// Update this installed node in place: from what its appliance offers, fetched through the
    /// swarm (--server once, --watch as the agent), or from a local diff (or full) archive
    /// (--archive/--manifest): changed and new files via temp + rename, deletions, metadata,
    /// never the excluded paths; a journal lists what changed when it fails part-way.
    /// --dry-run lists the plan only.
    Update(UpdateArgs),
    /// Print the state of a running appliance: deployment summary and one line per node.
    Status(StatusArgs),
    /// The appliance's USB stick (built by pxe-assets/build-usb.sh), from a workstation.
    Usb {
        /// What to do.
        #[command(subcommand)]
        action: UsbAction,
    },
    /// The nodes of a running appliance: enrol (`add`), mark for a new install (`reimage`),
    /// order an update of installed nodes (`update`),
    /// `list` their records and the discovered PXE clients, print a node's installer console
    /// (`log`). Uses the admin token in <state_dir>/admin-token.
    Node(NodeArgs),
    /// Write a deployment report now on a running appliance (JSON + SVG charts) and print
    /// where; with --latest (or when no appliance answers) print the latest report's directory.
    Report(ReportArgs),
}

/// `si-appliance status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The appliance's HTTP address (default 127.0.0.1:<http.port>).
    #[arg(long, value_name = "IP:PORT")]
    pub server: Option<std::net::SocketAddr>,
    /// Print the deployment and every node as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `si-appliance node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The appliance's HTTP address (default 127.0.0.1:<http.port>).
    #[arg(long, value_name = "IP:PORT", global = true)]
    pub server: Option<std::net::SocketAddr>,
    /// The admin token (default: the file <state_dir>/admin-token).
    #[arg(long, env = "SI_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub action: NodeAction,
}

/// `node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Enrol nodes: the appliance installs them at their next network boot.
    Add {
        /// MAC addresses (aa:bb:cc:dd:ee:ff).
        #[arg(required = true)]
        macs: Vec<String>,
        /// Host name of the installed system (one MAC only).
        #[arg(long)]
        hostname: Option<String>,
        /// Disk to install on, e.g. /dev/sda.
        #[arg(long)]
        disk: Option<String>,
        /// Group (for `reimage --group`).
        #[arg(long)]
        group: Option<String>,
    },
    /// Mark nodes for a new install at their next network boot.
    Reimage {
        /// Which nodes.
        #[command(flatten)]
        which: Which,
    },
    /// Order installed nodes to update to the image's tree as it is now (their agents fetch the
    /// diff from their version through the swarm at their next poll, `install.update_poll`).
    Update {
        /// Which nodes.
        #[command(flatten)]
        which: Which,
        /// Run the group's profile steps again as well (on the live system).
        #[arg(long)]
        profile: bool,
    },
    /// Every node's record, and the discovered (not enrolled) PXE clients.
    List {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// A node's installer console, as it streamed it to the appliance.
    Log {
        /// The node's MAC.
        mac: String,
    },
}

/// The nodes a `node` action is for: MACs, `--group G` or `--all`.
#[derive(Debug, clap::Args)]
pub struct Which {
    /// MAC addresses.
    #[arg(conflicts_with_all = ["group", "all"], required_unless_present_any = ["group", "all"])]
    pub macs: Vec<String>,
    /// Every node of this group.
    #[arg(long, conflicts_with = "all")]
    pub group: Option<String>,
    /// Every node in the book.
    #[arg(long)]
    pub all: bool,
}

/// `usb` subcommands.
#[derive(Debug, Subcommand)]
pub enum UsbAction {
    /// Import a tree or tarball into the stick's image store and pack it there, so the stick
    /// comes up ready to serve it (run as root: the stick's data partition is mounted).
    AddImage {
        /// The stick: the image file build-usb.sh wrote, or its block device (/dev/sdX).
        stick: PathBuf,
        /// Image name.
        name: String,
        /// Source directory or tar / tar.zst file.
        source: PathBuf,
        /// Make it the image nodes install by default (`image = NAME` in the stick's config).
        #[arg(long)]
        default: bool,
        /// Enrol a node: MAC or MAC=HOSTNAME (repeatable).
        #[arg(long, value_name = "MAC[=HOSTNAME]")]
        enroll: Vec<String>,
    },
}

/// `si-appliance report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The appliance's HTTP address (default 127.0.0.1:<http.port>).
    #[arg(long, value_name = "IP:PORT")]
    pub server: Option<std::net::SocketAddr>,
    /// Do not write a new report: print the latest one in the report directory.
    #[arg(long)]
    pub latest: bool,
}

/// `image` subcommands. NAME is an image (or with --override, an override tree) in the store.
#[derive(Debug, Subcommand)]
pub enum ImageAction {
    /// List image and override trees with their archives.
    List,
    /// Show one tree's archive, manifest and torrent.
    Show {
        /// Image name.
        name: String,
        /// An override tree instead of an image.
        #[arg(long = "override")]
        is_override: bool,
    },
    /// Pack a tree into archives/NAME.tar.zst + manifest (+ .torrent); skipped when unchanged.
    Pack {
        /// Image name.
        name: String,
        /// An override tree instead of an image.
        #[arg(long = "override")]
        is_override: bool,
        #[command(flatten)]
        pack: PackFlags,
        /// Repack even when the tree is unchanged.
        #[arg(long)]
        force: bool,
    },
    /// Write archives/NAME.diff.tar.zst: what changed in the tree since the packed base.
    Diff {
        /// Image name.
        name: String,
        /// An override tree instead of an image.
        #[arg(long = "override")]
        is_override: bool,
        #[command(flatten)]
        pack: PackFlags,
    },
    /// Remove a tree and its archives.
    Rm {
        /// Image name.
        name: String,
        /// An override tree instead of an image.
        #[arg(long = "override")]
        is_override: bool,
        /// Keep the tree, remove only archives, manifests and torrents.
        #[arg(long)]
        archives_only: bool,
    },
    /// Import a tree from a directory or a tar / tar.zst file.
    Import {
        /// Image name.
        name: String,
        /// Source directory or tarball.
        #[arg(long)]
        from: PathBuf,
        /// An override tree instead of an image.
        #[arg(long = "override")]
        is_override: bool,
    },
    /// Capture a golden client's root with rsync over ssh (or from a local directory path).
    Capture {
        /// Image name.
        name: String,
        /// HOST, HOST:SSH_PORT, or an absolute local path.
        #[arg(long)]
        from: String,
        /// The ssh key to log in to HOST as root with (default: root's own keys and agent).
        /// Host keys are kept in <store>/ssh_known_hosts (learnt on first contact).
        #[arg(long, value_name = "FILE")]
        ssh_identity: Option<PathBuf>,
    },
    /// Unpack an archive (full or diff) into a directory, safely.
    Unpack {
        /// The archive (tar or tar.zst), or - for stdin.
        archive: PathBuf,
        /// Target root (created if missing).
        #[arg(long)]
        to: PathBuf,
        /// Verify the result against this manifest.
        #[arg(long)]
        verify: Option<PathBuf>,
    },
}

/// Packing flags.
#[derive(Debug, Default, clap::Args)]
pub struct PackFlags {
    /// zstd level (1-22).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub level: i32,
    /// Write a plain tar (no compression).
    #[arg(long)]
    pub no_compress: bool,
    /// zstd threads (default: all cores).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Tracker announce URL for the .torrent (default: http://<server_ip>:<http.port>/announce
    /// when server_ip is configured; otherwise no .torrent).
    #[arg(long)]
    pub announce: Option<String>,
}

/// `si-appliance fetch`.
#[derive(Debug, clap::Args)]
pub struct FetchArgs {
    /// The appliance's HTTP address, e.g. 10.0.0.1:80.
    #[arg(long, value_name = "IP:PORT")]
    pub server: std::net::SocketAddr,
    /// The image to fetch (its name on the appliance: /torrents/NAME.torrent).
    #[arg(long = "image", value_name = "NAME")]
    pub name: String,
    /// Where to write the archive.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Bind to this interface (SO_BINDTODEVICE) and listen on its address.
    #[arg(long = "iface", value_name = "IF")]
    pub bind_iface: Option<String>,
    /// TCP port for incoming peers.
    #[arg(long, default_value_t = 6881)]
    pub port: u16,
    /// Also connect to this peer (repeatable).
    #[arg(long = "peer", value_name = "IP:PORT")]
    pub peers: Vec<std::net::SocketAddr>,
    /// Do not use the appliance's tracker and seed: only the --peer peers.
    #[arg(long)]
    pub no_tracker: bool,
    /// After completion, seed until the appliance reports every peer of the swarm complete
    /// (at most --seed-for, else the appliance's swarm.client_seed_limit, at most 1 h).
    #[arg(long)]
    pub seed_until_done: bool,
    /// After completion, seed at most this long (e.g. 30s, 10m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub seed_for: Option<std::time::Duration>,
    /// Progress line period.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub progress_every: std::time::Duration,
    /// Give up when the download is not complete after this long.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// `si-appliance update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The installed system's root (its var/lib/si-appliance/installed.manifest is the base).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Local mode: the archive to apply: `image diff`'s NAME.diff.tar.zst against the installed
    /// manifest, or a full NAME.tar.zst.
    #[arg(long, value_name = "FILE", requires = "manifest", conflicts_with_all = ["server", "watch"])]
    pub archive: Option<PathBuf>,
    /// Local mode: the archive's manifest (NAME.diff.manifest or NAME.manifest).
    #[arg(long, value_name = "FILE", requires = "archive")]
    pub manifest: Option<PathBuf>,
    /// Ask the appliance once (default address: <root>/var/lib/si-appliance/node.json) and
    /// apply what it offers, fetched through the swarm; with --watch: the agent's appliance.
    #[arg(long, value_name = "IP:PORT", num_args = 0..=1)]
    pub server: Option<Option<std::net::SocketAddr>>,
    /// The update agent: ask the appliance every poll period and act when an operator ordered
    /// an update (`node update`).
    #[arg(long)]
    pub watch: bool,
    /// The agent's poll period (default: what the appliance says).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "watch")]
    pub poll: Option<std::time::Duration>,
    /// This node's MAC (overrides node.json).
    #[arg(long)]
    pub mac: Option<String>,
    /// This node's token (overrides node.json).
    #[arg(long, env = "SI_NODE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Bind the swarm to this interface (default: the one with the node's MAC).
    #[arg(long = "iface", value_name = "IF")]
    pub bind_iface: Option<String>,
    /// TCP port for incoming peers.
    #[arg(long, default_value_t = 6881)]
    pub port: u16,
    /// Give up a download that makes no progress this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub stall_limit: std::time::Duration,
    /// Seed the update to the other nodes at most this long after applying it.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub seed_for: std::time::Duration,
    /// Image name recorded in installed.json (local mode; default: the one recorded there).
    #[arg(long = "image", value_name = "NAME")]
    pub image: Option<String>,
    /// Print what would change (A added, M changed, D deleted, X excluded) and change nothing.
    #[arg(long, conflicts_with = "watch")]
    pub dry_run: bool,
    /// More paths never to touch, one absolute pattern a line (repeatable); the node's own
    /// <root>/etc/si-appliance/update.exclude is read too when it exists.
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Do not start from the default exclude list (hostname, machine-id, ssh host keys, fstab,
    /// network configuration, /var/log, /home).
    #[arg(long)]
    pub no_default_excludes: bool,
}

/// `si-appliance boot-peer`.
#[derive(Debug, clap::Args)]
pub struct BootPeerArgs {
    /// The appliance's HTTP address.
    #[arg(long, value_name = "IP:PORT")]
    pub server: std::net::SocketAddr,
    /// This node's MAC.
    #[arg(long)]
    pub mac: String,
    /// This node's token.
    #[arg(long, env = "SI_NODE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Where the files are kept (DIR/boot/vmlinuz, DIR/boot/initrd.img).
    #[arg(long, value_name = "DIR", default_value = "/run/si-install/boot-peer")]
    pub dir: PathBuf,
}

/// `si-appliance install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The appliance's HTTP address (overrides si.server=).
    #[arg(long, value_name = "IP:PORT")]
    pub server: Option<std::net::SocketAddr>,
    /// This node's MAC (overrides si.mac=).
    #[arg(long)]
    pub mac: Option<String>,
    /// This node's token (overrides si.token=).
    #[arg(long)]
    pub token: Option<String>,
    /// Target disk, e.g. /dev/vda (overrides si.disk= and the plan).
    #[arg(long, value_name = "DEV")]
    pub disk: Option<String>,
    /// Read the orders from this file instead of /proc/cmdline.
    #[arg(long, value_name = "FILE", default_value = "/proc/cmdline")]
    pub cmdline: PathBuf,
    /// What to do at the end: reboot, poweroff or shell (overrides si.finish= and the plan).
    #[arg(long, value_name = "WHAT")]
    pub finish: Option<String>,
    /// Work directory; the target root is mounted at WORKDIR/root.
    #[arg(long, value_name = "DIR", default_value = "/run/si-install")]
    pub workdir: PathBuf,
    /// Firmware to plan for: bios or uefi (default: /sys/firmware/efi decides).
    #[arg(long, value_name = "bios|uefi", value_enum)]
    pub firmware: Option<crate::types::Firmware>,
    /// Bind the swarm to this interface (SO_BINDTODEVICE).
    #[arg(long = "iface", value_name = "IF")]
    pub bind_iface: Option<String>,
    /// TCP port for incoming peers.
    #[arg(long, default_value_t = 6881)]
    pub port: u16,
    /// Give up when the appliance stays unreachable this long.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub plan_wait: std::time::Duration,
    /// Give up when the download makes no progress this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub stall_limit: std::time::Duration,
    /// The appliance's image-signing public key (hex); the appliance puts it in the initramfs
    /// it serves. An image whose signature does not verify with it is refused.
    #[arg(long, value_name = "FILE", default_value = "/etc/si-appliance/image-signing.pub")]
    pub trust_key: PathBuf,
    /// Install even without a trusted key (the kernel command line's si.infohash/si.manifest
    /// still hold the download when present).
    #[arg(long)]
    pub allow_unsigned: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn firmware_of(args: &[&str]) -> Result<Option<crate::types::Firmware>, clap::Error> {
        let cli = Cli::try_parse_from(["si-appliance", "install"].iter().chain(args))?;
        match cli.command {
            Some(Command::Install(a)) => Ok(a.firmware),
            other => panic!("not the install command: {other:?}"),
        }
    }

    #[test]
    fn firmware_flag_takes_bios_or_uefi_and_refuses_the_rest() {
        use crate::types::Firmware;
        assert_eq!(firmware_of(&[]).unwrap(), None);
        assert_eq!(firmware_of(&["--firmware", "bios"]).unwrap(), Some(Firmware::Bios));
        assert_eq!(firmware_of(&["--firmware", "uefi"]).unwrap(), Some(Firmware::Uefi));
        let e = firmware_of(&["--firmware", "amiga"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(e.to_string().contains("bios") && e.to_string().contains("uefi"), "{e}");
    }

    fn update_of(args: &[&str]) -> Result<UpdateArgs, clap::Error> {
        let cli = Cli::try_parse_from(["si-appliance", "update"].iter().chain(args))?;
        match cli.command {
            Some(Command::Update(a)) => Ok(a),
            other => panic!("not the update command: {other:?}"),
        }
    }

    #[test]
    fn update_takes_a_local_archive_a_server_or_the_watch_mode() {
        let a = update_of(&["--archive", "a.tar.zst", "--manifest", "a.manifest"]).unwrap();
        assert!(a.archive.is_some() && a.server.is_none() && !a.watch);
        assert_eq!(update_of(&["--server"]).unwrap().server, Some(None));
        assert_eq!(update_of(&["--server", "10.0.0.1:80", "--dry-run"]).unwrap().server, Some(Some("10.0.0.1:80".parse().unwrap())));
        let w = update_of(&["--watch", "--poll", "30s"]).unwrap();
        assert_eq!((w.watch, w.poll), (true, Some(std::time::Duration::from_secs(30))));
        assert!(update_of(&["--archive", "a"]).is_err(), "--archive needs --manifest");
        assert!(update_of(&["--archive", "a", "--manifest", "m", "--server"]).is_err());
        assert_eq!(update_of(&["--watch", "--server", "10.0.0.1:80"]).unwrap().server, Some(Some("10.0.0.1:80".parse().unwrap())), "the agent's address override");
        assert!(update_of(&["--watch", "--dry-run"]).is_err());
        assert!(update_of(&["--poll", "5s"]).is_err(), "--poll is the agent's");
    }
}
