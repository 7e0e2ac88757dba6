//! The plan: a validated state turned into everything the datapath's maps must hold, computed
//! before anything is written. Pure: no system calls, unit-tested.

pub mod entries;
pub mod sg;
