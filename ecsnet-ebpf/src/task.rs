//! Programs on a task interface (the host end of the task's veth pair). tc ingress sees what the
//! task sends and forwards it itself (to another task, out of the uplink, into a published port);
//! tc egress sees what the kernel's bridge path still delivers to the task and only counts it.

use aya_ebpf::{macros::classifier, programs::TcContext};
use ecsnet_common::{
    DropReason,
    maps::{HOOK_TC_EGRESS, HOOK_TC_INGRESS, ROLE_TASK},
};

use crate::{
    forward::{self, Origin},
    maps::{IFACES, TASKS},
    parse::{ETH_P_IP, EthHdr, eth_group_dst, ethertype, flow, load, skb_ifindex},
    stats::account_tc,
    verdict::{self, Verdict},
};

/// Packets leaving the task.
#[classifier]
pub fn tc_task_ingress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(try_from_task(&ctx, ifindex), ifindex, HOOK_TC_INGRESS)
}

fn try_from_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_tc(ctx, ifindex, HOOK_TC_INGRESS);
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    // ARP, IPv6, multicast and broadcast take the kernel's path.
    if !matches!(ethertype(ctx), Ok(ETH_P_IP)) || !matches!(eth_group_dst(ctx), Ok(false)) {
        return Ok(Verdict::Pass);
    }
    let mut f = flow(ctx)?;
    let Some(me) = (unsafe { IFACES.get(&ifindex) }) else {
        return Ok(Verdict::Pass);
    };
    // Traffic from an address that is not the task's own stays on the kernel's path.
    if me.role != ROLE_TASK || f.saddr != me.ipv4 {
        return Ok(Verdict::Pass);
    }
    learn_mac(ctx, f.saddr)?;
    forward::packet(ctx, &cfg, &mut f, Origin::Task)
}

/// Records the task's MAC (the source of what it sends) for packets routed to it later.
#[inline(always)]
fn learn_mac(ctx: &TcContext, addr: u32) -> Result<(), DropReason> {
    let Some(t) = TASKS.get_ptr_mut(&addr) else {
        return Ok(());
    };
    let eth: EthHdr = load(ctx, 0)?;
    // SAFETY: a TASKS value; a racing write stores the same six bytes.
    unsafe {
        if (*t).mac != eth.src {
            (*t).mac = eth.src;
        }
    }
    Ok(())
}

/// Packets delivered to the task by the kernel (the bridge path).
#[classifier]
pub fn tc_task_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(try_to_task(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

fn try_to_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_tc(ctx, ifindex, HOOK_TC_EGRESS);
    Ok(Verdict::Pass)
}
