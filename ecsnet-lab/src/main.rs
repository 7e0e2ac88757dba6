//! The `ecsnet-lab` binary, also run by `ecsnet lab ...` and `ecsnet bench ...`: parse, run,
//! and turn any error into one line and an exit code (0 ok, 1 runtime failure, 2 bad usage),
//! through the same edge as `ecsnet`. Its lines say `ecsnet:` because users reach it as
//! `ecsnet lab` and `ecsnet bench`.

fn main() {
    ecsnet::cli::edge::main(
        "ecsnet-lab",
        ecsnet_lab::cli::run,
        ecsnet_lab::cli::exit_code,
    );
}
