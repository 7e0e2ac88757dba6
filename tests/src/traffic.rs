//! Sockets in a lab's namespaces and the exchanges tests make over them: TCP connections and
//! echoes, UDP sockets and what they receive, a ping, and Unix connections that never block.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket},
};

use crate::{in_netns, ns_exec};

/// A TCP connection from namespace `ns` to `to`, given up after `timeout`.
pub fn tcp_connect(ns: &str, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_netns(ns, move || TcpStream::connect_timeout(&to, timeout))
}

/// Sends `msg` on an echo connection and reads as many bytes back; an error when they differ.
pub fn echo(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"));
    }
    Ok(())
}

/// A UDP socket of namespace `ns` bound to `bind`, connected to `peer` when given.
pub fn udp(ns: &str, bind: &str, peer: Option<&str>) -> UdpSocket {
    let (bind, peer) = (bind.to_owned(), peer.map(str::to_owned));
    let what = format!("udp {bind} -> {peer:?} in {ns}");
    in_netns(ns, move || {
        let s = UdpSocket::bind(&bind)?;
        if let Some(p) = peer {
            s.connect(&p)?;
        }
        Ok::<_, io::Error>(s)
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The sender of the first datagram `rx` receives within `wait` that `wanted` accepts; the
/// datagrams before it are consumed.
pub fn udp_wait(
    rx: &UdpSocket,
    wait: Duration,
    wanted: impl Fn(&[u8]) -> bool,
) -> Option<SocketAddr> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        rx.set_read_timeout(Some(left)).expect("set a read timeout");
        match rx.recv_from(&mut buf) {
            Ok((n, from)) if wanted(&buf[..n]) => return Some(from),
            // Another datagram (a stale echo, say): keep waiting for this one.
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// One `ping` from namespace `ns` to `addr`, which must be answered.
pub fn ping(ns: &str, addr: Ipv4Addr) {
    let out = ns_exec(ns, &["ping", "-n", "-c", "1", "-W", "2", &addr.to_string()]);
    assert!(
        out.contains(" 0% packet loss"),
        "ping {addr} from {ns}: {out}"
    );
}

/// A connection to a Unix socket that never blocks on a full backlog: retried until `deadline`.
pub fn unix_connect(addr: &UnixAddr, deadline: Instant) -> Result<OwnedFd, Errno> {
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match connect(fd.as_raw_fd(), addr) {
            Ok(()) => return Ok(fd),
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}
