//! Loading, attaching and pinning the datapath, replacing its programs in place, and taking it
//! all away again. Everything is pinned (`pins`), so packets keep flowing with no ecsnet process;
//! `down` unpins the directory.

use std::{
    borrow::Cow,
    collections::HashMap,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};

use aya_obj::programs::XdpAttachType;

use crate::kernel::{
    layout::{self, Changed, LayoutError, Layouts},
    pins::{BPFFS, InstancePaths},
};

/// tc program on the ingress of a task interface: what the task sends.
pub const PROG_TASK_INGRESS: &str = "tc_task_ingress";
/// tc program on the egress of a task interface: what the task receives.
pub const PROG_TASK_EGRESS: &str = "tc_task_egress";
pub const PROG_UPLINK_INGRESS: &str = "tc_uplink_ingress";
pub const PROG_UPLINK_EGRESS: &str = "tc_uplink_egress";
pub const PROG_UPLINK_XDP: &str = "xdp_uplink";
/// tc program that `tc_task_ingress` tail-calls to open a task's new flow; never attached.
pub const PROG_TASK_NEW_FLOW: &str = "tc_task_new_flow";
/// tc program that `tc_task_ingress` tail-calls for the IPv6 a task sends; never attached.
pub const PROG_TASK_IPV6: &str = "tc_task_ipv6";
/// tc program that `tc_task_ipv6` tail-calls to track, police and forward the IPv6 a task
/// sends; never attached.
pub const PROG_TASK_IPV6_FLOW: &str = "tc_task_ipv6_flow";
/// tc program that `tc_task_egress` tail-calls to police the IPv6 the kernel delivers to a
/// task with a policy; never attached.
pub const PROG_TASK_IPV6_TO: &str = "tc_task_ipv6_to";
/// tc program that `tc_uplink_ingress` tail-calls for the IPv6 arriving on the uplink
/// (published ports over IPv6, replies of translated flows); never attached.
pub const PROG_UPLINK_IPV6: &str = "tc_uplink_ipv6";
/// tc program that `tc_task_ipv6_flow` tail-calls to translate what a task sends out of the
/// host from a new state (a masqueraded flow, an `ICMPv6` error about a translated one); never
/// attached.
pub const PROG_TASK_IPV6_NAT: &str = "tc_task_ipv6_nat";

/// Every tc program, loaded and pinned at `up`.
const TC_PROGRAMS: [&str; 10] = [
    PROG_TASK_INGRESS,
    PROG_TASK_EGRESS,
    PROG_UPLINK_INGRESS,
    PROG_UPLINK_EGRESS,
    PROG_TASK_NEW_FLOW,
    PROG_TASK_IPV6,
    PROG_TASK_IPV6_FLOW,
    PROG_TASK_IPV6_TO,
    PROG_UPLINK_IPV6,
    PROG_TASK_IPV6_NAT,
];

/// The tail-called programs: each one's program array and slot.
const TAIL_CALLED: [(&str, &str, u32); 6] = [
    (
        PROG_TASK_NEW_FLOW,
        ecsnet_common::maps::MAP_PROGS,
        ecsnet_common::maps::PROG_TASK_NEW_FLOW,
    ),
    (
        PROG_TASK_IPV6,
        ecsnet_common::maps::MAP_PROGS6,
        ecsnet_common::maps::PROG6_TASK_FROM,
    ),
    (
        PROG_TASK_IPV6_FLOW,
        ecsnet_common::maps::MAP_PROGS6,
        ecsnet_common::maps::PROG6_TASK_FLOW,
    ),
    (
        PROG_TASK_IPV6_TO,
        ecsnet_common::maps::MAP_PROGS6,
        ecsnet_common::maps::PROG6_TASK_TO,
    ),
    (
        PROG_UPLINK_IPV6,
        ecsnet_common::maps::MAP_PROGS6,
        ecsnet_common::maps::PROG6_UPLINK,
    ),
    (
        PROG_TASK_IPV6_NAT,
        ecsnet_common::maps::MAP_PROGS6,
        ecsnet_common::maps::PROG6_TASK_NAT,
    ),
];

/// bpffs magic from statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The datapath object, built by build.rs; also loaded by the `BPF_PROG_TEST_RUN` tests.
pub static DATAPATH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ecsnet-ebpf"));

/// For development and the upgrade test only: load the datapath object from this file instead
/// of the one built into the binary, to have "another build" without another binary.
pub const OBJECT_ENV: &str = "ECSNET_DATAPATH_OBJECT";

