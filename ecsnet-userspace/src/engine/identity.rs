//! A task from a container inspect: address, prefix and MAC from its network on our bridge,
//! published ports exactly as Docker bound them (`classify`, pure), and its host-side veth found
//! through the container's network namespace (`host_veth`: its interface's `IFLA_LINK`, never a
//! guessed name).

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
};

use bollard::models::{ContainerInspectResponse, EndpointSettings, NetworkSettings, PortMap};
use futures::TryStreamExt as _;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

use super::{Skip, labels};
use crate::state::{PortFamily, PortMapping, Protocol, Task, TaskSource};

/// A running container on our bridge, before its veth is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub task: Task,
    /// Its first process, whose network namespace holds the container's interface.
    pub pid: u32,
    /// The MAC of the container's interface on our bridge.
    pub mac: [u8; 6],
    pub prefix: u8,
    pub cluster: Option<String>,
    pub has_group_label: bool,
    pub fail_closed: Option<labels::LabelError>,
    pub notes: Vec<String>,
}

/// The container's name as Docker prints it in `docker ps` (no leading '/').
pub fn container_name(c: &ContainerInspectResponse) -> String {
    let name = c.name.as_deref().unwrap_or_default();
    name.strip_prefix('/').unwrap_or(name).to_owned()
}

/// Decides whether a container is a task on `bridge`, from its inspect and the host device of
/// each network (`devices`: network id -> bridge device, None for a network of another driver).
pub fn classify(
    c: &ContainerInspectResponse,
    devices: &BTreeMap<String, Option<String>>,
    bridge: &str,
) -> Result<Candidate, Skip> {
    let state = c.state.as_ref();
    let running = state.and_then(|s| s.running).unwrap_or(false);
    let pid = state
        .and_then(|s| s.pid)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0);
    let (true, Some(pid)) = (running, pid) else {
        let status = state
            .and_then(|s| s.status)
            .map_or_else(|| "no state".to_owned(), |s| s.to_string());
        return Err(Skip::NotRunning { status });
    };
    let mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        .unwrap_or_default();
    match mode {
        "host" => return Err(Skip::HostNetwork),
        "none" => return Err(Skip::NoNetwork),
        _ => {}
    }
    if let Some(other) = mode.strip_prefix("container:") {
        return Err(Skip::SharedNetwork {
            container: other.to_owned(),
        });
    }
    let settings = c.network_settings.as_ref();
    let endpoint = on_bridge(settings, devices, bridge)?;
    let no_address = || Skip::NoAddress {
        bridge: bridge.to_owned(),
    };
    let address: Ipv4Addr = endpoint
        .ip_address
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or_else(no_address)?;
    let mac_text = endpoint.mac_address.clone().unwrap_or_default();
    let mac = crate::state::parse_mac(&mac_text).ok_or_else(no_address)?;
    // Docker's IPv6 on the bridge (`ipv6: true`), when it gave one; empty without.
    let ipv6 = endpoint
        .global_ipv6_address
        .as_deref()
        .and_then(|a| a.parse::<Ipv6Addr>().ok())
        .filter(|a| crate::state::task_ipv6(*a).is_ok());
    let prefix = endpoint
        .ip_prefix_len
        .and_then(|p| u8::try_from(p).ok())
        .filter(|p| *p <= 32)
        .unwrap_or(32);

    let config = c.config.as_ref();
    let labels: BTreeMap<String, String> = config
        .and_then(|c| c.labels.as_ref())
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let name = container_name(c);
    let id = labels::ecs_identity(&labels, &name);
    let mut notes = id.notes;
    let groups = labels::security_groups(&labels);
    let (security_groups, fail_closed) = match groups.clone() {
        None => (Vec::new(), None),
        Some(Ok(g)) => (g, None),
        Some(Err(e)) => (Vec::new(), Some(e)),
    };
    let ports = settings.and_then(|s| s.ports.as_ref());
    let port_mappings = ports.map(|p| published(p, &mut notes)).unwrap_or_default();

    let mut task = Task::new(id.name, address);
    task.ipv6_address = ipv6;
    task.source = TaskSource::Docker;
    task.container_id.clone_from(&c.id);
    task.image = config.and_then(|c| c.image.clone());
    task.mac_address = Some(mac_text);
    task.task_arn = id.task_arn;
    task.task_definition_arn = id.task_definition_arn;
    task.security_groups = security_groups;
    task.port_mappings = port_mappings;
    task.labels = labels;
    Ok(Candidate {
        task,
        pid,
        mac,
        prefix,
        cluster: id.cluster,
        has_group_label: groups.is_some(),
        fail_closed,
        notes,
    })
}

