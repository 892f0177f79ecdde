//! weir's device client: writes records to a weir appliance over QUIC with device
//! protocol v1 (docs/PROTOCOL.md), on quinn and tokio.
//!
//! The client owns the device side of the protocol's promises: it gives every frame a
//! sequence above every one it used before (across restarts, with a state file), it
//! batches records from concurrent sends into frames, and when an answer is lost it
//! resends the very same frame bytes under the same sequence, so the appliance can
//! acknowledge the resend without storing it twice. Retryable refusals wait the
//! server's `retry_after_ms` plus a jittered backoff; non-retryable ones are typed
//! errors. Every queue, retry budget and wait is bounded by the device profile
//! (`firmware-config/device.toml`).
//!
//! The logic is a deterministic state machine (`pipeline`, `batch`, `retry`) that takes
//! bytes and time and returns what to do; `client` is the thin tokio shell around it.
//!
//! ```no_run
//! # async fn example() -> Result<(), weir_device::DeviceError> {
//! use weir_device::{DeviceClient, DeviceProfile};
//! let profile = DeviceProfile::load(std::path::Path::new("firmware-config/device.toml"))?;
//! let client = DeviceClient::connect(&profile).await?;
//! let record = weir_protocol::batch::Record {
//!     timestamp_ms: 1_700_000_000_000,
//!     key: Some(bytes::Bytes::from_static(b"sensor-1")),
//!     value: Some(bytes::Bytes::from_static(b"21.5")),
//!     headers: vec![],
//! };
//! let ack = client.send("telemetry", vec![record]).await?;
//! println!("stored at partition {} offset {}", ack.records[0].partition, ack.records[0].offset);
//! client.close().await
//! # }
//! ```
#![deny(unsafe_code)]

pub mod batch;
pub mod client;
pub mod error;
pub mod pipeline;
pub mod profile;
pub mod retry;
pub mod sequence_state;
pub mod tls;

pub use client::{client_endpoint, DeviceClient, PendingAck};
pub use error::{DeviceError, LinkError};
pub use profile::{DeviceProfile, ProfileError, ProfileProblem};
pub use weir_protocol::batch::{Header, Record};
pub use weir_protocol::ErrorCode;

/// A device's frame sequence number (docs/PROTOCOL.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sequence(pub u64);

impl std::fmt::Display for Sequence {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(formatter)
    }
}

/// Identifies one `send` inside the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WaiterId(pub u64);

/// Where one record of a send was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordAck {
    /// The sequence of the frame that carried the record.
    pub sequence: Sequence,
    /// The record's index inside that frame.
    pub record_index: u32,
    pub partition: u32,
    pub offset: i64,
}

/// The answer to a successful send: one entry per record, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub records: Vec<RecordAck>,
}
