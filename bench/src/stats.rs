//! Latency histograms and the small statistics the reports need.
//!
//! Owns the histogram's range and precision, so every tool records and reports the same way.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The longest latency a histogram records, in nanoseconds (60 s); longer values are clamped.
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// A histogram of latencies in nanoseconds, 1 ns to [`MAX_LATENCY_NS`], 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
        .expect("the bounds are constants with low < high and 3 significant figures")
}

/// A histogram as `(value, count)` buckets, for sending between processes.
pub fn buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds `(value, count)` buckets (from [`buckets`]) to `h`, saturating the counts.
pub fn record_buckets(h: &mut Histogram<u64>, buckets: &[(u64, u64)]) {
    for &(v, n) in buckets {
        h.saturating_record_n(v, n);
    }
}

/// Round-trip latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// The largest value recorded.
    pub max_us: f64,
    /// The mean.
    pub mean_us: f64,
}

impl LatencySummary {
    /// Summarizes a histogram of nanoseconds. An empty histogram gives all zeros.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_handles_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn buckets_round_trip_into_a_histogram() {
        let mut h = latency_histogram();
        for ns in [1_000, 1_000, 250_000, 7_000_000] {
            h.record(ns).unwrap();
        }
        let mut back = latency_histogram();
        record_buckets(&mut back, &buckets(&h));
        record_buckets(&mut back, &buckets(&h));
        assert_eq!(back.len(), 2 * h.len());
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
    }

    #[test]
    fn summary_reports_microseconds() {
        let mut h = latency_histogram();
        for ns in [10_000, 20_000, 30_000] {
            h.record(ns).unwrap();
        }
        let s = LatencySummary::from_histogram(&h);
        assert!((s.p50_us - 20.0).abs() < 0.1, "{s:?}");
        assert!((s.max_us - 30.0).abs() < 0.1, "{s:?}");
        assert_eq!(
            LatencySummary::from_histogram(&latency_histogram()),
            LatencySummary::default()
        );
    }
}
