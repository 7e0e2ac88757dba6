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

/// The `SG_LEVELS6` value of the lengths `lens`.
fn bits(lens: &[u8]) -> u32 {
    lens.iter().fold(0, |m, &l| m | level6_bit(l))
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

#[test]
fn ipv6_rules_land_in_the_maps_and_nothing_stale_stays() {
    let lab = Lab::up_v6("sg6m", 2, &[], "nat");
    lab.ecsnet_up();
    let (a1, a2) = (addr6(&lab, 1), addr6(&lab, 2));
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
    let full = with_groups(
        &lab,
        &[
            sg("sg-a", "a", &inbound_a, &[out_a.clone()]),
            group_b.clone(),
        ],
    );
    apply(&lab, "full.json", &full);

    // sg ls shows the IPv6 CIDRs as AWS prints them.
    let ls = instance_ok(&lab, &["sg", "ls"]);
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
        serde_json::from_str(&instance_ok(&lab, &["sg", "ls", "--json"])).expect("JSON");
    assert_eq!(
        json_ls[0]["group"]["IpPermissions"][1]["Ipv6Ranges"],
        json!([{"CidrIpv6": "2001:db8::/32"}]),
        "sg ls --json: {json_ls}"
    );

    let expect_full = |p1: u32, p2: u32| {
        let (in1, out1, in2) = (
            scope(p1, DIR_INGRESS),
            scope(p1, DIR_EGRESS),
            scope(p2, DIR_INGRESS),
        );
        let mut keys: BTreeSet<Key> = BTreeSet::from([
            (in1, 0, Ipv6Addr::UNSPECIFIED),
            (in1, 32, "2001:db8::".parse().unwrap()),
            (in1, 128, a2),
            (out1, 0, Ipv6Addr::UNSPECIFIED),
            (in2, 128, a1),
        ]);
        keys.extend(slash57_blocks().map(|b| (in1, 64, b)));
        let levels = vec![
            (in1, bits(&[0, 32, 64, 128])),
            (out1, bits(&[0])),
            (in2, bits(&[128])),
        ];
        (keys, levels)
    };
    let check_full = || {
        let (p1, p2) = policies(&lab);
        assert!(p1 != 0 && p2 != 0 && p1 != p2, "policies {p1} {p2}");
        let m = maps(&lab);
        let got = peers(&m);
        let (keys, mut levels) = expect_full(p1, p2);
        assert_eq!(got.keys().copied().collect::<BTreeSet<_>>(), keys);
        levels.sort_unstable();
        assert_eq!(m.levels, levels);
        one_generation(&m, p1);
        // Everything from task 2 (sg-b), and everything out: no second lookup. ::/0 allows
        // TCP 80 only, a rule set of its own.
        let (in1, out1) = (scope(p1, DIR_INGRESS), scope(p1, DIR_EGRESS));
        assert_eq!(got[&(in1, 128, a2)].1, 1, "sg-b's members: all");
        assert_eq!(got[&(out1, 0, Ipv6Addr::UNSPECIFIED)].1, 1);
        assert_eq!(got[&(in1, 0, Ipv6Addr::UNSPECIFIED)].1, 0);
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
    let fewer = with_groups(
        &lab,
        &[
            sg(
                "sg-a",
                "a",
                &[v6("tcp", Some((80, 80)), &["::/0"])],
                &[out_a],
            ),
            group_b,
        ],
    );
    apply(&lab, "fewer.json", &fewer);
    let (p1, p2) = policies(&lab);
    let m = maps(&lab);
    let (in1, out1, in2) = (
        scope(p1, DIR_INGRESS),
        scope(p1, DIR_EGRESS),
        scope(p2, DIR_INGRESS),
    );
    assert_eq!(
        peers(&m).keys().copied().collect::<Vec<_>>(),
        [
            (in1, 0, Ipv6Addr::UNSPECIFIED),
            (out1, 0, Ipv6Addr::UNSPECIFIED),
            (in2, 128, a1),
        ]
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    let mut levels = vec![(in1, bits(&[0])), (out1, bits(&[0])), (in2, bits(&[128]))];
    levels.sort_unstable();
    assert_eq!(m.levels, levels);
    one_generation(&m, p1);

    // No groups (defaultPolicy allow): no policy, no entries.
    let mut none = state(&lab);
    none["securityGroups"] = json!([]);
    apply(&lab, "none.json", &none);
    assert_eq!(policies(&lab), (0, 0));
    assert_eq!(maps(&lab), Policy6::default(), "every IPv6 entry removed");

    // defaultPolicy deny: both tasks may send anywhere over IPv6 and receive nothing.
    none["host"]["defaultPolicy"] = json!("deny");
    apply(&lab, "deny.json", &none);
    let (p1, p2) = policies(&lab);
    assert!(
        p1 != 0 && p1 == p2,
        "one policy for both bare tasks: {p1} {p2}"
    );
    let m = maps(&lab);
    let out = scope(p1, DIR_EGRESS);
    let got = peers(&m);
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        [(out, 0, Ipv6Addr::UNSPECIFIED)]
    );
    assert_eq!(got[&(out, 0, Ipv6Addr::UNSPECIFIED)].1, 1, "everything out");
    assert_eq!(
        m.levels,
        [(out, bits(&[0]))],
        "nothing in: no ingress lengths"
    );
}

/// `n` IPv6 rules into sg-a: for each i below n/2, TCP 9000 from a /128 inside a /64 that
/// allows TCP 8000 + i % 4. Returns the groups and the expected keys of task 1's ingress
/// scope (without the scope).
fn many(n: usize) -> (Vec<Value>, BTreeSet<(u8, Ipv6Addr)>) {
    let mut rules = Vec::with_capacity(n);
    let mut keys = BTreeSet::new();
    for i in 0..n / 2 {
        let hi = u16::try_from(i).expect("fewer than 65,536 pairs");
        let net = Ipv6Addr::new(0x2001, 0xdb8, hi, 1, 0, 0, 0, 0);
        let host = Ipv6Addr::new(0x2001, 0xdb8, hi, 1, 0, 0, 0, 1);
        let port = 8000 + i32::from(hi % 4);
        rules.push(v6("tcp", Some((port, port)), &[&format!("{net}/64")]));
        rules.push(v6("tcp", Some((9000, 9000)), &[&format!("{host}/128")]));
        keys.insert((64, net));
        keys.insert((128, host));
    }
    let groups = vec![
        sg("sg-a", "a", &rules, &[v6("-1", None, &["::/0"])]),
        sg("sg-b", "b", &[perm("-1", None, &["sg-a"])], &[]),
    ];
    (groups, keys)
}

/// The maps hold task 1's ingress `keys`, its `::/0` egress and task 2's ingress from task 1,
/// and nothing else.
fn holds_exactly(lab: &Lab, keys: &BTreeSet<(u8, Ipv6Addr)>) -> Policy6 {
    let (p1, p2) = policies(lab);
    let m = maps(lab);
    let (in1, out1, in2) = (
        scope(p1, DIR_INGRESS),
        scope(p1, DIR_EGRESS),
        scope(p2, DIR_INGRESS),
    );
    let mut want: BTreeSet<Key> = keys.iter().map(|&(len, a)| (in1, len, a)).collect();
    want.insert((out1, 0, Ipv6Addr::UNSPECIFIED));
    want.insert((in2, 128, addr6(lab, 1)));
    let got: BTreeSet<Key> = peers(&m).into_keys().collect();
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "SG_PEERS6 holds other entries than the state's"
    );
    let mut levels = vec![
        (in1, bits(&[64, 128])),
        (out1, bits(&[0])),
        (in2, bits(&[128])),
    ];
    levels.sort_unstable();
    assert_eq!(m.levels, levels);
    one_generation(&m, p1);
    m
}

#[test]
fn ten_thousand_ipv6_rules_fit_and_too_many_change_nothing() {
    let lab = Lab::up_v6("sg6k", 2, &[], "nat");
    lab.ecsnet_up();

    let (groups, keys) = many(10_000);
    assert_eq!(keys.len(), 10_000);
    apply(&lab, "many.json", &with_groups(&lab, &groups));
    let m = holds_exactly(&lab, &keys);
    // A /128 inside its /64 holds the union of both rules: another rule set than the /64's.
    let got = peers(&m);
    let (p1, _) = policies(&lab);
    let in1 = scope(p1, DIR_INGRESS);
    let net = Ipv6Addr::new(0x2001, 0xdb8, 7, 1, 0, 0, 0, 0);
    let host = Ipv6Addr::new(0x2001, 0xdb8, 7, 1, 0, 0, 0, 1);
    assert_ne!(got[&(in1, 64, net)].0, got[&(in1, 128, host)].0);

    // Fewer: exactly the 100 new entries.
    let (groups, keys) = many(100);
    apply(&lab, "hundred.json", &with_groups(&lab, &groups));
    holds_exactly(&lab, &keys);

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
}