/// The container's endpoint on `bridge`, or why it has none.
fn on_bridge<'a>(
    settings: Option<&'a NetworkSettings>,
    devices: &BTreeMap<String, Option<String>>,
    bridge: &str,
) -> Result<&'a EndpointSettings, Skip> {
    let networks: BTreeMap<_, _> = settings
        .and_then(|s| s.networks.as_ref())
        .map(|n| n.iter().collect())
        .unwrap_or_default();
    let device = |id: Option<&String>| id.and_then(|id| devices.get(id)).cloned().flatten();
    if let Some(ours) = networks
        .values()
        .find(|e| device(e.network_id.as_ref()).as_deref() == Some(bridge))
    {
        return Ok(ours);
    }
    if networks.is_empty() {
        return Err(Skip::NoNetwork);
    }
    let networks = networks
        .iter()
        .map(|(name, e)| match device(e.network_id.as_ref()) {
            Some(dev) => format!("{name} ({dev})"),
            None => format!("{name} (no bridge)"),
        })
        .collect();
    Err(Skip::OtherNetworks {
        bridge: bridge.to_owned(),
        networks,
    })
}

/// The ports Docker published on every host address of a family (`0.0.0.0`, `::`, or empty
/// for both), each with its families: Docker reports the IPv4 and IPv6 bindings of one `-p`
/// apart, and they are one mapping again here. Bindings on one host address and protocols
/// ecsnet does not publish (sctp) are left to Docker, with a note.
fn published(ports: &PortMap, notes: &mut Vec<String>) -> Vec<PortMapping> {
    // (host port, protocol, container port) -> (bound on IPv4, bound on IPv6).
    let mut found: BTreeMap<(u16, Protocol, u16), (bool, bool)> = BTreeMap::new();
    for (spec, bindings) in ports {
        let Some(bindings) = bindings else {
            continue; // exposed, not published
        };
        let parsed = Protocol::split_suffix(spec)
            .ok()
            .and_then(|(port, proto)| Some((port.parse::<u16>().ok()?, proto)));
        let Some((container_port, protocol)) = parsed.filter(|(p, _)| *p != 0) else {
            notes.push(format!("port {spec} is not tcp or udp: left to Docker"));
            continue;
        };
        for b in bindings {
            let host_ip = b.host_ip.as_deref().unwrap_or_default();
            let host_port = b.host_port.as_deref().unwrap_or_default();
            let Some(host_port) = host_port.parse::<u16>().ok().filter(|p| *p != 0) else {
                notes.push(format!(
                    "port {spec}: host port {host_port:?} not bound yet"
                ));
                continue;
            };
            let Some(family) = PortFamily::of_host_ip(host_ip) else {
                notes.push(format!(
                    "port {spec} published on {host_ip}:{host_port} only: left to Docker"
                ));
                continue;
            };
            let bound = found
                .entry((host_port, protocol, container_port))
                .or_default();
            bound.0 |= family.has_ipv4();
            bound.1 |= family.has_ipv6();
        }
    }
    found
        .into_iter()
        .map(
            |((host_port, protocol, container_port), bound)| PortMapping {
                container_port,
                host_port,
                protocol,
                host_ip: match bound {
                    (true, false) => PortFamily::Ipv4,
                    (false, true) => PortFamily::Ipv6,
                    _ => PortFamily::Both,
                },
            },
        )
        .collect()
}

/// The host end of a container's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    pub ifindex: u32,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VethError {
    #[error("cannot enter the network namespace of pid {pid}: {source}")]
    Netns { pid: u32, source: std::io::Error },
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("no interface with MAC {mac} in the container")]
    NoInterface { mac: String },
    #[error("the container's interface {name} has no peer (not a veth)")]
    NoPeer { name: String },
    #[error("the peer of the container's {name}, ifindex {index}, is not in this namespace")]
    PeerElsewhere { name: String, index: u32 },
    #[error("bridge {bridge} not found in this namespace")]
    NoBridge { bridge: String },
    #[error("the peer {peer} is not a veth port of {bridge}")]
    NotOnBridge { peer: String, bridge: String },
}

