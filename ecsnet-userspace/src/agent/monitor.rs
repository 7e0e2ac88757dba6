//! `ecsnet monitor`: the datapath's drop and policy-verdict events. The agent drains the
//! `EVENTS` ring buffer (so it never fills while nobody watches) and fans each event out, as a
//! JSON line, to every `monitor` connected to its socket. With the event rate 0 there are none.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use ecsnet_common::{
    DropReason,
    flow::{EVENT_ALLOW, EVENT_DROP, Event, FLOW_EGRESS},
    maps::{HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP, ROLE_TASK},
};
use serde::{Deserialize, Serialize};

use crate::{
    kernel::maps,
    store::{files, paths::InstancePaths},
};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(
        "no agent answers on {path}: is instance {instance:?} up? (`ecsnet --instance {instance} up`)"
    )]
    NoAgent { instance: String, path: String },
    #[error("monitor connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent refused the monitor: {0}")]
    Refused(String),
}

/// One event as `monitor --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    /// Unix time, seconds with milliseconds.
    pub time: f64,
    /// `drop` or `allow` (a security group let a new flow through).
    pub kind: String,
    /// The drop reason (`SG_INGRESS`, ...); None for `allow`.
    pub reason: Option<String>,
    /// `tc-ingress`, `tc-egress` or `xdp`.
    pub hook: String,
    pub ifindex: u32,
    pub interface: Option<String>,
    pub task: Option<String>,
    /// For policy events: whose rules decided, `egress` (the sender's) or `ingress`.
    pub direction: Option<String>,
    pub proto: u8,
    pub src: String,
    pub dst: String,
    /// Events the datapath suppressed on this CPU just before this one (rate limit).
    pub suppressed: u64,
}

/// ifindex -> (task, interface) for event lines.
#[derive(Debug, Default)]
pub struct Names {
    by_ifindex: HashMap<u32, (Option<String>, Option<String>)>,
    read_at: Option<Instant>,
}

impl Names {
    /// Re-reads the names at most every two seconds.
    pub fn refresh(&mut self, paths: &InstancePaths) {
        if self
            .read_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.read_at = Some(Instant::now());
        let applied = files::read_applied(paths)
            .ok()
            .flatten()
            .unwrap_or_default();
        let meta = files::read_meta(paths).ok().flatten();
        let mut by_ifindex = HashMap::new();
        if let Some(m) = &meta {
            by_ifindex.insert(m.uplink_index, (None, Some(m.uplink.clone())));
        }
        for (ifindex, info) in maps::read_ifaces(paths).unwrap_or_default() {
            if info.role != ROLE_TASK {
                continue;
            }
            let ip = Ipv4Addr::from(u32::from_be(info.ipv4));
            if let Some(t) = applied.tasks.iter().find(|t| t.ipv4_address == ip) {
                by_ifindex.insert(ifindex, (Some(t.name.clone()), t.interface.clone()));
            }
        }
        self.by_ifindex = by_ifindex;
    }
}

fn endpoint(addr: u32, port: u16, proto: u8) -> String {
    let a = Ipv4Addr::from(u32::from_be(addr));
    if proto == 6 || proto == 17 {
        format!("{a}:{}", u16::from_be(port))
    } else {
        a.to_string()
    }
}

/// The line of event `e`; `wall_offset_ns` turns its CLOCK_MONOTONIC time into Unix time.
pub fn line(e: &Event, names: &Names, wall_offset_ns: i128) -> EventLine {
    let (task, interface) = names
        .by_ifindex
        .get(&e.ifindex)
        .cloned()
        .unwrap_or((None, None));
    let kind = match e.kind {
        EVENT_DROP => "drop",
        EVENT_ALLOW => "allow",
        _ => "unknown",
    };
    EventLine {
        time: ((e.ts_ns as i128 + wall_offset_ns) / 1_000_000) as f64 / 1000.0,
        kind: kind.to_owned(),
        reason: (e.kind == EVENT_DROP).then(|| {
            DropReason::from_u8(e.reason)
                .map(|r| r.as_str().to_owned())
                .unwrap_or_else(|| format!("UNKNOWN_{}", e.reason))
        }),
        hook: match e.hook {
            HOOK_TC_INGRESS => "tc-ingress",
            HOOK_TC_EGRESS => "tc-egress",
            HOOK_XDP => "xdp",
            _ => "unknown",
        }
        .to_owned(),
        ifindex: e.ifindex,
        interface,
        task,
        direction: (e.kind == EVENT_ALLOW).then(|| {
            if e.dir == FLOW_EGRESS {
                "egress"
            } else {
                "ingress"
            }
            .to_owned()
        }),
        proto: e.proto,
        src: endpoint(e.saddr, e.sport, e.proto),
        dst: endpoint(e.daddr, e.dport, e.proto),
        suppressed: e.suppressed,
    }
}

