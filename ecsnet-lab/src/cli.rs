//! The `ecsnet-lab` command line: `lab ...` and `bench ...`, reached as `ecsnet lab ...` and
//! `ecsnet bench ...` too (the shipped `ecsnet` runs this binary for them). Developer tooling only.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use ecsnet::cli::edge::{Globals, print_json_or};

use crate::{
    bench::{self, loadgen},
    lab::{self, LabError, LabSpec},
    progcost, traffic,
};

#[derive(Debug, Parser)]
#[command(
    name = "ecsnet-lab",
    version,
    about = "ecsnet's developer tooling: the bridge-mode lab and the benchmark (not shipped)"
)]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The embedded bridge-mode host built in network namespaces.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Benchmark against Docker bridge mode and the machine's ceiling, on labs of its own.
    Bench(BenchArgs),
    /// The lab, ecsnet up, known traffic, counters checked, teardown (`./x demo`).
    Demo {
        /// Leave the lab and ecsnet up and print how to look around.
        #[arg(long)]
        keep: bool,
    },
    /// Random and mutated frames through the ingress programs (`BPF_PROG_TEST_RUN`), each
    /// compared with a model of them: verdict, output bytes, maps (docs/FUZZING.md). Exits 1
    /// on any disagreement.
    Fuzz {
        /// How many packets (whole episodes of one to six).
        #[arg(long, default_value_t = 100_000)]
        packets: u64,
        /// The run's seed [default: a random one, printed].
        #[arg(long)]
        seed: Option<u64>,
        /// Only the episode of this seed, as a disagreement's report names it.
        #[arg(long)]
        replay: Option<u64>,
    },
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
    /// Address families measured: ipv4, ipv6 or both (the labs dual stack, Docker's NAT66;
    /// scaling and flow-log runs are IPv4's only).
    #[arg(long, value_enum, default_value_t = bench::Families::Both)]
    pub family: bench::Families,
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
    /// How long a container started with `docker run` waits for its own policy: from its
    /// veth on docker0, Docker's start event and `docker run` returning, on a real-engine lab
    /// of its own with `ecsnet up --docker`.
    Discovery {
        /// Containers started, one after the other.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        runs: u32,
        /// Namespace tasks plugged into dockerd's docker0 and configured in the state file,
        /// so every apply carries them beside the containers (at most 1000).
        #[arg(long, default_value_t = 0)]
        load_tasks: usize,
        /// Flows seeded into the connection table before the runs (as `bench scale` does).
        #[arg(long, default_value_t = 0)]
        load_flows: usize,
        #[arg(long)]
        json: bool,
    },
    /// A lab of many tasks with many flows seeded into the connection table: apply times,
    /// the agent's memory and CPU, `stats` and `flows tail` latency, empty and loaded.
    Scale {
        #[arg(long, default_value_t = bench::scale::DEFAULT_TASKS)]
        tasks: usize,
        #[arg(long, default_value_t = bench::scale::DEFAULT_FLOWS)]
        flows: usize,
        /// Also write the report here (JSON), e.g. docs/bench-scale.json.
        #[arg(long)]
        out: Option<PathBuf>,
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
        /// Listen on `[::]` too (IPv6 only), beside 0.0.0.0.
        #[arg(long)]
        ipv6: bool,
    },
    /// Request/response latency on one TCP connection (JSON).
    #[command(hide = true)]
    Rr {
        #[command(flatten)]
        client: loadgen::Client,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// New connections per second, one round trip each (JSON).
    #[command(hide = true)]
    Crr {
        #[command(flatten)]
        client: loadgen::Client,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Cost of a policy check with 1 rule and with many, over IPv4 and over IPv6, from
    /// `BPF_PROG_TEST_RUN`.
    PolicyCost {
        /// Rules of each family (IPv4 and IPv6) in the many-rule copy.
        #[arg(long, default_value_t = 10_000)]
        rules: usize,
        /// Groups the rules of each family are spread over.
        #[arg(long, default_value_t = 100)]
        groups: usize,
        /// Runs per measurement (the kernel reports their average).
        #[arg(long, default_value_t = 100_000)]
        repeat: u32,
        /// Measurements per case, alternating between the copies (1 rule, many, and for IPv6
        /// one rule per prefix length); the median is reported.
        #[arg(long, default_value_t = 15)]
        rounds: usize,
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
        #[arg(long, conflicts_with = "docker")]
        ceiling: bool,
        /// A real Docker engine (Debian's dockerd 20.10, in the host namespace, with folders of
        /// its own) makes docker0 and runs the tasks as containers with ECS labels.
        #[arg(long)]
        docker: bool,
        /// dockerd's userland-proxy (Docker's default: true); with --docker.
        #[arg(long, requires = "docker", default_value_t = true, action = clap::ArgAction::Set)]
        userland_proxy: bool,
        /// Dual stack: unique local IPv6 addresses on the uplink, docker0 and every task. nat
        /// (bare --ipv6): Docker 20.10's NAT66 with ip6tables; routed: Docker 27's routed
        /// gateway mode, no NAT66 (imitation only, not with --docker).
        #[arg(long, value_name = "nat|routed", num_args = 0..=1, default_missing_value = "nat")]
        ipv6: Option<String>,
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
        /// NETNS/PROTO/PORT, repeatable: serve that port in that namespace too.
        #[arg(long)]
        at: Vec<String>,
    },
    /// Send known traffic to an echo server and check every echo (ADDR:PORT, [ADDR6]:PORT).
    Probe {
        #[arg(long, conflicts_with = "udp", required_unless_present = "udp")]
        tcp: Option<SocketAddr>,
        #[arg(long)]
        udp: Option<SocketAddr>,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=65000))]
        size: u16,
        #[arg(long)]
        json: bool,
    },
}

