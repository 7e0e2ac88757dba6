//! The agent: the long-running side of an instance. It owns the control socket, forwards the
//! datapath's log lines, answers status and stats, exports flow logs (`flowlog`, on a thread of
//! its own), collects conntrack garbage (`housekeeping`, on a thread of its own), fans monitor
//! events out (`monitor`) and serves metrics (`metrics`). Both listeners are bounded (`conns`):
//! no number of connections starves the threads or fills the log. The datapath does not depend
//! on it: it can be killed at any time and started again with `ecsnet up`.

pub(crate) mod conns;
pub mod control;
pub(crate) mod follow;
pub mod metrics;
pub(crate) mod monitor;
pub mod stats;

use conns::{Counters, RateLimited, Slots};
use control::{Control, StreamLine};
use stats::AgentStats;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, broadcast},
};

use crate::{
    flowlog,
    kernel::maps,
    state::Ipv6Mode,
    store::{files, paths::InstancePaths},
};

/// Event lines buffered for each monitor; one that falls further behind is told how many it lost.
const MONITOR_BACKLOG: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] files::StoreError),
    /// Boxed: `FlowLogError` is large.
    #[error(transparent)]
    FlowLog(Box<flowlog::FlowLogError>),
}

impl From<flowlog::FlowLogError> for AgentError {
    fn from(e: flowlog::FlowLogError) -> Self {
        Self::FlowLog(Box::new(e))
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(paths: &InstancePaths) -> Result<(), AgentError> {
    let meta = files::require_up(paths)?;
    raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("tokio runtime"))?;
    rt.block_on(serve(paths, meta))
}

async fn serve(paths: &InstancePaths, meta: files::Meta) -> Result<(), AgentError> {
    let started = Instant::now();
    let dir = paths.run_dir();
    fs::create_dir_all(&dir).map_err(io(dir.display().to_string()))?;
    let socket = paths.socket();
    // A socket file left by a killed agent: nobody answers on it, so it can go.
    if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let _ = fs::remove_file(&socket);
    }
    let _loggers = forward_datapath_logs(paths);
    let exporter = if meta.flow_logs.enabled {
        let exporter = Arc::new(Mutex::new(flowlog::export::Exporter::new(
            paths,
            &meta.flow_logs,
        )?));
        let ex = exporter.clone();
        std::thread::Builder::new()
            .name("flow-export".into())
            .spawn(move || flowlog::export::run(&ex))
            .map_err(io("flow-export thread"))?;
        Some(exporter)
    } else {
        None
    };
    let (events, _) = broadcast::channel(MONITOR_BACKLOG);
    let _events_reader = read_events(paths, events.clone());
    let metrics_slots = Slots::new(metrics::LIMITS);
    let control_slots = Slots::new(control::LIMITS);
    if let Some(addr) = meta.metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                log::info!("metrics on http://{addr}/metrics");
                tokio::spawn(metrics::serve(l, paths.clone(), metrics_slots.clone()));
            }
            // Metrics are not worth failing the agent for: flow logs and GC go on.
            Err(e) => log::warn!("metrics not served: cannot listen on {addr}: {e}"),
        }
    }
    spawn_housekeeping(
        paths.clone(),
        meta.clone(),
        [metrics_slots.counters(), control_slots.counters()],
    )
    .map_err(io("housekeeping thread"))?;
    if let Some(url) = &meta.docker {
        let status = follow::Status::new(paths, url);
        follow::spawn_links(paths, meta.bridge_index, status.clone())
            .map_err(io("links thread"))?;
        follow::spawn_engine(paths, url, &meta.bridge, status)
            .map_err(|e| io("docker engine")(std::io::Error::other(e.to_string())))?;
    }
    // Last: `up` returns once the socket answers, and by then everything above is running.
    let listener = UnixListener::bind(&socket).map_err(io(socket.display().to_string()))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(io(socket.display().to_string()))?;
    let control = Arc::new(Control {
        paths: paths.clone(),
        started,
        events,
        monitors: Arc::new(Semaphore::new(control::MAX_MONITORS)),
    });
    tokio::spawn(conns::serve(
        listener,
        control_slots,
        move |stream, slot| {
            let control = control.clone();
            async move {
                if let Err(e) = control::handle(stream, slot, &control).await {
                    log::debug!("control connection: {e}");
                }
            }
        },
    ));
    fs::write(paths.pid_file(), format!("{}\n", std::process::id()))
        .map_err(io(paths.pid_file().display().to_string()))?;
    log::info!(
        "agent for instance {} up: uplink {} bridge {} socket {}",
        paths.name,
        meta.uplink,
        meta.bridge,
        socket.display()
    );

    let mut term = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // The open window goes out before we do; the guard stays held so the export thread starts
    // nothing after it.
    let _last = exporter.as_ref().and_then(|e| e.lock().ok()).inspect(|ex| {
        if let Err(e) = ex.close_on_stop() {
            log::warn!("flow-log export of the last window: {e}");
        }
    });
    let _ = fs::remove_file(&socket);
    let _ = fs::remove_file(paths.pid_file());
    log::info!("agent for instance {} stopped", paths.name);
    Ok(())
}

