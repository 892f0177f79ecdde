//! Kafka RecordBatch v2: the exact bytes weir keeps on disk and ships upstream.
//!
//! The codec is weir's own because it writes straight into the aligned buffer that goes
//! to disk (no intermediate copy) and because recovery needs a strict decoder that says
//! *why* bytes are not a batch. Any Kafka library is an independent oracle for it; the
//! test suite decodes weir's segments with kafka-python.
//!
//! Layout (big-endian, offsets in bytes):
//! `baseOffset i64 @0, batchLength i32 @8, partitionLeaderEpoch i32 @12, magic i8 @16,
//! crc u32 @17 (CRC-32C of bytes 21..end), attributes i16 @21, lastOffsetDelta i32 @23,
//! baseTimestamp i64 @27, maxTimestamp i64 @35, producerId i64 @43, producerEpoch i16 @51,
//! baseSequence i32 @53, recordCount i32 @57, records @61`.

use std::borrow::Cow;

use bytes::Bytes;

use super::varint::{get_varint, get_varlong, put_varint, put_varlong, varint_len, varlong_len};

pub const BATCH_HEADER_BYTES: usize = 61;
/// `baseOffset` and `batchLength` precede the length-counted part of a batch.
pub const BATCH_LENGTH_PREFIX_BYTES: usize = 12;
pub const MAGIC_V2: i8 = 2;
pub const CRC_START: usize = 21;
/// The largest batch weir writes or accepts when reading. A format constant, not a
/// tuning knob: recovery's forward search for a torn tail is bounded by it.
pub const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Records in one batch; bounded so a corrupt count cannot drive an allocation.
pub const BATCH_RECORDS_MAX: usize = BATCH_BYTES_MAX / 7;
/// Headers on one record.
pub const RECORD_HEADERS_MAX: usize = 64;

/// The leader epoch weir stamps on local batches (Kafka's "unknown").
pub const LOCAL_LEADER_EPOCH: i32 = -1;
/// Producer id, epoch and base sequence of a batch that no idempotent producer wrote
/// yet; the shipper stamps real ones when sending.
pub const NO_PRODUCER_ID: i64 = -1;
pub const NO_PRODUCER_EPOCH: i16 = -1;
pub const NO_SEQUENCE: i32 = -1;

const _: () = assert!(BATCH_HEADER_BYTES == 57 + 4);
const _: () = assert!(BATCH_BYTES_MAX <= i32::MAX as usize);

/// One header of a record. Kafka header keys are UTF-8 strings; values may be null.
/// A key is usually one of a few fixed names (weir's own `weir.device` and
/// `weir.sequence` on every stored record), so it may borrow a `&'static str` instead
/// of allocating a copy per record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: Cow<'static, str>,
    pub value: Option<Bytes>,
}

/// A record as an appender hands it to the log (the offset is assigned by the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

impl Record {
    /// Bytes of this record's body (everything after its length varint) when it is
    /// placed `offset_delta` records and `timestamp_delta` ms into a batch.
    fn body_len(&self, offset_delta: i32, timestamp_delta: i64) -> usize {
        let mut len = 1 + varlong_len(timestamp_delta) + varint_len(offset_delta);
        len += nullable_len(self.key.as_deref());
        len += nullable_len(self.value.as_deref());
        len += varint_len(self.headers.len() as i32);
        for header in &self.headers {
            len += varint_len(header.key.len() as i32) + header.key.len();
            len += nullable_len(header.value.as_deref());
        }
        len
    }

    /// An upper bound of this record's encoded size at any place in any batch (largest
    /// varints for its length and deltas): lets a group of appends be sized before
    /// they are merged into one batch.
    pub fn encoded_bytes_upper(&self) -> usize {
        let worst_deltas = super::varint::VARLONG_BYTES_MAX + super::varint::VARINT_BYTES_MAX;
        super::varint::VARINT_BYTES_MAX + self.body_len(0, 0) - 2 + worst_deltas
    }

