//! The connection tables in BPF: look up the entry of a packet's tuple, refresh it, and create
//! both directions of a new flow, choosing a free source port when the flow is source-NATed.
//! A new flow starts in `CT_NEW` (LRU: a flood of flows nobody answers evicts its own kind) and
//! moves to `CT` once assured (`ct::assured`); `CT` is never evicted from, and the agent
//! expires both. TCP RSTs and FINs change a flow only when they fit its sequence numbers.
//! IPv6 has tables of its own (`CT6`, `CT6_NEW`, `FRAGS6`) under the same rules: the code is
//! generic over the family ([`Table`] for the keys, [`Entry`] for the entries, [`Segment`] for
//! the parsed headers), each call monomorphised for its family.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use ecsnet_common::{
    DropReason,
    ct::{
        self, ASSURED_AFTER_NS, CtEntry, CtEntry6, CtKey, CtKey6, DIR_ORIGINAL, DIR_REPLY,
        KIND_LOCAL, KIND_MASQUERADE, TcpSide,
    },
    maps::{
        CT_EV_ASSURED, CT_EV_CREATED, CT_EV_CT_FULL, FragKey, FragKey6, FragPorts, NAT_PORT_MIN,
        NAT_PORT_SPAN,
    },
    net::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    clock,
    maps::{CT, CT_EVENTS, CT_NEW, CT6, CT6_NEW, FRAGS, FRAGS6},
    nat_quota,
    parse::{FRAG_FIRST, FRAG_LATER, Headers, ICMP_ECHO},
    parse6::{Headers6, ICMPV6_ECHO_REQUEST, PROTO_ICMPV6},
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

/// What the packets of one direction are rewritten to (network byte order); `A` is the
/// family's address (IPv4 by default).
#[derive(Clone, Copy)]
pub struct Nat<A = u32> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
}

/// An address family's connection tables, implemented on its key type ([`CtKey`], [`CtKey6`]).
pub trait Table: Copy + 'static {
    /// The family's address, as in a packet.
    type Addr: Copy;
    type Entry: Entry<Self>;
    /// The table of assured flows (`CT`, `CT6`).
    fn ct() -> &'static HashMap<Self, Self::Entry>;
    /// The table of flows not assured yet (`CT_NEW`, `CT6_NEW`).
    fn ct_new() -> &'static LruHashMap<Self, Self::Entry>;
    /// The key of one direction's packets.
    fn of(nat: &Nat<Self::Addr>, proto: u8) -> Self;
    /// The key's tuple, as a [`Nat`] that leaves it untouched.
    fn tuple(&self) -> Nat<Self::Addr>;
    fn proto(&self) -> u8;
    fn set_dport(&mut self, port: u16);
    /// The key of packets going the other way.
    fn reversed(&self) -> Self;
}

/// One direction's entry in the tables of key `K`.
pub trait Entry<K: Table>: Copy + 'static {
    /// A new entry, its TCP state empty.
    fn new(
        peer: K,
        nat: &Nat<K::Addr>,
        kind: u8,
        dir: u8,
        now: u64,
        packets: u64,
        bytes: u64,
    ) -> Self;
    /// The key of the other direction.
    fn peer(&self) -> K;
    /// The rewrite of this direction.
    fn rewrite(&self) -> Rewrite<K::Addr>;
    /// This direction's TCP sequence state.
    fn side(&self) -> TcpSide;
    fn set_side(&mut self, side: &TcpSide);
    /// Clears this direction's TCP flags: the other direction started the flow over.
    fn restart(&mut self);
    /// Counts a packet of `bytes` IP bytes seen at `now`.
    fn seen(&mut self, now: u64, bytes: u64);
    /// (direction, TCP flags, packets, creation time): what assuring the flow reads.
    fn state(&self) -> (u8, u8, u64, u64);
}

