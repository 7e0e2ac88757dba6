//! `ecsnet monitor`: the datapath's drop and policy-verdict events. The agent drains the
//! `EVENTS` ring buffer (so it never fills while nobody watches) and fans each event out, as a
//! JSON line, to every `monitor` connected to its socket. With the event rate 0 there are none.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use ecsnet_common::{
    DropReason,
    flow::{EVENT_ALLOW, EVENT_DROP, EVENT_IPV6, Event, FLOW_EGRESS},
    maps::{HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP},
};
use serde::{Deserialize, Serialize};

use crate::{
    agent::control::{self, Answer, Op, Reply, Request, StreamLine},
    flowlog::format::{FlowDirection, words},
    store::{directory::Directory, files, paths::InstancePaths},
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
    pub kind: EventKind,
    /// The drop reason (`SG_INGRESS`, ...); None for `allow`.
    pub reason: Option<String>,
    pub hook: Hook,
    pub ifindex: u32,
    pub interface: Option<String>,
    pub task: Option<String>,
    /// For policy events: whose rules decided, `egress` (the sender's) or `ingress`.
    pub direction: Option<FlowDirection>,
    pub proto: u8,
    pub src: String,
    pub dst: String,
    /// Events the datapath suppressed on this CPU just before this one (rate limit).
    pub suppressed: u64,
}

words! {
    pub enum EventKind {
        Drop = "drop",
        /// A security group let a new flow through.
        Allow = "allow",
        /// From a newer datapath.
        Unknown = "unknown",
    }

    /// Where in the datapath the event happened.
    pub enum Hook {
        TcIngress = "tc-ingress",
        TcEgress = "tc-egress",
        Xdp = "xdp",
        /// From a newer datapath.
        Unknown = "unknown",
    }
}

/// Who an event's interface is: the directory's tasks and the uplink.
#[derive(Debug, Default)]
pub struct Names {
    dir: Directory,
    /// The uplink's ifindex and name.
    uplink: Option<(u32, String)>,
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
        self.dir = Directory::load(paths).unwrap_or_default();
        self.uplink = files::read_meta(paths)
            .ok()
            .flatten()
            .map(|m| (m.uplink_index, m.uplink));
    }

    /// The task and the interface name of `ifindex`, as far as known.
    fn of(&self, ifindex: u32) -> (Option<String>, Option<String>) {
        match (&self.uplink, self.dir.task(ifindex)) {
            (_, Some(t)) => (Some(t.name.clone()), t.interface.clone()),
            (Some((i, name)), None) if *i == ifindex => (None, Some(name.clone())),
            _ => (None, None),
        }
    }
}

/// An event's address and port as `addr:port`, `[addr]:port` for IPv6, or the address alone
/// for protocols without ports.
fn endpoint(addr: IpAddr, port: u16, proto: u8) -> String {
    if proto == 6 || proto == 17 {
        SocketAddr::new(addr, u16::from_be(port)).to_string()
    } else {
        addr.to_string()
    }
}

/// An event's source and destination addresses, in its family.
fn addresses(e: &Event) -> (IpAddr, IpAddr) {
    if e.family == EVENT_IPV6 {
        (
            Ipv6Addr::from(e.saddr6).into(),
            Ipv6Addr::from(e.daddr6).into(),
        )
    } else {
        let v4 = |a: u32| IpAddr::from(Ipv4Addr::from(u32::from_be(a)));
        (v4(e.saddr), v4(e.daddr))
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "milliseconds since 1970 stay below 2^52 for a hundred thousand years"
)]
fn unix_ms(mono_ns: u64, wall_offset_ns: i128) -> f64 {
    (crate::clock::unix_ns(mono_ns, wall_offset_ns) / 1_000_000) as f64
}

/// The line of event `e`; `wall_offset_ns` turns its `CLOCK_MONOTONIC` time into Unix time.
pub fn line(e: &Event, names: &Names, wall_offset_ns: i128) -> EventLine {
    let (task, interface) = names.of(e.ifindex);
    EventLine {
        time: unix_ms(e.ts_ns, wall_offset_ns) / 1000.0,
        kind: match e.kind {
            EVENT_DROP => EventKind::Drop,
            EVENT_ALLOW => EventKind::Allow,
            _ => EventKind::Unknown,
        },
        reason: (e.kind == EVENT_DROP).then(|| DropReason::name_of(e.reason).to_string()),
        hook: match e.hook {
            HOOK_TC_INGRESS => Hook::TcIngress,
            HOOK_TC_EGRESS => Hook::TcEgress,
            HOOK_XDP => Hook::Xdp,
            _ => Hook::Unknown,
        },
        ifindex: e.ifindex,
        interface,
        task,
        direction: (e.kind == EVENT_ALLOW).then_some(if e.dir == FLOW_EGRESS {
            FlowDirection::Egress
        } else {
            FlowDirection::Ingress
        }),
        proto: e.proto,
        src: endpoint(addresses(e).0, e.sport, e.proto),
        dst: endpoint(addresses(e).1, e.dport, e.proto),
        suppressed: e.suppressed,
    }
}

