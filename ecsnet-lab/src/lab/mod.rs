//! The lab (SPEC §8): a Docker bridge-mode ECS host in namespaces `N-host`, `N-task1..K` and
//! `N-client`, its network in `topology`, its rules in `docker_rules`; `down` removes all of it.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};

use ecsnet::{
    host::netns,
    state::{self, Host, PortFamily, PortMapping, Protocol, State, Task},
    store::paths::{self, lab_dir},
};

mod docker_rules;
pub mod engine;
pub mod topology;

pub use docker_rules::{docker_rules, docker_rules6, restore_rules, restore_rules6};
pub use engine::EngineStatus;
use topology::Shape;

pub const UPLINK: &str = "eth0";
pub const BRIDGE: &str = "docker0";
pub const UPLINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
pub const UPLINK_PREFIX: u8 = 24;
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
pub const BRIDGE_PREFIX: u8 = 16;
pub const BRIDGE_SUBNET: &str = "172.17.0.0/16";
/// The uplink's IPv6 subnet with `--ipv6` (unique local, living only in the lab): the host
/// is `::1` on it, the client `::2`.
pub const UPLINK_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 0, 0, 0, 0, 1);
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x10, 0, 0, 0, 0, 2);
pub const UPLINK_PREFIX6: u8 = 64;
/// docker0's `fixed-cidr-v6` with `--ipv6`, and its gateway address on docker0.
pub const BRIDGE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x17, 0, 0, 0, 0, 1);
pub const BRIDGE_PREFIX6: u8 = 64;
pub const BRIDGE_SUBNET6: &str = "fd00:172:17::/64";
/// Most tasks one lab builds (addresses 172.17.0.2 ... 172.17.3.233, in the bridge's /16).
pub const MAX_TASKS: usize = 1000;
/// First host port of the default publications: task i publishes 8080+i-1 -> 80/tcp.
pub const DEFAULT_HOST_PORT: u16 = 8080;
pub const DEFAULT_CONTAINER_PORT: u16 = 80;
/// Where dockerd picks dynamic host ports: the namespace's `net.ipv4.ip_local_port_range`,
/// the kernel's default in the lab's host.
pub const DOCKER_DYNAMIC_PORTS: [u16; 2] = [32768, 60999];
/// Echo port (TCP and UDP) of the lab's client.
pub const CLIENT_ECHO_PORT: u16 = 9000;
/// The first address of the namespace tasks plugged into a real engine's docker0
/// (`plug_tasks`): high in the bridge's /16, far from dockerd's IPAM, which hands out
/// 172.17.0.2 upwards.
pub const PLUGGED_BASE: Ipv4Addr = Ipv4Addr::new(172, 17, 200, 1);
/// The host port the first plugged task publishes; the next task the next port (below
/// Docker's dynamic range, apart from the default 8080 of the engine's own tasks).
pub const PLUGGED_HOST_PORT: u16 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    BadName(#[from] ecsnet::store::paths::NameError),
    #[error("bad lab name {0:?}: at most 20 characters")]
    NameTooLong(String),
    #[error("bad --tasks {0}: a lab has 1 to {MAX_TASKS} tasks")]
    BadTaskCount(usize),
    #[error("lab {lab:?}: tasks {a} and {b} would share the veth name {veth}; pick another name")]
    VethClash {
        lab: String,
        a: usize,
        b: usize,
        veth: String,
    },
    #[error("bad --publish {spec:?}: {why}; expected TASK:HOSTPORT:CONTAINERPORT[/tcp|/udp]")]
    BadPublish { spec: String, why: String },
    #[error(
        "lab {name:?} already exists (namespace {netns}); run `ecsnet lab down --name {name}` first"
    )]
    Exists { name: String, netns: String },
    #[error("bad --ipv6 {0:?}: expected nat or routed")]
    BadIpv6(String),
    #[error("bad lab options: {0}")]
    Conflict(&'static str),
    #[error("no lab named {0:?}; `ecsnet lab up --name {0}` builds one")]
    NotFound(String),
    #[error("{tool} is not installed: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("namespace {netns}: {what}: {source}")]
    Netns {
        netns: String,
        what: String,
        source: std::io::Error,
    },
    #[error("namespace {netns}: {what}: {source}")]
    Netlink {
        netns: String,
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt lab file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl LabError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::BadName(_)
            | Self::NameTooLong(_)
            | Self::BadTaskCount(_)
            | Self::VethClash { .. }
            | Self::BadPublish { .. }
            | Self::Exists { .. }
            | Self::BadIpv6(_)
            | Self::Conflict(_)
            | Self::NotFound(_) => 2,
            _ => 1,
        }
    }
}

/// One `--publish TASK:HOSTPORT:CONTAINERPORT[/proto]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// 1-based task number.
    pub task: usize,
    /// 0: dynamic.
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

