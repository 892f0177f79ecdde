//! One partition's group commit as a sans-IO state machine, like `core::ship::shipper`.
//!
//! The shell feeds it what happened (`handle_*`: an append arrived, the queue ran dry,
//! a batch was planned, a reservation was granted, a segment rolled, a write or sync
//! finished or failed, room was made, a close was asked) and asks what to do next
//! (`poll_action`, `wants_append`). It never reads a clock (`now` is an argument), never
//! touches a file, and never sees a record: appends are known by their bound bytes and
//! record count, and every action about them means "the oldest N appends you keep",
//! so the shell holds the records in arrival order and the hot path copies nothing.
//!
//! What it decides: when a group is complete (the flush window `flush_delay_max`,
//! taken only by an append that finds the partition idle; then, with the core's
//! `FlushPacer`, the core's next flush slot, gathering until it comes;
//! `flush_bytes_max`, the append that would overflow carried to the next group), when the active segment
//! rolls (too full or too old), where each batch goes and how far the file is
//! preallocated (keeping `disk_reserve_bytes` free on the filesystem), when an index
//! entry is added and when pending entries are written, the data directory's
//! reservation for the batch being written, what a full disk does (make room, under
//! drop-oldest wait for other partitions, then refuse `DiskFull` with nothing written)
//! and poisoning (any other failed write or sync: never retried, every later append
//! refused).
//!
//! Invariants, asserted on every change:
//! - At most one group is in flight; appends are answered in arrival order, each
//!   exactly once; acknowledged offsets are contiguous from the durable end.
//! - A gathered group's bound bytes (header included) never exceed `flush_bytes_max`;
//!   only the append that did not fit is carried.
//! - Bytes are reserved only between the reservation and the end of that write's
//!   attempt; a poisoned partition holds no reservation and starts no write.
//! - `index_written <= index_entries`; the durable end never passes the allocation.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::batch::BATCH_HEADER_BYTES;
use super::index::IndexEntry;
use super::pacer::FlushPacer;
use super::segment::{plan_append, WritePlan};

/// Index entries kept in memory before they are written to the index file together:
/// an index write on every flush would cost a second device write per flush. After a
/// crash, recovery scans from the last written entry: at most this many index
/// intervals more.
pub const INDEX_ENTRIES_PER_WRITE: usize = 16;

/// The most segments one flush may delete to make room (a safety bound; each attempt
/// deletes one segment or gives up).
pub const MAKE_ROOM_ATTEMPTS_MAX: usize = 4096;

/// How long at most a partition with no segment of its own to drop waits for other
/// partitions to free room under `drop-oldest`, in steps, before refusing appends.
pub const ROOM_WAIT_STEP: Duration = Duration::from_millis(10);
pub const ROOM_WAIT_STEPS: usize = 50;

/// The partition's tunables (from `[log]`) and the filesystem floor it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionConfig {
    pub segment_bytes_max: u64,
    pub segment_age_max: Duration,
    pub index_interval_bytes: u64,
    pub preallocate_bytes: u64,
    pub flush_delay_max: Duration,
    pub flush_bytes_max: usize,
    pub alignment_bytes: u64,
    /// Bytes a write leaves free on the filesystem (room for `ship.state`, index files
    /// and directory entries: shipping is what frees the disk).
    pub disk_reserve_bytes: u64,
}

/// The active segment as recovery (or a roll) leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveState {
    pub base_offset: i64,
    pub end_position: u64,
    pub next_offset: i64,
    /// Bytes allocated to the log file (at least `end_position`).
    pub allocated_bytes: u64,
    /// Index entries in memory, and how many of them are in the index file.
    pub index_entries: usize,
    pub index_written: usize,
    pub bytes_since_index: u64,
    pub created_at: Instant,
}

impl ActiveState {
    /// A new, empty segment starting at `base_offset`.
    pub fn empty(base_offset: i64, created_at: Instant) -> ActiveState {
        ActiveState {
            base_offset,
            end_position: 0,
            next_offset: base_offset,
            allocated_bytes: 0,
            index_entries: 0,
            index_written: 0,
            bytes_since_index: 0,
            created_at,
        }
    }
}

/// Why an append was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The disk is full and nothing could be freed; nothing was written.
    DiskFull,
    /// This append's write or sync failed: the failure that poisoned the partition.
    Failed,
    /// The partition was poisoned by an earlier failure.
    Poisoned,
}

