//! Security-group rules as validation leaves them: protocol, ports, CIDRs and group references
//! parsed and checked once, so nothing after `validate` reads a string or guesses a protocol.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ecsnet_common::{
    ct::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    policy::mask_addr,
};

use crate::state::{DefaultPolicy, IpPermission};

/// A CIDR such as `10.0.0.0/8` or `2001:db8::/32` that could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("bad CIDR {text:?}: expected ADDRESS/PREFIX like {example}")]
    NoPrefix { text: String, example: &'static str },
    #[error("bad CIDR {text:?}: {addr:?} is not an {family} address")]
    Address {
        text: String,
        addr: String,
        family: &'static str,
    },
    /// An address of the other family: AWS keeps them apart (`IpRanges`, `Ipv6Ranges`).
    #[error("bad CIDR {text:?}: an {family} CIDR, which goes in {field}")]
    OtherFamily {
        text: String,
        family: &'static str,
        field: &'static str,
    },
    #[error("bad CIDR {text:?}: prefix length must be 0 to {max}")]
    PrefixLength { text: String, max: u8 },
    #[error("bad CIDR {text:?}: host bits set (did you mean {net}/{len}?)")]
    HostBits { text: String, net: IpAddr, len: u8 },
}

/// What tells the two families' CIDRs apart when they are read.
struct Family {
    name: &'static str,
    other: &'static str,
    other_field: &'static str,
    max: u8,
    example: &'static str,
}

const V4: Family = Family {
    name: "IPv4",
    other: "IPv6",
    other_field: "Ipv6Ranges[].CidrIpv6",
    max: 32,
    example: "10.0.0.0/8",
};

const V6: Family = Family {
    name: "IPv6",
    other: "IPv4",
    other_field: "IpRanges[].CidrIp",
    max: 128,
    example: "2001:db8::/32",
};

/// Reads `s` as a CIDR of `family`: its address and prefix length, with no bits set past it
/// (`mask` clears them).
fn parse_cidr<A>(s: &str, family: &Family, mask: impl Fn(A, u8) -> A) -> Result<(A, u8), CidrError>
where
    A: FromStr + Copy + PartialEq + Into<IpAddr>,
{
    let text = || s.to_owned();
    let (addr, len) = s.split_once('/').ok_or_else(|| CidrError::NoPrefix {
        text: text(),
        example: family.example,
    })?;
    let addr: A = addr.parse().map_err(|_| match addr.parse::<IpAddr>() {
        Ok(_) => CidrError::OtherFamily {
            text: text(),
            family: family.other,
            field: family.other_field,
        },
        Err(_) => CidrError::Address {
            text: text(),
            addr: addr.to_owned(),
            family: family.name,
        },
    })?;
    let len = len
        .parse()
        .ok()
        .filter(|len| *len <= family.max)
        .ok_or_else(|| CidrError::PrefixLength {
            text: text(),
            max: family.max,
        })?;
    let net = mask(addr, len);
    if net != addr {
        return Err(CidrError::HostBits {
            text: text(),
            net: net.into(),
            len,
        });
    }
    Ok((net, len))
}

/// An IPv4 network: an address with no bits set past its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    len: u8,
}

impl Ipv4Net {
    /// The network of `addr` (any bits past `len` cleared); None when `len` is over 32.
    pub fn containing(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32).then(|| Self {
            addr: mask_addr(u32::from(addr), len).into(),
            len,
        })
    }
    pub fn addr(self) -> Ipv4Addr {
        self.addr
    }
    pub fn prefix_len(self) -> u8 {
        self.len
    }
    pub fn contains(self, addr: Ipv4Addr) -> bool {
        mask_addr(u32::from(addr), self.len) == u32::from(self.addr)
    }
}

impl FromStr for Ipv4Net {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let mask = |a: Ipv4Addr, len| mask_addr(u32::from(a), len).into();
        parse_cidr(s, &V4, mask).map(|(addr, len)| Self { addr, len })
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `addr` (as a number) with only its first `len` bits, `len` 0 to 128.
pub fn mask_addr128(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

/// An IPv6 network: an address with no bits set past its prefix. Printed as RFC 5952 writes
/// addresses (`2001:db8::/32`, `::/0`), whatever the form it was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6Net {
    addr: Ipv6Addr,
    len: u8,
}

impl Ipv6Net {
    pub fn addr(self) -> Ipv6Addr {
        self.addr
    }
    pub fn prefix_len(self) -> u8 {
        self.len
    }
    pub fn contains(self, addr: Ipv6Addr) -> bool {
        mask_addr128(u128::from(addr), self.len) == u128::from(self.addr)
    }
}

impl FromStr for Ipv6Net {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let mask = |a: Ipv6Addr, len| mask_addr128(u128::from(a), len).into();
        parse_cidr(s, &V6, mask).map(|(addr, len)| Self { addr, len })
    }
}