pub fn parse_publish(spec: &str, tasks: usize) -> Result<Publish, LabError> {
    let bad = |why: String| LabError::BadPublish {
        spec: spec.to_owned(),
        why,
    };
    let (ports, protocol) =
        Protocol::split_suffix(spec).map_err(|other| bad(format!("unknown protocol {other:?}")))?;
    let fields: Vec<&str> = ports.split(':').collect();
    let [task, host, container] = fields[..] else {
        return Err(bad("need three fields".into()));
    };
    let task: usize = task
        .parse()
        .map_err(|_| bad(format!("task {task:?} is not a number")))?;
    if task == 0 || task > tasks {
        return Err(bad(format!(
            "task {task} does not exist (the lab has tasks 1 to {tasks})"
        )));
    }
    let port = |s: &str, what: &str, zero_ok: bool| -> Result<u16, LabError> {
        match s.parse::<u16>() {
            Ok(0) if !zero_ok => Err(bad(format!("{what} 0 out of range 1-65535"))),
            Ok(p) => Ok(p),
            Err(_) => Err(bad(format!("{what} {s:?} is not a port 0-65535"))),
        }
    };
    Ok(Publish {
        task,
        host_port: port(host, "host port", true)?,
        container_port: port(container, "container port", false)?,
        protocol,
    })
}

/// How IPv6 reaches a dual-stack lab's tasks (`lab up --ipv6 MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ipv6Mode {
    /// Docker 20.10's `ipv6` with `fixed-cidr-v6` and `ip6tables`: published ports translated
    /// (DNAT) on the host's addresses, tasks' traffic masqueraded to the uplink's (NAT66).
    Nat,
    /// Docker 27's `gateway_mode_ipv6=routed`: no NAT66; the client routes `fixed-cidr-v6`
    /// through the host and reaches published ports at the tasks' own addresses.
    Routed,
}

impl Ipv6Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Routed => "routed",
        }
    }
}

impl std::str::FromStr for Ipv6Mode {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "nat" => Ok(Self::Nat),
            "routed" => Ok(Self::Routed),
            other => Err(LabError::BadIpv6(other.to_owned())),
        }
    }
}

/// What `lab up` builds.
#[derive(Debug, Clone, Default)]
pub struct LabSpec {
    pub name: String,
    pub tasks: usize,
    pub publish: Vec<Publish>,
    /// The benchmark's `ceiling`: no bridge and no netfilter, each task behind a /32 route on
    /// its own veth, and the client routing the task subnet through the host. Published ports
    /// mean nothing there; the client reaches tasks at their own addresses. Dual stack only
    /// with `Ipv6Mode::Routed` (a /128 route per task, nothing translated).
    pub ceiling: bool,
    /// Container ports the lab's echo server leaves free, for servers of the caller's own
    /// (the benchmark's iperf3).
    pub unserved: Vec<u16>,
    /// Dual stack: IPv6 on the uplink, docker0 and every task, in this mode; IPv4 only (IPv6
    /// off in every namespace) when `None`.
    pub ipv6: Option<Ipv6Mode>,
}

