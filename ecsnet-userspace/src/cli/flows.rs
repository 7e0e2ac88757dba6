//! `ecsnet flows tail`: the flow-log journal, filtered and formatted (`flowlog::tail`); and
//! `ecsnet conns`: the flows the connection tables track now, of both families.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use clap::{Args, Subcommand, ValueEnum};
use ecsnet_common::ct::{self, CtEntry, CtEntry6, CtState, DIR_ORIGINAL};
use serde::Serialize;

use crate::{
    agent::stats::kind_name,
    cli::{or_keyword, print_json_or},
    flowlog::{
        filter::Filter,
        format::Format,
        tail::{self, TailOptions},
    },
    kernel::maps::{self, Tracked},
    store::{files, paths::InstancePaths},
};

#[derive(Debug, Subcommand)]
pub enum FlowsCmd {
    /// Print the latest records, and with --follow every record as its window closes.
    Tail {
        #[arg(short, long)]
        follow: bool,
        /// AWS's syntax, e.g. '${version} ${srcaddr} ${dstaddr} ${tcp-flags}'; fields of
        /// versions 2 to 8 (vpc-id, pkt-srcaddr, flow-direction, ecs-task-id, ...). Default:
        /// AWS's version 2 format.
        #[arg(long, value_parser = Format::parse)]
        format: Option<Format>,
        /// JSON lines with the fields of the format (missing values are null).
        #[arg(long)]
        json: bool,
        /// Terms that must all hold, e.g. 'task=web-1 port=80 action=REJECT'; keys: task,
        /// interface, addr, srcaddr, dstaddr, pkt-srcaddr, pkt-dstaddr (address or CIDR), port,
        /// srcport, dstport, proto, action, direction, status; `!=` negates.
        #[arg(long, value_parser = Filter::parse)]
        filter: Option<Filter>,
        /// How many of the latest matching records to print first: a number, or `all`.
        #[arg(short = 'n', long, value_name = "N|all", default_value = "10", value_parser = lines)]
        lines: Lines,
    },
}

/// `--lines`: the latest N records, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lines(Option<usize>);

#[derive(Debug, thiserror::Error)]
#[error("expected a number or `all`")]
pub struct BadLines;

fn lines(s: &str) -> Result<Lines, BadLines> {
    or_keyword("all", s).map(Lines).map_err(|_| BadLines)
}

pub fn run(paths: &InstancePaths, cmd: FlowsCmd) -> anyhow::Result<()> {
    let FlowsCmd::Tail {
        follow,
        format,
        json,
        filter,
        lines: Lines(lines),
    } = cmd;
    files::require_up(paths)?;
    let opts = TailOptions {
        format: format.unwrap_or_default(),
        json,
        filter: filter.unwrap_or_default(),
        lines,
        follow,
    };
    tail::tail(paths, &opts)?;
    Ok(())
}

/// `ecsnet conns`: which flows to list.
#[derive(Debug, Args)]
pub struct ConnsArgs {
    /// One JSON array of the flows.
    #[arg(long)]
    json: bool,
    /// Only the flows of this family.
    #[arg(long, value_enum)]
    family: Option<Family>,
    /// Only the flows with this address on either side, before or after translation.
    #[arg(long)]
    addr: Option<IpAddr>,
    /// Only the flows of this kind (eastWest, inbound, masquerade, hairpin, local).
    #[arg(long)]
    kind: Option<String>,
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// One tracked flow, as its original direction's entry and its reply's counters show it.
/// Addresses print as `addr:port`, IPv6 as `[addr]:port` (RFC 5952).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Conn {
    pub family: Family,
    /// The table it is in: `CT`, `CT_NEW` (not answered yet), `CT6`, `CT6_NEW`.
    pub table: &'static str,
    pub proto: String,
    pub source: String,
    pub destination: String,
    /// What the original direction's packets are rewritten to (the same when untouched).
    pub translated_source: String,
    pub translated_destination: String,
    pub kind: &'static str,
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl Conn {
    fn mentions(&self, addr: IpAddr) -> bool {
        [
            &self.source,
            &self.destination,
            &self.translated_source,
            &self.translated_destination,
        ]
        .into_iter()
        .filter_map(|s| s.parse::<SocketAddr>().ok())
        .any(|s| s.ip() == addr)
    }
}

/// A protocol's name: tcp, udp, icmp, icmpv6, or its number.
fn proto_name(proto: u8) -> String {
    match proto {
        ct::PROTO_TCP => "tcp".to_owned(),
        ct::PROTO_UDP => "udp".to_owned(),
        ct::PROTO_ICMP => "icmp".to_owned(),
        maps::PROTO_ICMPV6 => "icmpv6".to_owned(),
        n => n.to_string(),
    }
}

/// What a flow waits for, as `conns` names it.
fn state_name(s: CtState) -> &'static str {
    match s {
        CtState::SynSent => "synSent",
        CtState::Established => "established",
        CtState::Closing => "closing",
        CtState::Reset => "reset",
        CtState::Udp => "udp",
        CtState::Icmp => "icmp",
    }
}

