//! Port exhaustion stays local (issue 19, deliverable 1). With `up --nat-task-ports 48`, task 1
//! opens UDP flows from 80 sockets to one outside destination (the client's port 9100): 48 go
//! out masqueraded, the other 32 are dropped `NAT_TASK_PORT_LIMIT` and counted on task 1. Then
//! task 2's new flows to that same destination, and task 1's to another destination (port
//! 9101), all go out. Once the flows expire, the agent's GC gives task 1's ports back and it
//! has all of them towards the first destination again.
//!
//! Nothing answers the datagrams: the flows stay unanswered in `CT_NEW` and expire after the
//! short UDP timeout the test sets. Every datagram carries its sender's name and number, so the
//! client can tell which went out.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use ecsnet_tests::{
    Lab,
    counters::{flows, poll, task_drops},
    in_netns,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
/// The two outside destinations: ports of the client.
const FIRST: u16 = 9100;
const SECOND: u16 = 9101;
/// `--nat-task-ports`: flows one task may have towards one destination.
const CAP: usize = 48;
/// Flows task 1 tries towards the first destination: 32 more than it may have.
const TRIED: usize = CAP + 32;
/// Flows tried in each of the later checks.
const MORE: usize = 24;
/// How long the client waits for datagrams once the last one it expects is due.
const QUIET: Duration = Duration::from_millis(1000);
/// `--ct-timeouts udp=...`, seconds: how long task 1's flows hold their ports; longer than the
/// checks made while they do take, even on a loaded machine.
const UDP_TIMEOUT: u64 = 10;
const NAT_TASK_PORT_LIMIT: &str = "NAT_TASK_PORT_LIMIT";

/// A UDP socket of the client on `port`, read with a short timeout.
fn listen(lab: &Lab, port: u16) -> UdpSocket {
    let s = in_netns(lab.client(), move || UdpSocket::bind((CLIENT, port)))
        .unwrap_or_else(|e| panic!("client socket on port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    s
}

/// Sends one datagram `<tag>-<i>` from each of `n` new sockets of task `task` (each its own
/// source port: its own flow) to the client's `port`.
fn send_flows(lab: &Lab, task: usize, tag: &'static str, n: usize, port: u16) {
    let to = SocketAddr::from((CLIENT, port));
    let sent = in_netns(lab.task_ns(task), move || {
        let socks: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind(("0.0.0.0", 0)).expect("a task socket"))
            .collect();
        for (i, s) in socks.iter().enumerate() {
            s.send_to(format!("{tag}-{i}").as_bytes(), to)
                .expect("send from the task");
        }
        socks.len()
    });
    assert_eq!(sent, n, "{tag}: every datagram sent");
}

/// The client's sockets on the two destination ports, and the address masqueraded flows
/// arrive from.
struct Outside<'a> {
    lab: &'a Lab,
    host: Ipv4Addr,
    sockets: [(u16, UdpSocket); 2],
}

impl Outside<'_> {
    /// Sends `n` flows of task `task` to the client's `port` (`send_flows`) and returns how many
    /// arrived: the datagrams tagged `tag` the client's socket got until none came for `QUIET`.
    /// Fails when one came from any address but the host's (a flow not masqueraded).
    fn went_out(&self, task: usize, tag: &'static str, n: usize, port: u16) -> usize {
        send_flows(self.lab, task, tag, n, port);
        let (_, s) = self
            .sockets
            .iter()
            .find(|(p, _)| *p == port)
            .expect("a client socket on the port");
        let mut got = BTreeSet::new();
        let mut buf = [0u8; 64];
        let mut last = Instant::now();
        while last.elapsed() < QUIET {
            let Ok((len, from)) = s.recv_from(&mut buf) else {
                continue;
            };
            last = Instant::now();
            assert_eq!(
                from.ip(),
                std::net::IpAddr::V4(self.host),
                "a datagram from {from}: not masqueraded to the host's address"
            );
            got.insert(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        let mine = format!("{tag}-");
        got.iter().filter(|t| t.starts_with(&mine)).count()
    }
}

fn limit_drops(lab: &Lab, task: &str) -> u64 {
    task_drops(&lab.stats(), task, NAT_TASK_PORT_LIMIT)
}

#[test]
fn one_task_holding_its_ports_to_a_destination_leaves_other_tasks_and_destinations_alone() {
    let lab = Lab::up("nx", 2, &[]);
    let cap = CAP.to_string();
    let timeouts = format!("udp={UDP_TIMEOUT}");
    lab.ecsnet_up_with(&["--nat-task-ports", &cap, "--ct-timeouts", &timeouts]);
    let out = Outside {
        lab: &lab,
        host: lab.status.host.uplink_address,
        sockets: [FIRST, SECOND].map(|p| (p, listen(&lab, p))),
    };

    // Task 1 to the first destination until refused.
    assert_eq!(
        out.went_out(1, "t1", TRIED, FIRST),
        CAP,
        "task 1 may have {CAP} flows towards {CLIENT}:{FIRST}, no more"
    );
    let refused = poll(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || limit_drops(&lab, "task1"),
        |n| *n >= (TRIED - CAP) as u64,
    )
    .unwrap_or_else(|n| {
        panic!(
            "task 1's refusals were counted {n} times, not {}",
            TRIED - CAP
        )
    });
    assert_eq!(
        refused,
        (TRIED - CAP) as u64,
        "each refused flow counted once"
    );
    // Still at its limit there while its flows live.
    assert_eq!(out.went_out(1, "t1c", 1, FIRST), 0, "task 1 over its limit");

    // Another task, the same destination.
    assert_eq!(
        out.went_out(2, "t2", MORE, FIRST),
        MORE,
        "task 2's new flows to the destination task 1 exhausted"
    );
    // The same task, another destination.
    assert_eq!(
        out.went_out(1, "t1b", MORE, SECOND),
        MORE,
        "task 1's new flows to another destination"
    );

    let s = lab.stats();
    assert_eq!(
        task_drops(&s, "task1", NAT_TASK_PORT_LIMIT),
        (TRIED - CAP + 1) as u64,
        "task 1's refusals: {:?}",
        s.drops
    );
    assert_eq!(
        task_drops(&s, "task2", NAT_TASK_PORT_LIMIT),
        0,
        "task 2 never refused"
    );
    // What each task holds towards its busiest destination, against the limit.
    let held: Vec<(&str, u64)> = s
        .tasks
        .iter()
        .map(|t| (t.name.as_str(), t.nat_ports_max))
        .collect();
    assert_eq!(
        (u64::from(s.conntrack.nat_task_ports), held),
        (
            CAP as u64,
            vec![("task1", CAP as u64), ("task2", MORE as u64)]
        ),
        "stats: the limit and the ports held"
    );
    assert_eq!(
        s.drops.keys().collect::<Vec<_>>(),
        vec![NAT_TASK_PORT_LIMIT],
        "no drop but task 1's refusals (no port ran out): {:?}",
        s.drops
    );

    // Every flow expires after the UDP timeout; the GC pass that removes them also sets task 1's
    // count back to the ports its flows hold: none. Then it has all its ports again.
    let left = poll(
        Duration::from_secs(UDP_TIMEOUT + 30),
        Duration::from_millis(500),
        || flows(&lab.stats(), "masquerade"),
        |n| *n == 0,
    );
    assert!(left.is_ok(), "masqueraded flows never expired: {left:?}");
    // The counts are set after the flows are removed, in the same pass.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        out.went_out(1, "t1d", CAP, FIRST),
        CAP,
        "task 1's flows once the GC gave its ports back"
    );
}
