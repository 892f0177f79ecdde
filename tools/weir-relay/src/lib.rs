//! weir-relay's decisions, as pure code: which datagram is lost, how long each one is
//! held, which are duplicated or held back so later ones overtake them, when the link
//! is cut and when the relay's upstream sockets move to new ports (NAT rebinding).
//! Nothing here reads a clock or touches a socket: time is an argument (the time since
//! the relay started) and randomness comes from a seed, so a run's impairments can be
//! replayed and unit-tested. `main.rs` is the thin tokio shell that executes them.
//!
//! Determinism: each direction has its own random stream, and every datagram takes
//! exactly `DRAWS_PER_DATAGRAM` draws from its direction's stream whatever its fate, so
//! the n-th datagram of a direction meets the same fate for the same seed and flags,
//! however the other direction's traffic interleaves with it. (Which datagram is the
//! n-th still depends on the peers' timing; what the seed fixes is the schedule.)

#![deny(unsafe_code)]

use std::collections::BinaryHeap;
use std::time::Duration;

/// Random draws every datagram takes from its direction's stream.
pub const DRAWS_PER_DATAGRAM: usize = 4;
/// The longest delay, jitter or reorder hold the relay accepts.
pub const HOLD_MAX: Duration = Duration::from_secs(60);

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a device (client) towards weir.
    ToServer,
    /// From weir back to a device.
    ToClient,
}

/// A link outage: from `at` after the start, for `length`; every datagram in it is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub at: Duration,
    pub length: Duration,
}

/// What the relay does to traffic. The same impairments apply in both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairments {
    /// Probability a datagram is lost, 0.0..=1.0.
    pub loss: f64,
    /// Base one-way delay.
    pub delay: Duration,
    /// The delay varies uniformly in [delay - jitter, delay + jitter] (never below 0).
    pub jitter: Duration,
    /// Probability a datagram is held back `reorder_hold` longer than its delay, so the
    /// datagrams after it overtake it.
    pub reorder: f64,
    pub reorder_hold: Duration,
    /// Probability a datagram is sent twice.
    pub duplicate: f64,
    pub cut: Option<Cut>,
    /// Every this long, each session's upstream socket is replaced by one on a new port.
    pub rebind_every: Option<Duration>,
}

impl Impairments {
    /// No impairment at all: a plain relay.
    pub const NONE: Impairments = Impairments {
        loss: 0.0,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        reorder: 0.0,
        reorder_hold: Duration::ZERO,
        duplicate: 0.0,
        cut: None,
        rebind_every: None,
    };

    /// Every problem with these impairments, in words (empty: fine).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, probability) in [("loss", self.loss), ("reorder", self.reorder), ("duplicate", self.duplicate)] {
            if !(0.0..=1.0).contains(&probability) {
                problems.push(format!("--{name} {probability} is not a probability in 0..=1"));
            }
        }
        for (name, hold) in [("delay-ms", self.delay), ("jitter-ms", self.jitter), ("reorder-ms", self.reorder_hold)] {
            if hold > HOLD_MAX {
                problems.push(format!("--{name} {} is over {} ms", hold.as_millis(), HOLD_MAX.as_millis()));
            }
        }
        if self.reorder > 0.0 && self.reorder_hold.is_zero() {
            problems.push("--reorder needs a --reorder-ms above 0 (the hold that lets later datagrams pass)".into());
        }
        if self.rebind_every.is_some_and(|every| every < Duration::from_millis(100)) {
            problems.push("--rebind-every-s must be at least 0.1".into());
        }
        if self.cut.is_some_and(|cut| cut.length.is_zero()) {
            problems.push("--cut-for-s must be above 0".into());
        }
        problems
    }
}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Lost inside a link cut.
    CutDropped,
    /// Lost at random (`loss`).
    Dropped,
    /// Sent after `delay`; with `duplicate`, a second copy goes out right behind it;
    /// `reordered` when the delay includes the reorder hold.
    Forward { delay: Duration, duplicate: bool, reordered: bool },
}

/// The relay's draws: weir's one seeded PRNG.
pub use weir_protocol::random::SplitMix64;

