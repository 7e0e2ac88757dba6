//! One loaded copy of ecsnet: `up`, `apply`, `down` and what they record. Every input is
//! checked before the first change, and a failed `up` takes back what it did.

pub mod follow;
pub(crate) mod process;

use std::{
    collections::HashSet,
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::XdpMode;
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use ecsnet_common::{
    ct::{CtEntry, CtEntry6, Timeouts},
    maps::{CONFIG6_MASQUERADE, Config, Config6, DEFAULT_NAT_TASK_PORTS, NatConfig, ROLE_HELD},
    net::ipv4_to_map,
};

use crate::{
    flowlog,
    host::{
        arp,
        netlink::{Link, NetlinkError, Snapshot},
    },
    kernel::{
        datapath::{self, DatapathError},
        maps::{self, MapsError},
    },
    plan::{
        Plan, PlanError, entries, merge, sg,
        tasks::{self, ResolvedTask},
    },
    state::{self, BridgeNet, Ipv6Mode, LoadError, State, timeouts::TimeoutsError},
    store::{
        directory::{Directory, DirectoryError},
        files::{self, FlowLogOptions, Meta, StoreError, UplinkXdp, read_applied, read_meta},
        paths::InstancePaths,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("no interface {iface:?} in this network namespace (given as {role}); check `ip link`")]
    UnknownInterface { iface: String, role: &'static str },
    #[error("{iface:?} is not a bridge; give the tasks' bridge with --bridge")]
    NotABridge { iface: String },
    #[error("cannot find the uplink: no IPv4 default route; give it with --uplink")]
    NoUplink,
    #[error("cannot find the bridge: no bridge with task veths; give it with --bridge")]
    NoBridge,
    #[error(
        "instance {instance:?} is already up (agent pid {pid}); run `ecsnet --instance {instance} down` first, or `ecsnet apply` to change its state"
    )]
    AlreadyUp { instance: String, pid: i32 },
    #[error(
        "another apply is running on instance {instance:?} (apply, sg apply, task add/rm or up); nothing was changed, try again when it has finished"
    )]
    ApplyRunning { instance: String },
    #[error("bad --ct-timeouts: {0}")]
    Timeouts(#[from] TimeoutsError),
    #[error(transparent)]
    Config(#[from] entries::ConfigError),
    #[error(transparent)]
    State(#[from] LoadError),
    #[error("{file}: {error}")]
    Resolve { file: String, error: PlanError },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    /// Boxed: `FlowLogError` is large, and every instance function returns this.
    #[error(transparent)]
    FlowLog(Box<flowlog::FlowLogError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl InstanceError {
    /// Exit code: 2 for bad usage or input, 1 for a failure of the machine.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::UnknownInterface { .. }
            | Self::NotABridge { .. }
            | Self::NoUplink
            | Self::NoBridge
            | Self::AlreadyUp { .. }
            | Self::Timeouts(_)
            | Self::Config(_)
            | Self::State(LoadError::Invalid { .. } | LoadError::Read { .. })
            | Self::Resolve { .. }
            | Self::Datapath(DatapathError::LayoutChanged(_)) => 2,
            Self::Store(e) => e.exit_code(),
            Self::FlowLog(e) if matches!(**e, flowlog::FlowLogError::Format(_)) => 2,
            _ => 1,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The instance's apply lock, held until dropped (or the process dies): the live state has one
/// writer at a time, and a command that reads it to change it (`task add`) reads it under the
/// lock too.
#[derive(Debug)]
pub struct ApplyLock {
    _file: Flock<fs::File>,
}

fn take_apply_lock(paths: &InstancePaths) -> Result<ApplyLock, InstanceError> {
    let path = paths.apply_lock();
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(f) => Ok(ApplyLock { _file: f }),
        Err((_, Errno::EWOULDBLOCK)) => Err(InstanceError::ApplyRunning {
            instance: paths.name.clone(),
        }),
        Err((_, e)) => Err(io(&path)(e.into())),
    }
}

/// Takes the apply lock of an instance that is up, without waiting: a second writer fails at
/// once with `ApplyRunning` and changes nothing. An instance that follows an engine applies its
/// changes itself, a few milliseconds each: a person's command waits for those, up to
/// `follow::PERSON_WAIT`, and then fails the same way.
pub fn lock_apply(paths: &InstancePaths) -> Result<ApplyLock, InstanceError> {
    let meta = files::require_up(paths)?;
    lock_for(paths, &meta)
}

fn lock_for(paths: &InstancePaths, meta: &Meta) -> Result<ApplyLock, InstanceError> {
    if meta.docker.is_some() {
        follow::wait_apply_lock(paths, follow::PERSON_WAIT)
    } else {
        take_apply_lock(paths)
    }
}

/// Options of `ecsnet up`.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    pub netns: Option<String>,
    pub uplink: Option<String>,
    pub bridge: Option<String>,
    pub state: Option<PathBuf>,
    pub xdp_mode: XdpChoice,
    pub ct_size: u32,
    pub ct_timeouts: String,
    /// `--nat-task-ports`: masqueraded flows per task and destination, 0 for no limit.
    pub nat_task_ports: u32,
    pub flow_table_size: u32,
    pub flow_logs: FlowLogOptions,
    pub monitor_rate: u32,
    pub metrics: Option<SocketAddr>,
    /// The container engine to follow (`--docker`), as `unix:///path`.
    pub docker: Option<String>,
}

/// `--xdp-mode` as given; `auto` is decided per uplink by `xdp_for`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum XdpChoice {
    #[default]
    Auto,
    Native,
    Skb,
    Off,
}

/// The XDP mode for an uplink of link kind `kind` (empty for a device with a driver of its own,
/// `veth` and so on for virtual ones), and what the meta file records. `auto` attaches native
/// XDP to real NICs only: on a veth, native XDP turns off the peer's TSO (so every segment is a
/// packet of its own) and generic XDP copies each GSO packet, while tc ingress drops the same
/// packets a moment later anyway (SPEC §11; docs/BENCHMARKS.md has the numbers).
fn xdp_for(choice: XdpChoice, kind: &str) -> (Option<XdpMode>, UplinkXdp) {
    match choice {
        XdpChoice::Auto if kind.is_empty() => (Some(XdpMode::Driver), UplinkXdp::Native),
        XdpChoice::Auto | XdpChoice::Off => (None, UplinkXdp::Off),
        XdpChoice::Native => (Some(XdpMode::Driver), UplinkXdp::Native),
        XdpChoice::Skb => (Some(XdpMode::Skb), UplinkXdp::Skb),
    }
}

/// The interface `name` given as `role`, or the error that names it.
fn named<'a>(
    snap: &'a Snapshot,
    name: &str,
    role: &'static str,
) -> Result<&'a Link, InstanceError> {
    snap.by_name(name)
        .ok_or_else(|| InstanceError::UnknownInterface {
            iface: name.to_owned(),
            role,
        })
}

