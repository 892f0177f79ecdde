//! The command line: parse arguments, load and validate config, run one command. Every
//! failure ends here with a message and a distinct exit code.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, Host, ValidConfig};
use crate::shell::quarantine as runtime_quarantine;
use crate::shell::runtime::{self, exit_code};
use crate::shell::signals::{self, SetLogFilter};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Edge ingestion appliance: QUIC in, durable Kafka-format log, Kafka upstream"
)]
pub struct Cli {
    /// How log lines (on stderr) are written: `text`, or `json` (one object per line:
    /// timestamp, level, target, message and the event's fields, for a log collector).
    /// Which lines: `log_level` in the config, or the WEIR_LOG environment variable (a
    /// tracing filter such as `info,weir::shell::quic=debug`), which wins when set.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The form of weir's log lines; fixed at start (a SIGHUP does not change it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `weir kafka-user` actions.
#[derive(Debug, Subcommand)]
pub enum KafkaUserAction {
    /// Add a user (or replace its credentials) with SCRAM-SHA-256 and SCRAM-SHA-512
    /// entries; the file is made if missing (mode 0600).
    Add {
        name: String,
        /// The credentials file (kafka_api.sasl.credentials_file).
        #[arg(long)]
        credentials: PathBuf,
        /// Read the password from this file (its first line) instead of stdin.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// PBKDF2 rounds (4096..=16384).
        #[arg(long, default_value_t = crate::shell::kafka_api::CREDENTIAL_ITERATIONS_DEFAULT)]
        iterations: u32,
    },
    /// Remove a user.
    Remove {
        name: String,
        #[arg(long)]
        credentials: PathBuf,
    },
    /// List the users, one a line.
    List {
        #[arg(long)]
        credentials: PathBuf,
    },
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
        /// Leave this partition (TOPIC-P, as `weir inspect` names it) closed and serve the
        /// rest: for a partition with corruption before its tail (see docs/OPERATIONS.md).
        /// Repeatable.
        #[arg(long = "quarantine", value_name = "TOPIC-PARTITION")]
        quarantine: Vec<String>,
    },
    /// Verify a data directory or one partition: every batch CRC, offset continuity,
    /// index agreement. Checks every partition; exits 1 naming each problem's file and
    /// byte offset.
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
    /// Manage the Kafka API's SASL users (kafka_api.sasl.credentials_file): SCRAM
    /// credentials only, never a password. The password is read from stdin (its first
    /// line) or --password-file, never from the command line.
    KafkaUser {
        #[command(subcommand)]
        action: KafkaUserAction,
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
    /// The stream watch's open alerts (docs/WATCH.md): device, topic, kind, since when,
    /// evidence. Asks the running server (GET /alerts on admin.listen). Exit 0 with no
    /// alert open, 1 with some, 4 when no weir answers.
    Alerts {
        /// Config file; without it the embedded default (firmware-config/weir.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print one JSON object (the /alerts document).
        #[arg(long)]
        json: bool,
        /// Admin address to ask instead of admin.listen (host:port).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Print records of the local log: partition, offset, time, device, sequence, key and
    /// value (text, or hex when not printable). Reads beside a serving weir; only whole,
    /// CRC-checked batches are printed.
    Tail {
        /// The edge topic (as in [[topics]]).
        topic: String,
        /// Only this partition (default: every partition of the topic, one after another).
        #[arg(long)]
        partition: Option<u32>,
        /// The first offset to print (default: the log start).
        #[arg(long, default_value_t = 0)]
        from: i64,
        /// Keep printing records as they become durable, until interrupted.
        #[arg(long)]
        follow: bool,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<u64>,
        /// One JSON object per record.
        #[arg(long)]
        json: bool,
        /// Config file; without it the embedded default (firmware-config/weir.toml).
        #[arg(long)]
        config: Option<PathBuf>,
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
        Command::Serve { config, cores, quarantine } => {
            let valid = match load_config(config.as_ref(), cores) {
                Ok(valid) => valid,
                Err(error) => {
                    eprintln!("weir: {error}");
                    return exit_code::BAD_CONFIG;
                }
            };
            let known: std::collections::BTreeSet<String> = valid
                .config
                .topics
                .iter()
                .flat_map(|topic| {
                    (0..topic.partitions).map(|partition| runtime_quarantine::name_of(&topic.name, partition))
                })
                .collect();
            if let Some(unknown) = quarantine.iter().find(|name| !known.contains(*name)) {
                eprintln!(
                    "weir: --quarantine {unknown}: no such partition in the config (partitions are TOPIC-P, as `weir \
                     inspect` names them)"
                );
                return exit_code::BAD_CONFIG;
            }
            runtime_quarantine::set(quarantine.into_iter().collect());
            let environment = std::env::var("WEIR_LOG").ok();
            if let (Some(set_log_filter), None) = (&set_log_filter, &environment) {
                if let Err(error) = set_log_filter(&crate::reload::log_filter(None, &valid.config)) {
                    eprintln!("weir: log_level: {error}");
                    return exit_code::BAD_CONFIG;
                }
            }
            // The first log line: which weir, which config, which process.
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %config.as_ref().map_or("(embedded default)".to_owned(), |path| path.display().to_string()),
                pid = std::process::id(),
                "weir {} starting",
                env!("CARGO_PKG_VERSION")
            );
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
            // Held until serve returns: before any partition file is opened for writing.
            let _data_dir_lock = match crate::shell::dir_lock::DirLock::acquire(&valid.config.data_dir) {
                Ok(lock) => lock,
                Err(error @ crate::shell::dir_lock::DirLockError::Held { .. }) => {
                    eprintln!("weir: {error}");
                    return exit_code::DATA_DIR_IN_USE;
                }
                Err(error) => {
                    eprintln!("weir: {error}");
                    return exit_code::DATA_REFUSED;
                }
            };
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
        Command::KafkaUser { action } => kafka_user(action),
        Command::Tail { topic, partition, from, follow, limit, json, config } => {
            match load_config(config.as_ref(), None) {
                Ok(valid) => tail(&valid, &topic, partition, from, follow, limit, json),
                Err(error) => {
                    eprintln!("weir: {error}");
                    exit_code::BAD_CONFIG
                }
            }
        }
        Command::Alerts { config, json, admin } => match load_config(config.as_ref(), None) {
            Ok(valid) => crate::alerts::command(&valid, admin.as_deref(), json),
            Err(error) => {
                eprintln!("weir: {error}");
                exit_code::BAD_CONFIG
            }
        },
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
    let result = crate::inspect::inspect_each(path, |bytes| bar.inc(bytes));
    bar.finish_and_clear();
    let report = match result {
        Ok(report) => report,
        Err(problem) => {
            if json {
                println!("{}", serde_json::json!({ "partitions": [], "problems": 1, "error": problem.to_string() }));
            }
            eprintln!("weir inspect: problem: {problem}");
            return exit_code::PROBLEMS_FOUND;
        }
    };
    if json {
        println!("{}", serde_json::to_string(&report).expect("report serializes"));
    }
    let mut totals = (0u64, 0u64, 0u64, 0u64);
    for partition in &report.partitions {
        let summary = &partition.summary;
        match &partition.problem {
            Some(problem) => {
                if !json {
                    println!("{}: PROBLEM: {problem}", summary.name);
                }
                eprintln!("weir inspect: problem: {problem}");
            }
            None => {
                if !json {
                    println!(
                        "{}: {} segments, {} batches, {} records, {} bytes, offsets {}..{}: ok",
                        summary.name,
                        summary.segments,
                        summary.batches,
                        summary.records,
                        summary.bytes,
                        summary.start_offset,
                        summary.next_offset
                    );
                }
                totals.0 += summary.segments;
                totals.1 += summary.batches;
                totals.2 += summary.records;
                totals.3 += summary.bytes;
            }
        }
    }
    let verdict = if report.problems == 0 {
        "ok".to_owned()
    } else {
        format!("{} of {} partitions have problems", report.problems, report.partitions.len())
    };
    if !json {
        println!(
            "{verdict}: {} partitions, {} segments, {} batches, {} records, {} bytes verified",
            report.partitions.len(),
            totals.0,
            totals.1,
            totals.2,
            totals.3
        );
    }
    if report.problems == 0 {
        exit_code::CLEAN
    } else {
        exit_code::PROBLEMS_FOUND
    }
}

fn tail(
    valid: &ValidConfig,
    topic: &str,
    partition: Option<u32>,
    from_offset: i64,
    follow: bool,
    limit: Option<u64>,
    json: bool,
) -> i32 {
    let Some(topic_config) = valid.config.topics.iter().find(|candidate| candidate.name == topic) else {
        let names: Vec<&str> = valid.config.topics.iter().map(|topic| topic.name.as_str()).collect();
        eprintln!("weir tail: no topic {topic:?} in the config (topics: {})", names.join(", "));
        return exit_code::BAD_CONFIG;
    };
    let partitions: Vec<u32> = match partition {
        Some(partition) if partition >= topic_config.partitions => {
            eprintln!("weir tail: {topic} has partitions 0..{}, not {partition}", topic_config.partitions);
            return exit_code::BAD_CONFIG;
        }
        Some(partition) => vec![partition],
        None => (0..topic_config.partitions).collect(),
    };
    if from_offset < 0 || limit == Some(0) {
        eprintln!("weir tail: --from must be at least 0 and --limit at least 1");
        return exit_code::BAD_CONFIG;
    }
    let mut readers: Vec<crate::tail::PartitionTail> = partitions
        .iter()
        .map(|partition| {
            let directory = runtime::partition_directory(&valid.config.data_dir, topic, *partition);
            crate::tail::PartitionTail::new(topic, *partition, &directory, from_offset)
        })
        .collect();
    let left = std::cell::Cell::new(limit.unwrap_or(u64::MAX));
    let stdout_closed = std::cell::Cell::new(false);
    let mut stdout = std::io::stdout().lock();
    let mut print = |topic: &str, partition: u32, record: &crate::core::log::batch::RecordRef| {
        use std::io::Write;
        let line = if json {
            crate::tail::render_json(topic, partition, record)
        } else {
            crate::tail::render_line(topic, partition, record)
        };
        left.set(left.get() - 1);
        // A closed pipe (`weir tail ... | head`) ends the command quietly.
        if writeln!(stdout, "{line}").is_err() {
            stdout_closed.set(true);
        }
        left.get() > 0 && !stdout_closed.get()
    };
    loop {
        for reader in &mut readers {
            if left.get() == 0 || stdout_closed.get() {
                return exit_code::CLEAN;
            }
            if let Err(error) = reader.read_available(&mut print) {
                eprintln!("weir tail: {error}");
                return exit_code::PROBLEMS_FOUND;
            }
        }
        if !follow || left.get() == 0 || stdout_closed.get() {
            return exit_code::CLEAN;
        }
        std::thread::sleep(crate::tail::FOLLOW_POLL_INTERVAL);
    }
}

/// `weir kafka-user`: exit 0 on success, 1 on a problem (said on stderr).
fn kafka_user(action: KafkaUserAction) -> i32 {
    use crate::shell::kafka_api::{add_user, remove_user, Credentials};
    let result = match action {
        KafkaUserAction::Add { name, credentials, password_file, iterations } => {
            let password = match read_password(password_file.as_deref()) {
                Ok(password) => password,
                Err(why) => {
                    eprintln!("weir kafka-user add: {why}");
                    return exit_code::PROBLEMS_FOUND;
                }
            };
            add_user(&credentials, &name, password.as_bytes(), iterations).map(|existed| {
                let done = if existed { "replaced" } else { "added" };
                println!("{done} {name} (SCRAM-SHA-256, SCRAM-SHA-512) in {}", credentials.display());
            })
        }
        KafkaUserAction::Remove { name, credentials } => remove_user(&credentials, &name).map(|existed| {
            if existed {
                println!("removed {name} from {}", credentials.display());
            } else {
                println!("{name} is not in {}", credentials.display());
            }
        }),
        KafkaUserAction::List { credentials } => Credentials::load(&credentials).map(|loaded| {
            for name in loaded.names() {
                println!("{name}");
            }
        }),
    };
    match result {
        Ok(()) => exit_code::CLEAN,
        Err(error) => {
            eprintln!("weir kafka-user: {error}");
            exit_code::PROBLEMS_FOUND
        }
    }
}

/// The first line of `file`, or of stdin: the password (its line end removed).
fn read_password(file: Option<&Path>) -> Result<String, String> {
    use std::io::BufRead;
    let mut line = String::new();
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
            line = text.lines().next().unwrap_or_default().to_owned();
        }
        None => {
            std::io::stdin().lock().read_line(&mut line).map_err(|error| format!("stdin: {error}"))?;
        }
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err("no password given (its first line on stdin, or --password-file)".into());
    }
    Ok(password.to_owned())
}
