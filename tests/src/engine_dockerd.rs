//! A real Docker engine for one test (Debian's docker.io 20.10): its own network namespace,
//! entered with `nsenter --net` (never `ip netns exec`), and its own data root, exec root,
//! socket, pidfile, config file and cgroup parent, so nothing of the machine's own Docker is
//! touched. Dropping the guard (also on panic) removes every container, stops dockerd and its
//! containerd, and removes the mounts, cgroups, namespace and folders it made.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::unique;

/// Debian's docker.io: the client of the 20.10 engine (not /usr/local/bin/docker).
pub const DOCKER: &str = "/usr/bin/docker";
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// busybox-static's binary: the image's whole root filesystem.
const BUSYBOX: &str = "/bin/busybox";
/// How long dockerd may take to answer after it starts.
const START_WAIT: Duration = Duration::from_secs(30);
/// The image every test container runs, made by `docker import`.
pub const IMAGE: &str = "ecsnet-test/busybox:1";

/// Folders dockerd and its containerd make outside their own roots, removed when empty, only
/// when they were not there before and no other engine runs.
const OUTSIDE: [&str; 4] = [
    "/run/containerd/s",
    "/run/containerd",
    "/run/docker/plugins",
    "/run/docker",
];

pub struct Dockerd {
    pub ns: String,
    pub dir: PathBuf,
    cgroup: String,
    child: Option<Child>,
    made_outside: Vec<&'static str>,
}

impl Dockerd {
    /// Creates a namespace and starts dockerd in it; panics with dockerd's log when it does
    /// not answer within 30 s.
    pub fn start(tag: &str) -> Self {
        for tool in [DOCKER, DOCKERD, BUSYBOX] {
            assert!(
                Path::new(tool).is_file(),
                "{tool} is missing: apt-get install docker.io busybox-static (Debian's; the lab's set-up is to install them)"
            );
        }
        let name = unique(&format!("ecsd{tag}"));
        let dir = PathBuf::from(format!("/tmp/ecsnet-{name}"));
        std::fs::create_dir_all(&dir).expect("dockerd folder");
        let made_outside = OUTSIDE
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        let mut d = Dockerd {
            ns: name.clone(),
            dir,
            cgroup: format!("ecsnet-{name}"),
            child: None,
            made_outside,
        };
        run("ip", &["netns", "add", &d.ns]);
        run("ip", &["-n", &d.ns, "link", "set", "lo", "up"]);
        // Keeps /etc/docker/key.json (the machine's) out of reach. A short shutdown timeout:
        // the test's containers ignore SIGTERM (sleep as pid 1) and dockerd is stopped thrice.
        let key = d.dir.join("key.json");
        let config = serde_json::json!({ "deprecated-key-path": key, "shutdown-timeout": 2 });
        std::fs::write(d.config(), config.to_string()).expect("dockerd config");
        d.launch(&d.socket());
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn config(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }

    /// Starts dockerd listening on `socket` and waits until it answers there.
    pub fn launch(&mut self, socket: &Path) {
        assert!(self.child.is_none(), "dockerd already runs");
        let log = std::fs::File::create(self.dir.join("dockerd.log")).expect("dockerd log");
        let netns = format!("--net=/run/netns/{}", self.ns);
        let host = format!("unix://{}", socket.display());
        let path = |p: &str| self.dir.join(p).display().to_string();
        let child = Command::new("nsenter")
            .arg(&netns)
            .arg(DOCKERD)
            .args(["--data-root", &path("data")])
            .args(["--exec-root", &path("exec")])
            .args(["-H", &host])
            .args(["--pidfile", &path("dockerd.pid")])
            .args(["--config-file", &path("daemon.json")])
            .args(["--cgroup-parent", &format!("/{}", self.cgroup)])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start nsenter dockerd");
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        loop {
            let out = Command::new(DOCKER)
                .args(["-H", &host, "version", "--format", "{{.Server.Version}}"])
                .output()
                .expect("run docker");
            if out.status.success() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
                panic!("dockerd did not start ({exited:?}); its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops dockerd (SIGTERM, as a service manager does) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // nsenter execs dockerd: the child is dockerd itself.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `docker ARGS` against this engine; panics with its stderr when it fails.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.try_docker(args);
        assert!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn try_docker(&self, args: &[&str]) -> std::process::Output {
        Command::new(DOCKER)
            .args(["-H", &self.url()])
            .args(args)
            .output()
            .expect("run docker")
    }

    /// Imports [`IMAGE`]: busybox-static and its applets, the only image a test needs.
    pub fn import_busybox(&self) {
        let root = self.dir.join("rootfs");
        std::fs::create_dir_all(root.join("bin")).expect("rootfs");
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "sleep", "cat", "nc", "ip", "true"] {
            let _ = std::fs::remove_file(root.join("bin").join(applet));
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet");
        }
        let tar = self.dir.join("rootfs.tar");
        let root_arg = root.display().to_string();
        let tar_arg = tar.display().to_string();
        run("tar", &["-C", &root_arg, "-cf", &tar_arg, "."]);
        self.docker(&["import", &tar_arg, IMAGE]);
    }

    fn processes_of_ours(&self) -> Vec<i32> {
        let marker = self.dir.display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                pids.push(pid);
            }
        }
        pids
    }
}

/// Whether a dockerd, containerd or shim runs anywhere on the machine.
fn engine_running() -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            matches!(comm.trim(), "dockerd" | "containerd") || comm.starts_with("containerd-shim")
        })
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.clean();
    }
}

impl Dockerd {
    /// Takes everything down and returns what is left (nothing, when all went well).
    pub fn down(mut self) -> Vec<String> {
        self.clean();
        self.leftovers()
    }

    /// Removes what this engine made; safe to run twice.
    fn clean(&mut self) {
        if self.child.is_some() {
            let ids = self.try_docker(&["ps", "-aq"]);
            let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.try_docker(&args);
            }
        }
        self.stop();
        // containerd and shims that outlived dockerd: processes this guard started, by pid.
        for pid in self.processes_of_ours() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(200));
        let marker = self.dir.display().to_string();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&marker))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        for controller in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let ours = controller.path().join(&self.cgroup);
            // Containers' cgroups first, then ours; a busy one stays and is reported below.
            for child in std::fs::read_dir(&ours).into_iter().flatten().flatten() {
                if child.path().is_dir() {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(&ours);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Shared with any other engine on the machine: left while one runs.
        if !engine_running() {
            for p in &self.made_outside {
                let _ = std::fs::remove_dir(p);
            }
        }
    }

    /// What this engine left behind: processes, mounts, cgroups, the namespace and its folder.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let pids = self.processes_of_ours();
        if !pids.is_empty() {
            left.push(format!("processes {pids:?}"));
        }
        let marker = self.dir.display().to_string();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(
            mountinfo
                .lines()
                .filter_map(|l| l.split_whitespace().nth(4))
                .filter(|m| m.starts_with(&marker))
                .map(|m| format!("mount {m}")),
        );
        for controller in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let ours = controller.path().join(&self.cgroup);
            if ours.exists() {
                left.push(format!("cgroup {}", ours.display()));
            }
        }
        if Path::new("/run/netns").join(&self.ns).exists() {
            left.push(format!("netns {}", self.ns));
        }
        if self.dir.exists() {
            left.push(format!("folder {}", self.dir.display()));
        }
        left
    }
}
