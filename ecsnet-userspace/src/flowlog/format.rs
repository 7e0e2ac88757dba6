//! Flow-log records in AWS's VPC Flow Logs format: the record, and the `${field}` formats of
//! versions 2 to 8 that render it as text or JSON. Pure: nothing here touches the kernel or the
//! disk.

use std::{borrow::Cow, fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An enum of the fixed words a record or an event carries, each written as its word (in JSON
/// too), read back case-insensitively by `from_word`.
macro_rules! words {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $word)] $variant,)+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $word,)+
                }
            }

            /// The value whose word is `word`, ignoring ASCII case.
            pub fn from_word(word: &str) -> Option<Self> {
                [$(Self::$variant,)+]
                    .into_iter()
                    .find(|v| v.as_str().eq_ignore_ascii_case(word))
            }
        }
    };
}
pub(crate) use words;

words! {
    pub enum Action {
        Accept = "ACCEPT",
        Reject = "REJECT",
    }
}

words! {
    /// Whether a record has flows (`OK`), none (`NODATA`) or lost some (`SKIPDATA`).
    #[derive(Default)]
    pub enum LogStatus {
        #[default]
        Ok = "OK",
        Nodata = "NODATA",
        Skipdata = "SKIPDATA",
    }
}

words! {
    /// Seen from the task: what it sent (`egress`) or received.
    pub enum FlowDirection {
        Ingress = "ingress",
        Egress = "egress",
    }
}

words! {
    pub enum TrafficType {
        Ipv4 = "IPv4",
    }
}

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
    pub action: Option<Action>,
    pub log_status: LogStatus,
    // Version 3.
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    pub instance_id: Option<String>,
    pub tcp_flags: Option<u8>,
    #[serde(rename = "type")]
    pub traffic_type: Option<TrafficType>,
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
    pub flow_direction: Option<FlowDirection>,
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

/// One field's value in a record, before it is printed as text or JSON.
enum Val<'a> {
    Num(u64),
    Str(Cow<'a, str>),
    Missing,
}

fn num<T: Into<u64>>(v: Option<T>) -> Val<'static> {
    v.map_or(Val::Missing, |v| Val::Num(v.into()))
}

fn text(v: Option<&String>) -> Val<'_> {
    v.map_or(Val::Missing, |s| Val::Str(Cow::Borrowed(s)))
}

fn word(v: Option<&'static str>) -> Val<'static> {
    v.map_or(Val::Missing, |s| Val::Str(Cow::Borrowed(s)))
}

fn addr(v: Option<Ipv4Addr>) -> Val<'static> {
    v.map_or(Val::Missing, |a| Val::Str(Cow::Owned(a.to_string())))
}

/// Declares [`Field`] and [`FIELDS`] from one table: each field's name in `${...}`, the format
/// version that introduced it, and its value in record `r` of a format of version `version`.
macro_rules! fields {
    (|$r:ident, $version:ident| $($field:ident $name:literal $since:literal => $value:expr,)+) => {
        /// An AWS flow-log field.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Field {
            $($field,)+
        }

        /// Every AWS field, in AWS's order.
        pub const FIELDS: &[Field] = &[$(Field::$field,)+];

        impl Field {
            /// The field's name in `${...}`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Field::$field => $name,)+
                }
            }

            /// The format version that introduced the field.
            pub fn version(self) -> u8 {
                match self {
                    $(Field::$field => $since,)+
                }
            }

            fn value(self, $r: &Record, $version: u8) -> Val<'_> {
                match self {
                    $(Field::$field => $value,)+
                }
            }
        }
    };
}

