//! Bad input to every command is one clear line, exit 2, and changes nothing.

use std::path::Path;

use ecsnet_tests::{
    Lab, ecsnet_fails,
    world::{self, instance_fails, instance_ok, lab_file},
};
use serde_json::{Value, json};

/// `value` with the field at `path` ("tasks/0/interface") set to `new`, created if missing.
fn with(value: &Value, path: &str, new: Value) -> Value {
    let mut v = value.clone();
    let mut at = &mut v;
    for key in path.split('/') {
        at = match key.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[key],
        };
    }
    *at = new;
    v
}

/// What a refused command must leave as it was: the tasks, the groups and the policy maps.
fn snapshot(lab: &Lab, pins: &str) -> (String, String, String) {
    (
        instance_ok(lab, &["task", "ls", "--json"]),
        instance_ok(lab, &["sg", "ls", "--json"]),
        policy_maps(pins),
    )
}

/// A breakage of a security group: what it is, the fields it sets (as `with` takes them), and
/// the JSON path under the group the error must name.
type Breakage = (&'static str, Vec<(&'static str, Value)>, &'static str);

/// Writes `text` into the lab's directory as `name`; returns the path.
fn write(lab: &Lab, name: &str, text: &str) -> String {
    let p = lab_file(lab, name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p.display().to_string()
}

#[test]
fn bad_input_changes_nothing() {
    let lab = Lab::up("bi", 2, &["1:8080:80", "2:8081:80"]);
    let pins = format!("/sys/fs/bpf/ecsnet/{}", lab.name);

    // Before up: unknown interface, missing namespace, malformed state: nothing is pinned.
    // Each refused command and what its error line must name.
    let broken = write(&lab, "broken.json", "{\"tasks\": [");
    let state = lab.state_file();
    #[rustfmt::skip]
    let refused: [(Vec<&str>, &[&str]); 13] = [
        (lab.ecsnet_args(&["up", "--uplink", "nope0"]), &["nope0"]),
        (lab.ecsnet_args(&["up", "--bridge", "eth0"]), &[]),
        (vec!["--netns", "ecsnet-no-such-ns", "--instance", &lab.name, "up"],
            &["ecsnet-no-such-ns"]),
        (lab.ecsnet_args(&["up", "--state", &broken]), &[]),
        (lab.ecsnet_args(&["up", "--state", "/nonexistent/state.json"]), &[]),
        (lab.ecsnet_args(&["up", "--xdp-mode", "turbo"]), &[]),
        (lab.ecsnet_args(&["up", "--window", "0"]), &[]),
        (vec!["--instance", "../etc", "up"], &[]),
        (vec!["frobnicate"], &[]),
        // Checked before any lab is built.
        (vec!["bench", "--quick", "--congestion", "nosuch"], &["nosuch", "offers"]),
        (vec!["bench", "flow-logs", "--congestion", "nosuch"], &[]),
        (vec!["--instance", &lab.name, "stats"], &[]),
        (vec!["--instance", &lab.name, "apply", "-f", &state], &[]),
    ];
    for (args, names) in refused {
        let line = ecsnet_fails(&args, 2);
        assert!(names.iter().all(|n| line.contains(n)), "{args:?}: {line}");
    }
    assert!(!Path::new(&pins).exists(), "a failed up left pins");

    lab.ecsnet_up();
    let tasks_before = instance_ok(&lab, &["task", "ls", "--json"]);
    let state = world::state(&lab);
    let bad_cidr = json!([{"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": "tcp",
        "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "10.0.0.0/33"}]}]}]);
    let set = |path, new| with(&state, path, new).to_string();
    // Each bad state file, as (what, its text, the JSON path the error must name).
    #[rustfmt::skip]
    let cases = [
        ("malformed", "{\"host\": ".to_owned(), "$"),
        ("bad cidr", set("securityGroups", bad_cidr),
            "$.securityGroups[0].IpPermissions[0].IpRanges[0].CidrIp"),
        ("duplicate host port", set("tasks/1/portMappings/0/hostPort", json!(8080)),
            "$.tasks[1].portMappings[0].hostPort"),
        ("address outside the bridge", set("tasks/1/ipv4Address", json!("10.99.0.3")),
            "$.tasks[1].ipv4Address"),
        ("unknown interface", set("tasks/0/interface", json!("vethnope")),
            "$.tasks[0].interface"),
        ("unknown sg", set("tasks/0/securityGroups", json!(["sg-nope"])),
            "$.tasks[0].securityGroups[0]"),
        ("port out of range", set("tasks/0/portMappings/0/containerPort", json!(70000)),
            "$.tasks[0].portMappings[0].containerPort"),
        ("one host address", set("tasks/0/portMappings/0/hostIp", json!("127.0.0.1")),
            "$.tasks[0].portMappings[0].hostIp"),
        ("a host port twice on IPv4", with(&with(&state, "tasks/1/portMappings/0/hostPort",
            json!(8080)), "tasks/1/portMappings/0/hostIp", json!("0.0.0.0")).to_string(),
            "$.tasks[1].portMappings[0].hostPort"),
    ];
    for (what, text, path) in cases {
        let f = write(&lab, "case.json", &text);
        let line = instance_fails(&lab, &["apply", "-f", &f], 2);
        assert!(
            line.contains(path),
            "{what}: error {line:?} does not name {path}"
        );
        assert_eq!(
            instance_ok(&lab, &["task", "ls", "--json"]),
            tasks_before,
            "{what} changed the state"
        );
    }
    #[rustfmt::skip]
    let bad_tasks: [&[&str]; 4] = [
        &["task", "rm", "nosuchtask"],
        &["task", "add", "--name", "x", "--ip", "172.17.0.9", "--publish", "80"],
        &["task", "add", "--name", "x", "--ip", "172.17.0.9", "--publish", "127.0.0.1:80:80"],
        &["task", "add", "--name", "x", "--ip", "172.17.0.300"],
    ];
    for args in bad_tasks {
        instance_fails(&lab, args, 2);
    }
    assert_eq!(instance_ok(&lab, &["task", "ls", "--json"]), tasks_before);

    // A good apply still works after all that, and removing a task detaches it.
    let mut one_task = state.clone();
    one_task["tasks"].as_array_mut().unwrap().truncate(1);
    let f = write(&lab, "one.json", &one_task.to_string());
    instance_ok(&lab, &["apply", "-f", &f]);
    let links = std::fs::read_dir(format!("{pins}/links")).unwrap().count();
    // tcx ingress and egress on the uplink and on task1 (no XDP: `auto` on a veth uplink).
    assert_eq!(links, 4, "task2's two tcx links are gone");
    instance_ok(&lab, &["apply", "-f", &lab.state_file()]);
    assert_eq!(
        std::fs::read_dir(format!("{pins}/links")).unwrap().count(),
        6,
        "task2's two tcx links are back"
    );
}

/// The policy maps' contents, as bpftool reads them from the pins.
fn policy_maps(pins: &str) -> String {
    ["SG_PEERS", "SG_RULES"]
        .iter()
        .map(|m| {
            let out = std::process::Command::new("bpftool")
                .args(["map", "dump", "pinned", &format!("{pins}/maps/{m}")])
                .output()
                .expect("bpftool runs (./x setup installs it)");
            assert!(out.status.success(), "bpftool map dump {m}: {out:?}");
            let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines.join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n--\n")
}

#[test]
fn malformed_security_groups_are_one_error_with_a_path_and_change_nothing() {
    let lab = Lab::up("bisg", 2, &["1:8080:80"]);
    let pins = format!("/sys/fs/bpf/ecsnet/{}", lab.name);
    lab.ecsnet_up();

    let good_group = json!({
        "GroupId": "sg-web", "GroupName": "web", "OwnerId": "123456789012",
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                           "IpRanges": [{"CidrIp": "10.10.0.0/24", "Description": "lab"}],
                           "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []}],
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                                 "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []}],
        "VpcId": "vpc-1"
    });
    let mut state = world::state(&lab);
    state["securityGroups"] = json!([good_group.clone()]);
    state["tasks"][0]["securityGroups"] = json!(["sg-web"]);
    let good = write(&lab, "good.json", &state.to_string());
    instance_ok(&lab, &["apply", "-f", &good]);

    let before = snapshot(&lab, &pins);
    assert!(
        before.2.lines().count() > 4,
        "the good groups wrote policy entries: {}",
        before.2
    );

    // Each breakage of the one rule, as (what, the fields it sets in the group, the JSON path
    // under the group the error must name).
    let nope = json!([{"GroupId": "sg-nope", "UserId": "123456789012"}]);
    #[rustfmt::skip]
    let breakages: [Breakage; 12] = [
        ("bad CIDR",
            vec![("IpPermissions/0/IpRanges/0/CidrIp", json!("10.10.0.0/33"))],
            "IpPermissions[0].IpRanges[0].CidrIp"),
        ("host bits in a CIDR",
            vec![("IpPermissionsEgress/0/IpRanges/0/CidrIp", json!("10.1.2.3/8"))],
            "IpPermissionsEgress[0].IpRanges[0].CidrIp"),
        ("FromPort > ToPort",
            vec![("IpPermissions/0/FromPort", json!(81))],
            "IpPermissions[0].FromPort"),
        ("unknown protocol",
            vec![("IpPermissions/0/IpProtocol", json!("tcpx"))],
            "IpPermissions[0].IpProtocol"),
        ("reference to a group that does not exist",
            vec![("IpPermissions/0/UserIdGroupPairs", nope)],
            "IpPermissions[0].UserIdGroupPairs[0].GroupId"),
        ("a prefix list",
            vec![("IpPermissions/0/PrefixListIds", json!([{"PrefixListId": "pl-1234"}]))],
            "IpPermissions[0].PrefixListIds"),
        ("host bits in an IPv6 CIDR",
            vec![("IpPermissions/0/Ipv6Ranges", json!([{"CidrIpv6": "2001:db8::1/32"}]))],
            "IpPermissions[0].Ipv6Ranges[0].CidrIpv6"),
        ("ICMP code 80 with every type (AWS: ToPort must be -1 too)",
            vec![("IpPermissions/0/IpProtocol", json!("icmp")),
                 ("IpPermissions/0/FromPort", json!(-1)),
                 ("IpPermissions/0/ToPort", json!(80))],
            "IpPermissions[0].ToPort"),
        ("ICMP type 256",
            vec![("IpPermissions/0/IpProtocol", json!("icmp")),
                 ("IpPermissions/0/FromPort", json!(256)),
                 ("IpPermissions/0/ToPort", json!(-1))],
            "IpPermissions[0].FromPort"),
        ("a group name of 1025 bytes",
            vec![("GroupName", json!("n".repeat(1025)))],
            "GroupName"),
        ("a rule description of 1025 bytes",
            vec![("IpPermissions/0/IpRanges/0/Description", json!("d".repeat(1025)))],
            "IpPermissions[0].IpRanges[0].Description"),
        ("a field ecsnet ignores, of 1025 bytes",
            vec![("OwnerId", json!("1".repeat(1025)))],
            "OwnerId"),
    ];
    for (what, fields, path) in breakages {
        let group = fields
            .into_iter()
            .fold(good_group.clone(), |g, (at, v)| with(&g, at, v));
        // As `aws ec2 describe-security-groups` prints it, through `sg apply`.
        let aws = json!({"SecurityGroups": [group.clone()]});
        let f = write(&lab, "aws.json", &aws.to_string());
        let line = instance_fails(&lab, &["sg", "apply", "-f", &f], 2);
        let want = format!("$.SecurityGroups[0].{path}");
        assert!(
            line.contains(&want),
            "sg apply, {what}: {line:?} does not name {want}"
        );
        // In a state file, through `apply`.
        let s = with(&state, "securityGroups", json!([group]));
        let f = write(&lab, "state.json", &s.to_string());
        let line = instance_fails(&lab, &["apply", "-f", &f], 2);
        let want = format!("$.securityGroups[0].{path}");
        assert!(
            line.contains(&want),
            "apply, {what}: {line:?} does not name {want}"
        );
        assert_eq!(line.lines().count(), 1, "{what}: one line: {line:?}");
        assert_eq!(
            snapshot(&lab, &pins),
            before,
            "{what} changed the tasks, the groups or the policy maps"
        );
    }
    // Removing a group a task still uses is refused too.
    let f = write(&lab, "none.json", r#"{"SecurityGroups": []}"#);
    let line = instance_fails(&lab, &["sg", "apply", "-f", &f], 2);
    assert!(line.contains("$.tasks[0].securityGroups[0]"), "{line}");
    assert_eq!(policy_maps(&pins), before.2);
}

/// A file over 16 MiB, a string over 1024 bytes anywhere (the issue's 200 MB string drove the
/// agent to 12 GB), through `apply`, `sg apply` and `task add`: one line naming the JSON path
/// (or the file's size), exit 2, nothing changed.
#[test]
fn oversized_files_and_strings_are_refused_and_change_nothing() {
    let lab = Lab::up("biov", 2, &["1:8080:80"]);
    let pins = format!("/sys/fs/bpf/ecsnet/{}", lab.name);
    lab.ecsnet_up();
    let state = world::state(&lab);
    let unchanged = snapshot(&lab, &pins);
    let agent_log = format!("/run/ecsnet/{}.d/agent.log", lab.name);

    // 17 MiB: one description of that size, valid JSON otherwise.
    let mut huge = state.clone();
    huge["tasks"][0]["taskArn"] = "a".repeat(17 << 20).into();
    let f = write(&lab, "huge-state.json", &huge.to_string());
    let line = instance_fails(&lab, &["apply", "-f", &f], 2);
    assert!(line.contains("larger than 16 MiB"), "{line}");
    let aws = json!({"SecurityGroups": [{"GroupId": "sg-1", "Description": "d".repeat(17 << 20)}]});
    let f = write(&lab, "huge-sg.json", &aws.to_string());
    let line = instance_fails(&lab, &["sg", "apply", "-f", &f], 2);
    assert!(line.contains("larger than 16 MiB"), "{line}");

    // Under the file limit, a 2 MB string, in a field ecsnet keeps and in one it ignores.
    let mut s = state.clone();
    s["tasks"][1]["taskArn"] = "a".repeat(2 << 20).into();
    let f = write(&lab, "long-arn.json", &s.to_string());
    let line = instance_fails(&lab, &["apply", "-f", &f], 2);
    assert!(
        line.contains("$.tasks[1].taskArn") && line.contains("longer than the 1024"),
        "{line}"
    );
    assert!(
        line.len() < 400,
        "the error does not quote the string: {line}"
    );
    let mut s = state.clone();
    s["host"]["tags"] = json!({"note": "n".repeat(2 << 20)});
    let f = write(&lab, "long-unknown.json", &s.to_string());
    let line = instance_fails(&lab, &["apply", "-f", &f], 2);
    assert!(line.contains("$.host.tags.note"), "{line}");

    // From the command line.
    let name = "t".repeat(1025);
    let line = instance_fails(
        &lab,
        &["task", "add", "--name", &name, "--ip", "172.17.0.9"],
        2,
    );
    assert!(
        line.contains("$.tasks[2].name") && line.contains("longer than the 1024"),
        "{line}"
    );
    let line = instance_fails(
        &lab,
        &[
            "task",
            "add",
            "--name",
            "x",
            "--ip",
            "172.17.0.9",
            "--sg",
            &name,
        ],
        2,
    );
    assert!(line.contains("$.tasks[2].securityGroups[0]"), "{line}");

    assert_eq!(
        snapshot(&lab, &pins),
        unchanged,
        "a refused input changed the instance"
    );
    let log = std::fs::metadata(&agent_log).map_or(0, |m| m.len());
    assert!(log < 1 << 20, "the agent's log is {log} bytes");
    // And a good apply still works.
    instance_ok(&lab, &["apply", "-f", &lab.state_file()]);
}
