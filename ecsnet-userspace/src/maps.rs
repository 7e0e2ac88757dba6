//! Reading and writing the pinned maps of an instance. Writers take entries computed by
//! `compile`; readers sum per-CPU values into plain numbers for `stats` and the agent.

use std::{collections::HashMap as StdHashMap, path::PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap, PerCpuValues};
use ecsnet_common::maps::{
    CLASS_IPV4, CLASS_OTHER, Counters, DropKey, HOOK_TC_EGRESS, HOOK_TC_INGRESS, HOOK_XDP,
    IfaceInfo, MAP_DROPS, MAP_IFACES, MAP_STATS, MAP_TASKS, StatsKey, TaskInfo,
};

use crate::paths::InstancePaths;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {map} ({path}): {source}")]
    Open {
        map: &'static str,
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("map {map}: {source}")]
    Access {
        map: &'static str,
        source: aya::maps::MapError,
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

fn access(map: &'static str) -> impl Fn(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Access { map, source }
}

/// Makes `TASKS` and the task rows of `IFACES` equal to the given entries; the uplink rows of
/// `IFACES` are kept.
pub fn write_tasks(
    paths: &InstancePaths,
    tasks: &[(u32, TaskInfo)],
    ifaces: &[(u32, IfaceInfo)],
) -> Result<(), MapsError> {
    let mut t: HashMap<MapData, u32, TaskInfo> = open(paths, MAP_TASKS)?
        .try_into()
        .map_err(access(MAP_TASKS))?;
    for (k, v) in tasks {
        t.insert(k, v, 0).map_err(access(MAP_TASKS))?;
    }
    let stale: Vec<u32> = t
        .keys()
        .flatten()
        .filter(|k| !tasks.iter().any(|(n, _)| n == k))
        .collect();
    for k in stale {
        t.remove(&k).map_err(access(MAP_TASKS))?;
    }

    let mut i: HashMap<MapData, u32, IfaceInfo> = open(paths, MAP_IFACES)?
        .try_into()
        .map_err(access(MAP_IFACES))?;
    for (k, v) in ifaces {
        i.insert(k, v, 0).map_err(access(MAP_IFACES))?;
    }
    let stale: Vec<u32> = i
        .iter()
        .flatten()
        .filter(|(k, v)| {
            v.role == ecsnet_common::maps::ROLE_TASK && !ifaces.iter().any(|(n, _)| n == k)
        })
        .map(|(k, _)| k)
        .collect();
    for k in stale {
        i.remove(&k).map_err(access(MAP_IFACES))?;
    }
    Ok(())
}

/// Records an interface (the uplink) in `IFACES`.
pub fn write_iface(paths: &InstancePaths, ifindex: u32, info: IfaceInfo) -> Result<(), MapsError> {
    let mut i: HashMap<MapData, u32, IfaceInfo> = open(paths, MAP_IFACES)?
        .try_into()
        .map_err(access(MAP_IFACES))?;
    i.insert(&ifindex, &info, 0).map_err(access(MAP_IFACES))
}

/// `IFACES` as it is in the kernel.
pub fn read_ifaces(paths: &InstancePaths) -> Result<Vec<(u32, IfaceInfo)>, MapsError> {
    let i: HashMap<MapData, u32, IfaceInfo> = open(paths, MAP_IFACES)?
        .try_into()
        .map_err(access(MAP_IFACES))?;
    Ok(i.iter().flatten().collect())
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
    let m: PerCpuHashMap<MapData, StatsKey, Counters> = open(paths, MAP_STATS)?
        .try_into()
        .map_err(access(MAP_STATS))?;
    let mut out: StdHashMap<u32, IfaceCounts> = StdHashMap::new();
    for entry in m.iter() {
        let (k, v) = entry.map_err(access(MAP_STATS))?;
        let c = sum(&v);
        let e = out.entry(k.ifindex).or_default();
        match (k.hook, k.class) {
            (HOOK_TC_INGRESS, CLASS_IPV4) => e.tc_ingress.add(&c),
            (HOOK_TC_EGRESS, CLASS_IPV4) => e.tc_egress.add(&c),
            (HOOK_XDP, CLASS_IPV4) => e.xdp.add(&c),
            (HOOK_TC_INGRESS | HOOK_XDP, CLASS_OTHER) => e.other_ingress.add(&c),
            (HOOK_TC_EGRESS, CLASS_OTHER) => e.other_egress.add(&c),
            _ => {}
        }
    }
    Ok(out)
}

/// Drops by (ifindex, reason number), summed over CPUs and hooks.
pub fn read_drops(paths: &InstancePaths) -> Result<StdHashMap<(u32, u8), u64>, MapsError> {
    let m: PerCpuHashMap<MapData, DropKey, u64> = open(paths, MAP_DROPS)?
        .try_into()
        .map_err(access(MAP_DROPS))?;
    let mut out = StdHashMap::new();
    for entry in m.iter() {
        let (k, v) = entry.map_err(access(MAP_DROPS))?;
        *out.entry((k.ifindex, k.reason)).or_default() += v.iter().sum::<u64>();
    }
    Ok(out)
}

/// Removes the counters of interfaces that are no longer attached.
pub fn forget_iface(paths: &InstancePaths, ifindex: u32) -> Result<(), MapsError> {
    let mut m: PerCpuHashMap<MapData, StatsKey, Counters> = open(paths, MAP_STATS)?
        .try_into()
        .map_err(access(MAP_STATS))?;
    let keys: Vec<StatsKey> = m
        .keys()
        .flatten()
        .filter(|k| k.ifindex == ifindex)
        .collect();
    for k in keys {
        m.remove(&k).map_err(access(MAP_STATS))?;
    }
    Ok(())
}
