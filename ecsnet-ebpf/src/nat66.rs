//! NAT66, ecsnet's own: IPv6 arriving on the uplink for a host address on a published port
//! (`PORTS6`) opens a `KIND_INBOUND` flow, judged by the receiving task's ingress rules with
//! the real client and the container port, translated (`nat6`) and redirected into the task; the
//! task's replies are reverse-translated and sent out of the uplink after a FIB lookup. A new
//! flow a task opens out of the host is masqueraded (`KIND_MASQUERADE`, in `nat` mode:
//! `CONFIG6_MASQUERADE`) to the uplink's address, its port chosen as IPv4's, and its replies
//! come back the same way as a published port's requests. A task's new flow to a port
//! published on a host address is a hairpin (`KIND_HAIRPIN`), carried between the two tasks;
//! the `ICMPv6` errors a task sends about translated flows leave translated (`error_out`).
//! The kernel's ip6tables rules stay in place, as dockerd keeps them: the packets ecsnet carries never reach them. Everything else
//! (neighbour discovery, the host's own traffic, what cannot be parsed) goes to the kernel
//! untouched.

use aya_ebpf::{macros::map, maps::PerCpuArray, programs::TcContext};
use ecsnet_common::{
    DropReason,
    ct::{CtEntry6, CtKey6, KIND_HAIRPIN, KIND_INBOUND, KIND_MASQUERADE},
    flow::{ACTION_ACCEPT, ACTION_REJECT, FLOW_INGRESS},
    maps::{
        CONFIG6_MASQUERADE, Config, Config6, HOOK_TC_EGRESS, HOOK_TC_INGRESS, PortKey, PortTarget6,
        TaskInfo,
    },
    policy::DIR_INGRESS,
};

use crate::{
    account::{self, Sighting6},
    conntrack::{self, Fragment, Nat, Table},
    events, forward6,
    maps::{CONFIG, CONFIG6, LOCAL_ADDRS6, PORTS6},
    nat_quota,
    nat6::{self, ErrorFix, ErrorSide, To},
    parse::load,
    parse6::{Headers6, ICMPV6_ECHO_REQUEST, ICMPV6_HLEN, IPV6_HLEN, PROTO_ICMPV6},
    policy,
    redirect::{self, UplinkHop},
    verdict::{Verdict, drop_on},
};

/// This CPU's source address of the packet in progress as it left, for the flow record of
/// `tc_task_ipv6_flow` (`note_source`, `left_with`). Not pinned: scratch space.
#[map(name = "PKT_SADDR6")]
static PKT_SADDR6: PerCpuArray<[u8; 16]> = PerCpuArray::with_max_entries(1, 0);

/// Notes `addr` as the source the packet in progress leaves with.
#[inline(always)]
pub fn note_source(addr: &[u8; 16]) {
    if let Some(p) = PKT_SADDR6.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, used by this program run only.
        unsafe { *p = *addr };
    }
}

/// The source noted last on this CPU (`note_source`).
#[inline(always)]
pub fn left_with() -> Option<&'static [u8; 16]> {
    // SAFETY: as above; read-only.
    PKT_SADDR6.get_ptr(0).map(|p| unsafe { &*p })
}

/// Where the next header and the addresses are in a quoted IPv6 header.
const QUOTE_NEXT_AT: usize = 6;
const QUOTE_SADDR_AT: usize = 8;
const QUOTE_DADDR_AT: usize = 24;

/// The host's IPv6 addresses, once `ecsnet up` wrote them.
#[inline(always)]
pub fn config6() -> Option<Config6> {
    CONFIG6.get(0).copied()
}

/// Whether ecsnet translates IPv6 on this host: the uplink has an IPv6 address.
#[inline(always)]
pub fn on() -> bool {
    config6().is_some_and(|c| c.uplink_ipv6 != [0; 16])
}

/// Whether `addr` is one of the host's own IPv6 addresses.
#[inline(always)]
pub fn is_local6(addr: &[u8; 16]) -> bool {
    if *addr == [0; 16] {
        return false;
    }
    if config6().is_some_and(|c| *addr == c.uplink_ipv6 || *addr == c.bridge_ipv6) {
        return true;
    }
    unsafe { LOCAL_ADDRS6.get(addr) }.is_some()
}

