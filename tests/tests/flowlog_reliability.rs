//! Flow logs count every packet exactly once, whatever happens to the agent (SPEC §7, §10):
//! an agent killed with SIGKILL again and again in the middle of windows and of exports, and
//! started again with `up`, loses no count and counts nothing twice, in the journal behind
//! `flows tail` and in the `--flow-log` file alike, while the datapath forwards every datagram;
//! a full flow table is never silent (SKIPDATA records whose lost packets close the account
//! exactly); `--flow-logs off` writes nothing and still forwards; and after `down` and `up` a
//! flow is counted from zero, with nothing left over from before, while `down` itself exports
//! the window it found open.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ecsnet::store::paths::InstancePaths;
use ecsnet_tests::{
    Lab, Stats,
    agent::{self, alive, kill_agent},
    in_netns, ns_exec,
    traffic::udp,
    world::{flows_tail, instance_ok, lab_file},
};
use nix::sys::socket::{setsockopt, sockopt};
use serde_json::Value;

/// The fields the tests read, in the order of the `--flow-format` of the file sink and of the
/// `flows tail --format`.
const FIELDS: [&str; 11] = [
    "interface-id",
    "srcaddr",
    "dstaddr",
    "srcport",
    "dstport",
    "protocol",
    "packets",
    "bytes",
    "flow-direction",
    "action",
    "log-status",
];
const IFACE: usize = 0;
const SRC: usize = 1;
const DST: usize = 2;
const SPORT: usize = 3;
const DPORT: usize = 4;
const PROTO: usize = 5;
const PACKETS: usize = 6;
const BYTES: usize = 7;
const DIRECTION: usize = 8;
const ACTION: usize = 9;
const STATUS: usize = 10;

/// IP and UDP headers: a UDP datagram with P payload bytes is 28 + P IP bytes.
const UDP_OVERHEAD: u64 = 28;

/// `${f1} ${f2} ...` for `FIELDS`.
fn format() -> String {
    FIELDS
        .iter()
        .map(|f| format!("${{{f}}}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Records: the journal, `flows tail` and the file sink, all as rows of `FIELDS`.

/// One record as the values of `FIELDS`, rendered as the file sink renders them.
type Row = Vec<String>;

/// A journal record (JSON with every field) rendered as a row: null is `-`.
fn row(v: &Value) -> Row {
    FIELDS
        .iter()
        .map(|f| match &v[*f] {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// Every complete line of the journal (`flows.jsonl`), parsed.
fn journal(paths: &InstancePaths) -> Vec<Value> {
    let path = paths.flow_journal();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    };
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("journal line {l:?} does not parse: {e}"))
        })
        .collect()
}

/// `flows tail -n all --json --format FIELDS`, as rows.
fn tail(lab: &Lab) -> Vec<Row> {
    flows_tail(lab, &["--json", "--format", &format()])
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("flows tail line {l:?} is not JSON: {e}"));
            row(&v)
        })
        .collect()
}

/// The `--flow-log` file: (its header lines, its record lines as rows).
fn sink(path: &Path) -> (Vec<usize>, Vec<Row>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let header = FIELDS.join(" ");
    let mut headers = Vec::new();
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line == header {
            headers.push(i);
            continue;
        }
        let r: Row = line.split(' ').map(str::to_owned).collect();
        assert_eq!(
            r.len(),
            FIELDS.len(),
            "{} line {}: {line:?} does not have the {} fields of the format",
            path.display(),
            i + 1,
            FIELDS.len()
        );
        rows.push(r);
    }
    (headers, rows)
}

/// One direction of a flow as one task interface sees it.
struct FlowId {
    iface: String,
    src: SocketAddr,
    dst: SocketAddr,
    direction: &'static str,
}

impl FlowId {
    fn matches(&self, r: &Row) -> bool {
        r[IFACE] == self.iface
            && r[SRC] == self.src.ip().to_string()
            && r[DST] == self.dst.ip().to_string()
            && r[SPORT] == self.src.port().to_string()
            && r[DPORT] == self.dst.port().to_string()
            && r[PROTO] == "17"
            && r[DIRECTION] == self.direction
    }
}

fn num(r: &Row, i: usize) -> u64 {
    r[i].parse()
        .unwrap_or_else(|e| panic!("field {} of {r:?} is not a number: {e}", FIELDS[i]))
}

