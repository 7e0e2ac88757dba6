//! Security groups over time and against a hostile task, on real labs with real traffic:
//! joining or leaving a group a rule references opens or closes a port live, without touching
//! the task that holds the rule; removing a rule keeps tracked TCP and UDP flows until
//! `--reset-flows` cuts exactly those; a task cannot send with another source address, with
//! another MAC once its own is known, or claim another address in ARP (the host's neighbour
//! table and the other tasks' stay clean); `blockInstanceMetadata` stops tasks reaching
//! 169.254.169.254 while 169.254.170.2 (ECS's agent, emulated by its DNAT) stays reachable even
//! from a task whose groups allow no egress at all; a datagram bigger than the MTU arrives whole
//! on an allowed port and not a single fragment of it arrives on a rejected one, task to task
//! and through a published port, and a lone later fragment is dropped `FRAGMENT`.

use std::{
    io,
    net::{Ipv4Addr, TcpStream, UdpSocket},
    time::Duration,
};

use ecsnet_tests::{
    Background, Lab,
    counters::{poll, proc_net, task_drops},
    ecsnet_bin, ecsnet_ok, ns_exec,
    raw::{
        self, ARP_REPLY, ARP_REQUEST, BROADCAST, ETH_P_ARP, IPPROTO_UDP, Mac, PacketSocket,
        RawIpSocket,
    },
    traffic::{echo, ping, tcp_connect, udp, udp_wait},
    world::{all, apply_file, perm, sg, state_with_groups, tcp, write},
};
use serde_json::{Value, json};

/// How long a packet that should be answered may take.
const ANSWER: Duration = Duration::from_secs(3);
/// How long to wait for an answer that must not come.
const SILENCE: Duration = Duration::from_secs(1);
/// Drop reasons of a policy decision about a datagram or one of its fragments.
const POLICY_REASONS: [&str; 3] = ["SG_INGRESS", "SG_EGRESS", "FRAGMENT"];

const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
const TASK1: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
const TASK2: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 3);
/// Where task2 and the client receive the datagrams of the spoofing tests.
const TO_TASK2: &str = "172.17.0.3:7000";
const TO_CLIENT: &str = "10.10.0.2:7001";

// ---- state files -------------------------------------------------------------------------

/// Everything to everywhere.
fn all_traffic() -> [Value; 1] {
    [all(&["0.0.0.0/0"])]
}

/// The lab's state file with `groups`, task i+1's groups from `members[i]` and `host` merged
/// into its host section, written beside it as `<tag>.json`; returns the path.
fn write_state(
    lab: &Lab,
    tag: &str,
    groups: &[Value],
    members: &[&[&str]],
    host: &Value,
) -> String {
    let mut state = state_with_groups(lab, groups, members);
    for (k, v) in host.as_object().expect("host patch is an object") {
        state["host"][k] = v.clone();
    }
    write(lab, &format!("{tag}.json"), &state)
}

/// `ecsnet apply -f FILE [--reset-flows]`; returns what it printed.
fn apply(lab: &Lab, file: &str, reset_flows: bool) -> String {
    apply_file(
        lab,
        file,
        if reset_flows { &["--reset-flows"] } else { &[] },
    )
}

/// The entry that `pick` accepts of the list `ecsnet ARGS --json` prints.
fn listed(lab: &Lab, args: &[&str], pick: impl Fn(&Value) -> bool) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ecsnet_ok(&lab.ecsnet_args(&all));
    let list: Value = serde_json::from_str(&out).expect("a JSON list");
    list.as_array()
        .expect("a JSON list")
        .iter()
        .find(|v| pick(v))
        .cloned()
        .unwrap_or_else(|| panic!("no such entry in {args:?}: {list}"))
}

