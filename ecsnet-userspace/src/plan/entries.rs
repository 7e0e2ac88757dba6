//! Every map entry the datapath's maps hold for a state on this host, in the byte order the
//! maps keep (network order for addresses and ports). Pure: the host comes in as a snapshot.

use std::net::Ipv4Addr;

use ecsnet_common::maps::{
    CONFIG_BLOCK_IMDS, CONFIG_DEFAULT_DENY, Config, IfaceInfo, PortKey, PortTarget, ROLE_TASK,
    ROLE_UPLINK, TASK_IPV6, TaskInfo,
};

use crate::{
    host::netlink::Snapshot,
    plan::{sg::Compiled, tasks::ResolvedTask},
    state::{DefaultPolicy, Host, State},
};

/// An address as the maps hold it: network byte order in a `u32`.
pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// An address from a map's network-order `u32` ([`be`] undone).
pub fn from_be(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// The `TASKS` entries: each task by address (network order), with its policy number.
pub fn task_entries(tasks: &[ResolvedTask], policy: &Compiled) -> Vec<(u32, TaskInfo)> {
    tasks
        .iter()
        .map(|t| {
            (
                be(t.ipv4),
                TaskInfo {
                    ifindex: t.ifindex,
                    mac: t.mac,
                    flags: if t.ipv6.is_some() { TASK_IPV6 } else { 0 },
                    _pad: 0,
                    policy: policy.policy_of(t.ipv4),
                },
            )
        })
        .collect()
}

/// The `TASKS6` entries: the interface of each task with an IPv6 address, by that address.
pub fn task6_entries(tasks: &[ResolvedTask]) -> Vec<([u8; 16], u32)> {
    tasks
        .iter()
        .filter_map(|t| Some((t.ipv6?.octets(), t.ifindex)))
        .collect()
}

/// The task rows of `IFACES`: each task's interface by ifindex, with the task's address.
pub fn iface_entries(tasks: &[ResolvedTask]) -> Vec<(u32, IfaceInfo)> {
    tasks
        .iter()
        .map(|t| (t.ifindex, IfaceInfo::new(be(t.ipv4), ROLE_TASK)))
        .collect()
}

/// `Config::flags` for the state file's `host`.
pub fn config_flags(host: &Host) -> u8 {
    let imds = if host.block_instance_metadata {
        CONFIG_BLOCK_IMDS
    } else {
        0
    };
    let deny = if host.default_policy == DefaultPolicy::Deny {
        CONFIG_DEFAULT_DENY
    } else {
        0
    };
    imds | deny
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
                        addr: be(t.ipv4_address),
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
    snap.addrs.iter().map(|a| (be(a.ip), a.index)).collect()
}

/// Why the datapath cannot be configured for this host.
#[derive(Debug, thiserror::Error)]
#[expect(
    clippy::enum_variant_names,
    reason = "each names what the host lacks: no uplink address, no bridge address, no bridge MAC"
)]
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
        uplink_ipv4: be(up.ip),
        bridge_ifindex: bridge,
        bridge_ipv4: be(br.ip),
        bridge_mac: mac,
        flags: 0,
        bridge_prefix: br.prefix,
    })
}

/// The `IFACES` entry of the uplink.
pub fn uplink_entry(ifindex: u32) -> (u32, IfaceInfo) {
    (ifindex, IfaceInfo::new(0, ROLE_UPLINK))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{host::netlink::Link, plan::tasks::tests::task, state::Protocol};

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
                ip: Ipv4Addr::new(172, 17, 0, 1),
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
            ip: Ipv4Addr::new(10, 10, 0, 1),
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
            ipv6: None,
            ifindex: 9,
            ifname: "v".into(),
            mac: [0; 6],
        };
        let tasks = task_entries(std::slice::from_ref(&t), &Compiled::default());
        assert!(task6_entries(std::slice::from_ref(&t)).is_empty());
        let ifaces = iface_entries(&[t]);
        assert_eq!(tasks[0].0.to_ne_bytes(), [172, 17, 0, 2]);
        assert_eq!(tasks[0].1.flags, 0);
        assert_eq!(
            ifaces[0],
            (
                9,
                IfaceInfo::new(u32::from_ne_bytes([172, 17, 0, 2]), ROLE_TASK)
            )
        );
    }

    #[test]
    fn a_task_with_an_ipv6_address_is_marked_and_found_by_it() {
        let v6: std::net::Ipv6Addr = "fd00:ec5:17::242:ac11:2".parse().unwrap();
        let t = ResolvedTask {
            name: "a".into(),
            ipv4: Ipv4Addr::new(172, 17, 0, 2),
            ipv6: Some(v6),
            ifindex: 9,
            ifname: "v".into(),
            mac: [0; 6],
        };
        let tasks = task_entries(std::slice::from_ref(&t), &Compiled::default());
        assert_eq!(tasks[0].1.flags, TASK_IPV6);
        assert_eq!(task6_entries(&[t]), [(v6.octets(), 9)]);
    }

    #[test]
    fn addresses_convert_to_and_from_network_order() {
        let a = Ipv4Addr::new(172, 17, 0, 2);
        assert_eq!(be(a).to_ne_bytes(), [172, 17, 0, 2]);
        assert_eq!(be(a), u32::from(a).to_be());
        assert_eq!(from_be(be(a)), a);
    }
}
