//! The shipper's durable state for one partition: the file `ship.state` in the
//! partition directory. One small file, replaced atomically (write a new file, fsync,
//! rename over the old one, fsync the directory), so the producer identity and the
//! cursor it counts from can never be seen half-written or out of step.
//!
//! Layout (version 2, big-endian, fixed width; see docs/UPSTREAM.md):
//!
//! | byte | field |
//! | ---: | --- |
//! | 0 | magic `WEIRSHIP` |
//! | 8 | format version u16 = 2 |
//! | 10 | reserved u16 = 0 |
//! | 12 | producer id i64 |
//! | 20 | producer epoch i16 |
//! | 22 | reserved u16 = 0 |
//! | 24 | epoch start offset i64 (the local offset whose sequence is 0) |
//! | 32 | cursor i64 (every local offset below it is acknowledged upstream) |
//! | 40 | scan-from i64 (upstream offset at or before every batch of ours at or after the cursor) |
//! | 48 | scan-from local offset i64 (the local offset of our first record at or after scan-from; -1: not known) |
//! | 56 | upstream partition i32 |
//! | 60 | upstream topic length u16, then the topic's bytes |
//! | .. | CRC-32C u32 of every byte before it |
//!
//! Version 1 (written before 2026-12) lacks the field at 48 (the partition is at 48, the
//! topic length at 52); it is still read, with the scan-from local offset not known.
//!
//! A file that fails any check is refused with the reason: the shipper stops rather
//! than start over, because starting over would send everything again.

use super::coalesce::ProducerIdentity;

pub const STATE_MAGIC: &[u8; 8] = b"WEIRSHIP";
pub const STATE_FORMAT_VERSION: u16 = 2;
pub const STATE_FILE_NAME: &str = "ship.state";
/// Fixed part before the topic bytes.
const FIXED_BYTES: usize = 62;
/// The same in format version 1.
const FIXED_BYTES_V1: usize = 54;
/// Kafka's topic name limit bounds the file.
pub const STATE_TOPIC_BYTES_MAX: usize = 249;
pub const STATE_BYTES_MAX: usize = FIXED_BYTES + STATE_TOPIC_BYTES_MAX + 4;

/// What is persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipState {
    pub producer: ProducerIdentity,
    pub epoch_start_offset: i64,
    pub cursor_offset: i64,
    pub upstream_scan_from_offset: i64,
    /// The local offset of our first record at or after `upstream_scan_from_offset`
    /// upstream, when known: records of ours upstream from there are this offset and
    /// the ones after it, in order, so reconciliation can count them even where a
    /// broker does not keep batches' sequences (see `reconcile`). `None` after a
    /// version 1 file until an acknowledgement with an upstream offset.
    pub upstream_scan_from_local_offset: Option<i64>,
    pub upstream_topic: String,
    pub upstream_partition: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("{bytes} bytes is not a ship state file (needs {FIXED_BYTES_V1}..={STATE_BYTES_MAX})")]
    BadLength { bytes: usize },
    #[error("bad magic: not a ship state file")]
    BadMagic,
    #[error("unsupported ship state format version {version}")]
    BadVersion { version: u16 },
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("inconsistent fields: {what}")]
    Inconsistent { what: &'static str },
}

