//! The tasks of this host as the datapath finds them: by address (`TASKS`, written by
//! `ecsnet apply`) and by the interface user space attached for them (`IFACES`).

use ecsnet_common::{
    DropReason,
    maps::{CONFIG_DEFAULT_DENY, Config, ROLE_HELD, ROLE_TASK, TaskInfo},
};

use crate::{
    maps::{IFACES, TASKS, TASKS6},
    verdict::{self, Verdict},
};

/// The task with address `addr` (network byte order).
#[inline(always)]
pub fn by_addr(addr: u32) -> Option<TaskInfo> {
    unsafe { TASKS.get(&addr) }.copied()
}

/// The task with address `addr` if its interface is `ifindex`: the common case, found with one
/// lookup. The pointer is a `TASKS` value, valid for this program run.
#[inline(always)]
pub fn at(addr: u32, ifindex: u32) -> Option<*mut TaskInfo> {
    let task = TASKS.get_ptr_mut(&addr)?;
    // SAFETY: a TASKS value pointer, valid for this program run.
    if unsafe { (*task).ifindex } == ifindex {
        Some(task)
    } else {
        None
    }
}

/// The interface of the task with IPv6 address `addr`.
#[inline(always)]
pub fn iface_of6(addr: &[u8; 16]) -> Option<u32> {
    unsafe { TASKS6.get(addr) }.copied()
}

/// The task whose interface is `ifindex`, as user space attached it: its address and its
/// `TASKS` value (valid for this program run). None for an interface that is no task's.
#[inline(always)]
pub fn by_iface(ifindex: u32) -> Option<(u32, *mut TaskInfo)> {
    let iface = unsafe { IFACES.get(&ifindex) }?;
    if iface.role != ROLE_TASK {
        return None;
    }
    let task = TASKS.get_ptr_mut(&iface.ipv4)?;
    Some((iface.ipv4, task))
}

/// A packet on an interface that is no task's: the kernel's path, as without ecsnet, unless the
/// interface is held (`ROLE_HELD`: a container ecsnet has not identified yet) and the default
/// policy is deny, which lets nothing through until the container's own policy is written.
#[inline(always)]
pub fn unknown_iface(cfg: &Config, ifindex: u32) -> Result<Verdict, DropReason> {
    let held = unsafe { IFACES.get(&ifindex) }.is_some_and(|i| i.role == ROLE_HELD);
    verdict::pass_or(
        !held || cfg.flags & CONFIG_DEFAULT_DENY == 0,
        DropReason::Unidentified,
    )
}
