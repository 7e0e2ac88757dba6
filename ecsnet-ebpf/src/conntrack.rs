//! The connection table in BPF: look up the entry of a packet's tuple, refresh it, and create
//! both directions of a new flow, choosing a free source port when the flow is source-NATed.
//! Entries are only created here and only expired by the agent; a full table refuses new flows.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use ecsnet_common::{
    DropReason,
    ct::{CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    maps::{FragKey, FragPorts},
};

use crate::{
    clock,
    maps::{CT, FRAGS},
    parse::{FRAG_FIRST, FRAG_LATER, Flow, ICMP_ECHO, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
};

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i64 = 17;
/// Source ports tried at random after the original one is taken, before giving up.
const PORT_TRIES: u32 = 16;
/// Ports chosen for source NAT: the range Linux masquerade uses for ports above 1023.
const NAT_PORT_MIN: u32 = 1024;
const NAT_PORT_SPAN: u32 = 65536 - NAT_PORT_MIN;

/// What the packets of one direction are rewritten to (network byte order).
#[derive(Clone, Copy)]
pub struct Nat {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// The table key of `f`, or None for protocols the table does not track.
#[inline(always)]
pub fn key_of(f: &Flow) -> Option<CtKey> {
    match f.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP => Some(CtKey {
            saddr: f.saddr,
            daddr: f.daddr,
            sport: f.sport,
            dport: f.dport,
            proto: f.proto,
            _pad: [0; 3],
        }),
        _ => None,
    }
}

/// What the fragment bookkeeping says of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not a later fragment, or one whose first fragment is on record: its ports are filled in.
    Known,
    /// A later fragment with no first fragment on record.
    Unknown,
    /// A later fragment of a datagram whose first fragment policy rejected.
    Rejected,
}

#[inline(always)]
fn frag_key(f: &Flow) -> FragKey {
    FragKey {
        saddr: f.saddr,
        daddr: f.daddr,
        id: f.ip_id,
        proto: f.proto,
        _pad: 0,
    }
}

/// Fills the ports of a later fragment from its first fragment, or remembers the ports of a
/// first fragment.
#[inline(always)]
pub fn track_fragment(f: &mut Flow) -> Fragment {
    let key = frag_key(f);
    if f.frag == FRAG_FIRST {
        let ports = FragPorts {
            sport: f.sport,
            dport: f.dport,
            rejected: 0,
            _pad: [0; 3],
        };
        // An LRU map: a full one forgets the oldest datagram, never fails.
        let _ = FRAGS.insert(&key, &ports, BPF_ANY);
        return Fragment::Known;
    }
    if f.frag != FRAG_LATER {
        return Fragment::Known;
    }
    match unsafe { FRAGS.get(&key) } {
        Some(p) if p.rejected != 0 => Fragment::Rejected,
        Some(p) => {
            f.sport = p.sport;
            f.dport = p.dport;
            Fragment::Known
        }
        None => Fragment::Unknown,
    }
}

/// Marks the datagram of first fragment `f` as rejected, so its later fragments are dropped
/// rather than handed to a kernel that would hold them for reassembly.
#[inline(always)]
pub fn reject_fragments(f: &Flow) {
    if f.frag != FRAG_FIRST {
        return;
    }
    if let Some(p) = FRAGS.get_ptr_mut(&frag_key(f)) {
        // SAFETY: an LRU value pointer, valid for this program run.
        unsafe { (*p).rejected = 1 };
    }
}

/// Whether `f` may open a new flow: a TCP SYN, any UDP datagram, an ICMP echo request. Packets
/// in the middle of a flow ecsnet did not see start stay on the kernel's path.
#[inline(always)]
pub fn starts_flow(f: &Flow) -> bool {
    if f.frag == FRAG_LATER {
        return false;
    }
    match f.proto {
        IPPROTO_TCP => f.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
        IPPROTO_UDP => true,
        IPPROTO_ICMP => f.icmp_type == ICMP_ECHO,
        _ => false,
    }
}

