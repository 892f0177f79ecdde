//! Why a conversation with an upstream broker failed: the errors of the thin Kafka
//! client (`shell::kafka`) and of its security layer (`shell::kafka_secure`), in one
//! module both use, so neither imports the other's errors.

use std::time::Duration;

/// A connection that is not usable whatever is retried: the operator must act.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("{address}: TLS: {reason}")]
    Tls { address: String, reason: String },
    #[error("{address}: SASL {mechanism} as user {username:?}: {reason}")]
    Sasl { address: String, mechanism: &'static str, username: String, reason: String },
    #[error("upstream security setup: {reason}")]
    Setup { reason: String },
}

/// Why a broker conversation failed. Transport problems are retried by the caller;
/// the rest say what the broker or the cluster lacks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    #[error("connect to {address}: {source}")]
    Connect { address: String, source: std::io::Error },
    #[error("{address}: {operation}: {source}")]
    Io { address: String, operation: &'static str, source: std::io::Error },
    #[error("{address}: {operation} took longer than {timeout:?}")]
    Timeout { address: String, operation: &'static str, timeout: Duration },
    #[error("{address}: the connection was closed by the broker")]
    Closed { address: String },
    #[error("{address}: {api} v{version}: {reason}")]
    Codec { address: String, api: &'static str, version: i16, reason: String },
    #[error("{address}: a response frame of {bytes} bytes is out of range")]
    FrameSize { address: String, bytes: i64 },
    #[error("{address}: answer for correlation id {got}, expected {expected}")]
    Correlation { address: String, got: i32, expected: i32 },
    #[error(
        "{address}: the broker speaks {api} v{broker_min}..=v{broker_max}, weir needs one of v{ours_min}..=v{ours_max}"
    )]
    Unsupported { address: String, api: &'static str, broker_min: i16, broker_max: i16, ours_min: i16, ours_max: i16 },
    #[error("{address}: {api} answered {name} ({code})")]
    Broker { address: String, api: &'static str, code: i16, name: &'static str },
    #[error("{address}: metadata for topic {topic} partition {partition}: {why}")]
    Metadata { address: String, topic: String, partition: i32, why: &'static str },
    #[error(
        "{address}: topic {topic} has {found} partitions; partitioning = \"by-key\" needs exactly {expected} \
         (as many as the edge topic), or records would not sit where Kafka's partitioner puts their keys"
    )]
    PartitionCount { address: String, topic: String, expected: u32, found: usize },
    #[error("no bootstrap server could be used; the last said: {last}")]
    NoBootstrap { last: Box<KafkaError> },
    #[error("{address}: the answer lacks topic {topic} partition {partition}")]
    MissingPartition { address: String, topic: String, partition: i32 },
    /// TLS or SASL refused: not retried (see `kafka_secure`).
    #[error("refused: {0}")]
    Refused(Refusal),
}

impl KafkaError {
    /// The TLS or SASL refusal this error is or ends with (after trying every
    /// bootstrap server), if any.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            KafkaError::Refused(refusal) => Some(refusal),
            KafkaError::NoBootstrap { last } => last.refusal(),
            _ => None,
        }
    }
}
