//! Each task's share of the masquerade ports towards one destination (address, port, protocol):
//! a new masqueraded flow takes one of the `NatConfig::task_ports` its task may hold there, or
//! is refused (`NAT_TASK_PORT_LIMIT`). With no limit set (0) nothing is counted.
//!
//! The counts live in `NAT_USE` (`NAT_USE6` for IPv6), updated atomically (other CPUs open flows of the same task).
//! Only creations are counted here; the agent sets each count to the flows the connection
//! tables hold on every GC pass, since flows expire and `CT_NEW` evicts silently.

use aya_ebpf::{bindings::BPF_NOEXIST, maps::HashMap};
use ecsnet_common::{
    DropReason,
    ct::{CtKey, CtKey6},
    maps::{NatUseKey, NatUseKey6},
};

use crate::{
    conntrack::EEXIST,
    maps::{NAT_CONFIG, NAT_USE, NAT_USE6},
};

const NOEXIST: u64 = BPF_NOEXIST as u64;

/// Flows one task may masquerade towards one destination; 0: no limit.
#[inline(always)]
fn limit() -> u64 {
    NAT_CONFIG.get(0).map_or(0, |c| u64::from(c.task_ports))
}

/// Adds `v` (wrapping: `u64::MAX` takes one away) to the count at `p` atomically, as other
/// CPUs may open flows of the same task. The BPF target offers no atomic read-modify-write in
/// `core::sync::atomic`; the intrinsic is LLVM's `atomicrmw add`, which becomes the
/// instruction `BPF_ATOMIC | BPF_ADD` (the CPU version the datapath is built for has no
/// `BPF_FETCH`, so the old value cannot be had).
#[inline(always)]
fn atomic_add(p: *mut u64, v: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `p` is a map value of `NAT_USE`, valid for this program run.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above; on the host this is only type-checked.
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(p)
            .fetch_add(v, core::sync::atomic::Ordering::Relaxed);
    }
}

/// The count at `p`.
#[inline(always)]
fn read(p: *mut u64) -> u64 {
    // SAFETY: a map value, valid for this program run; other CPUs may be adding to it.
    unsafe { p.read_volatile() }
}

/// Adds one to the count at `p` unless it is at `cap` already. Read and add are two steps: CPUs
/// opening flows of the same task to the same destination at the same moment can take it past
/// `cap` by one each, never further.
#[inline(always)]
fn add(p: *mut u64, cap: u64) -> Result<(), DropReason> {
    if read(p) >= cap {
        return Err(DropReason::NatTaskPortLimit);
    }
    atomic_add(p, 1);
    Ok(())
}

/// Takes one of the ports the task of the masqueraded flow `key` (its original tuple) may hold
/// towards the flow's destination, or refuses the flow when the task holds them all. A flow
/// that is not created after all gives it back ([`give_back`]). A function of its own in the
/// program (a BPF-to-BPF call): inlined, its branches each carried a different stack into the
/// port choice, and the verifier walked that once for each (+50% for `tc_task_new_flow`).
#[inline(never)]
pub fn take(key: &CtKey) -> Result<(), DropReason> {
    take_in(&NAT_USE, &NatUseKey::of(key))
}

/// [`take`] for an IPv6 flow (`NAT_USE6`).
#[inline(never)]
pub fn take6(key: &CtKey6) -> Result<(), DropReason> {
    take_in(&NAT_USE6, &NatUseKey6::of(key))
}

/// [`take`] of the count at `k` in `counts`.
#[inline(always)]
fn take_in<K>(counts: &HashMap<K, u64>, k: &K) -> Result<(), DropReason> {
    let cap = limit();
    if cap == 0 {
        return Ok(());
    }
    if let Some(p) = counts.get_ptr_mut(k) {
        return add(p, cap);
    }
    // Counted a moment ago by another CPU: count on it. Gone again (the agent removed a count
    // it found at zero): this flow is counted at the agent's next pass. Any other failure is a
    // full map, which holds a key per flow the tables can hold: they are full too and the flow
    // fails there (CT_TABLE_FULL); should it fit after all (keys at zero the agent has not
    // removed yet), the agent's next pass counts it.
    if let Err(e) = counts.insert(k, &1, NOEXIST)
        && -i64::from(e) == EEXIST
        && let Some(p) = counts.get_ptr_mut(k)
    {
        return add(p, cap);
    }
    Ok(())
}

/// Gives back what [`take`] took for `key`, when its flow could not be created.
#[inline(always)]
pub fn give_back(key: &CtKey) {
    give_back_in(&NAT_USE, &NatUseKey::of(key));
}

/// [`give_back`] for an IPv6 flow.
#[inline(always)]
pub fn give_back6(key: &CtKey6) {
    give_back_in(&NAT_USE6, &NatUseKey6::of(key));
}

#[inline(always)]
fn give_back_in<K>(counts: &HashMap<K, u64>, k: &K) {
    if limit() == 0 {
        return;
    }
    // Never below zero: the agent may have set the count since `take`.
    if let Some(p) = counts.get_ptr_mut(k)
        && read(p) > 0
    {
        atomic_add(p, u64::MAX);
    }
}
