//! Flow accounting (`ecsnet-ebpf/src/flow.rs`) through BPF_PROG_TEST_RUN, as a table of cases.
//! Each case seeds a private datapath (tasks, published ports, CT entries, security groups, the
//! capture window and the event rate), runs frames through the task and uplink programs, and
//! then checks the exact flow-log effect: every FLOWS key and its counters summed over CPUs
//! (packets, IP bytes, AWS TCP flags, the uplink-side addresses; timestamps only for being
//! written during the case, first <= last), FLOW_LOST, the drop counters, every EVENTS record
//! and the per-CPU event budget.
//!
//! Every case is run a second time with flow logs off (`FlowState::enabled` 0): FLOWS and
//! FLOW_LOST must stay empty and everything else (verdicts, output frames, CT, FRAGS, TASKS,
//! STATS, DROPS, EVENTS, the event budget) must be exactly as with flow logs on: flow
//! accounting never changes forwarding.
//!
//! In a test run the skb's device is the loopback (ifindex 1). Task cases register ifindex 1 as
//! the interface of the task that sends (tc_task_ingress) or receives through the kernel
//! (tc_task_egress), so those records are on ifindex 1, while what the datapath delivers into a
//! task itself is recorded on the task's ifindex from TASKS (11 for A, 12 for B). Uplink cases
//! configure ifindex 1 as the uplink; task cases put the uplink on an ifindex that does not
//! exist, so no FIB lookup ever says "uplink" and nothing sent by a task is masqueraded (task
//! to the outside cannot be tested here: only the masquerade reply direction is).
//!
//! The test thread is pinned to one CPU, so the per-CPU event budget is the one of that CPU.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    panic::{AssertUnwindSafe, catch_unwind},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use ecsnet_common::{
    DropReason,
    csum::{checksum, pseudo_header},
    ct::{
        CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, KIND_MASQUERADE, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
        TCP_ACK, TCP_FIN, TCP_SYN,
    },
    flow::{
        ACTION_ACCEPT, ACTION_REJECT, EVENT_ALLOW, EVENT_DROP, Event, EventBudget, FLOW_EGRESS,
        FLOW_INGRESS, FlowKey, FlowState, FlowStats, LostKey, MAP_EVENT_BUDGET, MAP_EVENTS,
        MAP_FLOW_LOST, MAP_FLOW_STATE, MAP_FLOWS,
    },
    maps::{
        CONFIG_BLOCK_IMDS, Config, Counters, DropKey, FragKey, FragPorts, HOOK_TC_EGRESS,
        HOOK_TC_INGRESS, HOOK_XDP, IfaceInfo, PortKey, PortTarget, ROLE_TASK, StatsKey, TaskInfo,
    },
    policy::{DIR_EGRESS, DIR_INGRESS, PeerKey, PeerRules, RuleKey, scope},
};

// Verdicts.
const TC_OK: u32 = 0;
const TC_SHOT: u32 = 2;
const TC_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;

/// The skb device of BPF_PROG_TEST_RUN without ctx_in (and the XDP rx queue's): the loopback.
const TEST_IFINDEX: u32 = 1;
/// The uplink of task cases: no interface has this index (checked).
const NO_SUCH_IFINDEX: u32 = 999_999;

/// The open capture window every case starts in.
const EPOCH: u32 = 5;

// The host.
const HOST: [u8; 4] = [10, 10, 0, 1];
const BRIDGE: [u8; 4] = [172, 17, 0, 1];
/// Another address of the host, known through LOCAL_ADDRS only.
const OTHER_LOCAL: [u8; 4] = [192, 168, 77, 1];
const BRIDGE_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x01];
const UPLINK_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];

// Tasks.
const TASK_A: [u8; 4] = [172, 17, 0, 2];
const TASK_B: [u8; 4] = [172, 17, 0, 3];
const MAC_A: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
const MAC_B: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x03];
const IFINDEX_A: u32 = 11;
const IFINDEX_B: u32 = 12;
/// A container on the bridge that ecsnet does not manage (reaches tasks through the kernel).
const OTHER_CONTAINER: [u8; 4] = [172, 17, 0, 9];

// Outside.
const CLIENT: [u8; 4] = [10, 10, 0, 2];
const REMOTE: [u8; 4] = CLIENT;
const ROUTER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0xfe];
const IMDS: [u8; 4] = [169, 254, 169, 254];

/// Policy of a task that accepts TCP/80 from the bridge subnet (172.17.0.0/16) only.
const P_BRIDGE_HTTP: u32 = 1;
/// Policy of a task that may send TCP/443 only (anywhere).
const P_EGRESS_HTTPS: u32 = 2;

/// `last_seen_ns` of seeded CT entries: long ago.
const SEEDED_NS: u64 = 1_000_000;

fn addr(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

fn show_addr(x: u32) -> String {
    let b = x.to_ne_bytes();
    format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
}

// ---------------------------------------------------------------------------------------------
// Packets (a minimal copy of datapath_fixtures' builder)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        data: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        data: Vec<u8>,
    },
    /// An ICMP echo request.
    Echo { id: u16, body: Vec<u8> },
}

/// An Ethernet + IPv4 frame (20-byte IP header, DF, TTL 64).
#[derive(Clone, Debug)]
struct P {
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    l4: L4,
}

impl P {
    /// Arriving from the outside: router MAC to the uplink's MAC.
    fn new(src: [u8; 4], dst: [u8; 4], l4: L4) -> P {
        P {
            dmac: UPLINK_MAC,
            smac: ROUTER_MAC,
            src,
            dst,
            ttl: 64,
            l4,
        }
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> P {
        let data = Vec::new();
        P::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
                data,
            },
        )
    }

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, data: &[u8]) -> P {
        let data = data.to_vec();
        P::new(src, dst, L4::Udp { sport, dport, data })
    }

    fn echo(src: [u8; 4], dst: [u8; 4], id: u16, body_len: usize) -> P {
        let body = vec![0x5a; body_len];
        P::new(src, dst, L4::Echo { id, body })
    }

    /// Sent by a task with MAC `mac` to its gateway, the bridge.
    fn sent_by(mut self, mac: [u8; 6]) -> P {
        self.smac = mac;
        self.dmac = BRIDGE_MAC;
        self
    }

    /// Sent straight to the MAC of another task on the same subnet.
    fn addressed_to(mut self, mac: [u8; 6]) -> P {
        self.dmac = mac;
        self
    }

    /// Routed by the kernel to the task with MAC `mac`, as tc egress of its interface sees it.
    fn delivered_to(mut self, mac: [u8; 6]) -> P {
        self.ttl -= 1;
        self.smac = BRIDGE_MAC;
        self.dmac = mac;
        self
    }

    fn data(mut self, d: &[u8]) -> P {
        match &mut self.l4 {
            L4::Tcp { data, .. } | L4::Udp { data, .. } => *data = d.to_vec(),
            L4::Echo { .. } => panic!("data() on an echo request"),
        }
        self
    }

    fn l4(&self) -> (u8, Vec<u8>) {
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                data,
            } => {
                let mut t = Vec::new();
                t.extend(sport.to_be_bytes());
                t.extend(dport.to_be_bytes());
                // Both ends start their sequence at the same number, so an ACK of one past it
                // acknowledges the other's SYN, as a real handshake would.
                t.extend(0x1000_0001u32.to_be_bytes());
                let ack = if flags & TCP_ACK != 0 {
                    0x1000_0002u32
                } else {
                    0
                };
                t.extend(ack.to_be_bytes());
                t.extend([5 << 4, *flags]);
                t.extend(64240u16.to_be_bytes());
                t.extend([0, 0, 0, 0]); // checksum, urgent pointer
                t.extend(data);
                let c = checksum(
                    &t,
                    pseudo_header(self.src, self.dst, PROTO_TCP, t.len() as u16),
                );
                t[16..18].copy_from_slice(&c.to_be_bytes());
                (PROTO_TCP, t)
            }
            L4::Udp { sport, dport, data } => {
                let mut u = Vec::new();
                u.extend(sport.to_be_bytes());
                u.extend(dport.to_be_bytes());
                u.extend(((8 + data.len()) as u16).to_be_bytes());
                u.extend([0, 0]);
                u.extend(data);
                let c = match checksum(
                    &u,
                    pseudo_header(self.src, self.dst, PROTO_UDP, u.len() as u16),
                ) {
                    0 => 0xffff,
                    c => c,
                };
                u[6..8].copy_from_slice(&c.to_be_bytes());
                (PROTO_UDP, u)
            }
            L4::Echo { id, body } => {
                let mut m = vec![8, 0, 0, 0];
                m.extend(id.to_be_bytes());
                m.extend(1u16.to_be_bytes()); // sequence
                m.extend(body);
                let c = checksum(&m, 0);
                m[2..4].copy_from_slice(&c.to_be_bytes());
                (PROTO_ICMP, m)
            }
        }
    }

    /// The IP total length: what flow records count as bytes.
    fn ip_len(&self) -> u64 {
        20 + self.l4().1.len() as u64
    }

    fn frame(&self) -> Vec<u8> {
        let (proto, l4) = self.l4();
        let mut h = vec![0x45, 0];
        h.extend(((20 + l4.len()) as u16).to_be_bytes());
        h.extend(0x1c46u16.to_be_bytes());
        h.extend(0x4000u16.to_be_bytes()); // DF
        h.extend([self.ttl, proto, 0, 0]);
        h.extend(self.src);
        h.extend(self.dst);
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = Vec::new();
        f.extend(self.dmac);
        f.extend(self.smac);
        f.extend(0x0800u16.to_be_bytes());
        f.extend(h);
        f.extend(l4);
        f
    }
}

