//! The forwarding decision for IPv6 on a task interface, with IPv4's rules (`forward`):
//! continue a tracked flow (the replies of published ports and masqueraded flows translated by
//! `nat66`, hairpin flows by `tc_task_ipv6_nat`), open a new one (task to task by
//! `bpf_redirect_peer`; out of the host masqueraded, or to a port published on a host address,
//! by `tc_task_ipv6_nat`; anything else on the kernel's path, tracked as `KIND_LOCAL` under a
//! policy), let the `ICMPv6` errors of tracked flows pass with them (translated when their flow
//! is), and judge everything else by the rules alone. Neighbour discovery and MLD are
//! link-scope plumbing, as ARP is: never policed, never redirected.

use aya_ebpf::programs::TcContext;
use ecsnet_common::{
    DropReason,
    ct::{
        CT6_RECEIVER_UNCHECKED, CtKey6, KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND, KIND_LOCAL,
        KIND_MASQUERADE,
    },
    flow::{ACTION_ACCEPT, ACTION_REJECT, FLOW_EGRESS, FLOW_INGRESS},
    maps::{HOOK_TC_EGRESS, HOOK_TC_INGRESS, PROG6_TASK_NAT, TaskInfo},
    net::{PROTO_TCP, PROTO_UDP},
    policy::{DIR_EGRESS, DIR_INGRESS},
};

use crate::{
    account,
    conntrack::{self, Delivered, Fragment},
    events,
    maps::PROGS6,
    nat66,
    parse::{ETH_HLEN, FRAG_NONE, load, skb_ifindex},
    parse6::{
        Headers6, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_HLEN, IPV6_HLEN, Ipv6Hdr,
        PROTO_ICMPV6,
    },
    policy, redirect, tasks,
    verdict::{self, Verdict, drop_on},
};

/// MLD queries, reports and done (RFC 2710), and `MLDv2` reports (RFC 3810).
const MLD_QUERY: u8 = 130;
const MLD_DONE: u8 = 132;
const MLD2_REPORT: u8 = 143;
/// Neighbour discovery (RFC 4861): router and neighbour solicitations and advertisements,
/// redirects.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// The hop limit neighbour discovery must arrive with (RFC 4861 §6.1.1, §7.1.1): it proves the
/// message was not forwarded.
const ND_HOP_LIMIT: u8 = 255;
/// Where the hop limit is in the IPv6 header.
const HOP_LIMIT_AT: usize = 7;

/// Whether `h` is neighbour discovery or MLD: link-scope plumbing that no rule applies to.
/// Neighbour discovery counts only with hop limit 255, as RFC 4861 has a node check.
#[inline(always)]
pub fn is_plumbing(ctx: &TcContext, h: &Headers6) -> bool {
    if h.proto != PROTO_ICMPV6 || h.frag != FRAG_NONE {
        return false;
    }
    match h.icmp_type {
        MLD_QUERY..=MLD_DONE | MLD2_REPORT => true,
        ND_FIRST..=ND_LAST => {
            load::<u8>(ctx, ETH_HLEN + HOP_LIMIT_AT).is_ok_and(|l| l == ND_HOP_LIMIT)
        }
        _ => false,
    }
}

/// Whether `policy` allows `h` in direction `dir` with its other end at `peer`
/// (`policy::allows6`). A function of its own (a BPF-to-BPF call): the verifier walks its
/// probes once per call in a frame of its own, rather than once per path through the caller.
#[inline(never)]
fn allows(policy: u32, dir: u32, peer: &[u8; 16], h: &Headers6) -> bool {
    policy::allows6(policy, dir, peer, h)
}

/// The task with IPv6 address `addr`: its `TASKS` entry, through its interface.
#[inline(always)]
pub fn task6(addr: &[u8; 16]) -> Option<TaskInfo> {
    let ifindex = tasks::iface_of6(addr)?;
    let (_, task) = tasks::by_iface(ifindex)?;
    // SAFETY: a TASKS value pointer, valid for this program run.
    Some(unsafe { *task })
}

