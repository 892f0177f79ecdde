//! `weir-bench ingest`, the documented command, with small numbers: weir serve (a child
//! process), the device fleet, the raw QUIC ceiling and the idle-connection memory
//! phase all run, and the last stdout line is the JSON summary with figures that agree
//! with each other.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir-bench"))
}

#[test]
fn ingest_runs_weir_and_the_raw_ceiling_with_the_same_fleet_and_prints_one_json_summary() {
    let output = bench()
        .args([
            "ingest",
            "--seconds",
            "1",
            "--devices",
            "4",
            "--rate",
            "200",
            "--idle-connections",
            "40",
            "--partitions",
            "2",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    assert!(stderr.contains("weir serving QUIC on"), "progress on stderr: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let number = |field: &str| summary[field].as_f64().unwrap_or_else(|| panic!("{field} missing: {summary}"));
    // Both fleets connected every device and got acks, without errors.
    assert_eq!(summary["connected"], 4, "{summary}");
    assert_eq!(summary["raw_connected"], 4, "{summary}");
    assert!(number("acked") > 0.0 && number("raw_acked") > 0.0, "{summary}");
    assert_eq!(number("errors"), 0.0, "{summary}");
    assert_eq!(number("raw_errors"), 0.0, "{summary}");
    // The discard server answered at least every record the raw fleet saw acked.
    assert!(number("raw_server_records") >= number("raw_acked"), "{summary}");
    // The ratio is the two throughputs of this run.
    let ratio = number("records_per_s") / number("raw_records_per_s");
    assert!((number("ratio") - ratio).abs() < 0.01, "{summary}");
    assert!(number("mb_per_s") > 0.0 && number("p99_us") > 0.0, "{summary}");
    // Every idle device connected, and the server's RSS was read twice.
    assert_eq!(summary["idle_connected"], 40, "{summary}");
    assert!(number("rss_before_bytes") > 0.0 && number("rss_after_bytes") > 0.0, "{summary}");
    assert!(summary["rss_bytes_per_idle_connection"].is_u64(), "{summary}");
    assert!(number("connections_max") >= 40.0, "{summary}");
}

/// The closed loop (issue 14): every send is one frame of exactly the asked records, at
/// most one in flight per device, so frames x records = acked, and each frame's round
/// trip is reported for weir and the ceiling.
#[test]
fn ingest_closed_loop_sends_frames_of_the_asked_size_and_reports_their_round_trip() {
    let output = bench()
        .args([
            "ingest",
            "--seconds",
            "1",
            "--devices",
            "3",
            "--closed-loop-frames",
            "1",
            "--records-per-frame",
            "7",
            "--idle-connections",
            "4",
            "--partitions",
            "2",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let closed = &summary["closed_loop"];
    let number = |value: &serde_json::Value| value.as_u64().unwrap_or_else(|| panic!("not a number in {summary}"));
    assert_eq!(number(&closed["records_per_frame"]), 7, "{summary}");
    assert_eq!(number(&closed["frames_in_flight"]), 1, "{summary}");
    assert_eq!(number(&summary["errors"]), 0, "{summary}");
    assert!(number(&closed["frames"]) > 0 && number(&closed["raw_frames"]) > 0, "{summary}");
    assert_eq!(number(&closed["frames"]) * 7, number(&summary["acked"]), "{summary}");
    assert_eq!(number(&closed["raw_frames"]) * 7, number(&summary["raw_acked"]), "{summary}");
    // The discard server saw exactly one frame per acked send: no linger merged two.
    assert_eq!(number(&summary["raw_server_frames"]), number(&closed["raw_frames"]), "{summary}");
    let (p50, p99) = (number(&closed["frame_rtt_p50_us"]), number(&closed["frame_rtt_p99_us"]));
    assert!(0 < p50 && p50 <= p99 && p99 <= number(&closed["frame_rtt_p999_us"]), "{summary}");
    assert!(summary["offered_records_per_s"].is_null(), "a closed loop offers no rate: {summary}");
}

#[test]
fn ingest_refuses_bad_flags_with_exit_code_2_and_names_each_flag() {
    let output = bench()
        .args([
            "ingest",
            "--cores",
            "0",
            "--devices",
            "0",
            "--record-bytes",
            "0",
            "--closed-loop-frames",
            "0",
            "--records-per-frame",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for flag in ["--cores 0", "--devices 0", "--record-bytes 0", "--closed-loop-frames 0", "--records-per-frame 0"] {
        assert!(stderr.contains(flag), "{flag} not named: {stderr}");
    }
}