/// What a link message says of a link, as far as finding veths goes.
#[derive(Debug, Default)]
struct LinkFacts {
    index: u32,
    name: String,
    mac: Option<[u8; 6]>,
    /// `IFLA_LINK`: a veth's peer ifindex (in the peer's namespace).
    peer: Option<u32>,
    master: Option<u32>,
    veth: bool,
}

impl From<LinkMessage> for LinkFacts {
    fn from(msg: LinkMessage) -> Self {
        let mut f = LinkFacts {
            index: msg.header.index,
            ..LinkFacts::default()
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => f.name = n,
                LinkAttribute::Address(a) => f.mac = a.try_into().ok(),
                LinkAttribute::Link(p) => f.peer = Some(p),
                LinkAttribute::Controller(m) => f.master = Some(m),
                LinkAttribute::LinkInfo(info) => {
                    f.veth |= info.contains(&LinkInfo::Kind(InfoKind::Veth));
                }
                _ => {}
            }
        }
        f
    }
}

/// A netlink connection opened inside the network namespace of `pid`: a short-lived thread
/// enters it (setns moves only that thread) and opens the socket there, which stays in that
/// namespace; the connection runs on the caller's runtime.
async fn netlink_of(
    pid: u32,
) -> Result<(rtnetlink::Handle, tokio::task::JoinHandle<()>), VethError> {
    let rt = tokio::runtime::Handle::current();
    let (tx, rx) = oneshot::channel();
    let open = move || -> std::io::Result<_> {
        let ns = File::open(format!("/proc/{pid}/ns/net"))?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let _in_rt = rt.enter();
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok((handle, rt.spawn(conn)))
    };
    std::thread::Builder::new()
        .name("ecsnet-netns".into())
        .spawn(move || {
            // The receiver is gone only when the lookup was dropped: nothing to tell.
            let _ = tx.send(open());
        })
        .map_err(|source| VethError::Netns { pid, source })?;
    let opened = rx.await.map_err(|_| VethError::Netns {
        pid,
        source: std::io::Error::other("the namespace thread ended without an answer"),
    })?;
    opened.map_err(|source| VethError::Netns { pid, source })
}

