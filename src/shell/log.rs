//! A partition's log on one core: recovery at open, group commit, reads by offset,
//! retention, and a clean close.
//!
//! Ownership: one flusher task per partition owns the active segment's files and is the
//! only writer. Appenders hand it records over a bounded local channel (backpressure
//! when `appends_pending_max` are queued) and wait on a one-shot reply that arrives only
//! after the batch holding their records was written and `fdatasync`ed. Readers share
//! the segment file handles and never see bytes beyond the durable end.
//!
//! Durability rules: a failed write or fdatasync poisons the partition; nothing is
//! retried (the page state after a failed fsync is unknown) and every later append gets
//! `LogError::Poisoned`. Recovery cuts only a torn tail (see `core::log::recovery`);
//! corruption before the tail refuses the open, naming file and byte offset.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_lite::future;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use local_sync::oneshot;

use crate::config::DiskFullPolicy;
use crate::config::{LogConfig, DIRECT_IO_ALIGNMENT_BYTES};
use crate::core::log::batch::{self, BatchError, Record, BATCH_BYTES_MAX};
use crate::core::log::index::{self, IndexEntry, INDEX_ENTRY_BYTES};
use crate::core::log::pacer::FlushPacer;
use crate::core::log::partition::{
    Action, ActiveState, Failure, FullCause, PartitionConfig, PartitionCore, Refusal, WriteStep,
};
use crate::core::log::recovery::{
    self, scan_window, IndexRebuild, InvalidBatch, ScanCursor, ScanStop, TailPlan, SCAN_WINDOW_BYTES,
};
use crate::core::log::retention::{self, plan_deletions_with_excess, plan_room, RoomVictim, SealedSegment};
use crate::core::log::segment::{self, align_down, plan_append};
use crate::core::throttle::LogThrottle;
use crate::shell::budget::DataDirBudget;
use crate::shell::dir_lock::{DirLock, DirLockError};
use crate::shell::disk::{probe_direct_io, sync_directory, DirectFile, DiskError, OVER_BUDGET, PREALLOCATE};
use crate::shell::metrics::PartitionMetrics;
use crate::shell::status::DroppedRange;

/// The log's tunables, taken from `[log]` in the config.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub segment_bytes_max: u64,
    pub segment_age_max: Duration,
    pub index_interval_bytes: u64,
    pub preallocate_bytes: u64,
    pub flush_delay_max: Duration,
    pub flush_bytes_max: usize,
    /// Small flushes per second of all the partitions sharing one `FlushPacer`.
    pub core_flushes_per_s_max: u32,
    pub appends_pending_max: usize,
    pub partition_bytes_max: u64,
}

impl LogOptions {
    pub fn from_config(config: &LogConfig) -> LogOptions {
        LogOptions {
            segment_bytes_max: config.segment_bytes_max.0,
            segment_age_max: Duration::from_secs(config.segment_age_s_max.0),
            index_interval_bytes: config.index_interval_bytes.0,
            preallocate_bytes: config.preallocate_bytes.0,
            flush_delay_max: Duration::from_micros(config.flush_delay_us_max.0),
            flush_bytes_max: config.flush_bytes_max.0 as usize,
            core_flushes_per_s_max: config.core_flushes_per_s_max,
            appends_pending_max: config.appends_pending_max as usize,
            partition_bytes_max: config.partition_bytes_max.0,
        }
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions::from_config(&LogConfig::default())
    }
}

/// What made a partition refuse appends for good (until restart and recovery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoisonCause {
    pub operation: &'static str,
    pub path: PathBuf,
    pub position: u64,
    pub kind: std::io::ErrorKind,
}

impl std::fmt::Display for PoisonCause {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} {} at byte {} failed ({})", self.operation, self.path.display(), self.position, self.kind)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("partition {partition}: {source} (the partition is now poisoned)")]
    Disk { partition: String, source: DiskError },
    #[error("partition {partition} is poisoned after an earlier disk error: {cause}")]
    Poisoned { partition: String, cause: PoisonCause },
    #[error("partition {partition}: {path}: byte {position}: {reason}")]
    Corrupt { partition: String, path: PathBuf, position: u64, reason: InvalidBatch },
    #[error("partition {partition}: {path}: {why}")]
    Layout { partition: String, path: PathBuf, why: String },
    #[error("partition {partition}: the filesystem holding {path} is full; nothing was written, retry later")]
    DiskFull { partition: String, path: PathBuf },
    #[error("records of {bytes} bytes exceed the {max} bytes of one batch (log.flush_bytes_max)")]
    TooLarge { bytes: usize, max: usize },
    #[error("an append needs at least one record")]
    Empty,
    #[error("partition {partition} is closed")]
    Closed { partition: String },
    #[error("partition {partition}: offset {requested} is below the log start {start}")]
    OffsetOutOfRange { partition: String, requested: i64, start: i64 },
    #[error("partition {partition} is behind: {queued} appends wait for the disk (log.appends_pending_max)")]
    Backpressure { partition: String, queued: usize },
    #[error("partition {partition}: {source}")]
    Locked { partition: String, source: DirLockError },
}

/// Bytes the log leaves free on the data directory's filesystem: appends that would
/// go below are handled as a full disk, so `ship.state`, index files and directory
/// entries always find room (a shipper that cannot persist its state cannot ship, and
/// shipping is what frees the disk).
pub const DISK_RESERVE_BYTES: u64 = 1 << 20;

/// The smallest window a read fetches (bytes).
const READ_WINDOW_BYTES_MIN: usize = 64 << 10;

/// A segment as readers see it.
#[derive(Clone)]
struct SegmentView {
    base_offset: i64,
    /// The active segment's log file, shared with the writer. `None` for a sealed
    /// segment: each read opens it, so a partition holds one descriptor for its log
    /// however many segments it keeps (a long outage keeps thousands).
    file: Option<Rc<DirectFile>>,
    /// Durable end (bytes) for the active segment; the exact size for a sealed one.
    end_position: u64,
    next_offset: i64,
    index: Rc<Vec<IndexEntry>>,
}

impl SegmentView {
    fn path(&self, directory: &Path) -> PathBuf {
        segment::log_path(directory, self.base_offset)
    }

    /// The segment's log file: the writer's handle for the active segment, a fresh
    /// read-only one (closed when dropped) for a sealed segment.
    async fn open(&self, directory: &Path) -> Result<Rc<DirectFile>, DiskError> {
        match &self.file {
            Some(file) => Ok(file.clone()),
            None => DirectFile::open_read_only(&self.path(directory)).await.map(Rc::new),
        }
    }
}

/// State shared between the flusher, appenders and readers of one partition.
struct Shared {
    name: String,
    directory: PathBuf,
    options: LogOptions,
    metrics: PartitionMetrics,
    /// Every segment, sealed and active, by base offset. The last is active.
    segments: BTreeMap<i64, SegmentView>,
    poisoned: Option<PoisonCause>,
    closed: bool,
    /// Every offset below this is durably acknowledged upstream (told by `retain`).
    shipped_below_offset: i64,
    budget: std::sync::Arc<DataDirBudget>,
    /// Bytes of the batch being written, reserved in `budget` before its write.
    reserved_bytes: u64,
    /// Segment bytes (and `reserved_bytes`) last counted into `budget`.
    accounted_bytes: u64,
    /// When a refused append was last logged, and how many were refused since.
    /// When the next disk-full line may be logged (`core::throttle`).
    full_log_throttle: LogThrottle,
    full_unlogged: u64,
    /// The batch `bytes_from` last found: (segment base, batch base offset, byte
    /// position). The next call starts from it when it can, so a cursor that did not
    /// move costs no read and one that moved reads only what it passed.
    position_hint: Option<(i64, i64, u64)>,
    /// This process's exclusive hold on the partition directory, from open until the
    /// close has sealed the active segment (nothing writes after that).
    lock: Option<DirLock>,
    /// Readers waiting for the durable end to move (a Kafka long poll): woken by every
    /// synced flush. At most one entry per waiting reader (`wait_beyond`).
    end_waiters: Vec<std::task::Waker>,
}

