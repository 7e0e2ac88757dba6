//! Counters a test reads and waits on: ecsnet's drop and flow counters from `stats --json`,
//! the kernel's SNMP counters of a namespace, and a poll with a deadline.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use crate::{Stats, kernel_counters};

/// Every drop counter of a stats snapshot, as "taskN REASON" and "uplink REASON".
pub fn drops(s: &Stats) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for t in &s.tasks {
        for (r, n) in &t.drops {
            out.insert(format!("{} {r}", t.name), *n);
        }
    }
    for (r, n) in &s.uplink.drops {
        out.insert(format!("uplink {r}"), *n);
    }
    out
}

/// The drops of `task` for `reason` (0 when it has none); fails if there is no such task.
pub fn task_drops(s: &Stats, task: &str, reason: &str) -> u64 {
    s.tasks
        .iter()
        .find(|t| t.name == task)
        .unwrap_or_else(|| panic!("no task {task} in stats: {s:?}"))
        .drops
        .get(reason)
        .copied()
        .unwrap_or(0)
}

/// Flows of `kind` ("eastWest", "inbound", "masquerade", "hairpin") in ecsnet's table.
pub fn flows(s: &Stats, kind: &str) -> u64 {
    s.conntrack.flows.get(kind).copied().unwrap_or(0)
}

/// The counters in namespace `ns`'s `/proc/net/FILE` for each of `files` ("snmp", "netstat"),
/// as "Proto.Field" (e.g. "Ip.ReasmOKs", "IpExt.InOctets").
pub fn proc_net(ns: &str, files: &[&str]) -> HashMap<String, u64> {
    let paths: Vec<String> = files.iter().map(|f| format!("/proc/net/{f}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    kernel_counters(ns, &paths)
}

/// Reads `read` every `every` until `done` accepts a reading or `timeout` has passed: the last
/// reading, `Ok` when it was accepted.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut read: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> Result<T, T> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = read();
        if done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(v);
        }
        std::thread::sleep(every);
    }
}
