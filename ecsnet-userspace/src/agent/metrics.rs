//! Prometheus metrics: the instance's counters (`stats::stats`) in the text exposition format,
//! served by the agent on `--metrics` (loopback of the instance's namespace by default; `off`:
//! not served).

use std::{fmt::Write as _, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::{
    agent::conns::{self, Limits, Slot, Slots},
    agent::stats::{ListenerStats, Stats},
    store::paths::InstancePaths,
};

/// Longest request head read, bytes; the request itself is ignored beyond its first line.
const MAX_HEAD: usize = 8192;

/// A label value with `\`, `"` and newlines escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
    instance: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let mut l = format!("instance=\"{}\"", esc(&self.instance));
        for (k, v) in labels {
            let _ = write!(l, ",{k}=\"{}\"", esc(v));
        }
        let _ = writeln!(self.text, "{name}{{{l}}} {value}");
    }
}

/// The exposition text of `s`.
pub fn render(s: &Stats) -> String {
    let mut o = Out {
        text: String::new(),
        instance: s.instance.clone(),
    };
    for (name, help, pick) in [
        (
            "ecsnet_task_packets_total",
            "IPv4 packets of a task; egress is what the task sent, ingress what it received.",
            (|c: crate::kernel::maps::Count| c.packets) as fn(crate::kernel::maps::Count) -> u64,
        ),
        (
            "ecsnet_task_bytes_total",
            "IPv4 bytes (IP headers included) of a task, by direction.",
            |c: crate::kernel::maps::Count| c.bytes,
        ),
    ] {
        o.family(name, "counter", help);
        for t in &s.tasks {
            for (dir, c) in [("egress", t.egress), ("ingress", t.ingress)] {
                let labels = [
                    ("task", t.name.as_str()),
                    ("interface", t.interface.as_str()),
                    ("direction", dir),
                ];
                o.sample(name, &labels, pick(c));
            }
        }
    }
    o.family(
        "ecsnet_task_drops_total",
        "counter",
        "Packets of a task the datapath dropped, by reason.",
    );
    for t in &s.tasks {
        for (reason, n) in &t.drops {
            let labels = [
                ("task", t.name.as_str()),
                ("interface", t.interface.as_str()),
                ("reason", reason.as_str()),
            ];
            o.sample("ecsnet_task_drops_total", &labels, *n);
        }
    }
    o.family(
        "ecsnet_drops_total",
        "counter",
        "Packets the datapath dropped on any interface, by reason.",
    );
    for (reason, n) in &s.drops {
        o.sample("ecsnet_drops_total", &[("reason", reason)], *n);
    }
    o.family(
        "ecsnet_uplink_packets_total",
        "counter",
        "IPv4 packets through the uplink at tc, by direction.",
    );
    let u = &s.uplink;
    for (dir, c) in [("ingress", u.ingress), ("egress", u.egress)] {
        o.sample(
            "ecsnet_uplink_packets_total",
            &[("interface", &u.interface), ("direction", dir)],
            c.packets,
        );
    }
    let c = &s.conntrack;
    o.family(
        "ecsnet_conntrack_entries",
        "gauge",
        "Entries in the connection table (two per flow).",
    );
    o.sample("ecsnet_conntrack_entries", &[], c.entries);
    o.family(
        "ecsnet_conntrack_capacity",
        "gauge",
        "Capacity of the connection table, entries.",
    );
    o.sample("ecsnet_conntrack_capacity", &[], c.capacity);
    o.family(
        "ecsnet_conntrack_unanswered_entries",
        "gauge",
        "Entries in the table of flows not answered yet (evicted oldest first when full).",
    );
    o.sample(
        "ecsnet_conntrack_unanswered_entries",
        &[],
        c.unanswered_entries,
    );
    o.family(
        "ecsnet_conntrack_unanswered_capacity",
        "gauge",
        "Capacity of the table of flows not answered yet, entries.",
    );
    o.sample(
        "ecsnet_conntrack_unanswered_capacity",
        &[],
        c.unanswered_capacity,
    );
    o.family(
        "ecsnet_conntrack_flows_created_total",
        "counter",
        "Flows the datapath created.",
    );
    o.sample("ecsnet_conntrack_flows_created_total", &[], c.created);
    o.family(
        "ecsnet_conntrack_flows_assured_total",
        "counter",
        "Flows answered and moved to the table that never evicts.",
    );
    o.sample("ecsnet_conntrack_flows_assured_total", &[], c.assured);
    o.family(
        "ecsnet_conntrack_assured_table_full_total",
        "counter",
        "Answered flows that found the assured table full and stayed evictable.",
    );
    o.sample(
        "ecsnet_conntrack_assured_table_full_total",
        &[],
        c.assured_table_full,
    );
    o.family("ecsnet_conntrack_flows", "gauge", "Tracked flows by kind.");
    for (kind, n) in &c.flows {
        o.sample("ecsnet_conntrack_flows", &[("kind", kind)], *n);
    }
    o.family(
        "ecsnet_nat_mappings",
        "gauge",
        "Flows whose source the datapath rewrote (masquerade and self-hairpin).",
    );
    o.sample("ecsnet_nat_mappings", &[], c.nat_mappings);
    let f = &s.flow_logs;
    o.family(
        "ecsnet_flow_table_entries",
        "gauge",
        "Entries in the flow-log table (open window and the one being exported).",
    );
    o.sample("ecsnet_flow_table_entries", &[], f.table_entries);
    o.family(
        "ecsnet_flow_table_capacity",
        "gauge",
        "Capacity of the flow-log table, entries.",
    );
    o.sample("ecsnet_flow_table_capacity", &[], f.table_capacity);
    for (name, help, v) in [
        (
            "ecsnet_flow_log_windows_total",
            "Capture windows closed and exported.",
            f.windows_exported,
        ),
        (
            "ecsnet_flow_log_records_total",
            "Flow-log records exported (OK, NODATA and SKIPDATA).",
            f.records_exported,
        ),
        (
            "ecsnet_flow_log_skipdata_records_total",
            "SKIPDATA records: windows of an interface in which the flow table was full.",
            f.skipdata_records,
        ),
        (
            "ecsnet_flow_log_lost_packets_total",
            "Packets that found the flow table full and are in no OK record.",
            f.lost_packets,
        ),
        (
            "ecsnet_monitor_events_suppressed_total",
            "Monitor events the datapath's rate limit or a full ring buffer suppressed.",
            f.events_suppressed,
        ),
    ] {
        o.family(name, "counter", help);
        o.sample(name, &[], v);
    }
    let a = &s.agent;
    let listeners: [(&str, &ListenerStats); 2] = [("metrics", &a.metrics), ("control", &a.control)];
    o.family(
        "ecsnet_agent_accept_errors_total",
        "counter",
        "Accepts of the agent's listeners that failed (each pauses the listener).",
    );
    for (l, c) in listeners {
        o.sample(
            "ecsnet_agent_accept_errors_total",
            &[("listener", l)],
            c.accept_errors,
        );
    }
    o.family(
        "ecsnet_agent_connections_closed_total",
        "counter",
        "Connections the agent's listeners closed to stay bounded: over_cap (every slot busy), \
         evicted (waiting for a request, for a newer one), timed_out (idle).",
    );
    for (l, c) in listeners {
        for (reason, v) in [
            ("over_cap", c.over_cap),
            ("evicted", c.evicted),
            ("timed_out", c.timed_out),
        ] {
            o.sample(
                "ecsnet_agent_connections_closed_total",
                &[("listener", l), ("reason", reason)],
                v,
            );
        }
    }
    o.text
}

