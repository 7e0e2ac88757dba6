//! Flow logs on a real lab (SPEC §7), with exactly known traffic and exact records: a UDP flow
//! between two tasks is one egress record on the sender's interface and one ingress record on
//! the receiver's, each with the packets and IP bytes that were sent; a TCP connection from the
//! client to a published port is logged on the task as client -> container port with the
//! uplink's pre-DNAT address, with the packets and bytes the client's own netfilter counters
//! saw in each direction and the TCP flags of each side; packets a security group rejects are a
//! REJECT record on the receiver (and an ACCEPT record on the sender), as many as `stats`
//! counts; an idle interface gets one NODATA record per window; the default text line is AWS
//! v2 exactly; the `--flow-log` file has the header and the chosen fields, with `version` the
//! highest version among them; and bad formats and filters exit 2 with one line and change
//! nothing.
//!
//! Every test brings ecsnet up with `--window 1`, sends its traffic, then waits until the
//! window that was open after the traffic has been exported (a later window appears in the
//! journal) before it compares, so the sums over windows are final and compared for equality.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{TcpStream, UdpSocket},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ecsnet::store::paths::InstancePaths;
use ecsnet_tests::{
    Lab, Stats, ecsnet_fails, in_netns, ns_exec,
    world::{self, all, flows_tail, instance_fails, sg, tcp},
};
use serde_json::Value;

/// The fields `flows tail --json` prints for the checks here.
const FIELDS: &str = "${interface-id} ${srcaddr} ${dstaddr} ${srcport} ${dstport} ${protocol} \
                      ${packets} ${bytes} ${tcp-flags} ${action} ${log-status} ${flow-direction} \
                      ${pkt-srcaddr} ${pkt-dstaddr} ${start} ${end}";

/// The fields of `FIELDS` that describe traffic, all but the interface, the status and the
/// window: a NODATA record has none of them.
fn traffic_fields() -> impl Iterator<Item = &'static str> {
    FIELDS
        .split_whitespace()
        .map(|f| f.trim_start_matches("${").trim_end_matches('}'))
        .filter(|f| !["interface-id", "log-status", "start", "end"].contains(f))
}

/// IPv4 header (20) + UDP header (8): what AWS counts on top of a datagram's payload.
const UDP_OVERHEAD: u64 = 28;

const TASK1: &str = "172.17.0.2";
const TASK2: &str = "172.17.0.3";
const CLIENT: &str = "10.10.0.2";
const UPLINK: &str = "10.10.0.1";

/// `ecsnet up` on the lab with one-second windows and `extra` flags.
fn up(lab: &Lab, extra: &[&str]) -> String {
    lab.ecsnet_up_with(&[&["--window", "1"], extra].concat())
}

/// The veth name of task `i` (1-based): its records' interface-id.
fn iface(lab: &Lab, i: usize) -> String {
    lab.status.tasks[i - 1].interface.clone()
}

/// The Unix time now, in whole seconds rounded down and up.
fn unix_now() -> (u64, u64) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970");
    (t.as_secs(), t.as_secs() + u64::from(t.subsec_nanos() > 0))
}

/// Every JSON line of the instance's journal (the rotated file first).
fn journal(lab: &Lab) -> Vec<Value> {
    let path = InstancePaths::new(&lab.name).flow_journal();
    let mut text = std::fs::read_to_string(format!("{}.1", path.display())).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until every window up to the one open now has been exported: a later window's
/// records are in the journal. Everything sent before the call is then in `flows tail`.
fn wait_exported(lab: &Lab) {
    let open = u64::from(lab.stats().flow_logs.window);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let newest = journal(lab)
            .iter()
            .filter_map(|r| r["ecsnet-window"].as_u64())
            .max();
        if newest.is_some_and(|w| w > open) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "window {open} of {} was not exported within 15 s (newest in the journal: {newest:?})",
            lab.name
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `flows tail -n all --json --format FIELDS [--filter FILTER]`, parsed.
fn records(lab: &Lab, filter: &str) -> Vec<Value> {
    let mut args = vec!["--json", "--format", FIELDS];
    if !filter.is_empty() {
        args.extend(["--filter", filter]);
    }
    flows_tail(lab, &args)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("flows tail --json printed {l:?}: {e}"))
        })
        .collect()
}

