//! The IPv6 datapath through `BPF_PROG_TEST_RUN`, as a table of cases, each a few frames in a
//! row: what task A sends (`tc_task_ingress`, which tail-calls `tc_task_ipv6` and then
//! `tc_task_ipv6_flow`) and what the kernel delivers to it (`tc_task_egress`, which tail-calls
//! `tc_task_ipv6_to` under a policy). For each frame the exact verdict and, when it goes on,
//! the frame unchanged (IPv6 is never translated); after each case the exact drop counters and
//! the connection tables' entries. Security groups over IPv6, task to task by redirect, tracked
//! replies, TCP resets out of window, fragments hiding their ports, truncated headers,
//! extension-header chains, `ICMPv6` errors quoting tracked flows, neighbour discovery.
//!
//! In a test run the skb's device is the loopback (ifindex 1), registered as task A's
//! interface; task B is on `IFINDEX_B`. One datapath serves every case: its state maps are
//! emptied and its tasks and rules seeded afresh before each.
//!
//! Then real traffic in dual-stack labs: task to task over IPv6 goes by redirect, past the
//! bridge; a task with a security group is reachable over IPv6 only as its rules say, and the
//! replies of what it opens come back; no checksum error anywhere.

use std::{collections::HashMap as StdHashMap, net::Ipv6Addr};

use aya::{
    Pod,
    maps::{Map, MapData},
};
use ecsnet_tests::{
    counters::task_drops,
    csum_errors, ecsnet,
    world::{self, all, sg},
};

use ecsnet_common::{
    DropReason,
    ct::{CtEntry6, CtKey6, KIND_EAST_WEST, KIND_LOCAL, PROTO_TCP, PROTO_UDP},
    maps::{
        DropKey, FragKey6, FragPorts, HOOK_TC_EGRESS, HOOK_TC_INGRESS, MAP_CONFIG, MAP_DROPS,
        MAP_FRAGS6, MAP_TASKS, ROLE_TASK, TASK_IPV6, TaskInfo,
    },
    policy::{
        DIR_EGRESS, DIR_INGRESS, MAP_SG_LEVELS6, MAP_SG_PEERS6, MAP_SG_RULES, PeerKey6, PeerRules,
        RuleKey, level6_bit, mask_addr6, scope,
    },
};
use ecsnet_lab::fixture::{
    conntrack::Table,
    datapath::{Datapath, require_test_host},
    harness::{Lab, case_result, ns_exec, run_table},
    packet6::{
        ALL_NODES, EXT_DEST_OPTS, EXT_HOP_BY_HOP, EXT_ROUTING, ND_NEIGHBOR_SOLICIT,
        ND_OPT_SOURCE_LL, P6, SYN6_SEQ, solicited_node,
    },
    world::{
        IFINDEX_B, MAC_A, MAC_B, NO_SUCH_IFINDEX, Seed, TASK_A, TASK_B, TC_ACT_OK as OK,
        TC_ACT_REDIRECT as REDIRECT, TC_ACT_SHOT as SHOT, TEST_IFINDEX, config, world,
    },
};

/// Task A's and task B's IPv6 addresses.
const A6: [u8; 16] = v6(2);
const B6: [u8; 16] = v6(3);
/// A client outside, and a router on its way.
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const ROUTER6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const fn v6(last: u8) -> [u8; 16] {
    [
        0xfd, 0, 0x0e, 0xc5, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 0, last,
    ]
}

/// Policies. `WEB`: in, TCP/80 from anywhere; out, everything. `OUT_DNS`: out, UDP/53 to
/// `fd00:10::/32` only; nothing in. `V4_ONLY`: rules for IPv4 alone, so none for IPv6.
const WEB: u32 = 5;
const OUT_DNS: u32 = 6;
const V4_ONLY: u32 = 7;

