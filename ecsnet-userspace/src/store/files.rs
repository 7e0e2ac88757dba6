//! The run files of an instance: `meta.json` (what `up` found and chose) and `applied.json` (the
//! state as last applied), typed, each replaced whole by rename. An instance never up has neither.

use std::{
    fs, io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ecsnet_common::ct::Timeouts;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    kernel::{datapath, pins::InstancePaths},
    state::{State, Task},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("instance {instance:?} is not up; run `ecsnet --instance {instance} up` first")]
    NotUp { instance: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt instance file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Exit code: 2 for an instance that is not up (bad usage), 1 for a failure of the machine.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NotUp { .. } => 2,
            Self::Io { .. } | Self::Corrupt { .. } => 1,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How the uplink got XDP: what `--xdp-mode` asked for, after `auto` and the fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkXdp {
    Native,
    Skb,
    Off,
}

/// What `ecsnet up` chose for flow logs; kept in the instance's meta for the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowLogOptions {
    pub enabled: bool,
    pub window_secs: u64,
    /// The file sink; None: only the journal behind `flows tail`.
    pub sink: Option<PathBuf>,
    /// The sink's `${field}` format; empty: AWS's default (version 2).
    pub format: String,
    /// The sink is rotated past this size, bytes, keeping `keep` old files.
    pub max_bytes: u64,
    pub keep: u32,
}

impl Default for FlowLogOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            window_secs: 60,
            sink: None,
            format: String::new(),
            max_bytes: 64 << 20,
            keep: 5,
        }
    }
}

/// What `up` found and chose, kept in `<run dir>/meta.json`. Files written before a field was
/// dropped (`windowSecs`, `flowLog`) still read: unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub instance: String,
    pub netns: Option<String>,
    pub uplink: String,
    pub uplink_index: u32,
    pub uplink_address: Option<Ipv4Addr>,
    pub bridge: String,
    pub bridge_index: u32,
    pub bridge_address: Option<(Ipv4Addr, u8)>,
    pub xdp_mode: UplinkXdp,
    /// Connection-table size the datapath was loaded with, entries.
    #[serde(default)]
    pub ct_size: u32,
    /// The idle timeouts the agent's garbage collection applies; written as `--ct-timeouts`
    /// spells them.
    #[serde(default, with = "ct_timeouts")]
    pub ct_timeouts: Timeouts,
    /// Flow-log table size the datapath was loaded with, entries.
    #[serde(default)]
    pub flow_table_size: u32,
    /// How the agent exports flow logs.
    #[serde(default)]
    pub flow_logs: FlowLogOptions,
    /// Monitor events per second per CPU the datapath may send (0: none).
    #[serde(default)]
    pub monitor_rate: u32,
    /// Where the agent serves Prometheus metrics; None: nowhere.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// The container engine the agent follows (`up --docker URL`); None: tasks come only from
    /// the state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<String>,
    /// `up --nat-task-ports`, which an upgrade in place writes again; None: an instance from
    /// before the limit existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_task_ports: Option<u32>,
}

/// `Meta::ct_timeouts` as the `--ct-timeouts` text, so the file stays what a person would type.
mod ct_timeouts {
    use ecsnet_common::ct::Timeouts;
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    use crate::state::timeouts;

