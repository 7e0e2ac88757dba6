//! Security groups on a real lab, with real traffic between real namespaces: every rule kind
//! (`-1`, TCP single port and range, UDP, ICMP by type and `-1`, protocols given as numbers),
//! CIDR sources and destinations, references to other groups that follow membership, the union
//! of several groups, stateful replies, both ends of task-to-task traffic, published ports
//! checked with the real client and the container port (and dropped already in XDP), and
//! `host.defaultPolicy: deny`. Each case is shown allowed and rejected, and every rejection is
//! counted in `stats --json` with its reason on the task it belongs to, and nowhere else.

use ecsnet_tests::{
    Lab,
    sg_probe::{
        IN, OUT, PASS_TIMEOUT, Ping, Probe, Tcp, Udp, Want,
        Want::{Pass, Reject},
        apply, apply_groups, assert_flows, drops_diff, expect, reject, serve,
    },
    traffic::{echo, tcp_connect},
    world::{self, all, instance_ok, perm, sg, state_with_groups, tcp, udp},
};
use serde_json::{Value, json};

const EVERYWHERE: &[&str] = &["0.0.0.0/0"];
const CLIENT: &str = "10.10.0.2";
const CLIENT_ECHO: &str = "10.10.0.2:9000";
/// Task1's published port 8080 on the host's uplink address.
const PUBLISHED: &str = "10.10.0.1:8080";

/// A lab with ecsnet up.
fn lab_up(prefix: &str, tasks: usize, publish: &[&str]) -> Lab {
    // `lab up` returns once its echo servers listen.
    let lab = Lab::up(prefix, tasks, publish);
    lab.ecsnet_up();
    lab
}

/// A lab with ecsnet up and native XDP on its uplink, which `auto` leaves off on a veth.
fn lab_up_native_xdp(prefix: &str, tasks: usize, publish: &[&str]) -> Lab {
    let lab = Lab::up(prefix, tasks, publish);
    lab.ecsnet_up_with(&["--xdp-mode", "native"]);
    lab
}

