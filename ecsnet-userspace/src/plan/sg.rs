//! Security groups into the policy maps of `ecsnet_common::policy` (SPEC §6).
//!
//! Tasks with the same set of security groups share one policy. For each policy and direction
//! every rule becomes (CIDR, protocol, port range); references to groups become the /32 of each
//! current member. Each CIDR is expanded to blocks of the next prefix length the datapath probes
//! (`PEER_LEVELS`), and each block gets the union of the rules of every CIDR that contains it, so
//! the first block the datapath finds decides. Identical unions share a rule set, whose port
//! ranges become blocks of the sizes `PORT_LEVELS` allows. The result can also answer checks itself ([`Compiled::allows`]),
//! which is how `--reset-flows` finds the tracked flows that the new rules no longer allow.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ecsnet_common::{
    ct::{CtEntry, CtKey, KIND_EAST_WEST, KIND_HAIRPIN, KIND_INBOUND, KIND_LOCAL, KIND_MASQUERADE},
    policy::{
        DIR_EGRESS, DIR_INGRESS, GENERATION_BIT, MAX_SG_PEERS, MAX_SG_RULES, PEER_LEVELS,
        PORT_LEVELS, PeerKey, PeerRules, RuleKey, TASK_METADATA_ADDR, mask_addr, scope,
    },
};

use crate::state::{DefaultPolicy, IpPermission, SecurityGroup, State, parse_cidr, rule_protocol};

/// Protocol number meaning every protocol (`IpProtocol: "-1"`).
pub const ALL_PROTOCOLS: u8 = 255;
const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// What one rule allows of the packets from or to its CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Allow {
    /// Every protocol and port.
    All,
    /// One protocol, a range of its 16-bit "port": the destination port for TCP and UDP,
    /// `type << 8 | code` for ICMP, the whole range for other protocols.
    Range(u8, u16, u16),
}

/// The allows of one permission (SPEC §6: protocol, ports, ICMP type and code).
pub fn allow_of(perm: &IpPermission) -> Allow {
    // `state::validate` has accepted the permission, so the protocol parses.
    let proto = rule_protocol(&perm.ip_protocol).unwrap_or(ALL_PROTOCOLS);
    match proto {
        ALL_PROTOCOLS => Allow::All,
        TCP | UDP => {
            let from = perm.from_port.unwrap_or(0).clamp(0, 65535) as u16;
            let to = perm.to_port.unwrap_or(65535).clamp(0, 65535) as u16;
            Allow::Range(proto, from, to)
        }
        ICMP => match (perm.from_port, perm.to_port) {
            (None | Some(-1), _) => Allow::Range(ICMP, 0, u16::MAX),
            (Some(t), None | Some(-1)) => {
                let t = (t as u16) << 8;
                Allow::Range(ICMP, t, t | 0xff)
            }
            (Some(t), Some(c)) => {
                let p = (t as u16) << 8 | c as u16;
                Allow::Range(ICMP, p, p)
            }
        },
        other => Allow::Range(other, 0, u16::MAX),
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
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    let mut out = Vec::new();
    while lo <= hi {
        let len = PORT_LEVELS
            .iter()
            .rev()
            .copied()
            .find(|&len| {
                let size = 1u32 << (16 - len);
                lo % size == 0 && lo + size - 1 <= hi
            })
            .unwrap_or(16);
        out.push((lo as u16, len));
        lo += 1 << (16 - len);
    }
    out
}

/// The blocks of `PEER_LEVELS` a CIDR expands to: (address, prefix length), host order.
fn peer_blocks(addr: u32, len: u8) -> impl Iterator<Item = (u32, u8)> {
    let level = PEER_LEVELS
        .iter()
        .rev()
        .copied()
        .find(|&l| l >= len)
        .unwrap_or(32);
    let count = 1u64 << (level - len);
    let step = if level == 0 { 0 } else { 1u64 << (32 - level) };
    (0..count).map(move |i| ((u64::from(addr) + i * step) as u32, level))
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

/// The policy maps' entries for one state, and the means to check packets against them.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// Task address -> policy number (0: no policy).
    pub task_policy: HashMap<Ipv4Addr, u32>,
    /// `SG_PEERS` entries.
    pub peers: Vec<(PeerKey, PeerRules)>,
    /// `SG_RULES` entries (value 1).
    pub rules: Vec<(RuleKey, u32)>,
    /// (policy, direction) -> expanded block (host order address, length) -> rule-set number:
    /// what `SG_PEERS` holds, for checks in user space.
    cidrs: HashMap<(u32, u32), HashMap<(u32, u8), u32>>,
    sets: HashMap<u32, RuleSet>,
}

fn mask(len: u8) -> u32 {
    mask_addr(u32::MAX, len)
}

/// A state's groups by id and each group's member tasks' addresses: what compiling looks up,
/// once per reference, so it stays linear in the number of groups and tasks.
struct Index<'a> {
    groups: HashMap<&'a str, &'a SecurityGroup>,
    members: HashMap<&'a str, Vec<Ipv4Addr>>,
}

