//! A full disk under devices writing over QUIC, with the upstream down: a real
//! `weir serve` whose data directory is a small loop-mounted ext4 filesystem, an
//! independent QUIC device (aioquic, frames from docs/PROTOCOL.md), tansu started only
//! once the disk is full.
//! - `block`: once the disk is full every frame is refused with DiskFull and a
//!   retry-after; the log holds exactly the acknowledged records; weir restarts on the
//!   full disk; when the broker comes up everything acknowledged reaches it exactly
//!   once, retention frees the disk and devices are accepted again.
//! - `drop-oldest`: every frame is acknowledged; /status and the log name the dropped
//!   offset ranges; exactly those records are missing from the log, every other
//!   acknowledged record is there, and exactly those reach the broker, once each.

#[path = "common/broker.rs"]
mod broker;
#[path = "common/ext4.rs"]
mod ext4;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use broker::{free_port, read_upstream, Tansu};
use ext4::Ext4;
use server::{partition, weir, Server};
use weir::core::log::batch;

struct Setup {
    _root: tempfile::TempDir,
    _disk: Ext4,
    root: PathBuf,
    data_dir: PathBuf,
    config: PathBuf,
    broker_port: u16,
}

fn setup(policy: &str) -> Setup {
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path().to_owned();
    let disk = Ext4::mount(&root.join("disk.img"), "12M", &root.join("mnt"));
    let data_dir = disk.point.join("data");
    let certs = root.join("certs");
    let output = weir().args(["certs", "--device", "dev-1", "--dir"]).arg(&certs).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let broker_port = free_port();
    let config = root.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[engine]
io_memory_bytes = "8 MiB"
[log]
segment_bytes_max = "512 KiB"
index_interval_bytes = "16 KiB"
preallocate_bytes = "512 KiB"
flush_bytes_max = "256 KiB"
partition_bytes_max = "1 MiB"
disk_full_policy = "{policy}"
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
bootstrap_servers = ["127.0.0.1:{broker_port}"]
client_id = "weir-disk-full-test"
request_timeout_ms = 5000
connect_timeout_ms = 500
retry_backoff_ms_min = 20
retry_backoff_ms_max = 200
cursor_persist_interval_ms = 100
[[topics]]
name = "telemetry"
partitions = 1
"#,
            data = data_dir.display(),
            certs = certs.display()
        ),
    )
    .unwrap();
    Setup { _root: root_dir, _disk: disk, root, data_dir, config, broker_port }
}

/// What a device invocation got back: per frame, an ack's (offset, key) list or the error.
enum Answer {
    Acked(Vec<(i64, Vec<u8>)>),
    Refused { code: u64, retry_after_ms: u64, message: String },
}

const FRAMES: usize = 20;
const RECORDS: usize = 500;

/// Sends `FRAMES` frames of `RECORDS` records (keys `<prefix><frame>-<index>`), with
/// sequences from `sequence`.
fn device(setup: &Setup, server: &Server, prefix: &str, sequence: u64) -> Vec<Answer> {
    let certs = setup.root.join("certs");
    let output = server
        .aioquic_device(&certs, "dev-1")
        .args(["--frames", &FRAMES.to_string(), "--records", &RECORDS.to_string()])
        .args(["--sequence", &sequence.to_string(), "--key-prefix", prefix])
        .output()
        .unwrap();
    assert!(output.status.success(), "device failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .enumerate()
        .map(|(frame, line)| {
            let answer: serde_json::Value = serde_json::from_str(line).unwrap();
            if answer["kind"] == "ack" {
                let mut records = Vec::new();
                for part in answer["parts"].as_array().unwrap() {
                    assert_eq!(part["partition"], 0);
                    for index in 0..part["record_count"].as_u64().unwrap() {
                        let record = part["first_record"].as_u64().unwrap() + index;
                        let offset = part["base_offset"].as_i64().unwrap() + index as i64;
                        records.push((offset, format!("{prefix}{frame}-{record}").into_bytes()));
                    }
                }
                assert_eq!(records.len(), RECORDS);
                Answer::Acked(records)
            } else {
                Answer::Refused {
                    code: answer["error_code"].as_u64().unwrap(),
                    retry_after_ms: answer["retry_after_ms"].as_u64().unwrap(),
                    message: answer["message"].as_str().unwrap().to_owned(),
                }
            }
        })
        .collect()
}

/// offset -> key of every record in the partition's segment files, walked raw.
fn log_on_disk(directory: &Path) -> BTreeMap<i64, Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    files.sort();
    let mut records = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let mut at = 0usize;
        while at + 12 <= bytes.len() {
            let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            if length == 0 {
                break; // preallocated zeros after the data
            }
            let stored = bytes::Bytes::copy_from_slice(&bytes[at..at + 12 + length as usize]);
            batch::check_batch(&stored).unwrap_or_else(|error| panic!("{}: byte {at}: {error}", file.display()));
            for record in batch::records(&stored).unwrap() {
                let record = record.unwrap();
                let key = record.to_record(&stored).key.unwrap().to_vec();
                assert!(records.insert(record.offset, key).is_none(), "offset {} twice", record.offset);
            }
            at += 12 + length as usize;
        }
    }
    records
}

