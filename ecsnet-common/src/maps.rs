//! Map names, keys and values. A map's name is the key both sides use: the BPF crate declares it
//! under that name, user space pins it as `<pin dir>/maps/<NAME>` and opens it by the same name.

/// Interfaces ecsnet is attached to: ifindex -> [`IfaceInfo`].
pub const MAP_IFACES: &str = "IFACES";
/// Tasks by IPv4 address (network byte order): addr -> [`TaskInfo`].
pub const MAP_TASKS: &str = "TASKS";
/// Tasks by IPv6 address (the 16 bytes in order): addr -> ifindex of the task's interface,
/// whose `IFACES` and `TASKS` entries hold the rest.
pub const MAP_TASKS6: &str = "TASKS6";
/// Per-CPU packet and byte counters: [`StatsKey`] -> [`Counters`].
pub const MAP_STATS: &str = "STATS";
/// Per-CPU drop counters: [`DropKey`] -> `u64` packets.
pub const MAP_DROPS: &str = "DROPS";

/// The host as the datapath needs it: one [`Config`] at index 0.
pub const MAP_CONFIG: &str = "CONFIG";
/// The host's own IPv4 addresses (network byte order) -> ifindex they are on.
pub const MAP_LOCAL_ADDRS: &str = "LOCAL_ADDRS";
/// Published ports: [`PortKey`] -> [`PortTarget`].
pub const MAP_PORTS: &str = "PORTS";
/// The connection table: [`crate::ct::CtKey`] -> [`crate::ct::CtEntry`], two entries per flow.
pub const MAP_CT: &str = "CT";
/// Flows nobody answered yet ([`crate::ct::assured`] not yet true): [`CtKey`] -> [`CtEntry`],
/// an LRU table, so a flood of them evicts the oldest of its own kind and never an answered
/// flow in [`MAP_CT`]. Flows move to `CT` once assured.
pub const MAP_CT_NEW: &str = "CT_NEW";
/// What happened in the connection tables, per CPU: u64 counters indexed by `CT_EV_*`.
pub const MAP_CT_EVENTS: &str = "CT_EVENTS";
/// Programs that other programs tail-call: a program array indexed by `PROG_*`.
pub const MAP_PROGS: &str = "PROGS";
/// [`MAP_PROGS`]: `tc_task_new_flow`, which opens the flows of packets from tasks.
pub const PROG_TASK_NEW_FLOW: u32 = 0;
/// Slots of [`MAP_PROGS`].
pub const PROG_SLOTS: u32 = 1;
/// The IPv6 programs that the entry points tail-call, indexed by `PROG6_*`: a program array of
/// its own, with room to spare, so that IPv6 came without changing [`MAP_PROGS`]'s layout and
/// later IPv6 programs come without changing this one's.
pub const MAP_PROGS6: &str = "PROGS6";
/// [`MAP_PROGS6`]: `tc_task_ipv6`, which checks the IPv6 a task sends.
pub const PROG6_TASK_FROM: u32 = 0;
/// [`MAP_PROGS6`]: `tc_task_ipv6_flow`, tail-called by `tc_task_ipv6` once the checks passed:
/// the IPv6 a task sends, tracked, policed and forwarded.
pub const PROG6_TASK_FLOW: u32 = 1;
/// [`MAP_PROGS6`]: `tc_task_ipv6_to`, tail-called by `tc_task_egress` for the IPv6 the kernel
/// delivers to a task with a policy.
pub const PROG6_TASK_TO: u32 = 2;
/// [`MAP_PROGS6`]: `tc_uplink_ipv6`, tail-called by `tc_uplink_ingress` for IPv6 arriving on
/// the uplink: published ports over IPv6 (NAT66) and the replies of translated flows.
pub const PROG6_UPLINK: u32 = 3;
/// [`MAP_PROGS6`]: `tc_task_ipv6_nat`, tail-called by `tc_task_ipv6_flow` for what a task sends
/// that ecsnet translates where `tc_task_ipv6_flow` has no stack left: a new flow the task's
/// rules allowed that leaves masqueraded ([`CONFIG6_MASQUERADE`]) or goes to a port published on
/// a host address (hairpin), a hairpin flow's packets, and an `ICMPv6` error about a packet of a
/// translated flow it received. Empty (an older build's datapath, which makes no hairpin
/// flows): new flows take the kernel's path (and its ip6tables masquerade), errors are judged by
/// the egress rules alone, and a hairpin flow's packet is dropped (`TAIL_CALL_FAILED`).
pub const PROG6_TASK_NAT: u32 = 4;
/// Slots of [`MAP_PROGS6`].
pub const PROG6_SLOTS: u32 = 8;
/// First fragments seen: [`FragKey`] -> [`FragPorts`], so later fragments find their flow.
pub const MAP_FRAGS: &str = "FRAGS";

