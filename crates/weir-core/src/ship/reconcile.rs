//! Reconciliation after a restart: find out exactly which of our sequences the
//! upstream partition already holds before sending anything again.
//!
//! The persisted state carries `upstream_scan_from_offset`: an upstream offset at or
//! before every batch this producer wrote for local offsets at or after the persisted
//! cursor (it is the upstream end of the last acknowledged batch, and batches of one
//! producer are appended in sequence order). So a forward scan of the upstream
//! partition from there to its high watermark sees every batch that may be in doubt,
//! whether or not the broker still keeps this producer's de-duplication state (it
//! forgets after `producer.id.expiration.ms`, and only remembers 5 batches anyway).
//!
//! The scan reads batch headers only (any magic; other producers' batches may be
//! compressed or transactional) and keeps the batches whose producer id and epoch are
//! ours. `decide` maps their last sequences back to local offsets near the cursor
//! (`sequence::offset_near`) and moves the cursor to just after the highest one.
//! Shipping then continues from there with the same producer, so the next batch
//! continues the broker's sequence exactly, and a zombie request from the dead process
//! can only be de-duplicated or refused (OUT_OF_ORDER_SEQUENCE), never appended twice.

use super::coalesce::ProducerIdentity;
use super::sequence::{offset_near, Sequence};

/// Fixed framing of every Kafka log entry, any magic: offset i64, length i32.
const ENTRY_PREFIX_BYTES: usize = 12;
/// Bytes of a v2 batch header up to and including `recordCount`.
const V2_HEADER_BYTES: usize = 61;

/// The header fields of one upstream batch that reconciliation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundBatch {
    pub upstream_offset: i64,
    pub next_upstream_offset: i64,
    pub producer: ProducerIdentity,
    pub base_sequence: i32,
    pub last_offset_delta: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    #[error("upstream partition ends at offset {high_watermark}, before offset {scan_from} where this producer's batches start: the upstream lost data, is not the partition weir shipped to, or its new leader has not caught up yet")]
    UpstreamBehind { scan_from: i64, high_watermark: i64 },
    #[error(
        "upstream offset {at} is below the high watermark {high_watermark} but the broker's answer holds no entry for it (scan from upstream offset {scan_from}): a write still in progress, or a batch the broker does not answer from its middle"
    )]
    NotReadable { scan_from: i64, at: i64, high_watermark: i64 },
    #[error("the scan read {bytes} bytes from upstream offset {scan_from} without reaching the end (upstream.reconcile_scan_bytes_max)")]
    TooLong { scan_from: i64, bytes: u64 },
    #[error(
        "the upstream entry at offset {at} is {bytes} bytes, more than a scan fetches at once ({SCAN_FETCH_BYTES_MAX})"
    )]
    EntryTooLarge { at: i64, bytes: usize },
    #[error("upstream offset {upstream_offset} holds a batch of ours ending at local offset {local_last_offset}, beyond the local log end {log_end_offset}")]
    UpstreamAheadOfLog { upstream_offset: i64, local_last_offset: i64, log_end_offset: i64 },
    #[error("upstream offset {upstream_offset} holds a batch of ours for local offsets {local_first_offset}..={local_last_offset}, which straddles the cursor {cursor_offset}")]
    StraddlesCursor { upstream_offset: i64, local_first_offset: i64, local_last_offset: i64, cursor_offset: i64 },
    #[error("upstream offset {upstream_offset} holds a batch of ours with base sequence {found}, where the records counted from the scan point make it {expected}")]
    SequenceMismatch { upstream_offset: i64, found: i32, expected: i32 },
    #[error("malformed upstream batch at upstream offset {upstream_offset}: {what}")]
    Malformed { upstream_offset: i64, what: &'static str },
}

impl ReconcileError {
    /// Whether another scan, later or from an earlier point, can end differently. The
    /// rest prove something only an operator can resolve: our batches upstream that do
    /// not fit the local log (another writer, or a log that lost data), a broker
    /// answering garbage, or limits set too low.
    pub fn is_retriable(&self) -> bool {
        matches!(self, ReconcileError::NotReadable { .. } | ReconcileError::UpstreamBehind { .. })
    }
}

/// Bytes a scan asks one Fetch for at first (tansu's SQLite storage returns nothing
/// at all when the first record alone is larger, so later attempts ask for more).
pub const SCAN_FETCH_BYTES_MIN: usize = 1 << 20;
/// The most a scan asks one Fetch for; an upstream entry larger than this stops it.
pub const SCAN_FETCH_BYTES_MAX: usize = 16 << 20;
/// Scans that start at the scan point itself before later ones start earlier: a
/// write in progress (tansu's memory storage counts a batch in its high watermark
/// before it stores it) is over within one backoff.
pub const SCAN_ATTEMPTS_AT_THE_SCAN_POINT: u32 = 3;
/// How far the first scan from an earlier point starts before the scan point (it
/// doubles with each further attempt): tansu's memory storage answers only batches
/// whose base offset is at or after the fetch offset, so a scan point inside a
/// stored batch is reached only from at or before that batch's base.
pub const SCAN_STEP_BACK_RECORDS_MIN: i64 = 16;
const _: () = assert!(SCAN_FETCH_BYTES_MIN <= SCAN_FETCH_BYTES_MAX);

