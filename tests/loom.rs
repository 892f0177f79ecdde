//! loom models of what weir shares between threads: every interleaving of two cores'
//! (or a core's and the admin thread's) operations is run, not a lucky few. Each file
//! modelled here is included with a `sync` module of this crate that re-exports loom's
//! `Arc`, `Mutex` and atomics in place of std's (the seam is `src/sync.rs`), so the
//! model runs weir's own code, not a copy of it.
//!
//! - The data directory's disk budget (`src/shell/budget.rs`): two cores reserving the
//!   last room never both get it; reservations given back and bytes deleted on another
//!   core leave the count exact.
//! - The shutdown signal (`src/shell/shutdown.rs`): once it is set (by the signal
//!   handler, by a failing core, or both at once) every core and the admin thread see
//!   it and stop, including a core still waiting at start for a peer that will never come.
//! - Open connections per device (`src/shell/device_connections.rs`): cores admitting
//!   the same device at once never let it over `quic.connections_per_device_max`, and
//!   connections ending on one core while another admits leave the count exact.
//! - A shipper's state and a partition's dropped ranges (`src/shell/status_cells.rs`),
//!   written by the owning core and read by the admin thread for `/status`: a reader
//!   sees a whole state with its own text, never going back, and a window of whole
//!   ranges, in order, contiguous, at most `DROPPED_RANGES_KEPT` of them.
//!
//! - A partition's log offsets as `/status` reads them (`log_offsets_view` in the same
//!   file) from the metric gauges the owning core sets: prometheus-client's own
//!   `Gauge`, over loom's atomics with the orderings prometheus-client uses (relaxed).
//!   The view never shows a log that ends before it starts, though the two gauges are
//!   read apart on a weakly ordered CPU.
//!
//! - The listener's reloadable settings (`src/shell/snapshot.rs`), published by the
//!   signal thread on SIGHUP while cores check for a newer generation: a core that sees
//!   a new generation gets that snapshot or a later one, whole, and never goes back.
//!
//! The naive variants each replaced (or would be) are modelled too, to show the models
//! catch what they got wrong: those tests expect loom to find the bad interleaving.

/// What the included files take from `crate::sync` and `crate::config`.
mod sync {
    pub use loom::model;
    pub use loom::sync::atomic;
    pub use loom::sync::{Arc, Mutex};
    pub use std::sync::PoisonError;
}
mod config {
    pub use weir::config::DiskFullPolicy;
}

// Only some of their functions are modelled.
#[allow(dead_code)]
#[path = "../src/shell/budget.rs"]
mod budget;
#[allow(dead_code)]
#[path = "../src/shell/device_connections.rs"]
mod device_connections;
#[allow(dead_code)]
#[path = "../src/shell/shutdown.rs"]
mod shutdown;
#[allow(dead_code)]
#[path = "../src/shell/snapshot.rs"]
mod snapshot;
#[allow(dead_code)]
#[path = "../src/shell/status_cells.rs"]
mod status_cells;

use budget::DataDirBudget;
use config::DiskFullPolicy;
use device_connections::DeviceConnections;
use loom::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use loom::sync::{Arc, Mutex};
use status_cells::{
    log_offsets_view, DroppedRange, DroppedRanges, ShipperState, ShipperStateCell, DROPPED_RANGES_KEPT,
};

// ---- the listener's reloadable settings ----

/// A snapshot whose parts must agree (as a TLS config and a deny list published together).
struct Settings {
    certificate: u64,
    denied: u64,
}

#[test]
fn a_core_adopts_reloaded_settings_whole_and_never_goes_back() {
    loom::model(|| {
        let cell = Arc::new(snapshot::SnapshotCell::new(Settings { certificate: 0, denied: 0 }));
        let signals = cell.clone();
        let reloads = loom::thread::spawn(move || {
            for generation in 1..=2 {
                assert_eq!(signals.publish(Settings { certificate: generation, denied: generation }), generation);
            }
        });
        // A core's driver: checks twice, then once more after the reloads are done.
        let (mut generation, settings) = cell.load();
        assert_eq!((settings.certificate, settings.denied), (generation, generation));
        for _ in 0..2 {
            if let Some((newer, settings)) = cell.newer_than(generation) {
                assert!(newer > generation);
                assert_eq!((settings.certificate, settings.denied), (newer, newer), "a whole snapshot");
                generation = newer;
            }
        }
        reloads.join().unwrap();
        if let Some((newer, _)) = cell.newer_than(generation) {
            generation = newer;
        }
        assert_eq!(generation, 2, "after the last reload, the core runs on it");
    });
}

// ---- the data directory's disk budget ----

