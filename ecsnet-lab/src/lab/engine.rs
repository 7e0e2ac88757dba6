//! The real-engine lab (`lab up --docker`): Debian's dockerd 20.10 started in the lab's host
//! namespace with folders, socket, pid file, config and cgroup parent of its own, an image
//! imported from a busybox-static root filesystem, and containers with ECS labels and
//! published ports running the lab's echo server. `clean` removes all of it, including what
//! dockerd makes outside its folders (SPEC §11).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, umount2},
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};

use ecsnet::{host::netns, state::Protocol, store::paths::lab_dir};

use super::{LabError, LabPort, LabStatus, LabTask, io, topology};

pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// Debian's client, of dockerd's own version (/usr/local/bin/docker may be a newer one).
pub const DOCKER: &str = "/usr/bin/docker";
pub const BUSYBOX: &str = "/bin/busybox";
pub const IMAGE: &str = "ecsnet-lab/busybox:1";
/// Where a container finds the lab's echo server (this binary, mounted read-only).
pub const SERVER: &str = "/ecsnet-lab";
/// The label that marks a container as one of the lab's tasks; its value is the lab's name.
pub const LAB_LABEL: &str = "ecsnet.lab";
/// The ECS agent's labels (SPEC §7).
pub const TASK_ARN: &str = "com.amazonaws.ecs.task-arn";
pub const CONTAINER_NAME: &str = "com.amazonaws.ecs.container-name";
pub const FAMILY: &str = "com.amazonaws.ecs.task-definition-family";
pub const VERSION: &str = "com.amazonaws.ecs.task-definition-version";
pub const CLUSTER: &str = "com.amazonaws.ecs.cluster";
/// busybox applets the image links, for a look inside a container (`docker exec`).
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "ps", "kill", "sleep", "ip", "ping", "nc", "wget", "netstat",
];
const DOCKERD_START: Duration = Duration::from_secs(30);
const CONTAINER_START: Duration = Duration::from_secs(15);
/// How long a `docker` command may take before the lab gives up on it.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// /run folders dockerd and containerd make outside their own (SPEC §11).
pub const RUN_DIRS: &[&str] = &[
    "/run/docker",
    "/run/docker/plugins",
    "/run/containerd",
    "/run/containerd/s",
];
/// Where containerd-shim-runc-v2 puts its sockets: `s/<sha256(address/namespace/id)>`.
const SHIM_SOCKETS: &str = "/run/containerd/s";
const CONTAINERD_NAMESPACE: &str = "moby";

/// The folders and files of one lab's dockerd, all inside the lab's directory.
#[derive(Debug, Clone)]
pub struct EnginePaths {
    pub root: PathBuf,
}

impl EnginePaths {
    pub fn new(lab: &str) -> Self {
        EnginePaths {
            root: lab_dir(lab).join("docker"),
        }
    }
    pub fn data_root(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn exec_root(&self) -> PathBuf {
        self.root.join("exec")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("docker.sock")
    }
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    fn pidfile(&self) -> PathBuf {
        self.root.join("dockerd.pid")
    }
    fn config(&self) -> PathBuf {
        self.root.join("daemon.json")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("dockerd.log")
    }
    fn record(&self) -> PathBuf {
        self.root.join("engine.json")
    }
    /// The socket dockerd's own containerd listens on; its shims name it in `-address`.
    fn containerd_socket(&self) -> PathBuf {
        self.exec_root().join("containerd/containerd.sock")
    }
}

/// The cgroup parent of a lab's containers: relative, so under dockerd's own cgroup in every
/// hierarchy that puts it below the root.
pub fn cgroup_parent(lab: &str) -> String {
    format!("ecsnet-lab-{lab}")
}

/// What `clean` needs even when `up` stopped half way, written before dockerd starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    cgroup_parent: String,
    userland_proxy: bool,
    /// Dual stack (`lab up --docker --ipv6`): Docker's `ipv6`, `fixed-cidr-v6` and
    /// `ip6tables`.
    #[serde(default)]
    ipv6: bool,
    /// The echo server the containers run: the `ecsnet-lab` binary that built the lab.
    server: PathBuf,
    /// The folders of `RUN_DIRS` that did not exist before this lab's dockerd started.
    made_run_dirs: Vec<PathBuf>,
}

