//! The tasks on this host: each one's interface on the bridge (from a snapshot of the host) and
//! the dynamic host ports, kept stable across applies. Pure: the snapshot is given.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use crate::{
    host::netlink::{Link, Snapshot},
    plan::{PlanError, PlanProblem},
    state::{PortFamily, Protocol, State, Task},
};

/// A task with everything the datapath needs resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTask {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    pub ifindex: u32,
    pub ifname: String,
    /// The task's own MAC when the host has a neighbour entry for it, else zero.
    pub mac: [u8; 6],
}

/// A snapshot's links, neighbours and FDB indexed once per resolve, so that finding a
/// thousand tasks' interfaces is a thousand lookups, not a thousand scans of every list.
struct Indexed<'a> {
    by_name: HashMap<&'a str, &'a Link>,
    by_index: HashMap<u32, &'a Link>,
    /// (ifindex, address) -> MAC: the first neighbour entry, as a scan would find it.
    neigh: HashMap<(u32, Ipv4Addr), [u8; 6]>,
    /// Bridge FDB: port -> its MACs, and MAC -> its ports, in the snapshot's order.
    fdb_of_port: HashMap<u32, Vec<[u8; 6]>>,
    ports_of_mac: HashMap<[u8; 6], Vec<u32>>,
}

impl<'a> Indexed<'a> {
    fn new(snap: &'a Snapshot) -> Self {
        let mut ix = Indexed {
            by_name: HashMap::new(),
            by_index: HashMap::new(),
            neigh: HashMap::new(),
            fdb_of_port: HashMap::new(),
            ports_of_mac: HashMap::new(),
        };
        for l in &snap.links {
            ix.by_name.entry(l.name.as_str()).or_insert(l);
            ix.by_index.entry(l.index).or_insert(l);
        }
        for &(ifindex, addr, mac) in &snap.neigh {
            ix.neigh.entry((ifindex, addr)).or_insert(mac);
        }
        for &(port, mac) in &snap.fdb {
            ix.fdb_of_port.entry(port).or_default().push(mac);
            ix.ports_of_mac.entry(mac).or_default().push(port);
        }
        ix
    }

    /// `Snapshot::port_for_address`: the bridge port through which `addr` is reached.
    fn port_for_address(&self, bridge: u32, addr: Ipv4Addr) -> Option<&'a Link> {
        let mac = self.neigh.get(&(bridge, addr))?;
        self.ports_of_mac
            .get(mac)?
            .iter()
            .filter_map(|port| self.by_index.get(port).copied())
            .find(|l| l.master == Some(bridge))
    }
}

/// The link of task `i`: the one it names, which must be a port of `bridge`, or the port
/// behind its address.
fn link_of<'a>(
    ix: &Indexed<'a>,
    bridge: u32,
    (i, t): (usize, &Task),
) -> Result<&'a Link, PlanError> {
    let Some(name) = &t.interface else {
        return ix.port_for_address(bridge, t.ipv4_address).ok_or_else(|| {
            let addr = t.ipv4_address;
            PlanError::at(
                format!("$.tasks[{i}].ipv4Address"),
                PlanProblem::NoNeighbour { addr },
            )
        });
    };
    let at = |problem| PlanError::at(format!("$.tasks[{i}].interface"), problem);
    let name = name.clone();
    let link = ix
        .by_name
        .get(name.as_str())
        .copied()
        .ok_or_else(|| at(PlanProblem::NoInterface { name: name.clone() }))?;
    if link.master != Some(bridge) {
        return Err(at(PlanProblem::NotABridgePort { name }));
    }
    Ok(link)
}

/// The MAC of the task at `addr` on port `link`: the bridge's neighbour entry, else the one
/// unicast MAC the bridge learned on the port; zero when neither says.
fn mac_of(ix: &Indexed<'_>, bridge: u32, addr: Ipv4Addr, link: &Link) -> [u8; 6] {
    let mut learned = ix
        .fdb_of_port
        .get(&link.index)
        .into_iter()
        .flatten()
        .filter(|m| m[0] & 1 == 0 && Some(**m) != link.mac)
        .copied();
    ix.neigh
        .get(&(bridge, addr))
        .copied()
        .or_else(|| {
            let first = learned.next();
            if learned.next().is_some() {
                None
            } else {
                first
            }
        })
        .unwrap_or_default()
}

