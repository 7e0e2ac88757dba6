//! Commands that change the live state (`apply`, `sg apply`, `task add`, `task rm`) run one at a
//! time per instance: two started at once either both succeed one after the other or one fails
//! at once with one line, exit 1, "another apply is running on instance X", having changed
//! nothing. Before the lock, the loser of two `apply`s could fail halfway with a raw
//! `bpf_map_delete_elem` error, and two `task add`s could each drop the other's task.
//!
//! Each round starts two commands at the same instant (as near as two spawns get) and checks
//! every outcome; at the end the live state is the last one applied and traffic flows.
//!
//! A command that dies halfway through its commit (a SIGKILL of the agent) leaves work that the
//! next commit finishes.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, Output, Stdio},
};

use ecsnet::store::paths::InstancePaths;
use ecsnet_common::net::ipv4_to_map;
use ecsnet_tests::{
    Lab, ecsnet_bin,
    world::{self, instance_ok},
};
use serde_json::{Value, json};

const ROUNDS: usize = 12;

fn group(id: &str, port: u16) -> Value {
    json!({
        "GroupId": id,
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
                           "IpRanges": [{"CidrIp": "10.10.0.0/24"}]}],
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    })
}

/// Starts both commands, then waits for both.
fn at_once(a: &[String], b: &[String]) -> [Output; 2] {
    let spawn = |args: &[String]| {
        Command::new(ecsnet_bin())
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ecsnet")
    };
    let (ca, cb) = (spawn(a), spawn(b));
    [
        ca.wait_with_output().expect("first command"),
        cb.wait_with_output().expect("second command"),
    ]
}

/// Ok(true): it ran; Ok(false): it lost the race with the one clear line; Err: anything else.
fn outcome(args: &[String], out: &Output, instance: &str) -> Result<bool, String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Ok(true);
    }
    let lines: Vec<&str> = stderr.lines().collect();
    let want = format!("another apply is running on instance \"{instance}\"");
    if out.status.code() == Some(1) && lines.len() == 1 && lines[0].contains(&want) {
        return Ok(false);
    }
    Err(format!(
        "`ecsnet {}` exited {} with: {stderr}",
        args.join(" "),
        out.status
    ))
}

fn task_names(lab: &Lab) -> Vec<String> {
    let out = instance_ok(lab, &["task", "ls", "--json"]);
    let v: Value = serde_json::from_str(&out).expect("task ls --json");
    let mut names: Vec<String> = v
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t["name"].as_str().expect("a name").to_owned())
        .collect();
    names.sort();
    names
}

/// Commands that ran and commands refused while another ran, over a lab's instance.
struct Races<'a> {
    lab: &'a Lab,
    ran: usize,
    refused: usize,
}

