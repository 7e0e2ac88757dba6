//! The NAT and conntrack paths of the tc programs through BPF_PROG_TEST_RUN, as a table of
//! fixtures. Each case names the program, the maps it seeds, the input frames, and for every
//! frame the exact verdict and the exact bytes that come out; then the exact map effect: every
//! CT entry (key, nat fields, kind, dir, peer, counters), FRAGS, the learned task MACs, the
//! drop counters and the delivery counter of the destination task.
//!
//! Expected frames are built from scratch by the same builder as the input, with the translated
//! fields, and their checksums computed in full with `ecsnet_common::csum`; the datapath updates
//! them incrementally, so an equal frame proves the incremental update. Every IPv4, TCP, UDP and
//! ICMP checksum of a well-formed output is verified on its own as well.
//!
//! Every case loads its own `Ebpf`, so its maps hold exactly what the case seeded. In a test run
//! the skb's device is the loopback (ifindex 1): uplink cases configure ifindex 1 as the uplink,
//! task cases register ifindex 1 as task A's interface and put the uplink on an ifindex that
//! does not exist, so no FIB lookup can ever answer "uplink".

use std::{
    collections::HashMap as StdHashMap,
    fmt::Write as _,
    panic::{AssertUnwindSafe, catch_unwind},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use ecsnet_common::{
    DropReason,
    csum::{checksum, pseudo_header},
    ct::{
        CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND,
        KIND_MASQUERADE, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    maps::{
        CLASS_IPV4, Config, Counters, DropKey, FragKey, FragPorts, HOOK_TC_EGRESS, HOOK_TC_INGRESS,
        IfaceInfo, PortKey, PortTarget, ROLE_TASK, StatsKey, TaskInfo,
    },
};

// Verdicts of a tc program.
const OK: u32 = 0;
const SHOT: u32 = 2;
const REDIRECT: u32 = 7;

/// The skb device of BPF_PROG_TEST_RUN without ctx_in: the loopback.
const TEST_IFINDEX: u32 = 1;
/// Where task cases put the uplink: no interface has this index (checked), so the datapath's
/// FIB lookup can never say "out of the uplink" and nothing is masqueraded.
const NO_SUCH_IFINDEX: u32 = 999_999;

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

// Outside.
const CLIENT: [u8; 4] = [10, 10, 0, 2];
/// The masqueraded flows' remote end (the same machine as the client).
const REMOTE: [u8; 4] = CLIENT;
const ROUTER: [u8; 4] = [10, 10, 0, 254];
const ROUTER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0xfe];
const NOT_LOCAL: [u8; 4] = [10, 10, 0, 77];
const INTERNET: [u8; 4] = [198, 51, 100, 7];

/// IPv4 flags/fragment-offset field values.
const DF: u16 = 0x4000;
const MF: u16 = 0x2000;

/// `last_seen_ns` of seeded CT entries: long ago.
const SEEDED_NS: u64 = 1_000_000;

fn addr(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        /// Data offset in words as written in the header; the header is max(doff, 5) words.
        doff: u8,
        data: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        data: Vec<u8>,
        /// Send without a checksum (0).
        zero_csum: bool,
    },
    Icmp {
        typ: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Transport bytes as given: fragments, truncated headers.
    Raw { proto: u8, bytes: Vec<u8> },
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp { .. } => PROTO_ICMP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    /// The transport bytes, checksums computed in full for addresses `src` -> `dst`.
    fn bytes(&self, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        match self {
            L4::Tcp {
                sport,
                dport,
                flags,
                doff,
                data,
            } => {
                let hlen = (*doff).max(5) as usize * 4;
                let mut t = Vec::new();
                t.extend(sport.to_be_bytes());
                t.extend(dport.to_be_bytes());
                t.extend(SEQ.to_be_bytes());
                let ack = if flags & TCP_ACK != 0 { ACK } else { 0 };
                t.extend(ack.to_be_bytes());
                t.extend([doff << 4, *flags]);
                t.extend(64240u16.to_be_bytes());
                t.extend([0, 0, 0, 0]); // checksum, urgent pointer
                t.resize(hlen, 1); // NOP options
                t.extend(data);
                let c = checksum(&t, pseudo_header(src, dst, PROTO_TCP, t.len() as u16));
                t[16..18].copy_from_slice(&c.to_be_bytes());
                t
            }
            L4::Udp {
                sport,
                dport,
                data,
                zero_csum,
            } => {
                let mut u = Vec::new();
                u.extend(sport.to_be_bytes());
                u.extend(dport.to_be_bytes());
                u.extend(((8 + data.len()) as u16).to_be_bytes());
                u.extend([0, 0]);
                u.extend(data);
                if !zero_csum {
                    let c = match checksum(&u, pseudo_header(src, dst, PROTO_UDP, u.len() as u16)) {
                        0 => 0xffff,
                        c => c,
                    };
                    u[6..8].copy_from_slice(&c.to_be_bytes());
                }
                u
            }
            L4::Icmp {
                typ,
                code,
                rest,
                body,
            } => {
                let mut m = vec![*typ, *code, 0, 0];
                m.extend(rest);
                m.extend(body);
                let c = checksum(&m, 0);
                m[2..4].copy_from_slice(&c.to_be_bytes());
                m
            }
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }
}

/// An Ethernet + IPv4 frame.
#[derive(Clone, Debug)]
struct P {
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    id: u16,
    /// Flags and fragment offset, as the header field.
    frag: u16,
    opts: Vec<u8>,
    l4: L4,
    /// Hostile overrides of the header length (words) and total length.
    ihl_words: Option<u8>,
    tot_len: Option<u16>,
    /// Ethernet padding after the IP packet (a short frame padded to the 60-byte minimum).
    pad: usize,
}

impl P {
    /// A packet arriving from the outside: router MAC to the uplink's MAC, TTL 64, DF.
    fn new(src: [u8; 4], dst: [u8; 4], l4: L4) -> P {
        P {
            dmac: UPLINK_MAC,
            smac: ROUTER_MAC,
            src,
            dst,
            ttl: 64,
            id: 0x1c46,
            frag: DF,
            opts: Vec::new(),
            l4,
            ihl_words: None,
            tot_len: None,
            pad: 0,
        }
    }

    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> P {
        P::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
                doff: 5,
                data: Vec::new(),
            },
        )
    }

    fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, data: &[u8]) -> P {
        P::new(
            src,
            dst,
            L4::Udp {
                sport,
                dport,
                data: data.to_vec(),
                zero_csum: false,
            },
        )
    }

    fn icmp(src: [u8; 4], dst: [u8; 4], typ: u8, code: u8, rest: [u8; 4], body: Vec<u8>) -> P {
        P::new(
            src,
            dst,
            L4::Icmp {
                typ,
                code,
                rest,
                body,
            },
        )
    }

    /// Sent by a task: its MAC to the bridge's (its gateway's) MAC.
    fn sent_by_task(mut self, mac: [u8; 6]) -> P {
        self.smac = mac;
        self.dmac = BRIDGE_MAC;
        self
    }

    /// As routed into a task by the datapath: TTL - 1, the bridge's MAC to the task's.
    fn routed_to(mut self, mac: [u8; 6]) -> P {
        self.ttl -= 1;
        self.smac = BRIDGE_MAC;
        self.dmac = mac;
        self
    }

    /// Sent straight to the MAC of another task on the same subnet.
    fn addressed_to(mut self, mac: [u8; 6]) -> P {
        self.dmac = mac;
        self
    }

    /// Padded with zeros to the minimum Ethernet frame of 60 bytes (without FCS).
    fn padded(mut self) -> P {
        self.pad = 60usize.saturating_sub(14 + self.ip().len());
        self
    }

    fn ttl(mut self, ttl: u8) -> P {
        self.ttl = ttl;
        self
    }

    fn id(mut self, id: u16) -> P {
        self.id = id;
        self
    }

    fn data(mut self, d: &[u8]) -> P {
        match &mut self.l4 {
            L4::Tcp { data, .. } | L4::Udp { data, .. } => *data = d.to_vec(),
            _ => panic!("data() on a packet without ports"),
        }
        self
    }

    fn ports(&mut self) -> (&mut u16, &mut u16) {
        match &mut self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (sport, dport),
            _ => panic!("ports of a packet without ports"),
        }
    }

    /// The destination rewritten to `dst`:`dport`.
    fn dnat(mut self, dst: [u8; 4], dport: u16) -> P {
        self.dst = dst;
        *self.ports().1 = dport;
        self
    }

    /// The source rewritten to `src`:`sport`.
    fn snat(mut self, src: [u8; 4], sport: u16) -> P {
        self.src = src;
        *self.ports().0 = sport;
        self
    }

    /// The IPv4 packet.
    fn ip(&self) -> Vec<u8> {
        let l4 = self.l4.bytes(self.src, self.dst);
        let hlen = 20 + self.opts.len();
        let tot = self.tot_len.unwrap_or((hlen + l4.len()) as u16);
        let ihl = self.ihl_words.unwrap_or((hlen / 4) as u8);
        let mut h = vec![0x40 | ihl, 0];
        h.extend(tot.to_be_bytes());
        h.extend(self.id.to_be_bytes());
        h.extend(self.frag.to_be_bytes());
        h.extend([self.ttl, self.l4.proto(), 0, 0]);
        h.extend(self.src);
        h.extend(self.dst);
        h.extend(&self.opts);
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend(l4);
        h
    }

    fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(self.dmac);
        f.extend(self.smac);
        f.extend(0x0800u16.to_be_bytes());
        f.extend(self.ip());
        f.resize(f.len() + self.pad, 0);
        f
    }
}

