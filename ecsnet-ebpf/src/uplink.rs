//! Programs on the uplink: XDP sees frames before an skb exists and only counts them today;
//! tc ingress takes replies of tracked flows and new connections to published ports straight into
//! the tasks; tc egress counts what leaves.

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
    forward::{self, Origin},
    parse::{ETH_P_IP, eth_group_dst, ethertype, flow, skb_ifindex},
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
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    if ifindex != cfg.uplink_ifindex
        || !matches!(ethertype(ctx), Ok(ETH_P_IP))
        || !matches!(eth_group_dst(ctx), Ok(false))
    {
        return Ok(Verdict::Pass);
    }
    let mut f = flow(ctx)?;
    forward::packet(ctx, &cfg, &mut f, Origin::Uplink)
}

/// Packets leaving through the uplink (the kernel's and ecsnet's redirects alike).
#[classifier]
pub fn tc_uplink_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(try_to_uplink(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

fn try_to_uplink(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_tc(ctx, ifindex, HOOK_TC_EGRESS);
    Ok(Verdict::Pass)
}
