//! The device protocol, version 1: the frames a device and weir exchange on a QUIC
//! bidirectional stream, and the checks every frame passes before it is used.
//!
//! A frame on the wire is a 4-byte big-endian length followed by that many bytes of an
//! rkyv archive (rkyv 0.8, little-endian, aligned). The schemas use only fixed-width
//! integers, byte vectors and vectors of structs, so the archive layout is simple
//! enough for a C or Python device to write by hand; `docs/PROTOCOL.md` gives it byte
//! by byte. Frames are checked in two steps: rkyv's validation (every relative pointer
//! and length inside the buffer) and then weir's own rules (version, kinds, flag bits,
//! UTF-8, limits). Only a frame that passed both is turned into records.
//!
//! This crate is everything a device-side program needs of weir and nothing more: the
//! frames, the RecordBatch v2 codec (`batch`), device-id rules (`device_id`) and the
//! one seeded PRNG (`random`). It has no runtime, socket or file dependency.
#![forbid(unsafe_code)]

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::batch::{Header, Record, RECORD_HEADERS_MAX};

pub mod batch;
pub mod device_id;
pub mod random;
pub mod varint;

/// QUIC application close codes (docs/PROTOCOL.md). The first two refuse the device's
/// identity, which no retry changes (a device client gives up on them).
pub const CLOSE_NO_IDENTITY: u32 = 0x101;
pub const CLOSE_DEVICE_DENIED: u32 = 0x102;
/// A protocol violation on a stream (docs/PROTOCOL.md section 1).
pub const CLOSE_PROTOCOL: u32 = 0x103;
/// weir is shutting down; reconnect later.
pub const CLOSE_SHUTDOWN: u32 = 0x104;
/// The device already holds `quic.connections_per_device_max` connections.
pub const CLOSE_TOO_MANY_CONNECTIONS: u32 = 0x105;

/// The ALPN every device connection must negotiate.
pub const ALPN: &[u8] = b"weir/1";
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes of the length prefix in front of every frame.
pub const FRAME_LENGTH_PREFIX_BYTES: usize = 4;
/// Alignment the archive's root and every field keep; frames are padded to it.
pub const FRAME_ALIGNMENT_BYTES: usize = 8;

pub const KIND_PRODUCE: u16 = 1;
pub const KIND_ACK: u16 = 2;
pub const KIND_ERROR: u16 = 3;

/// `flags` bit of a record: the key is present (else null).
pub const RECORD_KEY_PRESENT: u8 = 0b01;
/// `flags` bit of a record: the value is present (else null).
pub const RECORD_VALUE_PRESENT: u8 = 0b10;
/// `flags` bit of a header: the value is present (else null).
pub const HEADER_VALUE_PRESENT: u8 = 0b01;

/// Limits a frame is checked against (from the `[quic]` config later; these are the
/// protocol's absolute ceilings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub frame_bytes_max: usize,
    pub records_per_frame_max: usize,
    pub topic_bytes_max: usize,
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub headers_per_record_max: usize,
    pub header_key_bytes_max: usize,
    pub header_value_bytes_max: usize,
    pub message_bytes_max: usize,
}

/// The absolute ceilings of protocol v1; configured limits may only be lower.
pub const FRAME_LIMITS_V1: FrameLimits = FrameLimits {
    frame_bytes_max: 1 << 20,
    records_per_frame_max: 4096,
    topic_bytes_max: 249,
    key_bytes_max: 64 << 10,
    value_bytes_max: 512 << 10,
    headers_per_record_max: RECORD_HEADERS_MAX,
    header_key_bytes_max: 256,
    header_value_bytes_max: 4096,
    message_bytes_max: 1024,
};

const _: () = assert!(FRAME_LIMITS_V1.headers_per_record_max <= RECORD_HEADERS_MAX);
const _: () = assert!(FRAME_LIMITS_V1.frame_bytes_max <= u32::MAX as usize);

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub flags: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FrameRecord {
    pub timestamp_ms: i64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<FrameHeader>,
    pub flags: u8,
}

/// Device -> weir: records for one topic, under the device's next sequence number.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProduceFrame {
    pub version: u16,
    pub kind: u16,
    pub reserved: u32,
    pub sequence: u64,
    pub topic: Vec<u8>,
    pub records: Vec<FrameRecord>,
}