/// Bounds of the metrics listener: Prometheus needs one connection; any local user can open
/// them (`conns`).
pub const LIMITS: Limits = Limits {
    name: "metrics",
    cap: 64,
    idle: Duration::from_secs(10),
    busy_reply:
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
};

/// Serves `GET /metrics` on `listener` until the agent stops, within `slots`.
pub async fn serve(listener: TcpListener, paths: InstancePaths, slots: Arc<Slots>) {
    conns::serve(listener, slots, move |stream, slot| {
        let paths = paths.clone();
        async move {
            if let Err(e) = answer(stream, slot, &paths).await {
                log::debug!("metrics connection: {e}");
            }
        }
    })
    .await
}

/// Reads a request head: up to the blank line, or `MAX_HEAD` bytes, or the end.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

async fn answer(
    mut stream: TcpStream,
    mut slot: Slot,
    paths: &InstancePaths,
) -> std::io::Result<()> {
    let Some(head) = slot.wait_for(read_head(&mut stream)).await else {
        return Ok(());
    };
    let head = head?;
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".to_owned(),
        )
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
    } else {
        let p = paths.clone();
        match tokio::task::spawn_blocking(move || crate::agent::stats::stats(&p)).await {
            Ok(Ok(s)) => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(&s),
            ),
            Ok(Err(e)) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
            Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
        }
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let sent = slot
        .busy(async {
            stream.write_all(reply.as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    sent.unwrap_or(Ok(()))
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
        };
        let text = render(&s);
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
}
