//! weir: an edge ingestion appliance. Devices write telemetry over QUIC; a
//! thread-per-core engine appends every record to a durable, Kafka-format partition log
//! on NVMe with direct I/O; the log ships upstream to Kafka exactly once.
//!
//! `core` is pure and deterministic; `shell` does the I/O; `config` is validated
//! before any core starts.
#![deny(unsafe_code)]

pub mod alerts;
pub mod certs;
pub mod cli;
pub mod config;
/// The pure core (its own crate, so the compiler keeps it free of I/O).
pub use weir_core as core;
pub mod doctor;
#[doc(hidden)]
pub mod fuzzing;
pub mod inspect;
pub mod reload;
pub mod shell;
pub mod status;
pub mod sync;
pub mod tail;
