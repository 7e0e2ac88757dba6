//! The IPv6 masquerade counts (`NAT_USE6`) as the agent's GC keeps them on a real instance of a
//! dual-stack lab: sized as `NAT_USE` by `--ct-size`; set on each pass to the ports the
//! masqueraded flows of `CT6` and `CT6_NEW` hold (the reply direction of each, an orphan reply
//! too), per task, destination and protocol; a count the tables do not back is lowered to what
//! they hold, a key nobody holds goes, and keys go as their flows are cut or expire; `stats`
//! shows the busiest task's count (`natPortsMaxIpv6`). With the `NAT_USE6` pin gone (a datapath
//! from before it) the GC still expires IPv6 flows and `stats` reads no count. Until the
//! datapath masquerades IPv6 itself, the test writes the flows into the pinned tables as it
//! would, and the counts as the datapath would count them.

use std::{
    collections::BTreeMap,
    net::Ipv6Addr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use ecsnet::{clock, kernel::maps, store::paths::InstancePaths};
use ecsnet_common::{
    ct::{
        CtEntry6, CtKey6, DIR_ORIGINAL, DIR_REPLY, KIND_EAST_WEST, KIND_MASQUERADE, PROTO_TCP,
        PROTO_UDP, TCP_ACK, TCP_SYN,
    },
    maps::{MAP_CT6, MAP_CT6_NEW, MAP_NAT_USE, MAP_NAT_USE6, NatUseKey6, nat_use_size},
};
use ecsnet_tests::Lab;

const CT_SIZE: u32 = 4096;
/// `ecsnet up`'s flags: `CT_SIZE`, and UDP's timeout long enough for the live flows to outlast
/// the test (the idle ones are past it).
const UP: [&str; 4] = ["--ct-size", "4096", "--ct-timeouts", "udp=600"];
/// An address outside the host that tasks talk to (never routed: the flows are seeded).
const OUTSIDE: &str = "2001:db8:ec5::53";
const SECOND: u64 = 1_000_000_000;
/// How long the agent may take to run a GC pass that sees what the test wrote.
const DEADLINE: Duration = Duration::from_secs(30);

/// A masquerade count as the test names it: (task, destination port, protocol) -> flows; the
/// destination is always `OUTSIDE`.
type Counts = BTreeMap<(Ipv6Addr, u16, u8), u64>;

/// Where a seeded flow's entries are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seeded {
    /// Both entries in `CT6` (answered) or `CT6_NEW` (not yet).
    Answered,
    Unanswered,
    /// The reply alone in `CT6`: its original gone, as an LRU eviction leaves it.
    Orphan,
}

/// One seeded flow from a task, masqueraded to the uplink's address and port `nat_port`
/// (east-west when `nat_port` is 0), idle `idle_s` seconds.
struct Flow {
    task: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    nat_port: u16,
    seeded: Seeded,
    idle_s: u64,
}

impl Flow {
    fn original(&self) -> CtKey6 {
        let mut k = CtKey6 {
            proto: self.proto,
            ..CtKey6::default()
        };
        (k.saddr, k.daddr) = (self.task.octets(), self.dst.octets());
        (k.sport, k.dport) = (self.sport.to_be(), self.dport.to_be());
        k
    }

    /// The table and entries the datapath keeps for this flow: a masqueraded flow's reply is
    /// keyed by the uplink's address and the port chosen for it, and holds that port.
    fn entries(&self, uplink6: Ipv6Addr, now_ns: u64) -> (&'static str, Vec<(CtKey6, CtEntry6)>) {
        let k = self.original();
        let (kind, r) = if self.nat_port == 0 {
            (KIND_EAST_WEST, k.reversed())
        } else {
            // As it leaves the host: from the uplink's address and the port chosen.
            let sent = CtKey6 {
                saddr: uplink6.octets(),
                sport: self.nat_port.to_be(),
                ..k
            };
            (KIND_MASQUERADE, sent.reversed())
        };
        let last = now_ns.saturating_sub(self.idle_s * SECOND);
        // What each direction is rewritten to: the other direction's key, reversed.
        let entry = |peer: CtKey6, rewritten: CtKey6, dir| CtEntry6 {
            peer,
            nat_saddr: rewritten.saddr,
            nat_daddr: rewritten.daddr,
            nat_sport: rewritten.sport,
            nat_dport: rewritten.dport,
            last_seen_ns: last,
            created_ns: last.saturating_sub(SECOND),
            packets: 1,
            bytes: 100,
            kind,
            dir,
            tcp_flags: if self.proto == PROTO_TCP {
                TCP_SYN | TCP_ACK
            } else {
                0
            },
            ..CtEntry6::default()
        };
        let original = (k, entry(r, r.reversed(), DIR_ORIGINAL));
        let reply = (r, entry(k, k.reversed(), DIR_REPLY));
        match self.seeded {
            Seeded::Answered => (MAP_CT6, vec![original, reply]),
            Seeded::Unanswered => (MAP_CT6_NEW, vec![original, reply]),
            Seeded::Orphan => (MAP_CT6, vec![reply]),
        }
    }
}

