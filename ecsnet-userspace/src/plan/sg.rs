//! Security groups compiled into the policy maps of `ecsnet_common::policy` (SPEC §6), for IPv4
//! (`SG_PEERS`) and IPv6 (`SG_PEERS6`, `SG_LEVELS6`) peers, with rule sets (`SG_RULES`) shared
//! by both. Tasks with no groups under `defaultPolicy: allow` get policy 0: no entries, nothing
//! checked.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::{Ipv4Addr, Ipv6Addr},
};

use ecsnet_common::{
    ct::{
        CtEntry, CtEntry6, CtKey, CtKey6, KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND, KIND_LOCAL,
        KIND_MASQUERADE, PROTO_ICMP as ICMP, PROTO_TCP as TCP, PROTO_UDP as UDP,
    },
    policy::{
        DIR_EGRESS, DIR_INGRESS, GENERATION_BIT, MAX_SG_LEVELS6, MAX_SG_PEERS, MAX_SG_PEERS6,
        MAX_SG_RULES, PEER_LEVELS, PEER_LEVELS6, PORT_LEVELS, PeerKey, PeerKey6, PeerRules,
        RuleKey, TASK_METADATA_ADDR, level6_bit, mask_addr, scope,
    },
};

use crate::{
    plan::entries::from_be,
    state::{
        DefaultPolicy,
        rules::{Icmp, PROTO_ICMPV6 as ICMPV6, Rule, Rules, Traffic, mask_addr128},
    },
};

/// What one rule allows of the packets from or to its CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Allow {
    /// Every protocol and port.
    All,
    /// One protocol, a range of its 16-bit "port": the destination port for TCP and UDP,
    /// `type << 8 | code` for ICMP and `ICMPv6`, the whole range for other protocols.
    Range(u8, u16, u16),
}

/// The 16-bit "port" range of ICMP or `ICMPv6` types and codes.
fn icmp_range(icmp: Icmp) -> (u16, u16) {
    match icmp {
        Icmp::All => (0, u16::MAX),
        Icmp::Type(t) => {
            let t = u16::from(t) << 8;
            (t, t | 0xff)
        }
        Icmp::Code(t, c) => {
            let p = u16::from(t) << 8 | u16::from(c);
            (p, p)
        }
    }
}

/// The allows of a rule's traffic (SPEC §6: protocol, ports, ICMP type and code).
impl From<Traffic> for Allow {
    fn from(t: Traffic) -> Self {
        match t {
            Traffic::All => Self::All,
            Traffic::Tcp(p) => Self::Range(TCP, p.from(), p.to()),
            Traffic::Udp(p) => Self::Range(UDP, p.from(), p.to()),
            Traffic::Icmp(i) => {
                let (lo, hi) = icmp_range(i);
                Self::Range(ICMP, lo, hi)
            }
            Traffic::Icmpv6(i) => {
                let (lo, hi) = icmp_range(i);
                Self::Range(ICMPV6, lo, hi)
            }
            Traffic::Other(p) => Self::Range(p, 0, u16::MAX),
        }
    }
}

/// A rule set in canonical form: everything, or per protocol sorted, merged ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleSet {
    pub all: bool,
    pub ranges: BTreeMap<u8, Vec<(u16, u16)>>,
}

impl RuleSet {
    fn of(allows: &BTreeSet<Allow>) -> Self {
        if allows.contains(&Allow::All) {
            return Self {
                all: true,
                ranges: BTreeMap::new(),
            };
        }
        let mut ranges: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
        for a in allows {
            if let Allow::Range(p, lo, hi) = *a {
                ranges.entry(p).or_default().push((lo, hi));
            }
        }
        for list in ranges.values_mut() {
            list.sort_unstable();
            let mut merged: Vec<(u16, u16)> = Vec::with_capacity(list.len());
            for &(lo, hi) in list.iter() {
                match merged.last_mut() {
                    Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => {
                        last.1 = last.1.max(hi);
                    }
                    _ => merged.push((lo, hi)),
                }
            }
            *list = merged;
        }
        Self { all: false, ranges }
    }

    /// Whether a packet of `proto` with 16-bit `port` is allowed.
    pub fn allows(&self, proto: u8, port: u16) -> bool {
        self.all
            || self
                .ranges
                .get(&proto)
                .is_some_and(|r| r.iter().any(|&(lo, hi)| lo <= port && port <= hi))
    }
}

/// Splits `[lo, hi]` into aligned blocks of the sizes `PORT_LEVELS` allows, largest first:
/// (start, prefix length).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut at = u32::from(lo);
    while at <= u32::from(hi) {
        let fits = |len: u8| {
            let size = 1u32 << (16 - len);
            at % size == 0 && at + size - 1 <= u32::from(hi)
        };
        let len = PORT_LEVELS
            .iter()
            .rev()
            .copied()
            .find(|&l| fits(l))
            .unwrap_or(16);
        out.push((start_of(at), len));
        at += 1 << (16 - len);
    }
    out
}

/// A block start below 2^16 (`port_blocks` stops at `hi`).
fn start_of(at: u32) -> u16 {
    u16::try_from(at).expect("a block starts at a port")
}

/// A family's peer addresses as the policy maps hold them: a number, host order.
trait PeerAddr: Copy + Ord + Hash {
    /// The prefix lengths the datapath probes, longest first.
    const LEVELS: &'static [u8];
    /// `self` with only its first `len` bits.
    fn masked(self, len: u8) -> Self;
    /// The `i`th block of length `level` from `self`, `level` over 0.
    fn nth_block(self, i: u32, level: u8) -> Self;
}

impl PeerAddr for u32 {
    const LEVELS: &'static [u8] = &PEER_LEVELS;
    fn masked(self, len: u8) -> Self {
        mask_addr(self, len)
    }
    fn nth_block(self, i: u32, level: u8) -> Self {
        self + (i << (32 - level))
    }
}

impl PeerAddr for u128 {
    const LEVELS: &'static [u8] = &PEER_LEVELS6;
    fn masked(self, len: u8) -> Self {
        mask_addr128(self, len)
    }
    fn nth_block(self, i: u32, level: u8) -> Self {
        self + (u128::from(i) << (128 - level))
    }
}

/// The blocks of the levels the datapath probes a CIDR expands to: (address, prefix length),
/// host order.
fn peer_blocks<A: PeerAddr>(addr: A, len: u8) -> impl Iterator<Item = (A, u8)> {
    let level = level_of::<A>(len);
    // Levels are 8 apart: at most 128 blocks, each inside the CIDR.
    let count = 1u32 << (level - len);
    (0..count).map(move |i| {
        let block = if i == 0 {
            addr
        } else {
            addr.nth_block(i, level)
        };
        (block, level)
    })
}

/// The length the datapath probes that a CIDR of length `len` expands to: the next one up.
fn level_of<A: PeerAddr>(len: u8) -> u8 {
    A::LEVELS
        .iter()
        .rev()
        .copied()
        .find(|&l| l >= len)
        .unwrap_or(len)
}

/// How many distinct blocks the CIDRs of `by_cidr` expand to, counted without making them (a
/// hostile state's millions of blocks are refused, not built). Two CIDRs expanding to one level
/// are nested or apart, so a level's blocks are those of its outermost CIDRs, each
/// `2^(level - len)`; in (level, address, length) order each CIDR comes after any that holds it.
fn block_count<A: PeerAddr>(by_cidr: &ByCidr<A>) -> usize {
    let mut cidrs: Vec<(u8, A, u8)> = by_cidr
        .keys()
        .map(|&(addr, len)| (level_of::<A>(len), addr, len))
        .collect();
    cidrs.sort_unstable();
    let mut count = 0;
    let mut outer: Option<(u8, A, u8)> = None;
    for (level, addr, len) in cidrs {
        if let Some((l, a, n)) = outer
            && l == level
            && addr.masked(n) == a
        {
            continue;
        }
        outer = Some((level, addr, len));
        count += 1usize << (level - len);
    }
    count
}

/// Compiling failed: the policy does not fit in the datapath's tries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the security groups need {needed} {what}, more than the {max} ecsnet holds; use fewer or wider CIDRs and port ranges"
)]
pub struct TooBig {
    pub what: &'static str,
    pub needed: usize,
    pub max: usize,
}

