//! Flow logs and monitor events across the kernel boundary: what the datapath counts per flow
//! and capture window, what it loses when the table is full, and the rate-limited events it
//! sends to `ecsnet monitor`. With [`FlowState::enabled`] 0 the datapath counts no flows.

use crate::net::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// Per-flow counters of the open and the closing windows: [`FlowKey`] -> [`FlowStats`] per CPU.
pub const MAP_FLOWS: &str = "FLOWS";
/// The IPv6 twin of [`MAP_FLOWS`]: [`FlowKey6`] -> [`FlowStats6`] per CPU, same windows.
pub const MAP_FLOWS6: &str = "FLOWS6";
/// Packets that found the flow table full: [`LostKey`] -> [`crate::maps::Counters`] per CPU.
pub const MAP_FLOW_LOST: &str = "FLOW_LOST";
/// The capture window and the event rate limit: one [`FlowState`] at index 0.
pub const MAP_FLOW_STATE: &str = "FLOW_STATE";
/// Drop and policy-verdict events ([`Event`]), a ring buffer the agent reads.
pub const MAP_EVENTS: &str = "EVENTS";
/// The per-CPU token bucket of the events: one [`EventBudget`] per CPU at index 0.
pub const MAP_EVENT_BUDGET: &str = "EVENT_BUDGET";

/// Default capacity of [`MAP_FLOWS`], entries (flows of the open window plus the one being
/// exported); `ecsnet up --flow-table-size` changes it.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;
/// Capacity of [`MAP_FLOW_LOST`]: two windows of every interface, with room to spare.
pub const MAX_FLOW_LOST_KEYS: u32 = crate::maps::MAX_TASKS * 4;
/// Size of [`MAP_EVENTS`], bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// [`FlowKey::dir`]: sent by the task (AWS `flow-direction` egress).
pub const FLOW_EGRESS: u8 = 0;
/// [`FlowKey::dir`]: delivered to the task (AWS `flow-direction` ingress).
pub const FLOW_INGRESS: u8 = 1;
/// [`FlowKey::action`]: the packet went on (AWS ACCEPT).
pub const ACTION_ACCEPT: u8 = 0;
/// [`FlowKey::action`]: a security group or the metadata block rejected it (AWS REJECT).
pub const ACTION_REJECT: u8 = 1;

/// One flow on one task interface in one window, as seen on that interface: after DNAT for
/// what the task receives, before SNAT for what it sends. Addresses and ports in network byte
/// order; ports are 0 for protocols without them (ICMP too, as AWS prints it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The capture window ([`FlowState::epoch`]) the packets fell in.
    pub epoch: u32,
    /// The task interface.
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `FLOW_EGRESS` or `FLOW_INGRESS`.
    pub dir: u8,
    /// `ACTION_*`.
    pub action: u8,
    pub _pad: u8,
}
map_type!(FlowKey, 24);

/// Counters of one [`FlowKey`] on one CPU; user space adds the CPUs up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Packets as on the wire (a GSO packet counts as its segments).
    pub packets: u64,
    /// IP bytes as on the wire, headers included, as AWS counts them.
    pub bytes: u64,
    /// When the first and the last packet on this CPU passed, ns: the datapath's coarse clock
    /// (`bpf_ktime_get_coarse_ns()`, `CLOCK_MONOTONIC` at tick resolution), read once per run.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Source and destination as on the uplink side of ecsnet's translation (AWS
    /// `pkt-srcaddr`, `pkt-dstaddr`), network byte order.
    pub pkt_saddr: u32,
    pub pkt_daddr: u32,
    /// OR of AWS's TCP flags: FIN 1, SYN 2, RST 4, and ACK 16 only together with SYN.
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
}
map_type!(FlowStats, 48);

/// The IPv6 twin of [`FlowKey`]: the same fields and meaning, with 16-byte addresses in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub epoch: u32,
    pub ifindex: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub action: u8,
    pub _pad: u8,
}
map_type!(FlowKey6, 48);

