//! Accounting: packets and bytes per interface, hook and class (`STATS`), drops per reason
//! (`DROPS`), and every packet a task sends or receives added to its flow's counters in the open
//! capture window (`FLOWS`, `FLOWS6` for IPv6; a full table is counted in `FLOW_LOST`). Bytes
//! are IP bytes as they cross the wire, so a GSO packet counts as the segments it becomes. With
//! flow logs off `record` returns at once.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_NOEXIST},
    maps::PerCpuHashMap,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use ecsnet_common::{
    flow::{FlowKey, FlowKey6, FlowStats, FlowStats6, LostKey, aws_tcp_flags},
    maps::{CLASS_IPV4, CLASS_OTHER, Counters, DropKey, StatsKey},
    net::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    clock,
    conntrack::Nat,
    maps::{DROPS, FLOW_LOST, FLOW_STATE, FLOWS, FLOWS6, STATS},
    parse::{
        ETH_HLEN, Headers, Packet, TcpHdrStart, UDP_HLEN, ipv4_lengths, is_unicast_ipv4, load,
        tcp_hlen,
    },
    parse6::{Headers6, IPV6_HLEN, PROTO_ICMPV6},
};

/// The value of `key` in a per-CPU hash map, created from `init` when neither user space nor an
/// earlier packet created it. Created from a static and then counted like any other: a value
/// built on the stack would cost stack the programs do not have. A lost creation race (EEXIST:
/// another CPU was first) is as good; None only when the map is full.
#[inline(always)]
fn value_mut<K, V>(map: &PerCpuHashMap<K, V>, key: &K, init: &'static V) -> Option<*mut V> {
    if let Some(v) = map.get_ptr_mut(key) {
        return Some(v);
    }
    let _ = map.insert(key, init, u64::from(BPF_NOEXIST));
    map.get_ptr_mut(key)
}

/// Packet and byte counters as they start.
static NO_COUNTS: Counters = Counters {
    packets: 0,
    bytes: 0,
};

/// Adds to a per-CPU counter; false only when the map is full.
#[inline(always)]
fn add<K>(map: &PerCpuHashMap<K, Counters>, key: &K, packets: u64, bytes: u64) -> bool {
    let Some(c) = value_mut(map, key, &NO_COUNTS) else {
        return false;
    };
    // SAFETY: a per-CPU value is only touched by this CPU, and BPF programs do not nest on one
    // CPU for the same hook.
    unsafe {
        (*c).packets += packets;
        (*c).bytes += bytes;
    }
    true
}

/// Adds a packet to the `STATS` counters of its interface, hook and class; false only when the
/// map is full.
#[inline(always)]
fn count(ifindex: u32, hook: u8, class: u8, packets: u64, bytes: u64) -> bool {
    let key = StatsKey {
        ifindex,
        hook,
        class,
        _pad: [0; 2],
    };
    add(&STATS, &key, packets, bytes)
}

/// Counts one dropped packet.
#[inline(always)]
pub fn dropped(key: &DropKey) {
    if let Some(c) = value_mut(&DROPS, key, &0) {
        // SAFETY: per-CPU value, see `add`.
        unsafe { *c += 1 };
    }
}

/// Classifies a frame for accounting: (class, packets, bytes).
#[inline(always)]
fn measure<P: Packet>(pkt: &P, frame_len: usize, gso_segs: u32) -> (u8, u64, u64) {
    // Unicast IPv4 only: multicast and broadcast (IGMP reports the bridge floods, ...) are
    // "other", so a task's IPv4 counters are exactly its own conversations.
    if !is_unicast_ipv4(pkt) {
        return (CLASS_OTHER, 1, frame_len as u64);
    }
    let Ok(ip) = ipv4_lengths(pkt) else {
        return (CLASS_OTHER, 1, frame_len as u64);
    };
    if gso_segs <= 1 {
        return (CLASS_IPV4, 1, ip.tot_len as u64);
    }
    // Every segment repeats the IP and transport headers of the first one.
    let segs = u64::from(gso_segs);
    let l3 = frame_len.saturating_sub(ETH_HLEN) as u64;
    let hdrs = (ip.ihl + ip.l4_hlen) as u64;
    (CLASS_IPV4, segs, l3 + (segs - 1) * hdrs)
}

