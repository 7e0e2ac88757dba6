//! Following the engine: connect, list and inspect every container, then the event stream; on
//! any error or the stream's end, disconnected with the error, a retry with backoff and, once
//! connected again, a full re-list (the event stream is not a log that can be replayed).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bollard::{
    Docker,
    errors::Error as DockerError,
    models::{EventMessage, EventMessageTypeEnum},
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
};
use futures::StreamExt as _;
use tokio::sync::oneshot;

use super::{
    Cause, Discovered, EngineStatus, Found, Seen, Skip,
    client::{self, Networks, UrlError},
    identity,
};

/// The first retry's wait; it doubles after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The events that can change a container's place in the view; `kill` is left out (the
/// container still runs; its `die` follows).
const CONTAINER_EVENTS: [&str; 5] = ["start", "die", "stop", "destroy", "rename"];
const NETWORK_EVENTS: [&str; 2] = ["connect", "disconnect"];

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("docker follower: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Why a connection to the engine ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Docker(#[from] DockerError),
    #[error("netlink socket: {0}")]
    Netlink(std::io::Error),
    #[error("the event stream ended")]
    StreamEnded,
}

/// The running follower: its status, and its thread, stopped and joined on drop.
pub struct Engine {
    status: Arc<Mutex<EngineStatus>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    pub fn status(&self) -> EngineStatus {
        lock(&self.status).clone()
    }

    /// Stops following and waits for the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Gone only when the thread already ended.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic in `on_change` ended the thread; it was reported when it happened.
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.halt();
    }
}

fn lock(status: &Mutex<EngineStatus>) -> std::sync::MutexGuard<'_, EngineStatus> {
    status.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts following the engine at `url` on a thread of its own; `bridge` is the host bridge
/// device whose containers are tasks (`docker0` for Docker's default network). `on_change` runs
/// on that thread with the whole view after every change (the first time after the first list).
/// Call it from the agent's network namespace: veths are looked up in the caller's.
pub fn spawn<F>(url: &str, bridge: &str, on_change: F) -> Result<Engine, SpawnError>
where
    F: FnMut(&Discovered) + Send + 'static,
{
    let socket = client::parse_url(url)?.display().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| SpawnError::Io {
            what: "tokio runtime",
            source,
        })?;
    let status = Arc::new(Mutex::new(EngineStatus {
        socket: socket.clone(),
        connected: false,
        since: SystemTime::now(),
        last_error: None,
        api_version: None,
        events: 0,
        relists: 0,
        reconnects: 0,
    }));
    let mut follower = Follower {
        socket,
        bridge: bridge.to_owned(),
        on_change,
        status: status.clone(),
        view: Discovered::default(),
        networks: Networks::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("ecsnet-docker".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    _ = stopped => {}
                    () = follower.run() => {}
                }
            });
        })
        .map_err(|source| SpawnError::Io {
            what: "thread",
            source,
        })?;
    Ok(Engine {
        status,
        stop: Some(stop),
        thread: Some(thread),
    })
}

struct Follower<F> {
    socket: String,
    bridge: String,
    on_change: F,
    status: Arc<Mutex<EngineStatus>>,
    view: Discovered,
    networks: Networks,
}