impl fmt::Display for Ipv6Net {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What is wrong with one rule's protocol, ports or CIDRs (SPEC §6).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("unknown protocol {text:?}: use -1, tcp, udp, icmp, icmpv6 or a number 0-254")]
    Protocol { text: String },
    #[error("port {value} out of range 0-65535")]
    Port { field: &'static str, value: i32 },
    #[error("FromPort {from} is greater than ToPort {to}")]
    Reversed { from: i32, to: i32 },
    #[error("ICMP {what} {value} out of range: use 0 to 255, or -1 for every {what}")]
    Icmp {
        field: &'static str,
        what: &'static str,
        value: i32,
    },
    #[error(
        "ICMP code {code} with every type (FromPort -1): with FromPort -1, ToPort must be -1 too"
    )]
    IcmpCodeWithoutType { code: i32 },
    #[error(transparent)]
    Cidr(#[from] CidrError),
}

impl RuleError {
    /// The field of the permission the error is in.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Protocol { .. } => "IpProtocol",
            Self::Port { field, .. } | Self::Icmp { field, .. } => field,
            Self::Reversed { .. } => "FromPort",
            Self::IcmpCodeWithoutType { .. } => "ToPort",
            Self::Cidr(_) => "CidrIp",
        }
    }
}

/// `ICMPv6`'s protocol number (`IpProtocol` `58` or `icmpv6`).
pub const PROTO_ICMPV6: u8 = 58;

/// `IpProtocol` read: every protocol (`-1`, `all`), or one by name or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpProtocol {
    All,
    Number(u8),
}

impl FromStr for IpProtocol {
    type Err = RuleError;

    fn from_str(p: &str) -> Result<Self, RuleError> {
        match p.to_ascii_lowercase().as_str() {
            "-1" | "all" => Ok(Self::All),
            "tcp" => Ok(Self::Number(PROTO_TCP)),
            "udp" => Ok(Self::Number(PROTO_UDP)),
            "icmp" => Ok(Self::Number(PROTO_ICMP)),
            "icmpv6" => Ok(Self::Number(PROTO_ICMPV6)),
            other => other
                .parse::<u8>()
                .ok()
                .filter(|n| *n != u8::MAX)
                .map(Self::Number)
                .ok_or_else(|| RuleError::Protocol { text: p.to_owned() }),
        }
    }
}

/// A range of TCP or UDP destination ports, `from <= to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ports {
    from: u16,
    to: u16,
}

impl Ports {
    pub fn from(self) -> u16 {
        self.from
    }
    pub fn to(self) -> u16 {
        self.to
    }

    /// `FromPort`/`ToPort` of a TCP or UDP rule; missing ones are the whole range.
    fn of(from: Option<i32>, to: Option<i32>) -> Result<Self, RuleError> {
        let (from, to) = (from.unwrap_or(0), to.unwrap_or(65535));
        let port =
            |field, value: i32| u16::try_from(value).map_err(|_| RuleError::Port { field, value });
        let ports = Self {
            from: port("FromPort", from)?,
            to: port("ToPort", to)?,
        };
        if ports.from > ports.to {
            return Err(RuleError::Reversed { from, to });
        }
        Ok(ports)
    }
}

/// ICMP as AWS reads `FromPort` (the type) and `ToPort` (the code), -1 or missing being every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Icmp {
    All,
    Type(u8),
    Code(u8, u8),
}

