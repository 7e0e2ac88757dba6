//! `up --docker`: the agent's side of following the container engine. Two threads of their own,
//! so neither waits for the other nor for the listeners:
//! - `links` holds every new port of the bridge at the default policy as the kernel announces
//!   it, and lets a held port go when it is deleted;
//! - `follow` applies the engine's view of its containers (from `engine`, whose own thread
//!   follows the engine) whenever it changes, and keeps `EngineStatus` (in `engine.json`, read by
//!   `stats` and the metrics) and the log.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use crate::{
    engine,
    host::netlink::{LinkEvent, LinkEvents},
    instance::follow,
    store::{
        files::{self, Discovered, EngineStatus, NotATask},
        paths::InstancePaths,
    },
};

/// The shared status, written to `engine.json` by whoever changes it.
#[derive(Clone)]
pub struct Status {
    paths: InstancePaths,
    inner: Arc<Mutex<EngineStatus>>,
}

impl Status {
    pub fn new(paths: &InstancePaths, engine: &str) -> Self {
        let s = Self {
            paths: paths.clone(),
            inner: Arc::new(Mutex::new(EngineStatus {
                engine: engine.to_owned(),
                since: now_secs(),
                ..EngineStatus::default()
            })),
        };
        s.update(|_| {});
        s
    }

    /// Changes the status and rewrites the file.
    pub fn update(&self, change: impl FnOnce(&mut EngineStatus)) {
        let Ok(mut st) = self.inner.lock() else {
            return;
        };
        change(&mut st);
        if let Err(e) = files::write_engine_status(&self.paths, &st) {
            log::warn!("engine status: {e}");
        }
    }
}

