//! The bounded fuzz run of `./x test` (docs/FUZZING.md): random and mutated frames through the
//! uplink's XDP and tc programs and both tc programs of a task's interface with
//! `BPF_PROG_TEST_RUN`, each verdict, output frame and map compared with the model. A few fixed
//! seeds, so a regression shows on every run, and one random seed, printed, so every run also
//! looks somewhere new. A failure prints each
//! disagreement with its replay command (`ecsnet-lab fuzz --replay <seed>`).

use ecsnet_lab::{
    fixture::datapath::require_test_host,
    fuzz::run::{Plan, Summary, random_seed, render, run},
};

/// Packets per seed: about a second each in a debug build.
const PACKETS: u64 = 10_000;

fn fuzz(seed: u64) -> Summary {
    require_test_host();
    let s = run(Plan {
        packets: PACKETS,
        seed,
        replay: None,
        progress: None,
    })
    .unwrap_or_else(|e| panic!("fuzz run with seed {seed}: {e:#}"));
    println!("seed {seed}:\n{}", render(&s));
    assert_eq!(
        s.disagreements,
        0,
        "seed {seed}: the datapath disagrees with the model:\n\n{}",
        render(&s)
    );
    assert!(
        s.packets >= PACKETS,
        "seed {seed}: ran {} packets",
        s.packets
    );
    s
}

/// How many compared frames went a way whose name starts with `path`.
fn went(s: &Summary, path: &str) -> u64 {
    s.verdicts
        .iter()
        .filter(|(p, _)| p.starts_with(path))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn fixed_seeds_agree_with_the_model_and_reach_every_path() {
    let mut all = Summary::default();
    for seed in [1, 19, 2026] {
        let s = fuzz(seed);
        all.packets += s.packets;
        for (path, n) in s.verdicts {
            *all.verdicts.entry(path).or_default() += n;
        }
    }
    // Not a vacuous run: the frames reach the decisions that matter, compared each time.
    for path in [
        "redirect: opened east-west",
        "redirect: opened inbound",
        "redirect: opened hairpin",
        "redirect: tracked masquerade",
        "redirect: ICMP error of a tracked",
        "pass: opened local",
        "pass: tracked local, delivered",
        "drop: dropped SG_EGRESS",
        "drop: dropped SG_INGRESS",
        "drop: dropped SPOOFED_SOURCE",
        "drop: dropped TRUNCATED",
        "drop: dropped FRAGMENT",
        "drop: dropped TCP_OUT_OF_WINDOW",
        "drop: dropped BAD_IP_CHECKSUM",
        "drop: dropped VLAN_TAGGED",
        "drop: dropped ROGUE_ROUTER",
        "drop: dropped ND_SPOOFED",
        "drop: dropped BAD_EXT_HEADER",
        "xdp drop: dropped SG_INGRESS early",
        "xdp pass",
    ] {
        assert!(
            went(&all, path) > 0,
            "no frame of {} packets went \"{path}\": the generator no longer reaches it",
            all.packets
        );
    }
}

#[test]
fn a_random_seed_agrees_with_the_model() {
    let seed = random_seed();
    println!("random seed {seed} (rerun: ecsnet-lab fuzz --packets {PACKETS} --seed {seed})");
    fuzz(seed);
}
