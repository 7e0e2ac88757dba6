//! What an instance keeps on disk between commands: where its run files live (`paths`), the
//! typed files themselves (`files`: meta and applied state), and the one ifindex -> task join
//! over the applied state (`directory`).

pub(crate) mod directory;
pub mod files;
pub mod paths;
