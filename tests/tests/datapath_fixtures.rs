//! The NAT and conntrack paths of the tc programs through `BPF_PROG_TEST_RUN`, as a table of
//! fixtures. Each case names the program, the maps it seeds, the input frames, and for every
//! frame the exact verdict and the exact bytes that come out; then the exact map effect: every
//! CT entry (key, nat fields, kind, dir, peer, counters), FRAGS, the learned task MACs, the
//! drop counters and the delivery counter of the destination task.
//!
//! Expected frames are built from scratch by the fixtures' one packet builder
//! (`ecsnet_lab::fixture::packet`) as the input, with the translated fields, and their
//! checksums computed in full with `ecsnet_common::csum`; the datapath updates them
//! incrementally, so an equal frame proves the incremental update. Every IPv4, TCP, UDP and
//! ICMP checksum of a well-formed output is verified on its own as well.
//!
//! Every case loads its own `Ebpf`, so its maps hold exactly what the case seeded. In a test run
//! the skb's device is the loopback (ifindex 1): uplink cases configure ifindex 1 as the uplink,
//! task cases register ifindex 1 as task A's interface and put the uplink on an ifindex that
//! does not exist, so no FIB lookup can ever answer "uplink".

use std::collections::HashMap as StdHashMap;

use ecsnet_common::{
    DropReason,
    ct::{
        CtEntry, CtKey, FIN_OVERTAKE, KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND, KIND_MASQUERADE,
        PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    maps::{
        CLASS_IPV4, Config, DropKey, FragKey, FragPorts, HOOK_TC_EGRESS, HOOK_TC_INGRESS,
        MAP_CONFIG, MAP_FRAGS, MAP_STATS, MAP_TASKS, ROLE_TASK, StatsKey, TaskInfo,
    },
};
use ecsnet_lab::fixture::{
    conntrack::{CtExp, FlowPair, Table, check_ct, show_key},
    datapath::{Datapath, coarse_ns, now_ns, require_test_host},
    harness::{case_result, run_table},
    packet::{L4, MF, P, SEQ, compare_frames, quote, tagged, verify_checksums},
    world::{
        BRIDGE, CLIENT, HOST, IFINDEX_A, IFINDEX_B, INTERNET, MAC_A, MAC_B, NO_SUCH_IFINDEX,
        NOT_LOCAL, OTHER_LOCAL, REMOTE, ROUTER, Seed, TASK_A, TASK_B, TEST_IFINDEX, Tuple, addr,
        config, ct_key, tu,
    },
};
// The tables' short names of a tc program's verdicts, and the host of uplink cases: two tasks,
// three published ports, one more local address.
use ecsnet_lab::fixture::world::{
    TC_ACT_OK as OK, TC_ACT_REDIRECT as REDIRECT, TC_ACT_SHOT as SHOT, world as uplink_world,
};

// ---------------------------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------------------------

/// The same host seen from task A's interface (ifindex 1 in a test run).
fn task_world() -> Vec<Seed> {
    let mut w = uplink_world();
    w.push(Seed::Iface(TEST_IFINDEX, TASK_A, ROLE_TASK));
    w
}

/// A world plus more seeds (later seeds of the same key win).
fn with(mut world: Vec<Seed>, more: impl IntoIterator<Item = Seed>) -> Vec<Seed> {
    world.extend(more);
    world
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prog {
    /// `tc_uplink_ingress`, with the test device (ifindex 1) configured as the uplink.
    Uplink,
    /// `tc_task_ingress`, with the test device registered as task A's interface.
    Task,
    /// `tc_task_new_flow` run on its own, on a host whose configuration is not written.
    NewFlowUnconfigured,
}

impl Prog {
    fn name(self) -> &'static str {
        match self {
            Prog::Uplink => "tc_uplink_ingress",
            Prog::Task => "tc_task_ingress",
            Prog::NewFlowUnconfigured => "tc_task_new_flow",
        }
    }

    fn config(self) -> Config {
        config(match self {
            Prog::Uplink => TEST_IFINDEX,
            Prog::Task => NO_SUCH_IFINDEX,
            // 0: `ecsnet up` has not written the host's configuration.
            Prog::NewFlowUnconfigured => 0,
        })
    }
}

// The four published-port and masqueraded flows most cases use.

/// client:51000 -> host:8080/tcp published to A:80.
fn inbound_tcp(host: [u8; 4]) -> FlowPair {
    FlowPair::new(
        PROTO_TCP,
        tu(CLIENT, 51000, host, 8080),
        tu(CLIENT, 51000, TASK_A, 80),
        KIND_INBOUND,
    )
}

/// client:51000 -> host:5353/udp published to A:53.
fn inbound_udp() -> FlowPair {
    FlowPair::new(
        PROTO_UDP,
        tu(CLIENT, 51000, HOST, 5353),
        tu(CLIENT, 51000, TASK_A, 53),
        KIND_INBOUND,
    )
}

/// A:40000 -> remote:9000 masqueraded to host:`nat_port`.
fn masquerade(proto: u8, nat_port: u16) -> FlowPair {
    FlowPair::new(
        proto,
        tu(TASK_A, 40000, REMOTE, 9000),
        tu(HOST, nat_port, REMOTE, 9000),
        KIND_MASQUERADE,
    )
}

/// An east-west flow of `proto`, `t` on both sides (nothing translated).
fn east_west(proto: u8, t: Tuple) -> FlowPair {
    FlowPair::new(proto, t, t, KIND_EAST_WEST)
}

/// A TCP hairpin flow: `orig` sent by a task to a published port, rewritten to `nat`.
fn hairpin(orig: Tuple, nat: Tuple) -> FlowPair {
    FlowPair::new(PROTO_TCP, orig, nat, KIND_HAIRPIN)
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

struct Step {
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    /// Verify the output's checksums on their own (false for malformed packets).
    well_formed: bool,
}

struct Case {
    desc: &'static str,
    prog: Prog,
    seeds: Vec<Seed>,
    steps: Vec<Step>,
    /// The whole CT map afterwards.
    ct: Vec<CtExp>,
    /// The whole FRAGS map afterwards.
    frags: Vec<(FragKey, FragPorts)>,
    /// The one drop counted (on the test device at tc ingress), if any.
    drop: Option<DropReason>,
    /// The one task delivery counted: (task ifindex, packets, IP bytes) at `HOOK_TC_EGRESS`.
    egress: Option<(u32, u64, u64)>,
    /// The task MAC learned from the input: TASKS is the seeded one with this change.
    learned: Option<([u8; 4], [u8; 6])>,
}

impl Case {
    fn new(desc: &'static str, prog: Prog, seeds: Vec<Seed>) -> Case {
        Case {
            desc,
            prog,
            seeds,
            steps: Vec::new(),
            ct: Vec::new(),
            frags: Vec::new(),
            drop: None,
            egress: None,
            learned: None,
        }
    }

    /// A well-formed packet in, `verdict`, `output` out.
    fn step(mut self, input: &P, verdict: u32, output: &P) -> Case {
        self.steps.push(Step {
            input: input.frame(),
            verdict,
            output: output.frame(),
            well_formed: true,
        });
        self
    }

    /// A well-formed packet that must come out exactly as it went in.
    fn unchanged(self, input: &P, verdict: u32) -> Case {
        self.step(input, verdict, input)
    }

    /// A malformed packet that must come out unchanged with `verdict`.
    fn hostile(mut self, input: &P, verdict: u32) -> Case {
        let f = input.frame();
        self.steps.push(Step {
            input: f.clone(),
            verdict,
            output: f,
            well_formed: false,
        });
        self
    }

    /// A frame given byte for byte that must come out unchanged with `verdict`.
    fn raw(mut self, frame: Vec<u8>, verdict: u32) -> Case {
        self.steps.push(Step {
            input: frame.clone(),
            verdict,
            output: frame,
            well_formed: false,
        });
        self
    }

    fn ct(mut self, exp: impl IntoIterator<Item = CtExp>) -> Case {
        self.ct.extend(exp);
        self
    }

    fn frag(mut self, key: FragKey, ports: FragPorts) -> Case {
        self.frags.push((key, ports));
        self
    }

    fn drop(mut self, r: DropReason) -> Case {
        self.drop = Some(r);
        self
    }

    fn egress(mut self, ifindex: u32, packets: u64, bytes: u64) -> Case {
        self.egress = Some((ifindex, packets, bytes));
        self
    }

    fn learned(mut self, task: [u8; 4], mac: [u8; 6]) -> Case {
        self.learned = Some((task, mac));
        self
    }

    /// A case of `tc_uplink_ingress` on the uplink world.
    fn uplink(desc: &'static str) -> Case {
        Case::new(desc, Prog::Uplink, uplink_world())
    }

    /// A case of `tc_task_ingress` on the task world.
    fn task(desc: &'static str) -> Case {
        Case::new(desc, Prog::Task, task_world())
    }

    /// More seeds (later seeds of the same key win).
    fn seed(mut self, more: impl IntoIterator<Item = Seed>) -> Case {
        self.seeds.extend(more);
        self
    }

    /// A well-formed or malformed packet that is dropped for `r`, unchanged.
    fn dropped(self, input: &P, r: DropReason) -> Case {
        self.hostile(input, SHOT).drop(r)
    }

    /// A frame given byte for byte that is dropped for `r`, unchanged.
    fn raw_dropped(self, frame: Vec<u8>, r: DropReason) -> Case {
        self.raw(frame, SHOT).drop(r)
    }

    /// `input` redirected into the task `(ifindex, mac)` as `output` addressed to its MAC, and
    /// that one delivery of `bytes` IP bytes counted.
    fn into_task(self, (ifindex, mac): (u32, [u8; 6]), input: &P, output: P, bytes: u64) -> Case {
        self.step(input, REDIRECT, &output.routed_to(mac))
            .egress(ifindex, 1, bytes)
    }
}

/// Task A and task B, as `Case::into_task` delivers into them.
const A: (u32, [u8; 6]) = (IFINDEX_A, MAC_A);
const B: (u32, [u8; 6]) = (IFINDEX_B, MAC_B);

/// A TCP segment from task A, to the bridge's MAC.
fn from_a_tcp(sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> P {
    P::tcp(TASK_A, sport, dst, dport, flags).sent_by_task(MAC_A)
}

/// What issue 16 closed: frames that went around the checks, headers the kernel would refuse,
/// resets and FINs off the flow's sequence numbers, and a flow's move to the assured table.
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn guard_cases() -> Vec<Case> {
    let ew_syn = || from_a_tcp(40000, TASK_B, 80, TCP_SYN).addressed_to(MAC_B);
    let to_b_udp = || P::udp(TASK_A, 40001, TASK_B, 53, b"query: a.b.c").sent_by_task(MAC_A);
    let with_ethertype = |frame: Vec<u8>, ethertype: u16| {
        let mut f = frame;
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        f
    };
    let bad_check = |p: &P| {
        let mut f = p.frame();
        f[14 + 10] ^= 0x40;
        f
    };
    // An ARP reply from A claiming its own address, with `sender` as sender hardware address.
    let arp_from_a = |sender: [u8; 6]| {
        let mut f = vec![0xff; 6];
        f.extend(MAC_A);
        f.extend(0x0806u16.to_be_bytes());
        f.extend([0, 1, 8, 0, 6, 4, 0, 2]);
        f.extend(sender);
        f.extend(TASK_A);
        f.extend(MAC_B);
        f.extend(TASK_B);
        f
    };
    let masq = || {
        masquerade(PROTO_TCP, 40000).seen((1, 40, TCP_SYN | TCP_ACK), (1, 40, TCP_SYN | TCP_ACK))
    };
    let back = |flags| P::tcp(REMOTE, 9000, HOST, 40000, flags);
    // A segment of the masqueraded flow off its sequence numbers: dropped, the flow untouched.
    let out_of_window = |desc, p: P| {
        Case::uplink(desc)
            .seed(masq().seeds())
            .dropped(&p, DropReason::TcpOutOfWindow)
            .ct(masq().unchanged())
    };
    let ew = || {
        east_west(PROTO_TCP, tu(TASK_A, 40000, TASK_B, 80))
            .seen((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK))
            .unassured()
    };
    let vlan_tagged = DropReason::VlanTagged;
    vec![
        Case::task("two VID-0 tags (802.1ad + 802.1Q) from a task: dropped VLAN_TAGGED")
            .raw_dropped(tagged(&ew_syn().frame(), &[0x88a8, 0x8100]), vlan_tagged),
        Case::task("one 802.1Q tag from a task: dropped VLAN_TAGGED")
            .raw_dropped(tagged(&ew_syn().frame(), &[0x8100]), vlan_tagged),
        Case::task(
            "an EtherType that is not IPv4, ARP or IPv6 from a task: dropped UNKNOWN_ETHERTYPE",
        )
        .raw_dropped(
            with_ethertype(ew_syn().frame(), 0x88b5),
            DropReason::UnknownEthertype,
        ),
        Case::task("unicast IPv4 to B in a broadcast frame: dropped UNICAST_IN_GROUP_MAC").dropped(
            &to_b_udp().addressed_to([0xff; 6]),
            DropReason::UnicastInGroupMac,
        ),
        Case::task("unicast IPv4 to B in a multicast frame: dropped UNICAST_IN_GROUP_MAC").dropped(
            &to_b_udp().addressed_to([0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]),
            DropReason::UnicastInGroupMac,
        ),
        Case::task(
            "UDP to the bridge subnet's broadcast in a broadcast frame, no policy: to the \
             kernel, nothing tracked",
        )
        .unchanged(
            &P::udp(TASK_A, 40001, [172, 17, 255, 255], 53, b"who is there")
                .sent_by_task(MAC_A)
                .addressed_to([0xff; 6]),
            OK,
        ),
        Case::task("IPv6 from a task without a policy: to the kernel, as before")
            .raw(ecsnet_tests::raw::ipv6_frame(MAC_B, MAC_A), OK),
        Case::task("ARP for A's own address from A's MAC: passed").raw(arp_from_a(MAC_A), OK),
        Case::task("ARP for A's own address naming another MAC: dropped SPOOFED_SOURCE")
            .raw_dropped(arp_from_a(MAC_B), DropReason::SpoofedSource),
        Case::task(
            "a bad IPv4 header checksum from a task: dropped BAD_IP_CHECKSUM, nothing created",
        )
        .raw_dropped(bad_check(&ew_syn()), DropReason::BadIpChecksum),
        Case::uplink(
            "a SYN with a bad IPv4 header checksum to a published port: dropped \
             BAD_IP_CHECKSUM, nothing created",
        )
        .raw_dropped(
            bad_check(&P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN)),
            DropReason::BadIpChecksum,
        ),
        Case::uplink(
            "a RST of a masqueraded flow at the sender's sequence number: into the task, the \
             flow marked reset",
        )
        .seed(masq().seeds())
        .into_task(
            A,
            &back(TCP_RST | TCP_ACK),
            back(TCP_RST | TCP_ACK).dnat(TASK_A, 40000),
            40,
        )
        .ct(masq().reply_touched(40, TCP_RST | TCP_ACK)),
        out_of_window(
            "a RST of a masqueraded flow off its sequence numbers: dropped TCP_OUT_OF_WINDOW, \
             the flow untouched",
            back(TCP_RST | TCP_ACK).seq(SEQ + 1000),
        ),
        out_of_window(
            "a FIN of a masqueraded flow beyond what its sender sent (and then some): dropped \
             TCP_OUT_OF_WINDOW, the flow untouched",
            back(TCP_FIN | TCP_ACK).seq(SEQ + 1 + FIN_OVERTAKE),
        ),
        Case::uplink(
            "a FIN of a masqueraded flow a segment past its sender's recorded end (that segment \
             still being recorded on another CPU): into the task, the flow closing",
        )
        .seed(masq().seeds())
        .into_task(
            A,
            &back(TCP_FIN | TCP_ACK).seq(SEQ + 1448),
            back(TCP_FIN | TCP_ACK).seq(SEQ + 1448).dnat(TASK_A, 40000),
            40,
        )
        .ct({
            let mut ct = masq().reply_touched(40, TCP_FIN | TCP_ACK);
            ct[1].entry.tcp_end = SEQ + 1448 + 1;
            ct
        }),
        Case::new(
            "tc_task_new_flow with the host's configuration gone: dropped TAIL_CALL_FAILED, \
             never passed unchecked",
            Prog::NewFlowUnconfigured,
            task_world(),
        )
        .dropped(&ew_syn(), DropReason::TailCallFailed),
        Case::task("the opener's ACK completes the handshake: both entries move from CT_NEW to CT")
            .seed(ew().seeds())
            .unchanged(
                &from_a_tcp(40000, TASK_B, 80, TCP_ACK).addressed_to(MAC_B),
                REDIRECT,
            )
            .ct(ew()
                .original_touched(40, TCP_ACK)
                .into_iter()
                .map(|e| e.in_table(Table::Assured)))
            .egress(IFINDEX_B, 1, 40),
    ]
}

#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn uplink_cases() -> Vec<Case> {
    let syn = |dst| P::tcp(CLIENT, 51000, dst, 8080, TCP_SYN);
    let udp_in = P::udp(CLIENT, 51000, HOST, 5353, b"query: a.b.c");
    // A SYN to `dst`:8080, published to A:80.
    let syn_in = |desc, dst| {
        Case::uplink(desc)
            .into_task(A, &syn(dst), syn(dst).dnat(TASK_A, 80), 40)
            .ct(inbound_tcp(dst).created(40, TCP_SYN))
    };
    // The client's next segment `p` of an established inbound flow, `bytes` long.
    let established = inbound_tcp(HOST).seen((1, 40, TCP_SYN), (1, 40, TCP_SYN | TCP_ACK));
    let next_in = |desc, p: P, bytes| {
        Case::uplink(desc)
            .seed(established.seeds())
            .into_task(A, &p, p.clone().dnat(TASK_A, 80), bytes)
            .ct(established.original_touched(bytes, TCP_ACK))
    };
    // The remote's reply `p` (`bytes` long, `flags`) of the masqueraded `flow`, back to A:40000.
    let masq_reply = |desc, flow: FlowPair, p: P, bytes, flags| {
        Case::uplink(desc)
            .seed(flow.seeds())
            .into_task(A, &p, p.clone().dnat(TASK_A, 40000), bytes)
            .ct(flow.reply_touched(bytes, flags))
    };
    let synack_back = |port| P::tcp(REMOTE, 9000, HOST, port, TCP_SYN | TCP_ACK);
    let masq_tcp = |port| masquerade(PROTO_TCP, port).seen((1, 40, TCP_SYN), (0, 0, 0));
    // The echo reply to the host's identifier `nat_id` of A's ping 0x1234.
    let pong_in = |desc, nat_id| {
        Case::uplink(desc)
            .seed(ping(nat_id).seeds())
            .into_task(A, &pong(HOST, nat_id), pong(TASK_A, 0x1234), 40)
            .ct(ping(nat_id).reply_touched(40, 0))
    };
    let passed = |desc, p: P| Case::uplink(desc).unchanged(&p, OK);
    vec![
        syn_in(
            "SYN to the uplink address on a published port: DNAT into the task",
            HOST,
        ),
        syn_in(
            "SYN to the bridge address on a published port: DNAT into the task",
            BRIDGE,
        ),
        syn_in(
            "SYN to a LOCAL_ADDRS address on a published port: DNAT into the task",
            OTHER_LOCAL,
        ),
        Case::uplink("UDP to a published UDP port: DNAT into the task, UDP checksum updated")
            .into_task(A, &udp_in, udp_in.clone().dnat(TASK_A, 53), 40)
            .ct(inbound_udp().created(40, 0)),
        next_in(
            "next segment (ACK with data) of a tracked inbound flow follows its CT entry",
            P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK).data(b"hello"),
            45,
        ),
        next_in(
            // Ethernet pads a bare ACK (40 IP bytes) to 60; tc sees the padding in skb->len.
            "bare ACK in a padded 60-byte frame: translated, padding kept, CT counts 40 IP bytes",
            P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK).padded(),
            40,
        ),
        // The kernel forwards what is passed and decrements the TTL itself.
        Case::uplink(
            "task MAC not known yet: translated (TTL and MACs left to the kernel) and passed",
        )
        .seed([Seed::Task(TASK_A, IFINDEX_A, [0; 6], 0)])
        .step(&syn(HOST), OK, &syn(HOST).dnat(TASK_A, 80))
        .ct(inbound_tcp(HOST).created(40, TCP_SYN)),
        passed(
            "TTL 1: passed untouched for the kernel's time-exceeded, nothing created",
            syn(HOST).ttl(1),
        ),
        passed(
            "ACK without a CT entry (a connection older than ecsnet): passed, nothing created",
            P::tcp(CLIENT, 51000, HOST, 8080, TCP_ACK),
        ),
        passed(
            "SYN+ACK without a CT entry is not a new flow: passed, nothing created",
            P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN | TCP_ACK),
        ),
        passed(
            "SYN to a port nobody published: passed, nothing created",
            P::tcp(CLIENT, 51000, HOST, 8081, TCP_SYN),
        ),
        passed(
            "SYN to a published port number on an address that is not the host's: passed",
            syn(NOT_LOCAL),
        ),
        masq_reply(
            "masquerade reply (SYN+ACK to host:40000): destination back to the task",
            masq_tcp(40000),
            synack_back(40000),
            40,
            TCP_SYN | TCP_ACK,
        ),
        masq_reply(
            "masquerade reply of a flow whose NAT changed the port (50000 back to 40000)",
            masq_tcp(50000),
            synack_back(50000),
            40,
            TCP_SYN | TCP_ACK,
        ),
        masq_reply(
            "masquerade reply over UDP: destination back to the task",
            masquerade(PROTO_UDP, 40000).seen((1, 48, 0), (0, 0, 0)),
            P::udp(REMOTE, 9000, HOST, 40000, b"twenty bytes of data"),
            48,
            0,
        ),
        pong_in(
            "echo reply of a masqueraded ping: destination back to the task",
            0x1234,
        ),
        pong_in(
            "echo reply of a ping whose NAT changed the identifier (0x9999 back to 0x1234)",
            0x9999,
        ),
    ]
}