fn task_addr(lab: &Lab, i: usize, port: u16) -> String {
    format!("{}:{port}", lab.status.tasks[i - 1].address)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn each_rule_kind_allows_its_own_traffic_and_nothing_else() {
    // task1 (no groups, default allow) sends; task2 receives under the rules being tried.
    let lab = lab_up("sgk", 2, &["2:8080:80"]);
    let (t1, t2) = (lab.task_ns(1), lab.task_ns(2));
    let _srv = serve(t2, &[53, 81, 7999, 8000, 8010, 8011], &[53, 54]);
    let addr = |port| task_addr(&lab, 2, port);
    let t2_ip = lab.status.tasks[1].address.to_string();
    let groups = |inbound: &[Value]| {
        let kinds = [sg("sg-k", "kinds", inbound, &[])];
        apply_groups(&lab, &kinds, &[&[], &["sg-k"]]);
    };

    // "-1": every protocol and port.
    groups(&[all(EVERYWHERE)]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Tcp(&addr(80)), Pass, "-1 allows tcp 80"),
        (t1, Tcp(&addr(8011)), Pass, "-1 allows tcp 8011"),
        (t1, Udp(&addr(54)), Pass, "-1 allows udp 54"),
        (t1, Ping(&t2_ip), Pass, "-1 allows icmp"),
    ]);

    // tcp single port and range, udp, icmp type 8: exactly those.
    groups(&[
        tcp(80, 80, EVERYWHERE),
        tcp(8000, 8010, EVERYWHERE),
        udp(53, 53, EVERYWHERE),
        perm("icmp", Some((8, -1)), EVERYWHERE),
    ]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Tcp(&addr(80)), Pass, "tcp 80 allows tcp 80"),
        (t1, Tcp(&addr(81)), Reject(2, IN), "tcp 80 does not allow 81"),
        (t1, Tcp(&addr(8000)), Pass, "tcp 8000-8010 allows its first port"),
        (t1, Tcp(&addr(8010)), Pass, "tcp 8000-8010 allows its last port"),
        (t1, Tcp(&addr(7999)), Reject(2, IN), "tcp 8000-8010 does not allow 7999"),
        (t1, Tcp(&addr(8011)), Reject(2, IN), "tcp 8000-8010 does not allow 8011"),
        (t1, Udp(&addr(53)), Pass, "udp 53 allows udp 53"),
        (t1, Udp(&addr(54)), Reject(2, IN), "udp 53 does not allow udp 54"),
        (t1, Tcp(&addr(53)), Reject(2, IN), "udp 53 does not allow tcp 53"),
        (t1, Ping(&t2_ip), Pass, "icmp type 8 allows ping"),
    ]);

    // icmp type 13 (timestamp) only; protocols as numbers: "17" is udp, "6" is tcp.
    groups(&[
        perm("icmp", Some((13, -1)), EVERYWHERE),
        perm("17", Some((53, 53)), EVERYWHERE),
        perm("6", Some((8000, 8010)), EVERYWHERE),
    ]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Ping(&t2_ip), Reject(2, IN), "icmp type 13 does not allow ping"),
        (t1, Udp(&addr(53)), Pass, "protocol 17 port 53 allows udp 53"),
        (t1, Udp(&addr(54)), Reject(2, IN), "protocol 17 port 53 does not allow udp 54"),
        (t1, Tcp(&addr(8010)), Pass, "protocol 6 8000-8010 allows tcp 8010"),
        (t1, Tcp(&addr(80)), Reject(2, IN), "protocol 6 8000-8010 does not allow tcp 80"),
    ]);

    // icmp -1: every ICMP type, and only ICMP.
    groups(&[perm("icmp", Some((-1, -1)), EVERYWHERE)]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Ping(&t2_ip), Pass, "icmp -1 allows ping"),
        (t1, Udp(&addr(53)), Reject(2, IN), "icmp -1 does not allow udp"),
        (t1, Tcp(&addr(80)), Reject(2, IN), "icmp -1 does not allow tcp"),
    ]);

    let out = instance_ok(&lab, &["sg", "ls"]);
    assert!(
        out.lines().any(|l| l == "  in  icmp all from 0.0.0.0/0"),
        "sg ls does not show the icmp -1 rule:\n{out}"
    );
}

#[test]
fn cidr_sources_and_destinations_decide_who_gets_in_and_where_a_task_reaches_out() {
    let lab = lab_up("sgc", 1, &["1:8080:80", "1:8053:53/udp"]);
    let (client, t1) = (lab.client(), lab.task_ns(1));
    let (web, dns) = (PUBLISHED, "10.10.0.1:8053");
    let groups = |inbound: &[Value], outbound: &[Value]| {
        apply_groups(
            &lab,
            &[sg("sg-c", "cidrs", inbound, outbound)],
            &[&["sg-c"]],
        );
    };

    // The client's /32: in. Out to the client's /32 (tcp) and to its /24 (udp).
    groups(
        &[tcp(80, 80, &["10.10.0.2/32"])],
        &[
            tcp(9000, 9000, &["10.10.0.2/32"]),
            udp(9000, 9000, &["10.10.0.0/24"]),
        ],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(web), Pass, "inbound from 10.10.0.2/32"),
        (client, Udp(dns), Reject(1, IN), "no udp rule from the client"),
        (t1, Tcp(CLIENT_ECHO), Pass, "outbound tcp to 10.10.0.2/32"),
        (t1, Udp(CLIENT_ECHO), Pass, "outbound udp to 10.10.0.0/24"),
        (t1, Ping(CLIENT), Reject(1, OUT), "no outbound icmp rule"),
    ]);

    // Two CIDRs that both hold the client grant together: tcp from its /24, udp from its /32.
    groups(
        &[
            tcp(80, 80, &["10.10.0.0/24"]),
            udp(53, 53, &["10.10.0.2/32"]),
        ],
        &[all(&["10.10.0.0/24"])],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(web), Pass, "inbound tcp from 10.10.0.0/24"),
        (client, Udp(dns), Pass, "inbound udp from 10.10.0.2/32 beside tcp from its /24"),
        (t1, Ping(CLIENT), Pass, "outbound -1 to 10.10.0.0/24"),
    ]);

    // CIDRs that do not hold the client: nothing in, nothing out to it.
    groups(
        &[all(&["10.99.0.0/16"])],
        &[all(&["10.99.0.0/16"]), all(&["10.10.0.3/32"])],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(web), Reject(1, IN), "inbound only from 10.99.0.0/16"),
        (client, Udp(dns), Reject(1, IN), "inbound only from 10.99.0.0/16"),
        (t1, Tcp(CLIENT_ECHO), Reject(1, OUT), "outbound only to 10.99.0.0/16"),
        (t1, Udp(CLIENT_ECHO), Reject(1, OUT), "outbound only to 10.99.0.0/16"),
    ]);
    let s = lab.stats();
    let what = "the allowed flows went through ecsnet's masquerade and published ports";
    assert_flows(&s, "masquerade", 1, what);
    assert_flows(&s, "inbound", 1, what);
}

