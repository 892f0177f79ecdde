//! The per-partition shipping state machine: sans-IO, like `quinn_proto::Connection`.
//!
//! The shell feeds it what happened (`handle_*`: the log's end moved, stored batches
//! were read, the broker answered, a connection died, a file became durable, time
//! passed) and asks it what to do next (`poll_action`, `poll_timeout`). It never reads a
//! clock (`now` is an argument), never touches a socket or a file, and draws jitter from
//! a seed, so a simulation replays any run exactly (see the tests at the bottom).
//!
//! Invariants, asserted on every change:
//! - `cursor_offset` only grows; every local offset below it is acknowledged upstream.
//! - In-flight batches cover `[cursor_offset, planned_end)` contiguously, in order; at
//!   most `in_flight_max` (<= 5, Kafka's limit for idempotent producers) exist, and
//!   each Produce request carries exactly one of them.
//! - Read-but-unplanned stored batches cover `[planned_end, read_end)` contiguously.
//! - No batch is sent before the producer id and epoch it is stamped with are durable.
//! - After a restart nothing is sent before reconciliation found which of our
//!   sequences upstream already holds (see `reconcile`).
//! - An OUT_OF_ORDER_SEQUENCE answer for the oldest unacknowledged batch stops the
//!   partition's shipping with `StopReason::OutOfOrderSequence`; nothing re-initialises
//!   the producer behind the operator's back.
//!
//! A broker that forgot this producer (`producer.id.expiration.ms` after its last
//! write) accepts any sequence, so if the first of several pipelined batches were
//! refused the next could land after a gap. So whenever the pipeline starts from empty
//! (at start, after any failure, after being idle) one batch goes alone and the
//! pipeline opens only once it is acknowledged: the broker then knows the sequence
//! again. Under load the pipeline never empties, so this costs one round trip per
//! idle period.
//!
//! Failure handling is deliberately uniform: any retriable error, timeout or lost
//! connection puts every unacknowledged batch back in the queue (same bytes, same
//! sequences), asks the shell to reconnect (which refreshes metadata and the leader),
//! and holds all sends for one backoff delay. Re-sent batches that the broker already
//! holds are de-duplicated by it (they are within its 5-batch window because at most 5
//! are ever unacknowledged).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::backoff::Backoff;
use super::coalesce::{build_next, ProducerIdentity, StoredBatch, UpstreamBatch};
use super::errors::{classify, error_name, ErrorClass};
use super::reconcile::{decide, decide_by_count, FoundBatch, ReconcileError, ScanPlan};
use super::sequence::Sequence;
use super::state::ShipState;
use crate::log::batch::{BatchError, BATCH_BYTES_MAX};
use crate::rate::TokenBucket;

/// Kafka keeps de-duplication state for the last 5 batches of a producer and partition,
/// so an idempotent producer never has more than 5 unacknowledged.
pub const IN_FLIGHT_MAX: usize = 5;

/// The shipper's tunables (from `[upstream]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipConfig {
    /// Largest upstream batch when coalescing (a lone stored batch may exceed it).
    pub batch_bytes_max: usize,
    /// Unacknowledged batches at once, 1..=5.
    pub in_flight_max: usize,
    /// Stored bytes read ahead of what is planned; at least `batch_bytes_max`.
    pub read_ahead_bytes: usize,
    pub request_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often at most the cursor is persisted while it moves.
    pub persist_interval: Duration,
    /// Upstream bytes per second; 0 for no cap.
    pub bandwidth_bytes_per_s_max: u64,
    /// Upstream bytes a reconciliation scan may read before giving up.
    pub reconcile_scan_bytes_max: u64,
}

impl ShipConfig {
    fn check(&self) {
        assert!(self.batch_bytes_max >= 1 && self.batch_bytes_max <= BATCH_BYTES_MAX);
        assert!((1..=IN_FLIGHT_MAX).contains(&self.in_flight_max));
        assert!(self.read_ahead_bytes >= self.batch_bytes_max, "read-ahead smaller than a batch would stall planning");
        assert!(!self.request_timeout.is_zero());
        assert!(!self.backoff_min.is_zero() && self.backoff_min <= self.backoff_max);
    }
}

/// Where this partition goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPartition {
    pub topic: String,
    pub partition: i32,
    /// The partition count the upstream topic must have (`by-key`: exactly the edge
    /// topic's); `None` when any count holding `partition` will do.
    pub partitions_exact: Option<u32>,
}

/// Names one Produce request the shell sent for the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// One Produce request: exactly one batch for this partition, acks=all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub request: RequestId,
    pub batch: Bytes,
    pub first_offset: i64,
    pub last_offset: i64,
    pub base_sequence: Sequence,
    /// 1 for the first send of this batch.
    pub attempt: u32,
}