/// The task address and container port published on `h`'s destination port.
#[inline(always)]
fn published6(h: &Headers6) -> Option<PortTarget6> {
    published6_port(h.dport, h.proto)
}

/// The task address and container port published on host port `port` (network byte order).
#[inline(always)]
pub fn published6_port(port: u16, proto: u8) -> Option<PortTarget6> {
    let key = PortKey {
        port,
        proto,
        _pad: 0,
    };
    unsafe { PORTS6.get(&key) }.copied()
}

/// Whether `policy` allows `proto` to `port` (network byte order) from `peer` in direction
/// `dir`. A function of its own, as `forward6::allows`.
#[inline(never)]
fn allows_port(policy: u32, dir: u32, peer: &[u8; 16], proto: u8, port: u16) -> bool {
    policy::allows6_port(policy, dir, peer, proto, u16::from_be(port))
}

/// Decides for an IPv6 packet arriving on the uplink (`tc_uplink_ipv6`).
#[inline(always)]
pub fn from_uplink(ctx: &TcContext, cfg: &Config, h: &mut Headers6) -> Result<Verdict, DropReason> {
    if forward6::is_plumbing(ctx, h) {
        return Ok(Verdict::Pass);
    }
    if h.is_icmp_error() {
        return error_in(ctx, h);
    }
    match conntrack::track_fragment(h) {
        Fragment::Known => {}
        Fragment::Rejected => return Err(DropReason::Fragment),
        // The kernel reassembles it, and polices what it delivers to a task.
        Fragment::Unknown => return Ok(Verdict::Pass),
    }
    let Some(key) = conntrack::key_of(h) else {
        return Ok(Verdict::Pass);
    };
    if let Some(t) = conntrack::lookup(&key) {
        conntrack::check_close(&t, h)?;
        let r = t.rewrite();
        // Only what ecsnet translated comes back this way: requests to published ports, and
        // the replies of masqueraded flows. The kernel's own flows (`KIND_LOCAL`) stay on its
        // path.
        if r.kind != KIND_INBOUND && r.kind != KIND_MASQUERADE {
            return Ok(Verdict::Pass);
        }
        conntrack::touch(&t, &key, h);
        return into_task(ctx, cfg, h, &r.nat);
    }
    if !conntrack::starts_flow(h) || !is_local6(&h.daddr) {
        return Ok(Verdict::Pass);
    }
    let Some(target) = published6(h) else {
        return Ok(Verdict::Pass);
    };
    let Some(dst) = forward6::task6(&target.addr) else {
        return Ok(Verdict::Pass);
    };
    open_inbound(ctx, cfg, h, &key, &dst, &target)
}

/// An `ICMPv6` error arriving on the uplink: one about a packet a task sent translated (the
/// quote is a reply of a `KIND_INBOUND` flow or a request of a `KIND_MASQUERADE` one, as it
/// left: from the host, to which the error comes) goes to that task translated back, hop
/// limit -1 (packet-too-big must reach the sender, or path-MTU discovery breaks); anything else
/// goes to the kernel. Two functions of
/// their own (BPF-to-BPF calls, one after the other), for the stack.
#[inline(always)]
fn error_in(ctx: &TcContext, h: &Headers6) -> Result<Verdict, DropReason> {
    let quote = h.l4 + ICMPV6_HLEN;
    let e = quoted_inbound(ctx, h, quote);
    if e.is_null() {
        return Ok(Verdict::Pass);
    }
    send_error_in(ctx, h, quote, e)
}

/// The entry of the translated flow a packet the error `h` quotes at `quote` belongs to, when
/// that packet left from the error's destination (the host): the reply of a `KIND_INBOUND`
/// flow or the request of a `KIND_MASQUERADE` one. Either way the quoted packet reversed is
/// the key of an entry rewriting to the task's side of the flow. Null for anything else.
#[inline(never)]
fn quoted_inbound(ctx: &TcContext, h: &Headers6, quote: usize) -> *const CtEntry6 {
    let Ok(qproto) = load::<u8>(ctx, quote + QUOTE_NEXT_AT) else {
        return core::ptr::null();
    };
    let Some(ports) = quoted_ports(ctx, quote, qproto) else {
        return core::ptr::null();
    };
    let (Ok(saddr), Ok(daddr), Ok(proto)) = (
        load::<[u8; 16]>(ctx, quote + QUOTE_DADDR_AT),
        load::<[u8; 16]>(ctx, quote + QUOTE_SADDR_AT),
        load::<u8>(ctx, quote + QUOTE_NEXT_AT),
    ) else {
        return core::ptr::null();
    };
    if daddr != h.daddr {
        return core::ptr::null();
    }
    let key = CtKey6 {
        saddr,
        daddr,
        sport: ports[1],
        dport: ports[0],
        proto,
        _pad: [0; 3],
    };
    match conntrack::lookup(&key) {
        // SAFETY: see `Tracked::e`.
        Some(t) if matches!(unsafe { (*t.e).kind }, KIND_INBOUND | KIND_MASQUERADE) => t.e,
        _ => core::ptr::null(),
    }
}

