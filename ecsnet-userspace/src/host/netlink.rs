//! A snapshot of the namespace's network as rtnetlink reports it: links, IPv4 and IPv6
//! addresses, the default route, neighbours and bridge FDB. Queries are pure functions over the
//! snapshot.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{TryStream, TryStreamExt as _};
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    route::{RouteAttribute, RouteMessage},
};

/// The kernel's main routing table (`RT_TABLE_MAIN`), where the default route is looked for.
const RT_TABLE_MAIN: u8 = 254;

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
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

/// An IPv6 address of a link, with what decides whether the host may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr6 {
    pub index: u32,
    pub ip: Ipv6Addr,
    pub prefix: u8,
    /// Of global scope (global or unique-local, as the kernel scopes them): not link-local,
    /// not loopback.
    pub global: bool,
    /// Duplicate address detection has not cleared it (tentative, not optimistic) or found it
    /// taken (dadfailed): the kernel neither sends from it nor takes packets to it.
    pub unusable: bool,
    /// Its preferred lifetime is over: still the host's, but not a source for new flows.
    pub deprecated: bool,
}

impl Addr6 {
    /// An address the host has and answers on: global, and past duplicate address detection.
    pub fn is_host_global(&self) -> bool {
        self.global && !self.unusable
    }
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    /// IPv6 addresses of every scope, in the kernel's order.
    pub addrs6: Vec<Addr6>,
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

/// Every message of one dump (`what` names it in the error).
async fn dump<T>(
    what: &'static str,
    messages: impl TryStream<Ok = T, Error = rtnetlink::Error>,
) -> Result<Vec<T>, NetlinkError> {
    messages
        .try_collect()
        .await
        .map_err(|source| NetlinkError::Dump { what, source })
}

fn link(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: String::new(),
        master: None,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
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
    link
}

/// The IPv4 addresses of an address message.
fn addrs(msg: &AddressMessage) -> impl Iterator<Item = Addr> + '_ {
    let ipv4 = msg.header.family == AddressFamily::Inet;
    msg.attributes
        .iter()
        .filter(move |_| ipv4)
        .filter_map(|attr| match attr {
            AddressAttribute::Local(IpAddr::V4(a)) | AddressAttribute::Address(IpAddr::V4(a)) => {
                Some(Addr {
                    index: msg.header.index,
                    ip: *a,
                    prefix: msg.header.prefix_len,
                })
            }
            _ => None,
        })
}

/// The IPv6 address of an address message: its local address (`IFA_LOCAL`, set only with a
/// peer), else its address.
fn addr6(msg: &AddressMessage) -> Option<Addr6> {
    if msg.header.family != AddressFamily::Inet6 {
        return None;
    }
    let mut local = None;
    let mut address = None;
    // IFA_FLAGS, when the kernel sends it, holds every flag; the header holds the low eight.
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V6(a)) => local = Some(*a),
            AddressAttribute::Address(IpAddr::V6(a)) => address = Some(*a),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    let tentative =
        flags.contains(AddressFlags::Tentative) && !flags.contains(AddressFlags::Optimistic);
    Some(Addr6 {
        index: msg.header.index,
        ip: local.or(address)?,
        prefix: msg.header.prefix_len,
        global: msg.header.scope == AddressScope::Universe,
        unusable: tentative || flags.contains(AddressFlags::Dadfailed),
        deprecated: flags.contains(AddressFlags::Deprecated),
    })
}

/// The output interface of a default route of the main table.
fn default_oif(msg: &RouteMessage) -> Option<u32> {
    let main = msg.header.table == RT_TABLE_MAIN
        && msg.attributes.iter().all(|a| match a {
            RouteAttribute::Table(t) => *t == u32::from(RT_TABLE_MAIN),
            _ => true,
        });
    if msg.header.destination_prefix_length != 0 || !main {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(oif) => Some(*oif),
        _ => None,
    })
}

/// An IPv4 neighbour with a MAC: (ifindex, address, MAC).
fn neighbour(msg: &NeighbourMessage) -> Option<(u32, Ipv4Addr, [u8; 6])> {
    let mut dst = None;
    let mut lla = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dst = Some(*a),
            NeighbourAttribute::LinkLayerAddress(l) => lla = mac(l),
            _ => {}
        }
    }
    Some((msg.header.ifindex, dst?, lla?))
}

