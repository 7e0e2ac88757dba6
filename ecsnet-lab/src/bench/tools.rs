//! The benchmark's labs with their servers and instances (taken down on drop), and the tools
//! that measure: iperf3 in a namespace, the load generator, the ecsnet binary under test.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde::de::DeserializeOwned;

use ecsnet::state::Protocol;

use super::{
    BenchError,
    plan::{BenchPath, Family, Mode},
    step,
};
use crate::lab::{self, Ipv6Mode, LabSpec, LabStatus, Publish};

/// Container ports of the benchmark's servers, published 1:1 on the host.
pub(super) const IPERF_PORT: u16 = 5201;
pub(super) const RR_PORT: u16 = 7000;
pub(super) const CRR_PORT: u16 = 7001;
/// The CPU the request/response client and server share (`loadgen::pin_to` says why).
pub(super) const RR_CPU: usize = 0;
/// Flow-log window of every instance the benchmark brings up, seconds.
pub(super) const WINDOW_SECS: u64 = 1;

/// The labs of one run, taken down on drop (also on error or panic), with the servers it
/// started.
pub(super) struct Labs {
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
    pub(super) fn new(congestion: &str) -> Result<Self, BenchError> {
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

    pub(super) fn ecsnet(&self, args: &[&str]) -> Result<String, String> {
        run_for_stdout(&self.ecsnet, args)
    }

    /// `ecsnet-lab --netns NS ARGS` (the load generator) printing one JSON value.
    pub(super) fn tool_json<T: DeserializeOwned>(
        &self,
        ns: &str,
        args: &[&str],
    ) -> Result<T, BenchError> {
        let mut all = vec!["--netns", ns];
        all.extend_from_slice(args);
        let what = format!("ecsnet-lab {} in {ns}", args.join(" "));
        let out = run_for_stdout(&self.tool, &all).map_err(step(what.clone()))?;
        serde_json::from_str(&out).map_err(|e| step(what)(format!("{e}: {out}")))
    }

    /// The benchmark's lab (`lab_spec`), registered first so a half-built one goes too;
    /// dual stack with `ipv6`.
    pub(super) fn lab_up(
        &mut self,
        name: String,
        ceiling: bool,
        ipv6: bool,
    ) -> Result<LabStatus, BenchError> {
        self.names.push(name.clone());
        Ok(lab::up(&lab_spec(name, ceiling, ipv6))?)
    }

    /// A lab of `spec`, registered first so a half-built one goes too.
    pub(super) fn lab_up_spec(&mut self, spec: &LabSpec) -> Result<LabStatus, BenchError> {
        self.names.push(spec.name.clone());
        Ok(lab::up(spec)?)
    }

    /// A real-engine lab of one task (Docker's defaults: userland proxy on), registered first
    /// so a half-built one goes too.
    pub(super) fn engine_lab_up(&mut self, name: String) -> Result<LabStatus, BenchError> {
        self.names.push(name.clone());
        let spec = LabSpec {
            name,
            tasks: 1,
            ..LabSpec::default()
        };
        Ok(lab::up_with(&spec, Some(lab::EngineOptions::default()))?)
    }

    /// ecsnet up on `lab`'s host with the lab's state file, flow-log windows of
    /// `WINDOW_SECS` and `extra` flags; it goes down with the labs.
    pub(super) fn ecsnet_up(&mut self, lab: &LabStatus, extra: &[&str]) -> Result<(), BenchError> {
        let window = WINDOW_SECS.to_string();
        let mut args = vec!["--window", window.as_str()];
        args.extend_from_slice(extra);
        self.ecsnet_up_with(lab, &args)
    }

    /// ecsnet up on `lab`'s host with the lab's state file and `extra` flags only; it goes
    /// down with the labs.
    pub(super) fn ecsnet_up_with(
        &mut self,
        lab: &LabStatus,
        extra: &[&str],
    ) -> Result<(), BenchError> {
        let state = lab.state_file.display().to_string();
        let mut args = vec!["--netns", &lab.host.netns, "--instance", &lab.name, "up"];
        args.extend(["--state", &state]);
        args.extend_from_slice(extra);
        self.instances.push(lab.name.clone());
        self.ecsnet(&args).map(drop).map_err(step("ecsnet up"))
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

    /// iperf3 and the rr and crr servers in `ns`; the rr server on `RR_CPU`. iperf3 listens
    /// on `[::]` for both families; with `ipv6`, the rr and crr servers listen on `[::]` too,
    /// beside 0.0.0.0 (so IPv4 meets the same sockets with or without IPv6).
    pub(super) fn servers_in(&mut self, ns: &str, ipv6: bool) -> Result<(), BenchError> {
        let exe = self.tool.display().to_string();
        let cc = self.congestion.clone();
        let (rr, crr, cpu) = (
            RR_PORT.to_string(),
            CRR_PORT.to_string(),
            RR_CPU.to_string(),
        );
        self.spawn(ns, &["iperf3", "-s", "-p", &IPERF_PORT.to_string()])?;
        let v6: &[&str] = if ipv6 { &["--ipv6"] } else { &[] };
        let serve = [exe.as_str(), "bench", "serve", "--congestion", &cc];
        let rr_args = [&serve[..], &["--rr-port", &rr, "--cpu", &cpu], v6].concat();
        self.spawn(ns, &rr_args)?;
        let crr_args = [&serve[..], &["--crr-port", &crr], v6].concat();
        self.spawn(ns, &crr_args)
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

/// The lab every mode gets: two tasks; task1 publishes 80 on 8080 (its echo server), task2
/// publishes the benchmark's servers 1:1. With `ipv6`, dual stack: Docker's NAT66 on a
/// bridge-mode host (`lab up --ipv6 nat`), plain routes in the ceiling (`--ipv6 routed`).
fn lab_spec(name: String, ceiling: bool, ipv6: bool) -> LabSpec {
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
        ipv6: ipv6.then_some(if ceiling {
            Ipv6Mode::Routed
        } else {
            Ipv6Mode::Nat
        }),
    }
}

/// In `mode`'s lab `lab`: the namespace the client of `path` runs in, and the server's address
/// in `family` (IPv6: task2's address in `fixed-cidr-v6`, the uplink's and the client's
/// IPv6 addresses). A lab built without IPv6 has no IPv6 endpoints: an error.
pub(super) fn endpoints(
    lab: &LabStatus,
    mode: Mode,
    path: BenchPath,
    family: Family,
) -> Result<(String, IpAddr), BenchError> {
    let task1 = lab.tasks[0].netns.clone();
    let (task2, uplink, client) = match family {
        Family::Ipv4 => (
            Some(lab.tasks[1].address.into()),
            Some(lab.host.uplink_address.into()),
            Some(lab.client.address.into()),
        ),
        Family::Ipv6 => (
            lab.tasks[1].address6.map(IpAddr::from),
            lab.host.uplink_address6.map(IpAddr::from),
            lab.client.address6.map(IpAddr::from),
        ),
    };
    let (ns, to) = match path {
        BenchPath::TaskToTask => (task1, task2),
        // The ceiling has no published ports: the client reaches the task itself.
        BenchPath::Published if mode == Mode::Ceiling => (lab.client.netns.clone(), task2),
        BenchPath::Published => (lab.client.netns.clone(), uplink),
        BenchPath::Outside => (task1, client),
    };
    let to = to.ok_or_else(|| {
        step(format!("{} over IPv6 in lab {}", path.name(), lab.name))(
            "the lab has no IPv6 (built without --ipv6)".to_owned(),
        )
    })?;
    Ok((ns, to))
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
/// lab is built. The measuring sockets set it themselves (`TCP_CONGESTION`; as root any
/// available one, not only the host's allowed list, and nothing of the host changes).
pub(super) fn check_congestion(name: &str) -> Result<(), BenchError> {
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
pub(super) fn iperf3_tcp(
    ns: &str,
    target: IpAddr,
    seconds: u64,
    streams: u32,
    cc: &str,
) -> Result<f64, BenchError> {
    let (t, secs, p) = (target.to_string(), seconds.to_string(), streams.to_string());
    let port = IPERF_PORT.to_string();
    let args = ["-c", &t, "-p", &port, "-t", &secs, "-P", &p, "-C", cc];
    let v = iperf3_json(ns, &[&args[..], family_flag(target)].concat())?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| step(format!("iperf3 -c {t}"))("no received rate".to_owned()))
}

/// iperf3's `-6` for an IPv6 target (it would find the family by itself; said, so a run's
/// arguments show it), nothing for IPv4.
fn family_flag(target: IpAddr) -> &'static [&'static str] {
    if target.is_ipv6() { &["-6"] } else { &[] }
}

/// Payload of the small UDP datagrams.
const UDP_PAYLOAD: u16 = 64;

/// iperf3 UDP from `ns` to `target`, 64-byte datagrams as fast as the sender can: datagrams
/// per second received.
pub(super) fn iperf3_udp(ns: &str, target: IpAddr, seconds: u64) -> Result<f64, BenchError> {
    let (t, secs, len) = (
        target.to_string(),
        seconds.to_string(),
        UDP_PAYLOAD.to_string(),
    );
    let port = IPERF_PORT.to_string();
    let args = [
        "-c", &t, "-p", &port, "-t", &secs, "-u", "-b", "0", "-l", &len,
    ];
    let v = iperf3_json(ns, &[&args[..], family_flag(target)].concat())?;
    let r = &v["end"]["sum_received"];
    match (r["bytes"].as_f64(), r["seconds"].as_f64()) {
        (Some(bytes), Some(s)) if s > 0.0 => Ok(bytes / f64::from(UDP_PAYLOAD) / s),
        _ => Err(step(format!("iperf3 -u -c {t}"))(
            "no received byte count".to_owned(),
        )),
    }
}
