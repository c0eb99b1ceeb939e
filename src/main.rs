//! The binary's edge: parse flags, build the Config, run the chosen role, map errors to an exit
//! code. anyhow lives only here.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use si_appliance::cli::{Cli, Command, ImageAction, PackFlags};
use si_appliance::config::{Config, ConfigFile};
use tracing_subscriber::EnvFilter;

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

fn init_tracing(verbose: u8, installer: bool) {
    let default = match verbose {
        0 => "info",
        1 => "info,si_appliance=debug",
        _ => "debug,si_appliance=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: logs captured to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if installer {
        // The installer's console also goes to the appliance with its reports.
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(si_appliance::install::console::Tee).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    }
}

/// `si-appliance update`: local archive, one question to the appliance, or the agent.
fn update(a: si_appliance::cli::UpdateArgs) -> anyhow::Result<()> {
    use si_appliance::image::manifest::Manifest;
    use si_appliance::update::{self, Excludes};
    let mut x = if a.no_default_excludes { Excludes::default() } else { Excludes::defaults() };
    let local = a.root.join("etc/si-appliance/update.exclude");
    if local.is_file() {
        x.add_file(&local)?;
    }
    for f in &a.exclude_from {
        x.add_file(f)?;
    }
    let (archive, manifest) = match (&a.archive, &a.manifest) {
        (Some(ar), Some(m)) => (ar.clone(), m.clone()),
        _ if a.watch || a.server.is_some() => return update_remote(a, x),
        _ => anyhow::bail!("update: give --archive FILE --manifest FILE (local), --server [IP:PORT] (ask the appliance once) or --watch (the agent)"),
    };
    let target = Manifest::load(&manifest)?;
    if a.dry_run {
        let base = update::installed_manifest(&a.root)?;
        let plan = update::plan(&base, &target, &x)?;
        print_plan(&plan);
        return Ok(());
    }
    let image = match a.image {
        Some(i) => i,
        None => {
            let (json, _) = update::installed_paths(&a.root);
            let bytes = std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?;
            serde_json::from_slice::<update::Installed>(&bytes).with_context(|| format!("parsing {}", json.display()))?.image
        }
    };
    let done = update::apply(&a.root, &image, &archive, &target, &x)?;
    for d in &done.kept_dirs {
        eprintln!("kept {d}: deleted from the image but holds other files");
    }
    println!(
        "update-done added={} changed={} deleted={} excluded={} manifest={}",
        done.plan.added.len(),
        done.plan.changed.len(),
        done.plan.deleted.len(),
        done.plan.excluded.len(),
        done.manifest_sha256
    );
    Ok(())
}

fn print_plan(plan: &si_appliance::update::Plan) {
    print!("{}", plan.lines());
    println!(
        "update-plan added={} changed={} deleted={} excluded={}",
        plan.added.len(),
        plan.changed.len(),
        plan.deleted.len(),
        plan.excluded.len()
    );
}

/// `update --server` / `update --watch`: the node's client of the appliance.
fn update_remote(a: si_appliance::cli::UpdateArgs, excludes: si_appliance::update::Excludes) -> anyhow::Result<()> {
    use si_appliance::update::client::{self, ClientOptions, OneShot};
    let mac = a.mac.as_deref().map(str::parse).transpose().context("--mac")?;
    let creds = client::resolve(&a.root, a.server.flatten(), mac, a.token.clone())?;
    let opts = ClientOptions {
        root: a.root.clone(),
        sys_net: "/sys/class/net".into(),
        iface: a.bind_iface.clone().or_else(|| creds.iface.clone()),
        listen_port: a.port,
        excludes,
        stall_limit: a.stall_limit,
        seed_limit: a.seed_for,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    rt.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            si_appliance::app::shutdown_signal().await;
            t.cancel();
        });
        if a.watch {
            client::watch(&opts, &creds, a.poll, &token).await?;
            return Ok(());
        }
        match client::once(&opts, &creds, a.dry_run, &token).await? {
            OneShot::Idle(why) => println!("update-none {why}"),
            OneShot::DryRun { target, plan, steps } => {
                println!("update-offer image={} name={} kind={:?} bytes={} manifest={}", target.image, target.name, target.kind, target.bytes, target.manifest_sha256);
                print_plan(&plan);
                for s in steps {
                    println!("profile-step {s}");
                }
            }
            OneShot::Done(r) => {
                println!(
                    "update-{} added={} changed={} deleted={} excluded={} fetched={} uploaded={} secs={:.1} steps={} manifest={}",
                    if r.ok { "done" } else { "failed" },
                    r.added,
                    r.changed,
                    r.deleted,
                    r.excluded,
                    r.fetched_bytes,
                    r.uploaded_bytes,
                    r.secs,
                    r.steps.len(),
                    r.manifest_sha256
                );
                if let Some(e) = r.error {
                    anyhow::bail!("{e}");
                }
            }
        }
        Ok(())
    })
}

