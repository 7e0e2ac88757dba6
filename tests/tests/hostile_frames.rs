//! Frames a task sends to get around its security groups (issue 16, items 1 and 6), from an
//! `AF_PACKET` socket inside a task whose egress allows only tcp 9000 to the client, towards tasks
//! whose ingress allows only tcp 80 from 10.10.0.0/24, with `blockInstanceMetadata` on:
//! VLAN-tagged frames (two tags of VID 0 read as 0x8100 in tc and the receiver strips both; one
//! tag), unicast IPv4 in broadcast and multicast frames, an unknown `EtherType`, ARP whose sender
//! MAC is not the task's, and IPv6 to and from policed tasks whose rules have no IPv6 range.
//! Each must reach no one (a capture on the target's interface sees nothing, no socket gets it,
//! no neighbour entry moves) and be counted once with its reason on the interface whose rules
//! drop it, while what the groups allow keeps working, and IPv6 between tasks without groups
//! under `defaultPolicy: allow` still works.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use ecsnet_tests::{
    Background, Lab,
    counters::{drops, poll, task_drops},
    ecsnet_bin, in_netns, ns_exec,
    raw::{
        self, ARP_REPLY, BROADCAST, DOUBLE_VID0, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6,
        ETH_P_LOCAL_EXPERIMENTAL, Mac, PacketSocket, RawIpSocket, TCP_ACK, TCP_SYN, Tag,
        forget_neighbour, mac_str, neighbour,
    },
    traffic::{ping, tcp_connect, udp, udp_wait},
    world::{self, all, sg, tcp},
};
use serde_json::{Value, json};

/// Drop reasons the datapath gives these frames.
const VLAN_TAGGED: &str = "VLAN_TAGGED";
const UNKNOWN_ETHERTYPE: &str = "UNKNOWN_ETHERTYPE";
const UNICAST_IN_GROUP_MAC: &str = "UNICAST_IN_GROUP_MAC";
const SPOOFED_SOURCE: &str = "SPOOFED_SOURCE";
const SG_EGRESS: &str = "SG_EGRESS";
const SG_INGRESS: &str = "SG_INGRESS";

/// How long a frame that must not arrive is waited for.
const SILENCE: Duration = Duration::from_millis(800);
/// How long a drop may take to show in `stats`.
const COUNTED: Duration = Duration::from_secs(2);
/// How long an answer to a frame that must not arrive is waited for.
const NO_ANSWER: Duration = Duration::from_millis(300);
/// How long an answer that should come may take.
const ANSWER: Duration = Duration::from_secs(3);

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const CLIENT_ECHO: u16 = 9000;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The UDP port task2 listens on for the datagrams sent to it.
const RECEIVER: u16 = 7000;

// ---- state files -------------------------------------------------------------------------

/// The lab's state file with `edit` applied, written beside it as `<tag>.json`, then applied.
fn apply(lab: &Lab, tag: &str, edit: impl FnOnce(&mut Value)) {
    let mut state = world::state(lab);
    edit(&mut state);
    world::apply(lab, &format!("{tag}.json"), &state);
}

// ---- counters ----------------------------------------------------------------------------

/// The drop counters that moved from `a` to `b`.
fn moved(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .filter_map(|(k, n)| {
            let before = a.get(k).copied().unwrap_or(0);
            (*n != before).then(|| (k.clone(), n.wrapping_sub(before)))
        })
        .collect()
}

/// Waits (up to `COUNTED`) for counter `key` to move from `before`; returns every counter that
/// moved.
fn wait_moved(lab: &Lab, before: &BTreeMap<String, u64>, key: &str) -> BTreeMap<String, u64> {
    let (Ok(diff) | Err(diff)) = poll(
        COUNTED,
        Duration::from_millis(100),
        || moved(before, &drops(&lab.stats())),
        |diff| diff.contains_key(key),
    );
    diff
}

// ---- namespaces --------------------------------------------------------------------------

/// A UDP socket of `ns` bound to 0.0.0.0:`port`.
fn udp_receiver(ns: &str, port: u16) -> UdpSocket {
    udp(ns, &format!("0.0.0.0:{port}"), None)
}