/// What an ICMP error quotes of `p`: its IP header and `l4_len` bytes of what follows.
fn quote(p: &P, l4_len: usize) -> Vec<u8> {
    let ip = p.ip();
    ip[..20 + p.opts.len() + l4_len].to_vec()
}

/// Checks every checksum of a well-formed frame on its own: the IPv4 header, the TCP or UDP
/// checksum with its pseudo-header (not for fragments: it covers the whole datagram), the ICMP
/// checksum over the whole message and the IPv4 header an ICMP error quotes.
fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if checksum(&ip[..ihl], 0) != 0 {
        return Err("the IPv4 header checksum does not verify".into());
    }
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Ok(());
    }
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let l4 = &ip[ihl..tot];
    match ip[9] {
        PROTO_TCP => {
            if checksum(l4, pseudo_header(src, dst, PROTO_TCP, l4.len() as u16)) != 0 {
                return Err("the TCP checksum does not verify".into());
            }
        }
        PROTO_UDP if l4[6..8] != [0, 0] => {
            if checksum(l4, pseudo_header(src, dst, PROTO_UDP, l4.len() as u16)) != 0 {
                return Err("the UDP checksum does not verify".into());
            }
        }
        PROTO_ICMP => {
            if checksum(l4, 0) != 0 {
                return Err("the ICMP checksum does not verify".into());
            }
            if matches!(l4[0], 3 | 11 | 12) && l4.len() >= 28 {
                let q = &l4[8..];
                let qihl = (q[0] & 0x0f) as usize * 4;
                if q.len() >= qihl && checksum(&q[..qihl], 0) != 0 {
                    return Err("the quoted IPv4 header checksum does not verify".into());
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Names the header field at `off` of a frame (outer headers only), for failure messages.
fn field(frame: &[u8], off: usize) -> String {
    let name = match off {
        0..=5 => "eth.dst",
        6..=11 => "eth.src",
        12..=13 => "eth.type",
        22 => "ip.ttl",
        24..=25 => "ip.check",
        26..=29 => "ip.saddr",
        30..=33 => "ip.daddr",
        14..=33 => "ip header",
        _ => {
            let ihl = frame.get(14).map_or(20, |v| (v & 0x0f) as usize * 4);
            return format!("l4+{}", off as isize - 14 - ihl as isize);
        }
    };
    name.to_owned()
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn compare_frames(got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let mut s = String::new();
    if got.len() != want.len() {
        let _ = write!(s, "length {} != expected {}; ", got.len(), want.len());
    }
    let diffs: Vec<String> = (0..got.len().min(want.len()))
        .filter(|&i| got[i] != want[i])
        .map(|i| {
            format!(
                "@{i} ({}): got {:02x} want {:02x}",
                field(want, i),
                got[i],
                want[i]
            )
        })
        .collect();
    let _ = write!(
        s,
        "bytes differ: {}\n  got:  {}\n  want: {}",
        diffs.join(", "),
        hex(got),
        hex(want)
    );
    Err(s)
}

// ---------------------------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Seed {
    Task([u8; 4], u32, [u8; 6]),
    /// Protocol, host port, task address, container port.
    Port(u8, u16, [u8; 4], u16),
    Local([u8; 4], u32),
    Iface(u32, [u8; 4], u8),
    /// An entry in `CT` (assured) or, with `Table::New`, in `CT_NEW`.
    Ct(CtKey, CtEntry, Table),
}

/// Which connection table an entry is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    /// `CT`: assured flows, never evicted.
    Assured,
    /// `CT_NEW`: flows not assured yet (LRU).
    New,
}

impl Table {
    fn map(self) -> &'static str {
        match self {
            Table::Assured => "CT",
            Table::New => "CT_NEW",
        }
    }
}

/// The sequence number of every TCP segment the fixtures build, and the acknowledgement number
/// of those with ACK.
const SEQ: u32 = 0x1000_0001;
const ACK: u32 = 0x2000_0002;

/// The host of uplink cases: two tasks, three published ports, one more local address.
fn uplink_world() -> Vec<Seed> {
    vec![
        Seed::Task(TASK_A, IFINDEX_A, MAC_A),
        Seed::Task(TASK_B, IFINDEX_B, MAC_B),
        Seed::Port(PROTO_TCP, 8080, TASK_A, 80),
        Seed::Port(PROTO_UDP, 5353, TASK_A, 53),
        Seed::Port(PROTO_TCP, 8443, TASK_B, 443),
        Seed::Local(OTHER_LOCAL, TEST_IFINDEX),
    ]
}

/// The same host seen from task A's interface (ifindex 1 in a test run).
fn task_world() -> Vec<Seed> {
    let mut w = uplink_world();
    w.push(Seed::Iface(TEST_IFINDEX, TASK_A, ROLE_TASK));
    w
}

/// A world plus more seeds (later seeds of the same key win).
fn with(mut world: Vec<Seed>, more: impl IntoIterator<Item = Seed>) -> Vec<Seed> {
    world.extend(more);
    world
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    /// tc_uplink_ingress, with the test device (ifindex 1) configured as the uplink.
    Uplink,
    /// tc_task_ingress, with the test device registered as task A's interface.
    Task,
    /// tc_task_new_flow run on its own, on a host whose configuration is not written.
    NewFlowUnconfigured,
}

impl Prog {
    fn name(self) -> &'static str {
        match self {
            Prog::Uplink => "tc_uplink_ingress",
            Prog::Task => "tc_task_ingress",
            Prog::NewFlowUnconfigured => "tc_task_new_flow",
        }
    }

    fn config(self) -> Config {
        Config {
            uplink_ifindex: match self {
                Prog::Uplink => TEST_IFINDEX,
                Prog::Task => NO_SUCH_IFINDEX,
                // 0: `ecsnet up` has not written the host's configuration.
                Prog::NewFlowUnconfigured => 0,
            },
            uplink_ipv4: addr(HOST),
            bridge_ifindex: TEST_IFINDEX,
            bridge_ipv4: addr(BRIDGE),
            bridge_mac: BRIDGE_MAC,
            flags: 0,
            bridge_prefix: 16,
        }
    }
}

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

fn show_addr(x: u32) -> String {
    let b = x.to_ne_bytes();
    format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
}

fn show_key(k: &CtKey) -> String {
    format!(
        "proto {} {}:{} -> {}:{}",
        k.proto,
        show_addr(k.saddr),
        u16::from_be(k.sport),
        show_addr(k.daddr),
        u16::from_be(k.dport)
    )
}

fn show_entry(e: &CtEntry) -> String {
    format!(
        "{{nat {}:{} -> {}:{}, kind {}, dir {}, peer [{}], packets {}, bytes {}, tcp_flags {:#04x}, \
         last_seen_ns {}, created_ns {}, tcp_end {:#x}, tcp_ack {:#x}}}",
        show_addr(e.nat_saddr),
        u16::from_be(e.nat_sport),
        show_addr(e.nat_daddr),
        u16::from_be(e.nat_dport),
        e.kind,
        e.dir,
        show_key(&e.peer),
        e.packets,
        e.bytes,
        e.tcp_flags,
        e.last_seen_ns,
        e.created_ns,
        e.tcp_end,
        e.tcp_ack
    )
}

/// Both CT entries of one flow whose original packets `orig` are rewritten to `nat`: the
/// original entry under `orig`, the reply entry under `nat` reversed, rewriting replies back to
/// `orig` reversed. Counters zero until set; seeded in `CT` unless `unassured`.
#[derive(Clone, Copy, Debug)]
struct FlowPair {
    okey: CtKey,
    o: CtEntry,
    rkey: CtKey,
    r: CtEntry,
    table: Table,
}

impl FlowPair {
    fn new(proto: u8, orig: Tuple, nat: Tuple, kind: u8) -> FlowPair {
        let okey = ct_key(proto, orig);
        let rkey = ct_key(proto, tu(nat.dst, nat.dport, nat.src, nat.sport));
        let entry = |peer: CtKey, n: Tuple, dir: u8| CtEntry {
            peer,
            nat_saddr: addr(n.src),
            nat_daddr: addr(n.dst),
            nat_sport: n.sport.to_be(),
            nat_dport: n.dport.to_be(),
            kind,
            dir,
            ..CtEntry::default()
        };
        FlowPair {
            okey,
            o: entry(rkey, nat, DIR_ORIGINAL),
            rkey,
            r: entry(
                okey,
                tu(orig.dst, orig.dport, orig.src, orig.sport),
                DIR_REPLY,
            ),
            table: Table::Assured,
        }
    }

    /// As an earlier packet left it: each direction's (packets, bytes, tcp flags). A TCP
    /// direction that sent its SYN has sent up to [`SEQ`]; one that sent an ACK has
    /// acknowledged up to [`SEQ`]: the fixtures' segments sit exactly where both sides are.
    fn seen(mut self, o: (u64, u64, u8), r: (u64, u64, u8)) -> FlowPair {
        for (e, (packets, bytes, flags)) in [(&mut self.o, o), (&mut self.r, r)] {
            (e.packets, e.bytes, e.tcp_flags) = (packets, bytes, flags);
            e.last_seen_ns = SEEDED_NS;
            e.created_ns = SEEDED_NS;
            if e.tcp_flags & TCP_SYN != 0 {
                e.tcp_end = SEQ;
            }
            if e.tcp_flags & TCP_ACK != 0 {
                e.tcp_ack = SEQ;
            }
        }
        self
    }

    /// Seeded in `CT_NEW`, not assured yet.
    fn unassured(mut self) -> FlowPair {
        self.table = Table::New;
        self
    }

    fn seeds(&self) -> [Seed; 2] {
        [
            Seed::Ct(self.okey, self.o, self.table),
            Seed::Ct(self.rkey, self.r, self.table),
        ]
    }

    /// Just created in `CT_NEW` by its first packet of `bytes` IP bytes with TCP flags `flags`
    /// (TCP: a fixture segment with 20-byte IP and TCP headers).
    fn created(self, bytes: u64, flags: u8) -> Vec<CtExp> {
        self.created_after_options(bytes, 0, flags)
    }

    /// [`FlowPair::created`] by a packet whose IP header carries `options` bytes of options.
    fn created_after_options(mut self, bytes: u64, options: u64, flags: u8) -> Vec<CtExp> {
        (self.o.packets, self.o.bytes) = (1, bytes);
        if self.okey.proto == PROTO_TCP {
            segment(&mut self.o, flags, bytes - options);
        }
        vec![
            CtExp::created(self.okey, self.o),
            CtExp::created(self.rkey, self.r),
        ]
    }

    /// Exactly as seeded.
    fn unchanged(&self) -> Vec<CtExp> {
        vec![
            CtExp::old(self.okey, self.o, self.table),
            CtExp::old(self.rkey, self.r, self.table),
        ]
    }

    /// One more packet of `bytes` IP bytes and TCP flags `flags` on the original direction.
    fn original_touched(mut self, bytes: u64, flags: u8) -> Vec<CtExp> {
        touched(&mut self.o, self.okey.proto, bytes, flags);
        vec![
            CtExp::fresh(self.okey, self.o, self.table),
            CtExp::old(self.rkey, self.r, self.table),
        ]
    }

    /// One more packet on the reply direction.
    fn reply_touched(mut self, bytes: u64, flags: u8) -> Vec<CtExp> {
        touched(&mut self.r, self.okey.proto, bytes, flags);
        vec![
            CtExp::old(self.okey, self.o, self.table),
            CtExp::fresh(self.rkey, self.r, self.table),
        ]
    }
}

/// What one more packet of `bytes` IP bytes and TCP flags `flags` does to a direction's entry.
fn touched(e: &mut CtEntry, proto: u8, bytes: u64, flags: u8) {
    e.packets += 1;
    e.bytes += bytes;
    if proto == PROTO_TCP {
        segment(e, flags, bytes);
    }
}

/// What a fixture TCP segment (20-byte IP and TCP headers, `bytes` in all) with `flags` does to
/// a direction's sequence state, worked out by hand: the segment starts at [`SEQ`]; its end
/// moves `tcp_end` forward; an ACK acknowledges up to [`ACK`]; a new SYN on a finished flow
/// starts it over.
fn segment(e: &mut CtEntry, flags: u8, bytes: u64) {
    let payload = bytes as u32 - 40;
    let syn_only = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn_only && e.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.tcp_flags = 0;
    }
    let end = SEQ + payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
    if e.tcp_flags & TCP_SYN == 0 || end > e.tcp_end {
        e.tcp_end = end;
    }
    if flags & TCP_ACK != 0 && (e.tcp_flags & TCP_ACK == 0 || ACK > e.tcp_ack) {
        e.tcp_ack = ACK;
    }
    e.tcp_flags |= flags;
}

