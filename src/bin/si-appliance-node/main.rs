//! The node build of si-appliance: the same library and command line, with only the subcommands
//! a node runs (install, fetch, boot-peer, update). The clients' initramfs carries this binary as
//! `/usr/sbin/si-appliance`, and the installer copies it into the installed system for the update
//! agent. The appliance's own services (DHCP, TFTP, boot HTTP, tracker, librqbit's seed, the
//! monitor and its reports) are not referenced here, so the linker leaves them out: a smaller
//! boot payload for every node, built from the same compiled library (no second build).

use std::process::ExitCode;

use clap::Parser;
use si_appliance::cli::{Cli, Command};

mod cmds;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmds::init_tracing(cli.verbose, matches!(cli.command, Some(Command::Install(_))));
    let result = match cli.command {
        Some(Command::Install(a)) => cmds::install(a),
        Some(Command::Fetch(a)) => cmds::fetch(a),
        Some(Command::BootPeer(a)) => cmds::boot_peer(a),
        Some(Command::Update(a)) => cmds::update(a),
        _ => Err(anyhow::anyhow!(
            "this is the node build of si-appliance (install, fetch, boot-peer, update only); \
             the appliance and its other subcommands are in the appliance's binary"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("si-appliance: {e:#}");
            ExitCode::FAILURE
        }
    }
}