#[test]
fn group_references_follow_membership_and_sg_ls_shows_rules_and_members() {
    let lab = lab_up("sgr", 3, &["2:8080:80"]);
    let (t1, t3) = (lab.task_ns(1), lab.task_ns(3));
    let db = task_addr(&lab, 2, 80);
    let groups = |db_from: &str| {
        vec![
            sg("sg-app", "app", &[], &[all(EVERYWHERE)]),
            sg("sg-db", "db", &[tcp(80, 80, &[db_from])], &[]),
            sg("sg-other", "other", &[], &[all(EVERYWHERE)]),
        ]
    };
    let ls_has = |lines: &[&str]| {
        let out = instance_ok(&lab, &["sg", "ls"]);
        for want in lines {
            assert!(
                out.lines().any(|l| l == *want),
                "sg ls lacks the line {want:?}:\n{out}"
            );
        }
    };

    // Members as given, the probes as given, then what `sg ls` shows.
    let round = |members: &[&[&str]], cases: &[(&str, Probe, Want, &str)], lines: &[&str]| {
        apply_groups(&lab, &groups("sg-app"), members);
        expect(&lab, cases);
        ls_has(lines);
    };

    // task1 in sg-app, task2 in sg-db (tcp 80 from sg-app), task3 in sg-other.
    #[rustfmt::skip]
    round(&[&["sg-app"], &["sg-db"], &["sg-other"]], &[
        (t1, Tcp(&db), Pass, "task1 is in sg-app"),
        (t3, Tcp(&db), Reject(2, IN), "task3 is not in sg-app"),
    ], &[
        "sg-app (app): members: task1",
        "  in  (none)",
        "  out all to 0.0.0.0/0",
        "sg-db (db): members: task2",
        "  in  tcp 80 from sg-app",
        "  out (none)",
        "sg-other (other): members: task3",
    ]);
    let json: Value = serde_json::from_str(&instance_ok(&lab, &["sg", "ls", "--json"]))
        .expect("sg ls --json parses");
    assert_eq!(json[1]["group"]["GroupId"], "sg-db", "{json}");
    assert_eq!(json[1]["members"], json!(["task2"]), "{json}");

    // Membership moves: task3 joins sg-app, task1 leaves it. The rules follow at once.
    #[rustfmt::skip]
    round(&[&["sg-other"], &["sg-db"], &["sg-app", "sg-other"]], &[
        (t3, Tcp(&db), Pass, "task3 joined sg-app"),
        (t1, Tcp(&db), Reject(2, IN), "task1 left sg-app"),
    ], &[
        "sg-app (app): members: task3",
        "sg-other (other): members: task1, task3",
    ]);

    // `sg apply` with what `aws ec2 describe-security-groups` prints: sg-db now names sg-other.
    let file = world::write(
        &lab,
        "groups.json",
        &json!({"SecurityGroups": groups("sg-other")}),
    );
    let out = instance_ok(&lab, &["sg", "apply", "-f", &file]);
    assert!(out.starts_with("applied 3 security group(s)"), "{out}");
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Tcp(&db), Pass, "task1 is in sg-other"),
        (t3, Tcp(&db), Pass, "task3 is in sg-other"),
    ]);
    ls_has(&["sg-db (db): members: task2", "  in  tcp 80 from sg-other"]);
}

