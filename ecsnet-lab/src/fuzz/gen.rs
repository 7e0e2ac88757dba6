//! The fuzz's episodes, deterministic from a seed: a host (hook, tasks, published ports,
//! security groups, flows already tracked) and a few frames, built with the one packet builder
//! from addresses and ports the host knows (and a few it does not), then mutated: flags,
//! lengths, fragments, options, checksums, truncations, ethertypes, tags.

use std::collections::HashMap;

use ecsnet_common::{
    csum::checksum,
    ct::{
        KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND, KIND_LOCAL, KIND_MASQUERADE, PROTO_ICMP,
        PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    maps::{Config, ROLE_TASK, TaskInfo},
    policy::INSTANCE_METADATA_ADDR6,
};

use super::model::{Entry, Hook, Host, Sg, SgGroup, SgRule, Stamp, State, Traffic};
use crate::fixture::{
    conntrack::{FlowPair, Table},
    packet::{DF, L4, MF, P, SEQ, quote, tagged},
    packet6::{
        ALL_NODES, EXT_DEST_OPTS, EXT_HOP_BY_HOP, EXT_ROUTING, ND_NEIGHBOR_ADVERT,
        ND_NEIGHBOR_SOLICIT, ND_OPT_SOURCE_LL, ND_OPT_TARGET_LL, P6, link_local,
    },
    world::{
        BRIDGE, BRIDGE_MAC, CLIENT, HOST, IFINDEX_A, IFINDEX_B, IMDS, INTERNET, MAC_A, MAC_B,
        NO_SUCH_IFINDEX, NOT_LOCAL, OTHER_CONTAINER, OTHER_LOCAL, REMOTE, ROUTER, ROUTER_MAC,
        SEEDED_NS, Seed, TASK_A, TASK_B, TEST_IFINDEX, UPLINK_MAC, addr, tu,
    },
};

/// `SplitMix64`: small, fast, and the same sequence everywhere for a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (> 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % n as u64).expect("below a usize")
    }

    /// True `pct` times in a hundred.
    pub fn chance(&mut self, pct: usize) -> bool {
        self.below(100) < pct
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    pub fn port(&mut self) -> u16 {
        u16::try_from(self.next_u64() & 0xffff).expect("16 bits")
    }
}

/// One episode: a host, what its maps start with, and the frames sent through it.
pub struct Episode {
    pub host: Host,
    pub config: Config,
    /// Everything written into the maps before the first frame.
    pub seeds: Vec<Seed>,
    /// The model's state before the first frame.
    pub state: State,
    pub frames: Vec<Vec<u8>>,
}

const MULTICAST_MAC: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
const BROADCAST_MAC: [u8; 6] = [0xff; 6];
const METADATA: [u8; 4] = [169, 254, 170, 2];
const BRIDGE_BROADCAST: [u8; 4] = [172, 17, 255, 255];
const MDNS: [u8; 4] = [224, 0, 0, 251];
/// A host port published to a container ecsnet does not manage.
const PORT_TO_OTHER: u16 = 9999;
/// The IP identifier of every fragment, so later fragments find their first.
const FRAG_ID: u16 = 0x7777;

/// The CIDRs rules name: the outside, its subnets, the bridge, single tasks, the metadata
/// range.
const CIDRS: [([u8; 4], u8); 10] = [
    ([0, 0, 0, 0], 0),
    ([10, 0, 0, 0], 8),
    ([10, 10, 0, 0], 16),
    ([10, 10, 0, 0], 24),
    ([10, 10, 0, 2], 32),
    ([172, 17, 0, 0], 16),
    ([172, 17, 0, 2], 32),
    ([172, 17, 0, 3], 32),
    ([198, 51, 100, 0], 24),
    ([169, 254, 0, 0], 16),
];

