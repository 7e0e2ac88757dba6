//! The agent: the long-running side of an instance. It owns the control socket, forwards the
//! datapath's log lines, and answers status and stats. The datapath does not depend on it: it
//! can be killed at any time and started again with `ecsnet up`.

use std::{fs, os::unix::fs::PermissionsExt as _, time::Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};

use crate::{instance, paths::InstancePaths, report};

/// Longest request line the socket accepts, bytes.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Instance(#[from] instance::InstanceError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    op: String,
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(paths: &InstancePaths) -> Result<(), AgentError> {
    let meta = instance::require_up(paths)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("tokio runtime"))?;
    rt.block_on(serve(paths, meta))
}

async fn serve(paths: &InstancePaths, meta: instance::Meta) -> Result<(), AgentError> {
    let started = Instant::now();
    let dir = paths.run_dir();
    fs::create_dir_all(&dir).map_err(io(dir.display().to_string()))?;
    let socket = paths.socket();
    // A socket file left by a killed agent: nobody answers on it, so it can go.
    if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let _ = fs::remove_file(&socket);
    }
    let listener = UnixListener::bind(&socket).map_err(io(socket.display().to_string()))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .map_err(io(socket.display().to_string()))?;
    fs::write(paths.pid_file(), format!("{}\n", std::process::id()))
        .map_err(io(paths.pid_file().display().to_string()))?;
    log::info!(
        "agent for instance {} up: uplink {} bridge {} socket {}",
        paths.name,
        meta.uplink,
        meta.bridge,
        socket.display()
    );
    let _loggers = forward_datapath_logs(paths);

    let timeouts = crate::compile::parse_timeouts(&meta.ct_timeouts).unwrap_or_default();
    let mut gc = tokio::time::interval(GC_INTERVAL);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate()).map_err(io("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("SIGINT handler"))?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = gc.tick() => housekeeping(paths, &timeouts).await,
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let paths = paths.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &paths, started).await {
                            log::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => log::warn!("accept on {}: {e}", socket.display()),
            },
        }
    }
    let _ = fs::remove_file(&socket);
    let _ = fs::remove_file(paths.pid_file());
    log::info!("agent for instance {} stopped", paths.name);
    Ok(())
}

/// How often the agent expires idle flows and re-reads the host's addresses.
const GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Connection-table garbage collection and the host's address list: the two pieces of datapath
/// state that change without an `apply`.
async fn housekeeping(paths: &InstancePaths, timeouts: &ecsnet_common::ct::Timeouts) {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    match now.map_err(|e| e.to_string()).and_then(|now| {
        crate::maps::collect_garbage(paths, timeouts, now).map_err(|e| e.to_string())
    }) {
        Ok(0) => {}
        Ok(n) => log::debug!("conntrack: expired {n} flow(s)"),
        Err(e) => log::warn!("conntrack garbage collection: {e}"),
    }
    match crate::netlink::Snapshot::read_async().await {
        Ok(snap) => {
            if let Err(e) =
                crate::maps::write_local_addrs(paths, &crate::compile::local_addr_entries(&snap))
            {
                log::warn!("local addresses: {e}");
            }
        }
        Err(e) => log::warn!("local addresses: {e}"),
    }
}

/// Forwards aya-log records of the pinned programs into the agent's log.
fn forward_datapath_logs(paths: &InstancePaths) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // The programs share one log buffer; one logger is enough.
    if let Some(id) = crate::datapath::pinned_program_ids(paths).first().copied() {
        match aya_log::EbpfLogger::init_from_id(id) {
            // SAFETY: the logger owns its ring-buffer fd for as long as the AsyncFd owns it.
            Ok(logger) => match unsafe { tokio::io::unix::AsyncFd::register(logger) }
                .map_err(|e| e.to_string())
            {
                Ok(mut fd) => tasks.push(tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = fd.readable_mut().await else {
                            break;
                        };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                })),
                Err(e) => log::warn!("datapath log forwarding off: {e}"),
            },
            Err(e) => log::warn!("datapath log forwarding off: {e}"),
        }
    }
    tasks
}

async fn handle(
    stream: UnixStream,
    paths: &InstancePaths,
    started: Instant,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > MAX_REQUEST;
        let reply = if too_long {
            json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")})
        } else {
            answer(&line, paths, started)
        };
        let mut out = serde_json::to_vec(&reply).expect("replies serialize");
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// The reply to one request line. Never panics on input.
pub fn answer(line: &[u8], paths: &InstancePaths, started: Instant) -> Value {
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return json!({"ok": false, "error": format!("bad request: {e}; send {{\"op\": \"status\"}}")});
        }
    };
    match req.op.as_str() {
        "ping" => json!({"ok": true, "pid": std::process::id()}),
        "status" => match instance::read_meta(paths) {
            Ok(meta) => json!({
                "ok": true,
                "pid": std::process::id(),
                "uptimeSecs": started.elapsed().as_secs(),
                "meta": meta,
            }),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        "stats" => match report::stats(paths) {
            Ok(s) => json!({"ok": true, "stats": s}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        other => {
            json!({"ok": false, "error": format!("unknown op {other:?}: use ping, status or stats")})
        }
    }
}
