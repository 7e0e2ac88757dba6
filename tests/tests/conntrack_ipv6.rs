//! The IPv6 connection tables (`CT6`, `CT6_NEW`) in user space, on a real instance of a
//! dual-stack lab: `up --ct-size` sizes them, the agent's GC expires idle IPv6 flows (both
//! entries, with `--ct-timeouts`; `ICMPv6` echo with ICMP's) and keeps live ones, `ecsnet conns` lists them
//! with `[addr]:port`, `task rm` cuts the flows of the removed task's IPv6 address and keeps
//! the others' (also when the commit that removed it was stopped before its cut), and `down`
//! unpins the tables. Until the datapath makes IPv6 flows itself, the
//! test writes them into the pinned tables as the datapath would.

use std::{
    collections::BTreeSet,
    net::Ipv6Addr,
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use ecsnet::{clock, kernel::maps, store::paths::InstancePaths};
use ecsnet_common::{
    ct::{
        CtEntry6, CtKey6, DIR_ORIGINAL, DIR_REPLY, KIND_EAST_WEST, KIND_LOCAL, PROTO_TCP,
        PROTO_UDP, TCP_ACK, TCP_SYN,
    },
    maps::{MAP_CT6, MAP_CT6_NEW, ct_new_size},
};
use ecsnet_tests::{Lab, ecsnet_bin, world::instance_ok};
use serde_json::{Value, json};

const CT_SIZE: u32 = 4096;
/// An address outside the host that tasks talk to (never routed: the flows are seeded).
const OUTSIDE: &str = "2001:db8:ec5::99";
const PROTO_ICMPV6: u8 = 58;
const SECOND: u64 = 1_000_000_000;
/// How long the agent may take to run a GC pass that sees the seeded flows.
const DEADLINE: Duration = Duration::from_secs(30);

/// One seeded flow: its original key, kind, protocol state and how long it has been idle.
struct Seed {
    name: &'static str,
    key: CtKey6,
    kind: u8,
    tcp_flags: u8,
    answered: bool,
    idle_s: u64,
}

fn key(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, proto: u8) -> CtKey6 {
    CtKey6 {
        saddr: src.octets(),
        daddr: dst.octets(),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

impl Seed {
    /// Both entries as the datapath makes them for an untranslated flow: the original with 3
    /// packets of 100 bytes, the reply (when answered) with 2 of 80.
    fn entries(&self, now_ns: u64) -> [(CtKey6, CtEntry6); 2] {
        let (k, r) = (self.key, self.key.reversed());
        let last = now_ns - self.idle_s * SECOND;
        let entry = |key: CtKey6, peer, dir, packets: u64, bytes| CtEntry6 {
            peer,
            nat_saddr: key.saddr,
            nat_daddr: key.daddr,
            nat_sport: key.sport,
            nat_dport: key.dport,
            last_seen_ns: last,
            created_ns: last - SECOND,
            packets,
            bytes,
            kind: self.kind,
            dir,
            tcp_flags: if packets > 0 { self.tcp_flags } else { 0 },
            ..CtEntry6::default()
        };
        let answers = u64::from(self.answered);
        [
            (k, entry(k, r, DIR_ORIGINAL, 3, 300)),
            (r, entry(r, k, DIR_REPLY, 2 * answers, 160 * answers)),
        ]
    }
}

/// The keys of the seeds' entries (both directions) that `CT6` and `CT6_NEW` hold now.
fn held(paths: &InstancePaths, seeds: &[Seed]) -> BTreeSet<&'static str> {
    let keys: Vec<CtKey6> = maps::read_ct6(paths)
        .expect("read CT6 and CT6_NEW")
        .into_iter()
        .map(|(_, k, _)| k)
        .collect();
    let mut out = BTreeSet::new();
    for s in seeds {
        let (orig, reply) = (keys.contains(&s.key), keys.contains(&s.key.reversed()));
        assert_eq!(
            orig, reply,
            "{}: one direction without the other (original {orig}, reply {reply})",
            s.name
        );
        if orig {
            out.insert(s.name);
        }
    }
    out
}

fn capacity(paths: &InstancePaths, map: &str) -> u32 {
    MapInfo::from_pin(paths.map_pin(map))
        .unwrap_or_else(|e| panic!("{map} pinned: {e}"))
        .max_entries()
}

/// `conns --json` of the lab's instance with `extra` filters: the flows whose source port is
/// one of the seeds'.
fn conns(lab: &Lab, extra: &[&str], ports: &[u16]) -> Vec<Value> {
    let mut args = vec!["conns", "--json"];
    args.extend_from_slice(extra);
    let all: Vec<Value> =
        serde_json::from_str(&instance_ok(lab, &args)).expect("conns --json parses");
    all.into_iter()
        .filter(|c| {
            let src = c["source"].as_str().unwrap_or_default();
            ports.iter().any(|p| src.ends_with(&format!("]:{p}")))
        })
        .collect()
}

/// The lab's tasks' IPv6 addresses and an address outside.
struct Addrs {
    t1: Ipv6Addr,
    t2: Ipv6Addr,
    t3: Ipv6Addr,
    out: Ipv6Addr,
}

/// An established TCP flow used a second ago: alive for hours.
fn established(name: &'static str, key: CtKey6, kind: u8) -> Seed {
    Seed {
        name,
        key,
        kind,
        tcp_flags: TCP_SYN | TCP_ACK,
        answered: true,
        idle_s: 1,
    }
}

fn seeds(a: &Addrs) -> Vec<Seed> {
    let (t1, t2, t3, out) = (a.t1, a.t2, a.t3, a.out);
    vec![
        established(
            "east-west",
            key(t1, t2, 41_001, 8001, PROTO_TCP),
            KIND_EAST_WEST,
        ),
        // task1 -> outside, UDP nobody answered, idle 15 minutes (UDP's timeout is 10).
        Seed {
            name: "idle-udp",
            key: key(t1, out, 41_002, 8002, PROTO_UDP),
            kind: KIND_LOCAL,
            tcp_flags: 0,
            answered: false,
            idle_s: 900,
        },
        // task1 -> outside, ICMPv6 echo (identifier 41003) idle 45 s: past ICMP's 30 s, far
        // within UDP's 600 s, so it goes only when ICMPv6 is timed as ICMP.
        Seed {
            name: "idle-echo",
            key: key(t1, out, 41_003, 0, PROTO_ICMPV6),
            kind: KIND_LOCAL,
            tcp_flags: 0,
            answered: true,
            idle_s: 45,
        },
        established(
            "task2-out",
            key(t2, out, 41_004, 443, PROTO_TCP),
            KIND_LOCAL,
        ),
        established(
            "task1-out",
            key(t1, out, 41_005, 443, PROTO_TCP),
            KIND_LOCAL,
        ),
        established(
            "task3-out",
            key(t3, out, 41_006, 443, PROTO_TCP),
            KIND_LOCAL,
        ),
    ]
}

/// Writes `seeds` as the datapath keeps them: unanswered flows in `CT6_NEW`, answered ones in
/// `CT6`.
fn seed(paths: &InstancePaths, seeds: &[Seed]) {
    let now = clock::monotonic_ns();
    let entries = |answered: bool| -> Vec<(CtKey6, CtEntry6)> {
        seeds
            .iter()
            .filter(|s| s.answered == answered)
            .flat_map(|s| s.entries(now))
            .collect()
    };
    maps::insert_ct(paths, MAP_CT6_NEW, &entries(false)).expect("seed CT6_NEW");
    maps::insert_ct(paths, MAP_CT6, &entries(true)).expect("seed CT6");
}

/// The agent's GC takes both entries of the idle flows and nothing else.
fn gc_takes_the_idle_flows(paths: &InstancePaths, seeds: &[Seed]) {
    let alive: BTreeSet<&str> = ["east-west", "task1-out", "task2-out", "task3-out"].into();
    let start = Instant::now();
    loop {
        let now_held = held(paths, seeds);
        if now_held == alive {
            return;
        }
        assert!(
            now_held.is_superset(&alive),
            "GC took a live flow: {now_held:?}"
        );
        assert!(
            start.elapsed() < DEADLINE,
            "GC did not expire the idle IPv6 flows within {DEADLINE:?}: {now_held:?} left"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `conns` lists the live seeded flows, IPv6 addresses in brackets; its filters pick them.
fn conns_list_them(lab: &Lab, a: &Addrs) {
    let ports = [41_001, 41_004, 41_005, 41_006];
    let flow = |src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, kind: &str| {
        let (s, d) = (format!("[{src}]:{sport}"), format!("[{dst}]:{dport}"));
        json!({
            "family": "ipv6", "table": "CT6", "proto": "tcp",
            "source": s, "destination": d, "translatedSource": s, "translatedDestination": d,
            "kind": kind, "state": "established",
            "packets": 3, "bytes": 300, "replyPackets": 2, "replyBytes": 160,
        })
    };
    let mut want = vec![
        flow(a.t1, 41_001, a.t2, 8001, "eastWest"),
        flow(a.t2, 41_004, a.out, 443, "local"),
        flow(a.t1, 41_005, a.out, 443, "local"),
        flow(a.t3, 41_006, a.out, 443, "local"),
    ];
    let source = |v: &Value| v["source"].as_str().unwrap_or_default().to_owned();
    want.sort_by_key(source);
    let mut listed = conns(lab, &[], &ports);
    listed.sort_by_key(source);
    assert_eq!(listed, want, "conns --json");
    assert_eq!(
        conns(lab, &["--family", "ipv4"], &ports),
        Vec::<Value>::new(),
        "--family ipv4 lists no IPv6 flow"
    );
    let t2 = a.t2.to_string();
    let of_t2 = conns(lab, &["--family", "ipv6", "--addr", &t2], &ports);
    assert_eq!(of_t2.len(), 2, "--addr task2: {of_t2:?}");
    let text = instance_ok(lab, &["conns", "--family", "ipv6", "--kind", "eastWest"]);
    let words = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let row = text
        .lines()
        .find(|l| l.contains(":41001 "))
        .unwrap_or_else(|| panic!("no line of the east-west flow in:\n{text}"));
    assert_eq!(
        words(row),
        words(&format!(
            "tcp [{}]:41001 [{}]:8001 eastWest established 3 300 2 160 -",
            a.t1, a.t2
        )),
        "{text}"
    );
}

/// `task rm` cuts the flows of the task's IPv6 address, both directions, and keeps the
/// others'; so does the commit after one stopped before its cut.
fn task_rm_cuts_its_flows(lab: &Lab, paths: &InstancePaths, seeds: &[Seed], t2: Ipv6Addr) {
    instance_ok(lab, &["task", "rm", "task3"]);
    assert_eq!(
        held(paths, seeds),
        ["east-west", "task1-out", "task2-out"].into(),
        "after task rm task3"
    );

    // A commit stopped before its flow cut took task2 out of TASKS6 and left its flows; the
    // last applied state still has task2, and the next commit cuts them.
    let mut stopped = Command::new(ecsnet_bin());
    stopped.env("ECSNET_TEST_ABORT_AT", "before-flow-cut");
    let status = stopped
        .args(["--instance", &lab.name, "task", "rm", "task2"])
        .stderr(Stdio::null())
        .status()
        .expect("run ecsnet");
    let aborted = status.signal() == Some(nix::libc::SIGABRT);
    assert!(aborted, "task rm was to stop at its flow cut: {status}");
    let in_tasks6 = maps::read_tasks6(paths).expect("TASKS6");
    assert!(
        in_tasks6.iter().all(|(a, _)| *a != t2.octets()),
        "task2 left TASKS6 before the stop"
    );
    assert_eq!(
        held(paths, seeds),
        ["east-west", "task1-out", "task2-out"].into(),
        "the stopped commit cut nothing"
    );
    instance_ok(lab, &["task", "rm", "task2"]);
    assert_eq!(
        held(paths, seeds),
        ["task1-out"].into(),
        "the next commit cut task2's flows, and only them"
    );
}

#[test]
fn ipv6_flows_are_sized_expired_listed_and_cut_like_ipv4() {
    let lab = Lab::up_v6("ct6", 3, &[], "nat");
    // UDP's timeout long, so that an ICMPv6 flow timed as UDP would outlive the test.
    lab.ecsnet_up_with(&[
        "--ct-size",
        &CT_SIZE.to_string(),
        "--ct-timeouts",
        "udp=600,icmp=30",
    ]);
    let paths = InstancePaths::new(&lab.name);
    let task6 = |i: usize| {
        lab.status.tasks[i - 1]
            .address6
            .unwrap_or_else(|| panic!("task{i} has no IPv6 address: {:?}", lab.status))
    };
    let addrs = Addrs {
        t1: task6(1),
        t2: task6(2),
        t3: task6(3),
        out: OUTSIDE.parse().unwrap(),
    };

    // Sized as CT and CT_NEW are.
    assert_eq!(capacity(&paths, MAP_CT6), CT_SIZE);
    assert_eq!(capacity(&paths, MAP_CT6_NEW), ct_new_size(CT_SIZE));
    let s = lab.stats();
    assert_eq!(
        (
            s.conntrack.ipv6.capacity,
            s.conntrack.ipv6.unanswered_capacity
        ),
        (u64::from(CT_SIZE), u64::from(ct_new_size(CT_SIZE)))
    );

    let seeds = seeds(&addrs);
    seed(&paths, &seeds);
    gc_takes_the_idle_flows(&paths, &seeds);
    let s = lab.stats();
    assert!(
        s.conntrack.ipv6.entries >= 8 && s.conntrack.ipv6.flows.get("local") >= Some(&3),
        "stats count the IPv6 flows: {:?}",
        s.conntrack.ipv6
    );
    assert!(
        instance_ok(&lab, &["stats"]).contains("conntrack ipv6: "),
        "the stats table has an IPv6 conntrack line"
    );
    conns_list_them(&lab, &addrs);
    task_rm_cuts_its_flows(&lab, &paths, &seeds, addrs.t2);

    // `down` takes the IPv6 tables with everything else.
    instance_ok(&lab, &["down"]);
    for map in [MAP_CT6, MAP_CT6_NEW] {
        assert!(
            !paths.map_pin(map).exists(),
            "{map} still pinned after down"
        );
    }
}