/// Expanded blocks (host order address, length) -> rule-set number, by (policy, direction):
/// what a peer map holds, for checks in user space.
type Blocks<A> = HashMap<(u32, u32), HashMap<(A, u8), u32>>;

/// The policy maps' entries for one state, and the means to check packets against them.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// Task address -> policy number (0: no policy).
    pub task_policy: HashMap<Ipv4Addr, u32>,
    /// Task IPv6 address -> its task's policy number, for the tasks that have one.
    pub task_policy6: HashMap<Ipv6Addr, u32>,
    /// `SG_PEERS` entries.
    pub peers: Vec<(PeerKey, PeerRules)>,
    /// `SG_PEERS6` entries.
    pub peers6: Vec<(PeerKey6, PeerRules)>,
    /// `SG_LEVELS6` entries: scope -> the `level6_bit`s of the lengths its `SG_PEERS6` entries
    /// use. Scopes without IPv6 entries have none.
    pub levels6: Vec<(u32, u32)>,
    /// `SG_RULES` entries (value 1).
    pub rules: Vec<(RuleKey, u32)>,
    cidrs: Blocks<u32>,
    cidrs6: Blocks<u128>,
    sets: HashMap<u32, RuleSet>,
}

/// The first number of generation `generation` (0 or 1); numbers start one above it.
fn base_of(generation: u32) -> u32 {
    if generation == 0 { 0 } else { GENERATION_BIT }
}

/// The next number after `used` of them, in generation base `base`.
fn next_number(base: u32, used: usize) -> u32 {
    base + u32::try_from(used).expect("fewer numbers than the tries hold") + 1
}

/// The rules of one direction of one policy, by CIDR (host order address, length).
type ByCidr<A> = HashMap<(A, u8), BTreeSet<Allow>>;

/// The rules of one direction of one policy by CIDR, each family apart.
#[derive(Default)]
struct PolicyCidrs {
    v4: ByCidr<u32>,
    v6: ByCidr<u128>,
}

/// A group's members' addresses: IPv4, and IPv6 of those that have one.
#[derive(Clone, Default)]
struct Members {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
}

/// The rules of direction `dir` of the groups `groups` (indexes into `rules.groups`), whose
/// members are `members` (by group index). A reference to a group stands for its members'
/// addresses of both families, an `IpRanges` CIDR for IPv4 peers only, an `Ipv6Ranges` one for
/// IPv6 peers only. No group: `defaultPolicy: deny`, AWS's default group without its
/// self-reference: nothing in, everything out, in both families.
fn rules_by_cidr(rules: &Rules, members: &[Members], groups: &[usize], dir: u32) -> PolicyCidrs {
    let mut by = PolicyCidrs::default();
    if groups.is_empty() {
        if dir == DIR_EGRESS {
            by.v4.entry((0, 0)).or_default().insert(Allow::All);
            by.v6.entry((0, 0)).or_default().insert(Allow::All);
        }
        return by;
    }
    for &g in groups {
        let group = &rules.groups[g];
        let list: &[Rule] = if dir == DIR_INGRESS {
            &group.inbound
        } else {
            &group.outbound
        };
        for rule in list {
            let allow = Allow::from(rule.traffic);
            let refs = || rule.groups.iter().map(|&p| &members[p]);
            let cidrs = rule
                .cidrs
                .iter()
                .map(|n| (u32::from(n.addr()), n.prefix_len()));
            let peers = refs().flat_map(|m| &m.v4).map(|a| (u32::from(*a), 32));
            for key in cidrs.chain(peers) {
                by.v4.entry(key).or_default().insert(allow);
            }
            let cidrs6 = rule
                .cidrs6
                .iter()
                .map(|n| (u128::from(n.addr()), n.prefix_len()));
            let peers6 = refs().flat_map(|m| &m.v6).map(|a| (u128::from(*a), 128));
            for key in cidrs6.chain(peers6) {
                by.v6.entry(key).or_default().insert(allow);
            }
        }
    }
    by
}

/// Expanded blocks (host order address, length), each with its union of rules.
type Unions<A> = Vec<((A, u8), BTreeSet<Allow>)>;

/// Each block the CIDRs of `by_cidr` expand to, with the union of the rules of every CIDR that
/// contains it, so the first block the datapath finds, longest first, decides.
fn unions<A: PeerAddr>(by_cidr: &ByCidr<A>) -> Unions<A> {
    let blocks: BTreeSet<(A, u8)> = by_cidr
        .keys()
        .flat_map(|&(addr, len)| peer_blocks(addr, len))
        .collect();
    // Only the lengths some CIDR has can contain a block: up to 129 for IPv6, usually a few.
    let lens: BTreeSet<u8> = by_cidr.keys().map(|&(_, len)| len).collect();
    blocks
        .into_iter()
        .map(|(addr, len)| {
            let mut allows = BTreeSet::new();
            for &l in lens.range(..=len) {
                if let Some(a) = by_cidr.get(&(addr.masked(l), l)) {
                    allows.extend(a.iter().copied());
                }
            }
            ((addr, len), allows)
        })
        .collect()
}

/// The rule-set number of the first block of `cidrs` that holds `addr`, longest first, as the
/// datapath probes.
fn lookup<A: PeerAddr>(cidrs: &HashMap<(A, u8), u32>, addr: A) -> Option<u32> {
    A::LEVELS
        .iter()
        .find_map(|&len| cidrs.get(&(addr.masked(len), len)))
        .copied()
}

/// `needed` entries of `what` fit in a map of `capacity`: in half of it, since it holds two
/// generations, the live one staying while this one is written beside it.
fn fits(what: &'static str, needed: usize, capacity: u32) -> Result<(), TooBig> {
    let max = capacity as usize / 2;
    if needed > max {
        return Err(TooBig { what, needed, max });
    }
    Ok(())
}

/// What [`TooBig`] calls the entries of `SG_PEERS` and of `SG_PEERS6`.
const CIDR_ENTRIES: &str = "CIDR entries";
const CIDR_ENTRIES6: &str = "IPv6 CIDR entries";

