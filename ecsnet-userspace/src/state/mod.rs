//! The state file (SPEC §4): parsing with JSON paths in every error, and validation that needs
//! no kernel. A state that passes `validate` can be compiled into map entries without surprises.

pub mod timeouts;

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

/// Largest state or SG file ecsnet reads, bytes. The biggest policy the datapath holds (32,768
/// CIDR entries per generation, `sg::TooBig`) written out as `aws ec2
/// describe-security-groups` prints it is about 10 MB; 300,000 bare groups are about 7 MB.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Longest string accepted anywhere in a state or SG file, or in a state built from the command
/// line (names, ARNs, ids, descriptions), bytes. AWS's longest here are ARNs (ECS task ARNs are
/// under 400 bytes) and descriptions (255).
pub const MAX_STRING_BYTES: usize = 1024;

/// Reads a state or SG file of at most `MAX_FILE_BYTES`. Err(None): it is larger.
pub fn read_limited(path: &Path) -> Result<String, Option<std::io::Error>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(Some)?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(Some)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(None);
    }
    Ok(text)
}

/// The error for a file over `MAX_FILE_BYTES`.
pub fn too_large() -> StateError {
    StateError::at(
        "$",
        format!(
            "file larger than {} MiB, the most ecsnet reads",
            MAX_FILE_BYTES >> 20
        ),
    )
}

fn check_len(path: impl FnOnce() -> String, s: &str) -> Result<(), StateError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(StateError::at(
            path(),
            format!(
                "string of {} bytes, longer than the {MAX_STRING_BYTES} ecsnet accepts",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// Walks a JSON document without building it, checking every string (keys included) against
/// `MAX_STRING_BYTES`; the first one too long is left in `found` with its JSON path.
struct StringCheck<'a> {
    path: &'a mut String,
    found: &'a mut Option<StateError>,
}

impl StringCheck<'_> {
    fn check<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        check_len(|| self.path.clone(), s).map_err(|e| {
            *self.found = Some(e);
            E::custom("string too long")
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for StringCheck<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StringCheck<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        self.check(s)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let base = self.path.len();
        for i in 0.. {
            self.path.truncate(base);
            self.path.push_str(&format!("[{i}]"));
            let item = StringCheck {
                path: &mut *self.path,
                found: &mut *self.found,
            };
            if seq.next_element_seed(item)?.is_none() {
                break;
            }
        }
        self.path.truncate(base);
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let base = self.path.len();
        loop {
            self.path.truncate(base);
            let key = KeyCheck {
                path: &mut *self.path,
                found: &mut *self.found,
            };
            if map.next_key_seed(key)?.is_none() {
                break;
            }
            let value = StringCheck {
                path: &mut *self.path,
                found: &mut *self.found,
            };
            map.next_value_seed(value)?;
        }
        self.path.truncate(base);
        Ok(())
    }
}

/// A key of a JSON object: checked like any string, then appended to the path.
struct KeyCheck<'a> {
    path: &'a mut String,
    found: &'a mut Option<StateError>,
}

impl<'de> serde::de::DeserializeSeed<'de> for KeyCheck<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyCheck<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<(), E> {
        let at = || format!("{} (a key)", self.path);
        if let Err(e) = check_len(at, k) {
            *self.found = Some(e);
            return Err(E::custom("key too long"));
        }
        self.path.push('.');
        self.path.push_str(k);
        Ok(())
    }
}

/// The first string of `text` (a JSON document) longer than `MAX_STRING_BYTES`, if any.
fn long_string(text: &str) -> Option<StateError> {
    let mut found = None;
    let mut path = "$".to_owned();
    let check = StringCheck {
        path: &mut path,
        found: &mut found,
    };
    let de = &mut serde_json::Deserializer::from_str(text);
    // Malformed text gets its error, with line and column, from the typed parse.
    let _ = serde::de::DeserializeSeed::deserialize(check, de);
    found
}

/// Parses JSON text into `T`, naming the JSON path of the first bad value. Text over
/// `MAX_FILE_BYTES` and strings over `MAX_STRING_BYTES` are refused before anything is built.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StateError> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    if let Some(e) = long_string(text) {
        return Err(e);
    }
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
    let invalid = |error| LoadError::Invalid {
        file: path.display().to_string(),
        error,
    };
    let text = read_limited(path).map_err(|e| match e {
        Some(source) => LoadError::Read {
            path: path.display().to_string(),
            source,
        },
        None => invalid(too_large()),
    })?;
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

/// Group ids of a state, each to its index: one lookup per reference, whatever the number of
/// groups.
type GroupIndex<'a> = HashMap<&'a str, usize>;

