//! A value replaced whole by one writer and read by many threads, with a generation
//! number so that a reader can tell, with one atomic load, whether it still holds the
//! latest: the shape of the listener's reloadable settings (`shell::live`).
//!
//! The invariant: the generation in the atomic is that of the value behind the mutex
//! or an older one, never a newer one, and it only grows. The value is replaced first
//! and the generation stored (Release) after, so a reader that sees a new generation
//! (Acquire) finds that value, or a later one, behind the mutex, and never goes back.
//! Readers take the mutex only when the generation moved: never on their fast path.
//! `tests/loom.rs` model-checks this file (through `crate::sync`).

use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Arc, Mutex, PoisonError};

/// The current value and its generation (0 for the first, +1 per publish).
pub struct SnapshotCell<T> {
    generation: AtomicU64,
    current: Mutex<(u64, Arc<T>)>,
}

impl<T> SnapshotCell<T> {
    pub fn new(first: T) -> SnapshotCell<T> {
        SnapshotCell { generation: AtomicU64::new(0), current: Mutex::new((0, Arc::new(first))) }
    }

    /// Replaces the value; returns its generation.
    pub fn publish(&self, next: T) -> u64 {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = current.0 + 1;
        *current = (generation, Arc::new(next));
        self.generation.store(generation, Ordering::Release);
        generation
    }

    /// The current value and its generation.
    pub fn load(&self) -> (u64, Arc<T>) {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        (current.0, current.1.clone())
    }

    /// The current value and its generation when newer than `generation`: one atomic
    /// load when nothing changed.
    pub fn newer_than(&self, generation: u64) -> Option<(u64, Arc<T>)> {
        if self.generation.load(Ordering::Acquire) == generation {
            return None;
        }
        let (current, value) = self.load();
        assert!(current > generation, "a generation only grows: {current} after {generation}");
        Some((current, value))
    }
}
