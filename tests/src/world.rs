//! What a test changes on a lab and how it asks the instance: the lab's state file read,
//! edited and written into the lab's own directory (removed with the lab), applied; security
//! groups as `aws ec2 describe-security-groups` prints them; commands on the lab's instance;
//! and the lab taken down with nothing left behind.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::{Lab, ecsnet_fails, ecsnet_ok, leftovers};

/// A file in the lab's own directory, which `lab down` removes.
pub fn lab_file(lab: &Lab, name: &str) -> PathBuf {
    lab.status
        .state_file
        .parent()
        .expect("the state file has a directory")
        .join(name)
}

/// The lab's state file, parsed.
pub fn state(lab: &Lab) -> Value {
    let text = std::fs::read_to_string(lab.state_file()).expect("read the lab's state file");
    serde_json::from_str(&text).expect("the lab's state file parses")
}

/// Writes `value` into the lab's directory as `name`; returns the path.
pub fn write(lab: &Lab, name: &str, value: &Value) -> String {
    let path = lab_file(lab, name);
    std::fs::write(&path, value.to_string())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.display().to_string()
}

/// `ecsnet apply -f FILE EXTRA...` on the lab's host; returns what it printed, which starts
/// with "applied ".
pub fn apply_file(lab: &Lab, file: &str, extra: &[&str]) -> String {
    let mut args = vec!["apply", "-f", file];
    args.extend_from_slice(extra);
    let out = ecsnet_ok(&lab.ecsnet_args(&args));
    assert!(out.starts_with("applied "), "apply printed: {out}");
    out
}

/// `state` written into the lab's directory as `name` and applied.
pub fn apply(lab: &Lab, name: &str, state: &Value) -> String {
    apply_file(lab, &write(lab, name, state), &[])
}

/// `--instance <lab> ARGS`.
fn on_instance<'a>(lab: &'a Lab, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--instance", lab.name.as_str()];
    all.extend_from_slice(args);
    all
}

/// `ecsnet --instance <lab> ARGS`, which must succeed; returns its stdout.
pub fn instance_ok(lab: &Lab, args: &[&str]) -> String {
    ecsnet_ok(&on_instance(lab, args))
}

/// `ecsnet --instance <lab> ARGS`, which must fail with `code` and one line; returns the line.
pub fn instance_fails(lab: &Lab, args: &[&str], code: i32) -> String {
    ecsnet_fails(&on_instance(lab, args), code)
}

/// `ecsnet --instance <lab> flows tail -n all EXTRA...`: every record exported so far.
pub fn flows_tail(lab: &Lab, extra: &[&str]) -> String {
    let mut args = vec!["flows", "tail", "-n", "all"];
    args.extend_from_slice(extra);
    instance_ok(lab, &args)
}

/// Takes the lab down (its instance too) and fails if anything of either is left.
pub fn down_leaves_nothing(lab: Lab) {
    let name = lab.name.clone();
    drop(lab);
    assert_eq!(
        leftovers(&name),
        Vec::<String>::new(),
        "lab down left things behind"
    );
}

// ---- security groups ---------------------------------------------------------------------

/// One `IpPermissions` entry: `peers` starting with `sg-` are group references
/// (`UserIdGroupPairs`), the others CIDRs (`IpRanges`, or `Ipv6Ranges` for IPv6 ones). `ports` is (`FromPort`, `ToPort`).
pub fn perm(proto: &str, ports: Option<(i32, i32)>, peers: &[&str]) -> Value {
    let mut p = json!({"IpProtocol": proto});
    if let Some((from, to)) = ports {
        p["FromPort"] = json!(from);
        p["ToPort"] = json!(to);
    }
    let (groups, cidrs): (Vec<&str>, Vec<&str>) = peers.iter().partition(|p| p.starts_with("sg-"));
    let (v6, v4): (Vec<&str>, Vec<&str>) = cidrs.iter().partition(|c| c.contains(':'));
    if !v4.is_empty() {
        p["IpRanges"] = v4.iter().map(|c| json!({"CidrIp": c})).collect();
    }
    if !v6.is_empty() {
        p["Ipv6Ranges"] = v6.iter().map(|c| json!({"CidrIpv6": c})).collect();
    }
    if !groups.is_empty() {
        p["UserIdGroupPairs"] = groups.iter().map(|g| json!({"GroupId": g})).collect();
    }
    p
}

/// TCP ports `from..=to` from (or to) `peers`.
pub fn tcp(from: i32, to: i32, peers: &[&str]) -> Value {
    perm("tcp", Some((from, to)), peers)
}

/// UDP ports `from..=to` from (or to) `peers`.
pub fn udp(from: i32, to: i32, peers: &[&str]) -> Value {
    perm("udp", Some((from, to)), peers)
}

/// `IpProtocol: "-1"`: every protocol and port.
pub fn all(peers: &[&str]) -> Value {
    perm("-1", None, peers)
}

/// A security group with these inbound and outbound rules.
pub fn sg(id: &str, name: &str, inbound: &[Value], outbound: &[Value]) -> Value {
    json!({
        "GroupId": id,
        "GroupName": name,
        "IpPermissions": inbound,
        "IpPermissionsEgress": outbound,
    })
}

/// Puts `groups` in `state` and, for task i+1, the groups `members[i]` (the tasks after those
/// keep theirs).
pub fn set_groups(state: &mut Value, groups: &[Value], members: &[&[&str]]) {
    state["securityGroups"] = json!(groups);
    for (i, m) in members.iter().enumerate() {
        state["tasks"][i]["securityGroups"] = json!(m);
    }
}

/// The lab's state file with `groups` and, for task i+1, the groups `members[i]`.
pub fn state_with_groups(lab: &Lab, groups: &[Value], members: &[&[&str]]) -> Value {
    let mut s = state(lab);
    set_groups(&mut s, groups, members);
    s
}
