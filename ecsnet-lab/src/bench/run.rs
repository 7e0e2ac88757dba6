//! One benchmark run: the labs built, the plan's steps measured in order (each appends its
//! samples), the programs timed once the labs are gone, and the report made.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use ecsnet::{
    flowlog,
    state::{IpPermission, PortFamily, PortMapping, Protocol, SecurityGroup, State},
    store::paths::InstancePaths,
};

use super::{
    BenchError, BenchOptions,
    loadgen::{self, CrrResult, RrResult},
    plan::{BenchPath, Family, Metric, Mode, Phase, Probe, Step, plan},
    preflight,
    report::{BenchReport, Key, rows, svg, targets},
    step,
    tools::{CRR_PORT, Labs, RR_CPU, RR_PORT, endpoints, iperf3_tcp, iperf3_udp},
};
use crate::{
    lab::{self, LabStatus, LabTask},
    progcost,
};

/// Connection table for the ecsnet mode: the new-connection runs open tens of thousands of
/// flows a second, each held 10 s after its reset (two entries a flow). The kernel sized
/// Docker's `nf_conntrack` at 262,144 flows on this machine.
const BENCH_CT_SIZE: &str = "524288";
/// How long the servers get to bind before the first round.
pub(super) const SERVERS_START: Duration = Duration::from_millis(500);

/// Every mode's lab, built before the first round so rounds can alternate between modes
/// without reloading anything: `bridge` (Docker's rules, no ecsnet), `ecsnet` (the same lab
/// with ecsnet up) and `ceiling` (no bridge, no netfilter: `LabSpec::ceiling`). With `ipv6`,
/// each is dual stack: Docker's NAT66 in bridge and ecsnet, routes in the ceiling.
struct Rig {
    labs: Labs,
    status: BTreeMap<Mode, LabStatus>,
}

impl Rig {
    fn build(congestion: &str, ipv6: bool) -> Result<Rig, BenchError> {
        let mut labs = Labs::new(congestion)?;
        let id = std::process::id() % 100_000;
        let mut status = BTreeMap::new();
        for mode in Mode::ALL {
            let name = format!("b{}{id}", &mode.name()[..1]);
            status.insert(mode, labs.lab_up(name, mode == Mode::Ceiling, ipv6)?);
        }
        labs.ecsnet_up(&status[&Mode::Ecsnet], &["--ct-size", BENCH_CT_SIZE])?;
        for s in status.values() {
            labs.servers_in(&s.tasks[1].netns, ipv6)?;
            labs.servers_in(&s.client.netns, ipv6)?;
        }
        // The servers bind at once; iperf3 runs retry a refused connection once besides.
        std::thread::sleep(SERVERS_START);
        Ok(Rig { labs, status })
    }

    /// Namespace the client of `path` runs in, and the server's address in `family`.
    fn endpoints(
        &self,
        mode: Mode,
        path: BenchPath,
        family: Family,
    ) -> Result<(String, IpAddr), BenchError> {
        endpoints(&self.status[&mode], mode, path, family)
    }
}

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

    #[expect(
        clippy::cast_precision_loss,
        reason = "round trips in nanoseconds are far below 2^52"
    )]
    fn push_rr(&mut self, at: &At, mode: Mode, r: &RrResult) {
        for (m, ns) in [
            (Metric::RrP50, r.p50_ns),
            (Metric::RrP90, r.p90_ns),
            (Metric::RrP99, r.p99_ns),
            (Metric::RrP999, r.p999_ns),
        ] {
            self.push(at.key(m), mode, ns as f64);
        }
    }
}

/// Where a main or scaling step measures: its path, family and scale.
struct At {
    path: BenchPath,
    family: Family,
    scale: Option<usize>,
}

impl At {
    fn key(&self, m: Metric) -> Key {
        (m, self.path, self.family, self.scale, None)
    }
}

