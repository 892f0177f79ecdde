//! The shipped lag in time: how old the oldest record not yet acknowledged upstream
//! is, from the records' own timestamps — never from a file time or from when this
//! process happened to see the record, so a restart neither resets nor hides it.
//!
//! The age is that of the stored batch holding the cursor, by the batch's max timestamp
//! (the newest record in it, as Kafka's time index uses): the record at the cursor is at
//! least that old. It is understated only by the spread of one batch's timestamps (one
//! device frame's records, which a device stamps together), and it follows the devices'
//! clocks: a device whose clock runs behind makes its records look older. A timestamp
//! in the future counts as age 0.
//!
//! The shell reads the header of the batch at the cursor only when the cursor leaves
//! the batch it read last (`covers`), so a lag sample costs no read while shipping sits
//! inside one batch or stands still.

use std::time::Duration;

/// The batch holding the cursor: its offsets and max timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorBatch {
    pub base_offset: i64,
    /// One past the batch's last offset.
    pub next_offset: i64,
    /// The batch's max timestamp (milliseconds since the Unix epoch).
    pub max_timestamp_ms: i64,
}

impl CursorBatch {
    /// Whether `offset` lies in this batch.
    pub fn covers(&self, offset: i64) -> bool {
        self.base_offset <= offset && offset < self.next_offset
    }

    /// The age at `now_ms` (milliseconds since the Unix epoch) of the records at the
    /// cursor; zero for a timestamp in the future.
    pub fn age(&self, now_ms: i64) -> Duration {
        Duration::from_millis(u64::try_from(now_ms.saturating_sub(self.max_timestamp_ms)).unwrap_or(0))
    }
}

/// The lag in time of a cursor against the log's durable end: zero when caught up,
/// else the age of the batch holding the cursor (`None` while it is not known).
pub fn lag(cursor_offset: i64, end_offset: i64, batch: Option<&CursorBatch>, now_ms: i64) -> Option<Duration> {
    if cursor_offset >= end_offset {
        return Some(Duration::ZERO);
    }
    batch.filter(|batch| batch.covers(cursor_offset)).map(|batch| batch.age(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn the_age_is_that_of_the_batch_holding_the_cursor_by_its_max_timestamp() {
        let batch = CursorBatch { base_offset: 100, next_offset: 110, max_timestamp_ms: NOW - 9_500 };
        assert_eq!(lag(100, 200, Some(&batch), NOW), Some(Duration::from_millis(9_500)));
        assert_eq!(lag(109, 200, Some(&batch), NOW), Some(Duration::from_millis(9_500)));
        assert_eq!(lag(110, 200, Some(&batch), NOW), None, "the cursor left the batch: read the next one");
        assert_eq!(lag(99, 200, Some(&batch), NOW), None);
        assert_eq!(lag(105, 200, None, NOW), None);
    }

    #[test]
    fn caught_up_is_zero_and_a_future_timestamp_is_age_zero() {
        assert_eq!(lag(200, 200, None, NOW), Some(Duration::ZERO));
        assert_eq!(lag(250, 200, None, NOW), Some(Duration::ZERO));
        let ahead = CursorBatch { base_offset: 0, next_offset: 1, max_timestamp_ms: NOW + 60_000 };
        assert_eq!(lag(0, 1, Some(&ahead), NOW), Some(Duration::ZERO));
        let ancient = CursorBatch { base_offset: 0, next_offset: 1, max_timestamp_ms: i64::MIN };
        assert!(lag(0, 1, Some(&ancient), NOW).unwrap() > Duration::from_secs(1 << 40));
    }
}
