//! The plan: a validated state on this host turned into every entry the datapath's maps must
//! hold, all computed before anything is written. Pure: no system calls; the host is a snapshot.

pub(crate) mod entries;
pub mod merge;
pub mod sg;
pub(crate) mod tasks;

use std::{collections::HashMap, net::Ipv4Addr};

use ecsnet_common::maps::{IfaceInfo, PortKey, PortTarget, PortTarget6, TaskInfo};

use crate::{
    plan::{sg::Compiled, tasks::ResolvedTask},
    state::{Protocol, State, rules::Rules},
};

/// A valid state that does not fit this host, located by its JSON path.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct PlanError {
    pub path: String,
    pub problem: PlanProblem,
}

impl PlanError {
    fn at(path: impl Into<String>, problem: PlanProblem) -> Self {
        Self {
            path: path.into(),
            problem,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanProblem {
    #[error("no interface {name:?} on this host")]
    NoInterface { name: String },
    #[error("interface {name:?} is not a port of the bridge")]
    NotABridgePort { name: String },
    #[error(
        "cannot find the interface of {addr}: no bridge neighbour entry for it; give \"interface\""
    )]
    NoNeighbour { addr: Ipv4Addr },
    #[error("interface {name:?} is also the interface of $.tasks[{other}]")]
    InterfaceTaken { name: String, other: usize },
    #[error("no free {} host port left in ephemeralPorts [{lo}, {hi}]", protocol.as_str())]
    PortsExhausted {
        protocol: Protocol,
        lo: u16,
        hi: u16,
    },
    #[error(transparent)]
    TooBig(#[from] sg::TooBig),
}

/// Everything an apply writes, computed before the first write.
#[derive(Debug)]
pub struct Plan {
    /// The state as it is recorded once written: dynamic ports chosen, interfaces named.
    pub state: State,
    /// The task interfaces the task programs go on.
    pub tasks: Vec<ResolvedTask>,
    /// `TASKS`: by address, network order.
    pub task_entries: Vec<(u32, TaskInfo)>,
    /// `TASKS6`: the interfaces of the tasks with an IPv6 address, by that address.
    pub task6_entries: Vec<([u8; 16], u32)>,
    /// The task rows of `IFACES`, by ifindex.
    pub iface_entries: Vec<(u32, IfaceInfo)>,
    /// `PORTS`.
    pub ports: Vec<(PortKey, PortTarget)>,
    /// `PORTS6`: the ports of `PORTS` whose task has an IPv6 address, to that address.
    pub ports6: Vec<(PortKey, PortTarget6)>,
    /// `CONFIG::flags`.
    pub config_flags: u8,
    /// `SG_PEERS` and `SG_RULES` in the generation the live maps do not use, and the means to
    /// check tracked flows against them.
    pub policy: Compiled,
}

impl Plan {
    /// The plan for `requested`, whose security groups validated into `rules`, on the tasks
    /// `resolved` (interfaces found, MACs asked for). Dynamic ports keep the ports `applied` gave
    /// them; the policy is numbered in `generation`.
    pub fn new(
        mut requested: State,
        rules: &Rules,
        resolved: Vec<ResolvedTask>,
        applied: Option<&State>,
        generation: u32,
    ) -> Result<Self, PlanError> {
        let previous = match applied {
            Some(applied) => tasks::dynamic_ports_of(applied, &requested),
            None => HashMap::new(),
        };
        tasks::assign_dynamic_ports(&mut requested, &previous)?;
        for (t, r) in requested.tasks.iter_mut().zip(&resolved) {
            t.interface = Some(r.ifname.clone());
        }
        let policy = Compiled::new(rules, generation)
            .map_err(|e| PlanError::at("$.securityGroups", e.into()))?;
        Ok(Self {
            ports: entries::port_entries(&requested),
            ports6: entries::port6_entries(&requested),
            config_flags: entries::config_flags(&requested.host),
            state: requested,
            task_entries: entries::task_entries(&resolved, &policy),
            task6_entries: entries::task6_entries(&resolved),
            iface_entries: entries::iface_entries(&resolved),
            tasks: resolved,
            policy,
        })
    }
}
