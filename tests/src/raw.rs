//! Raw frames for tests that play a hostile task or a hostile wire: Ethernet (tagged or not),
//! ARP, IPv4 (whole or a fragment), TCP and UDP built byte by byte with correct checksums, an
//! `AF_PACKET` socket that sends them from inside a namespace and tells which frames arrived, a
//! raw IPv4 socket, and the link-layer addresses of a namespace.

use std::{
    ffi::CString,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::{
    libc,
    sys::socket::{setsockopt, sockopt},
};

use crate::{in_netns, ns_exec};

/// A link-layer address.
pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];

pub use ecsnet_common::ct::{
    PROTO_TCP as IPPROTO_TCP, PROTO_UDP as IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
pub use ecsnet_lab::fixture::packet::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_LOCAL_EXPERIMENTAL,
};

const ETH_P_ALL: u16 = 0x0003;
/// Shortest Ethernet frame without its FCS, in bytes.
pub const ETH_MIN_LEN: usize = 60;

pub const TCP_PSH: u8 = 0x08;

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// One VLAN tag: its TPID and its TCI (priority, DEI and VLAN id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub tpid: u16,
    pub tci: u16,
}

impl Tag {
    /// An 802.1Q (customer) tag of VLAN `vid`, priority 0.
    pub const fn dot1q(vid: u16) -> Self {
        Tag {
            tpid: ETH_P_8021Q,
            tci: vid & 0x0fff,
        }
    }

    /// An 802.1ad (service) tag of VLAN `vid`, priority 0.
    pub const fn dot1ad(vid: u16) -> Self {
        Tag {
            tpid: ETH_P_8021AD,
            tci: vid & 0x0fff,
        }
    }
}

/// Two tags of VID 0, 802.1ad outside 802.1Q: the kernel takes the outer one off before tc
/// sees the frame (which then reads 0x8100), and a receiving kernel strips both and takes
/// what is inside as untagged.
pub const DOUBLE_VID0: [Tag; 2] = [Tag::dot1ad(0), Tag::dot1q(0)];

/// The multicast MAC of IPv4 group `group`: 01:00:5e and its low 23 bits.
pub fn ipv4_multicast_mac(group: Ipv4Addr) -> Mac {
    let o = group.octets();
    [0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]]
}

/// An Ethernet frame `dst` <- `src` with `tags` (outermost first) and `ethertype`, padded with
/// zeros to the 60-byte minimum.
pub fn ethernet(dst: Mac, src: Mac, tags: &[Tag], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for t in tags {
        f.extend_from_slice(&t.tpid.to_be_bytes());
        f.extend_from_slice(&t.tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < ETH_MIN_LEN {
        f.resize(ETH_MIN_LEN, 0);
    }
    f
}

/// An IPv6 frame from `src` to `dst`: an `ICMPv6` echo request between two link-local
/// addresses, for checks that judge IPv6 by its `EtherType` alone.
pub fn ipv6_frame(dst: Mac, src: Mac) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, 58, 64];
    ip.extend([
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x42, 0xac, 0xff, 0xfe, 0x11, 0, 2,
    ]);
    ip.extend([
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x42, 0xac, 0xff, 0xfe, 0x11, 0, 3,
    ]);
    ip.extend([128, 0, 0, 0, 0, 1, 0, 1]);
    ethernet(dst, src, &[], ETH_P_IPV6, &ip)
}

/// An ARP packet for IPv4 over Ethernet (28 bytes): operation `op`, sender and target hardware
/// and protocol addresses.
pub fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    // Hardware type Ethernet, protocol IPv4, address lengths 6 and 4.
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa.octets());
    p
}

/// Adds `data` to a running ones'-complement sum, as 16-bit big-endian words (an odd last byte
/// is padded with zero).
fn sum_words(mut acc: u64, data: &[u8]) -> u64 {
    let (words, rest) = data.as_chunks::<2>();
    for w in words {
        acc += u64::from(u16::from_be_bytes(*w));
    }
    if let [last] = rest {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum to 16 bits and complements it.
fn finish(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !u16::try_from(acc).expect("folded to 16 bits")
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum_words(0, data))
}

/// The TCP or UDP checksum of `segment` (its checksum field zero) between `src` and `dst`.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut acc = sum_words(0, &src.octets());
    acc = sum_words(acc, &dst.octets());
    acc += u64::from(protocol);
    acc += segment.len() as u64;
    finish(sum_words(acc, segment))
}

/// Don't Fragment, in the flags and fragment offset word of an IPv4 header.
const IP_DF: u16 = 0x4000;
/// More Fragments, likewise.
const IP_MF: u16 = 0x2000;

