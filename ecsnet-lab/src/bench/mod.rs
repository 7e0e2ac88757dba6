//! `ecsnet bench` (SPEC §9): ecsnet against Docker's bridge mode and against the machine's
//! ceiling, on labs of its own, in one run with interleaved rounds; and `bench flow-logs`,
//! iperf3 with flow logging on and off.
//!
//! Every mode gets its own copy of the same lab, built before the first round, so rounds can
//! alternate between modes without reloading anything: `bridge` (Docker's rules, no ecsnet),
//! `ecsnet` (the same lab with ecsnet up) and `ceiling` (no bridge, no netfilter: each task
//! behind a /32 route, `LabSpec::ceiling`). The run is a plan of steps made up front (so the
//! progress line knows the total), executed in order; each step appends one sample.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Serialize, de::DeserializeOwned};

use ecsnet::{
    flowlog,
    paths::InstancePaths,
    state::{IpPermission, PortMapping, Protocol, SecurityGroup, State},
};

use crate::{
    lab::{self, LabSpec, LabStatus, LabTask, Publish},
    progcost::{self, ProgramCost},
    stats,
};

pub mod chart;
pub mod loadgen;

use loadgen::{CrrResult, RrResult};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("iperf3 is not installed: apt-get install iperf3 (./x setup installs it)")]
    NoIperf3,
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
    #[error(transparent)]
    FlowLog(#[from] flowlog::FlowLogError),
    #[error(transparent)]
    Lab(#[from] lab::LabError),
    #[error(transparent)]
    Cost(#[from] progcost::CostError),
    #[error("--rounds and --seconds must be at least 1")]
    Usage,
    #[error("bad --congestion {name:?}: this kernel offers {available}")]
    Congestion { name: String, available: String },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> BenchError {
    let what = what.into();
    move |detail| BenchError::Step { what, detail }
}

// ---------------------------------------------------------------------------------------------
// Labs, servers and the tools that measure.

/// Container ports of the benchmark's servers, published 1:1 on the host.
const IPERF_PORT: u16 = 5201;
/// The labs' TCP congestion control unless `--congestion` says otherwise: Linux's default.
pub const DEFAULT_CONGESTION: &str = "cubic";
const RR_PORT: u16 = 7000;
const CRR_PORT: u16 = 7001;
/// The CPU the request/response client and server share (`loadgen::pin_to` says why).
const RR_CPU: usize = 0;
/// Connection table for the ecsnet mode: the new-connection runs open tens of thousands of
/// flows a second, each held 10 s after its reset (two entries a flow). The kernel sized
/// Docker's nf_conntrack at 262,144 flows on this machine.
const BENCH_CT_SIZE: &str = "524288";

/// The labs of one run, taken down on drop (also on error or panic), with the servers it
/// started.
struct Labs {
    /// The `ecsnet` binary under test.
    ecsnet: PathBuf,
    /// This binary, for the load generator's `bench serve|rr|crr`.
    tool: PathBuf,
    names: Vec<String>,
    /// Instances brought up (their names are their labs' names).
    instances: Vec<String>,
    servers: Vec<Child>,
    /// TCP congestion control of every measuring socket, clients' and servers'.
    congestion: String,
}

impl Labs {
    fn new(congestion: &str) -> Result<Self, BenchError> {
        Ok(Labs {
            ecsnet: ecsnet_binary()?,
            tool: std::env::current_exe()
                .map_err(|e| step("finding the ecsnet-lab binary")(e.to_string()))?,
            names: Vec::new(),
            instances: Vec::new(),
            servers: Vec::new(),
            congestion: congestion.to_owned(),
        })
    }

    fn ecsnet(&self, args: &[&str]) -> Result<String, String> {
        run_for_stdout(&self.ecsnet, args)
    }

    /// `ecsnet-lab --netns NS ARGS` (the load generator) printing one JSON value.
    fn tool_json<T: DeserializeOwned>(&self, ns: &str, args: &[&str]) -> Result<T, BenchError> {
        let mut all = vec!["--netns", ns];
        all.extend_from_slice(args);
        let what = format!("ecsnet-lab {} in {ns}", args.join(" "));
        let out = run_for_stdout(&self.tool, &all).map_err(step(what.clone()))?;
        serde_json::from_str(&out).map_err(|e| step(what)(format!("{e}: {out}")))
    }
    fn lab_up(&mut self, spec: &LabSpec) -> Result<LabStatus, BenchError> {
        // Registered first: a half-built lab is taken down too.
        self.names.push(spec.name.clone());
        Ok(lab::up(spec)?)
    }

    /// Starts `args` in namespace `ns`, kept until the labs go.
    fn spawn(&mut self, ns: &str, args: &[&str]) -> Result<(), BenchError> {
        let child = lab::topology::command(ns, args)?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| step(format!("{} in {ns}", args.join(" ")))(e.to_string()))?;
        self.servers.push(child);
        Ok(())
    }

    /// iperf3 and the rr and crr servers in `ns`; the rr server on `RR_CPU`.
    fn servers_in(&mut self, ns: &str) -> Result<(), BenchError> {
        let exe = self.tool.display().to_string();
        let cc = self.congestion.clone();
        let (rr, crr, cpu) = (
            RR_PORT.to_string(),
            CRR_PORT.to_string(),
            RR_CPU.to_string(),
        );
        self.spawn(ns, &["iperf3", "-s", "-p", &IPERF_PORT.to_string()])?;
        self.spawn(
            ns,
            &[
                &exe,
                "bench",
                "serve",
                "--rr-port",
                &rr,
                "--cpu",
                &cpu,
                "--congestion",
                &cc,
            ],
        )?;
        self.spawn(
            ns,
            &[
                &exe,
                "bench",
                "serve",
                "--crr-port",
                &crr,
                "--congestion",
                &cc,
            ],
        )
    }
}

impl Drop for Labs {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for name in &self.instances {
            let _ = self.ecsnet(&["--instance", name, "down"]);
        }
        for name in &self.names {
            let _ = lab::down(name);
        }
    }
}

/// The `ecsnet` binary the benchmark drives: the one next to this binary (a cargo build puts
/// both in one folder), else the first on PATH.
fn ecsnet_binary() -> Result<PathBuf, BenchError> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("ecsnet")))
        .filter(|p| p.is_file())
        .or_else(|| which::which("ecsnet").ok())
        .ok_or_else(|| {
            step("finding the ecsnet binary")(
                "neither next to ecsnet-lab nor on PATH: cargo build -p ecsnet-userspace".into(),
            )
        })
}

