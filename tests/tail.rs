//! `weir tail` against a real `weir serve` written to by weir-sim: it prints exactly the
//! records weir-sim saw acknowledged — each once, at its acknowledged partition and
//! offset, with the device and sequence weir stamped — while the server runs; `--from`,
//! `--partition` and `--limit` select; `--follow` prints new records as they become
//! durable; bad arguments are refused with exit 2.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;
#[path = "common/sim.rs"]
mod sim;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use appliance::Appliance;
use server::weir;
use sim::Place;

/// 4 weir-sim devices writing 40-byte records for `seconds`: every record acknowledged.
fn simulate(appliance: &Appliance, acked_log: &Path, seconds: &str) -> BTreeSet<Place> {
    let args = ["--devices", "4", "--rate", "50", "--seconds", seconds, "--record-bytes", "40"];
    sim::simulate(&appliance.quic, &appliance.certs(), acked_log, &args)
}

fn place(line: &str) -> Place {
    let record: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"));
    assert_eq!(record["topic"], "telemetry");
    (
        record["device"].as_str().unwrap().to_owned(),
        record["sequence"].as_str().unwrap().parse().unwrap(),
        record["partition"].as_u64().unwrap() as u32,
        record["offset"].as_i64().unwrap(),
    )
}

fn tail(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output = weir().arg("tail").args(args).arg("--config").arg(config).output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn tail_prints_exactly_the_records_weir_sim_saw_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    sim::sim_certs(&root.join("certs"), 4);
    let appliance = Appliance::start(root, "", "", &[("telemetry", 2)], 1);
    let config = root.join("weir.toml");
    let acked = simulate(&appliance, &root.join("acked-1.txt"), "2");
    assert!(acked.len() >= 100, "weir-sim acked {} records", acked.len());

    // While the server runs: every durable record, and nothing else.
    let (code, stdout, stderr) = tail(&config, &["telemetry", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let printed: Vec<Place> = stdout.lines().map(place).collect();
    assert_eq!(printed.len(), acked.len(), "each record printed once");
    assert_eq!(printed.iter().cloned().collect::<BTreeSet<_>>(), acked, "exactly the acked records, where acked");

    // The text form carries the same fields.
    let (code, text, _) = tail(&config, &["telemetry", "--partition", "1", "--from", "3", "--limit", "2"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, offset) in lines.iter().zip(3..) {
        let (device, sequence, _, _) = acked.iter().find(|place| place.2 == 1 && place.3 == offset).unwrap();
        assert!(line.starts_with(&format!("telemetry-1 {offset} ")), "{line}");
        assert!(line.contains(&format!(" device={device} seq={sequence} key=")), "{line}");
    }

    // --follow prints what is acknowledged after it started, then is stopped by us.
    let end_0 = acked.iter().filter(|place| place.2 == 0).map(|place| place.3 + 1).max().unwrap();
    let mut follower = weir()
        .args(["tail", "telemetry", "--json", "--follow", "--partition", "0", "--from", &end_0.to_string(), "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let more = simulate(&appliance, &root.join("acked-2.txt"), "1");
    let expected: BTreeSet<Place> = more.iter().filter(|place| place.2 == 0 && place.3 >= end_0).cloned().collect();
    assert!(!expected.is_empty());
    let (sender, receiver) = std::sync::mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut followed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while followed.len() < expected.len() && Instant::now() < deadline {
        if let Ok(line) = receiver.recv_timeout(Duration::from_millis(100)) {
            followed.push(place(&line));
        }
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
    assert_eq!(followed.len(), expected.len(), "followed {followed:?}");
    assert_eq!(followed.into_iter().collect::<BTreeSet<_>>(), expected);

    // Bad arguments: exit 2 with the reason.
    let (code, _, stderr) = tail(&config, &["nope"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no topic \"nope\"") && stderr.contains("telemetry"), "{stderr}");
    let (code, _, stderr) = tail(&config, &["telemetry", "--partition", "2"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("partitions 0..2"), "{stderr}");
    let (code, _, _) = tail(&config, &["telemetry", "--limit", "0"]);
    assert_eq!(code, Some(2));
    appliance.stop();
}