/// The N of "N tracked flow(s) no longer allowed cut" in apply's output.
fn flows_cut(out: &str) -> u64 {
    let (before, _) = out
        .split_once(" tracked flow(s) no longer allowed cut")
        .unwrap_or_else(|| panic!("apply --reset-flows did not report flows cut: {out:?}"));
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of flows cut in {out:?}"))
}

// ---- counters ----------------------------------------------------------------------------

/// Waits (up to 3 s) until `task`'s `reason` drops reach `at_least`; fails with `what`.
fn expect_drops(lab: &Lab, task: &str, reason: &str, at_least: u64, what: &str) -> u64 {
    let s = poll(
        Duration::from_secs(3),
        Duration::from_millis(100),
        || lab.stats(),
        |s| task_drops(s, task, reason) >= at_least,
    );
    let s = s.unwrap_or_else(|s| {
        panic!(
            "{what}: expected at least {at_least} {reason} drops on {task}, have {}; drops: {:?}",
            task_drops(&s, task, reason),
            s.tasks
                .iter()
                .map(|t| (&t.name, &t.drops))
                .collect::<Vec<_>>()
        )
    });
    task_drops(&s, task, reason)
}

/// Runs `f`, after which `task`'s `reason` drops must have grown by at least `n` (`what`).
fn counted(lab: &Lab, (task, reason, n): (&str, &str, u64), what: &str, f: impl FnOnce()) {
    let before = task_drops(&lab.stats(), task, reason);
    f();
    expect_drops(lab, task, reason, before + n, what);
}

/// The kernel counters of a namespace that move only when an IPv4 datagram (or a fragment of
/// one) is delivered to it: (Ip.ReasmReqds, Ip.ReasmOKs, Udp.InDatagrams).
fn delivery_counters(ns: &str) -> (u64, u64, u64) {
    let c = proc_net(ns, &["snmp"]);
    let get = |k: &str| {
        *c.get(k)
            .unwrap_or_else(|| panic!("no {k} in {ns}'s /proc/net/snmp"))
    };
    (
        get("Ip.ReasmReqds"),
        get("Ip.ReasmOKs"),
        get("Udp.InDatagrams"),
    )
}

// ---- traffic -----------------------------------------------------------------------------

/// One request/response of 100 bytes on an echo connection.
fn roundtrip(s: &mut TcpStream, tag: u8) -> io::Result<()> {
    echo(s, &[tag; 100])
}

/// A TCP connection from `ns` to `addr` that echoed once; read timeout 2 s.
fn open_tcp(ns: &str, addr: &str) -> TcpStream {
    let mut s = tcp_connect(ns, addr.parse().unwrap(), ANSWER)
        .unwrap_or_else(|e| panic!("connect to {addr} from {ns} (expected allowed): {e}"));
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.set_nodelay(true).unwrap();
    roundtrip(&mut s, 0xee)
        .unwrap_or_else(|e| panic!("first echo on {ns} -> {addr} (expected allowed): {e}"));
    s
}

/// A connection attempt from `ns` to `addr` must go unanswered: its SYN was dropped (a refused
/// connection would mean it arrived).
fn assert_tcp_dropped(ns: &str, addr: &str, what: &str) {
    match tcp_connect(ns, addr.parse().unwrap(), SILENCE) {
        Ok(_) => panic!("{what}: {ns} -> {addr} connected, expected its SYN dropped"),
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::TimedOut,
            "{what}: {ns} -> {addr} failed with {e}, expected no answer at all"
        ),
    }
}

/// A payload of `size` bytes that differs per `tag`.
fn payload(size: usize, tag: u8) -> Vec<u8> {
    (0..size)
        .map(|i| {
            u8::try_from(i % 256)
                .unwrap()
                .wrapping_mul(7)
                .wrapping_add(tag)
        })
        .collect()
}

/// Sends `msg` on a connected socket; whether the same bytes came back within `wait`.
fn udp_echoes(s: &UdpSocket, msg: &[u8], wait: Duration) -> bool {
    s.send(msg).expect("send udp");
    udp_receives(s, msg, wait)
}

