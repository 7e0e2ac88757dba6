//! Validation: every rule of SPEC §4 and §6 that needs no kernel, checked in the file's order so
//! the first error is the first in the file; what passes comes out as typed `Rules`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ecsnet_common::policy::mask_addr;

use crate::state::{
    BridgeNet, IpPermission, PortFamily, PortMapping, Problem, Protocol, State, StateError, Task,
    parse::check_len,
    rules::{
        CidrError, Group, IpProtocol, Ipv4Net, Ipv6Net, Member, Rule, RuleError, Rules, Traffic,
    },
};

/// Group ids of a state, each to its index: one lookup per reference, whatever the number of
/// groups.
type GroupIndex<'a> = HashMap<&'a str, usize>;

/// The index of group `id`, or the error of an unknown one at `path`.
fn group_at(groups: &GroupIndex, id: &str, path: impl Fn() -> String) -> Result<usize, StateError> {
    check_len(&path, id)?;
    groups
        .get(id)
        .copied()
        .ok_or_else(|| StateError::at(path(), Problem::UnknownGroup { id: id.to_owned() }))
}

/// One permission (at `path`), checked in the order of its fields.
fn permission(perm: &IpPermission, path: &str, groups: &GroupIndex) -> Result<Rule, StateError> {
    let at = |e: RuleError| StateError::at(format!("{path}.{}", e.field()), e);
    check_len(|| format!("{path}.IpProtocol"), &perm.ip_protocol)?;
    let protocol: IpProtocol = perm.ip_protocol.parse().map_err(at)?;
    if !perm.prefix_list_ids.is_empty() {
        return Err(StateError::at(
            format!("{path}.PrefixListIds"),
            Problem::PrefixLists,
        ));
    }
    let traffic = Traffic::of(protocol, perm.from_port, perm.to_port).map_err(at)?;
    let v4 = perm.ip_ranges.iter().map(|r| (&r.cidr_ip, &r.description));
    let cidrs = nets::<Ipv4Net>(v4, &format!("{path}.IpRanges"), "CidrIp")?;
    let v6 = perm
        .ipv6_ranges
        .iter()
        .map(|r| (&r.cidr_ipv6, &r.description));
    let cidrs6 = nets::<Ipv6Net>(v6, &format!("{path}.Ipv6Ranges"), "CidrIpv6")?;
    let refs = perm.user_id_group_pairs.iter().enumerate();
    let groups = refs
        .map(|(i, g)| {
            group_at(groups, &g.group_id, || {
                format!("{path}.UserIdGroupPairs[{i}].GroupId")
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        traffic,
        cidrs,
        cidrs6,
        groups,
    })
}

/// The CIDRs of a permission's list at `path` (`IpRanges`, `Ipv6Ranges`), each in its field
/// `field` with an optional description.
fn nets<'a, N: FromStr<Err = CidrError>>(
    list: impl ExactSizeIterator<Item = (&'a String, &'a Option<String>)>,
    path: &str,
    field: &str,
) -> Result<Vec<N>, StateError> {
    let mut nets = Vec::with_capacity(list.len());
    for (i, (cidr, description)) in list.enumerate() {
        let at = format!("{path}[{i}]");
        check_len(|| format!("{at}.{field}"), cidr)?;
        let net = cidr
            .parse()
            .map_err(|e| StateError::at(format!("{at}.{field}"), RuleError::Cidr(e)))?;
        nets.push(net);
        if let Some(d) = description {
            check_len(|| format!("{at}.Description"), d)?;
        }
    }
    Ok(nets)
}

/// The optional strings of an object at `path`, each named by its field: none too long.
fn optional_strings(path: &str, fields: &[(&str, &Option<String>)]) -> Result<(), StateError> {
    for (field, v) in fields {
        if let Some(v) = v {
            check_len(|| format!("{path}.{field}"), v)?;
        }
    }
    Ok(())
}

/// The host section: its ephemeral port range and the length of its strings.
fn host(state: &State) -> Result<(), StateError> {
    let [lo, hi] = state.host.ephemeral_ports;
    if lo == 0 || lo > hi {
        return Err(StateError::at(
            "$.host.ephemeralPorts",
            Problem::EphemeralPorts { lo, hi },
        ));
    }
    let h = &state.host;
    optional_strings(
        "$.host",
        &[
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
        ],
    )
}

/// Every group's id, once each; then every group's rules, which may name any group.
fn groups(state: &State) -> Result<(GroupIndex<'_>, Vec<Group>), StateError> {
    let mut index = GroupIndex::with_capacity(state.security_groups.len());
    for (i, sg) in state.security_groups.iter().enumerate() {
        let path = format!("$.securityGroups[{i}]");
        check_len(|| format!("{path}.GroupId"), &sg.group_id)?;
        if sg.group_id.is_empty() {
            return Err(StateError::at(
                format!("{path}.GroupId"),
                Problem::EmptyGroupId,
            ));
        }
        if let Some(first) = index.insert(&sg.group_id, i) {
            return Err(StateError::at(
                format!("{path}.GroupId"),
                Problem::DuplicateGroup {
                    id: sg.group_id.clone(),
                    first,
                },
            ));
        }
        if let Some(name) = &sg.group_name {
            check_len(|| format!("{path}.GroupName"), name)?;
        }
    }
    let mut groups = Vec::with_capacity(state.security_groups.len());
    for (i, sg) in state.security_groups.iter().enumerate() {
        let rules = |list: &[IpPermission], field: &str| {
            let path = |j| format!("$.securityGroups[{i}].{field}[{j}]");
            let checked = list.iter().enumerate();
            checked
                .map(|(j, p)| permission(p, &path(j), &index))
                .collect::<Result<Vec<_>, _>>()
        };
        groups.push(Group {
            id: sg.group_id.clone(),
            inbound: rules(&sg.ip_permissions, "IpPermissions")?,
            outbound: rules(&sg.ip_permissions_egress, "IpPermissionsEgress")?,
        });
    }
    Ok((index, groups))
}

/// What tasks must not share, each to the first task that has it.
#[derive(Default)]
struct Taken<'a> {
    names: HashMap<&'a str, usize>,
    addrs: HashMap<IpAddr, usize>,
    /// A fixed host port in one family (`PortFamily::Ipv4` or `Ipv6`).
    host_ports: HashMap<(u16, Protocol, PortFamily), usize>,
}

