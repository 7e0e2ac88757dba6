//! The forwarding decision shared by the task and uplink programs: continue a tracked flow, open
//! a new one (task to task, published port, hairpin, masquerade), translate the ICMP errors of
//! tracked flows, and leave everything else to the kernel untouched.

use aya_ebpf::programs::TcContext;
use ecsnet_common::{
    DropReason,
    ct::{CtEntry, CtKey, KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND, KIND_MASQUERADE},
    maps::{Config, PortKey, TaskInfo},
};

use crate::{
    conntrack::{self, Nat},
    maps::{CONFIG, LOCAL_ADDRS, PORTS},
    nat,
    parse::Flow,
    redirect::{self, UplinkHop},
    verdict::Verdict,
};

/// Where a packet arrived from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Sent by a task (tc ingress of its interface).
    Task,
    /// Arrived on the uplink.
    Uplink,
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
fn is_local(cfg: &Config, addr: u32) -> bool {
    addr == cfg.uplink_ipv4
        || addr == cfg.bridge_ipv4
        || unsafe { LOCAL_ADDRS.get(&addr) }.is_some()
}

/// Where packets with destination `daddr` go; None when ecsnet should not take them.
#[inline(always)]
fn next_hop(ctx: &TcContext, cfg: &Config, f: &Flow, daddr: u32, routed: bool) -> Option<Next> {
    if routed && f.ttl <= 1 {
        // The kernel sends the time-exceeded error.
        return None;
    }
    if let Some(t) = redirect::task(daddr) {
        return Some(if routed && t.mac == [0; 6] {
            Next::Kernel
        } else {
            Next::Task(t)
        });
    }
    redirect::uplink_hop(ctx, cfg, f).map(Next::Uplink)
}

#[inline(always)]
fn send(ctx: &TcContext, cfg: &Config, next: &Next, routed: bool) -> Result<Verdict, DropReason> {
    match next {
        Next::Task(t) => redirect::to_task(ctx, cfg, t, routed),
        Next::Uplink(hop) => redirect::to_uplink(ctx, hop),
        Next::Kernel => Ok(Verdict::Pass),
    }
}

/// Decides for one unicast IPv4 packet.
#[inline(always)]
pub fn packet(
    ctx: &TcContext,
    cfg: &Config,
    f: &mut Flow,
    origin: Origin,
) -> Result<Verdict, DropReason> {
    if f.is_icmp_error() {
        return icmp_error(ctx, cfg, f);
    }
    if !conntrack::track_fragment(f) {
        // A later fragment without its first: only the kernel may reassemble what is its own.
        let ours = match origin {
            Origin::Task => !is_local(cfg, f.daddr),
            Origin::Uplink => redirect::task(f.daddr).is_some(),
        };
        return if ours {
            Err(DropReason::Fragment)
        } else {
            Ok(Verdict::Pass)
        };
    }
    let Some(key) = conntrack::key_of(f) else {
        return Ok(Verdict::Pass);
    };
    if let Some(e) = conntrack::lookup(&key) {
        return established(ctx, cfg, f, e);
    }
    if !conntrack::starts_flow(f) {
        return Ok(Verdict::Pass);
    }
    let same = Nat {
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
    };
    let (kind, nat, choose_sport) = match origin {
        Origin::Task if redirect::task(f.daddr).is_some() => (KIND_EAST_WEST, same, false),
        Origin::Task if is_local(cfg, f.daddr) => {
            let Some(p) = published(f) else {
                return Ok(Verdict::Pass);
            };
            if p.0 == f.saddr {
                // A task reaching itself: it would drop a packet from its own address.
                let nat = Nat {
                    saddr: cfg.bridge_ipv4,
                    daddr: p.0,
                    sport: f.sport,
                    dport: p.1,
                };
                (KIND_HAIRPIN, nat, true)
            } else {
                let nat = Nat {
                    daddr: p.0,
                    dport: p.1,
                    ..same
                };
                (KIND_HAIRPIN, nat, false)
            }
        }
        Origin::Task => {
            let nat = Nat {
                saddr: cfg.uplink_ipv4,
                ..same
            };
            (KIND_MASQUERADE, nat, true)
        }
        Origin::Uplink if is_local(cfg, f.daddr) => {
            let Some(p) = published(f) else {
                return Ok(Verdict::Pass);
            };
            let nat = Nat {
                daddr: p.0,
                dport: p.1,
                ..same
            };
            (KIND_INBOUND, nat, false)
        }
        Origin::Uplink => return Ok(Verdict::Pass),
    };
    let routed = kind != KIND_EAST_WEST;
    let Some(next) = next_hop(ctx, cfg, f, nat.daddr, routed) else {
        return Ok(Verdict::Pass);
    };
    let nat = conntrack::create(&key, nat, kind, choose_sport, f, f.tot_len as u64)?;
    nat::rewrite(ctx, f, &nat)?;
    // The kernel's forwarding decrements the TTL itself of what is handed to it.
    if routed && !matches!(next, Next::Kernel) {
        nat::decrement_ttl(ctx, f)?;
    }
    send(ctx, cfg, &next, routed)
}

/// The task address and container port published on `f`'s destination port.
#[inline(always)]
fn published(f: &Flow) -> Option<(u32, u16)> {
    let key = PortKey {
        port: f.dport,
        proto: f.proto,
        _pad: 0,
    };
    unsafe { PORTS.get(&key) }.map(|t| (t.addr, t.port))
}

/// A packet of a tracked flow: rewrite it as its entry says and send it on.
#[inline(always)]
fn established(
    ctx: &TcContext,
    cfg: &Config,
    f: &Flow,
    e: *mut CtEntry,
) -> Result<Verdict, DropReason> {
    // SAFETY: a CT value pointer, valid for this program run (see conntrack::touch).
    let entry = unsafe { *e };
    let routed = entry.kind != KIND_EAST_WEST;
    let Some(next) = next_hop(ctx, cfg, f, entry.nat_daddr, routed) else {
        return Ok(Verdict::Pass);
    };
    conntrack::touch(e, f, f.tot_len as u64);
    let nat = Nat {
        saddr: entry.nat_saddr,
        daddr: entry.nat_daddr,
        sport: entry.nat_sport,
        dport: entry.nat_dport,
    };
    // A later fragment has no transport header: `rewrite` then changes the addresses only.
    nat::rewrite(ctx, f, &nat)?;
    // The kernel's forwarding decrements the TTL itself of what is handed to it.
    if routed && !matches!(next, Next::Kernel) {
        nat::decrement_ttl(ctx, f)?;
    }
    send(ctx, cfg, &next, routed)
}

/// An ICMP error: translated like the flow direction it travels with, when that flow is tracked.
#[inline(always)]
fn icmp_error(ctx: &TcContext, cfg: &Config, f: &Flow) -> Result<Verdict, DropReason> {
    let (key, inner): (CtKey, Flow) = nat::icmp_error_key(ctx, f)?;
    let Some(e) = conntrack::lookup(&key) else {
        return Ok(Verdict::Pass);
    };
    let entry = unsafe { *e };
    let routed = entry.kind != KIND_EAST_WEST;
    let Some(next) = next_hop(ctx, cfg, f, entry.nat_daddr, routed) else {
        return Ok(Verdict::Pass);
    };
    nat::rewrite_icmp_error(ctx, f, &key, &inner, &entry)?;
    // The kernel's forwarding decrements the TTL itself of what is handed to it.
    if routed && !matches!(next, Next::Kernel) {
        nat::decrement_ttl(ctx, f)?;
    }
    send(ctx, cfg, &next, routed)
}
