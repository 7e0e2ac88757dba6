//! The maps NAT66 will read, as user space keeps them on a real instance (the datapath does not
//! read them yet): `PORTS6` holds the published ports of the tasks with an IPv6 address, to
//! that address and the container port, after `up`, `task rm`, an apply that drops a port and
//! one that takes a task's IPv6 address away and gives it back; `LOCAL_ADDRS6` holds the host's
//! global IPv6 addresses (no link-local, no loopback) and follows an address added to and
//! removed from the uplink through the agent's refresh; `CONFIG6` holds the uplink's and the
//! bridge's addresses, and keeps the uplink's while the uplink has it, and
//! `CONFIG6_MASQUERADE` in `host.ipv6Mode: nat` (the default) only, set and cleared by applies
//! that switch the mode, and kept by the agent's refresh. An IPv4-only host has them empty (and
//! zero) and works as before.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use ecsnet::{
    kernel::maps,
    store::{files::read_meta, paths::InstancePaths},
};
use ecsnet_common::maps::{CONFIG6_MASQUERADE, Config6};
use ecsnet_tests::{
    Lab, ns_exec,
    traffic::{echo, tcp_connect},
    world::{apply, instance_ok, state},
};
use serde_json::Value;

/// How long the agent may take to see an address change (it looks every second).
const DEADLINE: Duration = Duration::from_secs(20);
const TCP: u8 = 6;
const UDP: u8 = 17;
/// An address the test adds to the uplink, in the uplink's prefix.
const EXTRA: &str = "fd00:10:10::99";

/// A published port as the test names it: (host port, protocol) -> (address, container port).
type Ports6 = BTreeMap<(u16, u8), (Ipv6Addr, u16)>;

fn paths(lab: &Lab) -> InstancePaths {
    InstancePaths::new(&lab.name)
}

/// `PORTS6` as it is now.
fn ports6(lab: &Lab) -> Ports6 {
    maps::read_ports6(&paths(lab))
        .expect("read PORTS6")
        .into_iter()
        .map(|(k, v)| {
            let key = (u16::from_be(k.port), k.proto);
            (key, (Ipv6Addr::from(v.addr), u16::from_be(v.port)))
        })
        .collect()
}

/// The keys of `PORTS` as they are now: (host port, protocol), sorted.
fn ports_keys(lab: &Lab) -> Vec<(u16, u8)> {
    let mut keys: Vec<(u16, u8)> = maps::read_ports(&paths(lab))
        .expect("read PORTS")
        .into_iter()
        .map(|(k, _)| (u16::from_be(k.port), k.proto))
        .collect();
    keys.sort_unstable();
    keys
}

/// `LOCAL_ADDRS6` as it is now: address -> ifindex.
fn local6(lab: &Lab) -> BTreeMap<Ipv6Addr, u32> {
    maps::read_local_addrs6(&paths(lab))
        .expect("read LOCAL_ADDRS6")
        .into_iter()
        .map(|(a, i)| (Ipv6Addr::from(a), i))
        .collect()
}

fn config6(lab: &Lab) -> Config6 {
    maps::read_config6(&paths(lab))
        .expect("read CONFIG6")
        .expect("this build's datapath has CONFIG6")
}

/// The uplink's and the bridge's ifindexes, as `up` found them.
fn links(lab: &Lab) -> (u32, u32) {
    let meta = read_meta(&paths(lab))
        .expect("read meta.json")
        .expect("the instance is up");
    (meta.uplink_index, meta.bridge_index)
}

fn addr6(lab: &Lab, task: usize) -> Ipv6Addr {
    lab.status.tasks[task - 1]
        .address6
        .unwrap_or_else(|| panic!("task{task} has no IPv6 address: {:?}", lab.status))
}

