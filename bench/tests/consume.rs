//! `weir-bench consume` end to end at tiny sizes: the documented command runs its three
//! phases against a real weir and tansu, and the bench's own checks hold (every probe
//! record reached the tailing consumer, the raw read counted exactly the stored
//! records, tansu got a copy of each), and the tailing consumer kept up; its last line is
//! the JSON object RESULTS.md quotes. Speed is not asserted (a benchmark, not a test).
//!
//! Needs `tools/install-broker` (tansu and confluent-kafka in ./.venv).

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_weir-bench");

#[test]
fn consume_bench_runs_its_three_phases_and_reports_every_figure() {
    let output = Command::new(BENCH)
        .args(["consume", "--rounds", "1", "--backlog-records", "3000", "--devices", "2", "--rate", "20"])
        .args(["--tail-seconds", "2", "--probe-interval-ms", "20"])
        .args(["--ingest-devices", "4", "--ingest-rate", "300", "--ingest-seconds", "1"])
        .output()
        .expect("weir-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "weir-bench consume failed ({}):\n{stdout}\n{stderr}", output.status);
    let last = stdout.lines().last().expect("some output");
    let report: serde_json::Value = serde_json::from_str(last).expect("the last line is one JSON object");
    let backlog = &report["backlog"];
    assert!(backlog["records"].as_u64().unwrap() >= 3000, "{last}");
    for key in ["weir_records_per_s", "broker_records_per_s", "raw_records_per_s", "ratio_vs_broker", "ratio_vs_raw"] {
        assert!(backlog[key].as_f64().unwrap() > 0.0, "backlog.{key} in {last}");
    }
    assert_eq!(backlog["weir_rounds"].as_array().map(Vec::len), Some(1), "{last}");
    let tail = &report["tail"];
    // 2 s of one probe every 20 ms, each acked before the next: tens of them.
    assert!(tail["probes"].as_u64().unwrap() >= 10, "{last}");
    for key in ["latency_us_p50", "latency_us_p99", "latency_us_p999"] {
        assert!(tail[key].as_u64().is_some(), "tail.{key} in {last}");
    }
    assert!(tail["latency_us_p50"].as_u64() <= tail["latency_us_p99"].as_u64(), "{last}");
    assert!(tail["background_records_acked"].as_u64().unwrap() > 0, "{last}");
    let ingest = &report["ingest"];
    for key in ["with_tail_records_per_s", "without_records_per_s", "ratio"] {
        assert!(ingest[key].as_f64().unwrap() > 0.0, "ingest.{key} in {last}");
    }
    // The tailing consumer read at least every record written while it tailed.
    assert!(ingest["tail_read_fraction_min"].as_f64().unwrap() >= 1.0, "{last}");
}

#[test]
fn consume_bench_refuses_bad_flags_with_their_names() {
    let output = Command::new(BENCH)
        .args(["consume", "--rounds", "0", "--partitions", "999", "--phases", "backlog,nope"])
        .output()
        .expect("weir-bench runs");
    assert_eq!(output.status.code(), Some(2), "bad flags exit 2");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for flag in ["--rounds 0", "--partitions 999", "--phases nope"] {
        assert!(stderr.contains(flag), "{flag} is named: {stderr}");
    }
}
