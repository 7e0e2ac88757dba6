//! A closed window's records, built from the flows and losses read from the kernel and the
//! directory of task interfaces: one OK record per flow, SKIPDATA where the flow table was full,
//! NODATA for a task interface without either. Pure, so the exact numbers are unit-tested.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ecsnet_common::flow::{ACTION_REJECT, FLOW_EGRESS, FlowKey, FlowStats};

use crate::{
    clock::unix_secs,
    flowlog::format::{Action, FlowDirection, LogStatus, Record, TrafficType},
    store::directory::Directory,
};

fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

/// A record with every field that depends on the interface, not on the flow.
fn base(dir: &Directory, ifindex: u32, window: u32) -> Record {
    let h = &dir.state.host;
    let task = dir.task(ifindex);
    let arn = task.and_then(|t| t.task_arn.as_deref()).map(TaskArn::parse);
    let region = h
        .region
        .clone()
        .or_else(|| arn.as_ref().and_then(|a| a.region.clone()));
    let account = h
        .account_id
        .clone()
        .or_else(|| arn.as_ref().and_then(|a| a.account.clone()));
    let cluster = h
        .cluster
        .clone()
        .or_else(|| arn.as_ref().and_then(|a| a.cluster.clone()));
    let cluster_arn = match (&region, &account, &cluster) {
        (Some(r), Some(a), Some(c)) => Some(format!("arn:aws:ecs:{r}:{a}:cluster/{c}")),
        _ => None,
    };
    Record {
        account_id: account,
        interface_id: task
            .and_then(|t| t.interface_id.clone().or_else(|| t.interface.clone()))
            .or_else(|| Some(format!("if{ifindex}"))),
        vpc_id: h.vpc_id.clone(),
        subnet_id: h.subnet_id.clone(),
        instance_id: h.instance_id.clone(),
        region,
        az_id: h.az_id.clone(),
        ecs_cluster_arn: cluster_arn,
        ecs_cluster_name: cluster,
        ecs_container_instance_arn: h.container_instance_arn.clone(),
        ecs_container_instance_id: h
            .container_instance_arn
            .as_deref()
            .and_then(|a| a.rsplit('/').next())
            .map(str::to_owned),
        ecs_container_id: task.and_then(|t| t.container_id.clone()),
        ecs_service_name: task.and_then(|t| t.service_name.clone()),
        ecs_task_definition_arn: task.and_then(|t| t.task_definition_arn.clone()),
        ecs_task_arn: task.and_then(|t| t.task_arn.clone()),
        ecs_task_id: arn.and_then(|a| a.task_id),
        task: task.map(|t| t.name.clone()),
        window,
        ..Default::default()
    }
}

/// The parts of `arn:aws:ecs:REGION:ACCOUNT:task/CLUSTER/TASK_ID` (or the old form without
/// the cluster) that records carry.
#[derive(Debug, Default, PartialEq, Eq)]
struct TaskArn {
    region: Option<String>,
    account: Option<String>,
    cluster: Option<String>,
    task_id: Option<String>,
}

impl TaskArn {
    fn parse(arn: &str) -> Self {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let field = |i: usize| {
            parts
                .get(i)
                .filter(|s| !s.is_empty())
                .map(ToString::to_string)
        };
        let mut out = TaskArn {
            region: field(3),
            account: field(4),
            ..Default::default()
        };
        if let Some(res) = parts.get(5) {
            let segs: Vec<&str> = res.split('/').collect();
            match segs.as_slice() {
                ["task", cluster, id] => {
                    out.cluster = Some(cluster.to_string());
                    out.task_id = Some(id.to_string());
                }
                ["task", id] => out.task_id = Some(id.to_string()),
                _ => {}
            }
        }
        out
    }
}

