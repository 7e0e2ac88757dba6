//! Where a packet goes once ecsnet has decided: into a task (`bpf_redirect_peer` into the task's
//! end of its veth pair, skipping the bridge) or out of the uplink (`bpf_redirect` with the MACs
//! of a FIB lookup, or `bpf_redirect_neigh` when the next hop is not resolved yet).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use ecsnet_common::{
    DropReason,
    maps::{Config, TaskInfo},
};

use crate::{parse::Headers, verdict::Verdict};

/// The IPv4 address family of a FIB lookup (`AF_INET` of the socket API).
const AF_INET: u8 = 2;
/// The IPv6 address family of a FIB lookup (`AF_INET6`).
const AF_INET6: u8 = 10;
/// The size of the FIB lookup's parameters, as the helper takes it.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "a 64-byte struct"
)]
const FIB_PARAMS_SIZE: i32 = core::mem::size_of::<bpf_fib_lookup>() as i32;

/// The next hop of a packet leaving through the uplink.
pub struct UplinkHop {
    pub ifindex: u32,
    /// Source and destination MACs, all zero when the neighbour is not resolved. (Plain fields:
    /// an `Option` here leaves bytes the verifier sees read uninitialised.)
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub resolved: bool,
}

/// Where the kernel would route `h` (its destination as it is now), if that is out of the
/// uplink. None for anything else (local, the bridge, another interface, too big to forward).
#[inline(always)]
pub fn uplink_hop(ctx: &TcContext, cfg: &Config, h: &Headers) -> Option<UplinkHop> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid start.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = h.proto;
    p.sport = h.sport;
    p.dport = h.dport;
    // tot_len 0: the helper then checks the skb itself against the MTU, which understands GSO
    // (a TSO packet's IP length is far above any MTU; its segments are not).
    p.__bindgen_anon_1.tot_len = 0;
    p.ifindex = cfg.bridge_ifindex;
    p.__bindgen_anon_3.ipv4_src = h.saddr;
    p.__bindgen_anon_4.ipv4_dst = h.daddr;
    let ret = unsafe { fib_lookup(ctx.as_ptr(), &raw mut p, FIB_PARAMS_SIZE, 0) };
    hop(cfg, ret, &p)
}

/// Where the kernel would route an IPv6 packet from `saddr` to `daddr` (as it will leave), if
/// that is out of the uplink; as [`uplink_hop`].
#[inline(always)]
pub fn uplink_hop6(
    ctx: &TcContext,
    cfg: &Config,
    proto: u8,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> Option<UplinkHop> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid start.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = proto;
    // tot_len 0: the skb itself is checked against the MTU, as for IPv4.
    p.__bindgen_anon_1.tot_len = 0;
    p.ifindex = cfg.bridge_ifindex;
    // SAFETY: 16 bytes as four words of the same bytes.
    p.__bindgen_anon_3.ipv6_src = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*saddr) };
    p.__bindgen_anon_4.ipv6_dst = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*daddr) };
    let ret = unsafe { fib_lookup(ctx.as_ptr(), &raw mut p, FIB_PARAMS_SIZE, 0) };
    hop(cfg, ret, &p)
}

/// The next hop a FIB lookup that returned `ret` with parameters `p` found, if it is out of the
/// uplink.
#[inline(always)]
fn hop(cfg: &Config, ret: i64, p: &bpf_fib_lookup) -> Option<UplinkHop> {
    if p.ifindex != cfg.uplink_ifindex {
        return None;
    }
    // A negative error matches no result code.
    match u32::try_from(ret) {
        Ok(BPF_FIB_LKUP_RET_SUCCESS) => {
            let m = unsafe { p.__bindgen_anon_6.__bindgen_anon_2 };
            Some(UplinkHop {
                ifindex: p.ifindex,
                smac: m.smac,
                dmac: m.dmac,
                resolved: true,
            })
        }
        Ok(BPF_FIB_LKUP_RET_NO_NEIGH) => Some(UplinkHop {
            ifindex: p.ifindex,
            smac: [0; 6],
            dmac: [0; 6],
            resolved: false,
        }),
        _ => None,
    }
}

/// Sends the packet out of the uplink.
#[inline(always)]
pub fn to_uplink(ctx: &TcContext, hop: &UplinkHop) -> Result<Verdict, DropReason> {
    let ret = if hop.resolved {
        set_macs(ctx, &hop.smac, &hop.dmac)?;
        unsafe { bpf_redirect(hop.ifindex, 0) }
    } else {
        unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) }
    };
    redirected(ret)
}

/// Delivers the packet into task `t` (the caller counted it). Routed packets get the bridge's
/// MAC as source, as the kernel's forwarding would give them.
#[inline(always)]
pub fn to_task(
    ctx: &TcContext,
    cfg: &Config,
    t: &TaskInfo,
    routed: bool,
) -> Result<Verdict, DropReason> {
    if routed {
        set_macs(ctx, &cfg.bridge_mac, &t.mac)?;
    }
    into_task(t)
}

/// Delivers the packet into task `t` as it is (the caller counted it).
#[inline(always)]
pub fn into_task(t: &TaskInfo) -> Result<Verdict, DropReason> {
    redirected(unsafe { bpf_redirect_peer(t.ifindex, 0) })
}

#[inline(always)]
fn set_macs(ctx: &TcContext, src: &[u8; 6], dst: &[u8; 6]) -> Result<(), DropReason> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dst);
    macs[6..].copy_from_slice(src);
    ctx.store(0, &macs, 0).map_err(|_| DropReason::Truncated)
}

#[inline(always)]
fn redirected(ret: i64) -> Result<Verdict, DropReason> {
    if ret == i64::from(TC_ACT_REDIRECT) {
        Ok(Verdict::Redirect)
    } else {
        Err(DropReason::RedirectFailed)
    }
}
