//! Header parsing, the only place that knows header layout: one bounds-checked accessor for
//! packet data, the few headers the datapath reads, and one helper per IPv4 header fact (header
//! length, fragment state, where the transport header starts). Nothing here writes to the packet.

use core::mem::{offset_of, size_of};

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, xdp_md},
    programs::{TcContext, XdpContext},
};
use ecsnet_common::{
    DropReason, csum,
    net::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
};

/// Packet memory of a TC or XDP context.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

/// Both contexts expose their packet memory under the same names, without a common trait.
macro_rules! packet_memory {
    ($($ctx:ty),*) => {$(
        impl Packet for $ctx {
            #[inline(always)]
            fn start(&self) -> usize {
                self.data()
            }
            #[inline(always)]
            fn end(&self) -> usize {
                self.data_end()
            }
        }
    )*};
}
packet_memory!(TcContext, XdpContext);

/// A pointer to a `T` at `offset` in the packet, or `Truncated` if the packet is shorter.
/// Re-derive every pointer after a helper that can move packet data.
#[inline(always)]
pub fn ptr_at<P: Packet, T>(pkt: &P, offset: usize) -> Result<*const T, DropReason> {
    let start = pkt.start();
    if start + offset + core::mem::size_of::<T>() > pkt.end() {
        return Err(DropReason::Truncated);
    }
    Ok((start + offset) as *const T)
}

