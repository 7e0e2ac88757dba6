//! Upgrade in place on a real lab: the datapath is built again with a cargo feature of
//! `ecsnet-ebpf` (`upgrade-test-program`: one program's instructions differ, no map does;
//! `upgrade-test-layout`: FRAGS has twice the capacity), handed to `ecsnet upgrade` through
//! `ECSNET_DATAPATH_OBJECT`, and
//! - with the same layouts, long-lived TCP (through a published port's DNAT) and UDP flows (east
//!   to west, and through masquerade) and a running iperf3 cross the upgrade with no reset, no
//!   lost datagram and no failed echo; the flow logs add up to exactly what was sent; every link
//!   keeps its id while its program id changes; only the changed program's tag differs; and the
//!   agent runs again under a new pid;
//! - with a changed layout, `ecsnet upgrade` and `ecsnet up` refuse in one line (exit 2) and
//!   nothing changes: programs, links, maps, the agent, and a connection opened before; also for
//!   an instance without stamps (from before they existed), whose live maps show the change;
//!   and `up` of a build that keeps the layouts upgrades the running instance, while `up` of the
//!   same build again changes nothing (exit 2, as before upgrades). An instance from before the
//!   IPv6 maps gets them made (`NAT_USE6` sized as `NAT_USE`), and those only an apply or `up`
//!   would fill (`PORTS6`, `LOCAL_ADDRS6`, `CONFIG6` with its masquerade flag) filled by the
//!   upgrade.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{
    maps::MapInfo,
    programs::{
        ProgramInfo,
        links::{FdLink, PinnedLink},
    },
};
use ecsnet::kernel::{datapath::OBJECT_ENV, maps};
use ecsnet::store::{files::read_meta, paths::InstancePaths};
use ecsnet_common::{
    PINNED_MAPS,
    maps::{
        CONFIG6_MASQUERADE, Config6, MAP_CONFIG6, MAP_CT, MAP_CT6, MAP_CT6_NEW, MAP_FRAGS6,
        MAP_LOCAL_ADDRS6, MAP_NAT_USE, MAP_NAT_USE6, MAP_PORTS6, MAP_PROGS6, MAP_TASKS6, PortKey,
        PortTarget6, TASK_IPV6,
    },
    policy::{MAP_SG_LEVELS6, MAP_SG_PEERS6},
};
use ecsnet_tests::{
    Background, Lab, agent, ecsnet_bin, in_netns, iperf3, ns_exec, rule_packets,
    traffic::{echo, tcp_connect},
    world::apply_file,
};

const TASK1: &str = "172.17.0.2";
const TASK2: &str = "172.17.0.3";
/// The published port of task1's echo server (container port 80), on the uplink address.
const PUBLISHED: &str = "10.10.0.1:8080";
/// The client's echo server: the outside, reached through masquerade.
const CLIENT_ECHO: &str = "10.10.0.2:9000";
/// Payload of each counted datagram, bytes; a record counts 28 more (IPv4 + UDP headers).
const PAYLOAD: usize = 120;
const UDP_OVERHEAD: u64 = 28;
/// The east-west UDP flow whose records must add up: task1:SPORT -> task2:DPORT.
const SPORT: u16 = 41_500;
const DPORT: u16 = 41_501;

