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
//! into the packet, the next run sees (a DNATed segment repeated is no longer the flow's, and
//! its TTL runs out). Cases whose program leaves the packet as it was are measured that way, and
//! the packet is checked to come out unchanged. Cases whose program rewrites it are measured as
//! `repeat` test runs of one run each, every one on a fresh copy of the packet, their times
//! averaged; their names say so. Such a time is not comparable with a repeated one: the system
//! call between two runs cools the caches and the clock reads are not shared out. Where both
//! can be measured (a packet left unchanged) the single runs came out 25 to 65 ns slower.

use std::net::Ipv4Addr;

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use ecsnet_common::{
    csum::{checksum, pseudo_header},
    ct::{CtEntry, CtKey, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN},
    flow::{FlowKey, FlowState, FlowStats},
    maps::{Config, IfaceInfo, PortKey, PortTarget, ROLE_TASK, ROLE_UPLINK, TaskInfo},
    policy::{PeerKey, PeerRules, RuleKey},
};
use serde::Serialize;

use ecsnet::{
    flowlog,
    kernel::datapath::DATAPATH,
    plan::sg::Compiled,
    state::{self, IpPermission, PortMapping, Protocol, SecurityGroup, State, Task},
};

/// The ifindex a test run's packet arrives on (loopback), standing in for the uplink.
const TEST_IFINDEX: u32 = 1;
/// Where [`program_cost`] puts the uplink for the task programs: no interface has this index,
/// so no FIB lookup can say "out of the uplink" (as in `tests/tests/datapath_fixtures.rs`).
const NO_SUCH_IFINDEX: u32 = 999_999;
const HOST: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const BRIDGE: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
/// The task of [`policy_cost`], task A of [`program_cost`].
const TASK: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
const TASK_B: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 3);
const IFINDEX_A: u32 = 11;
const IFINDEX_B: u32 = 12;
const BRIDGE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 2];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 3];
const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 8];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
/// The client's port of the inbound flows.
const CLIENT_PORT: u16 = 51000;
/// Payload of a data segment: a full one at MTU 1500.
const MSS: u16 = 1448;
/// Events per second per CPU the datapath may send to `monitor`: `ecsnet up`'s default.
const MONITOR_RATE: u32 = 1000;
/// Host port published to container port 80, which the rule allows from the client's /24.
const ALLOWED_PORT: u16 = 8080;
/// Host port published to container port 81, which no rule allows.
const REJECTED_PORT: u16 = 8081;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("loading the datapath for test runs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("{0}")]
    TailCalls(ecsnet::kernel::datapath::DatapathError),
    #[error("map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("the generated security groups do not compile: {0}")]
    Compile(String),
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
    sgs[0]
        .ip_permissions
        .push(perm("tcp", 80, 80, "10.10.0.0/24".to_owned()));
    for i in 1..rules {
        let (hi, lo) = ((i / 256) as u8, (i % 256) as u8);
        let p = match i % 4 {
            0 => perm(
                "tcp",
                1000 + (i % 3000) as i32,
                1000 + (i % 3000) as i32,
                format!("10.{}.{hi}.{lo}/32", 100 + i % 50),
            ),
            1 => perm(
                "udp",
                2000,
                2000 + (i % 100) as i32,
                format!("192.168.{lo}.0/24"),
            ),
            2 => perm("tcp", 443, 443, format!("100.{}.{lo}.0/24", 64 + hi % 64)),
            _ => perm("icmp", 8, -1, format!("172.{}.0.0/16", 16 + hi % 16)),
        };
        sgs[i % groups].ip_permissions.push(p);
    }
    let task = Task {
        task_arn: None,
        name: "task".to_owned(),
        ipv4_address: TASK,
        interface: None,
        interface_id: None,
        port_mappings: [(ALLOWED_PORT, 80), (REJECTED_PORT, 81)]
            .map(|(host_port, container_port)| PortMapping {
                container_port,
                host_port,
                protocol: Protocol::Tcp,
            })
            .to_vec(),
        security_groups: sgs.iter().map(|g| g.group_id.clone()).collect(),
        service_name: None,
        task_definition_arn: None,
        container_id: None,
    };
    State {
        host: state::Host::default(),
        security_groups: sgs,
        tasks: vec![task],
    }
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, CostError> {
    ebpf.map_mut(name).ok_or(CostError::Map(
        name,
        aya::maps::MapError::InvalidName { name: name.into() },
    ))
}

/// Writes `value` at index 0 of the array map `name`.
fn set_first<V: Pod>(ebpf: &mut Ebpf, name: &'static str, value: V) -> Result<(), CostError> {
    let mut a: Array<&mut MapData, V> =
        Array::try_from(map(ebpf, name)?).map_err(|e| CostError::Map(name, e))?;
    a.set(0, &value, 0).map_err(|e| CostError::Map(name, e))
}

/// Inserts `entries` into the hash map `name`.
fn insert<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: impl IntoIterator<Item = (K, V)>,
) -> Result<(), CostError> {
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map(ebpf, name)?).map_err(|e| CostError::Map(name, e))?;
    for (k, v) in entries {
        m.insert(&k, &v, 0).map_err(|e| CostError::Map(name, e))?;
    }
    Ok(())
}

