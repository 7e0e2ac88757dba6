//! `ecsnet task add|rm|ls`: a read-modify-write of the applied state under the apply lock.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use clap::Subcommand;

use crate::{
    cli::{UsageError, print_json_or},
    instance,
    plan::merge,
    state::{PortFamily, PortMapping, Protocol, State, Task, TaskSource},
    store::{files, paths::InstancePaths},
};

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Add a task (or replace the one with the same name).
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        ip: Ipv4Addr,
        /// The task's global IPv6 address, if it has one.
        #[arg(long)]
        ipv6: Option<Ipv6Addr>,
        #[arg(long)]
        interface: Option<String>,
        /// [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp], as Docker spells it: HOSTIP 0.0.0.0
        /// publishes on IPv4 only, [::] on IPv6 only, none on both; HOSTPORT 0 is dynamic.
        #[arg(long, value_parser = publish)]
        publish: Vec<PortMapping>,
        #[arg(long = "sg")]
        security_groups: Vec<String>,
    },
    /// Remove a task by name.
    Rm { name: String },
    /// List tasks with their interfaces and host ports.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
#[error(
    "expected [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp], HOSTIP 0.0.0.0 (IPv4 only) or [::] \
     (IPv6 only)"
)]
pub struct BadPublish;

/// `--publish [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]`, HOSTIP `0.0.0.0` or `[::]`.
fn publish(s: &str) -> Result<PortMapping, BadPublish> {
    let (ports, protocol) = Protocol::split_suffix(s).map_err(|_| BadPublish)?;
    let (host_ip, ports) = match ports.rsplitn(3, ':').collect::<Vec<_>>()[..] {
        [c, h] => (PortFamily::Both, (h, c)),
        [c, h, ip] => {
            let ip = ip
                .strip_prefix('[')
                .and_then(|ip| ip.strip_suffix(']'))
                .unwrap_or(ip);
            // `::` unbracketed would be read as ports; Docker wants brackets too.
            let bare_v6 = ip.contains(':') && !ports.starts_with('[');
            match PortFamily::of_host_ip(ip) {
                Some(f) if f != PortFamily::Both && !bare_v6 => (f, (h, c)),
                _ => return Err(BadPublish),
            }
        }
        _ => return Err(BadPublish),
    };
    Ok(PortMapping {
        host_port: ports.0.parse().map_err(|_| BadPublish)?,
        container_port: ports.1.parse().ok().filter(|p| *p != 0).ok_or(BadPublish)?,
        protocol,
        host_ip,
    })
}

/// The applied state of an instance that is up.
pub(super) fn current_state(paths: &InstancePaths) -> anyhow::Result<State> {
    files::require_up(paths)?;
    Ok(files::read_applied(paths)?.unwrap_or_default())
}

pub fn run(paths: &InstancePaths, cmd: TaskCmd) -> anyhow::Result<()> {
    match cmd {
        TaskCmd::Add {
            name,
            ip,
            ipv6,
            interface,
            publish,
            security_groups,
        } => add(
            paths,
            Task {
                ipv6_address: ipv6,
                interface,
                port_mappings: publish,
                security_groups,
                ..Task::new(name, ip)
            },
        ),
        TaskCmd::Rm { name } => {
            let lock = instance::lock_apply(paths)?;
            let mut s = current_state(paths)?;
            if let Some(t) = s
                .tasks
                .iter()
                .find(|t| t.name == name && t.source == TaskSource::Docker)
            {
                return Err(UsageError::EngineTask {
                    name,
                    container: merge::short_id(t.container_id.as_deref().unwrap_or("?")).to_owned(),
                }
                .into());
            }
            let before = s.tasks.len();
            s.tasks.retain(|t| t.name != name);
            if s.tasks.len() == before {
                return Err(UsageError::NoSuchTask { name }.into());
            }
            instance::apply_state(paths, &lock, s, "task rm", false)?;
            println!("task {name} removed");
            Ok(())
        }
        TaskCmd::Ls { json } => {
            let s = current_state(paths)?;
            let notes = notes(paths, &s)?;
            print_json_or(json, &s.tasks[..], |t| table(t, &notes));
            Ok(())
        }
    }
}

/// Adds `task`, or replaces the one of its name.
fn add(paths: &InstancePaths, mut task: Task) -> anyhow::Result<()> {
    let lock = instance::lock_apply(paths)?;
    let mut s = current_state(paths)?;
    // A task ecsnet already manages keeps its interface unless one is given: the host may have
    // no neighbour entry to find it by its address again.
    if task.interface.is_none() {
        task.interface = s
            .tasks
            .iter()
            .find(|t| t.ipv4_address == task.ipv4_address)
            .and_then(|t| t.interface.clone());
    }
    let name = task.name.clone();
    s.tasks.retain(|t| t.name != name);
    s.tasks.push(task);
    let s = instance::apply_state(paths, &lock, s, "task add", false)?.state;
    let t = s
        .tasks
        .iter()
        .find(|t| t.name == name)
        .expect("task was just added");
    println!(
        "task {} {} on {}",
        t.name,
        t.ipv4_address,
        t.interface.as_deref().unwrap_or("-")
    );
    Ok(())
}