/// The IPv6 twin of [`FlowStats`]: the same counters, with 16-byte uplink-side addresses in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats6 {
    pub packets: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub pkt_saddr: [u8; 16],
    pub pkt_daddr: [u8; 16],
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
}
map_type!(FlowStats6, 72);

/// `merge` for the counters of both families, which differ only in their addresses' type.
macro_rules! merge_per_cpu {
    ($($stats:ty),+) => {$(
        impl $stats {
            /// One flow's counters over all CPUs: the sums, the earliest first and the latest
            /// last packet, the OR of the flags, and the uplink-side addresses of the latest
            /// packet. CPUs that saw no packet are left out.
            pub fn merge(per_cpu: &[Self]) -> Self {
                let mut out = Self::default();
                for v in per_cpu.iter().filter(|v| v.packets != 0) {
                    if out.packets == 0 || v.first_ns < out.first_ns {
                        out.first_ns = v.first_ns;
                    }
                    if v.last_ns >= out.last_ns {
                        out.last_ns = v.last_ns;
                        out.pkt_saddr = v.pkt_saddr;
                        out.pkt_daddr = v.pkt_daddr;
                    }
                    out.packets += v.packets;
                    out.bytes += v.bytes;
                    out.tcp_flags |= v.tcp_flags;
                }
                out
            }
        }
    )+};
}

merge_per_cpu!(FlowStats, FlowStats6);

/// Key of [`MAP_FLOW_LOST`]: a task interface in a window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LostKey {
    pub epoch: u32,
    pub ifindex: u32,
}
map_type!(LostKey, 8);

/// The open capture window, written by `ecsnet up` and by the agent when it closes a window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Number of the open window; the datapath counts every packet under it.
    pub epoch: u32,
    /// 1: count flows; 0: flow logs off.
    pub enabled: u8,
    pub _pad: [u8; 3],
    /// `CLOCK_MONOTONIC` when the open window began, ns.
    pub window_start_ns: u64,
    /// Cost of one event in the token bucket, ns (1e9 / events per second per CPU); 0: no
    /// events at all.
    pub event_cost_ns: u64,
    /// Most credit a CPU can save up, ns (the burst is `event_burst_ns / event_cost_ns`).
    pub event_burst_ns: u64,
}
map_type!(FlowState, 32);

/// One CPU's token bucket for events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Saved credit, ns.
    pub credit_ns: u64,
    /// When credit was last added, `CLOCK_MONOTONIC` ns.
    pub last_ns: u64,
    /// Events this CPU suppressed since it last sent one.
    pub suppressed: u64,
    /// Events this CPU suppressed in all, for metrics.
    pub suppressed_total: u64,
}
map_type!(EventBudget, 32);

/// [`Event::kind`]: a dropped packet; `reason` says why.
pub const EVENT_DROP: u8 = 1;
/// [`Event::kind`]: a security group allowed a new flow (`reason` 0).
pub const EVENT_ALLOW: u8 = 2;

/// One monitor event. Addresses and ports as in the packet (network byte order); zero when the
/// packet was too malformed to read them. An agent that knows only the first 48 bytes (before
/// IPv6) reads an IPv6 event as one without addresses; this one skips shorter records.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_MONOTONIC`, ns.
    pub ts_ns: u64,
    /// Events this CPU suppressed between the previous event and this one.
    pub suppressed: u64,
    /// The interface the event concerns (the task for policy events).
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `EVENT_*`.
    pub kind: u8,
    /// A [`crate::DropReason`] number for drops, 0 otherwise.
    pub reason: u8,
    /// `HOOK_*` of the program that decided.
    pub hook: u8,
    /// For policy events: `FLOW_EGRESS` (the task's outbound rules) or `FLOW_INGRESS`.
    pub dir: u8,
    /// `EVENT_IPV6`: the addresses are `saddr6` and `daddr6`; else `saddr` and `daddr`.
    pub family: u8,
    pub _pad: [u8; 6],
    pub saddr6: [u8; 16],
    pub daddr6: [u8; 16],
}
map_type!(Event, 80);

/// [`Event::family`] of an event about an IPv6 packet.
pub const EVENT_IPV6: u8 = 6;

