//! IPv6 header parsing: the fixed header, the chain of extension headers behind it (walked to
//! the transport header, at most `MAX_EXT_HEADERS` of them), and the facts the checks need.
//! What cannot be walked is an error with its reason, never a packet whose transport header was
//! not seen passed as if it had none. Nothing here writes to the packet.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::TcContext};
use ecsnet_common::{
    DropReason,
    net::{PROTO_TCP, PROTO_UDP},
};

use crate::parse::{
    ETH_HLEN, FRAG_FIRST, FRAG_LATER, FRAG_NONE, TcpHdrStart, UDP_HLEN, load, tcp_hlen,
};

/// `ICMPv6`'s protocol number.
pub const PROTO_ICMPV6: u8 = 58;

/// `ICMPv6` echo request and reply (RFC 4443 §4): their identifier stands in for a port.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// The `ICMPv6` errors (RFC 4443 §3): each quotes the packet it is about.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PARAM_PROBLEM: u8 = 4;

/// Extension headers (RFC 8200 §4, RFC 4302) the walk steps over.
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

/// How many extension headers the walk reads before it gives up on a packet: more than any
/// real sender puts in front of a transport header (RFC 7045 lets a node limit this).
const MAX_EXT_HEADERS: usize = 8;

/// Bytes of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;
/// Bytes of the fixed part of an `ICMPv6` message: type, code, checksum, four more.
pub const ICMPV6_HLEN: usize = 8;
/// Shortest TCP header.
const TCP_MIN_HLEN: usize = 20;

/// A routing header of type 0 (RFC 5095 deprecated it: it bounces packets around checks).
const ROUTING_TYPE_0: u8 = 0;

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The first bytes of every extension header but the fragment header: the next header and the
/// length, then (routing header) the routing type.
#[repr(C)]
struct ExtStart {
    next: u8,
    len: u8,
    routing_type: u8,
    _rest: u8,
}

/// The fragment header.
#[repr(C)]
struct FragHdr {
    next: u8,
    _reserved: u8,
    /// Offset in 8-byte units in the high 13 bits, the M flag in the lowest (network order).
    frag_off: u16,
    id: u32,
}

const FRAG_OFFSET_MASK: u16 = 0xfff8;
const FRAG_MORE: u16 = 0x0001;

/// An IPv6 packet as the checks see it. Addresses are the packet's bytes; ports in network
/// byte order, 0 without a transport header (an `ICMPv6` echo's identifier stands in for one,
/// as for IPv4: `sport` in a request, `dport` in a reply); `ICMPv6` type and code 0 for other
/// protocols.
#[derive(Clone, Copy)]
pub struct Headers6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The transport protocol: the last next-header value of the chain.
    pub proto: u8,
    /// Offset of the transport header from the start of the frame (meaningless for a later
    /// fragment, which has none).
    pub l4: usize,
    /// `FRAG_*`, as for IPv4.
    pub frag: u8,
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Bytes from the transport header to the end of the packet.
    pub l4_len: usize,
    /// The fragment header's identification, as in the packet; 0 without one.
    pub frag_id: u32,
    /// TCP flags byte; 0 for other protocols.
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers, host byte order; 0 for other protocols.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// TCP payload bytes; 0 for other protocols.
    pub tcp_payload: u32,
    /// IP bytes: the fixed header and the payload (the packet's own length for a jumbogram).
    pub tot_len: u32,
}

impl Headers6 {
    /// An `ICMPv6` error (unreachable, packet too big, time exceeded, parameter problem) that
    /// quotes another packet.
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        self.proto == PROTO_ICMPV6
            && self.frag != FRAG_LATER
            && (ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROBLEM).contains(&self.icmp_type)
    }
}

/// This CPU's parsed headers of the packet in progress, handed by a program to the program it
/// tail-calls (`hand_over`, `handed_over`), which then need not walk the extension headers
/// again within its own verifier budget. Not pinned: scratch space, as `clock`'s.
#[map(name = "HEADERS6")]
static HEADERS6: PerCpuArray<Headers6> = PerCpuArray::with_max_entries(1, 0);

/// Leaves `h` for the program about to be tail-called. A tail call is a jump within the same
/// run on the same CPU: nothing else runs on this CPU in between.
#[inline(always)]
pub fn hand_over(h: &Headers6) {
    if let Some(slot) = HEADERS6.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *slot = *h };
    }
}

/// The headers the tail-calling program handed over (`hand_over`), to be read and changed in
/// place (a later fragment's ports are filled in): valid for this program run.
#[inline(always)]
pub fn handed_over() -> Option<&'static mut Headers6> {
    // SAFETY: this CPU's slot, see `hand_over`; one reference to it per program run.
    HEADERS6.get_ptr_mut(0).map(|slot| unsafe { &mut *slot })
}