/// One partition's part of an acknowledgement: records `first_record ..
/// first_record + record_count` of the frame are at offsets `base_offset ..`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckPart {
    pub base_offset: i64,
    pub partition: u32,
    pub first_record: u32,
    pub record_count: u32,
    pub reserved: u32,
}

/// weir -> device: the answer to one produce frame (same sequence): an ack (kind 2)
/// with its parts, or an error (kind 3) with a code, a message and, for codes that
/// invite a retry, how long to wait first.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AnswerFrame {
    pub version: u16,
    pub kind: u16,
    pub error_code: u16,
    pub reserved: u16,
    pub sequence: u64,
    pub retry_after_ms: u32,
    pub reserved2: u32,
    pub parts: Vec<AckPart>,
    pub message: Vec<u8>,
}

/// Error codes of protocol v1 (docs/PROTOCOL.md lists what a device should do for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame broke a rule of the protocol; do not resend it as is.
    MalformedFrame = 1,
    /// The frame is larger than a limit; split it.
    FrameTooLarge = 2,
    /// The device may not write to this topic.
    TopicNotAllowed = 3,
    /// No such topic on this appliance.
    UnknownTopic = 4,
    /// Overloaded or a partition is behind: resend the same frame after retry_after_ms.
    Backpressure = 5,
    /// The disk is full: resend the same frame after retry_after_ms.
    DiskFull = 6,
    /// A storage fault on the appliance; resend later, an operator is needed.
    StorageFailed = 7,
    /// The sequence is older than the appliance still remembers; it cannot tell
    /// whether the frame was stored.
    SequenceTooOld = 8,
    /// The device exceeded its quota; resend after retry_after_ms.
    QuotaExceeded = 9,
    /// The appliance is shutting down; reconnect and resend.
    ShuttingDown = 10,
    /// The frame reuses a sequence the appliance stored with other records: a device
    /// bug (a resend must be the very same frame). Nothing was stored; do not resend.
    SequenceReused = 11,
}

impl ErrorCode {
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        Some(match code {
            1 => ErrorCode::MalformedFrame,
            2 => ErrorCode::FrameTooLarge,
            3 => ErrorCode::TopicNotAllowed,
            4 => ErrorCode::UnknownTopic,
            5 => ErrorCode::Backpressure,
            6 => ErrorCode::DiskFull,
            7 => ErrorCode::StorageFailed,
            8 => ErrorCode::SequenceTooOld,
            9 => ErrorCode::QuotaExceeded,
            10 => ErrorCode::ShuttingDown,
            11 => ErrorCode::SequenceReused,
            _ => return None,
        })
    }

    /// The code's name as docs/PROTOCOL.md spells it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "MalformedFrame",
            ErrorCode::FrameTooLarge => "FrameTooLarge",
            ErrorCode::TopicNotAllowed => "TopicNotAllowed",
            ErrorCode::UnknownTopic => "UnknownTopic",
            ErrorCode::Backpressure => "Backpressure",
            ErrorCode::DiskFull => "DiskFull",
            ErrorCode::StorageFailed => "StorageFailed",
            ErrorCode::SequenceTooOld => "SequenceTooOld",
            ErrorCode::QuotaExceeded => "QuotaExceeded",
            ErrorCode::ShuttingDown => "ShuttingDown",
            ErrorCode::SequenceReused => "SequenceReused",
        }
    }

    /// Whether resending the same frame later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Backpressure
                | ErrorCode::DiskFull
                | ErrorCode::StorageFailed
                | ErrorCode::QuotaExceeded
                | ErrorCode::ShuttingDown
        )
    }
}

/// Why bytes are not an acceptable frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {bytes} bytes exceeds the limit of {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("not a valid archive: {0}")]
    Archive(String),
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("unexpected frame kind {0}")]
    Kind(u16),
    #[error("{field}: {why}")]
    Field { field: &'static str, why: String },
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Field { why, .. } if why.starts_with("over the limit") => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

fn field(field: &'static str, why: impl Into<String>) -> FrameError {
    FrameError::Field { field, why: why.into() }
}

fn over(field_name: &'static str, bytes: usize, max: usize) -> FrameError {
    field(field_name, format!("over the limit: {bytes} > {max}"))
}

/// Encodes a frame's archive bytes (without the length prefix).
pub fn encode<T>(frame: &T) -> AlignedVec
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    rkyv::to_bytes::<rancor::Error>(frame).expect("serializing into memory cannot fail")
}

