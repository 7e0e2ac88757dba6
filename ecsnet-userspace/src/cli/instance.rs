//! `ecsnet up`, `down` and `apply`: the instance's life, handed to `crate::instance`.

use std::{net::SocketAddr, path::Path, path::PathBuf};

use clap::{Args, ValueEnum};

use crate::{
    agent,
    cli::or_keyword,
    instance::{self, Applied, UpOptions, XdpChoice},
    store::{
        files::{self, FlowLogOptions},
        paths::InstancePaths,
    },
};

#[derive(Debug, Args)]
pub struct UpArgs {
    #[arg(long)]
    pub uplink: Option<String>,
    #[arg(long)]
    pub bridge: Option<String>,
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Also write flow-log records to this file, in `--flow-format`, rotated.
    #[arg(long)]
    pub flow_log: Option<PathBuf>,
    /// Flow-log capture window, seconds (1 to 600).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub window: u64,
    /// Count flows in the datapath (on) or not at all (off).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub flow_logs: OnOff,
    /// Format of the --flow-log file, AWS syntax: '${srcaddr} ${dstaddr} ${tcp-flags}'; the
    /// default is AWS's version 2 format.
    #[arg(long, default_value = "")]
    pub flow_format: String,
    /// Rotate the --flow-log file past this many bytes.
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1024..))]
    pub flow_log_max_bytes: u64,
    /// Rotated --flow-log files to keep (FILE.1 is the newest).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub flow_log_keep: u32,
    /// Flow table size, entries (flows of one window and the one being exported); when full,
    /// the window's records say SKIPDATA.
    #[arg(long, default_value_t = ecsnet_common::flow::DEFAULT_FLOW_TABLE_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub flow_table_size: u32,
    /// Drop and policy events per second per CPU the datapath may send to `monitor` (0: none);
    /// the rest are counted as suppressed.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub monitor_rate: u32,
    /// Serve Prometheus metrics on this address (in the instance's network namespace), or off.
    #[arg(long, value_name = "ADDRESS:PORT|off", default_value = "127.0.0.1:9464",
          value_parser = metrics_addr)]
    pub metrics: MetricsAddr,
    /// Follow this Docker engine: its containers on the bridge become tasks, as they start and
    /// stop (`unix:///var/run/docker.sock` when no URL is given).
    #[arg(long, value_name = "URL", num_args = 0..=1,
          default_missing_value = crate::engine::DEFAULT_URL, value_parser = docker_url)]
    pub docker: Option<String>,
    /// Run the agent in this process instead of the background.
    #[arg(long)]
    pub foreground: bool,
    /// XDP on the uplink: auto (native on a NIC, off on a veth or other virtual uplink),
    /// native (falls back to skb), skb, or off.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,
    /// Connection-table size, entries (two per flow); a full table refuses new flows.
    #[arg(long, default_value_t = ecsnet_common::maps::DEFAULT_CT_SIZE,
          value_parser = clap::value_parser!(u32).range(4..=16_777_216))]
    pub ct_size: u32,
    /// Masqueraded flows one task may have at once towards one destination (address, port and
    /// protocol), of the 64,512 source ports masquerade has for each; past it the task's new
    /// flows there are dropped `NAT_TASK_PORT_LIMIT`, and other tasks keep the rest. 0: no
    /// limit.
    #[arg(long, default_value_t = ecsnet_common::maps::DEFAULT_NAT_TASK_PORTS,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(ecsnet_common::maps::NAT_PORT_SPAN)))]
    pub nat_task_ports: u32,
    /// Idle timeouts, e.g. `udp=30,tcp-established=3600` (states: tcp-syn, tcp-established,
    /// tcp-closing, tcp-reset, udp, icmp); unnamed states keep their defaults.
    #[arg(long, default_value = "")]
    pub ct_timeouts: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// `--xdp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
    Auto,
    #[value(alias = "driver")]
    Native,
    #[value(alias = "generic")]
    Skb,
    Off,
}

impl From<XdpMode> for XdpChoice {
    fn from(m: XdpMode) -> Self {
        match m {
            XdpMode::Auto => Self::Auto,
            XdpMode::Native => Self::Native,
            XdpMode::Skb => Self::Skb,
            XdpMode::Off => Self::Off,
        }
    }
}