fn traffic(r: &mut Rng) -> Traffic {
    let ranges = [
        (80, 80),
        (443, 443),
        (53, 53),
        (0, 65535),
        (1024, 65535),
        (80, 90),
        (40000, 40000),
        (9000, 9000),
    ];
    match r.below(9) {
        0 => Traffic::All,
        1 | 2 => {
            let (lo, hi) = r.pick(&ranges);
            Traffic::Tcp(lo, hi)
        }
        3 => {
            let (lo, hi) = r.pick(&ranges);
            Traffic::Udp(lo, hi)
        }
        4 => Traffic::IcmpAll,
        5 => Traffic::IcmpType(r.pick(&[0, 3, 8, 11])),
        6 => Traffic::IcmpCode(3, r.pick(&[3, 4])),
        7 => Traffic::Other(47),
        _ => Traffic::Tcp(r.port(), u16::MAX),
    }
}

fn sg_rule(r: &mut Rng, groups: usize) -> SgRule {
    let mut cidrs = Vec::new();
    let mut refs = Vec::new();
    for _ in 0..=r.below(2) {
        if r.chance(25) {
            refs.push(r.below(groups));
        } else {
            cidrs.push(r.pick(&CIDRS));
        }
    }
    SgRule {
        traffic: traffic(r),
        cidrs,
        groups: refs,
    }
}

/// Security groups for tasks A and B: none in two episodes of five.
fn sg(r: &mut Rng) -> Sg {
    if r.chance(40) {
        return Sg::default();
    }
    let n = 1 + r.below(3);
    let groups = (0..n)
        .map(|_| {
            let inbound = (0..r.below(4)).map(|_| sg_rule(r, n)).collect();
            let outbound = if r.chance(50) {
                vec![SgRule {
                    traffic: Traffic::All,
                    cidrs: vec![([0; 4], 0)],
                    groups: vec![],
                }]
            } else {
                (0..r.below(4)).map(|_| sg_rule(r, n)).collect()
            };
            SgGroup { inbound, outbound }
        })
        .collect();
    let mut members = HashMap::new();
    for t in [TASK_A, TASK_B] {
        let mut gs: Vec<usize> = (0..r.below(3)).map(|_| r.below(n)).collect();
        gs.sort_unstable();
        gs.dedup();
        members.insert(t, gs);
    }
    Sg {
        default_deny: r.chance(20),
        groups,
        members,
    }
}

/// The flows an episode may start with, as both their entries.
fn flow_templates(r: &mut Rng) -> Vec<FlowPair> {
    let nat_port = r.pick(&[40000, 50000]);
    let ping_id = r.pick(&[0x1234, 0x9999]);
    vec![
        FlowPair::new(
            PROTO_TCP,
            tu(CLIENT, 51000, HOST, 8080),
            tu(CLIENT, 51000, TASK_A, 80),
            KIND_INBOUND,
        ),
        FlowPair::new(
            PROTO_UDP,
            tu(CLIENT, 51000, HOST, 5353),
            tu(CLIENT, 51000, TASK_A, 53),
            KIND_INBOUND,
        ),
        FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40000, REMOTE, 9000),
            tu(HOST, nat_port, REMOTE, 9000),
            KIND_MASQUERADE,
        ),
        FlowPair::new(
            PROTO_UDP,
            tu(TASK_A, 40000, REMOTE, 9000),
            tu(HOST, nat_port, REMOTE, 9000),
            KIND_MASQUERADE,
        ),
        FlowPair::new(
            PROTO_ICMP,
            tu(TASK_A, 0x1234, REMOTE, 0),
            tu(HOST, ping_id, REMOTE, 0),
            KIND_MASQUERADE,
        ),
        FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40000, TASK_B, 80),
            tu(TASK_A, 40000, TASK_B, 80),
            KIND_EAST_WEST,
        ),
        FlowPair::new(
            PROTO_UDP,
            tu(TASK_A, 40001, TASK_B, 53),
            tu(TASK_A, 40001, TASK_B, 53),
            KIND_EAST_WEST,
        ),
        FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40000, HOST, 8443),
            tu(TASK_A, 40000, TASK_B, 443),
            KIND_HAIRPIN,
        ),
        // Holds A:80 <- bridge:40000, the tuple A's self-hairpin to host:8080 would want.
        FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40000, [10, 10, 0, 9], 8080),
            tu(BRIDGE, 40000, TASK_A, 80),
            KIND_HAIRPIN,
        ),
        FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40002, CLIENT, 22),
            tu(TASK_A, 40002, CLIENT, 22),
            KIND_LOCAL,
        ),
    ]
}

