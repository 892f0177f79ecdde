//! Upstream batches: what one Produce request carries for one partition.
//!
//! A stored batch is sent as it is, with the producer id (byte 43), epoch (51) and base
//! sequence (53) stamped and the CRC-32C over bytes 21.. recomputed. When the shipper is
//! behind, several small stored batches (each one group commit) are coalesced into one
//! upstream RecordBatch so one request carries real volume: their records are
//! re-encoded, in order, with every key, value, timestamp and header unchanged.
//!
//! Boundaries: an upstream batch is always a run of whole stored batches, so its first
//! offset is a stored-batch boundary and every sequence is `Sequence::of_offset` of its
//! offset. How many stored batches go into one is decided by `group_len` from the
//! stored sizes alone: the longest prefix whose stored bytes fit `bytes_max` (at least
//! one batch), shortened one batch at a time if the re-encoded batch came out larger
//! (a timestamp or offset delta can need a longer varint once merged). Re-sends inside
//! one process re-send the very same bytes (kept until acknowledged). After a restart
//! the boundaries are not reproduced: reconciliation first finds exactly which
//! sequences upstream already holds and shipping continues after them (see
//! `reconcile`), so no batch is ever sent twice with different boundaries.

use bytes::Bytes;

use crate::log::batch::{self, BatchError, BatchHeader, Record, BATCH_BYTES_MAX, BATCH_RECORDS_MAX};

use super::sequence::Sequence;

/// Byte positions of the idempotence fields inside a RecordBatch v2.
pub const PRODUCER_ID_AT: usize = 43;
pub const PRODUCER_EPOCH_AT: usize = 51;
pub const BASE_SEQUENCE_AT: usize = 53;

const _: () = assert!(PRODUCER_ID_AT + 8 == PRODUCER_EPOCH_AT && PRODUCER_EPOCH_AT + 2 == BASE_SEQUENCE_AT);
const _: () = assert!(BASE_SEQUENCE_AT + 4 + 4 == batch::BATCH_HEADER_BYTES);

/// An idempotent producer as the broker granted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProducerIdentity {
    pub id: i64,
    pub epoch: i16,
}

