//! Flow-log records in AWS's VPC Flow Logs format: the record, and the `${field}` formats of
//! versions 2 to 8 that render it as text or JSON. Pure: nothing here touches the kernel or the
//! disk.

use std::{borrow::Cow, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Enums of the fixed words a record or an event carries, each value written as its word (in
/// JSON too) and read back case-insensitively by `from_word`.
macro_rules! words {
    ($($(#[$meta:meta])* pub enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $word:literal,)+
    })+) => {$(
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
    )+};
}
pub(crate) use words;

words! {
    pub enum Action {
        Accept = "ACCEPT",
        Reject = "REJECT",
    }

    /// Whether a record has flows (`OK`), none (`NODATA`) or lost some (`SKIPDATA`).
    #[derive(Default)]
    pub enum LogStatus {
        #[default]
        Ok = "OK",
        Nodata = "NODATA",
        Skipdata = "SKIPDATA",
    }

    /// Seen from the task: what it sent (`egress`) or received.
    pub enum FlowDirection {
        Ingress = "ingress",
        Egress = "egress",
    }

    /// The address family of a record's flow (AWS also has `EFA`, which ecsnet never sees).
    pub enum TrafficType {
        Ipv4 = "IPv4",
        Ipv6 = "IPv6",
    }
}

/// One field's value in a record, before it is printed as text or JSON.
enum Val<'a> {
    Num(u64),
    Str(Cow<'a, str>),
    Missing,
}

/// How a record's member reads as a field's value; `None` is missing.
trait ToVal {
    fn to_val(&self) -> Val<'_>;
}

impl<T: ToVal> ToVal for Option<T> {
    fn to_val(&self) -> Val<'_> {
        self.as_ref().map_or(Val::Missing, ToVal::to_val)
    }
}

/// Numbers are numbers.
macro_rules! num_vals {
    ($($num:ty),+) => {$(
        impl ToVal for $num {
            fn to_val(&self) -> Val<'_> {
                Val::Num((*self).into())
            }
        }
    )+};
}

num_vals!(u8, u16, u64);

impl ToVal for String {
    fn to_val(&self) -> Val<'_> {
        Val::Str(Cow::Borrowed(self))
    }
}

/// IPv4 as dotted quads, IPv6 as RFC 5952 says (lower case, the longest run of zeros as `::`),
/// which is how AWS prints them.
impl ToVal for IpAddr {
    fn to_val(&self) -> Val<'_> {
        Val::Str(Cow::Owned(self.to_string()))
    }
}

/// The words are text.
macro_rules! word_vals {
    ($($word:ty),+) => {$(
        impl ToVal for $word {
            fn to_val(&self) -> Val<'_> {
                Val::Str(Cow::Borrowed(self.as_str()))
            }
        }
    )+};
}

word_vals!(Action, LogStatus, FlowDirection, TrafficType);

