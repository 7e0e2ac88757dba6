//! Flow-log export (SPEC §7): the agent closes the capture window in `FLOW_STATE`, turns that
//! window's flows into records (one per task interface, 5-tuple, direction and action, plus
//! NODATA and SKIPDATA), appends them to the journal and the file sink, and only then deletes
//! them from the kernel. A checkpoint written before each step makes every count land exactly
//! once, whenever the agent is killed. With flow logs off the datapath counts nothing and no
//! window is ever closed.

pub mod format;

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ecsnet_common::{
    flow::{ACTION_REJECT, FLOW_EGRESS, FlowKey, FlowState, FlowStats},
    maps::ROLE_TASK,
};
use serde::{Deserialize, Serialize};

use crate::{
    flowlog::format::{Filter, Format, Record},
    kernel::maps::{self, MapsError},
    state::{Host, State, Task},
    store::{
        files::{self, FlowLogOptions, StoreError},
        paths::InstancePaths,
    },
};

/// How long programs that read the old window number may still be counting under it after the
/// flip. A BPF program runs to completion in microseconds, without sleeping.
const GRACE: Duration = Duration::from_millis(20);
/// The journal `flows tail` reads is rotated (one old file kept) past this size, bytes.
const JOURNAL_MAX_BYTES: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt flow-log checkpoint ({source}); remove it to start over")]
    Checkpoint {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--flow-format: {0}")]
    Format(#[from] crate::flowlog::format::FormatError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FlowLogError + '_ {
    move |source| FlowLogError::Io {
        path: path.to_owned(),
        source,
    }
}

impl FlowLogOptions {
    pub fn format(&self) -> Result<Format, FlowLogError> {
        if self.format.trim().is_empty() {
            Ok(Format::default_v2())
        } else {
            Ok(Format::parse(&self.format)?)
        }
    }
}

/// Totals since the instance came up, kept in the checkpoint so they survive the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportCounters {
    /// Windows closed and exported.
    pub windows: u64,
    /// Records written (OK, NODATA and SKIPDATA).
    pub records: u64,
    /// SKIPDATA records written.
    pub skipdata_records: u64,
    /// Packets that found the flow table full and are in no OK record.
    pub lost_packets: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    /// The window is being closed: the files may hold part of its records past these lengths.
    Exporting,
    /// Its records are written; its flows may still be in the kernel.
    Exported,
    Done,
}

/// Where the export of one window stands. Written (atomically, by rename) before each step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Checkpoint {
    phase: Phase,
    window: u32,
    /// The window's bounds, CLOCK_MONOTONIC ns.
    start_ns: u64,
    end_ns: u64,
    journal_len: u64,
    sink_len: Option<u64>,
    counters: ExportCounters,
}

fn read_checkpoint(paths: &InstancePaths) -> Result<Option<Checkpoint>, FlowLogError> {
    let path = paths.flow_checkpoint();
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| FlowLogError::Checkpoint { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

fn write_checkpoint(paths: &InstancePaths, cp: &Checkpoint) -> Result<(), FlowLogError> {
    let path = paths.flow_checkpoint();
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(cp).expect("checkpoints serialize");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_data().map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))
}

/// The totals of the last export, for metrics (zero before the first).
pub fn counters(paths: &InstancePaths) -> ExportCounters {
    read_checkpoint(paths)
        .ok()
        .flatten()
        .map(|c| c.counters)
        .unwrap_or_default()
}

/// CLOCK_MONOTONIC now, ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Unix time minus CLOCK_MONOTONIC, ns: what turns a datapath timestamp into a wall-clock one.
pub fn wall_offset_ns() -> i128 {
    let wall = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .expect("CLOCK_REALTIME is always there");
    let wall = wall.tv_sec() as i128 * 1_000_000_000 + wall.tv_nsec() as i128;
    wall - monotonic_ns() as i128
}

fn unix_secs(mono_ns: u64, offset: i128) -> u64 {
    ((mono_ns as i128 + offset).max(0) / 1_000_000_000) as u64
}

/// Sets flow counting and the event rate at `up`. The open window keeps its number when the
/// datapath was already loaded, and never reuses one a checkpoint has seen.
pub fn init_state(
    paths: &InstancePaths,
    enabled: bool,
    events_per_sec: u32,
) -> Result<(), FlowLogError> {
    let mut st = maps::read_flow_state(paths)?;
    if st.epoch == 0 {
        let last = read_checkpoint(paths)
            .ok()
            .flatten()
            .map_or(0, |c| c.window);
        st.epoch = last + 1;
        st.window_start_ns = monotonic_ns();
    }
    st.enabled = enabled as u8;
    (st.event_cost_ns, st.event_burst_ns) = event_budget(events_per_sec);
    maps::write_flow_state(paths, &st)?;
    Ok(())
}

