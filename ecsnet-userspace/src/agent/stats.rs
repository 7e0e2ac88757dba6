//! `ecsnet stats`: the counters of the pinned maps joined with the applied state, as JSON or as
//! a table. Directions are the task's: egress is what the task sent, ingress what it received.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use ecsnet_common::{
    DropReason,
    ct::{CtEntry, CtEntry6},
};
use serde::{Deserialize, Serialize};

use crate::{
    flowlog,
    kernel::maps::{self, Count, Tracked},
    store::{
        directory::{Directory, DirectoryError},
        files,
        paths::InstancePaths,
    },
};

/// Why the counters could not be read: what keeps the directory from loading, a run file or a
/// pinned map.
pub type StatsError = DirectoryError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskStats {
    pub name: String,
    pub address: Ipv4Addr,
    pub interface: String,
    pub ifindex: u32,
    /// IPv4 sent by the task.
    pub egress: Count,
    /// IPv4 delivered to the task.
    pub ingress: Count,
    /// Frames that are not IPv4 (ARP, ...), both ways.
    pub other: Count,
    pub drops: BTreeMap<String, u64>,
    /// Masquerade ports the task holds towards the destination it holds most towards, as the
    /// datapath counts them against `conntrack.natTaskPorts`.
    #[serde(default)]
    pub nat_ports_max: u64,
    /// [`nat_ports_max`](Self::nat_ports_max) of the task's IPv6 flows (`NAT_USE6`), counted
    /// apart under the same limit.
    #[serde(default)]
    pub nat_ports_max_ipv6: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkStats {
    pub interface: String,
    pub ifindex: u32,
    /// IPv4 arriving, at tc.
    pub ingress: Count,
    /// IPv4 leaving, at tc.
    pub egress: Count,
    /// IPv4 arriving, at XDP.
    pub xdp: Count,
    pub other: Count,
    pub drops: BTreeMap<String, u64>,
}

/// Fill of the connection tables. Every flow holds two entries, one per direction; NAT mappings
/// are the entries of masquerade and hairpin flows (no separate NAT table). A flow starts in
/// the unanswered table (LRU: a flood of flows nobody answers evicts its own kind) and moves to
/// the assured table, which never evicts, once answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackStats {
    /// Entries in both tables.
    pub entries: u64,
    /// Capacity of the assured table (`up --ct-size`).
    pub capacity: u64,
    /// Entries in the unanswered table, and its capacity (half of `--ct-size`).
    pub unanswered_entries: u64,
    pub unanswered_capacity: u64,
    /// Flows created, and flows assured (moved to the assured table), since `up`.
    pub created: u64,
    pub assured: u64,
    /// Answered flows that found the assured table full and stayed where they can be evicted.
    pub assured_table_full: u64,
    /// Flows by kind: eastWest, inbound, masquerade, hairpin.
    pub flows: BTreeMap<String, u64>,
    /// Flows whose source ecsnet rewrote (masquerade and self-hairpin): its NAT table.
    pub nat_mappings: u64,
    /// Masquerade ports one task may hold towards one destination (`up --nat-task-ports`);
    /// 0: no limit.
    #[serde(default)]
    pub nat_task_ports: u32,
    /// The IPv6 tables (`CT6`, `CT6_NEW`), sized alike; the fields above are IPv4's, and the
    /// flow counters both families'.
    #[serde(default)]
    pub ipv6: TableFill,
}

impl ConntrackStats {
    /// The IPv4 tables' fill, from the fields that have always held it.
    pub fn ipv4(&self) -> TableFill {
        TableFill {
            entries: self.entries,
            capacity: self.capacity,
            unanswered_entries: self.unanswered_entries,
            unanswered_capacity: self.unanswered_capacity,
            flows: self.flows.clone(),
            nat_mappings: self.nat_mappings,
        }
    }
}

/// Fill of one family's two connection tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableFill {
    /// Entries in both tables.
    pub entries: u64,
    /// Capacity of the assured table.
    pub capacity: u64,
    /// Entries in the unanswered table, and its capacity.
    pub unanswered_entries: u64,
    pub unanswered_capacity: u64,
    /// Flows by kind.
    pub flows: BTreeMap<String, u64>,
    /// Flows whose source ecsnet rewrote.
    pub nat_mappings: u64,
}

