//! Floods that try to fill the connection table and a blind RST spray (issue 16, items 2 to 4),
//! each run on a lab with ecsnet up and on an identical lab in plain bridge mode (Docker's
//! iptables rules and netfilter's conntrack), with default sizes. After each flood, at +1 s and
//! +20 s, new TCP and UDP flows must succeed on every path, and established connections opened
//! before it must never stall over 1 s; ecsnet must do that and be no worse than bridge mode.
//! After the RST spray an idle masqueraded connection must still carry messages both ways,
//! the server's first: a task's segment after a lost mapping is picked up mid-stream by
//! netfilter (loose TCP pickup, same source port) and goes through, but the server's segment
//! then finds no mapping on the host and the host resets the server's end.
//!
//! Every flood is bounded in count and time and stays in the test's lab: spoofed sources are in
//! 10.10.128.0/17, which the lab's host routes to the client, where replies die (no forwarding,
//! no route; checked before each flood). Floods share the machine's CPUs, so the tests of this
//! file run one at a time, each on fresh labs (a flooded table would blur the next scenario).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{Mutex, PoisonError, mpsc},
    time::{Duration, Instant},
};

use ecsnet_tests::{
    Lab, csum_errors, ecsnet_ok,
    flood::{
        self, FloodReport, Path, Proto, Rng, Watch, WatchReport, assert_contained, dev_packets,
        try_paths,
    },
    in_netns,
    raw::{self, RawIpSocket, TCP_RST, TCP_SYN},
};

/// Floods use the CPUs these checks measure: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Task 1 serves container port 80 over TCP and UDP, published on host port 8080.
const PUBLISH: [&str; 2] = ["1:8080:80/tcp", "1:8080:80/udp"];
const HOST: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const TASK1: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
const PUBLISHED_PORT: u16 = 8080;
const CLIENT_ECHO: u16 = 9000;
/// New flows tried on each path at each check, and the time each gets.
const ATTEMPTS: u32 = 5;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// When the checks run, counted from the end of the flood.
const CHECKS_AT: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(20)];
const MAX_STALL: Duration = Duration::from_secs(1);
/// A flood that has not finished by then is cut off (and the test fails: it was not the flood
/// the scenario describes).
const FLOOD_LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bridge,
    Ecsnet,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bridge => "bridge mode",
            Mode::Ecsnet => "ecsnet",
        }
    }
}

fn lab_for(mode: Mode, prefix: &str, tasks: usize) -> Lab {
    let lab = Lab::up(prefix, tasks, &PUBLISH);
    if mode == Mode::Ecsnet {
        lab.ecsnet_up();
    }
    lab
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Every path a new flow can take: published ports from the client, task 2 to task 1, task 2
/// out through the masquerade to the client's echo.
fn paths(lab: &Lab) -> Vec<Path> {
    let p = |name, ns: &str, proto, target| Path {
        name,
        ns: ns.to_owned(),
        proto,
        target,
    };
    let (client, t2) = (lab.client(), lab.task_ns(2));
    vec![
        p(
            "client->published tcp",
            client,
            Proto::Tcp,
            sa(HOST, PUBLISHED_PORT),
        ),
        p(
            "client->published udp",
            client,
            Proto::Udp,
            sa(HOST, PUBLISHED_PORT),
        ),
        p("task->task tcp", t2, Proto::Tcp, sa(TASK1, 80)),
        p("task->task udp", t2, Proto::Udp, sa(TASK1, 80)),
        p("task->outside tcp", t2, Proto::Tcp, sa(CLIENT, CLIENT_ECHO)),
        p("task->outside udp", t2, Proto::Udp, sa(CLIENT, CLIENT_ECHO)),
    ]
}

/// Checksum errors the kernels of the lab found, summed over its namespaces.
fn lab_csum_errors(lab: &Lab) -> u64 {
    let mut nss = vec![lab.host(), lab.client()];
    nss.extend(lab.status.tasks.iter().map(|t| t.netns.as_str()));
    nss.iter().map(|ns| csum_errors(ns)).sum()
}

/// The instance's `stats --json`.
fn ecsnet_stats(lab: &Lab) -> serde_json::Value {
    let out = ecsnet_ok(&["--instance", &lab.name, "stats", "--json"]);
    serde_json::from_str(&out).expect("stats --json parses")
}

/// The conntrack fill and drop counters of the instance, for the record.
fn ecsnet_summary(v: &serde_json::Value) -> String {
    format!("conntrack {} drops {}", v["conntrack"], v["drops"])
}

/// After a flood of `sent` new flows nobody completed: each was created in the unanswered
/// table, which holds the survivors, and none was assured in its place.
fn assert_flood_stayed_unanswered(v: &serde_json::Value, sent: u64) {
    let c = &v["conntrack"];
    let n = |k: &str| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("conntrack.{k} in {c}"))
    };
    assert!(
        n("created") >= sent,
        "every flood packet opened a flow: {c}"
    );
    assert!(
        n("unansweredEntries") > 0,
        "the flood is in the unanswered table: {c}"
    );
    assert!(
        n("assured") < 1_000,
        "the flood's flows were not assured (only the checks' flows): {c}"
    );
    assert_eq!(
        n("assuredTableFull"),
        0,
        "the assured table never filled: {c}"
    );
}