/// A real engine for `up_with` (`lab up --docker`): a dockerd of the lab's own makes docker0
/// and runs the tasks as containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// dockerd's `userland-proxy` (Docker's default: on).
    pub userland_proxy: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            userland_proxy: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabHost {
    pub netns: String,
    pub uplink: String,
    pub uplink_address: Ipv4Addr,
    pub bridge: String,
    pub bridge_address: Ipv4Addr,
    /// With `--ipv6`: `UPLINK_ADDR6` and `BRIDGE_ADDR6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_address6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_address6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabClient {
    pub netns: String,
    pub address: Ipv4Addr,
    /// With `--ipv6`: `CLIENT_ADDR6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// TCP and UDP echo port of the client, the "outside" that tasks reach through masquerade.
    pub echo_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabPort {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// `8080->80/tcp`, as `ecsnet task ls` shows a port mapping.
impl std::fmt::Display for LabPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (host, container) = (self.host_port, self.container_port);
        write!(f, "{host}->{container}/{}", self.protocol.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabTask {
    pub name: String,
    /// The task's named namespace; none (empty, left out of the JSON) for a container.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    pub address: Ipv4Addr,
    /// With `--ipv6`: its address in `fixed-cidr-v6`, made from its MAC as Docker does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    pub interface: String,
    pub port_mappings: Vec<LabPort>,
}

/// `lab status --json`, also kept in `/run/ecsnet/<lab>/lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabStatus {
    pub name: String,
    /// Built as the benchmark's ceiling (`LabSpec::ceiling`).
    #[serde(default)]
    pub ceiling: bool,
    /// Built dual-stack (`LabSpec::ipv6`), in this mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Mode>,
    pub state_file: PathBuf,
    pub host: LabHost,
    pub client: LabClient,
    pub tasks: Vec<LabTask>,
}

fn host_ns(name: &str) -> String {
    format!("{name}-host")
}
fn client_ns(name: &str) -> String {
    format!("{name}-client")
}
fn task_ns(name: &str, i: usize) -> String {
    format!("{name}-task{i}")
}

/// Docker-style host-side veth name: "veth" and 7 hex digits, stable for (lab, task).
pub fn veth_name(lab: &str, task: usize) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in lab.bytes().chain(task.to_le_bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("veth{:07x}", h & 0x0fff_ffff)
}

pub fn task_address(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).expect("a lab has at most MAX_TASKS tasks");
    Ipv4Addr::from(u32::from(BRIDGE_ADDR) + i)
}

/// The MAC Docker gives a container on a bridge: `02:42` and its IPv4 address.
pub fn task_mac(v4: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = v4.octets();
    [0x02, 0x42, a, b, c, d]
}

/// The IPv6 address dockerd 20.10 gives a container with `fixed-cidr-v6` of /80 or shorter:
/// the subnet's prefix with the container's MAC in the last 48 bits (so `...::242:ac11:2`
/// for 172.17.0.2), not the next free address.
pub fn task_address6(v4: Ipv4Addr) -> Ipv6Addr {
    let mut o = BRIDGE_ADDR6.octets();
    o[8..10].fill(0);
    o[10..].copy_from_slice(&task_mac(v4));
    Ipv6Addr::from(o)
}

/// The port mappings every task asks for: the --publish list, or one default port per task;
/// host port 0 is dynamic.
pub fn requested_ports(spec: &LabSpec) -> Vec<Vec<LabPort>> {
    let mut out = vec![Vec::new(); spec.tasks];
    if spec.publish.is_empty() {
        for (host_port, ports) in (DEFAULT_HOST_PORT..).zip(&mut out) {
            ports.push(LabPort {
                host_port,
                container_port: DEFAULT_CONTAINER_PORT,
                protocol: Protocol::Tcp,
            });
        }
        return out;
    }
    for p in &spec.publish {
        out[p.task - 1].push(LabPort {
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: p.protocol,
        });
    }
    out
}

/// The port mappings of every task, as `requested_ports` with each dynamic host port the
/// lowest free one of `range` (dockerd's allocator: the first free port of a fresh range).
pub fn plan_ports(spec: &LabSpec, range: [u16; 2]) -> Vec<Vec<LabPort>> {
    let mut out = requested_ports(spec);
    let mut used: HashSet<(u16, Protocol)> = out
        .iter()
        .flatten()
        .filter(|p| p.host_port != 0)
        .map(|p| (p.host_port, p.protocol))
        .collect();
    // Ports are only ever taken, so each protocol's lowest free port only moves up: the next
    // search starts where the last one ended (a thousand dynamic ports, one pass over the range).
    let mut from: HashMap<Protocol, u16> = HashMap::new();
    for p in out.iter_mut().flatten().filter(|p| p.host_port == 0) {
        let start = from.get(&p.protocol).copied().unwrap_or(range[0]);
        let free = (start..=range[1])
            .find(|port| !used.contains(&(*port, p.protocol)))
            .unwrap_or(0);
        if free != 0 {
            used.insert((free, p.protocol));
            from.insert(p.protocol, free);
        }
        p.host_port = free;
    }
    out
}

/// The ECS-style state file for the lab's tasks.
pub fn state_for(status: &LabStatus) -> State {
    State {
        host: Host {
            uplink: Some(UPLINK.into()),
            bridge: Some(BRIDGE.into()),
            account_id: Some("123456789012".into()),
            instance_id: Some(format!(
                "i-{:017x}",
                u64::from(u32::from_str_radix(&veth_name(&status.name, 0)[4..], 16).unwrap_or(0))
            )),
            cluster: Some(status.name.clone()),
            // Made-up identifiers in AWS's shapes, so flow logs of the lab read like real ones.
            vpc_id: Some("vpc-0ecs0e7000000001".into()),
            subnet_id: Some("subnet-0ecs0e700000001".into()),
            region: Some("us-east-1".into()),
            az_id: Some("use1-az1".into()),
            ipv6_mode: match status.ipv6 {
                Some(Ipv6Mode::Routed) => state::Ipv6Mode::Routed,
                _ => state::Ipv6Mode::Nat,
            },
            ..Host::default()
        },
        security_groups: vec![],
        tasks: status
            .tasks
            .iter()
            .map(|t| Task {
                task_arn: Some(format!(
                    "arn:aws:ecs:us-east-1:123456789012:task/{}/{}",
                    status.name,
                    &t.interface[4..]
                )),
                ipv6_address: t.address6,
                interface: Some(t.interface.clone()),
                port_mappings: t
                    .port_mappings
                    .iter()
                    .map(|p| PortMapping {
                        container_port: p.container_port,
                        host_port: p.host_port,
                        protocol: p.protocol,
                        host_ip: PortFamily::Both,
                    })
                    .collect(),
                service_name: Some(format!("{}-svc", t.name)),
                task_definition_arn: Some(format!(
                    "arn:aws:ecs:us-east-1:123456789012:task-definition/{}:1",
                    t.name
                )),
                ..Task::new(t.name.clone(), t.address)
            })
            .collect(),
    }
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Every namespace of a lab that exists now.
fn namespaces(name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    let mut out: Vec<String> = fs::read_dir(netns::NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix(&prefix).is_some_and(|rest| {
                rest == "host"
                    || rest == "client"
                    || rest
                        .strip_prefix("task")
                        .is_some_and(|k| k.parse::<usize>().is_ok())
            })
        })
        .collect();
    out.sort();
    out
}

/// `count` namespace tasks for lab `lab` beside a real engine's containers: named `load1`
/// upwards, in the lab's task namespaces, at `PLUGGED_BASE` upwards, each publishing its
/// port 80 on a host port of its own from `PLUGGED_HOST_PORT`. Only their descriptions:
/// `plug_tasks` makes them.
pub fn plugged_tasks(lab: &str, count: usize) -> Result<Vec<LabTask>, LabError> {
    if count > MAX_TASKS {
        return Err(LabError::BadTaskCount(count));
    }
    let mut names = HashMap::new();
    (1..=count)
        .map(|i| {
            let veth = veth_name(lab, i);
            if let Some(a) = names.insert(veth.clone(), i) {
                return Err(LabError::VethClash {
                    lab: lab.to_owned(),
                    a,
                    b: i,
                    veth,
                });
            }
            let k = u32::try_from(i - 1).expect("at most MAX_TASKS");
            Ok(LabTask {
                name: format!("load{i}"),
                netns: task_ns(lab, i),
                address: Ipv4Addr::from(u32::from(PLUGGED_BASE) + k),
                address6: None,
                interface: veth,
                port_mappings: vec![LabPort {
                    host_port: PLUGGED_HOST_PORT + u16::try_from(k).expect("at most MAX_TASKS"),
                    container_port: DEFAULT_CONTAINER_PORT,
                    protocol: Protocol::Tcp,
                }],
            })
        })
        .collect()
}

/// Plugs `tasks` (from `plugged_tasks`) into the docker0 of real-engine lab `status`, each a
/// namespace of its own on a veth, as the imitation's tasks are. They serve nothing; `lab
/// down` removes them with the lab (their namespaces are the lab's task namespaces).
pub fn plug_tasks(status: &LabStatus, tasks: &[LabTask]) -> Result<(), LabError> {
    if !engine::is_engine(&status.name) {
        return Err(LabError::Conflict(
            "namespace tasks are plugged beside a real engine only (lab up --docker)",
        ));
    }
    topology::plug(&status.host.netns, tasks)
}

/// `ecsnet lab up`: builds the lab, starts a server in every task, writes the state file.
pub fn up(spec: &LabSpec) -> Result<LabStatus, LabError> {
    up_with(spec, None)
}

/// `ecsnet lab up`, with a real engine when `engine` is given (`--docker`).
pub fn up_with(spec: &LabSpec, engine: Option<EngineOptions>) -> Result<LabStatus, LabError> {
    paths::check_name("lab", &spec.name)?;
    if spec.name.len() > 20 {
        return Err(LabError::NameTooLong(spec.name.clone()));
    }
    if spec.tasks == 0 || spec.tasks > MAX_TASKS {
        return Err(LabError::BadTaskCount(spec.tasks));
    }
    if engine.is_some() && spec.ceiling {
        return Err(LabError::Conflict(
            "--docker builds a bridge-mode host, --ceiling has no bridge",
        ));
    }
    if engine.is_some() && spec.ipv6 == Some(Ipv6Mode::Routed) {
        return Err(LabError::Conflict(
            "--ipv6 routed is Docker 27's gateway_mode_ipv6, not in the real engine's 20.10: \
             imitation only",
        ));
    }
    if spec.ceiling && spec.ipv6 == Some(Ipv6Mode::Nat) {
        return Err(LabError::Conflict(
            "--ceiling translates nothing: it takes --ipv6 routed, not nat",
        ));
    }
    if engine.is_some() {
        engine::check_tools()?;
    }
    let v6_tool = spec.ipv6.map(|_| "ip6tables-restore");
    for tool in std::iter::once("iptables-restore").chain(v6_tool) {
        if which::which(tool).is_err() {
            return Err(LabError::MissingTool {
                tool,
                hint: "apt-get install iptables",
            });
        }
    }
    if let Some(ns) = namespaces(&spec.name).first() {
        return Err(LabError::Exists {
            name: spec.name.clone(),
            netns: ns.clone(),
        });
    }
    if engine.is_none() {
        let mut names = HashMap::new();
        for i in 1..=spec.tasks {
            if let Some(a) = names.insert(veth_name(&spec.name, i), i) {
                return Err(LabError::VethClash {
                    lab: spec.name.clone(),
                    a,
                    b: i,
                    veth: veth_name(&spec.name, i),
                });
            }
        }
    }
    let mut seen = HashSet::new();
    for p in &spec.publish {
        if p.host_port != 0 && !seen.insert((p.host_port, p.protocol)) {
            return Err(LabError::BadPublish {
                spec: format!(
                    "{}:{}:{}/{}",
                    p.task,
                    p.host_port,
                    p.container_port,
                    p.protocol.as_str()
                ),
                why: format!(
                    "host port {}/{} is published twice",
                    p.host_port,
                    p.protocol.as_str()
                ),
            });
        }
    }
    match build(spec, engine) {
        Ok(s) => Ok(s),
        Err(e) => {
            let _ = down(&spec.name);
            Err(e)
        }
    }
}

fn build(spec: &LabSpec, engine: Option<EngineOptions>) -> Result<LabStatus, LabError> {
    let name = &spec.name;
    let (host, client) = (host_ns(name), client_ns(name));
    let dir = lab_dir(name);
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tasks: Vec<LabTask> = if engine.is_some() {
        Vec::new()
    } else {
        plan_ports(spec, DOCKER_DYNAMIC_PORTS)
            .into_iter()
            .enumerate()
            .map(|(k, port_mappings)| {
                let i = k + 1;
                LabTask {
                    name: format!("task{i}"),
                    netns: task_ns(name, i),
                    address: task_address(i),
                    address6: spec.ipv6.map(|_| task_address6(task_address(i))),
                    interface: veth_name(name, i),
                    port_mappings,
                }
            })
            .collect()
    };
    let shape = if engine.is_some() {
        Shape::Engine
    } else if spec.ceiling {
        Shape::Ceiling
    } else {
        Shape::Bridge
    };
    topology::build(&host, &client, &tasks, shape, spec.ipv6)?;
    if shape == Shape::Bridge {
        restore_rules(&host, &docker_rules(&tasks))?;
        if let Some(mode) = spec.ipv6 {
            restore_rules6(&host, &docker_rules6(&tasks, mode))?;
        }
    }
    let v6 = |addr: Ipv6Addr| spec.ipv6.map(|_| addr);

    let mut status = LabStatus {
        name: name.clone(),
        ceiling: spec.ceiling,
        ipv6: spec.ipv6,
        state_file: dir.join("state.json"),
        host: LabHost {
            netns: host.clone(),
            uplink: UPLINK.into(),
            uplink_address: UPLINK_ADDR,
            bridge: if spec.ceiling { "" } else { BRIDGE }.into(),
            bridge_address: BRIDGE_ADDR,
            uplink_address6: v6(UPLINK_ADDR6),
            bridge_address6: v6(BRIDGE_ADDR6),
        },
        client: LabClient {
            netns: client.clone(),
            address: CLIENT_ADDR,
            address6: v6(CLIENT_ADDR6),
            echo_port: CLIENT_ECHO_PORT,
        },
        tasks,
    };
    if let Some(options) = engine {
        engine::start(name, &host, options.userland_proxy, spec.ipv6.is_some())?;
        engine::import_image(name)?;
        for (k, ports) in requested_ports(spec).into_iter().enumerate() {
            let task = format!("task{}", k + 1);
            let mut c = engine::ContainerSpec::task(name, &task, ports);
            c.serve = c
                .ports
                .iter()
                .map(|p| (p.protocol, p.container_port))
                .filter(|(_, port)| !spec.unserved.contains(port))
                .collect();
            engine::run(name, &c)?;
        }
        status.tasks = engine::tasks(name, &host)?.0;
    }
    start_servers(spec, &status)?;
    let mut state = state_for(&status);
    if engine.is_some() {
        // The engine is the source of tasks: the file carries the host only.
        state.tasks.clear();
    }
    write(
        &status.state_file,
        &serde_json::to_string_pretty(&state).expect("state serializes"),
    )?;
    write(
        &dir.join("lab.json"),
        &serde_json::to_string_pretty(&status).expect("status serializes"),
    )?;
    Ok(status)
}

/// One echo server for the client and every task in a namespace of its own: a process per
/// task made `up` of a thousand tasks spend most of its time starting them.
fn start_servers(spec: &LabSpec, status: &LabStatus) -> Result<(), LabError> {
    let mut at = Vec::new();
    for t in status.tasks.iter().filter(|t| !t.netns.is_empty()) {
        let mut ports: Vec<(Protocol, u16)> = t
            .port_mappings
            .iter()
            .map(|p| (p.protocol, p.container_port))
            .filter(|(_, port)| !spec.unserved.contains(port))
            .collect();
        ports.sort();
        ports.dedup();
        at.extend(
            ports
                .iter()
                .map(|(proto, port)| format!("{}/{}/{port}", t.netns, proto.as_str())),
        );
    }
    start_server(
        &spec.name,
        &status.client.netns,
        "servers",
        &[
            (Protocol::Tcp, CLIENT_ECHO_PORT),
            (Protocol::Udp, CLIENT_ECHO_PORT),
        ],
        &at,
    )
}

fn write(path: &std::path::Path, text: &str) -> Result<(), LabError> {
    fs::write(path, format!("{text}\n")).map_err(io(path))
}

/// Starts `cmd` in a session of its own (it outlives `lab up`), stdin from /dev/null, stdout
/// and stderr to the new file `log_path`.
fn spawn_detached(
    mut cmd: Command,
    log_path: &std::path::Path,
    what: &str,
) -> Result<std::process::Child, LabError> {
    use std::os::unix::process::CommandExt as _;
    let log = fs::File::create(log_path).map_err(io(log_path))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io(log_path))?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn().map_err(|e| LabError::Command {
        cmd: what.to_owned(),
        stderr: e.to_string(),
    })
}