/// Packets and bytes of the skb as on the wire, classified for accounting.
#[inline(always)]
fn measure_tc(ctx: &TcContext) -> (u8, u64, u64) {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer of a TC program is a valid __sk_buff.
    let gso_segs = unsafe { (*skb).gso_segs };
    measure(ctx, ctx.len() as usize, gso_segs)
}

/// Packets and IP bytes of an IPv4 skb as on the wire (a GSO packet counts as its segments).
#[inline(always)]
pub fn wire(ctx: &TcContext) -> (u64, u64) {
    let (_, packets, bytes) = measure_tc(ctx);
    (packets, bytes)
}

/// Counts a packet seen by a TC program on `ifindex` at `hook`; returns its packets and bytes
/// as counted, for the flow record of the same packet.
#[inline(always)]
pub fn tc(ctx: &TcContext, ifindex: u32, hook: u8) -> (u64, u64) {
    let (class, packets, bytes) = measure_tc(ctx);
    if !count(ifindex, hook, class, packets, bytes) {
        warn!(
            ctx,
            "STATS map full: packet on ifindex {} not counted", ifindex
        );
    }
    (packets, bytes)
}

/// Counts a frame seen by an XDP program on `ifindex`.
#[inline(always)]
pub fn xdp(pkt: &XdpContext, ifindex: u32, hook: u8) {
    let len = pkt.end() - pkt.start();
    let (class, packets, bytes) = measure(pkt, len, 1);
    if !count(ifindex, hook, class, packets, bytes) {
        warn!(
            pkt,
            "STATS map full: frame on ifindex {} not counted", ifindex
        );
    }
}

/// A packet as it appears on a task interface, with the addresses it has on the uplink side.
/// `A` is its family's address: [`Sighting`] for IPv4, [`Sighting6`] for IPv6.
pub struct Seen<A> {
    pub ifindex: u32,
    /// `FLOW_EGRESS` or `FLOW_INGRESS`.
    pub dir: u8,
    /// `ACTION_*`.
    pub action: u8,
    pub proto: u8,
    /// The TCP flags byte as in the packet.
    pub tcp_flags: u8,
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub pkt_saddr: A,
    pub pkt_daddr: A,
}

/// An IPv4 packet on a task interface (addresses in network byte order), counted in `FLOWS`.
pub type Sighting = Seen<u32>;
/// An IPv6 packet on a task interface, counted in `FLOWS6`.
pub type Sighting6 = Seen<[u8; 16]>;

/// The fields of a packet's headers that its flow record takes, in either family.
pub trait FlowHeaders<A> {
    /// (protocol, TCP flags byte, source, destination, source port, destination port).
    fn tuple(&self) -> (u8, u8, A, A, u16, u16);
}

impl FlowHeaders<u32> for Headers {
    #[inline(always)]
    fn tuple(&self) -> (u8, u8, u32, u32, u16, u16) {
        let h = self;
        (h.proto, h.tcp_flags, h.saddr, h.daddr, h.sport, h.dport)
    }
}

impl FlowHeaders<[u8; 16]> for Headers6 {
    #[inline(always)]
    fn tuple(&self) -> (u8, u8, [u8; 16], [u8; 16], u16, u16) {
        let h = self;
        (h.proto, h.tcp_flags, h.saddr, h.daddr, h.sport, h.dport)
    }
}

impl<A: Copy> Seen<A> {
    /// `h` as it is now, on `ifindex`, untranslated.
    #[inline(always)]
    pub fn of(h: &impl FlowHeaders<A>, ifindex: u32, dir: u8, action: u8) -> Self {
        let (proto, tcp_flags, saddr, daddr, sport, dport) = h.tuple();
        Seen {
            ifindex,
            dir,
            action,
            proto,
            tcp_flags,
            saddr,
            daddr,
            sport,
            dport,
            pkt_saddr: saddr,
            pkt_daddr: daddr,
        }
    }
}