/// Finds uplink and bridge from the flags, or from the default route and the tasks' master.
fn discover<'a>(
    snap: &'a Snapshot,
    opts: &UpOptions,
) -> Result<(&'a Link, &'a Link), InstanceError> {
    let uplink = match &opts.uplink {
        Some(name) => named(snap, name, "--uplink")?,
        None => snap
            .default_oif
            .and_then(|i| snap.by_index(i))
            .ok_or(InstanceError::NoUplink)?,
    };
    let bridge = match &opts.bridge {
        Some(name) => {
            let b = named(snap, name, "--bridge")?;
            if b.kind != "bridge" {
                return Err(InstanceError::NotABridge {
                    iface: name.clone(),
                });
            }
            b
        }
        None => snap.guess_bridge().ok_or(InstanceError::NoBridge)?,
    };
    Ok((uplink, bridge))
}

/// What `up` records of the host it found, with the XDP mode to try first: the flags (`xdp` and
/// `ct_timeouts` parsed already), and after a crash what was there before (`previous`). A
/// datapath that is still loaded keeps the table sizes it has.
fn meta_for(
    paths: &InstancePaths,
    snap: &Snapshot,
    opts: &UpOptions,
    previous: Option<&Meta>,
    (xdp, ct_timeouts): (XdpChoice, Timeouts),
) -> Result<(Meta, Option<XdpMode>), InstanceError> {
    let (uplink, bridge) = discover(snap, opts)?;
    let (mode, xdp_mode) = xdp_for(xdp, &uplink.kind);
    if xdp == XdpChoice::Auto && mode.is_none() {
        log::info!(
            "no XDP on {}: it is a {} (--xdp-mode auto); tc ingress polices it",
            uplink.name,
            uplink.kind
        );
    }
    let loaded = previous.filter(|_| datapath::is_loaded(paths));
    let kept =
        |size: fn(&Meta) -> u32, given: u32| loaded.map(size).filter(|s| *s != 0).unwrap_or(given);
    let meta = Meta {
        instance: paths.name.clone(),
        netns: opts.netns.clone(),
        uplink: uplink.name.clone(),
        uplink_index: uplink.index,
        uplink_address: snap.ipv4_of(uplink.index).map(|a| a.ip),
        bridge: bridge.name.clone(),
        bridge_index: bridge.index,
        bridge_address: snap.ipv4_of(bridge.index).map(|a| (a.ip, a.prefix)),
        xdp_mode,
        ct_size: kept(|m| m.ct_size, opts.ct_size),
        ct_timeouts,
        flow_table_size: kept(|m| m.flow_table_size, opts.flow_table_size),
        flow_logs: opts.flow_logs.clone(),
        monitor_rate: opts.monitor_rate,
        metrics: opts.metrics,
        docker: opts.docker.clone(),
        nat_task_ports: Some(opts.nat_task_ports),
    };
    Ok((meta, mode))
}