/// One expected CT entry and its table. `fresh`: written during the case, so `last_seen_ns`
/// must be a time inside the case's run (and is not compared); `created`: created during the
/// case, so `created_ns` too; otherwise the entry is compared whole.
#[derive(Clone, Copy, Debug)]
struct CtExp {
    key: CtKey,
    entry: CtEntry,
    table: Table,
    fresh: bool,
    created: bool,
}

impl CtExp {
    fn fresh(key: CtKey, entry: CtEntry, table: Table) -> CtExp {
        CtExp {
            key,
            entry,
            table,
            fresh: true,
            created: false,
        }
    }
    fn old(key: CtKey, entry: CtEntry, table: Table) -> CtExp {
        CtExp {
            key,
            entry,
            table,
            fresh: false,
            created: false,
        }
    }
    /// Created by the case: in `CT_NEW`.
    fn created(key: CtKey, entry: CtEntry) -> CtExp {
        CtExp {
            key,
            entry,
            table: Table::New,
            fresh: true,
            created: true,
        }
    }
    /// In `table` instead.
    fn in_table(mut self, table: Table) -> CtExp {
        self.table = table;
        self
    }
}

// The four published-port and masqueraded flows most cases use.

/// client:51000 -> host:8080/tcp published to A:80.
fn inbound_tcp(host: [u8; 4]) -> FlowPair {
    FlowPair::new(
        PROTO_TCP,
        tu(CLIENT, 51000, host, 8080),
        tu(CLIENT, 51000, TASK_A, 80),
        KIND_INBOUND,
    )
}

/// client:51000 -> host:5353/udp published to A:53.
fn inbound_udp() -> FlowPair {
    FlowPair::new(
        PROTO_UDP,
        tu(CLIENT, 51000, HOST, 5353),
        tu(CLIENT, 51000, TASK_A, 53),
        KIND_INBOUND,
    )
}

