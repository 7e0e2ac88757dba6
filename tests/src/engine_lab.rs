//! ecsnet following the real-engine lab's dockerd (`up --docker`), as the tests of
//! `docker_engine.rs` drive and read it: the instance brought up on the lab's engine, its tasks
//! waited for, probes from anywhere (a lab namespace or a container's) that report what came
//! back instead of failing, Docker's own netfilter counters and ecsnet's flows read around
//! them, the instance's maps dumped, and its metrics scraped.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use ecsnet::state::{Task, TaskSource};
use serde_json::Value;

use crate::{Lab, counters, docker, ecsnet, ecsnet_bin, ecsnet_ok, in_netns, ns_exec, world};

/// The label that gives a container its security groups.
pub const GROUPS_LABEL: &str = "ecsnet.security-groups";
/// How long the agent may take to follow a change of the engine.
pub const FOLLOW_WAIT: Duration = Duration::from_secs(30);

/// `ecsnet up --docker <the lab's engine> --window 1` on the lab's host, with the lab's state
/// file carrying `groups` and `extra` flags; waits until the agent has applied the engine's
/// first view.
pub fn up_following(lab: &Lab, groups: &[Value], extra: &[&str]) {
    let mut state = world::state(lab);
    state["securityGroups"] = Value::Array(groups.to_vec());
    let file = world::write(lab, "engine-state.json", &state);
    let url = docker::status(lab).docker.socket;
    let mut args = vec!["up", "--state", &file, "--docker", &url, "--window", "1"];
    args.extend_from_slice(extra);
    ecsnet_ok(&lab.ecsnet_args(&args));
    counters::poll(
        FOLLOW_WAIT,
        Duration::from_millis(100),
        || lab.stats().engine.map_or(0, |e| e.applies),
        |applies| *applies > 0,
    )
    .unwrap_or_else(|_| panic!("the agent of {} applied no view of its engine", lab.name));
}

/// `task ls --json` of the lab's instance.
pub fn tasks(lab: &Lab) -> Vec<Task> {
    let out = world::instance_ok(lab, &["task", "ls", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("task ls --json: {e}: {out}"))
}

/// The tasks from the engine, once there are `n`.
pub fn wait_docker_tasks(lab: &Lab, n: usize) -> Vec<Task> {
    let docker_tasks = || -> Vec<Task> {
        tasks(lab)
            .into_iter()
            .filter(|t| t.source == TaskSource::Docker)
            .collect()
    };
    counters::poll(FOLLOW_WAIT, Duration::from_millis(100), docker_tasks, |t| {
        t.len() == n
    })
    .unwrap_or_else(|t| {
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        panic!(
            "{} docker task(s) after {FOLLOW_WAIT:?}, not {n}: {names:?}",
            names.len()
        )
    })
}

/// A container of ECS task `name` (as `docker::task`) whose label names `groups`.
pub fn grouped_task(lab: &Lab, name: &str, ports: &[&str], groups: &str) -> docker::ContainerSpec {
    let mut spec = docker::task(lab, name, ports);
    spec.labels
        .push((GROUPS_LABEL.to_owned(), groups.to_owned()));
    spec
}

/// `docker run -d --init --name NAME ARGS... <lab image> <echo server> --tcp PORT` on the lab:
/// a container the lab's `ContainerSpec` cannot describe (another network, say); returns its
/// id once its echo server listens.
pub fn run_with(lab: &Lab, name: &str, args: &[&str], tcp_port: u16) -> String {
    let server = ecsnet_bin().with_file_name("ecsnet-lab");
    let mount = format!("{}:{}:ro", server.display(), docker::engine::SERVER);
    let port = tcp_port.to_string();
    let mut all = vec!["run", "-d", "--init", "--name", name, "-v", &mount];
    all.extend_from_slice(args);
    all.extend([
        docker::engine::IMAGE,
        docker::engine::SERVER,
        "lab",
        "serve",
        "--tcp",
        &port,
    ]);
    let id = docker::docker_ok(lab, &all);
    counters::poll(
        Duration::from_secs(15),
        Duration::from_millis(50),
        || docker::docker_ok(lab, &["logs", &id]),
        |log| log.contains("serving echo"),
    )
    .unwrap_or_else(|log| panic!("container {name}'s echo server did not listen: {log}"));
    id
}

/// The first process of container `name` (its network namespace is the container's).
pub fn pid_of(lab: &Lab, name: &str) -> i32 {
    docker::docker_ok(lab, &["inspect", "--format", "{{.State.Pid}}", name])
        .parse()
        .unwrap_or_else(|e| panic!("pid of {name}: {e}"))
}

/// Where a probe starts.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A namespace of the lab (its client or host).
    Ns(String),
    /// A container, by the pid whose network namespace it is.
    Container(String, i32),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ns(ns) => write!(f, "{ns}"),
            Self::Container(name, _) => write!(f, "{name}"),
        }
    }
}