/// Runs `exe ARGS`: its stdout, or its stderr when it fails.
fn run_for_stdout(exe: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(exe)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// One iperf3 run from `ns`, parsed; retried once if the server was not listening yet.
fn iperf3_json(ns: &str, args: &[&str]) -> Result<serde_json::Value, BenchError> {
    let mut all = vec!["iperf3", "-J"];
    all.extend_from_slice(args);
    let what = all.join(" ");
    for attempt in 0..2 {
        let out = lab::topology::command(ns, &all)?
            .output()
            .map_err(|e| step(what.clone())(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            step(what.clone())(format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
        })?;
        match v.get("error") {
            Some(err) if attempt == 0 && err.to_string().contains("refused") => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Some(err) => return Err(step(what)(err.to_string())),
            None => return Ok(v),
        }
    }
    unreachable!("the second attempt returns")
}

const AVAILABLE_CONGESTION: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";

/// Refuses a congestion control the kernel does not offer (loaded or built in), before any
/// lab is built. The measuring sockets set it themselves (TCP_CONGESTION; as root any
/// available one, not only the host's allowed list, and nothing of the host changes).
fn check_congestion(name: &str) -> Result<(), BenchError> {
    let available =
        std::fs::read_to_string(AVAILABLE_CONGESTION).map_err(|source| BenchError::Read {
            path: AVAILABLE_CONGESTION.into(),
            source,
        })?;
    if available.split_whitespace().any(|a| a == name) {
        Ok(())
    } else {
        Err(BenchError::Congestion {
            name: name.to_owned(),
            available: available.trim().to_owned(),
        })
    }
}

/// iperf3 TCP from `ns` to `target`, `streams` parallel streams: bits per second received.
/// `cc` is the senders' congestion control (iperf3 sets it on the server's sockets too).
fn iperf3_tcp(
    ns: &str,
    target: Ipv4Addr,
    seconds: u64,
    streams: u32,
    cc: &str,
) -> Result<f64, BenchError> {
    let (t, secs, p) = (target.to_string(), seconds.to_string(), streams.to_string());
    let port = IPERF_PORT.to_string();
    let v = iperf3_json(
        ns,
        &["-c", &t, "-p", &port, "-t", &secs, "-P", &p, "-C", cc],
    )?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| step(format!("iperf3 -c {t}"))("no received rate".to_owned()))
}

/// Payload of the small UDP datagrams.
const UDP_PAYLOAD: u64 = 64;

/// iperf3 UDP from `ns` to `target`, 64-byte datagrams as fast as the sender can: datagrams
/// per second received.
fn iperf3_udp(ns: &str, target: Ipv4Addr, seconds: u64) -> Result<f64, BenchError> {
    let (t, secs, len) = (
        target.to_string(),
        seconds.to_string(),
        UDP_PAYLOAD.to_string(),
    );
    let port = IPERF_PORT.to_string();
    let v = iperf3_json(
        ns,
        &[
            "-c", &t, "-p", &port, "-t", &secs, "-u", "-b", "0", "-l", &len,
        ],
    )?;
    let r = &v["end"]["sum_received"];
    match (r["bytes"].as_f64(), r["seconds"].as_f64()) {
        (Some(bytes), Some(s)) if s > 0.0 => Ok(bytes / UDP_PAYLOAD as f64 / s),
        _ => Err(step(format!("iperf3 -u -c {t}"))(
            "no received byte count".to_owned(),
        )),
    }
}

/// The median of the samples that are numbers; NaN when none is.
fn median(v: &[f64]) -> f64 {
    stats::median(v).unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// What is measured.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bridge,
    Ecsnet,
    Ceiling,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Bridge, Mode::Ecsnet, Mode::Ceiling];

    fn name(self) -> &'static str {
        match self {
            Mode::Bridge => "bridge",
            Mode::Ecsnet => "ecsnet",
            Mode::Ceiling => "ceiling",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPath {
    TaskToTask,
    Published,
    Outside,
}

impl BenchPath {
    const ALL: [BenchPath; 3] = [
        BenchPath::TaskToTask,
        BenchPath::Published,
        BenchPath::Outside,
    ];

    fn name(self) -> &'static str {
        match self {
            BenchPath::TaskToTask => "task to task",
            BenchPath::Published => "client to published port",
            BenchPath::Outside => "task to outside",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    Tcp1,
    Tcp4,
    UdpSmall,
    RrP50,
    RrP90,
    RrP99,
    RrP999,
    ConnRate,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream",
            Metric::Tcp4 => "TCP 4 streams",
            Metric::UdpSmall => "UDP 64 B datagrams",
            Metric::RrP50 => "request/response p50",
            Metric::RrP90 => "request/response p90",
            Metric::RrP99 => "request/response p99",
            Metric::RrP999 => "request/response p99.9",
            Metric::ConnRate => "new connections",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => "Gbit/s",
            Metric::UdpSmall => "kpkt/s",
            Metric::RrP50 | Metric::RrP90 | Metric::RrP99 | Metric::RrP999 => "us",
            Metric::ConnRate => "conn/s",
        }
    }

    /// Whether more is better (throughput) or less (latency).
    fn higher_is_better(self) -> bool {
        !matches!(
            self,
            Metric::RrP50 | Metric::RrP90 | Metric::RrP99 | Metric::RrP999
        )
    }

    /// A raw sample in the unit shown.
    fn scale(self, raw: f64) -> f64 {
        match self {
            Metric::Tcp1 | Metric::Tcp4 => raw / 1e9,
            Metric::UdpSmall => raw / 1e3,
            Metric::RrP50 | Metric::RrP90 | Metric::RrP99 | Metric::RrP999 => raw / 1e3,
            Metric::ConnRate => raw,
        }
    }
}

/// What one step runs (one tool run, one or more samples).
#[derive(Debug, Clone, Copy)]
enum Probe {
    Tcp(u32),
    Udp,
    Rr,
    Crr,
}

impl Probe {
    fn name(self) -> &'static str {
        match self {
            Probe::Tcp(1) => "TCP 1 stream",
            Probe::Tcp(_) => "TCP 4 streams",
            Probe::Udp => "UDP 64 B",
            Probe::Rr => "request/response",
            Probe::Crr => "new connections",
        }
    }
}