#[test]
fn two_cores_never_both_take_the_last_room_under_the_budget() {
    loom::model(|| {
        let budget = Arc::new(DataDirBudget::new(1000, 0, DiskFullPolicy::Block));
        budget.account(0, 900);
        let other = budget.clone();
        let core_1 = loom::thread::spawn(move || other.try_reserve(100));
        let mine = budget.try_reserve(100);
        let theirs = core_1.join().unwrap();
        assert!(mine ^ theirs, "exactly one core gets the last 100 bytes (mine {mine}, theirs {theirs})");
        assert_eq!(budget.used_bytes(), 1000);
    });
}

#[test]
fn a_reservation_given_back_while_another_core_deletes_leaves_the_count_exact() {
    loom::model(|| {
        let budget = Arc::new(DataDirBudget::new(1000, 0, DiskFullPolicy::Block));
        budget.account(0, 600); // core 0's partition
        budget.account(0, 300); // core 1's partition
        let other = budget.clone();
        let core_1 = loom::thread::spawn(move || {
            other.account(300, 100); // retention deleted a segment
        });
        let reserved = budget.try_reserve(100);
        budget.account(100, 0); // the write failed: the reservation goes back
        core_1.join().unwrap();
        assert!(reserved, "900 + 100 fits whatever core 1 did");
        assert_eq!(budget.used_bytes(), 700);
    });
}

#[test]
#[should_panic(expected = "went over the budget")]
fn the_old_check_then_add_lets_two_cores_overshoot() {
    use loom::sync::atomic::AtomicU64;
    loom::model(|| {
        let used = Arc::new(AtomicU64::new(900));
        let check_then_add = |used: &AtomicU64| {
            if used.load(Ordering::Relaxed) + 100 <= 1000 {
                used.fetch_add(100, Ordering::Relaxed);
            }
        };
        let other = used.clone();
        let core_1 = loom::thread::spawn(move || check_then_add(&other));
        check_then_add(&used);
        core_1.join().unwrap();
        assert!(used.load(Ordering::Relaxed) <= 1000, "went over the budget");
    });
}

// ---- the shutdown signal ----

/// A thread's polling loop (a core's serve loop, a listener, a shipper, the admin
/// thread: all poll the same way): polls until the flag is set. `yield_now` is the poll
/// interval's sleep. One poller per model: two pollers yielding to each other before
/// either has seen the store can alternate without end in loom's search (never on
/// hardware, where the store propagates), so each poller is modelled on its own.
fn poll_until_signalled(flag: &AtomicBool) {
    while !shutdown::is_signalled(flag) {
        loom::thread::yield_now();
    }
}

#[test]
fn a_failing_core_and_the_signal_handler_signalling_at_once_stop_the_other_core() {
    loom::model(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let core = {
            let flag = flag.clone();
            loom::thread::spawn(move || poll_until_signalled(&flag))
        };
        let failing = {
            let flag = flag.clone();
            loom::thread::spawn(move || shutdown::signal(&flag))
        };
        shutdown::signal(&flag); // SIGTERM
        failing.join().unwrap();
        core.join().unwrap();
        assert!(shutdown::is_signalled(&flag), "a second signal does not clear the first");
    });
}

/// A core still joining the mesh at start waits for a peer's announcement; the peer's
/// core failed to open its partitions and will never announce itself.
fn wait_for_peer_or_shutdown(peer_joined: &AtomicBool, flag: &AtomicBool) -> bool {
    loop {
        if peer_joined.load(Ordering::Acquire) {
            return true;
        }
        if shutdown::is_signalled(flag) {
            return false;
        }
        loom::thread::yield_now();
    }
}

#[test]
fn a_core_waiting_at_start_for_a_failed_peer_stops_on_shutdown() {
    loom::model(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let peer_joined = Arc::new(AtomicBool::new(false));
        let waiting = {
            let (flag, peer_joined) = (flag.clone(), peer_joined.clone());
            loom::thread::spawn(move || wait_for_peer_or_shutdown(&peer_joined, &flag))
        };
        // The main thread got the peer's `Failed` event and stops every core.
        shutdown::signal(&flag);
        assert!(!waiting.join().unwrap(), "the peer never joined: the waiting core stopped on the flag");
    });
}

#[test]
#[should_panic(expected = "maximum number of branches")]
fn a_core_waiting_only_for_its_peer_never_stops_when_the_peer_failed() {
    let mut builder = loom::model::Builder::new();
    builder.max_branches = 200;
    builder.check(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let peer_joined = Arc::new(AtomicBool::new(false));
        let waiting = {
            let peer_joined = peer_joined.clone();
            loom::thread::spawn(move || {
                while !peer_joined.load(Ordering::Acquire) {
                    loom::thread::yield_now();
                }
            })
        };
        shutdown::signal(&flag);
        waiting.join().unwrap();
    });
}

