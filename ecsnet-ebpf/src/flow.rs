//! Flow accounting and monitor events. Every packet a task sends or receives is added to its
//! flow's counters in the open capture window (`FLOWS`; a full table is counted in `FLOW_LOST`);
//! drops and security-group verdicts become `EVENTS`, as many as each CPU's token bucket allows.
//! With flow logs off `record` returns at once; with the event rate 0 `event` does.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::ring_buf::RingBufEntry};
use ecsnet_common::{
    flow::{Event, EventBudget, FlowKey, FlowStats, LostKey, aws_tcp_flags},
    maps::Counters,
};

use crate::{
    clock,
    maps::{EVENT_BUDGET, EVENTS, FLOW_LOST, FLOW_STATE, FLOWS},
    parse::{ETH_HLEN, ETH_P_IP, Flow, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, Packet, ptr_at},
};

const BPF_NOEXIST: u64 = 1;

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
    /// `f` as it is now, on `ifindex`, untranslated.
    #[inline(always)]
    pub fn of(f: &Flow, ifindex: u32, dir: u8, action: u8) -> Self {
        Sighting {
            ifindex,
            dir,
            action,
            proto: f.proto,
            tcp_flags: f.tcp_flags,
            saddr: f.saddr,
            daddr: f.daddr,
            sport: f.sport,
            dport: f.dport,
            pkt_saddr: f.saddr,
            pkt_daddr: f.daddr,
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
    let ports = s.proto == IPPROTO_TCP || s.proto == IPPROTO_UDP;
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
    let flags = if s.proto == IPPROTO_TCP {
        aws_tcp_flags(s.tcp_flags)
    } else {
        0
    };
    let v = match FLOWS.get_ptr_mut(&key) {
        Some(v) => v,
        None => {
            // Created zeroed and then counted like any other: a copy of the value would cost
            // stack the programs do not have. EEXIST (another CPU was first) is as good.
            let _ = FLOWS.insert(&key, &EMPTY, BPF_NOEXIST);
            match FLOWS.get_ptr_mut(&key) {
                Some(v) => v,
                None => {
                    lost(st.epoch, s.ifindex, packets, bytes);
                    return;
                }
            }
        }
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

/// Counts a packet the flow table had no room for, so the window's records say SKIPDATA.
#[inline(always)]
fn lost(epoch: u32, ifindex: u32, packets: u64, bytes: u64) {
    let key = LostKey { epoch, ifindex };
    for _ in 0..2 {
        if let Some(c) = FLOW_LOST.get_ptr_mut(&key) {
            // SAFETY: this CPU's value.
            unsafe {
                (*c).packets += packets;
                (*c).bytes += bytes;
            }
            return;
        }
        if FLOW_LOST
            .insert(&key, &Counters { packets, bytes }, BPF_NOEXIST)
            .is_ok()
        {
            return;
        }
    }
}

/// Takes one event's worth of credit from this CPU's bucket. None when the bucket is empty (the
/// event is counted as suppressed) or events are off; else the number suppressed before it.
#[inline(always)]
fn take_credit() -> Option<(*mut EventBudget, u64)> {
    let st = FLOW_STATE.get(0)?;
    let cost = st.event_cost_ns;
    if cost == 0 {
        return None;
    }
    let b = EVENT_BUDGET.get_ptr_mut(0)?;
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's value.
    unsafe {
        let mut credit = (*b).credit_ns + now.saturating_sub((*b).last_ns);
        if credit > st.event_burst_ns {
            credit = st.event_burst_ns;
        }
        (*b).last_ns = now;
        if credit < cost {
            (*b).credit_ns = credit;
            (*b).suppressed += 1;
            (*b).suppressed_total += 1;
            return None;
        }
        (*b).credit_ns = credit - cost;
        Some((b, (*b).suppressed))
    }
}

/// Reserves room for one event if the bucket allows, and fills in its time and the count
/// suppressed before it; the caller fills in the rest and submits.
#[inline(always)]
fn reserve(kind: u8, reason: u8, ifindex: u32, hook: u8, dir: u8) -> Option<RingBufEntry<Event>> {
    let (b, suppressed) = take_credit()?;
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        // SAFETY: this CPU's bucket.
        unsafe {
            (*b).suppressed += 1;
            (*b).suppressed_total += 1;
        }
        return None;
    };
    // SAFETY: this CPU's bucket.
    unsafe { (*b).suppressed = 0 };
    let e = entry.as_mut_ptr();
    // SAFETY: the reservation is ours; every field is written here or by the caller, field
    // by field, so no copy of the event takes stack.
    unsafe {
        (*e).ts_ns = bpf_ktime_get_ns();
        (*e).suppressed = suppressed;
        (*e).ifindex = ifindex;
        (*e).saddr = 0;
        (*e).daddr = 0;
        (*e).sport = 0;
        (*e).dport = 0;
        (*e).proto = 0;
        (*e).kind = kind;
        (*e).reason = reason;
        (*e).hook = hook;
        (*e).dir = dir;
        (*e)._pad = [0; 7];
    }
    Some(entry)
}

/// An event about packet `f` (already parsed).
#[inline(always)]
pub fn flow_event(f: &Flow, kind: u8, reason: u8, ifindex: u32, hook: u8, dir: u8) {
    let Some(mut entry) = reserve(kind, reason, ifindex, hook, dir) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: our reservation.
    unsafe {
        (*e).saddr = f.saddr;
        (*e).daddr = f.daddr;
        (*e).sport = f.sport;
        (*e).dport = f.dport;
        (*e).proto = f.proto;
    }
    entry.submit(0);
}

/// An event about the packet in `pkt`, whose addresses and ports are read if they are in the
/// linear data and the headers are sane (a drop may be for a malformed packet).
#[inline(always)]
pub fn packet_event<P: Packet>(pkt: &P, kind: u8, reason: u8, ifindex: u32, hook: u8) {
    let Some(mut entry) = reserve(kind, reason, ifindex, hook, 0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    if let Ok(eth) = ptr_at::<P, [u8; ETH_HLEN]>(pkt, 0) {
        // SAFETY: checked by ptr_at.
        let ethertype = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
        if ethertype == ETH_P_IP
            && let Ok(ip) = ptr_at::<P, Ipv4Hdr>(pkt, ETH_HLEN)
        {
            // SAFETY: checked by ptr_at.
            let (vhl, frag_off, proto) = unsafe {
                (*e).saddr = (*ip).saddr;
                (*e).daddr = (*ip).daddr;
                (*e).proto = (*ip).protocol;
                ((*ip).vhl, u16::from_be((*ip).frag_off), (*ip).protocol)
            };
            let ihl = ((vhl & 0x0f) as usize) * 4;
            let ports = proto == IPPROTO_TCP || proto == IPPROTO_UDP;
            if ihl >= 20
                && frag_off & 0x1fff == 0
                && ports
                && let Ok(p) = ptr_at::<P, [u16; 2]>(pkt, ETH_HLEN + (ihl & 0x3c))
            {
                // SAFETY: checked by ptr_at.
                unsafe {
                    (*e).sport = (*p)[0];
                    (*e).dport = (*p)[1];
                }
            }
        }
    }
    entry.submit(0);
}
