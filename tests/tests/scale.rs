//! Scale (issue 19, deliverable 4), small enough for CI: a lab of 200 tasks, ecsnet up and the
//! whole state applied, then 100,000 flows seeded into `CT` as `bench scale` seeds them (task
//! to task, client to a published port, task to the outside through masquerade; one in 100 a
//! UDP flow idle past its timeout). `stats` must count the live ones exactly, the agent's GC
//! must remove exactly the expired ones and set each task's masquerade count to the ports its
//! live flows hold, and an apply that removes a task must work at this size and take exactly
//! that task's flows with it.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use ecsnet::{clock, kernel::maps, store::paths::InstancePaths};
use ecsnet_common::{
    ct::{CtEntry, CtKey, DIR_ORIGINAL, KIND_MASQUERADE},
    maps::MAP_CT,
};
use ecsnet_lab::bench::scale::{EXPIRED_EVERY, ct_size_for, seed_flows};
use ecsnet_tests::{Lab, Stats, ecsnet_ok};

const TASKS: usize = 200;
const FLOWS: usize = 100_000;
/// How long the agent may take to settle the tables (GC passes are seconds apart).
const DEADLINE: Duration = Duration::from_secs(60);

/// Flows `stats` counts, by kind.
fn flows(s: &Stats) -> u64 {
    s.conntrack.flows.values().sum()
}

/// Stats once `done` holds for them, polled until `DEADLINE`.
fn stats_when(lab: &Lab, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
    let start = Instant::now();
    loop {
        let s = lab.stats();
        if done(&s) {
            return s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}; conntrack now {:?}",
            s.conntrack
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The most masquerade ports any one destination holds for each task (by address), from the
/// original entries `live`: what the GC must leave in `NAT_USE`.
fn nat_max(live: &[&(CtKey, CtEntry)]) -> HashMap<u32, u64> {
    let mut per_dest: HashMap<(u32, u32, u16, u8), u64> = HashMap::new();
    for (k, e) in live {
        if e.kind == KIND_MASQUERADE {
            *per_dest
                .entry((k.saddr, k.daddr, k.dport, k.proto))
                .or_default() += 1;
        }
    }
    let mut out: HashMap<u32, u64> = HashMap::new();
    for ((task, ..), n) in per_dest {
        let m = out.entry(task).or_default();
        *m = (*m).max(n);
    }
    out
}

#[test]
fn two_hundred_tasks_and_a_hundred_thousand_flows() {
    let lab = Lab::up("sc", TASKS, &[]);
    let size = ct_size_for(FLOWS).to_string();
    lab.ecsnet_up_with(&["--ct-size", &size]);
    let s = lab.stats();
    assert_eq!(s.tasks.len(), TASKS, "every task placed by the apply of up");
    assert_eq!(flows(&s), 0, "no traffic yet");

    let (entries, seeded) = seed_flows(&lab.status.tasks, FLOWS, clock::monotonic_ns());
    assert_eq!(seeded.expired, FLOWS / EXPIRED_EVERY);
    let paths = InstancePaths::new(&lab.name);
    maps::insert_ct(&paths, MAP_CT, &entries).expect("seed CT in batches");

    // GC removes the expired flows, and only those: the rest is alive for hours.
    let alive = seeded.alive() as u64;
    let s = stats_when(&lab, "GC removes the expired seeded flows", |s| {
        flows(s) <= alive
    });
    let by_kind = |k: &str| s.conntrack.flows.get(k).copied().unwrap_or(0);
    assert_eq!(by_kind("eastWest"), seeded.east_west as u64);
    assert_eq!(by_kind("inbound"), seeded.inbound as u64);
    assert_eq!(by_kind("masquerade"), seeded.masquerade as u64);
    assert_eq!(
        s.conntrack.entries,
        2 * alive,
        "both entries of each live flow"
    );

    // Each task's masquerade count is what its live flows hold (after a pass that saw them).
    let live: Vec<&(CtKey, CtEntry)> = entries
        .iter()
        .filter(|(_, e)| e.dir == DIR_ORIGINAL && e.tcp_flags != 0)
        .collect();
    assert_eq!(live.len() as u64, alive);
    let want = nat_max(&live);
    let s = stats_when(&lab, "masquerade counts settle", |s| {
        s.tasks.iter().all(|t| {
            let addr = u32::from_ne_bytes(t.address.octets());
            t.nat_ports_max == want.get(&addr).copied().unwrap_or(0)
        })
    });
    assert!(s.tasks.iter().any(|t| t.nat_ports_max > 0));

    // Apply at this size: the last task goes, and exactly the flows of its address with it.
    let last = lab.status.tasks.last().expect("tasks").address;
    let addr = u32::from_ne_bytes(last.octets());
    let involved = live
        .iter()
        .filter(|(k, e)| [k.saddr, k.daddr, e.peer.saddr, e.peer.daddr].contains(&addr))
        .count() as u64;
    assert!(involved > 0, "the last task has seeded flows");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.state_file()).expect("state file"))
            .expect("state JSON");
    state["tasks"].as_array_mut().expect("tasks").pop();
    let fewer = lab.status.state_file.with_file_name("scale-fewer.json");
    std::fs::write(&fewer, state.to_string()).expect("write state");
    ecsnet_ok(&lab.ecsnet_args(&["apply", "-f", &fewer.display().to_string()]));
    let s = lab.stats();
    assert_eq!(s.tasks.len(), TASKS - 1);
    assert_eq!(
        flows(&s),
        alive - involved,
        "the departed task's flows are gone, every other one stays"
    );
}