    /// Payload bytes (key + value + header keys and values): what a device sent.
    pub fn payload_len(&self) -> usize {
        let mut len = self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len);
        for header in &self.headers {
            len += header.key.len() + header.value.as_ref().map_or(0, Bytes::len);
        }
        len
    }
}

fn nullable_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => varint_len(-1),
        Some(bytes) => varint_len(bytes.len() as i32) + bytes.len(),
    }
}

/// Why some bytes are not a valid batch. Recovery uses the kind to tell a torn tail
/// (too short) from garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("batch length {length} out of range")]
    BadLength { length: i64 },
    #[error("magic {magic}, expected 2")]
    BadMagic { magic: i8 },
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("unsupported attributes {attributes:#06x} (compressed or control batch)")]
    UnsupportedAttributes { attributes: i16 },
    #[error("record count {count} out of range")]
    BadRecordCount { count: i64 },
    #[error("malformed record {index}: {what}")]
    BadRecord { index: usize, what: &'static str },
    #[error("records end at {end} but the batch ends at {batch_end}")]
    TrailingBytes { end: usize, batch_end: usize },
}

/// The fixed header of a batch, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

impl BatchHeader {
    /// Total bytes of the batch on disk, header included.
    pub fn total_bytes(&self) -> usize {
        BATCH_LENGTH_PREFIX_BYTES + self.batch_length as usize
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }
}

fn be_i64(bytes: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}
fn be_i32(bytes: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}
fn be_i16(bytes: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

/// Reads the batch length of the batch starting at `bytes[0]` without checking
/// anything else: how many bytes the caller must have to check the whole batch.
pub fn peek_total_bytes(bytes: &[u8]) -> Result<usize, BatchError> {
    if bytes.len() < BATCH_LENGTH_PREFIX_BYTES {
        return Err(BatchError::Truncated { needed: BATCH_LENGTH_PREFIX_BYTES, available: bytes.len() });
    }
    let length = i64::from(be_i32(bytes, 8));
    let total = length + BATCH_LENGTH_PREFIX_BYTES as i64;
    if total < BATCH_HEADER_BYTES as i64 || total > BATCH_BYTES_MAX as i64 {
        return Err(BatchError::BadLength { length });
    }
    Ok(total as usize)
}

/// Parses the header of the batch at `bytes[0]` without the CRC check.
pub fn parse_header(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    peek_total_bytes(bytes)?;
    if bytes.len() < BATCH_HEADER_BYTES {
        return Err(BatchError::Truncated { needed: BATCH_HEADER_BYTES, available: bytes.len() });
    }
    Ok(BatchHeader {
        base_offset: be_i64(bytes, 0),
        batch_length: be_i32(bytes, 8),
        partition_leader_epoch: be_i32(bytes, 12),
        magic: bytes[16] as i8,
        crc: u32::from_be_bytes(bytes[17..21].try_into().expect("4 bytes")),
        attributes: be_i16(bytes, 21),
        last_offset_delta: be_i32(bytes, 23),
        base_timestamp: be_i64(bytes, 27),
        max_timestamp: be_i64(bytes, 35),
        producer_id: be_i64(bytes, 43),
        producer_epoch: be_i16(bytes, 51),
        base_sequence: be_i32(bytes, 53),
        record_count: be_i32(bytes, 57),
    })
}

/// Checks the batch at `bytes[0]`: length, magic, CRC, and that its records parse and
/// fill the batch exactly. Returns the header; the batch is `bytes[..header.total_bytes()]`.
pub fn check_batch(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    let total = peek_total_bytes(bytes)?;
    if bytes.len() < total {
        return Err(BatchError::Truncated { needed: total, available: bytes.len() });
    }
    let header = parse_header(bytes)?;
    if header.magic != MAGIC_V2 {
        return Err(BatchError::BadMagic { magic: header.magic });
    }
    let computed = crc32c::crc32c(&bytes[CRC_START..total]);
    if computed != header.crc {
        return Err(BatchError::BadCrc { stored: header.crc, computed });
    }
    // Compression (bits 0-2) and control batches (bit 5) never occur in weir's log.
    if header.attributes & 0b10_0111 != 0 {
        return Err(BatchError::UnsupportedAttributes { attributes: header.attributes });
    }
    let count = header.record_count;
    if count < 1 || count as usize > BATCH_RECORDS_MAX || i64::from(header.last_offset_delta) != i64::from(count) - 1 {
        return Err(BatchError::BadRecordCount { count: i64::from(count) });
    }
    let mut records = Records { bytes: &bytes[BATCH_HEADER_BYTES..total], header, index: 0, at: 0 };
    for record in records.by_ref() {
        record?;
    }
    if records.at != total - BATCH_HEADER_BYTES {
        return Err(BatchError::TrailingBytes { end: BATCH_HEADER_BYTES + records.at, batch_end: total });
    }
    Ok(header)
}

/// A record read from a checked batch, borrowing the batch's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

impl RecordRef<'_> {
    /// Copies this record out of `batch`, whose bytes it borrows, sharing them.
    pub fn to_record(&self, batch: &Bytes) -> Record {
        let share = |slice: &[u8]| batch.slice_ref(slice);
        Record {
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(share),
            value: self.value.map(share),
            headers: self
                .headers
                .iter()
                .map(|(key, value)| Header { key: Cow::Owned((*key).to_owned()), value: value.map(share) })
                .collect(),
        }
    }
}

