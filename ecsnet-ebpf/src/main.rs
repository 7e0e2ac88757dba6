//! The ecsnet datapath. The entry points in `programs` (`task`, `uplink`) only wire the modules
//! below them: `clock` reads the time once per run, `parse` and `parse6` read headers, `tasks` finds a
//! task, `antispoof` checks that a task speaks only for itself, `forward` decides (`forward6` for
//! IPv6), `conntrack`
//! keeps the flow table, `nat` rewrites (`nat6` for IPv6), `nat66` does IPv6's published ports, `nat_quota` keeps each task's share of the masquerade
//! ports, `policy` checks security groups, `early_drop` applies them in XDP, `redirect` sends,
//! `account` counts packets, drops and flows, `events` sends monitor events, `verdict` turns a
//! result into a return code and counts every drop with its reason.
//!
//! The programs exist only for the BPF target. On the host this is an ordinary binary with an
//! empty `main`, so `cargo clippy --workspace` checks the same code with the host's toolchain.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic read-modify-write for the BPF target (`nat_quota`): `core::sync::atomic` offers none.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core_intrinsics, for atomics")
)]

mod account;
mod antispoof;
mod clock;
mod conntrack;
mod early_drop;
mod events;
mod forward;
mod forward6;
mod maps;
mod nat;
mod nat6;
mod nat66;
mod nat_quota;
mod parse;
mod parse6;
mod policy;
mod redirect;
mod tasks;
mod verdict;

/// The entry points, one file per kind of interface.
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each entry point its context by value"
)]
mod programs {
    mod task;
    mod uplink;
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Nothing to run on the host: the programs are loaded from the BPF object.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
