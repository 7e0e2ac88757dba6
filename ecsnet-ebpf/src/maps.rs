//! The maps of the datapath. Their names and types come from `ecsnet_common::maps`; user space
//! pins each of them under `/sys/fs/bpf/ecsnet/<instance>/maps/<NAME>` at load time.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use ecsnet_common::maps::{Config6, PortTarget6};
use ecsnet_common::{
    ct::{CtEntry, CtEntry6, CtKey, CtKey6},
    flow::{
        DEFAULT_FLOW_TABLE_SIZE, EVENTS_BYTES, EventBudget, FlowKey, FlowKey6, FlowState,
        FlowStats, FlowStats6, LostKey, MAX_FLOW_LOST_KEYS,
    },
    maps::{
        CT_EVENT_SLOTS, Config, Counters, DEFAULT_CT_SIZE, DropKey, FragKey, FragKey6, FragPorts,
        IfaceInfo, MAX_DROP_KEYS, MAX_FRAGS, MAX_LOCAL_ADDRS, MAX_PORTS, MAX_STATS, MAX_TASKS,
        NatConfig, NatUseKey, NatUseKey6, PROG_SLOTS, PROG6_SLOTS, PortKey, PortTarget, StatsKey,
        TaskInfo, ct_new_size, nat_use_size,
    },
    policy::{
        MAX_SG_LEVELS6, MAX_SG_PEERS, MAX_SG_PEERS6, MAX_SG_RULES, PeerKey, PeerKey6, PeerRules,
        RuleKey,
    },
};

/// Declares each map under its own name (the `#[map]` default): the name user space pins it
/// under and opens it by (`ecsnet_common::maps::MAP_*`).
macro_rules! maps {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $init:expr;)*) => {$(
        $(#[$doc])*
        #[map]
        pub static $name: $ty = $init;
    )*};
}

