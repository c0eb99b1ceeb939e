//! The configuration: the TOML file (`config/si-appliance.toml` documents every key) merged with
//! the command-line flags into one validated [`Config`]. Nothing else in the program reads raw
//! configuration strings. Unknown keys and bad values are refused with an error naming the key.
//!
//! Two types: [`ConfigFile`] is the file's shape (serde, defaults, flags applied by
//! [`ConfigFile::apply_flags`]); [`Config`] is what the program reads, made only by
//! `Config::try_from(file)`, which checks every rule, and never changed afterwards (it derefs to
//! the file shape for reading, there is no mutable access). The flags go onto the file shape
//! before the one check, so a flag value meets the same rules as the key it overrides.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::types::{ImageName, MacAddr};


/// Errors from loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or a key is unknown or has a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message: names the key, line and column.
        message: String,
    },
    /// A value is well-formed but not acceptable (names the key).
    #[error("{key}: {why}")]
    Invalid {
        /// Dotted key, e.g. `dhcp.pool[0].range`.
        key: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Whether and how the appliance answers DHCP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DhcpMode {
    /// Full server: hands out addresses from the pools.
    #[default]
    Full,
    /// proxyDHCP (PXE spec): another server hands out addresses, we only add boot information,
    /// on port 67 and 4011.
    Proxy,
    /// No DHCP at all (something else points clients at our TFTP/HTTP).
    Off,
}

/// Which clients the DHCP server answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    /// Only PXE firmware (vendor class `PXEClient`), iPXE (user class `iPXE`) and our installer
    /// (vendor class `si-appliance`). The safe default on a switch that carries other traffic.
    #[default]
    Pxe,
    /// Every DHCP client on the segment.
    All,
}

/// One address pool, for the local segment or for a relayed subnet (matched by `giaddr`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The subnet, e.g. `10.0.0.0/24`.
    pub subnet: Ipv4Net,
    /// First and last address handed out (inclusive). Default: the whole subnet less network,
    /// broadcast, the router and the appliance's own address.
    #[serde(default)]
    pub range: Option<[Ipv4Addr; 2]>,
    /// Default gateway for this subnet (option 3). For a relayed subnet this is usually the relay.
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    /// DNS servers for this subnet (option 6); default: `dhcp.dns`.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

/// One node of this appliance: its MAC enrols it (with `enroll = "listed"`, only these nodes and
/// those added at run time are installed), with an optional fixed address, host name, disk and
/// group.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// The client's MAC.
    pub mac: MacAddr,
    /// Its fixed address; must lie inside one pool's subnet. Default: one from the pool.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Its host name (option 12), also the installed system's name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Boot loader sent by TFTP to this node whatever its firmware says, even when it already is
    /// iPXE (e.g. `pxelinux` for a node that must boot through pxelinux). Default: by
    /// architecture (option 93), and the iPXE script URL for iPXE clients.
    #[serde(default)]
    pub loader: Option<crate::types::Loader>,
    /// The disk this node installs on (overrides `install.disk`), e.g. `/dev/sda`.
    #[serde(default)]
    pub disk: Option<String>,
    /// Its group, for `si-appliance node reimage --group`.
    #[serde(default)]
    pub group: Option<String>,
}

/// Which nodes the appliance installs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enroll {
    /// Only nodes listed in `[[dhcp.reservation]]` or added at run time (`si-appliance node
    /// add`); any other PXE client is told to boot from its disk and shown as discovered.
    #[default]
    Listed,
    /// Every PXE client that asks (lab use only: on a shared switch this wipes any machine that
    /// falls back to network boot).
    Any,
}

/// `[admin]`: the credential of the mutating routes (`/api/admin/...`, `POST /api/report`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Requests from 127.0.0.1 need no admin token.
    pub trust_loopback: bool,
}

