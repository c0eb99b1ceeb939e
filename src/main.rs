//! The binary's edge: parse flags, build the Config, run the chosen role, map errors to an exit
//! code. anyhow lives only here.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use si_appliance::cli::{Cli, Command, ImageAction, PackFlags};
use si_appliance::config::{Config, ConfigFile};

// The node-side subcommands, shared with the node build (src/bin/si-appliance-node).
#[path = "bin/si-appliance-node/cmds.rs"]
mod node_cmds;
use node_cmds::{boot_peer, fetch, init_tracing, install, update};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose, matches!(cli.command, Some(Command::Install(_))));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("si-appliance: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `si-appliance usb …`.
fn usb(action: si_appliance::cli::UsbAction) -> anyhow::Result<()> {
    use si_appliance::cli::UsbAction;
    use si_appliance::usb::{self, AddImage};
    match action {
        UsbAction::AddImage { stick, name, source, default, enroll } => {
            let name = name.parse::<si_appliance::types::ImageName>()?;
            let enroll = enroll
                .iter()
                .map(|e| {
                    let (mac, host) = match e.split_once('=') {
                        Some((m, h)) => (m, Some(h.to_owned())),
                        None => (e.as_str(), None),
                    };
                    Ok((mac.parse().with_context(|| format!("--enroll {e}"))?, host))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let added = usb::add_image(&stick, &name, &source, &AddImage { default, enroll })?;
            let packed = added.archive_bytes.map_or("unchanged".to_owned(), |b| format!("{b} bytes"));
            println!("added {name}: {} entries ({} bytes), archive {} ({packed})", added.entries, added.bytes, added.archive.display());
            Ok(())
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut file = match &cli.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    file.apply_flags(&cli.appliance)?;
    let cfg = Config::try_from(file)?;
    match cli.command {
        Some(Command::Fetch(a)) => fetch(a),
        Some(Command::Install(a)) => install(a),
        Some(Command::BootPeer(a)) => boot_peer(a),
        Some(Command::Update(a)) => update(a),
        Some(Command::CheckConfig) => {
            use std::io::Write;
            // A closed pipe (`check-config | head`) is not an error worth a panic.
            match writeln!(std::io::stdout(), "{cfg:#?}") {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
                _ => Ok(()),
            }
        }
        Some(Command::Image { action }) => {
            // A listing piped into `head` ends quietly, as other Unix tools do. Only for these
            // short-lived commands: the appliance and fetch keep Rust's ignored SIGPIPE.
            // SAFETY: setting a signal disposition to its default before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            run_image(&cfg, action)
        }
        Some(Command::Status(a)) => {
            let addr = a.server.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], cfg.http.port)));
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            let text = rt.block_on(si_appliance::monitor::client::status(addr, a.json))?;
            print!("{text}");
            if a.json {
                println!();
            }
            Ok(())
        }
        Some(Command::Node(a)) => node(&cfg, a),
        Some(Command::Usb { action }) => usb(action),
        Some(Command::Report(a)) => {
            let addr = a.server.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], cfg.http.port)));
            let dir = cfg.report_dir();
            if !a.latest {
                let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
                let token = si_appliance::nodes::http::read_token(&cfg.state_dir).ok();
                match rt.block_on(si_appliance::monitor::client::report(addr, token.as_deref())) {
                    Ok(path) => {
                        println!("{}", path.display());
                        return Ok(());
                    }
                    Err(e) => eprintln!("no report written: {e:#}; the latest one in {}:", dir.display()),
                }
            }
            match si_appliance::monitor::report::latest(&dir) {
                Some(p) => {
                    println!("{}", p.display());
                    Ok(())
                }
                None => anyhow::bail!("no report in {}", dir.display()),
            }
        }
        None => {
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(si_appliance::app::run(cfg))?;
            Ok(())
        }
    }
}

/// `si-appliance node …`: the admin API of a running appliance.
fn node(cfg: &Config, a: si_appliance::cli::NodeArgs) -> anyhow::Result<()> {
    use si_appliance::cli::NodeAction;
    use si_appliance::nodes::{Enrol, Selector, client};
    use si_appliance::types::MacAddr;
    let addr = a.server.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], cfg.http.port)));
    let token = match a.token {
        Some(t) => t,
        None => si_appliance::nodes::http::read_token(&cfg.state_dir).with_context(|| {
            format!("reading the admin token in {} (--state-dir, --token or SI_ADMIN_TOKEN)", cfg.state_dir.display())
        })?,
    };
    let macs = |v: &[String]| -> anyhow::Result<Vec<MacAddr>> {
        v.iter().map(|m| m.parse::<MacAddr>().with_context(|| format!("{m:?} is not a MAC address"))).collect()
    };
    let selector = |w: si_appliance::cli::Which| -> anyhow::Result<Selector> {
        Ok(match (w.all, w.group) {
            (true, _) => Selector::All,
            (false, Some(g)) => Selector::Group(g),
            (false, None) => Selector::Macs(macs(&w.macs)?),
        })
    };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let text = match a.action {
        NodeAction::Add { macs: m, hostname, disk, group } => {
            rt.block_on(client::add(addr, &token, &Enrol { macs: macs(&m)?, hostname, disk, group }))?
        }
        NodeAction::Reimage { which } => rt.block_on(client::reimage(addr, &token, &selector(which)?))?,
        NodeAction::Update { which, profile } => rt.block_on(client::update(addr, &token, &selector(which)?, profile))?,
        NodeAction::List { json } => rt.block_on(client::list(addr, &token, json))?,
        NodeAction::Log { mac } => {
            let mac: MacAddr = mac.parse().with_context(|| format!("{mac:?} is not a MAC address"))?;
            rt.block_on(client::log(addr, &token, mac))?
        }
    };
    print!("{text}");
    Ok(())
}