/// Where a datagram carrying `marker` came from, if `rx` got one within `wait`.
fn udp_got(rx: &UdpSocket, marker: &[u8], wait: Duration) -> Option<SocketAddr> {
    udp_wait(rx, wait, |d| raw::contains(d, marker))
}

/// Whether `frame` is a TCP segment `from` -> `to` with exactly SYN and ACK set.
fn is_syn_ack(frame: &[u8], from: SocketAddrV4, to: SocketAddrV4) -> bool {
    raw::parse_tcp(frame) == Some((from, to, TCP_SYN | TCP_ACK))
}

/// Whether `frame` is IPv6 carrying TCP (next header 6 right after the fixed header): what the
/// IPv6 tests send, and not the neighbour discovery that reaches every task.
fn is_ipv6_tcp(frame: &[u8]) -> bool {
    frame.len() >= 54 && u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IPV6 && frame[20] == 6
}

// ---- the policed lab ---------------------------------------------------------------------

/// A lab of three tasks with the groups: task1 may only send tcp 9000 to the client;
/// task2 and task3 take only tcp 80 from 10.10.0.0/24 (both publish it) and may send anything;
/// `blockInstanceMetadata` is on and the host answers 169.254.169.254:80.
struct Policed {
    lab: Lab,
    /// The tasks' addresses and MACs, task1 first.
    addr: [Ipv4Addr; 3],
    mac: [Mac; 3],
    /// docker0's MAC: the tasks' gateway.
    gw_mac: Mac,
    /// task1's eth0, to send from.
    t1: PacketSocket,
    /// What went wrong so far, reported together at the end of a test.
    fails: RefCell<Vec<String>>,
    _imds: Background,
}

impl Policed {
    fn up(prefix: &str) -> Self {
        let lab = Lab::up(prefix, 3, &["2:8080:80", "3:8081:80"]);
        let host = lab.host().to_owned();
        ns_exec(
            &host,
            &["ip", "addr", "add", &format!("{IMDS}/32"), "dev", "lo"],
        );
        let bin = ecsnet_bin().display().to_string();
        let imds = Background::start(
            &host,
            &[&bin, "lab", "serve", "--tcp", "80"],
            Duration::from_millis(300),
        );
        lab.ecsnet_up();
        let echo = i32::from(CLIENT_ECHO);
        let groups = [
            sg(
                "sg-sender",
                "sg-sender",
                &[],
                &[tcp(echo, echo, &["10.10.0.2/32"])],
            ),
            sg(
                "sg-web",
                "sg-web",
                &[tcp(80, 80, &["10.10.0.0/24"])],
                &[all(&["0.0.0.0/0"])],
            ),
        ];
        apply(&lab, "policed", |s| {
            world::set_groups(s, &groups, &[&["sg-sender"], &["sg-web"], &["sg-web"]]);
            s["host"]["blockInstanceMetadata"] = json!(true);
        });
        let addr = [0, 1, 2].map(|i| lab.status.tasks[i].address);
        let mac = [1, 2, 3].map(|i| raw::mac_of(lab.task_ns(i), "eth0"));
        let gw_mac = raw::mac_of(&host, "docker0");
        let t1 = PacketSocket::open(lab.task_ns(1), "eth0");
        let p = Policed {
            lab,
            addr,
            mac,
            gw_mac,
            t1,
            fails: RefCell::default(),
            _imds: imds,
        };
        p.allowed_traffic_works("with the groups applied");
        p.raw_frames_are_seen_and_checked();
        p
    }

    fn ns(&self, task: usize) -> &str {
        self.lab.task_ns(task)
    }

    /// Notes what went wrong, for `report`.
    fn fail(&self, what: String) {
        self.fails.borrow_mut().push(what);
    }

    /// Fails the test with everything that went wrong so far in `what`, if anything did.
    fn report(&self, what: &str) {
        report(what, &self.fails.take());
    }

    /// A SYN from task1's port `sport` to `dst` with sequence number `seq`, carrying `payload`.
    fn syn(&self, sport: u16, dst: SocketAddrV4, seq: u32, payload: &[u8]) -> Vec<u8> {
        let src = SocketAddrV4::new(self.addr[0], sport);
        raw::tcp(src, dst, TCP_SYN, seq, 0, payload)
    }

    /// Notes `what` went wrong if `failed`.
    fn fail_if(&self, failed: bool, what: &str) {
        if failed {
            self.fail(what.to_owned());
        }
    }

