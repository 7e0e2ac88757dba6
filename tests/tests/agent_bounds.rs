//! A bounded agent (issue 16, item 5): any local user can open connections to the metrics port
//! and root can open them to the control socket; neither flood may disable the agent.
//!
//! On a lab with ecsnet up (`--ct-timeouts udp=2`), 21,000 idle TCP connections to the metrics
//! port (127.0.0.1:9464 in the host's namespace), held open, and then the same number of idle
//! connections to the control socket: while each flood is held, `ecsnet stats` answers within
//! 5 s, the control socket answers a ping from the same agent within 5 s, a scrape of
//! `/metrics` succeeds, an answered UDP flow through ecsnet is collected by the agent's GC within
//! its timeout, the GC interval and a margin, and the agent's log grows by less than 10 MB. The
//! agent's counters (`stats --json`, `agent`) account for the connections it closed. On the agent
//! before the fix both floods fail: its descriptors run out, the ping is never answered.
//!
//! With its descriptors exhausted on purpose (its soft limit lowered with prlimit), every accept
//! fails: the agent pauses between tries (a handful of failures in 4 s, not millions), counts
//! them and logs one line. Monitors are capped at 16, and following, keep their slots through a
//! flood; their permits come back when they leave.
//!
//! The connections are held by three helper processes (`src/bin/hold-connections.rs`), so no
//! process needs more descriptors than the machine's hard limit (20,000 here, and the tests lack
//! `CAP_SYS_RESOURCE` to raise it); the agent starts with that limit too, so on the old agent the
//! flood exhausts its descriptors as in the issue. The floods are bounded in count and time and
//! stay inside the lab's host namespace (loopback) and the instance's socket.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use ecsnet::store::paths::InstancePaths;
use ecsnet_tests::{Lab, Stats, counters::poll, ecsnet_bin, in_netns, traffic::unix_connect};
use nix::sys::socket::UnixAddr;
use serde_json::Value;

/// Connections in each flood: more than the open-files limit the agent starts with here
/// (20,000), as in the issue.
const FLOOD: usize = 21_000;
/// The longest a flood may take to open; what is open by then is held.
const FLOOD_DEADLINE: Duration = Duration::from_secs(60);
/// Helper processes holding a flood's connections.
const HELPERS: usize = 3;
/// `up --ct-timeouts udp=2`, seconds.
const UDP_TIMEOUT_SECS: u64 = 2;
/// How often the agent collects garbage, seconds (ARCHITECTURE.md).
const GC_INTERVAL_SECS: u64 = 1;
/// Slack for a loaded two-core machine, seconds.
const GC_MARGIN_SECS: u64 = 4;
/// How much the agent's log may grow while flooded.
const LOG_GROWTH_MAX: u64 = 10 << 20;
/// How long `stats` and a control request may take while flooded.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long the agent is left without descriptors.
const EXHAUSTED_FOR: Duration = Duration::from_secs(4);
/// The lab client's UDP echo port.
const CLIENT_ECHO: &str = "10.10.0.2:9000";

/// One flood at a time: each holds 21,000 connections, and the machine is shared.
static ONE_FLOOD_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Idle connections held by helper processes (`hold-connections`, in this package): this
/// process cannot hold 21,000 descriptors when its hard limit is lower and it lacks
/// `CAP_SYS_RESOURCE` to raise it. Killed when dropped (also on panic).
struct Flood {
    helpers: Vec<Child>,
    connected: usize,
    failed: u64,
}

