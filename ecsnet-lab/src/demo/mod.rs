//! `ecsnet-lab demo` (`./x demo` builds and runs it): the lab, ecsnet up on it, traffic of known
//! size, and every per-task counter checked against the kernel's and the flow logs; then
//! teardown, or with `--keep` the lab left up to look around. Then `discovery`: the same on a
//! real Docker engine that ecsnet follows.

mod discovery;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure};
use ecsnet::agent::stats::TaskStats;

use crate::fixture::harness::{Lab, ecsnet, ecsnet_ok, leftovers};

/// The lab's and the instance's name.
const NAME: &str = "demo";

/// The flow-log fields the demo prints and sums.
const FORMAT: &str = "${interface-id} ${flow-direction} ${srcaddr} ${srcport} ${dstaddr} ${dstport} ${protocol} ${packets} ${bytes} ${tcp-flags} ${pkt-srcaddr} ${pkt-dstaddr} ${action} ${log-status}";

fn say(msg: &str) {
    eprintln!("==> {msg}");
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

/// Packets and bytes.
type Pair = (u64, u64);

/// Runs the demo; `keep` leaves the lab and ecsnet up.
pub fn run(keep: bool) -> anyhow::Result<()> {
    let lab = up();
    let mut failures = Vec::new();
    for step in steps(&lab) {
        failures.extend(traffic(&lab, &step));
    }

    println!("\n$ ecsnet --instance {NAME} stats");
    print!("{}", ecsnet_ok(&["--instance", NAME, "stats"]));
    let stats = lab.stats();
    ensure!(
        stats.drops.is_empty(),
        "unexpected drops: {:?}",
        stats.drops
    );
    failures.extend(flow_logs(&lab));
    finish(lab, keep)?;
    if !failures.is_empty() {
        bail!("demo checks failed:\n  {}", failures.join("\n  "));
    }
    println!(
        "\ndemo OK: every per-task counter equals what the task's kernel sent and received, and each task's flow-log records add up to its counters"
    );
    discovery::run(keep)
}

/// The lab with two tasks and three published ports, and ecsnet up on it.
fn up() -> Lab {
    if ecsnet(&["lab", "status", "--name", NAME]).status.success() {
        say("an earlier demo lab is still up (--keep): taking it down");
        let _ = ecsnet(&["lab", "down", "--name", NAME]);
    }
    say("lab up: a bridge-mode ECS host with 2 tasks, Docker's iptables rules, a client");
    let lab = Lab::up_named(NAME, 2, &["1:8080:80", "2:0:80", "2:5353:53/udp"]);
    print!("{}", ecsnet_ok(&["lab", "status", "--name", NAME]));

    say("ecsnet up on the lab host, flow logs in 1-second windows");
    print!("{}", lab.ecsnet_up_with(&["--window", "1"]));
    lab
}

fn steps(lab: &Lab) -> [Step; 5] {
    let dynamic = lab.status.tasks[1].port_mappings[0].host_port;
    let step = |what, from_ns: &str, proto, target: String, count, size| Step {
        what,
        from_ns: from_ns.to_owned(),
        proto,
        target,
        count,
        size,
    };
    [
        step(
            "client -> task1 published 8080/tcp",
            lab.client(),
            "tcp",
            "10.10.0.1:8080".into(),
            50,
            512,
        ),
        step(
            "client -> task2 published dynamic tcp",
            lab.client(),
            "tcp",
            format!("10.10.0.1:{dynamic}"),
            20,
            64,
        ),
        step(
            "client -> task2 published 5353/udp",
            lab.client(),
            "udp",
            "10.10.0.1:5353".into(),
            25,
            200,
        ),
        step(
            "task1 -> task2 over the bridge",
            lab.task_ns(1),
            "tcp",
            "172.17.0.3:80".into(),
            30,
            1000,
        ),
        step(
            "task2 -> client (masqueraded)",
            lab.task_ns(2),
            "udp",
            "10.10.0.2:9000".into(),
            10,
            100,
        ),
    ]
}

/// A task's counters: (egress, ingress), i.e. what it sent and what it received.
fn counts(t: &TaskStats) -> (Pair, Pair) {
    (
        (t.egress.packets, t.egress.bytes),
        (t.ingress.packets, t.ingress.bytes),
    )
}

/// What a task counted between readings `b` and `a`: (egress, ingress).
fn moved(b: &TaskStats, a: &TaskStats) -> (Pair, Pair) {
    let minus = |a: Pair, b: Pair| (a.0 - b.0, a.1 - b.1);
    let ((ae, ai), (be, bi)) = (counts(a), counts(b));
    (minus(ae, be), minus(ai, bi))
}

/// Sends `step`'s traffic, prints each task's counters beside its kernel's, and returns what
/// does not add up.
fn traffic(lab: &Lab, step: &Step) -> Vec<String> {
    let mut failures = Vec::new();
    // Read ecsnet's and the kernel's counters together once both are quiet, so late packets of
    // the previous step land on both sides of the ledger.
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
        let a = &after.tasks[i];
        let (eg, ing) = moved(&before.tasks[i], a);
        let (kb, ka) = (kernel_before[i], kernel_after[i]);
        let ksent = (ka.1 - kb.1, ka.3 - kb.3);
        let krecv = (ka.0 - kb.0, ka.2 - kb.2);
        let cell = |(p, b): Pair| format!("{p} pkts {b} B");
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
        let (got_out, got_in) = moved(&before.tasks[1], &after.tasks[1]);
        let want = (
            u64::from(step.count),
            u64::from(step.count) * (step.size as u64 + 28),
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
    failures
}

/// Once the last window is exported, each task's flow-log records must add up to its counters:
/// prints the newest records and returns the tasks whose records do not.
fn flow_logs(lab: &Lab) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let (sums, want) = loop {
        let want: Vec<(String, (Pair, Pair))> = lab
            .settled_stats()
            .tasks
            .iter()
            .map(|t| (t.interface.clone(), counts(t)))
            .collect();
        let mut sums: BTreeMap<String, (Pair, Pair)> = BTreeMap::new();
        for r in lab.flow_records(FORMAT, "status=ok") {
            let e = sums
                .entry(r["interface-id"].as_str().unwrap_or_default().to_owned())
                .or_default();
            let side = if r["flow-direction"] == "egress" {
                &mut e.0
            } else {
                &mut e.1
            };
            side.0 += r["packets"].as_u64().unwrap_or(0);
            side.1 += r["bytes"].as_u64().unwrap_or(0);
        }
        let done = want
            .iter()
            .all(|(i, w)| sums.get(i).copied().unwrap_or_default() == *w);
        if done || Instant::now() > deadline {
            break (sums, want);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "\n$ ecsnet --instance {NAME} flows tail -n 12 --format '{FORMAT}' --filter 'status=ok'"
    );
    print!(
        "{}",
        ecsnet_ok(&[
            "--instance",
            NAME,
            "flows",
            "tail",
            "-n",
            "12",
            "--format",
            FORMAT,
            "--filter",
            "status=ok",
        ])
    );
    let mut failures = Vec::new();
    for (iface, w) in &want {
        let got = sums.get(iface).copied().unwrap_or_default();
        let ((ep, eb), (ip, ib)) = *w;
        if got == *w {
            println!(
                "flow logs of {iface}: egress {ep} pkts {eb} B, ingress {ip} pkts {ib} B: equal to its counters"
            );
        } else {
            let flat = |((a, b), (c, d)): (Pair, Pair)| (a, b, c, d);
            failures.push(format!(
                "flow logs of {iface} sum to {:?}, its counters say {:?} (egress pkts, B, ingress pkts, B)",
                flat(got),
                flat(*w)
            ));
        }
    }
    failures
}

/// With `keep`, leaves everything up and says how to look around; else takes ecsnet and the
/// lab down and checks that nothing is left.
fn finish(lab: Lab, keep: bool) -> anyhow::Result<()> {
    if keep {
        println!(
            "\nLeft up. Look around:\n  ecsnet --instance {NAME} stats\n  ecsnet --instance {NAME} flows tail -f\n  ecsnet --instance {NAME} monitor\n  ecsnet lab status --name {NAME}\n  ip netns exec {host} iptables -t nat -L -v -n\n  ecsnet --netns {client} lab probe --tcp 10.10.0.1:8080 --count 5\n  ls /sys/fs/bpf/ecsnet/{NAME}\nTake it down with: ecsnet lab down --name {NAME}   (binary: target/debug/ecsnet)",
            host = lab.host(),
            client = lab.client(),
        );
        std::mem::forget(lab);
        return Ok(());
    }
    say("teardown: ecsnet down, lab down");
    print!("{}", ecsnet_ok(&["--instance", NAME, "down"]));
    print!("{}", ecsnet_ok(&["lab", "down", "--name", NAME]));
    std::mem::forget(lab);
    let left = leftovers(NAME);
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
