//! One partition's upstream shipper: executes what `core::ship::ShipperCore` decides.
//! It reads stored batches from the partition's log, keeps one connection to the
//! partition's leader (`shell::kafka`), makes `ship.state` durable, feeds every answer,
//! failure and tick back to the core, and exports the shipped lag. It decides nothing.
//!
//! It runs as a task on the partition's own core. It polls the log's durable end every
//! `LOG_POLL_INTERVAL` (the log has no "new data" notification), and waits for broker
//! answers and the core's timers in between. A shipper whose core stopped it
//! (`StopReason`) logs why, sets `weir_ship_stopped`, and ends; the partition keeps
//! accepting appends and nothing is lost. On shutdown it persists its cursor.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use kafka_protocol::messages::ProduceRequest;

use crate::config::ValidConfig;
use crate::core::log::batch;
use crate::core::ship::errors::{error_name, NONE, OFFSET_OUT_OF_RANGE};
use crate::core::ship::lag::{self, CursorBatch};
use crate::core::ship::reconcile::{ReconcileError, Scan};
use crate::core::ship::state::{StateError, STATE_FILE_NAME};
use crate::core::ship::{
    Action, ProduceAnswer, RequestId, ShipConfig, ShipState, ShipStats, ShipperCore, StopReason, UpstreamPartition,
};
use crate::shell::disk::sync_directory;
use crate::shell::kafka::{self, ClientOptions, Connection, KafkaError, PRODUCE_VERSIONS};
use crate::shell::kafka_secure::{Refusal, Security};
use crate::shell::log::{LogError, PartitionLog};
use crate::shell::metrics::ShipMetrics;
use crate::shell::shutdown;
use crate::shell::status::ShipperState;
use crate::shell::status_cells::unix_seconds;

/// How often the shipper looks at the log's durable end while idle.
pub const LOG_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// The shortest wait between two rounds of the loop.
const WAIT_MIN: Duration = Duration::from_micros(100);
// A reconciliation Fetch (`reconcile::ScanPlan`) fits in one response frame.
const _: () = assert!(crate::core::ship::reconcile::SCAN_FETCH_BYTES_MAX < kafka::RESPONSE_BYTES_MAX / 2);
/// The name of the state file while it is being written.
const STATE_FILE_NEW_NAME: &str = "ship.state.new";
/// How often the lag gauges (records, bytes, seconds, cursor) are sampled together.
/// Each sample reads at most about one index interval of the log.
const LAG_REFRESH_INTERVAL: Duration = Duration::from_millis(200);
/// How often retention runs with the durable cursor even when it did not move, so
/// shipped segments go when the data directory (not this partition) needs room.
const RETAIN_INTERVAL: Duration = Duration::from_secs(1);
/// How often a problem that keeps repeating is logged again.
const WARN_REPEAT_INTERVAL: Duration = Duration::from_secs(60);
/// How often a `ship.state` write that found the disk full is tried again.
const PERSIST_FULL_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Everything one partition's shipper needs to know.
#[derive(Debug, Clone)]
pub struct ShipperSetup {
    /// The partition's name (`<topic>-<partition>`), for errors and logs.
    pub name: String,
    pub edge_topic: String,
    pub edge_partition: u32,
    pub directory: PathBuf,
    pub bootstrap_servers: Vec<String>,
    pub client: ClientOptions,
    pub upstream: UpstreamPartition,
    pub config: ShipConfig,
    /// Seeds the retry jitter.
    pub seed: u64,
}

