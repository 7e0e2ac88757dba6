//! The container engine as the source of tasks (`up --docker`): follows the Docker Engine API
//! (list and inspect, then the event stream) and keeps a full view of every container, each
//! either a task (`state::Task` built from the engine: `identity`, `labels`) or a container that
//! is not one, with the reason. Without `--docker` nothing here runs.
//!
//! How the agent uses it: [`spawn`] starts the follower on a thread of its own (with a
//! current-thread tokio runtime, since the agent's threads do blocking work) and calls
//! `on_change(&Discovered)` on that thread after every change of the view, so the agent can
//! apply a new task's policy without waiting for its own loop; [`Engine::status`] reads the
//! connection's [`EngineStatus`] for `stats`, metrics and the log. The view is kept while the
//! engine is unreachable (ecsnet goes on enforcing what it knows); after a reconnect a full
//! re-list replaces it, so containers that went away meanwhile leave it.

mod client;
mod follow;
pub mod identity;
pub mod labels;

use std::{collections::BTreeMap, fmt, time::SystemTime};

use serde::Serialize;

use crate::state::Task;

pub use client::{DEFAULT_URL, UrlError, parse_url};
pub use follow::{Engine, SpawnError, spawn};
pub use labels::LabelError;

/// Every container the engine has, by full id, as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Discovered {
    pub containers: BTreeMap<String, Seen>,
    /// Counts the changes of the view: 1 after the first list.
    pub generation: u64,
    /// The event behind the last change; None after a (re-)list.
    pub cause: Option<Cause>,
}

/// An engine event that changed the view: with `at`, the agent can time how long a new task
/// waited for its policy (the target: p99 <= 50 ms from the start event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cause {
    pub container: String,
    /// `start`, `die`, `stop`, `destroy`, `rename`, `connect` or `disconnect`.
    pub action: String,
    /// When the engine emitted the event (its `timeNano`).
    pub at: SystemTime,
}

impl Discovered {
    /// The tasks of the view, in container-id order.
    pub fn tasks(&self) -> impl Iterator<Item = &Found> {
        self.containers.values().filter_map(|s| match s {
            Seen::Task(found) => Some(found.as_ref()),
            Seen::Skipped { .. } => None,
        })
    }
}

/// One container: a task, or why it is not one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Seen {
    /// Boxed: a task is much larger than a reason.
    Task(Box<Found>),
    Skipped {
        /// The container's name, without Docker's leading '/'.
        name: String,
        why: Skip,
    },
}

/// A container that is a task on our bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Found {
    /// `source` Docker; address, MAC, veth, ports, labels, image and identity from the engine.
    pub task: Task,
    /// The container's name (no leading '/'); the task's name differs for an ECS container.
    pub container_name: String,
    /// ifindex of the task's veth (its host end) in the agent's network namespace.
    pub ifindex: u32,
    /// The prefix length of the task's address on the bridge network.
    pub prefix: u8,
    /// The `com.amazonaws.ecs.cluster` label (a task has no field for it).
    pub cluster: Option<String>,
    /// Whether the container carries `ecsnet.security-groups`: without it the task follows
    /// `host.defaultPolicy`.
    pub has_group_label: bool,
    /// A bad `ecsnet.security-groups` label: the task must pass nothing, either way, until the
    /// label is fixed (a container is relabelled only by starting a new one).
    pub fail_closed: Option<LabelError>,
    /// What Docker did that ecsnet leaves to Docker, one line each (a port published on one
    /// host address only, an SCTP port, a task ARN that is not an ECS one).
    pub notes: Vec<String>,
}

/// Why a container is not a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "camelCase", tag = "reason")]
pub enum Skip {
    #[error("not running ({status})")]
    NotRunning { status: String },
    #[error("host network: it has no interface of its own")]
    HostNetwork,
    #[error("network none: it has no interface on the bridge")]
    NoNetwork,
    #[error("shares the network namespace of container {container}")]
    SharedNetwork { container: String },
    #[error("not on bridge {bridge}: only on {}", list(networks))]
    OtherNetworks {
        bridge: String,
        /// `NAME (DEVICE)` of each network it is on.
        networks: Vec<String>,
    },
    #[error("on bridge {bridge} but without an IPv4 address yet")]
    NoAddress { bridge: String },
    #[error("its veth on bridge {bridge} was not found: {why}")]
    NoVeth { bridge: String, why: String },
}

fn list(items: &[String]) -> String {
    items.join(", ")
}

/// The connection to the engine, for `stats`, metrics and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    /// The engine's socket path.
    pub socket: String,
    pub connected: bool,
    /// When `connected` last changed (or the follower started).
    pub since: SystemTime,
    /// The error of the last failed connection or stream, kept after a reconnect.
    pub last_error: Option<String>,
    /// The engine API version in use (negotiated down to the engine's).
    pub api_version: Option<String>,
    /// Container and network events received.
    pub events: u64,
    /// Full list-and-inspect passes: one per connection.
    pub relists: u64,
    /// Connections after the first.
    pub reconnects: u64,
}

impl fmt::Display for EngineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.connected {
            "connected"
        } else {
            "disconnected"
        };
        write!(
            f,
            "docker engine {}: {state}, {} events, {} relists, {} reconnects",
            self.socket, self.events, self.relists, self.reconnects
        )?;
        match &self.last_error {
            Some(e) => write!(f, ", last error: {e}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_serializes_with_kinds_and_reasons() {
        let mut view = Discovered::default();
        view.containers.insert(
            "a".into(),
            Seen::Skipped {
                name: "web".into(),
                why: Skip::HostNetwork,
            },
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json["containers"]["a"],
            serde_json::json!({"kind": "skipped", "name": "web", "why": {"reason": "hostNetwork"}})
        );
        let status = EngineStatus {
            socket: "/run/d.sock".into(),
            connected: false,
            since: SystemTime::UNIX_EPOCH,
            last_error: Some("the event stream ended".into()),
            api_version: None,
            events: 3,
            relists: 2,
            reconnects: 1,
        };
        assert_eq!(
            status.to_string(),
            "docker engine /run/d.sock: disconnected, 3 events, 2 relists, 1 reconnects, \
             last error: the event stream ended"
        );
    }
}