/// The seeded impairment schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    impairments: Impairments,
    to_server: SplitMix64,
    to_client: SplitMix64,
}

impl Schedule {
    pub fn new(impairments: Impairments, seed: u64) -> Schedule {
        assert!(impairments.problems().is_empty(), "{:?}", impairments.problems());
        Schedule {
            impairments,
            to_server: SplitMix64::new(seed ^ 0x7365_7276_6572_0001),
            to_client: SplitMix64::new(seed ^ 0x636c_6965_6e74_0002),
        }
    }

    pub fn impairments(&self) -> &Impairments {
        &self.impairments
    }

    /// Whether the link is cut at `since_start`.
    pub fn is_cut(&self, since_start: Duration) -> bool {
        self.impairments.cut.is_some_and(|cut| since_start >= cut.at && since_start < cut.at + cut.length)
    }

    /// How many rebinds are due by `since_start` since the start (the shell rebinds
    /// when this grows).
    pub fn rebind_epoch(&self, since_start: Duration) -> u64 {
        match self.impairments.rebind_every {
            Some(every) => (since_start.as_nanos() / every.as_nanos()) as u64,
            None => 0,
        }
    }

    /// When epoch `epoch` starts (the next rebind after epoch `epoch - 1`).
    pub fn rebind_at(&self, epoch: u64) -> Option<Duration> {
        let every = self.impairments.rebind_every?;
        every.checked_mul(u32::try_from(epoch).ok()?)
    }

    /// The fate of the next datagram travelling `direction`, arriving at `since_start`.
    pub fn decide(&mut self, direction: Direction, since_start: Duration) -> Fate {
        let random = match direction {
            Direction::ToServer => &mut self.to_server,
            Direction::ToClient => &mut self.to_client,
        };
        let draws: [f64; DRAWS_PER_DATAGRAM] = std::array::from_fn(|_| random.unit());
        let [loss, jitter, reorder, duplicate] = draws;
        let impairments = &self.impairments;
        if self.is_cut(since_start) {
            return Fate::CutDropped;
        }
        if loss < impairments.loss {
            return Fate::Dropped;
        }
        // Uniform in [delay - jitter, delay + jitter], floored at 0.
        let jitter_ns = impairments.jitter.as_nanos() as f64 * (2.0 * jitter - 1.0);
        let mut delay_ns = (impairments.delay.as_nanos() as f64 + jitter_ns).max(0.0);
        let reordered = reorder < impairments.reorder;
        if reordered {
            delay_ns += impairments.reorder_hold.as_nanos() as f64;
        }
        Fate::Forward {
            delay: Duration::from_nanos(delay_ns as u64),
            duplicate: duplicate < impairments.duplicate,
            reordered,
        }
    }
}

/// Keeps one flow's datagrams (one session, one direction) in their order through a
/// jittered delay, as a queue in a real path does: a datagram is never released before
/// the one sent ahead of it, so jitter alone stretches gaps but reorders nothing. Only
/// datagrams the schedule marks `reordered` skip the line (and do not hold later ones
/// back). netem's jitter, by contrast, reorders freely; `--jitter-reorders` asks for that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowOrder {
    last_due: Duration,
}

impl FlowOrder {
    /// When a datagram of this flow arriving at `now` with `delay` is due.
    pub fn due(&mut self, now: Duration, delay: Duration, reordered: bool) -> Duration {
        let due = now + delay;
        if reordered {
            return due;
        }
        let due = due.max(self.last_due);
        self.last_due = due;
        due
    }
}

/// Why a datagram could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    Datagrams,
    Bytes,
}

#[derive(Debug)]
struct Held<T> {
    due: Duration,
    order: u64,
    bytes: usize,
    item: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Held<T> {
    /// Reversed: the heap's top is the earliest due, first pushed among equals.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.order).cmp(&(self.due, self.order))
    }
}

/// Datagrams held until they are due, bounded in count and bytes. Items due at the
/// same time come out in the order they were pushed.
#[derive(Debug)]
pub struct DelayQueue<T> {
    heap: BinaryHeap<Held<T>>,
    pushed: u64,
    bytes: usize,
    datagrams_max: usize,
    bytes_max: usize,
}

