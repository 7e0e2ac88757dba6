//! Programs on a task interface (the host end of the task's veth pair). tc ingress sees what the
//! task sends and forwards it itself (to another task, out of the uplink, into a published port);
//! tc egress sees what the kernel's bridge path still delivers to the task and checks it against
//! the task's inbound rules. Anti-spoofing (address, MAC, ARP) and the IMDS block are here too.

use aya_ebpf::{macros::classifier, programs::TcContext};
use ecsnet_common::{
    DropReason,
    flow::{ACTION_ACCEPT, ACTION_REJECT, FLOW_EGRESS, FLOW_INGRESS},
    maps::{CONFIG_BLOCK_IMDS, HOOK_TC_EGRESS, HOOK_TC_INGRESS, ROLE_TASK, TaskInfo},
};

use crate::{
    clock,
    flow::{self, Sighting},
    forward::{self, Origin, PktAddrs},
    maps::{IFACES, TASKS},
    parse::{
        ETH_HLEN, ETH_P_ARP, ETH_P_IP, EthHdr, Flow, eth_group_dst, ethertype, flow, load,
        skb_ifindex,
    },
    policy,
    stats::account_tc,
    verdict::{self, Verdict},
};

/// Packets leaving the task.
#[classifier]
pub fn tc_task_ingress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_from_task(&ctx, ifindex), ifindex, HOOK_TC_INGRESS)
}

fn try_from_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let (packets, bytes) = account_tc(ctx, ifindex, HOOK_TC_INGRESS);
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    let (task, mut f) = match own_ipv4(ctx, ifindex) {
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
            check_source_mac(ctx, task)?;
            let ethertype = ethertype(ctx)?;
            if ethertype == ETH_P_ARP {
                return check_arp(ctx, me.ipv4);
            }
            // IPv6, multicast and broadcast take the kernel's path.
            if ethertype != ETH_P_IP || !matches!(eth_group_dst(ctx), Ok(false)) {
                return Ok(Verdict::Pass);
            }
            let f = flow(ctx)?;
            if f.saddr != me.ipv4 {
                return Err(DropReason::SpoofedSource);
            }
            (task, f)
        }
    };
    clock::stamp();
    if f.daddr == policy::IMDS && cfg.flags & CONFIG_BLOCK_IMDS != 0 {
        flow::record(
            &Sighting::of(&f, ifindex, FLOW_EGRESS, ACTION_REJECT),
            packets,
            bytes,
        );
        return Err(DropReason::ImdsBlocked);
    }
    // SAFETY: a TASKS value pointer, valid for this program run.
    let me = unsafe { *task };
    let mut pkt = PktAddrs {
        saddr: f.saddr,
        daddr: f.daddr,
    };
    let res = forward::packet(ctx, &cfg, &mut f, Origin::Task(me), &mut pkt);
    // What the task sent, as it left it: a packet a receiving task's rules drop still left.
    let action = match res {
        Ok(_) => ACTION_ACCEPT,
        Err(DropReason::SgEgress) => ACTION_REJECT,
        Err(_) => return res,
    };
    let mut seen = Sighting::of(&f, ifindex, FLOW_EGRESS, action);
    seen.pkt_saddr = pkt.saddr;
    seen.pkt_daddr = pkt.daddr;
    flow::record(&seen, packets, bytes);
    res
}

/// The common case found with one lookup: a well-formed unicast IPv4 packet whose source is the
/// task on this interface, from that task's MAC. None sends the packet the long way, through
/// `IFACES`, which sorts out everything else (ARP, IPv6, spoofing, interfaces not ours) with
/// the same outcome as if this shortcut did not exist.
#[inline(always)]
fn own_ipv4(ctx: &TcContext, ifindex: u32) -> Option<(*mut TaskInfo, Flow)> {
    if !matches!(ethertype(ctx), Ok(ETH_P_IP)) || !matches!(eth_group_dst(ctx), Ok(false)) {
        return None;
    }
    let f = flow(ctx).ok()?;
    let task = TASKS.get_ptr_mut(&f.saddr)?;
    // SAFETY: a TASKS value pointer, valid for this program run.
    if unsafe { (*task).ifindex } != ifindex {
        return None;
    }
    check_source_mac(ctx, task).ok()?;
    Some((task, f))
}

/// The task's MAC is the source of its first frame when user space did not know it; from then
/// on a frame from any other MAC is spoofed.
#[inline(always)]
fn check_source_mac(ctx: &TcContext, task: *mut TaskInfo) -> Result<(), DropReason> {
    let eth: EthHdr = load(ctx, 0)?;
    // SAFETY: a TASKS value; two CPUs learning at once store the same six bytes.
    unsafe {
        if (*task).mac == [0; 6] {
            (*task).mac = eth.src;
        } else if (*task).mac != eth.src {
            return Err(DropReason::SpoofedSource);
        }
    }
    Ok(())
}

/// ARP from a task may only claim the task's own address (or none, a probe): no poisoning the
/// host's or another task's neighbour entry.
#[inline(always)]
fn check_arp(ctx: &TcContext, own: u32) -> Result<Verdict, DropReason> {
    // Sender protocol address: after the 8-byte ARP header and the 6-byte sender MAC.
    let sender: u32 = load(ctx, ETH_HLEN + 14)?;
    if sender == own || sender == 0 {
        Ok(Verdict::Pass)
    } else {
        Err(DropReason::SpoofedSource)
    }
}

/// Packets delivered to the task by the kernel (the bridge path).
#[classifier]
pub fn tc_task_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_to_task(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

fn try_to_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let (packets, bytes) = account_tc(ctx, ifindex, HOOK_TC_EGRESS);
    if forward::config().is_none()
        || !matches!(ethertype(ctx), Ok(ETH_P_IP))
        || !matches!(eth_group_dst(ctx), Ok(false))
    {
        return Ok(Verdict::Pass);
    }
    let parsed = flow(ctx);
    // The common case with one lookup: addressed to the task on this interface. Anything else
    // finds the interface's task through `IFACES`.
    let fast = match &parsed {
        Ok(f) => unsafe { TASKS.get(&f.daddr) }.filter(|t| t.ifindex == ifindex),
        Err(_) => None,
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
    if task.policy == 0 {
        // No rules to check: only the flow record, and a packet too malformed for one still
        // goes on, as it would without ecsnet.
        if let Ok(f) = parsed {
            clock::stamp();
            let seen = Sighting::of(&f, ifindex, FLOW_INGRESS, ACTION_ACCEPT);
            flow::record(&seen, packets, bytes);
        }
        return Ok(Verdict::Pass);
    }
    let mut f = parsed?;
    clock::stamp();
    let res = forward::deliver(ctx, &mut f, task.policy, ifindex);
    let action = match res {
        Ok(_) => ACTION_ACCEPT,
        Err(DropReason::SgIngress) => ACTION_REJECT,
        Err(_) => return res,
    };
    flow::record(
        &Sighting::of(&f, ifindex, FLOW_INGRESS, action),
        packets,
        bytes,
    );
    res
}