/// Reads a `T` at `offset` through `bpf_skb_load_bytes`, which also reaches non-linear data.
#[inline(always)]
pub fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, DropReason> {
    ctx.load::<T>(offset).map_err(|_| DropReason::Truncated)
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// VLAN tags: 802.1Q, 802.1ad (Q-in-Q) and the old Q-in-Q value some switches still send.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ_OLD: u16 = 0x9100;
/// The I/G bit of a MAC's first byte: set in group (multicast and broadcast) addresses.
const ETH_GROUP_BIT: u8 = 0x01;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Ethertype, network byte order.
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vhl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// Shortest IPv4 header (no options), bytes.
pub const IPV4_MIN_HLEN: usize = size_of::<Ipv4Hdr>();
/// Offsets of the fields the datapath rewrites, inside the IPv4 header.
pub const IP_OFF_TTL: usize = offset_of!(Ipv4Hdr, ttl);
pub const IP_OFF_CHECK: usize = offset_of!(Ipv4Hdr, check);
pub const IP_OFF_SADDR: usize = offset_of!(Ipv4Hdr, saddr);
pub const IP_OFF_DADDR: usize = offset_of!(Ipv4Hdr, daddr);
const _: () = assert!(IPV4_MIN_HLEN == 20 && IP_OFF_TTL == 8 && IP_OFF_DADDR == 16);

/// `frag_off` (host byte order): more fragments follow this one.
const IP_MF: u16 = 0x2000;
/// `frag_off`: where this fragment's data sits in the datagram, in 8-byte units. Zero in a
/// datagram's first fragment, and in a datagram that is not fragmented at all: only those carry
/// the transport header.
const IP_OFFSET: u16 = 0x1fff;
/// An IPv4 header length (IHL × 4) is a multiple of 4 of at most 60. Masked with this where it
/// becomes a packet offset, the verifier sees that bound, whatever it lost on the way.
const IP_HLEN_MASK: usize = 0x3c;

#[repr(C)]
pub struct TcpHdrStart {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset in the high nibble.
    pub doff_res: u8,
    pub flags: u8,
}

/// [`Headers::frag`]: not a fragment.
pub const FRAG_NONE: u8 = 0;
/// [`Headers::frag`]: the first fragment (more fragments, offset 0): it carries the ports.
pub const FRAG_FIRST: u8 = 1;
/// [`Headers::frag`]: a later fragment: no transport header.
pub const FRAG_LATER: u8 = 2;

/// The header length in bytes that the IHL nibble of `vhl` states (0..=60), whatever the
/// version nibble says.
#[inline(always)]
pub fn ipv4_hlen(vhl: u8) -> usize {
    ((vhl & 0x0f) as usize) * 4
}

/// The header length of a well-formed IPv4 header (version 4, at least 20 bytes), or None.
#[inline(always)]
pub fn ipv4_valid_hlen(vhl: u8) -> Option<usize> {
    let hlen = ipv4_hlen(vhl);
    if vhl >> 4 != 4 || hlen < IPV4_MIN_HLEN {
        None
    } else {
        Some(hlen)
    }
}

/// The fragment state (`FRAG_*`) of a header whose `frag_off` is `frag_off` (host byte order).
#[inline(always)]
pub fn ipv4_frag(frag_off: u16) -> u8 {
    if frag_off & IP_OFFSET != 0 {
        FRAG_LATER
    } else if frag_off & IP_MF != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

/// Where the transport header starts behind an IPv4 header of `hlen` bytes at offset `ip`.
#[inline(always)]
pub fn l4_offset(ip: usize, hlen: usize) -> usize {
    ip + (hlen & IP_HLEN_MASK)
}

/// Shortest TCP header (no options), bytes.
const TCP_MIN_HLEN: usize = 20;
/// Bytes of a UDP header.
pub const UDP_HLEN: usize = 8;
/// Bytes of an ICMP header (type, code, checksum, four more: the echo identifier and sequence).
const ICMP_HLEN: usize = 8;

/// The TCP header length the data offset nibble of `doff_res` states, if a TCP header can be
/// that long.
#[inline(always)]
pub fn tcp_hlen(doff_res: u8) -> Result<usize, DropReason> {
    let doff = ((doff_res >> 4) as usize) * 4;
    if doff < TCP_MIN_HLEN {
        return Err(DropReason::BadTcpOffset);
    }
    Ok(doff)
}

/// The ethertype of the frame, host byte order.
#[inline(always)]
pub fn ethertype<P: Packet>(pkt: &P) -> Result<u16, DropReason> {
    let eth: *const EthHdr = ptr_at(pkt, 0)?;
    Ok(u16::from_be(unsafe { (*eth).proto }))
}

/// Whether the frame is addressed to a group (multicast or broadcast): the I/G bit of the
/// destination MAC.
#[inline(always)]
pub fn eth_group_dst<P: Packet>(pkt: &P) -> Result<bool, DropReason> {
    let eth: *const EthHdr = ptr_at(pkt, 0)?;
    Ok(unsafe { (*eth).dst[0] } & ETH_GROUP_BIT != 0)
}

/// Whether the frame is IPv4 to a unicast MAC, the only frames whose IPv4 ecsnet counts as a
/// task's own and forwards itself.
#[inline(always)]
pub fn is_unicast_ipv4<P: Packet>(pkt: &P) -> bool {
    matches!(ethertype(pkt), Ok(ETH_P_IP)) && matches!(eth_group_dst(pkt), Ok(false))
}

/// Whether the frame is IPv6 to a unicast MAC.
#[inline(always)]
pub fn is_unicast_ipv6<P: Packet>(pkt: &P) -> bool {
    matches!(ethertype(pkt), Ok(ETH_P_IPV6)) && matches!(eth_group_dst(pkt), Ok(false))
}

/// What a frame on a task interface is. Everything else is an error with its reason: nothing a
/// task sends or receives reaches the kernel around the checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// IPv4; `group` when the destination MAC is broadcast or multicast.
    Ipv4 {
        group: bool,
    },
    Arp,
    Ipv6,
}

/// Sorts a frame on a task interface. A VLAN tag the kernel already moved into the skb counts
/// as much as one in the frame: the bridge forwards it, and the receiving kernel strips a tag of
/// VID 0 and takes what is inside as its own.
#[inline(always)]
pub fn task_frame(ctx: &TcContext) -> Result<Frame, DropReason> {
    // SAFETY: the context pointer of a TC program is a valid __sk_buff.
    if unsafe { (*(ctx.as_ptr() as *const __sk_buff)).vlan_present } != 0 {
        return Err(DropReason::VlanTagged);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked the header is within the frame.
    let (proto, group) = unsafe {
        (
            u16::from_be((*eth).proto),
            (*eth).dst[0] & ETH_GROUP_BIT != 0,
        )
    };
    match proto {
        ETH_P_IP => Ok(Frame::Ipv4 { group }),
        ETH_P_ARP => Ok(Frame::Arp),
        ETH_P_IPV6 => Ok(Frame::Ipv6),
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_OLD => Err(DropReason::VlanTagged),
        _ => Err(DropReason::UnknownEthertype),
    }
}

/// The interface a TC program runs on (the receiving device at ingress, the sending one at egress).
#[inline(always)]
pub fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer of a TC program is a valid __sk_buff.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex }
}

