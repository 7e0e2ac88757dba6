//! State into datapath entries: resolve each task's interface on the live host, choose dynamic
//! host ports, and turn the result into map keys and values. Pure apart from the snapshot it is
//! given, so every rule here is unit-tested.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ecsnet_common::maps::{
    Config, IfaceInfo, PortKey, PortTarget, ROLE_TASK, ROLE_UPLINK, TaskInfo,
};

use crate::{
    host::netlink::Snapshot,
    state::{Protocol, State, StateError},
};

/// A task with everything the datapath needs resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTask {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ifindex: u32,
    pub ifname: String,
    /// The task's own MAC when the host has a neighbour entry for it, else zero.
    pub mac: [u8; 6],
}

/// Finds every task's interface on the bridge: the named one, or the port behind its address.
pub fn resolve(
    state: &State,
    snap: &Snapshot,
    bridge: u32,
) -> Result<Vec<ResolvedTask>, StateError> {
    let mut out = Vec::with_capacity(state.tasks.len());
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (i, t) in state.tasks.iter().enumerate() {
        let link = match &t.interface {
            Some(name) => {
                let path = format!("$.tasks[{i}].interface");
                let link = snap.by_name(name).ok_or_else(|| StateError {
                    path: path.clone(),
                    message: format!("no interface {name:?} on this host"),
                })?;
                if link.master != Some(bridge) {
                    return Err(StateError {
                        path,
                        message: format!("interface {name:?} is not a port of the bridge"),
                    });
                }
                link
            }
            None => snap.port_for_address(bridge, t.ipv4_address).ok_or_else(|| StateError {
                path: format!("$.tasks[{i}].ipv4Address"),
                message: format!(
                    "cannot find the interface of {}: no bridge neighbour entry for it; give \"interface\"",
                    t.ipv4_address
                ),
            })?,
        };
        if let Some(j) = seen.insert(link.index, i) {
            return Err(StateError {
                path: format!("$.tasks[{i}].interface"),
                message: format!(
                    "interface {:?} is also the interface of $.tasks[{j}]",
                    link.name
                ),
            });
        }
        // The neighbour entry, else the one unicast MAC the bridge learned on the task's port.
        let learned = snap
            .fdb
            .iter()
            .filter(|(port, m)| *port == link.index && m[0] & 1 == 0 && Some(*m) != link.mac);
        let mac = snap
            .neigh
            .iter()
            .find(|(ifx, a, _)| *ifx == bridge && *a == t.ipv4_address)
            .map(|(_, _, m)| *m)
            .or_else(|| {
                let mut it = learned;
                let first = it.next().map(|(_, m)| *m);
                if it.next().is_some() { None } else { first }
            })
            .unwrap_or_default();
        out.push(ResolvedTask {
            name: t.name.clone(),
            ipv4: t.ipv4_address,
            ifindex: link.index,
            ifname: link.name.clone(),
            mac,
        });
    }
    Ok(out)
}

/// Key of a port mapping that keeps its dynamic host port across applies.
pub type MappingKey = (String, u16, Protocol);

/// Gives every `hostPort: 0` a free port from `range`: the one it had before when still free,
/// else the lowest free one. Fails only when the range is exhausted.
pub fn assign_dynamic_ports(
    state: &mut State,
    previous: &HashMap<MappingKey, u16>,
) -> Result<(), StateError> {
    let [lo, hi] = state.host.ephemeral_ports;
    let mut used: BTreeSet<(u16, Protocol)> = state
        .tasks
        .iter()
        .flat_map(|t| t.port_mappings.iter())
        .filter(|pm| pm.host_port != 0)
        .map(|pm| (pm.host_port, pm.protocol))
        .collect();
    let mut next: HashMap<Protocol, u16> = HashMap::new();
    for (i, t) in state.tasks.iter_mut().enumerate() {
        for (j, pm) in t.port_mappings.iter_mut().enumerate() {
            if pm.host_port != 0 {
                continue;
            }
            let key = (t.name.clone(), pm.container_port, pm.protocol);
            if let Some(&p) = previous.get(&key)
                && (lo..=hi).contains(&p)
                && !used.contains(&(p, pm.protocol))
            {
                pm.host_port = p;
                used.insert((p, pm.protocol));
                continue;
            }
            let start = next.entry(pm.protocol).or_insert(lo);
            let port = (*start..=hi)
                .find(|p| !used.contains(&(*p, pm.protocol)))
                .ok_or_else(|| StateError {
                    path: format!("$.tasks[{i}].portMappings[{j}].hostPort"),
                    message: format!(
                        "no free {} host port left in ephemeralPorts [{lo}, {hi}]",
                        pm.protocol.as_str()
                    ),
                })?;
            used.insert((port, pm.protocol));
            *start = port;
            pm.host_port = port;
        }
    }
    Ok(())
}