impl ShipState {
    /// Checks the relations between the fields that every persisted state keeps.
    pub fn check(&self) -> Result<(), StateError> {
        if self.producer.id < 0 || self.producer.epoch < 0 {
            return Err(StateError::Inconsistent { what: "producer id and epoch must be granted ones (>= 0)" });
        }
        if self.epoch_start_offset < 0 || self.cursor_offset < self.epoch_start_offset {
            return Err(StateError::Inconsistent { what: "the cursor precedes the epoch start" });
        }
        if self.upstream_scan_from_offset < 0 {
            return Err(StateError::Inconsistent { what: "negative upstream scan offset" });
        }
        if let Some(local) = self.upstream_scan_from_local_offset {
            if local < self.epoch_start_offset || local > self.cursor_offset {
                return Err(StateError::Inconsistent {
                    what: "the scan-from local offset lies outside the epoch start..=cursor",
                });
            }
        }
        if self.upstream_partition < 0 {
            return Err(StateError::Inconsistent { what: "negative upstream partition" });
        }
        if self.upstream_topic.is_empty() || self.upstream_topic.len() > STATE_TOPIC_BYTES_MAX {
            return Err(StateError::Inconsistent { what: "upstream topic length out of range" });
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        self.check().expect("only consistent states are persisted");
        let mut out = Vec::with_capacity(STATE_BYTES_MAX);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.producer.id.to_be_bytes());
        out.extend_from_slice(&self.producer.epoch.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.epoch_start_offset.to_be_bytes());
        out.extend_from_slice(&self.cursor_offset.to_be_bytes());
        out.extend_from_slice(&self.upstream_scan_from_offset.to_be_bytes());
        out.extend_from_slice(&self.upstream_scan_from_local_offset.unwrap_or(-1).to_be_bytes());
        out.extend_from_slice(&self.upstream_partition.to_be_bytes());
        out.extend_from_slice(&(self.upstream_topic.len() as u16).to_be_bytes());
        assert_eq!(out.len(), FIXED_BYTES);
        out.extend_from_slice(self.upstream_topic.as_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        assert!(out.len() <= STATE_BYTES_MAX);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ShipState, StateError> {
        if bytes.len() < FIXED_BYTES_V1 + 4 || bytes.len() > STATE_BYTES_MAX {
            return Err(StateError::BadLength { bytes: bytes.len() });
        }
        if &bytes[0..8] != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let u16_at = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let i64_at = |at: usize| i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let version = u16_at(8);
        // Where the fields after scan-from are: version 1 lacks the scan-from local offset.
        let (fixed, partition_at) = match version {
            1 => (FIXED_BYTES_V1, 48),
            STATE_FORMAT_VERSION => (FIXED_BYTES, 56),
            _ => return Err(StateError::BadVersion { version }),
        };
        if bytes.len() < fixed + 4 {
            return Err(StateError::BadLength { bytes: bytes.len() });
        }
        let topic_bytes = usize::from(u16_at(partition_at + 4));
        if fixed + topic_bytes + 4 != bytes.len() {
            return Err(StateError::BadLength { bytes: bytes.len() });
        }
        let crc_at = fixed + topic_bytes;
        let stored = u32::from_be_bytes(bytes[crc_at..crc_at + 4].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(&bytes[..crc_at]);
        if stored != computed {
            return Err(StateError::BadCrc { stored, computed });
        }
        let upstream_topic = std::str::from_utf8(&bytes[fixed..crc_at])
            .map_err(|_| StateError::Inconsistent { what: "upstream topic is not UTF-8" })?
            .to_owned();
        let upstream_scan_from_local_offset = match version {
            1 => None,
            _ => match i64_at(48) {
                -1 => None,
                local if local >= 0 => Some(local),
                _ => return Err(StateError::Inconsistent { what: "negative scan-from local offset" }),
            },
        };
        let state = ShipState {
            producer: ProducerIdentity { id: i64_at(12), epoch: i16::from_be_bytes([bytes[20], bytes[21]]) },
            epoch_start_offset: i64_at(24),
            cursor_offset: i64_at(32),
            upstream_scan_from_offset: i64_at(40),
            upstream_scan_from_local_offset,
            upstream_partition: i32::from_be_bytes(bytes[partition_at..partition_at + 4].try_into().expect("4 bytes")),
            upstream_topic,
        };
        state.check()?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ShipState {
        ShipState {
            producer: ProducerIdentity { id: 1_234_567_890_123, epoch: 7 },
            epoch_start_offset: 1000,
            cursor_offset: 5000,
            upstream_scan_from_offset: 77_000,
            upstream_scan_from_local_offset: Some(4990),
            upstream_topic: "telemetry-central".to_owned(),
            upstream_partition: 3,
        }
    }

    #[test]
    fn round_trips() {
        let state = sample();
        assert_eq!(ShipState::decode(&state.encode()).unwrap(), state);
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let bytes = sample().encode();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(ShipState::decode(&flipped).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(ShipState::decode(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
    }

    /// A version 1 file as weir wrote it before the scan-from local offset existed.
    fn version_1(state: &ShipState) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&state.producer.id.to_be_bytes());
        out.extend_from_slice(&state.producer.epoch.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&state.epoch_start_offset.to_be_bytes());
        out.extend_from_slice(&state.cursor_offset.to_be_bytes());
        out.extend_from_slice(&state.upstream_scan_from_offset.to_be_bytes());
        out.extend_from_slice(&state.upstream_partition.to_be_bytes());
        out.extend_from_slice(&(state.upstream_topic.len() as u16).to_be_bytes());
        out.extend_from_slice(state.upstream_topic.as_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn a_version_1_file_is_read_with_the_scan_from_local_offset_unknown() {
        let state = ShipState { upstream_scan_from_local_offset: None, ..sample() };
        let bytes = version_1(&state);
        assert_eq!(bytes.len(), FIXED_BYTES_V1 + state.upstream_topic.len() + 4);
        assert_eq!(ShipState::decode(&bytes).unwrap(), state);
        for cut in 0..bytes.len() {
            assert!(ShipState::decode(&bytes[..cut]).is_err(), "version 1 cut at {cut} accepted");
        }
    }

    #[test]
    fn an_unknown_scan_from_local_offset_round_trips() {
        let state = ShipState { upstream_scan_from_local_offset: None, ..sample() };
        assert_eq!(ShipState::decode(&state.encode()).unwrap(), state);
    }

    #[test]
    fn a_scan_from_local_offset_beyond_the_cursor_is_inconsistent() {
        let state = ShipState { upstream_scan_from_local_offset: Some(5001), ..sample() };
        assert!(state.check().is_err());
    }

    #[test]
    fn a_cursor_before_the_epoch_start_is_inconsistent() {
        let state = ShipState { cursor_offset: 10, epoch_start_offset: 11, ..sample() };
        assert!(state.check().is_err());
    }
}
