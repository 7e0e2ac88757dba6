//! Reading and writing the pinned maps of an instance. Writers take plain entries (the keys and
//! values of `ecsnet_common`, computed by `plan`); readers sum per-CPU values for the agent.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    hash::Hash,
    net::{Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
};

use aya::{
    Pod,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf,
    },
};
use ecsnet_common::{
    ct::{self, CtEntry, CtEntry6, CtKey, CtKey6, Timeouts},
    flow::{
        EventBudget, FlowKey, FlowKey6, FlowState, FlowStats, FlowStats6, LostKey,
        MAP_EVENT_BUDGET, MAP_EVENTS, MAP_FLOW_LOST, MAP_FLOW_STATE, MAP_FLOWS, MAP_FLOWS6,
    },
    maps::{
        CLASS_IPV4, CLASS_OTHER, CT_EVENT_SLOTS, Config, Config6, Counters, DropKey,
        HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP, IfaceInfo, MAP_CONFIG, MAP_CONFIG6, MAP_CT,
        MAP_CT_EVENTS, MAP_CT_NEW, MAP_CT6, MAP_CT6_NEW, MAP_DROPS, MAP_IFACES, MAP_LOCAL_ADDRS,
        MAP_LOCAL_ADDRS6, MAP_NAT_CONFIG, MAP_NAT_USE, MAP_NAT_USE6, MAP_PORTS, MAP_PORTS6,
        MAP_STATS, MAP_TASKS, MAP_TASKS6, NatConfig, NatUseKey, NatUseKey6, PortKey, PortTarget,
        PortTarget6, ROLE_TASK, StatsKey, TASK_IPV6, TaskInfo,
    },
    net::ipv4_from_map,
    policy::{
        GENERATION_BIT, MAP_SG_LEVELS6, MAP_SG_PEERS, MAP_SG_PEERS6, MAP_SG_RULES, PeerKey,
        PeerKey6, PeerRules, RuleKey,
    },
};

use crate::kernel::{
    batch,
    nat_use::{self, Held},
    pins::InstancePaths,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {map} ({path}): {source}")]
    Open {
        map: &'static str,
        path: PathBuf,
        source: MapError,
    },
    #[error("map {map}: {source}")]
    Access { map: &'static str, source: MapError },
    #[error("map {map}: {source}")]
    Batch {
        map: &'static str,
        source: std::io::Error,
    },
}

fn open(paths: &InstancePaths, map: &'static str) -> Result<Map, MapsError> {
    let path = paths.map_pin(map);
    let err = |source| MapsError::Open {
        map,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data).map_err(err)
}

fn access(map: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Access { map, source }
}

/// The pinned map `map` as the map type `T` (a hash map of its key and value types, ...).
fn open_as<T: TryFrom<Map, Error = MapError>>(
    paths: &InstancePaths,
    map: &'static str,
) -> Result<T, MapsError> {
    open(paths, map)?.try_into().map_err(access(map))
}

/// Inserts or updates `entries` in the hash map `m`, named `map`.
fn insert_all<K: Pod, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    map: &'static str,
    entries: &[(K, V)],
) -> Result<(), MapsError> {
    for (k, v) in entries {
        m.insert(k, v, 0).map_err(access(map))?;
    }
    Ok(())
}

/// Removes from the hash map `m`, named `map`, every key `stale` picks.
fn remove_keys<K: Pod, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    map: &'static str,
    stale: impl Fn(&K) -> bool,
) -> Result<(), MapsError> {
    let doomed: Vec<K> = m.keys().flatten().filter(|k| stale(k)).collect();
    for k in doomed {
        m.remove(&k).map_err(access(map))?;
    }
    Ok(())
}

/// The keys of `entries`.
fn keys_of<K: Eq + Hash + Copy, V>(entries: &[(K, V)]) -> HashSet<K> {
    entries.iter().map(|(k, _)| *k).collect()
}

/// Makes `TASKS`, `TASKS6` and the task rows of `IFACES` equal to the given entries; the uplink
/// rows of `IFACES` are kept. A datapath an older build loaded has no `TASKS6`: its tasks are
/// written without `TASK_IPV6` (their IPv6 addresses unknown to it), and `ecsnet upgrade`
/// fills both ([`write_tasks6`]).
pub fn write_tasks(
    paths: &InstancePaths,
    tasks: &[(u32, TaskInfo)],
    tasks6: &[([u8; 16], u32)],
    ifaces: &[(u32, IfaceInfo)],
) -> Result<(), MapsError> {
    // IPv6 addresses first and gone ones last: a task marked `TASK_IPV6` always finds its own.
    let mut t6: Option<HashMap<MapData, [u8; 16], u32>> = if tasks6_pinned(paths) {
        Some(open_as(paths, MAP_TASKS6)?)
    } else {
        if !tasks6.is_empty() {
            log::warn!(
                "this instance's datapath has no {MAP_TASKS6} (an older build): its tasks' IPv6 \
                 addresses are known to it after `ecsnet upgrade`"
            );
        }
        None
    };
    if let Some(t6) = &mut t6 {
        insert_all(t6, MAP_TASKS6, tasks6)?;
    }
    let before: StdHashMap<u32, TaskInfo> = read_tasks(paths)?.into_iter().collect();
    let mut t: HashMap<MapData, u32, TaskInfo> = open_as(paths, MAP_TASKS)?;
    for (k, v) in tasks {
        // Keep a MAC the datapath learned when the host had no neighbour entry to offer.
        let mut v = *v;
        if v.mac == [0; 6]
            && let Some(old) = before.get(k)
            && old.ifindex == v.ifindex
        {
            v.mac = old.mac;
        }
        if t6.is_none() {
            v.flags &= !TASK_IPV6;
        }
        t.insert(k, &v, 0).map_err(access(MAP_TASKS))?;
    }
    let keep = keys_of(tasks);
    remove_keys(&mut t, MAP_TASKS, |k| !keep.contains(k))?;
    if let Some(t6) = &mut t6 {
        let keep = keys_of(tasks6);
        remove_keys(t6, MAP_TASKS6, |k| !keep.contains(k))?;
    }

    let mut i: HashMap<MapData, u32, IfaceInfo> = open_as(paths, MAP_IFACES)?;
    insert_all(&mut i, MAP_IFACES, ifaces)?;
    let keep = keys_of(ifaces);
    let task_rows: HashSet<u32> = read_ifaces(paths)?
        .into_iter()
        .filter(|(_, v)| v.role == ROLE_TASK)
        .map(|(k, _)| k)
        .collect();
    remove_keys(&mut i, MAP_IFACES, |k| {
        task_rows.contains(k) && !keep.contains(k)
    })
}

/// Whether the datapath has `TASKS6` (an older build's has not).
fn tasks6_pinned(paths: &InstancePaths) -> bool {
    paths.map_pin(MAP_TASKS6).exists()
}