/// Where a seeded flow stands: each direction's (packets, bytes, TCP flags).
fn seen(r: &mut Rng, tcp: bool) -> ((u64, u64, u8), (u64, u64, u8)) {
    let tcp_states = [
        ((1, 40, TCP_SYN), (0, 0, 0)),
        ((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK)),
        ((2, 80, TCP_SYN | TCP_ACK), (1, 40, TCP_SYN | TCP_ACK)),
        (
            (3, 120, TCP_SYN | TCP_ACK | TCP_FIN),
            (2, 80, TCP_SYN | TCP_ACK),
        ),
        ((1, 40, TCP_SYN | TCP_RST), (1, 40, TCP_SYN | TCP_ACK)),
    ];
    if tcp {
        r.pick(&tcp_states)
    } else {
        r.pick(&[((1, 40, 0), (0, 0, 0)), ((2, 80, 0), (1, 40, 0))])
    }
}

/// A random host and what its maps start with.
fn host(r: &mut Rng) -> (Host, Config, Vec<Seed>, State) {
    let program = r.pick(&[
        Hook::Uplink,
        Hook::Uplink,
        Hook::Xdp,
        Hook::Task,
        Hook::Task,
        Hook::TaskEgress,
    ]);
    let hook = program.side();
    let a_ifindex = match hook {
        Hook::Task | Hook::TaskEgress if r.chance(50) => TEST_IFINDEX,
        _ => IFINDEX_A,
    };
    let mac = |r: &mut Rng, m| if r.chance(25) { [0; 6] } else { m };
    let tasks = [
        (TASK_A, a_ifindex, mac(r, MAC_A)),
        (TASK_B, IFINDEX_B, mac(r, MAC_B)),
    ];
    let block_imds = r.chance(30);
    let mut config = crate::fixture::world::config(match hook {
        Hook::Uplink | Hook::Xdp => TEST_IFINDEX,
        Hook::Task | Hook::TaskEgress => NO_SUCH_IFINDEX,
    });
    if block_imds {
        config.flags |= ecsnet_common::maps::CONFIG_BLOCK_IMDS;
    }
    let sg = sg(r);
    let policies = super::run::compile(&sg);
    let mut seeds = Vec::new();
    let mut state = State::default();
    for (a, ifindex, mac) in tasks {
        let policy = policies.policy_of(a.into());
        seeds.push(Seed::Task(a, ifindex, mac, policy));
        state.tasks.insert(
            addr(a),
            TaskInfo {
                ifindex,
                mac,
                flags: 0,
                _pad: 0,
                policy,
            },
        );
    }
    seeds.extend(policies.peers.iter().map(|&(k, v)| Seed::Peer(k, v)));
    seeds.extend(policies.rules.iter().map(|&(k, _)| Seed::Rule(k)));
    let mut ports = HashMap::new();
    for (proto, hport, to, port) in [
        (PROTO_TCP, 8080, TASK_A, 80),
        (PROTO_UDP, 5353, TASK_A, 53),
        (PROTO_TCP, 8443, TASK_B, 443),
        (PROTO_UDP, PORT_TO_OTHER, OTHER_CONTAINER, 99),
    ] {
        seeds.push(Seed::Port(proto, hport, to, port));
        ports.insert((proto, hport), (to, port));
    }
    seeds.push(Seed::Local(OTHER_LOCAL, TEST_IFINDEX));
    let iface_task = (hook != Hook::Uplink).then_some(TASK_A);
    if hook != Hook::Uplink {
        seeds.push(Seed::Iface(TEST_IFINDEX, TASK_A, ROLE_TASK));
    }
    let mut templates = flow_templates(r);
    for _ in 0..r.below(4) {
        let f = templates.swap_remove(r.below(templates.len()));
        let (o, rp) = seen(r, f.okey.proto == PROTO_TCP);
        let mut f = f.seen(o, rp);
        if r.chance(50) {
            f = f.unassured();
        }
        if state.ct.contains_key(&f.okey) || state.ct.contains_key(&f.rkey) {
            continue;
        }
        seeds.extend(f.seeds());
        for (k, e) in [(f.okey, f.o), (f.rkey, f.r)] {
            let stamp = Stamp::exactly(SEEDED_NS);
            state.ct.insert(
                k,
                Entry {
                    table: f.table,
                    e,
                    seen: stamp,
                    created: stamp,
                },
            );
        }
    }
    let host = Host {
        hook: program,
        uplink_ipv4: HOST,
        bridge_ipv4: BRIDGE,
        bridge_prefix: config.bridge_prefix,
        bridge_mac: BRIDGE_MAC,
        block_imds,
        ports,
        locals: vec![OTHER_LOCAL],
        iface_task,
        sg,
    };
    (host, config, seeds, state)
}