/// (packets, bytes, records) over the OK ACCEPT records of `f`; fails on any other record of
/// it (REJECT, or a status that should not carry a 5-tuple).
fn sum(rows: &[Row], f: &FlowId, what: &str) -> (u64, u64, usize) {
    let (mut p, mut b, mut n) = (0, 0, 0);
    for r in rows.iter().filter(|r| f.matches(r)) {
        assert!(
            r[STATUS] == "OK" && r[ACTION] == "ACCEPT",
            "{what}: a record of {} -> {} on {} is not OK/ACCEPT: {r:?}",
            f.src,
            f.dst,
            f.iface
        );
        p += num(r, PACKETS);
        b += num(r, BYTES);
        n += 1;
    }
    (p, b, n)
}

/// Asserts that the OK records of `f` in `rows` add up to `packets` datagrams of `payload`
/// bytes.
fn assert_exact(rows: &[Row], f: &FlowId, packets: u64, payload: u64, what: &str) {
    let (p, b, n) = sum(rows, f, what);
    assert_eq!(
        (p, b),
        (packets, packets * (UDP_OVERHEAD + payload)),
        "{what}: the {n} record(s) of {} -> {} ({} on {}) should add up to the {packets} \
         datagram(s) of {payload} payload bytes sent (packets, bytes)",
        f.src,
        f.dst,
        f.direction,
        f.iface
    );
}

// ---------------------------------------------------------------------------------------------
// The agent and its windows.

fn paths(lab: &Lab) -> InstancePaths {
    InstancePaths::new(&lab.name)
}

/// The export checkpoint as text ("" when there is none).
fn checkpoint_text(paths: &InstancePaths) -> String {
    std::fs::read_to_string(paths.flow_checkpoint()).unwrap_or_default()
}

/// The phase of the export checkpoint ("exporting", "exported", "done"), if there is one.
fn phase(paths: &InstancePaths) -> Option<String> {
    let text = checkpoint_text(paths);
    let v: Value = serde_json::from_str(&text).ok()?;
    v["phase"].as_str().map(str::to_owned)
}

