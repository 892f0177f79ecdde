//! A rate limit for a log line that an outside party can repeat at will (a denied device
//! reconnecting in a loop): at most one line per key (a device id) per interval, and the
//! next line it lets through carries how many it held back. Pure and deterministic: the
//! caller passes `now`, so the tests drive a made-up clock.
//!
//! The table is bounded by `keys_max`. When it is full, keys whose interval has passed
//! go first, then the key logged longest ago. The trade-off: an evicted key loses its
//! count of held-back lines and its next event is logged at once, so a flood of distinct
//! keys costs more lines, never more memory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    keys_max: usize,
    keys: HashMap<String, Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    logged_at: Instant,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(interval: Duration, keys_max: usize) -> LogThrottle {
        assert!(keys_max > 0, "a throttle tracks at least one key");
        LogThrottle { interval, keys_max, keys: HashMap::with_capacity(keys_max) }
    }

    /// One event of `key` at `now`: `Some(suppressed)` when it is to be logged, with the
    /// number of events of `key` held back since its previous line; `None` when it is to
    /// be held back.
    pub fn admit(&mut self, key: &str, now: Instant) -> Option<u64> {
        if let Some(window) = self.keys.get_mut(key) {
            if now.saturating_duration_since(window.logged_at) < self.interval {
                window.suppressed += 1;
                return None;
            }
            let suppressed = window.suppressed;
            *window = Window { logged_at: now, suppressed: 0 };
            return Some(suppressed);
        }
        if self.keys.len() >= self.keys_max {
            self.make_room(now);
        }
        self.keys.insert(key.to_owned(), Window { logged_at: now, suppressed: 0 });
        assert!(self.keys.len() <= self.keys_max, "the throttle table stays within keys_max");
        Some(0)
    }

    /// Keys tracked now (at most `keys_max`).
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    fn make_room(&mut self, now: Instant) {
        let interval = self.interval;
        self.keys.retain(|_, window| now.saturating_duration_since(window.logged_at) < interval);
        if self.keys.len() >= self.keys_max {
            let oldest = self.keys.iter().min_by_key(|(_, window)| window.logged_at).map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.keys.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn one_line_per_key_per_interval_and_the_next_counts_what_was_held_back() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut throttle = LogThrottle::new(MINUTE, 16);
        assert_eq!(throttle.admit("dev-1", at(0)), Some(0), "the first event is logged");
        for second in 1..60 {
            assert_eq!(throttle.admit("dev-1", at(second)), None, "held back at {second} s");
        }
        // Another key has its own window.
        assert_eq!(throttle.admit("dev-2", at(30)), Some(0));
        assert_eq!(throttle.admit("dev-1", at(60)), Some(59), "a minute on: logged, with the 59 held back");
        assert_eq!(throttle.admit("dev-1", at(61)), None);
        assert_eq!(throttle.admit("dev-1", at(200)), Some(1));
        assert_eq!(throttle.admit("dev-2", at(200)), Some(0), "nothing of dev-2 was held back");
    }

    #[test]
    fn the_table_stays_bounded_dropping_expired_keys_then_the_oldest() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut throttle = LogThrottle::new(MINUTE, 3);
        for (second, key) in ["a", "b", "c"].into_iter().enumerate() {
            assert_eq!(throttle.admit(key, at(second as u64)), Some(0));
        }
        // Full, nothing expired: the oldest ("a") makes room.
        assert_eq!(throttle.admit("d", at(10)), Some(0));
        assert_eq!(throttle.keys(), 3);
        assert_eq!(throttle.admit("b", at(11)), None, "b is still tracked");
        assert_eq!(throttle.admit("a", at(12)), Some(0), "a was evicted: logged again at once");
        assert_eq!(throttle.keys(), 3);
        // Later, every window has passed: the expired keys all go at once.
        assert_eq!(throttle.admit("e", at(500)), Some(0));
        assert_eq!(throttle.keys(), 1);
        // A flood of distinct keys never grows the table.
        for index in 0..1000u64 {
            assert_eq!(throttle.admit(&format!("flood-{index}"), at(600)), Some(0));
            assert!(throttle.keys() <= 3);
        }
    }
}
