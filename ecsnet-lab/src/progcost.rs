//! Per-packet cost of the datapath's programs, from `BPF_PROG_TEST_RUN` with repeat, on copies of
//! the datapath loaded in memory (nothing attached, nothing pinned). Two measurements:
//!
//! - [`policy_cost`] answers one question of SPEC §6: does a policy check cost the same with 1
//!   rule and with 10,000, over IPv4 and over IPv6? Two copies are loaded: one whose tasks (one
//!   policed over IPv4, one over IPv6) have a single inbound rule each, one whose tasks are in
//!   `groups` security groups holding `rules` rules of their family in all (the same rule among
//!   them). Each case is a packet that makes the program do a full policy check and leaves no
//!   state behind (a SYN XDP lets pass, a SYN XDP or tc drops; over IPv6, a SYN from a task
//!   without a policy to one whose MAC is not learned yet, which the kernel carries untracked,
//!   or which the receiver's rules drop), so every repeat costs the same. IPv6 probes only the
//!   prefix lengths its rules use: a third copy, whose IPv6 task has one rule at each length,
//!   makes as many probes as the many-rule one with a handful of rules. Rounds alternate between
//!   the copies; the medians are reported.
//! - [`program_cost`] gives every program's cost for the packets it sees most: a data segment of
//!   an established flow (and the SYN that opens an inbound one), with flow logging on as
//!   `ecsnet up` leaves it. Each case loads its own copy and puts its flow in the tables by
//!   running the flow's first packet through the datapath, as a real host would.
//!
//! A test run with repeat runs the program again and again on the same skb: what one run writes
//! into the packet, the next run sees (a segment repeated after DNAT is no longer the flow's, and
//! its TTL runs out). Cases whose program leaves the packet as it was are measured that way, and
//! the packet is checked to come out unchanged. Cases whose program rewrites it are measured as
//! `repeat` test runs of one run each, every one on a fresh copy of the packet, their times
//! averaged; their names say so. Such a time is not comparable with a repeated one: the system
//! call between two runs cools the caches and the clock reads are not shared out. Where both
//! can be measured (a packet left unchanged) the single runs came out 25 to 65 ns slower.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use ecsnet_common::{
    ct::{CtEntry, CtEntry6, CtKey, CtKey6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN},
    flow::{
        FlowKey, FlowKey6, FlowState, FlowStats, FlowStats6, MAP_FLOW_STATE, MAP_FLOWS, MAP_FLOWS6,
    },
    maps::{
        MAP_CONFIG, MAP_CT, MAP_CT_NEW, MAP_CT6, MAP_CT6_NEW, ROLE_TASK, ROLE_UPLINK, TASK_IPV6,
    },
    policy::{
        DIR_INGRESS, MAP_SG_LEVELS6, MAP_SG_PEERS, MAP_SG_PEERS6, MAP_SG_RULES, PEER_LEVELS6,
        PeerKey, PeerKey6, PeerRules, RuleKey, level6_bit, scope,
    },
};
use serde::Serialize;

use ecsnet::{
    flowlog,
    plan::sg::Compiled,
    state::{
        self, IpPermission, Ipv6Range, PortFamily, PortMapping, Protocol, SecurityGroup, State,
        Task,
    },
};

use crate::fixture::{
    datapath::{Datapath, DatapathError, Run},
    packet::P,
    packet6::P6,
    world::{
        BRIDGE, BRIDGE_MAC, CLIENT, HOST, IFINDEX_A, IFINDEX_B, MAC_A, MAC_B, NO_SUCH_IFINDEX,
        ROUTER_MAC, Seed, TASK_A, TASK_B, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_IFINDEX,
        UPLINK_MAC, XDP_DROP, XDP_PASS, config,
    },
};

/// The client's port of the inbound flows.
const CLIENT_PORT: u16 = 51000;
/// Payload of a data segment: a full one at MTU 1500.
const MSS: usize = 1448;
/// Events per second per CPU the datapath may send to `monitor`: `ecsnet up`'s default.
const MONITOR_RATE: u32 = 1000;
/// Host port published to container port 80, which the rule allows from the client's /24.
const ALLOWED_PORT: u16 = 8080;
/// Host port published to container port 81, which no rule allows.
const REJECTED_PORT: u16 = 8081;
/// Task B's IPv6 address (unique local, as `fixed-cidr-v6` might give it): B is the task the
/// IPv6 rules police.
const TASK_B6: [u8; 16] = Ipv6Addr::new(0xfd00, 0xec5, 0x17, 0, 0, 0, 0, 3).octets();
/// Task C, without a policy, sends the IPv6 cases' packets from the test device.
const TASK_C: [u8; 4] = [172, 17, 0, 4];
const TASK_C6: [u8; 16] = Ipv6Addr::new(0xfd00, 0xec5, 0x17, 0, 0, 0, 0, 4).octets();
const MAC_C: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x04];
/// Task B's ports over IPv6: the rules allow 80 from anywhere, and nothing else to 81.
const ALLOWED_PORT6: u16 = 80;
const REJECTED_PORT6: u16 = 81;

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("the generated state is not valid: {0}")]
    Invalid(#[from] ecsnet::state::StateError),
    #[error("the generated security groups do not compile: {0}")]
    Compile(#[from] ecsnet::plan::sg::TooBig),
    #[error("{case}: the program returned {got}, expected {want}; the test set-up is wrong")]
    Verdict {
        case: &'static str,
        got: u32,
        want: u32,
    },
    #[error(
        "{0}: the program rewrote the packet, so repeated runs on it would not measure the same \
         packet"
    )]
    Rewritten(&'static str),
    #[error("{0}: the program left {1} behind, so repeated runs would not cost the same")]
    StateLeft(&'static str, &'static str),
    #[error("--rules must be at least 1 and --groups between 1 and --rules")]
    Usage,
}