/// Whether `addr` may be a task's global IPv6 address: a unicast address other than the
/// link-local one every interface has (which ecsnet derives from the task's MAC).
pub fn task_ipv6(addr: Ipv6Addr) -> Result<(), Problem> {
    let why = if addr.is_unspecified() {
        "unspecified"
    } else if addr.is_loopback() {
        "loopback"
    } else if addr.is_multicast() {
        "multicast"
    } else if addr.is_unicast_link_local() {
        "link-local (a task's link-local address is its MAC's)"
    } else if addr.to_ipv4_mapped().is_some() {
        "an IPv4-mapped address"
    } else {
        return Ok(());
    };
    Err(Problem::BadIpv6 { addr, why })
}

/// Whether `addr` may be a task's address on a bridge at `bridge` (address, prefix length): in
/// its subnet, and neither the subnet's network or broadcast address nor the bridge's own.
fn on_bridge(addr: Ipv4Addr, (bridge, len): (Ipv4Addr, u8)) -> Result<(), Problem> {
    let net = mask_addr(u32::from(bridge), len);
    let broadcast = net | !mask_addr(u32::MAX, len);
    let a = u32::from(addr);
    if mask_addr(a, len) != net || a == net || a == broadcast || addr == bridge {
        return Err(Problem::OutsideBridge {
            addr,
            net: Ipv4Net::containing(bridge, len).expect("a bridge's prefix is at most 32"),
        });
    }
    Ok(())
}

