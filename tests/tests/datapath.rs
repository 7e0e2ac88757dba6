//! The datapath on a real lab: every path (task to task, published ports, hairpin, masquerade)
//! carries real traffic while Docker's netfilter rules, the bridge's forwarding and netfilter's
//! conntrack see none of it; connections from before `up` survive it; masquerade keeps or
//! reallocates source ports; path-MTU discovery works through the masquerade; a full table
//! fails new flows closed and the agent's garbage collection frees it.

use std::{
    net::{TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use ecsnet::store::paths::InstancePaths;
use ecsnet_common::ct::{DIR_ORIGINAL, KIND_MASQUERADE};
use ecsnet_tests::{
    Background, Lab,
    counters::flows,
    csum_errors, ecsnet_ok, in_netns, iperf3, netfilter_packets, nf_conntrack_count, ns_exec,
    traffic::{echo, tcp_connect},
    world,
};
use serde_json::json;

/// One request/response on an echo connection.
fn roundtrip(s: &mut TcpStream, tag: u8) {
    echo(s, &[tag; 100]).expect("echo on the held connection");
}

fn connect(ns: &str, addr: &str) -> TcpStream {
    let s = tcp_connect(ns, addr.parse().unwrap(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr} from {ns}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn csum_total(nss: &[&str]) -> u64 {
    nss.iter().map(|ns| csum_errors(ns)).sum()
}

#[test]
fn every_path_bypasses_the_bridge_and_netfilter() {
    let lab = Lab::up("dp", 2, &["1:8080:80", "2:8053:53/udp"]);
    lab.ecsnet_up();
    // Publish iperf3's port on task2 through `apply`, as an operator would.
    let mut state = world::state(&lab);
    state["tasks"][1]["portMappings"]
        .as_array_mut()
        .unwrap()
        .push(json!({"containerPort": 5201, "hostPort": 8201, "protocol": "tcp"}));
    world::apply(&lab, "iperf-state.json", &state);

    let (host, client, t1, t2) = (lab.host(), lab.client(), lab.task_ns(1), lab.task_ns(2));
    let _s2 = Background::start(
        t2,
        &["iperf3", "-s", "-p", "5201"],
        Duration::from_millis(300),
    );
    let _sc = Background::start(
        client,
        &["iperf3", "-s", "-p", "5201"],
        Duration::from_millis(300),
    );
    let all = [host, client, t1, t2];
    let csum0 = csum_total(&all);
    let nf0 = netfilter_packets(host);
    let ct0 = nf_conntrack_count(host);
    let s0 = lab.stats();

    let east_west = iperf3(t1, &["-c", "172.17.0.3", "-p", "5201", "-t", "2"]);
    let published = iperf3(client, &["-c", "10.10.0.1", "-p", "8201", "-t", "2"]);
    let published_rev = iperf3(client, &["-c", "10.10.0.1", "-p", "8201", "-t", "2", "-R"]);
    let masquerade = iperf3(t1, &["-c", "10.10.0.2", "-p", "5201", "-t", "2"]);
    for (what, bps) in [
        ("task to task", east_west),
        ("client to published port", published),
        ("published port, replies", published_rev),
        ("task to outside", masquerade),
    ] {
        assert!(bps > 1e6, "{what}: iperf3 got {bps} bit/s");
    }
    // Hairpin: a task to its own and to another task's published port on host addresses.
    for (ns, target) in [
        (t1, "10.10.0.1:8080"),
        (t2, "10.10.0.1:8080"),
        (t2, "172.17.0.1:8080"),
    ] {
        let r = lab.probe(ns, "tcp", target, 20, 200);
        assert_eq!(r["echoed"], 20, "hairpin {ns} -> {target}: {r}");
    }
    for (ns, target) in [(client, "10.10.0.1:8053"), (t2, "10.10.0.2:9000")] {
        let r = lab.probe(ns, "udp", target, 20, 300);
        assert_eq!(r["echoed"], 20, "udp {ns} -> {target}: {r}");
    }
    let ping = ns_exec(
        t1,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.10.0.2"],
    );
    assert!(
        ping.contains(" 0% packet loss"),
        "ping through masquerade: {ping}"
    );

    let s1 = lab.stats();
    assert_eq!(
        netfilter_packets(host),
        nf0,
        "Docker's nat and FORWARD rules (and bridged IPv4 through br_netfilter) saw packets"
    );
    assert!(
        nf_conntrack_count(host) <= ct0,
        "netfilter conntrack gained entries: ecsnet's flows reached nf_conntrack"
    );
    assert_eq!(
        csum_total(&all),
        csum0,
        "a namespace's kernel found checksum errors"
    );
    for (i, t) in s1.tasks.iter().enumerate() {
        assert!(
            t.egress.packets > s0.tasks[i].egress.packets + 1000
                && t.ingress.packets > s0.tasks[i].ingress.packets + 1000,
            "ecsnet's counters of {} barely moved: {:?} -> {:?}",
            t.name,
            s0.tasks[i],
            t
        );
    }
    for kind in ["eastWest", "inbound", "masquerade", "hairpin"] {
        assert!(
            flows(&s1, kind) >= 1,
            "no {kind} flow in ecsnet's table: {:?}",
            s1.conntrack
        );
    }
    assert!(s1.conntrack.nat_mappings >= 1, "{:?}", s1.conntrack);
    assert!(s1.drops.is_empty(), "drops: {:?}", s1.drops);

    // Host processes keep reaching published ports through the kernel's path.
    for target in ["10.10.0.1:8080", "127.0.0.1:8080"] {
        let r = lab.probe(host, "tcp", target, 5, 100);
        assert_eq!(r["echoed"], 5, "host -> {target}: {r}");
    }
}

#[test]
fn connections_from_before_up_survive_up_and_down() {
    let lab = Lab::up("sa", 1, &["1:8080:80"]);
    let (client, t1) = (lab.client(), lab.task_ns(1));
    let mut inbound = connect(client, "10.10.0.1:8080");
    let mut outbound = connect(t1, "10.10.0.2:9000");
    roundtrip(&mut inbound, 1);
    roundtrip(&mut outbound, 2);

    lab.ecsnet_up();
    for i in 0..20 {
        roundtrip(&mut inbound, i);
        roundtrip(&mut outbound, i);
    }
    // They stay on the kernel's path: ecsnet took over nothing in their middle.
    let s = lab.stats();
    assert_eq!(s.conntrack.entries, 0, "{:?}", s.conntrack);
    // ARP is the kernel's: a task that forgot its neighbours finds them again.
    ns_exec(t1, &["ip", "neigh", "flush", "dev", "eth0"]);
    let ping = ns_exec(
        t1,
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", "172.17.0.1"],
    );
    assert!(ping.contains(" 0% packet loss"), "{ping}");

    // New connections are ecsnet's.
    let mut fresh_in = connect(client, "10.10.0.1:8080");
    let mut fresh_out = connect(t1, "10.10.0.2:9000");
    roundtrip(&mut fresh_in, 3);
    roundtrip(&mut fresh_out, 4);
    let s = lab.stats();
    assert_eq!(
        s.conntrack.flows.get("inbound"),
        Some(&1),
        "{:?}",
        s.conntrack
    );
    assert_eq!(
        s.conntrack.flows.get("masquerade"),
        Some(&1),
        "{:?}",
        s.conntrack
    );

    // `down`: netfilter picks up ecsnet's flows in their middle (nf_conntrack_tcp_loose=1) and
    // translates them the same way, since the masquerade kept the source port.
    ecsnet_ok(&["--instance", &lab.name, "down"]);
    for i in 0..5 {
        roundtrip(&mut inbound, i);
        roundtrip(&mut outbound, i);
        roundtrip(&mut fresh_in, i);
        roundtrip(&mut fresh_out, i);
    }
}

#[test]
fn masquerade_keeps_a_free_source_port_and_reallocates_a_taken_one() {
    let lab = Lab::up("mq", 2, &[]);
    lab.ecsnet_up();
    let echo = |ns: &str| {
        in_netns(ns, || {
            let s = UdpSocket::bind("0.0.0.0:40000").expect("bind udp 40000");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.send_to(b"hello", "10.10.0.2:9000").unwrap();
            let mut buf = [0u8; 16];
            let (n, from) = s.recv_from(&mut buf).expect("echo through masquerade");
            (buf[..n].to_vec(), from.to_string())
        })
    };
    for ns in [lab.task_ns(1), lab.task_ns(2)] {
        let (back, from) = echo(ns);
        assert_eq!(back, b"hello");
        assert_eq!(from, "10.10.0.2:9000");
    }
    let paths = InstancePaths::new(&lab.name);
    let ct = ecsnet::kernel::maps::read_ct(&paths).unwrap();
    let mapping = |task: [u8; 4]| {
        ct.iter()
            .find(|(_, k, e)| {
                e.dir == DIR_ORIGINAL
                    && e.kind == KIND_MASQUERADE
                    && k.saddr.to_ne_bytes() == task
                    && u16::from_be(k.sport) == 40000
            })
            .map_or_else(
                || panic!("no masquerade entry for {task:?}:40000 in {ct:?}"),
                |(_, _, e)| (e.nat_saddr.to_ne_bytes(), u16::from_be(e.nat_sport)),
            )
    };
    let (a, b) = (mapping([172, 17, 0, 2]), mapping([172, 17, 0, 3]));
    assert_eq!(
        a,
        ([10, 10, 0, 1], 40000),
        "the first task keeps its free port"
    );
    assert_eq!(b.0, [10, 10, 0, 1]);
    assert_ne!(
        b.1, 40000,
        "the second task cannot have the same port towards the same peer"
    );
    assert!(b.1 >= 1024, "allocated port {} below 1024", b.1);
}

/// A namespace behind the lab's client, reached over a link with a smaller MTU: removed on drop.
struct Far(String);

impl Drop for Far {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn path_mtu_discovery_works_through_the_masquerade() {
    let lab = Lab::up("pm", 1, &[]);
    let (client, t1) = (lab.client().to_owned(), lab.task_ns(1).to_owned());
    let far = Far(format!("{}-far", lab.name));
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["netns", "add", &far.0]);
    ip(&[
        "-n", &client, "link", "add", "far0", "type", "veth", "peer", "name", "eth0", "netns",
        &far.0,
    ]);
    // The client (the VPC's router here) has MTU 1000 towards the far side; the far end 1500,
    // so it advertises an MSS that only path-MTU discovery can correct.
    ip(&["-n", &client, "link", "set", "far0", "mtu", "1000", "up"]);
    ip(&["-n", &client, "addr", "add", "10.99.0.1/24", "dev", "far0"]);
    ip(&["-n", &far.0, "link", "set", "lo", "up"]);
    ip(&["-n", &far.0, "link", "set", "eth0", "up"]);
    ip(&["-n", &far.0, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    ip(&["-n", &far.0, "route", "add", "default", "via", "10.99.0.1"]);
    ns_exec(&client, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let _srv = Background::start(
        &far.0,
        &["iperf3", "-s", "-p", "5201"],
        Duration::from_millis(300),
    );

    lab.ecsnet_up();
    let csum0 = csum_total(&[&t1, &far.0]);
    let nf0 = netfilter_packets(lab.host());
    let rules0 = ns_exec(lab.host(), &["iptables-save", "-c"]);
    let bps = iperf3(&t1, &["-c", "10.99.0.2", "-p", "5201", "-t", "2"]);
    assert!(
        bps > 1e6,
        "bulk TCP from the task across MTU 1000: {bps} bit/s"
    );
    let route = ns_exec(&t1, &["ip", "route", "get", "10.99.0.2"]);
    assert!(
        route.contains("mtu 1000"),
        "the task never learned the path MTU (frag-needed not translated back): {route}"
    );
    let rules1 = ns_exec(lab.host(), &["iptables-save", "-c"]);
    let moved: Vec<&str> = rules1
        .lines()
        .filter(|l| !l.starts_with('#') && !rules0.lines().any(|o| o == *l))
        .collect();
    assert_eq!(
        netfilter_packets(lab.host()),
        nf0,
        "the masquerade went through netfilter: {moved:?}"
    );
    assert_eq!(csum_total(&[&t1, &far.0]), csum0, "checksum errors");
    let s = lab.stats();
    assert!(s.drops.is_empty(), "{:?}", s.drops);
}

#[test]
fn a_full_assured_table_evicts_nothing_new_flows_still_work_and_garbage_collection_frees_both() {
    let lab = Lab::up("ct", 2, &[]);
    // The assured table holds 4 flows of 2 entries; idle UDP flows expire after 5 s.
    lab.ecsnet_up_with(&["--ct-size", "8", "--ct-timeouts", "udp=5,tcp-closing=2"]);
    let (t1, t2) = (lab.task_ns(1).to_owned(), lab.task_ns(2).to_owned());
    // Assured by its handshake.
    let mut held = connect(&t1, "10.10.0.2:9000");
    roundtrip(&mut held, 1);
    // A UDP flow that is answered and still alive 2 s after it started is assured.
    let udp_stream = |port: u16| {
        let t2 = t2.clone();
        std::thread::spawn(move || {
            in_netns(&t2, move || {
                let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(700)))
                    .unwrap();
                let mut buf = [0u8; 4];
                let mut answered = 0;
                for gap in [0, 2200] {
                    std::thread::sleep(Duration::from_millis(gap));
                    s.send_to(b"x", "10.10.0.2:9000").unwrap();
                    answered += u32::from(s.recv_from(&mut buf).is_ok());
                }
                answered == 2
            })
        })
    };
    let streams: Vec<_> = [41001, 41002, 41003].map(udp_stream).into();
    for (port, st) in [41001, 41002, 41003].iter().zip(streams) {
        assert!(st.join().unwrap(), "UDP stream from port {port}");
    }
    let s = lab.stats();
    let c = &s.conntrack;
    assert_eq!(
        (
            c.entries - c.unanswered_entries,
            c.capacity,
            c.assured_table_full
        ),
        (8, 8, 0),
        "the connection and three streams fill the assured table: {c:?}"
    );
    // A fourth stream works all the same: it stays where it can be evicted, and is counted.
    assert!(
        udp_stream(41004).join().unwrap(),
        "a new flow with the assured table full"
    );
    let s = lab.stats();
    let c = &s.conntrack;
    assert!(c.assured_table_full >= 1, "{c:?}");
    assert_eq!(
        c.entries - c.unanswered_entries,
        8,
        "nothing was evicted: {c:?}"
    );
    assert!(
        c.unanswered_entries >= 2,
        "the fourth flow is unanswered-table's: {c:?}"
    );
    assert!(!s.drops.contains_key("CT_TABLE_FULL"), "{:?}", s.drops);
    // The established connection was not evicted.
    for i in 0..5 {
        roundtrip(&mut held, i);
    }
    // The agent expires the idle UDP flows from both tables; the connection lives on.
    let deadline = Instant::now() + Duration::from_secs(15);
    while lab.stats().conntrack.entries > 2 {
        assert!(
            Instant::now() < deadline,
            "idle flows were never collected: {:?}",
            lab.stats().conntrack
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        udp_stream(41006).join().unwrap(),
        "a new flow after garbage collection"
    );
    roundtrip(&mut held, 9);
    // A closed TCP flow is collected after its closing timeout.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(15);
    let paths = InstancePaths::new(&lab.name);
    let tcp_entries = || {
        ecsnet::kernel::maps::read_ct(&paths)
            .unwrap()
            .iter()
            .filter(|(_, k, _)| k.proto == ecsnet_common::ct::PROTO_TCP)
            .count()
    };
    while tcp_entries() > 0 {
        assert!(
            Instant::now() < deadline,
            "closed TCP flow never collected: {:?}",
            lab.stats().conntrack
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = ecsnet_ok(&["--instance", &lab.name, "stats"]);
    assert!(
        out.contains("conntrack: ") && out.contains("found the table full"),
        "{out}"
    );
}