impl<'a> Index<'a> {
    fn new(state: &'a State) -> Self {
        let groups = state
            .security_groups
            .iter()
            .map(|g| (g.group_id.as_str(), g))
            .collect();
        let mut members: HashMap<&str, Vec<Ipv4Addr>> = HashMap::new();
        for t in &state.tasks {
            let mut ids: Vec<&str> = t.security_groups.iter().map(String::as_str).collect();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                members.entry(id).or_default().push(t.ipv4_address);
            }
        }
        Self { groups, members }
    }
}

/// The rules of one direction of one policy, by CIDR.
fn rules_by_cidr(
    index: &Index,
    groups: &[String],
    dir: u32,
    default_deny: bool,
) -> HashMap<(u32, u8), BTreeSet<Allow>> {
    let mut by_cidr: HashMap<(u32, u8), BTreeSet<Allow>> = HashMap::new();
    if default_deny {
        // No security group and `defaultPolicy: deny`: AWS's default group without its
        // self-reference: nothing in, everything out.
        if dir == DIR_EGRESS {
            by_cidr.entry((0, 0)).or_default().insert(Allow::All);
        }
        return by_cidr;
    }
    // `groups` is sorted and without duplicates (`Compiled::new`).
    for sg in groups.iter().filter_map(|id| index.groups.get(id.as_str())) {
        let perms = if dir == DIR_INGRESS {
            &sg.ip_permissions
        } else {
            &sg.ip_permissions_egress
        };
        for perm in perms {
            let allow = allow_of(perm);
            for r in &perm.ip_ranges {
                if let Ok((addr, len)) = parse_cidr(&r.cidr_ip) {
                    by_cidr
                        .entry((u32::from(addr), len))
                        .or_default()
                        .insert(allow);
                }
            }
            for pair in &perm.user_id_group_pairs {
                let members = index.members.get(pair.group_id.as_str());
                for addr in members.into_iter().flatten() {
                    by_cidr
                        .entry((u32::from(*addr), 32))
                        .or_default()
                        .insert(allow);
                }
            }
        }
    }
    by_cidr
}

