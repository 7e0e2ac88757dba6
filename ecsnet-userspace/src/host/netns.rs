//! Entering a named network namespace with setns (not `ip netns exec`, which remounts /sys and
//! hides bpffs). Must run while the process has one thread: setns only moves the calling thread.

use std::{fs::File, path::PathBuf};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` puts named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "network namespace {name:?} not found ({path}): create it with `ip netns add {name}` or check the name"
    )]
    NotFound { name: String, path: PathBuf },
    #[error("cannot enter network namespace {name:?}: {source}")]
    Enter { name: String, source: nix::Error },
}

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Moves the calling thread into the named namespace.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = path(name);
    if name.is_empty() || name.contains('/') {
        return Err(NetnsError::NotFound {
            name: name.to_owned(),
            path,
        });
    }
    let file = File::open(&path).map_err(|_| NetnsError::NotFound {
        name: name.to_owned(),
        path: path.clone(),
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        name: name.to_owned(),
        source,
    })
}
