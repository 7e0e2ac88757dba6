//! Programs on the uplink: XDP sees frames before an skb exists and drops new connections to
//! published ports that the task's inbound rules reject;
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
    ct::{CtKey, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    flow::{ACTION_REJECT, FLOW_INGRESS},
    maps::{Config, HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP},
};

use crate::{
    clock, conntrack,
    flow::{self, Sighting},
    forward::{self, Origin, PktAddrs},
    parse::{
        ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, TcpHdrStart, eth_group_dst,
        ethertype, fixed_header_checksum_ok, flow, ptr_at, skb_ifindex,
    },
    policy, redirect,
    stats::{account_tc, account_xdp},
    verdict::{self, Verdict, drop_on},
};

/// Frames arriving on the uplink, before the stack allocates an skb.
#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    // SAFETY: the context pointer of an XDP program is a valid xdp_md.
    let ifindex = unsafe { (*(ctx.as_ptr() as *const xdp_md)).ingress_ifindex };
    verdict::xdp(&ctx, try_xdp_uplink(&ctx, ifindex), ifindex, HOOK_XDP)
}

fn try_xdp_uplink(ctx: &XdpContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_xdp(ctx, ifindex, HOOK_XDP);
    let Some(cfg) = forward::config() else {
        return Ok(Verdict::Pass);
    };
    if ifindex != cfg.uplink_ifindex {
        return Ok(Verdict::Pass);
    }
    // Anything XDP cannot judge on its own (malformed, fragments, ...) is left to tc.
    Ok(early_policy(ctx, &cfg).unwrap_or(Verdict::Pass))
}

/// Drops, before an skb exists, a packet opening a flow to a published port that the task's
/// inbound rules reject: exactly what tc ingress would drop for the same reason a moment later.
#[inline(always)]
fn early_policy(ctx: &XdpContext, cfg: &Config) -> Option<Verdict> {
    if ethertype(ctx).ok()? != ETH_P_IP || eth_group_dst(ctx).ok()? {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok()?;
    // SAFETY: `ptr_at` checked the header is within the frame.
    let (vhl, tot_len, frag_off, proto, saddr, daddr) = unsafe {
        (
            (*ip).vhl,
            u16::from_be((*ip).tot_len),
            (*ip).frag_off,
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let ihl = ((vhl & 0x0f) as usize) * 4;
    // Fragments (MF set or an offset) are tc's: it tracks them. So are headers with options
    // and bad checksums: tc reads the options and drops the latter with their reason.
    if vhl >> 4 != 4 || ihl != 20 || u16::from_be(frag_off) & 0x3fff != 0 {
        return None;
    }
    if !fixed_header_checksum_ok(ctx, ETH_HLEN).ok()? {
        return None;
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let l4: *const TcpHdrStart = if proto == IPPROTO_TCP {
        ptr_at(ctx, ETH_HLEN + (ihl & 0x3c)).ok()?
    } else {
        // A UDP header is 8 bytes: read the ports only.
        let p: *const [u16; 2] = ptr_at(ctx, ETH_HLEN + (ihl & 0x3c)).ok()?;
        p as *const TcpHdrStart
    };
    // SAFETY: the ports are the first four bytes of either header, checked above.
    let (sport, dport) = unsafe { ((*l4).source, (*l4).dest) };
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        // SAFETY: a whole TCP header start was checked for TCP.
        tcp_flags = unsafe { (*l4).flags };
        if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
            return None;
        }
    }
    if !forward::is_local(cfg, daddr) {
        return None;
    }
    let (addr, port) = forward::published_port(dport, proto)?;
    let dst = redirect::task(addr)?;
    if dst.policy == 0 {
        return None;
    }
    let key = CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    };
    if conntrack::lookup(&key).is_some() {
        return None;
    }
    if policy::allows_port(
        dst.policy,
        policy::DIR_INGRESS,
        saddr,
        proto,
        u16::from_be(port),
    ) {
        return None;
    }
    // The task's flow log gets the REJECT record tc would have written.
    let seen = Sighting {
        ifindex: dst.ifindex,
        dir: FLOW_INGRESS,
        action: ACTION_REJECT,
        proto,
        tcp_flags,
        saddr,
        daddr: addr,
        sport,
        dport: port,
        pkt_saddr: saddr,
        pkt_daddr: daddr,
    };
    clock::stamp();
    flow::record(&seen, 1, tot_len as u64);
    Some(drop_on(ctx, DropReason::SgIngress, dst.ifindex, HOOK_XDP))
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
    clock::stamp();
    let mut pkt = PktAddrs {
        saddr: f.saddr,
        daddr: f.daddr,
    };
    forward::packet(
        ctx,
        &cfg,
        &mut f,
        Origin::Uplink,
        &mut pkt,
        |f, key, pkt| forward::open_flow(ctx, &cfg, f, key, Origin::Uplink, pkt),
    )
}

/// Packets leaving through the uplink (the kernel's and ecsnet's redirects alike).
#[classifier]
pub fn tc_uplink_egress(ctx: TcContext) -> i32 {
    let ifindex = skb_ifindex(&ctx);
    verdict::tc(&ctx, try_to_uplink(&ctx, ifindex), ifindex, HOOK_TC_EGRESS)
}

fn try_to_uplink(ctx: &TcContext, ifindex: u32) -> Result<Verdict, DropReason> {
    account_tc(ctx, ifindex, HOOK_TC_EGRESS);
    Ok(Verdict::Pass)
}
