//! The command line (SPEC §3). Each command checks its input, calls the module that owns the
//! behaviour, and prints; `exit_code` maps errors to 1 or 2.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::{
    agent, bench,
    flowfmt::{Filter, Format},
    flowlog::{self, FlowLogOptions},
    instance,
    instance::{InstanceError, UpOptions},
    lab::{self, LabError, LabSpec},
    loadgen, monitor,
    netns::{self, NetnsError},
    paths::{self, InstancePaths},
    progcost, report,
    state::{self, PortMapping, Protocol, State, Task},
    traffic,
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
    /// The embedded bridge-mode host built in network namespaces.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Benchmark against Docker bridge mode and the machine's ceiling, on labs of its own.
    Bench(BenchArgs),
    /// Run the agent in the foreground (what `up` starts).
    #[command(hide = true)]
    Agent,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: Option<BenchCmd>,
    /// Every metric once with 1-second runs: proves the benchmark works in under two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Rounds per metric and mode; the median is reported [default: 5, --quick 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Seconds per tool run [default: 3, --quick 1].
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Write the chart here (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,
    /// TCP congestion control of every socket the benchmark measures with (iperf3's and its
    /// own clients' and servers'). cubic is Linux's default; bbr
    /// paces with a timer, and on a small VM its throughput measures timer wake-ups more than
    /// the datapath (docs/BENCHMARKS.md).
    #[arg(long, default_value = bench::DEFAULT_CONGESTION)]
    pub congestion: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// iperf3 throughput with flow logging on and off (1 s windows), on a lab of its own.
    FlowLogs {
        /// Rounds per mode and path; modes alternate which goes first. The median is reported.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// XDP on the lab's veth uplink, as `up --xdp-mode`: auto (the default: off on a veth),
        /// native, skb or off.
        #[arg(long, default_value = "auto")]
        xdp_mode: String,
        /// TCP congestion control of iperf3's sockets, as `bench --congestion`.
        #[arg(long, default_value = bench::DEFAULT_CONGESTION)]
        congestion: String,
        #[arg(long)]
        json: bool,
    },
    /// The benchmark's server: echo until the client closes on one port, one reply per
    /// connection on another.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        rr_port: Option<u16>,
        #[arg(long)]
        crr_port: Option<u16>,
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
        /// TCP congestion control of the listening sockets (their connections inherit it).
        #[arg(long)]
        congestion: Option<String>,
    },
    /// Request/response latency on one TCP connection (JSON).
    #[command(hide = true)]
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
        /// TCP congestion control of the connection.
        #[arg(long)]
        congestion: Option<String>,
    },
    /// New connections per second, one round trip each (JSON).
    #[command(hide = true)]
    Crr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// TCP congestion control of the connections.
        #[arg(long)]
        congestion: Option<String>,
    },
    /// Cost of a policy check with 1 rule and with many, from BPF_PROG_TEST_RUN.
    PolicyCost {
        #[arg(long, default_value_t = 10_000)]
        rules: usize,
        #[arg(long, default_value_t = 100)]
        groups: usize,
        /// Runs per measurement (the kernel reports their average).
        #[arg(long, default_value_t = 100_000)]
        repeat: u32,
        /// Measurements per case, alternating 1 rule and many; the median is reported.
        #[arg(long, default_value_t = 15)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
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

#[derive(Debug, Subcommand)]
pub enum LabCmd {
    /// Build the lab.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 2)]
        tasks: usize,
        /// TASK:HOSTPORT:CONTAINERPORT[/tcp|/udp], repeatable; HOSTPORT 0 is dynamic.
        #[arg(long)]
        publish: Vec<String>,
        /// The benchmark's ceiling instead of a bridge-mode host: no bridge and no netfilter,
        /// each task behind a /32 route; clients reach tasks at their own addresses.
        #[arg(long)]
        ceiling: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove the lab and everything in it.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Show the lab.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Echo server a lab task runs (started by `lab up`).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
    /// Send known traffic to an echo server and check every echo.
    Probe {
        #[arg(long, conflicts_with = "udp", required_unless_present = "udp")]
        tcp: Option<SocketAddr>,
        #[arg(long)]
        udp: Option<SocketAddr>,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=65000))]
        size: u64,
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
    #[error("echo check failed: {echoed} of {sent} {proto} messages came back")]
    ProbeLost {
        proto: &'static str,
        echoed: u32,
        sent: u32,
    },
}

