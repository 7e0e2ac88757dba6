//! The IPv6 a task sends, through `BPF_PROG_TEST_RUN` of `tc_task_ingress` (which tail-calls
//! `tc_task_ipv6`), as a table: for each frame the exact verdict, the frame unchanged when it
//! passes, and the exact drop counter. A task speaks only for itself (its address, its
//! link-local address, `::` for duplicate address detection and MLD; its MAC in neighbour
//! discovery), sends no router advertisement, redirect or `DHCPv6` server message, and nothing
//! behind extension headers escapes the checks.
//!
//! In a test run the skb's device is the loopback (ifindex 1), registered as task A's interface.

use ecsnet_common::{
    DropReason,
    maps::{CONFIG_BLOCK_IMDS, DropKey, HOOK_TC_INGRESS, MAP_CONFIG, ROLE_TASK, TASK_IPV6},
    policy::INSTANCE_METADATA_ADDR6,
};
use ecsnet_lab::fixture::{
    datapath::{Datapath, require_test_host},
    harness::run_table,
    packet6::{
        ALL_NODES, EXT_DEST_OPTS, EXT_HOP_BY_HOP, EXT_ROUTING, MLD2_REPORT, ND_NEIGHBOR_ADVERT,
        ND_NEIGHBOR_SOLICIT, ND_OPT_SOURCE_LL, ND_OPT_TARGET_LL, ND_REDIRECT, P6, link_local,
        solicited_node,
    },
    world::{
        IFINDEX_B, MAC_A, MAC_B, NO_SUCH_IFINDEX, Seed, TASK_A, TC_ACT_OK as OK,
        TC_ACT_SHOT as SHOT, TEST_IFINDEX, config, world,
    },
};

/// Task A's and task B's IPv6 addresses, the bridge's, and one nobody has.
const A6: [u8; 16] = v6(2);
const B6: [u8; 16] = v6(3);
const GATEWAY6: [u8; 16] = v6(1);
const NOBODYS6: [u8; 16] = v6(0x99);
/// A client outside.
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

const fn v6(last: u8) -> [u8; 16] {
    [
        0xfd, 0, 0x0e, 0xc5, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 0, last,
    ]
}

/// What task A is: its IPv6 address known or not, a policy or none.
#[derive(Clone, Copy, Debug)]
enum A {
    Known,
    Unknown,
    Policed,
}

struct Case {
    what: &'static str,
    a: A,
    block_imds: bool,
    frame: Vec<u8>,
    /// None: passes unchanged.
    drop: Option<DropReason>,
}

fn case(what: &'static str, a: A, p: P6, drop: Option<DropReason>) -> Case {
    Case {
        what,
        a,
        block_imds: false,
        frame: p.from_mac(MAC_A).frame(),
        drop,
    }
}

fn seeds(a: A) -> Vec<Seed> {
    let mut w = world();
    w.push(Seed::Iface(TEST_IFINDEX, TASK_A, ROLE_TASK));
    w.push(Seed::Task6(B6, IFINDEX_B));
    match a {
        A::Known => {
            w.push(Seed::Task6(A6, TEST_IFINDEX));
            w.push(Seed::TaskFlags(TASK_A, TASK_IPV6));
        }
        A::Unknown => {}
        A::Policed => {
            w.push(Seed::Task(TASK_A, TEST_IFINDEX, MAC_A, 7));
            w.push(Seed::Task6(A6, TEST_IFINDEX));
            w.push(Seed::TaskFlags(TASK_A, TASK_IPV6));
        }
    }
    w
}

