//! Consumer groups on the appliance: the coordinator (`core::consumer_group`, pure)
//! driven with the time, its deferred join and sync answers handed to the requests
//! waiting for them, and the committed offsets kept durable in the data directory.
//!
//! Committed offsets live in one file, `DATA_DIR/kafka-offsets.json`: every commit
//! rewrites it whole (a temporary file, fdatasync, rename, directory sync), off the
//! core on a blocking thread, one write at a time, and the commit is answered only
//! after its write is durable — so an answered commit survives a SIGKILL. The file is
//! bounded by `groups_max` × the appliance's partitions: a group that is neither live
//! nor in the file is admitted (joined, or its offsets committed) only while fewer than
//! `groups_max` groups are known (`Coordinator::admits_group`).
//!
//! What `/status` and the lag metric show of the groups is published to a board the
//! admin thread reads (`KafkaGroupsBoard`): after each durable commit, and on the
//! coordinator's tick when a group's state, generation or members changed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use local_sync::oneshot;
use serde::{Deserialize, Serialize};

use crate::core::consumer_group::group_error::{COORDINATOR_NOT_AVAILABLE, UNKNOWN_MEMBER_ID};
use crate::core::consumer_group::{
    Coordinator, Deferred, GroupLimits, GroupView, JoinAnswer, JoinRequest, Outcome, SyncAnswer,
};
use crate::shell::status::{KafkaGroupsBoard, PublishedGroup};

/// The committed-offsets file in the data directory.
pub const OFFSETS_FILE: &str = "kafka-offsets.json";
/// How often the coordinator's clock advances (session and rebalance timeouts).
pub const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub offset: i64,
    pub metadata: Option<String>,
}

/// The file's contents: group -> "topic/partition" -> offset.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OffsetsFile {
    version: u32,
    groups: BTreeMap<String, BTreeMap<String, Committed>>,
}

impl OffsetsFile {
    /// Every stored offset: (group, topic, partition, offset).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, u32, i64)> {
        self.groups.iter().flat_map(|(group, stored)| {
            stored.iter().filter_map(move |(name, committed)| {
                let (topic, partition) = name.rsplit_once('/')?;
                Some((group.as_str(), topic, partition.parse().ok()?, committed.offset))
            })
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OffsetsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a committed-offsets file: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
}

fn key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// Requests waiting for a deferred answer, by (group, member id).
type Waiting<T> = RefCell<HashMap<(String, String), Vec<oneshot::Sender<T>>>>;

pub(crate) struct Groups {
    coordinator: RefCell<Coordinator>,
    joins: Waiting<JoinAnswer>,
    syncs: Waiting<SyncAnswer>,
    offsets: RefCell<OffsetsFile>,
    path: PathBuf,
    /// One write of the file at a time; each writes the latest contents.
    writing: glommio::sync::Semaphore,
    started: Instant,
    board: Arc<KafkaGroupsBoard>,
    /// The live groups as last published.
    published: RefCell<Vec<GroupView>>,
}

/// Loads the committed offsets of `data_dir` (none when the file does not exist yet).
pub fn load_offsets(data_dir: &Path) -> Result<(PathBuf, OffsetsFile), OffsetsError> {
    let path = data_dir.join(OFFSETS_FILE);
    let offsets = match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| OffsetsError::Parse { path: path.clone(), source })?
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => OffsetsFile { version: 1, ..Default::default() },
        Err(source) => return Err(OffsetsError::Io { path, source }),
    };
    Ok((path, offsets))
}

impl Groups {
    pub fn new(path: PathBuf, offsets: OffsetsFile, limits: GroupLimits, board: Arc<KafkaGroupsBoard>) -> Groups {
        let groups = Groups {
            coordinator: RefCell::new(Coordinator::new(limits)),
            joins: RefCell::new(HashMap::new()),
            syncs: RefCell::new(HashMap::new()),
            offsets: RefCell::new(offsets),
            path,
            writing: glommio::sync::Semaphore::new(1),
            started: Instant::now(),
            board,
            published: RefCell::new(Vec::new()),
        };
        groups.publish();
        groups
    }

    /// Whether `group` may be used (see `Coordinator::admits_group`).
    fn admits(&self, group: &str) -> bool {
        let stored: BTreeSet<String> = self.offsets.borrow().groups.keys().cloned().collect();
        let admitted = self.coordinator.borrow().admits_group(group, &stored);
        if !admitted {
            tracing::warn!(group, "Kafka API: a new consumer group refused: kafka_api.groups_max groups are known");
        }
        admitted
    }

