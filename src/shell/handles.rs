//! The metric handles a core updates on its own partitions (atomics, cheap to clone),
//! apart from the registry (`shell::metrics`) so that `/status` (`shell::status`),
//! which reads them, does not depend on the registry that holds it.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::shell::latency::LatencyHistogram;
use crate::shell::status_cells::{DroppedRanges, ShipperState, ShipperStateCell};

/// The states `weir_ship_state` has a series for, as `/status` names them.
pub(crate) const SHIP_STATES: [&str; 4] = ["starting", "running", "retrying", "stopped"];
/// One partition's shipper metric handles.
#[derive(Clone, Default)]
pub struct ShipMetrics {
    pub shipped_records: Counter,
    pub shipped_bytes: Counter,
    pub lag_records: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub cursor_offset: Gauge,
    pub requests: Counter,
    pub resends: Counter,
    pub retriable_errors: Counter,
    pub transport_failures: Counter,
    pub timeouts: Counter,
    pub duplicates: Counter,
    pub reconciled_batches: Counter,
    pub stopped: Gauge,
    /// Records skipped because the log dropped them (drop-oldest) before shipping.
    pub skipped_records: Counter,
    /// Running, retrying or stopped (with the error), for `/status`.
    pub state: ShipperStateCell,
    pub refused: Gauge,
    /// `weir_ship_state`: 1 on the series of the current state (`SHIP_STATES` order).
    pub(crate) state_gauges: [Gauge; 4],
    /// When the upstream last acknowledged a batch, granted a producer or answered a
    /// reconciliation (seconds since the epoch; 0: not since start).
    pub last_success: Gauge<f64, AtomicU64>,
    /// When the current failing stretch began (seconds since the epoch; 0: not failing).
    pub failing_since: Gauge<f64, AtomicU64>,
}

impl ShipMetrics {
    /// Publishes the shipper's state to `/status` and `weir_ship_state`.
    pub fn set_state(&self, state: ShipperState) {
        let name = state.name();
        for (gauge, series) in self.state_gauges.iter().zip(SHIP_STATES) {
            gauge.set(i64::from(series == name));
        }
        self.state.set(state);
    }
}

/// One partition's metric handles.
#[derive(Clone, Default)]
pub struct PartitionMetrics {
    pub appended_records: Counter,
    pub appended_bytes: Counter,
    pub flushes: Counter,
    pub write_errors: Counter,
    pub fsync_errors: Counter,
    pub poisoned: Gauge,
    pub recovery_truncated_bytes: Counter,
    pub segments_rolled: Counter,
    pub disk_full_rejections: Counter,
    pub segments_deleted: Counter,
    pub next_offset: Gauge,
    pub disk_bytes: Gauge,
    /// The process-wide count of poisoned partitions (for /health).
    pub partitions_poisoned: Gauge,
    pub start_offset: Gauge,
    pub dropped_segments: Counter,
    pub dropped_records: Counter,
    pub dropped_ranges: DroppedRanges,
    /// Process-wide: one group commit (write and fdatasync).
    pub flush_latency: LatencyHistogram,
    /// Process-wide: the fdatasync alone.
    pub sync_latency: LatencyHistogram,
}
