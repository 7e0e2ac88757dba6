//! The connection tables in BPF: look up the entry of a packet's tuple, refresh it, and create
//! both directions of a new flow, choosing a free source port when the flow is source-NATed.
//! A new flow starts in `CT_NEW` (LRU: a flood of flows nobody answers evicts its own kind) and
//! moves to `CT` once assured (`ct::assured`); `CT` is never evicted from, and the agent
//! expires both. TCP RSTs and FINs change a flow only when they fit its sequence numbers.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use ecsnet_common::{
    DropReason,
    ct::{
        self, ASSURED_AFTER_NS, CtEntry, CtKey, DIR_ORIGINAL, DIR_REPLY, KIND_MASQUERADE, TcpSide,
    },
    maps::{
        CT_EV_ASSURED, CT_EV_CREATED, CT_EV_CT_FULL, FragKey, FragPorts, NAT_PORT_MIN,
        NAT_PORT_SPAN,
    },
    net::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    clock,
    maps::{CT, CT_EVENTS, CT_NEW, FRAGS},
    nat_quota,
    parse::{FRAG_FIRST, FRAG_LATER, Headers, ICMP_ECHO},
};

/// The map insert flags, as the helpers take them.
const ANY: u64 = BPF_ANY as u64;
const NOEXIST: u64 = BPF_NOEXIST as u64;
/// What a map insert returns, negated, when the key exists (`EEXIST` of errno.h).
pub const EEXIST: i64 = 17;
/// Source ports tried at random after the original one is taken, before giving up: each one
/// drawn afresh from the whole range, so that with half the ports towards a destination taken
/// a new flow still fails only once in `2^PORT_TRIES`.
const PORT_TRIES: u32 = 16;