/// Token-bucket parameters for `events_per_sec` events per second per CPU, with one second's
/// worth of burst; (0, 0) turns events off.
pub fn event_budget(events_per_sec: u32) -> (u64, u64) {
    if events_per_sec == 0 {
        return (0, 0);
    }
    let cost = 1_000_000_000 / events_per_sec as u64;
    (cost, cost * events_per_sec as u64)
}

/// Turns flow counting on or off in the kernel without touching the windows (the benchmark).
pub fn set_enabled(paths: &InstancePaths, enabled: bool) -> Result<(), FlowLogError> {
    let mut st = maps::read_flow_state(paths)?;
    st.enabled = enabled as u8;
    maps::write_flow_state(paths, &st)?;
    Ok(())
}

/// One flow's counters over all CPUs: sums, the earliest first and latest last packet, the OR
/// of the flags, and the uplink-side addresses the latest packet had.
pub fn merge(per_cpu: &[FlowStats]) -> FlowStats {
    let mut out = FlowStats::default();
    for v in per_cpu.iter().filter(|v| v.packets != 0) {
        if out.packets == 0 || v.first_ns < out.first_ns {
            out.first_ns = v.first_ns;
        }
        if v.last_ns >= out.last_ns {
            out.last_ns = v.last_ns;
            out.pkt_saddr = v.pkt_saddr;
            out.pkt_daddr = v.pkt_daddr;
        }
        out.packets += v.packets;
        out.bytes += v.bytes;
        out.tcp_flags |= v.tcp_flags;
    }
    out
}

fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

/// A task interface with what its records say about it.
#[derive(Debug, Clone)]
struct Iface {
    task: Task,
}

/// The host and its task interfaces, from the applied state and `IFACES`.
struct Directory {
    host: Host,
    by_ifindex: BTreeMap<u32, Iface>,
    task_addrs: Vec<Ipv4Addr>,
}

impl Directory {
    fn load(paths: &InstancePaths) -> Result<Self, FlowLogError> {
        let state: State = files::read_applied(paths)?.unwrap_or_default();
        let ifaces = maps::read_ifaces(paths)?;
        let mut by_ifindex = BTreeMap::new();
        for (ifindex, info) in ifaces.iter().filter(|(_, i)| i.role == ROLE_TASK) {
            let ip = addr(info.ipv4);
            if let Some(t) = state.tasks.iter().find(|t| t.ipv4_address == ip) {
                by_ifindex.insert(*ifindex, Iface { task: t.clone() });
            }
        }
        Ok(Self {
            task_addrs: state.tasks.iter().map(|t| t.ipv4_address).collect(),
            host: state.host,
            by_ifindex,
        })
    }

    /// A record with every field that depends on the interface, not on the flow.
    fn base(&self, ifindex: u32, window: u32) -> Record {
        let h = &self.host;
        let iface = self.by_ifindex.get(&ifindex);
        let task = iface.map(|i| &i.task);
        let arn = task.and_then(|t| t.task_arn.as_deref()).map(TaskArn::parse);
        let region = h
            .region
            .clone()
            .or_else(|| arn.as_ref().and_then(|a| a.region.clone()));
        let account = h
            .account_id
            .clone()
            .or_else(|| arn.as_ref().and_then(|a| a.account.clone()));
        let cluster = h
            .cluster
            .clone()
            .or_else(|| arn.as_ref().and_then(|a| a.cluster.clone()));
        let cluster_arn = match (&region, &account, &cluster) {
            (Some(r), Some(a), Some(c)) => Some(format!("arn:aws:ecs:{r}:{a}:cluster/{c}")),
            _ => None,
        };
        Record {
            account_id: account,
            interface_id: task
                .and_then(|t| t.interface_id.clone().or_else(|| t.interface.clone()))
                .or_else(|| Some(format!("if{ifindex}"))),
            vpc_id: h.vpc_id.clone(),
            subnet_id: h.subnet_id.clone(),
            instance_id: h.instance_id.clone(),
            region,
            az_id: h.az_id.clone(),
            ecs_cluster_arn: cluster_arn,
            ecs_cluster_name: cluster,
            ecs_container_instance_arn: h.container_instance_arn.clone(),
            ecs_container_instance_id: h
                .container_instance_arn
                .as_deref()
                .and_then(|a| a.rsplit('/').next())
                .map(str::to_owned),
            ecs_container_id: task.and_then(|t| t.container_id.clone()),
            ecs_service_name: task.and_then(|t| t.service_name.clone()),
            ecs_task_definition_arn: task.and_then(|t| t.task_definition_arn.clone()),
            ecs_task_arn: task.and_then(|t| t.task_arn.clone()),
            ecs_task_id: arn.and_then(|a| a.task_id),
            task: task.map(|t| t.name.clone()),
            window,
            ..Default::default()
        }
    }
}

