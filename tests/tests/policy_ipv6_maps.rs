//! Security groups with IPv6 rules, applied to a real instance, as the IPv6 policy maps hold
//! them: each `Ipv6Ranges` CIDR expanded to multiple-of-8 blocks in `SG_PEERS6`, group
//! references as the members' /128s, every scope's lengths in `SG_LEVELS6`, both in the
//! generation the tasks' policy numbers name; an apply with fewer rules, or none, leaves exactly
//! its own entries; 10,000 IPv6 rules fit, and a state over the maps' capacity is refused in one
//! line and changes nothing. (The datapath's use of these entries is tested with real traffic
//! elsewhere; here it is what user space writes.)

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
};

use ecsnet::{
    kernel::maps::{Policy6, read_policy6, read_tasks},
    store::paths::InstancePaths,
};
use ecsnet_common::policy::{DIR_EGRESS, DIR_INGRESS, GENERATION_BIT, level6_bit, scope};
use ecsnet_tests::{
    Lab,
    world::{apply, down_leaves_nothing, instance_fails, instance_ok, perm, sg, state, write},
};
use serde_json::{Value, json};

/// One `IpPermissions` entry for `proto` and `ports` from or to the IPv6 CIDRs `cidrs`.
fn v6(proto: &str, ports: Option<(i32, i32)>, cidrs: &[&str]) -> Value {
    let mut p = perm(proto, ports, &[]);
    p["Ipv6Ranges"] = cidrs.iter().map(|c| json!({"CidrIpv6": c})).collect();
    p
}

/// The lab's state with `groups`, task 1 in `sg-a` and task 2 in `sg-b`.
fn with_groups(lab: &Lab, groups: &[Value]) -> Value {
    let mut s = state(lab);
    s["securityGroups"] = json!(groups);
    s["tasks"][0]["securityGroups"] = json!(["sg-a"]);
    s["tasks"][1]["securityGroups"] = json!(["sg-b"]);
    s
}

fn addr6(lab: &Lab, task: usize) -> Ipv6Addr {
    lab.status.tasks[task - 1]
        .address6
        .unwrap_or_else(|| panic!("task{task} has no IPv6 address: {:?}", lab.status))
}

/// The policy numbers of tasks 1 and 2, as `TASKS` holds them.
fn policies(lab: &Lab) -> (u32, u32) {
    let tasks = read_tasks(&InstancePaths::new(&lab.name)).expect("read TASKS");
    let of = |i: usize| {
        let addr = u32::from_ne_bytes(lab.status.tasks[i - 1].address.octets());
        let (_, info) = tasks
            .iter()
            .find(|(a, _)| *a == addr)
            .unwrap_or_else(|| panic!("task{i} is not in TASKS"));
        info.policy
    };
    (of(1), of(2))
}

/// `SG_PEERS6` and `SG_LEVELS6` as they are now.
fn maps(lab: &Lab) -> Policy6 {
    read_policy6(&InstancePaths::new(&lab.name)).expect("read the IPv6 policy maps")
}

/// An entry of `SG_PEERS6` as the tests name it: scope, length, address.
type Key = (u32, u8, Ipv6Addr);

/// `SG_PEERS6` by key: (rule set, all).
fn peers(p: &Policy6) -> BTreeMap<Key, (u32, u32)> {
    p.peers
        .iter()
        .map(|(k, r)| ((k.scope, k.len, Ipv6Addr::from(k.addr)), (r.set, r.all)))
        .collect()
}

/// The /64s of `fd00:aa:bb:c80::/57`.
fn slash57_blocks() -> impl Iterator<Item = Ipv6Addr> {
    (0..128u16).map(|i| Ipv6Addr::new(0xfd00, 0xaa, 0xbb, 0xc80 + i, 0, 0, 0, 0))
}

/// Every entry in the maps belongs to the generation of `policy` (tasks and entries switched
/// together, the other generation gone).
fn one_generation(p: &Policy6, policy: u32) {
    let gen_of = |scope: u32| scope >> 1 & GENERATION_BIT;
    let want = policy & GENERATION_BIT;
    for (k, r) in &p.peers {
        assert_eq!(gen_of(k.scope), want, "stale generation: {k:?}");
        assert_eq!(r.set & GENERATION_BIT, want, "stale rule set: {k:?} {r:?}");
    }
    for (s, _) in &p.levels {
        assert_eq!(gen_of(*s), want, "stale scope {s:#x} in SG_LEVELS6");
    }
}

/// A scope as the tests name it: task 1's ingress or egress, task 2's ingress.
#[derive(Debug, Clone, Copy)]
enum At {
    In1,
    Out1,
    In2,
}

