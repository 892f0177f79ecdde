//! `partitioning = "by-key"`: a real `weir serve` with devices writing keyed records
//! over QUIC (aioquic, frames from docs/PROTOCOL.md) and shipping to tansu.
//! - Every acknowledged record reaches the upstream partition that Kafka's own
//!   partitioner picks for its key — computed by kafka-python's murmur2, an
//!   implementation weir does not use — exactly once, in acknowledged order.
//! - A by-key topic whose upstream topic has another partition count is not shipped:
//!   /status shows the shipper retrying with the partition-count error, and nothing
//!   reaches that topic.

#[path = "common/broker.rs"]
mod broker;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use broker::{read_upstream, Tansu};
use server::{partition, weir, Server};

const PARTITIONS: u32 = 3;
const FRAMES: usize = 6;
const RECORDS: usize = 40;

/// (edge partition, offset, key) of every acknowledged record of one device run.
fn device(root: &Path, server: &Server, topic: &str, prefix: &str, sequence: u64) -> Vec<(u32, i64, Vec<u8>)> {
    let certs = root.join("certs");
    let output = server
        .aioquic_device(&certs, "dev-1")
        .args(["--topic", topic, "--frames", &FRAMES.to_string(), "--records", &RECORDS.to_string()])
        .args(["--sequence", &sequence.to_string(), "--key-prefix", prefix])
        .output()
        .unwrap();
    assert!(output.status.success(), "device failed: {}", String::from_utf8_lossy(&output.stderr));
    let mut acked = Vec::new();
    for (frame, line) in String::from_utf8_lossy(&output.stdout).lines().enumerate() {
        let answer: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(answer["kind"], "ack", "{answer}");
        for part in answer["parts"].as_array().unwrap() {
            let edge_partition = part["partition"].as_u64().unwrap() as u32;
            for index in 0..part["record_count"].as_u64().unwrap() {
                let record = part["first_record"].as_u64().unwrap() + index;
                let offset = part["base_offset"].as_i64().unwrap() + index as i64;
                acked.push((edge_partition, offset, format!("{prefix}{frame}-{record}").into_bytes()));
            }
        }
    }
    assert_eq!(acked.len(), FRAMES * RECORDS);
    acked
}

/// The partition Kafka's default partitioner gives each key, by kafka-python.
fn kafka_partitions(keys: &[Vec<u8>], partitions: u32) -> Vec<u32> {
    let script = format!(
        "import sys\nfrom kafka.partitioner.default import murmur2\nfor line in sys.stdin:\n    \
         print((murmur2(bytes.fromhex(line.strip())) & 0x7fffffff) % {partitions})\n"
    );
    let mut child = Command::new(broker::python())
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for key in keys {
        writeln!(stdin, "{}", key.iter().map(|byte| format!("{byte:02x}")).collect::<String>()).unwrap();
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().lines().map(|line| line.parse().unwrap()).collect()
}

#[test]
fn by_key_puts_every_record_where_kafkas_partitioner_would_exactly_once() {
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path();
    let tansu = Tansu::start();
    tansu.create_topic("central", PARTITIONS);
    tansu.create_topic("narrow", PARTITIONS - 1);
    let output = weir().args(["certs", "--device", "dev-1", "--dir"]).arg(root.join("certs")).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let config = root.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[engine]
io_memory_bytes = "8 MiB"
[admin]
listen = "127.0.0.1:0"
[kafka_api]
listen = "127.0.0.1:0"
[quic]
listen = "127.0.0.1:0"
certs_dir = "{certs}"
generate_dev_certs = false
[upstream]
enabled = true
bootstrap_servers = ["{broker}"]
request_timeout_ms = 5000
connect_timeout_ms = 500
retry_backoff_ms_min = 20
retry_backoff_ms_max = 200
[[upstream.topics]]
edge = "telemetry"
upstream = "central"
partitioning = "by-key"
[[upstream.topics]]
edge = "mismatched"
upstream = "narrow"
partitioning = "by-key"
[[topics]]
name = "telemetry"
partitions = {PARTITIONS}
[[topics]]
name = "mismatched"
partitions = {PARTITIONS}
"#,
            data = root.join("data").display(),
            certs = root.join("certs").display(),
            broker = tansu.address(),
        ),
    )
    .unwrap();
    let server = Server::start(&config, 2);
    let mut acked = device(root, &server, "telemetry", "sensor-", 1);
    acked.extend(device(root, &server, "telemetry", "meter-", 100));
    let mismatched = device(root, &server, "mismatched", "m-", 200);

    // Edge routing already follows Kafka's partitioner.
    let keys: Vec<Vec<u8>> = acked.iter().map(|(_, _, key)| key.clone()).collect();
    let expected = kafka_partitions(&keys, PARTITIONS);
    for ((edge_partition, _, key), kafka) in acked.iter().zip(&expected) {
        assert_eq!(*edge_partition, *kafka, "key {}", String::from_utf8_lossy(key));
    }
    let used: std::collections::BTreeSet<u32> = expected.iter().copied().collect();
    assert_eq!(used.len(), PARTITIONS as usize, "the keys spread over every partition");

    // Upstream: per partition, exactly the acknowledged records of that partition, in
    // offset order, and each where Kafka's partitioner puts it.
    let mut by_partition: BTreeMap<u32, Vec<(i64, Vec<u8>)>> = BTreeMap::new();
    for (edge_partition, offset, key) in &acked {
        by_partition.entry(*edge_partition).or_default().push((*offset, key.clone()));
    }
    for (upstream_partition, mut local) in by_partition {
        local.sort();
        let upstream =
            read_upstream(&tansu.address(), "central", upstream_partition as i32, local.len(), Duration::from_secs(60));
        let upstream_keys: Vec<Vec<u8>> = upstream.iter().map(|record| record.key.clone().unwrap()).collect();
        let local_keys: Vec<Vec<u8>> = local.into_iter().map(|(_, key)| key).collect();
        assert_eq!(upstream_keys, local_keys, "upstream partition {upstream_partition}: exactly once, in order");
        for kafka in kafka_partitions(&upstream_keys, PARTITIONS) {
            assert_eq!(kafka, upstream_partition);
        }
    }

    // The mismatched topic: the shipper names the partition count and ships nothing.
    let status = server.wait_status(Duration::from_secs(30), "the mismatch is reported", |status| {
        (0..u64::from(PARTITIONS)).all(|p| {
            let shipper = &partition(status, "mismatched", p)["shipper"];
            shipper["state"] == "retrying"
                && shipper["problem"].as_str().is_some_and(|problem| problem.contains("needs exactly 3"))
        })
    });
    let problem = partition(&status, "mismatched", 0)["shipper"]["problem"].as_str().unwrap().to_owned();
    assert!(problem.contains("topic narrow has 2 partitions"), "{problem}");
    assert!(!mismatched.is_empty());
    for upstream_partition in 0..(PARTITIONS - 1) as i32 {
        let upstream = read_upstream(&tansu.address(), "narrow", upstream_partition, 0, Duration::from_secs(20));
        assert!(upstream.is_empty(), "nothing shipped to narrow/{upstream_partition}");
    }
    assert_eq!(server.stop(), Some(0));
}