/// How an I/O step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The filesystem had no room and nothing was written (a preallocation refused).
    FullBeforeWrite,
    /// Anything else: what is on the disk is unknown, so the partition is poisoned.
    Other,
}

/// What made the disk full, for the shell's refusal and log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullCause {
    /// The data directory is at `log.data_dir_bytes_max` (the reservation was refused).
    DataDirBudget,
    /// The write would leave less than `disk_reserve_bytes` free on the filesystem.
    ReserveFloor { write_end: u64 },
    /// The filesystem refused the preallocation.
    Filesystem,
}

/// One batch write: the oldest `appends` appends, encoded at `base_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStep {
    pub base_offset: i64,
    pub batch_bytes: usize,
    pub plan: WritePlan,
    /// The index entry this batch adds, before the write.
    pub index_entry: Option<IndexEntry>,
    /// Write the index entries not yet in the index file, alongside the batch.
    pub write_index: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Plan one batch of the oldest `appends` appends; answer `handle_batch_bytes`.
    Plan { appends: usize },
    /// Reserve `bytes` in the data directory's budget; answer `handle_reserved`.
    Reserve { bytes: u64 },
    /// The reservation ended without a write: give it back.
    Unreserve { bytes: u64 },
    /// Seal the active segment and start one at `base_offset`; answer `handle_rolled`.
    Roll { base_offset: i64 },
    /// Measure the filesystem's free bytes; answer `handle_free_bytes`.
    MeasureFree,
    /// Write the batch (and the index entries); answer `handle_written`.
    Write(WriteStep),
    /// fdatasync the log; answer `handle_synced`.
    Sync,
    /// Delete the oldest segment this partition may delete; answer `handle_room_made`.
    MakeRoom,
    /// Ask the other partitions for room for the oldest `appends` appends, wait `wait`,
    /// answer `handle_room_waited`.
    WaitForRoom { appends: usize, wait: Duration },
    /// The oldest `appends` appends are refused for a full disk (count and log it);
    /// their `Reply`s follow.
    DiskFull { appends: usize, cause: FullCause },
    /// The last failure poisoned the partition (record it); the `Reply`s follow.
    Poisoned,
    /// Answer the oldest append.
    Reply(Result<i64, Refusal>),
    /// Close: seal the active segment if `seal`, answer the close, stop.
    Close { seal: bool },
    /// Every appender is gone: stop.
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    bound_bytes: usize,
    record_count: u32,
}

/// Where the group in flight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No group: the next append starts one.
    Idle,
    /// Gathering appends until `window_end` (or the queue runs dry, when busy);
    /// `slotted` once the window was extended to the core's flush slot.
    Gathering {
        window_end: Instant,
        slotted: bool,
    },
    Planning,
    Reserving,
    Rolling,
    Measuring {
        plan: WritePlan,
    },
    Writing,
    Syncing,
    MakingRoom,
    WaitingForRoom,
    /// Closed or stopped: nothing more happens.
    Done,
}

/// The group being written, across its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flush {
    batch_bytes: usize,
    attempts: usize,
    waited: usize,
    written: Option<WriteStep>,
}

#[derive(Debug)]
pub struct PartitionCore {
    config: PartitionConfig,
    active: ActiveState,
    stage: Stage,
    /// The group being gathered or written, oldest first.
    group: VecDeque<Pending>,
    group_bytes: usize,
    carried: Option<Pending>,
    flush: Option<Flush>,
    reserved_bytes: u64,
    last_flush_end: Option<Instant>,
    poisoned: bool,
    drop_oldest: bool,
    /// The flush slots this partition shares with the other partitions of its core;
    /// `None`: unpaced.
    pacer: Option<Rc<RefCell<FlushPacer>>>,
    close_asked: bool,
    input_closed: bool,
    /// Why the group in flight last found the disk full.
    last_full: Option<FullCause>,
    actions: VecDeque<Action>,
}