/// `ecsnet upgrade` over a datapath an older build wrote: makes `TASKS6` equal to `tasks6`,
/// then marks `TASK_IPV6` exactly the `TASKS` entries on those interfaces (in that order, as
/// [`write_tasks`]: a marked task always finds its own address). False, having written
/// nothing, when the datapath has no `TASKS6`.
pub fn write_tasks6(paths: &InstancePaths, tasks6: &[([u8; 16], u32)]) -> Result<bool, MapsError> {
    if !replace_newer(paths, MAP_TASKS6, tasks6)? {
        return Ok(false);
    }
    let with6: HashSet<u32> = tasks6.iter().map(|(_, ifindex)| *ifindex).collect();
    let mut t: HashMap<MapData, u32, TaskInfo> = open_as(paths, MAP_TASKS)?;
    for (k, mut v) in read_tasks(paths)? {
        let flags = if with6.contains(&v.ifindex) {
            v.flags | TASK_IPV6
        } else {
            v.flags & !TASK_IPV6
        };
        if flags != v.flags {
            v.flags = flags;
            t.insert(&k, &v, 0).map_err(access(MAP_TASKS))?;
        }
    }
    Ok(true)
}

/// Records an interface (the uplink) in `IFACES`.
pub fn write_iface(paths: &InstancePaths, ifindex: u32, info: IfaceInfo) -> Result<(), MapsError> {
    let mut i: HashMap<MapData, u32, IfaceInfo> = open_as(paths, MAP_IFACES)?;
    i.insert(&ifindex, &info, 0).map_err(access(MAP_IFACES))
}

/// Removes an interface's row from `IFACES`.
pub fn remove_iface(paths: &InstancePaths, ifindex: u32) -> Result<(), MapsError> {
    let mut i: HashMap<MapData, u32, IfaceInfo> = open_as(paths, MAP_IFACES)?;
    remove_keys(&mut i, MAP_IFACES, |k| *k == ifindex)
}

/// Every entry of the pinned hash map `map`, read in chunks: an apply reads `TASKS` and
/// `IFACES` several times, a thousand entries each, where aya takes two system calls an entry.
fn read_all<K: Pod, V: Pod>(
    paths: &InstancePaths,
    map: &'static str,
) -> Result<Vec<(K, V)>, MapsError> {
    let data = pinned_for_batch::<K, V>(paths, map)?;
    batch::lookup_all(data.fd().as_fd()).map_err(|source| MapsError::Batch { map, source })
}

/// `TASKS` as it is in the kernel: by address (network order).
pub fn read_tasks(paths: &InstancePaths) -> Result<Vec<(u32, TaskInfo)>, MapsError> {
    read_all(paths, MAP_TASKS)
}

/// Every entry of the hash map `map`, which a datapath loaded by an older build lacks (`up`
/// keeps a loaded datapath; `ecsnet upgrade` makes it): none then.
fn read_newer<K: Pod, V: Pod>(
    paths: &InstancePaths,
    map: &'static str,
) -> Result<Vec<(K, V)>, MapsError> {
    if !paths.map_pin(map).exists() {
        return Ok(Vec::new());
    }
    read_all(paths, map)
}

/// `TASKS6` as it is in the kernel: IPv6 address -> ifindex (none from a datapath without it).
pub fn read_tasks6(paths: &InstancePaths) -> Result<Vec<([u8; 16], u32)>, MapsError> {
    read_newer(paths, MAP_TASKS6)
}

/// `IFACES` as it is in the kernel.
pub fn read_ifaces(paths: &InstancePaths) -> Result<Vec<(u32, IfaceInfo)>, MapsError> {
    read_all(paths, MAP_IFACES)
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, c: &Counters) {
        self.packets += c.packets;
        self.bytes += c.bytes;
    }
}

/// The counters of one interface, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IfaceCounts {
    /// IPv4 at tc ingress (for a task interface: sent by the task).
    pub tc_ingress: Count,
    /// IPv4 at tc egress (for a task interface: delivered to the task).
    pub tc_egress: Count,
    /// IPv4 seen by XDP (uplink only).
    pub xdp: Count,
    /// Non-IPv4 frames at tc ingress.
    pub other_ingress: Count,
    /// Non-IPv4 frames at tc egress.
    pub other_egress: Count,
}

fn sum(values: &PerCpuValues<Counters>) -> Counters {
    values.iter().fold(Counters::default(), |mut acc, c| {
        acc.packets += c.packets;
        acc.bytes += c.bytes;
        acc
    })
}

/// Counters of every interface with any, by ifindex.
pub fn read_counts(paths: &InstancePaths) -> Result<StdHashMap<u32, IfaceCounts>, MapsError> {
    let m: PerCpuHashMap<MapData, StatsKey, Counters> = open_as(paths, MAP_STATS)?;
    let mut out: StdHashMap<u32, IfaceCounts> = StdHashMap::new();
    for entry in &m {
        let (key, per_cpu) = entry.map_err(access(MAP_STATS))?;
        let total = sum(&per_cpu);
        let counts = out.entry(key.ifindex).or_default();
        let slot = match (key.hook, key.class) {
            (HOOK_TC_INGRESS, CLASS_IPV4) => &mut counts.tc_ingress,
            (HOOK_TC_EGRESS, CLASS_IPV4) => &mut counts.tc_egress,
            (HOOK_XDP, CLASS_IPV4) => &mut counts.xdp,
            (HOOK_TC_INGRESS | HOOK_XDP, CLASS_OTHER) => &mut counts.other_ingress,
            (HOOK_TC_EGRESS, CLASS_OTHER) => &mut counts.other_egress,
            _ => continue,
        };
        slot.add(&total);
    }
    Ok(out)
}

/// Drops by (ifindex, reason number), summed over CPUs and hooks.
pub fn read_drops(paths: &InstancePaths) -> Result<StdHashMap<(u32, u8), u64>, MapsError> {
    let m: PerCpuHashMap<MapData, DropKey, u64> = open_as(paths, MAP_DROPS)?;
    let mut out = StdHashMap::new();
    for entry in &m {
        let (k, v) = entry.map_err(access(MAP_DROPS))?;
        *out.entry((k.ifindex, k.reason)).or_default() += v.iter().sum::<u64>();
    }
    Ok(out)
}

/// Removes the packet and drop counters of an interface that is no longer attached: ifindexes
/// only grow, so counters left behind by departed containers would fill the maps.
pub fn forget_iface(paths: &InstancePaths, ifindex: u32) -> Result<(), MapsError> {
    remove_per_cpu::<StatsKey, Counters>(paths, MAP_STATS, |k| k.ifindex == ifindex)?;
    remove_per_cpu::<DropKey, u64>(paths, MAP_DROPS, |k| k.ifindex == ifindex)
}