fn keys_upstream(tansu: &Tansu, expect: usize) -> Vec<Vec<u8>> {
    read_upstream(&tansu.address(), "telemetry", 0, expect, Duration::from_secs(60))
        .into_iter()
        .map(|record| record.key.unwrap())
        .collect()
}

fn wait_shipped(server: &Server) -> serde_json::Value {
    server.wait_status(Duration::from_secs(90), "the backlog shipped", |status| {
        let p0 = partition(status, "telemetry", 0);
        p0["shipper"]["state"] == "running"
            && p0["shipper"]["lag_records"] == 0
            && p0["shipper"]["cursor_offset"] == p0["log_end_offset"]
    })
}

#[test]
fn block_refuses_new_data_with_retry_after_and_loses_nothing_acked() {
    let setup = setup("block");
    let server = Server::start(&setup.config, 1);
    let mut acked: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
    let mut refused = 0;
    let mut round = 0u64;
    while refused < FRAMES {
        assert!(round < 40, "the disk never filled");
        for answer in device(&setup, &server, &format!("b{round}-"), 1 + round * 1000) {
            match answer {
                Answer::Acked(records) => {
                    assert_eq!(refused, 0, "once refused, later frames of a full disk are refused too");
                    acked.extend(records);
                }
                Answer::Refused { code, retry_after_ms, message } => {
                    assert_eq!(code, 6, "DiskFull: {message}");
                    assert!(retry_after_ms > 0, "a retry-after comes with DiskFull");
                    // The first refusal says why; the frames pipelined behind it on the
                    // same stream are refused with the same code and retry-after, and say
                    // they wait for the earlier one (so a resend keeps the device's order).
                    assert!(
                        message.contains("full") || (refused > 0 && message.contains("earlier frame")),
                        "{message}"
                    );
                    refused += 1;
                }
            }
        }
        round += 1;
    }
    assert!(acked.len() > 10_000, "only {} records fitted", acked.len());
    let status = server.status();
    let p0 = partition(&status, "telemetry", 0);
    assert!(p0["disk_full_rejections"].as_u64().unwrap() >= 1, "{p0}");
    assert_eq!(p0["dropped_records"], 0);
    assert_eq!(p0["log_end_offset"].as_u64().unwrap(), acked.len() as u64);
    assert_eq!(p0["shipper"]["lag_records"].as_u64().unwrap(), acked.len() as u64);
    assert_eq!(server.stop(), Some(0), "a clean stop on a full disk");
    // The log holds exactly the acknowledged records at their acknowledged offsets.
    let directory = setup.data_dir.join("telemetry-0");
    assert_eq!(log_on_disk(&directory), acked);

    // weir starts again on the full disk and still refuses with retry-after.
    let server = Server::start(&setup.config, 1);
    for answer in device(&setup, &server, "again-", 100_001) {
        assert!(matches!(answer, Answer::Refused { code: 6, retry_after_ms: 1.., .. }), "still full");
    }
    // The broker comes up: the backlog drains, retention frees the disk.
    let tansu = Tansu::start_on(setup.broker_port, setup.broker_port);
    tansu.create_topic("telemetry", 1);
    wait_shipped(&server);
    let expected: Vec<Vec<u8>> = acked.values().cloned().collect();
    // Retention deletes shipped segments as each newer cursor becomes durable, a few
    // at a time: wait for it to bring the partition under 2 MiB.
    server.wait_status(Duration::from_secs(30), "shipped segments deleted, the disk freed", |status| {
        let p0 = partition(status, "telemetry", 0);
        p0["log_start_offset"].as_i64().unwrap() > 0 && p0["disk_bytes"].as_u64().unwrap() <= 2 << 20
    });
    let mut accepted = 0;
    for answer in device(&setup, &server, "after-", 200_001) {
        let Answer::Acked(records) = answer else { panic!("refused after the disk was freed") };
        accepted += records.len();
        acked.extend(records);
    }
    assert_eq!(accepted, FRAMES * RECORDS);
    wait_shipped(&server);
    assert_eq!(server.stop(), Some(0));
    let all: Vec<Vec<u8>> = acked.values().cloned().collect();
    assert_eq!(&all[..expected.len()], &expected[..]);
    assert_eq!(keys_upstream(&tansu, all.len()), all, "upstream holds every acked record exactly once, in order");
}