/// One attempt at reconciliation: count our records from `scan_from_offset` (whose
/// local offset is known), fetching from `fetch_from_offset` (at or before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanPlan {
    pub scan_from_offset: i64,
    pub fetch_from_offset: i64,
    pub fetch_bytes: usize,
    pub bytes_max: u64,
}

impl ScanPlan {
    /// The plan for a scan after `attempt` scans in a row ended retriably (0 for the
    /// first): at the scan point with the smallest fetches first, then from ever
    /// earlier points with ever larger fetches (see docs/UPSTREAM.md).
    pub fn for_attempt(scan_from_offset: i64, attempt: u32, bytes_max: u64) -> ScanPlan {
        assert!(scan_from_offset >= 0);
        let step_back = match attempt.checked_sub(SCAN_ATTEMPTS_AT_THE_SCAN_POINT) {
            None => 0,
            Some(earlier) => SCAN_STEP_BACK_RECORDS_MIN << earlier.min(32),
        };
        ScanPlan {
            scan_from_offset,
            fetch_from_offset: scan_from_offset.saturating_sub(step_back).max(0),
            fetch_bytes: (SCAN_FETCH_BYTES_MIN << attempt.min(8)).min(SCAN_FETCH_BYTES_MAX),
            bytes_max,
        }
    }
}

/// One complete entry of a Fetch answer: the offsets it holds, and its v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub first_offset: i64,
    pub next_offset: i64,
    /// `None` for a magic 0/1 message (its offset is its last; `first_offset` is it).
    pub batch: Option<FoundBatch>,
}

/// The parsed records bytes of one Fetch answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    /// Complete entries, each starting at or after the end of the one before.
    pub entries: Vec<Entry>,
    /// The full size of a partial entry at the end (when its length was there).
    pub partial_entry_bytes: Option<usize>,
}

/// Parses the complete entries of a Fetch response's records bytes, in order.
///
/// A partition's log only grows, so an answer's entries never go back: parsing ends
/// at an entry that starts before the end of the one before it. Kafka never answers
/// so; tansu's memory storage does after a gap (its Fetch adds the record counts it
/// returned to the fetch offset and fetches again, answering its last batches twice).
/// What came before is sound and the scan fetches again from its end; taking the
/// rest would move the scan backwards (found by fuzzing).
pub fn parse_entries(bytes: &[u8]) -> Result<Entries, ReconcileError> {
    let mut parsed = Entries::default();
    let mut at = 0usize;
    while bytes.len() - at >= ENTRY_PREFIX_BYTES {
        let base_offset = i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if length < 0 {
            return Err(ReconcileError::Malformed { upstream_offset: base_offset, what: "negative length" });
        }
        if base_offset < 0 {
            return Err(ReconcileError::Malformed { upstream_offset: base_offset, what: "negative offset" });
        }
        if parsed.entries.last().is_some_and(|before| base_offset < before.next_offset) {
            break; // the answer goes back: the rest is fetched again
        }
        let total = ENTRY_PREFIX_BYTES + length as usize;
        if bytes.len() - at < total {
            parsed.partial_entry_bytes = Some(total);
            break; // a partial entry at the end of the response
        }
        let entry = &bytes[at..at + total];
        let magic = if total > 16 { entry[16] as i8 } else { -1 };
        if magic >= 2 {
            if total < V2_HEADER_BYTES {
                return Err(ReconcileError::Malformed {
                    upstream_offset: base_offset,
                    what: "v2 batch shorter than its header",
                });
            }
            let last_offset_delta = i32::from_be_bytes(entry[23..27].try_into().expect("4 bytes"));
            if last_offset_delta < 0 {
                return Err(ReconcileError::Malformed {
                    upstream_offset: base_offset,
                    what: "negative lastOffsetDelta",
                });
            }
            let Some(next_upstream_offset) = base_offset.checked_add(i64::from(last_offset_delta) + 1) else {
                return Err(ReconcileError::Malformed { upstream_offset: base_offset, what: "offsets overflow" });
            };
            let batch = FoundBatch {
                upstream_offset: base_offset,
                next_upstream_offset,
                producer: ProducerIdentity {
                    id: i64::from_be_bytes(entry[43..51].try_into().expect("8 bytes")),
                    epoch: i16::from_be_bytes(entry[51..53].try_into().expect("2 bytes")),
                },
                base_sequence: i32::from_be_bytes(entry[53..57].try_into().expect("4 bytes")),
                last_offset_delta,
            };
            parsed.entries.push(Entry {
                first_offset: base_offset,
                next_offset: next_upstream_offset,
                batch: Some(batch),
            });
        } else {
            // Magic 0/1 message (or wrapper): its offset is its last offset.
            let Some(next) = base_offset.checked_add(1) else {
                return Err(ReconcileError::Malformed { upstream_offset: base_offset, what: "offsets overflow" });
            };
            parsed.entries.push(Entry { first_offset: base_offset, next_offset: next, batch: None });
        }
        at += total;
    }
    Ok(parsed)
}

