//! Finding a task's MAC before it has spoken: one ARP request per task on the bridge. A task that
//! does not answer is handed to the kernel until the datapath learns its MAC from its traffic.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::sys::{
    socket::{setsockopt, sockopt},
    time::TimeVal,
};

const ETH_P_ARP: u16 = 0x0806;

#[derive(Debug, thiserror::Error)]
#[error("ARP on ifindex {ifindex}: {source}")]
pub struct ArpError {
    ifindex: u32,
    source: std::io::Error,
}

/// The size of `T` as the socket calls take it.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("a socket argument is small")
}

fn sockaddr(ifindex: u32, dst: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::sa_family_t::try_from(libc::AF_PACKET).expect("AF_PACKET is 17");
    sll.sll_protocol = ETH_P_ARP.to_be();
    // The kernel's ifindex is an int; ours came from it.
    sll.sll_ifindex = ifindex.cast_signed();
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst);
    sll
}

/// The request's 28 bytes: Ethernet/IPv4, who has `target`, tell `ip` at `mac`.
pub fn request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    p[24..28].copy_from_slice(&target.octets());
    p
}

/// The sender of an ARP reply: (address, MAC).
pub fn reply_sender(p: &[u8]) -> Option<(Ipv4Addr, [u8; 6])> {
    if p.len() < 28 || p[..8] != [0, 1, 8, 0, 6, 4, 0, 2] {
        return None;
    }
    let mac: [u8; 6] = p[8..14].try_into().ok()?;
    let ip = Ipv4Addr::new(p[14], p[15], p[16], p[17]);
    Some((ip, mac))
}

/// Asks for the MACs of `targets` on interface `ifindex` (from `mac`/`ip`) and collects the
/// answers that arrive within `wait`. Targets that do not answer are left out.
pub fn resolve(
    ifindex: u32,
    mac: [u8; 6],
    ip: Ipv4Addr,
    targets: &[Ipv4Addr],
    wait: Duration,
) -> Result<HashMap<Ipv4Addr, [u8; 6]>, ArpError> {
    let err = |source| ArpError { ifindex, source };
    let mut found = HashMap::new();
    if targets.is_empty() {
        return Ok(found);
    }
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let bind = sockaddr(ifindex, [0; 6]);
    let len = socklen::<libc::sockaddr_ll>();
    // SAFETY: bind/sendto/recv with valid pointers and lengths.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const bind).cast(), len) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let bcast = sockaddr(ifindex, [0xff; 6]);
    for t in targets {
        let p = request(mac, ip, *t);
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                (&raw const bcast).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
    }
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 64];
    while found.len() < targets.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let tv = TimeVal::new(
            libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            libc::suseconds_t::from(left.subsec_micros().max(1)),
        );
        // Best effort, as before: a failed set leaves the recv blocking until a reply.
        let _ = setsockopt(&fd, sockopt::ReceiveTimeout, &tv);
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        // Negative: the wait is over (or the socket failed); what came is all there is.
        let Ok(n) = usize::try_from(n) else {
            break;
        };
        if let Some((from, m)) = reply_sender(&buf[..n])
            && targets.contains(&from)
        {
            found.insert(from, m);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_layout() {
        let p = request(
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(172, 17, 0, 1),
            Ipv4Addr::new(172, 17, 0, 2),
        );
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[24..], &[172, 17, 0, 2]);
        assert_eq!(reply_sender(&p), None, "a request is not a reply");
        let mut r = p;
        r[7] = 2;
        assert_eq!(
            reply_sender(&r),
            Some((Ipv4Addr::new(172, 17, 0, 1), [2, 0, 0, 0, 0, 1]))
        );
        assert_eq!(reply_sender(&r[..20]), None);
    }
}
