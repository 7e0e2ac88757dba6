//! The real-engine lab (`lab up --docker`): a real dockerd 20.10 of the lab's own makes docker0
//! and runs ECS-labelled containers; without ecsnet it is Docker's own bridge mode (published
//! ports, task to task, masquerade, hairpin), `lab down` leaves nothing of it, and the imitation
//! lab's rules are the real dockerd's line for line. These tests fail, never skip, when dockerd
//! cannot start.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ecsnet_lab::lab::{LabStatus, LabTask};
use ecsnet_tests::{
    Lab, docker, ecsnet_bin, ecsnet_ok, leftovers, ns_exec, require_root, rule_packets,
    traffic::tcp_connect, unique, world,
};
use serde_json::Value;

const ECS_LABELS: [&str; 5] = [
    "com.amazonaws.ecs.task-arn",
    "com.amazonaws.ecs.container-name",
    "com.amazonaws.ecs.task-definition-family",
    "com.amazonaws.ecs.task-definition-version",
    "com.amazonaws.ecs.cluster",
];

/// Docker's dynamic host ports: the lab host's `ip_local_port_range`.
const DYNAMIC: std::ops::RangeInclusive<u16> = 32768..=60999;

/// The one object `ip -j ... link show ...` prints.
fn link(json: &str) -> Value {
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("ip -j: {e}: {json}"));
    v[0].clone()
}

/// The host ports Docker says it bound on 0.0.0.0 for `container`: "CONTAINERPORT/proto" ->
/// host port.
fn docker_ports(lab: &Lab, container: &str) -> BTreeMap<String, u16> {
    docker::docker_ok(lab, &["port", container])
        .lines()
        .filter_map(|l| {
            let (inside, outside) = l.split_once(" -> ")?;
            let port = outside.strip_prefix("0.0.0.0:")?;
            Some((inside.to_owned(), port.parse().ok()?))
        })
        .collect()
}

#[test]
fn docker_lab_is_docker_bridge_mode_and_goes_away() {
    let runs_before = docker::run_dirs_now();
    let lab = docker::up(
        "ld",
        3,
        &["1:8080:80", "2:0:80", "2:5353:53/udp", "3:0:54/udp"],
        &[],
    );
    let s = docker::status(&lab);
    let d = &s.docker;
    assert_eq!(d.version, "20.10.24+dfsg1", "Debian's docker.io");
    assert!(d.userland_proxy, "Docker's default");
    assert!(d.socket.starts_with("unix:///run/ecsnet/"), "{}", d.socket);
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", d.pid)).unwrap_or_default();
    assert_eq!(comm.trim(), "dockerd", "docker.pid {} is dockerd", d.pid);
    assert_eq!(s.lab.host.bridge, "docker0");
    assert_eq!(s.lab.tasks.len(), 3, "{:?}", s.lab.tasks);
    assert_eq!(d.containers.len(), 3);
    // The state file carries the host; the engine is the source of tasks.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(&s.lab.state_file).unwrap()).unwrap();
    assert_eq!(state["host"]["bridge"], "docker0");
    assert_eq!(state["tasks"], serde_json::json!([]));

    for (t, c) in s.lab.tasks.iter().zip(&d.containers) {
        task_is_a_labelled_container(&lab, t, c);
    }
    let ports = |i: usize| &s.lab.tasks[i].port_mappings;
    assert_eq!(ports(0)[0].to_string(), "8080->80/tcp");
    let dyn_tcp = ports(1)
        .iter()
        .find(|p| p.container_port == 80)
        .unwrap()
        .host_port;
    let dyn_udp = ports(2)[0].host_port;
    assert!(DYNAMIC.contains(&dyn_tcp), "{dyn_tcp}");
    assert!(DYNAMIC.contains(&dyn_udp), "{dyn_udp}");

    docker_paths(&lab, &s.lab, dyn_tcp, dyn_udp);
    late_container(&lab, dyn_tcp);

    // Down: nothing of it is left, inside or outside its namespaces.
    let footprint = docker::Footprint::of(&lab.name, &runs_before);
    assert!(
        footprint.pids.len() >= 5,
        "dockerd, containerd, shims: {footprint:?}"
    );
    world::down_leaves_nothing(lab);
    assert_eq!(
        footprint.left(),
        Vec::<String>::new(),
        "lab down left things behind"
    );
}

