//! `ecsnet bench flow-logs` works end to end: it builds a lab of its own, runs iperf3 on both
//! paths with flow logging off and on, reports each round and the medians, and leaves nothing
//! behind. How fast is not judged here: that is a measurement, reported in docs/BENCHMARKS.md.

use ecsnet_tests::{ecsnet_fails, ecsnet_ok, require_root};

/// Namespaces a benchmark lab (`bfl<pid>`) left behind.
fn bench_leftovers() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bfl"))
        .collect()
}

#[test]
fn flow_log_bench_measures_both_paths_in_both_modes_and_cleans_up() {
    require_root();
    let out = ecsnet_ok(&[
        "bench",
        "flow-logs",
        "--rounds",
        "2",
        "--seconds",
        "1",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).expect("--json parses");
    assert_eq!(
        (r["rounds"].as_u64(), r["windowSecs"].as_u64()),
        (Some(2), Some(1))
    );
    let paths = r["paths"].as_array().expect("paths");
    let names: Vec<&str> = paths.iter().filter_map(|p| p["path"].as_str()).collect();
    assert_eq!(names, ["task to task", "client to published port"], "{r}");
    for p in paths {
        for mode in ["offRounds", "onRounds"] {
            let rounds = p[mode].as_array().expect(mode);
            assert_eq!(rounds.len(), 2, "{mode} of {p}");
            // Traffic went through: a real TCP transfer on a veth moves well over 10 Mbit/s.
            for bps in rounds {
                assert!(bps.as_f64().unwrap_or(0.0) > 1e7, "{mode} of {p}");
            }
        }
        let (on, off) = (p["onBps"].as_f64().unwrap(), p["offBps"].as_f64().unwrap());
        let ratio = p["ratio"].as_f64().unwrap();
        assert!((ratio - on / off).abs() < 1e-9, "ratio is on/off: {p}");
    }
    assert!(
        bench_leftovers().is_empty(),
        "the benchmark's lab is gone: {:?}",
        bench_leftovers()
    );
    ecsnet_fails(&["bench", "flow-logs", "--rounds", "0"], 2);
}
