//! Packet rewriting: addresses, ports and ICMP identifiers with their checksums, the TTL of
//! routed packets, and the headers quoted inside ICMP errors. Every store is paired with the
//! checksum update that keeps the packet valid for the receiving kernel; nothing else is touched.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use ecsnet_common::{
    DropReason, csum,
    ct::CtKey,
    net::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

use crate::{
    conntrack::Nat,
    parse::{
        ETH_HLEN, FRAG_LATER, Headers, ICMP_ECHO, ICMP_ECHO_REPLY, IP_OFF_CHECK, IP_OFF_DADDR,
        IP_OFF_SADDR, IP_OFF_TTL, load, quoted_headers_at,
    },
};

/// `bpf_l4_csum_replace` flags: the checksum covers the pseudo-header (TCP, UDP), in which the
/// addresses change too; a zero checksum means "none" and stays zero (UDP).
const PSEUDO_HDR: u64 = BPF_F_PSEUDO_HDR as u64;
const MARK_MANGLED_0: u64 = BPF_F_MARK_MANGLED_0 as u64;
/// The low bits of the `csum_replace` helpers' flags (`BPF_F_HDR_FIELD_MASK`): how many bytes
/// changed, an address or a 16-bit word (a port, an identifier, a checksum, the TTL's word).
const FIELD_ADDR: u64 = 4;
const FIELD_WORD: u64 = 2;

const IP_CHECK: usize = ETH_HLEN + IP_OFF_CHECK;

#[inline(always)]
pub fn store<T>(ctx: &TcContext, off: usize, v: &T) -> Result<(), DropReason> {
    ctx.store(off, v, 0).map_err(|_| DropReason::Truncated)
}

#[inline(always)]
fn l3(ctx: &TcContext, from: u64, to: u64, size: u64) -> Result<(), DropReason> {
    ctx.l3_csum_replace(IP_CHECK, from, to, size)
        .map_err(|_| DropReason::Truncated)
}

#[inline(always)]
pub fn l4(ctx: &TcContext, off: usize, from: u64, to: u64, flags: u64) -> Result<(), DropReason> {
    ctx.l4_csum_replace(off, from, to, flags)
        .map_err(|_| DropReason::Truncated)
}

/// Where the checksum that covers the ports (and for TCP/UDP the pseudo-header) sits, with the
/// flags for `bpf_l4_csum_replace`; offset 0 when the packet carries no transport header. Not
/// an `Option`: LLVM leaves the payload of a `None` undefined and may still compute with
/// whatever register holds it, which the verifier refuses when that is a pointer.
#[inline(always)]
fn l4_check(h: &Headers) -> (usize, u64) {
    if h.frag == FRAG_LATER {
        return (0, 0);
    }
    match h.proto {
        PROTO_TCP => (h.l4 + 16, PSEUDO_HDR),
        // A zero UDP checksum means "none" and must stay zero.
        PROTO_UDP => (h.l4 + 6, PSEUDO_HDR | MARK_MANGLED_0),
        PROTO_ICMP => (h.l4 + 2, 0),
        _ => (0, 0),
    }
}

/// Rewrites `h`'s addresses and ports to `nat`, updating the IP and transport checksums.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, h: &Headers, nat: &Nat) -> Result<(), DropReason> {
    let (check, flags) = l4_check(h);
    for (off, old, new) in [
        (IP_OFF_SADDR, h.saddr, nat.saddr),
        (IP_OFF_DADDR, h.daddr, nat.daddr),
    ] {
        if old == new {
            continue;
        }
        if check != 0 && h.proto != PROTO_ICMP {
            l4(
                ctx,
                check,
                u64::from(old),
                u64::from(new),
                flags | FIELD_ADDR,
            )?;
        }
        l3(ctx, u64::from(old), u64::from(new), FIELD_ADDR)?;
        store(ctx, ETH_HLEN + off, &new)?;
    }
    if check == 0 {
        return Ok(());
    }
    let kind = PortFields::of(
        h.proto == PROTO_ICMP,
        h.icmp_type,
        (ICMP_ECHO, ICMP_ECHO_REPLY),
    );
    let ports = kind.at(h.l4, (h.sport, h.dport), (nat.sport, nat.dport));
    rewrite_ports(ctx, check, flags, ports)
}

