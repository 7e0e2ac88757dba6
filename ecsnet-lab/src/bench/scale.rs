//! `ecsnet bench scale`: ecsnet on a lab of many tasks with a connection table seeded with
//! many flows (issue 19): `apply` times, the agent's memory and its threads' CPU, and how long
//! `stats` and `flows tail` take, with the table empty and full. Discovery under that load is
//! measured by `bench discovery --load-tasks --load-flows`, which seeds with `seed_flows` too.
//!
//! The seeded flows (`seed_flows`) look like the lab's own: task to task, the client to a
//! published port, a task to the outside through masquerade. They are idle established TCP
//! flows, alive for hours; a share of them are UDP flows idle past their timeout, which the
//! agent's GC must remove. Idle flows carry no traffic, so they add no flow-log records.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;

use ecsnet::{kernel::maps, store::paths::InstancePaths};
use ecsnet_common::{
    ct::{
        CtEntry, CtKey, KIND_EAST_WEST, KIND_INBOUND, KIND_MASQUERADE, PROTO_TCP, PROTO_UDP,
        TCP_ACK, TCP_SYN,
    },
    maps::MAP_CT,
};

use super::{BenchError, DEFAULT_CONGESTION, step, tools::Labs};
use crate::{
    fixture::{conntrack::FlowPair, world::tu},
    lab::{self, LabSpec, LabStatus, LabTask, UPLINK_ADDR},
};

/// Default tasks and flows of `bench scale`: the issue's.
pub const DEFAULT_TASKS: usize = 1000;
pub const DEFAULT_FLOWS: usize = 1_000_000;
/// Seconds over which the agent's CPU is measured, with the table empty and full.
const WINDOW: Duration = Duration::from_secs(10);
/// Times each latency is measured; the median is reported.
const REPEAT: usize = 3;
/// One seeded flow in this many is expired (UDP, idle past its timeout): GC must remove it.
pub const EXPIRED_EVERY: usize = 100;
/// How long GC may take to remove the expired seeded flows.
const GC_DEADLINE: Duration = Duration::from_secs(120);
/// Masqueraded flows per remote address: each (address, port 443) gets this many source ports.
const PORTS_PER_REMOTE: usize = 60_000;
/// Remote addresses of the seeded masqueraded flows: 198.18.0.0/15 (benchmarking, RFC 2544);
/// they exist only as map entries.
const REMOTE_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// How many seeded flows of each kind (`seed_flows`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Seeded {
    pub east_west: usize,
    pub inbound: usize,
    pub masquerade: usize,
    /// Masqueraded UDP flows idle past their timeout (all of them masquerade too).
    pub expired: usize,
}

impl Seeded {
    /// Flows that stay alive.
    pub fn alive(&self) -> usize {
        self.east_west + self.inbound + self.masquerade
    }
}

fn octets(a: Ipv4Addr) -> [u8; 4] {
    a.octets()
}

/// The `nth` masqueraded flow: task (nth % tasks) to remote (nth / `PORTS_PER_REMOTE`), its
/// port kept by masquerade (each remote's ports are distinct, so both keys are); UDP to port
/// 53 when `expired`, else TCP to 443.
fn masquerade_flow(tasks: &[LabTask], nth: usize, expired: bool) -> FlowPair {
    let task = octets(tasks[nth % tasks.len()].address);
    let port = u16::try_from(1024 + nth % PORTS_PER_REMOTE).expect("below 65536");
    let remote = u32::from(REMOTE_BASE) + u32::try_from(nth / PORTS_PER_REMOTE).expect("few");
    let remote = octets(Ipv4Addr::from(remote));
    let (proto, dport) = if expired {
        (PROTO_UDP, 53)
    } else {
        (PROTO_TCP, 443)
    };
    FlowPair::new(
        proto,
        tu(task, port, remote, dport),
        tu(octets(UPLINK_ADDR), port, remote, dport),
        KIND_MASQUERADE,
    )
}