#[test]
fn several_groups_on_a_task_grant_the_union_of_their_rules() {
    let lab = lab_up("sgu", 2, &["1:8080:80"]);
    let (client, t1, t2) = (lab.client(), lab.task_ns(1), lab.task_ns(2));
    let _srv = serve(t1, &[81, 82], &[]);
    let (a80, a81, a82) = (
        task_addr(&lab, 1, 80),
        task_addr(&lab, 1, 81),
        task_addr(&lab, 1, 82),
    );
    let groups = [
        sg(
            "sg-80",
            "web",
            &[tcp(80, 80, EVERYWHERE)],
            &[tcp(9000, 9000, &["10.10.0.2/32"])],
        ),
        sg(
            "sg-81",
            "admin",
            &[tcp(81, 81, EVERYWHERE)],
            &[udp(9000, 9000, &["10.10.0.2/32"])],
        ),
    ];

    // One group alone grants only its own.
    apply_groups(&lab, &groups, &[&["sg-80"], &[]]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t2, Tcp(&a80), Pass, "sg-80 alone: tcp 80"),
        (t2, Tcp(&a81), Reject(1, IN), "sg-80 alone: tcp 81"),
        (t1, Udp(CLIENT_ECHO), Reject(1, OUT), "sg-80 alone: udp out"),
    ]);

    // Both: both ports in, both protocols out; a third port and ping stay out.
    apply_groups(&lab, &groups, &[&["sg-80", "sg-81"], &[]]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t2, Tcp(&a80), Pass, "union: tcp 80 from sg-80"),
        (t2, Tcp(&a81), Pass, "union: tcp 81 from sg-81"),
        (client, Tcp(PUBLISHED), Pass, "union: the published port"),
        (t2, Tcp(&a82), Reject(1, IN), "union: tcp 82 in neither group"),
        (t1, Tcp(CLIENT_ECHO), Pass, "union: tcp out from sg-80"),
        (t1, Udp(CLIENT_ECHO), Pass, "union: udp out from sg-81"),
        (t1, Ping(CLIENT), Reject(1, OUT), "union: icmp out in neither group"),
    ]);
}

