//! Security groups over IPv6 on a real dual-stack lab (`--ipv6 nat`), with real traffic: the
//! matrix of `policy.rs` again with IPv6 peers. Every rule kind (`-1`, TCP port and range, UDP,
//! `ICMPv6` by type and `-1`), `Ipv6Ranges` that apply to IPv6 only and `IpRanges` to IPv4 only,
//! both directions of task-to-task traffic, published ports (the kernel's NAT66 keeps the
//! client's address) and the outside (its masquerade) judged with the real peer, replies,
//! references to groups that resolve to their members' IPv6 addresses, the union of groups,
//! `defaultPolicy: deny`, `fd00:ec2::254` blocked, and Docker's routed mode (tasks judged at
//! their own addresses). Each case is shown allowed and rejected, every rejection counted with
//! its reason on its task and nowhere else, and no namespace received an IPv6 packet with a bad
//! checksum.

use std::{net::Ipv6Addr, time::Duration};

use ecsnet_tests::{
    Lab, csum6_errors,
    sg_probe::{
        IN, OUT, Ping, Tcp, Udp, Want::Pass, Want::Reject, apply, apply_groups, expect, serve,
    },
    traffic::tcp_connect,
    world::{all, instance_ok, perm, sg, state_with_groups, tcp, udp},
};
use serde_json::{Value, json};

const EVERYWHERE6: &[&str] = &["::/0"];
const EVERYWHERE4: &[&str] = &["0.0.0.0/0"];
/// The lab's client and its echo server, over IPv6.
const CLIENT: &str = "fd00:10:10::2";
const CLIENT_ECHO: &str = "[fd00:10:10::2]:9000";
/// Task1's published ports on the host's uplink IPv6 address.
const PUBLISHED: &str = "[fd00:10:10::1]:8080";
const PUBLISHED_DNS: &str = "[fd00:10:10::1]:8053";

/// A dual-stack lab (Docker's NAT66 for published ports and the outside) with ecsnet up.
fn lab_up(prefix: &str, tasks: usize, publish: &[&str]) -> Lab {
    let lab = Lab::up_v6(prefix, tasks, publish, "nat");
    assert_eq!(
        lab.status.host.uplink_address6,
        Some(Ipv6Addr::from([0xfd00, 0x10, 0x10, 0, 0, 0, 0, 1])),
        "the lab's host address is what PUBLISHED names"
    );
    lab.ecsnet_up();
    lab
}

fn addr6(lab: &Lab, i: usize) -> Ipv6Addr {
    lab.status.tasks[i - 1]
        .address6
        .unwrap_or_else(|| panic!("task{i} has no IPv6 address: {:?}", lab.status))
}

/// `[task i's IPv6 address]:port`.
fn at6(lab: &Lab, i: usize, port: u16) -> String {
    format!("[{}]:{port}", addr6(lab, i))
}

/// No namespace of the lab received IPv6 with a bad checksum.
fn no_csum6_errors(lab: &Lab) {
    let mut all = vec![lab.host().to_owned(), lab.client().to_owned()];
    all.extend(lab.status.tasks.iter().map(|t| t.netns.clone()));
    for ns in all {
        let errors = csum6_errors(&ns);
        assert!(
            errors.iter().all(|(_, n)| *n == 0),
            "{ns} received IPv6 with bad checksums: {errors:?}"
        );
    }
}

