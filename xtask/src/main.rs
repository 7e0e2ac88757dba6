//! `cargo xtask` (through `./x`, which does the set-up first): `test` runs every test, `demo`
//! shows ecsnet on the lab with traffic of known size and checks the counters it prints.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use ecsnet_tests::{Lab, Stats, ecsnet_ok};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build everything and run every test (unit, BPF_PROG_TEST_RUN, integration).
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

/// A traffic step of the demo and what it must change.
struct Step {
    what: &'static str,
    from_ns: String,
    proto: &'static str,
    target: String,
    count: u32,
    size: usize,
}

fn demo(keep: bool) -> anyhow::Result<()> {
    say("building ecsnet");
    build()?;
    let name = "demo";
    if ecsnet_tests::ecsnet(&["lab", "status", "--name", name])
        .status
        .success()
    {
        say("an earlier demo lab is still up (--keep): taking it down");
        let _ = ecsnet_tests::ecsnet(&["lab", "down", "--name", name]);
    }
    say("lab up: a bridge-mode ECS host with 2 tasks, Docker's iptables rules, a client");
    let lab = Lab::up_named(name, 2, &["1:8080:80", "2:0:80", "2:5353:53/udp"]);
    print!("{}", ecsnet_ok(&["lab", "status", "--name", name]));
    let dynamic = lab.status.tasks[1].port_mappings[0].host_port;

    say("ecsnet up on the lab host, flow logs in 1-second windows");
    let state = lab.state_file();
    print!(
        "{}",
        ecsnet_ok(&lab.ecsnet_args(&["up", "--state", &state, "--window", "1"]))
    );

    let steps = [
        Step {
            what: "client -> task1 published 8080/tcp",
            from_ns: lab.client().into(),
            proto: "tcp",
            target: "10.10.0.1:8080".into(),
            count: 50,
            size: 512,
        },
        Step {
            what: "client -> task2 published dynamic tcp",
            from_ns: lab.client().into(),
            proto: "tcp",
            target: format!("10.10.0.1:{dynamic}"),
            count: 20,
            size: 64,
        },
        Step {
            what: "client -> task2 published 5353/udp",
            from_ns: lab.client().into(),
            proto: "udp",
            target: "10.10.0.1:5353".into(),
            count: 25,
            size: 200,
        },
        Step {
            what: "task1 -> task2 over the bridge",
            from_ns: lab.task_ns(1).into(),
            proto: "tcp",
            target: "172.17.0.3:80".into(),
            count: 30,
            size: 1000,
        },
        Step {
            what: "task2 -> client (masqueraded)",
            from_ns: lab.task_ns(2).into(),
            proto: "udp",
            target: "10.10.0.2:9000".into(),
            count: 10,
            size: 100,
        },
    ];
    let mut failures = Vec::new();
    for step in &steps {
        // Read ecsnet's and the kernel's counters together once both are quiet, so late
        // packets of the previous step land on both sides of the ledger.
        let nss = [lab.task_ns(1), lab.task_ns(2)];
        let (before, kernel_before) = lab.settled(&nss);
        let r = lab.probe(
            &step.from_ns,
            step.proto,
            &step.target,
            step.count,
            step.size,
        );
        let (after, kernel_after) = lab.settled(&nss);
        println!(
            "\n{} : {} x {} B {} messages, {} echoed, p50 {} us",
            step.what, step.count, step.size, step.proto, r["echoed"], r["p50Us"]
        );
        println!(
            "  {:<6} {:>22} {:>22} {:>22} {:>22}",
            "task", "ecsnet egress", "kernel sent", "ecsnet ingress", "kernel received"
        );
        for i in 0..2 {
            let (b, a) = (&before.tasks[i], &after.tasks[i]);
            let (kb, ka) = (kernel_before[i], kernel_after[i]);
            let eg = (
                a.egress.packets - b.egress.packets,
                a.egress.bytes - b.egress.bytes,
            );
            let ing = (
                a.ingress.packets - b.ingress.packets,
                a.ingress.bytes - b.ingress.bytes,
            );
            let ksent = (ka.1 - kb.1, ka.3 - kb.3);
            let krecv = (ka.0 - kb.0, ka.2 - kb.2);
            let cell = |(p, b): (u64, u64)| format!("{p} pkts {b} B");
            println!(
                "  {:<6} {:>22} {:>22} {:>22} {:>22}",
                a.name,
                cell(eg),
                cell(ksent),
                cell(ing),
                cell(krecv)
            );
            if eg != ksent || ing != krecv {
                failures.push(format!(
                    "{}: {} counters differ from the kernel's",
                    step.what, a.name
                ));
            }
        }
        if r["echoed"] != step.count {
            failures.push(format!(
                "{}: only {} of {} echoed",
                step.what, r["echoed"], step.count
            ));
        }
        if step.proto == "udp" {
            // Both UDP steps involve task2 and one datagram each way per message: the exact
            // numbers are known before anything is sent.
            let (b, a) = (&before.tasks[1], &after.tasks[1]);
            let want = (
                u64::from(step.count),
                u64::from(step.count) * (step.size as u64 + 28),
            );
            let got_in = (
                a.ingress.packets - b.ingress.packets,
                a.ingress.bytes - b.ingress.bytes,
            );
            let got_out = (
                a.egress.packets - b.egress.packets,
                a.egress.bytes - b.egress.bytes,
            );
            if got_in != want || got_out != want {
                failures.push(format!(
                    "{}: task2 counted in {got_in:?} out {got_out:?}, sent {want:?} each way",
                    step.what
                ));
            } else {
                println!(
                    "  exact: task2 {} datagrams, {} IP bytes each way, as sent",
                    want.0, want.1
                );
            }
        }
    }

    println!("\n$ ecsnet --instance {name} stats");
    print!("{}", ecsnet_ok(&["--instance", name, "stats"]));
    let stats: Stats = lab.stats();
    ensure!(
        stats.drops.is_empty(),
        "unexpected drops: {:?}",
        stats.drops
    );

    // Flow logs: once the last window is exported, each task's records add up to its counters.
    let format = "${interface-id} ${flow-direction} ${srcaddr} ${srcport} ${dstaddr} ${dstport} ${protocol} ${packets} ${bytes} ${tcp-flags} ${pkt-srcaddr} ${pkt-dstaddr} ${action} ${log-status}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let (sums, want) = loop {
        let want: Vec<_> = lab
            .settled_stats()
            .tasks
            .iter()
            .map(|t| {
                (
                    t.interface.clone(),
                    (
                        t.egress.packets,
                        t.egress.bytes,
                        t.ingress.packets,
                        t.ingress.bytes,
                    ),
                )
            })
            .collect();
        let out = ecsnet_ok(&[
            "--instance",
            name,
            "flows",
            "tail",
            "-n",
            "all",
            "--json",
            "--format",
            format,
            "--filter",
            "status=ok",
        ]);
        let mut sums: std::collections::BTreeMap<String, (u64, u64, u64, u64)> = Default::default();
        for line in out.lines() {
            let r: serde_json::Value = serde_json::from_str(line)?;
            let e = sums
                .entry(r["interface-id"].as_str().unwrap_or_default().to_owned())
                .or_default();
            let (p, b) = (
                r["packets"].as_u64().unwrap_or(0),
                r["bytes"].as_u64().unwrap_or(0),
            );
            if r["flow-direction"] == "egress" {
                (e.0, e.1) = (e.0 + p, e.1 + b);
            } else {
                (e.2, e.3) = (e.2 + p, e.3 + b);
            }
        }
        let done = want
            .iter()
            .all(|(i, w)| sums.get(i).copied().unwrap_or_default() == *w);
        if done || std::time::Instant::now() > deadline {
            break (sums, want);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    println!(
        "
$ ecsnet --instance {name} flows tail -n 12 --format '{format}' --filter 'status=ok'"
    );
    print!(
        "{}",
        ecsnet_ok(&[
            "--instance",
            name,
            "flows",
            "tail",
            "-n",
            "12",
            "--format",
            format,
            "--filter",
            "status=ok",
        ])
    );
    for (iface, w) in &want {
        let got = sums.get(iface).copied().unwrap_or_default();
        if got == *w {
            println!(
                "flow logs of {iface}: egress {} pkts {} B, ingress {} pkts {} B: equal to its counters",
                w.0, w.1, w.2, w.3
            );
        } else {
            failures.push(format!(
                "flow logs of {iface} sum to {got:?}, its counters say {w:?} (egress pkts, B, ingress pkts, B)"
            ));
        }
    }

    if keep {
        println!(
            "\nLeft up. Look around:\n  ecsnet --instance {name} stats\n  ecsnet --instance {name} flows tail -f\n  ecsnet --instance {name} monitor\n  ecsnet lab status --name {name}\n  ip netns exec {host} iptables -t nat -L -v -n\n  ecsnet --netns {client} lab probe --tcp 10.10.0.1:8080 --count 5\n  ls /sys/fs/bpf/ecsnet/{name}\nTake it down with: ecsnet lab down --name {name}   (binary: target/debug/ecsnet)",
            host = lab.host(),
            client = lab.client(),
        );
        std::mem::forget(lab);
    } else {
        say("teardown: ecsnet down, lab down");
        print!("{}", ecsnet_ok(&["--instance", name, "down"]));
        print!("{}", ecsnet_ok(&["lab", "down", "--name", name]));
        std::mem::forget(lab);
        let left = ecsnet_tests::leftovers(name);
        ensure!(left.is_empty(), "left behind: {left:?}");
    }
    if !failures.is_empty() {
        bail!("demo checks failed:\n  {}", failures.join("\n  "));
    }
    println!(
        "\ndemo OK: every per-task counter equals what the task's kernel sent and received, and each task's flow-log records add up to its counters"
    );
    Ok(())
}