/// The text form: `12:00:01.250 DROP SG_INGRESS task2 (vethX) tcp 10.10.0.2:5000 -> 172.17.0.3:80`.
pub fn render(l: &EventLine) -> String {
    let mut out = String::new();
    let secs = l.time as u64;
    let ms = ((l.time - secs as f64) * 1000.0).round() as u64 % 1000;
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{ms:03} ",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    );
    match (&l.reason, &l.direction) {
        (Some(r), _) => {
            let _ = write!(out, "DROP {r}");
        }
        (None, Some(d)) => {
            let _ = write!(out, "ALLOW {d}");
        }
        (None, None) => out.push_str(&l.kind.to_uppercase()),
    }
    let who = match (&l.task, &l.interface) {
        (Some(t), Some(i)) => format!("{t} ({i})"),
        (Some(t), None) => t.clone(),
        (None, Some(i)) => i.clone(),
        (None, None) => format!("ifindex {}", l.ifindex),
    };
    let proto = match l.proto {
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        n => format!("proto {n}"),
    };
    let _ = write!(out, " {who} at {} {proto} {} -> {}", l.hook, l.src, l.dst);
    if l.suppressed > 0 {
        let _ = write!(out, " ({} earlier event(s) suppressed)", l.suppressed);
    }
    out
}

/// Connects to the agent, asks for events, and prints them until the agent goes away or
/// printing fails (the reader closed the pipe).
pub fn follow(paths: &InstancePaths, json: bool) -> Result<(), MonitorError> {
    let path = paths.socket();
    let stream = UnixStream::connect(&path).map_err(|_| MonitorError::NoAgent {
        instance: paths.name.clone(),
        path: path.display().to_string(),
    })?;
    let mut w = stream.try_clone()?;
    w.write_all(b"{\"op\":\"monitor\"}\n")?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let hello: serde_json::Value =
        serde_json::from_str(&first).map_err(|e| MonitorError::Refused(e.to_string()))?;
    if hello.get("ok") != Some(&serde_json::Value::Bool(true)) {
        return Err(MonitorError::Refused(first.trim().to_owned()));
    }
    let stdout = std::io::stdout();
    for line in reader.lines() {
        let line = line?;
        let text = if json {
            line
        } else if let Ok(ev) = serde_json::from_str::<EventLine>(&line) {
            render(&ev)
        } else {
            // {"lost": N}: this monitor fell behind the agent.
            format!("monitor fell behind: {line}")
        };
        let mut out = stdout.lock();
        if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_event_reads_as_a_line() {
        let mut names = Names::default();
        names
            .by_ifindex
            .insert(7, (Some("task2".into()), Some("vethX".into())));
        let e = Event {
            ts_ns: 1_250_000_000,
            suppressed: 4,
            ifindex: 7,
            saddr: u32::from(Ipv4Addr::new(10, 10, 0, 2)).to_be(),
            daddr: u32::from(Ipv4Addr::new(172, 17, 0, 3)).to_be(),
            sport: 5000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            kind: EVENT_DROP,
            reason: DropReason::SgIngress as u8,
            hook: HOOK_XDP,
            dir: 0,
            _pad: [0; 7],
        };
        let l = line(&e, &names, 43_200_000_000_000);
        assert_eq!(l.reason.as_deref(), Some("SG_INGRESS"));
        assert_eq!(
            (l.src.as_str(), l.dst.as_str()),
            ("10.10.0.2:5000", "172.17.0.3:80")
        );
        assert_eq!(
            render(&l),
            "12:00:01.250 DROP SG_INGRESS task2 (vethX) at xdp tcp 10.10.0.2:5000 -> 172.17.0.3:80 (4 earlier event(s) suppressed)"
        );
        let allow = Event {
            kind: EVENT_ALLOW,
            reason: 0,
            dir: FLOW_EGRESS,
            suppressed: 0,
            hook: HOOK_TC_INGRESS,
            ..e
        };
        let l = line(&allow, &names, 0);
        assert_eq!(
            (l.reason.as_deref(), l.direction.as_deref()),
            (None, Some("egress"))
        );
        assert!(render(&l).contains("ALLOW egress task2 (vethX) at tc-ingress tcp"));
    }
}
