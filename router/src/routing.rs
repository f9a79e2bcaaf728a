//! Key → shard and key range → shards: lookups over the ordered, disjoint, half-open shard ranges
//! of a topology. Pure; no I/O.

use shard_server::api::KeyRange;
use shard_server::topology::ShardEntry;

/// The shard ranges `[low, high_exclusive)` in key order; answers are indices into that order
/// (which is the topology's shard order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges {
    spans: Vec<(i64, i64)>,
}

impl Ranges {
    /// From half-open `(low, high_exclusive)` spans, which must be ordered and disjoint (a
    /// validated topology guarantees it).
    pub fn new(spans: Vec<(i64, i64)>) -> Ranges {
        debug_assert!(spans.iter().all(|&(lo, hi)| lo < hi));
        debug_assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        Ranges { spans }
    }

    pub fn from_shards(shards: &[ShardEntry]) -> Ranges {
        Ranges::new(shards.iter().map(|s| (s.low, s.high_exclusive())).collect())
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The shard holding `key`, if any (binary search).
    pub fn shard_for_key(&self, key: i64) -> Option<usize> {
        let i = self.spans.partition_point(|&(_, hi)| hi <= key);
        self.spans.get(i).filter(|&&(lo, _)| lo <= key).map(|_| i)
    }

    /// The shards intersecting the inclusive `range`, in key order, each with the range clipped to
    /// that shard (inclusive bounds). Empty when the range falls in a gap, outside every shard, or
    /// is inverted (`low > high`; callers reject that before asking).
    pub fn split(&self, range: KeyRange) -> Vec<(usize, KeyRange)> {
        if range.low > range.high {
            return Vec::new();
        }
        let first = self.spans.partition_point(|&(_, hi)| hi <= range.low);
        self.spans[first..]
            .iter()
            .enumerate()
            .take_while(|&(_, &(lo, _))| lo <= range.high)
            .map(|(k, &(lo, hi))| {
                // `hi - 1` cannot underflow: lo < hi.
                (first + k, KeyRange { low: range.low.max(lo), high: range.high.min(hi - 1) })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sh0 [0, 100), sh1 [100, 200), gap [200, 300), sh2 [300, 400).
    fn ranges() -> Ranges {
        Ranges::new(vec![(0, 100), (100, 200), (300, 400)])
    }

    fn kr(low: i64, high: i64) -> KeyRange {
        KeyRange { low, high }
    }

    #[test]
    fn keys_map_to_the_shard_holding_them() {
        let r = ranges();
        assert_eq!(r.shard_for_key(0), Some(0));
        assert_eq!(r.shard_for_key(99), Some(0));
        assert_eq!(r.shard_for_key(100), Some(1), "low bound is inclusive");
        assert_eq!(r.shard_for_key(199), Some(1));
        assert_eq!(r.shard_for_key(200), None, "high bound is exclusive; the gap holds no shard");
        assert_eq!(r.shard_for_key(299), None);
        assert_eq!(r.shard_for_key(300), Some(2));
        assert_eq!(r.shard_for_key(399), Some(2));
        assert_eq!(r.shard_for_key(400), None);
        assert_eq!(r.shard_for_key(-1), None);
        assert_eq!(r.shard_for_key(i64::MIN), None);
        assert_eq!(r.shard_for_key(i64::MAX), None);
        assert_eq!(Ranges::new(vec![]).shard_for_key(0), None);
    }

    #[test]
    fn extreme_ranges_do_not_overflow() {
        let r = Ranges::new(vec![(i64::MIN, 0), (0, i64::MAX)]);
        assert_eq!(r.shard_for_key(i64::MIN), Some(0));
        assert_eq!(r.shard_for_key(i64::MAX - 1), Some(1));
        assert_eq!(r.shard_for_key(i64::MAX), None);
        assert_eq!(r.split(kr(i64::MIN, i64::MAX)), [(0, kr(i64::MIN, -1)), (1, kr(0, i64::MAX - 1))]);
    }

    #[test]
    fn a_range_inside_one_shard_is_kept_whole() {
        assert_eq!(ranges().split(kr(10, 20)), [(0, kr(10, 20))]);
        assert_eq!(ranges().split(kr(99, 99)), [(0, kr(99, 99))]);
        assert_eq!(ranges().split(kr(100, 100)), [(1, kr(100, 100))]);
    }

    #[test]
    fn a_range_across_two_shards_is_clipped_to_each() {
        assert_eq!(ranges().split(kr(50, 150)), [(0, kr(50, 99)), (1, kr(100, 150))]);
        assert_eq!(ranges().split(kr(99, 100)), [(0, kr(99, 99)), (1, kr(100, 100))]);
    }

    #[test]
    fn a_range_across_three_shards_and_a_gap_skips_the_gap() {
        assert_eq!(ranges().split(kr(50, 350)), [(0, kr(50, 99)), (1, kr(100, 199)), (2, kr(300, 350))]);
        assert_eq!(ranges().split(kr(-1000, 1000)), [(0, kr(0, 99)), (1, kr(100, 199)), (2, kr(300, 399))]);
        assert_eq!(ranges().split(kr(150, 300)), [(1, kr(150, 199)), (2, kr(300, 300))]);
    }

    #[test]
    fn ranges_touching_no_shard_are_empty() {
        assert_eq!(ranges().split(kr(200, 299)), [], "inside the gap");
        assert_eq!(ranges().split(kr(400, 500)), [], "after the last shard");
        assert_eq!(ranges().split(kr(-10, -1)), [], "before the first shard");
        assert_eq!(ranges().split(kr(20, 10)), [], "inverted");
    }
}