/// What the lab's commands find wrong that clap cannot check.
#[derive(Debug, thiserror::Error)]
pub enum LabCliError {
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
        if let Some(e) = cause.downcast_ref::<LabError>() {
            return e.exit_code();
        }
        if matches!(
            cause.downcast_ref::<bench::BenchError>(),
            Some(bench::BenchError::Usage | bench::BenchError::Congestion { .. })
        ) || cause
            .downcast_ref::<ecsnet::host::netns::NetnsError>()
            .is_some()
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

/// Runs one command. `--netns` is entered first, while the process has a single thread.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    cli.globals.init_logging(false);
    if let Some(ns) = &cli.globals.netns {
        ecsnet::host::netns::enter(ns)?;
    }
    match cli.cmd {
        Cmd::Lab(l) => lab_cmd_run(l),
        Cmd::Bench(b) => bench_cmd_run(b),
        Cmd::Demo { keep } => crate::demo::run(keep),
        Cmd::Fuzz {
            packets,
            seed,
            replay,
        } => fuzz_cmd_run(packets, seed, replay),
    }
}

fn fuzz_cmd_run(packets: u64, seed: Option<u64>, replay: Option<u64>) -> anyhow::Result<()> {
    let seed = seed.unwrap_or_else(crate::fuzz::run::random_seed);
    println!("fuzz: seed {seed}");
    let s = crate::fuzz::run::run(crate::fuzz::run::Plan {
        packets,
        seed,
        replay,
        progress: Some(Duration::from_secs(10)),
    })?;
    print!("{}", crate::fuzz::run::render(&s));
    if s.disagreements > 0 {
        anyhow::bail!(
            "{} of {} episodes disagree with the model (seed {seed})",
            s.disagreements,
            s.episodes
        );
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
                families: b.family,
                ..base
            };
            let r = bench::run(&o, b.quick)?;
            print_json_or(b.json, &r, bench::render);
        }
        Some(BenchCmd::FlowLogs {
            rounds,
            seconds,
            xdp_mode,
            congestion,
            json,
        }) => {
            let b = bench::flow_logs(rounds, seconds, &xdp_mode, &congestion)?;
            print_json_or(json, &b, bench::render_flow_logs);
        }
        Some(BenchCmd::Discovery {
            runs,
            load_tasks,
            load_flows,
            json,
        }) => {
            let load = bench::DiscoveryLoad {
                tasks: load_tasks,
                flows: load_flows,
            };
            let b = bench::discovery(runs as usize, load)?;
            print_json_or(json, &b, bench::render_discovery);
        }
        Some(BenchCmd::Scale {
            tasks,
            flows,
            out,
            json,
        }) => {
            let b = bench::scale(tasks, flows)?;
            if let Some(path) = out {
                std::fs::write(&path, serde_json::to_string_pretty(&b)? + "\n").map_err(
                    |source| bench::BenchError::Write {
                        path: path.clone(),
                        source,
                    },
                )?;
            }
            print_json_or(json, &b, bench::render_scale);
        }
        Some(BenchCmd::Serve {
            rr_port,
            crr_port,
            cpu,
            congestion,
            ipv6,
        }) => {
            if let Some(cpu) = cpu {
                loadgen::pin_to(cpu)?;
            }
            loadgen::serve(rr_port, crr_port, congestion.as_deref(), ipv6)?;
        }
        Some(BenchCmd::Rr { client, size, cpu }) => {
            if let Some(cpu) = cpu {
                loadgen::pin_to(cpu)?;
            }
            let r = loadgen::rr(&client, size)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Some(BenchCmd::Crr { client, threads }) => {
            let r = loadgen::crr(&client, threads)?;
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
            print_json_or(json, &c, progcost::render);
        }
    }
    Ok(())
}

