//! What an instance keeps on disk between commands: where everything lives (`paths`), and the
//! one ifindex -> task join over the applied state (`directory`).

pub mod directory;
pub mod paths;
