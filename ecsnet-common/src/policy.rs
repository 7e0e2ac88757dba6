//! Security-group policy as the datapath looks it up: two longest-prefix-match tries, so a check
//! costs two lookups whatever the number of rules (SPEC §6).
//!
//! - [`MAP_SG_PEERS`]: (policy, direction, peer address) -> rule set. User space writes one entry
//!   per CIDR a policy names (group references become the members' /32s), each holding the union
//!   of every rule whose CIDR contains it, so the longest match alone decides.
//! - [`MAP_SG_RULES`]: (rule set, protocol, port) -> allowed. Port ranges become aligned
//!   power-of-two blocks; `-1` (every protocol) is a prefix that stops before the protocol.
//!
//! A task's policy number is in [`crate::maps::TaskInfo::policy`]; 0 means no policy at all
//! (every packet allowed, nothing tracked for policy). Tasks with the same security groups share
//! one policy number.

use core::mem::size_of;

/// LPM trie: [`PeerKey`] -> rule-set number (`u32`).
pub const MAP_SG_PEERS: &str = "SG_PEERS";
/// LPM trie: [`RuleKey`] -> `u32` (1: allowed).
pub const MAP_SG_RULES: &str = "SG_RULES";

/// Capacity of [`MAP_SG_PEERS`]: CIDRs over all policies and both directions.
pub const MAX_SG_PEERS: u32 = 65_536;
/// Capacity of [`MAP_SG_RULES`]: port blocks over all rule sets.
pub const MAX_SG_RULES: u32 = 262_144;

/// A policy's inbound rules.
pub const DIR_INGRESS: u32 = 0;
/// A policy's outbound rules.
pub const DIR_EGRESS: u32 = 1;

/// Bits of [`PeerKey`]'s data before the address: the scope.
pub const PEER_SCOPE_BITS: u32 = 32;
/// Bits of [`RuleKey`]'s data before the protocol: the rule set.
pub const RULE_SET_BITS: u32 = 32;
/// Bits of [`RuleKey`]'s data before the port: rule set and protocol.
pub const RULE_PROTO_BITS: u32 = 40;
/// Every meaningful bit of [`RuleKey`]'s data.
pub const RULE_FULL_BITS: u32 = 56;

/// Numbers handed out for policies and rule sets carry a generation bit, so a new policy can be
/// written beside the live one and switched to in one write per task.
pub const GENERATION_BIT: u32 = 1 << 30;

/// The scope of a policy's rules in one direction: `policy << 1 | dir`.
#[inline(always)]
pub const fn scope(policy: u32, dir: u32) -> u32 {
    (policy << 1 | dir).to_be()
}

/// Data of a [`MAP_SG_PEERS`] key (the LPM prefix length comes first in the map key). The scope
/// is always matched in full; `addr` (network byte order) to the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// [`scope`] of the policy and direction, big-endian.
    pub scope: u32,
    pub addr: u32,
}
const _: () = assert!(size_of::<PeerKey>() == 8);

/// Data of a [`MAP_SG_RULES`] key. `port` holds the two bytes the check is about, in packet
/// order: the destination port for TCP and UDP, ICMP type and code for ICMP, zero otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    /// Rule-set number, big-endian (always matched in full).
    pub set: u32,
    pub proto: u8,
    pub port: [u8; 2],
    pub _pad: u8,
}
const _: () = assert!(size_of::<RuleKey>() == 8);

/// The ICMP "port" of a packet: type and code in that order.
#[inline(always)]
pub const fn icmp_port(icmp_type: u8, icmp_code: u8) -> [u8; 2] {
    [icmp_type, icmp_code]
}

/// The address the ECS task metadata and credentials endpoint answers on: reachable from every
/// task whatever its security groups (it never crosses an ENI in awsvpc mode either).
pub const TASK_METADATA_ADDR: [u8; 4] = [169, 254, 170, 2];
/// The EC2 instance metadata service, blocked by `host.blockInstanceMetadata`.
pub const INSTANCE_METADATA_ADDR: [u8; 4] = [169, 254, 169, 254];
