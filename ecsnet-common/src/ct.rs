//! The connection table: one entry per direction of a flow, keyed by the tuple of the packets as
//! they reach ecsnet (before translation), holding what to rewrite them to. The datapath creates
//! entries and refreshes them; the agent expires them with the timeouts below.

use core::mem::size_of;

/// IP protocol numbers the table tracks.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// TCP flag bits as in the header's flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

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
const _: () = assert!(size_of::<CtKey>() == 16);

impl CtKey {
    /// The key of packets going the other way.
    #[inline(always)]
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
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet in this direction, ns.
    pub last_seen_ns: u64,
    /// Packets and IP bytes in this direction.
    pub packets: u64,
    pub bytes: u64,
    /// `KIND_*`.
    pub kind: u8,
    /// `DIR_*`.
    pub dir: u8,
    /// OR of the TCP flags seen in this direction.
    pub tcp_flags: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<CtEntry>() == 64);

/// What a flow is waiting for, which decides how long it may stay idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// TCP: a SYN and nothing back yet.
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
            } else if reply.tcp_flags & TCP_ACK != 0 {
                CtState::Established
            } else {
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
        assert_eq!(state(PROTO_TCP, &syn, &synack), CtState::Established);
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
        // UDP with only one direction still counts from its latest packet.
        assert!(!expired(
            PROTO_UDP,
            &entry(0, 50 * s),
            &entry(0, 0),
            &t,
            100 * s
        ));
        // The clock going backwards (a fresh entry read before `now`) is never expired.
        assert!(!expired(
            PROTO_UDP,
            &entry(0, 200 * s),
            &entry(0, 0),
            &t,
            100 * s
        ));
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