/// [`Table`] and [`Entry`] for each family's key and entry, whose fields differ only in their
/// addresses.
macro_rules! tables {
    ($($key:ident, $entry:ident, $addr:ty => $ct:ident, $ct_new:ident, $flags:ident;)+) => {$(
        impl Table for $key {
            type Addr = $addr;
            type Entry = $entry;

            #[inline(always)]
            fn ct() -> &'static HashMap<$key, $entry> {
                &$ct
            }

            #[inline(always)]
            fn ct_new() -> &'static LruHashMap<$key, $entry> {
                &$ct_new
            }

            #[inline(always)]
            fn of(nat: &Nat<$addr>, proto: u8) -> $key {
                $key {
                    saddr: nat.saddr,
                    daddr: nat.daddr,
                    sport: nat.sport,
                    dport: nat.dport,
                    proto,
                    _pad: [0; 3],
                }
            }

            #[inline(always)]
            fn tuple(&self) -> Nat<$addr> {
                Nat {
                    saddr: self.saddr,
                    daddr: self.daddr,
                    sport: self.sport,
                    dport: self.dport,
                }
            }

            #[inline(always)]
            fn proto(&self) -> u8 {
                self.proto
            }

            #[inline(always)]
            fn set_dport(&mut self, port: u16) {
                self.dport = port;
            }

            #[inline(always)]
            fn reversed(&self) -> $key {
                $key::reversed(self)
            }
        }

        impl Entry<$key> for $entry {
            #[inline(always)]
            fn new(
                peer: $key,
                nat: &Nat<$addr>,
                kind: u8,
                dir: u8,
                now: u64,
                packets: u64,
                bytes: u64,
            ) -> $entry {
                $entry {
                    peer,
                    nat_saddr: nat.saddr,
                    nat_daddr: nat.daddr,
                    nat_sport: nat.sport,
                    nat_dport: nat.dport,
                    tcp_end: 0,
                    last_seen_ns: now,
                    packets,
                    bytes,
                    created_ns: now,
                    tcp_ack: 0,
                    kind,
                    dir,
                    tcp_flags: 0,
                    $flags: 0,
                }
            }

            #[inline(always)]
            fn peer(&self) -> $key {
                self.peer
            }

            #[inline(always)]
            fn rewrite(&self) -> Rewrite<$addr> {
                Rewrite {
                    nat: Nat {
                        saddr: self.nat_saddr,
                        daddr: self.nat_daddr,
                        sport: self.nat_sport,
                        dport: self.nat_dport,
                    },
                    kind: self.kind,
                }
            }

            #[inline(always)]
            fn side(&self) -> TcpSide {
                self.tcp()
            }

            #[inline(always)]
            fn set_side(&mut self, side: &TcpSide) {
                self.tcp_end = side.end;
                self.tcp_ack = side.ack;
                self.tcp_flags = side.flags;
            }

            #[inline(always)]
            fn restart(&mut self) {
                self.tcp_flags = 0;
            }

            #[inline(always)]
            fn seen(&mut self, now: u64, bytes: u64) {
                self.last_seen_ns = now;
                self.packets += 1;
                self.bytes += bytes;
            }

            #[inline(always)]
            fn state(&self) -> (u8, u8, u64, u64) {
                (self.dir, self.tcp_flags, self.packets, self.created_ns)
            }
        }
    )+};
}

tables! {
    CtKey, CtEntry, u32 => CT, CT_NEW, _pad;
    CtKey6, CtEntry6, [u8; 16] => CT6, CT6_NEW, flags;
}

/// A parsed packet as the connection tables read it, in either family ([`Headers`],
/// [`Headers6`]).
pub trait Segment {
    type Key: Table;
    type FragKey: 'static;
    /// The family's first-fragment ports (`FRAGS`, `FRAGS6`).
    fn frags() -> &'static LruHashMap<Self::FragKey, FragPorts>;
    /// The key of this packet's datagram in [`Segment::frags`].
    fn frag_key(&self) -> Self::FragKey;
    /// The table key of the packet, or None for protocols the table does not track.
    fn key(&self) -> Option<Self::Key>;
    /// Whether the packet is an echo request of the family's ICMP.
    fn is_echo_request(&self) -> bool;
    fn proto(&self) -> u8;
    /// `FRAG_*`.
    fn frag(&self) -> u8;
    fn tcp_flags(&self) -> u8;
    /// TCP sequence and acknowledgement numbers, host byte order.
    fn tcp_seq(&self) -> u32;
    fn tcp_ack(&self) -> u32;
    fn tcp_payload(&self) -> u32;
    /// IP bytes of the packet.
    fn ip_bytes(&self) -> u64;
    fn ports(&self) -> (u16, u16);
    fn set_ports(&mut self, sport: u16, dport: u16);
}