/// Dynamic ports chosen by an earlier apply, to keep them stable.
pub fn dynamic_ports_of(applied: &State, requested: &State) -> HashMap<MappingKey, u16> {
    let mut out = HashMap::new();
    for t in &applied.tasks {
        let Some(req) = requested.tasks.iter().find(|r| r.name == t.name) else {
            continue;
        };
        for pm in &t.port_mappings {
            let was_dynamic = req.port_mappings.iter().any(|r| {
                r.host_port == 0
                    && r.container_port == pm.container_port
                    && r.protocol == pm.protocol
            });
            if was_dynamic {
                out.insert(
                    (t.name.clone(), pm.container_port, pm.protocol),
                    pm.host_port,
                );
            }
        }
    }
    out
}

/// Map entries for the tasks: `TASKS` by address (network order) and `IFACES` by ifindex.
pub fn task_entries(
    tasks: &[ResolvedTask],
    policy: &crate::plan::sg::Compiled,
) -> (Vec<(u32, TaskInfo)>, Vec<(u32, IfaceInfo)>) {
    let by_addr = tasks
        .iter()
        .map(|t| {
            (
                u32::from(t.ipv4).to_be(),
                TaskInfo {
                    ifindex: t.ifindex,
                    mac: t.mac,
                    _pad: [0; 2],
                    policy: policy.policy_of(t.ipv4),
                },
            )
        })
        .collect();
    let by_if = tasks
        .iter()
        .map(|t| {
            (
                t.ifindex,
                IfaceInfo {
                    ipv4: u32::from(t.ipv4).to_be(),
                    role: ROLE_TASK,
                    _pad: [0; 3],
                },
            )
        })
        .collect();
    (by_addr, by_if)
}

/// `Config::flags` for the state file's `host`.
pub fn config_flags(host: &crate::state::Host) -> u8 {
    if host.block_instance_metadata {
        ecsnet_common::maps::CONFIG_BLOCK_IMDS
    } else {
        0
    }
}

/// The `PORTS` entries: every published host port to its task's address and container port,
/// all in network byte order.
pub fn port_entries(state: &State) -> Vec<(PortKey, PortTarget)> {
    state
        .tasks
        .iter()
        .flat_map(|t| {
            t.port_mappings.iter().map(move |pm| {
                (
                    PortKey {
                        port: pm.host_port.to_be(),
                        proto: pm.protocol.number(),
                        _pad: 0,
                    },
                    PortTarget {
                        addr: u32::from(t.ipv4_address).to_be(),
                        port: pm.container_port.to_be(),
                        _pad: [0; 2],
                    },
                )
            })
        })
        .collect()
}

/// The `LOCAL_ADDRS` entries: every IPv4 address of the host, network byte order -> ifindex.
pub fn local_addr_entries(snap: &Snapshot) -> Vec<(u32, u32)> {
    snap.addrs
        .iter()
        .map(|a| (u32::from(a.addr).to_be(), a.index))
        .collect()
}