/// Whether `rx` receives `msg` within `wait`.
fn udp_receives(rx: &UdpSocket, msg: &[u8], wait: Duration) -> bool {
    udp_wait(rx, wait, |got| got == msg).is_some()
}

/// `rx` receives `msg` within `ANSWER` when it `arrives`, else not within `SILENCE`.
fn expect_received(rx: &UdpSocket, msg: &[u8], arrives: bool, what: &str) {
    let wait = if arrives { ANSWER } else { SILENCE };
    let got = udp_receives(rx, msg, wait);
    assert_eq!(got, arrives, "{what}: received {got}, expected {arrives}");
}

/// Sends `msg` from `from` to `to`, then `expect_received` at `rx`.
fn expect_delivery(
    from: &UdpSocket,
    to: &str,
    rx: &UdpSocket,
    msg: &[u8],
    arrives: bool,
    what: &str,
) {
    from.send_to(msg, to)
        .unwrap_or_else(|e| panic!("{what}: send to {to}: {e}"));
    expect_received(rx, msg, arrives, what);
}

// ---- link layer --------------------------------------------------------------------------

/// Sends from `ns`'s eth0 (MAC `own`) one gratuitous ARP claiming `claimed`: a broadcast request
/// (`reply_to` None) or a reply unicast to `reply_to`, the way ARP poisoning is done.
fn send_arp(ns: &str, own: Mac, claimed: Ipv4Addr, reply_to: Option<Mac>) {
    let (dst, op, tha) = match reply_to {
        None => (BROADCAST, ARP_REQUEST, [0u8; 6]),
        Some(m) => (m, ARP_REPLY, m),
    };
    let arp = raw::arp(op, own, claimed, tha, claimed);
    PacketSocket::open(ns, "eth0").send_ok(&raw::ethernet(dst, own, &[], ETH_P_ARP, &arp));
}

/// Sends from `ns`, through a raw socket, one UDP fragment that is not the first (offset 800
/// bytes, the last one) of a datagram `src` -> `dst` with IP id `id`.
fn send_later_fragment(ns: &str, src: Ipv4Addr, dst: Ipv4Addr, id: u16) {
    let data: Vec<u8> = (0..64).collect();
    // MF clear, offset 100 units of 8 bytes.
    let fragment = raw::ipv4_fragment(src, dst, IPPROTO_UDP, id, 100, false, &data);
    RawIpSocket::open(ns)
        .send(&fragment)
        .unwrap_or_else(|e| panic!("send a raw fragment from {ns}: {e}"));
}

// ---- tests -------------------------------------------------------------------------------

