//! The tasks of a host that follows a container engine (`up --docker`): the state file's and the
//! engine's, merged into the one state an apply plans. The state file's entry for a container
//! wins over the container's labels; a label that names a security group nobody defined closes
//! the task (no traffic either way), never opens it. Pure.

use std::collections::BTreeSet;

use crate::state::{SecurityGroup, State, Task, TaskSource};

/// The group every task gets whose `ecsnet.security-groups` label names a group that is not
/// defined: no rule in either direction, so nothing passes. It lives only in the merged state
/// (`sg ls` shows it while a task needs it); no state file can define it.
pub const CLOSED_GROUP: &str = "ecsnet:unknown-groups";

/// The merged state, and what the merge had to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub state: State,
    pub notes: Vec<MergeNote>,
}

/// A decision of the merge that the agent logs once and `task ls` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeNote {
    /// A container whose task the state file gives: the state file's entry `by` wins.
    Shadowed {
        container_id: String,
        task: String,
        by: String,
        why: String,
    },
    /// A container whose label names groups nobody defined: it gets no traffic until they are.
    Closed { task: String, unknown: Vec<String> },
}

impl std::fmt::Display for MergeNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shadowed {
                container_id,
                task,
                by,
                why,
            } => write!(
                f,
                "container {} ({task}) is not a task of its own: the state file's task {by:?} {why}, and wins over its labels",
                short_id(container_id)
            ),
            Self::Closed { task, unknown } => write!(
                f,
                "task {task}: its label ecsnet.security-groups names {} nobody defined ({}); it gets no traffic either way until `sg apply` defines {}",
                if unknown.len() == 1 {
                    "a group"
                } else {
                    "groups"
                },
                unknown.join(", "),
                if unknown.len() == 1 { "it" } else { "them" },
            ),
        }
    }
}

/// A container id as Docker prints it: the first 12 characters.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The part of an applied state that was given (state file, `task add`, `sg apply`), without
/// what the engine contributed: what a change of the given state starts from.
pub fn configured(mut applied: State) -> State {
    applied.tasks.retain(|t| t.source == TaskSource::State);
    applied
        .security_groups
        .retain(|g| g.group_id != CLOSED_GROUP);
    applied
}

/// Why the state file's task `c` stands for the container of `d`, if it does.
fn stands_for(c: &Task, d: &Task) -> Option<String> {
    let same_container = match (&c.container_id, &d.container_id) {
        (Some(a), Some(b)) if a.len() >= 12 && b.len() >= 12 => {
            a.starts_with(b.as_str()) || b.starts_with(a.as_str())
        }
        _ => false,
    };
    if same_container {
        return Some("names this container".to_owned());
    }
    if c.ipv4_address == d.ipv4_address {
        return Some(format!("has its address {}", c.ipv4_address));
    }
    if c.name == d.name {
        return Some("has its name".to_owned());
    }
    let port = c.port_mappings.iter().find(|cp| {
        d.port_mappings.iter().any(|dp| {
            dp.host_port == cp.host_port
                && dp.protocol == cp.protocol
                && (dp.host_ip.has_ipv4() && cp.host_ip.has_ipv4()
                    || dp.host_ip.has_ipv6() && cp.host_ip.has_ipv6())
        })
    })?;
    Some(format!(
        "publishes its host port {}/{}",
        port.host_port,
        port.protocol.as_str()
    ))
}