/// The datapath object `up` and `upgrade` load: `DATAPATH`, or the file `OBJECT_ENV` names.
pub fn object() -> Result<Cow<'static, [u8]>, DatapathError> {
    match std::env::var_os(OBJECT_ENV) {
        None => Ok(Cow::Borrowed(DATAPATH)),
        Some(path) => {
            let path = PathBuf::from(path);
            // A Vec from the allocator is 16-byte aligned, as the ELF parser wants.
            fs::read(&path).map(Cow::Owned).map_err(io(&path))
        }
    }
}

/// The capacities `up` gives the connection and flow tables, entries: the maps sized at load
/// time rather than by the object.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub ct: u32,
    pub flow_table: u32,
}

impl Sizes {
    fn by_map(self) -> [(&'static str, u32); 8] {
        use ecsnet_common::maps::ct_new_size;
        [
            (ecsnet_common::maps::MAP_CT, self.ct),
            (ecsnet_common::maps::MAP_CT_NEW, ct_new_size(self.ct)),
            // IPv6 flows get tables of their own, as large.
            (ecsnet_common::maps::MAP_CT6, self.ct),
            (ecsnet_common::maps::MAP_CT6_NEW, ct_new_size(self.ct)),
            (
                ecsnet_common::maps::MAP_NAT_USE,
                ecsnet_common::maps::nat_use_size(self.ct),
            ),
            (
                ecsnet_common::maps::MAP_NAT_USE6,
                ecsnet_common::maps::nat_use_size(self.ct),
            ),
            (ecsnet_common::flow::MAP_FLOWS, self.flow_table),
            (ecsnet_common::flow::MAP_FLOWS6, self.flow_table),
        ]
    }
}

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
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// An upgrade that would hand new programs a map they would misread; nothing was changed.
    #[error(
        "cannot upgrade in place: {0} between the running datapath and this build; nothing was changed (`ecsnet down` then `ecsnet up` starts over, losing tracked flows)"
    )]
    LayoutChanged(Changed),
    #[error("link {path}: its program {prog_id} is none of this instance's programs")]
    UnknownLinkProgram { path: PathBuf, prog_id: u32 },
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

/// The programs attached to interfaces, which every build has had: their pins say whether a
/// datapath is loaded. A tail-called program a build adds (`tc_task_ipv6`) has no pin in an
/// instance an older build brought up; `replace` pins it.
const ATTACHED: [&str; 5] = [
    PROG_TASK_INGRESS,
    PROG_TASK_EGRESS,
    PROG_UPLINK_INGRESS,
    PROG_UPLINK_EGRESS,
    PROG_UPLINK_XDP,
];

/// Whether this instance has its programs pinned (it was brought up and not taken down), by
/// whichever build.
pub fn is_loaded(paths: &InstancePaths) -> bool {
    ATTACHED.iter().all(|p| paths.prog_pin(p).exists())
}

/// Loads the object with every map pinned under the instance, pins the programs and stamps the
/// maps' layouts. Maps that are pinned already are reused, so counters survive a reload. A
/// datapath that is loaded already is left as it is when it came from this object, and has its
/// programs replaced in place (`replace`) when it came from another.
pub fn load(paths: &InstancePaths, sizes: Sizes) -> Result<(), DatapathError> {
    ensure_bpffs()?;
    for dir in [
        paths.pin_dir().join("maps"),
        paths.pin_dir().join("progs"),
        paths.link_dir(),
    ] {
        fs::create_dir_all(&dir).map_err(io(&dir))?;
    }
    let object = object()?;
    if is_loaded(paths) {
        if is_current(paths, &object)? {
            return Ok(());
        }
        return replace(paths, &object, sizes).map(drop);
    }
    let layouts = layout::of_object(&object, &sizes.by_map())?;
    let mut ebpf = load_object(paths, &object, sizes)?;
    for prog in TC_PROGRAMS {
        let p = classifier(&mut ebpf, prog)?;
        p.load()
            .map_err(|source| DatapathError::Program { prog, source })?;
        pin_program(p.pin(paths.prog_pin(prog)), paths.prog_pin(prog))?;
    }
    fill_tail_calls(&mut ebpf)?;
    let x = xdp(&mut ebpf)?;
    let prog = PROG_UPLINK_XDP;
    x.load()
        .map_err(|source| DatapathError::Program { prog, source })?;
    pin_program(x.pin(paths.prog_pin(prog)), paths.prog_pin(prog))?;
    layout::write(paths, layout::object_hash(&object), &layouts)?;
    Ok(())
}

/// Whether the loaded datapath came from `object` (its stamps carry the object's hash).
pub fn is_current(paths: &InstancePaths, object: &[u8]) -> Result<bool, DatapathError> {
    Ok(layout::read(paths)?.object == Some(layout::object_hash(object)))
}

