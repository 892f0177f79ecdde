//! `weir status`, `/status`, `/health` and the shipped-lag metrics, against a real
//! `weir serve` shipping to a real tansu:
//! - while the broker is down the shipper reports "retrying" with the whole log as lag;
//! - while it ships under a bandwidth cap, every consistent sample of the lag in bytes
//!   equals the stored batch bytes from the cursor to the end, counted independently
//!   from the segment files, and the lag in seconds lies within what the clock allows;
//! - a partition whose shipper stopped (a corrupt ship.state) is "stopped" with its
//!   error in /status and `weir status` (exit 1), and /health is 503 naming it;
//! - with weir stopped, `weir status` reads the data directory instead.

#[path = "common/broker.rs"]
mod broker;
mod common;
#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use broker::{free_port, read_upstream, Tansu};
use common::{record, run};
use server::{http_get, partition, weir, Server};
use weir::config::Config;
use weir::shell::log::{LogOptions, PartitionLog};
use weir::shell::metrics::Metrics;

const RECORDS_0: u64 = 500;
const RECORDS_1: u64 = 300;

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
partition_bytes_max = "64 MiB"
[admin]
listen = "127.0.0.1:{admin_port}"
[kafka_api]
listen = "127.0.0.1:0"
[quic]
enabled = false
[upstream]
enabled = true
bootstrap_servers = ["127.0.0.1:{broker_port}"]
client_id = "weir-status-test"
batch_bytes_max = "8 KiB"
bandwidth_bytes_per_s_max = "100 KB"
request_timeout_ms = 5000
connect_timeout_ms = 1000
retry_backoff_ms_min = 20
retry_backoff_ms_max = 200
cursor_persist_interval_ms = 100
[[topics]]
name = "telemetry"
partitions = 2
"#,
        data_dir.display()
    )
}

/// Appends `count` records (values of 600..1400 bytes), one batch each, each stamped
/// with the wall-clock time of its append (as a device stamps its records).
fn fill(directory: PathBuf, options: LogOptions, count: u64) {
    run(move || async move {
        let log = PartitionLog::open(&directory, "fill", options, Metrics::new().partition("fill", 0)).await.unwrap();
        for seed in 0..count {
            let mut stamped = record(seed, 600 + (seed as usize * 37) % 800);
            stamped.timestamp_ms = unix_ms(std::time::SystemTime::now());
            log.append(vec![stamped]).await.unwrap();
        }
        log.close().await.unwrap();
    })
}

fn unix_ms(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// (base offset, bytes) of every stored batch, walked from the raw segment files.
fn batches_on_disk(directory: &Path) -> Vec<(i64, u64)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    files.sort();
    let mut batches = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let mut at = 0usize;
        while at + 12 <= bytes.len() {
            let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            if length == 0 {
                break; // preallocated zeros after the data
            }
            let base = i64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
            let total = 12 + length as usize;
            batches.push((base, total as u64));
            at += total;
        }
    }
    batches
}

fn bytes_from(batches: &[(i64, u64)], cursor: i64) -> u64 {
    let end = batches.last().map_or(0, |(base, _)| *base + 1);
    if cursor > 0 && cursor < end {
        assert!(batches.iter().any(|(base, _)| *base == cursor), "cursor {cursor} is not on a batch boundary");
    }
    batches.iter().filter(|(base, _)| *base >= cursor).map(|(_, bytes)| bytes).sum()
}

fn metric(text: &str, name: &str, partition: u32) -> f64 {
    let prefix = format!("{name}{{topic=\"telemetry\",partition=\"{partition}\"}} ");
    let line = text.lines().find(|line| line.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix} in /metrics"));
    line[prefix.len()..].trim().parse().unwrap()
}

