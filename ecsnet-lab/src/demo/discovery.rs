//! The demo's second part: ecsnet following a real Docker engine (`up --docker`). The lab gets a
//! real dockerd with two ECS-labelled containers; a container started while ecsnet runs is found
//! with its ECS identity and its security group from a label, carried on ecsnet's path, held to
//! its group, and gone without a trace when it stops.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{
    fixture::harness::{Lab, ecsnet, ecsnet_ok, leftovers},
    lab::{
        LabPort, LabStatus,
        engine::{self, ContainerSpec},
    },
};
use ecsnet::state::{Protocol, Task, TaskSource};

/// The lab's and the instance's name.
const NAME: &str = "demo-docker";
/// The container started while ecsnet runs, and the host port it publishes.
const LATE: &str = "web-late";
const LATE_PORT: u16 = 8090;

fn say(msg: &str) {
    eprintln!("==> {msg}");
}

/// Runs the discovery part; `keep` leaves its lab and instance up.
pub fn run(keep: bool) -> anyhow::Result<()> {
    if ecsnet(&["lab", "status", "--name", NAME]).status.success() {
        say("an earlier demo-docker lab is still up (--keep): taking it down");
        let _ = ecsnet(&["lab", "down", "--name", NAME]);
    }
    say("lab up --docker: the same host with a real dockerd 20.10 and 2 ECS-labelled containers");
    let out = ecsnet_ok(&[
        "lab", "up", "--docker", "--name", NAME, "--tasks", "2", "--json",
    ]);
    let status: LabStatus = serde_json::from_str(&out).context("lab up --json")?;
    let lab = Lab {
        name: NAME.to_owned(),
        status,
    };
    print!("{}", ecsnet_ok(&["lab", "status", "--name", NAME]));
    let result = follow(&lab);
    if keep {
        println!(
            "\nLeft up. Look around:\n  ecsnet --instance {NAME} task ls\n  ecsnet --instance {NAME} stats\n  {}\nTake it down with: ecsnet lab down --name {NAME}",
            engine::docker(NAME)
                .get_args()
                .map(|a| a.to_string_lossy())
                .fold("/usr/bin/docker".to_owned(), |s, a| s + " " + &a)
                + " ps"
        );
        std::mem::forget(lab);
        return result;
    }
    say("teardown: ecsnet down, lab down (dockerd, its containers, mounts and cgroups)");
    print!("{}", ecsnet_ok(&["--instance", NAME, "down"]));
    print!("{}", ecsnet_ok(&["lab", "down", "--name", NAME]));
    std::mem::forget(lab);
    result?;
    let left = leftovers(NAME);
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// `ecsnet up --docker` on the lab, then a container's life under ecsnet.
fn follow(lab: &Lab) -> anyhow::Result<()> {
    up_following(lab)?;
    late_container(lab)
}

/// `ecsnet up --docker` with the lab's host and the group `sg-web`: the lab's containers become
/// tasks.
fn up_following(lab: &Lab) -> anyhow::Result<()> {
    let file = lab.status.state_file.with_file_name("demo-state.json");
    let mut s: Value = serde_json::from_str(&std::fs::read_to_string(&lab.status.state_file)?)?;
    s["securityGroups"] = json!([{
        "GroupId": "sg-web", "GroupName": "web: port 80 from the client only",
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                           "IpRanges": [{"CidrIp": "10.10.0.2/32"}]}],
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    }]);
    std::fs::write(&file, s.to_string())?;
    let url = engine::EnginePaths::new(NAME).url();
    say("ecsnet up --docker: tasks come from the engine, the group sg-web from the state file");
    let file = file.display().to_string();
    let up = ["up", "--state", &file, "--docker", &url, "--window", "1"];
    print!("{}", ecsnet_ok(&lab.ecsnet_args(&up)));
    let found = tasks(Duration::from_secs(5), |t| t.len() == 2)?;
    print!("{}", ecsnet_ok(&["--instance", NAME, "task", "ls"]));
    ensure!(
        found
            .iter()
            .all(|t| t.source == TaskSource::Docker && t.task_arn.is_some()),
        "the lab's containers are docker tasks with their ECS task ARN: {found:?}"
    );
    Ok(())
}

