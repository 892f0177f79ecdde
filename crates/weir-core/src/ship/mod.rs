//! Upstream shipping, pure: per partition, which stored batches go upstream next, as
//! which Kafka batch, with which producer sequence; what to do when the broker answers,
//! fails or falls silent; where the durable cursor stands; how to reconcile with the
//! upstream after a restart. No sockets, no files, no clock: `shell::ship` executes.
//!
//! See docs/UPSTREAM.md for the exactly-once argument this code implements.

pub mod backoff;
pub mod coalesce;
pub mod errors;
pub mod lag;
pub mod reconcile;
pub mod sequence;
pub mod shipper;
pub mod state;

pub use coalesce::ProducerIdentity;
pub use shipper::{
    Action, ProduceAnswer, RequestId, SendRequest, ShipConfig, ShipStats, ShipperCore, StopReason, UpstreamPartition,
    IN_FLIGHT_MAX,
};
pub use state::ShipState;