impl Flood {
    /// `count` connections to `target` (`tcp` ADDR:PORT or `unix` PATH) from `HELPERS`
    /// processes, run in namespace `netns` if given; returns once every helper has opened its
    /// share or given up at `FLOOD_DEADLINE`.
    fn open(netns: Option<&str>, kind: &str, target: &str, count: usize) -> Self {
        let start = Instant::now();
        let secs = FLOOD_DEADLINE.as_secs().to_string();
        let mut flood = Flood {
            helpers: Vec::new(),
            connected: 0,
            failed: 0,
        };
        for i in 0..HELPERS {
            let share = count / HELPERS + usize::from(i < count % HELPERS);
            let share = share.to_string();
            let helper = env!("CARGO_BIN_EXE_hold-connections");
            let mut cmd = match netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, helper]);
                    c
                }
                None => Command::new(helper),
            };
            let child = cmd
                .args([kind, target, &share, &secs])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("start {helper}: {e}"));
            flood.helpers.push(child);
        }
        for child in &mut flood.helpers {
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().expect("piped stdout"))
                .read_line(&mut line)
                .expect("read the helper's count");
            let (ok, failed) = line
                .trim()
                .split_once(' ')
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<u64>().ok()?)))
                .unwrap_or_else(|| panic!("the flood helper printed {line:?}"));
            flood.connected += ok;
            flood.failed += failed;
        }
        eprintln!(
            "{kind} flood of {target}: {} connections open in {:?}, {} connects failed",
            flood.connected,
            start.elapsed(),
            flood.failed
        );
        flood
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for c in &mut self.helpers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A test's own lab of one task with ecsnet up and idle UDP flows expiring after 2 s, taken
/// while no other test of this file floods: the agent's pid and its log's size before the
/// test did anything to it.
struct Bounded {
    lab: Lab,
    pid: i32,
    log_before: u64,
    _one: MutexGuard<'static, ()>,
}

impl Bounded {
    fn new(prefix: &str) -> Self {
        let one = ONE_FLOOD_AT_A_TIME
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let lab = Lab::up(prefix, 1, &[]);
        let udp = format!("udp={UDP_TIMEOUT_SECS}");
        let out = lab.ecsnet_up_with(&["--ct-timeouts", &udp]);
        assert!(out.contains(" up"), "up printed: {out}");
        let pid = ping(&lab).unwrap_or_else(|e| panic!("the agent answers: {e}"));
        let log_before = log_size(&lab);
        Bounded {
            lab,
            pid,
            log_before,
            _one: one,
        }
    }

    /// The instance's control socket.
    fn socket(&self) -> String {
        InstancePaths::new(&self.lab.name)
            .socket()
            .display()
            .to_string()
    }

    /// Holding `flood` of idle `listener` connections, the agent does all it must; then its
    /// counters account for every connection over its cap of `cap`.
    fn holds_and_counts(&self, flood: &Flood, listener: &str, cap: usize) {
        let what = format!("21,000 idle {listener} connections");
        agent_holds(&self.lab, &what, self.pid, self.log_before);
        closed_are_counted(&self.lab, listener, flood.connected, cap);
    }
}

fn log_size(lab: &Lab) -> u64 {
    let path = InstancePaths::new(&lab.name).log_file();
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len()
}

