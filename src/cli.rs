//! The command line: parse arguments, load and validate config, run one command. Every
//! failure ends here with a message and a distinct exit code.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, Host, ValidConfig};
use crate::shell::runtime::{self, exit_code};
use crate::shell::signals::{self, SetLogFilter};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Edge ingestion appliance: QUIC in, durable Kafka-format log, Kafka upstream"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance: one pinned executor per core, partitions recovered and
    /// served, admin endpoint on admin.listen. Stops cleanly on SIGINT, SIGTERM or
    /// SIGQUIT; SIGHUP reloads certificates, deny and allow lists, quota and log level.
    Serve {
        /// Config file; without it the embedded default (firmware-config/weir.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Use the first N usable CPUs instead of engine.cores.
        #[arg(long)]
        cores: Option<usize>,
    },
    /// Verify a data directory or one partition: every batch CRC, offset continuity,
    /// index agreement. Exits 1 naming the first problem's file and byte offset.
    Inspect {
        path: PathBuf,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Create a development PKI: a CA (reused if present), a server certificate and
    /// device certificates (the device id is the subject CN). Never overwrites.
    Certs {
        /// Output directory (the default matches quic.certs_dir of the default config).
        #[arg(long, default_value = "./weir-certs")]
        dir: PathBuf,
        /// A device id to make a certificate for (repeatable).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Also make N device certificates named <prefix>0 .. <prefix>N-1.
        #[arg(long, default_value_t = 0)]
        device_count: usize,
        #[arg(long, default_value = "device-")]
        device_prefix: String,
        /// Extra DNS name or IP address for the server certificate (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Validity of the server and device certificates, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Load and validate a config, print every problem, exit 2 if there is one.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check this host against a config before it runs: io_uring, the data directory,
    /// locked memory, cores, UDP, the QUIC certificates and the upstream cluster. One line per check (ok, warn, fail, skip) with the
    /// fix; exit 0 when nothing fails, 1 when something does, 2 for a bad config.
    Doctor {
        /// Config file; without it the embedded default (firmware-config/weir.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
        /// Also measure the data directory's filesystem (O_DIRECT MB/s, fdatasync
        /// latency) for a few seconds and compare it with the flush window.
        #[arg(long)]
        measure: bool,
    },
    /// Per partition: log start and end offsets, shipped cursor, lag in records, bytes
    /// and seconds, the shipper's state (with its error when stopped), disk use against
    /// the budgets. Asks the running server (GET /status on admin.listen); when nothing
    /// answers, reads the data directory. Exit 1 when a shipper is stopped.
    Status {
        /// Config file; without it the embedded default (firmware-config/weir.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print one JSON object (the /status document).
        #[arg(long)]
        json: bool,
        /// Admin address to ask instead of admin.listen (host:port).
        #[arg(long)]
        admin: Option<String>,
    },
}

fn load_config(path: Option<&PathBuf>, cores: Option<usize>) -> Result<ValidConfig, ConfigError> {
    let host = Host::probe();
    let (config, origin) = match path {
        Some(path) => (Config::load(path)?, path.display().to_string()),
        None => (Config::embedded(), "(embedded default)".to_owned()),
    };
    let valid = config.validate(&host, &origin)?;
    match cores {
        Some(count) => valid.with_core_count(count, &host),
        None => Ok(valid),
    }
}

/// Runs the command; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    run_with_log_filter(cli, None)
}