/// The phases of a run, each with its own steps.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The three modes on the three paths.
    Main { path: BenchPath, probe: Probe },
    /// `n` more published ports and rules, bridge and ecsnet, through the published port.
    Scale { n: usize, probe: Probe },
    /// Flow logging on or off in the ecsnet lab, TCP 1 stream.
    FlowLogs { path: BenchPath, on: bool },
}

#[derive(Debug, Clone, Copy)]
struct Step {
    round: usize,
    phase: Phase,
    mode: Mode,
}

// ---------------------------------------------------------------------------------------------
// Options and results.

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub rounds: usize,
    /// Seconds per tool run.
    pub seconds: u64,
    /// Extra published ports and rules of the scaling runs.
    pub scale: Vec<usize>,
    /// BPF_PROG_TEST_RUN repeats per program measurement.
    pub repeat: u32,
    /// Parallel connection loops of the new-connection runs.
    pub crr_threads: usize,
    /// Where the SVG chart goes.
    pub svg: Option<PathBuf>,
    /// Print a progress line on stderr.
    pub progress: bool,
    /// TCP congestion control of every lab namespace.
    pub congestion: String,
}

impl BenchOptions {
    /// The full run: what docs/BENCHMARKS.md reports.
    pub fn full() -> Self {
        BenchOptions {
            rounds: 5,
            seconds: 3,
            scale: vec![1, 100, 1000],
            repeat: 100_000,
            crr_threads: 2,
            svg: None,
            progress: true,
            congestion: DEFAULT_CONGESTION.to_owned(),
        }
    }

    /// `--quick`: every metric once, short runs; proves the benchmark works in under two
    /// minutes, says nothing about speed.
    pub fn quick() -> Self {
        BenchOptions {
            rounds: 1,
            seconds: 1,
            scale: vec![1, 1000],
            repeat: 2_000,
            ..Self::full()
        }
    }
}

/// Medians of one metric on one path (or at one scale) in every mode measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub metric: Metric,
    pub label: String,
    pub unit: &'static str,
    pub path: BenchPath,
    /// The extra published ports and rules of a scaling row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<usize>,
    /// Flow logging of a flow-log row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_logs: Option<bool>,
    pub higher_is_better: bool,
    /// Median per mode, in `unit`.
    pub median: BTreeMap<Mode, f64>,
    /// Every round's sample per mode, in `unit`.
    pub samples: BTreeMap<Mode, Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecsnet_vs_bridge: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecsnet_vs_ceiling: Option<f64>,
}

/// A target of the benchmark issue, checked against this run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub what: String,
    /// "<= 0.75", ">= 1.05" ...
    pub want: String,
    pub got: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    pub rounds: usize,
    pub seconds: u64,
    pub quick: bool,
    /// TCP congestion control of the labs.
    pub congestion: String,
    pub kernel: String,
    pub cpus: usize,
    pub rows: Vec<Row>,
    pub programs: Vec<ProgramCost>,
    pub targets: Vec<Target>,
    /// Failed connection attempts of the new-connection runs, per mode (should be 0).
    pub conn_failures: BTreeMap<Mode, u64>,
    pub wall_seconds: f64,
}

// ---------------------------------------------------------------------------------------------
// The run.

/// Where each mode's lab lives and how to reach each path's server.
struct Rig {
    labs: Labs,
    status: BTreeMap<Mode, LabStatus>,
}

impl Rig {
    /// Namespace the client of `path` runs in, and the server's address.
    fn endpoints(&self, mode: Mode, path: BenchPath) -> (String, Ipv4Addr) {
        let s = &self.status[&mode];
        let task1 = s.tasks[0].netns.clone();
        let task2 = s.tasks[1].address;
        match path {
            BenchPath::TaskToTask => (task1, task2),
            // The ceiling has no published ports: the client reaches the task itself.
            BenchPath::Published if mode == Mode::Ceiling => (s.client.netns.clone(), task2),
            BenchPath::Published => (s.client.netns.clone(), s.host.uplink_address),
            BenchPath::Outside => (task1, s.client.address),
        }
    }
}

/// The lab every mode gets: two tasks; task1 publishes 80 on 8080 (its echo server), task2
/// publishes the benchmark's servers 1:1.
fn lab_spec(name: String, ceiling: bool) -> LabSpec {
    let p = |task, port, protocol| Publish {
        task,
        host_port: port,
        container_port: port,
        protocol,
    };
    LabSpec {
        name,
        tasks: 2,
        publish: vec![
            Publish {
                host_port: 8080,
                container_port: 80,
                ..p(1, 80, Protocol::Tcp)
            },
            p(2, IPERF_PORT, Protocol::Tcp),
            p(2, IPERF_PORT, Protocol::Udp),
            p(2, RR_PORT, Protocol::Tcp),
            p(2, CRR_PORT, Protocol::Tcp),
        ],
        ceiling,
        unserved: vec![IPERF_PORT, RR_PORT, CRR_PORT],
    }
}