/// The parts of `arn:aws:ecs:REGION:ACCOUNT:task/CLUSTER/TASK_ID` (or the old form without
/// the cluster) that records carry.
#[derive(Debug, Default, PartialEq, Eq)]
struct TaskArn {
    region: Option<String>,
    account: Option<String>,
    cluster: Option<String>,
    task_id: Option<String>,
}

impl TaskArn {
    fn parse(arn: &str) -> Self {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let field = |i: usize| {
            parts
                .get(i)
                .filter(|s| !s.is_empty())
                .map(|s| s.to_string())
        };
        let mut out = TaskArn {
            region: field(3),
            account: field(4),
            ..Default::default()
        };
        if let Some(res) = parts.get(5) {
            let segs: Vec<&str> = res.split('/').collect();
            match segs.as_slice() {
                ["task", cluster, id] => {
                    out.cluster = Some(cluster.to_string());
                    out.task_id = Some(id.to_string());
                }
                ["task", id] => out.task_id = Some(id.to_string()),
                _ => {}
            }
        }
        out
    }
}

/// The records of window `window` (bounds in CLOCK_MONOTONIC ns) from the flows and losses
/// read from the kernel. Pure, so the exact numbers are unit-tested.
fn build_records(
    dir: &Directory,
    window: u32,
    (start_ns, end_ns): (u64, u64),
    flows: &[(FlowKey, FlowStats)],
    lost: &[(u32, u64)],
    offset: i128,
) -> Vec<Record> {
    let mut out = Vec::new();
    let mut seen: HashMap<u32, ()> = HashMap::new();
    let mut sorted: Vec<&(FlowKey, FlowStats)> =
        flows.iter().filter(|(_, s)| s.packets != 0).collect();
    sorted.sort_by_key(|(k, s)| {
        (
            k.ifindex, s.first_ns, k.dir, k.saddr, k.daddr, k.sport, k.dport,
        )
    });
    for (k, s) in sorted {
        seen.insert(k.ifindex, ());
        let egress = k.dir == FLOW_EGRESS;
        let daddr = addr(k.daddr);
        let mut r = dir.base(k.ifindex, window);
        r.srcaddr = Some(addr(k.saddr));
        r.dstaddr = Some(daddr);
        r.srcport = Some(u16::from_be(k.sport));
        r.dstport = Some(u16::from_be(k.dport));
        r.protocol = Some(k.proto);
        r.packets = Some(s.packets);
        r.bytes = Some(s.bytes);
        // The datapath stamps with the coarse clock, up to a tick behind the one that opened
        // the window: a packet counted in this window happened in it.
        let first_ns = s.first_ns.max(start_ns);
        r.start = unix_secs(first_ns, offset);
        r.end = unix_secs(s.last_ns.max(first_ns), offset);
        r.action = Some(
            if k.action == ACTION_REJECT {
                "REJECT"
            } else {
                "ACCEPT"
            }
            .to_owned(),
        );
        r.log_status = "OK".to_owned();
        r.tcp_flags = Some(s.tcp_flags);
        r.traffic_type = Some("IPv4".to_owned());
        r.pkt_srcaddr = Some(addr(s.pkt_saddr));
        r.pkt_dstaddr = Some(addr(s.pkt_daddr));
        r.flow_direction = Some(if egress { "egress" } else { "ingress" }.to_owned());
        // AWS fills traffic-path for egress only; 1 is "another resource in the same VPC",
        // which another task on this host is. Where the uplink's traffic goes is not ours to know.
        r.traffic_path = (egress && dir.task_addrs.contains(&daddr)).then_some(1);
        out.push(r);
    }
    for (ifindex, packets) in lost {
        seen.insert(*ifindex, ());
        let mut r = dir.base(*ifindex, window);
        r.start = unix_secs(start_ns, offset);
        r.end = unix_secs(end_ns, offset);
        r.log_status = "SKIPDATA".to_owned();
        r.lost_packets = Some(*packets);
        out.push(r);
    }
    for ifindex in dir.by_ifindex.keys() {
        if !seen.contains_key(ifindex) {
            let mut r = dir.base(*ifindex, window);
            r.start = unix_secs(start_ns, offset);
            r.end = unix_secs(end_ns, offset);
            r.log_status = "NODATA".to_owned();
            out.push(r);
        }
    }
    out
}