/// `configured` with the engine's tasks added: each one the state file does not already give,
/// with its label's groups when all are defined and `CLOSED_GROUP` when any is not.
pub fn merge(configured: State, discovered: &[Task]) -> Merged {
    let mut state = configured;
    let defined: BTreeSet<&str> = state
        .security_groups
        .iter()
        .map(|g| g.group_id.as_str())
        .filter(|id| *id != CLOSED_GROUP)
        .collect();
    let given = state.tasks.len();
    let mut notes = Vec::new();
    let mut added = Vec::new();
    for d in discovered {
        if let Some((by, why)) = state.tasks[..given]
            .iter()
            .find_map(|c| stands_for(c, d).map(|why| (c.name.clone(), why)))
        {
            notes.push(MergeNote::Shadowed {
                container_id: d.container_id.clone().unwrap_or_default(),
                task: d.name.clone(),
                by,
                why,
            });
            continue;
        }
        let mut task = d.clone();
        task.source = TaskSource::Docker;
        let unknown: Vec<String> = task
            .security_groups
            .iter()
            .filter(|g| !defined.contains(g.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            notes.push(MergeNote::Closed {
                task: task.name.clone(),
                unknown,
            });
            task.security_groups = vec![CLOSED_GROUP.to_owned()];
        }
        added.push(task);
    }
    if added
        .iter()
        .any(|t| t.security_groups.iter().any(|g| g == CLOSED_GROUP))
    {
        state.security_groups.push(SecurityGroup {
            group_id: CLOSED_GROUP.to_owned(),
            group_name: Some("unknown groups named by a label: no traffic".to_owned()),
            ip_permissions: Vec::new(),
            ip_permissions_egress: Vec::new(),
        });
    }
    state.tasks.extend(added);
    Merged { state, notes }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::state::{PortFamily, PortMapping, Protocol};

    fn group(id: &str) -> SecurityGroup {
        SecurityGroup {
            group_id: id.to_owned(),
            group_name: None,
            ip_permissions: Vec::new(),
            ip_permissions_egress: Vec::new(),
        }
    }

    fn container(name: &str, last: u8, id: &str, groups: &[&str], port: u16) -> Task {
        Task {
            container_id: Some(id.repeat(64 / id.len())),
            source: TaskSource::Docker,
            security_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            port_mappings: vec![PortMapping {
                container_port: 80,
                host_port: port,
                protocol: Protocol::Tcp,
                host_ip: PortFamily::Both,
            }],
            ..Task::new(name, Ipv4Addr::new(172, 17, 0, last))
        }
    }

    fn configured_state() -> State {
        State {
            security_groups: vec![group("sg-web")],
            tasks: vec![Task {
                port_mappings: vec![PortMapping {
                    container_port: 80,
                    host_port: 8080,
                    protocol: Protocol::Tcp,
                    host_ip: PortFamily::Both,
                }],
                ..Task::new("pinned", Ipv4Addr::new(172, 17, 0, 2))
            }],
            ..State::default()
        }
    }

    #[test]
    fn engine_tasks_join_the_given_ones_with_their_groups() {
        let m = merge(
            configured_state(),
            &[container("web", 3, "ab", &["sg-web"], 32768)],
        );
        assert_eq!(m.notes, vec![]);
        let names: Vec<&str> = m.state.tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["pinned", "web"]);
        assert_eq!(m.state.tasks[1].security_groups, ["sg-web"]);
        assert_eq!(m.state.tasks[1].source, TaskSource::Docker);
        assert_eq!(m.state.security_groups.len(), 1, "no closed group needed");
    }

    #[test]
    fn an_unknown_group_closes_the_task_and_says_which() {
        let m = merge(
            configured_state(),
            &[container("web", 3, "ab", &["sg-web", "sg-nope"], 32768)],
        );
        assert_eq!(m.state.tasks[1].security_groups, [CLOSED_GROUP]);
        let closed = m
            .state
            .security_groups
            .iter()
            .find(|g| g.group_id == CLOSED_GROUP)
            .expect("the closed group is defined");
        assert!(closed.ip_permissions.is_empty() && closed.ip_permissions_egress.is_empty());
        assert_eq!(
            m.notes,
            vec![MergeNote::Closed {
                task: "web".into(),
                unknown: vec!["sg-nope".into()]
            }]
        );
        assert!(m.notes[0].to_string().contains("sg-nope"));
        // The closed group is not a group anyone can name into being.
        let again = merge(
            configured(m.state),
            &[container("web", 3, "ab", &[CLOSED_GROUP], 32768)],
        );
        assert_eq!(again.state.tasks[1].security_groups, [CLOSED_GROUP]);
        assert!(matches!(again.notes[0], MergeNote::Closed { .. }));
    }

    #[test]
    fn the_state_file_wins_by_container_address_name_or_host_port() {
        let id = "cd".repeat(32);
        let mut by_id = configured_state();
        by_id.tasks[0].container_id = Some(id[..12].to_owned());
        by_id.tasks[0].port_mappings.clear();
        let cases = [
            (
                by_id,
                container("web", 3, "cd", &[], 32768),
                "names this container",
            ),
            (
                configured_state(),
                container("web", 2, "ab", &[], 32768),
                "has its address 172.17.0.2",
            ),
            (
                configured_state(),
                container("pinned", 3, "ab", &[], 32768),
                "has its name",
            ),
            (
                configured_state(),
                container("web", 3, "ab", &[], 8080),
                "publishes its host port 8080/tcp",
            ),
        ];
        for (given, c, why) in cases {
            let m = merge(given, std::slice::from_ref(&c));
            assert_eq!(m.state.tasks.len(), 1, "{why}");
            assert_eq!(m.state.tasks[0].name, "pinned");
            let [MergeNote::Shadowed { why: got, by, .. }] = &m.notes[..] else {
                panic!("{why}: {:?}", m.notes);
            };
            assert_eq!((got.as_str(), by.as_str()), (why, "pinned"));
        }
    }

    #[test]
    fn a_host_port_shadows_only_in_a_family_both_publish_it() {
        let mut v4 = configured_state();
        v4.tasks[0].port_mappings[0].host_ip = PortFamily::Ipv4;
        let mut on_v6 = container("web", 3, "ab", &[], 8080);
        on_v6.port_mappings[0].host_ip = PortFamily::Ipv6;
        let m = merge(v4.clone(), std::slice::from_ref(&on_v6));
        assert_eq!(m.state.tasks.len(), 2, "{:?}", m.notes);
        let both = container("web", 3, "ab", &[], 8080);
        let m = merge(v4, std::slice::from_ref(&both));
        assert_eq!(m.state.tasks.len(), 1, "{:?}", m.notes);
    }

    #[test]
    fn configured_drops_what_the_engine_gave() {
        let m = merge(
            configured_state(),
            &[container("web", 3, "ab", &["sg-nope"], 32768)],
        );
        let c = configured(m.state);
        assert_eq!(c, configured_state());
    }
}