/// The interface an XDP program received the frame on.
#[inline(always)]
pub fn xdp_ifindex(ctx: &XdpContext) -> u32 {
    // SAFETY: the context pointer of an XDP program is a valid xdp_md.
    unsafe { (*(ctx.as_ptr() as *const xdp_md)).ingress_ifindex }
}

/// The lengths of an IPv4 packet, for accounting.
pub struct Ipv4Lengths {
    /// IPv4 header length in bytes (20..=60).
    pub ihl: usize,
    /// Total length from the header, bytes.
    pub tot_len: usize,
    /// Transport header length in bytes when known (TCP data offset, UDP 8), else 0.
    pub l4_hlen: usize,
}

/// Reads the lengths of the IPv4 packet that follows the Ethernet header.
#[inline(always)]
pub fn ipv4_lengths<P: Packet>(pkt: &P) -> Result<Ipv4Lengths, DropReason> {
    let ip: *const Ipv4Hdr = ptr_at(pkt, ETH_HLEN)?;
    // SAFETY: `ptr_at` checked the header is within the frame.
    let (vhl, tot_len, protocol, frag_off) = unsafe {
        (
            (*ip).vhl,
            u16::from_be((*ip).tot_len) as usize,
            (*ip).protocol,
            u16::from_be((*ip).frag_off),
        )
    };
    let ihl = match ipv4_valid_hlen(vhl) {
        Some(ihl) if tot_len >= ihl => ihl,
        _ => return Err(DropReason::BadIpHeader),
    };
    let l4 = ipv4_frag(frag_off) != FRAG_LATER;
    let l4_hlen = match protocol {
        PROTO_TCP if l4 => {
            let tcp: *const TcpHdrStart = ptr_at(pkt, l4_offset(ETH_HLEN, ihl))?;
            // SAFETY: checked by `ptr_at`.
            tcp_hlen(unsafe { (*tcp).doff_res })?
        }
        PROTO_UDP if l4 => UDP_HLEN,
        _ => 0,
    };
    Ok(Ipv4Lengths {
        ihl,
        tot_len,
        l4_hlen,
    })
}

/// ICMP types ecsnet reads.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETERPROB: u8 = 12;

/// An IPv4 packet as the connection table sees it. Addresses and ports are as in the packet
/// (network byte order); for ICMP echo the identifier is in `sport` (request) or `dport` (reply).
#[derive(Clone, Copy)]
pub struct Headers {
    /// Offset of the transport header from the start of the frame.
    pub l4: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    /// `FRAG_*`.
    pub frag: u8,
    /// The IP identification field, as in the packet.
    pub ip_id: u16,
    /// TCP flags byte; 0 for other protocols.
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers, host byte order; 0 for other protocols.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// TCP payload bytes; 0 for other protocols.
    pub tcp_payload: u16,
    /// ICMP type and code; 0 for other protocols.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// IP total length, bytes.
    pub tot_len: u16,
}

