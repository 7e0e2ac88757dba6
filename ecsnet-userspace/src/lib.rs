//! ecsnet user space, the shipped `ecsnet` binary. Rooms follow the data's path, each depending
//! only on rooms before it: `state` (the state file: parse, validate into typed rules) and
//! `host` (the live host: netlink, ARP, namespaces) -> `engine` (the Docker engine as the source
//! of tasks, on state and host) -> `plan` (pure: every map entry, computed before anything is
//! written) -> `kernel` (load, attach, pin, write entries, batch reads) ->
//! `store` (the run files, the ifindex -> task directory) -> `flowlog` (export, records,
//! formats) -> `instance` (up, apply, down) -> `agent` (loop, GC, control, monitor, metrics,
//! stats) -> `cli`; `clock` is the datapath's clock. Every room is public because `ecsnet-lab`
//! or the tests use something in it; rooms keep what nobody outside uses `pub(crate)`. The lab
//! and the benchmark are developer tooling in the `ecsnet-lab` crate, not shipped.

pub mod agent;
pub mod cli;
pub mod clock;
pub mod engine;
pub mod flowlog;
pub mod host;
pub mod instance;
pub mod kernel;
pub mod plan;
pub mod state;
pub mod store;