/// What the shell must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// InitProducerId (v3+, no transactional id), plus the upstream partition's high
    /// watermark; answer with `handle_producer` or `handle_setup_failed`.
    InitProducer,
    /// Scan the upstream partition as `plan` says for batches of `producer`
    /// (`reconcile::Scan`); answer with `handle_scanned`, `handle_reconcile_failed` or
    /// `handle_setup_failed`.
    Reconcile { producer: ProducerIdentity, plan: ScanPlan },
    /// Make `state` durable (write new, fsync, rename, fsync the directory); answer
    /// with `handle_persisted(generation)`.
    Persist { generation: u64, state: ShipState },
    /// Read stored batches from `from_offset` (a batch boundary), about `bytes_max`;
    /// answer with `handle_stored`.
    ReadLog { from_offset: i64, bytes_max: usize },
    /// Send one Produce request; answer with `handle_produced` or
    /// `handle_transport_failed`.
    Send(SendRequest),
    /// Drop the broker connection; the next send connects afresh (metadata, leader).
    Reconnect,
    /// Let the log delete whole segments below `below_offset` (only while it is over
    /// its disk budget): every offset below it is acknowledged upstream and that
    /// cursor is durable, so a restart never needs them again. No answer.
    Retain { below_offset: i64 },
}

/// The broker's answer for our partition in a Produce response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceAnswer {
    /// Appended; the upstream base offset when the broker said (tansu's duplicate
    /// answer does not).
    Appended {
        upstream_offset: Option<i64>,
    },
    Error {
        code: i16,
    },
}

/// Why a partition's shipping stopped. It stays stopped until an operator acts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StopReason {
    #[error(
        "OUT_OF_ORDER_SEQUENCE_NUMBER (45) for local offsets {first_offset}..={last_offset} (producer {producer_id}, \
         epoch {producer_epoch}, base sequence {base_sequence}, attempt {attempts}): the broker's sequence for this \
         producer does not continue where weir's log says it must; shipping of this partition stopped and the \
         producer was not re-initialised (see docs/UPSTREAM.md, \"When shipping stops\")"
    )]
    OutOfOrderSequence {
        producer_id: i64,
        producer_epoch: i16,
        base_sequence: i32,
        first_offset: i64,
        last_offset: i64,
        attempts: u32,
    },
    #[error("the broker refused local offsets {first_offset}..={last_offset} with {name} ({code}); shipping of this partition stopped")]
    BrokerRefused { code: i16, name: &'static str, first_offset: i64, last_offset: i64 },
    #[error("reconciliation with the upstream partition failed: {0}")]
    Reconcile(#[from] ReconcileError),
    #[error(
        "the ship state is for upstream {persisted_topic}/{persisted_partition} but the config maps this partition to \
         {configured_topic}/{configured_partition}"
    )]
    StateMismatch {
        persisted_topic: String,
        persisted_partition: i32,
        configured_topic: String,
        configured_partition: i32,
    },
    #[error("the ship state's cursor {cursor_offset} is beyond the local log end {log_end_offset}: the log lost acknowledged data, or the state belongs to another log")]
    CursorBeyondLog { cursor_offset: i64, log_end_offset: i64 },
    #[error("the log returned a batch at offset {base_offset} where one starting at {expected_offset} was expected: the cursor is not on a batch boundary")]
    NotOnBatchBoundary { expected_offset: i64, base_offset: i64 },
    #[error("the stored batch at offset {offset} cannot be shipped: {reason}")]
    BadStoredBatch { offset: i64, reason: BatchError },
}

/// Counters the shell exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipStats {
    pub shipped_records: u64,
    pub shipped_batches: u64,
    /// Bytes of the upstream batches acknowledged.
    pub shipped_bytes: u64,
    /// Stored bytes of the batches acknowledged (for the lag estimate).
    pub shipped_stored_bytes: u64,
    pub sends: u64,
    pub resends: u64,
    pub retriable_errors: u64,
    pub transport_failures: u64,
    pub timeouts: u64,
    pub duplicates: u64,
    pub batches_reconciled: u64,
    /// Batches found by reconciliation whose sequences the broker did not keep (it
    /// rebuilt them), placed by counting records alone.
    pub sequences_unchecked: u64,
    pub producers_initialised: u64,
    /// Local records skipped because the log no longer held them when a new producer
    /// epoch started (only possible if something deleted unshipped data).
    pub records_skipped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    NeedProducer,
    /// The producer is granted; sends wait until a state holding it is durable.
    PersistingProducer {
        generation: Option<u64>,
    },
    NeedReconcile,
    Running,
    Stopped(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Queued,
    Sent { request: RequestId, deadline: Instant },
    Acked { upstream_offset: Option<i64> },
}

#[derive(Debug, Clone)]
struct InFlight {
    batch: UpstreamBatch,
    stored_bytes: usize,
    status: Status,
    attempts: u32,
}

