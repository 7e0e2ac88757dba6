//! What ecsnet is given: the state file (SPEC §4), SG files and `--ct-timeouts`, parsed with a
//! JSON path in every error and validated into typed rules. Nothing here reads host or kernel.

mod parse;
pub(crate) mod rules;
pub(crate) mod sgfile;
pub(crate) mod timeouts;
mod validate;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ecsnet_common::ct::{PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

pub use parse::{MAX_FILE_BYTES, MAX_STRING_BYTES, ReadError, parse, read_limited};
use rules::{Ipv4Net, RuleError};
pub use validate::{task_ipv6, validate};

/// An error in a state or SG file, located by its JSON path (`$.tasks[1].ipv4Address`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {problem}")]
pub struct StateError {
    pub path: String,
    pub problem: Problem,
}

impl StateError {
    fn at(path: impl Into<String>, problem: impl Into<Problem>) -> Self {
        Self {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

/// What is wrong at the path of a [`StateError`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Problem {
    /// Malformed JSON or a value of the wrong type, in `serde_json`'s words (with line and
    /// column).
    #[error("{0}")]
    Json(String),
    #[error("file larger than {} MiB, the most ecsnet reads", MAX_FILE_BYTES >> 20)]
    FileTooLarge,
    #[error("string of {len} bytes, longer than the {MAX_STRING_BYTES} ecsnet accepts")]
    StringTooLong { len: usize },
    #[error("bad range [{lo}, {hi}]: need 1 <= first <= last <= 65535")]
    EphemeralPorts { lo: u16, hi: u16 },
    #[error("empty GroupId")]
    EmptyGroupId,
    #[error("security group {id:?} is defined twice (also $.securityGroups[{first}])")]
    DuplicateGroup { id: String, first: usize },
    #[error("unknown security group {id:?}")]
    UnknownGroup { id: String },
    #[error("prefix lists are not supported yet: list their CIDRs in IpRanges")]
    PrefixLists,
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("empty task name")]
    EmptyTaskName,
    #[error("task name {name:?} is also used by $.tasks[{other}]")]
    DuplicateName { name: String, other: usize },
    #[error("address {addr} is also used by $.tasks[{other}]")]
    DuplicateAddress { addr: IpAddr, other: usize },
    #[error("{addr} is not an address a task can have: {why}")]
    BadIpv6 { addr: Ipv6Addr, why: &'static str },
    #[error("address {addr} is not a task address in the bridge subnet {net}")]
    OutsideBridge { addr: Ipv4Addr, net: Ipv4Net },
    #[error("port 0 out of range 1-65535")]
    ContainerPortZero,
    #[error("bad MAC address {mac:?}: expected a unicast MAC like 02:42:ac:11:00:02")]
    BadMac { mac: String },
    #[error(
        "host port {port}/{}{} is already published by $.tasks[{other}] ({name})",
        protocol.as_str(),
        match on {
            PortFamily::Both => "",
            PortFamily::Ipv4 => " on IPv4",
            PortFamily::Ipv6 => " on IPv6",
        }
    )]
    HostPortTaken {
        port: u16,
        protocol: Protocol,
        /// The families both publish it on.
        on: PortFamily,
        other: usize,
        name: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: {error}")]
    Invalid { file: String, error: StateError },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Allow,
    Deny,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// Splits a `PORTS[/tcp|/udp]` spec (as in `--publish`) into its ports and protocol;
    /// tcp when no protocol is given. Err carries the unknown protocol.
    pub fn split_suffix(spec: &str) -> Result<(&str, Protocol), String> {
        match spec.rsplit_once('/') {
            Some((p, "tcp")) => Ok((p, Self::Tcp)),
            Some((p, "udp")) => Ok((p, Self::Udp)),
            Some((_, other)) => Err(other.to_owned()),
            None => Ok((spec, Self::Tcp)),
        }
    }

    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

fn default_ephemeral() -> [u16; 2] {
    [49153, 65535]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Flow-log fields of the instance (`vpc-id`, `subnet-id`, `region`, `az-id`,
    /// `ecs-container-instance-arn`); region also comes from task ARNs when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub az_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_instance_arn: Option<String>,
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    #[serde(default)]
    pub block_instance_metadata: bool,
    #[serde(default = "default_ephemeral")]
    pub ephemeral_ports: [u16; 2],
    /// How Docker's bridge gives tasks IPv6 (`gateway_mode_ipv6`): `nat` (the default) publishes
    /// ports on the host's IPv6 addresses through NAT66; `routed` publishes none there (clients
    /// reach the tasks' own addresses), so ecsnet translates none either.
    #[serde(default, skip_serializing_if = "Ipv6Mode::is_nat")]
    pub ipv6_mode: Ipv6Mode,
}

/// [`Host::ipv6_mode`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ipv6Mode {
    #[default]
    Nat,
    Routed,
}

impl Ipv6Mode {
    #[must_use]
    pub fn is_nat(&self) -> bool {
        *self == Self::Nat
    }
}

impl Default for Host {
    fn default() -> Self {
        Self {
            uplink: None,
            bridge: None,
            account_id: None,
            instance_id: None,
            cluster: None,
            vpc_id: None,
            subnet_id: None,
            region: None,
            az_id: None,
            container_instance_arn: None,
            default_policy: DefaultPolicy::Allow,
            block_instance_metadata: false,
            ephemeral_ports: default_ephemeral(),
            ipv6_mode: Ipv6Mode::Nat,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpRange {
    #[serde(rename = "CidrIp")]
    pub cidr_ip: String,
    #[serde(
        rename = "Description",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<String>,
}

/// One of a permission's `Ipv6Ranges`: an IPv6 CIDR, for IPv6 peers only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Range {
    #[serde(rename = "CidrIpv6")]
    pub cidr_ipv6: String,
    #[serde(
        rename = "Description",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub description: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPair {
    #[serde(rename = "GroupId")]
    pub group_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpPermission {
    pub ip_protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_ranges: Vec<IpRange>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_id_group_pairs: Vec<GroupPair>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_list_ids: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6_ranges: Vec<Ipv6Range>,
}

impl IpPermission {
    /// A rule for `proto` (`tcp`, `udp`, `icmp`, `-1`), ports `from..=to` (None: all), from or
    /// to one IPv4 CIDR: the shape generated states (the benchmarks') need.
    pub fn from_cidr(proto: &str, ports: Option<(i32, i32)>, cidr: impl Into<String>) -> Self {
        IpPermission {
            ip_protocol: proto.to_owned(),
            from_port: ports.map(|p| p.0),
            to_port: ports.map(|p| p.1),
            ip_ranges: vec![IpRange {
                cidr_ip: cidr.into(),
                description: None,
            }],
            user_id_group_pairs: Vec::new(),
            prefix_list_ids: Vec::new(),
            ipv6_ranges: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SecurityGroup {
    pub group_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
    #[serde(default)]
    pub ip_permissions: Vec<IpPermission>,
    #[serde(default)]
    pub ip_permissions_egress: Vec<IpPermission>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub container_port: u16,
    /// 0: dynamic, chosen from `host.ephemeralPorts`.
    #[serde(default)]
    pub host_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// The families the port is published on, as ECS task metadata and `docker inspect` give
    /// the binding's host address: `hostIp` "0.0.0.0" IPv4 only, "::" IPv6 only, none both.
    #[serde(default, skip_serializing_if = "PortFamily::is_both")]
    pub host_ip: PortFamily,
}

/// The address families a port is published on. Docker publishes `-p 8080:80` on both (its
/// `0.0.0.0` and `::` bindings), `-p 0.0.0.0:8080:80` on IPv4 only and `-p [::]:8080:80` on
/// IPv6 only. ecsnet publishes a port on every host address of a family, so a binding on one
/// address (`127.0.0.1`) is not one it can hold: the state file refuses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortFamily {
    /// No `hostIp` (or Docker's empty one): IPv4 and IPv6.
    #[default]
    Both,
    /// `hostIp` "0.0.0.0".
    Ipv4,
    /// `hostIp` "::".
    Ipv6,
}

impl PortFamily {
    /// Serde's `skip_serializing_if` passes a reference.
    pub fn is_both(&self) -> bool {
        *self == Self::Both
    }
    pub fn has_ipv4(self) -> bool {
        self != Self::Ipv6
    }
    pub fn has_ipv6(self) -> bool {
        self != Self::Ipv4
    }
    /// Each single family this covers: `Ipv4`, `Ipv6` or both of them.
    pub fn singles(self) -> &'static [PortFamily] {
        match self {
            Self::Both => &[Self::Ipv4, Self::Ipv6],
            Self::Ipv4 => &[Self::Ipv4],
            Self::Ipv6 => &[Self::Ipv6],
        }
    }
    /// The family of a Docker binding's host address: `""` both, `0.0.0.0`, `::`; None for
    /// one address, or text that is no address.
    pub fn of_host_ip(host_ip: &str) -> Option<Self> {
        match host_ip {
            "" => Some(Self::Both),
            ip => match ip.parse::<IpAddr>().ok()? {
                IpAddr::V4(a) if a.is_unspecified() => Some(Self::Ipv4),
                IpAddr::V6(a) if a.is_unspecified() => Some(Self::Ipv6),
                _ => None,
            },
        }
    }
    /// The host address as Docker prints it before a port (`docker ps`): `0.0.0.0:`, `[::]:`,
    /// nothing for both.
    pub fn docker_prefix(self) -> &'static str {
        match self {
            Self::Both => "",
            Self::Ipv4 => "0.0.0.0:",
            Self::Ipv6 => "[::]:",
        }
    }
    /// The `hostIp` of the state file; None for both.
    pub fn host_ip(self) -> Option<&'static str> {
        match self {
            Self::Both => None,
            Self::Ipv4 => Some("0.0.0.0"),
            Self::Ipv6 => Some("::"),
        }
    }
}

impl Serialize for PortFamily {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.host_ip() {
            Some(ip) => s.serialize_str(ip),
            None => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for PortFamily {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(Self::Both);
        };
        Self::of_host_ip(&text).ok_or_else(|| {
            let what = if text.parse::<IpAddr>().is_ok() {
                "a single host address, which ecsnet cannot publish on (it publishes a port on \
                 every address of a family)"
            } else {
                "not an IP address"
            };
            serde::de::Error::custom(format!(
                "hostIp {text:?} is {what}: give \"0.0.0.0\" (IPv4 only), \"::\" (IPv6 only), \
                 or no hostIp (both)"
            ))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_arn: Option<String>,
    pub name: String,
    pub ipv4_address: Ipv4Addr,
    /// The task's global IPv6 address, when it has one (ECS task metadata's `IPv6Addresses`;
    /// Docker's `GlobalIPv6Address`). Known, it is the only global address the task may send
    /// IPv6 from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_address: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_id: Option<String>,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    #[serde(default)]
    pub security_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_definition_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The MAC address of the task's end of its veth; None: asked by ARP, or learned by the
    /// datapath from the task's first packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// Where the task came from: the state file (or `task add`), or the container engine.
    #[serde(default)]
    pub source: TaskSource,
    /// The container's image, as the engine names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The container's labels, as the engine gives them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Task {
    /// A task of nothing but its name and address, from the state file: the rest as an entry
    /// that leaves every optional field out.
    pub fn new(name: impl Into<String>, ipv4_address: Ipv4Addr) -> Self {
        Self {
            task_arn: None,
            name: name.into(),
            ipv4_address,
            ipv6_address: None,
            interface: None,
            interface_id: None,
            port_mappings: Vec::new(),
            security_groups: Vec::new(),
            service_name: None,
            task_definition_arn: None,
            container_id: None,
            mac_address: None,
            source: TaskSource::State,
            image: None,
            labels: BTreeMap::new(),
        }
    }
}

/// A unicast MAC written `02:42:ac:11:00:02`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// Where a task came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskSource {
    /// The state file, `apply -f` or `task add`.
    #[default]
    State,
    /// Discovered from the Docker engine (`up --docker`).
    Docker,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    #[serde(default)]
    pub host: Host,
    #[serde(default)]
    pub security_groups: Vec<SecurityGroup>,
    #[serde(default)]
    pub tasks: Vec<Task>,
}

/// What validation needs to know of the live host: the bridge's subnet, when there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct BridgeNet {
    pub address: Option<(Ipv4Addr, u8)>,
}

/// Reads and parses a state file, not validated yet.
pub fn read(path: &Path) -> Result<State, LoadError> {
    let file = || path.display().to_string();
    let text = read_limited(path).map_err(|e| match e {
        ReadError::Io(source) => LoadError::Read {
            path: file(),
            source,
        },
        ReadError::TooLarge => LoadError::Invalid {
            file: file(),
            error: StateError::at("$", Problem::FileTooLarge),
        },
    })?;
    parse(&text).map_err(|error| LoadError::Invalid {
        file: file(),
        error,
    })
}

/// Reads, parses and validates a state file.
pub fn load(path: &Path, bridge: BridgeNet) -> Result<State, LoadError> {
    let state = read(path)?;
    validate(&state, bridge).map_err(|error| LoadError::Invalid {
        file: path.display().to_string(),
        error,
    })?;
    Ok(state)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "host": {"uplink": "eth0", "bridge": "docker0", "accountId": "123456789012",
               "defaultPolicy": "allow", "ephemeralPorts": [49153, 65535]},
      "securityGroups": [
        {"GroupId": "sg-web", "GroupName": "web", "OwnerId": "1",
         "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                            "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                            "UserIdGroupPairs": [{"GroupId": "sg-lb"}]}],
         "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]},
        {"GroupId": "sg-lb"}
      ],
      "tasks": [
        {"name": "web-1", "ipv4Address": "172.17.0.2", "interface": "veth1a2b3c",
         "portMappings": [{"containerPort": 80, "hostPort": 8080, "protocol": "tcp"},
                          {"containerPort": 53, "hostPort": 0, "protocol": "udp"}],
         "securityGroups": ["sg-web"]},
        {"name": "web-2", "ipv4Address": "172.17.0.3",
         "portMappings": [{"containerPort": 80, "hostPort": 8080, "protocol": "udp"}]}
      ]
    }"#;

    fn bridge() -> BridgeNet {
        BridgeNet {
            address: Some((Ipv4Addr::new(172, 17, 0, 1), 16)),
        }
    }

    fn check(text: &str) -> Result<State, StateError> {
        let s: State = parse(text)?;
        validate(&s, bridge())?;
        Ok(s)
    }

    fn err_path(text: &str) -> String {
        check(text).expect_err("must be rejected").path
    }

    #[test]
    fn macs_are_six_hex_pairs_and_unicast() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "2:42:ac:11:00:02",
            "zz:42:ac:11:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn accepts_spec_example() {
        let s = check(GOOD).unwrap();
        assert_eq!(s.tasks.len(), 2);
        assert_eq!(s.tasks[0].port_mappings[1].protocol, Protocol::Udp);
        assert_eq!(s.host.default_policy, DefaultPolicy::Allow);
    }

    #[test]
    fn errors_name_json_paths() {
        let prefix_list = "{\"GroupId\": \"sg-lb\", \"IpPermissions\": [{\"IpProtocol\": \"tcp\", \"PrefixListIds\": [{\"PrefixListId\": \"pl-1\"}]}]}\n";
        for (from, to, path) in [
            (
                "\"172.17.0.3\"",
                "\"172.17.0.300\"",
                "$.tasks[1].ipv4Address",
            ),
            (
                "\"0.0.0.0/0\"}],\n                            \"User",
                "\"10.0.0.1/8\"}],\n                            \"User",
                "$.securityGroups[0].IpPermissions[0].IpRanges[0].CidrIp",
            ),
            (
                "\"protocol\": \"udp\"}]}\n",
                "\"protocol\": \"tcp\"}]}\n",
                "$.tasks[1].portMappings[0].hostPort",
            ),
            (
                "\"sg-lb\"}]",
                "\"sg-nope\"}]",
                "$.securityGroups[0].IpPermissions[0].UserIdGroupPairs[0].GroupId",
            ),
            ("[\"sg-web\"]", "[\"sg-x\"]", "$.tasks[0].securityGroups[0]"),
            (
                "\"containerPort\": 53",
                "\"containerPort\": 70000",
                "$.tasks[0].portMappings[1].containerPort",
            ),
            (
                "\"FromPort\": 80",
                "\"FromPort\": 81",
                "$.securityGroups[0].IpPermissions[0].FromPort",
            ),
            (
                "\"IpProtocol\": \"tcp\"",
                "\"IpProtocol\": \"sctpx\"",
                "$.securityGroups[0].IpPermissions[0].IpProtocol",
            ),
            ("\"172.17.0.3\"", "\"10.1.0.3\"", "$.tasks[1].ipv4Address"),
            ("\"172.17.0.3\"", "\"172.17.0.2\"", "$.tasks[1].ipv4Address"),
            ("\"allow\"", "\"maybe\"", "$.host.defaultPolicy"),
            (
                "{\"GroupId\": \"sg-lb\"}\n",
                prefix_list,
                "$.securityGroups[1].IpPermissions[0].PrefixListIds",
            ),
        ] {
            assert_eq!(err_path(&GOOD.replace(from, to)), path, "{to}");
        }
        assert_eq!(err_path("{\"tasks\": 3}"), "$.tasks");
        assert!(check("{").is_err());
    }

    #[test]
    fn a_task_ipv6_address_is_a_unique_global_unicast_one() {
        let with = |a: &str, b: &str| {
            GOOD.replace(
                "\"ipv4Address\": \"172.17.0.2\",",
                &format!("\"ipv4Address\": \"172.17.0.2\", \"ipv6Address\": \"{a}\","),
            )
            .replace(
                "\"ipv4Address\": \"172.17.0.3\",",
                &format!("\"ipv4Address\": \"172.17.0.3\", \"ipv6Address\": \"{b}\","),
            )
        };
        let s = check(&with("fd00:ec5:17::2", "2001:db8::3")).expect("two global addresses");
        assert_eq!(
            s.tasks[0].ipv6_address,
            Some("fd00:ec5:17::2".parse().unwrap())
        );
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""ipv6Address":"fd00:ec5:17::2""#), "{text}");
        assert!(
            !serde_json::to_string(&check(GOOD).unwrap())
                .unwrap()
                .contains("ipv6"),
            "no IPv6 address, no key"
        );
        for (bad, why) in [
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:172.17.0.9", "IPv4-mapped"),
        ] {
            let e = check(&with("fd00:ec5:17::2", bad)).expect_err(bad);
            assert_eq!(e.path, "$.tasks[1].ipv6Address", "{bad}");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let e = check(&with("fd00:ec5:17::2", "fd00:ec5:17::2")).expect_err("twice");
        assert_eq!(e.path, "$.tasks[1].ipv6Address");
        assert!(
            e.to_string()
                .contains("address fd00:ec5:17::2 is also used by $.tasks[0]"),
            "{e}"
        );
        assert_eq!(
            err_path(&with("fd00:ec5:17::2", "172.17.0.9")),
            "$.tasks[1].ipv6Address"
        );
    }

    #[test]
    fn messages_name_what_is_wrong() {
        for (from, to, message) in [
            (
                "\"172.17.0.3\"",
                "\"10.1.0.3\"",
                "address 10.1.0.3 is not a task address in the bridge subnet 172.17.0.0/16",
            ),
            (
                "\"172.17.0.3\"",
                "\"172.17.255.255\"",
                "address 172.17.255.255 is not a task address in the bridge subnet 172.17.0.0/16",
            ),
            (
                "\"protocol\": \"udp\"}]}\n",
                "\"protocol\": \"tcp\"}]}\n",
                "host port 8080/tcp is already published by $.tasks[0] (web-1)",
            ),
            (
                "\"FromPort\": 80",
                "\"FromPort\": 81",
                "FromPort 81 is greater than ToPort 80",
            ),
            (
                "[\"sg-web\"]",
                "[\"sg-x\"]",
                "unknown security group \"sg-x\"",
            ),
            (
                "{\"GroupId\": \"sg-lb\"}",
                "{\"GroupId\": \"sg-web\"}",
                "security group \"sg-web\" is defined twice (also $.securityGroups[0])",
            ),
        ] {
            let e = check(&GOOD.replace(from, to)).expect_err(to);
            assert_eq!(e.problem.to_string(), message);
        }
    }

    /// GOOD with web-1's 8080/tcp and web-2's 8080/udp published on `a` and `b` (`hostIp`;
    /// None leaves it out), and web-2's made tcp when `same_protocol`.
    fn with_host_ips(a: Option<&str>, b: Option<&str>, same_protocol: bool) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        for (task, ip) in [(0, a), (1, b)] {
            if let Some(ip) = ip {
                v["tasks"][task]["portMappings"][0]["hostIp"] = ip.into();
            }
        }
        if same_protocol {
            v["tasks"][1]["portMappings"][0]["protocol"] = "tcp".into();
        }
        v.to_string()
    }

    #[test]
    fn a_port_mapping_has_the_families_of_its_host_ip() {
        let s = check(&with_host_ips(Some("0.0.0.0"), Some("::"), false)).unwrap();
        assert_eq!(s.tasks[0].port_mappings[0].host_ip, PortFamily::Ipv4);
        assert_eq!(s.tasks[1].port_mappings[0].host_ip, PortFamily::Ipv6);
        assert_eq!(s.tasks[0].port_mappings[1].host_ip, PortFamily::Both);
        let text = serde_json::to_string(&s).unwrap();
        assert!(
            text.contains(r#""protocol":"tcp","hostIp":"0.0.0.0"}"#)
                && text.contains(r#""hostIp":"::"}"#),
            "written back as given: {text}"
        );
        assert_eq!(text.matches("hostIp").count(), 2, "none for both: {text}");
        for both in ["\"\"", "null"] {
            let t = GOOD.replace(
                "\"hostPort\": 0,",
                &format!("\"hostPort\": 0, \"hostIp\": {both},"),
            );
            let s = check(&t).unwrap_or_else(|e| panic!("{both}: {e}"));
            assert_eq!(
                s.tasks[0].port_mappings[1].host_ip,
                PortFamily::Both,
                "{both}"
            );
        }
        for (ip, says) in [
            ("127.0.0.1", "a single host address"),
            ("::1", "a single host address"),
            ("10.0.0.5", "a single host address"),
            ("[::]", "not an IP address"),
            ("any", "not an IP address"),
        ] {
            let e = check(&with_host_ips(Some(ip), None, false)).expect_err(ip);
            assert_eq!(e.path, "$.tasks[0].portMappings[0].hostIp", "{ip}: {e}");
            let text = e.to_string();
            assert!(text.contains(says) && !text.contains('\n'), "{ip}: {e}");
            assert!(
                text.contains(r#"give "0.0.0.0" (IPv4 only), "::" (IPv6 only)"#),
                "{e}"
            );
        }
        let e = check(&with_host_ips(Some(""), None, false).replace("\"\"", "7")).unwrap_err();
        assert_eq!(e.path, "$.tasks[0].portMappings[0].hostIp", "{e}");
    }

    #[test]
    fn one_host_port_may_be_two_tasks_in_two_families_never_twice_in_one() {
        for (a, b) in [(Some("0.0.0.0"), Some("::")), (Some("::"), Some("0.0.0.0"))] {
            assert!(
                check(&with_host_ips(a, b, true)).is_ok(),
                "8080/tcp on {a:?} and {b:?}"
            );
        }
        for (a, b, on) in [
            (None, None, ""),
            (Some("0.0.0.0"), Some("0.0.0.0"), " on IPv4"),
            (Some("::"), Some("::"), " on IPv6"),
            (None, Some("::"), " on IPv6"),
            (Some("0.0.0.0"), None, " on IPv4"),
            (Some("::"), None, " on IPv6"),
        ] {
            let e = check(&with_host_ips(a, b, true)).expect_err("one family twice");
            assert_eq!(e.path, "$.tasks[1].portMappings[0].hostPort", "{e}");
            assert_eq!(
                e.problem.to_string(),
                format!("host port 8080/tcp{on} is already published by $.tasks[0] (web-1)"),
                "{a:?} then {b:?}"
            );
        }
        // ECS task metadata lists a port's two bindings apart: one task, both families.
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        let ports = &mut v["tasks"][1]["portMappings"];
        ports[0]["hostIp"] = "0.0.0.0".into();
        let mut six = ports[0].clone();
        six["hostIp"] = "::".into();
        ports.as_array_mut().unwrap().push(six);
        let s = check(&v.to_string()).expect("a port's IPv4 and IPv6 bindings");
        assert_eq!(s.tasks[1].port_mappings.len(), 2);
    }

    /// GOOD with sg-web's inbound rule given `Ipv6Ranges` `ranges`.
    fn with_ipv6_ranges(ranges: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v["securityGroups"][0]["IpPermissions"][0]["Ipv6Ranges"] = ranges;
        v.to_string()
    }

    #[test]
    fn ipv6_ranges_are_read_beside_ipv4_ones() {
        let both = with_ipv6_ranges(serde_json::json!([
            {"CidrIpv6": "::/0"},
            {"CidrIpv6": "2001:DB8::/32", "Description": "office"}
        ]));
        let s = check(&both).expect("both families in one permission, as AWS allows");
        let perm = &s.security_groups[0].ip_permissions[0];
        assert_eq!(
            perm.ipv6_ranges[1].cidr_ipv6, "2001:DB8::/32",
            "kept as written"
        );
        assert_eq!(perm.ipv6_ranges[1].description.as_deref(), Some("office"));
        assert_eq!(
            rules::describe(perm, true),
            "tcp 80 from 0.0.0.0/0, ::/0, 2001:db8::/32, sg-lb"
        );
        let rules = validate(&s, bridge()).unwrap();
        let rule = &rules.groups[0].inbound[0];
        assert_eq!(rule.cidrs.len(), 1);
        assert_eq!(
            rule.cidrs6
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["::/0", "2001:db8::/32"]
        );
        let text = serde_json::to_string(&s).unwrap();
        assert!(
            text.contains(r#""Ipv6Ranges":[{"CidrIpv6":"::/0"},"#),
            "written back as AWS names it: {text}"
        );

        let at = "$.securityGroups[0].IpPermissions[0].Ipv6Ranges";
        for (ranges, path, message) in [
            (
                serde_json::json!([{"CidrIpv6": "::/0"}, {"CidrIpv6": "2001:db8::1/32"}]),
                format!("{at}[1].CidrIpv6"),
                "host bits set (did you mean 2001:db8::/32?)",
            ),
            (
                serde_json::json!([{"CidrIpv6": "10.0.0.0/8"}]),
                format!("{at}[0].CidrIpv6"),
                "an IPv4 CIDR, which goes in IpRanges[].CidrIp",
            ),
            (
                serde_json::json!([{"CidrIpv6": "2001:db8::/129"}]),
                format!("{at}[0].CidrIpv6"),
                "prefix length must be 0 to 128",
            ),
            (
                serde_json::json!([{"CidrIpv6": "::/0", "Description": "d".repeat(1025)}]),
                format!("{at}[0].Description"),
                "longer than the 1024",
            ),
        ] {
            let e = check(&with_ipv6_ranges(ranges)).expect_err(message);
            assert_eq!(e.path, path, "{e}");
            assert!(e.to_string().contains(message), "{e}");
        }
        // An IPv6 CIDR where IPv4 ones go.
        let e = check(&GOOD.replace("\"0.0.0.0/0\"}],\n", "\"::/0\"}],\n")).unwrap_err();
        assert_eq!(
            e.path,
            "$.securityGroups[0].IpPermissions[0].IpRanges[0].CidrIp"
        );
        assert!(
            e.to_string()
                .contains("an IPv6 CIDR, which goes in Ipv6Ranges[].CidrIpv6"),
            "{e}"
        );
        // A field of the wrong type is a JSON error at its path.
        let e = check(&with_ipv6_ranges(serde_json::json!([{"CidrIp": "::/0"}]))).unwrap_err();
        assert!(e.path.contains("Ipv6Ranges"), "{e}");
    }

    /// GOOD with one ICMP rule of (`FromPort`, `ToPort`) as sg-lb's only inbound rule.
    fn with_icmp(from: Option<i32>, to: Option<i32>) -> String {
        let mut rule =
            serde_json::json!({"IpProtocol": "icmp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]});
        if let Some(f) = from {
            rule["FromPort"] = f.into();
        }
        if let Some(t) = to {
            rule["ToPort"] = t.into();
        }
        GOOD.replace(
            "{\"GroupId\": \"sg-lb\"}",
            &serde_json::json!({"GroupId": "sg-lb", "IpPermissions": [rule]}).to_string(),
        )
    }

    #[test]
    fn icmp_ports_are_type_and_code_as_aws_reads_them() {
        for (from, to) in [
            (Some(-1), Some(-1)),
            (None, None),
            (Some(8), Some(-1)),
            (Some(8), None),
            (Some(8), Some(0)),
            (Some(3), Some(4)),
            (Some(0), Some(0)),
            (Some(255), Some(255)),
        ] {
            assert!(
                check(&with_icmp(from, to)).is_ok(),
                "FromPort {from:?} ToPort {to:?} is valid"
            );
        }
        let at = "$.securityGroups[1].IpPermissions[0]";
        for (from, to, field) in [
            (Some(-1), Some(80), "ToPort"),
            (None, Some(0), "ToPort"),
            (Some(-1), Some(0), "ToPort"),
            (Some(256), Some(0), "FromPort"),
            (Some(-2), Some(-1), "FromPort"),
            (Some(3), Some(256), "ToPort"),
            (Some(3), Some(-5), "ToPort"),
            (Some(80), Some(8080), "ToPort"),
        ] {
            let e = check(&with_icmp(from, to)).expect_err("must be rejected");
            assert_eq!(
                e.path,
                format!("{at}.{field}"),
                "FromPort {from:?} ToPort {to:?}: {e}"
            );
        }
        let e = check(&with_icmp(Some(-1), Some(80))).unwrap_err();
        assert!(e.problem.to_string().contains("ToPort must be -1"), "{e}");
    }

    #[test]
    fn long_strings_are_refused_with_their_path() {
        let long = "x".repeat(MAX_STRING_BYTES + 1);
        let just = "x".repeat(MAX_STRING_BYTES);
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v["tasks"][1]["taskArn"] = just.clone().into();
        assert!(
            check(&v.to_string()).is_ok(),
            "{MAX_STRING_BYTES} bytes are fine"
        );
        for (what, set, path) in [
            (
                "task name",
                &(|v: &mut serde_json::Value, s: &str| v["tasks"][0]["name"] = s.into())
                    as &dyn Fn(&mut serde_json::Value, &str),
                "$.tasks[0].name",
            ),
            (
                "a field ecsnet ignores",
                &|v, s| v["securityGroups"][0]["OwnerId"] = s.into(),
                "$.securityGroups[0].OwnerId",
            ),
            (
                "a description",
                &|v, s| {
                    v["securityGroups"][0]["IpPermissions"][0]["IpRanges"][0]["Description"] =
                        s.into();
                },
                "$.securityGroups[0].IpPermissions[0].IpRanges[0].Description",
            ),
            (
                "a string in a list",
                &|v, s| v["tasks"][0]["securityGroups"][0] = s.into(),
                "$.tasks[0].securityGroups[0]",
            ),
            (
                "an account id",
                &|v, s| v["host"]["accountId"] = s.into(),
                "$.host.accountId",
            ),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
            set(&mut v, &long);
            let e = check(&v.to_string()).expect_err(what);
            assert_eq!(e.path, path, "{what}: {e}");
            assert!(
                e.problem.to_string().contains("longer than the 1024"),
                "{what}: {e}"
            );
        }
        // A long key, anywhere.
        let text = GOOD.replacen("\"host\": {", &format!("\"host\": {{\"{long}\": 1, "), 1);
        assert_eq!(check(&text).unwrap_err().path, "$.host (a key)");
        // States built in memory (task add) are held to the same.
        let mut s: State = parse(GOOD).unwrap();
        s.tasks[1].name = long.clone();
        assert_eq!(validate(&s, bridge()).unwrap_err().path, "$.tasks[1].name");
        let mut s: State = parse(GOOD).unwrap();
        s.security_groups[1].group_id = long;
        assert_eq!(
            validate(&s, bridge()).unwrap_err().path,
            "$.securityGroups[1].GroupId"
        );
    }

    #[test]
    fn files_over_the_limit_are_refused_unread() {
        let dir = std::env::temp_dir().join(format!("ecsnet-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.json");
        // Sparse: 16 MiB + 1 of zeros, never written.
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let e = load(&big, bridge()).unwrap_err();
        let LoadError::Invalid { error, .. } = &e else {
            panic!("want Invalid, got {e}");
        };
        assert_eq!(error.path, "$");
        assert!(
            error.problem.to_string().contains("larger than 16 MiB"),
            "{e}"
        );
        f.set_len(MAX_FILE_BYTES).unwrap();
        assert!(
            matches!(read_limited(&big), Ok(t) if t.len() as u64 == MAX_FILE_BYTES),
            "16 MiB exactly is read"
        );
        assert!(parse::<State>(&" ".repeat(usize::try_from(MAX_FILE_BYTES).unwrap() + 1)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `n` groups, each taking TCP 443 from the next one, and 200 tasks in the first 100.
    pub(crate) fn many_groups(n: usize) -> State {
        let id = |i: usize| format!("sg-{i:08x}");
        let security_groups = (0..n)
            .map(|i| SecurityGroup {
                group_id: id(i),
                group_name: None,
                ip_permissions: vec![IpPermission {
                    user_id_group_pairs: vec![GroupPair {
                        group_id: id((i + 1) % n),
                    }],
                    ..IpPermission::from_cidr("tcp", Some((443, 443)), "10.0.0.0/8")
                }],
                ip_permissions_egress: Vec::new(),
            })
            .collect();
        let tasks = (0..200u8)
            .map(|i| Task {
                security_groups: vec![id(usize::from(i % 100)), id(n - 1 - usize::from(i % 7))],
                ..Task::new(format!("t{i}"), Ipv4Addr::new(172, 17, 1, 2 + i))
            })
            .collect();
        State {
            host: Host::default(),
            security_groups,
            tasks,
        }
    }

    /// 300,000 groups with a reference each: a linear validation takes well under a second
    /// (optimised) or a few (debug); the quadratic one took over 120 s. A loose bound, for a
    /// shared machine.
    #[test]
    fn validation_is_linear_in_the_number_of_groups() {
        let s = many_groups(300_000);
        let start = std::time::Instant::now();
        validate(&s, bridge()).unwrap();
        let took = start.elapsed();
        assert!(
            took < std::time::Duration::from_secs(20),
            "validating 300k groups took {took:?}"
        );
        // A duplicate at the very end is still found, and named with its first definition.
        let mut s = s;
        s.security_groups.push(s.security_groups[7].clone());
        let e = validate(&s, bridge()).unwrap_err();
        assert_eq!(e.path, "$.securityGroups[300000].GroupId");
        assert!(e.problem.to_string().contains("$.securityGroups[7]"), "{e}");
    }
}