#[test]
fn joining_and_leaving_a_referenced_group_opens_and_closes_a_port_live() {
    let lab = Lab::up("plm", 2, &["2:8080:80"]);
    lab.ecsnet_up();
    let (t1, t2) = (lab.task_ns(1), lab.task_ns(2));
    // task2 takes tcp 80 from members of sg-a only; task1 starts outside every group.
    let groups = [
        sg("sg-a", "sg-a", &[], &all_traffic()),
        sg("sg-b", "sg-b", &[tcp(80, 80, &["sg-a"])], &all_traffic()),
    ];
    let outside = write_state(&lab, "outside", &groups, &[&[], &["sg-b"]], &json!({}));
    apply(&lab, &outside, false);
    let task2_entry = || listed(&lab, &["task", "ls"], |t| t["name"] == "task2");
    let members_of_a =
        || listed(&lab, &["sg", "ls"], |g| g["group"]["GroupId"] == "sg-a")["members"].clone();
    let task2_before = task2_entry();
    assert_eq!(members_of_a(), json!([]));

    assert_tcp_dropped(t1, "172.17.0.3:80", "task1 outside sg-a");
    let rejected = expect_drops(&lab, "task2", "SG_INGRESS", 1, "task1 outside sg-a");

    // Join: task1 becomes a member of sg-a; task2's configuration is not touched.
    // (`--interface` given: without it task add looks for a host neighbour entry of the
    // address, and the host has never exchanged a packet with task1 here.)
    let out = ecsnet_ok(&lab.ecsnet_args(&[
        "task",
        "add",
        "--name",
        "task1",
        "--ip",
        "172.17.0.2",
        "--interface",
        &lab.status.tasks[0].interface,
        "--sg",
        "sg-a",
    ]));
    assert!(out.contains("task task1 172.17.0.2"), "task add: {out}");
    assert_eq!(members_of_a(), json!(["task1"]));
    assert_eq!(
        task2_entry(),
        task2_before,
        "task add of task1 changed task2"
    );
    let mut held = open_tcp(t1, "172.17.0.3:80");
    for i in 0..5 {
        roundtrip(&mut held, i).expect("echo on a connection opened as a member");
    }

    // Leave: back to the state where task1 is in no group.
    apply(&lab, &outside, false);
    assert_eq!(members_of_a(), json!([]));
    assert_eq!(task2_entry(), task2_before);
    assert_tcp_dropped(t1, "172.17.0.3:80", "task1 after leaving sg-a");
    expect_drops(
        &lab,
        "task2",
        "SG_INGRESS",
        rejected + 1,
        "task1 after leaving sg-a",
    );
    // What was opened while a member is a tracked flow: it lives on, as in AWS.
    for i in 0..5 {
        roundtrip(&mut held, i).expect("a tracked flow survives its peer leaving the group");
    }
    // task2 itself lost nothing on the way: it still reaches out.
    let r = lab.probe(t2, "tcp", "10.10.0.2:9000", 3, 100);
    assert_eq!(r["echoed"], 3, "task2 -> client: {r}");
}

#[test]
fn removing_a_rule_keeps_tracked_flows_until_reset_flows_cuts_them() {
    let lab = Lab::up("plr", 2, &["2:8080:80", "2:8053:53/udp"]);
    lab.ecsnet_up();
    let t1 = lab.task_ns(1);
    let bridge = &["172.17.0.0/16"];
    let open = [sg(
        "sg-srv",
        "sg-srv",
        &[tcp(80, 80, bridge), perm("udp", Some((53, 53)), bridge)],
        &all_traffic(),
    )];
    let closed = [sg("sg-srv", "sg-srv", &[], &all_traffic())];
    let members: &[&[&str]] = &[&[], &["sg-srv"]];
    let open = write_state(&lab, "open", &open, members, &json!({}));
    let closed = write_state(&lab, "closed", &closed, members, &json!({}));
    apply(&lab, &open, false);

    let mut tcp = open_tcp(t1, "172.17.0.3:80");
    let held_udp = udp(t1, "0.0.0.0:0", Some("172.17.0.3:53"));
    assert!(
        udp_echoes(&held_udp, &payload(200, 1), ANSWER),
        "udp task1 -> task2:53 while allowed"
    );
    // A flow the change does not concern: task1 (no groups) to the outside.
    let mut outside = open_tcp(t1, "10.10.0.2:9000");

    // The rules go; the tracked flows stay.
    let out = apply(&lab, &closed, false);
    assert!(!out.contains("cut"), "apply without --reset-flows: {out}");
    for i in 0..5 {
        roundtrip(&mut tcp, i).expect("held TCP flow after its rule was removed");
        assert!(
            udp_echoes(&held_udp, &payload(200, i), ANSWER),
            "held UDP flow after its rule was removed (message {i})"
        );
    }
    let what = "new TCP and UDP flows after the rules were removed";
    counted(&lab, ("task2", "SG_INGRESS", 2), what, || {
        assert_tcp_dropped(
            t1,
            "172.17.0.3:80",
            "new TCP connection after the rule was removed",
        );
        let fresh_udp = udp(t1, "0.0.0.0:0", Some("172.17.0.3:53"));
        assert!(
            !udp_echoes(&fresh_udp, &payload(200, 9), SILENCE),
            "a new UDP flow got an echo after its rule was removed"
        );
    });
    roundtrip(&mut tcp, 42).expect("held TCP flow after new flows were rejected");

    // --reset-flows cuts the two flows the rules no longer allow, and nothing else.
    let out = apply(&lab, &closed, true);
    assert_eq!(
        flows_cut(&out),
        2,
        "want the held TCP and UDP flows to task2 cut and the flow to the client kept: {out}"
    );
    counted(
        &lab,
        ("task2", "SG_INGRESS", 2),
        "the cut flows' next packets",
        || {
            assert!(
                roundtrip(&mut tcp, 7).is_err(),
                "the held TCP connection still echoes after --reset-flows"
            );
            assert!(
                !udp_echoes(&held_udp, &payload(200, 7), SILENCE),
                "the held UDP flow still echoes after --reset-flows"
            );
        },
    );
    roundtrip(&mut outside, 1).expect("a flow that is still allowed survives --reset-flows");
}

