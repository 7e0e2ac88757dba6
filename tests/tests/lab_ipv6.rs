//! The dual-stack lab (`lab up --ipv6 [nat|routed]`) without ecsnet is Docker's own IPv6
//! bridge mode: task to task over docker0, published ports through NAT66 (`nat`) or at the
//! tasks' own addresses (`routed`), unpublished ports filtered, the tasks' traffic masqueraded
//! (`nat`) or not (`routed`); the same paths with `ecsnet up` in its default (published ports
//! then translated by ecsnet, past Docker's ip6tables DNAT); and the
//! real-engine lab with `--ipv6` gives its containers the addresses the imitation gives.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use ecsnet_lab::lab::{BRIDGE_SUBNET6, CLIENT_ADDR6, Ipv6Mode, UPLINK_ADDR6};
use ecsnet_tests::{
    Lab, docker, ecsnet, ecsnet_fails, ecsnet_ok, in_netns, leftovers, ns_exec, rule6_packets,
    traffic::{self, tcp_connect},
    world::down_leaves_nothing,
};

/// A port nothing publishes, served by the test itself inside a task.
const UNPUBLISHED: u16 = 81;
/// A port of the client's, served by the test itself, to see who connects.
const CLIENT_SEEN: u16 = 9100;

fn at(addr: Ipv6Addr, port: u16) -> String {
    SocketAddr::from((addr, port)).to_string()
}

fn addr6(lab: &Lab, task: usize) -> Ipv6Addr {
    lab.status.tasks[task - 1]
        .address6
        .unwrap_or_else(|| panic!("task{task} has no IPv6 address: {:?}", lab.status))
}

/// Holds a TCP connection from `from` to `to` open while it finds, with `ss` in namespace
/// `server`, the peer address the server's side of it sees.
fn peer_seen_by(from: &str, to: &str, server: &str) -> IpAddr {
    peer_seen_with(from, to, || {
        ns_exec(server, &["ss", "-Htn", "state", "established"])
    })
}

/// The same, with `ss` run by `ss` (in a container, say).
fn peer_seen_with(from: &str, to: &str, ss: impl Fn() -> String) -> IpAddr {
    let to: SocketAddr = to.parse().expect("a socket address");
    let conn = tcp_connect(from, to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {to} from {from}: {e}"));
    let local = conn.local_addr().expect("local address").port();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ss = ss();
        // "RECV-Q SEND-Q LOCAL PEER": the peer whose port is our connection's.
        let seen = ss.lines().find_map(|l| {
            let peer: SocketAddr = l.split_whitespace().nth(3)?.parse().ok()?;
            (peer.port() == local).then_some(peer.ip())
        });
        if let Some(ip) = seen {
            return ip;
        }
        assert!(
            Instant::now() < deadline,
            "no connection from port {local} to {to}: {ss}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `ICMPv6` messages namespace `ns` sent: (all, router solicitations, neighbour
/// solicitations), from `/proc/net/snmp6`.
fn icmp6_out(ns: &str) -> (u64, u64, u64) {
    let text = ns_exec(ns, &["cat", "/proc/net/snmp6"]);
    let get = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(char::is_whitespace)?;
                (k == name).then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {name} in {ns}'s snmp6"))
    };
    (
        get("Icmp6OutMsgs"),
        get("Icmp6OutRouterSolicits"),
        get("Icmp6OutNeighborSolicits"),
    )
}

/// An idle dual-stack lab is quiet: its multicast reports end (within 10 s even on a loaded
/// machine) and no namespace sent a router solicitation or a duplicate address probe.
fn quiet(namespaces: &[&str]) {
    let read = || -> Vec<(u64, u64, u64)> { namespaces.iter().map(|ns| icmp6_out(ns)).collect() };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = read();
        if now == last {
            break;
        }
        assert!(Instant::now() < deadline, "ICMPv6 still sent: {now:?}");
        last = now;
    }
    for (ns, (_, rs, ns_probes)) in namespaces.iter().zip(last) {
        assert_eq!(
            (rs, ns_probes),
            (0, 0),
            "{ns}: router or neighbour solicitations"
        );
    }
}

/// A TCP listener the test serves in namespace `ns` on `[::]:port`.
fn listen(ns: &str, port: u16) -> TcpListener {
    in_netns(ns, move || TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))
        .unwrap_or_else(|e| panic!("listen on [::]:{port} in {ns}: {e}"))
}

