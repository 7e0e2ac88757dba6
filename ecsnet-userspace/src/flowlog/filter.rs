//! The `--filter` expressions of `flows tail`: terms over a record's task, interface,
//! addresses (or CIDRs), ports, protocol, action, direction and status, all of which must hold.
//! Pure, like the formats.

use std::net::IpAddr;

use crate::flowlog::format::{Action, FlowDirection, LogStatus, Record};

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

/// An IPv4 or IPv6 network; a plain address is a /32 or a /128. A network of one family never
/// contains an address of the other (`::ffff:10.0.0.1` is not in `10.0.0.0/8`), as AWS keeps
/// `CidrIp` and `CidrIpv6` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    v6: bool,
    /// The network's bits, right-aligned (IPv4 in the low 32).
    net: u128,
    mask: u128,
}

/// An address's family and bits, right-aligned.
fn bits(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u32::from(a).into()),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len.parse::<u32>().ok()?)),
            None => (s, None),
        };
        let (v6, ip) = bits(ip.parse().ok()?);
        let width = if v6 { 128 } else { 32 };
        let len = len.unwrap_or(width);
        if len > width {
            return None;
        }
        let mask = u128::MAX.checked_shl(width - len).unwrap_or(0) & (u128::MAX >> (128 - width));
        Some(Cidr {
            v6,
            net: ip & mask,
            mask,
        })
    }

    fn contains(self, ip: IpAddr) -> bool {
        let (v6, ip) = bits(ip);
        v6 == self.v6 && ip & self.mask == self.net
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
    Action(Action),
    Direction(FlowDirection),
    Status(LogStatus),
}