#[test]
fn a_task_cannot_send_from_an_address_that_is_not_its_own() {
    let lab = Lab::up("pls", 2, &[]);
    lab.ecsnet_up();
    let (t1, t2, client) = (lab.task_ns(1), lab.task_ns(2), lab.client());
    let at_task2 = udp(t2, "0.0.0.0:7000", None);
    let at_client = udp(client, "10.10.0.2:7001", None);
    ns_exec(t1, &["ip", "addr", "add", "172.17.0.50/16", "dev", "eth0"]);

    // From its own address: both arrive (and the neighbours the spoofed packets need are known).
    let own = udp(t1, "172.17.0.2:0", None);
    let good = payload(300, 1);
    let from_own = |to, rx: &UdpSocket, what| expect_delivery(&own, to, rx, &good, true, what);
    from_own(TO_TASK2, &at_task2, "task1 -> task2 from 172.17.0.2");
    from_own(TO_CLIENT, &at_client, "task1 -> client from 172.17.0.2");

    // From the second address: nothing arrives anywhere.
    let what = "6 datagrams from 172.17.0.50";
    counted(&lab, ("task1", "SPOOFED_SOURCE", 6), what, || {
        let spoofed = udp(t1, "172.17.0.50:0", None);
        let bad = payload(300, 2);
        for _ in 0..3 {
            spoofed.send_to(&bad, TO_TASK2).unwrap();
            spoofed.send_to(&bad, TO_CLIENT).unwrap();
        }
        for (rx, whom) in [(&at_task2, "task2"), (&at_client, "the client")] {
            let what = format!("a datagram from 172.17.0.50 reached {whom}");
            expect_received(rx, &bad, false, &what);
        }
    });
    let s = lab.stats();
    assert_eq!(
        task_drops(&s, "task2", "SPOOFED_SOURCE"),
        0,
        "task2 sent nothing spoofed"
    );

    // The task itself is not cut off: its own address still works.
    from_own(TO_TASK2, &at_task2, "task1 -> task2 after the spoofing");
}

