//! The datapath programs run through `BPF_PROG_TEST_RUN` with packet fixtures: each case gives a
//! packet, the program, the verdict, that the packet comes out unchanged, and the exact counter
//! change (class, packets, bytes).

use ecsnet_common::{
    ct::{PROTO_TCP, TCP_SYN},
    maps::{CLASS_IPV4, CLASS_OTHER, MAP_STATS, StatsKey},
};
use ecsnet_lab::fixture::{
    datapath::Datapath,
    packet::{ETH_P_ARP, ETH_P_IPV6, L4, P, ethernet},
    world::{CLIENT, ROUTER_MAC, TASK_A, TC_ACT_OK, UPLINK_MAC, XDP_PASS},
};

fn tcp(doff_words: u8, payload: usize) -> P {
    P::tcp(TASK_A, 40000, CLIENT, 80, TCP_SYN)
        .doff(doff_words)
        .data(&vec![7; payload])
}

fn udp(payload: usize) -> P {
    P::udp(TASK_A, 12345, CLIENT, 53, &vec![9; payload])
}

struct Case {
    desc: &'static str,
    packet: Vec<u8>,
    /// Expected class and bytes added to the counters.
    class: u8,
    bytes: u64,
    /// `BPF_PROG_TEST_RUN` for skb programs refuses IPv4 frames shorter than an IP header
    /// (EINVAL), so such a case only runs through XDP.
    skb_ok: bool,
}

impl Case {
    /// A case an skb program can run: `packet` adds one packet and `bytes` to `class`.
    fn new(desc: &'static str, packet: Vec<u8>, class: u8, bytes: u64) -> Case {
        Case {
            desc,
            packet,
            class,
            bytes,
            skb_ok: true,
        }
    }

    /// A frame that is not IPv4 to the datapath: it counts, whole, as `CLASS_OTHER`.
    fn whole_frame(desc: &'static str, packet: Vec<u8>) -> Case {
        let bytes = packet.len() as u64;
        Case::new(desc, packet, CLASS_OTHER, bytes)
    }
}

fn cases() -> Vec<Case> {
    let arp = ethernet(
        UPLINK_MAC,
        ROUTER_MAC,
        ETH_P_ARP,
        &[[0, 1, 8, 0, 6, 4, 0, 1].as_slice(), &[0; 20]].concat(),
    );
    let ipv6 = ethernet(UPLINK_MAC, ROUTER_MAC, ETH_P_IPV6, &[0; 40]);
    let truncated = {
        let mut p = udp(10).frame();
        p.truncate(14 + 12);
        p
    };
    let bad_ihl = P {
        ihl_words: Some(4), // IHL 4 words: below the minimum
        ..udp(10)
    }
    .frame();
    let frag_later = P {
        frag: 0x0010, // fragment offset 16 (x8 bytes): no TCP header here
        ..P::new(
            TASK_A,
            CLIENT,
            L4::Raw {
                proto: PROTO_TCP,
                bytes: vec![0; 24],
            },
        )
    }
    .frame();
    vec![
        Case::new("UDP datagram", udp(100).frame(), CLASS_IPV4, 128),
        Case::new("TCP SYN", tcp(5, 0).frame(), CLASS_IPV4, 40),
        Case::new(
            "TCP with options and data",
            tcp(8, 10).frame(),
            CLASS_IPV4,
            20 + 32 + 10,
        ),
        Case::new(
            "IPv4 header with options",
            P {
                opts: vec![1; 8],
                ..udp(4)
            }
            .frame(),
            CLASS_IPV4,
            28 + 12,
        ),
        Case::new(
            "UDP with zero checksum",
            udp(1).without_checksum().frame(),
            CLASS_IPV4,
            29,
        ),
        Case::new("later fragment of a TCP packet", frag_later, CLASS_IPV4, 44),
        Case::whole_frame("ARP", arp),
        Case::whole_frame("IPv6 (kernel path)", ipv6),
        Case {
            skb_ok: false,
            ..Case::whole_frame("truncated IPv4 header", truncated)
        },
        Case::whole_frame("IHL below 5", bad_ihl),
        Case::new(
            "TCP data offset below 5",
            tcp(3, 0).frame(),
            CLASS_OTHER,
            14 + 20 + 20,
        ),
    ]
}

fn load(programs: &[&'static str]) -> Datapath {
    ecsnet_tests::require_root();
    let mut dp =
        Datapath::load().expect("the datapath object loads: does this kernel have BTF and tcx?");
    dp.load_programs(programs).expect("the programs load");
    dp
}

/// Packets and bytes counted per class, over every interface and hook.
fn totals(dp: &Datapath) -> std::collections::HashMap<u8, (u64, u64)> {
    let mut out = std::collections::HashMap::new();
    for (k, (p, b)) in dp.counters::<StatsKey>(MAP_STATS).expect("STATS reads") {
        let e: &mut (u64, u64) = out.entry(k.class).or_default();
        (e.0, e.1) = (e.0 + p, e.1 + b);
    }
    out
}

/// Runs every case (the skb-able ones for a tc program) through `program`: each must come out
/// unchanged with `pass`, counted once in its class and not in the other.
fn check(program: &'static str, dp: &Datapath, pass: u32) {
    let skb = !program.starts_with("xdp");
    for case in cases().into_iter().filter(|c| c.skb_ok || !skb) {
        let before = totals(dp);
        let r = dp
            .test_run(program, &case.packet, 1)
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.verdict, pass, "{program}: {}: verdict", case.desc);
        assert_eq!(
            r.output, case.packet,
            "{program}: {}: the packet must come out unchanged",
            case.desc
        );
        let after = totals(dp);
        let d = |class: u8| {
            let a = after.get(&class).copied().unwrap_or_default();
            let b = before.get(&class).copied().unwrap_or_default();
            (a.0 - b.0, a.1 - b.1)
        };
        assert_eq!(
            d(case.class),
            (1, case.bytes),
            "{program}: {}: counter change",
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
            "{program}: {}: the other class must not move",
            case.desc
        );
    }
}

const TC_PROGRAMS: [&str; 4] = [
    "tc_task_ingress",
    "tc_task_egress",
    "tc_uplink_ingress",
    "tc_uplink_egress",
];

#[test]
fn tc_programs_count_and_pass_every_fixture() {
    let mut dp = load(&TC_PROGRAMS);
    dp.load_tail_called()
        .expect("the tail-called programs load");
    for program in TC_PROGRAMS {
        check(program, &dp, TC_ACT_OK);
    }
}

#[test]
fn xdp_program_counts_and_passes_every_fixture() {
    let dp = load(&["xdp_uplink"]);
    check("xdp_uplink", &dp, XDP_PASS);
}
