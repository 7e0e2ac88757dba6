//! What an instance keeps on disk between commands: where its run files live (`paths`) and the
//! typed files themselves (`files`: meta and applied state).

pub mod files;
pub mod paths;
