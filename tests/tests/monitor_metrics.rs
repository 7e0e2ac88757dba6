//! `ecsnet monitor` and the Prometheus endpoint on real labs with real traffic.
//!
//! Monitor: every datagram a security group rejects is one drop event with its reason, the task
//! it was dropped for and the addresses and ports it carried, and every new flow a security
//! group lets through is one allow event saying whose rules decided (the sender's egress, the
//! receiver's ingress); well below the rate limit, there is exactly one event per packet and
//! nothing is suppressed. The same over IPv6 in a dual-stack lab, with the addresses as RFC 5952
//! writes them: task to task, a port published on the host's IPv6 address (the event shows the
//! real client and the task's own address and container port, as the rules judged them), and
//! in Docker's routed mode a connection the kernel delivers (seen at the task's tc egress). With `up --monitor-rate 50` a flood of rejected datagrams yields at
//! most the kernel's budget of events (rate per second and one second of burst, per CPU) while
//! every drop is still counted, and every rejected datagram is accounted for exactly once: as
//! an event received, as an event the monitor lost (`{"lost": N}`), or as an event the datapath
//! suppressed (`flowLogs.eventsSuppressed`). Without an agent `monitor` fails with one line and
//! exit 1, and works again once `up` has started a new agent.
//!
//! Metrics: `GET /metrics` inside the instance's namespace serves every family in the text
//! exposition format, with exactly the numbers `stats --json` reports around the scrape (task
//! packets and bytes after known traffic, drops after known rejected datagrams, table
//! capacities, flow-log windows and records, the agent's listener counters); other paths are
//! 404 and other methods 405;
//! `up --metrics ADDR` moves the endpoint, `off` removes it and a bad address is refused with
//! exit 2 and one line, changing nothing.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ecsnet::agent::stats::{ConntrackStats, TaskStats};
use ecsnet_tests::{
    Lab, Stats,
    agent::{self, ask, kill_agent},
    counters::{poll, task_drops},
    ecsnet, ecsnet_bin, ecsnet_fails, ecsnet_ok, in_netns,
    traffic::{echo, tcp_connect},
    world::{self, all, lab_file, perm, sg, state_with_groups, tcp},
};
use serde_json::{Value, json};

/// The port task2's rules reject and that the tests count events for.
const REJECTED_PORT: u16 = 5353;
/// Another rejected port, used only to learn when a monitor receives events.
const MARKER_PORT: u16 = 5354;
/// The lab client's address: task2's group allows it (and only it) on TCP 80.
const CLIENT: &str = "10.10.0.2";
/// The lab host's uplink address, where published ports are reached.
const HOST: &str = "10.10.0.1";
/// The same two in a dual-stack lab, over IPv6.
const CLIENT6: &str = "fd00:10:10::2";
const HOST6: &str = "fd00:10:10::1";
/// The UDP port task2's rules take from task1 (by reference to its group) in the IPv6 test.
const ALLOWED_PORT: u16 = 5300;

// ---------------------------------------------------------------------------------------------
// Security groups and bringing ecsnet up.

/// Which tasks get security groups.
#[derive(Clone, Copy)]
struct Groups {
    /// task1: TCP 80 in from the uplink's network, everything out (so it has allow events).
    task1: bool,
    /// task2 also takes UDP 53 from the uplink's network (besides TCP 80 from it).
    task2_dns: bool,
    /// With `task1`: the same over IPv6 (TCP 80 in from the uplink's IPv6 network, everything
    /// out to `::/0`), and task2 takes UDP `ALLOWED_PORT` from task1's group.
    ipv6: bool,
}

impl Groups {
    /// Groups on task2 alone.
    const TASK2: Groups = Groups {
        task1: false,
        task2_dns: false,
        ipv6: false,
    };
    /// Groups on both tasks.
    const BOTH: Groups = Groups {
        task1: true,
        task2_dns: false,
        ipv6: false,
    };
    /// Groups on both tasks, with IPv6 rules too.
    const BOTH6: Groups = Groups {
        ipv6: true,
        ..Groups::BOTH
    };
    /// Groups on task2 alone, which also takes UDP 53.
    const TASK2_DNS: Groups = Groups {
        task1: false,
        task2_dns: true,
        ipv6: false,
    };
}

/// The state file `write_groups` writes, beside the lab's.
const GROUPS_FILE: &str = "monitor-groups.json";

/// The lab's state file with task2 (and task1 if asked) in security groups; task2 accepts
/// nothing from task1, so every datagram task1 sends it is rejected (`SG_INGRESS` on task2).
fn write_groups(lab: &Lab, groups: Groups) -> String {
    let uplink_net = &["10.10.0.0/24"][..];
    let uplink_net6 = &["fd00:10:10::/64"][..];
    let mut inbound2 = vec![tcp(80, 80, uplink_net)];
    if groups.task2_dns {
        inbound2.push(perm("udp", Some((53, 53)), uplink_net));
    }
    let (mut inbound1, mut outbound1) = (vec![tcp(80, 80, uplink_net)], vec![all(&["0.0.0.0/0"])]);
    if groups.ipv6 {
        let port = i32::from(ALLOWED_PORT);
        inbound2.push(perm("udp", Some((port, port)), &["sg-task1"]));
        inbound1.push(tcp(80, 80, uplink_net6));
        outbound1.push(all(&["::/0"]));
    }
    let mut all_groups = vec![sg("sg-task2", "sg-task2", &inbound2, &[])];
    let mut members: Vec<&[&str]> = vec![&[], &["sg-task2"]];
    if groups.task1 {
        all_groups.push(sg("sg-task1", "sg-task1", &inbound1, &outbound1));
        members[0] = &["sg-task1"];
    }
    let s = state_with_groups(lab, &all_groups, &members);
    world::write(lab, GROUPS_FILE, &s)
}

/// `ecsnet up --state STATE --window 1 EXTRA...` on the lab's host.
fn up(lab: &Lab, state: &str, extra: &[&str]) {
    let mut args = vec!["up", "--state", state, "--window", "1"];
    args.extend_from_slice(extra);
    let out = ecsnet_ok(&lab.ecsnet_args(&args));
    assert!(out.contains(" up"), "up printed: {out}");
}

