//! The retry schedule as data: capped exponential backoff with jitter drawn from a
//! seeded generator, so a simulation (or a test) replays the exact same delays.
//!
//! Delay after the n-th consecutive failure (n starting at 1):
//! `cap = min(max, min * 2^(n-1))`, then "equal jitter": a uniform draw in
//! `[cap/2, cap]`. Half the cap is kept so retries never bunch up at zero; the random
//! half spreads a fleet of weir boxes that lost the same broker at the same moment.

use std::time::Duration;

pub use weir_protocol::random::SplitMix64;

/// Capped exponential backoff with equal jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    random: SplitMix64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        assert!(!min.is_zero(), "a zero backoff would retry in a busy loop");
        assert!(min <= max, "backoff min {min:?} exceeds max {max:?}");
        Backoff { min, max, failures: 0, random: SplitMix64::new(seed) }
    }

    /// Records one more consecutive failure and returns how long to wait before the
    /// next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(40);
        let min_ns = self.min.as_nanos() as u64;
        let max_ns = self.max.as_nanos() as u64;
        let cap_ns = min_ns.saturating_mul(1u64 << doublings).min(max_ns);
        let half_ns = cap_ns / 2;
        let delay_ns = half_ns + self.random.below_or_equal(cap_ns - half_ns);
        let delay = Duration::from_nanos(delay_ns);
        assert!(delay <= self.max && delay >= self.min / 2);
        delay
    }

    /// A success ends the run of failures.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_the_jitter_band() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        let mut caps = Vec::new();
        for failure in 1..=12u32 {
            let delay = backoff.next_delay();
            let cap = Duration::from_millis(100 * (1u64 << (failure - 1))).min(Duration::from_secs(5));
            assert!(delay <= cap && delay >= cap / 2, "failure {failure}: {delay:?} outside [{:?}, {cap:?}]", cap / 2);
            caps.push(cap);
        }
        assert_eq!(*caps.last().unwrap(), Duration::from_secs(5));
    }

    #[test]
    fn the_same_seed_replays_the_same_schedule_and_another_differs() {
        let schedule = |seed| {
            let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(60), seed);
            (0..20).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(schedule(42), schedule(42));
        assert_ne!(schedule(42), schedule(43));
    }

    #[test]
    fn reset_starts_over_from_the_minimum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(60), 1);
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.failures(), 0);
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn a_huge_failure_count_does_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_secs(30), 3);
        for _ in 0..10_000 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
    }
}
