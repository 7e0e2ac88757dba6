//! ecsnet following a real Docker engine (`up --docker` on the real-engine lab, Debian's
//! dockerd 20.10): containers there before `up` and started after it are tasks; every path
//! (published ports, task to task, masquerade, hairpin, the host to 127.0.0.1) works, in both
//! userland-proxy modes, and the ones ecsnet carries leave Docker's netfilter counters alone;
//! security groups come from a label and hold both ways; flow records carry the ECS fields
//! of the labels; a label naming an unknown group closes its task until the group is defined;
//! containers that are not tasks (another network, host, none) are said so and left to Docker.
//! These tests fail, never skip, when dockerd cannot start.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path, time::Duration};

use ecsnet_lab::lab::{CLIENT_ADDR, CLIENT_ECHO_PORT, LabPort, UPLINK_ADDR};
use ecsnet_tests::{
    Lab, counters, docker,
    engine_lab::{self, Netfilter, Origin, reach},
    world::{self, sg, tcp},
};
use serde_json::Value;

/// The flow-log file's format: the 5-tuple, packets, direction and the ECS fields.
const FLOW_FORMAT: &str = "${interface-id} ${srcaddr} ${dstaddr} ${srcport} ${dstport} \
     ${protocol} ${packets} ${flow-direction} ${log-status} ${ecs-task-arn} ${ecs-task-id} \
     ${ecs-cluster-name} ${ecs-container-id} ${ecs-task-definition-arn}";

/// Messages per probe that must get through; one for a probe that must not (it waits 2 s).
const COUNT: u32 = 2;

/// One container of the lab: what Docker says of it.
#[derive(Debug, Clone)]
struct Container {
    name: String,
    id: String,
    pid: i32,
    address: Ipv4Addr,
    interface: String,
    ports: Vec<LabPort>,
    labels: BTreeMap<String, String>,
}

impl Container {
    fn origin(&self) -> Origin {
        Origin::Container(self.name.clone(), self.pid)
    }

    /// Its first published port of `proto`.
    fn port(&self, proto: &str) -> u16 {
        self.ports
            .iter()
            .find(|p| p.protocol.as_str() == proto)
            .unwrap_or_else(|| panic!("{} publishes no {proto} port: {:?}", self.name, self.ports))
            .host_port
    }

    /// The ECS task id: the end of the task ARN of its labels.
    fn task_id(&self) -> &str {
        self.labels[docker::engine::TASK_ARN]
            .rsplit('/')
            .next()
            .expect("an ARN")
    }

    /// The ECS fields its flow records must carry, from its labels: task ARN, task id,
    /// cluster, container id, task definition ARN.
    fn ecs_fields(&self) -> [String; 5] {
        let l = &self.labels;
        [
            l[docker::engine::TASK_ARN].clone(),
            self.task_id().to_owned(),
            l[docker::engine::CLUSTER].clone(),
            self.id.clone(),
            format!(
                "arn:aws:ecs:us-east-1:123456789012:task-definition/{}:{}",
                l[docker::engine::FAMILY],
                l[docker::engine::VERSION]
            ),
        ]
    }
}

/// The lab's running containers, in the order they were created.
fn containers(lab: &Lab) -> Vec<Container> {
    let s = docker::status(lab);
    s.lab
        .tasks
        .iter()
        .zip(&s.docker.containers)
        .map(|(t, c)| Container {
            name: c.name.clone(),
            id: c.id.clone(),
            pid: c.pid,
            address: t.address,
            interface: t.interface.clone(),
            ports: t.port_mappings.clone(),
            labels: c.labels.clone(),
        })
        .collect()
}

fn named<'a>(all: &'a [Container], name: &str) -> &'a Container {
    all.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn uplink(port: u16) -> String {
    format!("{UPLINK_ADDR}:{port}")
}

fn client_echo() -> String {
    format!("{CLIENT_ADDR}:{CLIENT_ECHO_PORT}")
}

