//! The agent as a process: starting it in the background, finding it by its pid file (checked
//! against /proc so a reused pid is never signalled), and stopping it.

use std::{
    fs,
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::store::paths::InstancePaths;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent did not open {socket} within {secs} s; its log {log} says: {tail}")]
    AgentStart {
        socket: PathBuf,
        log: PathBuf,
        secs: u64,
        tail: String,
    },
    #[error("agent pid {pid} did not exit after SIGKILL")]
    Unkillable { pid: i32 },
}

/// True when `pid` is a live `ecsnet ... agent` process of this instance.
fn is_our_agent(pid: i32, instance: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let has = |s: &str| args.contains(&s.as_bytes());
    // A zombie has an empty cmdline and is not alive for our purposes.
    has("agent")
        && args
            .windows(2)
            .any(|w| w[0] == b"--instance" && w[1] == instance.as_bytes())
}

/// The pid of this instance's running agent, if there is one.
pub fn agent_pid(paths: &InstancePaths) -> Option<i32> {
    let pid: i32 = fs::read_to_string(paths.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_our_agent(pid, &paths.name).then_some(pid)
}

/// Starts `ecsnet --instance I [--netns N] agent` detached from this session, logging to the
/// instance's log file, and waits until its control socket answers.
pub fn spawn_agent(paths: &InstancePaths, netns: Option<&str>) -> Result<i32, ProcessError> {
    let dir = paths.run_dir();
    fs::create_dir_all(&dir).map_err(|source| ProcessError::Io {
        path: dir.clone(),
        source,
    })?;
    let log_path = paths.log_file();
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| ProcessError::Io {
            path: log_path.clone(),
            source,
        })?;
    let exe = std::env::current_exe().map_err(|source| ProcessError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let mut cmd = Command::new(exe);
    cmd.arg("--instance").arg(&paths.name);
    if let Some(ns) = netns {
        cmd.arg("--netns").arg(ns);
    }
    cmd.arg("agent")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|source| ProcessError::Io {
            path: log_path.clone(),
            source,
        })?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the agent from our terminal and group.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| ProcessError::Io {
        path: PathBuf::from("ecsnet agent"),
        source,
    })?;
    let pid = i32::try_from(child.id()).expect("a pid fits pid_t");
    let socket = paths.socket();
    let secs = 10;
    let ready = wait_for(Duration::from_secs(secs), || {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        UnixStream::connect(&socket).is_ok()
    });
    if !ready || matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
        let tail = fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .last()
            .unwrap_or("(empty)")
            .to_owned();
        return Err(ProcessError::AgentStart {
            socket,
            log: log_path,
            secs,
            tail,
        });
    }
    // The agent is reparented to init when we exit; do not leave a zombie meanwhile.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// Stops the agent: SIGTERM, then SIGKILL after 3 s. Returns the pid it stopped.
pub fn stop_agent(paths: &InstancePaths) -> Result<Option<i32>, ProcessError> {
    let Some(pid) = agent_pid(paths) else {
        return Ok(None);
    };
    let gone = || !is_our_agent(pid, &paths.name);
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if !wait_for(Duration::from_secs(3), gone) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        if !wait_for(Duration::from_secs(3), gone) {
            return Err(ProcessError::Unkillable { pid });
        }
    }
    Ok(Some(pid))
}

/// Waits until `cond` holds or `timeout` passes.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
