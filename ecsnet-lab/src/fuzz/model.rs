//! A plain-Rust model of what `tc_uplink_ingress` and `tc_task_ingress` (with its tail-called
//! `tc_task_new_flow`) do to one frame: the parse, the anti-spoofing checks, the security groups
//! (evaluated from the AWS-style rules themselves, not from the compiled maps), the fragment
//! bookkeeping, the connection tables (which entry, which table, which counters), the NAT
//! rewrite with its checksum updates, and the counters (`STATS`, `DROPS`, `CT_EVENTS`).
//!
//! It is written from the spec and the kernel helpers' documented behaviour, on byte slices,
//! sharing nothing with the BPF code but the map layouts and `ecsnet_common::ct`'s TCP window
//! and assurance rules (the spec of those; what is checked here is the plumbing around them).
//! Checksums are updated as the kernel's `csum_replace` helpers do (RFC 1624), so a mangled
//! checksum stays as mangled as it came in; well-formed outputs are checked on their own too.
//!
//! The fuzz world assumes no FIB lookup ever answers "out of the uplink" (the fuzz runs in a
//! network namespace of its own without routes), so nothing is masqueraded out; and
//! the tc programs on the task interfaces' egress and the uplink's XDP program are not
//! modelled (docs/FUZZING.md).

use std::collections::HashMap;

use ecsnet_common::{
    DropReason,
    ct::{
        self, ASSURED_AFTER_NS, CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, KIND_EAST_WEST,
        KIND_HAIRPIN, KIND_INBOUND, KIND_LOCAL, KIND_MASQUERADE, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
        TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    maps::{
        CLASS_IPV4, CLASS_OTHER, CT_EV_ASSURED, CT_EV_CREATED, DropKey, FragKey, FragKey6,
        FragPorts, HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP, StatsKey, TaskInfo,
    },
    policy::{INSTANCE_METADATA_ADDR, INSTANCE_METADATA_ADDR6, TASK_METADATA_ADDR},
};

use crate::fixture::{
    conntrack::Table,
    packet6::link_local,
    world::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_IFINDEX, XDP_DROP, XDP_PASS, addr},
};

/// The program a frame runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `tc_uplink_ingress`, the test device configured as the uplink.
    Uplink,
    /// `tc_task_ingress`, the test device registered as task A's interface.
    Task,
    /// `tc_task_egress` on the same interface: what the kernel delivers to task A.
    TaskEgress,
    /// `xdp_uplink`, on the uplink of the same host as `Uplink`.
    Xdp,
}

impl Hook {
    /// The hook of the program's `STATS` and `DROPS` keys.
    pub fn stats_hook(self) -> u8 {
        match self {
            Hook::Uplink | Hook::Task => HOOK_TC_INGRESS,
            Hook::TaskEgress => HOOK_TC_EGRESS,
            Hook::Xdp => HOOK_XDP,
        }
    }

    /// The interface the frames arrive on: the uplink for both of its programs.
    #[must_use]
    pub fn side(self) -> Hook {
        match self {
            Hook::Xdp => Hook::Uplink,
            h => h,
        }
    }
}

/// What one rule of a security group allows (AWS's `IpProtocol`, `FromPort`, `ToPort`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    All,
    Tcp(u16, u16),
    Udp(u16, u16),
    IcmpAll,
    IcmpType(u8),
    IcmpCode(u8, u8),
    Other(u8),
}

impl Traffic {
    /// Whether a packet of `proto` to port `port` (ICMP: `icmp`, its type and code) matches.
    fn matches(self, proto: u8, port: u16, icmp: (u8, u8)) -> bool {
        let within = |lo, hi| lo <= port && port <= hi;
        match self {
            Traffic::All => true,
            Traffic::Tcp(lo, hi) => proto == PROTO_TCP && within(lo, hi),
            Traffic::Udp(lo, hi) => proto == PROTO_UDP && within(lo, hi),
            Traffic::IcmpAll => proto == PROTO_ICMP,
            Traffic::IcmpType(t) => proto == PROTO_ICMP && icmp.0 == t,
            Traffic::IcmpCode(t, c) => proto == PROTO_ICMP && icmp == (t, c),
            Traffic::Other(p) => proto == p,
        }
    }
}

/// One rule: its traffic, from or to its CIDRs (address, prefix length) and the members of the
/// groups it names (indexes into [`Sg::groups`]).
#[derive(Clone, Debug)]
pub struct SgRule {
    pub traffic: Traffic,
    pub cidrs: Vec<([u8; 4], u8)>,
    pub groups: Vec<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct SgGroup {
    pub inbound: Vec<SgRule>,
    pub outbound: Vec<SgRule>,
}

/// The security groups of the host, AWS semantics: a task with groups may do what any rule of
/// any of its groups allows; a task without groups may do everything, unless the default
/// policy is deny (AWS's default group without its self-reference: nothing in, all out).
#[derive(Clone, Debug, Default)]
pub struct Sg {
    pub default_deny: bool,
    pub groups: Vec<SgGroup>,
    /// Task address -> its groups.
    pub members: HashMap<[u8; 4], Vec<usize>>,
}

/// A policy direction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    In,
    Out,
}

impl Sg {
    /// Whether the task at `task` is under a policy at all (a nonzero policy number).
    pub fn policed(&self, task: [u8; 4]) -> bool {
        self.default_deny || self.members.get(&task).is_some_and(|g| !g.is_empty())
    }

    fn contains(cidr: ([u8; 4], u8), a: [u8; 4]) -> bool {
        let mask = if cidr.1 == 0 {
            0
        } else {
            u32::MAX << (32 - cidr.1)
        };
        u32::from_be_bytes(cidr.0) & mask == u32::from_be_bytes(a) & mask
    }

    fn allows(&self, task: [u8; 4], dir: Dir, peer: [u8; 4], h: &Hdr, port: u16) -> bool {
        if !self.policed(task) {
            return true;
        }
        let groups = self.members.get(&task).map_or(&[][..], Vec::as_slice);
        if groups.is_empty() {
            return dir == Dir::Out;
        }
        let port = match h.proto {
            PROTO_TCP | PROTO_UDP => port,
            PROTO_ICMP => u16::from(h.icmp_type) << 8 | u16::from(h.icmp_code),
            _ => 0,
        };
        groups.iter().any(|&g| {
            let rules = match dir {
                Dir::In => &self.groups[g].inbound,
                Dir::Out => &self.groups[g].outbound,
            };
            rules.iter().any(|r| {
                let peer_in = r.cidrs.iter().any(|&c| Self::contains(c, peer))
                    || r.groups.iter().any(|&rg| {
                        self.members
                            .iter()
                            .any(|(a, gs)| *a == peer && gs.contains(&rg))
                    });
                peer_in && r.traffic.matches(h.proto, port, (h.icmp_type, h.icmp_code))
            })
        })
    }

    /// The egress check of a task sending to `daddr:dport`; the task metadata endpoint is
    /// always reachable.
    fn egress(&self, task: Option<[u8; 4]>, h: &Hdr, daddr: [u8; 4], dport: u16) -> bool {
        match task {
            None => true,
            Some(t) => daddr == TASK_METADATA_ADDR || self.allows(t, Dir::Out, daddr, h, dport),
        }
    }

    fn ingress(&self, task: [u8; 4], h: &Hdr, saddr: [u8; 4], dport: u16) -> bool {
        self.allows(task, Dir::In, saddr, h, dport)
    }
}

/// The host of one episode: what does not change while its packets run.
#[derive(Clone, Debug)]
pub struct Host {
    pub hook: Hook,
    pub uplink_ipv4: [u8; 4],
    pub bridge_ipv4: [u8; 4],
    pub bridge_prefix: u8,
    pub bridge_mac: [u8; 6],
    pub block_imds: bool,
    /// (protocol, host port) -> (task address, container port).
    pub ports: HashMap<(u8, u16), ([u8; 4], u16)>,
    /// `LOCAL_ADDRS`.
    pub locals: Vec<[u8; 4]>,
    /// The task whose interface the test device is (`IFACES`), task hook only.
    pub iface_task: Option<[u8; 4]>,
    pub sg: Sg,
}