/// A two-task lab, task1 publishing 80 on 8080, with groups, brought up with `extra` flags.
fn lab_with_groups(prefix: &str, groups: Groups, extra: &[&str]) -> Lab {
    let lab = Lab::up(prefix, 2, &["1:8080:80", "2:8053:53/udp"]);
    let state = write_groups(&lab, groups);
    up(&lab, &state, extra);
    lab
}

fn task_ip(lab: &Lab, i: usize) -> String {
    lab.status.tasks[i - 1].address.to_string()
}

fn task_addr(lab: &Lab, i: usize, port: u16) -> SocketAddr {
    format!("{}:{port}", task_ip(lab, i))
        .parse()
        .expect("a socket address")
}

/// The agent's answer to a ping on the instance's control socket: once it answers, the agent
/// has finished starting (its metrics listener and event reader are set up before it answers).
fn agent_pid(lab: &Lab) -> i32 {
    let v = ask(&lab.name, r#"{"op":"ping"}"#);
    assert_eq!(v["ok"], json!(true), "ping reply: {v}");
    v["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_else(|| panic!("ping reply without a pid: {v}"))
}

// ---------------------------------------------------------------------------------------------
// Traffic.

/// Sends `count` datagrams of 16 bytes from one socket in namespace `ns` to `dst` as fast as
/// it can; returns the socket's local port. Fails the test if a send fails.
fn send_udp(ns: &str, dst: SocketAddr, count: u32) -> u16 {
    let ns_name = ns.to_owned();
    in_netns(ns, move || {
        let any = if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let s = UdpSocket::bind(any).expect("bind a UDP socket");
        for i in 0..count {
            if let Err(e) = s.send_to(&[0x42; 16], dst) {
                panic!("datagram {i} of {count} from {ns_name} to {dst}: {e}");
            }
        }
        s.local_addr().expect("local address").port()
    })
}

/// A TCP connection from `ns` to `dst` with one echoed message; returns the local address.
fn tcp_roundtrip(ns: &str, dst: SocketAddr) -> SocketAddr {
    let mut s = tcp_connect(ns, dst, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo(&mut s, &[0x5a_u8; 100]).unwrap_or_else(|e| panic!("the echo from {dst}: {e}"));
    s.local_addr().expect("local address")
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// The monitor process.

/// `ecsnet --instance LAB monitor --json` as a child process, its stdout read line by line on
/// a thread. Killed when dropped (also on panic).
struct Monitor {
    child: Child,
    lines: Receiver<String>,
}

impl Monitor {
    fn start(lab: &Lab) -> Self {
        let mut child = Command::new(ecsnet_bin())
            .args(["--instance", &lab.name, "monitor", "--json"])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ecsnet monitor");
        let stdout = child.stdout.take().expect("monitor stdout is piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Monitor { child, lines }
    }

    /// The next line, parsed, within `timeout`; None if none came.
    ///
    /// The host's own IGMP reports (docker0 joining its multicast groups, sent by the kernel at
    /// times of its choosing after the lab came up) meet the tasks' ingress rules too; they are
    /// no traffic of the test's and are passed over.
    fn next(&self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v: Value = match self.lines.recv_timeout(left) {
                Ok(line) => serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("monitor --json printed {line:?}: {e}")),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the monitor's output ended early (did it exit?)")
                }
            };
            let igmp_of_host = v["proto"] == 2 && v["src"] == "172.17.0.1";
            if !igmp_of_host {
                return Some(v);
            }
        }
    }

    /// Every line until none has come for `quiet`.
    fn until_quiet(&self, quiet: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.next(quiet) {
            out.push(v);
        }
        out
    }

    /// Sends rejected datagrams from task1 to task2's marker port, one at a time, until the
    /// monitor shows the drop of one: from then on it receives every event. Returns how many
    /// markers were sent; the events seen meanwhile (markers only) are discarded.
    fn sync(&self, lab: &Lab) -> u64 {
        let marker = task_addr(lab, 2, MARKER_PORT);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut sent = 0;
        loop {
            assert!(
                Instant::now() < deadline,
                "the monitor showed no event for any of {sent} rejected datagrams to {marker} \
                 in 15 s"
            );
            send_udp(lab.task_ns(1), marker, 1);
            sent += 1;
            let until = Instant::now() + Duration::from_millis(250);
            let mut seen = false;
            while let Some(v) = self.next(until.saturating_duration_since(Instant::now())) {
                assert!(is_marker(&v), "before any traffic, the monitor printed {v}");
                seen |= v["kind"] == "drop";
            }
            if seen {
                break;
            }
        }
        // Late lines about markers sent before the one seen.
        for v in self.until_quiet(Duration::from_millis(300)) {
            assert!(is_marker(&v), "before any traffic, the monitor printed {v}");
        }
        sent
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_marker(v: &Value) -> bool {
    v["dst"]
        .as_str()
        .is_some_and(|d| d.ends_with(&format!(":{MARKER_PORT}")))
}

/// An event line's string field, or panic.
fn field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("event {v} has no string {key:?}"))
}

/// Checks the fields every event line has, whatever its kind.
fn check_event_shape(v: &Value) {
    for key in ["kind", "hook", "src", "dst"] {
        field(v, key);
    }
    assert!(v["time"].is_f64() || v["time"].is_u64(), "event {v}: time");
    assert!(v["ifindex"].is_u64(), "event {v}: ifindex");
    assert!(v["proto"].is_u64(), "event {v}: proto");
    assert!(v["suppressed"].is_u64(), "event {v}: suppressed");
    assert!(
        ["tc-ingress", "tc-egress", "xdp"].contains(&field(v, "hook")),
        "event {v}: hook"
    );
    match field(v, "kind") {
        "drop" => {
            field(v, "reason");
            assert!(
                v["direction"].is_null(),
                "a drop event has no direction: {v}"
            );
        }
        "allow" => {
            assert!(v["reason"].is_null(), "an allow event has no reason: {v}");
            assert!(
                ["egress", "ingress"].contains(&field(v, "direction")),
                "an allow event says whose rules decided: {v}"
            );
        }
        other => panic!("event kind {other:?}: {v}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Counters.

fn task_egress_packets(s: &Stats, task: &str) -> u64 {
    s.tasks
        .iter()
        .find(|t| t.name == task)
        .unwrap_or_else(|| panic!("no {task} in stats"))
        .egress
        .packets
}

/// Polls stats until task2's `SG_INGRESS` drops reach `want` (then returns them) or 10 s pass.
fn wait_for_drops(lab: &Lab, want: u64) -> Stats {
    let (Ok(s) | Err(s)) = poll(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || lab.stats(),
        |s| task_drops(s, "task2", "SG_INGRESS") >= want,
    );
    s
}

/// CPUs the kernel keeps per-CPU state for (the event budget is per CPU).
fn possible_cpus() -> u64 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .expect("read /sys/devices/system/cpu/possible");
    text.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => {
                b.parse::<u64>().expect("a CPU number") - a.parse::<u64>().expect("a CPU number")
                    + 1
            }
            None => 1,
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// HTTP and the exposition format.

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` to 127.0.0.1:`port` in namespace `ns` and reads the whole response.
fn http(ns: &str, port: u16, request: &str) -> std::io::Result<Response> {
    let request = request.to_owned();
    let raw = in_netns(ns, move || -> std::io::Result<Vec<u8>> {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        Ok(raw)
    })?;
    let text = String::from_utf8(raw).expect("the response is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in the response: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {l:?}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let resp = Response {
        status,
        headers,
        body: body.to_owned(),
    };
    if let Some(len) = resp.header("content-length") {
        assert_eq!(
            len.parse::<usize>().ok(),
            Some(resp.body.len()),
            "Content-Length {len} differs from the body's {} bytes",
            resp.body.len()
        );
    }
    Ok(resp)
}

/// `GET /metrics` on `port`, retried while the connection is refused (for up to 5 s: the
/// agent may still be starting).
fn scrape(ns: &str, port: u16) -> Response {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match http(ns, port, "GET /metrics HTTP/1.0\r\n\r\n") {
            Ok(r) => return r,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused,
                    "GET /metrics on {port}: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("GET /metrics on 127.0.0.1:{port} in {ns}: {e}"),
        }
    }
}

/// Stats, `GET /metrics` in the lab's host namespace, stats again, until nothing moved around
/// the scrape (30 tries at most): the stats and the response.
fn scrape_between_equal_stats(lab: &Lab) -> (Stats, Response) {
    let mut tries = 0;
    loop {
        tries += 1;
        let a = lab.stats();
        let resp = scrape(lab.host(), 9464);
        let b = lab.stats();
        let (va, vb) = (
            serde_json::to_value(&a).unwrap(),
            serde_json::to_value(&b).unwrap(),
        );
        if va == vb {
            return (a, resp);
        }
        assert!(
            tries < 30,
            "stats kept changing around 30 scrapes: {va} vs {vb}"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// A sample's identity: metric name and labels (sorted by name).
type SampleKey = (String, Vec<(String, String)>);

/// Parses the exposition text: every line is a comment (`# HELP`/`# TYPE`) or
/// `name{label="value",...} integer`; every sample's family has a `# TYPE` line before it.
fn parse_exposition(text: &str) -> BTreeMap<SampleKey, u64> {
    let mut typed: Vec<String> = Vec::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.split_whitespace();
            let kind = parts.next();
            let name = parts
                .next()
                .unwrap_or_else(|| panic!("bad comment {line:?}"));
            match kind {
                Some("TYPE") => {
                    let t = parts.next();
                    assert!(
                        matches!(t, Some("counter" | "gauge")),
                        "bad type in {line:?}"
                    );
                    typed.push(name.to_owned());
                }
                Some("HELP") => {}
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "an empty line in the exposition");
        let (key, value) = parse_sample(line)
            .unwrap_or_else(|| panic!("line {line:?} is not `name{{labels}} integer`"));
        assert!(
            typed.contains(&key.0),
            "sample {line:?} comes without a # TYPE line for its family"
        );
        assert!(
            out.insert(key, value).is_none(),
            "sample {line:?} appears twice"
        );
    }
    out
}

fn parse_sample(line: &str) -> Option<(SampleKey, u64)> {
    let open = line.find('{')?;
    let name = &line[..open];
    let ok_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok_name {
        return None;
    }
    let mut rest = &line[open + 1..];
    let mut labels = Vec::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            rest = r;
            break;
        }
        let eq = rest.find("=\"")?;
        let label = &rest[..eq];
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        rest = &rest[eq + 2..];
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    _ => return None,
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((label.to_owned(), value));
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
    let value = rest.strip_prefix(' ')?;
    if value.is_empty() || !value.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    labels.sort();
    Some(((name.to_owned(), labels), value.parse().ok()?))
}

/// The labels of a task's samples: the task, its interface, and `key`=`value`.
fn task_labels<'a>(t: &'a TaskStats, key: &'a str, value: &'a str) -> [(&'a str, &'a str); 3] {
    [("task", &t.name), ("interface", &t.interface), (key, value)]
}

/// The samples of each connection table by its map's name, and of the IPv6 flows by kind: the
/// family, its one label besides the instance, the value.
fn conntrack_table_samples(c: &ConntrackStats) -> Vec<(&'static str, (&'static str, String), u64)> {
    let mut out: Vec<_> = c
        .ipv6
        .flows
        .iter()
        .map(|(kind, n)| ("ecsnet_conntrack_ipv6_flows", ("kind", kind.clone()), *n))
        .collect();
    for (tables, fill) in [
        (["CT", "CT_NEW"], c.ipv4()),
        (["CT6", "CT6_NEW"], c.ipv6.clone()),
    ] {
        let assured = fill.entries - fill.unanswered_entries;
        for (table, entries, capacity) in [
            (tables[0], assured, fill.capacity),
            (tables[1], fill.unanswered_entries, fill.unanswered_capacity),
        ] {
            let label = ("table", table.to_owned());
            out.push(("ecsnet_conntrack_table_entries", label.clone(), entries));
            out.push(("ecsnet_conntrack_table_capacity", label, capacity));
        }
    }
    out
}

/// The samples `/metrics` must serve for `s`: its numbers under the documented families, each
/// labelled with the instance.
fn expected_samples(s: &Stats) -> BTreeMap<SampleKey, u64> {
    let mut out = BTreeMap::new();
    let mut add = |name: &str, labels: &[(&str, &str)], v: u64| {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.push(("instance".to_owned(), s.instance.clone()));
        l.sort();
        out.insert((name.to_owned(), l), v);
    };
    for t in &s.tasks {
        for (dir, c) in [("egress", t.egress), ("ingress", t.ingress)] {
            let l = task_labels(t, "direction", dir);
            add("ecsnet_task_packets_total", &l, c.packets);
            add("ecsnet_task_bytes_total", &l, c.bytes);
        }
        for (reason, n) in &t.drops {
            add(
                "ecsnet_task_drops_total",
                &task_labels(t, "reason", reason),
                *n,
            );
        }
    }
    for (reason, n) in &s.drops {
        add("ecsnet_drops_total", &[("reason", reason)], *n);
    }
    let u = &s.uplink;
    for (dir, c) in [("ingress", u.ingress), ("egress", u.egress)] {
        add(
            "ecsnet_uplink_packets_total",
            &[("interface", &u.interface), ("direction", dir)],
            c.packets,
        );
    }
    let (c, f) = (&s.conntrack, &s.flow_logs);
    for (kind, n) in &c.flows {
        add("ecsnet_conntrack_flows", &[("kind", kind)], *n);
    }
    for (name, (key, value), n) in conntrack_table_samples(c) {
        add(name, &[(key, &value)], n);
    }
    // The families without labels.
    #[rustfmt::skip]
    let unlabelled = [
        ("ecsnet_conntrack_entries", c.entries),
        ("ecsnet_conntrack_capacity", c.capacity),
        ("ecsnet_conntrack_unanswered_entries", c.unanswered_entries),
        ("ecsnet_conntrack_unanswered_capacity", c.unanswered_capacity),
        ("ecsnet_conntrack_flows_created_total", c.created),
        ("ecsnet_conntrack_flows_assured_total", c.assured),
        ("ecsnet_conntrack_assured_table_full_total", c.assured_table_full),
        ("ecsnet_nat_mappings", c.nat_mappings),
        ("ecsnet_flow_table_entries", f.table_entries),
        ("ecsnet_flow_table_capacity", f.table_capacity),
        ("ecsnet_flow_log_windows_total", f.windows_exported),
        ("ecsnet_flow_log_records_total", f.records_exported),
        ("ecsnet_flow_log_skipdata_records_total", f.skipdata_records),
        ("ecsnet_flow_log_lost_packets_total", f.lost_packets),
        ("ecsnet_monitor_events_suppressed_total", f.events_suppressed),
    ];
    for (name, v) in unlabelled {
        add(name, &[], v);
    }
    for (listener, l) in [("metrics", &s.agent.metrics), ("control", &s.agent.control)] {
        add(
            "ecsnet_agent_accept_errors_total",
            &[("listener", listener)],
            l.accept_errors,
        );
        for (reason, v) in [
            ("over_cap", l.over_cap),
            ("evicted", l.evicted),
            ("timed_out", l.timed_out),
        ] {
            add(
                "ecsnet_agent_connections_closed_total",
                &[("listener", listener), ("reason", reason)],
                v,
            );
        }
    }
    out
}

/// The value of the one sample of `name` whose labels include `labels`.
fn sample(samples: &BTreeMap<SampleKey, u64>, name: &str, labels: &[(&str, &str)]) -> u64 {
    let found: Vec<u64> = samples
        .iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want exactly one {name} sample with {labels:?}, found {found:?}"
    );
    found[0]
}