fn file_len(path: &Path) -> Result<u64, FlowLogError> {
    match fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(path)(e)),
    }
}

/// Cuts `path` back to `len` bytes: what a killed export left past its checkpoint.
fn truncate(path: &Path, len: u64) -> Result<(), FlowLogError> {
    if file_len(path)? > len {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(len).map_err(io(path))?;
    }
    Ok(())
}

fn append(path: &Path, text: &[u8]) -> Result<(), FlowLogError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text).map_err(io(path))?;
    f.sync_data().map_err(io(path))
}

/// `path.N` for rotation.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Moves `path` to `path.1` (and `path.1` to `path.2`, ... keeping `keep`) once it is past
/// `max_bytes`.
fn rotate(path: &Path, max_bytes: u64, keep: u32) -> Result<(), FlowLogError> {
    if file_len(path)? <= max_bytes {
        return Ok(());
    }
    if keep == 0 {
        return fs::remove_file(path).map_err(io(path));
    }
    for n in (1..keep).rev() {
        let from = rotated(path, n);
        if from.exists() {
            let to = rotated(path, n + 1);
            fs::rename(&from, &to).map_err(io(&to))?;
        }
    }
    let to = rotated(path, 1);
    fs::rename(path, &to).map_err(io(&to))
}

/// The exporter the agent runs; see the module comment for the steps.
pub struct Exporter {
    paths: InstancePaths,
    opts: FlowLogOptions,
    format: Format,
}

impl Exporter {
    pub fn new(paths: &InstancePaths, opts: &FlowLogOptions) -> Result<Self, FlowLogError> {
        Ok(Self {
            paths: paths.clone(),
            format: opts.format()?,
            opts: opts.clone(),
        })
    }

    fn window_ns(&self) -> u64 {
        self.opts.window_secs.max(1) * 1_000_000_000
    }

    /// Finishes whatever a killed agent left half done. Call once before `close_due`.
    pub fn recover(&self) -> Result<(), FlowLogError> {
        let Some(cp) = read_checkpoint(&self.paths)? else {
            return Ok(());
        };
        match cp.phase {
            Phase::Exporting => {
                let st = maps::read_flow_state(&self.paths)?;
                if st.epoch == cp.window {
                    // Killed between the checkpoint and the flip.
                    self.flip(&st, cp.end_ns)?;
                }
                self.finish(cp)
            }
            Phase::Exported => {
                maps::remove_window(&self.paths, cp.window)?;
                write_checkpoint(
                    &self.paths,
                    &Checkpoint {
                        phase: Phase::Done,
                        ..cp
                    },
                )
            }
            Phase::Done => Ok(()),
        }
    }

    /// How long until the open window is due to close; zero when it is (or flow logs are off
    /// and there is nothing to do: then the window length, to look again later).
    pub fn due_in(&self) -> Result<Duration, FlowLogError> {
        let st = maps::read_flow_state(&self.paths)?;
        if st.enabled == 0 {
            return Ok(Duration::from_nanos(self.window_ns()));
        }
        let due = st.window_start_ns.saturating_add(self.window_ns());
        Ok(Duration::from_nanos(due.saturating_sub(monotonic_ns())))
    }

    /// Closes the open window and exports it.
    pub fn close(&self) -> Result<(), FlowLogError> {
        let st = maps::read_flow_state(&self.paths)?;
        let counters = read_checkpoint(&self.paths)?
            .map(|c| c.counters)
            .unwrap_or_default();
        let journal = self.paths.flow_journal();
        rotate(&journal, JOURNAL_MAX_BYTES, 1)?;
        if let Some(sink) = &self.opts.sink {
            rotate(sink, self.opts.max_bytes, self.opts.keep)?;
        }
        let now = monotonic_ns();
        let cp = Checkpoint {
            phase: Phase::Exporting,
            window: st.epoch,
            start_ns: st.window_start_ns,
            end_ns: now,
            journal_len: file_len(&journal)?,
            sink_len: match &self.opts.sink {
                Some(s) => Some(file_len(s)?),
                None => None,
            },
            counters,
        };
        write_checkpoint(&self.paths, &cp)?;
        self.flip(&st, now)?;
        self.finish(cp)
    }

