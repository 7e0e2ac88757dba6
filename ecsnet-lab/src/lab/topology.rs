//! The lab's network over rtnetlink: named namespaces (made and removed as `ip netns add|del`
//! do it), veth pairs, docker0, addresses, routes and sysctls. Nothing here runs `ip`.

use std::{
    fs::{self, File},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::Path,
    process::Command,
};

use futures::TryStreamExt as _;
use nix::{
    errno::Errno,
    fcntl::OFlag,
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
    sys::stat::Mode,
    unistd::Pid,
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressHeaderFlags},
        link::{InfoData, InfoKind, InfoPortKind, InfoVeth, LinkAttribute, LinkMessage},
        route::{RouteProtocol, RouteScope},
    },
};

use ecsnet::host::netns::{NETNS_DIR, path as netns_path};

use super::{
    BRIDGE, BRIDGE_ADDR, BRIDGE_ADDR6, BRIDGE_PREFIX, BRIDGE_PREFIX6, CLIENT_ADDR, CLIENT_ADDR6,
    Ipv6Mode, LabError, LabTask, UPLINK, UPLINK_ADDR, UPLINK_ADDR6, UPLINK_PREFIX, UPLINK_PREFIX6,
};

/// A task's end of its veth, in the task's namespace.
const TASK_LINK: &str = "eth0";

/// What stands behind the host's uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// The imitation: docker0 and the tasks' namespaces made here, Docker's rules loaded.
    Bridge,
    /// The benchmark's ceiling: no bridge, each task behind a /32 route.
    Ceiling,
    /// A real dockerd makes docker0 and the tasks; the host keeps IPv6 (Docker's default, so
    /// docker-proxy can listen on `[::]` too).
    Engine,
}

/// Builds the lab's network: host and client joined by the uplink, docker0 on the host (for
/// the ceiling, a route to the tasks through the host instead; for a real engine, nothing:
/// dockerd makes docker0), and every task on its veth. With `ipv6`, dual stack: the uplink,
/// docker0 and the tasks get their IPv6 addresses too (tasks those of `LabTask::address6`).
pub(super) fn build(
    host: &str,
    client: &str,
    tasks: &[LabTask],
    shape: Shape,
    ipv6: Option<Ipv6Mode>,
) -> Result<(), LabError> {
    let v6 = ipv6.is_some();
    let ceiling = shape == Shape::Ceiling;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| LabError::Netns {
            netns: host.to_owned(),
            what: "tokio runtime".to_owned(),
            source,
        })?;
    runtime.block_on(async {
        let host = Ns::add(host, v6).await?;
        let client = Ns::add(client, v6).await?;
        quick_multicast_reports(&host)?;
        // The uplink: host eth0 <-> client eth0, the VPC subnet.
        host.veth(UPLINK, &client, UPLINK).await?;
        host.address(UPLINK, UPLINK_ADDR.into(), UPLINK_PREFIX)
            .await?;
        client
            .address(UPLINK, CLIENT_ADDR.into(), UPLINK_PREFIX)
            .await?;
        host.up(UPLINK).await?;
        client.up(UPLINK).await?;
        let default = route().gateway(CLIENT_ADDR);
        host.route(&format!("default via {CLIENT_ADDR}"), default)
            .await?;
        if v6 {
            host.address(UPLINK, UPLINK_ADDR6.into(), UPLINK_PREFIX6)
                .await?;
            client
                .address(UPLINK, CLIENT_ADDR6.into(), UPLINK_PREFIX6)
                .await?;
            let default = route6().gateway(CLIENT_ADDR6);
            host.route(&format!("default via {CLIENT_ADDR6}"), default)
                .await?;
        }
        if ipv6 == Some(Ipv6Mode::Routed) {
            // No NAT66: the outside routes fixed-cidr-v6 to the host, as a VPC route table
            // would.
            let to_tasks = route6()
                .destination_prefix(BRIDGE_ADDR6, BRIDGE_PREFIX6)
                .gateway(UPLINK_ADDR6);
            let what = format!("{BRIDGE_ADDR6}/{BRIDGE_PREFIX6} via {UPLINK_ADDR6}");
            client.route(&what, to_tasks).await?;
        }
        if shape == Shape::Engine {
            // dockerd turns forwarding on itself, and sets FORWARD's policy to DROP as it
            // does so (it leaves the policy alone where forwarding was on already).
            host.set_sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
            host.set_sysctl("net.ipv6.conf.default.disable_ipv6", "0")?;
        } else if ceiling {
            host.sysctl("net.ipv4.ip_forward")?;
            if v6 {
                host.sysctl("net.ipv6.conf.all.forwarding")?;
            }
            // The client routes the task subnet through the host: nothing translates.
            let subnet = Ipv4Addr::from(u32::from(BRIDGE_ADDR) & !(u32::MAX >> BRIDGE_PREFIX));
            let to_tasks = route()
                .destination_prefix(subnet, BRIDGE_PREFIX)
                .gateway(UPLINK_ADDR);
            let what = format!("{subnet}/{BRIDGE_PREFIX} via {UPLINK_ADDR}");
            client.route(&what, to_tasks).await?;
        } else {
            host.sysctl("net.ipv4.ip_forward")?;
            docker_bridge(&host, v6).await?;
        }
        for task in tasks {
            let ns = Ns::add(&task.netns, v6).await?;
            host.veth(&task.interface, &ns, TASK_LINK).await?;
            if ceiling {
                routed_task(&host, &ns, task).await?;
            } else {
                bridged_task(&host, &ns, task).await?;
            }
        }
        Ok(())
    })
}

