//! The retry schedule as data: capped exponential backoff with jitter, and the small
//! seeded random source the jitter draws from (seeded, so a test can replay it).
//!
//! The n-th consecutive failure waits `min(backoff_ms_max, backoff_ms_min * 2^(n-1))`
//! scaled by a factor drawn uniformly from `[1 - jitter, 1]`: jitter 0 is a fixed
//! schedule, jitter 1 is "full jitter". A retryable answer adds the server's
//! `retry_after_ms` on top, so a device never comes back earlier than asked.

use std::time::Duration;

/// The most doublings of the backoff (2^20 x the minimum is past any sane maximum).
const BACKOFF_DOUBLINGS_MAX: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub ms_min: u64,
    pub ms_max: u64,
    /// 0.0..=1.0
    pub jitter: f64,
}

impl Backoff {
    /// The wait before the try that follows `failures` consecutive failures (0 → none);
    /// `unit` is a random draw in `[0, 1)`.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        debug_assert!((0.0..1.0).contains(&unit));
        debug_assert!((0.0..=1.0).contains(&self.jitter) && self.ms_min <= self.ms_max);
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(BACKOFF_DOUBLINGS_MAX);
        let capped_ms = self.ms_min.saturating_mul(1 << doublings).min(self.ms_max);
        let factor = 1.0 - self.jitter * unit;
        Duration::from_micros((capped_ms as f64 * 1000.0 * factor) as u64)
    }
}

/// Reconnect and resend jitter: weir's one seeded PRNG.
pub use weir_protocol::random::SplitMix64 as Jitter;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_jitter_only_shortens() {
        let fixed = Backoff { ms_min: 50, ms_max: 1000, jitter: 0.0 };
        let delays: Vec<u64> = (0..8).map(|failures| fixed.delay(failures, 0.7).as_millis() as u64).collect();
        assert_eq!(delays, [0, 50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(fixed.delay(u32::MAX, 0.0), Duration::from_millis(1000));
        let jittered = Backoff { jitter: 0.5, ..fixed };
        let mut jitter = Jitter::new(7);
        for _ in 0..1000 {
            let delay = jittered.delay(3, jitter.unit());
            assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(200), "{delay:?}");
        }
    }

    #[test]
    fn jitter_draws_are_in_range_and_spread() {
        let mut jitter = Jitter::new(1);
        let draws: Vec<f64> = (0..10_000).map(|_| jitter.unit()).collect();
        assert!(draws.iter().all(|draw| (0.0..1.0).contains(draw)));
        let below_half = draws.iter().filter(|draw| **draw < 0.5).count();
        assert!((4500..5500).contains(&below_half), "{below_half}");
        assert_eq!(Jitter::new(9).next_u64(), Jitter::new(9).next_u64());
    }
}
