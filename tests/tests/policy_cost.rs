//! `ecsnet bench policy-cost` works: it loads two copies of the datapath (1 rule, and 10,000
//! rules in 100 groups), checks that every case gets the verdict it is meant to measure (an
//! allowed SYN passes XDP, a rejected one is dropped by XDP and by tc), and reports a time for
//! each. `progcost::program_cost` (every program on a packet of an established flow) likewise.
//! How fast is not judged here: that is a measurement, reported in docs/BENCHMARKS.md.

use ecsnet_tests::{ecsnet_fails, ecsnet_ok, require_root};

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
    let cases = r["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3, "{r}");
    for c in cases {
        for k in ["oneRuleNs", "manyRulesNs"] {
            let ns = c[k].as_u64().unwrap_or(0);
            assert!(ns > 0 && ns < 1_000_000, "{k} of {c}: a run takes some ns");
        }
    }
    let text = ecsnet_ok(&["bench", "policy-cost", "--repeat", "100", "--rounds", "1"]);
    assert!(
        text.contains("xdp_uplink") && text.contains("tc_uplink_ingress"),
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