impl ShipperSetup {
    /// The shipper of edge `topic`/`partition`, or `None` when it is not shipped.
    pub fn from_config(valid: &ValidConfig, topic: &str, partition: u32, directory: &Path) -> Option<ShipperSetup> {
        let upstream = &valid.config.upstream;
        let (upstream_topic, upstream_partition) = upstream.destination(topic, partition)?;
        let batch_bytes_max = upstream.batch_bytes_max.0 as usize;
        Some(ShipperSetup {
            name: format!("{topic}-{partition}"),
            edge_topic: topic.to_owned(),
            edge_partition: partition,
            directory: directory.to_owned(),
            bootstrap_servers: upstream.bootstrap_servers.clone(),
            client: ClientOptions {
                client_id: upstream.client_id.clone(),
                connect_timeout: Duration::from_millis(upstream.connect_timeout_ms.0),
                request_timeout: Duration::from_millis(upstream.request_timeout_ms.0),
                security: Security::load_or_refuse(upstream),
            },
            upstream: UpstreamPartition {
                topic: upstream_topic,
                partition: upstream_partition,
                partitions_exact: upstream.partitions_exact(topic, &valid.config.topics),
            },
            config: ShipConfig {
                batch_bytes_max,
                in_flight_max: upstream.in_flight_max as usize,
                read_ahead_bytes: 2 * batch_bytes_max,
                request_timeout: Duration::from_millis(upstream.request_timeout_ms.0),
                backoff_min: Duration::from_millis(upstream.retry_backoff_ms_min.0),
                backoff_max: Duration::from_millis(upstream.retry_backoff_ms_max.0),
                persist_interval: Duration::from_millis(upstream.cursor_persist_interval_ms.0),
                bandwidth_bytes_per_s_max: upstream.bandwidth_bytes_per_s_max.0,
                reconcile_scan_bytes_max: upstream.reconcile_scan_bytes_max.0,
            },
            seed: seed_for(topic, partition),
        })
    }
}

/// A jitter seed that differs between partitions and between runs.
fn seed_for(topic: &str, partition: u32) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_nanos());
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ (nanos as u64) ^ u64::from(partition).rotate_left(32);
    for byte in topic.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A failure of the state file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateFileError {
    #[error("{operation} {path}: {source}")]
    Io { operation: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason} (refusing to guess: remove it only if the upstream partition is to receive the whole log again)")]
    Corrupt { path: PathBuf, reason: StateError },
}

/// Why a shipper ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShipError {
    #[error("partition {partition}: upstream shipping stopped: {reason}")]
    Stopped { partition: String, reason: StopReason },
    #[error("partition {partition}: ship state: {source}")]
    State { partition: String, source: StateFileError },
    #[error("partition {partition}: reading the log for shipping: {source}")]
    Log { partition: String, source: LogError },
    #[error("partition {partition}: upstream shipping stopped: the broker connection was refused: {source} (fix the [upstream.tls] / [upstream.sasl] settings or the broker's, then restart weir)")]
    Refused { partition: String, source: Refusal },
}

/// Reads `ship.state` from a partition directory; `None` when there is none yet.
pub fn read_state(directory: &Path) -> Result<Option<ShipState>, StateFileError> {
    let path = directory.join(STATE_FILE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => ShipState::decode(&bytes).map(Some).map_err(|reason| StateFileError::Corrupt { path, reason }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateFileError::Io { operation: "read", path, source }),
    }
}

/// Replaces `ship.state` atomically and durably: write a new file, fsync it, rename it
/// over the old one, fsync the directory. Blocking: run it off the core.
pub fn write_state(directory: &Path, state: &ShipState) -> Result<(), StateFileError> {
    let new_path = directory.join(STATE_FILE_NEW_NAME);
    let path = directory.join(STATE_FILE_NAME);
    let io = |operation, path: &Path| {
        let path = path.to_owned();
        move |source| StateFileError::Io { operation, path, source }
    };
    let mut file = std::fs::File::create(&new_path).map_err(io("create", &new_path))?;
    file.write_all(&state.encode()).map_err(io("write", &new_path))?;
    file.sync_all().map_err(io("fsync", &new_path))?;
    drop(file);
    std::fs::rename(&new_path, &path).map_err(io("rename", &path))?;
    sync_directory(directory).map_err(|error| StateFileError::Io {
        operation: "fsync directory",
        path: directory.to_owned(),
        source: error.source,
    })
}

/// What a reconciliation scan ended with.
enum ScanEnd {
    Found(Scan),
    /// The upstream said something only an operator can resolve.
    Refused(ReconcileError),
    /// The broker could not be reached or misbehaved: try again later.
    Transport(KafkaError),
}

/// A failing stretch of shipping: what fails, since when, and its logging.
struct Trouble {
    /// The latest problem (what `/status` shows).
    problem: String,
    /// Wall-clock start, for `weir_ship_failing_since_timestamp_seconds`.
    since: std::time::SystemTime,
    started: Instant,
    logged_at: Option<Instant>,
    /// Times the same problem came back since it was last logged.
    repeats: u64,
}

/// The shipper's connection and the Produce requests outstanding on it.
struct Link {
    connection: Connection,
    version: i16,
    requests: HashMap<i32, RequestId>,
}