#[test]
fn replies_pass_whatever_the_rules_of_the_other_direction() {
    let lab = lab_up("sgs", 2, &["1:8081:80", "2:8080:80", "2:8053:53/udp"]);
    let (client, t1, t2) = (lab.client(), lab.task_ns(1), lab.task_ns(2));
    // task1: no inbound rules, everything out. task2: tcp 80 and udp 53 in, nothing out.
    apply_groups(
        &lab,
        &[
            sg("sg-client", "client", &[], &[all(EVERYWHERE)]),
            sg(
                "sg-server",
                "server",
                &[tcp(80, 80, EVERYWHERE), udp(53, 53, EVERYWHERE)],
                &[],
            ),
        ],
        &[&["sg-client"], &["sg-server"]],
    );

    // task2 answers allowed inbound connections though its egress allows nothing; task1 ->
    // task2: task2's replies leave it and enter task1, which has no inbound rules; task1 gets
    // the replies of its own flows to the outside.
    let to_task2 = task_addr(&lab, 2, 80);
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(PUBLISHED), Pass, "published tcp to task2, replies out"),
        (client, Udp("10.10.0.1:8053"), Pass, "published udp to task2, replies out"),
        (t1, Tcp(&to_task2), Pass, "task1 -> task2, replies both ways"),
        (t1, Tcp(CLIENT_ECHO), Pass, "task1 -> client tcp, replies in"),
        (t1, Udp(CLIENT_ECHO), Pass, "task1 -> client udp, replies in"),
        (t1, Ping(CLIENT), Pass, "task1 -> client ping, reply in"),
    ]);

    // A long conversation: every mid-flow packet, both ways, rides the tracked flow.
    let before = lab.stats();
    let mut s = tcp_connect(client, PUBLISHED.parse().unwrap(), PASS_TIMEOUT)
        .expect("client -> task2's published port");
    s.set_read_timeout(Some(PASS_TIMEOUT)).unwrap();
    for i in 0..50u8 {
        echo(&mut s, &[i; 1000]).expect("echo on the held connection");
    }
    drop(s);
    let diff = drops_diff(&before, &lab.settled_stats());
    assert!(
        diff.is_empty(),
        "a held connection lost packets to drops: {diff:?}"
    );

    // The rules in the other direction are real: neither may open a flow that way.
    #[rustfmt::skip]
    expect(&lab, &[
        (t2, Tcp(CLIENT_ECHO), Reject(2, OUT), "task2 has no outbound rules"),
        (client, Tcp("10.10.0.1:8081"), Reject(1, IN), "task1 has no inbound rules"),
    ]);
}

#[test]
fn task_to_task_checks_the_senders_egress_and_the_receivers_ingress() {
    let lab = lab_up("sgd", 2, &["1:8081:80", "2:8080:80"]);
    let (t1, t2) = (lab.task_ns(1), lab.task_ns(2));
    let _srv = serve(t2, &[81, 82, 83], &[]);
    let to2 = |port| task_addr(&lab, 2, port);
    let (to2_80, to2_81, to2_82, to2_83) = (to2(80), to2(81), to2(82), to2(83));
    let to1 = task_addr(&lab, 1, 80);
    let members: &[&[&str]] = &[&["sg-src"], &["sg-dst"]];
    let src = sg("sg-src", "src", &[], &[tcp(80, 82, &["172.17.0.0/16"])]);
    let dst = |outbound: &[Value]| {
        sg(
            "sg-dst",
            "dst",
            &[
                tcp(80, 81, &["172.17.0.2/32"]),
                tcp(83, 83, &["172.17.0.2/32"]),
            ],
            outbound,
        )
    };
    apply_groups(&lab, &[src.clone(), dst(&[])], members);

    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Tcp(&to2_80), Pass, "task1's egress and task2's ingress allow 80"),
        (t1, Tcp(&to2_81), Pass, "task1's egress and task2's ingress allow 81"),
        (t1, Tcp(&to2_82), Reject(2, IN), "task1's egress allows 82, task2's ingress does not"),
        (t1, Tcp(&to2_83), Reject(1, OUT), "task2's ingress allows 83, task1's egress does not"),
        // The other way round: task2's egress (none) first, then task1's ingress (none).
        (t2, Tcp(&to1), Reject(2, OUT), "task2 has no outbound rules"),
    ]);
    apply_groups(&lab, &[src, dst(&[tcp(80, 80, EVERYWHERE)])], members);
    #[rustfmt::skip]
    expect(&lab, &[
        (t2, Tcp(&to1), Reject(1, IN), "task2 may send to 80, task1 has no inbound rules"),
    ]);
    assert_flows(
        &lab.stats(),
        "eastWest",
        2,
        "the allowed connections were ecsnet's east-west flows",
    );
}