/// Iterates the records of a batch whose length, magic and CRC were checked.
pub struct Records<'a> {
    bytes: &'a [u8],
    header: BatchHeader,
    index: usize,
    at: usize,
}

/// The records of the checked batch `batch` (as returned by a read).
pub fn records(batch: &[u8]) -> Result<Records<'_>, BatchError> {
    let header = check_batch(batch)?;
    Ok(Records { bytes: &batch[BATCH_HEADER_BYTES..header.total_bytes()], header, index: 0, at: 0 })
}

impl<'a> Records<'a> {
    fn take_varint(&mut self, what: &'static str) -> Result<i32, BatchError> {
        let (value, len) =
            get_varint(&self.bytes[self.at..]).ok_or(BatchError::BadRecord { index: self.index, what })?;
        self.at += len;
        Ok(value)
    }

    fn take_nullable(&mut self, end: usize, what: &'static str) -> Result<Option<&'a [u8]>, BatchError> {
        let len = self.take_varint(what)?;
        if len < 0 {
            return if len == -1 { Ok(None) } else { Err(BatchError::BadRecord { index: self.index, what }) };
        }
        let len = len as usize;
        if self.at + len > end {
            return Err(BatchError::BadRecord { index: self.index, what });
        }
        let slice = &self.bytes[self.at..self.at + len];
        self.at += len;
        Ok(Some(slice))
    }

    fn next_record(&mut self) -> Result<RecordRef<'a>, BatchError> {
        let index = self.index;
        let bad = |what| BatchError::BadRecord { index, what };
        let length = self.take_varint("length")?;
        if length < 1 || self.at + length as usize > self.bytes.len() {
            return Err(bad("length"));
        }
        let end = self.at + length as usize;
        let _attributes = self.bytes[self.at];
        self.at += 1;
        let (timestamp_delta, len) = get_varlong(&self.bytes[self.at..end]).ok_or(bad("timestamp delta"))?;
        self.at += len;
        let offset_delta = self.take_varint("offset delta")?;
        if offset_delta as i64 != index as i64 {
            return Err(bad("offset delta out of sequence"));
        }
        let key = self.take_nullable(end, "key")?;
        let value = self.take_nullable(end, "value")?;
        let header_count = self.take_varint("header count")?;
        if header_count < 0 || header_count as usize > RECORD_HEADERS_MAX {
            return Err(bad("header count"));
        }
        let mut headers = Vec::with_capacity(header_count as usize);
        for _ in 0..header_count {
            let key = self.take_nullable(end, "header key")?.ok_or(bad("null header key"))?;
            let key = std::str::from_utf8(key).map_err(|_| bad("header key not UTF-8"))?;
            let value = self.take_nullable(end, "header value")?;
            headers.push((key, value));
        }
        if self.at != end {
            return Err(bad("record length disagrees with its fields"));
        }
        self.index += 1;
        Ok(RecordRef {
            offset: self.header.base_offset + offset_delta as i64,
            timestamp_ms: self.header.base_timestamp.wrapping_add(timestamp_delta),
            key,
            value,
            headers,
        })
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<RecordRef<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.header.record_count as usize {
            return None;
        }
        let record = self.next_record();
        if record.is_err() {
            self.index = usize::MAX; // stop after the first error
        }
        Some(record)
    }
}

