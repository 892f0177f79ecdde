//! The atomics weir shares between cores, in one place so that a loom model can
//! swap them: `tests/loom.rs` includes the modules that use `crate::sync` with a
//! `sync` module of its own that re-exports loom's types, and checks every
//! interleaving of their operations. The appliance itself uses std's.

pub use std::sync::atomic;

/// Runs a test body: once here, under every interleaving loom finds in `tests/loom.rs`.
#[cfg(test)]
pub fn model<F: Fn() + Sync + Send + 'static>(body: F) {
    body()
}