/// `object` opened with every map pinned under the instance (made where none is pinned yet),
/// its programs not loaded.
fn load_object(
    paths: &InstancePaths,
    object: &[u8],
    sizes: Sizes,
) -> Result<aya::Ebpf, DatapathError> {
    let pins: Vec<(&str, PathBuf)> = ecsnet_common::maps::PINNED_MAPS
        .iter()
        .map(|m| (*m, paths.map_pin(m)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    for (map, size) in sizes.by_map() {
        loader.map_max_entries(map, size);
    }
    loader.load(object).map_err(DatapathError::Load)
}

/// The XDP program of an object.
fn xdp(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, DatapathError> {
    program(ebpf, PROG_UPLINK_XDP)
}

/// What an upgrade in place did.
#[derive(Debug, Clone, Copy)]
pub struct Replaced {
    pub programs: usize,
    pub links: usize,
}

/// Replaces the programs of a loaded datapath with `object`'s, keeping every pinned map and
/// link: the stamps are compared first (a changed layout is `LayoutChanged`, with nothing
/// changed), the new programs are loaded against the pinned maps, the program array gets the
/// new tail-called program, each pinned link is switched to its new program with
/// `bpf_link_update` (no detach: the hook always has a program), and the program pins are
/// replaced by rename.
pub fn replace(
    paths: &InstancePaths,
    object: &[u8],
    sizes: Sizes,
) -> Result<Replaced, DatapathError> {
    let now = layout::of_object(object, &sizes.by_map())?;
    let was = layout::read(paths)?;
    check_layouts(&was.layouts, &now)?;
    // Which program each link runs now, by the old programs' ids.
    let old_ids = pinned_ids(paths);
    let links = pinned_links(paths, &old_ids)?;
    let mut ebpf = load_object(paths, object, sizes)?;
    for prog in TC_PROGRAMS {
        classifier(&mut ebpf, prog)?
            .load()
            .map_err(|source| DatapathError::Program { prog, source })?;
    }
    let prog = PROG_UPLINK_XDP;
    xdp(&mut ebpf)?
        .load()
        .map_err(|source| DatapathError::Program { prog, source })?;
    // The new programs pinned beside the old ones; a failure here leaves the datapath as it was.
    if let Err(e) = pin_next(paths, &mut ebpf) {
        unpin_next(paths);
        return Err(e);
    }
    // Everything is loaded, verified and pinned: from here on the running datapath changes.
    fill_tail_calls(&mut ebpf)?;
    for (pin, prog) in &links {
        update_link(&mut ebpf, pin, prog)?;
    }
    for prog in all_programs() {
        let path = paths.prog_pin(prog);
        fs::rename(next_pin(paths, prog), &path).map_err(io(&path))?;
    }
    layout::write(paths, layout::object_hash(object), &now)?;
    Ok(Replaced {
        programs: TC_PROGRAMS.len() + 1,
        links: links.len(),
    })
}

/// Refuses a change of any map's layout, before anything is touched.
pub fn check_layouts(was: &Layouts, now: &Layouts) -> Result<(), DatapathError> {
    match layout::first_change(was, now) {
        Some(c) => Err(DatapathError::LayoutChanged(c)),
        None => Ok(()),
    }
}

/// The pinned programs' ids, to their names.
fn pinned_ids(paths: &InstancePaths) -> HashMap<u32, &'static str> {
    let mut ids = HashMap::new();
    for prog in TC_PROGRAMS {
        if let Ok(p) = SchedClassifier::from_pin(paths.prog_pin(prog))
            && let Ok(info) = p.info()
        {
            ids.insert(info.id(), prog);
        }
    }
    if let Ok(x) = Xdp::from_pin(paths.prog_pin(PROG_UPLINK_XDP), XdpAttachType::Interface)
        && let Ok(info) = x.info()
    {
        ids.insert(info.id(), PROG_UPLINK_XDP);
    }
    ids
}

/// Every pinned link with the name of the program it runs now.
fn pinned_links(
    paths: &InstancePaths,
    old_ids: &HashMap<u32, &'static str>,
) -> Result<Vec<(PathBuf, &'static str)>, DatapathError> {
    let mut links = Vec::new();
    for entry in fs::read_dir(paths.link_dir()).map_err(io(&paths.link_dir()))? {
        let path = entry.map_err(io(&paths.link_dir()))?.path();
        let link_err = |source| DatapathError::Link {
            path: path.clone(),
            source,
        };
        let info = PinnedLink::from_pin(&path)
            .map_err(link_err)
            .and_then(|l| FdLink::from(l).info().map_err(link_err))?;
        let prog = old_ids.get(&info.program_id()).copied().ok_or_else(|| {
            DatapathError::UnknownLinkProgram {
                path: path.clone(),
                prog_id: info.program_id(),
            }
        })?;
        links.push((path, prog));
    }
    links.sort();
    Ok(links)
}

/// Switches the pinned link `pin` to the loaded program `prog` of `ebpf` (`bpf_link_update`).
fn update_link(ebpf: &mut aya::Ebpf, pin: &Path, prog: &'static str) -> Result<(), DatapathError> {
    let link_err = |source| DatapathError::Link {
        path: pin.to_owned(),
        source,
    };
    let fd = FdLink::from(PinnedLink::from_pin(pin).map_err(link_err)?);
    let update_err = |source| DatapathError::Attach {
        prog,
        iface: pin.display().to_string(),
        source,
    };
    if prog == PROG_UPLINK_XDP {
        let x = xdp(ebpf)?;
        let id = x
            .attach_to_link(XdpLink::try_from(fd).map_err(link_err)?)
            .map_err(update_err)?;
        // Closing our descriptor leaves the link to its pin.
        drop(x.take_link(id).map_err(update_err)?);
    } else {
        let p = classifier(ebpf, prog)?;
        let id = p
            .attach_to_link(SchedClassifierLink::try_from(fd).map_err(link_err)?)
            .map_err(update_err)?;
        drop(p.take_link(id).map_err(update_err)?);
    }
    Ok(())
}

/// Every program, tc and XDP.
fn all_programs() -> impl Iterator<Item = &'static str> {
    TC_PROGRAMS.into_iter().chain([PROG_UPLINK_XDP])
}

/// Where an upgrade pins a new program before it renames it over the old one's pin (bpffs
/// allows no dots in names).
fn next_pin(paths: &InstancePaths, prog: &str) -> PathBuf {
    paths.prog_pin(&format!("{prog}_next"))
}

/// Pins every loaded program of `ebpf` at its `next_pin`.
fn pin_next(paths: &InstancePaths, ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    unpin_next(paths);
    for prog in TC_PROGRAMS {
        let path = next_pin(paths, prog);
        pin_program(classifier(ebpf, prog)?.pin(&path), path)?;
    }
    let path = next_pin(paths, PROG_UPLINK_XDP);
    pin_program(xdp(ebpf)?.pin(&path), path)
}

/// Removes what `pin_next` pinned (after a failure, or one left by an earlier failure).
fn unpin_next(paths: &InstancePaths) {
    for prog in all_programs() {
        let _ = fs::remove_file(next_pin(paths, prog));
    }
}

/// Loads the tail-called programs of an object whose maps are set up, and fills its program
/// array: for harnesses that load single programs (`load` does both for the instance).
pub fn load_tail_called(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    for (prog, _, _) in TAIL_CALLED {
        classifier(ebpf, prog)?
            .load()
            .map_err(|source| DatapathError::Program { prog, source })?;
    }
    fill_tail_calls(ebpf)
}

/// The tc program `prog` of an object.
fn classifier<'a>(
    ebpf: &'a mut aya::Ebpf,
    prog: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    program(ebpf, prog)
}

