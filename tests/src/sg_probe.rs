//! Security-group probes for the tests of rules with real traffic (`policy`, `policy_ipv6`):
//! the state applied with groups, echo servers on more ports of a task, and a probe (a TCP
//! connection, a UDP datagram, a ping; IPv4 or IPv6, as its address is) that must get through
//! with nothing dropped, or be dropped and counted once with its reason on the task it belongs
//! to, and nowhere else.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    Background, Lab, Stats,
    counters::{self, flows},
    ecsnet_bin, in_netns,
    traffic::{echo, tcp_connect},
    world::{self, state_with_groups},
};

// ---------------------------------------------------------------------------------------------
// State files.

/// How long a probe that should get through may take.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a probe that should be dropped is given before it counts as dropped.
pub const REJECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Drop reasons: rejected by the receiver's inbound rules, by the sender's outbound rules.
pub const IN: &str = "SG_INGRESS";
pub const OUT: &str = "SG_EGRESS";

/// `ecsnet apply -f` of a whole state file.
pub fn apply(lab: &Lab, s: &Value) {
    world::apply(lab, "policy.json", s);
}

/// Applies the lab's state file with `groups` and, for task i+1, the groups `members[i]`.
pub fn apply_groups(lab: &Lab, groups: &[Value], members: &[&[&str]]) {
    apply(lab, &state_with_groups(lab, groups, members));
}

// ---------------------------------------------------------------------------------------------
// Servers and probes.