/// Removes from the per-CPU hash map `map` every key `doomed` picks.
fn remove_per_cpu<K: Pod, V: Pod>(
    paths: &InstancePaths,
    map: &'static str,
    doomed: impl Fn(&K) -> bool,
) -> Result<(), MapsError> {
    let mut m: PerCpuHashMap<MapData, K, V> = open_as(paths, map)?;
    let keys: Vec<K> = m.keys().flatten().filter(|k| doomed(k)).collect();
    for k in keys {
        m.remove(&k).map_err(access(map))?;
    }
    Ok(())
}

/// Writes the host's configuration; the datapath starts translating once it is there.
pub fn write_config(paths: &InstancePaths, cfg: &Config) -> Result<(), MapsError> {
    let mut a: Array<MapData, Config> = open_as(paths, MAP_CONFIG)?;
    a.set(0, cfg, 0).map_err(access(MAP_CONFIG))
}

/// The host's configuration as the datapath has it.
pub fn read_config(paths: &InstancePaths) -> Result<Config, MapsError> {
    let a: Array<MapData, Config> = open_as(paths, MAP_CONFIG)?;
    a.get(&0, 0).map_err(access(MAP_CONFIG))
}

/// Sets `CONFIG::flags`, leaving the rest of the configuration as it is.
pub fn write_config_flags(paths: &InstancePaths, flags: u8) -> Result<(), MapsError> {
    let mut cfg = read_config(paths)?;
    cfg.flags = flags;
    write_config(paths, &cfg)
}

/// Makes a hash map's entries equal to `entries`: insert or update them, then remove the rest.
fn replace_all<K: Pod + Eq + Hash, V: Pod>(
    paths: &InstancePaths,
    map: &'static str,
    entries: &[(K, V)],
) -> Result<(), MapsError> {
    let mut m: HashMap<MapData, K, V> = open_as(paths, map)?;
    insert_all(&mut m, map, entries)?;
    let keep = keys_of(entries);
    remove_keys(&mut m, map, |k| !keep.contains(k))
}

/// Makes `LOCAL_ADDRS` equal to the host's addresses (network byte order -> ifindex).
pub fn write_local_addrs(paths: &InstancePaths, addrs: &[(u32, u32)]) -> Result<(), MapsError> {
    replace_all(paths, MAP_LOCAL_ADDRS, addrs)
}

/// Makes `PORTS` equal to the published ports.
pub fn write_ports(
    paths: &InstancePaths,
    ports: &[(PortKey, PortTarget)],
) -> Result<(), MapsError> {
    replace_all(paths, MAP_PORTS, ports)
}

/// `PORTS` as it is in the kernel.
pub fn read_ports(paths: &InstancePaths) -> Result<Vec<(PortKey, PortTarget)>, MapsError> {
    read_all(paths, MAP_PORTS)
}

/// Makes the hash map `map`, which a datapath loaded by an older build lacks, equal to
/// `entries`; false, having written nothing, when it is not there (`ecsnet upgrade` makes it,
/// and fills it).
fn replace_newer<K: Pod + Eq + Hash, V: Pod>(
    paths: &InstancePaths,
    map: &'static str,
    entries: &[(K, V)],
) -> Result<bool, MapsError> {
    if !paths.map_pin(map).exists() {
        return Ok(false);
    }
    replace_all(paths, map, entries).map(|()| true)
}

/// Makes `PORTS6` equal to the published IPv6 ports; false when the datapath has no `PORTS6`.
pub fn write_ports6(
    paths: &InstancePaths,
    ports: &[(PortKey, PortTarget6)],
) -> Result<bool, MapsError> {
    replace_newer(paths, MAP_PORTS6, ports)
}

/// `PORTS6` as it is in the kernel (none from a datapath without it).
pub fn read_ports6(paths: &InstancePaths) -> Result<Vec<(PortKey, PortTarget6)>, MapsError> {
    read_newer(paths, MAP_PORTS6)
}

/// Makes `LOCAL_ADDRS6` equal to the host's global IPv6 addresses (-> ifindex); false when the
/// datapath has no `LOCAL_ADDRS6`.
pub fn write_local_addrs6(
    paths: &InstancePaths,
    addrs: &[([u8; 16], u32)],
) -> Result<bool, MapsError> {
    replace_newer(paths, MAP_LOCAL_ADDRS6, addrs)
}

/// `LOCAL_ADDRS6` as it is in the kernel (none from a datapath without it).
pub fn read_local_addrs6(paths: &InstancePaths) -> Result<Vec<([u8; 16], u32)>, MapsError> {
    read_newer(paths, MAP_LOCAL_ADDRS6)
}

/// Sets the one entry of the array `map`, which a datapath loaded by an older build lacks;
/// false, having written nothing, when it is not there.
fn set_newer<V: Pod>(paths: &InstancePaths, map: &'static str, v: &V) -> Result<bool, MapsError> {
    if !paths.map_pin(map).exists() {
        return Ok(false);
    }
    let mut a: Array<MapData, V> = open_as(paths, map)?;
    a.set(0, v, 0).map_err(access(map))?;
    Ok(true)
}

/// The one entry of the array `map`; None from a datapath loaded by an older build, without it.
fn get_newer<V: Pod>(paths: &InstancePaths, map: &'static str) -> Result<Option<V>, MapsError> {
    if !paths.map_pin(map).exists() {
        return Ok(None);
    }
    let a: Array<MapData, V> = open_as(paths, map)?;
    a.get(&0, 0).map(Some).map_err(access(map))
}

/// Writes the host's IPv6 addresses for NAT66; false when the datapath has no `CONFIG6`.
pub fn write_config6(paths: &InstancePaths, cfg: &Config6) -> Result<bool, MapsError> {
    set_newer(paths, MAP_CONFIG6, cfg)
}

/// The host's IPv6 addresses as the datapath has them; None from a datapath without `CONFIG6`.
pub fn read_config6(paths: &InstancePaths) -> Result<Option<Config6>, MapsError> {
    get_newer(paths, MAP_CONFIG6)
}

