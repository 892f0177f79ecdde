//! The two non-atomic things a core shares with the admin thread for `/status`: a
//! shipper's state (with its error text) and the last ranges the `drop-oldest` policy
//! deleted. Each sits behind a small mutex that is taken only on a state transition or
//! a drop, never per record, so a reader always sees a whole value (a state with its
//! own text, a list of whole ranges in order) and never a half-written one.
//! `tests/loom.rs` model-checks both (it includes this file with loom's `Arc` and
//! `Mutex` in place of std's, through `crate::sync`).

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
