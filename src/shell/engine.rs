//! Cross-core appends: every core owns the partitions `p` with `p mod N == core`; a
//! record arriving on another core travels to the owner over glommio's channel mesh,
//! and its result travels back the same way. No locks, no shared memory on the path.
//!
//! glommio numbers mesh peers in the order they joined, not by core, so every core
//! first announces its core index; requests wait (briefly, at start) until the owner
//! has announced itself.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;

use futures_channel::oneshot;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers, Senders};

use crate::core::dedup::{self, DedupIndex, DedupLimits, RunDecision, RunGate};
use crate::core::log::batch::{self, Record};
use crate::core::protocol::ErrorCode;
use crate::shell::log::{LogError, PartitionLog};
use crate::shell::log_query::{self, LogAnswer, LogQuery};
use crate::shell::quic::{AppendFailure, Appender};
use crate::shell::watch::{self, CoreWatch, Observation, WatchLink};

/// Messages between cores.
#[derive(Debug)]
pub enum MeshMessage {
    Hello {
        core: usize,
    },
    Append {
        request: u64,
        topic: String,
        partition: u32,
        records: Vec<Record>,
    },
    Appended {
        request: u64,
        result: Result<i64, AppendFailure>,
    },
    /// A read of the receiver's partitions for the Kafka API (`shell::log_query`).
    Query {
        request: u64,
        query: LogQuery,
    },
    Answered {
        request: u64,
        answer: LogAnswer,
    },
    /// Frame outcomes for the stream watch of the devices the receiving core owns.
    Observations(Vec<crate::shell::watch::Observation>),
}

/// Queue depth of each core-to-core channel.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;
/// How long a request waits for the owning core to announce itself at start.
const PEER_ANNOUNCE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a device is asked to wait after a partition reports backpressure or a full disk.
pub const RETRY_AFTER_MS: u32 = 500;
/// How long a device is asked to wait when a partition's append queue is full (about a
/// few group commits: the queue drains at disk speed).
pub const BACKPRESSURE_RETRY_AFTER_MS: u32 = 50;
/// Retry-after for a quarantined partition: a repair takes an operator, minutes at least.
pub const QUARANTINE_RETRY_AFTER_MS: u32 = 30_000;

/// The cores' mesh for appends to a partition another core owns.
pub type Mesh = MeshBuilder<MeshMessage, Full>;

pub fn mesh(cores: usize) -> Mesh {
    MeshBuilder::full(cores, MESH_CHANNEL_CAPACITY)
}

/// The protocol's view of a log error.
pub fn failure_of(error: &LogError) -> AppendFailure {
    let (code, retry_after_ms) = match error {
        LogError::DiskFull { .. } => (ErrorCode::DiskFull, RETRY_AFTER_MS),
        LogError::TooLarge { .. } => (ErrorCode::FrameTooLarge, 0),
        LogError::Empty => (ErrorCode::MalformedFrame, 0),
        LogError::Closed { .. } => (ErrorCode::ShuttingDown, RETRY_AFTER_MS),
        LogError::Backpressure { .. } => (ErrorCode::Backpressure, BACKPRESSURE_RETRY_AFTER_MS),
        _ => (ErrorCode::StorageFailed, 10 * RETRY_AFTER_MS),
    };
    AppendFailure { code, message: error.to_string(), retry_after_ms }
}

/// One core's appender: its own partitions, plus the mesh to the others.
/// Sequence de-duplication settings (from `[quic]`).
#[derive(Debug, Clone, Copy)]
pub struct DedupSettings {
    pub limits: DedupLimits,
    /// Records at the end of each partition read at open to rebuild the index.
    pub horizon_records: i64,
}

/// Who waits for the result of a run another frame is appending.
type RunWaiter = oneshot::Sender<Result<i64, AppendFailure>>;

pub struct CoreAppender {
    core: usize,
    cores: usize,
    logs: HashMap<(String, u32), PartitionLog>,
    /// Each partition's de-duplication and in-flight joins (`core::dedup::RunGate`).
    gates: RefCell<HashMap<(String, u32), RunGate<RunWaiter>>>,
    senders: Option<Senders<MeshMessage>>,
    peer_of_core: RefCell<HashMap<usize, usize>>,
    pending: RefCell<HashMap<u64, oneshot::Sender<Result<i64, AppendFailure>>>>,
    /// Kafka API queries sent to other cores, by request id.
    pending_queries: RefCell<HashMap<u64, oneshot::Sender<LogAnswer>>>,
    next_request: Cell<u64>,
    /// This core's part of the stream watch, when `[watch]` is on.
    watch: Option<Rc<CoreWatch>>,
}