/// A:40000 -> remote:9000 masqueraded to host:`nat_port`.
fn masquerade(proto: u8, nat_port: u16) -> FlowPair {
    FlowPair::new(
        proto,
        tu(TASK_A, 40000, REMOTE, 9000),
        tu(HOST, nat_port, REMOTE, 9000),
        KIND_MASQUERADE,
    )
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

struct Step {
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    /// Verify the output's checksums on their own (false for malformed packets).
    well_formed: bool,
}

struct Case {
    desc: &'static str,
    prog: Prog,
    seeds: Vec<Seed>,
    steps: Vec<Step>,
    /// The whole CT map afterwards.
    ct: Vec<CtExp>,
    /// The whole FRAGS map afterwards.
    frags: Vec<(FragKey, FragPorts)>,
    /// The one drop counted (on the test device at tc ingress), if any.
    drop: Option<DropReason>,
    /// The one task delivery counted: (task ifindex, packets, IP bytes) at HOOK_TC_EGRESS.
    egress: Option<(u32, u64, u64)>,
    /// The task MAC learned from the input: TASKS is the seeded one with this change.
    learned: Option<([u8; 4], [u8; 6])>,
}

impl Case {
    fn new(desc: &'static str, prog: Prog, seeds: Vec<Seed>) -> Case {
        Case {
            desc,
            prog,
            seeds,
            steps: Vec::new(),
            ct: Vec::new(),
            frags: Vec::new(),
            drop: None,
            egress: None,
            learned: None,
        }
    }

    /// A well-formed packet in, `verdict`, `output` out.
    fn step(mut self, input: &P, verdict: u32, output: &P) -> Case {
        self.steps.push(Step {
            input: input.frame(),
            verdict,
            output: output.frame(),
            well_formed: true,
        });
        self
    }

    /// A well-formed packet that must come out exactly as it went in.
    fn unchanged(self, input: &P, verdict: u32) -> Case {
        self.step(input, verdict, input)
    }

    /// A malformed packet that must come out unchanged with `verdict`.
    fn hostile(mut self, input: &P, verdict: u32) -> Case {
        let f = input.frame();
        self.steps.push(Step {
            input: f.clone(),
            verdict,
            output: f,
            well_formed: false,
        });
        self
    }

    /// A frame given byte for byte that must come out unchanged with `verdict`.
    fn raw(mut self, frame: Vec<u8>, verdict: u32) -> Case {
        self.steps.push(Step {
            input: frame.clone(),
            verdict,
            output: frame,
            well_formed: false,
        });
        self
    }

    fn ct(mut self, exp: impl IntoIterator<Item = CtExp>) -> Case {
        self.ct.extend(exp);
        self
    }

    fn frag(mut self, key: FragKey, ports: FragPorts) -> Case {
        self.frags.push((key, ports));
        self
    }

    fn drop(mut self, r: DropReason) -> Case {
        self.drop = Some(r);
        self
    }

    fn egress(mut self, ifindex: u32, packets: u64, bytes: u64) -> Case {
        self.egress = Some((ifindex, packets, bytes));
        self
    }

    fn learned(mut self, task: [u8; 4], mac: [u8; 6]) -> Case {
        self.learned = Some((task, mac));
        self
    }
}

/// A TCP segment from task A, to the bridge's MAC.
fn from_a_tcp(sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> P {
    P::tcp(TASK_A, sport, dst, dport, flags).sent_by_task(MAC_A)
}

/// `p` (TCP) with sequence number `seq` instead of [`SEQ`], its checksum made right again.
fn with_seq(mut p: P, seq: u32) -> P {
    let mut t = p.l4.bytes(p.src, p.dst);
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[16..18].copy_from_slice(&[0, 0]);
    let c = checksum(&t, pseudo_header(p.src, p.dst, PROTO_TCP, t.len() as u16));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    p.l4 = L4::Raw {
        proto: PROTO_TCP,
        bytes: t,
    };
    p
}

/// `frame` with VLAN tags (TPID, VID 0) inserted after the MAC addresses.
fn tagged(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for tpid in tpids {
        f.extend(tpid.to_be_bytes());
        f.extend([0, 0]);
    }
    f.extend(&frame[12..]);
    f
}

/// What issue 16 closed: frames that went around the checks, headers the kernel would refuse,
/// resets and FINs off the flow's sequence numbers, and a flow's move to the assured table.
fn guard_cases() -> Vec<Case> {
    let ew_syn = || from_a_tcp(40000, TASK_B, 80, TCP_SYN).addressed_to(MAC_B);
    let to_b_udp = || P::udp(TASK_A, 40001, TASK_B, 53, b"query: a.b.c").sent_by_task(MAC_A);
    let with_ethertype = |frame: Vec<u8>, ethertype: u16| {
        let mut f = frame;
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        f
    };
    let bad_check = |p: &P| {
        let mut f = p.frame();
        f[14 + 10] ^= 0x40;
        f
    };
    // An ARP reply from A claiming its own address, with `sender` as sender hardware address.
    let arp_from_a = |sender: [u8; 6]| {
        let mut f = vec![0xff; 6];
        f.extend(MAC_A);
        f.extend(0x0806u16.to_be_bytes());
        f.extend([0, 1, 8, 0, 6, 4, 0, 2]);
        f.extend(sender);
        f.extend(TASK_A);
        f.extend(MAC_B);
        f.extend(TASK_B);
        f
    };
    let masq = || {
        masquerade(PROTO_TCP, 40000).seen((1, 40, TCP_SYN | TCP_ACK), (1, 40, TCP_SYN | TCP_ACK))
    };
    let back = |flags| P::tcp(REMOTE, 9000, HOST, 40000, flags);
    let ew = || {
        FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40000, TASK_B, 80),
            tu(TASK_A, 40000, TASK_B, 80),
            KIND_EAST_WEST,
        )
        .seen((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK))
        .unassured()
    };
    vec![
        Case::new(
            "two VID-0 tags (802.1ad + 802.1Q) from a task: dropped VLAN_TAGGED",
            Prog::Task,
            task_world(),
        )
        .raw(tagged(&ew_syn().frame(), &[0x88a8, 0x8100]), SHOT)
        .drop(DropReason::VlanTagged),
        Case::new(
            "one 802.1Q tag from a task: dropped VLAN_TAGGED",
            Prog::Task,
            task_world(),
        )
        .raw(tagged(&ew_syn().frame(), &[0x8100]), SHOT)
        .drop(DropReason::VlanTagged),
        Case::new(
            "an EtherType that is not IPv4, ARP or IPv6 from a task: dropped UNKNOWN_ETHERTYPE",
            Prog::Task,
            task_world(),
        )
        .raw(with_ethertype(ew_syn().frame(), 0x88b5), SHOT)
        .drop(DropReason::UnknownEthertype),
        Case::new(
            "unicast IPv4 to B in a broadcast frame: dropped UNICAST_IN_GROUP_MAC",
            Prog::Task,
            task_world(),
        )
        .hostile(&to_b_udp().addressed_to([0xff; 6]), SHOT)
        .drop(DropReason::UnicastInGroupMac),
        Case::new(
            "unicast IPv4 to B in a multicast frame: dropped UNICAST_IN_GROUP_MAC",
            Prog::Task,
            task_world(),
        )
        .hostile(
            &to_b_udp().addressed_to([0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]),
            SHOT,
        )
        .drop(DropReason::UnicastInGroupMac),
        Case::new(
            "UDP to the bridge subnet's broadcast in a broadcast frame, no policy: to the \
             kernel, nothing tracked",
            Prog::Task,
            task_world(),
        )
        .unchanged(
            &P::udp(TASK_A, 40001, [172, 17, 255, 255], 53, b"who is there")
                .sent_by_task(MAC_A)
                .addressed_to([0xff; 6]),
            OK,
        ),
        Case::new(
            "IPv6 from a task without a policy: to the kernel, as before",
            Prog::Task,
            task_world(),
        )
        .raw(ecsnet_tests::raw::ipv6_frame(MAC_B, MAC_A), OK),
        Case::new(
            "ARP for A's own address from A's MAC: passed",
            Prog::Task,
            task_world(),
        )
        .raw(arp_from_a(MAC_A), OK),
        Case::new(
            "ARP for A's own address naming another MAC: dropped SPOOFED_SOURCE",
            Prog::Task,
            task_world(),
        )
        .raw(arp_from_a(MAC_B), SHOT)
        .drop(DropReason::SpoofedSource),
        Case::new(
            "a bad IPv4 header checksum from a task: dropped BAD_IP_CHECKSUM, nothing created",
            Prog::Task,
            task_world(),
        )
        .raw(bad_check(&ew_syn()), SHOT)
        .drop(DropReason::BadIpChecksum),
        Case::new(
            "a SYN with a bad IPv4 header checksum to a published port: dropped \
             BAD_IP_CHECKSUM, nothing created",
            Prog::Uplink,
            uplink_world(),
        )
        .raw(bad_check(&P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN)), SHOT)
        .drop(DropReason::BadIpChecksum),
        Case::new(
            "a RST of a masqueraded flow at the sender's sequence number: into the task, the \
             flow marked reset",
            Prog::Uplink,
            with(uplink_world(), masq().seeds()),
        )
        .step(
            &back(TCP_RST | TCP_ACK),
            REDIRECT,
            &back(TCP_RST | TCP_ACK).dnat(TASK_A, 40000).routed_to(MAC_A),
        )
        .ct(masq().reply_touched(40, TCP_RST | TCP_ACK))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "a RST of a masqueraded flow off its sequence numbers: dropped TCP_OUT_OF_WINDOW, \
             the flow untouched",
            Prog::Uplink,
            with(uplink_world(), masq().seeds()),
        )
        .hostile(&with_seq(back(TCP_RST | TCP_ACK), SEQ + 1000), SHOT)
        .ct(masq().unchanged())
        .drop(DropReason::TcpOutOfWindow),
        Case::new(
            "a FIN of a masqueraded flow beyond what its sender sent: dropped \
             TCP_OUT_OF_WINDOW, the flow untouched",
            Prog::Uplink,
            with(uplink_world(), masq().seeds()),
        )
        .hostile(&with_seq(back(TCP_FIN | TCP_ACK), SEQ + 100_000), SHOT)
        .ct(masq().unchanged())
        .drop(DropReason::TcpOutOfWindow),
        Case::new(
            "tc_task_new_flow with the host's configuration gone: dropped TAIL_CALL_FAILED, \
             never passed unchecked",
            Prog::NewFlowUnconfigured,
            task_world(),
        )
        .hostile(&ew_syn(), SHOT)
        .drop(DropReason::TailCallFailed),
        Case::new(
            "the opener's ACK completes the handshake: both entries move from CT_NEW to CT",
            Prog::Task,
            with(task_world(), ew().seeds()),
        )
        .unchanged(
            &from_a_tcp(40000, TASK_B, 80, TCP_ACK).addressed_to(MAC_B),
            REDIRECT,
        )
        .ct(ew()
            .original_touched(40, TCP_ACK)
            .into_iter()
            .map(|e| e.in_table(Table::Assured)))
        .egress(IFINDEX_B, 1, 40),
    ]
}

