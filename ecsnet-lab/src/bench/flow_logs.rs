//! `ecsnet bench flow-logs`: iperf3 through the ecsnet lab with flow logging off and on, on
//! a lab of its own, and the table it prints.

use std::fmt::Write as _;

use serde::Serialize;

use ecsnet::{flowlog, store::paths::InstancePaths};

use super::{
    BenchError, median,
    plan::{BenchPath, Family, Mode, on_off},
    preflight,
    run::SERVERS_START,
    tools::{Labs, WINDOW_SECS, endpoints, iperf3_tcp},
};

/// One path's medians, bits per second.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathResult {
    pub path: String,
    pub off_bps: f64,
    pub on_bps: f64,
    /// on / off.
    pub ratio: f64,
    pub off_rounds: Vec<f64>,
    pub on_rounds: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowLogBench {
    pub rounds: usize,
    pub seconds: u64,
    pub window_secs: u64,
    /// `up --xdp-mode` of the instance measured.
    pub xdp_mode: String,
    /// TCP congestion control of the lab.
    pub congestion: String,
    pub paths: Vec<PathResult>,
}

/// Runs the comparison: `rounds` rounds of `seconds` per mode and path, modes alternating
/// which goes first.
pub fn flow_logs(
    rounds: usize,
    seconds: u64,
    xdp_mode: &str,
    congestion: &str,
) -> Result<FlowLogBench, BenchError> {
    preflight(rounds, seconds, congestion)?;
    let mut labs = Labs::new(congestion)?;
    let s = labs.lab_up(format!("bfl{}", std::process::id() % 100_000), false, false)?;
    labs.ecsnet_up(&s, &["--xdp-mode", xdp_mode])?;
    labs.servers_in(&s.tasks[1].netns, false)?;
    std::thread::sleep(SERVERS_START);
    let paths = InstancePaths::new(&s.name);
    let mut results = Vec::new();
    for path in [BenchPath::TaskToTask, BenchPath::Published] {
        let (ns, target) = endpoints(&s, Mode::Ecsnet, path, Family::Ipv4)?;
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for enabled in on_off(round) {
                flowlog::set_enabled(&paths, enabled)?;
                let bps = iperf3_tcp(&ns, target, seconds, 1, congestion)?;
                if enabled { &mut on } else { &mut off }.push(bps);
            }
        }
        flowlog::set_enabled(&paths, true)?;
        let (on_m, off_m) = (median(&on), median(&off));
        results.push(PathResult {
            path: path.name().to_owned(),
            off_bps: off_m,
            on_bps: on_m,
            ratio: if off_m > 0.0 { on_m / off_m } else { 0.0 },
            off_rounds: off,
            on_rounds: on,
        });
    }
    Ok(FlowLogBench {
        rounds,
        seconds,
        window_secs: WINDOW_SECS,
        xdp_mode: xdp_mode.to_owned(),
        congestion: congestion.to_owned(),
        paths: results,
    })
}

/// The table `bench flow-logs` prints.
pub fn render_flow_logs(b: &FlowLogBench) -> String {
    let mut out = format!(
        "iperf3 TCP ({}), 1 stream, {} round(s) of {} s per mode, flow-log window {} s, XDP {}; medians\n",
        b.congestion, b.rounds, b.seconds, b.window_secs, b.xdp_mode
    );
    let _ = writeln!(
        out,
        "{:<26} {:>14} {:>14} {:>8}",
        "PATH", "OFF Gbit/s", "ON Gbit/s", "ON/OFF"
    );
    for p in &b.paths {
        let _ = writeln!(
            out,
            "{:<26} {:>14.2} {:>14.2} {:>8.3}",
            p.path,
            p.off_bps / 1e9,
            p.on_bps / 1e9,
            p.ratio
        );
    }
    out
}