/// How often the agent re-reads the host's addresses, and expires idle flows while the
/// connection tables are small.
const GC_INTERVAL: Duration = Duration::from_secs(1);
/// Connection-table entries GC may read per second, on average: a pass reads both tables
/// whole (about 1 us of CPU per entry on the lab's machine, most of it the kernel's copy), so
/// with more entries than this the next pass waits longer. A million flows (two million
/// entries) kept the housekeeping thread at 0.74 CPU s/s with a pass every second; with a
/// pass every 8 s it is at 0.19 (docs/BENCHMARKS.md, Scale).
const GC_ENTRIES_PER_SEC: usize = 250_000;
/// The longest wait between two passes, however full the tables: an idle flow outlives its
/// timeout by at most this, and a task's masquerade ports are recounted at least this often.
const GC_MAX_PAUSE: Duration = Duration::from_secs(15);

/// How long after a pass that read `scanned` entries the next one starts: `GC_INTERVAL`, or
/// the time that keeps the reading at `GC_ENTRIES_PER_SEC`, at most `GC_MAX_PAUSE`.
fn gc_pause(scanned: usize) -> Duration {
    let secs = u64::try_from(scanned.div_ceil(GC_ENTRIES_PER_SEC)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).clamp(GC_INTERVAL, GC_MAX_PAUSE)
}

/// Raises the soft open-files limit to the hard one: the listeners' caps keep well below either,
/// this is room for the flow export's files and the maps GC opens.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => log::info!("open-files limit raised from {soft} to {hard}"),
            Err(e) => log::warn!("open-files limit stays {soft}: {e}"),
        },
        Ok(_) => {}
        Err(e) => log::warn!("open-files limit: {e}"),
    }
}

/// Starts the housekeeping thread: every `GC_INTERVAL` it re-reads the host's addresses (both
/// families, and the uplink's and bridge's IPv6 addresses of `CONFIG6`) and rewrites the
/// agent's counters file when they moved, and it collects conntrack garbage as often as
/// `gc_pause` allows. A thread of its own, so that nothing the listeners or the flow export
/// do can delay garbage collection.
fn spawn_housekeeping(
    paths: InstancePaths,
    meta: files::Meta,
    [metrics, control]: [Arc<Counters>; 2],
) -> std::io::Result<()> {
    let timeouts = meta.ct_timeouts;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let mut logs = HousekeepingLogs::default();
            let mut mode = AppliedIpv6Mode::default();
            let mut written: Option<AgentStats> = None;
            let mut next_gc = Instant::now();
            loop {
                let started = Instant::now();
                if started >= next_gc {
                    let scanned = collect_garbage(&paths, &timeouts, &mut logs);
                    next_gc = started + gc_pause(scanned);
                }
                local_addresses(&paths, &meta, &rt, &mut mode, &mut logs);
                let now = AgentStats {
                    metrics: metrics.snapshot(),
                    control: control.snapshot(),
                };
                if written != Some(now) {
                    match write_counters(&paths, &now) {
                        Ok(()) => written = Some(now),
                        Err(e) => {
                            if let Some(n) = logs.counters.hit() {
                                log::warn!("agent counters ({n} failure(s)): {e}");
                            }
                        }
                    }
                }
                std::thread::sleep(GC_INTERVAL.saturating_sub(started.elapsed()));
            }
        })?;
    Ok(())
}

fn write_counters(paths: &InstancePaths, c: &AgentStats) -> std::io::Result<()> {
    let path = paths.agent_counters();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec(c).expect("counters serialize"))?;
    fs::rename(&tmp, &path)
}

/// Repeated housekeeping failures are logged at most once per `conns::LOG_INTERVAL` each.
struct HousekeepingLogs {
    gc: RateLimited,
    addrs: RateLimited,
    counters: RateLimited,
}

impl Default for HousekeepingLogs {
    fn default() -> Self {
        Self {
            gc: RateLimited::new(conns::LOG_INTERVAL),
            addrs: RateLimited::new(conns::LOG_INTERVAL),
            counters: RateLimited::new(conns::LOG_INTERVAL),
        }
    }
}

/// Connection-table garbage collection: the entries it read (0 when it failed).
fn collect_garbage(
    paths: &InstancePaths,
    timeouts: &ecsnet_common::ct::Timeouts,
    logs: &mut HousekeepingLogs,
) -> usize {
    match crate::kernel::maps::collect_garbage(paths, timeouts, crate::clock::monotonic_ns()) {
        Ok(c) => {
            if c.removed > 0 {
                log::debug!("conntrack: expired {} flow(s)", c.removed);
            }
            c.scanned
        }
        Err(e) => {
            if let Some(n) = logs.gc.hit() {
                log::warn!("conntrack garbage collection ({n} failure(s)): {e}");
            }
            0
        }
    }
}

