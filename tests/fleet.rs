//! A device fleet end to end on loopback: 1,000 simulated devices (weir-sim, each with
//! its own certificate and QUIC connection) write for a bounded time to a real
//! `weir serve` on two cores; then the log itself is read and every acknowledged record
//! must be there exactly once, at its acknowledged offset, in per-device order.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{header, read_partition};
use weir::core::log::batch::Record;

fn binary(name: &str) -> PathBuf {
    let weir = PathBuf::from(env!("CARGO_BIN_EXE_weir"));
    let path = weir.with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (tools/test does)", path.display());
    path
}

#[test]
fn a_thousand_devices_write_and_every_acked_record_is_in_the_log_exactly_once_in_order() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let output = Command::new(binary("weir"))
        .args(["certs", "--device-count", "1000", "--device-prefix", "sim-", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let config = root.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\ngenerate_dev_certs = false\n[[topics]]\nname = \"telemetry\"\npartitions = 4\n",
            root.path().join("data").display(),
            certs.display()
        ),
    )
    .unwrap();
    let mut weir = Command::new(binary("weir"))
        .args(["serve", "--cores", "2", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(weir.stderr.take().unwrap());
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut quic = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Ok(line) = receiver.recv_timeout(Duration::from_millis(100)) else { continue };
        if let Some(at) = line.find("quic=") {
            quic = Some(line[at + 5..].split_whitespace().next().unwrap().to_owned());
        }
        if line.contains("weir serving") {
            break;
        }
    }
    let quic = quic.expect("weir started");
    let acked_log = root.path().join("acked.txt");
    let sim = Command::new(binary("weir-sim"))
        .args([
            "--server",
            &quic,
            "--devices",
            "1000",
            "--rate",
            "10",
            "--seconds",
            "5",
            "--record-bytes",
            "100",
            "--threads",
            "2",
            // Pipelined: weir stores a stream's frames only in order and refuses the
            // frames behind a failed one, and the device resends in sequence order.
            "--frames-in-flight",
            "4",
            "--certs",
        ])
        .arg(&certs)
        .arg("--acked-log")
        .arg(&acked_log)
        .output()
        .unwrap();
    Command::new("kill").arg("-INT").arg(weir.id().to_string()).status().unwrap();
    let status = weir.wait().unwrap();
    assert!(sim.status.success(), "weir-sim failed: {}", String::from_utf8_lossy(&sim.stderr));
    assert_eq!(status.code(), Some(0), "weir stops cleanly");
    let stdout = String::from_utf8_lossy(&sim.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["connected"], 1000, "{summary}");
    let acked_count = summary["acked"].as_u64().unwrap();
    assert!(acked_count >= 10_000, "too little traffic to mean anything: {summary}");

    let logs: HashMap<u64, Vec<(i64, Record)>> = (0..4u64)
        .map(|partition| (partition, read_partition(root.path().join(format!("data/telemetry-{partition}")))))
        .collect();
    // Every record in the log: its value names (device, n); none appears twice; each
    // device's n grows with the offset.
    let mut seen = HashSet::new();
    let mut last_n: HashMap<String, u64> = HashMap::new();
    for records in logs.values() {
        for (offset, record) in records {
            let device = header(record, "weir.device").expect("stamped device").to_owned();
            assert_eq!(record.key.as_deref(), Some(device.as_bytes()));
            let value = std::str::from_utf8(record.value.as_deref().unwrap()).unwrap();
            let mut fields = value.split(' ');
            assert_eq!(fields.next(), Some(device.as_str()));
            let n: u64 = fields.next().unwrap().parse().unwrap();
            assert!(seen.insert((device.clone(), n)), "({device}, {n}) stored twice (offset {offset})");
            if let Some(previous) = last_n.insert(device.clone(), n) {
                assert!(previous < n, "{device}: record {n} stored after {previous}");
            }
        }
    }
    // Every acked record is where its ack says.
    let acked = std::fs::read_to_string(&acked_log).unwrap();
    let mut acked_lines = 0u64;
    for line in acked.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (device, sequence, partition, offset) =
            (fields[0], fields[1], fields[2].parse::<u64>().unwrap(), fields[3].parse::<usize>().unwrap());
        let (stored_offset, record) = &logs[&partition][offset];
        assert_eq!(*stored_offset as usize, offset);
        assert_eq!(header(record, "weir.device"), Some(device), "acked offset {offset} of partition {partition}");
        assert_eq!(header(record, "weir.sequence"), Some(sequence));
        acked_lines += 1;
    }
    assert_eq!(acked_lines, acked_count);
    let stored: usize = logs.values().map(Vec::len).sum();
    assert_eq!(stored as u64, acked_count, "nothing stored that was not acked (the fleet drained before weir stopped)");
}
