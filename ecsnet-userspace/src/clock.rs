//! The datapath's clock seen from user space: `CLOCK_MONOTONIC` (what `bpf_ktime_get_ns` and the
//! coarse clock the datapath stamps with count), and its offset to Unix time for records and
//! events. Used by flow logs, `monitor` and the agent's garbage collection.

use nix::time::{ClockId, clock_gettime};

const NS_PER_SEC: u64 = 1_000_000_000;

fn ns(clock: ClockId) -> u64 {
    let t = clock_gettime(clock).expect("CLOCK_MONOTONIC and CLOCK_REALTIME are always there");
    // Neither clock is ever before its epoch: both fields are non-negative.
    t.tv_sec().cast_unsigned() * NS_PER_SEC + t.tv_nsec().cast_unsigned()
}

/// `CLOCK_MONOTONIC` now, ns: the clock of the datapath's timestamps.
pub fn monotonic_ns() -> u64 {
    ns(ClockId::CLOCK_MONOTONIC)
}

/// Unix time minus `CLOCK_MONOTONIC`, ns: what turns a datapath timestamp into a wall-clock one.
pub fn wall_offset_ns() -> i128 {
    i128::from(ns(ClockId::CLOCK_REALTIME)) - i128::from(monotonic_ns())
}

/// Unix time of datapath timestamp `mono_ns`, ns (never before 1970).
pub fn unix_ns(mono_ns: u64, wall_offset_ns: i128) -> u64 {
    u64::try_from((i128::from(mono_ns) + wall_offset_ns).max(0)).unwrap_or(u64::MAX)
}

/// Unix time of datapath timestamp `mono_ns`, whole seconds.
pub fn unix_secs(mono_ns: u64, wall_offset_ns: i128) -> u64 {
    unix_ns(mono_ns, wall_offset_ns) / NS_PER_SEC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_turn_monotonic_into_unix_time() {
        assert_eq!(unix_secs(2_500_000_000, 10 * 1_000_000_000), 12);
        assert_eq!(unix_ns(5, -10), 0, "never before 1970");
        let before = monotonic_ns();
        assert!(monotonic_ns() >= before);
        assert!(wall_offset_ns() > 0, "this machine booted after 1970");
    }
}