/// One case's cost with one rule and with many.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseCost {
    /// `IPv4` or `IPv6`: the packet's, and the rules'.
    pub family: &'static str,
    pub program: &'static str,
    pub case: &'static str,
    /// The verdict both copies returned (checked against what the case expects).
    pub verdict: u32,
    /// Median over rounds of the kernel's average run time, nanoseconds.
    pub one_rule_ns: u64,
    pub many_rules_ns: u64,
    /// many / one.
    pub ratio: f64,
    /// IPv6: the same packet in a copy with 17 rules, one at each prefix length the datapath
    /// probes ([`every_level_state6`]): the many-rule copy's probes with a handful of rules.
    pub every_level_ns: Option<u64>,
    /// many / every level: what the number of rules costs, the probes being the same.
    pub every_level_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCost {
    pub rules: usize,
    pub groups: usize,
    pub repeat: u32,
    pub rounds: usize,
    /// Map entries the many-rule policy compiled to: `SG_PEERS`, and `SG_RULES` (the rule sets'
    /// port blocks, shared by both families).
    pub peer_entries: usize,
    pub rule_entries: usize,
    /// `SG_PEERS6` entries of the many-rule copy, as read back from its map.
    pub peer_entries6: usize,
    /// The prefix lengths of the many-rule IPv6 copy's `SG_LEVELS6` mask for the receiver's
    /// inbound rules, longest first, as read back from its map: the probes an IPv6 check may make.
    pub levels6: Vec<u8>,
    /// The same for the one-rule copy.
    pub one_rule_levels6: Vec<u8>,
    /// The same for the copy of [`every_level_state6`].
    pub every_level_levels6: Vec<u8>,
    pub cases: Vec<CaseCost>,
}

/// The state of a host whose one task is in `groups` groups with `rules` inbound rules in all,
/// among them "tcp 80 from 10.10.0.0/24". The others vary protocol, port ranges and prefix
/// lengths, as real groups do.
pub fn generated_state(rules: usize, groups: usize) -> State {
    let mut sgs = empty_groups("sg-", groups);
    let perm = |proto: &str, from: i32, to: i32, cidr: String| {
        IpPermission::from_cidr(proto, Some((from, to)), cidr)
    };
    let port = |p: usize| i32::try_from(p).expect("a port fits in an i32");
    sgs[0]
        .ip_permissions
        .push(perm("tcp", 80, 80, "10.10.0.0/24".to_owned()));
    for i in 1..rules {
        let byte = |b: usize| u8::try_from(b % 256).expect("below 256");
        let (hi, lo) = (byte(i / 256), byte(i));
        let p = match i % 4 {
            0 => perm(
                "tcp",
                port(1000 + i % 3000),
                port(1000 + i % 3000),
                format!("10.{}.{hi}.{lo}/32", 100 + i % 50),
            ),
            1 => perm(
                "udp",
                2000,
                port(2000 + i % 100),
                format!("192.168.{lo}.0/24"),
            ),
            2 => perm("tcp", 443, 443, format!("100.{}.{lo}.0/24", 64 + hi % 64)),
            _ => perm("icmp", 8, -1, format!("172.{}.0.0/16", 16 + hi % 16)),
        };
        sgs[i % groups].ip_permissions.push(p);
    }
    let task = Task {
        port_mappings: [(ALLOWED_PORT, 80), (REJECTED_PORT, 81)]
            .map(|(host_port, container_port)| PortMapping {
                container_port,
                host_port,
                protocol: Protocol::Tcp,
                host_ip: PortFamily::Both,
            })
            .to_vec(),
        ..Task::new("task", TASK_A.into())
    };
    member_of_all(task, sgs)
}

/// A host whose one task, `task`, is in every group of `sgs`.
fn member_of_all(task: Task, sgs: Vec<SecurityGroup>) -> State {
    let task = Task {
        security_groups: sgs.iter().map(|g| g.group_id.clone()).collect(),
        ..task
    };
    State {
        host: state::Host::default(),
        security_groups: sgs,
        tasks: vec![task],
    }
}

/// `n` security groups without rules, named `{prefix}0000` on.
fn empty_groups(prefix: &str, n: usize) -> Vec<SecurityGroup> {
    (0..n)
        .map(|g| SecurityGroup {
            group_id: format!("{prefix}{g:04}"),
            group_name: None,
            ip_permissions: Vec::new(),
            ip_permissions_egress: Vec::new(),
        })
        .collect()
}

/// A rule for `proto`, ports `ports` (None: all), from one IPv6 CIDR.
fn perm6(proto: &str, ports: Option<(i32, i32)>, cidr: String) -> IpPermission {
    IpPermission {
        ip_ranges: Vec::new(),
        ipv6_ranges: vec![Ipv6Range {
            cidr_ipv6: cidr,
            description: None,
        }],
        ..IpPermission::from_cidr(proto, ports, String::new())
    }
}

/// `addr` with only its first `len` bits, written as a CIDR (`2001:db8::/32`).
fn cidr6(addr: u128, len: u8) -> String {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    format!("{}/{len}", Ipv6Addr::from(addr & mask))
}

