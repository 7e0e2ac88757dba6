//! ecsnet following the real-engine lab's dockerd while containers come and go: the agent
//! brought up with `--docker`, containers run and stopped a few at a time, connections that
//! must outlive it all, and the check that ecsnet's view is Docker's and nothing of a gone
//! container is left in any map, link pin or table.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use ecsnet::state::Protocol;
use ecsnet::{kernel::maps, store::paths::InstancePaths};
use ecsnet_common::{
    ct::CtKey,
    maps::{
        MAP_IFACES, MAP_PORTS, MAP_TASKS, PortKey, PortTarget, ROLE_TASK, ROLE_UPLINK, TaskInfo,
    },
    policy::{MAP_SG_PEERS, MAP_SG_RULES, PeerKey, PeerRules, RuleKey},
};
use ecsnet_lab::lab::LabPort;
use serde_json::{Value, json};

use crate::{
    Lab,
    docker::{self, ContainerSpec},
    ecsnet_ok, ns_exec,
    world::{self, instance_ok},
};

/// The label that gives a container its security groups.
pub const GROUPS_LABEL: &str = "ecsnet.security-groups";
/// The lab's bridge network, 172.17.0.0/16.
const BRIDGE_NET: (u32, u32) = (0xac11_0000, 0xffff_0000);
const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);

/// The lab's state file with `defaultPolicy` and `groups` (the engine gives the tasks),
/// written into the lab's directory; its path.
pub fn state_file(lab: &Lab, default_policy: &str, groups: &[Value]) -> String {
    let mut s = world::state(lab);
    s["host"]["defaultPolicy"] = json!(default_policy);
    s["securityGroups"] = json!(groups);
    world::write(lab, "churn-state.json", &s)
}

/// `ecsnet up --state FILE --docker URL --window 1 EXTRA...` on the lab's host.
pub fn up(lab: &Lab, file: &str, url: &str, extra: &[&str]) -> String {
    let mut args = vec!["up", "--state", file, "--docker", url, "--window", "1"];
    args.extend_from_slice(extra);
    ecsnet_ok(&lab.ecsnet_args(&args))
}

/// The lab's own engine, `unix://...`.
pub fn engine_url(lab: &Lab) -> String {
    docker::engine::EnginePaths::new(&lab.name).url()
}

/// A container of ECS task `name` on lab `lab` with the ECS agent's labels, `ports`, and the
/// security groups `groups` in its label (none: no label).
pub fn spec(lab: &str, name: &str, ports: &[LabPort], groups: &[&str]) -> ContainerSpec {
    let mut s = ContainerSpec::task(lab, name, ports.to_vec());
    if !groups.is_empty() {
        s.labels.push((GROUPS_LABEL.to_owned(), groups.join(",")));
    }
    s
}

/// TCP `container` published on host port `host`.
pub fn fixed(host: u16, container: u16) -> LabPort {
    LabPort {
        host_port: host,
        container_port: container,
        protocol: Protocol::Tcp,
    }
}

/// TCP `container` published on a host port Docker picks.
pub fn dynamic(container: u16) -> LabPort {
    fixed(0, container)
}

/// A running container as Docker has it, with its host veth's ifindex.
#[derive(Debug, Clone)]
pub struct Running {
    pub id: String,
    pub name: String,
    pub pid: i32,
    pub address: Ipv4Addr,
    pub interface: String,
    pub ifindex: u32,
    pub ports: Vec<LabPort>,
}

/// The lab's running containers (`docker ps` and inspect, the veth found through each one's
/// namespace).
pub fn running(lab: &Lab) -> Vec<Running> {
    let (tasks, containers) =
        docker::engine::tasks(&lab.name, lab.host()).unwrap_or_else(|e| panic!("{e}"));
    let index = ifindexes(lab.host());
    tasks
        .into_iter()
        .zip(containers)
        .map(|(t, c)| Running {
            ifindex: *index
                .get(&t.interface)
                .unwrap_or_else(|| panic!("no {} in {}", t.interface, lab.host())),
            id: c.id,
            name: c.name,
            pid: c.pid,
            address: t.address,
            interface: t.interface,
            ports: t.port_mappings,
        })
        .collect()
}