impl Cond {
    fn holds(&self, r: &Record) -> bool {
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
            Cond::Action(a) => r.action == Some(*a),
            Cond::Direction(d) => r.flow_direction == Some(*d),
            Cond::Status(s) => r.log_status == *s,
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
            .ok_or_else(|| {
                bad(
                    "address",
                    "an IPv4 or IPv6 address or CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32",
                )
            })
    };
    let port = |fields| {
        value
            .parse::<u16>()
            .map(|p| Cond::Port(fields, p))
            .map_err(|_| bad("port", "0 to 65535"))
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
        // Words compare ignoring ASCII case.
        "action" => {
            Cond::Action(Action::from_word(value).ok_or_else(|| bad("action", "accept or reject"))?)
        }
        "direction" | "flow-direction" => Cond::Direction(
            FlowDirection::from_word(value).ok_or_else(|| bad("direction", "ingress or egress"))?,
        ),
        "status" | "log-status" => Cond::Status(
            LogStatus::from_word(value)
                .ok_or_else(|| bad("log status", "ok, nodata or skipdata"))?,
        ),
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
    use crate::flowlog::format::{
        FormatError,
        examples::{aws_example, aws_ipv6_example, nodata, parse_err, refused},
    };

    fn filter(expr: &str) -> Filter {
        match Filter::parse(expr) {
            Ok(f) => f,
            Err(e) => panic!("{expr:?}: {e}"),
        }
    }

    /// Each expression matches `r` or not, as given.
    fn check(r: &Record, cases: &[(&str, bool)]) {
        for (expr, want) in cases {
            assert_eq!(filter(expr).matches(r), *want, "{expr}");
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
    fn empty_filter_matches_everything() {
        for expr in ["", "  ", ",", " and "] {
            check(&aws_example(), &[(expr, true)]);
            check(&nodata(), &[(expr, true)]);
        }
    }

    #[test]
    fn filter_task_by_name_or_id() {
        let r = Record {
            task: Some("web".into()),
            ecs_task_id: Some("0123abcd".into()),
            ..aws_example()
        };
        check(
            &r,
            &[
                ("task=web", true),
                ("TASK=0123abcd", true),
                ("task=db", false),
                ("interface=eni-1235b8ca123456789", true),
                ("interface=eni-other", false),
            ],
        );
        check(&aws_example(), &[("task=web", false), ("task!=web", true)]);
    }

    #[test]
    fn filter_addr_and_cidr() {
        let r = aws_example();
        check(
            &r,
            &[
                ("addr=172.31.16.21", true),
                ("addr=172.31.16.139/32", true),
                ("addr=172.31.0.0/16", true),
                ("addr=172.31.16.200/16", true),
                ("addr=0.0.0.0/0", true),
                ("addr=10.0.0.0/8", false),
                ("srcaddr=172.31.16.139", true),
                ("srcaddr=172.31.16.21", false),
                ("dstaddr=172.31.16.21", true),
                ("pkt-srcaddr=172.31.0.0/16", false),
                ("addr!=10.0.0.0/8", true),
                ("addr!=172.31.16.21", false),
            ],
        );
        let pkt = Record {
            pkt_dstaddr: Some([10, 1, 2, 3].into()),
            ..r
        };
        check(
            &pkt,
            &[("addr=10.1.0.0/16", true), ("pkt-dstaddr=10.1.2.3", true)],
        );
    }

    #[test]
    fn filter_ipv6_addr_and_cidr() {
        let r = aws_ipv6_example();
        check(
            &r,
            &[
                ("addr=2001:db8:1234:a100:8d6e:3477:df66:f105", true),
                ("srcaddr=2001:DB8:1234:A100:8D6E:3477:DF66:F105/128", true),
                ("dstaddr=2001:db8:1234:a102::/64", true),
                ("srcaddr=2001:db8:1234:a102::/64", false),
                ("addr=2001:db8::/32", true),
                ("addr=2001:db8:1234:a1ff::/56", true),
                ("addr=2001:db8:1234:a200::/56", false),
                ("addr=::/0", true),
                ("addr=fd00::/8", false),
                ("addr!=fd00::/8", true),
                ("pkt-srcaddr=::/0", false),
                ("addr=2001:db8:1234:a100::/64 port=22 proto=tcp", true),
            ],
        );
    }

    #[test]
    fn filters_of_one_family_never_match_the_other() {
        let v4 = aws_example();
        let v6 = aws_ipv6_example();
        for (expr, on_v4, on_v6) in [
            ("addr=0.0.0.0/0", true, false),
            ("addr=::/0", false, true),
            ("addr!=0.0.0.0/0", false, true),
            ("addr=172.31.0.0/16", true, false),
            // IPv4 written as IPv6 (mapped, or the old compatible form) is an IPv6 network.
            ("addr=::ffff:172.31.16.139", false, false),
            ("addr=::ffff:0:0/96", false, false),
            ("addr=::/0,port=22", false, true),
            ("addr=0.0.0.0/0 addr=::/0", false, false),
        ] {
            check(&v4, &[(expr, on_v4)]);
            check(&v6, &[(expr, on_v6)]);
        }
        let mapped = Record {
            srcaddr: "::ffff:172.31.16.139".parse().ok(),
            ..aws_ipv6_example()
        };
        check(
            &mapped,
            &[
                ("srcaddr=172.31.16.139", false),
                ("srcaddr=::ffff:172.31.16.139", true),
                ("srcaddr=::ffff:172.31.0.0/112", true),
            ],
        );
    }

    #[test]
    fn filter_port_either_side() {
        check(
            &aws_example(),
            &[
                ("port=22", true),
                ("port=20641", true),
                ("port=80", false),
                ("dstport=22", true),
                ("srcport=22", false),
                ("srcport=20641", true),
                ("port!=22", false),
                ("port!=80", true),
            ],
        );
    }

    #[test]
    fn filter_proto_action_direction_status() {
        let r = Record {
            flow_direction: Some(FlowDirection::Ingress),
            ..aws_example()
        };
        check(
            &r,
            &[
                ("proto=tcp", true),
                ("proto=TCP", true),
                ("protocol=6", true),
                ("proto=udp", false),
                ("proto=icmp", false),
                ("action=accept", true),
                ("action=Accept", true),
                ("action=REJECT", false),
                ("action!=reject", true),
                ("direction=ingress", true),
                ("flow-direction=egress", false),
                ("status=ok", true),
            ],
        );
        let udp = Record {
            protocol: Some(17),
            ..r
        };
        check(&udp, &[("proto=udp", true)]);
        check(
            &nodata(),
            &[("log-status=NoData", true), ("status=skipdata", false)],
        );
    }

    #[test]
    fn none_fields_fail_eq_and_pass_ne() {
        for term in [
            "addr=0.0.0.0/0",
            "port=0",
            "proto=tcp",
            "action=accept",
            "direction=ingress",
            "task=web",
        ] {
            let ne = term.replacen('=', "!=", 1);
            check(&nodata(), &[(term, false), (&ne, true)]);
        }
    }

    #[test]
    fn filter_terms_are_anded() {
        check(
            &aws_example(),
            &[
                ("proto=tcp port=22 action=accept", true),
                ("proto=tcp,port=22, action=accept", true),
                ("proto=tcp and port=22 AND addr=172.31.0.0/16", true),
                ("proto=tcp port=80", false),
                ("port=22,action=reject", false),
                ("port=22,port!=443", true),
            ],
        );
    }

    #[test]
    fn filter_errors_name_the_problem() {
        let err = |s: &str| parse_err(s, Filter::parse);
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
        let (_, msg) = err("dstaddr=2001:db8::/200");
        assert_eq!(
            msg,
            "bad address \"2001:db8::/200\" in filter term \"dstaddr=2001:db8::/200\": expected \
             an IPv4 or IPv6 address or CIDR, e.g. 10.0.0.0/8 or 2001:db8::/32"
        );
        let missing = FilterError::MissingEq {
            term: "port".into(),
        };
        refused(
            "proto=tcp port",
            Filter::parse,
            &missing,
            &["\"port\"", "key=value"],
        );
        for bad in [
            "addr=1.2.3",
            "addr=1.2.3.4/33",
            "addr=2001:db8::/129",
            "addr=2001:db8:::1",
            "addr=2001:db8::/",
            "addr=fe80::1%eth0",
            "addr=[2001:db8::1]",
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