/// A:0x1234 pinging the remote, masqueraded to the host with identifier `nat_id`; one request
/// seen, no reply yet.
fn ping(nat_id: u16) -> FlowPair {
    FlowPair::new(
        PROTO_ICMP,
        tu(TASK_A, 0x1234, REMOTE, 0),
        tu(HOST, nat_id, REMOTE, 0),
        KIND_MASQUERADE,
    )
    .seen((1, 40, 0), (0, 0, 0))
}

/// The remote's echo reply to `dst` with identifier `id` (40 IP bytes).
fn pong(dst: [u8; 4], id: u16) -> P {
    let [hi, lo] = id.to_be_bytes();
    P::icmp(REMOTE, dst, 0, 0, [hi, lo, 0, 7], b"ping payload".to_vec())
}

/// An ICMP error's type, code and rest of header.
type IcmpType = (u8, u8, [u8; 4]);

/// An ICMP error from `src` to `dst` of type `typ` with `body`.
fn icmp_err(src: [u8; 4], dst: [u8; 4], (typ, code, rest): IcmpType, body: Vec<u8>) -> P {
    P::icmp(src, dst, typ, code, rest, body)
}

/// An ICMP error of type `typ` from `src` to the host, quoting the first `n` bytes of `sent`,
/// of the tracked `flow`: into task A with the quote's source back to A:`port` (`bytes`
/// delivered), the flow untouched.
struct QuotedError {
    flow: FlowPair,
    src: [u8; 4],
    typ: IcmpType,
    sent: P,
    n: usize,
    port: u16,
    bytes: u64,
}

