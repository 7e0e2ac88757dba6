//! The command line (SPEC §3). Each command checks its input, calls the module that owns the
//! behaviour, and prints; `exit_code` maps errors to 1 or 2.

use std::{ffi::OsString, net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent,
    agent::monitor,
    agent::stats,
    flowlog,
    flowlog::format::{Filter, Format},
    host::netns::{self, NetnsError},
    instance,
    instance::{InstanceError, UpOptions},
    state::{self, PortMapping, Protocol, State, Task, sgfile::SgFileError},
    store::{
        files::{self, FlowLogOptions, StoreError},
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
    #[arg(long, global = true, default_value = "default")]
    pub instance: String,
    /// Operate inside this named network namespace (entered with setns).
    #[arg(long, global = true)]
    pub netns: Option<String>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Load, attach and pin the datapath, then run the agent in the background.
    Up(UpArgs),
    /// Stop the agent, detach and unpin everything.
    Down,
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
    Task(TaskCmd),
    /// Apply or list security groups.
    #[command(subcommand)]
    Sg(SgCmd),
    /// Flow-log records in AWS's VPC Flow Logs format.
    #[command(subcommand)]
    Flows(FlowsCmd),
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
        args: Vec<OsString>,
    },
    /// Benchmark against bridge mode and the ceiling (developer tooling, not shipped).
    ///
    /// Runs `ecsnet-lab bench ...`: the ecsnet-lab binary next to this one, else on PATH. It
    /// is built from ecsnet's repository with `cargo build -p ecsnet-lab`.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Run the agent in the foreground (what `up` starts).
    #[command(hide = true)]
    Agent,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[arg(long)]
    pub uplink: Option<String>,
    #[arg(long)]
    pub bridge: Option<String>,
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Also write flow-log records to this file, in `--flow-format`, rotated.
    #[arg(long)]
    pub flow_log: Option<PathBuf>,
    /// Flow-log capture window, seconds (1 to 600).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub window: u64,
    /// Count flows in the datapath (on) or not at all (off).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub flow_logs: String,
    /// Format of the --flow-log file, AWS syntax: '${srcaddr} ${dstaddr} ${tcp-flags}'; the
    /// default is AWS's version 2 format.
    #[arg(long, default_value = "")]
    pub flow_format: String,
    /// Rotate the --flow-log file past this many bytes.
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1024..))]
    pub flow_log_max_bytes: u64,
    /// Rotated --flow-log files to keep (FILE.1 is the newest).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub flow_log_keep: u32,
    /// Flow table size, entries (flows of one window and the one being exported); when full,
    /// the window's records say SKIPDATA.
    #[arg(long, default_value_t = ecsnet_common::flow::DEFAULT_FLOW_TABLE_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub flow_table_size: u32,
    /// Drop and policy events per second per CPU the datapath may send to `monitor` (0: none);
    /// the rest are counted as suppressed.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub monitor_rate: u32,
    /// Serve Prometheus metrics on this address (in the instance's network namespace), or off.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics: String,
    /// Run the agent in this process instead of the background.
    #[arg(long)]
    pub foreground: bool,
    /// XDP on the uplink: auto (native on a NIC, off on a veth or other virtual uplink),
    /// native (falls back to skb), skb, or off.
    #[arg(long, default_value = "auto")]
    pub xdp_mode: String,
    /// Connection-table size, entries (two per flow); a full table refuses new flows.
    #[arg(long, default_value_t = ecsnet_common::maps::DEFAULT_CT_SIZE,
          value_parser = clap::value_parser!(u32).range(4..=16_777_216))]
    pub ct_size: u32,
    /// Idle timeouts, e.g. `udp=30,tcp-established=3600` (states: tcp-syn, tcp-established,
    /// tcp-closing, tcp-reset, udp, icmp); unnamed states keep their defaults.
    #[arg(long, default_value = "")]
    pub ct_timeouts: String,
}