/// The address a connection from `from` to the client's `CLIENT_SEEN` listener arrives from.
fn source_at_client(lab: &Lab, from: &str) -> IpAddr {
    let listener = listen(lab.client(), CLIENT_SEEN);
    let to = SocketAddr::from((CLIENT_ADDR6, CLIENT_SEEN));
    let _conn = tcp_connect(from, to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {to} from {from}: {e}"));
    let (_accepted, peer) = listener.accept().expect("accept at the client");
    peer.ip()
}

/// The address a UDP datagram from `from` to the client arrives from.
fn udp_source_at_client(lab: &Lab, from: &str) -> IpAddr {
    let rx = traffic::udp(lab.client(), &at(Ipv6Addr::UNSPECIFIED, CLIENT_SEEN), None);
    let tx = traffic::udp(
        from,
        &at(Ipv6Addr::UNSPECIFIED, 0),
        Some(&at(CLIENT_ADDR6, CLIENT_SEEN)),
    );
    let seen = |msg: &'static [u8]| move |d: &[u8]| d == msg;
    // One datagram at a time until one arrives (a first one may wait on neighbour discovery).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tx.send(b"l6-hello").expect("send to the client");
        if let Some(from) = traffic::udp_wait(&rx, Duration::from_secs(1), seen(b"l6-hello")) {
            return from.ip();
        }
        assert!(Instant::now() < deadline, "no datagram from {from} in 10 s");
    }
}

/// Connecting from `from` to `to` gets no answer at all: no echo, no refusal, the packets
/// dropped on the way (the target listens, so a refusal would mean they arrived).
fn filtered(from: &str, to: &str) {
    let to: SocketAddr = to.parse().expect("a socket address");
    let got = tcp_connect(from, to, Duration::from_secs(2)).map(drop);
    assert!(
        matches!(&got, Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)),
        "{from} -> {to}: want a timeout (filtered), got {got:?}"
    );
}

/// Echo over TCP and UDP from namespace `ns` to `target`.
fn echoes(lab: &Lab, ns: &str, tcp: &str, udp: &str) {
    assert_eq!(lab.probe(ns, "tcp", tcp, 4, 200)["echoed"], 4, "tcp {tcp}");
    assert_eq!(lab.probe(ns, "udp", udp, 4, 200)["echoed"], 4, "udp {udp}");
}

/// Task to task over docker0, TCP and UDP, at the tasks' own IPv6 addresses.
fn task_to_task(lab: &Lab) {
    let t2 = addr6(lab, 2);
    echoes(lab, lab.task_ns(1), &at(t2, 80), &at(t2, 53));
}

const PUBLISH: [&str; 3] = ["1:8080:80", "2:0:80", "2:5353:53/udp"];

/// Who translates the published ports and the masquerade of a `nat` lab.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Nat66 {
    /// Docker's ip6tables DNAT and MASQUERADE (the lab alone).
    Kernel,
    /// ecsnet's NAT66: Docker's rules see nothing.
    Ecsnet,
}

