//! A snapshot of the namespace's network as rtnetlink reports it: links, IPv4 addresses, the
//! default route, neighbours and bridge FDB. Queries are pure functions over the snapshot.

use std::net::Ipv4Addr;

use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo},
    neighbour::{NeighbourAddress, NeighbourAttribute},
    route::{RouteAttribute, RouteMessage},
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink {what} dump failed: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("tokio runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, ... as the kernel names the kind; empty when it has none (lo).
    pub kind: String,
    /// ifindex of the bridge this link is a port of.
    pub master: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    /// ifindex of the IPv4 default route's device.
    pub default_oif: Option<u32>,
    /// IPv4 neighbours: (ifindex, address, MAC).
    pub neigh: Vec<(u32, Ipv4Addr, [u8; 6])>,
    /// Bridge FDB: (port ifindex, MAC).
    pub fdb: Vec<(u32, [u8; 6])>,
}

fn mac(bytes: &[u8]) -> Option<[u8; 6]> {
    bytes.try_into().ok()
}

impl Snapshot {
    /// Reads the calling thread's network namespace.
    pub fn read() -> Result<Self, NetlinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Runtime)?;
        rt.block_on(Self::read_async())
    }

    pub async fn read_async() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        let task = tokio::spawn(conn);
        let dump = |what| move |source| NetlinkError::Dump { what, source };
        let mut snap = Snapshot::default();

        let links: Vec<_> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump("link"))?;
        for msg in links {
            let mut link = Link {
                index: msg.header.index,
                name: String::new(),
                kind: String::new(),
                master: None,
                mac: None,
                up: msg
                    .header
                    .flags
                    .contains(netlink_packet_route::link::LinkFlags::Up),
            };
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => link.name = n,
                    LinkAttribute::Controller(m) => link.master = Some(m),
                    LinkAttribute::Address(a) => link.mac = mac(&a),
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            if let LinkInfo::Kind(kind) = info {
                                link.kind = match kind {
                                    InfoKind::Veth => "veth".into(),
                                    InfoKind::Bridge => "bridge".into(),
                                    other => format!("{other:?}").to_lowercase(),
                                };
                            }
                        }
                    }
                    _ => {}
                }
            }
            snap.links.push(link);
        }

        let addrs: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump("address"))?;
        for msg in addrs {
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            for attr in &msg.attributes {
                if let AddressAttribute::Local(std::net::IpAddr::V4(a))
                | AddressAttribute::Address(std::net::IpAddr::V4(a)) = attr
                {
                    let a = Addr {
                        index: msg.header.index,
                        addr: *a,
                        prefix: msg.header.prefix_len,
                    };
                    if !snap.addrs.contains(&a) {
                        snap.addrs.push(a);
                    }
                }
            }
        }

        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let routes: Vec<_> = handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(dump("route"))?;
        for msg in routes {
            let main = msg.attributes.iter().all(|a| match a {
                RouteAttribute::Table(t) => *t == 254,
                _ => true,
            }) && msg.header.table == 254;
            if msg.header.destination_prefix_length == 0 && main {
                for attr in &msg.attributes {
                    if let RouteAttribute::Oif(oif) = attr {
                        snap.default_oif.get_or_insert(*oif);
                    }
                }
            }
        }

        let neigh: Vec<_> = handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump("neighbour"))?;
        for msg in neigh {
            let mut dst = None;
            let mut lla = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
                    NeighbourAttribute::LinkLayerAddress(l) => lla = mac(l),
                    _ => {}
                }
            }
            if let (Some(d), Some(l)) = (dst, lla) {
                snap.neigh.push((msg.header.ifindex, d, l));
            }
        }

        let fdb: Vec<_> = handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(dump("fdb"))?;
        for msg in fdb {
            for attr in &msg.attributes {
                if let NeighbourAttribute::LinkLayerAddress(l) = attr
                    && let Some(m) = mac(l)
                {
                    snap.fdb.push((msg.header.ifindex, m));
                }
            }
        }
        task.abort();
        Ok(snap)
    }

    pub fn by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn by_index(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    /// The first IPv4 address of a link.
    pub fn ipv4_of(&self, index: u32) -> Option<Addr> {
        self.addrs.iter().copied().find(|a| a.index == index)
    }

    /// Every local IPv4 address (what `addrtype --dst-type LOCAL` matches, less broadcast).
    pub fn local_ipv4(&self) -> Vec<Ipv4Addr> {
        self.addrs.iter().map(|a| a.addr).collect()
    }

    /// The bridge port through which `addr` is reached: neighbour MAC, then the bridge FDB.
    pub fn port_for_address(&self, bridge: u32, addr: Ipv4Addr) -> Option<&Link> {
        let (_, _, mac) = self
            .neigh
            .iter()
            .find(|(ifx, a, _)| *ifx == bridge && *a == addr)?;
        self.fdb
            .iter()
            .filter(|(_, m)| m == mac)
            .filter_map(|(port, _)| self.by_index(*port))
            .find(|l| l.master == Some(bridge))
    }

    /// The bridge that most task veths hang off: the tasks' master device.
    pub fn guess_bridge(&self) -> Option<&Link> {
        let bridges = self.links.iter().filter(|l| l.kind == "bridge");
        bridges.max_by_key(|b| {
            self.links
                .iter()
                .filter(|l| l.master == Some(b.index) && l.kind == "veth")
                .count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str, master: Option<u32>) -> Link {
        Link {
            index,
            name: name.into(),
            kind: kind.into(),
            master,
            mac: Some([2, 0, 0, 0, 0, index as u8]),
            up: true,
        }
    }

    #[test]
    fn finds_port_by_address_and_bridge_by_ports() {
        let snap = Snapshot {
            links: vec![
                link(1, "lo", "", None),
                link(2, "eth0", "veth", None),
                link(3, "docker0", "bridge", None),
                link(4, "br-x", "bridge", None),
                link(5, "vethaaa", "veth", Some(3)),
                link(6, "vethbbb", "veth", Some(3)),
            ],
            neigh: vec![(3, Ipv4Addr::new(172, 17, 0, 3), [2, 9, 9, 9, 9, 9])],
            fdb: vec![(5, [2, 1, 1, 1, 1, 1]), (6, [2, 9, 9, 9, 9, 9])],
            ..Default::default()
        };
        assert_eq!(snap.guess_bridge().unwrap().name, "docker0");
        let port = snap
            .port_for_address(3, Ipv4Addr::new(172, 17, 0, 3))
            .unwrap();
        assert_eq!(port.name, "vethbbb");
        assert!(
            snap.port_for_address(3, Ipv4Addr::new(172, 17, 0, 9))
                .is_none()
        );
    }
}