/// `ecsnet up`: load, attach, pin and apply the state (if given), then start the agent.
/// Returns the agent's pid, or `None` when the caller runs the agent itself (`--foreground`).
pub fn up(
    paths: &InstancePaths,
    opts: &UpOptions,
    spawn_agent: bool,
) -> Result<Option<i32>, InstanceError> {
    if let Some(pid) = process::agent_pid(paths) {
        return Err(InstanceError::AlreadyUp {
            instance: paths.name.clone(),
            pid,
        });
    }
    let xdp = opts.xdp_mode;
    let ct_timeouts = state::timeouts::parse(&opts.ct_timeouts)?;
    let snap = Snapshot::read()?;
    let mut flags = opts.clone();
    // A state file may name the uplink and bridge; flags win.
    let requested = match &opts.state {
        Some(file) => {
            let requested = state::load(file, BridgeNet::default())?;
            flags.uplink = flags.uplink.or(requested.host.uplink.clone());
            flags.bridge = flags.bridge.or(requested.host.bridge.clone());
            Some((file.display().to_string(), requested))
        }
        None => None,
    };
    // An instance that was up (or crashed) may have an apply running: wait for nothing, fail.
    // A fresh one takes the lock before `meta.json` makes it look up to `apply`.
    let mut lock = if paths.run_dir().exists() {
        Some(take_apply_lock(paths)?)
    } else {
        None
    };
    // After a crash, come back with what was there.
    let previous = read_meta(paths)?;
    if let Some(m) = &previous {
        flags.uplink = flags.uplink.or(Some(m.uplink.clone()));
        flags.bridge = flags.bridge.or(Some(m.bridge.clone()));
    }
    let (meta, mode) = meta_for(paths, &snap, &flags, previous.as_ref(), (xdp, ct_timeouts))?;
    let config = entries::config_entry(&snap, meta.uplink_index, meta.bridge_index)?;
    opts.flow_logs
        .format()
        .map_err(|e| InstanceError::FlowLog(Box::new(e)))?;
    // Without --docker the engine's containers from an earlier run are no tasks any more.
    if opts.docker.is_none() {
        files::remove(&paths.discovered())?;
    }
    // Check the whole state against the host, and compute every entry, before touching anything.
    let plan = match requested {
        Some((file, requested)) => Some(plan_state(paths, &meta, &snap, requested, &file)?),
        None => match read_applied(paths)? {
            Some(applied) => Some(plan_state(paths, &meta, &snap, applied, "applied state")?),
            None => None,
        },
    };
    // IPv6 is optional: a host without it gets zeros. After a crash, the address the loaded
    // datapath masquerades to stays while the uplink has it. Without a state, the mode is the
    // default one's.
    let config6 = entries::config6_entry(
        &snap,
        meta.uplink_index,
        meta.bridge_index,
        &maps::read_config6(paths)?.unwrap_or_default(),
        plan.as_ref()
            .map_or_else(Ipv6Mode::default, |p| p.state.host.ipv6_mode),
    );
    let writes = UpWrites {
        meta,
        mode,
        xdp,
        config,
        config6,
        local_addrs: entries::local_addr_entries(&snap),
        local_addrs6: entries::local_addr6_entries(&snap),
        plan,
    };
    let fresh = !datapath::is_loaded(paths);
    if let Err(e) = writes.write(paths, opts, &mut lock) {
        if fresh {
            let _ = teardown(paths);
        }
        return Err(e);
    }
    if spawn_agent {
        let pid = process::spawn_agent(paths, opts.netns.as_deref())?;
        Ok(Some(pid))
    } else {
        Ok(None)
    }
}