/// The `nat` paths: published ports on the host's address (DNAT by `by`, the client's address
/// kept), the tasks' traffic masqueraded to the uplink's (by `by` too), an unpublished port
/// not reachable.
fn nat_paths(lab: &Lab, by: Nat66) {
    task_to_task(lab);
    let dnat = || rule6_packets(lab.host(), "nat", "DOCKER", "dpt:8080 ");
    let before = dnat();
    let host = |port| at(UPLINK_ADDR6, port);
    echoes(lab, lab.client(), &host(8080), &host(5353));
    let want = u64::from(by == Nat66::Kernel);
    assert_eq!(
        dnat(),
        before + want,
        "one connection: DNATs by ip6tables ({by:?})"
    );
    let dynamic = lab.status.tasks[1].port_mappings[0].host_port;
    assert_eq!(
        lab.probe(lab.client(), "tcp", &host(dynamic), 2, 10)["echoed"],
        2
    );
    assert_eq!(
        peer_seen_by(lab.client(), &host(8080), lab.task_ns(1)),
        IpAddr::from(CLIENT_ADDR6),
        "DNAT only: the task sees the client's own address"
    );
    // Out: masqueraded to the host's uplink address, TCP and UDP.
    let masq = || rule6_packets(lab.host(), "nat", "POSTROUTING", BRIDGE_SUBNET6);
    let before = masq();
    assert_eq!(
        source_at_client(lab, lab.task_ns(2)),
        IpAddr::from(UPLINK_ADDR6)
    );
    assert_eq!(
        udp_source_at_client(lab, lab.task_ns(1)),
        IpAddr::from(UPLINK_ADDR6)
    );
    match by {
        Nat66::Kernel => assert!(masq() >= before + 2, "both through Docker's MASQUERADE"),
        Nat66::Ecsnet => assert_eq!(masq(), before, "Docker's MASQUERADE saw ecsnet's flows"),
    }
    assert_eq!(
        lab.probe(lab.task_ns(2), "udp", &at(CLIENT_ADDR6, 9000), 3, 64)["echoed"],
        3
    );
}

/// A port the task serves but nothing publishes is not reachable from the client: neither on
/// the host's address, nor at the task's own even when the client routes fixed-cidr-v6 to the
/// host (for `nat` it adds that route itself).
fn unpublished_filtered(lab: &Lab, mode: Ipv6Mode) {
    let _served = listen(lab.task_ns(1), UNPUBLISHED);
    // Reachable from a neighbour on docker0, so it does listen.
    let t1 = at(addr6(lab, 1), UNPUBLISHED);
    assert!(tcp_connect(lab.task_ns(2), t1.parse().unwrap(), Duration::from_secs(5)).is_ok());
    if mode == Ipv6Mode::Nat {
        let refused = tcp_connect(
            lab.client(),
            SocketAddr::from((UPLINK_ADDR6, UNPUBLISHED)),
            Duration::from_secs(5),
        )
        .map(drop);
        assert_eq!(
            refused.as_ref().map_err(std::io::Error::kind),
            Err(ErrorKind::ConnectionRefused),
            "no DNAT for an unpublished port: the host itself refuses"
        );
        let via = UPLINK_ADDR6.to_string();
        ns_exec(
            lab.client(),
            &["ip", "-6", "route", "replace", BRIDGE_SUBNET6, "via", &via],
        );
    }
    filtered(lab.client(), &t1);
}

#[test]
fn nat_lab_is_docker_ipv6_bridge_mode() {
    let lab = Lab::up_v6("l6n", 2, &PUBLISH, "nat");
    let s = &lab.status;
    assert_eq!(s.ipv6, Some(Ipv6Mode::Nat));
    assert_eq!(s.host.uplink_address6, Some(UPLINK_ADDR6));
    assert_eq!(s.client.address6, Some(CLIENT_ADDR6));
    assert_eq!(
        s.host.bridge_address6.map(|a| a.to_string()).as_deref(),
        Some("fd00:172:17::1")
    );
    // dockerd 20.10's addresses with a /64 fixed-cidr-v6: the prefix and the MAC 02:42:<IPv4>.
    assert_eq!(addr6(&lab, 1).to_string(), "fd00:172:17::242:ac11:2");
    assert_eq!(addr6(&lab, 2).to_string(), "fd00:172:17::242:ac11:3");
    let status: serde_json::Value = serde_json::from_str(&ecsnet_ok(&[
        "lab", "status", "--name", &lab.name, "--json",
    ]))
    .unwrap();
    assert_eq!(status["ipv6"], "nat");
    assert_eq!(status["tasks"][1]["address6"], "fd00:172:17::242:ac11:3");
    let text = ecsnet_ok(&["lab", "status", "--name", &lab.name]);
    assert!(text.contains("fd00:172:17::242:ac11:2"), "{text}");
    // Quiet neighbour discovery: every address usable at once, none tentative.
    quiet(&[lab.host(), lab.client(), lab.task_ns(1), lab.task_ns(2)]);
    for ns in [lab.host(), lab.client(), lab.task_ns(1)] {
        let addrs = ns_exec(ns, &["ip", "-6", "addr"]);
        assert!(!addrs.contains("tentative"), "{ns}: {addrs}");
        let dad = ns_exec(ns, &["cat", "/proc/sys/net/ipv6/conf/default/accept_dad"]);
        assert_eq!(dad.trim(), "0", "{ns}");
    }
    let mac = ns_exec(lab.task_ns(1), &["cat", "/sys/class/net/eth0/address"]);
    assert_eq!(mac.trim(), "02:42:ac:11:00:02", "Docker's MAC");

    nat_paths(&lab, Nat66::Kernel);
    unpublished_filtered(&lab, Ipv6Mode::Nat);
    down_leaves_nothing(lab);
}