// ---------------------------------------------------------------------------------------------

#[test]
fn monitor_shows_each_rejected_datagram_and_each_allowed_flow_with_its_reason() {
    const N: u32 = 5;
    let lab = lab_with_groups("mnd", Groups::BOTH, &[]);
    let (t1_ip, t2_ip) = (task_ip(&lab, 1), task_ip(&lab, 2));
    let t2_iface = lab.status.tasks[1].interface.clone();
    let t1_iface = lab.status.tasks[0].interface.clone();
    let mon = Monitor::start(&lab);
    let markers = mon.sync(&lab);

    // A handful of datagrams task2's rules reject (task1's own rules allow them out), and one
    // connection from the client to task1's published port, which task1's rules allow.
    let before = now_unix();
    let sport = send_udp(lab.task_ns(1), task_addr(&lab, 2, REJECTED_PORT), N);
    let host_port: SocketAddr = format!("{HOST}:8080").parse().unwrap();
    let client = tcp_roundtrip(lab.client(), host_port);
    assert_eq!(client.ip().to_string(), CLIENT, "the lab's client connects");
    let after = now_unix();

    let n = N as usize;
    let [drops, egress_allows, ingress_allows] = sorted_events(&mon, [n, n, 1]);

    let src = format!("{t1_ip}:{sport}");
    let dst = format!("{t2_ip}:{REJECTED_PORT}");
    assert_eq!(
        drops.len(),
        N as usize,
        "{N} rejected datagrams should be {N} drop events, got {drops:#?}"
    );
    let flow = (src.as_str(), dst.as_str());
    for d in &drops {
        assert_eq!(d["kind"], "drop", "{d}");
        assert_eq!(
            d["reason"], "SG_INGRESS",
            "task2's inbound rules rejected it: {d}"
        );
        assert_udp_event(d, ("task2", &t2_iface), flow, "dropped for task2");
        assert_ne!(
            d["hook"], "xdp",
            "task-to-task traffic never passes the uplink's XDP: {d}"
        );
    }
    assert_eq!(
        egress_allows.len(),
        N as usize,
        "each rejected datagram is a new flow that task1's egress rules let out: want {N} allow \
         events, got {egress_allows:#?}"
    );
    for a in &egress_allows {
        assert_udp_event(a, ("task1", &t1_iface), flow, "task1's rules decided");
    }
    assert_eq!(
        ingress_allows.len(),
        1,
        "one connection to task1's published port is one allow event, got {ingress_allows:#?}"
    );
    let a = &ingress_allows[0];
    assert_eq!(a["task"], "task1", "task1's inbound rules decided: {a}");
    assert_eq!(a["interface"], json!(t1_iface), "task1's interface: {a}");
    assert_eq!(a["proto"], 6, "TCP: {a}");
    assert_eq!(field(a, "src"), client.to_string(), "the real client: {a}");
    let as_arrived = format!("{HOST}:8080");
    let as_delivered = format!("{t1_ip}:80");
    assert!(
        [as_arrived.as_str(), as_delivered.as_str()].contains(&field(a, "dst")),
        "the allow event's destination should be task1's published port: {a}"
    );

    for e in drops.iter().chain(&egress_allows).chain(&ingress_allows) {
        assert_eq!(
            e["suppressed"], 0,
            "nothing is suppressed this far below the rate: {e}"
        );
        let t = e["time"].as_f64().unwrap();
        assert!(
            t >= before - 2.0 && t <= after + 2.0,
            "event time {t} is not the Unix time of the packet (sent between {before} and \
             {after}): {e}"
        );
    }
    let s = lab.stats();
    assert_eq!(
        task_drops(&s, "task2", "SG_INGRESS"),
        u64::from(N) + markers,
        "stats count every rejected datagram ({N} and {markers} marker(s))"
    );
    assert_eq!(
        s.flow_logs.events_suppressed, 0,
        "no event suppressed this far below the rate limit"
    );
}