/// `ecsnet ARGS`, killed if it has not finished within `limit`; Err says how long it ran.
fn ecsnet_within(args: &[&str], limit: Duration) -> Result<(Output, Duration), String> {
    let start = Instant::now();
    let mut child = Command::new(ecsnet_bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ecsnet");
    while start.elapsed() < limit {
        if child.try_wait().expect("wait for ecsnet").is_some() {
            let out = child.wait_with_output().expect("ecsnet's output");
            return Ok((out, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!(
        "`ecsnet {}` did not answer within {limit:?}",
        args.join(" ")
    ))
}

/// A new connection to the control socket, connected (and answered) within `ANSWER_WITHIN`
/// however full its backlog.
fn control_stream(lab: &Lab) -> Result<UnixStream, String> {
    let path = InstancePaths::new(&lab.name).socket();
    let addr = UnixAddr::new(&path).expect("a socket path");
    let fd = unix_connect(&addr, Instant::now() + ANSWER_WITHIN)
        .map_err(|e| format!("connect {}: {e}", path.display()))?;
    let s = UnixStream::from(fd);
    s.set_nonblocking(false).expect("blocking mode");
    s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    s.set_write_timeout(Some(ANSWER_WITHIN)).unwrap();
    Ok(s)
}

/// One request on the control socket, with a deadline for connecting and for the answer.
fn control(lab: &Lab, request: &str) -> Result<Value, String> {
    let s = control_stream(lab)?;
    (&s).write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("send {request}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("answer to {request}: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("answer to {request} {line:?}: {e}"))
}

fn ping(lab: &Lab) -> Result<i32, String> {
    let v = control(lab, r#"{"op":"ping"}"#)?;
    v["pid"]
        .as_u64()
        .and_then(|p| i32::try_from(p).ok())
        .filter(|_| v["ok"] == Value::Bool(true))
        .ok_or_else(|| format!("ping answered {v}"))
}

/// `GET /metrics` on 127.0.0.1:9464 in the lab's host namespace: the status code.
fn scrape(lab: &Lab) -> Result<u16, String> {
    in_netns(lab.host(), || {
        let addr: SocketAddr = ([127, 0, 0, 1], 9464).into();
        let mut s = TcpStream::connect_timeout(&addr, ANSWER_WITHIN).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw);
        // HTTP/1.0 asked, HTTP/1.0 or 1.1 answered: the status code is what counts.
        text.strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {:?}", &text[..text.len().min(200)]))
    })
}

fn stats(lab: &Lab) -> Stats {
    let (out, _) = ecsnet_within(
        &["--instance", &lab.name, "stats", "--json"],
        ANSWER_WITHIN * 2,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats --json parses")
}

/// A UDP datagram from task1 to the client's echo server and its echo, through ecsnet's
/// masquerade: one tracked flow.
fn udp_flow(lab: &Lab) -> bool {
    in_netns(lab.task_ns(1), || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.send_to(b"gc", CLIENT_ECHO).unwrap();
        let mut buf = [0u8; 8];
        s.recv_from(&mut buf).is_ok()
    })
}

/// Everything the agent must still do while a flood is held.
fn agent_holds(lab: &Lab, what: &str, pid: i32, log_before: u64) {
    // `ecsnet stats`.
    let args = ["--instance", lab.name.as_str(), "stats", "--json"];
    let (out, took) =
        ecsnet_within(&args, ANSWER_WITHIN).unwrap_or_else(|e| panic!("with {what} held: {e}"));
    assert!(
        out.status.success(),
        "with {what} held, stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("with {what} held: stats answered in {took:?}");

    // The control socket, answered by the same agent.
    let start = Instant::now();
    let got = ping(lab).unwrap_or_else(|e| panic!("with {what} held, the control socket: {e}"));
    assert_eq!(got, pid, "with {what} held, another agent answered");
    assert!(
        start.elapsed() < ANSWER_WITHIN,
        "with {what} held, a ping took {:?}",
        start.elapsed()
    );
    eprintln!(
        "with {what} held: the control socket answered in {:?}",
        start.elapsed()
    );

    // A scrape.
    let status = scrape(lab).unwrap_or_else(|e| panic!("with {what} held, GET /metrics: {e}"));
    assert_eq!(status, 200, "with {what} held, GET /metrics");

    // Garbage collection: an answered UDP flow goes away after its timeout.
    let base = stats(lab).conntrack.entries;
    assert!(
        udp_flow(lab),
        "with {what} held, UDP from task1 to {CLIENT_ECHO} got no echo"
    );
    let tracked = stats(lab).conntrack.entries;
    assert!(
        tracked >= base + 2,
        "the UDP flow is tracked: {base} entries before, {tracked} after"
    );
    let sent = Instant::now();
    let limit = Duration::from_secs(UDP_TIMEOUT_SECS + GC_INTERVAL_SECS + GC_MARGIN_SECS);
    let (Ok(n) | Err(n)) = poll(
        limit,
        Duration::from_millis(200),
        || stats(lab).conntrack.entries,
        |n| *n <= base,
    );
    assert!(
        n <= base,
        "with {what} held, the expired UDP flow was not collected within {limit:?} \
         ({n} entries, {base} before it): garbage collection stopped"
    );
    eprintln!(
        "with {what} held: the UDP flow was collected {:?} after its echo",
        sent.elapsed()
    );

    let grown = log_size(lab).saturating_sub(log_before);
    assert!(
        grown < LOG_GROWTH_MAX,
        "with {what} held, the agent's log grew by {grown} bytes"
    );
    eprintln!("with {what} held: the agent's log grew by {grown} bytes");
}

/// The agent's counters for `listener` once they account for `opened` connections, of which
/// the agent holds at most `cap`: everything else was closed (evicted or over the cap) and none
/// of it was an accept error. They are rewritten every second.
fn closed_are_counted(lab: &Lab, listener: &str, opened: usize, cap: usize) {
    let pick = |s: &Stats| match listener {
        "metrics" => s.agent.metrics,
        _ => s.agent.control,
    };
    let want = (opened - cap) as u64;
    let (Ok(l) | Err(l)) = poll(
        Duration::from_secs(5),
        Duration::from_millis(200),
        || pick(&stats(lab)),
        |l| l.evicted + l.over_cap >= want,
    );
    eprintln!("{listener} counters: {l:?}");
    assert!(
        l.evicted + l.over_cap >= want,
        "{opened} connections to {listener}, at most {cap} held: the rest must be counted \
         closed: {l:?}"
    );
    assert_eq!(
        l.accept_errors, 0,
        "the caps keep descriptors free: no accept may fail: {l:?}"
    );
}

#[test]
fn idle_connections_to_the_metrics_port_do_not_disable_the_agent() {
    let b = Bounded::new("abm");
    assert_eq!(
        scrape(&b.lab),
        Ok(200),
        "GET /metrics answers before the flood"
    );
    let flood = Flood::open(Some(b.lab.host()), "tcp", "127.0.0.1:9464", FLOOD);
    b.holds_and_counts(&flood, "metrics", ecsnet::agent::metrics::LIMITS.cap);
    drop(flood);
}

#[test]
fn idle_connections_to_the_control_socket_do_not_disable_the_agent() {
    let b = Bounded::new("abc");
    let path = b.socket();
    assert!(Path::new(&path).exists(), "{path} is there");
    let flood = Flood::open(None, "unix", &path, FLOOD);
    b.holds_and_counts(&flood, "control", ecsnet::agent::control::LIMITS.cap);
    // Last, so a broken agent shows first which promise it broke.
    assert_eq!(
        flood.connected, FLOOD,
        "the agent stopped taking connections: {} of {FLOOD} connected in {FLOOD_DEADLINE:?}",
        flood.connected
    );
    drop(flood);
}

/// `prlimit` of the agent's open-files limit: sets it to `new` when given; returns the old one.
fn agent_nofile(pid: i32, new: Option<&libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new = new.map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: plain syscall on valid pointers; NULL would mean "do not set".
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, new, &raw mut old) };
    assert_eq!(
        r,
        0,
        "prlimit of the agent: {}",
        std::io::Error::last_os_error()
    );
    old
}

/// The agent's soft open-files limit set to `soft` (hard unchanged); returns the old one.
fn set_agent_nofile(pid: i32, soft: u64) -> u64 {
    let old = agent_nofile(pid, None);
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    agent_nofile(pid, Some(&new));
    old.rlim_cur
}

/// Lines of the agent's log after byte `from` that contain `what`.
fn log_lines(lab: &Lab, from: u64, what: &str) -> Vec<String> {
    let path = InstancePaths::new(&lab.name).log_file();
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let from = usize::try_from(from).expect("a log offset fits memory");
    String::from_utf8_lossy(&text[from..])
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

/// With its descriptors exhausted (its soft limit lowered to what it has open), the agent's
/// metrics listener fails every accept: it must pause between tries rather than spin, count
/// them, and log one line per interval; once the limit is back everything works again.
#[test]
fn failed_accepts_back_off_and_are_logged_once_per_interval() {
    let b = Bounded::new("abe");
    let (lab, pid) = (&b.lab, b.pid);
    // New descriptors take the lowest free numbers, which must stay under the limit: leave
    // the agent three (the caller's inherited ones may sit far above).
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's descriptors")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    let limit = (0..)
        .filter(|n| !open.contains(n))
        .nth(3)
        .expect("a free number");
    let old = set_agent_nofile(pid, limit);
    let start = Instant::now();
    let held = in_netns(lab.host(), || {
        let addr: SocketAddr = ([127, 0, 0, 1], 9464).into();
        (0..100)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok())
            .collect::<Vec<_>>()
    });
    std::thread::sleep(EXHAUSTED_FOR.saturating_sub(start.elapsed()));
    set_agent_nofile(pid, old);
    let exhausted = start.elapsed();
    eprintln!(
        "{} connections opened while the agent was out of descriptors for {exhausted:?}",
        held.len()
    );

    // Counted (the counters file is written again now that the agent can open files).
    let (Ok(errors) | Err(errors)) = poll(
        Duration::from_secs(5),
        Duration::from_millis(200),
        || stats(lab).agent.metrics.accept_errors,
        |n| *n > 0,
    );
    assert!(
        errors > 0,
        "no accept error counted while out of descriptors"
    );
    // Pauses doubling from 10 ms to 1 s: about 7 tries in the first 1.3 s, then one a second.
    // A spinning loop makes hundreds of thousands.
    let most = exhausted.as_secs() + 10;
    assert!(
        errors <= most,
        "{errors} failed accepts in {exhausted:?}: the listener does not back off (at most {most})"
    );
    let lines = log_lines(lab, b.log_before, "accept failed");
    eprintln!("{errors} failed accepts, logged as: {lines:#?}");
    assert!(
        !lines.is_empty() && lines.len() <= 2,
        "one line per 10 s for {errors} failures in {exhausted:?}, got {}: {lines:#?}",
        lines.len()
    );
    drop(held);

    // And everything works again.
    assert_eq!(ping(lab), Ok(pid), "the same agent answers afterwards");
    assert_eq!(scrape(lab), Ok(200), "GET /metrics works afterwards");
    let grown = log_size(lab) - b.log_before;
    assert!(grown < 64 << 10, "the log grew by {grown} bytes");
}

/// A `monitor` request on a new control connection: the connection and the first line.
fn monitor_request(lab: &Lab) -> (UnixStream, Value) {
    let mut s = control_stream(lab).unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"{\"op\":\"monitor\"}\n")
        .expect("send monitor");
    // Byte by byte: the line after the hello belongs to whoever reads the stream next.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            other => panic!("the monitor's first line: {other:?} after {line:?}"),
        }
    }
    let v = serde_json::from_slice(&line).expect("a JSON line");
    (s, v)
}

