//! Map names, keys and values. A map's name is the key both sides use: the BPF crate declares it
//! under that name, user space pins it as `<pin dir>/maps/<NAME>` and opens it by the same name.

use core::mem::size_of;

/// Interfaces ecsnet is attached to: ifindex -> [`IfaceInfo`].
pub const MAP_IFACES: &str = "IFACES";
/// Tasks by IPv4 address (network byte order): addr -> [`TaskInfo`].
pub const MAP_TASKS: &str = "TASKS";
/// Per-CPU packet and byte counters: [`StatsKey`] -> [`Counters`].
pub const MAP_STATS: &str = "STATS";
/// Per-CPU drop counters: [`DropKey`] -> `u64` packets.
pub const MAP_DROPS: &str = "DROPS";

/// Every map that is pinned under `/sys/fs/bpf/ecsnet/<instance>/maps/`.
pub const PINNED_MAPS: [&str; 4] = [MAP_IFACES, MAP_TASKS, MAP_STATS, MAP_DROPS];

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

/// What an attached interface is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// The task's IPv4 address in network byte order; 0 for the uplink.
    pub ipv4: u32,
    /// `ROLE_TASK` or `ROLE_UPLINK`.
    pub role: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<IfaceInfo>() == 8);

/// A task as the datapath sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    /// ifindex of the task interface (host end of the veth pair).
    pub ifindex: u32,
    /// MAC address of the task's own end of the veth pair.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<TaskInfo>() == 12);

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
const _: () = assert!(size_of::<StatsKey>() == 8);

/// Value of [`MAP_STATS`] (one per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets as on the wire: a GSO packet counts as its segments.
    pub packets: u64,
    /// Bytes as on the wire, in the unit of the key's class.
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counters>() == 16);

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
const _: () = assert!(size_of::<DropKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), have explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::IfaceInfo {}
    unsafe impl aya::Pod for super::TaskInfo {}
    unsafe impl aya::Pod for super::StatsKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::DropKey {}
}
