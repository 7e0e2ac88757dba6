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
use ecsnet_tests::{Lab, ecsnet_fails, ecsnet_ok, in_netns, ns_exec};
use serde_json::{Value, json};

/// The fields `flows tail --json` prints for the checks here.
const FIELDS: &str = "${interface-id} ${srcaddr} ${dstaddr} ${srcport} ${dstport} ${protocol} \
                      ${packets} ${bytes} ${tcp-flags} ${action} ${log-status} ${flow-direction} \
                      ${pkt-srcaddr} ${pkt-dstaddr} ${start} ${end}";

/// IPv4 header (20) + UDP header (8): what AWS counts on top of a datagram's payload.
const UDP_OVERHEAD: u64 = 28;

const TASK1: &str = "172.17.0.2";
const TASK2: &str = "172.17.0.3";
const CLIENT: &str = "10.10.0.2";
const UPLINK: &str = "10.10.0.1";

/// `ecsnet up` on the lab with one-second windows and `extra` flags.
fn up(lab: &Lab, extra: &[&str]) -> String {
    let state = lab.state_file();
    let mut args = vec!["up", "--state", &state, "--window", "1"];
    args.extend_from_slice(extra);
    ecsnet_ok(&lab.ecsnet_args(&args))
}

/// The veth name of task `i` (1-based): its records' interface-id.
fn iface(lab: &Lab, i: usize) -> String {
    lab.status.tasks[i - 1].interface.clone()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs_f64()
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
    let mut args = vec![
        "--instance",
        &lab.name,
        "flows",
        "tail",
        "-n",
        "all",
        "--json",
        "--format",
        FIELDS,
    ];
    if !filter.is_empty() {
        args.extend(["--filter", filter]);
    }
    ecsnet_ok(&args)
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

impl Flow<'_> {
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
        let (start, end) = (num(r, "start"), num(r, "end"));
        assert!(
            t.0 <= start && start <= end && end <= t.1,
            "{flow:?}: start {start} / end {end} outside the test's wall clock [{}, {}]: {r}",
            t.0,
            t.1
        );
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
    let t0 = unix_now().floor() as u64;
    f();
    (t0, unix_now().ceil() as u64)
}

#[test]
fn udp_between_tasks_is_one_egress_and_one_ingress_record_with_exact_counts() {
    const N: u64 = 7;
    const P: usize = 100;
    let lab = Lab::up("flu", 2, &["1:8080:80", "2:8053:53/udp"]);
    up(&lab, &[]);
    let (if1, if2) = (iface(&lab, 1), iface(&lab, 2));
    let tx = udp_socket(lab.task_ns(1), 41000);
    let rx = udp_socket(lab.task_ns(2), 41001);
    let t = timed(|| send_udp(&tx, "172.17.0.3:41001", N, P, Some(&rx)));
    wait_exported(&lab);

    let recs = records(&lab, "");
    let egress = Flow {
        iface: &if1,
        direction: "egress",
        src: TASK1,
        dst: TASK2,
        sport: 41000,
        dport: 41001,
        proto: 17,
    };
    let ingress = Flow {
        iface: &if2,
        direction: "ingress",
        ..egress
    };
    let want = |records| Sum {
        records,
        packets: N,
        bytes: N * (UDP_OVERHEAD + P as u64),
        tcp_flags: 0,
    };
    let e = sum_flow(&recs, &egress, "ACCEPT", (TASK1, TASK2), t);
    assert!(
        (1..=2).contains(&e.records),
        "want the sender's egress record (split over at most two windows): {recs:#?}"
    );
    assert_eq!(
        e,
        want(e.records),
        "task1's egress records of {N} datagrams of {P} bytes"
    );
    let i = sum_flow(&recs, &ingress, "ACCEPT", (TASK1, TASK2), t);
    assert!(
        (1..=2).contains(&i.records),
        "want the receiver's ingress record: {recs:#?}"
    );
    assert_eq!(
        i,
        want(i.records),
        "task2's ingress records of {N} datagrams of {P} bytes"
    );
    // Nothing else was sent: no other traffic record on either interface (no ingress copy on
    // the sender, no egress copy on the receiver).
    let others: Vec<&Value> = recs
        .iter()
        .filter(|r| r["log-status"] != "NODATA")
        .filter(|r| !egress.matches(r) && !ingress.matches(r))
        .collect();
    assert!(
        others.is_empty(),
        "records of traffic never sent: {others:#?}"
    );
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
    let ingress = Flow {
        iface: &if1,
        direction: "ingress",
        src: CLIENT,
        dst: TASK1,
        sport: cport,
        dport: 80,
        proto: 6,
    };
    let egress = Flow {
        iface: &if1,
        direction: "egress",
        src: TASK1,
        dst: CLIENT,
        sport: 80,
        dport: cport,
        proto: 6,
    };
    let i = sum_flow(&recs, &ingress, "ACCEPT", (CLIENT, UPLINK), t);
    assert!(i.records >= 1, "no ingress record on task1: {recs:#?}");
    assert_eq!(
        (i.packets, i.bytes, i.tcp_flags),
        (out_pk, out_by, 3),
        "task1's ingress records (packets, bytes, tcp-flags SYN|FIN) against the client's \
         OUTPUT counter"
    );
    let e = sum_flow(&recs, &egress, "ACCEPT", (UPLINK, CLIENT), t);
    assert!(e.records >= 1, "no egress record on task1: {recs:#?}");
    assert_eq!(
        (e.packets, e.bytes, e.tcp_flags),
        (in_pk, in_by, 19),
        "task1's egress records (packets, bytes, tcp-flags SYN-ACK|FIN) against the client's \
         INPUT counter"
    );
    let others: Vec<&Value> = recs
        .iter()
        .filter(|r| r["log-status"] != "NODATA")
        .filter(|r| !ingress.matches(r) && !egress.matches(r))
        .collect();
    assert!(
        others.is_empty(),
        "records of traffic never sent: {others:#?}"
    );
}