fn build_rig(congestion: &str) -> Result<Rig, BenchError> {
    let mut labs = Labs::new(congestion)?;
    let id = std::process::id() % 100_000;
    let mut status = BTreeMap::new();
    for mode in Mode::ALL {
        let name = format!("b{}{id}", &mode.name()[..1]);
        let s = labs.lab_up(&lab_spec(name, mode == Mode::Ceiling))?;
        status.insert(mode, s);
    }
    let e = &status[&Mode::Ecsnet];
    let state = e.state_file.display().to_string();
    labs.instances.push(e.name.clone());
    labs.ecsnet(&[
        "--netns",
        &e.host.netns,
        "--instance",
        &e.name,
        "up",
        "--state",
        &state,
        "--window",
        "1",
        "--ct-size",
        BENCH_CT_SIZE,
    ])
    .map_err(step("ecsnet up"))?;
    for s in status.values() {
        let (task2, client) = (s.tasks[1].netns.clone(), s.client.netns.clone());
        labs.servers_in(&task2)?;
        labs.servers_in(&client)?;
    }
    // The servers bind at once; iperf3 runs retry a refused connection once besides.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Rig { labs, status })
}

/// The steps of a run, in order: each round measures every metric in every mode before the
/// next metric, and the mode that goes first rotates from round to round.
fn plan(o: &BenchOptions) -> Vec<Step> {
    let mut steps = Vec::new();
    let rotate = |modes: &[Mode], round: usize| -> Vec<Mode> {
        let k = round % modes.len();
        modes[k..].iter().chain(&modes[..k]).copied().collect()
    };
    for round in 0..o.rounds {
        for path in BenchPath::ALL {
            let mut probes = vec![Probe::Tcp(1), Probe::Tcp(4), Probe::Udp, Probe::Rr];
            if path == BenchPath::Published {
                probes.push(Probe::Crr);
            }
            for probe in probes {
                for mode in rotate(&Mode::ALL, round) {
                    steps.push(Step {
                        round,
                        phase: Phase::Main { path, probe },
                        mode,
                    });
                }
            }
        }
    }
    for round in 0..o.rounds {
        for &n in &o.scale {
            for probe in [Probe::Rr, Probe::Crr] {
                for mode in rotate(&[Mode::Bridge, Mode::Ecsnet], round) {
                    steps.push(Step {
                        round,
                        phase: Phase::Scale { n, probe },
                        mode,
                    });
                }
            }
        }
    }
    for round in 0..o.rounds {
        for path in [BenchPath::TaskToTask, BenchPath::Published] {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                steps.push(Step {
                    round,
                    phase: Phase::FlowLogs { path, on },
                    mode: Mode::Ecsnet,
                });
            }
        }
    }
    steps
}

/// Samples as they come: (metric, path, scale, flow logs, mode) -> values in raw units.
type Key = (Metric, BenchPath, Option<usize>, Option<bool>);

struct Samples {
    values: BTreeMap<Key, BTreeMap<Mode, Vec<f64>>>,
    conn_failures: BTreeMap<Mode, u64>,
}

impl Samples {
    fn push(&mut self, key: Key, mode: Mode, raw: f64) {
        self.values
            .entry(key)
            .or_default()
            .entry(mode)
            .or_default()
            .push(raw);
    }

    fn push_rr(&mut self, path: BenchPath, scale: Option<usize>, mode: Mode, r: &RrResult) {
        for (m, ns) in [
            (Metric::RrP50, r.p50_ns),
            (Metric::RrP90, r.p90_ns),
            (Metric::RrP99, r.p99_ns),
            (Metric::RrP999, r.p999_ns),
        ] {
            self.push((m, path, scale, None), mode, ns as f64);
        }
    }
}