impl QuotedError {
    fn case(self, desc: &'static str) -> Case {
        let QuotedError {
            flow,
            src,
            typ,
            sent,
            n,
            port,
            bytes,
        } = self;
        let translated = sent.clone().snat(TASK_A, port);
        Case::uplink(desc)
            .seed(flow.seeds())
            .into_task(
                A,
                &icmp_err(src, HOST, typ, quote(&sent, n)),
                icmp_err(src, TASK_A, typ, quote(&translated, n)),
                bytes,
            )
            .ct(flow.unchanged())
    }
}

fn icmp_cases() -> Vec<Case> {
    const FRAG_NEEDED: IcmpType = (3, 4, [0, 0, 0x05, 0x78]); // MTU 1400
    const PORT_UNREACH: IcmpType = (3, 3, [0; 4]);
    const TIME_EXCEEDED: IcmpType = (11, 0, [0; 4]);
    // What the host sent for task A (masqueraded), as the router quotes it.
    let sent_tcp = |sport| {
        P::tcp(HOST, sport, REMOTE, 9000, TCP_ACK)
            .data(b"0123456789")
            .ttl(63)
            .id(0x4321)
    };
    let sent_udp = P::udp(HOST, 40000, REMOTE, 9000, b"twenty bytes of data")
        .ttl(63)
        .id(0x4322);
    let masq_tcp = |port| {
        masquerade(PROTO_TCP, port).seen((3, 150, TCP_SYN | TCP_ACK), (2, 80, TCP_SYN | TCP_ACK))
    };
    let masq_udp = masquerade(PROTO_UDP, 40000).seen((1, 48, 0), (0, 0, 0));
    // From a router, quoting the first 8 bytes of a masqueraded segment.
    let from_router = |flow, typ, sent| QuotedError {
        flow,
        src: ROUTER,
        typ,
        sent,
        n: 8,
        port: 40000,
        bytes: 56,
    };
    vec![
        from_router(masq_tcp(40000), FRAG_NEEDED, sent_tcp(40000)).case(
            "frag needed from a router quoting a masqueraded TCP segment (8 bytes): to the task",
        ),
        from_router(masq_udp, PORT_UNREACH, sent_udp.clone())
            .case("port unreachable from a router quoting a masqueraded UDP datagram: to the task"),
        from_router(masq_udp, TIME_EXCEEDED, sent_udp.clone().ttl(1))
            .case("time exceeded from a router (traceroute) quoting a masqueraded UDP datagram"),
        from_router(masq_tcp(50000), FRAG_NEEDED, sent_tcp(50000)).case(
            "frag needed quoting a flow whose NAT changed the port: quoted port 50000 -> 40000",
        ),
        QuotedError {
            n: 30,
            bytes: 78,
            ..from_router(masq_tcp(50000), FRAG_NEEDED, sent_tcp(50000))
        }
        .case(
            "frag needed quoting the whole TCP segment (NAT port changed): quoted TCP checksum too",
        ),
        // The reply an inbound UDP flow sent out (host:5353 -> client), as the client quotes it.
        QuotedError {
            flow: inbound_udp().seen((1, 40, 0), (1, 34, 0)),
            src: CLIENT,
            typ: PORT_UNREACH,
            sent: P::udp(HOST, 5353, CLIENT, 51000, b"answer")
                .ttl(63)
                .id(0x4323),
            n: 8,
            port: 53,
            bytes: 56,
        }
        .case(
            "port unreachable from a client quoting the reply of an inbound UDP flow: to the task",
        ),
        Case::uplink(
            "ICMP error whose quote ends inside the quoted IP header: dropped BAD_ICMP_ERROR",
        )
        .seed(masq_tcp(40000).seeds())
        .dropped(
            &icmp_err(
                ROUTER,
                HOST,
                FRAG_NEEDED,
                sent_tcp(40000).ip()[..12].to_vec(),
            ),
            DropReason::BadIcmpError,
        )
        .ct(masq_tcp(40000).unchanged()),
        Case::uplink("ICMP error quoting a flow that is not in CT: passed unchanged").unchanged(
            &icmp_err(ROUTER, HOST, FRAG_NEEDED, quote(&sent_tcp(40000), 8)),
            OK,
        ),
    ]
}