impl TableFill {
    /// `T`'s tables, read entry by entry (none when they are not pinned).
    fn read<T: Tracked>(paths: &InstancePaths) -> Result<Self, maps::MapsError> {
        let [assured, unanswered] = T::TABLES;
        let mut out = TableFill {
            capacity: maps::ct_capacity(paths, assured)?.into(),
            unanswered_capacity: maps::ct_capacity(paths, unanswered)?.into(),
            ..Default::default()
        };
        maps::for_each_ct::<T>(paths, |table, k, e| out.count(table == unanswered, k, e))?;
        Ok(out)
    }

    /// Counts one entry, of the unanswered table or not.
    fn count<T: Tracked>(&mut self, unanswered: bool, k: &T::Key, e: &T) {
        use ecsnet_common::ct;
        self.entries += 1;
        if unanswered {
            self.unanswered_entries += 1;
        }
        if e.dir() != ct::DIR_ORIGINAL {
            return;
        }
        let kind = kind_name(e.kind());
        // Looked up before inserting: a million flows make no million strings.
        match self.flows.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.flows.insert(kind.to_owned(), 1);
            }
        }
        if e.rewritten().0 != T::ends(k).0 {
            self.nat_mappings += 1;
        }
    }
}

/// How `stats`, metrics and `conns` name a flow's `KIND_*`.
pub fn kind_name(kind: u8) -> &'static str {
    use ecsnet_common::ct;
    match kind {
        ct::KIND_EAST_WEST => "eastWest",
        ct::KIND_INBOUND => "inbound",
        ct::KIND_MASQUERADE => "masquerade",
        ct::KIND_HAIRPIN => "hairpin",
        ct::KIND_LOCAL => "local",
        _ => "unknown",
    }
}

/// Flow logs and monitor events: the flow table's fill and what the exporter wrote and lost.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowLogStats {
    pub enabled: bool,
    /// The open capture window's number.
    pub window: u32,
    pub table_entries: u64,
    pub table_capacity: u64,
    pub windows_exported: u64,
    pub records_exported: u64,
    pub skipdata_records: u64,
    /// Packets that found the flow table full (they are in SKIPDATA records, no OK record).
    pub lost_packets: u64,
    /// Monitor events the datapath's rate limit (or a full ring) suppressed.
    pub events_suppressed: u64,
}

/// What one of the agent's listeners closed or failed to accept since the agent started
/// (`conns`): connections are bounded and counted, not logged one by one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStats {
    /// Accepts that failed (out of descriptors, memory, ...); each pauses the listener.
    pub accept_errors: u64,
    /// Connections closed at once because every slot held a request being answered.
    pub over_cap: u64,
    /// Connections waiting for a request, closed to make room for a new one.
    pub evicted: u64,
    /// Connections closed after the idle timeout (no request, or a reply not read).
    pub timed_out: u64,
}

/// The agent's listeners, from the counters file it rewrites every second (zeros when no agent
/// has written one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStats {
    pub metrics: ListenerStats,
    pub control: ListenerStats,
}

