//! Programs on the uplink: XDP sees frames before an skb exists, tc ingress and egress see what
//! arrives from and leaves for the rest of the VPC. Today they count and pass.

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_md,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use ecsnet_common::{
    DropReason,
    maps::{HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP},
};

use crate::{
    parse::skb_ifindex,
    stats::{account_tc, account_xdp},
    verdict::{self, Verdict},
};

/// Frames arriving on the uplink, before the stack allocates an skb.
#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    // SAFETY: the context pointer of an XDP program is a valid xdp_md.
    let ifindex = unsafe { (*(ctx.as_ptr() as *const xdp_md)).ingress_ifindex };
    verdict::xdp(try_xdp_uplink(&ctx, ifindex), ifindex, HOOK_XDP)
}

fn try_xdp_uplink(ctx: &XdpContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_xdp(ctx, ifindex, HOOK_XDP);
    Ok(Verdict::Pass)
}

/// Packets arriving on the uplink.
#[classifier]
pub fn tc_uplink_ingress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(try_from_uplink(&ctx, ifindex), ifindex, HOOK_TC_INGRESS)
}

fn try_from_uplink(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_tc(ctx, ifindex, HOOK_TC_INGRESS);
    Ok(Verdict::Pass)
}

/// Packets leaving through the uplink.
#[classifier]
pub fn tc_uplink_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(try_to_uplink(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

fn try_to_uplink(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_tc(ctx, ifindex, HOOK_TC_EGRESS);
    Ok(Verdict::Pass)
}