/// Lengths of the generated IPv6 rules that are neither the common ones (/128, /64, /56, /48)
/// nor the rare ones that expand to 128 blocks (/57, /121): with them every length the datapath
/// may probe is in use (`/44` and `/60` expand to 16 blocks of /48 and /64).
const OTHER_LENGTHS6: [u8; 14] = [8, 16, 24, 32, 40, 44, 60, 72, 80, 88, 96, 104, 112, 120];

/// The `i`th (from 1) generated IPv6 rule: a peer somewhere in `2000::/4` (never in
/// `fd00::/8`, where the tasks are), mostly hosts (/128: TCP single ports), subnets (/64: UDP
/// port ranges) and sites (/56: TCP 443; /48: `ICMPv6` echo), the rest (TCP 8000-8999) of every
/// other length from /8 to /120, and one in 400 each a /57 or a /121, which expand to 128
/// blocks each.
fn rule6(i: usize) -> IpPermission {
    let port = |p: usize| i32::try_from(p).expect("a port fits in an i32");
    let (proto, ports, len) = match i % 20 {
        0..=5 => (
            "tcp",
            Some((port(1000 + i % 3000), port(1000 + i % 3000))),
            128,
        ),
        6..=10 => ("udp", Some((2000, port(2000 + i % 100))), 64),
        11..=13 => ("tcp", Some((443, 443)), 56),
        14..=16 => ("icmpv6", Some((128, -1)), 48),
        _ => (
            "tcp",
            Some((8000, 8999)),
            OTHER_LENGTHS6[(i / 20) % OTHER_LENGTHS6.len()],
        ),
    };
    let len = match i % 400 {
        19 => 57,
        39 => 121,
        _ => len,
    };
    perm6(proto, ports, cidr6(peer6(i), len))
}

/// The `i`th generated IPv6 peer, somewhere in `2000::/4`.
fn peer6(i: usize) -> u128 {
    let wide = u128::try_from(i).expect("a rule's index fits in a u128");
    // An odd multiplier spreads consecutive indexes over the whole address.
    (2 << 124) | (wide.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) >> 4)
}

/// `tcp 80 from ::/0`: the one rule that covers task C, the sender of the IPv6 cases.
fn http_from_anywhere() -> IpPermission {
    let http = i32::from(ALLOWED_PORT6);
    perm6("tcp", Some((http, http)), cidr6(0, 0))
}

/// The state of a host whose task B (with an IPv6 address) is in `groups` groups (`sg-v6-0000`
/// on) that hold `perms` as inbound rules, the first in the first group and so on round.
fn state6(perms: impl Iterator<Item = IpPermission>, groups: usize) -> State {
    let mut sgs = empty_groups("sg-v6-", groups);
    for (i, p) in perms.enumerate() {
        sgs[i % groups].ip_permissions.push(p);
    }
    let task = Task {
        ipv6_address: Some(Ipv6Addr::from(TASK_B6)),
        ..Task::new("task6", TASK_B.into())
    };
    member_of_all(task, sgs)
}

/// The state of a host whose task (B, with an IPv6 address) is in `groups` groups with
/// `rules` inbound IPv6 rules in all, among them `tcp 80 from ::/0`, the only one that covers
/// task C. The others ([`rule6`]) use every prefix length the datapath may probe, so an IPv6
/// check of a packet from task C probes all 17 before it finds `::/0`: the worst case.
pub fn generated_state6(rules: usize, groups: usize) -> State {
    let others = (1..rules).map(rule6);
    state6(std::iter::once(http_from_anywhere()).chain(others), groups)
}

/// As [`generated_state6`] with 17 rules in one group: `tcp 80 from ::/0` and one rule of
/// each other length the datapath probes (/8 to /128). An IPv6 check of a packet from task C
/// makes as many probes as with 10,000 rules, with a handful of entries in the maps.
pub fn every_level_state6() -> State {
    let others = PEER_LEVELS6
        .into_iter()
        .filter(|&len| len != 0)
        .map(|len| perm6("tcp", Some((8000, 8999)), cidr6(peer6(len.into()), len)));
    state6(std::iter::once(http_from_anywhere()).chain(others), 1)
}

/// A dual-stack host: the tasks and groups of `v4` ([`generated_state`]) and of `v6`
/// ([`generated_state6`]).
fn dual_stack(mut v4: State, v6: State) -> State {
    v4.tasks.extend(v6.tasks);
    v4.security_groups.extend(v6.security_groups);
    v4
}

/// `state` validated and compiled.
fn compiled(state: &State) -> Result<Compiled, CostError> {
    let rules = state::validate(state, state::BridgeNet::default())?;
    Ok(Compiled::new(&rules, 0)?)
}

