//! A task speaks only for itself: the source address of its IPv4 and IPv6, the source MAC of
//! its frames (learned from its first frame when user space did not know it), the sender fields
//! of its ARP, and what its neighbour discovery claims; and it is no router. The programs on
//! task interfaces run these checks before anything else.

use aya_ebpf::programs::TcContext;
use ecsnet_common::{
    DropReason,
    maps::{TASK_IPV6, TaskInfo},
    net::PROTO_UDP,
};

use crate::{
    parse::{ETH_HLEN, EthHdr, FRAG_NONE, Frame, Headers, headers, load, task_frame},
    parse6::{Headers6, ICMPV6_HLEN, PROTO_ICMPV6},
    tasks,
    verdict::Verdict,
};

/// The common case found with one lookup: a well-formed unicast IPv4 packet, untagged, whose
/// source is the task on this interface, from that task's MAC. None sends the packet the long
/// way, through `IFACES`, which sorts out everything else (ARP, IPv6, tags, spoofing,
/// interfaces not ours) with the same outcome as if this shortcut did not exist.
#[inline(always)]
pub fn own_ipv4(ctx: &TcContext, ifindex: u32) -> Option<(*mut TaskInfo, Headers)> {
    if !matches!(task_frame(ctx), Ok(Frame::Ipv4 { group: false })) {
        return None;
    }
    let h = headers(ctx).ok()?;
    let task = tasks::at(h.saddr, ifindex)?;
    check_source_mac(ctx, task).ok()?;
    Some((task, h))
}