// ---------------------------------------------------------------------------------------------
// Tuples, keys, expected records
// ---------------------------------------------------------------------------------------------

/// `src`:`sport` -> `dst`:`dport`.
#[derive(Clone, Copy, Debug)]
struct Tuple {
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
}

fn tu(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Tuple {
    Tuple {
        src,
        sport,
        dst,
        dport,
    }
}

/// The FLOWS key of tuple `t` in window EPOCH (ports as given: 0 for ICMP).
fn fkey(ifindex: u32, dir: u8, action: u8, proto: u8, t: Tuple) -> FlowKey {
    FlowKey {
        epoch: EPOCH,
        ifindex,
        saddr: addr(t.src),
        daddr: addr(t.dst),
        sport: t.sport.to_be(),
        dport: t.dport.to_be(),
        proto,
        dir,
        action,
        _pad: 0,
    }
}

/// Sent by the task on `ifindex` (its tc ingress).
fn sent(ifindex: u32, action: u8, proto: u8, t: Tuple) -> FlowKey {
    fkey(ifindex, FLOW_EGRESS, action, proto, t)
}

/// Delivered to (or rejected for) the task on `ifindex`.
fn got(ifindex: u32, action: u8, proto: u8, t: Tuple) -> FlowKey {
    fkey(ifindex, FLOW_INGRESS, action, proto, t)
}

fn in_epoch(k: FlowKey, epoch: u32) -> FlowKey {
    FlowKey { epoch, ..k }
}

fn show_fk(k: &FlowKey) -> String {
    format!(
        "{{epoch {} ifindex {} {} {} proto {} {}:{} -> {}:{}}}",
        k.epoch,
        k.ifindex,
        if k.dir == FLOW_EGRESS {
            "egress"
        } else if k.dir == FLOW_INGRESS {
            "ingress"
        } else {
            "dir?"
        },
        if k.action == ACTION_ACCEPT {
            "ACCEPT"
        } else if k.action == ACTION_REJECT {
            "REJECT"
        } else {
            "action?"
        },
        k.proto,
        show_addr(k.saddr),
        u16::from_be(k.sport),
        show_addr(k.daddr),
        u16::from_be(k.dport),
    )
}

/// The expected counters of one FLOWS key, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowExp {
    packets: u64,
    bytes: u64,
    tcp_flags: u8,
    pkt_saddr: u32,
    pkt_daddr: u32,
}

/// An event as expected: `ts_ns` is checked to lie inside the case's run, then ignored.
fn event(kind: u8, reason: u8, ifindex: u32, hook: u8, dir: u8, proto: u8, t: Tuple) -> Event {
    Event {
        ts_ns: 0,
        suppressed: 0,
        ifindex,
        saddr: addr(t.src),
        daddr: addr(t.dst),
        sport: t.sport.to_be(),
        dport: t.dport.to_be(),
        proto,
        kind,
        reason,
        hook,
        dir,
        _pad: [0; 7],
    }
}

/// A drop event: the packet's addresses and ports as dropped; `dir` is not used (0).
fn drop_event(reason: DropReason, ifindex: u32, hook: u8, proto: u8, t: Tuple) -> Event {
    event(EVENT_DROP, reason as u8, ifindex, hook, 0, proto, t)
}