impl Icmp {
    fn of(from: Option<i32>, to: Option<i32>) -> Result<Self, RuleError> {
        let (ty, code) = (from.unwrap_or(-1), to.unwrap_or(-1));
        // -1: every one; otherwise a number 0 to 255.
        let read = |field, what, value: i32| match value {
            -1 => Ok(None),
            v => u8::try_from(v).map(Some).map_err(|_| RuleError::Icmp {
                field,
                what,
                value: v,
            }),
        };
        let (ty, code) = (read("FromPort", "type", ty)?, read("ToPort", "code", code)?);
        match (ty, code) {
            (None, None) => Ok(Self::All),
            (None, Some(c)) => Err(RuleError::IcmpCodeWithoutType { code: i32::from(c) }),
            (Some(t), None) => Ok(Self::Type(t)),
            (Some(t), Some(c)) => Ok(Self::Code(t, c)),
        }
    }
}

/// What one rule lets through. ICMP and `ICMPv6` are apart: an `icmp` rule never lets `ICMPv6`
/// through, nor an `icmpv6` one ICMP, as in AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Traffic {
    /// `IpProtocol: "-1"`: every protocol and port.
    All,
    Tcp(Ports),
    Udp(Ports),
    Icmp(Icmp),
    /// `ICMPv6`, its type and code read as ICMP's are.
    Icmpv6(Icmp),
    /// Every packet of one other protocol (not TCP, UDP, ICMP or `ICMPv6`).
    Other(u8),
}

impl Traffic {
    /// The traffic of `protocol` with ports `from`, `to` as a permission gives them.
    pub fn of(protocol: IpProtocol, from: Option<i32>, to: Option<i32>) -> Result<Self, RuleError> {
        Ok(match protocol {
            IpProtocol::All => Self::All,
            IpProtocol::Number(PROTO_TCP) => Self::Tcp(Ports::of(from, to)?),
            IpProtocol::Number(PROTO_UDP) => Self::Udp(Ports::of(from, to)?),
            IpProtocol::Number(PROTO_ICMP) => Self::Icmp(Icmp::of(from, to)?),
            IpProtocol::Number(PROTO_ICMPV6) => Self::Icmpv6(Icmp::of(from, to)?),
            IpProtocol::Number(other) => Self::Other(other),
        })
    }

    /// The traffic of a permission, protocol then ports.
    pub fn of_permission(perm: &IpPermission) -> Result<Self, RuleError> {
        Self::of(perm.ip_protocol.parse()?, perm.from_port, perm.to_port)
    }
}

/// As `sg ls` prints it: `all`, `tcp 80-81`, `udp 53`, `icmp type 8`, `icmpv6 type 128`,
/// `protocol 47`.
impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Self::All => f.write_str("all"),
            Self::Tcp(p) | Self::Udp(p) => {
                let name = if matches!(self, Self::Tcp(_)) {
                    "tcp"
                } else {
                    "udp"
                };
                if p.from == p.to {
                    write!(f, "{name} {}", p.from)
                } else {
                    write!(f, "{name} {}-{}", p.from, p.to)
                }
            }
            Self::Icmp(icmp) | Self::Icmpv6(icmp) => {
                let name = if matches!(self, Self::Icmp(_)) {
                    "icmp"
                } else {
                    "icmpv6"
                };
                match icmp {
                    Icmp::All => write!(f, "{name} all"),
                    Icmp::Type(t) => write!(f, "{name} type {t}"),
                    Icmp::Code(t, c) => write!(f, "{name} type {t} code {c}"),
                }
            }
            Self::Other(p) => write!(f, "protocol {p}"),
        }
    }
}

/// One permission: its traffic from or to its CIDRs and the members of its groups. IPv4
/// CIDRs (`IpRanges`) apply to IPv4 peers only, IPv6 ones (`Ipv6Ranges`) to IPv6 peers only;
/// a group stands for its members' addresses of both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub traffic: Traffic,
    pub cidrs: Vec<Ipv4Net>,
    pub cidrs6: Vec<Ipv6Net>,
    /// Groups referenced, as indexes into [`Rules::groups`].
    pub groups: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
}

/// A task as the rules see it: its addresses and its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub addr: Ipv4Addr,
    /// Its global IPv6 address, when it has one.
    pub addr6: Option<Ipv6Addr>,
    /// Indexes into [`Rules::groups`], in the order of the groups' ids, each once.
    pub groups: Vec<usize>,
}

/// The security groups of a valid state and who is in them: what the plan compiles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub default_policy: DefaultPolicy,
    /// In the state's order.
    pub groups: Vec<Group>,
    /// In the state's order of tasks.
    pub tasks: Vec<Member>,
}