/// The IPv6 rules of the policies above (rule sets 50 to 52).
fn rules6() -> Vec<Seed> {
    let peer = |policy, dir, len, addr, set, all| {
        [
            Seed::Levels6(scope(policy, dir), level6_bit(len)),
            Seed::Peer6(
                PeerKey6 {
                    scope: scope(policy, dir),
                    len,
                    _pad: [0; 3],
                    addr: mask_addr6(addr, len),
                },
                PeerRules { set, all },
            ),
        ]
    };
    let rule = |set, proto, port| {
        Seed::Rule(RuleKey {
            set,
            proto,
            len: 16,
            port,
        })
    };
    let mut s = Vec::new();
    s.extend(peer(WEB, DIR_INGRESS, 0, [0; 16], 50, 0));
    s.push(rule(50, PROTO_TCP, 80));
    s.extend(peer(WEB, DIR_EGRESS, 0, [0; 16], 51, 1));
    s.extend(peer(OUT_DNS, DIR_EGRESS, 32, CLIENT6, 52, 0));
    s.push(rule(52, PROTO_UDP, 53));
    s
}

/// Tasks A (on the test device) and B with their IPv6 addresses and these policies; B's MAC
/// as learned, or unknown.
fn seeds(a_policy: u32, b_policy: u32, b_mac_known: bool) -> Vec<Seed> {
    let mut w = world();
    let b_mac = if b_mac_known { MAC_B } else { [0; 6] };
    w.extend([
        Seed::Task(TASK_A, TEST_IFINDEX, MAC_A, a_policy),
        Seed::Iface(TEST_IFINDEX, TASK_A, ROLE_TASK),
        Seed::Task6(A6, TEST_IFINDEX),
        Seed::TaskFlags(TASK_A, TASK_IPV6),
        Seed::Task(TASK_B, IFINDEX_B, b_mac, b_policy),
        Seed::Iface(IFINDEX_B, TASK_B, ROLE_TASK),
        Seed::Task6(B6, IFINDEX_B),
        Seed::TaskFlags(TASK_B, TASK_IPV6),
    ]);
    w.extend(rules6());
    w
}

/// Which program a frame goes through.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// Sent by task A.
    FromA,
    /// Delivered to task A by the kernel.
    ToA,
}

impl Via {
    fn program(self) -> &'static str {
        match self {
            Via::FromA => "tc_task_ingress",
            Via::ToA => "tc_task_egress",
        }
    }
}

struct Case {
    what: &'static str,
    seeds: Vec<Seed>,
    /// Frames in order, each with its verdict.
    steps: Vec<(Via, Vec<u8>, u32)>,
    /// Every drop counter at the end: (ifindex, reason, hook) -> packets.
    drops: Vec<(u32, DropReason, u8, u64)>,
    /// The connection tables at the end: how many entries, of which kind.
    ct: Vec<u8>,
}

fn case(what: &'static str, (a, b): (u32, u32)) -> Case {
    Case {
        what,
        seeds: seeds(a, b, true),
        steps: Vec::new(),
        drops: Vec::new(),
        ct: Vec::new(),
    }
}

impl Case {
    fn step(mut self, via: Via, p: &P6, verdict: u32) -> Case {
        let p = match via {
            Via::FromA => p.clone().from_mac(MAC_A),
            Via::ToA => p.clone().to_mac(MAC_A),
        };
        self.steps.push((via, p.frame(), verdict));
        self
    }

    fn drop(mut self, ifindex: u32, reason: DropReason, hook: u8) -> Case {
        self.drops.push((ifindex, reason, hook, 1));
        self
    }

    /// The flow tracked at the end: both directions, of `kind`.
    fn tracked(mut self, kind: u8) -> Case {
        self.ct.extend([kind, kind]);
        self
    }

    fn b_mac_unknown(mut self, a: u32, b: u32) -> Case {
        self.seeds = seeds(a, b, false);
        self
    }
}

/// A frame for B's MAC.
fn a_to_b(p: P6) -> P6 {
    p.to_mac(MAC_B)
}

/// mDNS's multicast group (`ff02::fb`).
const MDNS6: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfb];

