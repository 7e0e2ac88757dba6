//! The uplink's XDP policy: a packet opening a flow to a published port (IPv4's `PORTS`, IPv6's
//! `PORTS6`) that the task's inbound rules reject is dropped before an skb exists; anything it
//! cannot judge alone goes on to tc.

use aya_ebpf::programs::XdpContext;
use ecsnet_common::{
    DropReason,
    ct::{CtKey, CtKey6},
    flow::{ACTION_REJECT, FLOW_INGRESS},
    maps::{Config, HOOK_XDP},
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    account::{self, Family, Seen},
    clock,
    conntrack::{self, Nat, Table},
    forward, forward6, nat66,
    parse::{
        ETH_HLEN, FRAG_NONE, IPV4_MIN_HLEN, Ipv4Hdr, Packet as _, TcpHdrStart, UDP_HLEN,
        fixed_header_checksum_ok, ipv4_frag, ipv4_valid_hlen, is_unicast_ipv4, is_unicast_ipv6,
        ptr_at, tcp_hlen,
    },
    parse6::{IPV6_HLEN, Ipv6Hdr},
    policy, tasks,
    verdict::{Verdict, drop_on},
};

/// Drops, before an skb exists, a packet opening a flow to a published port that the task's
/// inbound rules reject: exactly what tc ingress would drop for the same reason a moment later.
#[inline(always)]
pub fn check(ctx: &XdpContext, cfg: &Config) -> Option<Verdict> {
    if is_unicast_ipv6(ctx) {
        return check6(ctx);
    }
    if !is_unicast_ipv4(ctx) {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok()?;
    // SAFETY: `ptr_at` checked the header is within the frame.
    let (vhl, tot_len, frag_off, proto, saddr, daddr) = unsafe {
        (
            (*ip).vhl,
            u16::from_be((*ip).tot_len),
            u16::from_be((*ip).frag_off),
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    // Fragments (MF set or an offset) are tc's: it tracks them. So are headers with options
    // and bad checksums: tc reads the options and drops the latter with their reason.
    if ipv4_valid_hlen(vhl) != Some(IPV4_MIN_HLEN) || ipv4_frag(frag_off) != FRAG_NONE {
        return None;
    }
    if !fixed_header_checksum_ok(ctx, ETH_HLEN).ok()? {
        return None;
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // No options: the transport header follows the fixed IPv4 header, its ports first.
    let (sport, dport, tcp_flags, l4_hlen) = opening(ctx, ETH_HLEN + IPV4_MIN_HLEN, proto)?;
    // A packet tc drops as malformed (a total length the frame does not hold, a transport
    // header it cuts short, a TCP data offset below 5) is tc's, which counts it with its reason.
    if ETH_HLEN + tot_len as usize > ctx.end() - ctx.start()
        || IPV4_MIN_HLEN + l4_hlen > tot_len as usize
    {
        return None;
    }
    if !forward::is_local(cfg, daddr) {
        return None;
    }
    let (addr, port) = forward::published_port(dport, proto)?;
    let dst = tasks::by_addr(addr)?;
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
    Some(reject(
        ctx,
        dst.ifindex,
        (proto, tcp_flags),
        ((saddr, sport), (addr, port), daddr),
        u64::from(tot_len),
    ))
}

/// [`check`] for IPv6: only a TCP SYN or a UDP datagram right behind the fixed header (an
/// extension header, a fragment or anything malformed is tc's, which walks and judges it).
#[inline(always)]
fn check6(ctx: &XdpContext) -> Option<Verdict> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok()?;
    // SAFETY: `ptr_at` checked the header is within the frame.
    let (vtc, payload, proto, saddr, daddr) = unsafe {
        (
            u32::from_be((*ip).vtc_flow),
            usize::from(u16::from_be((*ip).payload_len)),
            (*ip).nexthdr,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    if vtc >> 28 != 6 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    let l4 = ETH_HLEN + IPV6_HLEN;
    let (sport, dport, tcp_flags, l4_hlen) = opening(ctx, l4, proto)?;
    // What tc would drop as malformed (or take as a jumbogram: payload length 0) is tc's.
    if payload == 0 || l4 + payload > ctx.end() - ctx.start() || l4_hlen > payload {
        return None;
    }
    if !nat66::is_local6(&daddr) {
        return None;
    }
    let target = nat66::published6_port(dport, proto)?;
    let dst = forward6::task6(&target.addr)?;
    if dst.policy == 0 {
        return None;
    }
    let tuple = Nat {
        saddr,
        daddr,
        sport,
        dport,
    };
    if conntrack::lookup(&CtKey6::of(&tuple, proto)).is_some()
        || policy::allows6_port(
            dst.policy,
            policy::DIR_INGRESS,
            &saddr,
            proto,
            u16::from_be(target.port),
        )
    {
        return None;
    }
    Some(reject(
        ctx,
        dst.ifindex,
        (proto, tcp_flags),
        ((saddr, sport), (target.addr, target.port), daddr),
        (IPV6_HLEN + payload) as u64,
    ))
}

/// Drops a packet the rules of the task on `ifindex` reject, counted there, with the REJECT
/// record tc would have written in its flow log: from the client (address, port) to the task
/// (address, container port), sent to the host's address.
#[inline(always)]
fn reject<A: Family>(
    ctx: &XdpContext,
    ifindex: u32,
    (proto, tcp_flags): (u8, u8),
    ((saddr, sport), (daddr, dport), host): ((A, u16), (A, u16), A),
    bytes: u64,
) -> Verdict {
    let seen = Seen {
        ifindex,
        dir: FLOW_INGRESS,
        action: ACTION_REJECT,
        proto,
        tcp_flags,
        saddr,
        daddr,
        sport,
        dport,
        pkt_saddr: saddr,
        pkt_daddr: host,
    };
    clock::stamp();
    account::record(&seen, 1, bytes);
    drop_on(ctx, DropReason::SgIngress, ifindex, HOOK_XDP)
}

/// The transport header of TCP or UDP at `l4` when it opens a flow (a TCP SYN; any UDP):
/// (source port, destination port, TCP flags, header length); None for anything else.
#[inline(always)]
fn opening(ctx: &XdpContext, l4: usize, proto: u8) -> Option<(u16, u16, u8, usize)> {
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok()?;
    // SAFETY: checked by `ptr_at`.
    let (sport, dport) = unsafe { ((*ports)[0], (*ports)[1]) };
    if proto != PROTO_TCP {
        return Some((sport, dport, 0, UDP_HLEN));
    }
    let tcp: *const TcpHdrStart = ptr_at(ctx, l4).ok()?;
    // SAFETY: checked by `ptr_at`.
    let (tcp_flags, doff_res) = unsafe { ((*tcp).flags, (*tcp).doff_res) };
    if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
        return None;
    }
    Some((sport, dport, tcp_flags, tcp_hlen(doff_res).ok()?))
}
