//! `weir-bench ship` end to end with a small backlog: the documented command runs, the
//! drain it times is a correct one (the bench itself checks the upstream high
//! watermarks and reads sampled records back with confluent-kafka), and its last line
//! is the JSON object RESULTS.md quotes. Speed is not asserted (a benchmark, not a test).
//!
//! Needs `tools/install-broker` (tansu and confluent-kafka in ./.venv).

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_weir-bench");

#[test]
fn ship_bench_drains_a_small_backlog_and_reports_verified_figures() {
    let data_dir = tempfile::tempdir().unwrap();
    let output = Command::new(BENCH)
        .args(["ship", "--backlog-bytes", "6000000", "--samples", "5", "--data-dir"])
        .arg(data_dir.path())
        .output()
        .expect("weir-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "weir-bench ship failed ({}):\n{stdout}\n{stderr}", output.status);
    let last = stdout.lines().last().expect("some output");
    let report: serde_json::Value = serde_json::from_str(last).expect("the last line is one JSON object");
    for key in [
        "drain_mb_per_s",
        "ceiling_mb_per_s",
        "ratio",
        "drain_window_mb_per_s_p50",
        "ceiling_window_mb_per_s_p50",
        "records",
        "payload_bytes",
        "verified_records",
        "verified_samples",
        "ceiling_records",
        "cores",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {last}");
    }
    let records = report["records"].as_u64().unwrap();
    assert!(report["payload_bytes"].as_u64().unwrap() >= 6_000_000, "the backlog is at least what was asked: {last}");
    assert_eq!(report["verified_records"].as_u64(), Some(records), "{last}");
    assert_eq!(report["ceiling_records"].as_u64(), Some(records), "the ceiling sent the same records: {last}");
    // 5 runs of 20 records, the first and the last included.
    assert_eq!(report["verified_samples"].as_u64(), Some(100), "{last}");
    assert!(report["drain_mb_per_s"].as_f64().unwrap() > 0.0 && report["ratio"].as_f64().unwrap() > 0.0, "{last}");
    // The partition was kept in the given data dir, with its ship state at the log's end.
    assert!(data_dir.path().join("ship-0/ship.state").exists());
}

#[test]
fn ship_bench_refuses_bad_flags_with_their_names() {
    let output = Command::new(BENCH)
        .args(["ship", "--backlog-bytes", "5", "--cores", "999", "--batch-bytes-max", "10"])
        .output()
        .expect("weir-bench runs");
    assert_eq!(output.status.code(), Some(2), "bad flags exit 2");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for flag in ["--backlog-bytes 5", "--cores 999", "--batch-bytes-max"] {
        assert!(stderr.contains(flag), "{flag} is named: {stderr}");
    }
}