#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn cases() -> Vec<Case> {
    use DropReason::{Fragment, SgEgress, SgIngress, TcpOutOfWindow, Truncated};
    use Via::{FromA, ToA};
    let syn_to_b = |port| a_to_b(P6::syn6(A6, 40000, B6, port));
    let udp_to_b = |port| a_to_b(P6::udp6(A6, 5000, B6, port, b"0123456789abcdef"));
    let to_client = |port| P6::syn6(A6, 40000, CLIENT6, port);
    let client_syn = P6::syn6(CLIENT6, 50000, A6, 80);
    let client_tcp = |flags, seq, ack| P6::tcp6((CLIENT6, 443), (A6, 40000), flags, seq, ack);
    let dns = P6::udp6(A6, 5000, CLIENT6, 53, b"0123456789abcdef");
    let first = |p: P6| p.fragment(0, true, 9);
    let later = |p: P6| p.fragment(2, false, 9).cut_l4(8);
    let ptb = |about: &P6| P6::icmp6_error(ROUTER6, A6, (2, 0, 1280), about, 48);
    let ns = |src, dst| {
        P6::nd(
            src,
            dst,
            ND_NEIGHBOR_SOLICIT,
            A6,
            &[(ND_OPT_SOURCE_LL, MAC_B)],
        )
    };
    let a = TEST_IFINDEX;
    vec![
        // Task to task.
        case(
            "TCP SYN A -> B:80, B's rules allow it: redirected, tracked",
            (0, WEB),
        )
        .step(FromA, &syn_to_b(80), REDIRECT)
        .tracked(KIND_EAST_WEST),
        case(
            "TCP SYN A -> B:80, both without a policy: redirected all the same",
            (0, 0),
        )
        .step(FromA, &syn_to_b(80), REDIRECT)
        .tracked(KIND_EAST_WEST),
        case(
            "TCP SYN A -> B:22: B's rules drop it, counted on B",
            (0, WEB),
        )
        .step(FromA, &syn_to_b(22), SHOT)
        .drop(IFINDEX_B, SgIngress, HOOK_TC_INGRESS),
        case(
            "TCP SYN A -> B:80, A's rules have nothing for IPv6",
            (V4_ONLY, WEB),
        )
        .step(FromA, &syn_to_b(80), SHOT)
        .drop(a, SgEgress, HOOK_TC_INGRESS),
        case("echo A -> B: B's rules allow no ICMPv6", (WEB, WEB))
            .step(FromA, &a_to_b(P6::echo6(A6, B6)), SHOT)
            .drop(IFINDEX_B, SgIngress, HOOK_TC_INGRESS),
        case(
            "TCP SYN A -> B:80, B's MAC not learned: the kernel carries it",
            (0, WEB),
        )
        .b_mac_unknown(0, WEB)
        .step(FromA, &syn_to_b(80), OK),
        case(
            "TCP SYN A -> B:80, its frame not for B's MAC: the kernel carries it",
            (WEB, 0),
        )
        .step(FromA, &P6::syn6(A6, 40000, B6, 80), OK)
        .tracked(KIND_LOCAL),
        case(
            "UDP A -> B:80 twice: the second continues the tracked flow",
            (0, 0),
        )
        .step(FromA, &udp_to_b(80), REDIRECT)
        .step(FromA, &udp_to_b(80), REDIRECT)
        .tracked(KIND_EAST_WEST),
        // Extension headers and truncated headers.
        case(
            "SYN A -> B:22 behind three extension headers: still B's rules",
            (0, WEB),
        )
        .step(
            FromA,
            &syn_to_b(22)
                .ext(EXT_HOP_BY_HOP, 0)
                .ext(EXT_DEST_OPTS, 1)
                .ext(EXT_ROUTING, 2),
            SHOT,
        )
        .drop(IFINDEX_B, SgIngress, HOOK_TC_INGRESS),
        case(
            "SYN A -> B:80 behind three extension headers: redirected",
            (0, WEB),
        )
        .step(
            FromA,
            &syn_to_b(80)
                .ext(EXT_HOP_BY_HOP, 0)
                .ext(EXT_DEST_OPTS, 1)
                .ext(EXT_ROUTING, 2),
            REDIRECT,
        )
        .tracked(KIND_EAST_WEST),
        case(
            "TCP header cut to 12 bytes: TRUNCATED, ports never guessed",
            (0, WEB),
        )
        .step(FromA, &syn_to_b(80).cut_l4(12), SHOT)
        .drop(a, Truncated, HOOK_TC_INGRESS),
        case(
            "to a policed task, TCP header cut to 12 bytes: TRUNCATED",
            (WEB, 0),
        )
        .step(ToA, &client_syn.clone().cut_l4(12), SHOT)
        .drop(a, Truncated, HOOK_TC_EGRESS),
        // Replies and resets.
        case(
            "a client's SYN to A:80, A's SYN-ACK, the client's ACK",
            (WEB, 0),
        )
        .step(ToA, &client_syn, OK)
        .step(
            FromA,
            &P6::tcp6((A6, 80), (CLIENT6, 50000), 0x12, 7000, SYN6_SEQ + 1),
            OK,
        )
        .step(
            ToA,
            &P6::tcp6((CLIENT6, 50000), (A6, 80), 0x10, SYN6_SEQ + 1, 7001),
            OK,
        )
        .tracked(KIND_LOCAL),
        case("a client's SYN to A:22: A's rules drop it", (WEB, 0))
            .step(ToA, &P6::syn6(CLIENT6, 50000, A6, 22), SHOT)
            .drop(a, SgIngress, HOOK_TC_EGRESS),
        case(
            "A's SYN out, the SYN-ACK back passes A's ingress rules",
            (WEB, 0),
        )
        .step(FromA, &to_client(443), OK)
        .step(ToA, &client_tcp(0x12, 9000, SYN6_SEQ + 1), OK)
        .tracked(KIND_LOCAL),
        case(
            "A's SYN out, a RST back that acknowledges the wrong byte",
            (WEB, 0),
        )
        .step(FromA, &to_client(443), OK)
        .step(ToA, &client_tcp(0x14, 0, SYN6_SEQ + 7), SHOT)
        .drop(a, TcpOutOfWindow, HOOK_TC_EGRESS)
        .tracked(KIND_LOCAL),
        case("A's SYN out, the RST that refuses it", (WEB, 0))
            .step(FromA, &to_client(443), OK)
            .step(ToA, &client_tcp(0x14, 0, SYN6_SEQ + 1), OK)
            .tracked(KIND_LOCAL),
        case(
            "an unsolicited SYN-ACK from a client: mid-flow, A's rules alone",
            (WEB, 0),
        )
        .step(ToA, &client_tcp(0x12, 9000, 1), SHOT)
        .drop(a, SgIngress, HOOK_TC_EGRESS),
        case(
            "A's DNS query out, allowed to fd00:10::/32, tracked",
            (OUT_DNS, 0),
        )
        .step(FromA, &dns, OK)
        .tracked(KIND_LOCAL),
        case(
            "A's SYN out to port 443: A's rules allow only DNS",
            (OUT_DNS, 0),
        )
        .step(FromA, &to_client(443), SHOT)
        .drop(a, SgEgress, HOOK_TC_INGRESS),
        // Fragments.
        case(
            "a first fragment to B:53 rejected, its later fragment dropped",
            (0, WEB),
        )
        .step(FromA, &first(udp_to_b(53)), SHOT)
        .step(FromA, &later(udp_to_b(53)), SHOT)
        .drop(IFINDEX_B, SgIngress, HOOK_TC_INGRESS)
        .drop(a, Fragment, HOOK_TC_INGRESS),
        case(
            "a later fragment from a policed task without its first",
            (WEB, 0),
        )
        .step(
            FromA,
            &later(P6::udp6(A6, 5000, CLIENT6, 53, b"01234567")),
            SHOT,
        )
        .drop(a, Fragment, HOOK_TC_INGRESS),
        case(
            "a later fragment to a policed task without its first",
            (WEB, 0),
        )
        .step(
            ToA,
            &later(P6::udp6(CLIENT6, 53, A6, 80, b"01234567")),
            SHOT,
        )
        .drop(a, Fragment, HOOK_TC_EGRESS),
        case(
            "a first fragment allowed, its later fragment too",
            (OUT_DNS, 0),
        )
        .step(FromA, &first(dns.clone()), OK)
        .step(FromA, &later(dns.clone()), OK)
        .tracked(KIND_LOCAL),
        case(
            "a first fragment to A (UDP/80) refused, its later fragment dropped",
            (WEB, 0),
        )
        .step(ToA, &first(P6::udp6(CLIENT6, 53, A6, 80, b"0123")), SHOT)
        .step(ToA, &later(P6::udp6(CLIENT6, 53, A6, 80, b"0123")), SHOT)
        .drop(a, SgIngress, HOOK_TC_EGRESS)
        .drop(a, Fragment, HOOK_TC_EGRESS),
        case(
            "a first fragment of a SYN to A:80 allowed in, its later fragment too",
            (WEB, 0),
        )
        .step(ToA, &first(client_syn.clone()), OK)
        .step(ToA, &later(client_syn.clone()), OK)
        .tracked(KIND_LOCAL),
        case("an atomic fragment is an ordinary packet", (0, WEB))
            .step(FromA, &syn_to_b(80).fragment(0, false, 9), REDIRECT)
            .tracked(KIND_EAST_WEST),
        // ICMPv6 errors.
        case("packet too big quoting A's tracked flow passes", (WEB, 0))
            .step(FromA, &to_client(443), OK)
            .step(ToA, &ptb(&to_client(443)), OK)
            .tracked(KIND_LOCAL),
        case(
            "packet too big quoting a flow nobody tracks: A's rules",
            (WEB, 0),
        )
        .step(ToA, &ptb(&to_client(444)), SHOT)
        .drop(a, SgIngress, HOOK_TC_EGRESS),
        case(
            "packet too big quoting a reply of A's tracked flow passes",
            (WEB, 0),
        )
        .step(ToA, &client_syn, OK)
        .step(
            ToA,
            &ptb(&P6::tcp6((A6, 80), (CLIENT6, 50000), 0x12, 7000, 1)),
            OK,
        )
        .tracked(KIND_LOCAL),
        case(
            "an ICMPv6 error from A about a tracked A -> B flow goes into B",
            (0, WEB),
        )
        .step(FromA, &syn_to_b(80), REDIRECT)
        .step(
            FromA,
            &a_to_b(P6::icmp6_error(A6, B6, (1, 4, 0), &syn_to_b(80), 48)),
            REDIRECT,
        )
        .tracked(KIND_EAST_WEST),
        // Neighbour discovery.
        case(
            "neighbour solicitation to a policed task, hop limit 255",
            (V4_ONLY, 0),
        )
        .step(ToA, &ns(B6, solicited_node(A6)).hop_limit(255), OK),
        case(
            "neighbour solicitation with hop limit 64: no ND, the rules",
            (V4_ONLY, 0),
        )
        .step(ToA, &ns(B6, solicited_node(A6)), SHOT)
        .drop(a, SgIngress, HOOK_TC_EGRESS),
        case(
            "UDP from a policed task to a multicast group: its egress rules pass it, nothing tracked",
            (WEB, 0),
        )
        .step(FromA, &P6::udp6(A6, 5353, MDNS6, 5353, b"mdns"), OK),
        case(
            "UDP to a multicast group that a policed task's egress rules refuse",
            (V4_ONLY, 0),
        )
        .step(FromA, &P6::udp6(A6, 5353, MDNS6, 5353, b"mdns"), SHOT)
        .drop(a, SgEgress, HOOK_TC_INGRESS),
        case(
            "a policed task's own solicitation, hop limit 255",
            (V4_ONLY, 0),
        )
        .step(
            FromA,
            &P6::nd(
                A6,
                ALL_NODES,
                ND_NEIGHBOR_SOLICIT,
                B6,
                &[(ND_OPT_SOURCE_LL, MAC_A)],
            )
            .hop_limit(255),
            OK,
        ),
    ]
}