/// Plugs `tasks` into the docker0 that is already on `host` (a real engine's): each a
/// namespace of its own on a veth, as `build` plugs the imitation's. Namespaces made before a
/// failure stay, for `lab down` to remove with the rest of the lab.
pub(super) fn plug(host: &str, tasks: &[LabTask]) -> Result<(), LabError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| netns_error(host, "tokio runtime", source))?;
    runtime.block_on(async {
        let host = Ns::open(host, open(host)?)?;
        for task in tasks {
            let ns = Ns::add(&task.netns, task.address6.is_some()).await?;
            host.veth(&task.interface, &ns, TASK_LINK).await?;
            bridged_task(&host, &ns, task).await?;
        }
        Ok(())
    })
}

/// The host's own multicast reports, sent within milliseconds instead of over a second or two.
///
/// docker0 joins the multicast router discovery group (224.0.0.106 and `ff02::6a`) when it comes up,
/// and the kernel reports that join on the bridge again at random times within the unsolicited
/// report interval (one second by default). Those reports reach every task and meet its ingress
/// rules, where ecsnet rightly drops and counts them (`SG_INGRESS`); in a test that counts the
/// drops of its own traffic right after the lab came up, they are noise that depends on timing.
/// With the interval at 10 ms they are over before any task is plugged in. Interfaces take the
/// value from `default` when they are made, so this comes before docker0 (ours or dockerd's).
fn quick_multicast_reports(host: &Ns) -> Result<(), LabError> {
    for key in [
        "net.ipv4.conf.default.igmpv2_unsolicited_report_interval",
        "net.ipv4.conf.default.igmpv3_unsolicited_report_interval",
        "net.ipv6.conf.default.mldv1_unsolicited_report_interval",
        "net.ipv6.conf.default.mldv2_unsolicited_report_interval",
    ] {
        host.set_sysctl(key, "10")?;
    }
    Ok(())
}