impl Headers {
    /// What IPv4 header `iph` says, with the transport header at `l4` still to read: its
    /// fields zero.
    #[inline(always)]
    fn of_ipv4(iph: &Ipv4Hdr, l4: usize, frag: u8) -> Self {
        Headers {
            l4,
            proto: iph.protocol,
            saddr: iph.saddr,
            daddr: iph.daddr,
            sport: 0,
            dport: 0,
            ttl: iph.ttl,
            frag,
            ip_id: iph.id,
            tcp_flags: 0,
            tcp_seq: 0,
            tcp_ack: 0,
            tcp_payload: 0,
            icmp_type: 0,
            icmp_code: 0,
            tot_len: u16::from_be(iph.tot_len),
        }
    }

    /// An ICMP error (unreachable, time exceeded, parameter problem) that quotes another packet.
    #[inline(always)]
    pub fn is_icmp_error(&self) -> bool {
        self.proto == PROTO_ICMP
            && self.frag != FRAG_LATER
            && matches!(
                self.icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
            )
    }
}

/// Parses the IPv4 packet behind the Ethernet header.
#[inline(always)]
pub fn headers(ctx: &TcContext) -> Result<Headers, DropReason> {
    headers_at(ctx, ETH_HLEN)
}

/// Parses the IPv4 header at `ip` and the first bytes of the transport header behind it.
/// Truncated or malformed headers are errors with their reason.
#[inline(always)]
pub fn headers_at(ctx: &TcContext, ip: usize) -> Result<Headers, DropReason> {
    let iph: Ipv4Hdr = load(ctx, ip)?;
    let tot_len = u16::from_be(iph.tot_len);
    let ihl = match ipv4_valid_hlen(iph.vhl) {
        Some(ihl) if tot_len as usize >= ihl => ihl,
        _ => return Err(DropReason::BadIpHeader),
    };
    if (ctx.len() as usize) < ip + tot_len as usize {
        return Err(DropReason::Truncated);
    }
    if !header_checksum_ok(ctx, ip, &iph) {
        return Err(DropReason::BadIpChecksum);
    }
    let frag = ipv4_frag(u16::from_be(iph.frag_off));
    let l4 = l4_offset(ip, ihl);
    let mut h = Headers::of_ipv4(&iph, l4, frag);
    if frag == FRAG_LATER {
        return Ok(h);
    }
    // What the transport header must hold within the packet's total length: its fixed part
    // (TCP: as long as its data offset says). A shorter one is cut, and nothing of it is read
    // or rewritten (RFC 1858's tiny first fragments among them).
    let whole = |hlen: usize| {
        if ihl + hlen > tot_len as usize {
            Err(DropReason::Truncated)
        } else {
            Ok(())
        }
    };
    match iph.protocol {
        PROTO_TCP => {
            let t: TcpHdrStart = load(ctx, l4)?;
            let doff = tcp_hlen(t.doff_res)?;
            whole(doff)?;
            h.sport = t.source;
            h.dport = t.dest;
            h.tcp_flags = t.flags;
            h.tcp_seq = u32::from_be(t.seq);
            h.tcp_ack = u32::from_be(t.ack_seq);
            #[expect(
                clippy::cast_possible_truncation,
                reason = "two header lengths of at most 60 bytes each"
            )]
            let headers = (ihl + doff) as u16;
            h.tcp_payload = tot_len.saturating_sub(headers);
        }
        PROTO_UDP => {
            whole(UDP_HLEN)?;
            let ports: [u16; 2] = load(ctx, l4)?;
            h.sport = ports[0];
            h.dport = ports[1];
        }
        PROTO_ICMP => {
            whole(ICMP_HLEN)?;
            // type, code, checksum, identifier.
            let icmp: [u8; 6] = load(ctx, l4)?;
            h.icmp_type = icmp[0];
            h.icmp_code = icmp[1];
            let id = u16::from_ne_bytes([icmp[4], icmp[5]]);
            match icmp[0] {
                ICMP_ECHO => h.sport = id,
                ICMP_ECHO_REPLY => h.dport = id,
                _ => {}
            }
        }
        _ => {}
    }
    Ok(h)
}