/// Prefixes `archive` with its length, ready for the stream.
pub fn with_length_prefix(archive: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_LENGTH_PREFIX_BYTES + archive.len());
    out.extend_from_slice(&(archive.len() as u32).to_be_bytes());
    out.extend_from_slice(archive);
    out
}

/// Headers weir adds to every record it stores (`weir.device`, `weir.sequence`).
pub const WEIR_HEADERS_PER_RECORD: usize = 2;

/// A produce frame that passed every check, as records ready for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedProduce {
    pub sequence: u64,
    pub topic: String,
    pub records: Vec<Record>,
}

fn aligned_copy(bytes: &[u8]) -> AlignedVec {
    let mut aligned = AlignedVec::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    aligned
}

/// Checks and parses a produce frame's archive bytes.
pub fn check_produce(bytes: &[u8], limits: &FrameLimits) -> Result<CheckedProduce, FrameError> {
    if bytes.len() > limits.frame_bytes_max {
        return Err(FrameError::TooLarge { bytes: bytes.len(), max: limits.frame_bytes_max });
    }
    // The one copy of the frame: aligned for the archive, and owned by a `Bytes` that
    // every record's key and value slice (no copy and no allocation per record).
    let aligned = Bytes::from_owner(aligned_copy(bytes));
    let frame = rkyv::access::<ArchivedProduceFrame, rancor::Error>(&aligned)
        .map_err(|error| FrameError::Archive(error.to_string()))?;
    let version = frame.version.to_native();
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = frame.kind.to_native();
    if kind != KIND_PRODUCE {
        return Err(FrameError::Kind(kind));
    }
    if frame.reserved.to_native() != 0 {
        return Err(field("reserved", "must be 0"));
    }
    if frame.topic.len() > limits.topic_bytes_max {
        return Err(over("topic", frame.topic.len(), limits.topic_bytes_max));
    }
    let topic = std::str::from_utf8(&frame.topic).map_err(|_| field("topic", "not UTF-8"))?;
    if topic.is_empty() {
        return Err(field("topic", "empty"));
    }
    if frame.records.is_empty() {
        return Err(field("records", "a produce frame carries at least one record"));
    }
    if frame.records.len() > limits.records_per_frame_max {
        return Err(over("records", frame.records.len(), limits.records_per_frame_max));
    }
    let mut records = Vec::with_capacity(frame.records.len());
    for record in frame.records.iter() {
        records.push(check_record(record, limits, &aligned)?);
    }
    Ok(CheckedProduce { sequence: frame.sequence.to_native(), topic: topic.to_owned(), records })
}

/// A nullable field: `bytes` is a slice of `frame`, which it shares.
fn optional(frame: &Bytes, bytes: &[u8], present: bool, name: &'static str) -> Result<Option<Bytes>, FrameError> {
    match (present, bytes.is_empty()) {
        (true, _) => Ok(Some(frame.slice_ref(bytes))),
        (false, true) => Ok(None),
        (false, false) => Err(field(name, "bytes given for a null field")),
    }
}