/// One address family's pair of connection tables, by the type of their entries: `CtEntry`
/// (`CT`, `CT_NEW`) and `CtEntry6` (`CT6`, `CT6_NEW`). Both are kept by the same rules (two
/// entries per flow, the same timeouts); this is what reading, expiring and cutting them needs
/// to know of an entry.
pub trait Tracked: Pod + Default {
    /// The tuple a table is keyed by.
    type Key: Pod + Eq + Hash;
    /// An address as a key holds it.
    type Addr: Copy + Eq + Hash;
    /// A key as the garbage collection indexes it (an IPv4 key packs into a number).
    type Index: Eq + Hash;
    /// The assured table, then the table of flows not answered yet (LRU).
    const TABLES: [&'static str; 2];
    /// The IPv6 tables are new: a datapath an older build loaded has none (nothing to read).
    const OPTIONAL: bool;
    /// The masquerade counts of this family's flows (`NAT_USE`, `NAT_USE6`), and their key.
    const NAT_USE: &'static str;
    type UseKey: Pod + Copy + Ord + Hash;
    /// The masquerade count's key of the flow whose original tuple is `k`.
    fn use_key(k: &Self::Key) -> Self::UseKey;
    fn index(k: &Self::Key) -> Self::Index;
    /// The key's source and destination address.
    fn addresses(k: &Self::Key) -> [Self::Addr; 2];
    /// The key of the flow's other direction.
    fn peer(&self) -> &Self::Key;
    /// `DIR_*`.
    fn dir(&self) -> u8;
    /// `KIND_*`.
    fn kind(&self) -> u8;
    /// The key's IP protocol number.
    fn proto(k: &Self::Key) -> u8;
    /// What expiry reads of this direction (TCP flags, last seen), as an IPv4 entry.
    fn timing(&self) -> CtEntry;
    /// The key's source and destination, the ports in host order.
    fn ends(k: &Self::Key) -> (SocketAddr, SocketAddr);
    /// What this direction's packets are rewritten to, the ports in host order.
    fn rewritten(&self) -> (SocketAddr, SocketAddr);
    /// Packets and IP bytes in this direction.
    fn count(&self) -> Count;
    /// Counts the masquerade port this entry holds in `held`.
    fn hold(&self, held: &mut Held<Self::UseKey>) {
        nat_use::count(held, self.kind(), self.dir(), || Self::use_key(self.peer()));
    }
}

/// The [`Tracked`] accessors whose code is the same for both entry types, field for field:
/// `$key` is the key type, `$sock` makes a socket address of an address and a port.
macro_rules! same_fields {
    ($key:ty, $sock:ident) => {
        fn addresses(k: &$key) -> [Self::Addr; 2] {
            [k.saddr, k.daddr]
        }
        fn peer(&self) -> &$key {
            &self.peer
        }
        fn dir(&self) -> u8 {
            self.dir
        }
        fn kind(&self) -> u8 {
            self.kind
        }
        fn proto(k: &$key) -> u8 {
            k.proto
        }
        fn ends(k: &$key) -> (SocketAddr, SocketAddr) {
            ($sock(k.saddr, k.sport), $sock(k.daddr, k.dport))
        }
        fn rewritten(&self) -> (SocketAddr, SocketAddr) {
            (
                $sock(self.nat_saddr, self.nat_sport),
                $sock(self.nat_daddr, self.nat_dport),
            )
        }
        fn count(&self) -> Count {
            Count {
                packets: self.packets,
                bytes: self.bytes,
            }
        }
    };
}

impl Tracked for CtEntry {
    type Key = CtKey;
    type Addr = u32;
    /// Every field but the padding, in one number: a million flows are two million entries,
    /// and an index of packed keys is built in a third of the time a map of keys took.
    type Index = u128;
    const TABLES: [&'static str; 2] = [MAP_CT, MAP_CT_NEW];
    const OPTIONAL: bool = false;
    const NAT_USE: &'static str = MAP_NAT_USE;
    type UseKey = NatUseKey;

    same_fields!(CtKey, v4);

    fn index(k: &CtKey) -> u128 {
        u128::from(k.saddr) << 96
            | u128::from(k.daddr) << 64
            | u128::from(k.sport) << 48
            | u128::from(k.dport) << 32
            | u128::from(k.proto)
    }
    fn timing(&self) -> CtEntry {
        *self
    }
    fn use_key(k: &CtKey) -> NatUseKey {
        NatUseKey::of(k)
    }
}

impl Tracked for CtEntry6 {
    type Key = CtKey6;
    type Addr = [u8; 16];
    type Index = CtKey6;
    const TABLES: [&'static str; 2] = [MAP_CT6, MAP_CT6_NEW];
    const OPTIONAL: bool = true;
    const NAT_USE: &'static str = MAP_NAT_USE6;
    type UseKey = NatUseKey6;

    same_fields!(CtKey6, v6);

    fn index(k: &CtKey6) -> CtKey6 {
        *k
    }
    fn use_key(k: &CtKey6) -> NatUseKey6 {
        NatUseKey6::of(k)
    }
    fn timing(&self) -> CtEntry {
        CtEntry {
            tcp_flags: self.tcp_flags,
            last_seen_ns: self.last_seen_ns,
            ..CtEntry::default()
        }
    }
}

/// The IP protocol number of `ICMPv6`.
pub const PROTO_ICMPV6: u8 = 58;

/// Protocol `proto` as `ct::state` reads it: `ICMPv6` echo is tracked as ICMP echo is.
pub fn state_proto(proto: u8) -> u8 {
    if proto == PROTO_ICMPV6 {
        ct::PROTO_ICMP
    } else {
        proto
    }
}

/// An IPv4 address and port as the tables hold them (network byte order).
fn v4(addr: u32, port: u16) -> SocketAddr {
    SocketAddr::new(ipv4_from_map(addr).into(), u16::from_be(port))
}

/// An IPv6 address and port as the tables hold them (network byte order).
fn v6(addr: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::from(addr).into(), u16::from_be(port))
}

/// Whether `T`'s tables are pinned: always for IPv4, a datapath an older build loaded has no
/// IPv6 tables.
fn ct_pinned<T: Tracked>(paths: &InstancePaths) -> bool {
    !T::OPTIONAL || paths.map_pin(T::TABLES[0]).exists()
}

/// Entries of connection tables, each with its table's name.
pub type TableEntries<T> = Vec<(&'static str, <T as Tracked>::Key, T)>;

/// Every entry of `T`'s connection tables, each with its table's name (none when they are not
/// pinned).
pub fn read_tables<T: Tracked>(paths: &InstancePaths) -> Result<TableEntries<T>, MapsError> {
    let mut all = Vec::new();
    for_each_ct::<T>(paths, |map, k, e| all.push((map, *k, *e)))?;
    Ok(all)
}

/// Every entry of the IPv4 connection tables, each with its table's name.
pub fn read_ct(paths: &InstancePaths) -> Result<TableEntries<CtEntry>, MapsError> {
    read_tables(paths)
}

/// Every entry of the IPv6 connection tables, each with its table's name.
pub fn read_ct6(paths: &InstancePaths) -> Result<TableEntries<CtEntry6>, MapsError> {
    read_tables(paths)
}

/// Calls `each` with every entry of `T`'s connection tables and its table's name, read in
/// chunks and never all held at once (a million flows are two million entries).
pub fn for_each_ct<T: Tracked>(
    paths: &InstancePaths,
    mut each: impl FnMut(&'static str, &T::Key, &T),
) -> Result<(), MapsError> {
    if !ct_pinned::<T>(paths) {
        return Ok(());
    }
    for map in T::TABLES {
        let data = pinned_for_batch::<T::Key, T>(paths, map)?;
        batch::for_each(data.fd().as_fd(), |k: T::Key, e: T| each(map, &k, &e))
            .map_err(|source| MapsError::Batch { map, source })?;
    }
    Ok(())
}

/// Inserts `entries` into connection table `map` (one of `T::TABLES`) in chunks, as the
/// datapath would have made them: for seeding a large table (the scale benchmark and its test).
pub fn insert_ct<T: Tracked>(
    paths: &InstancePaths,
    map: &'static str,
    entries: &[(T::Key, T)],
) -> Result<(), MapsError> {
    let data = pinned_for_batch::<T::Key, T>(paths, map)?;
    batch::update(data.fd().as_fd(), entries).map_err(|source| MapsError::Batch { map, source })
}

/// The connection-table event counters (`CT_EV_*`), summed over CPUs.
pub fn read_ct_events(paths: &InstancePaths) -> Result<[u64; CT_EVENT_SLOTS as usize], MapsError> {
    let m: PerCpuArray<MapData, u64> = open_as(paths, MAP_CT_EVENTS)?;
    let mut out = [0; CT_EVENT_SLOTS as usize];
    for (slot, n) in (0..CT_EVENT_SLOTS).zip(out.iter_mut()) {
        *n = m.get(&slot, 0).map_err(access(MAP_CT_EVENTS))?.iter().sum();
    }
    Ok(out)
}

/// The pinned map `map` as raw map data.
fn pinned(paths: &InstancePaths, map: &'static str) -> Result<MapData, MapsError> {
    let path = paths.map_pin(map);
    MapData::from_pin(&path).map_err(|source| MapsError::Open { map, path, source })
}

/// The pinned map `map`, refused unless its keys and values have the sizes of `K` and `V`
/// (one CPU's value for a per-CPU map), for reading it in chunks (`batch`).
fn pinned_for_batch<K, V>(paths: &InstancePaths, map: &'static str) -> Result<MapData, MapsError> {
    let data = pinned(paths, map)?;
    let info = data.info().map_err(access(map))?;
    batch::check_sizes::<K, V>(info.key_size(), info.value_size())
        .map_err(|source| MapsError::Batch { map, source })?;
    Ok(data)
}

/// A pinned connection table and its entries.
type Table<T> = (MapData, Vec<(<T as Tracked>::Key, T)>);

/// A pinned connection table (one of `T::TABLES`) and all its entries, read in chunks.
fn ct_table<T: Tracked>(paths: &InstancePaths, map: &'static str) -> Result<Table<T>, MapsError> {
    let data = pinned_for_batch::<T::Key, T>(paths, map)?;
    let entries =
        batch::lookup_all(data.fd().as_fd()).map_err(|source| MapsError::Batch { map, source })?;
    Ok((data, entries))
}

/// Capacity of a pinned map, entries.
fn capacity(paths: &InstancePaths, map: &'static str) -> Result<u32, MapsError> {
    let info = pinned(paths, map)?.info().map_err(access(map))?;
    Ok(info.max_entries())
}

/// Capacity of connection table `map` (one of `Tracked::TABLES`), entries; 0 for an IPv6
/// table a datapath from an older build lacks.
pub fn ct_capacity(paths: &InstancePaths, map: &'static str) -> Result<u32, MapsError> {
    if !paths.map_pin(map).exists() && CtEntry6::TABLES.contains(&map) {
        return Ok(0);
    }
    capacity(paths, map)
}

/// What one garbage collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Flows removed.
    pub removed: usize,
    /// Entries read from both connection tables: the pass's work.
    pub scanned: usize,
}

/// Removes the flows idle longer than their state allows at `now_ns` (`CLOCK_MONOTONIC`), both
/// directions together, from the connection tables of both families, and sets each family's
/// masquerade counts to the ports the flows left hold (`nat_use`).
pub fn collect_garbage(
    paths: &InstancePaths,
    timeouts: &Timeouts,
    now_ns: u64,
) -> Result<Collected, MapsError> {
    let mut out = Collected::default();
    collect_family::<CtEntry>(paths, timeouts, now_ns, &mut out)?;
    collect_family::<CtEntry6>(paths, timeouts, now_ns, &mut out)?;
    Ok(out)
}

/// [`collect_garbage`] for `T`'s two tables (none when they are not pinned), added to `out`,
/// then `T::NAT_USE` settled.
fn collect_family<T: Tracked>(
    paths: &InstancePaths,
    timeouts: &Timeouts,
    now_ns: u64,
    out: &mut Collected,
) -> Result<(), MapsError> {
    if !ct_pinned::<T>(paths) {
        return Ok(());
    }
    // A datapath loaded by a build without the counts (of this family) has nothing to set.
    let counted = paths.map_pin(T::NAT_USE).exists();
    let before = if counted {
        nat_use_table::<T::UseKey>(paths, T::NAT_USE)?.1
    } else {
        StdHashMap::new()
    };
    let mut held = Held::new();
    for map in T::TABLES {
        let (removed, scanned) = collect_table::<T>(paths, map, timeouts, now_ns, &mut held)?;
        out.removed += removed;
        out.scanned += scanned;
    }
    if counted {
        settle_nat_use(paths, T::NAT_USE, &before, &held)?;
    }
    Ok(())
}

/// [`collect_garbage`] for one table, counting the masquerade ports the flows it keeps hold in
/// `held`: the flows removed and the entries read. A flow's two entries are always in the same
/// table: the datapath moves them together.
fn collect_table<T: Tracked>(
    paths: &InstancePaths,
    map: &'static str,
    timeouts: &Timeouts,
    now_ns: u64,
    held: &mut Held<T::UseKey>,
) -> Result<(usize, usize), MapsError> {
    let (data, all) = ct_table::<T>(paths, map)?;
    let scanned = all.len();
    // Where each key is in `all`, by `T::index`.
    let mut at: StdHashMap<T::Index, usize> = StdHashMap::with_capacity(scanned);
    for (i, (k, _)) in all.iter().enumerate() {
        at.insert(T::index(k), i);
    }
    let get = |k: &T::Key| at.get(&T::index(k)).map(|&i| &all[i].1);
    let mut doomed = Vec::new();
    let mut removed = 0;
    for (k, e) in &all {
        let proto = state_proto(T::proto(k));
        if e.dir() != ct::DIR_ORIGINAL {
            // Reply entries go with their original; an orphan (its original already gone) is
            // judged on its own.
            if get(e.peer()).is_some() {
                continue;
            }
            let t = e.timing();
            if ct::expired(proto, &t, &t, timeouts, now_ns) {
                doomed.push(*k);
            } else {
                e.hold(held);
            }
            continue;
        }
        let reply = get(e.peer()).copied();
        let reply_timing = reply.map(|r| r.timing()).unwrap_or_default();
        if ct::expired(proto, &e.timing(), &reply_timing, timeouts, now_ns) {
            // Reply first (the deletes keep this order): a packet racing with us then misses
            // and takes the kernel path rather than finding half a flow.
            doomed.push(*e.peer());
            doomed.push(*k);
            removed += 1;
        } else if let Some(reply) = reply {
            reply.hold(held);
        }
    }
    batch::delete(data.fd().as_fd(), &doomed).map_err(|source| MapsError::Batch { map, source })?;
    Ok((removed, scanned))
}

/// The pinned masquerade counts `map` (`NAT_USE`, `NAT_USE6`, keyed by `K`) and all their
/// entries.
fn nat_use_table<K: Pod + Eq + Hash>(
    paths: &InstancePaths,
    map: &'static str,
) -> Result<(MapData, StdHashMap<K, u64>), MapsError> {
    let data = pinned_for_batch::<K, u64>(paths, map)?;
    let entries =
        batch::lookup_all(data.fd().as_fd()).map_err(|source| MapsError::Batch { map, source })?;
    Ok((data, entries.into_iter().collect()))
}

/// Sets the masquerade counts `map`, read as `before` when the connection tables began to be
/// read, to the ports `held` in them plus what the datapath added since (`nat_use::changes`).
/// Each key to change is read again just before it is written, so that only what the datapath
/// does between two system calls can be lost: set right at the next pass.
fn settle_nat_use<K: Pod + Copy + Ord + Hash>(
    paths: &InstancePaths,
    map: &'static str,
    before: &StdHashMap<K, u64>,
    held: &Held<K>,
) -> Result<(), MapsError> {
    let (data, now) = nat_use_table::<K>(paths, map)?;
    let changes = nat_use::changes(before, &now, held);
    if changes.is_empty() {
        return Ok(());
    }
    let mut m: HashMap<MapData, K, u64> = Map::from_map_data(data)
        .and_then(TryInto::try_into)
        .map_err(access(map))?;
    for (k, _) in changes {
        let current = m.get(&k, 0).ok();
        let held = held.get(&k).copied().unwrap_or(0);
        match nat_use::settled(held, before.get(&k).copied(), current) {
            Some(n) if Some(n) != current => m.insert(&k, &n, 0).map_err(access(map))?,
            // Gone already is as good as removed.
            None if current.is_some() => {
                let _ = m.remove(&k);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Writes the masquerade limits. A datapath still loaded from a build without them (`up` keeps
/// a loaded datapath) has no such map: nothing is written, and false says so.
pub fn write_nat_config(paths: &InstancePaths, cfg: &NatConfig) -> Result<bool, MapsError> {
    set_newer(paths, MAP_NAT_CONFIG, cfg)
}

/// The masquerade limits; None from a datapath loaded by a build without them.
pub fn read_nat_config(paths: &InstancePaths) -> Result<Option<NatConfig>, MapsError> {
    get_newer(paths, MAP_NAT_CONFIG)
}

/// The masquerade counts of `T`'s family: ports held by each task towards each destination
/// (none from a datapath loaded by a build without them).
pub fn read_nat_use_of<T: Tracked>(
    paths: &InstancePaths,
) -> Result<Vec<(T::UseKey, u64)>, MapsError> {
    if !paths.map_pin(T::NAT_USE).exists() {
        return Ok(Vec::new());
    }
    Ok(nat_use_table(paths, T::NAT_USE)?.1.into_iter().collect())
}

/// The IPv4 masquerade counts (`NAT_USE`): [`read_nat_use_of`].
pub fn read_nat_use(paths: &InstancePaths) -> Result<Vec<(NatUseKey, u64)>, MapsError> {
    read_nat_use_of::<CtEntry>(paths)
}

/// The IPv6 masquerade counts (`NAT_USE6`): [`read_nat_use_of`].
pub fn read_nat_use6(paths: &InstancePaths) -> Result<Vec<(NatUseKey6, u64)>, MapsError> {
    read_nat_use_of::<CtEntry6>(paths)
}

/// The generation a new policy should be written in: the one the live maps do not use. Every
/// live scope is in `SG_PEERS` or `SG_LEVELS6` (a policy with no entries at all has nothing to
/// overwrite).
pub fn next_policy_generation(paths: &InstancePaths) -> Result<u32, MapsError> {
    let live = |k: u32| k >> 1 & GENERATION_BIT != 0;
    let mut live_is_one = false;
    if paths.map_pin(MAP_SG_PEERS).exists() {
        let m: HashMap<MapData, PeerKey, PeerRules> = open_as(paths, MAP_SG_PEERS)?;
        live_is_one = m.keys().flatten().any(|k| live(k.scope));
    }
    // Not loaded yet, or loaded by a build without IPv6 policy: nothing there is live.
    if !live_is_one && paths.map_pin(MAP_SG_LEVELS6).exists() {
        let m: HashMap<MapData, u32, u32> = open_as(paths, MAP_SG_LEVELS6)?;
        live_is_one = m.keys().flatten().any(live);
    }
    Ok(u32::from(!live_is_one))
}

/// A policy's entries in every policy map, as the plan computes them.
#[derive(Debug, Clone, Copy)]
pub struct PolicyEntries<'a> {
    /// `SG_PEERS`.
    pub peers: &'a [(PeerKey, PeerRules)],
    /// `SG_RULES` (value 1).
    pub rules: &'a [(RuleKey, u32)],
    /// `SG_PEERS6`.
    pub peers6: &'a [(PeerKey6, PeerRules)],
    /// `SG_LEVELS6`: scope -> lengths used.
    pub levels6: &'a [(u32, u32)],
}

/// Whether this instance's datapath has the IPv6 policy maps. One loaded by a build without
/// them (`up` keeps a loaded datapath) drops the IPv6 of every policed task: nothing to write.
fn has_policy6(paths: &InstancePaths) -> bool {
    paths.map_pin(MAP_SG_PEERS6).exists() && paths.map_pin(MAP_SG_LEVELS6).exists()
}

/// Writes a policy's entries beside the live ones: rule sets first, then the peers that point
/// at them, then the IPv6 lengths. Tasks switch to it when `write_tasks` gives them the new
/// policy numbers; `remove_stale_policy` then drops the old.
pub fn write_policy(paths: &InstancePaths, p: &PolicyEntries) -> Result<(), MapsError> {
    insert_all(&mut open_as(paths, MAP_SG_RULES)?, MAP_SG_RULES, p.rules)?;
    insert_all(&mut open_as(paths, MAP_SG_PEERS)?, MAP_SG_PEERS, p.peers)?;
    if has_policy6(paths) {
        insert_all(&mut open_as(paths, MAP_SG_PEERS6)?, MAP_SG_PEERS6, p.peers6)?;
        insert_all(
            &mut open_as(paths, MAP_SG_LEVELS6)?,
            MAP_SG_LEVELS6,
            p.levels6,
        )?;
    } else if !p.peers6.is_empty() {
        log::warn!(
            "this instance's datapath has no IPv6 security groups ({MAP_SG_PEERS6}): its policed tasks get no IPv6 until `ecsnet upgrade`"
        );
    }
    Ok(())
}

/// Removes every policy entry that is not one of `p`'s, in every policy map: the lengths first,
/// the rule sets last, the reverse of `write_policy`.
pub fn remove_stale_policy(paths: &InstancePaths, p: &PolicyEntries) -> Result<(), MapsError> {
    if has_policy6(paths) {
        let keep = keys_of(p.levels6);
        let mut l: HashMap<MapData, u32, u32> = open_as(paths, MAP_SG_LEVELS6)?;
        remove_keys(&mut l, MAP_SG_LEVELS6, |k| !keep.contains(k))?;
        let keep = keys_of(p.peers6);
        let mut p6: HashMap<MapData, PeerKey6, PeerRules> = open_as(paths, MAP_SG_PEERS6)?;
        remove_keys(&mut p6, MAP_SG_PEERS6, |k| !keep.contains(k))?;
    }
    let keep = keys_of(p.peers);
    let mut m: HashMap<MapData, PeerKey, PeerRules> = open_as(paths, MAP_SG_PEERS)?;
    remove_keys(&mut m, MAP_SG_PEERS, |k| !keep.contains(k))?;
    let keep = keys_of(p.rules);
    let mut r: HashMap<MapData, RuleKey, u32> = open_as(paths, MAP_SG_RULES)?;
    remove_keys(&mut r, MAP_SG_RULES, |k| !keep.contains(k))
}

/// The IPv6 policy entries in the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy6 {
    /// `SG_PEERS6`, sorted by scope, length and address.
    pub peers: Vec<(PeerKey6, PeerRules)>,
    /// `SG_LEVELS6`, sorted by scope.
    pub levels: Vec<(u32, u32)>,
}

/// The IPv6 policy entries in the maps (none from a datapath loaded by a build without them).
pub fn read_policy6(paths: &InstancePaths) -> Result<Policy6, MapsError> {
    if !paths.map_pin(MAP_SG_PEERS6).exists() {
        return Ok(Policy6::default());
    }
    let p: HashMap<MapData, PeerKey6, PeerRules> = open_as(paths, MAP_SG_PEERS6)?;
    let mut peers = p
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(access(MAP_SG_PEERS6))?;
    let l: HashMap<MapData, u32, u32> = open_as(paths, MAP_SG_LEVELS6)?;
    let mut levels = l
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(access(MAP_SG_LEVELS6))?;
    peers.sort_unstable_by_key(|(k, _)| (k.scope, k.len, k.addr));
    levels.sort_unstable();
    Ok(Policy6 { peers, levels })
}

/// Removes both entries of every flow `cut` says to, in `T`'s two connection tables (none when
/// they are not pinned). Returns the number of flows removed.
pub fn remove_flows<T: Tracked>(
    paths: &InstancePaths,
    mut cut: impl FnMut(&T::Key, &T) -> bool,
) -> Result<usize, MapsError> {
    let mut removed = 0;
    if !ct_pinned::<T>(paths) {
        return Ok(removed);
    }
    // Read and deleted in chunks: one entry at a time was four system calls per entry, seconds
    // for an apply on a host with a million flows.
    for map in T::TABLES {
        let (data, entries) = ct_table::<T>(paths, map)?;
        let mut doomed = Vec::new();
        for (k, e) in entries.iter().filter(|(_, e)| e.dir() == ct::DIR_ORIGINAL) {
            if cut(k, e) {
                doomed.push(*e.peer());
                doomed.push(*k);
                removed += 1;
            }
        }
        // Gone already (the datapath or GC got there first) is as good as removed.
        batch::delete(data.fd().as_fd(), &doomed)
            .map_err(|source| MapsError::Batch { map, source })?;
    }
    Ok(removed)
}

/// Removes both entries of every flow with one of the addresses `gone` on either side, before
/// or after translation, from `T`'s connection tables. Returns the number of flows removed.
pub fn remove_flows_of<T: Tracked, S: std::hash::BuildHasher>(
    paths: &InstancePaths,
    gone: &HashSet<T::Addr, S>,
) -> Result<usize, MapsError> {
    if gone.is_empty() {
        return Ok(0);
    }
    remove_flows(paths, |k, e: &T| {
        T::addresses(k)
            .into_iter()
            .chain(T::addresses(e.peer()))
            .any(|a| gone.contains(&a))
    })
}

/// The open capture window and the event rate limit.
pub fn read_flow_state(paths: &InstancePaths) -> Result<FlowState, MapsError> {
    let a: Array<MapData, FlowState> = open_as(paths, MAP_FLOW_STATE)?;
    a.get(&0, 0).map_err(access(MAP_FLOW_STATE))
}

pub fn write_flow_state(paths: &InstancePaths, st: &FlowState) -> Result<(), MapsError> {
    let mut a: Array<MapData, FlowState> = open_as(paths, MAP_FLOW_STATE)?;
    a.set(0, st, 0).map_err(access(MAP_FLOW_STATE))
}

/// Flows of a flow table with their per-CPU counters (CPUs that never saw a flow are zero).
pub type PerCpuFlows<K, V> = Vec<(K, Vec<V>)>;
/// IPv4 flows (`FLOWS`).
pub type Flows = PerCpuFlows<FlowKey, FlowStats>;
/// IPv6 flows (`FLOWS6`).
pub type Flows6 = PerCpuFlows<FlowKey6, FlowStats6>;

/// Every flow of the flow table with its per-CPU counters.
pub fn read_flows(paths: &InstancePaths) -> Result<Flows, MapsError> {
    flow_table(paths, MAP_FLOWS).map(|(_, flows)| flows)
}

/// Every flow of the IPv6 flow table with its per-CPU counters; none while the datapath has no
/// such table (it is not pinned).
pub fn read_flows6(paths: &InstancePaths) -> Result<Flows6, MapsError> {
    if !paths.map_pin(MAP_FLOWS6).exists() {
        return Ok(Vec::new());
    }
    flow_table(paths, MAP_FLOWS6).map(|(_, flows)| flows)
}

/// The pinned flow table `map` (`FLOWS` or `FLOWS6`) and every flow in it, read in chunks
/// (`batch`).
fn flow_table<K: Pod, V: Pod>(
    paths: &InstancePaths,
    map: &'static str,
) -> Result<(MapData, PerCpuFlows<K, V>), MapsError> {
    let data = pinned_for_batch::<K, V>(paths, map)?;
    let batch_err = |source| MapsError::Batch { map, source };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| batch_err(e))?.get() as usize;
    let flows = batch::lookup_all_per_cpu(data.fd().as_fd(), cpus).map_err(batch_err)?;
    Ok((data, flows))
}

/// Packets that found the flow table full, by window and interface, summed over CPUs.
pub fn read_flow_lost(paths: &InstancePaths) -> Result<Vec<(LostKey, Counters)>, MapsError> {
    let m: PerCpuHashMap<MapData, LostKey, Counters> = open_as(paths, MAP_FLOW_LOST)?;
    let mut out = Vec::new();
    for entry in &m {
        let (k, v) = entry.map_err(access(MAP_FLOW_LOST))?;
        out.push((k, sum(&v)));
    }
    Ok(out)
}

/// Removes every flow (of both families) and loss counter of window `epoch`, after its records
/// were written. Returns the number of flows removed.
pub fn remove_window(paths: &InstancePaths, epoch: u32) -> Result<usize, MapsError> {
    let mut removed = remove_window_of::<FlowKey, FlowStats>(paths, MAP_FLOWS, epoch, |k| k.epoch)?;
    if paths.map_pin(MAP_FLOWS6).exists() {
        removed += remove_window_of::<FlowKey6, FlowStats6>(paths, MAP_FLOWS6, epoch, |k| k.epoch)?;
    }
    let mut lost: PerCpuHashMap<MapData, LostKey, Counters> = open_as(paths, MAP_FLOW_LOST)?;
    let lost_keys: Vec<LostKey> = lost.keys().flatten().filter(|k| k.epoch == epoch).collect();
    for k in &lost_keys {
        let _ = lost.remove(k);
    }
    Ok(removed)
}

/// Removes the flows of window `epoch` (read by `epoch_of`) from flow table `map`.
fn remove_window_of<K: Pod, V: Pod>(
    paths: &InstancePaths,
    map: &'static str,
    epoch: u32,
    epoch_of: impl Fn(&K) -> u32,
) -> Result<usize, MapsError> {
    let (data, flows): (_, PerCpuFlows<K, V>) = flow_table(paths, map)?;
    let keys: Vec<K> = flows
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| epoch_of(k) == epoch)
        .collect();
    // Gone already (a second recovery pass) is as good as removed: `batch::delete` skips it.
    batch::delete(data.fd().as_fd(), &keys).map_err(|source| MapsError::Batch { map, source })?;
    Ok(keys.len())
}

/// Entries in the flow table now, and its capacity (`up --flow-table-size`). There is one table
/// per family, sized alike, and a packet is lost when its own family's table is full: the
/// entries are those of the fuller table, so the fill says how close either is to losing.
pub fn flow_table_fill(paths: &InstancePaths) -> Result<(u64, u64), MapsError> {
    let mut entries = flow_table::<FlowKey, FlowStats>(paths, MAP_FLOWS)?.1.len() as u64;
    if paths.map_pin(MAP_FLOWS6).exists() {
        let six = flow_table::<FlowKey6, FlowStats6>(paths, MAP_FLOWS6)?
            .1
            .len() as u64;
        entries = entries.max(six);
    }
    Ok((entries, u64::from(capacity(paths, MAP_FLOWS)?)))
}

/// Monitor events the datapath suppressed (rate limit or full ring), summed over CPUs.
pub fn events_suppressed(paths: &InstancePaths) -> Result<u64, MapsError> {
    let a: PerCpuArray<MapData, EventBudget> = open_as(paths, MAP_EVENT_BUDGET)?;
    let v = a.get(&0, 0).map_err(access(MAP_EVENT_BUDGET))?;
    Ok(v.iter().map(|b| b.suppressed_total).sum())
}

/// The ring buffer of monitor events, for the agent to read.
pub fn open_events(paths: &InstancePaths) -> Result<RingBuf<MapData>, MapsError> {
    open_as(paths, MAP_EVENTS)
}

#[cfg(test)]
mod tests {
    use std::{fs, net::Ipv6Addr};

    use super::*;

    /// An instance of the test's own on bpffs (needs root, as every ecsnet test does), removed
    /// with everything pinned under it when dropped.
    struct Scratch(InstancePaths);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(self.0.pin_dir());
        }
    }

    #[test]
    fn ipv6_flows_are_none_until_pinned_then_read_per_cpu() {
        let scratch = Scratch(InstancePaths::new(&format!(
            "unit-flows6-{}",
            std::process::id()
        )));
        let paths = &scratch.0;
        assert!(
            read_flows6(paths).unwrap().is_empty(),
            "no FLOWS6 pinned (a datapath without IPv6 flows): none, and no error"
        );

        let cpus = aya::util::nr_cpus().unwrap().get() as usize;
        let mut m = PerCpuHashMap::<MapData, FlowKey6, FlowStats6>::create(8, 0).unwrap();
        let key = |last: u8| FlowKey6 {
            epoch: 3,
            ifindex: 7,
            saddr: "fd00:dc::2".parse::<Ipv6Addr>().unwrap().octets(),
            daddr: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last.into()).octets(),
            sport: 41000u16.to_be(),
            dport: 443u16.to_be(),
            proto: 6,
            ..FlowKey6::default()
        };
        for last in 1..=3u8 {
            let per_cpu: Vec<FlowStats6> = (0..cpus)
                .map(|cpu| FlowStats6 {
                    packets: u64::from(last) * 10 + cpu as u64,
                    pkt_saddr: [last; 16],
                    tcp_flags: last,
                    ..FlowStats6::default()
                })
                .collect();
            m.insert(&key(last), PerCpuValues::try_from(per_cpu).unwrap(), 0)
                .unwrap();
        }
        fs::create_dir_all(paths.map_pin(MAP_FLOWS6).parent().unwrap()).unwrap();
        m.pin(paths.map_pin(MAP_FLOWS6)).unwrap();

        let mut flows = read_flows6(paths).unwrap();
        flows.sort_by_key(|(k, _)| k.daddr);
        assert_eq!(flows.len(), 3);
        for ((k, per_cpu), last) in flows.iter().zip(1..=3u8) {
            assert_eq!(*k, key(last));
            assert_eq!(per_cpu.len(), cpus);
            for (cpu, v) in per_cpu.iter().enumerate() {
                assert_eq!(
                    (v.packets, v.pkt_saddr, v.tcp_flags),
                    (u64::from(last) * 10 + cpu as u64, [last; 16], last),
                    "flow {last} on CPU {cpu}"
                );
            }
        }
    }
}