fn validate_permission(
    perm: &IpPermission,
    path: &str,
    groups: &GroupIndex,
) -> Result<(), StateError> {
    check_len(|| format!("{path}.IpProtocol"), &perm.ip_protocol)?;
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
        // As AWS reads them: FromPort is the ICMP type, ToPort the code, -1 every one (a missing
        // port too); every type with one code means nothing (`sg::allow_of`).
        let (ty, code) = (perm.from_port.unwrap_or(-1), perm.to_port.unwrap_or(-1));
        for (field, what, v) in [("FromPort", "type", ty), ("ToPort", "code", code)] {
            if !(-1..=255).contains(&v) {
                return Err(StateError::at(
                    format!("{path}.{field}"),
                    format!("ICMP {what} {v} out of range: use 0 to 255, or -1 for every {what}"),
                ));
            }
        }
        if ty == -1 && code != -1 {
            return Err(StateError::at(
                format!("{path}.ToPort"),
                format!(
                    "ICMP code {code} with every type (FromPort -1): with FromPort -1, ToPort must be -1 too"
                ),
            ));
        }
    }
    for (i, r) in perm.ip_ranges.iter().enumerate() {
        let at = format!("{path}.IpRanges[{i}]");
        check_len(|| format!("{at}.CidrIp"), &r.cidr_ip)?;
        parse_cidr(&r.cidr_ip).map_err(|m| StateError::at(format!("{at}.CidrIp"), m))?;
        if let Some(d) = &r.description {
            check_len(|| format!("{at}.Description"), d)?;
        }
    }
    for (i, g) in perm.user_id_group_pairs.iter().enumerate() {
        check_len(
            || format!("{path}.UserIdGroupPairs[{i}].GroupId"),
            &g.group_id,
        )?;
        if !groups.contains_key(g.group_id.as_str()) {
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
    let h = &state.host;
    for (field, v) in [
        ("uplink", &h.uplink),
        ("bridge", &h.bridge),
        ("accountId", &h.account_id),
        ("instanceId", &h.instance_id),
        ("cluster", &h.cluster),
        ("vpcId", &h.vpc_id),
        ("subnetId", &h.subnet_id),
        ("region", &h.region),
        ("azId", &h.az_id),
        ("containerInstanceArn", &h.container_instance_arn),
    ] {
        if let Some(v) = v {
            check_len(|| format!("$.host.{field}"), v)?;
        }
    }
    let mut groups = GroupIndex::with_capacity(state.security_groups.len());
    for (i, sg) in state.security_groups.iter().enumerate() {
        let path = format!("$.securityGroups[{i}]");
        check_len(|| format!("{path}.GroupId"), &sg.group_id)?;
        if sg.group_id.is_empty() {
            return Err(StateError::at(format!("{path}.GroupId"), "empty GroupId"));
        }
        if let Some(j) = groups.insert(&sg.group_id, i) {
            return Err(StateError::at(
                format!("{path}.GroupId"),
                format!(
                    "security group {:?} is defined twice (also $.securityGroups[{j}])",
                    sg.group_id
                ),
            ));
        }
        if let Some(name) = &sg.group_name {
            check_len(|| format!("{path}.GroupName"), name)?;
        }
    }
    for (i, sg) in state.security_groups.iter().enumerate() {
        let path = format!("$.securityGroups[{i}]");
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
        check_len(|| format!("{path}.name"), &t.name)?;
        for (field, v) in [
            ("taskArn", &t.task_arn),
            ("interface", &t.interface),
            ("interfaceId", &t.interface_id),
            ("serviceName", &t.service_name),
            ("taskDefinitionArn", &t.task_definition_arn),
            ("containerId", &t.container_id),
        ] {
            if let Some(v) = v {
                check_len(|| format!("{path}.{field}"), v)?;
            }
        }
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
            check_len(|| format!("{path}.securityGroups[{j}]"), g)?;
            if !groups.contains_key(g.as_str()) {
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

    /// GOOD with one ICMP rule of (FromPort, ToPort) as sg-lb's only inbound rule.
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
        assert!(e.message.contains("ToPort must be -1"), "{e}");
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
                        s.into()
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
            assert!(e.message.contains("longer than the 1024"), "{what}: {e}");
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
        assert!(error.message.contains("larger than 16 MiB"), "{e}");
        f.set_len(MAX_FILE_BYTES).unwrap();
        assert!(
            matches!(read_limited(&big), Ok(t) if t.len() as u64 == MAX_FILE_BYTES),
            "16 MiB exactly is read"
        );
        assert!(parse::<State>(&" ".repeat(MAX_FILE_BYTES as usize + 1)).is_err());
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
        let tasks = (0..200)
            .map(|i| Task {
                task_arn: None,
                name: format!("t{i}"),
                ipv4_address: Ipv4Addr::new(172, 17, 1 + (i / 250) as u8, 2 + (i % 250) as u8),
                interface: None,
                interface_id: None,
                port_mappings: Vec::new(),
                security_groups: vec![id(i % 100), id(n - 1 - i % 7)],
                service_name: None,
                task_definition_arn: None,
                container_id: None,
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
        assert!(e.message.contains("$.securityGroups[7]"), "{e}");
    }
}