/// `--metrics`: where to serve, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

#[derive(Debug, thiserror::Error)]
#[error("expected ADDRESS:PORT like 127.0.0.1:9464, or off")]
pub struct BadMetricsAddr;

fn metrics_addr(s: &str) -> Result<MetricsAddr, BadMetricsAddr> {
    or_keyword("off", s)
        .map(MetricsAddr)
        .map_err(|_| BadMetricsAddr)
}

/// `--docker`: the engine's Unix socket, as `unix:///path` or a bare path; kept as
/// `unix://...`.
fn docker_url(s: &str) -> Result<String, crate::engine::UrlError> {
    crate::engine::parse_url(s).map(|p| format!("unix://{}", p.display()))
}

pub fn up(paths: &InstancePaths, a: UpArgs, netns: Option<String>) -> anyhow::Result<()> {
    if !a.foreground && instance::is_other_build(paths)? {
        log::info!(
            "instance {} runs another build: upgrading it in place",
            paths.name
        );
        return upgrade(paths);
    }
    let opts = UpOptions {
        netns,
        uplink: a.uplink,
        bridge: a.bridge,
        state: a.state,
        xdp_mode: a.xdp_mode.into(),
        ct_size: a.ct_size,
        ct_timeouts: a.ct_timeouts,
        nat_task_ports: a.nat_task_ports,
        flow_table_size: a.flow_table_size,
        flow_logs: FlowLogOptions {
            enabled: a.flow_logs == OnOff::On,
            window_secs: a.window,
            sink: a.flow_log,
            format: a.flow_format,
            max_bytes: a.flow_log_max_bytes,
            keep: a.flow_log_keep,
        },
        monitor_rate: a.monitor_rate,
        metrics: a.metrics.0,
        docker: a.docker,
    };
    let pid = instance::up(paths, &opts, !a.foreground)?;
    let meta = files::require_up(paths)?;
    let tasks = files::read_applied(paths)?.map_or(0, |s| s.tasks.len());
    let agent = pid.map_or_else(
        || "agent in foreground".to_owned(),
        |p| format!("agent pid {p}"),
    );
    println!(
        "ecsnet instance {} up: uplink {} bridge {}, {tasks} task(s), {agent}",
        paths.name, meta.uplink, meta.bridge
    );
    if pid.is_none() {
        agent::run(paths)?;
    }
    Ok(())
}

pub fn upgrade(paths: &InstancePaths) -> anyhow::Result<()> {
    let u = instance::upgrade(paths)?;
    let was = u
        .agent_was
        .map_or_else(|| "none running".to_owned(), |p| format!("was {p}"));
    println!(
        "ecsnet instance {} upgraded in place: {} program(s) replaced on {} link(s), maps kept, agent pid {} ({was})",
        paths.name, u.replaced.programs, u.replaced.links, u.agent
    );
    Ok(())
}

pub fn down(paths: &InstancePaths) -> anyhow::Result<()> {
    let r = instance::teardown(paths)?;
    if r.agent_stopped.is_none() && !r.had_pins && !r.had_files {
        println!("ecsnet instance {} was not up; nothing to do", paths.name);
    } else {
        println!("ecsnet instance {} down", paths.name);
    }
    Ok(())
}

pub fn apply(paths: &InstancePaths, file: &Path, reset_flows: bool) -> anyhow::Result<()> {
    let a = instance::apply(paths, file, reset_flows)?;
    println!(
        "applied {}: {} task(s), {} security group(s){}",
        file.display(),
        a.state.tasks.len(),
        a.state.security_groups.len(),
        flows_cut(&a, reset_flows)
    );
    Ok(())
}

/// What `--reset-flows` cut, for the line an apply prints.
pub fn flows_cut(a: &Applied, reset_flows: bool) -> String {
    if reset_flows {
        format!("; {} tracked flow(s) no longer allowed cut", a.flows_cut)
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_is_an_address_or_off() {
        assert_eq!(metrics_addr("off").unwrap(), MetricsAddr(None));
        assert_eq!(
            metrics_addr("127.0.0.1:9465").unwrap(),
            MetricsAddr(Some(([127, 0, 0, 1], 9465).into()))
        );
        assert!(metrics_addr("bogus").is_err());
        assert!(metrics_addr("127.0.0.1").is_err(), "a port is needed");
    }
}
