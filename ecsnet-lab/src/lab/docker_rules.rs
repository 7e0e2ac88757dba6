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
//!
//! With `--ipv6 nat` the same rules again for ip6tables, as dockerd 20.10 writes them with
//! `ipv6`, `fixed-cidr-v6` and `ip6tables` (checked the same way); with `--ipv6 routed`
//! Docker 27's `gateway_mode_ipv6=routed`: no NAT66 at all, the filter rules alone decide,
//! accepting published container ports at the tasks' own addresses (and `ICMPv6`).

use std::{io::Write as _, net::IpAddr, process::Stdio};

use super::{BRIDGE, BRIDGE_SUBNET, BRIDGE_SUBNET6, Ipv6Mode, LabError, LabTask, topology};

/// The iptables-restore input dockerd (20.10, `--userland-proxy=false`, so hairpin NAT is done
/// by iptables) writes for docker0 and these tasks' published ports, in its order.
pub fn docker_rules(tasks: &[LabTask]) -> String {
    let addresses: Vec<IpAddr> = tasks.iter().map(|t| t.address.into()).collect();
    bridge_rules(tasks, &addresses, BRIDGE_SUBNET, Family::Ipv4)
}

/// Which of dockerd's tables `bridge_rules` writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Ipv4,
    /// ip6tables as dockerd 20.10 writes it: iptables' rules with IPv6 addresses and no
    /// `DOCKER-USER` chain (20.10 makes that one for IPv4 only).
    Ipv6Nat,
    /// The same without translation (`--ipv6 routed`).
    Ipv6Routed,
}

/// The ip6tables-restore input for the same host with IPv6 in `mode`: for `Nat` what
/// dockerd 20.10 writes; for `Routed` the same filter table with no translation (and `ICMPv6`
/// let through to docker0, as Docker 27 does in that mode). Tasks without an IPv6 address
/// publish nothing over IPv6.
pub fn docker_rules6(tasks: &[LabTask], mode: Ipv6Mode) -> String {
    let (tasks, addresses): (Vec<LabTask>, Vec<IpAddr>) = tasks
        .iter()
        .filter_map(|t| Some((t.clone(), IpAddr::from(t.address6?))))
        .unzip();
    let family = match mode {
        Ipv6Mode::Nat => Family::Ipv6Nat,
        Ipv6Mode::Routed => Family::Ipv6Routed,
    };
    bridge_rules(&tasks, &addresses, BRIDGE_SUBNET6, family)
}