/// Empties the maps a case changes.
fn reset(dp: &mut Datapath) {
    dp.clear_ct6().unwrap();
    let frags: Vec<FragKey6> = dp
        .hash::<FragKey6, FragPorts>(MAP_FRAGS6)
        .unwrap()
        .into_keys()
        .collect();
    dp.remove::<FragKey6, FragPorts>(MAP_FRAGS6, &frags)
        .unwrap();
    let drops: Vec<DropKey> = dp.drops().unwrap().into_keys().collect();
    dp.remove::<DropKey, u64>(MAP_DROPS, &drops).unwrap();
    let peers: Vec<PeerKey6> = dp
        .hash::<PeerKey6, PeerRules>(MAP_SG_PEERS6)
        .unwrap()
        .into_keys()
        .collect();
    dp.remove::<PeerKey6, PeerRules>(MAP_SG_PEERS6, &peers)
        .unwrap();
    let levels: Vec<u32> = dp
        .hash::<u32, u32>(MAP_SG_LEVELS6)
        .unwrap()
        .into_keys()
        .collect();
    dp.remove::<u32, u32>(MAP_SG_LEVELS6, &levels).unwrap();
    let tasks: Vec<u32> = dp
        .hash::<u32, TaskInfo>(MAP_TASKS)
        .unwrap()
        .into_keys()
        .collect();
    dp.remove::<u32, TaskInfo>(MAP_TASKS, &tasks).unwrap();
}