/// `[dhcp]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    /// `full`, `proxy` or `off`.
    pub mode: DhcpMode,
    /// `pxe` or `all`.
    pub answer: Answer,
    /// Probe the segment for other DHCP servers before serving in full mode.
    pub probe: bool,
    /// How long the probe listens for offers.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// While serving (full mode), probe for foreign DHCP servers this often and warn about each
    /// one that answers (a server plugged in after start). 0s = never.
    #[serde(with = "humantime_serde")]
    pub watch_every: Duration,
    /// A node's installer script (its token), plan and reports go only to the address this
    /// DHCP server saw for its MAC. Off (or `mode = "off"`): any address (benchmarks that
    /// simulate many installers from one host; nodes addressed by another server).
    pub bind_nodes: bool,
    /// Lease time (option 51).
    #[serde(with = "humantime_serde")]
    pub lease_time: Duration,
    /// Default router for the local pool (option 3).
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    pub domain: Option<String>,
    /// Address pools. Empty: one pool on the interface's subnet.
    #[serde(rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Static reservations.
    #[serde(rename = "reservation")]
    pub reservations: Vec<Reservation>,
    /// New clients (a MAC with no lease, not reserved, not enrolled) offered an address per
    /// second, per relay (giaddr) and for the local segment; 0 = no limit.
    pub new_client_rate: u32,
    /// Burst of new clients allowed at once before `new_client_rate` applies (`swarm.expected_nodes`
    /// instead when that is larger).
    pub new_client_burst: u32,
    /// Share of each pool (percent, rounded up) that new clients may not take: it stays free
    /// for reserved and enrolled nodes under a starvation attack. 0 = none.
    pub known_reserve_percent: u8,
    /// Before a pool without a configured `range` (the whole subnet) offers an address on the
    /// local segment to a client that did not hold it, ask the segment who has it (ARP) and wait
    /// this long for an answer; an address someone answers for is put on probation and not
    /// offered. 0 s: no check.
    #[serde(with = "humantime_serde")]
    pub arp_probe: Duration,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            mode: DhcpMode::Full,
            answer: Answer::Pxe,
            probe: true,
            probe_timeout: Duration::from_secs(4),
            watch_every: Duration::from_secs(60),
            bind_nodes: true,
            lease_time: Duration::from_secs(3600),
            router: None,
            dns: Vec::new(),
            domain: None,
            pools: Vec::new(),
            reservations: Vec::new(),
            new_client_rate: 20,
            new_client_burst: 100,
            known_reserve_percent: 20,
            arp_probe: Duration::from_millis(500),
        }
    }
}

/// `[tftp]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    /// Serve TFTP at all.
    pub enable: bool,
    /// UDP port (69).
    pub port: u16,
    /// Largest block size granted (RFC 2348).
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440); 1 disables windowing.
    pub max_windowsize: u16,
    /// Retransmission timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Transfers one client address may run at once; more get TFTP error "busy".
    pub max_transfers_per_client: usize,
    /// Transfers the server runs at once; more get TFTP error "busy".
    pub max_transfers: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            enable: true,
            port: 69,
            max_blksize: 1468,
            max_windowsize: 8,
            timeout: Duration::from_secs(3),
            max_transfers_per_client: 8,
            max_transfers: 512,
        }
    }
}

/// `[http]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// TCP port for boot scripts, kernels, the node API and the dashboard.
    pub port: u16,
    /// Connections open at once, per listen address, at most (beyond: closed at once, counted).
    pub max_connections: usize,
    /// Time a client has to send a request's head (idle and half-open connections are closed).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { port: 80, max_connections: 4096, header_timeout: Duration::from_secs(10) }
    }
}