/// Builds `ecsnet-ebpf` with `feature` (as the userspace build script does, with the BPF
/// toolchain) and returns the object's path. Fails the test with cargo's output.
fn build_variant(feature: &str) -> PathBuf {
    // One build at a time: the variants share a target directory and its output path.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one = BUILDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let toolchain = std::fs::read_to_string(root.join("ecsnet-ebpf/bpf-toolchain"))
        .expect("read ecsnet-ebpf/bpf-toolchain");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("upgrade-variants");
    let rustflags = [
        &format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    let out = Command::new("rustup")
        .args(["run", toolchain.trim(), "cargo", "build", "--package"])
        .args(["ecsnet-ebpf", "--bins", "--release", "--target"])
        .args([
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--features",
            feature,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .output()
        .expect("run rustup (./x setup installs the BPF toolchain)");
    assert!(
        out.status.success(),
        "building ecsnet-ebpf --features {feature} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = target_dir.join("bpfel-unknown-none/release/ecsnet-ebpf");
    let object = target_dir.join(format!("{feature}.o"));
    std::fs::copy(&built, &object)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), object.display()));
    object
}

/// `ecsnet --instance NAME ARGS` loading the datapath object `object`.
fn ecsnet_with(object: &Path, args: &[&str]) -> Output {
    Command::new(ecsnet_bin())
        .args(args)
        .env(OBJECT_ENV, object)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ecsnet")
}

/// What an upgrade may or may not change, read from the pins: per link pin its link id and
/// program id; per program pin its id and tag; per map its id; the agent's pid.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pins {
    links: BTreeMap<String, (u32, u32)>,
    programs: BTreeMap<String, (u32, u64)>,
    maps: BTreeMap<String, u32>,
    agent: Option<i32>,
}

fn files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("read a pin directory entry");
            (e.file_name().to_string_lossy().into_owned(), e.path())
        })
        .collect();
    v.sort();
    v
}

fn pins(lab: &Lab) -> Pins {
    let paths = InstancePaths::new(&lab.name);
    let links = files(&paths.link_dir())
        .into_iter()
        .map(|(name, path)| {
            let link = PinnedLink::from_pin(&path)
                .unwrap_or_else(|e| panic!("open link {}: {e}", path.display()));
            let info = FdLink::from(link).info().expect("link info");
            (name, (info.id(), info.program_id()))
        })
        .collect();
    let programs = files(&paths.pin_dir().join("progs"))
        .into_iter()
        .map(|(name, path)| {
            let info = ProgramInfo::from_pin(&path)
                .unwrap_or_else(|e| panic!("open program {}: {e}", path.display()));
            (name, (info.id(), info.tag()))
        })
        .collect();
    let maps = PINNED_MAPS
        .iter()
        .map(|m| {
            let info =
                MapInfo::from_pin(paths.map_pin(m)).unwrap_or_else(|e| panic!("open map {m}: {e}"));
            ((*m).to_owned(), info.id())
        })
        .collect();
    Pins {
        links,
        programs,
        maps,
        agent: agent::pid(&lab.name).filter(|p| agent::alive(*p)),
    }
}

/// iperf3's port. iperf3 resets its own connection as a run ends, with no ecsnet anywhere
/// (one reset each way per run, seen in the kernel's `EstabResets`), so its port is left out of
/// the resets counted.
const IPERF_PORT: &str = "5201";
/// How long iperf3 runs, seconds: from 2 s before the upgrade to well after it, even when the
/// upgrade takes seconds on a loaded machine.
const IPERF_SECS: &str = "20";

/// The chain that counts TCP resets other than iperf3's, sent or received, in a namespace.
/// (Separate RETURN rules: iptables-nft matches `! --sport P ! --dport P` in one rule as if the
/// negations were not there.)
const RESETS: &str = "UPGRADE_RESETS";

/// Starts counting resets in the namespaces `nss`, in and out, and checks that the count
/// works: a connection to a closed port of the first namespace's own loopback is one reset out
/// and one in, the same to iperf3's port none. Returns the count after it.
fn count_resets(nss: &[&str]) -> u64 {
    for ns in nss {
        let rules: [&[&str]; 6] = [
            &["-N", RESETS],
            &[
                "-A", RESETS, "-p", "tcp", "--sport", IPERF_PORT, "-j", "RETURN",
            ],
            &[
                "-A", RESETS, "-p", "tcp", "--dport", IPERF_PORT, "-j", "RETURN",
            ],
            &["-A", RESETS, "-p", "tcp", "--tcp-flags", "RST", "RST"],
            &["-I", "INPUT", "-j", RESETS],
            &["-I", "OUTPUT", "-j", RESETS],
        ];
        for rule in rules {
            ns_exec(ns, &[&["iptables"], rule].concat());
        }
    }
    for port in [IPERF_PORT, "1"] {
        let to = format!("127.0.0.1:{port}").parse().expect("an address");
        let refused = tcp_connect(nss[0], to, Duration::from_secs(5));
        assert!(refused.is_err(), "nothing listens on {to} in {}", nss[0]);
    }
    let counted = resets(nss);
    assert_eq!(counted, 2, "the reset of a refused connection, out and in");
    counted
}

