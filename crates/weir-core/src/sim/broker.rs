//! A model Kafka broker for one partition, following Kafka's idempotent-producer rules
//! exactly: de-duplication against the last 5 batches of a producer by exact (epoch,
//! firstSeq, lastSeq), a duplicate answered with success and the old offset (or, like
//! tansu, with DUPLICATE_SEQUENCE_NUMBER), OUT_OF_ORDER_SEQUENCE_NUMBER for a batch that
//! does not continue the producer's sequence, and any sequence accepted once the
//! producer's state is forgotten (`forget_producers`: `producer.id.expiration.ms`); or
//! tansu's SQLite storage's rules (`Dedup::TansuSqlite`).
//!
//! It answers a Fetch the way the broker it models does (`fetch`): Kafka answers
//! whole stored batches from the one holding the fetch offset, which may start below
//! it; tansu 0.6's memory storage, as its source reads, answers only batches whose base
//! offset is at or after the fetch offset (the build tested here answered the batch
//! holding it, so the model is the harsher of the two), counts a batch in its high
//! watermark before it stores it
//! (`begin_write`: a Fetch below the high watermark then answers nothing), and after
//! a gap answers its last batches twice; tansu 0.6's SQLite storage rebuilds batches
//! from stored rows starting exactly at the fetch offset; and a broker may answer
//! a `max_bytes` smaller than the first batch with part of it only
//! (`partial_first`, Fetch before KIP-74).
//! Shared by the shipper's own simulation (`core::ship::shipper_tests`) and the
//! whole-pipeline simulation (`core::sim`).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::log::batch::{self, Record};
use crate::ship::errors;
use crate::ship::sequence::Sequence;
use crate::ship::{ProduceAnswer, ProducerIdentity};

pub(crate) struct ProducerEntry {
    pub(crate) epoch: i16,
    pub(crate) last_sequence: Sequence,
    /// (first sequence, last sequence, upstream offset) of the last 5 batches.
    pub(crate) recent: VecDeque<(i32, i32, i64)>,
}

/// How a model broker de-duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Dedup {
    /// Kafka's rules: the last 5 batches by exact (firstSeq, lastSeq) answered with
    /// their offset; any other sequence but the next is OUT_OF_ORDER_SEQUENCE; a
    /// forgotten producer's first batch takes any sequence.
    #[default]
    Kafka,
    /// tansu 0.6 with memory storage: Kafka's rules, but a duplicate is answered
    /// DUPLICATE_SEQUENCE_NUMBER without an offset.
    TansuMemory,
    /// tansu 0.6 with SQLite storage: any batch whose base sequence is below the next
    /// expected one is DUPLICATE_SEQUENCE_NUMBER (even one reaching past what it
    /// holds), above it OUT_OF_ORDER; producers are never forgotten; and a Fetch
    /// answers batches rebuilt from stored rows, which keep no producer id (so
    /// reconciliation's scan sees none of ours).
    TansuSqlite,
}

/// A broker following Kafka's idempotence rules for one partition (or tansu's, see
/// `Dedup`).
#[derive(Default)]
pub(crate) struct ModelBroker {
    pub(crate) log: Vec<(i64, Bytes)>,
    pub(crate) next_offset: i64,
    pub(crate) producers: HashMap<i64, ProducerEntry>,
    pub(crate) next_producer_id: i64,
    pub(crate) dedup: Dedup,
    /// The base offset of a batch counted in the high watermark but not stored yet
    /// (tansu's memory storage between its watermark update and its object write).
    pub(crate) writing: Option<i64>,
    /// A `max_bytes` smaller than the first batch gets part of it only.
    pub(crate) partial_first: bool,
}

impl ModelBroker {
    pub(crate) fn init_producer(&mut self) -> ProducerIdentity {
        self.next_producer_id += 1;
        ProducerIdentity { id: 1000 + self.next_producer_id, epoch: 0 }
    }