/// One direction of a flow as a task interface sees it.
#[derive(Debug, Clone, Copy)]
struct Flow<'a> {
    iface: &'a str,
    direction: &'a str,
    src: &'a str,
    dst: &'a str,
    sport: u16,
    dport: u16,
    proto: u8,
}

impl<'a> Flow<'a> {
    fn new(
        (iface, direction): (&'a str, &'a str),
        (src, sport): (&'a str, u16),
        (dst, dport): (&'a str, u16),
        proto: u8,
    ) -> Self {
        Flow {
            iface,
            direction,
            src,
            dst,
            sport,
            dport,
            proto,
        }
    }

    /// A UDP flow from task1's port `sport` to task2's `dport`: egress on task1's interface
    /// `if1`, ingress on task2's `if2`.
    fn task1_to_task2(if1: &'a str, if2: &'a str, sport: u16, dport: u16) -> [Self; 2] {
        let egress = Flow::new((if1, "egress"), (TASK1, sport), (TASK2, dport), 17);
        let ingress = Flow {
            iface: if2,
            direction: "ingress",
            ..egress
        };
        [egress, ingress]
    }

    fn matches(&self, r: &Value) -> bool {
        r["interface-id"] == self.iface
            && r["flow-direction"] == self.direction
            && r["srcaddr"] == self.src
            && r["dstaddr"] == self.dst
            && r["srcport"] == self.sport
            && r["dstport"] == self.dport
            && r["protocol"] == self.proto
    }
}

/// A flow's records summed over windows.
#[derive(Debug, PartialEq, Eq)]
struct Sum {
    records: usize,
    packets: u64,
    bytes: u64,
    tcp_flags: u64,
}

fn num(r: &Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("record without a number in {key:?}: {r}"))
}

/// The window (start, end) of record `r` (of `what`), checked to lie within `t`, the whole
/// seconds around the test's traffic.
fn window(r: &Value, t: (u64, u64), what: &str) -> (u64, u64) {
    let (start, end) = (num(r, "start"), num(r, "end"));
    assert!(
        t.0 <= start && start <= end && end <= t.1,
        "{what}: start {start} / end {end} outside the test's wall clock [{}, {}]: {r}",
        t.0,
        t.1
    );
    (start, end)
}

/// The records of `flow` among `recs`, checked field by field (`action`, `log-status`, the
/// uplink-side addresses, `start <= end` within `[t0, t1]`), and their sum.
fn sum_flow(recs: &[Value], flow: &Flow, action: &str, pkt: (&str, &str), t: (u64, u64)) -> Sum {
    let mine: Vec<&Value> = recs.iter().filter(|r| flow.matches(r)).collect();
    for r in &mine {
        assert_eq!(r["action"], action, "action of {flow:?}: {r}");
        assert_eq!(r["log-status"], "OK", "log-status of {flow:?}: {r}");
        assert_eq!(
            (r["pkt-srcaddr"].as_str(), r["pkt-dstaddr"].as_str()),
            (Some(pkt.0), Some(pkt.1)),
            "pkt-srcaddr/pkt-dstaddr of {flow:?}: {r}"
        );
        window(r, t, &format!("{flow:?}"));
    }
    Sum {
        records: mine.len(),
        packets: mine.iter().map(|r| num(r, "packets")).sum(),
        bytes: mine.iter().map(|r| num(r, "bytes")).sum(),
        tcp_flags: mine.iter().fold(0, |f, r| f | num(r, "tcp-flags")),
    }
}

/// A UDP socket bound to `port` inside namespace `ns`.
fn udp_socket(ns: &str, port: u16) -> UdpSocket {
    let s = in_netns(ns, move || UdpSocket::bind(("0.0.0.0", port)))
        .unwrap_or_else(|e| panic!("bind udp {port} in {ns}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends `count` datagrams of `size` bytes from `from` to `to`; with `expect_back` (a socket
/// that receives them, or `from` itself for an echo), checks each one arrives whole.
fn send_udp(from: &UdpSocket, to: &str, count: u64, size: usize, expect_back: Option<&UdpSocket>) {
    let msg = vec![0x5a; size];
    for i in 0..count {
        from.send_to(&msg, to)
            .unwrap_or_else(|e| panic!("send datagram {i} to {to}: {e}"));
        if let Some(rx) = expect_back {
            let mut buf = vec![0u8; size + 1];
            let (n, _) = rx
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} to {to} did not arrive: {e}"));
            assert_eq!(n, size, "datagram {i} to {to} arrived with {n} bytes");
        }
    }
}

/// (t0, t1): the whole seconds around `f`'s traffic, for start/end.
fn timed(f: impl FnOnce()) -> (u64, u64) {
    let t0 = unix_now().0;
    f();
    (t0, unix_now().1)
}

/// A lab of two tasks (task1 publishing TCP 80 on 8080, task2 UDP 53 on 8053) with ecsnet up
/// in one-second windows: the lab and the tasks' interfaces.
fn two_tasks(prefix: &str) -> (Lab, String, String) {
    let lab = Lab::up(prefix, 2, &["1:8080:80", "2:8053:53/udp"]);
    up(&lab, &[]);
    let (if1, if2) = (iface(&lab, 1), iface(&lab, 2));
    (lab, if1, if2)
}

/// Sends `count` datagrams of `size` bytes from task1's port `sport` to task2's `dport`, each
/// checked to arrive whole when `arrive`: task2's socket and the whole seconds around it.
fn task1_to_task2(
    lab: &Lab,
    (sport, dport): (u16, u16),
    (count, size): (u64, usize),
    arrive: bool,
) -> (UdpSocket, (u64, u64)) {
    let tx = udp_socket(lab.task_ns(1), sport);
    let rx = udp_socket(lab.task_ns(2), dport);
    let to = format!("{TASK2}:{dport}");
    let t = timed(|| send_udp(&tx, &to, count, size, arrive.then_some(&rx)));
    (rx, t)
}

/// `two_tasks`, then `task1_to_task2` with every datagram arriving, exported: the lab, the
/// tasks' interfaces and the whole seconds around the sending.
fn exported_task1_to_task2(
    prefix: &str,
    ports: (u16, u16),
    datagrams: (u64, usize),
) -> (Lab, String, String, (u64, u64)) {
    let (lab, if1, if2) = two_tasks(prefix);
    let (_, t) = task1_to_task2(&lab, ports, datagrams, true);
    wait_exported(&lab);
    (lab, if1, if2, t)
}

/// No record among `recs` but NODATA ones and those of `sent`: nothing else was sent.
fn assert_only(recs: &[Value], sent: &[&Flow]) {
    let others: Vec<&Value> = recs
        .iter()
        .filter(|r| r["log-status"] != "NODATA")
        .filter(|r| !sent.iter().any(|f| f.matches(r)))
        .collect();
    assert!(
        others.is_empty(),
        "records of traffic never sent: {others:#?}"
    );
}

#[test]
fn udp_between_tasks_is_one_egress_and_one_ingress_record_with_exact_counts() {
    const N: u64 = 7;
    const P: usize = 100;
    let (lab, if1, if2, t) = exported_task1_to_task2("flu", (41000, 41001), (N, P));

    let recs = records(&lab, "");
    let flows = Flow::task1_to_task2(&if1, &if2, 41000, 41001);
    for (flow, whose) in flows
        .iter()
        .zip(["the sender's egress", "the receiver's ingress"])
    {
        let sum = sum_flow(&recs, flow, "ACCEPT", (TASK1, TASK2), t);
        assert!(
            (1..=2).contains(&sum.records),
            "want {whose} record (split over at most two windows): {recs:#?}"
        );
        let want = Sum {
            records: sum.records,
            packets: N,
            bytes: N * (UDP_OVERHEAD + P as u64),
            tcp_flags: 0,
        };
        assert_eq!(sum, want, "{whose} records of {N} datagrams of {P} bytes");
    }
    // Nothing else was sent: no other traffic record on either interface (no ingress copy on
    // the sender, no egress copy on the receiver).
    assert_only(&recs, &[&flows[0], &flows[1]]);
}

/// Packets and bytes counted by the client's iptables rule whose line contains `needle`.
fn iptables_count(ns: &str, chain: &str, needle: &str) -> (u64, u64) {
    let out = ns_exec(ns, &["iptables", "-L", chain, "-v", "-x", "-n"]);
    let line = out
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in {chain} of {ns}: {out}"));
    let mut it = line.split_whitespace().map(|v| {
        v.parse::<u64>()
            .unwrap_or_else(|e| panic!("counter {v:?} in {line:?}: {e}"))
    });
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn a_published_tcp_connection_matches_the_clients_own_packet_counters() {
    let lab = Lab::up("flt", 1, &["1:8080:80"]);
    up(&lab, &[]);
    let client = lab.client().to_owned();
    let if1 = iface(&lab, 1);
    // The client's kernel counts what it really sends to and receives from the published port.
    ns_exec(
        &client,
        &[
            "iptables", "-A", "OUTPUT", "-p", "tcp", "-d", UPLINK, "--dport", "8080",
        ],
    );
    ns_exec(
        &client,
        &[
            "iptables", "-A", "INPUT", "-p", "tcp", "-s", UPLINK, "--sport", "8080",
        ],
    );
    let counters = || {
        (
            iptables_count(&client, "OUTPUT", "dpt:8080"),
            iptables_count(&client, "INPUT", "spt:8080"),
        )
    };
    assert_eq!(counters(), ((0, 0), (0, 0)), "fresh rules count nothing");

    let mut cport = 0;
    let t = timed(|| {
        let mut s = in_netns(&client, || {
            TcpStream::connect_timeout(&"10.10.0.1:8080".parse().unwrap(), Duration::from_secs(5))
        })
        .expect("connect from the client to the published port 10.10.0.1:8080");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        cport = s.local_addr().unwrap().port();
        let msg = b"one small message, no segmentation offload";
        s.write_all(msg).expect("send to the published port");
        let mut back = [0u8; 42];
        s.read_exact(&mut back).expect("the echo comes back");
        assert_eq!(&back, msg, "echo content");
        // A clean close: our FIN, the server's FIN on EOF, our last ACK; no RST.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the server closes on EOF");
        assert!(rest.is_empty(), "nothing after the echo: {rest:?}");
        // Late ACKs land before the counters are read.
        let mut last = counters();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = counters();
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
    });
    let ((out_pk, out_by), (in_pk, in_by)) = counters();
    assert!(
        out_pk >= 4 && in_pk >= 3,
        "a whole connection is at least SYN, data, FIN, ACK one way and SYN-ACK, data, FIN \
         the other: the client counted {out_pk} out, {in_pk} in"
    );
    wait_exported(&lab);

    let recs = records(&lab, "");
    let ingress = Flow::new((&if1, "ingress"), (CLIENT, cport), (TASK1, 80), 6);
    let egress = Flow::new((&if1, "egress"), (TASK1, 80), (CLIENT, cport), 6);
    // Each direction against the client's counter of it, with the TCP flags of its side:
    // SYN|FIN in, SYN-ACK|FIN out.
    for (flow, pkt, want, counter) in [
        (&ingress, (CLIENT, UPLINK), (out_pk, out_by, 3), "OUTPUT"),
        (&egress, (UPLINK, CLIENT), (in_pk, in_by, 19), "INPUT"),
    ] {
        let sum = sum_flow(&recs, flow, "ACCEPT", pkt, t);
        let dir = flow.direction;
        assert!(sum.records >= 1, "no {dir} record on task1: {recs:#?}");
        assert_eq!(
            (sum.packets, sum.bytes, sum.tcp_flags),
            want,
            "task1's {dir} records (packets, bytes, tcp-flags) against the client's {counter} \
             counter"
        );
    }
    assert_only(&recs, &[&ingress, &egress]);
}

#[test]
fn packets_a_security_group_rejects_are_a_reject_record_on_the_receiver() {
    const N: u64 = 5;
    const P: usize = 60;
    let (lab, if1, if2) = two_tasks("flr");
    // task2 admits only TCP 80 from the uplink's subnet; task1 has no groups (allow).
    let id = "sg-0f10000000000001";
    let web_only = sg(
        id,
        "web-only",
        &[tcp(80, 80, &["10.10.0.0/24"])],
        &[all(&["0.0.0.0/0"])],
    );
    let state = world::state_with_groups(&lab, &[web_only], &[&[], &[id]]);
    world::apply(&lab, "flowlog-sg.json", &state);
    let before = lab.stats();

    let (rx, t) = task1_to_task2(&lab, (42000, 42001), (N, P), false);
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        rx.recv_from(&mut buf).is_err(),
        "a datagram task2's security group does not allow arrived"
    );
    wait_exported(&lab);

    let recs = records(&lab, "");
    let [egress, ingress] = Flow::task1_to_task2(&if1, &if2, 42000, 42001);
    let bytes = N * (UDP_OVERHEAD + P as u64);
    // task1 sent them: its egress record is ACCEPT with every datagram; task2's ingress REJECT
    // record counts every rejected datagram.
    let [_, rejected] = [
        (&egress, "ACCEPT", "task1's egress"),
        (&ingress, "REJECT", "task2's ingress"),
    ]
    .map(|(flow, action, whose)| {
        let sum = sum_flow(&recs, flow, action, (TASK1, TASK2), t);
        assert!(sum.records >= 1, "no {action} {whose} record: {recs:#?}");
        assert_eq!(
            (sum.packets, sum.bytes),
            (N, bytes),
            "{whose} {action} records of every datagram"
        );
        sum
    });
    let after = lab.stats();
    let all_drops = |s: &Stats| s.drops.get("SG_INGRESS").copied().unwrap_or(0);
    let task2_drops = |s: &Stats| s.tasks[1].drops.get("SG_INGRESS").copied().unwrap_or(0);
    assert_eq!(
        (
            all_drops(&after) - all_drops(&before),
            task2_drops(&after) - task2_drops(&before)
        ),
        (rejected.packets, rejected.packets),
        "stats' SG_INGRESS drops (all, task2's) equal the REJECT record's packets: {:?}",
        after.drops
    );
}

#[test]
fn an_idle_interface_gets_one_nodata_record_per_window_and_a_busy_one_none() {
    let lab = Lab::up("fln", 2, &["1:8080:80", "2:8053:53/udp"]);
    let t_up = unix_now().0;
    up(&lab, &[]);
    let (if1, if2) = (iface(&lab, 1), iface(&lab, 2));
    // task1 talks to the client (echoed); task2 stays silent throughout.
    let s = udp_socket(lab.task_ns(1), 43000);
    send_udp(&s, "10.10.0.2:9000", 3, 50, Some(&s));
    // At least two windows after the traffic, so task1 has idle windows too.
    wait_exported(&lab);
    wait_exported(&lab);

    // task2's records from `flows tail` and the journal's windows, read again while a window
    // is being exported between the two readings.
    let window_count = |j: &[Value]| {
        j.iter()
            .filter_map(|r| r["ecsnet-window"].as_u64())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let mut tries = 0;
    let (idle, entries, t_end) = loop {
        let idle = records(&lab, &format!("interface={if2}"));
        let entries = journal(&lab);
        let t_end = unix_now().1;
        tries += 1;
        if idle.len() == window_count(&entries) || tries == 5 {
            break (idle, entries, t_end);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!idle.is_empty(), "no record at all for the idle task2");
    for r in &idle {
        assert_eq!(r["log-status"], "NODATA", "idle task2: {r}");
        for key in traffic_fields() {
            assert!(r[key].is_null(), "NODATA record with a {key}: {r}");
        }
        window(r, (t_up, t_end), "NODATA window");
    }

    // Per window (from the journal): task2 has exactly one record, NODATA; task1 has either
    // one NODATA record or only OK records, never both.
    let mut windows: BTreeMap<u64, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for r in entries {
        let w = num(&r, "ecsnet-window");
        let status = r["log-status"].as_str().unwrap_or("?").to_owned();
        let entry = windows.entry(w).or_default();
        if r["interface-id"] == if1.as_str() {
            entry.0.push(status);
        } else if r["interface-id"] == if2.as_str() {
            entry.1.push(status);
        } else {
            panic!("record of an interface that is no task's: {r}");
        }
    }
    assert_eq!(
        idle.len(),
        windows.len(),
        "task2's records against the windows exported: {windows:?}"
    );
    let (mut busy, mut quiet) = (0, 0);
    for (w, (t1, t2)) in &windows {
        assert_eq!(t2, &["NODATA"], "task2 in window {w}");
        if t1 == &["NODATA"] {
            quiet += 1;
        } else {
            assert!(
                !t1.is_empty() && t1.iter().all(|s| s == "OK"),
                "task1 in window {w}: {t1:?}"
            );
            busy += 1;
        }
    }
    assert!(
        (1..=2).contains(&busy) && quiet >= 1,
        "task1's 3 echoed datagrams fall in one or two windows, and it is idle in others: \
         {windows:?}"
    );
    let ok1: u64 = records(&lab, &format!("interface={if1} status=ok"))
        .iter()
        .map(|r| num(r, "packets"))
        .sum();
    assert_eq!(ok1, 6, "task1's records: 3 datagrams out and 3 echoes back");

    // The text line of a NODATA record: dashes for every value, the window's bounds.
    let text = flows_tail(&lab, &["--filter", &format!("interface={if2}")]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= idle.len(), "{text}");
    for (line, r) in lines.iter().zip(&idle) {
        assert_eq!(
            *line,
            format!(
                "2 123456789012 {if2} - - - - - - - {} {} - NODATA",
                r["start"], r["end"]
            )
        );
    }
}

#[test]
fn the_default_text_line_is_aws_v2() {
    const N: u64 = 4;
    const P: usize = 200;
    let (lab, if1, _, t) = exported_task1_to_task2("flv", (44000, 44001), (N, P));

    let filter = format!("interface={if1} srcport=44000 dstport=44001 proto=udp");
    let json = records(&lab, &filter);
    let text = flows_tail(&lab, &["--filter", &filter]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        (1..=2).contains(&json.len()) && lines.len() == json.len(),
        "want one record (two if the flow straddled windows), the same in text and JSON: \
         {json:#?}\n{text}"
    );
    let mut packets = 0;
    let mut bytes = 0;
    for (line, r) in lines.iter().zip(&json) {
        let (start, end) = window(r, t, "the AWS v2 record");
        let (p, b) = (num(r, "packets"), num(r, "bytes"));
        assert_eq!(
            *line,
            format!(
                "2 123456789012 {if1} {TASK1} {TASK2} 44000 44001 17 {p} {b} {start} {end} \
                 ACCEPT OK"
            ),
            "the default (AWS v2) line"
        );
        packets += p;
        bytes += b;
    }
    assert_eq!(
        (packets, bytes),
        (N, N * (UDP_OVERHEAD + P as u64)),
        "{text}"
    );
}

#[test]
fn the_flow_log_file_has_a_header_and_the_chosen_fields() {
    const N: u64 = 6;
    const P: usize = 80;
    let lab = Lab::up("flf", 1, &["1:8080:80"]);
    let sink = std::path::Path::new(&lab.state_file())
        .with_file_name("flows.log")
        .display()
        .to_string();
    let format = "${version} ${srcaddr} ${dstaddr} ${packets} ${bytes} ${log-status}";
    up(&lab, &["--flow-log", &sink, "--flow-format", format]);
    let s = udp_socket(lab.task_ns(1), 45000);
    send_udp(&s, "10.10.0.2:9000", N, P, Some(&s));
    wait_exported(&lab);

    let file = std::fs::read_to_string(&sink).unwrap_or_else(|e| panic!("{sink}: {e}"));
    let mut lines = file.lines();
    assert_eq!(
        lines.next(),
        Some("version srcaddr dstaddr packets bytes log-status"),
        "the file's header line:\n{file}"
    );
    let body: Vec<&str> = lines.collect();
    let mut sums: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for line in &body {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 6, "six fields: {line:?}");
        assert_eq!(f[0], "2", "version of v2-only fields: {line:?}");
        match f[5] {
            "NODATA" => assert_eq!(&f[1..5], ["-"; 4], "{line:?}"),
            "OK" => {
                let n = |s: &str| {
                    s.parse::<u64>()
                        .unwrap_or_else(|e| panic!("{s:?} in {line:?}: {e}"))
                };
                let e = sums.entry((f[1].into(), f[2].into())).or_default();
                e.0 += n(f[3]);
                e.1 += n(f[4]);
            }
            other => panic!("log-status {other:?} in {line:?}"),
        }
    }
    let bytes = N * (UDP_OVERHEAD + P as u64);
    let want: BTreeMap<(String, String), (u64, u64)> = [
        ((TASK1.into(), CLIENT.into()), (N, bytes)),
        ((CLIENT.into(), TASK1.into()), (N, bytes)),
    ]
    .into();
    assert_eq!(
        sums, want,
        "the file's OK lines: the datagrams out and their echoes back"
    );
    // The file holds the same records as the journal, in the same order.
    let tail = flows_tail(&lab, &["--format", format]);
    let tail: Vec<&str> = tail.lines().collect();
    let common = body.len().min(tail.len());
    assert!(common >= 3, "file {body:?} / tail {tail:?}");
    assert_eq!(
        body[..common],
        tail[..common],
        "the file against `flows tail`"
    );

    // `version` is the highest version among the chosen fields: flow-direction is v5.
    let v5 = flows_tail(
        &lab,
        &[
            "--format",
            "${version} ${flow-direction} ${srcaddr}",
            "--filter",
            &format!("srcaddr={TASK1} dstaddr={CLIENT}"),
        ],
    );
    let v5: Vec<&str> = v5.lines().collect();
    assert!(!v5.is_empty(), "no record of task1 -> client");
    for line in v5 {
        assert_eq!(
            line,
            format!("5 egress {TASK1}"),
            "with ${{flow-direction}}"
        );
    }
}

#[test]
fn bad_formats_and_filters_exit_2_with_one_line_and_change_nothing() {
    let lab = Lab::up("flb", 1, &["1:8080:80"]);
    let state = lab.state_file();
    let bad_up = [
        "up",
        "--state",
        &state,
        "--window",
        "1",
        "--flow-format",
        "${nope}",
    ];
    let line = ecsnet_fails(&lab.ecsnet_args(&bad_up), 2);
    assert!(line.contains("nope"), "the error names the field: {line}");
    // Nothing is running: the instance is not up, and nothing of it was left behind.
    instance_fails(&lab, &["stats"], 2);
    let paths = InstancePaths::new(&lab.name);
    for p in [paths.pin_dir(), paths.socket(), paths.run_dir()] {
        assert!(!p.exists(), "a failed up left {}", p.display());
    }

    up(&lab, &[]);
    for (flag, value, named, what) in [
        ("--filter", "colour=red", "colour", "term"),
        ("--format", "${nope}", "nope", "field"),
    ] {
        let line = instance_fails(&lab, &["flows", "tail", flag, value], 2);
        assert!(line.contains(named), "the error names the {what}: {line}");
    }
    // A bad `up` on a running instance (refused: it is up, and the format is bad) changes
    // nothing either: the same agent keeps exporting windows.
    let pid = std::fs::read_to_string(paths.pid_file()).expect("the agent's pid file");
    ecsnet_fails(&lab.ecsnet_args(&bad_up), 2);
    assert_eq!(
        std::fs::read_to_string(paths.pid_file()).expect("the agent's pid file"),
        pid,
        "the agent was replaced by a failed up"
    );
    let exported = lab.stats().flow_logs.windows_exported;
    wait_exported(&lab);
    assert!(
        lab.stats().flow_logs.windows_exported > exported,
        "the agent stopped exporting after a failed up"
    );
}