/// The host's configuration with the uplink on `uplink_ifindex` and the bridge on the test
/// device.
fn config(uplink_ifindex: u32) -> Config {
    Config {
        uplink_ifindex,
        uplink_ipv4: be(HOST),
        bridge_ifindex: TEST_IFINDEX,
        bridge_ipv4: be(BRIDGE),
        bridge_mac: BRIDGE_MAC,
        flags: 0,
        bridge_prefix: 16,
    }
}

/// `state` validated and compiled.
fn compiled(state: &State) -> Result<Compiled, CostError> {
    let rules = state::validate(state, state::BridgeNet::default())
        .map_err(|e| CostError::Compile(e.to_string()))?;
    Compiled::new(&rules, 0).map_err(|e| CostError::Compile(e.to_string()))
}

/// Writes `state`'s tasks (on the interface and with the MAC `iface` gives each), published
/// ports and compiled security groups to the maps.
fn seed_state(
    ebpf: &mut Ebpf,
    state: &State,
    policy: &Compiled,
    iface: impl Fn(Ipv4Addr) -> (u32, [u8; 6]),
) -> Result<(), CostError> {
    let tasks = state.tasks.iter().map(|t| {
        let (ifindex, mac) = iface(t.ipv4_address);
        let info = TaskInfo {
            ifindex,
            mac,
            _pad: [0; 2],
            policy: policy.policy_of(t.ipv4_address),
        };
        (be(t.ipv4_address), info)
    });
    insert(ebpf, "TASKS", tasks)?;
    let ports = state.tasks.iter().flat_map(|t| {
        t.port_mappings.iter().map(|pm| {
            let k = PortKey {
                port: pm.host_port.to_be(),
                proto: match pm.protocol {
                    Protocol::Tcp => PROTO_TCP,
                    Protocol::Udp => PROTO_UDP,
                },
                _pad: 0,
            };
            let v = PortTarget {
                addr: be(t.ipv4_address),
                port: pm.container_port.to_be(),
                _pad: [0; 2],
            };
            (k, v)
        })
    });
    insert(ebpf, "PORTS", ports)?;
    insert::<PeerKey, PeerRules>(ebpf, "SG_PEERS", policy.peers.iter().copied())?;
    insert::<RuleKey, u32>(ebpf, "SG_RULES", policy.rules.iter().copied())
}

/// Loads the programs `names` of `ebpf` into the kernel.
fn load_programs(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), CostError> {
    for &name in names {
        let prog = ebpf
            .program_mut(name)
            .expect("the datapath has the program");
        if name.starts_with("xdp") {
            let p: &mut Xdp = prog.try_into().map_err(|e| CostError::Program(name, e))?;
            p.load()
        } else {
            let p: &mut SchedClassifier =
                prog.try_into().map_err(|e| CostError::Program(name, e))?;
            p.load()
        }
        .map_err(|e| CostError::Program(name, e))?;
    }
    ecsnet::kernel::datapath::load_tail_called(ebpf).map_err(CostError::TailCalls)
}