/// The source and destination "ports" of the packet quoted at `quote` (its fixed header),
/// of protocol `proto`: an echo request's identifier is its source port, as in the flow's key;
/// None for any other `ICMPv6` or a quote too short.
#[inline(always)]
fn quoted_ports(ctx: &TcContext, quote: usize, proto: u8) -> Option<[u16; 2]> {
    let at = quote + IPV6_HLEN;
    if proto != PROTO_ICMPV6 {
        return load::<[u16; 2]>(ctx, at).ok();
    }
    if load::<u8>(ctx, at).ok()? != ICMPV6_ECHO_REQUEST {
        return None;
    }
    Some([load::<u16>(ctx, at + 4).ok()?, 0])
}

/// Translates the error `h` about a packet of the flow of entry `e` (`quoted_inbound`: a
/// published port's reply, a masqueraded flow's request) back to what the task sent, and
/// delivers it into the task.
#[inline(never)]
fn send_error_in(
    ctx: &TcContext,
    h: &Headers6,
    quote: usize,
    e: *const CtEntry6,
) -> Result<Verdict, DropReason> {
    // SAFETY: a `Tracked::e` (non-null), valid for this program run.
    let e = unsafe { &*e };
    if nat6::hop_limit(ctx) <= 1 {
        return Ok(Verdict::Pass);
    }
    let (Some(cfg), Some(dst)) = (CONFIG.get(0), forward6::task6(&e.nat_daddr)) else {
        return Ok(Verdict::Pass);
    };
    let Ok(qproto) = load::<u8>(ctx, quote + QUOTE_NEXT_AT) else {
        return Ok(Verdict::Pass);
    };
    let Some([qsport, _]) = quoted_ports(ctx, quote, qproto) else {
        return Ok(Verdict::Pass);
    };
    // What the task sent: from its own address and port (the quoted source was the error's
    // destination, `quoted_inbound` checked).
    let fix = ErrorFix {
        quote,
        qproto,
        side: ErrorSide::In,
        old: (&h.daddr, qsport),
        new: (&e.nat_daddr, e.nat_dport),
    };
    nat6::translate_error(ctx, h, &fix)?;
    // Without the task's MAC the kernel delivers it, translated.
    if dst.mac == [0; 6] {
        return Ok(Verdict::Pass);
    }
    nat6::decrement_hop_limit(ctx)?;
    account::tc(ctx, dst.ifindex, HOOK_TC_EGRESS);
    redirect::to_task(ctx, cfg, &dst, true)
}

/// Opens a flow to a published port of task `dst`: its ingress rules judge the real client
/// and the container port, then the flow is tracked and the packet translated into the task.
#[inline(always)]
fn open_inbound(
    ctx: &TcContext,
    cfg: &Config,
    h: &Headers6,
    key: &CtKey6,
    dst: &TaskInfo,
    target: &PortTarget6,
) -> Result<Verdict, DropReason> {
    let mut nat = key.tuple();
    nat.daddr = target.addr;
    nat.dport = target.port;
    if !allows_port(dst.policy, DIR_INGRESS, &h.saddr, h.proto, target.port) {
        conntrack::reject_fragments(h);
        record(ctx, h, &nat, dst.ifindex, ACTION_REJECT);
        return Ok(drop_on(
            ctx,
            DropReason::SgIngress,
            dst.ifindex,
            HOOK_TC_INGRESS,
        ));
    }
    events::allowed6_inbound(h, dst, target);
    // The kernel sends the time-exceeded error; nothing to track.
    if nat6::hop_limit(ctx) <= 1 {
        return Ok(Verdict::Pass);
    }
    conntrack::create6_nat(key, &mut nat, KIND_INBOUND, h)?;
    into_task(ctx, cfg, h, &nat)
}

