//! The tasks of this host as the datapath finds them: by address (`TASKS`, written by
//! `ecsnet apply`).

use ecsnet_common::maps::TaskInfo;

use crate::maps::TASKS;

/// The task with address `addr` (network byte order).
#[inline(always)]
pub fn by_addr(addr: u32) -> Option<TaskInfo> {
    unsafe { TASKS.get(&addr) }.copied()
}