fn check(dp: &mut Datapath, c: &Case) -> Result<(), String> {
    reset(dp);
    dp.seed(&c.seeds).unwrap();
    let mut errs = Vec::new();
    for (i, (via, frame, want)) in c.steps.iter().enumerate() {
        let r = dp
            .test_run(via.program(), frame, 1)
            .expect("BPF_PROG_TEST_RUN");
        if r.verdict != *want {
            errs.push(format!(
                "step {i} ({via:?}): verdict {} (want {want})",
                r.verdict
            ));
        }
        if r.verdict != SHOT && r.output != *frame {
            errs.push(format!("step {i} ({via:?}): the frame was changed"));
        }
    }
    let got: StdHashMap<DropKey, u64> = dp
        .drops()
        .unwrap()
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .collect();
    let want: StdHashMap<DropKey, u64> = c
        .drops
        .iter()
        .map(|&(ifindex, reason, hook, n)| {
            let key = DropKey {
                ifindex,
                reason: reason as u8,
                hook,
                _pad: [0; 2],
            };
            (key, n)
        })
        .collect();
    if got != want {
        let show = |m: &StdHashMap<DropKey, u64>| -> Vec<String> {
            let mut v: Vec<String> = m
                .iter()
                .map(|(k, n)| {
                    format!(
                        "{}@{}/{}x{n}",
                        DropReason::name_of(k.reason),
                        k.ifindex,
                        k.hook
                    )
                })
                .collect();
            v.sort();
            v
        };
        errs.push(format!("drops {:?} (want {:?})", show(&got), show(&want)));
    }
    let mut kinds: Vec<u8> = Table::BOTH
        .iter()
        .flat_map(|t| dp.hash::<CtKey6, CtEntry6>(t.map6()).unwrap().into_values())
        .map(|e| e.kind)
        .collect();
    kinds.sort_unstable();
    if kinds != c.ct {
        errs.push(format!("CT6 entries of kinds {kinds:?} (want {:?})", c.ct));
    }
    case_result(&errs)
}