#[test]
fn monitor_shows_ipv6_flows_allowed_with_their_addresses_and_rejected_ones_as_drops() {
    const N: u32 = 3;
    let lab = Lab::up_v6("mn6", 2, &["1:8080:80"], "nat");
    let state = write_groups(&lab, Groups::BOTH6);
    up(&lab, &state, &[]);
    let ip6 = |i: usize| {
        lab.status.tasks[i - 1]
            .address6
            .unwrap_or_else(|| panic!("task{i} has no IPv6 address: {:?}", lab.status))
    };
    let at6 = |i: usize, port: u16| SocketAddr::from((ip6(i), port));
    let t1_iface = lab.status.tasks[0].interface.clone();
    let t2_iface = lab.status.tasks[1].interface.clone();
    let mon = Monitor::start(&lab);
    mon.sync(&lab);

    // From task1 (everything out allowed): datagrams task2's rules reject, each a new flow, and
    // one datagram they allow (task2 has no socket there: its port unreachable rides the flow);
    // then the client connects to task1's port published on the host's IPv6 address.
    let rejected_sport = send_udp(lab.task_ns(1), at6(2, REJECTED_PORT), N);
    let allowed_sport = send_udp(lab.task_ns(1), at6(2, ALLOWED_PORT), 1);
    let published: SocketAddr = format!("[{HOST6}]:8080").parse().unwrap();
    let client = tcp_roundtrip(lab.client(), published);
    assert_eq!(
        client.ip().to_string(),
        CLIENT6,
        "the lab's client connects over IPv6"
    );

    let n = N as usize;
    let [drops, egress_allows, ingress_allows] = sorted_events(&mon, [n, n + 1, 2]);

    // The addresses as RFC 5952 writes them: lower case, the longest run of zeros as "::".
    let (t1, t2) = (ip6(1).to_string(), ip6(2).to_string());
    assert!(
        t1.starts_with("fd00:") && t1.contains("::") && t1 == t1.to_lowercase(),
        "task1's IPv6 address in its shortest form: {t1}"
    );
    let rejected = (
        format!("[{t1}]:{rejected_sport}"),
        format!("[{t2}]:{REJECTED_PORT}"),
    );
    let rejected = (rejected.0.as_str(), rejected.1.as_str());
    let allowed = (
        format!("[{t1}]:{allowed_sport}"),
        format!("[{t2}]:{ALLOWED_PORT}"),
    );
    let allowed = (allowed.0.as_str(), allowed.1.as_str());

    assert_eq!(
        drops.len(),
        n,
        "{N} rejected IPv6 datagrams should be {N} drop events, got {drops:#?}"
    );
    for d in &drops {
        assert_eq!(d["reason"], "SG_INGRESS", "task2's inbound rules: {d}");
        assert_eq!(d["hook"], "tc-ingress", "judged as task1 sent it: {d}");
        assert_udp_event(d, ("task2", &t2_iface), rejected, "dropped for task2");
    }

    let (to_rejected, to_allowed): (Vec<_>, Vec<_>) = egress_allows
        .iter()
        .partition(|a| field(a, "dst") == rejected.1);
    assert_eq!(
        (to_rejected.len(), to_allowed.len()),
        (n, 1),
        "task1's egress rules let out each rejected datagram (a new flow each) and the allowed \
         flow once: {egress_allows:#?}"
    );
    for a in &egress_allows {
        assert_eq!(a["hook"], "tc-ingress", "as task1 sent it: {a}");
    }
    for a in to_rejected {
        assert_udp_event(a, ("task1", &t1_iface), rejected, "task1's rules decided");
    }
    assert_udp_event(
        to_allowed[0],
        ("task1", &t1_iface),
        allowed,
        "task1's rules decided",
    );

    assert_eq!(
        ingress_allows.len(),
        2,
        "task2's rules allow one flow and task1's the published port's; none for a rejected \
         datagram: {ingress_allows:#?}"
    );
    let (udp, tcp): (Vec<_>, Vec<_>) = ingress_allows.iter().partition(|a| a["proto"] == 17);
    assert_eq!((udp.len(), tcp.len()), (1, 1), "{ingress_allows:#?}");
    assert_udp_event(
        udp[0],
        ("task2", &t2_iface),
        allowed,
        "task2's rules decided",
    );
    assert_eq!(udp[0]["hook"], "tc-ingress", "as task1 sent it: {}", udp[0]);
    let task1 = ("task1", t1_iface.as_str());
    let flow = (client, format!("[{t1}]:80"));
    // Judged as it arrived on the uplink, before the translation.
    assert_task1_allows_client(tcp[0], task1, "tc-ingress", &flow);

    for e in drops.iter().chain(&egress_allows).chain(&ingress_allows) {
        assert_eq!(
            e["suppressed"], 0,
            "nothing is suppressed this far below the rate: {e}"
        );
    }
}

