//! Where an instance keeps its files under /run: the socket, pid, log, meta and applied state.
//! Every run file ecsnet creates is named here and nowhere else; its pins are in `kernel::pins`.

use std::path::PathBuf;

pub use crate::kernel::pins::InstancePaths;

/// Root of sockets, pid files, logs and lab directories.
pub const RUN_DIR: &str = "/run/ecsnet";

/// Where an instance's socket and run directory are; its pins are `kernel::pins`'s half of this
/// type.
impl InstancePaths {
    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(format!("{}.sock", self.name))
    }
    /// Per-instance files other than the socket: pid, log, meta, applied state.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(format!("{}.d", self.name))
    }
}

/// The files of the run directory, one accessor each from a table of names.
macro_rules! run_files {
    ($($(#[$doc:meta])* $accessor:ident => $file:literal,)*) => {
        impl InstancePaths {
            $(
                $(#[$doc])*
                pub fn $accessor(&self) -> PathBuf {
                    self.run_dir().join($file)
                }
            )*
        }
    };
}

run_files! {
    pid_file => "agent.pid",
    log_file => "agent.log",
    /// What `up` found and chose: netns, uplink, bridge (see `store::files::Meta`).
    meta_file => "meta.json",
    /// Flow-log records as JSON lines with every field, what `flows tail` reads (rotated to
    /// `.1`).
    flow_journal => "flows.jsonl",
    /// Where the export of the last capture window stands (see `flowlog`).
    flow_checkpoint => "flows.checkpoint.json",
    /// The agent's own counters (`stats::AgentStats`), rewritten every second when they move.
    agent_counters => "agent.counters.json",
    /// Locked (flock) by every command that changes the live state: `apply`, `sg apply`,
    /// `task add|rm`, and `up` while it loads and applies.
    apply_lock => "apply.lock",
    /// The state as last applied, with interfaces and dynamic ports resolved: the state
    /// file's tasks and the engine's, merged (`plan::merge`).
    applied_state => "applied.json",
    /// What the agent last heard from the container engine (`up --docker`): its containers as
    /// tasks, and those that are not tasks with the reason (see `store::files::Discovered`).
    discovered => "discovered.json",
    /// Tasks whose interface went, kept a while so the last window's flow records still name
    /// them (see `store::directory`).
    departed => "departed.json",
    /// The engine follower's status (connected, events, re-lists), rewritten when it changes.
    engine_status => "engine.json",
}

/// Directory of a lab: `/run/ecsnet/<lab>`.
pub fn lab_dir(lab: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(lab)
}

/// A name that cannot be an instance's or a lab's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad {kind} name {name:?}: use 1 to 32 of a-z, 0-9, '-' and '_', not starting with '-'")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
}

/// Checks an instance or lab name: it becomes part of paths and namespace names.
pub fn check_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("instance", "default").is_ok());
        assert!(check_name("instance", "t-1_x").is_ok());
        assert!(check_name("instance", "").is_err());
        assert!(check_name("instance", "../etc").is_err());
        assert!(check_name("instance", "A").is_err());
        assert!(check_name("instance", "-x").is_err());
        assert!(check_name("instance", &"a".repeat(33)).is_err());
        assert_eq!(
            check_name("lab", "A").unwrap_err().to_string(),
            "bad lab name \"A\": use 1 to 32 of a-z, 0-9, '-' and '_', not starting with '-'"
        );
    }

    #[test]
    fn layout() {
        let p = InstancePaths::new("x");
        assert_eq!(p.socket(), PathBuf::from("/run/ecsnet/x.sock"));
        assert_eq!(
            p.applied_state(),
            PathBuf::from("/run/ecsnet/x.d/applied.json")
        );
        assert_eq!(
            lab_dir("lab").join("state.json"),
            PathBuf::from("/run/ecsnet/lab/state.json")
        );
    }
}