/// `[boot]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// Directories searched, in order, for the boot loaders (undionly.kpxe, ipxe.efi,
    /// snponly.efi, pxelinux.0 ...).
    pub loader_dirs: Vec<PathBuf>,
    /// The clients' kernel (bzImage). Default: `<store>/boot/vmlinuz`.
    pub kernel: Option<PathBuf>,
    /// The clients' initramfs. Default: `<store>/boot/initrd.img`.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line for the clients.
    pub cmdline: String,
    /// Send iPXE its "no-pxedhcp" setting (option 175.176) so it does not wait for proxyDHCP.
    pub ipxe_no_pxedhcp: bool,
    /// Peer-served boot files: installers that booted serve the kernel and initrd they fetched
    /// (verified against `/boot/digests`) and the appliance redirects (302) kernel and initrd
    /// requests of nodes that check what they get (iPXE with digest commands: the node script
    /// compares SHA-256 before it boots) to them. Off by default.
    pub peer_serve: bool,
    /// Also redirect nodes whose iPXE cannot check a file (no digest commands: every BIOS build,
    /// EFI builds before iPXE 2.0): they boot whatever the peer sends. Off by default.
    pub peer_unverified: bool,
    /// Transfers one serving peer is given at once, at most (its uplink is shared by them).
    /// Default 1: one transfer at the full rate ends sooner than several sharing it, and the
    /// asker that finishes first boots and serves first (`src/boot/BOOT-STORM.md` measures 1,
    /// 2 and 4); raise it where one node's transfer cannot fill a peer's uplink.
    pub peer_serve_max: u32,
    /// TCP port the installers serve the boot files on.
    pub peer_port: u16,
    /// The rate (Mbit/s) a redirected transfer is assumed to reach at least: a redirect holds
    /// its peer's slot for (kernel + initrd size) / this rate + 10 s unless released sooner.
    pub peer_rate_mbit: u32,
    /// Transfers the appliance itself sends at once while peers serve; a kernel or initrd
    /// request beyond waits (first come, first served) for the first free slot, its own or a
    /// peer's. 0 = no limit: requests never wait (a stampede is then served like unicast).
    /// Default 1, for the reason of `peer_serve_max`; raise it where one node's transfer
    /// cannot fill the appliance's link (e.g. iPXE through a slow UNDI driver).
    pub peer_appliance_max: u32,
    /// The longest a request waits for a free slot; then the appliance serves it anyway.
    #[serde(with = "humantime_serde")]
    pub peer_wait: Duration,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            loader_dirs: vec![
                // iPXE 2.0's EFI binaries (pxe-assets/fetch-ipxe-efi.sh): their digest commands
                // let a node check peer-served boot files. Missing: Debian's below serve.
                PathBuf::from("/usr/local/lib/si-appliance/ipxe"),
                PathBuf::from("/usr/lib/ipxe"),
                PathBuf::from("/usr/lib/PXELINUX"),
                PathBuf::from("/usr/lib/syslinux/modules/bios"),
                // Debian's /usr/lib/ipxe/ipxe.efi is a symlink into /boot. Only loader names
                // (and *.c32) are ever looked up here, never the host's kernel or initrd.
                PathBuf::from("/boot"),
            ],
            kernel: None,
            initrd: None,
            cmdline: "console=ttyS0 console=tty0".to_owned(),
            ipxe_no_pxedhcp: true,
            peer_serve: false,
            peer_unverified: false,
            peer_serve_max: 1,
            peer_port: 8081,
            peer_rate_mbit: 50,
            peer_appliance_max: 1,
            peer_wait: Duration::from_secs(60),
        }
    }
}

/// `[swarm]`: the tracker and the appliance's initial seed.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwarmConfig {
    /// Run the tracker and the seed at all.
    pub enable: bool,
    /// Archives served besides the image store's (until the store hands its own in): each is
    /// seeded and published as `/torrents/<file name less .tar.zst>.torrent` (flag --seed).
    pub archives: Vec<PathBuf>,
    /// TCP port the seed listens on (on the provisioning address only).
    pub listen_port: u16,
    /// Re-announce interval the tracker hands out.
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
    /// A peer silent for this long is dropped from the tracker's lists.
    #[serde(with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// The seed's upload limit in bytes per second; 0 = unlimited.
    pub upload_limit: u32,
    /// Trust the stored piece bitfields on restart (spot check) instead of re-hashing archives.
    pub fastresume: bool,
    /// How long a node keeps seeding after its download at most while it waits for the swarm to
    /// be done (published in `/api/swarm`; `fetch --seed-until-done` uses it).
    #[serde(with = "humantime_serde")]
    pub client_seed_limit: Duration,
    /// Nodes this deployment installs: `/api/swarm/<name>` says done only once this many
    /// distinct peers reported `left == 0`. 0 = unknown: done when every peer heard of is complete.
    /// Also the DHCP starvation guard's burst when larger than `dhcp.new_client_burst` (the nodes
    /// of a rack powered on together are that many new clients at once).
    pub expected_nodes: u32,
    /// How many nodes get the appliance's seed in their peer lists (the first to join, plus any
    /// node that stops making progress); the others download from each other. 0 = every node.
    pub seed_peers: u32,
    /// For this long after joining, a node gets only seeds from the tracker (then a list drawn
    /// from everyone), so the first nodes to join do not fill their connections with each other
    /// and stay a cluster. Applied only when `expected_nodes` is more than 81 (a node's 80
    /// peers and itself: a smaller swarm meets at once). 0s = off.
    #[serde(with = "humantime_serde")]
    pub join_delay: Duration,
    /// Most peers the tracker keeps per image; further new peers are refused (each address
    /// holds at most 4 entries besides).
    pub max_peers: u32,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            enable: true,
            archives: Vec::new(),
            listen_port: 6881,
            announce_interval: Duration::from_secs(15),
            peer_timeout: Duration::from_secs(60),
            upload_limit: 0,
            fastresume: true,
            client_seed_limit: Duration::from_secs(1800),
            expected_nodes: 0,
            seed_peers: 0,
            join_delay: Duration::from_secs(1),
            max_peers: 16_384,
        }
    }
}

