//! The live state of an instance that follows a container engine (`up --docker`): new ports of
//! the bridge held at the default policy the moment the kernel announces them, and the engine's
//! view of its containers applied as tasks. Both under the apply lock, like every other change.

use std::time::{Duration, Instant};

use ecsnet_common::maps::{IfaceInfo, ROLE_HELD};

use crate::{
    host::netlink::{Link, Snapshot},
    instance::{Applied, ApplyLock, InstanceError, apply_state, take_apply_lock},
    kernel::{datapath, maps},
    plan::merge,
    state::{LoadError, TaskSource},
    store::{
        files::{self, Discovered},
        paths::InstancePaths,
    },
};

/// How long a change from the engine or the kernel waits for an apply of a person to finish.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long a person's command waits for the engine's applies (see `instance::lock_apply`).
pub const PERSON_WAIT: Duration = Duration::from_secs(2);

/// The apply lock, waited for up to `wait`: the engine's changes queue behind a person's, and a
/// person's behind the engine's.
pub(super) fn wait_apply_lock(
    paths: &InstancePaths,
    wait: Duration,
) -> Result<ApplyLock, InstanceError> {
    let deadline = Instant::now() + wait;
    loop {
        match take_apply_lock(paths) {
            Err(InstanceError::ApplyRunning { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return other,
        }
    }
}

/// Whether `link` is a port of the bridge that no task or held row covers yet.
fn unheld(link: &Link, bridge: u32, rows: &[(u32, IfaceInfo)]) -> bool {
    link.master == Some(bridge)
        && link.kind == "veth"
        && !rows.iter().any(|(i, _)| *i == link.index)
}

/// Attaches the task programs to each port of the bridge among `links` that ecsnet does not
/// know yet, and marks it held: the default policy applies to it (with `defaultPolicy: deny`,
/// nothing passes) until the engine says whose it is. Returns the ports it held.
pub fn hold(paths: &InstancePaths, bridge: u32, links: &[Link]) -> Result<Vec<u32>, InstanceError> {
    let _lock = wait_apply_lock(paths, LOCK_WAIT)?;
    let rows = maps::read_ifaces(paths)?;
    let mut held = Vec::new();
    for link in links.iter().filter(|l| unheld(l, bridge, &rows)) {
        datapath::attach_task(paths, &link.name, link.index)?;
        maps::write_iface(paths, link.index, IfaceInfo::new(0, ROLE_HELD))?;
        held.push(link.index);
    }
    Ok(held)
}

/// Every port of the bridge that is no task's and not held yet, held: after the agent starts,
/// and whenever the kernel's announcements may have been missed. A held port whose link went
/// meanwhile (while no agent listened: it was killed) is let go, as its deletion would have.
pub fn hold_all(paths: &InstancePaths, bridge: u32) -> Result<Vec<u32>, InstanceError> {
    let snap = Snapshot::read()?;
    for (ifindex, row) in maps::read_ifaces(paths)? {
        if row.role == ROLE_HELD && !snap.links.iter().any(|l| l.index == ifindex) {
            release(paths, ifindex)?;
        }
    }
    hold(paths, bridge, &snap.links)
}

/// Lets a held interface go once the kernel says it is gone: its links, its row, its counters.
/// An interface that became a task's is left to the engine's view.
pub fn release(paths: &InstancePaths, ifindex: u32) -> Result<bool, InstanceError> {
    let _lock = wait_apply_lock(paths, LOCK_WAIT)?;
    let held = maps::read_ifaces(paths)?
        .iter()
        .any(|(i, row)| *i == ifindex && row.role == ROLE_HELD);
    if held {
        datapath::detach(paths, ifindex)?;
        maps::remove_iface(paths, ifindex)?;
        maps::forget_iface(paths, ifindex)?;
    }
    Ok(held)
}

/// Makes the live tasks follow the engine's view `d`: records it, and applies the given state
/// merged with it (`plan::merge`). What the merge decided comes back with the result.
///
/// A container that does not fit (its interface went between the engine's answer and now, or
/// the state file's tasks leave it no room) must not hold the others back: it is left out, with
/// the error, and the rest is applied.
pub fn follow(paths: &InstancePaths, d: &Discovered) -> Result<Followed, InstanceError> {
    let lock = wait_apply_lock(paths, LOCK_WAIT)?;
    let given = merge::configured(files::read_applied(paths)?.unwrap_or_default());
    let mut d = d.clone();
    let mut left_out = Vec::new();
    loop {
        files::write_discovered(paths, &d)?;
        let notes = merge::merge(given.clone(), &d.tasks).notes;
        match apply_state(paths, &lock, given.clone(), "docker engine", false) {
            Ok(applied) => {
                return Ok(Followed {
                    applied,
                    notes,
                    left_out,
                });
            }
            Err(e) => {
                let merged = merge::merge(given.clone(), &d.tasks).state;
                let Some(name) = failed_task(&e)
                    .and_then(|i| merged.tasks.get(i))
                    .filter(|t| t.source == TaskSource::Docker)
                    .map(|t| t.name.clone())
                else {
                    return Err(e);
                };
                d.tasks.retain(|t| t.name != name);
                left_out.push((name, e.to_string()));
            }
        }
    }
}

/// What `follow` did.
#[derive(Debug)]
pub struct Followed {
    pub applied: Applied,
    pub notes: Vec<merge::MergeNote>,
    /// The engine's tasks that could not be applied: name and why.
    pub left_out: Vec<(String, String)>,
}

/// The index of the task an apply error is about (`$.tasks[3].interface`), if it is one's.
fn failed_task(e: &InstanceError) -> Option<usize> {
    let path = match e {
        InstanceError::Resolve { error, .. } => &error.path,
        InstanceError::State(LoadError::Invalid { error, .. }) => &error.path,
        _ => return None,
    };
    path.strip_prefix("$.tasks[")?
        .split(']')
        .next()?
        .parse()
        .ok()
}