    /// Hands the admin thread what it shows of the groups: the live ones and every
    /// group with stored offsets.
    fn publish(&self) {
        let live = self.coordinator.borrow().groups();
        let offsets = self.offsets.borrow();
        let mut published: BTreeMap<&str, PublishedGroup> = live
            .iter()
            .map(|view| {
                let group = PublishedGroup {
                    group: view.group.clone(),
                    state: view.state.name(),
                    generation: view.generation,
                    members: view.members as u32,
                    committed: Vec::new(),
                };
                (view.group.as_str(), group)
            })
            .collect();
        for (group, topic, partition, offset) in offsets.entries() {
            let entry = published.entry(group).or_insert_with(|| PublishedGroup {
                group: group.to_owned(),
                state: "Empty",
                generation: 0,
                members: 0,
                committed: Vec::new(),
            });
            entry.committed.push((topic.to_owned(), partition, offset));
        }
        self.board.set(published.into_values().collect());
        *self.published.borrow_mut() = live;
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub async fn join(&self, group: &str, request: JoinRequest) -> JoinAnswer {
        let member_hint = request.member_id.clone();
        if !self.admits(group) {
            return JoinAnswer::error(COORDINATOR_NOT_AVAILABLE, &member_hint);
        }
        let outcome = self.coordinator.borrow_mut().handle_join(self.now_ms(), group, request);
        match outcome {
            Outcome::Now(answer) => answer,
            Outcome::Pending { member_id } => {
                let (sender, receiver) = oneshot::channel();
                self.joins.borrow_mut().entry((group.to_owned(), member_id.clone())).or_default().push(sender);
                self.deliver();
                receiver.await.unwrap_or_else(|_| JoinAnswer::error(UNKNOWN_MEMBER_ID, &member_hint))
            }
        }
    }

    pub async fn sync(
        &self,
        group: &str,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Vec<u8>)>,
    ) -> SyncAnswer {
        let outcome =
            self.coordinator.borrow_mut().handle_sync(self.now_ms(), group, member_id, generation, assignments);
        match outcome {
            Outcome::Now(answer) => answer,
            Outcome::Pending { member_id } => {
                let (sender, receiver) = oneshot::channel();
                self.syncs.borrow_mut().entry((group.to_owned(), member_id)).or_default().push(sender);
                self.deliver();
                receiver.await.unwrap_or_else(|_| SyncAnswer::error(UNKNOWN_MEMBER_ID))
            }
        }
    }

    pub fn heartbeat(&self, group: &str, member_id: &str, generation: i32) -> i16 {
        let code = self.coordinator.borrow_mut().handle_heartbeat(self.now_ms(), group, member_id, generation);
        self.deliver();
        code
    }

    pub fn leave(&self, group: &str, member_ids: &[String]) -> Vec<i16> {
        let codes = self.coordinator.borrow_mut().handle_leave(self.now_ms(), group, member_ids);
        self.deliver();
        codes
    }

    /// Advances the coordinator's clock.
    pub fn tick(&self) {
        self.coordinator.borrow_mut().handle_tick(self.now_ms());
        self.deliver();
        if *self.published.borrow() != self.coordinator.borrow().groups() {
            self.publish();
        }
    }

    /// Every committed offset of `group`: (topic, partition) -> offset.
    pub fn committed(&self, group: &str) -> BTreeMap<(String, i32), Committed> {
        let offsets = self.offsets.borrow();
        let Some(entries) = offsets.groups.get(group) else { return BTreeMap::new() };
        entries
            .iter()
            .filter_map(|(name, committed)| {
                let (topic, partition) = name.rsplit_once('/')?;
                Some(((topic.to_owned(), partition.parse().ok()?), committed.clone()))
            })
            .collect()
    }

    /// Checks a commit against the group's members and generation, and a new group
    /// against `groups_max`.
    pub fn check_commit(&self, group: &str, member_id: &str, generation: i32) -> Result<(), i16> {
        if !self.admits(group) {
            return Err(COORDINATOR_NOT_AVAILABLE);
        }
        self.coordinator.borrow().check_commit(group, member_id, generation)
    }

    /// Stores `entries` for `group` and returns once the file holding them is durable.
    pub async fn commit(&self, group: &str, entries: Vec<(String, i32, Committed)>) -> Result<(), OffsetsError> {
        {
            let mut offsets = self.offsets.borrow_mut();
            let stored = offsets.groups.entry(group.to_owned()).or_default();
            for (topic, partition, committed) in entries {
                stored.insert(key(&topic, partition), committed);
            }
        }
        let _permit = self.writing.acquire_permit(1).await.map_err(|_| OffsetsError::Io {
            path: self.path.clone(),
            source: std::io::Error::other("the offsets writer is closed"),
        })?;
        let text = serde_json::to_vec_pretty(&*self.offsets.borrow()).expect("offsets serialize");
        let path = self.path.clone();
        glommio::executor().spawn_blocking(move || write_durably(&path, &text)).await?;
        self.publish();
        Ok(())
    }

    fn deliver(&self) {
        loop {
            let Some(ready) = self.coordinator.borrow_mut().poll_answer() else { break };
            match ready {
                Deferred::Join { group, member_id, answer } => {
                    for waiting in self.joins.borrow_mut().remove(&(group, member_id)).unwrap_or_default() {
                        let _ = waiting.send(answer.clone());
                    }
                }
                Deferred::Sync { group, member_id, answer } => {
                    for waiting in self.syncs.borrow_mut().remove(&(group, member_id)).unwrap_or_default() {
                        let _ = waiting.send(answer.clone());
                    }
                }
            }
        }
    }
}

/// Writes `path` so that either the old or the new contents survive a crash.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), OffsetsError> {
    use std::io::Write;
    let io = |source| OffsetsError::Io { path: path.to_owned(), source };
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_data().map_err(io)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io)?;
    let directory = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(directory).and_then(|directory| directory.sync_all()).map_err(io)?;
    Ok(())
}

/// Ticks the coordinator until `stopping` says so.
pub(crate) async fn keep_time(groups: Rc<Groups>, stopping: impl Fn() -> bool) {
    while !stopping() {
        glommio::timer::sleep(TICK_INTERVAL).await;
        groups.tick();
    }
}
