//! `ecsnet bench discovery`: how long a container started with `docker run` waits for its own
//! policy, on a real-engine lab of its own with ecsnet following the engine (issue 18).
//!
//! Under load (`DiscoveryLoad`), namespace tasks plugged into dockerd's docker0 are in the
//! state file beside the engine's containers, so every apply carries them, and flows seeded
//! into the connection table (as `bench scale` seeds them) are there for every apply to scan.
//!
//! Each run timestamps, on the wall clock in nanoseconds: the container's veth appearing on
//! docker0 (this process's own rtnetlink subscription in the lab's host namespace), Docker's
//! start event (`timeNano` of `docker events`), `docker run -d` returning, and the task's own
//! policy being live (the pinned `TASKS` entry of its address with its veth and a policy, and
//! `IFACES` saying `ROLE_TASK`, polled every `POLL` for each port docker0 gained since the
//! benchmark began: a poll costs the same with a thousand tasks as with none).

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::Serialize;

use ecsnet::{
    engine::labels::SECURITY_GROUPS,
    host::{
        netlink::{LinkEvent, LinkEvents, Snapshot},
        netns,
    },
    state::{DefaultPolicy, IpPermission, SecurityGroup},
    store::paths::InstancePaths,
};
use ecsnet_common::maps::{IfaceInfo, MAP_IFACES, MAP_TASKS, ROLE_HELD, ROLE_TASK, TaskInfo};

use super::{BenchError, DEFAULT_CONGESTION, scale, step, tools::Labs};
use crate::{
    lab::{self, BRIDGE, LabTask, engine},
    stats,
};

/// How often the pinned maps are read while a container starts.
const POLL: Duration = Duration::from_micros(200);
/// How long one run may wait for each timestamp before the benchmark fails.
const WAIT: Duration = Duration::from_secs(10);
/// How long the agent's applied state must stay unchanged after a run's container went
/// before the next run starts: the applies its departure caused (which cut its flows, a scan
/// of the whole connection table) are over.
const QUIET: Duration = Duration::from_secs(1);
/// How long the agent may take to go quiet after a run.
const SETTLE: Duration = Duration::from_secs(60);
/// The target: p99 of live - start event, milliseconds.
pub const TARGET_P99_MS: f64 = 50.0;
/// The group every container of the benchmark names in its label.
const GROUP: &str = "sg-0bench0d15c0ver1";
/// The group of the plugged namespace tasks: their port 80 open to the bridge's subnet and
/// the client (the seeded flows' sources), everything out.
const LOAD_GROUP: &str = "sg-0bench0d15c0load";

/// What else is on the host while containers start: namespace tasks in the state file and
/// flows seeded into the connection table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryLoad {
    /// Namespace tasks plugged into docker0 and configured in the state file.
    pub tasks: usize,
    /// Flows seeded into `CT` before the runs (`scale::seed_flows`).
    pub flows: usize,
}

/// One `docker run`: its timestamps, wall clock, nanoseconds since the epoch.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryRun {
    pub container: String,
    pub address: Ipv4Addr,
    /// The host end of its veth.
    pub ifindex: u32,
    /// Its policy as `TASKS` holds it.
    pub policy: u32,
    pub veth_ns: i64,
    /// The agent held the veth at the default policy (`IFACES` said `ROLE_HELD`); 0 when no
    /// poll saw it held (it became the task's before the first poll after it appeared).
    pub held_ns: i64,
    pub event_ns: i64,
    pub returned_ns: i64,
    /// The agent's follow thread took the engine's view that made it a task (wrote
    /// `discovered.json`, under the apply lock), as seen by the same poll as `live_ns`.
    pub view_ns: i64,
    pub live_ns: i64,
    /// How late `live_ns` may be: the time since the poll before (`POLL` on an idle
    /// machine, more when this process waited for a CPU).
    pub live_uncertainty_ns: i64,
    /// How long the agent's threads waited for a CPU (run queue, summed over its threads)
    /// between `docker run` and the policy seen live: a busy machine's share of the wait.
    pub agent_cpu_wait_ns: i64,
}

