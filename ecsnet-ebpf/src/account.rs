//! Accounting: packets and bytes per interface, hook and class (`STATS`), drops per reason
//! (`DROPS`), and every packet a task sends or receives added to its flow's counters in the open
//! capture window (`FLOWS`; a full table is counted in `FLOW_LOST`). Bytes of IPv4 packets are IP
//! bytes as they cross the wire, so a GSO packet counts as the segments it becomes. With flow
//! logs off `record` returns at once.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_NOEXIST},
    maps::PerCpuHashMap,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use ecsnet_common::{
    flow::{FlowKey, FlowStats, LostKey, aws_tcp_flags},
    maps::{CLASS_IPV4, CLASS_OTHER, Counters, DropKey, StatsKey},
    net::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    clock,
    maps::{DROPS, FLOW_LOST, FLOW_STATE, FLOWS, STATS},
    parse::{ETH_HLEN, Headers, Packet, ipv4_lengths, is_unicast_ipv4},
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
pub struct Sighting {
    pub ifindex: u32,
    /// `FLOW_EGRESS` or `FLOW_INGRESS`.
    pub dir: u8,
    /// `ACTION_*`.
    pub action: u8,
    pub proto: u8,
    /// The TCP flags byte as in the packet.
    pub tcp_flags: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub pkt_saddr: u32,
    pub pkt_daddr: u32,
}

impl Sighting {
    /// `h` as it is now, on `ifindex`, untranslated.
    #[inline(always)]
    pub fn of(h: &Headers, ifindex: u32, dir: u8, action: u8) -> Self {
        Sighting {
            ifindex,
            dir,
            action,
            proto: h.proto,
            tcp_flags: h.tcp_flags,
            saddr: h.saddr,
            daddr: h.daddr,
            sport: h.sport,
            dport: h.dport,
            pkt_saddr: h.saddr,
            pkt_daddr: h.daddr,
        }
    }
}

/// Adds `packets` packets of `bytes` IP bytes to the flow of `s` in the open window.
#[inline(always)]
pub fn record(s: &Sighting, packets: u64, bytes: u64) {
    let Some(st) = FLOW_STATE.get(0) else {
        return;
    };
    if st.enabled == 0 {
        return;
    }
    let ports = s.proto == PROTO_TCP || s.proto == PROTO_UDP;
    let key = FlowKey {
        epoch: st.epoch,
        ifindex: s.ifindex,
        saddr: s.saddr,
        daddr: s.daddr,
        sport: if ports { s.sport } else { 0 },
        dport: if ports { s.dport } else { 0 },
        proto: s.proto,
        dir: s.dir,
        action: s.action,
        _pad: 0,
    };
    let flags = if s.proto == PROTO_TCP {
        aws_tcp_flags(s.tcp_flags)
    } else {
        0
    };
    let Some(v) = value_mut(&FLOWS, &key, &EMPTY) else {
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
    unsafe {
        if (*v).packets == 0 {
            (*v).first_ns = now;
        }
        (*v).packets += packets;
        (*v).bytes += bytes;
        (*v).last_ns = now;
        (*v).tcp_flags |= flags;
        (*v).pkt_saddr = s.pkt_saddr;
        (*v).pkt_daddr = s.pkt_daddr;
    }
}

/// The value a new flow starts from.
static EMPTY: FlowStats = FlowStats {
    packets: 0,
    bytes: 0,
    first_ns: 0,
    last_ns: 0,
    pkt_saddr: 0,
    pkt_daddr: 0,
    tcp_flags: 0,
    _pad: [0; 7],
};
