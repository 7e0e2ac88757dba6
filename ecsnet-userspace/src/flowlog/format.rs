//! Flow-log records in AWS's VPC Flow Logs format: the record, the `${field}` formats of
//! versions 2 to 8, text and JSON rendering, and the `--filter` expressions of `flows tail`.
//! Pure: nothing here touches the kernel or the disk.

use std::{borrow::Cow, fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One flow-log record with every field AWS defines; `None` prints as `-`. This is also what the
/// agent keeps in its journal (JSON lines), so `flows tail` can render any format later.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Record {
    // Version 2.
    pub account_id: Option<String>,
    pub interface_id: Option<String>,
    pub srcaddr: Option<Ipv4Addr>,
    pub dstaddr: Option<Ipv4Addr>,
    pub srcport: Option<u16>,
    pub dstport: Option<u16>,
    pub protocol: Option<u8>,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    /// Unix seconds of the first packet (of the window for NODATA and SKIPDATA).
    pub start: u64,
    /// Unix seconds of the last packet (of the window for NODATA and SKIPDATA).
    pub end: u64,
    /// `ACCEPT` or `REJECT`.
    pub action: Option<String>,
    /// `OK`, `NODATA` or `SKIPDATA`.
    pub log_status: String,
    // Version 3.
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    pub instance_id: Option<String>,
    pub tcp_flags: Option<u8>,
    /// `IPv4`.
    #[serde(rename = "type")]
    pub traffic_type: Option<String>,
    pub pkt_srcaddr: Option<Ipv4Addr>,
    pub pkt_dstaddr: Option<Ipv4Addr>,
    // Version 4.
    pub region: Option<String>,
    pub az_id: Option<String>,
    pub sublocation_type: Option<String>,
    pub sublocation_id: Option<String>,
    // Version 5.
    pub pkt_src_aws_service: Option<String>,
    pub pkt_dst_aws_service: Option<String>,
    /// `ingress` or `egress`.
    pub flow_direction: Option<String>,
    pub traffic_path: Option<u8>,
    // Version 7.
    pub ecs_cluster_arn: Option<String>,
    pub ecs_cluster_name: Option<String>,
    pub ecs_container_instance_arn: Option<String>,
    pub ecs_container_instance_id: Option<String>,
    pub ecs_container_id: Option<String>,
    pub ecs_second_container_id: Option<String>,
    pub ecs_service_name: Option<String>,
    pub ecs_task_definition_arn: Option<String>,
    pub ecs_task_arn: Option<String>,
    pub ecs_task_id: Option<String>,
    // Version 8.
    pub reject_reason: Option<String>,
    // ecsnet's own, not AWS fields (never printed by a format): for filters and bookkeeping.
    /// The task's name in the state file.
    #[serde(rename = "ecsnet-task")]
    pub task: Option<String>,
    /// The capture window (kernel epoch) the record closes.
    #[serde(rename = "ecsnet-window")]
    pub window: u32,
    /// SKIPDATA: packets that found the flow table full in this window on this interface.
    #[serde(rename = "ecsnet-lost-packets", default)]
    pub lost_packets: Option<u64>,
}

/// An AWS flow-log field. The discriminant is the field's row in [`FIELDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Version,
    AccountId,
    InterfaceId,
    Srcaddr,
    Dstaddr,
    Srcport,
    Dstport,
    Protocol,
    Packets,
    Bytes,
    Start,
    End,
    Action,
    LogStatus,
    VpcId,
    SubnetId,
    InstanceId,
    TcpFlags,
    Type,
    PktSrcaddr,
    PktDstaddr,
    Region,
    AzId,
    SublocationType,
    SublocationId,
    PktSrcAwsService,
    PktDstAwsService,
    FlowDirection,
    TrafficPath,
    EcsClusterArn,
    EcsClusterName,
    EcsContainerInstanceArn,
    EcsContainerInstanceId,
    EcsContainerId,
    EcsSecondContainerId,
    EcsServiceName,
    EcsTaskDefinitionArn,
    EcsTaskArn,
    EcsTaskId,
    RejectReason,
}

