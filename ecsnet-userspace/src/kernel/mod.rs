//! The kernel side: load, attach and pin the datapath (`datapath`), where the pins live
//! (`pins`), write and read its maps (`maps`), and the batch lookups aya lacks (`batch`).

pub(crate) mod batch;
pub mod datapath;
pub mod maps;
pub(crate) mod pins;