/// 2 for bad usage or input, 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<InstanceError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<LabError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<UsageError>() {
            return match e {
                UsageError::ProbeLost { .. } => 1,
                _ => 2,
            };
        }
        if matches!(
            cause.downcast_ref::<crate::bench::BenchError>(),
            Some(crate::bench::BenchError::Usage | crate::bench::BenchError::Congestion { .. })
        ) {
            return 2;
        }
        if cause.downcast_ref::<NetnsError>().is_some()
            || matches!(
                cause.downcast_ref::<progcost::CostError>(),
                Some(progcost::CostError::Usage)
            )
        {
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
    paths::check_name("instance", &cli.instance).map_err(UsageError::BadName)?;
    let inst = InstancePaths::new(&cli.instance);
    // The lab and the benchmark build their own namespaces; the benchmark's helpers (`bench
    // serve`, `rr`, `crr`) run where they are started (`ip netns exec`). Only instance commands
    // follow the instance, without --netns, to where `up` ran (also `up` after a crash).
    let own_netns = matches!(cli.cmd, Cmd::Lab(_) | Cmd::Bench(_));
    let netns = match &cli.netns {
        Some(ns) => Some(ns.clone()),
        None if !own_netns => instance::read_meta(&inst)
            .ok()
            .flatten()
            .and_then(|m| m.netns),
        None => None,
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
            let meta = instance::require_up(&inst)?;
            let tasks = instance::read_applied(&inst)?.map_or(0, |s| s.tasks.len());
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
            instance::require_up(&inst)?;
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
            instance::require_up(&inst)?;
            monitor::follow(&inst, json)?;
        }
        Cmd::Stats { json } => {
            let s = report::stats(&inst)?;
            if json {
                print_json(&s);
            } else {
                print!("{}", report::render(&s));
            }
        }
        Cmd::Lab(l) => lab_cmd_run(l)?,
        Cmd::Bench(b) => bench_cmd_run(b)?,
        Cmd::Agent => agent::run(&inst)?,
    }
    Ok(())
}