/// `--publish` of `tasks` lab tasks: each serves tcp/80, on a static host port (odd tasks) or
/// a dynamic one (even); every fourth also udp/53 on a static port, the next a dynamic one.
fn lab_publish(tasks: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 1..=tasks {
        out.push(if i % 2 == 1 {
            format!("{i}:{}:80", 8080 + i)
        } else {
            format!("{i}:0:80")
        });
        match i % 4 {
            1 => out.push(format!("{i}:{}:53/udp", 5300 + i)),
            2 => out.push(format!("{i}:0:53/udp")),
            _ => {}
        }
    }
    out
}

/// The ports of late container `j`, in `docker::task`'s notation: tcp/80 static or dynamic,
/// and for two of three udp/53 static or dynamic.
fn late_ports(j: usize) -> Vec<String> {
    let mut out = vec![if j % 2 == 1 {
        format!("{}:80", 8200 + j)
    } else {
        "80".to_owned()
    }];
    match j % 3 {
        0 => out.push(format!("{}:53/udp", 5400 + j)),
        1 => out.push("53/udp".to_owned()),
        _ => {}
    }
    out
}

/// `docker::up` with `lab_publish(tasks)`.
fn lab_up(prefix: &str, tasks: usize, extra: &[&str]) -> Lab {
    let publish = lab_publish(tasks);
    let publish: Vec<&str> = publish.iter().map(String::as_str).collect();
    docker::up(prefix, tasks, &publish, extra)
}

/// Runs late containers `late1..=n` on the lab.
fn run_late(lab: &Lab, n: usize) {
    for j in 1..=n {
        let ports = late_ports(j);
        let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
        docker::run(lab, &docker::task(lab, &format!("late{j}"), &ports));
    }
}

/// Every container is the task of its name, with its address, veth and ports as Docker
/// bound them.
fn tasks_are_the_containers(tasks: &[ecsnet::state::Task], all: &[Container]) {
    assert_eq!(tasks.len(), all.len());
    for c in all {
        let t = tasks
            .iter()
            .find(|t| t.container_id.as_deref() == Some(c.id.as_str()))
            .unwrap_or_else(|| panic!("container {} is no task", c.name));
        assert_eq!(t.name, format!("{}/{}", c.task_id(), c.name));
        assert_eq!(t.ipv4_address, c.address, "{}", c.name);
        assert_eq!(t.interface.as_deref(), Some(c.interface.as_str()));
        let mut ours: Vec<String> = t
            .port_mappings
            .iter()
            .map(|p| {
                let (host_port, container_port) = (p.host_port, p.container_port);
                let protocol = p.protocol;
                LabPort {
                    host_port,
                    container_port,
                    protocol,
                }
                .to_string()
            })
            .collect();
        let mut docker: Vec<String> = c.ports.iter().map(ToString::to_string).collect();
        ours.sort();
        docker.sort();
        assert_eq!(ours, docker, "{}: the task's ports are Docker's", c.name);
    }
}

/// Which path a connection takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// ecsnet's datapath, as a flow of this kind; no netfilter counter of Docker's moves.
    Ecsnet(&'static str),
    /// docker-proxy: Docker's NAT rules do not move (nothing else listens there).
    DockerProxy,
    /// The kernel's NAT with Docker's rules: one DNAT (and, without the proxy, one masquerade
    /// of the host's own source).
    KernelNat,
}

struct Case {
    what: String,
    from: Origin,
    proto: &'static str,
    target: String,
    way: Way,
}

fn case(what: &str, from: Origin, proto: &'static str, target: String, way: Way) -> Case {
    Case {
        what: what.to_owned(),
        from,
        proto,
        target,
        way,
    }
}

/// Runs every path of bridge mode on the lab and checks which way each took; prints what it
/// saw (the table of docs/DOCKER.md).
fn every_path(lab: &Lab, all: &[Container], userland_proxy: bool) {
    check_paths(lab, &path_cases(lab, all, userland_proxy), userland_proxy);
}

