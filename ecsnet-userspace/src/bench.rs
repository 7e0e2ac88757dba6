//! `ecsnet bench flow-logs`: iperf3 throughput through ecsnet with flow logging on and off, on a
//! lab of its own, in interleaved rounds (SPEC §9, "flow logging on vs off"). Flow logging is
//! switched in the datapath between rounds; the agent exports 1-second windows all along.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde::Serialize;

use crate::{flowlog, paths::InstancePaths};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("iperf3 is not installed: apt-get install iperf3 (./x setup installs it)")]
    NoIperf3,
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
    #[error(transparent)]
    FlowLog(#[from] flowlog::FlowLogError),
    #[error("--rounds and --seconds must be at least 1")]
    Usage,
}

fn step(what: impl Into<String>) -> impl FnOnce(String) -> BenchError {
    let what = what.into();
    move |detail| BenchError::Step { what, detail }
}

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
    pub paths: Vec<PathResult>,
}

/// The lab and instance of one benchmark run, taken down on drop (also on error or panic).
struct BenchLab {
    exe: PathBuf,
    name: String,
    servers: Vec<Child>,
}

impl BenchLab {
    fn ecsnet(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.exe)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.ecsnet(&["--instance", &self.name, "down"]);
        let _ = self.ecsnet(&["lab", "down", "--name", &self.name]);
    }
}

fn ns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// One iperf3 run from `ns` to `target`, bits per second received.
fn iperf3(ns: &str, target: &str, port: u16, seconds: u64) -> Result<f64, BenchError> {
    let secs = seconds.to_string();
    let port_s = port.to_string();
    let out = ns_cmd(
        ns,
        &["iperf3", "-J", "-c", target, "-p", &port_s, "-t", &secs],
    )
    .output()
    .map_err(|e| step("iperf3")(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        step(format!("iperf3 -c {target}"))(format!(
            "{e}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    })?;
    if let Some(err) = v.get("error") {
        return Err(step(format!("iperf3 -c {target}:{port}"))(err.to_string()));
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| step(format!("iperf3 -c {target}"))("no received rate".to_owned()))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// Runs the comparison: `rounds` rounds of `seconds` per mode and path, modes alternating
/// which goes first.
pub fn flow_logs(rounds: usize, seconds: u64, xdp_mode: &str) -> Result<FlowLogBench, BenchError> {
    if rounds == 0 || seconds == 0 {
        return Err(BenchError::Usage);
    }
    if which::which("iperf3").is_err() {
        return Err(BenchError::NoIperf3);
    }
    const WINDOW: u64 = 1;
    const PORT: u16 = 5201;
    let name = format!("bfl{}", std::process::id() % 100_000);
    let mut lab = BenchLab {
        exe: std::env::current_exe()
            .map_err(|e| step("finding the ecsnet binary")(e.to_string()))?,
        name: name.clone(),
        servers: Vec::new(),
    };
    lab.ecsnet(&["lab", "up", "--name", &name, "--tasks", "2"])
        .map_err(step("lab up"))?;
    let host = format!("{name}-host");
    let state = format!("/run/ecsnet/{name}/state.json");
    let window = WINDOW.to_string();
    lab.ecsnet(&[
        "--netns",
        &host,
        "--instance",
        &name,
        "up",
        "--state",
        &state,
        "--window",
        &window,
        "--xdp-mode",
        xdp_mode,
    ])
    .map_err(step("ecsnet up"))?;
    // Published here rather than by the lab, whose echo server would take the port.
    let publish = format!("{PORT}:{PORT}");
    lab.ecsnet(&[
        "--instance",
        &name,
        "task",
        "add",
        "--name",
        "task2",
        "--ip",
        "172.17.0.3",
        "--publish",
        &publish,
    ])
    .map_err(step("ecsnet task add"))?;
    let server = ns_cmd(
        &format!("{name}-task2"),
        &["iperf3", "-s", "-p", &PORT.to_string()],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .map_err(|e| step("iperf3 -s")(e.to_string()))?;
    lab.servers.push(server);
    std::thread::sleep(Duration::from_millis(500));
    let paths = InstancePaths::new(&name);
    let cases = [
        (
            "task to task",
            format!("{name}-task1"),
            "172.17.0.3".to_owned(),
        ),
        (
            "client to published port",
            format!("{name}-client"),
            "10.10.0.1".to_owned(),
        ),
    ];
    let mut results = Vec::new();
    for (path, ns, target) in &cases {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for enabled in order {
                flowlog::set_enabled(&paths, enabled)?;
                let bps = iperf3(ns, target, PORT, seconds)?;
                if enabled { &mut on } else { &mut off }.push(bps);
            }
        }
        flowlog::set_enabled(&paths, true)?;
        let (on_m, off_m) = (median(&on), median(&off));
        results.push(PathResult {
            path: (*path).to_owned(),
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
        window_secs: WINDOW,
        xdp_mode: xdp_mode.to_owned(),
        paths: results,
    })
}

/// The table `bench flow-logs` prints.
pub fn render(b: &FlowLogBench) -> String {
    let mut out = format!(
        "iperf3 TCP, 1 stream, {} round(s) of {} s per mode, flow-log window {} s, XDP {}; medians\n",
        b.rounds, b.seconds, b.window_secs, b.xdp_mode
    );
    out.push_str(&format!(
        "{:<26} {:>14} {:>14} {:>8}\n",
        "PATH", "OFF Gbit/s", "ON Gbit/s", "ON/OFF"
    ));
    for p in &b.paths {
        out.push_str(&format!(
            "{:<26} {:>14.2} {:>14.2} {:>8.3}\n",
            p.path,
            p.off_bps / 1e9,
            p.on_bps / 1e9,
            p.ratio
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