struct Shipper {
    log: PartitionLog,
    setup: ShipperSetup,
    metrics: ShipMetrics,
    core: ShipperCore,
    link: Option<Link>,
    exported: ShipStats,
    /// What is failing, since when, and when it was last logged (`None` while healthy).
    trouble: Option<Trouble>,
    /// The stored batch holding the cursor, for the lag in seconds (`core::ship::lag`).
    cursor_batch: Option<CursorBatch>,
    lag_refreshed_at: Option<Instant>,
    /// The cursor last made durable in `ship.state`: retention may delete below it.
    durable_cursor: Option<i64>,
    retained_at: Instant,
    shown_state: ShipperState,
    /// A TLS or SASL refusal seen: shipping stops with it (retrying cannot help).
    refused: Option<Refusal>,
}

/// Runs the shipper of one partition until `shutdown` is set (then persists the
/// cursor and returns `Ok`). If it cannot go on, it marks itself stopped (metric,
/// `/status`, `/health`), keeps the lag gauges current until shutdown, and returns
/// why.
pub async fn run(
    log: PartitionLog,
    setup: ShipperSetup,
    metrics: ShipMetrics,
    shutdown: Arc<AtomicBool>,
) -> Result<(), ShipError> {
    let name = setup.name.clone();
    let (result, last) = match start(log.clone(), setup, metrics.clone()).await {
        Ok(mut shipper) => {
            let result = shipper.serve(&shutdown).await;
            (result, Some((shipper.core.cursor_offset(), shipper.cursor_batch)))
        }
        Err(error) => (Err(error), None),
    };
    if let Err(error) = &result {
        metrics.stopped.set(1);
        if matches!(error, ShipError::Refused { .. }) {
            metrics.refused.set(1);
        }
        metrics.set_state(ShipperState::Stopped { error: error.to_string() });
        tracing::error!(partition = %name, error = %error, "shipper stopped");
        // The partition keeps accepting appends: keep its lag current until shutdown.
        let (cursor, mut cursor_batch) = last.unwrap_or((log.stats().start_offset, None));
        while !shutdown::is_signalled(&shutdown) {
            if let Err(error) = sample_lag(&log, &metrics, &mut cursor_batch, cursor).await {
                tracing::debug!(partition = %name, %error, "lag sample failed; kept the last one");
            }
            glommio::timer::sleep(LAG_REFRESH_INTERVAL).await;
        }
    }
    result
}

/// Sets the cursor and lag gauges together from one look at the log. The lag in
/// seconds comes from the records' own timestamps (`core::ship::lag`): the header of
/// the batch holding the cursor is read when the cursor left the one read last.
async fn sample_lag(
    log: &PartitionLog,
    metrics: &ShipMetrics,
    cursor_batch: &mut Option<CursorBatch>,
    cursor_offset: i64,
) -> Result<(), LogError> {
    // Offsets drop-oldest deleted are not lag: they will never ship.
    let from_offset = cursor_offset.max(log.stats().start_offset);
    let (bytes, end_offset) = log.bytes_from(from_offset).await?;
    if from_offset < end_offset && !cursor_batch.is_some_and(|batch| batch.covers(from_offset)) {
        *cursor_batch = read_cursor_batch(log, from_offset).await?;
    }
    metrics.cursor_offset.set(cursor_offset);
    metrics.lag_records.set((end_offset - from_offset).max(0));
    metrics.lag_bytes.set(bytes as i64);
    if let Some(age) = lag::lag(from_offset, end_offset, cursor_batch.as_ref(), unix_now_ms()) {
        metrics.lag_seconds.set(age.as_secs_f64());
    }
    Ok(())
}

