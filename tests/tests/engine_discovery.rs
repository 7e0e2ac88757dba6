//! The engine room against a real dockerd (Debian's docker.io 20.10) in a namespace of its own:
//! containers present before the follower starts and started after, stopped, removed, moved
//! between networks, and dockerd restarted (with a container removed while the follower could
//! not see it): the view follows Docker, with each non-task's reason.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use ecsnet::{
    engine::{self, Discovered, Found, Seen, Skip},
    state::{Protocol, TaskSource},
};
use ecsnet_tests::{engine_dockerd::Dockerd, engine_dockerd::IMAGE, in_netns, require_root};

/// How long the view may take to follow a change.
const FOLLOW_WAIT: Duration = Duration::from_secs(20);

const TASK_ARN: &str =
    "arn:aws:ecs:eu-west-1:111122223333:task/demo/5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b";

/// The views the follower hands over, and the last one seen.
struct Views {
    rx: mpsc::Receiver<Discovered>,
    last: Discovered,
}

impl Views {
    /// Waits until `ok` holds for the view; returns how long it took.
    fn until(&mut self, what: &str, ok: impl Fn(&Discovered) -> bool) -> Duration {
        let start = Instant::now();
        while !ok(&self.last) {
            let left = FOLLOW_WAIT.saturating_sub(start.elapsed());
            self.last = self.rx.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "{what}: not seen within {FOLLOW_WAIT:?} ({e}); last view: {:#?}",
                    self.last.containers
                )
            });
        }
        start.elapsed()
    }
}

fn task<'a>(view: &'a Discovered, id: &str) -> Option<&'a Found> {
    match view.containers.get(id) {
        Some(Seen::Task(found)) => Some(found),
        _ => None,
    }
}

fn skipped<'a>(view: &'a Discovered, id: &str) -> Option<&'a Skip> {
    match view.containers.get(id) {
        Some(Seen::Skipped { why, .. }) => Some(why),
        _ => None,
    }
}

/// The host end of a container's interface, found without ecsnet: the container's own sysfs gives
/// its peer's ifindex, `ip -j link` of the namespace gives that link's name and master.
fn veth_of(d: &Dockerd, id: &str) -> (u32, String, String) {
    // Its one interface besides lo: eth0, or eth1 after a disconnect and a connect.
    let iflink = d.docker(&["exec", id, "sh", "-c", "cat /sys/class/net/eth*/iflink"]);
    let index: u32 = iflink.parse().expect("one iflink, a number");
    let out = std::process::Command::new("ip")
        .args(["-n", &d.ns, "-j", "link", "show"])
        .output()
        .expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let link = links
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["ifindex"] == index)
        .unwrap_or_else(|| panic!("no link {index} in {}", d.ns));
    (
        index,
        link["ifname"].as_str().unwrap().to_owned(),
        link["master"].as_str().unwrap_or_default().to_owned(),
    )
}

fn address_of(d: &Dockerd, id: &str) -> String {
    d.docker(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.Networks.bridge.IPAddress}}",
        id,
    ])
}

/// The host port Docker bound for `port` (`53/udp`), from `docker port`.
fn host_port(d: &Dockerd, id: &str, port: &str) -> u16 {
    let out = d.docker(&["port", id, port]);
    let first = out.lines().next().expect("a binding");
    first.rsplit(':').next().unwrap().parse().expect("a port")
}