// ---- open connections per device ----

#[test]
fn two_cores_admitting_one_device_never_let_it_over_its_connection_limit() {
    loom::model(|| {
        let connections = Arc::new(DeviceConnections::default());
        connections.try_open("sensor-7", 2).unwrap(); // already connected on core 0
        let other = connections.clone();
        let core_1 = loom::thread::spawn(move || other.try_open("sensor-7", 2));
        let mine = connections.try_open("sensor-7", 2);
        let theirs = core_1.join().unwrap();
        assert!(mine.is_ok() ^ theirs.is_ok(), "exactly one core admits the second connection");
        assert_eq!(mine.err().or(theirs.err()), Some(2), "the refusal names the connections held");
        assert_eq!(connections.open_count("sensor-7"), 2);
    });
}

#[test]
fn a_connection_ending_on_one_core_while_another_admits_leaves_the_count_exact() {
    loom::model(|| {
        let connections = Arc::new(DeviceConnections::default());
        connections.try_open("sensor-7", 1).unwrap(); // on core 0
        connections.try_open("gateway-1", 1).unwrap(); // another device, on core 1
        let other = connections.clone();
        let core_1 = loom::thread::spawn(move || {
            let admitted = other.try_open("sensor-7", 1);
            assert!(other.open_count("sensor-7") <= 1, "over the limit");
            other.close("gateway-1");
            admitted
        });
        connections.close("sensor-7");
        let admitted = core_1.join().unwrap();
        // Admitted only if the close came first; either way the count is what is open.
        assert_eq!(connections.open_count("sensor-7"), usize::from(admitted.is_ok()));
        assert_eq!(connections.open_count("gateway-1"), 0);
        if admitted.is_ok() {
            connections.close("sensor-7");
        }
        assert_eq!(connections.devices(), 0, "no entry outlives a device's last connection");
    });
}

#[test]
#[should_panic(expected = "over the limit")]
fn a_check_then_separate_add_lets_two_cores_admit_one_device_over_its_limit() {
    use std::collections::HashMap;
    loom::model(|| {
        let open = Arc::new(Mutex::new(HashMap::from([("sensor-7".to_owned(), 1usize)])));
        let check_then_add = |open: &Mutex<HashMap<String, usize>>| {
            let count = *open.lock().unwrap().get("sensor-7").unwrap_or(&0);
            if count < 2 {
                *open.lock().unwrap().entry("sensor-7".to_owned()).or_insert(0) += 1;
            }
        };
        let other = open.clone();
        let core_1 = loom::thread::spawn(move || check_then_add(&other));
        check_then_add(&open);
        core_1.join().unwrap();
        assert!(open.lock().unwrap()["sensor-7"] <= 2, "over the limit");
    });
}

// ---- a shipper's state and a partition's dropped ranges, read by the admin thread ----

fn shipper_states() -> [ShipperState; 4] {
    [
        ShipperState::Starting,
        ShipperState::Running,
        ShipperState::Retrying { problem: "broker 127.0.0.1:9092 unreachable".to_owned() },
        ShipperState::Stopped { error: "OUT_OF_ORDER_SEQUENCE_NUMBER on a re-send".to_owned() },
    ]
}

#[test]
fn the_admin_thread_sees_a_shipper_state_whole_and_never_going_back() {
    loom::model(|| {
        let cell = ShipperStateCell::default();
        let writer = cell.clone();
        let shipper = loom::thread::spawn(move || {
            for state in shipper_states().into_iter().skip(1) {
                writer.set(state);
            }
        });
        let states = shipper_states();
        let first = cell.get();
        let second = cell.get();
        let position = |seen: &ShipperState| {
            states.iter().position(|state| state == seen).unwrap_or_else(|| panic!("torn state {seen:?}"))
        };
        assert!(position(&first) <= position(&second), "went back from {first:?} to {second:?}");
        shipper.join().unwrap();
        assert_eq!(cell.get(), states[3]);
    });
}

#[test]
#[should_panic(expected = "torn state")]
fn a_state_kept_apart_from_its_text_can_be_read_torn() {
    loom::model(|| {
        // The kind in an atomic, the text beside it: 2 = retrying, 3 = stopped.
        let kind = Arc::new(AtomicU8::new(2));
        let text = Arc::new(Mutex::new("broker unreachable".to_owned()));
        let (writer_kind, writer_text) = (kind.clone(), text.clone());
        let shipper = loom::thread::spawn(move || {
            *writer_text.lock().unwrap() = "OUT_OF_ORDER_SEQUENCE_NUMBER".to_owned();
            writer_kind.store(3, Ordering::SeqCst);
        });
        let seen_text = text.lock().unwrap().clone();
        let seen_kind = kind.load(Ordering::SeqCst);
        let whole =
            matches!((seen_kind, seen_text.as_str()), (2, "broker unreachable") | (3, "OUT_OF_ORDER_SEQUENCE_NUMBER"));
        assert!(whole, "torn state: kind {seen_kind} with text {seen_text:?}");
        shipper.join().unwrap();
    });
}

