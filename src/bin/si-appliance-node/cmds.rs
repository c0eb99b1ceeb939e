//! The subcommands a node runs (install, fetch, boot-peer, update): shared by the appliance's
//! binary (`src/main.rs`) and the node build (`main.rs` beside this file), which links only these.

use anyhow::Context;
use tracing_subscriber::EnvFilter;

pub(crate) fn init_tracing(verbose: u8, installer: bool) {
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
pub(crate) fn update(a: si_appliance::cli::UpdateArgs) -> anyhow::Result<()> {
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
        let token = cancel_on_signal();
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

pub(crate) fn fetch(a: si_appliance::cli::FetchArgs) -> anyhow::Result<()> {
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
        let token = cancel_on_signal();
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
pub(crate) fn install(a: si_appliance::cli::InstallArgs) -> anyhow::Result<()> {
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
        let token = cancel_on_signal();
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
pub(crate) fn boot_peer(a: si_appliance::cli::BootPeerArgs) -> anyhow::Result<()> {
    use si_appliance::install::bootpeer::{self, PeerOptions};
    let o = PeerOptions { server: a.server, mac: a.mac.parse().context("--mac")?, token: a.token, dir: a.dir };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async {
        let token = cancel_on_signal();
        bootpeer::run(&o, token, |p| {
            // One machine-readable line on stdout (the tests read it).
            println!("boot-peer-ready port={} kernel_from={} initrd_from={}", p.port, p.origins[0], p.origins[1]);
        })
        .await
    })?;
    Ok(())
}

/// A token cancelled on SIGINT or SIGTERM (call it inside the runtime: it spawns the watcher).
fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        si_appliance::app::shutdown_signal().await;
        t.cancel();
    });
    token
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
