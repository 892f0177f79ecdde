//! weir-bench: measures weir against the ceilings of the same run (DESIGN.md,
//! "Ceilings to measure against, in the same run").
//!
//! `weir-bench log` runs weir's group-commit appends, then the raw ceiling: the same
//! cores and files per partition doing O_DIRECT writes of the size weir's batches
//! averaged, each followed by fdatasync, on the same filesystem. The two phases
//! alternate over `--rounds` rounds (weir, raw, weir, raw, ...), so that a slow spell
//! of a shared disk is shared by both. The ratio of the two is weir's cost over the
//! disk; the raw phase follows the weir phase because it needs weir's batch size (from
//! the first round). The ceiling is never tuned to flatter weir: it writes the
//! way an append-only log at best can (sequential, aligned, preallocated, one sync per
//! write), nothing more and nothing less.
//!
//! A third phase joins each round since issue 14: the plain io_uring ceiling
//! (`plain_phase.rs`), one pinned thread per core blocking in `io_uring_enter` with a
//! write linked to an fdatasync per file, the same sizes on the same filesystem: the
//! disk through the thinnest path the kernel offers. Rounds run weir, raw, plain.
//!
//! `weir-bench ship` drains a backlog of the log into tansu with weir's shipper, against
//! a confluent-kafka producer sending the same records to the same broker (`ship.rs`).
//!
//! `weir-bench fleet` runs many devices each sending a small record now and then
//! against weir and the raw QUIC ceiling in alternating rounds (`fleet.rs`).
//!
//! `weir-bench consume` reads weir over its Kafka API with confluent-kafka: the tail
//! latency from device ack to consumer, the backlog read against the same client on
//! tansu and a raw read of the segments, ingest with and without a tailing consumer
//! (`consume.rs`).
//!
//! Exit codes: 0 measured, 1 the run failed (a disk or executor error), 2 bad flags.
#![deny(unsafe_code)]
#![recursion_limit = "256"] // the log report's json! object has over 40 fields

mod consume;
mod cores;
mod fleet;
mod fleet_shape;
mod ingest;
mod options;
mod plain_phase;
mod raw_phase;
mod records;
mod report;
mod ship;
mod storm;
mod weir_phase;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

use weir::config::{Host, DIRECT_IO_ALIGNMENT_BYTES};
use weir::core::log::segment::align_up;
use weir::shell::log::LogError;
use weir::shell::metrics::Metrics;

use crate::options::{LogArgs, Plan, UsageError};
use crate::plain_phase::PlainCoreInput;
use crate::raw_phase::{RawCoreInput, RawCoreResult};
use crate::report::{RawFigures, Report, WeirFigures};
use crate::weir_phase::{PartitionSpec, WeirCoreInput};

const EXIT_RUN_FAILED: i32 = 1;
const EXIT_BAD_FLAGS: i32 = 2;
/// The raw phase's scratch files, inside the data dir so they share its filesystem.
const RAW_SCRATCH_DIRECTORY: &str = ".weir-bench-raw";
/// Latencies are recorded in nanoseconds, 1 ns to 60 s, to 3 significant digits.
const LATENCY_NS_MAX: u64 = 60_000_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