/// Every AWS field: its name in `${...}` and the format version that introduced it.
pub const FIELDS: [(Field, &str, u8); 40] = [
    (Field::Version, "version", 2),
    (Field::AccountId, "account-id", 2),
    (Field::InterfaceId, "interface-id", 2),
    (Field::Srcaddr, "srcaddr", 2),
    (Field::Dstaddr, "dstaddr", 2),
    (Field::Srcport, "srcport", 2),
    (Field::Dstport, "dstport", 2),
    (Field::Protocol, "protocol", 2),
    (Field::Packets, "packets", 2),
    (Field::Bytes, "bytes", 2),
    (Field::Start, "start", 2),
    (Field::End, "end", 2),
    (Field::Action, "action", 2),
    (Field::LogStatus, "log-status", 2),
    (Field::VpcId, "vpc-id", 3),
    (Field::SubnetId, "subnet-id", 3),
    (Field::InstanceId, "instance-id", 3),
    (Field::TcpFlags, "tcp-flags", 3),
    (Field::Type, "type", 3),
    (Field::PktSrcaddr, "pkt-srcaddr", 3),
    (Field::PktDstaddr, "pkt-dstaddr", 3),
    (Field::Region, "region", 4),
    (Field::AzId, "az-id", 4),
    (Field::SublocationType, "sublocation-type", 4),
    (Field::SublocationId, "sublocation-id", 4),
    (Field::PktSrcAwsService, "pkt-src-aws-service", 5),
    (Field::PktDstAwsService, "pkt-dst-aws-service", 5),
    (Field::FlowDirection, "flow-direction", 5),
    (Field::TrafficPath, "traffic-path", 5),
    (Field::EcsClusterArn, "ecs-cluster-arn", 7),
    (Field::EcsClusterName, "ecs-cluster-name", 7),
    (
        Field::EcsContainerInstanceArn,
        "ecs-container-instance-arn",
        7,
    ),
    (
        Field::EcsContainerInstanceId,
        "ecs-container-instance-id",
        7,
    ),
    (Field::EcsContainerId, "ecs-container-id", 7),
    (Field::EcsSecondContainerId, "ecs-second-container-id", 7),
    (Field::EcsServiceName, "ecs-service-name", 7),
    (Field::EcsTaskDefinitionArn, "ecs-task-definition-arn", 7),
    (Field::EcsTaskArn, "ecs-task-arn", 7),
    (Field::EcsTaskId, "ecs-task-id", 7),
    (Field::RejectReason, "reject-reason", 8),
];

impl Field {
    pub fn name(self) -> &'static str {
        FIELDS[self as usize].1
    }

    /// The format version that introduced the field.
    pub fn version(self) -> u8 {
        FIELDS[self as usize].2
    }

    pub fn from_name(name: &str) -> Option<Field> {
        FIELDS
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(f, _, _)| *f)
    }
}

/// One field's value in a record, before it is printed as text or JSON.
enum Val<'a> {
    Num(u64),
    Str(Cow<'a, str>),
    Missing,
}

fn num<T: Into<u64>>(v: Option<T>) -> Val<'static> {
    v.map_or(Val::Missing, |v| Val::Num(v.into()))
}

fn text(v: &Option<String>) -> Val<'_> {
    v.as_deref()
        .map_or(Val::Missing, |s| Val::Str(Cow::Borrowed(s)))
}

fn addr(v: Option<Ipv4Addr>) -> Val<'static> {
    v.map_or(Val::Missing, |a| Val::Str(Cow::Owned(a.to_string())))
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("empty flow-log format: give at least one field, e.g. '${{srcaddr}} ${{dstaddr}}'")]
    Empty,
    #[error(
        "bad flow-log format token {token:?}: write each field as ${{name}}, separated by spaces, \
         e.g. '${{srcaddr}} ${{dstaddr}}'"
    )]
    BadToken { token: String },
    #[error(
        "unknown flow-log field {name:?}: the field names are listed in AWS's VPC Flow Logs \
         documentation and in `ecsnet flows tail --help`"
    )]
    UnknownField { name: String },
    #[error(
        "flow-log field {name:?} appears more than once in the format: give each field once \
         (AWS rejects duplicates too)"
    )]
    Duplicate { name: String },
}

/// A flow-log format: the fields of each line, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    fields: Vec<Field>,
}

