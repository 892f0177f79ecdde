//! The signals an operator alerts on, against a real `weir serve`:
//! - with the broker unreachable, the shipper is `retrying`, `weir_ship_state` says so,
//!   `weir_ship_failing_since_timestamp_seconds` says since when, and once that is older
//!   than `upstream.degraded_after_ms` `/health` answers 503 naming the partition and
//!   its problem; when the broker comes up, shipping resumes and `/health` is 200 again,
//!   with `weir_ship_last_success_timestamp_seconds` set;
//! - the lag in seconds is the records' own age (their timestamps), also after a clean
//!   restart, not the age of the segment files (which were written later);
//! - the ack, flush and sync latency histograms, build info, process metrics and the
//!   data directory's gauges are exported and move under load (weir-sim).

#[path = "common/appliance.rs"]
mod appliance;
#[path = "common/broker.rs"]
mod broker;
mod common;
#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker::{free_port, Tansu};
use common::{record, run};
use server::{partition, Server};
use weir::config::Config;
use weir::shell::log::{LogOptions, PartitionLog};
use weir::shell::metrics::Metrics;

const RECORDS: u64 = 200;
/// How old the records are when weir first starts.
const RECORDS_AGE: Duration = Duration::from_secs(40);
const DEGRADED_AFTER_MS: u64 = 3000;

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn config_text(data_dir: &Path, admin_port: u16, broker_port: u16) -> String {
    format!(
        r#"data_dir = "{}"
[engine]
io_memory_bytes = "8 MiB"
[log]
segment_bytes_max = "64 KiB"
index_interval_bytes = "4 KiB"
preallocate_bytes = "256 KiB"
flush_bytes_max = "16 KiB"
[admin]
listen = "127.0.0.1:{admin_port}"
[kafka_api]
listen = "127.0.0.1:0"
[quic]
enabled = false
[upstream]
enabled = true
bootstrap_servers = ["127.0.0.1:{broker_port}"]
client_id = "weir-operator-test"
request_timeout_ms = 5000
connect_timeout_ms = 500
retry_backoff_ms_min = 20
retry_backoff_ms_max = 200
degraded_after_ms = {DEGRADED_AFTER_MS}
[[topics]]
name = "telemetry"
partitions = 1
"#,
        data_dir.display()
    )
}

/// Appends `RECORDS` records stamped `RECORDS_AGE` ago, 1 ms apart (the first the
/// oldest), one batch each: the files are written now, the records are old.
fn fill(directory: PathBuf, options: LogOptions) -> i64 {
    let first_ms = (SystemTime::now() - RECORDS_AGE).duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    run(move || async move {
        let log = PartitionLog::open(&directory, "fill", options, Metrics::new().partition("fill", 0)).await.unwrap();
        for seed in 0..RECORDS {
            let mut stamped = record(seed, 200);
            stamped.timestamp_ms = first_ms + seed as i64;
            log.append(vec![stamped]).await.unwrap();
        }
        log.close().await.unwrap();
    });
    first_ms
}

/// The value of the series `name` (with its labels, as exposed); `None` when absent.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|value| value.trim().parse().unwrap())
}

fn state_series(text: &str, state: &str) -> Option<f64> {
    series(text, &format!("weir_ship_state{{topic=\"telemetry\",partition=\"0\",state=\"{state}\"}}"))
}

const LABELS: &str = "{topic=\"telemetry\",partition=\"0\"}";

/// Waits for the lag in seconds to be known and checks it is the records' age.
fn assert_lag_is_the_records_age(server: &Server, first_ms: i64) {
    let status = server.wait_status(Duration::from_secs(20), "lag in seconds sampled", |status| {
        partition(status, "telemetry", 0)["shipper"]["lag_seconds"].as_f64().is_some_and(|lag| lag > 0.0)
    });
    let lag = partition(&status, "telemetry", 0)["shipper"]["lag_seconds"].as_f64().unwrap();
    // The batch at the cursor holds the first record alone; samples are 0.2 s apart.
    let age = now_s() - first_ms as f64 / 1000.0;
    assert!((lag - age).abs() <= 1.0, "lag_seconds {lag} is not the oldest record's age {age}");
}

