//! Programs on a task interface (the host end of the task's veth pair). tc ingress sees what the
//! task sends and forwards it itself (to another task, out of the uplink, into a published port);
//! tc egress sees what the kernel's bridge path still delivers to the task and checks it against
//! the task's inbound rules, after the checks of `antispoof`; the IMDS block is here too.
//! Both sides take plain IPv4, ARP and IPv6 only: tagged frames and other ethertypes are dropped.
//! The IPv6 a task sends is checked first by `tc_task_ipv6` (a tail call, with its own verifier
//! budget): it speaks only for itself and is no router; then `tc_task_ipv6_flow` (another) tracks,
//! polices and forwards it, and `tc_task_ipv6_nat` (a third) masquerades the new flows that
//! leave the host, carries hairpin flows and translates the `ICMPv6` errors a task sends about
//! translated flows. IPv6 the kernel delivers to a task is policed in tc egress.

use aya_ebpf::{macros::classifier, programs::TcContext};
use ecsnet_common::{
    DropReason,
    flow::{ACTION_ACCEPT, ACTION_REJECT, FLOW_EGRESS, FLOW_INGRESS},
    maps::{
        CONFIG_BLOCK_IMDS, Config, HOOK_TC_EGRESS, HOOK_TC_INGRESS, PROG_TASK_NEW_FLOW,
        PROG6_TASK_FLOW, PROG6_TASK_FROM, PROG6_TASK_TO, TaskInfo,
    },
    policy::INSTANCE_METADATA_ADDR6,
};

use crate::{
    account::{self, Sighting},
    antispoof, clock, conntrack,
    forward::{self, Origin, PktAddrs},
    forward6,
    maps::{PROGS, PROGS6},
    nat66,
    parse::{Frame, Headers, headers, skb_ifindex, task_frame},
    parse6::{self, Headers6, headers6},
    policy, tasks,
    verdict::{self, Verdict},
};

/// Packets leaving the task.
#[classifier]
pub fn tc_task_ingress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_from_task(&ctx, ifindex), ifindex, HOOK_TC_INGRESS)
}

// Inlined: the tail call must be made from a function that returns an integer.
#[inline(always)]
fn try_from_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let (packets, bytes) = account::tc(ctx, ifindex, HOOK_TC_INGRESS);
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    let (task, mut h) = if let Some(fast) = antispoof::own_ipv4(ctx, ifindex) {
        fast
    } else {
        let Some((own, task)) = tasks::by_iface(ifindex) else {
            return tasks::unknown_iface(&cfg, ifindex);
        };
        let mac = antispoof::check_source_mac(ctx, task)?;
        let group = match task_frame(ctx)? {
            Frame::Arp => return antispoof::check_arp(ctx, own, mac),
            Frame::Ipv6 => {
                // SAFETY: `tc_task_ipv6` takes the same context; it does not return on success.
                unsafe { PROGS6.tail_call(ctx, PROG6_TASK_FROM) };
                return Err(DropReason::TailCallFailed);
            }
            Frame::Ipv4 { group } => group,
        };
        let h = headers(ctx)?;
        if h.saddr != own {
            return Err(DropReason::SpoofedSource);
        }
        if group {
            // SAFETY: as above.
            return group_from_task(&cfg, &h, unsafe { (*task).policy }, ifindex, packets, bytes);
        }
        (task, h)
    };
    clock::stamp();
    if h.daddr == policy::IMDS && cfg.flags & CONFIG_BLOCK_IMDS != 0 {
        account::record(
            &Sighting::of(&h, ifindex, FLOW_EGRESS, ACTION_REJECT),
            packets,
            bytes,
        );
        return Err(DropReason::ImdsBlocked);
    }
    // SAFETY: a TASKS value pointer, valid for this program run.
    let me = unsafe { *task };
    let mut pkt = PktAddrs::of(&h);
    let res = forward::packet(ctx, &cfg, &mut h, Origin::Task(me), &mut pkt, |_, _, _| {
        // SAFETY: `tc_task_new_flow` takes the same context; it does not return on success.
        unsafe { PROGS.tail_call(ctx, PROG_TASK_NEW_FLOW) };
        Err(DropReason::TailCallFailed)
    });
    sent(&h, ifindex, res, &pkt, packets, bytes)
}

/// A packet from a task that opens a flow, tail-called by `tc_task_ingress` after all its
/// checks (well-formed unicast IPv4 from the task on this interface, its own MAC and address,
/// not to the blocked metadata address) and after it counted the packet: the new flow's
/// security groups, translation and sending have this program's verifier budget to themselves.
#[classifier]
pub fn tc_task_new_flow(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_new_flow(&ctx, ifindex), ifindex, HOOK_TC_INGRESS)
}

