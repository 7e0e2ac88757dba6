//! Security-group checks: two longest-prefix lookups whatever the number of rules (see
//! `ecsnet_common::policy` for the tries and `ARCHITECTURE.md` for where each check runs).

use aya_ebpf::maps::lpm_trie::Key;
use ecsnet_common::policy::{
    INSTANCE_METADATA_ADDR, PEER_SCOPE_BITS, PeerKey, RULE_FULL_BITS, RuleKey, TASK_METADATA_ADDR,
    icmp_port, scope,
};

use crate::{
    maps::{SG_PEERS, SG_RULES},
    parse::{Flow, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
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

/// Whether `policy` allows, in direction `dir`, `f` with its other end at `peer` and
/// destination port `dport` (network byte order; the port after translation for ingress).
#[inline(always)]
pub fn allows(policy: u32, dir: u32, peer: u32, f: &Flow, dport: u16) -> bool {
    let port = match f.proto {
        IPPROTO_TCP | IPPROTO_UDP => dport.to_ne_bytes(),
        IPPROTO_ICMP => icmp_port(f.icmp_type, f.icmp_code),
        _ => [0, 0],
    };
    allows_port(policy, dir, peer, f.proto, port)
}

/// [`allows`] with the two port bytes given as the tries hold them.
#[inline(always)]
pub fn allows_port(policy: u32, dir: u32, peer: u32, proto: u8, port: [u8; 2]) -> bool {
    if policy == 0 {
        return true;
    }
    let peer_key = Key::new(
        PEER_SCOPE_BITS + 32,
        PeerKey {
            scope: scope(policy, dir),
            addr: peer,
        },
    );
    let Some(set) = SG_PEERS.get(&peer_key) else {
        return false;
    };
    let rule_key = Key::new(
        RULE_FULL_BITS,
        RuleKey {
            set: set.to_be(),
            proto,
            port,
            _pad: 0,
        },
    );
    SG_RULES.get(&rule_key).is_some()
}

/// The egress check of a packet leaving a task towards `daddr`; the task metadata endpoint is
/// always reachable.
#[inline(always)]
pub fn egress(policy: u32, f: &Flow, daddr: u32, dport: u16) -> bool {
    daddr == METADATA || allows(policy, DIR_EGRESS, daddr, f, dport)
}

/// The ingress check of a packet arriving at a task from `saddr`.
#[inline(always)]
pub fn ingress(policy: u32, f: &Flow, saddr: u32, dport: u16) -> bool {
    allows(policy, DIR_INGRESS, saddr, f, dport)
}