/// Where the flood is counted arriving: (namespace, interface) whose received packets grow.
struct Inlet {
    ns: String,
    dev: String,
}

struct FloodOutcome {
    mode: Mode,
    flood: FloodReport,
    /// Packets the host's receiving interface counted during the flood.
    arrived: u64,
    csum_errors: u64,
    checks: Vec<(Duration, Vec<(&'static str, u32)>)>,
    watches: Vec<(&'static str, WatchReport)>,
    ecsnet: Option<String>,
    wall: Duration,
}

impl FloodOutcome {
    fn print(&self, scenario: &str) {
        let f = &self.flood;
        println!(
            "[{scenario}] {}: {} of {} sent ({} send errors) in {:.2} s, {} arrived at the host; \
             checksum errors {}; wall {:.1} s",
            self.mode.name(),
            f.sent,
            f.attempted,
            f.failed,
            f.elapsed.as_secs_f64(),
            self.arrived,
            self.csum_errors,
            self.wall.as_secs_f64()
        );
        for (at, results) in &self.checks {
            let line: Vec<String> = results
                .iter()
                .map(|(p, ok)| format!("{p} {ok}/{ATTEMPTS}"))
                .collect();
            println!("    +{}s: {}", at.as_secs(), line.join(", "));
        }
        for (name, w) in &self.watches {
            println!(
                "    established {name}: longest stall {:.2} s over {} round trips{}",
                w.max_stall.as_secs_f64(),
                w.round_trips,
                w.error
                    .as_ref()
                    .map(|e| format!(", failed: {e}"))
                    .unwrap_or_default()
            );
        }
        if let Some(s) = &self.ecsnet {
            println!("    {s}");
        }
    }
}

/// Builds a lab in `mode`, opens the watched connections, runs `send_flood`, and checks every
/// path at each of `CHECKS_AT` after it.
fn flood_run(
    mode: Mode,
    prefix: &str,
    inlet: impl Fn(&Lab) -> Inlet,
    send_flood: impl FnOnce(&Lab) -> FloodReport,
) -> FloodOutcome {
    let started = Instant::now();
    let lab = lab_for(mode, prefix, 3);
    assert_contained(lab.client());
    let paths = paths(&lab);
    for (p, ok) in try_paths(&paths, 2, ATTEMPT_TIMEOUT) {
        assert_eq!(
            ok,
            2,
            "{}: {p} fails before any flood: the lab is broken",
            mode.name()
        );
    }
    let watches = [
        Watch::start("client->published", lab.client(), sa(HOST, PUBLISHED_PORT)),
        Watch::start("task->task", lab.task_ns(2), sa(TASK1, 80)),
        Watch::start("task->outside", lab.task_ns(2), sa(CLIENT, CLIENT_ECHO)),
    ];
    std::thread::sleep(Duration::from_millis(300));
    let inlet = inlet(&lab);
    let csum0 = lab_csum_errors(&lab);
    let rx0 = dev_packets(&inlet.ns, &inlet.dev).0;
    let report = send_flood(&lab);
    let ended = Instant::now();
    let arrived = dev_packets(&inlet.ns, &inlet.dev).0 - rx0;
    let mut checks = Vec::new();
    for at in CHECKS_AT {
        std::thread::sleep((ended + at).saturating_duration_since(Instant::now()));
        checks.push((at, try_paths(&paths, ATTEMPTS, ATTEMPT_TIMEOUT)));
    }
    let watches = watches.into_iter().map(Watch::finish).collect();
    let ecsnet = (mode == Mode::Ecsnet).then(|| {
        let v = ecsnet_stats(&lab);
        assert_flood_stayed_unanswered(&v, report.sent);
        ecsnet_summary(&v)
    });
    let csum_errors = lab_csum_errors(&lab) - csum0;
    drop(lab);
    FloodOutcome {
        mode,
        flood: report,
        arrived,
        csum_errors,
        checks,
        watches,
        ecsnet,
        wall: started.elapsed(),
    }
}

/// Flood `f` (`what`) was the one described: every send attempted before its time limit, at
/// most 1 % of them failing, and at least 90 % of what it sent `arrived` at the host.
fn assert_whole(what: &str, f: &FloodReport, arrived: u64) {
    assert!(
        f.complete && f.failed * 100 <= f.attempted,
        "{what} was cut short ({} sent, {} attempted, {} failed, {:.1} s): not the flood the \
         scenario describes",
        f.sent,
        f.attempted,
        f.failed,
        f.elapsed.as_secs_f64()
    );
    assert!(
        arrived * 10 >= f.sent * 9,
        "{what}: only {arrived} of {} packets reached the host",
        f.sent
    );
}

/// Runs a flood scenario in bridge mode and with ecsnet, prints both, and asserts that the
/// flood was the one described, that ecsnet keeps every path open and every established
/// connection moving, and that it does no worse than bridge mode anywhere.
fn flood_scenario(
    scenario: &str,
    prefix: &str,
    inlet: impl Fn(&Lab) -> Inlet + Copy,
    send_flood: impl Fn(&Lab) -> FloodReport + Copy,
) {
    let _serial = serial();
    let bridge = flood_run(Mode::Bridge, prefix, inlet, send_flood);
    bridge.print(scenario);
    let ecsnet = flood_run(Mode::Ecsnet, prefix, inlet, send_flood);
    ecsnet.print(scenario);

    for o in [&bridge, &ecsnet] {
        let m = o.mode.name();
        assert_whole(&format!("{scenario}, {m}: the flood"), &o.flood, o.arrived);
        assert_eq!(
            o.csum_errors, 0,
            "{scenario}, {m}: kernels of the lab counted checksum errors: the flood's packets \
             are malformed"
        );
    }
    // Every shortfall at once, so one run shows the whole picture.
    let mut failures = Vec::new();
    for ((at, e), (_, b)) in ecsnet.checks.iter().zip(&bridge.checks) {
        for ((path, e_ok), (_, b_ok)) in e.iter().zip(b) {
            if *e_ok < ATTEMPTS || e_ok < b_ok {
                failures.push(format!(
                    "+{}s {path}: {e_ok} of {ATTEMPTS} new flows (bridge mode {b_ok})",
                    at.as_secs()
                ));
            }
        }
    }
    for ((name, e), (_, b)) in ecsnet.watches.iter().zip(&bridge.watches) {
        if e.error.is_some() || e.max_stall > MAX_STALL {
            failures.push(format!(
                "established {name} stalled {:.2} s{} (bridge mode {:.2} s)",
                e.max_stall.as_secs_f64(),
                e.error
                    .as_ref()
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default(),
                b.max_stall.as_secs_f64()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{scenario}: with ecsnet, after the flood:\n  {}",
        failures.join("\n  ")
    );
}

/// Seeds differ per run, so two runs of a scenario do not send the same tuples: the Unix time
/// in nanoseconds, its low 64 bits.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.as_secs()
        .wrapping_mul(1_000_000_000)
        .wrapping_add(u64::from(t.subsec_nanos()))
}

fn host_uplink(lab: &Lab) -> Inlet {
    Inlet {
        ns: lab.host().to_owned(),
        dev: lab.status.host.uplink.clone(),
    }
}

/// Issue 16 item 2: a task sends 70,000 four-byte UDP datagrams, each to a port of the client
/// no other datagram used from its socket (two sockets, ports 1..=35,000 each: a host has only
/// 65,535 ports), through plain sockets and as fast as they go.
#[test]
fn task_udp_to_70k_ports_leaves_every_path_open() {
    const PER_SOCKET: u64 = 35_000;
    flood_scenario(
        "task UDP to 70k ports",
        "fla",
        |lab| Inlet {
            ns: lab.host().to_owned(),
            dev: lab.status.tasks[2].interface.clone(),
        },
        |lab| {
            let socks: Vec<UdpSocket> = (0..2)
                .map(|_| {
                    in_netns(lab.task_ns(3), || UdpSocket::bind(("0.0.0.0", 0)))
                        .expect("udp socket in task 3")
                })
                .collect();
            flood::flood(2 * PER_SOCKET, FLOOD_LIMIT, |i| {
                let port = u16::try_from(i % PER_SOCKET + 1).expect("a port");
                socks[usize::from(i >= PER_SOCKET)]
                    .send_to(b"fl00", sa(CLIENT, port))
                    .map(drop)
            })
        },
    );
}

/// 150,000 packets to the published port from random spoofed sources, each made by `packet`
/// (source, destination), sent from the client through a raw socket.
fn spoofed_to_published(
    lab: &Lab,
    packet: impl Fn(&mut Rng, SocketAddrV4, SocketAddrV4) -> Vec<u8>,
) -> FloodReport {
    let sock = RawIpSocket::open(lab.client());
    let mut rng = Rng::new(seed());
    let dst = SocketAddrV4::new(HOST, PUBLISHED_PORT);
    flood::flood(150_000, FLOOD_LIMIT, |_| {
        let src = SocketAddrV4::new(rng.spoofed_addr(), rng.port());
        sock.send(&packet(&mut rng, src, dst))
    })
}

/// Issue 16 item 3: 150,000 UDP datagrams to the published UDP port from random spoofed
/// sources, sent from the client through a raw socket.
#[test]
fn spoofed_udp_to_a_published_port_leaves_every_path_open() {
    flood_scenario("spoofed UDP", "flb", host_uplink, |lab| {
        spoofed_to_published(lab, |_, src, dst| raw::udp(src, dst, b"fl00"))
    });
}

/// Issue 16 item 3: 150,000 SYNs to the published TCP port from random spoofed sources.
#[test]
fn spoofed_syns_to_a_published_port_leave_every_path_open() {
    flood_scenario("spoofed SYN", "flc", host_uplink, |lab| {
        spoofed_to_published(lab, |rng, src, dst| {
            raw::tcp(src, dst, TCP_SYN, rng.next_u32(), 0, &[])
        })
    });
}

/// The client-side server of the RST scenario: its own listener, so the test sees whether the
/// server's end of the connection was reset.
const RST_SERVER_PORT: u16 = 9100;
/// ecsnet's default tcp-reset timeout, one GC pass of the agent, and a margin.
const PAST_RESET_TIMEOUT: Duration = Duration::from_millis(10_000 + 1_000 + 1_500);

struct RstOutcome {
    mode: Mode,
    spray: FloodReport,
    arrived: u64,
    host_port: u16,
    /// The server's message after the idle time reached the task.
    pushed: bool,
    replies: u32,
    /// How the server's end of the connection ended.
    server: String,
    server_reset: bool,
    ecsnet: Option<String>,
    wall: Duration,
}

/// What the RST scenario's server says: the peer of the connection it accepted (and a clone of
/// that connection), and how the connection ended.
type Accepted = mpsc::Receiver<(SocketAddr, std::io::Result<TcpStream>)>;
type Ended = mpsc::Receiver<Result<String, String>>;

/// The RST scenario's server: an echo server in namespace `ns` on `RST_SERVER_PORT`, for one
/// connection.
fn rst_server(ns: &str) -> (Accepted, Ended) {
    let listener = in_netns(ns, || TcpListener::bind(sa(CLIENT, RST_SERVER_PORT)))
        .expect("listen in the client");
    let (peer_tx, peer_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                let _ = end_tx.send(Err(format!("accept: {e}")));
                return;
            }
        };
        let _ = peer_tx.send((peer, conn.try_clone()));
        let mut buf = [0u8; 64];
        let end = loop {
            match conn.read(&mut buf) {
                Ok(0) => break Ok("closed cleanly by the task".to_owned()),
                Ok(n) => {
                    if let Err(e) = conn.write_all(&buf[..n]) {
                        break Err(format!("send: {e}"));
                    }
                }
                Err(e) => break Err(format!("receive: {e}")),
            }
        };
        let _ = end_tx.send(end);
    });
    (peer_rx, end_rx)
}

fn rst_run(mode: Mode) -> RstOutcome {
    let started = Instant::now();
    let lab = lab_for(mode, "fld", 2);
    assert_contained(lab.client());
    let (peer_rx, end_rx) = rst_server(lab.client());
    let mut conn = in_netns(lab.task_ns(2), || {
        TcpStream::connect_timeout(&sa(CLIENT, RST_SERVER_PORT), Duration::from_secs(3))
    })
    .expect("connect from task 2 to the client");
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let exchange = |conn: &mut TcpStream, tag: u64| -> bool {
        let msg = tag.to_be_bytes();
        let mut back = [0u8; 8];
        conn.write_all(&msg).is_ok() && conn.read_exact(&mut back).is_ok() && back == msg
    };
    assert!(exchange(&mut conn, 0), "{}: first echo failed", mode.name());
    let (peer, server_conn) = peer_rx
        .recv_timeout(Duration::from_secs(3))
        .expect("the server accepted");
    let mut server_conn = server_conn.expect("clone the server's connection");
    let SocketAddr::V4(peer) = peer else {
        panic!("IPv6 peer {peer}")
    };
    assert_eq!(
        *peer.ip(),
        HOST,
        "{}: the connection is not masqueraded",
        mode.name()
    );
    let host_port = peer.port();
    assert!(
        host_port >= 1024,
        "host port {host_port} is outside the spray"
    );

    // The spray: a RST from the server's address and port to every host port 1024..=65535,
    // each with a random sequence number.
    let sock = RawIpSocket::open(lab.client());
    let mut rng = Rng::new(seed());
    let src = SocketAddrV4::new(CLIENT, RST_SERVER_PORT);
    let (ns, dev) = (lab.host().to_owned(), lab.status.host.uplink.clone());
    let rx0 = dev_packets(&ns, &dev).0;
    let spray = flood::flood(65536 - 1024, FLOOD_LIMIT, |i| {
        let dst = SocketAddrV4::new(HOST, u16::try_from(1024 + i).expect("a port"));
        sock.send(&raw::tcp(src, dst, TCP_RST, rng.next_u32(), 0, &[]))
    });
    let arrived = dev_packets(&ns, &dev).0 - rx0;
    std::thread::sleep(PAST_RESET_TIMEOUT);

    // The server speaks first, as a server pushing data or a keepalive would: that segment
    // needs the host's mapping of the flow.
    let push = *b"push0001";
    let mut got = [0u8; 8];
    let pushed =
        server_conn.write_all(&push).is_ok() && conn.read_exact(&mut got).is_ok() && got == push;
    let replies = (1..=3).filter(|i| exchange(&mut conn, *i)).count();
    let replies = u32::try_from(replies).expect("at most 3");
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let end = end_rx
        .recv_timeout(Duration::from_secs(3))
        .unwrap_or_else(|_| Err("still open 3 s after the task closed it".to_owned()));
    let ecsnet = (mode == Mode::Ecsnet).then(|| {
        let v = ecsnet_stats(&lab);
        // The spray's RST on the connection's own tuple was refused, counted, and ignored.
        assert!(
            v["drops"]["TCP_OUT_OF_WINDOW"].as_u64().unwrap_or(0) >= 1,
            "the RST on the tracked tuple is counted as out of window: {}",
            v["drops"]
        );
        ecsnet_summary(&v)
    });
    drop(lab);
    RstOutcome {
        mode,
        spray,
        arrived,
        host_port,
        pushed,
        replies,
        server_reset: end.is_err(),
        server: end.unwrap_or_else(|e| e),
        ecsnet,
        wall: started.elapsed(),
    }
}

/// Issue 16 item 4: blind RSTs to every host port must not kill an idle masqueraded connection.
/// After ecsnet's reset timeout and a GC pass, the server sends first, then the task sends 3
/// messages and must get 3 echoes, and the server's end must only ever see the task's close.
#[test]
fn idle_masqueraded_connection_survives_a_blind_rst_spray() {
    let _serial = serial();
    let outcomes = [rst_run(Mode::Bridge), rst_run(Mode::Ecsnet)];
    for o in &outcomes {
        println!(
            "[RST spray] {}: {} of {} RSTs sent in {:.2} s, {} arrived at the host; idle \
             connection on host port {}: server's message {}, {} of 3 replies after the spray; \
             server's end: {}; wall {:.1} s{}",
            o.mode.name(),
            o.spray.sent,
            o.spray.attempted,
            o.spray.elapsed.as_secs_f64(),
            o.arrived,
            o.host_port,
            if o.pushed { "delivered" } else { "lost" },
            o.replies,
            o.server,
            o.wall.as_secs_f64(),
            o.ecsnet
                .as_ref()
                .map(|s| format!("\n    {s}"))
                .unwrap_or_default()
        );
    }
    for o in &outcomes {
        let m = o.mode.name();
        assert_whole(&format!("{m}: the RST spray"), &o.spray, o.arrived);
        assert!(
            o.pushed,
            "{m}: after the RST spray the server's message on the idle connection did not \
             reach the task"
        );
        assert_eq!(
            o.replies, 3,
            "{m}: the idle masqueraded connection got {} of 3 replies after the RST spray",
            o.replies
        );
        assert!(
            !o.server_reset,
            "{m}: the server's end of the connection did not survive: {}",
            o.server
        );
    }
}