/// An east-west SYN from task A, whose MAC is not known yet, with A's `TASKS` entry on
/// `a_ifindex`: the test device (the one-lookup path) or another interface (the long path).
fn east_west_syn(name: &'static str, a_ifindex: u32) -> Case {
    Case::task(name)
        .seed([Seed::Task(TASK_A, a_ifindex, [0; 6], 0)])
        .unchanged(
            &from_a_tcp(40000, TASK_B, 80, TCP_SYN).addressed_to(MAC_B),
            REDIRECT,
        )
        .ct(east_west(PROTO_TCP, tu(TASK_A, 40000, TASK_B, 80)).created(40, TCP_SYN))
        .egress(IFINDEX_B, 1, 40)
        .learned(TASK_A, MAC_A)
}

fn hostile_cases() -> Vec<Case> {
    let syn = || P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN);
    let mut truncated_tcp = syn();
    truncated_tcp.l4 = L4::Raw {
        proto: PROTO_TCP,
        bytes: syn().l4.bytes(CLIENT, HOST)[..10].to_vec(),
    };
    let mut ihl4 = syn();
    ihl4.ihl_words = Some(4);
    let mut long = syn();
    long.tot_len = Some(200);
    let doff3 = syn().doff(3);
    let mut opts = syn();
    opts.opts = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
    let zero = P::udp(CLIENT, 51000, HOST, 5353, b"query: a.b.c").without_checksum();

    // One UDP datagram (8 + 24 bytes) in two fragments of 16 bytes: header + 8, then 16.
    let data = b"fragmented payload......";
    let dgram = |src, sport, dst, dport| {
        L4::Udp {
            sport,
            dport,
            data: data.to_vec(),
            zero_csum: false,
        }
        .bytes(src, dst)
    };
    let frag = |dst, bytes: &[u8], off_flags: u16| {
        let mut p = P::new(
            CLIENT,
            dst,
            L4::Raw {
                proto: PROTO_UDP,
                bytes: bytes.to_vec(),
            },
        )
        .id(0x7777);
        p.frag = off_flags;
        p
    };
    let whole = dgram(CLIENT, 51000, HOST, 5353);
    let translated = dgram(CLIENT, 51000, TASK_A, 53);
    let first = frag(HOST, &whole[..16], MF);
    let later = frag(HOST, &whole[16..], 2);
    let frag_key = FragKey {
        saddr: addr(CLIENT),
        daddr: addr(HOST),
        id: 0x7777u16.to_be(),
        proto: PROTO_UDP,
        _pad: 0,
    };
    let ports = FragPorts {
        sport: 51000u16.to_be(),
        dport: 5353u16.to_be(),
        rejected: 0,
        _pad: [0; 3],
    };
    let mut both_fragments = inbound_udp().created(36, 0);
    both_fragments[0].entry.packets = 2;
    both_fragments[0].entry.bytes = 72;

    vec![
        Case::uplink("TCP header cut after 10 bytes (tot_len agrees): dropped TRUNCATED")
            .dropped(&truncated_tcp, DropReason::Truncated),
        Case::uplink("IHL 4 (below 5): dropped BAD_IP_HEADER")
            .dropped(&ihl4, DropReason::BadIpHeader),
        Case::uplink("TCP data offset 3 (below 5): dropped BAD_TCP_OFFSET")
            .dropped(&doff3, DropReason::BadTcpOffset),
        Case::uplink("tot_len 200 on a 40-byte packet: dropped TRUNCATED")
            .dropped(&long, DropReason::Truncated),
        Case::uplink("IP options: the TCP header is found after them and translated")
            .into_task(A, &opts, opts.clone().dnat(TASK_A, 80), 48)
            .ct(inbound_tcp(HOST).created_after_options(48, 8, TCP_SYN)),
        Case::uplink("UDP without a checksum: DNATed, the checksum stays zero")
            .into_task(A, &zero, zero.clone().dnat(TASK_A, 53), 40)
            .ct(inbound_udp().created(40, 0)),
        Case::uplink(
            "first fragment translated (UDP header and all) and remembered; the later one gets \
             its addresses translated and nothing else",
        )
        .step(
            &first,
            REDIRECT,
            &frag(TASK_A, &translated[..16], MF).routed_to(MAC_A),
        )
        .step(
            &later,
            REDIRECT,
            &frag(TASK_A, &whole[16..], 2).routed_to(MAC_A),
        )
        .frag(frag_key, ports)
        .ct(both_fragments)
        .egress(IFINDEX_A, 2, 72),
        Case::uplink("later fragment without its first, to a task address: dropped FRAGMENT")
            .dropped(&frag(TASK_A, &whole[16..], 2), DropReason::Fragment),
        Case::uplink(
            "later fragment without its first, to the host: passed for the kernel to reassemble",
        )
        .unchanged(&later, OK),
    ]
}