#[test]
fn monitor_shows_ipv6_the_kernel_routes_to_a_task_as_allowed_where_it_is_delivered() {
    // Docker's routed mode: the client reaches task1's own address, which the kernel routes,
    // and task1's rules judge it as it is delivered (tc egress of its interface).
    let lab = Lab::up_v6("mn6r", 2, &["1:8080:80"], "routed");
    let state = write_groups(&lab, Groups::BOTH6);
    up(&lab, &state, &[]);
    let t1 = lab.status.tasks[0]
        .address6
        .unwrap_or_else(|| panic!("task1 has no IPv6 address: {:?}", lab.status));
    let t1_iface = lab.status.tasks[0].interface.clone();
    let mon = Monitor::start(&lab);
    mon.sync(&lab);

    let client = tcp_roundtrip(lab.client(), SocketAddr::from((t1, 80)));
    assert_eq!(
        client.ip().to_string(),
        CLIENT6,
        "the lab's client connects over IPv6"
    );

    let [drops, egress_allows, ingress_allows] = sorted_events(&mon, [0, 0, 1]);
    assert!(
        drops.is_empty() && egress_allows.is_empty(),
        "one allowed connection, its replies tracked: no drop, no egress allow: {drops:#?} \
         {egress_allows:#?}"
    );
    assert_eq!(
        ingress_allows.len(),
        1,
        "one connection is one allow event: {ingress_allows:#?}"
    );
    let flow = (client, format!("[{t1}]:80"));
    assert_task1_allows_client(&ingress_allows[0], ("task1", &t1_iface), "tc-egress", &flow);
}

