//! Security-group checks: a fixed sequence of hash probes whatever the number of rules (see
//! `ecsnet_common::policy` for the maps and `ARCHITECTURE.md` for where each check runs).

use ecsnet_common::{
    net::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    policy::{
        INSTANCE_METADATA_ADDR, PEER_LEVELS, PEER_LEVELS6, PORT_LEVELS, PeerKey, PeerKey6,
        PeerRules, RuleKey, TASK_METADATA_ADDR, icmp_port, level6_bit, mask_addr, mask_addr6,
        mask_port, scope,
    },
};

use crate::{
    maps::{SG_LEVELS6, SG_PEERS, SG_PEERS6, SG_RULES},
    parse::Headers,
    parse6::{Headers6, PROTO_ICMPV6},
};

pub use ecsnet_common::policy::{DIR_EGRESS, DIR_INGRESS};

/// The task metadata and credentials endpoint, network byte order: never subject to policy.
pub const METADATA: u32 = u32::from_ne_bytes(TASK_METADATA_ADDR);
/// The instance metadata service, network byte order.
pub const IMDS: u32 = u32::from_ne_bytes(INSTANCE_METADATA_ADDR);

/// 169.254.0.0/16: link-local destinations (the metadata endpoints) are the kernel's to route.
#[inline(always)]
pub fn is_link_local(addr: u32) -> bool {
    let b = addr.to_ne_bytes();
    b[0] == 169 && b[1] == 254
}

/// Whether `policy` allows, in direction `dir`, `h` with its other end at `peer` and
/// destination port `dport` (network byte order; the port after translation for ingress).
#[inline(always)]
pub fn allows(policy: u32, dir: u32, peer: u32, h: &Headers, dport: u16) -> bool {
    let port = match h.proto {
        PROTO_TCP | PROTO_UDP => u16::from_be(dport),
        PROTO_ICMP => icmp_port(h.icmp_type, h.icmp_code),
        _ => 0,
    };
    allows_port(policy, dir, peer, h.proto, port)
}

/// [`allows`] with the 16-bit port in host byte order, as `RuleKey` holds it.
#[inline(always)]
pub fn allows_port(policy: u32, dir: u32, peer: u32, proto: u8, port: u16) -> bool {
    if policy == 0 {
        return true;
    }
    let peer_host = u32::from_be(peer);
    let scope = scope(policy, dir);
    let mut rules = None;
    for len in PEER_LEVELS {
        let key = PeerKey {
            scope,
            len,
            _pad: [0; 3],
            addr: mask_addr(peer_host, len).to_be(),
        };
        if let Some(r) = unsafe { SG_PEERS.get(&key) } {
            rules = Some(*r);
            break;
        }
    }
    rules.is_some_and(|r| rules_allow(r, proto, port))
}

/// [`allows`] for an IPv6 packet, with its other end at `peer`: the destination port of TCP
/// and UDP, `type << 8 | code` of `ICMPv6` (`icmp_port`), 0 for other protocols.
#[inline(always)]
pub fn allows6(policy: u32, dir: u32, peer: &[u8; 16], h: &Headers6) -> bool {
    let port = match h.proto {
        PROTO_TCP | PROTO_UDP => u16::from_be(h.dport),
        PROTO_ICMPV6 => icmp_port(h.icmp_type, h.icmp_code),
        _ => 0,
    };
    allows6_port(policy, dir, peer, h.proto, port)
}

/// [`allows_port`] for an IPv6 peer: the same rule sets, found through `SG_PEERS6` at the
/// prefix lengths the scope uses (`SG_LEVELS6`), longest first. A scope with no IPv6 entries
/// allows no IPv6.
#[inline(always)]
pub fn allows6_port(policy: u32, dir: u32, peer: &[u8; 16], proto: u8, port: u16) -> bool {
    if policy == 0 {
        return true;
    }
    let scope = scope(policy, dir);
    let Some(levels) = (unsafe { SG_LEVELS6.get(&scope) }).copied() else {
        return false;
    };
    let mut rules = None;
    for len in PEER_LEVELS6 {
        if levels & level6_bit(len) == 0 {
            continue;
        }
        let key = PeerKey6 {
            scope,
            len,
            _pad: [0; 3],
            addr: mask_addr6(*peer, len),
        };
        if let Some(r) = unsafe { SG_PEERS6.get(&key) } {
            rules = Some(*r);
            break;
        }
    }
    rules.is_some_and(|r| rules_allow(r, proto, port))
}

/// Whether rule set `rules` allows `proto` to `port` (host byte order).
#[inline(always)]
fn rules_allow(rules: PeerRules, proto: u8, port: u16) -> bool {
    if rules.all != 0 {
        return true;
    }
    for len in PORT_LEVELS {
        let key = RuleKey {
            set: rules.set,
            proto,
            len,
            port: mask_port(port, len),
        };
        if unsafe { SG_RULES.get(&key) }.is_some() {
            return true;
        }
    }
    false
}

/// The egress check of a packet leaving a task towards `daddr`; the task metadata endpoint is
/// always reachable.
#[inline(always)]
pub fn egress(policy: u32, h: &Headers, daddr: u32, dport: u16) -> bool {
    daddr == METADATA || allows(policy, DIR_EGRESS, daddr, h, dport)
}

/// The ingress check of a packet arriving at a task from `saddr`.
#[inline(always)]
pub fn ingress(policy: u32, h: &Headers, saddr: u32, dport: u16) -> bool {
    allows(policy, DIR_INGRESS, saddr, h, dport)
}