/// The paths of bridge mode: the client to every published port, task to task, masquerade,
/// hairpin (to its own port and another's), the host to 127.0.0.1 and to its uplink address.
fn path_cases(lab: &Lab, all: &[Container], userland_proxy: bool) -> Vec<Case> {
    let by_name = |n: &str| named(all, n);
    let (e1, e2, l1, l2) = (
        by_name("task1"),
        by_name("task2"),
        by_name("late1"),
        by_name("late2"),
    );
    let mut cases = Vec::new();
    for c in all.iter().filter(|c| !c.name.starts_with("web")) {
        for p in &c.ports {
            let what = format!("client to {} {p}", c.name);
            let proto = p.protocol.as_str();
            let to = uplink(p.host_port);
            cases.push(case(
                &what,
                Origin::Ns(lab.client().into()),
                proto,
                to,
                Way::Ecsnet("inbound"),
            ));
        }
    }
    let east_west = Way::Ecsnet("eastWest");
    for (a, b) in [(e1, e2), (e2, l1), (l1, l2), (l2, e1)] {
        let what = format!("{} to task {}", a.name, b.name);
        cases.push(case(
            &what,
            a.origin(),
            "tcp",
            format!("{}:80", b.address),
            east_west,
        ));
    }
    let udp_peer = format!("{}:53", e2.address);
    cases.push(case(
        "late1 to task task2 udp",
        l1.origin(),
        "udp",
        udp_peer,
        east_west,
    ));
    let masq = Way::Ecsnet("masquerade");
    for (c, proto) in [(e1, "tcp"), (e2, "udp"), (l1, "tcp"), (l2, "udp")] {
        let what = format!("{} to the client {proto} (masquerade)", c.name);
        cases.push(case(&what, c.origin(), proto, client_echo(), masq));
    }
    let hairpin = Way::Ecsnet("hairpin");
    for (a, b, proto) in [
        (e1, e1, "tcp"),
        (e1, l1, "tcp"),
        (l1, l1, "tcp"),
        (l1, e2, "udp"),
    ] {
        let whose = if a.name == b.name { "its own" } else { &b.name };
        let what = format!("{} to {whose} published {proto} port (hairpin)", a.name);
        cases.push(case(
            &what,
            a.origin(),
            proto,
            uplink(b.port(proto)),
            hairpin,
        ));
    }
    let host = Origin::Ns(lab.host().into());
    let loopback = if userland_proxy {
        Way::DockerProxy
    } else {
        Way::KernelNat
    };
    for (c, proto) in [(e1, "tcp"), (e2, "tcp"), (e1, "udp"), (l2, "tcp")] {
        let what = format!("host to 127.0.0.1 {}'s {proto} port", c.name);
        let to = format!("127.0.0.1:{}", c.port(proto));
        cases.push(case(&what, host.clone(), proto, to, loopback));
    }
    let what = "host to its uplink address, task1's tcp port";
    cases.push(case(
        what,
        host,
        "tcp",
        uplink(e1.port("tcp")),
        Way::KernelNat,
    ));
    cases
}

