//! Latency histograms for `/metrics`, recorded into hdrhistogram and exported as
//! Prometheus histograms (`_bucket`, `_sum`, `_count`) with fixed bounds.
//!
//! Each executor records into its own shard (picked by the executor's id), so two cores
//! never contend on the data path; the admin thread merges the shards when scraped. A
//! shard's histogram is allocated on its first record (about 30 KiB: microseconds up to
//! `HIGHEST_MICROS`, three significant digits) and kept for the process's life.
//! Recording is one uncontended lock and an array increment.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards: executor ids are small integers; two executors sharing a shard only share
/// its lock.
const SHARDS: usize = 16;
/// The largest latency kept exactly; longer ones are counted at this value.
const HIGHEST_MICROS: u64 = 600_000_000;
/// The exported bucket bounds, in seconds (plus `+Inf`).
pub const BUCKET_BOUNDS_SECONDS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Default)]
struct Shard {
    histogram: Option<Histogram<u64>>,
    /// Exact sum of the recorded microseconds (the histogram's is approximate).
    sum_micros: u64,
}

/// One latency histogram (cheap to clone: the shards are shared).
#[derive(Clone)]
pub struct LatencyHistogram {
    shards: Arc<[Mutex<Shard>; SHARDS]>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { shards: Arc::new(std::array::from_fn(|_| Mutex::new(Shard::default()))) }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LatencyHistogram").field("count", &self.merged().0.len()).finish()
    }
}

impl LatencyHistogram {
    /// Records one latency, in the calling executor's shard.
    pub fn record(&self, latency: Duration) {
        let shard = glommio::executor().id() % SHARDS;
        self.record_in(shard, latency);
    }

    fn record_in(&self, shard: usize, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, HIGHEST_MICROS);
        let mut shard = self.shards[shard].lock().unwrap_or_else(PoisonError::into_inner);
        let histogram = shard
            .histogram
            .get_or_insert_with(|| Histogram::new_with_bounds(1, HIGHEST_MICROS, 3).expect("valid bounds"));
        histogram.saturating_record(micros);
        shard.sum_micros = shard.sum_micros.saturating_add(micros);
    }

    /// Every shard merged, with the exact sum in microseconds.
    fn merged(&self) -> (Histogram<u64>, u64) {
        let mut merged = Histogram::new_with_bounds(1, HIGHEST_MICROS, 3).expect("valid bounds");
        let mut sum_micros = 0u64;
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(histogram) = &shard.histogram {
                merged.add(histogram).expect("same bounds");
                sum_micros = sum_micros.saturating_add(shard.sum_micros);
            }
        }
        (merged, sum_micros)
    }

    /// (sum in seconds, count, per-bucket counts with `f64::MAX` for `+Inf`), as
    /// prometheus-client's encoder takes them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let (histogram, sum_micros) = self.merged();
        let mut buckets = Vec::with_capacity(BUCKET_BOUNDS_SECONDS.len() + 1);
        let mut below = 0u64;
        for bound in BUCKET_BOUNDS_SECONDS {
            let micros = (bound * 1e6) as u64;
            // count_between is inclusive and works on hdrhistogram's value buckets:
            // values equivalent to the bound count in its bucket.
            let cumulative = histogram.count_between(0, micros);
            buckets.push((bound, cumulative - below));
            below = cumulative;
        }
        buckets.push((f64::MAX, histogram.len() - below));
        (sum_micros as f64 / 1e6, histogram.len(), buckets)
    }

    /// Every shard merged, in microseconds (benches split a flush into its steps).
    pub fn histogram_micros(&self) -> Histogram<u64> {
        self.merged().0
    }

    /// The latency at `quantile` (0..=1), for `weir status` and tests.
    pub fn quantile(&self, quantile: f64) -> Duration {
        Duration::from_micros(self.merged().0.value_at_quantile(quantile))
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<()>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_into_prometheus_buckets_with_the_exact_sum() {
        let histogram = LatencyHistogram::default();
        histogram.record_in(0, Duration::from_micros(80)); // <= 100 us
        histogram.record_in(3, Duration::from_micros(700)); // <= 1 ms
        histogram.record_in(3, Duration::from_millis(3)); // <= 5 ms
        histogram.record_in(15, Duration::from_secs(30)); // +Inf
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 4);
        assert!((sum - (0.000080 + 0.000700 + 0.003 + 30.0)).abs() < 1e-9, "{sum}");
        let count_at = |bound: f64| buckets.iter().find(|(upper, _)| *upper == bound).unwrap().1;
        assert_eq!(count_at(0.0001), 1);
        assert_eq!(count_at(0.001), 1);
        assert_eq!(count_at(0.005), 1);
        assert_eq!(count_at(f64::MAX), 1);
        assert_eq!(buckets.iter().map(|(_, count)| count).sum::<u64>(), 4);
        assert_eq!(buckets.len(), BUCKET_BOUNDS_SECONDS.len() + 1);
        let p50 = histogram.quantile(0.5);
        assert!(p50 >= Duration::from_micros(699) && p50 <= Duration::from_micros(701), "{p50:?}");
    }

    #[test]
    fn it_encodes_as_a_prometheus_histogram() {
        let mut registry = prometheus_client::registry::Registry::with_prefix("weir");
        let histogram = LatencyHistogram::default();
        registry.register("log_sync_seconds", "fdatasync latency", histogram.clone());
        histogram.record_in(1, Duration::from_micros(300));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE weir_log_sync_seconds histogram"), "{text}");
        assert!(text.contains("weir_log_sync_seconds_count 1"), "{text}");
        assert!(text.contains("weir_log_sync_seconds_bucket{le=\"0.00025\"} 0"), "{text}");
        assert!(text.contains("weir_log_sync_seconds_bucket{le=\"0.0005\"} 1"), "{text}");
        assert!(text.contains("weir_log_sync_seconds_bucket{le=\"+Inf\"} 1"), "{text}");
    }
}