/// [`run`], with the means to change the log filter (`main` owns the subscriber):
/// `serve` applies the config's `log_level` at start and on SIGHUP.
pub fn run_with_log_filter(cli: Cli, set_log_filter: Option<SetLogFilter>) -> i32 {
    match cli.command {
        Command::Serve { config, cores } => {
            let valid = match load_config(config.as_ref(), cores) {
                Ok(valid) => valid,
                Err(error) => {
                    eprintln!("weir: {error}");
                    return exit_code::BAD_CONFIG;
                }
            };
            let environment = std::env::var("WEIR_LOG").ok();
            if let (Some(set_log_filter), None) = (&set_log_filter, &environment) {
                if let Err(error) = set_log_filter(&crate::reload::log_filter(None, &valid.config)) {
                    eprintln!("weir: log_level: {error}");
                    return exit_code::BAD_CONFIG;
                }
            }
            let shutdown = Arc::new(AtomicBool::new(false));
            let listener = Arc::new(runtime::ListenerSlot::new());
            let reloader = signals::Reloader::new(config, valid.config.clone(), listener.clone(), set_log_filter);
            // Before the preflight (which can take a while): from here on no signal ends
            // weir without a log line.
            if let Err(error) = signals::start(shutdown.clone(), reloader) {
                eprintln!("weir: fatal: cannot install signal handlers: {error}");
                return exit_code::CORE_FAILED;
            }
            if let Err(not_ready) = crate::doctor::preflight(&valid) {
                eprintln!("weir: {not_ready}");
                return exit_code::HOST_NOT_READY;
            }
            match runtime::serve(valid, shutdown, &listener) {
                Ok(()) => exit_code::CLEAN,
                Err(fatal) => {
                    eprintln!("weir: fatal: {fatal}");
                    fatal.exit_code()
                }
            }
        }
        Command::CheckConfig { config } => match load_config(config.as_ref(), None) {
            Ok(valid) => {
                let partitions: u32 = valid.config.topics.iter().map(|topic| topic.partitions).sum();
                println!(
                    "config ok: {} cores {:?}, {} topics, {partitions} partitions, data in {}",
                    valid.cores.len(),
                    valid.cores,
                    valid.config.topics.len(),
                    valid.config.data_dir.display()
                );
                exit_code::CLEAN
            }
            Err(error) => {
                eprintln!("weir: {error}");
                exit_code::BAD_CONFIG
            }
        },
        Command::Inspect { path, json } => inspect(&path, json),
        Command::Certs { dir, mut devices, device_count, device_prefix, server_names, days } => {
            if device_count > 100_000 || days == 0 || days > 3650 {
                eprintln!("weir certs: --device-count must be at most 100000 and --days within 1..=3650");
                return exit_code::BAD_CONFIG;
            }
            devices.extend((0..device_count).map(|index| format!("{device_prefix}{index}")));
            match crate::certs::generate(&dir, &server_names, &devices, days) {
                Ok(written) => {
                    println!(
                        "{} the CA in {}; wrote {} files ({} device certificates)",
                        if written.reused_ca { "reused" } else { "created" },
                        dir.display(),
                        written.files.len(),
                        devices.len()
                    );
                    exit_code::CLEAN
                }
                Err(error) => {
                    eprintln!("weir certs: {error}");
                    exit_code::PROBLEMS_FOUND
                }
            }
        }
        Command::Doctor { config, json, measure } => crate::doctor::command(config.as_deref(), json, measure),
        Command::Status { config, json, admin } => match load_config(config.as_ref(), None) {
            Ok(valid) => crate::status::command(&valid, admin.as_deref(), json),
            Err(error) => {
                eprintln!("weir: {error}");
                exit_code::BAD_CONFIG
            }
        },
    }
}

fn inspect(path: &std::path::Path, json: bool) -> i32 {
    let total = crate::inspect::total_bytes(path);
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("verifying {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("static template"),
    );
    if total < (64 << 20) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let result = crate::inspect::inspect(path, |bytes| bar.inc(bytes));
    bar.finish_and_clear();
    match result {
        Ok(summary) => {
            if json {
                println!("{}", serde_json::to_string(&summary).expect("summary serializes"));
            } else {
                let mut totals = (0u64, 0u64, 0u64, 0u64);
                for partition in &summary.partitions {
                    println!(
                        "{}: {} segments, {} batches, {} records, {} bytes, offsets {}..{}: ok",
                        partition.name,
                        partition.segments,
                        partition.batches,
                        partition.records,
                        partition.bytes,
                        partition.start_offset,
                        partition.next_offset
                    );
                    totals.0 += partition.segments;
                    totals.1 += partition.batches;
                    totals.2 += partition.records;
                    totals.3 += partition.bytes;
                }
                println!(
                    "ok: {} partitions, {} segments, {} batches, {} records, {} bytes verified",
                    summary.partitions.len(),
                    totals.0,
                    totals.1,
                    totals.2,
                    totals.3
                );
            }
            exit_code::CLEAN
        }
        Err(problem) => {
            eprintln!("weir inspect: problem: {problem}");
            exit_code::PROBLEMS_FOUND
        }
    }
}