#[test]
fn each_rule_kind_allows_its_own_ipv6_and_each_family_its_own_ranges() {
    // task1 (no groups) sends; task2 receives under the rules being tried.
    let lab = lab_up("s6k", 2, &[]);
    let (t1, t2) = (lab.task_ns(1), lab.task_ns(2));
    let _srv = serve(t2, &[53, 81, 7999, 8000, 8010, 8011], &[53, 54]);
    let addr = |port| at6(&lab, 2, port);
    let t2_ip = addr6(&lab, 2).to_string();
    let v4 = format!("{}:80", lab.status.tasks[1].address);
    let groups = |inbound: &[Value]| {
        apply_groups(
            &lab,
            &[sg("sg-k", "kinds", inbound, &[])],
            &[&[], &["sg-k"]],
        );
    };

    groups(&[all(EVERYWHERE6)]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Tcp(&addr(80)), Pass, "-1 from ::/0 allows tcp 80"),
        (t1, Tcp(&addr(8011)), Pass, "-1 from ::/0 allows tcp 8011"),
        (t1, Udp(&addr(54)), Pass, "-1 from ::/0 allows udp 54"),
        (t1, Ping(&t2_ip), Pass, "-1 from ::/0 allows icmpv6"),
        (t1, Tcp(&v4), Reject(2, IN), "::/0 is no IPv4 range"),
    ]);

    groups(&[all(EVERYWHERE4)]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Tcp(&v4), Pass, "-1 from 0.0.0.0/0 allows IPv4"),
        (t1, Tcp(&addr(80)), Reject(2, IN), "0.0.0.0/0 is no IPv6 range"),
        (t1, Ping(&t2_ip), Reject(2, IN), "0.0.0.0/0 allows no icmpv6"),
    ]);

    groups(&[
        tcp(80, 80, EVERYWHERE6),
        tcp(8000, 8010, EVERYWHERE6),
        udp(53, 53, EVERYWHERE6),
        perm("icmpv6", Some((128, -1)), EVERYWHERE6),
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
        (t1, Ping(&t2_ip), Pass, "icmpv6 type 128 allows ping"),
    ]);

    // icmpv6 type 129 (echo reply) only; "58" is icmpv6, "icmp" is IPv4's alone.
    groups(&[
        perm("58", Some((129, -1)), EVERYWHERE6),
        perm("17", Some((53, 53)), EVERYWHERE6),
    ]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Ping(&t2_ip), Reject(2, IN), "icmpv6 type 129 does not allow an echo request"),
        (t1, Udp(&addr(53)), Pass, "protocol 17 port 53 allows udp 53"),
    ]);
    groups(&[perm("icmp", Some((-1, -1)), EVERYWHERE6)]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Ping(&t2_ip), Reject(2, IN), "icmp (IPv4's) -1 does not allow icmpv6"),
    ]);
    groups(&[perm("icmpv6", Some((-1, -1)), EVERYWHERE6)]);
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Ping(&t2_ip), Pass, "icmpv6 -1 allows ping"),
        (t1, Udp(&addr(53)), Reject(2, IN), "icmpv6 -1 does not allow udp"),
        (t1, Tcp(&addr(80)), Reject(2, IN), "icmpv6 -1 does not allow tcp"),
    ]);
    no_csum6_errors(&lab);
}

#[test]
fn ipv6_cidrs_decide_who_reaches_a_published_port_and_where_a_task_reaches_out() {
    let lab = lab_up("s6c", 1, &["1:8080:80", "1:8053:53/udp"]);
    let (client, t1) = (lab.client(), lab.task_ns(1));
    let (web, dns) = (Tcp(PUBLISHED), Udp(PUBLISHED_DNS));
    let groups = |inbound: &[Value], outbound: &[Value]| {
        apply_groups(
            &lab,
            &[sg("sg-c", "cidrs", inbound, outbound)],
            &[&["sg-c"]],
        );
    };

    // The client's /128 in, on the container port; out to its /128 (tcp) and /64 (udp).
    groups(
        &[tcp(80, 80, &["fd00:10:10::2/128"])],
        &[
            tcp(9000, 9000, &["fd00:10:10::2/128"]),
            udp(9000, 9000, &["fd00:10:10::/64"]),
        ],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, web, Pass, "inbound from fd00:10:10::2/128"),
        (client, dns, Reject(1, IN), "no udp rule from the client"),
        (t1, Tcp(CLIENT_ECHO), Pass, "outbound tcp to fd00:10:10::2/128"),
        (t1, Udp(CLIENT_ECHO), Pass, "outbound udp to fd00:10:10::/64"),
        (t1, Ping(CLIENT), Reject(1, OUT), "no outbound icmpv6 rule"),
    ]);

    // A /57 (not a multiple of 8) and a /64 that both hold the client grant together.
    groups(
        &[
            tcp(80, 80, &["fd00:10:10::/57"]),
            udp(53, 53, &["fd00:10:10::/64"]),
        ],
        &[all(&["fd00:10:10::/48"])],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, web, Pass, "inbound tcp from fd00:10:10::/57"),
        (client, dns, Pass, "inbound udp from its /64 beside tcp from the /57"),
        (t1, Ping(CLIENT), Pass, "outbound -1 to fd00:10:10::/48"),
    ]);

    // The rules on the host ports only: they are about container ports.
    groups(
        &[tcp(8080, 8080, EVERYWHERE6), udp(8053, 8053, EVERYWHERE6)],
        &[],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, web, Reject(1, IN), "a rule on host port 8080 only"),
        (client, dns, Reject(1, IN), "a rule on host port 8053 only"),
    ]);

    // CIDRs that do not hold the client: nothing in, nothing out to it.
    groups(
        &[all(&["fd00:99::/32"])],
        &[all(&["fd00:99::/32"]), all(&["fd00:10:10::3/128"])],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, web, Reject(1, IN), "inbound only from fd00:99::/32"),
        (client, dns, Reject(1, IN), "inbound only from fd00:99::/32"),
        (t1, Tcp(CLIENT_ECHO), Reject(1, OUT), "outbound only to fd00:99::/32"),
        (t1, Udp(CLIENT_ECHO), Reject(1, OUT), "outbound only to fd00:99::/32"),
    ]);
    no_csum6_errors(&lab);
}