impl Host {
    fn is_local(&self, a: [u8; 4]) -> bool {
        a == self.uplink_ipv4 || a == self.bridge_ipv4 || self.locals.contains(&a)
    }

    fn is_group_addr(&self, a: [u8; 4]) -> bool {
        let v = u32::from_be_bytes(a);
        if v >> 28 == 0xe || v == u32::MAX {
            return true;
        }
        let p = u32::from(self.bridge_prefix);
        if p == 0 || p >= 31 {
            return false;
        }
        let host = u32::MAX >> p;
        v & !host == u32::from_be_bytes(self.bridge_ipv4) & !host && v & host == host
    }
}

/// When a stamp was written: between `lo` and `hi` (equal for seeded entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub lo: u64,
    pub hi: u64,
}

impl Stamp {
    pub fn exactly(ns: u64) -> Stamp {
        Stamp { lo: ns, hi: ns }
    }
}

/// One CT entry as the model knows it: the entry (its time stamps not compared), where it is,
/// and when its stamps were written.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub table: Table,
    pub e: CtEntry,
    pub seen: Stamp,
    pub created: Stamp,
}

/// Everything the programs can change.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub tasks: HashMap<u32, TaskInfo>,
    pub ct: HashMap<CtKey, Entry>,
    pub frags: HashMap<FragKey, FragPorts>,
    pub frags6: HashMap<FragKey6, FragPorts>,
    pub drops: HashMap<DropKey, u64>,
    pub stats: HashMap<StatsKey, (u64, u64)>,
    /// `CT_EVENTS` slots.
    pub ct_events: [u64; 3],
}

/// What the model expects of one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub verdict: u32,
    pub output: Vec<u8>,
    /// Which way through the programs, for the run's coverage: the drop reason, or how a
    /// tracked or new flow went on ("" for a plain pass).
    pub path: String,
}

/// Why the model does not answer for a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutOfModel {
    /// A frame after one the model had no answer for.
    AfterOne,
    /// The clock was too close to `ASSURED_AFTER_NS` to say whether a flow is assured.
    Timing,
}

/// What `FRAGS` and `FRAGS6` remember of a first fragment with ports `sport` and `dport` (host
/// order).
fn first_fragment(sport: u16, dport: u16) -> FragPorts {
    FragPorts {
        sport: sport.to_be(),
        dport: dport.to_be(),
        rejected: 0,
        _pad: [0; 3],
    }
}

/// An IPv6 packet as `parse6` reads it.
struct Ip6 {
    src: [u8; 16],
    dst: [u8; 16],
    /// The last next-header value of the chain.
    proto: u8,
    /// Where the transport header starts in the frame.
    l4: usize,
    frag: Frag,
    /// Bytes from the transport header to the end of the packet (0 for a later fragment).
    l4_len: usize,
    /// TCP or UDP source and destination ports, host order (an `ICMPv6` echo's identifier in
    /// `sport` for a request, in `dport` for a reply); 0 otherwise and in a later fragment.
    sport: u16,
    dport: u16,
    /// `ICMPv6` type; 0 otherwise and in a later fragment.
    icmp_type: u8,
    /// The TCP flags byte; 0 otherwise.
    tcp_flags: u8,
    /// The fragment header's identification as in the packet; 0 without one.
    id: u32,
    hop_limit: u8,
}

