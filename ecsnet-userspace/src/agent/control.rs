//! The control socket: its protocol, one JSON object per line each way ([`Request`], [`Reply`],
//! then [`StreamLine`]s for a `monitor`), shared by the agent and its clients, and the agent's
//! side of it. Only the agent listens; without an agent nobody answers and clients say so.

use std::{sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{Semaphore, broadcast},
};

use crate::{
    agent::{
        conns::{Limits, Slot},
        monitor::EventLine,
        stats::{self, Stats},
    },
    store::{
        files::{self, Meta},
        paths::InstancePaths,
    },
};

/// Longest request line the socket accepts, bytes.
const MAX_REQUEST: usize = 64 * 1024;

/// `monitor` clients at once; each holds a control slot for as long as it follows.
pub const MAX_MONITORS: usize = 16;

/// Bounds of the control socket (root only, but root's tools can leak connections too). The
/// busy reply, written without waiting, is a `Reply::error` line (a test checks it).
pub const LIMITS: Limits = Limits {
    name: "control",
    cap: 64,
    idle: std::time::Duration::from_secs(10),
    busy_reply:
        b"{\"ok\":false,\"error\":\"the agent is busy: every control connection is in use\"}\n",
};

/// One request line: `{"op": "status"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub op: Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The agent's pid.
    Ping,
    /// Pid, uptime and the instance's meta.
    Status,
    /// `ecsnet stats`, read by the agent.
    Stats,
    /// A hello, then every datapath event as a [`StreamLine`] until the client leaves.
    Monitor,
}

/// One reply line: `{"ok": true, ...the answer's fields}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(flatten)]
    pub answer: Answer,
}

/// What a reply says; untagged, so the fields tell the kinds apart (the longer ones first).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    Error {
        error: String,
    },
    Status {
        pid: u32,
        #[serde(rename = "uptimeSecs")]
        uptime_secs: u64,
        meta: Option<Box<Meta>>,
    },
    Stats {
        stats: Box<Stats>,
    },
    /// The hello before a monitor's events.
    Monitor {
        monitor: bool,
    },
    Ping {
        pid: u32,
    },
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Self {
        Self {
            ok: !matches!(answer, Answer::Error { .. }),
            answer,
        }
    }
}

/// An answer, or the error that kept it.
impl<E: std::fmt::Display> From<Result<Answer, E>> for Reply {
    fn from(r: Result<Answer, E>) -> Self {
        r.map_or_else(|e| Self::error(&e), Self::from)
    }
}

impl Reply {
    pub fn error(error: &dyn std::fmt::Display) -> Self {
        Answer::Error {
            error: error.to_string(),
        }
        .into()
    }

    /// The reply as one line.
    pub fn line(&self) -> Vec<u8> {
        line(self)
    }
}

/// A line a `monitor` client reads after the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamLine {
    /// This monitor fell behind the agent by `lost` events.
    Lost {
        lost: u64,
    },
    Event(EventLine),
}

/// `v` as one JSON line.
pub fn line(v: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("control messages serialize");
    out.push(b'\n');
    out
}

/// What the agent's control connections share.
pub struct Control {
    pub paths: InstancePaths,
    pub started: Instant,
    /// Event lines (`StreamLine::Event`), already serialized, for every monitor.
    pub events: broadcast::Sender<Arc<[u8]>>,
    /// One permit per `monitor` client.
    pub monitors: Arc<Semaphore>,
}

