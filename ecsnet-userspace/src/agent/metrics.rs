//! Prometheus metrics: the instance's counters (`stats::stats`) in the text exposition format,
//! served over HTTP/1 (`hyper`) by the agent on `--metrics` (loopback of the instance's namespace
//! by default; `off`: not served).
//!
//! The text is rendered here rather than by `prometheus-client`: every value is read from the
//! maps at scrape time, so a registry of live metric objects holds nothing, and its encoder
//! writes the `OpenMetrics` text (`# TYPE` without `_total`, a `# EOF` line), not the names and
//! bytes ecsnet has always served.

use std::{
    convert::Infallible,
    fmt::Write as _,
    future::Future,
    pin::{Pin, pin},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{CONNECTION, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    agent::conns::{self, Limits, Slot, Slots},
    agent::stats::{self, AgentStats, ConntrackStats, ListenerStats, Stats},
    kernel::maps::Count,
    store::paths::InstancePaths,
};

/// Longest request head buffered, bytes; a longer one is refused (431).
const MAX_HEAD: usize = 8192;

/// Bounds of the metrics listener: Prometheus needs one connection; any local user can open
/// them (`conns`). The busy reply is written without waiting, past hyper.
pub const LIMITS: Limits = Limits {
    name: "metrics",
    cap: 64,
    idle: Duration::from_secs(10),
    busy_reply:
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
};

/// The exposition format's content type.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------------------------
// The exposition text.

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A sample's labels besides `instance`, and its value.
type Sample<'a> = (Vec<(&'static str, &'a str)>, u64);

/// One metric family and its samples.
struct Family<'a> {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Vec<Sample<'a>>,
}

impl<'a> Family<'a> {
    fn new(name: &'static str, kind: Kind, help: &'static str, samples: Vec<Sample<'a>>) -> Self {
        Self {
            name,
            kind,
            help,
            samples,
        }
    }

    /// A family of one sample without labels.
    fn one((name, kind, help, value): (&'static str, Kind, &'static str, u64)) -> Self {
        Self::new(name, kind, help, vec![(vec![], value)])
    }

    fn write(&self, out: &mut String, instance: &str) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        for (labels, value) in &self.samples {
            let _ = write!(out, "{}{{instance=\"{}\"", self.name, esc(instance));
            for (k, v) in labels {
                let _ = write!(out, ",{k}=\"{}\"", esc(v));
            }
            let _ = writeln!(out, "}} {value}");
        }
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text of `s`.
pub fn render(s: &Stats) -> String {
    let mut text = String::new();
    for family in families(s) {
        family.write(&mut text, &s.instance);
    }
    text
}

fn families(s: &Stats) -> Vec<Family<'_>> {
    use Kind::{Counter, Gauge};
    let (c, u) = (&s.conntrack, &s.uplink);
    let mut out = vec![
        task_counts(
            s,
            "ecsnet_task_packets_total",
            "IPv4 packets of a task; egress is what the task sent, ingress what it received.",
            |c| c.packets,
        ),
        task_counts(
            s,
            "ecsnet_task_bytes_total",
            "IPv4 bytes (IP headers included) of a task, by direction.",
            |c| c.bytes,
        ),
        Family::new(
            "ecsnet_task_drops_total",
            Counter,
            "Packets of a task the datapath dropped, by reason.",
            s.tasks
                .iter()
                .flat_map(|t| {
                    t.drops.iter().map(|(reason, n)| {
                        let labels = vec![
                            ("task", t.name.as_str()),
                            ("interface", t.interface.as_str()),
                            ("reason", reason.as_str()),
                        ];
                        (labels, *n)
                    })
                })
                .collect(),
        ),
        Family::new(
            "ecsnet_drops_total",
            Counter,
            "Packets the datapath dropped on any interface, by reason.",
            by_label("reason", &s.drops),
        ),
        Family::new(
            "ecsnet_uplink_packets_total",
            Counter,
            "IPv4 packets through the uplink at tc, by direction.",
            [("ingress", u.ingress), ("egress", u.egress)]
                .into_iter()
                .map(|(dir, n)| {
                    let labels = vec![("interface", u.interface.as_str()), ("direction", dir)];
                    (labels, n.packets)
                })
                .collect(),
        ),
    ];
    out.extend(conntrack_gauges(c));
    out.push(Family::new(
        "ecsnet_conntrack_flows",
        Gauge,
        "Tracked flows by kind.",
        by_label("kind", &c.flows),
    ));
    out.extend(conntrack_tables(c));
    out.extend(flow_log_counts(s));
    out.extend(agent_families(&s.agent));
    if let Some(e) = &s.engine {
        out.extend(engine_families(e));
    }
    out
}