/// The `nth` flow between two tasks: to the other's port 80, from one of 28,000 ephemeral
/// ports, every pair of tasks in turn.
fn east_west_flow(tasks: &[LabTask], nth: usize) -> FlowPair {
    let count = tasks.len();
    let from = nth % count;
    let to = (from + 1 + (nth / count) % (count - 1)) % count;
    let sport = u16::try_from(32768 + (nth / (count * (count - 1))) % 28_000).expect("port");
    let orig = tu(
        octets(tasks[from].address),
        sport,
        octets(tasks[to].address),
        80,
    );
    FlowPair::new(PROTO_TCP, orig, orig, KIND_EAST_WEST)
}

/// The `nth` flow from the client to a task's published port, DNAT to its container port.
fn inbound_flow(tasks: &[LabTask], nth: usize) -> FlowPair {
    let task = &tasks[nth % tasks.len()];
    let (host_port, container_port) = task
        .port_mappings
        .first()
        .map_or((8080, 80), |p| (p.host_port, p.container_port));
    let sport = u16::try_from(1024 + (nth / tasks.len()) % 64_000).expect("port");
    let client = octets(lab::CLIENT_ADDR);
    FlowPair::new(
        PROTO_TCP,
        tu(client, sport, octets(UPLINK_ADDR), host_port),
        tu(client, sport, octets(task.address), container_port),
        KIND_INBOUND,
    )
}

/// `flows` flows of `tasks` (at least two), both CT entries each, for table `CT`, as of
/// `now_ns` (`CLOCK_MONOTONIC`): one in `EXPIRED_EVERY` a UDP flow idle for ten minutes, the
/// others established TCP flows in turn task to task, client to a published port, and task to
/// the outside through masquerade. Every key differs.
pub fn seed_flows(tasks: &[LabTask], flows: usize, now_ns: u64) -> (Vec<(CtKey, CtEntry)>, Seeded) {
    assert!(tasks.len() >= 2, "seeded flows need two tasks");
    let mut out = Vec::with_capacity(2 * flows);
    let mut seeded = Seeded::default();
    for i in 0..flows {
        let expired = i % EXPIRED_EVERY == EXPIRED_EVERY - 1;
        // Each kind numbers its own flows, so that each kind's keys are distinct by
        // construction; the expired ones are masqueraded flows too.
        let mut pair = if expired || i % 3 == 2 {
            let nth = seeded.masquerade + seeded.expired;
            masquerade_flow(tasks, nth, expired)
        } else if i % 3 == 0 {
            east_west_flow(tasks, seeded.east_west)
        } else {
            inbound_flow(tasks, seeded.inbound)
        };
        for entry in [&mut pair.o, &mut pair.r] {
            entry.packets = 10;
            entry.bytes = 4096;
            if expired {
                entry.last_seen_ns = now_ns.saturating_sub(600_000_000_000);
            } else {
                entry.last_seen_ns = now_ns;
                entry.tcp_flags = TCP_SYN | TCP_ACK;
                entry.tcp_end = 1000;
                entry.tcp_ack = 1000;
            }
            entry.created_ns = entry.last_seen_ns;
        }
        if expired {
            seeded.expired += 1;
        } else {
            match pair.o.kind {
                KIND_EAST_WEST => seeded.east_west += 1,
                KIND_INBOUND => seeded.inbound += 1,
                _ => seeded.masquerade += 1,
            }
        }
        out.push((pair.okey, pair.o));
        out.push((pair.rkey, pair.r));
    }
    (out, seeded)
}

/// Connection-table size for `flows` seeded flows: both entries of each, and room for a quarter
/// more (the lab's own traffic, and a hash table's slack).
pub fn ct_size_for(flows: usize) -> u32 {
    u32::try_from((flows * 2 + flows / 2).max(ecsnet_common::maps::DEFAULT_CT_SIZE as usize))
        .unwrap_or(u32::MAX)
}

