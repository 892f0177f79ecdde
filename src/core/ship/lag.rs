//! The shipped lag in time: how long the oldest record not yet acknowledged upstream
//! has been durable in the log. The shipper tells the clock when it sees the log's
//! durable end move (`observe_end`); each sample says "every offset below this end was
//! durable at this instant", so the age of the record at the cursor is the time since
//! the first sample whose end lies beyond it. Before the process started, segment
//! modification times stand in for samples (`seed`).
//!
//! Resolution: the shipper's polling interval (a record is reported as durable from
//! the first poll that saw it). The table is bounded (`samples_max`): when full, the
//! sample whose removal leaves the narrowest stretch (in time) is merged into the one
//! before it, so the stretches stay about evenly wide, at most about 2 x the span of the
//! backlog / `samples_max`. A merged stretch keeps its earliest instant: the age of a
//! record in it is overstated by at most the stretch's width, never understated.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LagClock {
    /// (end offset, instant every offset below it was durable by), both increasing.
    samples: VecDeque<(i64, Instant)>,
    samples_max: usize,
}

impl LagClock {
    pub fn new(samples_max: usize) -> LagClock {
        assert!(samples_max >= 4);
        LagClock { samples: VecDeque::with_capacity(samples_max), samples_max }
    }

    /// Offsets below `end_offset` were durable by `at` (a segment's modification time at
    /// start). Seeds must come in offset order, before any `observe_end`.
    pub fn seed(&mut self, end_offset: i64, at: Instant) {
        let at = self.samples.back().map_or(at, |(_, last)| at.max(*last));
        self.push(end_offset, at);
    }

    /// The log's durable end is `end_offset` at `now`.
    pub fn observe_end(&mut self, end_offset: i64, now: Instant) {
        self.push(end_offset, now);
    }

    fn push(&mut self, end_offset: i64, at: Instant) {
        if self.samples.back().is_some_and(|(end, _)| *end >= end_offset) {
            return;
        }
        if self.samples.len() == self.samples_max {
            // Merge the sample whose removal leaves the narrowest stretch into the one
            // before it: (e0,t0),(e1,t1) -> (e1,t0), the stretch keeping its earlier time.
            let merged = (1..self.samples.len() - 1)
                .min_by_key(|index| self.samples[index + 1].1.saturating_duration_since(self.samples[index - 1].1))
                .expect("samples_max >= 4");
            self.samples[merged - 1].0 = self.samples[merged].0;
            self.samples.remove(merged);
        }
        self.samples.push_back((end_offset, at));
    }

    /// Age at `now` of the record at `cursor_offset` (the oldest unshipped one); zero
    /// when no sample lies beyond the cursor (caught up). Forgets samples below it.
    pub fn lag(&mut self, cursor_offset: i64, now: Instant) -> Duration {
        while self.samples.front().is_some_and(|(end, _)| *end <= cursor_offset) {
            self.samples.pop_front();
        }
        self.samples.front().map_or(Duration::ZERO, |(_, at)| now.saturating_duration_since(*at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_age_is_that_of_the_stretch_holding_the_cursor() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut clock = LagClock::new(16);
        clock.seed(100, at(0));
        clock.observe_end(150, at(1000));
        clock.observe_end(150, at(1500)); // no new data: no sample
        clock.observe_end(200, at(2000));
        assert_eq!(clock.lag(0, at(3000)), Duration::from_millis(3000));
        assert_eq!(clock.lag(100, at(3000)), Duration::from_millis(2000), "offset 100 became durable at 1 s");
        assert_eq!(clock.lag(160, at(3000)), Duration::from_millis(1000));
        assert_eq!(clock.lag(200, at(3000)), Duration::ZERO, "caught up");
    }

    #[test]
    fn a_full_table_merges_old_stretches_and_never_understates_by_more_than_the_merged_gap() {
        let start = Instant::now();
        let mut clock = LagClock::new(64);
        // 100 000 polls, 5 ms apart, one record each.
        for poll in 1..=100_000i64 {
            clock.observe_end(poll, start + Duration::from_millis(5 * poll as u64));
        }
        assert!(clock.samples.len() <= 64);
        let now = start + Duration::from_millis(5 * 100_000);
        for cursor in [0i64, 1, 777, 25_000, 50_000, 99_000, 99_990] {
            let truth = now.saturating_duration_since(start + Duration::from_millis(5 * (cursor as u64 + 1)));
            let lag = clock.clone().lag(cursor, now);
            assert!(lag >= truth, "never younger than the truth: {lag:?} < {truth:?}");
            // 64 samples over 500 s: merged stretches are at most ~2 x 500 s / 64 wide.
            assert!(lag - truth <= Duration::from_secs(16), "cursor {cursor}: {lag:?} vs {truth:?}");
        }
    }
}
