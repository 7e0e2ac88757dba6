//! ecsnet user space. Modules follow the data's path: `state` (parse and validate) ->
//! `compile` (state into map entries) -> `maps` and `datapath` (write them, attach, pin) ->
//! `instance` (up/apply/down) -> `agent` (the long-running side: `flowlog` export, `monitor`
//! events, `metrics`) -> `cli`. `flowfmt` renders flow-log records in AWS's formats.
//! The lab and the benchmark are developer tooling in the `ecsnet-lab` crate, not shipped.

pub mod agent;
pub mod arp;
pub mod batch;
pub mod cli;
pub mod compile;
pub mod conns;
pub mod datapath;
pub mod flowfmt;
pub mod flowlog;
pub mod instance;
pub mod maps;
pub mod metrics;
pub mod monitor;
pub mod netlink;
pub mod netns;
pub mod paths;
pub mod policy;
pub mod process;
pub mod report;
pub mod state;