/// Task `i` (at `path`), checked against those before it; its groups are looked up in
/// `groups`.
fn task<'a>(
    state: &State,
    (i, t): (usize, &'a Task),
    bridge: BridgeNet,
    groups: &GroupIndex,
    taken: &mut Taken<'a>,
) -> Result<Member, StateError> {
    let path = format!("$.tasks[{i}]");
    check_len(|| format!("{path}.name"), &t.name)?;
    optional_strings(
        &path,
        &[
            ("taskArn", &t.task_arn),
            ("interface", &t.interface),
            ("interfaceId", &t.interface_id),
            ("serviceName", &t.service_name),
            ("taskDefinitionArn", &t.task_definition_arn),
            ("containerId", &t.container_id),
            ("macAddress", &t.mac_address),
            ("image", &t.image),
        ],
    )?;
    if let Some(mac) = &t.mac_address
        && super::parse_mac(mac).is_none()
    {
        let problem = Problem::BadMac { mac: mac.clone() };
        return Err(StateError::at(format!("{path}.macAddress"), problem));
    }
    if t.name.is_empty() {
        return Err(StateError::at(
            format!("{path}.name"),
            Problem::EmptyTaskName,
        ));
    }
    if let Some(other) = taken.names.insert(&t.name, i) {
        let name = t.name.clone();
        let problem = Problem::DuplicateName { name, other };
        return Err(StateError::at(format!("{path}.name"), problem));
    }
    let addr = t.ipv4_address;
    if let Some(other) = taken.addrs.insert(addr.into(), i) {
        let problem = Problem::DuplicateAddress {
            addr: addr.into(),
            other,
        };
        return Err(StateError::at(format!("{path}.ipv4Address"), problem));
    }
    if let Some(b) = bridge.address {
        on_bridge(addr, b).map_err(|p| StateError::at(format!("{path}.ipv4Address"), p))?;
    }
    if let Some(v6) = t.ipv6_address {
        let at = || format!("{path}.ipv6Address");
        task_ipv6(v6).map_err(|p| StateError::at(at(), p))?;
        if let Some(other) = taken.addrs.insert(v6.into(), i) {
            let problem = Problem::DuplicateAddress {
                addr: v6.into(),
                other,
            };
            return Err(StateError::at(at(), problem));
        }
    }
    for (j, pm) in t.port_mappings.iter().enumerate() {
        let pp = format!("{path}.portMappings[{j}]");
        if pm.container_port == 0 {
            return Err(StateError::at(
                format!("{pp}.containerPort"),
                Problem::ContainerPortZero,
            ));
        }
        if pm.host_port != 0 {
            published(state, taken, (i, pm))
                .map_err(|p| StateError::at(format!("{pp}.hostPort"), p))?;
        }
    }
    let mut member: Vec<(&str, usize)> = Vec::with_capacity(t.security_groups.len());
    for (j, g) in t.security_groups.iter().enumerate() {
        let index = group_at(groups, g, || format!("{path}.securityGroups[{j}]"))?;
        member.push((g, index));
    }
    member.sort_unstable();
    member.dedup();
    Ok(Member {
        addr,
        addr6: t.ipv6_address,
        groups: member.into_iter().map(|(_, g)| g).collect(),
    })
}

/// Records that task `i` publishes `pm` (a fixed host port) in each of its families; the error
/// of the first task that already does in any, named with the families both cover.
fn published(
    state: &State,
    taken: &mut Taken,
    (i, pm): (usize, &PortMapping),
) -> Result<(), Problem> {
    let key = |f: PortFamily| (pm.host_port, pm.protocol, f);
    let clash = pm
        .host_ip
        .singles()
        .iter()
        .find_map(|f| taken.host_ports.get(&key(*f)).copied());
    if let Some(other) = clash {
        let held = |f: &&PortFamily| taken.host_ports.get(&key(**f)) == Some(&other);
        let shared: Vec<&PortFamily> = pm.host_ip.singles().iter().filter(held).collect();
        let on = match shared[..] {
            [single] => *single,
            _ => PortFamily::Both,
        };
        return Err(Problem::HostPortTaken {
            port: pm.host_port,
            protocol: pm.protocol,
            on,
            other,
            name: state.tasks[other].name.clone(),
        });
    }
    for f in pm.host_ip.singles() {
        taken.host_ports.insert(key(*f), i);
    }
    Ok(())
}

/// Every rule that is checked without the kernel (SPEC §4, §6); the security groups as typed
/// rules when all hold.
pub fn validate(state: &State, bridge: BridgeNet) -> Result<Rules, StateError> {
    host(state)?;
    let (index, groups) = groups(state)?;
    let mut taken = Taken::default();
    let tasks = state
        .tasks
        .iter()
        .enumerate()
        .map(|t| task(state, t, bridge, &index, &mut taken))
        .collect::<Result<_, _>>()?;
    Ok(Rules {
        default_policy: state.host.default_policy,
        groups,
        tasks,
    })
}