/// `lab probe --PROTO TARGET --count COUNT` from `from`: how many messages came back (0 when
/// it could not connect). A refused or silent target is an answer here, not a failure.
pub fn reach(from: &Origin, proto: &str, target: &str, count: u32) -> u32 {
    let probe = docker::probe_args(proto, target, count);
    let out = match from {
        Origin::Ns(ns) => {
            let mut args = vec!["--netns", ns.as_str()];
            args.extend(probe.iter().map(String::as_str));
            ecsnet(&args)
        }
        Origin::Container(_, pid) => Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .arg(ecsnet_bin().with_file_name("ecsnet-lab"))
            .args(&probe)
            .output()
            .expect("run nsenter ecsnet-lab lab probe"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<Value>(text.trim())
        .ok()
        .and_then(|v| v["echoed"].as_u64())
        .map_or(0, |n| u32::try_from(n).expect("a count of messages"))
}

/// Docker's netfilter counters on the lab's host, in packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Netfilter {
    /// The DNAT rules of the nat table's DOCKER chain (published ports; from PREROUTING, and
    /// from OUTPUT for the host's own connections).
    pub dnat: u64,
    /// `-s 172.17.0.0/16 ! -o docker0 -j MASQUERADE`: tasks leaving the host.
    pub masquerade: u64,
    /// `-o docker0 -m addrtype --src-type LOCAL -j MASQUERADE` (without the userland proxy):
    /// the host's own connections translated to a task.
    pub local_masquerade: u64,
    /// Every rule and policy of the filter table's FORWARD and DOCKER* chains.
    pub forward: u64,
}

impl Netfilter {
    pub fn read(lab: &Lab) -> Self {
        let save = ns_exec(lab.host(), &["iptables-save", "-c"]);
        let mut n = Netfilter::default();
        let mut table = "";
        for line in save.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = if t == "nat" { "nat" } else { "filter" };
                continue;
            }
            let Some((packets, rule)) = line
                .strip_prefix('[')
                .and_then(|r| r.split_once(':'))
                .and_then(|(p, rest)| Some((p.parse::<u64>().ok()?, rest)))
            else {
                continue;
            };
            let chain = rule.split_whitespace().nth(2).unwrap_or("");
            let to = |target: &str| rule.contains(&format!("-j {target}"));
            match table {
                "nat" if chain == "DOCKER" && to("DNAT") => n.dnat += packets,
                "nat" if to("MASQUERADE") && rule.contains("--src-type LOCAL") => {
                    n.local_masquerade += packets;
                }
                "nat" if to("MASQUERADE") && rule.contains("-s 172.17.0.0/16") => {
                    n.masquerade += packets;
                }
                "filter" if chain == "FORWARD" || chain.starts_with("DOCKER") => {
                    n.forward += packets;
                }
                _ => {}
            }
        }
        // The policies of FORWARD and DOCKER*, which count what no rule decided.
        for line in save.lines().filter(|l| l.starts_with(':')) {
            let mut parts = line[1..].split_whitespace();
            let chain = parts.next().unwrap_or("");
            if chain == "FORWARD" || chain.starts_with("DOCKER") {
                n.forward += parts
                    .nth(1)
                    .and_then(|c| c.trim_matches(['[', ']']).split(':').next()?.parse().ok())
                    .unwrap_or(0);
            }
        }
        n
    }

    /// What moved from `before` to `self`.
    #[must_use]
    pub fn since(self, before: Self) -> Self {
        Netfilter {
            dnat: self.dnat - before.dnat,
            masquerade: self.masquerade - before.masquerade,
            local_masquerade: self.local_masquerade - before.local_masquerade,
            forward: self.forward - before.forward,
        }
    }
}