/// Writes `flows` into the instance's connection tables as the datapath would have made them.
fn seed(paths: &InstancePaths, uplink6: Ipv6Addr, flows: &[Flow]) {
    let now = clock::monotonic_ns();
    for f in flows {
        let (map, entries) = f.entries(uplink6, now);
        maps::insert_ct(paths, map, &entries).unwrap_or_else(|e| panic!("seed {map}: {e}"));
    }
}

fn counts(paths: &InstancePaths) -> Counts {
    maps::read_nat_use6(paths)
        .expect("read NAT_USE6")
        .into_iter()
        .map(|(k, n)| {
            assert_eq!(
                Ipv6Addr::from(k.daddr),
                OUTSIDE.parse::<Ipv6Addr>().unwrap(),
                "a count towards the one destination: {k:?}"
            );
            let task = Ipv6Addr::from(k.task);
            ((task, u16::from_be(k.dport), k.proto), n)
        })
        .collect()
}

/// Writes a count into `NAT_USE6` as the datapath counts a flow it creates.
fn set_count(paths: &InstancePaths, task: Ipv6Addr, dport: u16, proto: u8, n: u64) {
    let k = NatUseKey6 {
        task: task.octets(),
        daddr: OUTSIDE.parse::<Ipv6Addr>().unwrap().octets(),
        dport: dport.to_be(),
        proto,
        _pad: 0,
    };
    let data = MapData::from_pin(paths.map_pin(MAP_NAT_USE6)).expect("NAT_USE6 pinned");
    let mut m: HashMap<_, NatUseKey6, u64> =
        HashMap::try_from(Map::HashMap(data)).expect("NAT_USE6 a hash map");
    m.insert(&k, &n, 0).expect("write NAT_USE6");
}

