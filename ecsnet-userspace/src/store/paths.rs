//! Where an instance keeps its files under /run: the socket, pid, log, meta and applied state.
//! Every run file ecsnet creates is named here and nowhere else; its pins are in `kernel::pins`.

use std::path::PathBuf;

pub use crate::kernel::pins::InstancePaths;

/// Root of sockets, pid files, logs and lab directories.
pub const RUN_DIR: &str = "/run/ecsnet";

/// The run files of an instance; its pins are `kernel::pins`'s half of this type.
impl InstancePaths {
    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(format!("{}.sock", self.name))
    }
    /// Per-instance files other than the socket: pid, log, meta, applied state.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(format!("{}.d", self.name))
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("agent.pid")
    }
    pub fn log_file(&self) -> PathBuf {
        self.run_dir().join("agent.log")
    }
    /// What `up` found and chose: netns, uplink, bridge (see `store::files::Meta`).
    pub fn meta_file(&self) -> PathBuf {
        self.run_dir().join("meta.json")
    }
    /// Flow-log records as JSON lines with every field, what `flows tail` reads (rotated to
    /// `.1`).
    pub fn flow_journal(&self) -> PathBuf {
        self.run_dir().join("flows.jsonl")
    }
    /// Where the export of the last capture window stands (see `flowlog`).
    pub fn flow_checkpoint(&self) -> PathBuf {
        self.run_dir().join("flows.checkpoint.json")
    }
    /// The agent's own counters (`stats::AgentStats`), rewritten every second when they move.
    pub fn agent_counters(&self) -> PathBuf {
        self.run_dir().join("agent.counters.json")
    }
    /// Locked (flock) by every command that changes the live state: `apply`, `sg apply`,
    /// `task add|rm`, and `up` while it loads and applies.
    pub fn apply_lock(&self) -> PathBuf {
        self.run_dir().join("apply.lock")
    }
    /// The state as last applied, with interfaces and dynamic ports resolved.
    pub fn applied_state(&self) -> PathBuf {
        self.run_dir().join("applied.json")
    }
}

/// Directory of a lab: `/run/ecsnet/<lab>`.
pub fn lab_dir(lab: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(lab)
}

/// Checks an instance or lab name: it becomes part of paths and namespace names.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad {kind} name {name:?}: use 1 to 32 of a-z, 0-9, '-' and '_', not starting with '-'"
        ))
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
    }

    #[test]
    fn layout() {
        let p = InstancePaths::new("x");
        assert_eq!(p.socket(), PathBuf::from("/run/ecsnet/x.sock"));
        assert_eq!(
            lab_dir("lab").join("state.json"),
            PathBuf::from("/run/ecsnet/lab/state.json")
        );
    }
}
