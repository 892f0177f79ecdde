//! Typed errors of the device client. `LinkError` is why one try of a frame did not get
//! an answer (it is retried, with the same frame bytes, up to `retry.attempts_max`);
//! `DeviceError` is what a caller sees. Both are `Clone`: one failure (a lost
//! connection, an exhausted retry budget) is delivered to every send it touched.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use weir_protocol::ErrorCode;
use weir_protocol::{CLOSE_DEVICE_DENIED, CLOSE_NO_IDENTITY};

use crate::profile::ProfileError;
use crate::Sequence;

/// Why one try of a frame got no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("cannot connect to {address}: {source}")]
    Connect { address: SocketAddr, source: quinn::ConnectError },
    #[error("connecting to {address} took over {timeout_ms} ms")]
    ConnectTimeout { address: SocketAddr, timeout_ms: u64 },
    #[error("connection to {address} lost: {source}")]
    Connection { address: SocketAddr, source: quinn::ConnectionError },
    #[error("writing to {address}: {source}")]
    Write { address: SocketAddr, source: quinn::WriteError },
    #[error("reading an answer from {address}: {source}")]
    Read { address: SocketAddr, source: quinn::ReadExactError },
    #[error("{address} ended the stream")]
    StreamEnded { address: SocketAddr },
    #[error("no answer from {address} within {timeout_ms} ms")]
    AnswerTimeout { address: SocketAddr, timeout_ms: u64 },
    #[error("{address} broke protocol v1: {why}")]
    Protocol { address: SocketAddr, why: String },
    #[error("the server answered {code:?} (retry after {retry_after_ms} ms): {message}")]
    Retryable { code: ErrorCode, message: String, retry_after_ms: u32 },
}

impl LinkError {
    /// Whether the server turned the connection away for load (QUIC CONNECTION_REFUSED:
    /// weir at `handshakes_max` or `connections_max`, or restarting): it is there and
    /// asks the device to come back later, after its backoff.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            LinkError::Connection { source: quinn::ConnectionError::ConnectionClosed(close), .. }
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        )
    }

    /// Whether this failure means the server refused this device's credentials (a TLS
    /// alert: unknown CA, expired or revoked certificate), which no retry can fix.
    pub fn is_credentials_refused(&self) -> bool {
        let code = match self {
            LinkError::Connection { source: quinn::ConnectionError::TransportError(error), .. } => error.code,
            LinkError::Connection { source: quinn::ConnectionError::ConnectionClosed(close), .. } => close.error_code,
            // weir took the handshake, then refused the identity the certificate names
            // (docs/PROTOCOL.md, "Connection close codes"); the reason is in the close.
            LinkError::Connection { source: quinn::ConnectionError::ApplicationClosed(close), .. } => {
                let code = u64::from(close.error_code);
                return code == u64::from(CLOSE_NO_IDENTITY) || code == u64::from(CLOSE_DEVICE_DENIED);
            }
            _ => return false,
        };
        // QUIC carries TLS alerts as transport error codes 0x100..=0x1ff (RFC 9001 4.8).
        (0x100..=0x1ff).contains(&u64::from(code))
    }
}

/// What a caller of the device client sees.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("{path}: {why}")]
    Credentials { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot open a UDP endpoint on {address}: {source}")]
    Endpoint { address: SocketAddr, source: Arc<std::io::Error> },
    #[error("cannot reach the server: {0}")]
    Unreachable(LinkError),
    #[error("the server refused this device's credentials: {0}")]
    CredentialsRefused(LinkError),
    #[error("the server refused frame {sequence}: {code:?}: {message}")]
    Refused { sequence: Sequence, code: ErrorCode, message: String },
    #[error("frame {sequence} got no ack after {attempts} tries; last: {last}")]
    RetriesExhausted { sequence: Sequence, attempts: u32, last: LinkError },
    #[error("topic {topic:?}: {why}")]
    InvalidTopic { topic: String, why: &'static str },
    #[error("record {index}: {why}")]
    InvalidRecord { index: usize, why: String },
    #[error("a send of {records} records exceeds flow.queue_records_max ({max}); split it")]
    TooManyRecords { records: usize, max: usize },
    #[error("sequence state file {path}: {source}")]
    SequenceState { path: PathBuf, source: Arc<std::io::Error> },
    #[error("the device client is closed")]
    Closed,
}