/// What the fuzz against the model found (issue 19): a transport header that ends after the IP
/// total length (a UDP or ICMP header under 8 bytes, a TCP header shorter than its data offset
/// says) was read and rewritten, and opened a flow: bytes of the Ethernet trailer taken for
/// the rest of the header.
fn fuzz_found_cases() -> Vec<Case> {
    // `p` with only the first `n` bytes of its transport header inside the IP total length.
    let cut = |p: P, n: usize| {
        let bytes = p.l4.bytes(p.src, p.dst)[..n].to_vec();
        let proto = p.l4.proto();
        P {
            l4: L4::Raw { proto, bytes },
            ..p
        }
    };
    let syn = P::tcp(CLIENT, 51000, HOST, 8080, TCP_SYN);
    let syn_l4 = syn.l4.bytes(CLIENT, HOST);
    // A first fragment with 8 bytes of the SYN's header, the other 12 in the Ethernet trailer.
    let mut tiny = cut(syn.clone(), 8).id(0x7777);
    tiny.frag = MF;
    let mut tiny_frame = tiny.frame();
    tiny_frame.extend(&syn_l4[8..]);
    // A whole 20-byte header whose data offset says 60.
    let mut long_doff = syn.frame();
    long_doff[14 + 20 + 12] = 0xf0;
    vec![
        Case::uplink(
            "UDP header cut after 7 bytes by the total length (frame padded): dropped TRUNCATED, \
             nothing created",
        )
        .dropped(
            &cut(P::udp(CLIENT, 51000, HOST, 5353, b""), 7).padded(),
            DropReason::Truncated,
        ),
        Case::uplink(
            "TCP first fragment with 8 header bytes, the rest in the Ethernet trailer (RFC 1858): \
             dropped TRUNCATED, nothing created or remembered",
        )
        .raw_dropped(tiny_frame, DropReason::Truncated),
        Case::uplink("TCP data offset 15 on a 20-byte header: dropped TRUNCATED, nothing created")
            .raw_dropped(long_doff, DropReason::Truncated),
        Case::uplink("ICMP echo header cut after 6 bytes (frame padded): dropped TRUNCATED")
            .dropped(
                &cut(P::echo(CLIENT, HOST, 0x1234, 0), 6).padded(),
                DropReason::Truncated,
            ),
    ]
}