#[derive(Debug, Clone, Default)]
struct PersistTracker {
    next_generation: u64,
    in_progress: Option<(u64, ShipState)>,
    durable: Option<ShipState>,
    last_started_at: Option<Instant>,
}

/// One partition's shipper.
#[derive(Debug)]
pub struct ShipperCore {
    config: ShipConfig,
    upstream: UpstreamPartition,
    phase: Phase,
    producer: Option<ProducerIdentity>,
    epoch_start_offset: i64,
    cursor_offset: i64,
    scan_from_offset: i64,
    /// Our first local offset at or after `scan_from_offset` upstream, when known.
    scan_from_local_offset: Option<i64>,
    log_start_offset: i64,
    log_end_offset: i64,
    read_end_offset: i64,
    read_outstanding: bool,
    pending: VecDeque<StoredBatch>,
    pending_bytes: usize,
    in_flight: VecDeque<InFlight>,
    next_request: u64,
    backoff: Backoff,
    hold_until: Option<Instant>,
    setup_outstanding: bool,
    /// Scans in a row that ended retriably (`ReconcileError::is_retriable`): later
    /// scans start from earlier points (`ScanPlan::for_attempt`).
    reconcile_attempts: u32,
    /// Why the last scan ended without an answer, while the next one waits.
    reconcile_retrying: Option<ReconcileError>,
    reconnect_pending: bool,
    /// Send one batch alone until it is acknowledged: set at start, after any failure,
    /// and whenever nothing is in flight (see the module doc on forgotten producers).
    solo: bool,
    /// Send each stored batch on its own until the broker appends one (an answer with
    /// an upstream offset): set when a restart left batches in doubt. Every batch weir
    /// ever sent was a run of whole stored batches, so a stored batch is either wholly
    /// upstream or not at all, and a DUPLICATE_SEQUENCE_NUMBER answer for it is true
    /// even from a broker that answers it for any sequence below the next one it
    /// expects (tansu) and whose stored records do not say which producer wrote them
    /// (tansu's SQLite storage), where reconciliation sees nothing. A coalesced batch
    /// reaching past what the broker holds would be answered the same way, and its
    /// tail would be lost.
    uncoalesced: bool,
    /// A persist made a newer cursor durable: the log may delete below it.
    retain_pending: bool,
    retained_below_offset: i64,
    persist: PersistTracker,
    /// The bandwidth cap (`upstream.bandwidth_bytes_per_s_max`); `None`: no cap.
    bucket: Option<TokenBucket>,
    behind_since: Option<Instant>,
    stats: ShipStats,
}

impl ShipperCore {
    /// A shipper for a partition whose log holds `log_start_offset..log_end_offset`,
    /// resuming from `persisted` (the partition's `ship.state`) when there is one.
    pub fn new(
        config: ShipConfig,
        upstream: UpstreamPartition,
        persisted: Option<ShipState>,
        log_start_offset: i64,
        log_end_offset: i64,
        seed: u64,
        now: Instant,
    ) -> ShipperCore {
        config.check();
        assert!(0 <= log_start_offset && log_start_offset <= log_end_offset);
        let backoff = Backoff::new(config.backoff_min, config.backoff_max, seed);
        let bucket = (config.bandwidth_bytes_per_s_max > 0)
            .then(|| TokenBucket::new(config.bandwidth_bytes_per_s_max, config.batch_bytes_max as u64));
        let mut core = ShipperCore {
            config,
            upstream,
            phase: Phase::NeedProducer,
            producer: None,
            epoch_start_offset: log_start_offset,
            cursor_offset: log_start_offset,
            scan_from_offset: 0,
            scan_from_local_offset: None,
            log_start_offset,
            log_end_offset,
            read_end_offset: log_start_offset,
            read_outstanding: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            in_flight: VecDeque::new(),
            next_request: 0,
            backoff,
            hold_until: None,
            setup_outstanding: false,
            reconcile_attempts: 0,
            reconcile_retrying: None,
            reconnect_pending: false,
            solo: true,
            uncoalesced: false,
            retain_pending: false,
            retained_below_offset: 0,
            persist: PersistTracker::default(),
            bucket,
            behind_since: None,
            stats: ShipStats::default(),
        };
        if let Some(state) = persisted {
            core.resume(state);
        }
        core.update_behind(now);
        core.check_invariants();
        core
    }