/// `[install]`: what the node plans (`GET /api/nodes/<mac>/plan`) tell every installer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstallConfig {
    /// The disk every node installs on (`/dev/vda`); unset: each installer picks its first
    /// non-removable disk large enough.
    pub disk: Option<String>,
    /// What a node does after a good install: `reboot`, `poweroff` or `shell`.
    pub finish: crate::types::node_api::Finish,
    /// How long a node keeps seeding after its install at most, waiting for the swarm to be done.
    #[serde(with = "humantime_serde")]
    pub seed_for: Duration,
    /// Period of the installers' progress reports.
    #[serde(with = "humantime_serde")]
    pub report_every: Duration,
    /// How often installed nodes' update agents ask for an ordered update (`node update`).
    #[serde(with = "humantime_serde")]
    pub update_poll: Duration,
}

impl Default for InstallConfig {
    fn default() -> Self {
        InstallConfig {
            disk: None,
            finish: crate::types::node_api::Finish::Reboot,
            seed_for: Duration::from_secs(600),
            report_every: Duration::from_secs(2),
            update_poll: Duration::from_secs(60),
        }
    }
}

/// `[[profile]]`: what the nodes of one group do after the image is unpacked and configured,
/// before their boot loader: the group's overlay (`<store>/groups/GROUP/overlay/`, laid over the
/// installed tree) and these steps, in order, in the installed system's chroot.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// The group (a reservation's or `node add --group`'s).
    pub group: String,
    /// The steps: `{ script = "NAME" }` (`<store>/scripts/NAME`), `{ packages = [..] }`,
    /// `{ enable = [..] }`.
    #[serde(default)]
    pub steps: Vec<crate::types::node_api::ProfileStep>,
    /// Longest run of one step; a step still running then is killed and fails the node.
    #[serde(with = "humantime_serde", default = "default_step_timeout")]
    pub step_timeout: Duration,
}

fn default_step_timeout() -> Duration {
    Duration::from_secs(600)
}

/// `[monitor]`: the node registry, dashboard, metrics and end-of-run report.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// A node that is not done or failed and made no progress for this long is flagged stuck.
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// How often the aggregate (rates, ETA, phase counts) is sampled, pushed to the dashboard and
    /// kept for the charts.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Bounded queue between the serving paths and the registry; events beyond it are dropped
    /// (and counted), never waited for.
    pub queue_size: usize,
    /// Where end-of-run reports go (one `<timestamp>/` dir each). Default: `<store>/reports`.
    pub report_dir: Option<PathBuf>,
    /// Write the report by itself when every known node is done or failed.
    pub auto_report: bool,
    /// Live summary on a TTY (indicatif) or a log line when something changed.
    pub terminal: bool,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            stuck_after: Duration::from_secs(120),
            sample_interval: Duration::from_secs(1),
            queue_size: 8192,
            report_dir: None,
            auto_report: true,
            terminal: true,
        }
    }
}

