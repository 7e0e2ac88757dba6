//! The uplink's XDP policy: a packet opening a flow to a published port that the task's inbound
//! rules reject is dropped before an skb exists; anything it cannot judge alone goes on to tc.

use aya_ebpf::programs::XdpContext;
use ecsnet_common::{
    DropReason,
    ct::CtKey,
    flow::{ACTION_REJECT, FLOW_INGRESS},
    maps::{Config, HOOK_XDP},
    net::{PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    account::{self, Sighting},
    clock, conntrack, forward,
    parse::{
        ETH_HLEN, FRAG_NONE, IPV4_MIN_HLEN, Ipv4Hdr, Packet as _, TcpHdrStart, UDP_HLEN,
        fixed_header_checksum_ok, ipv4_frag, ipv4_valid_hlen, is_unicast_ipv4, ptr_at, tcp_hlen,
    },
    policy, tasks,
    verdict::{Verdict, drop_on},
};

/// Drops, before an skb exists, a packet opening a flow to a published port that the task's
/// inbound rules reject: exactly what tc ingress would drop for the same reason a moment later.
#[inline(always)]
pub fn check(ctx: &XdpContext, cfg: &Config) -> Option<Verdict> {
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
    let l4 = ETH_HLEN + IPV4_MIN_HLEN;
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok()?;
    // SAFETY: checked by `ptr_at`.
    let (sport, dport) = unsafe { ((*ports)[0], (*ports)[1]) };
    let mut tcp_flags = 0;
    let mut l4_hlen = UDP_HLEN;
    if proto == PROTO_TCP {
        let tcp: *const TcpHdrStart = ptr_at(ctx, l4).ok()?;
        // SAFETY: checked by `ptr_at`.
        let doff_res;
        (tcp_flags, doff_res) = unsafe { ((*tcp).flags, (*tcp).doff_res) };
        if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
            return None;
        }
        l4_hlen = tcp_hlen(doff_res).ok()?;
    }
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
    account::record(&seen, 1, u64::from(tot_len));
    Some(drop_on(ctx, DropReason::SgIngress, dst.ifindex, HOOK_XDP))
}