/// docker0 with its address, up, and the sysctls Docker sets; with `v6`, what dockerd adds
/// for `ipv6` and `fixed-cidr-v6`: the subnet's gateway address and `fe80::1` on docker0,
/// IPv6 forwarding, and bridged IPv6 through ip6tables.
async fn docker_bridge(host: &Ns, v6: bool) -> Result<(), LabError> {
    let bridge = LinkMessageBuilder::<LinkBridge>::new(BRIDGE).build();
    let what = format!("link add {BRIDGE} type bridge");
    let links = host.handle.link();
    links
        .add(bridge)
        .execute()
        .await
        .map_err(host.failed(what))?;
    host.address(BRIDGE, BRIDGE_ADDR.into(), BRIDGE_PREFIX)
        .await?;
    if v6 {
        host.address(BRIDGE, BRIDGE_ADDR6.into(), BRIDGE_PREFIX6)
            .await?;
        host.address(BRIDGE, DOCKER_LINK_LOCAL.into(), 64).await?;
        host.sysctl("net.ipv6.conf.all.forwarding")?;
        host.sysctl("net.bridge.bridge-nf-call-ip6tables")?;
    }
    host.up(BRIDGE).await?;
    host.sysctl("net.bridge.bridge-nf-call-iptables")?;
    host.sysctl(&format!("net.ipv4.conf.{BRIDGE}.route_localnet"))
}

/// A task's veth as Docker plugs it: a port of docker0 with hairpin on (Docker turns it on
/// when iptables does the hairpin NAT); the task on the bridge's subnet.
async fn bridged_task(host: &Ns, task_ns: &Ns, task: &LabTask) -> Result<(), LabError> {
    let veth = task.interface.as_str();
    let links = host.handle.link();
    let bridge = host.index(BRIDGE).await?;
    let port = LinkUnspec::new_with_name(veth).controller(bridge).build();
    let what = format!("link set {veth} master {BRIDGE}");
    links.set(port).execute().await.map_err(host.failed(what))?;
    let hairpin = LinkMessageBuilder::<LinkBridgePort>::default()
        .name(veth.to_owned())
        .set_port_kind(InfoPortKind::Bridge)
        .hairpin(true)
        .build();
    let what = format!("link set {veth} type bridge_slave hairpin on");
    links
        .set_port(hairpin)
        .execute()
        .await
        .map_err(host.failed(what))?;
    host.up(veth).await?;
    if task.address6.is_some() {
        // Docker's MAC, so the task's link-local address is the one dockerd's would have.
        let mac = LinkUnspec::new_with_name(TASK_LINK)
            .address(super::task_mac(task.address).to_vec())
            .build();
        let what = format!("link set {TASK_LINK} address 02:42:...");
        task_ns
            .handle
            .link()
            .set(mac)
            .execute()
            .await
            .map_err(task_ns.failed(what))?;
    }
    let default = route().gateway(BRIDGE_ADDR);
    task_ns
        .plug(
            task.address,
            BRIDGE_PREFIX,
            &format!("default via {BRIDGE_ADDR}"),
            default,
        )
        .await?;
    if let Some(addr) = task.address6 {
        task_ns
            .address(TASK_LINK, addr.into(), BRIDGE_PREFIX6)
            .await?;
        let default = route6().gateway(BRIDGE_ADDR6);
        task_ns
            .route(&format!("default via {BRIDGE_ADDR6}"), default)
            .await?;
    }
    Ok(())
}

/// A task's veth in the ceiling: the host side holds the gateway address and a /32 route to
/// the task (and with IPv6, `fe80::1` and a /128 route); the task's only route is its default,
/// on-link through that gateway.
async fn routed_task(host: &Ns, task_ns: &Ns, task: &LabTask) -> Result<(), LabError> {
    let (veth, addr) = (task.interface.as_str(), task.address);
    host.address(veth, BRIDGE_ADDR.into(), 32).await?;
    host.up(veth).await?;
    let to_task = route()
        .destination_prefix(addr, 32)
        .output_interface(host.index(veth).await?)
        .scope(RouteScope::Link);
    host.route(&format!("{addr}/32 dev {veth}"), to_task)
        .await?;
    let default = route()
        .gateway(BRIDGE_ADDR)
        .output_interface(task_ns.index(TASK_LINK).await?)
        .onlink();
    let what = format!("default via {BRIDGE_ADDR} dev {TASK_LINK} onlink");
    task_ns.plug(addr, 32, &what, default).await?;
    let Some(addr6) = task.address6 else {
        return Ok(());
    };
    // IPv6 the same way: the host side holds `fe80::1` (as docker0 does), a /128 route leads
    // to the task, and the task's default goes through `fe80::1` on its link.
    host.address(veth, DOCKER_LINK_LOCAL.into(), 64).await?;
    let to_task = route6()
        .destination_prefix(addr6, 128)
        .output_interface(host.index(veth).await?);
    host.route(&format!("{addr6}/128 dev {veth}"), to_task)
        .await?;
    task_ns.address(TASK_LINK, addr6.into(), 128).await?;
    let default = route6()
        .gateway(DOCKER_LINK_LOCAL)
        .output_interface(task_ns.index(TASK_LINK).await?);
    let what = format!("default via {DOCKER_LINK_LOCAL} dev {TASK_LINK}");
    task_ns.route(&what, default).await
}