/// The resets counted so far in the namespaces `nss`.
fn resets(nss: &[&str]) -> u64 {
    reset_counts(nss).values().sum()
}

/// The resets counted so far in each namespace of `nss`.
fn reset_counts(nss: &[&str]) -> BTreeMap<String, u64> {
    nss.iter()
        .map(|ns| {
            let n = rule_packets(ns, "filter", RESETS, "flags:0x04/0x04");
            ((*ns).to_owned(), n)
        })
        .collect()
}

/// What a traffic thread returns: how many exchanges it made, and the first failure if any.
type Outcome = (u64, Option<String>);

/// Traffic that runs in threads until stopped.
struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, JoinHandle<Outcome>)>,
}

impl Running {
    fn new() -> Self {
        Running {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// Runs `step` every 20 ms until stopped or it fails.
    fn every_20ms(
        &mut self,
        what: &'static str,
        mut step: impl FnMut(u64) -> Result<(), String> + Send + 'static,
    ) {
        let stopped = Arc::clone(&self.stop);
        let t = std::thread::spawn(move || {
            let mut n = 0;
            while !stopped.load(Ordering::Relaxed) {
                if let Err(e) = step(n) {
                    return (n, Some(e));
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (n, None)
        });
        self.threads.push((what, t));
    }

    /// Stops every thread; the exchanges each made, all of which succeeded.
    fn finish(self) -> BTreeMap<&'static str, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|(what, t)| {
                let (n, failed) = t.join().expect("traffic thread");
                assert_eq!(failed, None, "{what}: failed after {n} exchanges");
                assert!(n > 0, "{what}: no exchange at all");
                (what, n)
            })
            .collect()
    }
}

fn held_tcp(ns: &str, to: &str) -> TcpStream {
    let s = tcp_connect(ns, to.parse().expect("an address"), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {to} from {ns}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn bound_udp(ns: &str, port: u16) -> UdpSocket {
    let s = in_netns(ns, move || UdpSocket::bind(("0.0.0.0", port)))
        .unwrap_or_else(|e| panic!("bind udp {port} in {ns}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// The packets and bytes of the flow-log records of `iface` in `direction` for the east-west
/// flow, summed over windows.
fn east_west_sum(lab: &Lab, iface: &str, direction: &str) -> (u64, u64) {
    let filter = format!(
        "interface={iface} srcaddr={TASK1} dstaddr={TASK2} srcport={SPORT} dstport={DPORT} \
         proto=udp direction={direction}"
    );
    let recs = lab.flow_records("${packets} ${bytes}", &filter);
    recs.iter().fold((0, 0), |(p, b), r| {
        (
            p + r["packets"].as_u64().expect("packets"),
            b + r["bytes"].as_u64().expect("bytes"),
        )
    })
}

/// Polls the sums of `iface`/`direction` until they reach `want` (windows are exported every
/// second) or 20 s pass; returns the last sums.
fn settled_sum(lab: &Lab, iface: &str, direction: &str, want: (u64, u64)) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = east_west_sum(lab, iface, direction);
        if got.0 >= want.0 || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Starts the long-lived flows of the upgrade test on `lab`: a TCP echo connection from the
/// client through task1's published port, UDP echoes from task2 through masquerade to the
/// client, and datagrams from task1 to task2, counted by a receiver thread into the returned
/// counter (which ends five seconds after the last datagram).
fn long_lived_flows(lab: &Lab) -> (Running, JoinHandle<()>, Arc<AtomicU64>) {
    let mut traffic = Running::new();
    let mut tcp = held_tcp(lab.client(), PUBLISHED);
    traffic.every_20ms("TCP echo through the published port", move |n| {
        let tag = u8::try_from(n % 251).expect("below 251");
        echo(&mut tcp, &[tag; 200]).map_err(|e| format!("echo {n}: {e}"))
    });
    let nat_udp = ecsnet_tests::traffic::udp(lab.task_ns(2), "0.0.0.0:41600", Some(CLIENT_ECHO));
    nat_udp
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    traffic.every_20ms("UDP echo through masquerade", move |n| {
        let msg = n.to_be_bytes();
        nat_udp.send(&msg).map_err(|e| format!("send {n}: {e}"))?;
        let mut buf = [0u8; 64];
        let got = nat_udp
            .recv(&mut buf)
            .map_err(|e| format!("echo {n}: {e}"))?;
        (buf[..got] == msg)
            .then_some(())
            .ok_or_else(|| format!("echo {n} came back as {:?}", &buf[..got]))
    });
    let (tx, rx) = (
        bound_udp(lab.task_ns(1), SPORT),
        bound_udp(lab.task_ns(2), DPORT),
    );
    let received = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&received);
    let receiving = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            match rx.recv(&mut buf) {
                Ok(n) if n == PAYLOAD => counted.fetch_add(1, Ordering::Relaxed),
                Ok(n) => panic!("a datagram of {n} bytes, not {PAYLOAD}"),
                // Five seconds without one: the sender has stopped.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return;
                }
                Err(e) => panic!("receive: {e}"),
            };
        }
    });
    traffic.every_20ms(EAST_WEST, move |n| {
        tx.send_to(&[0x5a; PAYLOAD], (TASK2, DPORT))
            .map(drop)
            .map_err(|e| format!("send {n}: {e}"))
    });
    (traffic, receiving, received)
}

/// The exchange counted for the east-west datagrams.
const EAST_WEST: &str = "UDP task1 -> task2";

/// Checks what an upgrade between builds that differ in `tc_uplink_egress` changed in the pins:
/// the same links with the same ids, each on a new program that is pinned; every program new,
/// only `tc_uplink_egress` with other instructions; the same maps; a new agent.
fn check_replaced(before: &Pins, after: &Pins) {
    assert_eq!(
        after.links.keys().collect::<Vec<_>>(),
        before.links.keys().collect::<Vec<_>>(),
        "the same link pins"
    );
    assert!(
        before.links.keys().any(|l| l.starts_with("xdp-")),
        "an XDP link: {before:?}"
    );
    for (pin, (link, prog)) in &before.links {
        let (link_now, prog_now) = after.links[pin];
        assert_eq!(link_now, *link, "link {pin} keeps its id");
        assert_ne!(prog_now, *prog, "link {pin} runs a new program");
        assert!(
            after.programs.values().any(|(id, _)| *id == prog_now),
            "link {pin} runs program {prog_now}, which is pinned: {after:?}"
        );
    }
    for (prog, (id, tag)) in &before.programs {
        let (id_now, tag_now) = after.programs[prog];
        assert_ne!(id_now, *id, "program {prog} was replaced");
        let changed = prog == "tc_uplink_egress";
        assert_eq!(
            tag_now != *tag,
            changed,
            "tag of {prog} (changed in the variant: {changed})"
        );
    }
    assert_eq!(after.maps, before.maps, "every map kept");
    let (pid, pid_now) = (before.agent.expect("an agent"), after.agent);
    assert!(
        pid_now.is_some_and(|p| p != pid),
        "the agent restarted: was {pid}, now {pid_now:?}"
    );
}

#[test]
fn programs_are_replaced_under_live_flows_with_no_reset_and_exact_flow_logs() {
    let object = build_variant("upgrade-test-program");
    let lab = Lab::up("upg", 2, &["1:8080:80"]);
    // XDP in skb mode, so an XDP link is upgraded too.
    lab.ecsnet_up_with(&["--window", "1", "--xdp-mode", "skb"]);
    let nss = [lab.client(), lab.task_ns(1), lab.task_ns(2)];
    let before = pins(&lab);
    let resets_before = count_resets(&nss);
    let _iperf_server = Background::start(
        lab.client(),
        &["iperf3", "-s", "-p", IPERF_PORT],
        Duration::from_millis(300),
    );
    let (traffic, receiving, received) = long_lived_flows(&lab);
    let iperf_from = lab.task_ns(1).to_owned();
    let iperf = std::thread::spawn(move || {
        iperf3(
            &iperf_from,
            &["-c", "10.10.0.2", "-p", IPERF_PORT, "-t", IPERF_SECS],
        )
    });

    std::thread::sleep(Duration::from_secs(2));
    let took = Instant::now();
    let out = ecsnet_with(&object, &["--instance", &lab.name, "upgrade"]);
    let took = took.elapsed();
    assert!(
        out.status.success(),
        "ecsnet upgrade failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("upgraded in place"), "upgrade said: {said}");
    assert!(
        !iperf.is_finished(),
        "iperf3 ({IPERF_SECS} s from 2 s before) ended before the upgrade did ({took:?})"
    );
    std::thread::sleep(Duration::from_secs(2));

    let bps = iperf.join().expect("iperf3 across the upgrade");
    assert!(bps > 1e6, "iperf3 across the upgrade: {bps} bit/s");
    let done = traffic.finish();
    receiving.join().expect("the UDP receiver");
    eprintln!("upgrade in {took:?}; exchanges across it: {done:?}; iperf3 {bps:.0} bit/s");
    let sent = done[EAST_WEST];
    assert_eq!(
        received.load(Ordering::Relaxed),
        sent,
        "datagrams task1 -> task2 received of {sent} sent (every exchange: {done:?})"
    );
    assert_eq!(
        resets(&nss) - resets_before,
        0,
        "TCP resets (other than iperf3's own) in the client and the tasks across the upgrade: {:?}",
        reset_counts(&nss)
    );
    check_replaced(&before, &pins(&lab));

    // Every datagram is in the flow logs exactly once, on both ends.
    let want = (sent, sent * (PAYLOAD as u64 + UDP_OVERHEAD));
    for (task, direction) in [(0, "egress"), (1, "ingress")] {
        let iface = &lab.status.tasks[task].interface;
        assert_eq!(
            settled_sum(&lab, iface, direction, want),
            want,
            "flow-log packets and bytes of {TASK1}:{SPORT} -> {TASK2}:{DPORT} ({direction} on \
             {iface}) across the upgrade"
        );
    }
}

/// Runs `ecsnet ARGS` with the datapath object `object`, expecting the one-line refusal of the
/// changed `FRAGS` (exit 2) and no change to the pins of `lab` (`before`).
fn refused(lab: &Lab, object: &Path, args: &[&str], before: &Pins) {
    let out = ecsnet_with(object, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "`ecsnet {args:?}`: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line from `ecsnet {args:?}`: {stderr}");
    assert!(
        lines[0].starts_with("ecsnet: cannot upgrade in place: map FRAGS changed its layout")
            && lines[0].contains("nothing was changed"),
        "{}",
        lines[0]
    );
    assert_eq!(
        &pins(lab),
        before,
        "nothing changed after `ecsnet {args:?}`"
    );
}

/// The capacity of the pinned map `map`, entries.
fn max_entries(paths: &InstancePaths, map: &str) -> u32 {
    MapInfo::from_pin(paths.map_pin(map))
        .unwrap_or_else(|e| panic!("{map}: {e}"))
        .max_entries()
}

/// The NAT66 maps of `lab`'s one task and host, as the upgrade filled them: `PORTS6` from the
/// applied state (nothing else writes it without an apply), `LOCAL_ADDRS6` and `CONFIG6` from
/// the host (which the new agent keeps), its masquerade flag from the applied state's IPv6 mode
/// (nat, the default: an older build's entry had none); `NAT_USE6` made empty, as large as
/// `NAT_USE`.
fn ipv6_host_maps_filled(lab: &Lab, paths: &InstancePaths) {
    let task6 = lab.status.tasks[0].address6.expect("task1's IPv6 address");
    let host = &lab.status.host;
    let (uplink6, bridge6) = (host.uplink_address6, host.bridge_address6);
    let (uplink6, bridge6) = (uplink6.expect("uplink IPv6"), bridge6.expect("bridge IPv6"));
    let meta = read_meta(paths).expect("meta.json").expect("up");
    let port = PortKey {
        port: 8080u16.to_be(),
        proto: 6,
        _pad: 0,
    };
    let target = PortTarget6 {
        addr: task6.octets(),
        port: 80u16.to_be(),
        _pad: [0; 2],
    };
    assert_eq!(
        maps::read_ports6(paths).expect("read PORTS6"),
        [(port, target)],
        "PORTS6 filled by the upgrade"
    );
    let mut local6 = maps::read_local_addrs6(paths).expect("read LOCAL_ADDRS6");
    local6.sort_unstable();
    let mut want = vec![
        (uplink6.octets(), meta.uplink_index),
        (bridge6.octets(), meta.bridge_index),
    ];
    want.sort_unstable();
    assert_eq!(local6, want, "LOCAL_ADDRS6 after the upgrade");
    let config6 = Config6 {
        uplink_ipv6: uplink6.octets(),
        bridge_ipv6: bridge6.octets(),
        bridge_prefix6: 64,
        flags: CONFIG6_MASQUERADE,
        _pad: [0; 2],
    };
    assert_eq!(
        maps::read_config6(paths).expect("read CONFIG6"),
        Some(config6),
        "CONFIG6 after the upgrade"
    );
    let entries = |map: &str| max_entries(paths, map);
    assert_eq!(
        entries(MAP_NAT_USE6),
        entries(MAP_NAT_USE),
        "NAT_USE6 made as large as NAT_USE"
    );
    assert_eq!(
        maps::read_nat_use6(paths).expect("read NAT_USE6"),
        Vec::new(),
        "NAT_USE6 made empty"
    );
}

/// An apply of `state` on `lab`, whose datapath an older build loaded, writes no map it lacks
/// (`TASKS6`) and marks no task `TASK_IPV6`.
fn applies_without_tasks6(lab: &Lab, state: &str, paths: &InstancePaths) {
    apply_file(lab, state, &[]);
    assert!(
        maps::read_tasks(paths)
            .expect("read TASKS")
            .iter()
            .all(|(_, t)| t.flags & TASK_IPV6 == 0),
        "TASK_IPV6 on a datapath without TASKS6"
    );
    assert!(
        !paths.map_pin(MAP_TASKS6).exists(),
        "the apply made no TASKS6"
    );
}

/// `TASKS6` and `TASK_IPV6` as the upgrade filled them from the applied state (an apply on the
/// older datapath wrote neither): task1's IPv6 address on its interface, and its IPv6 passes
/// the guard again (the client reaches its published port over IPv6).
fn tasks6_filled(lab: &Lab, paths: &InstancePaths) {
    let task6 = lab.status.tasks[0].address6.expect("task1's IPv6 address");
    let in_map = maps::read_tasks(paths).expect("read TASKS");
    assert_eq!(in_map.len(), 1, "{in_map:?}");
    let info = in_map[0].1;
    assert_eq!(
        info.flags & TASK_IPV6,
        TASK_IPV6,
        "task1 marked as having an IPv6 address"
    );
    assert_eq!(
        maps::read_tasks6(paths).expect("read TASKS6"),
        [(task6.octets(), info.ifindex)],
        "TASKS6 filled by the upgrade"
    );
    let uplink6 = lab.status.host.uplink_address6.expect("uplink IPv6");
    let to = format!("[{uplink6}]:8080");
    assert_eq!(
        lab.probe(lab.client(), "tcp", &to, 3, 100)["echoed"],
        3,
        "the client reaches task1 over IPv6 after the upgrade"
    );
}

#[test]
fn a_changed_map_layout_is_refused_and_up_of_another_build_upgrades() {
    let layout = build_variant("upgrade-test-layout");
    let program = build_variant("upgrade-test-program");
    // Dual-stack, so that the IPv6 maps have something to be filled with.
    let lab = Lab::up_v6("upg2", 1, &["1:8080:80"], "nat");
    lab.ecsnet_up();
    let mut held = held_tcp(lab.client(), PUBLISHED);
    echo(&mut held, b"before").expect("echo before");
    let before = pins(&lab);
    let state = lab.state_file();
    let upgrade = ["--instance", &lab.name, "upgrade"];
    let up = lab.ecsnet_args(&["up", "--state", &state]);
    refused(&lab, &layout, &upgrade, &before);
    refused(&lab, &layout, &up, &before);

    // An instance from before stamps: its stamps are read from the live maps, which show the
    // change as well.
    let stamps = InstancePaths::new(&lab.name).layout_pin();
    std::fs::remove_file(&stamps).expect("unpin the layout stamps");
    refused(&lab, &layout, &upgrade, &before);
    assert!(!stamps.exists(), "a refusal writes no stamps either");

    // An instance from before IPv6: no pin of `tc_task_ipv6` or of the IPv6 maps (the running
    // programs still hold their maps). It is up all the same (its agent and `stats` read no
    // IPv6 table), and the upgrade makes them.
    let paths = InstancePaths::new(&lab.name);
    let newer_maps = [
        MAP_TASKS6,
        MAP_PROGS6,
        MAP_CT6,
        MAP_CT6_NEW,
        MAP_FRAGS6,
        MAP_SG_PEERS6,
        MAP_SG_LEVELS6,
        MAP_PORTS6,
        MAP_LOCAL_ADDRS6,
        MAP_CONFIG6,
        MAP_NAT_USE6,
    ];
    let newer: Vec<_> = newer_maps
        .iter()
        .map(|m| paths.map_pin(m))
        .chain([paths.prog_pin("tc_task_ipv6")])
        .collect();
    for pin in &newer {
        std::fs::remove_file(pin).unwrap_or_else(|e| panic!("unpin {}: {e}", pin.display()));
    }
    assert_eq!(
        lab.stats().tasks.len(),
        1,
        "an older build's instance is up"
    );
    applies_without_tasks6(&lab, &state, &paths);

    // `up` of a build that keeps every layout over the running instance upgrades it in place,
    // and stamps it.
    let out = ecsnet_with(&program, &up);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("upgraded in place"),
        "`ecsnet up` of another build: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stamps.exists(), "the upgrade wrote the stamps");
    let after = pins(&lab);
    let older = |m: &BTreeMap<String, u32>| {
        let mut m = m.clone();
        m.retain(|name, _| !newer_maps.contains(&name.as_str()));
        m
    };
    assert_eq!(older(&after.maps), older(&before.maps), "every map kept");
    assert!(
        newer.iter().all(|p| p.exists()),
        "the upgrade pinned what the older build lacked"
    );
    assert!(after.programs.contains_key("tc_task_ipv6"));
    let entries = |map: &str| max_entries(&paths, map);
    assert_eq!(
        entries(MAP_CT6),
        entries(MAP_CT),
        "CT6 made with the instance's --ct-size"
    );
    assert_eq!(
        lab.stats().conntrack.ipv6.entries,
        0,
        "CT6 read after the upgrade"
    );
    ipv6_host_maps_filled(&lab, &paths);
    tasks6_filled(&lab, &paths);
    for (pin, (link, _)) in &before.links {
        assert_eq!(after.links[pin].0, *link, "link {pin} keeps its id");
    }
    assert_ne!(after.agent, before.agent, "a new agent");
    // The same build over itself changes nothing, as before.
    let out = ecsnet_with(&program, &up);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a second `up` of the same build"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is already up"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pins(&lab), after, "nothing changed by the second `up`");
    echo(&mut held, b"after").expect("the connection opened before still works");
}