/// Starts `ecsnet lab serve` inside a namespace of the lab: an echo server on each port, and
/// on each `NETNS/PROTO/PORT` of `at` in that namespace.
fn start_server(
    lab: &str,
    netns: &str,
    who: &str,
    ports: &[(Protocol, u16)],
    at: &[String],
) -> Result<(), LabError> {
    let exe = std::env::current_exe().map_err(io(std::path::Path::new("/proc/self/exe")))?;
    let log_path = lab_dir(lab).join(format!("{who}.log"));
    let mut cmd = Command::new(exe);
    cmd.args(["--netns", netns, "lab", "serve"]);
    for (proto, port) in ports {
        cmd.arg(format!("--{}", proto.as_str()))
            .arg(port.to_string());
    }
    for a in at {
        cmd.arg("--at").arg(a);
    }
    let mut child = spawn_detached(cmd, &log_path, "ecsnet lab serve")?;
    // The lab is up when its servers listen: `lab serve` says so once every socket is bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("serving echo") {
            break;
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::Command {
                cmd: format!("ecsnet lab serve in {netns}"),
                stderr: format!(
                    "{} ({})",
                    log.trim(),
                    if exited.is_some() {
                        "exited"
                    } else {
                        "not listening after 30 s"
                    }
                ),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Reap it whenever it ends, so no zombie outlives `lab down`.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(())
}

/// `ecsnet lab status`.
pub fn status(name: &str) -> Result<LabStatus, LabError> {
    paths::check_name("lab", name)?;
    let path = lab_dir(name).join("lab.json");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LabError::NotFound(name.into()));
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let status: LabStatus = serde_json::from_str(&text).map_err(|source| LabError::Corrupt {
        path: path.clone(),
        source,
    })?;
    if !netns::exists(&status.host.netns) {
        return Err(LabError::NotFound(name.into()));
    }
    if engine::is_engine(name) {
        return Ok(engine_status(status)?.lab);
    }
    Ok(status)
}