/// How following the container engine stands (`up --docker`).
fn engine_families(e: &crate::store::files::EngineStatus) -> [Family<'static>; 9] {
    use Kind::{Counter, Gauge};
    [
        (
            "ecsnet_engine_connected",
            Gauge,
            "1 while the agent follows the container engine's events, 0 while it cannot reach it.",
            u64::from(e.connected),
        ),
        (
            "ecsnet_engine_tasks",
            Gauge,
            "Tasks from the container engine, live.",
            e.tasks as u64,
        ),
        (
            "ecsnet_engine_tasks_closed",
            Gauge,
            "Tasks that get no traffic because their label names a security group nobody defined.",
            e.closed as u64,
        ),
        (
            "ecsnet_engine_containers_left_out",
            Gauge,
            "Containers that are no task: the state file gives them, or they did not fit.",
            e.left_out as u64,
        ),
        (
            "ecsnet_engine_events_total",
            Counter,
            "Container events received from the engine.",
            e.events,
        ),
        (
            "ecsnet_engine_relists_total",
            Counter,
            "Full lists of the engine's containers (at start and after each reconnect).",
            e.relists,
        ),
        (
            "ecsnet_engine_held_ports_total",
            Counter,
            "New ports of the bridge held at the default policy until their container was known.",
            e.held,
        ),
        (
            "ecsnet_engine_held_ports",
            Gauge,
            "Ports of the bridge held at the default policy now: their container is not known yet.",
            e.held_now as u64,
        ),
        (
            "ecsnet_engine_apply_errors_total",
            Counter,
            "Applies of the engine's view that failed.",
            e.apply_errors,
        ),
    ]
    .map(Family::one)
}

/// The connection tables' fill and counters.
fn conntrack_gauges(c: &ConntrackStats) -> [Family<'static>; 7] {
    use Kind::{Counter, Gauge};
    [
        (
            "ecsnet_conntrack_entries",
            Gauge,
            "Entries in the connection table (two per flow).",
            c.entries,
        ),
        (
            "ecsnet_conntrack_capacity",
            Gauge,
            "Capacity of the connection table, entries.",
            c.capacity,
        ),
        (
            "ecsnet_conntrack_unanswered_entries",
            Gauge,
            "Entries in the table of flows not answered yet (evicted oldest first when full).",
            c.unanswered_entries,
        ),
        (
            "ecsnet_conntrack_unanswered_capacity",
            Gauge,
            "Capacity of the table of flows not answered yet, entries.",
            c.unanswered_capacity,
        ),
        (
            "ecsnet_conntrack_flows_created_total",
            Counter,
            "Flows the datapath created.",
            c.created,
        ),
        (
            "ecsnet_conntrack_flows_assured_total",
            Counter,
            "Flows answered and moved to the table that never evicts.",
            c.assured,
        ),
        (
            "ecsnet_conntrack_assured_table_full_total",
            Counter,
            "Answered flows that found the assured table full and stayed evictable.",
            c.assured_table_full,
        ),
    ]
    .map(Family::one)
}

