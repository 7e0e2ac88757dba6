//! The benchmark's own load (SPEC §9): request/response and new-connection TCP clients and
//! their server, run in a lab namespace as `ecsnet-lab --netns NS bench rr|crr|serve`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("listen on tcp port {port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("tcp {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tcp {addr}: the server closed the connection")]
    Closed { addr: SocketAddr },
    #[error("--seconds, --size and --threads must be at least 1")]
    Usage,
    #[error("--cpu {cpu}: {source}")]
    Pin { cpu: usize, source: nix::Error },
}

/// Keeps this process (and the threads it starts later) on one CPU. The benchmark pins the
/// request/response client and its server to the same CPU: across CPUs, a round trip on this
/// 2-vCPU VM waits for the other vCPU to wake from idle (some 50 us, more than the path costs),
/// so the number would measure the hypervisor rather than the datapath.
pub fn pin_to(cpu: usize) -> Result<(), LoadError> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)
        .map_err(|source| LoadError::Pin { cpu, source })?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|source| LoadError::Pin { cpu, source })
}

/// Sets the socket's TCP congestion control (`TCP_CONGESTION`): as root any algorithm the kernel
/// has, whatever the host's default and allowed list.
fn set_congestion(s: &impl std::os::fd::AsFd, name: &str) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        s,
        nix::sys::socket::sockopt::TcpCongestion,
        &std::ffi::OsString::from(name),
    )
    .map_err(std::io::Error::from)
}

/// Accepting threads per port: enough for the clients' concurrency, each serving its
/// connection inline (no thread per connection, whose start-up would dominate a short one).
const SERVER_THREADS: usize = 4;

/// A listener on `[::]:port` for IPv6 only (`IPV6_V6ONLY`), so that one on 0.0.0.0 can hold
/// the same port for IPv4: IPv4 clients meet the same sockets whether the namespace has IPv6
/// or not.
fn listen_ipv6_only(port: u16) -> std::io::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt,
    };
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let any = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn6::from(any),
    )?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// Serves echo on `rr_port` (until the client closes) and one reply per connection on
/// `crr_port`, until killed: on 0.0.0.0, and with `ipv6` on `[::]` too.
pub fn serve(
    rr_port: Option<u16>,
    crr_port: Option<u16>,
    congestion: Option<&str>,
    ipv6: bool,
) -> Result<(), LoadError> {
    let mut threads = Vec::new();
    let ports = [(rr_port, false), (crr_port, true)];
    let families: &[bool] = if ipv6 { &[false, true] } else { &[false] };
    let ports = ports
        .into_iter()
        .filter_map(|(p, once)| Some((p?, once)))
        .flat_map(|(p, once)| families.iter().map(move |&v6| (p, once, v6)));
    for (port, once, v6) in ports {
        let l = if v6 {
            listen_ipv6_only(port)
        } else {
            TcpListener::bind(("0.0.0.0", port))
        }
        .map_err(|source| LoadError::Listen { port, source })?;
        if let Some(cc) = congestion {
            set_congestion(&l, cc).map_err(|source| LoadError::Listen { port, source })?;
        }
        for _ in 0..SERVER_THREADS {
            let l = l
                .try_clone()
                .map_err(|source| LoadError::Listen { port, source })?;
            threads.push(std::thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    if once {
                        reply_once(conn);
                    } else {
                        crate::traffic::echo_tcp(&conn);
                    }
                }
            }));
        }
    }
    println!("serving rr on tcp {rr_port:?}, crr on tcp {crr_port:?}, ipv6 {ipv6}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// One request, its echo, and then the client's close: the server never holds the `TIME_WAIT`.
fn reply_once(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 4096];
    if let Ok(n @ 1..) = conn.read(&mut buf)
        && conn.write_all(&buf[..n]).is_ok()
    {
        let _ = conn.read(&mut buf);
    }
}

/// Round trips of one connection, nanoseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RrResult {
    pub requests: u64,
    pub seconds: f64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

/// How long a client waits to connect, and for a reply.
const TIMEOUT: Duration = Duration::from_secs(2);

/// A client connection as both clients open one: no Nagle, `TIMEOUT` to connect and to wait
/// for a reply, and the run's congestion control.
fn connect(addr: SocketAddr, congestion: Option<&str>) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    if let Some(cc) = congestion {
        set_congestion(&s, cc)?;
    }
    Ok(s)
}

/// A client's server, run length and congestion control: the arguments `bench rr` and `bench
/// crr` share, parsed by the CLI and written by the benchmark that runs them.
#[derive(Debug, Clone, clap::Args)]
pub struct Client {
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, default_value_t = 1)]
    pub seconds: u64,
    /// TCP congestion control of the client's connections.
    #[arg(long)]
    pub congestion: Option<String>,
}

