//! Flow-log export (SPEC §7): the agent closes the capture window in `FLOW_STATE`, turns that
//! window's flows into records (one per task interface, 5-tuple, direction and action, plus
//! NODATA and SKIPDATA), appends them to the journal and the file sink, and only then deletes
//! them from the kernel. A checkpoint written before each step makes every count land exactly
//! once, whenever the agent is killed. With flow logs off the datapath counts nothing and no
//! window is ever closed.

pub(crate) mod export;
pub(crate) mod filter;
pub(crate) mod format;
mod journal;
pub mod records;
pub(crate) mod tail;

/// ecsnet-lab's progcost reads the datapath clock here; its home is `crate::clock`.
use crate::clock::monotonic_ns;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    flowlog::format::Format,
    kernel::maps::{self, MapsError},
    store::{directory::DirectoryError, files::FlowLogOptions, paths::InstancePaths},
};

#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt flow-log checkpoint ({source}); remove it to start over")]
    Checkpoint {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("--flow-format: {0}")]
    Format(#[from] format::FormatError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FlowLogError + '_ {
    move |source| FlowLogError::Io {
        path: path.to_owned(),
        source,
    }
}

impl FlowLogOptions {
    pub fn format(&self) -> Result<Format, FlowLogError> {
        if self.format.trim().is_empty() {
            Ok(Format::default_v2())
        } else {
            Ok(Format::parse(&self.format)?)
        }
    }
}

/// Totals since the instance came up, kept in the checkpoint so they survive the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportCounters {
    /// Windows closed and exported.
    pub windows: u64,
    /// Records written (OK, NODATA and SKIPDATA).
    pub records: u64,
    /// SKIPDATA records written.
    pub skipdata_records: u64,
    /// Packets that found the flow table full and are in no OK record.
    pub lost_packets: u64,
}

/// The totals of the last export, for metrics (zero before the first).
pub fn counters(paths: &InstancePaths) -> ExportCounters {
    journal::read_checkpoint(paths)
        .ok()
        .flatten()
        .map(|c| c.counters)
        .unwrap_or_default()
}

/// Sets flow counting and the event rate at `up`. The open window keeps its number when the
/// datapath was already loaded, and never reuses one a checkpoint has seen.
pub fn init_state(
    paths: &InstancePaths,
    enabled: bool,
    events_per_sec: u32,
) -> Result<(), FlowLogError> {
    let mut st = maps::read_flow_state(paths)?;
    if st.epoch == 0 {
        let last = journal::read_checkpoint(paths)
            .ok()
            .flatten()
            .map_or(0, |c| c.window);
        st.epoch = last + 1;
        st.window_start_ns = monotonic_ns();
    }
    st.enabled = u8::from(enabled);
    (st.event_cost_ns, st.event_burst_ns) = event_budget(events_per_sec);
    maps::write_flow_state(paths, &st)?;
    Ok(())
}

/// Token-bucket parameters for `events_per_sec` events per second per CPU, with one second's
/// worth of burst; (0, 0) turns events off.
pub fn event_budget(events_per_sec: u32) -> (u64, u64) {
    if events_per_sec == 0 {
        return (0, 0);
    }
    let cost = 1_000_000_000 / u64::from(events_per_sec);
    (cost, cost * u64::from(events_per_sec))
}

/// Turns flow counting on or off in the kernel without touching the windows (the benchmark).
pub fn set_enabled(paths: &InstancePaths, enabled: bool) -> Result<(), FlowLogError> {
    let mut st = maps::read_flow_state(paths)?;
    st.enabled = u8::from(enabled);
    maps::write_flow_state(paths, &st)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_budget_is_a_second_of_burst() {
        assert_eq!(event_budget(0), (0, 0));
        assert_eq!(event_budget(1000), (1_000_000, 1_000_000_000));
    }
}
