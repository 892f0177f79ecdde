//! Per-device session logic, pure: splitting a stream into frames, routing a checked
//! produce frame's records to partitions, and building the answer from the appends.
//!
//! Routing: a keyed record goes to partition `crc32c(key) mod partitions`; an unkeyed
//! record to `crc32c(device id) mod partitions`, so a device's unkeyed records stay in
//! one partition and in order. A topic shipped upstream with `partitioning = "by-key"`
//! hashes with Kafka's default partitioner instead (`murmur2(key) & 0x7fffffff mod
//! partitions`), so that edge partition p, shipped to upstream partition p of a topic
//! with as many partitions, holds exactly the keys a Kafka producer would have sent there. A frame's records for one partition are appended as one
//! run, in frame order, so they get consecutive offsets; the answer describes each
//! stretch of consecutive frame records that went to the same partition.

use bytes::Bytes;

use crate::log::batch::{Header, Record};
use crate::protocol::{AckPart, FRAME_LENGTH_PREFIX_BYTES};

/// The header weir adds to every record: the device id from its certificate.
pub const DEVICE_HEADER: &str = "weir.device";
/// The header weir adds to every record: the frame's sequence number.
pub const SEQUENCE_HEADER: &str = "weir.sequence";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssembleError {
    #[error("frame length {declared} exceeds the limit of {max} bytes")]
    TooLarge { declared: usize, max: usize },
    #[error("frame length 0")]
    Empty,
}

/// Splits the bytes of one stream into length-prefixed frames. Holds at most one frame
/// plus its prefix: the stream's flow-control window bounds what the peer may send.
#[derive(Debug)]
pub struct FrameAssembler {
    buffer: Vec<u8>,
    /// Bytes at the front of `buffer` already returned as frames. They are dropped on
    /// the next `push`, so many small frames in one chunk cost one move, not one each.
    consumed: usize,
    frame_bytes_max: usize,
}

impl FrameAssembler {
    pub fn new(frame_bytes_max: usize) -> FrameAssembler {
        FrameAssembler { buffer: Vec::new(), consumed: 0, frame_bytes_max }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.drain(..self.consumed);
        self.consumed = 0;
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.consumed
    }

    /// The next complete frame's archive bytes, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, AssembleError> {
        let pending = &self.buffer[self.consumed..];
        if pending.len() < FRAME_LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let declared = u32::from_be_bytes(pending[..4].try_into().expect("4 bytes")) as usize;
        if declared == 0 {
            return Err(AssembleError::Empty);
        }
        if declared > self.frame_bytes_max {
            return Err(AssembleError::TooLarge { declared, max: self.frame_bytes_max });
        }
        let total = FRAME_LENGTH_PREFIX_BYTES + declared;
        if pending.len() < total {
            return Ok(None);
        }
        let frame = pending[FRAME_LENGTH_PREFIX_BYTES..total].to_vec();
        self.consumed += total;
        Ok(Some(frame))
    }
}

/// How a topic's record keys are hashed to partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyHash {
    /// `crc32c`: weir's own (fast, hardware-assisted).
    #[default]
    Crc32c,
    /// Kafka's default partitioner: `murmur2(key) & 0x7fffffff` (a topic shipped `by-key`).
    KafkaMurmur2,
}

impl KeyHash {
    fn hash(self, bytes: &[u8]) -> u32 {
        match self {
            KeyHash::Crc32c => crc32c::crc32c(bytes),
            KeyHash::KafkaMurmur2 => kafka_murmur2(bytes) & 0x7fff_ffff,
        }
    }
}

/// Kafka's `Utils.murmur2` (MurmurHash2, 32-bit, seed 0x9747b28c), as its default
/// partitioner uses it.
pub fn kafka_murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut hash = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        hash = hash.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        hash ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        hash ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        hash ^= u32::from(rest[0]);
        hash = hash.wrapping_mul(M);
    }
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(M);
    hash ^= hash >> 15;
    hash
}

/// The partition a record goes to.
pub fn partition_for(key: Option<&[u8]>, device_id: &str, partitions: u32, key_hash: KeyHash) -> u32 {
    assert!(partitions > 0);
    let hash = match key {
        Some(key) => key_hash.hash(key),
        None => key_hash.hash(device_id.as_bytes()),
    };
    hash % partitions
}

/// A frame's records for one partition, in frame order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRun {
    pub partition: u32,
    pub records: Vec<Record>,
    /// (first frame index, count) of each stretch of consecutive frame records in it.
    pub stretches: Vec<(u32, u32)>,
}