/// A packet's addresses and ports.
#[derive(Clone, Copy)]
struct Tuple {
    proto: u8,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
}

fn tuple(r: &mut Rng, hook: Hook) -> Tuple {
    let proto = match r.below(20) {
        0..=9 => PROTO_TCP,
        10..=14 => PROTO_UDP,
        15..=18 => PROTO_ICMP,
        _ => 47,
    };
    let sports = [51000, 40000, 40001, 40002, 9000, 80, 53, 443, 22];
    let dports = [
        80,
        53,
        443,
        8080,
        5353,
        8443,
        8081,
        9000,
        40000,
        50000,
        22,
        PORT_TO_OTHER,
    ];
    let (src, dst) = match hook {
        Hook::Task => (
            if r.chance(85) {
                TASK_A
            } else {
                r.pick(&[TASK_B, OTHER_CONTAINER, CLIENT])
            },
            r.pick(&[
                TASK_B,
                TASK_B,
                TASK_A,
                HOST,
                HOST,
                BRIDGE,
                OTHER_LOCAL,
                CLIENT,
                CLIENT,
                INTERNET,
                IMDS,
                METADATA,
                BRIDGE_BROADCAST,
                MDNS,
                [255; 4],
                OTHER_CONTAINER,
            ]),
        ),
        Hook::TaskEgress => (
            r.pick(&[
                TASK_B,
                TASK_B,
                CLIENT,
                CLIENT,
                OTHER_CONTAINER,
                INTERNET,
                BRIDGE,
                HOST,
            ]),
            r.pick(&[
                TASK_A,
                TASK_A,
                TASK_A,
                TASK_A,
                TASK_B,
                BRIDGE_BROADCAST,
                MDNS,
            ]),
        ),
        Hook::Uplink | Hook::Xdp => (
            r.pick(&[CLIENT, CLIENT, CLIENT, INTERNET, ROUTER, TASK_A]),
            r.pick(&[
                HOST,
                HOST,
                HOST,
                BRIDGE,
                OTHER_LOCAL,
                TASK_A,
                TASK_B,
                NOT_LOCAL,
                INTERNET,
            ]),
        ),
    };
    let sport = if r.chance(10) {
        r.port()
    } else {
        r.pick(&sports)
    };
    let dport = if r.chance(10) {
        r.port()
    } else {
        r.pick(&dports)
    };
    Tuple {
        proto,
        src,
        sport,
        dst,
        dport,
    }
}

