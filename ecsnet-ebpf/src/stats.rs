//! Per-interface accounting: packets and bytes per hook and class, per CPU. Bytes of IPv4 packets
//! are IP bytes as they cross the wire, so a GSO packet counts as the segments it becomes.

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    maps::PerCpuHashMap,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use ecsnet_common::maps::{CLASS_IPV4, CLASS_OTHER, Counters, DropKey, StatsKey};

use crate::{
    maps::{DROPS, STATS},
    parse::{ETH_HLEN, ETH_P_IP, Packet, eth_group_dst, ethertype, ipv4},
};

const BPF_NOEXIST: u64 = 1;

/// Adds to a per-CPU counter, creating it when user space has not. A lost creation race is
/// retried once; false only when the map is full.
#[inline(always)]
fn add<K>(map: &PerCpuHashMap<K, Counters>, key: &K, packets: u64, bytes: u64) -> bool {
    for _ in 0..2 {
        if let Some(c) = map.get_ptr_mut(key) {
            // SAFETY: a per-CPU value is only touched by this CPU, and BPF programs do not nest
            // on one CPU for the same hook.
            unsafe {
                (*c).packets += packets;
                (*c).bytes += bytes;
            }
            return true;
        }
        if map
            .insert(key, &Counters { packets, bytes }, BPF_NOEXIST)
            .is_ok()
        {
            return true;
        }
    }
    false
}

/// Counts one dropped packet.
#[inline(always)]
pub fn count_drop(key: &DropKey) {
    for _ in 0..2 {
        if let Some(c) = DROPS.get_ptr_mut(key) {
            // SAFETY: per-CPU value, see `add`.
            unsafe { *c += 1 };
            return;
        }
        if DROPS.insert(key, &1, BPF_NOEXIST).is_ok() {
            return;
        }
    }
}

/// Classifies a frame for accounting: (class, packets, bytes).
#[inline(always)]
fn measure<P: Packet>(pkt: &P, frame_len: usize, gso_segs: u32) -> (u8, u64, u64) {
    // Unicast IPv4 only: multicast and broadcast (IGMP reports the bridge floods, ...) are
    // "other", so a task's IPv4 counters are exactly its own conversations.
    if !matches!(ethertype(pkt), Ok(ETH_P_IP)) || !matches!(eth_group_dst(pkt), Ok(false)) {
        return (CLASS_OTHER, 1, frame_len as u64);
    }
    let Ok(ip) = ipv4(pkt) else {
        return (CLASS_OTHER, 1, frame_len as u64);
    };
    if gso_segs <= 1 {
        return (CLASS_IPV4, 1, ip.tot_len as u64);
    }
    // Every segment repeats the IP and transport headers of the first one.
    let segs = gso_segs as u64;
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
pub fn account_tc(ctx: &TcContext, ifindex: u32, hook: u8) -> (u64, u64) {
    let (class, packets, bytes) = measure_tc(ctx);
    let key = StatsKey {
        ifindex,
        hook,
        class,
        _pad: [0; 2],
    };
    if !add(&STATS, &key, packets, bytes) {
        warn!(
            ctx,
            "STATS map full: packet on ifindex {} not counted", ifindex
        );
    }
    (packets, bytes)
}

/// Counts a frame seen by an XDP program on `ifindex`.
#[inline(always)]
pub fn account_xdp(pkt: &XdpContext, ifindex: u32, hook: u8) {
    let len = pkt.end() - pkt.start();
    let (class, packets, bytes) = measure(pkt, len, 1);
    let key = StatsKey {
        ifindex,
        hook,
        class,
        _pad: [0; 2],
    };
    if !add(&STATS, &key, packets, bytes) {
        warn!(
            pkt,
            "STATS map full: frame on ifindex {} not counted", ifindex
        );
    }
}