/// The IPv6 connection table: [`crate::ct::CtKey6`] -> [`crate::ct::CtEntry6`], two entries
/// per flow, sized and expired as [`MAP_CT`].
pub const MAP_CT6: &str = "CT6";
/// The IPv6 twin of [`MAP_CT_NEW`] (LRU), sized as it.
pub const MAP_CT6_NEW: &str = "CT6_NEW";
/// First fragments of IPv6 datagrams: [`FragKey6`] -> [`FragPorts`].
pub const MAP_FRAGS6: &str = "FRAGS6";

/// Masquerade ports held per task and destination: [`NatUseKey`] -> `u64` flows, so that one
/// task cannot hold every port towards a destination that other tasks need too. The datapath
/// counts a flow as it creates it; the agent sets each count to the ports the connection tables
/// hold on every GC pass, as flows expire and `CT_NEW` evicts without telling anyone.
pub const MAP_NAT_USE: &str = "NAT_USE";
/// [`MAP_NAT_USE`] for IPv6: [`NatUseKey6`] -> `u64` flows, sized as it, under the same
/// [`NatConfig::task_ports`] limit.
pub const MAP_NAT_USE6: &str = "NAT_USE6";
/// The masquerade limits: one [`NatConfig`] at index 0, written by `ecsnet up`.
pub const MAP_NAT_CONFIG: &str = "NAT_CONFIG";

/// Every map that is pinned (defined at the crate root, beside the modules it lists).
pub use crate::PINNED_MAPS;

/// Default capacity of [`MAP_CT`], entries (two per flow); `ecsnet up --ct-size` changes it.
pub const DEFAULT_CT_SIZE: u32 = 131_072;

/// Capacity of [`MAP_CT_NEW`] for a `CT` of `ct_size` entries: half as many.
pub const fn ct_new_size(ct_size: u32) -> u32 {
    let half = ct_size / 2;
    if half < 1024 { 1024 } else { half }
}

/// Source ports masquerade chooses from when a flow's own port is taken towards its
/// destination: `NAT_PORT_MIN` and the `NAT_PORT_SPAN` ports above it (1024 to 65535, as Linux
/// masquerade uses for ports above 1023).
pub const NAT_PORT_MIN: u32 = 1024;
pub const NAT_PORT_SPAN: u32 = 65536 - NAT_PORT_MIN;
/// Default of [`NatConfig::task_ports`]: half the ports, so that one task leaves the other half
/// to the rest.
pub const DEFAULT_NAT_TASK_PORTS: u32 = NAT_PORT_SPAN / 2;

/// Capacity of [`MAP_NAT_USE`] for a `CT` of `ct_size` entries: one key per masqueraded flow
/// the two tables can hold at most.
pub const fn nat_use_size(ct_size: u32) -> u32 {
    u32::midpoint(ct_size, ct_new_size(ct_size))
}

/// [`MAP_CT_EVENTS`]: flows created (in [`MAP_CT_NEW`]).
pub const CT_EV_CREATED: u32 = 0;
/// [`MAP_CT_EVENTS`]: flows assured and moved to [`MAP_CT`].
pub const CT_EV_ASSURED: u32 = 1;
/// [`MAP_CT_EVENTS`]: assured flows that found [`MAP_CT`] full and stayed in [`MAP_CT_NEW`],
/// where they can be evicted.
pub const CT_EV_CT_FULL: u32 = 2;
/// Entries of [`MAP_CT_EVENTS`].
pub const CT_EVENT_SLOTS: u32 = 3;
/// Capacity of [`MAP_LOCAL_ADDRS`].
pub const MAX_LOCAL_ADDRS: u32 = 256;
/// Capacity of [`MAP_PORTS`]: published ports on one host.
pub const MAX_PORTS: u32 = 16_384;
/// Capacity of [`MAP_FRAGS`] (an LRU: fragments in flight).
pub const MAX_FRAGS: u32 = 8192;

/// Capacity of [`MAP_IFACES`] and [`MAP_TASKS`]: tasks on one host.
pub const MAX_TASKS: u32 = 4096;
/// Capacity of [`MAP_STATS`]: three hooks and two classes per interface.
pub const MAX_STATS: u32 = MAX_TASKS * 8;
/// Capacity of [`MAP_DROPS`].
pub const MAX_DROP_KEYS: u32 = MAX_TASKS * 4;

/// [`IfaceInfo::role`]: the host end of a task's veth pair.
pub const ROLE_TASK: u8 = 1;
/// [`IfaceInfo::role`]: the host's uplink.
pub const ROLE_UPLINK: u8 = 2;
/// [`IfaceInfo::role`]: a new interface on the bridge, attached as the kernel announced it and
/// held at the default policy until the agent knows whose container it is (`up --docker`).
pub const ROLE_HELD: u8 = 3;