/// The tuples of the seeded flows as they arrive on `hook`, both directions.
fn flow_tuples(hook: Hook) -> Vec<Tuple> {
    let t = |proto, src, sport, dst, dport| Tuple {
        proto,
        src,
        sport,
        dst,
        dport,
    };
    match hook {
        Hook::Uplink | Hook::Xdp => vec![
            t(PROTO_TCP, CLIENT, 51000, HOST, 8080),
            t(PROTO_UDP, CLIENT, 51000, HOST, 5353),
            t(PROTO_TCP, REMOTE, 9000, HOST, 40000),
            t(PROTO_TCP, REMOTE, 9000, HOST, 50000),
            t(PROTO_UDP, REMOTE, 9000, HOST, 40000),
            t(PROTO_ICMP, REMOTE, 0, HOST, 0x1234),
            t(PROTO_ICMP, REMOTE, 0, HOST, 0x9999),
        ],
        Hook::Task => vec![
            t(PROTO_TCP, TASK_A, 80, CLIENT, 51000),
            t(PROTO_UDP, TASK_A, 53, CLIENT, 51000),
            t(PROTO_TCP, TASK_A, 40000, REMOTE, 9000),
            t(PROTO_UDP, TASK_A, 40000, REMOTE, 9000),
            t(PROTO_ICMP, TASK_A, 0x1234, REMOTE, 0),
            t(PROTO_TCP, TASK_A, 40000, TASK_B, 80),
            t(PROTO_UDP, TASK_A, 40001, TASK_B, 53),
            t(PROTO_TCP, TASK_A, 40000, HOST, 8443),
            t(PROTO_TCP, TASK_A, 40000, HOST, 8080),
            t(PROTO_TCP, TASK_A, 40002, CLIENT, 22),
        ],
        // What the kernel delivers of the known flows: their replies, and inbound flows it
        // routes translated (the task's MAC not known yet).
        Hook::TaskEgress => vec![
            t(PROTO_TCP, CLIENT, 51000, TASK_A, 80),
            t(PROTO_UDP, CLIENT, 51000, TASK_A, 53),
            t(PROTO_TCP, REMOTE, 9000, TASK_A, 40000),
            t(PROTO_UDP, REMOTE, 9000, TASK_A, 40000),
            t(PROTO_ICMP, REMOTE, 0, TASK_A, 0x1234),
            t(PROTO_TCP, TASK_B, 80, TASK_A, 40000),
            t(PROTO_UDP, TASK_B, 53, TASK_A, 40001),
            t(PROTO_TCP, TASK_B, 443, TASK_A, 40000),
            t(PROTO_TCP, CLIENT, 22, TASK_A, 40002),
        ],
    }
}

fn tcp_flags(r: &mut Rng) -> u8 {
    match r.below(20) {
        0..=5 => TCP_SYN,
        6..=9 => TCP_ACK,
        10 | 11 => TCP_SYN | TCP_ACK,
        12 | 13 => TCP_RST | TCP_ACK,
        14 => TCP_RST,
        15 | 16 => TCP_FIN | TCP_ACK,
        _ => r.byte(),
    }
}

/// The transport of a packet of `t`: ICMP as echo request, reply or error (quoting `quoted`).
fn l4(r: &mut Rng, t: &Tuple, quoted: Option<&P>) -> L4 {
    let data: Vec<u8> = if r.chance(60) {
        Vec::new()
    } else {
        (0..=r.below(40)).map(|_| r.byte()).collect()
    };
    match t.proto {
        PROTO_TCP => L4::Tcp {
            sport: t.sport,
            dport: t.dport,
            seq: match r.below(10) {
                0..=6 => SEQ,
                7 => SEQ.wrapping_add(1),
                _ => u32::try_from(r.next_u64() >> 32).expect("32 bits"),
            },
            ack: if r.chance(80) {
                SEQ
            } else {
                u32::try_from(r.next_u64() >> 32).expect("32 bits")
            },
            flags: tcp_flags(r),
            doff: if r.chance(10) {
                r.pick(&[0, 4, 6, 15])
            } else {
                5
            },
            data,
        },
        PROTO_UDP => L4::Udp {
            sport: t.sport,
            dport: t.dport,
            data,
            zero_csum: r.chance(10),
        },
        PROTO_ICMP => {
            let (typ, code) = match r.below(10) {
                0..=3 => (8, 0),
                4..=6 => (0, 0),
                7 => (3, r.pick(&[3, 4])),
                8 => (11, 0),
                _ => (12, 0),
            };
            let id = match typ {
                8 => t.sport,
                0 => t.dport,
                _ => 0,
            };
            let body = match (typ, quoted) {
                (3 | 11 | 12, Some(q)) => {
                    let whole = q.ip().len() - 20 - q.opts.len();
                    quote(q, whole.min(r.pick(&[8, 8, 4, 20])))
                }
                _ => data,
            };
            let [hi, lo] = id.to_be_bytes();
            L4::Icmp {
                typ,
                code,
                rest: [hi, lo, 0, 1],
                body,
            }
        }
        proto => L4::Raw { proto, bytes: data },
    }
}

