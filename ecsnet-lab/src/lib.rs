//! ecsnet's developer tooling, in a crate of its own so none of it is in the shipped `ecsnet`:
//! `lab` builds the bridge-mode host in namespaces, `traffic` is its echo server and probe,
//! `bench` measures ecsnet against bridge mode and the ceiling, `progcost` times the programs
//! with `BPF_PROG_TEST_RUN`, `demo` shows and checks it all end to end, `fixture` is the one
//! test world and packet builder, `fuzz` runs random and mutated frames through the programs
//! against a model of them. `cli` is the `ecsnet-lab` command line.

pub mod bench;
pub mod cli;
pub mod demo;
pub mod fixture;
pub mod fuzz;
pub mod lab;
pub mod progcost;
pub mod stats;
pub mod traffic;