fn bench_cmd_run(b: BenchArgs) -> anyhow::Result<()> {
    match b.cmd {
        None => {
            let base = if b.quick {
                bench::BenchOptions::quick()
            } else {
                bench::BenchOptions::full()
            };
            let o = bench::BenchOptions {
                rounds: b.rounds.unwrap_or(base.rounds),
                seconds: b.seconds.unwrap_or(base.seconds),
                svg: b.svg,
                progress: !b.no_progress,
                congestion: b.congestion,
                ..base
            };
            let r = bench::run(&o, b.quick)?;
            if b.json {
                print_json(&r);
            } else {
                print!("{}", bench::render(&r));
            }
        }
        Some(BenchCmd::FlowLogs {
            rounds,
            seconds,
            xdp_mode,
            congestion,
            json,
        }) => {
            let b = bench::flow_logs(rounds, seconds, &xdp_mode, &congestion)?;
            if json {
                print_json(&b);
            } else {
                print!("{}", bench::render_flow_logs(&b));
            }
        }
        Some(BenchCmd::Serve {
            rr_port,
            crr_port,
            cpu,
            congestion,
        }) => {
            if let Some(cpu) = cpu {
                loadgen::pin_to(cpu)?;
            }
            loadgen::serve(rr_port, crr_port, congestion.as_deref())?
        }
        Some(BenchCmd::Rr {
            to,
            seconds,
            size,
            cpu,
            congestion,
        }) => {
            if let Some(cpu) = cpu {
                loadgen::pin_to(cpu)?;
            }
            let r = loadgen::rr(to, seconds, size, congestion.as_deref())?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Some(BenchCmd::Crr {
            to,
            seconds,
            threads,
            congestion,
        }) => {
            let r = loadgen::crr(to, seconds, threads, congestion.as_deref())?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Some(BenchCmd::PolicyCost {
            rules,
            groups,
            repeat,
            rounds,
            json,
        }) => {
            let c = progcost::policy_cost(rules, groups, repeat, rounds)?;
            if json {
                print_json(&c);
            } else {
                print!("{}", progcost::render(&c));
            }
        }
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
    instance::require_up(inst)?;
    Ok(instance::read_applied(inst)?.unwrap_or_default())
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

/// The security groups of an SG file: a state file, the output of
/// `aws ec2 describe-security-groups`, or a bare list.
fn read_sg_file(file: &PathBuf) -> anyhow::Result<(&'static str, Vec<state::SecurityGroup>)> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum SgFile {
        Aws {
            #[serde(rename = "SecurityGroups")]
            security_groups: serde_json::Value,
        },
        State {
            #[serde(rename = "securityGroups")]
            security_groups: serde_json::Value,
        },
        List(serde_json::Value),
    }
    let bad = |error| UsageError::BadFile {
        file: file.display().to_string(),
        error,
    };
    let text = match state::read_limited(file) {
        Ok(t) => t,
        Err(None) => return Err(bad(state::too_large()).into()),
        Err(Some(e)) => {
            return Err(e).with_context(|| format!("cannot read {}", file.display()));
        }
    };
    let value: SgFile = state::parse(&text).map_err(bad)?;
    let (prefix, list) = match value {
        SgFile::Aws { security_groups } => ("$.SecurityGroups", security_groups),
        SgFile::State { security_groups } => ("$.securityGroups", security_groups),
        SgFile::List(v) => ("$", v),
    };
    let groups: Vec<state::SecurityGroup> = state::parse(&list.to_string()).map_err(|mut e| {
        e.path = e.path.replacen('$', prefix, 1);
        bad(e)
    })?;
    Ok((prefix, groups))
}

fn sg_cmd(inst: &InstancePaths, cmd: SgCmd) -> anyhow::Result<()> {
    match cmd {
        SgCmd::Apply { file, reset_flows } => {
            let (prefix, groups) = read_sg_file(&file)?;
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
                            println!("  {dir} {}", crate::policy::describe(p, inbound));
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

fn lab_cmd_run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            name,
            tasks,
            publish,
            ceiling,
            json,
        } => {
            let publish = publish
                .iter()
                .map(|p| lab::parse_publish(p, tasks))
                .collect::<Result<Vec<_>, LabError>>()?;
            let status = lab::up(&LabSpec {
                name,
                tasks,
                publish,
                ceiling,
                ..LabSpec::default()
            })?;
            if json {
                print_json(&status);
            } else {
                print!("{}", lab::render(&status));
            }
        }
        LabCmd::Down { name } => {
            let r = lab::down(&name)?;
            println!(
                "lab {name} down: {} namespace(s) deleted, {} process(es) stopped{}",
                r.namespaces.len(),
                r.killed,
                if r.instances.is_empty() {
                    String::new()
                } else {
                    format!(", instance(s) {} taken down", r.instances.join(", "))
                }
            );
        }
        LabCmd::Status { name, json } => {
            let s = lab::status(&name)?;
            if json {
                print_json(&s);
            } else {
                print!("{}", lab::render(&s));
            }
        }
        LabCmd::Serve { tcp, udp } => traffic::serve(&tcp, &udp)?,
        LabCmd::Probe {
            tcp,
            udp,
            count,
            size,
            json,
        } => {
            let timeout = Duration::from_secs(2);
            let r = match (tcp, udp) {
                (Some(a), _) => traffic::probe_tcp(a, count, size as usize, timeout)?,
                (None, Some(a)) => traffic::probe_udp(a, count, size as usize, timeout)?,
                (None, None) => unreachable!("clap requires one of --tcp and --udp"),
            };
            if json {
                println!("{}", serde_json::to_string(&r).expect("report serializes"));
            } else {
                println!(
                    "{} {}: {} of {} messages of {} bytes echoed, p50 {} us",
                    r.protocol, r.target, r.echoed, r.messages, r.size, r.p50_us
                );
            }
            if r.echoed != r.messages {
                return Err(UsageError::ProbeLost {
                    proto: r.protocol,
                    echoed: r.echoed,
                    sent: r.messages,
                }
                .into());
            }
        }
    }
    Ok(())
}
