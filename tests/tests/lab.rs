//! The lab without ecsnet is real bridge mode: task to task over docker0, the client reaching
//! published ports through Docker's DNAT, tasks reaching the client through MASQUERADE.

use ecsnet_tests::{
    Lab, ecsnet_fails, ecsnet_ok, leftovers, rule_packets,
    world::{self, down_leaves_nothing},
};

#[test]
fn lab_is_bridge_mode_and_goes_away() {
    let lab = Lab::up("lb", 2, &["1:8080:80", "2:0:80", "2:5353:53/udp"]);
    let s = &lab.status;
    assert_eq!(s.host.uplink, "eth0");
    assert_eq!(s.host.bridge, "docker0");
    assert_eq!(s.host.uplink_address.to_string(), "10.10.0.1");
    assert_eq!(s.host.bridge_address.to_string(), "172.17.0.1");
    assert_eq!(s.client.address.to_string(), "10.10.0.2");
    assert_eq!(s.tasks.len(), 2);
    assert_eq!(s.tasks[1].address.to_string(), "172.17.0.3");
    assert!(s.tasks[0].interface.starts_with("veth"));
    let dynamic = s.tasks[1].port_mappings[0].host_port;
    assert_eq!(
        dynamic, 32768,
        "dockerd gives the first dynamic port of its range (ip_local_port_range) first"
    );

    // status --json agrees with what up printed, and the state file names the same tasks.
    let status: serde_json::Value = serde_json::from_str(&ecsnet_ok(&[
        "lab", "status", "--name", &lab.name, "--json",
    ]))
    .unwrap();
    assert_eq!(status["tasks"][1]["portMappings"][0]["hostPort"], dynamic);
    let state = world::state(&lab);
    assert_eq!(
        state["tasks"][0]["interface"],
        s.tasks[0].interface.as_str()
    );
    assert_eq!(state["host"]["bridge"], "docker0");

    // Client -> published ports: through Docker's DNAT rules.
    let dnat_before = rule_packets(lab.host(), "nat", "DOCKER", "dpt:8080");
    let r = lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 5, 100);
    assert_eq!(r["echoed"], 5);
    assert_eq!(
        rule_packets(lab.host(), "nat", "DOCKER", "dpt:8080"),
        dnat_before + 1,
        "one new connection, one DNAT"
    );
    assert_eq!(
        lab.probe(lab.client(), "tcp", &format!("10.10.0.1:{dynamic}"), 3, 64)["echoed"],
        3
    );
    assert_eq!(
        lab.probe(lab.client(), "udp", "10.10.0.1:5353", 4, 64)["echoed"],
        4
    );

    // Task -> task over the bridge, seen by br_netfilter in FORWARD.
    let fwd_before = rule_packets(lab.host(), "filter", "FORWARD", "docker0 docker0");
    assert_eq!(
        lab.probe(lab.task_ns(1), "tcp", "172.17.0.3:80", 5, 100)["echoed"],
        5
    );
    assert!(rule_packets(lab.host(), "filter", "FORWARD", "docker0 docker0") > fwd_before);

    // Task -> outside, masqueraded to the uplink address.
    let masq_before = rule_packets(lab.host(), "nat", "POSTROUTING", "172.17.0.0/16");
    assert_eq!(
        lab.probe(lab.task_ns(2), "tcp", "10.10.0.2:9000", 3, 100)["echoed"],
        3
    );
    assert_eq!(
        rule_packets(lab.host(), "nat", "POSTROUTING", "172.17.0.0/16"),
        masq_before + 1
    );

    // Hairpin: a task reaching the host's address on another task's published port.
    assert_eq!(
        lab.probe(lab.task_ns(2), "tcp", "10.10.0.1:8080", 2, 10)["echoed"],
        2
    );

    down_leaves_nothing(lab);
}

#[test]
fn lab_bad_input_is_one_line_and_exit_2() {
    #[rustfmt::skip]
    let bad_ups: [&[&str]; 5] = [
        &["--name", "Bad Name"],
        &["--name", "lbbad", "--tasks", "0"],
        &["--name", "lbbad", "--tasks", "1", "--publish", "2:80:80"],
        &["--name", "lbbad", "--tasks", "2", "--publish", "1:80:80", "--publish", "2:80:81"],
        &["--name", "lbbad", "--publish", "1:80:80/sctp"],
    ];
    for args in bad_ups {
        ecsnet_fails(&[&["lab", "up"], args].concat(), 2);
    }
    ecsnet_fails(&["lab", "status", "--name", "lbnope"], 2);
    ecsnet_fails(&["lab", "down", "--name", "lbnope"], 2);
    assert_eq!(leftovers("lbbad"), Vec::<String>::new());

    let lab = Lab::up("lb", 1, &[]);
    let line = ecsnet_fails(&["lab", "up", "--name", &lab.name], 2);
    assert!(line.contains("already exists"), "{line}");
}
