//! IPv6 packet rewriting (NAT66): addresses, ports and `ICMPv6` echo identifiers with the
//! transport checksum, and the hop limit of forwarded packets. IPv6 has no header checksum; the
//! TCP, UDP and `ICMPv6` checksums cover a pseudo-header holding both addresses, so a changed
//! address is folded into them as the difference of its 16 bytes (`bpf_csum_diff`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use ecsnet_common::{
    DropReason, csum,
    ct::CtEntry6,
    net::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    conntrack::Nat,
    nat::{self, PortFields},
    parse::{ETH_HLEN, FRAG_LATER, load},
    parse6::{Headers6, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, IPV6_HLEN, PROTO_ICMPV6},
};

/// `bpf_l4_csum_replace` flags, as in `nat`: the checksum covers the pseudo-header; a zero UDP
/// checksum stays zero. An address's change is handed over as a checksum difference (size 0).
const PSEUDO_HDR: u64 = BPF_F_PSEUDO_HDR as u64;
const MARK_MANGLED_0: u64 = BPF_F_MARK_MANGLED_0 as u64;

/// Where the addresses and the hop limit are in the fixed IPv6 header.
const SADDR_AT: usize = 8;
const DADDR_AT: usize = 24;
const HOP_LIMIT_AT: usize = 7;

/// The hop limit of the packet in `ctx`; 0 when it cannot be read.
#[inline(always)]
pub fn hop_limit(ctx: &TcContext) -> u8 {
    load::<u8>(ctx, ETH_HLEN + HOP_LIMIT_AT).unwrap_or(0)
}

/// Decrements the hop limit of a forwarded packet, as the kernel's forwarding would (the
/// caller checked it is above 1). No checksum covers it.
#[inline(always)]
pub fn decrement_hop_limit(ctx: &TcContext) -> Result<(), DropReason> {
    let hop = hop_limit(ctx);
    nat::store(ctx, ETH_HLEN + HOP_LIMIT_AT, &hop.wrapping_sub(1))
}

/// Where the checksum of `h`'s transport header sits, with its `bpf_l4_csum_replace` flags;
/// offset 0 without one (a later fragment, a protocol without ports). Not an `Option`, as in
/// `nat::l4_check`.
#[inline(always)]
fn l4_check(h: &Headers6) -> (usize, u64) {
    if h.frag == FRAG_LATER {
        return (0, 0);
    }
    match h.proto {
        PROTO_TCP => (h.l4 + 16, PSEUDO_HDR),
        PROTO_UDP => (h.l4 + 6, PSEUDO_HDR | MARK_MANGLED_0),
        PROTO_ICMPV6 => (h.l4 + 2, PSEUDO_HDR),
        _ => (0, 0),
    }
}

/// The checksum difference of an address changing from `old` to `new`; None when the helper
/// fails.
#[inline(always)]
fn addr_diff(old: &[u8; 16], new: &[u8; 16]) -> Option<u64> {
    // SAFETY: two 16-byte buffers, sizes as given; the helper only reads them (no copies: the
    // stack is tight).
    let d = unsafe {
        bpf_csum_diff(
            old.as_ptr().cast_mut().cast(),
            16,
            new.as_ptr().cast_mut().cast(),
            16,
            0,
        )
    };
    u64::try_from(d).ok()
}

/// What a packet is rewritten to, by reference: to a [`Nat`] on the stack, or to the fields of
/// a connection-table entry read in place (the stacks are too full for another copy).
pub struct To<'a> {
    pub saddr: &'a [u8; 16],
    pub daddr: &'a [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

impl<'a> To<'a> {
    #[inline(always)]
    pub fn nat(nat: &'a Nat<[u8; 16]>) -> Self {
        To {
            saddr: &nat.saddr,
            daddr: &nat.daddr,
            sport: nat.sport,
            dport: nat.dport,
        }
    }

    /// The rewrite of a connection-table entry, read in place.
    #[inline(always)]
    pub fn entry(e: &'a CtEntry6) -> Self {
        To {
            saddr: &e.nat_saddr,
            daddr: &e.nat_daddr,
            sport: e.nat_sport,
            dport: e.nat_dport,
        }
    }
}

/// Rewrites `h`'s addresses and ports (an echo's identifier) to `nat`, updating the transport
/// checksum.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, h: &Headers6, nat: &To) -> Result<(), DropReason> {
    let (check, flags) = l4_check(h);
    for (off, old, new) in [
        (SADDR_AT, &h.saddr, nat.saddr),
        (DADDR_AT, &h.daddr, nat.daddr),
    ] {
        if old == new {
            continue;
        }
        if check != 0 {
            let diff = addr_diff(old, new).ok_or(DropReason::Truncated)?;
            nat::l4(ctx, check, 0, diff, flags)?;
        }
        nat::store(ctx, ETH_HLEN + off, new)?;
    }
    if check == 0 {
        return Ok(());
    }
    let kind = PortFields::of(
        h.proto == PROTO_ICMPV6,
        h.icmp_type,
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY),
    );
    let ports = kind.at(h.l4, (h.sport, h.dport), (nat.sport, nat.dport));
    nat::rewrite_ports(ctx, check, flags, ports)
}