#[test]
fn a_task_that_changes_its_mac_after_being_seen_is_dropped_until_it_changes_back() {
    let lab = Lab::up("plh", 2, &[]);
    lab.ecsnet_up();
    let (t1, t2) = (lab.task_ns(1), lab.task_ns(2));
    let at_task2 = udp(t2, "0.0.0.0:7000", None);
    let from_t1 = udp(t1, "0.0.0.0:0", None);
    let r = lab.probe(t1, "tcp", "10.10.0.2:9000", 3, 100);
    assert_eq!(r["echoed"], 3, "task1 -> client before the change: {r}");
    let to_task2 = |tag, arrives, what| {
        expect_delivery(
            &from_t1,
            TO_TASK2,
            &at_task2,
            &payload(100, tag),
            arrives,
            what,
        );
    };
    to_task2(1, true, "task1 -> task2 before the change");
    let original = raw::mac_str(raw::mac_of(t1, "eth0"));
    let before = task_drops(&lab.stats(), "task1", "SPOOFED_SOURCE");

    ns_exec(
        t1,
        &[
            "ip",
            "link",
            "set",
            "dev",
            "eth0",
            "address",
            "02:ec:5e:00:00:99",
        ],
    );
    assert_tcp_dropped(t1, "10.10.0.2:9000", "task1 with a new MAC -> client");
    to_task2(2, false, "task1 with a new MAC reached task2");
    expect_drops(
        &lab,
        "task1",
        "SPOOFED_SOURCE",
        before + 2,
        "a SYN and a datagram from a new MAC",
    );

    // Its own MAC back: the same traffic passes again.
    ns_exec(
        t1,
        &["ip", "link", "set", "dev", "eth0", "address", &original],
    );
    let r = lab.probe(t1, "tcp", "10.10.0.2:9000", 3, 100);
    assert_eq!(r["echoed"], 3, "task1 -> client with its MAC back: {r}");
    to_task2(3, true, "task1 -> task2 with its MAC back");
}

#[test]
fn arp_claiming_another_address_is_dropped_and_poisons_no_neighbour_table() {
    let lab = Lab::up("pla", 2, &[]);
    let (host, t1, t2) = (lab.host(), lab.task_ns(1), lab.task_ns(2));
    let (mac1, mac2) = (raw::mac_of(t1, "eth0"), raw::mac_of(t2, "eth0"));
    let host_mac = raw::mac_of(host, "docker0");
    let poison = |t1: &str| {
        // task1 claims task2's address to the host (broadcast and unicast reply) and the
        // host's address to everyone on the bridge.
        send_arp(t1, mac1, TASK2, None);
        send_arp(t1, mac1, TASK2, Some(host_mac));
        send_arp(t1, mac1, GATEWAY, None);
        std::thread::sleep(Duration::from_millis(300));
    };
    let learn = || {
        // The host learns task2, task2 learns the host, both from real ARP.
        for ns in [host, t2] {
            ns_exec(ns, &["ip", "neigh", "flush", "all"]);
        }
        ping(host, TASK2);
        ping(t2, GATEWAY);
        assert_eq!(raw::neighbour(host, "docker0", TASK2), Some(mac2));
    };

    // Without ecsnet the frames work: that is what the datapath must stop.
    learn();
    poison(t1);
    assert_eq!(
        raw::neighbour(host, "docker0", TASK2),
        Some(mac1),
        "control: without ecsnet the host should take task1's claim for 172.17.0.3"
    );
    assert_eq!(
        raw::neighbour(t2, "eth0", GATEWAY),
        Some(mac1),
        "control: without ecsnet task2 should take task1's claim for 172.17.0.1"
    );

    learn();
    lab.ecsnet_up();
    // task1 is seen (its MAC is known) and ARP for its own address still passes.
    ns_exec(t1, &["ip", "neigh", "flush", "all"]);
    ping(t1, GATEWAY);
    ping(t1, TASK2);
    let before = task_drops(&lab.stats(), "task1", "SPOOFED_SOURCE");
    poison(t1);
    assert_eq!(
        raw::neighbour(host, "docker0", TASK2),
        Some(mac2),
        "the host's entry for task2 was poisoned"
    );
    let gw = raw::neighbour(t2, "eth0", GATEWAY);
    assert_ne!(gw, Some(mac1), "task2's entry for the host was poisoned");
    expect_drops(
        &lab,
        "task1",
        "SPOOFED_SOURCE",
        before + 3,
        "three ARP frames claiming other addresses",
    );
    // task2 is still reached at its own MAC.
    ping(host, TASK2);
    ping(t1, TASK2);
    assert_eq!(raw::neighbour(host, "docker0", TASK2), Some(mac2));
    assert_eq!(
        task_drops(&lab.stats(), "task2", "SPOOFED_SOURCE"),
        0,
        "task2 sent nothing spoofed"
    );
}