/// The maps hold exactly `want` (scope, length, address), each scope's lengths in
/// `SG_LEVELS6`, all in the generation of the tasks' policies. Returns `SG_PEERS6` by key and
/// task 1's policy.
fn holds_exactly(lab: &Lab, want: &[(At, u8, Ipv6Addr)]) -> (BTreeMap<Key, (u32, u32)>, u32) {
    let (p1, p2) = policies(lab);
    let scope_of = |at| match at {
        At::In1 => scope(p1, DIR_INGRESS),
        At::Out1 => scope(p1, DIR_EGRESS),
        At::In2 => scope(p2, DIR_INGRESS),
    };
    let want: BTreeSet<Key> = want
        .iter()
        .map(|&(at, len, a)| (scope_of(at), len, a))
        .collect();
    let mut levels: BTreeMap<u32, u32> = BTreeMap::new();
    for &(scope, len, _) in &want {
        *levels.entry(scope).or_default() |= level6_bit(len);
    }
    let m = maps(lab);
    let got = peers(&m);
    let keys: BTreeSet<Key> = got.keys().copied().collect();
    assert_eq!(keys.len(), want.len(), "SG_PEERS6 entries");
    // (No assert_eq: a diff of 10,000 keys says nothing.)
    assert!(
        keys == want,
        "SG_PEERS6 holds other entries than the state's"
    );
    assert_eq!(
        m.levels,
        levels.into_iter().collect::<Vec<_>>(),
        "SG_LEVELS6"
    );
    one_generation(&m, p1);
    (got, p1)
}

#[test]
fn ipv6_rules_land_in_the_maps_and_nothing_stale_stays() {
    let lab = Lab::up_v6("sg6m", 2, &[], "nat");
    lab.ecsnet_up();
    let (a1, a2) = (addr6(&lab, 1), addr6(&lab, 2));
    let any = Ipv6Addr::UNSPECIFIED;
    assert_eq!(maps(&lab), Policy6::default(), "no groups, no entries");

    let inbound_a = [
        v6("tcp", Some((80, 80)), &["::/0"]),
        v6("tcp", Some((443, 443)), &["2001:DB8:0::/32"]),
        v6("udp", Some((53, 53)), &["fd00:aa:bb:c80::/57"]),
        perm("-1", None, &["sg-b"]),
    ];
    let mut out_a = v6("-1", None, &["::/0"]);
    out_a["IpRanges"] = json!([{"CidrIp": "0.0.0.0/0"}]);
    let group_b = sg(
        "sg-b",
        "b",
        &[perm("icmpv6", Some((128, -1)), &["sg-a"])],
        &[],
    );
    let group_a = sg("sg-a", "a", &inbound_a, std::slice::from_ref(&out_a));
    let full = with_groups(&lab, &[group_a, group_b.clone()]);
    apply(&lab, "full.json", &full);
    sg_ls_shows_ipv6(&lab);

    let mut want = vec![
        (At::In1, 0, any),
        (At::In1, 32, "2001:db8::".parse().unwrap()),
        (At::In1, 128, a2),
        (At::Out1, 0, any),
        (At::In2, 128, a1),
    ];
    want.extend(slash57_blocks().map(|b| (At::In1, 64, b)));
    let check_full = || {
        let (got, p1) = holds_exactly(&lab, &want);
        // Everything from task 2 (sg-b), and everything out: no second lookup. ::/0 allows
        // TCP 80 only, a rule set of its own.
        let (in1, out1) = (scope(p1, DIR_INGRESS), scope(p1, DIR_EGRESS));
        assert_eq!(got[&(in1, 128, a2)].1, 1, "sg-b's members: all");
        assert_eq!(got[&(out1, 0, any)].1, 1);
        assert_eq!(got[&(in1, 0, any)].1, 0);
        // The /57's 128 /64s hold one union (udp 53 and ::/0's tcp 80).
        let sets: BTreeSet<(u32, u32)> = slash57_blocks().map(|b| got[&(in1, 64, b)]).collect();
        assert_eq!(sets.len(), 1, "{sets:?}");
        p1
    };
    let first = check_full();

    // The same state again: the other generation, and nothing of the first left.
    apply(&lab, "again.json", &full);
    let second = check_full();
    assert_ne!(
        first & GENERATION_BIT,
        second & GENERATION_BIT,
        "generation switched"
    );

    // Fewer rules: exactly the new entries.
    let group_a = sg(
        "sg-a",
        "a",
        &[v6("tcp", Some((80, 80)), &["::/0"])],
        &[out_a],
    );
    apply(&lab, "fewer.json", &with_groups(&lab, &[group_a, group_b]));
    holds_exactly(
        &lab,
        &[(At::In1, 0, any), (At::Out1, 0, any), (At::In2, 128, a1)],
    );

    // No groups (defaultPolicy allow): no policy, no entries.
    let mut none = state(&lab);
    none["securityGroups"] = json!([]);
    apply(&lab, "none.json", &none);
    assert_eq!(policies(&lab), (0, 0));
    assert_eq!(maps(&lab), Policy6::default(), "every IPv6 entry removed");

    // defaultPolicy deny: both tasks may send anywhere over IPv6 and receive nothing (no
    // ingress entry, no ingress lengths).
    none["host"]["defaultPolicy"] = json!("deny");
    apply(&lab, "deny.json", &none);
    let (p1, p2) = policies(&lab);
    assert!(
        p1 != 0 && p1 == p2,
        "one policy for both bare tasks: {p1} {p2}"
    );
    let (got, _) = holds_exactly(&lab, &[(At::Out1, 0, any)]);
    assert_eq!(got[&(scope(p1, DIR_EGRESS), 0, any)].1, 1, "everything out");
    down_leaves_nothing(lab);
}