/// The `docker` object of `lab status --json` for a real-engine lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DockerStatus {
    /// `unix://...`, for `docker -H` and the Engine API.
    pub socket: String,
    pub pid: i32,
    pub data_root: PathBuf,
    pub exec_root: PathBuf,
    pub cgroup_parent: String,
    pub version: String,
    pub userland_proxy: bool,
    pub image: String,
    /// The running containers of the lab, in the order of `tasks`.
    pub containers: Vec<LabContainer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabContainer {
    /// The task (in `tasks`) this container is.
    pub task: String,
    pub id: String,
    pub name: String,
    /// Its first process, whose /proc/PID/ns/net is the container's namespace.
    pub pid: i32,
    pub labels: BTreeMap<String, String>,
}

/// `lab status --json` of a real-engine lab: the lab's fields and `docker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStatus {
    #[serde(flatten)]
    pub lab: LabStatus,
    pub docker: DockerStatus,
}

/// One container to run on a lab.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// Published ports; `host_port` 0 lets Docker pick one (`-p CONTAINERPORT`).
    pub ports: Vec<LabPort>,
    /// What the echo server listens on: every container port of `ports` when empty, and
    /// 80/tcp when that is empty too.
    pub serve: Vec<(Protocol, u16)>,
    /// The host address every port is published on (`-p 0.0.0.0:8080:80`, `-p [::]:8080:80`:
    /// one family only); None: Docker's default, both families.
    pub publish_on: Option<IpAddr>,
}

impl ContainerSpec {
    /// A container of an ECS task named `name` on lab `lab`: the ECS agent's labels, these
    /// ports.
    pub fn task(lab: &str, name: &str, ports: Vec<LabPort>) -> Self {
        ContainerSpec {
            name: name.to_owned(),
            labels: ecs_labels(lab, name),
            ports,
            serve: Vec::new(),
            publish_on: None,
        }
    }

    fn served(&self) -> Vec<(Protocol, u16)> {
        let mut s = if self.serve.is_empty() {
            self.ports
                .iter()
                .map(|p| (p.protocol, p.container_port))
                .collect()
        } else {
            self.serve.clone()
        };
        if s.is_empty() {
            s.push((Protocol::Tcp, super::DEFAULT_CONTAINER_PORT));
        }
        s.sort();
        s.dedup();
        s
    }
}

