//! The masquerade counts of `NAT_USE` as the agent sets them on each GC pass: the ports the
//! connection tables hold per task and destination, plus what the datapath counted while the
//! tables were read. Pure: `maps::collect_garbage` reads the maps and writes what this decides.

use std::collections::HashMap;

use ecsnet_common::{
    ct::{CtEntry, DIR_REPLY, KIND_MASQUERADE},
    maps::NatUseKey,
};

/// Masquerade ports held per task and destination.
pub type Held = HashMap<NatUseKey, u64>;

/// Counts entry `e` of a connection table in `held` when it holds a masquerade port: the reply
/// direction of a masqueraded flow, whose key holds the port chosen for it (an original
/// direction without its reply holds none, and a reply without its original still does).
pub fn count(held: &mut Held, e: &CtEntry) {
    if e.kind == KIND_MASQUERADE && e.dir == DIR_REPLY {
        *held.entry(NatUseKey::of(&e.peer)).or_default() += 1;
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

/// What to change in `NAT_USE`, read as `before` and `now` around reading the tables, which
/// hold `held`: each key with its new count, or None to remove it. Keys already right are left
/// alone.
pub fn changes(
    before: &HashMap<NatUseKey, u64>,
    now: &HashMap<NatUseKey, u64>,
    held: &Held,
) -> Vec<(NatUseKey, Option<u64>)> {
    let mut keys: Vec<NatUseKey> = now.keys().chain(held.keys()).copied().collect();
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
    use ecsnet_common::ct::{CtKey, DIR_ORIGINAL, KIND_EAST_WEST, PROTO_UDP};

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
        let mut held = Held::new();
        for e in [
            entry(KIND_MASQUERADE, DIR_REPLY, 1, 53),
            entry(KIND_MASQUERADE, DIR_REPLY, 1, 53),
            entry(KIND_MASQUERADE, DIR_REPLY, 1, 80),
            entry(KIND_MASQUERADE, DIR_REPLY, 2, 53),
            // The original direction of a flow: its reply is what holds the port.
            entry(KIND_MASQUERADE, DIR_ORIGINAL, 1, 53),
            entry(KIND_EAST_WEST, DIR_REPLY, 1, 53),
        ] {
            count(&mut held, &e);
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
        let held = Held::from([(key(1, 53), 4), (key(1, 80), 3), (key(3, 53), 2)]);
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
}
