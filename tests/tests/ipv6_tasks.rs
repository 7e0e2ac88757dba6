//! Dual-stack tasks under ecsnet, with real traffic on a dual-stack lab (`--ipv6 nat`): each
//! task has its IPv6 address in ecsnet (`task ls`), IPv6 between tasks and through published
//! ports works, and a hostile task cannot speak for another over IPv6: a router advertisement,
//! a neighbour advertisement for another task's address, a packet from another task's address
//! and a `DHCPv6` server message from it reach no one, are counted with their reason on its
//! interface, and leave its neighbours' routes and neighbour caches as they were. With a real
//! dockerd (`--ipv6`), each container's task has the IPv6 address Docker gave it.

use std::{
    cell::RefCell,
    io::{BufRead as _, BufReader},
    net::Ipv6Addr,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ecsnet_lab::fixture::packet6::{
    ALL_NODES, ND_NEIGHBOR_ADVERT, ND_OPT_TARGET_LL, P6, link_local,
};
use ecsnet_tests::{
    Lab, churn,
    counters::task_drops,
    docker::{self, docker_ok},
    ecsnet_bin, ns_exec,
    raw::{Mac, PacketSocket, contains, mac_of, mac_str, marker},
    world::{down_leaves_nothing, instance_ok},
};
use serde_json::Value;

fn addr6(lab: &Lab, task: usize) -> Ipv6Addr {
    lab.status.tasks[task - 1]
        .address6
        .unwrap_or_else(|| panic!("task{task} has no IPv6 address: {:?}", lab.status))
}

/// Six bytes that tell one of the test's frames from every other frame (the end of a marker).
fn tag(what: &str) -> Vec<u8> {
    let m = marker(what);
    m[m.len() - 6..].to_vec()
}

/// `p` with a neighbour-discovery nonce option (RFC 3971, type 14) carrying `tag`.
fn with_nonce(p: P6, tag: &[u8]) -> P6 {
    p.append(&[&[14, 1], tag].concat())
}

/// All-nodes multicast's MAC.
const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];

/// A task's routes learned from router advertisements, and the MAC its neighbour cache has for
/// `addr` (None without an entry).
fn learned(ns: &str, addr: Ipv6Addr) -> (Vec<String>, Option<String>) {
    let ra = ns_exec(ns, &["ip", "-6", "route", "show", "proto", "ra"])
        .lines()
        .map(str::to_owned)
        .collect();
    let neigh = ns_exec(ns, &["ip", "-6", "neigh", "show", &addr.to_string()]);
    let mac = neigh
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(str::to_owned);
    (ra, mac)
}

/// Task to task and the client to a published port, over IPv6.
fn ipv6_works(lab: &Lab) {
    let probe =
        |ns: &str, proto: &str, to: String| lab.probe(ns, proto, &to, 3, 100)["echoed"].clone();
    assert_eq!(
        probe(lab.task_ns(1), "tcp", format!("[{}]:80", addr6(lab, 2))),
        3
    );
    assert_eq!(
        probe(lab.task_ns(3), "udp", format!("[{}]:53", addr6(lab, 2))),
        3
    );
    let host6 = lab
        .status
        .host
        .uplink_address6
        .expect("the host's IPv6 address");
    assert_eq!(probe(lab.client(), "tcp", format!("[{host6}]:8081")), 3);
}

/// Task 1's raw socket, its MAC and IPv6 address.
struct Sender {
    socket: PacketSocket,
    mac: Mac,
    addr: Ipv6Addr,
}

impl Sender {
    fn to(&self, mut p: P6, dmac: Mac) {
        p.dmac = dmac;
        self.socket.send_ok(&p.from_mac(self.mac).frame());
    }
}

