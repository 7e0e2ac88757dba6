//! The lab's traffic: the tasks' echo server (`lab serve`) and a probe that sends known
//! messages and checks every echo (`lab probe`), so tests can compare exact counters.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::stats::median;

#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("listen on {proto} port {port}: {source}")]
    Listen {
        proto: &'static str,
        port: u16,
        source: std::io::Error,
    },
    #[error("{proto} {addr}: {source}")]
    Io {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad --at {0:?}: expected NETNS/tcp/PORT or NETNS/udp/PORT")]
    BadAt(String),
    #[error("namespace {netns}: {source}")]
    Netns {
        netns: String,
        source: std::io::Error,
    },
    #[error("{proto} {addr}: echo {got} of {want} bytes did not match what was sent")]
    Mismatch {
        proto: &'static str,
        addr: SocketAddr,
        got: usize,
        want: usize,
    },
}

/// Ports to serve in another namespace than the server's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Elsewhere {
    pub netns: String,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

/// Groups `NETNS/PROTO/PORT` specs (`lab serve --at`) by namespace, in first-seen order.
pub fn parse_elsewhere(specs: &[String]) -> Result<Vec<Elsewhere>, TrafficError> {
    let mut out: Vec<Elsewhere> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for spec in specs {
        let bad = || TrafficError::BadAt(spec.clone());
        let mut parts = spec.rsplitn(3, '/');
        let (Some(port), Some(proto), Some(netns)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        let at = *index.entry(netns.to_owned()).or_insert_with(|| {
            out.push(Elsewhere {
                netns: netns.to_owned(),
                ..Elsewhere::default()
            });
            out.len() - 1
        });
        match proto {
            "tcp" => out[at].tcp.push(port),
            "udp" => out[at].udp.push(port),
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// Serves echo on every port until killed: `tcp` and `udp` in this namespace, and each of
/// `elsewhere` in its own (the sockets are made there and stay there), so that one process
/// serves every task of a lab.
pub fn serve(tcp: &[u16], udp: &[u16], elsewhere: &[Elsewhere]) -> Result<(), TrafficError> {
    let mut threads = serve_here(tcp, udp)?;
    for e in elsewhere {
        let ns = std::fs::File::open(ecsnet::host::netns::path(&e.netns)).map_err(|source| {
            TrafficError::Netns {
                netns: e.netns.clone(),
                source,
            }
        })?;
        let served =
            crate::lab::topology::inside(&ns, || serve_here(&e.tcp, &e.udp)).map_err(|source| {
                TrafficError::Netns {
                    netns: e.netns.clone(),
                    source,
                }
            })?;
        threads.extend(served?);
    }
    println!(
        "serving echo on tcp {tcp:?} udp {udp:?}, and in {} other namespace(s)",
        elsewhere.len()
    );
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Binds every port in the calling thread's namespace and serves each on a thread of its own.
fn serve_here(tcp: &[u16], udp: &[u16]) -> Result<Vec<JoinHandle<()>>, TrafficError> {
    let mut threads = serve_each("tcp", tcp, TcpListener::bind, |l: &TcpListener| {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || echo_tcp(&conn));
        }
    })?;
    threads.extend(serve_each("udp", udp, UdpSocket::bind, echo_udp)?);
    Ok(threads)
}

/// Whether the namespace this process is in has an IPv6 address on any interface: a lab without
/// `--ipv6` turns IPv6 off in every namespace (Docker, with IPv6, turns it on per interface).
fn ipv6_on() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
}

/// Binds a socket on every port and serves each on a thread of its own: dual stack on `[::]`
/// where the namespace has IPv6 on (IPv4 arrives as `::ffff:a.b.c.d`; a namespace's
/// `bindv6only` is 0 unless changed), else on 0.0.0.0 only, so that the port stays free for
/// IPv6 listeners a test opens after turning IPv6 on.
fn serve_each<S: Send + 'static>(
    proto: &'static str,
    ports: &[u16],
    bind: impl Fn(SocketAddr) -> std::io::Result<S>,
    serve: fn(&S),
) -> Result<Vec<JoinHandle<()>>, TrafficError> {
    let mut threads = Vec::new();
    let any = if ipv6_on() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    for &port in ports {
        let socket = match bind(SocketAddr::from((any, port))) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            }
            other => other,
        }
        .map_err(|source| TrafficError::Listen {
            proto,
            port,
            source,
        })?;
        threads.push(std::thread::spawn(move || serve(&socket)));
    }
    Ok(threads)
}

