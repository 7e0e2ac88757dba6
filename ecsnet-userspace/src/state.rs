//! The state file (SPEC §4): parsing with JSON paths in every error, and validation that needs
//! no kernel. A state that passes `validate` can be compiled into map entries without surprises.

use std::{collections::HashMap, net::Ipv4Addr, path::Path};

use serde::{Deserialize, Serialize};

/// An error in a state or SG file, located by its JSON path (`$.tasks[1].ipv4Address`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {message}")]
pub struct StateError {
    pub path: String,
    pub message: String,
}

impl StateError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
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
            Self::Tcp => 6,
            Self::Udp => 17,
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
    pub ipv6_ranges: Vec<serde_json::Value>,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_arn: Option<String>,
    pub name: String,
    pub ipv4_address: Ipv4Addr,
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

/// Parses JSON text into `T`, naming the JSON path of the first bad value.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StateError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "$".to_owned()
        } else {
            format!("$.{path}")
        };
        let inner = e.into_inner();
        let message = inner.to_string();
        // serde_json appends " at line L column C"; keep it, it helps in long files.
        StateError::at(path, message)
    })
}

/// Reads, parses and validates a state file.
pub fn load(path: &Path, bridge: BridgeNet) -> Result<State, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let invalid = |error| LoadError::Invalid {
        file: path.display().to_string(),
        error,
    };
    let state: State = parse(&text).map_err(invalid)?;
    validate(&state, bridge).map_err(invalid)?;
    Ok(state)
}

/// A CIDR such as `10.0.0.0/8`; the address must not have bits past the prefix.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("bad CIDR {s:?}: expected ADDRESS/PREFIX like 10.0.0.0/8"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("bad CIDR {s:?}: {addr:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("bad CIDR {s:?}: prefix length must be 0 to 32"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    if u32::from(addr) & !mask != 0 {
        return Err(format!(
            "bad CIDR {s:?}: host bits set (did you mean {}/{len}?)",
            Ipv4Addr::from(u32::from(addr) & mask)
        ));
    }
    Ok((addr, len))
}

/// Protocol of an SG rule as a number: `-1` (all) is 255 here; names or numbers 0..=255.
pub fn rule_protocol(p: &str) -> Result<u8, String> {
    match p.to_ascii_lowercase().as_str() {
        "-1" | "all" => Ok(255),
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        other => other
            .parse::<u8>()
            .ok()
            .filter(|n| *n != 255)
            .ok_or_else(|| {
                format!("unknown protocol {p:?}: use -1, tcp, udp, icmp or a number 0-254")
            }),
    }
}

fn validate_permission(perm: &IpPermission, path: &str, groups: &[&str]) -> Result<(), StateError> {
    let proto = rule_protocol(&perm.ip_protocol)
        .map_err(|m| StateError::at(format!("{path}.IpProtocol"), m))?;
    if !perm.prefix_list_ids.is_empty() {
        return Err(StateError::at(
            format!("{path}.PrefixListIds"),
            "prefix lists are not supported yet: list their CIDRs in IpRanges",
        ));
    }
    if !perm.ipv6_ranges.is_empty() {
        return Err(StateError::at(
            format!("{path}.Ipv6Ranges"),
            "IPv6 ranges are not supported yet",
        ));
    }
    if matches!(proto, 6 | 17) {
        let from = perm.from_port.unwrap_or(0);
        let to = perm.to_port.unwrap_or(65535);
        for (field, v) in [("FromPort", from), ("ToPort", to)] {
            if !(0..=65535).contains(&v) {
                return Err(StateError::at(
                    format!("{path}.{field}"),
                    format!("port {v} out of range 0-65535"),
                ));
            }
        }
        if from > to {
            return Err(StateError::at(
                format!("{path}.FromPort"),
                format!("FromPort {from} is greater than ToPort {to}"),
            ));
        }
    } else if proto == 1 {
        for (field, v) in [("FromPort", perm.from_port), ("ToPort", perm.to_port)] {
            if let Some(v) = v
                && !(-1..=255).contains(&v)
            {
                return Err(StateError::at(
                    format!("{path}.{field}"),
                    format!("ICMP type/code {v} out of range -1..255"),
                ));
            }
        }
    }
    for (i, r) in perm.ip_ranges.iter().enumerate() {
        parse_cidr(&r.cidr_ip)
            .map_err(|m| StateError::at(format!("{path}.IpRanges[{i}].CidrIp"), m))?;
    }
    for (i, g) in perm.user_id_group_pairs.iter().enumerate() {
        if !groups.contains(&g.group_id.as_str()) {
            return Err(StateError::at(
                format!("{path}.UserIdGroupPairs[{i}].GroupId"),
                format!("unknown security group {:?}", g.group_id),
            ));
        }
    }
    Ok(())
}