/// The `image` subcommands: thin calls into `si_appliance::image::store`.
fn run_image(cfg: &Config, action: ImageAction) -> anyhow::Result<()> {
    use si_appliance::image::pack::PackOptions;
    use si_appliance::image::store::{CaptureSource, PackOutcome, SshOptions, Store, TreeKind};
    use si_appliance::image::unpack::{self, UnpackOptions};
    use si_appliance::types::ImageName;

    let store = Store::new(&cfg.store);
    let kind = |o: bool| if o { TreeKind::Override } else { TreeKind::Image };
    let name = |n: &str| n.parse::<ImageName>();
    let pack_opts = |f: &PackFlags| PackOptions {
        zstd_level: (!f.no_compress).then_some(f.level),
        threads: f.threads.unwrap_or_else(|| PackOptions::default().threads),
        ..PackOptions::default()
    };
    let announce = |f: &PackFlags| {
        f.announce.clone().or_else(|| cfg.server_ip.map(|ip| format!("http://{ip}:{}/announce", cfg.http.port)))
    };
    match action {
        ImageAction::List => {
            for t in store.list()? {
                let packed = match (t.archive_bytes, t.entries) {
                    (Some(b), Some(e)) => format!("packed {b} bytes, {e} entries"),
                    _ => "not packed".to_owned(),
                };
                let hash = t.info_hash.as_deref().unwrap_or("-");
                println!("{:<9} {:<24} {packed:<40} info-hash {hash}{}", t.kind, t.name, if t.diff { " +diff" } else { "" });
            }
        }
        ImageAction::Show { name: n, is_override } => {
            let info = store.show(kind(is_override), &name(&n)?)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        ImageAction::Pack { name: n, is_override, pack, force } => {
            let outcome = store.pack(kind(is_override), &name(&n)?, &pack_opts(&pack), announce(&pack).as_deref(), force)?;
            match outcome {
                PackOutcome::Unchanged { archive } => println!("unchanged: {}", archive.display()),
                PackOutcome::Packed { archive, bytes, entries } => println!("packed: {} ({bytes} bytes, {entries} entries)", archive.display()),
            }
        }
        ImageAction::Diff { name: n, is_override, pack } => {
            let d = store.diff(kind(is_override), &name(&n)?, &pack_opts(&pack), announce(&pack).as_deref())?;
            println!("diff: {} ({} bytes, {} changed, {} deleted)", d.archive.display(), d.bytes, d.changed, d.deleted);
        }
        ImageAction::Rm { name: n, is_override, archives_only } => store.rm(kind(is_override), &name(&n)?, archives_only)?,
        ImageAction::Import { name: n, from, is_override } => {
            let r = store.import(kind(is_override), &name(&n)?, &from)?;
            println!("imported {} entries ({} bytes)", r.entries, r.bytes);
        }
        ImageAction::Capture { name: n, from, ssh_identity } => {
            let ssh = SshOptions { identity: ssh_identity, known_hosts: Some(store.root().join("ssh_known_hosts")) };
            store.capture_with(&name(&n)?, &CaptureSource::parse(&from), &ssh)?
        }
        ImageAction::Unpack { archive, to, verify } => {
            // A target that was missing or empty is cleared again when the unpack fails: no
            // partial tree of a refused or broken archive stays behind. A target that held files
            // (a diff unpacked onto its base) keeps what was written, and the error says so.
            let fresh = unpack::is_fresh_target(&to);
            std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
            let manifest = verify.as_deref().map(si_appliance::image::manifest::Manifest::load).transpose()?;
            // Progress against the manifest's file bytes when it describes a full archive.
            let total = manifest.as_ref().filter(|m| m.header.kind == "full").map(|m| m.file_bytes());
            let opts = UnpackOptions { total, ..UnpackOptions::default() };
            let input: Box<dyn std::io::Read + Send> = if archive.as_os_str() == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(std::fs::File::open(&archive).with_context(|| format!("opening {}", archive.display()))?)
            };
            let r = match &manifest {
                Some(m) => unpack::unpack_verified(input, &to, &opts, m),
                None => unpack::unpack(input, &to, &opts),
            };
            let r = match r {
                Ok(r) => r,
                Err(e) if fresh => {
                    unpack::clear_after_failure(&to)?;
                    return Err(anyhow::Error::new(e).context(format!("nothing was left in {}", to.display())));
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("{} held files before: what was unpacked into it stays", to.display())));
                }
            };
            println!("unpacked {} entries ({} bytes, {} deleted){}", r.entries, r.bytes, r.deleted, if manifest.is_some() { ", verified" } else { "" });
        }
    }
    Ok(())
}
