//! `ecsnet bench` (SPEC §9): ecsnet against Docker's bridge mode and the machine's ceiling on
//! labs of its own, `bench flow-logs`, `bench discovery` and `bench scale`. Developer tooling: no shipped binary carries it.

use std::path::PathBuf;

use ecsnet::flowlog;

use crate::{lab, progcost, stats};

pub mod chart;
mod discovery;
mod flow_logs;
pub mod loadgen;
mod plan;
mod report;
mod run;
pub mod scale;
mod tools;

pub use discovery::{
    DiscoveryBench, DiscoveryLoad, DiscoveryRun, Latency, discovery, render_discovery,
};
pub use flow_logs::{FlowLogBench, PathResult, flow_logs, render_flow_logs};
pub use plan::{BenchPath, Families, Family, Metric, Mode};
pub use report::{BenchReport, Row, Target, render, svg};
pub use run::run;
pub use scale::{ScaleBench, render_scale, scale};

impl From<flowlog::FlowLogError> for BenchError {
    fn from(e: flowlog::FlowLogError) -> Self {
        Self::FlowLog(Box::new(e))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("iperf3 is not installed: apt-get install iperf3 (./x setup installs it)")]
    NoIperf3,
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
    /// Boxed: `FlowLogError` is large.
    #[error(transparent)]
    FlowLog(Box<flowlog::FlowLogError>),
    #[error(transparent)]
    Lab(#[from] lab::LabError),
    #[error(transparent)]
    Cost(#[from] progcost::CostError),
    #[error("--rounds and --seconds must be at least 1")]
    Usage,
    #[error("bad --congestion {name:?}: this kernel offers {available}")]
    Congestion { name: String, available: String },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> BenchError {
    let what = what.into();
    move |detail| BenchError::Step { what, detail }
}

/// The labs' TCP congestion control unless `--congestion` says otherwise: Linux's default.
pub const DEFAULT_CONGESTION: &str = "cubic";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub rounds: usize,
    /// Seconds per tool run.
    pub seconds: u64,
    /// Extra published ports and rules of the scaling runs.
    pub scale: Vec<usize>,
    /// `BPF_PROG_TEST_RUN` repeats per program measurement.
    pub repeat: u32,
    /// Parallel connection loops of the new-connection runs.
    pub crr_threads: usize,
    /// Where the SVG chart goes.
    pub svg: Option<PathBuf>,
    /// Print a progress line on stderr.
    pub progress: bool,
    /// TCP congestion control of every lab namespace.
    pub congestion: String,
    /// Address families of the main phase (the labs are dual stack when IPv6 is measured).
    pub families: Families,
}

impl BenchOptions {
    /// The full run: what docs/BENCHMARKS.md reports.
    pub fn full() -> Self {
        BenchOptions {
            rounds: 5,
            seconds: 3,
            scale: vec![1, 100, 1000],
            repeat: 100_000,
            crr_threads: 2,
            svg: None,
            progress: true,
            congestion: DEFAULT_CONGESTION.to_owned(),
            families: Families::Both,
        }
    }

    /// `--quick`: every metric once, short runs; proves the benchmark works in under two
    /// minutes, says nothing about speed.
    pub fn quick() -> Self {
        BenchOptions {
            rounds: 1,
            seconds: 1,
            scale: vec![1, 1000],
            repeat: 2_000,
            ..Self::full()
        }
    }
}

/// Refuses, before any lab is built, what would fail later: no rounds or seconds, no iperf3,
/// a congestion control the kernel does not offer.
fn preflight(rounds: usize, seconds: u64, congestion: &str) -> Result<(), BenchError> {
    if rounds == 0 || seconds == 0 {
        return Err(BenchError::Usage);
    }
    if which::which("iperf3").is_err() {
        return Err(BenchError::NoIperf3);
    }
    tools::check_congestion(congestion)
}

/// The median of the samples that are numbers; NaN when none is.
fn median(v: &[f64]) -> f64 {
    stats::median(v).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(
        clippy::float_cmp,
        reason = "the median of small whole numbers is exact"
    )]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }
}