/// A container started while ecsnet runs: found, grouped by its label, carried on ecsnet's
/// path, held to its group, and refused once stopped.
fn late_container(lab: &Lab) -> anyhow::Result<()> {
    say(&format!(
        "docker run {LATE} -l ecsnet.security-groups=sg-web -p {LATE_PORT}:80, while ecsnet runs"
    ));
    let mut spec = ContainerSpec::task(
        NAME,
        LATE,
        vec![LabPort {
            host_port: LATE_PORT,
            container_port: 80,
            protocol: Protocol::Tcp,
        }],
    );
    spec.labels
        .push(("ecsnet.security-groups".into(), "sg-web".into()));
    engine::run(NAME, &spec)?;
    let started = Instant::now();
    let found = tasks(Duration::from_secs(5), |t| t.len() == 3)?;
    println!(
        "found within {} ms (the task list polled every 10 ms)",
        started.elapsed().as_millis()
    );
    print!("{}", ecsnet_ok(&["--instance", NAME, "task", "ls"]));
    let late = found
        .iter()
        .find(|t| t.name.ends_with(LATE))
        .context("the new container is a task")?;
    ensure!(
        late.security_groups == ["sg-web"],
        "its groups come from its label: {:?}",
        late.security_groups
    );

    let target = format!("10.10.0.1:{LATE_PORT}");
    say(&format!(
        "client -> {target}: allowed by sg-web, on ecsnet's path"
    ));
    let before = task_packets(&late.name);
    let out = probe(lab, &target, 5);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let moved = task_packets(&late.name) - before;
    ensure!(
        moved >= 10,
        "ecsnet counted {moved} packets of the task, expected 10 or more"
    );
    println!("ecsnet counted {moved} packets to and from {}", late.name);

    let addr = format!("{}:80", late.ipv4_address);
    say(&format!("task1 -> {addr}: sg-web admits only the client"));
    let out = engine::docker(NAME)
        .args([
            "exec",
            "task1",
            engine::SERVER,
            "lab",
            "probe",
            "--tcp",
            &addr,
        ])
        .args(["--count", "1"])
        .output()?;
    ensure!(!out.status.success(), "task1 reached {addr} past sg-web");
    println!(
        "dropped by sg-web: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );

    say(&format!(
        "docker stop {LATE}: the task, its port and its flows go"
    ));
    engine::stop(NAME, LATE, 1)?;
    tasks(Duration::from_secs(5), |t| t.len() == 2)?;
    print!("{}", ecsnet_ok(&["--instance", NAME, "task", "ls"]));
    let out = probe(lab, &target, 1);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("refused"),
        "{target} after the stop: expected connection refused, as Docker alone gives: {err}"
    );
    println!("{target}: {}", err.trim());
    println!(
        "\ndemo-docker OK: ecsnet followed the engine (found, grouped, carried, refused, gone)"
    );
    Ok(())
}

/// The instance's tasks once `done` says so, polled every 10 ms; an error after `within`.
fn tasks(within: Duration, done: impl Fn(&[Task]) -> bool) -> anyhow::Result<Vec<Task>> {
    let deadline = Instant::now() + within;
    loop {
        let out = ecsnet_ok(&["--instance", NAME, "task", "ls", "--json"]);
        let tasks: Vec<Task> = serde_json::from_str(&out)?;
        if done(&tasks) {
            return Ok(tasks);
        }
        if Instant::now() > deadline {
            bail!("the task list did not follow the engine within {within:?}: {out}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Packets ecsnet counted for task `name`, both ways.
fn task_packets(name: &str) -> u64 {
    let out = ecsnet_ok(&["--instance", NAME, "stats", "--json"]);
    let s: Value = serde_json::from_str(&out).unwrap_or_default();
    s["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["name"] == name)
        .map(|t| {
            ["egress", "ingress"]
                .iter()
                .map(|d| t[d]["packets"].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        .sum()
}

/// `ecsnet lab probe --tcp TARGET --count N` from the lab's client.
fn probe(lab: &Lab, target: &str, count: u32) -> std::process::Output {
    let count = count.to_string();
    ecsnet(&[
        "--netns",
        lab.client(),
        "lab",
        "probe",
        "--tcp",
        target,
        "--count",
        &count,
    ])
}
