//! ecsnet user space, the shipped `ecsnet` binary. Rooms follow the data's path, each depending
//! only on rooms before it: `state` (the state file: parse, validate) -> `plan` (pure: every
//! map entry and security-group rule) -> `host` (the live host: netlink, ARP, namespaces) and
//! `kernel` (load, attach, pin, write entries, batch reads) -> `store` (run files) -> `flowlog`
//! (export, records, formats) -> `instance` (up, apply, down) -> `agent` (loop, GC, control,
//! monitor, metrics, stats) -> `cli`. The lab and the benchmark are developer tooling in the
//! `ecsnet-lab` crate, not shipped.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod flowlog;
pub mod host;
pub mod instance;
pub mod kernel;
pub mod plan;
pub mod state;
pub mod store;