/// Where the quoted packet's checksum sits in an `ICMPv6` error quoting TCP, UDP or `ICMPv6` at
/// `quote` (its fixed header); 0 for other protocols. All three cover a pseudo-header.
#[inline(always)]
fn quoted_check(quote: usize, proto: u8) -> usize {
    match proto {
        PROTO_TCP => quote + IPV6_HLEN + 16,
        PROTO_UDP => quote + IPV6_HLEN + 6,
        PROTO_ICMPV6 => quote + IPV6_HLEN + 2,
        _ => 0,
    }
}

/// Which end of a translated flow an `ICMPv6` error is about, and so which fields change.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ErrorSide {
    /// An error arriving for the host about a packet that left as the host: its destination,
    /// and the quoted packet's source and source port, become the task's.
    In,
    /// An error a task sends about a packet it received translated: its source, and the quoted
    /// packet's destination and destination port, become the host's.
    Out,
}

impl ErrorSide {
    /// Where the outer address that changes sits, and the quoted one.
    #[inline(always)]
    fn addrs_at(self) -> (usize, usize) {
        match self {
            ErrorSide::In => (DADDR_AT, SADDR_AT),
            ErrorSide::Out => (SADDR_AT, DADDR_AT),
        }
    }

    /// Where the quoted packet's port that changes sits, for a quote at `quote` of `proto`:
    /// TCP's and UDP's port, or an echo's identifier (the request's source "port", the reply's
    /// destination one); 0 for anything else.
    #[inline(always)]
    fn port_at(self, quote: usize, proto: u8, icmp_type: u8) -> usize {
        let l4 = quote + IPV6_HLEN;
        match (proto, self) {
            (PROTO_TCP | PROTO_UDP, ErrorSide::In) => l4,
            (PROTO_TCP | PROTO_UDP, ErrorSide::Out) => l4 + 2,
            (PROTO_ICMPV6, ErrorSide::In) if icmp_type == ICMPV6_ECHO_REQUEST => l4 + 4,
            (PROTO_ICMPV6, ErrorSide::Out) if icmp_type == ICMPV6_ECHO_REPLY => l4 + 4,
            _ => 0,
        }
    }
}

/// What [`translate_error`] changes in an `ICMPv6` error quoting a packet of a translated
/// flow at `quote` (of protocol `qproto`), on `side`: the outer address and the quoted address
/// and port of that side go from `old` (address, port) to `new`.
pub struct ErrorFix<'a> {
    pub quote: usize,
    pub qproto: u8,
    pub side: ErrorSide,
    pub old: (&'a [u8; 16], u16),
    pub new: (&'a [u8; 16], u16),
}

/// Translates the `ICMPv6` error `h` as `fix` says. The quoted packet's own checksum (when
/// quoted, and not a UDP zero) and the error's (which covers the outer addresses) follow.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, h: &Headers6, fix: &ErrorFix) -> Result<(), DropReason> {
    let ErrorFix {
        quote,
        qproto,
        side,
        old,
        new,
    } = *fix;
    let check = h.l4 + 2;
    let (outer_at, quoted_at) = side.addrs_at();
    let outer = if side == ErrorSide::In {
        &h.daddr
    } else {
        &h.saddr
    };
    // The outer address: in the pseudo-header.
    let diff = addr_diff(outer, new.0).ok_or(DropReason::BadIcmpError)?;
    nat::l4(ctx, check, 0, diff, PSEUDO_HDR)?;
    nat::store(ctx, ETH_HLEN + outer_at, new.0)?;
    // The quoted address and port: data the error's checksum covers.
    let qtype = load::<u8>(ctx, quote + IPV6_HLEN).unwrap_or(0);
    let port_at = side.port_at(quote, qproto, qtype);
    let diff = addr_diff(old.0, new.0).ok_or(DropReason::BadIcmpError)?;
    let qcheck_at = quoted_check(quote, qproto);
    let old_qcheck: Option<u16> = if qcheck_at == 0 {
        None
    } else {
        ctx.load::<u16>(qcheck_at).ok()
    };
    nat::l4(ctx, check, 0, diff, 0)?;
    nat::store(ctx, quote + quoted_at, new.0)?;
    nat::rewrite_ports(ctx, check, 0, [(port_at, old.1, new.1), (0, 0, 0)])?;
    let Some(old_qcheck) = old_qcheck else {
        return Ok(());
    };
    if qproto == PROTO_UDP && old_qcheck == 0 {
        return Ok(());
    }
    let word = |a: &[u8; 16], i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mut qcheck = old_qcheck;
    for i in [0, 4, 8, 12] {
        qcheck = csum::replace4(qcheck, word(old.0, i), word(new.0, i));
    }
    if port_at != 0 {
        qcheck = csum::replace2(qcheck, old.1, new.1);
    }
    nat::rewrite_ports(ctx, check, 0, [(qcheck_at, old_qcheck, qcheck), (0, 0, 0)])
}