impl CoreAppender {
    /// Joins the mesh (when there is more than one core) and starts the tasks that
    /// serve other cores' requests. `logs` are this core's partitions.
    pub async fn start(
        core: usize,
        cores: usize,
        logs: HashMap<(String, u32), PartitionLog>,
        dedup_settings: DedupSettings,
        mesh: Option<MeshBuilder<MeshMessage, Full>>,
        watch: Option<Rc<CoreWatch>>,
    ) -> Result<Rc<CoreAppender>, LogError> {
        let mut gates = HashMap::new();
        for (key, log) in &logs {
            gates.insert(key.clone(), RunGate::new(rebuild_dedup(log, dedup_settings).await?));
        }
        let (senders, receivers) = match mesh {
            Some(mesh) if cores > 1 => {
                let (senders, receivers) = mesh.join().await.expect("joining the core mesh");
                (Some(senders), Some(receivers))
            }
            _ => (None, None),
        };
        let appender = Rc::new(CoreAppender {
            core,
            cores,
            logs,
            gates: RefCell::new(gates),
            senders,
            peer_of_core: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            pending_queries: RefCell::new(HashMap::new()),
            next_request: Cell::new(0),
            watch,
        });
        if let (Some(senders), Some(receivers)) = (appender.senders.as_ref(), receivers) {
            for peer in 0..senders.nr_consumers() {
                if peer != senders.peer_id() {
                    let _ = senders.send_to(peer, MeshMessage::Hello { core }).await;
                }
            }
            serve_peers(appender.clone(), receivers);
        }
        Ok(appender)
    }

    /// This core's part of the stream watch, when it is on.
    pub fn watch(&self) -> Option<Rc<CoreWatch>> {
        self.watch.clone()
    }

    /// The core that owns partition `partition` of every topic.
    pub fn owner_of(&self, partition: u32) -> usize {
        partition as usize % self.cores
    }

    /// Answers a Kafka API read on the core that owns the partition(s): here when this
    /// core does, over the mesh otherwise. `owner` is `owner_of` the partition.
    pub async fn query(&self, owner: usize, query: LogQuery) -> LogAnswer {
        if owner == self.core {
            return log_query::answer(&self.logs, query).await;
        }
        let Some(peer) = self.peer_of(owner).await else { return unreachable_answer(&query) };
        let unreachable = unreachable_answer(&query);
        let senders = self.senders.as_ref().expect("more than one core has a mesh");
        let request = self.next_request.get();
        self.next_request.set(request + 1);
        let (reply, answer) = oneshot::channel();
        self.pending_queries.borrow_mut().insert(request, reply);
        if senders.send_to(peer, MeshMessage::Query { request, query }).await.is_err() {
            self.pending_queries.borrow_mut().remove(&request);
            return unreachable;
        }
        answer.await.unwrap_or(unreachable)
    }