    pub(crate) fn produce(&mut self, bytes: &Bytes) -> ProduceAnswer {
        let header = match batch::check_batch(bytes) {
            Ok(header) => header,
            Err(_) => return ProduceAnswer::Error { code: 2 },
        };
        let first = header.base_sequence;
        let last = Sequence(first).last_of_batch(header.record_count).0;
        if self.dedup == Dedup::TansuSqlite {
            let next = self.producers.get(&header.producer_id).map_or(Sequence(0), |entry| entry.last_sequence.plus(1));
            if next.0 > first {
                return ProduceAnswer::Error { code: errors::DUPLICATE_SEQUENCE_NUMBER };
            }
            if next.0 < first {
                return ProduceAnswer::Error { code: errors::OUT_OF_ORDER_SEQUENCE_NUMBER };
            }
        } else if let Some(entry) = self.producers.get(&header.producer_id) {
            assert_eq!(entry.epoch, header.producer_epoch, "weir never bumps the epoch");
            if let Some((_, _, offset)) = entry.recent.iter().find(|(a, b, _)| *a == first && *b == last) {
                return if self.dedup == Dedup::TansuMemory {
                    ProduceAnswer::Error { code: errors::DUPLICATE_SEQUENCE_NUMBER }
                } else {
                    ProduceAnswer::Appended { upstream_offset: Some(*offset) }
                };
            }
            if entry.last_sequence.plus(1) != Sequence(first) {
                return ProduceAnswer::Error { code: errors::OUT_OF_ORDER_SEQUENCE_NUMBER };
            }
        }
        let offset = self.next_offset;
        let mut stored = bytes.to_vec();
        stored[0..8].copy_from_slice(&offset.to_be_bytes());
        self.log.push((offset, Bytes::from(stored)));
        self.next_offset += i64::from(header.record_count);
        let entry = self.producers.entry(header.producer_id).or_insert(ProducerEntry {
            epoch: header.producer_epoch,
            last_sequence: Sequence(0),
            recent: VecDeque::new(),
        });
        entry.last_sequence = Sequence(last);
        entry.recent.push_back((first, last, offset));
        if entry.recent.len() > 5 {
            entry.recent.pop_front();
        }
        ProduceAnswer::Appended { upstream_offset: Some(offset) }
    }

    /// Records of any producer (another weir box sharing the topic).
    pub(crate) fn produce_foreign(&mut self, count: usize) {
        let records: Vec<Record> = (0..count)
            .map(|index| Record {
                timestamp_ms: index as i64,
                key: None,
                value: Some(Bytes::from_static(b"x")),
                headers: vec![],
            })
            .collect();
        let bytes = Bytes::from(batch::encode_to_vec(0, &records));
        let offset = self.next_offset;
        let mut stored = bytes.to_vec();
        stored[0..8].copy_from_slice(&offset.to_be_bytes());
        self.log.push((offset, Bytes::from(stored)));
        self.next_offset += count as i64;
    }

    /// The last batch stored is counted in the high watermark but stays unreadable
    /// until `finish_write` (tansu's memory storage only: the others make a batch
    /// readable before they count it).
    pub(crate) fn begin_write(&mut self) {
        if self.dedup == Dedup::TansuMemory {
            self.writing = self.log.last().map(|(base, _)| *base);
        }
    }

    pub(crate) fn finish_write(&mut self) {
        self.writing = None;
    }

    /// A Fetch's records bytes from `offset`, about `bytes_max`, as the modelled
    /// broker answers it (see the module doc).
    pub(crate) fn fetch(&self, offset: i64, bytes_max: usize) -> Vec<u8> {
        match self.dedup {
            Dedup::Kafka => self.fetch_kafka(offset, bytes_max),
            Dedup::TansuMemory => self.fetch_tansu_memory(offset, bytes_max),
            Dedup::TansuSqlite => self.fetch_tansu_sqlite(offset, bytes_max),
        }
    }