fn status_command(config: &Path) -> (Option<i32>, String, String) {
    let output = weir().arg("status").arg("--config").arg(config).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn status_json(config: &Path) -> (Option<i32>, serde_json::Value) {
    let output = weir().arg("status").arg("--json").arg("--config").arg(config).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    (output.status.code(), serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}")))
}

#[test]
fn status_reports_exact_lag_and_a_stopped_shipper_live_and_from_the_data_directory() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let (admin_port, broker_port) = (free_port(), free_port());
    let config_path = root.path().join("weir.toml");
    let text = config_text(&data_dir, admin_port, broker_port);
    std::fs::write(&config_path, &text).unwrap();
    let options = LogOptions::from_config(&Config::parse(&text, "test").unwrap().log);
    let appends_started = Instant::now();
    fill(data_dir.join("telemetry-0"), options.clone(), RECORDS_0);
    fill(data_dir.join("telemetry-1"), options, RECORDS_1);
    let appends_done = Instant::now();
    std::fs::write(data_dir.join("telemetry-1/ship.state"), b"not a ship state").unwrap();
    let on_disk_0 = batches_on_disk(&data_dir.join("telemetry-0"));
    let on_disk_1 = batches_on_disk(&data_dir.join("telemetry-1"));
    assert_eq!(on_disk_0.len() as u64, RECORDS_0, "one batch per append");

    let server = Server::start(&config_path, 1);
    // The broker is down: partition 0 retries with its whole log as lag; partition 1
    // stopped on its state file.
    let status = server.wait_status(Duration::from_secs(20), "retrying and stopped", |status| {
        partition(status, "telemetry", 0)["shipper"]["state"] == "retrying"
            && partition(status, "telemetry", 1)["shipper"]["state"] == "stopped"
            && partition(status, "telemetry", 1)["shipper"]["lag_records"] == RECORDS_1
    });
    let p0 = partition(&status, "telemetry", 0);
    assert_eq!(p0["log_start_offset"], 0);
    assert_eq!(p0["log_end_offset"], RECORDS_0);
    assert_eq!(p0["shipper"]["lag_records"], RECORDS_0);
    assert_eq!(p0["shipper"]["lag_bytes"], bytes_from(&on_disk_0, 0));
    assert!(p0["shipper"]["problem"].as_str().unwrap().contains(&broker_port.to_string()), "{p0}");
    let p1 = partition(&status, "telemetry", 1);
    let error = p1["shipper"]["error"].as_str().unwrap();
    assert!(error.contains("ship.state"), "the stop names the state file: {error}");
    assert_eq!(p1["shipper"]["lag_bytes"], bytes_from(&on_disk_1, 0));
    assert_eq!(p1["disk_bytes"], bytes_from(&on_disk_1, 0));
    assert_eq!(status["data_dir_bytes"], bytes_from(&on_disk_0, 0) + bytes_from(&on_disk_1, 0));

    let (code, body) = server.get("/health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("upstream shipping stopped") && body.contains("telemetry-1"), "{body}");

    // The broker comes up: partition 0 ships, slowly (100 KB/s). Every sample whose
    // cursor and lag agree must count exactly the bytes from the cursor on.
    let tansu = Tansu::start_on(broker_port, broker_port);
    tansu.create_topic("telemetry", 2);
    let mut checked_mid_log = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let asked = Instant::now();
        let status = server.status();
        let answered = Instant::now();
        let shipper = &partition(&status, "telemetry", 0)["shipper"];
        let cursor = shipper["cursor_offset"].as_i64().unwrap();
        let lag_records = shipper["lag_records"].as_i64().unwrap();
        if lag_records == RECORDS_0 as i64 - cursor {
            assert_eq!(shipper["lag_bytes"].as_u64().unwrap(), bytes_from(&on_disk_0, cursor), "cursor {cursor}");
            let lag_seconds = shipper["lag_seconds"].as_f64().unwrap();
            if cursor < RECORDS_0 as i64 {
                // The oldest unshipped record was stamped after the appends started and
                // before they ended; the sample is at most one refresh (0.2 s) old.
                let least = asked.duration_since(appends_done).as_secs_f64() - 0.3;
                let most = answered.duration_since(appends_started).as_secs_f64() + 0.1;
                assert!(least <= lag_seconds && lag_seconds <= most, "{lag_seconds} s not in {least}..{most}");
            } else {
                assert_eq!(lag_seconds, 0.0);
            }
            if 0 < cursor && cursor < RECORDS_0 as i64 {
                checked_mid_log += 1;
            }
        }
        if cursor == RECORDS_0 as i64 && lag_records == 0 && shipper["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "partition 0 did not catch up: {status:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(checked_mid_log >= 3, "only {checked_mid_log} samples mid-log");

    // /metrics says the same as /status.
    let (_, metrics) = server.get("/metrics");
    let status = server.status();
    assert_eq!(metric(&metrics, "weir_ship_lag_records", 0), 0.0);
    assert_eq!(metric(&metrics, "weir_ship_lag_bytes", 1), bytes_from(&on_disk_1, 0) as f64);
    assert_eq!(metric(&metrics, "weir_ship_lag_records", 1), RECORDS_1 as f64);
    assert_eq!(metric(&metrics, "weir_ship_stopped", 1), 1.0);
    assert_eq!(metric(&metrics, "weir_ship_stopped", 0), 0.0);
    assert_eq!(partition(&status, "telemetry", 1)["shipper"]["state"], "stopped");

    // The command asks the server.
    let (code, text, stderr) = status_command(&config_path);
    assert_eq!(code, Some(1), "a stopped shipper makes weir status exit 1: {text}{stderr}");
    let line = |name: &str| text.lines().find(|line| line.starts_with(name)).unwrap_or_else(|| panic!("{text}"));
    assert!(line("telemetry-0").contains("running"), "{text}");
    assert!(line("telemetry-1").contains("STOPPED") && line("telemetry-1").contains("ship.state"), "{text}");
    let (code, json) = status_json(&config_path);
    assert_eq!(code, Some(1));
    assert_eq!(json["source"], "server");
    assert_eq!(partition(&json, "telemetry", 0)["shipper"]["cursor_offset"], RECORDS_0);
    assert_eq!(partition(&json, "telemetry", 1)["shipper"]["lag_records"], RECORDS_1);
    // --admin asks that address instead of admin.listen; a port nobody serves is an
    // error (exit 4), never a silent fallback to the data directory.
    let output = weir()
        .args(["status", "--json", "--admin", &format!("127.0.0.1:{}", free_port()), "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.stdout.is_empty());
    let output =
        weir().args(["status", "--json", "--admin", &server.admin, "--config"]).arg(&config_path).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["source"], "server");

    let upstream = read_upstream(&tansu.address(), "telemetry", 0, RECORDS_0 as usize, Duration::from_secs(30));
    let keys: Vec<Vec<u8>> = upstream.iter().map(|record| record.key.clone().unwrap()).collect();
    let expected: Vec<Vec<u8>> = (0..RECORDS_0).map(|seed| format!("key-{seed}").into_bytes()).collect();
    assert_eq!(keys, expected, "partition 0 upstream: every record once, in order");

    assert_eq!(server.stop(), Some(0));
    // weir is down: the command reads the data directory.
    assert!(std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err());
    let (code, json) = status_json(&config_path);
    assert_eq!(code, Some(1), "{json}");
    assert!(json["source"].as_str().unwrap().contains("data directory"), "{json}");
    let p0 = partition(&json, "telemetry", 0);
    assert_eq!(
        (p0["log_end_offset"].as_u64(), p0["shipper"]["cursor_offset"].as_u64()),
        (Some(RECORDS_0), Some(RECORDS_0))
    );
    assert_eq!(p0["shipper"]["state"], "not-running");
    assert_eq!(p0["shipper"]["lag_records"], 0);
    assert_eq!(p0["disk_bytes"], bytes_from(&on_disk_0, 0));
    let p1 = partition(&json, "telemetry", 1);
    assert_eq!(p1["shipper"]["state"], "stopped");
    assert!(p1["shipper"]["error"].as_str().unwrap().contains("ship.state"));
    assert_eq!(p1["shipper"]["lag_records"], RECORDS_1);
    let _ = http_get; // (used by other tests sharing server.rs)
}

#[test]
fn status_with_no_server_and_no_data_directory_says_so_and_an_unanswered_admin_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("never-created");
    let admin_port = free_port();
    let config_path = root.path().join("weir.toml");
    std::fs::write(&config_path, config_text(&data_dir, admin_port, free_port())).unwrap();

    let (code, stdout, stderr) = status_command(&config_path);
    assert_eq!(code, Some(4), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "no made-up partitions: {stdout}");
    assert!(stderr.contains("does not exist: nothing to report"), "{stderr}");
    assert!(!data_dir.exists(), "status creates nothing");

    // With the data directory there, an --admin that does not answer is still an error.
    std::fs::create_dir(&data_dir).unwrap();
    let unanswered = format!("127.0.0.1:{}", free_port());
    let output = weir().args(["status", "--admin", &unanswered, "--config"]).arg(&config_path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(output.stdout.is_empty(), "no fallback to the data directory");
    assert!(stderr.contains(&unanswered) && stderr.contains("--admin"), "{stderr}");
    // Without --admin it reads the directory that is there.
    let (code, stdout, stderr) = status_command(&config_path);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("reading the data directory"), "{stderr}");
}