/// Finds every task's interface on the bridge: the named one, or the port behind its address.
pub fn resolve(
    state: &State,
    snap: &Snapshot,
    bridge: u32,
) -> Result<Vec<ResolvedTask>, PlanError> {
    let ix = Indexed::new(snap);
    let mut out = Vec::with_capacity(state.tasks.len());
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (i, t) in state.tasks.iter().enumerate() {
        let link = link_of(&ix, bridge, (i, t))?;
        if let Some(other) = seen.insert(link.index, i) {
            let name = link.name.clone();
            return Err(PlanError::at(
                format!("$.tasks[{i}].interface"),
                PlanProblem::InterfaceTaken { name, other },
            ));
        }
        out.push(ResolvedTask {
            name: t.name.clone(),
            ipv4: t.ipv4_address,
            ipv6: t.ipv6_address,
            ifindex: link.index,
            ifname: link.name.clone(),
            mac: t
                .mac_address
                .as_deref()
                .and_then(crate::state::parse_mac)
                .unwrap_or_else(|| mac_of(&ix, bridge, t.ipv4_address, link)),
        });
    }
    Ok(out)
}

/// Key of a port mapping that keeps its dynamic host port across applies: task name, container
/// port, protocol, families.
pub type MappingKey = (String, u16, Protocol, PortFamily);

/// Gives every `hostPort: 0` a free port from `range`: the one it had before when still free,
/// else the lowest free one. Fails only when the range is exhausted. A port taken in either
/// family is not free for any: a dynamic port is never shared.
pub fn assign_dynamic_ports<S: std::hash::BuildHasher>(
    state: &mut State,
    previous: &HashMap<MappingKey, u16, S>,
) -> Result<(), PlanError> {
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
            let key = (t.name.clone(), pm.container_port, pm.protocol, pm.host_ip);
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
                .ok_or_else(|| {
                    PlanError::at(
                        format!("$.tasks[{i}].portMappings[{j}].hostPort"),
                        PlanProblem::PortsExhausted {
                            protocol: pm.protocol,
                            lo,
                            hi,
                        },
                    )
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
    let mut by_name: HashMap<&str, &Task> = HashMap::new();
    for r in &requested.tasks {
        by_name.entry(r.name.as_str()).or_insert(r);
    }
    for t in &applied.tasks {
        let Some(req) = by_name.get(t.name.as_str()) else {
            continue;
        };
        for pm in &t.port_mappings {
            let was_dynamic = req.port_mappings.iter().any(|r| {
                r.host_port == 0
                    && r.container_port == pm.container_port
                    && r.protocol == pm.protocol
                    && r.host_ip == pm.host_ip
            });
            if was_dynamic {
                out.insert(
                    (t.name.clone(), pm.container_port, pm.protocol, pm.host_ip),
                    pm.host_port,
                );
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::PortMapping;

    pub(crate) fn task(name: &str, ip: [u8; 4], ports: &[(u16, u16, Protocol)]) -> Task {
        Task {
            port_mappings: ports
                .iter()
                .map(|&(c, h, p)| PortMapping {
                    container_port: c,
                    host_port: h,
                    protocol: p,
                    host_ip: PortFamily::Both,
                })
                .collect(),
            ..Task::new(name, ip.into())
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
    fn dynamic_ports_of_one_container_port_in_two_families_stay_apart_and_stable() {
        let mut s = State::default();
        s.host.ephemeral_ports = [50000, 50009];
        let mut a = task(
            "a",
            [172, 17, 0, 2],
            &[(80, 0, Protocol::Tcp), (80, 0, Protocol::Tcp)],
        );
        a.port_mappings[0].host_ip = PortFamily::Ipv6;
        a.port_mappings[1].host_ip = PortFamily::Ipv4;
        s.tasks = vec![task("b", [172, 17, 0, 3], &[(80, 0, Protocol::Tcp)]), a];
        let requested = s.clone();
        assign_dynamic_ports(&mut s, &HashMap::new()).unwrap();
        let ports = |s: &State| -> Vec<u16> {
            s.tasks
                .iter()
                .flat_map(|t| t.port_mappings.iter().map(|p| p.host_port))
                .collect()
        };
        assert_eq!(ports(&s), [50000, 50001, 50002]);
        // Task b goes: a's two keep theirs, each by its family.
        let prev = dynamic_ports_of(&s, &requested);
        let mut again = requested.clone();
        again.tasks.remove(0);
        again.tasks[0].port_mappings.reverse();
        assign_dynamic_ports(&mut again, &prev).unwrap();
        let by_family: Vec<_> = again.tasks[0]
            .port_mappings
            .iter()
            .map(|p| (p.host_ip, p.host_port))
            .collect();
        assert_eq!(
            by_family,
            [(PortFamily::Ipv4, 50002), (PortFamily::Ipv6, 50001)]
        );
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
        assert_eq!(
            resolve(&s, &snap, 3).unwrap_err().to_string(),
            "$.tasks[0].interface: no interface \"nope\" on this host"
        );
        s.tasks[0].interface = None;
        assert_eq!(
            resolve(&s, &snap, 3).unwrap_err().path,
            "$.tasks[0].ipv4Address"
        );
    }
}
