//! IPv6 flow records from the datapath (`FLOWS6`), exact for known traffic on a dual-stack lab
//! (`--ipv6 nat`; ecsnet redirects and translates IPv6 as IPv4): UDP between two tasks over
//! IPv6 is one egress record on the sender and one ingress record on the receiver, `type` IPv6,
//! with the packets sent and their IP bytes (40-byte IPv6 header, 8 UDP, payload), addresses as
//! AWS prints them (RFC 5952); IPv4 datagrams of the same windows keep their exact IPv4
//! records; datagrams a task sends to the client (masqueraded by ecsnet) are exact too, with
//! the host's address as pkt-srcaddr; a TCP connection from the client to a published port
//! (ecsnet's NAT66) is an ingress record on the task with the client's address, matching the
//! client's own ip6tables counters; a task with a security group without IPv6 rules gets REJECT
//! records for the IPv6 it sends and for the IPv6 delivered to it. `ICMPv6` echoes are keyed with
//! ports 0; the later fragments of a datagram task to task take their first fragment's ports;
//! neighbour discovery makes no record. No namespace of the lab finds an `ICMPv6` or UDP
//! checksum error.
//!
//! Both tests bring ecsnet up with `--window 1`, send, then wait until a window opened after the
//! traffic has been exported, so the sums over windows are final.

use std::{
    io::Read as _,
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use ecsnet::store::paths::InstancePaths;
use ecsnet_tests::{
    Lab, csum6_errors, in_netns, ns_exec,
    raw::{mac_of, mac_str},
    traffic,
    world::{self, all, sg},
};
use serde_json::Value;

/// The fields of the records the checks read.
const FIELDS: &str = "${interface-id} ${type} ${srcaddr} ${dstaddr} ${srcport} ${dstport} \
                      ${protocol} ${packets} ${bytes} ${tcp-flags} ${action} ${log-status} \
                      ${flow-direction} ${pkt-srcaddr} ${pkt-dstaddr}";

/// IPv6 header (40) + UDP header (8): the IP bytes of a datagram on top of its payload.
const UDP6_OVERHEAD: u64 = 48;
/// IPv4 header (20) + UDP header (8).
const UDP4_OVERHEAD: u64 = 28;

fn addr6(lab: &Lab, task: usize) -> Ipv6Addr {
    lab.status.tasks[task - 1]
        .address6
        .unwrap_or_else(|| panic!("task{task} has no IPv6 address: {:?}", lab.status))
}

/// A dual-stack lab (`--ipv6 nat`) of two tasks publishing `publish`, with ecsnet up in
/// one-second windows: the lab, the tasks' namespaces and their interfaces.
fn two_tasks(prefix: &str, publish: &[&str]) -> (Lab, [String; 2], [String; 2]) {
    let lab = Lab::up_v6(prefix, 2, publish, "nat");
    lab.ecsnet_up_with(&["--window", "1"]);
    let ns = [1, 2].map(|i| lab.task_ns(i).to_owned());
    let ifaces = [0, 1].map(|i| lab.status.tasks[i].interface.clone());
    (lab, ns, ifaces)
}

/// Every namespace of the lab: host, client and tasks.
fn namespaces(lab: &Lab) -> Vec<String> {
    let mut all = vec![lab.host().to_owned(), lab.client().to_owned()];
    all.extend(lab.status.tasks.iter().map(|t| t.netns.clone()));
    all
}

fn assert_no_csum_errors(lab: &Lab) {
    for ns in namespaces(lab) {
        let errors = csum6_errors(&ns);
        assert!(
            errors.iter().all(|(_, n)| *n == 0),
            "{ns} received IPv6 with bad checksums: {errors:?}"
        );
    }
}

/// The newest window in the instance's journal (the rotated file too).
fn newest_exported(lab: &Lab) -> Option<u64> {
    let path = InstancePaths::new(&lab.name).flow_journal();
    [format!("{}.1", path.display()), path.display().to_string()]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["ecsnet-window"].as_u64())
                .collect::<Vec<_>>()
        })
        .max()
}

