//! Loading, attaching and pinning the datapath, and taking it all away again. Everything is
//! pinned (`pins`), so packets keep flowing with no ecsnet process; `down` unpins the directory.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};

use aya_obj::programs::XdpAttachType;

use crate::kernel::pins::{BPFFS, InstancePaths};

/// tc program on the ingress of a task interface: what the task sends.
pub const PROG_TASK_INGRESS: &str = "tc_task_ingress";
/// tc program on the egress of a task interface: what the task receives.
pub const PROG_TASK_EGRESS: &str = "tc_task_egress";
pub const PROG_UPLINK_INGRESS: &str = "tc_uplink_ingress";
pub const PROG_UPLINK_EGRESS: &str = "tc_uplink_egress";
pub const PROG_UPLINK_XDP: &str = "xdp_uplink";
/// tc program that `tc_task_ingress` tail-calls to open a task's new flow; never attached.
pub const PROG_TASK_NEW_FLOW: &str = "tc_task_new_flow";

/// Every tc program, loaded and pinned at `up`.
const TC_PROGRAMS: [&str; 5] = [
    PROG_TASK_INGRESS,
    PROG_TASK_EGRESS,
    PROG_UPLINK_INGRESS,
    PROG_UPLINK_EGRESS,
    PROG_TASK_NEW_FLOW,
];

