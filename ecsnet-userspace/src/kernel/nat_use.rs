//! The masquerade counts of `NAT_USE` (IPv4) and `NAT_USE6` as the agent sets them on each GC
//! pass: the ports the connection tables hold per task and destination, plus what the datapath
//! counted while the tables were read. Pure, and the same for both families, keyed by `K`
//! (`NatUseKey` or `NatUseKey6`): `maps::collect_garbage` reads the maps and writes what this
//! decides.

use std::{collections::HashMap, hash::Hash};

use ecsnet_common::ct::{DIR_REPLY, KIND_MASQUERADE};

/// Masquerade ports held per task and destination.
pub type Held<K> = HashMap<K, u64>;

/// Counts a connection-table entry of kind `kind` and direction `dir` in `held` when it holds
/// a masquerade port: the reply direction of a masqueraded flow, whose key holds the port
/// chosen for it (an original direction without its reply holds none, and a reply without its
/// original still does). `key` makes the count's key, of the entry's peer (the original tuple).
pub fn count<K: Eq + Hash>(held: &mut Held<K>, kind: u8, dir: u8, key: impl FnOnce() -> K) {
    if kind == KIND_MASQUERADE && dir == DIR_REPLY {
        *held.entry(key()).or_default() += 1;
    }
}

/// The count a key should have, `held` ports in the tables, when it was `before` as the tables
/// began to be read and `now` after (None: no such key): the ports held, plus what the datapath
/// added meanwhile. A flow created while the tables were read may be among `held` too: counted
/// twice until the next pass, which is the safe side. None: the key can go.
pub fn settled(held: u64, before: Option<u64>, now: Option<u64>) -> Option<u64> {
    let added = now.unwrap_or(0).saturating_sub(before.unwrap_or(0));
    Some(held.saturating_add(added)).filter(|n| *n > 0)
}

/// What to change in `NAT_USE` or `NAT_USE6`, read as `before` and `now` around reading the
/// tables, which hold `held`: each key with its new count, or None to remove it. Keys already
/// right are left alone.
pub fn changes<K: Copy + Ord + Hash>(
    before: &HashMap<K, u64>,
    now: &HashMap<K, u64>,
    held: &Held<K>,
) -> Vec<(K, Option<u64>)> {
    let mut keys: Vec<K> = now.keys().chain(held.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let current = now.get(&k).copied();
            let want = settled(
                held.get(&k).copied().unwrap_or(0),
                before.get(&k).copied(),
                current,
            );
            (want != current).then_some((k, want))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use ecsnet_common::{
        ct::{CtEntry, CtKey, CtKey6, DIR_ORIGINAL, KIND_EAST_WEST, PROTO_UDP},
        maps::{NatUseKey, NatUseKey6},
    };

    use super::*;

    fn key(task: u32, dport: u16) -> NatUseKey {
        NatUseKey {
            task,
            daddr: 9,
            dport,
            proto: PROTO_UDP,
            _pad: 0,
        }
    }

    fn entry(kind: u8, dir: u8, task: u32, dport: u16) -> CtEntry {
        CtEntry {
            peer: CtKey {
                saddr: task,
                daddr: 9,
                sport: 40000,
                dport,
                proto: PROTO_UDP,
                _pad: [0; 3],
            },
            kind,
            dir,
            ..Default::default()
        }
    }

    #[test]
    fn only_replies_of_masqueraded_flows_hold_ports() {
        let mut held = Held::<NatUseKey>::new();
        for e in [
            entry(KIND_MASQUERADE, DIR_REPLY, 1, 53),
            entry(KIND_MASQUERADE, DIR_REPLY, 1, 53),
            entry(KIND_MASQUERADE, DIR_REPLY, 1, 80),
            entry(KIND_MASQUERADE, DIR_REPLY, 2, 53),
            // The original direction of a flow: its reply is what holds the port.
            entry(KIND_MASQUERADE, DIR_ORIGINAL, 1, 53),
            entry(KIND_EAST_WEST, DIR_REPLY, 1, 53),
        ] {
            count(&mut held, e.kind, e.dir, || NatUseKey::of(&e.peer));
        }
        assert_eq!(held[&key(1, 53)], 2);
        assert_eq!(held[&key(1, 80)], 1);
        assert_eq!(held[&key(2, 53)], 1);
        assert_eq!(held.len(), 3);
    }

    #[test]
    fn a_count_becomes_the_ports_held_plus_what_was_added_meanwhile() {
        // Steady: nothing to change.
        assert_eq!(settled(5, Some(5), Some(5)), Some(5));
        // Flows expired or were evicted: down to what is held.
        assert_eq!(settled(2, Some(9), Some(9)), Some(2));
        // Three created while the tables were read: kept on top (some may be counted twice).
        assert_eq!(settled(2, Some(9), Some(12)), Some(5));
        assert_eq!(settled(0, None, Some(3)), Some(3));
        // A flow given back meanwhile never takes the count below what is held.
        assert_eq!(settled(4, Some(6), Some(5)), Some(4));
        // Nothing held, nothing added: the key goes.
        assert_eq!(settled(0, Some(7), Some(7)), None);
        assert_eq!(settled(0, Some(0), Some(0)), None);
    }

    #[test]
    fn changes_name_only_the_keys_that_move() {
        let before = HashMap::from([(key(1, 53), 10), (key(1, 80), 3), (key(2, 53), 1)]);
        let now = HashMap::from([(key(1, 53), 11), (key(1, 80), 3), (key(2, 53), 1)]);
        let held = Held::<NatUseKey>::from([(key(1, 53), 4), (key(1, 80), 3), (key(3, 53), 2)]);
        assert_eq!(
            changes(&before, &now, &held),
            vec![
                (key(1, 53), Some(5)),
                (key(2, 53), None),
                // Created between the datapath's count and the tables' read: held, not yet
                // counted (the key was missing or removed): counted now.
                (key(3, 53), Some(2)),
            ]
        );
    }

    #[test]
    fn ipv6_flows_are_counted_by_their_own_key() {
        let task = |n: u8| {
            let mut a = [0xfd; 16];
            a[15] = n;
            a
        };
        let peer = |t: u8, dport: u16| CtKey6 {
            saddr: task(t),
            daddr: [0x20; 16],
            sport: 40000,
            dport,
            proto: PROTO_UDP,
            _pad: [0; 3],
        };
        let mut held = Held::<NatUseKey6>::new();
        for (kind, dir, t, dport) in [
            (KIND_MASQUERADE, DIR_REPLY, 1, 53),
            (KIND_MASQUERADE, DIR_REPLY, 1, 53),
            (KIND_MASQUERADE, DIR_ORIGINAL, 1, 53),
            (KIND_MASQUERADE, DIR_REPLY, 2, 53),
            (KIND_EAST_WEST, DIR_REPLY, 2, 80),
        ] {
            count(&mut held, kind, dir, || NatUseKey6::of(&peer(t, dport)));
        }
        let k = |t, dport| NatUseKey6::of(&peer(t, dport));
        assert_eq!(held, Held::from([(k(1, 53), 2), (k(2, 53), 1)]));
        // Settled as the IPv4 counts are: a key nobody holds any more goes.
        let before = HashMap::from([(k(1, 53), 3), (k(3, 53), 1)]);
        assert_eq!(
            changes(&before, &before, &held),
            vec![(k(1, 53), Some(2)), (k(2, 53), Some(1)), (k(3, 53), None)]
        );
    }
}