/// Docker's tables for docker0 on `subnet`, task `tasks[k]` at `addresses[k]`.
fn bridge_rules(tasks: &[LabTask], addresses: &[IpAddr], subnet: &str, family: Family) -> String {
    let b = BRIDGE;
    let nat_on = family != Family::Ipv6Routed;
    let user = family == Family::Ipv4;
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
    if nat_on {
        nat.extend([
            format!("-A POSTROUTING -o {b} -m addrtype --src-type LOCAL -j MASQUERADE"),
            format!("-A POSTROUTING -s {subnet} ! -o {b} -j MASQUERADE"),
        ]);
    }
    let mut filter = lines(&[
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD DROP [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":DOCKER - [0:0]",
        ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
        ":DOCKER-ISOLATION-STAGE-2 - [0:0]",
    ]);
    if user {
        filter.extend(lines(&[
            ":DOCKER-USER - [0:0]",
            "-A FORWARD -j DOCKER-USER",
        ]));
    }
    filter.push("-A FORWARD -j DOCKER-ISOLATION-STAGE-1".to_owned());
    filter.extend([
        format!("-A FORWARD -o {b} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        format!("-A FORWARD -o {b} -j DOCKER"),
        format!("-A FORWARD -i {b} ! -o {b} -j ACCEPT"),
        format!("-A FORWARD -i {b} -o {b} -j ACCEPT"),
    ]);
    if !nat_on {
        filter.push(format!("-A DOCKER -o {b} -p ipv6-icmp -j ACCEPT"));
    }
    for (t, ip) in tasks.iter().zip(addresses) {
        let (host, bits) = match ip {
            IpAddr::V4(_) => (ip.to_string(), 32),
            IpAddr::V6(_) => (format!("[{ip}]"), 128),
        };
        for p in &t.port_mappings {
            let proto = p.protocol.as_str();
            let (cp, hp) = (p.container_port, p.host_port);
            let port = format!("-p {proto} -m {proto} --dport");
            if nat_on {
                nat.push(format!(
                    "-A POSTROUTING -s {ip}/{bits} -d {ip}/{bits} {port} {cp} -j MASQUERADE"
                ));
                nat.push(format!(
                    "-A DOCKER {port} {hp} -j DNAT --to-destination {host}:{cp}"
                ));
            }
            filter.push(format!(
                "-A DOCKER -d {ip}/{bits} ! -i {b} -o {b} {port} {cp} -j ACCEPT"
            ));
        }
    }
    filter.extend([
        format!("-A DOCKER-ISOLATION-STAGE-1 -i {b} ! -o {b} -j DOCKER-ISOLATION-STAGE-2"),
        "-A DOCKER-ISOLATION-STAGE-1 -j RETURN".to_owned(),
        format!("-A DOCKER-ISOLATION-STAGE-2 -o {b} -j DROP"),
        "-A DOCKER-ISOLATION-STAGE-2 -j RETURN".to_owned(),
    ]);
    if user {
        filter.push("-A DOCKER-USER -j RETURN".to_owned());
    }
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
    restore(host, "iptables-restore", rules)
}

/// Replaces the ip6tables rules of the lab host `host` with `rules`.
pub fn restore_rules6(host: &str, rules: &str) -> Result<(), LabError> {
    restore(host, "ip6tables-restore", rules)
}

fn restore(host: &str, tool: &str, rules: &str) -> Result<(), LabError> {
    let failed = |stderr: String| LabError::Command {
        cmd: format!("{tool} in {host}"),
        stderr,
    };
    let mut child = topology::command(host, &[tool])?
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
            address6: None,
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

    fn dual_stack_task() -> LabTask {
        LabTask {
            name: "task1".into(),
            netns: "l-task1".into(),
            address: task_address(1),
            address6: Some(crate::lab::task_address6(task_address(1))),
            interface: veth_name("l", 1),
            port_mappings: vec![LabPort {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Udp,
            }],
        }
    }

    #[test]
    fn ip6tables_nat66_as_dockerd_and_routed_without_translation() {
        let t = dual_stack_task();
        let nat = docker_rules6(std::slice::from_ref(&t), Ipv6Mode::Nat);
        for needle in [
            "-A DOCKER -p udp -m udp --dport 8080 -j DNAT --to-destination [fd00:172:17::242:ac11:2]:80",
            "-A POSTROUTING -s fd00:172:17::/64 ! -o docker0 -j MASQUERADE",
            "-A DOCKER -d fd00:172:17::242:ac11:2/128 ! -i docker0 -o docker0 -p udp -m udp --dport 80 -j ACCEPT",
            ":FORWARD DROP",
        ] {
            assert!(nat.contains(needle), "missing {needle} in {nat}");
        }
        assert!(
            !nat.contains("DOCKER-USER"),
            "20.10 has no IPv6 DOCKER-USER"
        );
        assert!(!nat.contains("172.17.0.2"), "no IPv4 address in {nat}");
        let routed = docker_rules6(&[t], Ipv6Mode::Routed);
        assert!(
            !routed.contains("DNAT") && !routed.contains("MASQUERADE"),
            "{routed}"
        );
        assert!(routed.contains("-A DOCKER -o docker0 -p ipv6-icmp -j ACCEPT"));
        assert!(routed.contains(
            "-A DOCKER -d fd00:172:17::242:ac11:2/128 ! -i docker0 -o docker0 -p udp -m udp --dport 80 -j ACCEPT"
        ));
        // A task without an IPv6 address publishes nothing over IPv6.
        let v4_only = LabTask {
            address6: None,
            ..dual_stack_task()
        };
        assert!(!docker_rules6(&[v4_only], Ipv6Mode::Nat).contains("--dport"));
    }
}