/// The `routed` paths: the client reaches a published port at the task's own address and the
/// task sees the client's; the task's traffic leaves with its own address.
fn routed_paths(lab: &Lab) {
    task_to_task(lab);
    let t1 = addr6(lab, 1);
    assert_eq!(
        lab.probe(lab.client(), "tcp", &at(t1, 80), 4, 200)["echoed"],
        4
    );
    assert_eq!(
        peer_seen_by(lab.client(), &at(t1, 80), lab.task_ns(1)),
        IpAddr::from(CLIENT_ADDR6)
    );
    assert_eq!(
        source_at_client(lab, lab.task_ns(2)),
        IpAddr::from(addr6(lab, 2))
    );
    assert_eq!(udp_source_at_client(lab, lab.task_ns(1)), IpAddr::from(t1));
}

#[test]
fn routed_lab_reaches_tasks_at_their_own_addresses() {
    let lab = Lab::up_v6("l6r", 2, &PUBLISH, "routed");
    assert_eq!(lab.status.ipv6, Some(Ipv6Mode::Routed));
    let nat = ns_exec(lab.host(), &["ip6tables-save", "-t", "nat"]);
    assert!(
        !nat.contains("DNAT") && !nat.contains("MASQUERADE"),
        "routed: no NAT66: {nat}"
    );
    routed_paths(&lab);
    // ICMPv6 reaches the tasks (Docker lets it through in routed mode).
    let out = ns_exec(
        lab.client(),
        &[
            "ping",
            "-6",
            "-n",
            "-c",
            "1",
            "-W",
            "2",
            &addr6(&lab, 2).to_string(),
        ],
    );
    assert!(out.contains(" 0% packet loss"), "{out}");
    unpublished_filtered(&lab, Ipv6Mode::Routed);
    down_leaves_nothing(lab);
}

/// `ecsnet down` on a lab that stays leaves nothing of the instance: no program attached, and
/// of what an instance or lab could leave only what the lab had before `ecsnet up` (`before`).
fn ecsnet_down_leaves_nothing(lab: &Lab, before: &[String]) {
    ecsnet_ok(&["--instance", &lab.name, "down"]);
    let qdisc = ns_exec(lab.host(), &["tc", "qdisc", "show"]);
    assert!(!qdisc.contains("clsact"), "a clsact qdisc is left: {qdisc}");
    let eth0 = ns_exec(lab.host(), &["ip", "-d", "link", "show", "eth0"]);
    assert!(!eth0.contains("prog/xdp"), "XDP left: {eth0}");
    assert_eq!(
        leftovers(&lab.name),
        before,
        "ecsnet down left things behind"
    );
    let out = ecsnet(&["--instance", &lab.name, "stats"]);
    assert_eq!(out.status.code(), Some(2), "stats after down: not up");
}

#[test]
fn ecsnet_default_leaves_ipv6_paths_working() {
    let nat = Lab::up_v6("l6e", 2, &PUBLISH, "nat");
    let routed = Lab::up_v6("l6f", 2, &PUBLISH, "routed");
    let lab_only = [leftovers(&nat.name), leftovers(&routed.name)];
    nat.ecsnet_up();
    routed.ecsnet_up();
    nat_paths(&nat, Nat66::Ecsnet);
    routed_paths(&routed);
    // IPv4 beside it, through ecsnet.
    assert_eq!(
        nat.probe(nat.client(), "tcp", "10.10.0.1:8080", 3, 100)["echoed"],
        3
    );
    unpublished_filtered(&routed, Ipv6Mode::Routed);

    ecsnet_down_leaves_nothing(&nat, &lab_only[0]);
    ecsnet_down_leaves_nothing(&routed, &lab_only[1]);
    // The kernel's paths as before.
    task_to_task(&nat);
    let host = at(UPLINK_ADDR6, 8080);
    assert_eq!(nat.probe(nat.client(), "tcp", &host, 2, 10)["echoed"], 2);
    down_leaves_nothing(nat);
    down_leaves_nothing(routed);
}

