//! Deterministic simulation of weir's whole pipeline (test-only; see docs/SIMULATION.md).
//!
//! Devices send produce frames over a lossy network to a simulated appliance built from
//! weir's real core: frame checks (`core::protocol`), stream framing and routing
//! (`core::session`), sequence de-duplication (`core::dedup`), batch encoding, write
//! planning and the recovery scan (`core::log`), and the shipper state machine
//! (`core::ship`) against a model broker with Kafka's de-duplication rules. The disk
//! tears unsynced writes at a crash and fails writes and fsyncs; the appliance crashes
//! at random moments and restarts through the real recovery, dedup rebuild and shipper
//! reconciliation. One seeded generator makes every decision and the clock is virtual,
//! so a seed replays exactly.
//!
//! Devices use one connection of one stream, or (in about half the runs) every limit:
//! several connections of several streams with as many frames in flight as weir reads,
//! often against a queue of one append per partition; a run asserts that
//! `SequenceTooOld` only ever answers a frame its partition stored (issue 13).
//!
//! The decisions of the shell's data path are run here, not copied: the stream-order
//! rules and admission (`core::ingest`), the in-flight resend join (`core::dedup::RunGate`),
//! group commit (`core::log::partition::PartitionCore`). What is modelled instead is the
//! I/O they drive: the QUIC transport, the disk (one faulty file per partition) and the
//! shipper's executor (`shell::ship`, against model brokers); SIMULATION.md says how.
//!
//! A failing run panics naming its seed, after printing the last events.
//! `WEIR_SIM_SEED=N` replays one seed, `WEIR_SIM_SEEDS=K` runs K seeds from
//! `WEIR_SIM_FIRST_SEED` (default 1).

pub(crate) mod broker;
mod disk;
mod watch;
mod world;

use std::cell::RefCell;
use std::collections::VecDeque;

use crate::ship::backoff::SplitMix64;

pub(crate) use world::{simulate, Outcome};

/// The seeded generator behind every decision of a run.
#[derive(Debug)]
pub(crate) struct SimRandom(SplitMix64);

impl SimRandom {
    pub(crate) fn new(seed: u64) -> SimRandom {
        SimRandom(SplitMix64::new(seed))
    }

    pub(crate) fn below_or_equal(&mut self, bound: u64) -> u64 {
        self.0.below_or_equal(bound)
    }

    /// A value in `low..=high`.
    pub(crate) fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.0.below_or_equal(high - low)
    }

    /// True with probability `per_mille / 1000`.
    pub(crate) fn per_mille(&mut self, per_mille: u64) -> bool {
        per_mille > 0 && self.0.below_or_equal(999) < per_mille
    }

    pub(crate) fn coin(&mut self) -> bool {
        self.0.below_or_equal(1) == 0
    }
}

/// Lines of trace kept for a failure report (`WEIR_SIM_TRACE_LINES` for more).
const TRACE_LINES_DEFAULT: usize = 80;

fn trace_lines_max() -> usize {
    thread_local! {
        static LINES: usize = env_number("WEIR_SIM_TRACE_LINES").map_or(TRACE_LINES_DEFAULT, |lines| lines as usize);
    }
    LINES.with(|lines| *lines)
}

thread_local! {
    static TRACE: RefCell<VecDeque<String>> = const { RefCell::new(VecDeque::new()) };
}

/// Notes one event of the current run (only the last few are kept).
pub(crate) fn trace(line: String) {
    TRACE.with(|trace| {
        let mut trace = trace.borrow_mut();
        if trace.len() >= trace_lines_max() {
            trace.pop_front();
        }
        trace.push_back(line);
    });
}

fn take_trace() -> Vec<String> {
    TRACE.with(|trace| trace.borrow_mut().drain(..).collect())
}

/// Runs one seed; on failure prints the seed, how to replay it and the last events,
/// then panics with the seed in the message.
pub(crate) fn run_seed(seed: u64) -> Outcome {
    take_trace();
    match std::panic::catch_unwind(|| simulate(seed)) {
        Ok(outcome) => {
            take_trace();
            outcome
        }
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                .unwrap_or_default();
            let trace = take_trace();
            eprintln!("simulation seed {seed} FAILED: {reason}");
            eprintln!("replay: WEIR_SIM_SEED={seed} cargo test --release -p weir-core --lib sim -- --nocapture");
            eprintln!("last {} events (virtual ms):", trace.len());
            for line in trace {
                eprintln!("  {line}");
            }
            panic!("simulation seed {seed} failed: {reason}");
        }
    }
}