/// Prints a lab's status; a real-engine lab's with its `docker` object.
fn print_status(name: &str, json: bool, status: &lab::LabStatus) -> anyhow::Result<()> {
    match lab::docker_status(name)? {
        Some(e) => print_json_or(json, &e, lab::engine::render),
        None => print_json_or(json, status, lab::render),
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
            docker,
            userland_proxy,
            ipv6,
            json,
        } => {
            let ipv6 = ipv6.map(|m| m.parse::<lab::Ipv6Mode>()).transpose()?;
            let publish = publish
                .iter()
                .map(|p| lab::parse_publish(p, tasks))
                .collect::<Result<Vec<_>, LabError>>()?;
            let spec = LabSpec {
                name: name.clone(),
                tasks,
                publish,
                ceiling,
                ipv6,
                ..LabSpec::default()
            };
            let engine = docker.then_some(lab::EngineOptions { userland_proxy });
            let status = lab::up_with(&spec, engine)?;
            print_status(&name, json, &status)?;
        }
        LabCmd::Down { name } => {
            let r = lab::down(&name)?;
            println!(
                "lab {name} down: {} namespace(s) deleted, {} process(es) stopped{}{}",
                r.namespaces.len(),
                r.killed,
                if r.instances.is_empty() {
                    String::new()
                } else {
                    format!(", instance(s) {} taken down", r.instances.join(", "))
                },
                if r.unmounted + r.removed.len() == 0 {
                    String::new()
                } else {
                    format!(
                        ", {} mount(s) undone, {} path(s) removed outside the lab's folder",
                        r.unmounted,
                        r.removed.len()
                    )
                }
            );
        }
        LabCmd::Status { name, json } => {
            let s = lab::status(&name)?;
            print_status(&name, json, &s)?;
        }
        LabCmd::Serve { tcp, udp, at } => {
            traffic::serve(&tcp, &udp, &traffic::parse_elsewhere(&at)?)?;
        }
        LabCmd::Probe {
            tcp,
            udp,
            count,
            size,
            json,
        } => {
            let probe = traffic::Probe {
                messages: count,
                size: usize::from(size),
                timeout: Duration::from_secs(2),
            };
            let r = match (tcp, udp) {
                (Some(a), _) => probe.tcp(a)?,
                (None, Some(a)) => probe.udp(a)?,
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
                return Err(LabCliError::ProbeLost {
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