    /// Opens window `st.epoch + 1` at `now_ns`, then waits out the programs still counting
    /// under the old number.
    fn flip(&self, st: &FlowState, now_ns: u64) -> Result<(), FlowLogError> {
        let next = FlowState {
            epoch: st.epoch + 1,
            window_start_ns: now_ns,
            ..*st
        };
        maps::write_flow_state(&self.paths, &next)?;
        std::thread::sleep(GRACE);
        Ok(())
    }

    /// Writes the records of the closed window `cp.window` and then forgets its flows.
    fn finish(&self, cp: Checkpoint) -> Result<(), FlowLogError> {
        let journal = self.paths.flow_journal();
        truncate(&journal, cp.journal_len)?;
        if let (Some(sink), Some(len)) = (&self.opts.sink, cp.sink_len) {
            truncate(sink, len)?;
        }
        let flows: Vec<(FlowKey, FlowStats)> = maps::read_flows(&self.paths)?
            .into_iter()
            .filter(|(k, _)| k.epoch == cp.window)
            .map(|(k, v)| (k, merge(&v)))
            .collect();
        let mut lost: BTreeMap<u32, u64> = BTreeMap::new();
        for (k, c) in maps::read_flow_lost(&self.paths)? {
            if k.epoch == cp.window {
                *lost.entry(k.ifindex).or_default() += c.packets;
            }
        }
        let lost: Vec<(u32, u64)> = lost.into_iter().collect();
        let dir = Directory::load(&self.paths)?;
        let records = build_records(
            &dir,
            cp.window,
            (cp.start_ns, cp.end_ns),
            &flows,
            &lost,
            wall_offset_ns(),
        );
        let mut lines = String::new();
        for r in &records {
            lines.push_str(&serde_json::to_string(r).expect("records serialize"));
            lines.push('\n');
        }
        append(&journal, lines.as_bytes())?;
        if let (Some(sink), Some(len)) = (&self.opts.sink, cp.sink_len) {
            let mut text = String::new();
            if len == 0 {
                text.push_str(&self.format.header());
                text.push('\n');
            }
            for r in &records {
                text.push_str(&self.format.render(r));
                text.push('\n');
            }
            append(sink, text.as_bytes())?;
        }
        let mut counters = cp.counters;
        counters.windows += 1;
        counters.records += records.len() as u64;
        counters.skipdata_records += lost.len() as u64;
        counters.lost_packets += lost.iter().map(|(_, p)| p).sum::<u64>();
        let cp = Checkpoint {
            phase: Phase::Exported,
            counters,
            ..cp
        };
        write_checkpoint(&self.paths, &cp)?;
        maps::remove_window(&self.paths, cp.window)?;
        if !lost.is_empty() {
            log::warn!(
                "flow table full in window {}: {} packet(s) on {} interface(s) not in any record (SKIPDATA); raise --flow-table-size",
                cp.window,
                lost.iter().map(|(_, p)| p).sum::<u64>(),
                lost.len()
            );
        }
        write_checkpoint(
            &self.paths,
            &Checkpoint {
                phase: Phase::Done,
                ..cp
            },
        )
    }

    /// Closes and exports the open window now, when the agent stops cleanly (`down`, SIGTERM),
    /// so the counts since the last window reach the file sink instead of vanishing with the
    /// maps.
    pub fn close_on_stop(&self) -> Result<(), FlowLogError> {
        let st = maps::read_flow_state(&self.paths)?;
        if st.enabled == 0 {
            return Ok(());
        }
        self.recover()?;
        self.close()
    }
}

