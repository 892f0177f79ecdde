//! weir's one token bucket, pure: a rate in units per second, a burst, and the time as
//! an argument. Two ways to spend:
//! - [`TokenBucket::try_take`]: all or nothing, and how long until it would fit (a
//!   device's record quota: a frame is refused with that wait);
//! - [`TokenBucket::take`] after [`TokenBucket::ready`]: the balance may go negative by
//!   one take, and later takes wait until it is paid back ([`TokenBucket::ready_at`];
//!   the shipper's bandwidth cap: a batch larger than the burst still goes, alone).
//!
//! Units are counted in millionths so slow rates refill smoothly, in integers so the
//! simulation replays exactly.

use std::time::{Duration, Instant};

/// Millionths of a unit per unit.
const MICROS: i128 = 1_000_000;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Units per second (= millionths of a unit per microsecond).
    rate_per_s: u64,
    capacity_micros: i128,
    /// May be negative after `take` (a debt).
    balance_micros: i128,
    updated_at: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `burst` units refilling at `rate_per_s` (> 0).
    pub fn new(rate_per_s: u64, burst: u64) -> TokenBucket {
        assert!(rate_per_s > 0, "a bucket with no rate never refills: leave it out instead");
        let capacity_micros = i128::from(burst) * MICROS;
        TokenBucket { rate_per_s, capacity_micros, balance_micros: capacity_micros, updated_at: None }
    }

    pub fn rate_per_s(&self) -> u64 {
        self.rate_per_s
    }

    /// Adds what accrued up to `now` (time never runs backwards for the bucket).
    pub fn refill(&mut self, now: Instant) {
        if let Some(updated_at) = self.updated_at {
            let elapsed_us = now.saturating_duration_since(updated_at).as_micros() as i128;
            let added = elapsed_us.saturating_mul(i128::from(self.rate_per_s));
            self.balance_micros = self.balance_micros.saturating_add(added).min(self.capacity_micros);
        }
        self.updated_at = Some(self.updated_at.map_or(now, |updated_at| updated_at.max(now)));
    }

    /// Takes `units` at `now` if they are there, or says how long until they would be
    /// (nothing taken). `units` must fit the burst.
    pub fn try_take(&mut self, units: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let needed = i128::from(units) * MICROS;
        assert!(needed <= self.capacity_micros, "more than the burst can never be taken whole");
        if needed <= self.balance_micros {
            self.balance_micros -= needed;
            return Ok(());
        }
        let missing = (needed - self.balance_micros) as u128;
        Err(Duration::from_micros(missing.div_ceil(u128::from(self.rate_per_s)) as u64))
    }

    /// Whether a [`take`](Self::take) may go now (the balance is not negative).
    pub fn ready(&self) -> bool {
        self.balance_micros >= 0
    }

    /// When the balance is paid back to zero, if it is negative.
    pub fn ready_at(&self) -> Option<Instant> {
        if self.ready() {
            return None;
        }
        let debt = (-self.balance_micros) as u128;
        let wait = Duration::from_micros(debt.div_ceil(u128::from(self.rate_per_s)) as u64);
        self.updated_at.map(|updated_at| updated_at + wait)
    }

    /// Spends `units`, into debt if need be (call when [`ready`](Self::ready)).
    pub fn take(&mut self, units: u64) {
        self.balance_micros -= i128::from(units) * MICROS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing_takes_say_exactly_how_long_to_wait() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(50, 50);
        for _ in 0..5 {
            bucket.try_take(10, start).unwrap();
        }
        assert_eq!(bucket.try_take(10, start), Err(Duration::from_millis(200)));
        assert_eq!(bucket.try_take(10, start + Duration::from_millis(199)), Err(Duration::from_millis(1)));
        bucket.try_take(10, start + Duration::from_millis(200)).unwrap();
        // A long idle refills only up to the burst.
        let later = start + Duration::from_secs(3600);
        for _ in 0..5 {
            bucket.try_take(10, later).unwrap();
        }
        assert!(bucket.try_take(1, later).is_err());
    }

    #[test]
    fn a_take_larger_than_the_burst_goes_alone_and_the_debt_is_waited_out() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000, 100);
        bucket.refill(start);
        assert!(bucket.ready());
        bucket.take(600); // 500 in debt
        assert!(!bucket.ready());
        assert_eq!(bucket.ready_at(), Some(start + Duration::from_millis(500)));
        bucket.refill(start + Duration::from_millis(499));
        assert!(!bucket.ready());
        bucket.refill(start + Duration::from_millis(500));
        assert!(bucket.ready());
        assert_eq!(bucket.ready_at(), None);
        // Time going backwards neither adds nor removes.
        bucket.refill(start);
        assert!(bucket.ready());
    }

    #[test]
    fn over_any_window_no_more_than_burst_plus_rate_is_taken() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(30, 7);
        let mut taken = 0u64;
        for step in 0..10_000u64 {
            if bucket.try_take(1, start + Duration::from_millis(step)).is_ok() {
                taken += 1;
            }
        }
        // 10 s at 30/s plus the burst of 7.
        assert!(taken <= 300 + 7, "{taken}");
        assert!(taken >= 300, "{taken}");
    }
}