/// One latency over every run, milliseconds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// `live-veth`, `live-event` or `live-returned`; the parts of `live-event`: `view-event`
    /// (the engine follower: event, inspect, hand-over, apply lock) and `live-view` (the
    /// apply: snapshot, plan, map writes); `held-veth`, from the veth on docker0 to the agent
    /// holding it at the default policy (runs where a poll saw it held); not latencies but of
    /// each run: `agent-cpu-wait`,
    /// how long the agent waited for a CPU, and `live-uncertainty`, how late the poll that saw
    /// the policy live may have been.
    pub metric: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub n: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryBench {
    /// The lab it built (down again when the report is made).
    pub lab: String,
    pub runs: usize,
    pub poll_us: u64,
    pub docker_version: String,
    pub load: DiscoveryLoad,
    /// The connection-table size `up` was given (0: its default).
    pub ct_size: u32,
    /// The plugged tasks whose address had a nonzero policy in `TASKS` when the first run
    /// began.
    pub plugged_live: usize,
    /// Flows tracked (`stats`) when the first run began and after the last.
    pub flows_before: u64,
    pub flows_after: u64,
    /// Seconds spent plugging the namespace tasks, and seeding the flows.
    pub plug_s: f64,
    pub seed_s: f64,
    /// `/proc/loadavg` when the first run began and after the last.
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub target_p99_ms: f64,
    /// Whether p99 of live - start event is within the target.
    pub target_met: bool,
    pub latencies: Vec<Latency>,
    pub samples: Vec<DiscoveryRun>,
}

fn now_ns() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
}

/// Waits until `found` gives a value, at most `WAIT`.
fn wait_for<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> Result<T, BenchError> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = found() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(step(what)(format!("not seen within {} s", WAIT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A thread of its own that ends when `stop` is set; joined on drop.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ports of docker0 as the kernel announces them in the lab's host namespace: ifindex ->
/// (name, when first seen with docker0 as master).
struct Links {
    seen: Arc<Mutex<HashMap<u32, (String, i64)>>>,
    _watcher: Watcher,
}

impl Links {
    /// Subscribes in namespace `ns` (on a thread of its own); returns once subscribed.
    fn watch(ns: &str) -> Result<Self, BenchError> {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, subscribed) = mpsc::channel();
        let (ns, into, halt) = (ns.to_owned(), Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || link_thread(&ns, &into, &halt, &ready));
        let watcher = Watcher {
            stop,
            thread: Some(thread),
        };
        subscribed
            .recv()
            .unwrap_or_else(|_| Err("the link thread ended".to_owned()))
            .map_err(step("rtnetlink link events in the lab's host"))?;
        Ok(Links {
            seen,
            _watcher: watcher,
        })
    }

    /// The index and first time on docker0 of the port named `name`.
    fn find(&self, name: &str) -> Option<(u32, i64)> {
        locked(&self.seen)
            .iter()
            .find(|(_, (n, _))| n == name)
            .map(|(i, (_, t))| (*i, *t))
    }
}

fn link_thread(
    ns: &str,
    seen: &Mutex<HashMap<u32, (String, i64)>>,
    stop: &AtomicBool,
    ready: &mpsc::Sender<Result<(), String>>,
) {
    let setup = || -> Result<(tokio::runtime::Runtime, LinkEvents, u32), String> {
        netns::enter(ns).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| e.to_string())?;
        // Subscribed before the snapshot, as the agent does.
        let events = rt
            .block_on(async { LinkEvents::subscribe() })
            .map_err(|e| e.to_string())?;
        let snap = rt
            .block_on(Snapshot::read_async())
            .map_err(|e| e.to_string())?;
        let bridge = snap
            .by_name(BRIDGE)
            .ok_or_else(|| format!("no {BRIDGE} in {ns}"))?
            .index;
        Ok((rt, events, bridge))
    };
    let (rt, mut events, bridge) = match setup() {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let next = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), events.next()).await
        });
        match next {
            Ok(Some(LinkEvent::New(link))) if link.master == Some(bridge) => {
                let t = now_ns();
                locked(seen).entry(link.index).or_insert((link.name, t));
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => {
                log::warn!("link announcements ended in {ns}");
                return;
            }
        }
    }
}