/// [`Segment`] for each family's headers, which name their common fields alike.
macro_rules! segments {
    ($($hdr:ident, $key:ident, $fkey:ident, $frags:ident, $id:ident, $icmp:ident, $echo:ident;)+) => {$(
        impl Segment for $hdr {
            type Key = $key;
            type FragKey = $fkey;

            #[inline(always)]
            fn frags() -> &'static LruHashMap<$fkey, FragPorts> {
                &$frags
            }

            #[inline(always)]
            fn frag_key(&self) -> $fkey {
                $fkey {
                    saddr: self.saddr,
                    daddr: self.daddr,
                    id: self.$id,
                    proto: self.proto,
                    ..Default::default()
                }
            }

            #[inline(always)]
            fn key(&self) -> Option<$key> {
                match self.proto {
                    PROTO_TCP | PROTO_UDP | $icmp => Some($key {
                        saddr: self.saddr,
                        daddr: self.daddr,
                        sport: self.sport,
                        dport: self.dport,
                        proto: self.proto,
                        _pad: [0; 3],
                    }),
                    _ => None,
                }
            }

            #[inline(always)]
            fn is_echo_request(&self) -> bool {
                self.proto == $icmp && self.icmp_type == $echo
            }

            #[inline(always)]
            fn proto(&self) -> u8 {
                self.proto
            }

            #[inline(always)]
            fn frag(&self) -> u8 {
                self.frag
            }

            #[inline(always)]
            fn tcp_flags(&self) -> u8 {
                self.tcp_flags
            }

            #[inline(always)]
            fn tcp_seq(&self) -> u32 {
                self.tcp_seq
            }

            #[inline(always)]
            fn tcp_ack(&self) -> u32 {
                self.tcp_ack
            }

            #[inline(always)]
            fn tcp_payload(&self) -> u32 {
                u32::from(self.tcp_payload)
            }

            #[inline(always)]
            fn ip_bytes(&self) -> u64 {
                u64::from(self.tot_len)
            }

            #[inline(always)]
            fn ports(&self) -> (u16, u16) {
                (self.sport, self.dport)
            }

            #[inline(always)]
            fn set_ports(&mut self, sport: u16, dport: u16) {
                self.sport = sport;
                self.dport = dport;
            }
        }
    )+};
}

segments! {
    Headers, CtKey, FragKey, FRAGS, ip_id, PROTO_ICMP, ICMP_ECHO;
    Headers6, CtKey6, FragKey6, FRAGS6, frag_id, PROTO_ICMPV6, ICMPV6_ECHO_REQUEST;
}

