//! The forwarding decision shared by the task and uplink programs: continue a tracked flow, open
//! a new one (task to task, published port, hairpin, masquerade), translate the ICMP errors of
//! tracked flows, and leave everything else to the kernel untouched.

use aya_ebpf::programs::TcContext;
use ecsnet_common::{
    DropReason,
    ct::{CtKey, KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND, KIND_LOCAL, KIND_MASQUERADE},
    flow::{ACTION_ACCEPT, ACTION_REJECT, FLOW_EGRESS, FLOW_INGRESS},
    maps::{Config, HOOK_TC_EGRESS, HOOK_TC_INGRESS, PortKey, TaskInfo},
};

use crate::{
    account::{self, Sighting},
    conntrack::{self, Delivered, Fragment, Nat, Rewrite, Tracked},
    events,
    maps::{CONFIG, LOCAL_ADDRS, PORTS},
    nat,
    parse::Headers,
    policy,
    redirect::{self, UplinkHop},
    tasks,
    verdict::{self, Verdict, drop_on},
};

/// Where a packet arrived from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Sent by a task (tc ingress of its interface); its policy 0 is none.
    Task(TaskInfo),
    /// Arrived on the uplink.
    Uplink,
}

impl Origin {
    /// The sending task's policy; 0 (none) for the uplink.
    #[inline(always)]
    fn policy(self) -> u32 {
        match self {
            Origin::Task(t) => t.policy,
            Origin::Uplink => 0,
        }
    }
}

/// Where a translated packet goes.
enum Next {
    Task(TaskInfo),
    Uplink(UplinkHop),
    /// Translated, then handed to the kernel to route (the task's MAC is not known yet).
    Kernel,
}

/// The host's configuration, once `ecsnet up` wrote it.
#[inline(always)]
pub fn config() -> Option<Config> {
    let c = CONFIG.get(0)?;
    if c.uplink_ifindex == 0 {
        None
    } else {
        Some(*c)
    }
}

#[inline(always)]
pub fn is_local(cfg: &Config, addr: u32) -> bool {
    addr == cfg.uplink_ipv4
        || addr == cfg.bridge_ipv4
        || unsafe { LOCAL_ADDRS.get(&addr) }.is_some()
}

/// Whether `addr` is a multicast address, the limited broadcast, or the bridge subnet's
/// broadcast address: where a group MAC is the right destination.
#[inline(always)]
pub fn is_group_addr(cfg: &Config, addr: u32) -> bool {
    let a = u32::from_be(addr);
    if a >> 28 == 0xe || a == u32::MAX {
        return true;
    }
    let prefix = u32::from(cfg.bridge_prefix);
    if prefix == 0 || prefix >= 31 {
        return false;
    }
    let host = u32::MAX >> prefix;
    a & !host == u32::from_be(cfg.bridge_ipv4) & !host && a & host == host
}

/// Where packets with destination `daddr` go; None when ecsnet should not take them.
#[inline(always)]
fn next_hop(ctx: &TcContext, cfg: &Config, h: &Headers, daddr: u32, routed: bool) -> Option<Next> {
    if routed && h.ttl <= 1 {
        // The kernel sends the time-exceeded error.
        return None;
    }
    if let Some(t) = tasks::by_addr(daddr) {
        return Some(if routed && t.mac == [0; 6] {
            Next::Kernel
        } else {
            Next::Task(t)
        });
    }
    redirect::uplink_hop(ctx, cfg, h).map(Next::Uplink)
}

/// Where a packet a task sent went on the uplink side: its addresses after translation.
pub struct PktAddrs {
    pub saddr: u32,
    pub daddr: u32,
}

impl PktAddrs {
    /// The addresses of `h` as it arrived, before any translation.
    #[inline(always)]
    pub fn of(h: &Headers) -> Self {
        PktAddrs {
            saddr: h.saddr,
            daddr: h.daddr,
        }
    }
}

/// Rewrites a packet of a tracked flow to `nat`, the addresses it leaves with noted in `pkt`,
/// and sends it to `next`.
#[inline(always)]
fn rewrite_and_send(
    ctx: &TcContext,
    cfg: &Config,
    h: &Headers,
    next: &Next,
    routed: bool,
    nat: &Nat,
    pkt: &mut PktAddrs,
) -> Result<Verdict, DropReason> {
    pkt.saddr = nat.saddr;
    pkt.daddr = nat.daddr;
    // A later fragment has no transport header: `rewrite` then changes the addresses only.
    nat::rewrite(ctx, h, nat)?;
    send(ctx, cfg, next, routed, h, nat)
}