/// An IPv4 packet `src` -> `dst` of `protocol` around `payload`: a 20-byte header, DF, TTL 64,
/// id 0, with its checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, protocol, 0, IP_DF, payload)
}

/// One fragment of an IPv4 datagram `src` -> `dst` of `protocol` with IP id `id`: `payload`
/// at `offset` units of 8 bytes, More Fragments set when `more`; TTL 64, with its checksum.
pub fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    assert!(offset < 0x2000, "a fragment offset has 13 bits");
    let flags = if more { IP_MF } else { 0 };
    ipv4_with(src, dst, protocol, id, flags | offset, payload)
}

/// An IPv4 packet with a 20-byte header: `frag` is its flags and fragment offset word.
fn ipv4_with(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("an IPv4 packet fits 65535 bytes");
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&frag.to_be_bytes());
    // TTL 64, protocol, checksum (below).
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv4 UDP datagram `src` -> `dst` carrying `payload`, both checksums set.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("a UDP datagram fits 65535 bytes");
    let mut seg = Vec::with_capacity(usize::from(len));
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&len.to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    let sum = match l4_checksum(*src.ip(), *dst.ip(), IPPROTO_UDP, &seg) {
        // Zero means "no checksum" in UDP; all ones is the same value.
        0 => 0xffff,
        s => s,
    };
    seg[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv4(*src.ip(), *dst.ip(), IPPROTO_UDP, &seg)
}

/// An IPv4 TCP segment `src` -> `dst` with `flags` (`TCP_*`), `seq`, `ack`, a 64240-byte window,
/// no options and `payload`, both checksums set.
pub fn tcp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    // Data offset 5 words, flags, window, checksum (below), urgent pointer.
    seg.extend_from_slice(&[5 << 4, flags]);
    seg.extend_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]);
    seg.extend_from_slice(payload);
    let sum = l4_checksum(*src.ip(), *dst.ip(), IPPROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(*src.ip(), *dst.ip(), IPPROTO_TCP, &seg)
}

/// What an untagged IPv4 frame carries, read back: (source, destination, TCP flags) when it is
/// TCP.
pub fn parse_tcp(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, u8)> {
    if frame.len() < 14 + 20 + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != IPPROTO_TCP || ip.len() < ihl + 20 {
        return None;
    }
    let addr = |a: &[u8], p: &[u8]| {
        SocketAddrV4::new(
            Ipv4Addr::new(a[0], a[1], a[2], a[3]),
            u16::from_be_bytes([p[0], p[1]]),
        )
    };
    let t = &ip[ihl..];
    Some((
        addr(&ip[12..16], &t[0..2]),
        addr(&ip[16..20], &t[2..4]),
        t[13],
    ))
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A payload no other frame of this process carries, to recognise a frame where it lands.
pub fn marker(what: &str) -> Vec<u8> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "ecsnet-marker-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// The MAC of `dev` in namespace `ns`.
pub fn mac_of(ns: &str, dev: &str) -> Mac {
    let out = ns_exec(ns, &["cat", &format!("/sys/class/net/{dev}/address")]);
    parse_mac(out.trim())
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(s: &str) -> Mac {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("not a MAC address: {s}")))
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| panic!("not a MAC address: {s}"))
}

/// `m` as `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The link-layer address namespace `ns` has for `addr` on `dev`, if any.
pub fn neighbour(ns: &str, dev: &str, addr: Ipv4Addr) -> Option<Mac> {
    let a = addr.to_string();
    let out = ns_exec(ns, &["ip", "-j", "neigh", "show", "to", &a, "dev", dev]);
    let v: serde_json::Value =
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
            .unwrap_or_else(|e| panic!("ip -j neigh in {ns}: {e}: {out}"));
    v[0]["lladdr"].as_str().map(parse_mac)
}

/// Removes namespace `ns`'s entry for `addr` on `dev`.
pub fn forget_neighbour(ns: &str, dev: &str, addr: Ipv4Addr) {
    let a = addr.to_string();
    ns_exec(ns, &["ip", "neigh", "flush", "to", &a, "dev", dev]);
}

/// A socket of the calling thread's namespace, owned as soon as it exists.
fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the descriptor it returns is owned by nothing else.
    unsafe {
        let fd = libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// `size_of::<A>()` as a socket address length.
fn addr_len<A>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<A>()).expect("a socket address is small")
}

/// An address family as a `sockaddr`'s family field.
fn family(af: libc::c_int) -> libc::sa_family_t {
    libc::sa_family_t::try_from(af).expect("an address family fits its field")
}