/// Declares [`Record`], [`Field`] and [`FIELDS`] from one table of AWS's fields: each field's
/// variant, its name in `${...}` (and in the journal's JSON), the format version that
/// introduced it, and the record's member that holds it; then ecsnet's own members. `version`
/// is no member: it is the format's.
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct Record {
            $($field:ident $name:literal $since:literal => $(#[$fmeta:meta])* $member:ident: $ty:ty,)+
        }
        ecsnet_own {
            $($(#[$ometa:meta])* $own:ident: $oty:ty,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Record {
            $($(#[$fmeta])* #[serde(rename = $name)] pub $member: $ty,)+
            $($(#[$ometa])* pub $own: $oty,)+
        }

        /// An AWS flow-log field.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Field {
            Version,
            $($field,)+
        }

        /// Every AWS field, in AWS's order.
        pub const FIELDS: &[Field] = &[Field::Version, $(Field::$field,)+];

        impl Field {
            /// The field's name in `${...}`.
            pub fn name(self) -> &'static str {
                match self {
                    Field::Version => "version",
                    $(Field::$field => $name,)+
                }
            }

            /// The format version that introduced the field.
            pub fn version(self) -> u8 {
                match self {
                    Field::Version => 2,
                    $(Field::$field => $since,)+
                }
            }

            /// The field's value in `r`, printed in a format of version `version`.
            fn value(self, r: &Record, version: u8) -> Val<'_> {
                match self {
                    Field::Version => Val::Num(version.into()),
                    $(Field::$field => r.$member.to_val(),)+
                }
            }
        }
    };
}

record! {
    /// One flow-log record with every field AWS defines; `None` prints as `-`. This is also
    /// what the agent keeps in its journal (JSON lines), so `flows tail` can render any format
    /// later.
    pub struct Record {
        AccountId "account-id" 2 => account_id: Option<String>,
        InterfaceId "interface-id" 2 => interface_id: Option<String>,
        Srcaddr "srcaddr" 2 => srcaddr: Option<IpAddr>,
        Dstaddr "dstaddr" 2 => dstaddr: Option<IpAddr>,
        Srcport "srcport" 2 => srcport: Option<u16>,
        Dstport "dstport" 2 => dstport: Option<u16>,
        Protocol "protocol" 2 => protocol: Option<u8>,
        Packets "packets" 2 => packets: Option<u64>,
        Bytes "bytes" 2 => bytes: Option<u64>,
        Start "start" 2 =>
            /// Unix seconds of the first packet (of the window for NODATA and SKIPDATA).
            start: u64,
        End "end" 2 =>
            /// Unix seconds of the last packet (of the window for NODATA and SKIPDATA).
            end: u64,
        Action "action" 2 => action: Option<Action>,
        LogStatus "log-status" 2 => log_status: LogStatus,
        VpcId "vpc-id" 3 => vpc_id: Option<String>,
        SubnetId "subnet-id" 3 => subnet_id: Option<String>,
        InstanceId "instance-id" 3 => instance_id: Option<String>,
        TcpFlags "tcp-flags" 3 => tcp_flags: Option<u8>,
        Type "type" 3 => traffic_type: Option<TrafficType>,
        PktSrcaddr "pkt-srcaddr" 3 => pkt_srcaddr: Option<IpAddr>,
        PktDstaddr "pkt-dstaddr" 3 => pkt_dstaddr: Option<IpAddr>,
        Region "region" 4 => region: Option<String>,
        AzId "az-id" 4 => az_id: Option<String>,
        SublocationType "sublocation-type" 4 => sublocation_type: Option<String>,
        SublocationId "sublocation-id" 4 => sublocation_id: Option<String>,
        PktSrcAwsService "pkt-src-aws-service" 5 => pkt_src_aws_service: Option<String>,
        PktDstAwsService "pkt-dst-aws-service" 5 => pkt_dst_aws_service: Option<String>,
        FlowDirection "flow-direction" 5 => flow_direction: Option<FlowDirection>,
        TrafficPath "traffic-path" 5 => traffic_path: Option<u8>,
        EcsClusterArn "ecs-cluster-arn" 7 => ecs_cluster_arn: Option<String>,
        EcsClusterName "ecs-cluster-name" 7 => ecs_cluster_name: Option<String>,
        EcsContainerInstanceArn "ecs-container-instance-arn" 7 =>
            ecs_container_instance_arn: Option<String>,
        EcsContainerInstanceId "ecs-container-instance-id" 7 =>
            ecs_container_instance_id: Option<String>,
        EcsContainerId "ecs-container-id" 7 => ecs_container_id: Option<String>,
        EcsSecondContainerId "ecs-second-container-id" 7 =>
            ecs_second_container_id: Option<String>,
        EcsServiceName "ecs-service-name" 7 => ecs_service_name: Option<String>,
        EcsTaskDefinitionArn "ecs-task-definition-arn" 7 =>
            ecs_task_definition_arn: Option<String>,
        EcsTaskArn "ecs-task-arn" 7 => ecs_task_arn: Option<String>,
        EcsTaskId "ecs-task-id" 7 => ecs_task_id: Option<String>,
        RejectReason "reject-reason" 8 => reject_reason: Option<String>,
    }
    // Not AWS fields, never printed by a format: for filters and bookkeeping.
    ecsnet_own {
        /// The task's name in the state file.
        #[serde(rename = "ecsnet-task")]
        task: Option<String>,
        /// The capture window (kernel epoch) the record closes.
        #[serde(rename = "ecsnet-window")]
        window: u32,
        /// SKIPDATA: packets that found the flow table full in this window on this interface.
        #[serde(rename = "ecsnet-lost-packets", default)]
        lost_packets: Option<u64>,
    }
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
            srcaddr: Some([172, 31, 16, 139].into()),
            dstaddr: Some([172, 31, 16, 21].into()),
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

    /// AWS's example of IPv6 traffic: SSH to a network interface, allowed.
    pub fn aws_ipv6_example() -> Record {
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().map(IpAddr::V6).ok();
        Record {
            srcaddr: v6("2001:db8:1234:a100:8d6e:3477:df66:f105"),
            dstaddr: v6("2001:db8:1234:a102:3304:8879:34cf:4071"),
            srcport: Some(34892),
            packets: Some(54),
            bytes: Some(8855),
            start: 1_477_913_708,
            end: 1_477_913_820,
            ..aws_example()
        }
    }

    /// A journal line as ecsnet wrote them before IPv6 (a journal outlives an upgrade), and
    /// the record it holds.
    pub const OLD_JOURNAL_LINE: &str = r#"{"account-id":"1","interface-id":null,"srcaddr":"1.2.3.4","dstaddr":null,"srcport":5,"dstport":null,"protocol":null,"packets":null,"bytes":null,"start":7,"end":8,"action":"REJECT","log-status":"SKIPDATA","vpc-id":null,"subnet-id":null,"instance-id":null,"tcp-flags":null,"type":"IPv4","pkt-srcaddr":null,"pkt-dstaddr":null,"region":null,"az-id":null,"sublocation-type":null,"sublocation-id":null,"pkt-src-aws-service":null,"pkt-dst-aws-service":null,"flow-direction":"egress","traffic-path":1,"ecs-cluster-arn":null,"ecs-cluster-name":null,"ecs-container-instance-arn":null,"ecs-container-instance-id":null,"ecs-container-id":null,"ecs-second-container-id":null,"ecs-service-name":null,"ecs-task-definition-arn":null,"ecs-task-arn":null,"ecs-task-id":"t","reject-reason":null,"ecsnet-task":"web","ecsnet-window":3,"ecsnet-lost-packets":9}"#;

    pub fn old_journal_record() -> Record {
        Record {
            account_id: Some("1".into()),
            srcaddr: Some([1, 2, 3, 4].into()),
            srcport: Some(5),
            start: 7,
            end: 8,
            action: Some(Action::Reject),
            log_status: LogStatus::Skipdata,
            traffic_type: Some(TrafficType::Ipv4),
            flow_direction: Some(FlowDirection::Egress),
            traffic_path: Some(1),
            ecs_task_id: Some("t".into()),
            task: Some("web".into()),
            window: 3,
            lost_packets: Some(9),
            ..Record::default()
        }
    }

    /// What parsing `s` failed with, and its message.
    pub fn parse_err<T: std::fmt::Debug, E: Clone + std::fmt::Display>(
        s: &str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> (E, String) {
        match parse(s) {
            Ok(v) => panic!("{s:?} parsed as {v:?}"),
            Err(e) => (e.clone(), e.to_string()),
        }
    }

    /// Checks that `parse` refuses `s` with exactly `want`, and that the message says each of
    /// `says`.
    pub fn refused<
        T: std::fmt::Debug,
        E: Clone + std::fmt::Display + std::fmt::Debug + PartialEq,
    >(
        s: &str,
        parse: impl Fn(&str) -> Result<T, E>,
        want: &E,
        says: &[&str],
    ) {
        let (e, msg) = parse_err(s, parse);
        assert_eq!(&e, want, "{s:?}");
        for needle in says {
            assert!(msg.contains(needle), "{s:?}: {msg} lacks {needle}");
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
    use super::examples::{
        OLD_JOURNAL_LINE, aws_example, aws_ipv6_example, nodata, old_journal_record, parse_err,
        refused,
    };
    use super::*;

    fn format(s: &str) -> Format {
        match Format::parse(s) {
            Ok(f) => f,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    #[test]
    fn journal_lines_keep_their_json() {
        let r = old_journal_record();
        assert_eq!(serde_json::to_string(&r).unwrap(), OLD_JOURNAL_LINE);
        assert_eq!(serde_json::from_str::<Record>(OLD_JOURNAL_LINE).unwrap(), r);
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
    fn default_format_renders_aws_ipv6_example() {
        assert_eq!(
            Format::default_v2().render(&aws_ipv6_example()),
            "2 123456789010 eni-1235b8ca123456789 2001:db8:1234:a100:8d6e:3477:df66:f105 \
             2001:db8:1234:a102:3304:8879:34cf:4071 34892 22 6 54 8855 1477913708 1477913820 \
             ACCEPT OK"
        );
    }

    /// RFC 5952, as AWS prints IPv6: lower case, no leading zeros, the longest run of two or
    /// more zero groups (the first of equal runs) as `::`, never a single zero group.
    #[test]
    fn ipv6_addresses_print_as_rfc_5952_says() {
        let f = format("${srcaddr}");
        for (written, printed) in [
            (
                "2001:0DB8:0000:0000:0001:0000:0000:0001",
                "2001:db8::1:0:0:1",
            ),
            ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"),
            ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),
            ("2001:DB8::AbCd", "2001:db8::abcd"),
            ("fd00:ec2:0:0:0:0:0:254", "fd00:ec2::254"),
            (
                "fe80:0000:0000:0000:0a00:27ff:fe4e:66a1",
                "fe80::a00:27ff:fe4e:66a1",
            ),
            ("0:0:0:0:0:0:0:1", "::1"),
            ("0:0:0:0:0:0:0:0", "::"),
        ] {
            let r = Record {
                srcaddr: written.parse().ok(),
                ..Record::default()
            };
            assert_eq!(f.render(&r), printed, "{written}");
        }
    }

    #[test]
    fn custom_format_renders_ipv6_type_and_packet_addresses() {
        let six = |s: &str| s.parse::<IpAddr>().ok();
        // A published port reached over IPv6 (NAT66): the task sees its own address, the
        // uplink the host's.
        let r = Record {
            srcaddr: six("2001:db8:c::10"),
            dstaddr: six("fd00:dc::2"),
            pkt_srcaddr: six("2001:db8:c::10"),
            pkt_dstaddr: six("2001:db8:a::1"),
            traffic_type: Some(TrafficType::Ipv6),
            flow_direction: Some(FlowDirection::Ingress),
            tcp_flags: Some(2),
            ..aws_ipv6_example()
        };
        let f = format(
            "${version} ${type} ${srcaddr} ${dstaddr} ${pkt-srcaddr} ${pkt-dstaddr} \
             ${flow-direction} ${tcp-flags}",
        );
        assert_eq!(
            f.render(&r),
            "5 IPv6 2001:db8:c::10 fd00:dc::2 2001:db8:c::10 2001:db8:a::1 ingress 2"
        );
        let v = f.to_json(&r);
        assert_eq!(v["type"], "IPv6");
        assert_eq!(v["srcaddr"], "2001:db8:c::10");
        assert_eq!(v["pkt-dstaddr"], "2001:db8:a::1");
        assert_eq!(
            format("${type} ${srcaddr}").render(&Record {
                traffic_type: Some(TrafficType::Ipv4),
                ..aws_example()
            }),
            "IPv4 172.31.16.139",
            "IPv4 stays dotted, never ::ffff:"
        );
    }

    #[test]
    fn ipv6_records_round_trip_through_journal_json() {
        let r = Record {
            traffic_type: Some(TrafficType::Ipv6),
            pkt_srcaddr: "2001:db8::1".parse().ok(),
            pkt_dstaddr: "::ffff:10.0.0.1".parse().ok(),
            ..aws_ipv6_example()
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains(r#""srcaddr":"2001:db8:1234:a100:8d6e:3477:df66:f105""#)
                && line.contains(r#""type":"IPv6""#)
                && line.contains(r#""pkt-srcaddr":"2001:db8::1""#),
            "{line}"
        );
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        assert!(
            back.pkt_dstaddr.is_some_and(|a| a.is_ipv6()),
            "an IPv6 address stays IPv6, mapped or not"
        );
        let old: Record = serde_json::from_str(OLD_JOURNAL_LINE).unwrap();
        assert!(old.srcaddr.is_some_and(|a| a.is_ipv4()));
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
            pkt_srcaddr: Some([10, 0, 0, 1].into()),
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
        let err = |s: &str| parse_err(s, Format::parse);
        let unknown = FormatError::UnknownField {
            name: "bogus".into(),
        };
        refused(
            "${srcaddr} ${bogus}",
            Format::parse,
            &unknown,
            &["\"bogus\"", "VPC Flow Logs"],
        );
        let token = FormatError::BadToken {
            token: "dstaddr".into(),
        };
        refused(
            "${srcaddr} dstaddr",
            Format::parse,
            &token,
            &["\"dstaddr\""],
        );
        for bad in ["${}", "${srcaddr", "{srcaddr}", "${srcaddr}${dstaddr}"] {
            assert!(matches!(err(bad).0, FormatError::BadToken { .. }), "{bad}");
        }
        let twice = FormatError::Duplicate {
            name: "srcaddr".into(),
        };
        let s = "${srcaddr} ${dstaddr} ${srcaddr}";
        refused(s, Format::parse, &twice, &["\"srcaddr\"", "once"]);
        for empty in ["", "  \n\t "] {
            refused(
                empty,
                Format::parse,
                &FormatError::Empty,
                &["at least one field"],
            );
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
