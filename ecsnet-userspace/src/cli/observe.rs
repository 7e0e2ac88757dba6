//! `ecsnet stats` and `ecsnet monitor`: what the datapath counted and what it reports as it
//! happens (`agent::stats`, `agent::monitor`).

use crate::{
    agent::{monitor, stats},
    cli::print_json,
    store::{files, paths::InstancePaths},
};

pub fn stats(paths: &InstancePaths, json: bool) -> anyhow::Result<()> {
    let s = stats::stats(paths)?;
    if json {
        print_json(&s);
    } else {
        print!("{}", stats::render(&s));
    }
    Ok(())
}

pub fn monitor(paths: &InstancePaths, json: bool) -> anyhow::Result<()> {
    files::require_up(paths)?;
    monitor::follow(paths, json)?;
    Ok(())
}
