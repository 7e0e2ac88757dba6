//! The real-engine lab in tests: `up` builds one (`ecsnet lab up --docker`) and hands back the
//! usual `Lab` guard, whose drop takes it down; the lab's `docker` command; its status with the
//! `docker` object; containers run, stopped and removed on it; a probe from inside a
//! container; and what its engine could leave behind.

use std::{path::PathBuf, process::Command};

pub use ecsnet_lab::lab::engine::{
    self, ContainerSpec, DockerStatus, EngineStatus, LabContainer, RUN_DIRS,
};
use ecsnet_lab::lab::{LabPort, LabStatus};

use crate::{Lab, ecsnet, require_root, unique};

/// `ecsnet lab up --docker --name <unique> --tasks K --publish ... EXTRA...`; fails the test
/// (never skips) when dockerd cannot start, with what `lab up` said.
pub fn up(prefix: &str, tasks: usize, publish: &[&str], extra: &[&str]) -> Lab {
    require_root();
    let name = unique(prefix);
    let tasks = tasks.to_string();
    let mut args = vec!["lab", "up", "--docker", "--name", &name, "--tasks", &tasks];
    for p in publish {
        args.extend(["--publish", p]);
    }
    args.extend(extra);
    args.push("--json");
    let out = ecsnet(&args);
    if !out.status.success() {
        let _ = ecsnet(&["lab", "down", "--name", &name]);
        panic!(
            "`ecsnet {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status: LabStatus =
        serde_json::from_slice(&out.stdout).expect("lab up --json prints the lab status");
    Lab { name, status }
}

/// `ecsnet lab status --json` of a real-engine lab, `docker` object included.
pub fn status(lab: &Lab) -> EngineStatus {
    let out = crate::ecsnet_ok(&["lab", "status", "--name", &lab.name, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lab status --json: {e}: {out}"))
}

/// `/usr/bin/docker -H unix://<the lab's socket>`.
pub fn docker(lab: &Lab) -> Command {
    engine::docker(&lab.name)
}

/// `docker ARGS` on the lab, which must succeed; its stdout.
pub fn docker_ok(lab: &Lab, args: &[&str]) -> String {
    engine::docker_ok(&lab.name, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a container on the lab (its server listening when this returns); its id.
pub fn run(lab: &Lab, spec: &ContainerSpec) -> String {
    engine::run(&lab.name, spec).unwrap_or_else(|e| panic!("{e}"))
}

/// A container of ECS task `name` with the ECS agent's labels and `ports` ("HOST:CONTAINER"
/// or "CONTAINER" for a dynamic host port, "/udp" for UDP).
pub fn task(lab: &Lab, name: &str, ports: &[&str]) -> ContainerSpec {
    let ports = ports
        .iter()
        .map(|p| {
            let (ports, protocol) = ecsnet::state::Protocol::split_suffix(p).expect("tcp or udp");
            let (host, container) = ports.split_once(':').unwrap_or(("0", ports));
            LabPort {
                host_port: host.parse().expect("a host port"),
                container_port: container.parse().expect("a container port"),
                protocol,
            }
        })
        .collect();
    ContainerSpec::task(&lab.name, name, ports)
}

/// `ecsnet lab probe` run inside container `container` (the lab's binary is mounted there).
pub fn probe_from(
    lab: &Lab,
    container: &str,
    proto: &str,
    target: &str,
    count: u32,
) -> serde_json::Value {
    let mut args = vec![
        "exec".to_owned(),
        container.to_owned(),
        engine::SERVER.to_owned(),
    ];
    args.extend(probe_args(proto, target, count));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = docker_ok(lab, &args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("probe in {container}: {e}: {out}"))
}

/// The arguments of `ecsnet-lab lab probe --PROTO TARGET --count COUNT --json`.
pub fn probe_args(proto: &str, target: &str, count: u32) -> Vec<String> {
    ["lab", "probe", &format!("--{proto}"), target, "--count"]
        .map(str::to_owned)
        .into_iter()
        .chain([count.to_string(), "--json".to_owned()])
        .collect()
}

/// `ARGS` run in the network namespace of process `pid` (a container's), with nsenter.
pub fn in_container(pid: i32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(args)
        .output()
        .expect("run nsenter");
    assert!(
        out.status.success(),
        "nsenter --net=/proc/{pid}/ns/net {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a real-engine lab has outside its namespaces, noted while it runs, to check after
/// `lab down` that all of it went.
#[derive(Debug)]
pub struct Footprint {
    pub name: String,
    /// dockerd, its containerd, the shims, docker-proxy and the containers' processes.
    pub pids: Vec<i32>,
    /// The shim sockets of its containers.
    pub shim_sockets: Vec<PathBuf>,
    /// The /run folders of dockerd and containerd that did not exist before the lab.
    pub new_run_dirs: Vec<PathBuf>,
}

impl Footprint {
    /// Of lab `name`, whose dockerd answers; `before_up` lists the `RUN_DIRS` that existed
    /// before the lab was built.
    pub fn of(name: &str, before_up: &[PathBuf]) -> Self {
        let ids =
            engine::docker_ok(name, &["ps", "-aq", "--no-trunc"]).unwrap_or_else(|e| panic!("{e}"));
        Footprint {
            name: name.to_owned(),
            pids: engine::processes(name).iter().map(|p| p.as_raw()).collect(),
            shim_sockets: ids
                .split_whitespace()
                .filter_map(|id| engine::shim_socket_path(name, id))
                .collect(),
            new_run_dirs: RUN_DIRS
                .iter()
                .map(PathBuf::from)
                .filter(|d| !before_up.contains(d))
                .collect(),
        }
    }

    /// What is still there: processes alive, shim sockets, new /run folders (unless another
    /// engine runs that may use them), the engine's mounts, cgroups and processes.
    pub fn left(&self) -> Vec<String> {
        let mut left = engine::leftovers(&self.name);
        for pid in &self.pids {
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, s)| s.trim_start().starts_with('Z'))
            {
                left.push(format!("process {pid} {}", stat.trim()));
            }
        }
        left.extend(
            self.shim_sockets
                .iter()
                .filter(|s| s.exists())
                .map(|s| format!("shim socket {}", s.display())),
        );
        let (dockerd, containerd) = engine::other_engines_run();
        for d in &self.new_run_dirs {
            let shared = (d.starts_with("/run/docker") && dockerd)
                || (d.starts_with("/run/containerd") && containerd);
            if d.exists() && !shared {
                left.push(format!("run folder {}", d.display()));
            }
        }
        left
    }
}

/// The `RUN_DIRS` that exist now.
pub fn run_dirs_now() -> Vec<PathBuf> {
    RUN_DIRS
        .iter()
        .map(PathBuf::from)
        .filter(|d| d.exists())
        .collect()
}