/// `sg ls` and `sg ls --json` show the IPv6 CIDRs as AWS prints them (RFC 5952).
fn sg_ls_shows_ipv6(lab: &Lab) {
    let ls = instance_ok(lab, &["sg", "ls"]);
    for line in [
        "in  tcp 80 from ::/0",
        "in  tcp 443 from 2001:db8::/32",
        "in  udp 53 from fd00:aa:bb:c80::/57",
        "in  all from sg-b",
        "out all to 0.0.0.0/0, ::/0",
        "in  icmpv6 type 128 from sg-a",
    ] {
        assert!(ls.contains(line), "sg ls lacks {line:?}:\n{ls}");
    }
    let json_ls: Value =
        serde_json::from_str(&instance_ok(lab, &["sg", "ls", "--json"])).expect("JSON");
    assert_eq!(
        json_ls[0]["group"]["IpPermissions"][1]["Ipv6Ranges"],
        json!([{"CidrIpv6": "2001:db8::/32"}]),
        "sg ls --json: {json_ls}"
    );
}

/// `n` IPv6 rules into sg-a: for each i below n/2, TCP 9000 from a /128 inside a /64 that
/// allows TCP 8000 + i % 4. Returns the groups and the entries of task 1's ingress.
fn many(n: usize) -> (Vec<Value>, Vec<(At, u8, Ipv6Addr)>) {
    let mut rules = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n / 2 {
        let hi = u16::try_from(i).expect("fewer than 65,536 pairs");
        let net = Ipv6Addr::new(0x2001, 0xdb8, hi, 1, 0, 0, 0, 0);
        let host = Ipv6Addr::new(0x2001, 0xdb8, hi, 1, 0, 0, 0, 1);
        let port = 8000 + i32::from(hi % 4);
        rules.push(v6("tcp", Some((port, port)), &[&format!("{net}/64")]));
        rules.push(v6("tcp", Some((9000, 9000)), &[&format!("{host}/128")]));
        keys.push((At::In1, 64, net));
        keys.push((At::In1, 128, host));
    }
    let groups = vec![
        sg("sg-a", "a", &rules, &[v6("-1", None, &["::/0"])]),
        sg("sg-b", "b", &[perm("-1", None, &["sg-a"])], &[]),
    ];
    (groups, keys)
}

#[test]
fn ten_thousand_ipv6_rules_fit_and_too_many_change_nothing() {
    let lab = Lab::up_v6("sg6k", 2, &[], "nat");
    lab.ecsnet_up();
    // Besides task 1's ingress: its egress to ::/0, task 2's ingress from task 1.
    let others = [
        (At::Out1, 0, Ipv6Addr::UNSPECIFIED),
        (At::In2, 128, addr6(&lab, 1)),
    ];

    let (groups, mut want) = many(10_000);
    assert_eq!(want.len(), 10_000);
    want.extend(others);
    apply(&lab, "many.json", &with_groups(&lab, &groups));
    let (got, p1) = holds_exactly(&lab, &want);
    // A /128 inside its /64 holds the union of both rules: another rule set than the /64's.
    let in1 = scope(p1, DIR_INGRESS);
    let net = Ipv6Addr::new(0x2001, 0xdb8, 7, 1, 0, 0, 0, 0);
    let host = Ipv6Addr::new(0x2001, 0xdb8, 7, 1, 0, 0, 0, 1);
    assert_ne!(got[&(in1, 64, net)].0, got[&(in1, 128, host)].0);

    // Fewer: exactly the 100 new entries.
    let (groups, mut want) = many(100);
    want.extend(others);
    apply(&lab, "hundred.json", &with_groups(&lab, &groups));
    holds_exactly(&lab, &want);

    // 257 /57s are 32,896 /64s, with task 1's egress and task 2's ingress 32,898 entries,
    // more than a generation's 32,768: one line, exit 2, nothing changed.
    let before = (
        maps(&lab),
        policies(&lab),
        instance_ok(&lab, &["sg", "ls", "--json"]),
    );
    let rules: Vec<Value> = (0..257u16)
        .map(|i| {
            let net = Ipv6Addr::new(0x2001, 0xdb8, i, 0, 0, 0, 0, 0);
            v6("tcp", Some((80, 80)), &[&format!("{net}/57")])
        })
        .collect();
    let mut big = with_groups(&lab, &many(2).0);
    big["securityGroups"][0]["IpPermissions"] = json!(rules);
    let file = write(&lab, "big.json", &big);
    let line = instance_fails(&lab, &["apply", "-f", &file], 2);
    for part in [
        "$.securityGroups",
        "need 32898 IPv6 CIDR entries",
        "more than the 32768",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    let after = (
        maps(&lab),
        policies(&lab),
        instance_ok(&lab, &["sg", "ls", "--json"]),
    );
    assert!(
        after == before,
        "a refused apply changed the maps or the state"
    );
    down_leaves_nothing(lab);
}