/// The table sizes `up` loads the datapath with.
fn sizes(meta: &Meta) -> datapath::Sizes {
    datapath::Sizes {
        ct: meta.ct_size,
        flow_table: meta.flow_table_size,
    }
}

/// What an upgrade in place did.
#[derive(Debug)]
pub struct Upgraded {
    pub replaced: datapath::Replaced,
    pub agent_was: Option<i32>,
    pub agent: i32,
}

/// Whether `up` over this instance is an upgrade: its agent runs, and its datapath came from
/// another object than the one this binary loads.
pub fn is_other_build(paths: &InstancePaths) -> Result<bool, InstanceError> {
    if process::agent_pid(paths).is_none() || !datapath::is_loaded(paths) {
        return Ok(false);
    }
    let object = datapath::object()?;
    Ok(!datapath::is_current(paths, &object)?)
}

/// `ecsnet upgrade` (and `up` over an instance of another build): under the apply lock, replace
/// the datapath's programs in place, keeping every map (a changed map layout refuses, with
/// nothing changed), then restart the agent on this binary. Packets keep flowing throughout;
/// flows counted while no agent runs are exported by the new one.
pub fn upgrade(paths: &InstancePaths) -> Result<Upgraded, InstanceError> {
    let meta = files::require_up(paths)?;
    let lock = lock_for(paths, &meta)?;
    let object = datapath::object()?;
    let replaced = datapath::replace(paths, &object, sizes(&meta))?;
    // An instance from before the masquerade limit gets the default one with its new maps.
    let limits = NatConfig {
        task_ports: meta.nat_task_ports.unwrap_or(DEFAULT_NAT_TASK_PORTS),
    };
    maps::write_nat_config(paths, &limits)?;
    // Maps this build adds start empty; those that only an apply or the agent would fill are
    // filled now, from the host and the applied state, so the new programs find them whole
    // (`CONFIG6`'s flags too: an older build left them zero).
    let applied = read_applied(paths)?.unwrap_or_default();
    write_host_addresses(paths, &Snapshot::read()?, &meta, applied.host.ipv6_mode)?;
    maps::write_ports6(paths, &entries::port6_entries(&applied))?;
    // An older build wrote `TASKS` without IPv6: the tasks' addresses, then their marks.
    let tasks6 = entries::task6_entries_of(&applied, &maps::read_tasks(paths)?);
    maps::write_tasks6(paths, &tasks6)?;
    let agent_was = process::stop_agent(paths)?;
    // The new agent may want the lock as it starts (it follows an engine).
    drop(lock);
    let agent = process::spawn_agent(paths, meta.netns.as_deref())?;
    Ok(Upgraded {
        replaced,
        agent_was,
        agent,
    })
}