#[derive(Debug, Subcommand)]
pub enum FlowsCmd {
    /// Print the latest records, and with --follow every record as its window closes.
    Tail {
        #[arg(short, long)]
        follow: bool,
        /// AWS's syntax, e.g. '${version} ${srcaddr} ${dstaddr} ${tcp-flags}'; fields of
        /// versions 2 to 8 (vpc-id, pkt-srcaddr, flow-direction, ecs-task-id, ...). Default:
        /// AWS's version 2 format.
        #[arg(long)]
        format: Option<String>,
        /// JSON lines with the fields of the format (missing values are null).
        #[arg(long)]
        json: bool,
        /// Terms that must all hold, e.g. 'task=web-1 port=80 action=REJECT'; keys: task,
        /// interface, addr, srcaddr, dstaddr, pkt-srcaddr, pkt-dstaddr (address or CIDR), port,
        /// srcport, dstport, proto, action, direction, status; `!=` negates.
        #[arg(long)]
        filter: Option<String>,
        /// How many of the latest matching records to print first: a number, or `all`.
        #[arg(short = 'n', long, default_value = "10")]
        lines: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Add a task (or replace the one with the same name).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        ip: Ipv4Addr,
        #[arg(long)]
        interface: Option<String>,
        /// HOSTPORT:CONTAINERPORT[/tcp|/udp]; HOSTPORT 0 is dynamic.
        #[arg(long)]
        publish: Vec<String>,
        #[arg(long = "sg")]
        security_groups: Vec<String>,
    },
    /// Remove a task by name.
    Rm { name: String },
    /// List tasks with their interfaces and host ports.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SgCmd {
    /// Replace the security groups; accepts `aws ec2 describe-security-groups` output.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Cut tracked flows the new rules no longer allow (by default they live on, as in AWS).
        #[arg(long)]
        reset_flows: bool,
    },
    /// List security groups and their member tasks.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

/// Bad values on the command line that clap cannot check.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{0}")]
    BadName(String),
    #[error("{0}")]
    BadFlag(String),
    #[error("bad --metrics {0:?}: expected ADDRESS:PORT like 127.0.0.1:9464, or off")]
    BadMetrics(String),
    #[error("bad --publish {0:?}: expected HOSTPORT:CONTAINERPORT[/tcp|/udp]")]
    BadPublish(String),
    #[error("no task named {0:?}; `ecsnet task ls` lists them")]
    NoSuchTask(String),
    #[error("{file}: {error}")]
    BadFile {
        file: String,
        error: state::StateError,
    },
    #[error(
        "`ecsnet {command}` is developer tooling in the ecsnet-lab binary, which is neither next to \
         ecsnet nor on PATH: build it from ecsnet's repository with `cargo build -p ecsnet-lab`"
    )]
    NoTooling { command: &'static str },
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
        if let Some(e) = cause.downcast_ref::<SgFileError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<UsageError>() {
            return match e {
                UsageError::NoTooling { .. } => 1,
                _ => 2,
            };
        }
        if cause.downcast_ref::<NetnsError>().is_some() {
            return 2;
        }
    }
    1
}

fn init_logging(verbose: u8, agent: bool) {
    let default = match (verbose, agent) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_target(false)
        .try_init();
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("output serializes")
    );
}