/// The link-local address dockerd puts on docker0 beside the `fixed-cidr-v6` gateway.
const DOCKER_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A route as `ip route add` makes one: main table, unicast, universe scope, proto boot.
fn route() -> RouteMessageBuilder<Ipv4Addr> {
    RouteMessageBuilder::<Ipv4Addr>::new().protocol(RouteProtocol::Boot)
}

/// The same for IPv6 (`ip -6 route add`).
fn route6() -> RouteMessageBuilder<Ipv6Addr> {
    RouteMessageBuilder::<Ipv6Addr>::new().protocol(RouteProtocol::Boot)
}

/// One of the lab's namespaces, with a netlink socket opened inside it.
struct Ns {
    name: String,
    file: File,
    handle: Handle,
}

impl Ns {
    /// Makes the namespace (`ip netns add`) with loopback up and IPv6 off, as every one of
    /// the lab's namespaces is without `--ipv6`. With `v6`, IPv6 stays on, and quiet: no
    /// duplicate address detection (addresses usable at once, no probes on the wire), no
    /// router solicitations, multicast reports over within milliseconds of a link coming up.
    async fn add(name: &str, v6: bool) -> Result<Self, LabError> {
        create(name)?;
        let ns = Self::open(name, open(name)?)?;
        if v6 {
            for conf in ["all", "default"] {
                ns.set_sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0")?;
                ns.set_sysctl(&format!("net.ipv6.conf.{conf}.router_solicitations"), "0")?;
            }
            quick_multicast_reports(&ns)?;
        }
        ns.up("lo").await?;
        if !v6 {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6")?;
        }
        Ok(ns)
    }

    /// A netlink socket in the namespace open as `file`, named `name` in errors.
    fn open(name: &str, file: File) -> Result<Self, LabError> {
        let (connection, handle, _) = inside(&file, rtnetlink::new_connection)
            .and_then(|socket| socket)
            .map_err(|source| netns_error(name, "netlink socket", source))?;
        tokio::spawn(connection);
        Ok(Ns {
            name: name.to_owned(),
            file,
            handle,
        })
    }

    fn failed(&self, what: String) -> impl FnOnce(rtnetlink::Error) -> LabError {
        let netns = self.name.clone();
        move |source| LabError::Netlink {
            netns,
            what,
            source,
        }
    }

    /// The ifindex of `link`.
    async fn index(&self, link: &str) -> Result<u32, LabError> {
        Ok(find_link(self, LinkQuery::Name(link)).await?.index)
    }

    async fn up(&self, link: &str) -> Result<(), LabError> {
        let msg = LinkUnspec::new_with_name(link).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(self.failed(format!("link set {link} up")))
    }