/// The agent's loop: recover, then close each window when it is due. Errors are logged and
/// retried; they never stop the agent. The lock is held for each step, never while sleeping, so
/// the agent can take it to close the last window when it stops.
pub fn run(exporter: Arc<Mutex<Exporter>>, stats: Arc<Mutex<ExportCounters>>) {
    let mut recovered = false;
    loop {
        let pause = {
            let Ok(ex) = exporter.lock() else {
                return;
            };
            if !recovered {
                match ex.recover() {
                    Ok(()) => recovered = true,
                    Err(e) => log::warn!("flow-log recovery: {e}; retrying"),
                }
            }
            if !recovered {
                Duration::from_secs(1)
            } else {
                match ex.due_in() {
                    Ok(d) if d.is_zero() => {
                        let pause = match ex.close() {
                            Ok(()) => Duration::ZERO,
                            Err(e) => {
                                log::warn!("flow-log export: {e}; retrying");
                                recovered = false;
                                Duration::from_millis(500)
                            }
                        };
                        if let Ok(mut s) = stats.lock() {
                            *s = counters(&ex.paths);
                        }
                        pause
                    }
                    Ok(d) => d.min(Duration::from_secs(1)),
                    Err(e) => {
                        log::warn!("flow-log state: {e}");
                        Duration::from_secs(1)
                    }
                }
            }
        };
        std::thread::sleep(pause);
    }
}

/// How `flows tail` prints.
pub struct TailOptions {
    pub format: Format,
    pub json: bool,
    pub filter: Filter,
    /// Print only the last this many matching records first; None: all of them.
    pub lines: Option<usize>,
    pub follow: bool,
}

/// Bytes of the journal that belong to finished exports: a window being exported may have
/// written part of its records, which recovery would cut and write again.
fn committed_len(paths: &InstancePaths, file_len: u64) -> u64 {
    match read_checkpoint(paths).ok().flatten() {
        Some(cp) if cp.phase == Phase::Exporting => cp.journal_len.min(file_len),
        _ => file_len,
    }
}

fn print_record(
    out: &mut impl std::io::Write,
    opts: &TailOptions,
    r: &Record,
) -> std::io::Result<()> {
    if opts.json {
        writeln!(out, "{}", opts.format.to_json(r))
    } else {
        writeln!(out, "{}", opts.format.render(r))
    }
}

fn parse_lines(text: &str) -> impl Iterator<Item = Record> + '_ {
    // A line that does not parse (a journal from a newer ecsnet) is skipped, not fatal.
    text.lines()
        .filter_map(|l| serde_json::from_str::<Record>(l).ok())
}