impl Ip6 {
    /// `FRAGS6`'s key of the datagram.
    fn frag_key(&self) -> FragKey6 {
        FragKey6 {
            saddr: self.src,
            daddr: self.dst,
            id: self.id,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    /// An `ICMPv6` error (types 1 to 4), which quotes a packet.
    fn is_icmp_error(&self) -> bool {
        self.proto == PROTO_ICMPV6 && self.frag != Frag::Later && (1..=4).contains(&self.icmp_type)
    }

    /// A packet that may open a flow: a TCP SYN, UDP, an echo request.
    fn starts_flow(&self) -> bool {
        self.frag != Frag::Later
            && match self.proto {
                PROTO_TCP => self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
                PROTO_UDP => true,
                PROTO_ICMPV6 => self.icmp_type == 128,
                _ => false,
            }
    }

    /// Neighbour discovery (hop limit 255, RFC 4861) and MLD, unfragmented: never policed.
    fn is_plumbing(&self) -> bool {
        self.proto == PROTO_ICMPV6
            && self.frag == Frag::None
            && match self.icmp_type {
                130..=132 | 143 => true,
                133..=137 => self.hop_limit == 255,
                _ => false,
            }
    }
}

/// `ICMPv6`'s protocol number.
const PROTO_ICMPV6: u8 = 58;

/// Whether `a` is link-local unicast (`fe80::/10`).
fn is_link_local6(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// The `FRAG_*` state of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frag {
    None,
    First,
    Later,
}

/// A parsed IPv4 packet; ports in host byte order (for ICMP echo the identifier: `sport` in a
/// request, `dport` in a reply).
#[derive(Clone, Copy, Debug)]
struct Hdr {
    l4: usize,
    proto: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
    ttl: u8,
    frag: Frag,
    ip_id: u16,
    tcp_flags: u8,
    seq: u32,
    ack: u32,
    payload: u32,
    icmp_type: u8,
    icmp_code: u8,
    tot_len: u16,
}

/// The bytes of a TCP header the datapath reads before anything else: ports, sequence and
/// acknowledgement numbers, data offset and flags (14), padded to the 16 of its 4-byte aligned
/// struct. A frame that ends sooner is truncated, as is a transport header (TCP as long as its
/// data offset says, UDP and ICMP 8 bytes) that ends after the IP total length: the datapath
/// reads and rewrites nothing of a header it does not hold whole.
const TCP_READ: usize = 16;
const ICMP_ECHO: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

impl Hdr {
    fn key(&self) -> Option<CtKey> {
        matches!(self.proto, PROTO_TCP | PROTO_UDP | PROTO_ICMP).then(|| CtKey {
            saddr: addr(self.saddr),
            daddr: addr(self.daddr),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            _pad: [0; 3],
        })
    }

    fn frag_key(&self) -> FragKey {
        FragKey {
            saddr: addr(self.saddr),
            daddr: addr(self.daddr),
            id: self.ip_id.to_be(),
            proto: self.proto,
            _pad: 0,
        }
    }

    fn is_icmp_error(&self) -> bool {
        self.proto == PROTO_ICMP
            && self.frag != Frag::Later
            && matches!(self.icmp_type, 3 | 11 | 12)
    }

    fn starts_flow(&self) -> bool {
        if self.frag == Frag::Later {
            return false;
        }
        match self.proto {
            PROTO_TCP => self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
            PROTO_UDP => true,
            PROTO_ICMP => self.icmp_type == ICMP_ECHO,
            _ => false,
        }
    }
}

/// The fragment state of an IPv4 header whose flags and offset field is `fo`.
fn frag_state(fo: u16) -> Frag {
    if fo & 0x1fff != 0 {
        Frag::Later
    } else if fo & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    }
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn ip4(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

fn ne(a: u32) -> [u8; 4] {
    a.to_ne_bytes()
}

/// The 16-bit one's complement sum of `data`, folded.
fn ones_sum(data: &[u8]) -> u16 {
    let mut s: u64 = data
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    u16::try_from(s).expect("folded to 16 bits")
}

/// A checksum updated for a field changing from `from` to `to` (both as the 16-bit words they
/// are in the packet), as the kernel's `csum_replace` does: `~(~check + ~from + to)`.
fn csum_replace(check: u16, from: &[u16], to: &[u16]) -> u16 {
    let mut s = u64::from(!check);
    for f in from {
        s += u64::from(!*f);
    }
    for t in to {
        s += u64::from(*t);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !u16::try_from(s).expect("folded to 16 bits")
}

fn words(b: &[u8]) -> Vec<u16> {
    b.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// Where a translated packet goes.
enum Next {
    Task(TaskInfo),
    /// Translated and left to the kernel (the task's MAC is not known yet).
    Kernel,
}

/// The outcome of a frame before it becomes a return code.
#[derive(Clone, Copy, PartialEq, Eq)]
enum V {
    Pass,
    Redirect,
    /// Dropped and counted elsewhere already.
    Dropped,
}

type R = Result<V, DropReason>;

/// Why the model stopped short of an answer, or a drop.
enum Stop {
    Out(OutOfModel),
}

/// Where a packet came from, for a later fragment without its first.
#[derive(Clone, Copy)]
enum Via {
    /// Sent by this task.
    Task([u8; 4]),
    /// Arrived on the uplink.
    Uplink,
    /// Delivered by the kernel to a task under a policy.
    Delivery,
}

/// One frame through the model.
struct Run<'a> {
    host: &'a Host,
    st: &'a mut State,
    pkt: Vec<u8>,
    now: Stamp,
    /// The source port the datapath chose for `key` when it had to (its own random pick).
    chosen: &'a dyn Fn(&CtKey) -> Option<u16>,
    /// See [`Expect::path`].
    path: String,
    /// The interface of the task whose inbound rules refused a new flow, if they did.
    refused_on: Option<u32>,
}

/// Runs `frame` through the model of `host`'s program, changing `st` as the datapath changes
/// its maps. `now`: when the run happened; `chosen`: the source port the datapath picked at
/// random for a flow whose own was taken (the model checks the pick, it cannot make it).
pub fn step(
    host: &Host,
    st: &mut State,
    frame: &[u8],
    now: Stamp,
    chosen: &dyn Fn(&CtKey) -> Option<u16>,
) -> Result<Expect, OutOfModel> {
    let mut run = Run {
        host,
        st,
        pkt: frame.to_vec(),
        now,
        chosen,
        path: String::new(),
        refused_on: None,
    };
    let res = match host.hook {
        Hook::Uplink => run.uplink_ingress(),
        Hook::Task => run.task_ingress(),
        Hook::TaskEgress => run.task_egress(),
        Hook::Xdp => run.xdp(),
    };
    let res = match res {
        Ok(r) => r,
        Err(Stop::Out(o)) => return Err(o),
    };
    let verdict = match (res, host.hook) {
        (Ok(V::Pass | V::Redirect), Hook::Xdp) => XDP_PASS,
        (Ok(V::Dropped) | Err(_), Hook::Xdp) => XDP_DROP,
        (Ok(V::Pass), _) => TC_ACT_OK,
        (Ok(V::Redirect), _) => TC_ACT_REDIRECT,
        (Ok(V::Dropped), _) => TC_ACT_SHOT,
        (Err(reason), _) => {
            run.path = format!("dropped {}", reason.as_str());
            run.drop_on(TEST_IFINDEX, reason);
            TC_ACT_SHOT
        }
    };
    Ok(Expect {
        verdict,
        output: run.pkt,
        path: run.path,
    })
}

impl Run<'_> {
    fn drop_on(&mut self, ifindex: u32, reason: DropReason) {
        let key = DropKey {
            ifindex,
            reason: reason as u8,
            hook: self.host.hook.stats_hook(),
            _pad: [0; 2],
        };
        *self.st.drops.entry(key).or_default() += 1;
    }

    fn len(&self) -> usize {
        self.pkt.len()
    }

    /// Whether the frame is IPv4 to a unicast MAC.
    fn unicast_ipv4(&self) -> bool {
        self.len() >= 14 && be16(&self.pkt, 12) == 0x0800 && self.pkt[0] & 1 == 0
    }

    /// `STATS` of the frame as it is now, at `ifindex` and `hook`: unicast IPv4 with sane
    /// lengths counts as one packet of its IP total length, anything else as a frame.
    fn count(&mut self, ifindex: u32, hook: u8) {
        let len = self.len();
        let p = &self.pkt;
        let ipv4 = self.unicast_ipv4() && len >= 34 && {
            let (vhl, tot) = (p[14], usize::from(be16(p, 16)));
            let ihl = usize::from(vhl & 15) * 4;
            let later = frag_state(be16(p, 20)) == Frag::Later;
            vhl >> 4 == 4
                && ihl >= 20
                && tot >= ihl
                && (later
                    || p[23] != PROTO_TCP
                    || (len >= 14 + ihl + TCP_READ && p[14 + ihl + 12] >> 4 >= 5))
        };
        let (class, bytes) = if ipv4 {
            (CLASS_IPV4, u64::from(be16(p, 16)))
        } else {
            (CLASS_OTHER, len as u64)
        };
        let key = StatsKey {
            ifindex,
            hook,
            class,
            _pad: [0; 2],
        };
        let c = self.st.stats.entry(key).or_default();
        c.0 += 1;
        c.1 += bytes;
    }

    /// The IPv4 header and the start of the transport header, or why not.
    fn parse(&self) -> Result<Hdr, DropReason> {
        let p = &self.pkt;
        if p.len() < 34 {
            return Err(DropReason::Truncated);
        }
        let vhl = p[14];
        let ihl = usize::from(vhl & 15) * 4;
        let tot = be16(p, 16);
        if vhl >> 4 != 4 || ihl < 20 || usize::from(tot) < ihl {
            return Err(DropReason::BadIpHeader);
        }
        if p.len() < 14 + usize::from(tot) {
            return Err(DropReason::Truncated);
        }
        if ones_sum(&p[14..14 + ihl]) != 0xffff {
            return Err(DropReason::BadIpChecksum);
        }
        let frag = frag_state(be16(p, 20));
        let l4 = 14 + ihl;
        let mut h = Hdr {
            l4,
            proto: p[23],
            saddr: ip4(p, 26),
            daddr: ip4(p, 30),
            sport: 0,
            dport: 0,
            ttl: p[22],
            frag,
            ip_id: be16(p, 18),
            tcp_flags: 0,
            seq: 0,
            ack: 0,
            payload: 0,
            icmp_type: 0,
            icmp_code: 0,
            tot_len: tot,
        };
        if frag == Frag::Later {
            return Ok(h);
        }
        let need = |n: usize| {
            if p.len() < l4 + n {
                Err(DropReason::Truncated)
            } else {
                Ok(())
            }
        };
        match h.proto {
            PROTO_TCP => {
                need(TCP_READ)?;
                let doff = usize::from(p[l4 + 12] >> 4) * 4;
                if doff < 20 {
                    return Err(DropReason::BadTcpOffset);
                }
                // The header its data offset states, within the packet's total length.
                if ihl + doff > usize::from(tot) {
                    return Err(DropReason::Truncated);
                }
                h.sport = be16(p, l4);
                h.dport = be16(p, l4 + 2);
                h.seq = be32(p, l4 + 4);
                h.ack = be32(p, l4 + 8);
                h.tcp_flags = p[l4 + 13];
                h.payload = u32::from(tot).saturating_sub(u32::try_from(ihl + doff).unwrap_or(0));
            }
            PROTO_UDP => {
                need(4)?;
                if ihl + 8 > usize::from(tot) {
                    return Err(DropReason::Truncated);
                }
                h.sport = be16(p, l4);
                h.dport = be16(p, l4 + 2);
            }
            PROTO_ICMP => {
                need(6)?;
                if ihl + 8 > usize::from(tot) {
                    return Err(DropReason::Truncated);
                }
                h.icmp_type = p[l4];
                h.icmp_code = p[l4 + 1];
                match h.icmp_type {
                    ICMP_ECHO => h.sport = be16(p, l4 + 4),
                    ICMP_ECHO_REPLY => h.dport = be16(p, l4 + 4),
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(h)
    }

    // ---- the uplink ----------------------------------------------------------------------

    /// XDP drops, before tc sees it, a plain packet (no IPv4 options, not a fragment, TCP or
    /// UDP) that tc ingress would drop because the inbound rules of the task it opens a flow to
    /// refuse it: the same refusal, counted at the XDP hook. Everything else goes on to tc.
    fn xdp(&mut self) -> Result<R, Stop> {
        self.count(TEST_IFINDEX, HOOK_XDP);
        let p = &self.pkt;
        let plain = self.unicast_ipv4()
            && p.len() >= 34
            && p[14] == 0x45
            && frag_state(be16(p, 20)) == Frag::None
            && matches!(p[23], PROTO_TCP | PROTO_UDP);
        if !plain {
            return Ok(Ok(V::Pass));
        }
        // What tc ingress would make of it, on a copy of everything.
        let host = Host {
            hook: Hook::Uplink,
            ..self.host.clone()
        };
        let mut st = self.st.clone();
        let mut tc = Run {
            host: &host,
            st: &mut st,
            pkt: self.pkt.clone(),
            now: self.now,
            chosen: self.chosen,
            path: String::new(),
            refused_on: None,
        };
        // Only whether it reached a refusal counts here, not its verdict.
        let _ = tc.uplink_ingress()?;
        let Some(ifindex) = tc.refused_on else {
            return Ok(Ok(V::Pass));
        };
        self.drop_on(ifindex, DropReason::SgIngress);
        "dropped SG_INGRESS early (counted on the receiving task)".clone_into(&mut self.path);
        Ok(Ok(V::Dropped))
    }

    fn uplink_ingress(&mut self) -> Result<R, Stop> {
        self.count(TEST_IFINDEX, HOOK_TC_INGRESS);
        if !self.unicast_ipv4() {
            return Ok(Ok(V::Pass));
        }
        let h = match self.parse() {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        self.packet(None, h)
    }

    // ---- a task's interface --------------------------------------------------------------

    /// The task of the test device (`IFACES`), if `TASKS` has it.
    fn iface_task(&self) -> Option<[u8; 4]> {
        self.host
            .iface_task
            .filter(|a| self.st.tasks.contains_key(&addr(*a)))
    }

    /// The task's MAC is learned from its first frame; afterwards any other source MAC is
    /// spoofing.
    fn check_mac(&mut self, task: [u8; 4]) -> Result<[u8; 6], DropReason> {
        if self.len() < 14 {
            return Err(DropReason::Truncated);
        }
        let src: [u8; 6] = self.pkt[6..12].try_into().expect("6 bytes");
        let t = self.st.tasks.get_mut(&addr(task)).expect("a task");
        if t.mac == [0; 6] {
            t.mac = src;
        } else if t.mac != src {
            return Err(DropReason::SpoofedSource);
        }
        Ok(src)
    }

    fn task_ingress(&mut self) -> Result<R, Stop> {
        self.count(TEST_IFINDEX, HOOK_TC_INGRESS);
        // With its own address and interface, its own MAC: the shortcut, same outcome.
        let fast = if self.unicast_ipv4() {
            self.parse().ok().filter(|h| {
                self.st
                    .tasks
                    .get(&addr(h.saddr))
                    .is_some_and(|t| t.ifindex == TEST_IFINDEX)
            })
        } else {
            None
        };
        let fast = fast.filter(|h| self.check_mac(h.saddr).is_ok());
        let h = if let Some(h) = fast {
            h
        } else {
            let Some(own) = self.iface_task() else {
                return Ok(Ok(V::Pass));
            };
            let mac = match self.check_mac(own) {
                Ok(m) => m,
                Err(e) => return Ok(Err(e)),
            };
            let policed = self.host.sg.policed(own);
            let group = self.pkt[0] & 1 != 0;
            match be16(&self.pkt, 12) {
                0x0800 => {}
                0x0806 => return Ok(self.arp(own, mac)),
                0x86dd => return Ok(self.ipv6_from_task(mac, policed)),
                0x8100 | 0x88a8 | 0x9100 => return Ok(Err(DropReason::VlanTagged)),
                _ => return Ok(Err(DropReason::UnknownEthertype)),
            }
            let h = match self.parse() {
                Ok(h) => h,
                Err(e) => return Ok(Err(e)),
            };
            if h.saddr != own {
                return Ok(Err(DropReason::SpoofedSource));
            }
            if group {
                if !self.host.is_group_addr(h.daddr) {
                    return Ok(Err(DropReason::UnicastInGroupMac));
                }
                return Ok(self.unchecked_egress(Some(own), &h));
            }
            h
        };
        if h.daddr == INSTANCE_METADATA_ADDR && self.host.block_imds {
            return Ok(Err(DropReason::ImdsBlocked));
        }
        self.packet(Some(h.saddr), h)
    }

    /// IPv6 from a task (`tc_task_ipv6`), read from the frame's bytes as RFC 8200 and RFC 4861
    /// lay them out. The model's tasks have no IPv6 address ecsnet knows, so only link-local,
    /// unspecified and neighbour-discovery claims can be spoofed; then the metadata block, then
    /// for a task with a policy, what is not plumbing goes to its rules (`policed6`).
    fn ipv6_from_task(&mut self, mac: [u8; 6], policed: bool) -> R {
        let h = self.parse6()?;
        let p = &self.pkt;
        let ok = if h.src == [0; 16] {
            h.proto == PROTO_ICMPV6 && matches!(h.icmp_type, 131 | 135 | 143)
        } else if is_link_local6(&h.src) {
            h.src == link_local(mac)
        } else {
            true
        };
        if !ok {
            return Err(DropReason::SpoofedSource);
        }
        if h.proto == PROTO_UDP && h.sport == 547 {
            return Err(DropReason::RogueRouter);
        }
        if h.proto == PROTO_ICMPV6 {
            let nd_options = |start: usize| -> Result<(), DropReason> {
                if h.frag != Frag::None || h.l4_len < start {
                    return Err(DropReason::NdSpoofed);
                }
                let mut at = start;
                for _ in 0..4 {
                    if at >= h.l4_len {
                        return Ok(());
                    }
                    let o = h.l4 + at;
                    if o + 8 > self.len() || p[o + 1] == 0 {
                        return Err(DropReason::NdSpoofed);
                    }
                    if matches!(p[o], 1 | 2) && p[o + 2..o + 8] != mac {
                        return Err(DropReason::NdSpoofed);
                    }
                    at += usize::from(p[o + 1]) * 8;
                }
                if at >= h.l4_len {
                    Ok(())
                } else {
                    Err(DropReason::NdSpoofed)
                }
            };
            match h.icmp_type {
                134 | 137 | 138 => return Err(DropReason::RogueRouter),
                133 => nd_options(8)?,
                135 => nd_options(24)?,
                136 => {
                    if h.frag != Frag::None || h.l4_len < 24 {
                        return Err(DropReason::NdSpoofed);
                    }
                    let target: [u8; 16] = p[h.l4 + 8..h.l4 + 24].try_into().expect("16 bytes");
                    if is_link_local6(&target) && target != link_local(mac) {
                        return Err(DropReason::NdSpoofed);
                    }
                    nd_options(24)?;
                }
                _ => {}
            }
        }
        if h.dst == INSTANCE_METADATA_ADDR6 && self.host.block_imds {
            return Err(DropReason::ImdsBlocked);
        }
        // No task of the model has an IPv6 address ecsnet knows: without a policy nothing is
        // another task's, and the kernel carries it.
        if !policed || h.is_plumbing() {
            return Ok(V::Pass);
        }
        self.policed6(&h, DropReason::SgEgress)
    }

    /// IPv6 of a task with a policy (`tc_task_ipv6_flow`, `tc_task_ipv6_to`), neither plumbing
    /// nor blocked: the model's policies have no IPv6 rules, so `denied` is the answer of every
    /// packet that gets as far as the rules. Before them: an `ICMPv6` error's quote must be in
    /// the frame (no flow is tracked), a later fragment needs its first on record and not
    /// rejected, a first fragment is put on record and one that opens a flow is rejected.
    fn policed6(&mut self, h: &Ip6, denied: DropReason) -> R {
        if h.is_icmp_error() {
            // The quoted fixed header and the eight bytes behind it.
            if h.l4 + 8 + 40 + 8 > self.len() {
                return Err(DropReason::BadIcmpError);
            }
            return Err(denied);
        }
        match h.frag {
            Frag::None => {}
            Frag::First => {
                let ports = first_fragment(h.sport, h.dport);
                self.st.frags6.insert(h.frag_key(), ports);
            }
            Frag::Later => match self.st.frags6.get(&h.frag_key()) {
                Some(p) if p.rejected == 0 => {}
                _ => return Err(DropReason::Fragment),
            },
        }
        if h.starts_flow()
            && h.frag == Frag::First
            && let Some(p) = self.st.frags6.get_mut(&h.frag_key())
        {
            p.rejected = 1;
        }
        Err(denied)
    }

    /// IPv6 the kernel delivers to a task with a policy.
    fn ipv6_to_task(&mut self) -> R {
        let h = self.parse6()?;
        if h.is_plumbing() {
            return Ok(V::Pass);
        }
        self.policed6(&h, DropReason::SgIngress)
    }

    /// The IPv6 header and its extension headers, walked as the datapath walks them: at most
    /// eight, hop-by-hop only first, no routing type 0, the transport header whole in a first
    /// fragment.
    fn parse6(&self) -> Result<Ip6, DropReason> {
        let (p, len) = (&self.pkt, self.len());
        if len < 54 {
            return Err(DropReason::Truncated);
        }
        if p[14] >> 4 != 6 {
            return Err(DropReason::BadIpHeader);
        }
        let end = match usize::from(be16(p, 18)) {
            0 => len,
            n => 54 + n,
        };
        if end > len {
            return Err(DropReason::Truncated);
        }
        let mut h = Ip6 {
            src: p[22..38].try_into().expect("16 bytes"),
            dst: p[38..54].try_into().expect("16 bytes"),
            proto: p[20],
            l4: 54,
            frag: Frag::None,
            l4_len: 0,
            sport: 0,
            dport: 0,
            icmp_type: 0,
            tcp_flags: 0,
            id: 0,
            hop_limit: p[21],
        };
        for walked in 0..8 {
            match h.proto {
                0 | 43 | 51 | 60 => {
                    if h.proto == 0 && walked != 0 {
                        return Err(DropReason::BadExtHeader);
                    }
                    if h.l4 + 4 > len {
                        return Err(DropReason::Truncated);
                    }
                    if h.proto == 43 && p[h.l4 + 2] == 0 {
                        return Err(DropReason::BadExtHeader);
                    }
                    let n = usize::from(p[h.l4 + 1]);
                    let hlen = if h.proto == 51 {
                        (n + 2) * 4
                    } else {
                        (n + 1) * 8
                    };
                    h.proto = p[h.l4];
                    h.l4 += hlen;
                }
                44 => {
                    if h.l4 + 8 > len {
                        return Err(DropReason::Truncated);
                    }
                    let off = be16(p, h.l4 + 2);
                    if off & 0xfff8 != 0 {
                        h.frag = Frag::Later;
                    } else if off & 1 != 0 {
                        h.frag = Frag::First;
                    }
                    h.proto = p[h.l4];
                    h.id = u32::from_ne_bytes(p[h.l4 + 4..h.l4 + 8].try_into().expect("4 bytes"));
                    h.l4 += 8;
                }
                _ => break,
            }
        }
        if matches!(h.proto, 0 | 43 | 44 | 51 | 60) {
            return Err(DropReason::BadExtHeader);
        }
        if h.frag == Frag::Later {
            return Ok(h);
        }
        if h.l4 > end {
            return Err(DropReason::Truncated);
        }
        h.l4_len = end - h.l4;
        let need = match h.proto {
            PROTO_TCP => 20,
            PROTO_UDP | PROTO_ICMPV6 => 8,
            _ => 0,
        };
        if need > h.l4_len {
            return Err(if h.frag == Frag::First {
                DropReason::BadExtHeader
            } else {
                DropReason::Truncated
            });
        }
        self.transport6(&mut h)?;
        Ok(h)
    }

    /// The transport header of `h` (whole, as `parse6` checked): ports, flags, `ICMPv6` type
    /// and echo identifier.
    fn transport6(&self, h: &mut Ip6) -> Result<(), DropReason> {
        let p = &self.pkt;
        match h.proto {
            PROTO_TCP => {
                let doff = usize::from(p[h.l4 + 12] >> 4) * 4;
                if doff < 20 {
                    return Err(DropReason::BadTcpOffset);
                }
                if doff > h.l4_len {
                    return Err(DropReason::Truncated);
                }
                (h.sport, h.dport) = (be16(p, h.l4), be16(p, h.l4 + 2));
                h.tcp_flags = p[h.l4 + 13];
            }
            PROTO_UDP => (h.sport, h.dport) = (be16(p, h.l4), be16(p, h.l4 + 2)),
            PROTO_ICMPV6 => {
                h.icmp_type = p[h.l4];
                match h.icmp_type {
                    128 => h.sport = be16(p, h.l4 + 4),
                    129 => h.dport = be16(p, h.l4 + 4),
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// What the kernel delivers to the task on the test device: its inbound rules, with the
    /// same connection tables as everything else.
    fn task_egress(&mut self) -> Result<R, Stop> {
        self.count(TEST_IFINDEX, HOOK_TC_EGRESS);
        let Some(own) = self.iface_task() else {
            return Ok(Ok(V::Pass));
        };
        let parsed = self.parse();
        // Found by its destination when that is the task on this interface, else through
        // the interface: either way the task of this interface.
        let task = match &parsed {
            Ok(h) if self.len() >= 14 && be16(&self.pkt, 12) == 0x0800 => self
                .st
                .tasks
                .get(&addr(h.daddr))
                .filter(|t| t.ifindex == TEST_IFINDEX)
                .map_or(own, |_| h.daddr),
            _ => own,
        };
        let policed = self.host.sg.policed(task);
        match be16(&self.pkt, 12) {
            0x0800 => {}
            0x86dd if policed => return Ok(self.ipv6_to_task()),
            0x0806 | 0x86dd => return Ok(Ok(V::Pass)),
            0x8100 | 0x88a8 | 0x9100 => return Ok(Err(DropReason::VlanTagged)),
            _ => return Ok(Err(DropReason::UnknownEthertype)),
        }
        if !policed {
            return Ok(Ok(V::Pass));
        }
        let h = match parsed {
            Ok(h) => h,
            Err(e) => return Ok(Err(e)),
        };
        if self.host.is_group_addr(h.daddr) {
            return Ok(self.unchecked_ingress(task, &h));
        }
        self.deliver(task, h)
    }

    fn unchecked_ingress(&self, task: [u8; 4], h: &Hdr) -> R {
        if self.host.sg.ingress(task, h, h.saddr, h.dport) {
            Ok(V::Pass)
        } else {
            Err(DropReason::SgIngress)
        }
    }

    /// A packet the kernel delivers to `task`, which is under a policy.
    fn deliver(&mut self, task: [u8; 4], mut h: Hdr) -> Result<R, Stop> {
        if h.is_icmp_error() {
            let key = match self.quote(&h) {
                Ok(q) => q.key(),
                Err(e) => return Ok(Err(e)),
            };
            if self.st.ct.contains_key(&key) || self.st.ct.contains_key(&key.reversed()) {
                "ICMP error of a tracked flow, delivered".clone_into(&mut self.path);
                return Ok(Ok(V::Pass));
            }
            return Ok(self.unchecked_ingress(task, &h));
        }
        if let Some(r) = self.track_fragment(Via::Delivery, &mut h) {
            return Ok(r.and(Err(DropReason::Fragment)));
        }
        let Some(key) = h.key() else {
            return Ok(self.unchecked_ingress(task, &h));
        };
        if let Some(e) = self.lookup(&key) {
            if let Err(r) = self.check_close(&h, &e) {
                return Ok(Err(r));
            }
            if e.e.kind == KIND_LOCAL {
                self.touch(&key, &h)?;
            }
            self.path = format!("tracked {}, delivered", kind_name(e.e.kind));
            return Ok(Ok(V::Pass));
        }
        if self.st.ct.contains_key(&key.reversed()) {
            "reply tuple tracked, delivered".clone_into(&mut self.path);
            return Ok(Ok(V::Pass));
        }
        if !h.starts_flow() {
            return Ok(self.unchecked_ingress(task, &h));
        }
        if !self.host.sg.ingress(task, &h, h.saddr, h.dport) {
            self.reject_fragments(&h);
            return Ok(Err(DropReason::SgIngress));
        }
        Ok(self.kernel_flow(Some(task), &key, &h))
    }

    /// ARP from a task speaks for the task only: its MAC, its address (or none, a probe).
    fn arp(&self, own: [u8; 4], mac: [u8; 6]) -> R {
        if self.len() < 14 + 8 + 10 {
            return Err(DropReason::Truncated);
        }
        let sender_mac: [u8; 6] = self.pkt[22..28].try_into().expect("6 bytes");
        let sender = ip4(&self.pkt, 28);
        if sender_mac == mac && (sender == own || sender == [0; 4]) {
            Ok(V::Pass)
        } else {
            Err(DropReason::SpoofedSource)
        }
    }

    // ---- the decision ----------------------------------------------------------------------

    fn unchecked_egress(&self, task: Option<[u8; 4]>, h: &Hdr) -> R {
        if self.host.sg.egress(task, h, h.daddr, h.dport) {
            Ok(V::Pass)
        } else {
            Err(DropReason::SgEgress)
        }
    }

    fn policed(&self, task: Option<[u8; 4]>) -> bool {
        task.is_some_and(|t| self.host.sg.policed(t))
    }

    fn lookup(&self, key: &CtKey) -> Option<Entry> {
        self.st.ct.get(key).copied()
    }

    /// One unicast IPv4 packet from `task` (None: the uplink).
    fn packet(&mut self, task: Option<[u8; 4]>, mut h: Hdr) -> Result<R, Stop> {
        if h.is_icmp_error() {
            return Ok(self.icmp_error(task, &h));
        }
        let via = task.map_or(Via::Uplink, Via::Task);
        if let Some(r) = self.track_fragment(via, &mut h) {
            return Ok(r);
        }
        let Some(key) = h.key() else {
            return Ok(self.unchecked_egress(task, &h));
        };
        if let Some(e) = self.lookup(&key) {
            return self.established(&h, &key, e);
        }
        if !h.starts_flow() {
            return Ok(self.unchecked_egress(task, &h));
        }
        Ok(self.open(task, &h, &key))
    }

    /// Remembers the ports of a first fragment, fills in those of a later one; a later one
    /// without its first (or of a rejected datagram) has its answer here.
    fn track_fragment(&mut self, from: Via, h: &mut Hdr) -> Option<R> {
        match h.frag {
            Frag::None => None,
            Frag::First => {
                let ports = first_fragment(h.sport, h.dport);
                self.st.frags.insert(h.frag_key(), ports);
                None
            }
            Frag::Later => match self.st.frags.get(&h.frag_key()) {
                Some(p) if p.rejected != 0 => Some(Err(DropReason::Fragment)),
                Some(p) => {
                    h.sport = u16::from_be(p.sport);
                    h.dport = u16::from_be(p.dport);
                    None
                }
                None => {
                    let ours = match from {
                        Via::Delivery => true,
                        Via::Task(t) => self.policed(Some(t)) || !self.host.is_local(h.daddr),
                        Via::Uplink => self.st.tasks.contains_key(&addr(h.daddr)),
                    };
                    Some(if ours {
                        Err(DropReason::Fragment)
                    } else {
                        Ok(V::Pass)
                    })
                }
            },
        }
    }

    fn reject_fragments(&mut self, h: &Hdr) {
        if h.frag == Frag::First
            && let Some(p) = self.st.frags.get_mut(&h.frag_key())
        {
            p.rejected = 1;
        }
    }

    /// Task `dst`'s inbound rules for `h` reaching it at port `dport`; a refusal is counted on
    /// `dst`'s interface.
    fn admit(&mut self, h: &Hdr, dst: [u8; 4], dport: u16) -> Result<(), V> {
        if self.host.sg.ingress(dst, h, h.saddr, dport) {
            return Ok(());
        }
        let ifindex = self.st.tasks[&addr(dst)].ifindex;
        self.refused_on = Some(ifindex);
        self.drop_on(ifindex, DropReason::SgIngress);
        "dropped SG_INGRESS (counted on the receiving task)".clone_into(&mut self.path);
        self.reject_fragments(h);
        Err(V::Dropped)
    }

    /// A packet that opens a flow no entry tracks.
    fn open(&mut self, task: Option<[u8; 4]>, h: &Hdr, key: &CtKey) -> R {
        let same = (h.saddr, h.daddr, h.sport, h.dport);
        let (kind, nat, choose) = 'open: {
            if task.is_some() {
                if !self.host.sg.egress(task, h, h.daddr, h.dport) {
                    self.reject_fragments(h);
                    return Err(DropReason::SgEgress);
                }
                if self.st.tasks.contains_key(&addr(h.daddr)) {
                    if let Err(v) = self.admit(h, h.daddr, h.dport) {
                        return Ok(v);
                    }
                    break 'open (KIND_EAST_WEST, same, false);
                }
            }
            if !self.host.is_local(h.daddr) {
                return match task {
                    None => Ok(V::Pass),
                    Some(_) if h.daddr[0] == 169 && h.daddr[1] == 254 => {
                        self.kernel_flow(task, key, h)
                    }
                    // Masqueraded: out of the uplink, which no FIB lookup finds here.
                    Some(_) => {
                        let nat = (self.host.uplink_ipv4, h.daddr, h.sport, h.dport);
                        break 'open (KIND_MASQUERADE, nat, true);
                    }
                };
            }
            let Some(&(to, port)) = self.host.ports.get(&(h.proto, h.dport)) else {
                return self.kernel_flow(task, key, h);
            };
            if !self.st.tasks.contains_key(&addr(to)) {
                return Ok(V::Pass);
            }
            if let Err(v) = self.admit(h, to, port) {
                return Ok(v);
            }
            let nat = (h.saddr, to, h.sport, port);
            match task {
                None => (KIND_INBOUND, nat, false),
                Some(_) if to == h.saddr => (
                    KIND_HAIRPIN,
                    (self.host.bridge_ipv4, nat.1, nat.2, nat.3),
                    true,
                ),
                Some(_) => (KIND_HAIRPIN, nat, false),
            }
        };
        let routed = kind != KIND_EAST_WEST;
        let Some(next) = self.next_hop(h, nat.1, routed) else {
            return self.kernel_flow(task, key, h);
        };
        let nat = self.create(key, nat, kind, choose, h)?;
        self.path = format!("opened {}", kind_name(kind));
        self.rewrite_and_send(h, &next, routed, nat)
    }

    /// A new flow the kernel carries: tracked (`KIND_LOCAL`) when the sender is under a policy.
    fn kernel_flow(&mut self, task: Option<[u8; 4]>, key: &CtKey, h: &Hdr) -> R {
        if self.policed(task) {
            "opened local (kernel carries it)".clone_into(&mut self.path);
            let same = (h.saddr, h.daddr, h.sport, h.dport);
            self.create(key, same, KIND_LOCAL, false, h)?;
        }
        Ok(V::Pass)
    }

    fn next_hop(&self, h: &Hdr, daddr: [u8; 4], routed: bool) -> Option<Next> {
        if routed && h.ttl <= 1 {
            return None;
        }
        let t = self.st.tasks.get(&addr(daddr))?;
        Some(if routed && t.mac == [0; 6] {
            Next::Kernel
        } else {
            Next::Task(*t)
        })
    }

    fn is_free(&self, k: &CtKey) -> bool {
        !self.st.ct.contains_key(k)
    }

    /// Both directions of a new flow, in `CT_NEW`; returns the rewrite chosen.
    fn create(
        &mut self,
        key: &CtKey,
        nat: ([u8; 4], [u8; 4], u16, u16),
        kind: u8,
        choose: bool,
        h: &Hdr,
    ) -> Result<([u8; 4], [u8; 4], u16, u16), DropReason> {
        let (ns, nd, mut nsp, ndp) = nat;
        let mut reply_key = CtKey {
            saddr: addr(nd),
            daddr: addr(ns),
            sport: ndp.to_be(),
            dport: nsp.to_be(),
            proto: key.proto,
            _pad: [0; 3],
        };
        if !self.is_free(&reply_key) {
            if !choose {
                return Err(DropReason::NatCollision);
            }
            // The datapath's own pick: a port of 1024..=65535 whose reply tuple is free.
            let port = (self.chosen)(key).unwrap_or(0);
            reply_key.dport = port.to_be();
            if port < 1024 || !self.is_free(&reply_key) {
                // No valid pick: the datapath should have made one (16 tries among ~64k
                // ports, a handful taken); expected is a port it cannot have.
                reply_key.dport = 0;
            }
            nsp = u16::from_be(reply_key.dport);
        }
        let now = self.now;
        let reply = CtEntry {
            peer: *key,
            nat_saddr: key.daddr,
            nat_daddr: key.saddr,
            nat_sport: key.dport,
            nat_dport: key.sport,
            kind,
            dir: DIR_REPLY,
            ..CtEntry::default()
        };
        let entry = |e| Entry {
            table: Table::New,
            e,
            seen: now,
            created: now,
        };
        self.st.ct.insert(reply_key, entry(reply));
        let mut original = CtEntry {
            peer: reply_key,
            nat_saddr: addr(ns),
            nat_daddr: addr(nd),
            nat_sport: nsp.to_be(),
            nat_dport: ndp.to_be(),
            packets: 1,
            bytes: u64::from(h.tot_len),
            kind,
            dir: DIR_ORIGINAL,
            ..CtEntry::default()
        };
        if h.proto == PROTO_TCP {
            let mut side = original.tcp();
            ct::record_tcp(&mut side, h.tcp_flags, h.seq, h.ack, h.payload);
            (original.tcp_end, original.tcp_ack, original.tcp_flags) =
                (side.end, side.ack, side.flags);
        }
        if self.st.ct.contains_key(key) {
            self.st.ct.remove(&reply_key);
            return Err(DropReason::NatCollision);
        }
        self.st.ct.insert(*key, entry(original));
        self.st.ct_events[CT_EV_CREATED as usize] += 1;
        Ok((ns, nd, nsp, ndp))
    }

    /// A packet of a tracked flow.
    fn established(&mut self, h: &Hdr, key: &CtKey, e: Entry) -> Result<R, Stop> {
        if let Err(r) = self.check_close(h, &e) {
            return Ok(Err(r));
        }
        let nat = (
            ne(e.e.nat_saddr),
            ne(e.e.nat_daddr),
            u16::from_be(e.e.nat_sport),
            u16::from_be(e.e.nat_dport),
        );
        if e.e.kind == KIND_LOCAL {
            "tracked local".clone_into(&mut self.path);
            self.touch(key, h)?;
            return Ok(Ok(V::Pass));
        }
        let routed = e.e.kind != KIND_EAST_WEST;
        let Some(next) = self.next_hop(h, nat.1, routed) else {
            return Ok(Ok(V::Pass));
        };
        self.touch(key, h)?;
        self.path = format!("tracked {}", kind_name(e.e.kind));
        Ok(self.rewrite_and_send(h, &next, routed, nat))
    }

    /// A TCP RST or FIN counts only when it fits the flow's sequence numbers.
    fn check_close(&self, h: &Hdr, e: &Entry) -> Result<(), DropReason> {
        if h.proto != PROTO_TCP || h.frag == Frag::Later || h.tcp_flags & (TCP_RST | TCP_FIN) == 0 {
            return Ok(());
        }
        let Some(other) = self.lookup(&e.e.peer) else {
            return Ok(());
        };
        if ct::tcp_close_counts(
            h.tcp_flags,
            h.seq,
            h.ack,
            h.payload,
            &e.e.tcp(),
            &other.e.tcp(),
        ) {
            Ok(())
        } else {
            Err(DropReason::TcpOutOfWindow)
        }
    }

    /// A packet counted on its entry; the flow moves to `CT` when this packet assures it.
    fn touch(&mut self, key: &CtKey, h: &Hdr) -> Result<(), Stop> {
        let now = self.now;
        let e = self.st.ct.get_mut(key).expect("the entry looked up");
        e.seen = now;
        e.e.packets += 1;
        e.e.bytes += u64::from(h.tot_len);
        let mut restart = false;
        if h.proto == PROTO_TCP && h.frag != Frag::Later {
            let mut side = e.e.tcp();
            restart = ct::record_tcp(&mut side, h.tcp_flags, h.seq, h.ack, h.payload);
            (e.e.tcp_end, e.e.tcp_ack, e.e.tcp_flags) = (side.end, side.ack, side.flags);
        }
        let e = *e;
        if restart && let Some(o) = self.st.ct.get_mut(&e.e.peer) {
            o.e.tcp_flags = 0;
        }
        if e.table == Table::New {
            self.assure(key)?;
        }
        Ok(())
    }

    fn assure(&mut self, key: &CtKey) -> Result<(), Stop> {
        let e = self.st.ct[key];
        let now = self.now;
        if key.proto == PROTO_TCP {
            if e.e.dir != DIR_ORIGINAL || e.e.tcp_flags & TCP_ACK == 0 {
                return Ok(());
            }
        } else {
            let at_most = now.hi.saturating_sub(e.created.lo);
            let at_least = now.lo.saturating_sub(e.created.hi);
            if at_most < ASSURED_AFTER_NS {
                return Ok(());
            }
            if at_least < ASSURED_AFTER_NS {
                return Err(Stop::Out(OutOfModel::Timing));
            }
        }
        let Some(p) = self.st.ct.get(&e.e.peer).copied() else {
            return Ok(());
        };
        if p.table != Table::New {
            return Ok(());
        }
        let (orig, reply) = if e.e.dir == DIR_ORIGINAL {
            (e.e.tcp_flags, p.e)
        } else {
            (p.e.tcp_flags, e.e)
        };
        // The creation stamp is the flow's: the time checks above bound it.
        let assured = ct::assured(
            key.proto,
            orig,
            reply.tcp_flags,
            reply.packets,
            0,
            ASSURED_AFTER_NS,
        );
        if !assured {
            return Ok(());
        }
        for k in [e.e.peer, *key] {
            if let Some(x) = self.st.ct.get_mut(&k) {
                x.table = Table::Assured;
            }
        }
        self.st.ct_events[CT_EV_ASSURED as usize] += 1;
        Ok(())
    }

    // ---- rewriting and sending -------------------------------------------------------------

    /// Writes `new` at `off`, if the frame is long enough.
    fn store(&mut self, off: usize, new: &[u8]) -> Result<(), DropReason> {
        if off + new.len() > self.len() {
            return Err(DropReason::Truncated);
        }
        self.pkt[off..off + new.len()].copy_from_slice(new);
        Ok(())
    }

    /// Updates the checksum at `check` for `from` becoming `to`; with `mangled_0` (UDP) a zero
    /// checksum ("none") stays zero, and a result of zero is written as 0xffff.
    fn csum(&mut self, check: usize, from: &[u8], to: &[u8], mangled_0: bool) -> R {
        if check + 2 > self.len() {
            return Err(DropReason::Truncated);
        }
        let old = be16(&self.pkt, check);
        if mangled_0 && old == 0 {
            return Ok(V::Pass);
        }
        let mut new = csum_replace(old, &words(from), &words(to));
        if mangled_0 && new == 0 {
            new = 0xffff;
        }
        self.pkt[check..check + 2].copy_from_slice(&new.to_be_bytes());
        Ok(V::Pass)
    }

    /// Rewrites addresses and ports (the echo identifier) to `nat`, with every checksum.
    fn rewrite(&mut self, h: &Hdr, nat: ([u8; 4], [u8; 4], u16, u16)) -> R {
        let check = match (h.frag, h.proto) {
            (Frag::Later, _) => None,
            (_, PROTO_TCP) => Some(h.l4 + 16),
            (_, PROTO_UDP) => Some(h.l4 + 6),
            (_, PROTO_ICMP) => Some(h.l4 + 2),
            _ => None,
        };
        let udp = h.proto == PROTO_UDP;
        for (off, old, new) in [(26, h.saddr, nat.0), (30, h.daddr, nat.1)] {
            if old == new {
                continue;
            }
            if let Some(c) = check
                && h.proto != PROTO_ICMP
            {
                self.csum(c, &old, &new, udp)?;
            }
            self.csum(24, &old, &new, false)?;
            self.store(off, &new)?;
        }
        let Some(c) = check else {
            return Ok(V::Pass);
        };
        let ports: Vec<(usize, u16, u16)> = match (h.proto, h.icmp_type) {
            (PROTO_ICMP, ICMP_ECHO) => vec![(h.l4 + 4, h.sport, nat.2)],
            (PROTO_ICMP, ICMP_ECHO_REPLY) => vec![(h.l4 + 4, h.dport, nat.3)],
            (PROTO_ICMP, _) => vec![],
            _ => vec![(h.l4, h.sport, nat.2), (h.l4 + 2, h.dport, nat.3)],
        };
        for (off, old, new) in ports {
            if old == new {
                continue;
            }
            self.csum(c, &old.to_be_bytes(), &new.to_be_bytes(), udp)?;
            self.store(off, &new.to_be_bytes())?;
        }
        Ok(V::Pass)
    }

    fn rewrite_and_send(&mut self, h: &Hdr, next: &Next, routed: bool, nat: Nat4) -> R {
        self.rewrite(h, nat)?;
        self.send(h, next, routed)
    }

    /// Sends a translated packet: routed ones lose a TTL (unless the kernel routes them);
    /// into a task it is counted there and, routed, addressed from the bridge to the task.
    fn send(&mut self, h: &Hdr, next: &Next, routed: bool) -> R {
        if routed && !matches!(next, Next::Kernel) {
            let old = [self.pkt[22], self.pkt[23]];
            let new = [h.ttl - 1, old[1]];
            self.csum(24, &old, &new, false)?;
            self.store(22, &new)?;
        }
        match next {
            Next::Task(t) => {
                self.count(t.ifindex, HOOK_TC_EGRESS);
                if routed {
                    let mut macs = t.mac.to_vec();
                    macs.extend(self.host.bridge_mac);
                    self.store(0, &macs)?;
                }
                Ok(V::Redirect)
            }
            Next::Kernel => Ok(V::Pass),
        }
    }

    /// An ICMP error: follows the flow it quotes when that is tracked (translated like the
    /// packets of that direction, its quote too); otherwise, from a task, its egress rules
    /// decide.
    fn icmp_error(&mut self, task: Option<[u8; 4]>, h: &Hdr) -> R {
        let quoted = self.quote(h)?;
        let key = quoted.key();
        let Some(e) = self.lookup(&key) else {
            return self.unchecked_egress(task, h);
        };
        if e.e.kind == KIND_LOCAL {
            return Ok(V::Pass);
        }
        let routed = e.e.kind != KIND_EAST_WEST;
        let Some(next) = self.next_hop(h, ne(e.e.nat_daddr), routed) else {
            return Ok(V::Pass);
        };
        self.rewrite_icmp_error(h, &key, &quoted, &e.e)?;
        self.path = format!("ICMP error of a tracked {} flow", kind_name(e.e.kind));
        self.send(h, &next, routed)
    }

    /// The packet ICMP error `h` quotes: a whole IPv4 header and 8 bytes behind it.
    fn quote(&self, h: &Hdr) -> Result<Quote, DropReason> {
        let p = &self.pkt;
        let q = h.l4 + 8;
        if p.len() < q + 20 || p[q] >> 4 != 4 || usize::from(p[q] & 15) * 4 < 20 {
            return Err(DropReason::BadIcmpError);
        }
        let ql4 = q + usize::from(p[q] & 15) * 4;
        if p.len() < ql4 + 8 {
            return Err(DropReason::BadIcmpError);
        }
        Ok(Quote {
            at: q,
            l4: ql4,
            proto: p[q + 9],
            saddr: ip4(p, q + 12),
            daddr: ip4(p, q + 16),
            ports: match p[q + 9] {
                PROTO_TCP | PROTO_UDP => (be16(p, ql4), be16(p, ql4 + 2)),
                PROTO_ICMP if p[ql4] == ICMP_ECHO => (be16(p, ql4 + 4), 0),
                PROTO_ICMP if p[ql4] == ICMP_ECHO_REPLY => (0, be16(p, ql4 + 4)),
                _ => (0, 0),
            },
        })
    }

    /// The outer destination (and source, when the flow's own endpoint sent the error) as the
    /// flow's direction `e` rewrites them; the quote, which travels the other way, rewritten
    /// back: its addresses, its header checksum, its ports (or echo identifier) and, when the
    /// quote holds it, its transport checksum. Every change inside the ICMP message updates
    /// the ICMP checksum; the quote's own checksums are updated 16 bits at a time.
    fn rewrite_icmp_error(&mut self, h: &Hdr, key: &CtKey, q: &Quote, e: &CtEntry) -> R {
        let icmp_check = h.l4 + 2;
        let (nsa, nda) = (ne(e.nat_saddr), ne(e.nat_daddr));
        if h.daddr != nda {
            self.csum(24, &h.daddr, &nda, false)?;
            self.store(30, &nda)?;
        }
        if addr(h.saddr) == key.saddr && h.saddr != nsa {
            self.csum(24, &h.saddr, &nsa, false)?;
            self.store(26, &nsa)?;
        }
        // The quote's source is the flow's destination, and the other way round.
        let (qsa, qda) = (nda, nsa);
        let (qsp, qdp) = (u16::from_be(e.nat_dport), u16::from_be(e.nat_sport));
        let old_ipcheck = be16(&self.pkt, q.at + 10);
        let ipcheck = by_words(by_words(old_ipcheck, &q.saddr, &qsa), &q.daddr, &qda);
        self.in_icmp(icmp_check, q.at + 12, &q.saddr, &qsa)?;
        self.in_icmp(icmp_check, q.at + 16, &q.daddr, &qda)?;
        self.in_icmp(
            icmp_check,
            q.at + 10,
            &old_ipcheck.to_be_bytes(),
            &ipcheck.to_be_bytes(),
        )?;
        let (ports, check, pseudo) = match q.proto {
            PROTO_TCP => (
                vec![(q.l4, q.ports.0, qsp), (q.l4 + 2, q.ports.1, qdp)],
                q.l4 + 16,
                true,
            ),
            PROTO_UDP => (
                vec![(q.l4, q.ports.0, qsp), (q.l4 + 2, q.ports.1, qdp)],
                q.l4 + 6,
                true,
            ),
            _ if q.ports.0 != 0 => (vec![(q.l4 + 4, q.ports.0, qsp)], q.l4 + 2, false),
            _ => (vec![(q.l4 + 4, q.ports.1, qdp)], q.l4 + 2, false),
        };
        let old_check = (check + 2 <= self.len()).then(|| be16(&self.pkt, check));
        let mut l4check = old_check.unwrap_or(0);
        if pseudo {
            l4check = by_words(by_words(l4check, &q.saddr, &qsa), &q.daddr, &qda);
        }
        for (off, old, new) in ports {
            if old == new {
                continue;
            }
            l4check = by_words(l4check, &old.to_be_bytes(), &new.to_be_bytes());
            self.in_icmp(icmp_check, off, &old.to_be_bytes(), &new.to_be_bytes())?;
        }
        if let Some(old) = old_check
            && !(q.proto == PROTO_UDP && old == 0)
        {
            self.in_icmp(
                icmp_check,
                check,
                &old.to_be_bytes(),
                &l4check.to_be_bytes(),
            )?;
        }
        Ok(V::Pass)
    }

    /// `new` over `old` at `off` inside the ICMP message, its checksum updated; nothing when
    /// they are equal.
    fn in_icmp(&mut self, icmp_check: usize, off: usize, old: &[u8], new: &[u8]) -> R {
        if old != new {
            self.csum(icmp_check, old, new, false)?;
            self.store(off, new)?;
        }
        Ok(V::Pass)
    }
}

/// The packet an ICMP error quotes: where its header and transport header start, its
/// protocol, addresses and ports (the echo identifier as in [`Hdr`]), host byte order.
struct Quote {
    at: usize,
    l4: usize,
    proto: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
    ports: (u16, u16),
}

impl Quote {
    /// The key of the packets travelling the way the error does: the quote reversed.
    fn key(&self) -> CtKey {
        CtKey {
            saddr: addr(self.daddr),
            daddr: addr(self.saddr),
            sport: self.ports.1.to_be(),
            dport: self.ports.0.to_be(),
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// `check` updated for `old` becoming `new`, one 16-bit word at a time.
fn by_words(check: u16, old: &[u8], new: &[u8]) -> u16 {
    words(old)
        .into_iter()
        .zip(words(new))
        .fold(check, |c, (o, n)| csum_replace(c, &[o], &[n]))
}

/// A rewrite: source, destination, source port, destination port (host byte order).
type Nat4 = ([u8; 4], [u8; 4], u16, u16);

/// The kinds ecsnet creates, for reports.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_EAST_WEST => "east-west",
        KIND_INBOUND => "inbound",
        KIND_MASQUERADE => "masquerade",
        KIND_HAIRPIN => "hairpin",
        KIND_LOCAL => "local",
        _ => "?",
    }
}