/// Polls the checkpoint (every 200 µs: an export lasts tens of ms) until its phase is `want`.
fn wait_phase(paths: &InstancePaths, want: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if phase(paths).as_deref() == Some(want) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Where the export stood when a killed agent died, read from what it left on disk.
#[derive(Debug)]
struct Killed {
    /// The checkpoint's phase.
    phase: Option<String>,
    /// The journal holds bytes past the checkpoint of an unfinished export: records the next
    /// agent must cut and write again.
    journal_past_checkpoint: bool,
    /// The same for the file sink.
    sink_past_checkpoint: bool,
}

/// The checkpoint's (phase, journalLen, sinkLen).
fn checkpoint(paths: &InstancePaths) -> Option<(String, u64, u64)> {
    let v: Value = serde_json::from_str(&checkpoint_text(paths)).ok()?;
    Some((
        v["phase"].as_str()?.to_owned(),
        v["journalLen"].as_u64()?,
        v["sinkLen"].as_u64().unwrap_or(0),
    ))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// SIGKILLs agent `pid` and waits until it is gone; says where it left its export.
fn kill(paths: &InstancePaths, pid: i32, sink: &Path) -> Killed {
    kill_agent(pid);
    let cp = checkpoint(paths);
    let exporting = cp.as_ref().filter(|c| c.0 == "exporting");
    Killed {
        phase: cp.as_ref().map(|c| c.0.clone()),
        journal_past_checkpoint: exporting.is_some_and(|c| file_len(&paths.flow_journal()) > c.1),
        sink_past_checkpoint: exporting.is_some_and(|c| file_len(sink) > c.2),
    }
}

/// Waits (5 s at most) for a window to close: its export is under way.
fn wait_window_closed(paths: &InstancePaths) {
    assert!(
        wait_phase(paths, "exporting", Duration::from_secs(5)),
        "no window closed within 5 s"
    );
}

/// Waits (5 s at most each) for the agent to finish its recovery, then for the next export.
fn wait_next_export(paths: &InstancePaths) {
    assert!(
        wait_phase(paths, "done", Duration::from_secs(5)),
        "the agent never finished its recovery"
    );
    wait_window_closed(paths);
}

/// Waits for the next export to begin, then spins until its first records reach the journal
/// (or, with `sink`, the file sink, which is written after the journal): the file grows past
/// the checkpoint's length, so the kill lands between writing records and marking them
/// written. False when the export finished before the spinner saw it.
fn wait_append(paths: &InstancePaths, sink: Option<&Path>) -> bool {
    wait_next_export(paths);
    let Some((_, journal_len, sink_len)) = checkpoint(paths).filter(|c| c.0 == "exporting") else {
        return false;
    };
    let (file, len) = match sink {
        Some(s) => (s.to_owned(), sink_len),
        None => (paths.flow_journal(), journal_len),
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut n = 0u32;
    while Instant::now() < deadline {
        if file_len(&file) > len {
            return true;
        }
        n += 1;
        if n.is_multiple_of(64) && phase(paths).as_deref() != Some("exporting") {
            return false;
        }
    }
    false
}

/// `up` with one-second windows and the `--flow-log` file `sink`, in the order of `FIELDS`.
fn up_with_sink(lab: &Lab, sink: &Path) {
    let (sink, fmt) = (sink.display().to_string(), format());
    lab.ecsnet_up_with(&["--window", "1", "--flow-log", &sink, "--flow-format", &fmt]);
}

/// Runs `up_with_sink` again after the agent `old` was killed; returns the new agent's pid,
/// checked to be another, live process.
fn restart(lab: &Lab, sink: &Path, old: i32) -> i32 {
    up_with_sink(lab, sink);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = agent::pid(&lab.name).filter(|pid| *pid != old) {
            assert!(alive(pid), "the new agent {pid} is not running");
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "`up` after SIGKILL: agent.pid still names the killed agent {old}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every window up to the one open now has been exported: once window W+2 is
/// open, W+1 has been closed, which the exporter does only after W's records are written.
fn wait_exported(lab: &Lab) -> u32 {
    let open = lab.stats().flow_logs.window;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = lab.stats().flow_logs.window;
        if now >= open + 2 {
            return open;
        }
        assert!(
            Instant::now() < deadline,
            "windows stopped closing: window {now} is still open 20 s after window {open} was"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the exporter has written, read while no export is under way (the checkpoint is "done"
/// and the same before and after): stats, the journal, `flows tail` and the file sink.
struct Exported {
    stats: Stats,
    journal: Vec<Value>,
    tail: Vec<Row>,
    sink_headers: Vec<usize>,
    sink: Vec<Row>,
}

fn exported(lab: &Lab, sink_path: Option<&Path>) -> Exported {
    let p = paths(lab);
    for _ in 0..100 {
        let before = checkpoint_text(&p);
        if phase(&p).as_deref() != Some("done") {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let stats = lab.stats();
        let journal = journal(&p);
        let tail = tail(lab);
        let (sink_headers, sink) = sink_path.map(sink).unwrap_or_default();
        if checkpoint_text(&p) == before {
            return Exported {
                stats,
                journal,
                tail,
                sink_headers,
                sink,
            };
        }
    }
    panic!("never found the exporter between two exports");
}

// ---------------------------------------------------------------------------------------------
// Traffic.

/// A UDP receiver in a namespace counting datagrams by the sequence number they carry.
struct Receiver {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Received>>,
}

#[derive(Debug, Default)]
struct Received {
    datagrams: u64,
    distinct: BTreeSet<u32>,
    wrong_size: u64,
}

impl Receiver {
    fn start(ns: &str, port: u16, payload: usize) -> Self {
        let sock = in_netns(ns, move || UdpSocket::bind(("0.0.0.0", port)))
            .unwrap_or_else(|e| panic!("bind UDP {port} in {ns}: {e}"));
        // Room for far more than the sender ever has in flight: no loss from overruns.
        setsockopt(&sock, sockopt::RcvBufForce, &(8 << 20)).expect("SO_RCVBUFFORCE");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut got = Received::default();
            let mut buf = vec![0u8; 65536];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        got.datagrams += 1;
                        if n != payload {
                            got.wrong_size += 1;
                        }
                        if n >= 4 {
                            got.distinct
                                .insert(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if stop2.load(Ordering::Relaxed) {
                            return got;
                        }
                    }
                    Err(e) => panic!("recv: {e}"),
                }
            }
        });
        Receiver {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops once nothing more arrives (call after the senders are done).
    fn finish(mut self) -> Received {
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("receiver thread")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP socket in namespace `ns` bound to `src` and connected to `dst`.
fn udp_socket(ns: &str, src: SocketAddr, dst: SocketAddr) -> UdpSocket {
    udp(ns, &src.to_string(), Some(&dst.to_string()))
}

/// A datagram of `payload` bytes carrying `seq` in its first four.
fn datagram(seq: u32, payload: usize) -> Vec<u8> {
    let mut d = vec![0x5a; payload];
    d[..4].copy_from_slice(&seq.to_be_bytes());
    d
}

/// Sends `count` numbered datagrams from `src` to `dst`, about one a millisecond; returns the
/// count (a datagram the kernel does not take fails the test).
fn send_burst(ns: &str, src: SocketAddr, dst: SocketAddr, count: u32, payload: usize) -> u64 {
    let s = udp_socket(ns, src, dst);
    for seq in 0..count {
        s.send(&datagram(seq, payload))
            .unwrap_or_else(|e| panic!("send {src} -> {dst}: {e}"));
        std::thread::sleep(Duration::from_millis(1));
    }
    u64::from(count)
}

/// Sets `flag` when dropped, so a failing test also stops the threads it started.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// The two records a task-to-task flow has: egress on the sender's, ingress on the receiver's
/// interface.
fn both_ends(lab: &Lab, src: SocketAddr, dst: SocketAddr) -> [FlowId; 2] {
    [
        FlowId {
            iface: lab.status.tasks[0].interface.clone(),
            src,
            dst,
            direction: "egress",
        },
        FlowId {
            iface: lab.status.tasks[1].interface.clone(),
            src,
            dst,
            direction: "ingress",
        },
    ]
}

/// No (window, interface, 5-tuple, direction, action, status) twice in the journal; windows
/// in order, every window from the first to the last exported, with a record for every task
/// interface.
fn assert_each_window_once(lab: &Lab, journal: &[Value]) {
    let mut keys: BTreeMap<(u64, Row), usize> = BTreeMap::new();
    let mut last = 0;
    let mut windows: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (i, v) in journal.iter().enumerate() {
        let w = v["ecsnet-window"]
            .as_u64()
            .unwrap_or_else(|| panic!("journal record {i} has no ecsnet-window: {v}"));
        assert!(
            w >= last,
            "journal record {i} is of window {w} after one of window {last}: {v}"
        );
        last = w;
        let mut key = row(v);
        key[PACKETS] = String::new();
        key[BYTES] = String::new();
        windows.entry(w).or_default().insert(key[IFACE].clone());
        *keys.entry((w, key)).or_default() += 1;
    }
    let twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "records exported more than once (window, record): {twice:?}"
    );
    let first = *windows.keys().next().expect("the journal has records");
    let numbers: Vec<u64> = windows.keys().copied().collect();
    let want: Vec<u64> = (first..=last).collect();
    assert_eq!(
        numbers, want,
        "the journal should hold every window from {first} to {last}, each exported"
    );
    for (w, ifaces) in &windows {
        for t in &lab.status.tasks {
            assert!(
                ifaces.contains(&t.interface),
                "window {w} has no record (OK, NODATA or SKIPDATA) for {} ({}): {ifaces:?}",
                t.interface,
                t.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// When the killer strikes, relative to the exporter.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This long after a window closed: in the middle of the next window.
    AfterClose(Duration),
    /// As soon as an export is under way (the checkpoint says "exporting"), after the new
    /// agent has finished its recovery: the window is closed, its records not yet written.
    DuringExport,
    /// Right after `up` returns: the new agent is recovering and exporting the window that
    /// grew while no agent ran.
    RightAfterUp,
    /// As soon as the journal has grown past the checkpoint of the export under way: records
    /// written (some or all), not yet marked written. Tried over up to 4 windows.
    AfterJournalAppend,
    /// The same for the file sink, written right after the journal.
    AfterSinkAppend,
    /// As soon as the records of a window are marked written but its flows not yet forgotten
    /// ("exported"), if the poller catches that moment within 3 s; else then.
    AfterRecordsWritten,
}

impl KillAt {
    /// Waits for the moment to strike.
    fn wait(self, p: &InstancePaths, sink_path: &Path) {
        match self {
            KillAt::AfterClose(d) => {
                wait_window_closed(p);
                std::thread::sleep(d);
            }
            KillAt::DuringExport => wait_next_export(p),
            KillAt::RightAfterUp => {}
            KillAt::AfterJournalAppend | KillAt::AfterSinkAppend => {
                let sink = matches!(self, KillAt::AfterSinkAppend).then_some(sink_path);
                for _ in 0..4 {
                    if wait_append(p, sink) {
                        break;
                    }
                }
            }
            KillAt::AfterRecordsWritten => {
                wait_phase(p, "exported", Duration::from_secs(3));
            }
        }
    }
}

/// A datagram of `payload` bytes every 2 ms from `src` in namespace `ns` to `dst`, numbered,
/// until `stop` (at most 20,000); the thread returns how many it sent.
fn start_sender(
    ns: &str,
    (src, dst): (SocketAddr, SocketAddr),
    payload: usize,
    stop: &Arc<AtomicBool>,
) -> JoinHandle<u64> {
    let tx = udp_socket(ns, src, dst);
    let stop = stop.clone();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut seq: u32 = 0;
        while !stop.load(Ordering::Relaxed) && seq < 20_000 {
            tx.send(&datagram(seq, payload))
                .unwrap_or_else(|e| panic!("send datagram {seq}: {e}"));
            seq += 1;
            let next = start + Duration::from_millis(2) * seq;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        u64::from(seq)
    })
}

/// What the exporter wrote after the kills counts each of the `sent` datagrams of `payload`
/// bytes `src` -> `dst` exactly once: at both ends of the flow, in `flows tail` and in the
/// file, every record and window once, and stats agreeing.
fn assert_exactly_once(
    lab: &Lab,
    e: &Exported,
    (src, dst): (SocketAddr, SocketAddr),
    (sent, payload): (u64, u64),
) {
    // Exact counts, both ends of the flow, in `flows tail` and in the file.
    for f in both_ends(lab, src, dst) {
        assert_exact(&e.tail, &f, sent, payload, "flows tail");
        assert_exact(&e.sink, &f, sent, payload, "--flow-log file");
    }
    // Exactly once: every record once, every window once, in order.
    assert_each_window_once(lab, &e.journal);
    let journal_rows: Vec<Row> = e.journal.iter().map(row).collect();
    assert_eq!(
        e.tail, journal_rows,
        "flows tail should print the journal's records, no more, no fewer"
    );
    assert_eq!(
        e.sink_headers,
        vec![0],
        "the --flow-log file should have one header line, its first"
    );
    assert_eq!(
        e.sink.len(),
        journal_rows.len(),
        "the --flow-log file and the journal should hold the same records"
    );
    for (i, (s, j)) in e.sink.iter().zip(&journal_rows).enumerate() {
        assert_eq!(s, j, "record {i}: the file and the journal differ");
    }
    let fl = &e.stats.flow_logs;
    let windows: BTreeSet<u64> = e
        .journal
        .iter()
        .filter_map(|v| v["ecsnet-window"].as_u64())
        .collect();
    assert_eq!(
        (fl.windows_exported, fl.records_exported),
        (windows.len() as u64, e.journal.len() as u64),
        "stats windowsExported and recordsExported should count each window and record once"
    );
    assert_eq!(
        (fl.lost_packets, fl.skipdata_records),
        (0, 0),
        "nothing should be lost: {fl:?}"
    );
    assert!(
        !e.journal.iter().any(|v| v["log-status"] == "SKIPDATA"),
        "a SKIPDATA record with a flow table of room to spare"
    );
}

#[test]
fn sigkill_in_windows_and_exports_loses_and_duplicates_no_count() {
    const PAYLOAD: usize = 100;
    let lab = Lab::up("frk", 2, &["1:8080:80"]);
    let p = paths(&lab);
    let sink_path = lab_file(&lab, "flows.log");
    up_with_sink(&lab, &sink_path);
    let first_pid = agent::pid(&lab.name).expect("agent.pid after up");

    let (t1, t2) = (lab.status.tasks[0].address, lab.status.tasks[1].address);
    let (src, dst) = (addr(t1, 40001), addr(t2, 7001));
    let rx = Receiver::start(lab.task_ns(2), 7001, PAYLOAD);

    // The sender: a datagram every 2 ms until told to stop (after the last restart), so every
    // kill lands in the middle of traffic; it reports how many it sent.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let sender = start_sender(lab.task_ns(1), (src, dst), PAYLOAD, &stop);

    std::thread::sleep(Duration::from_millis(500));
    let plan = [
        (KillAt::AfterClose(Duration::from_millis(300)), 200),
        (KillAt::DuringExport, 400),
        (KillAt::RightAfterUp, 150),
        (KillAt::AfterJournalAppend, 300),
        (KillAt::AfterRecordsWritten, 250),
        (KillAt::AfterClose(Duration::from_millis(700)), 100),
        (KillAt::AfterJournalAppend, 200),
        (KillAt::AfterSinkAppend, 150),
        (KillAt::DuringExport, 100),
    ];
    let mut pid = first_pid;
    let mut kills = Vec::new();
    for (at, dead_ms) in plan {
        at.wait(&p, &sink_path);
        assert_eq!(
            agent::pid(&lab.name),
            Some(pid),
            "agent.pid should name the agent `up` started"
        );
        let killed = kill(&p, pid, &sink_path);
        kills.push((at, killed));
        // The datapath counts on with no agent: the open window grows.
        std::thread::sleep(Duration::from_millis(dead_ms));
        pid = restart(&lab, &sink_path, pid);
    }
    // Traffic goes on a while under the last agent, then stops.
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender thread");
    let got = rx.finish();
    eprintln!("sent {sent} datagrams; kills (when, where the export stood): {kills:#?}");
    assert!(
        kills
            .iter()
            .any(|(_, k)| k.phase.as_deref() == Some("exporting")),
        "no kill landed while an export was under way: {kills:?}"
    );
    assert!(
        kills.iter().any(|(_, k)| k.journal_past_checkpoint),
        "no kill landed between writing a window's records and marking them written, so \
         cutting back a half-written export was never exercised: {kills:?}"
    );
    assert!(
        kills.iter().any(|(_, k)| k.sink_past_checkpoint),
        "no kill landed after the file sink got a window's records and before they were \
         marked written, so cutting the file back was never exercised: {kills:?}"
    );
    let udp_errors = ns_exec(lab.task_ns(2), &["cat", "/proc/net/snmp"]);
    assert_eq!(
        (got.datagrams, got.distinct.len() as u64, got.wrong_size),
        (sent, sent, 0),
        "task2 should have received each of the {sent} datagrams once, whole \
         (datagrams, distinct, wrong size): forwarding must not stop when the agent dies; \
         task2's /proc/net/snmp: {udp_errors}"
    );

    wait_exported(&lab);
    let e = exported(&lab, Some(&sink_path));

    assert_exactly_once(&lab, &e, (src, dst), (sent, PAYLOAD as u64));
}

/// Datagrams of the full-table burst: one from each of `BURST_FLOWS` source ports, of
/// `BURST_PAYLOAD` bytes.
const BURST_FLOWS: u16 = 40;
const BURST_PAYLOAD: usize = 64;

/// Task number `task` (0-based) of the full-table burst (seen as `direction`), in the records
/// of windows from the burst on (`recent`): its OK records of the burst, one datagram each,
/// and the lost packets of its SKIPDATA records (all of the burst's windows, `first_window` to
/// `burst_last`) add up to the datagrams sent.
fn skipdata_closes_the_account(
    lab: &Lab,
    recent: &[&Value],
    (task, direction): (usize, &str),
    (first_window, burst_last): (u32, u32),
) {
    const FLOWS: u16 = BURST_FLOWS;
    let t2 = lab.status.tasks[1].address;
    let iface = &lab.status.tasks[task].interface;
    let mut ok_packets = 0;
    let mut ok_windows = BTreeSet::new();
    for v in recent {
        let r = row(v);
        if r[IFACE] == *iface && r[STATUS] == "OK" && r[DST] == t2.to_string() && r[DPORT] == "7002"
        {
            let sport: u16 = r[SPORT].parse().unwrap();
            assert!(
                (41000..41000 + FLOWS).contains(&sport) && r[DIRECTION] == direction,
                "unexpected record: {r:?}"
            );
            assert_eq!(
                (num(&r, PACKETS), num(&r, BYTES)),
                (1, UDP_OVERHEAD + BURST_PAYLOAD as u64),
                "each flow is one datagram: {r:?}"
            );
            ok_packets += 1;
            ok_windows.insert(v["ecsnet-window"].as_u64().unwrap());
        }
    }
    let skip: Vec<&&Value> = recent
        .iter()
        .filter(|v| v["interface-id"] == iface.as_str() && v["log-status"] == "SKIPDATA")
        .collect();
    assert!(
        !skip.is_empty(),
        "{} ({iface}) lost flows to a table of 4 but has no SKIPDATA record; its records: \
         {:?}",
        lab.status.tasks[task].name,
        recent
            .iter()
            .filter(|v| v["interface-id"] == iface.as_str())
            .map(|v| row(v))
            .collect::<Vec<_>>()
    );
    let mut lost = 0;
    for s in &skip {
        let l = s["ecsnet-lost-packets"].as_u64().unwrap_or(0);
        assert!(l > 0, "a SKIPDATA record without lost packets: {s}");
        lost += l;
    }
    assert_eq!(
        ok_packets + lost,
        u64::from(FLOWS),
        "{iface}: packets in OK records ({ok_packets}) plus lost packets in SKIPDATA \
         records ({lost}) should be the {FLOWS} sent"
    );
    for s in &skip {
        let w = s["ecsnet-window"].as_u64().unwrap();
        assert!(
            w <= u64::from(burst_last),
            "{iface}: a SKIPDATA record of window {w}, after the burst (windows \
             {first_window}..={burst_last}): {s}"
        );
    }
    eprintln!(
        "{iface}: {ok_packets} packet(s) in OK records (windows {ok_windows:?}), {lost} \
         lost in {} SKIPDATA record(s)",
        skip.len()
    );
}

#[test]
fn a_full_flow_table_gives_skipdata_records_that_close_the_account() {
    const PAYLOAD: usize = BURST_PAYLOAD;
    const FLOWS: u16 = BURST_FLOWS;
    let lab = Lab::up("frs", 2, &["1:8080:80"]);
    lab.ecsnet_up_with(&["--window", "1", "--flow-table-size", "4"]);
    assert_eq!(
        lab.stats().flow_logs.table_capacity,
        4,
        "--flow-table-size 4 should be the table's capacity"
    );
    let (t1, t2) = (lab.status.tasks[0].address, lab.status.tasks[1].address);
    let dst = addr(t2, 7002);
    let rx = Receiver::start(lab.task_ns(2), 7002, PAYLOAD);

    // 40 flows at once (one datagram from each of 40 source ports): two entries each, in a
    // table of four.
    let first_window = lab.stats().flow_logs.window;
    let ns1 = lab.task_ns(1).to_owned();
    let socks: Vec<UdpSocket> = (0..FLOWS)
        .map(|i| udp_socket(&ns1, addr(t1, 41000 + i), dst))
        .collect();
    for (i, s) in (0..).zip(&socks) {
        s.send(&datagram(i, PAYLOAD))
            .unwrap_or_else(|e| panic!("send from port {}: {e}", 41000 + i));
    }
    let burst_last = lab.stats().flow_logs.window;
    let got = rx.finish();
    assert_eq!(
        (got.datagrams, got.distinct.len()),
        (u64::from(FLOWS), usize::from(FLOWS)),
        "a full flow table must not stop forwarding: task2 should get all {FLOWS} datagrams"
    );

    wait_exported(&lab);
    let e = exported(&lab, None);
    let recent: Vec<&Value> = e
        .journal
        .iter()
        .filter(|v| v["ecsnet-window"].as_u64().unwrap_or(0) >= u64::from(first_window))
        .collect();
    for (task, direction) in [(0, "egress"), (1, "ingress")] {
        skipdata_closes_the_account(&lab, &recent, (task, direction), (first_window, burst_last));
    }
    // `flows tail` shows the SKIPDATA records too, with the log-status AWS uses.
    let tail_skip = e.tail.iter().filter(|r| r[STATUS] == "SKIPDATA").count();
    let journal_skip: Vec<&Value> = e
        .journal
        .iter()
        .filter(|v| v["log-status"] == "SKIPDATA")
        .collect();
    assert_eq!(
        tail_skip,
        journal_skip.len(),
        "flows tail should show every SKIPDATA record"
    );
    let fl = &e.stats.flow_logs;
    let journal_lost: u64 = journal_skip
        .iter()
        .map(|v| v["ecsnet-lost-packets"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        fl.skipdata_records > 0 && fl.lost_packets > 0,
        "stats should count the SKIPDATA records and lost packets: {fl:?}"
    );
    assert_eq!(
        (fl.skipdata_records, fl.lost_packets),
        (journal_skip.len() as u64, journal_lost),
        "stats skipdataRecords and lostPackets should match the journal's SKIPDATA records"
    );
}

#[test]
fn flow_logs_off_writes_no_record_and_still_forwards() {
    let lab = Lab::up("fro", 2, &["1:8080:80", "2:8053:53/udp"]);
    let sink_path = lab_file(&lab, "flows-off.log");
    let sink_s = sink_path.display().to_string();
    lab.ecsnet_up_with(&["--flow-logs", "off", "--window", "1", "--flow-log", &sink_s]);
    let before = lab.stats();
    let t2_dns = format!("{}:53", lab.status.tasks[1].address);
    let r = lab.probe(lab.task_ns(1), "udp", &t2_dns, 20, 100);
    assert_eq!(
        r["echoed"], 20,
        "task1 -> task2 UDP with flow logs off: {r}"
    );
    let r = lab.probe(lab.client(), "tcp", "10.10.0.1:8080", 5, 100);
    assert_eq!(
        r["echoed"], 5,
        "client -> published port with flow logs off: {r}"
    );
    // Three windows' worth of time: with flow logs on, three windows would have been exported.
    std::thread::sleep(Duration::from_secs(3));

    let after = lab.stats();
    for (i, t) in after.tasks.iter().enumerate() {
        assert!(
            t.egress.packets >= before.tasks[i].egress.packets + 5,
            "the datapath should have forwarded {}'s traffic: {:?} -> {:?}",
            t.name,
            before.tasks[i],
            t
        );
    }
    let fl = &after.flow_logs;
    assert!(
        !fl.enabled,
        "stats flowLogs.enabled with --flow-logs off: {fl:?}"
    );
    assert_eq!(
        (
            fl.table_entries,
            fl.windows_exported,
            fl.records_exported,
            fl.lost_packets
        ),
        (0, 0, 0, 0),
        "with flow logs off nothing is counted or exported (tableEntries, windowsExported, \
         recordsExported, lostPackets): {fl:?}"
    );
    let p = paths(&lab);
    assert_eq!(
        tail(&lab),
        Vec::<Row>::new(),
        "flows tail should print no record"
    );
    assert!(
        journal(&p).is_empty(),
        "the journal should be empty with flow logs off"
    );
    assert!(
        !sink_path.exists() || sink(&sink_path).1.is_empty(),
        "the --flow-log file should hold no record with flow logs off"
    );
}

#[test]
fn after_down_and_up_a_flow_is_counted_from_zero() {
    let lab = Lab::up("frd", 2, &["1:8080:80"]);
    let p = paths(&lab);
    let sink_path = lab_file(&lab, "flows-du.log");
    let (t1, t2) = (lab.status.tasks[0].address, lab.status.tasks[1].address);
    let (src, dst) = (addr(t1, 40004), addr(t2, 7004));
    let ns1 = lab.task_ns(1).to_owned();

    // First life: 50 datagrams of 200 bytes, exported and exact; then 30 more, and `down`
    // before their window is exported.
    up_with_sink(&lab, &sink_path);
    let rx = Receiver::start(lab.task_ns(2), 7004, 200);
    let first = send_burst(&ns1, src, dst, 50, 200);
    wait_exported(&lab);
    let e = exported(&lab, Some(&sink_path));
    for f in both_ends(&lab, src, dst) {
        assert_exact(&e.tail, &f, first, 200, "first life, flows tail");
        assert_exact(&e.sink, &f, first, 200, "first life, --flow-log file");
    }
    let unexported = send_burst(&ns1, src, dst, 30, 200);
    instance_ok(&lab, &["down"]);
    assert!(!p.flow_journal().exists(), "down should remove the journal");
    let (_, sink_rows_before) = sink(&sink_path);
    // A clean stop exports the window that was open: nothing sent before `down` is lost.
    for f in both_ends(&lab, src, dst) {
        let (p, b, _) = sum(&sink_rows_before, &f, "first life");
        assert_eq!(
            (p, b),
            (first + unexported, (first + unexported) * (28 + 200)),
            "the --flow-log file should hold all {} datagrams sent before `down` on {}, \
             {unexported} of them in the window open at `down`",
            first + unexported,
            f.iface
        );
    }
    let got = rx.finish();
    assert_eq!(
        got.datagrams,
        first + unexported,
        "task2 should have received every datagram of the first life"
    );

    // Second life: the same 5-tuple, 70 datagrams of 300 bytes.
    up_with_sink(&lab, &sink_path);
    let rx = Receiver::start(lab.task_ns(2), 7004, 300);
    let second = send_burst(&ns1, src, dst, 70, 300);
    let got = rx.finish();
    assert_eq!(
        got.datagrams, second,
        "task2 should get every datagram after up"
    );
    wait_exported(&lab);
    let e = exported(&lab, Some(&sink_path));
    for f in both_ends(&lab, src, dst) {
        assert_exact(&e.tail, &f, second, 300, "second life, flows tail");
    }
    assert_each_window_once(&lab, &e.journal);
    let fl = &e.stats.flow_logs;
    assert_eq!(
        fl.records_exported,
        e.journal.len() as u64,
        "stats recordsExported should count this life's records: {fl:?}"
    );
    // The file is a log: the first life's lines stay; what follows them is the second life.
    assert!(
        e.sink.len() >= sink_rows_before.len()
            && e.sink[..sink_rows_before.len()] == sink_rows_before[..],
        "up should append to the --flow-log file, not rewrite what it held"
    );
    let new_rows = &e.sink[sink_rows_before.len()..];
    for f in both_ends(&lab, src, dst) {
        assert_exact(new_rows, &f, second, 300, "second life, --flow-log file");
    }
}