impl Compiled {
    /// Compiles `state` (already validated) with numbers of generation `generation` (0 or 1).
    pub fn new(state: &State, generation: u32) -> Result<Self, TooBig> {
        let base = if generation == 0 { 0 } else { GENERATION_BIT };
        let mut out = Self::default();
        let mut policies: BTreeMap<Vec<String>, u32> = BTreeMap::new();
        let mut set_ids: HashMap<RuleSet, u32> = HashMap::new();
        let deny = state.host.default_policy == DefaultPolicy::Deny;
        for t in &state.tasks {
            let mut groups = t.security_groups.clone();
            groups.sort();
            groups.dedup();
            if groups.is_empty() && !deny {
                out.task_policy.insert(t.ipv4_address, 0);
                continue;
            }
            let next = base + policies.len() as u32 + 1;
            let id = *policies.entry(groups).or_insert(next);
            out.task_policy.insert(t.ipv4_address, id);
        }
        let index = Index::new(state);
        for (groups, &policy) in &policies {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                let by_cidr = rules_by_cidr(&index, groups, dir, groups.is_empty());
                let mut union_of = |addr: u32, len: u8| {
                    // The union of every rule whose CIDR contains (addr, len).
                    let mut allows = BTreeSet::new();
                    for l in 0..=len {
                        if let Some(a) = by_cidr.get(&(addr & mask(l), l)) {
                            allows.extend(a.iter().copied());
                        }
                    }
                    let set = RuleSet::of(&allows);
                    let next = base + set_ids.len() as u32 + 1;
                    *set_ids.entry(set).or_insert(next)
                };
                let blocks: BTreeSet<(u32, u8)> = by_cidr
                    .keys()
                    .flat_map(|&(addr, len)| peer_blocks(addr, len))
                    .collect();
                if blocks.len() > MAX_SG_PEERS as usize {
                    return Err(TooBig {
                        what: "CIDR entries",
                        needed: blocks.len(),
                        max: MAX_SG_PEERS as usize / 2,
                    });
                }
                let cidrs = out.cidrs.entry((policy, dir)).or_default();
                for (addr, len) in blocks {
                    let set = union_of(addr, len);
                    cidrs.insert((addr, len), set);
                    out.peers.push((
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
        }
        out.sets = set_ids.into_iter().map(|(s, id)| (id, s)).collect();
        for (_, rules) in &mut out.peers {
            rules.all = u32::from(out.sets[&rules.set].all);
        }
        for (&id, set) in &out.sets {
            if set.all {
                continue;
            }
            for (&proto, ranges) in &set.ranges {
                for &(lo, hi) in ranges {
                    for (port, len) in port_blocks(lo, hi) {
                        out.rules.push((
                            RuleKey {
                                set: id,
                                proto,
                                len,
                                port,
                            },
                            1,
                        ));
                    }
                }
            }
        }
        // The live generation stays in the maps while this one is written beside it.
        for (what, needed, max) in [
            ("CIDR entries", out.peers.len(), MAX_SG_PEERS as usize / 2),
            (
                "port-block entries",
                out.rules.len(),
                MAX_SG_RULES as usize / 2,
            ),
        ] {
            if needed > max {
                return Err(TooBig { what, needed, max });
            }
        }
        Ok(out)
    }

    /// The policy number of the task at `addr`; 0 when it has none or is not a task.
    pub fn policy_of(&self, addr: Ipv4Addr) -> u32 {
        self.task_policy.get(&addr).copied().unwrap_or(0)
    }

    /// Whether `policy` allows, in direction `dir`, a packet whose other end is `peer`, of
    /// protocol `proto` with 16-bit `port` (see [`Allow::Range`]). The same answer the
    /// datapath's probes give.
    pub fn allows(&self, policy: u32, dir: u32, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        if policy == 0 {
            return true;
        }
        let Some(cidrs) = self.cidrs.get(&(policy, dir)) else {
            return false;
        };
        let addr = u32::from(peer);
        PEER_LEVELS
            .iter()
            .find_map(|&len| cidrs.get(&(mask_addr(addr, len), len)))
            .and_then(|set| self.sets.get(set))
            .is_some_and(|s| s.allows(proto, port))
    }
}

/// The 16-bit "port" a tracked flow was checked with (see [`Allow::Range`]), from its key.
fn flow_port(k: &CtKey, dport: u16) -> u16 {
    match k.proto {
        TCP | UDP => u16::from_be(dport),
        // Only echo requests open ICMP flows.
        ICMP => 8 << 8,
        _ => 0,
    }
}

/// Whether `c` would let the tracked flow whose original direction is `k` start, checked as the
/// datapath checked it when it did (see ARCHITECTURE.md, "Security groups").
pub fn flow_allowed(c: &Compiled, k: &CtKey, e: &CtEntry) -> bool {
    let a = |x: u32| Ipv4Addr::from(u32::from_be(x));
    let egress = |task: u32, peer: u32, dport: u16| {
        a(peer).octets() == TASK_METADATA_ADDR
            || c.allows(
                c.policy_of(a(task)),
                DIR_EGRESS,
                a(peer),
                k.proto,
                flow_port(k, dport),
            )
    };
    let ingress = |task: u32, peer: u32, dport: u16| {
        c.allows(
            c.policy_of(a(task)),
            DIR_INGRESS,
            a(peer),
            k.proto,
            flow_port(k, dport),
        )
    };
    match e.kind {
        KIND_EAST_WEST => egress(k.saddr, k.daddr, k.dport) && ingress(k.daddr, k.saddr, k.dport),
        KIND_MASQUERADE => egress(k.saddr, k.daddr, k.dport),
        KIND_INBOUND => ingress(e.nat_daddr, k.saddr, e.nat_dport),
        KIND_HAIRPIN => {
            egress(k.saddr, k.daddr, k.dport) && ingress(e.nat_daddr, k.saddr, e.nat_dport)
        }
        // Either end may be a task; whichever is was checked. Not a task: policy 0, allowed.
        KIND_LOCAL => egress(k.saddr, k.daddr, k.dport) && ingress(k.daddr, k.saddr, k.dport),
        _ => true,
    }
}

/// One rule as `sg ls` prints it: `tcp 80-81 from 10.0.0.0/8, sg-lb`.
pub fn describe(perm: &IpPermission, inbound: bool) -> String {
    let what = match allow_of(perm) {
        Allow::All => "all".to_owned(),
        Allow::Range(ICMP, 0, u16::MAX) => "icmp all".to_owned(),
        Allow::Range(ICMP, lo, hi) if lo & 0xff == 0 && hi & 0xff == 0xff && lo >> 8 == hi >> 8 => {
            format!("icmp type {}", lo >> 8)
        }
        Allow::Range(ICMP, lo, _) => format!("icmp type {} code {}", lo >> 8, lo & 0xff),
        Allow::Range(p, 0, u16::MAX) if p != TCP && p != UDP => format!("protocol {p}"),
        Allow::Range(p, lo, hi) => {
            let name = if p == TCP { "tcp" } else { "udp" };
            if lo == hi {
                format!("{name} {lo}")
            } else {
                format!("{name} {lo}-{hi}")
            }
        }
    };
    let peers: Vec<&str> = perm
        .ip_ranges
        .iter()
        .map(|r| r.cidr_ip.as_str())
        .chain(perm.user_id_group_pairs.iter().map(|g| g.group_id.as_str()))
        .collect();
    let dir = if inbound { "from" } else { "to" };
    format!("{what} {dir} {}", peers.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state;

    fn sg_state(text: &str) -> State {
        let s: State = state::parse(text).unwrap();
        state::validate(&s, state::BridgeNet::default()).unwrap();
        s
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
    fn naive(state: &State, task: &str, dir: u32, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        let t = state.tasks.iter().find(|t| t.name == task).unwrap();
        if t.security_groups.is_empty() {
            return state.host.default_policy == DefaultPolicy::Allow || dir == DIR_EGRESS;
        }
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
                let port_ok = match allow_of(p) {
                    Allow::All => true,
                    Allow::Range(pp, lo, hi) => pp == proto && lo <= port && port <= hi,
                };
                let peer_ok = p.ip_ranges.iter().any(|r| {
                    let (a, l) = parse_cidr(&r.cidr_ip).unwrap();
                    u32::from(peer) & mask(l) == u32::from(a)
                }) || p.user_id_group_pairs.iter().any(|g| {
                    state
                        .tasks
                        .iter()
                        .any(|m| m.ipv4_address == peer && m.security_groups.contains(&g.group_id))
                });
                port_ok && peer_ok
            })
    }

    /// What the datapath answers for these entries: its probe sequence over the raw keys.
    fn probe(c: &Compiled, policy: u32, dir: u32, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
        if policy == 0 {
            return true;
        }
        let peers: HashMap<PeerKey, PeerRules> = c.peers.iter().copied().collect();
        let rules: std::collections::HashSet<RuleKey> = c.rules.iter().map(|(k, _)| *k).collect();
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

    #[test]
    fn probes_answer_like_the_rules() {
        let s = sg_state(TWO_GROUPS);
        let c = Compiled::new(&s, 0).unwrap();
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
        let mut checked = 0;
        for t in &s.tasks {
            let policy = c.policy_of(t.ipv4_address);
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for p in peers {
                    for (proto, port) in probes {
                        let want = naive(&s, &t.name, dir, ip(p), proto, port);
                        assert_eq!(
                            c.allows(policy, dir, ip(p), proto, port),
                            want,
                            "{} dir {dir} {p} proto {proto} port {port}",
                            t.name
                        );
                        assert_eq!(
                            probe(&c, policy, dir, ip(p), proto, port),
                            want,
                            "probes: {} dir {dir} {p} proto {proto} port {port}",
                            t.name
                        );
                        checked += usize::from(want);
                    }
                }
            }
        }
        assert!(checked > 100, "the probes must hit allowed cases too");
        // Same groups, same policy; no groups and default allow, no policy.
        assert_eq!(c.policy_of(ip("172.17.0.2")), c.policy_of(ip("172.17.0.5")));
        assert_ne!(c.policy_of(ip("172.17.0.2")), c.policy_of(ip("172.17.0.4")));
        assert_eq!(c.policy_of(ip("172.17.0.6")), 0);
    }

    #[test]
    fn default_deny_allows_out_not_in() {
        let mut s = sg_state(TWO_GROUPS);
        s.host.default_policy = DefaultPolicy::Deny;
        let c = Compiled::new(&s, 1).unwrap();
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
        let c = Compiled::new(&s, 0).unwrap();
        assert!(c.allows(db(&c), DIR_INGRESS, ip("172.17.0.5"), TCP, 5432));
        s.tasks.retain(|t| t.name != "web2");
        let c = Compiled::new(&s, 0).unwrap();
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
        assert_eq!(peer_blocks(0, 0).collect::<Vec<_>>(), vec![(0, 0)]);
    }

    #[test]
    fn unions_are_shared_and_merged() {
        let s = sg_state(TWO_GROUPS);
        let c = Compiled::new(&s, 0).unwrap();
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
            text.push_str(&format!(
                r#"{{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{{"CidrIp": "10.{}.{}.0/24"}}]}}"#,
                i / 256,
                i % 256
            ));
        }
        text.push_str(r#"]}], "tasks": [{"name": "t", "ipv4Address": "172.17.0.2", "securityGroups": ["sg-big"]}]}"#);
        let s = sg_state(&text);
        let e = Compiled::new(&s, 0).unwrap_err();
        assert_eq!(e.what, "CIDR entries");
        assert!(e.to_string().contains("more than the 32768"), "{e}");
    }

    /// 300,000 groups, 200 tasks in 200 different pairs of them: compiling looks each group and
    /// each reference up once (the filter over every group per policy made it quadratic). A
    /// loose bound, for a shared machine; the answers are checked too.
    #[test]
    fn compiling_is_linear_in_the_number_of_groups() {
        let s = state::tests::many_groups(300_000);
        let start = std::time::Instant::now();
        let c = Compiled::new(&s, 0).unwrap();
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
}
