//! Test support: running the real `ecsnet` binary, a lab guard that cleans up on drop and on
//! panic, readers for the kernel's own counters in a namespace, and raw frames and sockets to
//! send them (`raw`). Used by the integration tests in `tests/` and by `cargo xtask demo`.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod agent;
pub mod counters;
pub mod flood;

pub use ecsnet::{lab::LabStatus, report::Stats};

pub mod raw;
pub mod traffic;
pub mod world;

/// The `ecsnet` binary under test: `$ECSNET_BIN`, else the workspace's debug build.
pub fn ecsnet_bin() -> PathBuf {
    let bin = std::env::var_os("ECSNET_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))
                });
            target.join("debug").join("ecsnet")
        });
    assert!(
        bin.is_file(),
        "{} does not exist: build it with `cargo build -p ecsnet-userspace` (./x test does)",
        bin.display()
    );
    bin
}

/// Fails the test unless it runs as root: namespaces and BPF need it, and skipping would prove nothing.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds network namespaces and loads BPF: run it as root (./x test)"
    );
}

/// A name unique to this test process and call, short enough for lab and instance names.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ecsnet ARGS`.
pub fn ecsnet(args: &[&str]) -> Output {
    Command::new(ecsnet_bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ecsnet")
}

/// Runs `ecsnet ARGS` and returns stdout; panics with stderr when it fails.
pub fn ecsnet_ok(args: &[&str]) -> String {
    let out = ecsnet(args);
    assert!(
        out.status.success(),
        "`ecsnet {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

/// Runs a command inside a namespace (`ip netns exec`).
pub fn ns_exec(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "`ip netns exec {ns} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A lab built for one test, with names unique to it. Dropping it (also on panic) takes down
/// the ecsnet instance of the same name and the lab.
pub struct Lab {
    pub name: String,
    pub status: LabStatus,
}

impl Lab {
    /// `ecsnet lab up --name <unique> --tasks K --publish ...`.
    pub fn up(prefix: &str, tasks: usize, publish: &[&str]) -> Self {
        Self::up_named(&unique(prefix), tasks, publish)
    }

    /// The same with a fixed name (the demo's).
    pub fn up_named(name: &str, tasks: usize, publish: &[&str]) -> Self {
        require_root();
        let name = name.to_owned();
        let tasks_s = tasks.to_string();
        let mut args = vec!["lab", "up", "--name", &name, "--tasks", &tasks_s, "--json"];
        for p in publish {
            args.extend(["--publish", p]);
        }
        let out = ecsnet(&args);
        // Own the lab before checking, so a half-built one is still removed.
        let guard_name = name.clone();
        if !out.status.success() {
            let _ = ecsnet(&["lab", "down", "--name", &guard_name]);
            panic!("lab up failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let status: LabStatus =
            serde_json::from_slice(&out.stdout).expect("lab up --json prints the lab status");
        Lab { name, status }
    }

    pub fn host(&self) -> &str {
        &self.status.host.netns
    }

    pub fn client(&self) -> &str {
        &self.status.client.netns
    }

    pub fn task_ns(&self, i: usize) -> &str {
        &self.status.tasks[i - 1].netns
    }

    pub fn state_file(&self) -> String {
        self.status.state_file.display().to_string()
    }

    /// `ecsnet --netns <host> --instance <name> ARGS`.
    pub fn ecsnet_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["--netns", self.host(), "--instance", &self.name];
        v.extend_from_slice(args);
        v
    }

    /// Brings ecsnet up on the lab host with the lab's state file.
    pub fn ecsnet_up(&self) -> String {
        self.ecsnet_up_with(&[])
    }

    /// Brings ecsnet up on the lab host with the lab's state file and `extra` flags.
    pub fn ecsnet_up_with(&self, extra: &[&str]) -> String {
        let state = self.state_file();
        let mut args = vec!["up", "--state", &state];
        args.extend_from_slice(extra);
        ecsnet_ok(&self.ecsnet_args(&args))
    }

    pub fn stats(&self) -> Stats {
        let out = ecsnet_ok(&["--instance", &self.name, "stats", "--json"]);
        serde_json::from_str(&out).expect("stats --json parses")
    }

    /// Stats once they stop changing (late ACKs and FINs have landed).
    pub fn settled_stats(&self) -> Stats {
        self.settled(&[]).0
    }

    /// Stats and the kernel counters of namespaces `nss`, read together until neither changes
    /// for 300 ms, so a late packet cannot land between the two readings.
    pub fn settled(&self, nss: &[&str]) -> (Stats, Vec<(u64, u64, u64, u64)>) {
        let read = || {
            let s = self.stats();
            let k: Vec<_> = nss.iter().map(|ns| ip_counters(ns)).collect();
            (serde_json::to_string(&s).unwrap(), s, k)
        };
        let mut last = read();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = read();
            if (now.0 == last.0 && now.2 == last.2) || Instant::now() > deadline {
                return (now.1, now.2);
            }
            last = now;
        }
    }

    /// `ecsnet lab probe` from namespace `ns`.
    pub fn probe(
        &self,
        ns: &str,
        proto: &str,
        target: &str,
        count: u32,
        size: usize,
    ) -> serde_json::Value {
        let (c, s) = (count.to_string(), size.to_string());
        let out = ecsnet_ok(&[
            "--netns",
            ns,
            "lab",
            "probe",
            &format!("--{proto}"),
            target,
            "--count",
            &c,
            "--size",
            &s,
            "--json",
        ]);
        serde_json::from_str(&out).expect("probe --json parses")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ecsnet(&["--instance", &self.name, "down"]);
        let _ = ecsnet(&["lab", "down", "--name", &self.name]);
    }
}

/// The kernel's unicast IPv4 counters of a namespace: (packets in, packets out, bytes in,
/// bytes out), i.e. InReceives, OutRequests, InOctets, OutOctets less multicast and broadcast.
pub fn ip_counters(ns: &str) -> (u64, u64, u64, u64) {
    let snmp = ns_exec(ns, &["cat", "/proc/net/snmp", "/proc/net/netstat"]);
    let mut fields: HashMap<String, u64> = HashMap::new();
    let lines: Vec<&str> = snmp.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((proto, names)), Some((_, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse() {
                fields.insert(format!("{proto}.{n}"), v);
            }
        }
    }
    let get = |k: &str| {
        *fields
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in {ns}'s /proc/net counters"))
    };
    (
        get("Ip.InReceives"),
        get("Ip.OutRequests"),
        get("IpExt.InOctets"),
        get("IpExt.OutOctets"),
    )
}

/// Names of every namespace, pin directory, socket and run file that an instance or lab named
/// `name` could have left behind.
pub fn leftovers(name: &str) -> Vec<String> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("{name}-")) {
            left.push(format!("netns {n}"));
        }
    }
    for p in [
        format!("/sys/fs/bpf/ecsnet/{name}"),
        format!("/run/ecsnet/{name}.sock"),
        format!("/run/ecsnet/{name}.d"),
        format!("/run/ecsnet/{name}"),
    ] {
        if std::path::Path::new(&p).exists() {
            left.push(p);
        }
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let mentions = args.windows(2).any(|w| {
            (w[0] == "--instance" && w[1] == name)
                || (w[0] == "--netns" && w[1].starts_with(&format!("{name}-")))
        });
        if mentions {
            left.push(format!(
                "process {} {}",
                entry.file_name().to_string_lossy(),
                args.join(" ")
            ));
        }
    }
    left
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

/// Entries in netfilter's connection table of a namespace.
pub fn nf_conntrack_count(ns: &str) -> u64 {
    ns_exec(ns, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .trim()
        .parse()
        .expect("nf_conntrack_count is a number")
}

/// Checksum errors the kernel of a namespace found in received IP, TCP, UDP and ICMP packets.
pub fn csum_errors(ns: &str) -> u64 {
    let snmp = ns_exec(ns, &["cat", "/proc/net/snmp"]);
    let lines: Vec<&str> = snmp.lines().collect();
    let mut total = 0;
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if n == "InCsumErrors" {
                total += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
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
