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
pub const PINNED_MAPS: [&str; 21] = [
    maps::MAP_IFACES,
    maps::MAP_TASKS,
    maps::MAP_STATS,
    maps::MAP_DROPS,
    maps::MAP_CONFIG,
    maps::MAP_LOCAL_ADDRS,
    maps::MAP_PORTS,
    maps::MAP_CT,
    maps::MAP_CT_NEW,
    maps::MAP_CT_EVENTS,
    maps::MAP_PROGS,
    maps::MAP_FRAGS,
    maps::MAP_NAT_USE,
    maps::MAP_NAT_CONFIG,
    policy::MAP_SG_PEERS,
    policy::MAP_SG_RULES,
    flow::MAP_FLOWS,
    flow::MAP_FLOW_LOST,
    flow::MAP_FLOW_STATE,
    flow::MAP_EVENTS,
    flow::MAP_EVENT_BUDGET,
];
