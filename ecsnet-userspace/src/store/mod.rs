//! What an instance keeps on disk between commands: where everything lives (`paths`).

pub mod paths;
