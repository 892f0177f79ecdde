//! What the admin thread reads of a core's state for `/status`, beyond single
//! counters: a shipper's state (with its error text) and the last ranges the
//! `drop-oldest` policy deleted, each behind a small mutex taken only on a state
//! transition or a drop, never per record, so a reader always sees a whole value (a
//! state with its own text, a list of whole ranges in order) and never a half-written
//! one; and a partition's pair of log offsets, two separate relaxed atomics (metric
//! gauges) that the reader makes consistent itself. `tests/loom.rs` model-checks all
//! three (it includes this file with loom's `Arc` and `Mutex` in place of std's,
//! through `crate::sync`).

use std::collections::VecDeque;

use serde::Serialize;

use crate::sync::{Arc, Mutex, PoisonError};

/// Dropped ranges remembered per partition (older ones are only counted).
pub const DROPPED_RANGES_KEPT: usize = 64;

/// A run of offsets the `drop-oldest` policy deleted before they were shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DroppedRange {
    pub first_offset: i64,
    pub last_offset: i64,
    pub bytes: u64,
}

/// The dropped ranges of one partition, newest last, at most `DROPPED_RANGES_KEPT`.
#[derive(Debug, Clone, Default)]
pub struct DroppedRanges(Arc<Mutex<VecDeque<DroppedRange>>>);

impl DroppedRanges {
    /// Remembers a range `drop-oldest` deleted: always after every range before it
    /// (segments are dropped oldest first), the oldest kept one forgotten when full.
    pub fn push(&self, range: DroppedRange) {
        assert!(range.first_offset <= range.last_offset, "dropped range {range:?} is empty");
        let mut ranges = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(newest) = ranges.back() {
            assert!(newest.last_offset < range.first_offset, "dropped range {range:?} is not after {newest:?}");
        }
        if ranges.len() == DROPPED_RANGES_KEPT {
            ranges.pop_front();
        }
        ranges.push_back(range);
    }

    pub fn list(&self) -> Vec<DroppedRange> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect()
    }
}

/// Where a partition's shipper is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ShipperState {
    /// Reading its state, asking for a producer or reconciling.
    #[default]
    Starting,
    /// Shipping (or caught up and waiting for data).
    Running,
    /// The upstream is unreachable or refusing for now; shipping retries by itself.
    Retrying { problem: String },
    /// Stopped on an error only an operator can resolve; the partition keeps
    /// accepting appends.
    Stopped { error: String },
    /// weir is not running: what `ship.state` holds (offline status).
    NotRunning,
}

impl ShipperState {
    /// The state's name as `/status` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            ShipperState::Starting => "starting",
            ShipperState::Running => "running",
            ShipperState::Retrying { .. } => "retrying",
            ShipperState::Stopped { .. } => "stopped",
            ShipperState::NotRunning => "not-running",
        }
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self, ShipperState::Stopped { .. })
    }
}

/// A shipper's state, shared with the admin thread. Written on transitions only.
#[derive(Debug, Clone, Default)]
pub struct ShipperStateCell(Arc<Mutex<ShipperState>>);

impl ShipperStateCell {
    pub fn set(&self, state: ShipperState) {
        let mut current = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if *current != state {
            *current = state;
        }
    }

    pub fn get(&self) -> ShipperState {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A partition's log start and end offsets as the admin thread reads them while the
/// owning core moves them (`start` and `end` read the two gauges). The core only ever
/// moves the start up to an end it already published, but the gauges are relaxed
/// atomics (prometheus-client's), so on a weakly ordered CPU the end read after the
/// start can still be an older one: the end is then taken as at least the start, as
/// it was when the start was written. Never a log that ends before it starts.
pub fn log_offsets_view(start: impl FnOnce() -> i64, end: impl FnOnce() -> i64) -> (i64, i64) {
    let start = start();
    let end = end();
    (start, end.max(start))
}

/// Seconds since the Unix epoch of `at`, as Prometheus timestamps and `/status` give
/// them (0 for a clock set before it).
pub fn unix_seconds(at: std::time::SystemTime) -> f64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
}