fn try_new_flow(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    // tc_task_ingress found the host configured; if that ever changed in between, the flow
    // fails closed rather than pass unchecked.
    let Some(cfg) = forward::config() else {
        return Err(DropReason::TailCallFailed);
    };
    let h = headers(ctx)?;
    // Found again as tc_task_ingress found it (by address, or through the interface); anything
    // else cannot come here, but would be dropped.
    let task = match tasks::at(h.saddr, ifindex) {
        Some(task) => task,
        None => match tasks::by_iface(ifindex) {
            Some((own, task)) if own == h.saddr => task,
            _ => return Err(DropReason::SpoofedSource),
        },
    };
    // SAFETY: a TASKS value pointer, valid for this program run.
    let me = unsafe { *task };
    let Some(key) = conntrack::key_of(&h) else {
        return Err(DropReason::TailCallFailed);
    };
    clock::stamp();
    let mut pkt = PktAddrs::of(&h);
    let res = forward::open_flow(ctx, &cfg, &h, &key, Origin::Task(me), &mut pkt);
    let (packets, bytes) = account::wire(ctx);
    sent(&h, ifindex, res, &pkt, packets, bytes)
}

/// The flow record of what a task sent, as it left it (a packet a receiving task's rules drop
/// still left), with the addresses it had on the uplink side; then the decision.
#[inline(always)]
fn sent(
    h: &Headers,
    ifindex: u32,
    res: Result<Verdict, DropReason>,
    pkt: &PktAddrs,
    packets: u64,
    bytes: u64,
) -> Result<Verdict, DropReason> {
    let Some(action) = verdict::action(&res, DropReason::SgEgress) else {
        return res;
    };
    let mut seen = Sighting::of(h, ifindex, FLOW_EGRESS, action);
    seen.pkt_saddr = pkt.saddr;
    seen.pkt_daddr = pkt.daddr;
    account::record(&seen, packets, bytes);
    res
}

/// IPv6 a task sends, tail-called by `tc_task_ingress` once the frame's MAC was checked: the
/// task speaks only for itself and is no router (`antispoof::check_ipv6`), and the metadata
/// block applies. Neighbour discovery and MLD then take the kernel's path, and so does the
/// rest of a task without a policy unless it goes to another task or ecsnet translates IPv6
/// (`nat66::on`: its flows' replies are ecsnet's to send); everything else goes on to
/// `tc_task_ipv6_flow` (a tail call). What this program decides is the task's egress flow
/// record (`FLOWS6`), ACCEPT or REJECT.
#[classifier]
pub fn tc_task_ipv6(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(
        &ctx,
        try_ipv6_from_task(&ctx, ifindex),
        ifindex,
        HOOK_TC_INGRESS,
    )
}

// Inlined: the tail call must be made from a function that returns an integer.
#[inline(always)]
fn try_ipv6_from_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    // Only `tc_task_ingress` comes here, for a task's interface; anything else fails closed.
    let Some((_, task)) = tasks::by_iface(ifindex) else {
        return Err(DropReason::TailCallFailed);
    };
    // SAFETY: a TASKS value pointer, valid for this program run.
    let me = unsafe { *task };
    let h = headers6(ctx)?;
    antispoof::check_ipv6(ctx, &h, ifindex, &me)?;
    // The checks passed: from here on every decision is the task's flow record.
    let block = forward::config().is_some_and(|cfg| cfg.flags & CONFIG_BLOCK_IMDS != 0);
    let res = if block && h.daddr == INSTANCE_METADATA_ADDR6 {
        Err(DropReason::ImdsBlocked)
    } else if forward6::is_plumbing(ctx, &h)
        || me.policy == 0 && tasks::iface_of6(&h.daddr).is_none() && !nat66::on()
    {
        Ok(Verdict::Pass)
    } else {
        parse6::hand_over(&h);
        // SAFETY: `tc_task_ipv6_flow` takes the same context; it does not return on success.
        unsafe { PROGS6.tail_call(ctx, PROG6_TASK_FLOW) };
        return Err(DropReason::TailCallFailed);
    };
    record_ipv6(ctx, &h, ifindex, FLOW_EGRESS, &res);
    res
}

/// IPv6 a task sends that is not plumbing and that its policy or its destination (another
/// task) makes ecsnet's, tail-called by `tc_task_ipv6` after all its checks: tracked, policed
/// and forwarded as `forward6` decides, with this program's verifier budget to itself.
#[classifier]
pub fn tc_task_ipv6_flow(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_ipv6_flow(&ctx, ifindex), ifindex, HOOK_TC_INGRESS)
}

// Inlined: `forward6` may tail-call `tc_task_ipv6_nat`, which only the program's own frame
// may do with a stack this deep.
#[inline(always)]
fn try_ipv6_flow(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let Some((task, h)) = ipv6_handed_over(ifindex) else {
        return Err(DropReason::TailCallFailed);
    };
    // SAFETY: a TASKS value pointer, valid for this program run.
    let me = unsafe { *task };
    let res = forward6::from_task(ctx, h, &me);
    ipv6_sent(ctx, h, ifindex, res)
}