/// The v2 batches of a Fetch response's records bytes and the offset after the last
/// complete entry (`None` when there was none), as `parse_entries` reads them.
pub fn parse_records(bytes: &[u8]) -> Result<(Vec<FoundBatch>, Option<i64>), ReconcileError> {
    let parsed = parse_entries(bytes)?;
    let next = parsed.entries.last().map(|entry| entry.next_offset);
    Ok((parsed.entries.into_iter().filter_map(|entry| entry.batch).collect(), next))
}

/// A forward scan of the upstream partition, driven by the shell: fetch what
/// `next_fetch()` says, hand the answer to `handle_fetch`, until `is_done()`.
///
/// The rule it keeps: every upstream offset from the scan point to the high
/// watermark is held by an entry the scan saw, so counting our records from the scan
/// point (`decide_by_count`) never skips one. An entry may start below the fetch
/// offset (Kafka answers the whole batch holding it) and may be a batch the broker
/// rebuilt (tansu's SQLite storage); an offset below the high watermark that the
/// answer does not hold ends the scan with `NotReadable`, which another scan, later
/// or from an earlier point (`ScanPlan`), resolves. Each answer moves the fetch offset
/// forward, grows the fetch size (bounded), or ends the scan, so it terminates.
#[derive(Debug, Clone)]
pub struct Scan {
    producer: ProducerIdentity,
    scan_from: i64,
    next_fetch_offset: i64,
    fetch_bytes: usize,
    bytes_max: u64,
    bytes_read: u64,
    high_watermark: Option<i64>,
    ours: Vec<FoundBatch>,
    done: bool,
}

/// Our batches kept during a scan: far more than can be in doubt, bounded anyway.
pub const SCAN_OURS_MAX: usize = 4096;

impl Scan {
    pub fn new(producer: ProducerIdentity, plan: ScanPlan) -> Scan {
        assert!(0 <= plan.fetch_from_offset && plan.fetch_from_offset <= plan.scan_from_offset);
        assert!((1..=SCAN_FETCH_BYTES_MAX).contains(&plan.fetch_bytes));
        Scan {
            producer,
            scan_from: plan.scan_from_offset,
            next_fetch_offset: plan.fetch_from_offset,
            fetch_bytes: plan.fetch_bytes,
            bytes_max: plan.bytes_max,
            bytes_read: 0,
            high_watermark: None,
            ours: Vec::new(),
            done: false,
        }
    }

    /// The next Fetch: its offset and its `max_bytes`.
    pub fn next_fetch(&self) -> Option<(i64, usize)> {
        (!self.done).then_some((self.next_fetch_offset, self.fetch_bytes))
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The records bytes and high watermark of one Fetch as `next_fetch()` asked.
    pub fn handle_fetch(&mut self, records: &[u8], high_watermark: i64) -> Result<(), ReconcileError> {
        assert!(!self.done);
        self.high_watermark = Some(high_watermark);
        if high_watermark < self.scan_from {
            return Err(ReconcileError::UpstreamBehind { scan_from: self.scan_from, high_watermark });
        }
        if self.next_fetch_offset >= high_watermark {
            self.done = true;
            return Ok(());
        }
        self.bytes_read += records.len() as u64;
        let parsed = parse_entries(records)?;
        let mut position = self.next_fetch_offset;
        let mut gap = false;
        for entry in &parsed.entries {
            if entry.next_offset <= position {
                continue; // wholly before the fetch offset
            }
            if entry.first_offset > position.max(self.scan_from) {
                gap = true; // offsets the broker counts but did not answer
                break;
            }
            if let Some(batch) = entry.batch.filter(|batch| batch.producer == self.producer) {
                if self.ours.len() == SCAN_OURS_MAX {
                    self.ours.remove(0); // only the latest matter; the earliest are long acked
                }
                self.ours.push(batch);
            }
            position = entry.next_offset;
        }
        if position > self.next_fetch_offset {
            self.next_fetch_offset = position;
        } else if !gap && parsed.partial_entry_bytes.is_some() && self.fetch_bytes < SCAN_FETCH_BYTES_MAX {
            // Only part of the first entry came back (max_bytes smaller than it):
            // ask again for at least all of it.
            let needed = parsed.partial_entry_bytes.expect("checked");
            if needed > SCAN_FETCH_BYTES_MAX {
                return Err(ReconcileError::EntryTooLarge { at: self.next_fetch_offset, bytes: needed });
            }
            self.fetch_bytes = needed.max(self.fetch_bytes * 2).min(SCAN_FETCH_BYTES_MAX);
        } else {
            return Err(ReconcileError::NotReadable {
                scan_from: self.scan_from,
                at: self.next_fetch_offset,
                high_watermark,
            });
        }
        if self.next_fetch_offset >= high_watermark {
            self.done = true;
        } else if self.bytes_read > self.bytes_max {
            return Err(ReconcileError::TooLong { scan_from: self.scan_from, bytes: self.bytes_read });
        }
        Ok(())
    }

    /// Batches of our producer seen so far, in upstream order.
    pub fn ours(&self) -> &[FoundBatch] {
        &self.ours
    }
}

/// Where shipping resumes after reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub cursor_offset: i64,
    pub upstream_scan_from_offset: i64,
    /// The local offset of our first record at or after `upstream_scan_from_offset`,
    /// when known (see `ShipState::upstream_scan_from_local_offset`).
    pub upstream_scan_from_local_offset: Option<i64>,
    /// Batches found upstream beyond the persisted cursor (they were in doubt).
    pub batches_recovered: usize,
    /// Batches of ours whose base sequence the broker did not keep (it answered 0):
    /// tansu's SQLite storage rebuilds fetched batches from stored rows. Counting
    /// still places them; their sequences could not be checked.
    pub sequences_unchecked: usize,
}