/// The text form: `12:00:01.250 DROP SG_INGRESS task2 (vethX) tcp 10.10.0.2:5000 -> 172.17.0.3:80`.
pub fn render(l: &EventLine) -> String {
    let mut out = String::new();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a Unix time in milliseconds: not negative, and far below 2^53"
    )]
    let ms = (l.time * 1000.0).round() as u64;
    let (secs, ms) = (ms / 1000, ms % 1000);
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
            let _ = write!(out, "ALLOW {}", d.as_str());
        }
        (None, None) => out.push_str(&l.kind.as_str().to_uppercase()),
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
        58 => "icmpv6".to_owned(),
        n => format!("proto {n}"),
    };
    let _ = write!(
        out,
        " {who} at {} {proto} {} -> {}",
        l.hook.as_str(),
        l.src,
        l.dst
    );
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
    w.write_all(&control::line(&Request { op: Op::Monitor }))?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    match serde_json::from_str::<Reply>(&first) {
        Ok(Reply { ok: true, .. }) => {}
        Ok(Reply {
            answer: Answer::Error { error },
            ..
        }) => return Err(MonitorError::Refused(error)),
        Ok(_) => return Err(MonitorError::Refused(first.trim().to_owned())),
        Err(e) => return Err(MonitorError::Refused(e.to_string())),
    }
    let stdout = std::io::stdout();
    for line in reader.lines() {
        let line = line?;
        let text = if json {
            line
        } else {
            match serde_json::from_str::<StreamLine>(&line) {
                Ok(StreamLine::Event(ev)) => render(&ev),
                Ok(StreamLine::Lost { .. }) | Err(_) => format!("monitor fell behind: {line}"),
            }
        };
        let mut out = stdout.lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::directory::fixtures;

    /// The names of one task, `name` at `addr` on interface `iface` (`ifindex`).
    fn one_task(name: &str, addr: [u8; 4], (iface, ifindex): (&str, u32)) -> Names {
        let state = crate::state::State {
            tasks: vec![fixtures::task(name, addr, Some(iface))],
            ..Default::default()
        };
        let entry = fixtures::iface(addr, ecsnet_common::maps::ROLE_TASK);
        Names {
            dir: Directory::join(state, &[(ifindex, entry)]),
            uplink: None,
            read_at: None,
        }
    }

    #[test]
    fn a_drop_event_reads_as_a_line() {
        let names = Names {
            uplink: Some((2, "eth0".into())),
            ..one_task("task2", [172, 17, 0, 3], ("vethX", 7))
        };
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
            reason: ecsnet_common::DropReason::SgIngress as u8,
            hook: HOOK_XDP,
            dir: 0,
            ..Event::default()
        };
        assert_eq!(
            names.of(2),
            (None, Some("eth0".into())),
            "the uplink by name"
        );
        assert_eq!(names.of(3), (None, None));
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
            (l.reason.as_deref(), l.direction),
            (None, Some(FlowDirection::Egress))
        );
        assert!(render(&l).contains("ALLOW egress task2 (vethX) at tc-ingress tcp"));
        // An IPv6 drop: its own addresses, bracketed with ports, bare without.
        let v6 = |a: &str| a.parse::<Ipv6Addr>().unwrap().octets();
        let rogue = Event {
            family: EVENT_IPV6,
            saddr6: v6("fe80::42:acff:fe11:2"),
            daddr6: v6("ff02::1"),
            proto: 58,
            reason: ecsnet_common::DropReason::RogueRouter as u8,
            hook: HOOK_TC_INGRESS,
            suppressed: 0,
            ..e
        };
        assert!(
            render(&line(&rogue, &names, 0))
                .ends_with("DROP ROGUE_ROUTER task2 (vethX) at tc-ingress icmpv6 fe80::42:acff:fe11:2 -> ff02::1"),
            "{}",
            render(&line(&rogue, &names, 0))
        );
        let udp = Event {
            proto: 17,
            sport: 547u16.to_be(),
            dport: 546u16.to_be(),
            ..rogue
        };
        assert_eq!(line(&udp, &names, 0).src, "[fe80::42:acff:fe11:2]:547");
    }

    #[test]
    fn an_ipv6_allow_event_reads_as_a_line() {
        let names = one_task("task1", [172, 17, 0, 2], ("vethA", 9));
        let v6 = |a: &str| a.parse::<Ipv6Addr>().unwrap().octets();
        // Written out in full: the line has them in RFC 5952's shortest form.
        let e = Event {
            ts_ns: 2_000_000_000,
            ifindex: 9,
            family: EVENT_IPV6,
            saddr6: v6("fd00:0010:0010:0000:0000:0000:0000:0002"),
            daddr6: v6("fd00:0db8:0001:0000:0000:0242:ac11:0002"),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            kind: EVENT_ALLOW,
            hook: HOOK_TC_INGRESS,
            dir: ecsnet_common::flow::FLOW_INGRESS,
            ..Event::default()
        };
        let l = line(&e, &names, 0);
        assert_eq!(
            (l.kind, l.direction),
            (EventKind::Allow, Some(FlowDirection::Ingress))
        );
        assert_eq!(l.reason, None);
        assert_eq!(
            (l.src.as_str(), l.dst.as_str()),
            ("[fd00:10:10::2]:40000", "[fd00:db8:1::242:ac11:2]:80")
        );
        assert_eq!(
            render(&l),
            "00:00:02.000 ALLOW ingress task1 (vethA) at tc-ingress tcp [fd00:10:10::2]:40000 -> [fd00:db8:1::242:ac11:2]:80"
        );
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(json["kind"], "allow");
        assert_eq!(json["direction"], "ingress");
        assert_eq!(json["src"], "[fd00:10:10::2]:40000");
        // An echo request a task's egress rules let out: addresses alone, as for ICMP.
        let ping = Event {
            proto: 58,
            sport: 7u16.to_be(),
            dport: 0,
            dir: FLOW_EGRESS,
            ..e
        };
        let l = line(&ping, &names, 0);
        assert_eq!(
            render(&l),
            "00:00:02.000 ALLOW egress task1 (vethA) at tc-ingress icmpv6 fd00:10:10::2 -> fd00:db8:1::242:ac11:2"
        );
    }
}