/// The whole file, as written (not yet checked): turn it into a [`Config`] with `try_from`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfigFile {
    /// Provisioning interface.
    pub iface: Option<String>,
    /// The image nodes install by default.
    pub image: Option<ImageName>,
    /// Root of the image store (images, overrides, archives, torrents, boot files).
    pub store: PathBuf,
    /// Where the appliance keeps its state (leases, secret).
    pub state_dir: PathBuf,
    /// The appliance's address on the interface. Default: the interface's first IPv4 address.
    pub server_ip: Option<Ipv4Addr>,
    /// Which nodes are installed: `listed` (the reservations and `node add`) or `any`.
    pub enroll: Enroll,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[dhcp]`.
    pub dhcp: DhcpConfig,
    /// `[tftp]`.
    pub tftp: TftpConfig,
    /// `[http]`.
    pub http: HttpConfig,
    /// `[boot]`.
    pub boot: BootConfig,
    /// `[swarm]`.
    pub swarm: SwarmConfig,
    /// `[install]`.
    pub install: InstallConfig,
    /// `[monitor]`.
    pub monitor: MonitorConfig,
    /// `[[profile]]`: one per group.
    #[serde(rename = "profile")]
    pub profiles: Vec<ProfileConfig>,
}

impl Default for ConfigFile {
    fn default() -> Self {
        ConfigFile {
            iface: None,
            image: None,
            store: PathBuf::from("/var/lib/si-appliance"),
            state_dir: PathBuf::from("/var/lib/si-appliance/state"),
            server_ip: None,
            enroll: Enroll::Listed,
            admin: AdminConfig::default(),
            dhcp: DhcpConfig::default(),
            tftp: TftpConfig::default(),
            http: HttpConfig::default(),
            boot: BootConfig::default(),
            swarm: SwarmConfig::default(),
            install: InstallConfig::default(),
            monitor: MonitorConfig::default(),
            profiles: Vec::new(),
        }
    }
}

/// The validated configuration: every rule of [`ConfigFile`]'s keys holds. Read-only: it
/// derefs to the file shape, and the only way in is `Config::try_from(ConfigFile)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Config(ConfigFile);

impl std::ops::Deref for Config {
    type Target = ConfigFile;
    fn deref(&self) -> &ConfigFile {
        &self.0
    }
}

/// Shown as `Config { .. }` with the file's fields (what `check-config` prints).
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shape = if f.alternate() { format!("{:#?}", self.0) } else { format!("{:?}", self.0) };
        f.write_str("Config")?;
        f.write_str(shape.strip_prefix("ConfigFile").unwrap_or(&shape))
    }
}

impl TryFrom<ConfigFile> for Config {
    type Error = ConfigError;

    /// Checks what types alone cannot: ranges inside their subnets, reservations inside a pool
    /// and unique, sane sizes.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    fn try_from(file: ConfigFile) -> Result<Config, ConfigError> {
        file.check()?;
        Ok(Config(file))
    }
}

impl Config {
    /// Parses and checks a TOML text (the file's contents); `path` only labels errors.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for bad TOML, unknown keys or ill-typed values;
    /// [`ConfigError::Invalid`] for values that break a rule.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::try_from(ConfigFile::from_toml(text, path)?)
    }

    /// Reads, parses and checks a file.
    ///
    /// # Errors
    /// As [`Config::from_toml`], plus [`ConfigError::Read`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::try_from(ConfigFile::load(path)?)
    }
}

impl ConfigFile {
    /// Parses a TOML text (the file's contents), unchecked; `path` only labels errors.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for bad TOML, unknown keys or ill-typed values.
    pub fn from_toml(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
    }

