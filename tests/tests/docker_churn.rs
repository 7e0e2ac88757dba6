//! ecsnet following a real dockerd 20.10 (`up --docker`) while containers come and go (issue
//! 18): 200 start/stop cycles reset no long-lived connection and leave nothing of a gone
//! container in any map, table or link; an address and host port Docker gives again go to
//! the new container clean, with its own rules from its first packet; the agent killed with
//! SIGKILL during churn and dockerd restarted, ecsnet's view converges to Docker's and no
//! flow count is lost; and a container ecsnet has not identified passes nothing under
//! `defaultPolicy: deny`. These tests fail, never skip, when dockerd cannot start.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ecsnet::{kernel::maps, store::paths::InstancePaths};
use ecsnet_common::{drop::DropReason, maps::ROLE_HELD};
use ecsnet_tests::{
    Lab,
    agent::{self, kill_agent},
    churn::{self, Churn, Keeper, Running},
    docker::{self, engine},
    ecsnet_ok,
    raw::{self, RawIpSocket, TCP_ACK, TCP_PSH},
    traffic::{echo, tcp_connect},
    world::{self, all, sg, tcp},
};
use serde_json::Value;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);

fn host(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 10, 0, 1], port))
}

fn at(addr: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((addr, port))
}

/// The IP packets the kernel of container process `pid` received (`Ip: InReceives`).
fn ip_in(pid: i32) -> u64 {
    let snmp = docker::in_container(pid, &["cat", "/proc/net/snmp"]);
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InReceives")
        .expect("InReceives");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Waits (10 s at most) until `task ls` no longer lists container `id`.
fn wait_no_task(lab: &Lab, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while churn::task_ls(lab).contains_key(id) {
        assert!(
            Instant::now() < deadline,
            "{} still a task 10 s after it stopped",
            &id[..12]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- 1. churn ------------------------------------------------------------------------------

/// Two containers that stay ("keep-a" with no group, "keep-b" in sg-keep, which lets in the
/// churn group's members) and a connection from the client to the lab's task1 published on
/// 8080 keep exchanging data through 200 start/stop cycles of containers (every other one in
/// sg-churn, each with a dynamic port reached once from the client); after the last stop
/// ecsnet's view is Docker's with nothing of a gone container left.
#[test]
fn churn_resets_no_connection_and_leaves_nothing() {
    let lab = docker::up("cc", 1, &["1:8080:80"], &[]);
    let groups = [
        sg(
            "sg-keep",
            "keep",
            &[tcp(80, 80, &["172.17.0.0/16", "sg-churn"])],
            &[all(&["0.0.0.0/0"])],
        ),
        sg(
            "sg-churn",
            "churn",
            &[tcp(80, 80, &["sg-keep", "10.10.0.0/24"])],
            &[all(&["0.0.0.0/0"])],
        ),
    ];
    let file = churn::state_file(&lab, "allow", &groups);
    churn::up(&lab, &file, &churn::engine_url(&lab), &[]);
    let a = docker::run(&lab, &churn::spec(&lab.name, "keep-a", &[], &[]));
    let b = docker::run(&lab, &churn::spec(&lab.name, "keep-b", &[], &["sg-keep"]));
    churn::wait_task(&lab, &a);
    churn::wait_task(&lab, &b);
    let (ka, kb) = (
        churn::container(&lab, "keep-a"),
        churn::container(&lab, "keep-b"),
    );
    let t = Duration::from_secs(2);
    let keepers = [
        Keeper::start(
            "keep-a -> keep-b",
            churn::connect_from(ka.pid, at(kb.address, 80), t).expect("keep-a -> keep-b"),
        ),
        Keeper::start(
            "client -> 8080",
            tcp_connect(lab.client(), host(8080), t).expect("client -> task1"),
        ),
    ];

    let started = Instant::now();
    let name = lab.name.clone();
    let cycles = Churn::start(&lab, 200, 4, move |i| {
        let groups: &[&str] = if i % 2 == 0 { &["sg-churn"] } else { &[] };
        churn::spec(&name, &format!("churn{i}"), &[churn::dynamic(80)], groups)
    });
    let done = cycles.join();
    assert_eq!(done, 200, "start/stop cycles");
    eprintln!("200 cycles in {} s", started.elapsed().as_secs());
    for k in &keepers {
        assert!(k.alive(), "a long-lived connection broke during the churn");
    }
    let elapsed = started.elapsed();
    for k in keepers {
        let n = k.finish();
        // One exchange every 20 ms plus its round trip: at least one every 100 ms throughout.
        let want = elapsed.as_millis() / 100;
        assert!(
            u128::from(n) >= want,
            "{n} exchanges in {} s: the connection stalled",
            elapsed.as_secs()
        );
    }
    churn::assert_converged(&lab, Duration::from_secs(10));
    let e = churn::engine_stats(&lab);
    assert!(e.connected && e.apply_errors == 0, "{e:?}");
    assert!(e.events >= 400, "a start and a die of each of 200: {e:?}");
}

// ---- 2. address reuse ----------------------------------------------------------------------

/// A stopped container's address and host port given to a new container in a stricter group
/// (only its friend's group may reach it): the old one's flows, from the peer and from the
/// client, do not reach it and its own rules apply from its first packet, under
/// `defaultPolicy: deny`; between the two, the published port is refused as by Docker alone.
#[test]
fn a_reused_address_and_port_start_clean() {
    let lab = docker::up("cr", 1, &["1:8080:80"], &[]);
    let groups = [
        sg("sg-peer", "peer", &[], &[all(&["0.0.0.0/0"])]),
        sg(
            "sg-old",
            "old",
            &[tcp(80, 80, &["172.17.0.0/16", "10.10.0.0/24"])],
            &[all(&["0.0.0.0/0"])],
        ),
        sg("sg-friend", "friend", &[], &[all(&["0.0.0.0/0"])]),
        sg("sg-strict", "strict", &[tcp(80, 80, &["sg-friend"])], &[]),
    ];
    let file = churn::state_file(&lab, "deny", &groups);
    churn::up(&lab, &file, &churn::engine_url(&lab), &[]);
    let peer_id = docker::run(&lab, &churn::spec(&lab.name, "peer", &[], &["sg-peer"]));
    let friend_id = docker::run(&lab, &churn::spec(&lab.name, "friend", &[], &["sg-friend"]));
    churn::wait_task(&lab, &friend_id);
    let old_id = docker::run(
        &lab,
        &churn::spec(&lab.name, "old", &[churn::fixed(8081, 80)], &["sg-old"]),
    );
    churn::wait_task(&lab, &peer_id);
    churn::wait_task(&lab, &old_id);
    let peer = churn::container(&lab, "peer");
    let old = churn::container(&lab, "old");
    let t = Duration::from_secs(2);
    let mut east = churn::connect_from(peer.pid, at(old.address, 80), t).expect("peer -> old");
    let mut north = tcp_connect(lab.client(), host(8081), t).expect("client -> old");
    for s in [&mut east, &mut north] {
        s.set_read_timeout(Some(t)).unwrap();
        echo(s, b"before").expect("the old container answers");
    }

    engine::stop(&lab.name, "old", 1).expect("docker stop old");
    engine::rm(&lab.name, "old").expect("docker rm old");
    wait_no_task(&lab, &old_id);
    // Gone: nothing of the old address in any table, and its port refused as by Docker.
    churn::assert_converged(&lab, Duration::from_secs(5));
    let refused = tcp_connect(lab.client(), host(8081), t).map(drop);
    assert_eq!(
        refused.as_ref().map_err(std::io::Error::kind),
        Err(ErrorKind::ConnectionRefused),
        "a stopped container's published port: {refused:?}"
    );

    // The peer keeps trying the address while the new container comes.
    let prober = Prober::start(peer.pid, at(old.address, 80));
    let new_id = docker::run(
        &lab,
        &churn::spec(&lab.name, "new", &[churn::fixed(8081, 80)], &["sg-strict"]),
    );
    churn::wait_task(&lab, &new_id);
    let new = churn::container(&lab, "new");
    let reached = prober.finish();
    assert_eq!(
        new.address, old.address,
        "Docker gave the new container another address: the test needs the old one"
    );
    assert!(
        reached.is_empty(),
        "the peer's connections reached the new container, whose group forbids it: {reached:?}"
    );
    let north_from = north.local_addr().expect("the client's end");
    old_flows_do_not_reach(&new, east, north);
    old_segment_does_not_reach(&lab, &new, north_from);

    // Its own rules: its friend may, the peer and the client may not.
    let friend = churn::container(&lab, "friend");
    let mut allowed = churn::connect_from(friend.pid, at(new.address, 80), t)
        .expect("friend -> new, which sg-strict allows");
    allowed.set_read_timeout(Some(t)).unwrap();
    echo(&mut allowed, b"friend").expect("friend -> new echoes");
    let t1 = Duration::from_secs(1);
    for (what, r) in [
        (
            "peer -> new",
            churn::connect_from(peer.pid, at(new.address, 80), t1),
        ),
        ("client -> 8081", tcp_connect(lab.client(), host(8081), t1)),
    ] {
        assert_eq!(
            r.as_ref().map(drop).map_err(std::io::Error::kind),
            Err(ErrorKind::TimedOut),
            "{what}, which sg-strict forbids"
        );
    }
    let s = lab.stats();
    let drops = &s
        .tasks
        .iter()
        .find(|t| t.ifindex == new.ifindex)
        .expect("the new container in stats")
        .drops;
    assert!(
        drops
            .get(DropReason::SgIngress.as_str())
            .copied()
            .unwrap_or(0)
            > 0,
        "{drops:?}"
    );
    churn::assert_converged(&lab, Duration::from_secs(5));
}

/// The old container's connections, used again once the new one has its address and port:
/// the new container's kernel receives nothing of them and no data comes back.
fn old_flows_do_not_reach(new: &Running, mut east: TcpStream, mut north: TcpStream) {
    for (what, s) in [("peer -> old", &mut east), ("client -> old", &mut north)] {
        let before = ip_in(new.pid);
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let sent = s.write_all(b"after");
        let mut buf = [0u8; 16];
        let got = sent.and_then(|()| s.read(&mut buf));
        std::thread::sleep(Duration::from_millis(200));
        let after = ip_in(new.pid);
        assert_eq!(
            after - before,
            0,
            "{what}: the old flow reached the new container ({got:?})"
        );
        // No data: no answer, or the end (FIN or reset) the old container or the host sent
        // before; that nothing came from the new one is the count above.
        assert!(
            !matches!(&got, Ok(n) if *n > 0),
            "{what}: the old flow got {got:?}"
        );
    }
}

/// The next segment of the client's old connection to the published port, sent raw (its
/// socket is often reset by the host once the old container went, and then a write sends
/// nothing): a packet in the middle of a flow ecsnet never saw start, which the new
/// container's group forbids, reaches nothing.
fn old_segment_does_not_reach(lab: &Lab, new: &Running, north: SocketAddr) {
    let SocketAddr::V4(from) = north else {
        panic!("{north} is not IPv4")
    };
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 1), 8081);
    let raw = RawIpSocket::open(lab.client());
    let before = ip_in(new.pid);
    for seq in 0..3 {
        raw.send(&raw::tcp(
            from,
            to,
            TCP_ACK | TCP_PSH,
            1000 + seq * 5,
            7,
            b"after",
        ))
        .expect("send the old flow's segment");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ip_in(new.pid) - before,
        0,
        "the client's old flow ({from} -> {to}) reached the new container"
    );
}

/// Connects to `to` from container process `pid` again and again (300 ms timeout each) on a
/// thread; notes every attempt that got an answer (accepted or refused: a packet reached
/// someone at `to`).
struct Prober {
    stop: Arc<AtomicBool>,
    reached: Arc<Mutex<Vec<String>>>,
    handle: std::thread::JoinHandle<()>,
}

impl Prober {
    fn start(pid: i32, to: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let reached = Arc::new(Mutex::new(Vec::new()));
        let (stop2, reached2) = (stop.clone(), reached.clone());
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            while !stop2.load(Ordering::Relaxed) {
                let r = churn::connect_from(pid, to, Duration::from_millis(300));
                let answered = match &r {
                    Ok(_) => true,
                    Err(e) => e.kind() == ErrorKind::ConnectionRefused,
                };
                if answered {
                    reached2.lock().unwrap().push(format!(
                        "{:?} at {:?}",
                        r.map(drop),
                        started.elapsed()
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Prober {
            stop,
            reached,
            handle,
        }
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("prober");
        self.reached.lock().unwrap().clone()
    }
}

// ---- 3. agent killed, dockerd restarted -------------------------------------------------------

/// The agent killed with SIGKILL during churn (containers start and stop while it is dead) and started
/// again, then dockerd stopped and started again: ecsnet's view converges to Docker's each
/// time, `stats` says the engine is disconnected while dockerd is down, and the datagrams sent
/// while the agent was dead are in the exported records, exactly.
#[test]
fn agent_killed_and_dockerd_restarted_converge_and_lose_no_count() {
    let runs_before = docker::run_dirs_now();
    let lab = docker::up("ck", 1, &["1:8080:80", "1:5353:53/udp"], &[]);
    let file = churn::state_file(&lab, "allow", &[]);
    let url = churn::engine_url(&lab);
    churn::up(&lab, &file, &url, &[]);
    let name = lab.name.clone();
    let cycles = Churn::start(&lab, 60, 3, move |i| {
        churn::spec(&name, &format!("kill{i}"), &[churn::dynamic(80)], &[])
    });
    // One that surely goes while the agent is dead: ecsnet knew it, its veth is gone at `up`.
    let doomed = docker::run(&lab, &churn::spec(&lab.name, "doomed", &[], &[]));
    churn::wait_task(&lab, &doomed);
    cycles.wait_done(10, Duration::from_secs(60));
    let pid = agent::pid(&lab.name).expect("the agent's pid");
    cycles.follow(false);
    kill_agent(pid);
    let at_kill = cycles.done();
    engine::stop(&lab.name, "doomed", 1).expect("docker stop doomed");
    engine::rm(&lab.name, "doomed").expect("docker rm doomed");
    // While it is dead: a known flow through task1's published UDP port, and more churn.
    let udp = lab.probe(lab.client(), "udp", "10.10.0.1:5353", 40, 100);
    assert_eq!(
        udp["echoed"], 40,
        "the datapath forwards with the agent dead: {udp}"
    );
    cycles.wait_done(at_kill + 6, Duration::from_secs(60));
    churn::up(&lab, &file, &url, &[]);
    cycles.follow(true);
    let done = cycles.finish();
    assert!(done >= at_kill + 6, "{done} cycles");
    churn::assert_converged(&lab, Duration::from_secs(15));
    udp_counted_exactly(&lab, 40, 100);

    // dockerd stopped: ecsnet says so and keeps what it knew; started again, it converges.
    engine::stop_dockerd(&lab.name).expect("stop the lab's dockerd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while churn::engine_stats(&lab).connected {
        assert!(
            Instant::now() < deadline,
            "stats still says connected 10 s after dockerd stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = ecsnet_ok(&["--instance", &lab.name, "stats"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("engine:"))
        .unwrap_or("");
    assert!(line.to_lowercase().contains("disconnected"), "{line}");
    engine::start_again(&lab.name, lab.host()).expect("start the lab's dockerd again");
    // Without live-restore Docker stopped its containers: start them again.
    let stopped = docker::docker_ok(&lab, &["ps", "-aq", "--filter", "status=exited"]);
    let mut args = vec!["start"];
    args.extend(stopped.split_whitespace());
    assert!(args.len() > 1, "dockerd stopped no container");
    docker::docker_ok(&lab, &args);
    churn::assert_converged(&lab, Duration::from_secs(20));
    let e = churn::engine_stats(&lab);
    assert!(e.connected && e.reconnects >= 1, "{e:?}");
    assert_eq!(
        lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 3, 64)["echoed"],
        3
    );
    // A dockerd started again is still the lab's to take down, with all it made.
    let footprint = docker::Footprint::of(&lab.name, &runs_before);
    world::down_leaves_nothing(lab);
    assert_eq!(
        footprint.left(),
        Vec::<String>::new(),
        "lab down after a dockerd restart left things behind"
    );
}

/// The exported records of the client's datagrams to task1's UDP port 53 add up to `count`
/// datagrams of `size` bytes, each way (waits up to 10 s for their windows to be exported).
fn udp_counted_exactly(lab: &Lab, count: u64, size: u64) {
    let task1 = churn::container(lab, "task1");
    let want = (count, count * (28 + size));
    let sum = |dir: &str| -> (u64, u64) {
        let f = "${interface-id} ${srcport} ${dstport} ${protocol} ${packets} ${bytes} ${flow-direction}";
        lab.flow_records(f, "")
            .iter()
            .map(|r| {
                |k: &str| match &r[k] {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                }
            })
            .filter(|v| {
                v("interface-id") == task1.interface
                    && v("protocol") == "17"
                    && v("flow-direction") == dir
                    && (v("srcport") == "53" || v("dstport") == "53")
            })
            .fold((0, 0), |(p, b), v| {
                let n = |k: &str| v(k).parse::<u64>().unwrap_or(0);
                (p + n("packets"), b + n("bytes"))
            })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = (sum("ingress"), sum("egress"));
        if got == (want, want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "records of the {count} datagrams sent while the agent was dead (ingress, egress): \
             {got:?}, want {want:?} each"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---- 4. held ports -------------------------------------------------------------------------

/// With `defaultPolicy: deny` and an engine ecsnet cannot reach, a new container's veth is
/// held: nothing gets in or out of it (dropped as UNIDENTIFIED, its kernel receives nothing);
/// once the agent follows the real engine, the same traffic passes under its own group, and a
/// held container that went while the agent was dead leaves nothing behind.
#[test]
fn a_held_container_passes_nothing_until_identified() {
    let lab = docker::up("ch", 1, &["1:8080:80"], &[]);
    let open = [sg(
        "sg-open",
        "open",
        &[all(&["0.0.0.0/0"])],
        &[all(&["0.0.0.0/0"])],
    )];
    let file = churn::state_file(&lab, "deny", &open);
    let nowhere = format!(
        "unix://{}",
        docker::engine::EnginePaths::new(&lab.name)
            .root
            .join("nothing.sock")
            .display()
    );
    churn::up(&lab, &file, &nowhere, &[]);
    assert!(!churn::engine_stats(&lab).connected);
    docker::run(
        &lab,
        &churn::spec(&lab.name, "held", &[churn::fixed(8082, 80)], &["sg-open"]),
    );
    // And one that goes while the agent is dead, held: nobody hears its veth go.
    docker::run(&lab, &churn::spec(&lab.name, "gone", &[], &["sg-open"]));
    let held = churn::container(&lab, "held");
    let gone = churn::container(&lab, "gone");
    let paths = InstancePaths::new(&lab.name);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let rows = maps::read_ifaces(&paths).expect("IFACES");
        let is_held = |c: &Running| {
            rows.iter()
                .any(|(i, r)| *i == c.ifindex && r.role == ROLE_HELD)
        };
        if is_held(&held) && is_held(&gone) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} not held: {rows:?}",
            held.interface
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let before = ip_in(held.pid);
    let t = Duration::from_secs(1);
    let inbound = tcp_connect(lab.client(), host(8082), t).map(drop);
    assert!(inbound.is_err(), "client -> held container: {inbound:?}");
    let outbound = docker::docker(&lab)
        .args(["exec", "held", engine::SERVER, "lab", "probe", "--tcp"])
        .args([&format!("{CLIENT}:9000"), "--count", "1", "--json"])
        .output()
        .expect("docker exec");
    let unidentified = maps::read_drops(&paths)
        .expect("DROPS")
        .get(&(held.ifindex, DropReason::Unidentified as u8))
        .copied()
        .unwrap_or(0);
    assert_eq!(
        ip_in(held.pid) - before,
        0,
        "packets reached the held container"
    );
    assert!(
        !outbound.status.success(),
        "held container -> client: {}",
        String::from_utf8_lossy(&outbound.stdout)
    );
    assert!(unidentified >= 2, "UNIDENTIFIED drops: {unidentified}");

    // The agent on the real engine: the same container identified, its group lets both pass;
    // the one that went meanwhile leaves nothing held.
    kill_agent(agent::pid(&lab.name).expect("the agent's pid"));
    engine::rm(&lab.name, "gone").expect("docker rm -f gone");
    churn::up(&lab, &file, &churn::engine_url(&lab), &[]);
    churn::assert_converged(&lab, Duration::from_secs(10));
    assert_eq!(
        lab.probe(lab.client(), "tcp", "10.10.0.1:8082", 3, 64)["echoed"],
        3
    );
    let out = docker::probe_from(&lab, "held", "tcp", &format!("{CLIENT}:9000"), 2);
    assert_eq!(out["echoed"], 2, "{out}");
}