impl PartitionCore {
    pub fn new(config: PartitionConfig, active: ActiveState) -> PartitionCore {
        assert!(config.alignment_bytes.is_power_of_two());
        assert!(config.flush_bytes_max > BATCH_HEADER_BYTES);
        assert!(config.preallocate_bytes > 0);
        let core = PartitionCore {
            config,
            active,
            stage: Stage::Idle,
            group: VecDeque::with_capacity(64),
            group_bytes: 0,
            carried: None,
            flush: None,
            reserved_bytes: 0,
            last_flush_end: None,
            poisoned: false,
            drop_oldest: false,
            pacer: None,
            close_asked: false,
            input_closed: false,
            last_full: None,
            actions: VecDeque::with_capacity(64),
        };
        core.check_invariants();
        core
    }

    /// Whether a full disk may drop unshipped segments (`log.disk_full_policy`).
    pub fn set_drop_oldest(&mut self, drop_oldest: bool) {
        self.drop_oldest = drop_oldest;
    }

    /// Paces this partition's small flushes with the other partitions of its core.
    pub fn set_pacer(&mut self, pacer: Rc<RefCell<FlushPacer>>) {
        self.pacer = Some(pacer);
    }

    // ----- inputs -----

    /// An append of `record_count` records whose bytes in a batch are at most
    /// `bound_bytes` (headers excluded) arrived. Only when `wants_append`.
    pub fn handle_append(&mut self, bound_bytes: usize, record_count: u32, now: Instant) {
        assert!(self.wants_append().is_some(), "an append fed while the core does not take one");
        assert!(record_count > 0);
        let append = Pending { bound_bytes, record_count };
        match self.stage {
            Stage::Idle => self.start_group(append, now),
            Stage::Gathering { .. } => {
                if self.group_bytes + bound_bytes > self.config.flush_bytes_max {
                    self.carried = Some(append);
                    self.group_complete(now);
                } else {
                    self.group_bytes += bound_bytes;
                    self.group.push_back(append);
                    if self.group_bytes >= self.config.flush_bytes_max {
                        self.group_complete(now);
                    }
                }
            }
            stage => unreachable!("append in {stage:?}"),
        }
        self.check_invariants();
    }

    /// The shell found no append waiting at `now`. A group whose window has ended
    /// takes the core's next flush slot and gathers until it comes (paced), or is
    /// complete.
    pub fn handle_queue_empty(&mut self, now: Instant) {
        if let Stage::Gathering { window_end, slotted } = self.stage {
            if now >= window_end {
                let slot = match (&self.pacer, slotted) {
                    (Some(pacer), false) => pacer.borrow_mut().take_slot(now),
                    _ => now,
                };
                if slot > now {
                    self.stage = Stage::Gathering { window_end: slot, slotted: true };
                } else {
                    self.group_complete(now);
                }
            }
        }
        self.check_invariants();
    }

    /// A close was asked: what is gathered and carried is written, then the partition
    /// closes.
    pub fn handle_close(&mut self, now: Instant) {
        self.close_asked = true;
        self.input_closed = true;
        self.end_of_input(now);
    }

    /// Every appender is gone: what is gathered and carried is written, then the
    /// flusher stops (without sealing).
    pub fn handle_input_closed(&mut self, now: Instant) {
        self.input_closed = true;
        self.end_of_input(now);
    }

    fn end_of_input(&mut self, now: Instant) {
        match self.stage {
            Stage::Idle => self.finish_input(),
            Stage::Gathering { .. } => self.group_complete(now),
            stage => unreachable!("input ended in {stage:?}"),
        }
        self.check_invariants();
    }

    /// The batch of the group planned at `batch_bytes` (exact, header included).
    pub fn handle_batch_bytes(&mut self, batch_bytes: usize) {
        assert_eq!(self.stage, Stage::Planning);
        assert!(batch_bytes <= self.config.flush_bytes_max, "a group commit over flush_bytes_max");
        self.flush = Some(Flush { batch_bytes, attempts: 0, waited: 0, written: None });
        self.attempt();
        self.check_invariants();
    }

    /// The reservation asked by `Action::Reserve` was granted or refused.
    pub fn handle_reserved(&mut self, granted: bool, now: Instant) {
        assert_eq!(self.stage, Stage::Reserving);
        let batch_bytes = self.flushing().batch_bytes;
        if !granted {
            self.full(FullCause::DataDirBudget, now);
            return self.check_invariants();
        }
        self.reserved_bytes = batch_bytes as u64;
        let too_full = self.active.end_position + batch_bytes as u64 > self.config.segment_bytes_max;
        let too_old = now.saturating_duration_since(self.active.created_at) >= self.config.segment_age_max;
        if self.active.end_position > 0 && (too_full || too_old) {
            self.stage = Stage::Rolling;
            self.actions.push_back(Action::Roll { base_offset: self.active.next_offset });
        } else {
            self.plan_write();
        }
        self.check_invariants();
    }