/// Decides the cursor by counting our records upstream from the scan point, whose
/// local offset is known: our records there are `scan_from_local_offset` and the
/// offsets after it, in order, because one producer's batches are appended in
/// sequence order with no gap. This holds however the broker regroups records into
/// batches when it answers a Fetch, and it never needs a sequence's wrap resolved.
/// Where the broker kept a batch's base sequence it must agree with the count.
pub fn decide_by_count(
    producer: ProducerIdentity,
    epoch_start_offset: i64,
    cursor_offset: i64,
    upstream_scan_from_offset: i64,
    scan_from_local_offset: i64,
    log_end_offset: i64,
    ours: &[FoundBatch],
) -> Result<Reconciled, ReconcileError> {
    assert!(epoch_start_offset <= scan_from_local_offset && scan_from_local_offset <= cursor_offset);
    let mut reconciled = Reconciled {
        cursor_offset,
        upstream_scan_from_offset,
        upstream_scan_from_local_offset: Some(scan_from_local_offset),
        batches_recovered: 0,
        sequences_unchecked: 0,
    };
    let mut next_local = scan_from_local_offset;
    let mut next_upstream = upstream_scan_from_offset;
    for batch in ours.iter().filter(|batch| batch.producer == producer) {
        if batch.next_upstream_offset <= next_upstream {
            continue; // before the scan point, or a batch answered twice
        }
        let first_upstream = batch.upstream_offset.max(next_upstream);
        if batch.upstream_offset == first_upstream {
            let expected = Sequence::of_offset(next_local, epoch_start_offset);
            if batch.base_sequence != expected.0 {
                if batch.base_sequence != 0 {
                    return Err(ReconcileError::SequenceMismatch {
                        upstream_offset: batch.upstream_offset,
                        found: batch.base_sequence,
                        expected: expected.0,
                    });
                }
                reconciled.sequences_unchecked += 1;
            }
        }
        let count = batch.next_upstream_offset - first_upstream;
        let local_first = next_local;
        next_local += count;
        next_upstream = batch.next_upstream_offset;
        if next_local > log_end_offset {
            return Err(ReconcileError::UpstreamAheadOfLog {
                upstream_offset: batch.upstream_offset,
                local_last_offset: next_local - 1,
                log_end_offset,
            });
        }
        if next_local > cursor_offset {
            if local_first >= cursor_offset {
                reconciled.batches_recovered += 1;
            }
            reconciled.cursor_offset = next_local;
        }
        reconciled.upstream_scan_from_offset = next_upstream;
        reconciled.upstream_scan_from_local_offset = Some(next_local);
    }
    Ok(reconciled)
}

