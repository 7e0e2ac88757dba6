//! `ecsnet flows tail`: the flow-log journal, filtered and formatted (`flowlog::tail`).

use clap::Subcommand;

use crate::{
    cli::or_keyword,
    flowlog::{
        filter::Filter,
        format::Format,
        tail::{self, TailOptions},
    },
    store::{files, paths::InstancePaths},
};

#[derive(Debug, Subcommand)]
pub enum FlowsCmd {
    /// Print the latest records, and with --follow every record as its window closes.
    Tail {
        #[arg(short, long)]
        follow: bool,
        /// AWS's syntax, e.g. '${version} ${srcaddr} ${dstaddr} ${tcp-flags}'; fields of
        /// versions 2 to 8 (vpc-id, pkt-srcaddr, flow-direction, ecs-task-id, ...). Default:
        /// AWS's version 2 format.
        #[arg(long, value_parser = Format::parse)]
        format: Option<Format>,
        /// JSON lines with the fields of the format (missing values are null).
        #[arg(long)]
        json: bool,
        /// Terms that must all hold, e.g. 'task=web-1 port=80 action=REJECT'; keys: task,
        /// interface, addr, srcaddr, dstaddr, pkt-srcaddr, pkt-dstaddr (address or CIDR), port,
        /// srcport, dstport, proto, action, direction, status; `!=` negates.
        #[arg(long, value_parser = Filter::parse)]
        filter: Option<Filter>,
        /// How many of the latest matching records to print first: a number, or `all`.
        #[arg(short = 'n', long, value_name = "N|all", default_value = "10", value_parser = lines)]
        lines: Lines,
    },
}

/// `--lines`: the latest N records, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lines(Option<usize>);

#[derive(Debug, thiserror::Error)]
#[error("expected a number or `all`")]
pub struct BadLines;

fn lines(s: &str) -> Result<Lines, BadLines> {
    or_keyword("all", s).map(Lines).map_err(|_| BadLines)
}

pub fn run(paths: &InstancePaths, cmd: FlowsCmd) -> anyhow::Result<()> {
    let FlowsCmd::Tail {
        follow,
        format,
        json,
        filter,
        lines: Lines(lines),
    } = cmd;
    files::require_up(paths)?;
    let opts = TailOptions {
        format: format.unwrap_or_default(),
        json,
        filter: filter.unwrap_or_default(),
        lines,
        follow,
    };
    tail::tail(paths, &opts)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_is_a_number_or_all() {
        assert_eq!(lines("all").unwrap(), Lines(None));
        assert_eq!(lines("0").unwrap(), Lines(Some(0)));
        assert!(lines("-1").is_err() && lines("ten").is_err());
    }
}