/// The status of a real-engine lab: its tasks are the running containers Docker reports now.
fn engine_status(mut lab: LabStatus) -> Result<EngineStatus, LabError> {
    let (tasks, containers) = engine::tasks(&lab.name, &lab.host.netns)?;
    lab.tasks = tasks;
    let docker = engine::docker_status(&lab.name, containers)?;
    Ok(EngineStatus { lab, docker })
}

/// `ecsnet lab status` of a real-engine lab (with its `docker` object); `None` for another.
pub fn docker_status(name: &str) -> Result<Option<EngineStatus>, LabError> {
    let lab = status(name)?;
    if !engine::is_engine(name) {
        return Ok(None);
    }
    engine_status(lab).map(Some)
}

/// What `lab down` removed.
#[derive(Debug, Default)]
pub struct LabDown {
    pub namespaces: Vec<String>,
    pub killed: usize,
    pub instances: Vec<String>,
    /// Of a real-engine lab: mounts undone, and files and folders removed outside the lab's
    /// directory (shim sockets, /run folders dockerd made, cgroups).
    pub unmounted: usize,
    pub removed: Vec<PathBuf>,
}

/// `ecsnet lab down`: stops instances running in the lab, kills every process in its
/// namespaces, deletes the namespaces and the lab directory. Safe on a half-built lab.
pub fn down(name: &str) -> Result<LabDown, LabError> {
    paths::check_name("lab", name)?;
    let nss = namespaces(name);
    let dir = lab_dir(name);
    if nss.is_empty() && !dir.exists() {
        return Err(LabError::NotFound(name.into()));
    }
    let mut report = LabDown::default();
    // An instance whose agent lives in the lab's host namespace goes with it.
    for inst in instances_in(&host_ns(name)) {
        if ecsnet::instance::teardown(&ecsnet::store::paths::InstancePaths::new(&inst)).is_ok() {
            report.instances.push(inst);
        }
    }
    if engine::is_engine(name) {
        let e = engine::clean(name);
        report.killed += e.killed;
        report.unmounted = e.unmounted;
        report.removed = e.removed;
    }
    let kill = |pid| nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok();
    let killed: Vec<_> = topology::pids(&nss)
        .into_iter()
        .filter(|&pid| kill(pid))
        .collect();
    report.killed += killed.len();
    // Gone when `down` returns, not only doomed: a loaded machine may take a while to run a
    // killed echo server's exit.
    engine::wait_gone(&killed, std::time::Duration::from_secs(10));
    for ns in &nss {
        topology::delete(ns)?;
        report.namespaces.push(ns.clone());
    }
    // Gone already is as good as removed.
    if let Err(e) = fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(io(&dir)(e));
    }
    let _ = fs::remove_dir(ecsnet::store::paths::RUN_DIR);
    Ok(report)
}

