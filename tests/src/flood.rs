//! Bounded floods and the availability checks made around them (the packets come from `raw`):
//! senders stopped by a count and a time limit; new-flow attempts
//! on a path; and an established connection watched for stalls while a flood runs.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::in_netns;

/// Spoofed sources come from 10.10.128.0/17: outside every subnet of the lab (the uplink is
/// 10.10.0.0/24), so the host routes replies to them to the client, which does not forward
/// and has no route for them: they die there.
pub const SPOOF_NET: Ipv4Addr = Ipv4Addr::new(10, 10, 128, 0);
pub const SPOOF_PREFIX: u32 = 17;

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
        u16::try_from(1024 + self.next_u32() % (65536 - 1024)).expect("a port is below 65536")
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

/// Calls `send_one(i)` for i in 0..count, as fast as it returns, and stops early at `limit`.
pub fn flood(
    count: u64,
    limit: Duration,
    mut send_one: impl FnMut(u64) -> io::Result<()>,
) -> FloodReport {
    let start = Instant::now();
    let (mut sent, mut failed, mut i) = (0, 0, 0);
    while i < count {
        if i % 1024 == 0 && start.elapsed() > limit {
            break;
        }
        match send_one(i) {
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
                    let ok = (0..attempts)
                        .filter(|i| new_flow(p.proto, p.target, timeout, *i))
                        .count();
                    u32::try_from(ok).expect("at most `attempts`")
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
