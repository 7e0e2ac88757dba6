//! The datapath programs run through BPF_PROG_TEST_RUN with packet fixtures: each case gives a
//! packet, the program, the verdict, that the packet comes out unchanged, and the exact counter
//! change (class, packets, bytes).

use aya::{
    Ebpf,
    maps::{MapData, PerCpuHashMap},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use ecsnet_common::maps::{CLASS_IPV4, CLASS_OTHER, Counters, StatsKey};

const TC_ACT_OK: u32 = 0;
const XDP_PASS: u32 = 2;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

/// Ethernet + IPv4 (with `options` bytes of IP options) + `l4`; tot_len as given or computed.
fn ipv4(proto: u8, options: usize, l4: &[u8], tot_len: Option<u16>) -> Vec<u8> {
    let mut p = eth(0x0800);
    let ihl = 20 + options;
    let tot = tot_len.unwrap_or((ihl + l4.len()) as u16);
    p.extend_from_slice(&[0x40 | (ihl / 4) as u8, 0]);
    p.extend_from_slice(&tot.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0, 172, 17, 0, 2, 10, 10, 0, 2]);
    p.extend(std::iter::repeat_n(1u8, options));
    p.extend_from_slice(l4);
    p
}

fn tcp(doff_words: u8, payload: usize) -> Vec<u8> {
    let mut t = vec![
        0x9c,
        0x40,
        0,
        80,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        doff_words << 4,
        0x02,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ];
    t.extend(std::iter::repeat_n(
        0u8,
        (doff_words as usize * 4).saturating_sub(20),
    ));
    t.extend(std::iter::repeat_n(7u8, payload));
    t
}

fn udp(payload: usize) -> Vec<u8> {
    let len = (8 + payload) as u16;
    let mut u = vec![0x30, 0x39, 0, 53];
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend(std::iter::repeat_n(9u8, payload));
    u
}

struct Case {
    desc: &'static str,
    packet: Vec<u8>,
    /// Expected class and bytes added to the counters.
    class: u8,
    bytes: u64,
    /// BPF_PROG_TEST_RUN for skb programs refuses IPv4 frames shorter than an IP header
    /// (EINVAL), so such a case only runs through XDP.
    skb_ok: bool,
}

fn cases() -> Vec<Case> {
    let arp = {
        let mut p = eth(0x0806);
        p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        p.extend(std::iter::repeat_n(0u8, 20));
        p
    };
    let ipv6 = {
        let mut p = eth(0x86dd);
        p.extend(std::iter::repeat_n(0u8, 40));
        p
    };
    let truncated = {
        let mut p = ipv4(17, 0, &udp(10), None);
        p.truncate(14 + 12);
        p
    };
    let bad_ihl = {
        let mut p = ipv4(17, 0, &udp(10), None);
        p[14] = 0x44; // IHL 4 words: below the minimum
        p
    };
    let frag_later = {
        let mut p = ipv4(6, 0, &[0u8; 24], None);
        p[20] = 0x00;
        p[21] = 0x10; // fragment offset 16 (x8 bytes): no TCP header here
        p
    };
    vec![
        Case {
            desc: "UDP datagram",
            packet: ipv4(17, 0, &udp(100), None),
            class: CLASS_IPV4,
            bytes: 128,
            skb_ok: true,
        },
        Case {
            desc: "TCP SYN",
            packet: ipv4(6, 0, &tcp(5, 0), None),
            class: CLASS_IPV4,
            bytes: 40,
            skb_ok: true,
        },
        Case {
            desc: "TCP with options and data",
            packet: ipv4(6, 0, &tcp(8, 10), None),
            class: CLASS_IPV4,
            bytes: 20 + 32 + 10,
            skb_ok: true,
        },
        Case {
            desc: "IPv4 header with options",
            packet: ipv4(17, 8, &udp(4), None),
            class: CLASS_IPV4,
            bytes: 28 + 12,
            skb_ok: true,
        },
        Case {
            desc: "UDP with zero checksum",
            packet: ipv4(17, 0, &udp(1), None),
            class: CLASS_IPV4,
            bytes: 29,
            skb_ok: true,
        },
        Case {
            desc: "later fragment of a TCP packet",
            packet: frag_later,
            class: CLASS_IPV4,
            bytes: 44,
            skb_ok: true,
        },
        Case {
            desc: "ARP",
            packet: arp.clone(),
            class: CLASS_OTHER,
            bytes: arp.len() as u64,
            skb_ok: true,
        },
        Case {
            desc: "IPv6 (kernel path)",
            packet: ipv6.clone(),
            class: CLASS_OTHER,
            bytes: ipv6.len() as u64,
            skb_ok: true,
        },
        Case {
            desc: "truncated IPv4 header",
            bytes: truncated.len() as u64,
            packet: truncated,
            class: CLASS_OTHER,
            skb_ok: false,
        },
        Case {
            desc: "IHL below 5",
            bytes: bad_ihl.len() as u64,
            packet: bad_ihl,
            class: CLASS_OTHER,
            skb_ok: true,
        },
        Case {
            desc: "TCP data offset below 5",
            packet: ipv4(6, 0, &tcp(3, 0), None),
            class: CLASS_OTHER,
            bytes: 14 + 20 + 20,
            skb_ok: true,
        },
    ]
}

