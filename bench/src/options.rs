//! The `log` subcommand's flags and their validation into a `Plan`.
//!
//! Every flag has a named limit; anything outside one is refused before a core starts,
//! with the flag's name and why (exit 2). The log's tunables are checked by weir's own
//! config validation (the flags are written into a copy of the embedded default config)
//! so the bench can never run weir on options `weir serve` would refuse.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use weir::config::{ByteSize, Config, ConfigError, Host, Micros};
use weir::core::log::batch;
use weir::shell::log::LogOptions;

use crate::records;

/// Longest phase: a benchmark, not a soak test.
pub const SECONDS_MAX: u64 = 3600;
/// Most rounds per run (`--rounds`).
pub const ROUNDS_MAX: u32 = 1000;
/// Shortest slice of a phase in one round: a slice also opens and closes the
/// partitions (or scratch files) and starts the executors, which must stay small
/// beside it.
pub const SLICE_MS_MIN: u64 = 100;
/// Largest record value (`--record-bytes`).
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// Partitions on one core (`--partitions`), as many as one topic may have.
pub const PARTITIONS_PER_CORE_MAX: u32 = weir::config::TOPIC_PARTITIONS_MAX;
/// Concurrent appenders on one partition (`--appenders`).
pub const APPENDERS_PER_PARTITION_MAX: u32 = 1 << 16;
/// Appender tasks in the whole run: each holds one record in flight.
pub const APPENDERS_TOTAL_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Directory for the weir phase's partitions (kept as DIR/bench-<p>) and the raw
    /// phase's scratch files (deleted). Default: a fresh temp dir, removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds each phase (weir, raw) runs in all, split over the rounds.
    #[arg(long, default_value_t = 5, value_name = "S")]
    pub seconds: u64,
    /// Rounds: the phases alternate (weir, raw, weir, raw, ...), each running S/R
    /// seconds per round, so a slow spell of a shared disk falls on both phases rather
    /// than on one of them.
    #[arg(long, default_value_t = 5, value_name = "R")]
    pub rounds: u32,
    /// Cores: one pinned executor on each of the first N usable CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cores: usize,
    /// Partitions per core.
    #[arg(long, default_value_t = 1, value_name = "P")]
    pub partitions: u32,
    /// Concurrent appender tasks per partition, each with one append in flight.
    #[arg(long, default_value_t = 64, value_name = "A")]
    pub appenders: u32,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024, value_name = "B")]
    pub record_bytes: usize,
    /// Override log.flush_delay_us_max (group commit window, microseconds).
    #[arg(long, value_name = "US")]
    pub flush_delay_us: Option<u64>,
    /// Override log.flush_bytes_max (largest batch, bytes).
    #[arg(long, value_name = "BYTES")]
    pub flush_bytes_max: Option<u64>,
    /// Override log.appends_pending_max (queued appends per partition).
    #[arg(long, value_name = "N")]
    pub appends_pending_max: Option<u32>,
    /// Override log.preallocate_bytes (preallocation step, bytes; also used by the raw phase).
    #[arg(long, value_name = "BYTES")]
    pub preallocate_bytes: Option<u64>,
    /// Override log.segment_bytes_max (segment size before a roll, bytes).
    #[arg(long, value_name = "BYTES")]
    pub segment_bytes_max: Option<u64>,
    /// Override log.index_interval_bytes (batch bytes between sparse index entries).
    #[arg(long, value_name = "BYTES")]
    pub index_interval_bytes: Option<u64>,
    /// Override engine.io_memory_bytes (each core's DMA buffer pool, bytes).
    #[arg(long, value_name = "BYTES")]
    pub io_memory_bytes: Option<u64>,
    /// Override log.core_flushes_per_s_max (the core's flush pacer; 0 paces nothing).
    #[arg(long, value_name = "N")]
    pub core_flushes_per_s: Option<u32>,
    /// How the plain io_uring ceiling makes a write durable: a write linked to an
    /// fdatasync, or one O_DIRECT write with RWF_DSYNC.
    #[arg(long, value_enum, default_value_t = PlainDurable::Linked)]
    pub plain_durable: PlainDurable,
}

