//! Test support: running the real `ecsnet` binary, a lab guard that cleans up on drop and on
//! panic (`docker` builds the real-engine lab behind the same guard), readers for the kernel's
//! own counters in a namespace, and raw frames and sockets to send them (`raw`). Used by the integration tests in `tests/`. The guard and the helpers the
//! demo shares live in `ecsnet_lab::fixture::harness` and are re-exported here.

use std::{process::Command, time::Duration};

pub mod agent;
pub mod churn;
pub mod counters;
pub mod docker;
pub mod engine_dockerd;
pub mod engine_lab;
pub mod flood;

pub use ecsnet::agent::stats::Stats;
pub use ecsnet_lab::{
    fixture::harness::{
        Lab, ecsnet, ecsnet_bin, ecsnet_ok, ip_counters, kernel_counters, leftovers, ns_exec,
        require_root, unique,
    },
    lab::LabStatus,
};

pub mod raw;
pub mod sg_probe;
pub mod traffic;
pub mod world;

/// Runs `ecsnet ARGS`, expecting exit `code` and exactly one line on stderr; returns that line.
pub fn ecsnet_fails(args: &[&str], code: i32) -> String {
    let out = ecsnet(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "`ecsnet {}`: expected exit {code}, got {}; stderr: {stderr}",
        args.join(" "),
        out.status
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "`ecsnet {}`: want one error line, got: {stderr}",
        args.join(" ")
    );
    assert!(
        lines[0].starts_with("ecsnet: "),
        "error line {:?} lacks the ecsnet: prefix",
        lines[0]
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    lines[0].to_owned()
}

/// Packets counted by Docker's netfilter rules for traffic the host forwards: the nat table's
/// rules and policies (less OUTPUT and the masquerade of host-originated packets, which belong
/// to the host's own traffic) plus the filter table's forwarding chains (FORWARD and Docker's
/// own). Bridged IPv4 goes through FORWARD too (bridge-nf-call-iptables=1), so this also sees
/// bridge forwarding.
pub fn netfilter_packets(ns: &str) -> u64 {
    let save = ns_exec(ns, &["iptables-save", "-c"]);
    let mut table = "";
    let mut total = 0;
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "nat" { "nat" } else { "filter-or-other" };
            continue;
        }
        let (counter, rest) = if let Some(r) = line.strip_prefix('[') {
            match r.split_once(']') {
                Some((c, rest)) => (c, rest.trim()),
                None => continue,
            }
        } else if let Some(r) = line.strip_prefix(':') {
            // ":CHAIN POLICY [p:b]"
            let mut parts = r.split_whitespace();
            let chain = parts.next().unwrap_or("");
            let c = parts.nth(1).unwrap_or("[0:0]");
            let forwarding = chain == "FORWARD" || chain.starts_with("DOCKER");
            if (table == "nat" && chain != "OUTPUT") || forwarding {
                total += c
                    .trim_matches(|ch| ch == '[' || ch == ']')
                    .split(':')
                    .next()
                    .and_then(|p| p.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            continue;
        } else {
            continue;
        };
        let chain = rest.split_whitespace().nth(1).unwrap_or("");
        let forwarding = chain == "FORWARD" || chain.starts_with("DOCKER");
        let host_own = chain == "OUTPUT" || rest.contains("--src-type LOCAL");
        if (table == "nat" && !host_own) || forwarding {
            total += counter
                .split(':')
                .next()
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// The packet counter of the first iptables rule in `chain` of `table` in namespace `ns` whose
/// text (as `iptables -L -v -n` prints it) contains `needle`.
pub fn rule_packets(ns: &str, table: &str, chain: &str, needle: &str) -> u64 {
    tool_rule_packets("iptables", ns, table, chain, needle)
}

/// The same for an ip6tables rule.
pub fn rule6_packets(ns: &str, table: &str, chain: &str, needle: &str) -> u64 {
    tool_rule_packets("ip6tables", ns, table, chain, needle)
}

fn tool_rule_packets(tool: &str, ns: &str, table: &str, chain: &str, needle: &str) -> u64 {
    let out = ns_exec(ns, &[tool, "-t", table, "-L", chain, "-v", "-x", "-n"]);
    out.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in {table}/{chain}:\n{out}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Entries in netfilter's connection table of a namespace.
pub fn nf_conntrack_count(ns: &str) -> u64 {
    ns_exec(ns, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .trim()
        .parse()
        .expect("nf_conntrack_count is a number")
}

/// Checksum errors the kernel of a namespace found in received IP, TCP, UDP and ICMP packets.
pub fn csum_errors(ns: &str) -> u64 {
    kernel_counters(ns, &["/proc/net/snmp"])
        .iter()
        .filter(|(k, _)| k.ends_with(".InCsumErrors"))
        .map(|(_, v)| v)
        .sum()
}

/// The IPv6 checksum errors (`Icmp6InCsumErrors`, `Udp6InCsumErrors`) the kernel of namespace
/// `ns` counted, by name; both must be there.
pub fn csum6_errors(ns: &str) -> Vec<(String, u64)> {
    let snmp6 = ns_exec(ns, &["cat", "/proc/net/snmp6"]);
    let found: Vec<(String, u64)> = snmp6
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .filter(|(k, _)| *k == "Icmp6InCsumErrors" || *k == "Udp6InCsumErrors")
        .map(|(k, v)| {
            let n = v
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{k} {v:?}: {e}"));
            (k.to_owned(), n)
        })
        .collect();
    assert_eq!(
        found.len(),
        2,
        "{ns}'s /proc/net/snmp6 lacks a counter: {snmp6}"
    );
    found
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it opens belong to
/// that namespace and can be used from any thread afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .expect("netns thread")
}

/// A background process in a namespace, killed when dropped (also on panic).
pub struct Background(std::process::Child);

impl Background {
    /// Starts `ip netns exec NS ARGS...` and gives it `settle` to start listening.
    pub fn start(ns: &str, args: &[&str], settle: Duration) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {args:?} in {ns}: {e}"));
        std::thread::sleep(settle);
        Background(child)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `iperf3 -c` from namespace `ns` with `args`; returns the received rate in bits per second.
pub fn iperf3(ns: &str, args: &[&str]) -> f64 {
    let mut all = vec!["timeout", "30", "iperf3", "-J"];
    all.extend_from_slice(args);
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(&all)
        .output()
        .expect("run iperf3 (apt-get install iperf3; ./x test installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("iperf3 {args:?} in {ns}: {e}: {text}"));
    assert!(
        out.status.success() && v.get("error").is_none(),
        "iperf3 {args:?} in {ns} failed: {}",
        v["error"]
    );
    let end = &v["end"];
    end["sum_received"]["bits_per_second"]
        .as_f64()
        .or_else(|| end["sum"]["bits_per_second"].as_f64())
        .unwrap_or_else(|| panic!("iperf3 {args:?}: no rate in {end}"))
}