fn load() -> Ebpf {
    ecsnet_tests::require_root();
    Ebpf::load(ecsnet::kernel::datapath::DATAPATH)
        .expect("the datapath object loads: does this kernel have BTF and tcx?")
}

fn totals(ebpf: &Ebpf) -> std::collections::HashMap<u8, Counters> {
    let m: PerCpuHashMap<&MapData, StatsKey, Counters> =
        PerCpuHashMap::try_from(ebpf.map("STATS").unwrap()).unwrap();
    let mut out = std::collections::HashMap::new();
    for entry in m.iter() {
        let (k, v) = entry.unwrap();
        let e: &mut Counters = out.entry(k.class).or_default();
        for c in v.iter() {
            e.packets += c.packets;
            e.bytes += c.bytes;
        }
    }
    out
}

fn check(
    name: &str,
    run: &dyn Fn(&[u8], &mut [u8]) -> (u32, u32),
    ebpf: &Ebpf,
    pass: u32,
    skb: bool,
) {
    for case in cases().into_iter().filter(|c| c.skb_ok || !skb) {
        let before = totals(ebpf);
        let mut out = vec![0u8; case.packet.len() + 64];
        let (ret, out_len) = run(&case.packet, &mut out);
        assert_eq!(ret, pass, "{name}: {}: verdict", case.desc);
        assert_eq!(
            &out[..out_len as usize],
            &case.packet[..],
            "{name}: {}: the packet must come out unchanged",
            case.desc
        );
        let after = totals(ebpf);
        let d = |class: u8| {
            let a = after.get(&class).copied().unwrap_or_default();
            let b = before.get(&class).copied().unwrap_or_default();
            (a.packets - b.packets, a.bytes - b.bytes)
        };
        assert_eq!(
            d(case.class),
            (1, case.bytes),
            "{name}: {}: counter change",
            case.desc
        );
        let other = if case.class == CLASS_IPV4 {
            CLASS_OTHER
        } else {
            CLASS_IPV4
        };
        assert_eq!(
            d(other),
            (0, 0),
            "{name}: {}: the other class must not move",
            case.desc
        );
    }
}

#[test]
fn tc_programs_count_and_pass_every_fixture() {
    let mut ebpf = load();
    for name in [
        "tc_task_ingress",
        "tc_task_egress",
        "tc_uplink_ingress",
        "tc_uplink_egress",
    ] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
    }
    ecsnet::kernel::datapath::load_tail_called(&mut ebpf).expect("the tail-called programs load");
    for name in [
        "tc_task_ingress",
        "tc_task_egress",
        "tc_uplink_ingress",
        "tc_uplink_egress",
    ] {
        let p: &SchedClassifier = ebpf.program(name).unwrap().try_into().unwrap();
        let run = |input: &[u8], out: &mut [u8]| {
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(input),
                    data_out: Some(out),
                    ..Default::default()
                })
                .expect("BPF_PROG_TEST_RUN");
            (r.return_value, r.data_size_out)
        };
        check(name, &run, &ebpf, TC_ACT_OK, true);
    }
}

#[test]
fn xdp_program_counts_and_passes_every_fixture() {
    let mut ebpf = load();
    let p: &mut Xdp = ebpf.program_mut("xdp_uplink").unwrap().try_into().unwrap();
    p.load().unwrap();
    let p: &Xdp = ebpf.program("xdp_uplink").unwrap().try_into().unwrap();
    let run = |input: &[u8], out: &mut [u8]| {
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        (r.return_value, r.data_size_out)
    };
    check("xdp_uplink", &run, &ebpf, XDP_PASS, false);
}
