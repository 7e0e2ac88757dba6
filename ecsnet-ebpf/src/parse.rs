//! Header parsing: one bounds-checked accessor for packet data and the few headers the datapath
//! reads. Nothing here writes to the packet.

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    programs::{TcContext, XdpContext},
};
use ecsnet_common::DropReason;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// Bytes of a UDP header.
pub const UDP_HLEN: usize = 8;

/// Packet memory of a TC or XDP context.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

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

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// EtherType, network byte order.
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

/// What the datapath needs to know of an IPv4 packet.
pub struct Ipv4 {
    /// IPv4 header length in bytes (20..=60).
    pub ihl: usize,
    /// Total length from the header, bytes.
    pub tot_len: usize,
    /// Transport header length in bytes when known (TCP data offset, UDP 8), else 0.
    pub l4_hlen: usize,
}

/// The EtherType of the frame, host byte order.
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
    Ok(unsafe { (*eth).dst[0] } & 1 == 1)
}

/// Parses the IPv4 header that follows the Ethernet header.
#[inline(always)]
pub fn ipv4<P: Packet>(pkt: &P) -> Result<Ipv4, DropReason> {
    let ip: *const Ipv4Hdr = ptr_at(pkt, ETH_HLEN)?;
    let (vhl, tot_len, protocol, frag_off) = unsafe {
        (
            (*ip).vhl,
            u16::from_be((*ip).tot_len) as usize,
            (*ip).protocol,
            u16::from_be((*ip).frag_off),
        )
    };
    let ihl = ((vhl & 0x0f) as usize) * 4;
    if vhl >> 4 != 4 || ihl < 20 || tot_len < ihl {
        return Err(DropReason::BadIpHeader);
    }
    // Only a first fragment (offset 0) carries the transport header.
    let first = frag_off & 0x1fff == 0;
    let l4_hlen = match protocol {
        IPPROTO_TCP if first => {
            let tcp: *const TcpHdrStart = ptr_at(pkt, ETH_HLEN + ihl_bounded(ihl))?;
            let doff = ((unsafe { (*tcp).doff_res } >> 4) as usize) * 4;
            if doff < 20 {
                return Err(DropReason::BadTcpOffset);
            }
            doff
        }
        IPPROTO_UDP if first => UDP_HLEN,
        _ => 0,
    };
    Ok(Ipv4 {
        ihl,
        tot_len,
        l4_hlen,
    })
}

/// Caps the IPv4 header length so the verifier sees a bounded offset.
#[inline(always)]
fn ihl_bounded(ihl: usize) -> usize {
    ihl & 0x3c
}

/// The interface a TC program runs on (the receiving device at ingress, the sending one at egress).
#[inline(always)]
pub fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer of a TC program is a valid __sk_buff.
    unsafe { (*(ctx.as_ptr() as *const __sk_buff)).ifindex }
}