/// The table key of `h`, or None for protocols the table does not track.
#[inline(always)]
pub fn key_of<H: Segment>(h: &H) -> Option<H::Key> {
    h.key()
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

/// Fills the ports of a later fragment from its first fragment, or remembers the ports of a
/// first fragment.
#[inline(always)]
pub fn track_fragment<H: Segment>(h: &mut H) -> Fragment {
    let frag = h.frag();
    if frag == FRAG_FIRST {
        let (sport, dport) = h.ports();
        let ports = FragPorts {
            sport,
            dport,
            rejected: 0,
            _pad: [0; 3],
        };
        // An LRU map: a full one forgets the oldest datagram, never fails.
        let _ = H::frags().insert(&h.frag_key(), &ports, ANY);
        return Fragment::Known;
    }
    if frag != FRAG_LATER {
        return Fragment::Known;
    }
    match unsafe { H::frags().get(&h.frag_key()) } {
        Some(p) if p.rejected != 0 => Fragment::Rejected,
        Some(p) => {
            h.set_ports(p.sport, p.dport);
            Fragment::Known
        }
        None => Fragment::Unknown,
    }
}

/// Marks the datagram of first fragment `h` as rejected, so its later fragments are dropped
/// rather than handed to a kernel that would hold them for reassembly.
#[inline(always)]
pub fn reject_fragments<H: Segment>(h: &H) {
    if h.frag() != FRAG_FIRST {
        return;
    }
    if let Some(p) = H::frags().get_ptr_mut(&h.frag_key()) {
        // SAFETY: an LRU value pointer, valid for this program run.
        unsafe { (*p).rejected = 1 };
    }
}

/// Whether `h` may open a new flow: a TCP SYN, any UDP datagram, an ICMP echo request. Packets
/// in the middle of a flow ecsnet did not see start stay on the kernel's path.
#[inline(always)]
pub fn starts_flow<H: Segment>(h: &H) -> bool {
    if h.frag() == FRAG_LATER {
        return false;
    }
    match h.proto() {
        PROTO_TCP => h.tcp_flags() & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN,
        PROTO_UDP => true,
        _ => h.is_echo_request(),
    }
}

/// What the tables say of a packet the kernel delivers to a task with a policy.
pub enum Delivered<K> {
    /// A tracked flow's (recorded, when ecsnet only tracks it), or one of a flow ecsnet
    /// translated and handed to the kernel: it passes.
    Tracked,
    /// Nothing the tables know, and nothing that opens a flow: the rules alone judge it.
    Untracked,
    /// A packet that opens a flow with key `K`, for the rules to judge.
    Opens(K),
}

/// [`Delivered`] of `h`, after its fragment bookkeeping: a later fragment with no first on
/// record, or of a rejected datagram, is `FRAGMENT`; a tracked RST or FIN out of window is
/// `TCP_OUT_OF_WINDOW`.
#[inline(always)]
pub fn delivered<H: Segment>(h: &mut H) -> Result<Delivered<H::Key>, DropReason> {
    if track_fragment(h) != Fragment::Known {
        return Err(DropReason::Fragment);
    }
    let Some(key) = key_of(h) else {
        return Ok(Delivered::Untracked);
    };
    if let Some(t) = lookup(&key) {
        check_close(&t, h)?;
        if t.rewrite().kind == KIND_LOCAL {
            touch(&t, &key, h);
        }
        return Ok(Delivered::Tracked);
    }
    // A flow ecsnet translated and handed to the kernel (task MAC not known yet) arrives here
    // translated: its reply direction's key is in the table.
    if lookup(&key.reversed()).is_some() {
        return Ok(Delivered::Tracked);
    }
    if !starts_flow(h) {
        return Ok(Delivered::Untracked);
    }
    Ok(Delivered::Opens(key))
}

/// One direction's entry, and which table holds it. Read fields through it rather than copy
/// the whole entry: the programs' stacks are nearly full.
pub struct Tracked<K: Table = CtKey> {
    /// Valid for this program run (`CT` frees entries after an RCU grace period; `CT_NEW` is an
    /// LRU map, whose entries, as in Cilium's LRU tables, may be reused under a writer).
    pub e: *mut K::Entry,
    /// In `CT`: assured, never evicted.
    pub assured: bool,
}

/// What a packet of a tracked flow is rewritten to, and the flow's kind.
#[derive(Clone, Copy)]
pub struct Rewrite<A = u32> {
    pub nat: Nat<A>,
    pub kind: u8,
}

impl<K: Table> Tracked<K> {
    /// The rewrite of this direction.
    #[inline(always)]
    pub fn rewrite(&self) -> Rewrite<K::Addr> {
        // SAFETY: see `e`.
        unsafe { (*self.e).rewrite() }
    }

    /// The key of the other direction.
    #[inline(always)]
    fn peer(&self) -> K {
        // SAFETY: see `e`.
        unsafe { (*self.e).peer() }
    }

    /// This direction's TCP sequence state.
    #[inline(always)]
    fn tcp(&self) -> TcpSide {
        // SAFETY: see `e`.
        unsafe { (*self.e).side() }
    }
}

/// The entry of `key`, assured flows first.
#[inline(always)]
pub fn lookup<K: Table>(key: &K) -> Option<Tracked<K>> {
    if let Some(e) = K::ct().get_ptr_mut(key) {
        return Some(Tracked { e, assured: true });
    }
    K::ct_new()
        .get_ptr_mut(key)
        .map(|e| Tracked { e, assured: false })
}

/// Refuses a TCP RST or FIN of a tracked flow that does not fit its sequence numbers
/// (`ct::tcp_close_counts`): a blind attacker's, which would otherwise end the flow early.
#[inline(always)]
pub fn check_close<H: Segment>(t: &Tracked<H::Key>, h: &H) -> Result<(), DropReason> {
    let flags = h.tcp_flags();
    if h.proto() != PROTO_TCP || h.frag() == FRAG_LATER || flags & (TCP_RST | TCP_FIN) == 0 {
        return Ok(());
    }
    // The other direction gone (evicted from CT_NEW): nothing to judge by, and nothing to end.
    let Some(other) = lookup(&t.peer()) else {
        return Ok(());
    };
    if ct::tcp_close_counts(
        flags,
        h.tcp_seq(),
        h.tcp_ack(),
        h.tcp_payload(),
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
pub fn touch<H: Segment>(t: &Tracked<H::Key>, key: &H::Key, h: &H) {
    let now = clock::now();
    let e = t.e;
    // SAFETY: see `Tracked::e`; concurrent updates of these fields may lose an update, not
    // memory.
    unsafe { (*e).seen(now, h.ip_bytes()) };
    if h.proto() == PROTO_TCP && h.frag() != FRAG_LATER {
        let mut side = t.tcp();
        let restart = ct::record_tcp(
            &mut side,
            h.tcp_flags(),
            h.tcp_seq(),
            h.tcp_ack(),
            h.tcp_payload(),
        );
        // SAFETY: as above.
        unsafe { (*e).set_side(&side) };
        if restart && let Some(other) = lookup(&t.peer()) {
            // SAFETY: as above.
            unsafe { (*other.e).restart() };
        }
    }
    if !t.assured {
        assure(t, key, now);
    }
}

/// Moves a flow from `CT_NEW` to `CT` if it is assured now. The entries are copied from map
/// value to map value, never through the stack.
#[inline(always)]
fn assure<K: Table>(t: &Tracked<K>, key: &K, now: u64) {
    let e = t.e;
    // SAFETY: see `Tracked::e`.
    let (dir, flags, packets, created_ns) = unsafe { (*e).state() };
    let proto = key.proto();
    // The cheap tests first: most packets of an unanswered flow cannot assure it.
    if proto == PROTO_TCP {
        if dir != DIR_ORIGINAL || flags & TCP_ACK == 0 {
            return;
        }
    } else if now.saturating_sub(created_ns) < ASSURED_AFTER_NS {
        return;
    }
    let peer = t.peer();
    let Some(p) = K::ct_new().get_ptr_mut(&peer) else {
        return;
    };
    // SAFETY: an LRU value pointer, valid for this program run.
    let (_, other_flags, other_packets, _) = unsafe { (*p).state() };
    let (original_flags, reply_flags, reply_packets) = if dir == DIR_ORIGINAL {
        (flags, other_flags, other_packets)
    } else {
        (other_flags, flags, packets)
    };
    if !ct::assured(
        proto,
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
    if let Err(err) = K::ct().insert(&peer, unsafe { &*p }, NOEXIST) {
        if -i64::from(err) != EEXIST {
            count(CT_EV_CT_FULL);
        }
        return;
    }
    if let Err(err) = K::ct().insert(key, unsafe { &*e }, NOEXIST)
        && -i64::from(err) != EEXIST
    {
        let _ = K::ct().remove(&peer);
        count(CT_EV_CT_FULL);
        return;
    }
    let _ = K::ct_new().remove(&peer);
    let _ = K::ct_new().remove(key);
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
    let placed = place(key, nat, kind, choose_sport, h, &mut CtEntry::default());
    if counted && placed.is_err() {
        nat_quota::give_back(key);
    }
    placed
}

/// Creates both directions of a new IPv6 flow of kind `kind` in `CT6_NEW`, untranslated.
/// A function of its own (a BPF-to-BPF call): its two 120-byte entries get a stack frame of
/// their own rather than one more piece of its caller's.
#[inline(never)]
pub fn create6(key: &CtKey6, kind: u8, h: &Headers6) -> Result<(), DropReason> {
    create6_to(key, &mut key.tuple(), (kind, false), h)
}

/// Creates both directions of a new IPv6 flow of kind `kind` in `CT6_NEW`, packets `key`
/// rewritten to `nat` with a source address of the host's, whose source port is kept when free
/// towards the destination and chosen otherwise, as [`create`] does: a masqueraded flow (the
/// caller took the task's share of the ports, `nat_quota::take6`, and gives it back when this
/// fails), or a task reaching its own published port. A function of its own, as [`create6`],
/// and not one with [`create6_nat`] under a flag: with the choice a constant in each, the
/// masquerade path of `tc_task_ipv6_nat` fits the 512-byte stack; merged, it is 16 bytes over.
#[inline(never)]
pub fn create6_chosen(
    key: &CtKey6,
    nat: &mut Nat<[u8; 16]>,
    kind: u8,
    h: &Headers6,
) -> Result<(), DropReason> {
    create6_to(key, nat, (kind, true), h)
}

/// Creates both directions of a new IPv6 flow of kind `kind` in `CT6_NEW`, packets `key`
/// rewritten to `nat` (no port is chosen: published ports). A function of its own, as
/// [`create6`] (which has the tuple in its own frame rather than its caller's).
#[inline(never)]
pub fn create6_nat(
    key: &CtKey6,
    nat: &mut Nat<[u8; 16]>,
    kind: u8,
    h: &Headers6,
) -> Result<(), DropReason> {
    create6_to(key, nat, (kind, false), h)
}

/// [`create`] of an IPv6 flow of `kind`, its port chosen or not (`choose_sport`), each entry
/// built in this CPU's `ENTRY6` slot.
#[inline(always)]
fn create6_to(
    key: &CtKey6,
    nat: &mut Nat<[u8; 16]>,
    (kind, choose_sport): (u8, bool),
    h: &Headers6,
) -> Result<(), DropReason> {
    let Some(e) = ENTRY6.get_ptr_mut(0) else {
        return Err(DropReason::CtTableFull);
    };
    // SAFETY: this CPU's slot, used by nothing else in this program run.
    place(key, nat, kind, choose_sport, h, unsafe { &mut *e })
}

/// This CPU's IPv6 entry under construction: [`create6`] builds entries here rather than on a
/// stack too small for them. Not pinned: scratch space.
#[map(name = "ENTRY6")]
static ENTRY6: PerCpuArray<CtEntry6> = PerCpuArray::with_max_entries(1, 0);

/// [`create`] once the flow may have a port; each entry is built in `e` in turn.
#[inline(always)]
fn place<H: Segment>(
    key: &H::Key,
    nat: &mut Nat<<H::Key as Table>::Addr>,
    kind: u8,
    choose_sport: bool,
    h: &H,
    e: &mut <H::Key as Table>::Entry,
) -> Result<(), DropReason> {
    let bytes = h.ip_bytes();
    let now = clock::now();
    let proto = key.proto();
    let mut reply_key = H::Key::of(
        &Nat {
            saddr: nat.daddr,
            daddr: nat.saddr,
            sport: nat.dport,
            dport: nat.sport,
        },
        proto,
    );
    let back = key.tuple();
    let back = Nat {
        saddr: back.daddr,
        daddr: back.saddr,
        sport: back.dport,
        dport: back.sport,
    };
    *e = <H::Key as Table>::Entry::new(*key, &back, kind, DIR_REPLY, now, 0, 0);
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
            reply_key.set_dport(nat.sport);
        }
        // SAFETY: only tested for presence.
        if unsafe { H::Key::ct().get(&reply_key) }.is_some() {
            continue;
        }
        match H::Key::ct_new().insert(&reply_key, e, NOEXIST) {
            Ok(()) => {
                placed = true;
                break;
            }
            // Taken a moment ago by another CPU: the next port.
            Err(err) if -i64::from(err) == EEXIST => {}
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
    *e = <H::Key as Table>::Entry::new(reply_key, nat, kind, DIR_ORIGINAL, now, 1, bytes);
    if h.proto() == PROTO_TCP {
        let mut side = e.side();
        ct::record_tcp(
            &mut side,
            h.tcp_flags(),
            h.tcp_seq(),
            h.tcp_ack(),
            h.tcp_payload(),
        );
        e.set_side(&side);
    }
    if let Err(err) = H::Key::ct_new().insert(key, e, NOEXIST) {
        let _ = H::Key::ct_new().remove(&reply_key);
        return Err(if -i64::from(err) == EEXIST {
            // Another CPU created this flow a moment ago for a copy of this packet.
            DropReason::NatCollision
        } else {
            DropReason::CtTableFull
        });
    }
    count(CT_EV_CREATED);
    Ok(())
}
