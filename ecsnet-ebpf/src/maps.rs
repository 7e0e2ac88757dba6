//! The maps of the datapath. Their names and types come from `ecsnet_common::maps`; user space
//! pins each of them under `/sys/fs/bpf/ecsnet/<instance>/maps/<NAME>` at load time.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuHashMap},
};
use ecsnet_common::maps::{
    Counters, DropKey, IfaceInfo, MAX_DROP_KEYS, MAX_STATS, MAX_TASKS, StatsKey, TaskInfo,
};

/// Interfaces ecsnet is attached to, written by user space at attach time.
#[map(name = "IFACES")]
pub static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_TASKS + 16, 0);

/// Tasks by IPv4 address, written by `ecsnet apply`.
#[map(name = "TASKS")]
pub static TASKS: HashMap<u32, TaskInfo> = HashMap::with_max_entries(MAX_TASKS, 0);

/// Packet and byte counters per interface, hook and class.
#[map(name = "STATS")]
pub static STATS: PerCpuHashMap<StatsKey, Counters> = PerCpuHashMap::with_max_entries(MAX_STATS, 0);

/// Dropped packets per interface, reason and hook.
#[map(name = "DROPS")]
pub static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(MAX_DROP_KEYS, 0);