/// Decides for an IPv6 packet task `me` sent, after `antispoof::check_ipv6` and the metadata
/// block, neighbour discovery and MLD already passed.
#[inline(always)]
pub fn from_task(ctx: &TcContext, h: &mut Headers6, me: &TaskInfo) -> Result<Verdict, DropReason> {
    let policy = me.policy;
    if h.is_icmp_error() {
        return icmp_error(ctx, h, policy);
    }
    match conntrack::track_fragment(h) {
        Fragment::Known => {}
        Fragment::Rejected => return Err(DropReason::Fragment),
        // A later fragment without its first: nobody checked its ports.
        Fragment::Unknown => {
            let policed = policy != 0 || task6(&h.daddr).is_some_and(|t| t.policy != 0);
            return verdict::pass_or(!policed, DropReason::Fragment);
        }
    }
    // Multicast: its replies come from other addresses, so nothing is tracked, as IPv4's groups.
    if is_multicast(&h.daddr) {
        return unchecked_egress(h, policy);
    }
    let Some(key) = conntrack::key_of(h) else {
        return unchecked_egress(h, policy);
    };
    if let Some(t) = conntrack::lookup(&key) {
        conntrack::check_close(&t, h)?;
        let kind = t.rewrite().kind;
        if kind == KIND_HAIRPIN {
            // Either way between two tasks (or a task and itself), translated by
            // `tc_task_ipv6_nat` (this program's stack has no room for it).
            conntrack::touch(&t, &key, h);
            // SAFETY: as for a masqueraded flow in `open_flow`.
            unsafe { PROGS6.tail_call(ctx, PROG6_TASK_NAT) };
            return Err(DropReason::TailCallFailed);
        }
        if kind == KIND_INBOUND || kind == KIND_MASQUERADE {
            // The reply of a published port's flow, or more of a masqueraded one: to the other
            // end as the host.
            let res = nat66::to_uplink(ctx, h, t.e);
            conntrack::touch(&t, &key, h);
            return res;
        }
        conntrack::touch(&t, &key, h);
        return match task6(&h.daddr) {
            Some(dst) if kind == KIND_EAST_WEST => to_task(ctx, h, &dst),
            _ => Ok(Verdict::Pass),
        };
    }
    if !conntrack::starts_flow(h) {
        return unchecked_egress(h, policy);
    }
    open_flow(ctx, h, &key, policy)
}

/// Opens the flow of `h`, which no entry tracks: the sender's egress rules, then, to another
/// task, the receiver's ingress rules and the redirect into it; anything else the kernel
/// carries. A first fragment the rules reject takes its later fragments with it.
#[inline(always)]
fn open_flow(
    ctx: &TcContext,
    h: &Headers6,
    key: &CtKey6,
    policy: u32,
) -> Result<Verdict, DropReason> {
    if !allows(policy, DIR_EGRESS, &h.daddr, h) {
        conntrack::reject_fragments(h);
        return Err(DropReason::SgEgress);
    }
    events::allowed6(h, policy, skb_ifindex(ctx), HOOK_TC_INGRESS, FLOW_EGRESS);
    if let Some(dst) = task6(&h.daddr) {
        if !allows(dst.policy, DIR_INGRESS, &h.saddr, h) {
            conntrack::reject_fragments(h);
            return Ok(reject_ingress(ctx, h, &dst));
        }
        events::allowed6(h, dst.policy, dst.ifindex, HOOK_TC_INGRESS, FLOW_INGRESS);
        if reachable(ctx, &dst) {
            conntrack::create6(key, KIND_EAST_WEST, h)?;
            return to_task(ctx, h, &dst);
        }
        return kernel_flow(key, h, policy);
    }
    if nat66::translates(h) {
        // SAFETY: `tc_task_ipv6_nat` takes the same context and the headers this program was
        // handed (`h` is that slot); it does not return on success. An older build's datapath
        // has no such program: the kernel carries the flow, and its ip6tables masquerade.
        unsafe { PROGS6.tail_call(ctx, PROG6_TASK_NAT) };
    }
    // Not known as a task's address, yet perhaps one: a task that receives it checks its own
    // ingress rules first (`first_delivery`).
    let res = kernel_flow(key, h, policy);
    if policy != 0 && res.is_ok() {
        mark(key, CT6_RECEIVER_UNCHECKED, true);
    }
    res
}