fn allow_event(ifindex: u32, hook: u8, dir: u8, proto: u8, t: Tuple) -> Event {
    event(EVENT_ALLOW, 0, ifindex, hook, dir, proto, t)
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Seed {
    /// Address, ifindex, MAC, policy.
    Task([u8; 4], u32, [u8; 6], u32),
    /// Protocol, host port, task address, container port.
    Port(u8, u16, [u8; 4], u16),
    Local([u8; 4], u32),
    Ct(CtKey, CtEntry),
    Peer(PeerKey, PeerRules),
    Rule(RuleKey),
}

/// Two tasks without policy, three published ports, one more local address.
fn world() -> Vec<Seed> {
    vec![
        Seed::Task(TASK_A, IFINDEX_A, MAC_A, 0),
        Seed::Task(TASK_B, IFINDEX_B, MAC_B, 0),
        Seed::Port(PROTO_TCP, 8080, TASK_A, 80),
        Seed::Port(PROTO_UDP, 5353, TASK_A, 53),
        Seed::Port(PROTO_TCP, 8443, TASK_B, 443),
        Seed::Local(OTHER_LOCAL, TEST_IFINDEX),
    ]
}

/// The security groups of both policies: P_BRIDGE_HTTP accepts TCP/80 from 172.17.0.0/16 and
/// nothing else; P_EGRESS_HTTPS may send TCP/443 anywhere and nothing else.
fn policies() -> Vec<Seed> {
    let bridge_net = u32::from_ne_bytes([172, 17, 0, 0]);
    vec![
        Seed::Peer(
            PeerKey {
                scope: scope(P_BRIDGE_HTTP, DIR_INGRESS),
                len: 16,
                _pad: [0; 3],
                addr: bridge_net,
            },
            PeerRules { set: 10, all: 0 },
        ),
        Seed::Rule(RuleKey {
            set: 10,
            proto: PROTO_TCP,
            len: 16,
            port: 80,
        }),
        Seed::Peer(
            PeerKey {
                scope: scope(P_EGRESS_HTTPS, DIR_EGRESS),
                len: 0,
                _pad: [0; 3],
                addr: 0,
            },
            PeerRules { set: 20, all: 0 },
        ),
        Seed::Rule(RuleKey {
            set: 20,
            proto: PROTO_TCP,
            len: 16,
            port: 443,
        }),
    ]
}

/// The world with both policies defined and `task`'s policy set to `policy`.
fn world_with_policy(task: [u8; 4], policy: u32) -> Vec<Seed> {
    let mut w = world();
    w.extend(policies());
    for s in &mut w {
        if let Seed::Task(a, _, _, p) = s
            && *a == task
        {
            *p = policy;
        }
    }
    w
}

/// `world` with `task`'s TASKS entry on the test device, as on a host where the interface the
/// program runs on is the task's own.
fn on_test_device(mut world: Vec<Seed>, task: [u8; 4]) -> Vec<Seed> {
    for s in &mut world {
        if let Seed::Task(a, ifindex, _, _) = s
            && *a == task
        {
            *ifindex = TEST_IFINDEX;
        }
    }
    world
}

fn ct_key(proto: u8, t: Tuple) -> CtKey {
    CtKey {
        saddr: addr(t.src),
        daddr: addr(t.dst),
        sport: t.sport.to_be(),
        dport: t.dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// Both CT entries of a flow whose original packets `orig` were rewritten to `nat`, as its
/// first packet (40 bytes, SYN) left them long ago.
fn ct_pair(proto: u8, orig: Tuple, nat: Tuple, kind: u8) -> [Seed; 2] {
    let okey = ct_key(proto, orig);
    let rkey = ct_key(proto, tu(nat.dst, nat.dport, nat.src, nat.sport));
    let entry = |peer: CtKey, n: Tuple, dir: u8, seen: (u64, u64, u8)| CtEntry {
        peer,
        nat_saddr: addr(n.src),
        nat_daddr: addr(n.dst),
        nat_sport: n.sport.to_be(),
        nat_dport: n.dport.to_be(),
        last_seen_ns: SEEDED_NS,
        created_ns: SEEDED_NS,
        packets: seen.0,
        bytes: seen.1,
        kind,
        dir,
        tcp_flags: seen.2,
        // Where the fixtures' segments start, as their SYN left it.
        tcp_end: if seen.2 & TCP_SYN != 0 {
            0x1000_0001
        } else {
            0
        },
        tcp_ack: 0,
        _pad: 0,
    };
    let back = tu(orig.dst, orig.dport, orig.src, orig.sport);
    [
        Seed::Ct(okey, entry(rkey, nat, DIR_ORIGINAL, (1, 40, TCP_SYN))),
        Seed::Ct(rkey, entry(okey, back, DIR_REPLY, (0, 0, 0))),
    ]
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Act {
    /// tc_task_ingress, the test device being this task's interface.
    FromTask([u8; 4], Vec<u8>),
    /// tc_task_egress, the test device being this task's interface.
    ToTask([u8; 4], Vec<u8>),
    /// tc_uplink_ingress (the test device is the uplink).
    Uplink(Vec<u8>),
    /// xdp_uplink (the test device is the uplink).
    Xdp(Vec<u8>),
    /// The agent opens a new capture window: FLOW_STATE.epoch becomes this.
    Epoch(u32),
    /// Nothing happens for this many milliseconds: the event budget refills.
    Sleep(u64),
}

impl Act {
    fn prog(&self) -> Option<&'static str> {
        match self {
            Act::FromTask(..) => Some("tc_task_ingress"),
            Act::ToTask(..) => Some("tc_task_egress"),
            Act::Uplink(_) => Some("tc_uplink_ingress"),
            Act::Xdp(_) => Some("xdp_uplink"),
            Act::Epoch(_) | Act::Sleep(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Step {
    act: Act,
    /// The program's return code (unused for `Act::Epoch`).
    verdict: u32,
}

struct Case {
    desc: &'static str,
    /// CONFIG: the test device is the uplink (else the uplink is an ifindex that does not
    /// exist).
    uplink: bool,
    block_imds: bool,
    seeds: Vec<Seed>,
    /// Events per second per CPU and the burst, events.
    rate: (u64, u64),
    /// FLOWS max_entries, when not the default.
    flows_max: Option<u32>,
    steps: Vec<Step>,
    /// The whole FLOWS map afterwards, summed over CPUs.
    flows: Vec<(FlowKey, FlowExp)>,
    /// The whole FLOW_LOST map afterwards: (ifindex, packets, bytes) in window EPOCH.
    lost: Vec<(u32, u64, u64)>,
    /// The nonzero DROPS counters afterwards.
    drops: Vec<(DropKey, u64)>,
    /// Every event in EVENTS, in order.
    events: Vec<Event>,
    /// EVENT_BUDGET summed over CPUs: (suppressed, suppressed_total).
    budget: (u64, u64),
}

impl Case {
    fn new(desc: &'static str, seeds: Vec<Seed>) -> Case {
        Case {
            desc,
            uplink: false,
            block_imds: false,
            seeds,
            rate: (1000, 100),
            flows_max: None,
            steps: Vec::new(),
            flows: Vec::new(),
            lost: Vec::new(),
            drops: Vec::new(),
            events: Vec::new(),
            budget: (0, 0),
        }
    }

    /// The test device is the uplink.
    fn on_uplink(mut self) -> Case {
        self.uplink = true;
        self
    }

    fn block_imds(mut self) -> Case {
        self.block_imds = true;
        self
    }

    fn rate(mut self, per_sec: u64, burst: u64) -> Case {
        self.rate = (per_sec, burst);
        self
    }

    fn flows_max(mut self, n: u32) -> Case {
        self.flows_max = Some(n);
        self
    }

    fn step(mut self, act: Act, verdict: u32) -> Case {
        self.steps.push(Step { act, verdict });
        self
    }

    fn task_sends(self, task: [u8; 4], p: &P, verdict: u32) -> Case {
        self.step(Act::FromTask(task, p.frame()), verdict)
    }

    fn kernel_delivers(self, task: [u8; 4], p: &P, verdict: u32) -> Case {
        self.step(Act::ToTask(task, p.frame()), verdict)
    }

    fn uplink(self, p: &P, verdict: u32) -> Case {
        self.step(Act::Uplink(p.frame()), verdict)
    }

    fn xdp(self, p: &P, verdict: u32) -> Case {
        self.step(Act::Xdp(p.frame()), verdict)
    }

    fn sleep_ms(self, ms: u64) -> Case {
        self.step(Act::Sleep(ms), 0)
    }

    fn epoch(self, epoch: u32) -> Case {
        self.step(Act::Epoch(epoch), 0)
    }

    /// The last step `n` times in all.
    fn times(mut self, n: usize) -> Case {
        let last = self.steps.last().expect("a step to repeat").clone();
        for _ in 1..n {
            self.steps.push(last.clone());
        }
        self
    }

    /// FLOWS holds `key` with (packets, bytes, AWS TCP flags) and the uplink-side addresses
    /// (pkt_saddr, pkt_daddr).
    fn flow(mut self, key: FlowKey, c: (u64, u64, u8), pkt: ([u8; 4], [u8; 4])) -> Case {
        self.flows.push((
            key,
            FlowExp {
                packets: c.0,
                bytes: c.1,
                tcp_flags: c.2,
                pkt_saddr: addr(pkt.0),
                pkt_daddr: addr(pkt.1),
            },
        ));
        self
    }

    fn lost(mut self, ifindex: u32, packets: u64, bytes: u64) -> Case {
        self.lost.push((ifindex, packets, bytes));
        self
    }

    fn drops(mut self, ifindex: u32, reason: DropReason, hook: u8, n: u64) -> Case {
        let k = DropKey {
            ifindex,
            reason: reason as u8,
            hook,
            _pad: [0; 2],
        };
        self.drops.push((k, n));
        self
    }

    fn event(mut self, e: Event) -> Case {
        self.events.push(e);
        self
    }

    fn budget(mut self, suppressed: u64, suppressed_total: u64) -> Case {
        self.budget = (suppressed, suppressed_total);
        self
    }
}

/// B (policy P_BRIDGE_HTTP) gets a SYN from the client, which its rules reject, and one from
/// a container on the bridge subnet, which they accept, both delivered by the kernel; `seeds`
/// say where B's TASKS entry is.
fn kernel_delivers_to_b_with_policy(desc: &'static str, seeds: Vec<Seed>) -> Case {
    Case::new(desc, seeds)
        .kernel_delivers(
            TASK_B,
            &P::tcp(CLIENT, 51000, TASK_B, 80, TCP_SYN).delivered_to(MAC_B),
            TC_SHOT,
        )
        .kernel_delivers(
            TASK_B,
            &P::tcp(OTHER_CONTAINER, 40000, TASK_B, 80, TCP_SYN).delivered_to(MAC_B),
            TC_OK,
        )
        .flow(
            got(
                TEST_IFINDEX,
                ACTION_REJECT,
                PROTO_TCP,
                tu(CLIENT, 51000, TASK_B, 80),
            ),
            (1, 40, 2),
            (CLIENT, TASK_B),
        )
        .flow(
            got(
                TEST_IFINDEX,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(OTHER_CONTAINER, 40000, TASK_B, 80),
            ),
            (1, 40, 2),
            (OTHER_CONTAINER, TASK_B),
        )
        .drops(TEST_IFINDEX, DropReason::SgIngress, HOOK_TC_EGRESS, 1)
        .event(drop_event(
            DropReason::SgIngress,
            TEST_IFINDEX,
            HOOK_TC_EGRESS,
            PROTO_TCP,
            tu(CLIENT, 51000, TASK_B, 80),
        ))
        .event(allow_event(
            TEST_IFINDEX,
            HOOK_TC_EGRESS,
            FLOW_INGRESS,
            PROTO_TCP,
            tu(OTHER_CONTAINER, 40000, TASK_B, 80),
        ))
}

fn cases() -> Vec<Case> {
    // East-west, A -> B.
    let ew_udp_t = tu(TASK_A, 40001, TASK_B, 53);
    let ew_udp = P::udp(TASK_A, 40001, TASK_B, 53, b"query: a.b.c")
        .sent_by(MAC_A)
        .addressed_to(MAC_B);
    let udp_len = ew_udp.ip_len();
    assert_eq!(udp_len, 40);
    let ew_tcp_t = tu(TASK_A, 40000, TASK_B, 80);
    let a_tcp = |flags| {
        P::tcp(TASK_A, 40000, TASK_B, 80, flags)
            .sent_by(MAC_A)
            .addressed_to(MAC_B)
    };
    let b_tcp = |flags| {
        P::tcp(TASK_B, 80, TASK_A, 40000, flags)
            .sent_by(MAC_B)
            .addressed_to(MAC_A)
    };
    let ping = P::echo(TASK_A, TASK_B, 0x1234, 24)
        .sent_by(MAC_A)
        .addressed_to(MAC_B);
    let ping_len = ping.ip_len();
    assert_eq!(ping_len, 52);
    // Into the published ports from the outside.
    let syn_8080 = P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN);
    let ack_8080 = P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK).data(b"hello");
    let udp_5353 = |dst| P::udp(CLIENT, 51000, dst, 5353, b"query: a.b.c");
    let in_a_80 = tu(CLIENT, 51000, TASK_A, 80);
    let in_a_53 = tu(CLIENT, 51000, TASK_A, 53);
    // B's security group drops A's UDP datagram.
    let reject_b = drop_event(
        DropReason::SgIngress,
        IFINDEX_B,
        HOOK_TC_INGRESS,
        PROTO_UDP,
        ew_udp_t,
    );

    vec![
        // 1.
        Case::new("east-west UDP A -> B, three times", world())
            .task_sends(TASK_A, &ew_udp, TC_REDIRECT)
            .times(3)
            .flow(
                sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
                (3, 3 * udp_len, 0),
                (TASK_A, TASK_B),
            )
            .flow(
                got(IFINDEX_B, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
                (3, 3 * udp_len, 0),
                (TASK_A, TASK_B),
            ),
        Case::new(
            "east-west ICMP echo A -> B: records with ports 0 (the identifier is no port)",
            world(),
        )
        .task_sends(TASK_A, &ping, TC_REDIRECT)
        .flow(
            sent(
                TEST_IFINDEX,
                ACTION_ACCEPT,
                PROTO_ICMP,
                tu(TASK_A, 0, TASK_B, 0),
            ),
            (1, ping_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            got(
                IFINDEX_B,
                ACTION_ACCEPT,
                PROTO_ICMP,
                tu(TASK_A, 0, TASK_B, 0),
            ),
            (1, ping_len, 0),
            (TASK_A, TASK_B),
        ),
        Case::new(
            "a new capture window: the packets after it count under the new epoch",
            world(),
        )
        .task_sends(TASK_A, &ew_udp, TC_REDIRECT)
        .epoch(EPOCH + 1)
        .task_sends(TASK_A, &ew_udp, TC_REDIRECT)
        .times(2)
        .flow(
            sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
            (1, udp_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            got(IFINDEX_B, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
            (1, udp_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            in_epoch(
                sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
                EPOCH + 1,
            ),
            (2, 2 * udp_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            in_epoch(
                got(IFINDEX_B, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
                EPOCH + 1,
            ),
            (2, 2 * udp_len, 0),
            (TASK_A, TASK_B),
        ),
        // 3.
        Case::new(
            "TCP flags: SYN, SYN-ACK from B, FIN-ACK, ACK: A's records 3 (SYN|FIN), B's 18",
            world(),
        )
        .task_sends(TASK_A, &a_tcp(TCP_SYN), TC_REDIRECT)
        .task_sends(TASK_B, &b_tcp(TCP_SYN | TCP_ACK), TC_REDIRECT)
        .task_sends(TASK_A, &a_tcp(TCP_FIN | TCP_ACK), TC_REDIRECT)
        .task_sends(TASK_A, &a_tcp(TCP_ACK), TC_REDIRECT)
        .flow(
            sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_TCP, ew_tcp_t),
            (3, 120, 3),
            (TASK_A, TASK_B),
        )
        .flow(
            got(IFINDEX_B, ACTION_ACCEPT, PROTO_TCP, ew_tcp_t),
            (3, 120, 3),
            (TASK_A, TASK_B),
        )
        .flow(
            sent(
                TEST_IFINDEX,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(TASK_B, 80, TASK_A, 40000),
            ),
            (1, 40, 18),
            (TASK_B, TASK_A),
        )
        .flow(
            got(
                IFINDEX_A,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(TASK_B, 80, TASK_A, 40000),
            ),
            (1, 40, 18),
            (TASK_B, TASK_A),
        ),
        // 4.
        Case::new(
            "published TCP port from the uplink: the task's record has the post-DNAT tuple and \
             the host address it was sent to",
            world(),
        )
        .on_uplink()
        .uplink(&syn_8080, TC_REDIRECT)
        .uplink(&ack_8080, TC_REDIRECT)
        .flow(
            got(IFINDEX_A, ACTION_ACCEPT, PROTO_TCP, in_a_80),
            (2, 85, 2),
            (CLIENT, HOST),
        ),
        Case::new(
            "published UDP port on a LOCAL_ADDRS address: pkt_daddr is that address",
            world(),
        )
        .on_uplink()
        .uplink(&udp_5353(OTHER_LOCAL), TC_REDIRECT)
        .flow(
            got(IFINDEX_A, ACTION_ACCEPT, PROTO_UDP, in_a_53),
            (1, 40, 0),
            (CLIENT, OTHER_LOCAL),
        ),
        // 5.
        Case::new(
            "masquerade reply (SYN-ACK to host:40000): A's record is remote -> A:40000, \
             pkt_daddr the host",
            [
                world(),
                ct_pair(
                    PROTO_TCP,
                    tu(TASK_A, 40000, REMOTE, 9000),
                    tu(HOST, 40000, REMOTE, 9000),
                    KIND_MASQUERADE,
                )
                .to_vec(),
            ]
            .concat(),
        )
        .on_uplink()
        .uplink(
            &P::tcp(REMOTE, 9000, HOST, 40000, TCP_SYN | TCP_ACK),
            TC_REDIRECT,
        )
        .flow(
            got(
                IFINDEX_A,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(REMOTE, 9000, TASK_A, 40000),
            ),
            (1, 40, 18),
            (REMOTE, HOST),
        ),
        Case::new(
            "hairpin A -> host:8443 published to B:443: A's record as sent with the translated \
             addresses, B's with the post-DNAT tuple and the host address",
            world(),
        )
        .task_sends(
            TASK_A,
            &P::tcp(TASK_A, 40000, HOST, 8443, TCP_SYN).sent_by(MAC_A),
            TC_REDIRECT,
        )
        .flow(
            sent(
                TEST_IFINDEX,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(TASK_A, 40000, HOST, 8443),
            ),
            (1, 40, 2),
            (TASK_A, TASK_B),
        )
        .flow(
            got(
                IFINDEX_B,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(TASK_A, 40000, TASK_B, 443),
            ),
            (1, 40, 2),
            (TASK_A, HOST),
        ),
        Case::new(
            "self-hairpin A -> host:8080 published to A:80: A receives it from the bridge",
            world(),
        )
        .task_sends(
            TASK_A,
            &P::tcp(TASK_A, 40000, HOST, 8080, TCP_SYN).sent_by(MAC_A),
            TC_REDIRECT,
        )
        .flow(
            sent(
                TEST_IFINDEX,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(TASK_A, 40000, HOST, 8080),
            ),
            (1, 40, 2),
            (BRIDGE, TASK_A),
        )
        .flow(
            got(
                IFINDEX_A,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(BRIDGE, 40000, TASK_A, 80),
            ),
            (1, 40, 2),
            (TASK_A, HOST),
        ),
        // 6.
        Case::new(
            "B's security group rejects UDP from A: A's record ACCEPT, B's REJECT, the drop \
             counted on B and one drop event",
            world_with_policy(TASK_B, P_BRIDGE_HTTP),
        )
        .task_sends(TASK_A, &ew_udp, TC_SHOT)
        .flow(
            sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
            (1, udp_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            got(IFINDEX_B, ACTION_REJECT, PROTO_UDP, ew_udp_t),
            (1, udp_len, 0),
            (TASK_A, TASK_B),
        )
        .drops(IFINDEX_B, DropReason::SgIngress, HOOK_TC_INGRESS, 1)
        .event(reject_b),
        Case::new(
            "B's security group accepts TCP/80 from A: both records ACCEPT, one allow event",
            world_with_policy(TASK_B, P_BRIDGE_HTTP),
        )
        .task_sends(TASK_A, &a_tcp(TCP_SYN), TC_REDIRECT)
        .flow(
            sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_TCP, ew_tcp_t),
            (1, 40, 2),
            (TASK_A, TASK_B),
        )
        .flow(
            got(IFINDEX_B, ACTION_ACCEPT, PROTO_TCP, ew_tcp_t),
            (1, 40, 2),
            (TASK_A, TASK_B),
        )
        .event(allow_event(
            IFINDEX_B,
            HOOK_TC_INGRESS,
            FLOW_INGRESS,
            PROTO_TCP,
            ew_tcp_t,
        )),
        Case::new(
            "A's own security group: UDP to B rejected (A's record REJECT, nothing for B), \
             TCP/443 to B allowed (an allow event for A)",
            world_with_policy(TASK_A, P_EGRESS_HTTPS),
        )
        .task_sends(TASK_A, &ew_udp, TC_SHOT)
        .task_sends(
            TASK_A,
            &P::tcp(TASK_A, 40000, TASK_B, 443, TCP_SYN)
                .sent_by(MAC_A)
                .addressed_to(MAC_B),
            TC_REDIRECT,
        )
        .flow(
            sent(TEST_IFINDEX, ACTION_REJECT, PROTO_UDP, ew_udp_t),
            (1, udp_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            sent(
                TEST_IFINDEX,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(TASK_A, 40000, TASK_B, 443),
            ),
            (1, 40, 2),
            (TASK_A, TASK_B),
        )
        .flow(
            got(
                IFINDEX_B,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(TASK_A, 40000, TASK_B, 443),
            ),
            (1, 40, 2),
            (TASK_A, TASK_B),
        )
        .drops(TEST_IFINDEX, DropReason::SgEgress, HOOK_TC_INGRESS, 1)
        .event(drop_event(
            DropReason::SgEgress,
            TEST_IFINDEX,
            HOOK_TC_INGRESS,
            PROTO_UDP,
            ew_udp_t,
        ))
        // The allow event names the task's interface from TASKS (11), the flow records the
        // skb's (1): the same interface in production.
        .event(allow_event(
            IFINDEX_A,
            HOOK_TC_INGRESS,
            FLOW_EGRESS,
            PROTO_TCP,
            tu(TASK_A, 40000, TASK_B, 443),
        )),
        Case::new(
            "IPv6 from a task under a policy: dropped IPV6_POLICED, no record, one drop event",
            world_with_policy(TASK_A, P_EGRESS_HTTPS),
        )
        .step(
            Act::FromTask(TASK_A, ecsnet_tests::raw::ipv6_frame(MAC_B, MAC_A)),
            TC_SHOT,
        )
        .drops(TEST_IFINDEX, DropReason::Ipv6Policed, HOOK_TC_INGRESS, 1)
        .event(drop_event(
            DropReason::Ipv6Policed,
            TEST_IFINDEX,
            HOOK_TC_INGRESS,
            0,
            tu([0; 4], 0, [0; 4], 0),
        )),
        Case::new(
            "IPv6 to a task under a policy: dropped IPV6_POLICED on its interface, one event",
            world_with_policy(TASK_A, P_BRIDGE_HTTP),
        )
        .step(
            Act::ToTask(TASK_A, ecsnet_tests::raw::ipv6_frame(MAC_A, MAC_B)),
            TC_SHOT,
        )
        .drops(TEST_IFINDEX, DropReason::Ipv6Policed, HOOK_TC_EGRESS, 1)
        .event(drop_event(
            DropReason::Ipv6Policed,
            TEST_IFINDEX,
            HOOK_TC_EGRESS,
            0,
            tu([0; 4], 0, [0; 4], 0),
        )),
        Case::new(
            "instance metadata blocked: A's record REJECT, the drop and its event on A",
            world(),
        )
        .block_imds()
        .task_sends(
            TASK_A,
            &P::tcp(TASK_A, 40000, IMDS, 80, TCP_SYN).sent_by(MAC_A),
            TC_SHOT,
        )
        .flow(
            sent(
                TEST_IFINDEX,
                ACTION_REJECT,
                PROTO_TCP,
                tu(TASK_A, 40000, IMDS, 80),
            ),
            (1, 40, 2),
            (TASK_A, IMDS),
        )
        .drops(TEST_IFINDEX, DropReason::ImdsBlocked, HOOK_TC_INGRESS, 1)
        .event(drop_event(
            DropReason::ImdsBlocked,
            TEST_IFINDEX,
            HOOK_TC_INGRESS,
            PROTO_TCP,
            tu(TASK_A, 40000, IMDS, 80),
        )),
        Case::new(
            "published port whose task rejects the client, at tc: A's REJECT record has the \
             post-DNAT tuple and the host address",
            world_with_policy(TASK_A, P_BRIDGE_HTTP),
        )
        .on_uplink()
        .uplink(&syn_8080, TC_SHOT)
        .flow(
            got(IFINDEX_A, ACTION_REJECT, PROTO_TCP, in_a_80),
            (1, 40, 2),
            (CLIENT, HOST),
        )
        .drops(IFINDEX_A, DropReason::SgIngress, HOOK_TC_INGRESS, 1)
        .event(drop_event(
            DropReason::SgIngress,
            IFINDEX_A,
            HOOK_TC_INGRESS,
            PROTO_TCP,
            tu(CLIENT, 51000, HOST, 8080),
        )),
        Case::new(
            "the same SYN at XDP (early_policy): the same REJECT record tc would have written",
            world_with_policy(TASK_A, P_BRIDGE_HTTP),
        )
        .on_uplink()
        .xdp(&syn_8080, XDP_DROP)
        .flow(
            got(IFINDEX_A, ACTION_REJECT, PROTO_TCP, in_a_80),
            (1, 40, 2),
            (CLIENT, HOST),
        )
        .drops(IFINDEX_A, DropReason::SgIngress, HOOK_XDP, 1)
        .event(drop_event(
            DropReason::SgIngress,
            IFINDEX_A,
            HOOK_XDP,
            PROTO_TCP,
            tu(CLIENT, 51000, HOST, 8080),
        )),
        Case::new(
            "delivered by the kernel to B without policy (tc egress): B's ingress record",
            world(),
        )
        .kernel_delivers(
            TASK_B,
            &P::tcp(CLIENT, 51000, TASK_B, 80, TCP_SYN).delivered_to(MAC_B),
            TC_OK,
        )
        .flow(
            got(
                TEST_IFINDEX,
                ACTION_ACCEPT,
                PROTO_TCP,
                tu(CLIENT, 51000, TASK_B, 80),
            ),
            (1, 40, 2),
            (CLIENT, TASK_B),
        ),
        kernel_delivers_to_b_with_policy(
            "delivered by the kernel to B with policy (tc egress): the client rejected, the \
             bridge-subnet container accepted",
            world_with_policy(TASK_B, P_BRIDGE_HTTP),
        ),
        kernel_delivers_to_b_with_policy(
            "delivered by the kernel to B with policy, B's TASKS entry on the test device (the \
             one-lookup path): the client rejected, the bridge-subnet container accepted",
            on_test_device(world_with_policy(TASK_B, P_BRIDGE_HTTP), TASK_B),
        ),
        Case::new(
            "delivered by the kernel on B's interface but addressed to A (no policy, on another \
             interface): B's rules judge it, as the interface's task, and reject the client",
            on_test_device(world_with_policy(TASK_B, P_BRIDGE_HTTP), TASK_B),
        )
        .kernel_delivers(
            TASK_B,
            &P::tcp(CLIENT, 51000, TASK_A, 80, TCP_SYN).delivered_to(MAC_B),
            TC_SHOT,
        )
        .flow(
            got(
                TEST_IFINDEX,
                ACTION_REJECT,
                PROTO_TCP,
                tu(CLIENT, 51000, TASK_A, 80),
            ),
            (1, 40, 2),
            (CLIENT, TASK_A),
        )
        .drops(TEST_IFINDEX, DropReason::SgIngress, HOOK_TC_EGRESS, 1)
        .event(drop_event(
            DropReason::SgIngress,
            TEST_IFINDEX,
            HOOK_TC_EGRESS,
            PROTO_TCP,
            tu(CLIENT, 51000, TASK_A, 80),
        )),
        // 7.
        Case::new(
            "flow table of one entry: the first flow is counted, the second one's packets are \
             lost on its task's interface",
            world(),
        )
        .on_uplink()
        .flows_max(1)
        .uplink(&udp_5353(HOST), TC_REDIRECT)
        .uplink(&P::tcp(CLIENT, 51000, HOST, 8443, TCP_SYN), TC_REDIRECT)
        .uplink(&udp_5353(HOST), TC_REDIRECT)
        .uplink(
            &P::tcp(CLIENT, 51000, HOST, 8443, TCP_ACK).data(b"hello"),
            TC_REDIRECT,
        )
        .flow(
            got(IFINDEX_A, ACTION_ACCEPT, PROTO_UDP, in_a_53),
            (2, 80, 0),
            (CLIENT, HOST),
        )
        .lost(IFINDEX_B, 2, 85),
        // 8.
        Case::new(
            "10 rejected packets at 1 event/s with a burst of 3: 3 events, 7 suppressed, \
             every drop and packet still counted (the 10 runs take far less than a second)",
            world_with_policy(TASK_B, P_BRIDGE_HTTP),
        )
        .rate(1, 3)
        .task_sends(TASK_A, &ew_udp, TC_SHOT)
        .times(10)
        .flow(
            sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
            (10, 10 * udp_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            got(IFINDEX_B, ACTION_REJECT, PROTO_UDP, ew_udp_t),
            (10, 10 * udp_len, 0),
            (TASK_A, TASK_B),
        )
        .drops(IFINDEX_B, DropReason::SgIngress, HOOK_TC_INGRESS, 10)
        .event(reject_b)
        .event(reject_b)
        .event(reject_b)
        .budget(7, 7),
        Case::new(
            "the same burst at 2 events/s, then a pause of more than one event's cost and one \
             more rejected packet: its event carries the 7 suppressed before it",
            world_with_policy(TASK_B, P_BRIDGE_HTTP),
        )
        .rate(2, 3)
        .task_sends(TASK_A, &ew_udp, TC_SHOT)
        .times(10)
        .sleep_ms(700)
        .task_sends(TASK_A, &ew_udp, TC_SHOT)
        .flow(
            sent(TEST_IFINDEX, ACTION_ACCEPT, PROTO_UDP, ew_udp_t),
            (11, 11 * udp_len, 0),
            (TASK_A, TASK_B),
        )
        .flow(
            got(IFINDEX_B, ACTION_REJECT, PROTO_UDP, ew_udp_t),
            (11, 11 * udp_len, 0),
            (TASK_A, TASK_B),
        )
        .drops(IFINDEX_B, DropReason::SgIngress, HOOK_TC_INGRESS, 11)
        .event(reject_b)
        .event(reject_b)
        .event(reject_b)
        .event(Event {
            suppressed: 7,
            ..reject_b
        })
        .budget(0, 7),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// CLOCK_MONOTONIC_COARSE: the clock the datapath stamps flow records and conntrack entries
/// with, which lags CLOCK_MONOTONIC by up to a tick. Events keep the precise clock.
fn coarse_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Everything a case leaves behind that the datapath decides.
struct Outcome {
    /// Return code and output frame of every packet step.
    results: Vec<(u32, Vec<u8>)>,
    /// Both connection tables: each entry with the name of its table.
    ct: StdHashMap<CtKey, (&'static str, CtEntry)>,
    frags: StdHashMap<FragKey, FragPorts>,
    tasks: StdHashMap<u32, TaskInfo>,
    /// Nonzero STATS, summed over CPUs.
    stats: StdHashMap<StatsKey, (u64, u64)>,
    /// Nonzero DROPS, summed over CPUs.
    drops: StdHashMap<DropKey, u64>,
    /// FLOWS merged over CPUs.
    flows: StdHashMap<FlowKey, FlowStats>,
    lost: StdHashMap<LostKey, (u64, u64)>,
    events: Vec<Event>,
    /// EVENT_BUDGET summed over CPUs: (suppressed, suppressed_total).
    budget: (u64, u64),
    /// CLOCK_MONOTONIC before the first and after the last step.
    t0: u64,
    t1: u64,
    /// CLOCK_MONOTONIC_COARSE before the first step: the earliest stamp of a flow record.
    t0_coarse: u64,
}

/// One private datapath for a case.
struct Fixture {
    ebpf: Ebpf,
}

impl Fixture {
    fn new(c: &Case, enabled: bool) -> Fixture {
        let mut loader = EbpfLoader::new();
        if let Some(n) = c.flows_max {
            loader.map_max_entries(MAP_FLOWS, n);
        }
        let mut ebpf = loader
            .load(ecsnet::kernel::datapath::DATAPATH)
            .expect("the datapath object loads: does this kernel have BTF and tcx?");
        {
            let mut m: Array<&mut MapData, Config> =
                Array::try_from(ebpf.map_mut("CONFIG").unwrap()).unwrap();
            let cfg = Config {
                uplink_ifindex: if c.uplink {
                    TEST_IFINDEX
                } else {
                    NO_SUCH_IFINDEX
                },
                uplink_ipv4: addr(HOST),
                bridge_ifindex: TEST_IFINDEX,
                bridge_ipv4: addr(BRIDGE),
                bridge_mac: BRIDGE_MAC,
                flags: if c.block_imds { CONFIG_BLOCK_IMDS } else { 0 },
                bridge_prefix: 16,
            };
            m.set(0, &cfg, 0).unwrap();
        }
        {
            let mut m: Array<&mut MapData, FlowState> =
                Array::try_from(ebpf.map_mut(MAP_FLOW_STATE).unwrap()).unwrap();
            let cost = 1_000_000_000 / c.rate.0;
            let st = FlowState {
                epoch: EPOCH,
                enabled: enabled as u8,
                _pad: [0; 3],
                window_start_ns: now_ns(),
                event_cost_ns: cost,
                event_burst_ns: cost * c.rate.1,
            };
            m.set(0, &st, 0).unwrap();
        }
        for s in &c.seeds {
            match *s {
                Seed::Task(a, ifindex, mac, policy) => {
                    let mut m: HashMap<&mut MapData, u32, TaskInfo> =
                        HashMap::try_from(ebpf.map_mut("TASKS").unwrap()).unwrap();
                    let v = TaskInfo {
                        ifindex,
                        mac,
                        _pad: [0; 2],
                        policy,
                    };
                    m.insert(&addr(a), &v, 0).unwrap();
                }
                Seed::Port(proto, hport, a, port) => {
                    let mut m: HashMap<&mut MapData, PortKey, PortTarget> =
                        HashMap::try_from(ebpf.map_mut("PORTS").unwrap()).unwrap();
                    let k = PortKey {
                        port: hport.to_be(),
                        proto,
                        _pad: 0,
                    };
                    let v = PortTarget {
                        addr: addr(a),
                        port: port.to_be(),
                        _pad: [0; 2],
                    };
                    m.insert(&k, &v, 0).unwrap();
                }
                Seed::Local(a, ifindex) => {
                    let mut m: HashMap<&mut MapData, u32, u32> =
                        HashMap::try_from(ebpf.map_mut("LOCAL_ADDRS").unwrap()).unwrap();
                    m.insert(&addr(a), &ifindex, 0).unwrap();
                }
                Seed::Ct(k, e) => {
                    // Seeded flows are assured ones.
                    let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
                        HashMap::try_from(ebpf.map_mut("CT").unwrap()).unwrap();
                    m.insert(&k, &e, 0).unwrap();
                }
                Seed::Peer(k, v) => {
                    let mut m: HashMap<&mut MapData, PeerKey, PeerRules> =
                        HashMap::try_from(ebpf.map_mut("SG_PEERS").unwrap()).unwrap();
                    m.insert(&k, &v, 0).unwrap();
                }
                Seed::Rule(k) => {
                    let mut m: HashMap<&mut MapData, RuleKey, u32> =
                        HashMap::try_from(ebpf.map_mut("SG_RULES").unwrap()).unwrap();
                    m.insert(&k, &1, 0).unwrap();
                }
            }
        }
        let progs: BTreeSet<&str> = c.steps.iter().filter_map(|s| s.act.prog()).collect();
        for name in progs {
            if name == "xdp_uplink" {
                let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
                p.load().unwrap();
            } else {
                let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
                p.load().unwrap();
            }
        }
        ecsnet::kernel::datapath::load_tail_called(&mut ebpf)
            .expect("the tail-called programs load");
        Fixture { ebpf }
    }

    /// Registers the test device as `task`'s interface.
    fn device_is(&mut self, task: [u8; 4]) {
        let mut m: HashMap<&mut MapData, u32, IfaceInfo> =
            HashMap::try_from(self.ebpf.map_mut("IFACES").unwrap()).unwrap();
        let v = IfaceInfo {
            ipv4: addr(task),
            role: ROLE_TASK,
            _pad: [0; 3],
        };
        m.insert(&TEST_IFINDEX, &v, 0).unwrap();
    }

    fn set_epoch(&mut self, epoch: u32) {
        let mut m: Array<&mut MapData, FlowState> =
            Array::try_from(self.ebpf.map_mut(MAP_FLOW_STATE).unwrap()).unwrap();
        let mut st = m.get(&0, 0).unwrap();
        st.epoch = epoch;
        st.window_start_ns = now_ns();
        m.set(0, &st, 0).unwrap();
    }

    /// BPF_PROG_TEST_RUN of `name`: (return code, output frame).
    fn run(&self, name: &str, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let prog = self.ebpf.program(name).unwrap();
        let r = if name == "xdp_uplink" {
            let p: &Xdp = prog.try_into().unwrap();
            p.test_run(opts)
        } else {
            let p: &SchedClassifier = prog.try_into().unwrap();
            p.test_run(opts)
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn hash<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
        &self,
        name: &str,
    ) -> StdHashMap<K, V> {
        let m: HashMap<&MapData, K, V> = HashMap::try_from(self.ebpf.map(name).unwrap()).unwrap();
        m.iter().map(|r| r.unwrap()).collect()
    }

    fn counters<K: aya::Pod + Eq + std::hash::Hash>(
        &self,
        name: &str,
    ) -> StdHashMap<K, (u64, u64)> {
        let m: PerCpuHashMap<&MapData, K, Counters> =
            PerCpuHashMap::try_from(self.ebpf.map(name).unwrap()).unwrap();
        m.iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                let sum = v
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                (k, sum)
            })
            .filter(|(_, s)| *s != (0, 0))
            .collect()
    }

    fn drops(&self) -> StdHashMap<DropKey, u64> {
        let m: PerCpuHashMap<&MapData, DropKey, u64> =
            PerCpuHashMap::try_from(self.ebpf.map("DROPS").unwrap()).unwrap();
        m.iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k, v.iter().sum::<u64>())
            })
            .filter(|(_, n)| *n != 0)
            .collect()
    }

    fn flows(&self) -> StdHashMap<FlowKey, FlowStats> {
        let m: PerCpuHashMap<&MapData, FlowKey, FlowStats> =
            PerCpuHashMap::try_from(self.ebpf.map(MAP_FLOWS).unwrap()).unwrap();
        m.iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k, merge(&v))
            })
            .collect()
    }

    fn events(&mut self) -> Vec<Event> {
        let mut rb = RingBuf::try_from(self.ebpf.map_mut(MAP_EVENTS).unwrap()).unwrap();
        let mut out = Vec::new();
        while let Some(item) = rb.next() {
            assert_eq!(
                item.len(),
                size_of::<Event>(),
                "an EVENTS record is not one Event"
            );
            // SAFETY: an Event is plain data of exactly this size.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
        }
        out
    }

    fn budget(&self) -> (u64, u64) {
        let m: PerCpuArray<&MapData, EventBudget> =
            PerCpuArray::try_from(self.ebpf.map(MAP_EVENT_BUDGET).unwrap()).unwrap();
        let v = m.get(&0, 0).unwrap();
        v.iter().fold((0, 0), |(s, t), b| {
            (s + b.suppressed, t + b.suppressed_total)
        })
    }
}

/// One flow's counters over all CPUs: sums, the earliest first and the latest last packet, the
/// OR of the flags and the uplink-side addresses of the latest packet.
fn merge(per_cpu: &[FlowStats]) -> FlowStats {
    let mut out = FlowStats::default();
    for v in per_cpu.iter().filter(|v| v.packets != 0) {
        if out.packets == 0 || v.first_ns < out.first_ns {
            out.first_ns = v.first_ns;
        }
        if v.last_ns >= out.last_ns {
            out.last_ns = v.last_ns;
            out.pkt_saddr = v.pkt_saddr;
            out.pkt_daddr = v.pkt_daddr;
        }
        out.packets += v.packets;
        out.bytes += v.bytes;
        out.tcp_flags |= v.tcp_flags;
    }
    out
}

/// Runs a case with flow logs on or off.
fn run_case(c: &Case, enabled: bool) -> Outcome {
    let mut fx = Fixture::new(c, enabled);
    let mut results = Vec::new();
    let t0_coarse = coarse_ns();
    let t0 = now_ns();
    for s in &c.steps {
        let (name, frame) = match &s.act {
            Act::FromTask(task, f) | Act::ToTask(task, f) => {
                fx.device_is(*task);
                (s.act.prog().unwrap(), f)
            }
            Act::Uplink(f) | Act::Xdp(f) => (s.act.prog().unwrap(), f),
            Act::Sleep(ms) => {
                std::thread::sleep(std::time::Duration::from_millis(*ms));
                continue;
            }
            Act::Epoch(e) => {
                fx.set_epoch(*e);
                continue;
            }
        };
        results.push(fx.run(name, frame));
    }
    let t1 = now_ns();
    let mut ct = StdHashMap::new();
    for table in ["CT", "CT_NEW"] {
        let entries: StdHashMap<CtKey, CtEntry> = fx.hash(table);
        for (k, mut e) in entries {
            e.last_seen_ns = 0;
            e.created_ns = 0;
            ct.insert(k, (table, e));
        }
    }
    Outcome {
        results,
        ct,
        frags: fx.hash("FRAGS"),
        tasks: fx.hash("TASKS"),
        stats: fx.counters("STATS"),
        drops: fx.drops(),
        flows: fx.flows(),
        lost: fx.counters(MAP_FLOW_LOST),
        events: fx.events(),
        budget: fx.budget(),
        t0,
        t1,
        t0_coarse,
    }
}

/// Compares a flow-logs-on outcome with the case's expectations.
fn check_expected(c: &Case, o: &Outcome) -> Result<(), String> {
    let mut errs = Vec::new();
    let verdicts: Vec<u32> = c
        .steps
        .iter()
        .filter(|s| s.act.prog().is_some())
        .map(|s| s.verdict)
        .collect();
    let got: Vec<u32> = o.results.iter().map(|r| r.0).collect();
    if got != verdicts {
        errs.push(format!("verdicts {got:?}, expected {verdicts:?}"));
    }

    let mut flows = o.flows.clone();
    for (k, want) in &c.flows {
        let Some(g) = flows.remove(k) else {
            errs.push(format!("FLOWS: {} missing", show_fk(k)));
            continue;
        };
        let have = FlowExp {
            packets: g.packets,
            bytes: g.bytes,
            tcp_flags: g.tcp_flags,
            pkt_saddr: g.pkt_saddr,
            pkt_daddr: g.pkt_daddr,
        };
        if have != *want {
            errs.push(format!(
                "FLOWS {}: packets {} bytes {} tcp_flags {} pkt {} -> {}; want packets {} \
                 bytes {} tcp_flags {} pkt {} -> {}",
                show_fk(k),
                have.packets,
                have.bytes,
                have.tcp_flags,
                show_addr(have.pkt_saddr),
                show_addr(have.pkt_daddr),
                want.packets,
                want.bytes,
                want.tcp_flags,
                show_addr(want.pkt_saddr),
                show_addr(want.pkt_daddr),
            ));
        }
        if !(o.t0_coarse <= g.first_ns && g.first_ns <= g.last_ns && g.last_ns <= o.t1) {
            errs.push(format!(
                "FLOWS {}: first_ns {} last_ns {} not first <= last inside the run [{}, {}]",
                show_fk(k),
                g.first_ns,
                g.last_ns,
                o.t0_coarse,
                o.t1
            ));
        }
        if g._pad != [0; 7] {
            errs.push(format!("FLOWS {}: padding {:?}", show_fk(k), g._pad));
        }
    }
    for (k, v) in flows {
        errs.push(format!("unexpected FLOWS entry {}: {v:?}", show_fk(&k)));
    }

    let want_lost: StdHashMap<LostKey, (u64, u64)> = c
        .lost
        .iter()
        .map(|&(ifindex, p, b)| {
            (
                LostKey {
                    epoch: EPOCH,
                    ifindex,
                },
                (p, b),
            )
        })
        .collect();
    if o.lost != want_lost {
        errs.push(format!("FLOW_LOST: got {:?}, want {want_lost:?}", o.lost));
    }

    let want_drops: StdHashMap<DropKey, u64> = c.drops.iter().copied().collect();
    if o.drops != want_drops {
        errs.push(format!("DROPS: got {:?}, want {want_drops:?}", o.drops));
    }

    let mut events = o.events.clone();
    for (i, e) in events.iter_mut().enumerate() {
        if !(o.t0..=o.t1).contains(&e.ts_ns) {
            errs.push(format!(
                "event {i}: ts_ns {} not inside the run [{}, {}]",
                e.ts_ns, o.t0, o.t1
            ));
        }
        e.ts_ns = 0;
    }
    if events != c.events {
        errs.push(format!(
            "EVENTS: got {} events {events:#?}\n  want {} events {:#?}",
            events.len(),
            c.events.len(),
            c.events
        ));
    }

    if o.budget != c.budget {
        errs.push(format!(
            "EVENT_BUDGET (suppressed, suppressed_total) summed over CPUs: got {:?}, want {:?}",
            o.budget, c.budget
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n  "))
    }
}

/// Compares a flow-logs-off outcome with the flow-logs-on one: no flow counted, nothing else
/// different.
fn check_off(on: &Outcome, off: &Outcome) -> Result<(), String> {
    let mut errs = Vec::new();
    if !off.flows.is_empty() {
        errs.push(format!(
            "flow logs off, but FLOWS has {} entries: {:?}",
            off.flows.len(),
            off.flows.keys().map(show_fk).collect::<Vec<_>>()
        ));
    }
    if !off.lost.is_empty() {
        errs.push(format!("flow logs off, but FLOW_LOST is {:?}", off.lost));
    }
    for (i, (a, b)) in on.results.iter().zip(&off.results).enumerate() {
        if a.0 != b.0 {
            errs.push(format!("step {i}: verdict {} off, {} on", b.0, a.0));
        }
        if a.1 != b.1 {
            errs.push(format!("step {i}: the output frame differs off and on"));
        }
    }
    if on.results.len() != off.results.len() {
        errs.push("a different number of runs".into());
    }
    if on.ct != off.ct {
        errs.push(format!("CT: off {:?}\n  on {:?}", off.ct, on.ct));
    }
    if on.frags != off.frags {
        errs.push(format!("FRAGS: off {:?}, on {:?}", off.frags, on.frags));
    }
    if on.tasks != off.tasks {
        errs.push(format!("TASKS: off {:?}, on {:?}", off.tasks, on.tasks));
    }
    if on.stats != off.stats {
        errs.push(format!("STATS: off {:?}, on {:?}", off.stats, on.stats));
    }
    if on.drops != off.drops {
        errs.push(format!("DROPS: off {:?}, on {:?}", off.drops, on.drops));
    }
    let no_ts =
        |v: &[Event]| -> Vec<Event> { v.iter().map(|e| Event { ts_ns: 0, ..*e }).collect() };
    if no_ts(&on.events) != no_ts(&off.events) {
        errs.push(format!(
            "EVENTS: off {:?}\n  on {:?}",
            no_ts(&off.events),
            no_ts(&on.events)
        ));
    }
    if on.budget != off.budget {
        errs.push(format!(
            "EVENT_BUDGET: off {:?}, on {:?}",
            off.budget, on.budget
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n  "))
    }
}

/// The ifindexes of this network namespace's interfaces.
fn ifindexes() -> Vec<u32> {
    std::fs::read_dir("/sys/class/net")
        .expect("read /sys/class/net")
        .map(|e| {
            let p = e.unwrap().path().join("ifindex");
            std::fs::read_to_string(&p).unwrap().trim().parse().unwrap()
        })
        .collect()
}

/// Pins the calling thread to the CPU it runs on: every test run of a case then uses the same
/// CPU's event budget.
fn pin_to_this_cpu() {
    let cpu = nix::sched::sched_getcpu().expect("sched_getcpu");
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Runs every case through `check` and fails with every failing case listed.
fn run_all(what: &str, check: impl Fn(&Case) -> Result<(), String>) {
    ecsnet_tests::require_root();
    assert!(
        !ifindexes().contains(&NO_SUCH_IFINDEX),
        "an interface has ifindex {NO_SUCH_IFINDEX}, which the task cases use as a missing uplink"
    );
    pin_to_this_cpu();
    let cases = cases();
    let mut failed = Vec::new();
    for c in &cases {
        match catch_unwind(AssertUnwindSafe(|| check(c))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("{}:\n  {e}", c.desc)),
            Err(p) => failed.push(format!("{}: panicked: {}", c.desc, panic_message(p))),
        }
    }
    assert!(
        failed.is_empty(),
        "{what}: {} of {} cases failed:\n\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n\n")
    );
}

#[test]
fn flow_records_drops_and_events_are_exact() {
    run_all("flow fixtures", |c| check_expected(c, &run_case(c, true)));
}

#[test]
fn flow_logs_off_counts_no_flow_and_changes_nothing_else() {
    run_all("flow logs off", |c| {
        let on = run_case(c, true);
        let off = run_case(c, false);
        check_off(&on, &off)
    });
}
