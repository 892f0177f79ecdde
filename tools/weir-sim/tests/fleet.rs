//! weir-sim as a user runs it, against the protocol-v1 test server of weir-device's
//! tests (quinn, mutual TLS, weir's frame codec) on 127.0.0.1: the last stdout line is
//! the JSON summary, and every line of the acked log names a record the server stored
//! exactly once, at that place, from that device.

#[path = "../../weir-device/tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};

use support::TestServer;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir-sim"))
}

fn device_certs(directory: &Path, count: usize) {
    let devices: Vec<String> = (0..count).map(|index| format!("sim-{index}")).collect();
    weir::certs::generate(directory, &[], &devices, 1).unwrap();
}

fn last_json(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|error| {
        panic!("last line is not JSON ({error}):\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    })
}

/// Runs the simulator on a blocking thread while the server runs on the test's runtime.
async fn run(arguments: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || sim().args(arguments).output().unwrap()).await.unwrap()
}

fn arguments(server: &TestServer, certs: &Path, extra: &[&str]) -> Vec<String> {
    let mut arguments: Vec<String> =
        vec!["--server".into(), server.address.to_string(), "--certs".into(), certs.display().to_string()];
    arguments.extend(extra.iter().map(|argument| (*argument).to_owned()));
    arguments
}

/// Every acked-log line is a record the server stored once, from that device, at that
/// place; returns the number of lines.
fn check_acked_log(server: &TestServer, path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    let state = server.state.lock().unwrap();
    let mut places = HashSet::new();
    let mut lines = 0;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [device, sequence, partition, offset, record_index, topic] = fields[..] else { panic!("line {line:?}") };
        let (sequence, partition, offset, record_index): (u64, u32, usize, u32) = (
            sequence.parse().unwrap(),
            partition.parse().unwrap(),
            offset.parse().unwrap(),
            record_index.parse().unwrap(),
        );
        let stored = &state.partitions[&partition][offset];
        assert_eq!((stored.device.as_str(), stored.sequence, stored.record_index), (device, sequence, record_index));
        assert!(topic == "telemetry" || topic == "metrics", "{line}");
        let value = stored.record.value.as_deref().unwrap();
        assert!(value.starts_with(format!("{device} ").as_bytes()), "{line}");
        assert!(places.insert((partition, offset)), "acked twice: {line}");
        lines += 1;
    }
    // Nothing was stored twice: one place per (device, sequence, record_index).
    let mut stored_keys = HashSet::new();
    for records in state.partitions.values() {
        for stored in records {
            assert!(stored_keys.insert((stored.device.clone(), stored.sequence, stored.record_index)), "{stored:?}");
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_reports_json_last_and_every_acked_record_is_stored_once() {
    let directory = tempfile::tempdir().unwrap();
    device_certs(directory.path(), 20);
    let server = TestServer::start(directory.path());
    let acked_log = directory.path().join("acked.log");
    let extra = [
        "--devices",
        "20",
        "--rate",
        "100",
        "--record-bytes",
        "64",
        "--seconds",
        "2",
        "--topic",
        "telemetry,metrics",
        "--threads",
        "2",
        "--devices-per-endpoint",
        "8",
        "--acked-log",
        acked_log.to_str().unwrap(),
    ];
    let output = run(arguments(&server, directory.path(), &extra)).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = last_json(&output);
    for field in ["acked", "errors", "records_per_s", "mb_per_s", "p50_us", "p99_us", "p999_us"] {
        assert!(summary.get(field).is_some(), "{field} missing in {summary}");
    }
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["endpoints"], 3, "{summary}");
    let acked = summary["acked"].as_u64().unwrap();
    assert!(acked >= 20 * 100 * 2 * 9 / 10, "{summary}");
    assert_eq!(check_acked_log(&server, &acked_log) as u64, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_and_backpressure_during_a_run_lose_and_duplicate_nothing() {
    let directory = tempfile::tempdir().unwrap();
    device_certs(directory.path(), 10);
    let server = TestServer::start(directory.path());
    server.faults(|faults| {
        faults.close_after_store = 8;
        faults.backpressure = 8;
        faults.retry_after_ms = 50;
    });
    let acked_log = directory.path().join("acked.log");
    let extra = [
        "--devices",
        "10",
        "--rate",
        "200",
        "--seconds",
        "2",
        "--threads",
        "2",
        "--acked-log",
        acked_log.to_str().unwrap(),
    ];
    let output = run(arguments(&server, directory.path(), &extra)).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = last_json(&output);
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(check_acked_log(&server, &acked_log) as u64, summary["acked"].as_u64().unwrap());
    let state = server.state.lock().unwrap();
    assert_eq!(state.faults.close_after_store, 0, "the faults were hit");
    assert!(state.connections >= 10 + 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_devices_connect_and_hold_their_connections() {
    let directory = tempfile::tempdir().unwrap();
    device_certs(directory.path(), 30);
    let server = TestServer::start(directory.path());
    let extra = ["--devices", "30", "--rate", "0", "--seconds", "1"];
    let output = run(arguments(&server, directory.path(), &extra)).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = last_json(&output);
    assert_eq!((summary["connected"].as_u64(), summary["acked"].as_u64()), (Some(30), Some(0)), "{summary}");
    assert_eq!(server.state.lock().unwrap().connections, 30);
}

#[test]
fn bad_options_exit_2_with_a_clear_message() {
    let directory = tempfile::tempdir().unwrap();
    device_certs(directory.path(), 2);
    let certs = directory.path().to_str().unwrap();
    let cases: [(&[&str], &str); 8] = [
        (&["--certs", certs, "--devices", "0"], "--devices 0"),
        (&["--certs", certs, "--devices", "3"], "1 of 3 device certificates are missing"),
        (&["--certs", "/nonexistent", "--devices", "1"], "weir certs"),
        (&["--certs", certs, "--rate=-1"], "--rate"),
        (&["--certs", certs, "--topic", ""], "--topic"),
        (&["--certs", certs, "--server", "not-an-address"], "invalid value"),
        (
            &["--certs", certs, "--devices", "2", "--stop-devices", "2", "--restart-devices", "1"],
            "--stop-devices and --restart-devices together exceed --devices",
        ),
        (&["--certs", certs, "--seconds", "5", "--stop-after-seconds", "6"], "--stop-after-seconds 6 is not within"),
    ];
    for (arguments, expected) in cases {
        let output = sim().args(arguments).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert!(stderr.contains(expected), "{arguments:?}: {stderr}");
    }
}

/// 1,000 devices on 2 runtime threads (run with --ignored; takes about a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: 1,000 connections"]
async fn a_thousand_devices_share_two_threads() {
    let directory = tempfile::tempdir().unwrap();
    device_certs(directory.path(), 1000);
    let server = TestServer::start(directory.path());
    let acked_log = directory.path().join("acked.log");
    let extra = [
        "--devices",
        "1000",
        "--rate",
        "20",
        "--seconds",
        "10",
        "--threads",
        "2",
        "--acked-log",
        acked_log.to_str().unwrap(),
    ];
    let output = run(arguments(&server, directory.path(), &extra)).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    println!("{}", String::from_utf8_lossy(&output.stdout));
    let summary = last_json(&output);
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["connected"], 1000, "{summary}");
    assert_eq!(check_acked_log(&server, &acked_log) as u64, summary["acked"].as_u64().unwrap());
}