/// Sets (`on`) or clears `flag` on the entry of `key`, when it is tracked.
#[inline(always)]
fn mark(key: &CtKey6, flag: u8, on: bool) {
    if let Some(t) = conntrack::lookup(key) {
        // SAFETY: a map value pointer, valid for this program run (see `Tracked::e`).
        unsafe {
            if on {
                (*t.e).flags |= flag;
            } else {
                (*t.e).flags &= !flag;
            }
        }
    }
}

/// A tracked packet the kernel delivers to a task whose policy is `policy` (non-zero): a flow
/// another task opened towards an address not known as a task's (`CT6_RECEIVER_UNCHECKED`)
/// is judged by this task's ingress rules on its first packet here; once they allow it, the
/// flow is this task's too.
#[inline(always)]
fn first_delivery(ctx: &TcContext, h: &Headers6, policy: u32) -> Result<Verdict, DropReason> {
    let Some(key) = conntrack::key_of(h) else {
        return Ok(Verdict::Pass);
    };
    let unchecked = conntrack::lookup(&key).is_some_and(|t| {
        // SAFETY: as in `mark`.
        unsafe { (*t.e).flags & CT6_RECEIVER_UNCHECKED != 0 }
    });
    if !unchecked {
        return Ok(Verdict::Pass);
    }
    if !allows(policy, DIR_INGRESS, &h.saddr, h) {
        conntrack::reject_fragments(h);
        return Err(DropReason::SgIngress);
    }
    events::allowed6(h, policy, skb_ifindex(ctx), HOOK_TC_EGRESS, FLOW_INGRESS);
    mark(&key, CT6_RECEIVER_UNCHECKED, false);
    Ok(Verdict::Pass)
}

/// Whether a frame can be redirected into task `dst` as it is: the task's MAC is known and the
/// frame is addressed to it (neighbour discovery put it there). Otherwise the kernel delivers it.
#[inline(always)]
fn reachable(ctx: &TcContext, dst: &TaskInfo) -> bool {
    dst.mac != [0; 6] && load::<[u8; 6]>(ctx, 0).is_ok_and(|mac| mac == dst.mac)
}

/// A new flow, already allowed, that the kernel carries: tracked as `KIND_LOCAL` under a
/// policy, so that its replies pass it on their way back.
#[inline(always)]
pub fn kernel_flow(key: &CtKey6, h: &Headers6, policy: u32) -> Result<Verdict, DropReason> {
    if policy != 0 {
        conntrack::create6(key, KIND_LOCAL, h)?;
    }
    Ok(Verdict::Pass)
}

/// Delivers `h` into task `dst` past the bridge: counted there, on the task interface's egress
/// as if the bridge had sent it, and recorded in its flow log.
#[inline(always)]
fn to_task(ctx: &TcContext, h: &Headers6, dst: &TaskInfo) -> Result<Verdict, DropReason> {
    account::tc(ctx, dst.ifindex, HOOK_TC_EGRESS);
    account::record6(ctx, h, dst.ifindex, FLOW_INGRESS, ACTION_ACCEPT);
    redirect::into_task(dst)
}

/// Task `dst`'s ingress rules reject `h`: the drop is counted on `dst`, and its flow log gets
/// a REJECT record.
#[inline(always)]
fn reject_ingress(ctx: &TcContext, h: &Headers6, dst: &TaskInfo) -> Verdict {
    account::record6(ctx, h, dst.ifindex, FLOW_INGRESS, ACTION_REJECT);
    drop_on(ctx, DropReason::SgIngress, dst.ifindex, HOOK_TC_INGRESS)
}

/// A packet from a task that no tracked flow covers and that opens none: the egress rules alone
/// decide, and the kernel carries it.
#[inline(always)]
pub fn unchecked_egress(h: &Headers6, policy: u32) -> Result<Verdict, DropReason> {
    verdict::pass_or(
        allows(policy, DIR_EGRESS, &h.daddr, h),
        DropReason::SgEgress,
    )
}

/// A packet to a task that no tracked flow covers and that opens none: the ingress rules alone
/// decide.
#[inline(always)]
pub fn unchecked_ingress(h: &Headers6, policy: u32) -> Result<Verdict, DropReason> {
    verdict::pass_or(
        allows(policy, DIR_INGRESS, &h.saddr, h),
        DropReason::SgIngress,
    )
}