#[test]
fn health_degrades_while_shipping_fails_longer_than_the_bound_and_the_lag_is_the_records_age() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let (admin_port, broker_port) = (free_port(), free_port());
    let config_path = root.path().join("weir.toml");
    let text = config_text(&data_dir, admin_port, broker_port);
    std::fs::write(&config_path, &text).unwrap();
    let options = LogOptions::from_config(&Config::parse(&text, "test").unwrap().log);
    let first_ms = fill(data_dir.join("telemetry-0"), options);

    // Nothing listens on the broker's port: the shipper retries.
    let server = Server::start(&config_path, 1);
    let status = server.wait_status(Duration::from_secs(20), "retrying", |status| {
        partition(status, "telemetry", 0)["shipper"]["state"] == "retrying"
    });
    let since = partition(&status, "telemetry", 0)["shipper"]["failing_since_s"].as_f64().expect("failing since");
    assert!((now_s() - since).abs() < 20.0, "failing since {since}");
    let (code, body) = server.get("/health");
    if now_s() < since + DEGRADED_AFTER_MS as f64 / 1000.0 - 0.5 {
        assert_eq!(code, 200, "failing for less than upstream.degraded_after_ms is not yet degraded: {body}");
    }
    let (_, metrics) = server.get("/metrics");
    assert_eq!(state_series(&metrics, "retrying"), Some(1.0), "{metrics}");
    assert_eq!(state_series(&metrics, "running"), Some(0.0));
    // The same instant; the JSON and the Prometheus text print an f64 to different digits.
    let since_metric = series(&metrics, &format!("weir_ship_failing_since_timestamp_seconds{LABELS}")).unwrap();
    assert!((since_metric - since).abs() < 0.001, "{since_metric} vs {since}");
    assert_eq!(series(&metrics, &format!("weir_ship_last_success_timestamp_seconds{LABELS}")), Some(0.0));
    // The lag is the records' age (40 s), though the segment files are seconds old.
    assert_lag_is_the_records_age(&server, first_ms);

    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (code, body) = server.get("/health");
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "/health never degraded: {code} {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(now_s() >= since + DEGRADED_AFTER_MS as f64 / 1000.0 - 0.5, "degraded before the bound: {body}");
    assert!(body.contains("failing for longer than upstream.degraded_after_ms"), "{body}");
    assert!(body.contains("telemetry-0: failing for") && body.contains(&broker_port.to_string()), "{body}");
    // `weir status` shows since when.
    let output = server::weir().arg("status").arg("--config").arg(&config_path).output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("retrying (failing for"), "{table}");
    // One warning when the problem started; repeats are counted, not logged each time.
    let warnings = server.log_lines().iter().filter(|line| line.contains("upstream shipping will retry")).count();
    assert!(warnings <= 3, "{warnings} retry warnings in a few seconds: the log is not rate-limited");

    // A clean restart: the lag is still the records' age.
    assert_eq!(server.stop(), Some(0));
    std::thread::sleep(Duration::from_secs(2));
    let server = Server::start(&config_path, 1);
    assert_lag_is_the_records_age(&server, first_ms);

    // The broker comes up: shipping resumes, /health is ok again.
    let tansu = Tansu::start_on(broker_port, broker_port);
    tansu.create_topic("telemetry", 1);
    let status = server.wait_status(Duration::from_secs(60), "caught up", |status| {
        let shipper = &partition(status, "telemetry", 0)["shipper"];
        shipper["state"] == "running" && shipper["lag_records"] == 0 && shipper["cursor_offset"] == RECORDS
    });
    let shipper = &partition(&status, "telemetry", 0)["shipper"];
    assert!(shipper["failing_since_s"].is_null(), "{shipper}");
    assert_eq!(shipper["lag_seconds"].as_f64(), Some(0.0), "caught up: no lag");
    let (code, body) = server.get("/health");
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = server.get("/metrics");
    assert_eq!(state_series(&metrics, "running"), Some(1.0), "{metrics}");
    assert_eq!(state_series(&metrics, "retrying"), Some(0.0));
    assert_eq!(series(&metrics, &format!("weir_ship_failing_since_timestamp_seconds{LABELS}")), Some(0.0));
    let last_success = series(&metrics, &format!("weir_ship_last_success_timestamp_seconds{LABELS}")).unwrap();
    assert!((now_s() - last_success).abs() < 60.0, "last success {last_success}");
    assert!(server.log_lines().iter().any(|line| line.contains("upstream shipping resumed")));
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn latency_histograms_build_process_and_disk_metrics_move_under_load() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let output = server::weir()
        .args(["certs", "--device-count", "4", "--device-prefix", "sim-", "--dir"])
        .arg(root.join("certs"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let appliance =
        appliance::Appliance::start(root, "", "[log]\ndata_dir_bytes_max = \"1 GiB\"\n", &[("telemetry", 2)], 1);
    let (_, before) = appliance.server.get("/metrics");
    assert!(before.contains(&format!("weir_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{before}");
    assert_eq!(series(&before, "weir_quic_ack_seconds_count"), Some(0.0), "{before}");
    assert!(series(&before, "weir_process_resident_memory_bytes").unwrap() > 1e6);
    assert!(series(&before, "weir_process_open_fds").unwrap() >= 3.0);
    assert!(series(&before, "weir_process_threads").unwrap() >= 2.0);
    let started = series(&before, "weir_process_start_time_seconds").unwrap();
    assert!(started <= now_s() && started > now_s() - 120.0, "started at {started}");
    assert_eq!(series(&before, "weir_data_dir_bytes_max"), Some((1u64 << 30) as f64));
    assert!(series(&before, "weir_data_dir_filesystem_free_bytes").unwrap() > 0.0);

    let sim = std::process::Command::new(PathBuf::from(env!("CARGO_BIN_EXE_weir")).with_file_name("weir-sim"))
        .args(["--server", &appliance.quic, "--devices", "4", "--rate", "100", "--seconds", "2"])
        .args(["--record-bytes", "64", "--certs"])
        .arg(appliance.certs())
        .output()
        .unwrap();
    assert!(sim.status.success(), "weir-sim: {}", String::from_utf8_lossy(&sim.stderr));

    let (_, after) = appliance.server.get("/metrics");
    let acked = series(&after, "weir_quic_frames_acked_total").unwrap();
    assert!(acked >= 100.0, "{acked} frames acked");
    assert_eq!(series(&after, "weir_quic_ack_seconds_count"), Some(acked), "one ack latency per acked frame");
    let flushes: f64 = (0..2)
        .map(|partition| {
            series(&after, &format!("weir_log_flushes_total{{topic=\"telemetry\",partition=\"{partition}\"}}")).unwrap()
        })
        .sum();
    assert!(flushes > 0.0);
    assert_eq!(series(&after, "weir_log_flush_seconds_count"), Some(flushes), "one flush latency per flush");
    assert_eq!(series(&after, "weir_log_sync_seconds_count"), Some(flushes), "one sync latency per flush");
    assert_eq!(series(&after, "weir_log_sync_seconds_bucket{le=\"+Inf\"}"), Some(flushes));
    let sync_sum = series(&after, "weir_log_sync_seconds_sum").unwrap();
    let flush_sum = series(&after, "weir_log_flush_seconds_sum").unwrap();
    assert!(sync_sum > 0.0 && flush_sum >= sync_sum, "a flush includes its sync: {flush_sum} vs {sync_sum}");
    let ack_sum = series(&after, "weir_quic_ack_seconds_sum").unwrap();
    assert!(ack_sum > 0.0 && ack_sum / acked < 10.0, "mean ack latency {} s", ack_sum / acked);
    let status = appliance.server.status();
    assert_eq!(series(&after, "weir_data_dir_bytes"), status["data_dir_bytes"].as_f64());
    assert!(series(&after, "weir_data_dir_bytes").unwrap() > 0.0);
    // One style for label values: snake_case.
    for line in after.lines().filter(|line| line.contains("reason=\"")) {
        let value = line.split("reason=\"").nth(1).unwrap().split('"').next().unwrap();
        assert!(value.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "label value {value:?} in {line}");
    }
    appliance.stop();
}

#[test]
fn recovery_logs_the_torn_tail_cut_and_the_index_rebuild_with_offsets_and_records() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let config_path = root.path().join("weir.toml");
    let text = config_text(&data_dir, free_port(), free_port()).replace("enabled = true", "enabled = false");
    std::fs::write(&config_path, &text).unwrap();
    let options = LogOptions::from_config(&Config::parse(&text, "test").unwrap().log);
    let partition = data_dir.join("telemetry-0");
    fill(partition.clone(), options);
    // Walk the one segment's batches to its end; the last batch is RECORDS - 1 alone.
    let log_file = partition.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&log_file).unwrap();
    let (mut at, mut last) = (0usize, 0usize);
    while at + 12 <= bytes.len() {
        let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        if length == 0 {
            break;
        }
        last = at;
        at += 12 + length as usize;
    }
    // A crash in the middle of the next write: a copy of the last batch whose body
    // is garbled (readable header, bad CRC) after the valid end.
    let mut torn = bytes[last..at].to_vec();
    let middle = torn.len() - 10;
    torn[middle] ^= 0xff;
    bytes.resize(bytes.len().max(at + torn.len()), 0);
    bytes[at..at + torn.len()].copy_from_slice(&torn);
    std::fs::write(&log_file, &bytes).unwrap();
    // And the index is gone: it is rebuilt by scanning the whole segment.
    std::fs::remove_file(partition.join("00000000000000000000.index")).unwrap();

    let server = Server::start(&config_path, 1);
    let lines = server.log_lines();
    let cut = lines.iter().find(|line| line.contains("cutting torn tail")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(cut.contains(&format!("kept_to_offset={}", RECORDS - 1)), "{cut}");
    assert!(cut.contains(&format!("segment_records_kept={RECORDS}")), "{cut}");
    assert!(cut.contains("torn_records=1"), "the torn batch's header says how many records it held: {cut}");
    let rebuilt =
        lines.iter().find(|line| line.contains("index rebuilt from the log")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(rebuilt.contains("scanned_from_offset=0"), "{rebuilt}");
    assert!(rebuilt.contains(&format!("scanned_to_offset={RECORDS}")), "{rebuilt}");
    assert!(rebuilt.contains(&format!("scanned_records={RECORDS}")), "{rebuilt}");
    assert!(!rebuilt.contains("rebuilt_entries=0"), "{rebuilt}");
    let status = server.status();
    assert_eq!(partition_end(&status), RECORDS as i64, "every record before the cut kept");
    assert_eq!(server.stop(), Some(0));
}

fn partition_end(status: &serde_json::Value) -> i64 {
    partition(status, "telemetry", 0)["log_end_offset"].as_i64().unwrap()
}