/// Serves one control connection: request lines, each answered, until the client closes, the
/// slot is taken or times out, or the client turns into a monitor.
pub async fn handle(stream: UnixStream, mut slot: Slot, control: &Control) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut request = Vec::new();
    loop {
        request.clear();
        let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
        let Some(n) = slot.wait_for(limited.read_until(b'\n', &mut request)).await else {
            return Ok(());
        };
        if n? == 0 {
            return Ok(());
        }
        if request.len() > MAX_REQUEST {
            let reply = Reply::error(&format!("request longer than {MAX_REQUEST} bytes"));
            let _ = slot.busy(write.write_all(&reply.line())).await;
            return Ok(());
        }
        let reply = match serde_json::from_slice::<Request>(&request) {
            Ok(Request { op: Op::Monitor }) => {
                let Ok(_permit) = control.monitors.clone().try_acquire_owned() else {
                    let reply = Reply::error(&format!(
                        "{MAX_MONITORS} monitors are following this agent already; stop one first"
                    ));
                    let _ = slot.busy(write.write_all(&reply.line())).await;
                    return Ok(());
                };
                return stream_events(reader, write, control.events.subscribe(), &slot).await;
            }
            Ok(Request { op }) => {
                // Reading the maps may take a while; the listeners go on meanwhile.
                let (paths, started) = (control.paths.clone(), control.started);
                tokio::task::spawn_blocking(move || answer(op, &paths, started))
                    .await
                    .unwrap_or_else(|e| Reply::error(&e))
            }
            Err(e) => Reply::error(&format!("bad request: {e}; send {{\"op\": \"status\"}}")),
        };
        match slot.busy(write.write_all(&reply.line())).await {
            Some(r) => r?,
            None => return Ok(()),
        }
    }
}

/// Streams event lines to one `monitor` client until it goes away (closes, or sends anything),
/// or does not take a line within the control socket's idle timeout.
async fn stream_events(
    mut read: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
    mut rx: broadcast::Receiver<Arc<[u8]>>,
    slot: &Slot,
) -> std::io::Result<()> {
    let hello = Reply::from(Answer::Monitor { monitor: true }).line();
    if slot.busy(write.write_all(&hello)).await.is_none() {
        return Ok(());
    }
    let mut ignored = [0u8; 64];
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            // A client that left is noticed now, not at the next event.
            _ = read.read(&mut ignored) => return Ok(()),
        };
        let line = match event {
            Ok(l) => l,
            Err(broadcast::error::RecvError::Lagged(lost)) => {
                line(&StreamLine::Lost { lost }).into()
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        match slot.busy(write.write_all(&line)).await {
            Some(r) => r?,
            None => return Ok(()),
        }
    }
}

/// The reply to `op`; `monitor` is no question, its connection turns into a stream.
fn answer(op: Op, paths: &InstancePaths, started: Instant) -> Reply {
    let pid = std::process::id();
    match op {
        Op::Ping => Answer::Ping { pid }.into(),
        Op::Status => files::read_meta(paths)
            .map(|meta| Answer::Status {
                pid,
                uptime_secs: started.elapsed().as_secs(),
                meta: meta.map(Box::new),
            })
            .into(),
        Op::Stats => stats::stats(paths)
            .map(|s| Answer::Stats { stats: Box::new(s) })
            .into(),
        Op::Monitor => Reply::error(&"`monitor` follows events on a connection of its own"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_keep_their_wire_form() {
        let ping: Request = serde_json::from_str(r#"{"op":"ping"}"#).unwrap();
        assert_eq!(ping.op, Op::Ping);
        assert_eq!(
            line(&Request { op: Op::Monitor }),
            b"{\"op\":\"monitor\"}\n"
        );
        for bad in [
            r#"{"op":"reboot"}"#,
            r#"{"op":"ping","x":1}"#,
            "{}",
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Reply::error(&"the agent is busy: every control connection is in use").line(),
            LIMITS.busy_reply
        );
        assert_eq!(
            Reply::from(Answer::Monitor { monitor: true }).line(),
            b"{\"ok\":true,\"monitor\":true}\n"
        );
        let status = Reply::from(Answer::Status {
            pid: 7,
            uptime_secs: 3,
            meta: None,
        });
        let v: serde_json::Value = serde_json::from_slice(&status.line()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": true, "pid": 7, "uptimeSecs": 3, "meta": null})
        );
        let back: Reply = serde_json::from_slice(&status.line()).unwrap();
        assert!(matches!(back.answer, Answer::Status { pid: 7, .. }));
        let back: Reply = serde_json::from_str(r#"{"ok":true,"pid":9}"#).unwrap();
        assert!(matches!(back.answer, Answer::Ping { pid: 9 }));
        assert_eq!(
            line(&StreamLine::Lost { lost: 4 }),
            b"{\"lost\":4}\n",
            "what a monitor that fell behind reads"
        );
    }
}