fn task_cases() -> Vec<Case> {
    // A SYN from A to `via`:8443, published to B:443.
    let hairpin_via = |desc, via| {
        Case::task(desc)
            .into_task(
                B,
                &from_a_tcp(40000, via, 8443, TCP_SYN),
                from_a_tcp(40000, via, 8443, TCP_SYN).dnat(TASK_B, 443),
                40,
            )
            .ct(
                hairpin(tu(TASK_A, 40000, via, 8443), tu(TASK_A, 40000, TASK_B, 443))
                    .created(40, TCP_SYN),
            )
    };
    // `p` sent from A's interface, where A's own MAC is known: dropped SPOOFED_SOURCE.
    let spoofed = |desc, p: P| {
        Case::task(desc)
            .seed([Seed::Task(TASK_A, TEST_IFINDEX, MAC_A, 0)])
            .dropped(&p, DropReason::SpoofedSource)
    };
    let inbound = inbound_tcp(HOST).seen((1, 40, TCP_SYN), (0, 0, 0));
    let ew_udp = P::udp(TASK_A, 40001, TASK_B, 53, b"query: a.b.c")
        .sent_by_task(MAC_A)
        .addressed_to(MAC_B);
    vec![
        Case::task(
            "reply of an inbound flow when the FIB does not route via the uplink: passed \
             untranslated, CT untouched",
        )
        .seed(inbound.seeds())
        .unchanged(&from_a_tcp(80, CLIENT, 51000, TCP_SYN | TCP_ACK), OK)
        .ct(inbound.unchanged()),
        Case::task("packet from an address that is not the task's own: dropped SPOOFED_SOURCE")
            .dropped(
                &P::tcp([172, 17, 0, 9], 40000, TASK_B, 80, TCP_SYN).sent_by_task(MAC_A),
                DropReason::SpoofedSource,
            ),
        // The one-lookup path of tc_task_ingress: task A's own interface is the test device, so
        // its source address alone finds it; what does not fit goes the long way, same outcome.
        east_west_syn(
            "one-lookup path: east-west SYN A -> B delivered into B unchanged, A's MAC learned",
            TEST_IFINDEX,
        ),
        spoofed(
            "one-lookup path: task B's address sent from A's interface: dropped SPOOFED_SOURCE",
            P::tcp(TASK_B, 40000, TASK_A, 80, TCP_SYN).sent_by_task(MAC_B),
        ),
        spoofed(
            "one-lookup path: A's own address from another MAC: dropped SPOOFED_SOURCE",
            P::tcp(TASK_A, 40000, TASK_B, 80, TCP_SYN).sent_by_task(MAC_B),
        )
        .learned(TASK_A, MAC_A),
        east_west_syn(
            "east-west SYN A -> B: delivered into B unchanged, KIND_EAST_WEST, A's MAC learned",
            IFINDEX_A,
        ),
        Case::task("east-west UDP A -> B: delivered into B unchanged, KIND_EAST_WEST")
            .unchanged(&ew_udp, REDIRECT)
            .ct(east_west(PROTO_UDP, tu(TASK_A, 40001, TASK_B, 53)).created(40, 0))
            .egress(IFINDEX_B, 1, 40),
        Case::task("east-west ACK without a CT entry: passed, nothing created").unchanged(
            &from_a_tcp(40000, TASK_B, 80, TCP_ACK).addressed_to(MAC_B),
            OK,
        ),
        hairpin_via(
            "hairpin A -> host:8443 published to B: DNAT to B, source kept, KIND_HAIRPIN",
            HOST,
        ),
        hairpin_via(
            "hairpin A -> bridge:8443 published to B: DNAT to B, source kept, KIND_HAIRPIN",
            BRIDGE,
        ),
        Case::task(
            "self-hairpin A -> host:8080 published to A: source becomes bridge:40000, DNAT to A",
        )
        .into_task(
            A,
            &from_a_tcp(40000, HOST, 8080, TCP_SYN),
            from_a_tcp(40000, HOST, 8080, TCP_SYN)
                .snat(BRIDGE, 40000)
                .dnat(TASK_A, 80),
            40,
        )
        .ct(
            hairpin(tu(TASK_A, 40000, HOST, 8080), tu(BRIDGE, 40000, TASK_A, 80))
                .created(40, TCP_SYN),
        ),
        Case::task("task to a host port nobody published: passed, nothing created")
            .unchanged(&from_a_tcp(40000, HOST, 8081, TCP_SYN), OK),
        Case::task(
            "new outbound flow when the FIB does not route via the uplink: passed \
             untranslated, nothing created",
        )
        .unchanged(&from_a_tcp(40000, INTERNET, 443, TCP_SYN), OK),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// One private instance of the datapath with one program loaded and the maps seeded.
struct Fixture {
    dp: Datapath,
    prog: Prog,
}

impl Fixture {
    fn new(prog: Prog, seeds: &[Seed]) -> Fixture {
        let mut dp = Datapath::load()
            .expect("the datapath object loads: does this kernel have BTF and tcx?");
        dp.set_first(MAP_CONFIG, prog.config()).unwrap();
        dp.seed(seeds).unwrap();
        dp.load_programs(&[prog.name()]).unwrap();
        // The tail-called program under test is loaded already, and calls nothing.
        if prog != Prog::NewFlowUnconfigured {
            dp.load_tail_called()
                .expect("the tail-called programs load");
        }
        Fixture { dp, prog }
    }

    /// `BPF_PROG_TEST_RUN`: (verdict, output frame).
    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        let r = self
            .dp
            .test_run(self.prog.name(), input, 1)
            .expect("BPF_PROG_TEST_RUN");
        (r.verdict, r.output)
    }

    /// Both connection tables.
    fn ct(&self) -> StdHashMap<CtKey, (Table, CtEntry)> {
        let mut all = StdHashMap::new();
        for table in Table::BOTH {
            for (k, e) in self.dp.hash::<CtKey, CtEntry>(table.map()).unwrap() {
                if let Some((other, _)) = all.insert(k, (table, e)) {
                    panic!("{} is in both {other:?} and {table:?}", show_key(&k));
                }
            }
        }
        all
    }

    fn frags(&self) -> StdHashMap<FragKey, FragPorts> {
        self.dp.hash(MAP_FRAGS).unwrap()
    }

    fn tasks(&self) -> StdHashMap<u32, TaskInfo> {
        self.dp.hash(MAP_TASKS).unwrap()
    }

    /// Nonzero drop counters, summed over CPUs.
    fn drops(&self) -> StdHashMap<DropKey, u64> {
        self.dp.drops().unwrap()
    }

    /// Nonzero STATS counters at `HOOK_TC_EGRESS` (deliveries into tasks), summed over CPUs.
    fn egress(&self) -> StdHashMap<StatsKey, (u64, u64)> {
        let mut all = self.dp.counters::<StatsKey>(MAP_STATS).unwrap();
        all.retain(|k, _| k.hook == HOOK_TC_EGRESS);
        all
    }
}

fn expected_tasks(
    seeds: &[Seed],
    learned: Option<([u8; 4], [u8; 6])>,
) -> StdHashMap<u32, TaskInfo> {
    let mut m = StdHashMap::new();
    for s in seeds {
        if let Seed::Task(a, ifindex, mac, policy) = *s {
            m.insert(
                addr(a),
                TaskInfo {
                    ifindex,
                    mac,
                    flags: 0,
                    _pad: 0,
                    policy,
                },
            );
        }
    }
    if let Some((a, mac)) = learned {
        m.get_mut(&addr(a))
            .expect("learned MAC of a seeded task")
            .mac = mac;
    }
    m
}

/// Runs one case; every mismatch is collected into the error.
fn run_case(c: &Case) -> Result<(), String> {
    let fx = Fixture::new(c.prog, &c.seeds);
    let mut errs = Vec::new();
    let t0 = coarse_ns();
    for (i, s) in c.steps.iter().enumerate() {
        let (verdict, out) = fx.run(&s.input);
        if verdict != s.verdict {
            errs.push(format!(
                "step {i}: verdict {verdict}, expected {}",
                s.verdict
            ));
        }
        if let Err(e) = compare_frames(&out, &s.output) {
            errs.push(format!("step {i}: output frame: {e}"));
        }
        if s.well_formed
            && let Err(e) = verify_checksums(&out)
        {
            errs.push(format!("step {i}: output checksums: {e}"));
        }
    }
    let t1 = now_ns();
    if let Err(e) = check_ct(fx.ct(), &c.ct, t0, t1) {
        errs.push(e);
    }
    let frags = fx.frags();
    let want_frags: StdHashMap<FragKey, FragPorts> = c.frags.iter().copied().collect();
    if frags != want_frags {
        errs.push(format!("FRAGS: got {frags:?}, want {want_frags:?}"));
    }
    let drops = fx.drops();
    let want_drops: StdHashMap<DropKey, u64> = c
        .drop
        .map(|r| {
            (
                DropKey {
                    ifindex: TEST_IFINDEX,
                    reason: r as u8,
                    hook: HOOK_TC_INGRESS,
                    _pad: [0; 2],
                },
                1,
            )
        })
        .into_iter()
        .collect();
    if drops != want_drops {
        errs.push(format!("DROPS: got {drops:?}, want {want_drops:?}"));
    }
    let egress = fx.egress();
    let want_egress: StdHashMap<StatsKey, (u64, u64)> = c
        .egress
        .map(|(ifindex, packets, bytes)| {
            (
                StatsKey {
                    ifindex,
                    hook: HOOK_TC_EGRESS,
                    class: CLASS_IPV4,
                    _pad: [0; 2],
                },
                (packets, bytes),
            )
        })
        .into_iter()
        .collect();
    if egress != want_egress {
        errs.push(format!(
            "STATS at tc egress (deliveries into tasks): got {egress:?}, want {want_egress:?}"
        ));
    }
    let tasks = fx.tasks();
    let want_tasks = expected_tasks(&c.seeds, c.learned);
    if tasks != want_tasks {
        errs.push(format!("TASKS: got {tasks:?}, want {want_tasks:?}"));
    }
    case_result(&errs)
}

/// Runs every case of a group and fails with all failing cases listed.
fn run_group(group: &str, cases: &[Case]) {
    require_test_host();
    run_table(
        group,
        cases,
        |c| format!("[{}] {}", c.prog.name(), c.desc),
        run_case,
    );
}

/// One test per group of cases, each running its group with `run_group`.
macro_rules! group_tests {
    ($($test:ident: $group:literal => $cases:ident;)*) => {
        $(
            #[test]
            fn $test() {
                run_group($group, &$cases());
            }
        )*
    };
}

group_tests! {
    uplink_ingress_published_ports_and_masquerade_replies: "uplink ingress" => uplink_cases;
    uplink_ingress_icmp_errors: "ICMP errors" => icmp_cases;
    frames_around_the_checks_bad_headers_and_out_of_window_closes: "issue 16 guards" => guard_cases;
    uplink_ingress_hostile_packets: "hostile packets" => hostile_cases;
    task_ingress_east_west_hairpin_and_replies: "task ingress" => task_cases;
    uplink_ingress_transport_headers_cut_by_the_total_length: "issue 19 fuzz findings" => fuzz_found_cases;
}

/// Self-hairpin when the reply tuple with the task's own source port is taken: the datapath
/// picks a free port at random, so the expected frame is built from the port in CT.
#[test]
fn self_hairpin_with_its_source_port_taken_picks_a_free_port() {
    require_test_host();
    // Another flow already owns A:80 <- bridge:40000.
    let taken = hairpin(
        tu(TASK_A, 40000, [10, 10, 0, 9], 8080),
        tu(BRIDGE, 40000, TASK_A, 80),
    )
    .seen((1, 40, TCP_SYN), (0, 0, 0));
    let fx = Fixture::new(Prog::Task, &with(task_world(), taken.seeds()));
    let syn = from_a_tcp(40000, HOST, 8080, TCP_SYN);
    let t0 = coarse_ns();
    let (verdict, out) = fx.run(&syn.frame());
    let t1 = now_ns();
    assert_eq!(verdict, REDIRECT, "verdict");

    let orig_key = ct_key(PROTO_TCP, tu(TASK_A, 40000, HOST, 8080));
    let ct = fx.ct();
    let orig = ct
        .get(&orig_key)
        .unwrap_or_else(|| panic!("no CT entry for the new flow; CT: {ct:?}"));
    let port = u16::from_be(orig.1.nat_sport);
    assert!(
        port >= 1024 && port != 40000,
        "chosen port {port}: must be a free port of 1024..=65535"
    );
    let flow = hairpin(tu(TASK_A, 40000, HOST, 8080), tu(BRIDGE, port, TASK_A, 80));
    let mut exp = taken.unchanged();
    exp.extend(flow.created(40, TCP_SYN));
    if let Err(e) = check_ct(ct, &exp, t0, t1) {
        panic!("{e}");
    }
    let want = syn.snat(BRIDGE, port).dnat(TASK_A, 80).routed_to(MAC_A);
    if let Err(e) = compare_frames(&out, &want.frame()) {
        panic!("output frame: {e}");
    }
    verify_checksums(&out).unwrap();
}
