//! `hold-connections tcp ADDR:PORT N SECS` or `hold-connections unix PATH N SECS`: opens up to
//! N idle connections within SECS seconds, prints `CONNECTED FAILED` on one line, and holds them
//! until its stdin closes. A process of its own so a test can hold more connections than one
//! process may have descriptors (the tests cannot raise their hard limit without
//! `CAP_SYS_RESOURCE`). Its soft open-files limit is raised to the hard one. Connects never block
//! on a full backlog: a TCP connect gives up after one second, a Unix one is retried without
//! blocking until the deadline.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use ecsnet_tests::traffic::unix_connect;
use nix::sys::{
    resource::{Resource, getrlimit, setrlimit},
    socket::UnixAddr,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, target, n, secs] = &args[..] else {
        eprintln!("usage: hold-connections tcp|unix TARGET N SECS");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("N is a number");
    let deadline = Instant::now() + Duration::from_secs(secs.parse().expect("SECS is a number"));
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);

    let mut held: Vec<OwnedFd> = Vec::with_capacity(n);
    let mut failed = 0u64;
    match kind.as_str() {
        "tcp" => {
            let addr: SocketAddr = target.parse().expect("ADDR:PORT");
            while held.len() < n && Instant::now() < deadline {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => held.push(s.into()),
                    Err(_) => failed += 1,
                }
            }
        }
        "unix" => {
            let addr = UnixAddr::new(target.as_str()).expect("a socket path");
            while held.len() < n && Instant::now() < deadline {
                match unix_connect(&addr, deadline) {
                    Ok(fd) => held.push(fd),
                    Err(_) => failed += 1,
                }
            }
        }
        other => panic!("unknown kind {other:?}: tcp or unix"),
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{} {failed}", held.len());
    let _ = out.flush();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(held);
}
