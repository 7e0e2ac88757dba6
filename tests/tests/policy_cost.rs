//! `ecsnet bench policy-cost` works: it loads copies of the datapath (1 rule of each family,
//! and 10,000 of each in 100 groups each; for IPv6 also 17 rules, one per prefix length),
//! checks that every case gets the verdict it is meant to measure (an allowed SYN passes XDP, a
//! rejected one is dropped by XDP and by tc; an IPv6 SYN from task to task passes or is dropped
//! as the receiver's rules say), and reports a time for each. The copy with 10,000 rules holds
//! the `SG_PEERS6` entries its IPv6 rules expand to, and probes every prefix length for them.
//! `progcost::program_cost` (every program on a packet of an established flow) likewise.
//! How fast is not judged here: that is a measurement, reported in docs/BENCHMARKS.md.

use std::{collections::HashSet, net::Ipv6Addr};

use ecsnet_tests::{ecsnet_fails, ecsnet_ok, require_root};

/// The `SG_PEERS6` entries of a state whose one task is in every group: each `Ipv6Ranges`
/// CIDR as blocks of the next multiple-of-8 length, nested or repeated ones counted once.
fn expanded_blocks6(state: &ecsnet::state::State) -> usize {
    let mut blocks = HashSet::new();
    let ranges = state
        .security_groups
        .iter()
        .flat_map(|g| &g.ip_permissions)
        .flat_map(|p| &p.ipv6_ranges);
    for r in ranges {
        let (addr, len) = r.cidr_ipv6.split_once('/').expect("a CIDR");
        let addr = u128::from(addr.parse::<Ipv6Addr>().expect("an IPv6 address"));
        let len: u32 = len.parse().expect("a prefix length");
        let block = len.div_ceil(8) * 8;
        for k in 0..1u128 << (block - len) {
            blocks.insert((addr | k.checked_shl(128 - block).unwrap_or(0), block));
        }
    }
    blocks.len()
}

#[test]
fn policy_cost_measures_every_case_with_the_verdict_it_is_meant_to() {
    require_root();
    let out = ecsnet_ok(&[
        "bench",
        "policy-cost",
        "--rules",
        "10000",
        "--groups",
        "100",
        "--repeat",
        "2000",
        "--rounds",
        "3",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).expect("--json parses");
    assert_eq!(r["rules"], 10000);
    assert_eq!(r["groups"], 100);
    // 10,000 rules with distinct CIDRs and ports cannot compile to a handful of entries.
    assert!(r["peerEntries"].as_u64().unwrap() > 1000, "{r}");
    assert!(r["ruleEntries"].as_u64().unwrap() > 100, "{r}");
    // Every IPv6 CIDR of the generated rules is in the map, expanded, and every prefix length
    // the datapath may probe is in the receiver's mask: an IPv6 check makes all 17 probes.
    let state6 = ecsnet_lab::progcost::generated_state6(10_000, 100);
    assert_eq!(r["peerEntries6"], expanded_blocks6(&state6), "{r}");
    assert!(r["peerEntries6"].as_u64().unwrap() > 10_000, "{r}");
    let every: Vec<u64> = (0..=16).rev().map(|l| l * 8).collect();
    assert_eq!(r["levels6"], serde_json::json!(every), "{r}");
    assert_eq!(r["everyLevelLevels6"], serde_json::json!(every), "{r}");
    assert_eq!(r["oneRuleLevels6"], serde_json::json!([0]), "{r}");
    let cases = r["cases"].as_array().expect("cases");
    // (family, program, verdict), in order: XDP_PASS 2, XDP_DROP 1, TC_ACT_SHOT 2, TC_ACT_OK 0.
    let want = [
        ("IPv4", "xdp_uplink", 2),
        ("IPv4", "xdp_uplink", 1),
        ("IPv4", "tc_uplink_ingress", 2),
        ("IPv6", "tc_task_ingress", 0),
        ("IPv6", "tc_task_ingress", 2),
    ];
    let got: Vec<(&str, &str, u64)> = cases
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("?");
            (
                s("family"),
                s("program"),
                c["verdict"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(got, want, "{r}");
    for c in cases {
        let mut times = vec!["oneRuleNs", "manyRulesNs"];
        if c["family"] == "IPv6" {
            times.push("everyLevelNs");
        } else {
            assert!(c["everyLevelNs"].is_null(), "{c}");
        }
        for k in times {
            let ns = c[k].as_u64().unwrap_or(0);
            assert!(ns > 0 && ns < 1_000_000, "{k} of {c}: a run takes some ns");
        }
    }
    let text = ecsnet_ok(&["bench", "policy-cost", "--repeat", "100", "--rounds", "1"]);
    assert!(
        text.contains("xdp_uplink")
            && text.contains("tc_uplink_ingress")
            && text.contains("tc_task_ingress")
            && text.contains("IPv6 SYN"),
        "{text}"
    );
    let line = ecsnet_fails(&["bench", "policy-cost", "--groups", "0"], 2);
    assert!(line.contains("--groups"), "{line}");
}

/// `ecsnet_lab::progcost::program_cost` measures every datapath program on the packet it is meant
/// to: each case's verdict is the one its set-up should produce (the function itself fails on
/// any other), and every time is a plausible per-packet time.
#[test]
fn program_cost_measures_every_program_with_the_verdict_it_is_meant_to() {
    require_root();
    let costs = ecsnet_lab::progcost::program_cost(1000, 1).expect("program_cost");
    println!("{}", ecsnet_lab::progcost::render_programs(&costs));
    // Each program's verdicts, in case order: XDP_PASS 2, TC_ACT_OK 0, TC_ACT_REDIRECT 7.
    let want: [(&str, &[u32]); 5] = [
        ("xdp_uplink", &[2]),
        ("tc_uplink_ingress", &[7, 7]),
        ("tc_task_ingress", &[7, 0]),
        ("tc_task_egress", &[0]),
        ("tc_uplink_egress", &[0]),
    ];
    for (program, verdicts) in want {
        let got: Vec<u32> = costs
            .iter()
            .filter(|c| c.program == program)
            .map(|c| c.verdict)
            .collect();
        assert_eq!(got, verdicts, "verdicts of {program}: {costs:#?}");
    }
    assert_eq!(
        costs.len(),
        want.iter().map(|(_, v)| v.len()).sum::<usize>(),
        "{costs:#?}"
    );
    for c in &costs {
        assert!(!c.case.is_empty(), "{c:?}");
        assert!(c.ns > 0 && c.ns < 1_000_000, "a run takes some ns: {c:?}");
    }
    let text = ecsnet_lab::progcost::render_programs(&costs);
    for (program, _) in want {
        assert!(text.contains(program), "{text}");
    }
}