/// Translates `h` to `nat` and delivers it into the task at `nat.daddr`: past the bridge, its
/// hop limit decremented and the bridge's MAC as source, as the kernel's forwarding would;
/// counted and recorded on the task. Without a known MAC (or with a hop limit that ends here)
/// the kernel carries it, translated (or untouched, to send the time-exceeded error).
#[inline(always)]
fn into_task(
    ctx: &TcContext,
    cfg: &Config,
    h: &Headers6,
    nat: &Nat<[u8; 16]>,
) -> Result<Verdict, DropReason> {
    let Some(dst) = forward6::task6(&nat.daddr) else {
        return Ok(Verdict::Pass);
    };
    if nat6::hop_limit(ctx) <= 1 {
        return Ok(Verdict::Pass);
    }
    nat6::rewrite(ctx, h, &To::nat(nat))?;
    if dst.mac == [0; 6] {
        return Ok(Verdict::Pass);
    }
    nat6::decrement_hop_limit(ctx)?;
    account::tc(ctx, dst.ifindex, HOOK_TC_EGRESS);
    record(ctx, h, nat, dst.ifindex, ACTION_ACCEPT);
    redirect::to_task(ctx, cfg, &dst, true)
}

/// The flow record on task interface `ifindex` of `h` arriving as `nat` says. A function of
/// its own (a BPF-to-BPF call): the record's key gets a stack frame of its own.
#[inline(never)]
fn record(ctx: &TcContext, h: &Headers6, nat: &Nat<[u8; 16]>, ifindex: u32, action: u8) {
    let seen = Sighting6::translated(h, nat, ifindex, FLOW_INGRESS, action);
    account::record6_seen(ctx, h, &seen);
}

/// A packet a task sent in the flow of entry `e` (a `Tracked::e`; passed as a pointer, not
/// as a reference to the caller's stack), which ecsnet translated: translated and sent
/// out of the uplink when the kernel would route it there, hop limit decremented; anything
/// else goes on untranslated, as IPv4's. A function of its own (a BPF-to-BPF call): the FIB
/// lookup's parameters get a stack frame of their own, beside the caller's.
#[inline(never)]
pub fn to_uplink(ctx: &TcContext, h: &Headers6, e: *const CtEntry6) -> Result<Verdict, DropReason> {
    // SAFETY: a `Tracked::e`, valid for this program run.
    let nat = To::entry(unsafe { &*e });
    // Read in place, not copied: the stack is tight. A translated flow exists only once
    // `ecsnet up` wrote it.
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Verdict::Pass);
    };
    if nat6::hop_limit(ctx) <= 1 {
        return Ok(Verdict::Pass);
    }
    let Some(hop) = redirect::uplink_hop6(ctx, cfg, h.proto, nat.saddr, nat.daddr) else {
        return Ok(Verdict::Pass);
    };
    note_source(nat.saddr);
    nat6::rewrite(ctx, h, &nat)?;
    nat6::decrement_hop_limit(ctx)?;
    redirect::to_uplink(ctx, &hop)
}

/// Whether ecsnet masquerades the new flow of `h`, which a task sends to an address no task
/// has, as Docker's `nat` mode does (`-s fixed-cidr-v6 ! -o docker0 -j MASQUERADE`): in `nat`
/// mode (`CONFIG6_MASQUERADE`), from the bridge's prefix to a unicast address beyond it that
/// is not the host's own. Link-local, multicast and `::/8` destinations never leave the host
/// translated. A function of its own (a BPF-to-BPF call): `CONFIG6`'s copy gets a stack frame
/// of its own.
#[inline(never)]
pub fn masquerades(h: &Headers6) -> bool {
    let Some(c) = CONFIG6.get(0) else {
        return false;
    };
    let d = &h.daddr;
    let link_local = d[0] == 0xfe && d[1] & 0xc0 == 0x80;
    c.flags & CONFIG6_MASQUERADE != 0
        && c.uplink_ipv6 != [0; 16]
        && c.bridge_prefix6 != 0
        && d[0] != 0
        && !forward6::is_multicast(d)
        && !link_local
        && in_prefix(&h.saddr, &c.bridge_ipv6, c.bridge_prefix6)
        && !in_prefix(d, &c.bridge_ipv6, c.bridge_prefix6)
        && !is_local6(d)
}