/// A packet of `t` with the MACs of `hook`.
fn packet(r: &mut Rng, hook: Hook, t: &Tuple, quoted: Option<&P>) -> P {
    let mut p = P::new(t.src, t.dst, l4(r, t, quoted));
    match hook {
        Hook::Uplink | Hook::Xdp => {
            p.smac = ROUTER_MAC;
            p.dmac = if r.chance(92) {
                UPLINK_MAC
            } else {
                BROADCAST_MAC
            };
        }
        Hook::TaskEgress => {
            p.smac = r.pick(&[BRIDGE_MAC, BRIDGE_MAC, MAC_B]);
            p.dmac = match r.below(10) {
                0..=7 => MAC_A,
                8 => BROADCAST_MAC,
                _ => MULTICAST_MAC,
            };
        }
        Hook::Task => {
            p.smac = if r.chance(90) {
                MAC_A
            } else {
                r.pick(&[MAC_B, [0x02, 0, 0, 0, 0, 0x66]])
            };
            p.dmac = match r.below(20) {
                0..=13 => BRIDGE_MAC,
                14..=16 => MAC_B,
                17 | 18 => BROADCAST_MAC,
                _ => MULTICAST_MAC,
            };
        }
    }
    if r.chance(10) {
        p.ttl = r.pick(&[0, 1, 2]);
    }
    if r.chance(8) {
        p.opts = vec![1; r.pick(&[4, 8, 40])];
    }
    p.id = r.port();
    p.frag = DF;
    p
}

/// An ICMP error about a packet of the known flow `k` going the other way (so that the error
/// travels as `k` does), from `k`'s source or a router on the way, quoting 8 bytes of the
/// transport header or all of it.
fn tracked_icmp_error(r: &mut Rng, hook: Hook, k: &Tuple) -> P {
    let back = Tuple {
        proto: k.proto,
        src: k.dst,
        sport: k.dport,
        dst: k.src,
        dport: k.sport,
    };
    let mut quoted = if k.proto == PROTO_ICMP {
        // The echo request the reply `k` answers carries its identifier.
        P::echo(back.src, back.dst, k.dport, 8)
    } else {
        let mut q = packet(r, hook, &back, None);
        q.opts.clear();
        q
    };
    quoted.ttl = 1;
    let n = quoted.ip().len() - 20;
    let (typ, code) = r.pick(&[(3, 3), (3, 4), (11, 0), (12, 0)]);
    let src = if r.chance(50) { k.src } else { ROUTER };
    let body = quote(&quoted, n.min(r.pick(&[8, 8, 20, 28])));
    let mut p = P::icmp(src, k.dst, typ, code, [0; 4], body);
    let model = packet(r, hook, k, None);
    (p.smac, p.dmac, p.ttl) = (model.smac, model.dmac, model.ttl);
    p
}

/// `p` cut into a first fragment (its transport header and a few bytes) or a later one.
fn fragment(r: &mut Rng, p: &mut P) {
    let whole = p.l4.bytes(p.src, p.dst);
    let proto = p.l4.proto();
    p.id = FRAG_ID;
    if r.chance(50) {
        let n = whole.len().min(8 + 8 * r.below(3));
        p.l4 = L4::Raw {
            proto,
            bytes: whole[..n].to_vec(),
        };
        p.frag = MF;
    } else {
        let n = 1 + r.below(24);
        p.l4 = L4::Raw {
            proto,
            bytes: (0..n).map(|_| r.byte()).collect(),
        };
        p.frag = 2 | if r.chance(50) { MF } else { 0 };
    }
}