/// An IPv6 CIDR as RFC 5952 writes it (`2001:db8::/32`); as written when it does not read.
pub fn canonical_cidr6(text: &str) -> String {
    text.parse::<Ipv6Net>()
        .map_or_else(|_| text.to_owned(), |n| n.to_string())
}

/// One permission as `sg ls` prints it: `tcp 80-81 from 10.0.0.0/8, 2001:db8::/32, sg-lb`. A
/// permission that does not validate (never one of an applied state) shows its `IpProtocol`
/// as written.
pub fn describe(perm: &IpPermission, inbound: bool) -> String {
    let what =
        Traffic::of_permission(perm).map_or_else(|_| perm.ip_protocol.clone(), |t| t.to_string());
    let v4 = perm.ip_ranges.iter().map(|r| r.cidr_ip.clone());
    let v6 = perm
        .ipv6_ranges
        .iter()
        .map(|r| canonical_cidr6(&r.cidr_ipv6));
    let groups = perm.user_id_group_pairs.iter().map(|g| g.group_id.clone());
    let peers: Vec<String> = v4.chain(v6).chain(groups).collect();
    let dir = if inbound { "from" } else { "to" };
    format!("{what} {dir} {}", peers.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let net = |s: &str| s.parse::<Ipv4Net>().map(|n| (n.addr(), n.prefix_len()));
        assert_eq!(net("10.0.0.0/8"), Ok((Ipv4Addr::new(10, 0, 0, 0), 8)));
        assert_eq!(net("0.0.0.0/0"), Ok((Ipv4Addr::UNSPECIFIED, 0)));
        assert_eq!(
            net("10.0.0.1/8").unwrap_err().to_string(),
            "bad CIDR \"10.0.0.1/8\": host bits set (did you mean 10.0.0.0/8?)"
        );
        assert!(net("10.0.0.0/33").is_err());
        assert!(net("10.0.0.0").is_err());
        assert!(net("10.0.0/8").is_err());
        let n: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!n.contains(Ipv4Addr::new(10, 2, 0, 0)));
        assert_eq!(n.to_string(), "10.1.0.0/16");
    }

    #[test]
    fn ipv6_cidrs() {
        let net = |s: &str| s.parse::<Ipv6Net>().map(|n| (n.addr(), n.prefix_len()));
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(net("::/0"), Ok((Ipv6Addr::UNSPECIFIED, 0)));
        assert_eq!(net("2001:db8::/32"), Ok((v6("2001:db8::"), 32)));
        assert_eq!(net("2001:db8::1/128"), Ok((v6("2001:db8::1"), 128)));
        assert_eq!(net("fd00:ec5:17::/57"), Ok((v6("fd00:ec5:17::"), 57)));
        // Any way of writing it reads; it prints as RFC 5952 writes it.
        let n: Ipv6Net = "2001:0DB8:0000:0000::/32".parse().unwrap();
        assert_eq!(n.to_string(), "2001:db8::/32");
        assert_eq!(
            canonical_cidr6("2001:DB8:0:0:0:0:0:1/128"),
            "2001:db8::1/128"
        );
        assert_eq!(canonical_cidr6("not a cidr"), "not a cidr");
        assert!(n.contains(v6("2001:db8:ffff::1")));
        assert!(!n.contains(v6("2001:db9::")));
        let e = |s: &str| s.parse::<Ipv6Net>().unwrap_err().to_string();
        assert_eq!(
            e("2001:db8::1/32"),
            "bad CIDR \"2001:db8::1/32\": host bits set (did you mean 2001:db8::/32?)"
        );
        assert_eq!(
            e("fd00::80/57"),
            "bad CIDR \"fd00::80/57\": host bits set (did you mean fd00::/57?)"
        );
        assert_eq!(
            e("::/129"),
            "bad CIDR \"::/129\": prefix length must be 0 to 128"
        );
        assert_eq!(
            e("2001:db8::"),
            "bad CIDR \"2001:db8::\": expected ADDRESS/PREFIX like 2001:db8::/32"
        );
        assert_eq!(
            e("2001:db8:::/32"),
            "bad CIDR \"2001:db8:::/32\": \"2001:db8:::\" is not an IPv6 address"
        );
        assert!(net("::/-1").is_err());
        assert!(net("::/x").is_err());
        // Each family in its own field, as AWS keeps them.
        assert_eq!(
            e("10.0.0.0/8"),
            "bad CIDR \"10.0.0.0/8\": an IPv4 CIDR, which goes in IpRanges[].CidrIp"
        );
        assert_eq!(
            "::/0".parse::<Ipv4Net>().unwrap_err().to_string(),
            "bad CIDR \"::/0\": an IPv6 CIDR, which goes in Ipv6Ranges[].CidrIpv6"
        );
        // And IPv4's messages are as they were.
        assert_eq!(
            "10.0.0.0/33".parse::<Ipv4Net>().unwrap_err().to_string(),
            "bad CIDR \"10.0.0.0/33\": prefix length must be 0 to 32"
        );
        assert_eq!(
            "10.0.0/8".parse::<Ipv4Net>().unwrap_err().to_string(),
            "bad CIDR \"10.0.0/8\": \"10.0.0\" is not an IPv4 address"
        );
        assert_eq!(mask_addr128(u128::MAX, 0), 0);
        assert_eq!(mask_addr128(u128::MAX, 128), u128::MAX);
        assert_eq!(mask_addr128(u128::MAX, 1), 1 << 127);
    }

    #[test]
    fn protocols() {
        let p = |s: &str| s.parse::<IpProtocol>();
        assert_eq!(p("-1"), Ok(IpProtocol::All));
        assert_eq!(p("TCP"), Ok(IpProtocol::Number(6)));
        assert_eq!(p("47"), Ok(IpProtocol::Number(47)));
        assert!(p("255").is_err());
        assert!(p("300").is_err());
        assert_eq!(
            p("sctpx").unwrap_err().to_string(),
            "unknown protocol \"sctpx\": use -1, tcp, udp, icmp, icmpv6 or a number 0-254"
        );
        assert_eq!(p("icmpv6"), Ok(IpProtocol::Number(PROTO_ICMPV6)));
        assert_eq!(p("ICMPv6"), p("58"));
    }

    #[test]
    fn traffic_by_protocol() {
        let t = |p: &str, from, to| Traffic::of(p.parse().unwrap(), from, to);
        // A protocol's number is its name: no way round the port checks.
        assert_eq!(t("6", Some(80), Some(81)), t("tcp", Some(80), Some(81)));
        assert_eq!(t("17", None, None).unwrap().to_string(), "udp 0-65535");
        assert_eq!(t("1", Some(8), None), Ok(Traffic::Icmp(Icmp::Type(8))));
        assert_eq!(t("-1", Some(70000), None), Ok(Traffic::All));
        assert_eq!(t("47", Some(-5), None), Ok(Traffic::Other(47)));
        assert_eq!(
            t("tcp", Some(81), Some(80)).unwrap_err().field(),
            "FromPort"
        );
        assert_eq!(
            t("udp", Some(1), Some(65536)).unwrap_err().field(),
            "ToPort"
        );
        assert_eq!(t("icmp", Some(-1), Some(0)).unwrap_err().field(), "ToPort");
        assert_eq!(t("icmp", Some(256), None).unwrap_err().field(), "FromPort");
        // ICMPv6 is ICMP's twin, never ICMP: type and code checked the same way.
        assert_eq!(
            t("58", Some(128), None),
            Ok(Traffic::Icmpv6(Icmp::Type(128)))
        );
        assert_ne!(t("icmpv6", None, None), t("icmp", None, None));
        assert_eq!(
            t("icmpv6", Some(-1), Some(0)).unwrap_err().field(),
            "ToPort"
        );
        assert_eq!(
            t("icmpv6", Some(300), None).unwrap_err().field(),
            "FromPort"
        );
        for (traffic, text) in [
            (t("tcp", Some(80), Some(80)), "tcp 80"),
            (t("icmp", None, None), "icmp all"),
            (t("icmp", Some(3), Some(4)), "icmp type 3 code 4"),
            (t("icmp", Some(0), Some(-1)), "icmp type 0"),
            (t("all", None, None), "all"),
            (t("50", None, None), "protocol 50"),
            (t("icmpv6", None, None), "icmpv6 all"),
            (t("58", Some(128), Some(-1)), "icmpv6 type 128"),
            (t("icmpv6", Some(1), Some(4)), "icmpv6 type 1 code 4"),
        ] {
            assert_eq!(traffic.unwrap().to_string(), text);
        }
    }
}