/// Every rule that is checked without the kernel (SPEC §4, §6).
pub fn validate(state: &State, bridge: BridgeNet) -> Result<(), StateError> {
    let [lo, hi] = state.host.ephemeral_ports;
    if lo == 0 || lo > hi {
        return Err(StateError::at(
            "$.host.ephemeralPorts",
            format!("bad range [{lo}, {hi}]: need 1 <= first <= last <= 65535"),
        ));
    }
    let groups: Vec<&str> = state
        .security_groups
        .iter()
        .map(|g| g.group_id.as_str())
        .collect();
    for (i, sg) in state.security_groups.iter().enumerate() {
        let path = format!("$.securityGroups[{i}]");
        if sg.group_id.is_empty() {
            return Err(StateError::at(format!("{path}.GroupId"), "empty GroupId"));
        }
        if groups[..i].contains(&sg.group_id.as_str()) {
            return Err(StateError::at(
                format!("{path}.GroupId"),
                format!("security group {:?} is defined twice", sg.group_id),
            ));
        }
        for (j, p) in sg.ip_permissions.iter().enumerate() {
            validate_permission(p, &format!("{path}.IpPermissions[{j}]"), &groups)?;
        }
        for (j, p) in sg.ip_permissions_egress.iter().enumerate() {
            validate_permission(p, &format!("{path}.IpPermissionsEgress[{j}]"), &groups)?;
        }
    }

    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut addrs: HashMap<Ipv4Addr, usize> = HashMap::new();
    let mut host_ports: HashMap<(u16, Protocol), usize> = HashMap::new();
    for (i, t) in state.tasks.iter().enumerate() {
        let path = format!("$.tasks[{i}]");
        if t.name.is_empty() {
            return Err(StateError::at(format!("{path}.name"), "empty task name"));
        }
        if let Some(j) = names.insert(&t.name, i) {
            return Err(StateError::at(
                format!("{path}.name"),
                format!("task name {:?} is also used by $.tasks[{j}]", t.name),
            ));
        }
        if let Some(j) = addrs.insert(t.ipv4_address, i) {
            return Err(StateError::at(
                format!("{path}.ipv4Address"),
                format!("address {} is also used by $.tasks[{j}]", t.ipv4_address),
            ));
        }
        if let Some((baddr, len)) = bridge.address {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let a = u32::from(t.ipv4_address);
            let net = u32::from(baddr) & mask;
            if a & mask != net || a == net || a == net | !mask || t.ipv4_address == baddr {
                return Err(StateError::at(
                    format!("{path}.ipv4Address"),
                    format!(
                        "address {} is not a task address in the bridge subnet {}/{len}",
                        t.ipv4_address,
                        Ipv4Addr::from(net)
                    ),
                ));
            }
        }
        for (j, pm) in t.port_mappings.iter().enumerate() {
            let pp = format!("{path}.portMappings[{j}]");
            if pm.container_port == 0 {
                return Err(StateError::at(
                    format!("{pp}.containerPort"),
                    "port 0 out of range 1-65535",
                ));
            }
            if pm.host_port != 0
                && let Some(k) = host_ports.insert((pm.host_port, pm.protocol), i)
            {
                return Err(StateError::at(
                    format!("{pp}.hostPort"),
                    format!(
                        "host port {}/{} is already published by $.tasks[{k}] ({})",
                        pm.host_port,
                        pm.protocol.as_str(),
                        state.tasks[k].name
                    ),
                ));
            }
        }
        for (j, g) in t.security_groups.iter().enumerate() {
            if !groups.contains(&g.as_str()) {
                return Err(StateError::at(
                    format!("{path}.securityGroups[{j}]"),
                    format!("unknown security group {g:?}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
    fn accepts_spec_example() {
        let s = check(GOOD).unwrap();
        assert_eq!(s.tasks.len(), 2);
        assert_eq!(s.tasks[0].port_mappings[1].protocol, Protocol::Udp);
        assert_eq!(s.host.default_policy, DefaultPolicy::Allow);
    }

    #[test]
    fn errors_name_json_paths() {
        assert_eq!(
            err_path(&GOOD.replace("\"172.17.0.3\"", "\"172.17.0.300\"")),
            "$.tasks[1].ipv4Address"
        );
        assert_eq!(
            err_path(&GOOD.replace(
                "\"0.0.0.0/0\"}],\n                            \"User",
                "\"10.0.0.1/8\"}],\n                            \"User"
            )),
            "$.securityGroups[0].IpPermissions[0].IpRanges[0].CidrIp"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"protocol\": \"udp\"}]}\n", "\"protocol\": \"tcp\"}]}\n")),
            "$.tasks[1].portMappings[0].hostPort"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"sg-lb\"}]", "\"sg-nope\"}]")),
            "$.securityGroups[0].IpPermissions[0].UserIdGroupPairs[0].GroupId"
        );
        assert_eq!(
            err_path(&GOOD.replace("[\"sg-web\"]", "[\"sg-x\"]")),
            "$.tasks[0].securityGroups[0]"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"containerPort\": 53", "\"containerPort\": 70000")),
            "$.tasks[0].portMappings[1].containerPort"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"FromPort\": 80", "\"FromPort\": 81")),
            "$.securityGroups[0].IpPermissions[0].FromPort"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"IpProtocol\": \"tcp\"", "\"IpProtocol\": \"sctpx\"")),
            "$.securityGroups[0].IpPermissions[0].IpProtocol"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"172.17.0.3\"", "\"10.1.0.3\"")),
            "$.tasks[1].ipv4Address"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"172.17.0.3\"", "\"172.17.0.2\"")),
            "$.tasks[1].ipv4Address"
        );
        assert_eq!(
            err_path(&GOOD.replace("\"allow\"", "\"maybe\"")),
            "$.host.defaultPolicy"
        );
        assert_eq!(err_path(&GOOD.replace("{\"GroupId\": \"sg-lb\"}\n", "{\"GroupId\": \"sg-lb\", \"IpPermissions\": [{\"IpProtocol\": \"tcp\", \"PrefixListIds\": [{\"PrefixListId\": \"pl-1\"}]}]}\n")),
            "$.securityGroups[1].IpPermissions[0].PrefixListIds");
        assert_eq!(err_path("{\"tasks\": 3}"), "$.tasks");
        assert!(check("{").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(parse_cidr("0.0.0.0/0"), Ok((Ipv4Addr::UNSPECIFIED, 0)));
        assert!(parse_cidr("10.0.0.1/8").is_err());
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0").is_err());
        assert!(parse_cidr("10.0.0/8").is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!(rule_protocol("-1"), Ok(255));
        assert_eq!(rule_protocol("TCP"), Ok(6));
        assert_eq!(rule_protocol("47"), Ok(47));
        assert!(rule_protocol("300").is_err());
        assert!(rule_protocol("sctpx").is_err());
    }
}
