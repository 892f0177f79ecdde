//! Partitions `weir serve --quarantine TOPIC-P` leaves closed: a partition whose log has
//! corruption before its tail stops `serve` (exit 3), and an operator who wants the
//! healthy partitions served meanwhile names the broken one here. A quarantined
//! partition is never opened, so not a byte of it changes while it waits for repair;
//! devices writing to it are answered StorageFailed (resend later), it ships nothing,
//! and `/health` reports the process degraded for as long as any partition is
//! quarantined.
//!
//! The set is fixed for the process's life, written once before any core starts and
//! only read afterwards, so a `OnceLock` holds it.

use std::collections::BTreeSet;
use std::sync::OnceLock;

static QUARANTINED: OnceLock<BTreeSet<String>> = OnceLock::new();

/// The partition's name as `--quarantine` takes it.
pub fn name_of(topic: &str, partition: u32) -> String {
    format!("{topic}-{partition}")
}

/// Fixes the quarantined set; the first call wins (one `serve` per process).
pub fn set(names: BTreeSet<String>) {
    let _ = QUARANTINED.set(names);
}

pub fn contains(topic: &str, partition: u32) -> bool {
    QUARANTINED.get().is_some_and(|names| names.contains(&name_of(topic, partition)))
}

/// Every quarantined partition, sorted.
pub fn names() -> Vec<String> {
    QUARANTINED.get().map(|names| names.iter().cloned().collect()).unwrap_or_default()
}