    fn resume(&mut self, state: ShipState) {
        if state.upstream_topic != self.upstream.topic || state.upstream_partition != self.upstream.partition {
            self.stop(StopReason::StateMismatch {
                persisted_topic: state.upstream_topic.clone(),
                persisted_partition: state.upstream_partition,
                configured_topic: self.upstream.topic.clone(),
                configured_partition: self.upstream.partition,
            });
            return;
        }
        if state.cursor_offset > self.log_end_offset {
            self.stop(StopReason::CursorBeyondLog {
                cursor_offset: state.cursor_offset,
                log_end_offset: self.log_end_offset,
            });
            return;
        }
        self.producer = Some(state.producer);
        self.epoch_start_offset = state.epoch_start_offset;
        self.cursor_offset = state.cursor_offset;
        self.read_end_offset = state.cursor_offset;
        self.scan_from_offset = state.upstream_scan_from_offset;
        self.scan_from_local_offset = state.upstream_scan_from_local_offset;
        self.persist.durable = Some(state.clone());
        // Nothing can be in doubt when the cursor is at the log end: every batch ever
        // sent covered offsets below it.
        self.phase =
            if state.cursor_offset == self.log_end_offset { self.after_cursor_known() } else { Phase::NeedReconcile };
        self.uncoalesced = self.phase == Phase::NeedReconcile;
    }

    /// The phase once the cursor is certain: a new epoch if the log no longer holds
    /// the cursor (sequences must not skip), else shipping.
    fn after_cursor_known(&self) -> Phase {
        if self.cursor_offset < self.log_start_offset {
            Phase::NeedProducer
        } else {
            Phase::Running
        }
    }

    fn stop(&mut self, reason: StopReason) {
        if !matches!(self.phase, Phase::Stopped(_)) {
            self.phase = Phase::Stopped(reason);
        }
    }

    // ----- inputs -----

    /// The log now holds `log_start_offset..log_end_offset` durably.
    pub fn handle_log_end(&mut self, log_start_offset: i64, log_end_offset: i64, now: Instant) {
        assert!(log_end_offset >= self.log_end_offset, "the log's durable end never moves back");
        assert!(log_start_offset >= self.log_start_offset && log_start_offset <= log_end_offset);
        self.log_start_offset = log_start_offset;
        self.log_end_offset = log_end_offset;
        if self.phase == Phase::Running && log_start_offset > self.cursor_offset {
            self.skip_dropped();
        }
        self.update_behind(now);
    }

    /// The log deleted records this shipper had not shipped (`log.disk_full_policy =
    /// drop-oldest`). What it holds of them is dropped too (a batch of them that was in
    /// flight may still land upstream: it is never sent again), the connection goes
    /// with their answers, and a new producer epoch starts at the log's start
    /// (`handle_producer`), since sequences must not skip.
    fn skip_dropped(&mut self) {
        self.in_flight.clear();
        self.pending.clear();
        self.pending_bytes = 0;
        self.read_end_offset = self.cursor_offset;
        self.reconnect_pending = true;
        self.solo = true;
        self.phase = Phase::NeedProducer;
        self.check_invariants();
    }

    /// Stored batches read from `from_offset` (the `ReadLog` asked for).
    pub fn handle_stored(&mut self, from_offset: i64, batches: Vec<Bytes>) {
        assert!(self.read_outstanding, "a read answer without a read");
        self.read_outstanding = false;
        if self.phase != Phase::Running || from_offset != self.read_end_offset {
            return; // the plan changed while reading (stopped); drop the answer
        }
        for bytes in batches {
            let stored = match StoredBatch::new(bytes) {
                Ok(stored) => stored,
                Err(reason) => {
                    self.stop(StopReason::BadStoredBatch { offset: self.read_end_offset, reason });
                    return;
                }
            };
            if stored.base_offset() != self.read_end_offset {
                self.stop(StopReason::NotOnBatchBoundary {
                    expected_offset: self.read_end_offset,
                    base_offset: stored.base_offset(),
                });
                return;
            }
            if stored.next_offset() > self.log_end_offset {
                break; // beyond the durable end this core was told about; read again later
            }
            self.read_end_offset = stored.next_offset();
            self.pending_bytes += stored.len();
            self.pending.push_back(stored);
        }
        self.check_invariants();
    }

    /// InitProducerId granted `producer`; the upstream partition ended at
    /// `upstream_end_offset` at that moment (where a scan for this producer starts).
    pub fn handle_producer(&mut self, producer: ProducerIdentity, upstream_end_offset: i64) {
        assert_eq!(self.phase, Phase::NeedProducer);
        assert!(self.setup_outstanding && self.in_flight.is_empty() && self.pending.is_empty());
        assert!(producer.id >= 0 && producer.epoch >= 0, "the broker granted no producer id");
        assert!(upstream_end_offset >= 0);
        self.setup_outstanding = false;
        self.backoff.reset();
        if self.cursor_offset < self.log_start_offset {
            self.stats.records_skipped += (self.log_start_offset - self.cursor_offset) as u64;
            self.cursor_offset = self.log_start_offset;
        }
        self.producer = Some(producer);
        self.epoch_start_offset = self.cursor_offset;
        self.read_end_offset = self.cursor_offset;
        self.scan_from_offset = upstream_end_offset;
        self.scan_from_local_offset = Some(self.cursor_offset);
        self.stats.producers_initialised += 1;
        self.phase = Phase::PersistingProducer { generation: None };
        self.check_invariants();
    }