async fn links(
    handle: &rtnetlink::Handle,
    filter: impl FnOnce(rtnetlink::LinkGetRequest) -> rtnetlink::LinkGetRequest,
) -> Result<Vec<LinkFacts>, rtnetlink::Error> {
    let found: Result<Vec<LinkMessage>, _> =
        filter(handle.link().get()).execute().try_collect().await;
    match found {
        Ok(msgs) => Ok(msgs.into_iter().map(LinkFacts::from).collect()),
        // No such device: an empty answer.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The host end of the container interface with `mac` in the network namespace of `pid`, as a
/// port of `bridge` in ours (`host`: a netlink connection of the agent's namespace): the
/// interface's `IFLA_LINK` is its peer's ifindex here, which must be a veth whose master is the
/// bridge and whose own peer is that interface.
pub async fn host_veth(
    host: &rtnetlink::Handle,
    pid: u32,
    mac: [u8; 6],
    bridge: &str,
) -> Result<Veth, VethError> {
    let (inside, conn) = netlink_of(pid).await?;
    let found = links(&inside, |r| r).await;
    conn.abort();
    let iface = found?
        .into_iter()
        .find(|l| l.mac == Some(mac))
        .ok_or_else(|| VethError::NoInterface {
            mac: format_mac(mac),
        })?;
    let index = iface.peer.ok_or_else(|| VethError::NoPeer {
        name: iface.name.clone(),
    })?;
    let peer = links(host, |r| r.match_index(index))
        .await?
        .into_iter()
        .next()
        .filter(|p| p.peer == Some(iface.index))
        .ok_or_else(|| VethError::PeerElsewhere {
            name: iface.name.clone(),
            index,
        })?;
    let br = links(host, |r| r.match_name(bridge.to_owned()))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| VethError::NoBridge {
            bridge: bridge.to_owned(),
        })?;
    if !peer.veth || peer.master != Some(br.index) {
        return Err(VethError::NotOnBridge {
            peer: peer.name,
            bridge: bridge.to_owned(),
        });
    }
    Ok(Veth {
        ifindex: peer.index,
        name: peer.name,
    })
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::labels::LabelError;

    const BRIDGE_ID: &str = "3ba1db06fab903da09517e08ee505b29b5d7d4844398c66b217780084bf058ac";
    const APPNET_ID: &str = "34b6958bbbb4c286734c62e2ee09d46ea69df1cbcbb05d939389cf449f6e5e60";
    const HOST_ID: &str = "81a16b54d093aa7c827a8e4490364b0fc5b0b10a78ad07f8418df8acf71b1e39";
    const NONE_ID: &str = "c01c537cc1bbbc688841112d53289ef272185caff2fb1bee96c93783e2b169d7";

    /// `docker inspect` of Docker 20.10.24, one object each.
    fn fixture(name: &str) -> ContainerInspectResponse {
        let text = match name {
            "ecs" => include_str!("fixtures/ecs-web-3-web-8a9b.json"),
            "plain" => include_str!("fixtures/plain.json"),
            "hostnet" => include_str!("fixtures/hostnet.json"),
            "nonet" => include_str!("fixtures/nonet.json"),
            "onapp" => include_str!("fixtures/onapp.json"),
            "created" => include_str!("fixtures/created.json"),
            "exited" => include_str!("fixtures/exited.json"),
            other => panic!("no fixture {other}"),
        };
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The networks of that engine, as `docker network inspect` gave them.
    fn devices() -> BTreeMap<String, Option<String>> {
        let text = include_str!("fixtures/networks.json");
        let nets: Vec<bollard::models::NetworkInspect> = serde_json::from_str(text).unwrap();
        let mut d: BTreeMap<_, _> = nets
            .into_iter()
            .map(|n| {
                let id = n.id.unwrap();
                let options = n.options.unwrap_or_default();
                let dev = super::super::client::bridge_device(
                    &id,
                    n.driver.as_deref().unwrap(),
                    &options,
                );
                (id, dev)
            })
            .collect();
        d.insert(HOST_ID.into(), None);
        d.insert(NONE_ID.into(), None);
        d
    }

    #[test]
    fn networks_of_the_fixture_engine() {
        let d = devices();
        assert_eq!(d[BRIDGE_ID].as_deref(), Some("docker0"));
        assert_eq!(d[APPNET_ID].as_deref(), Some("br-34b6958bbbb4"));
    }

    #[test]
    fn ecs_container_is_a_task_with_its_labels_ports_and_groups() {
        let c = classify(&fixture("ecs"), &devices(), "docker0").unwrap();
        let t = &c.task;
        assert_eq!(t.source, TaskSource::Docker);
        assert_eq!(t.name, "0a1b2c3d4e5f67890123456789abcdef/web");
        assert_eq!(t.ipv4_address, Ipv4Addr::new(172, 17, 0, 2));
        assert_eq!(c.prefix, 16);
        assert_eq!(c.cluster.as_deref(), Some("demo"));
        assert_eq!(c.pid, 5053);
        assert_eq!(c.mac, [0x02, 0x42, 0xac, 0x11, 0x00, 0x02]);
        assert_eq!(t.mac_address.as_deref(), Some("02:42:ac:11:00:02"));
        assert_eq!(
            t.container_id.as_deref(),
            Some("81563542e95860ec5fc2d31f40bae1626326f2595f79592bc2b77e5e87c33dd3")
        );
        assert_eq!(t.image.as_deref(), Some("ecsnet/busybox:1.35"));
        assert_eq!(
            t.task_definition_arn.as_deref(),
            Some("arn:aws:ecs:us-east-1:123456789012:task-definition/web:3")
        );
        assert_eq!(t.security_groups, ["sg-web", "sg-lb"]);
        assert!(c.has_group_label);
        assert_eq!(c.fail_closed, None);
        assert_eq!(t.labels.len(), 6);
        assert_eq!(t.labels["com.amazonaws.ecs.cluster"], "demo");
        assert_eq!(t.interface, None, "the veth comes from the namespace");
        // 80/tcp on 8080 and 53/udp on the dynamic 32768, each bound on 0.0.0.0 and ::;
        // 90/tcp on 127.0.0.1 only stays Docker's.
        let ports: Vec<_> = t
            .port_mappings
            .iter()
            .map(|p| (p.container_port, p.host_port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [(80, 8080, Protocol::Tcp), (53, 32768, Protocol::Udp)]
        );
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        assert!(c.notes[0].contains("127.0.0.1:9090 only"), "{:?}", c.notes);
    }

    #[test]
    fn plain_container_is_a_task_named_after_it_with_the_default_policy() {
        let c = classify(&fixture("plain"), &devices(), "docker0").unwrap();
        assert_eq!(c.task.name, "plain");
        assert_eq!(c.task.ipv4_address, Ipv4Addr::new(172, 17, 0, 3));
        assert_eq!(c.task.task_arn, None);
        assert!(c.task.security_groups.is_empty());
        assert!(!c.has_group_label);
        assert!(c.task.port_mappings.is_empty());
        assert!(c.task.labels.is_empty());
        assert!(c.notes.is_empty());
    }

    #[test]
    fn containers_that_are_not_tasks_say_why() {
        let d = devices();
        let skip = |name| classify(&fixture(name), &d, "docker0").unwrap_err();
        assert_eq!(skip("hostnet"), Skip::HostNetwork);
        assert_eq!(skip("nonet"), Skip::NoNetwork);
        assert_eq!(
            skip("onapp"),
            Skip::OtherNetworks {
                bridge: "docker0".into(),
                networks: vec!["appnet (br-34b6958bbbb4)".into()],
            }
        );
        assert_eq!(
            skip("onapp").to_string(),
            "not on bridge docker0: only on appnet (br-34b6958bbbb4)"
        );
        assert_eq!(
            skip("created"),
            Skip::NotRunning {
                status: "created".into()
            }
        );
        assert_eq!(
            skip("exited"),
            Skip::NotRunning {
                status: "exited".into()
            }
        );
        // The same engine seen by an agent on the user-defined network's bridge.
        let on_app = classify(&fixture("onapp"), &d, "br-34b6958bbbb4").unwrap();
        assert_eq!(on_app.task.ipv4_address, Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(
            classify(&fixture("plain"), &d, "br-34b6958bbbb4").unwrap_err(),
            Skip::OtherNetworks {
                bridge: "br-34b6958bbbb4".into(),
                networks: vec!["bridge (docker0)".into()],
            }
        );
    }

    #[test]
    fn shared_namespace_and_missing_address() {
        let d = devices();
        let mut c = fixture("plain");
        c.host_config.as_mut().unwrap().network_mode = Some("container:81563542e958".into());
        assert_eq!(
            classify(&c, &d, "docker0").unwrap_err(),
            Skip::SharedNetwork {
                container: "81563542e958".into()
            }
        );
        let mut c = fixture("plain");
        let nets = c.network_settings.as_mut().unwrap().networks.as_mut();
        nets.unwrap().get_mut("bridge").unwrap().ip_address = Some(String::new());
        assert_eq!(
            classify(&c, &d, "docker0").unwrap_err(),
            Skip::NoAddress {
                bridge: "docker0".into()
            }
        );
    }

    #[test]
    fn the_ipv6_address_docker_gave_is_the_tasks() {
        let d = devices();
        let c = classify(&fixture("plain"), &d, "docker0").unwrap();
        assert_eq!(c.task.ipv6_address, None, "Docker gave none");
        for (given, taken) in [
            ("fd00:ec5:17::242:ac11:3", Some("fd00:ec5:17::242:ac11:3")),
            ("2001:db8:1::3", Some("2001:db8:1::3")),
            ("fe80::42:acff:fe11:3", None),
            ("not an address", None),
        ] {
            let mut c = fixture("plain");
            let nets = c.network_settings.as_mut().unwrap().networks.as_mut();
            nets.unwrap().get_mut("bridge").unwrap().global_ipv6_address = Some(given.into());
            let t = classify(&c, &d, "docker0").unwrap().task;
            assert_eq!(t.ipv6_address, taken.map(|a| a.parse().unwrap()), "{given}");
        }
    }

    #[test]
    fn bad_group_label_fails_closed() {
        let mut c = fixture("ecs");
        let labels = c.config.as_mut().unwrap().labels.as_mut().unwrap();
        labels.insert("ecsnet.security-groups".into(), "sg-web,,sg-lb".into());
        let c = classify(&c, &devices(), "docker0").unwrap();
        assert!(c.has_group_label);
        assert!(c.task.security_groups.is_empty());
        assert_eq!(
            c.fail_closed,
            Some(LabelError::EmptyGroup {
                value: "sg-web,,sg-lb".into(),
                index: 1
            })
        );
    }

    #[test]
    fn published_ports_dedupe_and_keep_what_docker_bound() {
        let text = r#"{
            "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32770"}, {"HostIp": "::", "HostPort": "32770"}],
            "81/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32771"}, {"HostIp": "::", "HostPort": "32772"}],
            "53/udp": [{"HostIp": "", "HostPort": "53"}],
            "53/tcp": [{"HostIp": "0.0.0.0", "HostPort": "53"}],
            "9/sctp": [{"HostIp": "0.0.0.0", "HostPort": "9"}],
            "443/tcp": null,
            "22/tcp": [{"HostIp": "10.0.0.5", "HostPort": "2222"}, {"HostIp": "0.0.0.0", "HostPort": "2200"}]
        }"#;
        let map: PortMap = serde_json::from_str(text).unwrap();
        let mut notes = Vec::new();
        let got: Vec<_> = published(&map, &mut notes)
            .into_iter()
            .map(|p| {
                (
                    p.container_port,
                    p.host_port,
                    p.protocol.as_str(),
                    p.host_ip,
                )
            })
            .collect();
        // 80's two bindings are one mapping again; 81's two ports are one family each.
        assert_eq!(
            got,
            [
                (53, 53, "tcp", PortFamily::Ipv4),
                (53, 53, "udp", PortFamily::Both),
                (22, 2200, "tcp", PortFamily::Ipv4),
                (80, 32770, "tcp", PortFamily::Both),
                (81, 32771, "tcp", PortFamily::Ipv4),
                (81, 32772, "tcp", PortFamily::Ipv6),
            ]
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("9/sctp")), "{notes:?}");
        assert!(
            notes.iter().any(|n| n.contains("10.0.0.5:2222")),
            "{notes:?}"
        );
    }

    #[test]
    fn published_ports_keep_the_family_of_each_binding() {
        // `docker run -p 0.0.0.0:8080:80 -p [::]:8081:80 -p 8082:80 -p 8083:83/udp` on Docker
        // 20.10: the default binds both families, as two entries; `[::]` is spelt `::`.
        let text = r#"{
            "80/tcp": [
                {"HostIp": "0.0.0.0", "HostPort": "8080"},
                {"HostIp": "::", "HostPort": "8081"},
                {"HostIp": "0.0.0.0", "HostPort": "8082"},
                {"HostIp": "::", "HostPort": "8082"}
            ],
            "83/udp": [{"HostIp": "::", "HostPort": "8083"}, {"HostIp": "0.0.0.0", "HostPort": "8083"}],
            "84/tcp": [{"HostIp": "::1", "HostPort": "8084"}, {"HostIp": "::", "HostPort": "8084"}]
        }"#;
        let map: PortMap = serde_json::from_str(text).unwrap();
        let mut notes = Vec::new();
        let got: Vec<_> = published(&map, &mut notes)
            .into_iter()
            .map(|p| (p.host_port, p.container_port, p.protocol, p.host_ip))
            .collect();
        assert_eq!(
            got,
            [
                (8080, 80, Protocol::Tcp, PortFamily::Ipv4),
                (8081, 80, Protocol::Tcp, PortFamily::Ipv6),
                (8082, 80, Protocol::Tcp, PortFamily::Both),
                (8083, 83, Protocol::Udp, PortFamily::Both),
                (8084, 84, Protocol::Tcp, PortFamily::Ipv6),
            ]
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("::1:8084 only"), "{notes:?}");
    }

    #[test]
    fn macs_print_as_docker_does_and_read_back() {
        // The parser's own cases are in `state`'s tests.
        let mac = [2, 0x42, 0xac, 0x11, 0, 0x0a];
        assert_eq!(format_mac(mac), "02:42:ac:11:00:0a");
        assert_eq!(crate::state::parse_mac(&format_mac(mac)), Some(mac));
    }
}