/// Starts the `links` thread: holds the bridge's new ports, releases the deleted held ones.
pub fn spawn_links(paths: &InstancePaths, bridge: u32, status: Status) -> std::io::Result<()> {
    let paths = paths.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    std::thread::Builder::new()
        .name("links".into())
        .spawn(move || {
            loop {
                // Subscribed before the snapshot: a port that comes in between is announced.
                let events = rt.block_on(async { LinkEvents::subscribe() });
                let mut events = match events {
                    Ok(e) => e,
                    Err(e) => {
                        log::warn!("link announcements: {e}; trying again in 1 s");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                match follow::hold_all(&paths, bridge) {
                    Ok(held) => held_ports(&status, &held),
                    Err(e) => log::warn!("holding the bridge's new ports: {e}"),
                }
                while let Some(ev) = rt.block_on(events.next()) {
                    match ev {
                        LinkEvent::New(link) if link.master == Some(bridge) => {
                            match follow::hold(&paths, bridge, std::slice::from_ref(&link)) {
                                Ok(held) => held_ports(&status, &held),
                                Err(e) => log::warn!("holding {}: {e}", link.name),
                            }
                        }
                        LinkEvent::Gone(ifindex) => match follow::release(&paths, ifindex) {
                            Ok(true) => log::debug!("released held port {ifindex}: it is gone"),
                            Ok(false) => {}
                            Err(e) => log::warn!("releasing held port {ifindex}: {e}"),
                        },
                        LinkEvent::New(_) => {}
                    }
                }
                log::warn!("link announcements ended; subscribing again");
            }
        })?;
    Ok(())
}

fn held_ports(status: &Status, held: &[u32]) {
    if held.is_empty() {
        return;
    }
    log::debug!("held new bridge port(s) {held:?} at the default policy");
    status.update(|s| s.held += held.len() as u64);
}

/// Starts following the engine at `url` (`engine::spawn`, on its own thread, in the agent's
/// network namespace); the `follow` thread applies each view it sends and copies its
/// connection's status into `status` every `STATUS_EVERY`.
pub fn spawn_engine(
    paths: &InstancePaths,
    url: &str,
    bridge: &str,
    status: Status,
) -> Result<(), engine::SpawnError> {
    let (tx, views) = mpsc::channel();
    let address = url.to_owned();
    let engine = engine::spawn(url, bridge, move |d: &engine::Discovered| {
        let mut view = view_of(d);
        view.engine.clone_from(&address);
        // Gone only when the follow thread is: the agent is stopping.
        let _ = tx.send(view);
    })?;
    let paths = paths.clone();
    std::thread::Builder::new()
        .name("follow".into())
        .spawn(move || {
            let mut said: BTreeSet<String> = BTreeSet::new();
            loop {
                match views.recv_timeout(STATUS_EVERY) {
                    // Views that queued up while an apply ran are skipped: each one is whole.
                    Ok(first) => {
                        let newest = views.try_iter().last().unwrap_or(first);
                        apply(&paths, &newest, &status, &mut said);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                connection(&status, &engine.status());
            }
        })
        .map_err(|source| engine::SpawnError::Io {
            what: "follow thread",
            source,
        })?;
    Ok(())
}

/// How often the engine connection's status is copied into `engine.json` when no view comes.
const STATUS_EVERY: Duration = Duration::from_millis(500);

/// The engine's view as the instance records it: its tasks (a malformed group label closes the
/// task), and every other container with its reason.
fn view_of(d: &engine::Discovered) -> Discovered {
    let mut out = Discovered::default();
    for (id, seen) in &d.containers {
        match seen {
            engine::Seen::Task(found) => {
                let mut task = found.task.clone();
                if let Some(bad) = &found.fail_closed {
                    // No group is named so: the merge closes the task and says why.
                    task.security_groups = vec![format!("(bad label: {bad})")];
                }
                out.notes.extend(
                    found
                        .notes
                        .iter()
                        .map(|n| format!("task {}: {n}", task.name)),
                );
                out.tasks.push(task);
            }
            engine::Seen::Skipped { name, why } => out.not_tasks.push(NotATask {
                container_id: id.clone(),
                name: name.clone(),
                reason: why.to_string(),
            }),
        }
    }
    out
}

/// Copies the connection's state into the status, and says when it changes.
fn connection(status: &Status, e: &engine::EngineStatus) {
    status.update(|s| {
        if s.connected != e.connected {
            if e.connected {
                log::info!("{e}");
            } else {
                log::warn!("{e}; enforcing what the engine said last, retrying");
            }
            s.since = now_secs();
        }
        s.connected = e.connected;
        s.last_error.clone_from(&e.last_error);
        s.events = e.events;
        s.relists = e.relists;
        s.reconnects = e.reconnects;
    });
}

/// Applies one view; logs each decision of the merge and each container left out once.
fn apply(paths: &InstancePaths, d: &Discovered, status: &Status, said: &mut BTreeSet<String>) {
    let mut now = BTreeSet::new();
    let mut say = |line: String| {
        if !said.contains(&line) {
            log::warn!("{line}");
        }
        now.insert(line);
    };
    for n in &d.notes {
        say(n.clone());
    }
    for n in &d.not_tasks {
        say(format!(
            "container {} ({}) is not a task: {}",
            crate::plan::merge::short_id(&n.container_id),
            n.name,
            n.reason
        ));
    }
    match follow::follow(paths, d) {
        Ok(f) => {
            for n in &f.notes {
                say(n.to_string());
            }
            for (name, why) in &f.left_out {
                say(format!("container task {name} left out: {why}"));
            }
            let closed = f
                .notes
                .iter()
                .filter(|n| matches!(n, crate::plan::merge::MergeNote::Closed { .. }))
                .count();
            let tasks = f
                .applied
                .state
                .tasks
                .iter()
                .filter(|t| t.source == crate::state::TaskSource::Docker)
                .count();
            status.update(|s| {
                s.applies += 1;
                s.tasks = tasks;
                s.not_tasks = d.not_tasks.len();
                s.closed = closed;
                s.left_out = f.notes.len() - closed + f.left_out.len();
            });
        }
        Err(e) => {
            say(format!("applying the container engine's view: {e}"));
            status.update(|s| s.apply_errors += 1);
        }
    }
    *said = now;
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
