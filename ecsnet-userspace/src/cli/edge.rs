//! A binary's edge: the global flags, parse the command line, run, and turn any error into one
//! line on stderr and an exit code (0 ok, 1 runtime failure, 2 bad usage or bad input). `ecsnet`
//! and `ecsnet-lab` both use it, so both speak the same way.

use clap::{Parser, error::ErrorKind};

// The flags every command of `ecsnet` and `ecsnet-lab` takes (`ecsnet lab|bench` hands them on).
// A plain comment: a doc comment here would become the binaries' `about`.
#[derive(Debug, clap::Args)]
pub struct Globals {
    /// Operate inside this named network namespace (entered with setns).
    #[arg(long, global = true)]
    pub netns: Option<String>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Globals {
    /// Logs warnings, with one `-v` (or in the agent) information, with more debugging.
    pub fn init_logging(&self, agent: bool) {
        let default = match (self.verbose, agent) {
            (0, false) => "warn",
            (0, true) | (1, _) => "info",
            _ => "debug",
        };
        let _ =
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
                .format_target(false)
                .try_init();
    }

    /// The same flags as arguments, for a binary this one runs.
    pub fn args(&self) -> Vec<String> {
        let netns = self
            .netns
            .iter()
            .flat_map(|ns| ["--netns".to_owned(), ns.clone()]);
        netns
            .chain(std::iter::repeat_n("-v".to_owned(), self.verbose.into()))
            .collect()
    }
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize + ?Sized>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("output serializes")
    );
}

/// Prints a command's result: pretty JSON with `--json`, else the text `render` makes of it.
pub fn print_json_or<T: serde::Serialize + ?Sized>(
    json: bool,
    v: &T,
    render: impl FnOnce(&T) -> String,
) {
    if json {
        print_json(v);
    } else {
        print!("{}", render(v));
    }
}

/// Parses `C`, runs it with `run` and exits; `help` names the binary whose `--help` to see.
pub fn main<C: Parser>(
    help: &str,
    run: impl FnOnce(C) -> anyhow::Result<()>,
    exit_code: impl Fn(&anyhow::Error) -> i32,
) -> ! {
    let cli = C::try_parse().unwrap_or_else(|e| {
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
        eprintln!(
            "ecsnet: {} (see `{help} --help`)",
            usage_line(&e.to_string())
        );
        std::process::exit(2);
    });
    if let Err(e) = run(cli) {
        let code = exit_code(&e);
        let msg = format!("{e:#}").replace('\n', "; ");
        eprintln!("ecsnet: {msg}");
        std::process::exit(code);
    }
    std::process::exit(0)
}

/// Clap's error text as one line: its first line, and a value enum's choices, which clap puts
/// on a line of their own.
fn usage_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim);
    let first = lines
        .next()
        .unwrap_or("bad usage")
        .trim_start_matches("error: ");
    let choices = lines
        .next()
        .and_then(|l| l.strip_prefix("[possible values: "))
        .and_then(|l| l.strip_suffix(']'))
        .map(|l| format!(": use {l}"))
        .unwrap_or_default();
    format!("{first}{choices}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_are_one_line_with_the_choices() {
        let text = "error: invalid value 'turbo' for '--xdp-mode <XDP_MODE>'\n  [possible values: \
                    auto, native, skb, off]\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(text),
            "invalid value 'turbo' for '--xdp-mode <XDP_MODE>': use auto, native, skb, off"
        );
        assert_eq!(
            usage_line("error: unrecognized subcommand 'fly'\n\nUsage: ecsnet <COMMAND>\n"),
            "unrecognized subcommand 'fly'"
        );
    }
}