fn fetch(a: si_appliance::cli::FetchArgs) -> anyhow::Result<()> {
    use si_appliance::swarm::fetch::{self, FetchOptions};
    let opts = FetchOptions {
        server: a.server,
        image: a.name.parse().context("--image")?,
        out: a.out,
        iface: a.bind_iface,
        listen_port: a.port,
        peers: a.peers,
        use_tracker: !a.no_tracker,
        seed_until_done: a.seed_until_done,
        seed_for: a.seed_for,
        progress_every: a.progress_every.max(std::time::Duration::from_millis(100)),
        timeout: a.timeout,
    };
    // One thread: the engine's work is short bursts under one lock, and many fetches share a
    // machine in the benchmark (measured: less CPU per client than the multi-thread runtime).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    let report = rt.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            si_appliance::app::shutdown_signal().await;
            t.cancel();
        });
        fetch::run(&opts, &token).await
    })?;
    // One machine-readable summary line on stdout (the tests and the benchmark read it).
    println!(
        "fetch-done out={} bytes={} download_secs={:.3} seed_secs={:.3} uploaded={} stopped={} cpu_secs={:.2} peak_rss_kib={}",
        report.out.display(),
        report.bytes,
        report.download_secs,
        report.seed_secs,
        report.uploaded_bytes,
        report.stopped_because,
        cpu_secs().unwrap_or(f64::NAN),
        peak_rss_kib().unwrap_or(0)
    );
    Ok(())
}

/// `si-appliance install`: the installer; SIGINT/SIGTERM stop it (the disk is then wiped).
fn install(a: si_appliance::cli::InstallArgs) -> anyhow::Result<()> {
    use si_appliance::install::{self, Options, cmdline};
    let finish = a.finish.as_deref().map(cmdline::parse_finish).transpose().map_err(anyhow::Error::msg).context("--finish")?;
    let disk = a.disk.as_deref().map(cmdline::check_disk).transpose().map_err(anyhow::Error::msg).context("--disk")?;
    let opts = Options {
        cmdline: a.cmdline,
        server: a.server,
        mac: a.mac.as_deref().map(str::parse).transpose().context("--mac")?,
        token: a.token,
        disk,
        finish,
        workdir: a.workdir,
        firmware: a.firmware,
        iface: a.bind_iface,
        listen_port: a.port,
        plan_wait: a.plan_wait,
        stall_limit: a.stall_limit,
        trust_key: a.trust_key,
        allow_unsigned: a.allow_unsigned,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let outcome = rt.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            si_appliance::app::shutdown_signal().await;
            t.cancel();
        });
        install::run(&opts, &token).await
    });
    let o = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("si-appliance install: FAILED: {:#}", anyhow::Error::from(e));
            std::process::exit(1);
        }
    };
    drop(rt);
    let phases: Vec<String> = o.phase_secs.iter().map(|(p, s)| format!("{p}={s:.2}")).collect();
    // One machine-readable summary line on stdout (the tests read it).
    println!(
        "install-done hostname={} disk={} archive_bytes={} uploaded={} seed_stop={} finish={:?} phases={} cpu_secs={:.2} peak_rss_kib={}",
        o.hostname,
        o.disk.display(),
        o.archive_bytes,
        o.uploaded,
        o.seed_stop,
        o.finish,
        phases.join(","),
        cpu_secs().unwrap_or(f64::NAN),
        peak_rss_kib().unwrap_or(0)
    );
    install::finish(o.finish);
    Ok(())
}

/// `si-appliance boot-peer`: the installer's boot-file serving alone, until SIGINT/SIGTERM.
fn boot_peer(a: si_appliance::cli::BootPeerArgs) -> anyhow::Result<()> {
    use si_appliance::install::bootpeer::{self, PeerOptions};
    let o = PeerOptions { server: a.server, mac: a.mac.parse().context("--mac")?, token: a.token, dir: a.dir };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            si_appliance::app::shutdown_signal().await;
            t.cancel();
        });
        bootpeer::run(&o, token, |p| {
            // One machine-readable line on stdout (the tests read it).
            println!("boot-peer-ready port={} kernel_from={} initrd_from={}", p.port, p.origins[0], p.origins[1]);
        })
        .await
    })?;
    Ok(())
}

/// Peak resident set size of this process (VmHWM), KiB.
fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()
}

/// User + system CPU seconds of this process, from /proc/self/stat (USER_HZ = 100 on Linux).
fn cpu_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
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
