//! Types shared by the datapath (`ecsnet-ebpf`) and user space (`ecsnet-userspace`).
//! Everything here is `#[repr(C)]` with explicit padding and a size assert, so the two sides
//! cannot disagree about a layout; the `user` feature adds the `aya::Pod` impls.
#![no_std]

/// Declares a type that crosses the kernel boundary in a map: its size in bytes is checked at
/// compile time, and user space (feature `user`) may read and write it as `aya::Pod`.
macro_rules! map_type {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        // SAFETY: every map type is `#[repr(C)]` with explicit padding, and every bit pattern
        // of it is valid.
        #[cfg(feature = "user")]
        unsafe impl aya::Pod for $t {}
    };
}

pub mod csum;
pub mod ct;
pub mod drop;
pub mod flow;
pub mod maps;
pub mod net;
pub mod policy;

pub use drop::DropReason;

/// Every map that is pinned under `/sys/fs/bpf/ecsnet/<instance>/maps/`.
pub const PINNED_MAPS: [&str; 33] = [
    maps::MAP_IFACES,
    maps::MAP_TASKS,
    maps::MAP_TASKS6,
    maps::MAP_STATS,
    maps::MAP_DROPS,
    maps::MAP_CONFIG,
    maps::MAP_LOCAL_ADDRS,
    maps::MAP_PORTS,
    maps::MAP_CT,
    maps::MAP_CT_NEW,
    maps::MAP_CT_EVENTS,
    maps::MAP_PROGS,
    maps::MAP_PROGS6,
    maps::MAP_FRAGS,
    maps::MAP_NAT_USE,
    maps::MAP_NAT_CONFIG,
    maps::MAP_CT6,
    maps::MAP_CT6_NEW,
    maps::MAP_FRAGS6,
    policy::MAP_SG_PEERS,
    policy::MAP_SG_RULES,
    policy::MAP_SG_PEERS6,
    policy::MAP_SG_LEVELS6,
    flow::MAP_FLOWS,
    flow::MAP_FLOWS6,
    flow::MAP_FLOW_LOST,
    flow::MAP_FLOW_STATE,
    flow::MAP_EVENTS,
    flow::MAP_EVENT_BUDGET,
    maps::MAP_PORTS6,
    maps::MAP_LOCAL_ADDRS6,
    maps::MAP_CONFIG6,
    maps::MAP_NAT_USE6,
];

/// The version of what each pinned map's entries mean, stamped beside the pins at `up` and
/// compared by an upgrade in place (`ecsnet upgrade`). Bump a map's number when the meaning of
/// its keys or values changes while their sizes stay (a field reused, a unit changed): an
/// upgrade then refuses instead of handing the new programs entries they would misread.
/// Changes of type, sizes, capacity or flags are seen without a bump. 1 is the version every
/// map had when stamps began (an instance from before stamps is taken to be at 1).
pub const LAYOUT_VERSIONS: [(&str, u32); PINNED_MAPS.len()] = [
    (maps::MAP_IFACES, 1),
    (maps::MAP_TASKS, 1),
    (maps::MAP_TASKS6, 1),
    (maps::MAP_STATS, 1),
    (maps::MAP_DROPS, 1),
    (maps::MAP_CONFIG, 1),
    (maps::MAP_LOCAL_ADDRS, 1),
    (maps::MAP_PORTS, 1),
    (maps::MAP_CT, 1),
    (maps::MAP_CT_NEW, 1),
    (maps::MAP_CT_EVENTS, 1),
    (maps::MAP_PROGS, 1),
    (maps::MAP_PROGS6, 1),
    (maps::MAP_FRAGS, 1),
    (maps::MAP_NAT_USE, 1),
    (maps::MAP_NAT_CONFIG, 1),
    (maps::MAP_CT6, 1),
    (maps::MAP_CT6_NEW, 1),
    (maps::MAP_FRAGS6, 1),
    (policy::MAP_SG_PEERS, 1),
    (policy::MAP_SG_RULES, 1),
    (policy::MAP_SG_PEERS6, 1),
    (policy::MAP_SG_LEVELS6, 1),
    (flow::MAP_FLOWS, 1),
    (flow::MAP_FLOWS6, 1),
    (flow::MAP_FLOW_LOST, 1),
    (flow::MAP_FLOW_STATE, 1),
    (flow::MAP_EVENTS, 1),
    (flow::MAP_EVENT_BUDGET, 1),
    (maps::MAP_PORTS6, 1),
    (maps::MAP_LOCAL_ADDRS6, 1),
    (maps::MAP_CONFIG6, 1),
    (maps::MAP_NAT_USE6, 1),
];

/// The version a map had when stamps began: what an instance without stamps is taken to have.
pub const FIRST_LAYOUT_VERSION: u32 = 1;