#[test]
fn published_ports_are_checked_with_the_real_client_and_the_container_port_and_dropped_in_xdp() {
    let lab = lab_up_native_xdp("sgp", 1, &["1:8080:80", "1:8053:53/udp"]);
    let client = lab.client();
    let (web, dns) = (Tcp(PUBLISHED), Udp("10.10.0.1:8053"));
    let groups = |inbound: &[Value]| {
        apply_groups(&lab, &[sg("sg-p", "published", inbound, &[])], &[&["sg-p"]]);
    };

    // Rules on the host ports only: the task's rules are about its container ports.
    groups(&[tcp(8080, 8080, EVERYWHERE), udp(8053, 8053, EVERYWHERE)]);
    lab.settled_stats();
    for (probe, what) in [
        (web, "tcp rule on host port 8080 only"),
        (dns, "udp rule on host port 8053 only"),
    ] {
        let (before, after) = reject(&lab, client, probe, (1, IN), what);
        let dropped = drops_diff(&before, &after)[&format!("task1 {IN}")];
        let xdp = after.uplink.xdp.packets - before.uplink.xdp.packets;
        let tc = after.uplink.ingress.packets - before.uplink.ingress.packets;
        assert_eq!(
            (xdp, tc),
            (dropped, 0),
            "{what}: the {dropped} rejected packet(s) should be seen by the uplink's XDP and \
             never reach its tc ingress (uplink before {:?}, after {:?})",
            before.uplink,
            after.uplink
        );
    }

    // Rules naming the addresses a proxy or source NAT would show: not the client's.
    let host = &["10.10.0.1/32", "172.17.0.1/32"];
    groups(&[tcp(80, 80, host), udp(53, 53, host)]);
    #[rustfmt::skip]
    expect(&lab, &[
        (client, web, Reject(1, IN), "tcp 80 only from the host's addresses"),
        (client, dns, Reject(1, IN), "udp 53 only from the host's addresses"),
    ]);

    // The container ports from the real client: in, through tc.
    let real = &["10.10.0.2/32"];
    groups(&[tcp(80, 80, real), udp(53, 53, real)]);
    let before = lab.stats();
    #[rustfmt::skip]
    expect(&lab, &[
        (client, web, Pass, "tcp container port 80 from 10.10.0.2/32"),
        (client, dns, Pass, "udp container port 53 from 10.10.0.2/32"),
    ]);
    let after = lab.stats();
    assert!(
        after.uplink.ingress.packets >= before.uplink.ingress.packets + 4
            && after.uplink.xdp.packets >= before.uplink.xdp.packets + 4,
        "allowed packets pass XDP on to tc: uplink before {:?}, after {:?}",
        before.uplink,
        after.uplink
    );
    assert_flows(
        &after,
        "inbound",
        2,
        "the client's flows to the container ports",
    );
}

#[test]
fn default_policy_deny_blocks_inbound_to_tasks_without_groups_but_lets_them_out() {
    let lab = lab_up_native_xdp("sgn", 2, &["1:8080:80", "2:8081:80"]);
    let (client, t1, t2) = (lab.client(), lab.task_ns(1), lab.task_ns(2));
    let (to1, to2) = (task_addr(&lab, 1, 80), task_addr(&lab, 2, 80));

    // "allow" (the lab's default): no checks at all.
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(PUBLISHED), Pass, "default allow: client -> task1"),
        (t2, Tcp(&to1), Pass, "default allow: task2 -> task1"),
    ]);

    let mut s = state_with_groups(&lab, &[], &[&[], &[]]);
    s["host"]["defaultPolicy"] = json!("deny");
    apply(&lab, &s);
    let what = "deny: client -> task1's published port";
    let (before, after) = reject(&lab, client, Tcp(PUBLISHED), (1, IN), what);
    assert_eq!(
        after.uplink.ingress.packets, before.uplink.ingress.packets,
        "deny: the rejected SYNs should be dropped in XDP, before tc"
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (t2, Tcp(&to1), Reject(1, IN), "deny: task2 -> task1"),
        (t1, Tcp(&to2), Reject(2, IN), "deny: task1 -> task2"),
        (t1, Tcp(CLIENT_ECHO), Pass, "deny: task1 -> client tcp"),
        (t1, Udp(CLIENT_ECHO), Pass, "deny: task1 -> client udp"),
        (t2, Ping(CLIENT), Pass, "deny: task2 -> client ping"),
    ]);
}
