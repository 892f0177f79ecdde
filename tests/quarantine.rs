//! A partition with corruption before its tail stops `weir serve` (exit 3); with
//! `--quarantine TOPIC-P` the operator serves the healthy partitions meanwhile. The
//! quarantined partition is not opened (not a byte of it changes), devices writing to
//! it are answered StorageFailed with a retry-after and the reason, the other
//! partitions take and acknowledge records, `/health` is degraded naming it, `/status`
//! and `weir status` list it, and a `--quarantine` naming no partition is refused.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;

use std::path::Path;

use appliance::{make_certs, Appliance};
use common::read_partition;
use server::{weir, Server};

fn answers(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(output.status.success(), "device failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn files_of(directory: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn serve_with_a_quarantined_partition_serves_the_others_and_leaves_it_untouched() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    make_certs(&root.join("certs"), &["dev-1"]);
    let appliance = Appliance::start(root, "", "", &[("telemetry", 2)], 1);
    let first = answers(&appliance.aioquic("dev-1", &["--frames", "20", "--records", "1", "--key-prefix", "a"]));
    assert!(first.iter().all(|answer| answer["kind"] == "ack"));
    appliance.stop();
    let config = root.join("weir.toml");
    let broken = root.join("data/telemetry-0");
    let segment = broken.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    let second_batch = weir::core::log::batch::check_batch(&bytes).unwrap().total_bytes();
    bytes[second_batch + 70] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();
    let kept_1 = read_partition(root.join("data/telemetry-1")).len();
    assert!(kept_1 > 0 && kept_1 < 20, "both partitions hold records");

    let refused = weir().args(["serve", "--cores", "1", "--config"]).arg(&config).output().unwrap();
    assert_eq!(refused.status.code(), Some(3), "{}", String::from_utf8_lossy(&refused.stderr));
    let unknown = weir().args(["serve", "--quarantine", "telemetry-7", "--config"]).arg(&config).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("--quarantine telemetry-7: no such partition"));

    let before = files_of(&broken);
    let server = Server::start_with(&config, 1, &["--quarantine", "telemetry-0"]);
    let (code, body) = server.get("/health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("quarantined") && body.contains("telemetry-0"), "{body}");
    let status = server.status();
    assert_eq!(status["quarantined"], serde_json::json!(["telemetry-0"]), "{status:#}");
    let text = weir().args(["status", "--admin", &server.admin, "--config"]).arg(&config).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("telemetry-0              QUARANTINED"));

    // One frame per stream, so a refused frame holds nothing up behind it.
    let quic = server.quic.clone().unwrap();
    let appliance = Appliance { server, quic, root: root.to_owned() };
    let mut acked_1 = 0;
    let mut refused_0 = 0;
    for frame in 0..12 {
        let key = format!("b{frame}-");
        let answer = &answers(&appliance.aioquic(
            "dev-1",
            &["--frames", "1", "--records", "1", "--key-prefix", &key, "--sequence", &(100 + frame).to_string()],
        ))[0];
        if answer["kind"] == "ack" {
            assert!(answer["parts"].as_array().unwrap().iter().all(|part| part["partition"] == 1), "{answer}");
            acked_1 += 1;
        } else {
            assert_eq!(answer["error_code"], 7, "StorageFailed: {answer}");
            assert!(answer["message"].as_str().unwrap().contains("telemetry-0 is quarantined"), "{answer}");
            assert!(answer["retry_after_ms"].as_u64().unwrap() > 0, "{answer}");
            refused_0 += 1;
        }
    }
    assert!(acked_1 > 0 && refused_0 > 0, "acked {acked_1} on telemetry-1, refused {refused_0} for telemetry-0");
    appliance.stop();
    assert_eq!(files_of(&broken), before, "the quarantined partition was not touched");
    assert_eq!(read_partition(root.join("data/telemetry-1")).len(), kept_1 + acked_1);
}