/// The plain ceiling's one durable operation per write (`--plain-durable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlainDurable {
    /// A write linked (IOSQE_IO_LINK) to an fdatasync: two operations, one submission.
    Linked,
    /// One write with RWF_DSYNC: durable when it completes, as if fdatasync followed.
    Dsync,
    /// A write, then its fdatasync submitted when the write completed (as glommio's
    /// ceiling and weir's flusher do): tells a linked pair's gain from the executor's.
    Separate,
}

impl PlainDurable {
    pub fn name(self) -> &'static str {
        match self {
            PlainDurable::Linked => "linked",
            PlainDurable::Dsync => "dsync",
            PlainDurable::Separate => "separate",
        }
    }
}

/// The flag that sets each config field the bench exposes.
const FLAG_OF_CONFIG_PATH: &[(&str, &str)] = &[
    ("log.flush_delay_us_max", "--flush-delay-us"),
    ("log.flush_bytes_max", "--flush-bytes-max"),
    ("log.appends_pending_max", "--appends-pending-max"),
    ("log.preallocate_bytes", "--preallocate-bytes"),
    ("log.segment_bytes_max", "--segment-bytes-max"),
    ("log.index_interval_bytes", "--index-interval-bytes"),
    ("engine.io_memory_bytes", "--io-memory-bytes"),
    ("log.core_flushes_per_s_max", "--core-flushes-per-s"),
];

/// A validated run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub data_dir: Option<PathBuf>,
    /// Seconds each phase runs in all (`--seconds`).
    pub seconds: u64,
    pub rounds: u32,
    /// How long each phase runs in one round: `seconds / rounds`.
    pub slice_duration: Duration,
    /// CPU ids, one executor each, in core order.
    pub cpus: Vec<usize>,
    pub partitions_per_core: u32,
    pub appenders_per_partition: u32,
    pub record_bytes: usize,
    pub log_options: LogOptions,
    pub io_memory_bytes: usize,
    pub plain_durable: PlainDurable,
}

impl Plan {
    pub fn cores(&self) -> usize {
        self.cpus.len()
    }

    pub fn partitions_total(&self) -> u32 {
        self.cpus.len() as u32 * self.partitions_per_core
    }

    pub fn appenders_total(&self) -> u64 {
        u64::from(self.partitions_total()) * u64::from(self.appenders_per_partition)
    }
}

/// Every problem with the flags, one line each.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n  "))]
pub struct UsageError {
    pub problems: Vec<String>,
}