/// The next hop out of the uplink from `saddr` to `h`'s destination; its `ifindex` 0 when the
/// route goes elsewhere. A function of its own (a BPF-to-BPF call): the FIB lookup's
/// parameters get a frame beside the flow's creation, not under it.
#[inline(never)]
fn hop_out(ctx: &TcContext, h: &Headers6, saddr: &[u8; 16]) -> UplinkHop {
    let none = UplinkHop {
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        resolved: false,
    };
    let Some(cfg) = CONFIG.get(0) else {
        return none;
    };
    redirect::uplink_hop6(ctx, cfg, h.proto, saddr, &h.daddr).unwrap_or(none)
}

/// Whether `addr` is in `net`/`len`.
#[inline(always)]
fn in_prefix(addr: &[u8; 16], net: &[u8; 16], len: u8) -> bool {
    let len = usize::from(len.min(128));
    for i in 0..16 {
        let bits = len.saturating_sub(i * 8).min(8);
        if bits == 0 {
            break;
        }
        let mask = 0xffu8 << (8 - bits);
        if (addr[i] ^ net[i]) & mask != 0 {
            return false;
        }
    }
    true
}

/// Masquerades the new flow of `h` from a task whose policy is `policy` (its egress rules
/// allowed it; `masquerades` said yes): from the uplink's address, the task's source port kept
/// when free towards the destination and chosen otherwise, counted against the task's share
/// (`nat_quota`), and sent out of the uplink after a FIB lookup, hop limit decremented. When
/// the FIB has no route out of the uplink, or the hop limit ends here, the kernel carries it
/// untranslated, tracked as any flow it carries.
/// A function of its own (a BPF-to-BPF call), so that the flow record's frame and this one's
/// are side by side rather than stacked.
#[inline(never)]
pub fn masquerade(ctx: &TcContext, h: &Headers6, policy: u32) -> Result<Verdict, DropReason> {
    let Some(key) = conntrack::key_of(h) else {
        return Err(DropReason::TailCallFailed);
    };
    let Some(c6) = CONFIG6.get(0) else {
        return forward6::kernel_flow(&key, h, policy);
    };
    if nat6::hop_limit(ctx) <= 1 {
        return forward6::kernel_flow(&key, h, policy);
    }
    let hop = hop_out(ctx, h, &c6.uplink_ipv6);
    if hop.ifindex == 0 {
        return forward6::kernel_flow(&key, h, policy);
    }
    let mut nat = key.tuple();
    nat.saddr = c6.uplink_ipv6;
    nat_quota::take6(&key)?;
    if let Err(e) = conntrack::create6_chosen(&key, &mut nat, KIND_MASQUERADE, h) {
        nat_quota::give_back6(&key);
        return Err(e);
    }
    send_out(ctx, h, &nat, &hop)
}

/// Sends `h` rewritten to `nat` out of the uplink to `hop`, hop limit decremented. A function of
/// its own (a BPF-to-BPF call): the rewrite's temporaries get a frame beside the flow's
/// creation, not under it.
#[inline(never)]
fn send_out(
    ctx: &TcContext,
    h: &Headers6,
    nat: &Nat<[u8; 16]>,
    hop: &UplinkHop,
) -> Result<Verdict, DropReason> {
    note_source(&nat.saddr);
    nat6::rewrite(ctx, h, &To::nat(nat))?;
    nat6::decrement_hop_limit(ctx)?;
    redirect::to_uplink(ctx, hop)
}

