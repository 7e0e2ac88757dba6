//! Bad input to every command is one clear line, exit 2, and changes nothing.

use std::path::Path;

use ecsnet_tests::{Lab, ecsnet_fails, ecsnet_ok, unique};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn bad_input_changes_nothing() {
    let lab = Lab::up("bi", 2, &["1:8080:80", "2:8081:80"]);
    let dir = std::env::temp_dir().join(unique("ecsnet-bi"));
    std::fs::create_dir_all(&dir).unwrap();
    let pins = format!("/sys/fs/bpf/ecsnet/{}", lab.name);

    // Before up: unknown interface, missing namespace, malformed state: nothing is pinned.
    let line = ecsnet_fails(&lab.ecsnet_args(&["up", "--uplink", "nope0"]), 2);
    assert!(line.contains("nope0"), "{line}");
    ecsnet_fails(&lab.ecsnet_args(&["up", "--bridge", "eth0"]), 2);
    let line = ecsnet_fails(
        &[
            "--netns",
            "ecsnet-no-such-ns",
            "--instance",
            &lab.name,
            "up",
        ],
        2,
    );
    assert!(line.contains("ecsnet-no-such-ns"), "{line}");
    let broken = write(&dir, "broken.json", "{\"tasks\": [");
    ecsnet_fails(&lab.ecsnet_args(&["up", "--state", &broken]), 2);
    ecsnet_fails(
        &lab.ecsnet_args(&["up", "--state", "/nonexistent/state.json"]),
        2,
    );
    ecsnet_fails(&lab.ecsnet_args(&["up", "--xdp-mode", "turbo"]), 2);
    ecsnet_fails(&lab.ecsnet_args(&["up", "--window", "0"]), 2);
    ecsnet_fails(&["--instance", "../etc", "up"], 2);
    ecsnet_fails(&["frobnicate"], 2);
    // Checked before any lab is built.
    let line = ecsnet_fails(&["bench", "--quick", "--congestion", "nosuch"], 2);
    assert!(line.contains("nosuch") && line.contains("offers"), "{line}");
    ecsnet_fails(&["bench", "flow-logs", "--congestion", "nosuch"], 2);
    ecsnet_fails(&["--instance", &lab.name, "stats"], 2);
    ecsnet_fails(
        &["--instance", &lab.name, "apply", "-f", &lab.state_file()],
        2,
    );
    assert!(!Path::new(&pins).exists(), "a failed up left pins");

    lab.ecsnet_up();
    let tasks_before = ecsnet_ok(&["--instance", &lab.name, "task", "ls", "--json"]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.state_file()).unwrap()).unwrap();
    let variant = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = state.clone();
        f(&mut s);
        s.to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", "{\"host\": ".into(), "$"),
        (
            "bad cidr",
            variant(&|s| {
                s["securityGroups"] = serde_json::json!([{"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "10.0.0.0/33"}]}]}]);
            }),
            "$.securityGroups[0].IpPermissions[0].IpRanges[0].CidrIp",
        ),
        (
            "duplicate host port",
            variant(&|s| {
                s["tasks"][1]["portMappings"][0]["hostPort"] = serde_json::json!(8080);
            }),
            "$.tasks[1].portMappings[0].hostPort",
        ),
        (
            "address outside the bridge",
            variant(&|s| {
                s["tasks"][1]["ipv4Address"] = serde_json::json!("10.99.0.3");
            }),
            "$.tasks[1].ipv4Address",
        ),
        (
            "unknown interface",
            variant(&|s| {
                s["tasks"][0]["interface"] = serde_json::json!("vethnope");
            }),
            "$.tasks[0].interface",
        ),
        (
            "unknown sg",
            variant(&|s| {
                s["tasks"][0]["securityGroups"] = serde_json::json!(["sg-nope"]);
            }),
            "$.tasks[0].securityGroups[0]",
        ),
        (
            "port out of range",
            variant(&|s| {
                s["tasks"][0]["portMappings"][0]["containerPort"] = serde_json::json!(70000);
            }),
            "$.tasks[0].portMappings[0].containerPort",
        ),
    ];
    for (what, text, path) in cases {
        let f = write(&dir, "case.json", &text);
        let line = ecsnet_fails(&["--instance", &lab.name, "apply", "-f", &f], 2);
        assert!(
            line.contains(path),
            "{what}: error {line:?} does not name {path}"
        );
        assert_eq!(
            ecsnet_ok(&["--instance", &lab.name, "task", "ls", "--json"]),
            tasks_before,
            "{what} changed the state"
        );
    }
    ecsnet_fails(&["--instance", &lab.name, "task", "rm", "nosuchtask"], 2);
    ecsnet_fails(
        &[
            "--instance",
            &lab.name,
            "task",
            "add",
            "--name",
            "x",
            "--ip",
            "172.17.0.9",
            "--publish",
            "80",
        ],
        2,
    );
    ecsnet_fails(
        &[
            "--instance",
            &lab.name,
            "task",
            "add",
            "--name",
            "x",
            "--ip",
            "172.17.0.300",
        ],
        2,
    );
    assert_eq!(
        ecsnet_ok(&["--instance", &lab.name, "task", "ls", "--json"]),
        tasks_before
    );

    // A good apply still works after all that, and removing a task detaches it.
    let one_task = variant(&|s| {
        s["tasks"].as_array_mut().unwrap().truncate(1);
    });
    let f = write(&dir, "one.json", &one_task);
    ecsnet_ok(&["--instance", &lab.name, "apply", "-f", &f]);
    let links = std::fs::read_dir(format!("{pins}/links")).unwrap().count();
    // tcx ingress and egress on the uplink and on task1 (no XDP: `auto` on a veth uplink).
    assert_eq!(links, 4, "task2's two tcx links are gone");
    ecsnet_ok(&["--instance", &lab.name, "apply", "-f", &lab.state_file()]);
    assert_eq!(
        std::fs::read_dir(format!("{pins}/links")).unwrap().count(),
        6,
        "task2's two tcx links are back"
    );
    let _ = std::fs::remove_dir_all(&dir);
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
    let dir = std::env::temp_dir().join(unique("ecsnet-bisg"));
    std::fs::create_dir_all(&dir).unwrap();
    let pins = format!("/sys/fs/bpf/ecsnet/{}", lab.name);
    lab.ecsnet_up();

    let good_group = serde_json::json!({
        "GroupId": "sg-web", "GroupName": "web", "OwnerId": "123456789012",
        "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                           "IpRanges": [{"CidrIp": "10.10.0.0/24", "Description": "lab"}],
                           "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []}],
        "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                                 "Ipv6Ranges": [], "PrefixListIds": [], "UserIdGroupPairs": []}],
        "VpcId": "vpc-1"
    });
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.state_file()).unwrap()).unwrap();
    state["securityGroups"] = serde_json::json!([good_group.clone()]);
    state["tasks"][0]["securityGroups"] = serde_json::json!(["sg-web"]);
    let good = write(&dir, "good.json", &state.to_string());
    ecsnet_ok(&["--instance", &lab.name, "apply", "-f", &good]);

    let sg_before = ecsnet_ok(&["--instance", &lab.name, "sg", "ls", "--json"]);
    let tasks_before = ecsnet_ok(&["--instance", &lab.name, "task", "ls", "--json"]);
    let maps_before = policy_maps(&pins);
    assert!(
        maps_before.lines().count() > 4,
        "the good groups wrote policy entries: {maps_before}"
    );

    // Each breakage of the one rule, as (what, change, JSON path under the group).
    type Breakage = (&'static str, fn(&mut serde_json::Value), &'static str);
    let breakages: [Breakage; 12] = [
        (
            "bad CIDR",
            |g| g["IpPermissions"][0]["IpRanges"][0]["CidrIp"] = "10.10.0.0/33".into(),
            "IpPermissions[0].IpRanges[0].CidrIp",
        ),
        (
            "host bits in a CIDR",
            |g| g["IpPermissionsEgress"][0]["IpRanges"][0]["CidrIp"] = "10.1.2.3/8".into(),
            "IpPermissionsEgress[0].IpRanges[0].CidrIp",
        ),
        (
            "FromPort > ToPort",
            |g| g["IpPermissions"][0]["FromPort"] = 81.into(),
            "IpPermissions[0].FromPort",
        ),
        (
            "unknown protocol",
            |g| g["IpPermissions"][0]["IpProtocol"] = "tcpx".into(),
            "IpPermissions[0].IpProtocol",
        ),
        (
            "reference to a group that does not exist",
            |g| {
                g["IpPermissions"][0]["UserIdGroupPairs"] =
                    serde_json::json!([{"GroupId": "sg-nope", "UserId": "123456789012"}])
            },
            "IpPermissions[0].UserIdGroupPairs[0].GroupId",
        ),
        (
            "a prefix list",
            |g| {
                g["IpPermissions"][0]["PrefixListIds"] =
                    serde_json::json!([{"PrefixListId": "pl-1234"}])
            },
            "IpPermissions[0].PrefixListIds",
        ),
        (
            "an IPv6 range",
            |g| g["IpPermissions"][0]["Ipv6Ranges"] = serde_json::json!([{"CidrIpv6": "::/0"}]),
            "IpPermissions[0].Ipv6Ranges",
        ),
        (
            "ICMP code 80 with every type (AWS: ToPort must be -1 too)",
            |g| {
                let p = &mut g["IpPermissions"][0];
                p["IpProtocol"] = "icmp".into();
                p["FromPort"] = (-1).into();
                p["ToPort"] = 80.into();
            },
            "IpPermissions[0].ToPort",
        ),
        (
            "ICMP type 256",
            |g| {
                let p = &mut g["IpPermissions"][0];
                p["IpProtocol"] = "icmp".into();
                p["FromPort"] = 256.into();
                p["ToPort"] = (-1).into();
            },
            "IpPermissions[0].FromPort",
        ),
        (
            "a group name of 1025 bytes",
            |g| g["GroupName"] = "n".repeat(1025).into(),
            "GroupName",
        ),
        (
            "a rule description of 1025 bytes",
            |g| g["IpPermissions"][0]["IpRanges"][0]["Description"] = "d".repeat(1025).into(),
            "IpPermissions[0].IpRanges[0].Description",
        ),
        (
            "a field ecsnet ignores, of 1025 bytes",
            |g| g["OwnerId"] = "1".repeat(1025).into(),
            "OwnerId",
        ),
    ];
    for (what, breakage, path) in breakages {
        let mut group = good_group.clone();
        breakage(&mut group);
        // As `aws ec2 describe-security-groups` prints it, through `sg apply`.
        let aws = serde_json::json!({"SecurityGroups": [group.clone()]});
        let f = write(&dir, "aws.json", &aws.to_string());
        let line = ecsnet_fails(&["--instance", &lab.name, "sg", "apply", "-f", &f], 2);
        let want = format!("$.SecurityGroups[0].{path}");
        assert!(
            line.contains(&want),
            "sg apply, {what}: {line:?} does not name {want}"
        );
        // In a state file, through `apply`.
        let mut s = state.clone();
        s["securityGroups"] = serde_json::json!([group]);
        let f = write(&dir, "state.json", &s.to_string());
        let line = ecsnet_fails(&["--instance", &lab.name, "apply", "-f", &f], 2);
        let want = format!("$.securityGroups[0].{path}");
        assert!(
            line.contains(&want),
            "apply, {what}: {line:?} does not name {want}"
        );
        assert_eq!(line.lines().count(), 1, "{what}: one line: {line:?}");
        assert_eq!(
            ecsnet_ok(&["--instance", &lab.name, "sg", "ls", "--json"]),
            sg_before,
            "{what} changed the groups"
        );
        assert_eq!(
            ecsnet_ok(&["--instance", &lab.name, "task", "ls", "--json"]),
            tasks_before,
            "{what} changed the tasks"
        );
        assert_eq!(
            policy_maps(&pins),
            maps_before,
            "{what} changed the policy maps"
        );
    }
    // Removing a group a task still uses is refused too.
    let f = write(&dir, "none.json", r#"{"SecurityGroups": []}"#);
    let line = ecsnet_fails(&["--instance", &lab.name, "sg", "apply", "-f", &f], 2);
    assert!(line.contains("$.tasks[0].securityGroups[0]"), "{line}");
    assert_eq!(policy_maps(&pins), maps_before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file over 16 MiB, a string over 1024 bytes anywhere (the issue's 200 MB string drove the
/// agent to 12 GB), through `apply`, `sg apply` and `task add`: one line naming the JSON path
/// (or the file's size), exit 2, nothing changed.
#[test]
fn oversized_files_and_strings_are_refused_and_change_nothing() {
    let lab = Lab::up("biov", 2, &["1:8080:80"]);
    let dir = std::env::temp_dir().join(unique("ecsnet-biov"));
    std::fs::create_dir_all(&dir).unwrap();
    let pins = format!("/sys/fs/bpf/ecsnet/{}", lab.name);
    lab.ecsnet_up();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.state_file()).unwrap()).unwrap();
    let before = || {
        (
            ecsnet_ok(&["--instance", &lab.name, "task", "ls", "--json"]),
            ecsnet_ok(&["--instance", &lab.name, "sg", "ls", "--json"]),
            policy_maps(&pins),
        )
    };
    let unchanged = before();
    let agent_log = format!("/run/ecsnet/{}.d/agent.log", lab.name);

    // 17 MiB: one description of that size, valid JSON otherwise.
    let mut huge = state.clone();
    huge["tasks"][0]["taskArn"] = "a".repeat(17 << 20).into();
    let f = write(&dir, "huge-state.json", &huge.to_string());
    let line = ecsnet_fails(&["--instance", &lab.name, "apply", "-f", &f], 2);
    assert!(line.contains("larger than 16 MiB"), "{line}");
    let aws = serde_json::json!({"SecurityGroups": [{"GroupId": "sg-1", "Description": "d".repeat(17 << 20)}]});
    let f = write(&dir, "huge-sg.json", &aws.to_string());
    let line = ecsnet_fails(&["--instance", &lab.name, "sg", "apply", "-f", &f], 2);
    assert!(line.contains("larger than 16 MiB"), "{line}");

    // Under the file limit, a 2 MB string, in a field ecsnet keeps and in one it ignores.
    let mut s = state.clone();
    s["tasks"][1]["taskArn"] = "a".repeat(2 << 20).into();
    let f = write(&dir, "long-arn.json", &s.to_string());
    let line = ecsnet_fails(&["--instance", &lab.name, "apply", "-f", &f], 2);
    assert!(
        line.contains("$.tasks[1].taskArn") && line.contains("longer than the 1024"),
        "{line}"
    );
    assert!(
        line.len() < 400,
        "the error does not quote the string: {line}"
    );
    let mut s = state.clone();
    s["host"]["tags"] = serde_json::json!({"note": "n".repeat(2 << 20)});
    let f = write(&dir, "long-unknown.json", &s.to_string());
    let line = ecsnet_fails(&["--instance", &lab.name, "apply", "-f", &f], 2);
    assert!(line.contains("$.host.tags.note"), "{line}");

    // From the command line.
    let name = "t".repeat(1025);
    let line = ecsnet_fails(
        &[
            "--instance",
            &lab.name,
            "task",
            "add",
            "--name",
            &name,
            "--ip",
            "172.17.0.9",
        ],
        2,
    );
    assert!(
        line.contains("$.tasks[2].name") && line.contains("longer than the 1024"),
        "{line}"
    );
    let line = ecsnet_fails(
        &[
            "--instance",
            &lab.name,
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

    assert_eq!(before(), unchanged, "a refused input changed the instance");
    let log = std::fs::metadata(&agent_log).map(|m| m.len()).unwrap_or(0);
    assert!(log < 1 << 20, "the agent's log is {log} bytes");
    // And a good apply still works.
    ecsnet_ok(&["--instance", &lab.name, "apply", "-f", &lab.state_file()]);
    let _ = std::fs::remove_dir_all(&dir);
}
