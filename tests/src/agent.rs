//! The agent of an instance as a test sees it from outside: its pid file, one request on its
//! control socket, and SIGKILL.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use ecsnet::store::paths::InstancePaths;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

/// The pid in instance `name`'s agent.pid, if there is one.
pub fn pid(name: &str) -> Option<i32> {
    std::fs::read_to_string(InstancePaths::new(name).pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// True while `pid` is a live process (not gone, not a zombie nobody reaped yet).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// SIGKILLs agent `pid` and waits (up to 10 s) until it is gone.
pub fn kill_agent(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL the agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "agent {pid} still alive 10 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One request line on instance `name`'s control socket; its answer, parsed.
pub fn ask(name: &str, request: &str) -> Value {
    let path = InstancePaths::new(name).socket();
    let mut s =
        UnixStream::connect(&path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{request}\n").as_bytes())
        .unwrap_or_else(|e| panic!("send {request}: {e}"));
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .unwrap_or_else(|e| panic!("the agent's answer to {request}: {e}"));
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("agent reply {reply:?}: {e}"))
}