impl<A: Copy> Seen<A> {
    /// `h` on `ifindex` as translated to `nat`: the addresses and ports the task sees, and the
    /// packet's own addresses as on the uplink side.
    #[inline(always)]
    pub fn translated(
        h: &impl FlowHeaders<A>,
        nat: &Nat<A>,
        ifindex: u32,
        dir: u8,
        action: u8,
    ) -> Self {
        Seen {
            saddr: nat.saddr,
            daddr: nat.daddr,
            sport: nat.sport,
            dport: nat.dport,
            ..Self::of(h, ifindex, dir, action)
        }
    }
}

/// An address family's flow table: its map, and its key and counters made from a [`Seen`].
pub trait Family: Copy + 'static {
    type Key: 'static;
    type Stats: 'static;
    fn table() -> &'static PerCpuHashMap<Self::Key, Self::Stats>;
    /// The value a new flow starts from.
    fn empty() -> &'static Self::Stats;
    fn key(s: &Seen<Self>, epoch: u32, sport: u16, dport: u16) -> Self::Key;
    /// Adds a sighting's packets to the counters of its flow.
    fn add(v: &mut Self::Stats, s: &Seen<Self>, packets: u64, bytes: u64, flags: u8, now: u64);
}

/// [`Family`] for each flow table, whose keys and counters differ only in their addresses.
macro_rules! families {
    ($($addr:ty, $zero:expr => $map:ident, $key:ident, $stats:ident;)+) => {$(
        impl Family for $addr {
            type Key = $key;
            type Stats = $stats;

            #[inline(always)]
            fn table() -> &'static PerCpuHashMap<$key, $stats> {
                &$map
            }

            #[inline(always)]
            fn empty() -> &'static $stats {
                static EMPTY: $stats = $stats {
                    packets: 0,
                    bytes: 0,
                    first_ns: 0,
                    last_ns: 0,
                    pkt_saddr: $zero,
                    pkt_daddr: $zero,
                    tcp_flags: 0,
                    _pad: [0; 7],
                };
                &EMPTY
            }

            #[inline(always)]
            fn key(s: &Seen<Self>, epoch: u32, sport: u16, dport: u16) -> $key {
                $key {
                    epoch,
                    ifindex: s.ifindex,
                    saddr: s.saddr,
                    daddr: s.daddr,
                    sport,
                    dport,
                    proto: s.proto,
                    dir: s.dir,
                    action: s.action,
                    _pad: 0,
                }
            }

            #[inline(always)]
            fn add(v: &mut $stats, s: &Seen<Self>, packets: u64, bytes: u64, flags: u8, now: u64) {
                if v.packets == 0 {
                    v.first_ns = now;
                }
                v.packets += packets;
                v.bytes += bytes;
                v.last_ns = now;
                v.tcp_flags |= flags;
                v.pkt_saddr = s.pkt_saddr;
                v.pkt_daddr = s.pkt_daddr;
            }
        }
    )+};
}

families! {
    u32, 0 => FLOWS, FlowKey, FlowStats;
    [u8; 16], [0; 16] => FLOWS6, FlowKey6, FlowStats6;
}

/// Whether flow logging is on (`FLOW_STATE`): with it off, nothing is read for a record.
#[inline(always)]
pub fn flow_logs_on() -> bool {
    FLOW_STATE.get(0).is_some_and(|st| st.enabled != 0)
}

/// Adds `packets` packets of `bytes` IP bytes to the flow of `s` in the open window, in its
/// family's table.
#[inline(always)]
pub fn record<A: Family>(s: &Seen<A>, packets: u64, bytes: u64) {
    let Some(st) = FLOW_STATE.get(0) else {
        return;
    };
    if st.enabled == 0 {
        return;
    }
    let ports = s.proto == PROTO_TCP || s.proto == PROTO_UDP;
    let (sport, dport) = if ports { (s.sport, s.dport) } else { (0, 0) };
    let key = A::key(s, st.epoch, sport, dport);
    let flags = if s.proto == PROTO_TCP {
        aws_tcp_flags(s.tcp_flags)
    } else {
        0
    };
    let Some(v) = value_mut(A::table(), &key, A::empty()) else {
        // The table is full: counted per interface, so the window's records say SKIPDATA.
        let lost = LostKey {
            epoch: st.epoch,
            ifindex: s.ifindex,
        };
        add(&FLOW_LOST, &lost, packets, bytes);
        return;
    };
    let now = clock::now();
    // SAFETY: this CPU's value; BPF programs do not nest on one CPU for one hook.
    A::add(unsafe { &mut *v }, s, packets, bytes, flags, now);
}