impl Shared {
    /// Brings the budget and the gauges up to date with the segments.
    fn account(&mut self) {
        let bytes = self.disk_bytes() + self.reserved_bytes;
        self.budget.account(self.accounted_bytes, bytes);
        self.accounted_bytes = bytes;
        self.metrics.disk_bytes.set(bytes as i64);
        self.metrics.next_offset.set(self.next_offset());
        self.metrics.start_offset.set(self.segments.keys().next().copied().unwrap_or(0));
    }

    fn next_offset(&self) -> i64 {
        self.segments.values().next_back().map_or(0, |segment| segment.next_offset)
    }

    fn disk_bytes(&self) -> u64 {
        self.segments.values().map(|segment| segment.end_position).sum()
    }
}

struct PendingAppend {
    records: Vec<Record>,
    /// Upper bound of these records' bytes inside any batch (headers excluded).
    bound_bytes: usize,
    reply: oneshot::Sender<Result<i64, LogError>>,
}

enum Message {
    Append(PendingAppend),
    Close(oneshot::Sender<Result<(), LogError>>),
}

/// A handle to one partition's log. Cheap to clone; every clone talks to the same
/// flusher on the same core.
#[derive(Clone)]
pub struct PartitionLog {
    shared: Rc<RefCell<Shared>>,
    sender: Rc<LocalSender<Message>>,
}

/// Summary of a partition, for metrics, `weir inspect` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStats {
    pub start_offset: i64,
    pub next_offset: i64,
    pub segments: usize,
    pub disk_bytes: u64,
}

/// What `retain` deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub bytes_freed: u64,
    /// The first offset still in the log.
    pub start_offset: i64,
}

/// The active segment, owned by the flusher.
struct ActiveSegment {
    base_offset: i64,
    log: Rc<DirectFile>,
    index_file: DirectFile,
    end_position: u64,
    next_offset: i64,
    /// Bytes of the partial last page, rewritten at the front of the next write.
    tail: Vec<u8>,
    index: Vec<IndexEntry>,
    index_end_position: u64,
    index_tail: Vec<u8>,
    /// Entries of `index` already in the index file.
    index_written: usize,
}

impl PartitionLog {
    /// Opens (creating if needed) and recovers the partition in `directory`, then starts
    /// its flusher on the current glommio executor, paced on its own
    /// (`options.core_flushes_per_s_max` for this partition alone).
    pub async fn open(
        directory: &Path,
        name: &str,
        options: LogOptions,
        metrics: PartitionMetrics,
    ) -> Result<PartitionLog, LogError> {
        let pacer = Rc::new(RefCell::new(FlushPacer::new(options.core_flushes_per_s_max)));
        PartitionLog::open_paced(directory, name, options, metrics, pacer).await
    }

    /// `open`, with the flush pacer the partitions of this core share.
    pub async fn open_paced(
        directory: &Path,
        name: &str,
        options: LogOptions,
        metrics: PartitionMetrics,
        pacer: Rc<RefCell<FlushPacer>>,
    ) -> Result<PartitionLog, LogError> {
        let lock = lock_partition(directory, name).await?;
        let (active, state, segments) = recover(directory, name, &options, &metrics).await?;
        let shared = Shared {
            name: name.to_owned(),
            directory: directory.to_owned(),
            options: options.clone(),
            metrics: metrics.clone(),
            segments,
            poisoned: None,
            closed: false,
            shipped_below_offset: 0,
            budget: std::sync::Arc::new(DataDirBudget::unlimited()),
            accounted_bytes: 0,
            reserved_bytes: 0,
            full_log_throttle: LogThrottle::new(FULL_LOG_INTERVAL, 1),
            full_unlogged: 0,
            position_hint: None,
            lock: Some(lock),
            end_waiters: Vec::new(),
        };
        let mut shared = shared;
        shared.account();
        let shared = Rc::new(RefCell::new(shared));
        let (sender, receiver) = local_channel::new_bounded(options.appends_pending_max);
        glommio::spawn_local(flusher(shared.clone(), active, state, receiver, pacer)).detach();
        Ok(PartitionLog { shared, sender: Rc::new(sender) })
    }

    pub fn name(&self) -> String {
        self.shared.borrow().name.clone()
    }

    /// Counts this partition into the data directory's `budget` and applies its
    /// disk-full policy from now on (the default is no byte limit and `block`).
    pub fn set_budget(&self, budget: std::sync::Arc<DataDirBudget>) {
        let mut shared = self.shared.borrow_mut();
        shared.budget.account(shared.accounted_bytes, 0);
        shared.accounted_bytes = 0;
        shared.budget = budget;
        shared.account();
    }

    /// Stored batch bytes from the batch holding `offset` to the durable end: exactly
    /// what a shipper whose cursor is `offset` (a batch boundary) has yet to ship.
    /// Returns them with the durable end they were measured against. Reads at most
    /// about one index interval of the segment holding `offset`.
    pub async fn bytes_from(&self, offset: i64) -> Result<(u64, i64), LogError> {
        let (name, directory, view, later_bytes, end_offset, hint) = {
            let shared = self.shared.borrow();
            let end_offset = shared.next_offset();
            let start = shared.segments.keys().next().copied().unwrap_or(0);
            if offset >= end_offset {
                return Ok((0, end_offset));
            }
            if offset <= start {
                return Ok((shared.disk_bytes(), end_offset));
            }
            let (base, view) = shared.segments.range(..=offset).next_back().expect("a segment holds the offset");
            let later: u64 = shared.segments.range(base + 1..).map(|(_, view)| view.end_position).sum();
            let hint = shared
                .position_hint
                .filter(|(segment_base, batch_base, _)| *segment_base == *base && *batch_base <= offset);
            (shared.name.clone(), shared.directory.clone(), view.clone(), later, end_offset, hint)
        };
        if view.base_offset == offset {
            return Ok((view.end_position + later_bytes, end_offset));
        }
        if let Some((_, batch_base, position)) = hint {
            if batch_base == offset {
                return Ok((view.end_position - position + later_bytes, end_offset));
            }
        }
        let relative = u32::try_from(offset - view.base_offset).expect("segment offsets fit u32");
        let indexed = u64::from(index::lookup(&view.index, relative).position);
        let mut position = hint.map_or(indexed, |(_, _, hinted)| hinted.max(indexed));
        let window_want = (self.shared.borrow().options.index_interval_bytes as usize).max(READ_WINDOW_BYTES_MIN);
        let path = view.path(&directory);
        let file = view.open(&directory).await.map_err(|source| LogError::Disk { partition: name.clone(), source })?;
        while position < view.end_position {
            let window_bytes = ((view.end_position - position) as usize).min(window_want);
            let window = file
                .read(position, window_bytes)
                .await
                .map_err(|source| LogError::Disk { partition: name.clone(), source })?;
            let mut at = 0usize;
            while at + batch::BATCH_HEADER_BYTES <= window.len() {
                let header = batch::parse_header(&window[at..]).map_err(|reason| LogError::Corrupt {
                    partition: name.clone(),
                    path: path.clone(),
                    position: position + at as u64,
                    reason: reason.into(),
                })?;
                if header.next_offset() > offset {
                    let from = position + at as u64;
                    self.shared.borrow_mut().position_hint = Some((view.base_offset, header.base_offset, from));
                    return Ok((view.end_position - from + later_bytes, end_offset));
                }
                at += header.total_bytes();
            }
            if at == 0 {
                break; // less than a header left before the end: not a batch boundary
            }
            position += at as u64;
        }
        Err(LogError::Layout {
            partition: name,
            path,
            why: format!("no batch holds offset {offset} before the segment's end"),
        })
    }

    /// Appends `records` as a contiguous run; resolves with the first record's offset
    /// once the records are durable.
    pub async fn append(&self, records: Vec<Record>) -> Result<i64, LogError> {
        if records.is_empty() {
            return Err(LogError::Empty);
        }
        let bound_bytes: usize = records.iter().map(Record::encoded_bytes_upper).sum();
        {
            let shared = self.shared.borrow();
            // The upper bound settles almost every append; only one near the limit is
            // planned exactly (a walk over every record and header).
            if batch::BATCH_HEADER_BYTES + bound_bytes > shared.options.flush_bytes_max {
                let encoded_bytes = batch::plan_batch(records.iter()).total_bytes;
                if encoded_bytes > shared.options.flush_bytes_max {
                    return Err(LogError::TooLarge { bytes: encoded_bytes, max: shared.options.flush_bytes_max });
                }
            }
            if let Some(cause) = &shared.poisoned {
                return Err(LogError::Poisoned { partition: shared.name.clone(), cause: cause.clone() });
            }
            if shared.closed {
                return Err(LogError::Closed { partition: shared.name.clone() });
            }
        }
        let (reply, answer) = oneshot::channel();
        let message = Message::Append(PendingAppend { records, bound_bytes, reply });
        if self.sender.send(message).await.is_err() {
            return Err(self.closed_error());
        }
        answer.await.unwrap_or_else(|_| Err(self.closed_error()))
    }