#[test]
fn instance_metadata_is_blocked_on_request_and_task_metadata_stays_reachable() {
    let lab = Lab::up("pli", 1, &[]);
    let (host, t1) = (lab.host(), lab.task_ns(1));
    // The host answers both metadata addresses: IMDS on a local address, the ECS agent's
    // endpoint through the DNAT and route_localnet the ECS agent sets up.
    ns_exec(
        host,
        &["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"],
    );
    ns_exec(
        host,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "169.254.170.2/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "127.0.0.1:51679",
        ],
    );
    ns_exec(
        host,
        &["sysctl", "-qw", "net.ipv4.conf.docker0.route_localnet=1"],
    );
    let bin = ecsnet_bin().display().to_string();
    let _servers = Background::start(
        host,
        &[&bin, "lab", "serve", "--tcp", "80", "--tcp", "51679"],
        Duration::from_millis(300),
    );
    lab.ecsnet_up();
    let none = write_state(&lab, "imds-open", &[], &[], &json!({}));
    let blocked = write_state(
        &lab,
        "imds-blocked",
        &[],
        &[],
        &json!({"blockInstanceMetadata": true}),
    );
    let closed = write_state(
        &lab,
        "imds-closed",
        &[sg("sg-closed", "sg-closed", &[], &[])],
        &[&["sg-closed"]],
        &json!({"blockInstanceMetadata": true}),
    );
    let reachable = |what: &str, target: &str| {
        let r = lab.probe(t1, "tcp", target, 3, 100);
        assert_eq!(r["echoed"], 3, "{what}: task1 -> {target}: {r}");
    };

    apply(&lab, &none, false);
    reachable("blockInstanceMetadata false", "169.254.169.254:80");
    reachable("blockInstanceMetadata false", "169.254.170.2:80");
    assert_eq!(task_drops(&lab.stats(), "task1", "IMDS_BLOCKED"), 0);

    apply(&lab, &blocked, false);
    assert_tcp_dropped(t1, "169.254.169.254:80", "blockInstanceMetadata true");
    expect_drops(&lab, "task1", "IMDS_BLOCKED", 1, "task1 -> 169.254.169.254");
    reachable("blockInstanceMetadata true", "169.254.170.2:80");
    // The block is the tasks': the host itself still reaches IMDS.
    let r = lab.probe(host, "tcp", "169.254.169.254:80", 3, 100);
    assert_eq!(r["echoed"], 3, "host -> IMDS: {r}");

    // A group with no rules at all: nothing leaves the task, except to the agent's endpoint.
    apply(&lab, &closed, false);
    let s = lab.stats();
    let (egress0, imds0) = (
        task_drops(&s, "task1", "SG_EGRESS"),
        task_drops(&s, "task1", "IMDS_BLOCKED"),
    );
    assert_tcp_dropped(t1, "10.10.0.2:9000", "a group with no egress rules");
    expect_drops(
        &lab,
        "task1",
        "SG_EGRESS",
        egress0 + 1,
        "task1 -> client with no egress rules",
    );
    reachable("no egress rules", "169.254.170.2:80");
    assert_tcp_dropped(
        t1,
        "169.254.169.254:80",
        "no egress rules and blockInstanceMetadata",
    );
    expect_drops(
        &lab,
        "task1",
        "IMDS_BLOCKED",
        imds0 + 1,
        "task1 -> 169.254.169.254 with no egress rules",
    );
}