/// The `n`th range drop-oldest deletes: segments of 10 records, oldest first.
fn dropped(n: i64) -> DroppedRange {
    DroppedRange { first_offset: n * 10, last_offset: n * 10 + 9, bytes: 4096 }
}

#[test]
fn the_admin_thread_reads_dropped_ranges_whole_in_order_and_bounded() {
    let pushed = DROPPED_RANGES_KEPT as i64 + 2;
    loom::model(move || {
        let ranges = DroppedRanges::default();
        let writer = ranges.clone();
        let core = loom::thread::spawn(move || {
            for n in 0..pushed {
                writer.push(dropped(n));
            }
        });
        let seen = ranges.list();
        // A window of what was pushed so far: the newest `DROPPED_RANGES_KEPT`, in order.
        assert!(seen.len() <= DROPPED_RANGES_KEPT);
        if let Some(newest) = seen.last() {
            let count = newest.first_offset / 10 + 1;
            let oldest_kept = (count - DROPPED_RANGES_KEPT as i64).max(0);
            let expected: Vec<_> = (oldest_kept..count).map(dropped).collect();
            assert_eq!(seen, expected, "the ranges read are exactly the newest ones pushed");
        }
        core.join().unwrap();
        let expected: Vec<_> = (pushed - DROPPED_RANGES_KEPT as i64..pushed).map(dropped).collect();
        assert_eq!(ranges.list(), expected);
    });
}

// ---- the per-core metric gauges the admin thread reads ----

/// A metric gauge's value store on loom's atomics, with the orderings prometheus-client
/// 0.22 uses for std's `AtomicI64` (all relaxed), so `Gauge<i64, LoomI64>` is the
/// gauge weir's metrics use, under loom.
#[derive(Debug)]
struct LoomI64(loom::sync::atomic::AtomicI64);

impl Default for LoomI64 {
    fn default() -> Self {
        LoomI64(loom::sync::atomic::AtomicI64::new(0))
    }
}

impl prometheus_client::metrics::gauge::Atomic<i64> for LoomI64 {
    fn inc(&self) -> i64 {
        self.inc_by(1)
    }
    fn inc_by(&self, value: i64) -> i64 {
        self.0.fetch_add(value, Ordering::Relaxed)
    }
    fn dec(&self) -> i64 {
        self.dec_by(1)
    }
    fn dec_by(&self, value: i64) -> i64 {
        self.0.fetch_sub(value, Ordering::Relaxed)
    }
    fn set(&self, value: i64) -> i64 {
        self.0.swap(value, Ordering::Relaxed)
    }
    fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

type Gauge = prometheus_client::metrics::gauge::Gauge<i64, LoomI64>;

/// The owning core appends (the end moves to 20) and then retention deletes the oldest
/// segment (the start moves to 15, below the end it published); the admin thread reads
/// the pair with `read` meanwhile. Returns what the admin thread saw.
fn core_moves_the_log_while_the_admin_reads(read: fn(&Gauge, &Gauge) -> (i64, i64)) -> (i64, i64) {
    let (start, end) = (Gauge::default(), Gauge::default());
    end.set(10);
    let (core_start, core_end) = (start.clone(), end.clone());
    let core = loom::thread::spawn(move || {
        core_end.set(20); // a group commit
        core_start.set(15); // retention: the oldest segment went
    });
    let seen = read(&start, &end);
    core.join().unwrap();
    seen
}

#[test]
fn the_admin_thread_never_sees_a_log_that_ends_before_it_starts() {
    loom::model(|| {
        let (start, end) =
            core_moves_the_log_while_the_admin_reads(|start, end| log_offsets_view(|| start.get(), || end.get()));
        assert!(start <= end, "start {start} past end {end}");
        // A start the log had, and an end it had (or, read stale, the start itself: a
        // lower bound of the end it had when that start was written).
        assert!([0, 15].contains(&start), "start {start} was never the log's");
        assert!([10, 20, start].contains(&end), "end {end} was never the log's");
    });
}

#[test]
#[should_panic(expected = "past end")]
fn two_relaxed_gauges_read_apart_can_show_a_log_that_ends_before_it_starts() {
    loom::model(|| {
        let (start, end) = core_moves_the_log_while_the_admin_reads(|start, end| (start.get(), end.get()));
        assert!(start <= end, "start {start} past end {end}");
    });
}
