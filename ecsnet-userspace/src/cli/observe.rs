//! `ecsnet stats` and `ecsnet monitor`: what the datapath counted and what it reports as it
//! happens (`agent::stats`, `agent::monitor`).

use crate::{
    agent::{monitor, stats},
    cli::print_json,
    instance,
    store::paths::InstancePaths,
};

pub fn stats(paths: &InstancePaths, json: bool) -> anyhow::Result<()> {
    // Unboxed, so `exit_code` finds the instance's error.
    let s = stats::stats(paths).map_err(|e| *e.0)?;
    if json {
        print_json(&s);
    } else {
        print!("{}", stats::render(&s));
    }
    Ok(())
}

pub fn monitor(paths: &InstancePaths, json: bool) -> anyhow::Result<()> {
    instance::require_up(paths)?;
    monitor::follow(paths, json)?;
    Ok(())
}