/// Brings the maps of the host's own addresses in line with `snap`, as the agent does every
/// second (addresses change without an apply): `LOCAL_ADDRS`, `LOCAL_ADDRS6`, and `CONFIG6`
/// when the uplink's or the bridge's primary IPv6 address changed, or its flags are not those
/// of the applied state's IPv6 mode `mode` (`entries::config6_flags`). A datapath without the
/// IPv6 maps (an older build's) gets the IPv4 one only.
pub fn write_host_addresses(
    paths: &InstancePaths,
    snap: &Snapshot,
    meta: &Meta,
    mode: Ipv6Mode,
) -> Result<(), MapsError> {
    maps::write_local_addrs(paths, &entries::local_addr_entries(snap))?;
    maps::write_local_addrs6(paths, &entries::local_addr6_entries(snap))?;
    let Some(now) = maps::read_config6(paths)? else {
        return Ok(());
    };
    let want = entries::config6_entry(snap, meta.uplink_index, meta.bridge_index, &now, mode);
    if want.flags != now.flags {
        log::info!(
            "IPv6 masquerade by ecsnet: {}",
            if want.flags & CONFIG6_MASQUERADE == 0 {
                "off"
            } else {
                "on"
            }
        );
    }
    if want != now {
        let addr = |a: [u8; 16]| Ipv6Addr::from(a);
        log::info!(
            "IPv6 addresses: {} {} (was {}), {} {}/{} (was {}/{})",
            meta.uplink,
            addr(want.uplink_ipv6),
            addr(now.uplink_ipv6),
            meta.bridge,
            addr(want.bridge_ipv6),
            want.bridge_prefix6,
            addr(now.bridge_ipv6),
            now.bridge_prefix6
        );
        maps::write_config6(paths, &want)?;
    }
    Ok(())
}

/// What `up` writes, all of it known before the first write.
struct UpWrites {
    meta: Meta,
    /// The XDP mode to try first, and what was asked for.
    mode: Option<XdpMode>,
    xdp: XdpChoice,
    config: Config,
    config6: Config6,
    local_addrs: Vec<(u32, u32)>,
    local_addrs6: Vec<([u8; 16], u32)>,
    plan: Option<Plan>,
}

impl UpWrites {
    /// Loads and attaches the datapath, records the meta (taking the apply lock into `lock`
    /// first if `up` has none yet) and writes every entry; `CONFIG` last, which starts
    /// translation.
    fn write(
        mut self,
        paths: &InstancePaths,
        opts: &UpOptions,
        lock: &mut Option<ApplyLock>,
    ) -> Result<(), InstanceError> {
        datapath::load(paths, sizes(&self.meta))?;
        self.meta.xdp_mode = self.attach_uplink(paths)?;
        let (ifindex, row) = entries::uplink_entry(self.meta.uplink_index);
        maps::write_iface(paths, ifindex, row)?;
        if lock.is_none() {
            let dir = paths.run_dir();
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            *lock = Some(take_apply_lock(paths)?);
        }
        files::write_meta(paths, &self.meta)?;
        if let Some(plan) = &self.plan {
            commit(paths, plan, false)?;
            self.config.flags = plan.config_flags;
        }
        maps::write_local_addrs(paths, &self.local_addrs)?;
        // A loaded datapath without the IPv6 maps (an older build) uses none of them either.
        maps::write_local_addrs6(paths, &self.local_addrs6)?;
        maps::write_config6(paths, &self.config6)?;
        let limits = NatConfig {
            task_ports: opts.nat_task_ports,
        };
        if !maps::write_nat_config(paths, &limits)? {
            log::warn!(
                "the loaded datapath has no masquerade limits (an older build): \
                 --nat-task-ports takes effect once it is loaded again (`ecsnet down`, `up`)"
            );
        }
        flowlog::init_state(paths, opts.flow_logs.enabled, opts.monitor_rate)
            .map_err(|e| InstanceError::FlowLog(Box::new(e)))?;
        // Last: with CONFIG written the datapath starts translating.
        maps::write_config(paths, &self.config)?;
        Ok(())
    }

    /// Attaches the uplink programs and returns the XDP mode the uplink got. Native XDP needs
    /// driver support. Asked for, it falls back to generic XDP; under auto, to none (generic
    /// XDP would cost more than it saves). Either way says so.
    fn attach_uplink(&self, paths: &InstancePaths) -> Result<UplinkXdp, DatapathError> {
        let (uplink, index) = (&self.meta.uplink, self.meta.uplink_index);
        let Err(e) = datapath::attach_uplink(paths, uplink, index, self.mode) else {
            return Ok(self.meta.xdp_mode);
        };
        let (fallback, got) = match (self.mode, self.xdp) {
            (Some(XdpMode::Driver), XdpChoice::Auto) => {
                log::warn!("native XDP on {uplink} failed ({e}); running without XDP");
                (None, UplinkXdp::Off)
            }
            (Some(XdpMode::Driver), _) => {
                log::warn!("native XDP on {uplink} failed ({e}); using generic XDP");
                (Some(XdpMode::Skb), UplinkXdp::Skb)
            }
            _ => return Err(e),
        };
        datapath::attach_uplink(paths, uplink, index, fallback).map(|()| got)
    }
}