#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn cases() -> Vec<Case> {
    use A::{Known, Policed, Unknown};
    use DropReason::{
        BadExtHeader, ImdsBlocked, NdSpoofed, RogueRouter, SgEgress, SpoofedSource, Truncated,
    };
    let echo = |src| P6::echo6(src, B6);
    let na = |src, target, mac| {
        P6::nd(
            src,
            ALL_NODES,
            ND_NEIGHBOR_ADVERT,
            target,
            &[(ND_OPT_TARGET_LL, mac)],
        )
    };
    let ns = |src, dst, mac: Option<[u8; 6]>| {
        let opts: Vec<(u8, [u8; 6])> = mac.map(|m| (ND_OPT_SOURCE_LL, m)).into_iter().collect();
        P6::nd(src, dst, ND_NEIGHBOR_SOLICIT, B6, &opts)
    };
    let mut cases = vec![
        // Sources.
        case("echo from its own address", Known, echo(A6), None),
        case(
            "echo from its link-local address",
            Known,
            echo(link_local(MAC_A)),
            None,
        ),
        case(
            "echo from task B's address",
            Known,
            echo(B6),
            Some(SpoofedSource),
        ),
        case(
            "echo from B's link-local address",
            Known,
            echo(link_local(MAC_B)),
            Some(SpoofedSource),
        ),
        case(
            "echo from an address nobody has, its own known",
            Known,
            echo(NOBODYS6),
            Some(SpoofedSource),
        ),
        case(
            "echo from an address nobody has, its own unknown",
            Unknown,
            echo(NOBODYS6),
            None,
        ),
        case(
            "echo from task B's address, its own unknown",
            Unknown,
            echo(B6),
            Some(SpoofedSource),
        ),
        case("echo from ::", Known, echo([0; 16]), Some(SpoofedSource)),
        case(
            "duplicate address detection from ::",
            Known,
            P6::nd([0; 16], solicited_node(A6), ND_NEIGHBOR_SOLICIT, A6, &[]),
            None,
        ),
        case(
            "MLDv2 report from :: behind hop-by-hop (router alert)",
            Known,
            P6::icmp6([0; 16], ALL_NODES, MLD2_REPORT, 0, &[0, 0, 0, 0]).ext(EXT_HOP_BY_HOP, 0),
            None,
        ),
        // Neighbour discovery.
        case(
            "NA for its own address, its MAC",
            Known,
            na(A6, A6, MAC_A),
            None,
        ),
        case(
            "NA for its link-local address",
            Known,
            na(link_local(MAC_A), link_local(MAC_A), MAC_A),
            None,
        ),
        case(
            "NA for task B's address",
            Known,
            na(A6, B6, MAC_A),
            Some(NdSpoofed),
        ),
        case(
            "NA for task B's address, its own unknown",
            Unknown,
            na(link_local(MAC_A), B6, MAC_A),
            Some(NdSpoofed),
        ),
        case(
            "NA for the gateway's address",
            Known,
            na(A6, GATEWAY6, MAC_A),
            Some(NdSpoofed),
        ),
        case(
            "NA for B's link-local address",
            Known,
            na(A6, link_local(MAC_B), MAC_A),
            Some(NdSpoofed),
        ),
        case(
            "NA for its own address with B's MAC",
            Known,
            na(A6, A6, MAC_B),
            Some(NdSpoofed),
        ),
        case(
            "NA for its own address, fragmented",
            Known,
            na(A6, A6, MAC_A).fragment(0, true, 2),
            Some(NdSpoofed),
        ),
        case(
            "NS with its MAC",
            Known,
            ns(A6, solicited_node(B6), Some(MAC_A)),
            None,
        ),
        case(
            "NS with B's MAC",
            Known,
            ns(A6, solicited_node(B6), Some(MAC_B)),
            Some(NdSpoofed),
        ),
        case("NS without an option", Known, ns(A6, B6, None), None),
        // Routers.
        case(
            "router advertisement",
            Known,
            P6::router_advert(link_local(MAC_A), MAC_A),
            Some(RogueRouter),
        ),
        case(
            "router advertisement behind hop-by-hop and destination options",
            Known,
            P6::router_advert(link_local(MAC_A), MAC_A)
                .ext(EXT_HOP_BY_HOP, 0)
                .ext(EXT_DEST_OPTS, 2),
            Some(RogueRouter),
        ),
        case(
            "router advertisement of a policed task",
            Policed,
            P6::router_advert(link_local(MAC_A), MAC_A),
            Some(RogueRouter),
        ),
        case(
            "redirect",
            Known,
            P6::icmp6(link_local(MAC_A), B6, ND_REDIRECT, 0, &[0; 36]),
            Some(RogueRouter),
        ),
        case(
            "DHCPv6 server message",
            Known,
            P6::udp6(link_local(MAC_A), 547, B6, 546, b"x"),
            Some(RogueRouter),
        ),
        case(
            "DHCPv6 client message",
            Known,
            P6::udp6(link_local(MAC_A), 546, ALL_NODES, 547, b"x"),
            None,
        ),
        // Extension headers and fragments.
        case(
            "TCP behind a routing header of type 2",
            Known,
            P6::syn6(A6, 40000, CLIENT6, 80).ext(EXT_ROUTING, 2),
            None,
        ),
        case(
            "a routing header of type 0",
            Known,
            P6::syn6(A6, 40000, CLIENT6, 80).ext(EXT_ROUTING, 0),
            Some(BadExtHeader),
        ),
        case(
            "hop-by-hop not first",
            Known,
            P6::syn6(A6, 40000, CLIENT6, 80)
                .ext(EXT_DEST_OPTS, 0)
                .ext(EXT_HOP_BY_HOP, 0),
            Some(BadExtHeader),
        ),
        case(
            "a first fragment that cuts the UDP header",
            Known,
            P6::udp6(A6, 547, B6, 546, b"xxxxxxxx")
                .fragment(0, true, 3)
                .cut_l4(4),
            Some(BadExtHeader),
        ),
        case(
            "a later fragment",
            Known,
            P6::udp6(A6, 5000, B6, 53, b"xxxxxxxx")
                .fragment(2, false, 3)
                .cut_l4(8),
            None,
        ),
        case(
            "a payload length past the frame",
            Known,
            echo(A6).payload_len(500),
            Some(Truncated),
        ),
        // Policy and metadata.
        // Its policy has no IPv6 rules: its egress rules drop the echo (`ipv6_datapath.rs`
        // has the rest of the policy).
        case(
            "echo of a policed task without IPv6 rules",
            Policed,
            echo(A6),
            Some(SgEgress),
        ),
    ];
    let mut chain = P6::syn6(A6, 40000, CLIENT6, 80);
    for _ in 0..8 {
        chain = chain.ext(EXT_DEST_OPTS, 0);
    }
    cases.push(case(
        "eight destination options headers",
        Known,
        chain.clone(),
        None,
    ));
    cases.push(case(
        "nine extension headers",
        Known,
        chain.ext(EXT_DEST_OPTS, 0),
        Some(BadExtHeader),
    ));
    let imds = |block| Case {
        block_imds: block,
        ..case(
            "echo to fd00:ec2::254",
            Known,
            P6::echo6(A6, INSTANCE_METADATA_ADDR6),
            None,
        )
    };
    cases.push(imds(false));
    cases.push(Case {
        what: "echo to fd00:ec2::254, blocked",
        drop: Some(ImdsBlocked),
        ..imds(true)
    });
    cases.push(Case {
        what: "echo from its own address and another's MAC",
        frame: echo(A6).from_mac(MAC_B).frame(),
        ..case("", Known, echo(A6), Some(SpoofedSource))
    });
    cases
}