#[test]
fn down_cleans_a_half_built_docker_lab() {
    require_root();
    let runs_before = docker::run_dirs_now();
    let name = unique("lh");
    let lab_bin = ecsnet_bin().with_file_name("ecsnet-lab");
    let mut up = Command::new(&lab_bin)
        .args(["lab", "up", "--docker", "--name", &name, "--tasks", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ecsnet-lab lab up");
    // Killed while Docker makes its first container: dockerd runs, the lab is half built.
    let containers = docker::engine::EnginePaths::new(&name)
        .data_root()
        .join("containers");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&containers).map_or(true, |mut d| d.next().is_none()) {
        let done = up.try_wait().expect("wait for lab up");
        assert!(
            done.is_none() && Instant::now() < deadline,
            "lab up --docker made no container in 30 s (exit {done:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    up.kill().expect("kill lab up");
    up.wait().expect("reap lab up");
    let footprint = docker::Footprint::of(&name, &runs_before);
    assert!(!footprint.pids.is_empty(), "its dockerd runs");
    ecsnet_ok(&["lab", "down", "--name", &name]);
    assert_eq!(leftovers(&name), Vec::<String>::new());
    assert_eq!(footprint.left(), Vec::<String>::new());
}

/// `iptables-save` of a namespace without its comments and counters, each run of one
/// container's port rules in sorted order: dockerd writes a container's ports in an order of
/// its own that differs from run to run (they come from a Go map), and rules of different
/// ports never match the same packet, so their order means nothing.
fn rules(ns: &str) -> Vec<String> {
    saved_rules(ns, "iptables-save")
}

/// The same for `save` (`iptables-save` or `ip6tables-save`).
fn saved_rules(ns: &str, save: &str) -> Vec<String> {
    let mut lines: Vec<String> = ns_exec(ns, &[save])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.rsplit_once(" [") {
            Some((chain, _)) if l.starts_with(':') => chain.to_owned(),
            _ => l.to_owned(),
        })
        .collect();
    for run in lines.chunk_by_mut(|a, b| a.contains("--dport") && b.contains("--dport")) {
        run.sort();
    }
    lines
}

/// docker0's `route_localnet` and the hairpin setting of every bridge port of a lab host.
fn bridge_settings(ns: &str) -> (String, Vec<String>) {
    let localnet = ns_exec(
        ns,
        &["cat", "/proc/sys/net/ipv4/conf/docker0/route_localnet"],
    );
    let ports: Value = serde_json::from_str(&ns_exec(ns, &["bridge", "-j", "-d", "link", "show"]))
        .expect("bridge -j");
    let hairpin = ports
        .as_array()
        .expect("a list of ports")
        .iter()
        .map(|p| format!("{} hairpin {}", p["master"], p["hairpin"]))
        .collect();
    (localnet.trim().to_owned(), hairpin)
}

#[test]
fn imitation_rules_are_dockerds_without_userland_proxy() {
    let publish = ["1:8080:80", "2:0:80", "2:5353:53/udp"];
    let real = docker::up("lr", 2, &publish, &["--userland-proxy", "false"]);
    let imitation = Lab::up("li", 2, &publish);
    assert!(!docker::status(&real).docker.userland_proxy);
    assert_eq!(rules(real.host()), rules(imitation.host()));
    let (real_localnet, real_ports) = bridge_settings(real.host());
    assert_eq!(
        real_localnet, "1",
        "dockerd sets route_localnet without the proxy"
    );
    assert_eq!(real_ports.len(), 2);
    assert_eq!(
        (real_localnet, real_ports),
        bridge_settings(imitation.host())
    );
    // And both pick the same dynamic port.
    let real_ports: Vec<String> = docker::status(&real).lab.tasks[1]
        .port_mappings
        .iter()
        .map(ToString::to_string)
        .collect();
    let imitation_ports: Vec<String> = imitation.status.tasks[1]
        .port_mappings
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut sorted = imitation_ports.clone();
    sorted.sort_by_key(|p| p.split("->").next().map(|h| h.parse::<u16>().unwrap_or(0)));
    assert_eq!(real_ports, sorted);

    // Docker's default, with its proxy, is the other mode: what the imitation does not copy.
    let default = docker::up("lp", 1, &["1:8080:80"], &[]);
    let r = rules(default.host());
    for line in [
        "-A DOCKER -i docker0 -j RETURN",
        "-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80",
        "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
    ] {
        assert!(r.iter().any(|l| l == line), "no {line:?} in {r:#?}");
    }
    assert_eq!(
        bridge_settings(default.host()),
        ("0".to_owned(), vec!["\"docker0\" hairpin false".to_owned()])
    );
    let out = ecsnet_ok(&["lab", "status", "--name", &default.name]);
    assert!(out.contains("userland-proxy true"), "{out}");
}

#[test]
fn imitation_ip6tables_rules_are_dockerds_without_userland_proxy() {
    let publish = ["1:8080:80", "2:0:80", "2:5353:53/udp"];
    let real = docker::up(
        "lr6",
        2,
        &publish,
        &["--userland-proxy", "false", "--ipv6", "nat"],
    );
    let imitation = Lab::up_v6("li6", 2, &publish, "nat");
    let real_rules = saved_rules(real.host(), "ip6tables-save");
    assert!(
        real_rules
            .iter()
            .any(|l| l.contains("--to-destination [fd00:172:17::242:ac11:2]:80")),
        "dockerd wrote NAT66 for the published port: {real_rules:#?}"
    );
    assert_eq!(real_rules, saved_rules(imitation.host(), "ip6tables-save"));
    // IPv4 as without --ipv6: the same lines as the imitation's.
    assert_eq!(rules(real.host()), rules(imitation.host()));
    let addresses = |s: &LabStatus| -> Vec<String> {
        s.tasks
            .iter()
            .map(|t| format!("{} {:?}", t.address, t.address6))
            .collect()
    };
    assert_eq!(
        addresses(&docker::status(&real).lab),
        addresses(&imitation.status)
    );
}

/// Task `t` of the status is container `c`: ECS labels, the host veth a port of docker0 and
/// the peer of the container's eth0, its address, its ports as Docker bound them.
fn task_is_a_labelled_container(lab: &Lab, t: &LabTask, c: &docker::LabContainer) {
    assert_eq!(t.name, c.task);
    assert!(t.netns.is_empty(), "a container has no named namespace");
    for l in ECS_LABELS {
        assert!(
            c.labels.contains_key(l),
            "{} lacks {l}: {:?}",
            c.name,
            c.labels
        );
    }
    assert_eq!(c.labels["com.amazonaws.ecs.container-name"], t.name);
    assert_eq!(c.labels["com.amazonaws.ecs.cluster"], lab.name);
    // The host veth is docker0's port, and the peer of the container's eth0 (and back).
    let veth = link(&ns_exec(
        lab.host(),
        &["ip", "-j", "link", "show", &t.interface],
    ));
    let eth0 = link(&docker::in_container(
        c.pid,
        &["ip", "-j", "link", "show", "eth0"],
    ));
    assert_eq!(veth["master"], "docker0", "{}: {veth}", t.interface);
    assert_eq!(veth["link_index"], eth0["ifindex"], "{veth} / {eth0}");
    assert_eq!(eth0["link_index"], veth["ifindex"], "{veth} / {eth0}");
    let addr = docker::in_container(c.pid, &["ip", "-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("{}/16", t.address)), "{addr}");
    // The ports as Docker bound them.
    let bound = docker_ports(lab, &c.name);
    let ours: BTreeMap<String, u16> = t
        .port_mappings
        .iter()
        .map(|p| {
            let key = format!("{}/{}", p.container_port, p.protocol.as_str());
            (key, p.host_port)
        })
        .collect();
    assert_eq!(ours, bound, "{}: status vs docker port", t.name);
}

/// Docker's own paths on the lab: published ports from the client (DNAT), task to task,
/// masquerade to the outside, hairpin.
fn docker_paths(lab: &Lab, status: &LabStatus, dyn_tcp: u16, dyn_udp: u16) {
    // The client reaches every published port through Docker's own DNAT.
    let dnat = |port: u16| rule_packets(lab.host(), "nat", "DOCKER", &format!("dpt:{port} "));
    let before = dnat(8080);
    assert_eq!(
        lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 5, 100)["echoed"],
        5
    );
    assert_eq!(dnat(8080), before + 1, "one connection, one DNAT");
    let host = |p: u16| format!("10.10.0.1:{p}");
    assert_eq!(
        lab.probe(lab.client(), "tcp", &host(dyn_tcp), 3, 64)["echoed"],
        3
    );
    assert_eq!(
        lab.probe(lab.client(), "udp", &host(5353), 4, 64)["echoed"],
        4
    );
    assert_eq!(
        lab.probe(lab.client(), "udp", &host(dyn_udp), 4, 64)["echoed"],
        4
    );

    // Task to task over docker0; task to the outside, masqueraded; hairpin (docker-proxy).
    let (t1, t2) = (&status.tasks[0].name, &status.tasks[1].name);
    let to_t2 = format!("{}:80", status.tasks[1].address);
    assert_eq!(docker::probe_from(lab, t1, "tcp", &to_t2, 5)["echoed"], 5);
    let masq = rule_packets(lab.host(), "nat", "POSTROUTING", "172.17.0.0/16");
    assert_eq!(
        docker::probe_from(lab, t2, "tcp", "10.10.0.2:9000", 3)["echoed"],
        3
    );
    assert_eq!(
        rule_packets(lab.host(), "nat", "POSTROUTING", "172.17.0.0/16"),
        masq + 1
    );
    assert_eq!(
        docker::probe_from(lab, t2, "tcp", "10.10.0.1:8080", 2)["echoed"],
        2
    );
}

/// A container run later is a task too; stopped, its port is refused, as Docker alone does.
fn late_container(lab: &Lab, dyn_tcp: u16) {
    let id = docker::run(lab, &docker::task(lab, "late", &["80"]));
    let s = docker::status(lab);
    let late = s
        .lab
        .tasks
        .iter()
        .find(|t| t.name == "late")
        .expect("late is a task");
    assert!(s.docker.containers.iter().any(|c| c.id == id));
    let port = late.port_mappings[0].host_port;
    assert!(DYNAMIC.contains(&port) && port != dyn_tcp, "{port}");
    assert_eq!(
        lab.probe(lab.client(), "tcp", &format!("10.10.0.1:{port}"), 2, 10)["echoed"],
        2
    );
    ecsnet_lab::lab::engine::stop(&lab.name, "late", 5).expect("docker stop");
    assert!(
        !docker::status(lab)
            .lab
            .tasks
            .iter()
            .any(|t| t.name == "late")
    );
    let to: SocketAddr = format!("10.10.0.1:{port}").parse().unwrap();
    let refused = tcp_connect(lab.client(), to, Duration::from_secs(2)).map(drop);
    assert_eq!(
        refused.as_ref().map_err(std::io::Error::kind),
        Err(std::io::ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    ecsnet_lab::lab::engine::rm(&lab.name, "late").expect("docker rm");
}