/// Allow event `a` says task1's inbound rules let `flow` (the client's connection, to the
/// destination the rules judged) in, seen at `hook`.
fn assert_task1_allows_client(
    a: &Value,
    (task, iface): (&str, &str),
    hook: &str,
    (client, dst): &(SocketAddr, String),
) {
    assert_eq!(a["task"], task, "{task}'s inbound rules decided: {a}");
    assert_eq!(a["interface"], json!(iface), "{task}'s interface: {a}");
    assert_eq!(a["proto"], 6, "TCP: {a}");
    assert_eq!(a["hook"], hook, "{a}");
    assert_eq!(
        field(a, "src"),
        format!("[{CLIENT6}]:{}", client.port()),
        "the real client: {a}"
    );
    assert_eq!(
        field(a, "dst"),
        *dst,
        "what {task}'s rules judged: its own address and container port: {a}"
    );
    assert_eq!(
        a["suppressed"], 0,
        "nothing is suppressed this far below the rate: {a}"
    );
}

/// Event `e` (`what`) is about UDP from `flow.0` to `flow.1`, for `task` on its interface.
fn assert_udp_event(e: &Value, (task, iface): (&str, &str), flow: (&str, &str), what: &str) {
    assert_eq!(e["task"], task, "{what}: {e}");
    assert_eq!(e["interface"], json!(iface), "{task}'s interface: {e}");
    assert_eq!(e["proto"], 17, "UDP: {e}");
    assert_eq!((field(e, "src"), field(e, "dst")), flow, "{e}");
}

/// Files an event seen after the sync into [drops, egress allows, ingress allows]: it must be
/// one of those kinds, and neither about a marker nor a note of lost events.
fn sort_event(sorted: &mut [Vec<Value>; 3], v: Value) {
    assert!(v.get("lost").is_none(), "the monitor lost events: {v}");
    check_event_shape(&v);
    assert!(
        !is_marker(&v),
        "an event about a marker datagram after the sync: {v}"
    );
    let i = match (field(&v, "kind"), v["direction"].as_str()) {
        ("drop", _) => 0,
        ("allow", Some("egress")) => 1,
        ("allow", Some("ingress")) => 2,
        _ => panic!("unexpected event {v}"),
    };
    sorted[i].push(v);
}

/// The events after the sync, sorted by `sort_event`: read until there are `want` of each
/// (drops, egress allows, ingress allows; 10 s at most), then until none has come for a
/// second, so that a duplicate or a stray event shows too.
fn sorted_events(mon: &Monitor, want: [usize; 3]) -> [Vec<Value>; 3] {
    let mut sorted: [Vec<Value>; 3] = Default::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sorted.iter().zip(want).any(|(s, n)| s.len() < n) && Instant::now() < deadline {
        if let Some(v) = mon.next(Duration::from_millis(200)) {
            sort_event(&mut sorted, v);
        }
    }
    for v in mon.until_quiet(Duration::from_secs(1)) {
        sort_event(&mut sorted, v);
    }
    sorted
}