impl Format {
    /// Parses AWS's syntax, `${field} ${field} ...`.
    pub fn parse(s: &str) -> Result<Format, FormatError> {
        let mut fields = Vec::new();
        for token in s.split_whitespace() {
            let name = token
                .strip_prefix("${")
                .and_then(|t| t.strip_suffix('}'))
                .filter(|n| !n.is_empty() && !n.contains(['$', '{', '}']))
                .ok_or_else(|| FormatError::BadToken {
                    token: token.to_string(),
                })?;
            let field = Field::from_name(name).ok_or_else(|| FormatError::UnknownField {
                name: name.to_string(),
            })?;
            if fields.contains(&field) {
                return Err(FormatError::Duplicate {
                    name: name.to_string(),
                });
            }
            fields.push(field);
        }
        if fields.is_empty() {
            return Err(FormatError::Empty);
        }
        Ok(Format { fields })
    }

    /// AWS's default format: the 14 version 2 fields.
    pub fn default_v2() -> Format {
        Format {
            fields: FIELDS
                .iter()
                .filter(|(_, _, v)| *v == 2)
                .map(|(f, _, _)| *f)
                .collect(),
        }
    }

    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.fields.iter().map(|f| f.name()).collect()
    }

    /// The highest version among the fields, as AWS defines a custom format's version.
    pub fn version(&self) -> u8 {
        self.fields.iter().map(|f| f.version()).max().unwrap_or(2)
    }

    /// The header line AWS writes at the top of text log files.
    pub fn header(&self) -> String {
        self.names().join(" ")
    }

    /// One log line: the values separated by single spaces, `-` for a missing one.
    pub fn render(&self, r: &Record) -> String {
        let mut line = String::new();
        for (i, f) in self.fields.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            match self.value(*f, r) {
                Val::Num(n) => line.push_str(&n.to_string()),
                Val::Str(s) => line.push_str(&s),
                Val::Missing => line.push('-'),
            }
        }
        line
    }

    /// The record as a JSON object keyed by the format's field names; missing values are null.
    pub fn to_json(&self, r: &Record) -> Value {
        let mut obj = Map::new();
        for f in &self.fields {
            let v = match self.value(*f, r) {
                Val::Num(n) => Value::from(n),
                Val::Str(s) => Value::String(s.into_owned()),
                Val::Missing => Value::Null,
            };
            obj.insert(f.name().to_string(), v);
        }
        Value::Object(obj)
    }

    fn value<'r>(&self, f: Field, r: &'r Record) -> Val<'r> {
        match f {
            Field::Version => Val::Num(self.version().into()),
            Field::AccountId => text(&r.account_id),
            Field::InterfaceId => text(&r.interface_id),
            Field::Srcaddr => addr(r.srcaddr),
            Field::Dstaddr => addr(r.dstaddr),
            Field::Srcport => num(r.srcport),
            Field::Dstport => num(r.dstport),
            Field::Protocol => num(r.protocol),
            Field::Packets => num(r.packets),
            Field::Bytes => num(r.bytes),
            Field::Start => Val::Num(r.start),
            Field::End => Val::Num(r.end),
            Field::Action => text(&r.action),
            Field::LogStatus => Val::Str(Cow::Borrowed(&r.log_status)),
            Field::VpcId => text(&r.vpc_id),
            Field::SubnetId => text(&r.subnet_id),
            Field::InstanceId => text(&r.instance_id),
            Field::TcpFlags => num(r.tcp_flags),
            Field::Type => text(&r.traffic_type),
            Field::PktSrcaddr => addr(r.pkt_srcaddr),
            Field::PktDstaddr => addr(r.pkt_dstaddr),
            Field::Region => text(&r.region),
            Field::AzId => text(&r.az_id),
            Field::SublocationType => text(&r.sublocation_type),
            Field::SublocationId => text(&r.sublocation_id),
            Field::PktSrcAwsService => text(&r.pkt_src_aws_service),
            Field::PktDstAwsService => text(&r.pkt_dst_aws_service),
            Field::FlowDirection => text(&r.flow_direction),
            Field::TrafficPath => num(r.traffic_path),
            Field::EcsClusterArn => text(&r.ecs_cluster_arn),
            Field::EcsClusterName => text(&r.ecs_cluster_name),
            Field::EcsContainerInstanceArn => text(&r.ecs_container_instance_arn),
            Field::EcsContainerInstanceId => text(&r.ecs_container_instance_id),
            Field::EcsContainerId => text(&r.ecs_container_id),
            Field::EcsSecondContainerId => text(&r.ecs_second_container_id),
            Field::EcsServiceName => text(&r.ecs_service_name),
            Field::EcsTaskDefinitionArn => text(&r.ecs_task_definition_arn),
            Field::EcsTaskArn => text(&r.ecs_task_arn),
            Field::EcsTaskId => text(&r.ecs_task_id),
            Field::RejectReason => text(&r.reject_reason),
        }
    }
}