/// Sends every datagram back to where it came from.
fn echo_udp(s: &UdpSocket) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        let _ = s.send_to(&buf[..n], from);
    }
}

/// Echoes what arrives until the peer closes.
pub fn echo_tcp(mut conn: &TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 65536];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// What a probe did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeReport {
    pub protocol: &'static str,
    pub target: String,
    pub messages: u32,
    pub size: usize,
    /// Messages whose echo came back whole and equal.
    pub echoed: u32,
    /// Median round trip, microseconds.
    pub p50_us: u64,
}

/// Message `i`: byte k is the low byte of 31 k + i.
fn pattern(i: u32, size: usize) -> Vec<u8> {
    (0u32..)
        .take(size)
        .map(|k| k.wrapping_mul(31).wrapping_add(i).to_le_bytes()[0])
        .collect()
}

/// What became of one message.
enum Echo {
    /// `n` bytes came back.
    Back(usize),
    /// Nothing came back in time (UDP only: TCP fails instead).
    Lost,
}

/// Sends `messages` messages of `size` bytes one at a time through `round_trip`, which sends
/// one and receives its echo; times each. A TCP echo that differs from what was sent is an
/// error; a UDP datagram that differs or is lost only goes uncounted.
fn exchange(
    proto: &'static str,
    addr: SocketAddr,
    messages: u32,
    size: usize,
    mut round_trip: impl FnMut(&[u8], &mut [u8]) -> Result<Echo, TrafficError>,
) -> Result<ProbeReport, TrafficError> {
    let mut rtts = Vec::new();
    let mut back = vec![0u8; size + 1];
    for i in 0..messages {
        let msg = pattern(i, size);
        let t = Instant::now();
        let echo = round_trip(&msg, &mut back)?;
        let rtt = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
        match echo {
            Echo::Back(n) if back[..n] == msg[..] => rtts.push(rtt),
            Echo::Back(n) if proto == "tcp" => {
                return Err(TrafficError::Mismatch {
                    proto,
                    addr,
                    got: n,
                    want: size,
                });
            }
            Echo::Back(_) | Echo::Lost => {}
        }
    }
    Ok(ProbeReport {
        protocol: proto,
        target: addr.to_string(),
        messages,
        size,
        echoed: u32::try_from(rtts.len()).expect("at most `messages` echoes"),
        p50_us: median(&rtts).unwrap_or(0),
    })
}

fn io_error(proto: &'static str, addr: SocketAddr) -> impl Fn(std::io::Error) -> TrafficError {
    move |source| TrafficError::Io {
        proto,
        addr,
        source,
    }
}

/// What a probe sends: `messages` messages of `size` bytes, one at a time, each waiting at most
/// `timeout` for its echo.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub messages: u32,
    pub size: usize,
    pub timeout: Duration,
}

impl Probe {
    /// Over one TCP connection to `addr`.
    pub fn tcp(self, addr: SocketAddr) -> Result<ProbeReport, TrafficError> {
        probe_tcp(addr, self)
    }

    /// As UDP datagrams to `addr`.
    pub fn udp(self, addr: SocketAddr) -> Result<ProbeReport, TrafficError> {
        probe_udp(addr, self)
    }
}

fn probe_tcp(addr: SocketAddr, p: Probe) -> Result<ProbeReport, TrafficError> {
    let io = io_error("tcp", addr);
    let mut s = TcpStream::connect_timeout(&addr, p.timeout).map_err(&io)?;
    s.set_nodelay(true).map_err(&io)?;
    s.set_read_timeout(Some(p.timeout)).map_err(&io)?;
    let report = exchange("tcp", addr, p.messages, p.size, |msg, back| {
        s.write_all(msg).map_err(&io)?;
        s.read_exact(&mut back[..msg.len()]).map_err(&io)?;
        Ok(Echo::Back(msg.len()))
    })?;
    s.shutdown(std::net::Shutdown::Write).map_err(&io)?;
    // Wait for the server's FIN so the whole close is on the wire before counters are read.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(report)
}

fn probe_udp(addr: SocketAddr, p: Probe) -> Result<ProbeReport, TrafficError> {
    let io = io_error("udp", addr);
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).map_err(&io)?;
    s.connect(addr).map_err(&io)?;
    s.set_read_timeout(Some(p.timeout)).map_err(&io)?;
    exchange("udp", addr, p.messages, p.size, |msg, back| {
        s.send(msg).map_err(&io)?;
        Ok(s.recv(back).map_or(Echo::Lost, Echo::Back))
    })
}