/// Writes a good IPv4 header checksum, when the header is there to sum.
fn fix_ip_check(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [8, 0] {
        return;
    }
    let ihl = usize::from(f[14] & 15) * 4;
    if ihl < 20 || f.len() < 14 + ihl {
        return;
    }
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&f[14..14 + ihl], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// One or two mutations of a frame's bytes; header fields keep a good IPv4 checksum so the
/// frame gets past that check more often than not.
fn mutate(r: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..=r.below(2) {
        match r.below(12) {
            0 if !f.is_empty() => {
                let i = r.below(f.len());
                f[i] ^= 1 << r.below(8);
            }
            // Not below an Ethernet header: the kernel never hands tc a shorter frame (and
            // BPF_PROG_TEST_RUN refuses one).
            1 if f.len() > 14 => f.truncate(14 + r.below(f.len() - 13)),
            2 => f.extend(std::iter::repeat_n(0, 1 + r.below(30))),
            3 if f.len() >= 14 => {
                let e: u16 = r.pick(&[0x86dd, 0x0806, 0x8100, 0x88a8, 0x9100, 0x88b5, 0x0800]);
                f[12..14].copy_from_slice(&e.to_be_bytes());
            }
            4 if f.len() >= 14 => *f = tagged(f, &[r.pick(&[0x8100, 0x88a8])]),
            5 if f.len() >= 18 => {
                let tot = u16::try_from(f.len() - 14).unwrap_or(u16::MAX);
                let any = r.port();
                let v = r.pick(&[0, 19, 20, 28, tot.saturating_sub(1), tot + 1, any]);
                f[16..18].copy_from_slice(&v.to_be_bytes());
                fix_ip_check(f);
            }
            6 if f.len() >= 15 => {
                let any = r.byte();
                f[14] = r.pick(&[0x44, 0x45, 0x46, 0x4f, 0x65, any]);
                fix_ip_check(f);
            }
            7 if f.len() >= 22 => {
                let any = r.port();
                let v: u16 = r.pick(&[0, MF, 1, 2, MF | 2, 0x1fff, any]);
                f[20..22].copy_from_slice(&v.to_be_bytes());
                fix_ip_check(f);
            }
            8 if f.len() >= 26 => f[24] ^= 0x40,
            9 if f.len() >= 14 + 20 + 18 => {
                let i = 14 + usize::from(f[14] & 15) * 4 + r.pick(&[6, 16, 2]);
                if i < f.len() {
                    f[i] ^= 0x5a;
                }
            }
            10 if f.len() >= 24 => {
                f[23] = r.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP, 47, 0]);
                fix_ip_check(f);
            }
            11 if f.len() >= 34 => {
                let i = 14 + r.below(20);
                f[i] = r.byte();
                fix_ip_check(f);
            }
            _ => {}
        }
    }
}

/// `f` padded with zeros to what `BPF_PROG_TEST_RUN` takes: it refuses an IPv4 frame without
/// a whole fixed IPv4 header and an IPv6 one without the fixed IPv6 header.
fn runnable(f: &mut Vec<u8>) {
    let min = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => 14 + 20,
        0x86dd => 14 + 40,
        _ => 14,
    };
    if f.len() < min {
        f.resize(min, 0);
    }
}

/// An ARP frame from task A's side, its sender fields from the task or not.
fn arp(r: &mut Rng) -> Vec<u8> {
    let mut f = BROADCAST_MAC.to_vec();
    f.extend(r.pick(&[MAC_A, MAC_A, MAC_B]));
    f.extend(0x0806u16.to_be_bytes());
    f.extend([0, 1, 8, 0, 6, 4, 0, r.pick(&[1, 2])]);
    f.extend(r.pick(&[MAC_A, MAC_A, MAC_B]));
    f.extend(r.pick(&[TASK_A, TASK_A, [0; 4], TASK_B]));
    f.extend([0; 6]);
    f.extend(r.pick(&[TASK_B, BRIDGE]));
    f
}