    /// Reads and parses a file, unchecked.
    ///
    /// # Errors
    /// As [`ConfigFile::from_toml`], plus [`ConfigError::Read`].
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        ConfigFile::from_toml(&text, path)
    }

    /// The rules of [`Config::try_from`].
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: String, why: String| Err(ConfigError::Invalid { key, why });
        if self.dhcp.lease_time < Duration::from_secs(60) {
            return bad("dhcp.lease_time".into(), "must be at least 60s".into());
        }
        if self.dhcp.lease_time > Duration::from_secs(u32::MAX as u64) {
            return bad("dhcp.lease_time".into(), "too long for DHCP's 32-bit seconds".into());
        }
        if self.dhcp.known_reserve_percent > 100 {
            return bad("dhcp.known_reserve_percent".into(), "must be 0..=100".into());
        }
        for (i, p) in self.dhcp.pools.iter().enumerate() {
            if p.subnet.prefix_len() > 30 {
                return bad(format!("dhcp.pool[{i}].subnet"), format!("{} has no room for clients", p.subnet));
            }
            if let Some([a, b]) = p.range {
                for ip in [a, b] {
                    if !p.subnet.contains(&ip) || ip == p.subnet.network() || ip == p.subnet.broadcast() {
                        return bad(format!("dhcp.pool[{i}].range"), format!("{ip} is not a host address of {}", p.subnet));
                    }
                }
                if u32::from(a) > u32::from(b) {
                    return bad(format!("dhcp.pool[{i}].range"), format!("{a} comes after {b}"));
                }
            }
            for (j, q) in self.dhcp.pools.iter().enumerate().take(i) {
                if p.subnet.contains(&q.subnet.network()) || q.subnet.contains(&p.subnet.network()) {
                    return bad(format!("dhcp.pool[{i}].subnet"), format!("overlaps dhcp.pool[{j}] {}", q.subnet));
                }
            }
        }
        for (i, r) in self.dhcp.reservations.iter().enumerate() {
            if let Some(ip) = r.ip {
                if !self.dhcp.pools.is_empty() && !self.dhcp.pools.iter().any(|p| p.subnet.contains(&ip)) {
                    return bad(format!("dhcp.reservation[{i}].ip"), format!("{ip} is in no dhcp.pool subnet"));
                }
            }
            let e = crate::nodes::Enrol { macs: vec![r.mac], hostname: None, disk: r.disk.clone(), group: r.group.clone() };
            if let Err(e) = crate::nodes::check_enrol(&e) {
                return bad(format!("dhcp.reservation[{i}]"), e.to_string());
            }
            if let Some(h) = &r.hostname {
                let ok = !h.is_empty()
                    && h.len() <= 63
                    && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !h.starts_with('-');
                if !ok {
                    return bad(format!("dhcp.reservation[{i}].hostname"), format!("{h:?} is not a host name label"));
                }
            }
            for (j, s) in self.dhcp.reservations.iter().enumerate().take(i) {
                if s.mac == r.mac {
                    return bad(format!("dhcp.reservation[{i}].mac"), format!("{} is reserved twice (also [{j}])", r.mac));
                }
                if let (Some(a), Some(b)) = (s.ip, r.ip) {
                    if a == b {
                        return bad(format!("dhcp.reservation[{i}].ip"), format!("{a} is reserved twice (also [{j}])"));
                    }
                }
            }
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86400)).contains(&self.install.update_poll) {
            return bad("install.update_poll".into(), "must be within 1s..=1d".into());
        }
        for (i, p) in self.profiles.iter().enumerate() {
            if !crate::types::node_api::is_group_dir_name(&p.group) {
                return bad(format!("profile[{i}].group"), format!("{:?} is not a group name ([A-Za-z0-9._-], not starting with .)", p.group));
            }
            if let Some(j) = self.profiles[..i].iter().position(|q| q.group == p.group) {
                return bad(format!("profile[{i}].group"), format!("group {} has two profiles (also [{j}])", p.group));
            }
            if p.steps.len() > crate::types::node_api::MAX_STEPS {
                return bad(format!("profile[{i}].steps"), format!("at most {} steps", crate::types::node_api::MAX_STEPS));
            }
            for (k, s) in p.steps.iter().enumerate() {
                if let Err(why) = s.validate() {
                    return bad(format!("profile[{i}].steps[{k}]"), why);
                }
            }
            if p.step_timeout < Duration::from_secs(1) {
                return bad(format!("profile[{i}].step_timeout"), "must be at least 1s".into());
            }
        }
        if !(512..=65464).contains(&self.tftp.max_blksize) {
            return bad("tftp.max_blksize".into(), "must be within 512..=65464 (RFC 2348)".into());
        }
        if self.tftp.max_transfers_per_client == 0 || self.tftp.max_transfers < self.tftp.max_transfers_per_client {
            return bad("tftp.max_transfers".into(), "want 1 <= max_transfers_per_client <= max_transfers".into());
        }
        if self.tftp.max_windowsize == 0 {
            return bad("tftp.max_windowsize".into(), "must be at least 1".into());
        }
        if self.tftp.timeout.is_zero() || self.tftp.timeout > Duration::from_secs(255) {
            return bad("tftp.timeout".into(), "must be within 1s..=255s (RFC 2349)".into());
        }
        if self.boot.peer_serve_max == 0 {
            return bad("boot.peer_serve_max".into(), "must be at least 1".into());
        }
        if self.boot.peer_port == 0 {
            return bad("boot.peer_port".into(), "must be 1..=65535".into());
        }
        if self.boot.peer_wait > Duration::from_secs(300) {
            return bad("boot.peer_wait".into(), "must be at most 300s (iPXE holds the request open meanwhile)".into());
        }
        if self.boot.peer_rate_mbit == 0 {
            return bad("boot.peer_rate_mbit".into(), "must be at least 1".into());
        }
        if self.monitor.sample_interval < Duration::from_millis(100) {
            return bad("monitor.sample_interval".into(), "must be at least 100ms".into());
        }
        if self.monitor.queue_size == 0 {
            return bad("monitor.queue_size".into(), "must be at least 1".into());
        }
        if self.swarm.listen_port == 0 {
            return bad("swarm.listen_port".into(), "must be 1..=65535".into());
        }
        if self.swarm.announce_interval < Duration::from_secs(1) {
            return bad("swarm.announce_interval".into(), "must be at least 1s".into());
        }
        if self.swarm.peer_timeout <= self.swarm.announce_interval {
            return bad("swarm.peer_timeout".into(), "must be longer than swarm.announce_interval".into());
        }
        if self.swarm.upload_limit != 0 && self.swarm.upload_limit < 16384 {
            return bad("swarm.upload_limit".into(), "below 16384 B/s librqbit stalls (a block is 16 KiB); 0 = unlimited".into());
        }
        if let Some(d) = &self.install.disk {
            let ok = d.starts_with("/dev/") && d.len() > 5 && !d.split('/').any(|c| c == "..");
            if !ok {
                return bad("install.disk".into(), format!("{d:?} is not a /dev/ path"));
            }
        }
        if self.install.report_every < Duration::from_secs(1) {
            return bad("install.report_every".into(), "must be at least 1s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config/si-appliance.toml");

    #[test]
    fn shipped_example_parses() {
        let c = Config::from_toml(EXAMPLE, Path::new("example")).expect("example config parses");
        assert_eq!(c.dhcp.reservations.len(), 1);
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("", Path::new("x")).unwrap(), Config::try_from(ConfigFile::default()).unwrap());
    }

    /// Like hickory's test_reject_unknown_fields: a bogus key in every table of the shipped
    /// example must be refused, and the error must name it.
    #[test]
    fn unknown_key_in_every_table_is_refused() {
        let mut tables: Vec<usize> = vec![0];
        for (i, line) in EXAMPLE.lines().enumerate() {
            if line.starts_with('[') {
                tables.push(i + 1);
            }
        }
        for after in tables {
            let mut lines: Vec<&str> = EXAMPLE.lines().collect();
            lines.insert(after, "bogus_key_xyz = 1");
            let text = lines.join("\n");
            let err = Config::from_toml(&text, Path::new("x")).unwrap_err().to_string();
            assert!(err.contains("bogus_key_xyz"), "line {after}: {err}");
        }
    }

    #[test]
    fn flags_override_the_file_before_the_one_check() {
        let mut file = ConfigFile::from_toml("iface = \"eth0\"\n[http]\nport = 80\n", Path::new("x")).unwrap();
        let flags = crate::cli::ApplianceFlags { iface: Some("lab0".into()), http_port: Some(8080), ..Default::default() };
        file.apply_flags(&flags).unwrap();
        let cfg = Config::try_from(file).unwrap();
        assert_eq!((cfg.iface.as_deref(), cfg.http.port), (Some("lab0"), 8080));
        // A broken rule in the file is refused whether flags were applied or not.
        let mut bad = ConfigFile::from_toml("[dhcp]\nlease_time = \"5s\"\n", Path::new("x")).unwrap();
        bad.apply_flags(&flags).unwrap();
        assert!(Config::try_from(bad).unwrap_err().to_string().contains("dhcp.lease_time"));
        let bad_flag = crate::cli::ApplianceFlags { image: Some("../etc".into()), ..Default::default() };
        assert!(ConfigFile::default().apply_flags(&bad_flag).unwrap_err().to_string().contains("--image"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[dhcp]\nlease_time = \"soon\"", "lease_time"),
            ("[dhcp]\nmode = \"loud\"", "mode"),
            ("[[dhcp.reservation]]\nmac = \"nope\"\nip = \"10.0.0.5\"", "mac"),
            ("[[dhcp.pool]]\nsubnet = \"10.0.0.0/24\"\nrange = [\"10.0.1.1\", \"10.0.0.9\"]", "dhcp.pool[0].range"),
            ("[[dhcp.pool]]\nsubnet = \"10.0.0.0/24\"\n[[dhcp.reservation]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.9.0.5\"", "dhcp.reservation[0].ip"),
            ("[tftp]\nmax_blksize = 8", "tftp.max_blksize"),
            ("image = \"../etc\"", "image"),
            ("[dhcp]\nlease_time = \"5s\"", "dhcp.lease_time"),
            ("[swarm]\nlisten_port = 0", "swarm.listen_port"),
            ("[boot]\npeer_serve_max = 0", "boot.peer_serve_max"),
            ("[boot]\npeer_port = 0", "boot.peer_port"),
            ("[boot]\npeer_wait = \"10min\"", "boot.peer_wait"),
            ("[swarm]\nannounce_interval = \"30s\"\npeer_timeout = \"10s\"", "swarm.peer_timeout"),
            ("[swarm]\nupload_limit = 100", "swarm.upload_limit"),
            ("[install]\ndisk = \"sda\"", "install.disk"),
            ("[install]\nreport_every = \"10ms\"", "install.report_every"),
            ("[install]\nfinish = \"explode\"", "finish"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text, Path::new("x")).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} -> {err}");
        }
    }
}