/// `ecsnet lab serve` (TCP and UDP echo) on more ports of a task, once it answers.
pub fn serve(ns: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Background {
    let bin = ecsnet_bin().display().to_string();
    let mut args = vec![bin, "lab".to_owned(), "serve".to_owned()];
    for p in tcp_ports {
        args.extend(["--tcp".to_owned(), p.to_string()]);
    }
    for p in udp_ports {
        args.extend(["--udp".to_owned(), p.to_string()]);
    }
    let arg_strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Background::start(ns, &arg_strs, Duration::ZERO);
    wait_for_echo(ns, tcp_ports, udp_ports);
    server
}

/// Waits until echo servers answer on these ports on the loopback of `ns` (which never
/// crosses a task's interface, so ecsnet's counters do not see it).
pub fn wait_for_echo(ns: &str, tcp_ports: &[u16], udp_ports: &[u16]) {
    let (tcp_ports, udp_ports) = (tcp_ports.to_vec(), udp_ports.to_vec());
    let ready = in_netns(ns, move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let up = |tcp: bool, port: u16| {
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            if tcp {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            } else {
                udp_roundtrip(addr, Duration::from_millis(200)).is_ok()
            }
        };
        let all = tcp_ports
            .iter()
            .map(|p| (true, *p))
            .chain(udp_ports.iter().map(|p| (false, *p)));
        for (tcp, port) in all {
            while !up(tcp, port) {
                if Instant::now() > deadline {
                    return Err(format!("{} {port}", if tcp { "tcp" } else { "udp" }));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    });
    if let Err(port) = ready {
        panic!("the echo server in {ns} never answered on {port}");
    }
}

/// One datagram to `addr` and its echo, on a connected socket (so an ICMP port unreachable
/// shows as "refused", not as a drop).
pub fn udp_roundtrip(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let any: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any)?;
    s.connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    let msg = b"ecsnet policy probe";
    s.send(msg)?;
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf)?;
    if &buf[..n] != msg {
        return Err(std::io::Error::other(format!(
            "echo from {addr} differs: {:?}",
            &buf[..n]
        )));
    }
    Ok(())
}

/// Traffic a test sends from a namespace.
#[derive(Clone, Copy, Debug)]
pub enum Probe<'a> {
    /// A TCP connection to an echo server and one round trip on it.
    Tcp(&'a str),
    /// One UDP datagram to an echo server and its echo.
    Udp(&'a str),
    /// One ICMP echo request (`ping -c 1`) and its reply.
    Ping(&'a str),
}

pub use Probe::{Ping, Tcp, Udp};

impl Probe<'_> {
    pub fn is_tcp(&self) -> bool {
        matches!(self, Tcp(_))
    }
}

/// Runs `probe` from `ns`: Ok when it got through, Err(why) when it did not. `expect_pass`
/// picks the timeout; a rejection must look like a drop (a timeout), never a refusal.
pub fn run(ns: &str, probe: Probe, expect_pass: bool) -> Result<(), String> {
    let timeout = if expect_pass {
        PASS_TIMEOUT
    } else {
        REJECT_TIMEOUT
    };
    match probe {
        Tcp(addr) => {
            let addr: SocketAddr = addr.parse().expect("a socket address");
            let mut s = tcp_connect(ns, addr, timeout)
                .map_err(|e| format!("connect: {e} ({:?})", e.kind()))?;
            s.set_read_timeout(Some(PASS_TIMEOUT)).unwrap();
            echo(&mut s, &[0x5a_u8; 200]).map_err(|e| format!("connected, but no echo: {e}"))
        }
        Udp(addr) => {
            let addr: SocketAddr = addr.parse().expect("a socket address");
            in_netns(ns, move || {
                udp_roundtrip(addr, timeout).map_err(|e| format!("udp: {e} ({:?})", e.kind()))
            })
        }
        Ping(addr) => {
            let wait = timeout.as_secs().to_string();
            let out = Command::new("ip")
                .args([
                    "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", &wait, addr,
                ])
                .stdin(Stdio::null())
                .output()
                .expect("run ping (apt-get install iputils-ping; ./x test installs it)");
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() {
                Ok(())
            } else if out.status.code() == Some(1) && text.contains(" 0 received") {
                Err("no echo reply".to_owned())
            } else {
                panic!(
                    "ping {addr} from {ns} failed to run ({}): {text}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Every drop counter of a stats snapshot ("taskN REASON" and "uplink REASON"), checked to add
/// up to the top-level drops.
pub fn drops(s: &Stats) -> BTreeMap<String, u64> {
    let out = counters::drops(s);
    let total_tasks_and_uplink: u64 = out.values().sum();
    let total: u64 = s.drops.values().sum();
    assert_eq!(
        total, total_tasks_and_uplink,
        "the top-level drops {:?} are not the sum of the tasks' and the uplink's {out:?}",
        s.drops
    );
    out
}

/// The drop counters that changed from `a` to `b`.
pub fn drops_diff(a: &Stats, b: &Stats) -> BTreeMap<String, u64> {
    let (a, b) = (drops(a), drops(b));
    b.iter()
        .filter_map(|(k, n)| {
            let before = a.get(k).copied().unwrap_or(0);
            assert!(*n >= before, "drop counter {k} went down: {before} -> {n}");
            (*n > before).then(|| (k.clone(), n - before))
        })
        .collect()
}

/// `probe` from `ns` gets through, and nothing is dropped meanwhile.
pub fn pass(lab: &Lab, ns: &str, probe: Probe, what: &str) {
    let before = lab.stats();
    if let Err(e) = run(ns, probe, true) {
        panic!("{what}: {probe:?} from {ns} should be allowed, but: {e}");
    }
    let diff = drops_diff(&before, &lab.stats());
    assert!(
        diff.is_empty(),
        "{what}: {probe:?} got through, yet drops were counted: {diff:?}"
    );
}

/// `probe` from `ns` is dropped, and counted once (a TCP connect may retransmit its SYN once
/// within the timeout) as `reason` on task number `task`, and nothing else is counted. Returns
/// the stats from just before and just after.
pub fn reject(
    lab: &Lab,
    ns: &str,
    probe: Probe,
    (task, reason): (usize, &str),
    what: &str,
) -> (Stats, Stats) {
    let before = lab.stats();
    match run(ns, probe, false) {
        Ok(()) => panic!("{what}: {probe:?} from {ns} got through, but should be rejected"),
        Err(e) if probe.is_tcp() && !e.contains("TimedOut") => {
            panic!("{what}: {probe:?} from {ns} should be dropped (a timeout), but: {e}")
        }
        Err(e) if !probe.is_tcp() && e.contains("refused") => {
            panic!("{what}: {probe:?} from {ns} reached the task (refused), but: {e}")
        }
        Err(_) => {}
    }
    let after = lab.stats();
    let diff = drops_diff(&before, &after);
    let key = format!("task{task} {reason}");
    let n = diff.get(&key).copied().unwrap_or(0);
    let max = if probe.is_tcp() { 2 } else { 1 };
    assert!(
        (1..=max).contains(&n) && diff.len() == 1,
        "{what}: {probe:?} from {ns} was not counted as {reason} on task{task} (and only there): \
         drop counters changed by {diff:?}"
    );
    (before, after)
}

/// What a probe must do: get through (`pass`), or be rejected and counted as the reason on
/// task N (`reject`).
#[derive(Clone, Copy, Debug)]
pub enum Want {
    Pass,
    Reject(usize, &'static str),
}

pub use Want::{Pass, Reject};

/// Each case in turn: the probe from the namespace must do what is wanted.
pub fn expect(lab: &Lab, cases: &[(&str, Probe, Want, &str)]) {
    for &(ns, probe, want, what) in cases {
        match want {
            Pass => pass(lab, ns, probe, what),
            Reject(task, reason) => {
                reject(lab, ns, probe, (task, reason), what);
            }
        }
    }
}

/// The stats' flows of `kind` are at least `n`.
pub fn assert_flows(s: &Stats, kind: &str, n: u64, what: &str) {
    assert!(
        flows(s, kind) >= n,
        "{what}: want {n} {kind} flow(s): {:?}",
        s.conntrack
    );
}