/// Monitors are capped (16) and, following, hold their slots through a flood of idle control
/// connections; the control socket answers meanwhile.
#[test]
fn monitors_are_capped_and_keep_their_slots_through_a_flood() {
    let b = Bounded::new("abn");
    let lab = &b.lab;
    let monitors: Vec<UnixStream> = (0..16)
        .map(|i| {
            let (s, hello) = monitor_request(lab);
            assert_eq!(hello["ok"], Value::Bool(true), "monitor {i}: {hello}");
            s
        })
        .collect();
    let (_, refused) = monitor_request(lab);
    assert_eq!(
        refused["ok"],
        Value::Bool(false),
        "a 17th monitor: {refused}"
    );
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("16 monitors"), "{error}");

    let flood = Flood::open(None, "unix", &b.socket(), 3_000);
    assert_eq!(flood.connected, 3_000, "the agent took every connection");
    assert_eq!(
        ping(lab),
        Ok(b.pid),
        "the control socket answers during the flood"
    );
    for (i, mut m) in monitors.iter().enumerate() {
        m.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        match m.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("monitor {i} was closed or written to during the flood: {other:?}"),
        }
    }
    drop(flood);
    drop(monitors);
    // Their slots and permits come back: a new monitor is taken.
    let hello = poll(
        ANSWER_WITHIN,
        Duration::from_millis(100),
        || monitor_request(lab).1,
        |hello| hello["ok"] == Value::Bool(true),
    );
    assert!(
        hello.is_ok(),
        "no monitor taken after the others left: {hello:?}"
    );
}