#[test]
fn docker_lab_ipv6_gives_the_imitations_addresses() {
    let publish = ["1:8080:80", "2:0:80"];
    let real = docker::up("l6d", 2, &publish, &["--ipv6"]);
    let s = docker::status(&real);
    assert_eq!(s.lab.ipv6, Some(Ipv6Mode::Nat));
    assert!(s.docker.userland_proxy, "Docker's default");
    let want: Vec<String> = (1..=2)
        .map(|i| ecsnet_lab::lab::task_address6(ecsnet_lab::lab::task_address(i)).to_string())
        .collect();
    let got: Vec<String> = s
        .lab
        .tasks
        .iter()
        .map(|t| t.address6.map(|a| a.to_string()).unwrap_or_default())
        .collect();
    assert_eq!(got, want, "dockerd's addresses are the imitation's");
    for (t, c) in s.lab.tasks.iter().zip(&s.docker.containers) {
        let inside = docker::in_container(c.pid, &["ip", "-6", "-o", "addr", "show", "eth0"]);
        let a = t.address6.expect("an IPv6 address");
        assert!(inside.contains(&format!("{a}/64")), "{}: {inside}", t.name);
        let route = docker::in_container(c.pid, &["ip", "-6", "route", "show", "default"]);
        assert!(route.contains("via fd00:172:17::1"), "{route}");
    }
    // A published port over IPv6 from the client, through Docker's NAT66.
    let dnat = || rule6_packets(real.host(), "nat", "DOCKER", "dpt:8080 ");
    let before = dnat();
    assert_eq!(
        real.probe(real.client(), "tcp", &at(UPLINK_ADDR6, 8080), 5, 100)["echoed"],
        5
    );
    assert_eq!(dnat(), before + 1);
    let pid = s.docker.containers[0].pid;
    let ss = || docker::in_container(pid, &["ss", "-Htn", "state", "established"]);
    assert_eq!(
        peer_seen_with(real.client(), &at(UPLINK_ADDR6, 8080), ss),
        IpAddr::from(CLIENT_ADDR6),
        "from outside, DNAT only (docker-proxy takes the host's own connections)"
    );
    // A task to the client: masqueraded as by the imitation.
    let t2 = &s.lab.tasks[1].name;
    let out = docker::probe_from(&real, t2, "udp", &at(CLIENT_ADDR6, 9000), 3);
    assert_eq!(out["echoed"], 3);
    down_leaves_nothing(real);
}

#[test]
fn bad_ipv6_is_one_line_and_ipv4_labs_have_none() {
    #[rustfmt::skip]
    let bad: [&[&str]; 4] = [
        &["--name", "l6bad", "--ipv6", "nat66"],
        &["--name", "l6bad", "--ipv6", "ROUTED"],
        &["--name", "l6bad", "--docker", "--ipv6", "routed"],
        &["--name", "l6bad", "--ceiling", "--ipv6"],
    ];
    for args in bad {
        let line = ecsnet_fails(&[&["lab", "up"], args].concat(), 2);
        assert!(line.contains("ipv6"), "{line}");
    }
    assert_eq!(leftovers("l6bad"), Vec::<String>::new());

    // Without --ipv6, nothing of it: IPv6 off in every namespace, no IPv6 keys.
    let lab = Lab::up("l6v", 1, &[]);
    for ns in [lab.host(), lab.client(), lab.task_ns(1)] {
        let off = ns_exec(ns, &["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]);
        assert_eq!(off.trim(), "1", "{ns}");
    }
    let json = ecsnet_ok(&["lab", "status", "--name", &lab.name, "--json"]);
    assert!(
        !json.contains("ipv6") && !json.contains("address6"),
        "{json}"
    );
    // The echo server answers IPv4 as before.
    assert_eq!(
        lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 2, 10)["echoed"],
        2
    );
}
