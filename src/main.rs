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
    // Colours only on a terminal: logs captured to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    cfg.apply_flags(&cli.appliance)?;
    match cli.command {
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