/// The flows of `T`'s tables from their entries (`maps::read_tables`): one per original
/// direction, with its reply's counters. A reply whose original is gone (GC or a cut got there
/// first) makes no flow.
pub fn conns_of<T: Tracked>(family: Family, entries: &[(&'static str, T::Key, T)]) -> Vec<Conn> {
    let replies: std::collections::HashMap<T::Index, &T> = entries
        .iter()
        .filter(|(_, _, e)| e.dir() != DIR_ORIGINAL)
        .map(|(_, k, e)| (T::index(k), e))
        .collect();
    entries
        .iter()
        .filter(|(_, _, e)| e.dir() == DIR_ORIGINAL)
        .map(|(table, k, e)| {
            let reply = replies.get(&T::index(e.peer())).copied();
            let (src, dst) = T::ends(k);
            let (nat_src, nat_dst) = e.rewritten();
            let reply_timing = reply.map(Tracked::timing).unwrap_or_default();
            let counted = reply.map(Tracked::count).unwrap_or_default();
            let own = e.count();
            Conn {
                family,
                table,
                proto: proto_name(T::proto(k)),
                source: src.to_string(),
                destination: dst.to_string(),
                translated_source: nat_src.to_string(),
                translated_destination: nat_dst.to_string(),
                kind: kind_name(e.kind()),
                state: state_name(ct::state(
                    maps::state_proto(T::proto(k)),
                    &e.timing(),
                    &reply_timing,
                )),
                packets: own.packets,
                bytes: own.bytes,
                reply_packets: counted.packets,
                reply_bytes: counted.bytes,
            }
        })
        .collect()
}

/// The table `ecsnet conns` prints: one line per flow, with a TRANSLATED column that shows the
/// rewritten source and destination, or `-` for a flow ecsnet does not rewrite.
pub fn render_conns(conns: &[Conn]) -> String {
    let width = |pick: fn(&Conn) -> &str, title: &str| {
        conns
            .iter()
            .map(|c| pick(c).len())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let (ws, wd) = (
        width(|c| &c.source, "SOURCE"),
        width(|c| &c.destination, "DESTINATION"),
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<ws$} {:<wd$} {:<10} {:<11} {:>8} {:>10} {:>8} {:>10} TRANSLATED",
        "PROTO", "SOURCE", "DESTINATION", "KIND", "STATE", "PKTS", "BYTES", "RPKTS", "RBYTES"
    );
    for c in conns {
        let translated =
            if c.translated_source == c.source && c.translated_destination == c.destination {
                "-".to_owned()
            } else {
                format!("{} -> {}", c.translated_source, c.translated_destination)
            };
        let _ = writeln!(
            out,
            "{:<6} {:<ws$} {:<wd$} {:<10} {:<11} {:>8} {:>10} {:>8} {:>10} {translated}",
            c.proto,
            c.source,
            c.destination,
            c.kind,
            c.state,
            c.packets,
            c.bytes,
            c.reply_packets,
            c.reply_bytes
        );
    }
    out
}

/// `ecsnet conns`: the tracked flows of both families (IPv4 first), filtered.
pub fn conns(paths: &InstancePaths, args: &ConnsArgs) -> anyhow::Result<()> {
    files::require_up(paths)?;
    let want = |f: Family| args.family.is_none_or(|w| w == f);
    let mut all = Vec::new();
    if want(Family::Ipv4) {
        all.extend(conns_of(
            Family::Ipv4,
            &maps::read_tables::<CtEntry>(paths)?,
        ));
    }
    if want(Family::Ipv6) {
        all.extend(conns_of(
            Family::Ipv6,
            &maps::read_tables::<CtEntry6>(paths)?,
        ));
    }
    all.retain(|c| {
        args.addr.is_none_or(|a| c.mentions(a))
            && args.kind.as_ref().is_none_or(|k| c.kind == k.as_str())
    });
    // Hash order is no order: by family, then ends.
    all.sort_by(|a, b| {
        (a.family as u8, &a.source, &a.destination, &a.proto).cmp(&(
            b.family as u8,
            &b.source,
            &b.destination,
            &b.proto,
        ))
    });
    print_json_or(args.json, &all, |c| render_conns(c));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv6Addr;

    use ecsnet_common::ct::{
        CtKey, CtKey6, DIR_REPLY, KIND_EAST_WEST, KIND_MASQUERADE, PROTO_TCP, PROTO_UDP, TCP_ACK,
        TCP_SYN,
    };

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().unwrap().octets()
    }

    /// An answered IPv6 TCP flow between two tasks: both entries, the original first.
    fn east_west6() -> Vec<(&'static str, CtKey6, CtEntry6)> {
        let k = CtKey6 {
            // Written out in full; printed compressed.
            saddr: v6("2001:0db8:0000:0000:0000:0000:0000:0001"),
            daddr: v6("fd00:ec5:17::3"),
            sport: 41_000u16.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let r = k.reversed();
        let entry = |key: CtKey6, peer: CtKey6, dir, packets, bytes| CtEntry6 {
            peer,
            nat_saddr: key.saddr,
            nat_daddr: key.daddr,
            nat_sport: key.sport,
            nat_dport: key.dport,
            packets,
            bytes,
            kind: KIND_EAST_WEST,
            dir,
            tcp_flags: TCP_SYN | TCP_ACK,
            ..CtEntry6::default()
        };
        vec![
            ("CT6", k, entry(k, r, DIR_ORIGINAL, 3, 200)),
            ("CT6", r, entry(r, k, DIR_REPLY, 2, 150)),
        ]
    }

    /// A masqueraded UDP flow nobody answered yet (its reply entry holds the port).
    fn masquerade4() -> Vec<(&'static str, CtKey, CtEntry)> {
        let k = CtKey {
            saddr: u32::from_ne_bytes([172, 17, 0, 2]),
            daddr: u32::from_ne_bytes([10, 10, 0, 2]),
            sport: 40_000u16.to_be(),
            dport: 9000u16.to_be(),
            proto: PROTO_UDP,
            _pad: [0; 3],
        };
        let uplink = u32::from_ne_bytes([10, 10, 0, 1]);
        let r = CtKey {
            saddr: k.daddr,
            daddr: uplink,
            sport: k.dport,
            dport: k.sport,
            ..k
        };
        let orig = CtEntry {
            peer: r,
            nat_saddr: uplink,
            nat_daddr: k.daddr,
            nat_sport: k.sport,
            nat_dport: k.dport,
            packets: 1,
            bytes: 148,
            kind: KIND_MASQUERADE,
            dir: DIR_ORIGINAL,
            ..CtEntry::default()
        };
        let reply = CtEntry {
            peer: k,
            nat_saddr: k.daddr,
            nat_daddr: k.saddr,
            nat_sport: k.dport,
            nat_dport: k.sport,
            kind: KIND_MASQUERADE,
            dir: DIR_REPLY,
            ..CtEntry::default()
        };
        vec![("CT_NEW", r, reply), ("CT_NEW", k, orig)]
    }

    #[test]
    fn a_flow_is_its_original_direction_with_the_replys_counters() {
        let six = conns_of(Family::Ipv6, &east_west6());
        assert_eq!(
            six,
            [Conn {
                family: Family::Ipv6,
                table: "CT6",
                proto: "tcp".into(),
                source: "[2001:db8::1]:41000".into(),
                destination: "[fd00:ec5:17::3]:80".into(),
                translated_source: "[2001:db8::1]:41000".into(),
                translated_destination: "[fd00:ec5:17::3]:80".into(),
                kind: "eastWest",
                state: "established",
                packets: 3,
                bytes: 200,
                reply_packets: 2,
                reply_bytes: 150,
            }]
        );
        let four = conns_of(Family::Ipv4, &masquerade4());
        assert_eq!(four.len(), 1, "one flow from its two entries: {four:?}");
        let f = &four[0];
        assert_eq!(
            (
                f.source.as_str(),
                f.translated_source.as_str(),
                f.state,
                f.reply_packets
            ),
            ("172.17.0.2:40000", "10.10.0.1:40000", "udp", 0)
        );
        assert!(
            f.mentions("10.10.0.1".parse().unwrap()),
            "the rewritten source"
        );
        assert!(!f.mentions("10.10.0.3".parse().unwrap()));
        assert!(six[0].mentions("2001:db8::1".parse().unwrap()));
        let json = serde_json::to_value(&six[0]).unwrap();
        assert_eq!(json["family"], "ipv6");
        assert_eq!(json["replyBytes"], 150);
        assert_eq!(json["translatedDestination"], "[fd00:ec5:17::3]:80");
    }

    #[test]
    fn the_table_brackets_ipv6_and_shows_only_real_translations() {
        let mut all = conns_of(Family::Ipv4, &masquerade4());
        all.extend(conns_of(Family::Ipv6, &east_west6()));
        let text = render_conns(&all);
        let want = [
            "PROTO  SOURCE              DESTINATION         KIND       STATE           PKTS      BYTES    RPKTS     RBYTES TRANSLATED",
            "udp    172.17.0.2:40000    10.10.0.2:9000      masquerade udp                1        148        0          0 10.10.0.1:40000 -> 10.10.0.2:9000",
            "tcp    [2001:db8::1]:41000 [fd00:ec5:17::3]:80 eastWest   established        3        200        2        150 -",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), want, "{text}");
        assert_eq!(render_conns(&[]).lines().count(), 1, "the header alone");
    }

    #[test]
    fn lines_is_a_number_or_all() {
        assert_eq!(lines("all").unwrap(), Lines(None));
        assert_eq!(lines("0").unwrap(), Lines(Some(0)));
        assert!(lines("-1").is_err() && lines("ten").is_err());
    }
}
