//! The recovery scan: walks batches from a known-good position and finds where the
//! valid log ends, as pure code over windows of bytes the shell reads.
//!
//! Invariant kept: the log is every valid, offset-contiguous batch from the segment's
//! base. When the scan meets bytes that are not the next batch, it must tell a torn tail
//! (the last flush did not complete: cut it) from corruption before the tail (refuse).
//! A flush writes exactly one batch, so a torn tail is at most one batch long: if any
//! valid batch with a later offset starts within `BATCH_BYTES_MAX` after the bad bytes,
//! the bad bytes are not the tail.

use super::batch::{check_batch, parse_header, BatchError, BatchHeader, BATCH_BYTES_MAX, BATCH_HEADER_BYTES};
use super::index::{IndexEntry, INDEX_ENTRY_BYTES};
use super::segment;

/// Where the scan stands: the next batch is expected at `position` with `next_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanCursor {
    pub position: u64,
    pub next_offset: i64,
    pub batches: u64,
    pub records: u64,
}

/// Why the bytes at a position are not the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBatch {
    #[error("{0}")]
    Batch(#[from] BatchError),
    #[error("offset gap: expected base offset {expected}, found {found}")]
    OffsetGap { expected: i64, found: i64 },
}

impl InvalidBatch {
    /// All-zero bytes where a batch header would be: the clean end of written data.
    pub fn is_zero_length(&self) -> bool {
        matches!(self, InvalidBatch::Batch(BatchError::BadLength { length: 0 }))
    }
}

/// How a window's scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// The window ended inside or before a batch; read on from `cursor.position`.
    NeedMore,
    /// The bytes at `cursor.position` are not the next batch.
    Invalid(InvalidBatch),
}

/// Scans the complete batches in `window`, which holds file bytes starting at
/// `window_position` (`<= cursor.position`). `at_end` says the window reaches the end of
/// the file. Calls `on_batch(position, header)` for each valid batch.
pub fn scan_window(
    window: &[u8],
    window_position: u64,
    at_end: bool,
    cursor: &mut ScanCursor,
    mut on_batch: impl FnMut(u64, &BatchHeader),
) -> ScanStop {
    assert!(cursor.position >= window_position);
    loop {
        let start = (cursor.position - window_position) as usize;
        if start >= window.len() {
            return ScanStop::NeedMore;
        }
        let bytes = &window[start..];
        let result = check_batch(bytes);
        match result {
            Ok(header) => {
                if header.base_offset != cursor.next_offset {
                    return ScanStop::Invalid(InvalidBatch::OffsetGap {
                        expected: cursor.next_offset,
                        found: header.base_offset,
                    });
                }
                on_batch(cursor.position, &header);
                cursor.position += header.total_bytes() as u64;
                cursor.next_offset = header.next_offset();
                cursor.batches += 1;
                cursor.records += header.record_count as u64;
            }
            Err(BatchError::Truncated { .. }) if !at_end => return ScanStop::NeedMore,
            Err(error) => return ScanStop::Invalid(error.into()),
        }
    }
}

/// Bytes a window must hold so that any single batch fits in it.
pub const SCAN_WINDOW_BYTES: usize = BATCH_BYTES_MAX + BATCH_HEADER_BYTES;

/// Searches `window` (file bytes from `window_position`, which holds the bad bytes at
/// its start) for a valid batch at any position after the start whose base offset is
/// at least `min_offset`: evidence that the bad bytes are not a torn tail. Returns the
/// position of the first such batch.
pub fn find_later_batch(window: &[u8], window_position: u64, min_offset: i64) -> Option<u64> {
    let magic_at = 16;
    (1..window.len().saturating_sub(BATCH_HEADER_BYTES - 1)).find_map(|start| {
        if window[start + magic_at] != 2 {
            return None;
        }
        match check_batch(&window[start..]) {
            Ok(header) if header.base_offset >= min_offset => Some(window_position + start as u64),
            _ => None,
        }
    })
}