impl Compiled {
    /// Compiles validated `rules` with numbers of generation `generation` (0 or 1).
    ///
    /// Tasks with the same set of security groups share one policy. For each policy and
    /// direction every rule becomes (CIDR, protocol, port range); references to groups become
    /// the /32 and /128 of each current member. Each CIDR is expanded to blocks of the next
    /// prefix length the datapath probes (`PEER_LEVELS`, `PEER_LEVELS6`), and each block gets
    /// the union of the rules of every CIDR that contains it, so the first block the datapath
    /// finds decides. Identical unions share a rule set, whichever the family, whose port
    /// ranges become blocks of the sizes `PORT_LEVELS` allows. The result answers checks itself
    /// ([`Compiled::allows`], [`Compiled::allows6`]), which is how `--reset-flows` finds the
    /// tracked flows the new rules no longer allow.
    pub fn new(rules: &Rules, generation: u32) -> Result<Self, TooBig> {
        let base = base_of(generation);
        let mut out = Self::default();
        let policies = out.number_policies(rules, base);
        let mut members: Vec<Members> = vec![Members::default(); rules.groups.len()];
        for t in &rules.tasks {
            for &g in &t.groups {
                members[g].v4.push(t.addr);
                members[g].v6.extend(t.addr6);
            }
        }
        let mut set_ids: HashMap<RuleSet, u32> = HashMap::new();
        let mut set_of = |allows: &BTreeSet<Allow>| {
            let next = next_number(base, set_ids.len());
            *set_ids.entry(RuleSet::of(allows)).or_insert(next)
        };
        let mut by_scope = Vec::with_capacity(2 * policies.len());
        for (groups, &policy) in &policies {
            let groups: Vec<usize> = groups.iter().map(|&(_, g)| g).collect();
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                by_scope.push((policy, dir, rules_by_cidr(rules, &members, &groups, dir)));
            }
        }
        // The peer maps' entries counted before any is made.
        let cidrs = |f: fn(&PolicyCidrs) -> usize| by_scope.iter().map(|(_, _, by)| f(by)).sum();
        let peers = cidrs(|by| block_count(&by.v4));
        let peers6 = cidrs(|by| block_count(&by.v6));
        let scopes6 = cidrs(|by| usize::from(!by.v6.is_empty()));
        fits(CIDR_ENTRIES, peers, MAX_SG_PEERS)?;
        fits(CIDR_ENTRIES6, peers6, MAX_SG_PEERS6)?;
        fits("IPv6 policy scopes", scopes6, MAX_SG_LEVELS6)?;
        for (policy, dir, by) in &by_scope {
            out.add_peers(*policy, *dir, &by.v4, &mut set_of);
            out.add_peers6(*policy, *dir, &by.v6, &mut set_of);
        }
        out.sets = set_ids.into_iter().map(|(s, id)| (id, s)).collect();
        out.add_port_blocks();
        fits("port-block entries", out.rules.len(), MAX_SG_RULES)?;
        Ok(out)
    }

    /// Gives each task its policy: one number per set of groups (by id, in first-seen order),
    /// 0 for a task without groups unless `defaultPolicy` is deny. Returns the sets numbered.
    fn number_policies<'a>(
        &mut self,
        rules: &'a Rules,
        base: u32,
    ) -> BTreeMap<Vec<(&'a str, usize)>, u32> {
        let deny = rules.default_policy == DefaultPolicy::Deny;
        let mut policies = BTreeMap::new();
        for t in &rules.tasks {
            let id = if t.groups.is_empty() && !deny {
                0
            } else {
                let groups: Vec<(&str, usize)> = t
                    .groups
                    .iter()
                    .map(|&g| (rules.groups[g].id.as_str(), g))
                    .collect();
                let next = next_number(base, policies.len());
                *policies.entry(groups).or_insert(next)
            };
            self.task_policy.insert(t.addr, id);
            if let Some(a) = t.addr6 {
                self.task_policy6.insert(a, id);
            }
        }
        policies
    }

    /// The `SG_PEERS` entries of direction `dir` of `policy`: each CIDR expanded to the blocks
    /// the datapath probes, each block with the union of every rule whose CIDR contains it
    /// (`set_of` numbers the union).
    fn add_peers(
        &mut self,
        policy: u32,
        dir: u32,
        by_cidr: &ByCidr<u32>,
        set_of: &mut impl FnMut(&BTreeSet<Allow>) -> u32,
    ) {
        let cidrs = self.cidrs.entry((policy, dir)).or_default();
        for ((addr, len), allows) in unions(by_cidr) {
            let set = set_of(&allows);
            cidrs.insert((addr, len), set);
            self.peers.push((
                PeerKey {
                    scope: scope(policy, dir),
                    len,
                    _pad: [0; 3],
                    addr: addr.to_be(),
                },
                PeerRules { set, all: 0 },
            ));
        }
    }

    /// The `SG_PEERS6` entries of direction `dir` of `policy`, as [`Self::add_peers`] makes
    /// `SG_PEERS`'s, and the `SG_LEVELS6` entry of their lengths (none without entries).
    fn add_peers6(
        &mut self,
        policy: u32,
        dir: u32,
        by_cidr: &ByCidr<u128>,
        set_of: &mut impl FnMut(&BTreeSet<Allow>) -> u32,
    ) {
        let blocks = unions(by_cidr);
        if blocks.is_empty() {
            return;
        }
        let scope = scope(policy, dir);
        let mut levels = 0;
        let cidrs = self.cidrs6.entry((policy, dir)).or_default();
        for ((addr, len), allows) in blocks {
            let set = set_of(&allows);
            cidrs.insert((addr, len), set);
            levels |= level6_bit(len);
            self.peers6.push((
                PeerKey6 {
                    scope,
                    len,
                    _pad: [0; 3],
                    addr: addr.to_be_bytes(),
                },
                PeerRules { set, all: 0 },
            ));
        }
        self.levels6.push((scope, levels));
    }

    /// Marks the peers whose set allows everything, and writes the `SG_RULES` port blocks of
    /// every other set.
    fn add_port_blocks(&mut self) {
        let peers = self.peers.iter_mut().map(|(_, r)| r);
        for rules in peers.chain(self.peers6.iter_mut().map(|(_, r)| r)) {
            rules.all = u32::from(self.sets[&rules.set].all);
        }
        for (&id, set) in &self.sets {
            if set.all {
                continue;
            }
            for (&proto, ranges) in &set.ranges {
                for &(lo, hi) in ranges {
                    for (port, len) in port_blocks(lo, hi) {
                        let key = RuleKey {
                            set: id,
                            proto,
                            len,
                            port,
                        };
                        self.rules.push((key, 1));
                    }
                }
            }
        }
    }

    /// The policy number of the task at `addr`; 0 when it has none or is not a task.
    pub fn policy_of(&self, addr: Ipv4Addr) -> u32 {
        self.task_policy.get(&addr).copied().unwrap_or(0)
    }

    /// The policy number of the task whose IPv6 address is `addr`; 0 when it has none or is not
    /// a task's.
    pub fn policy_of6(&self, addr: Ipv6Addr) -> u32 {
        self.task_policy6.get(&addr).copied().unwrap_or(0)
    }

    /// Whether rule set `set` allows `proto` to `port`.
    fn set_allows(&self, set: Option<u32>, proto: u8, port: u16) -> bool {
        set.and_then(|set| self.sets.get(&set))
            .is_some_and(|s| s.allows(proto, port))
    }

    /// Whether `policy` allows, in direction `dir`, a packet whose other end is `peer`, of
    /// protocol `proto` with 16-bit `port` (see [`Allow::Range`]). The same answer the
    /// datapath's probes give.
    pub fn allows(&self, policy: u32, dir: u32, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        policy == 0
            || self.set_allows(
                self.cidrs
                    .get(&(policy, dir))
                    .and_then(|c| lookup(c, u32::from(peer))),
                proto,
                port,
            )
    }

    /// [`Self::allows`] for an IPv6 peer (`peer`, the packet's 16 bytes): what `SG_PEERS6`
    /// answers. A policy with no IPv6 entries in `dir` allows no IPv6 that way.
    pub fn allows6(&self, policy: u32, dir: u32, peer: [u8; 16], proto: u8, port: u16) -> bool {
        policy == 0
            || self.set_allows(
                self.cidrs6
                    .get(&(policy, dir))
                    .and_then(|c| lookup(c, u128::from_be_bytes(peer))),
                proto,
                port,
            )
    }
}

/// The 16-bit "port" a tracked flow was checked with (see [`Allow::Range`]), from its
/// protocol and destination port (network order).
fn flow_port(proto: u8, dport: u16) -> u16 {
    match proto {
        TCP | UDP => u16::from_be(dport),
        // Only echo requests open ICMP flows.
        ICMP => 8 << 8,
        ICMPV6 => 128 << 8,
        _ => 0,
    }
}

/// A tracked flow as the policy judges it: its original direction's addresses and destination
/// port, and where inbound and hairpin flows were translated to.
struct Flow<A> {
    kind: u8,
    saddr: A,
    daddr: A,
    dport: u16,
    nat_daddr: A,
    nat_dport: u16,
}

impl<A: Copy> Flow<A> {
    /// Whether `check(dir, task, peer, dport)` allows it at every point the datapath checked it
    /// when it started (see ARCHITECTURE.md, "Security groups").
    fn allowed(&self, check: impl Fn(u32, A, A, u16) -> bool) -> bool {
        let egress = |task, peer, dport| check(DIR_EGRESS, task, peer, dport);
        let ingress = |task, peer, dport| check(DIR_INGRESS, task, peer, dport);
        let (s, d) = (self.saddr, self.daddr);
        match self.kind {
            // Both ends' policies; an end that is not a task (local) has policy 0, which allows.
            KIND_EAST_WEST | KIND_LOCAL => egress(s, d, self.dport) && ingress(d, s, self.dport),
            KIND_MASQUERADE => egress(s, d, self.dport),
            KIND_INBOUND => ingress(self.nat_daddr, s, self.nat_dport),
            KIND_HAIRPIN => egress(s, d, self.dport) && ingress(self.nat_daddr, s, self.nat_dport),
            _ => true,
        }
    }
}