impl AgentStats {
    pub fn read(paths: &InstancePaths) -> Self {
        std::fs::read(paths.agent_counters())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub instance: String,
    pub tasks: Vec<TaskStats>,
    pub uplink: UplinkStats,
    pub drops: BTreeMap<String, u64>,
    pub conntrack: ConntrackStats,
    #[serde(default)]
    pub flow_logs: FlowLogStats,
    #[serde(default)]
    pub agent: AgentStats,
    /// How following the container engine stands (`up --docker`); None without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::store::files::EngineStatus>,
}

fn flow_log_stats(paths: &InstancePaths) -> Result<FlowLogStats, StatsError> {
    let st = maps::read_flow_state(paths)?;
    let (table_entries, table_capacity) = maps::flow_table_fill(paths)?;
    let c = flowlog::counters(paths);
    Ok(FlowLogStats {
        enabled: st.enabled != 0,
        window: st.epoch,
        table_entries,
        table_capacity,
        windows_exported: c.windows,
        records_exported: c.records,
        skipdata_records: c.skipdata_records,
        lost_packets: c.lost_packets,
        events_suppressed: maps::events_suppressed(paths)?,
    })
}

/// The tables' fill, both families, and the flow counters.
fn conntrack(paths: &InstancePaths) -> Result<ConntrackStats, maps::MapsError> {
    use ecsnet_common::maps as m;
    let v4 = TableFill::read::<CtEntry>(paths)?;
    let events = maps::read_ct_events(paths)?;
    Ok(ConntrackStats {
        entries: v4.entries,
        capacity: v4.capacity,
        unanswered_entries: v4.unanswered_entries,
        unanswered_capacity: v4.unanswered_capacity,
        created: events[m::CT_EV_CREATED as usize],
        assured: events[m::CT_EV_ASSURED as usize],
        assured_table_full: events[m::CT_EV_CT_FULL as usize],
        flows: v4.flows,
        nat_mappings: v4.nat_mappings,
        nat_task_ports: maps::read_nat_config(paths)?.map_or(0, |c| c.task_ports),
        ipv6: TableFill::read::<CtEntry6>(paths)?,
    })
}

fn plus(a: Count, b: Count) -> Count {
    Count {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

/// Reads the counters of an instance.
pub fn stats(paths: &InstancePaths) -> Result<Stats, StatsError> {
    let meta = files::require_up(paths)?;
    let dir = Directory::load(paths)?;
    let counts = maps::read_counts(paths)?;
    let drops = maps::read_drops(paths)?;
    // Grouped once by interface and by task: looked up per task, never scanned per task.
    let mut drops_by_iface: HashMap<u32, BTreeMap<String, u64>> = HashMap::new();
    for ((i, r), n) in &drops {
        drops_by_iface
            .entry(*i)
            .or_default()
            .insert(DropReason::name_of(*r).to_string(), *n);
    }
    let drops_of = |ifindex: u32| drops_by_iface.get(&ifindex).cloned().unwrap_or_default();
    let nat_max = busiest_destination(
        maps::read_nat_use(paths)?
            .into_iter()
            .map(|(k, n)| (k.task, n)),
    );
    let nat_ports_max = |addr: Ipv4Addr| {
        nat_max
            .get(&u32::from_ne_bytes(addr.octets()))
            .copied()
            .unwrap_or(0)
    };
    let nat_max6 = busiest_destination(
        maps::read_nat_use6(paths)?
            .into_iter()
            .map(|(k, n)| (k.task, n)),
    );
    let nat_ports_max6 = |addr: Option<Ipv6Addr>| {
        addr.and_then(|a| nat_max6.get(&a.octets()).copied())
            .unwrap_or(0)
    };
    let tasks = dir
        .placed_tasks()
        .map(|(t, ifindex)| {
            let c = counts.get(&ifindex).copied().unwrap_or_default();
            TaskStats {
                name: t.name.clone(),
                address: t.ipv4_address,
                interface: t.interface.clone().unwrap_or_default(),
                ifindex,
                egress: c.tc_ingress,
                ingress: c.tc_egress,
                other: plus(c.other_ingress, c.other_egress),
                drops: drops_of(ifindex),
                nat_ports_max: nat_ports_max(t.ipv4_address),
                nat_ports_max_ipv6: nat_ports_max6(t.ipv6_address),
            }
        })
        .collect();
    let u = counts.get(&meta.uplink_index).copied().unwrap_or_default();
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, r), n) in &drops {
        *total
            .entry(DropReason::name_of(*r).to_string())
            .or_default() += n;
    }
    Ok(Stats {
        instance: paths.name.clone(),
        tasks,
        uplink: UplinkStats {
            interface: meta.uplink.clone(),
            ifindex: meta.uplink_index,
            ingress: u.tc_ingress,
            egress: u.tc_egress,
            xdp: u.xdp,
            other: plus(u.other_ingress, u.other_egress),
            drops: drops_of(meta.uplink_index),
        },
        drops: total,
        conntrack: conntrack(paths)?,
        flow_logs: flow_log_stats(paths)?,
        agent: AgentStats::read(paths),
        engine: crate::store::files::read_engine_status(paths)
            .ok()
            .flatten()
            .map(|mut e| {
                // As the live state has it: `sg apply` opens a closed task between two views
                // of the engine, and engine.json is rewritten only at the next view.
                e.closed = closed_tasks(&dir.state);
                e.held_now = maps::read_ifaces(paths).map_or(0, |rows| {
                    rows.iter()
                        .filter(|(_, r)| r.role == ecsnet_common::maps::ROLE_HELD)
                        .count()
                });
                e
            }),
    })
}

/// Of the masquerade counts (task address, ports held towards one destination), the most each
/// task holds towards any one destination.
fn busiest_destination<A: Eq + std::hash::Hash>(
    counts: impl Iterator<Item = (A, u64)>,
) -> HashMap<A, u64> {
    let mut out: HashMap<A, u64> = HashMap::new();
    for (task, n) in counts {
        let m = out.entry(task).or_default();
        *m = (*m).max(n);
    }
    out
}

/// The tasks of `state` closed because their label names a group nobody defined.
fn closed_tasks(state: &crate::state::State) -> usize {
    state
        .tasks
        .iter()
        .filter(|t| {
            t.security_groups
                .iter()
                .any(|g| g == crate::plan::merge::CLOSED_GROUP)
        })
        .count()
}

/// The table `ecsnet stats` prints.
pub fn render(s: &Stats) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<15} {:<15} {:>10} {:>12} {:>10} {:>12} {:>8} {:>6}",
        "TASK",
        "ADDRESS",
        "INTERFACE",
        "EGR PKTS",
        "EGR BYTES",
        "ING PKTS",
        "ING BYTES",
        "OTHER",
        "DROPS"
    );
    for t in &s.tasks {
        let _ = writeln!(
            out,
            "{:<12} {:<15} {:<15} {:>10} {:>12} {:>10} {:>12} {:>8} {:>6}",
            t.name,
            t.address,
            t.interface,
            t.egress.packets,
            t.egress.bytes,
            t.ingress.packets,
            t.ingress.bytes,
            t.other.packets,
            t.drops.values().sum::<u64>()
        );
    }
    let up = &s.uplink;
    let _ = writeln!(
        out,
        "uplink {} (ifindex {}): in {} pkts {} B (xdp {} pkts), out {} pkts {} B, other {} pkts",
        up.interface,
        up.ifindex,
        up.ingress.packets,
        up.ingress.bytes,
        up.xdp.packets,
        up.egress.packets,
        up.egress.bytes,
        up.other.packets
    );
    out.push_str(&render_conntrack(&s.conntrack));
    let _ = writeln!(out, "{}", render_masquerade(s));
    let f = &s.flow_logs;
    let _ = writeln!(
        out,
        "flow logs: {}, window {}, table {} of {} entries, {} record(s) in {} window(s), {} SKIPDATA ({} packet(s) lost), {} monitor event(s) suppressed",
        if f.enabled { "on" } else { "off" },
        f.window,
        f.table_entries,
        f.table_capacity,
        f.records_exported,
        f.windows_exported,
        f.skipdata_records,
        f.lost_packets,
        f.events_suppressed
    );
    let agent = &s.agent;
    let _ = writeln!(
        out,
        "agent: metrics {}, control {}",
        render_listener(&agent.metrics),
        render_listener(&agent.control)
    );
    if let Some(e) = &s.engine {
        let _ = writeln!(out, "{}", render_engine(e));
    }
    if s.drops.is_empty() {
        let _ = writeln!(out, "drops: none");
    } else {
        let list: Vec<String> = s.drops.iter().map(|(r, n)| format!("{r}={n}")).collect();
        let _ = writeln!(out, "drops: {}", list.join(" "));
    }
    out
}