/// `first_offset=.. last_offset=..` of every "unshipped segment dropped" log line.
fn dropped_in_log(server: &Server) -> Vec<(i64, i64)> {
    let field = |line: &str, key: &str| -> i64 {
        let at = line.find(key).unwrap() + key.len();
        line[at..].split(|c: char| !c.is_ascii_digit() && c != '-').next().unwrap().parse().unwrap()
    };
    server
        .log_lines()
        .iter()
        .filter(|line| line.contains("unshipped segment dropped"))
        .map(|line| (field(line, "first_offset="), field(line, "last_offset=")))
        .collect()
}

#[test]
fn drop_oldest_keeps_accepting_and_reports_exactly_what_it_dropped() {
    let setup = setup("drop-oldest");
    let server = Server::start(&setup.config, 1);
    let mut acked: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
    let mut round = 0u64;
    loop {
        for answer in device(&setup, &server, &format!("d{round}-"), 1 + round * 1000) {
            match answer {
                Answer::Acked(records) => acked.extend(records),
                Answer::Refused { code, message, .. } => panic!("drop-oldest refused a frame ({code}): {message}"),
            }
        }
        round += 1;
        let dropped = partition(&server.status(), "telemetry", 0)["dropped_segments"].as_u64().unwrap();
        if dropped >= 3 {
            break;
        }
        assert!(round < 60, "nothing dropped after {round} rounds");
    }
    // What was dropped: /status and the log agree, and the ranges run from 0 to the
    // log's start without gaps.
    let status = server.status();
    let p0 = partition(&status, "telemetry", 0);
    let ranges: Vec<(i64, i64)> = p0["dropped_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|range| (range["first_offset"].as_i64().unwrap(), range["last_offset"].as_i64().unwrap()))
        .collect();
    assert_eq!(dropped_in_log(&server), ranges);
    assert_eq!(ranges.first().map(|range| range.0), Some(0));
    for pair in ranges.windows(2) {
        assert_eq!(pair[1].0, pair[0].1 + 1, "dropped ranges are contiguous: {ranges:?}");
    }
    let log_start = ranges.last().unwrap().1 + 1;
    assert_eq!(p0["log_start_offset"], log_start);
    let dropped_records: i64 = ranges.iter().map(|(first, last)| last - first + 1).sum();
    assert_eq!(p0["dropped_records"], dropped_records);
    assert_eq!(p0["log_end_offset"].as_u64().unwrap(), acked.len() as u64);
    // Exactly the dropped records are missing; every other acknowledged one is there.
    let on_disk = log_on_disk(&setup.data_dir.join("telemetry-0"));
    let kept: BTreeMap<i64, Vec<u8>> = acked.range(log_start..).map(|(offset, key)| (*offset, key.clone())).collect();
    assert_eq!(on_disk, kept);
    assert_eq!(acked.len() as i64 - kept.len() as i64, dropped_records);
    let metrics = server.get("/metrics").1;
    assert!(
        metrics.contains(&format!(
            "weir_log_dropped_records_total{{topic=\"telemetry\",partition=\"0\"}} {dropped_records}"
        )),
        "{metrics}"
    );

    // The broker comes up: the shipper skips the gap and ships the rest exactly once.
    let tansu = Tansu::start_on(setup.broker_port, setup.broker_port);
    tansu.create_topic("telemetry", 1);
    let status = wait_shipped(&server);
    let p0 = partition(&status, "telemetry", 0);
    assert_eq!(p0["shipper"]["skipped_records"], dropped_records);
    let expected: Vec<Vec<u8>> = kept.values().cloned().collect();
    assert_eq!(keys_upstream(&tansu, expected.len()), expected, "upstream holds exactly the records not dropped");
    assert_eq!(server.stop(), Some(0));
}