/// Instances whose `up` ran in `netns`.
fn instances_in(netns: &str) -> Vec<String> {
    fs::read_dir(ecsnet::store::paths::RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let inst = n.strip_suffix(".d")?.to_owned();
            let meta =
                ecsnet::store::files::read_meta(&ecsnet::store::paths::InstancePaths::new(&inst))
                    .ok()??;
            (meta.netns.as_deref() == Some(netns)).then_some(inst)
        })
        .collect()
}

/// Human-readable status.
pub fn render(s: &LabStatus) -> String {
    let inside = if s.ceiling {
        "no bridge: each task behind a /32 route, no netfilter".to_owned()
    } else {
        format!("bridge {} {}", s.host.bridge, s.host.bridge_address)
    };
    let and6 = |a: Option<Ipv6Addr>| a.map(|a| format!(" {a}")).unwrap_or_default();
    let mut out = format!(
        "lab {}: host {} (uplink {} {}{}, {inside}{}), client {} {}{} (echo on {})\n",
        s.name,
        s.host.netns,
        s.host.uplink,
        s.host.uplink_address,
        and6(s.host.uplink_address6),
        and6(s.host.bridge_address6),
        s.client.netns,
        s.client.address,
        and6(s.client.address6),
        s.client.echo_port,
    );
    if let Some(mode) = s.ipv6 {
        let _ = writeln!(
            out,
            "ipv6 {} (fixed-cidr-v6 {BRIDGE_SUBNET6})",
            mode.as_str()
        );
    }
    let _ = writeln!(out, "state file {}", s.state_file.display());
    for t in &s.tasks {
        let ports: Vec<String> = t.port_mappings.iter().map(LabPort::to_string).collect();
        let _ = writeln!(
            out,
            "  {:<8} {:<16} {:<12} {:<15} {}{}",
            t.name,
            t.netns,
            t.interface,
            t.address,
            t.address6.map(|a| format!("{a:<26} ")).unwrap_or_default(),
            ports.join(" ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs() {
        assert_eq!(
            parse_publish("2:8081:80/udp", 2).unwrap(),
            Publish {
                task: 2,
                host_port: 8081,
                container_port: 80,
                protocol: Protocol::Udp
            }
        );
        assert_eq!(parse_publish("1:0:80", 1).unwrap().host_port, 0);
        for bad in [
            "3:1:1",
            "0:1:1",
            "1:1",
            "1:1:0",
            "1:70000:1",
            "1:1:1/sctp",
            "x:1:1",
        ] {
            assert!(parse_publish(bad, 2).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn ports_default_and_dynamic() {
        let spec = LabSpec {
            name: "l".into(),
            tasks: 2,
            publish: vec![],
            ..LabSpec::default()
        };
        let p = plan_ports(&spec, DOCKER_DYNAMIC_PORTS);
        assert_eq!(p[1][0].host_port, 8081);
        let spec = LabSpec {
            name: "l".into(),
            tasks: 2,
            publish: vec![
                parse_publish("1:32768:80", 2).unwrap(),
                parse_publish("2:0:80", 2).unwrap(),
                parse_publish("2:0:53/udp", 2).unwrap(),
            ],
            ..LabSpec::default()
        };
        let p = plan_ports(&spec, DOCKER_DYNAMIC_PORTS);
        assert_eq!(
            p[1][0].host_port, 32769,
            "dynamic skips the static 32768/tcp"
        );
        assert_eq!(p[1][1].host_port, 32768, "udp has its own space");
        assert_eq!(requested_ports(&spec)[1][0].host_port, 0, "asked dynamic");
    }

    #[test]
    fn ipv6_modes_and_docker_addresses() {
        assert_eq!("nat".parse::<Ipv6Mode>().unwrap(), Ipv6Mode::Nat);
        assert_eq!("routed".parse::<Ipv6Mode>().unwrap(), Ipv6Mode::Routed);
        for bad in ["", "NAT", "nat66", "routed ", "off"] {
            let e = bad.parse::<Ipv6Mode>().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
        // dockerd 20.10 with a /64 fixed-cidr-v6: the prefix and the MAC 02:42:<IPv4>.
        assert_eq!(
            task_address6(task_address(1)).to_string(),
            "fd00:172:17::242:ac11:2"
        );
        assert_eq!(
            task_address6(task_address(300)).to_string(),
            "fd00:172:17::242:ac11:12d"
        );
        for a in [UPLINK_ADDR6, CLIENT_ADDR6, BRIDGE_ADDR6] {
            assert!(a.is_unique_local(), "{a}");
        }
        assert!(BRIDGE_SUBNET6.starts_with(&BRIDGE_ADDR6.to_string()[..12]));
    }

    /// A lab status as `build` writes it for an IPv4-only lab.
    fn ipv4_status() -> LabStatus {
        LabStatus {
            name: "l".into(),
            ceiling: false,
            ipv6: None,
            state_file: "/run/ecsnet/l/state.json".into(),
            host: LabHost {
                netns: "l-host".into(),
                uplink: UPLINK.into(),
                uplink_address: UPLINK_ADDR,
                bridge: BRIDGE.into(),
                bridge_address: BRIDGE_ADDR,
                uplink_address6: None,
                bridge_address6: None,
            },
            client: LabClient {
                netns: "l-client".into(),
                address: CLIENT_ADDR,
                address6: None,
                echo_port: CLIENT_ECHO_PORT,
            },
            tasks: vec![LabTask {
                name: "task1".into(),
                netns: "l-task1".into(),
                address: task_address(1),
                address6: None,
                interface: "veth0000001".into(),
                port_mappings: vec![LabPort {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Tcp,
                }],
            }],
        }
    }

    #[test]
    fn ipv4_only_json_is_unchanged() {
        let s = ipv4_status();
        let want = serde_json::json!({
            "name": "l",
            "ceiling": false,
            "stateFile": "/run/ecsnet/l/state.json",
            "host": {
                "netns": "l-host",
                "uplink": "eth0",
                "uplinkAddress": "10.10.0.1",
                "bridge": "docker0",
                "bridgeAddress": "172.17.0.1"
            },
            "client": {"netns": "l-client", "address": "10.10.0.2", "echoPort": 9000},
            "tasks": [{
                "name": "task1",
                "netns": "l-task1",
                "address": "172.17.0.2",
                "interface": "veth0000001",
                "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
            }]
        });
        assert_eq!(serde_json::to_value(&s).unwrap(), want);
        // And an older lab.json (no IPv6 keys) still reads.
        let back: LabStatus = serde_json::from_value(want).unwrap();
        assert_eq!(back, s);
        assert!(!render(&s).contains("ipv6"), "{}", render(&s));
    }

    #[test]
    fn dual_stack_json_and_render_carry_ipv6() {
        let mut s = ipv4_status();
        s.ipv6 = Some(Ipv6Mode::Routed);
        s.host.uplink_address6 = Some(UPLINK_ADDR6);
        s.client.address6 = Some(CLIENT_ADDR6);
        s.tasks[0].address6 = Some(task_address6(s.tasks[0].address));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ipv6"], "routed");
        assert_eq!(v["host"]["uplinkAddress6"], "fd00:10:10::1");
        assert_eq!(v["client"]["address6"], "fd00:10:10::2");
        assert_eq!(v["tasks"][0]["address6"], "fd00:172:17::242:ac11:2");
        assert_eq!(serde_json::from_value::<LabStatus>(v).unwrap(), s);
        let text = render(&s);
        for needle in ["ipv6 routed", "fd00:10:10::1", "fd00:172:17::242:ac11:2"] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
    }

    #[test]
    fn veth_names_fit_ifnamsiz_and_differ() {
        let a = veth_name("lab", 1);
        assert_eq!(a.len(), 11);
        assert_ne!(a, veth_name("lab", 2));
        assert_ne!(a, veth_name("lab2", 1));
        assert_eq!(a, veth_name("lab", 1));
    }

    #[test]
    fn plugged_tasks_sit_high_in_the_bridge_subnet() {
        let t = plugged_tasks("bd123", MAX_TASKS).unwrap();
        assert_eq!(t.len(), MAX_TASKS);
        assert_eq!(t[0].address, Ipv4Addr::new(172, 17, 200, 1));
        assert_eq!(t[999].address, Ipv4Addr::new(172, 17, 203, 232));
        assert_eq!(t[999].port_mappings[0].host_port, 10_999);
        assert_eq!(
            t[0].netns, "bd123-task1",
            "lab down finds it among the lab's"
        );
        let veths: HashSet<&str> = t.iter().map(|t| t.interface.as_str()).collect();
        assert_eq!(veths.len(), MAX_TASKS);
        assert!(plugged_tasks("bd123", 0).unwrap().is_empty());
        assert!(matches!(
            plugged_tasks("bd123", MAX_TASKS + 1),
            Err(LabError::BadTaskCount(_))
        ));
    }
}