#[test]
fn packets_a_security_group_rejects_are_a_reject_record_on_the_receiver() {
    const N: u64 = 5;
    const P: usize = 60;
    let lab = Lab::up("flr", 2, &["1:8080:80", "2:8053:53/udp"]);
    up(&lab, &[]);
    let (if1, if2) = (iface(&lab, 1), iface(&lab, 2));
    // task2 admits only TCP 80 from the uplink's subnet; task1 has no groups (allow).
    let text = std::fs::read_to_string(lab.state_file()).expect("read the lab's state file");
    let mut state: Value = serde_json::from_str(&text).expect("the lab's state file parses");
    state["securityGroups"] = json!([{
        "GroupId": "sg-0f10000000000001",
        "GroupName": "web-only",
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                           "IpRanges": [{"CidrIp": "10.10.0.0/24"}]}],
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    }]);
    state["tasks"][1]["securityGroups"] = json!(["sg-0f10000000000001"]);
    let file = std::path::Path::new(&lab.state_file())
        .with_file_name("flowlog-sg.json")
        .display()
        .to_string();
    std::fs::write(&file, state.to_string()).expect("write the state file");
    ecsnet_ok(&lab.ecsnet_args(&["apply", "-f", &file]));
    let before = lab.stats();

    let tx = udp_socket(lab.task_ns(1), 42000);
    let rx = udp_socket(lab.task_ns(2), 42001);
    let t = timed(|| send_udp(&tx, "172.17.0.3:42001", N, P, None));
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        rx.recv_from(&mut buf).is_err(),
        "a datagram task2's security group does not allow arrived"
    );
    wait_exported(&lab);

    let recs = records(&lab, "");
    let egress = Flow {
        iface: &if1,
        direction: "egress",
        src: TASK1,
        dst: TASK2,
        sport: 42000,
        dport: 42001,
        proto: 17,
    };
    let ingress = Flow {
        iface: &if2,
        direction: "ingress",
        ..egress
    };
    let bytes = N * (UDP_OVERHEAD + P as u64);
    let e = sum_flow(&recs, &egress, "ACCEPT", (TASK1, TASK2), t);
    assert!(
        e.records >= 1,
        "no ACCEPT egress record on task1: {recs:#?}"
    );
    assert_eq!(
        (e.packets, e.bytes),
        (N, bytes),
        "task1 sent them: its egress record is ACCEPT with every datagram"
    );
    let i = sum_flow(&recs, &ingress, "REJECT", (TASK1, TASK2), t);
    assert!(
        i.records >= 1,
        "no REJECT ingress record on task2: {recs:#?}"
    );
    assert_eq!(
        (i.packets, i.bytes),
        (N, bytes),
        "task2's ingress REJECT record counts every rejected datagram"
    );
    let after = lab.stats();
    let rejected = |s: &ecsnet_tests::Stats| s.drops.get("SG_INGRESS").copied().unwrap_or(0);
    let rejected2 =
        |s: &ecsnet_tests::Stats| s.tasks[1].drops.get("SG_INGRESS").copied().unwrap_or(0);
    assert_eq!(
        (
            rejected(&after) - rejected(&before),
            rejected2(&after) - rejected2(&before)
        ),
        (i.packets, i.packets),
        "stats' SG_INGRESS drops (all, task2's) equal the REJECT record's packets: {:?}",
        after.drops
    );
}

