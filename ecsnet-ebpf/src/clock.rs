//! One clock read per program run, and a cheap one. The conntrack entry and the flow records
//! need seconds, not nanoseconds: the program reads the coarse clock (`CLOCK_MONOTONIC_COARSE`,
//! the time of the last tick, at most 1/HZ behind `CLOCK_MONOTONIC`) once at its start with
//! [`stamp`], and everything after uses [`now`]. The precise clock cost about 20 ns a read on
//! this kind of VM (`read_tsc`), and an east-west packet needed three. Events, which `monitor`
//! orders, keep the precise clock.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, macros::map, maps::PerCpuArray};

/// This CPU's clock reading of the program run in progress. Not pinned: scratch space.
#[map(name = "CLOCK")]
static CLOCK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Reads the clock for this program run.
#[inline(always)]
pub fn stamp() {
    if let Some(slot) = CLOCK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; programs do not nest on one CPU for one hook, and every
        // program that reads it stamped it first in the same run.
        unsafe { *slot = bpf_ktime_get_coarse_ns() };
    }
}

/// The reading of [`stamp`] in this program run.
#[inline(always)]
pub fn now() -> u64 {
    match CLOCK.get_ptr(0) {
        // SAFETY: this CPU's slot, see `stamp`.
        Some(slot) => unsafe { *slot },
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}