    /// Like `append`, but refuses at once with `LogError::Backpressure` when the
    /// partition's queue already holds `appends_pending_max` appends (the disk is
    /// behind), instead of waiting for room: the caller pushes back on its producer.
    pub async fn append_unless_behind(&self, records: Vec<Record>) -> Result<i64, LogError> {
        if self.sender.is_full() {
            return Err(LogError::Backpressure {
                partition: self.shared.borrow().name.clone(),
                queued: self.sender.len(),
            });
        }
        // No await between the check and the send in `append`: on this single-threaded
        // executor the queue cannot fill in between.
        self.append(records).await
    }

    fn closed_error(&self) -> LogError {
        LogError::Closed { partition: self.shared.borrow().name.clone() }
    }

    pub fn stats(&self) -> PartitionStats {
        let shared = self.shared.borrow();
        PartitionStats {
            start_offset: shared.segments.keys().next().copied().unwrap_or(0),
            next_offset: shared.next_offset(),
            segments: shared.segments.len(),
            disk_bytes: shared.disk_bytes(),
        }
    }

    /// Every segment's end offset (one past its last record) and log file, oldest
    /// first.
    pub fn segment_ends(&self) -> Vec<(i64, PathBuf)> {
        let shared = self.shared.borrow();
        shared.segments.values().map(|view| (view.next_offset, view.path(&shared.directory))).collect()
    }

    /// The durable end: one past the last offset an append was acknowledged for.
    pub fn next_offset(&self) -> i64 {
        self.shared.borrow().next_offset()
    }