/// What an attached interface is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// The task's IPv4 address in network byte order; 0 for the uplink and a held interface.
    pub ipv4: u32,
    /// `ROLE_TASK`, `ROLE_UPLINK` or `ROLE_HELD`.
    pub role: u8,
    pub _pad: [u8; 3],
}
map_type!(IfaceInfo, 8);

impl IfaceInfo {
    /// An interface of `role` (`ROLE_*`); `ipv4` in network byte order, 0 for the uplink.
    pub const fn new(ipv4: u32, role: u8) -> Self {
        Self {
            ipv4,
            role,
            _pad: [0; 3],
        }
    }
}

/// A task as the datapath sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    /// ifindex of the task interface (host end of the veth pair).
    pub ifindex: u32,
    /// MAC address of the task's own end of the veth pair: learned from the task's first packet
    /// when user space did not know it, and from then on the only source MAC the task may use.
    pub mac: [u8; 6],
    /// `TASK_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// The task's security-group policy ([`crate::policy`]); 0: none, every packet allowed.
    pub policy: u32,
}
map_type!(TaskInfo, 16);

/// [`TaskInfo::flags`]: the task's IPv6 address is known ([`MAP_TASKS6`] has it), so IPv6 it
/// sends from any other address than that one or its link-local address is spoofed. Without
/// it, a task without a policy keeps the kernel's path for IPv6 from other addresses (ecsnet
/// cannot tell its own from another's), and a task with one sends no IPv6 but neighbour
/// discovery.
pub const TASK_IPV6: u8 = 1;

/// The host: where translated packets leave and what they are translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// ifindex of the uplink; 0 until `ecsnet up` wrote it, and then the datapath only counts.
    pub uplink_ifindex: u32,
    /// Masquerade address: the uplink's primary IPv4 address, network byte order.
    pub uplink_ipv4: u32,
    /// ifindex of the bridge (docker0), used as the input device of FIB lookups.
    pub bridge_ifindex: u32,
    /// The bridge's address, the tasks' gateway (network byte order); the source of self-hairpin.
    pub bridge_ipv4: u32,
    /// The bridge's MAC: the source MAC of every routed packet delivered to a task.
    pub bridge_mac: [u8; 6],
    /// `CONFIG_*` bits, written by `ecsnet apply` from the state file's `host`.
    pub flags: u8,
    /// Prefix length of the bridge's address: its subnet's broadcast address is a group address.
    pub bridge_prefix: u8,
}

/// [`Config::flags`]: drop task traffic to 169.254.169.254 (`host.blockInstanceMetadata`).
pub const CONFIG_BLOCK_IMDS: u8 = 1;
/// [`Config::flags`]: `host.defaultPolicy` is deny: a held interface (`ROLE_HELD`) passes nothing.
pub const CONFIG_DEFAULT_DENY: u8 = 2;
map_type!(Config, 24);

/// Key of [`MAP_PORTS`]: a host port (network byte order) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub _pad: u8,
}
map_type!(PortKey, 4);

/// Value of [`MAP_PORTS`]: the task address and container port it maps to (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTarget {
    pub addr: u32,
    pub port: u16,
    pub _pad: [u8; 2],
}
map_type!(PortTarget, 8);

/// Key of [`MAP_NAT_USE`]: a task and a destination of its masqueraded flows (network byte
/// order). The destination is what the reply tuple of a masqueraded flow holds besides the
/// port masquerade chooses: flows to different destinations never compete for a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatUseKey {
    /// The task's address.
    pub task: u32,
    pub daddr: u32,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
}
map_type!(NatUseKey, 12);

impl NatUseKey {
    /// The key of the masqueraded flow whose original tuple is `k`.
    #[inline(always)]
    #[must_use]
    pub const fn of(k: &crate::ct::CtKey) -> Self {
        Self {
            task: k.saddr,
            daddr: k.daddr,
            dport: k.dport,
            proto: k.proto,
            _pad: 0,
        }
    }
}

/// Key of [`MAP_NAT_USE6`]: [`NatUseKey`] for IPv6 flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NatUseKey6 {
    /// The task's address.
    pub task: [u8; 16],
    pub daddr: [u8; 16],
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
}
map_type!(NatUseKey6, 36);

impl NatUseKey6 {
    /// The key of the masqueraded flow whose original tuple is `k`.
    #[inline(always)]
    #[must_use]
    pub const fn of(k: &crate::ct::CtKey6) -> Self {
        Self {
            task: k.saddr,
            daddr: k.daddr,
            dport: k.dport,
            proto: k.proto,
            _pad: 0,
        }
    }
}