#[test]
fn monitor_rate_limit_suppresses_events_in_the_kernel_and_accounts_for_every_drop() {
    const RATE: u64 = 50;
    const FLOOD: u32 = 20_000;
    // No groups on task1: no allow events, so every event is a drop of the flood.
    let rate = RATE.to_string();
    let lab = lab_with_groups("mnr", Groups::TASK2, &["--monitor-rate", &rate]);
    let mon = Monitor::start(&lab);
    let markers = mon.sync(&lab);
    let before = lab.stats();

    let started = Instant::now();
    let sport = send_udp(lab.task_ns(1), task_addr(&lab, 2, REJECTED_PORT), FLOOD);
    let drops_before = task_drops(&before, "task2", "SG_INGRESS");
    wait_for_drops(&lab, drops_before + u64::from(FLOOD));
    // Every event of the flood has been made by now.
    let elapsed = started.elapsed();
    let lines = mon.until_quiet(Duration::from_secs(2));
    let after = lab.stats();

    let (mut received, mut lost, mut suppressed_fields) = (0u64, 0u64, 0u64);
    let dst = format!("{}:{REJECTED_PORT}", task_ip(&lab, 2));
    let src = format!("{}:{sport}", task_ip(&lab, 1));
    for v in &lines {
        if let Some(n) = v.get("lost") {
            lost += n
                .as_u64()
                .unwrap_or_else(|| panic!("a lost line without a count: {v}"));
            continue;
        }
        check_event_shape(v);
        assert!(
            v["kind"] == "drop"
                && v["reason"] == "SG_INGRESS"
                && v["task"] == "task2"
                && field(v, "src") == src
                && field(v, "dst") == dst,
            "only drops of the flood ({src} -> {dst}, SG_INGRESS on task2) may be seen: {v}"
        );
        received += 1;
        suppressed_fields += v["suppressed"].as_u64().unwrap();
    }

    let dropped = task_drops(&after, "task2", "SG_INGRESS") - drops_before;
    assert_eq!(
        dropped,
        u64::from(FLOOD),
        "every rejected datagram is counted, rate limit or not"
    );
    assert_eq!(
        task_egress_packets(&after, "task1") - task_egress_packets(&before, "task1"),
        u64::from(FLOOD),
        "the datapath saw every datagram task1 sent"
    );
    let suppressed = after.flow_logs.events_suppressed - before.flow_logs.events_suppressed;
    assert!(
        suppressed > 0,
        "a flood of {FLOOD} at rate {RATE} must suppress events"
    );
    assert_eq!(
        received + lost + suppressed,
        u64::from(FLOOD),
        "every drop is an event received ({received}), lost by the monitor ({lost}) or \
         suppressed in the kernel ({suppressed})"
    );
    let cpus = possible_cpus();
    // RATE a second and RATE of burst on each CPU, rounded up, and a little slack.
    let per_cpu_us = u128::from(RATE) * (elapsed.as_micros() + 1_000_000);
    let budget = u64::try_from((u128::from(cpus) * per_cpu_us).div_ceil(1_000_000))
        .expect("a budget of events fits 64 bits")
        + 5;
    let elapsed = elapsed.as_secs_f64();
    assert!(
        received + lost <= budget,
        "{received} events received and {lost} lost in {elapsed:.2} s: the kernel may send at \
         most {RATE}/s and {RATE} of burst on each of {cpus} CPUs ({budget} with slack)"
    );
    // The sending CPU's bucket was full but for the markers when the flood began.
    assert!(
        received + lost >= RATE.saturating_sub(markers),
        "only {received} events received and {lost} lost: a full bucket holds {RATE} events \
         ({markers} marker(s) sent before)"
    );
    assert!(
        suppressed_fields <= after.flow_logs.events_suppressed,
        "the events say {suppressed_fields} were suppressed before them, stats only {}",
        after.flow_logs.events_suppressed
    );
}

#[test]
fn monitor_without_an_agent_fails_with_one_line_and_works_after_up() {
    let lab = lab_with_groups("mna", Groups::TASK2, &[]);
    {
        let mon = Monitor::start(&lab);
        mon.sync(&lab);
    }

    let pid = agent::pid(&lab.name).expect("the agent's pid file");
    assert_eq!(
        agent_pid(&lab),
        pid,
        "the agent that answers is the one in its pid file"
    );
    kill_agent(pid);

    let monitor = ["--instance", lab.name.as_str(), "monitor", "--json"];
    let line = ecsnet_fails(&monitor, 1);
    assert!(
        line.contains("no agent"),
        "monitor without an agent should say so: {line}"
    );
    // The plain form fails the same way.
    let line = ecsnet_fails(&["--instance", lab.name.as_str(), "monitor"], 1);
    assert!(line.contains("no agent"), "{line}");

    let state = lab_file(&lab, GROUPS_FILE).display().to_string();
    up(&lab, &state, &[]);
    let new_pid = agent_pid(&lab);
    assert_ne!(new_pid, pid, "up started a new agent");
    let mon = Monitor::start(&lab);
    mon.sync(&lab);
    // And it shows real traffic again.
    send_udp(lab.task_ns(1), task_addr(&lab, 2, REJECTED_PORT), 3);
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen < 3 && Instant::now() < deadline {
        if let Some(v) = mon.next(Duration::from_millis(200)) {
            check_event_shape(&v);
            assert_eq!(v["reason"], "SG_INGRESS", "{v}");
            assert!(
                field(&v, "dst").ends_with(&format!(":{REJECTED_PORT}")),
                "{v}"
            );
            seen += 1;
        }
    }
    assert_eq!(
        seen, 3,
        "the monitor of the new agent shows the 3 rejected datagrams"
    );
}

/// The known traffic of `metrics_serve_the_numbers_of_stats`: datagrams to task2's published
/// UDP port and their size, and datagrams from task1 that task2's rules reject.
const UDP: u32 = 4;
const UDP_SIZE: usize = 64;
const REJECTED: u32 = 7;

