//! The connection table: one entry per direction of a flow, keyed by the tuple of the packets as
//! they reach ecsnet (before translation), holding what to rewrite them to. The datapath creates
//! entries and refreshes them; the agent expires them with the timeouts below.

/// The protocols the table tracks, and the TCP flags it follows (defined in [`crate::net`]).
pub use crate::net::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// [`CtEntry::kind`]: task to task on this host, no translation.
pub const KIND_EAST_WEST: u8 = 1;
/// [`CtEntry::kind`]: a client outside to a published port (DNAT).
pub const KIND_INBOUND: u8 = 2;
/// [`CtEntry::kind`]: a task to the outside (SNAT to the uplink address).
pub const KIND_MASQUERADE: u8 = 3;
/// [`CtEntry::kind`]: a task to a published port on a host address (DNAT, and SNAT to the
/// bridge address when the task reaches itself).
pub const KIND_HAIRPIN: u8 = 4;
/// [`CtEntry::kind`]: a flow of a task with a policy that the kernel carries (to or from the
/// host itself, the metadata endpoints, ...), tracked only so its replies pass the policy.
pub const KIND_LOCAL: u8 = 5;

/// [`CtEntry::dir`]: the direction of the packet that created the flow.
pub const DIR_ORIGINAL: u8 = 0;
/// [`CtEntry::dir`]: the answering direction.
pub const DIR_REPLY: u8 = 1;

/// A packet's tuple before translation. Addresses and ports in network byte order. For ICMP
/// echo the identifier stands in for a port: `sport` in a request, `dport` in a reply, so that
/// a reply's key is the request's with both sides swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
map_type!(CtKey, 16);

impl CtKey {
    /// The key of packets going the other way.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// [`CtKey`] of an IPv6 packet (`CT6`, `CT6_NEW`): the addresses are the packet's 16 bytes,
/// ports and `ICMPv6` echo identifiers as in [`CtKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
map_type!(CtKey6, 40);

impl CtKey6 {
    /// The key of packets going the other way.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> CtKey6 {
        CtKey6 {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// One direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// The key of the other direction, so both go together.
    pub peer: CtKey,
    /// What packets with this key are rewritten to (equal to the key's fields when untouched).
    pub nat_saddr: u32,
    pub nat_daddr: u32,
    pub nat_sport: u16,
    pub nat_dport: u16,
    /// TCP, once this direction sent its SYN: the sequence number after the last one it sent
    /// (host byte order; SYN and FIN count one).
    pub tcp_end: u32,
    /// When the last packet in this direction passed, ns: the datapath's coarse clock
    /// (`bpf_ktime_get_coarse_ns()`, `CLOCK_MONOTONIC` at tick resolution).
    pub last_seen_ns: u64,
    /// Packets and IP bytes in this direction.
    pub packets: u64,
    pub bytes: u64,
    /// When the flow was created (both directions carry it), ns, the same clock.
    pub created_ns: u64,
    /// TCP, once this direction sent an ACK: the highest sequence number it acknowledged
    /// (host byte order): where the other direction's next segment must start.
    pub tcp_ack: u32,
    /// `KIND_*`.
    pub kind: u8,
    /// `DIR_*`.
    pub dir: u8,
    /// OR of the TCP flags seen in this direction (RST and FIN only when they counted).
    pub tcp_flags: u8,
    pub _pad: u8,
}
map_type!(CtEntry, 72);

/// [`CtEntry`] of an IPv6 flow: the same fields, with 16-byte addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry6 {
    pub peer: CtKey6,
    pub nat_saddr: [u8; 16],
    pub nat_daddr: [u8; 16],
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub tcp_end: u32,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    pub created_ns: u64,
    pub tcp_ack: u32,
    pub kind: u8,
    pub dir: u8,
    pub tcp_flags: u8,
    /// `CT6_*` flags.
    pub flags: u8,
}
map_type!(CtEntry6, 120);

/// [`CtEntry6::flags`], on the original direction of a `KIND_LOCAL` flow a policed task opened
/// towards an address the datapath could not tell was a task's (a link-local address, or an
/// address of a task ecsnet was not told): only the sender's egress rules judged it. A policed
/// task that receives it judges its first packet by its own ingress rules, and clears the flag
/// when they allow it.
pub const CT6_RECEIVER_UNCHECKED: u8 = 1;

impl CtEntry6 {
    /// This direction's TCP sequence state.
    #[inline(always)]
    pub const fn tcp(&self) -> TcpSide {
        TcpSide {
            end: self.tcp_end,
            ack: self.tcp_ack,
            flags: self.tcp_flags,
            dir: self.dir,
        }
    }
}

/// One direction's TCP sequence state, as kept in its [`CtEntry`]: what the datapath reads and
/// writes for a segment, small enough to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSide {
    /// [`CtEntry::tcp_end`].
    pub end: u32,
    /// [`CtEntry::tcp_ack`].
    pub ack: u32,
    /// [`CtEntry::tcp_flags`].
    pub flags: u8,
    /// [`CtEntry::dir`].
    pub dir: u8,
}