/// Polls `what` until `done` says yes, or fails with the last value after `DEADLINE`.
fn eventually<T: std::fmt::Debug>(what: &str, read: impl Fn() -> T, done: impl Fn(&T) -> bool) {
    let until = Instant::now() + DEADLINE;
    loop {
        let now = read();
        if done(&now) {
            return;
        }
        assert!(Instant::now() < until, "{what} after {DEADLINE:?}: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The lab's tasks in its state file, as applied next: `edit` changes them first.
fn apply_tasks(lab: &Lab, name: &str, edit: impl FnOnce(&mut Vec<Value>)) {
    let mut s = state(lab);
    let tasks = s["tasks"].as_array_mut().expect("the state has tasks");
    edit(tasks);
    apply(lab, name, &s);
}

/// `tasks` without task2, and task1 without its UDP port.
fn task1_without_udp(tasks: &mut Vec<Value>) {
    tasks.retain(|t| t["name"] != "task2");
    let maps = tasks[0]["portMappings"]
        .as_array_mut()
        .expect("port mappings");
    maps.retain(|m| m["protocol"] != "udp");
}

/// `PORTS6` after `up`, `task rm`, an apply without a port, and applies that take task1's IPv6
/// address away and give it back.
fn ports_follow_tasks_and_states(lab: &Lab) {
    let (t1, t2) = (addr6(lab, 1), addr6(lab, 2));
    // Every published port of both tasks, on both families.
    let all = Ports6::from([
        ((8080, TCP), (t1, 80)),
        ((5353, UDP), (t1, 53)),
        ((8081, TCP), (t2, 80)),
    ]);
    assert_eq!(ports6(lab), all, "PORTS6 after up");
    assert_eq!(
        ports_keys(lab),
        all.keys().copied().collect::<Vec<_>>(),
        "PORTS has the same keys"
    );

    // A task that goes takes its ports with it.
    instance_ok(lab, &["task", "rm", "task2"]);
    let mut want = all.clone();
    want.remove(&(8081, TCP));
    assert_eq!(ports6(lab), want, "PORTS6 after task rm task2");

    // A state without task1's UDP port.
    apply_tasks(lab, "no-udp.json", task1_without_udp);
    want.remove(&(5353, UDP));
    assert_eq!(
        ports6(lab),
        want,
        "PORTS6 after an apply without the UDP port"
    );
    assert_eq!(ports_keys(lab), [(8080, TCP)], "PORTS likewise");

    // A task without an IPv6 address has no IPv6 ports; given one back, it has them again.
    apply_tasks(lab, "no-ipv6.json", |tasks| {
        task1_without_udp(tasks);
        tasks[0]
            .as_object_mut()
            .expect("a task")
            .remove("ipv6Address")
            .expect("task1 had an ipv6Address");
    });
    assert_eq!(ports6(lab), Ports6::new(), "PORTS6 of a task without IPv6");
    assert_eq!(ports_keys(lab), [(8080, TCP)], "its IPv4 port stays");
    apply_tasks(lab, "all.json", |_| {});
    assert_eq!(ports6(lab), all, "PORTS6 after the whole state again");
}

/// `LOCAL_ADDRS6` and `CONFIG6` after `up`, and as the agent follows an address added to the
/// uplink and the uplink's first address removed.
fn addresses_follow_the_host(lab: &Lab) {
    let host = &lab.status.host;
    let uplink6 = host.uplink_address6.expect("the uplink's IPv6 address");
    let bridge6 = host.bridge_address6.expect("the bridge's IPv6 address");
    assert_eq!(
        (uplink6.to_string(), bridge6.to_string()),
        ("fd00:10:10::1".into(), "fd00:172:17::1".into()),
        "the lab's host"
    );
    let (uplink, bridge) = links(lab);
    // The host's own global addresses, nothing link-local (every link has one) or loopback.
    assert_eq!(
        local6(lab),
        BTreeMap::from([(uplink6, uplink), (bridge6, bridge)]),
        "LOCAL_ADDRS6 after up"
    );
    let config = Config6 {
        uplink_ipv6: uplink6.octets(),
        bridge_ipv6: bridge6.octets(),
        bridge_prefix6: 64,
        // The lab's state says nothing of the mode: nat, the default, masquerades.
        flags: CONFIG6_MASQUERADE,
        _pad: [0; 2],
    };
    assert_eq!(config6(lab), config, "CONFIG6 after up");

    // An address added to the uplink is the host's within the agent's refresh; the masquerade
    // address stays where it was while the uplink keeps it, and moves when it goes.
    let extra: Ipv6Addr = EXTRA.parse().unwrap();
    let dev = host.uplink.as_str();
    let ip = |verb: &str, addr: &str| {
        ns_exec(lab.host(), &["ip", "-6", "addr", verb, addr, "dev", dev]);
    };
    ip("add", &format!("{EXTRA}/64"));
    let with_extra = BTreeMap::from([(uplink6, uplink), (extra, uplink), (bridge6, bridge)]);
    eventually(
        "LOCAL_ADDRS6 with the added address",
        || local6(lab),
        |l| *l == with_extra,
    );
    assert_eq!(
        config6(lab),
        config,
        "CONFIG6 keeps the uplink's first address"
    );
    ip("del", &format!("{uplink6}/64"));
    let moved = Config6 {
        uplink_ipv6: extra.octets(),
        ..config
    };
    eventually(
        "CONFIG6 after the uplink's address went",
        || config6(lab),
        |c| *c == moved,
    );
    assert_eq!(
        local6(lab),
        BTreeMap::from([(extra, uplink), (bridge6, bridge)]),
        "LOCAL_ADDRS6 without the removed address"
    );
}

/// `CONFIG6_MASQUERADE` as applies switch `host.ipv6Mode` to routed and back, its addresses
/// untouched, and as the agent's refresh (which reads the applied state's mode) leaves it.
fn masquerade_follows_the_mode(lab: &Lab) {
    let on = config6(lab);
    assert_eq!(on.flags, CONFIG6_MASQUERADE, "CONFIG6 in nat mode: {on:?}");
    assert_ne!(on.uplink_ipv6, [0; 16], "with an uplink address");
    let off = Config6 { flags: 0, ..on };
    let mut s = state(lab);
    for (mode, want) in [("routed", off), ("nat", on)] {
        s["host"]["ipv6Mode"] = mode.into();
        apply(lab, &format!("{mode}.json"), &s);
        // Written by the apply; polled all the same, as a refresh racing with the apply may
        // have read the mode just before it changed (and sets it right a second later).
        eventually(
            &format!("CONFIG6 after an apply of {mode} mode"),
            || config6(lab),
            |c| *c == want,
        );
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            config6(lab),
            want,
            "CONFIG6 in {mode} mode after the agent's refreshes"
        );
    }
}

#[test]
fn ipv6_ports_and_host_addresses_follow_tasks_states_and_the_host() {
    let publish = ["1:8080:80", "1:5353:53/udp", "2:8081:80"];
    let lab = Lab::up_v6("n6m", 2, &publish, "nat");
    lab.ecsnet_up();
    ports_follow_tasks_and_states(&lab);
    addresses_follow_the_host(&lab);
    masquerade_follows_the_mode(&lab);
}

#[test]
fn an_ipv4_only_host_has_empty_ipv6_maps_and_works() {
    let lab = Lab::up("n6m4", 1, &["1:8080:80"]);
    lab.ecsnet_up();
    assert_eq!(ports6(&lab), Ports6::new(), "PORTS6");
    assert_eq!(local6(&lab), BTreeMap::new(), "LOCAL_ADDRS6");
    assert_eq!(config6(&lab), Config6::default(), "CONFIG6");
    assert_eq!(ports_keys(&lab), [(8080, TCP)], "PORTS");
    let to = SocketAddr::new(lab.status.host.uplink_address.into(), 8080);
    let mut s = tcp_connect(lab.client(), to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the published port {to}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo(&mut s, b"ipv4 only").expect("an echo through the published port");
    // Still nothing after the agent's refreshes.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        local6(&lab),
        BTreeMap::new(),
        "LOCAL_ADDRS6 after a refresh"
    );
    assert_eq!(config6(&lab), Config6::default(), "CONFIG6 after a refresh");
}
