//! `ecsnet up` / `down` on a real lab: what it attaches and pins, exact per-task counters of
//! real TCP and UDP traffic, the agent's socket, SIGKILL of the agent, and a clean `down`.

use std::{path::Path, time::Duration};

use ecsnet_tests::{
    Background, Lab,
    agent::{self, ask, kill_agent},
    ecsnet, ecsnet_bin, ecsnet_fails, ecsnet_ok, leftovers, ns_exec,
    world::down_leaves_nothing,
};

fn agent_pid(name: &str) -> i32 {
    agent::pid(name).expect("agent pid file")
}

/// The agent answers on its socket, bad requests included.
fn agent_answers(name: &str) {
    assert_eq!(ask(name, r#"{"op":"ping"}"#)["ok"], true);
    assert_eq!(ask(name, r#"{"op":"status"}"#)["meta"]["uplink"], "eth0");
    let bad = ask(name, "not json");
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("bad request"));
    assert_eq!(ask(name, r#"{"op":"reboot"}"#)["ok"], false);
}

/// TCP between the tasks, counted exactly as the task kernels' own IP counters count it.
fn tcp_between_tasks_is_counted_like_the_kernel_does(lab: &Lab) {
    let nss = [lab.task_ns(1), lab.task_ns(2)];
    let (before, k) = lab.settled(&nss);
    let r = lab.probe(lab.task_ns(2), "tcp", "172.17.0.2:80", 20, 300);
    assert_eq!(r["echoed"], 20);
    let (after, kb) = lab.settled(&nss);
    for (i, (k, kb)) in k.into_iter().zip(kb).enumerate() {
        let (b, a) = (&before.tasks[i], &after.tasks[i]);
        let task = &a.name;
        assert_eq!(
            (
                a.ingress.packets - b.ingress.packets,
                a.egress.packets - b.egress.packets,
                a.ingress.bytes - b.ingress.bytes,
                a.egress.bytes - b.egress.bytes,
            ),
            (kb.0 - k.0, kb.1 - k.1, kb.2 - k.2, kb.3 - k.3),
            "{task}: ingress and egress packets, ingress and egress bytes against the task's \
             InReceives, OutRequests, InOctets and OutOctets"
        );
        assert!(
            a.egress.packets - b.egress.packets >= 20 + 2,
            "{task}: at least the messages and the handshake"
        );
    }
}

#[test]
fn up_counts_exactly_and_down_leaves_nothing() {
    let lab = Lab::up("in", 2, &["1:8080:80", "2:5353:53/udp"]);
    // Native XDP asked for: on the lab's veth uplink `auto` would attach none.
    let out = lab.ecsnet_up_with(&["--xdp-mode", "native"]);
    assert!(out.contains("2 task(s)"), "{out}");

    // Pinned: maps, programs, tcx links on both task interfaces and the uplink, XDP on the uplink.
    let pin = format!("/sys/fs/bpf/ecsnet/{}", lab.name);
    for m in ecsnet_common::maps::PINNED_MAPS {
        assert!(
            Path::new(&format!("{pin}/maps/{m}")).exists(),
            "map {m} not pinned"
        );
    }
    let links: Vec<String> = std::fs::read_dir(format!("{pin}/links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        links.len(),
        7,
        "tcx ingress+egress on 3 interfaces and one XDP link: {links:?}"
    );
    let eth0 = ns_exec(lab.host(), &["ip", "-d", "link", "show", "eth0"]);
    assert!(eth0.contains("xdp"), "no XDP program on the uplink: {eth0}");

    agent_answers(&lab.name);

    let before = lab.settled_stats();
    assert_eq!(before.tasks.len(), 2);

    // UDP, exact: 7 datagrams of 123 bytes to task2 through the published port, 7 echoes back.
    let r = lab.probe(lab.client(), "udp", "10.10.0.1:5353", 7, 123);
    assert_eq!(r["echoed"], 7);
    let after = lab.settled_stats();
    let (b, a) = (&before.tasks[1], &after.tasks[1]);
    assert_eq!(a.ingress.packets - b.ingress.packets, 7);
    assert_eq!(a.ingress.bytes - b.ingress.bytes, 7 * (123 + 28));
    assert_eq!(a.egress.packets - b.egress.packets, 7);
    assert_eq!(a.egress.bytes - b.egress.bytes, 7 * (123 + 28));
    assert_eq!(
        after.tasks[0].ingress, before.tasks[0].ingress,
        "task1 saw none of it"
    );
    assert!(after.uplink.ingress.packets - before.uplink.ingress.packets >= 7);
    assert_eq!(
        after.uplink.xdp.packets - before.uplink.xdp.packets,
        after.uplink.ingress.packets - before.uplink.ingress.packets,
        "XDP and tc ingress see the same IPv4 packets"
    );

    // TCP between the tasks, checked against the task kernel's own IP counters.
    tcp_between_tasks_is_counted_like_the_kernel_does(&lab);

    // A second up changes nothing and says so.
    let line = ecsnet_fails(&lab.ecsnet_args(&["up"]), 2);
    assert!(line.contains("already up"), "{line}");

    // SIGKILL the agent: traffic keeps flowing and is counted; up brings the agent back with
    // the counters intact.
    let pid = agent_pid(&lab.name);
    kill_agent(pid);
    let before = lab.settled_stats();
    assert_eq!(
        lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 5, 50)["echoed"],
        5
    );
    let after = lab.settled_stats();
    assert!(
        after.tasks[0].ingress.packets >= before.tasks[0].ingress.packets + 5,
        "counting goes on without the agent"
    );
    ecsnet_ok(&["--instance", &lab.name, "up"]);
    assert_ne!(agent_pid(&lab.name), pid, "a new agent runs");
    assert_eq!(
        lab.stats().tasks[0].ingress,
        after.tasks[0].ingress,
        "restart lost no count"
    );

    // Kill it again and take everything down from the crashed state.
    kill_agent(agent_pid(&lab.name));
    ecsnet_ok(&["--instance", &lab.name, "down"]);
    let eth0 = ns_exec(lab.host(), &["ip", "-d", "link", "show", "eth0"]);
    assert!(
        !eth0.contains("prog/xdp"),
        "XDP still attached after down: {eth0}"
    );
    let qdisc = ns_exec(lab.host(), &["tc", "qdisc", "show"]);
    assert!(!qdisc.contains("clsact"), "a clsact qdisc is left: {qdisc}");
    // With nothing attached, traffic still flows over the bridge path.
    assert_eq!(
        lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 3, 50)["echoed"],
        3
    );
    let left: Vec<String> = leftovers(&lab.name)
        .into_iter()
        .filter(|l| {
            !l.starts_with("netns")
                && !l.contains("lab serve")
                && l != &format!("/run/ecsnet/{}", lab.name)
        })
        .collect();
    assert_eq!(left, Vec::<String>::new(), "ecsnet down left things behind");
    let out = ecsnet(&["--instance", &lab.name, "stats"]);
    assert_eq!(out.status.code(), Some(2), "stats after down: not up");

    down_leaves_nothing(lab);
}

#[test]
fn two_instances_never_touch_each_other() {
    let a = Lab::up("ia", 1, &[]);
    let b = Lab::up("ib", 1, &[]);
    a.ecsnet_up();
    b.ecsnet_up();
    assert_eq!(
        a.probe(a.client(), "tcp", "10.10.0.1:8080", 4, 10)["echoed"],
        4
    );
    let sa = a.settled_stats();
    let sb = b.settled_stats();
    assert!(sa.tasks[0].ingress.packets >= 4);
    assert_eq!(
        sb.tasks[0].ingress.packets, 0,
        "instance b counted a's traffic"
    );
    ecsnet_ok(&["--instance", &a.name, "down"]);
    assert_eq!(
        b.probe(b.client(), "tcp", "10.10.0.1:8080", 2, 10)["echoed"],
        2
    );
    assert!(
        b.settled_stats().tasks[0].ingress.packets >= 2,
        "b still works after a is down"
    );
}

#[test]
fn xdp_auto_is_off_on_a_veth_uplink_skb_attaches_generic_xdp_and_a_refused_native_falls_back() {
    let lab = Lab::up("ix", 1, &["1:8080:80"]);
    let meta = |lab: &Lab| -> serde_json::Value {
        let text = std::fs::read_to_string(format!("/run/ecsnet/{}.d/meta.json", lab.name))
            .expect("meta file");
        serde_json::from_str(&text).expect("meta parses")
    };

    // The default, auto: the lab's uplink is a veth, so no XDP at all.
    lab.ecsnet_up();
    let eth0 = ns_exec(lab.host(), &["ip", "-d", "link", "show", "eth0"]);
    assert!(!eth0.contains("xdp"), "auto attached XDP to a veth: {eth0}");
    assert_eq!(meta(&lab)["xdpMode"], "off", "{}", meta(&lab));
    let before = lab.settled_stats();
    assert_eq!(
        lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 5, 50)["echoed"],
        5,
        "the published port works without XDP"
    );
    let after = lab.settled_stats();
    assert_eq!(
        after.uplink.xdp.packets, before.uplink.xdp.packets,
        "no XDP program counted anything"
    );
    assert!(
        after.uplink.ingress.packets >= before.uplink.ingress.packets + 5,
        "tc ingress on the uplink saw the traffic: {:?}",
        after.uplink
    );
    ecsnet_ok(&["--instance", &lab.name, "down"]);

    // Asked for: generic XDP.
    lab.ecsnet_up_with(&["--xdp-mode", "skb"]);
    let eth0 = ns_exec(lab.host(), &["ip", "-d", "link", "show", "eth0"]);
    assert!(eth0.contains("xdpgeneric"), "no generic XDP: {eth0}");
    assert_eq!(meta(&lab)["xdpMode"], "skb", "{}", meta(&lab));
    ecsnet_ok(&["--instance", &lab.name, "down"]);

    // Asked for native where the driver refuses it (a veth whose peer's MTU is too large for
    // XDP without frags): generic XDP, and the instance records that, not what was asked.
    ns_exec(lab.client(), &["ip", "link", "set", "eth0", "mtu", "9000"]);
    lab.ecsnet_up_with(&["--xdp-mode", "native"]);
    let eth0 = ns_exec(lab.host(), &["ip", "-d", "link", "show", "eth0"]);
    assert!(
        eth0.contains("xdpgeneric"),
        "no generic XDP after the fallback: {eth0}"
    );
    assert_eq!(meta(&lab)["xdpMode"], "skb", "{}", meta(&lab));
    ecsnet_ok(&["--instance", &lab.name, "down"]);
}

/// The benchmark's helpers run in the namespace they are started in, not where the instance of
/// the same name went up: the benchmark starts them with `ip netns exec` in its own labs.
#[test]
fn bench_helpers_stay_in_the_namespace_they_are_started_in() {
    let lab = Lab::up("ibh", 1, &[]);
    lab.ecsnet_up();
    let bin = ecsnet_bin().display().to_string();
    let _server = Background::start(
        lab.task_ns(1),
        &[
            &bin,
            "--instance",
            &lab.name,
            "bench",
            "serve",
            "--rr-port",
            "7100",
        ],
        Duration::from_millis(700),
    );
    let listening = |ns: &str| ns_exec(ns, &["ss", "-Htln", "sport = :7100"]);
    assert!(
        !listening(lab.task_ns(1)).trim().is_empty(),
        "bench serve started in {} does not listen there",
        lab.task_ns(1)
    );
    assert!(
        listening(lab.host()).trim().is_empty(),
        "bench serve went into the instance's namespace {}",
        lab.host()
    );
}