/// Each connection table's entries and capacity, by its map's name (`CT`, `CT_NEW` and the
/// IPv6 `CT6`, `CT6_NEW`), and the IPv6 flows by kind (IPv4's are `ecsnet_conntrack_flows`).
fn conntrack_tables(c: &ConntrackStats) -> [Family<'_>; 3] {
    use ecsnet_common::maps::{MAP_CT, MAP_CT_NEW, MAP_CT6, MAP_CT6_NEW};
    let v6 = &c.ipv6;
    let tables = [
        (
            MAP_CT,
            c.entries.saturating_sub(c.unanswered_entries),
            c.capacity,
        ),
        (MAP_CT_NEW, c.unanswered_entries, c.unanswered_capacity),
        (
            MAP_CT6,
            v6.entries.saturating_sub(v6.unanswered_entries),
            v6.capacity,
        ),
        (MAP_CT6_NEW, v6.unanswered_entries, v6.unanswered_capacity),
    ];
    let by_table = |pick: fn(&(&'static str, u64, u64)) -> u64| {
        tables
            .iter()
            .map(|t| (vec![("table", t.0)], pick(t)))
            .collect()
    };
    [
        Family::new(
            "ecsnet_conntrack_table_entries",
            Kind::Gauge,
            "Entries in each connection table (two per flow).",
            by_table(|t| t.1),
        ),
        Family::new(
            "ecsnet_conntrack_table_capacity",
            Kind::Gauge,
            "Capacity of each connection table, entries.",
            by_table(|t| t.2),
        ),
        Family::new(
            "ecsnet_conntrack_ipv6_flows",
            Kind::Gauge,
            "Tracked IPv6 flows by kind.",
            by_label("kind", &v6.flows),
        ),
    ]
}

/// NAT mappings, the flow-log table and what the exporter wrote and lost.
fn flow_log_counts(s: &Stats) -> [Family<'static>; 8] {
    use Kind::{Counter, Gauge};
    let (c, f) = (&s.conntrack, &s.flow_logs);
    [
        (
            "ecsnet_nat_mappings",
            Gauge,
            "Flows whose source the datapath rewrote (masquerade and self-hairpin).",
            c.nat_mappings,
        ),
        (
            "ecsnet_flow_table_entries",
            Gauge,
            "Entries in the flow-log table (open window and the one being exported).",
            f.table_entries,
        ),
        (
            "ecsnet_flow_table_capacity",
            Gauge,
            "Capacity of the flow-log table, entries.",
            f.table_capacity,
        ),
        (
            "ecsnet_flow_log_windows_total",
            Counter,
            "Capture windows closed and exported.",
            f.windows_exported,
        ),
        (
            "ecsnet_flow_log_records_total",
            Counter,
            "Flow-log records exported (OK, NODATA and SKIPDATA).",
            f.records_exported,
        ),
        (
            "ecsnet_flow_log_skipdata_records_total",
            Counter,
            "SKIPDATA records: windows of an interface in which the flow table was full.",
            f.skipdata_records,
        ),
        (
            "ecsnet_flow_log_lost_packets_total",
            Counter,
            "Packets that found the flow table full and are in no OK record.",
            f.lost_packets,
        ),
        (
            "ecsnet_monitor_events_suppressed_total",
            Counter,
            "Monitor events the datapath's rate limit or a full ring buffer suppressed.",
            f.events_suppressed,
        ),
    ]
    .map(Family::one)
}

/// A task counter by direction, `pick`ed from its counts.
fn task_counts<'a>(
    s: &'a Stats,
    name: &'static str,
    help: &'static str,
    pick: fn(Count) -> u64,
) -> Family<'a> {
    let samples = s
        .tasks
        .iter()
        .flat_map(|t| {
            [("egress", t.egress), ("ingress", t.ingress)].map(|(dir, c)| {
                let labels = vec![
                    ("task", t.name.as_str()),
                    ("interface", t.interface.as_str()),
                    ("direction", dir),
                ];
                (labels, pick(c))
            })
        })
        .collect();
    Family::new(name, Kind::Counter, help, samples)
}

/// One sample per entry of `values`, labelled `key`.
fn by_label<'a>(
    key: &'static str,
    values: &'a std::collections::BTreeMap<String, u64>,
) -> Vec<Sample<'a>> {
    values
        .iter()
        .map(|(v, n)| (vec![(key, v.as_str())], *n))
        .collect()
}