impl Races<'_> {
    /// `--instance <lab> ARGS`, owned.
    fn args(&self, args: &[&str]) -> Vec<String> {
        ["--instance", self.lab.name.as_str()]
            .iter()
            .chain(args)
            .map(|s| (*s).to_owned())
            .collect()
    }

    /// Counts the outcome of `args`: ran or refused with the one clear line, nothing else.
    fn count(&mut self, args: &[String], out: &Output) {
        match outcome(args, out, &self.lab.name) {
            Ok(true) => self.ran += 1,
            Ok(false) => self.refused += 1,
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs `x` and `y` at once and counts both.
    fn race(&mut self, x: &[&str], y: &[&str]) {
        let (x, y) = (self.args(x), self.args(y));
        let [ox, oy] = at_once(&x, &y);
        self.count(&x, &ox);
        self.count(&y, &oy);
    }

    /// Two task adds at once, of task3's and task4's interfaces under new names: each
    /// read-modify-write happens under the lock, so no task reported added is lost. Returns
    /// the first one's name if it was added.
    fn task_adds(&mut self, round: usize) -> Option<String> {
        let add = |i: usize| {
            let t = &self.lab.status.tasks[i - 1];
            let name = format!("extra{round}-{i}");
            let (ip, iface) = (t.address.to_string(), t.interface.clone());
            let args = self.args(&[
                "task",
                "add",
                "--name",
                &name,
                "--ip",
                &ip,
                "--interface",
                &iface,
            ]);
            (name, args)
        };
        let ((n1, x), (n2, y)) = (add(3), add(4));
        let [ox, oy] = at_once(&x, &y);
        let names = task_names(self.lab);
        for (name, args, out) in [(&n1, &x, &ox), (&n2, &y, &oy)] {
            let added = outcome(args, out, &self.lab.name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                names.contains(name),
                added,
                "round {round}: {name} was {} but the tasks are {names:?}",
                if added { "added" } else { "refused" }
            );
            self.count(args, out);
        }
        names.contains(&n1).then_some(n1)
    }
}

#[test]
fn concurrent_state_changes_serialise_or_fail_with_one_clear_line() {
    // task4 is in no state file: `task add` puts it in under new names.
    let lab = Lab::up("cap", 4, &["1:8080:80", "2:8081:80", "3:8082:80"]);
    lab.ecsnet_up();
    let state = world::state(&lab);

    // A: task1 to task3, task1 and task2 in sg-a. B: task1 and task2, task2 in sg-b: applying
    // one after the other attaches and detaches an interface and switches policy generations.
    let mut state_a = state.clone();
    state_a["tasks"].as_array_mut().unwrap().truncate(3);
    state_a["securityGroups"] = json!([group("sg-a", 80)]);
    state_a["tasks"][0]["securityGroups"] = json!(["sg-a"]);
    state_a["tasks"][1]["securityGroups"] = json!(["sg-a"]);
    let mut state_b = state.clone();
    state_b["securityGroups"] = json!([group("sg-a", 80), group("sg-b", 81)]);
    state_b["tasks"][1]["securityGroups"] = json!(["sg-b"]);
    state_b["tasks"].as_array_mut().unwrap().truncate(2);
    let (fa, fb) = (
        world::write(&lab, "a.json", &state_a),
        world::write(&lab, "b.json", &state_b),
    );
    let groups = world::write(
        &lab,
        "groups.json",
        &json!({"SecurityGroups": [group("sg-a", 8080), group("sg-b", 81)]}),
    );
    instance_ok(&lab, &["apply", "-f", &fa]);

    let mut races = Races {
        lab: &lab,
        ran: 0,
        refused: 0,
    };
    for round in 0..ROUNDS {
        // Two whole-state applies; an apply and a groups change.
        races.race(&["apply", "-f", &fa], &["apply", "-f", &fb]);
        races.race(&["apply", "-f", &fa], &["sg", "apply", "-f", &groups]);

        // Two task adds on top of B.
        instance_ok(&lab, &["apply", "-f", &fb]);
        let added = races.task_adds(round);

        // A task rm against an apply; the rm runs first or is refused (B has no such task,
        // so a rm after B's apply would be bad input: started first, it is never that).
        if let Some(n1) = added {
            let (x, y) = (
                races.args(&["task", "rm", &n1]),
                races.args(&["apply", "-f", &fb]),
            );
            let [ox, oy] = at_once(&x, &y);
            if ox.status.code() == Some(2) {
                let e = String::from_utf8_lossy(&ox.stderr);
                assert!(e.contains("no task named"), "task rm after B: {e}");
            } else {
                races.count(&x, &ox);
            }
            races.count(&y, &oy);
        }
    }
    let (ran, refused) = (races.ran, races.refused);
    eprintln!("{ran} commands ran, {refused} were refused while another ran");
    assert!(
        refused > 0,
        "no two commands ever overlapped in {ROUNDS} rounds: the test proved nothing"
    );

    // The last word is a plain apply, and it holds: the state and the datapath are A's.
    instance_ok(&lab, &["apply", "-f", &fa]);
    assert_eq!(task_names(&lab), ["task1", "task2", "task3"]);
    for port in [8080, 8081, 8082] {
        let r = lab.probe(lab.client(), "tcp", &format!("10.10.0.1:{port}"), 3, 100);
        assert_eq!(r["echoed"], 3, "published port {port} after the races: {r}");
    }
}

/// A commit stopped between its map writes and its flow cut (as the agent is when it gets a
/// SIGKILL while a container leaves) left the departed task's tracked flows behind for their
/// whole timeout, and no later commit saw that task as departing: the map no longer had it. The
/// last applied state, written at the end of a commit, still has it: the next commit cuts them.
#[test]
fn flows_of_a_task_a_killed_commit_removed_go_with_the_next_commit() {
    let lab = Lab::up("cak", 2, &["1:8080:80", "2:8081:80"]);
    lab.ecsnet_up();
    let paths = InstancePaths::new(&lab.name);
    let flows_of = |task: usize| {
        let addr = ipv4_to_map(lab.status.tasks[task - 1].address);
        ecsnet::kernel::maps::read_ct(&paths)
            .expect("the connection tables")
            .iter()
            .filter(|(_, k, e)| [k.saddr, k.daddr, e.peer.saddr, e.peer.daddr].contains(&addr))
            .count()
    };
    for port in [8080, 8081] {
        let r = lab.probe(lab.client(), "tcp", &format!("10.10.0.1:{port}"), 3, 100);
        assert_eq!(r["echoed"], 3, "published port {port}: {r}");
    }
    // Closed connections stay tracked for the closing timeout (30 s): both directions of each.
    let (held1, held2) = (flows_of(1), flows_of(2));
    assert!(
        held1 >= 2 && held2 >= 2,
        "tracked: task1 {held1}, task2 {held2}"
    );

    let out = Command::new(ecsnet_bin())
        .args(["--instance", &lab.name, "task", "rm", "task1"])
        .env("ECSNET_TEST_ABORT_AT", "before-flow-cut")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ecsnet");
    assert_eq!(
        out.status.signal(),
        Some(nix::libc::SIGABRT),
        "task rm was to stop at its flow cut: {out:?}"
    );
    assert_eq!(
        task_names(&lab),
        ["task1", "task2"],
        "the applied state is written last"
    );
    assert_eq!(flows_of(1), held1, "the stopped commit cut nothing");
    let task1 = ipv4_to_map(lab.status.tasks[0].address);
    let in_map = ecsnet::kernel::maps::read_tasks(&paths).expect("TASKS");
    assert!(
        in_map.iter().all(|(addr, _)| *addr != task1),
        "task1 left the map before the stop"
    );

    // The next commit, of another change (task2's port moves), cuts task1's flows and only them.
    let mut state = world::state(&lab);
    state["tasks"].as_array_mut().unwrap().remove(0);
    state["tasks"][0]["portMappings"][0]["hostPort"] = json!(8082);
    world::apply(&lab, "without-task1.json", &state);
    assert_eq!(task_names(&lab), ["task2"]);
    assert_eq!(flows_of(1), 0, "task1's flows outlived the next commit");
    assert_eq!(flows_of(2), held2, "task2's flows stay");
    let r = lab.probe(lab.client(), "tcp", "10.10.0.1:8082", 3, 100);
    assert_eq!(r["echoed"], 3, "task2 on its new port: {r}");
}