/// Seeds the flows into instance `paths`'s `CT` (batch updates): how long it took.
pub fn seed(paths: &InstancePaths, entries: &[(CtKey, CtEntry)]) -> Result<Duration, BenchError> {
    let t = Instant::now();
    maps::insert_ct(paths, MAP_CT, entries).map_err(|e| step("seeding CT")(e.to_string()))?;
    Ok(t.elapsed())
}

/// The agent's state at one load.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Load {
    /// Flows in the connection tables (original entries).
    pub flows: u64,
    /// The agent's resident memory at the end of the window, and its peak since it started
    /// (`VmHWM`: a GC pass holds the tables it read), KiB.
    pub agent_rss_kib: u64,
    pub agent_peak_rss_kib: u64,
    /// CPU seconds per second of each of the agent's threads (by name) over `window_s`.
    pub cpu_per_s: BTreeMap<String, f64>,
    pub window_s: f64,
    /// `ecsnet stats --json`, `ecsnet stats` and `ecsnet flows tail -n 100`, ms (median).
    pub stats_json_ms: f64,
    pub stats_ms: f64,
    pub flows_tail_ms: f64,
    /// `ecsnet apply` of the whole state without its last task (which cuts that task's flows),
    /// and of the whole state again (the task back: what discovery's apply does for a new
    /// container), ms (medians).
    pub apply_out_ms: f64,
    pub apply_in_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleBench {
    pub tasks: usize,
    pub flows: usize,
    pub ct_size: u32,
    pub lab_up_s: f64,
    /// `ecsnet up` with no tasks, then `apply` of every task.
    pub up_s: f64,
    pub apply_all_ms: f64,
    pub seeded: Seeded,
    pub seed_s: f64,
    /// From the end of seeding until GC had removed every expired seeded flow.
    pub gc_expired_s: f64,
    pub empty: Load,
    pub loaded: Load,
    /// What this benchmark does not measure, and why.
    pub not_measured: Vec<String>,
}

/// Milliseconds of `d`.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median time of `REPEAT` runs of `f`, ms.
fn timed(mut f: impl FnMut() -> Result<(), BenchError>) -> Result<f64, BenchError> {
    let mut v = Vec::with_capacity(REPEAT);
    for _ in 0..REPEAT {
        let t = Instant::now();
        f()?;
        v.push(ms(t.elapsed()));
    }
    Ok(super::median(&v))
}

/// Each thread of `pid`: its name and CPU time so far, clock ticks.
fn thread_ticks(pid: u32) -> Result<BTreeMap<String, u64>, BenchError> {
    let dir = format!("/proc/{pid}/task");
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| BenchError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(&dir).map_err(|source| BenchError::Read {
        path: dir.clone().into(),
        source,
    })?;
    for entry in entries.flatten() {
        let Ok(stat) = read(&entry.path().join("stat")) else {
            continue; // the thread ended
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        // After the name: state (field 3), ... utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let tick = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        *out.entry(name).or_default() += tick(11) + tick(12);
    }
    Ok(out)
}

fn agent_pid(paths: &InstancePaths) -> Result<u32, BenchError> {
    let path = paths.pid_file();
    let text = std::fs::read_to_string(&path).map_err(|source| BenchError::Read {
        path: path.clone(),
        source,
    })?;
    text.trim()
        .parse()
        .map_err(|_| step("reading the agent's pid")(format!("{}: {text:?}", path.display())))
}

/// `field` (`VmRSS`, `VmHWM`) of process `pid`, KiB.
fn memory_kib(pid: u32, field: &str) -> Result<u64, BenchError> {
    let path = std::path::PathBuf::from(format!("/proc/{pid}/status"));
    let text = std::fs::read_to_string(&path).map_err(|source| BenchError::Read {
        path: path.clone(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| step("agent memory")(format!("no {field} in {}", path.display())))
}

/// CPU seconds per second of each thread of `pid` over `window`.
#[expect(
    clippy::cast_precision_loss,
    reason = "clock ticks over seconds are far below 2^52"
)]
fn cpu_per_s(pid: u32, window: Duration) -> Result<BTreeMap<String, f64>, BenchError> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let before = thread_ticks(pid)?;
    let t = Instant::now();
    std::thread::sleep(window);
    let after = thread_ticks(pid)?;
    let secs = t.elapsed().as_secs_f64();
    Ok(after
        .into_iter()
        .map(|(name, n)| {
            let was = before.get(&name).copied().unwrap_or(0);
            (name, n.saturating_sub(was) as f64 / hz / secs)
        })
        .collect())
}

