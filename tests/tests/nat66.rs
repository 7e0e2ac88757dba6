//! NAT66 by ecsnet: published ports over IPv6, translated on the uplink (`tc_uplink_ingress`, which
//! tail-calls `tc_uplink_ipv6`) and their replies reverse-translated out of the uplink
//! (`tc_task_ingress` -> `tc_task_ipv6` -> `tc_task_ipv6_flow`).
//!
//! Fixtures through `BPF_PROG_TEST_RUN`, with exact verdicts and output bytes (the expected
//! frames are built afresh with their own checksums, so a checksum update gone wrong shows as
//! different bytes): the translated SYN and datagram, the reverse-translated SYN-ACK, a SYN the
//! task's rules reject, a port not published, neighbour discovery. They run in a namespace of
//! their own with a dummy uplink and a permanent neighbour, so the reply's FIB lookup finds the
//! uplink and its MACs.
//!
//! Then real traffic in a dual-stack lab: the client's TCP and UDP to `[fd00:10:10::1]:8080`
//! echo, the task sees the client's real address, Docker's ip6tables DNAT rule does not count
//! them, `CT6` holds an inbound flow, and no namespace counts a checksum error.

use std::{collections::HashMap as StdHashMap, os::fd::AsFd, process::Command};

use aya::maps::{Map, MapData};
use ecsnet_common::{
    DropReason,
    ct::{CtEntry6, CtKey6, KIND_HAIRPIN, KIND_INBOUND, KIND_MASQUERADE, PROTO_TCP, PROTO_UDP},
    maps::{
        CONFIG6_MASQUERADE, Config6, DropKey, HOOK_TC_INGRESS, HOOK_XDP, MAP_CONFIG, MAP_CONFIG6,
        MAP_CT6, MAP_CT6_NEW, MAP_DROPS, MAP_NAT_CONFIG, MAP_NAT_USE6, NatConfig, NatUseKey6,
        ROLE_TASK, TASK_IPV6,
    },
    policy::{DIR_EGRESS, DIR_INGRESS, PeerKey6, PeerRules, RuleKey, level6_bit, scope},
};
use ecsnet_lab::fixture::{
    conntrack::Table,
    datapath::{Datapath, require_test_host},
    harness::{Lab, case_result, ns_exec, run_table, unique},
    packet6::{
        EXT_DEST_OPTS, ND_NEIGHBOR_ADVERT, ND_NEIGHBOR_SOLICIT, ND_OPT_SOURCE_LL, P6, PROTO_ICMPV6,
        SYN6_SEQ, solicited_node,
    },
    world::{
        BRIDGE_MAC, MAC_A, ROUTER_MAC, Seed, TASK_A, TC_ACT_OK as OK, TC_ACT_REDIRECT as REDIRECT,
        TC_ACT_SHOT as SHOT, TEST_IFINDEX, UPLINK_MAC, XDP_DROP, XDP_PASS, config,
    },
};
use ecsnet_tests::{csum_errors, csum6_errors};

/// The host's uplink address, the bridge's, a client on the uplink's network.
const HOST6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const BRIDGE6: [u8; 16] = [0xfd, 0, 0x0e, 0xc5, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// A router on the client's path, which sends `ICMPv6` errors.
const ROUTER6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe];
/// A remote beyond the uplink that task A reaches, masqueraded: the same neighbour as the
/// client (the namespace's only one).
const REMOTE6: [u8; 16] = CLIENT6;
/// Task A's source port towards the remote, and the remote's port.
const A_PORT: u16 = 40001;
const REMOTE_PORT: u16 = 443;
/// An echo request's identifier (`P6::echo6`), and `ICMPv6` echo reply.
const ECHO_ID: u16 = 7;
const ECHO_REPLY: u8 = 129;
/// A link-local address on the bridge's link.
const LINK_LOCAL6: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
/// `ICMPv6` destination unreachable, port unreachable (RFC 4443 §3.1).
const DEST_UNREACHABLE: u8 = 1;
const PORT_UNREACHABLE: u8 = 4;
/// `ICMPv6` packet too big (RFC 4443 §3.2).
const PACKET_TOO_BIG: u8 = 2;
/// Task A's address.
const A6: [u8; 16] = [0xfd, 0, 0x0e, 0xc5, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const CLIENT_PORT: u16 = 40000;

/// Policies: `WEB` lets TCP/80 in from anywhere; `NONE_IN` has no inbound rule at all;
/// `OUT_ONLY` lets all TCP out to anywhere and nothing in.
const WEB: u32 = 5;
const NONE_IN: u32 = 6;
const OUT_ONLY: u32 = 7;

/// Task A on the test device with `policy` and learned MAC `mac`, its IPv6 address, two published ports (8080/tcp
/// to A:80, 5353/udp to A:53), and `WEB`'s rule.
fn seeds(policy: u32, mac: [u8; 6]) -> Vec<Seed> {
    vec![
        Seed::Task(TASK_A, TEST_IFINDEX, mac, policy),
        Seed::Iface(TEST_IFINDEX, TASK_A, ROLE_TASK),
        Seed::Task6(A6, TEST_IFINDEX),
        Seed::TaskFlags(TASK_A, TASK_IPV6),
        Seed::Port6(PROTO_TCP, 8080, A6, 80),
        Seed::Port6(PROTO_UDP, 5353, A6, 53),
    ]
    .into_iter()
    .chain(anywhere(scope(WEB, DIR_INGRESS), (60, 16, 80)))
    .chain(anywhere(scope(OUT_ONLY, DIR_EGRESS), (61, 0, 0)))
    .collect()
}

/// Rule set `set` for `scope`, from or to anywhere in IPv6 (`::/0`): TCP to the port block
/// `port`/`len` (a prefix of the 16-bit port).
fn anywhere(scope: u32, (set, len, port): (u32, u8, u16)) -> [Seed; 3] {
    [
        Seed::Levels6(scope, level6_bit(0)),
        Seed::Peer6(
            PeerKey6 {
                scope,
                len: 0,
                _pad: [0; 3],
                addr: [0; 16],
            },
            PeerRules { set, all: 0 },
        ),
        Seed::Rule(RuleKey {
            set,
            proto: PROTO_TCP,
            len,
            port,
        }),
    ]
}

/// Where a frame goes in.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Arrives on the uplink (the test device is the uplink).
    Uplink,
    /// Sent by task A (the test device is A's interface; the uplink is the namespace's veth).
    FromA,
    /// Arrives on the uplink, seen by XDP first.
    Xdp,
}