/// The task's MAC is the source of its first frame when user space did not know it; from then
/// on a frame from any other MAC is spoofed. Returns the task's MAC.
#[inline(always)]
pub fn check_source_mac(ctx: &TcContext, task: *mut TaskInfo) -> Result<[u8; 6], DropReason> {
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
pub fn check_arp(ctx: &TcContext, own: u32, mac: [u8; 6]) -> Result<Verdict, DropReason> {
    // After the 8-byte ARP header (Ethernet/IPv4 sizes): sender MAC, then sender address.
    let sender: ArpSender = load(ctx, ETH_HLEN + ARP_HLEN)?;
    if sender.mac == mac && (sender.addr == own || sender.addr == 0) {
        Ok(Verdict::Pass)
    } else {
        Err(DropReason::SpoofedSource)
    }
}

/// The fixed ARP header: hardware and protocol types and sizes, the operation.
const ARP_HLEN: usize = 8;

/// The sender fields of an Ethernet/IPv4 ARP packet.
#[repr(C, packed)]
struct ArpSender {
    mac: [u8; 6],
    addr: u32,
}

/// `ICMPv6` messages (RFC 4861, RFC 2894, RFC 3810) the checks read.
const MLD_REPORT: u8 = 131;
const ND_ROUTER_SOLICIT: u8 = 133;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
const ROUTER_RENUMBERING: u8 = 138;
const MLD2_REPORT: u8 = 143;
/// Neighbour-discovery options that carry a link-layer address: the sender's, the target's.
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// How many options of a neighbour-discovery message are read; a message with more is dropped.
const ND_MAX_OPTS: usize = 4;
/// Bytes before the options of a neighbour solicitation or advertisement: the `ICMPv6` header
/// and the 16-byte target.
const ND_NS_NA_HLEN: usize = ICMPV6_HLEN + 16;
/// UDP source port of `DHCPv6` servers and relays (RFC 8415).
const DHCPV6_SERVER_PORT: u16 = 547;

/// IPv6 from a task may only speak for the task:
/// - its source is its own address (`TASKS6`), its link-local address (made from its MAC, as
///   the kernel makes it), or none (`::`) for duplicate address detection and MLD reports; an
///   address of another task is spoofed, and so is any other once the task's own is known;
/// - neighbour advertisements are for its own addresses, and link-layer address options are
///   its MAC; neighbour discovery is never fragmented (RFC 6980);
/// - it sends no router advertisement, redirect, router renumbering or `DHCPv6` server message.
///
/// A task whose IPv6 address ecsnet was not told (no `TASK_IPV6`) may still use, and advertise,
/// addresses no task has: its own, for all ecsnet can tell.
#[inline(always)]
pub fn check_ipv6(
    ctx: &TcContext,
    h: &Headers6,
    ifindex: u32,
    task: &TaskInfo,
) -> Result<(), DropReason> {
    let known = task.flags & TASK_IPV6 != 0;
    let unspecified = h.saddr == [0; 16];
    let source_ok = match tasks::iface_of6(&h.saddr) {
        Some(i) => i == ifindex,
        None if unspecified => {
            h.proto == PROTO_ICMPV6
                && matches!(h.icmp_type, ND_NEIGHBOR_SOLICIT | MLD_REPORT | MLD2_REPORT)
        }
        None if is_link_local(&h.saddr) => h.saddr == link_local(task.mac),
        None => !known,
    };
    if !source_ok {
        return Err(DropReason::SpoofedSource);
    }
    if h.proto == PROTO_UDP && h.sport == DHCPV6_SERVER_PORT.to_be() {
        return Err(DropReason::RogueRouter);
    }
    if h.proto != PROTO_ICMPV6 {
        return Ok(());
    }
    match h.icmp_type {
        ND_ROUTER_ADVERT | ND_REDIRECT | ROUTER_RENUMBERING => Err(DropReason::RogueRouter),
        ND_ROUTER_SOLICIT => nd_options(ctx, h, ICMPV6_HLEN, task.mac),
        ND_NEIGHBOR_SOLICIT => nd_options(ctx, h, ND_NS_NA_HLEN, task.mac),
        ND_NEIGHBOR_ADVERT => {
            if h.frag != FRAG_NONE || h.l4_len < ND_NS_NA_HLEN {
                return Err(DropReason::NdSpoofed);
            }
            let target: [u8; 16] = load(ctx, h.l4 + ICMPV6_HLEN)?;
            let own = match tasks::iface_of6(&target) {
                Some(i) => i == ifindex,
                None if is_link_local(&target) => target == link_local(task.mac),
                None => !known,
            };
            if !own {
                return Err(DropReason::NdSpoofed);
            }
            nd_options(ctx, h, ND_NS_NA_HLEN, task.mac)
        }
        _ => Ok(()),
    }
}

/// The options of a neighbour-discovery message from `start` (bytes into the `ICMPv6` message):
/// every link-layer address in them is `mac`. An unfragmented message with at most
/// `ND_MAX_OPTS` well-formed options, or it is dropped.
#[inline(always)]
fn nd_options(ctx: &TcContext, h: &Headers6, start: usize, mac: [u8; 6]) -> Result<(), DropReason> {
    if h.frag != FRAG_NONE || h.l4_len < start {
        return Err(DropReason::NdSpoofed);
    }
    let mut at = start;
    for _ in 0..ND_MAX_OPTS {
        if at >= h.l4_len {
            return Ok(());
        }
        let opt: NdOption = load(ctx, h.l4 + at).map_err(|_| DropReason::NdSpoofed)?;
        if opt.len == 0 {
            return Err(DropReason::NdSpoofed);
        }
        if matches!(opt.kind, ND_OPT_SOURCE_LL | ND_OPT_TARGET_LL) && opt.mac != mac {
            return Err(DropReason::NdSpoofed);
        }
        at += opt.len as usize * 8;
    }
    if at >= h.l4_len {
        Ok(())
    } else {
        Err(DropReason::NdSpoofed)
    }
}

/// The start of a neighbour-discovery option, as a link-layer address option lays it out.
#[repr(C)]
struct NdOption {
    kind: u8,
    /// Length in units of 8 bytes, this header included.
    len: u8,
    mac: [u8; 6],
}

/// Whether `addr` is link-local unicast (`fe80::/10`).
#[inline(always)]
fn is_link_local(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}

/// The link-local address the kernel gives an Ethernet interface with `mac` (RFC 4291 app. A:
/// `fe80::/64` with the modified EUI-64 interface identifier).
#[inline(always)]
pub fn link_local(mac: [u8; 6]) -> [u8; 16] {
    [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}