/// AWS's `tcp-flags` bits of one TCP flags byte: FIN, SYN and RST as they are, ACK only with
/// SYN (a SYN-ACK is 18), everything else dropped.
#[inline(always)]
pub const fn aws_tcp_flags(flags: u8) -> u8 {
    let base = flags & (TCP_FIN | TCP_SYN | TCP_RST);
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        base | TCP_ACK
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::{FlowStats, FlowStats6, aws_tcp_flags};

    #[test]
    fn per_cpu_counters_merge_into_one_flow() {
        let cpu = |packets, first_ns, last_ns, pkt_saddr, tcp_flags| FlowStats {
            packets,
            bytes: packets * 100,
            first_ns,
            last_ns,
            pkt_saddr,
            tcp_flags,
            ..FlowStats::default()
        };
        let merged = FlowStats::merge(&[
            cpu(2, 50, 70, 1, 0x02),
            FlowStats::default(),
            cpu(1, 40, 90, 2, 0x01),
            cpu(3, 60, 80, 3, 0x10),
        ]);
        assert_eq!((merged.packets, merged.bytes), (6, 600));
        assert_eq!((merged.first_ns, merged.last_ns), (40, 90));
        assert_eq!(merged.pkt_saddr, 2, "the addresses of the latest packet");
        assert_eq!(merged.tcp_flags, 0x13);
        assert_eq!(FlowStats::merge(&[]), FlowStats::default());
    }

    #[test]
    fn ipv6_counters_merge_as_ipv4_ones_do() {
        // (packets, first_ns, last_ns, last byte of the addresses, flags) of four CPUs.
        let cpus = [
            (2, 50, 70, 1, 0x02),
            (0, 0, 0, 0, 0),
            (1, 40, 90, 2, 0x01),
            (3, 60, 80, 3, 0x10),
        ];
        let six = |last: u8| {
            let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            a[15] = last;
            a
        };
        let v4 = cpus.map(|(packets, first_ns, last_ns, a, tcp_flags)| FlowStats {
            packets,
            bytes: packets * 100,
            first_ns,
            last_ns,
            pkt_saddr: a.into(),
            pkt_daddr: u32::from(a) + 100,
            tcp_flags,
            ..FlowStats::default()
        });
        let v6 = core::array::from_fn::<_, 4, _>(|i| FlowStats6 {
            pkt_saddr: six(cpus[i].3),
            pkt_daddr: six(cpus[i].3 + 100),
            packets: v4[i].packets,
            bytes: v4[i].bytes,
            first_ns: v4[i].first_ns,
            last_ns: v4[i].last_ns,
            tcp_flags: v4[i].tcp_flags,
            ..FlowStats6::default()
        });
        let (m4, m6) = (FlowStats::merge(&v4), FlowStats6::merge(&v6));
        let counts = |p, b, f, l, t| (p, b, f, l, t);
        assert_eq!(
            counts(m6.packets, m6.bytes, m6.first_ns, m6.last_ns, m6.tcp_flags),
            counts(m4.packets, m4.bytes, m4.first_ns, m4.last_ns, m4.tcp_flags),
        );
        assert_eq!((m4.packets, m4.first_ns, m4.last_ns), (6, 40, 90));
        assert_eq!(
            (m6.pkt_saddr, m6.pkt_daddr),
            (six(2), six(102)),
            "the addresses of the latest packet"
        );
        assert_eq!(FlowStats6::merge(&[]), FlowStats6::default());
    }

    #[test]
    fn tcp_flags_as_aws_reports_them() {
        assert_eq!(aws_tcp_flags(0x02), 2, "SYN");
        assert_eq!(aws_tcp_flags(0x12), 18, "SYN-ACK");
        assert_eq!(aws_tcp_flags(0x10), 0, "a bare ACK is not reported");
        assert_eq!(aws_tcp_flags(0x18), 0, "PSH-ACK is not reported");
        assert_eq!(aws_tcp_flags(0x11), 1, "FIN-ACK is FIN");
        assert_eq!(aws_tcp_flags(0x14), 4, "RST-ACK is RST");
        assert_eq!(aws_tcp_flags(0x12) | aws_tcp_flags(0x11), 19);
    }
}