fn run(d: &Dockerd, args: &[&str]) -> String {
    let mut all = vec!["run", "-d"];
    all.extend_from_slice(args);
    d.docker(&all)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one engine's story, step by step; each step needs the last"
)]
fn view_follows_a_real_docker_engine() {
    require_root();
    let mut d = Dockerd::start("disc");
    d.import_busybox();
    d.docker(&["network", "create", "appnet"]);
    let sleep = [IMAGE, "sleep", "100000"];

    // Before the follower: an ECS container, a plain one, and four that are not tasks.
    let ecs = run(
        &d,
        &[
            "--name",
            "ecs-web-3-web-a1b2",
            "--label",
            &format!("com.amazonaws.ecs.task-arn={TASK_ARN}"),
            "--label",
            "com.amazonaws.ecs.container-name=web",
            "--label",
            "com.amazonaws.ecs.task-definition-family=web",
            "--label",
            "com.amazonaws.ecs.task-definition-version=3",
            "--label",
            "com.amazonaws.ecs.cluster=demo",
            "--label",
            "ecsnet.security-groups=sg-web, sg-lb",
            "-p",
            "8080:80",
            "-p",
            "0:53/udp",
            sleep[0],
            sleep[1],
            sleep[2],
        ],
    );
    let plain = run(&d, &[&["--name", "plain"][..], &sleep[..]].concat());
    let host = run(&d, &[&["--network", "host"][..], &sleep[..]].concat());
    let none = run(&d, &[&["--network", "none"][..], &sleep[..]].concat());
    let app = run(&d, &[&["--network", "appnet"][..], &sleep[..]].concat());
    let created = d.docker(&["create", IMAGE, "sleep", "1"]);

    let (tx, rx) = mpsc::channel();
    let url = d.url();
    let engine = in_netns(&d.ns, move || {
        engine::spawn(&url, "docker0", move |view: &Discovered| {
            let _ = tx.send(view.clone());
        })
        .expect("spawn the follower")
    });
    let mut views = Views {
        rx,
        last: Discovered::default(),
    };
    views.until("the first list", |v| v.generation >= 1);
    let view = views.last.clone();
    assert_eq!(view.containers.len(), 6, "{view:#?}");

    let found = task(&view, &ecs).expect("the ECS container is a task");
    let t = &found.task;
    assert_eq!(t.source, TaskSource::Docker);
    assert_eq!(t.name, "5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b/web");
    assert_eq!(found.container_name, "ecs-web-3-web-a1b2");
    assert_eq!(t.task_arn.as_deref(), Some(TASK_ARN));
    assert_eq!(
        t.task_definition_arn.as_deref(),
        Some("arn:aws:ecs:eu-west-1:111122223333:task-definition/web:3")
    );
    assert_eq!(t.security_groups, ["sg-web", "sg-lb"]);
    assert!(found.has_group_label && found.fail_closed.is_none());
    assert_eq!(t.image.as_deref(), Some(IMAGE));
    assert_eq!(t.container_id.as_deref(), Some(ecs.as_str()));
    assert_eq!(t.ipv4_address.to_string(), address_of(&d, &ecs));
    let (index, veth, master) = veth_of(&d, &ecs);
    assert_eq!(master, "docker0");
    assert_eq!(found.ifindex, index);
    assert_eq!(found.prefix, 16);
    assert_eq!(found.cluster.as_deref(), Some("demo"));
    assert_eq!(t.interface.as_deref(), Some(veth.as_str()));
    let dynamic = host_port(&d, &ecs, "53/udp");
    assert!(dynamic >= 32768, "Docker's dynamic range: {dynamic}");
    let mut ports: Vec<_> = t
        .port_mappings
        .iter()
        .map(|p| (p.container_port, p.host_port, p.protocol))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [(53, dynamic, Protocol::Udp), (80, 8080, Protocol::Tcp)]
    );

    let p = task(&view, &plain).expect("the plain container is a task");
    assert_eq!(p.task.name, "plain");
    assert!(!p.has_group_label && p.task.security_groups.is_empty());
    assert_eq!(p.task.ipv4_address.to_string(), address_of(&d, &plain));
    assert_ne!(p.ifindex, found.ifindex);
    assert_eq!(skipped(&view, &host), Some(&Skip::HostNetwork));
    assert_eq!(skipped(&view, &none), Some(&Skip::NoNetwork));
    assert!(
        matches!(skipped(&view, &app), Some(Skip::OtherNetworks { networks, .. })
            if networks.len() == 1 && networks[0].starts_with("appnet (br-")),
        "{view:#?}"
    );
    assert!(matches!(
        skipped(&view, &created),
        Some(Skip::NotRunning { status }) if status == "created"
    ));
    let status = engine.status();
    assert!(status.connected, "{status}");
    assert_eq!((status.relists, status.reconnects), (1, 0), "{status}");
    assert_eq!(status.api_version.as_deref(), Some("1.41"), "20.10's API");

    // Started after the first list: one inspect, not a re-list.
    let started = Instant::now();
    let late = run(
        &d,
        &[
            &[
                "--restart",
                "always",
                "--label",
                "ecsnet.security-groups=sg-a,,sg-b",
            ][..],
            &sleep[..],
        ]
        .concat(),
    );
    let run_took = started.elapsed();
    let seen_after = views.until("a container started later", |v| task(v, &late).is_some());
    let cause = views.last.cause.clone().expect("an event, not a list");
    assert_eq!(cause.container, late);
    assert_eq!(
        cause.action, "start",
        "its connect event, before, is not waited on"
    );
    let since_event = std::time::SystemTime::now()
        .duration_since(cause.at)
        .expect("the event is in the past");
    println!(
        "docker run -d took {run_took:?}; the task was in the view {seen_after:?} after it \
         returned, {since_event:?} after the start event"
    );
    let late_task = task(&views.last, &late).unwrap();
    assert!(
        late_task.fail_closed.is_some() && late_task.task.security_groups.is_empty(),
        "a bad group label fails closed: {late_task:#?}"
    );
    assert_eq!(late_task.ifindex, veth_of(&d, &late).0);
    assert_eq!(engine.status().relists, 1, "no re-list for an event");

    // Renamed: a task without ECS labels is named after its container.
    d.docker(&["rename", "plain", "plain-2"]);
    views.until("a renamed container", |v| {
        task(v, &plain).is_some_and(|t| t.task.name == "plain-2")
    });

    // Stopped, then removed.
    d.docker(&["stop", "-t", "0", &plain]);
    views.until("a stopped container", |v| match v.containers.get(&plain) {
        Some(Seen::Skipped { name, why }) => {
            name == "plain-2" && matches!(why, Skip::NotRunning { .. })
        }
        _ => false,
    });
    d.docker(&["rm", &plain]);
    views.until("a removed container", |v| {
        !v.containers.contains_key(&plain)
    });

    // Moved from the user-defined network to the default bridge.
    d.docker(&["network", "disconnect", "appnet", &app]);
    d.docker(&["network", "connect", "bridge", &app]);
    views.until("a container connected to the bridge", |v| {
        task(v, &app).is_some()
    });
    assert_eq!(
        task(&views.last, &app).unwrap().ifindex,
        veth_of(&d, &app).0
    );

    // dockerd down: disconnected, the view kept.
    let before = views.last.clone();
    d.stop();
    let deadline = Instant::now() + FOLLOW_WAIT;
    while engine.status().connected {
        assert!(
            Instant::now() < deadline,
            "still connected: {}",
            engine.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = engine.status();
    assert!(status.last_error.is_some(), "{status}");
    assert!(
        views.last.tasks().count() >= before.tasks().count(),
        "the known tasks stay while the engine is away"
    );

    // Behind the follower's back: the engine comes up on another socket, a container goes.
    let side = d.dir.join("side.sock");
    d.launch(&side);
    let out = std::process::Command::new(ecsnet_tests::engine_dockerd::DOCKER)
        .args([
            "-H",
            &format!("unix://{}", side.display()),
            "rm",
            "-f",
            &app,
        ])
        .output()
        .expect("docker rm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
    assert!(
        views.last.containers.contains_key(&app),
        "the follower could not have seen that"
    );

    // Back on its socket: a full re-list; the removed container is gone, the one with a
    // restart policy is a task again on a new veth, the others are not running.
    d.launch(&d.socket());
    views.until("the re-list after dockerd's restart", |v| {
        !v.containers.contains_key(&app) && task(v, &late).is_some()
    });
    let status = engine.status();
    assert!(status.connected, "{status}");
    assert_eq!((status.relists, status.reconnects), (2, 1), "{status}");
    let view = views.last.clone();
    assert_eq!(task(&view, &late).unwrap().ifindex, veth_of(&d, &late).0);
    assert!(
        matches!(skipped(&view, &ecs), Some(Skip::NotRunning { .. })),
        "stopped with dockerd: {view:#?}"
    );

    engine.stop();
    let left = d.down();
    assert!(left.is_empty(), "dockerd left behind: {left:?}");
}