#[test]
fn ipv6_references_unions_and_replies_follow_the_groups() {
    let lab = lab_up("s6r", 3, &["2:8080:80"]);
    let (client, t1, t2, t3) = (lab.client(), lab.task_ns(1), lab.task_ns(2), lab.task_ns(3));
    let _srv = serve(t2, &[81, 82], &[]);
    let to2 = |port| at6(&lab, 2, port);
    let (to2_80, to2_81, to2_82) = (to2(80), to2(81), to2(82));
    let to1 = at6(&lab, 1, 80);
    let groups = |db_from: &str| {
        vec![
            sg("sg-app", "app", &[], &[all(EVERYWHERE6)]),
            sg("sg-db", "db", &[tcp(80, 80, &[db_from])], &[]),
            sg("sg-81", "admin", &[tcp(81, 81, EVERYWHERE6)], &[]),
            sg("sg-other", "other", &[], &[all(EVERYWHERE6)]),
        ]
    };

    // task1 in sg-app, task2 in sg-db (tcp 80 from sg-app), task3 in sg-other.
    apply_groups(
        &lab,
        &groups("sg-app"),
        &[&["sg-app"], &["sg-db"], &["sg-other"]],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (t1, Tcp(&to2_80), Pass, "task1 is in sg-app: its IPv6 address is a member's"),
        (t3, Tcp(&to2_80), Reject(2, IN), "task3 is not in sg-app"),
        (t3, Tcp(&to2_81), Reject(2, IN), "task2 is not in sg-81 yet"),
        // Replies: task2 answers though it has no outbound rules, task1 gets them back
        // though it has no inbound ones.
        (t2, Tcp(&to1), Reject(2, OUT), "task2 has no outbound rules"),
        (client, Tcp(PUBLISHED), Reject(2, IN), "the client is in no group"),
    ]);
    let out = instance_ok(&lab, &["sg", "ls"]);
    assert!(
        out.lines().any(|l| l == "  out all to ::/0"),
        "sg ls does not show the ::/0 rule:\n{out}"
    );

    // Membership moves and groups add up: task3 joins sg-app, task2 sg-81 too.
    apply_groups(
        &lab,
        &groups("sg-app"),
        &[&["sg-other"], &["sg-db", "sg-81"], &["sg-app", "sg-other"]],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (t3, Tcp(&to2_80), Pass, "task3 joined sg-app"),
        (t1, Tcp(&to2_80), Reject(2, IN), "task1 left sg-app"),
        (t1, Tcp(&to2_81), Pass, "union: tcp 81 from sg-81"),
        (t3, Tcp(&to2_82), Reject(2, IN), "union: tcp 82 in neither group"),
    ]);
    let s = lab.stats();
    assert!(
        s.conntrack.ipv6.flows.get("eastWest").copied().unwrap_or(0) >= 2,
        "the allowed IPv6 connections were ecsnet's east-west flows: {:?}",
        s.conntrack.ipv6
    );
    no_csum6_errors(&lab);
}