/// `ecsnet flows tail`: the journal's records (the rotated file first), then, with `follow`,
/// every record as its window is exported, until printing fails (the reader went away).
pub fn tail(paths: &InstancePaths, opts: &TailOptions) -> Result<(), FlowLogError> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    use std::os::unix::fs::MetadataExt as _;

    let journal = paths.flow_journal();
    let old = rotated(&journal, 1);
    let mut text = fs::read_to_string(&old).unwrap_or_default();
    let mut file = match File::open(&journal) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&journal)(e)),
    };
    let mut pos = 0u64;
    if let Some(f) = file.as_mut() {
        let len = committed_len(paths, f.metadata().map_err(io(&journal))?.len());
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).map_err(io(&journal))?;
        text.push_str(&String::from_utf8_lossy(&buf));
        pos = len;
    }
    let matching: Vec<Record> = parse_lines(&text)
        .filter(|r| opts.filter.matches(r))
        .collect();
    let skip = opts.lines.map_or(0, |n| matching.len().saturating_sub(n));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for r in &matching[skip..] {
        if print_record(&mut out, opts, r).is_err() {
            return Ok(());
        }
    }
    let _ = out.flush();
    drop(out);
    if !opts.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(f) = file.as_mut() else {
            file = File::open(&journal).ok();
            pos = 0;
            continue;
        };
        let len = f.metadata().map_err(io(&journal))?.len();
        // Cut back by a recovery: what was past the cut was never printed (see committed_len).
        pos = pos.min(len);
        let end = committed_len(paths, len);
        let replaced = fs::metadata(&journal)
            .map(|m| m.ino() != f.metadata().map(|o| o.ino()).unwrap_or(0))
            .unwrap_or(false);
        // A rotated-away file is complete: read it to its end before moving on.
        let end = if replaced { len } else { end };
        if end > pos {
            f.seek(SeekFrom::Start(pos)).map_err(io(&journal))?;
            let mut buf = vec![0u8; (end - pos) as usize];
            f.read_exact(&mut buf).map_err(io(&journal))?;
            // Only whole lines; a partial one waits for the next round.
            let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            pos += whole as u64;
            let chunk = String::from_utf8_lossy(&buf[..whole]).into_owned();
            let mut out = stdout.lock();
            for r in parse_lines(&chunk).filter(|r| opts.filter.matches(r)) {
                if print_record(&mut out, opts, &r).is_err() {
                    return Ok(());
                }
            }
            if out.flush().is_err() {
                return Ok(());
            }
        }
        if replaced && pos >= len {
            file = File::open(&journal).ok();
            pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecsnet_common::flow::{ACTION_ACCEPT, FLOW_INGRESS};

    fn be(a: [u8; 4]) -> u32 {
        u32::from_be_bytes(a).to_be()
    }

    #[test]
    fn per_cpu_counters_merge_into_one_flow() {
        let a = FlowStats {
            packets: 3,
            bytes: 300,
            first_ns: 50,
            last_ns: 70,
            pkt_saddr: 1,
            pkt_daddr: 2,
            tcp_flags: 2,
            _pad: [0; 7],
        };
        let b = FlowStats {
            packets: 2,
            bytes: 120,
            first_ns: 40,
            last_ns: 90,
            pkt_saddr: 3,
            pkt_daddr: 4,
            tcp_flags: 1,
            _pad: [0; 7],
        };
        let m = merge(&[a, FlowStats::default(), b]);
        assert_eq!((m.packets, m.bytes), (5, 420));
        assert_eq!(
            (m.first_ns, m.last_ns),
            (40, 90),
            "an idle CPU's zeros are not the start"
        );
        assert_eq!(
            (m.pkt_saddr, m.pkt_daddr),
            (3, 4),
            "the latest packet's addresses"
        );
        assert_eq!(m.tcp_flags, 3);
    }

    #[test]
    fn task_arns_give_region_account_cluster_and_id() {
        let a = TaskArn::parse("arn:aws:ecs:us-east-1:123456789012:task/demo/0a1b2c");
        assert_eq!(a.region.as_deref(), Some("us-east-1"));
        assert_eq!(a.account.as_deref(), Some("123456789012"));
        assert_eq!(a.cluster.as_deref(), Some("demo"));
        assert_eq!(a.task_id.as_deref(), Some("0a1b2c"));
        let old = TaskArn::parse("arn:aws:ecs:eu-west-1:1:task/abc");
        assert_eq!((old.cluster, old.task_id.as_deref()), (None, Some("abc")));
        assert_eq!(TaskArn::parse("nonsense"), TaskArn::default());
    }

    fn directory() -> Directory {
        let task = |name: &str, ip: [u8; 4], iface: &str| Task {
            task_arn: Some(format!(
                "arn:aws:ecs:us-east-1:123456789012:task/demo/{name}"
            )),
            name: name.to_owned(),
            ipv4_address: Ipv4Addr::from(ip),
            interface: Some(iface.to_owned()),
            interface_id: None,
            port_mappings: vec![],
            security_groups: vec![],
            service_name: Some("web".to_owned()),
            task_definition_arn: None,
            container_id: None,
        };
        let mut by_ifindex = BTreeMap::new();
        by_ifindex.insert(
            7,
            Iface {
                task: task("t1", [172, 17, 0, 2], "vethA"),
            },
        );
        by_ifindex.insert(
            9,
            Iface {
                task: task("t2", [172, 17, 0, 3], "vethB"),
            },
        );
        Directory {
            host: Host {
                instance_id: Some("i-0abc".to_owned()),
                ..Default::default()
            },
            task_addrs: vec![[172, 17, 0, 2].into(), [172, 17, 0, 3].into()],
            by_ifindex,
        }
    }

    #[test]
    fn records_carry_counts_times_and_the_task_and_nodata_fills_idle_interfaces() {
        let dir = directory();
        let key = FlowKey {
            epoch: 4,
            ifindex: 7,
            saddr: be([172, 17, 0, 2]),
            daddr: be([172, 17, 0, 3]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            dir: FLOW_EGRESS,
            action: ACTION_ACCEPT,
            _pad: 0,
        };
        let stats = FlowStats {
            packets: 5,
            bytes: 400,
            first_ns: 2_000_000_000,
            last_ns: 3_500_000_000,
            pkt_saddr: key.saddr,
            pkt_daddr: key.daddr,
            tcp_flags: 19,
            _pad: [0; 7],
        };
        let offset = 1_700_000_000i128 * 1_000_000_000;
        let recs = build_records(
            &dir,
            4,
            (1_000_000_000, 4_000_000_000),
            &[(key, stats)],
            &[],
            offset,
        );
        assert_eq!(recs.len(), 2);
        let r = &recs[0];
        assert_eq!(
            r.interface_id.as_deref(),
            Some("vethA"),
            "interfaceId defaults to the name"
        );
        assert_eq!(
            (r.srcport, r.dstport, r.protocol),
            (Some(40000), Some(80), Some(6))
        );
        assert_eq!(
            (r.packets, r.bytes, r.tcp_flags),
            (Some(5), Some(400), Some(19))
        );
        assert_eq!((r.start, r.end), (1_700_000_002, 1_700_000_003));
        assert_eq!(r.action.as_deref(), Some("ACCEPT"));
        assert_eq!(r.flow_direction.as_deref(), Some("egress"));
        assert_eq!(r.traffic_path, Some(1), "to another task on the host");
        assert_eq!(r.ecs_task_id.as_deref(), Some("t1"));
        assert_eq!(
            r.account_id.as_deref(),
            Some("123456789012"),
            "from the task ARN"
        );
        assert_eq!(
            r.ecs_cluster_arn.as_deref(),
            Some("arn:aws:ecs:us-east-1:123456789012:cluster/demo")
        );
        assert_eq!(r.instance_id.as_deref(), Some("i-0abc"));
        // Stamped a tick before the window opened (the datapath's clock is coarse): the record
        // still starts in its window.
        let early = FlowStats {
            first_ns: 999_000_000,
            last_ns: 999_500_000,
            ..stats
        };
        let recs_early = build_records(
            &dir,
            4,
            (1_000_000_000, 4_000_000_000),
            &[(key, early)],
            &[],
            offset,
        );
        assert_eq!(
            (recs_early[0].start, recs_early[0].end),
            (1_700_000_001, 1_700_000_001)
        );
        let idle = &recs[1];
        assert_eq!(idle.log_status, "NODATA");
        assert_eq!(idle.interface_id.as_deref(), Some("vethB"));
        assert_eq!((idle.start, idle.end), (1_700_000_001, 1_700_000_004));
        assert_eq!(
            (idle.packets, idle.srcaddr, idle.action.as_deref()),
            (None, None, None)
        );
    }

    #[test]
    fn lost_packets_make_a_skipdata_record_and_no_nodata() {
        let dir = directory();
        let key = FlowKey {
            epoch: 1,
            ifindex: 9,
            proto: 17,
            dir: FLOW_INGRESS,
            ..Default::default()
        };
        let stats = FlowStats {
            packets: 1,
            bytes: 28,
            ..Default::default()
        };
        let recs = build_records(&dir, 1, (0, 1), &[(key, stats)], &[(7, 12)], 0);
        let statuses: Vec<(&str, Option<u64>)> = recs
            .iter()
            .map(|r| (r.log_status.as_str(), r.lost_packets))
            .collect();
        assert_eq!(statuses, vec![("OK", None), ("SKIPDATA", Some(12))]);
        assert_eq!(recs[0].traffic_path, None, "ingress has no traffic path");
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = std::env::temp_dir().join(format!("ecsnet-rot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("flows.log");
        for i in 0..4 {
            fs::write(&f, format!("generation {i} ").repeat(10)).unwrap();
            rotate(&f, 50, 2).unwrap();
        }
        assert!(!f.exists(), "past the limit it moved away");
        assert!(
            fs::read_to_string(rotated(&f, 1))
                .unwrap()
                .starts_with("generation 3")
        );
        assert!(
            fs::read_to_string(rotated(&f, 2))
                .unwrap()
                .starts_with("generation 2")
        );
        assert!(!rotated(&f, 3).exists(), "only `keep` old files");
        fs::write(&f, "small").unwrap();
        rotate(&f, 50, 2).unwrap();
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            "small",
            "under the limit it stays"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn event_budget_is_a_second_of_burst() {
        assert_eq!(event_budget(0), (0, 0));
        assert_eq!(event_budget(1000), (1_000_000, 1_000_000_000));
    }

    #[test]
    fn a_killed_export_is_cut_back_to_its_checkpoint() {
        let dir = std::env::temp_dir().join(format!("ecsnet-trunc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("j");
        append(&f, b"window 1\n").unwrap();
        let len = file_len(&f).unwrap();
        append(&f, b"half of window 2").unwrap();
        truncate(&f, len).unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "window 1\n");
        let _ = fs::remove_dir_all(&dir);
    }
}