impl Client {
    /// The same as command-line arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--to".to_owned(),
            self.to.to_string(),
            "--seconds".to_owned(),
            self.seconds.to_string(),
        ];
        if let Some(cc) = &self.congestion {
            args.extend(["--congestion".to_owned(), cc.clone()]);
        }
        args
    }

    /// A client runs at least a second, with at least one byte (rr) or thread (crr).
    fn at_least_one(&self, count: usize) -> Result<(), LoadError> {
        if self.seconds == 0 || count == 0 {
            return Err(LoadError::Usage);
        }
        Ok(())
    }
}

/// Round trips not recorded at the start: the first ones pay for cold caches and ARP.
const WARM_UP: u32 = 200;

/// Request/response on one TCP connection to `addr` for `seconds`: `size` bytes out, the same
/// back, one at a time; every round trip goes into the histogram.
pub fn rr(client: &Client, size: usize) -> Result<RrResult, LoadError> {
    client.at_least_one(size)?;
    let addr = client.to;
    let io = |source| LoadError::Io { addr, source };
    let mut s = connect(addr, client.congestion.as_deref()).map_err(io)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut round_trip = |s: &mut TcpStream| -> Result<u64, LoadError> {
        let t0 = Instant::now();
        s.write_all(&msg).map_err(io)?;
        s.read_exact(&mut back).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => LoadError::Closed { addr },
            _ => io(e),
        })?;
        Ok(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX))
    };
    for _ in 0..WARM_UP {
        round_trip(&mut s)?;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .expect("constant histogram bounds are valid");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(client.seconds);
    while Instant::now() < deadline {
        let ns = round_trip(&mut s)?;
        h.saturating_record(ns.max(1));
    }
    Ok(RrResult {
        requests: h.len(),
        seconds: start.elapsed().as_secs_f64(),
        p50_ns: h.value_at_quantile(0.50),
        p90_ns: h.value_at_quantile(0.90),
        p99_ns: h.value_at_quantile(0.99),
        p999_ns: h.value_at_quantile(0.999),
        max_ns: h.max(),
    })
}

/// New connections, each with one round trip.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CrrResult {
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
    pub per_second: f64,
}

/// `threads` loops of connect, 1-byte request, reply, RST close to `addr` for `seconds`.
///
/// The client closes with an RST (`SO_LINGER` 0): no side keeps a `TIME_WAIT` socket, so a run
/// cannot run out of client ports, and both Docker's conntrack and ecsnet's see a reset flow
/// (10 s) rather than a closed one (120 s, 30 s) that would fill their tables during a long
/// benchmark.
pub fn crr(client: &Client, threads: usize) -> Result<CrrResult, LoadError> {
    client.at_least_one(threads)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(client.seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (addr, cc) = (client.to, client.congestion.clone());
            std::thread::spawn(move || crr_loop(addr, deadline, cc.as_deref()))
        })
        .collect();
    let (mut connections, mut failures) = (0, 0);
    for w in workers {
        let (ok, failed) = w.join().expect("a crr thread does not panic");
        connections += ok;
        failures += failed;
    }
    let secs = start.elapsed().as_secs_f64();
    #[expect(
        clippy::cast_precision_loss,
        reason = "a run counts far fewer than 2^52 connections"
    )]
    let per_second = connections as f64 / secs;
    Ok(CrrResult {
        connections,
        failures,
        seconds: secs,
        per_second,
    })
}

fn crr_loop(addr: SocketAddr, deadline: Instant, congestion: Option<&str>) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    while Instant::now() < deadline {
        match one_connection(addr, congestion) {
            Ok(()) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    (ok, failed)
}

fn one_connection(addr: SocketAddr, congestion: Option<&str>) -> std::io::Result<()> {
    let mut s = connect(addr, congestion)?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let fd = std::os::fd::AsFd::as_fd(&s);
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The client and server against each other run in the benchmark test, inside a lab:
    // tests send no traffic in namespaces they did not create.
    #[test]
    fn zero_seconds_size_or_threads_is_a_usage_error() {
        let addr: SocketAddr = ([192, 0, 2, 1], 9).into();
        let client = |seconds| Client {
            to: addr,
            seconds,
            congestion: None,
        };
        assert!(matches!(rr(&client(0), 64), Err(LoadError::Usage)));
        assert!(matches!(rr(&client(1), 0), Err(LoadError::Usage)));
        assert!(matches!(crr(&client(1), 0), Err(LoadError::Usage)));
    }
}
