//! What weir shares between threads, in one place so that a loom model can swap it:
//! `tests/loom.rs` includes the modules that use `crate::sync` with a `sync` module of
//! its own that re-exports loom's types, and checks every interleaving of their
//! operations. The appliance itself uses std's.
//!
//! A module that shares state between cores (or with the admin thread) takes its
//! atomics, `Arc` and `Mutex` from here, never from `std::sync` directly, and keeps
//! what it shares small enough to be included in `tests/loom.rs` on its own.

pub use std::sync::atomic;
pub use std::sync::{Arc, Mutex, PoisonError};

/// Runs a test body: once here, under every interleaving loom finds in `tests/loom.rs`.
#[cfg(test)]
pub fn model<F: Fn() + Sync + Send + 'static>(body: F) {
    body()
}
