//! A core's flush pacer: the small group commits of every partition on one core share
//! one budget of flushes per second, so a fleet of devices each sending a record now
//! and then does not turn into one `fdatasync` per record per partition.
//!
//! Without it each partition flushes as soon as its previous flush ended ("busy") or
//! its window (`flush_delay_max`) ran out: with many partitions each holding a few
//! records, a core asks the device for thousands of syncs a second of two records each,
//! near what a disk can take, and every flush waits behind the others (issue 18:
//! 4,800 flushes/s for 10,000 records/s). With the pacer, a partition whose window has
//! ended takes the core's next flush slot; slots are at least `interval` apart
//! (`1 / log.core_flushes_per_s_max`); until its slot comes the partition keeps
//! gathering, so its flush carries what arrived meanwhile (commits are combined, not
//! dropped: an ack still waits for its record's bytes to be synced).
//!
//! The wait is bounded: a partition holds at most one slot at a time and takes it at
//! the time it asks, so on a core of `P` partitions a slot is never more than
//! `P x interval` away (`wait_bound`). A group that fills `flush_bytes_max` goes
//! without a slot: the pacer bounds the number of small flushes, and a full group is
//! paid for by bandwidth, not by syncs. Time is an argument; the pacer is shared by the
//! core's partitions (one executor: no lock).

use std::time::{Duration, Instant};

/// The fastest pace a config may ask for (one slot per microsecond), and what 0 means.
pub const FLUSHES_PER_S_MAX: u32 = 1_000_000;

#[derive(Debug, Clone)]
pub struct FlushPacer {
    /// The least time between two slots; zero: unpaced (every slot is at once).
    interval: Duration,
    /// The first instant the next slot may be at.
    next_slot: Option<Instant>,
}

impl FlushPacer {
    /// A pacer of at most `flushes_per_s_max` slots a second; 0 paces nothing.
    pub fn new(flushes_per_s_max: u32) -> FlushPacer {
        assert!(flushes_per_s_max <= FLUSHES_PER_S_MAX);
        let interval = if flushes_per_s_max == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(1_000_000_000 / u64::from(flushes_per_s_max))
        };
        FlushPacer { interval, next_slot: None }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A group asks at `now` to start its flush: the time it may start (`now` or
    /// later), a slot it now holds.
    pub fn take_slot(&mut self, now: Instant) -> Instant {
        if self.interval.is_zero() {
            return now;
        }
        let slot = self.next_slot.map_or(now, |next| next.max(now));
        self.next_slot = Some(slot + self.interval);
        assert!(slot >= now);
        slot
    }

    /// The longest a group waits for its slot on a core of `partitions` partitions
    /// (each holds at most one slot, and takes it when it asks).
    pub fn wait_bound(&self, partitions: usize) -> Duration {
        self.interval * u32::try_from(partitions).expect("partitions per core fit u32")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::random::SplitMix64;

    fn at(start: Instant, micros: u64) -> Instant {
        start + Duration::from_micros(micros)
    }

    #[test]
    fn unpaced_gives_every_slot_at_once() {
        let mut pacer = FlushPacer::new(0);
        let start = Instant::now();
        for step in 0..10 {
            assert_eq!(pacer.take_slot(at(start, step)), at(start, step));
        }
        assert_eq!(pacer.wait_bound(64), Duration::ZERO);
    }

    #[test]
    fn slots_asked_together_are_one_interval_apart() {
        let mut pacer = FlushPacer::new(1000);
        let start = Instant::now();
        let slots: Vec<Instant> = (0..4).map(|_| pacer.take_slot(start)).collect();
        assert_eq!(slots, vec![at(start, 0), at(start, 1000), at(start, 2000), at(start, 3000)]);
    }

    #[test]
    fn a_quiet_core_saves_no_burst() {
        let mut pacer = FlushPacer::new(1000);
        let start = Instant::now();
        assert_eq!(pacer.take_slot(start), start);
        // Long after: the slot is at once, and the one after it an interval later.
        assert_eq!(pacer.take_slot(at(start, 50_000)), at(start, 50_000));
        assert_eq!(pacer.take_slot(at(start, 50_000)), at(start, 51_000));
    }

    /// Partitions of one core asking at random times, each holding one slot at a
    /// time and asking again only after its slot (plus a flush): no slot is ever more
    /// than `wait_bound` away, and slots are never closer than the interval.
    #[test]
    fn waits_stay_within_the_bound_and_the_rate_within_the_limit() {
        for seed in 1..=50u64 {
            let mut random = SplitMix64::new(seed);
            let partitions = 1 + (random.next_u64() % 16) as usize;
            let mut pacer = FlushPacer::new(1 + (random.next_u64() % 5000) as u32);
            let bound = pacer.wait_bound(partitions);
            let start = Instant::now();
            // When each partition next asks.
            let mut asks: Vec<Instant> = (0..partitions).map(|_| at(start, random.next_u64() % 10_000)).collect();
            let mut slots = Vec::new();
            for _ in 0..2000 {
                let (partition, now) =
                    asks.iter().copied().enumerate().min_by_key(|(_, ask)| *ask).expect("a partition");
                let slot = pacer.take_slot(now);
                assert!(slot >= now && slot - now <= bound, "seed {seed}: waited {:?} > {bound:?}", slot - now);
                slots.push(slot);
                let flush = Duration::from_micros(random.next_u64() % 3000);
                let quiet = Duration::from_micros(random.next_u64() % 2000);
                asks[partition] = slot + flush + quiet;
            }
            slots.sort();
            for pair in slots.windows(2) {
                assert!(pair[1] - pair[0] >= pacer.interval(), "seed {seed}: slots closer than the interval");
            }
        }
    }
}