#[test]
fn an_idle_interface_gets_one_nodata_record_per_window_and_a_busy_one_none() {
    let lab = Lab::up("fln", 2, &["1:8080:80", "2:8053:53/udp"]);
    let t_up = unix_now().floor() as u64;
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
        let t_end = unix_now().ceil() as u64;
        tries += 1;
        if idle.len() == window_count(&entries) || tries == 5 {
            break (idle, entries, t_end);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!idle.is_empty(), "no record at all for the idle task2");
    for r in &idle {
        assert_eq!(r["log-status"], "NODATA", "idle task2: {r}");
        for key in [
            "srcaddr",
            "dstaddr",
            "srcport",
            "dstport",
            "protocol",
            "packets",
            "bytes",
            "tcp-flags",
            "action",
            "flow-direction",
            "pkt-srcaddr",
            "pkt-dstaddr",
        ] {
            assert!(r[key].is_null(), "NODATA record with a {key}: {r}");
        }
        let (start, end) = (num(r, "start"), num(r, "end"));
        assert!(
            t_up <= start && start <= end && end <= t_end,
            "NODATA window [{start}, {end}] outside [{t_up}, {t_end}]: {r}"
        );
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
    let text = ecsnet_ok(&[
        "--instance",
        &lab.name,
        "flows",
        "tail",
        "-n",
        "all",
        "--filter",
        &format!("interface={if2}"),
    ]);
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
    let lab = Lab::up("flv", 2, &["1:8080:80", "2:8053:53/udp"]);
    up(&lab, &[]);
    let if1 = iface(&lab, 1);
    let tx = udp_socket(lab.task_ns(1), 44000);
    let rx = udp_socket(lab.task_ns(2), 44001);
    let t = timed(|| send_udp(&tx, "172.17.0.3:44001", N, P, Some(&rx)));
    wait_exported(&lab);

    let filter = format!("interface={if1} srcport=44000 dstport=44001 proto=udp");
    let json = records(&lab, &filter);
    let text = ecsnet_ok(&[
        "--instance",
        &lab.name,
        "flows",
        "tail",
        "-n",
        "all",
        "--filter",
        &filter,
    ]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        (1..=2).contains(&json.len()) && lines.len() == json.len(),
        "want one record (two if the flow straddled windows), the same in text and JSON: \
         {json:#?}\n{text}"
    );
    let mut packets = 0;
    let mut bytes = 0;
    for (line, r) in lines.iter().zip(&json) {
        let (start, end) = (num(r, "start"), num(r, "end"));
        assert!(
            t.0 <= start && start <= end && end <= t.1,
            "start {start} / end {end} outside the test's wall clock [{}, {}]",
            t.0,
            t.1
        );
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
    let tail = ecsnet_ok(&[
        "--instance",
        &lab.name,
        "flows",
        "tail",
        "-n",
        "all",
        "--format",
        format,
    ]);
    let tail: Vec<&str> = tail.lines().collect();
    let common = body.len().min(tail.len());
    assert!(common >= 3, "file {body:?} / tail {tail:?}");
    assert_eq!(
        body[..common],
        tail[..common],
        "the file against `flows tail`"
    );

    // `version` is the highest version among the chosen fields: flow-direction is v5.
    let v5 = ecsnet_ok(&[
        "--instance",
        &lab.name,
        "flows",
        "tail",
        "-n",
        "all",
        "--format",
        "${version} ${flow-direction} ${srcaddr}",
        "--filter",
        &format!("srcaddr={TASK1} dstaddr={CLIENT}"),
    ]);
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
    let line = ecsnet_fails(
        &lab.ecsnet_args(&[
            "up",
            "--state",
            &state,
            "--window",
            "1",
            "--flow-format",
            "${nope}",
        ]),
        2,
    );
    assert!(line.contains("nope"), "the error names the field: {line}");
    // Nothing is running: the instance is not up, and nothing of it was left behind.
    ecsnet_fails(&["--instance", &lab.name, "stats"], 2);
    let paths = InstancePaths::new(&lab.name);
    for p in [paths.pin_dir(), paths.socket(), paths.run_dir()] {
        assert!(!p.exists(), "a failed up left {}", p.display());
    }

    up(&lab, &[]);
    let line = ecsnet_fails(
        &[
            "--instance",
            &lab.name,
            "flows",
            "tail",
            "--filter",
            "colour=red",
        ],
        2,
    );
    assert!(line.contains("colour"), "the error names the term: {line}");
    let line = ecsnet_fails(
        &[
            "--instance",
            &lab.name,
            "flows",
            "tail",
            "--format",
            "${nope}",
        ],
        2,
    );
    assert!(line.contains("nope"), "the error names the field: {line}");
    // A bad `up` on a running instance (refused: it is up, and the format is bad) changes
    // nothing either: the same agent keeps exporting windows.
    let pid = std::fs::read_to_string(paths.pid_file()).expect("the agent's pid file");
    ecsnet_fails(
        &lab.ecsnet_args(&[
            "up",
            "--state",
            &state,
            "--window",
            "1",
            "--flow-format",
            "${nope}",
        ]),
        2,
    );
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