/// Writes `state`'s tasks (on the interface and with the MAC `iface` gives each), published
/// ports and compiled security groups to the maps.
fn seed_state(
    dp: &mut Datapath,
    state: &State,
    policy: &Compiled,
    iface: impl Fn([u8; 4]) -> (u32, [u8; 6]),
) -> Result<(), DatapathError> {
    let tasks = state.tasks.iter().map(|t| {
        let a = t.ipv4_address.octets();
        let (ifindex, mac) = iface(a);
        Seed::Task(a, ifindex, mac, policy.policy_of(t.ipv4_address))
    });
    let ports = state.tasks.iter().flat_map(|t| {
        t.port_mappings.iter().map(|pm| {
            let proto = match pm.protocol {
                Protocol::Tcp => PROTO_TCP,
                Protocol::Udp => PROTO_UDP,
            };
            Seed::Port(
                proto,
                pm.host_port,
                t.ipv4_address.octets(),
                pm.container_port,
            )
        })
    });
    // A task with an IPv6 address: known by it, and by its interface.
    let tasks6 = state.tasks.iter().flat_map(|t| {
        let a = t.ipv4_address.octets();
        let (ifindex, _) = iface(a);
        t.ipv6_address.into_iter().flat_map(move |a6| {
            [
                Seed::Iface(ifindex, a, ROLE_TASK),
                Seed::Task6(a6.octets(), ifindex),
                Seed::TaskFlags(a, TASK_IPV6),
            ]
        })
    });
    dp.seed(&tasks.chain(ports).chain(tasks6).collect::<Vec<_>>())?;
    dp.insert::<PeerKey, PeerRules>(MAP_SG_PEERS, policy.peers.iter().copied())?;
    dp.insert::<PeerKey6, PeerRules>(MAP_SG_PEERS6, policy.peers6.iter().copied())?;
    dp.insert::<u32, u32>(MAP_SG_LEVELS6, policy.levels6.iter().copied())?;
    dp.insert::<RuleKey, u32>(MAP_SG_RULES, policy.rules.iter().copied())
}

/// Loads the programs `names` of `dp` and the programs they tail-call into the kernel.
fn load_programs(dp: &mut Datapath, names: &[&'static str]) -> Result<(), DatapathError> {
    dp.load_programs(names)?;
    dp.load_tail_called()
}

/// A datapath in memory with [`dual_stack`] `state`'s tasks and policy written to its maps:
/// task A (IPv4) behind the uplink, task B (IPv6) on `IFINDEX_B` with its MAC not learned
/// yet, and task C, without a policy, ready to send from the test device. Returns it, and the
/// lengths of B's inbound `SG_LEVELS6` mask as read back from it.
fn loaded(state: &State) -> Result<(Datapath, Compiled, Vec<u8>), CostError> {
    let policy = compiled(state)?;
    let mut dp = Datapath::load()?;
    dp.seed(&[
        Seed::Task(TASK_C, TEST_IFINDEX, MAC_C, 0),
        Seed::Task6(TASK_C6, TEST_IFINDEX),
        Seed::TaskFlags(TASK_C, TASK_IPV6),
    ])?;
    // Without B's MAC the datapath cannot redirect into B: the kernel carries what B's rules
    // allow, and as C has no policy nothing is tracked.
    seed_state(&mut dp, state, &policy, |a| {
        if a == TASK_B {
            (IFINDEX_B, [0; 6])
        } else {
            (NO_SUCH_IFINDEX, MAC_A)
        }
    })?;
    load_programs(
        &mut dp,
        &["xdp_uplink", "tc_uplink_ingress", "tc_task_ingress"],
    )?;
    let b = policy.policy_of6(Ipv6Addr::from(TASK_B6));
    let mask = dp
        .hash::<u32, u32>(MAP_SG_LEVELS6)?
        .get(&scope(b, DIR_INGRESS))
        .copied()
        .unwrap_or(0);
    Ok((dp, policy, lengths6(mask)))
}

/// Makes the test device the uplink for the IPv4 cases, and task C's interface for the IPv6
/// ones.
fn test_device(dp: &mut Datapath, family: Family) -> Result<(), DatapathError> {
    let (uplink, iface) = match family {
        Family::V4 => (TEST_IFINDEX, Seed::Iface(TEST_IFINDEX, [0; 4], ROLE_UPLINK)),
        Family::V6 => (
            NO_SUCH_IFINDEX,
            Seed::Iface(TEST_IFINDEX, TASK_C, ROLE_TASK),
        ),
    };
    dp.set_first(MAP_CONFIG, config(uplink))?;
    dp.seed(&[iface])
}

/// The prefix lengths of `mask`, an `SG_LEVELS6` value, longest first.
fn lengths6(mask: u32) -> Vec<u8> {
    PEER_LEVELS6
        .into_iter()
        .filter(|&len| mask & level6_bit(len) != 0)
        .collect()
}

/// A SYN from `src`:`sport` to `dst`:`dport`, in a frame from `smac` to `dmac`.
fn syn(
    (smac, dmac): ([u8; 6], [u8; 6]),
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
) -> P {
    P {
        dmac,
        smac,
        ..P::tcp(src, sport, dst, dport, TCP_SYN)
    }
}

/// A full-sized ACK data segment of the same flow and direction as `p`.
fn data(p: &P) -> P {
    let payload: Vec<u8> = (0..=u8::MAX).cycle().take(MSS).collect();
    p.clone().flags(TCP_ACK).data(&payload)
}

/// A TCP SYN from the client to the host's `port`, as it arrives on the uplink.
fn syn_to(port: u16) -> Vec<u8> {
    syn(
        (ROUTER_MAC, UPLINK_MAC),
        (CLIENT, CLIENT_PORT),
        (HOST, port),
    )
    .frame()
}

/// An IPv6 TCP SYN from task C to task B's `port`, as C sends it.
fn syn6_to(port: u16) -> Vec<u8> {
    P6::syn6(TASK_C6, CLIENT_PORT, TASK_B6, port)
        .from_mac(MAC_C)
        .to_mac(MAC_B)
        .frame()
}

/// Which copies a case runs in, and how its packet is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    /// [`syn_to`] the port: task A's rules ([`generated_state`]) decide.
    V4,
    /// [`syn6_to`] the port: task B's rules ([`generated_state6`]) decide.
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn frame(self, port: u16) -> Vec<u8> {
        match self {
            Family::V4 => syn_to(port),
            Family::V6 => syn6_to(port),
        }
    }
}