fn uplink_cases() -> Vec<Case> {
    let syn = |dst| P::tcp(CLIENT, 51000, dst, 8080, TCP_SYN);
    let dnat_a = |p: P| p.dnat(TASK_A, 80).routed_to(MAC_A);
    let udp_in = P::udp(CLIENT, 51000, HOST, 5353, b"query: a.b.c");
    let synack_back = |port| P::tcp(REMOTE, 9000, HOST, port, TCP_SYN | TCP_ACK);
    vec![
        Case::new(
            "SYN to the uplink address on a published port: DNAT into the task",
            Prog::Uplink,
            uplink_world(),
        )
        .step(&syn(HOST), REDIRECT, &dnat_a(syn(HOST)))
        .ct(inbound_tcp(HOST).created(40, TCP_SYN))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "SYN to the bridge address on a published port: DNAT into the task",
            Prog::Uplink,
            uplink_world(),
        )
        .step(&syn(BRIDGE), REDIRECT, &dnat_a(syn(BRIDGE)))
        .ct(inbound_tcp(BRIDGE).created(40, TCP_SYN))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "SYN to a LOCAL_ADDRS address on a published port: DNAT into the task",
            Prog::Uplink,
            uplink_world(),
        )
        .step(&syn(OTHER_LOCAL), REDIRECT, &dnat_a(syn(OTHER_LOCAL)))
        .ct(inbound_tcp(OTHER_LOCAL).created(40, TCP_SYN))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "UDP to a published UDP port: DNAT into the task, UDP checksum updated",
            Prog::Uplink,
            uplink_world(),
        )
        .step(
            &udp_in,
            REDIRECT,
            &udp_in.clone().dnat(TASK_A, 53).routed_to(MAC_A),
        )
        .ct(inbound_udp().created(40, 0))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "next segment (ACK with data) of a tracked inbound flow follows its CT entry",
            Prog::Uplink,
            with(
                uplink_world(),
                inbound_tcp(HOST)
                    .seen((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK))
                    .seeds(),
            ),
        )
        .step(
            &P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK).data(b"hello"),
            REDIRECT,
            &dnat_a(P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK).data(b"hello")),
        )
        .ct(inbound_tcp(HOST)
            .seen((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK))
            .original_touched(45, TCP_ACK))
        .egress(IFINDEX_A, 1, 45),
        Case::new(
            // Ethernet pads a bare ACK (40 IP bytes) to 60; tc sees the padding in skb->len.
            "bare ACK in a padded 60-byte frame: translated, padding kept, CT counts 40 IP bytes",
            Prog::Uplink,
            with(
                uplink_world(),
                inbound_tcp(HOST)
                    .seen((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK))
                    .seeds(),
            ),
        )
        .step(
            &P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK).padded(),
            REDIRECT,
            &dnat_a(P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK).padded()),
        )
        .ct(inbound_tcp(HOST)
            .seen((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK))
            .original_touched(40, TCP_ACK))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            // The kernel forwards what is passed and decrements the TTL itself.
            "task MAC not known yet: translated (TTL and MACs left to the kernel) and passed",
            Prog::Uplink,
            with(uplink_world(), [Seed::Task(TASK_A, IFINDEX_A, [0; 6])]),
        )
        .step(&syn(HOST), OK, &syn(HOST).dnat(TASK_A, 80))
        .ct(inbound_tcp(HOST).created(40, TCP_SYN)),
        Case::new(
            "TTL 1: passed untouched for the kernel's time-exceeded, nothing created",
            Prog::Uplink,
            uplink_world(),
        )
        .unchanged(&syn(HOST).ttl(1), OK),
        Case::new(
            "ACK without a CT entry (a connection older than ecsnet): passed, nothing created",
            Prog::Uplink,
            uplink_world(),
        )
        .unchanged(&P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK), OK),
        Case::new(
            "SYN+ACK without a CT entry is not a new flow: passed, nothing created",
            Prog::Uplink,
            uplink_world(),
        )
        .unchanged(&P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN | TCP_ACK), OK),
        Case::new(
            "SYN to a port nobody published: passed, nothing created",
            Prog::Uplink,
            uplink_world(),
        )
        .unchanged(&P::tcp(CLIENT, 51000, HOST, 8081, TCP_SYN), OK),
        Case::new(
            "SYN to a published port number on an address that is not the host's: passed",
            Prog::Uplink,
            uplink_world(),
        )
        .unchanged(&syn(NOT_LOCAL), OK),
        Case::new(
            "masquerade reply (SYN+ACK to host:40000): destination back to the task",
            Prog::Uplink,
            with(
                uplink_world(),
                masquerade(PROTO_TCP, 40000)
                    .seen((1, 40, TCP_SYN), (0, 0, 0))
                    .seeds(),
            ),
        )
        .step(
            &synack_back(40000),
            REDIRECT,
            &synack_back(40000).dnat(TASK_A, 40000).routed_to(MAC_A),
        )
        .ct(masquerade(PROTO_TCP, 40000)
            .seen((1, 40, TCP_SYN), (0, 0, 0))
            .reply_touched(40, TCP_SYN | TCP_ACK))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "masquerade reply of a flow whose NAT changed the port (50000 back to 40000)",
            Prog::Uplink,
            with(
                uplink_world(),
                masquerade(PROTO_TCP, 50000)
                    .seen((1, 40, TCP_SYN), (0, 0, 0))
                    .seeds(),
            ),
        )
        .step(
            &synack_back(50000),
            REDIRECT,
            &synack_back(50000).dnat(TASK_A, 40000).routed_to(MAC_A),
        )
        .ct(masquerade(PROTO_TCP, 50000)
            .seen((1, 40, TCP_SYN), (0, 0, 0))
            .reply_touched(40, TCP_SYN | TCP_ACK))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "masquerade reply over UDP: destination back to the task",
            Prog::Uplink,
            with(
                uplink_world(),
                masquerade(PROTO_UDP, 40000)
                    .seen((1, 48, 0), (0, 0, 0))
                    .seeds(),
            ),
        )
        .step(
            &P::udp(REMOTE, 9000, HOST, 40000, b"twenty bytes of data"),
            REDIRECT,
            &P::udp(REMOTE, 9000, HOST, 40000, b"twenty bytes of data")
                .dnat(TASK_A, 40000)
                .routed_to(MAC_A),
        )
        .ct(masquerade(PROTO_UDP, 40000)
            .seen((1, 48, 0), (0, 0, 0))
            .reply_touched(48, 0))
        .egress(IFINDEX_A, 1, 48),
        Case::new(
            "echo reply of a masqueraded ping: destination back to the task",
            Prog::Uplink,
            with(uplink_world(), ping(0x1234).seeds()),
        )
        .step(
            &pong(HOST, 0x1234),
            REDIRECT,
            &pong(TASK_A, 0x1234).routed_to(MAC_A),
        )
        .ct(ping(0x1234).reply_touched(40, 0))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "echo reply of a ping whose NAT changed the identifier (0x9999 back to 0x1234)",
            Prog::Uplink,
            with(uplink_world(), ping(0x9999).seeds()),
        )
        .step(
            &pong(HOST, 0x9999),
            REDIRECT,
            &pong(TASK_A, 0x1234).routed_to(MAC_A),
        )
        .ct(ping(0x9999).reply_touched(40, 0))
        .egress(IFINDEX_A, 1, 40),
    ]
}

/// A:0x1234 pinging the remote, masqueraded to the host with identifier `nat_id`; one request
/// seen, no reply yet.
fn ping(nat_id: u16) -> FlowPair {
    FlowPair::new(
        PROTO_ICMP,
        tu(TASK_A, 0x1234, REMOTE, 0),
        tu(HOST, nat_id, REMOTE, 0),
        KIND_MASQUERADE,
    )
    .seen((1, 40, 0), (0, 0, 0))
}

/// The remote's echo reply to `dst` with identifier `id` (40 IP bytes).
fn pong(dst: [u8; 4], id: u16) -> P {
    let [hi, lo] = id.to_be_bytes();
    P::icmp(REMOTE, dst, 0, 0, [hi, lo, 0, 7], b"ping payload".to_vec())
}