/// Which fields of a transport header stand for its ports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PortFields {
    /// TCP and UDP: source and destination port.
    Ports,
    /// An echo request's or reply's identifier (either family's ICMP): its source or
    /// destination "port".
    EchoRequest,
    EchoReply,
    /// No ports.
    None,
}

impl PortFields {
    /// The fields of a packet of the family's ICMP (`icmp`) of `icmp_type`, whose echo request
    /// and reply are `echo`, or of TCP and UDP.
    #[inline(always)]
    pub fn of(icmp: bool, icmp_type: u8, echo: (u8, u8)) -> Self {
        if !icmp {
            PortFields::Ports
        } else if icmp_type == echo.0 {
            PortFields::EchoRequest
        } else if icmp_type == echo.1 {
            PortFields::EchoReply
        } else {
            PortFields::None
        }
    }

    /// Each field to rewrite: (offset, old, new), offset 0 for none; `old` and `new` are
    /// (source, destination) ports.
    #[inline(always)]
    pub fn at(self, l4: usize, old: (u16, u16), new: (u16, u16)) -> [(usize, u16, u16); 2] {
        // For ICMP echo the identifier is the "port": at offset 4 of the ICMP header.
        match self {
            PortFields::Ports => [(l4, old.0, new.0), (l4 + 2, old.1, new.1)],
            PortFields::EchoRequest => [(l4 + 4, old.0, new.0), (0, 0, 0)],
            PortFields::EchoReply => [(l4 + 4, old.1, new.1), (0, 0, 0)],
            PortFields::None => [(0, 0, 0), (0, 0, 0)],
        }
    }
}

/// Stores each of `ports` (offset, old, new; offset 0: none) and updates the transport
/// checksum at `check` (`bpf_l4_csum_replace` `flags`; ports are no part of a pseudo-header).
#[inline(always)]
pub fn rewrite_ports(
    ctx: &TcContext,
    check: usize,
    flags: u64,
    ports: [(usize, u16, u16); 2],
) -> Result<(), DropReason> {
    for (off, old, new) in ports {
        if off == 0 || old == new {
            continue;
        }
        l4(
            ctx,
            check,
            u64::from(old),
            u64::from(new),
            (flags & !PSEUDO_HDR) | FIELD_WORD,
        )?;
        store(ctx, off, &new)?;
    }
    Ok(())
}

/// Decrements the TTL of a routed packet, as the kernel's forwarding would.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, h: &Headers) -> Result<(), DropReason> {
    let off = ETH_HLEN + IP_OFF_TTL;
    let old: u16 = load(ctx, off)?;
    let new = u16::from_ne_bytes({
        let b = old.to_ne_bytes();
        [h.ttl - 1, b[1]]
    });
    l3(ctx, u64::from(old), u64::from(new), FIELD_WORD)?;
    store(ctx, off, &new)
}

/// The table key an ICMP error belongs to: the quoted packet's tuple reversed, which is the
/// tuple of packets travelling the same way as the error. Also returns the quoted headers.
#[inline(always)]
pub fn icmp_error_key(ctx: &TcContext, h: &Headers) -> Result<(CtKey, Headers), DropReason> {
    // The quoted IP header sits after the 8-byte ICMP header; it must be whole, with at least
    // the first 8 bytes of its transport header (RFC 792).
    let inner = quoted_headers_at(ctx, h.l4 + 8)?;
    let key = CtKey {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: inner.dport,
        dport: inner.sport,
        proto: inner.proto,
        _pad: [0; 3],
    };
    Ok((key, inner))
}

