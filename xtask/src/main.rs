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
    /// The lints, then build everything and run every test (unit, `BPF_PROG_TEST_RUN`,
    /// integration).
    Test {
        /// Extra arguments for `cargo test` (a filter, --nocapture, ...).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Only the lints: `cargo fmt --check`, and clippy with warnings denied on the host's
    /// toolchain for the workspace and on the BPF nightly for the datapath's real target.
    Lint,
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
        Cmd::Lint => lint(),
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

/// What `./x test` checks before it builds: formatting, and clippy (pedantic, as the workspace
/// sets it) with warnings denied, on the host and for the datapath's own target.
fn lint() -> anyhow::Result<()> {
    let t = Instant::now();
    say("lints: cargo fmt --check");
    cargo(&["fmt", "--all", "--check"])?;
    say("lints: cargo clippy --workspace --all-targets -- -D warnings");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    let nightly = std::fs::read_to_string("ecsnet-ebpf/bpf-toolchain")
        .context("reading ecsnet-ebpf/bpf-toolchain")?;
    let toolchain = format!("+{}", nightly.trim());
    say(&format!(
        "lints: cargo {toolchain} clippy for bpfel-unknown-none -- -D warnings"
    ));
    // The BPF nightly's cargo, not the one that runs xtask.
    let status = Command::new("cargo")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .args([
            toolchain.as_str(),
            "clippy",
            "--package",
            "ecsnet-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ])
        .status()
        .context("running the BPF nightly's cargo clippy")?;
    ensure!(status.success(), "clippy on the datapath failed ({status})");
    say(&format!("lints clean in {:.0}s", t.elapsed().as_secs_f64()));
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    lint()?;
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
