//! Docker's iptables rules for the lab host, written as dockerd writes them and loaded with
//! `iptables-restore` inside the host's namespace (a shell-out, as Docker's own).
//!
//! The imitation is dockerd 20.10 with `--userland-proxy=false`, rule for rule: `iptables-save`
//! of the real-engine lab in that mode (`lab up --docker --userland-proxy false`) and of the
//! imitation with the same ports are the same lines (`tests/tests/lab_docker.rs` checks it), and
//! so are docker0's `route_localnet=1` and hairpin on every bridge port. Docker's default
//! (`userland-proxy` on) differs in exactly what its docker-proxy processes take over: DNAT
//! gets `! -i docker0`, `DOCKER` starts with `-i docker0 -j RETURN`, OUTPUT's jump gets
//! `! -d 127.0.0.0/8`, no `--src-type LOCAL` masquerade, `route_localnet` 0 and hairpin off; a
//! task reaching a published port through the host, and the host reaching `127.0.0.1:PORT`,
//! then go through docker-proxy. The imitation runs no proxy, so it keeps the mode in which
//! those paths are iptables' own; the default mode is the real-engine lab's.

use std::{io::Write as _, process::Stdio};

use super::{BRIDGE, BRIDGE_SUBNET, LabError, LabTask, topology};

/// The iptables-restore input dockerd (20.10, `--userland-proxy=false`, so hairpin NAT is done
/// by iptables) writes for docker0 and these tasks' published ports, in its order.
pub fn docker_rules(tasks: &[LabTask]) -> String {
    let b = BRIDGE;
    let mut nat = lines(&[
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":DOCKER - [0:0]",
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER",
    ]);
    nat.extend([
        format!("-A POSTROUTING -o {b} -m addrtype --src-type LOCAL -j MASQUERADE"),
        format!("-A POSTROUTING -s {BRIDGE_SUBNET} ! -o {b} -j MASQUERADE"),
    ]);
    let mut filter = lines(&[
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD DROP [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":DOCKER - [0:0]",
        ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
        ":DOCKER-ISOLATION-STAGE-2 - [0:0]",
        ":DOCKER-USER - [0:0]",
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
    ]);
    filter.extend([
        format!("-A FORWARD -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        format!("-A FORWARD -o {b} -j DOCKER"),
        format!("-A FORWARD -i {b} ! -o {b} -j ACCEPT"),
        format!("-A FORWARD -i {b} -o {b} -j ACCEPT"),
    ]);
    for t in tasks {
        for p in &t.port_mappings {
            let proto = p.protocol.as_str();
            let (ip, cp, hp) = (t.address, p.container_port, p.host_port);
            let port = format!("-p {proto} -m {proto} --dport");
            nat.push(format!(
                "-A POSTROUTING -s {ip}/32 -d {ip}/32 {port} {cp} -j MASQUERADE"
            ));
            nat.push(format!(
                "-A DOCKER {port} {hp} -j DNAT --to-destination {ip}:{cp}"
            ));
            filter.push(format!(
                "-A DOCKER -d {ip}/32 ! -i {b} -o {b} {port} {cp} -j ACCEPT"
            ));
        }
    }
    filter.extend([
        format!("-A DOCKER-ISOLATION-STAGE-1 -i {b} ! -o {b} -j DOCKER-ISOLATION-STAGE-2"),
        "-A DOCKER-ISOLATION-STAGE-1 -j RETURN".to_owned(),
        format!("-A DOCKER-ISOLATION-STAGE-2 -o {b} -j DROP"),
        "-A DOCKER-ISOLATION-STAGE-2 -j RETURN".to_owned(),
        "-A DOCKER-USER -j RETURN".to_owned(),
    ]);
    for table in [&mut nat, &mut filter] {
        table.push("COMMIT".to_owned());
    }
    nat.into_iter()
        .chain(filter)
        .map(|line| line + "\n")
        .collect()
}

fn lines(fixed: &[&str]) -> Vec<String> {
    fixed.iter().map(|l| (*l).to_owned()).collect()
}

/// Replaces the iptables rules of the lab host `host` with `rules` (iptables-restore input).
pub fn restore_rules(host: &str, rules: &str) -> Result<(), LabError> {
    let failed = |stderr: String| LabError::Command {
        cmd: format!("iptables-restore in {host}"),
        stderr,
    };
    let mut child = topology::command(host, &["iptables-restore"])?
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(rules.as_bytes());
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    written.map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{LabPort, task_address, veth_name};
    use ecsnet::state::Protocol;

    #[test]
    fn rules_have_docker_chains_and_per_port_dnat() {
        let t = LabTask {
            name: "task1".into(),
            netns: "l-task1".into(),
            address: task_address(1),
            interface: veth_name("l", 1),
            port_mappings: vec![LabPort {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
            }],
        };
        let r = docker_rules(&[t]);
        for needle in [
            ":DOCKER-USER - [0:0]",
            ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
            "-A DOCKER -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80",
            "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
            "-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT",
            ":FORWARD DROP",
        ] {
            assert!(r.contains(needle), "missing {needle}");
        }
        assert_eq!(r.matches("COMMIT").count(), 2);
    }
}