/// Reads, resolves and plans a state file for an instance that is up.
fn plan_apply(
    paths: &InstancePaths,
    meta: &Meta,
    snap: &Snapshot,
    file: &Path,
) -> Result<Plan, InstanceError> {
    let requested = state::read(file)?;
    plan_state(paths, meta, snap, requested, &file.display().to_string())
}

/// Validates `requested` (from `file`) against the bridge, finds its tasks on the host, and
/// computes every entry: the first error stops it before any write.
fn plan_state(
    paths: &InstancePaths,
    meta: &Meta,
    snap: &Snapshot,
    requested: State,
    file: &str,
) -> Result<Plan, InstanceError> {
    let bridge = BridgeNet {
        address: meta.bridge_address,
    };
    // The engine's containers join what was given; their entries were never the caller's.
    let mut discovered = files::read_discovered(paths)?.unwrap_or_default();
    // A container that went while nobody followed the engine (the agent was killed) left its
    // interface with it: it is gone, the engine's next view says so, and it must not fail `up`
    // or hold back everyone else's state.
    let links: HashSet<&str> = snap.links.iter().map(|l| l.name.as_str()).collect();
    discovered.tasks.retain(|t| {
        t.interface
            .as_deref()
            .is_none_or(|name| links.contains(name))
    });
    let requested = merge::merge(merge::configured(requested), &discovered.tasks).state;
    let rules = state::validate(&requested, bridge).map_err(|error| LoadError::Invalid {
        file: file.to_owned(),
        error,
    })?;
    let resolve_err = |error| InstanceError::Resolve {
        file: file.to_owned(),
        error,
    };
    let mut tasks = tasks::resolve(&requested, snap, meta.bridge_index).map_err(resolve_err)?;
    ask_macs(snap, meta, &mut tasks);
    let applied = read_applied(paths)?;
    let generation = maps::next_policy_generation(paths)?;
    Plan::new(requested, &rules, tasks, applied.as_ref(), generation).map_err(resolve_err)
}

/// Asks by ARP for the MACs the host does not know yet; a task that does not answer gets its MAC
/// learned by the datapath from its first packet.
fn ask_macs(snap: &Snapshot, meta: &Meta, tasks: &mut [ResolvedTask]) {
    let unknown: Vec<Ipv4Addr> = tasks
        .iter()
        .filter(|t| t.mac == [0; 6])
        .map(|t| t.ipv4)
        .collect();
    let (Some(mac), Some((ip, _))) = (
        snap.by_index(meta.bridge_index).and_then(|l| l.mac),
        meta.bridge_address,
    ) else {
        return;
    };
    match arp::resolve(
        meta.bridge_index,
        mac,
        ip,
        &unknown,
        Duration::from_millis(300),
    ) {
        Ok(found) => {
            for t in tasks.iter_mut() {
                if let Some(m) = found.get(&t.ipv4) {
                    t.mac = *m;
                }
            }
        }
        Err(e) => log::warn!("{e}; task MACs will be learned from their traffic"),
    }
}