/// The `conntrack:` lines, IPv4's and IPv6's tables.
fn render_conntrack(c: &ConntrackStats) -> String {
    format!(
        "conntrack: {}, {} created, {} assured, {} found the table full\nconntrack ipv6: {}\n",
        render_fill(&c.ipv4()),
        c.created,
        c.assured,
        c.assured_table_full,
        render_fill(&c.ipv6)
    )
}

/// One family's tables: entries of capacity, unanswered, flows by kind, NAT mappings.
fn render_fill(f: &TableFill) -> String {
    format!(
        "{} of {} entries ({:.1}%; {} of {} unanswered), flows: {}, nat mappings: {}",
        f.entries,
        f.capacity,
        percent(f.entries, f.capacity),
        f.unanswered_entries,
        f.unanswered_capacity,
        by_kind(&f.flows),
        f.nat_mappings
    )
}

/// Flows by kind, `kind=n` each, or `none`.
fn by_kind(flows: &BTreeMap<String, u64>) -> String {
    if flows.is_empty() {
        return "none".to_owned();
    }
    let each: Vec<String> = flows.iter().map(|(k, n)| format!("{k}={n}")).collect();
    each.join(" ")
}

/// The `masquerade:` line: the limit per task and destination, and who holds the most, over
/// IPv4 and (counted apart) over IPv6.
fn render_masquerade(s: &Stats) -> String {
    let busiest =
        |family: &str, held: fn(&TaskStats) -> u64| match s.tasks.iter().max_by_key(|t| held(t)) {
            Some(t) if held(t) > 0 => format!(
                ", {family}{} holds the most ({} towards one destination)",
                t.name,
                held(t)
            ),
            _ => String::new(),
        };
    format!(
        "masquerade: {} port(s) per task and destination{}{}",
        match s.conntrack.nat_task_ports {
            0 => "no limit of".to_owned(),
            n => format!("at most {n}"),
        },
        busiest("", |t| t.nat_ports_max),
        busiest("over IPv6 ", |t| t.nat_ports_max_ipv6),
    )
}