/// The kinds of ecsnet's tracked flows ("inbound", "eastWest", "masquerade", "hairpin") and
/// how many of each its connection table holds.
pub fn ecsnet_flows(lab: &Lab) -> BTreeMap<String, u64> {
    lab.stats().conntrack.flows
}

/// The kinds of which ecsnet's table holds more flows in `after` than in `before`.
pub fn new_kinds(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Vec<String> {
    after
        .iter()
        .filter(|(k, n)| **n > before.get(*k).copied().unwrap_or(0))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The keys of pinned map `map` of instance `instance`, as bytes (`bpftool map dump`).
pub fn map_keys(instance: &str, map: &str) -> Vec<Vec<u8>> {
    let pin = PathBuf::from(format!("/sys/fs/bpf/ecsnet/{instance}/maps/{map}"));
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .expect("run bpftool (apt-get install bpftool)");
    assert!(
        out.status.success(),
        "bpftool map dump {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Value = serde_json::from_slice(&out.stdout).expect("bpftool -j prints JSON");
    entries
        .as_array()
        .expect("a list of entries")
        .iter()
        .map(|e| {
            e["key"]
                .as_array()
                .expect("a key of bytes")
                .iter()
                .map(|b| {
                    let hex = b.as_str().expect("a hex byte");
                    u8::from_str_radix(hex.trim_start_matches("0x"), 16).expect("a hex byte")
                })
                .collect()
        })
        .collect()
}

/// The published ports in the instance's `PORTS` map, as "HOSTPORT/tcp".
pub fn ports_map(instance: &str) -> Vec<String> {
    let mut ports: Vec<String> = map_keys(instance, ecsnet_common::maps::MAP_PORTS)
        .iter()
        .map(|k| {
            let proto = match k[2] {
                6 => "tcp",
                17 => "udp",
                _ => "other",
            };
            format!("{}/{proto}", u16::from_be_bytes([k[0], k[1]]))
        })
        .collect();
    ports.sort();
    ports
}

/// The task addresses in the instance's `TASKS` map.
pub fn tasks_map(instance: &str) -> Vec<std::net::Ipv4Addr> {
    let mut addrs: Vec<std::net::Ipv4Addr> = map_keys(instance, ecsnet_common::maps::MAP_TASKS)
        .iter()
        .map(|k| std::net::Ipv4Addr::new(k[0], k[1], k[2], k[3]))
        .collect();
    addrs.sort();
    addrs
}

/// The interfaces (ifindex) in the instance's `IFACES` map.
pub fn ifaces_map(instance: &str) -> Vec<u32> {
    let mut ifaces: Vec<u32> = map_keys(instance, ecsnet_common::maps::MAP_IFACES)
        .iter()
        .map(|k| u32::from_ne_bytes([k[0], k[1], k[2], k[3]]))
        .collect();
    ifaces.sort_unstable();
    ifaces
}

/// The value of the first sample of metric `family` on the instance's `/metrics` (served at
/// its default address in the lab's host namespace).
pub fn metric(lab: &Lab, family: &str) -> u64 {
    let page = in_netns(lab.host(), || {
        let mut s = TcpStream::connect("127.0.0.1:9464").expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("send GET /metrics");
        let mut page = String::new();
        s.read_to_string(&mut page).expect("read /metrics");
        page
    });
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let bare = name.split('{').next()?;
            (bare == family).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {family} in /metrics:\n{page}"))
}