fn agent_families(a: &AgentStats) -> [Family<'static>; 2] {
    let listeners: [(&str, &ListenerStats); 2] = [("metrics", &a.metrics), ("control", &a.control)];
    [
        Family::new(
            "ecsnet_agent_accept_errors_total",
            Kind::Counter,
            "Accepts of the agent's listeners that failed (each pauses the listener).",
            listeners
                .iter()
                .map(|(l, c)| (vec![("listener", *l)], c.accept_errors))
                .collect(),
        ),
        Family::new(
            "ecsnet_agent_connections_closed_total",
            Kind::Counter,
            "Connections the agent's listeners closed to stay bounded: over_cap (every slot \
             busy), evicted (waiting for a request, for a newer one), timed_out (idle).",
            listeners
                .iter()
                .flat_map(|(l, c)| {
                    [
                        ("over_cap", c.over_cap),
                        ("evicted", c.evicted),
                        ("timed_out", c.timed_out),
                    ]
                    .map(|(reason, n)| (vec![("listener", *l), ("reason", reason)], n))
                })
                .collect(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Serving it.

/// Serves `GET /metrics` on `listener` until the agent stops, within `slots`.
pub async fn serve(listener: TcpListener, paths: InstancePaths, slots: Arc<Slots>) {
    conns::serve(listener, slots, move |stream, slot| {
        let paths = paths.clone();
        async move {
            if let Err(e) = answer(stream, slot, paths).await {
                log::debug!("metrics connection: {e}");
            }
        }
    })
    .await;
}

/// How far one connection's request has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Waiting,
    Asked,
    Answered,
}

/// One connection, one request: hyper reads it and writes the reply; the slot bounds the wait
/// for the request (idle timeout, eviction) and the writing of the reply (idle timeout), not
/// the reading of the maps in between, as on the control socket.
async fn answer(stream: TcpStream, mut slot: Slot, paths: InstancePaths) -> hyper::Result<()> {
    let (stage_tx, mut stage) = watch::channel(Stage::Waiting);
    let service = service_fn(move |req| {
        let (stage_tx, paths) = (stage_tx.clone(), paths.clone());
        async move {
            stage_tx.send_replace(Stage::Asked);
            let reply = respond(&req, paths).await;
            stage_tx.send_replace(Stage::Answered);
            Ok::<_, Infallible>(reply)
        }
    });
    let conn = http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = pin!(conn);
    match slot
        .wait_for(until(conn.as_mut(), &mut stage, Stage::Asked))
        .await
    {
        None => return Ok(()),
        Some(Some(done)) => return done,
        Some(None) => {}
    }
    if let Some(done) = until(conn.as_mut(), &mut stage, Stage::Answered).await {
        return done;
    }
    slot.busy(conn).await.unwrap_or(Ok(()))
}

/// Drives `conn` until the request reaches `stage` (None) or the connection ends (its result).
async fn until<F: Future>(
    conn: Pin<&mut F>,
    stage: &mut watch::Receiver<Stage>,
    want: Stage,
) -> Option<F::Output> {
    tokio::select! {
        done = conn => Some(done),
        _ = stage.wait_for(|s| *s >= want) => None,
    }
}

async fn respond(req: &Request<Incoming>, paths: InstancePaths) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain";
    let (status, ctype, body) = if req.method() != Method::GET {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET /metrics\n".to_owned(),
        )
    } else if !matches!(req.uri().path(), "/metrics" | "/") {
        (StatusCode::NOT_FOUND, TEXT, "try /metrics\n".to_owned())
    } else {
        match tokio::task::spawn_blocking(move || stats::stats(&paths)).await {
            Ok(Ok(s)) => (StatusCode::OK, EXPOSITION, render(&s)),
            Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{e}\n")),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
        }
    };
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, ctype)
        .header(CONNECTION, "close")
        .body(Full::new(Bytes::from(body)))
        .expect("status and headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::stats::{ConntrackStats, FlowLogStats, TaskStats, UplinkStats},
        kernel::maps::Count,
    };
    use std::collections::BTreeMap;

    #[test]
    fn exposition_has_every_family_and_escapes_labels() {
        let mut drops = BTreeMap::new();
        drops.insert("SG_INGRESS".to_owned(), 3);
        let s = Stats {
            instance: "i\"1".to_owned(),
            tasks: vec![TaskStats {
                name: "web".to_owned(),
                address: std::net::Ipv4Addr::new(172, 17, 0, 2),
                interface: "vethA".to_owned(),
                ifindex: 7,
                egress: Count {
                    packets: 5,
                    bytes: 500,
                },
                ingress: Count {
                    packets: 4,
                    bytes: 400,
                },
                other: Count::default(),
                drops: drops.clone(),
                nat_ports_max: 0,
                nat_ports_max_ipv6: 0,
            }],
            uplink: UplinkStats {
                interface: "eth0".to_owned(),
                ifindex: 2,
                ingress: Count::default(),
                egress: Count::default(),
                xdp: Count::default(),
                other: Count::default(),
                drops: BTreeMap::new(),
            },
            drops,
            conntrack: ConntrackStats::default(),
            flow_logs: FlowLogStats {
                records_exported: 9,
                lost_packets: 2,
                ..Default::default()
            },
            agent: crate::agent::stats::AgentStats {
                control: ListenerStats {
                    evicted: 21,
                    ..Default::default()
                },
                ..Default::default()
            },
            engine: Some(crate::store::files::EngineStatus {
                connected: true,
                closed: 1,
                held: 4,
                ..Default::default()
            }),
        };
        let text = render(&s);
        for line in [
            "ecsnet_engine_connected{instance=\"i\\\"1\"} 1\n",
            "ecsnet_engine_tasks_closed{instance=\"i\\\"1\"} 1\n",
            "ecsnet_engine_held_ports_total{instance=\"i\\\"1\"} 4\n",
        ] {
            assert!(text.contains(line), "{line} missing");
        }
        assert!(text.contains(
            "ecsnet_task_packets_total{instance=\"i\\\"1\",task=\"web\",interface=\"vethA\",direction=\"egress\"} 5\n"
        ));
        assert!(text.contains(
            "ecsnet_task_drops_total{instance=\"i\\\"1\",task=\"web\",interface=\"vethA\",reason=\"SG_INGRESS\"} 3\n"
        ));
        assert!(text.contains("ecsnet_flow_log_records_total{instance=\"i\\\"1\"} 9\n"));
        assert!(text.contains("ecsnet_flow_log_lost_packets_total{instance=\"i\\\"1\"} 2\n"));
        assert!(text.contains(
            "ecsnet_agent_connections_closed_total{instance=\"i\\\"1\",listener=\"control\",reason=\"evicted\"} 21\n"
        ));
        assert!(text.contains(
            "ecsnet_agent_accept_errors_total{instance=\"i\\\"1\",listener=\"metrics\"} 0\n"
        ));
        for family in [
            "ecsnet_conntrack_entries",
            "ecsnet_conntrack_capacity",
            "ecsnet_nat_mappings",
            "ecsnet_flow_table_entries",
            "ecsnet_flow_table_capacity",
            "ecsnet_monitor_events_suppressed_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing"
            );
        }
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("a value");
            value.parse::<u64>().expect("an integer value");
        }
    }

    #[test]
    fn each_connection_table_has_its_own_labelled_line_and_the_old_names_stay() {
        let c = ConntrackStats {
            entries: 6,
            unanswered_entries: 2,
            capacity: 100,
            unanswered_capacity: 50,
            ipv6: crate::agent::stats::TableFill {
                entries: 4,
                unanswered_entries: 4,
                capacity: 100,
                unanswered_capacity: 50,
                flows: BTreeMap::from([("eastWest".to_owned(), 2)]),
                nat_mappings: 0,
            },
            ..Default::default()
        };
        let mut text = String::new();
        for family in conntrack_gauges(&c).iter().chain(&conntrack_tables(&c)) {
            family.write(&mut text, "i");
        }
        for line in [
            "ecsnet_conntrack_entries{instance=\"i\"} 6\n",
            "ecsnet_conntrack_table_entries{instance=\"i\",table=\"CT\"} 4\n",
            "ecsnet_conntrack_table_entries{instance=\"i\",table=\"CT_NEW\"} 2\n",
            "ecsnet_conntrack_table_entries{instance=\"i\",table=\"CT6\"} 0\n",
            "ecsnet_conntrack_table_entries{instance=\"i\",table=\"CT6_NEW\"} 4\n",
            "ecsnet_conntrack_table_capacity{instance=\"i\",table=\"CT6\"} 100\n",
            "ecsnet_conntrack_table_capacity{instance=\"i\",table=\"CT6_NEW\"} 50\n",
            "ecsnet_conntrack_ipv6_flows{instance=\"i\",kind=\"eastWest\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} missing");
        }
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// `request` to a metrics listener of an instance that is not up: the whole response.
    async fn ask(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    }

    #[test]
    fn requests_get_a_status_line_and_the_connection_closes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let paths = InstancePaths::new("ecsnet-unit-test-never-up");
            tokio::spawn(serve(listener, paths, Slots::new(LIMITS)));
            let nope = ask(addr, b"GET /nope HTTP/1.0\r\n\r\n").await;
            assert!(nope.starts_with("HTTP/1.0 404 Not Found\r\n"), "{nope}");
            assert!(nope.ends_with("\r\n\r\ntry /metrics\n"), "{nope}");
            let post = ask(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
            assert!(
                post.to_ascii_lowercase().contains("connection: close"),
                "{post}"
            );
            let down = ask(addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
            assert!(down.starts_with("HTTP/1.1 503 "), "not up: {down}");
            assert!(down.contains("is not up"), "{down}");
        });
    }
}