#[test]
fn fragments_of_a_rejected_datagram_never_arrive_and_of_an_allowed_one_all_do() {
    let lab = Lab::up("plf", 2, &["2:8053:53/udp", "2:8054:54/udp"]);
    lab.ecsnet_up();
    let (t1, t2, client) = (lab.task_ns(1), lab.task_ns(2), lab.client());
    let groups = [
        sg("sg-client", "sg-client", &[], &all_traffic()),
        sg(
            "sg-dns",
            "sg-dns",
            &[perm("udp", Some((53, 53)), &["0.0.0.0/0"])],
            &all_traffic(),
        ),
    ];
    let file = write_state(
        &lab,
        "frag",
        &groups,
        &[&["sg-client"], &["sg-dns"]],
        &json!({}),
    );
    apply(&lab, &file, false);
    // 3000 bytes: three fragments at MTU 1500, cut by the sender's kernel.
    let big = |tag| payload(3000, tag);

    // The first fragment is rejected where it is judged, and its datagram is marked rejected:
    // the two later fragments are dropped FRAGMENT too, none reaches a kernel's defragmenter.
    for (ns, allowed, rejected) in [
        (t1, "172.17.0.3:53", "172.17.0.3:54"),
        (client, "10.10.0.1:8053", "10.10.0.1:8054"),
    ] {
        let ok = udp(ns, "0.0.0.0:0", Some(allowed));
        let (_, reassembled0, _) = delivery_counters(t2);
        for tag in 0..3 {
            assert!(
                udp_echoes(&ok, &big(tag), ANSWER),
                "{ns} -> {allowed}: a 3000-byte datagram did not come back whole"
            );
        }
        let (_, reassembled, _) = delivery_counters(t2);
        assert_eq!(
            reassembled - reassembled0,
            3,
            "{ns} -> {allowed}: task2 should have reassembled 3 fragmented datagrams"
        );
        let drops0 = lab.stats().drops;
        let delivered0 = delivery_counters(t2);
        let host_reasm0 = delivery_counters(lab.host()).0;
        let no = udp(ns, "0.0.0.0:0", Some(rejected));
        assert!(
            !udp_echoes(&no, &big(9), SILENCE),
            "{ns} -> {rejected}: a 3000-byte datagram to a rejected port was echoed"
        );
        assert_eq!(
            delivery_counters(t2),
            delivered0,
            "{ns} -> {rejected}: task2's kernel received fragments or a datagram \
             (Ip.ReasmReqds, Ip.ReasmOKs, Udp.InDatagrams)"
        );
        assert_eq!(
            delivery_counters(lab.host()).0,
            host_reasm0,
            "{ns} -> {rejected}: fragments reached the host's defragmenter (Ip.ReasmReqds)"
        );
        let drops = lab.settled_stats().drops;
        let delta =
            |r: &str| drops.get(r).copied().unwrap_or(0) - drops0.get(r).copied().unwrap_or(0);
        let policy: u64 = POLICY_REASONS.iter().map(|r| delta(r)).sum();
        let other: Vec<(&String, u64)> = drops
            .keys()
            .filter(|r| !POLICY_REASONS.contains(&r.as_str()))
            .map(|r| (r, delta(r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(
            (delta("SG_INGRESS") + delta("SG_EGRESS"), delta("FRAGMENT")),
            (1, 2),
            "{ns} -> {rejected}: the first fragment rejected by policy, both later ones dropped \
             as fragments of a rejected datagram: {drops0:?} -> {drops:?}"
        );
        assert_eq!(policy, 3);
        assert!(
            other.is_empty(),
            "{ns} -> {rejected}: drops for other reasons: {other:?}"
        );
    }

    // A later fragment with no first fragment, from a task with a policy: dropped FRAGMENT.
    let before = task_drops(&lab.stats(), "task1", "FRAGMENT");
    let delivered0 = delivery_counters(t2);
    send_later_fragment(t1, TASK1, TASK2, 0x5eed);
    expect_drops(
        &lab,
        "task1",
        "FRAGMENT",
        before + 1,
        "a lone later fragment from task1",
    );
    assert_eq!(
        delivery_counters(t2),
        delivered0,
        "task2's kernel received the lone fragment"
    );
}