/// Runs the whole benchmark.
pub fn run(o: &BenchOptions, quick: bool) -> Result<BenchReport, BenchError> {
    if o.rounds == 0 || o.seconds == 0 {
        return Err(BenchError::Usage);
    }
    if which::which("iperf3").is_err() {
        return Err(BenchError::NoIperf3);
    }
    check_congestion(&o.congestion)?;
    let started = Instant::now();
    let progress = Progress::new(o.progress);
    progress.say("building the bridge, ecsnet and ceiling labs");
    let rig = build_rig(&o.congestion)?;
    let steps = plan(o);
    let mut samples = Samples {
        values: BTreeMap::new(),
        conn_failures: BTreeMap::new(),
    };
    let mut scale_now: Option<usize> = None;
    for (i, st) in steps.iter().enumerate() {
        progress.step(i, steps.len(), o.rounds, st);
        match st.phase {
            Phase::Main { path, probe } => {
                if scale_now.is_some() {
                    scale_rules(&rig, None)?;
                    scale_now = None;
                }
                measure(&rig, o, st.mode, path, probe, None, &mut samples)?;
            }
            Phase::Scale { n, probe } => {
                if scale_now != Some(n) {
                    scale_rules(&rig, Some(n))?;
                    scale_now = Some(n);
                }
                measure(
                    &rig,
                    o,
                    st.mode,
                    BenchPath::Published,
                    probe,
                    Some(n),
                    &mut samples,
                )?;
            }
            Phase::FlowLogs { path, on } => {
                if scale_now.is_some() {
                    scale_rules(&rig, None)?;
                    scale_now = None;
                }
                let e = &rig.status[&Mode::Ecsnet];
                let paths = InstancePaths::new(&e.name);
                flowlog::set_enabled(&paths, on)?;
                let (ns, target) = rig.endpoints(Mode::Ecsnet, path);
                let bps = iperf3_tcp(&ns, target, o.seconds, 1, &o.congestion);
                flowlog::set_enabled(&paths, true)?;
                samples.push((Metric::Tcp1, path, None, Some(on)), st.mode, bps?);
            }
        }
    }
    // The labs go first: nothing of theirs runs while the programs are timed.
    drop(rig);
    progress.say("measuring the datapath programs with BPF_PROG_TEST_RUN");
    let programs = progcost::program_cost(o.repeat, o.rounds.max(3))?;
    progress.done();
    let rows = rows(&samples);
    let targets = targets(&rows);
    let report = BenchReport {
        congestion: o.congestion.clone(),
        rounds: o.rounds,
        seconds: o.seconds,
        quick,
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        rows,
        programs,
        targets,
        conn_failures: samples.conn_failures,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(path) = &o.svg {
        std::fs::write(path, svg(&report)).map_err(|source| BenchError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report)
}

/// One step's tool run, its samples appended.
fn measure(
    rig: &Rig,
    o: &BenchOptions,
    mode: Mode,
    path: BenchPath,
    probe: Probe,
    scale: Option<usize>,
    samples: &mut Samples,
) -> Result<(), BenchError> {
    let (ns, target) = rig.endpoints(mode, path);
    let secs = o.seconds.to_string();
    match probe {
        Probe::Tcp(streams) => {
            let m = if streams == 1 {
                Metric::Tcp1
            } else {
                Metric::Tcp4
            };
            let bps = iperf3_tcp(&ns, target, o.seconds, streams, &o.congestion)?;
            samples.push((m, path, scale, None), mode, bps);
        }
        Probe::Udp => {
            let pps = iperf3_udp(&ns, target, o.seconds)?;
            samples.push((Metric::UdpSmall, path, scale, None), mode, pps);
        }
        Probe::Rr => {
            let to = SocketAddr::from((target, RR_PORT)).to_string();
            let r: RrResult = rig.labs.tool_json(
                &ns,
                &[
                    "bench",
                    "rr",
                    "--to",
                    &to,
                    "--seconds",
                    &secs,
                    "--size",
                    "64",
                    "--cpu",
                    &RR_CPU.to_string(),
                    "--congestion",
                    &o.congestion,
                ],
            )?;
            samples.push_rr(path, scale, mode, &r);
        }
        Probe::Crr => {
            let to = SocketAddr::from((target, CRR_PORT)).to_string();
            let threads = o.crr_threads.to_string();
            let r: CrrResult = rig.labs.tool_json(
                &ns,
                &[
                    "bench",
                    "crr",
                    "--to",
                    &to,
                    "--seconds",
                    &secs,
                    "--threads",
                    &threads,
                    "--congestion",
                    &o.congestion,
                ],
            )?;
            *samples.conn_failures.entry(mode).or_default() += r.failures;
            samples.push((Metric::ConnRate, path, scale, None), mode, r.per_second);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scaling: more published ports and security-group rules.

/// First host port and container port of the extra mappings (on task1, nothing listens).
const EXTRA_HOST_PORT: u16 = 20_000;
const EXTRA_CONTAINER_PORT: u16 = 10_000;

/// The lab's tasks with `n` extra published ports on task1.
fn tasks_with_extra_ports(status: &LabStatus, n: usize) -> Vec<LabTask> {
    let mut tasks = status.tasks.clone();
    tasks[0]
        .port_mappings
        .extend((0..n as u16).map(|i| lab::LabPort {
            host_port: EXTRA_HOST_PORT + i,
            container_port: EXTRA_CONTAINER_PORT + i,
            protocol: Protocol::Tcp,
        }));
    tasks
}

/// The ecsnet lab's state with `n` extra published ports on task1 and task2 in a group of `n`
/// inbound rules, one of which lets the client reach the benchmark's servers.
fn scaled_state(status: &LabStatus, n: usize) -> State {
    let mut state = lab::state_for(status);
    state.tasks[0]
        .port_mappings
        .extend((0..n as u16).map(|i| PortMapping {
            container_port: EXTRA_CONTAINER_PORT + i,
            host_port: EXTRA_HOST_PORT + i,
            protocol: Protocol::Tcp,
        }));
    let perm = |proto: &str, from: i32, to: i32, cidr: String| {
        IpPermission::from_cidr(proto, Some((from, to)), cidr)
    };
    let mut inbound = vec![perm(
        "tcp",
        i32::from(RR_PORT),
        i32::from(CRR_PORT),
        "10.10.0.0/24".to_owned(),
    )];
    // The others: single ports from /32s and ranges from /24s elsewhere, as real groups have.
    inbound.extend((1..n).map(|i| {
        let (hi, lo) = ((i / 256) as u8, (i % 256) as u8);
        let port = i32::from(EXTRA_CONTAINER_PORT) + i as i32;
        if i % 2 == 0 {
            perm(
                "tcp",
                port,
                port,
                format!("10.{}.{hi}.{lo}/32", 100 + i % 50),
            )
        } else {
            perm("tcp", port, port + 9, format!("192.168.{lo}.0/24"))
        }
    }));
    let all_out = IpPermission::from_cidr("-1", None, "0.0.0.0/0");
    state.security_groups = vec![SecurityGroup {
        group_id: "sg-0bench00000000001".to_owned(),
        group_name: Some("bench".to_owned()),
        ip_permissions: inbound,
        ip_permissions_egress: vec![all_out],
    }];
    state.tasks[1].security_groups = vec!["sg-0bench00000000001".to_owned()];
    state
}

/// Puts `n` extra published ports (and, for ecsnet, `n` rules) on the bridge and ecsnet labs,
/// or takes them away (`None`). Both hosts get Docker's iptables rules for them: dockerd writes
/// them whether or not ecsnet runs.
fn scale_rules(rig: &Rig, n: Option<usize>) -> Result<(), BenchError> {
    for mode in [Mode::Bridge, Mode::Ecsnet] {
        let s = &rig.status[&mode];
        let tasks = tasks_with_extra_ports(s, n.unwrap_or(0));
        lab::restore_rules(&s.host.netns, &lab::docker_rules(&tasks))?;
    }
    let e = &rig.status[&Mode::Ecsnet];
    let file = match n {
        Some(n) => {
            let file = e.state_file.with_file_name(format!("bench-scale-{n}.json"));
            let text = serde_json::to_string(&scaled_state(e, n)).expect("state serializes");
            std::fs::write(&file, text).map_err(|source| BenchError::Write {
                path: file.clone(),
                source,
            })?;
            file
        }
        None => e.state_file.clone(),
    };
    let f = file.display().to_string();
    rig.labs
        .ecsnet(&["--instance", &e.name, "apply", "-f", &f])
        .map_err(step(format!("ecsnet apply -f {f}")))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Results.

fn rows(samples: &Samples) -> Vec<Row> {
    let mut rows = Vec::new();
    for (&(metric, path, scale, flow_logs), by_mode) in &samples.values {
        let samples: BTreeMap<Mode, Vec<f64>> = by_mode
            .iter()
            .map(|(m, v)| (*m, v.iter().map(|x| metric.scale(*x)).collect()))
            .collect();
        let med: BTreeMap<Mode, f64> = samples.iter().map(|(m, v)| (*m, median(v))).collect();
        let ratio = |other: Mode| {
            let (e, o) = (med.get(&Mode::Ecsnet)?, med.get(&other)?);
            (*o > 0.0).then(|| e / o)
        };
        let mut label = format!("{}, {}", metric.name(), path.name());
        if let Some(n) = scale {
            label = format!("{}, {n} ports and rules", metric.name());
        }
        if let Some(on) = flow_logs {
            label = format!(
                "{}, {}, flow logs {}",
                metric.name(),
                path.name(),
                if on { "on" } else { "off" }
            );
        }
        rows.push(Row {
            metric,
            label,
            unit: metric.unit(),
            path,
            scale,
            flow_logs,
            higher_is_better: metric.higher_is_better(),
            ecsnet_vs_bridge: ratio(Mode::Bridge),
            ecsnet_vs_ceiling: ratio(Mode::Ceiling),
            median: med,
            samples,
        });
    }
    // Main rows first (by path, then metric), then scaling, then flow logs.
    rows.sort_by_key(|r| {
        (
            r.scale.is_some() as u8 + 2 * r.flow_logs.is_some() as u8,
            r.path,
            r.scale,
            r.metric,
            r.flow_logs,
        )
    });
    rows
}

fn find(rows: &[Row], metric: Metric, path: BenchPath, scale: Option<usize>) -> Option<&Row> {
    rows.iter()
        .find(|r| r.metric == metric && r.path == path && r.scale == scale && r.flow_logs.is_none())
}

/// The targets, as this run measured them.
fn targets(rows: &[Row]) -> Vec<Target> {
    let mut out = Vec::new();
    let mut check = |what: String, got: Option<f64>, at_most: bool, bound: f64| {
        let Some(got) = got.filter(|g| g.is_finite()) else {
            return;
        };
        let met = if at_most { got <= bound } else { got >= bound };
        let want = format!("{} {bound:.2}", if at_most { "<=" } else { ">=" });
        out.push(Target {
            what,
            want,
            got,
            met,
        });
    };
    for path in [BenchPath::TaskToTask, BenchPath::Published] {
        let r = |m| find(rows, m, path, None).and_then(|r| r.ecsnet_vs_bridge);
        let p = path.name();
        check(
            format!("latency p50 ecsnet/bridge, {p}"),
            r(Metric::RrP50),
            true,
            0.75,
        );
        check(
            format!("latency p99 ecsnet/bridge, {p}"),
            r(Metric::RrP99),
            true,
            0.85,
        );
    }
    for path in BenchPath::ALL {
        let p = path.name();
        let row = |m| find(rows, m, path, None);
        check(
            format!("TCP 1 stream ecsnet/bridge, {p}"),
            row(Metric::Tcp1).and_then(|r| r.ecsnet_vs_bridge),
            false,
            1.05,
        );
        check(
            format!("TCP 4 streams ecsnet/bridge, {p}"),
            row(Metric::Tcp4).and_then(|r| r.ecsnet_vs_bridge),
            false,
            1.10,
        );
        for m in [Metric::Tcp1, Metric::Tcp4] {
            check(
                format!("{} ecsnet/ceiling, {p}", m.name()),
                row(m).and_then(|r| r.ecsnet_vs_ceiling),
                false,
                0.95,
            );
        }
    }
    check(
        "new connections/s ecsnet/bridge, published port".to_owned(),
        find(rows, Metric::ConnRate, BenchPath::Published, None).and_then(|r| r.ecsnet_vs_bridge),
        false,
        1.3,
    );
    let scales: Vec<usize> = rows.iter().filter_map(|r| r.scale).collect();
    if let (Some(lo), Some(hi)) = (scales.iter().min(), scales.iter().max())
        && lo != hi
    {
        let p50 = |n, mode| {
            find(rows, Metric::RrP50, BenchPath::Published, Some(n))
                .and_then(|r| r.median.get(&mode).copied())
        };
        if let (Some(a), Some(b)) = (p50(*lo, Mode::Ecsnet), p50(*hi, Mode::Ecsnet)) {
            check(
                format!("ecsnet latency p50 growth, {hi} vs {lo} ports and rules"),
                Some(b / a),
                true,
                1.05,
            );
        }
    }
    for path in [BenchPath::TaskToTask, BenchPath::Published] {
        let m = |on| {
            rows.iter()
                .find(|r| r.flow_logs == Some(on) && r.path == path)
                .and_then(|r| r.median.get(&Mode::Ecsnet).copied())
        };
        if let (Some(on), Some(off)) = (m(true), m(false)) {
            check(
                format!("TCP 1 stream flow logs on/off, {}", path.name()),
                Some(on / off),
                false,
                0.97,
            );
        }
    }
    out
}

fn fmt_value(v: Option<&f64>) -> String {
    match v {
        Some(v) if v.is_finite() && *v >= 100.0 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "-".to_owned(),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite())
        .map_or("-".to_owned(), |v| format!("{v:.3}"))
}

/// The table `ecsnet bench` prints.
pub fn render(r: &BenchReport) -> String {
    let mut out = format!(
        "ecsnet bench{}: {} round(s) of {} s per tool run, medians; TCP {}; kernel {}, {} CPUs, {:.0} s\n\n",
        if r.quick {
            " --quick (proves the benchmark runs; too short to judge speed)"
        } else {
            ""
        },
        r.rounds,
        r.seconds,
        r.congestion,
        r.kernel,
        r.cpus,
        r.wall_seconds
    );
    out.push_str(&format!(
        "{:<62} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
        "METRIC", "UNIT", "BRIDGE", "ECSNET", "CEILING", "E/BR", "E/CEIL"
    ));
    for row in &r.rows {
        out.push_str(&format!(
            "{:<62} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8}\n",
            row.label,
            row.unit,
            fmt_value(row.median.get(&Mode::Bridge)),
            fmt_value(row.median.get(&Mode::Ecsnet)),
            fmt_value(row.median.get(&Mode::Ceiling)),
            fmt_ratio(row.ecsnet_vs_bridge),
            fmt_ratio(row.ecsnet_vs_ceiling),
        ));
    }
    if r.conn_failures.values().any(|&n| n > 0) {
        out.push_str(&format!(
            "failed connection attempts: {:?}\n",
            r.conn_failures
        ));
    }
    out.push('\n');
    out.push_str(&progcost::render_programs(&r.programs));
    out.push_str("\nTARGETS (from the benchmark issue)\n");
    for t in &r.targets {
        out.push_str(&format!(
            "{:<62} {:>8} {:>8.3}  {}\n",
            t.what,
            t.want,
            t.got,
            if t.met { "met" } else { "MISSED" }
        ));
    }
    out
}

/// The chart: ecsnet/bridge and ecsnet/ceiling for every main and scaling row, oriented so
/// that more is better for ecsnet (latency ratios are inverted: bridge/ecsnet).
pub fn svg(r: &BenchReport) -> String {
    let flip = |row: &Row, v: Option<f64>| -> f64 {
        match v {
            Some(v) if row.higher_is_better => v,
            Some(v) if v > 0.0 => 1.0 / v,
            _ => f64::NAN,
        }
    };
    let groups = r
        .rows
        .iter()
        .filter(|row| row.flow_logs.is_none())
        .filter(|row| !matches!(row.metric, Metric::RrP90 | Metric::RrP999))
        .map(|row| {
            let mut bars = vec![chart::Bar {
                series: "vs bridge".to_owned(),
                value: flip(row, row.ecsnet_vs_bridge),
            }];
            if row.median.contains_key(&Mode::Ceiling) {
                bars.push(chart::Bar {
                    series: "vs ceiling".to_owned(),
                    value: flip(row, row.ecsnet_vs_ceiling),
                });
            }
            chart::Group {
                label: row.label.clone(),
                bars,
            }
        })
        .collect();
    chart::svg(&chart::Chart {
        title: "ecsnet against Docker bridge mode and the machine's ceiling".to_owned(),
        subtitle: format!(
            "ecsnet bench{}, {} rounds x {} s, medians; kernel {}, {} CPUs",
            if r.quick { " --quick" } else { "" },
            r.rounds,
            r.seconds,
            r.kernel,
            r.cpus
        ),
        axis: "ratio, higher is better for ecsnet (latency: bridge/ecsnet, ceiling/ecsnet)"
            .to_owned(),
        references: vec![(1.0, "= the other mode".to_owned())],
        groups,
    })
}

/// The progress line: rewritten in place on a terminal, a line per step elsewhere.
struct Progress {
    on: bool,
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new(on: bool) -> Self {
        Progress {
            on,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    fn line(&self, text: &str) {
        if !self.on {
            return;
        }
        let mut e = std::io::stderr().lock();
        let elapsed = self.started.elapsed().as_secs();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K[{elapsed:>4} s] {text}");
        } else {
            let _ = writeln!(e, "[{elapsed:>4} s] {text}");
        }
        let _ = e.flush();
    }

    fn say(&self, text: &str) {
        self.line(text);
    }

    fn step(&self, i: usize, total: usize, rounds: usize, st: &Step) {
        let what = match st.phase {
            Phase::Main { path, probe } => format!("{}, {}", probe.name(), path.name()),
            Phase::Scale { n, probe } => format!("{}, {n} ports and rules", probe.name()),
            Phase::FlowLogs { path, on } => format!(
                "TCP 1 stream, {}, flow logs {}",
                path.name(),
                if on { "on" } else { "off" }
            ),
        };
        self.line(&format!(
            "{:>3}/{total} round {}/{rounds} {:<8} {what}",
            i + 1,
            st.round + 1,
            st.mode.name()
        ));
    }

    fn done(&self) {
        if self.on && self.tty {
            eprintln!();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `bench flow-logs`.

/// One path's medians, bits per second.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathResult {
    pub path: String,
    pub off_bps: f64,
    pub on_bps: f64,
    /// on / off.
    pub ratio: f64,
    pub off_rounds: Vec<f64>,
    pub on_rounds: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowLogBench {
    pub rounds: usize,
    pub seconds: u64,
    pub window_secs: u64,
    /// `up --xdp-mode` of the instance measured.
    pub xdp_mode: String,
    /// TCP congestion control of the lab.
    pub congestion: String,
    pub paths: Vec<PathResult>,
}

/// Runs the comparison: `rounds` rounds of `seconds` per mode and path, modes alternating
/// which goes first.
pub fn flow_logs(
    rounds: usize,
    seconds: u64,
    xdp_mode: &str,
    congestion: &str,
) -> Result<FlowLogBench, BenchError> {
    if rounds == 0 || seconds == 0 {
        return Err(BenchError::Usage);
    }
    if which::which("iperf3").is_err() {
        return Err(BenchError::NoIperf3);
    }
    check_congestion(congestion)?;
    const WINDOW: u64 = 1;
    let mut labs = Labs::new(congestion)?;
    let name = format!("bfl{}", std::process::id() % 100_000);
    let s = labs.lab_up(&lab_spec(name.clone(), false))?;
    let state = s.state_file.display().to_string();
    let window = WINDOW.to_string();
    labs.instances.push(name.clone());
    labs.ecsnet(&[
        "--netns",
        &s.host.netns,
        "--instance",
        &name,
        "up",
        "--state",
        &state,
        "--window",
        &window,
        "--xdp-mode",
        xdp_mode,
    ])
    .map_err(step("ecsnet up"))?;
    labs.servers_in(&s.tasks[1].netns)?;
    std::thread::sleep(Duration::from_millis(500));
    let paths = InstancePaths::new(&name);
    let cases = [
        ("task to task", &s.tasks[0].netns, s.tasks[1].address),
        (
            "client to published port",
            &s.client.netns,
            s.host.uplink_address,
        ),
    ];
    let mut results = Vec::new();
    for (path, ns, target) in cases {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for enabled in order {
                flowlog::set_enabled(&paths, enabled)?;
                let bps = iperf3_tcp(ns, target, seconds, 1, congestion)?;
                if enabled { &mut on } else { &mut off }.push(bps);
            }
        }
        flowlog::set_enabled(&paths, true)?;
        let (on_m, off_m) = (median(&on), median(&off));
        results.push(PathResult {
            path: path.to_owned(),
            off_bps: off_m,
            on_bps: on_m,
            ratio: if off_m > 0.0 { on_m / off_m } else { 0.0 },
            off_rounds: off,
            on_rounds: on,
        });
    }
    Ok(FlowLogBench {
        rounds,
        seconds,
        window_secs: WINDOW,
        xdp_mode: xdp_mode.to_owned(),
        congestion: congestion.to_owned(),
        paths: results,
    })
}

/// The table `bench flow-logs` prints.
pub fn render_flow_logs(b: &FlowLogBench) -> String {
    let mut out = format!(
        "iperf3 TCP ({}), 1 stream, {} round(s) of {} s per mode, flow-log window {} s, XDP {}; medians\n",
        b.congestion, b.rounds, b.seconds, b.window_secs, b.xdp_mode
    );
    out.push_str(&format!(
        "{:<26} {:>14} {:>14} {:>8}\n",
        "PATH", "OFF Gbit/s", "ON Gbit/s", "ON/OFF"
    ));
    for p in &b.paths {
        out.push_str(&format!(
            "{:<26} {:>14.2} {:>14.2} {:>8.3}\n",
            p.path,
            p.off_bps / 1e9,
            p.on_bps / 1e9,
            p.ratio
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn the_plan_interleaves_modes_and_covers_every_metric() {
        let o = BenchOptions {
            rounds: 2,
            ..BenchOptions::quick()
        };
        let steps = plan(&o);
        // Per round: 3 paths x 4 probes x 3 modes + crr x 3 modes; scaling 2 x 2 x 2; flow
        // logs 2 paths x 2.
        assert_eq!(steps.len(), 2 * (3 * 4 * 3 + 3 + 2 * 2 * 2 + 2 * 2));
        let first: Vec<Mode> = steps[..3].iter().map(|s| s.mode).collect();
        assert_eq!(first, [Mode::Bridge, Mode::Ecsnet, Mode::Ceiling]);
        let second_round = steps.iter().find(|s| s.round == 1).unwrap();
        assert_eq!(second_round.mode, Mode::Ecsnet, "the first mode rotates");
    }

    #[test]
    fn scaled_state_validates_and_has_n_rules() {
        let status = LabStatus {
            name: "b".into(),
            ceiling: false,
            state_file: "/tmp/x".into(),
            host: lab::LabHost {
                netns: "b-host".into(),
                uplink: "eth0".into(),
                uplink_address: lab::UPLINK_ADDR,
                bridge: "docker0".into(),
                bridge_address: lab::BRIDGE_ADDR,
            },
            client: lab::LabClient {
                netns: "b-client".into(),
                address: lab::CLIENT_ADDR,
                echo_port: 9000,
            },
            tasks: (1..=2)
                .map(|i| LabTask {
                    name: format!("task{i}"),
                    netns: format!("b-task{i}"),
                    address: lab::task_address(i),
                    interface: lab::veth_name("b", i),
                    port_mappings: vec![],
                })
                .collect(),
        };
        let s = scaled_state(&status, 1000);
        ecsnet::state::validate(&s, ecsnet::state::BridgeNet::default())
            .expect("the scaled state is valid");
        assert_eq!(s.security_groups[0].ip_permissions.len(), 1000);
        assert_eq!(s.tasks[0].port_mappings.len(), 1000);
        let rules = lab::docker_rules(&tasks_with_extra_ports(&status, 1000));
        assert_eq!(rules.matches("-j DNAT").count(), 1000);
    }
}