/// Runs one command. `--netns` is entered first, while the process has a single thread.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(
        cli.verbose,
        matches!(
            cli.cmd,
            Cmd::Agent
                | Cmd::Up(UpArgs {
                    foreground: true,
                    ..
                })
        ),
    );
    match &cli.cmd {
        Cmd::Lab { args } => return Err(run_tooling("lab", &cli, args)),
        Cmd::Bench { args } => return Err(run_tooling("bench", &cli, args)),
        _ => {}
    }
    paths::check_name("instance", &cli.instance).map_err(|e| UsageError::BadName(e.to_string()))?;
    let inst = InstancePaths::new(&cli.instance);
    // Instance commands follow the instance, without --netns, to where `up` ran (also `up`
    // after a crash).
    let netns = match &cli.netns {
        Some(ns) => Some(ns.clone()),
        None => files::read_meta(&inst).ok().flatten().and_then(|m| m.netns),
    };
    if let Some(ns) = &netns {
        // `down` must work even when the namespace is already gone.
        match (netns::enter(ns), &cli.cmd) {
            (Ok(()), _) => {}
            (Err(_), Cmd::Down) => {}
            (Err(e), _) => return Err(e.into()),
        }
    }

    match cli.cmd {
        Cmd::Up(a) => {
            let opts = UpOptions {
                netns: netns.clone(),
                uplink: a.uplink,
                bridge: a.bridge,
                state: a.state,
                xdp_mode: a.xdp_mode,
                ct_size: a.ct_size,
                ct_timeouts: a.ct_timeouts,
                flow_table_size: a.flow_table_size,
                flow_logs: FlowLogOptions {
                    enabled: a.flow_logs == "on",
                    window_secs: a.window,
                    sink: a.flow_log,
                    format: a.flow_format,
                    max_bytes: a.flow_log_max_bytes,
                    keep: a.flow_log_keep,
                },
                monitor_rate: a.monitor_rate,
                metrics: match a.metrics.as_str() {
                    "off" => None,
                    m => Some(
                        m.parse()
                            .map_err(|_| UsageError::BadMetrics(m.to_owned()))?,
                    ),
                },
            };
            let pid = instance::up(&inst, &opts, !a.foreground)?;
            let meta = files::require_up(&inst)?;
            let tasks = files::read_applied(&inst)?.map_or(0, |s| s.tasks.len());
            match pid {
                Some(pid) => println!(
                    "ecsnet instance {} up: uplink {} bridge {}, {} task(s), agent pid {pid}",
                    inst.name, meta.uplink, meta.bridge, tasks
                ),
                None => {
                    println!(
                        "ecsnet instance {} up: uplink {} bridge {}, {} task(s), agent in foreground",
                        inst.name, meta.uplink, meta.bridge, tasks
                    );
                    agent::run(&inst)?;
                }
            }
        }
        Cmd::Down => {
            let r = instance::teardown(&inst)?;
            if r.agent_stopped.is_none() && !r.had_pins && !r.had_files {
                println!("ecsnet instance {} was not up; nothing to do", inst.name);
            } else {
                println!("ecsnet instance {} down", inst.name);
            }
        }
        Cmd::Apply { file, reset_flows } => {
            let a = instance::apply(&inst, &file, reset_flows)?;
            println!(
                "applied {}: {} task(s), {} security group(s){}",
                file.display(),
                a.state.tasks.len(),
                a.state.security_groups.len(),
                flows_cut(&a, reset_flows)
            );
        }
        Cmd::Task(t) => task_cmd(&inst, t)?,
        Cmd::Sg(s) => sg_cmd(&inst, s)?,
        Cmd::Flows(FlowsCmd::Tail {
            follow,
            format,
            json,
            filter,
            lines,
        }) => {
            files::require_up(&inst)?;
            let bad = |e: String| UsageError::BadFlag(e);
            let opts = flowlog::TailOptions {
                format: match format {
                    Some(f) => Format::parse(&f).map_err(|e| bad(format!("--format: {e}")))?,
                    None => Format::default_v2(),
                },
                json,
                filter: Filter::parse(filter.as_deref().unwrap_or(""))
                    .map_err(|e| bad(format!("--filter: {e}")))?,
                lines: match lines.as_str() {
                    "all" => None,
                    n => Some(n.parse().map_err(|_| {
                        bad(format!("bad --lines {n:?}: expected a number or `all`"))
                    })?),
                },
                follow,
            };
            flowlog::tail(&inst, &opts)?;
        }
        Cmd::Monitor { json } => {
            files::require_up(&inst)?;
            monitor::follow(&inst, json)?;
        }
        Cmd::Stats { json } => {
            let s = stats::stats(&inst)?;
            if json {
                print_json(&s);
            } else {
                print!("{}", stats::render(&s));
            }
        }
        Cmd::Lab { .. } | Cmd::Bench { .. } => unreachable!("handed to ecsnet-lab above"),
        Cmd::Agent => agent::run(&inst)?,
    }
    Ok(())
}

fn parse_task_publish(s: &str) -> Result<PortMapping, UsageError> {
    let bad = || UsageError::BadPublish(s.to_owned());
    let (ports, protocol) = Protocol::split_suffix(s).map_err(|_| bad())?;
    let (h, c) = ports.split_once(':').ok_or_else(bad)?;
    Ok(PortMapping {
        host_port: h.parse().map_err(|_| bad())?,
        container_port: c.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        protocol,
    })
}

fn flows_cut(a: &instance::Applied, reset_flows: bool) -> String {
    if reset_flows {
        format!("; {} tracked flow(s) no longer allowed cut", a.flows_cut)
    } else {
        String::new()
    }
}

fn current_state(inst: &InstancePaths) -> anyhow::Result<State> {
    files::require_up(inst)?;
    Ok(files::read_applied(inst)?.unwrap_or_default())
}