    /// Fails (`what`) if `rx` gets a datagram carrying `marker` within 100 ms.
    fn not_received(&self, rx: &UdpSocket, marker: &[u8], what: &str) {
        if let Some(from) = udp_got(rx, marker, Duration::from_millis(100)) {
            self.fail(format!("{what}: task2's UDP socket got it from {from}"));
        }
    }

    /// What the groups allow: task1 to the client's tcp 9000, the client to task2's published
    /// port 80.
    fn allowed_traffic_works(&self, when: &str) {
        let (t1, client) = (self.ns(1), self.lab.client());
        let r = self
            .lab
            .probe(t1, "tcp", &format!("{CLIENT}:{CLIENT_ECHO}"), 3, 100);
        assert_eq!(
            r["echoed"], 3,
            "{when}: task1 -> client tcp 9000 (allowed): {r}"
        );
        let r = self.lab.probe(client, "tcp", "10.10.0.1:8080", 3, 100);
        assert_eq!(
            r["echoed"], 3,
            "{when}: client -> task2's published 80 (allowed): {r}"
        );
    }

    /// The controls that make "never arrived" mean something: a raw plain frame the groups
    /// allow arrives where it is sent, and the plain twin of a tagged frame is checked.
    fn raw_frames_are_seen_and_checked(&self) {
        let client = PacketSocket::open(self.lab.client(), "eth0");
        let echo = SocketAddrV4::new(CLIENT, CLIENT_ECHO);
        let m = raw::marker("plain-syn-to-client");
        let syn = self.syn(41000, echo, 1, &m);
        self.t1.send_ok(&raw::ethernet(
            self.gw_mac,
            self.mac[0],
            &[],
            ETH_P_IP,
            &syn,
        ));
        assert!(
            client.saw(&m, ANSWER),
            "control: a raw plain SYN from task1 to the client's tcp 9000 (allowed) never \
             reached the client's eth0"
        );
        // The same through task1's raw IPv4 socket, which the kernel frames and routes.
        let m = raw::marker("raw-ip-syn-to-client");
        RawIpSocket::open(self.ns(1))
            .send(&self.syn(41002, echo, 1, &m))
            .expect("send a raw IPv4 SYN from task1");
        assert!(
            client.saw(&m, ANSWER),
            "control: a SYN from task1's raw IPv4 socket to the client's tcp 9000 (allowed) \
             never reached the client's eth0"
        );

        let t2 = PacketSocket::open(self.ns(2), "eth0");
        let rx = udp_receiver(self.ns(2), RECEIVER);
        let m = raw::marker("plain-udp-to-task2");
        let frame = raw::ethernet(
            self.mac[1],
            self.mac[0],
            &[],
            ETH_P_IP,
            &self.udp_to_task2(41001, &m),
        );
        let what = "control: plain UDP to task2";
        self.expect_dropped(what, &frame, &m, &t2, SG_EGRESS);
        self.not_received(&rx, &m, what);
        self.report("the controls");
    }

    /// A UDP datagram from task1 (port `sport`) to task2's receiver carrying `payload`.
    fn udp_to_task2(&self, sport: u16, payload: &[u8]) -> Vec<u8> {
        raw::udp(
            SocketAddrV4::new(self.addr[0], sport),
            SocketAddrV4::new(self.addr[1], RECEIVER),
            payload,
        )
    }

    /// Sends `frame` (which carries `marker`) from task1's eth0. It must not reach `target`'s
    /// interface, and exactly one drop must be counted: `reason` on task1.
    fn expect_dropped(
        &self,
        what: &str,
        frame: &[u8],
        marker: &[u8],
        target: &PacketSocket,
        reason: &str,
    ) {
        self.t1.drain();
        target.drain();
        let before = drops(&self.lab.stats());
        self.t1.send_ok(frame);
        if target.saw(marker, SILENCE) {
            self.fail(format!("{what}: arrived at {}", target.name));
        }
        let key = format!("task1 {reason}");
        let diff = wait_moved(&self.lab, &before, &key);
        if diff != BTreeMap::from([(key, 1)]) {
            self.fail(format!(
                "{what}: not counted once as {reason} on task1 alone; drop counters moved by \
                 {diff:?}"
            ));
        }
    }
}