/// Sends a packet that arrived as `h` and now carries the addresses and ports of `nat`, routed
/// (another subnet: the TTL drops) or not. What goes into a task is counted there, on the task
/// interface's egress as if the bridge had sent it, and recorded in the task's flow log as it
/// arrives (after translation).
#[inline(always)]
fn send(
    ctx: &TcContext,
    cfg: &Config,
    next: &Next,
    routed: bool,
    h: &Headers,
    nat: &Nat,
) -> Result<Verdict, DropReason> {
    // The kernel's forwarding decrements the TTL itself of what is handed to it.
    if routed && !matches!(next, Next::Kernel) {
        nat::decrement_ttl(ctx, h)?;
    }
    match next {
        Next::Task(t) => {
            let (packets, bytes) = account::tc(ctx, t.ifindex, HOOK_TC_EGRESS);
            let seen = Sighting::translated(h, nat, t.ifindex, FLOW_INGRESS, ACTION_ACCEPT);
            account::record(&seen, packets, bytes);
            redirect::to_task(ctx, cfg, t, routed)
        }
        Next::Uplink(hop) => redirect::to_uplink(ctx, hop),
        Next::Kernel => Ok(Verdict::Pass),
    }
}

/// Decides for one unicast IPv4 packet. A packet that opens a flow goes to `open`: the uplink
/// program opens it with [`open_flow`] in place, the task program in a program of its own
/// (a tail call), as one program could not hold both paths within the verifier's limits.
#[inline(always)]
pub fn packet(
    ctx: &TcContext,
    cfg: &Config,
    h: &mut Headers,
    origin: Origin,
    pkt: &mut PktAddrs,
    open: impl FnOnce(&Headers, &CtKey, &mut PktAddrs) -> Result<Verdict, DropReason>,
) -> Result<Verdict, DropReason> {
    let policy = origin.policy();
    if h.is_icmp_error() {
        return icmp_error(ctx, cfg, h, policy);
    }
    match conntrack::track_fragment(h) {
        Fragment::Known => {}
        Fragment::Rejected => return Err(DropReason::Fragment),
        Fragment::Unknown => {
            // A later fragment without its first: only the kernel may reassemble what is its
            // own, and a task with a policy never sends a fragment whose ports nobody checked.
            let ours = match origin {
                Origin::Task(_) => policy != 0 || !is_local(cfg, h.daddr),
                Origin::Uplink => tasks::by_addr(h.daddr).is_some(),
            };
            return if ours {
                Err(DropReason::Fragment)
            } else {
                Ok(Verdict::Pass)
            };
        }
    }
    let Some(key) = conntrack::key_of(h) else {
        return unchecked_egress(h, policy);
    };
    if let Some(t) = conntrack::lookup(&key) {
        return established(ctx, cfg, h, &key, &t, pkt);
    }
    if !conntrack::starts_flow(h) {
        return unchecked_egress(h, policy);
    }
    open(h, &key, pkt)
}

/// Opens the flow of `h`, a packet that starts one and that no entry tracks: checked against
/// the security groups of both ends where they are tasks (the sender's egress rules with the
/// destination as it left the sender, the receiver's ingress rules with the real client and the
/// container port), then translated and sent, or handed to the kernel. A first fragment the
/// rules reject takes its later fragments with it.
#[inline(always)]
pub fn open_flow(
    ctx: &TcContext,
    cfg: &Config,
    h: &Headers,
    key: &CtKey,
    origin: Origin,
    pkt: &mut PktAddrs,
) -> Result<Verdict, DropReason> {
    let same = same_tuple(h);
    let policy = origin.policy();
    let (kind, nat, choose_sport) = 'open: {
        if let Origin::Task(me) = origin {
            if !policy::egress(policy, h, h.daddr, h.dport) {
                conntrack::reject_fragments(h);
                return Err(DropReason::SgEgress);
            }
            allowed(h, policy, me.ifindex, FLOW_EGRESS);
            if let Some(dst) = tasks::by_addr(h.daddr) {
                if let Err(v) = admit(ctx, h, &dst, h.daddr, h.dport) {
                    return Ok(v);
                }
                break 'open (KIND_EAST_WEST, same, false);
            }
        }
        if !is_local(cfg, h.daddr) {
            match origin {
                // Routed to a task without translation: its tc egress checks it (`deliver`).
                Origin::Uplink => return Ok(Verdict::Pass),
                // The metadata endpoints: the host's own rules (ECS's DNAT) route them.
                Origin::Task(_) if policy::is_link_local(h.daddr) => {
                    return kernel_flow(key, h, policy);
                }
                Origin::Task(_) => {
                    let nat = Nat {
                        saddr: cfg.uplink_ipv4,
                        ..same
                    };
                    break 'open (KIND_MASQUERADE, nat, true);
                }
            }
        }
        // To a host address: a published port, or the host's own.
        let Some((addr, port)) = published(h) else {
            return kernel_flow(key, h, policy);
        };
        let Some(dst) = tasks::by_addr(addr) else {
            return Ok(Verdict::Pass);
        };
        if let Err(v) = admit(ctx, h, &dst, addr, port) {
            return Ok(v);
        }
        let nat = Nat {
            daddr: addr,
            dport: port,
            ..same
        };
        match origin {
            Origin::Uplink => (KIND_INBOUND, nat, false),
            // A task reaching itself: it would drop a packet from its own address.
            Origin::Task(_) if addr == h.saddr => {
                let nat = Nat {
                    saddr: cfg.bridge_ipv4,
                    ..nat
                };
                (KIND_HAIRPIN, nat, true)
            }
            Origin::Task(_) => (KIND_HAIRPIN, nat, false),
        }
    };
    let routed = kind != KIND_EAST_WEST;
    let Some(next) = next_hop(ctx, cfg, h, nat.daddr, routed) else {
        return kernel_flow(key, h, policy);
    };
    let mut nat = nat;
    conntrack::create(key, &mut nat, kind, choose_sport, h)?;
    rewrite_and_send(ctx, cfg, h, &next, routed, &nat, pkt)
}