/// Docker's start events from `docker events`: container id -> `timeNano`.
struct StartEvents {
    seen: Arc<Mutex<HashMap<String, i64>>>,
    child: Child,
    reader: Option<JoinHandle<()>>,
}

impl StartEvents {
    /// Follows lab `lab`'s start events from now on (`--since` now: none is missed while
    /// the client connects).
    fn follow(lab: &str) -> Result<Self, BenchError> {
        let since = now_ns();
        let since = format!("{}.{:09}", since / 1_000_000_000, since % 1_000_000_000);
        let mut cmd = engine::docker(lab);
        cmd.args(["events", "--since", &since, "--format", "{{json .}}"])
            .args(["--filter", "type=container", "--filter", "event=start"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| step("docker events")(e.to_string()))?;
        let out = child.stdout.take().expect("stdout is piped");
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let into = Arc::clone(&seen);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let (Some(id), Some(t)) = (v["id"].as_str(), v["timeNano"].as_i64()) {
                    locked(&into).insert(id.to_owned(), t);
                }
            }
        });
        Ok(StartEvents {
            seen,
            child,
            reader: Some(reader),
        })
    }

    fn of(&self, id: &str) -> Option<i64> {
        locked(&self.seen).get(id).copied()
    }
}

impl Drop for StartEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// When each (address, veth) pair first had its own policy live: its `TASKS` entry with that
/// veth and a policy, and the veth's `IFACES` row a task's of that address. Polls every
/// `POLL` while `active`, and sleeps otherwise. Also watches the agent's `discovered.json`,
/// written when its follow thread takes a view of the engine to apply it: the last time it
/// changed before a policy went live splits the wait into the engine's part and the apply's.
struct Live {
    /// (address, veth) -> (live, policy, view written).
    seen: Arc<Mutex<HashMap<(u32, u32), Seen>>>,
    /// veth -> when `IFACES` first had it held (`ROLE_HELD`: the default policy).
    held: Arc<Mutex<HashMap<u32, i64>>>,
    active: Arc<AtomicBool>,
    _watcher: Watcher,
}

fn open_map<K: aya::Pod, V: aya::Pod>(
    paths: &InstancePaths,
    name: &str,
) -> Result<BpfHashMap<MapData, K, V>, BenchError> {
    let path = paths.map_pin(name);
    let what = format!("opening {}", path.display());
    let data = MapData::from_pin(&path).map_err(|e| step(what.clone())(e.to_string()))?;
    let map = Map::from_map_data(data).map_err(|e| step(what.clone())(e.to_string()))?;
    BpfHashMap::try_from(map).map_err(|e| step(what)(e.to_string()))
}

/// A task's policy live: when, which policy, and when the view that made it was written.
#[derive(Debug, Clone, Copy)]
struct Seen {
    live_ns: i64,
    /// The poll before the one that saw it: the policy went live after this.
    before_ns: i64,
    policy: u32,
    view_ns: i64,
}

/// Tells when a file is replaced (by rename: a new inode) or rewritten.
struct FileChange {
    path: std::path::PathBuf,
    last: Option<(u64, std::time::SystemTime)>,
    changed_ns: i64,
}

impl FileChange {
    fn poll(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let now = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.ino(), m.modified().ok()?)));
        if now.is_some() && now != self.last {
            self.last = now;
            self.changed_ns = now_ns();
        }
    }
}