/// A datapath in memory with `state`'s one task and policy written to its maps.
fn loaded(state: &State) -> Result<(Ebpf, Compiled), CostError> {
    let policy = compiled(state)?;
    let mut ebpf = Ebpf::load(DATAPATH)?;
    set_first(&mut ebpf, "CONFIG", config(TEST_IFINDEX))?;
    let up = IfaceInfo {
        ipv4: 0,
        role: ROLE_UPLINK,
        _pad: [0; 3],
    };
    insert(&mut ebpf, "IFACES", [(TEST_IFINDEX, up)])?;
    seed_state(&mut ebpf, state, &policy, |_| (999_999, MAC_A))?;
    load_programs(&mut ebpf, &["xdp_uplink", "tc_uplink_ingress"])?;
    Ok((ebpf, policy))
}

/// A TCP segment in an Ethernet frame (addresses and ports in host order).
#[derive(Clone, Copy)]
struct Segment {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    flags: u8,
    /// Payload bytes.
    data: u16,
}

impl Segment {
    /// A SYN from `src`:`sport` to `dst`:`dport`, in a frame from `smac` to `dmac`.
    const fn syn(
        (smac, dmac): ([u8; 6], [u8; 6]),
        (src, sport): (Ipv4Addr, u16),
        (dst, dport): (Ipv4Addr, u16),
    ) -> Self {
        Segment {
            smac,
            dmac,
            src,
            sport,
            dst,
            dport,
            flags: TCP_SYN,
            data: 0,
        }
    }

    /// A full-sized ACK data segment of the same flow and direction.
    const fn data(self) -> Self {
        Segment {
            flags: TCP_ACK,
            data: MSS,
            ..self
        }
    }