/// An `ICMPv6` error from a task: it travels with the flow it quotes when that flow is tracked
/// (into the other task when the flow is task to task; when ecsnet translated the flow, as
/// `nat66::error_out` decides), else the egress rules judge it.
#[inline(always)]
fn icmp_error(ctx: &TcContext, h: &Headers6, policy: u32) -> Result<Verdict, DropReason> {
    let Some(kind) = quoted_flow(ctx, h)? else {
        return unchecked_egress(h, policy);
    };
    if matches!(kind, KIND_INBOUND | KIND_MASQUERADE | KIND_HAIRPIN) {
        // SAFETY: as for a masqueraded flow in `open_flow`. An older build's datapath has no
        // such program: the egress rules alone judge the error, which goes on untranslated.
        unsafe { PROGS6.tail_call(ctx, PROG6_TASK_NAT) };
        return unchecked_egress(h, policy);
    }
    match task6(&h.daddr) {
        Some(dst) if kind == KIND_EAST_WEST && reachable(ctx, &dst) => to_task(ctx, h, &dst),
        _ => Ok(Verdict::Pass),
    }
}

/// The kind of the tracked flow the `ICMPv6` error `h` quotes (in either direction), or None
/// when none is tracked. A quote too short for its addresses and ports is `BadIcmpError`.
#[inline(always)]
pub fn quoted_flow(ctx: &TcContext, h: &Headers6) -> Result<Option<u8>, DropReason> {
    let key = quoted_key(ctx, h)?;
    if let Some(t) = conntrack::lookup(&key) {
        return Ok(Some(t.rewrite().kind));
    }
    Ok(conntrack::lookup(&key.reversed()).map(|t| t.rewrite().kind))
}

/// The key of the packet an `ICMPv6` error quotes, as that packet was sent. Only a quote whose
/// transport header follows the fixed header directly is read; anything else makes a key no
/// flow has (its ports 0).
#[inline(always)]
pub fn quoted_key(ctx: &TcContext, h: &Headers6) -> Result<CtKey6, DropReason> {
    let at = h.l4 + ICMPV6_HLEN;
    let ip: Ipv6Hdr = load(ctx, at).map_err(|_| DropReason::BadIcmpError)?;
    let ports: [u16; 4] = load(ctx, at + IPV6_HLEN).map_err(|_| DropReason::BadIcmpError)?;
    let (sport, dport) = match ip.nexthdr {
        PROTO_TCP | PROTO_UDP => (ports[0], ports[1]),
        // A quoted echo: type, code, checksum, identifier.
        PROTO_ICMPV6 if u16::from_be(ports[0]) >> 8 == u16::from(ICMPV6_ECHO_REQUEST) => {
            (ports[2], 0)
        }
        PROTO_ICMPV6 if u16::from_be(ports[0]) >> 8 == u16::from(ICMPV6_ECHO_REPLY) => {
            (0, ports[2])
        }
        _ => (0, 0),
    };
    Ok(CtKey6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.nexthdr,
        _pad: [0; 3],
    })
}

/// A packet the kernel delivers to a task whose policy is `policy` (non-zero), after the
/// plumbing passed: the `ICMPv6` errors of tracked flows and tracked replies pass, a new flow is
/// judged by the ingress rules and tracked, anything else by the rules alone.
#[inline(always)]
pub fn deliver(ctx: &TcContext, h: &mut Headers6, policy: u32) -> Result<Verdict, DropReason> {
    if h.is_icmp_error() {
        if quoted_flow(ctx, h)?.is_some() {
            return Ok(Verdict::Pass);
        }
        return unchecked_ingress(h, policy);
    }
    let key = match conntrack::delivered(h)? {
        Delivered::Tracked => return first_delivery(ctx, h, policy),
        Delivered::Untracked => return unchecked_ingress(h, policy),
        Delivered::Opens(key) => key,
    };
    if !allows(policy, DIR_INGRESS, &h.saddr, h) {
        conntrack::reject_fragments(h);
        return Err(DropReason::SgIngress);
    }
    events::allowed6(h, policy, skb_ifindex(ctx), HOOK_TC_EGRESS, FLOW_INGRESS);
    kernel_flow(&key, h, policy)
}

/// Whether `addr` is a multicast address (`ff00::/8`).
#[inline(always)]
pub fn is_multicast(addr: &[u8; 16]) -> bool {
    addr[0] == 0xff
}