/// Flows in the connection tables of the instance on `lab`, as `stats --json` counts them.
pub(super) fn tracked_flows(labs: &Labs, lab: &LabStatus) -> Result<u64, BenchError> {
    let args = ["--netns", &lab.host.netns, "--instance", &lab.name];
    let out = labs
        .ecsnet(&[&args[..], &["stats", "--json"]].concat())
        .map_err(step("ecsnet stats --json"))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| step("ecsnet stats --json")(e.to_string()))?;
    Ok(v["conntrack"]["flows"].as_object().map_or(0, |m| {
        m.values().filter_map(serde_json::Value::as_u64).sum()
    }))
}

/// Waits, at most `GC_DEADLINE`, until the instance on `lab` tracks no more than `alive`
/// flows: GC removed the expired seeded ones. How long that took.
pub(super) fn await_gc(labs: &Labs, lab: &LabStatus, alive: u64) -> Result<Duration, BenchError> {
    let t = Instant::now();
    loop {
        let now = tracked_flows(labs, lab)?;
        if now <= alive {
            return Ok(t.elapsed());
        }
        if t.elapsed() > GC_DEADLINE {
            return Err(step("GC of the expired seeded flows")(format!(
                "{now} flows after {} s, {alive} alive",
                GC_DEADLINE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One benchmark run's lab, instance and files.
struct Run<'a> {
    labs: &'a Labs,
    lab: LabStatus,
    paths: InstancePaths,
    /// The whole state, and the same without its last task.
    all: String,
    one: String,
}

impl Run<'_> {
    fn ecsnet(&self, args: &[&str]) -> Result<String, BenchError> {
        let mut all = vec![
            "--netns",
            &self.lab.host.netns,
            "--instance",
            &self.lab.name,
        ];
        all.extend_from_slice(args);
        let what = format!("ecsnet {}", args.join(" "));
        self.labs.ecsnet(&all).map_err(step(what))
    }

    fn apply(&self, file: &str) -> Result<(), BenchError> {
        self.ecsnet(&["apply", "-f", file]).map(drop)
    }

    fn flows(&self) -> Result<u64, BenchError> {
        tracked_flows(self.labs, &self.lab)
    }

    fn load(&self) -> Result<Load, BenchError> {
        let pid = agent_pid(&self.paths)?;
        let cpu = cpu_per_s(pid, WINDOW)?;
        let agent_rss_kib = memory_kib(pid, "VmRSS")?;
        // Counted before the applies below take the last task's flows away.
        let flows = self.flows()?;
        let (mut outs, mut ins) = (Vec::new(), Vec::new());
        for _ in 0..REPEAT {
            let t = Instant::now();
            self.apply(&self.one)?;
            outs.push(ms(t.elapsed()));
            let t = Instant::now();
            self.apply(&self.all)?;
            ins.push(ms(t.elapsed()));
        }
        Ok(Load {
            flows,
            agent_rss_kib,
            agent_peak_rss_kib: memory_kib(pid, "VmHWM")?,
            cpu_per_s: cpu,
            window_s: WINDOW.as_secs_f64(),
            stats_json_ms: timed(|| self.ecsnet(&["stats", "--json"]).map(drop))?,
            stats_ms: timed(|| self.ecsnet(&["stats"]).map(drop))?,
            flows_tail_ms: timed(|| self.ecsnet(&["flows", "tail", "-n", "100"]).map(drop))?,
            apply_out_ms: super::median(&outs),
            apply_in_ms: super::median(&ins),
        })
    }
}

/// Writes the state files of the run: no tasks (for `up`), all of them, and all but the last
/// (whose flows an apply must then find and remove).
fn state_files(lab: &LabStatus) -> Result<[String; 3], BenchError> {
    let dir = lab.state_file.parent().unwrap_or(Path::new("/tmp"));
    let mut state = lab::state_for(lab);
    let write = |name: &str, s: &ecsnet::state::State| {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string(s).expect("state serializes")).map_err(
            |source| BenchError::Write {
                path: path.clone(),
                source,
            },
        )?;
        Ok::<_, BenchError>(path.display().to_string())
    };
    let all = write("scale-all.json", &state)?;
    state.tasks.pop();
    let one = write("scale-one.json", &state)?;
    state.tasks.clear();
    let none = write("scale-none.json", &state)?;
    Ok([none, all, one])
}

/// `ecsnet bench scale`: a lab of `tasks` tasks, ecsnet up on it, `flows` flows seeded.
pub fn scale(tasks: usize, flows: usize) -> Result<ScaleBench, BenchError> {
    if !(2..=lab::MAX_TASKS).contains(&tasks) || flows == 0 {
        return Err(step("bench scale")(format!(
            "--tasks must be 2 to {} and --flows at least 1",
            lab::MAX_TASKS
        )));
    }
    let mut labs = Labs::new(DEFAULT_CONGESTION)?;
    let name = format!("sc3{}", std::process::id() % 100_000);
    let t = Instant::now();
    let lab = labs.lab_up_spec(&LabSpec {
        name: name.clone(),
        tasks,
        ..LabSpec::default()
    })?;
    let lab_up_s = t.elapsed().as_secs_f64();
    let [none, all, one] = state_files(&lab)?;
    let ct_size = ct_size_for(flows);
    let t = Instant::now();
    let size = ct_size.to_string();
    labs.ecsnet_up_with(
        &LabStatus {
            state_file: none.clone().into(),
            ..lab.clone()
        },
        &["--window", "1", "--ct-size", &size],
    )?;
    let run = Run {
        labs: &labs,
        paths: InstancePaths::new(&lab.name),
        lab,
        all,
        one,
    };
    let t_apply = Instant::now();
    run.apply(&run.all)?;
    let apply_all_ms = ms(t_apply.elapsed());
    let up_s = t.elapsed().as_secs_f64();
    let empty = run.load()?;

    let (entries, seeded) = seed_flows(&run.lab.tasks, flows, ecsnet::clock::monotonic_ns());
    let seed_s = seed(&run.paths, &entries)?.as_secs_f64();
    drop(entries);
    let alive = seeded.alive() as u64;
    let gc_expired_s = await_gc(&labs, &run.lab, alive)?.as_secs_f64();
    let loaded = run.load()?;
    Ok(ScaleBench {
        tasks,
        flows,
        ct_size,
        lab_up_s,
        up_s,
        apply_all_ms,
        seeded,
        seed_s,
        gc_expired_s,
        empty,
        loaded,
        not_measured: vec![
            "discovery's time-to-enforce under this load: `bench discovery --load-tasks N \
             --load-flows N` measures it on a real-engine lab with namespace tasks beside the \
             containers"
                .to_owned(),
            "flow export of busy flows: the seeded flows are idle, so the export thread's CPU \
             shows only what the connection table's size costs it (`bench flow-logs` measures \
             export under traffic)"
                .to_owned(),
        ],
    })
}

/// The table `bench scale` prints.
#[expect(
    clippy::cast_precision_loss,
    reason = "KiB of an agent's memory are far below 2^52"
)]
pub fn render_scale(b: &ScaleBench) -> String {
    let mut out = format!(
        "scale: {} tasks, {} flows seeded ({} expired), CT size {}\n\
         lab up {:.1} s, ecsnet up + apply of every task {:.1} s (apply {:.0} ms), \
         seeding {:.1} s, GC removed the expired in {:.1} s\n",
        b.tasks,
        b.flows,
        b.seeded.expired,
        b.ct_size,
        b.lab_up_s,
        b.up_s,
        b.apply_all_ms,
        b.seed_s,
        b.gc_expired_s
    );
    let _ = writeln!(out, "{:<34} {:>14} {:>14}", "", "no flows", "seeded");
    let row = |out: &mut String, what: &str, a: String, b: String| {
        let _ = writeln!(out, "{what:<34} {a:>14} {b:>14}");
    };
    let (e, l) = (&b.empty, &b.loaded);
    row(
        &mut out,
        "flows tracked",
        e.flows.to_string(),
        l.flows.to_string(),
    );
    row(
        &mut out,
        "agent RSS (MiB)",
        format!("{:.1}", e.agent_rss_kib as f64 / 1024.0),
        format!("{:.1}", l.agent_rss_kib as f64 / 1024.0),
    );
    row(
        &mut out,
        "agent peak RSS (MiB)",
        format!("{:.1}", e.agent_peak_rss_kib as f64 / 1024.0),
        format!("{:.1}", l.agent_peak_rss_kib as f64 / 1024.0),
    );
    let mut threads: Vec<&String> = e.cpu_per_s.keys().chain(l.cpu_per_s.keys()).collect();
    threads.sort();
    threads.dedup();
    for t in threads {
        let cpu = |m: &BTreeMap<String, f64>| format!("{:.3}", m.get(t).copied().unwrap_or(0.0));
        row(
            &mut out,
            &format!("CPU s/s, thread {t}"),
            cpu(&e.cpu_per_s),
            cpu(&l.cpu_per_s),
        );
    }
    for (what, a, b) in [
        ("apply, last task out (ms)", e.apply_out_ms, l.apply_out_ms),
        (
            "apply, last task back in (ms)",
            e.apply_in_ms,
            l.apply_in_ms,
        ),
        ("stats --json (ms)", e.stats_json_ms, l.stats_json_ms),
        ("stats (ms)", e.stats_ms, l.stats_ms),
        ("flows tail -n 100 (ms)", e.flows_tail_ms, l.flows_tail_ms),
    ] {
        row(&mut out, what, format!("{a:.0}"), format!("{b:.0}"));
    }
    for n in &b.not_measured {
        let _ = writeln!(out, "not measured: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use ecsnet_common::ct;

    use super::*;

    fn tasks(n: usize) -> Vec<LabTask> {
        (1..=n)
            .map(|i| LabTask {
                name: format!("task{i}"),
                netns: String::new(),
                address: lab::task_address(i),
                address6: None,
                interface: lab::veth_name("t", i),
                port_mappings: vec![lab::LabPort {
                    host_port: 8079 + u16::try_from(i).unwrap(),
                    container_port: 80,
                    protocol: ecsnet::state::Protocol::Tcp,
                }],
            })
            .collect()
    }

    #[test]
    fn seeded_keys_are_distinct_and_expired_ones_expire() {
        let (entries, seeded) = seed_flows(&tasks(7), 200_000, 10_000_000_000_000);
        assert_eq!(entries.len(), 400_000);
        let keys: std::collections::HashSet<CtKey> = entries.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys.len(), entries.len(), "every key differs");
        assert_eq!(seeded.alive() + seeded.expired, 200_000);
        assert_eq!(seeded.expired, 200_000 / EXPIRED_EVERY);
        let t = ct::Timeouts::default();
        let gone = entries
            .iter()
            .filter(|(k, e)| {
                e.dir == ct::DIR_ORIGINAL && ct::expired(k.proto, e, e, &t, 10_000_000_000_000)
            })
            .count();
        assert_eq!(gone, seeded.expired);
        for (k, e) in &entries {
            assert!(keys.contains(&e.peer), "{k:?} has its peer");
        }
    }
}