#[test]
fn ipv6_is_tracked_policed_and_forwarded_like_ipv4() {
    require_test_host();
    let mut dp = Datapath::load().expect("the datapath object loads");
    dp.set_first(MAP_CONFIG, config(NO_SUCH_IFINDEX)).unwrap();
    dp.load_programs(&["tc_task_ingress", "tc_task_egress"])
        .unwrap();
    dp.load_tail_called()
        .expect("the tail-called programs load");
    let cases = cases();
    let dp = std::cell::RefCell::new(dp);
    run_table(
        "IPv6 datapath",
        &cases,
        |c| c.what.to_owned(),
        |c| check(&mut dp.borrow_mut(), c),
    );
}

/// Task `task`'s IPv6 address in `lab`.
fn addr6(lab: &Lab, task: usize) -> Ipv6Addr {
    lab.status.tasks[task - 1]
        .address6
        .unwrap_or_else(|| panic!("task{task} has no IPv6 address: {:?}", lab.status))
}

/// Packets the host end of task `task`'s veth pair transmitted: what the bridge (the kernel's
/// path) sent into the task. A redirect into the task's end skips it.
fn host_veth_tx(lab: &Lab, task: usize) -> u64 {
    let dev = &lab.status.tasks[task - 1].interface;
    let path = format!("/sys/class/net/{dev}/statistics/tx_packets");
    ns_exec(lab.host(), &["cat", &path])
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The checksum errors the kernel of `ns` counted: IPv4's and TCP's (`/proc/net/snmp`, TCP's
/// covering IPv6 too) and `Icmp6InCsumErrors`, `Udp6InCsumErrors`.
fn all_csum_errors(ns: &str) -> u64 {
    let snmp6 = ns_exec(ns, &["cat", "/proc/net/snmp6"]);
    let v6: u64 = snmp6
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(k, _)| k.ends_with("InCsumErrors"))
        .map(|(k, v)| {
            v.trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{k}: {e}"))
        })
        .sum();
    csum_errors(ns) + v6
}

#[test]
fn task_to_task_ipv6_goes_by_redirect() {
    const N: u32 = 20;
    // The lab starts an echo server on each published container port.
    let lab = Lab::up_v6(
        "dp6r",
        2,
        &["1:8080:80", "2:8081:80", "2:5353:53/udp"],
        "nat",
    );
    lab.ecsnet_up();
    let (t1, t2) = (lab.task_ns(1), lab.task_ns(2));
    let to2 = |port| format!("[{}]:{port}", addr6(&lab, 2));
    // The datapath learns task 2's MAC from its IPv4, and neighbour discovery settles (on the
    // kernel's path, as plumbing).
    let v4 = format!("{}:80", lab.status.tasks[0].address);
    assert_eq!(
        lab.probe(t2, "tcp", &v4, 1, 10)["echoed"],
        1,
        "task 2's IPv4"
    );
    assert_eq!(
        lab.probe(t1, "tcp", &to2(80), 1, 10)["echoed"],
        1,
        "IPv6 warm-up"
    );
    let stats_before = lab.stats();
    let tx_before = host_veth_tx(&lab, 2);
    assert_eq!(lab.probe(t1, "tcp", &to2(80), N, 100)["echoed"], N);
    assert_eq!(lab.probe(t1, "udp", &to2(53), N, 100)["echoed"], N);
    let tx = host_veth_tx(&lab, 2) - tx_before;
    let other = |s: &ecsnet_tests::Stats| {
        s.tasks
            .iter()
            .find(|t| t.name == "task2")
            .expect("task2 in stats")
            .other
            .packets
    };
    let into2 = other(&lab.stats()) - other(&stats_before);
    println!("into task 2: {into2} IPv6 packets counted by ecsnet, {tx} sent by the bridge");
    // N TCP connections (a handful of segments each) and N datagrams reached task 2 and were
    // answered; the bridge sent it at most stray neighbour discovery.
    assert!(
        into2 >= u64::from(2 * N),
        "task 2 counted {into2} IPv6 packets, fewer than the {} it answered",
        2 * N
    );
    assert!(
        tx < u64::from(N),
        "the bridge sent {tx} packets into task 2: IPv6 task to task took the kernel's path"
    );
    for ns in [lab.host(), t1, t2] {
        assert_eq!(all_csum_errors(ns), 0, "checksum errors in {ns}");
    }
}

/// A pinned hash map of `lab`'s instance.
fn pinned<K: Pod, V: Pod>(lab: &Lab, map: &str) -> aya::maps::HashMap<MapData, K, V> {
    let path = format!("/sys/fs/bpf/ecsnet/{}/maps/{map}", lab.name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    aya::maps::HashMap::try_from(Map::HashMap(data)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Writes IPv6 rules for `policy` straight into the pinned maps (user space writes them from
/// `Ipv6Ranges` in another part of this work): inbound TCP/80 from anywhere, outbound
/// everything. Rule sets far above what `apply` hands out.
fn seed_ipv6_rules(lab: &Lab, policy: u32) {
    const IN_SET: u32 = 0x0fff_0001;
    const OUT_SET: u32 = 0x0fff_0002;
    let mut levels = pinned::<u32, u32>(lab, MAP_SG_LEVELS6);
    let mut peers = pinned::<PeerKey6, PeerRules>(lab, MAP_SG_PEERS6);
    let mut rules = pinned::<RuleKey, u32>(lab, MAP_SG_RULES);
    for (dir, set, all) in [(DIR_INGRESS, IN_SET, 0), (DIR_EGRESS, OUT_SET, 1)] {
        let scope = scope(policy, dir);
        levels
            .insert(&scope, &level6_bit(0), 0)
            .expect("SG_LEVELS6");
        let key = PeerKey6 {
            scope,
            len: 0,
            _pad: [0; 3],
            addr: [0; 16],
        };
        peers
            .insert(&key, &PeerRules { set, all }, 0)
            .expect("SG_PEERS6");
    }
    let http = RuleKey {
        set: IN_SET,
        proto: PROTO_TCP,
        len: 16,
        port: 80,
    };
    rules.insert(&http, &1, 0).expect("SG_RULES");
}

/// `ecsnet lab probe` from `ns` that must fail: nothing comes back.
fn probe_fails(ns: &str, proto: &str, target: &str) {
    let out = ecsnet(&[
        "--netns", ns, "lab", "probe", proto, target, "--count", "1", "--size", "10", "--json",
    ]);
    assert!(
        !out.status.success(),
        "{proto} {target} from {ns} came back: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_policed_task_is_reachable_over_ipv6_only_as_its_rules_say() {
    let lab = Lab::up_v6(
        "dp6p",
        2,
        &["1:8080:80", "2:8081:80", "2:5353:53/udp"],
        "nat",
    );
    lab.ecsnet_up();
    let (t1, t2) = (lab.task_ns(1), lab.task_ns(2));
    let id = "sg-0d60000000000001";
    let open = sg(id, "open", &[all(&["0.0.0.0/0"])], &[all(&["0.0.0.0/0"])]);
    world::apply(
        &lab,
        "dp6-sg.json",
        &world::state_with_groups(&lab, &[open], &[&[], &[id]]),
    );
    // Both MACs learned from IPv4, which the group allows.
    let v4 = |i: usize| format!("{}:80", lab.status.tasks[i - 1].address);
    assert_eq!(lab.probe(t2, "tcp", &v4(1), 1, 10)["echoed"], 1);
    assert_eq!(lab.probe(t1, "tcp", &v4(2), 1, 10)["echoed"], 1);
    let (to1, to2) = (
        |port| format!("[{}]:{port}", addr6(&lab, 1)),
        |port| format!("[{}]:{port}", addr6(&lab, 2)),
    );

    // The group has no IPv6 rules: task 2's IPv6 goes nowhere, either way.
    let before = lab.stats();
    probe_fails(t1, "--tcp", &to2(80));
    probe_fails(t2, "--tcp", &to1(80));
    let moved = |before: &ecsnet_tests::Stats, reason| {
        task_drops(&lab.stats(), "task2", reason) - task_drops(before, "task2", reason)
    };
    assert!(
        moved(&before, "SG_INGRESS") >= 1,
        "task 1's SYN refused on task 2"
    );
    assert!(moved(&before, "SG_EGRESS") >= 1, "task 2's SYN refused");

    // IPv6 rules: in, TCP/80; out, everything. Replies of what it opens come back.
    let tasks = pinned::<u32, TaskInfo>(&lab, MAP_TASKS);
    let a2 = u32::from_ne_bytes(lab.status.tasks[1].address.octets());
    let policy = tasks.get(&a2, 0).expect("task 2 in TASKS").policy;
    assert_ne!(policy, 0, "task 2 has a policy");
    seed_ipv6_rules(&lab, policy);
    assert_eq!(lab.probe(t1, "tcp", &to2(80), 3, 100)["echoed"], 3);
    assert_eq!(lab.probe(t2, "tcp", &to1(80), 3, 100)["echoed"], 3);
    let before = lab.stats();
    probe_fails(t1, "--udp", &to2(53));
    assert!(
        moved(&before, "SG_INGRESS") > 0,
        "task 1's datagram to task 2's port 53 refused on task 2"
    );
    for ns in [lab.host(), t1, t2] {
        assert_eq!(all_csum_errors(ns), 0, "checksum errors in {ns}");
    }
}