/// Writes producer id, epoch and base sequence into `batch` and recomputes its CRC.
pub fn stamp(batch: &mut [u8], producer: ProducerIdentity, base_sequence: Sequence) {
    assert!(batch.len() >= batch::BATCH_HEADER_BYTES);
    batch[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&producer.id.to_be_bytes());
    batch[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2].copy_from_slice(&producer.epoch.to_be_bytes());
    batch[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&base_sequence.0.to_be_bytes());
    let crc = crc32c::crc32c(&batch[batch::CRC_START..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
}

/// A whole batch as the log stored it.
#[derive(Debug, Clone)]
pub struct StoredBatch {
    pub bytes: Bytes,
    pub header: BatchHeader,
}

impl StoredBatch {
    /// Wraps bytes the log returned (their CRC was checked by the read). The header is
    /// parsed again and the length must match exactly.
    pub fn new(bytes: Bytes) -> Result<StoredBatch, BatchError> {
        let header = batch::parse_header(&bytes)?;
        if header.total_bytes() != bytes.len() {
            return Err(BatchError::TrailingBytes { end: header.total_bytes(), batch_end: bytes.len() });
        }
        if header.record_count < 1 || i64::from(header.last_offset_delta) != i64::from(header.record_count) - 1 {
            return Err(BatchError::BadRecordCount { count: i64::from(header.record_count) });
        }
        Ok(StoredBatch { bytes, header })
    }

    pub fn base_offset(&self) -> i64 {
        self.header.base_offset
    }

    pub fn next_offset(&self) -> i64 {
        self.header.next_offset()
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// One upstream batch, stamped and ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamBatch {
    pub first_offset: i64,
    pub record_count: i32,
    pub base_sequence: Sequence,
    pub stored_batches: usize,
    pub bytes: Bytes,
}

impl UpstreamBatch {
    pub fn last_offset(&self) -> i64 {
        self.first_offset + i64::from(self.record_count) - 1
    }

    pub fn next_offset(&self) -> i64 {
        self.first_offset + i64::from(self.record_count)
    }

    pub fn last_sequence(&self) -> Sequence {
        self.base_sequence.last_of_batch(self.record_count)
    }
}

/// How many leading batches of `stored` (a contiguous run) the next upstream batch
/// takes: the longest prefix whose stored bytes fit `bytes_max` and whose records fit
/// one batch; always at least one.
pub fn group_len(stored: &[StoredBatch], bytes_max: usize) -> usize {
    assert!(!stored.is_empty());
    let mut bytes = stored[0].len();
    let mut records = stored[0].header.record_count as usize;
    let mut count = 1;
    for next in &stored[1..] {
        bytes += next.len() - batch::BATCH_HEADER_BYTES;
        records += next.header.record_count as usize;
        if bytes > bytes_max || bytes > BATCH_BYTES_MAX || records > BATCH_RECORDS_MAX {
            break;
        }
        count += 1;
    }
    count
}

/// Builds the upstream batch for the whole run `stored` (contiguous offsets).
pub fn build(
    stored: &[StoredBatch],
    producer: ProducerIdentity,
    epoch_start_offset: i64,
) -> Result<UpstreamBatch, BatchError> {
    assert!(!stored.is_empty());
    for pair in stored.windows(2) {
        assert_eq!(pair[0].next_offset(), pair[1].base_offset(), "stored batches are contiguous");
    }
    let first_offset = stored[0].base_offset();
    let base_sequence = Sequence::of_offset(first_offset, epoch_start_offset);
    let record_count: i64 = stored.iter().map(|each| i64::from(each.header.record_count)).sum();
    let mut out = if stored.len() == 1 {
        stored[0].bytes.to_vec()
    } else {
        let mut records: Vec<Record> = Vec::with_capacity(record_count as usize);
        for each in stored {
            for record in batch::records(&each.bytes)? {
                records.push(record?.to_record(&each.bytes));
            }
        }
        batch::encode_to_vec(first_offset, &records)
    };
    stamp(&mut out, producer, base_sequence);
    let upstream = UpstreamBatch {
        first_offset,
        record_count: i32::try_from(record_count).expect("a batch holds at most BATCH_RECORDS_MAX records"),
        base_sequence,
        stored_batches: stored.len(),
        bytes: Bytes::from(out),
    };
    debug_assert!(batch::check_batch(&upstream.bytes).is_ok());
    Ok(upstream)
}

/// Builds the next upstream batch from the front of `pending`: `group_len` stored
/// batches, one fewer at a time while the encoded batch exceeds `bytes_max`.
pub fn build_next(
    pending: &[StoredBatch],
    bytes_max: usize,
    producer: ProducerIdentity,
    epoch_start_offset: i64,
) -> Result<UpstreamBatch, BatchError> {
    let mut count = group_len(pending, bytes_max);
    loop {
        let upstream = build(&pending[..count], producer, epoch_start_offset)?;
        if count == 1 || upstream.bytes.len() <= bytes_max {
            return Ok(upstream);
        }
        count -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::Header;

    fn record(seed: u64, value_bytes: usize) -> Record {
        Record {
            timestamp_ms: 1_700_000_000_000 + (seed as i64 * 7919) % 100_000 - 50_000,
            key: if seed.is_multiple_of(5) { None } else { Some(Bytes::from(format!("key-{seed}"))) },
            value: Some(Bytes::from(vec![seed as u8; value_bytes])),
            headers: (0..seed % 3)
                .map(|index| Header { key: format!("h{index}").into(), value: Some(Bytes::from(seed.to_string())) })
                .collect(),
        }
    }

    /// Stored batches of the given record counts, starting at `first_offset`.
    fn stored(first_offset: i64, counts: &[usize], value_bytes: usize) -> (Vec<StoredBatch>, Vec<Record>) {
        let mut offset = first_offset;
        let mut batches = Vec::new();
        let mut all = Vec::new();
        for count in counts {
            let records: Vec<Record> =
                (0..*count).map(|index| record(offset as u64 + index as u64, value_bytes)).collect();
            batches.push(StoredBatch::new(Bytes::from(batch::encode_to_vec(offset, &records))).unwrap());
            all.extend(records);
            offset += *count as i64;
        }
        (batches, all)
    }

    const PRODUCER: ProducerIdentity = ProducerIdentity { id: 4242, epoch: 3 };

    fn decode(bytes: &Bytes) -> Vec<Record> {
        batch::records(bytes).unwrap().map(|record| record.unwrap().to_record(bytes)).collect()
    }

    #[test]
    fn a_single_stored_batch_is_sent_byte_for_byte_except_the_stamped_fields() {
        let (batches, _) = stored(10, &[3], 50);
        let upstream = build(&batches, PRODUCER, 4).unwrap();
        let header = batch::check_batch(&upstream.bytes).unwrap();
        assert_eq!((header.producer_id, header.producer_epoch, header.base_sequence), (4242, 3, 6));
        assert_eq!((upstream.first_offset, upstream.record_count, upstream.last_offset()), (10, 3, 12));
        assert_eq!(upstream.last_sequence(), Sequence(8));
        let original = &batches[0].bytes;
        for (position, (sent, kept)) in upstream.bytes.iter().zip(original.iter()).enumerate() {
            let stamped = (17..21).contains(&position) || (PRODUCER_ID_AT..BASE_SEQUENCE_AT + 4).contains(&position);
            if !stamped {
                assert_eq!(sent, kept, "byte {position} changed");
            }
        }
    }

    #[test]
    fn coalesced_batches_keep_every_record_field_and_order() {
        let (batches, records) = stored(100, &[1, 4, 2, 7], 30);
        let upstream = build(&batches, PRODUCER, 100).unwrap();
        let header = batch::check_batch(&upstream.bytes).unwrap();
        assert_eq!(header.record_count, 14);
        assert_eq!(header.base_offset, 100);
        assert_eq!(header.base_sequence, 0);
        assert_eq!(header.max_timestamp, records.iter().map(|record| record.timestamp_ms).max().unwrap());
        assert_eq!(decode(&upstream.bytes), records);
        assert_eq!(upstream.stored_batches, 4);
    }

    #[test]
    fn group_len_fills_up_to_the_limit_and_takes_at_least_one() {
        let (batches, _) = stored(0, &[10, 10, 10, 10], 100);
        let one = batches[0].len();
        assert_eq!(group_len(&batches, 1), 1, "an oversized batch still goes, alone");
        assert_eq!(group_len(&batches, one), 1);
        let two = one + batches[1].len() - batch::BATCH_HEADER_BYTES;
        assert_eq!(group_len(&batches, two), 2);
        assert_eq!(group_len(&batches, two - 1), 1);
        assert_eq!(group_len(&batches, usize::MAX), 4);
    }

    #[test]
    fn build_next_never_exceeds_the_limit_unless_alone() {
        let (batches, _) = stored(0, &[1, 1, 1, 1, 1, 1, 1, 1], 200);
        for bytes_max in [100usize, 300, 500, 700, 1000, 2000, 4000] {
            let upstream = build_next(&batches, bytes_max, PRODUCER, 0).unwrap();
            assert!(upstream.bytes.len() <= bytes_max || upstream.stored_batches == 1, "{bytes_max}");
            batch::check_batch(&upstream.bytes).unwrap();
        }
    }

    #[test]
    fn consecutive_upstream_batches_continue_the_sequence_whatever_the_grouping() {
        let (batches, records) = stored(1000, &[3, 1, 5, 2, 2, 9, 1, 4], 20);
        for bytes_max in [1usize, 200, 400, 800, 100_000] {
            let mut at = 0;
            let mut expected = Sequence(0);
            let mut shipped = Vec::new();
            while at < batches.len() {
                let upstream = build_next(&batches[at..], bytes_max, PRODUCER, 1000).unwrap();
                assert_eq!(upstream.base_sequence, expected);
                expected = upstream.last_sequence().plus(1);
                shipped.extend(decode(&upstream.bytes));
                at += upstream.stored_batches;
            }
            assert_eq!(shipped, records, "bytes_max {bytes_max}");
        }
    }

    #[test]
    fn a_stored_batch_with_trailing_bytes_is_refused() {
        let (batches, _) = stored(0, &[2], 10);
        let mut longer = batches[0].bytes.to_vec();
        longer.push(0);
        assert!(StoredBatch::new(Bytes::from(longer)).is_err());
    }
}