/// Parses the IPv6 packet behind the Ethernet header, walking its extension headers.
#[inline(always)]
pub fn headers6(ctx: &TcContext) -> Result<Headers6, DropReason> {
    let ip: Ipv6Hdr = load(ctx, ETH_HLEN)?;
    if u32::from_be(ip.vtc_flow) >> 28 != 6 {
        return Err(DropReason::BadIpHeader);
    }
    let wire = ctx.len() as usize;
    // Zero is a jumbogram's, or a big GSO packet's (BIG TCP): the packet's own length holds.
    let payload = match u16::from_be(ip.payload_len) as usize {
        0 => wire.saturating_sub(ETH_HLEN + IPV6_HLEN),
        n => n,
    };
    let end = ETH_HLEN + IPV6_HLEN + payload;
    if end > wire {
        return Err(DropReason::Truncated);
    }
    let mut h = Headers6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto: ip.nexthdr,
        l4: ETH_HLEN + IPV6_HLEN,
        frag: FRAG_NONE,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        icmp_code: 0,
        l4_len: 0,
        frag_id: 0,
        tcp_flags: 0,
        tcp_seq: 0,
        tcp_ack: 0,
        tcp_payload: 0,
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an skb's length fits 32 bits"
        )]
        tot_len: (IPV6_HLEN + payload) as u32,
    };
    walk_extension_headers(ctx, &mut h)?;
    if h.frag == FRAG_LATER {
        return Ok(h);
    }
    if h.l4 > end {
        return Err(DropReason::Truncated);
    }
    h.l4_len = end - h.l4;
    // The transport header's fixed part must be in this packet; a first fragment without it
    // (RFC 7112) hides its ports from every check.
    let need = match h.proto {
        PROTO_TCP => TCP_MIN_HLEN,
        PROTO_UDP => UDP_HLEN,
        PROTO_ICMPV6 => ICMPV6_HLEN,
        _ => 0,
    };
    if need > h.l4_len {
        return Err(if h.frag == FRAG_FIRST {
            DropReason::BadExtHeader
        } else {
            DropReason::Truncated
        });
    }
    match h.proto {
        PROTO_TCP => {
            let t: TcpHdrStart = load(ctx, h.l4)?;
            let doff = tcp_hlen(t.doff_res)?;
            if doff > h.l4_len {
                return Err(DropReason::Truncated);
            }
            (h.sport, h.dport) = (t.source, t.dest);
            h.tcp_flags = t.flags;
            h.tcp_seq = u32::from_be(t.seq);
            h.tcp_ack = u32::from_be(t.ack_seq);
            #[expect(clippy::cast_possible_truncation, reason = "less than an skb's length")]
            let payload = (h.l4_len - doff) as u32;
            h.tcp_payload = payload;
        }
        PROTO_UDP => {
            let u: [u16; 2] = load(ctx, h.l4)?;
            (h.sport, h.dport) = (u[0], u[1]);
        }
        PROTO_ICMPV6 => {
            // type, code, checksum, identifier.
            let i: [u8; 6] = load(ctx, h.l4)?;
            (h.icmp_type, h.icmp_code) = (i[0], i[1]);
            let id = u16::from_ne_bytes([i[4], i[5]]);
            match i[0] {
                ICMPV6_ECHO_REQUEST => h.sport = id,
                ICMPV6_ECHO_REPLY => h.dport = id,
                _ => {}
            }
        }
        _ => {}
    }
    Ok(h)
}

/// Steps `h.l4` over the extension headers in front of the transport header, setting
/// `h.proto` to the transport protocol and `h.frag` from a fragment header.
#[inline(always)]
fn walk_extension_headers(ctx: &TcContext, h: &mut Headers6) -> Result<(), DropReason> {
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        let hlen = match h.proto {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS | EXT_AH => {
                if h.proto == EXT_HOP_BY_HOP && walked != 0 {
                    return Err(DropReason::BadExtHeader);
                }
                let e: ExtStart = load(ctx, h.l4)?;
                if h.proto == EXT_ROUTING && e.routing_type == ROUTING_TYPE_0 {
                    return Err(DropReason::BadExtHeader);
                }
                let hlen = if h.proto == EXT_AH {
                    (e.len as usize + 2) * 4
                } else {
                    (e.len as usize + 1) * 8
                };
                h.proto = e.next;
                hlen
            }
            EXT_FRAGMENT => {
                let f: FragHdr = load(ctx, h.l4)?;
                let off = u16::from_be(f.frag_off);
                h.frag = if off & FRAG_OFFSET_MASK != 0 {
                    FRAG_LATER
                } else if off & FRAG_MORE != 0 {
                    FRAG_FIRST
                } else {
                    // An atomic fragment (RFC 6946): a whole packet.
                    h.frag
                };
                h.proto = f.next;
                h.frag_id = f.id;
                8
            }
            _ => break,
        };
        h.l4 += hlen;
        walked += 1;
    }
    if matches!(
        h.proto,
        EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS | EXT_AH | EXT_FRAGMENT
    ) {
        // Headers left that the walk did not read: whatever follows them goes unchecked.
        return Err(DropReason::BadExtHeader);
    }
    Ok(())
}
