//! `cargo xtask` (through `./x`, which does the set-up first): `test` runs every test, `demo`
//! builds and runs `ecsnet-lab demo` (ecsnet on the lab with traffic of known size, the
//! counters it prints checked), `bench` the benchmark from a release build.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build everything and run every test (unit, `BPF_PROG_TEST_RUN`, integration).
    Test {
        /// Extra arguments for `cargo test` (a filter, --nocapture, ...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The lab, ecsnet up, known traffic, counters checked, teardown.
    Demo {
        /// Leave the lab and ecsnet up and print how to look around.
        #[arg(long)]
        keep: bool,
    },
    /// `ecsnet bench` from a release build (a debug build's own load generator would be
    /// measured too): bridge mode, ecsnet and the ceiling on labs of its own.
    Bench {
        /// Arguments for `ecsnet bench` (--quick, --json, --svg FILE, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn say(msg: &str) {
    eprintln!("==> {msg}");
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Test { args } => test(&args),
        Cmd::Demo { keep } => demo(keep),
        Cmd::Bench { args } => bench(&args),
    }
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    say("building ecsnet (release)");
    cargo(&[
        "build",
        "--release",
        "--package",
        "ecsnet-userspace",
        "--package",
        "ecsnet-lab",
    ])?;
    let status = Command::new("target/release/ecsnet")
        .arg("bench")
        .args(args)
        .status()
        .context("running target/release/ecsnet bench")?;
    ensure!(status.success(), "ecsnet bench failed ({status})");
    Ok(())
}

/// The debug builds of `ecsnet` and of `ecsnet-lab` (which `ecsnet lab|bench` runs).
fn build() -> anyhow::Result<()> {
    cargo(&[
        "build",
        "--package",
        "ecsnet-userspace",
        "--package",
        "ecsnet-lab",
    ])
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let t = Instant::now();
    say("building ecsnet (the datapath with the BPF nightly, then user space)");
    build()?;
    say(&format!(
        "built in {:.0}s; running every test",
        t.elapsed().as_secs_f64()
    ));
    let t = Instant::now();
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)?;
    say(&format!("tests done in {:.0}s", t.elapsed().as_secs_f64()));
    Ok(())
}

/// `ecsnet-lab demo` from the debug build: the demo and its checks live there.
fn demo(keep: bool) -> anyhow::Result<()> {
    say("building ecsnet");
    build()?;
    let status = Command::new("target/debug/ecsnet-lab")
        .arg("demo")
        .args(keep.then_some("--keep"))
        .status()
        .context("running target/debug/ecsnet-lab demo")?;
    ensure!(status.success(), "ecsnet-lab demo failed ({status})");
    Ok(())
}