/// The offsets and max timestamp of the stored batch holding `offset` (`None` when
/// drop-oldest deleted it meanwhile: the next sample starts from the new log start).
async fn read_cursor_batch(log: &PartitionLog, offset: i64) -> Result<Option<CursorBatch>, LogError> {
    let batches = match log.read(offset, 1).await {
        Ok(batches) => batches,
        Err(LogError::OffsetOutOfRange { .. }) => return Ok(None),
        Err(error) => return Err(error),
    };
    Ok(batches.first().and_then(|stored| batch::parse_header(stored).ok()).map(|header| CursorBatch {
        base_offset: header.base_offset,
        next_offset: header.next_offset(),
        max_timestamp_ms: header.max_timestamp,
    }))
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

/// Reads the state, makes the core and frees what the persisted cursor allows.
async fn start(log: PartitionLog, setup: ShipperSetup, metrics: ShipMetrics) -> Result<Shipper, ShipError> {
    let persisted =
        read_state(&setup.directory).map_err(|source| ShipError::State { partition: setup.name.clone(), source })?;
    let stats = log.stats();
    let durable_cursor = persisted.as_ref().map(|state| state.cursor_offset);
    let core = ShipperCore::new(
        setup.config.clone(),
        setup.upstream.clone(),
        persisted,
        stats.start_offset,
        stats.next_offset,
        setup.seed,
        Instant::now(),
    );
    tracing::info!(
        partition = %setup.name,
        upstream = %format!("{}/{}", setup.upstream.topic, setup.upstream.partition),
        cursor = core.cursor_offset(),
        log_end = stats.next_offset,
        "shipper starting"
    );
    let mut shipper = Shipper {
        log,
        setup,
        metrics,
        core,
        link: None,
        exported: ShipStats::default(),
        trouble: None,
        cursor_batch: None,
        lag_refreshed_at: None,
        durable_cursor: None,
        retained_at: Instant::now(),
        shown_state: ShipperState::Starting,
        refused: None,
    };
    // The persisted cursor is durable: the log may free shipped segments below it
    // (also when the disk fills) from the start.
    if shipper.core.stop_reason().is_none() {
        shipper.durable_cursor = durable_cursor;
        shipper.retain_shipped().await?;
    }
    Ok(shipper)
}

impl Shipper {
    async fn serve(&mut self, shutdown: &AtomicBool) -> Result<(), ShipError> {
        loop {
            if shutdown::is_signalled(shutdown) {
                return self.finish().await;
            }
            let stats = self.log.stats();
            self.core.handle_log_end(stats.start_offset, stats.next_offset, Instant::now());
            self.core.handle_timeout(Instant::now());
            while let Some(action) = self.core.poll_action(Instant::now()) {
                self.execute(action).await?;
                if let Some(source) = self.refused.take() {
                    return Err(ShipError::Refused { partition: self.setup.name.clone(), source });
                }
            }
            self.export_metrics();
            if self.trouble.is_some() && self.core.is_running() && self.core.lag_records() == 0 {
                self.succeeded(); // caught up again: nothing is failing
            }
            if let Some(reason) = self.core.stop_reason() {
                return Err(ShipError::Stopped { partition: self.setup.name.clone(), reason: reason.clone() });
            }
            if self.lag_refreshed_at.is_none_or(|at| at.elapsed() >= LAG_REFRESH_INTERVAL) {
                self.refresh_lag().await;
            }
            if self.retained_at.elapsed() >= RETAIN_INTERVAL {
                self.retain_shipped().await?;
            }
            self.show_state();
            self.wait().await;
        }
    }

    /// Waits for a broker answer, the core's next timer or the next log poll.
    async fn wait(&mut self) {
        let now = Instant::now();
        let wait = self
            .core
            .poll_timeout()
            .map_or(LOG_POLL_INTERVAL, |at| at.saturating_duration_since(now))
            .min(LOG_POLL_INTERVAL)
            // Never zero: a zero sleep is ready at once, the task would never yield,
            // and the reactor would never deliver the broker's answer.
            .max(WAIT_MIN);
        let Some(link) = self.link.as_mut().filter(|link| !link.requests.is_empty()) else {
            glommio::timer::sleep(wait).await;
            return;
        };
        let answer = future::or(async { Some(link.connection.read_frame().await) }, async {
            glommio::timer::sleep(wait).await;
            None
        })
        .await;
        let outcome = match answer {
            None => return,
            Some(Err(error)) => Err(error),
            Some(Ok((correlation, frame))) => {
                let request = link.requests.remove(&correlation).expect("read_frame checked the correlation id");
                let topic = &self.setup.upstream.topic;
                let partition = self.setup.upstream.partition;
                link.connection.decode::<ProduceRequest>(frame, link.version).and_then(|response| {
                    kafka::produce_answer(&response, topic, partition).map(|answer| (request, answer)).ok_or_else(
                        || KafkaError::MissingPartition {
                            address: link.connection.address().to_owned(),
                            topic: topic.clone(),
                            partition,
                        },
                    )
                })
            }
        };
        match outcome {
            Ok((request, answer)) => {
                match answer {
                    ProduceAnswer::Error { code } => {
                        self.warn(format!("Produce answered {} ({code})", error_name(code)))
                    }
                    ProduceAnswer::Appended { .. } => self.succeeded(),
                }
                self.core.handle_produced(request, answer, Instant::now());
            }
            Err(error) => self.transport_failed(error),
        }
    }

    fn transport_failed(&mut self, error: KafkaError) {
        if !self.note_refusal(&error) {
            self.warn(error.to_string());
        }
        self.link = None;
        self.core.handle_transport_failed(Instant::now());
    }

    /// Keeps a TLS or SASL refusal: the loop stops shipping with it (and logs it then,
    /// once). True when `error` is one.
    fn note_refusal(&mut self, error: &KafkaError) -> bool {
        let Some(refusal) = error.refusal() else { return false };
        self.refused.get_or_insert_with(|| refusal.clone());
        true
    }

    /// Notes a broker problem: the shipper is failing from now (if it was not), and the
    /// problem is logged when it is new or, while it repeats, at most every
    /// `WARN_REPEAT_INTERVAL` with how often it repeated and for how long shipping has
    /// been failing.
    fn warn(&mut self, message: String) {
        let now = Instant::now();
        let trouble = self.trouble.get_or_insert_with(|| {
            let since = std::time::SystemTime::now();
            Trouble { problem: String::new(), since, started: now, logged_at: None, repeats: 0 }
        });
        let new_problem = trouble.problem != message;
        if new_problem || trouble.logged_at.is_none_or(|at| now.duration_since(at) >= WARN_REPEAT_INTERVAL) {
            tracing::warn!(
                partition = %self.setup.name,
                problem = %message,
                failing_for_s = now.duration_since(trouble.started).as_secs(),
                repeats = trouble.repeats,
                "upstream shipping will retry (a problem that repeats is logged at most once a minute)"
            );
            trouble.logged_at = Some(now);
            trouble.repeats = 0;
        } else {
            trouble.repeats += 1;
        }
        if new_problem {
            trouble.problem = message;
        }
        if self.metrics.failing_since.get() == 0.0 {
            self.metrics.failing_since.set(unix_seconds(trouble.since));
        }
    }

    /// The upstream acknowledged a batch, granted a producer or answered a scan.
    fn note_upstream_answered(&self) {
        self.metrics.last_success.set(unix_seconds(std::time::SystemTime::now()));
    }

    /// Shipping made progress or is caught up: whatever was failing is over.
    fn succeeded(&mut self) {
        self.note_upstream_answered();
        if let Some(trouble) = self.trouble.take() {
            tracing::info!(partition = %self.setup.name, failed_for_s = trouble.started.elapsed().as_secs(), "upstream shipping resumed");
            self.metrics.failing_since.set(0.0);
        }
    }

    async fn execute(&mut self, action: Action) -> Result<(), ShipError> {
        if tracing::enabled!(tracing::Level::TRACE) {
            let summary = match &action {
                Action::Send(send) => {
                    format!("send {}..={} attempt {}", send.first_offset, send.last_offset, send.attempt)
                }
                other => format!("{other:?}"),
            };
            tracing::trace!(partition = %self.setup.name, action = %summary, "shipper action");
        }
        match action {
            Action::InitProducer => match self.init_producer().await {
                Ok((producer, upstream_end)) => {
                    tracing::info!(partition = %self.setup.name, producer_id = producer.id, epoch = producer.epoch, upstream_end, "upstream producer granted");
                    self.note_upstream_answered();
                    self.core.handle_producer(producer, upstream_end);
                }
                Err(error) => {
                    if !self.note_refusal(&error) {
                        self.warn(format!("InitProducerId: {error}"));
                    }
                    self.link = None;
                    self.core.handle_setup_failed(Instant::now());
                }
            },
            Action::Reconcile { producer, plan } => match self.scan(Scan::new(producer, plan)).await {
                ScanEnd::Found(scan) => {
                    self.note_upstream_answered();
                    self.core.handle_scanned(scan.ours());
                    tracing::info!(partition = %self.setup.name, cursor = self.core.cursor_offset(), recovered = self.core.stats().batches_reconciled, sequences_unchecked = self.core.stats().sequences_unchecked, "reconciled with upstream");
                }
                ScanEnd::Refused(error) => {
                    self.core.handle_reconcile_failed(error, Instant::now());
                    if let Some(retrying) = self.core.reconcile_retrying() {
                        self.warn(format!("reconciliation with the upstream partition: {retrying}"));
                    }
                }
                ScanEnd::Transport(error) => {
                    if !self.note_refusal(&error) {
                        self.warn(format!("reconciliation scan: {error}"));
                    }
                    self.link = None;
                    self.core.handle_setup_failed(Instant::now());
                }
            },
            Action::Persist { generation, state } => {
                let cursor = state.cursor_offset;
                self.persist(state).await?;
                self.durable_cursor = Some(cursor);
                self.core.handle_persisted(generation);
            }
            Action::ReadLog { from_offset, bytes_max } => {
                let batches = match self.log.read(from_offset, bytes_max).await {
                    Ok(batches) => batches,
                    // drop-oldest deleted the segment after the core asked: nothing
                    // read; the next round tells the core where the log now starts.
                    Err(LogError::OffsetOutOfRange { .. }) => Vec::new(),
                    Err(source) => return Err(ShipError::Log { partition: self.setup.name.clone(), source }),
                };
                self.core.handle_stored(from_offset, batches);
            }
            Action::Send(send) => {
                if let Err(error) = self.ensure_link().await {
                    self.transport_failed(error);
                    return Ok(());
                }
                let link = self.link.as_mut().expect("ensured");
                let timeout_ms = i32::try_from(self.setup.config.request_timeout.as_millis()).unwrap_or(i32::MAX);
                let request = kafka::produce_request(
                    &self.setup.upstream.topic,
                    self.setup.upstream.partition,
                    send.batch,
                    timeout_ms,
                );
                match link.connection.send(&request, link.version).await {
                    Ok(correlation) => {
                        link.requests.insert(correlation, send.request);
                    }
                    Err(error) => self.transport_failed(error),
                }
            }
            Action::Reconnect => self.link = None,
            Action::Retain { below_offset } => self.retain(below_offset).await?,
        }
        Ok(())
    }

    async fn retain(&mut self, below_offset: i64) -> Result<(), ShipError> {
        self.retained_at = Instant::now();
        let report = self
            .log
            .retain(below_offset)
            .await
            .map_err(|source| ShipError::Log { partition: self.setup.name.clone(), source })?;
        if report.segments_deleted > 0 {
            tracing::info!(partition = %self.setup.name, segments = report.segments_deleted, bytes = report.bytes_freed, start_offset = report.start_offset, "shipped segments deleted (partition or data directory over its disk budget)");
        }
        Ok(())
    }

    /// Retention with the durable cursor, if there is one.
    async fn retain_shipped(&mut self) -> Result<(), ShipError> {
        self.retained_at = Instant::now();
        match self.durable_cursor {
            Some(cursor) => self.retain(cursor).await,
            None => Ok(()),
        }
    }

    /// Samples the cursor and the exact lag in records, bytes and seconds together.
    async fn refresh_lag(&mut self) {
        self.lag_refreshed_at = Some(Instant::now());
        let cursor = self.core.cursor_offset();
        if let Err(error) = sample_lag(&self.log, &self.metrics, &mut self.cursor_batch, cursor).await {
            tracing::debug!(partition = %self.setup.name, %error, "lag sample failed; kept the last one");
        }
    }

    /// Publishes the shipper's state for `/status` when it changed.
    fn show_state(&mut self) {
        let state = match (&self.trouble, self.core.is_running()) {
            (Some(trouble), _) => ShipperState::Retrying { problem: trouble.problem.clone() },
            (None, true) => ShipperState::Running,
            (None, false) => ShipperState::Starting,
        };
        if state != self.shown_state {
            self.metrics.set_state(state.clone());
            self.shown_state = state;
        }
    }

    async fn ensure_link(&mut self) -> Result<(), KafkaError> {
        if self.link.is_some() {
            return Ok(());
        }
        let connection = kafka::connect_to_leader_checked(
            &self.setup.bootstrap_servers,
            &self.setup.upstream.topic,
            self.setup.upstream.partition,
            self.setup.upstream.partitions_exact,
            &self.setup.client,
        )
        .await?;
        let version = connection.version::<ProduceRequest>(PRODUCE_VERSIONS)?;
        self.link = Some(Link { connection, version, requests: HashMap::new() });
        Ok(())
    }

    /// A connection with nothing pipelined on it, for request/answer calls.
    async fn idle_connection(&mut self) -> Result<&mut Connection, KafkaError> {
        if self.link.as_ref().is_some_and(|link| !link.requests.is_empty()) {
            self.link = None;
        }
        self.ensure_link().await?;
        Ok(&mut self.link.as_mut().expect("ensured").connection)
    }

    async fn init_producer(&mut self) -> Result<(crate::core::ship::ProducerIdentity, i64), KafkaError> {
        let topic = self.setup.upstream.topic.clone();
        let partition = self.setup.upstream.partition;
        let timeout_ms = i32::try_from(self.setup.config.request_timeout.as_millis()).unwrap_or(i32::MAX);
        let connection = self.idle_connection().await?;
        let producer = kafka::init_producer(connection, timeout_ms).await?;
        let upstream_end = kafka::high_watermark(connection, &topic, partition).await?;
        Ok((producer, upstream_end))
    }

    async fn scan(&mut self, mut scan: Scan) -> ScanEnd {
        let topic = self.setup.upstream.topic.clone();
        let partition = self.setup.upstream.partition;
        let connection = match self.idle_connection().await {
            Ok(connection) => connection,
            Err(error) => return ScanEnd::Transport(error),
        };
        while let Some((offset, fetch_bytes)) = scan.next_fetch() {
            let fetch_bytes = i32::try_from(fetch_bytes).expect("SCAN_FETCH_BYTES_MAX fits a Fetch");
            let answer = match kafka::fetch(connection, &topic, partition, offset, fetch_bytes).await {
                Ok(answer) => answer,
                Err(error) => return ScanEnd::Transport(error),
            };
            let high_watermark = match answer.error_code {
                NONE => answer.high_watermark,
                OFFSET_OUT_OF_RANGE if answer.high_watermark >= 0 => answer.high_watermark,
                code => {
                    return ScanEnd::Transport(KafkaError::Broker {
                        address: connection.address().to_owned(),
                        api: "Fetch",
                        code,
                        name: error_name(code),
                    })
                }
            };
            if let Err(error) = scan.handle_fetch(&answer.records, high_watermark) {
                return ScanEnd::Refused(error);
            }
        }
        ScanEnd::Found(scan)
    }

    /// Writes `ship.state`. A full filesystem is waited out (the log keeps
    /// `DISK_RESERVE_BYTES` free for this, so only something else filling the disk gets
    /// here): shipping cannot go on without it, and stopping would never free the disk.
    async fn persist(&mut self, state: ShipState) -> Result<(), ShipError> {
        loop {
            let directory = self.setup.directory.clone();
            let attempt = state.clone();
            match glommio::executor().spawn_blocking(move || write_state(&directory, &attempt)).await {
                Ok(()) => return Ok(()),
                Err(StateFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::StorageFull => {
                    self.warn(format!("disk full: ship.state not written ({source}); retrying"));
                    self.show_state();
                    glommio::timer::sleep(PERSIST_FULL_RETRY_INTERVAL).await;
                }
                Err(source) => return Err(ShipError::State { partition: self.setup.name.clone(), source }),
            }
        }
    }

    /// On shutdown: make the latest cursor durable so a restart need not reconcile.
    async fn finish(&mut self) -> Result<(), ShipError> {
        self.export_metrics();
        if self.core.stop_reason().is_none() && self.core.needs_final_persist() {
            if let Some(state) = self.core.current_state() {
                self.persist(state).await?;
            }
        }
        tracing::info!(partition = %self.setup.name, cursor = self.core.cursor_offset(), lag_records = self.core.lag_records(), "shipper stopped for shutdown");
        Ok(())
    }

    fn export_metrics(&mut self) {
        let stats = self.core.stats();
        let delta = |now: u64, before: u64| now.saturating_sub(before);
        let metrics = &self.metrics;
        let before = self.exported;
        metrics.shipped_records.inc_by(delta(stats.shipped_records, before.shipped_records));
        metrics.shipped_bytes.inc_by(delta(stats.shipped_bytes, before.shipped_bytes));
        metrics.requests.inc_by(delta(stats.sends, before.sends));
        metrics.resends.inc_by(delta(stats.resends, before.resends));
        metrics.retriable_errors.inc_by(delta(stats.retriable_errors, before.retriable_errors));
        metrics.transport_failures.inc_by(delta(stats.transport_failures, before.transport_failures));
        metrics.timeouts.inc_by(delta(stats.timeouts, before.timeouts));
        metrics.duplicates.inc_by(delta(stats.duplicates, before.duplicates));
        if stats.duplicates > before.duplicates {
            tracing::info!(partition = %self.setup.name, batches = stats.duplicates - before.duplicates, cursor = self.core.cursor_offset(), "upstream already held batches sent again (duplicates)");
        }
        metrics.reconciled_batches.inc_by(delta(stats.batches_reconciled, before.batches_reconciled));
        if stats.records_skipped > before.records_skipped {
            tracing::warn!(partition = %self.setup.name, records = stats.records_skipped - before.records_skipped, start_offset = self.core.cursor_offset(), "records dropped from the log before shipping are skipped; shipping goes on under a new producer");
        }
        metrics.skipped_records.inc_by(delta(stats.records_skipped, before.records_skipped));
        self.exported = stats;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ship::ProducerIdentity;

    fn state() -> ShipState {
        ShipState {
            producer: ProducerIdentity { id: 42, epoch: 0 },
            epoch_start_offset: 10,
            cursor_offset: 99,
            upstream_scan_from_offset: 1234,
            upstream_scan_from_local_offset: Some(90),
            upstream_topic: "central".into(),
            upstream_partition: 3,
        }
    }

    #[test]
    fn the_shipper_gets_the_configured_tls_and_sasl_and_refuses_when_their_files_vanish() {
        let directory = tempfile::tempdir().unwrap();
        let password = directory.path().join("password");
        std::fs::write(&password, "pw\n").unwrap();
        let text = format!(
            "[upstream]\nenabled = true\nbootstrap_servers = [\"k:9093\"]\n[upstream.tls]\nenabled = true\nserver_name = \"kafka.example.com\"\n[upstream.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"site-17\"\npassword_file = {password:?}\n"
        );
        let host = crate::config::Host::with_cpus([0].into_iter().collect());
        let valid = crate::config::Config::parse(&text, "test").unwrap().validate(&host, "test").unwrap();
        let setup = ShipperSetup::from_config(&valid, "telemetry", 0, directory.path()).unwrap();
        let security = format!("{:?}", setup.client.security);
        assert!(setup.client.security.tls.as_ref().unwrap().server_name.is_some(), "{security}");
        assert_eq!(setup.client.security.sasl.as_ref().unwrap().username, "site-17");
        assert!(security.contains("unusable: None") && !security.contains("pw"), "{security}");
        // The password file is gone after validation: the shipper gets a setup that
        // refuses every connection with the reason, rather than shipping without it.
        std::fs::remove_file(&password).unwrap();
        let setup = ShipperSetup::from_config(&valid, "telemetry", 0, directory.path()).unwrap();
        let security = format!("{:?}", setup.client.security);
        assert!(security.contains("upstream.sasl.password_file") && security.contains("password"), "{security}");
        assert!(setup.client.security.sasl.is_none() && setup.client.security.tls.is_none(), "{security}");
    }

    #[test]
    fn the_state_file_round_trips_and_replaces_the_old_one() {
        let directory = tempfile::tempdir().unwrap();
        assert!(read_state(directory.path()).unwrap().is_none(), "no file yet: no state");
        write_state(directory.path(), &state()).unwrap();
        let newer = ShipState { cursor_offset: 150, ..state() };
        write_state(directory.path(), &newer).unwrap();
        assert_eq!(read_state(directory.path()).unwrap(), Some(newer));
        assert!(!directory.path().join(STATE_FILE_NEW_NAME).exists());
    }

    #[test]
    fn a_damaged_state_file_is_refused_with_its_path() {
        let directory = tempfile::tempdir().unwrap();
        write_state(directory.path(), &state()).unwrap();
        let path = directory.path().join(STATE_FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[33] ^= 1; // inside the cursor
        std::fs::write(&path, bytes).unwrap();
        let error = read_state(directory.path()).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, StateFileError::Corrupt { .. }), "{text}");
        assert!(text.contains("ship.state") && text.contains("crc mismatch"), "{text}");
    }
}