fn check(c: &Case) -> Result<(), String> {
    let mut dp = Datapath::load().expect("the datapath object loads");
    let mut cfg = config(NO_SUCH_IFINDEX);
    if c.block_imds {
        cfg.flags |= CONFIG_BLOCK_IMDS;
    }
    dp.set_first(MAP_CONFIG, cfg).unwrap();
    dp.seed(&seeds(c.a)).unwrap();
    dp.load_programs(&["tc_task_ingress"]).unwrap();
    dp.load_tail_called()
        .expect("the tail-called programs load");
    let r = dp
        .test_run("tc_task_ingress", &c.frame, 1)
        .expect("BPF_PROG_TEST_RUN");
    let drops = dp.drops().unwrap();
    let want_drops: Vec<(DropKey, u64)> = c
        .drop
        .map(|reason| {
            let key = DropKey {
                ifindex: TEST_IFINDEX,
                reason: reason as u8,
                hook: HOOK_TC_INGRESS,
                _pad: [0; 2],
            };
            (key, 1)
        })
        .into_iter()
        .collect();
    let mut got_drops: Vec<(DropKey, u64)> = drops.into_iter().collect();
    got_drops.sort_by_key(|(k, _)| k.reason);
    let mut errs = Vec::new();
    let want_verdict = if c.drop.is_some() { SHOT } else { OK };
    if r.verdict != want_verdict {
        errs.push(format!("verdict {} (want {want_verdict})", r.verdict));
    }
    if got_drops != want_drops {
        let names: Vec<String> = got_drops
            .iter()
            .map(|(k, n)| format!("{}x{n}", DropReason::name_of(k.reason)))
            .collect();
        errs.push(format!("drops {names:?} (want {:?})", c.drop));
    }
    if c.drop.is_none() && r.output != c.frame {
        errs.push("the frame was changed".to_owned());
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

#[test]
fn ipv6_from_a_task_speaks_only_for_itself_and_is_no_router() {
    require_test_host();
    let cases = cases();
    run_table(
        "IPv6 from a task",
        &cases,
        |c| format!("{} ({:?})", c.what, c.a),
        check,
    );
}