    /// The reconciliation scan finished; `ours` are the batches of our producer it saw.
    pub fn handle_scanned(&mut self, ours: &[FoundBatch]) {
        assert_eq!(self.phase, Phase::NeedReconcile);
        assert!(self.setup_outstanding);
        self.setup_outstanding = false;
        self.backoff.reset();
        self.reconcile_attempts = 0;
        self.reconcile_retrying = None;
        let producer = self.producer.expect("reconciliation needs a producer");
        // Counting needs the scan point's local offset (every state since format
        // version 2 has it); a version 1 state falls back to the batches' sequences.
        let decided = match self.scan_from_local_offset {
            Some(scan_from_local_offset) => decide_by_count(
                producer,
                self.epoch_start_offset,
                self.cursor_offset,
                self.scan_from_offset,
                scan_from_local_offset,
                self.log_end_offset,
                ours,
            ),
            None => decide(
                producer,
                self.epoch_start_offset,
                self.cursor_offset,
                self.scan_from_offset,
                self.log_end_offset,
                ours,
            ),
        };
        match decided {
            Ok(reconciled) => {
                assert!(reconciled.cursor_offset >= self.cursor_offset);
                self.cursor_offset = reconciled.cursor_offset;
                self.read_end_offset = reconciled.cursor_offset;
                self.scan_from_offset = reconciled.upstream_scan_from_offset;
                if reconciled.upstream_scan_from_local_offset.is_some() {
                    self.scan_from_local_offset = reconciled.upstream_scan_from_local_offset;
                }
                self.stats.batches_reconciled += reconciled.batches_recovered as u64;
                self.stats.sequences_unchecked += reconciled.sequences_unchecked as u64;
                self.phase = self.after_cursor_known();
            }
            Err(error) => self.stop(StopReason::Reconcile(error)),
        }
        self.check_invariants();
    }

    /// The reconciliation scan ended without an answer. What another scan can resolve
    /// (an offset the broker counts but did not answer, a high watermark behind the
    /// scan point) is tried again after a backoff, from ever earlier points
    /// (`ScanPlan::for_attempt`), and `reconcile_retrying` says why meanwhile; the
    /// rest only an operator can resolve, and shipping stops.
    pub fn handle_reconcile_failed(&mut self, error: ReconcileError, now: Instant) {
        assert_eq!(self.phase, Phase::NeedReconcile);
        assert!(self.setup_outstanding);
        self.setup_outstanding = false;
        if error.is_retriable() {
            self.reconcile_attempts = self.reconcile_attempts.saturating_add(1);
            self.reconcile_retrying = Some(error);
            self.hold_until = Some(now + self.backoff.next_delay());
            self.reconnect_pending = true;
        } else {
            self.stop(StopReason::Reconcile(error));
        }
    }

    /// InitProducer or Reconcile could not reach the broker: try again after a backoff.
    pub fn handle_setup_failed(&mut self, now: Instant) {
        assert!(self.setup_outstanding);
        self.setup_outstanding = false;
        self.hold_until = Some(now + self.backoff.next_delay());
        self.reconnect_pending = true;
        self.stats.transport_failures += 1;
    }

    /// The `Persist` with `generation` is durable.
    pub fn handle_persisted(&mut self, generation: u64) {
        let (in_progress, state) = self.persist.in_progress.take().expect("a persist answer without a persist");
        assert_eq!(in_progress, generation);
        if state.cursor_offset > self.retained_below_offset {
            self.retain_pending = true;
        }
        self.persist.durable = Some(state);
        if let Phase::PersistingProducer { generation: Some(needed) } = self.phase {
            if generation >= needed {
                self.phase = Phase::Running;
            }
        }
    }