maps! {
    /// Interfaces ecsnet is attached to, written by user space at attach time.
    IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_TASKS + 16, 0);

    /// Tasks by IPv4 address, written by `ecsnet apply`; the datapath learns their MACs.
    TASKS: HashMap<u32, TaskInfo> = HashMap::with_max_entries(MAX_TASKS, 0);

    /// Tasks by IPv6 address -> their interface, written by `ecsnet apply`.
    TASKS6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_TASKS, 0);

    /// Packet and byte counters per interface, hook and class.
    STATS: PerCpuHashMap<StatsKey, Counters> = PerCpuHashMap::with_max_entries(MAX_STATS, 0);

    /// Dropped packets per interface, reason and hook.
    DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(MAX_DROP_KEYS, 0);

    /// The host's uplink and bridge, written by `ecsnet up`.
    CONFIG: Array<Config> = Array::with_max_entries(1, 0);

    /// The host's own addresses, written by `ecsnet up` and refreshed by the agent.
    LOCAL_ADDRS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

    /// Published ports, written by `ecsnet apply`.
    PORTS: HashMap<PortKey, PortTarget> = HashMap::with_max_entries(MAX_PORTS, 0);

    /// The connection table; user space sets its size at load time (`ecsnet up --ct-size`). Never
    /// LRU: a full table refuses new flows instead of evicting live ones. `BPF_F_NO_PREALLOC`:
    /// entries are allocated on insert and freed after an RCU grace period, so an entry the agent
    /// deletes is never reused under a program still holding it.
    CT: HashMap<CtKey, CtEntry> = HashMap::with_max_entries(DEFAULT_CT_SIZE, BPF_F_NO_PREALLOC);

    /// Flows nobody answered yet, evicted oldest first when full; user space sizes it from
    /// `--ct-size` at load time (`ct_new_size`). LRU maps are always preallocated.
    CT_NEW: LruHashMap<CtKey, CtEntry> =
        LruHashMap::with_max_entries(ct_new_size(DEFAULT_CT_SIZE), 0);

    /// Connection-table event counters (`CT_EV_*`).
    CT_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CT_EVENT_SLOTS, 0);

    /// Masqueraded flows per task and destination; user space sizes it from `--ct-size` at load
    /// time (`nat_use_size`). Allocated on insert: most hosts masquerade to few destinations.
    NAT_USE: HashMap<NatUseKey, u64> =
        HashMap::with_max_entries(nat_use_size(DEFAULT_CT_SIZE), BPF_F_NO_PREALLOC);

    /// `NAT_USE` for IPv6's masqueraded flows, sized as it.
    NAT_USE6: HashMap<NatUseKey6, u64> =
        HashMap::with_max_entries(nat_use_size(DEFAULT_CT_SIZE), BPF_F_NO_PREALLOC);

    /// The masquerade limits, written by `ecsnet up`.
    NAT_CONFIG: Array<NatConfig> = Array::with_max_entries(1, 0);

    /// Ports of first fragments, for the later fragments of the same datagram.
    /// (The upgrade test's other layout doubles it.)
    FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::with_max_entries(
        if cfg!(feature = "upgrade-test-layout") { 2 * MAX_FRAGS } else { MAX_FRAGS },
        0,
    );

    /// The IPv6 connection table, as `CT` (sized with it at load time).
    CT6: HashMap<CtKey6, CtEntry6> =
        HashMap::with_max_entries(DEFAULT_CT_SIZE, BPF_F_NO_PREALLOC);

    /// IPv6 flows nobody answered yet, as `CT_NEW`.
    CT6_NEW: LruHashMap<CtKey6, CtEntry6> =
        LruHashMap::with_max_entries(ct_new_size(DEFAULT_CT_SIZE), 0);

    /// Ports of the first fragments of IPv6 datagrams, as `FRAGS`.
    FRAGS6: LruHashMap<FragKey6, FragPorts> = LruHashMap::with_max_entries(MAX_FRAGS, 0);

    /// Security groups: (policy, direction, peer prefix) -> rule set, written by `ecsnet apply`.
    SG_PEERS: HashMap<PeerKey, PeerRules> = HashMap::with_max_entries(MAX_SG_PEERS, 0);

    /// Security groups: (rule set, protocol, port block) -> allowed, written by `ecsnet apply`.
    SG_RULES: HashMap<RuleKey, u32> = HashMap::with_max_entries(MAX_SG_RULES, 0);

    /// Security groups over IPv6: (policy, direction, peer prefix) -> rule set (in `SG_RULES`).
    SG_PEERS6: HashMap<PeerKey6, PeerRules> = HashMap::with_max_entries(MAX_SG_PEERS6, 0);

    /// The prefix lengths each scope's `SG_PEERS6` entries use (`ecsnet_common::policy`).
    SG_LEVELS6: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SG_LEVELS6, 0);

    /// Per-flow counters of the open and the closing capture windows; user space sets the size at
    /// load time (`ecsnet up --flow-table-size`). Preallocated: counting never allocates.
    FLOWS: PerCpuHashMap<FlowKey, FlowStats> =
        PerCpuHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

    /// The IPv6 twin of `FLOWS`, the same windows; sized with it (`--flow-table-size`).
    FLOWS6: PerCpuHashMap<FlowKey6, FlowStats6> =
        PerCpuHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

    /// Packets per interface and window that found `FLOWS` or `FLOWS6` full.
    FLOW_LOST: PerCpuHashMap<LostKey, Counters> =
        PerCpuHashMap::with_max_entries(MAX_FLOW_LOST_KEYS, 0);

    /// The open capture window and the event rate, written by `ecsnet up` and the agent.
    FLOW_STATE: Array<FlowState> = Array::with_max_entries(1, 0);

    /// Programs tail-called by other programs (`PROG_*` slots), written by user space at load time.
    PROGS: ProgramArray = ProgramArray::with_max_entries(PROG_SLOTS, 0);

    /// The IPv6 programs the entry points tail-call (`PROG6_*` slots), written at load time.
    PROGS6: ProgramArray = ProgramArray::with_max_entries(PROG6_SLOTS, 0);

    /// Drop and policy-verdict events for `ecsnet monitor`, read by the agent.
    EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

    /// Each CPU's token bucket for `EVENTS`.
    EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

    /// Published ports over IPv6 -> the task's IPv6 address, written by `ecsnet apply`.
    PORTS6: HashMap<PortKey, PortTarget6> = HashMap::with_max_entries(MAX_PORTS, 0);

    /// The host's own global IPv6 addresses, written by `ecsnet up` and refreshed by the agent.
    LOCAL_ADDRS6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

    /// The uplink's and the bridge's IPv6 addresses, written by `ecsnet up` and the agent.
    CONFIG6: Array<Config6> = Array::with_max_entries(1, 0);
}