/// The program `prog` of an object, as its kind `P`.
fn program<'a, P>(ebpf: &'a mut aya::Ebpf, prog: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(prog)
        .ok_or(DatapathError::Program {
            prog,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { prog, source })
}

/// Puts the tail-called programs of a loaded object into their program arrays (`PROGS`,
/// `PROGS6`; pinned with the other maps, so the entries live as long as the instance).
fn fill_tail_calls(ebpf: &mut aya::Ebpf) -> Result<(), DatapathError> {
    for (prog, map, slot) in TAIL_CALLED {
        let fd = classifier(ebpf, prog)?
            .fd()
            .map_err(|source| DatapathError::Program { prog, source })?
            .try_clone()
            .map_err(|e| DatapathError::Program {
                prog,
                source: aya::programs::ProgramError::IOError(e),
            })?;
        let mut progs: aya::maps::ProgramArray<&mut aya::maps::MapData> = ebpf
            .map_mut(map)
            .ok_or(DatapathError::TailCalls {
                source: aya::maps::MapError::InvalidName { name: map.into() },
            })?
            .try_into()
            .map_err(|source| DatapathError::TailCalls { source })?;
        progs
            .set(slot, &fd, 0)
            .map_err(|source| DatapathError::TailCalls { source })?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use ecsnet_common::maps::{MAP_NAT_USE, MAP_NAT_USE6, nat_use_size};

    use super::*;

    #[test]
    fn both_families_masquerade_counts_are_sized_by_the_connection_tables() {
        let sizes = Sizes {
            ct: 1 << 20,
            flow_table: 1000,
        };
        let by_map: std::collections::HashMap<_, _> = sizes.by_map().into_iter().collect();
        assert_eq!(by_map[MAP_NAT_USE], nat_use_size(1 << 20));
        assert_eq!(by_map[MAP_NAT_USE6], nat_use_size(1 << 20));
        assert_eq!(by_map.len(), sizes.by_map().len(), "each map sized once");
    }
}