struct Case {
    family: Family,
    program: &'static str,
    name: &'static str,
    port: u16,
    want: u32,
}

const CASES: [Case; 5] = [
    Case {
        family: Family::V4,
        program: "xdp_uplink",
        name: "SYN to a published port the rules allow (XDP lets it pass)",
        port: ALLOWED_PORT,
        want: XDP_PASS,
    },
    Case {
        family: Family::V4,
        program: "xdp_uplink",
        name: "SYN to a published port the rules reject (XDP drops it)",
        port: REJECTED_PORT,
        want: XDP_DROP,
    },
    Case {
        family: Family::V4,
        program: "tc_uplink_ingress",
        name: "SYN to a published port the rules reject (tc drops it)",
        port: REJECTED_PORT,
        want: TC_ACT_SHOT,
    },
    Case {
        family: Family::V6,
        program: "tc_task_ingress",
        name: "IPv6 SYN, task C to B, B's rules allow it (tc passes it)",
        port: ALLOWED_PORT6,
        want: TC_ACT_OK,
    },
    Case {
        family: Family::V6,
        program: "tc_task_ingress",
        name: "IPv6 SYN, task C to B, B's rules reject it (tc drops it)",
        port: REJECTED_PORT6,
        want: TC_ACT_SHOT,
    },
];

/// `got` when it is the verdict `case` expects.
fn expect(case: &'static str, got: u32, want: u32) -> Result<u32, CostError> {
    if got == want {
        Ok(got)
    } else {
        Err(CostError::Verdict { case, got, want })
    }
}

/// Average nanoseconds per run of `case` over `repeat` runs.
fn run(dp: &Datapath, case: &Case, repeat: u32) -> Result<u64, CostError> {
    let r = dp.test_run(case.program, &case.family.frame(case.port), repeat)?;
    expect(case.name, r.verdict, case.want)?;
    Ok(r.ns)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "run times in nanoseconds are far below 2^52"
)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

/// The median of a measurement's rounds (there is always at least one).
fn median(v: &[u64]) -> u64 {
    crate::stats::median(v).expect("at least one round")
}

/// Fails unless `dp`'s IPv6 connection and flow tables are empty after `case`'s runs: a run
/// that left an entry would have made the next ones continue a flow instead of checking it.
fn no_state6(dp: &Datapath, case: &'static str) -> Result<(), CostError> {
    let left = if !dp.hash::<CtKey6, CtEntry6>(MAP_CT6)?.is_empty() {
        MAP_CT6
    } else if !dp.hash::<CtKey6, CtEntry6>(MAP_CT6_NEW)?.is_empty() {
        MAP_CT6_NEW
    } else if !dp.per_cpu::<FlowKey6, FlowStats6>(MAP_FLOWS6)?.is_empty() {
        MAP_FLOWS6
    } else {
        return Ok(());
    };
    Err(CostError::StateLeft(case, left))
}

/// Measures every case with 1 rule and with `rules` rules over `groups` groups, for each
/// family.
pub fn policy_cost(
    rules: usize,
    groups: usize,
    repeat: u32,
    rounds: usize,
) -> Result<PolicyCost, CostError> {
    if rules == 0 || groups == 0 || groups > rules {
        return Err(CostError::Usage);
    }
    let (mut one, _, one_rule_levels6) =
        loaded(&dual_stack(generated_state(1, 1), generated_state6(1, 1)))?;
    let (mut many, compiled, levels6) = loaded(&dual_stack(
        generated_state(rules, groups),
        generated_state6(rules, groups),
    ))?;
    let (mut every, _, every_level_levels6) =
        loaded(&dual_stack(generated_state(1, 1), every_level_state6()))?;
    let mut cases = Vec::new();
    for case in &CASES {
        for dp in [&mut one, &mut many, &mut every] {
            test_device(dp, case.family)?;
        }
        // One, many, and for IPv6 every level.
        let copies = match case.family {
            Family::V4 => vec![&one, &many],
            Family::V6 => vec![&one, &many, &every],
        };
        // A warm-up run each, then rounds alternating between the copies.
        for dp in &copies {
            run(dp, case, repeat)?;
        }
        let mut ns = vec![Vec::new(); copies.len()];
        for _ in 0..rounds.max(1) {
            for (dp, v) in copies.iter().zip(&mut ns) {
                v.push(run(dp, case, repeat)?);
            }
        }
        if case.family == Family::V6 {
            for dp in &copies {
                no_state6(dp, case.name)?;
            }
        }
        let medians: Vec<u64> = ns.iter().map(|v| median(v)).collect();
        let (one_ns, many_ns) = (medians[0], medians[1]);
        let every_level_ns = medians.get(2).copied();
        cases.push(CaseCost {
            family: case.family.name(),
            program: case.program,
            case: case.name,
            verdict: case.want,
            one_rule_ns: one_ns,
            many_rules_ns: many_ns,
            ratio: ratio(many_ns, one_ns.max(1)),
            every_level_ns,
            every_level_ratio: every_level_ns.map(|e| ratio(many_ns, e.max(1))),
        });
    }
    Ok(PolicyCost {
        rules,
        groups,
        repeat,
        rounds,
        peer_entries: compiled.peers.len(),
        rule_entries: compiled.rules.len(),
        peer_entries6: many.hash::<PeerKey6, PeerRules>(MAP_SG_PEERS6)?.len(),
        levels6,
        one_rule_levels6,
        every_level_levels6,
        cases,
    })
}