impl CtEntry {
    /// This direction's TCP sequence state.
    #[inline(always)]
    pub const fn tcp(&self) -> TcpSide {
        TcpSide {
            end: self.tcp_end,
            ack: self.tcp_ack,
            flags: self.tcp_flags,
            dir: self.dir,
        }
    }
}

/// Whether a flow in the unanswered table ([`crate::maps::MAP_CT_NEW`]) has earned its place
/// in the table that is never evicted: a TCP handshake completed (the opener acknowledged the
/// answer's SYN-ACK), or a UDP or ICMP flow that was answered and is still alive
/// [`ASSURED_AFTER_NS`] after it started, as netfilter assures a UDP stream. A spoofed source
/// never completes a handshake and never keeps a flow alive with replies it cannot see.
/// `original_flags` and `reply_flags` are the two directions' TCP flags, `reply_packets` the
/// answers so far, `created_ns` when the flow started.
pub const fn assured(
    proto: u8,
    original_flags: u8,
    reply_flags: u8,
    reply_packets: u64,
    created_ns: u64,
    now_ns: u64,
) -> bool {
    match proto {
        PROTO_TCP => {
            reply_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
                && original_flags & TCP_ACK != 0
                && (original_flags | reply_flags) & TCP_RST == 0
        }
        _ => reply_packets > 0 && now_ns.saturating_sub(created_ns) >= ASSURED_AFTER_NS,
    }
}

/// Records a TCP segment that counts (see [`tcp_close_counts`]) on its direction's entry: its
/// flags, how far it reaches and what it acknowledges. Returns true when it is a SYN that
/// starts a finished or reset flow over on the same tuple: the other direction then starts
/// over too (its flags cleared).
pub const fn record_tcp(e: &mut TcpSide, flags: u8, seq: u32, ack: u32, payload: u32) -> bool {
    let flags = flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST);
    let restart = flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && e.flags & (TCP_FIN | TCP_RST) != 0
        && e.dir == DIR_ORIGINAL;
    if restart {
        e.flags = 0;
    }
    let mut end = seq.wrapping_add(payload);
    if flags & TCP_SYN != 0 {
        end = end.wrapping_add(1);
    }
    if flags & TCP_FIN != 0 {
        end = end.wrapping_add(1);
    }
    if e.flags & TCP_SYN == 0 || seq_after(end, e.end) {
        e.end = end;
    }
    if flags & TCP_ACK != 0 && (e.flags & TCP_ACK == 0 || seq_after(ack, e.ack)) {
        e.ack = ack;
    }
    e.flags |= flags;
    restart
}

/// How long an answered UDP or ICMP flow must live before it is assured, ns.
pub const ASSURED_AFTER_NS: u64 = 2_000_000_000;

/// `after(a, b)` of TCP: sequence number `a` comes later than `b`, modulo 2^32.
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    a.wrapping_sub(b).cast_signed() > 0
}

/// How far past its sender's recorded end a FIN may start, bytes: two full-size GSO segments.
///
/// A sender's segments do not all leave from one CPU: the ones a write sends leave from the
/// writer's, the ones an incoming ACK releases from the CPU that took the ACK. On a veth both
/// reach the datapath at the same time, so the FIN that ends a stream can be judged while the
/// last data segment before it is still being recorded on the other CPU (or while that CPU
/// writes back an older end). The sender's recorded end then lags the FIN's sequence number by
/// the segments in flight there, 64 KiB each at most. netfilter accepts a segment anywhere in
/// the receiver's window; this is narrower, and a blind attacker's FIN still lands in it with
/// a chance of 2^17 in 2^32.
pub const FIN_OVERTAKE: u32 = 2 * 65_536;