/// Runs the whole benchmark.
pub fn run(o: &BenchOptions, quick: bool) -> Result<BenchReport, BenchError> {
    preflight(o.rounds, o.seconds, &o.congestion)?;
    let started = Instant::now();
    let progress = Progress::new(o.progress);
    progress.say("building the bridge, ecsnet and ceiling labs");
    let rig = Rig::build(&o.congestion, o.families.has(Family::Ipv6))?;
    let steps = plan(o);
    let mut samples = Samples {
        values: BTreeMap::new(),
        conn_failures: BTreeMap::new(),
    };
    let mut scale_now: Option<usize> = None;
    for (i, st) in steps.iter().enumerate() {
        progress.step(i, steps.len(), o.rounds, st);
        let scale = match st.phase {
            Phase::Scale { n, .. } => Some(n),
            Phase::Main { .. } | Phase::FlowLogs { .. } => None,
        };
        if scale_now != scale {
            scale_rules(&rig, scale)?;
            scale_now = scale;
        }
        match st.phase {
            Phase::Main {
                family,
                path,
                probe,
            } => {
                let at = At {
                    path,
                    family,
                    scale: None,
                };
                measure(&rig, o, st.mode, &at, probe, &mut samples)?;
            }
            Phase::Scale { n, probe } => {
                let at = At {
                    path: BenchPath::Published,
                    family: Family::Ipv4,
                    scale: Some(n),
                };
                measure(&rig, o, st.mode, &at, probe, &mut samples)?;
            }
            Phase::FlowLogs { path, on } => {
                let e = &rig.status[&Mode::Ecsnet];
                let paths = InstancePaths::new(&e.name);
                flowlog::set_enabled(&paths, on)?;
                let (ns, target) = rig.endpoints(Mode::Ecsnet, path, Family::Ipv4)?;
                let bps = iperf3_tcp(&ns, target, o.seconds, 1, &o.congestion);
                flowlog::set_enabled(&paths, true)?;
                let key = (Metric::Tcp1, path, Family::Ipv4, None, Some(on));
                samples.push(key, st.mode, bps?);
            }
        }
    }
    // The labs go first: nothing of theirs runs while the programs are timed.
    drop(rig);
    progress.say("measuring the datapath programs with BPF_PROG_TEST_RUN");
    let programs = progcost::program_cost(o.repeat, o.rounds.max(3))?;
    progress.done();
    let rows = rows(&samples.values);
    let targets = targets(&rows);
    let report = BenchReport {
        congestion: o.congestion.clone(),
        families: o.families.list().to_vec(),
        rounds: o.rounds,
        seconds: o.seconds,
        quick,
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
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

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// One step's tool run, its samples appended.
fn measure(
    rig: &Rig,
    o: &BenchOptions,
    mode: Mode,
    at: &At,
    probe: Probe,
    samples: &mut Samples,
) -> Result<(), BenchError> {
    let (ns, target) = rig.endpoints(mode, at.path, at.family)?;
    // `bench rr|crr`, the client's arguments and `extra`, against `port` of the target.
    let client_args = |command: &str, port: u16, extra: &[String]| -> Vec<String> {
        let client = loadgen::Client {
            to: SocketAddr::from((target, port)),
            seconds: o.seconds,
            congestion: Some(o.congestion.clone()),
        };
        ["bench", command]
            .map(str::to_owned)
            .into_iter()
            .chain(client.args())
            .chain(extra.iter().cloned())
            .collect()
    };
    match probe {
        Probe::Tcp(streams) => {
            let m = if streams == 1 {
                Metric::Tcp1
            } else {
                Metric::Tcp4
            };
            let bps = iperf3_tcp(&ns, target, o.seconds, streams, &o.congestion)?;
            samples.push(at.key(m), mode, bps);
        }
        Probe::Udp => {
            let pps = iperf3_udp(&ns, target, o.seconds)?;
            samples.push(at.key(Metric::UdpSmall), mode, pps);
        }
        Probe::Rr => {
            let extra = [
                "--size".into(),
                "64".into(),
                "--cpu".into(),
                RR_CPU.to_string(),
            ];
            let args = client_args("rr", RR_PORT, &extra);
            let r: RrResult = rig.labs.tool_json(&ns, &strs(&args))?;
            samples.push_rr(at, mode, &r);
        }
        Probe::Crr => {
            let extra = ["--threads".into(), o.crr_threads.to_string()];
            let args = client_args("crr", CRR_PORT, &extra);
            let r: CrrResult = rig.labs.tool_json(&ns, &strs(&args))?;
            *samples.conn_failures.entry(mode).or_default() += r.failures;
            samples.push(at.key(Metric::ConnRate), mode, r.per_second);
        }
    }
    Ok(())
}

/// First host port and container port of the extra mappings (on task1, nothing listens).
const EXTRA_HOST_PORT: u16 = 20_000;
const EXTRA_CONTAINER_PORT: u16 = 10_000;

/// The `n` extra mappings' (host port, container port), all TCP.
fn extra_ports(n: usize) -> impl Iterator<Item = (u16, u16)> {
    let n = u16::try_from(n).expect("fewer extra ports than ports");
    (0..n).map(|i| (EXTRA_HOST_PORT + i, EXTRA_CONTAINER_PORT + i))
}

/// The lab's tasks with `n` extra published ports on task1.
fn tasks_with_extra_ports(status: &LabStatus, n: usize) -> Vec<LabTask> {
    let mut tasks = status.tasks.clone();
    tasks[0].port_mappings.extend(
        extra_ports(n).map(|(host_port, container_port)| lab::LabPort {
            host_port,
            container_port,
            protocol: Protocol::Tcp,
        }),
    );
    tasks
}

/// The ecsnet lab's state with `n` extra published ports on task1 and task2 in a group of `n`
/// inbound rules, one of which lets the client reach the benchmark's servers.
fn scaled_state(status: &LabStatus, n: usize) -> State {
    let mut state = lab::state_for(status);
    state.tasks[0]
        .port_mappings
        .extend(
            extra_ports(n).map(|(host_port, container_port)| PortMapping {
                container_port,
                host_port,
                protocol: Protocol::Tcp,
                host_ip: PortFamily::Both,
            }),
        );
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
    let n = u16::try_from(n).expect("fewer rules than ports");
    inbound.extend((1..n).map(|i| {
        let [hi, lo] = i.to_be_bytes();
        let port = i32::from(EXTRA_CONTAINER_PORT) + i32::from(i);
        if i.is_multiple_of(2) {
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
            Phase::Main {
                family: Family::Ipv4,
                path,
                probe,
            } => format!("{}, {}", probe.name(), path.name()),
            Phase::Main { path, probe, .. } => {
                format!("{}, {}, IPv6", probe.name(), path.name())
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_state_validates_and_has_n_rules() {
        let status = LabStatus {
            name: "b".into(),
            ceiling: false,
            ipv6: None,
            state_file: "/tmp/x".into(),
            host: lab::LabHost {
                netns: "b-host".into(),
                uplink: "eth0".into(),
                uplink_address: lab::UPLINK_ADDR,
                bridge: "docker0".into(),
                bridge_address: lab::BRIDGE_ADDR,
                uplink_address6: None,
                bridge_address6: None,
            },
            client: lab::LabClient {
                netns: "b-client".into(),
                address: lab::CLIENT_ADDR,
                address6: None,
                echo_port: 9000,
            },
            tasks: (1..=2)
                .map(|i| LabTask {
                    name: format!("task{i}"),
                    netns: format!("b-task{i}"),
                    address: lab::task_address(i),
                    address6: None,
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