fields! { |r, version|
    Version "version" 2 => Val::Num(version.into()),
    AccountId "account-id" 2 => text(r.account_id.as_ref()),
    InterfaceId "interface-id" 2 => text(r.interface_id.as_ref()),
    Srcaddr "srcaddr" 2 => addr(r.srcaddr),
    Dstaddr "dstaddr" 2 => addr(r.dstaddr),
    Srcport "srcport" 2 => num(r.srcport),
    Dstport "dstport" 2 => num(r.dstport),
    Protocol "protocol" 2 => num(r.protocol),
    Packets "packets" 2 => num(r.packets),
    Bytes "bytes" 2 => num(r.bytes),
    Start "start" 2 => Val::Num(r.start),
    End "end" 2 => Val::Num(r.end),
    Action "action" 2 => word(r.action.map(Action::as_str)),
    LogStatus "log-status" 2 => word(Some(r.log_status.as_str())),
    VpcId "vpc-id" 3 => text(r.vpc_id.as_ref()),
    SubnetId "subnet-id" 3 => text(r.subnet_id.as_ref()),
    InstanceId "instance-id" 3 => text(r.instance_id.as_ref()),
    TcpFlags "tcp-flags" 3 => num(r.tcp_flags),
    Type "type" 3 => word(r.traffic_type.map(TrafficType::as_str)),
    PktSrcaddr "pkt-srcaddr" 3 => addr(r.pkt_srcaddr),
    PktDstaddr "pkt-dstaddr" 3 => addr(r.pkt_dstaddr),
    Region "region" 4 => text(r.region.as_ref()),
    AzId "az-id" 4 => text(r.az_id.as_ref()),
    SublocationType "sublocation-type" 4 => text(r.sublocation_type.as_ref()),
    SublocationId "sublocation-id" 4 => text(r.sublocation_id.as_ref()),
    PktSrcAwsService "pkt-src-aws-service" 5 => text(r.pkt_src_aws_service.as_ref()),
    PktDstAwsService "pkt-dst-aws-service" 5 => text(r.pkt_dst_aws_service.as_ref()),
    FlowDirection "flow-direction" 5 => word(r.flow_direction.map(FlowDirection::as_str)),
    TrafficPath "traffic-path" 5 => num(r.traffic_path),
    EcsClusterArn "ecs-cluster-arn" 7 => text(r.ecs_cluster_arn.as_ref()),
    EcsClusterName "ecs-cluster-name" 7 => text(r.ecs_cluster_name.as_ref()),
    EcsContainerInstanceArn "ecs-container-instance-arn" 7 =>
        text(r.ecs_container_instance_arn.as_ref()),
    EcsContainerInstanceId "ecs-container-instance-id" 7 =>
        text(r.ecs_container_instance_id.as_ref()),
    EcsContainerId "ecs-container-id" 7 => text(r.ecs_container_id.as_ref()),
    EcsSecondContainerId "ecs-second-container-id" 7 => text(r.ecs_second_container_id.as_ref()),
    EcsServiceName "ecs-service-name" 7 => text(r.ecs_service_name.as_ref()),
    EcsTaskDefinitionArn "ecs-task-definition-arn" 7 => text(r.ecs_task_definition_arn.as_ref()),
    EcsTaskArn "ecs-task-arn" 7 => text(r.ecs_task_arn.as_ref()),
    EcsTaskId "ecs-task-id" 7 => text(r.ecs_task_id.as_ref()),
    RejectReason "reject-reason" 8 => text(r.reject_reason.as_ref()),
}

impl Field {
    pub fn from_name(name: &str) -> Option<Field> {
        FIELDS.iter().copied().find(|f| f.name() == name)
    }
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
                .copied()
                .filter(|f| f.version() == 2)
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
            match f.value(r, self.version()) {
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
            let v = match f.value(r, self.version()) {
                Val::Num(n) => Value::from(n),
                Val::Str(s) => Value::String(s.into_owned()),
                Val::Missing => Value::Null,
            };
            obj.insert(f.name().to_string(), v);
        }
        Value::Object(obj)
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

/// Records of AWS's documentation, for the tests of the formats and of the filters.
#[cfg(test)]
pub(crate) mod examples {
    use super::*;

    pub fn aws_example() -> Record {
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
            start: 1_418_530_010,
            end: 1_418_530_070,
            action: Some(Action::Accept),
            log_status: LogStatus::Ok,
            ..Record::default()
        }
    }

    pub fn nodata() -> Record {
        Record {
            account_id: Some("123456789010".into()),
            interface_id: Some("eni-1235b8ca123456789".into()),
            start: 1_431_280_876,
            end: 1_431_280_934,
            log_status: LogStatus::Nodata,
            ..Record::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::examples::{aws_example, nodata};
    use super::*;

    fn format(s: &str) -> Format {
        match Format::parse(s) {
            Ok(f) => f,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    #[test]
    fn field_names_read_back() {
        assert_eq!(FIELDS.len(), 40);
        for f in FIELDS {
            assert_eq!(Field::from_name(f.name()), Some(*f));
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
            traffic_type: Some(TrafficType::Ipv4),
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
        assert_eq!(v["start"], 1_418_530_010u64);
        assert_eq!(v["end"], 1_418_530_070u64);
        assert_eq!(v["action"], "ACCEPT");
        assert_eq!(v["log-status"], "OK");
        assert_eq!(v["tcp-flags"], 2);
        assert_eq!(v["traffic-path"], 8);
        assert_eq!(v["pkt-dstaddr"], Value::Null);
        assert_eq!(v["reject-reason"], Value::Null);

        let v = Format::default_v2().to_json(&nodata());
        assert_eq!(v["srcport"], Value::Null);
        assert_eq!(v["action"], Value::Null);
        assert_eq!(v["start"], 1_431_280_876u64);
        assert_eq!(v["log-status"], "NODATA");
    }
}