/// The entry of `key`.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CT.get_ptr_mut(key)
}

/// Records a packet of `bytes` IP bytes on its entry. A new SYN on a closed TCP flow with the
/// same tuple starts the flow's state over.
#[inline(always)]
pub fn touch(e: *mut CtEntry, f: &Flow, bytes: u64) {
    // SAFETY: `e` points into the CT map (no-prealloc entries live until an RCU grace period
    // after deletion); concurrent updates of these counters may lose an increment, not memory.
    unsafe {
        (*e).last_seen_ns = clock::now();
        (*e).packets += 1;
        (*e).bytes += bytes;
        if f.proto == IPPROTO_TCP {
            let syn_only = f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if syn_only && (*e).tcp_flags & (TCP_FIN | TCP_RST) != 0 && (*e).dir == DIR_ORIGINAL {
                (*e).tcp_flags = TCP_SYN;
                if let Some(p) = CT.get_ptr_mut(&(*e).peer) {
                    (*p).tcp_flags = 0;
                }
            } else {
                (*e).tcp_flags |= f.tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST);
            }
        }
    }
}

/// Creates both directions of a new flow for packets `key` rewritten to `nat`. With
/// `choose_sport`, `nat.sport` is kept when no other flow uses it towards the same destination
/// and replaced by a free random port otherwise. Returns the rewrite actually chosen.
#[inline(always)]
pub fn create(
    key: &CtKey,
    mut nat: Nat,
    kind: u8,
    choose_sport: bool,
    f: &Flow,
    bytes: u64,
) -> Result<Nat, DropReason> {
    let now = clock::now();
    let mut reply_key = CtKey {
        saddr: nat.daddr,
        daddr: nat.saddr,
        sport: nat.dport,
        dport: nat.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    let reply = CtEntry {
        peer: *key,
        nat_saddr: key.daddr,
        nat_daddr: key.saddr,
        nat_sport: key.dport,
        nat_dport: key.sport,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        kind,
        dir: DIR_REPLY,
        tcp_flags: 0,
        _pad: [0; 5],
    };
    let tries = if choose_sport { PORT_TRIES + 1 } else { 1 };
    let start = unsafe { bpf_get_prandom_u32() };
    let mut placed = false;
    for i in 0..tries {
        if i > 0 {
            let port = (NAT_PORT_MIN + (start.wrapping_add(i * 7919)) % NAT_PORT_SPAN) as u16;
            nat.sport = port.to_be();
            reply_key.dport = nat.sport;
        }
        match CT.insert(&reply_key, &reply, BPF_NOEXIST) {
            Ok(()) => {
                placed = true;
                break;
            }
            Err(e) if -(e as i64) == EEXIST => continue,
            Err(_) => return Err(DropReason::CtTableFull),
        }
    }
    if !placed {
        return Err(if choose_sport {
            DropReason::NatPortsExhausted
        } else {
            DropReason::NatCollision
        });
    }
    let original = CtEntry {
        peer: reply_key,
        nat_saddr: nat.saddr,
        nat_daddr: nat.daddr,
        nat_sport: nat.sport,
        nat_dport: nat.dport,
        last_seen_ns: now,
        packets: 1,
        bytes,
        kind,
        dir: DIR_ORIGINAL,
        tcp_flags: if f.proto == IPPROTO_TCP {
            f.tcp_flags
        } else {
            0
        },
        _pad: [0; 5],
    };
    if let Err(e) = CT.insert(key, &original, BPF_NOEXIST) {
        let _ = CT.remove(&reply_key);
        return Err(if -(e as i64) == EEXIST {
            // Another CPU created this flow a moment ago for a copy of this packet.
            DropReason::NatCollision
        } else {
            DropReason::CtTableFull
        });
    }
    Ok(nat)
}