/// What the connection table makes of a TCP RST or FIN, from the two directions' entries
/// before the segment counts. A blind attacker does not know where either side is in its
/// sequence space; a real endpoint does.
/// - A RST counts when its sequence number is exactly where its sender is (`sender.tcp_end`)
///   or where the receiver expects it (`receiver.tcp_ack`), as RFC 5961 and netfilter accept a
///   reset; or, from a side that never sent a SYN (the answer to one), when it acknowledges
///   that SYN (RFC 793).
/// - A FIN counts when it starts no later than [`FIN_OVERTAKE`] past what its sender has sent
///   and ends no earlier than the receiver has acknowledged (a retransmission of an
///   acknowledged FIN included).
///
/// `seq` and `ack` in host byte order.
pub const fn tcp_close_counts(
    flags: u8,
    seq: u32,
    ack: u32,
    payload: u32,
    sender: &TcpSide,
    receiver: &TcpSide,
) -> bool {
    let sender_started = sender.flags & TCP_SYN != 0;
    let receiver_acked = receiver.flags & TCP_ACK != 0;
    if flags & TCP_RST != 0 {
        if !sender_started {
            return flags & TCP_ACK != 0 && receiver.flags & TCP_SYN != 0 && ack == receiver.end;
        }
        return seq == sender.end || (receiver_acked && seq == receiver.ack);
    }
    // FIN.
    if !sender_started || seq_after(seq, sender.end.wrapping_add(FIN_OVERTAKE)) {
        return false;
    }
    let end = seq.wrapping_add(payload).wrapping_add(1);
    !receiver_acked || !seq_after(receiver.ack, end)
}

/// What a flow is waiting for, which decides how long it may stay idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// TCP: a SYN and no handshake completed yet (nothing back, or a SYN-ACK the opener has
    /// not acknowledged).
    SynSent,
    /// TCP: both sides have spoken.
    Established,
    /// TCP: a FIN was seen; the connection is closing.
    Closing,
    /// TCP: a reset was seen.
    Reset,
    /// UDP, either way.
    Udp,
    /// ICMP echo.
    Icmp,
}

/// Idle timeouts in seconds, per state; what `ecsnet up --ct-timeouts` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    pub tcp_closing: u64,
    pub tcp_reset: u64,
    pub udp: u64,
    pub icmp: u64,
}

impl Default for Timeouts {
    /// Close to Cilium's and netfilter's defaults, shortened where a dead flow only holds a slot.
    fn default() -> Self {
        Timeouts {
            tcp_syn: 60,
            tcp_established: 21_600,
            tcp_closing: 30,
            tcp_reset: 10,
            udp: 60,
            icmp: 30,
        }
    }
}

impl Timeouts {
    /// The idle timeout of a flow in `state`, seconds.
    pub const fn of(&self, state: CtState) -> u64 {
        match state {
            CtState::SynSent => self.tcp_syn,
            CtState::Established => self.tcp_established,
            CtState::Closing => self.tcp_closing,
            CtState::Reset => self.tcp_reset,
            CtState::Udp => self.udp,
            CtState::Icmp => self.icmp,
        }
    }
}

/// The state of a flow from its two directions' entries.
pub const fn state(proto: u8, original: &CtEntry, reply: &CtEntry) -> CtState {
    match proto {
        PROTO_TCP => {
            let seen = original.tcp_flags | reply.tcp_flags;
            if seen & TCP_RST != 0 {
                CtState::Reset
            } else if seen & TCP_FIN != 0 {
                CtState::Closing
            } else if reply.tcp_flags & TCP_ACK != 0 && original.tcp_flags & TCP_ACK != 0 {
                CtState::Established
            } else {
                // No answer yet, or answered and not acknowledged by the opener (SYN-RECV): a
                // spoofed SYN's flow stays here, with the short timeout.
                CtState::SynSent
            }
        }
        PROTO_ICMP => CtState::Icmp,
        _ => CtState::Udp,
    }
}