    /// The segment rolled: a new, empty one starts at the old one's end.
    pub fn handle_rolled(&mut self, now: Instant) {
        assert_eq!(self.stage, Stage::Rolling);
        self.active = ActiveState::empty(self.active.next_offset, now);
        self.plan_write();
        self.check_invariants();
    }

    /// The filesystem's free bytes (`None` when they could not be measured: then the
    /// preallocation goes ahead and the filesystem itself says whether it fits).
    pub fn handle_free_bytes(&mut self, free_bytes: Option<u64>, now: Instant) {
        let Stage::Measuring { mut plan } = self.stage else { panic!("free bytes while {:?}", self.stage) };
        let size = plan.preallocate_to.expect("measured only to preallocate");
        if let Some(free) = free_bytes {
            let allocated = self.active.allocated_bytes;
            let reserve = self.config.disk_reserve_bytes;
            let write_end = plan.write_position + plan.write_bytes as u64;
            if free < size.saturating_sub(allocated) + reserve {
                if free < write_end.saturating_sub(allocated) + reserve {
                    self.full(FullCause::ReserveFloor { write_end }, now);
                    return self.check_invariants();
                }
                plan.preallocate_to = Some(write_end);
            }
        }
        self.emit_write(plan);
        self.check_invariants();
    }

    /// The batch (and index entries) written; the log file is now `allocated_bytes`
    /// long.
    pub fn handle_written(&mut self, allocated_bytes: u64) {
        assert_eq!(self.stage, Stage::Writing);
        let step = self.flushing().written.expect("a write in flight");
        assert!(allocated_bytes >= step.plan.write_position + step.plan.write_bytes as u64);
        self.active.allocated_bytes = allocated_bytes;
        if step.write_index {
            self.active.index_written = self.active.index_entries;
        }
        self.stage = Stage::Syncing;
        self.actions.push_back(Action::Sync);
        self.check_invariants();
    }

    /// The batch is durable: its appends are acknowledged.
    pub fn handle_synced(&mut self, now: Instant) {
        assert_eq!(self.stage, Stage::Syncing);
        let step = self.flushing().written.expect("a write in flight");
        assert_eq!(step.base_offset, self.active.next_offset);
        assert_eq!(step.plan.end_position, self.active.end_position + step.batch_bytes as u64);
        self.active.bytes_since_index += step.batch_bytes as u64;
        self.active.end_position = step.plan.end_position;
        self.reserved_bytes = 0; // now in the segment's end
        let mut offset = step.base_offset;
        while let Some(append) = self.group.pop_front() {
            self.actions.push_back(Action::Reply(Ok(offset)));
            offset += i64::from(append.record_count);
        }
        self.active.next_offset = offset;
        self.flush_done(now);
        self.check_invariants();
    }

    /// The step in flight (a reservation's roll, a write, a sync, a deletion) failed.
    pub fn handle_failed(&mut self, failure: Failure, now: Instant) {
        assert!(
            matches!(self.stage, Stage::Rolling | Stage::Writing | Stage::Syncing | Stage::MakingRoom),
            "failure in {:?}",
            self.stage
        );
        if failure == Failure::FullBeforeWrite && matches!(self.stage, Stage::Rolling | Stage::Writing) {
            self.full(FullCause::Filesystem, now);
        } else {
            self.poison(now);
        }
        self.check_invariants();
    }

    /// `Action::MakeRoom` deleted a segment (`freed`) or found none it may delete.
    pub fn handle_room_made(&mut self, freed: bool, now: Instant) {
        assert_eq!(self.stage, Stage::MakingRoom);
        if freed {
            self.attempt();
        } else {
            self.wait_or_refuse(now);
        }
        self.check_invariants();
    }

    /// The wait for other partitions' room is over: try again.
    pub fn handle_room_waited(&mut self) {
        assert_eq!(self.stage, Stage::WaitingForRoom);
        self.attempt();
        self.check_invariants();
    }