/// `since` as the events API takes it: seconds and nanoseconds since the epoch.
fn since_arg(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

fn not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl<F: FnMut(&Discovered)> Follower<F> {
    /// Connects, follows, and after each failure waits and connects again: never returns.
    async fn run(&mut self) {
        let mut backoff = FIRST_BACKOFF;
        let mut failures = 0u64;
        loop {
            let error = self.session(&mut backoff).await;
            self.disconnected(&error, failures);
            failures += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: list, then events until something fails.
    async fn session(&mut self, backoff: &mut Duration) -> SessionError {
        match self.follow(backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn follow(
        &mut self,
        backoff: &mut Duration,
    ) -> Result<std::convert::Infallible, SessionError> {
        let docker = client::connect(&self.socket).await?;
        let (conn, host, _) = rtnetlink::new_connection().map_err(SessionError::Netlink)?;
        let conn = AbortOnDrop(tokio::spawn(conn));
        // Events since before the list: what happens while listing comes again, harmlessly.
        let since = SystemTime::now();
        self.networks.reload(&docker).await?;
        self.relist(&docker, &host).await?;
        *backoff = FIRST_BACKOFF;
        // Connected before the new view is published: whoever sees it sees the status it came with.
        self.connected(&docker);
        self.changed();
        let filters = HashMap::from([
            (
                "type".to_owned(),
                vec!["container".into(), "network".into()],
            ),
            (
                "event".to_owned(),
                CONTAINER_EVENTS
                    .iter()
                    .chain(&NETWORK_EVENTS)
                    .map(|e| (*e).to_owned())
                    .collect(),
            ),
        ]);
        let options = EventsOptions {
            since: Some(since_arg(since)),
            until: None,
            filters: Some(filters),
        };
        let mut events = docker.events(Some(options));
        while let Some(event) = events.next().await {
            lock(&self.status).events += 1;
            self.event(&docker, &host, event?).await?;
        }
        drop(conn);
        Err(SessionError::StreamEnded)
    }

    /// Every container, inspected: the view is replaced whole (the caller publishes it).
    async fn relist(
        &mut self,
        docker: &Docker,
        host: &rtnetlink::Handle,
    ) -> Result<(), SessionError> {
        let options = ListContainersOptions {
            all: true,
            ..ListContainersOptions::default()
        };
        let mut containers = BTreeMap::new();
        for summary in docker.list_containers(Some(options)).await? {
            let Some(id) = summary.id else { continue };
            if let Some(seen) = self.identify(docker, host, &id).await? {
                containers.insert(id, seen);
            }
        }
        self.view.containers = containers;
        self.view.cause = None;
        Ok(())
    }

    async fn event(
        &mut self,
        docker: &Docker,
        host: &rtnetlink::Handle,
        event: EventMessage,
    ) -> Result<(), SessionError> {
        let action = event.action.as_deref().unwrap_or_default();
        let actor = event.actor.unwrap_or_default();
        let mut attributes = actor.attributes;
        let id = match event.typ {
            Some(EventMessageTypeEnum::CONTAINER) => actor.id,
            Some(EventMessageTypeEnum::NETWORK) => {
                attributes.take().and_then(|mut a| a.remove("container"))
            }
            _ => None,
        };
        let Some(id) = id else { return Ok(()) };
        // A container being started is connected first, and its inspect would wait for the
        // whole start (dockerd holds the container meanwhile), holding up every later event:
        // its start event finds it. Connects matter for running containers only.
        if action == "connect" && !self.running(&id) {
            return Ok(());
        }
        let at = event
            .time_nano
            .and_then(|n| u64::try_from(n).ok())
            .map_or_else(SystemTime::now, |n| UNIX_EPOCH + Duration::from_nanos(n));
        let cause = Cause {
            container: id.clone(),
            action: action.to_owned(),
            at,
        };
        // A container that died has no process, so no interface: no inspect needed (dockerd
        // may still hold it while it cleans up). A start that follows (restart policy) comes
        // after it in the stream.
        let seen = match action {
            "destroy" => None,
            "die" | "stop" => Some(Seen::Skipped {
                name: self.name_of(&id, attributes.as_ref()),
                why: Skip::NotRunning {
                    status: "exited".to_owned(),
                },
            }),
            _ => self.identify(docker, host, &id).await?,
        };
        if self.view.containers.get(&id) != seen.as_ref() {
            match seen {
                Some(seen) => self.view.containers.insert(id, seen),
                None => self.view.containers.remove(&id),
            };
            self.view.cause = Some(cause);
            self.changed();
        }
        Ok(())
    }

    /// A container's name: as the view has it, else as its event says.
    fn name_of(&self, id: &str, attributes: Option<&HashMap<String, String>>) -> String {
        match self.view.containers.get(id) {
            Some(Seen::Skipped { name, .. }) => name.clone(),
            Some(Seen::Task(found)) => found.container_name.clone(),
            None => attributes
                .and_then(|a| a.get("name"))
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// Whether the view has the container running (a task, or skipped for another reason).
    fn running(&self, id: &str) -> bool {
        match self.view.containers.get(id) {
            Some(Seen::Task(_)) => true,
            Some(Seen::Skipped { why, .. }) => !matches!(why, Skip::NotRunning { .. }),
            None => false,
        }
    }

    /// The container as it is now; None when it is gone.
    async fn identify(
        &mut self,
        docker: &Docker,
        host: &rtnetlink::Handle,
        id: &str,
    ) -> Result<Option<Seen>, SessionError> {
        let c = match docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => c,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut devices = BTreeMap::new();
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|s| s.networks.as_ref());
        for endpoint in networks.into_iter().flat_map(|n| n.values()) {
            let Some(net) = endpoint.network_id.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let device = match self.networks.device(docker, net).await {
                Ok(d) => d,
                Err(e) if not_found(&e) => None,
                Err(e) => return Err(e.into()),
            };
            devices.insert(net.to_owned(), device);
        }
        let name = identity::container_name(&c);
        let candidate = match identity::classify(&c, &devices, &self.bridge) {
            Ok(candidate) => candidate,
            Err(why) => return Ok(Some(Seen::Skipped { name, why })),
        };
        let veth = match identity::host_veth(host, candidate.pid, candidate.mac, &self.bridge).await
        {
            Ok(veth) => veth,
            Err(e) => {
                let why = Skip::NoVeth {
                    bridge: self.bridge.clone(),
                    why: e.to_string(),
                };
                return Ok(Some(Seen::Skipped { name, why }));
            }
        };
        let mut task = candidate.task;
        task.interface = Some(veth.name);
        Ok(Some(Seen::Task(Box::new(Found {
            task,
            container_name: name,
            ifindex: veth.ifindex,
            prefix: candidate.prefix,
            cluster: candidate.cluster,
            has_group_label: candidate.has_group_label,
            fail_closed: candidate.fail_closed,
            notes: candidate.notes,
        }))))
    }

    fn changed(&mut self) {
        self.view.generation += 1;
        (self.on_change)(&self.view);
    }

    fn connected(&mut self, docker: &Docker) {
        let mut s = lock(&self.status);
        s.relists += 1;
        if s.relists > 1 {
            s.reconnects += 1;
        }
        s.connected = true;
        s.since = SystemTime::now();
        s.api_version = Some(docker.client_version().to_string());
        let tasks = self.view.tasks().count();
        log::info!(
            "docker engine {}: connected (API {}), {} containers, {tasks} tasks",
            s.socket,
            docker.client_version(),
            self.view.containers.len()
        );
    }

    /// Says so once per outage in the log (later failures of the same outage at debug level).
    fn disconnected(&mut self, error: &SessionError, failures: u64) {
        let mut s = lock(&self.status);
        let was = s.connected;
        s.connected = false;
        s.last_error = Some(error.to_string());
        if was {
            s.since = SystemTime::now();
        }
        if was || failures == 0 {
            log::warn!(
                "docker engine {}: disconnected: {error}; keeping the {} known tasks, retrying",
                s.socket,
                self.view.tasks().count()
            );
        } else {
            log::debug!("docker engine {}: still unreachable: {error}", s.socket);
        }
    }
}

/// A spawned task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_seconds_and_nanoseconds() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5_000);
        assert_eq!(since_arg(t), "1700000000.000005000");
    }

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = FIRST_BACKOFF;
        let mut waits = Vec::new();
        for _ in 0..8 {
            waits.push(b.as_millis());
            b = (b * 2).min(MAX_BACKOFF);
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn a_missing_socket_is_a_disconnected_status_not_an_error() {
        let dir = std::env::temp_dir().join(format!("ecsnet-engine-{}", std::process::id()));
        let url = format!("unix://{}/none.sock", dir.display());
        let engine = spawn(&url, "docker0", |_| panic!("nothing to discover")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let status = loop {
            let s = engine.status();
            if s.last_error.is_some() || std::time::Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.connected);
        assert_eq!(status.relists, 0);
        let error = status.last_error.expect("an error within 5 s");
        assert!(error.contains("none.sock"), "{error}");
        engine.stop();
        assert!(matches!(
            spawn("tcp://127.0.0.1:2375", "docker0", |_| {}),
            Err(SpawnError::Url(_))
        ));
    }
}