/// The records of window `window` (bounds in `CLOCK_MONOTONIC` ns) from the flows and losses
/// read from the kernel. Pure, so the exact numbers are unit-tested.
pub fn build_records(
    dir: &Directory,
    window: u32,
    (start_ns, end_ns): (u64, u64),
    flows: &[(FlowKey, FlowStats)],
    lost: &[(u32, u64)],
    offset: i128,
) -> Vec<Record> {
    let mut sorted: Vec<&(FlowKey, FlowStats)> =
        flows.iter().filter(|(_, s)| s.packets != 0).collect();
    sorted.sort_by_key(|(k, s)| {
        (
            k.ifindex, s.first_ns, k.dir, k.saddr, k.daddr, k.sport, k.dport,
        )
    });
    let mut out: Vec<Record> = sorted
        .into_iter()
        .map(|(k, s)| Record {
            // The datapath stamps with the coarse clock, up to a tick behind the one that
            // opened the window: a packet counted in this window happened in it.
            start: unix_secs(s.first_ns.max(start_ns), offset),
            end: unix_secs(s.last_ns.max(s.first_ns).max(start_ns), offset),
            ..flow_record(dir, base(dir, k.ifindex, window), k, s)
        })
        .collect();
    let whole_window = |ifindex, log_status| Record {
        start: unix_secs(start_ns, offset),
        end: unix_secs(end_ns, offset),
        log_status,
        ..base(dir, ifindex, window)
    };
    for (ifindex, packets) in lost {
        out.push(Record {
            lost_packets: Some(*packets),
            ..whole_window(*ifindex, LogStatus::Skipdata)
        });
    }
    let seen: BTreeSet<u32> = flows
        .iter()
        .filter(|(_, s)| s.packets != 0)
        .map(|(k, _)| k.ifindex)
        .chain(lost.iter().map(|(ifindex, _)| *ifindex))
        .collect();
    for (ifindex, _) in dir.interfaces() {
        if !seen.contains(&ifindex) {
            out.push(whole_window(ifindex, LogStatus::Nodata));
        }
    }
    out
}

