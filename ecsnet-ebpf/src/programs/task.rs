//! Programs on a task interface (the host end of the task's veth pair). tc ingress sees what the
//! task sends and forwards it itself (to another task, out of the uplink, into a published port);
//! tc egress sees what the kernel's bridge path still delivers to the task and checks it against
//! the task's inbound rules. Anti-spoofing (address, MAC, ARP) and the IMDS block are here too.
//! Both sides take plain IPv4, ARP and IPv6 only: tagged frames and other EtherTypes are dropped,
//! and IPv6 of a task under a policy too, until IPv6 rules exist.

use aya_ebpf::{macros::classifier, programs::TcContext};
use ecsnet_common::{
    DropReason,
    flow::{ACTION_ACCEPT, ACTION_REJECT, FLOW_EGRESS, FLOW_INGRESS},
    maps::{
        CONFIG_BLOCK_IMDS, Config, HOOK_TC_EGRESS, HOOK_TC_INGRESS, PROG_TASK_NEW_FLOW, ROLE_TASK,
        TaskInfo,
    },
};

use crate::{
    account::{self, Sighting},
    clock, conntrack,
    forward::{self, Origin, PktAddrs},
    maps::{IFACES, PROGS, TASKS},
    parse::{ETH_HLEN, EthHdr, Frame, Headers, headers, load, skb_ifindex, task_frame},
    policy,
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
    let (task, mut h) = match own_ipv4(ctx, ifindex) {
        Some(fast) => fast,
        None => {
            let Some(me) = (unsafe { IFACES.get(&ifindex) }) else {
                return Ok(Verdict::Pass);
            };
            if me.role != ROLE_TASK {
                return Ok(Verdict::Pass);
            }
            let Some(task) = TASKS.get_ptr_mut(&me.ipv4) else {
                return Ok(Verdict::Pass);
            };
            let mac = check_source_mac(ctx, task)?;
            let group = match task_frame(ctx)? {
                Frame::Arp => return check_arp(ctx, me.ipv4, mac),
                // SAFETY: a TASKS value pointer, valid for this program run.
                Frame::Ipv6 => return ipv6(unsafe { (*task).policy }),
                Frame::Ipv4 { group } => group,
            };
            let h = headers(ctx)?;
            if h.saddr != me.ipv4 {
                return Err(DropReason::SpoofedSource);
            }
            if group {
                // SAFETY: as above.
                return group_from_task(
                    &cfg,
                    &h,
                    unsafe { (*task).policy },
                    ifindex,
                    packets,
                    bytes,
                );
            }
            (task, h)
        }
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
    let mut pkt = PktAddrs {
        saddr: h.saddr,
        daddr: h.daddr,
    };
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
    let mut h = headers(ctx)?;
    // Found again as tc_task_ingress found it (by address, or through the interface); anything
    // else cannot come here, but would be dropped.
    let me = match unsafe { TASKS.get(&h.saddr) } {
        Some(t) if t.ifindex == ifindex => *t,
        _ => match unsafe { IFACES.get(&ifindex) } {
            Some(i) if i.role == ROLE_TASK && i.ipv4 == h.saddr => {
                match unsafe { TASKS.get(&i.ipv4) } {
                    Some(t) => *t,
                    None => return Err(DropReason::SpoofedSource),
                }
            }
            _ => return Err(DropReason::SpoofedSource),
        },
    };
    let Some(key) = conntrack::key_of(&h) else {
        return Err(DropReason::TailCallFailed);
    };
    clock::stamp();
    let mut pkt = PktAddrs {
        saddr: h.saddr,
        daddr: h.daddr,
    };
    let res = forward::open_flow(ctx, &cfg, &mut h, &key, Origin::Task(me), &mut pkt);
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
    let action = match res {
        Ok(_) => ACTION_ACCEPT,
        Err(DropReason::SgEgress) => ACTION_REJECT,
        Err(_) => return res,
    };
    let mut seen = Sighting::of(h, ifindex, FLOW_EGRESS, action);
    seen.pkt_saddr = pkt.saddr;
    seen.pkt_daddr = pkt.daddr;
    account::record(&seen, packets, bytes);
    res
}

/// IPv6 on a task interface: today's kernel path for a task without a policy; for a task with
/// one, nothing, until there are IPv6 rules to check it against.
#[inline(always)]
fn ipv6(policy: u32) -> Result<Verdict, DropReason> {
    if policy == 0 {
        Ok(Verdict::Pass)
    } else {
        Err(DropReason::Ipv6Policed)
    }
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
    let action = if res.is_ok() {
        ACTION_ACCEPT
    } else {
        ACTION_REJECT
    };
    account::record(
        &Sighting::of(h, ifindex, FLOW_EGRESS, action),
        packets,
        bytes,
    );
    res
}

/// The common case found with one lookup: a well-formed unicast IPv4 packet, untagged, whose
/// source is the task on this interface, from that task's MAC. None sends the packet the long
/// way, through `IFACES`, which sorts out everything else (ARP, IPv6, tags, spoofing,
/// interfaces not ours) with the same outcome as if this shortcut did not exist.
#[inline(always)]
fn own_ipv4(ctx: &TcContext, ifindex: u32) -> Option<(*mut TaskInfo, Headers)> {
    if !matches!(task_frame(ctx), Ok(Frame::Ipv4 { group: false })) {
        return None;
    }
    let h = headers(ctx).ok()?;
    let task = TASKS.get_ptr_mut(&h.saddr)?;
    // SAFETY: a TASKS value pointer, valid for this program run.
    if unsafe { (*task).ifindex } != ifindex {
        return None;
    }
    check_source_mac(ctx, task).ok()?;
    Some((task, h))
}

/// The task's MAC is the source of its first frame when user space did not know it; from then
/// on a frame from any other MAC is spoofed. Returns the task's MAC.
#[inline(always)]
fn check_source_mac(ctx: &TcContext, task: *mut TaskInfo) -> Result<[u8; 6], DropReason> {
    let eth: EthHdr = load(ctx, 0)?;
    // SAFETY: a TASKS value; two CPUs learning at once store the same six bytes.
    unsafe {
        if (*task).mac == [0; 6] {
            (*task).mac = eth.src;
        } else if (*task).mac != eth.src {
            return Err(DropReason::SpoofedSource);
        }
    }
    Ok(eth.src)
}

/// ARP from a task may only speak for the task: its own MAC as the sender hardware address,
/// and its own address (or none, a probe) as the sender protocol address. No poisoning the
/// host's or another task's neighbour entry.
#[inline(always)]
fn check_arp(ctx: &TcContext, own: u32, mac: [u8; 6]) -> Result<Verdict, DropReason> {
    // After the 8-byte ARP header (Ethernet/IPv4 sizes): sender MAC, then sender address.
    let sender: ArpSender = load(ctx, ETH_HLEN + 8)?;
    if sender.mac == mac && (sender.addr == own || sender.addr == 0) {
        Ok(Verdict::Pass)
    } else {
        Err(DropReason::SpoofedSource)
    }
}

/// The sender fields of an Ethernet/IPv4 ARP packet.
#[repr(C, packed)]
struct ArpSender {
    mac: [u8; 6],
    addr: u32,
}

/// Packets delivered to the task by the kernel (the bridge path).
#[classifier]
pub fn tc_task_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_to_task(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

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
        Ok(h) if ipv4 => unsafe { TASKS.get(&h.daddr) }.filter(|t| t.ifindex == ifindex),
        _ => None,
    };
    let task = match fast {
        Some(t) => t,
        None => {
            let Some(me) = (unsafe { IFACES.get(&ifindex) }) else {
                return Ok(Verdict::Pass);
            };
            if me.role != ROLE_TASK {
                return Ok(Verdict::Pass);
            }
            let Some(task) = (unsafe { TASKS.get(&me.ipv4) }) else {
                return Ok(Verdict::Pass);
            };
            task
        }
    };
    match frame? {
        Frame::Arp => return Ok(Verdict::Pass),
        Frame::Ipv6 => return ipv6(task.policy),
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
    let action = match res {
        Ok(_) => ACTION_ACCEPT,
        Err(DropReason::SgIngress) => ACTION_REJECT,
        Err(_) => return res,
    };
    account::record(
        &Sighting::of(&h, ifindex, FLOW_INGRESS, action),
        packets,
        bytes,
    );
    res
}