/// The samples of `metrics_serve_the_numbers_of_stats` (with `stats` read around them) are the
/// numbers of its known traffic.
fn assert_samples_count_the_traffic(samples: &BTreeMap<SampleKey, u64>, stats: &Stats) {
    let (task1, task2) = (&stats.tasks[0], &stats.tasks[1]);
    assert_eq!((&*task1.name, &*task2.name), ("task1", "task2"));
    let l2 = |dir| task_labels(task2, "direction", dir);
    assert_eq!(
        sample(samples, "ecsnet_task_packets_total", &l2("ingress")),
        u64::from(UDP),
        "task2 received the {UDP} datagrams of the probe, no more"
    );
    assert_eq!(
        sample(samples, "ecsnet_task_bytes_total", &l2("ingress")),
        u64::from(UDP) * (28 + UDP_SIZE as u64),
        "IP bytes of {UDP} datagrams of {UDP_SIZE} bytes"
    );
    assert_eq!(
        sample(samples, "ecsnet_task_packets_total", &l2("egress")),
        u64::from(UDP),
        "task2 sent {UDP} echoes"
    );
    let l1 = |dir| task_labels(task1, "direction", dir);
    assert!(
        sample(samples, "ecsnet_task_packets_total", &l1("ingress")) >= 5
            && sample(samples, "ecsnet_task_bytes_total", &l1("ingress")) >= 500,
        "task1 received at least the 5 messages of 100 bytes"
    );
    assert!(
        sample(samples, "ecsnet_task_packets_total", &l1("egress")) >= u64::from(REJECTED) + 5,
        "task1 sent the {REJECTED} rejected datagrams and 5 echoes at least"
    );
    assert_eq!(
        sample(
            samples,
            "ecsnet_task_drops_total",
            &[("task", "task2"), ("reason", "SG_INGRESS")]
        ),
        u64::from(REJECTED),
        "task2's SG_INGRESS drops are the {REJECTED} datagrams rejected"
    );
    assert_eq!(
        sample(samples, "ecsnet_drops_total", &[("reason", "SG_INGRESS")]),
        u64::from(REJECTED)
    );
    assert_eq!(
        sample(samples, "ecsnet_conntrack_capacity", &[]),
        stats.conntrack.capacity
    );
    assert!(
        stats.conntrack.capacity > 0,
        "the connection table has room"
    );
    assert_eq!(
        sample(samples, "ecsnet_flow_table_capacity", &[]),
        stats.flow_logs.table_capacity
    );
    assert_eq!(
        stats.flow_logs.table_capacity, 65536,
        "the flow table's default size"
    );
    assert!(
        sample(samples, "ecsnet_flow_log_records_total", &[]) > 0,
        "records after {} windows",
        stats.flow_logs.windows_exported
    );
}

#[test]
fn metrics_serve_the_numbers_of_stats() {
    let lab = lab_with_groups("mnm", Groups::TASK2_DNS, &[]);
    let host = lab.host().to_owned();

    // Known traffic: TCP to task1's published port, UDP to task2's, and datagrams from task1
    // that task2's rules reject.
    let tcp = lab.probe(lab.client(), "tcp", &format!("{HOST}:8080"), 5, 100);
    assert_eq!(tcp["echoed"], 5, "tcp probe: {tcp}");
    let udp = lab.probe(lab.client(), "udp", &format!("{HOST}:8053"), UDP, UDP_SIZE);
    assert_eq!(udp["echoed"], json!(UDP), "udp probe: {udp}");
    send_udp(lab.task_ns(1), task_addr(&lab, 2, REJECTED_PORT), REJECTED);
    let s = wait_for_drops(&lab, u64::from(REJECTED));
    assert_eq!(task_drops(&s, "task2", "SG_INGRESS"), u64::from(REJECTED));

    // A couple of windows closed, so there are records.
    let exported = poll(
        Duration::from_secs(15),
        Duration::from_millis(200),
        || lab.stats().flow_logs.windows_exported,
        |n| *n >= 2,
    );
    assert!(
        exported.is_ok(),
        "no two windows exported in 15 s with --window 1"
    );

    let (stats, resp) = scrape_between_equal_stats(&lab);
    assert_eq!(resp.status, 200, "GET /metrics: {}", resp.body);
    let ctype = resp.header("content-type").unwrap_or("");
    assert!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "Content-Type of /metrics: {ctype:?}"
    );
    let samples = parse_exposition(&resp.body);
    let expected = expected_samples(&stats);
    assert_eq!(
        samples, expected,
        "/metrics should serve exactly the numbers of stats --json read around it"
    );

    // The numbers are those of the traffic sent.
    assert_samples_count_the_traffic(&samples, &stats);
    for (name, labels) in samples.keys() {
        assert!(
            labels.contains(&("instance".to_owned(), lab.name.clone())),
            "{name} {labels:?} lacks instance=\"{}\"",
            lab.name
        );
    }

    // Other paths and methods.
    let r = http(&host, 9464, "GET /nope HTTP/1.0\r\n\r\n").expect("GET /nope");
    assert_eq!(r.status, 404, "GET /nope: {}", r.body);
    let r = http(
        &host,
        9464,
        "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    )
    .expect("POST /metrics");
    assert_eq!(r.status, 405, "POST /metrics: {}", r.body);
}

#[test]
fn metrics_address_follows_up_and_a_bad_one_is_refused() {
    let lab = Lab::up("mnx", 1, &["1:8080:80"]);
    let host = lab.host().to_owned();
    let state = lab.state_file();

    let line = ecsnet_fails(
        &lab.ecsnet_args(&["up", "--state", &state, "--metrics", "bogus"]),
        2,
    );
    assert!(line.contains("metrics"), "the error names the flag: {line}");
    let after_refusal = ecsnet(&["--instance", &lab.name, "stats", "--json"]);
    assert!(
        !after_refusal.status.success(),
        "a refused up left instance {} up: {}",
        lab.name,
        String::from_utf8_lossy(&after_refusal.stdout)
    );

    up(&lab, &state, &["--metrics", "127.0.0.1:9465"]);
    agent_pid(&lab);
    let r = scrape(&host, 9465);
    assert_eq!(r.status, 200, "GET /metrics on 9465: {}", r.body);
    let samples = parse_exposition(&r.body);
    let want = lab.stats().conntrack.capacity;
    assert_eq!(sample(&samples, "ecsnet_conntrack_capacity", &[]), want);
    match http(&host, 9464, "GET /metrics HTTP/1.0\r\n\r\n") {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("9464 should refuse connections with --metrics on 9465: {e}"),
        Ok(r) => panic!("9464 still serves with --metrics on 9465: {}", r.status),
    }

    ecsnet_ok(&["--instance", &lab.name, "down"]);
    up(&lab, &state, &["--metrics", "off"]);
    agent_pid(&lab);
    for port in [9464, 9465] {
        match http(&host, port, "GET /metrics HTTP/1.0\r\n\r\n") {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("{port} should refuse connections with --metrics off: {e}"),
            Ok(r) => panic!("{port} serves with --metrics off: {}", r.status),
        }
    }
}