/// Why the datapath cannot be configured for this host.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the uplink {0:?} has no IPv4 address to masquerade to; add one or give --uplink")]
    NoUplinkAddress(String),
    #[error("the bridge {0:?} has no IPv4 address (the tasks' gateway); give --bridge")]
    NoBridgeAddress(String),
    #[error("the bridge {0:?} has no MAC address")]
    NoBridgeMac(String),
}

/// The `CONFIG` entry for a host whose uplink and bridge are `uplink` and `bridge`.
pub fn config_entry(snap: &Snapshot, uplink: u32, bridge: u32) -> Result<Config, ConfigError> {
    let name = |i| snap.by_index(i).map(|l| l.name.clone()).unwrap_or_default();
    let up = snap
        .ipv4_of(uplink)
        .ok_or_else(|| ConfigError::NoUplinkAddress(name(uplink)))?;
    let br = snap
        .ipv4_of(bridge)
        .ok_or_else(|| ConfigError::NoBridgeAddress(name(bridge)))?;
    let mac = snap
        .by_index(bridge)
        .and_then(|l| l.mac)
        .ok_or_else(|| ConfigError::NoBridgeMac(name(bridge)))?;
    Ok(Config {
        uplink_ifindex: uplink,
        uplink_ipv4: u32::from(up.addr).to_be(),
        bridge_ifindex: bridge,
        bridge_ipv4: u32::from(br.addr).to_be(),
        bridge_mac: mac,
        flags: 0,
        bridge_prefix: br.prefix,
    })
}

