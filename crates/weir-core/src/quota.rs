//! A device's record quota, pure: a token bucket that takes the time as an argument.
//!
//! `quic.device_records_per_s_max` records per second per device, with a burst of one
//! second's worth (and never less than one whole frame, so a legal frame can always
//! pass once the bucket is full). A device's connections split its quota equally —
//! each gets `1 / connections_per_device_max` of the rate and the burst — so however
//! many connections it opens, on whichever cores, it cannot go over its quota, and no
//! core consults another on the data path. The trade-off: a device holding fewer
//! connections than it may gets less than its whole quota; sites with one connection
//! per device set `connections_per_device_max = 1`.

use std::time::{Duration, Instant};

use crate::rate::TokenBucket;

#[derive(Debug, Clone)]
pub struct RecordQuota {
    bucket: TokenBucket,
}

impl RecordQuota {
    /// One connection's share of a device quota of `device_records_per_s` shared by
    /// `connections_max` connections; frames hold at most `records_per_frame_max`.
    /// `None` when the quota is off (0).
    pub fn for_connection(
        device_records_per_s: u32,
        connections_max: u32,
        records_per_frame_max: u32,
    ) -> Option<RecordQuota> {
        if device_records_per_s == 0 {
            return None;
        }
        assert!(connections_max > 0 && records_per_frame_max > 0);
        let records_per_s = (u64::from(device_records_per_s) / u64::from(connections_max)).max(1);
        let capacity = records_per_s.max(u64::from(records_per_frame_max));
        Some(RecordQuota { bucket: TokenBucket::new(records_per_s, capacity) })
    }

    /// Takes `records` at `now`, or says how long until they would fit (nothing taken).
    pub fn take(&mut self, records: u32, now: Instant) -> Result<(), Duration> {
        self.bucket.try_take(u64::from(records), now)
    }

    /// Records per second this connection may write.
    pub fn records_per_s(&self) -> u64 {
        self.bucket.rate_per_s()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_when_zero() {
        assert!(RecordQuota::for_connection(0, 4, 100).is_none());
    }

    #[test]
    fn a_burst_then_the_rate_and_an_exact_wait() {
        let start = Instant::now();
        // 100 records/s for the device, 2 connections: 50/s each, burst 50.
        let mut quota = RecordQuota::for_connection(100, 2, 10).unwrap();
        assert_eq!(quota.records_per_s(), 50);
        for _ in 0..5 {
            quota.take(10, start).unwrap();
        }
        // Empty: 10 records need 200 ms at 50/s.
        assert_eq!(quota.take(10, start), Err(Duration::from_millis(200)));
        assert_eq!(quota.take(10, start + Duration::from_millis(199)), Err(Duration::from_millis(1)));
        quota.take(10, start + Duration::from_millis(200)).unwrap();
        // A long idle refills only up to the burst.
        let later = start + Duration::from_secs(3600);
        for _ in 0..5 {
            quota.take(10, later).unwrap();
        }
        assert!(quota.take(1, later).is_err());
    }

    #[test]
    fn over_any_window_a_connection_never_takes_more_than_burst_plus_rate() {
        let start = Instant::now();
        let mut quota = RecordQuota::for_connection(30, 1, 7).unwrap();
        let mut taken = 0u64;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let now = start + Duration::from_micros(step * 500);
            if quota.take((state % 7 + 1) as u32, now).is_ok() {
                taken += state % 7 + 1;
            }
        }
        // 10 s at 30/s plus the 30-record burst.
        assert!(taken <= 30 * 10 + 30, "{taken}");
        assert!(taken >= 30 * 10 - 7, "the rate is also reached: {taken}");
    }

    #[test]
    fn a_whole_frame_always_fits_the_burst() {
        let mut quota = RecordQuota::for_connection(1, 4, 500).unwrap();
        assert_eq!(quota.records_per_s(), 1);
        quota.take(500, Instant::now()).unwrap();
    }
}