/// Runs each case with Docker's counters and ecsnet's flows read around it; fails listing
/// every case that did not take its way.
fn check_paths(lab: &Lab, cases: &[Case], userland_proxy: bool) {
    let mut table = String::new();
    let mut wrong = Vec::new();
    for c in cases {
        let (nf, flows) = (Netfilter::read(lab), engine_lab::ecsnet_flows(lab));
        let echoed = reach(&c.from, c.proto, &c.target, COUNT);
        let moved = Netfilter::read(lab).since(nf);
        let kinds = engine_lab::new_kinds(&flows, &engine_lab::ecsnet_flows(lab));
        let _ = writeln!(
            table,
            "{:<58} {:<22} echoed {echoed}/{COUNT} ecsnet {kinds:?} docker {moved:?}",
            c.what, c.target
        );
        let quiet = Netfilter::default();
        let ok = echoed == COUNT
            && match c.way {
                Way::Ecsnet(kind) => moved == quiet && kinds == [kind],
                Way::DockerProxy => moved.dnat == 0 && moved.local_masquerade == 0,
                Way::KernelNat => {
                    moved.dnat == 1
                        && moved.local_masquerade == u64::from(!userland_proxy)
                        && moved.masquerade == 0
                }
            };
        if !ok {
            wrong.push(format!(
                "{} ({} {}): want {:?}, got echoed {echoed}/{COUNT}, ecsnet flows {kinds:?}, Docker's counters {moved:?}",
                c.what, c.proto, c.target, c.way
            ));
        }
    }
    println!("userland-proxy {userland_proxy}:\n{table}");
    assert!(
        wrong.is_empty(),
        "{} of {} paths went wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

/// sg-web: tcp/80 in from the client alone; out, tcp/9000 to the client alone.
fn web_group() -> Value {
    let client = format!("{CLIENT_ADDR}/32");
    let echo = i32::from(CLIENT_ECHO_PORT);
    sg(
        "sg-web",
        "web",
        &[tcp(80, 80, &[&client])],
        &[tcp(echo, echo, &[&client])],
    )
}

/// A container labelled with sg-web: reachable on 80 from the client, not from another task
/// (directly or through the host's port) nor from the host (docker-proxy connects from the
/// bridge's address); it reaches the client's tcp echo, not its udp one nor another task.
fn web_holds(lab: &Lab, web: &Container, other: &Container) {
    let client = Origin::Ns(lab.client().into());
    let host = Origin::Ns(lab.host().into());
    let loopback = format!("127.0.0.1:{}", web.port("tcp"));
    let checks = [
        ("host to web's port on 127.0.0.1", &host, "tcp", loopback, 0),
        (
            "client to web",
            &client,
            "tcp",
            uplink(web.port("tcp")),
            COUNT,
        ),
        (
            "task to web",
            &other.origin(),
            "tcp",
            format!("{}:80", web.address),
            0,
        ),
        (
            "task to web's port",
            &other.origin(),
            "tcp",
            uplink(web.port("tcp")),
            0,
        ),
        (
            "web to the client tcp",
            &web.origin(),
            "tcp",
            client_echo(),
            COUNT,
        ),
        (
            "web to the client udp",
            &web.origin(),
            "udp",
            client_echo(),
            0,
        ),
        (
            "web to a task",
            &web.origin(),
            "tcp",
            format!("{}:80", other.address),
            0,
        ),
    ];
    for (what, from, proto, target, want) in checks {
        let count = if want == 0 { 1 } else { COUNT };
        let got = reach(from, proto, &target, count);
        assert_eq!(got, want, "{}: {what} ({proto} {target})", web.name);
    }
    let s = lab.stats();
    let name = format!("{}/{}", web.task_id(), web.name);
    for reason in ["SG_INGRESS", "SG_EGRESS"] {
        assert!(
            counters::task_drops(&s, &name, reason) > 0,
            "{name} counted no {reason} drop: {:?}",
            counters::drops(&s)
        );
    }
}

/// A record of the flow-log file (`FLOW_FORMAT`): its fields.
fn records(file: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("read the flow log {}: {e}", file.display()));
    text.lines()
        .map(|l| l.split(' ').map(str::to_owned).collect())
        .collect()
}

/// Every container's records carry the ECS fields of its labels; the udp/53 datagrams the
/// client sent each one are counted exactly.
fn flow_records_carry_the_labels(
    lab: &Lab,
    all: &[Container],
    file: &Path,
    sent: &BTreeMap<String, u64>,
) {
    // Two windows of 1 s: every probe's window is exported.
    std::thread::sleep(Duration::from_millis(2500));
    let recs = records(file);
    for c in all {
        let mine: Vec<&Vec<String>> = recs.iter().filter(|r| r[0] == c.interface).collect();
        assert!(
            !mine.is_empty(),
            "no record of {} ({})",
            c.name,
            c.interface
        );
        let want = c.ecs_fields();
        for r in &mine {
            assert_eq!(r.len(), 14, "{r:?}");
            assert_eq!(r[9..], want, "{}'s record {r:?}", c.name);
        }
        let client = CLIENT_ADDR.to_string();
        let from_client = |proto: &str, port: &str| -> u64 {
            mine.iter()
                .filter(|r| r[1] == client && r[5] == proto && r[4] == port && r[7] == "ingress")
                .map(|r| r[6].parse::<u64>().expect("packets"))
                .sum()
        };
        assert!(
            from_client("6", "80") > 0,
            "{}: no tcp record from the client",
            c.name
        );
        if let Some(n) = sent.get(&c.name) {
            assert_eq!(
                from_client("17", "53"),
                *n,
                "{}: udp/53 packets from the client",
                c.name
            );
        }
    }
    // `flows tail --json` carries the same fields.
    let c = &all[all.len() - 1];
    let format = "${ecs-task-arn} ${ecs-task-id} ${ecs-cluster-name} ${ecs-container-id} \
                  ${ecs-task-definition-arn}";
    let json = lab.flow_records(format, &format!("task={}/{}", c.task_id(), c.name));
    assert!(!json.is_empty(), "flows tail has no record of {}", c.name);
    for r in json {
        let got: Vec<&str> = [
            "ecs-task-arn",
            "ecs-task-id",
            "ecs-cluster-name",
            "ecs-container-id",
            "ecs-task-definition-arn",
        ]
        .iter()
        .map(|k| r[k].as_str().unwrap_or("-"))
        .collect();
        assert_eq!(got, c.ecs_fields(), "{r}");
    }
}

#[test]
fn thirty_containers_take_ecsnets_path_with_dockers_defaults() {
    let lab = lab_up("de", 19, &[]);
    assert!(
        docker::status(&lab).docker.userland_proxy,
        "Docker's default"
    );
    let web = engine_lab::grouped_task(&lab, "web-early", &["8090:80"], "sg-web");
    docker::run(&lab, &web);
    let flow_log = world::lab_file(&lab, "flows.log");
    let flow_log_arg = flow_log.display().to_string();
    let extra = ["--flow-log", &flow_log_arg, "--flow-format", FLOW_FORMAT];
    engine_lab::up_following(&lab, &[web_group()], &extra);
    engine_lab::wait_docker_tasks(&lab, 20);
    // Ten more while it runs.
    run_late(&lab, 9);
    docker::run(
        &lab,
        &engine_lab::grouped_task(&lab, "web-late", &["80"], "sg-web"),
    );
    let listed = engine_lab::wait_docker_tasks(&lab, 30);
    let all = containers(&lab);
    tasks_are_the_containers(&listed, &all);

    every_path(&lab, &all, true);
    let task1 = named(&all, "task1");
    for web in ["web-early", "web-late"] {
        web_holds(&lab, named(&all, web), task1);
    }
    // The client sent COUNT datagrams to each udp/53 port, and nothing else did.
    let sent: BTreeMap<String, u64> = all
        .iter()
        .filter(|c| c.ports.iter().any(|p| p.protocol.as_str() == "udp"))
        .map(|c| (c.name.clone(), u64::from(COUNT)))
        .collect();
    flow_records_carry_the_labels(&lab, &all, &flow_log, &sent);
}

#[test]
fn without_the_userland_proxy_the_same_paths_work() {
    let lab = lab_up("dn", 4, &["--userland-proxy", "false"]);
    assert!(!docker::status(&lab).docker.userland_proxy);
    engine_lab::up_following(&lab, &[], &[]);
    engine_lab::wait_docker_tasks(&lab, 4);
    run_late(&lab, 2);
    let listed = engine_lab::wait_docker_tasks(&lab, 6);
    let all = containers(&lab);
    tasks_are_the_containers(&listed, &all);
    every_path(&lab, &all, false);
}

/// The lines of the instance's agent.log that contain `needle`.
fn log_lines(lab: &Lab, needle: &str) -> Vec<String> {
    let log = ecsnet::store::paths::InstancePaths::new(&lab.name).log_file();
    std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("read {}: {e}", log.display()))
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn unknown_groups_and_other_networks_are_said_and_open_nothing() {
    let runs_before = docker::run_dirs_now();
    let lab = docker::up("du", 1, &["1:8080:80"], &[]);
    engine_lab::up_following(&lab, &[], &[]);
    engine_lab::wait_docker_tasks(&lab, 1);
    // A label naming a group nobody defined; a user-defined network; host; none.
    let closed = engine_lab::grouped_task(&lab, "closed", &["8091:80"], "sg-nope");
    docker::run(&lab, &closed);
    docker::docker_ok(&lab, &["network", "create", "user-net"]);
    let on_user = engine_lab::run_with(
        &lab,
        "on-user",
        &["--network", "user-net", "-p", "8092:80"],
        80,
    );
    engine_lab::run_with(&lab, "on-host", &["--network", "host"], 7070);
    engine_lab::run_with(&lab, "on-none", &["--network", "none"], 80);
    let listed = engine_lab::wait_docker_tasks(&lab, 2);
    let all = containers(&lab);
    let (task1, closed) = (named(&all, "task1"), named(&all, "closed"));
    let closed_name = format!("{}/closed", closed.task_id());
    let t = listed
        .iter()
        .find(|t| t.name == closed_name)
        .expect("closed is a task");
    assert_eq!(t.security_groups, [ecsnet::plan::merge::CLOSED_GROUP]);

    each_is_said(&lab);
    maps_hold_the_tasks_alone(&lab, &[task1, closed]);
    closed_passes_nothing(&lab, closed, task1);
    others_take_dockers_path(&lab, &on_user);

    // Another event does not say it again; the log has said it once.
    run_late(&lab, 1);
    engine_lab::wait_docker_tasks(&lab, 3);
    assert_eq!(
        log_lines(&lab, "sg-nope").len(),
        1,
        "{:?}",
        log_lines(&lab, "sg-nope")
    );

    opens_when_defined(&lab, closed, task1);

    // Down, nothing of them is left: the user network, the host and none containers.
    let footprint = docker::Footprint::of(&lab.name, &runs_before);
    world::down_leaves_nothing(lab);
    assert_eq!(
        footprint.left(),
        Vec::<String>::new(),
        "lab down left things behind"
    );
}

/// Each container that is no task, and the closed task, is said so: `task ls`, the log,
/// stats and the metric.
fn each_is_said(lab: &Lab) {
    // Each is said so: task ls, the log (once), stats and the metric.
    let ls = counters::poll(
        engine_lab::FOLLOW_WAIT,
        Duration::from_millis(100),
        || world::instance_ok(lab, &["task", "ls"]),
        |ls| ls.matches("note: ").count() == 4,
    )
    .unwrap_or_else(|ls| panic!("task ls does not note the four containers:\n{ls}"));
    for (name, why) in [
        (
            "on-user",
            "is not a task: not on bridge docker0: only on user-net",
        ),
        ("on-host", "is not a task: host network"),
        ("on-none", "is not a task: network none"),
    ] {
        assert!(
            ls.lines().any(
                |l| l.starts_with("note: container ") && l.contains(&format!("({name}) {why}"))
            ),
            "task ls says nothing of {name}:\n{ls}"
        );
    }
    let closed_note = ls
        .lines()
        .find(|l| l.contains("sg-nope"))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(
        closed_note.contains("no traffic either way"),
        "{closed_note}"
    );
    let s = lab.stats();
    let e = s.engine.as_ref().expect("stats has the engine");
    assert_eq!((e.tasks, e.not_tasks, e.closed), (2, 3, 1), "{e:?}");
    assert_eq!(engine_lab::metric(lab, "ecsnet_engine_tasks_closed"), 1);
    let line = world::instance_ok(lab, &["stats"]);
    assert!(line.contains("1 closed (unknown groups)"), "{line}");
}

/// Nothing but the tasks' entries (and the uplink's) is in the maps.
fn maps_hold_the_tasks_alone(lab: &Lab, tasks: &[&Container]) {
    let s = lab.stats();
    let mut addrs: Vec<Ipv4Addr> = tasks.iter().map(|t| t.address).collect();
    addrs.sort();
    assert_eq!(engine_lab::tasks_map(&lab.name), addrs);
    let mut ports: Vec<String> = tasks
        .iter()
        .flat_map(|t| &t.ports)
        .map(|p| format!("{}/{}", p.host_port, p.protocol.as_str()))
        .collect();
    ports.sort();
    assert_eq!(engine_lab::ports_map(&lab.name), ports);
    let mut ifaces: Vec<u32> = s.tasks.iter().map(|t| t.ifindex).collect();
    ifaces.push(s.uplink.ifindex);
    ifaces.sort_unstable();
    assert_eq!(engine_lab::ifaces_map(&lab.name), ifaces);
}

/// The closed task gets nothing in or out.
fn closed_passes_nothing(lab: &Lab, closed: &Container, task1: &Container) {
    let client = Origin::Ns(lab.client().into());
    let to_closed = format!("{}:80", closed.address);
    for (what, from, proto, target) in [
        ("client to its port", &client, "tcp", uplink(8091)),
        ("it to the client", &closed.origin(), "tcp", client_echo()),
        (
            "it to the client udp",
            &closed.origin(),
            "udp",
            client_echo(),
        ),
        ("a task to it", &task1.origin(), "tcp", to_closed),
        (
            "it to a task",
            &closed.origin(),
            "tcp",
            format!("{}:80", task1.address),
        ),
    ] {
        assert_eq!(reach(from, proto, &target, 1), 0, "closed: {what} passed");
    }
}

/// The containers that are no task take Docker's path, untouched by ecsnet.
fn others_take_dockers_path(lab: &Lab, on_user: &str) {
    let client = Origin::Ns(lab.client().into());
    // The others: Docker's path, untouched. The user network's port is DNATed by Docker and
    // forwarded by netfilter; the host network's server is the host's own; none has its lo.
    let flows = engine_lab::ecsnet_flows(lab);
    let before = Netfilter::read(lab);
    assert_eq!(
        reach(&client, "tcp", &uplink(8092), COUNT),
        COUNT,
        "on-user's port"
    );
    let moved = Netfilter::read(lab).since(before);
    assert!(moved.dnat == 1 && moved.forward > 0, "on-user: {moved:?}");
    assert_eq!(
        reach(&client, "tcp", &uplink(7070), COUNT),
        COUNT,
        "on-host"
    );
    let none = Origin::Container("on-none".into(), engine_lab::pid_of(lab, "on-none"));
    assert_eq!(
        reach(&none, "tcp", "127.0.0.1:80", COUNT),
        COUNT,
        "on-none's lo"
    );
    let user = Origin::Container("on-user".into(), engine_lab::pid_of(lab, on_user));
    assert_eq!(
        reach(&user, "tcp", &client_echo(), COUNT),
        COUNT,
        "on-user to the client"
    );
    assert_eq!(
        engine_lab::new_kinds(&flows, &engine_lab::ecsnet_flows(lab)),
        Vec::<String>::new(),
        "ecsnet tracked flows of containers that are not tasks"
    );
}

/// Defined by `sg apply`, the group opens the task live, and everything says so.
fn opens_when_defined(lab: &Lab, closed: &Container, task1: &Container) {
    let client = Origin::Ns(lab.client().into());
    let to_closed = format!("{}:80", closed.address);
    let nope_group = sg(
        "sg-nope",
        "nope",
        &[tcp(80, 80, &[&format!("{CLIENT_ADDR}/32")])],
        &[world::all(&["0.0.0.0/0"])],
    );
    let file = world::write(lab, "sg-nope.json", &Value::Array(vec![nope_group]));
    ecsnet_tests::ecsnet_ok(&lab.ecsnet_args(&["sg", "apply", "-f", &file]));
    assert_eq!(
        reach(&client, "tcp", &uplink(8091), COUNT),
        COUNT,
        "client to closed, opened"
    );
    assert_eq!(
        reach(&closed.origin(), "tcp", &client_echo(), COUNT),
        COUNT,
        "closed, opened, to the client"
    );
    assert_eq!(
        reach(&task1.origin(), "tcp", &to_closed, 1),
        0,
        "sg-nope lets no task in"
    );
    let e = lab.stats().engine.expect("stats has the engine");
    assert_eq!(e.closed, 0, "stats still says closed: {e:?}");
    assert_eq!(engine_lab::metric(lab, "ecsnet_engine_tasks_closed"), 0);
    let ls = world::instance_ok(lab, &["task", "ls"]);
    assert!(!ls.contains("sg-nope"), "{ls}");
}