impl Live {
    /// Watches the ports `links` sees join docker0.
    fn watch(instance: &str, links: &Links) -> Result<Self, BenchError> {
        let paths = InstancePaths::new(instance);
        let mut view = FileChange {
            path: paths.discovered(),
            last: None,
            changed_ns: 0,
        };
        let tasks: BpfHashMap<MapData, u32, TaskInfo> = open_map(&paths, MAP_TASKS)?;
        let ifaces: BpfHashMap<MapData, u32, IfaceInfo> = open_map(&paths, MAP_IFACES)?;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let active = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(HashMap::new()));
        let (into, on, halt) = (Arc::clone(&seen), Arc::clone(&active), Arc::clone(&stop));
        let held_into = Arc::clone(&held);
        let ports = Arc::clone(&links.seen);
        let thread = std::thread::spawn(move || {
            let mut last_poll = now_ns();
            let mut done = std::collections::HashSet::new();
            while !halt.load(Ordering::Relaxed) {
                view.poll();
                if !on.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let new: Vec<u32> = locked(&ports)
                    .keys()
                    .filter(|i| !done.contains(*i))
                    .copied()
                    .collect();
                for ifindex in new {
                    let Ok(i) = ifaces.get(&ifindex, 0) else {
                        continue;
                    };
                    if i.role == ROLE_HELD {
                        locked(&held_into).entry(ifindex).or_insert_with(now_ns);
                    }
                    let addr = i.ipv4;
                    let own = (i.role == ROLE_TASK)
                        .then(|| tasks.get(&addr, 0).ok())
                        .flatten()
                        .filter(|t| t.ifindex == ifindex && t.policy != 0);
                    if let Some(t) = own {
                        let key = (addr, ifindex);
                        let seen = Seen {
                            live_ns: now_ns(),
                            before_ns: last_poll,
                            policy: t.policy,
                            view_ns: view.changed_ns,
                        };
                        locked(&into).insert(key, seen);
                        done.insert(ifindex);
                    }
                }
                last_poll = now_ns();
                std::thread::sleep(POLL);
            }
        });
        Ok(Live {
            seen,
            held,
            active,
            _watcher: Watcher {
                stop,
                thread: Some(thread),
            },
        })
    }

    fn held(&self, ifindex: u32) -> Option<i64> {
        locked(&self.held).get(&ifindex).copied()
    }

    fn of(&self, addr: Ipv4Addr, ifindex: u32) -> Option<Seen> {
        locked(&self.seen)
            .get(&(u32::from(addr).to_be(), ifindex))
            .copied()
    }
}

/// The state file: the lab's host with `defaultPolicy: deny` (a held veth passes nothing),
/// the `plugged` namespace tasks in `LOAD_GROUP`, and the one group the containers name, open
/// to the lab's client on 80/tcp.
fn write_state(status: &lab::LabStatus, plugged: &[LabTask]) -> Result<(), BenchError> {
    let mut state = lab::state_for(&lab::LabStatus {
        tasks: plugged.to_vec(),
        ..status.clone()
    });
    for t in &mut state.tasks {
        t.security_groups = vec![LOAD_GROUP.to_owned()];
    }
    state.host.default_policy = DefaultPolicy::Deny;
    let everywhere = || vec![IpPermission::from_cidr("-1", None, "0.0.0.0/0")];
    let load_group = SecurityGroup {
        group_id: LOAD_GROUP.to_owned(),
        group_name: Some("bench-discovery-load".to_owned()),
        ip_permissions: [
            lab::BRIDGE_SUBNET.to_owned(),
            format!("{}/32", lab::CLIENT_ADDR),
        ]
        .into_iter()
        .map(|cidr| IpPermission::from_cidr("tcp", Some((80, 80)), cidr))
        .collect(),
        ip_permissions_egress: everywhere(),
    };
    state.security_groups = vec![
        load_group,
        SecurityGroup {
            group_id: GROUP.to_owned(),
            group_name: Some("bench-discovery".to_owned()),
            ip_permissions: vec![IpPermission::from_cidr(
                "tcp",
                Some((80, 80)),
                format!("{}/32", lab::CLIENT_ADDR),
            )],
            ip_permissions_egress: everywhere(),
        },
    ];
    let text = serde_json::to_string_pretty(&state).expect("state serializes");
    std::fs::write(&status.state_file, text).map_err(|source| BenchError::Write {
        path: status.state_file.clone(),
        source,
    })
}