/// bpffs magic from statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The datapath object, built by build.rs; also loaded by the `BPF_PROG_TEST_RUN` tests.
pub static DATAPATH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ecsnet-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot mount bpffs at {BPFFS}: {0}")]
    MountBpffs(nix::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the datapath into the kernel failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {prog}: {source}")]
    Program {
        prog: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("filling the program array: {source}")]
    TailCalls { source: aya::maps::MapError },
    #[error("attaching {prog} to {iface}: {source}")]
    Attach {
        prog: &'static str,
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (as systemd does at boot).
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let is_bpffs =
        nix::sys::statfs::statfs(BPFFS).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if is_bpffs {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).map_err(io(Path::new(BPFFS)))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(DatapathError::MountBpffs)
}

/// Whether this instance has its programs pinned (it was brought up and not taken down).
pub fn is_loaded(paths: &InstancePaths) -> bool {
    TC_PROGRAMS
        .iter()
        .chain([PROG_UPLINK_XDP].iter())
        .all(|p| paths.prog_pin(p).exists())
}

/// Loads the object with every map pinned under the instance, and pins the programs. Maps that
/// are pinned already are reused, so counters survive a reload. `ct_size` and `flow_table_size`
/// are the capacities of the connection and flow tables, entries.
pub fn load(
    paths: &InstancePaths,
    ct_size: u32,
    flow_table_size: u32,
) -> Result<(), DatapathError> {
    ensure_bpffs()?;
    for dir in [
        paths.pin_dir().join("maps"),
        paths.pin_dir().join("progs"),
        paths.link_dir(),
    ] {
        fs::create_dir_all(&dir).map_err(io(&dir))?;
    }
    if is_loaded(paths) {
        return Ok(());
    }
    let pins: Vec<(&str, PathBuf)> = ecsnet_common::maps::PINNED_MAPS
        .iter()
        .map(|m| (*m, paths.map_pin(m)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.map_max_entries(ecsnet_common::maps::MAP_CT, ct_size);
    loader.map_max_entries(
        ecsnet_common::maps::MAP_CT_NEW,
        ecsnet_common::maps::ct_new_size(ct_size),
    );
    loader.map_max_entries(
        ecsnet_common::maps::MAP_NAT_USE,
        ecsnet_common::maps::nat_use_size(ct_size),
    );
    loader.map_max_entries(ecsnet_common::flow::MAP_FLOWS, flow_table_size);
    let mut ebpf = loader.load(DATAPATH).map_err(DatapathError::Load)?;
    for prog in TC_PROGRAMS {
        let p = classifier(&mut ebpf, prog)?;
        p.load()
            .map_err(|source| DatapathError::Program { prog, source })?;
        pin_program(p.pin(paths.prog_pin(prog)), paths.prog_pin(prog))?;
    }
    fill_tail_calls(&mut ebpf)?;
    let prog = PROG_UPLINK_XDP;
    let x: &mut Xdp = ebpf
        .program_mut(prog)
        .ok_or(DatapathError::Program {
            prog,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { prog, source })?;
    x.load()
        .map_err(|source| DatapathError::Program { prog, source })?;
    pin_program(x.pin(paths.prog_pin(prog)), paths.prog_pin(prog))?;
    Ok(())
}

/// Loads the tail-called programs of an object whose maps are set up, and fills its program
/// array: for harnesses that load single programs (`load` does both for the instance).
pub fn load_tail_called(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    let prog = PROG_TASK_NEW_FLOW;
    classifier(ebpf, prog)?
        .load()
        .map_err(|source| DatapathError::Program { prog, source })?;
    fill_tail_calls(ebpf)
}

/// The tc program `prog` of an object.
fn classifier<'a>(
    ebpf: &'a mut aya::Ebpf,
    prog: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(prog)
        .ok_or(DatapathError::Program {
            prog,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { prog, source })
}

/// Puts the tail-called programs of a loaded object into its program array (the `PROGS` map;
/// pinned with the other maps, so the entries live as long as the instance).
fn fill_tail_calls(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    let prog = PROG_TASK_NEW_FLOW;
    let fd = classifier(ebpf, prog)?
        .fd()
        .map_err(|source| DatapathError::Program { prog, source })?
        .try_clone()
        .map_err(|e| DatapathError::Program {
            prog,
            source: aya::programs::ProgramError::IOError(e),
        })?;
    let map = ecsnet_common::maps::MAP_PROGS;
    let mut progs: aya::maps::ProgramArray<&mut aya::maps::MapData> = ebpf
        .map_mut(map)
        .ok_or(DatapathError::TailCalls {
            source: aya::maps::MapError::InvalidName { name: map.into() },
        })?
        .try_into()
        .map_err(|source| DatapathError::TailCalls { source })?;
    progs
        .set(ecsnet_common::maps::PROG_TASK_NEW_FLOW, &fd, 0)
        .map_err(|source| DatapathError::TailCalls { source })
}

fn pin_program(res: Result<(), aya::pin::PinError>, path: PathBuf) -> Result<(), DatapathError> {
    res.map_err(|source| DatapathError::Pin { path, source })
}

/// Pins a link taken from its program, so it outlives this process.
fn pin_link(
    link: Result<FdLink, aya::programs::links::LinkError>,
    pin: PathBuf,
) -> Result<(), DatapathError> {
    let fd = link.map_err(|source| DatapathError::Link {
        path: pin.clone(),
        source,
    })?;
    fd.pin(&pin)
        .map_err(|source| DatapathError::Pin { path: pin, source })?;
    Ok(())
}

fn tc_link_pin(paths: &InstancePaths, ifindex: u32, ty: TcAttachType) -> PathBuf {
    let dir = match ty {
        TcAttachType::Ingress => "ingress",
        TcAttachType::Egress => "egress",
    };
    paths.link_dir().join(format!("tcx-{dir}-{ifindex}"))
}

fn xdp_link_pin(paths: &InstancePaths, ifindex: u32) -> PathBuf {
    paths.link_dir().join(format!("xdp-{ifindex}"))
}

/// Attaches a pinned tc program with tcx to `ifindex` and pins the link; a link that is pinned
/// already is left as it is (idempotent).
fn attach_tc(
    paths: &InstancePaths,
    prog: &'static str,
    ifname: &str,
    ifindex: u32,
    ty: TcAttachType,
) -> Result<(), DatapathError> {
    let pin = tc_link_pin(paths, ifindex, ty);
    if pin.exists() {
        return Ok(());
    }
    let mut p = SchedClassifier::from_pin(paths.prog_pin(prog))
        .map_err(|source| DatapathError::Program { prog, source })?;
    let attach_err = |source| DatapathError::Attach {
        prog,
        iface: ifname.to_owned(),
        source,
    };
    let id = p
        .attach(
            ifindex,
            TcAttach::Tcx {
                attach_type: ty,
                order: LinkOrder::default(),
            },
        )
        .map_err(attach_err)?;
    let link = p.take_link(id).map_err(attach_err)?;
    pin_link(link.try_into(), pin)
}

/// Attaches the programs `progs` (ingress, egress) to `ifindex` with tcx.
fn attach_tc_both(
    paths: &InstancePaths,
    progs: [&'static str; 2],
    ifname: &str,
    ifindex: u32,
) -> Result<(), DatapathError> {
    for (prog, ty) in progs
        .into_iter()
        .zip([TcAttachType::Ingress, TcAttachType::Egress])
    {
        attach_tc(paths, prog, ifname, ifindex, ty)?;
    }
    Ok(())
}

/// Attaches the task programs to a task interface.
pub fn attach_task(paths: &InstancePaths, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
    attach_tc_both(
        paths,
        [PROG_TASK_INGRESS, PROG_TASK_EGRESS],
        ifname,
        ifindex,
    )
}

/// Attaches the uplink programs: tcx both ways and, unless `mode` is None (`--xdp-mode off`),
/// XDP in `mode`.
pub fn attach_uplink(
    paths: &InstancePaths,
    ifname: &str,
    ifindex: u32,
    mode: Option<XdpMode>,
) -> Result<(), DatapathError> {
    attach_tc_both(
        paths,
        [PROG_UPLINK_INGRESS, PROG_UPLINK_EGRESS],
        ifname,
        ifindex,
    )?;
    let pin = xdp_link_pin(paths, ifindex);
    let Some(mode) = mode else {
        return Ok(());
    };
    if pin.exists() {
        return Ok(());
    }
    let prog = PROG_UPLINK_XDP;
    let mut x = Xdp::from_pin(paths.prog_pin(prog), XdpAttachType::Interface)
        .map_err(|source| DatapathError::Program { prog, source })?;
    let attach_err = |source| DatapathError::Attach {
        prog,
        iface: ifname.to_owned(),
        source,
    };
    let id = x.attach(ifindex, mode).map_err(attach_err)?;
    let link = x.take_link(id).map_err(attach_err)?;
    pin_link(link.try_into(), pin)
}

/// ifindexes that have a pinned link of this instance.
pub fn attached_ifindexes(paths: &InstancePaths) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_dir(paths.link_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.rsplit('-').next()?.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Detaches every program of this instance from `ifindex` by unpinning its links.
pub fn detach(paths: &InstancePaths, ifindex: u32) -> Result<(), DatapathError> {
    for pin in [
        tc_link_pin(paths, ifindex, TcAttachType::Ingress),
        tc_link_pin(paths, ifindex, TcAttachType::Egress),
        xdp_link_pin(paths, ifindex),
    ] {
        unpin_link(&pin)?;
    }
    Ok(())
}

fn unpin_link(pin: &Path) -> Result<(), DatapathError> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => link.unpin().map(drop).map_err(|source| DatapathError::Io {
            path: pin.to_owned(),
            source: std::io::Error::other(source.to_string()),
        }),
        Err(_) if !pin.exists() => Ok(()),
        // A pin we cannot open as a link: remove the file all the same.
        Err(_) => fs::remove_file(pin).map_err(io(pin)),
    }
}

/// Removes everything this instance pinned. Links go first, so no program is left attached.
pub fn unpin_all(paths: &InstancePaths) -> Result<(), DatapathError> {
    let dir = paths.pin_dir();
    if !dir.exists() {
        return Ok(());
    }
    for ifindex in attached_ifindexes(paths) {
        detach(paths, ifindex)?;
    }
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(&dir)(e)),
    }
    // Leave no empty /sys/fs/bpf/ecsnet behind either.
    let _ = fs::remove_dir(PathBuf::from(BPFFS).join("ecsnet"));
    Ok(())
}

/// Program ids of this instance's pinned programs (for the agent's log forwarding).
pub fn pinned_program_ids(paths: &InstancePaths) -> Vec<u32> {
    let mut ids = Vec::new();
    for prog in TC_PROGRAMS {
        if let Ok(p) = SchedClassifier::from_pin(paths.prog_pin(prog))
            && let Ok(info) = p.info()
        {
            ids.push(info.id());
        }
    }
    ids
}
