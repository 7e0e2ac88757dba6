//! The command line (SPEC §3): `Cli` and its commands, one file per family (`instance`: up,
//! down, apply; `task`; `sg`; `flows`; `observe`: stats, monitor; `tooling`: lab and bench,
//! handed to ecsnet-lab). Every value is typed by clap; `exit_code` maps errors to 1 or 2, and
//! `edge` turns them into one line.

pub mod edge;
mod flows;
mod instance;
mod observe;
mod sg;
pub(crate) mod task;
mod tooling;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use edge::{print_json, print_json_or};

use crate::{
    agent::stats::StatsError,
    host::netns::{self, NetnsError},
    instance::InstanceError,
    state::{self, sgfile::SgFileError},
    store::{
        files::{self, StoreError},
        paths::{self, InstancePaths},
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "ecsnet",
    version,
    about = "awsvpc-like isolation, NAT and flow logs for Docker bridge-mode hosts, in eBPF"
)]
pub struct Cli {
    /// Name of this copy of ecsnet; several can run on one machine.
    #[arg(long, global = true, default_value = "default", value_parser = instance_name)]
    pub instance: String,
    #[command(flatten)]
    pub globals: edge::Globals,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Load, attach and pin the datapath, then run the agent in the background.
    Up(instance::UpArgs),
    /// Stop the agent, detach and unpin everything.
    Down,
    /// Replace the running datapath's programs with this build's in place (keeping its maps,
    /// links and flows) and restart the agent on this binary; `up` over a running instance of
    /// another build does the same. Refuses, changing nothing, when a map's layout changed.
    Upgrade,
    /// Make the live state equal to a state file (atomic).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Cut tracked flows the new security groups no longer allow (by default they live on,
        /// as in AWS).
        #[arg(long)]
        reset_flows: bool,
    },
    /// Add, remove or list tasks.
    #[command(subcommand)]
    Task(task::TaskCmd),
    /// Apply or list security groups.
    #[command(subcommand)]
    Sg(sg::SgCmd),
    /// Flow-log records in AWS's VPC Flow Logs format.
    #[command(subcommand)]
    Flows(flows::FlowsCmd),
    /// The flows the connection tables track now, IPv4 and IPv6.
    Conns(flows::ConnsArgs),
    /// Live drop and security-group verdict events, rate-limited in the datapath.
    Monitor {
        #[arg(long)]
        json: bool,
    },
    /// Per-task packets, bytes and drops.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The bridge-mode lab host in network namespaces (developer tooling, not shipped).
    ///
    /// Runs `ecsnet-lab lab ...`: the ecsnet-lab binary next to this one, else on PATH. It is
    /// built from ecsnet's repository with `cargo build -p ecsnet-lab`.
    #[command(disable_help_flag = true)]
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Benchmark against bridge mode and the ceiling (developer tooling, not shipped).
    ///
    /// Runs `ecsnet-lab bench ...`: the ecsnet-lab binary next to this one, else on PATH. It
    /// is built from ecsnet's repository with `cargo build -p ecsnet-lab`.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run the agent in the foreground (what `up` starts).
    #[command(hide = true)]
    Agent,
}

/// `keyword` (None) or a `T`: `--metrics off`, `--lines all`.
fn or_keyword<T: std::str::FromStr>(keyword: &str, s: &str) -> Result<Option<T>, T::Err> {
    if s == keyword {
        Ok(None)
    } else {
        s.parse().map(Some)
    }
}

/// `--instance`: a name `paths` accepts.
fn instance_name(name: &str) -> Result<String, String> {
    paths::check_name("instance", name)
        .map(|()| name.to_owned())
        .map_err(|e| e.to_string())
}

/// Bad input that only shows once a command runs.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("no task named {name:?}; `ecsnet task ls` lists them")]
    NoSuchTask { name: String },
    #[error(
        "task {name:?} comes from the Docker engine (container {container}); stop or remove the container, or give a state-file task of that name, which wins"
    )]
    EngineTask { name: String, container: String },
    #[error("{file}: {error}")]
    BadFile {
        file: String,
        error: state::StateError,
    },
}

/// 2 for bad usage or input, 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<InstanceError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<StatsError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<SgFileError>() {
            return e.exit_code();
        }
        if cause.is::<UsageError>() || cause.is::<NetnsError>() {
            return 2;
        }
    }
    1
}

/// Runs one command. `--netns` is entered first, while the process has a single thread.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runs_agent = match &cli.cmd {
        Cmd::Agent => true,
        Cmd::Up(a) => a.foreground,
        _ => false,
    };
    cli.globals.init_logging(runs_agent);
    match &cli.cmd {
        Cmd::Lab { args } => return Err(tooling::run("lab", &cli.globals, args)),
        Cmd::Bench { args } => return Err(tooling::run("bench", &cli.globals, args)),
        _ => {}
    }
    let paths = InstancePaths::new(&cli.instance);
    // Instance commands follow the instance, without --netns, to where `up` ran (also `up`
    // after a crash).
    let netns = cli.globals.netns.clone().or_else(|| {
        files::read_meta(&paths)
            .ok()
            .flatten()
            .and_then(|m| m.netns)
    });
    if let Some(ns) = &netns
        && let Err(e) = netns::enter(ns)
        // `down` must work even when the namespace is already gone.
        && !matches!(cli.cmd, Cmd::Down)
    {
        return Err(e.into());
    }
    match cli.cmd {
        Cmd::Up(a) => instance::up(&paths, a, netns)?,
        Cmd::Down => instance::down(&paths)?,
        Cmd::Upgrade => instance::upgrade(&paths)?,
        Cmd::Apply { file, reset_flows } => instance::apply(&paths, &file, reset_flows)?,
        Cmd::Task(t) => task::run(&paths, t)?,
        Cmd::Sg(s) => sg::run(&paths, s)?,
        Cmd::Flows(f) => flows::run(&paths, f)?,
        Cmd::Conns(c) => flows::conns(&paths, &c)?,
        Cmd::Monitor { json } => observe::monitor(&paths, json)?,
        Cmd::Stats { json } => observe::stats(&paths, json)?,
        Cmd::Agent => crate::agent::run(&paths)?,
        Cmd::Lab { .. } | Cmd::Bench { .. } => unreachable!("handed to ecsnet-lab above"),
    }
    Ok(())
}
