//! Programs on the uplink: XDP sees frames before an skb exists and drops new connections to
//! published ports that the task's inbound rules reject (`early_drop`); tc ingress takes
//! replies of tracked flows and new connections to published ports straight into the tasks,
//! and hands IPv6 to `tc_uplink_ipv6` (a tail call: `nat66`); tc egress counts what leaves.

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use ecsnet_common::{
    DropReason,
    maps::{HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP, PROG6_UPLINK},
};

use crate::{
    account, clock, early_drop,
    forward::{self, Origin, PktAddrs},
    maps::PROGS6,
    nat66,
    parse::{headers, is_unicast_ipv4, is_unicast_ipv6, skb_ifindex, xdp_ifindex},
    parse6::{self, headers6},
    verdict::{self, Verdict},
};

/// Frames arriving on the uplink, before the stack allocates an skb.
#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    let ifindex = xdp_ifindex(&ctx);
    verdict::xdp(&ctx, Ok(early(&ctx, ifindex)), ifindex, HOOK_XDP)
}

/// What XDP decides alone; it never fails: anything it cannot judge on its own (malformed,
/// fragments, ...) is left to tc.
fn early(ctx: &XdpContext, ifindex: u32) -> Verdict {
    account::xdp(ctx, ifindex, HOOK_XDP);
    let Some(cfg) = forward::config() else {
        return Verdict::Pass;
    };
    if ifindex != cfg.uplink_ifindex {
        return Verdict::Pass;
    }
    early_drop::check(ctx, &cfg).unwrap_or(Verdict::Pass)
}

/// Packets arriving on the uplink.
#[classifier]
pub fn tc_uplink_ingress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(
        &ctx,
        try_from_uplink(&ctx, ifindex),
        ifindex,
        HOOK_TC_INGRESS,
    )
}

// Inlined: the tail call must be made from a function that returns an integer.
#[inline(always)]
fn try_from_uplink(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account::tc(ctx, ifindex, HOOK_TC_INGRESS);
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    if ifindex != cfg.uplink_ifindex {
        return Ok(Verdict::Pass);
    }
    if is_unicast_ipv6(ctx) {
        // SAFETY: `tc_uplink_ipv6` takes the same context; it does not return on success.
        unsafe { PROGS6.tail_call(ctx, PROG6_UPLINK) };
        // Without it (a datapath half loaded) IPv6 keeps the kernel's path, which the task
        // programs police as before ecsnet translated IPv6.
        return Ok(Verdict::Pass);
    }
    if !is_unicast_ipv4(ctx) {
        return Ok(Verdict::Pass);
    }
    let mut h = headers(ctx)?;
    clock::stamp();
    let mut pkt = PktAddrs::of(&h);
    forward::packet(
        ctx,
        &cfg,
        &mut h,
        Origin::Uplink,
        &mut pkt,
        |h, key, pkt| forward::open_flow(ctx, &cfg, h, key, Origin::Uplink, pkt),
    )
}

/// IPv6 arriving on the uplink to a unicast MAC, tail-called by `tc_uplink_ingress` (which
/// counted it): published ports over IPv6 and the flows they open (`nat66`), with this
/// program's verifier budget to themselves; everything else goes on untouched, and so does
/// what cannot be parsed (the kernel judges it, and the task programs police what it
/// delivers).
#[classifier]
pub fn tc_uplink_ipv6(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(
        &ctx,
        try_uplink_ipv6(&ctx, ifindex),
        ifindex,
        HOOK_TC_INGRESS,
    )
}

fn try_uplink_ipv6(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    if ifindex != cfg.uplink_ifindex {
        return Ok(Verdict::Pass);
    }
    if !parsed6(ctx) {
        return Ok(Verdict::Pass);
    }
    let Some(h) = parse6::handed_over() else {
        return Ok(Verdict::Pass);
    };
    clock::stamp();
    nat66::from_uplink(ctx, &cfg, h)
}

/// Parses the packet into this CPU's headers slot (`parse6::hand_over`), whether it could.
/// A function of its own (a BPF-to-BPF call): the walk's stack frame is not part of the one
/// the new flow's path needs.
#[inline(never)]
fn parsed6(ctx: &TcContext) -> bool {
    match headers6(ctx) {
        Ok(h) => {
            parse6::hand_over(&h);
            true
        }
        Err(_) => false,
    }
}

/// Packets leaving through the uplink (the kernel's and ecsnet's redirects alike).
#[classifier]
pub fn tc_uplink_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    // Another program for the upgrade test: other instructions, the same verdicts (no packet has
    // ifindex 0).
    if cfg!(feature = "upgrade-test-program") && ifindex == 0 {
        return aya_ebpf::bindings::TC_ACT_OK;
    }
    // Counted, never judged.
    account::tc(&ctx, ifindex, HOOK_TC_EGRESS);
    verdict::tc(&ctx, Ok(Verdict::Pass), ifindex, HOOK_TC_EGRESS)
}