/// Value of [`MAP_NAT_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatConfig {
    /// Masqueraded flows one task may have towards one destination (address, port, protocol)
    /// at once (`ecsnet up --nat-task-ports`); 0: no limit.
    pub task_ports: u32,
}
map_type!(NatConfig, 4);

/// Key of [`MAP_FRAGS`]: what every fragment of one datagram shares (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
map_type!(FragKey, 12);

/// Key of [`MAP_FRAGS6`]: an IPv6 datagram, by its addresses and the fragment header's 32-bit
/// identification (network byte order), and the transport protocol behind the chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
map_type!(FragKey6, 40);

/// Value of [`MAP_FRAGS`]: the ports from the first fragment (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
    /// 1 when policy rejected the first fragment: the later ones are dropped too.
    pub rejected: u8,
    pub _pad: [u8; 3],
}
map_type!(FragPorts, 8);

/// [`StatsKey::hook`]: tc ingress of the interface (for a task interface: sent by the task).
pub const HOOK_TC_INGRESS: u8 = 0;
/// [`StatsKey::hook`]: tc egress of the interface (for a task interface: sent to the task).
pub const HOOK_TC_EGRESS: u8 = 1;
/// [`StatsKey::hook`]: XDP on the uplink, before an skb exists.
pub const HOOK_XDP: u8 = 2;

/// [`StatsKey::class`]: unicast IPv4 packets; bytes are IP bytes as on the wire.
pub const CLASS_IPV4: u8 = 0;
/// [`StatsKey::class`]: everything else (ARP, IPv6, multicast and broadcast, malformed IPv4);
/// bytes are frame bytes.
pub const CLASS_OTHER: u8 = 1;

/// Key of [`MAP_STATS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StatsKey {
    pub ifindex: u32,
    pub hook: u8,
    pub class: u8,
    pub _pad: [u8; 2],
}
map_type!(StatsKey, 8);

/// Value of [`MAP_STATS`] (one per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets as on the wire: a GSO packet counts as its segments.
    pub packets: u64,
    /// Bytes as on the wire, in the unit of the key's class.
    pub bytes: u64,
}
map_type!(Counters, 16);

/// Key of [`MAP_DROPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub ifindex: u32,
    /// A [`crate::DropReason`] number.
    pub reason: u8,
    /// The hook that dropped (`HOOK_*`).
    pub hook: u8,
    pub _pad: [u8; 2],
}
map_type!(DropKey, 8);

/// Published ports over IPv6 (NAT66): [`PortKey`] -> [`PortTarget6`], the host ports of
/// [`MAP_PORTS`] for the tasks that have an IPv6 address (Docker publishes on both families at
/// once). Written by every apply; capacity [`MAX_PORTS`].
pub const MAP_PORTS6: &str = "PORTS6";
/// The host's own global and unique-local IPv6 addresses (the 16 bytes in order) -> the ifindex
/// they are on: link-local and loopback addresses are not in it. Capacity [`MAX_LOCAL_ADDRS`].
pub const MAP_LOCAL_ADDRS6: &str = "LOCAL_ADDRS6";
/// The host's IPv6 addresses as NAT66 needs them: one [`Config6`] at index 0.
pub const MAP_CONFIG6: &str = "CONFIG6";

/// Value of [`MAP_PORTS6`]: the task's IPv6 address and the container port (network byte
/// order) a published host port maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTarget6 {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 2],
}
map_type!(PortTarget6, 20);

/// Value of [`MAP_CONFIG6`]; an address of all zeros: the host has none. The rest of the host
/// (ifindexes, the bridge's MAC, flags) is [`Config`]'s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config6 {
    /// Masquerade address: the uplink's primary global (or unique-local) IPv6 address.
    pub uplink_ipv6: [u8; 16],
    /// The bridge's global IPv6 address, the tasks' gateway (the first address of Docker's
    /// `fixed-cidr-v6`).
    pub bridge_ipv6: [u8; 16],
    /// Prefix length of `bridge_ipv6`; 0 when there is none.
    pub bridge_prefix6: u8,
    /// `CONFIG6_*` bits. Zero (an older build wrote the entry): nothing is masqueraded.
    pub flags: u8,
    pub _pad: [u8; 2],
}
map_type!(Config6, 36);

/// [`Config6::flags`]: ecsnet masquerades the IPv6 its tasks send out of the host, as Docker's
/// `nat` mode does with ip6tables (`host.ipv6Mode: nat`); clear in `routed` mode, where the
/// tasks' own addresses leave the host.
pub const CONFIG6_MASQUERADE: u8 = 1;
