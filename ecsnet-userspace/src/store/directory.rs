//! The one ifindex -> task join: the task interfaces the datapath knows (`IFACES`) matched, by
//! address, with the tasks of the applied state. Flow logs, `monitor` and `stats` name what they
//! count through it; with no state applied it knows no task.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use ecsnet_common::maps::{IfaceInfo, ROLE_TASK};

use crate::{
    kernel::maps::{self, MapsError},
    state::{State, Task},
    store::{
        files::{self, StoreError},
        paths::InstancePaths,
    },
};

/// Why an instance's run files or pinned maps could not be read: it is not up, or a file or map
/// is unreadable (the directory's join, and `stats`).
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Maps(#[from] MapsError),
}

impl DirectoryError {
    /// 2 for an instance that is not up (bad usage), 1 for anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Store(e) => e.exit_code(),
            Self::Maps(_) => 1,
        }
    }
}

/// The applied state with each task's interface.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    /// The applied state: the host's facts and every task, placed or not.
    pub state: State,
    /// Task interface -> its task's index in `state.tasks`.
    by_ifindex: BTreeMap<u32, usize>,
    /// Interfaces gone with their tasks a short while ago (`files::Departed`): what the flow
    /// records of their last window are named after.
    departed: BTreeMap<u32, Task>,
}

impl Directory {
    /// Joins `state` with the `IFACES` entries `ifaces`: a task interface belongs to the first
    /// task with its address.
    pub fn join(state: State, ifaces: &[(u32, IfaceInfo)]) -> Self {
        let mut first_with: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (i, t) in state.tasks.iter().enumerate() {
            first_with.entry(t.ipv4_address).or_insert(i);
        }
        let by_ifindex = ifaces
            .iter()
            .filter(|(_, info)| info.role == ROLE_TASK)
            .filter_map(|(ifindex, info)| {
                let ip = Ipv4Addr::from(u32::from_be(info.ipv4));
                Some((*ifindex, *first_with.get(&ip)?))
            })
            .collect();
        Self {
            state,
            by_ifindex,
            departed: BTreeMap::new(),
        }
    }

    /// The instance's applied state joined with its pinned `IFACES`.
    pub fn load(paths: &InstancePaths) -> Result<Self, DirectoryError> {
        let state = files::read_applied(paths)?.unwrap_or_default();
        let mut dir = Self::join(state, &maps::read_ifaces(paths)?);
        dir.departed = files::read_departed(paths)?
            .into_iter()
            .map(|d| (d.ifindex, d.task))
            .collect();
        Ok(dir)
    }

    /// The task on interface `ifindex`, or the one that was on it until it went.
    pub fn task(&self, ifindex: u32) -> Option<&Task> {
        self.by_ifindex
            .get(&ifindex)
            .map(|i| &self.state.tasks[*i])
            .or_else(|| self.departed.get(&ifindex))
    }

    /// Every task interface with its task, by ifindex.
    pub fn interfaces(&self) -> impl Iterator<Item = (u32, &Task)> {
        self.by_ifindex
            .iter()
            .map(|(ifindex, i)| (*ifindex, &self.state.tasks[*i]))
    }

    /// Every task that has an interface, in the state's order, with its (lowest) ifindex.
    pub fn placed_tasks(&self) -> impl Iterator<Item = (&Task, u32)> {
        // The lowest first: `by_ifindex` is in ifindex order.
        let mut lowest: HashMap<usize, u32> = HashMap::new();
        for (ifindex, task) in &self.by_ifindex {
            lowest.entry(*task).or_insert(*ifindex);
        }
        self.state
            .tasks
            .iter()
            .enumerate()
            .filter_map(move |(i, t)| Some((t, *lowest.get(&i)?)))
    }
}

/// Tasks and `IFACES` entries for the tests of the directory's users.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A task of nothing but its name, address and interface.
    pub fn task(name: &str, ip: [u8; 4], interface: Option<&str>) -> Task {
        Task {
            interface: interface.map(str::to_owned),
            ..Task::new(name, Ipv4Addr::from(ip))
        }
    }

    pub fn iface(ip: [u8; 4], role: u8) -> IfaceInfo {
        IfaceInfo::new(u32::from(Ipv4Addr::from(ip)).to_be(), role)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{iface, task};
    use super::*;

    #[test]
    fn task_interfaces_join_tasks_by_address() {
        let state = State {
            tasks: vec![
                task("web", [172, 17, 0, 2], None),
                task("db", [172, 17, 0, 3], None),
                task("gone", [172, 17, 0, 4], None),
            ],
            ..State::default()
        };
        let ifaces = [
            (9, iface([172, 17, 0, 2], ROLE_TASK)),
            (7, iface([172, 17, 0, 3], ROLE_TASK)),
            (2, iface([172, 17, 0, 3], ecsnet_common::maps::ROLE_UPLINK)),
            (11, iface([172, 17, 0, 99], ROLE_TASK)),
        ];
        let dir = Directory::join(state, &ifaces);
        assert_eq!(dir.task(9).map(|t| t.name.as_str()), Some("web"));
        assert_eq!(dir.task(2), None, "the uplink is no task's");
        assert_eq!(dir.task(11), None, "an address no task has");
        let by_ifindex: Vec<(u32, &str)> = dir
            .interfaces()
            .map(|(i, t)| (i, t.name.as_str()))
            .collect();
        assert_eq!(by_ifindex, [(7, "db"), (9, "web")]);
        let placed: Vec<(&str, u32)> = dir
            .placed_tasks()
            .map(|(t, i)| (t.name.as_str(), i))
            .collect();
        assert_eq!(
            placed,
            [("web", 9), ("db", 7)],
            "state order; `gone` has none"
        );
    }
}