/// The inbound rules of task `dst`, which `h` would reach as `daddr:dport`: Ok when they allow
/// it (a verdict event for `monitor`), else the packet's verdict (see [`reject_ingress`]).
#[inline(always)]
fn admit(
    ctx: &TcContext,
    h: &Headers,
    dst: &TaskInfo,
    daddr: u32,
    dport: u16,
) -> Result<(), Verdict> {
    if !policy::ingress(dst.policy, h, h.saddr, dport) {
        let dropped = reject_ingress(ctx, h, dst, daddr, dport);
        conntrack::reject_fragments(h);
        return Err(dropped);
    }
    allowed(h, dst.policy, dst.ifindex, FLOW_INGRESS);
    Ok(())
}

/// A security group allowed a new flow of a task with a policy: a verdict event for `monitor`.
#[inline(always)]
fn allowed(h: &Headers, policy: u32, ifindex: u32, dir: u8) {
    if policy != 0 {
        events::allowed(h, ifindex, HOOK_TC_INGRESS, dir);
    }
}

/// Task `dst`'s inbound rules reject `h`, which would have reached it as `daddr:dport`: the drop
/// is counted on `dst`, and its flow log gets a REJECT record with the addresses it would have
/// seen.
#[inline(always)]
fn reject_ingress(ctx: &TcContext, h: &Headers, dst: &TaskInfo, daddr: u32, dport: u16) -> Verdict {
    let (packets, bytes) = account::wire(ctx);
    let seen = Sighting {
        ifindex: dst.ifindex,
        dir: FLOW_INGRESS,
        action: ACTION_REJECT,
        proto: h.proto,
        tcp_flags: h.tcp_flags,
        saddr: h.saddr,
        daddr,
        sport: h.sport,
        dport,
        pkt_saddr: h.saddr,
        pkt_daddr: h.daddr,
    };
    account::record(&seen, packets, bytes);
    drop_on(ctx, DropReason::SgIngress, dst.ifindex, HOOK_TC_INGRESS)
}

/// A packet from a task that no tracked flow covers and that opens none (mid-flow from before
/// `up`, protocols the table does not track, ICMP errors about untracked flows): the egress
/// rules alone decide, and the kernel carries it.
#[inline(always)]
pub fn unchecked_egress(h: &Headers, policy: u32) -> Result<Verdict, DropReason> {
    verdict::pass_or(
        policy::egress(policy, h, h.daddr, h.dport),
        DropReason::SgEgress,
    )
}

/// A new flow, already allowed, that the kernel carries: tracked as `KIND_LOCAL` when a policy
/// applies, so that its replies pass the policy on their way back.
#[inline(always)]
fn kernel_flow(key: &CtKey, h: &Headers, policy: u32) -> Result<Verdict, DropReason> {
    if policy != 0 {
        conntrack::create(key, &mut same_tuple(h), KIND_LOCAL, false, h)?;
    }
    Ok(Verdict::Pass)
}

