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

use crate::core::log::batch::Record;
use crate::core::protocol::ErrorCode;
use crate::shell::log::{LogError, PartitionLog};
use crate::shell::quic::{AppendFailure, Appender};

/// Messages between cores.
#[derive(Debug)]
pub enum MeshMessage {
    Hello { core: usize },
    Append { request: u64, topic: String, partition: u32, records: Vec<Record> },
    Appended { request: u64, result: Result<i64, AppendFailure> },
}

/// Queue depth of each core-to-core channel.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;
/// How long a request waits for the owning core to announce itself at start.
const PEER_ANNOUNCE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a device is asked to wait after a partition reports backpressure or a full disk.
pub const RETRY_AFTER_MS: u32 = 500;

pub fn mesh(cores: usize) -> MeshBuilder<MeshMessage, Full> {
    MeshBuilder::full(cores, MESH_CHANNEL_CAPACITY)
}

/// The protocol's view of a log error.
pub fn failure_of(error: &LogError) -> AppendFailure {
    let (code, retry_after_ms) = match error {
        LogError::DiskFull { .. } => (ErrorCode::DiskFull, RETRY_AFTER_MS),
        LogError::TooLarge { .. } => (ErrorCode::FrameTooLarge, 0),
        LogError::Empty => (ErrorCode::MalformedFrame, 0),
        LogError::Closed { .. } => (ErrorCode::ShuttingDown, RETRY_AFTER_MS),
        _ => (ErrorCode::StorageFailed, 10 * RETRY_AFTER_MS),
    };
    AppendFailure { code, message: error.to_string(), retry_after_ms }
}

/// One core's appender: its own partitions, plus the mesh to the others.
pub struct CoreAppender {
    core: usize,
    cores: usize,
    logs: HashMap<(String, u32), PartitionLog>,
    senders: Option<Senders<MeshMessage>>,
    peer_of_core: RefCell<HashMap<usize, usize>>,
    pending: RefCell<HashMap<u64, oneshot::Sender<Result<i64, AppendFailure>>>>,
    next_request: Cell<u64>,
}

impl CoreAppender {
    /// Joins the mesh (when there is more than one core) and starts the tasks that
    /// serve other cores' requests. `logs` are this core's partitions.
    pub async fn start(
        core: usize,
        cores: usize,
        logs: HashMap<(String, u32), PartitionLog>,
        mesh: Option<MeshBuilder<MeshMessage, Full>>,
    ) -> Rc<CoreAppender> {
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
            senders,
            peer_of_core: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            next_request: Cell::new(0),
        });
        if let (Some(senders), Some(receivers)) = (appender.senders.as_ref(), receivers) {
            for peer in 0..senders.nr_consumers() {
                if peer != senders.peer_id() {
                    let _ = senders.send_to(peer, MeshMessage::Hello { core }).await;
                }
            }
            serve_peers(appender.clone(), receivers);
        }
        appender
    }

    fn owner_of(&self, partition: u32) -> usize {
        partition as usize % self.cores
    }

    async fn append_local(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<i64, AppendFailure> {
        match self.logs.get(&(topic.to_owned(), partition)) {
            Some(log) => log.append(records).await.map_err(|error| failure_of(&error)),
            None => Err(AppendFailure {
                code: ErrorCode::UnknownTopic,
                message: format!("core {} does not own {topic}-{partition}", self.core),
                retry_after_ms: 0,
            }),
        }
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
                }
            }
        })
        .detach();
    }
}

impl Appender for Rc<CoreAppender> {
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