/// The plan for one batch: its exact size is known before any byte is written, so the
/// caller can size an aligned buffer and encode in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPlan {
    pub total_bytes: usize,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
}

/// Sizes the batch that `records` (in order, non-empty) would make.
pub fn plan_batch<'r>(records: impl Iterator<Item = &'r Record> + Clone) -> BatchPlan {
    let mut base_timestamp = None;
    let mut max_timestamp = i64::MIN;
    for record in records.clone() {
        base_timestamp.get_or_insert(record.timestamp_ms);
        max_timestamp = max_timestamp.max(record.timestamp_ms);
    }
    let base_timestamp = base_timestamp.expect("a batch has at least one record");
    let mut total_bytes = BATCH_HEADER_BYTES;
    for (index, record) in records.enumerate() {
        let body = record.body_len(index as i32, record.timestamp_ms.wrapping_sub(base_timestamp));
        total_bytes += varint_len(body as i32) + body;
    }
    BatchPlan { total_bytes, base_timestamp, max_timestamp }
}

/// Encodes `records` as one batch into `out[..plan.total_bytes]`, CRC included.
pub fn encode_batch<'r>(
    out: &mut [u8],
    plan: &BatchPlan,
    base_offset: i64,
    records: impl Iterator<Item = &'r Record>,
) -> BatchHeader {
    assert!(out.len() >= plan.total_bytes, "encode buffer too small");
    let out = &mut out[..plan.total_bytes];
    let mut at = BATCH_HEADER_BYTES;
    let mut count: i32 = 0;
    for record in records {
        let timestamp_delta = record.timestamp_ms.wrapping_sub(plan.base_timestamp);
        let body = record.body_len(count, timestamp_delta);
        at += put_varint(&mut out[at..], body as i32);
        let body_start = at;
        out[at] = 0; // record attributes: unused in v2
        at += 1;
        at += put_varlong(&mut out[at..], timestamp_delta);
        at += put_varint(&mut out[at..], count);
        at = put_nullable(out, at, record.key.as_deref());
        at = put_nullable(out, at, record.value.as_deref());
        at += put_varint(&mut out[at..], record.headers.len() as i32);
        for header in &record.headers {
            at = put_nullable(out, at, Some(header.key.as_bytes()));
            at = put_nullable(out, at, header.value.as_deref());
        }
        assert_eq!(at - body_start, body, "record body size disagrees with its plan");
        count += 1;
    }
    assert_eq!(at, plan.total_bytes, "batch size disagrees with its plan");
    assert!(count >= 1);
    let header = BatchHeader {
        base_offset,
        batch_length: (plan.total_bytes - BATCH_LENGTH_PREFIX_BYTES) as i32,
        partition_leader_epoch: LOCAL_LEADER_EPOCH,
        magic: MAGIC_V2,
        crc: 0,
        attributes: 0,
        last_offset_delta: count - 1,
        base_timestamp: plan.base_timestamp,
        max_timestamp: plan.max_timestamp,
        producer_id: NO_PRODUCER_ID,
        producer_epoch: NO_PRODUCER_EPOCH,
        base_sequence: NO_SEQUENCE,
        record_count: count,
    };
    write_header(out, &header);
    let crc = crc32c::crc32c(&out[CRC_START..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    BatchHeader { crc, ..header }
}

fn put_nullable(out: &mut [u8], mut at: usize, bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => at += put_varint(&mut out[at..], -1),
        Some(bytes) => {
            at += put_varint(&mut out[at..], bytes.len() as i32);
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        }
    }
    at
}

fn write_header(out: &mut [u8], header: &BatchHeader) {
    out[0..8].copy_from_slice(&header.base_offset.to_be_bytes());
    out[8..12].copy_from_slice(&header.batch_length.to_be_bytes());
    out[12..16].copy_from_slice(&header.partition_leader_epoch.to_be_bytes());
    out[16] = header.magic as u8;
    out[17..21].copy_from_slice(&header.crc.to_be_bytes());
    out[21..23].copy_from_slice(&header.attributes.to_be_bytes());
    out[23..27].copy_from_slice(&header.last_offset_delta.to_be_bytes());
    out[27..35].copy_from_slice(&header.base_timestamp.to_be_bytes());
    out[35..43].copy_from_slice(&header.max_timestamp.to_be_bytes());
    out[43..51].copy_from_slice(&header.producer_id.to_be_bytes());
    out[51..53].copy_from_slice(&header.producer_epoch.to_be_bytes());
    out[53..57].copy_from_slice(&header.base_sequence.to_be_bytes());
    out[57..61].copy_from_slice(&header.record_count.to_be_bytes());
}

/// Encodes `records` into a fresh vector: for tests, tools and fixtures.
pub fn encode_to_vec(base_offset: i64, records: &[Record]) -> Vec<u8> {
    let plan = plan_batch(records.iter());
    let mut out = vec![0u8; plan.total_bytes];
    encode_batch(&mut out, &plan, base_offset, records.iter());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record {
                timestamp_ms: 1_700_000_000_000,
                key: Some(Bytes::from_static(b"sensor-1")),
                value: Some(Bytes::from_static(b"21.5C")),
                headers: vec![Header { key: "unit".into(), value: Some(Bytes::from_static(b"celsius")) }],
            },
            Record { timestamp_ms: 1_699_999_999_000, key: None, value: None, headers: vec![] },
            Record {
                timestamp_ms: 1_700_000_000_500,
                key: Some(Bytes::new()),
                value: Some(Bytes::from(vec![7u8; 3000])),
                headers: vec![
                    Header { key: "a".into(), value: None },
                    Header { key: "".into(), value: Some(Bytes::new()) },
                ],
            },
        ]
    }

    #[test]
    fn encode_then_decode_round_trips_every_field() {
        let records = sample();
        let bytes = Bytes::from(encode_to_vec(42, &records));
        let header = check_batch(&bytes).unwrap();
        assert_eq!(header.base_offset, 42);
        assert_eq!(header.record_count, 3);
        assert_eq!(header.last_offset(), 44);
        assert_eq!(header.max_timestamp, 1_700_000_000_500);
        assert_eq!(header.total_bytes(), bytes.len());
        let decoded: Vec<_> = records_of(&bytes);
        assert_eq!(decoded, records);
    }

    fn records_of(bytes: &Bytes) -> Vec<Record> {
        records(bytes).unwrap().map(|record| record.unwrap().to_record(bytes)).collect()
    }

    #[test]
    fn every_single_bit_flip_is_detected_or_harmless() {
        let records = sample();
        let bytes = encode_to_vec(7, &records);
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            match check_batch(&flipped) {
                Err(_) => {}
                Ok(header) => {
                    // Only the fields outside the CRC can change undetected: base offset
                    // and leader epoch. The caller checks offset continuity.
                    assert!(bit / 8 < 8 || (12..16).contains(&(bit / 8)), "undetected flip at bit {bit}");
                    assert_eq!(header.record_count, 3);
                }
            }
        }
    }

    #[test]
    fn truncation_is_reported_as_truncated() {
        let bytes = encode_to_vec(0, &sample());
        for cut in 0..bytes.len() {
            let error = check_batch(&bytes[..cut]).unwrap_err();
            assert!(matches!(error, BatchError::Truncated { .. }), "cut {cut}: {error}");
        }
    }
}
