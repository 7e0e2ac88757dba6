//! Every datapath program loads, and stays well inside the verifier's budget: the kernel stops
//! at 1,000,000 processed instructions per program, and `tc_task_ingress` was at 515,000 before
//! its new-flow path moved into `tc_task_new_flow` (issue 16). A program that crosses the
//! warning line here fails with its count, before the next change takes it over the limit and
//! the verifier's refusal is all anyone sees.

use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp},
};

/// The verifier's limit of processed instructions for one program.
const VERIFIER_LIMIT: u32 = 1_000_000;
/// Where a program's count becomes a failure: room for the next feature is part of the design.
const WARNING_LINE: u32 = VERIFIER_LIMIT * 3 / 4;

const TC_PROGRAMS: [&str; 10] = [
    "tc_task_ingress",
    "tc_task_new_flow",
    "tc_task_ipv6",
    "tc_task_ipv6_flow",
    "tc_task_ipv6_nat",
    "tc_task_ipv6_to",
    "tc_task_egress",
    "tc_uplink_ingress",
    "tc_uplink_ipv6",
    "tc_uplink_egress",
];

#[test]
fn every_program_verifies_with_room_to_spare() {
    ecsnet_tests::require_root();
    let mut ebpf = Ebpf::load(ecsnet::kernel::datapath::DATAPATH)
        .expect("the datapath object loads: does this kernel have BTF and tcx?");
    let mut counts = Vec::new();
    for name in TC_PROGRAMS {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load()
            .unwrap_or_else(|e| panic!("{name} does not verify: {e:?}"));
        let n = p.info().unwrap().verified_instruction_count().unwrap();
        counts.push((name, n));
    }
    let x: &mut Xdp = ebpf.program_mut("xdp_uplink").unwrap().try_into().unwrap();
    x.load()
        .unwrap_or_else(|e| panic!("xdp_uplink does not verify: {e:?}"));
    counts.push((
        "xdp_uplink",
        x.info().unwrap().verified_instruction_count().unwrap(),
    ));
    for (name, n) in &counts {
        println!("{name}: {n} instructions verified");
    }
    for (name, n) in &counts {
        assert!(
            *n > 0,
            "{name}: the kernel reported no verified instructions"
        );
        assert!(
            *n < WARNING_LINE,
            "{name}: {n} instructions verified, past {WARNING_LINE} of the verifier's \
             {VERIFIER_LIMIT}: split it (a tail call, as tc_task_new_flow) before adding to it"
        );
    }
}