fn task_cmd(inst: &InstancePaths, cmd: TaskCmd) -> anyhow::Result<()> {
    match cmd {
        TaskCmd::Add {
            name,
            ip,
            interface,
            publish,
            security_groups,
        } => {
            let port_mappings = publish
                .iter()
                .map(|p| parse_task_publish(p))
                .collect::<Result<Vec<_>, _>>()?;
            let lock = instance::lock_apply(inst)?;
            let mut s = current_state(inst)?;
            // A task ecsnet already manages keeps its interface unless one is given: the host
            // may have no neighbour entry to find it by its address again.
            let interface = interface.or_else(|| {
                s.tasks
                    .iter()
                    .find(|t| t.ipv4_address == ip)
                    .and_then(|t| t.interface.clone())
            });
            s.tasks.retain(|t| t.name != name);
            s.tasks.push(Task {
                task_arn: None,
                name: name.clone(),
                ipv4_address: ip,
                interface,
                interface_id: None,
                port_mappings,
                security_groups,
                service_name: None,
                task_definition_arn: None,
                container_id: None,
            });
            let s = instance::apply_state(inst, &lock, s, "task add", false)?.state;
            let t = s
                .tasks
                .iter()
                .find(|t| t.name == name)
                .expect("task was just added");
            println!(
                "task {} {} on {}",
                t.name,
                t.ipv4_address,
                t.interface.as_deref().unwrap_or("-")
            );
        }
        TaskCmd::Rm { name } => {
            let lock = instance::lock_apply(inst)?;
            let mut s = current_state(inst)?;
            let before = s.tasks.len();
            s.tasks.retain(|t| t.name != name);
            if s.tasks.len() == before {
                return Err(UsageError::NoSuchTask(name).into());
            }
            instance::apply_state(inst, &lock, s, "task rm", false)?;
            println!("task {name} removed");
        }
        TaskCmd::Ls { json } => {
            let s = current_state(inst)?;
            if json {
                print_json(&s.tasks);
            } else {
                println!("{:<12} {:<15} {:<15} PORTS", "TASK", "ADDRESS", "INTERFACE");
                for t in &s.tasks {
                    let ports: Vec<String> = t
                        .port_mappings
                        .iter()
                        .map(|p| {
                            format!(
                                "{}->{}/{}",
                                p.host_port,
                                p.container_port,
                                p.protocol.as_str()
                            )
                        })
                        .collect();
                    println!(
                        "{:<12} {:<15} {:<15} {}",
                        t.name,
                        t.ipv4_address,
                        t.interface.as_deref().unwrap_or("-"),
                        ports.join(" ")
                    );
                }
            }
        }
    }
    Ok(())
}

fn sg_cmd(inst: &InstancePaths, cmd: SgCmd) -> anyhow::Result<()> {
    match cmd {
        SgCmd::Apply { file, reset_flows } => {
            let (prefix, groups) = state::sgfile::read(&file)?;
            let lock = instance::lock_apply(inst)?;
            let mut s = current_state(inst)?;
            s.security_groups = groups;
            // Name a bad rule by its path in the file given, not in the state it joins.
            if let Err(mut error) = state::validate(&s, state::BridgeNet::default())
                && let Some(rest) = error.path.strip_prefix("$.securityGroups")
            {
                error.path = format!("{prefix}{rest}");
                return Err(UsageError::BadFile {
                    file: file.display().to_string(),
                    error,
                }
                .into());
            }
            let a =
                instance::apply_state(inst, &lock, s, &file.display().to_string(), reset_flows)?;
            println!(
                "applied {} security group(s){}",
                a.state.security_groups.len(),
                flows_cut(&a, reset_flows)
            );
        }
        SgCmd::Ls { json } => {
            let s = current_state(inst)?;
            let members = |id: &str| -> Vec<String> {
                s.tasks
                    .iter()
                    .filter(|t| t.security_groups.iter().any(|g| g == id))
                    .map(|t| t.name.clone())
                    .collect()
            };
            if json {
                let v: Vec<serde_json::Value> = s
                    .security_groups
                    .iter()
                    .map(|g| serde_json::json!({"group": g, "members": members(&g.group_id)}))
                    .collect();
                print_json(&v);
            } else {
                for g in &s.security_groups {
                    let m = members(&g.group_id);
                    println!(
                        "{} ({}): members: {}",
                        g.group_id,
                        g.group_name.as_deref().unwrap_or("-"),
                        if m.is_empty() {
                            "none".to_owned()
                        } else {
                            m.join(", ")
                        }
                    );
                    for (inbound, perms) in
                        [(true, &g.ip_permissions), (false, &g.ip_permissions_egress)]
                    {
                        let dir = if inbound { "in " } else { "out" };
                        if perms.is_empty() {
                            println!("  {dir} (none)");
                        }
                        for p in perms {
                            println!("  {dir} {}", state::rules::describe(p, inbound));
                        }
                    }
                }
                if s.security_groups.is_empty() {
                    println!("no security groups");
                }
            }
        }
    }
    Ok(())
}

/// Hands `ecsnet lab|bench ARGS` to the `ecsnet-lab` binary, as git and cargo run external
/// subcommands: the one next to this executable, else the first on PATH. Only returns on failure.
fn run_tooling(command: &'static str, cli: &Cli, args: &[OsString]) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("ecsnet-lab")))
        .filter(|p| p.is_file());
    let Some(tool) = beside.or_else(|| which::which("ecsnet-lab").ok()) else {
        return UsageError::NoTooling { command }.into();
    };
    let mut cmd = std::process::Command::new(&tool);
    if let Some(ns) = &cli.netns {
        cmd.args(["--netns", ns]);
    }
    for _ in 0..cli.verbose {
        cmd.arg("-v");
    }
    let err = cmd.arg(command).args(args).exec();
    anyhow::Error::new(err).context(format!("cannot run {}", tool.display()))
}
