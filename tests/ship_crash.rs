//! upstream_holds_every_record_exactly_once_across_sigkills_mid_shipping
//! upstream_holds_every_record_exactly_once_across_sigkills_and_broker_restarts
//!
//! `weir serve` ships a backlog to tansu under a bandwidth cap (so every kill lands
//! mid-shipping, with batches in flight and the persisted cursor behind); the test
//! SIGKILLs it at random moments, appends more records through `PartitionLog` while it
//! is down, restarts it, and repeats. Then weir runs until the upstream has caught up
//! and stops cleanly. Retention deletes shipped segments all along (small segments, a
//! 1 MiB budget). An independent reader (confluent-kafka, check.crcs=true)
//! must find every record of the log upstream exactly once, in order, byte for byte.
//! The seed is printed; replay with WEIR_SHIP_CRASH_SEED.
//!
//! The second test does the same against tansu with SQLite storage, and also stops
//! the broker (SIGTERM, or SIGKILL) and starts it again on its database now and then,
//! while weir is shipping. That broker answers a Fetch with batches it rebuilds from
//! stored rows (base sequence 0, consecutive batches of one producer merged), so
//! reconciliation must place in-doubt records by counting them from the persisted
//! scan point, not by their sequences.

#[path = "common/broker.rs"]
mod broker;
mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::{free_port, read_upstream, Tansu, TansuSqlite};
use bytes::Bytes;
use common::run;
use rand::{Rng, SeedableRng};
use weir::core::log::batch::{Header, Record};
use weir::shell::log::{LogOptions, PartitionLog};
use weir::shell::metrics::Metrics;

const ROUNDS: u32 = 20;
/// The memory broker takes records fast; tansu's SQLite storage inserts (and answers
/// fetches) a row at a time, so its loop ships less.
const BACKLOG_RECORDS: u64 = 30_000;
const RECORDS_PER_ROUND: u64 = 400;
const SQLITE_BACKLOG_RECORDS: u64 = 8_000;
const SQLITE_RECORDS_PER_ROUND: u64 = 200;

fn log_options() -> LogOptions {
    LogOptions {
        segment_bytes_max: 256 << 10,
        segment_age_max: Duration::from_secs(3600),
        index_interval_bytes: 16 << 10,
        preallocate_bytes: 1 << 20,
        flush_delay_max: Duration::from_micros(200),
        flush_bytes_max: 64 << 10,
        core_flushes_per_s_max: 1000,
        appends_pending_max: 256,
        partition_bytes_max: 1 << 20,
    }
}

/// The same log settings as `log_options` (small segments and a 1 MiB budget, so
/// retention deletes shipped segments while the test runs), plus shipping to
/// `bootstrap`.
/// Returns the config's path and the admin endpoint's address.
fn write_config(directory: &Path, data_dir: &Path, bootstrap: &str) -> (PathBuf, String) {
    let path = directory.join("weir.toml");
    let admin = format!("127.0.0.1:{}", free_port());
    let text = format!(
        r#"data_dir = "{data_dir}"
[engine]
io_memory_bytes = "8 MiB"
[log]
segment_bytes_max = "256 KiB"
index_interval_bytes = "16 KiB"
preallocate_bytes = "1 MiB"
flush_delay_us_max = 200
flush_bytes_max = "64 KiB"
appends_pending_max = 256
partition_bytes_max = "1 MiB"
[admin]
listen = "{admin}"
[kafka_api]
listen = "127.0.0.1:0"
[upstream]
enabled = true
bootstrap_servers = ["{bootstrap}"]
client_id = "weir-crash-test"
batch_bytes_max = "32 KiB"
bandwidth_bytes_per_s_max = "600 KB"
request_timeout_ms = 5000
connect_timeout_ms = 2000
retry_backoff_ms_min = 20
retry_backoff_ms_max = 300
cursor_persist_interval_ms = 200
[[upstream.topics]]
edge = "telemetry"
upstream = "central"
[[topics]]
name = "telemetry"
partitions = 1
"#,
        data_dir = data_dir.display(),
    );
    std::fs::write(&path, text).unwrap();
    (path, admin)
}