/// The [`Flow`] of a connection-table key and entry of either family (`CtKey`, `CtKey6`):
/// their fields are named alike.
macro_rules! flow_of {
    ($k:expr, $e:expr) => {
        Flow {
            kind: $e.kind,
            saddr: $k.saddr,
            daddr: $k.daddr,
            dport: $k.dport,
            nat_daddr: $e.nat_daddr,
            nat_dport: $e.nat_dport,
        }
    };
}

/// Whether `c` would let the tracked flow whose original direction is `k` start, checked as the
/// datapath checked it when it did (see ARCHITECTURE.md, "Security groups").
pub fn flow_allowed(c: &Compiled, k: &CtKey, e: &CtEntry) -> bool {
    flow_of!(k, e).allowed(|dir, task, peer, dport| {
        let (task, peer) = (from_be(task), from_be(peer));
        (dir == DIR_EGRESS && peer.octets() == TASK_METADATA_ADDR)
            || c.allows(
                c.policy_of(task),
                dir,
                peer,
                k.proto,
                flow_port(k.proto, dport),
            )
    })
}

/// [`flow_allowed`] for an IPv6 flow (`CT6`): the tasks' policies found by their IPv6
/// addresses, the peers judged by `SG_PEERS6`. IPv6 has no endpoint exempt from policy.
pub fn flow6_allowed(c: &Compiled, k: &CtKey6, e: &CtEntry6) -> bool {
    flow_of!(k, e).allowed(|dir, task, peer, dport| {
        let policy = c.policy_of6(Ipv6Addr::from(task));
        c.allows6(policy, dir, peer, k.proto, flow_port(k.proto, dport))
    })
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, net::IpAddr};

    use super::*;
    use crate::state::{
        self, State,
        rules::{Ipv4Net, Ipv6Net},
    };

    fn sg_state(text: &str) -> State {
        let s: State = state::parse(text).unwrap();
        state::validate(&s, state::BridgeNet::default()).unwrap();
        s
    }

    /// `s` validated and compiled in generation `generation`.
    fn compile(s: &State, generation: u32) -> Result<Compiled, TooBig> {
        let rules = state::validate(s, state::BridgeNet::default()).unwrap();
        Compiled::new(&rules, generation)
    }

    const TWO_GROUPS: &str = r#"{
      "securityGroups": [
        {"GroupId": "sg-web",
         "IpPermissions": [
           {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 81, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
           {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 8999, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
           {"IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "UserIdGroupPairs": [{"GroupId": "sg-db"}]},
           {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "10.1.0.0/16"}]}],
         "IpPermissionsEgress": [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]},
        {"GroupId": "sg-db",
         "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": "sg-web"}]},
                           {"IpProtocol": "47", "IpRanges": [{"CidrIp": "192.168.0.0/24"}]}],
         "IpPermissionsEgress": [{"IpProtocol": "icmp", "FromPort": 3, "ToPort": 4, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
      ],
      "tasks": [
        {"name": "web", "ipv4Address": "172.17.0.2", "securityGroups": ["sg-web"]},
        {"name": "db", "ipv4Address": "172.17.0.3", "securityGroups": ["sg-db"]},
        {"name": "both", "ipv4Address": "172.17.0.4", "securityGroups": ["sg-db", "sg-web"]},
        {"name": "web2", "ipv4Address": "172.17.0.5", "securityGroups": ["sg-web", "sg-web"]},
        {"name": "bare", "ipv4Address": "172.17.0.6"}
      ]
    }"#;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// The answer straight from the groups, rule by rule: the model the tries must agree with.
    /// An IPv4 peer is in `IpRanges` and the members' IPv4 addresses, an IPv6 one in
    /// `Ipv6Ranges` and the members' IPv6 addresses.
    fn naive(state: &State, task: &str, dir: u32, peer: IpAddr, proto: u8, port: u16) -> bool {
        let t = state.tasks.iter().find(|t| t.name == task).unwrap();
        if t.security_groups.is_empty() {
            return state.host.default_policy == DefaultPolicy::Allow || dir == DIR_EGRESS;
        }
        let in_ranges = |p: &crate::state::IpPermission| match peer {
            IpAddr::V4(a) => p.ip_ranges.iter().any(|r| {
                let net: Ipv4Net = r.cidr_ip.parse().unwrap();
                net.contains(a)
            }),
            IpAddr::V6(a) => p.ipv6_ranges.iter().any(|r| {
                let net: Ipv6Net = r.cidr_ipv6.parse().unwrap();
                net.contains(a)
            }),
        };
        let is = |m: &crate::state::Task| match peer {
            IpAddr::V4(a) => m.ipv4_address == a,
            IpAddr::V6(a) => m.ipv6_address == Some(a),
        };
        state
            .security_groups
            .iter()
            .filter(|g| t.security_groups.contains(&g.group_id))
            .flat_map(|g| {
                if dir == DIR_INGRESS {
                    &g.ip_permissions
                } else {
                    &g.ip_permissions_egress
                }
            })
            .any(|p| {
                let traffic = Traffic::of_permission(p).unwrap();
                let port_ok = match Allow::from(traffic) {
                    Allow::All => true,
                    Allow::Range(pp, lo, hi) => pp == proto && lo <= port && port <= hi,
                };
                let peer_ok = in_ranges(p)
                    || p.user_id_group_pairs.iter().any(|g| {
                        state
                            .tasks
                            .iter()
                            .any(|m| is(m) && m.security_groups.contains(&g.group_id))
                    });
                port_ok && peer_ok
            })
    }

    /// What the datapath's `SG_RULES` probes answer for rule set `r`.
    fn rules_probe(c: &Compiled, r: PeerRules, proto: u8, port: u16) -> bool {
        let rules: std::collections::HashSet<RuleKey> = c.rules.iter().map(|(k, _)| *k).collect();
        r.all != 0
            || PORT_LEVELS.iter().any(|&len| {
                rules.contains(&RuleKey {
                    set: r.set,
                    proto,
                    len,
                    port: ecsnet_common::policy::mask_port(port, len),
                })
            })
    }

    /// What the datapath answers for these entries: its probe sequence over the raw keys.
    fn probe(c: &Compiled, policy: u32, dir: u32, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        if policy == 0 {
            return true;
        }
        let peers: HashMap<PeerKey, PeerRules> = c.peers.iter().copied().collect();
        let Some(r) = PEER_LEVELS.iter().find_map(|&len| {
            peers.get(&PeerKey {
                scope: scope(policy, dir),
                len,
                _pad: [0; 3],
                addr: mask_addr(u32::from(peer), len).to_be(),
            })
        }) else {
            return false;
        };
        rules_probe(c, *r, proto, port)
    }

    /// For every task of `s`, direction, peer of `peers` and (protocol, port) of `probes`:
    /// the checks of `c` and the datapath's probes of its entries answer as the rules do.
    /// Returns how many cases are allowed.
    fn all_agree(s: &State, c: &Compiled, peers: &[&str], probes: &[(u8, u16)]) -> usize {
        let mut allowed = 0;
        for t in &s.tasks {
            let policy = c.policy_of(t.ipv4_address);
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for p in peers {
                    let peer: IpAddr = p.parse().unwrap();
                    for &(proto, port) in probes {
                        let want = naive(s, &t.name, dir, peer, proto, port);
                        let (got, datapath) = match peer {
                            IpAddr::V4(a) => (
                                c.allows(policy, dir, a, proto, port),
                                probe(c, policy, dir, a, proto, port),
                            ),
                            IpAddr::V6(a) => (
                                c.allows6(policy, dir, a.octets(), proto, port),
                                probe6(c, policy, dir, a, proto, port),
                            ),
                        };
                        let what = format!("{} dir {dir} {p} proto {proto} port {port}", t.name);
                        assert_eq!(got, want, "{what}");
                        assert_eq!(datapath, want, "probes: {what}");
                        allowed += usize::from(want);
                    }
                }
            }
        }
        allowed
    }

    #[test]
    fn probes_answer_like_the_rules() {
        let s = sg_state(TWO_GROUPS);
        let c = compile(&s, 0).unwrap();
        let peers = [
            "1.2.3.4",
            "10.0.0.1",
            "10.1.2.3",
            "10.255.255.255",
            "192.168.0.7",
            "192.168.1.7",
            "172.17.0.2",
            "172.17.0.3",
            "172.17.0.4",
            "172.17.0.5",
            "172.17.0.6",
        ];
        let probes = [
            (TCP, 79),
            (TCP, 80),
            (TCP, 81),
            (TCP, 82),
            (TCP, 7999),
            (TCP, 8000),
            (TCP, 8512),
            (TCP, 8999),
            (TCP, 9000),
            (TCP, 5432),
            (UDP, 53),
            (UDP, 80),
            (ICMP, 8 << 8),
            (ICMP, 8 << 8 | 3),
            (ICMP, 0),
            (ICMP, 3 << 8 | 4),
            (ICMP, 4 << 8),
            (ICMP, 5 << 8),
            (47, 0),
            (50, 0),
        ];
        let allowed = all_agree(&s, &c, &peers, &probes);
        assert!(allowed > 100, "the probes must hit allowed cases too");
        // Same groups, same policy; no groups and default allow, no policy.
        assert_eq!(c.policy_of(ip("172.17.0.2")), c.policy_of(ip("172.17.0.5")));
        assert_ne!(c.policy_of(ip("172.17.0.2")), c.policy_of(ip("172.17.0.4")));
        assert_eq!(c.policy_of(ip("172.17.0.6")), 0);
    }

    #[test]
    fn default_deny_allows_out_not_in() {
        let mut s = sg_state(TWO_GROUPS);
        s.host.default_policy = DefaultPolicy::Deny;
        let c = compile(&s, 1).unwrap();
        let bare = c.policy_of(ip("172.17.0.6"));
        assert!(bare & GENERATION_BIT != 0, "generation 1 numbers");
        assert!(!c.allows(bare, DIR_INGRESS, ip("172.17.0.2"), TCP, 80));
        assert!(c.allows(bare, DIR_EGRESS, ip("8.8.8.8"), UDP, 53));
        assert!(probe(&c, bare, DIR_EGRESS, ip("8.8.8.8"), 47, 0));
    }

    #[test]
    fn membership_follows_tasks() {
        let mut s = sg_state(TWO_GROUPS);
        let db = |c: &Compiled| c.policy_of(ip("172.17.0.3"));
        let c = compile(&s, 0).unwrap();
        assert!(c.allows(db(&c), DIR_INGRESS, ip("172.17.0.5"), TCP, 5432));
        s.tasks.retain(|t| t.name != "web2");
        let c = compile(&s, 0).unwrap();
        assert!(!c.allows(db(&c), DIR_INGRESS, ip("172.17.0.5"), TCP, 5432));
        assert!(c.allows(db(&c), DIR_INGRESS, ip("172.17.0.2"), TCP, 5432));
    }

    #[test]
    fn blocks_cover_ranges_exactly() {
        for (lo, hi) in [
            (0, 65535),
            (80, 80),
            (1, 65535),
            (8000, 8999),
            (1023, 1025),
            (0, 0),
        ] {
            let blocks = port_blocks(lo, hi);
            let mut next = u32::from(lo);
            for (start, len) in &blocks {
                assert!(PORT_LEVELS.contains(len), "a level the datapath probes");
                let size = 1u32 << (16 - len);
                assert_eq!(u32::from(*start), next, "contiguous");
                assert_eq!(u32::from(*start) % size, 0, "aligned");
                next += size;
            }
            assert_eq!(next, u32::from(hi) + 1, "covers [{lo}, {hi}] exactly");
            assert!(blocks.len() <= 4 * 15 * 2, "{} blocks", blocks.len());
        }
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        let expanded: Vec<(u32, u8)> = peer_blocks(0x0a00_0000, 22).collect();
        assert_eq!(expanded.len(), 4);
        assert_eq!(expanded[3], (0x0a00_0300, 24));
        assert_eq!(peer_blocks(0u32, 0).collect::<Vec<_>>(), vec![(0, 0)]);
    }

    #[test]
    fn unions_are_shared_and_merged() {
        let s = sg_state(TWO_GROUPS);
        let c = compile(&s, 0).unwrap();
        // sg-web's and "both"'s egress is -1 to 0.0.0.0/0: one rule set for all of them.
        let egress_sets: BTreeSet<u32> = c
            .peers
            .iter()
            .filter(|(k, _)| k.len == 0 && k.scope & DIR_EGRESS != 0)
            .map(|(_, r)| r.set)
            .collect();
        assert_eq!(egress_sets.len(), 2, "{egress_sets:?}");
        let merged = RuleSet::of(&BTreeSet::from([
            Allow::Range(TCP, 10, 20),
            Allow::Range(TCP, 21, 30),
            Allow::Range(TCP, 25, 40),
            Allow::Range(TCP, 50, 60),
        ]));
        assert_eq!(merged.ranges[&TCP], vec![(10, 40), (50, 60)]);
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let mut text =
            String::from(r#"{"securityGroups": [{"GroupId": "sg-big", "IpPermissions": ["#);
        let n = MAX_SG_PEERS / 2 + 1;
        for i in 0..n {
            if i > 0 {
                text.push(',');
            }
            write!(
                text,
                r#"{{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{{"CidrIp": "10.{}.{}.0/24"}}]}}"#,
                i / 256,
                i % 256
            )
            .unwrap();
        }
        text.push_str(r#"]}], "tasks": [{"name": "t", "ipv4Address": "172.17.0.2", "securityGroups": ["sg-big"]}]}"#);
        let s = sg_state(&text);
        let e = compile(&s, 0).unwrap_err();
        assert_eq!(e.what, "CIDR entries");
        assert!(e.to_string().contains("more than the 32768"), "{e}");
    }

    /// 300,000 groups, 200 tasks in 200 different pairs of them: compiling looks each group and
    /// each reference up once (the filter over every group per policy made it quadratic). A
    /// loose bound, for a shared machine; the answers are checked too.
    #[test]
    fn compiling_is_linear_in_the_number_of_groups() {
        let s = state::tests::many_groups(300_000);
        let rules = state::validate(&s, state::BridgeNet::default()).unwrap();
        let start = std::time::Instant::now();
        let c = Compiled::new(&rules, 0).unwrap();
        let took = start.elapsed();
        assert!(
            took < std::time::Duration::from_secs(20),
            "compiling 300k groups took {took:?}"
        );
        let addr = |name: &str| {
            s.tasks
                .iter()
                .find(|t| t.name == name)
                .unwrap()
                .ipv4_address
        };
        let t0 = c.policy_of(addr("t0"));
        // t0 is in groups 0 and n-1; group 0 takes 443 from 10/8 and group 1 (t1, t101),
        // group n-1 from group 0 (t0, t100).
        for (peer, want) in [
            (addr("t1"), true),
            (addr("t101"), true),
            (addr("t100"), true),
            (addr("t2"), false),
            (ip("10.1.2.3"), true),
            (ip("192.168.0.1"), false),
        ] {
            assert_eq!(
                c.allows(t0, DIR_INGRESS, peer, TCP, 443),
                want,
                "t0 from {peer}"
            );
        }
        assert!(!c.allows(t0, DIR_INGRESS, addr("t1"), TCP, 444));
    }
    // ---- IPv6 ------------------------------------------------------------------------------

    const V6_GROUPS: &str = r#"{
      "securityGroups": [
        {"GroupId": "sg-web",
         "IpPermissions": [
           {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
           {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
            "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/32"}]},
           {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 8999, "Ipv6Ranges": [{"CidrIpv6": "2001:db8:1::/48"}]},
           {"IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "Ipv6Ranges": [{"CidrIpv6": "2001:db8:1:2::/64"}]},
           {"IpProtocol": "udp", "FromPort": 5000, "ToPort": 5000, "Ipv6Ranges": [{"CidrIpv6": "fd00:aa:bb:c80::/57"}]},
           {"IpProtocol": "udp", "FromPort": 7000, "ToPort": 7000, "Ipv6Ranges": [{"CidrIpv6": "fd00:aa::/31"}]},
           {"IpProtocol": "icmpv6", "FromPort": 128, "ToPort": -1, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
           {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
           {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": "sg-db"}]},
           {"IpProtocol": "47", "Ipv6Ranges": [{"CidrIpv6": "2001:db8:1:2:3:4:5:6/128"}]}],
         "IpPermissionsEgress": [{"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]},
        {"GroupId": "sg-db",
         "IpPermissions": [{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-web"}]}],
         "IpPermissionsEgress": [{"IpProtocol": "58", "FromPort": 1, "ToPort": 4, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
                                 {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
      ],
      "tasks": [
        {"name": "web", "ipv4Address": "172.17.0.2", "ipv6Address": "fd00:ec5:17::2", "securityGroups": ["sg-web"]},
        {"name": "db", "ipv4Address": "172.17.0.3", "ipv6Address": "fd00:ec5:17::3", "securityGroups": ["sg-db"]},
        {"name": "db4", "ipv4Address": "172.17.0.4", "securityGroups": ["sg-db"]},
        {"name": "both", "ipv4Address": "172.17.0.5", "ipv6Address": "fd00:ec5:17::5", "securityGroups": ["sg-db", "sg-web"]},
        {"name": "bare", "ipv4Address": "172.17.0.6", "ipv6Address": "fd00:ec5:17::6"}
      ]
    }"#;

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// What `allows6_port` in the datapath answers for these entries: `SG_LEVELS6` of the
    /// scope, then `SG_PEERS6` at those lengths, longest first, then `SG_RULES`.
    fn probe6(c: &Compiled, policy: u32, dir: u32, peer: Ipv6Addr, proto: u8, port: u16) -> bool {
        if policy == 0 {
            return true;
        }
        let peers: HashMap<PeerKey6, PeerRules> = c.peers6.iter().copied().collect();
        let levels: HashMap<u32, u32> = c.levels6.iter().copied().collect();
        let scope = scope(policy, dir);
        let Some(&mask) = levels.get(&scope) else {
            return false;
        };
        let Some(r) = PEER_LEVELS6
            .iter()
            .filter(|&&len| mask & level6_bit(len) != 0)
            .find_map(|&len| {
                peers.get(&PeerKey6 {
                    scope,
                    len,
                    _pad: [0; 3],
                    addr: ecsnet_common::policy::mask_addr6(peer.octets(), len),
                })
            })
        else {
            return false;
        };
        rules_probe(c, *r, proto, port)
    }

    #[test]
    fn ipv6_probes_answer_like_the_rules() {
        let s = sg_state(V6_GROUPS);
        let c = compile(&s, 0).unwrap();
        let peers = [
            "::1",
            "2001:db8::1",
            "2001:db8:ffff::1",
            "2001:db8:1::9",
            "2001:db8:1:2::1",
            "2001:db8:1:2:3:4:5:6",
            "2001:db8:1:2:3:4:5:7",
            "2001:db8:1:3::1",
            "2001:db9::1",
            "fd00:aa:bb:c80::1",
            "fd00:aa:bb:cff:ffff::1",
            "fd00:aa:bb:d00::1",
            "fd00:aa:bb:c7f::1",
            "fd00:ab:1::1",
            "fd00:ac::1",
            "fd00:ec5:17::2",
            "fd00:ec5:17::3",
            "fd00:ec5:17::5",
            "fd00:ec5:17::6",
            "fd00:ec5:17::4",
            "::ffff:172.17.0.4",
        ];
        let probes = [
            (TCP, 80),
            (TCP, 81),
            (TCP, 443),
            (TCP, 8000),
            (TCP, 8999),
            (TCP, 9000),
            (TCP, 5432),
            (UDP, 53),
            (UDP, 5000),
            (UDP, 7000),
            (UDP, 80),
            (ICMPV6, 128 << 8),
            (ICMPV6, 129 << 8),
            (ICMPV6, 1 << 8 | 4),
            (ICMPV6, 4 << 8),
            (ICMPV6, 5 << 8),
            (ICMP, 8 << 8),
            (47, 0),
            (50, 0),
        ];
        for t in &s.tasks {
            if let Some(a) = t.ipv6_address {
                let policy = c.policy_of(t.ipv4_address);
                assert_eq!(c.policy_of6(a), policy, "{}: one policy", t.name);
            }
        }
        let allowed = all_agree(&s, &c, &peers, &probes);
        assert!(allowed > 100, "the probes must hit allowed cases too");
    }

    #[test]
    fn ipv6_cidrs_expand_to_multiples_of_8() {
        let blocks = |cidr: &str| {
            let n: Ipv6Net = cidr.parse().unwrap();
            peer_blocks(u128::from(n.addr()), n.prefix_len())
                .map(|(a, len)| format!("{}/{len}", Ipv6Addr::from(a)))
                .collect::<Vec<_>>()
        };
        assert_eq!(blocks("2001:db8::1/128"), ["2001:db8::1/128"]);
        assert_eq!(blocks("2001:db8:1:2::/64"), ["2001:db8:1:2::/64"]);
        assert_eq!(blocks("::/0"), ["::/0"]);
        assert_eq!(
            blocks("2001:db8::/127"),
            ["2001:db8::/128", "2001:db8::1/128"]
        );
        let b = blocks("fd00:aa:bb:c80::/57");
        assert_eq!(b.len(), 128, "a /57 is 128 /64s");
        assert_eq!(b[0], "fd00:aa:bb:c80::/64");
        assert_eq!(b[1], "fd00:aa:bb:c81::/64");
        assert_eq!(b[127], "fd00:aa:bb:cff::/64");
        let b = blocks("8000::/1");
        assert_eq!(
            (b.len(), b[0].as_str(), b[127].as_str()),
            (128, "8000::/8", "ff00::/8")
        );

        // In the maps: the scope's lengths are exactly those of its entries.
        let s = sg_state(V6_GROUPS);
        let c = compile(&s, 0).unwrap();
        let web = c.policy_of(ip("172.17.0.2"));
        let ingress = scope(web, DIR_INGRESS);
        let mut lens: BTreeMap<u8, usize> = BTreeMap::new();
        for (k, _) in c.peers6.iter().filter(|(k, _)| k.scope == ingress) {
            *lens.entry(k.len).or_default() += 1;
            assert_eq!(
                k.addr,
                ecsnet_common::policy::mask_addr6(k.addr, k.len),
                "no bits past the length"
            );
        }
        // ::/0 twice (tcp 80, icmpv6, icmp) is one; /32, /48 and /64 each one; the /57 128
        // /64s beside the /64 of udp 53; the /31 two /32s beside the /32; sg-db's members
        // fd00:ec5:17::3 and ::5 /128s beside the /128 of protocol 47.
        assert_eq!(
            lens,
            BTreeMap::from([(0, 1), (32, 3), (48, 1), (64, 129), (128, 3)])
        );
        let (_, mask) = c.levels6.iter().find(|(sc, _)| *sc == ingress).unwrap();
        let want = [0, 32, 48, 64, 128]
            .iter()
            .fold(0, |m, &l| m | level6_bit(l));
        assert_eq!(*mask, want);
    }

    #[test]
    fn ipv6_unions_of_overlapping_cidrs() {
        let s = sg_state(V6_GROUPS);
        let c = compile(&s, 0).unwrap();
        let web = c.policy_of(ip("172.17.0.2"));
        let ok =
            |peer: &str, proto, port| c.allows6(web, DIR_INGRESS, ip6(peer).octets(), proto, port);
        // 2001:db8:1:2::/64 is inside the /48, the /32 and ::/0: all four rules.
        for (proto, port) in [(TCP, 80), (TCP, 443), (TCP, 8500), (UDP, 53)] {
            assert!(ok("2001:db8:1:2::9", proto, port), "{proto} {port}");
        }
        // Just outside the /64: the /48's, not the /64's.
        assert!(ok("2001:db8:1:3::9", TCP, 8500));
        assert!(!ok("2001:db8:1:3::9", UDP, 53));
        // Outside the /32: ::/0's only.
        assert!(ok("2001:db9::9", TCP, 80));
        assert!(!ok("2001:db9::9", TCP, 443));
        // The /31 covers both its /32s, and the /57 the last of its /64s only inside it.
        assert!(ok("fd00:ab:ffff::1", UDP, 7000));
        assert!(ok("fd00:aa:bb:cff:1::1", UDP, 5000));
        assert!(!ok("fd00:aa:bb:d00::1", UDP, 5000));
        // The /57's /64s share one rule set: the same union.
        let web_in = scope(web, DIR_INGRESS);
        let sets: BTreeSet<u32> = c
            .peers6
            .iter()
            .filter(|(k, _)| {
                k.scope == web_in && k.len == 64 && k.addr[..6] == [0xfd, 0, 0, 0xaa, 0, 0xbb]
            })
            .map(|(_, r)| r.set)
            .collect();
        assert_eq!(sets.len(), 1, "{sets:?}");
    }

    #[test]
    fn group_references_give_members_of_both_families() {
        let s = sg_state(V6_GROUPS);
        let c = compile(&s, 0).unwrap();
        let db = c.policy_of(ip("172.17.0.3"));
        let db_in = scope(db, DIR_INGRESS);
        // sg-db takes everything from sg-web: web and both, by their /32s and /128s.
        let v6: BTreeSet<Ipv6Addr> = c
            .peers6
            .iter()
            .filter(|(k, _)| k.scope == db_in)
            .map(|(k, r)| {
                assert_eq!((k.len, r.all), (128, 1), "{k:?}");
                Ipv6Addr::from(k.addr)
            })
            .collect();
        assert_eq!(
            v6,
            BTreeSet::from([ip6("fd00:ec5:17::2"), ip6("fd00:ec5:17::5")])
        );
        let v4: BTreeSet<u32> = c
            .peers
            .iter()
            .filter(|(k, _)| k.scope == db_in)
            .map(|(k, _)| u32::from_be(k.addr))
            .collect();
        assert_eq!(v4, BTreeSet::from([0xac11_0002, 0xac11_0005]));
        assert_eq!(
            c.levels6.iter().find(|(sc, _)| *sc == db_in),
            Some(&(db_in, level6_bit(128)))
        );
        // A member without an IPv6 address (db4) is no IPv6 peer; IPv4 CIDRs allow no IPv6
        // and IPv6 ones no IPv4.
        let web = c.policy_of(ip("172.17.0.2"));
        assert!(c.allows(web, DIR_INGRESS, ip("172.17.0.4"), TCP, 5432));
        assert!(!c.allows6(web, DIR_INGRESS, ip6("fd00:ec5:17::4").octets(), TCP, 5432));
        assert!(c.allows(web, DIR_INGRESS, ip("1.2.3.4"), TCP, 443));
        assert!(
            !c.allows(web, DIR_INGRESS, ip("1.2.3.4"), TCP, 80),
            "::/0 is not 0.0.0.0/0"
        );
        assert!(
            !c.allows(web, DIR_EGRESS, ip("1.2.3.4"), UDP, 53),
            "egress is IPv6 only"
        );
        assert!(c.allows6(web, DIR_EGRESS, ip6("2600::1").octets(), UDP, 53));
        // sg-db's egress: all IPv4, and ICMPv6 type 1 code 4 only.
        assert!(c.allows(db, DIR_EGRESS, ip("1.2.3.4"), UDP, 53));
        assert!(!c.allows6(db, DIR_EGRESS, ip6("2600::1").octets(), UDP, 53));
        assert!(c.allows6(db, DIR_EGRESS, ip6("2600::1").octets(), ICMPV6, 1 << 8 | 4));
        assert!(!c.allows6(db, DIR_EGRESS, ip6("2600::1").octets(), ICMPV6, 1 << 8 | 3));
        // Leaving the group takes the address out.
        let mut s = s;
        s.tasks.retain(|t| t.name != "both");
        let c = compile(&s, 0).unwrap();
        let db = c.policy_of(ip("172.17.0.3"));
        assert!(!c.allows6(db, DIR_INGRESS, ip6("fd00:ec5:17::5").octets(), TCP, 1));
        assert!(c.allows6(db, DIR_INGRESS, ip6("fd00:ec5:17::2").octets(), TCP, 1));
    }

    #[test]
    fn icmpv6_rules_are_not_icmp_rules() {
        let s = sg_state(V6_GROUPS);
        let c = compile(&s, 0).unwrap();
        let web = c.policy_of(ip("172.17.0.2"));
        let ok = |proto, port| c.allows6(web, DIR_INGRESS, ip6("2600::1").octets(), proto, port);
        // icmpv6 type 128 (echo request), every code; icmp type 8 stays ICMP's.
        assert!(ok(ICMPV6, 128 << 8));
        assert!(ok(ICMPV6, 128 << 8 | 7));
        assert!(!ok(ICMPV6, 129 << 8));
        assert!(!ok(ICMPV6, 8 << 8), "icmp type 8 is no ICMPv6 rule");
        assert!(
            ok(ICMP, 8 << 8),
            "an icmp rule with an IPv6 range is still icmp"
        );
        assert!(!ok(ICMP, 128 << 8), "icmpv6 type 128 is no ICMP rule");
        // In SG_RULES: protocol 58, type << 8 | code blocks.
        let set = c
            .peers6
            .iter()
            .find(|(k, _)| k.scope == scope(web, DIR_INGRESS) && k.len == 0)
            .map(|(_, r)| r.set)
            .unwrap();
        let icmpv6: Vec<(u8, u16)> = c
            .rules
            .iter()
            .filter(|(k, _)| k.set == set && k.proto == ICMPV6)
            .map(|(k, _)| (k.len, k.port))
            .collect();
        assert_eq!(icmpv6, [(8, 128 << 8)]);
    }

    #[test]
    fn default_deny_covers_ipv6() {
        let mut s = sg_state(V6_GROUPS);
        s.host.default_policy = DefaultPolicy::Deny;
        let c = compile(&s, 1).unwrap();
        let bare = c.policy_of6(ip6("fd00:ec5:17::6"));
        assert_ne!(bare, 0);
        assert_eq!(bare, c.policy_of(ip("172.17.0.6")));
        for peer in ["fd00:ec5:17::2", "2600::1", "::"] {
            let peer = ip6(peer).octets();
            assert!(!c.allows6(bare, DIR_INGRESS, peer, TCP, 80));
            assert!(c.allows6(bare, DIR_EGRESS, peer, UDP, 53));
            assert!(c.allows6(bare, DIR_EGRESS, peer, 47, 0));
        }
        assert!(probe6(
            &c,
            bare,
            DIR_EGRESS,
            ip6("2600::1"),
            ICMPV6,
            128 << 8
        ));
        assert!(!probe6(
            &c,
            bare,
            DIR_INGRESS,
            ip6("2600::1"),
            ICMPV6,
            128 << 8
        ));
        // Nothing in: no entry and no lengths, so the datapath stops at SG_LEVELS6.
        let bare_in = scope(bare, DIR_INGRESS);
        assert!(c.levels6.iter().all(|(sc, _)| *sc != bare_in));
        assert!(c.peers6.iter().all(|(k, _)| k.scope != bare_in));
        // Generation 1: every scope, of both IPv6 maps, carries the generation bit.
        assert!(
            c.levels6
                .iter()
                .all(|(sc, _)| sc >> 1 & GENERATION_BIT != 0)
        );
        assert!(
            c.peers6.iter().all(|(k, r)| {
                k.scope >> 1 & GENERATION_BIT != 0 && r.set & GENERATION_BIT != 0
            })
        );
        // Default allow: no policy, no entries for the bare task.
        s.host.default_policy = DefaultPolicy::Allow;
        let c = compile(&s, 0).unwrap();
        assert_eq!(c.policy_of6(ip6("fd00:ec5:17::6")), 0);
        assert!(c.allows6(0, DIR_INGRESS, ip6("2600::1").octets(), TCP, 80));
    }

    #[test]
    fn ipv4_and_ipv6_share_rule_sets() {
        // The same rules to 0.0.0.0/0 and ::/0: one rule set for both families.
        let s = sg_state(
            r#"{"securityGroups": [{"GroupId": "sg-a", "IpPermissions": [
                 {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                  "IpRanges": [{"CidrIp": "0.0.0.0/0"}], "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]}],
               "tasks": [{"name": "a", "ipv4Address": "172.17.0.2", "ipv6Address": "fd00::2",
                          "securityGroups": ["sg-a"]}]}"#,
        );
        let c = compile(&s, 0).unwrap();
        assert_eq!((c.peers.len(), c.peers6.len()), (1, 1));
        assert_eq!(c.peers[0].1, c.peers6[0].1);
        assert_eq!(c.rules.len(), 1);
        // No egress rules: no IPv6 lengths for the egress scope, as none for IPv4 entries.
        assert_eq!(c.levels6.len(), 1);
    }

    #[test]
    fn too_many_ipv6_entries_is_an_error() {
        // 257 /57s: 32,896 /64s, over the 32,768 of a generation.
        let perms: Vec<String> = (0..257)
            .map(|i| {
                format!(
                    r#"{{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "Ipv6Ranges": [{{"CidrIpv6": "2001:db8:{i:x}::/57"}}]}}"#
                )
            })
            .collect();
        let text = format!(
            r#"{{"securityGroups": [{{"GroupId": "sg-big", "IpPermissions": [{}]}}],
                "tasks": [{{"name": "t", "ipv4Address": "172.17.0.2", "securityGroups": ["sg-big"]}}]}}"#,
            perms.join(",")
        );
        let e = compile(&sg_state(&text), 0).unwrap_err();
        assert_eq!(
            (e.what, e.needed, e.max),
            ("IPv6 CIDR entries", 257 * 128, 32_768)
        );
        assert!(e.to_string().contains("more than the 32768"), "{e}");
        // 256 of them fit.
        let fits = text.replacen(&format!("{},", perms[0]), "", 1);
        let c = compile(&sg_state(&fits), 0).unwrap();
        assert_eq!(c.peers6.len(), 256 * 128);
    }

    /// `cidrs` read as `N`, by CIDR, with no rules: what the counts look at.
    fn by_cidr<N, A>(cidrs: &[&str], key: impl Fn(N) -> (A, u8)) -> ByCidr<A>
    where
        N: std::str::FromStr,
        N::Err: std::fmt::Debug,
        A: PeerAddr,
    {
        cidrs
            .iter()
            .map(|c| (key(c.parse().unwrap()), BTreeSet::new()))
            .collect()
    }

    /// The blocks of `by`, made.
    fn made<A: PeerAddr>(by: &ByCidr<A>) -> usize {
        let blocks: BTreeSet<(A, u8)> = by.keys().flat_map(|&(a, l)| peer_blocks(a, l)).collect();
        blocks.len()
    }

    #[test]
    fn block_counts_are_exact_without_making_blocks() {
        // Nested and apart, at one level and across levels.
        let v4 = by_cidr(
            &[
                "0.0.0.0/0",
                "0.0.0.0/1",
                "10.0.0.0/8",
                "10.0.0.0/9",
                "10.0.0.0/12",
                "10.128.0.0/9",
                "192.168.0.0/22",
                "192.168.0.0/24",
                "192.168.1.1/32",
                "192.168.4.0/23",
            ],
            |n: Ipv4Net| (u32::from(n.addr()), n.prefix_len()),
        );
        assert_eq!(block_count(&v4), made(&v4));
        // ::/0; /1's 128 /8s (10/8 among them); two /9s' 128 /16s each (the /12 in the first);
        // the /22's four /24s (the /24 among them), the /23's two; the /32.
        assert_eq!(block_count(&v4), 1 + 128 + 2 * 128 + 4 + 2 + 1);
        let v6 = by_cidr(
            &[
                "::/0",
                "::/1",
                "2001:db8::/31",
                "2001:db8::/32",
                "fd00::/57",
                "fd00::/60",
                "fd00::/64",
                "fd00:0:0:80::/57",
                "fd00::1/128",
                "fd00::/121",
                "fd00::80/121",
                "fd00::/127",
            ],
            |n: Ipv6Net| (u128::from(n.addr()), n.prefix_len()),
        );
        assert_eq!(block_count(&v6), made(&v6));
        // ::/0; /1's 128 /8s; the /31's two /32s (the /32 among them); two /57s' 128 /64s each
        // (the /60 and /64 in the first); two /121s' 128 /128s each (the /127 and ::1 in the
        // first).
        assert_eq!(block_count(&v6), 1 + 128 + 2 + 2 * 128 + 2 * 128);
        assert_eq!(block_count(&ByCidr::<u128>::new()), 0);
    }

    /// 100,000 distinct /57s are 12.8 million /64s: refused, counted exactly, never made (which
    /// took a gigabyte). A loose bound, for a shared machine.
    #[test]
    fn a_hostile_expansion_is_refused_before_it_is_made() {
        let base = u128::from(ip6("2001:db8::"));
        let cidrs6 = (0..100_000u128)
            .map(|i| {
                let net = Ipv6Addr::from(base | i << (128 - 57));
                format!("{net}/57").parse().unwrap()
            })
            .collect();
        let rules = Rules {
            default_policy: DefaultPolicy::Allow,
            groups: vec![state::rules::Group {
                id: "sg-big".to_owned(),
                inbound: vec![Rule {
                    traffic: Traffic::All,
                    cidrs: Vec::new(),
                    cidrs6,
                    groups: Vec::new(),
                }],
                outbound: Vec::new(),
            }],
            tasks: vec![state::rules::Member {
                addr: ip("172.17.0.2"),
                addr6: None,
                groups: vec![0],
            }],
        };
        let start = std::time::Instant::now();
        let e = Compiled::new(&rules, 0).unwrap_err();
        let took = start.elapsed();
        assert_eq!((e.what, e.needed), (CIDR_ENTRIES6, 12_800_000));
        assert!(
            took < std::time::Duration::from_secs(20),
            "refusing took {took:?}"
        );
    }

    #[test]
    fn ipv6_flows_are_judged_by_the_ipv6_rules() {
        let s = sg_state(V6_GROUPS);
        let c = compile(&s, 0).unwrap();
        let key = |saddr: &str, daddr: &str, proto, dport: u16| CtKey6 {
            saddr: ip6(saddr).octets(),
            daddr: ip6(daddr).octets(),
            sport: 40000u16.to_be(),
            dport: dport.to_be(),
            proto,
            _pad: [0; 3],
        };
        let entry = |kind, k: &CtKey6| CtEntry6 {
            kind,
            nat_daddr: k.daddr,
            nat_dport: k.dport,
            ..CtEntry6::default()
        };
        let judge = |kind, saddr, daddr, proto, dport| {
            let k = key(saddr, daddr, proto, dport);
            flow6_allowed(&c, &k, &entry(kind, &k))
        };
        // In from outside: web's ingress.
        assert!(judge(
            KIND_INBOUND,
            "2001:db8::1",
            "fd00:ec5:17::2",
            TCP,
            443
        ));
        assert!(!judge(
            KIND_INBOUND,
            "2001:db9::1",
            "fd00:ec5:17::2",
            TCP,
            443
        ));
        // Task to task: web's egress (all IPv6) and db's ingress (all from sg-web).
        assert!(judge(
            KIND_EAST_WEST,
            "fd00:ec5:17::2",
            "fd00:ec5:17::3",
            TCP,
            9
        ));
        // db to web: db's egress allows no TCP over IPv6.
        assert!(!judge(
            KIND_EAST_WEST,
            "fd00:ec5:17::3",
            "fd00:ec5:17::2",
            TCP,
            80
        ));
        // Out: the sender's egress; echo requests are what open ICMPv6 flows.
        assert!(judge(
            KIND_MASQUERADE,
            "fd00:ec5:17::2",
            "2600::1",
            ICMPV6,
            0
        ));
        assert!(!judge(
            KIND_MASQUERADE,
            "fd00:ec5:17::3",
            "2600::1",
            ICMPV6,
            0
        ));
        // A task with no policy is not judged.
        assert!(judge(KIND_MASQUERADE, "fd00:ec5:17::6", "2600::1", UDP, 53));
    }
}