/// The table `ecsnet bench policy-cost` prints. For IPv6, two more columns: the copy with a
/// rule at every prefix length (`LEVELS`), and many / that.
pub fn render(c: &PolicyCost) -> String {
    let lengths = |l: &[u8]| {
        l.iter()
            .map(|len| format!("/{len}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!(
        "policy lookup cost, BPF_PROG_TEST_RUN x{} per round, median of {} rounds\n\
         1 rule vs {} rules of each family in {} groups each ({} IPv4 CIDR entries, {} IPv6 \
         CIDR entries, {} port-block entries)\n",
        c.repeat, c.rounds, c.rules, c.groups, c.peer_entries, c.peer_entries6, c.rule_entries
    );
    let _ = writeln!(
        s,
        "IPv6 prefix lengths probed: 1 rule {}; many {}; LEVELS ({} rules, one per length) {}",
        lengths(&c.one_rule_levels6),
        lengths(&c.levels6),
        c.every_level_levels6.len(),
        lengths(&c.every_level_levels6),
    );
    let _ = writeln!(
        s,
        "{:<18} {:<58} {:>8} {:>8} {:>6} {:>8} {:>6}",
        "PROGRAM", "CASE", "1 RULE", "MANY", "RATIO", "LEVELS", "RATIO"
    );
    for k in &c.cases {
        let (every, every_ratio) = match (k.every_level_ns, k.every_level_ratio) {
            (Some(ns), Some(r)) => (format!("{ns}ns"), format!("{r:.3}")),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        let _ = writeln!(
            s,
            "{:<18} {:<58} {:>6}ns {:>6}ns {:>6.3} {every:>8} {every_ratio:>6}",
            k.program, k.case, k.one_rule_ns, k.many_rules_ns, k.ratio
        );
    }
    s
}

/// One program's cost for one kind of packet.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramCost {
    pub program: &'static str,
    pub case: &'static str,
    /// Median over rounds of the kernel's average run time, nanoseconds.
    pub ns: u64,
    /// The verdict the program returned (checked against what the case expects).
    pub verdict: u32,
}

/// How a case's `repeat` runs are made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One test run repeated `repeat` times on the same packet, which the program must leave
    /// as it was (checked).
    Repeat,
    /// `repeat` test runs of one run each, every one on a fresh copy of the packet: for
    /// programs that rewrite it.
    Fresh,
    /// As `Fresh`, and the CT and FLOWS entries a run created are deleted before the next, so
    /// that every run opens a new flow. Each new flow also sends `monitor` an ALLOW event: with
    /// `repeat` at 1000 or more the warm-up uses up the CPU's budget (1000 a second by
    /// default), and the rounds measure a host opening flows faster than that, whose events
    /// are counted as suppressed.
    NewFlow,
}

/// A packet run once through `program` before measuring, to put a flow in the tables.
struct Step {
    program: &'static str,
    what: &'static str,
    packet: P,
    want: u32,
}

/// One packet of [`program_cost`], after its flow's first packets (`setup`).
struct ProgramCase {
    program: &'static str,
    name: &'static str,
    /// Run once each, in order, before measuring.
    setup: Vec<Step>,
    packet: P,
    want: u32,
    mode: Mode,
}

/// The cases of [`program_cost`], their flows each by its first packet.
fn program_cases() -> Vec<ProgramCase> {
    // client:51000 -> host:8080, published to A:80, as it arrives on the uplink.
    let inbound = syn(
        (ROUTER_MAC, UPLINK_MAC),
        (CLIENT, CLIENT_PORT),
        (HOST, ALLOWED_PORT),
    );
    // A:80 -> client:51000, the inbound flow's reply as task A sends it to its gateway.
    let inbound_reply = syn((MAC_A, BRIDGE_MAC), (TASK_A, 80), (CLIENT, CLIENT_PORT));
    // host:8080 -> client:51000, the inbound flow's reply as it leaves the uplink.
    let inbound_reply_out = syn(
        (UPLINK_MAC, ROUTER_MAC),
        (HOST, ALLOWED_PORT),
        (CLIENT, CLIENT_PORT),
    );
    // A:40000 -> B:80 on the bridge's subnet.
    let east_west = syn((MAC_A, MAC_B), (TASK_A, 40000), (TASK_B, 80));
    // The host (its bridge address):45000 -> A:80, as the bridge delivers it.
    let host_to_task = syn((BRIDGE_MAC, MAC_A), (BRIDGE, 45000), (TASK_A, 80));

    let open_inbound = || Step {
        program: "tc_uplink_ingress",
        what: "set-up: the client's SYN to the published port (DNAT into task A)",
        packet: inbound.clone(),
        want: TC_ACT_REDIRECT,
    };
    let open_east_west = Step {
        program: "tc_task_ingress",
        what: "set-up: task A's SYN to task B (into B)",
        packet: east_west.clone(),
        want: TC_ACT_REDIRECT,
    };
    let open_host_to_task = Step {
        program: "tc_task_egress",
        what: "set-up: the host's SYN to task A (tracked for the kernel's path)",
        packet: host_to_task.clone(),
        want: TC_ACT_OK,
    };
    vec![
        ProgramCase {
            program: "xdp_uplink",
            name: "data segment of an inbound flow to a published port: left to tc",
            setup: vec![open_inbound()],
            packet: data(&inbound),
            want: XDP_PASS,
            mode: Mode::Repeat,
        },
        ProgramCase {
            program: "tc_uplink_ingress",
            name: "data segment of a tracked inbound flow: DNAT into the task (fresh packet each \
                   run)",
            setup: vec![open_inbound()],
            packet: data(&inbound),
            want: TC_ACT_REDIRECT,
            mode: Mode::Fresh,
        },
        ProgramCase {
            program: "tc_uplink_ingress",
            name: "SYN opening an inbound flow: policy, CT, DNAT into the task (fresh packet and \
                   flow each run)",
            setup: Vec::new(),
            packet: inbound.clone(),
            want: TC_ACT_REDIRECT,
            mode: Mode::NewFlow,
        },
        ProgramCase {
            program: "tc_task_ingress",
            name: "data segment of an east-west flow, task to task: into the peer",
            setup: vec![open_east_west],
            packet: data(&east_west),
            want: TC_ACT_REDIRECT,
            mode: Mode::Repeat,
        },
        ProgramCase {
            program: "tc_task_ingress",
            name: "reply of an inbound flow, task to client: no FIB route via the uplink in a test \
                   run, passed untranslated",
            setup: vec![open_inbound()],
            packet: data(&inbound_reply),
            want: TC_ACT_OK,
            mode: Mode::Repeat,
        },
        ProgramCase {
            program: "tc_task_egress",
            name: "data segment of a host-to-task flow on the kernel's path: counted, recorded, \
                   passed",
            setup: vec![open_host_to_task],
            packet: data(&host_to_task),
            want: TC_ACT_OK,
            mode: Mode::Repeat,
        },
        ProgramCase {
            program: "tc_uplink_egress",
            name: "data segment leaving through the uplink: counted, passed",
            setup: Vec::new(),
            packet: data(&inbound_reply_out),
            want: TC_ACT_OK,
            mode: Mode::Repeat,
        },
    ]
}

/// The host of [`program_cost`]: tasks A and B in one security group that lets anyone reach
/// TCP port 80 and lets its members send anything anywhere (EC2's default outbound rule); A's
/// port 80 published on the host's 8080.
fn program_state() -> State {
    let anywhere = |proto: &str, ports| IpPermission::from_cidr(proto, ports, "0.0.0.0/0");
    let sg = SecurityGroup {
        group_id: "sg-web".to_owned(),
        group_name: None,
        ip_permissions: vec![anywhere("tcp", Some((80, 80)))],
        ip_permissions_egress: vec![anywhere("-1", None)],
    };
    let task = |name: &str, addr: [u8; 4], port_mappings| Task {
        port_mappings,
        security_groups: vec![sg.group_id.clone()],
        ..Task::new(name, Ipv4Addr::from(addr))
    };
    let published = PortMapping {
        container_port: 80,
        host_port: ALLOWED_PORT,
        protocol: Protocol::Tcp,
        host_ip: PortFamily::Both,
    };
    State {
        host: state::Host::default(),
        tasks: vec![
            task("a", TASK_A, vec![published]),
            task("b", TASK_B, Vec::new()),
        ],
        security_groups: vec![sg],
    }
}

/// A datapath in memory for `case`: tasks A (on the test device, ifindex 1, for the task
/// programs) and B with their policy, the published port, flow logging on as `ecsnet up`
/// leaves it, and the programs the case runs loaded.
fn program_world(
    state: &State,
    policy: &Compiled,
    case: &ProgramCase,
) -> Result<Datapath, CostError> {
    let mut dp = Datapath::load()?;
    dp.seed(&[Seed::Iface(TEST_IFINDEX, TASK_A, ROLE_TASK)])?;
    // For the task programs task A really is on the test device, as on a host, so that
    // tc_task_ingress finds it by its address alone (its one-lookup path).
    let ifindex_a = if case.program.contains("task") {
        TEST_IFINDEX
    } else {
        IFINDEX_A
    };
    seed_state(&mut dp, state, policy, |addr| {
        if addr == TASK_A {
            (ifindex_a, MAC_A)
        } else {
            (IFINDEX_B, MAC_B)
        }
    })?;
    let (event_cost_ns, event_burst_ns) = flowlog::event_budget(MONITOR_RATE);
    let st = FlowState {
        epoch: 1,
        enabled: 1,
        _pad: [0; 3],
        window_start_ns: ecsnet::clock::monotonic_ns(),
        event_cost_ns,
        event_burst_ns,
    };
    dp.set_first(MAP_FLOW_STATE, st)?;
    let mut names: Vec<&'static str> = case.setup.iter().map(|s| s.program).collect();
    names.push(case.program);
    names.sort_unstable();
    names.dedup();
    load_programs(&mut dp, &names)?;
    Ok(dp)
}

/// Makes the test device (ifindex 1) the uplink for the uplink programs; for the task programs
/// it is task A's interface (in IFACES throughout) and the uplink is nowhere.
fn device_for(dp: &mut Datapath, program: &str) -> Result<(), DatapathError> {
    let uplink = if program.contains("uplink") {
        TEST_IFINDEX
    } else {
        NO_SUCH_IFINDEX
    };
    dp.set_first(MAP_CONFIG, config(uplink))
}

/// The keys of the `CT`, `CT_NEW` and `FLOWS` maps at one moment.
struct FlowTables {
    ct: Vec<CtKey>,
    ct_new: Vec<CtKey>,
    flows: Vec<FlowKey>,
}

fn flow_tables(dp: &Datapath) -> Result<FlowTables, DatapathError> {
    Ok(FlowTables {
        ct: dp.hash::<CtKey, CtEntry>(MAP_CT)?.into_keys().collect(),
        ct_new: dp.hash::<CtKey, CtEntry>(MAP_CT_NEW)?.into_keys().collect(),
        flows: dp
            .per_cpu::<FlowKey, FlowStats>(MAP_FLOWS)?
            .into_keys()
            .collect(),
    })
}

/// Deletes the CT and FLOWS entries that are not in `keep`.
fn forget_flows(dp: &mut Datapath, keep: &FlowTables) -> Result<(), DatapathError> {
    let now = flow_tables(dp)?;
    let ct = now.ct.iter().filter(|k| !keep.ct.contains(k));
    dp.remove::<CtKey, CtEntry>(MAP_CT, ct)?;
    let ct_new = now.ct_new.iter().filter(|k| !keep.ct_new.contains(k));
    dp.remove::<CtKey, CtEntry>(MAP_CT_NEW, ct_new)?;
    let flows = now.flows.iter().filter(|k| !keep.flows.contains(k));
    dp.remove::<FlowKey, FlowStats>(MAP_FLOWS, flows)
}

/// Most single runs one measurement of a packet-rewriting case makes.
const MAX_SINGLE_RUNS: u32 = 3_000;

/// One measurement of `case` on `frame`: (average nanoseconds per run, verdict).
fn measure(
    dp: &mut Datapath,
    case: &ProgramCase,
    frame: &[u8],
    repeat: u32,
    keep: &FlowTables,
) -> Result<(u64, u32), CostError> {
    if case.mode == Mode::Repeat {
        let r: Run = dp.test_run(case.program, frame, repeat)?;
        let verdict = expect(case.name, r.verdict, case.want)?;
        if r.output != frame {
            return Err(CostError::Rewritten(case.name));
        }
        return Ok((r.ns, verdict));
    }
    // One syscall (and for a new flow, a clean-up) per run: capped, or 100,000 repeats would
    // take minutes for what a few thousand runs already average out.
    let runs = repeat.min(MAX_SINGLE_RUNS);
    let mut total = 0;
    for _ in 0..runs {
        let r = dp.test_run(case.program, frame, 1)?;
        expect(case.name, r.verdict, case.want)?;
        total += r.ns;
        if case.mode == Mode::NewFlow {
            forget_flows(dp, keep)?;
        }
    }
    Ok((total / u64::from(runs), case.want))
}

/// Per-packet cost of every datapath program for a packet of an established flow (and the SYN
/// that opens one on the uplink), `repeat` runs per measurement, median of `rounds`.
pub fn program_cost(repeat: u32, rounds: usize) -> Result<Vec<ProgramCost>, CostError> {
    let repeat = repeat.max(1);
    let state = program_state();
    let policy = compiled(&state)?;
    let mut costs = Vec::new();
    for case in &program_cases() {
        let mut dp = program_world(&state, &policy, case)?;
        for step in &case.setup {
            device_for(&mut dp, step.program)?;
            let r = dp.test_run(step.program, &step.packet.frame(), 1)?;
            expect(step.what, r.verdict, step.want)?;
        }
        device_for(&mut dp, case.program)?;
        let frame = case.packet.frame();
        let keep = flow_tables(&dp)?;
        // A warm-up measurement, then the rounds.
        let (_, mut verdict) = measure(&mut dp, case, &frame, repeat, &keep)?;
        let mut ns = Vec::new();
        for _ in 0..rounds.max(1) {
            let (n, v) = measure(&mut dp, case, &frame, repeat, &keep)?;
            ns.push(n);
            verdict = v;
        }
        costs.push(ProgramCost {
            program: case.program,
            case: case.name,
            ns: median(&ns),
            verdict,
        });
    }
    Ok(costs)
}

/// The name of verdict `v` of `program`.
fn verdict_name(program: &str, v: u32) -> &'static str {
    match (program.starts_with("xdp"), v) {
        (true, XDP_DROP) => "XDP_DROP",
        (true, XDP_PASS) => "XDP_PASS",
        (false, TC_ACT_OK) => "TC_ACT_OK",
        (false, TC_ACT_SHOT) => "TC_ACT_SHOT",
        (false, TC_ACT_REDIRECT) => "TC_ACT_REDIRECT",
        _ => "?",
    }
}

/// The table of [`program_cost`]'s results.
pub fn render_programs(c: &[ProgramCost]) -> String {
    let width = |head: &str, f: &dyn Fn(&ProgramCost) -> usize| {
        c.iter().map(f).max().unwrap_or(0).max(head.len())
    };
    let pw = width("PROGRAM", &|k| k.program.len());
    let cw = width("CASE", &|k| k.case.len());
    let mut s = format!(
        "{:<pw$}  {:<cw$}  {:>10}  VERDICT\n",
        "PROGRAM", "CASE", "NS/PACKET"
    );
    for k in c {
        let _ = writeln!(
            s,
            "{:<pw$}  {:<cw$}  {:>10}  {} ({})",
            k.program,
            k.case,
            k.ns,
            verdict_name(k.program, k.verdict),
            k.verdict
        );
    }
    s
}
