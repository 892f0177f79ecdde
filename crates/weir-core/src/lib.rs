//! weir's deterministic core: code that takes bytes, completions and time and returns
//! what to do. Nothing here performs I/O or reads a clock, and the crate's
//! dependencies keep it so: no runtime, socket or file crate (tests/layers.rs checks
//! `cargo tree` and the sources). The appliance (`weir`) re-exports it as `weir::core`.
#![forbid(unsafe_code)]

/// The device protocol crate, re-exported so `core::protocol` names the frames.
pub use weir_protocol as protocol;

pub mod consumer_group;
pub mod dedup;
pub mod handshake;
pub mod ingest;
pub mod kafka_acl;
pub mod kafka_api;
pub mod log;
pub mod quota;
pub mod rate;
pub mod sasl;
pub mod sasl_server;
pub mod session;
pub mod ship;
#[cfg(test)]
pub(crate) mod sim;
pub mod throttle;
pub mod watch;