fn report(what: &str, fails: &[String]) {
    assert!(
        fails.is_empty(),
        "{what}: {} of them went wrong:\n  {}",
        fails.len(),
        fails.join("\n  ")
    );
}

// ---- tests -------------------------------------------------------------------------------

/// A double-tagged ARP reply from task1 claiming the gateway's address, to task2, which knows
/// the real gateway: dropped, and task2's entry keeps the gateway's MAC.
fn double_tagged_arp_keeps_task2s_gateway(p: &Policed, t2: &PacketSocket) {
    let (a2, mac1, mac2) = (p.addr[1], p.mac[0], p.mac[1]);
    let t2_ns = p.ns(2).to_owned();
    forget_neighbour(&t2_ns, "eth0", GATEWAY);
    ping(&t2_ns, GATEWAY);
    assert_eq!(
        neighbour(&t2_ns, "eth0", GATEWAY),
        Some(p.gw_mac),
        "task2 learnt the gateway's MAC"
    );
    // A neighbour entry ignores a changed address for a second after an update (locktime).
    std::thread::sleep(Duration::from_millis(1100));
    let m = raw::marker("double-arp-gateway");
    let mut arp = raw::arp(ARP_REPLY, mac1, GATEWAY, mac2, a2);
    arp.extend_from_slice(&m);
    p.expect_dropped(
        "double-tagged ARP reply claiming 172.17.0.1 to task2",
        &raw::ethernet(mac2, mac1, &DOUBLE_VID0, ETH_P_ARP, &arp),
        &m,
        t2,
        VLAN_TAGGED,
    );
    let gw = neighbour(&t2_ns, "eth0", GATEWAY);
    if gw != Some(p.gw_mac) {
        p.fail(format!(
            "double-tagged ARP reply claiming 172.17.0.1: task2's entry for the gateway is now \
             {:?} (task1 is {}, the gateway {})",
            gw.map(mac_str),
            mac_str(mac1),
            mac_str(p.gw_mac)
        ));
    }
    forget_neighbour(&t2_ns, "eth0", GATEWAY);
}

