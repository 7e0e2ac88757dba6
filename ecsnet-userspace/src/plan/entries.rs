//! Every map entry the datapath's maps hold for a state on this host, in the byte order the
//! maps keep (network order for addresses and ports). Pure: the host comes in as a snapshot.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ecsnet_common::maps::{
    CONFIG_BLOCK_IMDS, CONFIG_DEFAULT_DENY, CONFIG6_MASQUERADE, Config, Config6, IfaceInfo,
    PortKey, PortTarget, PortTarget6, ROLE_TASK, ROLE_UPLINK, TASK_IPV6, TaskInfo,
};

use crate::{
    host::netlink::Snapshot,
    plan::{sg::Compiled, tasks::ResolvedTask},
    state::{DefaultPolicy, Host, Ipv6Mode, PortFamily, State, Task},
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

/// The `TASKS6` entries of the tasks of `applied` with an IPv6 address, on the interface
/// `TASKS` (`tasks`, as the kernel has it) gives their IPv4 address: what `ecsnet upgrade`
/// fills for a datapath an older build wrote, which had no `TASKS6`.
pub fn task6_entries_of(applied: &State, tasks: &[(u32, TaskInfo)]) -> Vec<([u8; 16], u32)> {
    let ifindex: HashMap<u32, u32> = tasks.iter().map(|(a, t)| (*a, t.ifindex)).collect();
    applied
        .tasks
        .iter()
        .filter_map(|t| {
            let v6 = t.ipv6_address?;
            Some((v6.octets(), *ifindex.get(&be(t.ipv4_address))?))
        })
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

/// Every port published on a family `on` picks: its task, its `PORTS`/`PORTS6` key and the
/// container port, in network byte order.
fn published(
    state: &State,
    on: fn(PortFamily) -> bool,
) -> impl Iterator<Item = (&Task, PortKey, u16)> {
    state.tasks.iter().flat_map(move |t| {
        t.port_mappings
            .iter()
            .filter(move |pm| on(pm.host_ip))
            .map(move |pm| {
                let key = PortKey {
                    port: pm.host_port.to_be(),
                    proto: pm.protocol.number(),
                    _pad: 0,
                };
                (t, key, pm.container_port.to_be())
            })
    })
}

/// The `PORTS` entries: every host port published on IPv4 (no `hostIp`, or "0.0.0.0") to its
/// task's address and container port, all in network byte order.
pub fn port_entries(state: &State) -> Vec<(PortKey, PortTarget)> {
    published(state, PortFamily::has_ipv4)
        .map(|(t, key, port)| {
            let addr = be(t.ipv4_address);
            (
                key,
                PortTarget {
                    addr,
                    port,
                    _pad: [0; 2],
                },
            )
        })
        .collect()
}

/// The `PORTS6` entries: the host ports published on IPv6 (no `hostIp`, as Docker's default
/// `-p 8080:80` binds both families, or "::") of the tasks that have an IPv6 address, to that
/// address and the container port; a task without an IPv6 address has none here, and in
/// Docker's routed mode (`host.ipv6Mode`) no port is published on the host's IPv6 addresses.
pub fn port6_entries(state: &State) -> Vec<(PortKey, PortTarget6)> {
    if !state.host.ipv6_mode.is_nat() {
        return Vec::new();
    }
    published(state, PortFamily::has_ipv6)
        .filter_map(|(t, key, port)| {
            let addr = t.ipv6_address?.octets();
            Some((
                key,
                PortTarget6 {
                    addr,
                    port,
                    _pad: [0; 2],
                },
            ))
        })
        .collect()
}

/// The `LOCAL_ADDRS` entries: every IPv4 address of the host, network byte order -> ifindex.
pub fn local_addr_entries(snap: &Snapshot) -> Vec<(u32, u32)> {
    snap.addrs.iter().map(|a| (be(a.ip), a.index)).collect()
}

/// The `LOCAL_ADDRS6` entries: every global (or unique-local) IPv6 address the host answers on
/// -> ifindex; link-local and loopback addresses, and those still in or failed by duplicate
/// address detection, are not.
pub fn local_addr6_entries(snap: &Snapshot) -> Vec<([u8; 16], u32)> {
    snap.host_globals6()
        .map(|a| (a.ip.octets(), a.index))
        .collect()
}

/// The `CONFIG6` entry for a host whose uplink and bridge are `uplink` and `bridge`, where
/// `CONFIG6` holds `now` (all zeros at first), in IPv6 mode `mode` (the applied state's
/// `host.ipv6Mode`): each address is the link's primary global IPv6 address, the one `now`
/// holds while the link keeps it; zeros where the link has none, as on a host without IPv6;
/// the flags as [`config6_flags`] has them.
pub fn config6_entry(
    snap: &Snapshot,
    uplink: u32,
    bridge: u32,
    now: &Config6,
    mode: Ipv6Mode,
) -> Config6 {
    let up = snap.ipv6_of(uplink, Ipv6Addr::from(now.uplink_ipv6));
    let br = snap.ipv6_of(bridge, Ipv6Addr::from(now.bridge_ipv6));
    let uplink_ipv6 = up.map_or([0; 16], |a| a.ip.octets());
    Config6 {
        uplink_ipv6,
        bridge_ipv6: br.map_or([0; 16], |a| a.ip.octets()),
        bridge_prefix6: br.map_or(0, |a| a.prefix),
        flags: config6_flags(mode, uplink_ipv6),
        _pad: [0; 2],
    }
}

/// `CONFIG6`'s flags in IPv6 mode `mode` when the uplink's address is `uplink_ipv6`:
/// `CONFIG6_MASQUERADE` in Docker's `nat` mode when there is an address to masquerade to; in
/// `routed` mode the tasks' own addresses leave the host, and without an address the kernel
/// (Docker's ip6tables) keeps the flows it would masquerade.
pub fn config6_flags(mode: Ipv6Mode, uplink_ipv6: [u8; 16]) -> u8 {
    if mode.is_nat() && uplink_ipv6 != [0; 16] {
        CONFIG6_MASQUERADE
    } else {
        0
    }
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
    use crate::{
        host::netlink::{Addr6, Link},
        plan::tasks::tests::task,
        state::Protocol,
    };

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

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_ports_are_the_ports_of_tasks_with_an_ipv6_address() {
        let ports = [(80, 8080, Protocol::Tcp), (53, 8053, Protocol::Udp)];
        let mut a = task("a", [172, 17, 0, 2], &ports);
        let b = task("b", [172, 17, 0, 3], &[(443, 8443, Protocol::Tcp)]);
        let s = |a: &Task| State {
            tasks: vec![a.clone(), b.clone()],
            ..Default::default()
        };
        assert!(port6_entries(&s(&a)).is_empty(), "no task has IPv6");
        assert_eq!(port_entries(&s(&a)).len(), 3);

        a.ipv6_address = Some(v6("fd00:172:17::242:ac11:2"));
        let key = |port: u16, proto| PortKey {
            port: port.to_be(),
            proto,
            _pad: 0,
        };
        let to = |port: u16| PortTarget6 {
            addr: v6("fd00:172:17::242:ac11:2").octets(),
            port: port.to_be(),
            _pad: [0; 2],
        };
        assert_eq!(
            port6_entries(&s(&a)),
            [(key(8080, 6), to(80)), (key(8053, 17), to(53))]
        );
        // The same keys as the IPv4 entries of the task.
        let v4: Vec<PortKey> = port_entries(&s(&a)).iter().map(|(k, _)| *k).collect();
        assert_eq!(v4, [key(8080, 6), key(8053, 17), key(8443, 6)]);
    }

    #[test]
    fn each_family_has_the_ports_published_on_it() {
        let ports = [
            (80, 8080, Protocol::Tcp),
            (80, 8081, Protocol::Tcp),
            (80, 8082, Protocol::Tcp),
        ];
        let mut a = task("a", [172, 17, 0, 2], &ports);
        a.port_mappings[0].host_ip = PortFamily::Ipv4;
        a.port_mappings[1].host_ip = PortFamily::Ipv6;
        a.ipv6_address = Some(v6("fd00:172:17::242:ac11:2"));
        // Another task on 8080 over IPv6 only: the same key, in the other map.
        let mut b = task("b", [172, 17, 0, 3], &[(443, 8080, Protocol::Tcp)]);
        b.port_mappings[0].host_ip = PortFamily::Ipv6;
        b.ipv6_address = Some(v6("fd00:172:17::242:ac11:3"));
        let s = State {
            tasks: vec![a, b],
            ..Default::default()
        };
        let v4: Vec<(u16, [u8; 4])> = port_entries(&s)
            .iter()
            .map(|(k, t)| (u16::from_be(k.port), t.addr.to_ne_bytes()))
            .collect();
        assert_eq!(v4, [(8080, [172, 17, 0, 2]), (8082, [172, 17, 0, 2])]);
        let v6s: Vec<(u16, Ipv6Addr, u16)> = port6_entries(&s)
            .iter()
            .map(|(k, t)| {
                let port = u16::from_be(t.port);
                (u16::from_be(k.port), Ipv6Addr::from(t.addr), port)
            })
            .collect();
        assert_eq!(
            v6s,
            [
                (8081, v6("fd00:172:17::242:ac11:2"), 80),
                (8082, v6("fd00:172:17::242:ac11:2"), 80),
                (8080, v6("fd00:172:17::242:ac11:3"), 443),
            ]
        );
        // Without an IPv6 address a task publishes nothing over IPv6, whatever its hostIp.
        let mut s = s;
        s.tasks[1].ipv6_address = None;
        assert_eq!(port6_entries(&s).len(), 2);
        // Docker's routed mode publishes nothing on the host's IPv6 addresses; IPv4 stays.
        s.host.ipv6_mode = Ipv6Mode::Routed;
        assert!(port6_entries(&s).is_empty());
        assert_eq!(port_entries(&s).len(), 2);
    }

    #[test]
    fn an_upgrade_finds_the_ipv6_tasks_on_their_ipv4_interfaces() {
        let mut a = task("a", [172, 17, 0, 2], &[]);
        a.ipv6_address = Some(v6("fd00:172:17::242:ac11:2"));
        let b = task("b", [172, 17, 0, 3], &[]);
        // Not in TASKS (the agent has not seen its interface): nowhere to point at.
        let mut c = task("c", [172, 17, 0, 4], &[]);
        c.ipv6_address = Some(v6("fd00:172:17::242:ac11:4"));
        let applied = State {
            tasks: vec![a, b, c],
            ..Default::default()
        };
        let info = |ifindex| TaskInfo {
            ifindex,
            mac: [0; 6],
            flags: 0,
            _pad: 0,
            policy: 0,
        };
        let in_map = [
            (be(Ipv4Addr::new(172, 17, 0, 2)), info(7)),
            (be(Ipv4Addr::new(172, 17, 0, 3)), info(8)),
        ];
        assert_eq!(
            task6_entries_of(&applied, &in_map),
            [(v6("fd00:172:17::242:ac11:2").octets(), 7)]
        );
    }

    /// An IPv6 address of link `index`, global and usable unless changed.
    fn addr6(index: u32, ip: &str, prefix: u8) -> Addr6 {
        Addr6 {
            index,
            ip: v6(ip),
            prefix,
            global: true,
            unusable: false,
            deprecated: false,
        }
    }

    #[test]
    fn local_ipv6_addresses_are_the_global_ones_the_host_answers_on() {
        let snap = Snapshot {
            addrs6: vec![
                Addr6 {
                    global: false,
                    ..addr6(1, "::1", 128)
                },
                addr6(2, "fd00:10:10::1", 64),
                addr6(2, "2001:db8::5", 64),
                Addr6 {
                    global: false,
                    ..addr6(2, "fe80::1", 64)
                },
                addr6(3, "fd00:172:17::1", 64),
                Addr6 {
                    unusable: true,
                    ..addr6(3, "fd00:172:17::9", 64)
                },
                Addr6 {
                    deprecated: true,
                    ..addr6(3, "fd00:172:17::8", 64)
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            local_addr6_entries(&snap),
            [
                (v6("fd00:10:10::1").octets(), 2),
                (v6("2001:db8::5").octets(), 2),
                (v6("fd00:172:17::1").octets(), 3),
                (v6("fd00:172:17::8").octets(), 3),
            ]
        );
        assert!(local_addr6_entries(&Snapshot::default()).is_empty());
    }

    const NAT: Ipv6Mode = Ipv6Mode::Nat;

    #[test]
    fn config6_masquerades_in_nat_mode_with_an_uplink_address_only() {
        let snap = Snapshot {
            addrs6: vec![
                addr6(2, "fd00:10:10::1", 64),
                addr6(3, "fd00:172:17::1", 64),
            ],
            ..Default::default()
        };
        let zero = Config6::default();
        let nat = config6_entry(&snap, 2, 3, &zero, NAT);
        assert_eq!(nat.flags, CONFIG6_MASQUERADE);
        let routed = config6_entry(&snap, 2, 3, &zero, Ipv6Mode::Routed);
        assert_eq!(routed.flags, 0);
        assert_eq!(
            Config6 {
                flags: CONFIG6_MASQUERADE,
                ..routed
            },
            nat,
            "the mode changes the flag only"
        );
        // The mode switching back and forth over a written entry: the flag follows it.
        assert_eq!(config6_entry(&snap, 2, 3, &nat, Ipv6Mode::Routed), routed);
        assert_eq!(config6_entry(&snap, 2, 3, &routed, NAT), nat);
        // An uplink without an IPv6 address has nothing to masquerade to, whatever the mode,
        // even with a bridge address.
        let bridge_only = config6_entry(&snap, 9, 3, &nat, NAT);
        assert_eq!(bridge_only.uplink_ipv6, [0; 16]);
        assert_ne!(bridge_only.bridge_ipv6, [0; 16]);
        assert_eq!(bridge_only.flags, 0);
        assert_eq!(config6_entry(&Snapshot::default(), 2, 3, &nat, NAT), zero);
        // An address refresh over a set flag keeps it.
        assert_eq!(config6_entry(&snap, 2, 3, &nat, NAT), nat);

        assert_eq!(config6_flags(NAT, [1; 16]), CONFIG6_MASQUERADE);
        assert_eq!(config6_flags(NAT, [0; 16]), 0);
        assert_eq!(config6_flags(Ipv6Mode::Routed, [1; 16]), 0);
    }

    #[test]
    fn config6_is_zero_without_ipv6_and_keeps_its_addresses_while_they_last() {
        let zero = Config6::default();
        assert_eq!(config6_entry(&Snapshot::default(), 2, 3, &zero, NAT), zero);
        let mut snap = Snapshot {
            addrs6: vec![
                Addr6 {
                    global: false,
                    ..addr6(2, "fe80::2", 64)
                },
                Addr6 {
                    deprecated: true,
                    ..addr6(2, "2001:db8::9", 64)
                },
                addr6(2, "fd00:10:10::1", 64),
                addr6(3, "fd00:172:17::1", 64),
            ],
            ..Default::default()
        };
        let c = config6_entry(&snap, 2, 3, &zero, NAT);
        assert_eq!(Ipv6Addr::from(c.uplink_ipv6), v6("fd00:10:10::1"));
        assert_eq!(Ipv6Addr::from(c.bridge_ipv6), v6("fd00:172:17::1"));
        assert_eq!(c.bridge_prefix6, 64);
        assert_eq!(config6_entry(&snap, 2, 9, &zero, NAT).bridge_ipv6, [0; 16]);

        // A new address (the kernel lists it first) does not move the masquerade address...
        snap.addrs6.insert(0, addr6(2, "fd00:10:10::77", 64));
        assert_eq!(config6_entry(&snap, 2, 3, &c, NAT), c);
        assert_eq!(
            Ipv6Addr::from(config6_entry(&snap, 2, 3, &zero, NAT).uplink_ipv6),
            v6("fd00:10:10::77"),
            "from nothing, the first the kernel lists"
        );
        // ... until it goes, or is deprecated.
        snap.addrs6[3].deprecated = true;
        let moved = config6_entry(&snap, 2, 3, &c, NAT);
        assert_eq!(Ipv6Addr::from(moved.uplink_ipv6), v6("fd00:10:10::77"));
        assert_eq!(moved.bridge_ipv6, c.bridge_ipv6);
        snap.addrs6.retain(|a| a.index != 2 || a.deprecated);
        assert_eq!(
            Ipv6Addr::from(config6_entry(&snap, 2, 3, &moved, NAT).uplink_ipv6),
            v6("2001:db8::9"),
            "a deprecated address is better than none"
        );
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
