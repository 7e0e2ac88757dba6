//! The one median and percentile of the tooling (bench rounds, probe round trips, program
//! costs, discovery latencies). Pure; no feature gates it.

use std::cmp::Ordering;

/// A value a median can be taken of.
pub trait Sample: Copy {
    /// Whether the value counts (a float that is NaN or infinite does not).
    fn counts(self) -> bool;
    fn order(&self, other: &Self) -> Ordering;
    /// The value halfway between two (rounded down for integers).
    #[must_use]
    fn halfway(self, other: Self) -> Self;
}

impl Sample for f64 {
    fn counts(self) -> bool {
        self.is_finite()
    }
    fn order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
    fn halfway(self, other: Self) -> Self {
        f64::midpoint(self, other)
    }
}

impl Sample for u64 {
    fn counts(self) -> bool {
        true
    }
    fn order(&self, other: &Self) -> Ordering {
        self.cmp(other)
    }
    fn halfway(self, other: Self) -> Self {
        u64::midpoint(self, other)
    }
}

/// The values that count, in order.
fn counted<T: Sample>(values: &[T]) -> Vec<T> {
    let mut v: Vec<T> = values.iter().copied().filter(|x| x.counts()).collect();
    v.sort_by(T::order);
    v
}

/// The median of the values that count: the middle one, or halfway between the two middle ones
/// of an even number. `None` when no value counts.
pub fn median<T: Sample>(values: &[T]) -> Option<T> {
    let v = counted(values);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[mid]),
        _ => Some(v[mid - 1].halfway(v[mid])),
    }
}

/// The `pct`th percentile (0 to 100) of the values that count, by nearest rank: the smallest
/// value that at least `pct` percent of them do not exceed (100: the largest). `None` when no
/// value counts.
pub fn percentile<T: Sample>(values: &[T], pct: u8) -> Option<T> {
    let v = counted(values);
    let rank = (usize::from(pct.min(100)) * v.len()).div_ceil(100);
    v.get(rank.saturating_sub(1)).copied()
}

#[cfg(test)]
mod tests {
    use super::{median, percentile};

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 99), Some(50.0), "99% of 50 is 49.5: rank 50");
        assert_eq!(percentile(&v, 50), Some(25.0));
        assert_eq!(percentile(&v, 100), Some(50.0));
        assert_eq!(percentile(&v, 0), Some(1.0));
        assert_eq!(percentile(&[5_u64, 1, 3], 99), Some(5));
        assert_eq!(percentile(&[f64::NAN, -2.0], 50), Some(-2.0));
        assert_eq!(percentile::<f64>(&[], 99), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median::<f64>(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
        assert_eq!(median(&[f64::INFINITY, f64::NAN]), None);
        assert_eq!(median(&[7_u64, 1, 5]), Some(5));
        assert_eq!(median(&[4_u64, 1, 2, 3]), Some(2), "halfway, rounded down");
        assert_eq!(median::<u64>(&[]), None);
    }
}