/// An IPv6 frame from `smac`: from its link-local address, another one, `::` or a global one;
/// behind up to three extension headers; echo, neighbour discovery, router messages, MLD,
/// UDP (`DHCPv6`'s ports among others), TCP or nothing; sometimes cut or with a wrong length.
fn ipv6(r: &mut Rng, smac: [u8; 6]) -> Vec<u8> {
    let other_ll = link_local(r.pick(&[MAC_B, [0x02, 0, 0, 0, 0, 9]]));
    let global = [0xfd, 0, 0x0e, 0xc5, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let src = r.pick(&[
        link_local(smac),
        link_local(smac),
        other_ll,
        [0; 16],
        global,
    ]);
    let dst = r.pick(&[ALL_NODES, global, INSTANCE_METADATA_ADDR6]);
    let mac = r.pick(&[smac, smac, MAC_B]);
    let target = r.pick(&[link_local(smac), other_ll, global]);
    let mut p = match r.below(9) {
        0 => P6::echo6(src, dst),
        1 => P6::router_advert(src, mac),
        2 => P6::nd(
            src,
            dst,
            ND_NEIGHBOR_ADVERT,
            target,
            &[(ND_OPT_TARGET_LL, mac)],
        ),
        3 => P6::nd(
            src,
            dst,
            ND_NEIGHBOR_SOLICIT,
            target,
            &[(ND_OPT_SOURCE_LL, mac)],
        ),
        4 => P6::icmp6(src, dst, r.pick(&[133, 137, 138, 143]), 0, &[0; 8]),
        5 => P6::udp6(
            src,
            r.pick(&[546, 547, 5000]),
            dst,
            r.pick(&[546, 547, 53]),
            b"dhcp",
        ),
        6 => P6::syn6(src, 40000, dst, 80),
        7 => P6::nd(
            src,
            dst,
            ND_NEIGHBOR_ADVERT,
            target,
            &[(r.pick(&[1, 2, 3]), mac); 5],
        ),
        _ => P6::icmp6(src, dst, 128, 0, &[]).cut_l4(4),
    };
    for _ in 0..r.below(4) {
        p = match r.below(6) {
            0 => p.ext(EXT_HOP_BY_HOP, 0),
            1 => p.ext(EXT_DEST_OPTS, r.pick(&[0, 1])),
            2 => p.ext(EXT_ROUTING, r.pick(&[0, 2])),
            3 => p.fragment(r.pick(&[0, 0, 1]), r.chance(50), 7),
            _ => p,
        };
    }
    if r.chance(10) {
        p = p.payload_len(r.pick(&[0, 8, 300]));
    }
    p.smac = smac;
    p.dmac = r.pick(&[BRIDGE_MAC, [0x33, 0x33, 0, 0, 0, 1]]);
    let mut f = p.frame();
    if r.chance(10) {
        // Cut behind the fixed header, which `BPF_PROG_TEST_RUN` needs (`runnable`).
        f.truncate(54 + r.below(f.len() - 54));
    }
    f
}

/// A random episode.
pub fn episode(r: &mut Rng) -> Episode {
    let (host, config, seeds, state) = host(r);
    let hook = host.hook.side();
    let known = flow_tuples(hook);
    let mut frames = Vec::new();
    let mut last: Option<(Tuple, P)> = None;
    for _ in 0..=r.below(6) {
        if hook != Hook::Uplink && r.chance(4) {
            frames.push(if r.chance(60) { arp(r) } else { ipv6(r, MAC_A) });
            continue;
        }
        if r.chance(8) {
            let k = r.pick(&known);
            frames.push(tracked_icmp_error(r, hook, &k).frame());
            continue;
        }
        let t = match (&last, r.below(10)) {
            (Some((t, _)), 0..=3) => *t,
            (_, 4..=6) => r.pick(&known),
            _ => tuple(r, hook),
        };
        // An error quotes a packet of a known flow the other way, or the last one.
        let quoted = match &last {
            Some((_, p)) if r.chance(40) => p.clone(),
            _ => {
                let k = r.pick(&flow_tuples(if hook == Hook::Uplink {
                    Hook::Task
                } else {
                    Hook::Uplink
                }));
                let mut q = packet(r, hook, &k, None);
                if r.chance(50) {
                    (q.src, q.dst) = (t.dst, t.src);
                }
                q
            }
        };
        let mut p = packet(r, hook, &t, Some(&quoted));
        if t.proto != PROTO_ICMP && r.chance(8) {
            fragment(r, &mut p);
        }
        let mut f = p.frame();
        if r.chance(20) {
            mutate(r, &mut f);
            runnable(&mut f);
        }
        frames.push(f);
        last = Some((t, p));
    }
    Episode {
        host,
        config,
        seeds,
        state,
        frames,
    }
}

/// A table's name in reports.
pub fn table_name(t: Table) -> &'static str {
    match t {
        Table::Assured => "CT",
        Table::New => "CT_NEW",
    }
}
