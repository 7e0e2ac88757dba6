//! The lab's own traffic: an echo server for the tasks (`lab serve`) and a client that sends a
//! known number of messages of a known size and checks every echo (`lab probe`). Known traffic
//! is what lets tests and the demo compare exact counters.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde::Serialize;

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
    #[error("{proto} {addr}: echo {got} of {want} bytes did not match what was sent")]
    Mismatch {
        proto: &'static str,
        addr: SocketAddr,
        got: usize,
        want: usize,
    },
}

/// Serves echo on every port until killed.
pub fn serve(tcp: &[u16], udp: &[u16]) -> Result<(), TrafficError> {
    let mut threads = Vec::new();
    for &port in tcp {
        let l = TcpListener::bind(("0.0.0.0", port)).map_err(|source| TrafficError::Listen {
            proto: "tcp",
            port,
            source,
        })?;
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                std::thread::spawn(move || echo_tcp(conn));
            }
        }));
    }
    for &port in udp {
        let s = UdpSocket::bind(("0.0.0.0", port)).map_err(|source| TrafficError::Listen {
            proto: "udp",
            port,
            source,
        })?;
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }));
    }
    println!("serving echo on tcp {tcp:?} udp {udp:?}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Echoes what arrives until the peer closes.
pub fn echo_tcp(mut conn: TcpStream) {
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

fn pattern(i: u32, size: usize) -> Vec<u8> {
    (0..size)
        .map(|k| (k as u32).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// One TCP connection, `messages` request/responses of `size` bytes each.
pub fn probe_tcp(
    addr: SocketAddr,
    messages: u32,
    size: usize,
    timeout: Duration,
) -> Result<ProbeReport, TrafficError> {
    let io = |source| TrafficError::Io {
        proto: "tcp",
        addr,
        source,
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut rtts = Vec::new();
    let mut back = vec![0u8; size];
    for i in 0..messages {
        let msg = pattern(i, size);
        let t = Instant::now();
        s.write_all(&msg).map_err(io)?;
        s.read_exact(&mut back).map_err(io)?;
        rtts.push(t.elapsed().as_micros() as u64);
        if back != msg {
            return Err(TrafficError::Mismatch {
                proto: "tcp",
                addr,
                got: back.len(),
                want: size,
            });
        }
    }
    s.shutdown(std::net::Shutdown::Write).map_err(io)?;
    // Wait for the server's FIN so the whole close is on the wire before counters are read.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(ProbeReport {
        protocol: "tcp",
        target: addr.to_string(),
        messages,
        size,
        echoed: messages,
        p50_us: median(rtts),
    })
}

/// `messages` UDP datagrams of `size` bytes, one at a time, each waiting for its echo.
pub fn probe_udp(
    addr: SocketAddr,
    messages: u32,
    size: usize,
    timeout: Duration,
) -> Result<ProbeReport, TrafficError> {
    let io = |source| TrafficError::Io {
        proto: "udp",
        addr,
        source,
    };
    let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(io)?;
    s.connect(addr).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut echoed = 0;
    let mut rtts = Vec::new();
    let mut back = vec![0u8; size + 1];
    for i in 0..messages {
        let msg = pattern(i, size);
        let t = Instant::now();
        s.send(&msg).map_err(io)?;
        if let Ok(n) = s.recv(&mut back)
            && back[..n] == msg[..]
        {
            echoed += 1;
            rtts.push(t.elapsed().as_micros() as u64);
        }
    }
    Ok(ProbeReport {
        protocol: "udp",
        target: addr.to_string(),
        messages,
        size,
        echoed,
        p50_us: median(rtts),
    })
}