impl ConfigFile {
    /// Applies command-line flags over the file's values (before `Config::try_from` checks
    /// them all).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the flag's key when a flag value does not parse.
    pub fn apply_flags(&mut self, f: &crate::cli::ApplianceFlags) -> Result<(), ConfigError> {
        use crate::cli::{AnswerArg, DhcpModeArg};
        if let Some(v) = &f.iface {
            self.iface = Some(v.clone());
        }
        if let Some(v) = &f.image {
            self.image = Some(v.parse().map_err(|e: crate::types::BadImageName| ConfigError::Invalid {
                key: "image (--image)".into(),
                why: e.to_string(),
            })?);
        }
        if let Some(v) = &f.store {
            self.store = v.clone();
        }
        if let Some(v) = &f.state_dir {
            self.state_dir = v.clone();
        }
        if let Some(v) = f.server_ip {
            self.server_ip = Some(v);
        }
        if let Some(v) = f.dhcp_mode {
            self.dhcp.mode = match v {
                DhcpModeArg::Full => DhcpMode::Full,
                DhcpModeArg::Proxy => DhcpMode::Proxy,
                DhcpModeArg::Off => DhcpMode::Off,
            };
        }
        if let Some(v) = f.answer {
            self.dhcp.answer = match v {
                AnswerArg::Pxe => Answer::Pxe,
                AnswerArg::All => Answer::All,
            };
        }
        if f.no_probe {
            self.dhcp.probe = false;
        }
        if let Some(v) = f.http_port {
            self.http.port = v;
        }
        if let Some(v) = f.tftp_port {
            self.tftp.port = v;
        }
        if let Some(v) = &f.kernel {
            self.boot.kernel = Some(v.clone());
        }
        if let Some(v) = &f.initrd {
            self.boot.initrd = Some(v.clone());
        }
        self.swarm.archives.extend(f.seed.iter().cloned());
        Ok(())
    }

    /// Where reports go: `monitor.report_dir` or `<store>/reports`.
    pub fn report_dir(&self) -> PathBuf {
        self.monitor.report_dir.clone().unwrap_or_else(|| self.store.join("reports"))
    }

    /// The client kernel: `boot.kernel` or `<store>/boot/vmlinuz`.
    pub fn kernel_path(&self) -> PathBuf {
        self.boot.kernel.clone().unwrap_or_else(|| self.store.join("boot/vmlinuz"))
    }

    /// The client initramfs: `boot.initrd` or `<store>/boot/initrd.img`.
    pub fn initrd_path(&self) -> PathBuf {
        self.boot.initrd.clone().unwrap_or_else(|| self.store.join("boot/initrd.img"))
    }
}