/// An `ICMPv6` error a task whose policy is `policy` sends about a packet it received in a
/// flow ecsnet translated (a published port's request, a masqueraded flow's reply, a hairpin flow's packet): when the
/// quote reversed is that flow's key from this task and the error goes to the flow's other
/// end, the error goes on as the flow's packets do, from the host's side: out of the uplink,
/// or into the other task of a hairpin, hop limit decremented. Anything else (a forged quote,
/// another destination, an error about a task reaching itself) is judged by the task's egress
/// rules alone and goes on untranslated. A function of its own (a BPF-to-BPF call), as the
/// lookup and the FIB's are beside it.
#[inline(never)]
pub fn error_out(ctx: &TcContext, h: &Headers6, policy: u32) -> Result<Verdict, DropReason> {
    let quote = h.l4 + ICMPV6_HLEN;
    let mut qdport = 0;
    let e = quoted_by_task(ctx, h, &mut qdport);
    let qproto = load::<u8>(ctx, quote + QUOTE_NEXT_AT);
    let (false, Ok(qproto)) = (e.is_null() || nat6::hop_limit(ctx) <= 1, qproto) else {
        return forward6::unchecked_egress(h, policy);
    };
    // SAFETY: a `Tracked::e` (non-null), valid for this program run.
    let e = unsafe { &*e };
    let fix = ErrorFix {
        quote,
        qproto,
        side: ErrorSide::Out,
        old: (&h.saddr, qdport),
        new: (&e.nat_saddr, e.nat_sport),
    };
    if e.kind == KIND_HAIRPIN {
        // Into the task at the other end, which sent the quoted packet to the host's address.
        let (Some(cfg), Some(dst)) = (CONFIG.get(0), forward6::task6(&e.nat_daddr)) else {
            return forward6::unchecked_egress(h, policy);
        };
        nat6::translate_error(ctx, h, &fix)?;
        if dst.mac == [0; 6] {
            return Ok(Verdict::Pass);
        }
        nat6::decrement_hop_limit(ctx)?;
        account::tc(ctx, dst.ifindex, HOOK_TC_EGRESS);
        return redirect::to_task(ctx, cfg, &dst, true);
    }
    let hop = hop_out(ctx, h, &e.nat_saddr);
    if hop.ifindex == 0 {
        return forward6::unchecked_egress(h, policy);
    }
    nat6::translate_error(ctx, h, &fix)?;
    note_source(&e.nat_saddr);
    nat6::decrement_hop_limit(ctx)?;
    redirect::to_uplink(ctx, &hop)
}

/// The entry of the translated flow (`KIND_INBOUND`, `KIND_MASQUERADE`, `KIND_HAIRPIN`) whose
/// key is the packet `h` quotes reversed, from the error's source to its destination: the
/// task's own side of the flow, towards the flow's other end, never an entry another end's
/// packets match. A task reaching itself (the other end is the host's address, not the task
/// the entry delivers to) has none. Null for anything else; `qdport` is set to the quoted
/// destination port (the key's source port).
#[inline(never)]
fn quoted_by_task(ctx: &TcContext, h: &Headers6, qdport: &mut u16) -> *const CtEntry6 {
    let Ok(quoted) = forward6::quoted_key(ctx, h) else {
        return core::ptr::null();
    };
    let key = quoted.reversed();
    if key.saddr != h.saddr || key.daddr != h.daddr {
        return core::ptr::null();
    }
    let Some(t) = conntrack::lookup(&key) else {
        return core::ptr::null();
    };
    // SAFETY: see `Tracked::e`.
    let e = unsafe { &*t.e };
    let ours = match e.kind {
        KIND_INBOUND | KIND_MASQUERADE => true,
        KIND_HAIRPIN => e.nat_daddr == key.daddr,
        _ => false,
    };
    if !ours {
        return core::ptr::null();
    }
    *qdport = key.sport;
    t.e
}

/// Whether a task's new flow `h`, to an address no task has, is ecsnet's to translate from a
/// new state (`tc_task_ipv6_nat`): masqueraded out of the host (`masquerades`), or to a
/// published port on one of the host's addresses (a hairpin). A function of its own (a
/// BPF-to-BPF call), for the caller's stack.
#[inline(never)]
pub fn translates(h: &Headers6) -> bool {
    if is_local6(&h.daddr) {
        return published6(h).is_some_and(|t| forward6::task6(&t.addr).is_some());
    }
    masquerades(h)
}