/// Neighbour discovery (`ICMPv6` types 133 to 137: router and neighbour solicitations and
/// advertisements, redirects) is IPv6's ARP, and like ARP it makes no flow record.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;

/// Records the IPv6 packet `h` on task interface `ifindex` in the open window, as it is
/// (`pkt-srcaddr`/`pkt-dstaddr` are its own addresses). Ports are 0 for `ICMPv6` and for later
/// fragments (`headers6` leaves them 0 there).
#[inline(always)]
pub fn record6(ctx: &TcContext, h: &Headers6, ifindex: u32, dir: u8, action: u8) {
    record6_left(ctx, h, (ifindex, dir, action), &h.saddr);
}

/// [`record6`] of a packet that left with source `pkt_saddr` (its `pkt-srcaddr`: the host's
/// address when ecsnet translated it back).
#[inline(always)]
pub fn record6_left(
    ctx: &TcContext,
    h: &Headers6,
    (ifindex, dir, action): (u32, u8, u8),
    pkt_saddr: &[u8; 16],
) {
    if !flow_logs_on() || h.proto == PROTO_ICMPV6 && (ND_FIRST..=ND_LAST).contains(&h.icmp_type) {
        return;
    }
    let mut seen = Sighting6::of(h, ifindex, dir, action);
    seen.pkt_saddr = *pkt_saddr;
    record6_seen(ctx, h, &seen);
}

/// The flow record of IPv6 packet `h` as `seen` describes it (translated: the addresses the
/// task sees, and those on the uplink side).
#[inline(always)]
pub fn record6_seen(ctx: &TcContext, h: &Headers6, seen: &Sighting6) {
    if !flow_logs_on() {
        return;
    }
    clock::stamp();
    let (packets, bytes) = wire6(ctx, h);
    record(seen, packets, bytes);
}

/// Packets and IP bytes of an IPv6 skb as on the wire: the fixed header, the extension headers
/// and the payload, without the Ethernet header or padding; a GSO packet counts as the segments
/// it becomes, each repeating the headers up to and including the transport header.
#[inline(always)]
fn wire6(ctx: &TcContext, h: &Headers6) -> (u64, u64) {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer of a TC program is a valid __sk_buff.
    let gso_segs = unsafe { (*skb).gso_segs };
    let l3 = (ctx.len() as usize).saturating_sub(ETH_HLEN) as u64;
    if gso_segs <= 1 {
        // The stated payload length; 0 (a jumbogram, BIG TCP) leaves the packet's own.
        // `headers6` checked it fits the packet.
        let stated = load::<u16>(ctx, ETH_HLEN + IPV6_PAYLOAD_LEN_AT).map_or(0, u16::from_be);
        return match stated {
            0 => (1, l3),
            n => (1, (IPV6_HLEN + n as usize) as u64),
        };
    }
    let l4_hlen = match h.proto {
        PROTO_TCP => load::<TcpHdrStart>(ctx, h.l4)
            .ok()
            .and_then(|t| tcp_hlen(t.doff_res).ok())
            .unwrap_or(0),
        PROTO_UDP => UDP_HLEN,
        _ => 0,
    };
    let segs = u64::from(gso_segs);
    let hdrs = (h.l4.saturating_sub(ETH_HLEN) + l4_hlen) as u64;
    (segs, l3 + (segs - 1) * hdrs)
}

/// Offset of the payload length in the IPv6 header.
const IPV6_PAYLOAD_LEN_AT: usize = 4;