    /// Resolves once the durable end is beyond `offset` (at once if it already is):
    /// a long poll's wake-up. The caller bounds the wait.
    pub async fn wait_beyond(&self, offset: i64) {
        future::poll_fn(|context| {
            let mut shared = self.shared.borrow_mut();
            if shared.next_offset() > offset || shared.closed || shared.poisoned.is_some() {
                return std::task::Poll::Ready(());
            }
            if !shared.end_waiters.iter().any(|waker| waker.will_wake(context.waker())) {
                shared.end_waiters.push(context.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Whole batches holding offsets from `from_offset` on, in order, up to about
    /// `bytes_max` bytes (at least one batch when any exists). Empty at the end.
    pub async fn read(&self, from_offset: i64, bytes_max: usize) -> Result<Vec<Bytes>, LogError> {
        let (name, directory, view) = {
            let shared = self.shared.borrow();
            let start = shared.segments.keys().next().copied().unwrap_or(0);
            if from_offset < start {
                return Err(LogError::OffsetOutOfRange {
                    partition: shared.name.clone(),
                    requested: from_offset,
                    start,
                });
            }
            if from_offset >= shared.next_offset() {
                return Ok(Vec::new());
            }
            let view = shared.segments.range(..=from_offset).next_back().map(|(_, view)| view.clone());
            let view = view.expect("a segment holds every offset between start and end");
            (shared.name.clone(), shared.directory.clone(), view)
        };
        let path = view.path(&directory);
        let file = view.open(&directory).await.map_err(|source| LogError::Disk { partition: name.clone(), source })?;
        let relative = u32::try_from(from_offset - view.base_offset).expect("segment offsets fit u32");
        let mut position = u64::from(index::lookup(&view.index, relative).position);
        let mut batches = Vec::new();
        let mut bytes_total = 0usize;
        // Enough for the request plus the index gap before the wanted batch; grown to
        // one whole batch when a single batch is larger.
        let index_gap = self.shared.borrow().options.index_interval_bytes as usize;
        let mut window_want = bytes_max.max(READ_WINDOW_BYTES_MIN) + index_gap;
        while position < view.end_position && (batches.is_empty() || bytes_total < bytes_max) {
            let window_bytes = ((view.end_position - position) as usize).min(window_want);
            let window = file
                .read(position, window_bytes)
                .await
                .map_err(|source| LogError::Disk { partition: name.clone(), source })?;
            let mut at = 0usize;
            while at < window.len() && (batches.is_empty() || bytes_total < bytes_max) {
                let header = match batch::check_batch(&window[at..]) {
                    Ok(header) => header,
                    Err(BatchError::Truncated { .. }) if at > 0 => break,
                    Err(BatchError::Truncated { needed, .. })
                        if window.len() == window_bytes && position + (window_bytes as u64) < view.end_position =>
                    {
                        window_want = needed; // one batch larger than the window: read it whole
                        break;
                    }
                    Err(reason) => {
                        return Err(LogError::Corrupt {
                            partition: name,
                            path: path.clone(),
                            position: position + at as u64,
                            reason: reason.into(),
                        })
                    }
                };
                let total = header.total_bytes();
                if header.last_offset() >= from_offset {
                    batches.push(Bytes::copy_from_slice(&window[at..at + total]));
                    bytes_total += total;
                }
                at += total;
            }
            position += at as u64;
        }
        Ok(batches)
    }

    /// Notes that every offset below `below_offset` is durably shipped, and deletes
    /// whole sealed segments below it, oldest first, while the partition is over
    /// `log.partition_bytes_max` or the data directory has less than one segment of
    /// room left under `log.data_dir_bytes_max`. Never touches the active segment.
    pub async fn retain(&self, below_offset: i64) -> Result<RetentionReport, LogError> {
        let doomed = {
            let mut shared = self.shared.borrow_mut();
            shared.shipped_below_offset = shared.shipped_below_offset.max(below_offset);
            let views: Vec<&SegmentView> = shared.segments.values().collect();
            let (active, sealed) = views.split_last().expect("a partition always has an active segment");
            let sealed_info: Vec<SealedSegment> = sealed
                .iter()
                .map(|view| SealedSegment {
                    base_offset: view.base_offset,
                    next_offset: view.next_offset,
                    bytes: view.end_position,
                })
                .collect();
            let count = plan_deletions_with_excess(
                &sealed_info,
                active.end_position,
                shared.options.partition_bytes_max,
                below_offset,
                shared.budget.excess_bytes(),
            );
            sealed_info[..count].to_vec()
        };
        let mut report = RetentionReport::default();
        for segment in &doomed {
            if let Some(bytes) = delete_segment(&self.shared, segment.base_offset)
                .await
                .map_err(|source| LogError::Disk { partition: self.shared.borrow().name.clone(), source })?
            {
                report.segments_deleted += 1;
                report.bytes_freed += bytes;
            }
        }
        report.start_offset = self.shared.borrow().segments.keys().next().copied().unwrap_or(0);
        Ok(report)
    }

    /// When this partition's oldest sealed segment was last written (`None` when it
    /// has only its active segment): how a room keeper picks whose segment goes.
    pub fn oldest_sealed_modified(&self) -> Option<SystemTime> {
        let shared = self.shared.borrow();
        if shared.segments.len() < 2 {
            return None;
        }
        let oldest = shared.segments.values().next().expect("two segments");
        std::fs::metadata(oldest.path(&shared.directory)).and_then(|metadata| metadata.modified()).ok()
    }

    /// Flushes everything queued, seals nothing, trims the active segment's
    /// preallocation, syncs and stops the flusher.
    pub async fn close(&self) -> Result<(), LogError> {
        let (reply, answer) = oneshot::channel();
        if self.sender.send(Message::Close(reply)).await.is_err() {
            return Ok(()); // already closed
        }
        answer.await.unwrap_or(Ok(()))
    }
}

/// How long `open` waits for a lock this very process seems to hold.
const OWN_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Locks the partition directory for this process. A lock that this process itself
/// released a moment ago (a close, then a reopen) can still look held: a child process
/// forked meanwhile holds copies of every descriptor until its exec closes them. So a
/// holder with this process's own PID is waited for, briefly; another PID never is.
async fn lock_partition(directory: &Path, name: &str) -> Result<DirLock, LogError> {
    let deadline = Instant::now() + OWN_LOCK_WAIT;
    loop {
        match DirLock::acquire(directory) {
            Ok(lock) => return Ok(lock),
            Err(DirLockError::Held { pid: Some(pid), .. })
                if pid == std::process::id() && Instant::now() < deadline =>
            {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            Err(source) => return Err(LogError::Locked { partition: name.to_owned(), source }),
        }
    }
}

fn disk_error(shared: &Rc<RefCell<Shared>>, source: DiskError) -> LogError {
    LogError::Disk { partition: shared.borrow().name.clone(), source }
}

/// The flusher: feeds the partition's group-commit core (`core::log::partition`) with
/// appends, the queue's state and I/O completions, and carries out what it asks. It
/// holds the appends' records, oldest first, so the core decides on sizes alone.
struct Flusher {
    shared: Rc<RefCell<Shared>>,
    core: PartitionCore,
    /// `None` once closed.
    active: Option<ActiveSegment>,
    /// Appends received and not yet answered, oldest first: the core's actions name
    /// the oldest N of them.
    queue: VecDeque<PendingAppend>,
    /// The batch planned for the group in flight and how many appends it holds.
    planned: Option<(batch::BatchPlan, usize)>,
    /// The last I/O step's error, until the core says what it was: a full filesystem
    /// (`Action::DiskFull`) or the failure that poisons the partition (the first refused
    /// append gets it).
    error: Option<DiskError>,
    full_path: PathBuf,
    close_reply: Option<oneshot::Sender<Result<(), LogError>>>,
    /// The batch being written adds an index entry (readers get a new index copy).
    index_grew: bool,
    write_started: Instant,
    sync_started: Instant,
}

/// What the flusher waited for.
enum Input {
    Message(Option<Message>),
    QueueEmpty,
}

async fn flusher(
    shared: Rc<RefCell<Shared>>,
    active: ActiveSegment,
    state: ActiveState,
    receiver: LocalReceiver<Message>,
    pacer: Rc<RefCell<FlushPacer>>,
) {
    let (config, drop_oldest) = {
        let shared = shared.borrow();
        (partition_config(&shared.options), shared.budget.policy() == DiskFullPolicy::DropOldest)
    };
    let mut core = PartitionCore::new(config, state);
    core.set_drop_oldest(drop_oldest);
    core.set_pacer(pacer);
    let now = Instant::now();
    let mut flusher = Flusher {
        shared,
        core,
        active: Some(active),
        queue: VecDeque::new(),
        planned: None,
        error: None,
        full_path: PathBuf::new(),
        close_reply: None,
        index_grew: false,
        write_started: now,
        sync_started: now,
    };
    flusher.run(receiver).await;
}

fn partition_config(options: &LogOptions) -> PartitionConfig {
    PartitionConfig {
        segment_bytes_max: options.segment_bytes_max,
        segment_age_max: options.segment_age_max,
        index_interval_bytes: options.index_interval_bytes,
        preallocate_bytes: options.preallocate_bytes,
        flush_delay_max: options.flush_delay_max,
        flush_bytes_max: options.flush_bytes_max,
        alignment_bytes: DIRECT_IO_ALIGNMENT_BYTES,
        disk_reserve_bytes: DISK_RESERVE_BYTES,
    }
}

impl Flusher {
    async fn run(&mut self, receiver: LocalReceiver<Message>) {
        // The clock is read when the flusher waited, not once per append.
        let mut now = Instant::now();
        loop {
            while let Some(action) = self.core.poll_action() {
                self.execute(action).await;
            }
            if self.core.is_done() {
                return;
            }
            let deadline = self.core.wants_append().expect("an idle core takes appends");
            match self.next_input(&receiver, deadline, &mut now).await {
                Input::Message(Some(Message::Append(append))) => {
                    let records = u32::try_from(append.records.len()).expect("an append's records fit u32");
                    self.core.handle_append(append.bound_bytes, records, now);
                    self.queue.push_back(append);
                }
                Input::Message(Some(Message::Close(reply))) => {
                    self.close_reply = Some(reply);
                    self.core.handle_close(now);
                }
                Input::Message(None) => self.core.handle_input_closed(now),
                Input::QueueEmpty => self.core.handle_queue_empty(now),
            }
        }
    }

    /// The next message, or word that none came: waits for ever without a deadline;
    /// with one, takes what is queued and waits at most until the deadline.
    async fn next_input(
        &self,
        receiver: &LocalReceiver<Message>,
        deadline: Option<Instant>,
        now: &mut Instant,
    ) -> Input {
        let Some(deadline) = deadline else {
            let message = receiver.recv().await;
            *now = Instant::now();
            return Input::Message(message);
        };
        if let Some(message) = future::poll_once(receiver.recv()).await {
            return Input::Message(message);
        }
        *now = Instant::now();
        if *now >= deadline {
            return Input::QueueEmpty;
        }
        let wait = future::or(async { Some(receiver.recv().await) }, async {
            glommio::timer::sleep(deadline - *now).await;
            None
        });
        let input = wait.await;
        *now = Instant::now();
        input.map_or(Input::QueueEmpty, Input::Message)
    }

    fn active(&mut self) -> &mut ActiveSegment {
        self.active.as_mut().expect("the flusher is open")
    }

    fn group(&self, appends: usize) -> impl Iterator<Item = &Record> + Clone {
        self.queue.iter().take(appends).flat_map(|append| append.records.iter())
    }

    async fn execute(&mut self, action: Action) {
        match action {
            Action::Plan { appends } => {
                let plan = batch::plan_batch(self.group(appends));
                assert!(plan.total_bytes <= BATCH_BYTES_MAX);
                self.planned = Some((plan, appends));
                let policy = self.shared.borrow().budget.policy();
                self.core.set_drop_oldest(policy == DiskFullPolicy::DropOldest);
                self.core.handle_batch_bytes(plan.total_bytes);
            }
            Action::Reserve { bytes } => self.reserve(bytes),
            Action::Unreserve { .. } => {
                let mut state = self.shared.borrow_mut();
                state.reserved_bytes = 0;
                state.account();
            }
            Action::Roll { base_offset } => {
                let active = self.active.as_mut().expect("the flusher is open");
                match roll(&self.shared, active, base_offset).await {
                    Ok(()) => self.core.handle_rolled(Instant::now()),
                    Err(error) => self.failed(error),
                }
            }
            Action::MeasureFree => {
                let directory = self.shared.borrow().directory.clone();
                let free = crate::shell::sys::available_bytes(&directory).ok();
                self.core.handle_free_bytes(free, Instant::now());
            }
            Action::Write(step) => self.write(step).await,
            Action::Sync => {
                self.sync_started = Instant::now();
                match self.active().log.sync().await {
                    Ok(()) => self.synced(),
                    Err(error) => self.failed(error),
                }
            }
            Action::MakeRoom => match make_room(&self.shared).await {
                Ok(freed) => self.core.handle_room_made(freed.is_some(), Instant::now()),
                Err(error) => self.failed(error),
            },
            Action::WaitForRoom { appends, wait } => {
                let bytes = group_bytes_estimate(self.queue.iter().take(appends));
                self.shared.borrow().budget.want_room(bytes);
                glommio::timer::sleep(wait).await;
                self.core.handle_room_waited();
            }
            Action::DiskFull { appends, cause } => self.refuse_full(appends, cause),
            Action::Poisoned => self.poisoned(),
            Action::Reply(result) => self.reply(result),
            Action::Close { seal } => {
                let active = self.active.take().expect("closed once");
                let closed = close_active(&self.shared, active, seal).await;
                if let Some(reply) = self.close_reply.take() {
                    let _ = reply.send(closed);
                }
            }
            Action::Stop => {}
        }
    }

    /// Reserves the batch's room in the data directory's budget.
    fn reserve(&mut self, bytes: u64) {
        let granted = {
            let mut state = self.shared.borrow_mut();
            assert_eq!(state.reserved_bytes, 0, "one write at a time per partition");
            let granted = state.budget.try_reserve(bytes);
            if granted {
                state.reserved_bytes = bytes;
                state.accounted_bytes += bytes;
            }
            granted
        };
        self.write_started = Instant::now();
        self.core.handle_reserved(granted, self.write_started);
    }

    /// Writes the group's batch at the planned position (the tail page rewritten), and
    /// the pending index entries alongside when the core says so.
    async fn write(&mut self, step: WriteStep) {
        let (plan_batch, appends) = self.planned.expect("a planned batch");
        assert_eq!(plan_batch.total_bytes, step.batch_bytes);
        let active = self.active.as_mut().expect("the flusher is open");
        assert_eq!(active.end_position, step.plan.end_position - step.batch_bytes as u64);
        if let Some(entry) = step.index_entry {
            active.index.push(entry);
        }
        self.index_grew = step.index_entry.is_some();
        let plan = step.plan;
        let base_offset = step.base_offset;
        let records = self.queue.iter().take(appends).flat_map(|append| append.records.iter());
        let mut new_tail = Vec::new();
        let tail = &active.tail;
        let write_log = active.log.append(&plan, |buffer| {
            buffer[..plan.tail_bytes].copy_from_slice(tail);
            let header = batch::encode_batch(&mut buffer[plan.tail_bytes..], &plan_batch, base_offset, records);
            debug_assert!(batch::check_batch(&buffer[plan.tail_bytes..plan.tail_bytes + step.batch_bytes]).is_ok());
            assert_eq!(header.base_offset, base_offset);
            let end_in_buffer = plan.tail_bytes + step.batch_bytes;
            buffer[end_in_buffer..].fill(0);
            let page_start = align_down(end_in_buffer as u64, DIRECT_IO_ALIGNMENT_BYTES) as usize;
            new_tail.extend_from_slice(&buffer[page_start..end_in_buffer]);
        });
        let preallocate_bytes = self.shared.borrow().options.preallocate_bytes;
        let written = if step.write_index {
            // The two files are independent: the index write goes to the device
            // alongside the batch instead of after it. (The index is never synced per
            // flush: recovery drops entries past the valid end of the log.)
            let (logged, indexed) = future::zip(write_log, write_pending_index(active, preallocate_bytes)).await;
            logged.and(indexed).map(Some)
        } else {
            write_log.await.map(|()| None)
        };
        match written {
            Ok(indexed) => {
                if let Some((end_position, tail)) = indexed {
                    active.index_end_position = end_position;
                    active.index_tail = tail;
                    active.index_written = active.index.len();
                }
                active.tail = new_tail;
                self.core.handle_written(active.log.size_bytes());
                assert_eq!(self.core.active().index_written, active.index_written);
            }
            Err(error) => self.failed(error),
        }
    }

    /// The batch is durable: readers see it, the reservation became segment bytes.
    fn synced(&mut self) {
        let synced = Instant::now();
        let step_base = self.active().next_offset;
        self.core.handle_synced(synced);
        let state = *self.core.active();
        let (plan_batch, _) = self.planned.take().expect("a planned batch");
        let active = self.active.as_mut().expect("the flusher is open");
        let index_grew = std::mem::take(&mut self.index_grew);
        active.end_position = state.end_position;
        active.next_offset = state.next_offset;
        let mut shared = self.shared.borrow_mut();
        for waker in shared.end_waiters.drain(..) {
            waker.wake(); // they run after this borrow ends
        }
        let view = shared.segments.get_mut(&active.base_offset).expect("the active segment is registered");
        view.end_position = active.end_position;
        view.next_offset = active.next_offset;
        if index_grew {
            // Readers hold the old `Rc` until they finish; the copy is made only when an
            // entry was added (every index interval), not on every flush.
            view.index = Rc::new(active.index.clone());
        }
        let record_count = (state.next_offset - step_base) as u64;
        shared.metrics.appended_records.inc_by(record_count);
        shared.metrics.appended_bytes.inc_by(plan_batch.total_bytes as u64);
        shared.metrics.flushes.inc();
        shared.metrics.flush_latency.record(synced - self.write_started);
        shared.metrics.sync_latency.record(synced - self.sync_started);
        shared.reserved_bytes = 0; // now in the segment's end
        shared.account();
    }

    /// An I/O step failed: a full filesystem before any write is the core's to handle;
    /// anything else poisons the partition.
    fn failed(&mut self, error: DiskError) {
        let failure = if error.is_full_before_write() { Failure::FullBeforeWrite } else { Failure::Other };
        self.error = Some(error);
        self.core.handle_failed(failure, Instant::now());
    }

    /// Counts and (at most every `FULL_LOG_INTERVAL`) logs appends refused for a full
    /// disk; the refusals follow as replies.
    fn refuse_full(&mut self, appends: usize, cause: FullCause) {
        let error = {
            let state = self.shared.borrow();
            let log_path = || segment::log_path(&state.directory, self.active.as_ref().expect("open").base_offset);
            match cause {
                FullCause::DataDirBudget => DiskError::new(
                    OVER_BUDGET,
                    &state.directory,
                    self.active.as_ref().expect("open").end_position,
                    std::io::Error::new(std::io::ErrorKind::StorageFull, "the data directory is at log.data_dir_bytes_max"),
                ),
                FullCause::ReserveFloor { write_end } => DiskError::new(
                    PREALLOCATE,
                    &log_path(),
                    write_end,
                    std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        format!("the filesystem would have less than the {DISK_RESERVE_BYTES} bytes free the log leaves for ship.state and index files"),
                    ),
                ),
                FullCause::Filesystem => self.error.take().expect("the filesystem's refusal"),
            }
        };
        let mut state = self.shared.borrow_mut();
        state.metrics.disk_full_rejections.inc_by(appends as u64);
        state.full_unlogged += appends as u64;
        if state.full_log_throttle.admit("disk_full", Instant::now()).is_some() {
            let refused = std::mem::take(&mut state.full_unlogged);
            tracing::warn!(partition = %state.name, error = %error, refused, "disk full: appends refused, nothing written (logged at most every 10 s)");
        }
        self.full_path = error.path;
    }

    /// Records what poisoned the partition: appends are refused from now on.
    fn poisoned(&mut self) {
        let source = self.error.as_ref().expect("a failure poisons");
        let cause = PoisonCause {
            operation: source.operation,
            path: source.path.clone(),
            position: source.position,
            kind: source.source.kind(),
        };
        let mut state = self.shared.borrow_mut();
        state.poisoned = Some(cause);
        state.metrics.poisoned.set(1);
        state.metrics.partitions_poisoned.inc();
        if source.operation == "fdatasync" {
            state.metrics.fsync_errors.inc();
        } else {
            state.metrics.write_errors.inc();
        }
        tracing::error!(partition = %state.name, error = %source, "log write failed; partition poisoned");
    }

    fn reply(&mut self, result: Result<i64, Refusal>) {
        let append = self.queue.pop_front().expect("a reply for a queued append");
        let partition = || self.shared.borrow().name.clone();
        let answer = match result {
            Ok(offset) => Ok(offset),
            Err(Refusal::DiskFull) => Err(LogError::DiskFull { partition: partition(), path: self.full_path.clone() }),
            Err(Refusal::Failed) => {
                Err(LogError::Disk { partition: partition(), source: self.error.take().expect("the failure") })
            }
            Err(Refusal::Poisoned) => {
                let cause = self.shared.borrow().poisoned.clone().expect("poisoned");
                Err(LogError::Poisoned { partition: partition(), cause })
            }
        };
        let _ = append.reply.send(answer);
    }
}

/// How often a core's room keeper looks whether some partition wants room.
const ROOM_KEEPER_INTERVAL: Duration = Duration::from_millis(10);

/// Roughly the bytes `group` takes in a batch (record framing counted generously).
fn group_bytes_estimate<'a>(group: impl Iterator<Item = &'a PendingAppend>) -> u64 {
    let mut bytes = batch::BATCH_HEADER_BYTES as u64;
    for append in group {
        for record in &append.records {
            let headers: usize = record
                .headers
                .iter()
                .map(|header| header.key.len() + header.value.as_ref().map_or(0, Bytes::len) + 10)
                .sum();
            bytes += (record.key.as_ref().map_or(0, Bytes::len) + record.value.as_ref().map_or(0, Bytes::len) + headers)
                as u64
                + 32;
        }
    }
    bytes
}

/// How often at most a partition logs that it refuses appends on a full disk.
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Deletes the oldest sealed segment if it is shipped, or under `drop-oldest` even if
/// it is not (logged with its offset range and counted). The bytes freed, if one was
/// deleted.
async fn make_room(shared: &Rc<RefCell<Shared>>) -> Result<Option<u64>, DiskError> {
    let victim = {
        let state = shared.borrow();
        let oldest_sealed = (state.segments.len() >= 2).then(|| {
            let oldest = state.segments.values().next().expect("two segments");
            SealedSegment {
                base_offset: oldest.base_offset,
                next_offset: oldest.next_offset,
                bytes: oldest.end_position,
            }
        });
        let drop_oldest = state.budget.policy() == DiskFullPolicy::DropOldest;
        plan_room(oldest_sealed, state.shipped_below_offset, drop_oldest)
    };
    let Some(RoomVictim { segment, shipped }) = victim else { return Ok(None) };
    let (base_offset, next_offset) = (segment.base_offset, segment.next_offset);
    // Already gone (another task deleted it meanwhile): room was made all the same.
    let Some(bytes) = delete_segment(shared, base_offset).await? else { return Ok(Some(0)) };
    let state = shared.borrow();
    if shipped {
        tracing::info!(partition = %state.name, first_offset = base_offset, last_offset = next_offset - 1, bytes, "disk full: shipped segment deleted");
    } else {
        let records = (next_offset - base_offset) as u64;
        state.metrics.dropped_segments.inc();
        state.metrics.dropped_records.inc_by(records);
        state.metrics.dropped_ranges.push(DroppedRange {
            first_offset: base_offset,
            last_offset: next_offset - 1,
            bytes,
        });
        tracing::warn!(partition = %state.name, first_offset = base_offset, last_offset = next_offset - 1, records, bytes, "disk full: unshipped segment dropped (log.disk_full_policy = drop-oldest)");
    }
    Ok(Some(bytes))
}

/// A core's room keeper under `drop-oldest`: while some partition (on any core) wants
/// room it could not make among its own segments (`DataDirBudget::want_room`), deletes
/// the oldest sealed segment among this core's partitions (the one written longest
/// ago), shipped or not, and counts the bytes freed. Every core runs one, so two cores
/// may each drop a segment for one ask. Returns when `stopping` says so.
pub async fn keep_room(logs: Vec<PartitionLog>, budget: std::sync::Arc<DataDirBudget>, stopping: impl Fn() -> bool) {
    while !stopping() {
        glommio::timer::sleep(ROOM_KEEPER_INTERVAL).await;
        if budget.room_wanted() == 0 {
            continue;
        }
        let candidates: Vec<(bool, Option<SystemTime>)> =
            logs.iter().map(|log| (log.shared.borrow().poisoned.is_some(), log.oldest_sealed_modified())).collect();
        let Some(log) = retention::pick_room_keeper_victim(&candidates).map(|index| &logs[index]) else { continue };
        match make_room(&log.shared).await {
            Ok(Some(bytes)) => budget.room_given(bytes.max(1)),
            Ok(None) => {}
            Err(error) => {
                tracing::error!(partition = %log.name(), error = %error, "deleting a segment to make room failed");
                glommio::timer::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Deletes the sealed segment at `base_offset` (log file first: a crash between the
/// two leaves an orphan index, which open removes) and closes its file once no reader
/// holds it, so its space returns. `None` if it was already gone.
async fn delete_segment(shared: &Rc<RefCell<Shared>>, base_offset: i64) -> Result<Option<u64>, DiskError> {
    let (view, directory) = {
        let state = shared.borrow();
        let Some(view) = state.segments.get(&base_offset).cloned() else { return Ok(None) };
        assert!(state.segments.keys().next_back() != Some(&base_offset), "the active segment is never deleted");
        (view, state.directory.clone())
    };
    for path in [segment::log_path(&directory, base_offset), segment::index_path(&directory, base_offset)] {
        if let Err(error) = std::fs::remove_file(&path) {
            if error.kind() != std::io::ErrorKind::NotFound {
                return Err(DiskError::new("delete", &path, 0, error));
            }
        }
    }
    {
        let mut state = shared.borrow_mut();
        state.segments.remove(&base_offset);
        state.metrics.segments_deleted.inc();
        state.account();
    }
    let bytes = view.end_position;
    // Sealed segments hold no handle; a reader that has one open closes it when done.
    if let Some(Ok(file)) = view.file.map(Rc::try_unwrap) {
        let _ = file.close().await;
    }
    sync_directory(&directory)?;
    Ok(Some(bytes))
}

/// Writes the index entries not yet in the index file, in one write; returns the index
/// file's new end and tail page for the caller to record once the write is done.
async fn write_pending_index(active: &ActiveSegment, preallocate_bytes: u64) -> Result<(u64, Vec<u8>), DiskError> {
    if active.index_written == active.index.len() {
        return Ok((active.index_end_position, active.index_tail.clone()));
    }
    let mut bytes = Vec::with_capacity((active.index.len() - active.index_written) * INDEX_ENTRY_BYTES);
    for entry in &active.index[active.index_written..] {
        bytes.extend_from_slice(&entry.encode());
    }
    let position = active.index_end_position;
    let step = (preallocate_bytes / 64).max(DIRECT_IO_ALIGNMENT_BYTES);
    let plan = plan_append(
        position,
        bytes.len(),
        DIRECT_IO_ALIGNMENT_BYTES,
        active.index_file.size_bytes(),
        segment::align_up(step, DIRECT_IO_ALIGNMENT_BYTES),
    );
    let mut new_tail = Vec::new();
    let tail = &active.index_tail;
    active
        .index_file
        .append(&plan, |buffer| {
            buffer[..plan.tail_bytes].copy_from_slice(tail);
            let end = plan.tail_bytes + bytes.len();
            buffer[plan.tail_bytes..end].copy_from_slice(&bytes);
            buffer[end..].fill(0);
            let page_start = align_down(end as u64, DIRECT_IO_ALIGNMENT_BYTES) as usize;
            new_tail.extend_from_slice(&buffer[page_start..end]);
        })
        .await?;
    Ok((plan.end_position, new_tail))
}

/// Seals the active segment (exact size, synced, index synced) and starts a new one.
async fn roll(shared: &Rc<RefCell<Shared>>, active: &mut ActiveSegment, base_offset: i64) -> Result<(), DiskError> {
    assert_eq!(base_offset, active.next_offset, "a new segment starts where the active one ends");
    seal(active).await?;
    let directory = shared.borrow().directory.clone();
    let fresh = create_segment(&directory, base_offset).await?;
    let old = std::mem::replace(active, fresh);
    let _ = old.index_file.close().await;
    if let Some(view) = shared.borrow_mut().segments.get_mut(&old.base_offset) {
        view.file = None; // sealed: readers open it themselves
    }
    if let Ok(file) = Rc::try_unwrap(old.log) {
        let _ = file.close().await; // a reader holding it closes it when done
    }
    let mut state = shared.borrow_mut();
    state.segments.insert(
        active.base_offset,
        SegmentView {
            base_offset: active.base_offset,
            file: Some(active.log.clone()),
            end_position: 0,
            next_offset: active.next_offset,
            index: Rc::new(Vec::new()),
        },
    );
    state.metrics.segments_rolled.inc();
    Ok(())
}

/// Makes the active segment's files exact and durable: the log without preallocation,
/// the index holding exactly its entries.
async fn seal(active: &mut ActiveSegment) -> Result<(), DiskError> {
    let (end_position, tail) = write_pending_index(active, DIRECT_IO_ALIGNMENT_BYTES).await?;
    active.index_end_position = end_position;
    active.index_tail = tail;
    active.index_written = active.index.len();
    active.log.truncate(active.end_position).await?;
    active.log.sync().await?;
    active.index_file.truncate(active.index_end_position).await?;
    active.index_file.sync().await?;
    Ok(())
}

async fn close_active(shared: &Rc<RefCell<Shared>>, active: ActiveSegment, seal: bool) -> Result<(), LogError> {
    let closed = seal_on_close(shared, active, seal).await;
    shared.borrow_mut().lock = None; // nothing writes to the directory any more
    closed
}

async fn seal_on_close(
    shared: &Rc<RefCell<Shared>>,
    mut active: ActiveSegment,
    seal_files: bool,
) -> Result<(), LogError> {
    shared.borrow_mut().closed = true;
    if !seal_files {
        return Ok(()); // never write to a poisoned partition again; recovery sorts it out
    }
    seal(&mut active).await.map_err(|source| disk_error(shared, source))?;
    active.index_file.close().await.map_err(|source| disk_error(shared, source))?;
    // The active segment is now sealed too: release the readers' handle so the file
    // closes here, not whenever the last `PartitionLog` clone is dropped.
    if let Some(view) = shared.borrow_mut().segments.get_mut(&active.base_offset) {
        view.file = None;
    }
    if let Ok(file) = Rc::try_unwrap(active.log) {
        file.close().await.map_err(|source| disk_error(shared, source))?;
    }
    Ok(())
}

/// Creates the files of a new, empty segment and makes their names durable.
async fn create_segment(directory: &Path, base_offset: i64) -> Result<ActiveSegment, DiskError> {
    let log_path = segment::log_path(directory, base_offset);
    let index_path = segment::index_path(directory, base_offset);
    // Leftovers from a crash before this segment had any data: start them afresh.
    for path in [&log_path, &index_path] {
        if path.exists() {
            std::fs::remove_file(path).map_err(|error| DiskError::new("remove stale", path, 0, error))?;
        }
    }
    // Space is preallocated by the first append's write plan.
    let log = DirectFile::create(&log_path).await?;
    let index_file = DirectFile::create(&index_path).await?;
    sync_directory(directory)?;
    Ok(ActiveSegment {
        base_offset,
        log: Rc::new(log),
        index_file,
        end_position: 0,
        next_offset: base_offset,
        tail: Vec::new(),
        index: Vec::new(),
        index_end_position: 0,
        index_tail: Vec::new(),
        index_written: 0,
    })
}

fn corrupt(name: &str, path: &Path, position: u64, reason: InvalidBatch) -> LogError {
    LogError::Corrupt { partition: name.to_owned(), path: path.to_owned(), position, reason }
}

/// Reads the index file of a segment (none: no entries).
async fn load_index(path: &Path) -> Result<Vec<IndexEntry>, DiskError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(DiskError::new("read index", path, 0, error)),
    };
    Ok(index::parse_entries(&bytes).0)
}

/// Drops index entries that do not point at the batch they claim (a hint written
/// without sync can be stale after power loss), keeping the longest valid prefix.
async fn verified_index(
    file: &DirectFile,
    base_offset: i64,
    file_bytes: u64,
    mut entries: Vec<IndexEntry>,
) -> Result<Vec<IndexEntry>, DiskError> {
    while let Some(entry) = entries.last().copied() {
        if u64::from(entry.position) < file_bytes {
            let position = u64::from(entry.position);
            let available = (file_bytes - position) as usize;
            let head = file.read(position, batch::BATCH_HEADER_BYTES.min(available)).await?;
            let total = batch::peek_total_bytes(&head).unwrap_or(batch::BATCH_HEADER_BYTES).min(available);
            if recovery::index_entry_holds(&file.read(position, total).await?, base_offset, entry) {
                return Ok(entries);
            }
        }
        entries.pop();
    }
    Ok(entries)
}

/// Where a scan of one segment ended.
struct ScanEnd {
    start: IndexEntry,
    cursor: ScanCursor,
    rebuilt: IndexRebuild,
    /// Why the scan stopped, if on bytes that are not a batch (a clean end of zeros
    /// also stops here).
    stop: Option<InvalidBatch>,
}

/// Scans from `start` (a verified batch boundary) to the end of the file's bytes.
async fn scan_segment(
    file: &DirectFile,
    base_offset: i64,
    start: IndexEntry,
    file_bytes: u64,
    index_interval_bytes: u64,
) -> Result<ScanEnd, DiskError> {
    let mut cursor = ScanCursor {
        position: u64::from(start.position),
        next_offset: base_offset + i64::from(start.relative_offset),
        batches: 0,
        records: 0,
    };
    let mut rebuilt = IndexRebuild::new(base_offset, start, index_interval_bytes);
    loop {
        if cursor.position >= file_bytes {
            return Ok(ScanEnd { start, cursor, rebuilt, stop: None });
        }
        let window_bytes = SCAN_WINDOW_BYTES.min((file_bytes - cursor.position) as usize);
        let window = file.read(cursor.position, window_bytes).await?;
        let at_end = cursor.position + window.len() as u64 >= file_bytes;
        let window_position = cursor.position;
        let stop = scan_window(&window, window_position, at_end, &mut cursor, |position, header| {
            rebuilt.observe(position, header)
        });
        match stop {
            ScanStop::NeedMore if !at_end => continue,
            ScanStop::NeedMore => return Ok(ScanEnd { start, cursor, rebuilt, stop: None }),
            ScanStop::Invalid(reason) => return Ok(ScanEnd { start, cursor, rebuilt, stop: Some(reason) }),
        }
    }
}

/// Opens a segment's log, verifies its index and scans from the last good entry.
async fn scan_with_index(
    file: &DirectFile,
    directory: &Path,
    base: i64,
    index_interval_bytes: u64,
) -> Result<(Vec<IndexEntry>, usize, ScanEnd), DiskError> {
    let file_bytes = file.size_bytes();
    let loaded = load_index(&segment::index_path(directory, base)).await?;
    let loaded_entries = loaded.len();
    let index = verified_index(file, base, file_bytes, loaded).await?;
    let start = index.last().copied().unwrap_or(IndexEntry { relative_offset: 0, position: 0 });
    let end = scan_segment(file, base, start, file_bytes, index_interval_bytes).await?;
    Ok((index, loaded_entries, end))
}

/// What recovery hands to `open`: the active segment for the flusher, the core's view
/// of it, and every segment for readers.
type Recovered = (ActiveSegment, ActiveState, BTreeMap<i64, SegmentView>);

/// Recovers every segment of a partition: reads what `core::log::recovery` plans from
/// and carries the plan out.
async fn recover(
    directory: &Path,
    name: &str,
    options: &LogOptions,
    metrics: &PartitionMetrics,
) -> Result<Recovered, LogError> {
    let layout = |why: String| LogError::Layout { partition: name.to_owned(), path: directory.to_owned(), why };
    let io = |source: DiskError| LogError::Disk { partition: name.to_owned(), source };
    std::fs::create_dir_all(directory).map_err(|error| layout(format!("cannot create: {error}")))?;
    probe_direct_io(directory).await.map_err(io)?;
    let names = list_directory(directory).map_err(|error| layout(format!("cannot list: {error}")))?;
    let plan = recovery::plan_directory(names.iter().map(String::as_str));
    let mut views = BTreeMap::new();
    let Some((active_base, sealed_bases)) = plan.segment_bases.split_last() else {
        let active = create_segment(directory, 0).await.map_err(io)?;
        views.insert(0, view_of(&active));
        return Ok((active, ActiveState::empty(0, Instant::now()), views));
    };
    for (position, base) in sealed_bases.iter().enumerate() {
        let next_base = plan.segment_bases[position + 1];
        views.insert(*base, recover_sealed(directory, name, *base, next_base, options).await?);
    }
    if sealed_bases.last().is_some() && views.values().next_back().map(|view| view.next_offset) != Some(*active_base) {
        let path = segment::log_path(directory, *active_base);
        return Err(layout(format!("active segment {} does not continue the sealed segments", path.display())));
    }
    let (active, state) = recover_active(directory, name, *active_base, options, metrics).await?;
    views.insert(*active_base, view_of(&active));
    for orphan in &plan.orphan_indexes {
        let _ = std::fs::remove_file(directory.join(orphan));
    }
    Ok((active, state, views))
}

fn list_directory(directory: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(directory)? {
        if let Some(name) = entry?.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// A sealed segment: exact size, ending exactly where the next one begins; any bad
/// byte refuses the open.
async fn recover_sealed(
    directory: &Path,
    name: &str,
    base: i64,
    next_base: i64,
    options: &LogOptions,
) -> Result<SegmentView, LogError> {
    let io = |source: DiskError| LogError::Disk { partition: name.to_owned(), source };
    let path = segment::log_path(directory, base);
    let file = DirectFile::open_read_only(&path).await.map_err(io)?;
    let file_bytes = file.size_bytes();
    let (index, loaded_entries, end) =
        scan_with_index(&file, directory, base, options.index_interval_bytes).await.map_err(io)?;
    if index.len() < loaded_entries {
        tracing::warn!(partition = name, file = %path.display(), stale_entries = loaded_entries - index.len(), kept_entries = index.len(), "sealed segment's index had entries that do not point at their batch (not synced before a power loss?); dropped: reads scan from the last good one");
    }
    if let Some(reason) = end.stop {
        return Err(corrupt(name, &path, end.cursor.position, reason));
    }
    // Verified: reads open it again when they need it.
    file.close().await.map_err(io)?;
    recovery::check_sealed(&end.cursor, file_bytes, next_base).map_err(|why| LogError::Layout {
        partition: name.to_owned(),
        path: directory.to_owned(),
        why: format!("sealed segment {} {why}", path.display()),
    })?;
    Ok(SegmentView {
        base_offset: base,
        file: None,
        end_position: file_bytes,
        next_offset: next_base,
        index: Rc::new(index),
    })
}

/// The active segment: scanned from its last verified index point, a torn tail cut,
/// its index file rewritten to hold exactly the verified and rebuilt entries.
async fn recover_active(
    directory: &Path,
    name: &str,
    base: i64,
    options: &LogOptions,
    metrics: &PartitionMetrics,
) -> Result<(ActiveSegment, ActiveState), LogError> {
    let io = |source: DiskError| LogError::Disk { partition: name.to_owned(), source };
    let path = segment::log_path(directory, base);
    let index_path = segment::index_path(directory, base);
    let file = DirectFile::open(&path).await.map_err(io)?;
    let (mut index, loaded_entries, end) =
        scan_with_index(&file, directory, base, options.index_interval_bytes).await.map_err(io)?;
    if index.len() < loaded_entries || !end.rebuilt.entries.is_empty() {
        tracing::info!(
            partition = name,
            file = %index_path.display(),
            stale_entries = loaded_entries - index.len(),
            rebuilt_entries = end.rebuilt.entries.len(),
            scanned_from_offset = base + i64::from(end.start.relative_offset),
            scanned_to_offset = end.cursor.next_offset,
            scanned_records = end.cursor.records,
            scanned_bytes = end.cursor.position - u64::from(end.start.position),
            "index rebuilt from the log (entries not yet written at the last stop, or stale after a power loss)"
        );
    }
    let cut_position = end.cursor.position;
    if cut_position == 0 {
        assert_eq!(end.cursor.next_offset, base, "an empty scan keeps the base offset");
    }
    if let Some(reason) = end.stop {
        cut_torn_tail(&file, name, &path, base, &end, reason, metrics).await?;
    }
    index.extend_from_slice(&end.rebuilt.entries);
    let (index_file, index_end_position, index_tail) =
        rewrite_index(directory, &index_path, &index).await.map_err(io)?;
    let tail = file
        .read(align_down(cut_position, DIRECT_IO_ALIGNMENT_BYTES), (cut_position % DIRECT_IO_ALIGNMENT_BYTES) as usize)
        .await
        .map_err(io)?;
    assert_eq!(tail.len() as u64, cut_position % DIRECT_IO_ALIGNMENT_BYTES);
    let state = ActiveState {
        base_offset: base,
        end_position: cut_position,
        next_offset: end.cursor.next_offset,
        allocated_bytes: file.size_bytes(),
        index_entries: index.len(),
        index_written: index.len(),
        bytes_since_index: end.rebuilt.bytes_since_index,
        created_at: created_at(&path),
    };
    let active = ActiveSegment {
        base_offset: base,
        log: Rc::new(file),
        index_file,
        end_position: cut_position,
        next_offset: end.cursor.next_offset,
        tail,
        index_written: index.len(),
        index,
        index_end_position,
        index_tail,
    };
    Ok((active, state))
}

/// Carries out `core::log::recovery::plan_tail` where the active segment's scan
/// stopped: refuse corruption before the tail, cut (zero and sync) a torn tail.
async fn cut_torn_tail(
    file: &DirectFile,
    name: &str,
    path: &Path,
    base: i64,
    end: &ScanEnd,
    reason: InvalidBatch,
    metrics: &PartitionMetrics,
) -> Result<(), LogError> {
    let io = |source: DiskError| LogError::Disk { partition: name.to_owned(), source };
    let cut_position = end.cursor.position;
    let file_bytes = file.size_bytes();
    let after =
        file.read(cut_position, SCAN_WINDOW_BYTES.min((file_bytes - cut_position) as usize)).await.map_err(io)?;
    match recovery::plan_tail(&after, cut_position, end.cursor.next_offset) {
        TailPlan::Keep => Ok(()),
        TailPlan::Refuse { .. } => Err(corrupt(name, path, cut_position, reason)),
        TailPlan::Cut { position, garbage_bytes, torn_records } => {
            // The torn batch never became durable, so no record in it was acknowledged;
            // its header, when readable, says how many records the cut takes.
            tracing::warn!(
                partition = name,
                file = %path.display(),
                position,
                bytes = garbage_bytes,
                kept_to_offset = end.cursor.next_offset - 1,
                segment_records_kept = end.cursor.next_offset - base,
                torn_records = %torn_records.map_or("unknown".to_owned(), |count| count.to_string()),
                %reason,
                "cutting torn tail (a write the crash interrupted, never acknowledged)"
            );
            metrics.recovery_truncated_bytes.inc_by(garbage_bytes);
            let tail = file
                .read(align_down(position, DIRECT_IO_ALIGNMENT_BYTES), (position % DIRECT_IO_ALIGNMENT_BYTES) as usize)
                .await
                .map_err(io)?;
            file.zero_from(position, garbage_bytes, &tail).await.map_err(io)?;
            file.sync().await.map_err(io)
        }
    }
}

/// Replaces the active segment's index file by one holding exactly `entries`, synced;
/// returns it with its end and tail page.
async fn rewrite_index(
    directory: &Path,
    index_path: &Path,
    entries: &[IndexEntry],
) -> Result<(DirectFile, u64, Vec<u8>), DiskError> {
    let index_bytes = recovery::index_file_bytes(entries);
    let _ = std::fs::remove_file(index_path);
    let index_file = DirectFile::create(index_path).await?;
    let mut index_end_position = 0u64;
    let mut index_tail = Vec::new();
    if !index_bytes.is_empty() {
        let plan = plan_append(
            0,
            index_bytes.len(),
            DIRECT_IO_ALIGNMENT_BYTES,
            0,
            segment::align_up(index_bytes.len() as u64, DIRECT_IO_ALIGNMENT_BYTES),
        );
        index_file
            .append(&plan, |buffer| {
                buffer[..index_bytes.len()].copy_from_slice(&index_bytes);
                buffer[index_bytes.len()..].fill(0);
                let page_start = align_down(index_bytes.len() as u64, DIRECT_IO_ALIGNMENT_BYTES) as usize;
                index_tail.extend_from_slice(&buffer[page_start..index_bytes.len()]);
            })
            .await?;
        index_end_position = plan.end_position;
    }
    index_file.sync().await?;
    sync_directory(directory)?;
    Ok((index_file, index_end_position, index_tail))
}

/// When the segment's file was created, on this process's monotonic clock (now when
/// the filesystem does not say): how a segment's age survives a restart.
fn created_at(path: &Path) -> Instant {
    std::fs::metadata(path)
        .and_then(|metadata| metadata.created())
        .ok()
        .and_then(|created| SystemTime::now().duration_since(created).ok())
        .and_then(|age| Instant::now().checked_sub(age))
        .unwrap_or_else(Instant::now)
}

fn view_of(active: &ActiveSegment) -> SegmentView {
    SegmentView {
        base_offset: active.base_offset,
        file: Some(active.log.clone()),
        end_position: active.end_position,
        next_offset: active.next_offset,
        index: Rc::new(active.index.clone()),
    }
}
