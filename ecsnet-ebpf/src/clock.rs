//! One clock read per program run. Reading the clock costs about 20 ns on this kind of VM, and a
//! packet of an east-west flow needed three (the conntrack entry and two flow records): the
//! program reads it once at its start with [`stamp`], and everything after uses [`now`].

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};

/// This CPU's clock reading of the program run in progress. Not pinned: scratch space.
#[map(name = "CLOCK")]
static CLOCK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Reads the clock for this program run.
#[inline(always)]
pub fn stamp() {
    if let Some(slot) = CLOCK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; programs do not nest on one CPU for one hook, and every
        // program that reads it stamped it first in the same run.
        unsafe { *slot = bpf_ktime_get_ns() };
    }
}

/// The reading of [`stamp`] in this program run.
#[inline(always)]
pub fn now() -> u64 {
    match CLOCK.get_ptr(0) {
        // SAFETY: this CPU's slot, see `stamp`.
        Some(slot) => unsafe { *slot },
        None => unsafe { bpf_ktime_get_ns() },
    }
}
