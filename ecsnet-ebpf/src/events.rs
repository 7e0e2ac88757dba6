//! Monitor events: drops and security-group verdicts become `EVENTS`, as many as each CPU's
//! token bucket allows; with the event rate 0 nothing is sent.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::ring_buf::RingBufEntry};
use ecsnet_common::{
    flow::{EVENT_ALLOW, EVENT_DROP, EVENT_IPV6, Event, EventBudget, FLOW_INGRESS},
    maps::{HOOK_TC_INGRESS, PortTarget6, TaskInfo},
    net::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    maps::{EVENT_BUDGET, EVENTS, FLOW_STATE},
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, FRAG_LATER, Headers, IPV4_MIN_HLEN, Ipv4Hdr, Packet,
        ethertype, ipv4_frag, ipv4_hlen, l4_offset, ptr_at,
    },
    parse6::{Headers6, IPV6_HLEN, Ipv6Hdr},
};

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
        (*e).family = 0;
        (*e)._pad = [0; 6];
        (*e).saddr6 = [0; 16];
        (*e).daddr6 = [0; 16];
    }
    Some(entry)
}

/// A security group allowed the new flow of packet `h` (already parsed) on `ifindex`, in the
/// task's direction `dir`.
#[inline(always)]
pub fn allowed(h: &Headers, ifindex: u32, hook: u8, dir: u8) {
    let Some(mut entry) = reserve(EVENT_ALLOW, 0, ifindex, hook, dir) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: our reservation.
    unsafe {
        (*e).saddr = h.saddr;
        (*e).daddr = h.daddr;
        (*e).sport = h.sport;
        (*e).dport = h.dport;
        (*e).proto = h.proto;
    }
    entry.submit(0);
}

/// A security group allowed the new IPv6 flow of packet `h` (already parsed) on `ifindex`, in
/// the task's direction `dir`, when the task has a policy (`policy` non-zero), as [`allowed`]
/// for IPv4. A function of its own (a BPF-to-BPF call): the reservation gets a frame of its
/// own beside the IPv6 programs' full ones, and the policy is tested here, where the verifier
/// does not carry the test on through the caller's paths.
#[inline(never)]
pub fn allowed6(h: &Headers6, policy: u32, ifindex: u32, hook: u8, dir: u8) {
    allow6(h, policy, &h.daddr, h.dport, ifindex, hook, dir);
}

/// Task `dst`'s ingress rules allowed the new IPv6 flow of `h` to a published port, which
/// reaches the task as `target`: the event shows what the rules judged, the real client and
/// the task's address and container port. A function of its own, as [`allowed6`].
#[inline(never)]
pub fn allowed6_inbound(h: &Headers6, dst: &TaskInfo, target: &PortTarget6) {
    allow6(
        h,
        dst.policy,
        &target.addr,
        target.port,
        dst.ifindex,
        HOOK_TC_INGRESS,
        FLOW_INGRESS,
    );
}

/// The allow event of `h` to `daddr`:`dport`, when `policy` is non-zero.
#[inline(always)]
fn allow6(
    h: &Headers6,
    policy: u32,
    daddr: &[u8; 16],
    dport: u16,
    ifindex: u32,
    hook: u8,
    dir: u8,
) {
    if policy == 0 {
        return;
    }
    let Some(mut entry) = reserve(EVENT_ALLOW, 0, ifindex, hook, dir) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: our reservation.
    unsafe {
        (*e).family = EVENT_IPV6;
        (*e).saddr6 = h.saddr;
        (*e).daddr6 = *daddr;
        (*e).sport = h.sport;
        (*e).dport = dport;
        (*e).proto = h.proto;
    }
    entry.submit(0);
}

/// The packet in `pkt` was dropped for `reason` (a `DropReason` number). Its addresses and ports
/// are read if they are in the linear data and the headers are sane (a drop may be for a
/// malformed packet).
#[inline(always)]
pub fn dropped<P: Packet>(pkt: &P, reason: u8, ifindex: u32, hook: u8) {
    let Some(mut entry) = reserve(EVENT_DROP, reason, ifindex, hook, 0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    if let Ok(ETH_P_IP) = ethertype(pkt)
        && let Ok(ip) = ptr_at::<P, Ipv4Hdr>(pkt, ETH_HLEN)
    {
        // SAFETY: checked by ptr_at.
        let (vhl, frag_off, proto) = unsafe {
            (*e).saddr = (*ip).saddr;
            (*e).daddr = (*ip).daddr;
            (*e).proto = (*ip).protocol;
            ((*ip).vhl, u16::from_be((*ip).frag_off), (*ip).protocol)
        };
        // What can be read is reported: the header length is checked, the version is not.
        let ihl = ipv4_hlen(vhl);
        let ports = proto == PROTO_TCP || proto == PROTO_UDP;
        if ihl >= IPV4_MIN_HLEN
            && ipv4_frag(frag_off) != FRAG_LATER
            && ports
            && let Ok(p) = ptr_at::<P, [u16; 2]>(pkt, l4_offset(ETH_HLEN, ihl))
        {
            // SAFETY: checked by ptr_at.
            unsafe {
                (*e).sport = (*p)[0];
                (*e).dport = (*p)[1];
            }
        }
    } else if let Ok(ETH_P_IPV6) = ethertype(pkt)
        && let Ok(ip) = ptr_at::<P, Ipv6Hdr>(pkt, ETH_HLEN)
    {
        // The fixed header, and the ports when TCP or UDP follows it directly: no walk here.
        // SAFETY: checked by ptr_at.
        let next = unsafe {
            (*e).family = EVENT_IPV6;
            (*e).saddr6 = (*ip).saddr;
            (*e).daddr6 = (*ip).daddr;
            (*e).proto = (*ip).nexthdr;
            (*ip).nexthdr
        };
        if (next == PROTO_TCP || next == PROTO_UDP)
            && let Ok(p) = ptr_at::<P, [u16; 2]>(pkt, ETH_HLEN + IPV6_HLEN)
        {
            // SAFETY: checked by ptr_at.
            unsafe {
                (*e).sport = (*p)[0];
                (*e).dport = (*p)[1];
            }
        }
    }
    entry.submit(0);
}