impl Default for Format {
    fn default() -> Self {
        Format::default_v2()
    }
}

/// AWS's syntax, which [`Format::parse`] reads back.
impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "${{{}}}", field.name())?;
        }
        Ok(())
    }
}

const FILTER_KEYS: &str = "task, interface, addr, srcaddr, dstaddr, pkt-srcaddr, pkt-dstaddr, \
                           port, srcport, dstport, proto (protocol), action, \
                           direction (flow-direction), status (log-status)";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("unknown filter key {key:?} in term {term:?}: use one of {FILTER_KEYS}")]
    UnknownKey { key: String, term: String },
    #[error("filter term {term:?} has no `=`: write key=value or key!=value, e.g. port=443")]
    MissingEq { term: String },
    #[error("bad {what} {value:?} in filter term {term:?}: expected {expected}")]
    BadValue {
        what: &'static str,
        value: String,
        term: String,
        expected: &'static str,
    },
}

/// An IPv4 network; a plain address is a /32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: u32,
    mask: u32,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, len.parse::<u8>().ok().filter(|l| *l <= 32)?),
            None => (s, 32),
        };
        let ip: Ipv4Addr = ip.parse().ok()?;
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        Some(Cidr {
            net: u32::from(ip) & mask,
            mask,
        })
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask == self.net
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddrField {
    Src,
    Dst,
    PktSrc,
    PktDst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortField {
    Src,
    Dst,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cond {
    Task(String),
    Interface(String),
    Addr(&'static [AddrField], Cidr),
    Port(&'static [PortField], u16),
    Proto(u8),
    /// Compared ignoring ASCII case, as are the two below.
    Action(&'static str),
    Direction(&'static str),
    Status(&'static str),
}

impl Cond {
    fn holds(&self, r: &Record) -> bool {
        let same = |v: &Option<String>, want: &str| {
            v.as_deref().is_some_and(|v| v.eq_ignore_ascii_case(want))
        };
        match self {
            Cond::Task(t) => {
                r.task.as_deref() == Some(t.as_str())
                    || r.ecs_task_id.as_deref() == Some(t.as_str())
            }
            Cond::Interface(i) => r.interface_id.as_deref() == Some(i.as_str()),
            Cond::Addr(fields, cidr) => fields.iter().any(|f| {
                let a = match f {
                    AddrField::Src => r.srcaddr,
                    AddrField::Dst => r.dstaddr,
                    AddrField::PktSrc => r.pkt_srcaddr,
                    AddrField::PktDst => r.pkt_dstaddr,
                };
                a.is_some_and(|a| cidr.contains(a))
            }),
            Cond::Port(fields, port) => fields.iter().any(|f| {
                let p = match f {
                    PortField::Src => r.srcport,
                    PortField::Dst => r.dstport,
                };
                p == Some(*port)
            }),
            Cond::Proto(p) => r.protocol == Some(*p),
            Cond::Action(a) => same(&r.action, a),
            Cond::Direction(d) => same(&r.flow_direction, d),
            Cond::Status(s) => r.log_status.eq_ignore_ascii_case(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Term {
    cond: Cond,
    negated: bool,
}

/// A `flows tail --filter` expression: terms that must all hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    terms: Vec<Term>,
}

impl Filter {
    /// Parses `key=value` and `key!=value` terms separated by spaces, commas or `and`; an empty
    /// expression matches every record.
    pub fn parse(expr: &str) -> Result<Filter, FilterError> {
        let terms = expr
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("and"))
            .map(parse_term)
            .collect::<Result<_, _>>()?;
        Ok(Filter { terms })
    }

    pub fn matches(&self, r: &Record) -> bool {
        self.terms.iter().all(|t| t.cond.holds(r) != t.negated)
    }
}

fn parse_term(term: &str) -> Result<Term, FilterError> {
    let (key, value) = term.split_once('=').ok_or_else(|| FilterError::MissingEq {
        term: term.to_string(),
    })?;
    let (key, negated) = match key.strip_suffix('!') {
        Some(k) => (k, true),
        None => (key, false),
    };
    let bad = |what, expected| FilterError::BadValue {
        what,
        value: value.to_string(),
        term: term.to_string(),
        expected,
    };
    let cidr = |fields| {
        Cidr::parse(value)
            .map(|c| Cond::Addr(fields, c))
            .ok_or_else(|| bad("address", "an IPv4 address or CIDR, e.g. 10.0.0.0/8"))
    };
    let port = |fields| {
        value
            .parse::<u16>()
            .map(|p| Cond::Port(fields, p))
            .map_err(|_| bad("port", "0 to 65535"))
    };
    let word = |what, expected, words: &[&'static str]| {
        words
            .iter()
            .find(|w| w.eq_ignore_ascii_case(value))
            .copied()
            .ok_or_else(|| bad(what, expected))
    };
    let cond = match key.to_ascii_lowercase().as_str() {
        "task" | "interface" if value.is_empty() => {
            return Err(bad(
                "value",
                "a task name or ID for task=, an interface ID for interface=",
            ));
        }
        "task" => Cond::Task(value.to_string()),
        "interface" => Cond::Interface(value.to_string()),
        "addr" => cidr(&[
            AddrField::Src,
            AddrField::Dst,
            AddrField::PktSrc,
            AddrField::PktDst,
        ])?,
        "srcaddr" => cidr(&[AddrField::Src])?,
        "dstaddr" => cidr(&[AddrField::Dst])?,
        "pkt-srcaddr" => cidr(&[AddrField::PktSrc])?,
        "pkt-dstaddr" => cidr(&[AddrField::PktDst])?,
        "port" => port(&[PortField::Src, PortField::Dst])?,
        "srcport" => port(&[PortField::Src])?,
        "dstport" => port(&[PortField::Dst])?,
        "proto" | "protocol" => Cond::Proto(match value.to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            n => n
                .parse()
                .map_err(|_| bad("protocol", "tcp, udp, icmp or a number 0 to 255"))?,
        }),
        "action" => Cond::Action(word("action", "accept or reject", &["ACCEPT", "REJECT"])?),
        "direction" | "flow-direction" => Cond::Direction(word(
            "direction",
            "ingress or egress",
            &["ingress", "egress"],
        )?),
        "status" | "log-status" => Cond::Status(word(
            "log status",
            "ok, nodata or skipdata",
            &["OK", "NODATA", "SKIPDATA"],
        )?),
        _ => {
            return Err(FilterError::UnknownKey {
                key: key.to_string(),
                term: term.to_string(),
            });
        }
    };
    Ok(Term { cond, negated })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aws_example() -> Record {
        Record {
            account_id: Some("123456789010".into()),
            interface_id: Some("eni-1235b8ca123456789".into()),
            srcaddr: Some(Ipv4Addr::new(172, 31, 16, 139)),
            dstaddr: Some(Ipv4Addr::new(172, 31, 16, 21)),
            srcport: Some(20641),
            dstport: Some(22),
            protocol: Some(6),
            packets: Some(20),
            bytes: Some(4249),
            start: 1418530010,
            end: 1418530070,
            action: Some("ACCEPT".into()),
            log_status: "OK".into(),
            ..Record::default()
        }
    }

    fn nodata() -> Record {
        Record {
            account_id: Some("123456789010".into()),
            interface_id: Some("eni-1235b8ca123456789".into()),
            start: 1431280876,
            end: 1431280934,
            log_status: "NODATA".into(),
            ..Record::default()
        }
    }

    fn filter(expr: &str) -> Filter {
        match Filter::parse(expr) {
            Ok(f) => f,
            Err(e) => panic!("{expr:?}: {e}"),
        }
    }

    fn format(s: &str) -> Format {
        match Format::parse(s) {
            Ok(f) => f,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    #[test]
    fn field_table_rows_follow_the_enum() {
        for (i, (f, name, _)) in FIELDS.iter().enumerate() {
            assert_eq!(*f as usize, i, "{name}");
            assert_eq!(Field::from_name(name), Some(*f));
        }
        assert_eq!(Field::RejectReason.version(), 8);
        assert_eq!(Field::from_name("nope"), None);
    }

    #[test]
    fn default_format_renders_aws_example() {
        let f = Format::default();
        assert_eq!(f, Format::default_v2());
        assert_eq!(f.fields().len(), 14);
        assert_eq!(f.version(), 2);
        assert_eq!(
            f.render(&aws_example()),
            "2 123456789010 eni-1235b8ca123456789 172.31.16.139 172.31.16.21 20641 22 6 20 4249 \
             1418530010 1418530070 ACCEPT OK"
        );
        assert_eq!(
            f.header(),
            "version account-id interface-id srcaddr dstaddr srcport dstport protocol packets \
             bytes start end action log-status"
        );
    }

    #[test]
    fn nodata_renders_dashes() {
        assert_eq!(
            Format::default_v2().render(&nodata()),
            "2 123456789010 eni-1235b8ca123456789 - - - - - - - 1431280876 1431280934 - NODATA"
        );
    }

    #[test]
    fn version_is_highest_field_version() {
        assert_eq!(format("${srcaddr} ${dstaddr} ${action}").version(), 2);
        assert_eq!(format("${srcaddr} ${tcp-flags} ${az-id}").version(), 4);
        assert_eq!(format("${flow-direction}").version(), 5);
        assert_eq!(format("${srcaddr} ${ecs-task-id} ${vpc-id}").version(), 7);
        assert_eq!(format("${reject-reason} ${ecs-cluster-name}").version(), 8);
    }

    #[test]
    fn version_field_prints_format_version() {
        let r = Record {
            ecs_task_id: Some("abc".into()),
            ..aws_example()
        };
        assert_eq!(format("${version} ${ecs-task-id}").render(&r), "7 abc");
        assert_eq!(format("${version}\t${srcport}\n").render(&r), "2 20641");
    }

    #[test]
    fn custom_format_renders_v3_to_v8_fields() {
        let r = Record {
            tcp_flags: Some(19),
            traffic_type: Some("IPv4".into()),
            pkt_srcaddr: Some(Ipv4Addr::new(10, 0, 0, 1)),
            traffic_path: Some(1),
            reject_reason: Some("BPA".into()),
            ..aws_example()
        };
        let f = format(
            "${type} ${pkt-srcaddr} ${pkt-dstaddr} ${tcp-flags} ${traffic-path} ${reject-reason}",
        );
        assert_eq!(f.render(&r), "IPv4 10.0.0.1 - 19 1 BPA");
        assert_eq!(
            f.header(),
            "type pkt-srcaddr pkt-dstaddr tcp-flags traffic-path reject-reason"
        );
    }

    #[test]
    fn display_round_trips() {
        let f = format("${srcaddr}   ${ecs-task-arn} ${start}");
        assert_eq!(f.to_string(), "${srcaddr} ${ecs-task-arn} ${start}");
        assert_eq!(Format::parse(&f.to_string()), Ok(f));
    }

    #[test]
    fn format_errors_name_the_problem() {
        let err = |s: &str| match Format::parse(s) {
            Ok(f) => panic!("{s:?} parsed as {f:?}"),
            Err(e) => (e.clone(), e.to_string()),
        };
        let (e, msg) = err("${srcaddr} ${bogus}");
        assert_eq!(
            e,
            FormatError::UnknownField {
                name: "bogus".into()
            }
        );
        assert!(
            msg.contains("\"bogus\"") && msg.contains("VPC Flow Logs"),
            "{msg}"
        );
        let (e, msg) = err("${srcaddr} dstaddr");
        assert_eq!(
            e,
            FormatError::BadToken {
                token: "dstaddr".into()
            }
        );
        assert!(msg.contains("\"dstaddr\""), "{msg}");
        for bad in ["${}", "${srcaddr", "{srcaddr}", "${srcaddr}${dstaddr}"] {
            assert!(matches!(err(bad).0, FormatError::BadToken { .. }), "{bad}");
        }
        let (e, msg) = err("${srcaddr} ${dstaddr} ${srcaddr}");
        assert_eq!(
            e,
            FormatError::Duplicate {
                name: "srcaddr".into()
            }
        );
        assert!(msg.contains("\"srcaddr\"") && msg.contains("once"), "{msg}");
        for empty in ["", "  \n\t "] {
            let (e, msg) = err(empty);
            assert_eq!(e, FormatError::Empty);
            assert!(msg.contains("at least one field"), "{msg}");
        }
    }

    #[test]
    fn errors_are_one_line() {
        let msgs = [
            FormatError::Empty.to_string(),
            FormatError::BadToken { token: "x".into() }.to_string(),
            FormatError::UnknownField { name: "x".into() }.to_string(),
            FormatError::Duplicate { name: "x".into() }.to_string(),
            Filter::parse("x=1").unwrap_err().to_string(),
            Filter::parse("x").unwrap_err().to_string(),
            Filter::parse("port=x").unwrap_err().to_string(),
        ];
        for m in msgs {
            assert!(!m.contains('\n') && !m.contains("  "), "{m:?}");
        }
    }

    #[test]
    fn json_has_typed_values_and_nulls() {
        let f = format(
            "${version} ${interface-id} ${srcaddr} ${srcport} ${dstport} ${protocol} ${packets} \
             ${bytes} ${start} ${end} ${action} ${log-status} ${tcp-flags} ${traffic-path} \
             ${pkt-dstaddr} ${reject-reason}",
        );
        let r = Record {
            tcp_flags: Some(2),
            traffic_path: Some(8),
            ..aws_example()
        };
        let v = f.to_json(&r);
        let Some(obj) = v.as_object() else {
            panic!("not an object: {v}");
        };
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut names = f.names();
        keys.sort_unstable();
        names.sort_unstable();
        assert_eq!(keys, names);
        assert_eq!(v["version"], 8);
        assert_eq!(v["interface-id"], "eni-1235b8ca123456789");
        assert_eq!(v["srcaddr"], "172.31.16.139");
        assert_eq!(v["srcport"], 20641);
        assert_eq!(v["dstport"], 22);
        assert_eq!(v["protocol"], 6);
        assert_eq!(v["packets"], 20);
        assert_eq!(v["bytes"], 4249);
        assert_eq!(v["start"], 1418530010u64);
        assert_eq!(v["end"], 1418530070u64);
        assert_eq!(v["action"], "ACCEPT");
        assert_eq!(v["log-status"], "OK");
        assert_eq!(v["tcp-flags"], 2);
        assert_eq!(v["traffic-path"], 8);
        assert_eq!(v["pkt-dstaddr"], Value::Null);
        assert_eq!(v["reject-reason"], Value::Null);

        let v = Format::default_v2().to_json(&nodata());
        assert_eq!(v["srcport"], Value::Null);
        assert_eq!(v["action"], Value::Null);
        assert_eq!(v["start"], 1431280876u64);
        assert_eq!(v["log-status"], "NODATA");
    }

    #[test]
    fn empty_filter_matches_everything() {
        for expr in ["", "  ", ",", " and "] {
            let f = filter(expr);
            assert!(
                f.matches(&aws_example()) && f.matches(&nodata()),
                "{expr:?}"
            );
        }
    }

    #[test]
    fn filter_task_by_name_or_id() {
        let r = Record {
            task: Some("web".into()),
            ecs_task_id: Some("0123abcd".into()),
            ..aws_example()
        };
        assert!(filter("task=web").matches(&r));
        assert!(filter("TASK=0123abcd").matches(&r));
        assert!(!filter("task=db").matches(&r));
        assert!(!filter("task=web").matches(&aws_example()));
        assert!(filter("task!=web").matches(&aws_example()));
        assert!(filter("interface=eni-1235b8ca123456789").matches(&r));
        assert!(!filter("interface=eni-other").matches(&r));
    }

    #[test]
    fn filter_addr_and_cidr() {
        let r = aws_example();
        assert!(filter("addr=172.31.16.21").matches(&r));
        assert!(filter("addr=172.31.16.139/32").matches(&r));
        assert!(filter("addr=172.31.0.0/16").matches(&r));
        assert!(filter("addr=172.31.16.200/16").matches(&r));
        assert!(filter("addr=0.0.0.0/0").matches(&r));
        assert!(!filter("addr=10.0.0.0/8").matches(&r));
        assert!(filter("srcaddr=172.31.16.139").matches(&r));
        assert!(!filter("srcaddr=172.31.16.21").matches(&r));
        assert!(filter("dstaddr=172.31.16.21").matches(&r));
        assert!(!filter("pkt-srcaddr=172.31.0.0/16").matches(&r));
        let pkt = Record {
            pkt_dstaddr: Some(Ipv4Addr::new(10, 1, 2, 3)),
            ..r.clone()
        };
        assert!(filter("addr=10.1.0.0/16").matches(&pkt));
        assert!(filter("pkt-dstaddr=10.1.2.3").matches(&pkt));
        assert!(filter("addr!=10.0.0.0/8").matches(&r));
        assert!(!filter("addr!=172.31.16.21").matches(&r));
    }

    #[test]
    fn filter_port_either_side() {
        let r = aws_example();
        assert!(filter("port=22").matches(&r));
        assert!(filter("port=20641").matches(&r));
        assert!(!filter("port=80").matches(&r));
        assert!(filter("dstport=22").matches(&r));
        assert!(!filter("srcport=22").matches(&r));
        assert!(filter("srcport=20641").matches(&r));
        assert!(!filter("port!=22").matches(&r));
        assert!(filter("port!=80").matches(&r));
    }

    #[test]
    fn filter_proto_action_direction_status() {
        let r = Record {
            flow_direction: Some("ingress".into()),
            ..aws_example()
        };
        assert!(filter("proto=tcp").matches(&r));
        assert!(filter("proto=TCP").matches(&r));
        assert!(filter("protocol=6").matches(&r));
        assert!(!filter("proto=udp").matches(&r));
        assert!(!filter("proto=icmp").matches(&r));
        assert!(filter("proto=udp").matches(&Record {
            protocol: Some(17),
            ..r.clone()
        }));
        assert!(filter("action=accept").matches(&r));
        assert!(filter("action=Accept").matches(&r));
        assert!(!filter("action=REJECT").matches(&r));
        assert!(filter("action!=reject").matches(&r));
        assert!(filter("direction=ingress").matches(&r));
        assert!(!filter("flow-direction=egress").matches(&r));
        assert!(filter("status=ok").matches(&r));
        assert!(filter("log-status=NoData").matches(&nodata()));
        assert!(!filter("status=skipdata").matches(&nodata()));
    }

    #[test]
    fn none_fields_fail_eq_and_pass_ne() {
        let r = nodata();
        for term in [
            "addr=0.0.0.0/0",
            "port=0",
            "proto=tcp",
            "action=accept",
            "direction=ingress",
            "task=web",
        ] {
            assert!(!filter(term).matches(&r), "{term}");
            let ne = term.replacen('=', "!=", 1);
            assert!(filter(&ne).matches(&r), "{ne}");
        }
    }

    #[test]
    fn filter_terms_are_anded() {
        let r = aws_example();
        assert!(filter("proto=tcp port=22 action=accept").matches(&r));
        assert!(filter("proto=tcp,port=22, action=accept").matches(&r));
        assert!(filter("proto=tcp and port=22 AND addr=172.31.0.0/16").matches(&r));
        assert!(!filter("proto=tcp port=80").matches(&r));
        assert!(!filter("port=22,action=reject").matches(&r));
        assert!(filter("port=22,port!=443").matches(&r));
    }

    #[test]
    fn filter_errors_name_the_problem() {
        let err = |s: &str| match Filter::parse(s) {
            Ok(f) => panic!("{s:?} parsed as {f:?}"),
            Err(e) => (e.clone(), e.to_string()),
        };
        let (e, msg) = err("port=22 colour=red");
        assert!(matches!(e, FilterError::UnknownKey { .. }), "{e:?}");
        assert!(
            msg.contains("\"colour\"") && msg.contains("task") && msg.contains("status"),
            "{msg}"
        );
        let (_, msg) = err("port=x");
        assert_eq!(
            msg,
            "bad port \"x\" in filter term \"port=x\": expected 0 to 65535"
        );
        assert!(matches!(err("port=65536").0, FilterError::BadValue { .. }));
        let (e, msg) = err("proto=tcp port");
        assert_eq!(
            e,
            FilterError::MissingEq {
                term: "port".into()
            }
        );
        assert!(
            msg.contains("\"port\"") && msg.contains("key=value"),
            "{msg}"
        );
        for bad in [
            "addr=1.2.3",
            "addr=1.2.3.4/33",
            "srcaddr=x/8",
            "proto=256",
            "proto=sctp",
            "action=drop",
            "direction=in",
            "status=fine",
            "task=",
        ] {
            assert!(matches!(err(bad).0, FilterError::BadValue { .. }), "{bad}");
        }
    }
}
