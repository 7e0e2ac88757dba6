//! Per-packet cost of the datapath's programs, from `BPF_PROG_TEST_RUN` with repeat, on a copy of
//! the datapath loaded in memory (nothing attached, nothing pinned). Today it answers one
//! question of SPEC §6: does a policy check cost the same with 1 rule and with 10,000?
//!
//! Two copies are loaded: one whose task has a single inbound rule, one whose task is in
//! `groups` security groups holding `rules` rules in all (the same rule among them). Each case
//! is a packet that makes the program do a full policy check and leaves no state behind (a SYN
//! XDP lets pass, a SYN XDP or tc drops), so every repeat costs the same. Rounds alternate
//! between the two copies; the medians are reported.

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use ecsnet_common::{
    maps::{Config, IfaceInfo, PortKey, PortTarget, ROLE_UPLINK, TaskInfo},
    policy::{PeerKey, PeerRules, RuleKey},
};
use serde::Serialize;

use crate::{
    datapath::DATAPATH,
    policy::Compiled,
    state::{self, IpPermission, IpRange, PortMapping, Protocol, SecurityGroup, State, Task},
};

/// The ifindex a test run's packet arrives on (loopback), standing in for the uplink.
const TEST_IFINDEX: u32 = 1;
const HOST: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const TASK: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
/// Host port published to container port 80, which the rule allows from the client's /24.
const ALLOWED_PORT: u16 = 8080;
/// Host port published to container port 81, which no rule allows.
const REJECTED_PORT: u16 = 8081;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("loading the datapath for test runs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
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
    let perm = |proto: &str, from: i32, to: i32, cidr: String| IpPermission {
        ip_protocol: proto.to_owned(),
        from_port: Some(from),
        to_port: Some(to),
        ip_ranges: vec![IpRange {
            cidr_ip: cidr,
            description: None,
        }],
        user_id_group_pairs: Vec::new(),
        prefix_list_ids: Vec::new(),
        ipv6_ranges: Vec::new(),
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

/// A datapath in memory with `state`'s one task and policy written to its maps.
fn loaded(state: &State) -> Result<(Ebpf, Compiled), CostError> {
    state::validate(state, state::BridgeNet::default())
        .map_err(|e| CostError::Compile(e.to_string()))?;
    let policy = Compiled::new(state, 0).map_err(|e| CostError::Compile(e.to_string()))?;
    let mut ebpf = Ebpf::load(DATAPATH)?;
    fn map<'a>(
        ebpf: &'a mut Ebpf,
        name: &'static str,
    ) -> Result<&'a mut aya::maps::Map, CostError> {
        ebpf.map_mut(name).ok_or(CostError::Map(
            name,
            aya::maps::MapError::InvalidName { name: name.into() },
        ))
    }
    {
        let mut cfg: Array<&mut MapData, Config> =
            Array::try_from(map(&mut ebpf, "CONFIG")?).map_err(|e| CostError::Map("CONFIG", e))?;
        let c = Config {
            uplink_ifindex: TEST_IFINDEX,
            uplink_ipv4: be(HOST),
            bridge_ifindex: TEST_IFINDEX,
            bridge_ipv4: be(Ipv4Addr::new(172, 17, 0, 1)),
            bridge_mac: [2, 0, 0, 0, 0, 1],
            flags: 0,
            _pad: 0,
        };
        cfg.set(0, &c, 0).map_err(|e| CostError::Map("CONFIG", e))?;
    }
    {
        let mut ifaces: HashMap<&mut MapData, u32, IfaceInfo> =
            HashMap::try_from(map(&mut ebpf, "IFACES")?)
                .map_err(|e| CostError::Map("IFACES", e))?;
        let up = IfaceInfo {
            ipv4: 0,
            role: ROLE_UPLINK,
            _pad: [0; 3],
        };
        ifaces
            .insert(&TEST_IFINDEX, &up, 0)
            .map_err(|e| CostError::Map("IFACES", e))?;
    }
    {
        let mut tasks: HashMap<&mut MapData, u32, TaskInfo> =
            HashMap::try_from(map(&mut ebpf, "TASKS")?).map_err(|e| CostError::Map("TASKS", e))?;
        let t = TaskInfo {
            ifindex: 999_999,
            mac: [2, 0, 0, 0, 0, 2],
            _pad: [0; 2],
            policy: policy.policy_of(TASK),
        };
        tasks
            .insert(&be(TASK), &t, 0)
            .map_err(|e| CostError::Map("TASKS", e))?;
    }
    {
        let mut ports: HashMap<&mut MapData, PortKey, PortTarget> =
            HashMap::try_from(map(&mut ebpf, "PORTS")?).map_err(|e| CostError::Map("PORTS", e))?;
        for pm in &state.tasks[0].port_mappings {
            let k = PortKey {
                port: pm.host_port.to_be(),
                proto: 6,
                _pad: 0,
            };
            let v = PortTarget {
                addr: be(TASK),
                port: pm.container_port.to_be(),
                _pad: [0; 2],
            };
            ports
                .insert(&k, &v, 0)
                .map_err(|e| CostError::Map("PORTS", e))?;
        }
    }
    {
        let mut peers: HashMap<&mut MapData, PeerKey, PeerRules> =
            HashMap::try_from(map(&mut ebpf, "SG_PEERS")?)
                .map_err(|e| CostError::Map("SG_PEERS", e))?;
        for (k, v) in &policy.peers {
            peers
                .insert(k, v, 0)
                .map_err(|e| CostError::Map("SG_PEERS", e))?;
        }
    }
    {
        let mut rules: HashMap<&mut MapData, RuleKey, u32> =
            HashMap::try_from(map(&mut ebpf, "SG_RULES")?)
                .map_err(|e| CostError::Map("SG_RULES", e))?;
        for (k, v) in &policy.rules {
            rules
                .insert(k, v, 0)
                .map_err(|e| CostError::Map("SG_RULES", e))?;
        }
    }
    let xdp: &mut Xdp = ebpf
        .program_mut("xdp_uplink")
        .expect("the datapath has xdp_uplink")
        .try_into()
        .map_err(|e| CostError::Program("xdp_uplink", e))?;
    xdp.load()
        .map_err(|e| CostError::Program("xdp_uplink", e))?;
    let tc: &mut SchedClassifier = ebpf
        .program_mut("tc_uplink_ingress")
        .expect("the datapath has tc_uplink_ingress")
        .try_into()
        .map_err(|e| CostError::Program("tc_uplink_ingress", e))?;
    tc.load()
        .map_err(|e| CostError::Program("tc_uplink_ingress", e))?;
    Ok((ebpf, policy))
}

/// A TCP SYN from the client to the host's `port`, Ethernet framed, checksums left zero (no
/// program that sees it checks or rewrites them).
fn syn(port: u16) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 9, 0x08, 0x00];
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&CLIENT.octets());
    p.extend_from_slice(&HOST.octets());
    p.extend_from_slice(&51000u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p
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

/// Average nanoseconds per run of `case` over `repeat` runs.
fn run(ebpf: &Ebpf, case: &Case, repeat: u32) -> Result<u64, CostError> {
    let packet = syn(case.port);
    let mut out = vec![0u8; packet.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(&packet),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let prog = ebpf.program(case.program).expect("program exists");
    let r = if case.program.starts_with("xdp") {
        let p: &Xdp = prog
            .try_into()
            .map_err(|e| CostError::Program(case.program, e))?;
        p.test_run(opts)
    } else {
        let p: &SchedClassifier = prog
            .try_into()
            .map_err(|e| CostError::Program(case.program, e))?;
        p.test_run(opts)
    }
    .map_err(|e| CostError::Program(case.program, e))?;
    if r.return_value != case.want {
        return Err(CostError::Verdict {
            case: case.name,
            got: r.return_value,
            want: case.want,
        });
    }
    Ok(r.duration.as_nanos() as u64)
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