    /// The mesh peer of core `owner`, once it announced itself (bounded wait).
    async fn peer_of(&self, owner: usize) -> Option<usize> {
        let started = std::time::Instant::now();
        while !self.peer_of_core.borrow().contains_key(&owner) {
            if self.senders.is_none() || started.elapsed() > PEER_ANNOUNCE_WAIT_MAX {
                return None;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        Some(self.peer_of_core.borrow()[&owner])
    }

    async fn append_local(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<i64, AppendFailure> {
        let Some(log) = self.logs.get(&(topic.to_owned(), partition)) else {
            if crate::shell::quarantine::contains(topic, partition) {
                return Err(AppendFailure {
                    code: ErrorCode::StorageFailed,
                    message: format!(
                        "{topic}-{partition} is quarantined (weir serve --quarantine) while an operator repairs it; \
                         nothing stored, resend later"
                    ),
                    retry_after_ms: QUARANTINE_RETRY_AFTER_MS,
                });
            }
            return Err(AppendFailure {
                code: ErrorCode::UnknownTopic,
                message: format!("core {} does not own {topic}-{partition}", self.core),
                retry_after_ms: 0,
            });
        };
        let Some((device, sequence)) = dedup::key_of_records(&records) else {
            return log.append_unless_behind(records).await.map_err(|error| failure_of(&error));
        };
        let partition_key = (topic.to_owned(), partition);
        let digest = dedup::digest_of_records(&records);
        let record_count = records.len() as u32;
        let mut joined = None;
        let decision = self
            .gates
            .borrow_mut()
            .get_mut(&partition_key)
            .expect("every owned partition has a gate")
            .admit(&device, sequence, digest, record_count, || {
                let (reply, answer) = oneshot::channel();
                joined = Some(answer);
                reply
            });
        match decision {
            RunDecision::Append => {}
            RunDecision::Stored(base_offset) => return Ok(base_offset),
            RunDecision::Joined => {
                return joined.expect("a joined run has its answer").await.unwrap_or_else(|_| {
                    Err(AppendFailure {
                        code: ErrorCode::ShuttingDown,
                        message: "core stopped".into(),
                        retry_after_ms: RETRY_AFTER_MS,
                    })
                })
            }
            RunDecision::Reused => {
                return Err(AppendFailure {
                    code: ErrorCode::SequenceReused,
                    message: format!(
                        "sequence {sequence} of device {device} was already used for other records in \
                         {topic}-{partition}; nothing stored (a resend must repeat the very same frame)"
                    ),
                    retry_after_ms: 0,
                })
            }
            RunDecision::TooOld { forgotten_through } => {
                return Err(AppendFailure {
                    code: ErrorCode::SequenceTooOld,
                    message: format!(
                        "sequence {sequence} of device {device} is at or below sequence {forgotten_through}, which \
                         {topic}-{partition} no longer remembers (quic.dedup_sequences_per_device_max): it may be \
                         stored already, so it is not stored again"
                    ),
                    retry_after_ms: 0,
                });
            }
        }
        let result = log.append_unless_behind(records).await.map_err(|error| failure_of(&error));
        let waiters = self
            .gates
            .borrow_mut()
            .get_mut(&partition_key)
            .expect("every owned partition has a gate")
            .appended(&device, sequence, result.as_ref().ok().copied());
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
        result
    }

    async fn append_remote(
        &self,
        owner: usize,
        topic: String,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<i64, AppendFailure> {
        let senders = self.senders.as_ref().expect("more than one core has a mesh");
        // Every core announces itself right after joining; wait for the owner's
        // announcement, bounded.
        let started = std::time::Instant::now();
        while !self.peer_of_core.borrow().contains_key(&owner) {
            if started.elapsed() > PEER_ANNOUNCE_WAIT_MAX {
                return Err(AppendFailure {
                    code: ErrorCode::ShuttingDown,
                    message: format!("core {owner} did not join"),
                    retry_after_ms: RETRY_AFTER_MS,
                });
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        let peer = self.peer_of_core.borrow()[&owner];
        let request = self.next_request.get();
        self.next_request.set(request + 1);
        let (reply, answer) = oneshot::channel();
        self.pending.borrow_mut().insert(request, reply);
        if senders.send_to(peer, MeshMessage::Append { request, topic, partition, records }).await.is_err() {
            self.pending.borrow_mut().remove(&request);
            return Err(AppendFailure {
                code: ErrorCode::ShuttingDown,
                message: format!("core {owner} is not reachable"),
                retry_after_ms: RETRY_AFTER_MS,
            });
        }
        answer.await.unwrap_or_else(|_| {
            Err(AppendFailure {
                code: ErrorCode::ShuttingDown,
                message: "core stopped".into(),
                retry_after_ms: RETRY_AFTER_MS,
            })
        })
    }
}

fn serve_peers(appender: Rc<CoreAppender>, mut receivers: Receivers<MeshMessage>) {
    for (peer, receiver) in receivers.streams() {
        let appender = appender.clone();
        glommio::spawn_local(async move {
            use futures_lite::StreamExt;
            let mut receiver = receiver;
            while let Some(message) = receiver.next().await {
                match message {
                    MeshMessage::Hello { core } => {
                        appender.peer_of_core.borrow_mut().insert(core, peer);
                    }
                    MeshMessage::Append { request, topic, partition, records } => {
                        let appender = appender.clone();
                        glommio::spawn_local(async move {
                            let result = appender.append_local(&topic, partition, records).await;
                            if let Some(senders) = appender.senders.as_ref() {
                                let _ = senders.send_to(peer, MeshMessage::Appended { request, result }).await;
                            }
                        })
                        .detach();
                    }
                    MeshMessage::Appended { request, result } => {
                        if let Some(reply) = appender.pending.borrow_mut().remove(&request) {
                            let _ = reply.send(result);
                        }
                    }
                    MeshMessage::Query { request, query } => {
                        let appender = appender.clone();
                        glommio::spawn_local(async move {
                            let answer = log_query::answer(&appender.logs, query).await;
                            if let Some(senders) = appender.senders.as_ref() {
                                let _ = senders.send_to(peer, MeshMessage::Answered { request, answer }).await;
                            }
                        })
                        .detach();
                    }
                    MeshMessage::Answered { request, answer } => {
                        if let Some(reply) = appender.pending_queries.borrow_mut().remove(&request) {
                            let _ = reply.send(answer);
                        }
                    }
                    MeshMessage::Observations(batch) => {
                        if let Some(watch) = &appender.watch {
                            watch.receive(batch);
                        }
                    }
                }
            }
        })
        .detach();
    }
}

impl Appender for Rc<CoreAppender> {
    fn watching(&self) -> bool {
        self.watch.is_some()
    }

    fn observe(
        &self,
        device: &str,
        seen: Option<watch::FrameSeen>,
        answer: &crate::core::protocol::AnswerFrame,
        received: std::time::Instant,
    ) {
        if let Some(watch) = &self.watch {
            watch.observe(watch::observation_of(device, seen, answer, received));
        }
    }

    fn append(
        &self,
        topic: String,
        partition: u32,
        records: Vec<Record>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<i64, AppendFailure>>>> {
        let appender = self.clone();
        Box::pin(async move {
            let owner = appender.owner_of(partition);
            if owner == appender.core {
                appender.append_local(&topic, partition, records).await
            } else {
                appender.append_remote(owner, topic, partition, records).await
            }
        })
    }
}

/// The answer to a query whose owning core cannot be reached (stopping).
fn unreachable_answer(query: &LogQuery) -> LogAnswer {
    let failure = || log_query::PartitionFailure::Storage("the core owning the partition is not reachable".to_owned());
    match query {
        LogQuery::Read { .. } => LogAnswer::Read(log_query::ReadOutcome::Failed(failure())),
        LogQuery::Wait { .. } => LogAnswer::Waited,
        LogQuery::OffsetForTimestamp { .. } => LogAnswer::Offset(Err(failure())),
        LogQuery::Range { .. } => LogAnswer::Range(Err(failure())),
    }
}

impl WatchLink for Rc<CoreAppender> {
    fn send_observations(&self, owner: usize, batch: Vec<Observation>) -> Result<(), usize> {
        let count = batch.len();
        let (Some(senders), Some(peer)) = (self.senders.as_ref(), self.peer_of_core.borrow().get(&owner).copied())
        else {
            return Err(count);
        };
        senders.try_send_to(peer, MeshMessage::Observations(batch)).map_err(|_| count)
    }

    fn append_alerts(
        &self,
        records: Vec<Record>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<i64, AppendFailure>>>> {
        self.append(crate::config::WATCH_ALERTS_TOPIC.to_owned(), 0, records)
    }
}

/// Rebuilds a partition's de-duplication index from the last records of its log.
async fn rebuild_dedup(log: &PartitionLog, settings: DedupSettings) -> Result<DedupIndex, LogError> {
    let mut index = DedupIndex::new(settings.limits);
    let stats = log.stats();
    let mut next = stats.start_offset.max(stats.next_offset - settings.horizon_records);
    while next < stats.next_offset {
        let batches = log.read(next, 1 << 20).await?;
        if batches.is_empty() {
            break;
        }
        for bytes in &batches {
            let records = batch::records(bytes).map_err(|reason| LogError::Corrupt {
                partition: log.name(),
                path: std::path::PathBuf::new(),
                position: 0,
                reason: reason.into(),
            })?;
            for record in records {
                let Ok(record) = record else { continue };
                if record.offset >= next {
                    index.observe(record.offset, dedup::run_key_of_stored(&record), |digest| {
                        dedup::digest_of_stored(digest, &record)
                    });
                    next = record.offset + 1;
                }
            }
        }
    }
    Ok(index)
}
