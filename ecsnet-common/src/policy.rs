//! Security-group policy as the datapath looks it up: hash maps probed at a fixed set of prefix
//! lengths, so a check costs the same number of lookups whatever the number of rules (SPEC §6).
//!
//! - [`MAP_SG_PEERS`]: (policy, direction, prefix length, masked peer address) -> [`PeerRules`].
//!   User space expands every CIDR a policy names to the next length of [`PEER_LEVELS`] (group
//!   references become the members' /32s), and gives each entry the union of every rule whose
//!   CIDR contains it, so the first hit, longest level first, decides.
//! - [`MAP_SG_RULES`]: (rule set, protocol, port-prefix length, masked port) -> allowed. Port
//!   ranges become blocks of the sizes [`PORT_LEVELS`] allows, probed exact port first.
//!
//! A lookup is at most `PEER_LEVELS.len() + PORT_LEVELS.len()` hash probes; which of them hits
//! depends on the packet, never on how many rules there are.
//!
//! A task's policy number is in [`crate::maps::TaskInfo::policy`]; 0 means no policy at all
//! (every packet allowed, nothing tracked for policy). Tasks with the same security groups share
//! one policy number.

/// Hash: [`PeerKey`] -> [`PeerRules`].
pub const MAP_SG_PEERS: &str = "SG_PEERS";
/// Hash: [`RuleKey`] -> `u32` (1: allowed).
pub const MAP_SG_RULES: &str = "SG_RULES";

/// Hash: [`PeerKey6`] -> [`PeerRules`], the IPv6 twin of [`MAP_SG_PEERS`].
pub const MAP_SG_PEERS6: &str = "SG_PEERS6";
/// Hash: [`scope`] -> `u32`, the [`PEER_LEVELS6`] a scope's [`MAP_SG_PEERS6`] entries use: bit
/// `len / 8` set for each length `len`. The datapath probes only those (one lookup more, and
/// usually two or three probes instead of 17). A scope without IPv6 entries has no key here.
pub const MAP_SG_LEVELS6: &str = "SG_LEVELS6";

/// Capacity of [`MAP_SG_PEERS`]: expanded CIDRs over all policies and both directions, two
/// generations (see [`GENERATION_BIT`]).
pub const MAX_SG_PEERS: u32 = 65_536;
/// Capacity of [`MAP_SG_RULES`]: port blocks over all rule sets, two generations.
pub const MAX_SG_RULES: u32 = 131_072;

/// Capacity of [`MAP_SG_PEERS6`]: expanded IPv6 CIDRs over all policies and both directions,
/// two generations.
pub const MAX_SG_PEERS6: u32 = 65_536;
/// Capacity of [`MAP_SG_LEVELS6`]: one key per policy and direction, two generations.
pub const MAX_SG_LEVELS6: u32 = 16_384;

/// Prefix lengths [`MAP_SG_PEERS`] holds, probed in this order.
pub const PEER_LEVELS: [u8; 5] = [32, 24, 16, 8, 0];
/// Port-prefix lengths [`MAP_SG_RULES`] holds, probed in this order (16: one port).
pub const PORT_LEVELS: [u8; 5] = [16, 12, 8, 4, 0];

/// Prefix lengths [`MAP_SG_PEERS6`] may hold, every multiple of 8, probed longest first: a
/// CIDR `/n` is expanded to blocks of the next multiple of 8, at most 128 of them.
pub const PEER_LEVELS6: [u8; 17] = [
    128, 120, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40, 32, 24, 16, 8, 0,
];

/// The bit of [`MAP_SG_LEVELS6`]'s mask for prefix length `len` (a multiple of 8).
#[inline(always)]
pub const fn level6_bit(len: u8) -> u32 {
    1 << (len / 8)
}

/// `addr` with only its first `len` bits, `len` a multiple of 8 (one of [`PEER_LEVELS6`]).
#[inline(always)]
pub const fn mask_addr6(addr: [u8; 16], len: u8) -> [u8; 16] {
    let mut out = [0; 16];
    let bytes = (len / 8) as usize;
    let mut i = 0;
    while i < 16 && i < bytes {
        out[i] = addr[i];
        i += 1;
    }
    out
}

/// A policy's inbound rules.
pub const DIR_INGRESS: u32 = 0;
/// A policy's outbound rules.
pub const DIR_EGRESS: u32 = 1;

/// Numbers handed out for policies and rule sets carry a generation bit, so a new policy can be
/// written beside the live one and switched to in one write per task.
pub const GENERATION_BIT: u32 = 1 << 30;

/// The scope of a policy's rules in one direction.
#[inline(always)]
pub const fn scope(policy: u32, dir: u32) -> u32 {
    policy << 1 | dir
}

/// `addr` (host byte order) with only its first `len` bits.
#[inline(always)]
pub const fn mask_addr(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - len))
    }
}

/// `port` (host byte order) with only its first `len` bits.
#[inline(always)]
pub const fn mask_port(port: u16, len: u8) -> u16 {
    if len == 0 {
        0
    } else {
        port & (u16::MAX << (16 - len))
    }
}

/// Key of [`MAP_SG_PEERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// [`scope`] of the policy and direction.
    pub scope: u32,
    /// One of [`PEER_LEVELS`].
    pub len: u8,
    pub _pad: [u8; 3],
    /// The peer address masked to `len` bits, network byte order.
    pub addr: u32,
}
map_type!(PeerKey, 12);

/// Key of [`MAP_SG_PEERS6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey6 {
    /// [`scope`] of the policy and direction.
    pub scope: u32,
    /// One of [`PEER_LEVELS6`].
    pub len: u8,
    pub _pad: [u8; 3],
    /// The peer address masked to `len` bits ([`mask_addr6`]).
    pub addr: [u8; 16],
}
map_type!(PeerKey6, 24);

/// Value of [`MAP_SG_PEERS`]: what the peers of this entry may do.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerRules {
    /// Rule set for [`MAP_SG_RULES`].
    pub set: u32,
    /// 1 when every protocol and port is allowed (`IpProtocol: "-1"`): no second lookup.
    pub all: u32,
}
map_type!(PeerRules, 8);

/// Key of [`MAP_SG_RULES`]. `port` is the 16-bit value the check is about, masked to `len`
/// bits, host byte order: the destination port for TCP and UDP, `type << 8 | code` for ICMP,
/// 0 for other protocols (whose rules always have `len` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub set: u32,
    pub proto: u8,
    /// One of [`PORT_LEVELS`].
    pub len: u8,
    pub port: u16,
}
map_type!(RuleKey, 8);

/// The 16-bit "port" of an ICMP packet for [`RuleKey`]: type and code.
#[inline(always)]
pub const fn icmp_port(icmp_type: u8, icmp_code: u8) -> u16 {
    (icmp_type as u16) << 8 | icmp_code as u16
}

/// The address the ECS task metadata and credentials endpoint answers on: reachable from every
/// task whatever its security groups (it never crosses an ENI in awsvpc mode either).
pub const TASK_METADATA_ADDR: [u8; 4] = [169, 254, 170, 2];
/// The EC2 instance metadata service, blocked by `host.blockInstanceMetadata`.
pub const INSTANCE_METADATA_ADDR: [u8; 4] = [169, 254, 169, 254];
/// The instance metadata service over IPv6 (Nitro instances): `fd00:ec2::254`.
pub const INSTANCE_METADATA_ADDR6: [u8; 16] = [
    0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
];