/// Frame in, verdict, frame out (None: unchanged).
type Step = (Via, Vec<u8>, u32, Option<Vec<u8>>);

struct Case {
    what: &'static str,
    policy: u32,
    /// Task A's MAC as learned; zero: not yet.
    mac: [u8; 6],
    /// `CONFIG6`'s flags: masquerade (`nat` mode) unless `routed`.
    flags: u8,
    /// `NAT_CONFIG`'s share of ports per task and destination; 0: no limit.
    task_ports: u32,
    steps: Vec<Step>,
    drops: Vec<DropKey>,
    /// The `CT6` keys at the end, with their kinds.
    ct: Vec<(CtKey6, u8)>,
}

fn case(what: &'static str, policy: u32) -> Case {
    Case {
        what,
        policy,
        mac: MAC_A,
        flags: CONFIG6_MASQUERADE,
        task_ports: 0,
        steps: Vec::new(),
        drops: Vec::new(),
        ct: Vec::new(),
    }
}

impl Case {
    fn step(mut self, via: Via, p: &P6, verdict: u32, out: Option<&P6>) -> Case {
        let p = match via {
            Via::Uplink | Via::Xdp => p.clone().from_mac(ROUTER_MAC).to_mac(UPLINK_MAC),
            Via::FromA => p.clone().from_mac(MAC_A).to_mac(BRIDGE_MAC),
        };
        self.steps
            .push((via, p.frame(), verdict, out.map(P6::frame)));
        self
    }

    fn mac_unknown(mut self) -> Case {
        self.mac = [0; 6];
        self
    }

    fn drop(mut self, reason: DropReason, hook: u8) -> Case {
        self.drops.push(DropKey {
            ifindex: TEST_IFINDEX,
            reason: reason as u8,
            hook,
            _pad: [0; 2],
        });
        self
    }

    fn routed(mut self) -> Case {
        self.flags = 0;
        self
    }

    fn task_ports(mut self, n: u32) -> Case {
        self.task_ports = n;
        self
    }

    /// A flow of `kind` tracked at the end: its two keys, each (source, destination).
    fn flow(mut self, kind: u8, proto: u8, keys: [(End, End); 2]) -> Case {
        self.ct
            .extend(keys.map(|(src, dst)| (key6(proto, src, dst), kind)));
        self
    }

    /// An inbound flow from the client to published `host_port`, the task's `task_port`.
    fn tracked(self, proto: u8, (host_port, task_port): (u16, u16)) -> Case {
        let client = (CLIENT6, CLIENT_PORT);
        self.flow(
            KIND_INBOUND,
            proto,
            [(client, (HOST6, host_port)), ((A6, task_port), client)],
        )
    }

    /// A flow task A opened from `port` to the remote's `remote_port`, masqueraded as the host
    /// from the same port (an echo's identifier: the port at the other end is 0).
    fn masqueraded(self, proto: u8, (port, remote_port): (u16, u16)) -> Case {
        let remote = (REMOTE6, remote_port);
        self.flow(
            KIND_MASQUERADE,
            proto,
            [((A6, port), remote), (remote, (HOST6, port))],
        )
    }
}

/// An address and a port (host order).
type End = ([u8; 16], u16);