    /// The frame, with IPv4 and TCP checksums computed in full.
    fn frame(&self) -> Vec<u8> {
        let mut tcp = Vec::with_capacity(20 + self.data as usize);
        tcp.extend(self.sport.to_be_bytes());
        tcp.extend(self.dport.to_be_bytes());
        tcp.extend(0x1000_0001u32.to_be_bytes());
        let ack: u32 = if self.flags & TCP_ACK != 0 {
            0x2000_0001
        } else {
            0
        };
        tcp.extend(ack.to_be_bytes());
        tcp.extend([0x50, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend((0..self.data).map(|i| i as u8));
        let (src, dst) = (self.src.octets(), self.dst.octets());
        let c = checksum(&tcp, pseudo_header(src, dst, PROTO_TCP, tcp.len() as u16));
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend((20 + tcp.len() as u16).to_be_bytes());
        // Identification 1, DF, TTL 64.
        ip.extend([0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0]);
        ip.extend(src);
        ip.extend(dst);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = Vec::with_capacity(14 + ip.len() + tcp.len());
        f.extend(self.dmac);
        f.extend(self.smac);
        f.extend([0x08, 0x00]);
        f.extend(ip);
        f.extend(tcp);
        f
    }
}

/// A TCP SYN from the client to the host's `port`, as it arrives on the uplink.
fn syn(port: u16) -> Vec<u8> {
    Segment::syn(
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

/// What one `BPF_PROG_TEST_RUN` gave.
struct Run {
    verdict: u32,
    /// The kernel's average over the repeats, nanoseconds.
    ns: u64,
    /// The packet as the last run left it.
    output: Vec<u8>,
}

/// Runs `program` `repeat` times on `packet` (the same skb each time).
fn test_run(
    ebpf: &Ebpf,
    program: &'static str,
    packet: &[u8],
    repeat: u32,
) -> Result<Run, CostError> {
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let prog = ebpf.program(program).expect("the datapath has the program");
    let r = if program.starts_with("xdp") {
        let p: &Xdp = prog
            .try_into()
            .map_err(|e| CostError::Program(program, e))?;
        p.test_run(opts)
    } else {
        let p: &SchedClassifier = prog
            .try_into()
            .map_err(|e| CostError::Program(program, e))?;
        p.test_run(opts)
    }
    .map_err(|e| CostError::Program(program, e))?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        verdict: r.return_value,
        ns: r.duration.as_nanos() as u64,
        output: out,
    })
}

/// `got` when it is the verdict `case` expects.
fn expect(case: &'static str, got: u32, want: u32) -> Result<u32, CostError> {
    if got == want {
        Ok(got)
    } else {
        Err(CostError::Verdict { case, got, want })
    }
}

/// Average nanoseconds per run of `case` over `repeat` runs.
fn run(ebpf: &Ebpf, case: &Case, repeat: u32) -> Result<u64, CostError> {
    let r = test_run(ebpf, case.program, &syn(case.port), repeat)?;
    expect(case.name, r.verdict, case.want)?;
    Ok(r.ns)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
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
        let (one_ns, many_ns) = (median(a), median(b));
        cases.push(CaseCost {
            program: case.program,
            case: case.name,
            one_rule_ns: one_ns,
            many_rules_ns: many_ns,
            ratio: many_ns as f64 / one_ns.max(1) as f64,
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
    s.push_str(&format!(
        "{:<18} {:<62} {:>8} {:>8} {:>6}\n",
        "PROGRAM", "CASE", "1 RULE", "MANY", "RATIO"
    ));
    for k in &c.cases {
        s.push_str(&format!(
            "{:<18} {:<62} {:>6}ns {:>6}ns {:>6.3}\n",
            k.program, k.case, k.one_rule_ns, k.many_rules_ns, k.ratio
        ));
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
    packet: Segment,
    want: u32,
}

/// One packet of [`program_cost`], after its flow's first packets (`setup`).
struct ProgramCase {
    program: &'static str,
    name: &'static str,
    /// Run once each, in order, before measuring.
    setup: &'static [Step],
    packet: Segment,
    want: u32,
    mode: Mode,
}

// The flows of the cases, each by its first packet.

/// client:51000 -> host:8080, published to A:80, as it arrives on the uplink.
const INBOUND: Segment = Segment::syn(
    (ROUTER_MAC, UPLINK_MAC),
    (CLIENT, CLIENT_PORT),
    (HOST, ALLOWED_PORT),
);
/// A:80 -> client:51000, the inbound flow's reply as task A sends it to its gateway.
const INBOUND_REPLY: Segment = Segment::syn((MAC_A, BRIDGE_MAC), (TASK, 80), (CLIENT, CLIENT_PORT));
/// host:8080 -> client:51000, the inbound flow's reply as it leaves the uplink.
const INBOUND_REPLY_OUT: Segment = Segment::syn(
    (UPLINK_MAC, ROUTER_MAC),
    (HOST, ALLOWED_PORT),
    (CLIENT, CLIENT_PORT),
);
/// A:40000 -> B:80 on the bridge's subnet.
const EAST_WEST: Segment = Segment::syn((MAC_A, MAC_B), (TASK, 40000), (TASK_B, 80));
/// The host (its bridge address):45000 -> A:80, as the bridge delivers it.
const HOST_TO_TASK: Segment = Segment::syn((BRIDGE_MAC, MAC_A), (BRIDGE, 45000), (TASK, 80));

const OPEN_INBOUND: Step = Step {
    program: "tc_uplink_ingress",
    what: "set-up: the client's SYN to the published port (DNAT into task A)",
    packet: INBOUND,
    want: TC_ACT_REDIRECT,
};
const OPEN_EAST_WEST: Step = Step {
    program: "tc_task_ingress",
    what: "set-up: task A's SYN to task B (into B)",
    packet: EAST_WEST,
    want: TC_ACT_REDIRECT,
};
const OPEN_HOST_TO_TASK: Step = Step {
    program: "tc_task_egress",
    what: "set-up: the host's SYN to task A (tracked for the kernel's path)",
    packet: HOST_TO_TASK,
    want: TC_ACT_OK,
};

const PROGRAM_CASES: [ProgramCase; 7] = [
    ProgramCase {
        program: "xdp_uplink",
        name: "data segment of an inbound flow to a published port: left to tc",
        setup: &[OPEN_INBOUND],
        packet: INBOUND.data(),
        want: XDP_PASS,
        mode: Mode::Repeat,
    },
    ProgramCase {
        program: "tc_uplink_ingress",
        name: "data segment of a tracked inbound flow: DNAT into the task (fresh packet each run)",
        setup: &[OPEN_INBOUND],
        packet: INBOUND.data(),
        want: TC_ACT_REDIRECT,
        mode: Mode::Fresh,
    },
    ProgramCase {
        program: "tc_uplink_ingress",
        name: "SYN opening an inbound flow: policy, CT, DNAT into the task (fresh packet and \
               flow each run)",
        setup: &[],
        packet: INBOUND,
        want: TC_ACT_REDIRECT,
        mode: Mode::NewFlow,
    },
    ProgramCase {
        program: "tc_task_ingress",
        name: "data segment of an east-west flow, task to task: into the peer",
        setup: &[OPEN_EAST_WEST],
        packet: EAST_WEST.data(),
        want: TC_ACT_REDIRECT,
        mode: Mode::Repeat,
    },
    ProgramCase {
        program: "tc_task_ingress",
        name: "reply of an inbound flow, task to client: no FIB route via the uplink in a test \
               run, passed untranslated",
        setup: &[OPEN_INBOUND],
        packet: INBOUND_REPLY.data(),
        want: TC_ACT_OK,
        mode: Mode::Repeat,
    },
    ProgramCase {
        program: "tc_task_egress",
        name: "data segment of a host-to-task flow on the kernel's path: counted, recorded, passed",
        setup: &[OPEN_HOST_TO_TASK],
        packet: HOST_TO_TASK.data(),
        want: TC_ACT_OK,
        mode: Mode::Repeat,
    },
    ProgramCase {
        program: "tc_uplink_egress",
        name: "data segment leaving through the uplink: counted, passed",
        setup: &[],
        packet: INBOUND_REPLY_OUT.data(),
        want: TC_ACT_OK,
        mode: Mode::Repeat,
    },
];

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
    let task = |name: &str, addr, port_mappings| Task {
        task_arn: None,
        name: name.to_owned(),
        ipv4_address: addr,
        interface: None,
        interface_id: None,
        port_mappings,
        security_groups: vec![sg.group_id.clone()],
        service_name: None,
        task_definition_arn: None,
        container_id: None,
    };
    let published = PortMapping {
        container_port: 80,
        host_port: ALLOWED_PORT,
        protocol: Protocol::Tcp,
    };
    State {
        host: state::Host::default(),
        tasks: vec![
            task("a", TASK, vec![published]),
            task("b", TASK_B, Vec::new()),
        ],
        security_groups: vec![sg],
    }
}

/// A datapath in memory for `case`: tasks A (on the test device, ifindex 1, for the task
/// programs) and B with their policy, the published port, flow logging on as `ecsnet up`
/// leaves it, and the programs the case runs loaded.
fn program_world(state: &State, policy: &Compiled, case: &ProgramCase) -> Result<Ebpf, CostError> {
    let mut ebpf = Ebpf::load(DATAPATH)?;
    let a = IfaceInfo {
        ipv4: be(TASK),
        role: ROLE_TASK,
        _pad: [0; 3],
    };
    insert(&mut ebpf, "IFACES", [(TEST_IFINDEX, a)])?;
    // For the task programs task A really is on the test device, as on a host, so that
    // tc_task_ingress finds it by its address alone (its one-lookup path).
    let ifindex_a = if case.program.contains("task") {
        TEST_IFINDEX
    } else {
        IFINDEX_A
    };
    seed_state(&mut ebpf, state, policy, |addr| {
        if addr == TASK {
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
        window_start_ns: flowlog::monotonic_ns(),
        event_cost_ns,
        event_burst_ns,
    };
    set_first(&mut ebpf, "FLOW_STATE", st)?;
    let mut names: Vec<&'static str> = case.setup.iter().map(|s| s.program).collect();
    names.push(case.program);
    names.sort_unstable();
    names.dedup();
    load_programs(&mut ebpf, &names)?;
    Ok(ebpf)
}

/// Makes the test device (ifindex 1) the uplink for the uplink programs; for the task programs
/// it is task A's interface (in IFACES throughout) and the uplink is nowhere.
fn device_for(ebpf: &mut Ebpf, program: &str) -> Result<(), CostError> {
    let uplink = if program.contains("uplink") {
        TEST_IFINDEX
    } else {
        NO_SUCH_IFINDEX
    };
    set_first(ebpf, "CONFIG", config(uplink))
}

/// The keys of the CT, CT_NEW and FLOWS maps at one moment.
struct FlowTables {
    ct: Vec<CtKey>,
    ct_new: Vec<CtKey>,
    flows: Vec<FlowKey>,
}

fn flow_tables(ebpf: &Ebpf) -> Result<FlowTables, CostError> {
    let get = |name: &'static str| {
        ebpf.map(name).ok_or(CostError::Map(
            name,
            aya::maps::MapError::InvalidName { name: name.into() },
        ))
    };
    let ct: HashMap<&MapData, CtKey, CtEntry> =
        HashMap::try_from(get("CT")?).map_err(|e| CostError::Map("CT", e))?;
    let ct_new: HashMap<&MapData, CtKey, CtEntry> =
        HashMap::try_from(get("CT_NEW")?).map_err(|e| CostError::Map("CT_NEW", e))?;
    let flows: PerCpuHashMap<&MapData, FlowKey, FlowStats> =
        PerCpuHashMap::try_from(get("FLOWS")?).map_err(|e| CostError::Map("FLOWS", e))?;
    Ok(FlowTables {
        ct: ct
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| CostError::Map("CT", e))?,
        ct_new: ct_new
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| CostError::Map("CT_NEW", e))?,
        flows: flows
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| CostError::Map("FLOWS", e))?,
    })
}

/// Deletes the CT and FLOWS entries that are not in `keep`.
fn forget_flows(ebpf: &mut Ebpf, keep: &FlowTables) -> Result<(), CostError> {
    let now = flow_tables(ebpf)?;
    let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
        HashMap::try_from(map(ebpf, "CT")?).map_err(|e| CostError::Map("CT", e))?;
    for k in now.ct.iter().filter(|k| !keep.ct.contains(k)) {
        m.remove(k).map_err(|e| CostError::Map("CT", e))?;
    }
    let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
        HashMap::try_from(map(ebpf, "CT_NEW")?).map_err(|e| CostError::Map("CT_NEW", e))?;
    for k in now.ct_new.iter().filter(|k| !keep.ct_new.contains(k)) {
        m.remove(k).map_err(|e| CostError::Map("CT_NEW", e))?;
    }
    let mut m: PerCpuHashMap<&mut MapData, FlowKey, FlowStats> =
        PerCpuHashMap::try_from(map(ebpf, "FLOWS")?).map_err(|e| CostError::Map("FLOWS", e))?;
    for k in now.flows.iter().filter(|k| !keep.flows.contains(k)) {
        m.remove(k).map_err(|e| CostError::Map("FLOWS", e))?;
    }
    Ok(())
}

/// Most single runs one measurement of a packet-rewriting case makes.
const MAX_SINGLE_RUNS: u32 = 3_000;

/// One measurement of `case` on `frame`: (average nanoseconds per run, verdict).
fn measure(
    ebpf: &mut Ebpf,
    case: &ProgramCase,
    frame: &[u8],
    repeat: u32,
    keep: &FlowTables,
) -> Result<(u64, u32), CostError> {
    if case.mode == Mode::Repeat {
        let r = test_run(ebpf, case.program, frame, repeat)?;
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
        let r = test_run(ebpf, case.program, frame, 1)?;
        expect(case.name, r.verdict, case.want)?;
        total += r.ns;
        if case.mode == Mode::NewFlow {
            forget_flows(ebpf, keep)?;
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
    for case in &PROGRAM_CASES {
        let mut ebpf = program_world(&state, &policy, case)?;
        for step in case.setup {
            device_for(&mut ebpf, step.program)?;
            let r = test_run(&ebpf, step.program, &step.packet.frame(), 1)?;
            expect(step.what, r.verdict, step.want)?;
        }
        device_for(&mut ebpf, case.program)?;
        let frame = case.packet.frame();
        let keep = flow_tables(&ebpf)?;
        // A warm-up measurement, then the rounds.
        let (_, mut verdict) = measure(&mut ebpf, case, &frame, repeat, &keep)?;
        let mut ns = Vec::new();
        for _ in 0..rounds.max(1) {
            let (n, v) = measure(&mut ebpf, case, &frame, repeat, &keep)?;
            ns.push(n);
            verdict = v;
        }
        costs.push(ProgramCost {
            program: case.program,
            case: case.name,
            ns: median(ns),
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
        s.push_str(&format!(
            "{:<pw$}  {:<cw$}  {:>10}  {} ({})\n",
            k.program,
            k.case,
            k.ns,
            verdict_name(k.program, k.verdict),
            k.verdict
        ));
    }
    s
}