fn icmp_cases() -> Vec<Case> {
    // What the host sent for task A (masqueraded), as the router quotes it.
    let sent_tcp = |sport| {
        P::tcp(HOST, sport, REMOTE, 9000, TCP_ACK)
            .data(b"0123456789")
            .ttl(63)
            .id(0x4321)
    };
    let sent_udp = P::udp(HOST, 40000, REMOTE, 9000, b"twenty bytes of data")
        .ttl(63)
        .id(0x4322);
    const FRAG_NEEDED: (u8, u8, [u8; 4]) = (3, 4, [0, 0, 0x05, 0x78]); // MTU 1400
    const PORT_UNREACH: (u8, u8, [u8; 4]) = (3, 3, [0; 4]);
    const TIME_EXCEEDED: (u8, u8, [u8; 4]) = (11, 0, [0; 4]);
    let err = |src, dst, (typ, code, rest): (u8, u8, [u8; 4]), body| {
        P::icmp(src, dst, typ, code, rest, body)
    };
    let masq_tcp = |port| {
        masquerade(PROTO_TCP, port).seen((3, 150, TCP_SYN | TCP_ACK), (2, 80, TCP_SYN | TCP_ACK))
    };
    let masq_udp = masquerade(PROTO_UDP, 40000).seen((1, 48, 0), (0, 0, 0));
    // The reply an inbound UDP flow sent out (host:5353 -> client), as the client quotes it.
    let inbound_reply = P::udp(HOST, 5353, CLIENT, 51000, b"answer")
        .ttl(63)
        .id(0x4323);
    let udp_flow = inbound_udp().seen((1, 40, 0), (1, 34, 0));
    vec![
        Case::new(
            "frag needed from a router quoting a masqueraded TCP segment (8 bytes): to the task",
            Prog::Uplink,
            with(uplink_world(), masq_tcp(40000).seeds()),
        )
        .step(
            &err(ROUTER, HOST, FRAG_NEEDED, quote(&sent_tcp(40000), 8)),
            REDIRECT,
            &err(
                ROUTER,
                TASK_A,
                FRAG_NEEDED,
                quote(&sent_tcp(40000).snat(TASK_A, 40000), 8),
            )
            .routed_to(MAC_A),
        )
        .ct(masq_tcp(40000).unchanged())
        .egress(IFINDEX_A, 1, 56),
        Case::new(
            "port unreachable from a router quoting a masqueraded UDP datagram: to the task",
            Prog::Uplink,
            with(uplink_world(), masq_udp.seeds()),
        )
        .step(
            &err(ROUTER, HOST, PORT_UNREACH, quote(&sent_udp, 8)),
            REDIRECT,
            &err(
                ROUTER,
                TASK_A,
                PORT_UNREACH,
                quote(&sent_udp.clone().snat(TASK_A, 40000), 8),
            )
            .routed_to(MAC_A),
        )
        .ct(masq_udp.unchanged())
        .egress(IFINDEX_A, 1, 56),
        Case::new(
            "time exceeded from a router (traceroute) quoting a masqueraded UDP datagram",
            Prog::Uplink,
            with(uplink_world(), masq_udp.seeds()),
        )
        .step(
            &err(
                ROUTER,
                HOST,
                TIME_EXCEEDED,
                quote(&sent_udp.clone().ttl(1), 8),
            ),
            REDIRECT,
            &err(
                ROUTER,
                TASK_A,
                TIME_EXCEEDED,
                quote(&sent_udp.clone().ttl(1).snat(TASK_A, 40000), 8),
            )
            .routed_to(MAC_A),
        )
        .ct(masq_udp.unchanged())
        .egress(IFINDEX_A, 1, 56),
        Case::new(
            "frag needed quoting a flow whose NAT changed the port: quoted port 50000 -> 40000",
            Prog::Uplink,
            with(uplink_world(), masq_tcp(50000).seeds()),
        )
        .step(
            &err(ROUTER, HOST, FRAG_NEEDED, quote(&sent_tcp(50000), 8)),
            REDIRECT,
            &err(
                ROUTER,
                TASK_A,
                FRAG_NEEDED,
                quote(&sent_tcp(50000).snat(TASK_A, 40000), 8),
            )
            .routed_to(MAC_A),
        )
        .ct(masq_tcp(50000).unchanged())
        .egress(IFINDEX_A, 1, 56),
        Case::new(
            "frag needed quoting the whole TCP segment (NAT port changed): quoted TCP checksum too",
            Prog::Uplink,
            with(uplink_world(), masq_tcp(50000).seeds()),
        )
        .step(
            &err(ROUTER, HOST, FRAG_NEEDED, quote(&sent_tcp(50000), 30)),
            REDIRECT,
            &err(
                ROUTER,
                TASK_A,
                FRAG_NEEDED,
                quote(&sent_tcp(50000).snat(TASK_A, 40000), 30),
            )
            .routed_to(MAC_A),
        )
        .ct(masq_tcp(50000).unchanged())
        .egress(IFINDEX_A, 1, 78),
        Case::new(
            "port unreachable from a client quoting the reply of an inbound UDP flow: to the task",
            Prog::Uplink,
            with(uplink_world(), udp_flow.seeds()),
        )
        .step(
            &err(CLIENT, HOST, PORT_UNREACH, quote(&inbound_reply, 8)),
            REDIRECT,
            &err(
                CLIENT,
                TASK_A,
                PORT_UNREACH,
                quote(&inbound_reply.clone().snat(TASK_A, 53), 8),
            )
            .routed_to(MAC_A),
        )
        .ct(udp_flow.unchanged())
        .egress(IFINDEX_A, 1, 56),
        Case::new(
            "ICMP error whose quote ends inside the quoted IP header: dropped BAD_ICMP_ERROR",
            Prog::Uplink,
            with(uplink_world(), masq_tcp(40000).seeds()),
        )
        .hostile(
            &err(
                ROUTER,
                HOST,
                FRAG_NEEDED,
                sent_tcp(40000).ip()[..12].to_vec(),
            ),
            SHOT,
        )
        .ct(masq_tcp(40000).unchanged())
        .drop(DropReason::BadIcmpError),
        Case::new(
            "ICMP error quoting a flow that is not in CT: passed unchanged",
            Prog::Uplink,
            uplink_world(),
        )
        .unchanged(
            &err(ROUTER, HOST, FRAG_NEEDED, quote(&sent_tcp(40000), 8)),
            OK,
        ),
    ]
}

/// An east-west SYN from task A, whose MAC is not known yet, with A's `TASKS` entry on
/// `a_ifindex`: the test device (the one-lookup path) or another interface (the long path).
fn east_west_syn(name: &'static str, a_ifindex: u32) -> Case {
    Case::new(
        name,
        Prog::Task,
        with(task_world(), [Seed::Task(TASK_A, a_ifindex, [0; 6])]),
    )
    .unchanged(
        &from_a_tcp(40000, TASK_B, 80, TCP_SYN).addressed_to(MAC_B),
        REDIRECT,
    )
    .ct(FlowPair::new(
        PROTO_TCP,
        tu(TASK_A, 40000, TASK_B, 80),
        tu(TASK_A, 40000, TASK_B, 80),
        KIND_EAST_WEST,
    )
    .created(40, TCP_SYN))
    .egress(IFINDEX_B, 1, 40)
    .learned(TASK_A, MAC_A)
}

fn hostile_cases() -> Vec<Case> {
    let syn = || P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN);
    let mut truncated_tcp = syn();
    truncated_tcp.l4 = L4::Raw {
        proto: PROTO_TCP,
        bytes: syn().l4.bytes(CLIENT, HOST)[..10].to_vec(),
    };
    let mut ihl4 = syn();
    ihl4.ihl_words = Some(4);
    let mut long = syn();
    long.tot_len = Some(200);
    let mut doff3 = syn();
    doff3.l4 = L4::Tcp {
        sport: 51000,
        dport: 8080,
        flags: TCP_SYN,
        doff: 3,
        data: Vec::new(),
    };
    let mut opts = syn();
    opts.opts = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
    let mut zero = P::udp(CLIENT, 51000, HOST, 5353, b"query: a.b.c");
    if let L4::Udp { zero_csum, .. } = &mut zero.l4 {
        *zero_csum = true;
    }

    // One UDP datagram (8 + 24 bytes) in two fragments of 16 bytes: header + 8, then 16.
    let data = b"fragmented payload......";
    let dgram = |src, sport, dst, dport| {
        L4::Udp {
            sport,
            dport,
            data: data.to_vec(),
            zero_csum: false,
        }
        .bytes(src, dst)
    };
    let frag = |dst, bytes: &[u8], off_flags: u16| {
        let mut p = P::new(
            CLIENT,
            dst,
            L4::Raw {
                proto: PROTO_UDP,
                bytes: bytes.to_vec(),
            },
        )
        .id(0x7777);
        p.frag = off_flags;
        p
    };
    let whole = dgram(CLIENT, 51000, HOST, 5353);
    let translated = dgram(CLIENT, 51000, TASK_A, 53);
    let first = frag(HOST, &whole[..16], MF);
    let later = frag(HOST, &whole[16..], 2);
    let first_out = frag(TASK_A, &translated[..16], MF).routed_to(MAC_A);
    let later_out = frag(TASK_A, &whole[16..], 2).routed_to(MAC_A);
    let frag_key = FragKey {
        saddr: addr(CLIENT),
        daddr: addr(HOST),
        id: 0x7777u16.to_be(),
        proto: PROTO_UDP,
        _pad: 0,
    };

    vec![
        Case::new(
            "TCP header cut after 10 bytes (tot_len agrees): dropped TRUNCATED",
            Prog::Uplink,
            uplink_world(),
        )
        .hostile(&truncated_tcp, SHOT)
        .drop(DropReason::Truncated),
        Case::new(
            "IHL 4 (below 5): dropped BAD_IP_HEADER",
            Prog::Uplink,
            uplink_world(),
        )
        .hostile(&ihl4, SHOT)
        .drop(DropReason::BadIpHeader),
        Case::new(
            "TCP data offset 3 (below 5): dropped BAD_TCP_OFFSET",
            Prog::Uplink,
            uplink_world(),
        )
        .hostile(&doff3, SHOT)
        .drop(DropReason::BadTcpOffset),
        Case::new(
            "tot_len 200 on a 40-byte packet: dropped TRUNCATED",
            Prog::Uplink,
            uplink_world(),
        )
        .hostile(&long, SHOT)
        .drop(DropReason::Truncated),
        Case::new(
            "IP options: the TCP header is found after them and translated",
            Prog::Uplink,
            uplink_world(),
        )
        .step(
            &opts,
            REDIRECT,
            &opts.clone().dnat(TASK_A, 80).routed_to(MAC_A),
        )
        .ct(inbound_tcp(HOST).created_after_options(48, 8, TCP_SYN))
        .egress(IFINDEX_A, 1, 48),
        Case::new(
            "UDP without a checksum: DNATed, the checksum stays zero",
            Prog::Uplink,
            uplink_world(),
        )
        .step(
            &zero,
            REDIRECT,
            &zero.clone().dnat(TASK_A, 53).routed_to(MAC_A),
        )
        .ct(inbound_udp().created(40, 0))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "first fragment translated (UDP header and all) and remembered; the later one gets \
             its addresses translated and nothing else",
            Prog::Uplink,
            uplink_world(),
        )
        .step(&first, REDIRECT, &first_out)
        .step(&later, REDIRECT, &later_out)
        .frag(
            frag_key,
            FragPorts {
                sport: 51000u16.to_be(),
                dport: 5353u16.to_be(),
                rejected: 0,
                _pad: [0; 3],
            },
        )
        .ct({
            let mut e = inbound_udp().created(36, 0);
            e[0].entry.packets = 2;
            e[0].entry.bytes = 72;
            e
        })
        .egress(IFINDEX_A, 2, 72),
        Case::new(
            "later fragment without its first, to a task address: dropped FRAGMENT",
            Prog::Uplink,
            uplink_world(),
        )
        .hostile(&frag(TASK_A, &whole[16..], 2), SHOT)
        .drop(DropReason::Fragment),
        Case::new(
            "later fragment without its first, to the host: passed for the kernel to reassemble",
            Prog::Uplink,
            uplink_world(),
        )
        .unchanged(&later, OK),
    ]
}