    fn fetch_kafka(&self, offset: i64, bytes_max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (_, bytes) in &self.log {
            let header = batch::parse_header(bytes).unwrap();
            if header.last_offset() < offset {
                continue;
            }
            if out.is_empty() && self.partial_first && bytes.len() > bytes_max {
                out.extend_from_slice(&bytes[..bytes_max.max(1)]);
                break;
            }
            if !out.is_empty() && out.len() + bytes.len() > bytes_max {
                // Like Kafka, a partial batch may end the response.
                out.extend_from_slice(&bytes[..bytes.len() / 2]);
                break;
            }
            out.extend_from_slice(bytes);
        }
        out
    }

    /// tansu 0.6's memory storage: `Engine::fetch` answers the stored batches whose base
    /// offset is at or after the fetch offset (at least one, then while `max_bytes`
    /// lasts), and `FetchService` calls it again at the fetch offset plus the record
    /// counts answered, until an answer is empty or `max_bytes` is spent.
    fn fetch_tansu_memory(&self, offset: i64, bytes_max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut fetch_offset = offset;
        let mut bytes_left = bytes_max;
        while bytes_left > 0 {
            let mut answered = 0usize;
            let mut records = 0i64;
            let mut budget = bytes_left;
            for (base, bytes) in &self.log {
                if *base < fetch_offset || Some(*base) == self.writing {
                    continue;
                }
                out.extend_from_slice(bytes);
                answered += bytes.len();
                records += i64::from(batch::parse_header(bytes).unwrap().record_count);
                if bytes.len() > budget {
                    break;
                }
                budget -= bytes.len();
            }
            if answered == 0 {
                break;
            }
            bytes_left = bytes_left.saturating_sub(answered);
            fetch_offset += records;
        }
        out
    }

    /// tansu 0.6's SQLite storage: the stored rows from the fetch offset exactly,
    /// while their keys and values add up to less than `max_bytes` (none when the
    /// first alone does not), rebuilt into one batch without producer id, epoch or
    /// sequence; `FetchService` fetches again after it while `max_bytes` lasts.
    fn fetch_tansu_sqlite(&self, offset: i64, bytes_max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut fetch_offset = offset;
        let mut bytes_left = bytes_max;
        while bytes_left > 0 {
            let mut rows = Vec::new();
            let mut row_bytes = 0usize;
            'rows: for (_, bytes) in &self.log {
                for record in batch::records(bytes).unwrap() {
                    let record = record.unwrap();
                    if record.offset < fetch_offset {
                        continue;
                    }
                    row_bytes += record.key.map_or(0, <[u8]>::len) + record.value.map_or(0, <[u8]>::len);
                    if row_bytes >= bytes_left {
                        break 'rows;
                    }
                    rows.push(record.to_record(bytes));
                }
            }
            if rows.is_empty() {
                break;
            }
            let mut rebuilt = batch::encode_to_vec(fetch_offset, &rows);
            rebuilt[43..53].fill(0xff); // no producer id or epoch
            rebuilt[53..57].fill(0); // base sequence 0
            bytes_left = bytes_left.saturating_sub(rebuilt.len());
            fetch_offset += rows.len() as i64;
            out.extend_from_slice(&rebuilt);
        }
        out
    }

    /// Forgets every producer's de-duplication state (Kafka's producer.id.expiration.ms);
    /// tansu's SQLite storage keeps it for good.
    pub(crate) fn forget_producers(&mut self) {
        if self.dedup != Dedup::TansuSqlite {
            self.producers.clear();
        }
    }

    pub(crate) fn our_records(&self) -> Vec<Record> {
        let mut records = Vec::new();
        for (_, bytes) in &self.log {
            let header = batch::parse_header(bytes).unwrap();
            if header.producer_id < 0 {
                continue; // foreign
            }
            for record in batch::records(bytes).unwrap() {
                records.push(record.unwrap().to_record(bytes));
            }
        }
        records
    }
}
