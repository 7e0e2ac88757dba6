//! A closed window's records, built from the flows and losses read from the kernel and the
//! directory of task interfaces: one OK record per flow, SKIPDATA where the flow table was full,
//! NODATA for a task interface without either. Pure, so the exact numbers are unit-tested.
//! IPv4 flows (`FLOWS`) and IPv6 flows (`FLOWS6`) make records alike, in the same windows.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ecsnet_common::flow::{ACTION_REJECT, FLOW_EGRESS, FlowKey, FlowKey6, FlowStats, FlowStats6};

use crate::{
    clock::unix_secs,
    flowlog::format::{Action, FlowDirection, LogStatus, Record, TrafficType},
    store::directory::Directory,
};

/// An IPv4 address of the flow table (network byte order in a `u32`).
fn addr(be: u32) -> IpAddr {
    Ipv4Addr::from(u32::from_be(be)).into()
}

/// An IPv6 address of the flow table. Always `V6`, even `::ffff:a.b.c.d`: what came in an IPv6
/// header is an IPv6 flow.
fn addr6(bytes: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(bytes).into()
}

/// One flow of either table, its CPUs merged, as a record needs it. Ports in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    ifindex: u32,
    saddr: IpAddr,
    daddr: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    dir: u8,
    action: u8,
    packets: u64,
    bytes: u64,
    first_ns: u64,
    last_ns: u64,
    pkt_saddr: IpAddr,
    pkt_daddr: IpAddr,
    tcp_flags: u8,
}

/// `Flow` from an entry of either table, whose types differ only in their addresses, read by
/// `$addr`.
macro_rules! flow_from {
    ($($key:ty, $stats:ty, $addr:ident;)+) => {$(
        impl From<&($key, $stats)> for Flow {
            fn from((k, s): &($key, $stats)) -> Self {
                Flow {
                    ifindex: k.ifindex,
                    saddr: $addr(k.saddr),
                    daddr: $addr(k.daddr),
                    sport: u16::from_be(k.sport),
                    dport: u16::from_be(k.dport),
                    proto: k.proto,
                    dir: k.dir,
                    action: k.action,
                    packets: s.packets,
                    bytes: s.bytes,
                    first_ns: s.first_ns,
                    last_ns: s.last_ns,
                    pkt_saddr: $addr(s.pkt_saddr),
                    pkt_daddr: $addr(s.pkt_daddr),
                    tcp_flags: s.tcp_flags,
                }
            }
        }
    )+};
}