/// Sends `data` whole to `addr` (a `sockaddr_*` of the socket's family) on `fd`.
fn send_to<A>(fd: &OwnedFd, data: &[u8], addr: &A) -> io::Result<()> {
    // SAFETY: sendto reads `data.len()` bytes of `data` and `size_of::<A>()` bytes of `addr`.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            0,
            std::ptr::from_ref(addr).cast(),
            addr_len::<A>(),
        )
    };
    if usize::try_from(n).ok() != Some(data.len()) {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `sll_pkttype` of a frame the interface sent rather than received.
const PACKET_OUTGOING: u8 = 4;

/// An `AF_PACKET` socket on one interface of a namespace: sends frames exactly as given, and sees
/// every frame the interface receives from the moment it opened (taps run before tc ingress, so
/// on a task's own side of a veth it sees what arrived, not what ecsnet let in).
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    /// "ns/dev", for messages.
    pub name: String,
}

impl PacketSocket {
    /// Opens one on `dev` in namespace `ns`; panics with a message when it cannot.
    pub fn open(ns: &str, dev: &str) -> Self {
        let name = format!("{ns}/{dev}");
        let c_dev = CString::new(dev).expect("an interface name has no NUL");
        let opened = in_netns(ns, move || -> io::Result<(OwnedFd, i32)> {
            // Protocol 0 receives nothing until bound, so no other interface's frames queue.
            let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
            // SAFETY: plain calls with valid, correctly sized arguments.
            unsafe {
                let ifindex = libc::if_nametoindex(c_dev.as_ptr());
                let Ok(ifindex) = i32::try_from(ifindex) else {
                    return Err(io::Error::other(format!("ifindex {ifindex}")));
                };
                if ifindex == 0 {
                    return Err(io::Error::last_os_error());
                }
                // Room for every frame of a test (root may exceed rmem_max); best effort.
                let _ = setsockopt(&fd, sockopt::RcvBufForce, &(8 << 20));
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = family(libc::AF_PACKET);
                sll.sll_protocol = ETH_P_ALL.to_be();
                sll.sll_ifindex = ifindex;
                if libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    addr_len::<libc::sockaddr_ll>(),
                ) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok((fd, ifindex))
            }
        });
        let (fd, ifindex) =
            opened.unwrap_or_else(|e| panic!("open an AF_PACKET socket on {name}: {e}"));
        PacketSocket { fd, ifindex, name }
    }

    /// Sends `frame` (from its destination MAC on) out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        assert!(frame.len() >= 14, "a frame has at least an Ethernet header");
        // SAFETY: all zeroes is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = family(libc::AF_PACKET);
        sll.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        send_to(&self.fd, frame, &sll)
    }

    /// Sends `frame`; panics with a message when the kernel refuses it.
    pub fn send_ok(&self, frame: &[u8]) {
        self.send(frame)
            .unwrap_or_else(|e| panic!("send a raw frame on {}: {e}", self.name));
    }

    /// The next frame within `wait` that went the way asked (sent from the interface when
    /// `sent`, else received on it); frames the other way are consumed and skipped.
    fn next(&self, buf: &mut [u8], wait: Duration, sent: bool) -> Option<usize> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if ready <= 0 {
                if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return None;
            }
            // SAFETY: recvfrom writes at most `buf.len()` bytes and a sockaddr_ll of the given
            // length.
            let (n, pkttype) = unsafe {
                let mut from: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = addr_len::<libc::sockaddr_ll>();
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &raw mut len,
                );
                (n, from.sll_pkttype)
            };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                panic!("receive on {}: {e}", self.name);
            };
            if (pkttype == PACKET_OUTGOING) == sent {
                return Some(n);
            }
        }
    }

    fn first(&self, wait: Duration, sent: bool, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = self.next(&mut buf, left, sent)?;
            if wanted(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
    }

    /// The first frame received within `wait` that `wanted` accepts; the frames before it are
    /// consumed.
    pub fn wait_for(&self, wait: Duration, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        self.first(wait, false, wanted)
    }

    /// The first frame sent from the interface within `wait` that `wanted` accepts; the frames
    /// before it are consumed.
    pub fn wait_for_sent(&self, wait: Duration, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        self.first(wait, true, wanted)
    }

    /// Throws away every frame queued so far.
    pub fn drain(&self) {
        self.first(Duration::ZERO, false, |_| false);
        self.first(Duration::ZERO, true, |_| false);
    }

    /// Whether a frame carrying `marker` is received within `wait`.
    pub fn saw(&self, marker: &[u8], wait: Duration) -> bool {
        self.wait_for(wait, |f| contains(f, marker)).is_some()
    }
}