/// IPv6 a task sends that ecsnet translates, where `tc_task_ipv6_flow` has no stack left to do
/// it, tail-called by it: a new flow its egress rules allowed that leaves masqueraded
/// (`nat66::masquerades`, `nat66::masquerade`) or goes to a port published on a host address
/// (`nat66::hairpin`), a packet of such a hairpin flow (`nat66::hairpin_on`), or an `ICMPv6`
/// error about a packet of a translated flow (`nat66::error_out`). This program's verifier
/// budget (and stack) is its own.
#[classifier]
pub fn tc_task_ipv6_nat(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_ipv6_nat(&ctx, ifindex), ifindex, HOOK_TC_INGRESS)
}

fn try_ipv6_nat(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let Some((task, h)) = ipv6_handed_over(ifindex) else {
        return Err(DropReason::TailCallFailed);
    };
    // SAFETY: a TASKS value pointer, valid for this program run.
    let policy = unsafe { (*task).policy };
    let hairpin = nat66::hairpin_entry(h);
    let res = if h.is_icmp_error() {
        nat66::error_out(ctx, h, policy)
    } else if !hairpin.is_null() {
        nat66::hairpin_on(ctx, h, hairpin)
    } else if !conntrack::starts_flow(h) || !nat66::translates(h) {
        // Its flow went (evicted, expired) since `tc_task_ipv6_flow` found it: judged as there.
        forward6::unchecked_egress(h, policy)
    } else if nat66::is_local6(&h.daddr) {
        match nat66::hairpin(ctx, h, policy) {
            Ok(None) => nat66::hairpin_on(ctx, h, nat66::hairpin_entry(h)),
            Err(DropReason::SgIngress) => Ok(nat66::reject_hairpin(ctx, h)),
            other => other.map(|v| v.unwrap_or(Verdict::Pass)),
        }
    } else {
        nat66::masquerade(ctx, h, policy)
    };
    ipv6_sent(ctx, h, ifindex, res)
}

/// The task of interface `ifindex` (its `TASKS` value, valid for this program run) and the
/// headers `tc_task_ipv6` parsed and checked (handed over through the tail calls), for a
/// program that takes over from it; None when anything else called it.
#[inline(always)]
fn ipv6_handed_over(ifindex: u32) -> Option<(*const TaskInfo, &'static mut Headers6)> {
    let (_, task) = tasks::by_iface(ifindex)?;
    let h = parse6::handed_over()?;
    clock::stamp();
    nat66::note_source(&h.saddr);
    Some((task, h))
}

/// The egress flow record of `h` as it left the task, then the decision.
#[inline(always)]
fn ipv6_sent(
    ctx: &TcContext,
    h: &Headers6,
    ifindex: u32,
    res: Result<Verdict, DropReason>,
) -> Result<Verdict, DropReason> {
    if let Some(action) = verdict::action(&res, DropReason::SgEgress) {
        record_sent6(ctx, h, ifindex, action);
    }
    res
}

/// The egress flow record of `h`, with the source it left the host with
/// (`nat66::left_with`). A function of its own (a BPF-to-BPF call): the record's key gets a
/// frame beside the decision's, not under it.
#[inline(never)]
fn record_sent6(ctx: &TcContext, h: &Headers6, ifindex: u32, action: u8) {
    let left = nat66::left_with().unwrap_or(&h.saddr);
    account::record6_left(ctx, h, (ifindex, FLOW_EGRESS, action), left);
}

/// The flow record of IPv6 on a task interface: ACCEPT when it goes on, REJECT when the
/// task's rules or the metadata block drop it.
#[inline(always)]
fn record_ipv6(
    ctx: &TcContext,
    h: &Headers6,
    ifindex: u32,
    dir: u8,
    res: &Result<Verdict, DropReason>,
) {
    let action = match res {
        Ok(_) => ACTION_ACCEPT,
        Err(DropReason::SgIngress | DropReason::ImdsBlocked) => ACTION_REJECT,
        Err(_) => return,
    };
    account::record6(ctx, h, ifindex, dir, action);
}

/// IPv4 a task sent to a broadcast or multicast MAC: only to a broadcast or multicast address,
/// judged by the egress rules alone (nothing to track: replies come from other addresses), and
/// left to the kernel.
#[inline(always)]
fn group_from_task(
    cfg: &Config,
    h: &Headers,
    policy: u32,
    ifindex: u32,
    packets: u64,
    bytes: u64,
) -> Result<Verdict, DropReason> {
    if !forward::is_group_addr(cfg, h.daddr) {
        return Err(DropReason::UnicastInGroupMac);
    }
    clock::stamp();
    let res = forward::unchecked_egress(h, policy);
    let Some(action) = verdict::action(&res, DropReason::SgEgress) else {
        return res;
    };
    account::record(
        &Sighting::of(h, ifindex, FLOW_EGRESS, action),
        packets,
        bytes,
    );
    res
}