    /// A veth pair: `name` here, `peer` in `peer_ns`.
    async fn veth(&self, name: &str, peer_ns: &Ns, peer: &str) -> Result<(), LabError> {
        let there = LinkUnspec::new_with_name(peer)
            .setns_by_fd(peer_ns.file.as_raw_fd())
            .build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_owned())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(there)))
            .build();
        let what = format!(
            "link add {name} type veth peer name {peer} netns {}",
            peer_ns.name
        );
        self.handle
            .link()
            .add(pair)
            .execute()
            .await
            .map_err(self.failed(what))
    }

    /// `ip address add ADDR/PREFIX dev LINK`: local and peer address, no broadcast; an IPv6
    /// one `nodad`.
    async fn address(&self, link: &str, addr: IpAddr, prefix: u8) -> Result<(), LabError> {
        let index = self.index(link).await?;
        let mut request = self.handle.address().add(index, addr, prefix);
        let message = request.message_mut();
        message
            .attributes
            .retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        if addr.is_ipv6() {
            message.header.flags |= AddressHeaderFlags::Nodad;
        }
        request
            .execute()
            .await
            .map_err(self.failed(format!("address add {addr}/{prefix} dev {link}")))
    }

    /// Adds a route; `what` is how `ip route add` would say it.
    async fn route<T>(&self, what: &str, route: RouteMessageBuilder<T>) -> Result<(), LabError> {
        self.handle
            .route()
            .add(route.build())
            .execute()
            .await
            .map_err(self.failed(format!("route add {what}")))
    }

    /// The task's end of its veth: its address, up, and its default route.
    async fn plug(
        &self,
        addr: Ipv4Addr,
        prefix: u8,
        what: &str,
        default: RouteMessageBuilder<Ipv4Addr>,
    ) -> Result<(), LabError> {
        self.address(TASK_LINK, addr.into(), prefix).await?;
        self.up(TASK_LINK).await?;
        self.route(what, default).await
    }

    /// Turns the sysctl `key` (dotted, as `sysctl` names it) on in this namespace.
    fn sysctl(&self, key: &str) -> Result<(), LabError> {
        self.set_sysctl(key, "1")
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        inside(&self.file, || fs::write(&path, value))
            .and_then(|written| written)
            .map_err(|source| netns_error(&self.name, &format!("sysctl {key}={value}"), source))
    }
}

/// A link as the kernel reports it: its index, name, peer index (`IFLA_LINK`: a veth's other
/// end) and controller (the bridge it is a port of).
struct Link {
    index: u32,
    name: String,
    peer: Option<u32>,
    controller: Option<u32>,
}

impl Link {
    fn from(msg: &LinkMessage) -> Self {
        let mut l = Link {
            index: msg.header.index,
            name: String::new(),
            peer: None,
            controller: None,
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name.clone_from(n),
                LinkAttribute::Link(i) => l.peer = Some(*i),
                LinkAttribute::Controller(i) => l.controller = Some(*i),
                _ => {}
            }
        }
        l
    }
}

/// The link `by` names in the namespace `ns`.
async fn find_link(ns: &Ns, by: LinkQuery<'_>) -> Result<Link, LabError> {
    let what = match by {
        LinkQuery::Name(n) => format!("link show {n}"),
        LinkQuery::Index(i) => format!("link show index {i}"),
    };
    let get = ns.handle.link().get();
    let get = match by {
        LinkQuery::Name(n) => get.match_name(n.to_owned()),
        LinkQuery::Index(i) => get.match_index(i),
    };
    let found: Vec<LinkMessage> = get
        .execute()
        .try_collect()
        .await
        .map_err(ns.failed(what.clone()))?;
    found
        .first()
        .map(Link::from)
        .ok_or_else(|| netns_error(&ns.name, &what, Errno::ENODEV.into()))
}

#[derive(Clone, Copy)]
enum LinkQuery<'a> {
    Name(&'a str),
    Index(u32),
}

/// The host's end of a container's veth, found through the container's namespace (that of
/// process `pid`): the peer index of its `link` there, that link in the namespace `host`, which
/// must name `link` as its own peer. Returns its name and the name of its controller, if any.
pub(super) fn host_peer(
    pid: i32,
    link: &str,
    host: &str,
) -> Result<(String, Option<String>), LabError> {
    let container = format!("/proc/{pid}/ns/net");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| netns_error(&container, "tokio runtime", source))?;
    runtime.block_on(async {
        let file = File::open(&container).map_err(|e| netns_error(&container, "open", e))?;
        let inner = Ns::open(&container, file)?;
        let host = Ns::open(host, open(host)?)?;
        let end = find_link(&inner, LinkQuery::Name(link)).await?;
        let peer = end.peer.ok_or_else(|| {
            netns_error(
                &container,
                &format!("{link} has no peer"),
                Errno::ENODEV.into(),
            )
        })?;
        let veth = find_link(&host, LinkQuery::Index(peer)).await?;
        if veth.peer != Some(end.index) {
            return Err(netns_error(
                &host.name,
                &format!("{} is not the peer of {link} in {container}", veth.name),
                Errno::ENODEV.into(),
            ));
        }
        let controller = match veth.controller {
            Some(i) => Some(find_link(&host, LinkQuery::Index(i)).await?.name),
            None => None,
        };
        Ok((veth.name, controller))
    })
}