fn check_record(record: &ArchivedFrameRecord, limits: &FrameLimits, frame: &Bytes) -> Result<Record, FrameError> {
    let flags = record.flags;
    if flags & !(RECORD_KEY_PRESENT | RECORD_VALUE_PRESENT) != 0 {
        return Err(field("records.flags", format!("unknown bits {flags:#04x}")));
    }
    if record.key.len() > limits.key_bytes_max {
        return Err(over("records.key", record.key.len(), limits.key_bytes_max));
    }
    if record.value.len() > limits.value_bytes_max {
        return Err(over("records.value", record.value.len(), limits.value_bytes_max));
    }
    if record.headers.len() > limits.headers_per_record_max {
        return Err(over("records.headers", record.headers.len(), limits.headers_per_record_max));
    }
    // Room for the device's headers and the two weir adds (`weir.device`,
    // `weir.sequence`): one allocation per record, not one and a regrowth.
    let mut headers = Vec::with_capacity(record.headers.len() + WEIR_HEADERS_PER_RECORD);
    for header in record.headers.iter() {
        if header.flags & !HEADER_VALUE_PRESENT != 0 {
            return Err(field("records.headers.flags", format!("unknown bits {:#04x}", header.flags)));
        }
        if header.key.len() > limits.header_key_bytes_max {
            return Err(over("records.headers.key", header.key.len(), limits.header_key_bytes_max));
        }
        if header.value.len() > limits.header_value_bytes_max {
            return Err(over("records.headers.value", header.value.len(), limits.header_value_bytes_max));
        }
        let key = std::str::from_utf8(&header.key).map_err(|_| field("records.headers.key", "not UTF-8"))?;
        if key.starts_with("weir.") {
            return Err(field("records.headers.key", "the weir. prefix is reserved for headers weir sets"));
        }
        let value = optional(frame, &header.value, header.flags & HEADER_VALUE_PRESENT != 0, "records.headers.value")?;
        headers.push(Header { key: key.to_owned().into(), value });
    }
    Ok(Record {
        timestamp_ms: record.timestamp_ms.to_native(),
        key: optional(frame, &record.key, flags & RECORD_KEY_PRESENT != 0, "records.key")?,
        value: optional(frame, &record.value, flags & RECORD_VALUE_PRESENT != 0, "records.value")?,
        headers,
    })
}

/// Checks and parses an answer frame (the device side).
pub fn check_answer(bytes: &[u8], limits: &FrameLimits) -> Result<AnswerFrame, FrameError> {
    if bytes.len() > limits.frame_bytes_max {
        return Err(FrameError::TooLarge { bytes: bytes.len(), max: limits.frame_bytes_max });
    }
    let aligned = aligned_copy(bytes);
    let frame = rkyv::access::<ArchivedAnswerFrame, rancor::Error>(&aligned)
        .map_err(|error| FrameError::Archive(error.to_string()))?;
    if frame.version.to_native() != PROTOCOL_VERSION {
        return Err(FrameError::Version(frame.version.to_native()));
    }
    let kind = frame.kind.to_native();
    if kind != KIND_ACK && kind != KIND_ERROR {
        return Err(FrameError::Kind(kind));
    }
    if frame.message.len() > limits.message_bytes_max {
        return Err(over("message", frame.message.len(), limits.message_bytes_max));
    }
    std::str::from_utf8(&frame.message).map_err(|_| field("message", "not UTF-8"))?;
    if kind == KIND_ERROR && ErrorCode::from_u16(frame.error_code.to_native()).is_none() {
        return Err(field("error_code", format!("unknown code {}", frame.error_code.to_native())));
    }
    rkyv::deserialize::<AnswerFrame, rancor::Error>(frame).map_err(|error| FrameError::Archive(error.to_string()))
}

/// Builds the produce frame for `records` (the device side).
pub fn produce_frame(sequence: u64, topic: &str, records: &[Record]) -> ProduceFrame {
    ProduceFrame {
        version: PROTOCOL_VERSION,
        kind: KIND_PRODUCE,
        reserved: 0,
        sequence,
        topic: topic.as_bytes().to_vec(),
        records: records
            .iter()
            .map(|record| FrameRecord {
                timestamp_ms: record.timestamp_ms,
                key: record.key.as_deref().unwrap_or_default().to_vec(),
                value: record.value.as_deref().unwrap_or_default().to_vec(),
                headers: record
                    .headers
                    .iter()
                    .map(|header| FrameHeader {
                        key: header.key.as_bytes().to_vec(),
                        value: header.value.as_deref().unwrap_or_default().to_vec(),
                        flags: if header.value.is_some() { HEADER_VALUE_PRESENT } else { 0 },
                    })
                    .collect(),
                flags: (if record.key.is_some() { RECORD_KEY_PRESENT } else { 0 })
                    | (if record.value.is_some() { RECORD_VALUE_PRESENT } else { 0 }),
            })
            .collect(),
    }
}