/// Decides the cursor from the batches of ours found upstream.
pub fn decide(
    producer: ProducerIdentity,
    epoch_start_offset: i64,
    cursor_offset: i64,
    upstream_scan_from_offset: i64,
    log_end_offset: i64,
    ours: &[FoundBatch],
) -> Result<Reconciled, ReconcileError> {
    let mut reconciled = Reconciled {
        cursor_offset,
        upstream_scan_from_offset,
        upstream_scan_from_local_offset: None,
        batches_recovered: 0,
        sequences_unchecked: 0,
    };
    for batch in ours.iter().filter(|batch| batch.producer == producer) {
        if batch.base_sequence < 0 {
            return Err(ReconcileError::Malformed {
                upstream_offset: batch.upstream_offset,
                what: "negative base sequence of an idempotent batch",
            });
        }
        let base = Sequence(batch.base_sequence);
        let last = base.plus(i64::from(batch.last_offset_delta));
        let local_last = offset_near(last, epoch_start_offset, cursor_offset);
        let local_first = local_last - i64::from(batch.last_offset_delta);
        if local_last < cursor_offset {
            continue; // acknowledged before the cursor was persisted
        }
        if local_first < cursor_offset {
            return Err(ReconcileError::StraddlesCursor {
                upstream_offset: batch.upstream_offset,
                local_first_offset: local_first,
                local_last_offset: local_last,
                cursor_offset,
            });
        }
        if local_last >= log_end_offset {
            return Err(ReconcileError::UpstreamAheadOfLog {
                upstream_offset: batch.upstream_offset,
                local_last_offset: local_last,
                log_end_offset,
            });
        }
        reconciled.batches_recovered += 1;
        if local_last + 1 > reconciled.cursor_offset {
            reconciled.cursor_offset = local_last + 1;
            reconciled.upstream_scan_from_offset = reconciled.upstream_scan_from_offset.max(batch.next_upstream_offset);
            reconciled.upstream_scan_from_local_offset = Some(local_last + 1);
        }
    }
    Ok(reconciled)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::log::batch::{self, Record};
    use crate::ship::coalesce::{build, StoredBatch};

    const OURS: ProducerIdentity = ProducerIdentity { id: 9, epoch: 0 };
    const OTHER: ProducerIdentity = ProducerIdentity { id: 10, epoch: 0 };

    /// An upstream batch as a broker would hold it: our stamped batch with the broker's
    /// base offset written in.
    fn upstream_batch(
        upstream_offset: i64,
        local_first: i64,
        count: usize,
        producer: ProducerIdentity,
        epoch_start: i64,
    ) -> Vec<u8> {
        let records: Vec<Record> = (0..count)
            .map(|index| Record {
                timestamp_ms: index as i64,
                key: None,
                value: Some(Bytes::from_static(b"v")),
                headers: vec![],
            })
            .collect();
        let stored = StoredBatch::new(Bytes::from(batch::encode_to_vec(local_first, &records))).unwrap();
        let mut bytes = build(&[stored], producer, epoch_start).unwrap().bytes.to_vec();
        bytes[0..8].copy_from_slice(&upstream_offset.to_be_bytes());
        bytes
    }

    #[test]
    fn parse_records_finds_v2_headers_and_stops_at_a_partial_entry() {
        let mut bytes = upstream_batch(500, 40, 3, OURS, 0);
        bytes.extend(upstream_batch(503, 0, 2, OTHER, 0));
        let partial = upstream_batch(505, 43, 2, OURS, 0);
        bytes.extend(&partial[..partial.len() - 1]);
        let (found, next) = parse_records(&bytes).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].upstream_offset, 500);
        assert_eq!(found[0].base_sequence, 40);
        assert_eq!(found[0].last_offset_delta, 2);
        assert_eq!(found[1].producer, OTHER);
        assert_eq!(next, Some(505));
        assert_eq!(parse_records(&partial[..20]).unwrap(), (vec![], None));
    }

    #[test]
    fn parse_records_ends_at_an_entry_that_goes_back_and_refuses_overflow() {
        let mut backwards = upstream_batch(500, 40, 3, OURS, 0);
        backwards.extend(upstream_batch(502, 43, 2, OURS, 0)); // starts inside 500..=502
        let (found, next) = parse_records(&backwards).unwrap();
        assert_eq!((found.len(), next), (1, Some(503)), "the answer is read up to where it goes back");
        let negative = upstream_batch(-5, 40, 3, OURS, 0);
        assert!(matches!(parse_records(&negative), Err(ReconcileError::Malformed { upstream_offset: -5, .. })));
        let overflowing = upstream_batch(i64::MAX - 1, 40, 3, OURS, 0);
        assert!(matches!(parse_records(&overflowing), Err(ReconcileError::Malformed { what: "offsets overflow", .. })));
        // Adjacent and gapped (compacted) entries are fine.
        let mut gapped = upstream_batch(500, 40, 3, OURS, 0);
        gapped.extend(upstream_batch(503, 43, 2, OURS, 0));
        gapped.extend(upstream_batch(900, 45, 1, OURS, 0));
        assert_eq!(parse_records(&gapped).unwrap().1, Some(901));
    }

    #[test]
    fn parse_records_skips_old_magic_messages() {
        // A magic-1 message: offset, size, crc, magic 1, attributes, timestamp, key, value.
        let mut message = Vec::new();
        message.extend_from_slice(&7i64.to_be_bytes());
        let body: Vec<u8> = [0u8, 0, 0, 0, 1, 0]
            .iter()
            .copied()
            .chain(0i64.to_be_bytes())
            .chain((-1i32).to_be_bytes())
            .chain((-1i32).to_be_bytes())
            .collect();
        message.extend_from_slice(&(body.len() as i32).to_be_bytes());
        message.extend_from_slice(&body);
        let (found, next) = parse_records(&message).unwrap();
        assert!(found.is_empty());
        assert_eq!(next, Some(8));
    }

    fn plan(scan_from_offset: i64, bytes_max: u64) -> ScanPlan {
        ScanPlan::for_attempt(scan_from_offset, 0, bytes_max)
    }

    #[test]
    fn the_scan_keeps_only_our_batches_and_ends_at_the_high_watermark() {
        let mut scan = Scan::new(OURS, plan(100, 1 << 20));
        let mut chunk = upstream_batch(100, 0, 5, OTHER, 0);
        chunk.extend(upstream_batch(105, 10, 2, OURS, 10));
        scan.handle_fetch(&chunk, 110).unwrap();
        assert_eq!(scan.next_fetch(), Some((107, SCAN_FETCH_BYTES_MIN)));
        scan.handle_fetch(&upstream_batch(107, 12, 3, OURS, 10), 110).unwrap();
        assert!(scan.is_done());
        assert_eq!(scan.ours().len(), 2);
    }

    #[test]
    fn an_empty_upstream_at_the_scan_point_is_done_at_once() {
        let mut scan = Scan::new(OURS, plan(40, 1 << 20));
        scan.handle_fetch(&[], 40).unwrap();
        assert!(scan.is_done());
    }

    #[test]
    fn the_scan_refuses_an_upstream_that_lost_data() {
        let mut scan = Scan::new(OURS, plan(40, 1 << 20));
        assert!(matches!(scan.handle_fetch(&[], 10), Err(ReconcileError::UpstreamBehind { .. })));
    }

    #[test]
    fn the_scan_ends_retriably_without_progress_and_for_good_past_its_byte_budget() {
        let mut scan = Scan::new(OURS, plan(0, 1 << 20));
        let error = scan.handle_fetch(&[], 10).unwrap_err();
        assert_eq!(error, ReconcileError::NotReadable { scan_from: 0, at: 0, high_watermark: 10 });
        assert!(error.is_retriable());
        let mut scan = Scan::new(OURS, plan(0, 10));
        assert!(matches!(
            scan.handle_fetch(&upstream_batch(0, 0, 1, OTHER, 0), 10),
            Err(ReconcileError::TooLong { .. })
        ));
        assert!(!ReconcileError::TooLong { scan_from: 0, bytes: 11 }.is_retriable());
    }

    // ----- the ways brokers answer a Fetch (issue 19) -----

    #[test]
    fn a_batch_starting_below_the_fetch_offset_covers_it() {
        // Kafka answers the whole batch holding the fetch offset.
        let mut scan = Scan::new(OURS, plan(105, 1 << 20));
        let mut answer = upstream_batch(100, 20, 10, OURS, 0);
        answer.extend(upstream_batch(110, 30, 2, OURS, 0));
        scan.handle_fetch(&answer, 112).unwrap();
        assert!(scan.is_done());
        assert_eq!(scan.ours().len(), 2);
    }

    #[test]
    fn an_offset_the_answer_skips_is_not_readable_and_an_earlier_point_reaches_it() {
        // tansu's memory storage answers only batches whose base offset is at or after
        // the fetch offset: a scan point inside a batch gets the batch after it.
        let mut stored = upstream_batch(100, 20, 10, OURS, 0);
        stored.extend(upstream_batch(110, 30, 2, OURS, 0));
        let first_batch_bytes = upstream_batch(100, 20, 10, OURS, 0).len();
        let answer_from =
            |offset: i64| -> Vec<u8> { stored[if offset <= 100 { 0 } else { first_batch_bytes }..].to_vec() };
        for attempt in 0..SCAN_ATTEMPTS_AT_THE_SCAN_POINT {
            let plan = ScanPlan::for_attempt(105, attempt, 1 << 20);
            assert_eq!(plan.fetch_from_offset, 105);
            let mut scan = Scan::new(OURS, plan);
            let error = scan.handle_fetch(&answer_from(105), 112).unwrap_err();
            assert_eq!(error, ReconcileError::NotReadable { scan_from: 105, at: 105, high_watermark: 112 });
        }
        let plan = ScanPlan::for_attempt(105, SCAN_ATTEMPTS_AT_THE_SCAN_POINT, 1 << 20);
        assert_eq!(plan.fetch_from_offset, 105 - SCAN_STEP_BACK_RECORDS_MIN);
        let mut scan = Scan::new(OURS, plan);
        scan.handle_fetch(&answer_from(plan.fetch_from_offset), 112).unwrap();
        assert!(scan.is_done());
        // Counting from the scan point clips the batch that holds it.
        let reconciled = decide_by_count(OURS, 0, 25, 105, 25, 40, scan.ours()).unwrap();
        assert_eq!(reconciled.cursor_offset, 32);
    }

    #[test]
    fn a_gap_below_the_scan_point_is_no_concern_but_one_above_it_is() {
        let mut scan = Scan::new(OURS, ScanPlan::for_attempt(105, SCAN_ATTEMPTS_AT_THE_SCAN_POINT, 1 << 20));
        // Fetch from 89: the answer starts at 100 (a gap below the scan point 105).
        scan.handle_fetch(&upstream_batch(100, 20, 10, OURS, 0), 120).unwrap();
        assert_eq!(scan.next_fetch().map(|(offset, _)| offset), Some(110));
        // From 110 the answer starts at 113: 110..113 are counted but not answered.
        assert!(matches!(
            scan.handle_fetch(&upstream_batch(113, 33, 2, OURS, 0), 120),
            Err(ReconcileError::NotReadable { at: 110, .. })
        ));
    }

    #[test]
    fn an_answer_that_repeats_its_tail_is_read_up_to_where_it_goes_back() {
        // tansu's memory storage after a gap: batches 100, 103, then 103 again.
        let mut answer = upstream_batch(100, 20, 3, OURS, 0);
        answer.extend(upstream_batch(103, 23, 2, OURS, 0));
        answer.extend(upstream_batch(103, 23, 2, OURS, 0));
        let mut scan = Scan::new(OURS, plan(100, 1 << 20));
        scan.handle_fetch(&answer, 110).unwrap();
        assert_eq!(scan.ours().len(), 2);
        assert_eq!(scan.next_fetch().map(|(offset, _)| offset), Some(105));
    }

    #[test]
    fn a_batch_rebuilt_from_the_fetch_offset_covers_it() {
        // tansu's SQLite storage answers rows from the fetch offset exactly, rebuilt.
        let mut scan = Scan::new(OURS, plan(105, 1 << 20));
        let mut rebuilt = upstream_batch(105, 25, 7, OURS, 0);
        rebuilt[53..57].fill(0);
        scan.handle_fetch(&rebuilt, 112).unwrap();
        assert!(scan.is_done());
        let reconciled = decide_by_count(OURS, 0, 25, 105, 25, 40, scan.ours()).unwrap();
        assert_eq!((reconciled.cursor_offset, reconciled.sequences_unchecked), (32, 1));
    }

    #[test]
    fn a_partial_first_entry_asks_again_for_all_of_it() {
        let whole = upstream_batch(100, 20, 3, OURS, 0);
        let mut scan = Scan::new(OURS, plan(100, 1 << 30));
        scan.handle_fetch(&whole[..40], 103).unwrap();
        assert_eq!(scan.next_fetch(), Some((100, SCAN_FETCH_BYTES_MIN * 2)));
        scan.handle_fetch(&whole, 103).unwrap();
        assert!(scan.is_done());
        // One that no fetch may hold stops the scan.
        let mut huge = whole.clone();
        huge[8..12].copy_from_slice(&(SCAN_FETCH_BYTES_MAX as i32).to_be_bytes());
        let mut scan = Scan::new(OURS, plan(100, 1 << 30));
        assert!(matches!(scan.handle_fetch(&huge[..40], 103), Err(ReconcileError::EntryTooLarge { at: 100, .. })));
        // A broker that keeps answering part of it: the fetch size grows to its bound,
        // then the scan ends retriably.
        let mut scan = Scan::new(OURS, plan(100, 1 << 30));
        let mut fetches = 0;
        let error = loop {
            fetches += 1;
            if let Err(error) = scan.handle_fetch(&whole[..40], 103) {
                break error;
            }
        };
        assert!(error.is_retriable());
        assert!(fetches <= 8, "{fetches} fetches");
    }

    #[test]
    fn later_attempts_start_earlier_with_larger_fetches_within_bounds() {
        let first = ScanPlan::for_attempt(1000, 0, 1 << 30);
        assert_eq!((first.fetch_from_offset, first.fetch_bytes), (1000, SCAN_FETCH_BYTES_MIN));
        let mut previous = first;
        for attempt in 1..200 {
            let plan = ScanPlan::for_attempt(1000, attempt, 1 << 30);
            assert!(plan.fetch_from_offset <= previous.fetch_from_offset && plan.fetch_from_offset >= 0);
            assert!(plan.fetch_bytes >= previous.fetch_bytes && plan.fetch_bytes <= SCAN_FETCH_BYTES_MAX);
            assert_eq!(plan.scan_from_offset, 1000);
            previous = plan;
        }
        assert_eq!(previous.fetch_from_offset, 0);
        assert!(ReconcileError::UpstreamBehind { scan_from: 5, high_watermark: 1 }.is_retriable());
    }

    fn found(upstream_offset: i64, local_first: i64, count: i32, epoch_start: i64) -> FoundBatch {
        FoundBatch {
            upstream_offset,
            next_upstream_offset: upstream_offset + i64::from(count),
            producer: OURS,
            base_sequence: Sequence::of_offset(local_first, epoch_start).0,
            last_offset_delta: count - 1,
        }
    }

    #[test]
    fn decide_moves_the_cursor_past_in_doubt_batches_found_upstream() {
        // Persisted cursor 20; upstream holds our batches 10..20 (acked), 20..25, 25..27.
        let ours = [found(300, 10, 10, 0), found(310, 20, 5, 0), found(315, 25, 2, 0)];
        let reconciled = decide(OURS, 0, 20, 300, 40, &ours).unwrap();
        assert_eq!(
            reconciled,
            Reconciled {
                cursor_offset: 27,
                upstream_scan_from_offset: 317,
                upstream_scan_from_local_offset: Some(27),
                batches_recovered: 2,
                sequences_unchecked: 0,
            }
        );
    }

    #[test]
    fn decide_keeps_the_cursor_when_nothing_in_doubt_arrived() {
        let reconciled = decide(OURS, 0, 20, 300, 40, &[found(300, 10, 10, 0)]).unwrap();
        assert_eq!(
            reconciled,
            Reconciled {
                cursor_offset: 20,
                upstream_scan_from_offset: 300,
                upstream_scan_from_local_offset: None,
                batches_recovered: 0,
                sequences_unchecked: 0,
            }
        );
    }

    #[test]
    fn decide_ignores_other_producers_and_other_epochs() {
        let mut other = found(310, 20, 5, 0);
        other.producer = ProducerIdentity { id: 9, epoch: 1 };
        let reconciled = decide(OURS, 0, 20, 300, 40, &[other]).unwrap();
        assert_eq!(reconciled.cursor_offset, 20);
    }

    #[test]
    fn decide_refuses_upstream_data_beyond_the_local_log() {
        let result = decide(OURS, 0, 20, 300, 22, &[found(310, 20, 5, 0)]);
        assert!(matches!(result, Err(ReconcileError::UpstreamAheadOfLog { .. })));
    }

    #[test]
    fn decide_refuses_a_batch_straddling_the_cursor() {
        let result = decide(OURS, 0, 22, 300, 40, &[found(310, 20, 5, 0)]);
        assert!(matches!(result, Err(ReconcileError::StraddlesCursor { .. })));
    }

    #[test]
    fn decide_works_across_the_sequence_wrap() {
        let epoch_start = 5;
        let cursor = epoch_start + (1i64 << 31) - 2; // sequence 2^31 - 2
        let ours = [found(1000, cursor, 4, epoch_start)]; // sequences wrap inside the batch
        assert_eq!(ours[0].base_sequence, i32::MAX - 1);
        let reconciled = decide(OURS, epoch_start, cursor, 900, cursor + 10, &ours).unwrap();
        assert_eq!(reconciled.cursor_offset, cursor + 4);
    }

    // ----- counting from a known scan point -----

    /// A batch as tansu's SQLite storage answers a Fetch: rebuilt from stored rows,
    /// consecutive records of one producer merged, base sequence 0.
    fn rebuilt(upstream_offset: i64, count: i32) -> FoundBatch {
        FoundBatch {
            upstream_offset,
            next_upstream_offset: upstream_offset + i64::from(count),
            producer: OURS,
            base_sequence: 0,
            last_offset_delta: count - 1,
        }
    }

    #[test]
    fn counting_moves_the_cursor_past_in_doubt_records() {
        // Scan point: upstream 300 is local 10; cursor 20 (records 10..20 were acked
        // without an upstream offset, so the scan point stayed behind).
        let ours = [found(300, 10, 10, 0), found(310, 20, 5, 0), found(315, 25, 2, 0)];
        let reconciled = decide_by_count(OURS, 0, 20, 300, 10, 40, &ours).unwrap();
        assert_eq!(
            reconciled,
            Reconciled {
                cursor_offset: 27,
                upstream_scan_from_offset: 317,
                upstream_scan_from_local_offset: Some(27),
                batches_recovered: 2,
                sequences_unchecked: 0,
            }
        );
    }

    #[test]
    fn counting_places_batches_a_broker_rebuilt_without_their_sequences() {
        // The sequence-based decision takes these for long-acked batches (sequence 0
        // is near the epoch start) and would resend records the broker holds; tansu
        // then answers DUPLICATE_SEQUENCE_NUMBER for a batch that is only partly there.
        let ours = [rebuilt(300, 17)];
        assert_eq!(decide(OURS, 0, 20, 300, 40, &ours).unwrap().cursor_offset, 20);
        let reconciled = decide_by_count(OURS, 0, 20, 300, 10, 40, &ours).unwrap();
        assert_eq!(reconciled.cursor_offset, 27);
        assert_eq!(reconciled.upstream_scan_from_offset, 317);
        assert_eq!(reconciled.upstream_scan_from_local_offset, Some(27));
        assert_eq!(reconciled.sequences_unchecked, 1);
    }

    #[test]
    fn counting_skips_other_producers_between_ours() {
        let mut other = found(305, 0, 50, 0);
        other.producer = OTHER;
        let ours = [rebuilt(300, 5), other, rebuilt(355, 4)];
        let reconciled = decide_by_count(OURS, 0, 12, 300, 10, 40, &ours).unwrap();
        assert_eq!(reconciled.cursor_offset, 19);
        assert_eq!(reconciled.upstream_scan_from_offset, 359);
    }

    #[test]
    fn counting_keeps_the_cursor_when_only_acked_records_are_upstream() {
        let reconciled = decide_by_count(OURS, 0, 20, 300, 10, 40, &[found(300, 10, 10, 0)]).unwrap();
        assert_eq!(reconciled.cursor_offset, 20);
        assert_eq!(reconciled.batches_recovered, 0);
        assert_eq!(reconciled.upstream_scan_from_offset, 310);
        assert_eq!(reconciled.upstream_scan_from_local_offset, Some(20));
    }

    #[test]
    fn counting_clips_a_batch_that_starts_before_the_scan_point() {
        // A broker that regroups may answer a batch reaching back before the scan point.
        let reconciled = decide_by_count(OURS, 0, 10, 300, 10, 40, &[rebuilt(295, 8)]).unwrap();
        assert_eq!(reconciled.cursor_offset, 13);
    }

    #[test]
    fn counting_refuses_a_kept_sequence_that_disagrees() {
        let result = decide_by_count(OURS, 0, 20, 300, 10, 40, &[found(300, 11, 10, 0)]);
        assert_eq!(result, Err(ReconcileError::SequenceMismatch { upstream_offset: 300, found: 11, expected: 10 }));
    }

    #[test]
    fn counting_refuses_upstream_records_beyond_the_local_log() {
        let result = decide_by_count(OURS, 0, 20, 300, 20, 22, &[rebuilt(300, 5)]);
        assert!(matches!(result, Err(ReconcileError::UpstreamAheadOfLog { .. })));
    }

    #[test]
    fn counting_works_across_the_sequence_wrap() {
        let epoch_start = 5;
        let cursor = epoch_start + (1i64 << 31) - 2;
        let ours = [found(1000, cursor, 4, epoch_start), found(1004, cursor + 4, 3, epoch_start)];
        assert_eq!(ours[1].base_sequence, 2);
        let reconciled = decide_by_count(OURS, epoch_start, cursor, 1000, cursor, cursor + 10, &ours).unwrap();
        assert_eq!(reconciled.cursor_offset, cursor + 7);
    }
}