/// What the packets of one direction are rewritten to (network byte order).
#[derive(Clone, Copy)]
pub struct Nat {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// The table key of `h`, or None for protocols the table does not track.
#[inline(always)]
pub fn key_of(h: &Headers) -> Option<CtKey> {
    match h.proto {
        PROTO_TCP | PROTO_UDP | PROTO_ICMP => Some(CtKey {
            saddr: h.saddr,
            daddr: h.daddr,
            sport: h.sport,
            dport: h.dport,
            proto: h.proto,
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
fn frag_key(h: &Headers) -> FragKey {
    FragKey {
        saddr: h.saddr,
        daddr: h.daddr,
        id: h.ip_id,
        proto: h.proto,
        _pad: 0,
    }
}

/// Fills the ports of a later fragment from its first fragment, or remembers the ports of a
/// first fragment.
#[inline(always)]
pub fn track_fragment(h: &mut Headers) -> Fragment {
    let key = frag_key(h);
    if h.frag == FRAG_FIRST {
        let ports = FragPorts {
            sport: h.sport,
            dport: h.dport,
            rejected: 0,
            _pad: [0; 3],
        };
        // An LRU map: a full one forgets the oldest datagram, never fails.
        let _ = FRAGS.insert(&key, &ports, ANY);
        return Fragment::Known;
    }
    if h.frag != FRAG_LATER {
        return Fragment::Known;
    }
    match unsafe { FRAGS.get(&key) } {
        Some(p) if p.rejected != 0 => Fragment::Rejected,
        Some(p) => {
            h.sport = p.sport;
            h.dport = p.dport;
            Fragment::Known
        }
        None => Fragment::Unknown,
    }
}

/// Marks the datagram of first fragment `h` as rejected, so its later fragments are dropped
/// rather than handed to a kernel that would hold them for reassembly.
#[inline(always)]
pub fn reject_fragments(h: &Headers) {
    if h.frag != FRAG_FIRST {
        return;
    }
    if let Some(p) = FRAGS.get_ptr_mut(&frag_key(h)) {
        // SAFETY: an LRU value pointer, valid for this program run.
        unsafe { (*p).rejected = 1 };
    }
}

/// Whether `h` may open a new flow: a TCP SYN, any UDP datagram, an ICMP echo request. Packets
/// in the middle of a flow ecsnet did not see start stay on the kernel's path.
#[inline(always)]
pub fn starts_flow(h: &Headers) -> bool {
    if h.frag == FRAG_LATER {
        return false;
    }
    match h.proto {
        PROTO_TCP => h.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
        PROTO_UDP => true,
        PROTO_ICMP => h.icmp_type == ICMP_ECHO,
        _ => false,
    }
}

/// One direction's entry, and which table holds it. Read fields through it rather than copy
/// the whole entry: the programs' stacks are nearly full.
#[derive(Clone, Copy)]
pub struct Tracked {
    /// Valid for this program run (`CT` frees entries after an RCU grace period; `CT_NEW` is an
    /// LRU map, whose entries, as in Cilium's LRU tables, may be reused under a writer).
    pub e: *mut CtEntry,
    /// In `CT`: assured, never evicted.
    pub assured: bool,
}

/// What a packet of a tracked flow is rewritten to, and the flow's kind.
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub nat: Nat,
    pub kind: u8,
}

impl Tracked {
    /// The rewrite of this direction.
    #[inline(always)]
    pub fn rewrite(&self) -> Rewrite {
        // SAFETY: see `e`.
        unsafe {
            Rewrite {
                nat: Nat {
                    saddr: (*self.e).nat_saddr,
                    daddr: (*self.e).nat_daddr,
                    sport: (*self.e).nat_sport,
                    dport: (*self.e).nat_dport,
                },
                kind: (*self.e).kind,
            }
        }
    }

    /// The key of the other direction.
    #[inline(always)]
    fn peer(&self) -> CtKey {
        // SAFETY: see `e`.
        unsafe { (*self.e).peer }
    }

    /// This direction's TCP sequence state.
    #[inline(always)]
    fn tcp(&self) -> TcpSide {
        // SAFETY: see `e`.
        unsafe { (*self.e).tcp() }
    }
}

/// The entry of `key`, assured flows first.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<Tracked> {
    if let Some(e) = CT.get_ptr_mut(key) {
        return Some(Tracked { e, assured: true });
    }
    CT_NEW
        .get_ptr_mut(key)
        .map(|e| Tracked { e, assured: false })
}

/// Refuses a TCP RST or FIN of a tracked flow that does not fit its sequence numbers
/// (`ct::tcp_close_counts`): a blind attacker's, which would otherwise end the flow early.
#[inline(always)]
pub fn check_close(t: &Tracked, h: &Headers) -> Result<(), DropReason> {
    if h.proto != PROTO_TCP || h.frag == FRAG_LATER || h.tcp_flags & (TCP_RST | TCP_FIN) == 0 {
        return Ok(());
    }
    // The other direction gone (evicted from CT_NEW): nothing to judge by, and nothing to end.
    let Some(other) = lookup(&t.peer()) else {
        return Ok(());
    };
    if ct::tcp_close_counts(
        h.tcp_flags,
        h.tcp_seq,
        h.tcp_ack,
        u32::from(h.tcp_payload),
        &t.tcp(),
        &other.tcp(),
    ) {
        Ok(())
    } else {
        Err(DropReason::TcpOutOfWindow)
    }
}

/// Records packet `h` on its entry (after `check_close`), and moves the flow to `CT` when this
/// packet assures it. `t` is not to be used after this.
#[inline(always)]
pub fn touch(t: &Tracked, key: &CtKey, h: &Headers) {
    let now = clock::now();
    let e = t.e;
    // SAFETY: see `Tracked::e`; concurrent updates of these fields may lose an update, not
    // memory.
    unsafe {
        (*e).last_seen_ns = now;
        (*e).packets += 1;
        (*e).bytes += u64::from(h.tot_len);
    }
    if h.proto == PROTO_TCP && h.frag != FRAG_LATER {
        let mut side = t.tcp();
        let restart = ct::record_tcp(
            &mut side,
            h.tcp_flags,
            h.tcp_seq,
            h.tcp_ack,
            u32::from(h.tcp_payload),
        );
        // SAFETY: as above.
        unsafe {
            (*e).tcp_end = side.end;
            (*e).tcp_ack = side.ack;
            (*e).tcp_flags = side.flags;
        }
        if restart && let Some(other) = lookup(&t.peer()) {
            // SAFETY: as above.
            unsafe { (*other.e).tcp_flags = 0 };
        }
    }
    if !t.assured {
        assure(t, key, now);
    }
}

/// Moves a flow from `CT_NEW` to `CT` if it is assured now. The entries are copied from map
/// value to map value, never through the stack.
#[inline(always)]
fn assure(t: &Tracked, key: &CtKey, now: u64) {
    let e = t.e;
    // SAFETY: see `Tracked::e`.
    let (dir, flags, packets, created_ns) =
        unsafe { ((*e).dir, (*e).tcp_flags, (*e).packets, (*e).created_ns) };
    // The cheap tests first: most packets of an unanswered flow cannot assure it.
    if key.proto == PROTO_TCP {
        if dir != DIR_ORIGINAL || flags & TCP_ACK == 0 {
            return;
        }
    } else if now.saturating_sub(created_ns) < ASSURED_AFTER_NS {
        return;
    }
    let peer = t.peer();
    let Some(p) = CT_NEW.get_ptr_mut(&peer) else {
        return;
    };
    // SAFETY: an LRU value pointer, valid for this program run.
    let (other_flags, other_packets) = unsafe { ((*p).tcp_flags, (*p).packets) };
    let (original_flags, reply_flags, reply_packets) = if dir == DIR_ORIGINAL {
        (flags, other_flags, other_packets)
    } else {
        (other_flags, flags, packets)
    };
    if !ct::assured(
        key.proto,
        original_flags,
        reply_flags,
        reply_packets,
        created_ns,
        now,
    ) {
        return;
    }
    // The other direction first, as the agent deletes: a racing packet finds the whole flow
    // in one table or the other.
    // SAFETY: map values as the values to insert.
    if let Err(err) = CT.insert(&peer, unsafe { &*p }, NOEXIST) {
        if -i64::from(err) != EEXIST {
            count(CT_EV_CT_FULL);
        }
        return;
    }
    if let Err(err) = CT.insert(key, unsafe { &*e }, NOEXIST)
        && -i64::from(err) != EEXIST
    {
        let _ = CT.remove(&peer);
        count(CT_EV_CT_FULL);
        return;
    }
    let _ = CT_NEW.remove(&peer);
    let _ = CT_NEW.remove(key);
    count(CT_EV_ASSURED);
}

/// Adds one to connection-table counter `slot` on this CPU.
#[inline(always)]
fn count(slot: u32) {
    if let Some(n) = CT_EVENTS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU array slot of this CPU.
        unsafe { *n += 1 };
    }
}

/// Creates both directions of a new flow in `CT_NEW` for packets `key` rewritten to `nat`.
/// With `choose_sport`, `nat.sport` is kept when no other flow uses it towards the same
/// destination and replaced by a free random port otherwise; `nat` ends as the rewrite
/// chosen. A masqueraded flow first takes one of its task's ports towards its destination
/// (`nat_quota`). Five arguments at most, no stack ones, for the verifier.
#[inline(always)]
pub fn create(
    key: &CtKey,
    nat: &mut Nat,
    kind: u8,
    choose_sport: bool,
    h: &Headers,
) -> Result<(), DropReason> {
    let counted = kind == KIND_MASQUERADE;
    if counted {
        nat_quota::take(key)?;
    }
    let placed = place(key, nat, kind, choose_sport, h);
    if counted && placed.is_err() {
        nat_quota::give_back(key);
    }
    placed
}

/// [`create`] once the flow may have a port.
#[inline(always)]
fn place(
    key: &CtKey,
    nat: &mut Nat,
    kind: u8,
    choose_sport: bool,
    h: &Headers,
) -> Result<(), DropReason> {
    let bytes = u64::from(h.tot_len);
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
        tcp_end: 0,
        last_seen_ns: now,
        packets: 0,
        bytes: 0,
        created_ns: now,
        tcp_ack: 0,
        kind,
        dir: DIR_REPLY,
        tcp_flags: 0,
        _pad: 0,
    };
    let tries = if choose_sport { PORT_TRIES + 1 } else { 1 };
    let mut placed = false;
    for i in 0..tries {
        if i > 0 {
            // SAFETY: a helper without arguments.
            let r = unsafe { bpf_get_prandom_u32() };
            #[expect(
                clippy::cast_possible_truncation,
                reason = "NAT_PORT_MIN plus less than NAT_PORT_SPAN is a port"
            )]
            let port = (NAT_PORT_MIN + r % NAT_PORT_SPAN) as u16;
            nat.sport = port.to_be();
            reply_key.dport = nat.sport;
        }
        // SAFETY: only tested for presence.
        if unsafe { CT.get(&reply_key) }.is_some() {
            continue;
        }
        match CT_NEW.insert(&reply_key, &reply, NOEXIST) {
            Ok(()) => {
                placed = true;
                break;
            }
            // Taken a moment ago by another CPU: the next port.
            Err(e) if -i64::from(e) == EEXIST => {}
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
    let mut original = CtEntry {
        peer: reply_key,
        nat_saddr: nat.saddr,
        nat_daddr: nat.daddr,
        nat_sport: nat.sport,
        nat_dport: nat.dport,
        tcp_end: 0,
        last_seen_ns: now,
        packets: 1,
        bytes,
        created_ns: now,
        tcp_ack: 0,
        kind,
        dir: DIR_ORIGINAL,
        tcp_flags: 0,
        _pad: 0,
    };
    if h.proto == PROTO_TCP {
        let mut side = original.tcp();
        ct::record_tcp(
            &mut side,
            h.tcp_flags,
            h.tcp_seq,
            h.tcp_ack,
            u32::from(h.tcp_payload),
        );
        (original.tcp_end, original.tcp_ack, original.tcp_flags) = (side.end, side.ack, side.flags);
    }
    if let Err(e) = CT_NEW.insert(key, &original, NOEXIST) {
        let _ = CT_NEW.remove(&reply_key);
        return Err(if -i64::from(e) == EEXIST {
            // Another CPU created this flow a moment ago for a copy of this packet.
            DropReason::NatCollision
        } else {
            DropReason::CtTableFull
        });
    }
    count(CT_EV_CREATED);
    Ok(())
}