impl<T> DelayQueue<T> {
    pub fn new(datagrams_max: usize, bytes_max: usize) -> DelayQueue<T> {
        assert!(datagrams_max >= 1 && bytes_max >= 1);
        DelayQueue { heap: BinaryHeap::new(), pushed: 0, bytes: 0, datagrams_max, bytes_max }
    }

    pub fn push(&mut self, due: Duration, bytes: usize, item: T) -> Result<(), QueueFull> {
        if self.heap.len() >= self.datagrams_max {
            return Err(QueueFull::Datagrams);
        }
        if self.bytes + bytes > self.bytes_max {
            return Err(QueueFull::Bytes);
        }
        self.bytes += bytes;
        self.pushed += 1;
        self.heap.push(Held { due, order: self.pushed, bytes, item });
        Ok(())
    }

    /// When the earliest held item is due.
    pub fn next_due(&self) -> Option<Duration> {
        self.heap.peek().map(|held| held.due)
    }

    /// The earliest item due at or before `now`.
    pub fn pop_due(&mut self, now: Duration) -> Option<T> {
        if self.heap.peek()?.due > now {
            return None;
        }
        let held = self.heap.pop().expect("peeked");
        self.bytes -= held.bytes;
        Some(held.item)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What the relay did, printed as one JSON line when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams received from clients / from weir.
    pub received_from_clients: u64,
    pub received_from_server: u64,
    /// Datagrams sent on (duplicate copies included).
    pub forwarded: u64,
    /// Lost at random.
    pub dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Held back so that later datagrams overtook them.
    pub reordered: u64,
    /// Lost inside a link cut.
    pub cut_dropped: u64,
    /// Upstream sockets replaced by one on a new port.
    pub rebinds: u64,
    /// Sessions (client addresses) opened, and refused over `--sessions-max`.
    pub sessions: u64,
    pub sessions_refused: u64,
    /// Lost because the delay queue was full.
    pub queue_dropped: u64,
    /// Sends the kernel refused (for instance nothing listening yet).
    pub send_errors: u64,
}

impl Counters {
    pub fn json(&self, seed: u64, seconds: f64) -> String {
        serde_json::json!({
            "seed": seed,
            "seconds": (seconds * 1000.0).round() / 1000.0,
            "received_from_clients": self.received_from_clients,
            "received_from_server": self.received_from_server,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "cut_dropped": self.cut_dropped,
            "rebinds": self.rebinds,
            "sessions": self.sessions,
            "sessions_refused": self.sessions_refused,
            "queue_dropped": self.queue_dropped,
            "send_errors": self.send_errors,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn everything() -> Impairments {
        Impairments {
            loss: 0.1,
            delay: Duration::from_millis(200),
            jitter: Duration::from_millis(50),
            reorder: 0.1,
            reorder_hold: Duration::from_millis(30),
            duplicate: 0.05,
            cut: Some(Cut { at: Duration::from_secs(5), length: Duration::from_secs(30) }),
            rebind_every: Some(Duration::from_secs(3)),
        }
    }

    fn fates(seed: u64, count: usize, direction: Direction) -> Vec<Fate> {
        let mut schedule = Schedule::new(everything(), seed);
        (0..count).map(|index| schedule.decide(direction, Duration::from_millis(index as u64 * 10))).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_decisions() {
        assert_eq!(fates(42, 10_000, Direction::ToServer), fates(42, 10_000, Direction::ToServer));
        assert_ne!(fates(42, 10_000, Direction::ToServer), fates(43, 10_000, Direction::ToServer));
        assert_ne!(fates(42, 10_000, Direction::ToServer), fates(42, 10_000, Direction::ToClient));
    }

    #[test]
    fn a_directions_decisions_do_not_depend_on_the_other_directions_traffic() {
        let alone = fates(7, 2000, Direction::ToServer);
        let mut schedule = Schedule::new(everything(), 7);
        let mut interleaved = Vec::new();
        for index in 0..2000u64 {
            let at = Duration::from_millis(index * 10);
            for _ in 0..index % 3 {
                schedule.decide(Direction::ToClient, at);
            }
            interleaved.push(schedule.decide(Direction::ToServer, at));
        }
        assert_eq!(alone, interleaved);
    }

    #[test]
    fn loss_duplication_and_reordering_happen_near_their_configured_rates() {
        let impairments = Impairments { cut: None, ..everything() };
        let count = 200_000;
        for seed in [1, 2, 3] {
            let mut schedule = Schedule::new(impairments, seed);
            let (mut dropped, mut duplicated, mut reordered) = (0, 0, 0);
            for _ in 0..count {
                match schedule.decide(Direction::ToClient, Duration::ZERO) {
                    Fate::Dropped => dropped += 1,
                    Fate::Forward { duplicate, reordered: held, .. } => {
                        duplicated += usize::from(duplicate);
                        reordered += usize::from(held);
                    }
                    Fate::CutDropped => panic!("no cut configured"),
                }
            }
            let forwarded = count - dropped;
            let loss = dropped as f64 / count as f64;
            assert!((0.095..0.105).contains(&loss), "seed {seed}: loss {loss}");
            let duplicate = duplicated as f64 / forwarded as f64;
            assert!((0.045..0.055).contains(&duplicate), "seed {seed}: duplicate {duplicate}");
            let reorder = reordered as f64 / forwarded as f64;
            assert!((0.095..0.105).contains(&reorder), "seed {seed}: reorder {reorder}");
        }
    }

    #[test]
    fn delays_stay_within_the_jitter_and_reordered_ones_are_held_longer() {
        let impairments = Impairments { cut: None, loss: 0.0, ..everything() };
        let mut schedule = Schedule::new(impairments, 9);
        let (mut shortest, mut longest) = (Duration::MAX, Duration::ZERO);
        for _ in 0..50_000 {
            let Fate::Forward { delay, reordered, .. } = schedule.decide(Direction::ToServer, Duration::ZERO) else {
                panic!("no loss configured")
            };
            let plain = if reordered { delay - Duration::from_millis(30) } else { delay };
            assert!(plain >= Duration::from_millis(150) && plain <= Duration::from_millis(250), "{delay:?}");
            shortest = shortest.min(plain);
            longest = longest.max(plain);
        }
        assert!(shortest < Duration::from_millis(152) && longest > Duration::from_millis(248));
        // A jitter larger than the delay is floored at 0, never negative.
        let wide =
            Impairments { delay: Duration::from_millis(5), jitter: Duration::from_millis(20), ..Impairments::NONE };
        let mut schedule = Schedule::new(wide, 3);
        let zeros = (0..10_000)
            .filter(|_| {
                matches!(schedule.decide(Direction::ToServer, Duration::ZERO), Fate::Forward { delay, .. } if delay.is_zero())
            })
            .count();
        assert!(zeros > 3000, "{zeros}");
    }

    #[test]
    fn the_cut_drops_everything_inside_its_window_and_nothing_outside() {
        let impairments = Impairments { loss: 0.0, ..everything() };
        let mut schedule = Schedule::new(impairments, 5);
        for millis in (0..40_000).step_by(7) {
            let at = Duration::from_millis(millis);
            let fate = schedule.decide(Direction::ToServer, at);
            let inside = (5_000..35_000).contains(&millis);
            assert_eq!(fate == Fate::CutDropped, inside, "at {millis} ms: {fate:?}");
            assert_eq!(schedule.is_cut(at), inside);
        }
    }

    #[test]
    fn rebind_epochs_advance_every_period() {
        let schedule = Schedule::new(everything(), 1);
        assert_eq!(schedule.rebind_epoch(Duration::from_millis(2999)), 0);
        assert_eq!(schedule.rebind_epoch(Duration::from_secs(3)), 1);
        assert_eq!(schedule.rebind_epoch(Duration::from_millis(9500)), 3);
        assert_eq!(schedule.rebind_at(4), Some(Duration::from_secs(12)));
        let never = Schedule::new(Impairments::NONE, 1);
        assert_eq!(never.rebind_epoch(Duration::from_secs(1000)), 0);
        assert_eq!(never.rebind_at(1), None);
    }

    #[test]
    fn no_impairment_forwards_everything_at_once() {
        let mut schedule = Schedule::new(Impairments::NONE, 11);
        for index in 0..10_000u64 {
            let fate = schedule.decide(Direction::ToClient, Duration::from_millis(index));
            assert_eq!(fate, Fate::Forward { delay: Duration::ZERO, duplicate: false, reordered: false });
        }
    }

    #[test]
    fn bad_impairments_are_named() {
        let bad = Impairments {
            loss: 1.5,
            duplicate: -0.1,
            delay: Duration::from_secs(61),
            reorder: 0.2,
            reorder_hold: Duration::ZERO,
            rebind_every: Some(Duration::from_millis(10)),
            cut: Some(Cut { at: Duration::ZERO, length: Duration::ZERO }),
            ..Impairments::NONE
        };
        let problems = bad.problems().join("\n");
        for name in ["--loss", "--duplicate", "--delay-ms", "--reorder-ms", "--rebind-every-s", "--cut-for-s"] {
            assert!(problems.contains(name), "{name} missing from:\n{problems}");
        }
        assert!(everything().problems().is_empty());
    }

    #[test]
    fn jitter_keeps_a_flows_order_and_only_reordered_datagrams_are_overtaken() {
        let impairments = Impairments {
            delay: Duration::from_millis(200),
            jitter: Duration::from_millis(50),
            reorder: 0.1,
            reorder_hold: Duration::from_millis(30),
            ..Impairments::NONE
        };
        let mut schedule = Schedule::new(impairments, 21);
        let mut flow = FlowOrder::default();
        let mut queue = DelayQueue::new(100_000, usize::MAX);
        let mut reordered_count = 0;
        for index in 0..20_000u64 {
            let now = Duration::from_millis(index * 2);
            let Fate::Forward { delay, reordered, .. } = schedule.decide(Direction::ToServer, now) else {
                panic!("no loss configured")
            };
            reordered_count += u64::from(reordered);
            let due = flow.due(now, delay, reordered);
            assert!(due >= now + delay, "never earlier than its own delay");
            queue.push(due, 1, (index, reordered)).unwrap();
        }
        let mut in_order = Vec::new();
        let mut overtaken = 0;
        while let Some((index, reordered)) = queue.pop_due(Duration::MAX) {
            if reordered {
                overtaken += 1;
            } else {
                in_order.push(index);
            }
        }
        assert!(in_order.windows(2).all(|pair| pair[0] < pair[1]), "jitter reordered the flow");
        assert_eq!(overtaken, reordered_count);
        assert!(reordered_count > 1000);
    }

    #[test]
    fn the_delay_queue_releases_in_due_order_and_keeps_its_limits() {
        let mut queue = DelayQueue::new(3, 100);
        queue.push(Duration::from_millis(30), 10, "c").unwrap();
        queue.push(Duration::from_millis(10), 10, "a").unwrap();
        queue.push(Duration::from_millis(10), 10, "b").unwrap();
        assert_eq!(queue.push(Duration::ZERO, 1, "d"), Err(QueueFull::Datagrams));
        assert_eq!((queue.len(), queue.bytes()), (3, 30));
        assert_eq!(queue.next_due(), Some(Duration::from_millis(10)));
        assert_eq!(queue.pop_due(Duration::from_millis(9)), None);
        assert_eq!(queue.pop_due(Duration::from_millis(20)), Some("a"));
        assert_eq!(queue.pop_due(Duration::from_millis(20)), Some("b"), "equal due times keep push order");
        assert_eq!(queue.pop_due(Duration::from_millis(20)), None);
        assert_eq!(queue.push(Duration::ZERO, 91, "e"), Err(QueueFull::Bytes));
        queue.push(Duration::ZERO, 90, "e").unwrap();
        assert_eq!(queue.pop_due(Duration::from_millis(40)), Some("e"));
        assert_eq!(queue.pop_due(Duration::from_millis(40)), Some("c"));
        assert!(queue.is_empty() && queue.bytes() == 0);
    }
}