/// The MACs a bridge FDB entry holds: (port ifindex, MAC).
fn fdb(msg: &NeighbourMessage) -> impl Iterator<Item = (u32, [u8; 6])> + '_ {
    msg.attributes.iter().filter_map(|attr| match attr {
        NeighbourAttribute::LinkLayerAddress(l) => Some((msg.header.ifindex, mac(l)?)),
        _ => None,
    })
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
        let mut snap = Snapshot::default();
        let links = dump("link", handle.link().get().execute()).await?;
        snap.links = links.into_iter().map(link).collect();
        for msg in dump("address", handle.address().get().execute()).await? {
            for a in addrs(&msg) {
                if !snap.addrs.contains(&a) {
                    snap.addrs.push(a);
                }
            }
            snap.addrs6.extend(addr6(&msg));
        }
        let mut req = RouteMessage::default();
        req.header.address_family = AddressFamily::Inet;
        let routes = dump("route", handle.route().get(req).execute()).await?;
        snap.default_oif = routes.iter().find_map(default_oif);
        let neigh = dump("neighbour", handle.neighbours().get().execute()).await?;
        snap.neigh = neigh.iter().filter_map(neighbour).collect();
        let bridge = handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge);
        let entries = dump("fdb", bridge.execute()).await?;
        snap.fdb = entries.iter().flat_map(fdb).collect();
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

    /// The IPv6 addresses the host has and answers on, of every link: global scope, past
    /// duplicate address detection.
    pub fn host_globals6(&self) -> impl Iterator<Item = &Addr6> {
        self.addrs6.iter().filter(|a| a.is_host_global())
    }

    /// The primary global IPv6 address of a link: `keep` while the link still has it and it is
    /// not deprecated (a masquerade address should not move under its flows), else the first
    /// one the kernel lists that is not deprecated, else the first.
    pub fn ipv6_of(&self, index: u32, keep: Ipv6Addr) -> Option<Addr6> {
        self.host_globals6()
            .filter(|a| a.index == index)
            .min_by_key(|a| (a.deprecated, a.ip != keep))
            .copied()
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

/// A change of a link, as the kernel announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link was created or changed (its master, its state, its name).
    New(Link),
    /// The link with this ifindex is gone.
    Gone(u32),
}

/// The kernel's announcements of link changes in the calling thread's network namespace, from
/// the moment of `subscribe`: subscribe first, then read a snapshot, and nothing falls between.
pub struct LinkEvents {
    messages: futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    conn: tokio::task::JoinHandle<()>,
}

impl LinkEvents {
    /// Subscribes; called within a tokio runtime, which then reads the socket.
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let (conn, _handle, messages) =
            rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])
                .map_err(NetlinkError::Socket)?;
        Ok(Self {
            messages,
            conn: tokio::spawn(conn),
        })
    }

    /// The next change; None once the socket failed (a burst its buffer could not hold ends it
    /// too: subscribe again and read a snapshot).
    pub async fn next(&mut self) -> Option<LinkEvent> {
        use futures::StreamExt as _;
        use netlink_packet_route::RouteNetlinkMessage;
        use rtnetlink::packet_core::NetlinkPayload;

        loop {
            let (msg, _) = self.messages.next().await?;
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                    return Some(LinkEvent::New(link(m)));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                    return Some(LinkEvent::Gone(m.header.index));
                }
                _ => {}
            }
        }
    }
}

impl Drop for LinkEvents {
    fn drop(&mut self) {
        self.conn.abort();
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
            mac: Some([2, 0, 0, 0, 0, u8::try_from(index).unwrap()]),
            up: true,
        }
    }

    /// An address message for `ip` on link 2 with `scope`, header flags `hdr` and, when
    /// given, the `IFA_FLAGS` attribute `flags`.
    fn msg6(ip: &str, scope: AddressScope, hdr: u8, flags: Option<AddressFlags>) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet6;
        m.header.index = 2;
        m.header.prefix_len = 64;
        m.header.scope = scope;
        m.header.flags = netlink_packet_route::address::AddressHeaderFlags::from_bits_retain(hdr);
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V6(ip.parse().unwrap())));
        m.attributes.extend(flags.map(AddressAttribute::Flags));
        m
    }

    #[test]
    fn ipv6_addresses_carry_their_scope_and_what_dad_says() {
        let global = |hdr, flags| addr6(&msg6("fd00:10:10::1", AddressScope::Universe, hdr, flags));
        let a = global(0x80, None).unwrap();
        assert_eq!((a.index, a.prefix), (2, 64));
        assert_eq!(a.ip, "fd00:10:10::1".parse::<Ipv6Addr>().unwrap());
        assert!(a.is_host_global() && !a.deprecated);
        // Tentative (0x40) is not the host's yet, unless optimistic (0x04); dadfailed (0x08)
        // never is; deprecated (0x20) still is. IFA_FLAGS, when sent, has the last word.
        assert!(global(0x40, None).unwrap().unusable);
        assert!(!global(0x44, None).unwrap().unusable);
        assert!(global(0x08, None).unwrap().unusable);
        assert!(global(0x20, None).unwrap().deprecated);
        assert!(global(0x20, None).unwrap().is_host_global());
        assert!(global(0, Some(AddressFlags::Tentative)).unwrap().unusable);
        assert!(
            !global(0x40, Some(AddressFlags::Permanent))
                .unwrap()
                .unusable
        );
        let link = addr6(&msg6("fe80::1", AddressScope::Link, 0x80, None)).unwrap();
        assert!(!link.global && !link.is_host_global());
        let lo = addr6(&msg6("::1", AddressScope::Host, 0x80, None)).unwrap();
        assert!(!lo.is_host_global());
        let mut v4 = msg6("::1", AddressScope::Universe, 0, None);
        v4.header.family = AddressFamily::Inet;
        assert_eq!(addr6(&v4), None, "an IPv4 message");
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