/// `base` with the fields of one flow (all but its times).
fn flow_record(dir: &Directory, base: Record, k: &FlowKey, s: &FlowStats) -> Record {
    let egress = k.dir == FLOW_EGRESS;
    let daddr = addr(k.daddr);
    Record {
        srcaddr: Some(addr(k.saddr)),
        dstaddr: Some(daddr),
        srcport: Some(u16::from_be(k.sport)),
        dstport: Some(u16::from_be(k.dport)),
        protocol: Some(k.proto),
        packets: Some(s.packets),
        bytes: Some(s.bytes),
        action: Some(if k.action == ACTION_REJECT {
            Action::Reject
        } else {
            Action::Accept
        }),
        log_status: LogStatus::Ok,
        tcp_flags: Some(s.tcp_flags),
        traffic_type: Some(TrafficType::Ipv4),
        pkt_srcaddr: Some(addr(s.pkt_saddr)),
        pkt_dstaddr: Some(addr(s.pkt_daddr)),
        flow_direction: Some(if egress {
            FlowDirection::Egress
        } else {
            FlowDirection::Ingress
        }),
        // AWS fills traffic-path for egress only; 1 is "another resource in the same VPC",
        // which another task on this host is. Where the uplink's traffic goes is not ours to
        // know.
        traffic_path: (egress && dir.state.tasks.iter().any(|t| t.ipv4_address == daddr))
            .then_some(1),
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        state::{Host, State, Task},
        store::directory::fixtures,
    };
    use ecsnet_common::{
        flow::{ACTION_ACCEPT, FLOW_INGRESS},
        maps::ROLE_TASK,
    };

    fn be(a: [u8; 4]) -> u32 {
        u32::from_be_bytes(a).to_be()
    }

    #[test]
    fn per_cpu_counters_merge_into_one_flow() {
        let a = FlowStats {
            packets: 3,
            bytes: 300,
            first_ns: 50,
            last_ns: 70,
            pkt_saddr: 1,
            pkt_daddr: 2,
            tcp_flags: 2,
            _pad: [0; 7],
        };
        let b = FlowStats {
            packets: 2,
            bytes: 120,
            first_ns: 40,
            last_ns: 90,
            pkt_saddr: 3,
            pkt_daddr: 4,
            tcp_flags: 1,
            _pad: [0; 7],
        };
        let m = FlowStats::merge(&[a, FlowStats::default(), b]);
        assert_eq!((m.packets, m.bytes), (5, 420));
        assert_eq!(
            (m.first_ns, m.last_ns),
            (40, 90),
            "an idle CPU's zeros are not the start"
        );
        assert_eq!(
            (m.pkt_saddr, m.pkt_daddr),
            (3, 4),
            "the latest packet's addresses"
        );
        assert_eq!(m.tcp_flags, 3);
    }

    #[test]
    fn task_arns_give_region_account_cluster_and_id() {
        let a = TaskArn::parse("arn:aws:ecs:us-east-1:123456789012:task/demo/0a1b2c");
        assert_eq!(a.region.as_deref(), Some("us-east-1"));
        assert_eq!(a.account.as_deref(), Some("123456789012"));
        assert_eq!(a.cluster.as_deref(), Some("demo"));
        assert_eq!(a.task_id.as_deref(), Some("0a1b2c"));
        let old = TaskArn::parse("arn:aws:ecs:eu-west-1:1:task/abc");
        assert_eq!((old.cluster, old.task_id.as_deref()), (None, Some("abc")));
        assert_eq!(TaskArn::parse("nonsense"), TaskArn::default());
    }

    fn directory() -> Directory {
        let task = |name: &str, ip: [u8; 4], iface: &str| Task {
            task_arn: Some(format!(
                "arn:aws:ecs:us-east-1:123456789012:task/demo/{name}"
            )),
            service_name: Some("web".to_owned()),
            ..fixtures::task(name, ip, Some(iface))
        };
        let state = State {
            host: Host {
                instance_id: Some("i-0abc".to_owned()),
                ..Default::default()
            },
            tasks: vec![
                task("t1", [172, 17, 0, 2], "vethA"),
                task("t2", [172, 17, 0, 3], "vethB"),
            ],
            ..State::default()
        };
        let iface = |ip| fixtures::iface(ip, ROLE_TASK);
        Directory::join(
            state,
            &[(7, iface([172, 17, 0, 2])), (9, iface([172, 17, 0, 3]))],
        )
    }

    #[test]
    fn records_carry_counts_times_and_the_task_and_nodata_fills_idle_interfaces() {
        let dir = directory();
        let key = FlowKey {
            epoch: 4,
            ifindex: 7,
            saddr: be([172, 17, 0, 2]),
            daddr: be([172, 17, 0, 3]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            dir: FLOW_EGRESS,
            action: ACTION_ACCEPT,
            _pad: 0,
        };
        let stats = FlowStats {
            packets: 5,
            bytes: 400,
            first_ns: 2_000_000_000,
            last_ns: 3_500_000_000,
            pkt_saddr: key.saddr,
            pkt_daddr: key.daddr,
            tcp_flags: 19,
            _pad: [0; 7],
        };
        let offset = 1_700_000_000i128 * 1_000_000_000;
        let window_4 = |stats| {
            build_records(
                &dir,
                4,
                (1_000_000_000, 4_000_000_000),
                &[(key, stats)],
                &[],
                offset,
            )
        };
        let recs = window_4(stats);
        assert_eq!(recs.len(), 2);
        let r = &recs[0];
        assert_eq!(
            r.interface_id.as_deref(),
            Some("vethA"),
            "interfaceId defaults to the name"
        );
        assert_eq!(
            (r.srcport, r.dstport, r.protocol),
            (Some(40000), Some(80), Some(6))
        );
        assert_eq!(
            (r.packets, r.bytes, r.tcp_flags),
            (Some(5), Some(400), Some(19))
        );
        assert_eq!((r.start, r.end), (1_700_000_002, 1_700_000_003));
        assert_eq!(r.action, Some(Action::Accept));
        assert_eq!(r.flow_direction, Some(FlowDirection::Egress));
        assert_eq!(r.traffic_path, Some(1), "to another task on the host");
        assert_eq!(r.ecs_task_id.as_deref(), Some("t1"));
        assert_eq!(
            r.account_id.as_deref(),
            Some("123456789012"),
            "from the task ARN"
        );
        assert_eq!(
            r.ecs_cluster_arn.as_deref(),
            Some("arn:aws:ecs:us-east-1:123456789012:cluster/demo")
        );
        assert_eq!(r.instance_id.as_deref(), Some("i-0abc"));
        // Stamped a tick before the window opened (the datapath's clock is coarse): the record
        // still starts in its window.
        let early = FlowStats {
            first_ns: 999_000_000,
            last_ns: 999_500_000,
            ..stats
        };
        let recs_early = window_4(early);
        assert_eq!(
            (recs_early[0].start, recs_early[0].end),
            (1_700_000_001, 1_700_000_001)
        );
        let idle = &recs[1];
        assert_eq!(idle.log_status, LogStatus::Nodata);
        assert_eq!(idle.interface_id.as_deref(), Some("vethB"));
        assert_eq!((idle.start, idle.end), (1_700_000_001, 1_700_000_004));
        assert_eq!(
            (idle.packets, idle.srcaddr, idle.action),
            (None, None, None)
        );
    }

    #[test]
    fn lost_packets_make_a_skipdata_record_and_no_nodata() {
        let dir = directory();
        let key = FlowKey {
            epoch: 1,
            ifindex: 9,
            proto: 17,
            dir: FLOW_INGRESS,
            ..Default::default()
        };
        let stats = FlowStats {
            packets: 1,
            bytes: 28,
            ..Default::default()
        };
        let recs = build_records(&dir, 1, (0, 1), &[(key, stats)], &[(7, 12)], 0);
        let statuses: Vec<(LogStatus, Option<u64>)> = recs
            .iter()
            .map(|r| (r.log_status, r.lost_packets))
            .collect();
        assert_eq!(
            statuses,
            vec![(LogStatus::Ok, None), (LogStatus::Skipdata, Some(12))]
        );
        assert_eq!(recs[0].traffic_path, None, "ingress has no traffic path");
    }
}