/// Routes a checked frame's records, stamping each with the device id and sequence.
pub fn route(
    records: Vec<Record>,
    device_id: &str,
    sequence: u64,
    partitions: u32,
    key_hash: KeyHash,
) -> Vec<PartitionRun> {
    let device = Bytes::from(device_id.to_owned());
    let sequence_text = Bytes::from(sequence.to_string());
    let mut runs: Vec<PartitionRun> = Vec::new();
    let mut previous: Option<u32> = None;
    for (index, mut record) in records.into_iter().enumerate() {
        let partition = partition_for(record.key.as_deref(), device_id, partitions, key_hash);
        record.headers.push(Header { key: DEVICE_HEADER.into(), value: Some(device.clone()) });
        record.headers.push(Header { key: SEQUENCE_HEADER.into(), value: Some(sequence_text.clone()) });
        let run_index = match runs.iter().position(|run| run.partition == partition) {
            Some(position) => position,
            None => {
                runs.push(PartitionRun { partition, records: Vec::new(), stretches: Vec::new() });
                runs.len() - 1
            }
        };
        let run = &mut runs[run_index];
        run.records.push(record);
        match run.stretches.last_mut() {
            Some((_, count)) if previous == Some(partition) => *count += 1,
            _ => run.stretches.push((index as u32, 1)),
        }
        previous = Some(partition);
    }
    runs
}

/// The ack parts for runs whose appends started at `base_offsets` (same order).
pub fn ack_parts(runs: &[PartitionRun], base_offsets: &[i64]) -> Vec<AckPart> {
    assert_eq!(runs.len(), base_offsets.len());
    let mut parts = Vec::new();
    for (run, base_offset) in runs.iter().zip(base_offsets) {
        let mut offset = *base_offset;
        for (first_record, record_count) in &run.stretches {
            parts.push(AckPart {
                base_offset: offset,
                partition: run.partition,
                first_record: *first_record,
                record_count: *record_count,
                reserved: 0,
            });
            offset += i64::from(*record_count);
        }
    }
    parts.sort_by_key(|part| part.first_record);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&'static [u8]>) -> Record {
        Record { timestamp_ms: 1, key: key.map(Bytes::from_static), value: None, headers: vec![] }
    }

    #[test]
    fn frames_are_split_across_arbitrary_chunks() {
        let mut assembler = FrameAssembler::new(100);
        let mut stream = Vec::new();
        for frame in [&b"abc"[..], b"defgh", b"i"] {
            stream.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            stream.extend_from_slice(frame);
        }
        let mut frames = Vec::new();
        for byte in stream {
            assembler.push(&[byte]);
            while let Some(frame) = assembler.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames, vec![b"abc".to_vec(), b"defgh".to_vec(), b"i".to_vec()]);
        assert_eq!(assembler.buffered_bytes(), 0);
    }

    #[test]
    fn oversized_and_empty_frames_are_refused_before_buffering_them() {
        let mut assembler = FrameAssembler::new(10);
        assembler.push(&11u32.to_be_bytes());
        assert_eq!(assembler.next_frame(), Err(AssembleError::TooLarge { declared: 11, max: 10 }));
        let mut assembler = FrameAssembler::new(10);
        assembler.push(&0u32.to_be_bytes());
        assert_eq!(assembler.next_frame(), Err(AssembleError::Empty));
    }

    #[test]
    fn routing_keeps_frame_order_per_partition_and_parts_cover_every_record() {
        let records = vec![record(Some(b"a")), record(Some(b"b")), record(Some(b"a")), record(None), record(None)];
        let runs = route(records, "dev-1", 9, 4, KeyHash::Crc32c);
        let total: usize = runs.iter().map(|run| run.records.len()).sum();
        assert_eq!(total, 5);
        for run in &runs {
            for record in &run.records {
                assert_eq!(
                    record.headers[0],
                    Header { key: DEVICE_HEADER.into(), value: Some(Bytes::from_static(b"dev-1")) }
                );
                assert_eq!(record.headers[1].value.as_deref(), Some(&b"9"[..]));
            }
        }
        let bases: Vec<i64> = (0..runs.len() as i64).map(|index| index * 100).collect();
        let parts = ack_parts(&runs, &bases);
        let mut covered = vec![0; 5];
        for part in &parts {
            for index in part.first_record..part.first_record + part.record_count {
                covered[index as usize] += 1;
            }
        }
        assert_eq!(covered, vec![1; 5]);
        // Unkeyed records of one device share a partition.
        assert_eq!(partition_for(None, "dev-1", 4, KeyHash::Crc32c), partition_for(None, "dev-1", 4, KeyHash::Crc32c));
    }

    #[test]
    fn murmur2_matches_kafkas_own_test_vectors_and_partitioner() {
        // Kafka's UtilsTest.testMurmur2 (the values as Java ints).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (data, expected) in cases {
            assert_eq!(kafka_murmur2(data) as i32, expected, "{:?}", String::from_utf8_lossy(data));
        }
        // The partitioner: toPositive(murmur2(key)) % partitions.
        let positive = (-973_932_308i32 & 0x7fff_ffff) as u32;
        assert_eq!(partition_for(Some(b"21"), "dev-1", 7, KeyHash::KafkaMurmur2), positive % 7);
    }
}
