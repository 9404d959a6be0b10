//! Event counts per fixed interval over a run: the "throughput over time" series of the echo
//! and storm reports.
//!
//! Owns only the bucketing. It never reads the clock: callers pass the instant of each event,
//! so a loop that already took `Instant::now()` pays nothing more.

use std::time::{Duration, Instant};

/// The interval the reports use: 100 ms.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Counts of events per interval, starting at `start`.
///
/// Bounded: it holds at most `span / interval + 2` buckets; later events are not counted
/// (the reports cover a window of known length, and its end may be read a little late).
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    interval_ns: u128,
    counts: Vec<u64>,
    max_buckets: usize,
}

impl Timeline {
    /// An empty series from `start`, in buckets of `interval`, for a run about `span` long.
    ///
    /// # Panics
    /// `interval` is zero.
    pub fn new(start: Instant, interval: Duration, span: Duration) -> Self {
        assert!(!interval.is_zero(), "a timeline interval must be positive");
        let interval_ns = interval.as_nanos();
        let buckets = span.as_nanos().div_ceil(interval_ns);
        let max_buckets = usize::try_from(buckets)
            .unwrap_or(usize::MAX)
            .saturating_add(2);
        Self {
            start,
            interval_ns,
            counts: Vec::with_capacity(max_buckets.min(1 << 16)),
            max_buckets,
        }
    }

    /// Counts `n` events at `at`. Events before the start or past the last bucket are dropped.
    pub fn add(&mut self, at: Instant, n: u64) {
        let Some(since) = at.checked_duration_since(self.start) else {
            return;
        };
        let Ok(index) = usize::try_from(since.as_nanos() / self.interval_ns) else {
            return;
        };
        if index >= self.max_buckets {
            return;
        }
        if index >= self.counts.len() {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += n;
    }

    /// The counts so far, one per interval from the start; intervals after the last event are
    /// absent, not zero.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The counts, padded with zeros to cover `len` (trailing quiet intervals count too).
    pub fn into_counts(mut self, len: Duration) -> Vec<u64> {
        let want = usize::try_from(len.as_nanos().div_ceil(self.interval_ns))
            .unwrap_or(usize::MAX)
            .min(self.max_buckets);
        if self.counts.len() < want {
            self.counts.resize(want, 0);
        }
        self.counts
    }
}

/// Adds `part` into `total` bucket by bucket, growing `total` as needed.
pub fn merge_counts(total: &mut Vec<u64>, part: &[u64]) {
    if total.len() < part.len() {
        total.resize(part.len(), 0);
    }
    for (t, p) in total.iter_mut().zip(part) {
        *t += p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_land_in_their_interval() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0, INTERVAL, Duration::from_secs(1));
        t.add(t0, 1);
        t.add(t0 + Duration::from_millis(99), 1);
        t.add(t0 + Duration::from_millis(100), 2);
        t.add(t0 + Duration::from_millis(350), 5);
        assert_eq!(t.counts(), &[2, 2, 0, 5]);
    }

    #[test]
    fn events_outside_the_span_are_dropped() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut t = Timeline::new(t0, INTERVAL, Duration::from_millis(200));
        t.add(t0 - Duration::from_millis(1), 1);
        // Two buckets of slack past the span, then nothing.
        t.add(t0 + Duration::from_millis(399), 1);
        t.add(t0 + Duration::from_millis(400), 1);
        assert_eq!(t.counts(), &[0, 0, 0, 1]);
    }

    #[test]
    fn quiet_intervals_at_the_end_are_padded() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0, INTERVAL, Duration::from_secs(1));
        t.add(t0, 3);
        assert_eq!(t.into_counts(Duration::from_millis(250)), vec![3, 0, 0]);
    }

    #[test]
    fn merging_adds_bucket_by_bucket() {
        let mut total = vec![1, 2];
        merge_counts(&mut total, &[10, 10, 10]);
        assert_eq!(total, vec![11, 12, 10]);
    }
}