/// The `engine:` line: how following the container engine stands.
fn render_engine(e: &crate::store::files::EngineStatus) -> String {
    format!(
        "engine: {} {}{}, {} task(s), {} container(s) not tasks, {} closed (unknown groups), {} left out, {} port(s) held now ({} since the agent started), {} event(s), {} list(s), {} apply error(s)",
        e.engine,
        if e.connected {
            "connected"
        } else {
            "DISCONNECTED"
        },
        e.last_error
            .as_ref()
            .map_or_else(String::new, |err| format!(" ({err})")),
        e.tasks,
        e.not_tasks,
        e.closed,
        e.left_out,
        e.held_now,
        e.held,
        e.events,
        e.relists,
        e.apply_errors
    )
}

/// `part` of `whole`, percent (0 of nothing).
#[expect(
    clippy::cast_precision_loss,
    reason = "table sizes are below 2^24 entries; the percentage is printed to one decimal"
)]
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn render_listener(l: &ListenerStats) -> String {
    format!(
        "{} accept error(s), closed {} over the cap, {} waiting for a newer one, {} idle",
        l.accept_errors, l.over_cap, l.evicted, l.timed_out
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_tables_have_a_line_of_their_own() {
        let c = ConntrackStats {
            entries: 4,
            capacity: 200,
            unanswered_entries: 2,
            unanswered_capacity: 100,
            flows: BTreeMap::from([("eastWest".to_owned(), 2)]),
            ipv6: TableFill {
                entries: 6,
                capacity: 200,
                unanswered_entries: 0,
                unanswered_capacity: 100,
                flows: BTreeMap::from([("eastWest".to_owned(), 1), ("local".to_owned(), 2)]),
                nat_mappings: 0,
            },
            ..Default::default()
        };
        let text = render_conntrack(&c);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with(
                "conntrack: 4 of 200 entries (2.0%; 2 of 100 unanswered), flows: eastWest=2,"
            ),
            "{text}"
        );
        assert_eq!(
            lines[1],
            "conntrack ipv6: 6 of 200 entries (3.0%; 0 of 100 unanswered), flows: eastWest=1 local=2, nat mappings: 0"
        );
        let empty = render_conntrack(&ConntrackStats::default());
        assert!(
            empty.contains("conntrack ipv6: 0 of 0 entries (0.0%; 0 of 0 unanswered), flows: none"),
            "{empty}"
        );
    }

    #[test]
    fn the_masquerade_line_names_the_busiest_task_of_each_family() {
        let task = |name: &str, v4: u64, v6: u64| TaskStats {
            name: name.to_owned(),
            address: Ipv4Addr::new(172, 17, 0, 2),
            interface: String::new(),
            ifindex: 7,
            egress: Count::default(),
            ingress: Count::default(),
            other: Count::default(),
            drops: BTreeMap::new(),
            nat_ports_max: v4,
            nat_ports_max_ipv6: v6,
        };
        let mut s = Stats {
            instance: "i".to_owned(),
            tasks: vec![task("a", 3, 0), task("b", 1, 5)],
            uplink: UplinkStats::default(),
            drops: BTreeMap::new(),
            conntrack: ConntrackStats {
                nat_task_ports: 64,
                ..Default::default()
            },
            flow_logs: FlowLogStats::default(),
            agent: AgentStats::default(),
            engine: None,
        };
        assert_eq!(
            render_masquerade(&s),
            "masquerade: at most 64 port(s) per task and destination, a holds the most (3 towards \
             one destination), over IPv6 b holds the most (5 towards one destination)"
        );
        s.tasks = vec![task("a", 0, 0)];
        assert_eq!(
            render_masquerade(&s),
            "masquerade: at most 64 port(s) per task and destination"
        );
        let counts = [([1u8; 16], 2), ([1; 16], 7), ([2; 16], 1)];
        assert_eq!(
            busiest_destination(counts.into_iter()),
            HashMap::from([([1u8; 16], 7), ([2; 16], 1)])
        );
    }
}