#[derive(Debug, Parser)]
#[command(name = "weir-bench", about = "Measure weir against the ceilings of the same run")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Group-commit appends against raw O_DIRECT writes + fdatasync of the same sizes.
    Log(LogArgs),
    /// Devices over QUIC into weir (durable acks) against the raw QUIC ceiling, plus
    /// weir's memory per idle device connection.
    Ingest(ingest::IngestArgs),
    /// Many devices each sending a small record now and then (issue 18), against weir
    /// and the raw QUIC ceiling in alternating rounds: ack latency, server CPU per
    /// record and per connection, flushes per second, RSS per connection.
    Fleet(fleet::FleetArgs),
    /// Runs `weir` itself (`weir-bench serve-weir serve ...`): how `ingest` starts weir
    /// as a child process.
    #[command(hide = true)]
    ServeWeir {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Runs the raw QUIC ceiling for a config until SIGINT: how `ingest` starts it.
    #[command(hide = true)]
    ServeCeiling {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        cores: usize,
    },
    /// Local consumers over the Kafka API: tail latency from device ack, backlog read
    /// against the same client on tansu and a raw read, ingest with a tailing consumer.
    Consume(consume::ConsumeArgs),
    /// Drain a backlog of the log into tansu with weir's shipper, against a
    /// confluent-kafka producer sending the same records to the same broker.
    Ship(ship::ShipArgs),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error("{0}")]
    Usage(#[from] UsageError),
    #[error("core {core} (cpu {cpu}): {source}")]
    Log { core: usize, cpu: usize, source: LogError },
    #[error("raw phase: {operation} {path} at byte {position}: {source}")]
    Raw { operation: &'static str, path: PathBuf, position: u64, source: std::io::Error },
    #[error("core {core} (cpu {cpu}): executor failed: {reason}")]
    Executor { core: usize, cpu: usize, reason: String },
    #[error("data dir {path}: {operation}: {source}")]
    DataDir { operation: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the weir phase acknowledged no append, so there is no batch size to measure the ceiling with")]
    NothingWritten,
    #[error("a phase was aborted because another core failed")]
    Aborted,
    #[error("{0}")]
    Ingest(#[from] ingest::IngestError),
    #[error("consume: {0}")]
    Consume(#[from] consume::ConsumeError),
    /// Boxed: the ship bench's errors are large and rare.
    #[error("ship: {0}")]
    Ship(Box<ship::ShipBenchError>),
}

impl From<ship::ShipBenchError> for BenchError {
    fn from(error: ship::ShipBenchError) -> BenchError {
        BenchError::Ship(Box::new(error))
    }
}

impl BenchError {
    fn exit_code(&self) -> i32 {
        match self {
            BenchError::Usage(_) => EXIT_BAD_FLAGS,
            BenchError::Ingest(error) if error.is_usage() => EXIT_BAD_FLAGS,
            BenchError::Consume(error) if error.is_usage() => EXIT_BAD_FLAGS,
            _ => EXIT_RUN_FAILED,
        }
    }
}

/// An empty latency histogram with the bench's bounds.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, LATENCY_SIGNIFICANT_DIGITS)
        .expect("static histogram bounds are valid")
}

fn merged(histograms: impl Iterator<Item = Histogram<u64>>) -> Histogram<u64> {
    let mut total = latency_histogram();
    for histogram in histograms {
        total.add(&histogram).expect("histograms share their bounds");
    }
    total
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Log(args) => run_log(&args),
        Command::Ingest(args) => ingest::run(&args).map_err(BenchError::from),
        Command::Fleet(args) => fleet::run(&args).map_err(BenchError::from),
        Command::ServeWeir { args } => std::process::exit(ingest::serve_weir(args)),
        Command::ServeCeiling { config, cores } => std::process::exit(ingest::serve_ceiling(&config, cores)),
        Command::Ship(args) => ship::run_ship(&args),
        Command::Consume(args) => consume::run(&args).map_err(BenchError::from),
    };
    match outcome {
        Ok(()) => {}
        Err(error) => {
            let prefix = if matches!(error, BenchError::Usage(_)) { "bad flags:\n  " } else { "" };
            eprintln!("weir-bench: {prefix}{error}");
            std::process::exit(error.exit_code());
        }
    }
}

fn run_log(args: &LogArgs) -> Result<(), BenchError> {
    let plan = args.validate(&Host::probe())?;
    let temporary;
    let data_dir = match &plan.data_dir {
        Some(directory) => {
            prepare_data_dir(directory, &plan)?;
            directory.clone()
        }
        None => {
            temporary = tempfile::Builder::new().prefix("weir-bench-").tempdir().map_err(|source| {
                BenchError::DataDir { operation: "create temp dir", path: std::env::temp_dir(), source }
            })?;
            temporary.path().to_owned()
        }
    };

    let appenders_per_core = (plan.partitions_per_core * plan.appenders_per_partition) as usize;
    let mut next_sequences = vec![vec![0u64; appenders_per_core]; plan.cores()];
    let mut weir: Option<WeirFigures> = None;
    let mut raw: Option<RawFigures> = None;
    let mut plain: Option<RawFigures> = None;
    let mut write_bytes = None;
    for _ in 0..plan.rounds {
        let round = weir_phase(&plan, &data_dir, &mut next_sequences)?;
        if round.flushes == 0 {
            return Err(BenchError::NothingWritten);
        }
        // The raw writes keep the size of the first round's batches.
        let write_bytes = *write_bytes.get_or_insert_with(|| {
            let batch_bytes_avg = round.batch_bytes.div_ceil(round.flushes);
            align_up(batch_bytes_avg, DIRECT_IO_ALIGNMENT_BYTES) as usize
        });
        weir = Some(match weir {
            Some(total) => total.add(round),
            None => round,
        });
        let round = raw_phase(&plan, &data_dir, write_bytes)?;
        raw = Some(match raw {
            Some(total) => total.add(round),
            None => round,
        });
        let round = plain_phase(&plan, &data_dir, write_bytes)?;
        plain = Some(match plain {
            Some(total) => total.add(round),
            None => round,
        });
    }
    let weir = weir.expect("at least one round");
    let (raw, plain) = (raw.expect("at least one round"), plain.expect("at least one round"));

    let report = Report { plan: &plan, kept_data_dir: plan.data_dir.clone(), weir, raw, plain };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", report.human());
    let _ = writeln!(stdout, "{}", report.json());
    Ok(())
}

/// Creates `directory` if needed and refuses partitions left by an earlier run: their
/// records would mix with this run's.
fn prepare_data_dir(directory: &Path, plan: &Plan) -> Result<(), BenchError> {
    std::fs::create_dir_all(directory).map_err(|source| BenchError::DataDir {
        operation: "create",
        path: directory.to_owned(),
        source,
    })?;
    let mut problems = Vec::new();
    let mut occupied =
        (0..plan.partitions_total()).map(|partition| partition_directory(directory, partition)).collect::<Vec<_>>();
    occupied.push(directory.join(RAW_SCRATCH_DIRECTORY));
    for path in occupied {
        let holds_files = std::fs::read_dir(&path).map(|mut entries| entries.next().is_some()).unwrap_or(false);
        if holds_files {
            problems.push(format!(
                "--data-dir {}: {} already holds files from an earlier run; pass an empty or new directory",
                directory.display(),
                path.display()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(UsageError { problems }.into())
    }
}

fn partition_directory(data_dir: &Path, partition: u32) -> PathBuf {
    data_dir.join(format!("bench-{partition}"))
}

/// One round of the weir phase; `next_sequences` (per core, per appender) carries each
/// appender's sequence numbers on from the round before.
fn weir_phase(plan: &Plan, data_dir: &Path, next_sequences: &mut [Vec<u64>]) -> Result<WeirFigures, BenchError> {
    let metrics = Metrics::new();
    let mut all_metrics = Vec::new();
    let mut inputs = Vec::with_capacity(plan.cores());
    for core in 0..plan.cores() as u32 {
        let mut partitions = Vec::new();
        for local in 0..plan.partitions_per_core {
            let partition = core * plan.partitions_per_core + local;
            let partition_metrics = metrics.partition("bench", partition);
            all_metrics.push(partition_metrics.clone());
            partitions.push(PartitionSpec {
                partition,
                directory: partition_directory(data_dir, partition),
                metrics: partition_metrics,
            });
        }
        inputs.push(WeirCoreInput {
            partitions,
            appenders_per_partition: plan.appenders_per_partition,
            record_bytes: plan.record_bytes,
            duration: plan.slice_duration,
            log_options: plan.log_options.clone(),
            first_sequences: next_sequences[core as usize].clone(),
        });
    }
    let results =
        cores::run_phase("weir", &plan.cpus, plan.io_memory_bytes, plan.slice_duration, inputs, weir_phase::run_core)?;
    for (core, result) in results.iter().enumerate() {
        next_sequences[core].clone_from(&result.next_sequences);
    }
    let elapsed = results.iter().map(|result| result.elapsed).max().unwrap_or_default();
    let appends = results.iter().map(|result| result.appends).sum();
    let records = results.iter().map(|result| result.records).sum();
    let payload_bytes = results.iter().map(|result| result.payload_bytes).sum();
    let latency_ns = merged(results.into_iter().map(|result| result.latency_ns));
    Ok(WeirFigures {
        latency_ns,
        appends,
        records,
        payload_bytes,
        elapsed,
        flushes: all_metrics.iter().map(|metrics| metrics.flushes.get()).sum(),
        batch_bytes: all_metrics.iter().map(|metrics| metrics.appended_bytes.get()).sum(),
        // Process-wide histograms: every partition's handle shares them.
        flush_us: all_metrics.first().map(|metrics| metrics.flush_latency.histogram_micros()).expect("a partition"),
        sync_us: all_metrics.first().map(|metrics| metrics.sync_latency.histogram_micros()).expect("a partition"),
    })
}

/// Removes a ceiling phase's scratch directory however the phase ends.
struct ScratchDirectory(PathBuf);

impl ScratchDirectory {
    /// Creates the scratch directory of one ceiling round (`phase` names it in errors).
    fn create(data_dir: &Path, phase: &'static str) -> Result<ScratchDirectory, BenchError> {
        let path = data_dir.join(RAW_SCRATCH_DIRECTORY);
        std::fs::create_dir_all(&path).map_err(|source| BenchError::DataDir {
            operation: phase,
            path: path.clone(),
            source,
        })?;
        Ok(ScratchDirectory(path))
    }

    /// Core `core`'s scratch files, one per partition it would own, named `prefix-N.dat`.
    fn files(&self, plan: &Plan, core: u32, prefix: &str) -> Vec<PathBuf> {
        (0..plan.partitions_per_core)
            .map(|local| self.0.join(format!("{prefix}-{}.dat", core * plan.partitions_per_core + local)))
            .collect()
    }
}

impl Drop for ScratchDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One ceiling round's per-core results added up: the slowest core's time, every
/// core's writes and bytes, the latency histograms merged.
fn ceiling_figures(results: Vec<RawCoreResult>, write_bytes: usize) -> RawFigures {
    let elapsed = results.iter().map(|result| result.elapsed).max().unwrap_or_default();
    let writes = results.iter().map(|result| result.writes).sum();
    let bytes = results.iter().map(|result| result.bytes).sum();
    let (fsync, write_and_fsync): (Vec<_>, Vec<_>) =
        results.into_iter().map(|result| (result.fsync_ns, result.write_and_fsync_ns)).unzip();
    RawFigures {
        fsync_ns: merged(fsync.into_iter()),
        write_and_fsync_ns: merged(write_and_fsync.into_iter()),
        write_bytes,
        writes,
        bytes,
        elapsed,
    }
}

/// One round of the raw glommio ceiling (`raw_phase.rs`).
fn raw_phase(plan: &Plan, data_dir: &Path, write_bytes: usize) -> Result<RawFigures, BenchError> {
    let scratch = ScratchDirectory::create(data_dir, "create raw scratch dir")?;
    let inputs = (0..plan.cores() as u32)
        .map(|core| RawCoreInput {
            files: scratch.files(plan, core, "raw"),
            write_bytes,
            preallocate_bytes: plan.log_options.preallocate_bytes,
            duration: plan.slice_duration,
        })
        .collect();
    let results =
        cores::run_phase("raw", &plan.cpus, plan.io_memory_bytes, plan.slice_duration, inputs, raw_phase::run_core)?;
    drop(scratch);
    Ok(ceiling_figures(results, write_bytes))
}

/// One round of the plain io_uring ceiling: the raw phase's files and sizes, written by
/// one pinned thread per core through its own ring instead of glommio.
fn plain_phase(plan: &Plan, data_dir: &Path, write_bytes: usize) -> Result<RawFigures, BenchError> {
    let scratch = ScratchDirectory::create(data_dir, "create plain scratch dir")?;
    let inputs = plan
        .cpus
        .iter()
        .enumerate()
        .map(|(core, &cpu)| PlainCoreInput {
            cpu,
            files: scratch.files(plan, core as u32, "plain"),
            write_bytes,
            preallocate_bytes: plan.log_options.preallocate_bytes,
            duration: plan.slice_duration,
            durable: plan.plain_durable,
        })
        .collect();
    let results = plain_phase::run_phase(inputs)?;
    drop(scratch);
    Ok(ceiling_figures(results, write_bytes))
}
