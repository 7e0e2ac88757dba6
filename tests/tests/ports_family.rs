//! Published ports by address family, with a real dockerd (`--docker --ipv6`): containers
//! published with `-p 0.0.0.0:8080:80` (IPv4 only), `-p [::]:8081:80` (IPv6 only) and
//! `-p 8082:80` (Docker's default, both) are tasks whose ports are in `PORTS` (IPv4) and
//! `PORTS6` (IPv6) exactly as Docker bound them, and `task ls` prints each as `docker ps`
//! does.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ecsnet::{kernel::maps, store::paths::InstancePaths};
use ecsnet_tests::{
    Lab, churn,
    docker::{self, docker_ok},
    world::{down_leaves_nothing, instance_ok},
};
use serde_json::{Value, json};

const TCP: u8 = 6;

/// `PORTS` as it is now: host port -> (task address, container port), TCP only.
fn ports(paths: &InstancePaths) -> BTreeMap<u16, (Ipv4Addr, u16)> {
    let all = maps::read_ports(paths).expect("read PORTS");
    all.into_iter()
        .filter(|(k, _)| k.proto == TCP)
        .map(|(k, v)| {
            let addr = Ipv4Addr::from(v.addr.to_ne_bytes());
            (u16::from_be(k.port), (addr, u16::from_be(v.port)))
        })
        .collect()
}

/// `PORTS6` as it is now: host port -> (task address, container port), TCP only.
fn ports6(paths: &InstancePaths) -> BTreeMap<u16, (Ipv6Addr, u16)> {
    let all = maps::read_ports6(paths).expect("read PORTS6");
    all.into_iter()
        .filter(|(k, _)| k.proto == TCP)
        .map(|(k, v)| {
            let addr = Ipv6Addr::from(v.addr);
            (u16::from_be(k.port), (addr, u16::from_be(v.port)))
        })
        .collect()
}

/// A container of the lab publishing container port 80 on host port `host`, on the host
/// address `on` (None: Docker's default); its id and addresses once it is a task.
fn run(lab: &Lab, name: &str, host: u16, on: Option<IpAddr>) -> (String, Ipv4Addr, Ipv6Addr) {
    let mut spec = churn::spec(&lab.name, name, &[churn::fixed(host, 80)], &[]);
    spec.publish_on = on;
    let id = docker::run(lab, &spec);
    churn::wait_task(lab, &id);
    let format = "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.GlobalIPv6Address}}";
    let out = docker_ok(lab, &["inspect", "-f", format, &id]);
    let mut addrs = out.split_whitespace();
    let mut next = |what| {
        addrs
            .next()
            .unwrap_or_else(|| panic!("{name} has no {what} address: {out:?}"))
    };
    let v4 = next("IPv4").parse().expect("an IPv4 address");
    let v6 = next("IPv6").parse().expect("an IPv6 address");
    (id, v4, v6)
}

#[test]
fn each_family_publishes_what_docker_bound_on_it() {
    let lab = docker::up("pf6", 1, &["1:8090:80"], &["--ipv6"]);
    let (file, url) = (
        churn::state_file(&lab, "allow", &[]),
        churn::engine_url(&lab),
    );
    churn::up(&lab, &file, &url, &[]);
    let v4only = run(&lab, "v4only", 8080, Some(Ipv4Addr::UNSPECIFIED.into()));
    let v6only = run(&lab, "v6only", 8081, Some(Ipv6Addr::UNSPECIFIED.into()));
    let both = run(&lab, "both", 8082, None);
    let task1 = &lab.status.tasks[0];
    let task1_6 = task1.address6.expect("task1's IPv6 address");

    let paths = InstancePaths::new(&lab.name);
    assert_eq!(
        ports(&paths),
        BTreeMap::from([
            (8080, (v4only.1, 80)),
            (8082, (both.1, 80)),
            (8090, (task1.address, 80)),
        ]),
        "PORTS: the ports published on IPv4"
    );
    assert_eq!(
        ports6(&paths),
        BTreeMap::from([
            (8081, (v6only.2, 80)),
            (8082, (both.2, 80)),
            (8090, (task1_6, 80)),
        ]),
        "PORTS6: the ports published on IPv6"
    );

    // `task ls` says where each is published: the state file's `hostIp`, `docker ps`'s text.
    let ls: Value = serde_json::from_str(&instance_ok(&lab, &["task", "ls", "--json"])).unwrap();
    let mappings = |id: &str| {
        let listed = ls.as_array().expect("a list of tasks");
        let task = listed.iter().find(|t| t["containerId"] == id);
        task.unwrap_or_else(|| panic!("no task of {id}: {ls}"))["portMappings"].clone()
    };
    let mapping = |host: u16, ip: Option<&str>| {
        let mut m = json!({"containerPort": 80, "hostPort": host, "protocol": "tcp"});
        if let Some(ip) = ip {
            m["hostIp"] = ip.into();
        }
        json!([m])
    };
    assert_eq!(mappings(&v4only.0), mapping(8080, Some("0.0.0.0")));
    assert_eq!(mappings(&v6only.0), mapping(8081, Some("::")));
    assert_eq!(mappings(&both.0), mapping(8082, None));
    let table = instance_ok(&lab, &["task", "ls"]);
    for (id, ports) in [
        (&v4only.0, "0.0.0.0:8080->80/tcp"),
        (&v6only.0, "[::]:8081->80/tcp"),
        (&both.0, "8082->80/tcp"),
    ] {
        let short = &id[..12];
        let line = table.lines().find(|l| l.contains(short));
        let line = line.unwrap_or_else(|| panic!("no line of {short}: {table}"));
        assert!(line.ends_with(&format!(" {ports}")), "{short}: {line}");
    }
    down_leaves_nothing(lab);
}
