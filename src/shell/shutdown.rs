//! The process's shutdown signal: one flag, set once (by SIGINT/SIGTERM, by the main
//! thread when a core fails or panics, or at the end of `runtime::serve`) and never
//! cleared, polled by every core's loops, every listener and shipper, and the admin
//! thread. It is an `Arc<AtomicBool>` because `signal_hook` sets it from a signal
//! handler, where nothing but an atomic store is allowed.
//!
//! The invariant: once it is set, every thread that polls it sees it on its next poll
//! and stops, including a core still waiting at start for a peer that will never
//! come (it polls the flag too, not only the peer). Setting it is a `Release` store
//! and polling an `Acquire` load, so what a thread wrote before setting it (a failed
//! core's report) is visible to whoever sees it set. `tests/loom.rs` model-checks this
//! file (with loom's atomics in place of std's, through `crate::sync`).

use crate::sync::atomic::{AtomicBool, Ordering};

/// Sets the flag: every thread polling it stops.
pub fn signal(flag: &AtomicBool) {
    flag.store(true, Ordering::Release);
}

/// Whether the flag is set.
pub fn is_signalled(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Acquire)
}