#[test]
fn vlan_tagged_frames_from_a_task_reach_no_one_and_are_counted() {
    let p = Policed::up("hfv");
    let (host, client_ns) = (p.lab.host().to_owned(), p.lab.client().to_owned());
    let (a1, a2, a3) = (p.addr[0], p.addr[1], p.addr[2]);
    let (mac1, mac2) = (p.mac[0], p.mac[1]);
    let t2 = PacketSocket::open(p.ns(2), "eth0");
    let client = PacketSocket::open(&client_ns, "eth0");
    let docker0 = PacketSocket::open(&host, "docker0");
    let rx = udp_receiver(p.ns(2), RECEIVER);
    let double = |dst: Mac, ethertype: u16, payload: &[u8]| {
        raw::ethernet(dst, mac1, &DOUBLE_VID0, ethertype, payload)
    };

    // A SYN to task2's port 80: task1 may not send it, and task2 takes port 80 only from
    // 10.10.0.0/24.
    let m = raw::marker("double-syn-task2-80");
    let (src, web) = (SocketAddrV4::new(a1, 42000), SocketAddrV4::new(a2, 80));
    let frame = double(mac2, ETH_P_IP, &raw::tcp(src, web, TCP_SYN, 7, 0, &m));
    p.expect_dropped(
        "double-tagged SYN to task2:80",
        &frame,
        &m,
        &t2,
        VLAN_TAGGED,
    );
    let syn_ack = |f: &[u8]| is_syn_ack(f, web, src);
    p.fail_if(
        t2.wait_for_sent(NO_ANSWER, syn_ack).is_some(),
        "double-tagged SYN to task2:80: task2 answered it with a SYN-ACK",
    );
    p.fail_if(
        p.t1.wait_for(NO_ANSWER, syn_ack).is_some(),
        "double-tagged SYN to task2:80: task2's SYN-ACK reached task1",
    );

    // UDP to task2, from task1's own address and from task3's.
    for (what, from) in [
        ("double-tagged UDP to task2", a1),
        ("double-tagged UDP to task2 from task3's address", a3),
    ] {
        let m = raw::marker("double-udp-task2");
        let udp = raw::udp(
            SocketAddrV4::new(from, 42001),
            SocketAddrV4::new(a2, RECEIVER),
            &m,
        );
        p.expect_dropped(what, &double(mac2, ETH_P_IP, &udp), &m, &t2, VLAN_TAGGED);
        p.not_received(&rx, &m, what);
    }

    // UDP out of the host to the client's echo port: task1's egress allows only tcp 9000.
    let m = raw::marker("double-udp-client");
    let udp = raw::udp(
        SocketAddrV4::new(a1, 42002),
        SocketAddrV4::new(CLIENT, CLIENT_ECHO),
        &m,
    );
    p.expect_dropped(
        "double-tagged UDP to the client past task1's egress rules",
        &double(p.gw_mac, ETH_P_IP, &udp),
        &m,
        &client,
        VLAN_TAGGED,
    );
    p.fail_if(
        p.t1.saw(&m, NO_ANSWER),
        "double-tagged UDP to the client: its echo came back to task1",
    );

    // A SYN to the instance metadata service, which is blocked.
    let m = raw::marker("double-syn-imds");
    let (src, imds) = (SocketAddrV4::new(a1, 42003), SocketAddrV4::new(IMDS, 80));
    let frame = double(p.gw_mac, ETH_P_IP, &raw::tcp(src, imds, TCP_SYN, 7, 0, &m));
    p.expect_dropped(
        "double-tagged SYN to 169.254.169.254:80",
        &frame,
        &m,
        &docker0,
        VLAN_TAGGED,
    );
    p.fail_if(
        docker0
            .wait_for_sent(NO_ANSWER, |f| is_syn_ack(f, imds, src))
            .is_some(),
        "double-tagged SYN to 169.254.169.254:80: the host's metadata server answered",
    );

    double_tagged_arp_keeps_task2s_gateway(&p, &t2);

    // One tag is a tagged frame too, even around a SYN the groups would allow untagged.
    let m = raw::marker("single-tag-syn-client");
    let syn = p.syn(42004, SocketAddrV4::new(CLIENT, CLIENT_ECHO), 7, &m);
    p.expect_dropped(
        "single-tagged (802.1Q VID 0) SYN to the client's tcp 9000",
        &raw::ethernet(p.gw_mac, mac1, &[Tag::dot1q(0)], ETH_P_IP, &syn),
        &m,
        &client,
        VLAN_TAGGED,
    );

    p.allowed_traffic_works("after the tagged frames");
    p.report("VLAN-tagged frames from task1");
}

#[test]
fn unicast_ip_in_group_frames_unknown_ethertypes_and_foreign_arp_senders_are_dropped() {
    let p = Policed::up("hfg");
    let host = p.lab.host().to_owned();
    let (a1, mac1, mac2) = (p.addr[0], p.mac[0], p.mac[1]);
    let t2 = PacketSocket::open(p.ns(2), "eth0");
    let docker0 = PacketSocket::open(&host, "docker0");
    let rx = udp_receiver(p.ns(2), RECEIVER);

    // task2's unicast address in a frame to every host on the bridge, or to a group.
    let group = raw::ipv4_multicast_mac(Ipv4Addr::new(239, 1, 2, 3));
    for (what, dst) in [
        ("UDP to task2's address in a broadcast frame", BROADCAST),
        ("UDP to task2's address in a multicast frame", group),
    ] {
        let m = raw::marker("group-mac-udp");
        let frame = raw::ethernet(dst, mac1, &[], ETH_P_IP, &p.udp_to_task2(43000, &m));
        p.expect_dropped(what, &frame, &m, &t2, UNICAST_IN_GROUP_MAC);
        p.not_received(&rx, &m, what);
    }

    // An EtherType nothing on the host handles.
    let m = raw::marker("unknown-ethertype");
    p.expect_dropped(
        "EtherType 0x88b5 to task2",
        &raw::ethernet(mac2, mac1, &[], ETH_P_LOCAL_EXPERIMENTAL, &m),
        &m,
        &t2,
        UNKNOWN_ETHERTYPE,
    );

    // ARP for task1's own address, but naming another MAC: the host's entry for task1 must
    // keep task1's MAC.
    ns_exec(
        &host,
        &[
            "ip",
            "neigh",
            "replace",
            &a1.to_string(),
            "lladdr",
            &mac_str(mac1),
            "dev",
            "docker0",
            "nud",
            "reachable",
        ],
    );
    std::thread::sleep(Duration::from_millis(1100));
    let foreign: Mac = [0x02, 0x00, 0x5e, 0x00, 0x66, 0x66];
    let m = raw::marker("arp-foreign-sender-mac");
    let mut arp = raw::arp(ARP_REPLY, foreign, a1, p.gw_mac, GATEWAY);
    arp.extend_from_slice(&m);
    p.expect_dropped(
        "ARP reply for task1's address naming another MAC, to the host",
        &raw::ethernet(p.gw_mac, mac1, &[], ETH_P_ARP, &arp),
        &m,
        &docker0,
        SPOOFED_SOURCE,
    );
    let entry = neighbour(&host, "docker0", a1);
    if entry != Some(mac1) {
        p.fail(format!(
            "ARP reply naming another MAC: the host's entry for task1 is now {:?} (task1 is {})",
            entry.map(mac_str),
            mac_str(mac1)
        ));
        forget_neighbour(&host, "docker0", a1);
    }

    p.allowed_traffic_works("after the group-MAC, EtherType and ARP frames");
    p.report("frames from task1");
}