/// Writes a plan: attach new task interfaces, write its entries, detach what is gone, record it.
/// Policy changes take effect per task in one map write: the new tries are written beside the
/// old, tasks switch, the old entries go. Tracked flows stay unless `reset_flows`, which cuts
/// those the new policy would not allow; returns how many were cut.
fn commit(paths: &InstancePaths, plan: &Plan, reset_flows: bool) -> Result<usize, InstanceError> {
    let meta = read_meta(paths)?.ok_or_else(|| StoreError::NotUp {
        instance: paths.name.clone(),
    })?;
    // Addresses whose task goes: their tracked flows go with the old task.
    let last = files::read_applied(paths)?;
    let applied = last.iter().flat_map(|s| s.tasks.iter());
    let gone = departing(
        &plan
            .task_entries
            .iter()
            .map(|(addr, new)| (*addr, new.ifindex))
            .collect(),
        maps::read_tasks(paths)?
            .into_iter()
            .map(|(addr, info)| (addr, info.ifindex))
            .collect(),
        applied.clone().map(|t| ipv4_to_map(t.ipv4_address)),
    );
    let gone6 = departing(
        &plan.task6_entries.iter().copied().collect(),
        maps::read_tasks6(paths)?,
        applied.filter_map(|t| t.ipv6_address).map(|a| a.octets()),
    );
    // Who was where, for the flow records of interfaces that go now.
    let before = Directory::load(paths).map_err(|e| match e {
        DirectoryError::Store(e) => InstanceError::Store(e),
        DirectoryError::Maps(e) => InstanceError::Maps(e),
    })?;
    for t in &plan.tasks {
        datapath::attach_task(paths, &t.ifname, t.ifindex)?;
    }
    let policy = maps::PolicyEntries {
        peers: &plan.policy.peers,
        rules: &plan.policy.rules,
        peers6: &plan.policy.peers6,
        levels6: &plan.policy.levels6,
    };
    maps::write_policy(paths, &policy)?;
    maps::write_tasks(
        paths,
        &plan.task_entries,
        &plan.task6_entries,
        &plan.iface_entries,
    )?;
    maps::write_ports(paths, &plan.ports)?;
    maps::write_ports6(paths, &plan.ports6)?;
    maps::write_config_flags(paths, plan.config_flags)?;
    maps::remove_stale_policy(paths, &policy)?;
    // Held interfaces (containers not identified yet) stay attached; the agent lets them go.
    let held: HashSet<u32> = maps::read_ifaces(paths)?
        .into_iter()
        .filter(|(_, i)| i.role == ROLE_HELD)
        .map(|(ifindex, _)| ifindex)
        .collect();
    let kept: HashSet<u32> = plan.tasks.iter().map(|t| t.ifindex).collect();
    let leaving: Vec<u32> = datapath::attached_ifindexes(paths)
        .into_iter()
        .filter(|i| *i != meta.uplink_index && !held.contains(i) && !kept.contains(i))
        .collect();
    let mut departed = Vec::new();
    for &ifindex in &leaving {
        datapath::detach(paths, ifindex)?;
        maps::forget_iface(paths, ifindex)?;
        if let Some(task) = before.task(ifindex) {
            departed.push(files::Departed {
                ifindex,
                task: task.clone(),
                at: unix_now(),
            });
        }
    }
    if !departed.is_empty() {
        files::add_departed(paths, departed, unix_now())?;
    }
    abort_for_tests("before-flow-cut");
    maps::remove_flows_of::<CtEntry, _>(paths, &gone)?;
    maps::remove_flows_of::<CtEntry6, _>(paths, &gone6)?;
    let cut = if reset_flows {
        maps::remove_flows(paths, |k, e: &CtEntry| {
            !sg::flow_allowed(&plan.policy, k, e)
        })? + maps::remove_flows(paths, |k, e: &CtEntry6| {
            !sg::flow6_allowed(&plan.policy, k, e)
        })?
    } else {
        0
    };
    files::write_applied(paths, &plan.state)?;
    // After the state it follows: the agent's refresh sets the flags from the applied state's
    // mode too, and would put back the old mode's between the two writes the other way round.
    write_config6_flags(paths, plan.state.host.ipv6_mode)?;
    Ok(cut)
}

/// Sets `CONFIG6`'s flags to those of IPv6 mode `mode` (an apply may switch it), leaving its
/// addresses as they are: the agent's refresh keeps those. Nothing to do for a datapath without
/// `CONFIG6` (an older build's).
fn write_config6_flags(paths: &InstancePaths, mode: Ipv6Mode) -> Result<(), MapsError> {
    if let Some(now) = maps::read_config6(paths)? {
        let flags = entries::config6_flags(mode, now.uplink_ipv6);
        if flags != now.flags {
            maps::write_config6(paths, &Config6 { flags, ..now })?;
        }
    }
    Ok(())
}