/// Waits until the window open now has been exported (a later one is in the journal), then
/// returns every record, with `FIELDS`.
fn exported_records(lab: &Lab) -> Vec<Value> {
    let open = u64::from(lab.stats().flow_logs.window);
    let deadline = Instant::now() + Duration::from_secs(20);
    while newest_exported(lab).is_none_or(|w| w <= open) {
        assert!(
            Instant::now() < deadline,
            "window {open} of {} was not exported within 20 s",
            lab.name
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    lab.flow_records(FIELDS, "")
}

/// One direction of a flow on one task interface: the records' identifying fields.
#[derive(Debug, Clone)]
struct Flow {
    iface: String,
    direction: &'static str,
    src: String,
    dst: String,
    sport: u16,
    dport: u16,
    proto: u8,
}

impl Flow {
    fn new(
        (iface, direction): (&str, &'static str),
        src: SocketAddr,
        dst: SocketAddr,
        proto: u8,
    ) -> Self {
        Flow {
            iface: iface.to_owned(),
            direction,
            src: src.ip().to_string(),
            dst: dst.ip().to_string(),
            sport: src.port(),
            dport: dst.port(),
            proto,
        }
    }

    /// The same flow seen on the other end's interface, in the other direction.
    fn at(&self, iface: &str, direction: &'static str) -> Self {
        Flow {
            iface: iface.to_owned(),
            direction,
            ..self.clone()
        }
    }

    fn matches(&self, r: &Value) -> bool {
        r["interface-id"] == self.iface.as_str()
            && r["flow-direction"] == self.direction
            && r["srcaddr"] == self.src.as_str()
            && r["dstaddr"] == self.dst.as_str()
            && r["srcport"] == self.sport
            && r["dstport"] == self.dport
            && r["protocol"] == self.proto
    }
}

fn num(r: &Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("record without a number in {key:?}: {r}"))
}

/// The records of `flow` among `recs` (at most two: the traffic may straddle a window), each
/// checked to be an OK record of `action` and `kind` (`IPv4`/`IPv6`) with the flow's own
/// addresses as pkt-srcaddr/pkt-dstaddr (nothing is translated on a task interface here);
/// returns (packets, bytes, tcp-flags) summed.
fn sum(recs: &[Value], flow: &Flow, action: &str, kind: &str) -> (u64, u64, u64) {
    sum_pkt(recs, flow, action, kind, (&flow.src, &flow.dst))
}

/// [`sum`] of a translated flow, whose packets had addresses `pkt` (pkt-srcaddr, pkt-dstaddr)
/// on the uplink side.
fn sum_pkt(
    recs: &[Value],
    flow: &Flow,
    action: &str,
    kind: &str,
    pkt: (&str, &str),
) -> (u64, u64, u64) {
    let mine: Vec<&Value> = recs.iter().filter(|r| flow.matches(r)).collect();
    assert!(
        (1..=2).contains(&mine.len()),
        "want one record of {flow:?} (at most two windows), got {}: {recs:#?}",
        mine.len()
    );
    for r in &mine {
        assert_eq!(
            (&r["action"], &r["log-status"], &r["type"]),
            (&Value::from(action), &Value::from("OK"), &Value::from(kind)),
            "{flow:?}: {r}"
        );
        assert_eq!(
            (&r["pkt-srcaddr"], &r["pkt-dstaddr"]),
            (&Value::from(pkt.0), &Value::from(pkt.1)),
            "{flow:?}: {r}"
        );
    }
    (
        mine.iter().map(|r| num(r, "packets")).sum(),
        mine.iter().map(|r| num(r, "bytes")).sum(),
        mine.iter().fold(0, |f, r| f | num(r, "tcp-flags")),
    )
}

/// A UDP socket on `addr` inside namespace `ns`.
fn udp_socket(ns: &str, addr: SocketAddr) -> UdpSocket {
    let s = in_netns(ns, move || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind udp {addr} in {ns}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends `count` datagrams of `size` bytes from `from` (in `ns_from`) to `to` (in `ns_to`);
/// with `arrive`, each must arrive whole, else none may.
fn udp(
    ns_from: &str,
    from: SocketAddr,
    ns_to: &str,
    to: SocketAddr,
    count: u64,
    size: usize,
    arrive: bool,
) {
    let tx = udp_socket(ns_from, from);
    let rx = udp_socket(ns_to, to);
    let msg = vec![0x6a; size];
    let mut buf = vec![0u8; size + 1];
    for i in 0..count {
        tx.send_to(&msg, to)
            .unwrap_or_else(|e| panic!("send datagram {i} {from} -> {to}: {e}"));
        if arrive {
            let (n, _) = rx
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} {from} -> {to} did not arrive: {e}"));
            assert_eq!(
                n, size,
                "datagram {i} {from} -> {to} arrived with {n} bytes"
            );
        }
    }
    if !arrive {
        rx.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert!(
            rx.recv_from(&mut buf).is_err(),
            "a datagram {from} -> {to} arrived that the policy should have dropped"
        );
    }
}

fn v6(a: Ipv6Addr, port: u16) -> SocketAddr {
    (a, port).into()
}

/// (packets, bytes) of the rule of `ip6tables -L CHAIN` in `ns` whose line contains `needle`.
fn ip6tables_count(ns: &str, chain: &str, needle: &str) -> (u64, u64) {
    let out = ns_exec(ns, &["ip6tables", "-L", chain, "-v", "-x", "-n"]);
    let line = out
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in {chain} of {ns}: {out}"));
    let v: Vec<u64> = line
        .split_whitespace()
        .take(2)
        .map(|v| {
            v.parse()
                .unwrap_or_else(|e| panic!("{v:?} in {line:?}: {e}"))
        })
        .collect();
    (v[0], v[1])
}

/// A whole TCP connection from the client to `to` (an echo of one small message, then a clean
/// close); returns the client's port once the client's counters (`settle`) stop changing, so
/// late ACKs are in them.
fn tcp_echo(client: &str, to: SocketAddr, settle: impl Fn() -> ((u64, u64), (u64, u64))) -> u16 {
    let mut s = traffic::tcp_connect(client, to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect from the client to {to}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    traffic::echo(&mut s, b"one small message over IPv6").expect("the echo of a message");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("the server closes on EOF");
    assert!(rest.is_empty(), "nothing after the echo: {rest:?}");
    let port = s.local_addr().unwrap().port();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        let now = Some(settle());
        if now == last {
            break;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(500));
    }
    port
}

/// Rules in the client's ip6tables that count what it sends to the host's published port 8080
/// and what comes back; returns a reading of both, ((packets, bytes) out, (packets, bytes) in).
fn client_counters(client: &str, host6: Ipv6Addr) -> impl Fn() -> ((u64, u64), (u64, u64)) {
    let host = host6.to_string();
    for (chain, addr, port) in [("OUTPUT", "-d", "--dport"), ("INPUT", "-s", "--sport")] {
        let rule = [
            "ip6tables",
            "-A",
            chain,
            "-p",
            "tcp",
            addr,
            &host,
            port,
            "8080",
        ];
        ns_exec(client, &rule);
    }
    let client = client.to_owned();
    move || {
        (
            ip6tables_count(&client, "OUTPUT", "dpt:8080"),
            ip6tables_count(&client, "INPUT", "spt:8080"),
        )
    }
}

/// Neighbour discovery is IPv6's ARP: no records, as ARP has none. Solicitations for address
/// resolution go to the solicited-node groups; advertisements and reachability probes, to the
/// tasks, would add to the exact counts of the echo records (`ICMPv6` is keyed with ports 0).
fn assert_no_neighbour_discovery(recs: &[Value]) {
    let nd: Vec<&Value> = recs
        .iter()
        .filter(|r| r["log-status"] == "OK" && r["protocol"] == 58)
        .filter(|r| {
            r["dstaddr"]
                .as_str()
                .is_some_and(|d| d.starts_with("ff02::1:ff"))
        })
        .collect();
    assert!(nd.is_empty(), "records of neighbour discovery: {nd:#?}");
}

/// Echo requests of this many bytes of payload (an `ICMPv6` echo header is 8 bytes).
const PING_SIZE: u64 = 56;
const PINGS: u64 = 3;
/// A datagram bigger than the tasks' MTU (1500): the sender's kernel fragments it.
const BIG: usize = 3000;

/// Task 1 to task 2 over IPv6 beyond ports: `ICMPv6` echoes (ports 0, as AWS prints ICMP) and a
/// fragmented datagram (its later fragments take the first's ports, as IPv4's do).
struct Unusual {
    a1: Ipv6Addr,
    a2: Ipv6Addr,
    big: (SocketAddr, SocketAddr),
}

impl Unusual {
    fn send(lab: &Lab) -> Self {
        let (a1, a2) = (addr6(lab, 1), addr6(lab, 2));
        let (count, size) = (PINGS.to_string(), PING_SIZE.to_string());
        let to = a2.to_string();
        let ping = [
            "ping", "-6", "-c", &count, "-s", &size, "-i", "0.2", "-W", "3", &to,
        ];
        ns_exec(lab.task_ns(1), &ping);
        let big = (v6(a1, 43004), v6(a2, 43005));
        udp(lab.task_ns(1), big.0, lab.task_ns(2), big.1, 1, BIG, true);
        Unusual { a1, a2, big }
    }

    fn check(&self, recs: &[Value], [if1, if2]: [&str; 2]) {
        let (to2, to1) = (v6(self.a2, 0), v6(self.a1, 0));
        let echo = PINGS * (40 + 8 + PING_SIZE);
        let requests = Flow::new((if1, "egress"), to1, to2, 58);
        let replies = Flow::new((if2, "egress"), to2, to1, 58);
        for flow in [
            requests.clone(),
            requests.at(if2, "ingress"),
            replies.clone(),
            replies.at(if1, "ingress"),
        ] {
            assert_eq!(
                sum(recs, &flow, "ACCEPT", "IPv6"),
                (PINGS, echo, 0),
                "{flow:?}"
            );
        }
        // The first fragment carries the ports, and the datapath gives them to the later ones
        // (`FRAGS6`): one flow. Each fragment is 40 + 8 (fragment header) bytes of headers and a
        // part of the 8 + BIG.
        let datagram = Flow::new((if1, "egress"), self.big.0, self.big.1, 17);
        let portless = Flow::new((if1, "egress"), to1, to2, 17);
        for (flow, none) in [
            (datagram.clone(), portless.clone()),
            (datagram.at(if2, "ingress"), portless.at(if2, "ingress")),
        ] {
            let (p, b, _) = sum(recs, &flow, "ACCEPT", "IPv6");
            assert!(p >= 2, "the first fragment and the later ones: {flow:?}");
            assert_eq!(
                b,
                8 + BIG as u64 + p * 48,
                "{flow:?}: every fragment's IP bytes"
            );
            assert!(
                !recs.iter().any(|r| none.matches(r)),
                "a fragment without ports: {none:?}"
            );
        }
    }
}

#[test]
fn ipv6_between_tasks_and_from_the_client_is_recorded_exactly_beside_ipv4() {
    const N6: u64 = 7;
    const P6: usize = 100;
    const N4: u64 = 5;
    const P4: usize = 60;
    let (lab, [t1, t2], [if1, if2]) = two_tasks("f6x", &["1:8080:80"]);
    let (a1, a2) = (addr6(&lab, 1), addr6(&lab, 2));
    let client = lab.client().to_owned();
    let client6 = lab
        .status
        .client
        .address6
        .expect("the client's IPv6 address");
    let host6 = lab
        .status
        .host
        .uplink_address6
        .expect("the host's IPv6 address");

    let published = v6(host6, 8080);
    let counters = client_counters(&client, host6);
    assert_eq!(counters(), ((0, 0), (0, 0)), "fresh rules count nothing");

    // Known traffic in the same windows: UDP over IPv6 and over IPv4 between the tasks, and a
    // TCP connection from the client to task 1's published port over IPv6.
    let (from6, to6) = (v6(a1, 43000), v6(a2, 43001));
    udp(&t1, from6, &t2, to6, N6, P6, true);
    let a4 = |i: usize| SocketAddr::from((lab.status.tasks[i - 1].address, 43002));
    let (from4, to4) = (
        a4(1),
        SocketAddr::from((lab.status.tasks[1].address, 43003)),
    );
    udp(&t1, from4, &t2, to4, N4, P4, true);
    // Task 2 to the client, masqueraded by ecsnet to the host's address.
    let (out6, at_client) = (v6(a2, 43006), v6(client6, 43007));
    udp(&t2, out6, &client, at_client, N6, P6, true);
    let unusual = Unusual::send(&lab);
    let cport = tcp_echo(&client, published, &counters);
    let ((out_pk, out_by), (in_pk, in_by)) = counters();
    assert!(
        out_pk >= 4 && in_pk >= 3,
        "a whole connection: the client counted {out_pk} out, {in_pk} in"
    );
    let recs = exported_records(&lab);

    // UDP over IPv6: one egress record on the sender, one ingress on the receiver, exact.
    let udp6 = Flow::new((&if1, "egress"), from6, to6, 17);
    for (flow, whose) in [
        (udp6.clone(), "the sender's egress"),
        (udp6.at(&if2, "ingress"), "the receiver's ingress"),
    ] {
        assert_eq!(
            sum(&recs, &flow, "ACCEPT", "IPv6"),
            (N6, N6 * (UDP6_OVERHEAD + P6 as u64), 0),
            "{whose} records of {N6} datagrams of {P6} bytes over IPv6"
        );
    }
    // Addresses as AWS prints them: RFC 5952, lower case, the longest run of zeros as "::".
    let r = recs.iter().find(|r| udp6.matches(r)).unwrap();
    assert_eq!(r["srcaddr"], a1.to_string(), "{r}");
    assert!(
        r["srcaddr"].as_str().unwrap().contains("::"),
        "compressed: {r}"
    );

    // IPv4 of the same windows: as exact as ever, and IPv4.
    let udp4 = Flow::new((&if1, "egress"), from4, to4, 17);
    for flow in [udp4.clone(), udp4.at(&if2, "ingress")] {
        assert_eq!(
            sum(&recs, &flow, "ACCEPT", "IPv4"),
            (N4, N4 * (UDP4_OVERHEAD + P4 as u64), 0),
            "{flow:?}"
        );
    }

    // The client's connection through ecsnet's NAT66: on task 1 as client -> task:80 (after
    // DNAT, the client's own address; the host address as pkt-dstaddr in, pkt-srcaddr out,
    // as IPv4's), each direction as the client counted it, with the TCP flags of each side
    // (SYN|FIN in, SYN-ACK|FIN out).
    let ingress = Flow::new((&if1, "ingress"), v6(client6, cport), v6(a1, 80), 6);
    let egress = Flow::new((&if1, "egress"), v6(a1, 80), v6(client6, cport), 6);
    let (c6, h6) = (client6.to_string(), host6.to_string());
    assert_eq!(
        sum_pkt(&recs, &ingress, "ACCEPT", "IPv6", (&c6, &h6)),
        (out_pk, out_by, 3),
        "task 1's ingress records against the client's OUTPUT counter"
    );
    assert_eq!(
        sum_pkt(&recs, &egress, "ACCEPT", "IPv6", (&h6, &c6)),
        (in_pk, in_by, 19),
        "task 1's egress records against the client's INPUT counter"
    );
    // Masqueraded: on task 2 with its own address, and the host's as pkt-srcaddr.
    let masqueraded = Flow::new((&if2, "egress"), out6, at_client, 17);
    assert_eq!(
        sum_pkt(&recs, &masqueraded, "ACCEPT", "IPv6", (&h6, &c6)),
        (N6, N6 * (UDP6_OVERHEAD + P6 as u64), 0),
        "task 2's egress records of {N6} datagrams masqueraded to the client"
    );
    unusual.check(&recs, [&if1, &if2]);
    assert_no_neighbour_discovery(&recs);
    assert_no_csum_errors(&lab);
}

#[test]
fn ipv6_of_a_task_with_a_security_group_is_rejected_and_recorded_so() {
    const N: u64 = 4;
    const P: usize = 80;
    let (lab, [t1, t2], [if1, if2]) = two_tasks("f6p", &[]);
    let (a1, a2) = (addr6(&lab, 1), addr6(&lab, 2));
    // Task 2 gets a security group without IPv6 rules: its rules refuse its IPv6 both ways.
    let id = "sg-0f60000000000001";
    let open = sg(id, "open", &[all(&["0.0.0.0/0"])], &[all(&["0.0.0.0/0"])]);
    world::apply(
        &lab,
        "flowlog-ipv6-sg.json",
        &world::state_with_groups(&lab, &[open], &[&[], &[id]]),
    );
    // Neighbour discovery to and from a policed task does not pass: each side knows the
    // other's MAC beforehand, so the datagrams themselves reach the datapath.
    for (ns, peer, peer_ns) in [(&t1, a2, &t2), (&t2, a1, &t1)] {
        let mac = mac_str(mac_of(peer_ns, "eth0"));
        let peer = peer.to_string();
        ns_exec(
            ns,
            &[
                "ip",
                "-6",
                "neigh",
                "replace",
                &peer,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
    }
    // The bridge learns task 2's MAC from its IPv4 (which its group allows).
    let echoed = lab.probe(
        &t2,
        "tcp",
        &format!("{}:80", lab.status.tasks[0].address),
        1,
        10,
    );
    assert_eq!(echoed["echoed"], 1, "task 2's IPv4 works: {echoed}");

    let (from2, to1) = (v6(a2, 44000), v6(a1, 44001));
    udp(&t2, from2, &t1, to1, N, P, false);
    let (from1, to2) = (v6(a1, 44002), v6(a2, 44003));
    udp(&t1, from1, &t2, to2, N, P, false);
    let recs = exported_records(&lab);
    let bytes = N * (UDP6_OVERHEAD + P as u64);

    // What task 2 sends: REJECT on its egress, nothing on task 1.
    let sent = Flow::new((&if2, "egress"), from2, to1, 17);
    assert_eq!(sum(&recs, &sent, "REJECT", "IPv6"), (N, bytes, 0));
    assert!(
        !recs.iter().any(|r| sent.at(&if1, "ingress").matches(r)),
        "task 1 never got task 2's datagrams: {recs:#?}"
    );
    // What task 1 sends to it: ACCEPT on task 1's egress, REJECT on task 2's ingress.
    let to_policed = Flow::new((&if1, "egress"), from1, to2, 17);
    assert_eq!(sum(&recs, &to_policed, "ACCEPT", "IPv6"), (N, bytes, 0));
    assert_eq!(
        sum(&recs, &to_policed.at(&if2, "ingress"), "REJECT", "IPv6"),
        (N, bytes, 0)
    );
    // Task 2's egress rules refuse what it sends; its ingress rules what task 1 sends it, on
    // the way in (task to task, before any bridge).
    let stats = lab.stats();
    let refused = |reason| ecsnet_tests::counters::task_drops(&stats, "task2", reason);
    assert!(
        refused("SG_EGRESS") >= N && refused("SG_INGRESS") >= N,
        "every datagram is counted on task 2: SG_EGRESS {}, SG_INGRESS {}",
        refused("SG_EGRESS"),
        refused("SG_INGRESS")
    );
    assert_no_csum_errors(&lab);
}
