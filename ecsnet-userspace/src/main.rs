//! The `ecsnet` binary: parse, run, and turn any error into one line and an exit code
//! (0 ok, 1 runtime failure, 2 bad usage or bad input).

fn main() {
    ecsnet::cli::edge::main("ecsnet", ecsnet::cli::run, ecsnet::cli::exit_code);
}