/// Polls weir's /status until the partition's shipping cursor reaches `offset`.
fn wait_shipped(admin: &str, offset: u64, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("(no answer)");
    while Instant::now() < deadline {
        // Connection refused while weir starts: try again.
        if let Ok(mut stream) = std::net::TcpStream::connect(admin) {
            let mut response = String::new();
            let sent = write!(stream, "GET /status HTTP/1.0\r\nHost: weir\r\n\r\n");
            if sent.is_ok() && stream.read_to_string(&mut response).is_ok() {
                if let Some((_, body)) = response.split_once("\r\n\r\n") {
                    let status: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                    if status["partitions"][0]["shipper"]["cursor_offset"].as_u64() == Some(offset) {
                        return Ok(());
                    }
                    last = body.to_owned();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("the cursor did not reach {offset} within {timeout:?}; last /status: {last}"))
}

fn record(seed: u64) -> Record {
    let value_bytes = (seed * 7919 % 300) as usize;
    Record {
        timestamp_ms: 1_700_000_000_000 + seed as i64,
        key: Some(Bytes::from(format!("k{seed}"))),
        value: Some(Bytes::from((0..value_bytes).map(|index| (seed as usize ^ index) as u8).collect::<Vec<_>>())),
        headers: vec![Header { key: "seed".into(), value: Some(Bytes::from(seed.to_string())) }],
    }
}

/// Appends records `first..first + count` in groups of 1..=8.
fn append(partition: &Path, first: u64, count: u64, seed: u64) {
    let partition = partition.to_owned();
    run(move || async move {
        let log =
            PartitionLog::open(&partition, "telemetry-0", log_options(), Metrics::new().partition("telemetry", 0))
                .await
                .expect("the test opens the log");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut next = first;
        while next < first + count {
            let group = rng.gen_range(1..=8u64).min(first + count - next);
            log.append((next..next + group).map(record).collect()).await.expect("append");
            next += group;
        }
        log.close().await.unwrap();
    });
}

fn serve(config: &Path, output: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(output).unwrap();
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--cores", "1", "--config"])
        .arg(config)
        .env("WEIR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("weir starts")
}

/// The broker a crash loop ships to.
enum Broker {
    Memory(Tansu),
    /// Restarted now and then on its own database.
    Sqlite(TansuSqlite),
}

impl Broker {
    fn address(&self) -> String {
        match self {
            Broker::Memory(tansu) => tansu.address(),
            Broker::Sqlite(tansu) => tansu.address(),
        }
    }
}

fn seed() -> u64 {
    let seed: u64 = std::env::var("WEIR_SHIP_CRASH_SEED")
        .map(|text| text.parse().expect("WEIR_SHIP_CRASH_SEED is a number"))
        .unwrap_or_else(|_| rand::random());
    eprintln!("seed {seed} (replay with WEIR_SHIP_CRASH_SEED={seed})");
    seed
}

#[test]
fn upstream_holds_every_record_exactly_once_across_sigkills_mid_shipping() {
    let seed = seed();
    let tansu = Tansu::start();
    tansu.create_topic("central", 1);
    crash_loop(Broker::Memory(tansu), BACKLOG_RECORDS, RECORDS_PER_ROUND, seed);
}

#[test]
fn upstream_holds_every_record_exactly_once_across_sigkills_and_broker_restarts() {
    let seed = seed();
    let directory = tempfile::tempdir().unwrap();
    let tansu = TansuSqlite::start(&directory.path().join("broker"));
    tansu.create_topic("central", 1);
    crash_loop(Broker::Sqlite(tansu), SQLITE_BACKLOG_RECORDS, SQLITE_RECORDS_PER_ROUND, seed);
}

fn crash_loop(mut broker: Broker, backlog_records: u64, records_per_round: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut broker_restarts = 0;
    let directory = tempfile::tempdir().unwrap();
    let data_dir = directory.path().join("data");
    let partition = data_dir.join("telemetry-0");
    let (config, admin) = write_config(directory.path(), &data_dir, &broker.address());
    let weir_log = directory.path().join("weir.log");
    let started = Instant::now();
    append(&partition, 0, backlog_records, seed);
    let mut appended = backlog_records;
    for round in 0..ROUNDS {
        let mut child = serve(&config, &weir_log);
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..1200)));
        if let Broker::Sqlite(tansu) = &mut broker {
            // One round in three the broker goes down mid-shipping too, politely or
            // not, and comes back on its database while weir keeps trying.
            if round % 3 == 1 {
                if rng.gen_bool(0.5) {
                    tansu.stop();
                } else {
                    tansu.kill();
                }
                std::thread::sleep(Duration::from_millis(rng.gen_range(50..600)));
                tansu.resume();
                broker_restarts += 1;
                std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
            }
        }
        child.kill().expect("SIGKILL weir");
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: weir must die by SIGKILL, got {status}");
        append(&partition, appended, records_per_round, seed + u64::from(round) + 1);
        appended += records_per_round;
    }
    // The last run: until upstream has everything, then a clean stop.
    let mut child = serve(&config, &weir_log);
    if let Err(problem) = wait_shipped(&admin, appended, Duration::from_secs(180)) {
        let weir_output = std::fs::read_to_string(&weir_log).unwrap_or_default();
        panic!("seed {seed}: {problem}\nweir's log ends:\n{}", tail(&weir_output));
    }
    sigterm(&child);
    let status = child.wait().unwrap();
    let weir_output = std::fs::read_to_string(&weir_log).unwrap_or_default();
    assert!(status.success(), "weir stops cleanly on SIGTERM: {status}\n{}", tail(&weir_output));
    assert!(!weir_output.contains("shipping stopped"), "no shipper stopped:\n{}", tail(&weir_output));
    // Nothing can arrive any more: compare the whole upstream partition with the log.
    let upstream = read_upstream(&broker.address(), "central", 0, appended as usize, Duration::from_secs(180));
    // Retention deleted shipped segments on the way; every record is a function of
    // its offset, so the expectation is generated, not read back.
    let start_offset = {
        let partition = partition.clone();
        run(move || async move {
            let log =
                PartitionLog::open(&partition, "telemetry-0", log_options(), Metrics::new().partition("telemetry", 0))
                    .await
                    .unwrap();
            let stats = log.stats();
            assert_eq!(stats.next_offset as u64, appended);
            log.close().await.unwrap();
            stats.start_offset
        })
    };
    let local: Vec<(i64, Record)> = (0..appended).map(|offset| (offset as i64, record(offset))).collect();
    assert_eq!(local.len() as u64, appended);
    let reconciled = weir_output.matches("reconciled with upstream").count();
    // Restarts that found batches upstream beyond their persisted cursor: in doubt
    // when weir died, and never sent again.
    let recovered = weir_output
        .lines()
        .filter(|line| line.contains("reconciled with upstream"))
        .filter(|line| line.split("recovered=").nth(1).is_some_and(|rest| !rest.starts_with('0')))
        .count();
    eprintln!(
        "{ROUNDS} SIGKILLs, {broker_restarts} broker restarts, {appended} records, {} upstream, \
         {reconciled} reconciliations ({recovered} found in-doubt batches upstream), log starts at \
         {start_offset} after retention, {:.1} s",
        upstream.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(upstream.len(), local.len(), "upstream holds every record exactly once (seed {seed})");
    for ((offset, record), found) in local.iter().zip(&upstream) {
        assert_eq!(found.offset, *offset, "seed {seed}");
        assert_eq!(found.key.as_deref(), record.key.as_deref(), "seed {seed}: key at {offset}");
        assert_eq!(found.value.as_deref(), record.value.as_deref(), "seed {seed}: value at {offset}");
        assert_eq!(found.timestamp_ms, record.timestamp_ms, "seed {seed}: timestamp at {offset}");
        let headers: Vec<(String, Option<Vec<u8>>)> = record
            .headers
            .iter()
            .map(|header| (header.key.to_string(), header.value.as_ref().map(|value| value.to_vec())))
            .collect();
        assert_eq!(found.headers, headers, "seed {seed}: headers at {offset}");
    }
    // Resends the broker answered as already held: in doubt when weir died.
    let duplicates = weir_output.matches("upstream already held batches sent again").count();
    eprintln!("{duplicates} times a restarted weir resent in-doubt batches the broker already held");
    match broker {
        Broker::Memory(_) => {
            assert!(recovered >= 1, "some kills left in-doubt batches that reconciliation found upstream")
        }
        // tansu's SQLite storage keeps no producer id with its records, so the scan
        // finds none; the in-doubt batches are resent one stored batch at a time and
        // answered as duplicates.
        Broker::Sqlite(_) => {
            assert!(broker_restarts >= 6, "the broker was restarted mid-shipping");
            assert!(duplicates >= 1, "some kills left in-doubt batches that the broker answered as duplicates");
        }
    }
    assert!(start_offset > 0, "retention deleted shipped segments while weir was killed and restarted");
}

/// SIGTERM, through the `kill` command (no unsafe code in tests).
fn sigterm(child: &Child) {
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
