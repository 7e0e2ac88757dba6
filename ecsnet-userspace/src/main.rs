//! The `ecsnet` binary: parse, run, and turn any error into one line and an exit code
//! (0 ok, 1 runtime failure, 2 bad usage or bad input).

use clap::Parser as _;

fn main() {
    let cli = match ecsnet::cli::Cli::try_parse() {
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
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim);
            let first = lines
                .next()
                .unwrap_or("bad usage")
                .trim_start_matches("error: ");
            // A value enum's choices follow on a line of their own.
            let choices = lines
                .next()
                .and_then(|l| l.strip_prefix("[possible values: "))
                .and_then(|l| l.strip_suffix(']'))
                .map(|l| format!(": use {l}"))
                .unwrap_or_default();
            eprintln!("ecsnet: {first}{choices} (see `ecsnet --help`)");
            std::process::exit(2);
        }
    };
    if let Err(e) = ecsnet::cli::run(cli) {
        let code = ecsnet::cli::exit_code(&e);
        let msg = format!("{e:#}").replace('\n', "; ");
        eprintln!("ecsnet: {msg}");
        std::process::exit(code);
    }
}