flow_from! {
    FlowKey, FlowStats, addr;
    FlowKey6, FlowStats6, addr6;
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

/// The records of window `window` (bounds in `CLOCK_MONOTONIC` ns) from the IPv4 and IPv6
/// flows and the losses read from the kernel. Pure, so the exact numbers are unit-tested.
pub fn build_records(
    dir: &Directory,
    window: u32,
    (start_ns, end_ns): (u64, u64),
    flows: &[(FlowKey, FlowStats)],
    flows6: &[(FlowKey6, FlowStats6)],
    lost: &[(u32, u64)],
    offset: i128,
) -> Vec<Record> {
    let mut sorted: Vec<Flow> = flows
        .iter()
        .map(Flow::from)
        .chain(flows6.iter().map(Flow::from))
        .filter(|f| f.packets != 0)
        .collect();
    sorted.sort_by_key(|f| {
        (
            f.ifindex, f.first_ns, f.dir, f.saddr, f.daddr, f.sport, f.dport,
        )
    });
    // Before the flows move into their records: a task interface with flows of either family
    // (or losses) is not NODATA.
    let seen: BTreeSet<u32> = sorted
        .iter()
        .map(|f| f.ifindex)
        .chain(lost.iter().map(|(ifindex, _)| *ifindex))
        .collect();
    let mut out: Vec<Record> = sorted
        .into_iter()
        .map(|f| Record {
            // The datapath stamps with the coarse clock, up to a tick behind the one that
            // opened the window: a packet counted in this window happened in it.
            start: unix_secs(f.first_ns.max(start_ns), offset),
            end: unix_secs(f.last_ns.max(f.first_ns).max(start_ns), offset),
            ..flow_record(dir, base(dir, f.ifindex, window), &f)
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
    for (ifindex, _) in dir.interfaces() {
        if !seen.contains(&ifindex) {
            out.push(whole_window(ifindex, LogStatus::Nodata));
        }
    }
    out
}

/// Whether `a` is the address of a task on this host: its IPv4 address, or the IPv6 address the
/// state gives it (`ipv6Address`).
fn is_task_address(dir: &Directory, a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => dir.state.tasks.iter().any(|t| t.ipv4_address == a),
        IpAddr::V6(a) => dir.state.tasks.iter().any(|t| t.ipv6_address == Some(a)),
    }
}

/// `base` with the fields of one flow (all but its times).
fn flow_record(dir: &Directory, base: Record, f: &Flow) -> Record {
    let egress = f.dir == FLOW_EGRESS;
    Record {
        srcaddr: Some(f.saddr),
        dstaddr: Some(f.daddr),
        srcport: Some(f.sport),
        dstport: Some(f.dport),
        protocol: Some(f.proto),
        packets: Some(f.packets),
        bytes: Some(f.bytes),
        action: Some(if f.action == ACTION_REJECT {
            Action::Reject
        } else {
            Action::Accept
        }),
        log_status: LogStatus::Ok,
        tcp_flags: Some(f.tcp_flags),
        traffic_type: Some(if f.saddr.is_ipv6() {
            TrafficType::Ipv6
        } else {
            TrafficType::Ipv4
        }),
        pkt_srcaddr: Some(f.pkt_saddr),
        pkt_dstaddr: Some(f.pkt_daddr),
        flow_direction: Some(if egress {
            FlowDirection::Egress
        } else {
            FlowDirection::Ingress
        }),
        // AWS fills traffic-path for egress only; 1 is "another resource in the same VPC",
        // which another task on this host is. Where the uplink's traffic goes is not ours to
        // know.
        traffic_path: (egress && is_task_address(dir, f.daddr)).then_some(1),
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        flowlog::format::Format,
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

    /// An IPv6 address as the flow table holds it.
    fn v6(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .octets()
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

    /// Task t1 (ifindex 7) to task t2 over TCP, in window `epoch`.
    fn t1_to_t2(epoch: u32) -> FlowKey {
        FlowKey {
            epoch,
            ifindex: 7,
            saddr: be([172, 17, 0, 2]),
            daddr: be([172, 17, 0, 3]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            dir: FLOW_EGRESS,
            action: ACTION_ACCEPT,
            _pad: 0,
        }
    }

    /// Five packets of `key`, 2 s to 3.5 s, untranslated.
    fn five_packets(key: &FlowKey) -> FlowStats {
        FlowStats {
            packets: 5,
            bytes: 400,
            first_ns: 2_000_000_000,
            last_ns: 3_500_000_000,
            pkt_saddr: key.saddr,
            pkt_daddr: key.daddr,
            tcp_flags: 19,
            _pad: [0; 7],
        }
    }

    #[test]
    fn records_carry_counts_times_and_the_task_and_nodata_fills_idle_interfaces() {
        let dir = directory();
        let key = t1_to_t2(4);
        let stats = five_packets(&key);
        let offset = 1_700_000_000i128 * 1_000_000_000;
        let window_4 = |stats| {
            build_records(
                &dir,
                4,
                (1_000_000_000, 4_000_000_000),
                &[(key, stats)],
                &[],
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
        let recs = build_records(&dir, 1, (0, 1), &[(key, stats)], &[], &[(7, 12)], 0);
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

    /// One task's window with an IPv4 and an IPv6 flow, and another task's with IPv6 only.
    fn dual_stack_window() -> Vec<Record> {
        let dir = directory();
        let to_t2 = t1_to_t2(5);
        let v4 = FlowStats {
            first_ns: 3_000_000_000,
            tcp_flags: 3,
            ..five_packets(&to_t2)
        };
        // Masqueraded (NAT66) to the uplink's address.
        let out6 = FlowKey6 {
            epoch: 5,
            ifindex: 7,
            saddr: v6("fd00:dc::2"),
            daddr: v6("2001:db8:ff::1"),
            sport: 41000u16.to_be(),
            dport: 443u16.to_be(),
            proto: 6,
            dir: FLOW_EGRESS,
            action: ACTION_ACCEPT,
            _pad: 0,
        };
        let s6 = FlowStats6 {
            packets: 7,
            bytes: 1_234,
            first_ns: 2_000_000_000,
            last_ns: 2_900_000_000,
            pkt_saddr: v6("2001:db8:a::1"),
            pkt_daddr: v6("2001:db8:ff::1"),
            tcp_flags: 19,
            _pad: [0; 7],
        };
        // Rejected ICMPv6 echo into the other task: ports 0.
        let in6 = FlowKey6 {
            ifindex: 9,
            saddr: v6("2001:db8:c::10"),
            daddr: v6("fd00:dc::3"),
            sport: 0,
            dport: 0,
            proto: 58,
            dir: FLOW_INGRESS,
            action: ACTION_REJECT,
            ..out6
        };
        let r6 = FlowStats6 {
            packets: 2,
            bytes: 208,
            first_ns: 2_500_000_000,
            last_ns: 2_600_000_000,
            pkt_saddr: in6.saddr,
            pkt_daddr: in6.daddr,
            tcp_flags: 0,
            _pad: [0; 7],
        };
        let empty = FlowStats6::default();
        build_records(
            &dir,
            5,
            (1_000_000_000, 4_000_000_000),
            &[(to_t2, v4)],
            &[
                (out6, s6),
                (in6, r6),
                (FlowKey6 { ifindex: 9, ..out6 }, empty),
            ],
            &[],
            1_700_000_000i128 * 1_000_000_000,
        )
    }

    #[test]
    fn ipv4_and_ipv6_flows_of_a_window_merge_and_ipv6_alone_is_not_nodata() {
        let recs = dual_stack_window();
        let v2 = Format::default_v2();
        let lines: Vec<String> = recs.iter().map(|r| v2.render(r)).collect();
        assert_eq!(
            lines,
            [
                "2 123456789012 vethA fd00:dc::2 2001:db8:ff::1 41000 443 6 7 1234 1700000002 \
                 1700000002 ACCEPT OK",
                "2 123456789012 vethA 172.17.0.2 172.17.0.3 40000 80 6 5 400 1700000003 \
                 1700000003 ACCEPT OK",
                "2 123456789012 vethB 2001:db8:c::10 fd00:dc::3 0 0 58 2 208 1700000002 \
                 1700000002 REJECT OK",
            ],
            "per interface by first packet; an empty IPv6 entry makes no record, and vethB, \
             with IPv6 only, no NODATA"
        );
        let f = Format::parse(
            "${interface-id} ${type} ${pkt-srcaddr} ${pkt-dstaddr} ${flow-direction} \
             ${traffic-path} ${tcp-flags} ${ecs-task-id}",
        )
        .unwrap();
        let custom: Vec<String> = recs.iter().map(|r| f.render(r)).collect();
        assert_eq!(
            custom,
            [
                "vethA IPv6 2001:db8:a::1 2001:db8:ff::1 egress - 19 t1",
                "vethA IPv4 172.17.0.2 172.17.0.3 egress 1 3 t1",
                "vethB IPv6 2001:db8:c::10 fd00:dc::3 ingress - 0 t2",
            ]
        );
        assert!(recs.iter().all(|r| r.window == 5));
    }

    #[test]
    fn ipv6_egress_to_another_task_has_traffic_path_1() {
        let mut dir = directory();
        dir.state.tasks[1].ipv6_address = Some("fd00:dc::3".parse().unwrap());
        let to = |daddr: &str, dir| FlowKey6 {
            ifindex: 7,
            saddr: v6("fd00:dc::2"),
            daddr: v6(daddr),
            proto: 17,
            dir,
            ..FlowKey6::default()
        };
        let one = FlowStats6 {
            packets: 1,
            bytes: 60,
            ..FlowStats6::default()
        };
        let flows = [
            (to("fd00:dc::3", FLOW_EGRESS), one),
            (to("2001:db8:ff::1", FLOW_EGRESS), one),
            (to("fd00:dc::3", FLOW_INGRESS), one),
        ];
        let recs = build_records(&dir, 1, (0, 1), &[], &flows, &[], 0);
        let paths: Vec<(Option<IpAddr>, Option<FlowDirection>, Option<u8>)> = recs
            .iter()
            .filter(|r| r.log_status == LogStatus::Ok)
            .map(|r| (r.dstaddr, r.flow_direction, r.traffic_path))
            .collect();
        let a = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(
            paths,
            [
                (a("2001:db8:ff::1"), Some(FlowDirection::Egress), None),
                (a("fd00:dc::3"), Some(FlowDirection::Egress), Some(1)),
                (a("fd00:dc::3"), Some(FlowDirection::Ingress), None),
            ],
            "a task's IPv6 address is another resource of the VPC; elsewhere and ingress: none"
        );
    }

    #[test]
    fn ipv4_records_never_print_as_mapped_ipv6() {
        let recs = dual_stack_window();
        let f = Format::parse("${srcaddr} ${dstaddr} ${pkt-srcaddr} ${pkt-dstaddr}").unwrap();
        let v4 = &recs[1];
        assert_eq!(v4.traffic_type, Some(TrafficType::Ipv4));
        assert_eq!(f.render(v4), "172.17.0.2 172.17.0.3 172.17.0.2 172.17.0.3");
        for r in &recs {
            let json = serde_json::to_string(r).unwrap();
            assert!(!json.contains("::ffff:"), "{json}");
            assert!(!f.render(r).contains("::ffff:"));
        }
        // What arrives in an IPv6 header stays IPv6, even a mapped address (never made up
        // into an IPv4 flow it was not).
        let k = FlowKey6 {
            ifindex: 7,
            saddr: v6("::ffff:10.0.0.1"),
            daddr: v6("fd00:dc::2"),
            proto: 17,
            dir: FLOW_INGRESS,
            ..FlowKey6::default()
        };
        let st = FlowStats6 {
            packets: 1,
            bytes: 60,
            ..FlowStats6::default()
        };
        let recs = build_records(&directory(), 1, (0, 1), &[], &[(k, st)], &[], 0);
        assert_eq!(recs[0].traffic_type, Some(TrafficType::Ipv6));
        assert!(recs[0].srcaddr.is_some_and(|a| a.is_ipv6()));
        assert_eq!(
            recs.iter().map(|r| r.log_status).collect::<Vec<_>>(),
            [LogStatus::Ok, LogStatus::Nodata]
        );
    }
}