/// IPv6 the kernel delivers to a task. Without a policy it goes on, recorded (a frame too
/// malformed for a record too, as without ecsnet; with flow logs off it is not parsed). With
/// one, neighbour discovery and MLD pass, and `tc_task_ipv6_to` (a tail call) decides the rest.
#[inline(always)]
fn ipv6_to_task(ctx: &TcContext, policy: u32, ifindex: u32) -> Result<Verdict, DropReason> {
    let parsed = if policy != 0 || account::flow_logs_on() {
        Some(headers6(ctx))
    } else {
        None
    };
    if policy == 0 {
        if let Some(Ok(h)) = parsed {
            record_ipv6(ctx, &h, ifindex, FLOW_INGRESS, &Ok(Verdict::Pass));
        }
        return Ok(Verdict::Pass);
    }
    let Some(parsed) = parsed else {
        return Err(DropReason::TailCallFailed);
    };
    let h = parsed?;
    if forward6::is_plumbing(ctx, &h) {
        return Ok(Verdict::Pass);
    }
    parse6::hand_over(&h);
    // SAFETY: `tc_task_ipv6_to` takes the same context; it does not return on success.
    unsafe { PROGS6.tail_call(ctx, PROG6_TASK_TO) };
    Err(DropReason::TailCallFailed)
}

/// IPv6 the kernel delivers to a task with a policy, tail-called by `tc_task_egress` once it
/// parsed it and let neighbour discovery and MLD pass: `forward6::deliver` decides, and the
/// task's flow log records it.
#[classifier]
pub fn tc_task_ipv6_to(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_ipv6_to(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

fn try_ipv6_to(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let Some((_, task)) = tasks::by_iface(ifindex) else {
        return Err(DropReason::TailCallFailed);
    };
    // SAFETY: a TASKS value pointer, valid for this program run.
    let policy = unsafe { (*task).policy };
    let Some(h) = parse6::handed_over() else {
        return Err(DropReason::TailCallFailed);
    };
    clock::stamp();
    let res = forward6::deliver(ctx, h, policy);
    record_ipv6(ctx, h, ifindex, FLOW_INGRESS, &res);
    res
}

/// Packets delivered to the task by the kernel (the bridge path).
#[classifier]
pub fn tc_task_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_to_task(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

// Inlined: the tail call must be made from a function that returns an integer.
#[inline(always)]
fn try_to_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let (packets, bytes) = account::tc(ctx, ifindex, HOOK_TC_EGRESS);
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    let frame = task_frame(ctx);
    let ipv4 = matches!(frame, Ok(Frame::Ipv4 { .. }));
    // Parsed whatever the frame; used only when it is IPv4.
    let parsed = headers(ctx);
    // The common case with one lookup: addressed to the task on this interface. Anything else
    // finds the interface's task through `IFACES`.
    let fast = match &parsed {
        Ok(h) if ipv4 => tasks::at(h.daddr, ifindex),
        _ => None,
    };
    let task = match fast.or_else(|| tasks::by_iface(ifindex).map(|(_, task)| task)) {
        // SAFETY: a TASKS value pointer, valid for this program run.
        Some(task) => unsafe { *task },
        None => return tasks::unknown_iface(&cfg, ifindex),
    };
    match frame? {
        Frame::Arp => return Ok(Verdict::Pass),
        Frame::Ipv6 => return ipv6_to_task(ctx, task.policy, ifindex),
        // Whatever the destination MAC: the ingress rules run on every IPv4 packet.
        Frame::Ipv4 { .. } => {}
    }
    if task.policy == 0 {
        // No rules to check: only the flow record, and a packet too malformed for one still
        // goes on, as it would without ecsnet.
        if let Ok(h) = parsed {
            clock::stamp();
            let seen = Sighting::of(&h, ifindex, FLOW_INGRESS, ACTION_ACCEPT);
            account::record(&seen, packets, bytes);
        }
        return Ok(Verdict::Pass);
    }
    let mut h = parsed?;
    clock::stamp();
    let res = if forward::is_group_addr(&cfg, h.daddr) {
        // Broadcast and multicast: the rules alone; nothing to track.
        forward::unchecked_ingress(&h, task.policy)
    } else {
        forward::deliver(ctx, &mut h, task.policy, ifindex)
    };
    let Some(action) = verdict::action(&res, DropReason::SgIngress) else {
        return res;
    };
    account::record(
        &Sighting::of(&h, ifindex, FLOW_INGRESS, action),
        packets,
        bytes,
    );
    res
}