/// The running container named `name`.
pub fn container(lab: &Lab, name: &str) -> Running {
    running(lab)
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no running container {name}"))
}

/// Interface name -> ifindex in namespace `ns`.
pub fn ifindexes(ns: &str) -> BTreeMap<String, u32> {
    let v: Value =
        serde_json::from_str(&ns_exec(ns, &["ip", "-j", "link", "show"])).expect("ip -j link show");
    v.as_array()
        .expect("a list of links")
        .iter()
        .filter_map(|l| {
            Some((
                l["ifname"].as_str()?.to_owned(),
                u32::try_from(l["ifindex"].as_u64()?).ok()?,
            ))
        })
        .collect()
}

/// `task ls --json` of the lab's instance: container id -> task name, for the engine's tasks.
pub fn task_ls(lab: &Lab) -> BTreeMap<String, String> {
    let v: Value =
        serde_json::from_str(&instance_ok(lab, &["task", "ls", "--json"])).expect("task ls --json");
    v.as_array()
        .expect("a list of tasks")
        .iter()
        .filter(|t| t["source"] == "docker")
        .map(|t| {
            (
                t["containerId"].as_str().unwrap_or_default().to_owned(),
                t["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `docker ps`: the ids of the lab's running containers.
pub fn docker_ps(lab: &Lab) -> BTreeSet<String> {
    docker::docker_ok(lab, &["ps", "-q", "--no-trunc"])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Waits (10 s at most) until `task ls` lists container `id`.
pub fn wait_task(lab: &Lab, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !task_ls(lab).contains_key(id) {
        assert!(
            Instant::now() < deadline,
            "container {} is no task 10 s after it started; task ls: {:?}",
            &id[..12],
            task_ls(lab)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The engine object of `stats --json`.
pub fn engine_stats(lab: &Lab) -> ecsnet::store::files::EngineStatus {
    lab.stats()
        .engine
        .expect("stats --json of an instance following an engine has an engine object")
}

/// Waits (`limit` at most) until `task ls` is `docker ps` and no map, table or link pin holds
/// anything of a container that is not running; fails with what differs.
pub fn assert_converged(lab: &Lab, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let ps = docker_ps(lab);
        let ls: BTreeSet<String> = task_ls(lab).into_keys().collect();
        let stale = if ls == ps {
            stale_entries(lab, &running(lab))
        } else {
            vec![format!("task ls {ls:?} is not docker ps {ps:?}")]
        };
        if stale.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ecsnet's view is not Docker's {} s on:\n{}",
            limit.as_secs(),
            stale.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every entry of the pinned hash map `map` of instance `paths`.
fn dump<K: Pod, V: Pod>(paths: &InstancePaths, map: &str) -> Vec<(K, V)> {
    let pin = paths.map_pin(map);
    let data = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let m: HashMap<MapData, K, V> = Map::from_map_data(data)
        .and_then(TryInto::try_into)
        .unwrap_or_else(|e| panic!("{map}: {e}"));
    m.iter()
        .map(|e| e.unwrap_or_else(|e| panic!("{map}: {e}")))
        .collect()
}

/// An address in network byte order, as the datapath's keys hold it.
fn net(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr))
}

/// What the maps, tables and link pins of the lab's instance hold that `live` (the running
/// containers) does not account for: entries of gone containers, links on gone interfaces.
pub fn stale_entries(lab: &Lab, live: &[Running]) -> Vec<String> {
    let paths = InstancePaths::new(&lab.name);
    let addrs: BTreeSet<Ipv4Addr> = live.iter().map(|r| r.address).collect();
    let uplink = lab.stats().uplink.ifindex;
    let mut ifaces: BTreeSet<u32> = live.iter().map(|r| r.ifindex).collect();
    ifaces.insert(uplink);
    let mut stale = stale_rows(&paths, live, uplink, &ifaces);
    stale.extend(stale_flows_and_policy(&paths, &addrs));
    stale.extend(stale_counters_and_links(&paths, &ifaces));
    stale
}

/// Rows of TASKS, IFACES and PORTS that are not the running containers' (`live`, on
/// `ifaces` with the uplink).
fn stale_rows(
    paths: &InstancePaths,
    live: &[Running],
    uplink: u32,
    ifaces: &BTreeSet<u32>,
) -> Vec<String> {
    let mut stale = Vec::new();
    // TASKS: one per running container, on its veth.
    let tasks: Vec<(u32, TaskInfo)> = dump(paths, MAP_TASKS);
    for (a, t) in &tasks {
        let ok = live
            .iter()
            .any(|r| r.address == net(*a) && r.ifindex == t.ifindex);
        if !ok {
            stale.push(format!("TASKS {} -> ifindex {}", net(*a), t.ifindex));
        }
    }
    for r in live {
        if !tasks.iter().any(|(a, _)| net(*a) == r.address) {
            stale.push(format!("TASKS lacks {} ({})", r.address, r.name));
        }
    }
    // IFACES: the uplink and the running containers' veths, nothing held.
    let rows: Vec<(u32, ecsnet_common::maps::IfaceInfo)> = dump(paths, MAP_IFACES);
    for (i, row) in &rows {
        let want = if *i == uplink { ROLE_UPLINK } else { ROLE_TASK };
        if !ifaces.contains(i) || row.role != want {
            stale.push(format!("IFACES {i} -> {row:?}"));
        }
    }
    // PORTS: exactly the host ports Docker bound for running containers, to them.
    let ports: Vec<(PortKey, PortTarget)> = dump(paths, MAP_PORTS);
    for (k, t) in &ports {
        let port = u16::from_be(k.port);
        let ok = live.iter().any(|r| {
            r.address == net(t.addr)
                && r.ports.iter().any(|p| {
                    p.host_port == port
                        && p.protocol.number() == k.proto
                        && p.container_port == u16::from_be(t.port)
                })
        });
        if !ok {
            stale.push(format!(
                "PORTS {port}/{} -> {}:{}",
                k.proto,
                net(t.addr),
                u16::from_be(t.port)
            ));
        }
    }
    let published: usize = live.iter().map(|r| r.ports.len()).sum();
    if ports.len() != published {
        stale.push(format!(
            "PORTS has {} entries, Docker bound {published}",
            ports.len()
        ));
    }
    stale
}

/// Entries of the connection tables and the security-group maps that name an address of the
/// bridge network no running container (`addrs`) has, or a policy no task uses.
fn stale_flows_and_policy(paths: &InstancePaths, addrs: &BTreeSet<Ipv4Addr>) -> Vec<String> {
    let mut stale = Vec::new();
    let policies: BTreeSet<u32> = dump::<u32, TaskInfo>(paths, MAP_TASKS)
        .iter()
        .map(|(_, t)| t.policy)
        .collect();
    // CT, CT_NEW: no address of the bridge network but running containers' and the bridge's.
    let bridge_addr = |a: Ipv4Addr| u32::from(a) & BRIDGE_NET.1 == BRIDGE_NET.0;
    let known = |a: Ipv4Addr| !bridge_addr(a) || a == BRIDGE_ADDR || addrs.contains(&a);
    for (table, k, e) in maps::read_ct(paths).expect("read the connection tables") {
        let all: [u32; 6] = [
            k.saddr,
            k.daddr,
            e.peer.saddr,
            e.peer.daddr,
            e.nat_saddr,
            e.nat_daddr,
        ];
        if let Some(a) = all.iter().map(|a| net(*a)).find(|a| !known(*a)) {
            stale.push(format!("{table} {} of gone {a}: {e:?}", flow(&k)));
        }
    }
    // SG_PEERS, SG_RULES: only the live tasks' policies, no gone member as a /32 peer.
    let peers: Vec<(PeerKey, PeerRules)> = dump(paths, MAP_SG_PEERS);
    for (k, _) in &peers {
        if !policies.contains(&(k.scope >> 1)) {
            stale.push(format!("SG_PEERS of policy {} no task has", k.scope >> 1));
        } else if k.len == 32 && !known(net(k.addr)) {
            stale.push(format!("SG_PEERS peer {} is gone", net(k.addr)));
        }
    }
    let sets: BTreeSet<u32> = peers.iter().map(|(_, r)| r.set).collect();
    let rules: Vec<(RuleKey, u32)> = dump(paths, MAP_SG_RULES);
    for (k, _) in rules.iter().filter(|(k, _)| !sets.contains(&k.set)) {
        stale.push(format!("SG_RULES of rule set {} no peer names", k.set));
    }
    stale
}

/// Counters and tcx link pins of interfaces that are not attached (`ifaces`), and links on a
/// gone interface.
fn stale_counters_and_links(paths: &InstancePaths, ifaces: &BTreeSet<u32>) -> Vec<String> {
    let mut stale = Vec::new();
    // STATS, DROPS: counters of attached interfaces only.
    let counted = maps::read_counts(paths).expect("read STATS");
    for i in counted.keys().filter(|i| !ifaces.contains(i)) {
        stale.push(format!("STATS of ifindex {i}"));
    }
    let drops = maps::read_drops(paths).expect("read DROPS");
    for (i, r) in drops.keys().filter(|(i, _)| !ifaces.contains(i)) {
        stale.push(format!("DROPS of ifindex {i} (reason {r})"));
    }
    // Link pins: tcx ingress and egress on each attached interface, each link live on it.
    let mut pinned = BTreeSet::new();
    for e in fs::read_dir(paths.link_dir())
        .expect("the link pins")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(i) = name
            .strip_prefix("tcx-ingress-")
            .or_else(|| name.strip_prefix("tcx-egress-"))
            .and_then(|i| i.parse::<u32>().ok())
        else {
            continue;
        };
        pinned.insert(i);
        let on = link_ifindex(&e.path());
        if !ifaces.contains(&i) || on != Some(i) {
            stale.push(format!("link pin {name}: its link is on ifindex {on:?}"));
        }
    }
    if pinned != *ifaces {
        stale.push(format!(
            "tcx links pinned on {pinned:?}, attached interfaces are {ifaces:?}"
        ));
    }
    stale
}

/// The ifindex a pinned tcx link is attached to, from its fdinfo (0 once its device went;
/// this machine's bpftool predates tcx and does not say).
fn link_ifindex(pin: &std::path::Path) -> Option<u32> {
    let link: FdLink = PinnedLink::from_pin(pin).ok()?.into();
    let id = link.info().ok()?.id();
    let want = format!("link_id:\t{id}");
    fs::read_dir("/proc/self/fdinfo")
        .ok()?
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .find(|info| info.lines().any(|l| l == want))?
        .lines()
        .find_map(|l| l.strip_prefix("ifindex:"))
        .and_then(|v| v.trim().parse().ok())
}

fn flow(k: &CtKey) -> String {
    format!(
        "{}:{} -> {}:{} proto {}",
        net(k.saddr),
        u16::from_be(k.sport),
        net(k.daddr),
        u16::from_be(k.dport),
        k.proto
    )
}

// ---- connections -----------------------------------------------------------------------------

/// Runs `f` on a thread that has entered the network namespace of process `pid` (a
/// container's): sockets it opens are the container's.
pub fn in_pid_netns<T: Send + 'static>(pid: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/proc/{pid}/ns/net");
    std::thread::spawn(move || {
        let fd = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP connection from container process `pid` to `to`, given up after `timeout`.
pub fn connect_from(pid: i32, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_pid_netns(pid, move || TcpStream::connect_timeout(&to, timeout))
}

/// A long-lived echo connection kept busy on a thread of its own (a message every 20 ms)
/// until `finish`: how many exchanges it made, or the error that ended it.
pub struct Keeper {
    name: String,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<u64, String>>>,
}

impl Keeper {
    pub fn start(name: &str, mut s: TcpStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            let mut back = [0u8; 64];
            loop {
                let msg = [u8::try_from(n % 251).unwrap_or(0); 64];
                let done = stop2.load(Ordering::Relaxed);
                s.write_all(&msg)
                    .and_then(|()| s.read_exact(&mut back))
                    .map_err(|e| format!("{e} ({:?}) after {n} exchanges", e.kind()))?;
                if back != msg {
                    return Err(format!("exchange {n} came back different"));
                }
                n += 1;
                if done {
                    return Ok(n);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Keeper {
            name: name.to_owned(),
            stop,
            handle: Some(handle),
        }
    }

    /// Whether it still exchanges (its thread has not ended on an error).
    pub fn alive(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Stops after one last exchange; fails the test if the connection broke at any time.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.handle.take().unwrap().join().expect("keeper thread");
        r.unwrap_or_else(|e| panic!("{}: the connection broke: {e}", self.name))
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- churn -----------------------------------------------------------------------------------

/// Start/stop cycles of containers on a lab, `workers` at a time, on threads of their own:
/// each cycle runs a container (`docker run -d`, its server listening), waits until ecsnet has
/// it as a task, reaches its published port once from the lab's client, then stops and removes
/// it. Runs until `cycles` are done, or `stop` when given earlier.
pub struct Churn {
    done: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    /// Whether a cycle waits for ecsnet to have its container as a task (not while the agent
    /// is dead).
    follow: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Result<(), String>>>,
}

impl Churn {
    /// `make(i)` is the container of cycle `i`.
    pub fn start(
        lab: &Lab,
        cycles: u32,
        workers: u32,
        make: impl Fn(u32) -> ContainerSpec + Send + Sync + 'static,
    ) -> Self {
        let done = Arc::new(AtomicU32::new(0));
        let next = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let follow = Arc::new(AtomicBool::new(true));
        let make = Arc::new(make);
        let handles = (0..workers)
            .map(|_| {
                let (done, next, stop, make) =
                    (done.clone(), next.clone(), stop.clone(), make.clone());
                let follow = follow.clone();
                let (name, client) = (lab.name.clone(), lab.client().to_owned());
                std::thread::spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= cycles || stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        cycle(&name, &client, &make(i), &follow)?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Churn {
            done,
            stop,
            follow,
            workers: handles,
        }
    }

    /// Whether the cycles from now on wait for ecsnet to have their container as a task.
    pub fn follow(&self, on: bool) {
        self.follow.store(on, Ordering::Relaxed);
    }

    /// Cycles finished so far.
    pub fn done(&self) -> u32 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` cycles are done (`limit` at most).
    pub fn wait_done(&self, n: u32, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.done() < n {
            assert!(
                Instant::now() < deadline && !self.workers.iter().all(JoinHandle::is_finished),
                "churn: {} of {n} cycles done after {} s",
                self.done(),
                limit.as_secs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops after the cycles under way; fails on any cycle's error; the cycles done.
    pub fn finish(mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            w.join()
                .expect("churn worker")
                .unwrap_or_else(|e| panic!("churn: {e}"));
        }
        self.done()
    }

    /// Waits until all `cycles` are done; fails on any cycle's error.
    pub fn join(mut self) -> u32 {
        for w in self.workers.drain(..) {
            w.join()
                .expect("churn worker")
                .unwrap_or_else(|e| panic!("churn: {e}"));
        }
        self.done()
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One cycle on lab `lab`: run, wait for the task (while `follow`), reach its first published
/// port from namespace `client`, stop, remove.
fn cycle(lab: &str, client: &str, spec: &ContainerSpec, follow: &AtomicBool) -> Result<(), String> {
    use docker::engine;
    let id = engine::run(lab, spec).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let known = || {
        crate::ecsnet(&["--instance", lab, "task", "ls", "--json"])
            .stdout
            .windows(id.len())
            .any(|w| w == id.as_bytes())
    };
    while follow.load(Ordering::Relaxed) && !known() {
        if Instant::now() > deadline {
            return Err(format!("{} is no task 10 s after it started", spec.name));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !spec.ports.is_empty() {
        let port = engine::docker_ok(lab, &["port", &id])
            .map_err(|e| e.to_string())?
            .lines()
            .find_map(|l| l.split_once(" -> 0.0.0.0:").map(|(_, p)| p.to_owned()))
            .ok_or_else(|| format!("{}: no port bound", spec.name))?;
        let to: SocketAddr = format!("10.10.0.1:{port}").parse().expect("an address");
        let mut s = crate::traffic::tcp_connect(client, to, Duration::from_secs(2))
            .map_err(|e| format!("{} via {to}: {e}", spec.name))?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        crate::traffic::echo(&mut s, b"churn")
            .map_err(|e| format!("{} via {to}: {e}", spec.name))?;
    }
    engine::stop(lab, &spec.name, 1).map_err(|e| e.to_string())?;
    engine::rm(lab, &spec.name).map_err(|e| e.to_string())
}
