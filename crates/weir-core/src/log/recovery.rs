//! The recovery scan: walks batches from a known-good position and finds where the
//! valid log ends, as pure code over windows of bytes the shell reads.
//!
//! Invariant kept: the log is every valid, offset-contiguous batch from the segment's
//! base. When the scan meets bytes that are not the next batch, it must tell a torn tail
//! (the last flush did not complete: cut it) from corruption before the tail (refuse).
//! A flush writes exactly one batch, so a torn tail is at most one batch long: if any
//! valid batch with a later offset starts within `BATCH_BYTES_MAX` after the bad bytes,
//! the bad bytes are not the tail.

use super::batch::{check_batch, BatchError, BatchHeader, BATCH_BYTES_MAX, BATCH_HEADER_BYTES};

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
}
