//! Bounded floods and the availability checks made around them: raw IPv4 packets with correct
//! header, UDP and TCP checksums; senders stopped by a count and a time limit; new-flow attempts
//! on a path; and an established connection watched for stalls while a flood runs.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::in_netns;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Spoofed sources come from 10.10.128.0/17: outside every subnet of the lab (the uplink is
/// 10.10.0.0/24), so the host routes replies to them to the client, which does not forward
/// and has no route for them: they die there.
pub const SPOOF_NET: Ipv4Addr = Ipv4Addr::new(10, 10, 128, 0);
pub const SPOOF_PREFIX: u32 = 17;

/// The one's-complement sum of `data` as 16-bit big-endian words, added to `acc`.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let (words, rest) = data.as_chunks::<2>();
    for w in words {
        acc += u32::from(u16::from_be_bytes(*w));
    }
    if let [last] = rest {
        acc += u32::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits and complements it: the Internet checksum (RFC 1071).
fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

/// The TCP or UDP checksum of `segment` (its checksum field zero) between `src` and `dst`.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = proto;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    fold(sum16(segment, sum16(&pseudo, 0)))
}

/// An IPv4 packet (20-byte header, DF, TTL 64) around `segment`, header checksum filled in.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, segment: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(20 + segment.len());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&((20 + segment.len()) as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(segment);
    p
}

/// A UDP datagram from `src` to `dst` carrying `payload`, as a whole IPv4 packet.
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::with_capacity(8 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    let c = match l4_checksum(*src.ip(), *dst.ip(), IPPROTO_UDP, &seg) {
        0 => 0xffff,
        c => c,
    };
    seg[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4(*src.ip(), *dst.ip(), IPPROTO_UDP, id, &seg)
}

/// A TCP segment without options or payload, as a whole IPv4 packet.
pub fn tcp_packet(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    id: u16,
    seq: u32,
    ack: u32,
    flags: u8,
) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[5 << 4, flags]);
    seg.extend_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]);
    let c = l4_checksum(*src.ip(), *dst.ip(), IPPROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(*src.ip(), *dst.ip(), IPPROTO_TCP, id, &seg)
}

/// xorshift64*: reproducible randomness for addresses, ports and sequence numbers.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }

    /// A host address of `SPOOF_NET` (not its network or broadcast address).
    pub fn spoofed_addr(&mut self) -> Ipv4Addr {
        let hosts = (1u32 << (32 - SPOOF_PREFIX)) - 2;
        Ipv4Addr::from(u32::from(SPOOF_NET) + 1 + self.next_u32() % hosts)
    }

    /// A port of 1024..=65535.
    pub fn port(&mut self) -> u16 {
        (1024 + self.next_u32() % (65536 - 1024)) as u16
    }
}

/// A raw IPv4 socket (IPPROTO_RAW: the caller writes the IP header) opened in a namespace.
pub struct RawSocket(OwnedFd);

impl RawSocket {
    pub fn open_in(ns: &str) -> Self {
        let fd = in_netns(ns, || {
            // SAFETY: plain socket(2); the descriptor is owned right below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_RAW,
                )
            };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: fd is a new descriptor nobody else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        })
        .unwrap_or_else(|e| panic!("raw socket in {ns}: {e}"));
        RawSocket(fd)
    }

    /// Sends one whole IPv4 packet to the destination written in its header.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let dst = [packet[16], packet[17], packet[18], packet[19]];
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address are valid for the call's duration.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const sa).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// What a flood did.
#[derive(Debug, Clone)]
pub struct FloodReport {
    pub attempted: u64,
    pub sent: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Every one of the `count` sends was attempted before the time limit.
    pub complete: bool,
}

/// Calls `send(i)` for i in 0..count, as fast as it returns, and stops early at `limit`.
pub fn flood(
    count: u64,
    limit: Duration,
    mut send: impl FnMut(u64) -> io::Result<()>,
) -> FloodReport {
    let start = Instant::now();
    let (mut sent, mut failed, mut i) = (0, 0, 0);
    while i < count {
        if i % 1024 == 0 && start.elapsed() > limit {
            break;
        }
        match send(i) {
            Ok(()) => sent += 1,
            Err(_) => failed += 1,
        }
        i += 1;
    }
    FloodReport {
        attempted: i,
        sent,
        failed,
        elapsed: start.elapsed(),
        complete: i == count,
    }
}

/// Fails the test unless packets to spoofed sources die in the client namespace: it must not
/// forward and must have no route for them (so nothing bounces back to the host either).
pub fn assert_contained(client_ns: &str) {
    let fwd = crate::ns_exec(client_ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(
        fwd.trim(),
        "0",
        "{client_ns} forwards: spoofed replies could travel on"
    );
    let probe = Ipv4Addr::from(u32::from(SPOOF_NET) + 1).to_string();
    let out = std::process::Command::new("ip")
        .args(["-n", client_ns, "route", "get", &probe])
        .output()
        .expect("run ip route get");
    assert!(
        !out.status.success(),
        "{client_ns} has a route to the spoofed range: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Packets (received, sent) on interface `dev` of namespace `ns` (/proc/net/dev).
pub fn dev_packets(ns: &str, dev: &str) -> (u64, u64) {
    let text = crate::ns_exec(ns, &["cat", "/proc/net/dev"]);
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == dev {
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            return (f[1], f[9]);
        }
    }
    panic!("no interface {dev} in {ns}");
}

/// The transport of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One new flow: TCP connect and one echo, or one UDP datagram and its echo, within `timeout`.
/// Must run on a thread inside the sender's namespace.
fn new_flow(proto: Proto, target: SocketAddr, timeout: Duration, tag: u32) -> bool {
    let msg = tag.to_be_bytes();
    let mut back = [0u8; 4];
    match proto {
        Proto::Tcp => {
            let start = Instant::now();
            let Ok(mut s) = TcpStream::connect_timeout(&target, timeout) else {
                return false;
            };
            let left = timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1));
            s.set_read_timeout(Some(left)).is_ok()
                && s.write_all(&msg).is_ok()
                && s.read_exact(&mut back).is_ok()
                && back == msg
        }
        Proto::Udp => {
            let Ok(s) = UdpSocket::bind(("0.0.0.0", 0)) else {
                return false;
            };
            s.set_read_timeout(Some(timeout)).is_ok()
                && s.send_to(&msg, target).is_ok()
                && s.recv(&mut back).is_ok_and(|n| n == 4)
                && back == msg
        }
    }
}