/// Seeds the default swarm runs: about 30 s in release on the 2-core dev box; a debug
/// build is about ten times slower, so it runs fewer.
pub(crate) const SWARM_SEEDS_DEFAULT: u64 = if cfg!(debug_assertions) { 100 } else { 1000 };

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|text| text.trim().parse().unwrap_or_else(|_| panic!("{name} is a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_swarm_every_acked_record_reaches_upstream_exactly_once_in_device_order() {
        let first = env_number("WEIR_SIM_FIRST_SEED").unwrap_or(1);
        let seeds: Vec<u64> = match (env_number("WEIR_SIM_SEED"), env_number("WEIR_SIM_SEEDS")) {
            (Some(seed), _) => vec![seed],
            (None, Some(count)) => (first..first + count).collect(),
            (None, None) => (first..first + SWARM_SEEDS_DEFAULT).collect(),
        };
        let started = std::time::Instant::now();
        let mut total = Outcome::default();
        let verbose = env_number("WEIR_SIM_VERBOSE").is_some();
        for seed in &seeds {
            let outcome = run_seed(*seed);
            if verbose {
                eprintln!("seed {seed}: {outcome}");
            }
            total.add(&outcome);
        }
        eprintln!("simulation: {} seeds in {:.1} s: {total}", seeds.len(), started.elapsed().as_secs_f64());
        if seeds.len() >= 50 {
            // The swarm must actually exercise the faults it claims to.
            assert!(total.crashes >= 20, "only {} crashes", total.crashes);
            assert!(total.torn_tails_cut >= 5, "only {} torn tails cut", total.torn_tails_cut);
            assert!(total.poisoned >= 5, "only {} partitions poisoned", total.poisoned);
            assert!(total.dedup_answers >= 50, "only {} resends answered from dedup", total.dedup_answers);
            assert!(total.connection_cuts >= 50, "only {} connection cuts", total.connection_cuts);
            // Devices at every limit under backpressure (issue 13).
            assert!(
                total.at_every_limit * 4 >= seeds.len() as u64,
                "only {} runs at every limit",
                total.at_every_limit
            );
            assert!(
                total.backpressure_at_every_limit >= 50,
                "only {} backpressure answers at every limit",
                total.backpressure_at_every_limit
            );
        }
    }

    // Seeds that failed during development, kept as named regression tests.

    /// The device model sent a new frame on a stream after a retryable error while an
    /// earlier frame's (refused) answer was still outstanding, so a later frame was
    /// stored before the refused one: the device broke docs/PROTOCOL.md section 1 (wait
    /// for every answer after the failed frame, then resend in order). Fixed in the
    /// device model; weir's stream-order rule was right.
    #[test]
    fn simulation_seed_94_device_resends_in_order_after_backpressure() {
        run_seed(94);
    }

    /// A frame sent on a connection the device then abandoned arrived 300 ms later,
    /// after the device had resent it on a new connection and moved more than
    /// `dedup_sequences_per_device_max` sequences ahead: the partition had dropped the
    /// sequence from its window and stored the records a second time. A real bug in
    /// weir (`shell::engine` + `core::dedup`), fixed by answering SequenceTooOld for a
    /// sequence at or below one the window dropped. (Seed 123 found it; after a later
    /// change to the simulation's flusher model its run takes another path, so seeds
    /// 527 and 742, which fail the same way without the fix, pinned the scenario. Since
    /// the simulation drives the real partition core instead of a model of it, seed
    /// 527's run takes another path too and sends no stale copy; 742 still does, and
    /// 1157 is added beside it. Both stay as plain runs.)
    #[test]
    fn simulation_seed_123_stale_copy_from_an_abandoned_connection_is_not_stored_twice() {
        run_seed(123);
    }

    #[test]
    fn simulation_seed_527_stale_copy_from_an_abandoned_connection_is_not_stored_twice() {
        run_seed(527);
    }

    #[test]
    fn simulation_seed_1157_stale_copy_from_an_abandoned_connection_is_not_stored_twice() {
        assert!(run_seed(1157).too_old > 0, "the stale copy is refused as too old");
    }

    #[test]
    fn simulation_seed_742_stale_copy_from_an_abandoned_connection_is_not_stored_twice() {
        assert!(run_seed(742).too_old > 0, "the stale copy is refused as too old");
    }

    /// An append that arrived while a flush was completing (its acks run first, and a
    /// device's next frame arrives in between) overwrote the append the flusher had
    /// carried over, which was never written: that run stayed "in flight" forever and
    /// every resend joined it. A bug of the simulation's flusher model, not of weir
    /// (the real flusher is one task reading one channel). That model is gone: the
    /// simulation now drives `core::log::partition`, the core the real flusher drives.
    #[test]
    fn simulation_seed_442_an_append_during_a_flush_completion_is_not_lost() {
        run_seed(442);
    }

    /// Issue 13: a device at every limit (4 connections x 3 streams, 11 frames in flight
    /// per connection: 44 sequences past its oldest unacknowledged frame) against
    /// partitions with a queue of one append. Frames answered Backpressure waited while
    /// later sequences of the device were stored; with a de-dup window of 5 (what the
    /// config allowed before `quic.dedup_sequences_per_device_max` had to cover
    /// connections x frames in flight) the partition dropped past s8, and its resend was
    /// answered SequenceTooOld although it was never stored: lost for good. Fixed by the
    /// config rule (`core::dedup::sequences_per_device_min`) and the device's window of
    /// docs/PROTOCOL.md section 6; the simulation now asserts that SequenceTooOld only
    /// ever answers a frame its partition stored. (Seed 9 failed at the device instead: a
    /// resend answered SequenceTooOld by a partition that had dropped its stored part.)
    #[test]
    fn simulation_seed_10_a_device_at_every_limit_resending_after_backpressure_never_meets_too_old() {
        let outcome = run_seed(10);
        assert_eq!(outcome.at_every_limit, 1, "seed 10 puts its devices at every limit");
        assert!(outcome.backpressure_at_every_limit > 0, "and answers them Backpressure");
        assert_eq!(outcome.too_old, 0, "its device never sent a stale copy");
    }

    #[test]
    fn simulation_seed_9_a_device_at_every_limit_never_gets_too_old_for_its_own_resend() {
        assert_eq!(run_seed(9).at_every_limit, 1, "seed 9 puts its devices at every limit");
    }

    #[test]
    fn simulation_a_seed_replays_exactly() {
        let first = run_seed(7);
        let second = run_seed(7);
        assert_eq!(first, second);
    }
}
