//! `ecsnet bench discovery` works end to end: it builds a real-engine lab of its own, brings
//! ecsnet up on it following dockerd, times each `docker run` to the container's own policy,
//! reports the three latencies, and leaves nothing behind. How fast is not judged here: that is
//! a measurement, reported in docs/BENCHMARKS.md.

use ecsnet_tests::{docker::engine, ecsnet_fails, ecsnet_ok, require_root};
use serde_json::Value;

/// What of lab `lab` is still there: its namespaces, run files, pins and engine.
fn leftovers(lab: &str) -> Vec<String> {
    let mut left: Vec<String> = ["/run/netns", "/run/ecsnet", "/sys/fs/bpf/ecsnet"]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path().display().to_string())
        .filter(|p| {
            let n = p.rsplit('/').next().unwrap_or("");
            n == lab || n.starts_with(&format!("{lab}-")) || n.starts_with(&format!("{lab}."))
        })
        .collect();
    left.extend(engine::leftovers(lab));
    left
}

fn ns(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} of {v}"))
}

/// A container per run, each with its timestamps in the order they must come.
fn assert_samples(samples: &[Value]) {
    assert_eq!(samples.len(), 3, "{samples:?}");
    let mut names: Vec<&str> = samples
        .iter()
        .filter_map(|s| s["container"].as_str())
        .collect();
    names.dedup();
    assert_eq!(names.len(), 3, "a container per run: {names:?}");
    for s in samples {
        let (veth, event, returned, view, live) = (
            ns(s, "vethNs"),
            ns(s, "eventNs"),
            ns(s, "returnedNs"),
            ns(s, "viewNs"),
            ns(s, "liveNs"),
        );
        // The policy can only be the container's own once its veth exists.
        assert!(live > veth, "own policy live before its veth appeared: {s}");
        // The agent took a view of the engine before the policy it applied was live.
        assert!(view > 0 && view <= live, "{s}");
        let held = ns(s, "heldNs");
        assert!(held == 0 || held < live, "held before its own policy: {s}");
        let poll_gap = ns(s, "liveUncertaintyNs");
        assert!(poll_gap > 0 && poll_gap < live - veth, "{s}");
        assert!(event > 0 && returned > 0, "{s}");
        assert!(s["policy"].as_u64().is_some_and(|p| p > 0), "{s}");
        assert!(s["ifindex"].as_u64().is_some_and(|i| i > 0), "{s}");
        assert!(
            s["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("172.17.")),
            "on docker0's subnet: {s}"
        );
    }
}

/// Every latency of the report, each the samples' own numbers.
fn assert_latencies(lat: &[Value], samples: &[Value]) {
    let metrics: Vec<&str> = lat.iter().filter_map(|l| l["metric"].as_str()).collect();
    assert_eq!(
        metrics,
        [
            "live-veth",
            "live-event",
            "live-returned",
            "view-event",
            "live-view",
            "held-veth",
            "agent-cpu-wait",
            "live-uncertainty"
        ],
        "{metrics:?}"
    );
    let field = |metric: &str| -> fn(&Value) -> i64 {
        match metric {
            "live-veth" => |s| ns(s, "liveNs") - ns(s, "vethNs"),
            "live-event" => |s| ns(s, "liveNs") - ns(s, "eventNs"),
            "live-returned" => |s| ns(s, "liveNs") - ns(s, "returnedNs"),
            "view-event" => |s| ns(s, "viewNs") - ns(s, "eventNs"),
            "live-view" => |s| ns(s, "liveNs") - ns(s, "viewNs"),
            "held-veth" => |s| ns(s, "heldNs") - ns(s, "vethNs"),
            "agent-cpu-wait" => |s| ns(s, "agentCpuWaitNs"),
            _ => |s| ns(s, "liveUncertaintyNs"),
        }
    };
    for l in lat {
        let metric = l["metric"].as_str().unwrap();
        // Runs where a poll saw the veth held; all of them for the others.
        let counted: Vec<&Value> = samples
            .iter()
            .filter(|s| metric != "held-veth" || ns(s, "heldNs") > 0)
            .collect();
        assert_eq!(l["n"].as_u64(), Some(counted.len() as u64), "{l}");
        if counted.is_empty() {
            continue;
        }
        let (p50, p99, max) = (
            l["p50Ms"].as_f64().expect("p50Ms"),
            l["p99Ms"].as_f64().expect("p99Ms"),
            l["maxMs"].as_f64().expect("maxMs"),
        );
        assert!(p50 <= p99 && p99 <= max, "ordered: {l}");
        // The largest of the samples, in milliseconds.
        let f = field(metric);
        let biggest = counted.iter().map(|s| f(s)).max().unwrap();
        #[expect(clippy::cast_precision_loss, reason = "seconds in nanoseconds fit")]
        let biggest_ms = biggest as f64 / 1e6;
        assert!((max - biggest_ms).abs() < 1e-6, "max of the samples: {l}");
    }
}

#[test]
fn discovery_bench_times_three_runs_and_cleans_up() {
    require_root();
    let out = ecsnet_ok(&["bench", "discovery", "--runs", "3", "--json"]);
    let r: Value = serde_json::from_str(&out).expect("--json parses");
    let lab = r["lab"].as_str().expect("the report names its lab");
    assert_eq!(r["runs"].as_u64(), Some(3), "{r}");
    assert!(
        r["dockerVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("20.10")),
        "Debian's dockerd: {r}"
    );

    let samples = r["samples"].as_array().expect("samples");
    assert_samples(samples);
    let lat = r["latencies"].as_array().expect("latencies");
    assert_latencies(lat, samples);
    let p99_event = lat[1]["p99Ms"].as_f64().unwrap();
    let target = r["targetP99Ms"].as_f64().expect("targetP99Ms");
    assert_eq!(
        r["targetMet"].as_bool(),
        Some(p99_event <= target),
        "targetMet says whether p99 after the start event is within the target: {r}"
    );

    let left = leftovers(lab);
    assert!(left.is_empty(), "the benchmark's lab is gone: {left:?}");
    ecsnet_fails(&["bench", "discovery", "--runs", "0"], 2);
}

/// Under load: the plugged namespace tasks are configured beside the engine's containers (each
/// with its policy in `TASKS`), the seeded flows are all tracked before and after the runs, and
/// `lab down` takes the plugged namespaces with the rest.
#[test]
fn discovery_bench_under_load_carries_the_tasks_and_flows() {
    require_root();
    let out = ecsnet_ok(&[
        "bench",
        "discovery",
        "--runs",
        "2",
        "--load-tasks",
        "20",
        "--load-flows",
        "10000",
        "--json",
    ]);
    let r: Value = serde_json::from_str(&out).expect("--json parses");
    let lab = r["lab"].as_str().expect("the report names its lab");
    assert_eq!(r["load"]["tasks"].as_u64(), Some(20), "{r}");
    assert_eq!(r["load"]["flows"].as_u64(), Some(10_000), "{r}");
    assert_eq!(
        r["pluggedLive"].as_u64(),
        Some(20),
        "every plugged task live: {r}"
    );
    // One seeded flow in 100 is expired and gone before the runs; the runs' containers
    // carry none of them, so their departures cut none.
    assert_eq!(r["flowsBefore"].as_u64(), Some(9_900), "{r}");
    assert_eq!(r["flowsAfter"].as_u64(), Some(9_900), "{r}");
    assert!(r["ctSize"].as_u64().is_some_and(|s| s >= 25_000), "{r}");
    let samples = r["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 2, "{r}");
    for s in samples {
        let a = s["address"].as_str().unwrap_or_default();
        assert!(
            a.starts_with("172.17.0."),
            "containers keep dockerd's addresses, below the plugged tasks': {s}"
        );
        assert!(ns(s, "liveNs") > ns(s, "vethNs"), "{s}");
    }
    assert_latencies(r["latencies"].as_array().expect("latencies"), samples);
    let left = leftovers(lab);
    assert!(
        left.is_empty(),
        "the lab and its plugged tasks are gone: {left:?}"
    );
}