/// A raw IPv4 socket of a namespace (`IPPROTO_RAW`, header included): sends IPv4 packets as
/// given, routed by the namespace (source addresses are not checked: spoofing is the point).
pub struct RawIpSocket {
    fd: OwnedFd,
    /// The namespace, for messages.
    pub ns: String,
}

impl RawIpSocket {
    pub fn open(ns: &str) -> Self {
        let opened = in_netns(ns, || {
            socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)
        });
        let fd = opened.unwrap_or_else(|e| panic!("open a raw IPv4 socket in {ns}: {e}"));
        RawIpSocket {
            fd,
            ns: ns.to_owned(),
        }
    }

    /// Sends the IPv4 packet `packet` towards its destination address.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        assert!(packet.len() >= 20, "an IPv4 packet has at least a header");
        let dst = [packet[16], packet[17], packet[18], packet[19]];
        // SAFETY: all zeroes is a valid sockaddr_in.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = family(libc::AF_INET);
        sin.sin_addr.s_addr = u32::from_ne_bytes(dst);
        send_to(&self.fd, packet, &sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ones'-complement sum over a whole header or pseudo-header and segment is all ones
    /// when its checksum is right.
    fn verifies(acc: u64) -> bool {
        finish(acc) == 0
    }

    #[test]
    fn ipv4_header_checksum_matches_a_known_header() {
        // A well-known example header (UDP, 192.168.0.1 -> 192.168.0.199), checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verifies(sum_words(0, &h)));
        let built = ipv4(
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
            IPPROTO_UDP,
            &[0; 0x73 - 20],
        );
        assert_eq!(built[..20], h);
    }

    #[test]
    fn odd_lengths_pad_the_last_byte_with_zero() {
        assert_eq!(checksum(&[0x12]), !0x1200);
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), !(0x1234 + 0x5600));
        // Carries fold back in.
        assert_eq!(checksum(&[0xff, 0xff, 0x00, 0x01]), !0x0001);
    }

    fn pseudo_sum(p: &[u8]) -> u64 {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let mut acc = sum_words(0, &p[12..20]);
        acc += u64::from(p[9]);
        acc += (p.len() - ihl) as u64;
        sum_words(acc, &p[ihl..])
    }

    #[test]
    fn udp_and_tcp_checksums_verify_over_the_pseudo_header() {
        let a = SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 2), 40001);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 2), 9000);
        let big = vec![0xff; 60_001];
        for payload in [
            &b""[..],
            b"x",
            b"odd-length payload",
            b"even-length pay",
            &big[..],
        ] {
            let u = udp(a, b, payload);
            assert_ne!(u[26..28], [0, 0], "UDP checksum 0 means none");
            let t = tcp(a, b, TCP_SYN, 0x0102_0304, 0, payload);
            for (p, l4, l4_header) in [(u, "UDP", 8), (t, "TCP", 20)] {
                assert_eq!(p.len(), 20 + l4_header + payload.len());
                assert!(
                    verifies(sum_words(0, &p[..20])),
                    "IPv4 header of {:02x?}",
                    &p[..20]
                );
                assert!(
                    verifies(pseudo_sum(&p)),
                    "{l4} checksum of {:02x?}",
                    &p[..20 + l4_header]
                );
            }
        }
    }

    #[test]
    fn frames_carry_their_tags_in_order_and_parse_back() {
        let (dst, src) = ([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
        let a = SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 2), 40001);
        let b = SocketAddrV4::new(Ipv4Addr::new(172, 17, 0, 3), 80);
        let pkt = tcp(a, b, TCP_SYN, 1, 0, b"");
        let f = ethernet(dst, src, &DOUBLE_VID0, ETH_P_IP, &pkt);
        assert_eq!(f[12..22], [0x88, 0xa8, 0, 0, 0x81, 0x00, 0, 0, 0x08, 0x00]);
        assert_eq!(f[22..], pkt);
        assert_eq!(parse_tcp(&f), None, "a tagged frame is not plain IPv4");
        let plain = ethernet(dst, src, &[], ETH_P_IP, &pkt);
        assert_eq!(parse_tcp(&plain), Some((a, b, TCP_SYN)));
        let small = ethernet(
            BROADCAST,
            src,
            &[],
            ETH_P_ARP,
            &arp(ARP_REQUEST, src, *a.ip(), [0; 6], *b.ip()),
        );
        assert_eq!(small.len(), ETH_MIN_LEN);
        assert_eq!(small[14..22], [0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(
            ipv4_multicast_mac(Ipv4Addr::new(239, 129, 2, 3)),
            [0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]
        );
    }
}