/// The host's address list, which changes without an `apply`, and `CONFIG6`'s flags, which
/// follow the applied state's IPv6 mode and the uplink's IPv6 address.
fn local_addresses(
    paths: &InstancePaths,
    meta: &files::Meta,
    rt: &tokio::runtime::Runtime,
    mode: &mut AppliedIpv6Mode,
    logs: &mut HousekeepingLogs,
) {
    let addrs = rt
        .block_on(crate::host::netlink::Snapshot::read_async())
        .map_err(|e| e.to_string())
        .and_then(|snap| {
            let mode = mode.get(paths).map_err(|e| e.to_string())?;
            crate::instance::write_host_addresses(paths, &snap, meta, mode)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = addrs
        && let Some(n) = logs.addrs.hit()
    {
        log::warn!("local addresses ({n} failure(s)): {e}");
    }
}

/// The applied state's `host.ipv6Mode` (the default one's without a state), read again only
/// when the file was replaced: the housekeeping asks every second, and a state of thousands of
/// tasks is not read every second. Every write of the state replaces the file (a new inode).
#[derive(Default)]
struct AppliedIpv6Mode {
    /// The file as it was when it was read, and its mode.
    read: Option<(FileStamp, Ipv6Mode)>,
}

/// A file's inode and modification time (seconds, nanoseconds); None: no file.
type FileStamp = Option<(u64, i64, i64)>;

impl AppliedIpv6Mode {
    fn get(&mut self, paths: &InstancePaths) -> Result<Ipv6Mode, files::StoreError> {
        use std::os::unix::fs::MetadataExt as _;
        let stamp = fs::metadata(paths.applied_state())
            .ok()
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()));
        if let Some((seen, mode)) = self.read
            && seen == stamp
        {
            return Ok(mode);
        }
        let mode = files::read_applied(paths)?.map_or_else(Ipv6Mode::default, |s| s.host.ipv6_mode);
        self.read = Some((stamp, mode));
        Ok(mode)
    }
}

/// Forwards aya-log records of the pinned programs into the agent's log.
fn forward_datapath_logs(paths: &InstancePaths) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // The programs share one log buffer; one logger is enough.
    if let Some(id) = crate::kernel::datapath::pinned_program_ids(paths)
        .first()
        .copied()
    {
        match aya_log::EbpfLogger::init_from_id(id) {
            // SAFETY: the logger owns its ring-buffer fd for as long as the AsyncFd owns it.
            Ok(logger) => match unsafe { tokio::io::unix::AsyncFd::register(logger) }
                .map_err(|e| e.to_string())
            {
                Ok(mut fd) => tasks.push(tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = fd.readable_mut().await else {
                            break;
                        };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                })),
                Err(e) => log::warn!("datapath log forwarding off: {e}"),
            },
            Err(e) => log::warn!("datapath log forwarding off: {e}"),
        }
    }
    tasks
}

/// Drains the datapath's event ring buffer into `tx`, one JSON line per event.
fn read_events(
    paths: &InstancePaths,
    tx: broadcast::Sender<Arc<[u8]>>,
) -> Option<tokio::task::JoinHandle<()>> {
    let ring = match maps::open_events(paths) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("monitor events off: {e}");
            return None;
        }
    };
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd owns it.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("monitor events off: {e}");
            return None;
        }
    };
    let paths = paths.clone();
    Some(tokio::spawn(async move {
        let mut names = monitor::Names::default();
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            names.refresh(&paths);
            let offset = crate::clock::wall_offset_ns();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<ecsnet_common::flow::Event>() {
                    continue;
                }
                // SAFETY: the datapath writes whole `Event`s; read unaligned, it is plain data.
                let e: ecsnet_common::flow::Event =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let line = control::line(&StreamLine::Event(monitor::line(&e, &names, offset)));
                // Nobody listening is fine: the ring is drained either way.
                let _ = tx.send(line.into());
            }
            guard.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_reads_a_bounded_number_of_entries_per_second() {
        assert_eq!(gc_pause(0), GC_INTERVAL, "an empty table every second");
        assert_eq!(gc_pause(GC_ENTRIES_PER_SEC), GC_INTERVAL);
        assert_eq!(
            gc_pause(2_000_000),
            Duration::from_secs(8),
            "a million flows"
        );
        assert_eq!(gc_pause(usize::MAX), GC_MAX_PAUSE);
        // Entries read per second of pause stay within the budget up to where the cap starts.
        let cap = GC_ENTRIES_PER_SEC * usize::try_from(GC_MAX_PAUSE.as_secs()).unwrap();
        for scanned in (0..=cap).step_by(12_345) {
            let secs = usize::try_from(gc_pause(scanned).as_secs()).unwrap();
            assert!(
                scanned <= secs * GC_ENTRIES_PER_SEC,
                "{scanned} entries in {secs} s"
            );
        }
    }
}
