//! weir's deterministic core: code that takes bytes, completions and time and returns
//! what to do. Nothing under `core` performs I/O or reads a clock.

pub mod dedup;
pub mod ingest;
pub mod log;
pub mod protocol;
pub mod quota;
pub mod rate;
pub mod sasl;
pub mod session;
pub mod ship;
#[cfg(test)]
pub(crate) mod sim;
pub mod throttle;