/// A path new flows are tried on: from namespace `ns` to `target`.
#[derive(Debug, Clone)]
pub struct Path {
    pub name: &'static str,
    pub ns: String,
    pub proto: Proto,
    pub target: SocketAddr,
}

/// Tries `attempts` new flows on every path, the paths side by side; each attempt gets
/// `timeout`. Returns (path name, successes) in the order given.
pub fn try_paths(paths: &[Path], attempts: u32, timeout: Duration) -> Vec<(&'static str, u32)> {
    let handles: Vec<_> = paths
        .iter()
        .cloned()
        .map(|p| {
            std::thread::spawn(move || {
                let ok = in_netns(&p.ns, move || {
                    (0..attempts)
                        .filter(|i| new_flow(p.proto, p.target, timeout, *i))
                        .count() as u32
                });
                (p.name, ok)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("path thread"))
        .collect()
}

/// An established TCP echo connection exchanging a small message every `EVERY`, and the
/// longest time it went without an echo.
pub struct Watch {
    pub name: &'static str,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<WatchReport>>,
}

#[derive(Debug, Clone)]
pub struct WatchReport {
    pub round_trips: u64,
    /// Longest time between two echoes (or from the last echo to the end of the watch).
    pub max_stall: Duration,
    pub error: Option<String>,
}

const EVERY: Duration = Duration::from_millis(50);

impl Watch {
    /// Connects from `ns` to `target` (panics if that fails: the lab is broken before any flood)
    /// and starts exchanging.
    pub fn start(name: &'static str, ns: &str, target: SocketAddr) -> Self {
        let mut s = in_netns(ns, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(3))
        })
        .unwrap_or_else(|e| panic!("{name}: connect {target} from {ns} before the flood: {e}"));
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last_ok = Instant::now();
            let mut report = WatchReport {
                round_trips: 0,
                max_stall: Duration::ZERO,
                error: None,
            };
            let mut n: u64 = 0;
            'run: while !stop2.load(Ordering::Relaxed) {
                let msg = n.to_be_bytes();
                if let Err(e) = s.write_all(&msg) {
                    report.error = Some(format!("send: {e}"));
                    break;
                }
                let mut back = [0u8; 8];
                let mut got = 0;
                while got < back.len() {
                    if stop2.load(Ordering::Relaxed) {
                        break 'run;
                    }
                    match s.read(&mut back[got..]) {
                        Ok(0) => {
                            report.error = Some("closed by the peer".into());
                            break 'run;
                        }
                        Ok(k) => got += k,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => {
                            report.error = Some(format!("receive: {e}"));
                            break 'run;
                        }
                    }
                }
                if back != msg {
                    report.error = Some("echo differs".into());
                    break;
                }
                report.max_stall = report.max_stall.max(last_ok.elapsed());
                last_ok = Instant::now();
                report.round_trips += 1;
                n += 1;
                std::thread::sleep(EVERY);
            }
            // A connection that failed stalls until the watch ends.
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(EVERY);
            }
            report.max_stall = report.max_stall.max(last_ok.elapsed());
            report
        });
        Watch {
            name,
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> (&'static str, WatchReport) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("a watch finishes once");
        (self.name, thread.join().expect("watch thread"))
    }
}

impl Drop for Watch {
    /// A test that panics mid-flood stops its watches too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_matches_a_known_header() {
        // The commonly quoted example header 192.168.0.1 -> 192.168.0.199, UDP, DF.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
    }

    /// A receiver sums header or pseudo-header and segment, checksum included, to 0xffff.
    fn verifies(p: &[u8]) {
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum");
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, p[9]]);
        pseudo.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo), 0, "transport checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([p[2], p[3]])),
            p.len(),
            "total length"
        );
    }

    #[test]
    fn built_packets_carry_valid_checksums() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 10, 200, 7), 40000);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 1), 8080);
        verifies(&udp_packet(a, b, 1, b"abcd"));
        verifies(&udp_packet(a, b, 2, b"odd"));
        verifies(&tcp_packet(a, b, 3, 0xdead_beef, 0, TCP_SYN));
        verifies(&tcp_packet(b, a, 4, 7, 9, TCP_RST | TCP_ACK));
    }

    #[test]
    fn spoofed_addresses_stay_in_their_range() {
        let mut r = Rng::new(42);
        for _ in 0..10_000 {
            let a = u32::from(r.spoofed_addr());
            assert_eq!(
                a >> (32 - SPOOF_PREFIX),
                u32::from(SPOOF_NET) >> (32 - SPOOF_PREFIX)
            );
            assert!(a & 0x7fff != 0 && a & 0x7fff != 0x7fff);
            assert!(r.port() >= 1024);
        }
    }
}