// ---- IPv6 --------------------------------------------------------------------------------

/// Turns IPv6 on for `dev` in `ns` (without duplicate address detection, so the address is
/// usable at once) and returns its link-local address and the interface's index.
fn enable_ipv6(ns: &str, dev: &str) -> (Ipv6Addr, u32) {
    ns_exec(
        ns,
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{dev}.accept_dad=0"),
        ],
    );
    ns_exec(
        ns,
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{dev}.disable_ipv6=0"),
        ],
    );
    let index: u32 = ns_exec(ns, &["cat", &format!("/sys/class/net/{dev}/ifindex")])
        .trim()
        .parse()
        .expect("an interface index");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = ns_exec(
            ns,
            &[
                "ip", "-j", "-6", "addr", "show", "dev", dev, "scope", "link",
            ],
        );
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j addr: {e}: {out}"));
        let usable = v[0]["addr_info"].as_array().and_then(|a| {
            a.iter()
                .find(|i| i.get("tentative").is_none())
                .and_then(|i| i["local"].as_str())
                .and_then(|s| s.parse().ok())
        });
        if let Some(addr) = usable {
            return (addr, index);
        }
        assert!(
            Instant::now() < deadline,
            "{dev} in {ns} has no usable link-local IPv6 address 5 s after enabling: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP listener of `ns` on `addr`:`port` (link-local on interface `index`).
fn listen_v6(ns: &str, addr: Ipv6Addr, index: u32, port: u16) -> TcpListener {
    in_netns(ns, move || {
        TcpListener::bind(SocketAddrV6::new(addr, port, 0, index))
            .unwrap_or_else(|e| panic!("listen on [{addr}%{index}]:{port}: {e}"))
    })
}

/// Link-local `addr`:`port` out of interface `index`.
fn v6(addr: Ipv6Addr, index: u32, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(addr, port, 0, index))
}

/// Waits (up to `COUNTED`) for `task`'s `reason` drops to exceed `before`.
fn counted_beyond(lab: &Lab, task: &str, reason: &str, before: u64) -> bool {
    let drops = || task_drops(&lab.stats(), task, reason);
    poll(COUNTED, Duration::from_millis(100), drops, |n| *n > before).is_ok()
}

/// A TCP connection over IPv6 from `ns` to `to` (`what`, for messages) must not connect within
/// `wait` and must be counted as `reason` on `task`; returns what went wrong.
fn expect_v6_dropped(
    lab: &Lab,
    what: &str,
    (ns, to): (&str, SocketAddr),
    (task, reason): (&str, &str),
    wait: Duration,
) -> Vec<String> {
    let mut fails = Vec::new();
    let before = task_drops(&lab.stats(), task, reason);
    if let Ok(s) = tcp_connect(ns, to, wait) {
        fails.push(format!(
            "{what}: {to} over IPv6 connected (from {:?})",
            s.local_addr()
        ));
    }
    if !counted_beyond(lab, task, reason, before) {
        fails.push(format!("{what}: not counted {reason} on {task}"));
    }
    fails
}

