//! The binary's edge: parse flags, build the Config, run the chosen role, map errors to an exit
//! code. anyhow lives only here.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use si_appliance::cli::{Cli, Command};
use si_appliance::config::Config;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("si-appliance: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "info,si_appliance=debug",
        _ => "debug,si_appliance=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// `si-appliance fetch`: download through the swarm, then seed; SIGINT/SIGTERM stop it.
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
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    cfg.apply_flags(&cli.appliance)?;
    match cli.command {
        Some(Command::Fetch(a)) => fetch(a),
        Some(Command::CheckConfig) => {
            println!("{cfg:#?}");
            Ok(())
        }
        None => {
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(si_appliance::app::run(cfg))?;
            Ok(())
        }
    }
}