    /// The broker answered `request`.
    pub fn handle_produced(&mut self, request: RequestId, answer: ProduceAnswer, now: Instant) {
        if matches!(self.phase, Phase::Stopped(_)) {
            return;
        }
        let Some(index) = self
            .in_flight
            .iter()
            .position(|entry| matches!(entry.status, Status::Sent { request: sent, .. } if sent == request))
        else {
            return; // an answer to a request already given up on
        };
        let answer = match answer {
            ProduceAnswer::Error { code } if classify(code) == ErrorClass::AlreadyAppended => {
                self.stats.duplicates += 1;
                ProduceAnswer::Appended { upstream_offset: None }
            }
            other => other,
        };
        match answer {
            ProduceAnswer::Appended { upstream_offset } => {
                self.in_flight[index].status =
                    Status::Acked { upstream_offset: upstream_offset.filter(|offset| *offset >= 0) };
                self.backoff.reset();
                self.advance_cursor(now);
            }
            ProduceAnswer::Error { code } => match classify(code) {
                ErrorClass::Retriable => {
                    self.stats.retriable_errors += 1;
                    self.fail_all(now);
                }
                ErrorClass::OutOfOrderSequence if index > 0 => {
                    // An earlier batch is not acknowledged yet, so this one could not
                    // continue the sequence: it is sent again after it.
                    self.fail_all(now);
                }
                ErrorClass::OutOfOrderSequence => {
                    let entry = &self.in_flight[index];
                    let producer = self.producer.expect("a sent batch has a producer");
                    let reason = StopReason::OutOfOrderSequence {
                        producer_id: producer.id,
                        producer_epoch: producer.epoch,
                        base_sequence: entry.batch.base_sequence.0,
                        first_offset: entry.batch.first_offset,
                        last_offset: entry.batch.last_offset(),
                        attempts: entry.attempts,
                    };
                    self.stop(reason);
                }
                ErrorClass::Fatal => {
                    let entry = &self.in_flight[index];
                    let reason = StopReason::BrokerRefused {
                        code,
                        name: error_name(code),
                        first_offset: entry.batch.first_offset,
                        last_offset: entry.batch.last_offset(),
                    };
                    self.stop(reason);
                }
                ErrorClass::AlreadyAppended => unreachable!("mapped to Appended above"),
            },
        }
        self.check_invariants();
    }