impl LogArgs {
    pub fn validate(&self, host: &Host) -> Result<Plan, UsageError> {
        let mut problems = Vec::new();
        let usable: Vec<usize> = host.usable_cpus.iter().copied().collect();
        if self.cores == 0 || self.cores > usable.len() {
            problems.push(format!(
                "--cores {}: must be within 1..={} (the usable CPUs here: {:?})",
                self.cores,
                usable.len(),
                usable
            ));
        }
        if self.seconds == 0 || self.seconds > SECONDS_MAX {
            problems.push(format!("--seconds {}: must be within 1..={SECONDS_MAX}", self.seconds));
        }
        if self.rounds == 0 || self.rounds > ROUNDS_MAX {
            problems.push(format!("--rounds {}: must be within 1..={ROUNDS_MAX}", self.rounds));
        } else if self.seconds * 1000 / u64::from(self.rounds) < SLICE_MS_MIN {
            problems.push(format!(
                "--rounds {}: {} s split into {} rounds leaves less than {SLICE_MS_MIN} ms per phase and round",
                self.rounds, self.seconds, self.rounds
            ));
        }
        if self.partitions == 0 || self.partitions > PARTITIONS_PER_CORE_MAX {
            problems.push(format!("--partitions {}: must be within 1..={PARTITIONS_PER_CORE_MAX}", self.partitions));
        }
        if self.appenders == 0 || self.appenders > APPENDERS_PER_PARTITION_MAX {
            problems.push(format!("--appenders {}: must be within 1..={APPENDERS_PER_PARTITION_MAX}", self.appenders));
        }
        let appenders_total = self.cores as u64 * u64::from(self.partitions) * u64::from(self.appenders);
        if appenders_total > APPENDERS_TOTAL_MAX {
            problems.push(format!(
                "--cores x --partitions x --appenders = {appenders_total}: more than {APPENDERS_TOTAL_MAX} appenders"
            ));
        }
        if self.record_bytes == 0 || self.record_bytes > RECORD_BYTES_MAX {
            problems.push(format!("--record-bytes {}: must be within 1..={RECORD_BYTES_MAX}", self.record_bytes));
        }

        // The log's tunables: weir's own validation, on the embedded default config.
        let mut config = Config::embedded();
        if let Some(value) = self.flush_delay_us {
            config.log.flush_delay_us_max = Micros(value);
        }
        if let Some(value) = self.flush_bytes_max {
            config.log.flush_bytes_max = ByteSize(value);
        }
        if let Some(value) = self.appends_pending_max {
            config.log.appends_pending_max = value;
        }
        if let Some(value) = self.preallocate_bytes {
            config.log.preallocate_bytes = ByteSize(value);
        }
        if let Some(value) = self.segment_bytes_max {
            config.log.segment_bytes_max = ByteSize(value);
        }
        if let Some(value) = self.index_interval_bytes {
            config.log.index_interval_bytes = ByteSize(value);
        }
        if let Some(value) = self.io_memory_bytes {
            config.engine.io_memory_bytes = ByteSize(value);
        }
        if let Some(value) = self.core_flushes_per_s {
            config.log.core_flushes_per_s_max = value;
        }
        let log_config = config.log.clone();
        let io_memory_bytes = config.engine.io_memory_bytes.0 as usize;
        match config.validate(host, "weir-bench flags") {
            Ok(_) => {}
            Err(ConfigError::Invalid { problems: config_problems, .. }) => {
                for problem in config_problems {
                    let flag = FLAG_OF_CONFIG_PATH.iter().find(|(path, _)| *path == problem.path);
                    problems.push(match flag {
                        Some((path, flag)) => format!("{flag} ({path}): {}", problem.why),
                        None => format!("{problem} (the embedded default config with these flags)"),
                    });
                }
            }
            Err(error) => problems.push(error.to_string()),
        }
        let log_options = LogOptions::from_config(&log_config);

        // One record must fit one batch, or every append would fail with TooLarge.
        if (1..=RECORD_BYTES_MAX).contains(&self.record_bytes) {
            let pattern = records::value_pattern(self.record_bytes);
            let largest = records::record(u64::from(u32::MAX), u64::MAX / 64, &pattern, self.record_bytes);
            let batch_bytes = batch::plan_batch(std::iter::once(&largest)).total_bytes;
            if batch_bytes > log_options.flush_bytes_max {
                problems.push(format!(
                    "--record-bytes {}: one record makes a {batch_bytes}-byte batch, above log.flush_bytes_max \
                     ({} bytes); raise --flush-bytes-max",
                    self.record_bytes, log_options.flush_bytes_max
                ));
            }
        }

        if !problems.is_empty() {
            return Err(UsageError { problems });
        }
        Ok(Plan {
            data_dir: self.data_dir.clone(),
            seconds: self.seconds,
            rounds: self.rounds,
            slice_duration: Duration::from_secs(self.seconds) / self.rounds,
            cpus: usable[..self.cores].to_vec(),
            partitions_per_core: self.partitions,
            appenders_per_partition: self.appenders,
            record_bytes: self.record_bytes,
            log_options,
            io_memory_bytes,
            plain_durable: self.plain_durable,
        })
    }
}