/// An ack answer.
pub fn ack_frame(sequence: u64, parts: Vec<AckPart>) -> AnswerFrame {
    AnswerFrame {
        version: PROTOCOL_VERSION,
        kind: KIND_ACK,
        error_code: 0,
        reserved: 0,
        sequence,
        retry_after_ms: 0,
        reserved2: 0,
        parts,
        message: Vec::new(),
    }
}

/// The sequence of a frame that failed its checks, when its root is readable at all
/// (so the device can match the error to its frame); 0 otherwise. Reads the root's
/// `sequence` field where the archive puts it (the last 32 bytes, 8-byte aligned).
pub fn sequence_of_unchecked(frame: &[u8]) -> u64 {
    if frame.len() >= 32 && frame.len().is_multiple_of(8) {
        let root = frame.len() - 32;
        u64::from_le_bytes(frame[root + 8..root + 16].try_into().expect("8 bytes"))
    } else {
        0
    }
}

/// An error answer; the message is cut to the v1 limit at a character boundary.
pub fn error_frame(sequence: u64, code: ErrorCode, message: &str, retry_after_ms: u32) -> AnswerFrame {
    let mut end = message.len().min(FRAME_LIMITS_V1.message_bytes_max);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    AnswerFrame {
        version: PROTOCOL_VERSION,
        kind: KIND_ERROR,
        error_code: code as u16,
        reserved: 0,
        sequence,
        retry_after_ms,
        reserved2: 0,
        parts: Vec::new(),
        message: message.as_bytes()[..end].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_records() -> Vec<Record> {
        vec![
            Record {
                timestamp_ms: 1_700_000_000_000,
                key: Some(Bytes::from_static(b"k1")),
                value: Some(Bytes::from_static(b"21.5")),
                headers: vec![Header { key: "unit".into(), value: Some(Bytes::from_static(b"C")) }],
            },
            Record {
                timestamp_ms: -5,
                key: None,
                value: Some(Bytes::new()),
                headers: vec![Header { key: "n".into(), value: None }],
            },
        ]
    }

    #[test]
    fn produce_round_trips_with_nulls_and_empties_apart() {
        let records = sample_records();
        let bytes = encode(&produce_frame(7, "telemetry", &records));
        let checked = check_produce(&bytes, &FRAME_LIMITS_V1).unwrap();
        assert_eq!(checked, CheckedProduce { sequence: 7, topic: "telemetry".into(), records });
    }

    #[test]
    fn answers_round_trip() {
        let ack = ack_frame(
            9,
            vec![AckPart { base_offset: 100, partition: 3, first_record: 0, record_count: 2, reserved: 0 }],
        );
        assert_eq!(check_answer(&encode(&ack), &FRAME_LIMITS_V1).unwrap(), ack);
        let error = error_frame(9, ErrorCode::Backpressure, "partition 3 is behind", 250);
        assert_eq!(check_answer(&encode(&error), &FRAME_LIMITS_V1).unwrap(), error);
    }

    #[test]
    fn every_truncation_and_most_bit_flips_are_refused_without_panic() {
        let bytes = encode(&produce_frame(7, "telemetry", &sample_records()));
        for cut in 0..bytes.len() {
            assert!(check_produce(&bytes[..cut], &FRAME_LIMITS_V1).is_err() || cut == bytes.len());
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.to_vec();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let _ = check_produce(&flipped, &FRAME_LIMITS_V1); // must not panic
        }
    }

    #[test]
    fn rule_breaks_are_refused_with_the_field_named() {
        let mut frame = produce_frame(1, "telemetry", &sample_records());
        frame.records[1].key = b"x".to_vec(); // bytes for a null key
        let error = check_produce(&encode(&frame), &FRAME_LIMITS_V1).unwrap_err();
        assert_eq!(error, field("records.key", "bytes given for a null field"));
        let mut frame = produce_frame(1, "telemetry", &sample_records());
        frame.records[0].headers[0].key = b"weir.device".to_vec();
        let error = check_produce(&encode(&frame), &FRAME_LIMITS_V1).unwrap_err();
        assert!(matches!(error, FrameError::Field { field: "records.headers.key", .. }));
        let mut frame = produce_frame(1, "telemetry", &sample_records());
        frame.version = 2;
        assert_eq!(check_produce(&encode(&frame), &FRAME_LIMITS_V1).unwrap_err(), FrameError::Version(2));
        let limits = FrameLimits { value_bytes_max: 2, ..FRAME_LIMITS_V1 };
        let error = check_produce(&encode(&produce_frame(1, "t", &sample_records())), &limits).unwrap_err();
        assert_eq!(error.code(), ErrorCode::FrameTooLarge);
    }
}

#[cfg(test)]
mod layout_tests {
    //! docs/PROTOCOL.md states these sizes and offsets; a device writes them by hand.
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn archived_layouts_are_the_documented_ones() {
        assert_eq!((size_of::<ArchivedProduceFrame>(), align_of::<ArchivedProduceFrame>()), (32, 8));
        assert_eq!(
            [
                offset_of!(ArchivedProduceFrame, version),
                offset_of!(ArchivedProduceFrame, kind),
                offset_of!(ArchivedProduceFrame, reserved),
                offset_of!(ArchivedProduceFrame, sequence),
                offset_of!(ArchivedProduceFrame, topic),
                offset_of!(ArchivedProduceFrame, records),
            ],
            [0, 2, 4, 8, 16, 24]
        );
        assert_eq!((size_of::<ArchivedFrameRecord>(), align_of::<ArchivedFrameRecord>()), (40, 8));
        assert_eq!(
            [
                offset_of!(ArchivedFrameRecord, timestamp_ms),
                offset_of!(ArchivedFrameRecord, key),
                offset_of!(ArchivedFrameRecord, value),
                offset_of!(ArchivedFrameRecord, headers),
                offset_of!(ArchivedFrameRecord, flags),
            ],
            [0, 8, 16, 24, 32]
        );
        assert_eq!((size_of::<ArchivedFrameHeader>(), align_of::<ArchivedFrameHeader>()), (20, 4));
        assert_eq!(
            [
                offset_of!(ArchivedFrameHeader, key),
                offset_of!(ArchivedFrameHeader, value),
                offset_of!(ArchivedFrameHeader, flags)
            ],
            [0, 8, 16]
        );
        assert_eq!((size_of::<ArchivedAckPart>(), align_of::<ArchivedAckPart>()), (24, 8));
        assert_eq!(
            [
                offset_of!(ArchivedAckPart, base_offset),
                offset_of!(ArchivedAckPart, partition),
                offset_of!(ArchivedAckPart, first_record),
                offset_of!(ArchivedAckPart, record_count),
                offset_of!(ArchivedAckPart, reserved),
            ],
            [0, 8, 12, 16, 20]
        );
        assert_eq!((size_of::<ArchivedAnswerFrame>(), align_of::<ArchivedAnswerFrame>()), (40, 8));
        assert_eq!(
            [
                offset_of!(ArchivedAnswerFrame, version),
                offset_of!(ArchivedAnswerFrame, kind),
                offset_of!(ArchivedAnswerFrame, error_code),
                offset_of!(ArchivedAnswerFrame, reserved),
                offset_of!(ArchivedAnswerFrame, sequence),
                offset_of!(ArchivedAnswerFrame, retry_after_ms),
                offset_of!(ArchivedAnswerFrame, reserved2),
                offset_of!(ArchivedAnswerFrame, parts),
                offset_of!(ArchivedAnswerFrame, message),
            ],
            [0, 2, 4, 6, 8, 16, 20, 24, 32]
        );
    }

    #[test]
    fn the_worked_example_of_the_docs_is_exact() {
        let records = vec![Record {
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"k1")),
            value: Some(Bytes::from_static(b"21.5")),
            headers: vec![Header { key: "unit".into(), value: Some(Bytes::from_static(b"C")) }],
        }];
        let bytes = encode(&produce_frame(7, "telemetry", &records));
        let hex: Vec<String> = bytes
            .chunks(16)
            .map(|line| line.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(" "))
            .collect();
        let documented =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/PROTOCOL.md")).unwrap();
        for line in &hex {
            assert!(
                documented.contains(line.as_str()),
                "docs/PROTOCOL.md lacks the example line {line}\nwhole example:\n{}",
                hex.join("\n")
            );
        }
    }
}
