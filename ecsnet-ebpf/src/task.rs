//! Programs on a task interface (the host end of the task's veth pair). tc ingress sees what the
//! task sends; tc egress sees what is delivered to it. Today they count and pass.

use aya_ebpf::{macros::classifier, programs::TcContext};
use ecsnet_common::{
    DropReason,
    maps::{HOOK_TC_EGRESS, HOOK_TC_INGRESS},
};

use crate::{
    parse::skb_ifindex,
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
    Ok(Verdict::Pass)
}

/// Packets delivered to the task.
#[classifier]
pub fn tc_task_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(try_to_task(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

fn try_to_task(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_tc(ctx, ifindex, HOOK_TC_EGRESS);
    Ok(Verdict::Pass)
}