    pub fn serialize<S: Serializer>(t: &Timeouts, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&timeouts::Spec(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timeouts, D::Error> {
        let spec = String::deserialize(d)?;
        timeouts::parse(&spec).map_err(D::Error::custom)
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StoreError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(v).expect("instance files serialize");
    fs::write(&tmp, text + "\n").map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

pub fn read_meta(paths: &InstancePaths) -> Result<Option<Meta>, StoreError> {
    read_json(&paths.meta_file())
}

pub fn write_meta(paths: &InstancePaths, meta: &Meta) -> Result<(), StoreError> {
    write_json(&paths.meta_file(), meta)
}

pub fn read_applied(paths: &InstancePaths) -> Result<Option<State>, StoreError> {
    read_json(&paths.applied_state())
}

pub fn write_applied(paths: &InstancePaths, state: &State) -> Result<(), StoreError> {
    write_json(&paths.applied_state(), state)
}

/// What the agent last heard from the container engine: each running container on the bridge as
/// a task (`source: docker`), and each other container with why it is not one (host or no
/// network, another network than the bridge, not running). `apply`, `task add|rm` and `sg apply`
/// merge these tasks with the ones they are given (`plan::merge`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Discovered {
    /// The engine's address, as `up --docker` was given it.
    pub engine: String,
    pub tasks: Vec<Task>,
    #[serde(default)]
    pub not_tasks: Vec<NotATask>,
    /// What the engine's containers do that ecsnet leaves to Docker (a port published on one
    /// host address only, an SCTP port), one line each.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// A container of the engine that ecsnet does not make a task of, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotATask {
    pub container_id: String,
    pub name: String,
    pub reason: String,
}

/// A task whose interface went (its container stopped, or an apply removed it), with when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Departed {
    pub ifindex: u32,
    pub task: Task,
    /// Unix seconds.
    pub at: u64,
}

/// How long a departed task is remembered: longer than the longest capture window (600 s), so
/// the window it left in is exported with its name.
pub const DEPARTED_KEEP_SECS: u64 = 1200;

pub fn read_departed(paths: &InstancePaths) -> Result<Vec<Departed>, StoreError> {
    Ok(read_json(&paths.departed())?.unwrap_or_default())
}

/// Adds `gone` to the departed tasks, forgetting those older than `DEPARTED_KEEP_SECS`.
pub fn add_departed(
    paths: &InstancePaths,
    gone: Vec<Departed>,
    now: u64,
) -> Result<(), StoreError> {
    let mut all = read_departed(paths)?;
    all.retain(|d| d.at + DEPARTED_KEEP_SECS > now && !gone.iter().any(|g| g.ifindex == d.ifindex));
    all.extend(gone);
    write_json(&paths.departed(), &all)
}

/// How the agent's following of the container engine stands: `stats`, the metrics and the log
/// say it. Rewritten by the agent when it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    pub engine: String,
    /// Connected to the engine and following its events.
    pub connected: bool,
    /// Unix seconds of the last change of `connected`.
    pub since: u64,
    /// The last error talking to the engine, while disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Container events received.
    pub events: u64,
    /// Full lists of the engine's containers (at start and after each reconnect).
    pub relists: u64,
    /// Connections after the first.
    #[serde(default)]
    pub reconnects: u64,
    /// Tasks from the engine, live.
    pub tasks: usize,
    /// Containers that are not tasks (host or no network, another network, not running).
    pub not_tasks: usize,
    /// Tasks closed because their label names a group nobody defined.
    pub closed: usize,
    /// Containers left out because the state file gives them (shadowed) or they did not fit.
    pub left_out: usize,
    /// New ports of the bridge held at the default policy since the agent started.
    pub held: u64,
    /// Ports held now: their container is not known yet (`stats` reads it from `IFACES`).
    #[serde(default)]
    pub held_now: usize,
    /// Applies of the engine's view, and those that failed.
    pub applies: u64,
    pub apply_errors: u64,
}

pub fn read_engine_status(paths: &InstancePaths) -> Result<Option<EngineStatus>, StoreError> {
    read_json(&paths.engine_status())
}

pub fn write_engine_status(paths: &InstancePaths, s: &EngineStatus) -> Result<(), StoreError> {
    write_json(&paths.engine_status(), s)
}

pub fn read_discovered(paths: &InstancePaths) -> Result<Option<Discovered>, StoreError> {
    read_json(&paths.discovered())
}

pub fn write_discovered(paths: &InstancePaths, d: &Discovered) -> Result<(), StoreError> {
    write_json(&paths.discovered(), d)
}

/// The meta of an instance that is up: its file is there and its datapath is loaded.
pub fn require_up(paths: &InstancePaths) -> Result<Meta, StoreError> {
    match read_meta(paths)? {
        Some(m) if datapath::is_loaded(paths) => Ok(m),
        _ => Err(StoreError::NotUp {
            instance: paths.name.clone(),
        }),
    }
}

/// Removes a file, or a directory with everything in it; one that is not there is as good as
/// removed.
pub fn remove(path: &Path) -> Result<(), StoreError> {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_META: &str = r#"{
      "instance": "x", "netns": null, "uplink": "eth0", "uplinkIndex": 2,
      "uplinkAddress": "10.10.0.1", "bridge": "docker0", "bridgeIndex": 3,
      "bridgeAddress": ["172.17.0.1", 16], "xdpMode": "skb", "windowSecs": 60,
      "flowLog": "/var/log/flows.log", "ctSize": 1024, "ctTimeouts": "udp=5",
      "flowTableSize": 2048
    }"#;

    #[test]
    fn meta_written_before_fields_were_dropped_still_reads() {
        let m: Meta = serde_json::from_str(OLD_META).unwrap();
        assert_eq!(m.xdp_mode, UplinkXdp::Skb);
        assert_eq!(m.ct_timeouts.udp, 5);
        assert_eq!(m.ct_timeouts.tcp_syn, Timeouts::default().tcp_syn);
        assert_eq!(m.flow_logs, FlowLogOptions::default());
        let m: Meta = serde_json::from_str(&OLD_META.replace("\"udp=5\"", "\"\"")).unwrap();
        assert_eq!(m.ct_timeouts, Timeouts::default());
    }

    #[test]
    fn meta_reads_back_what_it_writes() {
        let mut m: Meta = serde_json::from_str(OLD_META).unwrap();
        m.ct_timeouts.icmp = 9;
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"xdpMode\":\"skb\""), "{text}");
        let fields: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(fields.get("windowSecs").is_none() && fields.get("flowLog").is_none());
        assert_eq!(serde_json::from_str::<Meta>(&text).unwrap(), m);
        let bad = text.replace("icmp=9", "icmp=0");
        assert!(serde_json::from_str::<Meta>(&bad).is_err());
    }

    #[test]
    fn remove_takes_files_and_trees_and_minds_no_absence() {
        let dir = std::env::temp_dir().join(format!("ecsnet-files-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/f"), "x").unwrap();
        fs::write(dir.join("g"), "x").unwrap();
        remove(&dir.join("g")).unwrap();
        assert!(!dir.join("g").exists());
        remove(&dir).unwrap();
        assert!(!dir.exists());
        remove(&dir).unwrap();
    }
}