/// The addresses (IPv4 or IPv6) whose task goes, or comes back on another interface (a new
/// container given a stopped one's address): in the map (`in_map`: address, ifindex) and not
/// `planned` there on the same interface. A commit cut short (the agent killed between its map
/// writes and its flow cut) took its departed tasks out of the map but not out of the last
/// `applied` state, which is written last: those go now too.
fn departing<A: Copy + Eq + std::hash::Hash>(
    planned: &HashSet<(A, u32)>,
    in_map: Vec<(A, u32)>,
    applied: impl Iterator<Item = A>,
) -> HashSet<A> {
    let mapped: HashSet<A> = in_map.iter().map(|(addr, _)| *addr).collect();
    let mut gone: HashSet<A> = in_map
        .into_iter()
        .filter(|entry| !planned.contains(entry))
        .map(|(addr, _)| addr)
        .collect();
    gone.extend(applied.filter(|addr| !mapped.contains(addr)));
    gone
}

/// Debug builds only: aborts the process at `point` when `ECSNET_TEST_ABORT_AT` names it, as a
/// SIGKILL of the agent in the middle of a commit would stop it, so that tests can show the next
/// commit finishing the work.
fn abort_for_tests(point: &str) {
    if cfg!(debug_assertions)
        && std::env::var_os("ECSNET_TEST_ABORT_AT").is_some_and(|p| p == point)
    {
        std::process::abort();
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What an apply did.
#[derive(Debug)]
pub struct Applied {
    pub state: State,
    /// Tracked flows cut by `--reset-flows`.
    pub flows_cut: usize,
}

/// `ecsnet apply -f FILE`: make the live state equal to the file, or change nothing.
pub fn apply(
    paths: &InstancePaths,
    file: &Path,
    reset_flows: bool,
) -> Result<Applied, InstanceError> {
    let meta = files::require_up(paths)?;
    let _lock = lock_for(paths, &meta)?;
    let snap = Snapshot::read()?;
    let plan = plan_apply(paths, &meta, &snap, file)?;
    let flows_cut = commit(paths, &plan, reset_flows)?;
    Ok(Applied {
        state: plan.state,
        flows_cut,
    })
}

/// Applies a state given in memory (task add/rm, sg apply), under `lock`, taken before the
/// state was read.
pub fn apply_state(
    paths: &InstancePaths,
    _lock: &ApplyLock,
    state: State,
    what: &str,
    reset_flows: bool,
) -> Result<Applied, InstanceError> {
    let meta = files::require_up(paths)?;
    let snap = Snapshot::read()?;
    let plan = plan_state(paths, &meta, &snap, state, what)?;
    let flows_cut = commit(paths, &plan, reset_flows)?;
    Ok(Applied {
        state: plan.state,
        flows_cut,
    })
}

/// What `down` found and removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub agent_stopped: Option<i32>,
    pub had_pins: bool,
    pub had_files: bool,
}

/// `ecsnet down`: stop the agent, detach and unpin everything, remove the run files. Works after
/// a crash too: it only looks at what is on disk.
pub fn teardown(paths: &InstancePaths) -> Result<DownReport, InstanceError> {
    let report = DownReport {
        agent_stopped: process::stop_agent(paths)?,
        had_pins: paths.pin_dir().exists(),
        had_files: paths.run_dir().exists() || paths.socket().exists(),
    };
    datapath::unpin_all(paths)?;
    files::remove(&paths.socket())?;
    files::remove(&paths.run_dir())?;
    let _ = fs::remove_dir(crate::store::paths::RUN_DIR);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_departs_when_it_leaves_the_map_moves_or_was_cut_short() {
        // 1 stays on interface 10, 2 goes, 3 comes back on another interface, 4 was taken out
        // of the map by a commit cut short and is still in the applied state; 5 is new.
        let planned = HashSet::from([(1u8, 10u32), (3, 31), (5, 50)]);
        let in_map = vec![(1, 10), (2, 20), (3, 30)];
        let applied = [1, 2, 3, 4].into_iter();
        assert_eq!(
            departing(&planned, in_map, applied),
            HashSet::from([2, 3, 4])
        );
        assert!(departing::<u8>(&HashSet::new(), vec![], std::iter::empty()).is_empty());
    }
}
