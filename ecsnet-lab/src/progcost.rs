//! Per-packet cost of the datapath's programs, from `BPF_PROG_TEST_RUN` with repeat, on copies of
//! the datapath loaded in memory (nothing attached, nothing pinned). Two measurements:
//!
//! - [`policy_cost`] answers one question of SPEC §6: does a policy check cost the same with 1
//!   rule and with 10,000? Two copies are loaded: one whose task has a single inbound rule, one
//!   whose task is in `groups` security groups holding `rules` rules in all (the same rule among
//!   them). Each case is a packet that makes the program do a full policy check and leaves no
//!   state behind (a SYN XDP lets pass, a SYN XDP or tc drops), so every repeat costs the same.
//!   Rounds alternate between the two copies; the medians are reported.
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

use std::{fmt::Write as _, net::Ipv4Addr};

use ecsnet_common::{
    ct::{CtEntry, CtKey, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN},
    flow::{FlowKey, FlowState, FlowStats, MAP_FLOW_STATE, MAP_FLOWS},
    maps::{MAP_CONFIG, MAP_CT, MAP_CT_NEW, ROLE_TASK, ROLE_UPLINK},
    policy::{MAP_SG_PEERS, MAP_SG_RULES, PeerKey, PeerRules, RuleKey},
};
use serde::Serialize;

use ecsnet::{
    flowlog,
    plan::sg::Compiled,
    state::{self, IpPermission, PortFamily, PortMapping, Protocol, SecurityGroup, State, Task},
};

use crate::fixture::{
    datapath::{Datapath, DatapathError, Run},
    packet::P,
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
    #[error("--rules must be at least 1 and --groups between 1 and --rules")]
    Usage,
}

/// One case's cost with one rule and with many.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaseCost {
    pub program: &'static str,
    pub case: &'static str,
    /// Median over rounds of the kernel's average run time, nanoseconds.
    pub one_rule_ns: u64,
    pub many_rules_ns: u64,
    /// many / one.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCost {
    pub rules: usize,
    pub groups: usize,
    pub repeat: u32,
    pub rounds: usize,
    /// Trie entries the many-rule policy compiled to.
    pub peer_entries: usize,
    pub rule_entries: usize,
    pub cases: Vec<CaseCost>,
}

/// The state of a host whose one task is in `groups` groups with `rules` inbound rules in all,
/// among them "tcp 80 from 10.10.0.0/24". The others vary protocol, port ranges and prefix
/// lengths, as real groups do.
pub fn generated_state(rules: usize, groups: usize) -> State {
    let mut sgs: Vec<SecurityGroup> = (0..groups)
        .map(|g| SecurityGroup {
            group_id: format!("sg-{g:04}"),
            group_name: None,
            ip_permissions: Vec::new(),
            ip_permissions_egress: Vec::new(),
        })
        .collect();
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
        security_groups: sgs.iter().map(|g| g.group_id.clone()).collect(),
        ..Task::new("task", TASK_A.into())
    };
    State {
        host: state::Host::default(),
        security_groups: sgs,
        tasks: vec![task],
    }
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
    dp.seed(&tasks.chain(ports).collect::<Vec<_>>())?;
    dp.insert::<PeerKey, PeerRules>(MAP_SG_PEERS, policy.peers.iter().copied())?;
    dp.insert::<RuleKey, u32>(MAP_SG_RULES, policy.rules.iter().copied())
}

/// Loads the programs `names` of `dp` and the programs they tail-call into the kernel.
fn load_programs(dp: &mut Datapath, names: &[&'static str]) -> Result<(), DatapathError> {
    dp.load_programs(names)?;
    dp.load_tail_called()
}

/// A datapath in memory with `state`'s one task and policy written to its maps.
fn loaded(state: &State) -> Result<(Datapath, Compiled), CostError> {
    let policy = compiled(state)?;
    let mut dp = Datapath::load()?;
    dp.set_first(MAP_CONFIG, config(TEST_IFINDEX))?;
    dp.seed(&[Seed::Iface(TEST_IFINDEX, [0; 4], ROLE_UPLINK)])?;
    seed_state(&mut dp, state, &policy, |_| (NO_SUCH_IFINDEX, MAC_A))?;
    load_programs(&mut dp, &["xdp_uplink", "tc_uplink_ingress"])?;
    Ok((dp, policy))
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

struct Case {
    program: &'static str,
    name: &'static str,
    port: u16,
    want: u32,
}

const CASES: [Case; 3] = [
    Case {
        program: "xdp_uplink",
        name: "SYN to a published port the rules allow (XDP lets it pass)",
        port: ALLOWED_PORT,
        want: XDP_PASS,
    },
    Case {
        program: "xdp_uplink",
        name: "SYN to a published port the rules reject (XDP drops it)",
        port: REJECTED_PORT,
        want: XDP_DROP,
    },
    Case {
        program: "tc_uplink_ingress",
        name: "SYN to a published port the rules reject (tc drops it)",
        port: REJECTED_PORT,
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
    let r = dp.test_run(case.program, &syn_to(case.port), repeat)?;
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

/// Measures every case with 1 rule and with `rules` rules over `groups` groups.
pub fn policy_cost(
    rules: usize,
    groups: usize,
    repeat: u32,
    rounds: usize,
) -> Result<PolicyCost, CostError> {
    if rules == 0 || groups == 0 || groups > rules {
        return Err(CostError::Usage);
    }
    let (one, _) = loaded(&generated_state(1, 1))?;
    let (many, compiled) = loaded(&generated_state(rules, groups))?;
    let mut cases = Vec::new();
    for case in &CASES {
        // A warm-up run each, then alternate.
        run(&one, case, repeat)?;
        run(&many, case, repeat)?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            a.push(run(&one, case, repeat)?);
            b.push(run(&many, case, repeat)?);
        }
        let (one_ns, many_ns) = (median(&a), median(&b));
        cases.push(CaseCost {
            program: case.program,
            case: case.name,
            one_rule_ns: one_ns,
            many_rules_ns: many_ns,
            ratio: ratio(many_ns, one_ns.max(1)),
        });
    }
    Ok(PolicyCost {
        rules,
        groups,
        repeat,
        rounds,
        peer_entries: compiled.peers.len(),
        rule_entries: compiled.rules.len(),
        cases,
    })
}

/// The table `ecsnet bench policy-cost` prints.
pub fn render(c: &PolicyCost) -> String {
    let mut s = format!(
        "policy lookup cost, BPF_PROG_TEST_RUN x{} per round, median of {} rounds\n1 rule vs {} rules in {} groups ({} CIDR entries, {} port-block entries)\n",
        c.repeat, c.rounds, c.rules, c.groups, c.peer_entries, c.rule_entries
    );
    let _ = writeln!(
        s,
        "{:<18} {:<62} {:>8} {:>8} {:>6}",
        "PROGRAM", "CASE", "1 RULE", "MANY", "RATIO"
    );
    for k in &c.cases {
        let _ = writeln!(
            s,
            "{:<18} {:<62} {:>6}ns {:>6}ns {:>6.3}",
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
