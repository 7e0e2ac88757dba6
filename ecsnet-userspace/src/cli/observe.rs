//! `ecsnet stats` and `ecsnet monitor`: what the datapath counted and what it reports as it
//! happens (`agent::stats`, `agent::monitor`).

use crate::{
    agent::{monitor, stats},
    cli::print_json_or,
    store::{files, paths::InstancePaths},
};

pub fn stats(paths: &InstancePaths, json: bool) -> anyhow::Result<()> {
    let s = stats::stats(paths)?;
    print_json_or(json, &s, stats::render);
    Ok(())
}

pub fn monitor(paths: &InstancePaths, json: bool) -> anyhow::Result<()> {
    files::require_up(paths)?;
    monitor::follow(paths, json)?;
    Ok(())
}
