//! The kernel side: load, attach and pin the datapath (`datapath`), where the pins live
//! (`pins`), write and read its maps (`maps`), the batch lookups aya lacks (`batch`), and the
//! masquerade counts the agent keeps right (`nat_use`), and the maps' layout stamps an upgrade
//! in place checks (`layout`).

pub(crate) mod batch;
pub mod datapath;
pub mod layout;
pub mod maps;
pub(crate) mod nat_use;
pub(crate) mod pins;