// ----- the recovery plan: what the shell does with what it read -----

/// A partition directory's files, sorted into segments and leftovers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryPlan {
    /// Base offsets of the segments (named by their `.log` files), oldest first; the
    /// last is the active segment.
    pub segment_bases: Vec<i64>,
    /// Index files whose log file is gone (retention deleted the log, then the process
    /// stopped before the index): removed.
    pub orphan_indexes: Vec<String>,
}

/// Sorts the names of a partition directory's files.
pub fn plan_directory<'n>(file_names: impl Iterator<Item = &'n str> + Clone) -> DirectoryPlan {
    let mut segment_bases: Vec<i64> = file_names.clone().filter_map(segment::parse_log_file_name).collect();
    segment_bases.sort_unstable();
    let orphan_indexes = file_names
        .filter_map(|name| {
            let stem = name.strip_suffix(".index")?;
            let base = segment::parse_log_file_name(&format!("{stem}.log"))?;
            segment_bases.binary_search(&base).is_err().then(|| name.to_owned())
        })
        .collect();
    DirectoryPlan { segment_bases, orphan_indexes }
}

/// Whether `bytes`, read at an index entry's position, hold the batch the entry names.
/// A hint written without sync can be stale after power loss; such an entry is dropped.
pub fn index_entry_holds(bytes: &[u8], segment_base: i64, entry: IndexEntry) -> bool {
    check_batch(bytes).is_ok_and(|header| header.base_offset == segment_base + i64::from(entry.relative_offset))
}

/// The index entries a scan rebuilds as it walks batches: one at the first batch after
/// every `interval_bytes`, as the flusher adds them (`core::log::partition`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRebuild {
    segment_base: i64,
    start_position: u64,
    interval_bytes: u64,
    pub entries: Vec<IndexEntry>,
    /// Batch bytes since the last entry (or the scan's start).
    pub bytes_since_index: u64,
}

impl IndexRebuild {
    /// A rebuild from `start`, a verified entry (or the segment's start).
    pub fn new(segment_base: i64, start: IndexEntry, interval_bytes: u64) -> IndexRebuild {
        IndexRebuild {
            segment_base,
            start_position: u64::from(start.position),
            interval_bytes,
            entries: Vec::new(),
            bytes_since_index: 0,
        }
    }

    /// The scan passed a valid batch at `position`.
    pub fn observe(&mut self, position: u64, header: &BatchHeader) {
        if position > 0 && self.bytes_since_index >= self.interval_bytes && position != self.start_position {
            self.entries.push(IndexEntry {
                relative_offset: u32::try_from(header.base_offset - self.segment_base)
                    .expect("segment offsets fit u32"),
                position: u32::try_from(position).expect("segment positions fit u32"),
            });
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += header.total_bytes() as u64;
    }
}

/// A sealed segment must be whole: its batches end exactly at its size, and exactly
/// where the next segment begins. Returns why not.
pub fn check_sealed(end: &ScanCursor, file_bytes: u64, next_base: i64) -> Result<(), String> {
    if end.position != file_bytes || end.next_offset != next_base {
        return Err(format!(
            "ends at offset {} (byte {}) but the next segment starts at offset {next_base}",
            end.next_offset, end.position
        ));
    }
    Ok(())
}

/// What recovery does where the active segment's valid batches stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailPlan {
    /// Only zeros follow: the clean end of written data.
    Keep,
    /// A torn tail (the last flush, never acknowledged): zero `garbage_bytes` bytes from
    /// `position` and sync. Its header, when readable, says how many records it held.
    Cut { position: u64, garbage_bytes: u64, torn_records: Option<i32> },
    /// A valid later batch follows the bad bytes: corruption before the tail. Refuse.
    Refuse { later_batch_position: u64 },
}