/// Whether a flow has been idle longer than its state allows at `now_ns`.
pub const fn expired(
    proto: u8,
    original: &CtEntry,
    reply: &CtEntry,
    timeouts: &Timeouts,
    now_ns: u64,
) -> bool {
    let last = if original.last_seen_ns > reply.last_seen_ns {
        original.last_seen_ns
    } else {
        reply.last_seen_ns
    };
    let limit = timeouts.of(state(proto, original, reply)) * 1_000_000_000;
    now_ns.saturating_sub(last) > limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(flags: u8, last: u64) -> CtEntry {
        CtEntry {
            tcp_flags: flags,
            last_seen_ns: last,
            ..Default::default()
        }
    }

    #[test]
    fn tcp_states_follow_the_flags_of_both_sides() {
        let syn = entry(TCP_SYN, 0);
        assert_eq!(state(PROTO_TCP, &syn, &entry(0, 0)), CtState::SynSent);
        let synack = entry(TCP_SYN | TCP_ACK, 0);
        // Answered, not yet acknowledged by the opener (a spoofed SYN stays here).
        assert_eq!(state(PROTO_TCP, &syn, &synack), CtState::SynSent);
        let acked = entry(TCP_SYN | TCP_ACK, 0);
        assert_eq!(state(PROTO_TCP, &acked, &synack), CtState::Established);
        let fin = entry(TCP_SYN | TCP_ACK | TCP_FIN, 0);
        assert_eq!(state(PROTO_TCP, &fin, &synack), CtState::Closing);
        assert_eq!(state(PROTO_TCP, &syn, &entry(TCP_RST, 0)), CtState::Reset);
        assert_eq!(state(PROTO_UDP, &syn, &synack), CtState::Udp);
        assert_eq!(state(PROTO_ICMP, &syn, &synack), CtState::Icmp);
    }

    #[test]
    fn expiry_uses_the_later_side_and_the_state_timeout() {
        let t = Timeouts::default();
        let s = 1_000_000_000u64;
        // An established flow that one side used a second ago is alive for hours.
        let a = entry(TCP_SYN | TCP_ACK, 10 * s);
        let b = entry(TCP_SYN | TCP_ACK, 100 * s);
        assert!(!expired(PROTO_TCP, &a, &b, &t, 101 * s));
        assert!(expired(PROTO_TCP, &a, &b, &t, (100 + 21_601) * s));
        // A SYN nobody answered goes after a minute.
        let syn = entry(TCP_SYN, 0);
        assert!(!expired(PROTO_TCP, &syn, &entry(0, 0), &t, 60 * s));
        assert!(expired(PROTO_TCP, &syn, &entry(0, 0), &t, 61 * s));
        // UDP with only one direction, last seen at `last`, at 100 s.
        let udp_expired = |last| expired(PROTO_UDP, &entry(0, last), &entry(0, 0), &t, 100 * s);
        // It still counts from its latest packet.
        assert!(!udp_expired(50 * s));
        // The clock going backwards (a fresh entry read before `now`) is never expired.
        assert!(!udp_expired(200 * s));
    }

    fn tcp(flags: u8, end: u32, ack: u32) -> TcpSide {
        TcpSide {
            flags,
            end,
            ack,
            dir: DIR_ORIGINAL,
        }
    }

    #[test]
    fn a_reset_counts_only_at_the_exact_sequence_number() {
        // A sent up to 1000 and B acknowledged all of it; B sent up to 5000, A acked 4000.
        let a = tcp(TCP_SYN | TCP_ACK, 1000, 4000);
        let b = tcp(TCP_SYN | TCP_ACK, 5000, 1000);
        let rst = |seq| tcp_close_counts(TCP_RST, seq, 0, 0, &a, &b);
        assert!(rst(1000));
        assert!(!rst(1001));
        assert!(!rst(999));
        assert!(!rst(1000 + 65535));
        // From B: where B is (5000), or where A expects B (4000).
        assert!(tcp_close_counts(TCP_RST, 5000, 0, 0, &b, &a));
        assert!(tcp_close_counts(TCP_RST, 4000, 0, 0, &b, &a));
        assert!(!tcp_close_counts(TCP_RST, 4500, 0, 0, &b, &a));
        // Sequence numbers wrap.
        let a = tcp(TCP_SYN | TCP_ACK, 3, 0);
        assert!(tcp_close_counts(TCP_RST, 3, 0, 0, &a, &b));
    }

    #[test]
    fn a_refusal_counts_when_it_acknowledges_the_syn() {
        let syn = tcp(TCP_SYN, 101, 0);
        let silent = TcpSide::default();
        let refuse = |flags, ack| tcp_close_counts(flags, 0, ack, 0, &silent, &syn);
        assert!(refuse(TCP_RST | TCP_ACK, 101));
        assert!(!refuse(TCP_RST | TCP_ACK, 100));
        assert!(!refuse(TCP_RST, 101));
    }

    #[test]
    fn a_fin_counts_within_what_was_sent_and_acknowledged() {
        let a = tcp(TCP_SYN | TCP_ACK, 1000, 4000);
        let b = tcp(TCP_SYN | TCP_ACK, 5000, 900);
        let fin = |seq, len| tcp_close_counts(TCP_FIN | TCP_ACK, seq, 0, len, &a, &b);
        assert!(fin(1000, 0));
        // With data, starting inside what A sent.
        assert!(fin(950, 50));
        // A retransmission of a FIN B acknowledged already (B acked 1001).
        let b_acked = tcp(TCP_SYN | TCP_ACK, 5000, 1001);
        assert!(tcp_close_counts(TCP_FIN, 1000, 0, 0, &a, &b_acked));
        // Ahead of what A's entry records, by segments another CPU has not recorded yet.
        assert!(fin(1001, 0));
        assert!(fin(1000 + FIN_OVERTAKE, 0));
        // Further beyond what A sent, or entirely before what B acknowledged.
        assert!(!fin(1001 + FIN_OVERTAKE, 0));
        assert!(!fin(800, 50));
        assert!(!fin(1000 + (1 << 31), 0));
    }

    #[test]
    fn segments_move_the_end_and_the_ack_forward_only() {
        let mut e = TcpSide::default();
        assert!(!record_tcp(&mut e, TCP_SYN, 100, 0, 0));
        assert_eq!((e.end, e.flags), (101, TCP_SYN));
        record_tcp(&mut e, TCP_ACK, 101, 7, 50);
        assert_eq!((e.end, e.ack), (151, 7));
        // A retransmission and an old ACK move nothing back.
        record_tcp(&mut e, TCP_ACK, 101, 5, 20);
        assert_eq!((e.end, e.ack), (151, 7));
        record_tcp(&mut e, TCP_ACK | TCP_FIN, 151, 9, 0);
        assert_eq!((e.end, e.ack), (152, 9));
        // Across the wrap.
        let mut w = TcpSide::default();
        record_tcp(&mut w, TCP_SYN, u32::MAX - 1, 0, 0);
        record_tcp(&mut w, TCP_ACK, u32::MAX, 0, 10);
        assert_eq!(w.end, 9);
        // A new SYN on a finished flow starts it over; not on the answering side.
        assert!(record_tcp(&mut e, TCP_SYN, 9000, 0, 0));
        assert_eq!((e.end, e.flags), (9001, TCP_SYN));
        let mut r = TcpSide {
            dir: DIR_REPLY,
            ..tcp(TCP_SYN | TCP_ACK | TCP_FIN, 5, 5)
        };
        assert!(!record_tcp(&mut r, TCP_SYN, 9000, 0, 0));
    }

    #[test]
    fn assured_after_a_handshake_or_an_answered_lasting_stream() {
        let s = 1_000_000_000u64;
        let (syn, synack) = (TCP_SYN, TCP_SYN | TCP_ACK);
        // SYN and SYN-ACK: not yet; the opener's ACK completes the handshake.
        assert!(!assured(PROTO_TCP, syn, synack, 1, 0, 0));
        assert!(assured(PROTO_TCP, syn | TCP_ACK, synack, 1, 0, 0));
        assert!(!assured(
            PROTO_TCP,
            syn | TCP_ACK,
            synack | TCP_RST,
            1,
            0,
            0
        ));
        // A SYN-ACK alone never assures (spoofed SYNs get answered).
        assert!(!assured(PROTO_TCP, TCP_ACK, TCP_ACK, 1, 0, 0));
        // UDP and ICMP: answered and still alive two seconds after the start.
        assert!(!assured(PROTO_UDP, 0, 0, 0, 10 * s, 20 * s));
        assert!(!assured(PROTO_UDP, 0, 0, 1, 10 * s, 11 * s));
        assert!(assured(PROTO_UDP, 0, 0, 1, 10 * s, 12 * s));
        assert!(assured(PROTO_ICMP, 0, 0, 1, 10 * s, 12 * s));
    }

    #[test]
    fn reversed_swaps_both_sides() {
        let k = CtKey {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let r = k.reversed();
        assert_eq!((r.saddr, r.daddr, r.sport, r.dport), (2, 1, 4, 3));
        assert_eq!(r.reversed(), k);
    }
}