/// A `CT6` key, the ports in host order.
fn key6(proto: u8, (s, sp): End, (d, dp): End) -> CtKey6 {
    CtKey6 {
        saddr: s,
        daddr: d,
        sport: sp.to_be(),
        dport: dp.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// What the kernel's forwarding would make of a frame: hop limit one less.
fn forwarded(p: P6, smac: [u8; 6], dmac: [u8; 6]) -> P6 {
    p.hop_limit(63).from_mac(smac).to_mac(dmac)
}

#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn cases(uplink_mac: [u8; 6]) -> Vec<Case> {
    use Via::{FromA, Uplink, Xdp};
    let syn = P6::syn6(CLIENT6, CLIENT_PORT, HOST6, 8080);
    let synack = |src| {
        P6::tcp6(
            (src, 80),
            (CLIENT6, CLIENT_PORT),
            0x12,
            0x2000_0001,
            SYN6_SEQ + 1,
        )
    };
    // The SYN-ACK as it left the host (hop limit 63), quoted in an error about it: the
    // quote as the task sent it is the same from the task's address and port.
    let left = |src, port| {
        P6::tcp6(
            (src, port),
            (CLIENT6, CLIENT_PORT),
            0x12,
            0x2000_0001,
            SYN6_SEQ + 1,
        )
        .hop_limit(63)
    };
    let too_big =
        |to, about: &P6| P6::icmp6_error(ROUTER6, to, (PACKET_TOO_BIG, 0, 1280), about, 60);
    let syn_in = forwarded(P6::syn6(CLIENT6, CLIENT_PORT, A6, 80), BRIDGE_MAC, MAC_A);
    let ack = |dst, port| {
        P6::tcp6(
            (CLIENT6, CLIENT_PORT),
            (dst, port),
            0x10,
            SYN6_SEQ + 1,
            0x2000_0002,
        )
    };
    let udp = |dst, port| P6::udp6(CLIENT6, CLIENT_PORT, dst, port, b"hello over NAT66");
    vec![
        case(
            "a SYN to a published port is DNATed into the task; its SYN-ACK goes back as the host",
            WEB,
        )
        .step(
            Uplink,
            &syn,
            REDIRECT,
            Some(&forwarded(
                P6::syn6(CLIENT6, CLIENT_PORT, A6, 80),
                BRIDGE_MAC,
                MAC_A,
            )),
        )
        .step(
            FromA,
            &synack(A6),
            REDIRECT,
            Some(&forwarded(
                P6::tcp6(
                    (HOST6, 8080),
                    (CLIENT6, CLIENT_PORT),
                    0x12,
                    0x2000_0001,
                    SYN6_SEQ + 1,
                ),
                uplink_mac,
                ROUTER_MAC,
            )),
        )
        .tracked(PROTO_TCP, (8080, 80)),
        case(
            "a packet-too-big about a reply goes into the task, translated back",
            WEB,
        )
        .step(Uplink, &syn, REDIRECT, Some(&syn_in))
        .step(
            Uplink,
            &too_big(HOST6, &left(HOST6, 8080)),
            REDIRECT,
            Some(&forwarded(too_big(A6, &left(A6, 80)), BRIDGE_MAC, MAC_A)),
        )
        .tracked(PROTO_TCP, (8080, 80)),
        case(
            "a packet-too-big about no tracked flow goes to the kernel untouched",
            WEB,
        )
        .step(Uplink, &too_big(HOST6, &left(HOST6, 8080)), OK, None),
        case("a datagram to a published UDP port, without a policy", 0)
            .step(
                Uplink,
                &udp(HOST6, 5353),
                REDIRECT,
                Some(&forwarded(
                    P6::udp6(CLIENT6, CLIENT_PORT, A6, 53, b"hello over NAT66"),
                    BRIDGE_MAC,
                    MAC_A,
                )),
            )
            .tracked(PROTO_UDP, (5353, 53)),
        case("the client's ACK after its SYN is translated too", WEB)
            .step(Uplink, &syn, REDIRECT, Some(&syn_in))
            .step(
                Uplink,
                &ack(HOST6, 8080),
                REDIRECT,
                Some(&forwarded(ack(A6, 80), BRIDGE_MAC, MAC_A)),
            )
            .tracked(PROTO_TCP, (8080, 80)),
        case(
            "task A's MAC not learned yet: the kernel carries the translated SYN",
            WEB,
        )
        .mac_unknown()
        .step(
            Uplink,
            &syn,
            OK,
            Some(
                &P6::syn6(CLIENT6, CLIENT_PORT, A6, 80)
                    .from_mac(ROUTER_MAC)
                    .to_mac(UPLINK_MAC),
            ),
        )
        .tracked(PROTO_TCP, (8080, 80)),
        case(
            "hop limit 1: untouched and untracked, for the kernel's time-exceeded error",
            WEB,
        )
        .step(Uplink, &syn.clone().hop_limit(1), OK, None),
        case(
            "a SYN the task's rules reject: dropped on the task, nothing tracked",
            NONE_IN,
        )
        .step(Uplink, &syn, SHOT, None)
        .drop(DropReason::SgIngress, HOOK_TC_INGRESS),
        case(
            "XDP drops a SYN the task's rules reject, before tc sees it",
            NONE_IN,
        )
        .step(Xdp, &syn, XDP_DROP, None)
        .drop(DropReason::SgIngress, HOOK_XDP),
        case("XDP leaves a SYN the task's rules allow to tc", WEB)
            .step(Xdp, &syn, XDP_PASS, None)
            .step(Uplink, &syn, REDIRECT, Some(&syn_in))
            .tracked(PROTO_TCP, (8080, 80)),
        case("XDP leaves a SYN behind an extension header to tc", NONE_IN).step(
            Xdp,
            &syn.clone().ext(EXT_DEST_OPTS, 0),
            XDP_PASS,
            None,
        ),
        case("a port nobody published passes untouched", WEB).step(
            Uplink,
            &P6::syn6(CLIENT6, CLIENT_PORT, HOST6, 9999),
            OK,
            None,
        ),
        case("a segment of no tracked flow passes untouched", WEB).step(
            Uplink,
            &synack(HOST6),
            OK,
            None,
        ),
        case("neighbour discovery on the uplink passes untouched", WEB)
            .step(
                Uplink,
                &P6::nd(
                    CLIENT6,
                    solicited_node(HOST6),
                    ND_NEIGHBOR_SOLICIT,
                    HOST6,
                    &[(ND_OPT_SOURCE_LL, ROUTER_MAC)],
                )
                .hop_limit(255),
                OK,
                None,
            )
            .step(
                Uplink,
                &P6::nd(CLIENT6, HOST6, ND_NEIGHBOR_ADVERT, CLIENT6, &[]).hop_limit(255),
                OK,
                None,
            ),
    ]
    .into_iter()
    .chain(masquerade_cases(uplink_mac))
    .chain(errors_out_cases(uplink_mac))
    .chain(hairpin_cases())
    .collect()
}

/// Task A reaching its own port published on the host's address, past the kernel's DNAT.
fn hairpin_cases() -> Vec<Case> {
    use Via::FromA;
    let into_a = |p: P6| forwarded(p, BRIDGE_MAC, MAC_A);
    let synack = |src| P6::tcp6(src, (A6, A_PORT), 0x12, 0x4000_0001, SYN6_SEQ + 1);
    let hairpin = case(
        "task A reaching its own published port goes back into it from the bridge's address, and its SYN-ACK as the host's",
        0,
    )
    .step(
        FromA,
        &P6::syn6(A6, A_PORT, HOST6, 8080),
        REDIRECT,
        Some(&into_a(P6::syn6(BRIDGE6, A_PORT, A6, 80))),
    )
    .step(
        FromA,
        &P6::tcp6((A6, 80), (BRIDGE6, A_PORT), 0x12, 0x4000_0001, SYN6_SEQ + 1),
        REDIRECT,
        Some(&into_a(synack((HOST6, 8080)))),
    )
    .flow(
        KIND_HAIRPIN,
        PROTO_TCP,
        [
            ((A6, A_PORT), (HOST6, 8080)),
            ((A6, 80), (BRIDGE6, A_PORT)),
        ],
    );
    vec![
        hairpin,
        case(
            "task A's ingress rules reject its own published port: dropped, counted on it, nothing tracked",
            OUT_ONLY,
        )
        .step(FromA, &P6::syn6(A6, A_PORT, HOST6, 8080), SHOT, None)
        .drop(DropReason::SgIngress, HOOK_TC_INGRESS),
    ]
}

/// `ICMPv6` errors task A sends about packets of translated flows it received: out as the
/// host, about the packet as the host received it.
fn errors_out_cases(uplink_mac: [u8; 6]) -> Vec<Case> {
    use Via::{FromA, Uplink};
    let out = |p: P6| forwarded(p, uplink_mac, ROUTER_MAC);
    let into_a = |p: P6| forwarded(p, BRIDGE_MAC, MAC_A);
    let unreachable = |from, to, about: &P6| {
        P6::icmp6_error(from, to, (DEST_UNREACHABLE, PORT_UNREACHABLE, 0), about, 80)
    };
    let request = |dst, port| P6::udp6(CLIENT6, CLIENT_PORT, dst, port, b"hello over NAT66");
    let query = |src| P6::udp6(src, A_PORT, REMOTE6, 53, b"query");
    let syn = |src| P6::syn6(src, A_PORT, REMOTE6, REMOTE_PORT);
    let synack = remote_synack;
    let answer = |dst| P6::udp6(REMOTE6, 53, dst, A_PORT, b"answer");
    vec![
        case(
            "a port unreachable task A sends about a datagram to a published port leaves as the host",
            0,
        )
        .step(Uplink, &request(HOST6, 5353), REDIRECT, Some(&into_a(request(A6, 53))))
        .step(
            FromA,
            &unreachable(A6, CLIENT6, &request(A6, 53).hop_limit(63)),
            REDIRECT,
            Some(&out(unreachable(
                HOST6,
                CLIENT6,
                &request(HOST6, 5353).hop_limit(63),
            ))),
        )
        .tracked(PROTO_UDP, (5353, 53)),
        case(
            "a port unreachable task A sends about a masqueraded flow's answer leaves as the host",
            0,
        )
        .step(FromA, &query(A6), REDIRECT, Some(&out(query(HOST6))))
        .step(Uplink, &answer(HOST6), REDIRECT, Some(&into_a(answer(A6))))
        .step(
            FromA,
            &unreachable(A6, REMOTE6, &answer(A6).hop_limit(63)),
            REDIRECT,
            Some(&out(unreachable(HOST6, REMOTE6, &answer(HOST6).hop_limit(63)))),
        )
        .masqueraded(PROTO_UDP, (A_PORT, 53)),
        case(
            "an error task A sends about a masqueraded flow to another address: its egress rules judge it, untranslated",
            OUT_ONLY,
        )
        .step(FromA, &syn(A6), REDIRECT, Some(&out(syn(HOST6))))
        .step(Uplink, &synack(HOST6), REDIRECT, Some(&into_a(synack(A6))))
        .step(
            FromA,
            &unreachable(A6, ROUTER6, &synack(A6).hop_limit(63)),
            SHOT,
            None,
        )
        .drop(DropReason::SgEgress, HOOK_TC_INGRESS)
        .masqueraded(PROTO_TCP, (A_PORT, REMOTE_PORT)),
        case(
            "an error task A forges, quoting the client's side of a published flow, goes on untranslated",
            0,
        )
        .step(Uplink, &request(HOST6, 5353), REDIRECT, Some(&into_a(request(A6, 53))))
        .step(
            FromA,
            &unreachable(
                A6,
                CLIENT6,
                &P6::udp6(HOST6, 5353, CLIENT6, CLIENT_PORT, b"forged"),
            ),
            OK,
            None,
        )
        .tracked(PROTO_UDP, (5353, 53)),
    ]
}

/// The remote's SYN-ACK to `dst`:`A_PORT` (the host's address, or task A's once translated).
fn remote_synack(dst: [u8; 16]) -> P6 {
    P6::tcp6(
        (REMOTE6, REMOTE_PORT),
        (dst, A_PORT),
        0x12,
        0x3000_0001,
        SYN6_SEQ + 1,
    )
}

/// Task A's new flows out of the host, masqueraded by `tc_task_ipv6_nat`, and what comes back.
fn masquerade_cases(uplink_mac: [u8; 6]) -> Vec<Case> {
    use Via::{FromA, Uplink};
    let syn = |src, port| P6::syn6(src, port, REMOTE6, REMOTE_PORT);
    let out = |p: P6| forwarded(p, uplink_mac, ROUTER_MAC);
    let into_a = |p: P6| forwarded(p, BRIDGE_MAC, MAC_A);
    let synack = remote_synack;
    let echo_reply = |dst| {
        P6::icmp6(
            REMOTE6,
            dst,
            ECHO_REPLY,
            0,
            &[0, 7, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8],
        )
    };
    let too_big =
        |to, about: &P6| P6::icmp6_error(ROUTER6, to, (PACKET_TOO_BIG, 0, 1280), about, 60);
    vec![
        case(
            "a task's SYN out of the host leaves as the host from its own port; the SYN-ACK comes back into it",
            0,
        )
        .step(FromA, &syn(A6, A_PORT), REDIRECT, Some(&out(syn(HOST6, A_PORT))))
        .step(Uplink, &synack(HOST6), REDIRECT, Some(&into_a(synack(A6))))
        .masqueraded(PROTO_TCP, (A_PORT, REMOTE_PORT)),
        case(
            "a packet-too-big from a router about a masqueraded segment goes into the task, translated back",
            0,
        )
        .step(FromA, &syn(A6, A_PORT), REDIRECT, Some(&out(syn(HOST6, A_PORT))))
        .step(
            Uplink,
            &too_big(HOST6, &syn(HOST6, A_PORT).hop_limit(63)),
            REDIRECT,
            Some(&into_a(too_big(A6, &syn(A6, A_PORT).hop_limit(63)))),
        )
        .masqueraded(PROTO_TCP, (A_PORT, REMOTE_PORT)),
        case(
            "an echo request leaves as the host with its identifier; the reply and an error quoting the request come back",
            0,
        )
        .step(
            FromA,
            &P6::echo6(A6, REMOTE6),
            REDIRECT,
            Some(&out(P6::echo6(HOST6, REMOTE6))),
        )
        .step(Uplink, &echo_reply(HOST6), REDIRECT, Some(&into_a(echo_reply(A6))))
        .step(
            Uplink,
            &too_big(HOST6, &P6::echo6(HOST6, REMOTE6).hop_limit(63)),
            REDIRECT,
            Some(&into_a(too_big(A6, &P6::echo6(A6, REMOTE6).hop_limit(63)))),
        )
        .masqueraded(PROTO_ICMPV6, (ECHO_ID, 0)),
        case(
            "a task's share of ports towards a destination used up: its next flow there is refused",
            0,
        )
        .task_ports(1)
        .step(FromA, &syn(A6, A_PORT), REDIRECT, Some(&out(syn(HOST6, A_PORT))))
        .step(FromA, &syn(A6, A_PORT + 1), SHOT, None)
        .drop(DropReason::NatTaskPortLimit, HOOK_TC_INGRESS)
        .masqueraded(PROTO_TCP, (A_PORT, REMOTE_PORT)),
        case(
            "a SYN the task's egress rules reject is dropped, not masqueraded",
            NONE_IN,
        )
        .step(FromA, &syn(A6, A_PORT), SHOT, None)
        .drop(DropReason::SgEgress, HOOK_TC_INGRESS),
        case(
            "routed mode: a task's SYN out of the host keeps its address, on the kernel's path",
            0,
        )
        .routed()
        .step(FromA, &syn(A6, A_PORT), OK, None),
        case(
            "hop limit 1: untranslated, for the kernel's time-exceeded error",
            0,
        )
        .step(FromA, &syn(A6, A_PORT).hop_limit(1), OK, None),
        case("to a link-local address: never masqueraded", 0).step(
            FromA,
            &P6::syn6(A6, A_PORT, LINK_LOCAL6, REMOTE_PORT),
            OK,
            None,
        ),
    ]
}

/// A namespace of this test's own with a dummy uplink holding `HOST6`, the client as a
/// permanent neighbour behind it, and forwarding on: the FIB lookup of a reply finds the
/// uplink. Removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> (Netns, u32, [u8; 6]) {
        let name = unique("n66fx");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        let n = ns.name.as_str();
        let mac = "52:54:00:00:00:01";
        // A veth pair: the machine may have no dummy driver.
        ip(&[
            "-n", n, "link", "add", "up0", "address", mac, "type", "veth", "peer", "name", "up1",
        ]);
        ip(&["-n", n, "link", "set", "up1", "up"]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "set", "up0", "up"]);
        ns_exec(n, &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            "fd00:10:10::1/64",
            "dev",
            "up0",
            "nodad",
        ]);
        ip(&[
            "-n",
            n,
            "neigh",
            "replace",
            "fd00:10:10::2",
            "lladdr",
            "52:54:00:00:00:fe",
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
        let line = ip(&["-n", n, "-o", "link", "show", "up0"]);
        let ifindex = line
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex in {line:?}"));
        (ns, ifindex, UPLINK_MAC)
    }

    /// Moves this thread into the namespace (a test runs on a thread of its own).
    fn enter(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("the netns");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn reset(dp: &mut Datapath) {
    dp.clear_ct6().unwrap();
    let drops: Vec<DropKey> = dp.drops().unwrap().into_keys().collect();
    dp.remove::<DropKey, u64>(MAP_DROPS, &drops).unwrap();
    let counts: Vec<NatUseKey6> = dp
        .hash::<NatUseKey6, u64>(MAP_NAT_USE6)
        .unwrap()
        .into_keys()
        .collect();
    dp.remove::<NatUseKey6, u64>(MAP_NAT_USE6, &counts).unwrap();
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn check(dp: &mut Datapath, uplink: u32, c: &Case) -> Result<(), String> {
    reset(dp);
    dp.seed(&seeds(c.policy, c.mac)).unwrap();
    dp.set_first(
        MAP_CONFIG6,
        Config6 {
            uplink_ipv6: HOST6,
            bridge_ipv6: BRIDGE6,
            bridge_prefix6: 64,
            flags: c.flags,
            _pad: [0; 2],
        },
    )
    .unwrap();
    dp.set_first(
        MAP_NAT_CONFIG,
        NatConfig {
            task_ports: c.task_ports,
        },
    )
    .unwrap();
    let mut errs = Vec::new();
    for (i, (via, frame, want, out)) in c.steps.iter().enumerate() {
        let (prog, cfg) = match via {
            Via::Uplink => ("tc_uplink_ingress", config(TEST_IFINDEX)),
            Via::FromA => ("tc_task_ingress", config(uplink)),
            Via::Xdp => ("xdp_uplink", config(TEST_IFINDEX)),
        };
        dp.set_first(MAP_CONFIG, cfg).unwrap();
        let r = dp.test_run(prog, frame, 1).expect("BPF_PROG_TEST_RUN");
        if r.verdict != *want {
            errs.push(format!(
                "step {i} ({via:?}): verdict {} (want {want})",
                r.verdict
            ));
        }
        let want_out = out.as_ref().unwrap_or(frame);
        // XDP never changes a frame; tc's dropped ones are not compared.
        if !matches!(via, Via::Xdp) && r.verdict != SHOT && r.output != *want_out {
            errs.push(format!(
                "step {i} ({via:?}): frame out\n    {}\n  want\n    {}",
                hex(&r.output),
                hex(want_out)
            ));
        }
    }
    // Every drop counter, each 1.
    let got = dp.drops().unwrap();
    let want: StdHashMap<DropKey, u64> = c.drops.iter().map(|k| (*k, 1)).collect();
    if got != want {
        errs.push(format!("drops {got:?} (want {want:?})"));
    }
    let mut ct: Vec<(CtKey6, u8)> = Table::BOTH
        .iter()
        .flat_map(|t| dp.hash::<CtKey6, CtEntry6>(t.map6()).unwrap())
        .map(|(k, e)| (k, e.kind))
        .collect();
    let mut want_ct = c.ct.clone();
    let order = |(k, _): &(CtKey6, u8)| (k.saddr, k.daddr, k.sport, k.dport, k.proto);
    ct.sort_by_key(order);
    want_ct.sort_by_key(order);
    if ct != want_ct {
        errs.push(format!("CT6 {ct:?}\n  want {want_ct:?}"));
    }
    case_result(&errs)
}

#[test]
fn published_ports_over_ipv6_are_translated_by_ecsnet() {
    require_test_host();
    let (ns, uplink, uplink_mac) = Netns::new();
    ns.enter();
    let mut dp = Datapath::load().expect("the datapath object loads");
    dp.set_first(MAP_CONFIG, config(TEST_IFINDEX)).unwrap();
    dp.load_programs(&["tc_task_ingress", "tc_uplink_ingress", "xdp_uplink"])
        .unwrap();
    dp.load_tail_called()
        .expect("the tail-called programs load");
    let cases = cases(uplink_mac);
    let dp = std::cell::RefCell::new(dp);
    run_table(
        "NAT66",
        &cases,
        |c| c.what.to_owned(),
        |c| check(&mut dp.borrow_mut(), uplink, c),
    );
}

/// Task `i`'s IPv6 address in `lab`.
fn addr6(lab: &Lab, i: usize) -> std::net::Ipv6Addr {
    lab.status.tasks[i - 1]
        .address6
        .unwrap_or_else(|| panic!("task{i} has no IPv6 address: {:?}", lab.status))
}

#[test]
fn a_client_reaches_a_published_port_over_ipv6_through_ecsnet() {
    const N: u32 = 10;
    let lab = Lab::up_v6("n66a", 1, &["1:8080:80", "1:8080:80/udp"], "nat");
    lab.ecsnet_up();
    let (host, client, t1) = (lab.host(), lab.client(), lab.task_ns(1));
    let dnat_before = docker_dnat6(host);
    let target = "[fd00:10:10::1]:8080";
    assert_eq!(
        lab.probe(client, "tcp", target, N, 100)["echoed"],
        N,
        "TCP over NAT66"
    );
    assert_eq!(
        lab.probe(client, "udp", target, N, 100)["echoed"],
        N,
        "UDP over NAT66"
    );
    assert_eq!(
        docker_dnat6(host),
        dnat_before,
        "Docker's ip6tables DNAT rules counted packets: the kernel translated them, not ecsnet"
    );
    let stats = lab.settled_stats();
    let inbound = stats
        .conntrack
        .ipv6
        .flows
        .get("inbound")
        .copied()
        .unwrap_or(0);
    assert!(
        inbound >= 1,
        "no inbound flow in CT6: {:?}",
        stats.conntrack.ipv6
    );
    // The task answered the client's own address: the reply direction of an inbound flow goes
    // from the task's port 80 to the client.
    let client6 = lab
        .status
        .client
        .address6
        .expect("the client's IPv6 address")
        .octets();
    let task6 = addr6(&lab, 1).octets();
    let replies: Vec<(CtKey6, CtEntry6)> = [MAP_CT6, MAP_CT6_NEW]
        .iter()
        .flat_map(|m| ct6(&lab, m))
        .filter(|(k, e)| e.kind == KIND_INBOUND && k.saddr == task6 && k.sport == 80u16.to_be())
        .collect();
    assert!(
        !replies.is_empty(),
        "no inbound flow from the task's port 80 in CT6"
    );
    for (k, e) in &replies {
        assert_eq!(
            k.daddr, client6,
            "the task saw another address than the client's"
        );
        assert_eq!(e.nat_saddr, HOST6_LAB, "the reply leaves as the host");
        assert_eq!(
            e.nat_sport,
            8080u16.to_be(),
            "the reply leaves from the host port"
        );
    }
    for ns in [host, client, t1] {
        assert_eq!(csum_errors(ns), 0, "IPv4/TCP checksum errors in {ns}");
        for (k, n) in csum6_errors(ns) {
            assert_eq!(n, 0, "{k} in {ns}");
        }
    }
}

/// The lab host's uplink address.
const HOST6_LAB: [u8; 16] = HOST6;

/// Every entry of `lab`'s pinned connection table `map` (`CT6` or `CT6_NEW`).
fn ct6(lab: &Lab, map: &str) -> Vec<(CtKey6, CtEntry6)> {
    let path = format!("/sys/fs/bpf/ecsnet/{}/maps/{map}", lab.name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let m = match map {
        MAP_CT6_NEW => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    };
    let h = aya::maps::HashMap::<MapData, CtKey6, CtEntry6>::try_from(m)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    h.iter().map(|r| r.expect("a CT6 entry")).collect()
}

/// Packets Docker's ip6tables DNAT rules (nat/DOCKER, `DNAT`) counted.
fn docker_dnat6(host: &str) -> u64 {
    nat6_rule_packets(host, "DOCKER", "DNAT")
}

/// Packets the ip6tables rules of `target` in nat chain `chain` counted (there must be one).
fn nat6_rule_packets(host: &str, chain: &str, target: &str) -> u64 {
    let out = ns_exec(
        host,
        &["ip6tables", "-t", "nat", "-L", chain, "-v", "-x", "-n"],
    );
    let rules: Vec<u64> = out
        .lines()
        .filter(|l| l.contains(target))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        !rules.is_empty(),
        "no {target} rule in ip6tables nat/{chain}:\n{out}"
    );
    rules.iter().sum()
}

#[test]
fn tasks_reach_the_outside_and_published_ports_over_ipv6_through_ecsnet() {
    const N: u32 = 10;
    let lab = Lab::up_v6("n66m", 2, &["1:8080:80"], "nat");
    lab.ecsnet_up();
    let (host, client, t1, t2) = (lab.host(), lab.client(), lab.task_ns(1), lab.task_ns(2));
    let masquerade_before = nat6_rule_packets(host, "POSTROUTING", "MASQUERADE");
    let dnat_before = docker_dnat6(host);
    // Hairpin: task 1 to its own published port, task 2 to task 1's, on the host's address.
    for ns in [t1, t2] {
        assert_eq!(
            lab.probe(ns, "tcp", "[fd00:10:10::1]:8080", N, 100)["echoed"],
            N,
            "hairpin over IPv6 from {ns}"
        );
    }
    assert_eq!(
        docker_dnat6(host),
        dnat_before,
        "Docker's ip6tables DNAT rules counted the hairpin: the kernel translated it, not ecsnet"
    );
    let hairpins = [MAP_CT6, MAP_CT6_NEW]
        .iter()
        .flat_map(|m| ct6(&lab, m))
        .filter(|(k, e)| e.kind == KIND_HAIRPIN && k.daddr == HOST6_LAB)
        .count();
    assert!(
        hairpins >= 2,
        "{hairpins} hairpin flows to the host's address in CT6"
    );
    let client6 = lab
        .status
        .client
        .address6
        .expect("the client's IPv6 address");
    let target = format!("[{client6}]:{}", lab.status.client.echo_port);
    for proto in ["tcp", "udp"] {
        assert_eq!(
            lab.probe(t1, proto, &target, N, 100)["echoed"],
            N,
            "{proto} from the task to the outside over IPv6"
        );
    }
    let ping = ns_exec(
        t1,
        &[
            "ping",
            "-6",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &client6.to_string(),
        ],
    );
    assert!(ping.contains(" 0% packet loss"), "ping over IPv6: {ping}");
    assert_eq!(
        nat6_rule_packets(host, "POSTROUTING", "MASQUERADE"),
        masquerade_before,
        "Docker's ip6tables MASQUERADE rule counted packets: the kernel masqueraded, not ecsnet"
    );
    // The task's flows left as the host: TCP, UDP and the echo, each from the task's address.
    let task6 = addr6(&lab, 1).octets();
    let mut kinds: Vec<u8> = [MAP_CT6, MAP_CT6_NEW]
        .iter()
        .flat_map(|m| ct6(&lab, m))
        .filter(|(k, e)| {
            e.kind == KIND_MASQUERADE && k.saddr == task6 && k.daddr == client6.octets()
        })
        .map(|(k, e)| {
            assert_eq!(
                e.nat_saddr, HOST6_LAB,
                "a masqueraded flow leaves as the host"
            );
            k.proto
        })
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(
        kinds,
        [PROTO_TCP, PROTO_UDP, PROTO_ICMPV6],
        "the protocols of the task's masqueraded flows in CT6"
    );
    for ns in [host, client, t1, t2] {
        for (k, n) in csum6_errors(ns) {
            assert_eq!(n, 0, "{k} in {ns}");
        }
    }
}