/// Translates an ICMP error that belongs to the flow direction rewritten to `e` (looked up with
/// the key from [`icmp_error_key`]): the outer destination (and source, when the flow's own
/// endpoint sent the error) and the quoted packet, with the outer IP, quoted IP, quoted
/// transport and ICMP checksums.
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &TcContext,
    h: &Headers,
    key: &CtKey,
    inner: &Headers,
    e: &Nat,
) -> Result<(), DropReason> {
    let icmp_check = h.l4 + 2;
    // Outer header: no pseudo-header in the ICMP checksum, so only the IP checksum changes.
    if h.daddr != e.daddr {
        l3(ctx, u64::from(h.daddr), u64::from(e.daddr), FIELD_ADDR)?;
        store(ctx, ETH_HLEN + IP_OFF_DADDR, &e.daddr)?;
    }
    if h.saddr == key.saddr && h.saddr != e.saddr {
        l3(ctx, u64::from(h.saddr), u64::from(e.saddr), FIELD_ADDR)?;
        store(ctx, ETH_HLEN + IP_OFF_SADDR, &e.saddr)?;
    }
    // The quote travels the other way: its source is our destination and vice versa.
    let quote = Nat {
        saddr: e.daddr,
        daddr: e.saddr,
        sport: e.dport,
        dport: e.sport,
    };
    let ip = h.l4 + 8;
    let old_ipcheck: u16 = load(ctx, ip + IP_OFF_CHECK).map_err(|_| DropReason::BadIcmpError)?;
    let ipcheck = csum::replace4(
        csum::replace4(old_ipcheck, inner.saddr, quote.saddr),
        inner.daddr,
        quote.daddr,
    );
    for (off, old, new) in [
        (ip + IP_OFF_SADDR, inner.saddr, quote.saddr),
        (ip + IP_OFF_DADDR, inner.daddr, quote.daddr),
    ] {
        in_icmp(ctx, icmp_check, off, old, new)?;
    }
    in_icmp(ctx, icmp_check, ip + IP_OFF_CHECK, old_ipcheck, ipcheck)?;
    // The quoted transport header: ports (or the echo identifier) and, when the quote holds it,
    // its checksum.
    let (ports, inner_check, pseudo) = match inner.proto {
        PROTO_TCP => (
            [
                (inner.l4, inner.sport, quote.sport),
                (inner.l4 + 2, inner.dport, quote.dport),
            ],
            inner.l4 + 16,
            true,
        ),
        PROTO_UDP => (
            [
                (inner.l4, inner.sport, quote.sport),
                (inner.l4 + 2, inner.dport, quote.dport),
            ],
            inner.l4 + 6,
            true,
        ),
        _ if inner.sport != 0 => (
            [(inner.l4 + 4, inner.sport, quote.sport), (0, 0, 0)],
            inner.l4 + 2,
            false,
        ),
        _ => (
            [(inner.l4 + 4, inner.dport, quote.dport), (0, 0, 0)],
            inner.l4 + 2,
            false,
        ),
    };
    let old_l4check: Option<u16> = ctx.load::<u16>(inner_check).ok();
    let mut l4check = old_l4check.unwrap_or(0);
    if pseudo {
        l4check = csum::replace4(
            csum::replace4(l4check, inner.saddr, quote.saddr),
            inner.daddr,
            quote.daddr,
        );
    }
    for (off, old, new) in ports {
        if off == 0 || old == new {
            continue;
        }
        l4check = csum::replace2(l4check, old, new);
        in_icmp(ctx, icmp_check, off, old, new)?;
    }
    if let Some(old) = old_l4check
        && !(inner.proto == PROTO_UDP && old == 0)
    {
        in_icmp(ctx, icmp_check, inner_check, old, l4check)?;
    }
    Ok(())
}

/// Stores `new` over `old` at `off`, inside an ICMP message whose checksum is at `icmp_check`
/// (no pseudo-header), and updates that checksum; nothing when the two are equal. An address
/// is a `u32`, anything else a `u16`: the size is the type's.
#[inline(always)]
fn in_icmp<T: Copy + PartialEq + Into<u64>>(
    ctx: &TcContext,
    icmp_check: usize,
    off: usize,
    old: T,
    new: T,
) -> Result<(), DropReason> {
    if old != new {
        l4(
            ctx,
            icmp_check,
            old.into(),
            new.into(),
            size_of::<T>() as u64,
        )?;
        store(ctx, off, &new)?;
    }
    Ok(())
}