/// Parses the packet quoted in an ICMP error, its IPv4 header at `ip`: like [`headers_at`],
/// but a quote may be cut short after 8 bytes of the transport header (RFC 792), so its total
/// length is not checked against the packet, and only the ports (or the echo identifier) are
/// read behind it. Anything malformed is `BadIcmpError`.
#[inline(always)]
pub fn quoted_headers_at(ctx: &TcContext, ip: usize) -> Result<Headers, DropReason> {
    let iph: Ipv4Hdr = load(ctx, ip).map_err(|_| DropReason::BadIcmpError)?;
    let Some(ihl) = ipv4_valid_hlen(iph.vhl) else {
        return Err(DropReason::BadIcmpError);
    };
    let l4 = l4_offset(ip, ihl);
    let ports: [u16; 4] = load(ctx, l4).map_err(|_| DropReason::BadIcmpError)?;
    let (sport, dport) = match iph.protocol {
        PROTO_TCP | PROTO_UDP => (ports[0], ports[1]),
        // A quoted echo request: type, code, checksum, identifier.
        PROTO_ICMP if u16::from_be(ports[0]) >> 8 == u16::from(ICMP_ECHO) => (ports[2], 0),
        PROTO_ICMP if u16::from_be(ports[0]) >> 8 == u16::from(ICMP_ECHO_REPLY) => (0, ports[2]),
        // Nothing ecsnet tracks: the lookup misses and the error takes the kernel's path.
        _ => (0, 0),
    };
    Ok(Headers {
        sport,
        dport,
        ..Headers::of_ipv4(&iph, l4, FRAG_NONE)
    })
}

/// Longest IPv4 options, bytes.
const MAX_IP_OPTIONS: usize = 40;

/// Whether the IPv4 header `iph` at `ip` sums to 0xffff, options included, as the kernel checks
/// before it takes a packet. The fixed 20 bytes are summed from `iph`; options, rare, are read
/// four bytes at a time. The option count is worked out afresh from the header byte, not from
/// the caller's length: the loop's comparisons then narrow only its own count, and the
/// verifier's paths through everything after meet again.
#[inline(always)]
fn header_checksum_ok(ctx: &TcContext, ip: usize, iph: &Ipv4Hdr) -> bool {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers without padding.
    let words: [u32; 5] = unsafe {
        core::ptr::read_unaligned(core::ptr::from_ref::<Ipv4Hdr>(iph).cast::<[u32; 5]>())
    };
    let mut sum = csum::sum32(&words);
    let option_words = (iph.vhl & 0x0f).saturating_sub(5) as usize;
    for i in 0..MAX_IP_OPTIONS / 4 {
        if i >= option_words {
            break;
        }
        match ctx.load::<u32>(ip + IPV4_MIN_HLEN + i * 4) {
            Ok(w) => sum += u64::from(w),
            Err(_) => return false,
        }
    }
    csum::fold64(sum) == 0xffff
}

/// Whether an IPv4 header at the start of a direct-access packet (XDP) has a good checksum:
/// the fixed header only; a header with options is left to tc, which reads them.
#[inline(always)]
pub fn fixed_header_checksum_ok<P: Packet>(pkt: &P, ip: usize) -> Result<bool, DropReason> {
    let words: *const [u32; 5] = ptr_at(pkt, ip)?;
    // SAFETY: `ptr_at` checked the 20 bytes are within the packet.
    let words = unsafe { core::ptr::read_unaligned(words) };
    Ok(csum::fold64(csum::sum32(&words)) == 0xffff)
}
