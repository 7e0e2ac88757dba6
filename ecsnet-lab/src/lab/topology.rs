//! The lab's network over rtnetlink: named namespaces (made and removed as `ip netns add|del`
//! do it), veth pairs, docker0, addresses, routes and sysctls. Nothing here runs `ip`.

use std::{
    fs::{self, File},
    net::Ipv4Addr,
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
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoPortKind, InfoVeth, LinkMessage},
        route::{RouteProtocol, RouteScope},
    },
};

use ecsnet::host::netns::{NETNS_DIR, path as netns_path};

use super::{
    BRIDGE, BRIDGE_ADDR, BRIDGE_PREFIX, CLIENT_ADDR, LabError, LabTask, UPLINK, UPLINK_ADDR,
    UPLINK_PREFIX,
};

/// A task's end of its veth, in the task's namespace.
const TASK_LINK: &str = "eth0";

/// Builds the lab's network: host and client joined by the uplink, docker0 on the host (for
/// the ceiling, a route to the tasks through the host instead), and every task on its veth.
pub(super) fn build(
    host: &str,
    client: &str,
    tasks: &[LabTask],
    ceiling: bool,
) -> Result<(), LabError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| LabError::Netns {
            netns: host.to_owned(),
            what: "tokio runtime".to_owned(),
            source,
        })?;
    runtime.block_on(async {
        let host = Ns::add(host).await?;
        let client = Ns::add(client).await?;
        // The uplink: host eth0 <-> client eth0, the VPC subnet.
        host.veth(UPLINK, &client, UPLINK).await?;
        host.address(UPLINK, UPLINK_ADDR, UPLINK_PREFIX).await?;
        client.address(UPLINK, CLIENT_ADDR, UPLINK_PREFIX).await?;
        host.up(UPLINK).await?;
        client.up(UPLINK).await?;
        let default = route().gateway(CLIENT_ADDR);
        host.route(&format!("default via {CLIENT_ADDR}"), default)
            .await?;
        host.sysctl("net.ipv4.ip_forward")?;
        if ceiling {
            // The client routes the task subnet through the host: nothing translates.
            let subnet = Ipv4Addr::from(u32::from(BRIDGE_ADDR) & !(u32::MAX >> BRIDGE_PREFIX));
            let to_tasks = route()
                .destination_prefix(subnet, BRIDGE_PREFIX)
                .gateway(UPLINK_ADDR);
            let what = format!("{subnet}/{BRIDGE_PREFIX} via {UPLINK_ADDR}");
            client.route(&what, to_tasks).await?;
        } else {
            docker_bridge(&host).await?;
        }
        for task in tasks {
            let ns = Ns::add(&task.netns).await?;
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

/// docker0 with its address, up, and the sysctls Docker sets.
async fn docker_bridge(host: &Ns) -> Result<(), LabError> {
    let bridge = LinkMessageBuilder::<LinkBridge>::new(BRIDGE).build();
    let what = format!("link add {BRIDGE} type bridge");
    let links = host.handle.link();
    links
        .add(bridge)
        .execute()
        .await
        .map_err(host.failed(what))?;
    host.address(BRIDGE, BRIDGE_ADDR, BRIDGE_PREFIX).await?;
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
    let default = route().gateway(BRIDGE_ADDR);
    task_ns
        .plug(
            task.address,
            BRIDGE_PREFIX,
            &format!("default via {BRIDGE_ADDR}"),
            default,
        )
        .await
}

/// A task's veth in the ceiling: the host side holds the gateway address and a /32 route to
/// the task; the task's only route is its default, on-link through that gateway.
async fn routed_task(host: &Ns, task_ns: &Ns, task: &LabTask) -> Result<(), LabError> {
    let (veth, addr) = (task.interface.as_str(), task.address);
    host.address(veth, BRIDGE_ADDR, 32).await?;
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
    task_ns.plug(addr, 32, &what, default).await
}

/// A route as `ip route add` makes one: main table, unicast, universe scope, proto boot.
fn route() -> RouteMessageBuilder<Ipv4Addr> {
    RouteMessageBuilder::<Ipv4Addr>::new().protocol(RouteProtocol::Boot)
}

/// One of the lab's namespaces, with a netlink socket opened inside it.
struct Ns {
    name: String,
    file: File,
    handle: Handle,
}

impl Ns {
    /// Makes the namespace (`ip netns add`) with loopback up and IPv6 off, as every one of
    /// the lab's namespaces is.
    async fn add(name: &str) -> Result<Self, LabError> {
        create(name)?;
        let file = open(name)?;
        let (connection, handle, _) = inside(&file, rtnetlink::new_connection)
            .and_then(|socket| socket)
            .map_err(|source| netns_error(name, "netlink socket", source))?;
        tokio::spawn(connection);
        let ns = Ns {
            name: name.to_owned(),
            file,
            handle,
        };
        ns.up("lo").await?;
        ns.sysctl("net.ipv6.conf.all.disable_ipv6")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6")?;
        Ok(ns)
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
        let what = format!("link show {link}");
        let found: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_name(link)
            .execute()
            .try_collect()
            .await
            .map_err(self.failed(what.clone()))?;
        found
            .first()
            .map(|l| l.header.index)
            .ok_or_else(|| netns_error(&self.name, &what, Errno::ENODEV.into()))
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

    /// `ip address add ADDR/PREFIX dev LINK`: local and peer address, no broadcast.
    async fn address(&self, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), LabError> {
        let index = self.index(link).await?;
        let mut request = self.handle.address().add(index, addr.into(), prefix);
        request
            .message_mut()
            .attributes
            .retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        request
            .execute()
            .await
            .map_err(self.failed(format!("address add {addr}/{prefix} dev {link}")))
    }

    /// Adds a route; `what` is how `ip route add` would say it.
    async fn route(
        &self,
        what: &str,
        route: RouteMessageBuilder<Ipv4Addr>,
    ) -> Result<(), LabError> {
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
        self.address(TASK_LINK, addr, prefix).await?;
        self.up(TASK_LINK).await?;
        self.route(what, default).await
    }

    /// Turns the sysctl `key` (dotted, as `sysctl` names it) on in this namespace.
    fn sysctl(&self, key: &str) -> Result<(), LabError> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        inside(&self.file, || fs::write(&path, "1"))
            .and_then(|written| written)
            .map_err(|source| netns_error(&self.name, &format!("sysctl {key}=1"), source))
    }
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
fn inside<T>(ns: &File, f: impl FnOnce() -> T) -> std::io::Result<T> {
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

/// The processes in the namespace `name` (`ip netns pids`): those whose /proc/PID/ns/net is
/// the namespace's file.
pub(super) fn pids(name: &str) -> Vec<Pid> {
    let Ok(ns) = fs::metadata(netns_path(name)) else {
        return Vec::new();
    };
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let net = fs::metadata(entry.path().join("ns/net")).ok()?;
            (net.dev() == ns.dev() && net.ino() == ns.ino()).then_some(Pid::from_raw(pid))
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