fn task_cases() -> Vec<Case> {
    let hairpin = |via| {
        FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40000, via, 8443),
            tu(TASK_A, 40000, TASK_B, 443),
            KIND_HAIRPIN,
        )
    };
    let inbound = inbound_tcp(HOST).seen((1, 40, TCP_SYN), (0, 0, 0));
    let ew_udp = P::udp(TASK_A, 40001, TASK_B, 53, b"query: a.b.c")
        .sent_by_task(MAC_A)
        .addressed_to(MAC_B);
    vec![
        Case::new(
            "reply of an inbound flow when the FIB does not route via the uplink: passed \
             untranslated, CT untouched",
            Prog::Task,
            with(task_world(), inbound.seeds()),
        )
        .unchanged(&from_a_tcp(80, CLIENT, 51000, TCP_SYN | TCP_ACK), OK)
        .ct(inbound.unchanged()),
        Case::new(
            "packet from an address that is not the task's own: dropped SPOOFED_SOURCE",
            Prog::Task,
            task_world(),
        )
        .hostile(
            &P::tcp([172, 17, 0, 9], 40000, TASK_B, 80, TCP_SYN).sent_by_task(MAC_A),
            SHOT,
        )
        .drop(DropReason::SpoofedSource),
        // The one-lookup path of tc_task_ingress: task A's own interface is the test device, so
        // its source address alone finds it; what does not fit goes the long way, same outcome.
        east_west_syn(
            "one-lookup path: east-west SYN A -> B delivered into B unchanged, A's MAC learned",
            TEST_IFINDEX,
        ),
        Case::new(
            "one-lookup path: task B's address sent from A's interface: dropped SPOOFED_SOURCE",
            Prog::Task,
            with(task_world(), [Seed::Task(TASK_A, TEST_IFINDEX, MAC_A)]),
        )
        .hostile(
            &P::tcp(TASK_B, 40000, TASK_A, 80, TCP_SYN).sent_by_task(MAC_B),
            SHOT,
        )
        .drop(DropReason::SpoofedSource),
        Case::new(
            "one-lookup path: A's own address from another MAC: dropped SPOOFED_SOURCE",
            Prog::Task,
            with(task_world(), [Seed::Task(TASK_A, TEST_IFINDEX, MAC_A)]),
        )
        .hostile(
            &P::tcp(TASK_A, 40000, TASK_B, 80, TCP_SYN).sent_by_task(MAC_B),
            SHOT,
        )
        .drop(DropReason::SpoofedSource)
        .learned(TASK_A, MAC_A),
        east_west_syn(
            "east-west SYN A -> B: delivered into B unchanged, KIND_EAST_WEST, A's MAC learned",
            IFINDEX_A,
        ),
        Case::new(
            "east-west UDP A -> B: delivered into B unchanged, KIND_EAST_WEST",
            Prog::Task,
            task_world(),
        )
        .unchanged(&ew_udp, REDIRECT)
        .ct(FlowPair::new(
            PROTO_UDP,
            tu(TASK_A, 40001, TASK_B, 53),
            tu(TASK_A, 40001, TASK_B, 53),
            KIND_EAST_WEST,
        )
        .created(40, 0))
        .egress(IFINDEX_B, 1, 40),
        Case::new(
            "east-west ACK without a CT entry: passed, nothing created",
            Prog::Task,
            task_world(),
        )
        .unchanged(
            &from_a_tcp(40000, TASK_B, 80, TCP_ACK).addressed_to(MAC_B),
            OK,
        ),
        Case::new(
            "hairpin A -> host:8443 published to B: DNAT to B, source kept, KIND_HAIRPIN",
            Prog::Task,
            task_world(),
        )
        .step(
            &from_a_tcp(40000, HOST, 8443, TCP_SYN),
            REDIRECT,
            &from_a_tcp(40000, HOST, 8443, TCP_SYN)
                .dnat(TASK_B, 443)
                .routed_to(MAC_B),
        )
        .ct(hairpin(HOST).created(40, TCP_SYN))
        .egress(IFINDEX_B, 1, 40),
        Case::new(
            "hairpin A -> bridge:8443 published to B: DNAT to B, source kept, KIND_HAIRPIN",
            Prog::Task,
            task_world(),
        )
        .step(
            &from_a_tcp(40000, BRIDGE, 8443, TCP_SYN),
            REDIRECT,
            &from_a_tcp(40000, BRIDGE, 8443, TCP_SYN)
                .dnat(TASK_B, 443)
                .routed_to(MAC_B),
        )
        .ct(hairpin(BRIDGE).created(40, TCP_SYN))
        .egress(IFINDEX_B, 1, 40),
        Case::new(
            "self-hairpin A -> host:8080 published to A: source becomes bridge:40000, DNAT to A",
            Prog::Task,
            task_world(),
        )
        .step(
            &from_a_tcp(40000, HOST, 8080, TCP_SYN),
            REDIRECT,
            &from_a_tcp(40000, HOST, 8080, TCP_SYN)
                .snat(BRIDGE, 40000)
                .dnat(TASK_A, 80)
                .routed_to(MAC_A),
        )
        .ct(FlowPair::new(
            PROTO_TCP,
            tu(TASK_A, 40000, HOST, 8080),
            tu(BRIDGE, 40000, TASK_A, 80),
            KIND_HAIRPIN,
        )
        .created(40, TCP_SYN))
        .egress(IFINDEX_A, 1, 40),
        Case::new(
            "task to a host port nobody published: passed, nothing created",
            Prog::Task,
            task_world(),
        )
        .unchanged(&from_a_tcp(40000, HOST, 8081, TCP_SYN), OK),
        Case::new(
            "new outbound flow when the FIB does not route via the uplink: passed \
             untranslated, nothing created",
            Prog::Task,
            task_world(),
        )
        .unchanged(&from_a_tcp(40000, INTERNET, 443, TCP_SYN), OK),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// CLOCK_MONOTONIC_COARSE: the clock the datapath stamps conntrack entries with, which lags
/// CLOCK_MONOTONIC by up to a tick. A run's stamps lie between this before it and `now_ns`
/// after it.
fn coarse_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// One private instance of the datapath with one program loaded and the maps seeded.
struct Fixture {
    ebpf: Ebpf,
    prog: Prog,
}

impl Fixture {
    fn new(prog: Prog, seeds: &[Seed]) -> Fixture {
        let mut ebpf = Ebpf::load(ecsnet::kernel::datapath::DATAPATH)
            .expect("the datapath object loads: does this kernel have BTF and tcx?");
        {
            let mut m: Array<&mut MapData, Config> =
                Array::try_from(ebpf.map_mut("CONFIG").unwrap()).unwrap();
            m.set(0, &prog.config(), 0).unwrap();
        }
        for s in seeds {
            match *s {
                Seed::Task(a, ifindex, mac) => {
                    let mut m: HashMap<&mut MapData, u32, TaskInfo> =
                        HashMap::try_from(ebpf.map_mut("TASKS").unwrap()).unwrap();
                    let v = TaskInfo {
                        ifindex,
                        mac,
                        _pad: [0; 2],
                        policy: 0,
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
                Seed::Iface(ifindex, ipv4, role) => {
                    let mut m: HashMap<&mut MapData, u32, IfaceInfo> =
                        HashMap::try_from(ebpf.map_mut("IFACES").unwrap()).unwrap();
                    let v = IfaceInfo {
                        ipv4: addr(ipv4),
                        role,
                        _pad: [0; 3],
                    };
                    m.insert(&ifindex, &v, 0).unwrap();
                }
                Seed::Ct(k, e, table) => {
                    let mut m: HashMap<&mut MapData, CtKey, CtEntry> =
                        HashMap::try_from(ebpf.map_mut(table.map()).unwrap()).unwrap();
                    m.insert(&k, &e, 0).unwrap();
                }
            }
        }
        let p: &mut SchedClassifier = ebpf.program_mut(prog.name()).unwrap().try_into().unwrap();
        p.load().unwrap();
        // The tail-called program under test is loaded already, and calls nothing.
        if prog != Prog::NewFlowUnconfigured {
            ecsnet::kernel::datapath::load_tail_called(&mut ebpf)
                .expect("the tail-called programs load");
        }
        Fixture { ebpf, prog }
    }

    /// BPF_PROG_TEST_RUN: (verdict, output frame).
    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self
            .ebpf
            .program(self.prog.name())
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; input.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Both connection tables.
    fn ct(&self) -> StdHashMap<CtKey, (Table, CtEntry)> {
        let mut all = StdHashMap::new();
        for table in [Table::Assured, Table::New] {
            let m: HashMap<&MapData, CtKey, CtEntry> =
                HashMap::try_from(self.ebpf.map(table.map()).unwrap()).unwrap();
            for (k, e) in m.iter().map(|r| r.unwrap()) {
                if let Some((other, _)) = all.insert(k, (table, e)) {
                    panic!("{} is in both {other:?} and {table:?}", show_key(&k));
                }
            }
        }
        all
    }

    fn frags(&self) -> StdHashMap<FragKey, FragPorts> {
        let m: HashMap<&MapData, FragKey, FragPorts> =
            HashMap::try_from(self.ebpf.map("FRAGS").unwrap()).unwrap();
        m.iter().map(|r| r.unwrap()).collect()
    }

    fn tasks(&self) -> StdHashMap<u32, TaskInfo> {
        let m: HashMap<&MapData, u32, TaskInfo> =
            HashMap::try_from(self.ebpf.map("TASKS").unwrap()).unwrap();
        m.iter().map(|r| r.unwrap()).collect()
    }

    /// Nonzero drop counters, summed over CPUs.
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

    /// Nonzero STATS counters at HOOK_TC_EGRESS (deliveries into tasks), summed over CPUs.
    fn egress(&self) -> StdHashMap<StatsKey, (u64, u64)> {
        let m: PerCpuHashMap<&MapData, StatsKey, Counters> =
            PerCpuHashMap::try_from(self.ebpf.map("STATS").unwrap()).unwrap();
        m.iter()
            .map(|r| {
                let (k, v) = r.unwrap();
                let sum = v
                    .iter()
                    .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                (k, sum)
            })
            .filter(|(k, s)| k.hook == HOOK_TC_EGRESS && *s != (0, 0))
            .collect()
    }
}

/// Compares both connection tables with `exp` exactly; fresh entries' `last_seen_ns` (and
/// created ones' `created_ns`) must lie in [t0, t1].
fn check_ct(
    got: StdHashMap<CtKey, (Table, CtEntry)>,
    exp: &[CtExp],
    t0: u64,
    t1: u64,
) -> Result<(), String> {
    let mut got = got;
    let mut errs = Vec::new();
    for e in exp {
        let Some((table, mut g)) = got.remove(&e.key) else {
            errs.push(format!("CT entry {} missing", show_key(&e.key)));
            continue;
        };
        if table != e.table {
            errs.push(format!(
                "CT entry {} is in {table:?}, want {:?}",
                show_key(&e.key),
                e.table
            ));
        }
        let mut stamps = vec![];
        if e.fresh {
            stamps.push(("last_seen_ns", g.last_seen_ns));
            g.last_seen_ns = e.entry.last_seen_ns;
        }
        if e.created {
            stamps.push(("created_ns", g.created_ns));
            g.created_ns = e.entry.created_ns;
        }
        for (what, ns) in stamps {
            if !(t0..=t1).contains(&ns) {
                errs.push(format!(
                    "CT entry {}: {what} {ns} not written during the run [{t0}, {t1}]",
                    show_key(&e.key),
                ));
            }
        }
        if g != e.entry {
            errs.push(format!(
                "CT entry {}:\n    got  {}\n    want {}",
                show_key(&e.key),
                show_entry(&g),
                show_entry(&e.entry)
            ));
        }
    }
    for (k, (table, v)) in got {
        errs.push(format!(
            "unexpected CT entry {} in {table:?}: {}",
            show_key(&k),
            show_entry(&v)
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n  "))
    }
}

fn expected_tasks(
    seeds: &[Seed],
    learned: Option<([u8; 4], [u8; 6])>,
) -> StdHashMap<u32, TaskInfo> {
    let mut m = StdHashMap::new();
    for s in seeds {
        if let Seed::Task(a, ifindex, mac) = *s {
            m.insert(
                addr(a),
                TaskInfo {
                    ifindex,
                    mac,
                    _pad: [0; 2],
                    policy: 0,
                },
            );
        }
    }
    if let Some((a, mac)) = learned {
        m.get_mut(&addr(a))
            .expect("learned MAC of a seeded task")
            .mac = mac;
    }
    m
}

/// Runs one case; every mismatch is collected into the error.
fn run_case(c: &Case) -> Result<(), String> {
    let fx = Fixture::new(c.prog, &c.seeds);
    let mut errs = Vec::new();
    let t0 = coarse_ns();
    for (i, s) in c.steps.iter().enumerate() {
        let (verdict, out) = fx.run(&s.input);
        if verdict != s.verdict {
            errs.push(format!(
                "step {i}: verdict {verdict}, expected {}",
                s.verdict
            ));
        }
        if let Err(e) = compare_frames(&out, &s.output) {
            errs.push(format!("step {i}: output frame: {e}"));
        }
        if s.well_formed
            && let Err(e) = verify_checksums(&out)
        {
            errs.push(format!("step {i}: output checksums: {e}"));
        }
    }
    let t1 = now_ns();
    if let Err(e) = check_ct(fx.ct(), &c.ct, t0, t1) {
        errs.push(e);
    }
    let frags = fx.frags();
    let want_frags: StdHashMap<FragKey, FragPorts> = c.frags.iter().copied().collect();
    if frags != want_frags {
        errs.push(format!("FRAGS: got {frags:?}, want {want_frags:?}"));
    }
    let drops = fx.drops();
    let want_drops: StdHashMap<DropKey, u64> = c
        .drop
        .map(|r| {
            (
                DropKey {
                    ifindex: TEST_IFINDEX,
                    reason: r as u8,
                    hook: HOOK_TC_INGRESS,
                    _pad: [0; 2],
                },
                1,
            )
        })
        .into_iter()
        .collect();
    if drops != want_drops {
        errs.push(format!("DROPS: got {drops:?}, want {want_drops:?}"));
    }
    let egress = fx.egress();
    let want_egress: StdHashMap<StatsKey, (u64, u64)> = c
        .egress
        .map(|(ifindex, packets, bytes)| {
            (
                StatsKey {
                    ifindex,
                    hook: HOOK_TC_EGRESS,
                    class: CLASS_IPV4,
                    _pad: [0; 2],
                },
                (packets, bytes),
            )
        })
        .into_iter()
        .collect();
    if egress != want_egress {
        errs.push(format!(
            "STATS at tc egress (deliveries into tasks): got {egress:?}, want {want_egress:?}"
        ));
    }
    let tasks = fx.tasks();
    let want_tasks = expected_tasks(&c.seeds, c.learned);
    if tasks != want_tasks {
        errs.push(format!("TASKS: got {tasks:?}, want {want_tasks:?}"));
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
            let s = std::fs::read_to_string(&p).unwrap();
            s.trim().parse().unwrap()
        })
        .collect()
}

/// Runs every case of a group and fails with all failing cases listed.
fn run_group(group: &str, cases: Vec<Case>) {
    ecsnet_tests::require_root();
    assert!(
        !ifindexes().contains(&NO_SUCH_IFINDEX),
        "an interface has ifindex {NO_SUCH_IFINDEX}, which the task cases use as a missing uplink"
    );
    assert!(!cases.is_empty());
    let mut failed = Vec::new();
    for c in &cases {
        match catch_unwind(AssertUnwindSafe(|| run_case(c))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("[{}] {}:\n  {e}", c.prog.name(), c.desc)),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("[{}] {}: panicked: {msg}", c.prog.name(), c.desc));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{group}: {} of {} cases failed:\n\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n\n")
    );
}

#[test]
fn uplink_ingress_published_ports_and_masquerade_replies() {
    run_group("uplink ingress", uplink_cases());
}

#[test]
fn uplink_ingress_icmp_errors() {
    run_group("ICMP errors", icmp_cases());
}

#[test]
fn frames_around_the_checks_bad_headers_and_out_of_window_closes() {
    run_group("issue 16 guards", guard_cases());
}

#[test]
fn uplink_ingress_hostile_packets() {
    run_group("hostile packets", hostile_cases());
}

#[test]
fn task_ingress_east_west_hairpin_and_replies() {
    run_group("task ingress", task_cases());
}

/// Self-hairpin when the reply tuple with the task's own source port is taken: the datapath
/// picks a free port at random, so the expected frame is built from the port in CT.
#[test]
fn self_hairpin_with_its_source_port_taken_picks_a_free_port() {
    ecsnet_tests::require_root();
    // Another flow already owns A:80 <- bridge:40000.
    let taken = FlowPair::new(
        PROTO_TCP,
        tu(TASK_A, 40000, [10, 10, 0, 9], 8080),
        tu(BRIDGE, 40000, TASK_A, 80),
        KIND_HAIRPIN,
    )
    .seen((1, 40, TCP_SYN), (0, 0, 0));
    let fx = Fixture::new(Prog::Task, &with(task_world(), taken.seeds()));
    let syn = from_a_tcp(40000, HOST, 8080, TCP_SYN);
    let t0 = coarse_ns();
    let (verdict, out) = fx.run(&syn.frame());
    let t1 = now_ns();
    assert_eq!(verdict, REDIRECT, "verdict");

    let orig_key = ct_key(PROTO_TCP, tu(TASK_A, 40000, HOST, 8080));
    let ct = fx.ct();
    let orig = ct
        .get(&orig_key)
        .unwrap_or_else(|| panic!("no CT entry for the new flow; CT: {ct:?}"));
    let port = u16::from_be(orig.1.nat_sport);
    assert!(
        port >= 1024 && port != 40000,
        "chosen port {port}: must be a free port of 1024..=65535"
    );
    let flow = FlowPair::new(
        PROTO_TCP,
        tu(TASK_A, 40000, HOST, 8080),
        tu(BRIDGE, port, TASK_A, 80),
        KIND_HAIRPIN,
    );
    let mut exp = taken.unchanged();
    exp.extend(flow.created(40, TCP_SYN));
    if let Err(e) = check_ct(ct, &exp, t0, t1) {
        panic!("{e}");
    }
    let want = syn.snat(BRIDGE, port).dnat(TASK_A, 80).routed_to(MAC_A);
    if let Err(e) = compare_frames(&out, &want.frame()) {
        panic!("output frame: {e}");
    }
    verify_checksums(&out).unwrap();
}