    /// The connection carrying our requests failed (or could not be made): their
    /// answers will never come.
    pub fn handle_transport_failed(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopped(_)) {
            return;
        }
        self.stats.transport_failures += 1;
        self.fail_all(now);
    }

    /// Time passed: requests past their deadline count as lost.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopped(_)) {
            return;
        }
        let expired =
            self.in_flight.iter().any(|entry| matches!(entry.status, Status::Sent { deadline, .. } if deadline <= now));
        if expired {
            self.stats.timeouts += 1;
            self.fail_all(now);
        }
        if let Some(bucket) = self.bucket.as_mut() {
            bucket.refill(now);
        }
    }

    fn fail_all(&mut self, now: Instant) {
        for entry in &mut self.in_flight {
            if matches!(entry.status, Status::Sent { .. }) {
                entry.status = Status::Queued;
            }
        }
        self.hold_until = Some(now + self.backoff.next_delay());
        self.reconnect_pending = true;
        self.solo = true;
    }

    fn advance_cursor(&mut self, now: Instant) {
        while let Some(front) = self.in_flight.front() {
            let Status::Acked { upstream_offset } = front.status else { break };
            let entry = self.in_flight.pop_front().expect("front exists");
            assert_eq!(entry.batch.first_offset, self.cursor_offset, "acknowledgements move the cursor contiguously");
            self.cursor_offset = entry.batch.next_offset();
            if let Some(upstream_offset) = upstream_offset {
                self.uncoalesced = false;
                let upstream_end = upstream_offset + i64::from(entry.batch.record_count);
                if upstream_end > self.scan_from_offset {
                    self.scan_from_offset = upstream_end;
                    self.scan_from_local_offset = Some(self.cursor_offset);
                }
            }
            self.stats.shipped_records += entry.batch.record_count as u64;
            self.stats.shipped_batches += 1;
            self.stats.shipped_bytes += entry.batch.bytes.len() as u64;
            self.stats.shipped_stored_bytes += entry.stored_bytes as u64;
        }
        self.solo = self.in_flight.is_empty();
        self.update_behind(now);
    }

    fn update_behind(&mut self, now: Instant) {
        if self.cursor_offset >= self.log_end_offset {
            self.behind_since = None;
        } else if self.behind_since.is_none() {
            self.behind_since = Some(now);
        }
    }

    // ----- outputs -----

    /// The next thing to do, or `None` until an input arrives or `poll_timeout` passes.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if matches!(self.phase, Phase::Stopped(_)) {
            return None;
        }
        if self.reconnect_pending {
            self.reconnect_pending = false;
            return Some(Action::Reconnect);
        }
        if self.retain_pending {
            self.retain_pending = false;
            let below_offset = self.persist.durable.as_ref().expect("retention follows a persist").cursor_offset;
            assert!(below_offset <= self.cursor_offset);
            self.retained_below_offset = below_offset;
            return Some(Action::Retain { below_offset });
        }
        let held = self.hold_until.is_some_and(|until| now < until);
        match self.phase {
            Phase::NeedProducer if !self.setup_outstanding && !held && self.persist.in_progress.is_none() => {
                self.setup_outstanding = true;
                return Some(Action::InitProducer);
            }
            Phase::NeedReconcile if !self.setup_outstanding && !held => {
                self.setup_outstanding = true;
                return Some(Action::Reconcile {
                    producer: self.producer.expect("reconciliation needs a producer"),
                    plan: ScanPlan::for_attempt(
                        self.scan_from_offset,
                        self.reconcile_attempts,
                        self.config.reconcile_scan_bytes_max,
                    ),
                });
            }
            _ => {}
        }
        if let Some(action) = self.poll_persist(now) {
            return Some(action);
        }
        if self.phase != Phase::Running {
            return None;
        }
        if !self.read_outstanding
            && self.read_end_offset < self.log_end_offset
            && self.pending_bytes < self.config.read_ahead_bytes
        {
            self.read_outstanding = true;
            return Some(Action::ReadLog {
                from_offset: self.read_end_offset,
                bytes_max: self.config.read_ahead_bytes - self.pending_bytes,
            });
        }
        if let Err(reason) = self.plan() {
            self.stop(reason);
            return None;
        }
        if held {
            return None;
        }
        if let Some(bucket) = self.bucket.as_mut() {
            bucket.refill(now);
        }
        let index = self.in_flight.iter().position(|entry| entry.status == Status::Queued)?;
        let sent = self.in_flight.iter().filter(|entry| matches!(entry.status, Status::Sent { .. })).count();
        if self.solo && sent > 0 {
            return None;
        }
        if !self.bucket.as_ref().is_none_or(TokenBucket::ready) {
            return None;
        }
        let request = RequestId(self.next_request);
        self.next_request += 1;
        let entry = &mut self.in_flight[index];
        entry.status = Status::Sent { request, deadline: now + self.config.request_timeout };
        entry.attempts += 1;
        let send = SendRequest {
            request,
            batch: entry.batch.bytes.clone(),
            first_offset: entry.batch.first_offset,
            last_offset: entry.batch.last_offset(),
            base_sequence: entry.batch.base_sequence,
            attempt: entry.attempts,
        };
        self.stats.sends += 1;
        if send.attempt > 1 {
            self.stats.resends += 1;
        }
        if let Some(bucket) = self.bucket.as_mut() {
            bucket.take(send.batch.len() as u64);
        }
        self.check_invariants();
        Some(Action::Send(send))
    }

    fn poll_persist(&mut self, now: Instant) -> Option<Action> {
        if self.persist.in_progress.is_some() {
            return None;
        }
        let state = self.current_state()?;
        if self.persist.durable.as_ref() == Some(&state) {
            if let Phase::PersistingProducer { generation: None } = self.phase {
                self.phase = Phase::Running;
            }
            return None;
        }
        let forced = matches!(self.phase, Phase::PersistingProducer { generation: None });
        let due = self.persist.last_started_at.is_none_or(|started| now >= started + self.config.persist_interval);
        if !(forced || due) {
            return None;
        }
        let generation = self.persist.next_generation;
        self.persist.next_generation += 1;
        self.persist.in_progress = Some((generation, state.clone()));
        self.persist.last_started_at = Some(now);
        if forced {
            self.phase = Phase::PersistingProducer { generation: Some(generation) };
        }
        Some(Action::Persist { generation, state })
    }

    /// Moves pending stored batches into upstream batches while there is room in flight.
    fn plan(&mut self) -> Result<(), StopReason> {
        let producer = match self.producer {
            Some(producer) => producer,
            None => return Ok(()),
        };
        while self.in_flight.len() < self.config.in_flight_max && !self.pending.is_empty() {
            // Coalesce only when behind: wait for a full batch's worth while the log
            // holds more than was read; at the log's end, ship what there is.
            let caught_up = self.read_end_offset >= self.log_end_offset && !self.read_outstanding;
            if self.pending_bytes < self.config.batch_bytes_max && !caught_up && !self.uncoalesced {
                break;
            }
            let pending = self.pending.make_contiguous();
            let pending = if self.uncoalesced { &pending[..1] } else { pending };
            let first_offset = pending[0].base_offset();
            let batch = build_next(pending, self.config.batch_bytes_max, producer, self.epoch_start_offset)
                .map_err(|reason| StopReason::BadStoredBatch { offset: first_offset, reason })?;
            let mut stored_bytes = 0;
            for _ in 0..batch.stored_batches {
                let stored = self.pending.pop_front().expect("the batch was built from pending batches");
                stored_bytes += stored.len();
            }
            self.pending_bytes -= stored_bytes;
            self.in_flight.push_back(InFlight { batch, stored_bytes, status: Status::Queued, attempts: 0 });
        }
        self.check_invariants();
        Ok(())
    }

    /// When `poll_action` may have something new to do without any input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.phase, Phase::Stopped(_)) {
            return None;
        }
        let mut earliest: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                earliest = Some(earliest.map_or(at, |current| current.min(at)));
            }
        };
        for entry in &self.in_flight {
            if let Status::Sent { deadline, .. } = entry.status {
                consider(Some(deadline));
            }
        }
        // Only waits that time alone ends count: a batch queued behind a lone one in
        // flight waits for an answer, not for a clock (a past time here would make
        // the shell spin).
        let sent = self.in_flight.iter().filter(|entry| matches!(entry.status, Status::Sent { .. })).count();
        let sendable_waiting =
            self.in_flight.iter().any(|entry| entry.status == Status::Queued) && !(self.solo && sent > 0);
        let setup_waiting = matches!(self.phase, Phase::NeedProducer | Phase::NeedReconcile) && !self.setup_outstanding;
        if sendable_waiting || setup_waiting {
            consider(self.hold_until);
        }
        if sendable_waiting {
            consider(self.bucket.as_ref().and_then(TokenBucket::ready_at));
        }
        if self.persist.in_progress.is_none() {
            if let Some(state) = self.current_state() {
                if self.persist.durable.as_ref() != Some(&state) {
                    consider(self.persist.last_started_at.map(|started| started + self.config.persist_interval));
                }
            }
        }
        earliest
    }

    // ----- queries -----

    /// The state to persist now, if a producer was ever granted.
    pub fn current_state(&self) -> Option<ShipState> {
        let producer = self.producer?;
        Some(ShipState {
            producer,
            epoch_start_offset: self.epoch_start_offset,
            cursor_offset: self.cursor_offset,
            upstream_scan_from_offset: self.scan_from_offset,
            upstream_scan_from_local_offset: self.scan_from_local_offset,
            upstream_topic: self.upstream.topic.clone(),
            upstream_partition: self.upstream.partition,
        })
    }

    /// Whether the durable state lags the cursor (a clean shutdown persists it).
    pub fn needs_final_persist(&self) -> bool {
        match (self.current_state(), &self.persist.durable) {
            (Some(current), Some(durable)) => current != *durable,
            (Some(_), None) => !matches!(self.phase, Phase::PersistingProducer { .. }),
            (None, _) => false,
        }
    }

    pub fn cursor_offset(&self) -> i64 {
        self.cursor_offset
    }

    pub fn log_end_offset(&self) -> i64 {
        self.log_end_offset
    }

    pub fn producer(&self) -> Option<ProducerIdentity> {
        self.producer
    }

    /// Records in the log not yet acknowledged upstream.
    pub fn lag_records(&self) -> i64 {
        self.log_end_offset - self.cursor_offset
    }

    /// How long the cursor has trailed the log end (zero when caught up).
    pub fn lag_duration(&self, now: Instant) -> Duration {
        self.behind_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// Why reconciliation is being tried again, while it is (for `/status`).
    pub fn reconcile_retrying(&self) -> Option<&ReconcileError> {
        self.reconcile_retrying.as_ref().filter(|_| self.phase == Phase::NeedReconcile)
    }

    pub fn stop_reason(&self) -> Option<&StopReason> {
        match &self.phase {
            Phase::Stopped(reason) => Some(reason),
            _ => None,
        }
    }

    pub fn stats(&self) -> ShipStats {
        self.stats
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    fn check_invariants(&self) {
        assert!(self.cursor_offset >= self.epoch_start_offset || self.producer.is_none());
        if let Some(local) = self.scan_from_local_offset {
            assert!(self.epoch_start_offset <= local && local <= self.cursor_offset, "the scan point is acknowledged");
        }
        assert!(self.in_flight.len() <= self.config.in_flight_max);
        let mut next = self.cursor_offset;
        for entry in &self.in_flight {
            assert_eq!(entry.batch.first_offset, next, "in-flight batches are contiguous from the cursor");
            assert_eq!(entry.batch.base_sequence, Sequence::of_offset(next, self.epoch_start_offset));
            next = entry.batch.next_offset();
        }
        for stored in &self.pending {
            assert_eq!(stored.base_offset(), next, "pending batches continue the in-flight ones");
            next = stored.next_offset();
        }
        if self.phase == Phase::Running {
            assert_eq!(next, self.read_end_offset, "everything read is pending or in flight");
        }
        assert_eq!(self.pending.iter().map(StoredBatch::len).sum::<usize>(), self.pending_bytes);
        assert!(self.read_end_offset <= self.log_end_offset);
        let sent = self.in_flight.iter().filter(|entry| matches!(entry.status, Status::Sent { .. })).count();
        assert!(sent <= IN_FLIGHT_MAX);
        if !matches!(self.phase, Phase::Running | Phase::Stopped(_)) {
            assert!(self.in_flight.is_empty(), "nothing is in flight before shipping starts");
        }
    }
}

#[cfg(test)]
#[path = "shipper_tests.rs"]
mod tests;