#[test]
fn ipv6_to_and_from_policed_tasks_is_dropped_where_ipv4_is_blocked() {
    let p = Policed::up("hf6");
    let (host, t1, t2) = (
        p.lab.host().to_owned(),
        p.ns(1).to_owned(),
        p.ns(2).to_owned(),
    );
    // Opened before IPv6 is on: they see every IPv6 frame that ever reaches task1 or task2.
    let cap1 = PacketSocket::open(&t1, "eth0");
    let cap2 = PacketSocket::open(&t2, "eth0");

    // The IPv4 connection is blocked by task1's egress rules.
    let before = task_drops(&p.lab.stats(), "task1", SG_EGRESS);
    let web = SocketAddrV4::new(p.addr[1], 80);
    match tcp_connect(&t1, web.into(), SILENCE) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        other => panic!("control: task1 -> task2:80 over IPv4 should time out, got {other:?}"),
    }
    assert!(
        counted_beyond(&p.lab, "task1", SG_EGRESS, before),
        "control: task1 -> task2:80 over IPv4 was not counted SG_EGRESS on task1"
    );

    let (ll2, idx2) = enable_ipv6(&t2, "eth0");
    let (_, idx1) = enable_ipv6(&t1, "eth0");
    let (_, idx_host) = enable_ipv6(&host, "docker0");
    let _web6 = listen_v6(&t2, ll2, idx2, 80);

    // task1, whose groups allow only tcp 9000 to the client's IPv4 address, to task2's port 80
    // over IPv6 while IPv4 is blocked: its egress rules have nothing for IPv6, counted on
    // task1. The host (not a task, not policed) to task2, whose groups take only tcp 80 from
    // 10.10.0.0/24: its ingress rules have nothing for IPv6, counted on task2.
    for (what, from, dropped) in [
        (
            "task1 -> task2:80",
            (t1.as_str(), v6(ll2, idx1, 80)),
            ("task1", SG_EGRESS),
        ),
        (
            "host -> task2:80",
            (host.as_str(), v6(ll2, idx_host, 80)),
            ("task2", SG_INGRESS),
        ),
    ] {
        for f in expect_v6_dropped(&p.lab, what, from, dropped, ANSWER) {
            p.fail(f);
        }
    }

    for (task, cap) in [("task1", &cap1), ("task2", &cap2)] {
        if let Some(f) = cap.wait_for(SILENCE, is_ipv6_tcp) {
            p.fail(format!(
                "an IPv6 TCP segment from {} reached {task}, whose groups allow no IPv6",
                mac_str(f[6..12].try_into().unwrap())
            ));
        }
    }

    p.allowed_traffic_works("with IPv6 on");
    p.report("IPv6 and policed tasks");
}

#[test]
fn ipv6_between_tasks_without_groups_works_under_allow_and_is_dropped_under_deny() {
    let lab = Lab::up("hfa", 2, &[]);
    lab.ecsnet_up();
    let (t1, t2) = (lab.task_ns(1).to_owned(), lab.task_ns(2).to_owned());
    let (ll2, idx2) = enable_ipv6(&t2, "eth0");
    let (_, idx1) = enable_ipv6(&t1, "eth0");
    let _web6 = listen_v6(&t2, ll2, idx2, 80);

    // No groups, defaultPolicy allow: today's bridge behaviour, IPv6 included.
    tcp_connect(&t1, v6(ll2, idx1, 80), ANSWER).unwrap_or_else(|e| {
        panic!("task1 -> [{ll2}]:80 over IPv6 without groups under allow: {e}")
    });
    let policed: u64 = drops(&lab.stats())
        .iter()
        .filter(|(k, _)| k.ends_with(SG_EGRESS) || k.ends_with(SG_INGRESS))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        policed, 0,
        "IPv6 was dropped for tasks without groups under allow"
    );

    // defaultPolicy deny polices every task without groups: all out, nothing in, IPv6 too.
    apply(&lab, "deny", |s| s["host"]["defaultPolicy"] = json!("deny"));
    let to_task2 = (t1.as_str(), v6(ll2, idx1, 80));
    let dropped = ("task2", SG_INGRESS);
    let fails = expect_v6_dropped(&lab, "task1 -> task2:80", to_task2, dropped, SILENCE);
    report("IPv6 under defaultPolicy deny", &fails);
}
