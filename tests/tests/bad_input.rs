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
    assert_eq!(links, 5, "task2's two tcx links are gone");
    ecsnet_ok(&["--instance", &lab.name, "apply", "-f", &lab.state_file()]);
    assert_eq!(
        std::fs::read_dir(format!("{pins}/links")).unwrap().count(),
        7
    );
    let _ = std::fs::remove_dir_all(&dir);
}