/// Opens a task's new flow to a port published on one of the host's addresses (`translates`),
/// its egress rules passed: the receiving task's ingress rules judge the sender's address and
/// the container port, then the flow is tracked `KIND_HAIRPIN`, to go into the receiving task
/// translated (`hairpin_on`), past the kernel's DNAT. A task reaching its own published port
/// gets the packet from the bridge's address (it would drop one from its own), its port kept
/// when free and chosen otherwise. None once the flow is open; else the packet's verdict (the
/// kernel's path when ecsnet cannot carry it). A function of its own (a BPF-to-BPF call).
#[inline(never)]
pub fn hairpin(ctx: &TcContext, h: &Headers6, policy: u32) -> Result<Option<Verdict>, DropReason> {
    let Some(key) = conntrack::key_of(h) else {
        return Err(DropReason::TailCallFailed);
    };
    let (Some(target), Some(c6)) = (published6(h), CONFIG6.get(0)) else {
        return forward6::kernel_flow(&key, h, policy).map(Some);
    };
    let Some(dst) = forward6::task6(&target.addr) else {
        return forward6::kernel_flow(&key, h, policy).map(Some);
    };
    if !allows_port(dst.policy, DIR_INGRESS, &h.saddr, h.proto, target.port) {
        return Err(DropReason::SgIngress);
    }
    events::allowed6_inbound(h, &dst, &target);
    // The kernel sends the time-exceeded error; nothing to track.
    if nat6::hop_limit(ctx) <= 1 {
        return forward6::kernel_flow(&key, h, policy).map(Some);
    }
    let mut nat = key.tuple();
    nat.daddr = target.addr;
    nat.dport = target.port;
    if target.addr == h.saddr {
        nat.saddr = c6.bridge_ipv6;
        conntrack::create6_chosen(&key, &mut nat, KIND_HAIRPIN, h)?;
    } else {
        conntrack::create6_nat(&key, &mut nat, KIND_HAIRPIN, h)?;
    }
    Ok(None)
}

/// The receiving task's ingress rules rejected the hairpin flow of `h` (`hairpin`): counted on
/// that task, with a REJECT record of what it would have seen. A function of its own (a
/// BPF-to-BPF call).
#[inline(never)]
pub fn reject_hairpin(ctx: &TcContext, h: &Headers6) -> Verdict {
    conntrack::reject_fragments(h);
    let Some(target) = published6(h) else {
        return Verdict::Dropped;
    };
    let Some(dst) = forward6::task6(&target.addr) else {
        return Verdict::Dropped;
    };
    let nat = Nat {
        saddr: h.saddr,
        daddr: target.addr,
        sport: h.sport,
        dport: target.port,
    };
    record(ctx, h, &nat, dst.ifindex, ACTION_REJECT);
    drop_on(ctx, DropReason::SgIngress, dst.ifindex, HOOK_TC_INGRESS)
}

/// A packet of a hairpin flow (entry `e`, a `Tracked::e`) from either of its tasks: translated
/// as the entry says and delivered into the task at its other end, hop limit decremented, as
/// the kernel's DNAT and forwarding would. A function of its own (a BPF-to-BPF call).
#[inline(never)]
pub fn hairpin_on(
    ctx: &TcContext,
    h: &Headers6,
    e: *const CtEntry6,
) -> Result<Verdict, DropReason> {
    if e.is_null() {
        return Ok(Verdict::Pass);
    }
    // SAFETY: a `Tracked::e` (non-null), valid for this program run.
    let nat = To::entry(unsafe { &*e });
    let (Some(cfg), Some(dst)) = (CONFIG.get(0), forward6::task6(nat.daddr)) else {
        return Ok(Verdict::Pass);
    };
    if nat6::hop_limit(ctx) <= 1 {
        return Ok(Verdict::Pass);
    }
    note_source(nat.saddr);
    nat6::rewrite(ctx, h, &nat)?;
    if dst.mac == [0; 6] {
        return Ok(Verdict::Pass);
    }
    nat6::decrement_hop_limit(ctx)?;
    account::tc(ctx, dst.ifindex, HOOK_TC_EGRESS);
    let seen = Nat {
        saddr: *nat.saddr,
        daddr: *nat.daddr,
        sport: nat.sport,
        dport: nat.dport,
    };
    record(ctx, h, &seen, dst.ifindex, ACTION_ACCEPT);
    redirect::to_task(ctx, cfg, &dst, true)
}

/// The entry of the hairpin flow `h` belongs to (its connection `tc_task_ipv6_flow` checked and
/// counted before the tail call), or null. A function of its own (a BPF-to-BPF call), for the
/// caller's stack.
#[inline(never)]
pub fn hairpin_entry(h: &Headers6) -> *const CtEntry6 {
    let Some(key) = conntrack::key_of(h) else {
        return core::ptr::null();
    };
    match conntrack::lookup(&key) {
        // SAFETY: see `Tracked::e`.
        Some(t) if unsafe { (*t.e).kind } == KIND_HAIRPIN => t.e,
        _ => core::ptr::null(),
    }
}