fn netns_error(netns: &str, what: &str, source: std::io::Error) -> LabError {
    LabError::Netns {
        netns: netns.to_owned(),
        what: what.to_owned(),
        source,
    }
}

fn open(name: &str) -> Result<File, LabError> {
    File::open(netns_path(name)).map_err(|source| netns_error(name, "open", source))
}

/// Runs `f` with the calling thread in the namespace `ns`, then moves the thread back. A
/// netlink socket stays in the namespace it was opened in, and /proc/sys/net shows the
/// namespace of the thread that opens it.
pub(crate) fn inside<T>(ns: &File, f: impl FnOnce() -> T) -> std::io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    setns(ns, CloneFlags::CLONE_NEWNET)?;
    let out = f();
    setns(&home, CloneFlags::CLONE_NEWNET)?;
    Ok(out)
}

/// `ip netns add NAME`, the way it does it: /run/netns made a shared mount point, an empty
/// file there, and a new namespace bind-mounted over it. `unshare` moves only the calling
/// thread, so a thread of its own makes the namespace and ends.
fn create(name: &str) -> Result<(), LabError> {
    let failed = |what: &'static str| move |e: Errno| netns_error(name, what, e.into());
    let dir = Path::new(NETNS_DIR);
    nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o755))
        .or_else(|e| if e == Errno::EEXIST { Ok(()) } else { Err(e) })
        .map_err(failed("mkdir /run/netns"))?;
    share(dir).map_err(failed("make /run/netns a shared mount"))?;
    let path = netns_path(name);
    let file = nix::fcntl::open(
        &path,
        OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_EXCL,
        Mode::empty(),
    )
    .map_err(failed("create"))?;
    drop(file);
    let made = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &path,
            Some("none"),
            MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .expect("the namespace thread does not panic");
    if let Err(e) = made {
        let _ = delete(name);
        return Err(failed("bind-mount a new namespace")(e));
    }
    Ok(())
}

/// Makes `dir` a shared mount point (a bind mount of itself first if it is not a mount point),
/// so a namespace's mount there reaches every mount namespace, as `ip netns add` does.
fn share(dir: &Path) -> nix::Result<()> {
    let shared = || {
        mount(
            Some(""),
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            shared()
        }
        other => other,
    }
}

/// `ip netns delete NAME`: the namespace's mount detached (if it has one) and its file
/// removed; the namespace goes when its last process does.
pub(super) fn delete(name: &str) -> Result<(), LabError> {
    let path = netns_path(name);
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    fs::remove_file(&path).map_err(|source| netns_error(name, "remove", source))
}

/// The processes in the namespaces `names` (`ip netns pids` of each): those whose
/// /proc/PID/ns/net is one of the namespaces' files. One pass over /proc for all of them.
pub(super) fn pids(names: &[String]) -> Vec<Pid> {
    let wanted: std::collections::HashSet<(u64, u64)> = names
        .iter()
        .filter_map(|n| fs::metadata(netns_path(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let net = fs::metadata(entry.path().join("ns/net")).ok()?;
            wanted
                .contains(&(net.dev(), net.ino()))
                .then_some(Pid::from_raw(pid))
        })
        .collect()
}

/// `argv` to run in the namespace `netns`, entered with setns between fork and exec (no new
/// mount namespace, unlike `ip netns exec`).
pub fn command(netns: &str, argv: &[&str]) -> Result<Command, LabError> {
    let (program, rest) = argv.split_first().expect("a command names its program");
    let file = open(netns)?;
    let mut cmd = Command::new(program);
    cmd.args(rest);
    // SAFETY: setns is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
    }
    Ok(cmd)
}