/// The tags of the hostile frames task 1 sends: a router advertisement, a neighbour
/// advertisement for task 2's address, a packet from task 2's address, a `DHCPv6` server message.
fn hostile_frames(
    from1: &Sender,
    a2: Ipv6Addr,
    a3: Ipv6Addr,
    mac3: Mac,
) -> [(&'static str, Vec<u8>); 4] {
    let (mac1, ll1) = (from1.mac, link_local(from1.mac));
    let ra = tag("ra");
    from1.to(with_nonce(P6::router_advert(ll1, mac1), &ra), ALL_NODES_MAC);
    let na = tag("na");
    let claim = P6::nd(
        from1.addr.octets(),
        ALL_NODES,
        ND_NEIGHBOR_ADVERT,
        a2.octets(),
        &[(ND_OPT_TARGET_LL, mac1)],
    );
    from1.to(with_nonce(claim, &na), ALL_NODES_MAC);
    let spoof = tag("spoof");
    from1.to(P6::udp6(a2.octets(), 5000, a3.octets(), 53, &spoof), mac3);
    let dhcp = tag("dhcp");
    from1.to(P6::udp6(ll1, 547, ALL_NODES, 546, &dhcp), ALL_NODES_MAC);
    [("RA", ra), ("NA", na), ("spoofed", spoof), ("DHCPv6", dhcp)]
}

/// The control, sent after the hostile frames: a well-formed packet from task 1's own address
/// reaches `at` (task `to`, `mac`), and no hostile frame arrived before it.
fn only_the_control_arrives(
    from1: &Sender,
    to: Ipv6Addr,
    mac: Mac,
    at: &PacketSocket,
    hostile: &[(&str, Vec<u8>)],
) {
    let own = tag("own");
    from1.to(
        P6::udp6(from1.addr.octets(), 5000, to.octets(), 53, &own),
        mac,
    );
    let seen = RefCell::new(Vec::new());
    let arrived = at.wait_for(Duration::from_secs(5), |f| {
        seen.borrow_mut().push(f.to_vec());
        contains(f, &own)
    });
    assert!(
        arrived.is_some(),
        "control: task1's own packet did not reach {}",
        at.name
    );
    for (what, t) in hostile {
        assert!(
            !seen.borrow().iter().any(|f| contains(f, t)),
            "task1's {what} reached {}",
            at.name
        );
    }
}

#[test]
fn a_dual_stack_task_speaks_only_for_itself_and_is_no_router() {
    let lab = Lab::up_v6(
        "v6g",
        3,
        &["1:8080:80", "2:8081:80", "2:5353:53/udp"],
        "nat",
    );
    lab.ecsnet_up();
    let (t1, t2, t3) = (lab.task_ns(1), lab.task_ns(2), lab.task_ns(3));

    // ecsnet knows each task's IPv6 address, and IPv6 works.
    let ls: Value = serde_json::from_str(&instance_ok(&lab, &["task", "ls", "--json"])).unwrap();
    for (i, t) in ls.as_array().expect("a list").iter().enumerate() {
        assert_eq!(t["ipv6Address"], addr6(&lab, i + 1).to_string(), "{t}");
    }
    ipv6_works(&lab);

    let (mac2, mac3) = (mac_of(t2, "eth0"), mac_of(t3, "eth0"));
    let (a2, a3) = (addr6(&lab, 2), addr6(&lab, 3));
    let from1 = Sender {
        socket: PacketSocket::open(t1, "eth0"),
        mac: mac_of(t1, "eth0"),
        addr: addr6(&lab, 1),
    };
    let (at2, at3) = (
        PacketSocket::open(t2, "eth0"),
        PacketSocket::open(t3, "eth0"),
    );
    let before = lab.stats();
    let moved =
        |reason| task_drops(&lab.stats(), "task1", reason) - task_drops(&before, "task1", reason);

    // The builder's frames are what a kernel takes: an echo request from task 1's raw socket
    // is answered (a wrong checksum would be dropped and counted in Icmp6InCsumErrors).
    from1.to(P6::echo6(from1.addr.octets(), a2.octets()), mac2);
    let reply = from1.socket.wait_for(Duration::from_secs(5), |f| {
        f.len() > 54 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 129
    });
    assert!(
        reply.is_some(),
        "task2 did not answer the builder's echo request"
    );

    let hostile = hostile_frames(&from1, a2, a3, mac3);
    only_the_control_arrives(&from1, a2, mac2, &at2, &hostile);
    only_the_control_arrives(&from1, a3, mac3, &at3, &hostile);
    assert_eq!(moved("ROGUE_ROUTER"), 2, "the RA and the DHCPv6 message");
    assert_eq!(moved("ND_SPOOFED"), 1, "the NA");
    assert_eq!(moved("SPOOFED_SOURCE"), 1, "task2's address");
    for ns in [t2, t3] {
        let (ra_routes, _) = learned(ns, a2);
        assert!(
            ra_routes.is_empty(),
            "{ns} took routes from an advertisement: {ra_routes:?}"
        );
    }
    let (_, at_t3) = learned(t3, a2);
    assert!(
        at_t3.is_none() || at_t3.as_deref() == Some(mac_str(mac2).as_str()),
        "task3 has task2's address at {at_t3:?}, not {}",
        mac_str(mac2)
    );

    monitor_names_the_rogue_router(&lab, &from1);

    // IPv6 still works, and ecsnet leaves nothing.
    ipv6_works(&lab);
    down_leaves_nothing(lab);
}

/// `ecsnet monitor` shows task 1's router advertisement with its IPv6 addresses: sent again
/// every 200 ms until the monitor (connected some time after it started) has one, 10 s at most.
fn monitor_names_the_rogue_router(lab: &Lab, from1: &Sender) {
    let mut child = Command::new(ecsnet_bin())
        .args(["--instance", &lab.name, "monitor", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ecsnet monitor");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let src = link_local(from1.mac);
    let want = (
        Ipv6Addr::from(src).to_string(),
        Ipv6Addr::from(ALL_NODES).to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let found = loop {
        if Instant::now() > deadline {
            break false;
        }
        from1.to(P6::router_advert(src, from1.mac), ALL_NODES_MAC);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            if v["reason"] == "ROGUE_ROUTER" && v["task"] == "task1" {
                assert_eq!(
                    (v["src"].as_str(), v["dst"].as_str()),
                    (Some(want.0.as_str()), Some(want.1.as_str())),
                    "{v}"
                );
                break true;
            }
            seen.push(line);
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found,
        "no ROGUE_ROUTER event of task1 within 10 s; the monitor printed {seen:?}"
    );
}

/// `task ls --json` of the lab's instance: container id -> IPv6 address, for the engine's tasks.
fn engine_ipv6(lab: &Lab) -> Vec<(String, String)> {
    let ls: Value = serde_json::from_str(&instance_ok(lab, &["task", "ls", "--json"])).unwrap();
    ls.as_array()
        .expect("a list")
        .iter()
        .filter(|t| t["source"] == "docker")
        .map(|t| {
            let field = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
            (field("containerId"), field("ipv6Address"))
        })
        .collect()
}

#[test]
fn an_engine_task_has_the_ipv6_address_docker_gave_it() {
    let lab = docker::up("v6d", 2, &["1:8080:80"], &["--ipv6"]);
    let (file, url) = (
        churn::state_file(&lab, "allow", &[]),
        churn::engine_url(&lab),
    );
    churn::up(&lab, &file, &url, &[]);
    // One started after `up`: only the engine can have told ecsnet its address.
    let late = docker::run(
        &lab,
        &churn::spec(&lab.name, "late", &[churn::dynamic(80)], &[]),
    );
    churn::wait_task(&lab, &late);
    let given = docker_ok(
        &lab,
        &[
            "inspect",
            "-f",
            "{{.NetworkSettings.GlobalIPv6Address}}",
            &late,
        ],
    );
    let given: Ipv6Addr = given
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{given:?}: {e}"));
    let tasks = engine_ipv6(&lab);
    assert!(
        tasks.contains(&(late.clone(), given.to_string())),
        "{late} at {given}: {tasks:?}"
    );
    assert!(
        tasks.iter().all(|(_, a)| a.parse::<Ipv6Addr>().is_ok()),
        "every container has its IPv6 address: {tasks:?}"
    );
    // Under the guard, with the addresses known: the late one reaches task 1 over IPv6, and the
    // client reaches task 1's published port.
    let name = docker_ok(&lab, &["inspect", "-f", "{{.Name}}", &late]);
    let out = docker::probe_from(
        &lab,
        name.trim().trim_start_matches('/'),
        "tcp",
        &format!("[{}]:80", addr6(&lab, 1)),
        3,
    );
    assert_eq!(out["echoed"], 3, "{out}");
    let host6 = lab
        .status
        .host
        .uplink_address6
        .expect("the host's IPv6 address");
    assert_eq!(
        lab.probe(lab.client(), "tcp", &format!("[{host6}]:8080"), 3, 100)["echoed"],
        3
    );
    down_leaves_nothing(lab);
}
