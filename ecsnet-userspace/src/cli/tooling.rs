//! `ecsnet lab|bench`: developer tooling that is not shipped, run as the `ecsnet-lab` binary
//! (as git and cargo run external subcommands). Without it both say how to build it.

use std::ffi::OsString;

use crate::cli::edge::Globals;

#[derive(Debug, thiserror::Error)]
#[error(
    "`ecsnet {command}` is developer tooling in the ecsnet-lab binary, which is neither next to \
     ecsnet nor on PATH: build it from ecsnet's repository with `cargo build -p ecsnet-lab`"
)]
pub struct NoTooling {
    command: &'static str,
}

/// Hands `ecsnet lab|bench ARGS` to the `ecsnet-lab` binary, as git and cargo run external
/// subcommands: the one next to this executable, else the first on PATH. Only returns on failure.
pub fn run(command: &'static str, globals: &Globals, args: &[OsString]) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("ecsnet-lab")))
        .filter(|p| p.is_file());
    let Some(tool) = beside.or_else(|| which::which("ecsnet-lab").ok()) else {
        return NoTooling { command }.into();
    };
    let err = std::process::Command::new(&tool)
        .args(globals.args())
        .arg(command)
        .args(args)
        .exec();
    anyhow::Error::new(err).context(format!("cannot run {}", tool.display()))
}
