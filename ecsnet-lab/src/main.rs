//! The `ecsnet-lab` binary, also run by `ecsnet lab ...` and `ecsnet bench ...`: parse, run,
//! and turn any error into one line and an exit code (0 ok, 1 runtime failure, 2 bad usage).
//! Its lines say `ecsnet:` because users reach it as `ecsnet lab` and `ecsnet bench`.

use clap::Parser as _;

fn main() {
    let cli = match ecsnet_lab::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(
                    i32::from(e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) * 2,
                );
            }
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("bad usage")
                .trim_start_matches("error: ");
            eprintln!("ecsnet: {first} (see `ecsnet-lab --help`)");
            std::process::exit(2);
        }
    };
    if let Err(e) = ecsnet_lab::cli::run(cli) {
        let code = ecsnet_lab::cli::exit_code(&e);
        let msg = format!("{e:#}").replace('\n', "; ");
        eprintln!("ecsnet: {msg}");
        std::process::exit(code);
    }
}