#[inline(always)]
fn same_tuple(h: &Headers) -> Nat {
    Nat {
        saddr: h.saddr,
        daddr: h.daddr,
        sport: h.sport,
        dport: h.dport,
    }
}

/// A packet the kernel delivers to a task whose policy is `policy` (non-zero): ecsnet did not
/// forward it, so its ingress rules are checked here, with the same state as everywhere else.
#[inline(always)]
pub fn deliver(
    ctx: &TcContext,
    h: &mut Headers,
    policy: u32,
    ifindex: u32,
) -> Result<Verdict, DropReason> {
    if h.is_icmp_error() {
        let (key, _) = nat::icmp_error_key(ctx, h)?;
        if conntrack::lookup(&key).is_some() || conntrack::lookup(&key.reversed()).is_some() {
            return Ok(Verdict::Pass);
        }
        return unchecked_ingress(h, policy);
    }
    let key = match conntrack::delivered(h)? {
        Delivered::Tracked => return Ok(Verdict::Pass),
        Delivered::Untracked => return unchecked_ingress(h, policy),
        Delivered::Opens(key) => key,
    };
    if !policy::ingress(policy, h, h.saddr, h.dport) {
        conntrack::reject_fragments(h);
        return Err(DropReason::SgIngress);
    }
    events::allowed(h, ifindex, HOOK_TC_EGRESS, FLOW_INGRESS);
    kernel_flow(&key, h, policy)
}

/// A packet to a task that no tracked flow covers and that opens none: the ingress rules alone
/// decide.
#[inline(always)]
pub fn unchecked_ingress(h: &Headers, policy: u32) -> Result<Verdict, DropReason> {
    verdict::pass_or(
        policy::ingress(policy, h, h.saddr, h.dport),
        DropReason::SgIngress,
    )
}

/// The task address and container port published on `h`'s destination port.
#[inline(always)]
fn published(h: &Headers) -> Option<(u32, u16)> {
    published_port(h.dport, h.proto)
}

/// The task address and container port published on host port `port` (network byte order).
#[inline(always)]
pub fn published_port(port: u16, proto: u8) -> Option<(u32, u16)> {
    let key = PortKey {
        port,
        proto,
        _pad: 0,
    };
    unsafe { PORTS.get(&key) }.map(|t| (t.addr, t.port))
}

/// A packet of a tracked flow: rewritten as its entry says and sent on, and counted on the
/// entry; one the kernel routes elsewhere goes untranslated and uncounted.
#[inline(always)]
fn established(
    ctx: &TcContext,
    cfg: &Config,
    h: &Headers,
    key: &CtKey,
    t: &Tracked,
    pkt: &mut PktAddrs,
) -> Result<Verdict, DropReason> {
    conntrack::check_close(t, h)?;
    let Rewrite { nat, kind } = t.rewrite();
    if kind == KIND_LOCAL {
        conntrack::touch(t, key, h);
        return Ok(Verdict::Pass);
    }
    let routed = kind != KIND_EAST_WEST;
    let Some(next) = next_hop(ctx, cfg, h, nat.daddr, routed) else {
        return Ok(Verdict::Pass);
    };
    conntrack::touch(t, key, h);
    rewrite_and_send(ctx, cfg, h, &next, routed, &nat, pkt)
}

/// An ICMP error: translated like the flow direction it travels with, when that flow is tracked;
/// from a task, an error about a flow nobody tracked is judged by the egress rules.
#[inline(always)]
fn icmp_error(
    ctx: &TcContext,
    cfg: &Config,
    h: &Headers,
    policy: u32,
) -> Result<Verdict, DropReason> {
    let (key, inner): (CtKey, Headers) = nat::icmp_error_key(ctx, h)?;
    let Some(t) = conntrack::lookup(&key) else {
        return unchecked_egress(h, policy);
    };
    let Rewrite { nat, kind } = t.rewrite();
    if kind == KIND_LOCAL {
        return Ok(Verdict::Pass);
    }
    let routed = kind != KIND_EAST_WEST;
    let Some(next) = next_hop(ctx, cfg, h, nat.daddr, routed) else {
        return Ok(Verdict::Pass);
    };
    nat::rewrite_icmp_error(ctx, h, &key, &inner, &nat)?;
    // The outer addresses as `rewrite_icmp_error` left them: the destination always
    // translated, the source only when the flow's own endpoint sent the error.
    let outer = Nat {
        saddr: if h.saddr == key.saddr {
            nat.saddr
        } else {
            h.saddr
        },
        daddr: nat.daddr,
        sport: 0,
        dport: 0,
    };
    send(ctx, cfg, &next, routed, h, &outer)
}