/// Polls `NAT_USE6` until it is `want`, or fails with what it is after `DEADLINE`.
fn counts_become(paths: &InstancePaths, what: &str, want: &Counts) {
    let start = Instant::now();
    loop {
        let now = counts(paths);
        if now == *want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "NAT_USE6 {what}: not {want:?} within {DEADLINE:?}, but {now:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn capacity(paths: &InstancePaths, map: &str) -> u32 {
    MapInfo::from_pin(paths.map_pin(map))
        .unwrap_or_else(|e| panic!("{map} pinned: {e}"))
        .max_entries()
}

/// The lab's two tasks' IPv6 addresses and the uplink's.
struct Addrs {
    t1: Ipv6Addr,
    t2: Ipv6Addr,
    uplink6: Ipv6Addr,
}

fn flow(
    task: Ipv6Addr,
    (sport, dport, proto): (u16, u16, u8),
    nat_port: u16,
    seeded: Seeded,
    idle_s: u64,
) -> Flow {
    Flow {
        task,
        dst: OUTSIDE.parse().unwrap(),
        sport,
        dport,
        proto,
        nat_port,
        seeded,
        idle_s,
    }
}

/// Seeds stale counts and masqueraded flows of every kind; the GC sets the counts to the
/// ports the flows hold, and `stats` shows them. Returns the flows.
fn counts_follow_the_tables(lab: &Lab, paths: &InstancePaths, a: &Addrs) -> Vec<Flow> {
    let (t1, t2) = (a.t1, a.t2);
    // What the datapath would have counted, some of it for flows that are gone already (an
    // eviction from CT6_NEW tells nobody): task1 -> :53/udp counted 9 times, task2's 5.
    set_count(paths, t1, 53, PROTO_UDP, 9);
    set_count(paths, t2, 53, PROTO_UDP, 5);
    let flows = vec![
        // task1 -> :53/udp: two answered, one not yet; all three hold a port.
        flow(t1, (42_001, 53, PROTO_UDP), 61_001, Seeded::Answered, 1),
        flow(t1, (42_002, 53, PROTO_UDP), 61_002, Seeded::Answered, 1),
        flow(t1, (42_003, 53, PROTO_UDP), 61_003, Seeded::Unanswered, 1),
        // task1 -> :443/tcp, established.
        flow(t1, (42_004, 443, PROTO_TCP), 61_004, Seeded::Answered, 1),
        // task2 -> :53/udp, idle 15 minutes: expired, it holds nothing once the GC takes it.
        flow(t2, (42_005, 53, PROTO_UDP), 61_005, Seeded::Answered, 900),
        // task2 -> :443/tcp, the reply alone: still holds its port.
        flow(t2, (42_006, 443, PROTO_TCP), 61_006, Seeded::Orphan, 1),
        // task1 -> task2, not masqueraded: no count.
        Flow {
            dst: t2,
            ..flow(t1, (42_007, 8080, PROTO_TCP), 0, Seeded::Answered, 1)
        },
    ];
    seed(paths, a.uplink6, &flows);
    let held = Counts::from([
        ((t1, 53, PROTO_UDP), 3),
        ((t1, 443, PROTO_TCP), 1),
        ((t2, 443, PROTO_TCP), 1),
    ]);
    counts_become(paths, "set to the ports the tables hold", &held);
    let idle = flows[4].original();
    assert!(
        !maps::read_ct6(paths)
            .expect("read CT6")
            .iter()
            .any(|(_, k, _)| *k == idle),
        "the idle flow expired"
    );
    let s = lab.stats();
    let busiest: BTreeMap<&str, u64> = s
        .tasks
        .iter()
        .map(|t| (t.name.as_str(), t.nat_ports_max_ipv6))
        .collect();
    assert_eq!(
        busiest,
        BTreeMap::from([("task1", 3), ("task2", 1)]),
        "stats: the most each task holds towards one destination over IPv6"
    );
    assert!(
        s.tasks.iter().all(|t| t.nat_ports_max == 0),
        "no IPv4 masquerade counted: {:?}",
        s.tasks
    );
    flows
}

/// Keys go as their flows are cut (task1's) or evicted (task2's orphan reply).
fn keys_go_with_their_flows(paths: &InstancePaths, a: &Addrs, flows: &[Flow]) {
    let t1 = a.t1;
    let cut = maps::remove_flows(paths, |k: &CtKey6, _: &CtEntry6| {
        Ipv6Addr::from(k.saddr) == t1 || Ipv6Addr::from(k.daddr) == t1
    })
    .expect("cut task1's flows");
    assert_eq!(cut, 5, "task1's five flows");
    counts_become(
        paths,
        "after task1's flows were cut",
        &Counts::from([((a.t2, 443, PROTO_TCP), 1)]),
    );
    // The orphan evicted in turn: nothing holds a port any more, and every key goes.
    let orphan = flows[5].entries(a.uplink6, 0).1[0].0;
    let data = MapData::from_pin(paths.map_pin(MAP_CT6)).expect("CT6 pinned");
    let mut ct6: HashMap<_, CtKey6, CtEntry6> =
        HashMap::try_from(Map::HashMap(data)).expect("CT6 a hash map");
    ct6.remove(&orphan).expect("remove the orphan reply");
    counts_become(paths, "with no masqueraded flow left", &Counts::new());
}

/// A datapath without `NAT_USE6` (from before it): the GC leaves the counts alone and still
/// expires IPv6 flows; `stats` reads no IPv6 count.
fn without_the_counts(lab: &Lab, paths: &InstancePaths, a: &Addrs) {
    std::fs::remove_file(paths.map_pin(MAP_NAT_USE6)).expect("unpin NAT_USE6");
    let stale = flow(a.t2, (42_008, 53, PROTO_UDP), 61_008, Seeded::Answered, 900);
    seed(paths, a.uplink6, std::slice::from_ref(&stale));
    let start = Instant::now();
    while maps::read_ct6(paths)
        .expect("read CT6")
        .iter()
        .any(|(_, k, _)| *k == stale.original())
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the GC did not expire an IPv6 flow without NAT_USE6 within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(counts(paths), Counts::new(), "no NAT_USE6 to read");
    assert!(
        lab.stats().tasks.iter().all(|t| t.nat_ports_max_ipv6 == 0),
        "stats without NAT_USE6"
    );
}

#[test]
fn the_gc_keeps_the_ipv6_masquerade_counts_to_the_ports_the_flows_hold() {
    let lab = Lab::up_v6("nu6", 2, &[], "nat");
    lab.ecsnet_up_with(&UP);
    let paths = InstancePaths::new(&lab.name);
    let [t1, t2] = [0, 1].map(|i| match lab.status.tasks.get(i).and_then(|t| t.address6) {
        Some(a) => a,
        None => panic!(
            "a dual-stack lab's task without an IPv6 address: {:?}",
            lab.status
        ),
    });
    let uplink6 = (lab.status.host.uplink_address6).expect("the uplink's IPv6 address");
    let addrs = Addrs { t1, t2, uplink6 };

    assert_eq!(UP[1], CT_SIZE.to_string());
    assert_eq!(capacity(&paths, MAP_NAT_USE6), nat_use_size(CT_SIZE));
    assert_eq!(
        capacity(&paths, MAP_NAT_USE6),
        capacity(&paths, MAP_NAT_USE),
        "NAT_USE6 sized as NAT_USE"
    );
    assert_eq!(counts(&paths), Counts::new(), "no IPv6 masquerade yet");

    let flows = counts_follow_the_tables(&lab, &paths, &addrs);
    keys_go_with_their_flows(&paths, &addrs, &flows);
    without_the_counts(&lab, &paths, &addrs);
}