/// Nanoseconds the threads of process `pid` have waited on a run queue, summed (the second
/// field of each thread's schedstat); 0 when it cannot be read.
fn cpu_wait_ns(pid: i32) -> i64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .sum()
}

/// Everything one run watches with.
struct Rig<'a> {
    lab: &'a lab::LabStatus,
    links: &'a Links,
    events: &'a StartEvents,
    live: &'a Live,
    /// The agent's process.
    agent: i32,
}

/// One `docker run -d` of a labelled container, timed; the container stopped and removed
/// after, and its `TASKS` entry gone before the next run.
fn one_run(rig: &Rig<'_>, i: usize) -> Result<DiscoveryRun, BenchError> {
    let lab = &rig.lab.name;
    let name = format!("disc{i}");
    let mut args: Vec<String> = ["run", "-d", "--init", "--name", &name]
        .map(str::to_owned)
        .to_vec();
    let labels = engine::ecs_labels(lab, &name).into_iter().chain([
        (engine::LAB_LABEL.to_owned(), lab.clone()),
        (SECURITY_GROUPS.to_owned(), GROUP.to_owned()),
    ]);
    for (k, v) in labels {
        args.extend(["--label".to_owned(), format!("{k}={v}")]);
    }
    args.extend([engine::IMAGE, "sleep", "3600"].map(str::to_owned));
    rig.live.active.store(true, Ordering::Relaxed);
    let waited = cpu_wait_ns(rig.agent);
    let out = engine::docker(lab)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let returned_ns = now_ns();
    let out = out.map_err(|e| step(format!("docker run {name}"))(e.to_string()))?;
    if !out.status.success() {
        return Err(step(format!("docker run {name}"))(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let measured = measure(rig, &name, &id, returned_ns).map(|mut run| {
        run.agent_cpu_wait_ns = cpu_wait_ns(rig.agent) - waited;
        run
    });
    rig.live.active.store(false, Ordering::Relaxed);
    let stopped = engine::stop(lab, &name, 1).and_then(|()| engine::rm(lab, &name));
    let run = measured?;
    stopped?;
    // Gone means gone: the next run starts with nothing of this one in TASKS.
    let paths = InstancePaths::new(lab);
    wait_for(&format!("{name}'s TASKS entry going"), || {
        let tasks = ecsnet::kernel::maps::read_tasks(&paths).ok()?;
        (!tasks.iter().any(|(_, t)| t.ifindex == run.ifindex)).then_some(())
    })?;
    settle(&paths)?;
    Ok(run)
}

/// Whether an apply holds instance `paths`'s apply lock now (taken and let go at once when
/// free: the agent's follower retries within milliseconds).
fn applying(paths: &InstancePaths) -> bool {
    std::fs::File::open(paths.apply_lock()).is_ok_and(|f| f.try_lock().is_err())
}

/// Waits until no apply has run or finished for `QUIET` (at most `SETTLE`): a container's
/// entry goes before the apply that removed it has cut its flows, and its destroy event
/// brings one more apply.
fn settle(paths: &InstancePaths) -> Result<(), BenchError> {
    let mut applied = FileChange {
        path: paths.applied_state(),
        last: None,
        changed_ns: 0,
    };
    let start = Instant::now();
    let mut quiet_since = Instant::now();
    loop {
        let was = applied.changed_ns;
        applied.poll();
        if applied.changed_ns != was || applying(paths) {
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() >= QUIET {
            return Ok(());
        }
        if start.elapsed() > SETTLE {
            return Err(step("the agent's applies after a run")(format!(
                "{} still changing after {} s",
                applied.path.display(),
                SETTLE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The timestamps of container `id` (named `name`), whose `docker run` returned at
/// `returned_ns`.
fn measure(
    rig: &Rig<'_>,
    name: &str,
    id: &str,
    returned_ns: i64,
) -> Result<DiscoveryRun, BenchError> {
    let lab = &rig.lab.name;
    let (tasks, containers) = engine::tasks(lab, &rig.lab.host.netns)?;
    let task = containers
        .iter()
        .position(|c| c.id == id)
        .map(|k| &tasks[k])
        .ok_or_else(|| {
            step(format!("finding {name}"))("not among the lab's running containers".to_owned())
        })?;
    let (ifindex, veth_ns) =
        wait_for(&format!("{} of {name} on {BRIDGE}", task.interface), || {
            rig.links.find(&task.interface)
        })?;
    let event_ns = wait_for(&format!("Docker's start event of {name}"), || {
        rig.events.of(id)
    })?;
    let seen = wait_for(
        &format!(
            "{name}'s own policy in TASKS ({} on {ifindex})",
            task.address
        ),
        || rig.live.of(task.address, ifindex),
    )?;
    Ok(DiscoveryRun {
        container: name.to_owned(),
        address: task.address,
        ifindex,
        policy: seen.policy,
        veth_ns,
        held_ns: rig.live.held(ifindex).unwrap_or(0),
        event_ns,
        returned_ns,
        view_ns: seen.view_ns,
        live_ns: seen.live_ns,
        live_uncertainty_ns: seen.live_ns - seen.before_ns,
        agent_cpu_wait_ns: 0,
    })
}

#[expect(
    clippy::cast_precision_loss,
    reason = "differences of a few seconds in nanoseconds are far below 2^52"
)]
fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}

/// p50, p99 and max of `values` (milliseconds) as `metric`.
fn latency(metric: &str, values: &[f64]) -> Latency {
    let nan = f64::NAN;
    Latency {
        metric: metric.to_owned(),
        p50_ms: stats::median(values).unwrap_or(nan),
        p99_ms: stats::percentile(values, 99).unwrap_or(nan),
        max_ms: stats::percentile(values, 100).unwrap_or(nan),
        n: values.len(),
    }
}

/// The three latencies of `samples`.
pub fn latencies(samples: &[DiscoveryRun]) -> Vec<Latency> {
    let of = |f: fn(&DiscoveryRun) -> i64| samples.iter().map(|s| ms(f(s))).collect::<Vec<_>>();
    let held: Vec<f64> = samples
        .iter()
        .filter(|s| s.held_ns > 0)
        .map(|s| ms(s.held_ns - s.veth_ns))
        .collect();
    vec![
        latency("live-veth", &of(|s| s.live_ns - s.veth_ns)),
        latency("live-event", &of(|s| s.live_ns - s.event_ns)),
        latency("live-returned", &of(|s| s.live_ns - s.returned_ns)),
        latency("view-event", &of(|s| s.view_ns - s.event_ns)),
        latency("live-view", &of(|s| s.live_ns - s.view_ns)),
        latency("held-veth", &held),
        latency("agent-cpu-wait", &of(|s| s.agent_cpu_wait_ns)),
        latency("live-uncertainty", &of(|s| s.live_uncertainty_ns)),
    ]
}

/// How many of `plugged` have their own policy in instance `instance`'s `TASKS`.
fn plugged_live(instance: &str, plugged: &[LabTask]) -> Result<usize, BenchError> {
    let tasks = ecsnet::kernel::maps::read_tasks(&InstancePaths::new(instance))
        .map_err(|e| step("reading TASKS")(e.to_string()))?;
    let by_addr: HashMap<u32, TaskInfo> = tasks.into_iter().collect();
    Ok(plugged
        .iter()
        .filter(|t| {
            by_addr
                .get(&u32::from(t.address).to_be())
                .is_some_and(|i| i.policy != 0)
        })
        .count())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Seeds `flows` flows into the instance on `status` and waits until `stats` counts the
/// live ones (GC removed the expired): the flows' tasks are `plugged` when there are two or
/// more, else addresses where `plug_tasks` would put tasks, which no container uses. Returns
/// the seconds seeding took.
fn seed(
    labs: &Labs,
    status: &lab::LabStatus,
    plugged: &[LabTask],
    flows: usize,
) -> Result<f64, BenchError> {
    let unplugged;
    let tasks = if plugged.len() >= 2 {
        plugged
    } else {
        unplugged = lab::plugged_tasks(&status.name, lab::MAX_TASKS)?;
        &unplugged
    };
    let (entries, seeded) = scale::seed_flows(tasks, flows, ecsnet::clock::monotonic_ns());
    let took = scale::seed(&InstancePaths::new(&status.name), &entries)?;
    drop(entries);
    let alive = seeded.alive() as u64;
    scale::await_gc(labs, status, alive)?;
    let now = scale::tracked_flows(labs, status)?;
    if now < alive {
        return Err(step("seeding CT")(format!(
            "stats counts {now} flows, {alive} seeded alive"
        )));
    }
    Ok(took.as_secs_f64())
}

/// Runs the benchmark: `runs` containers, one after the other, on a lab of its own that goes
/// down afterwards (also on failure), with `load` on the host.
pub fn discovery(runs: usize, load: DiscoveryLoad) -> Result<DiscoveryBench, BenchError> {
    if runs == 0 {
        return Err(step("bench discovery")(
            "--runs must be at least 1".to_owned(),
        ));
    }
    let mut labs = Labs::new(DEFAULT_CONGESTION)?;
    let status = labs.engine_lab_up(format!("bd{}", std::process::id() % 100_000))?;
    let t = Instant::now();
    let plugged = lab::plugged_tasks(&status.name, load.tasks)?;
    lab::plug_tasks(&status, &plugged)?;
    let plug_s = t.elapsed().as_secs_f64();
    write_state(&status, &plugged)?;
    let url = engine::EnginePaths::new(&status.name).url();
    let ct_size = if load.flows > 0 {
        scale::ct_size_for(load.flows)
    } else {
        0
    };
    let size = ct_size.to_string();
    let mut args = vec!["--docker", url.as_str()];
    if ct_size > 0 {
        args.extend(["--ct-size", size.as_str()]);
    }
    // The default flow-log window (60 s), as on a real host.
    labs.ecsnet_up_with(&status, &args)?;
    let seed_s = if load.flows > 0 {
        seed(&labs, &status, &plugged, load.flows)?
    } else {
        0.0
    };
    let docker_version = engine::docker_ok(
        &status.name,
        &["version", "--format", "{{.Server.Version}}"],
    )?;
    // Watchers after `labs`: they go first, before the lab does.
    let links = Links::watch(&status.host.netns)?;
    let events = StartEvents::follow(&status.name)?;
    let live = Live::watch(&status.name, &links)?;
    let agent = std::fs::read_to_string(InstancePaths::new(&status.name).pid_file())
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| step("reading the agent's pid file")("no pid".to_owned()))?;
    let rig = Rig {
        agent,
        lab: &status,
        links: &links,
        events: &events,
        live: &live,
    };
    let flows_before = scale::tracked_flows(&labs, &status)?;
    let plugged_live = plugged_live(&status.name, &plugged)?;
    let loadavg_before = loadavg();
    let samples = (0..runs)
        .map(|i| one_run(&rig, i))
        .collect::<Result<Vec<_>, _>>()?;
    let loadavg_after = loadavg();
    let flows_after = scale::tracked_flows(&labs, &status)?;
    let latencies = latencies(&samples);
    let p99 = latencies
        .iter()
        .find(|l| l.metric == "live-event")
        .map_or(f64::NAN, |l| l.p99_ms);
    Ok(DiscoveryBench {
        lab: status.name.clone(),
        runs,
        poll_us: u64::try_from(POLL.as_micros()).unwrap_or(u64::MAX),
        docker_version,
        load,
        ct_size,
        plugged_live,
        flows_before,
        flows_after,
        plug_s,
        seed_s,
        loadavg_before,
        loadavg_after,
        target_p99_ms: TARGET_P99_MS,
        target_met: p99 <= TARGET_P99_MS,
        latencies,
        samples,
    })
}

/// The table `bench discovery` prints.
pub fn render_discovery(b: &DiscoveryBench) -> String {
    let mut out = format!(
        "{} docker run(s) on dockerd {}, maps polled every {} us; milliseconds\n",
        b.runs, b.docker_version, b.poll_us
    );
    let _ = writeln!(
        out,
        "load: {} namespace tasks in the state file (plugged in {:.1} s, {} with their policy \
         live), {} flows seeded \
         (in {:.1} s, CT size {}); flows tracked {} before the runs, {} after; \
         load average {} before, {} after",
        b.load.tasks,
        b.plug_s,
        b.plugged_live,
        b.load.flows,
        b.seed_s,
        b.ct_size,
        b.flows_before,
        b.flows_after,
        b.loadavg_before,
        b.loadavg_after
    );
    let _ = writeln!(
        out,
        "{:<34} {:>9} {:>9} {:>9} {:>4}",
        "OWN POLICY LIVE AFTER", "P50", "P99", "MAX", "N"
    );
    for l in &b.latencies {
        let what = match l.metric.as_str() {
            "live-veth" => "the veth appeared on docker0",
            "live-event" => "Docker's start event",
            "live-returned" => "docker run -d returned",
            "view-event" => "start event to the agent's view",
            "live-view" => "the agent's view to live (apply)",
            "held-veth" => "(veth on docker0 to held)",
            "agent-cpu-wait" => "(agent waited for a CPU, per run)",
            _ => "(live seen at most this late)",
        };
        let _ = writeln!(
            out,
            "{what:<34} {:>9.2} {:>9.2} {:>9.2} {:>4}",
            l.p50_ms, l.p99_ms, l.max_ms, l.n
        );
    }
    let _ = writeln!(
        out,
        "target: p99 after the start event <= {} ms: {}",
        b.target_p99_ms,
        if b.target_met { "met" } else { "NOT met" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(veth: i64, event: i64, returned: i64, live: i64) -> DiscoveryRun {
        let view = event + (live - event) / 4;
        DiscoveryRun {
            container: "c".into(),
            address: Ipv4Addr::new(172, 17, 0, 3),
            ifindex: 7,
            policy: 1,
            veth_ns: veth,
            held_ns: veth + 1_000_000,
            event_ns: event,
            returned_ns: returned,
            view_ns: view,
            live_ns: live,
            live_uncertainty_ns: 200_000,
            agent_cpu_wait_ns: 0,
        }
    }

    #[test]
    #[expect(clippy::float_cmp, reason = "whole milliseconds are exact")]
    fn latencies_are_live_minus_each_timestamp() {
        let samples: Vec<_> = (1..=100)
            .map(|k| run(0, 1_000_000, 50_000_000, k * 1_000_000 + 1_000_000))
            .collect();
        let l = latencies(&samples);
        assert_eq!(l[0].metric, "live-veth");
        assert_eq!(l[0].max_ms, 101.0);
        assert_eq!(l[1].p99_ms, 99.0, "nearest rank: the 99th of 100");
        assert_eq!(l[1].p50_ms, 50.5, "the median of 1..=100");
        assert_eq!(l[2].p50_ms, 1.5, "the median of -48..=51");
        assert!(l.iter().all(|x| x.n == 100));
        assert_eq!(
            l[3].p99_ms + l[4].p99_ms,
            99.0,
            "event to view and view to live: 1/4, 3/4"
        );
        let early = latencies(&[run(0, 0, 9_000_000, 2_000_000)]);
        assert_eq!(
            early[2].p50_ms, -7.0,
            "live before run returned is negative"
        );
    }
}