#[test]
fn ipv6_default_deny_lets_tasks_out_only_and_the_metadata_address_is_blocked() {
    let lab = lab_up("s6n", 2, &["1:8080:80"]);
    let (client, t1, t2) = (lab.client(), lab.task_ns(1), lab.task_ns(2));
    let (to1, to2) = (at6(&lab, 1, 80), at6(&lab, 2, 80));
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(PUBLISHED), Pass, "default allow: client -> task1"),
        (t2, Tcp(&to1), Pass, "default allow: task2 -> task1"),
    ]);

    let mut s = state_with_groups(&lab, &[], &[&[], &[]]);
    s["host"]["defaultPolicy"] = json!("deny");
    s["host"]["blockInstanceMetadata"] = json!(true);
    apply(&lab, &s);
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(PUBLISHED), Reject(1, IN), "deny: client -> task1's published port"),
        (t2, Tcp(&to1), Reject(1, IN), "deny: task2 -> task1"),
        (t1, Tcp(&to2), Reject(2, IN), "deny: task1 -> task2"),
        (t1, Tcp(CLIENT_ECHO), Pass, "deny: task1 -> client tcp"),
        (t1, Udp(CLIENT_ECHO), Pass, "deny: task1 -> client udp"),
        (t2, Ping(CLIENT), Pass, "deny: task2 -> client ping"),
        (t1, Tcp("[fd00:ec2::254]:80"), Reject(1, "IMDS_BLOCKED"), "fd00:ec2::254 blocked"),
    ]);
    no_csum6_errors(&lab);
}

#[test]
fn routed_mode_tasks_are_judged_at_their_own_addresses() {
    // Docker 27's routed mode: no NAT66, the client reaches the task's own address on its
    // published port, and the task's traffic leaves with its own address.
    let lab = Lab::up_v6("s6o", 1, &["1:8080:80"], "routed");
    lab.ecsnet_up();
    let (client, t1) = (lab.client(), lab.task_ns(1));
    let web = at6(&lab, 1, 80);
    let groups = |inbound: &[Value], outbound: &[Value]| {
        apply_groups(
            &lab,
            &[sg("sg-o", "routed", inbound, outbound)],
            &[&["sg-o"]],
        );
    };

    groups(
        &[tcp(80, 80, &["fd00:10:10::2/128"])],
        &[tcp(9000, 9000, &["fd00:10:10::2/128"])],
    );
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(&web), Pass, "routed: inbound from the client's /128"),
        (t1, Tcp(CLIENT_ECHO), Pass, "routed: outbound to the client's /128, replies in"),
        (t1, Udp(CLIENT_ECHO), Reject(1, OUT), "routed: no outbound udp rule"),
    ]);
    groups(&[tcp(80, 80, &["fd00:99::/32"])], &[]);
    #[rustfmt::skip]
    expect(&lab, &[
        (client, Tcp(&web), Reject(1, IN), "routed: inbound only from fd00:99::/32"),
        (t1, Tcp(CLIENT_ECHO), Reject(1, OUT), "routed: no outbound rules"),
    ]);

    // Docker publishes nothing on the host's IPv6 addresses in routed mode, and so neither
    // does ecsnet: the host port there reaches no task, and no inbound flow is tracked.
    groups(&[all(EVERYWHERE6)], &[]);
    let on_host = PUBLISHED.parse().expect("a socket address");
    let reached = tcp_connect(client, on_host, Duration::from_secs(1));
    assert!(
        reached.is_err(),
        "routed: {PUBLISHED} reached a task: {reached:?}"
    );
    let inbound = lab.stats().conntrack.ipv6.flows.get("inbound").copied();
    assert_eq!(inbound, None, "routed: an inbound IPv6 flow was tracked");
    no_csum6_errors(&lab);
}