/// The labels the ECS agent gives a container of task `task` in cluster `lab` (one container
/// per task: the task's ARN ends in an id made from the two names).
pub fn ecs_labels(lab: &str, task: &str) -> Vec<(String, String)> {
    let id = format!(
        "{:016x}{:016x}",
        fnv64(&[lab, "/", task]),
        fnv64(&[task, "/", lab])
    );
    [
        (
            TASK_ARN,
            format!("arn:aws:ecs:us-east-1:123456789012:task/{lab}/{id}"),
        ),
        (CONTAINER_NAME, task.to_owned()),
        (FAMILY, task.to_owned()),
        (VERSION, "1".to_owned()),
        (CLUSTER, lab.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// FNV-1a of the concatenated `parts`.
fn fnv64(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Whether lab `lab` is a real-engine lab (has, or had, a dockerd of its own).
pub fn is_engine(lab: &str) -> bool {
    EnginePaths::new(lab).root.exists()
}

/// `docker -H unix://<the lab's socket>`, with nothing more.
pub fn docker(lab: &str) -> Command {
    let mut cmd = Command::new(DOCKER);
    cmd.arg("-H").arg(EnginePaths::new(lab).url());
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to its end, killed after `limit`.
fn bounded(mut cmd: Command, what: &str, limit: Duration) -> Result<Output, LabError> {
    let failed = |stderr: String| LabError::Command {
        cmd: what.to_owned(),
        stderr,
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let deadline = Instant::now() + limit;
    // Readers on threads of their own, so a full pipe cannot stall the child.
    let out = child.stdout.take().map(read_all);
    let err = child.stderr.take().map(read_all);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| failed(e.to_string()))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!("no answer after {} s", limit.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Output {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

fn read_all(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// `docker ARGS` on lab `lab`; its stdout, or an error with its stderr.
pub fn docker_ok(lab: &str, args: &[&str]) -> Result<String, LabError> {
    let mut cmd = docker(lab);
    cmd.args(args);
    let what = format!("docker {}", args.join(" "));
    let out = bounded(cmd, &what, CLI_TIMEOUT)?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: what,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn missing(tool: &'static str, hint: &'static str) -> LabError {
    LabError::MissingTool { tool, hint }
}

/// Fails with what to install when a program the real-engine lab runs is missing.
pub(super) fn check_tools() -> Result<(), LabError> {
    let hint = "apt-get install docker.io (./x setup installs it)";
    for (path, tool) in [(DOCKERD, "dockerd"), (DOCKER, "docker")] {
        if !Path::new(path).is_file() {
            return Err(missing(tool, hint));
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        return Err(missing(
            "busybox",
            "apt-get install busybox-static (./x setup installs it)",
        ));
    }
    for tool in ["nsenter", "tar", "sha256sum"] {
        if which::which(tool).is_err() {
            return Err(missing(
                "nsenter, tar or sha256sum",
                "apt-get install util-linux tar coreutils",
            ));
        }
    }
    Ok(())
}

/// The last `n` lines of dockerd's log.
fn log_tail(paths: &EnginePaths, n: usize) -> String {
    let log = fs::read_to_string(paths.log()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts the lab's dockerd in the namespace `host` with `nsenter --net` and waits until it
/// answers.
pub(super) fn start(
    lab: &str,
    host: &str,
    userland_proxy: bool,
    ipv6: bool,
) -> Result<(), LabError> {
    let paths = EnginePaths::new(lab);
    for dir in [paths.data_root(), paths.exec_root()] {
        fs::create_dir_all(&dir).map_err(io(&dir))?;
    }
    let record = Record {
        cgroup_parent: cgroup_parent(lab),
        userland_proxy,
        ipv6,
        server: server_exe()?,
        made_run_dirs: RUN_DIRS
            .iter()
            .map(PathBuf::from)
            .filter(|d| !d.exists())
            .collect(),
    };
    write_json(&paths.record(), &record)?;
    launch(lab, host, &record)
}

/// Starts the lab's dockerd as `start` first did (its record kept, so `lab down` still
/// removes the /run folders the first start made), after stopping it if it runs: Docker's
/// own restart, which with live-restore off stops the containers (`docker start` brings them
/// back).
pub fn restart(lab: &str, host: &str) -> Result<(), LabError> {
    stop_dockerd(lab)?;
    start_again(lab, host)
}

/// Stops the lab's dockerd with SIGTERM, as a service manager does, and waits (20 s at most)
/// until it is gone; it stops its containers and its containerd on the way.
pub fn stop_dockerd(lab: &str) -> Result<(), LabError> {
    let paths = EnginePaths::new(lab);
    let Some(pid) = dockerd_pid(&paths) else {
        return Ok(());
    };
    let _ = kill(pid, Signal::SIGTERM);
    if !wait_gone(&[pid], Duration::from_secs(20)) {
        return Err(LabError::Command {
            cmd: format!("kill -TERM {pid} (dockerd of lab {lab})"),
            stderr: "still running 20 s later".to_owned(),
        });
    }
    Ok(())
}

/// Starts the lab's dockerd again, stopped by `stop_dockerd`, in namespace `host`.
pub fn start_again(lab: &str, host: &str) -> Result<(), LabError> {
    let record = read_record(&EnginePaths::new(lab))?;
    launch(lab, host, &record)
}

/// Writes dockerd's config, starts it in namespace `host` and waits until it answers.
fn launch(lab: &str, host: &str, record: &Record) -> Result<(), LabError> {
    let paths = EnginePaths::new(lab);
    let userland_proxy = record.userland_proxy;
    let mut config = serde_json::json!({
        // Without it dockerd 20.10 writes /etc/docker/key.json.
        "deprecated-key-path": paths.root.join("key.json"),
        "bip": format!("{}/{}", super::BRIDGE_ADDR, super::BRIDGE_PREFIX),
        "userland-proxy": userland_proxy,
    });
    if record.ipv6 {
        // 20.10 writes ip6tables rules (NAT66 included) only as an experimental feature.
        config["ipv6"] = true.into();
        config["fixed-cidr-v6"] = super::BRIDGE_SUBNET6.into();
        config["experimental"] = true.into();
        config["ip6tables"] = true.into();
    }
    write_json(&paths.config(), &config)?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns::path(host).display()))
        .arg(DOCKERD)
        .arg("--data-root")
        .arg(paths.data_root())
        .arg("--exec-root")
        .arg(paths.exec_root())
        .arg("-H")
        .arg(paths.url())
        .arg("--pidfile")
        .arg(paths.pidfile())
        .arg("--config-file")
        .arg(paths.config())
        .arg("--cgroup-parent")
        .arg(&record.cgroup_parent);
    let mut child = super::spawn_detached(cmd, &paths.log(), "nsenter dockerd")?;
    let deadline = Instant::now() + DOCKERD_START;
    loop {
        let last = match docker_ok(lab, &["version", "--format", "{{.Server.Version}}"]) {
            Ok(_) => break,
            Err(e) => e.to_string(),
        };
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            return Err(LabError::Command {
                cmd: format!("dockerd in {host}"),
                stderr: format!(
                    "{} ({last}); the end of {}:\n{}",
                    exited.map_or_else(
                        || format!("not answering after {} s", DOCKERD_START.as_secs()),
                        |s| format!("exited with {s}")
                    ),
                    paths.log().display(),
                    log_tail(&paths, 15)
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Reap it if it ends while this process runs; after that it belongs to init.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), LabError> {
    let text = serde_json::to_string_pretty(value).expect("lab records serialize");
    fs::write(path, text + "\n").map_err(io(path))
}

/// Builds the busybox root filesystem (busybox, its applets, and the shared libraries the
/// lab's echo server needs) and imports it as `IMAGE`.
pub(super) fn import_image(lab: &str) -> Result<(), LabError> {
    let paths = EnginePaths::new(lab);
    let rootfs = paths.root.join("rootfs");
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin).map_err(io(&bin))?;
    let busybox = bin.join("busybox");
    fs::copy(BUSYBOX, &busybox).map_err(io(&busybox))?;
    for applet in APPLETS {
        let link = bin.join(applet);
        std::os::unix::fs::symlink("busybox", &link).map_err(io(&link))?;
    }
    for lib in shared_libraries(&read_record(&paths)?.server)? {
        let to = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        fs::copy(&lib, &to).map_err(io(&to))?;
    }
    let tarball = paths.root.join("rootfs.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .output()
        .map_err(io(&tarball))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("tar -cf {}", tarball.display()),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    docker_ok(lab, &["import", &tarball.to_string_lossy(), IMAGE])?;
    let _ = fs::remove_file(&tarball);
    Ok(())
}

/// This binary, `ecsnet-lab` (`lab up` runs in it): the echo server every container runs.
fn server_exe() -> Result<PathBuf, LabError> {
    std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))
}

/// The shared libraries `exe` loads, as `ldd` lists them (the loader included).
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, LabError> {
    let out = Command::new("ldd").arg(exe).output().map_err(io(exe))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("ldd {}", exe.display()),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-... (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// `docker run` of `spec` on lab `lab`; returns the container's id once its echo server
/// listens.
pub fn run(lab: &str, spec: &ContainerSpec) -> Result<String, LabError> {
    let paths = EnginePaths::new(lab);
    let exe = read_record(&paths)?.server;
    let mut args: Vec<String> = ["run", "-d", "--init", "--name", &spec.name]
        .map(str::to_owned)
        .to_vec();
    args.extend(["--label".into(), format!("{LAB_LABEL}={lab}")]);
    for (k, v) in &spec.labels {
        args.extend(["--label".into(), format!("{k}={v}")]);
    }
    // Docker's spelling of a host address before the ports: `0.0.0.0:`, `[::]:`.
    let on = match spec.publish_on {
        None => String::new(),
        Some(IpAddr::V4(a)) => format!("{a}:"),
        Some(IpAddr::V6(a)) => format!("[{a}]:"),
    };
    for p in &spec.ports {
        let proto = p.protocol.as_str();
        let publish = match (p.host_port, on.as_str()) {
            (0, "") => format!("{}/{proto}", p.container_port),
            (0, on) => format!("{on}:{}/{proto}", p.container_port),
            (host, on) => format!("{on}{host}:{}/{proto}", p.container_port),
        };
        args.extend(["-p".into(), publish]);
    }
    args.extend([
        "-v".into(),
        format!("{}:{SERVER}:ro", exe.display()),
        IMAGE.into(),
        SERVER.into(),
        "lab".into(),
        "serve".into(),
    ]);
    for (proto, port) in spec.served() {
        args.extend([format!("--{}", proto.as_str()), port.to_string()]);
    }
    let run_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = docker_ok(lab, &run_args)?;
    // Up when its server says it listens (its stdout is in Docker's json-file log).
    let log = paths
        .data_root()
        .join("containers")
        .join(&id)
        .join(format!("{id}-json.log"));
    let deadline = Instant::now() + CONTAINER_START;
    let mut round = 0_u32;
    loop {
        round += 1;
        if fs::read_to_string(&log).is_ok_and(|l| l.contains("serving echo")) {
            return Ok(id);
        }
        let state = || {
            docker_ok(lab, &["inspect", "--format", "{{json .State}}", &id])
                .unwrap_or_else(|e| e.to_string())
        };
        let exited = round.is_multiple_of(10) && !state().contains(r#""Running":true"#);
        if exited || Instant::now() > deadline {
            return Err(LabError::Command {
                cmd: format!("docker run {}", spec.name),
                stderr: format!(
                    "its echo server did not listen{}; state {}; log {}",
                    if exited {
                        String::new()
                    } else {
                        format!(" within {} s", CONTAINER_START.as_secs())
                    },
                    state(),
                    fs::read_to_string(&log).unwrap_or_default().trim()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `docker stop -t SECONDS NAME`.
pub fn stop(lab: &str, name: &str, seconds: u32) -> Result<(), LabError> {
    docker_ok(lab, &["stop", "-t", &seconds.to_string(), name]).map(drop)
}

/// `docker rm -f NAME`.
pub fn rm(lab: &str, name: &str) -> Result<(), LabError> {
    docker_ok(lab, &["rm", "-f", name]).map(drop)
}

/// What `docker inspect` says of a container, the part the lab reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspect {
    id: String,
    name: String,
    created: String,
    state: InspectState,
    config: InspectConfig,
    network_settings: InspectNet,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectState {
    pid: i32,
    running: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectConfig {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectNet {
    #[serde(default)]
    networks: BTreeMap<String, InspectEndpoint>,
    #[serde(default)]
    ports: Option<BTreeMap<String, Option<Vec<InspectBinding>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectEndpoint {
    #[serde(rename = "IPAddress")]
    ip_address: String,
    /// Empty without IPv6.
    #[serde(rename = "GlobalIPv6Address", default)]
    global_ipv6_address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InspectBinding {
    host_ip: String,
    host_port: String,
}

/// The port mappings Docker bound for a container: one per container port and protocol and
/// host port (its IPv4 and `[::]` bindings are one mapping).
fn bound_ports(ports: &BTreeMap<String, Option<Vec<InspectBinding>>>) -> Vec<LabPort> {
    let mut out = Vec::new();
    for (key, bindings) in ports {
        // "80/tcp"; Docker lists exposed ports it bound nothing for with no bindings.
        let (Ok((port, protocol)), Some(bindings)) = (Protocol::split_suffix(key), bindings) else {
            continue;
        };
        let Ok(container_port) = port.parse::<u16>() else {
            continue;
        };
        for b in bindings {
            let Ok(host_port) = b.host_port.parse::<u16>() else {
                continue;
            };
            let p = LabPort {
                host_port,
                container_port,
                protocol,
            };
            if !b.host_ip.is_empty() && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out.sort_by_key(|p| (p.host_port, p.protocol));
    out
}

/// The lab's running containers as tasks (address and ports from Docker, the host's veth
/// through the container's namespace), in the order they were created.
pub fn tasks(lab: &str, host: &str) -> Result<(Vec<LabTask>, Vec<LabContainer>), LabError> {
    let filter = format!("label={LAB_LABEL}={lab}");
    let ids = docker_ok(lab, &["ps", "-q", "--no-trunc", "--filter", &filter])?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut args = vec!["inspect"];
    args.extend(&ids);
    let text = docker_ok(lab, &args)?;
    let mut found: Vec<Inspect> =
        serde_json::from_str(&text).map_err(|source| LabError::Corrupt {
            path: PathBuf::from("docker inspect"),
            source,
        })?;
    found.retain(|c| c.state.running && c.state.pid > 0);
    found.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
    let mut tasks = Vec::new();
    let mut containers = Vec::new();
    for c in found {
        let name = c.name.trim_start_matches('/').to_owned();
        let Some(bridge) = c.network_settings.networks.get("bridge") else {
            // Not on the default bridge: not a task of this lab's shape.
            continue;
        };
        let Ok(address) = bridge.ip_address.parse::<Ipv4Addr>() else {
            continue;
        };
        let address6 = bridge.global_ipv6_address.parse::<Ipv6Addr>().ok();
        let (interface, _) = topology::host_peer(c.state.pid, "eth0", host)?;
        tasks.push(LabTask {
            name: name.clone(),
            netns: String::new(),
            address,
            address6,
            interface,
            port_mappings: c
                .network_settings
                .ports
                .as_ref()
                .map(bound_ports)
                .unwrap_or_default(),
        });
        containers.push(LabContainer {
            task: name.clone(),
            id: c.id,
            name,
            pid: c.state.pid,
            labels: c.config.labels.unwrap_or_default(),
        });
    }
    Ok((tasks, containers))
}

/// The `docker` object of the lab's status, with `containers`.
pub(super) fn docker_status(
    lab: &str,
    containers: Vec<LabContainer>,
) -> Result<DockerStatus, LabError> {
    let paths = EnginePaths::new(lab);
    let record = read_record(&paths)?;
    let version = docker_ok(lab, &["version", "--format", "{{.Server.Version}}"])?;
    Ok(DockerStatus {
        socket: paths.url(),
        pid: dockerd_pid(&paths).map_or(0, Pid::as_raw),
        data_root: paths.data_root(),
        exec_root: paths.exec_root(),
        cgroup_parent: record.cgroup_parent,
        version,
        userland_proxy: record.userland_proxy,
        image: IMAGE.to_owned(),
        containers,
    })
}

fn read_record(paths: &EnginePaths) -> Result<Record, LabError> {
    let path = paths.record();
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|source| LabError::Corrupt { path, source })
}

/// The pid in dockerd's pid file, if that process is this lab's dockerd.
fn dockerd_pid(paths: &EnginePaths) -> Option<Pid> {
    let pid: i32 = fs::read_to_string(paths.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let args = cmdline(pid)?;
    let ours = args.iter().any(|a| *a == paths.url());
    ours.then_some(Pid::from_raw(pid))
}

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Every process of the lab's engine: its dockerd, and the processes that name its folders
/// (its containerd, the shims) and all their descendants (docker-proxy, the containers'
/// processes), and the processes in its containers' cgroups.
pub fn processes(lab: &str) -> Vec<Pid> {
    let paths = EnginePaths::new(lab);
    let root = paths.root.to_string_lossy().into_owned();
    let mut table: Vec<(i32, i32)> = Vec::new();
    let mut ours: Vec<i32> = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(parent) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
        else {
            continue;
        };
        table.push((pid, parent));
        if cmdline(pid).is_some_and(|a| a.iter().any(|a| a.contains(&root))) {
            ours.push(pid);
        }
    }
    for dir in cgroup_dirs(&cgroup_parent(lab)) {
        for procs in walk_dirs(&dir) {
            let text = fs::read_to_string(procs.join("cgroup.procs")).unwrap_or_default();
            ours.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    // Descendants, until no new one turns up.
    loop {
        let more: Vec<i32> = table
            .iter()
            .filter(|(pid, ppid)| ours.contains(ppid) && !ours.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            break;
        }
        ours.extend(more);
    }
    ours.sort_unstable();
    ours.dedup();
    ours.retain(|p| *p != std::process::id().cast_signed());
    ours.into_iter().map(Pid::from_raw).collect()
}

/// `dir` and every folder below it, deepest first.
fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk_dirs(&e.path()));
        }
    }
    out.push(dir.to_owned());
    out
}

/// The folders named `name` in every cgroup hierarchy mounted (at most 4 levels down: the
/// parent sits under dockerd's own cgroup, e.g. memory's `/process_api/<id>`).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    fn find(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            } else if depth > 0 {
                find(&e.path(), name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    for m in mounts() {
        if m.fstype == "cgroup" || m.fstype == "cgroup2" {
            find(&m.point, name, 3, &mut out);
        }
    }
    out
}

struct Mount {
    point: PathBuf,
    fstype: String,
}

/// /proc/self/mountinfo: mount point (field 5) and type (after the " - ").
fn mounts() -> Vec<Mount> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?.replace("\\040", " ");
            Some(Mount {
                point: PathBuf::from(point),
                fstype: right.split(' ').next()?.to_owned(),
            })
        })
        .collect()
}

/// What `clean` did.
#[derive(Debug, Default)]
pub struct EngineDown {
    pub killed: usize,
    pub unmounted: usize,
    pub removed: Vec<PathBuf>,
}

/// Takes the lab's engine down: every container removed and dockerd stopped (SIGTERM, so it
/// stops its containerd and unmounts), then whatever is left killed, unmounted and removed:
/// its processes, mounts under its folders, the shim sockets and /run folders it made, and its
/// cgroups. Safe on a half-built lab.
pub(super) fn clean(lab: &str) -> EngineDown {
    let paths = EnginePaths::new(lab);
    let mut report = EngineDown::default();
    let record = read_record(&paths).unwrap_or_else(|_| Record {
        cgroup_parent: cgroup_parent(lab),
        ..Record::default()
    });
    // The containers' ids, for their shim sockets, before anything goes.
    let ids: Vec<String> = fs::read_dir(paths.data_root().join("containers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    if let Some(pid) = dockerd_pid(&paths) {
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker_ok(lab, &args);
        }
        let _ = kill(pid, Signal::SIGTERM);
        wait_gone(&[pid], Duration::from_secs(20));
    }
    let left = processes(lab);
    report.killed = left
        .iter()
        .filter(|&&p| kill(p, Signal::SIGKILL).is_ok())
        .count();
    wait_gone(&left, Duration::from_secs(10));
    report.unmounted = unmount_below(&paths.root);
    for id in &ids {
        if let Some(socket) = shim_socket(&paths, id)
            && fs::remove_file(&socket).is_ok()
        {
            report.removed.push(socket);
        }
    }
    // The /run folders it made, when no other dockerd or containerd may use them.
    let others = other_engines_run();
    for dir in record.made_run_dirs.iter().rev() {
        let shared = dir.starts_with("/run/docker") && others.0
            || dir.starts_with("/run/containerd") && others.1;
        if !shared && fs::remove_dir(dir).is_ok() {
            report.removed.push(dir.clone());
        }
    }
    for dir in cgroup_dirs(&record.cgroup_parent) {
        for d in walk_dirs(&dir) {
            if fs::remove_dir(&d).is_ok() {
                report.removed.push(d);
            }
        }
    }
    report
}

/// Whether a dockerd, and a containerd, runs now: after a lab's are gone, someone else's.
pub fn other_engines_run() -> (bool, bool) {
    let mut found = (false, false);
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        match comm.trim() {
            "dockerd" => found.0 = true,
            c if c.starts_with("containerd") => found.1 = true,
            _ => {}
        }
    }
    found
}

/// The socket containerd-shim-runc-v2 makes for container `id` of lab `lab`'s containerd
/// (whether it exists or not).
pub fn shim_socket_path(lab: &str, id: &str) -> Option<PathBuf> {
    shim_socket(&EnginePaths::new(lab), id)
}

/// The socket containerd-shim-runc-v2 makes for container `id` of this lab's containerd.
fn shim_socket(paths: &EnginePaths, id: &str) -> Option<PathBuf> {
    let key = Path::new(&paths.containerd_socket())
        .join(CONTAINERD_NAMESPACE)
        .join(id);
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()?
        .write_all(key.as_os_str().as_encoded_bytes())
        .ok()?;
    let out = child.wait_with_output().ok()?;
    let hash = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()?
        .to_owned();
    Some(Path::new(SHIM_SOCKETS).join(hash))
}

/// Unmounts (lazily) every mount at or below `dir`, deepest first; how many went.
fn unmount_below(dir: &Path) -> usize {
    let mut points: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
        .iter()
        .filter(|p| umount2(p.as_path(), MntFlags::MNT_DETACH).is_ok())
        .count()
}

/// Waits until none of `pids` exists (or has become a zombie), at most `limit`; whether they
/// are gone.
pub(super) fn wait_gone(pids: &[Pid], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let alive = pids.iter().any(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
                .unwrap_or(false)
        });
        if !alive {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Human-readable status of a real-engine lab.
pub fn render(s: &EngineStatus) -> String {
    let d = &s.docker;
    let mut out = super::render(&s.lab);
    let _ = writeln!(
        out,
        "dockerd {} (pid {}, userland-proxy {}) at {}, data-root {}",
        d.version,
        d.pid,
        d.userland_proxy,
        d.socket,
        d.data_root.display()
    );
    for c in &d.containers {
        let _ = writeln!(
            out,
            "  {:<8} container {}",
            c.task,
            &c.id[..12.min(c.id.len())]
        );
    }
    out
}

/// Leftovers of lab `lab`'s engine: its processes, mounts under its folders, its cgroup
/// folders. Empty once `lab down` is done.
pub fn leftovers(lab: &str) -> Vec<String> {
    let paths = EnginePaths::new(lab);
    let mut left: Vec<String> = processes(lab)
        .iter()
        .map(|p| {
            format!(
                "process {p} {}",
                cmdline(p.as_raw()).unwrap_or_default().join(" ")
            )
        })
        .collect();
    left.extend(
        mounts()
            .into_iter()
            .filter(|m| m.point.starts_with(&paths.root))
            .map(|m| format!("mount {}", m.point.display())),
    );
    left.extend(
        cgroup_dirs(&cgroup_parent(lab))
            .into_iter()
            .map(|d| format!("cgroup {}", d.display())),
    );
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_ports_merge_ipv4_and_ipv6() {
        let b = |ip: &str, port: &str| InspectBinding {
            host_ip: ip.into(),
            host_port: port.into(),
        };
        let ports = BTreeMap::from([
            (
                "80/tcp".to_owned(),
                Some(vec![b("0.0.0.0", "8080"), b("::", "8080")]),
            ),
            ("53/udp".to_owned(), Some(vec![b("0.0.0.0", "32768")])),
            ("81/tcp".to_owned(), None),
        ]);
        let got = bound_ports(&ports);
        assert_eq!(
            got.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["8080->80/tcp", "32768->53/udp"]
        );
    }

    #[test]
    fn ecs_labels_name_the_task() {
        let l: BTreeMap<_, _> = ecs_labels("lab", "task1").into_iter().collect();
        let arn = &l[TASK_ARN];
        let id = arn.rsplit('/').next().unwrap();
        assert!(arn.starts_with("arn:aws:ecs:us-east-1:123456789012:task/lab/"));
        assert_eq!(id.len(), 32);
        assert_ne!(
            ecs_labels("lab", "task2")[0].1,
            *arn,
            "each task its own ARN"
        );
        assert_eq!(l[CLUSTER], "lab");
        assert_eq!(l[CONTAINER_NAME], "task1");
    }
}