/// Plans the cut at `stop_position`, where the scan met bytes that are not the next
/// batch; `after` holds the file's bytes from there (up to `SCAN_WINDOW_BYTES`).
pub fn plan_tail(after: &[u8], stop_position: u64, next_offset: i64) -> TailPlan {
    if let Some(later_batch_position) = find_later_batch(after, stop_position, next_offset) {
        return TailPlan::Refuse { later_batch_position };
    }
    let garbage_bytes = after.iter().rposition(|byte| *byte != 0).map_or(0, |last| last + 1);
    if garbage_bytes == 0 {
        return TailPlan::Keep;
    }
    let torn_records = parse_header(after).ok().map(|header| header.record_count);
    TailPlan::Cut { position: stop_position, garbage_bytes: garbage_bytes as u64, torn_records }
}

/// An index file's bytes holding exactly `entries`.
pub fn index_file_bytes(entries: &[IndexEntry]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(entries.len() * INDEX_ENTRY_BYTES);
    for entry in entries {
        bytes.extend_from_slice(&entry.encode());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{encode_to_vec, Record};
    use bytes::Bytes;

    fn batch(base: i64, count: usize) -> Vec<u8> {
        let records: Vec<Record> = (0..count)
            .map(|index| Record {
                timestamp_ms: 1000 + index as i64,
                key: None,
                value: Some(Bytes::from(vec![index as u8; 10])),
                headers: vec![],
            })
            .collect();
        encode_to_vec(base, &records)
    }

    fn log(batches: &[(i64, usize)]) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut positions = Vec::new();
        for (base, count) in batches {
            positions.push(bytes.len() as u64);
            bytes.extend(batch(*base, *count));
        }
        (bytes, positions)
    }

    fn fresh() -> ScanCursor {
        ScanCursor { position: 0, next_offset: 0, batches: 0, records: 0 }
    }

    #[test]
    fn clean_end_on_zeros() {
        let (mut bytes, _) = log(&[(0, 3), (3, 2)]);
        let end = bytes.len() as u64;
        bytes.extend([0u8; 4096]);
        let mut cursor = fresh();
        let stop = scan_window(&bytes, 0, true, &mut cursor, |_, _| {});
        assert_eq!(cursor.position, end);
        assert_eq!(cursor.next_offset, 5);
        assert!(matches!(stop, ScanStop::Invalid(reason) if reason.is_zero_length()));
        assert_eq!(find_later_batch(&bytes[end as usize..], end, 5), None);
    }

    #[test]
    fn window_boundaries_ask_for_more() {
        let (bytes, positions) = log(&[(0, 3), (3, 2), (5, 1)]);
        let mut cursor = fresh();
        let stop = scan_window(&bytes[..positions[2] as usize + 5], 0, false, &mut cursor, |_, _| {});
        assert_eq!(stop, ScanStop::NeedMore);
        assert_eq!(cursor.position, positions[2]);
        let mut torn = cursor;
        let stop =
            scan_window(&bytes[positions[2] as usize..bytes.len() - 1], positions[2], true, &mut torn, |_, _| {});
        assert!(matches!(stop, ScanStop::Invalid(InvalidBatch::Batch(BatchError::Truncated { .. }))));
        assert_eq!(torn.position, positions[2], "a torn last batch is not consumed");
        let stop = scan_window(&bytes[positions[2] as usize..], positions[2], true, &mut cursor, |_, _| {});
        assert_eq!(stop, ScanStop::NeedMore, "the window ends exactly after the last batch");
        assert_eq!(cursor.next_offset, 6);
        assert_eq!(cursor.batches, 3);
    }

    #[test]
    fn mid_log_corruption_has_a_later_batch() {
        let (mut bytes, positions) = log(&[(0, 3), (3, 2), (5, 1)]);
        bytes[positions[1] as usize + 40] ^= 0x10;
        let mut cursor = fresh();
        let stop = scan_window(&bytes, 0, true, &mut cursor, |_, _| {});
        assert!(matches!(stop, ScanStop::Invalid(InvalidBatch::Batch(BatchError::BadCrc { .. }))));
        assert_eq!(cursor.position, positions[1]);
        let later = find_later_batch(&bytes[positions[1] as usize..], positions[1], cursor.next_offset);
        assert_eq!(later, Some(positions[2]));
    }

    #[test]
    fn offset_gap_is_invalid() {
        let (bytes, positions) = log(&[(0, 3), (4, 2)]);
        let mut cursor = fresh();
        let stop = scan_window(&bytes, 0, true, &mut cursor, |_, _| {});
        assert_eq!(stop, ScanStop::Invalid(InvalidBatch::OffsetGap { expected: 3, found: 4 }));
        assert_eq!(cursor.position, positions[1]);
    }

    #[test]
    fn the_directory_plan_orders_segments_and_finds_orphan_indexes() {
        let names = [
            "00000000000000000100.log",
            "00000000000000000000.index",
            "00000000000000000100.index",
            "00000000000000000000.log",
            "00000000000000000050.index",
            "ship.state",
            ".lock",
        ];
        let plan = plan_directory(names.iter().copied());
        assert_eq!(plan.segment_bases, vec![0, 100]);
        assert_eq!(plan.orphan_indexes, vec!["00000000000000000050.index".to_owned()]);
    }

    #[test]
    fn the_tail_plan_keeps_zeros_cuts_a_torn_batch_and_refuses_corruption_before_the_tail() {
        let (bytes, positions) = log(&[(0, 3), (3, 2)]);
        assert_eq!(plan_tail(&[0u8; 100], 500, 5), TailPlan::Keep);
        // The second batch torn in its middle: cut from its start.
        let torn = &bytes[positions[1] as usize..bytes.len() - 7];
        match plan_tail(torn, positions[1], 3) {
            TailPlan::Cut { position, garbage_bytes, torn_records } => {
                assert_eq!((position, garbage_bytes, torn_records), (positions[1], torn.len() as u64, Some(2)));
            }
            other => panic!("{other:?}"),
        }
        // Garbage followed by a valid later batch is not a tail.
        let mut corrupt = vec![0xAB; 40];
        corrupt.extend(batch(3, 2));
        assert_eq!(plan_tail(&corrupt, 1000, 3), TailPlan::Refuse { later_batch_position: 1040 });
    }

    #[test]
    fn a_sealed_segment_must_end_at_its_size_and_at_the_next_base() {
        let end = ScanCursor { position: 800, next_offset: 10, batches: 2, records: 10 };
        assert!(check_sealed(&end, 800, 10).is_ok());
        assert!(check_sealed(&end, 900, 10).is_err());
        assert!(check_sealed(&end, 800, 11).is_err());
    }

    #[test]
    fn the_index_is_rebuilt_at_every_interval_and_entries_are_checked_against_their_batch() {
        let (bytes, positions) = log(&[(0, 3), (3, 2), (5, 1), (6, 4)]);
        let mut cursor = fresh();
        let mut rebuilt = IndexRebuild::new(0, IndexEntry { relative_offset: 0, position: 0 }, 1);
        scan_window(&bytes, 0, true, &mut cursor, |position, header| rebuilt.observe(position, header));
        let at: Vec<u32> = rebuilt.entries.iter().map(|entry| entry.position).collect();
        assert_eq!(at, positions[1..].iter().map(|position| *position as u32).collect::<Vec<_>>());
        let entry = rebuilt.entries[0];
        assert!(index_entry_holds(&bytes[positions[1] as usize..], 0, entry));
        assert!(!index_entry_holds(&bytes[positions[2] as usize..], 0, entry), "a stale entry");
        assert_eq!(index_file_bytes(&rebuilt.entries).len(), 3 * INDEX_ENTRY_BYTES);
    }
}