/// The `IFACES` entry of the uplink.
pub fn uplink_entry(ifindex: u32) -> (u32, IfaceInfo) {
    (
        ifindex,
        IfaceInfo {
            ipv4: 0,
            role: ROLE_UPLINK,
            _pad: [0; 3],
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::netlink::Link,
        state::{PortMapping, Task},
    };

    fn task(name: &str, ip: [u8; 4], ports: &[(u16, u16, Protocol)]) -> Task {
        Task {
            task_arn: None,
            name: name.into(),
            ipv4_address: ip.into(),
            interface: None,
            interface_id: None,
            port_mappings: ports
                .iter()
                .map(|&(c, h, p)| PortMapping {
                    container_port: c,
                    host_port: h,
                    protocol: p,
                })
                .collect(),
            security_groups: vec![],
            service_name: None,
            task_definition_arn: None,
            container_id: None,
        }
    }

    #[test]
    fn dynamic_ports_skip_static_ones_and_stay_stable() {
        let mut s = State::default();
        s.host.ephemeral_ports = [50000, 50003];
        s.tasks = vec![
            task(
                "a",
                [172, 17, 0, 2],
                &[(80, 50000, Protocol::Tcp), (81, 0, Protocol::Tcp)],
            ),
            task(
                "b",
                [172, 17, 0, 3],
                &[(80, 0, Protocol::Tcp), (53, 0, Protocol::Udp)],
            ),
        ];
        let requested = s.clone();
        assign_dynamic_ports(&mut s, &HashMap::new()).unwrap();
        assert_eq!(s.tasks[0].port_mappings[1].host_port, 50001);
        assert_eq!(s.tasks[1].port_mappings[0].host_port, 50002);
        assert_eq!(
            s.tasks[1].port_mappings[1].host_port, 50000,
            "udp has its own space"
        );

        // Task a goes away; b keeps its ports although lower ones are now free.
        let prev = dynamic_ports_of(&s, &requested);
        let mut again = requested.clone();
        again.tasks.remove(0);
        assign_dynamic_ports(&mut again, &prev).unwrap();
        assert_eq!(again.tasks[0].port_mappings[0].host_port, 50002);
    }

    #[test]
    fn dynamic_ports_exhausted_is_an_error_with_a_path() {
        let mut s = State::default();
        s.host.ephemeral_ports = [50000, 50000];
        s.tasks = vec![task(
            "a",
            [172, 17, 0, 2],
            &[(80, 0, Protocol::Tcp), (81, 0, Protocol::Tcp)],
        )];
        let err = assign_dynamic_ports(&mut s, &HashMap::new()).unwrap_err();
        assert_eq!(err.path, "$.tasks[0].portMappings[1].hostPort");
    }

    #[test]
    fn resolve_checks_bridge_membership() {
        let link = |index, name: &str, master| Link {
            index,
            name: name.into(),
            kind: "veth".into(),
            master,
            mac: None,
            up: true,
        };
        let snap = Snapshot {
            links: vec![
                link(3, "docker0", None),
                link(5, "vetha", Some(3)),
                link(6, "eth0", None),
            ],
            ..Default::default()
        };
        let mut s = State::default();
        let mut t = task("a", [172, 17, 0, 2], &[]);
        t.interface = Some("vetha".into());
        s.tasks = vec![t];
        let r = resolve(&s, &snap, 3).unwrap();
        assert_eq!(r[0].ifindex, 5);
        s.tasks[0].interface = Some("eth0".into());
        assert_eq!(
            resolve(&s, &snap, 3).unwrap_err().path,
            "$.tasks[0].interface"
        );
        s.tasks[0].interface = Some("nope".into());
        assert!(
            resolve(&s, &snap, 3)
                .unwrap_err()
                .message
                .contains("no interface")
        );
        s.tasks[0].interface = None;
        assert_eq!(
            resolve(&s, &snap, 3).unwrap_err().path,
            "$.tasks[0].ipv4Address"
        );
    }

    #[test]
    fn port_entries_are_network_order_per_protocol() {
        let s = State {
            tasks: vec![task(
                "a",
                [172, 17, 0, 2],
                &[(80, 8080, Protocol::Tcp), (53, 8053, Protocol::Udp)],
            )],
            ..Default::default()
        };
        let e = port_entries(&s);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(e[0].0.proto, 6);
        assert_eq!(e[0].1.port.to_ne_bytes(), 80u16.to_be_bytes());
        assert_eq!(e[0].1.addr.to_ne_bytes(), [172, 17, 0, 2]);
        assert_eq!(e[1].0.proto, 17);
    }

    #[test]
    fn config_needs_addresses_and_a_mac() {
        use crate::host::netlink::Addr;
        let link = |index, name: &str, mac| Link {
            index,
            name: name.into(),
            kind: "x".into(),
            master: None,
            mac,
            up: true,
        };
        let mut snap = Snapshot {
            links: vec![
                link(2, "eth0", Some([2; 6])),
                link(3, "docker0", Some([3; 6])),
            ],
            addrs: vec![Addr {
                index: 3,
                addr: Ipv4Addr::new(172, 17, 0, 1),
                prefix: 16,
            }],
            ..Default::default()
        };
        assert!(matches!(
            config_entry(&snap, 2, 3),
            Err(ConfigError::NoUplinkAddress(n)) if n == "eth0"
        ));
        snap.addrs.push(Addr {
            index: 2,
            addr: Ipv4Addr::new(10, 10, 0, 1),
            prefix: 24,
        });
        let c = config_entry(&snap, 2, 3).unwrap();
        assert_eq!(c.uplink_ipv4.to_ne_bytes(), [10, 10, 0, 1]);
        assert_eq!(c.bridge_ipv4.to_ne_bytes(), [172, 17, 0, 1]);
        assert_eq!(c.bridge_mac, [3; 6]);
    }

    #[test]
    fn entries_use_network_order() {
        let t = ResolvedTask {
            name: "a".into(),
            ipv4: Ipv4Addr::new(172, 17, 0, 2),
            ifindex: 9,
            ifname: "v".into(),
            mac: [0; 6],
        };
        let (tasks, ifaces) = task_entries(&[t], &crate::plan::sg::Compiled::default());
        assert_eq!(tasks[0].0.to_ne_bytes(), [172, 17, 0, 2]);
        assert_eq!(
            ifaces[0],
            (
                9,
                IfaceInfo {
                    ipv4: u32::from_ne_bytes([172, 17, 0, 2]),
                    role: ROLE_TASK,
                    _pad: [0; 3]
                }
            )
        );
    }
}