    // ----- outputs -----

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether the core takes an append now, and until when it waits for one: `None`
    /// inside means wait for ever; a deadline means take what is queued, and tell
    /// `handle_queue_empty` when nothing is (at the latest at the deadline). `None`
    /// when it takes none (a group is in flight, or the partition closed).
    pub fn wants_append(&self) -> Option<Option<Instant>> {
        match self.stage {
            _ if !self.actions.is_empty() || self.input_closed => None,
            Stage::Idle => Some(None),
            Stage::Gathering { window_end, .. } => Some(Some(window_end)),
            _ => None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done && self.actions.is_empty()
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether no group is gathered or in flight.
    pub fn is_idle(&self) -> bool {
        matches!(self.stage, Stage::Idle | Stage::Done) && self.actions.is_empty()
    }

    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    pub fn active(&self) -> &ActiveState {
        &self.active
    }

    // ----- steps -----

    fn flushing(&self) -> Flush {
        self.flush.expect("a flush in flight")
    }

    fn flushing_mut(&mut self) -> &mut Flush {
        self.flush.as_mut().expect("a flush in flight")
    }

    /// Under load the previous flush was the batching window: whatever queued while it
    /// ran goes out at once. Only an append that finds the partition idle waits (up to
    /// the window) for company.
    fn start_group(&mut self, first: Pending, now: Instant) {
        let busy =
            self.last_flush_end.is_some_and(|end| now.saturating_duration_since(end) < self.config.flush_delay_max);
        let window_end = if busy { now } else { now + self.config.flush_delay_max };
        self.group_bytes = BATCH_HEADER_BYTES + first.bound_bytes;
        self.group.push_back(first);
        self.stage = Stage::Gathering { window_end, slotted: false };
        if self.group_bytes >= self.config.flush_bytes_max || self.input_closed {
            self.group_complete(now);
        }
    }

    fn group_complete(&mut self, now: Instant) {
        assert!(matches!(self.stage, Stage::Gathering { .. }));
        if self.poisoned {
            for _ in 0..self.group.len() {
                self.actions.push_back(Action::Reply(Err(Refusal::Poisoned)));
            }
            self.group.clear();
            return self.flush_done(now);
        }
        self.stage = Stage::Planning;
        self.actions.push_back(Action::Plan { appends: self.group.len() });
    }

    /// One attempt to write the group: reserve, maybe roll, plan, write, sync.
    fn attempt(&mut self) {
        let batch_bytes = self.flushing().batch_bytes;
        assert_eq!(self.reserved_bytes, 0, "one write at a time per partition");
        self.stage = Stage::Reserving;
        self.actions.push_back(Action::Reserve { bytes: batch_bytes as u64 });
    }

    fn plan_write(&mut self) {
        let plan = plan_append(
            self.active.end_position,
            self.flushing().batch_bytes,
            self.config.alignment_bytes,
            self.active.allocated_bytes,
            self.config.preallocate_bytes,
        );
        if plan.preallocate_to.is_some() {
            self.stage = Stage::Measuring { plan };
            self.actions.push_back(Action::MeasureFree);
        } else {
            self.emit_write(plan);
        }
    }

    fn emit_write(&mut self, plan: WritePlan) {
        let position = self.active.end_position;
        // An index entry for this batch if an interval of bytes passed since the last.
        let index_entry =
            (position > 0 && self.active.bytes_since_index >= self.config.index_interval_bytes).then(|| IndexEntry {
                relative_offset: u32::try_from(self.active.next_offset - self.active.base_offset)
                    .expect("segment offsets fit u32"),
                position: u32::try_from(position).expect("segment positions fit u32"),
            });
        if index_entry.is_some() {
            self.active.index_entries += 1;
            self.active.bytes_since_index = 0;
        }
        let write_index = self.active.index_entries - self.active.index_written >= INDEX_ENTRIES_PER_WRITE;
        let step = WriteStep {
            base_offset: self.active.next_offset,
            batch_bytes: self.flushing().batch_bytes,
            plan,
            index_entry,
            write_index,
        };
        self.flushing_mut().written = Some(step);
        self.stage = Stage::Writing;
        self.actions.push_back(Action::Write(step));
    }

    fn unreserve(&mut self) {
        if self.reserved_bytes > 0 {
            self.actions.push_back(Action::Unreserve { bytes: self.reserved_bytes });
            self.reserved_bytes = 0;
        }
    }

    /// A full disk: nothing was written. Delete a segment and try again, or wait for
    /// other partitions' room, or refuse the group.
    fn full(&mut self, cause: FullCause, now: Instant) {
        self.unreserve();
        self.last_full = Some(cause);
        let flush = self.flushing_mut();
        flush.written = None;
        flush.attempts += 1;
        if flush.attempts <= MAKE_ROOM_ATTEMPTS_MAX {
            self.stage = Stage::MakingRoom;
            self.actions.push_back(Action::MakeRoom);
        } else {
            self.wait_or_refuse(now);
        }
    }

    /// Under drop-oldest with nothing of its own left to drop, the partition asks the
    /// other partitions for room and waits a little for it before refusing.
    fn wait_or_refuse(&mut self, now: Instant) {
        if self.drop_oldest && self.flushing().waited < ROOM_WAIT_STEPS {
            self.flushing_mut().waited += 1;
            self.stage = Stage::WaitingForRoom;
            self.actions.push_back(Action::WaitForRoom { appends: self.group.len(), wait: ROOM_WAIT_STEP });
            return;
        }
        let cause = self.last_full.expect("a full disk was seen");
        self.actions.push_back(Action::DiskFull { appends: self.group.len(), cause });
        for _ in 0..self.group.len() {
            self.actions.push_back(Action::Reply(Err(Refusal::DiskFull)));
        }
        self.group.clear();
        self.flush_done(now);
    }

    /// A write, sync or delete failed: the partition refuses appends from now on.
    fn poison(&mut self, now: Instant) {
        self.unreserve();
        self.poisoned = true;
        self.actions.push_back(Action::Poisoned);
        for position in 0..self.group.len() {
            let refusal = if position == 0 { Refusal::Failed } else { Refusal::Poisoned };
            self.actions.push_back(Action::Reply(Err(refusal)));
        }
        self.group.clear();
        self.flush_done(now);
    }

    /// The group is answered: start the carried append, or close, or wait for appends.
    fn flush_done(&mut self, now: Instant) {
        assert!(self.group.is_empty());
        self.flush = None;
        self.last_full = None;
        self.last_flush_end = Some(now);
        self.stage = Stage::Idle;
        if let Some(carried) = self.carried.take() {
            self.start_group(carried, now);
        } else if self.input_closed {
            self.finish_input();
        }
    }

    fn finish_input(&mut self) {
        assert!(self.group.is_empty() && self.carried.is_none());
        self.stage = Stage::Done;
        self.actions.push_back(if self.close_asked { Action::Close { seal: !self.poisoned } } else { Action::Stop });
    }

    fn check_invariants(&self) {
        let active = &self.active;
        assert!(active.index_written <= active.index_entries);
        assert!(
            active.end_position <= active.allocated_bytes || active.allocated_bytes == 0 && active.end_position == 0
        );
        assert!(active.next_offset >= active.base_offset);
        match self.stage {
            Stage::Idle | Stage::Done => {
                assert!(self.group.is_empty() && self.carried.is_none() && self.flush.is_none());
            }
            Stage::Gathering { .. } | Stage::Planning => {
                assert!(!self.group.is_empty());
                let bound: usize = self.group.iter().map(|append| append.bound_bytes).sum();
                assert_eq!(self.group_bytes, BATCH_HEADER_BYTES + bound);
                assert!(self.group.len() == 1 || self.group_bytes <= self.config.flush_bytes_max);
            }
            _ => assert!(self.flush.is_some() && !self.group.is_empty()),
        }
        if self.carried.is_some() {
            assert!(!matches!(self.stage, Stage::Idle | Stage::Done));
        }
        let reserved_stage =
            matches!(self.stage, Stage::Rolling | Stage::Measuring { .. } | Stage::Writing | Stage::Syncing);
        assert_eq!(self.reserved_bytes > 0, reserved_stage, "a reservation outside a write: {:?}", self.stage);
        if let Some(flush) = self.flush {
            assert!(flush.batch_bytes <= self.config.flush_bytes_max);
            assert!(flush.attempts <= MAKE_ROOM_ATTEMPTS_MAX + 1 && flush.waited <= ROOM_WAIT_STEPS);
            if reserved_stage {
                assert_eq!(self.reserved_bytes, flush.batch_bytes as u64);
            }
        }
        if self.poisoned {
            assert!(!reserved_stage && !matches!(self.stage, Stage::Planning | Stage::Reserving));
        }
    }
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