/// A task's published ports as `docker ps` prints them: `8080->80/tcp 0.0.0.0:5353->53/udp
/// [::]:8443->443/tcp`, the host address only for a port published on one family.
pub fn ports(mappings: &[PortMapping]) -> String {
    let ports: Vec<String> = mappings
        .iter()
        .map(|p| {
            format!(
                "{}{}->{}/{}",
                p.host_ip.docker_prefix(),
                p.host_port,
                p.container_port,
                p.protocol.as_str()
            )
        })
        .collect();
    ports.join(" ")
}

/// The table `task ls` prints: each task, where it came from (`state` or `docker` and the
/// container), and below it what the merge decided about the engine's containers.
fn table(tasks: &[Task], notes: &[String]) -> String {
    let w = tasks
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0)
        .max(12);
    // An IPv6 column only when a task has an IPv6 address.
    let w6 = tasks
        .iter()
        .filter_map(|t| Some(t.ipv6_address?.to_string().len()))
        .max()
        .map_or(0, |w| w.max(4) + 1);
    let mut out = format!(
        "{:<w$} {:<15} {:<w6$}{:<15} {:<20} PORTS\n",
        "TASK",
        "ADDRESS",
        if w6 > 0 { "IPV6" } else { "" },
        "INTERFACE",
        "SOURCE"
    );
    for t in tasks {
        let source = match (t.source, &t.container_id) {
            (TaskSource::Docker, Some(id)) => format!("docker {}", merge::short_id(id)),
            (TaskSource::Docker, None) => "docker".to_owned(),
            (TaskSource::State, _) => "state".to_owned(),
        };
        let v6 = match (w6, t.ipv6_address) {
            (0, _) => String::new(),
            (_, Some(a)) => a.to_string(),
            (_, None) => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<w$} {:<15} {v6:<w6$}{:<15} {:<20} {}",
            t.name,
            t.ipv4_address,
            t.interface.as_deref().unwrap_or("-"),
            source,
            ports(&t.port_mappings)
        );
    }
    for n in notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

/// What `task ls` says below its table: the merge's decisions and the engine's containers that
/// are not tasks.
fn notes(paths: &InstancePaths, applied: &State) -> anyhow::Result<Vec<String>> {
    let Some(d) = files::read_discovered(paths)? else {
        return Ok(Vec::new());
    };
    let merged = merge::merge(merge::configured(applied.clone()), &d.tasks);
    let mut out: Vec<String> = merged.notes.iter().map(ToString::to_string).collect();
    out.extend(d.not_tasks.iter().map(|n| {
        format!(
            "container {} ({}) is not a task: {}",
            merge::short_id(&n.container_id),
            n.name,
            n.reason
        )
    }));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_is_hostport_containerport_and_protocol() {
        let p = publish("8080:80").unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.protocol),
            (8080, 80, Protocol::Tcp)
        );
        assert_eq!(publish("0:53/udp").unwrap().protocol, Protocol::Udp);
        for bad in [
            "80",
            "80:0",
            "x:80",
            "80:80/sctp",
            "80:80:80",
            "127.0.0.1:80:80",
            "[::1]:80:80",
            ":::80:80",
            "[]:80:80",
            ":80:80",
            "0.0.0.0:80",
            "0.0.0.0:80:80:80",
        ] {
            assert!(publish(bad).is_err(), "{bad}");
        }
        let v4 = publish("0.0.0.0:8080:80").unwrap();
        let v6 = publish("[::]:8081:80/udp").unwrap();
        assert_eq!(
            (v4.host_ip, v4.host_port, v4.container_port),
            (PortFamily::Ipv4, 8080, 80)
        );
        assert_eq!(
            (v6.host_ip, v6.host_port, v6.protocol),
            (PortFamily::Ipv6, 8081, Protocol::Udp)
        );
        assert_eq!(p.host_ip, PortFamily::Both);
        assert_eq!(
            ports(&[p, publish("0:53/udp").unwrap(), v4, v6]),
            "8080->80/tcp 0->53/udp 0.0.0.0:8080->80/tcp [::]:8081->80/udp"
        );
    }

    #[test]
    fn the_table_has_an_ipv6_column_only_when_a_task_has_an_ipv6_address() {
        let mut a = Task::new("a", Ipv4Addr::new(172, 17, 0, 2));
        let b = Task::new("b", Ipv4Addr::new(172, 17, 0, 3));
        let without = table(&[a.clone(), b.clone()], &[]);
        assert!(!without.contains("IPV6"), "{without}");
        assert!(
            without.starts_with("TASK         ADDRESS         INTERFACE"),
            "{without}"
        );
        a.ipv6_address = Some("fd00:ec5:17::2".parse().unwrap());
        let with = table(&[a, b], &[]);
        let lines: Vec<&str> = with.lines().collect();
        assert!(
            lines[0].starts_with("TASK         ADDRESS         IPV6           INTERFACE"),
            "{with}"
        );
        assert!(
            lines[1].starts_with("a            172.17.0.2      fd00:ec5:17::2 -"),
            "{with}"
        );
        assert!(
            lines[2].starts_with("b            172.17.0.3      -              -"),
            "{with}"
        );
    }
}
