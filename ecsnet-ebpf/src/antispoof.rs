//! A task speaks only for itself: the source address of its IPv4, the source MAC of its frames
//! (learned from its first frame when user space did not know it) and the sender fields of its
//! ARP. The programs on task interfaces run these checks before anything else.

use aya_ebpf::programs::TcContext;
use ecsnet_common::{DropReason, maps::TaskInfo};

use crate::{
    parse::{ETH_HLEN, EthHdr, Frame, Headers, headers, load, task_frame},
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
