//! weir's segments are Kafka RecordBatch v2 exactly: an independent Kafka
//! implementation (kafka-python, installed by tools/test into ./.venv) decodes them and
//! agrees on every CRC, offset, key, value, timestamp and header. A golden segment
//! checked into tests/fixtures pins the bytes of format version 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use common::{read_all, run, small_options};
use weir::core::log::batch::{self, Header, Record};

fn python() -> PathBuf {
    let path = std::env::var_os("WEIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(path.exists(), "{} is missing: run tools/test, which creates the venv with kafka-python", path.display());
    path
}

/// Records that exercise every corner of the format.
fn rich_records() -> Vec<Vec<Record>> {
    let mut groups = Vec::new();
    groups.push(vec![Record { timestamp_ms: 0, key: None, value: None, headers: vec![] }]);
    groups.push(vec![
        Record { timestamp_ms: -1, key: Some(Bytes::new()), value: Some(Bytes::new()), headers: vec![] },
        Record {
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"\x00\xff binary key")),
            value: Some(Bytes::from_static(b"21.5")),
            headers: vec![
                Header { key: "unit".into(), value: Some(Bytes::from_static(b"celsius")) },
                Header { key: "capteur-température".into(), value: None },
                Header { key: "".into(), value: Some(Bytes::new()) },
            ],
        },
    ]);
    // Timestamps going backwards inside a batch, and a big value.
    groups.push(
        (0..50)
            .map(|index| Record {
                timestamp_ms: 1_800_000_000_000 - index * 7_919,
                key: Some(Bytes::from(format!("device-{index}"))),
                value: Some(Bytes::from(vec![index as u8; 20 * index as usize])),
                headers: (0..(index % 5))
                    .map(|header| Header {
                        key: format!("h{header}").into(),
                        value: Some(Bytes::from(vec![b'v'; header as usize])),
                    })
                    .collect(),
            })
            .collect(),
    );
    groups.push(vec![Record {
        timestamp_ms: i64::MAX / 2,
        key: None,
        value: Some(Bytes::from(vec![0x5a; 12_000])),
        headers: vec![],
    }]);
    // Enough more to roll segments.
    for group in 0..40u64 {
        groups.push(vec![common::record(group, 3000), common::record(group + 500, 10)]);
    }
    groups
}

fn hex(bytes: &Option<Bytes>) -> serde_json::Value {
    match bytes {
        None => serde_json::Value::Null,
        Some(bytes) => serde_json::Value::String(bytes.iter().map(|byte| format!("{byte:02x}")).collect()),
    }
}

#[test]
fn kafka_python_decodes_weir_segments_and_agrees_on_every_field() {
    let python = python();
    let directory = tempfile::tempdir().unwrap();
    let partition = directory.path().join("p");
    let task_partition = partition.clone();
    let stored = run(move || async move {
        let mut options = small_options();
        options.flush_bytes_max = 64 << 10;
        options.segment_bytes_max = 96 << 10;
        let log = common::open(&task_partition, options).await.unwrap();
        for group in rich_records() {
            log.append(group).await.unwrap();
        }
        let stored = read_all(&log).await;
        log.close().await.unwrap();
        stored
    });
    let expected: Vec<Record> = rich_records().into_iter().flatten().collect();
    assert_eq!(stored.iter().map(|(_, record)| record.clone()).collect::<Vec<_>>(), expected);
    let segments = std::fs::read_dir(&partition)
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().path().extension().is_some_and(|extension| extension == "log"));
    assert!(segments.count() >= 2, "the fixture should span segments");
    let manifest: Vec<serde_json::Value> = stored
        .iter()
        .map(|(offset, record)| {
            serde_json::json!({
                "offset": offset,
                "timestamp": record.timestamp_ms,
                "key": hex(&record.key),
                "value": hex(&record.value),
                "headers": record.headers.iter().map(|header| serde_json::json!([header.key, hex(&header.value)])).collect::<Vec<_>>(),
            })
        })
        .collect();
    let manifest_path = directory.path().join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/decode_segments.py");
    let output = Command::new(&python).arg(&script).arg(&partition).arg(&manifest_path).output().unwrap();
    assert!(
        output.status.success(),
        "kafka-python disagrees:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // And the decoder is not a pushover: a flipped byte is caught by its CRC check.
    let first = partition.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&first).unwrap();
    let second_batch = batch::check_batch(&bytes).unwrap().total_bytes();
    bytes[second_batch + 40] ^= 0x80; // inside the CRC-covered header of the second batch
    std::fs::write(&first, &bytes).unwrap();
    let output = Command::new(&python).arg(&script).arg(&partition).arg(&manifest_path).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("CRC mismatch"));
}

fn golden_records() -> Vec<Record> {
    vec![
        Record {
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"sensor-7")),
            value: Some(Bytes::from_static(b"{\"t\":21.5}")),
            headers: vec![Header { key: "unit".into(), value: Some(Bytes::from_static(b"C")) }],
        },
        Record { timestamp_ms: 1_700_000_000_250, key: None, value: None, headers: vec![] },
    ]
}

fn golden_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1/golden-batch.bin")
}

#[test]
fn the_golden_batch_of_format_v1_still_encodes_and_decodes_byte_for_byte() {
    let encoded = batch::encode_to_vec(42, &golden_records());
    if std::env::var_os("WEIR_REGENERATE_FIXTURES").is_some() {
        std::fs::create_dir_all(golden_path().parent().unwrap()).unwrap();
        std::fs::write(golden_path(), &encoded).unwrap();
    }
    let golden = std::fs::read(golden_path()).expect("golden fixture");
    assert_eq!(encoded, golden, "the encoder changed the bytes of format v1");
    let golden = Bytes::from(golden);
    let decoded: Vec<Record> =
        batch::records(&golden).unwrap().map(|record| record.unwrap().to_record(&golden)).collect();
    assert_eq!(decoded, golden_records());
    assert_eq!(batch::check_batch(&golden).unwrap().base_offset, 42);
}

#[test]
fn the_corrupt_fixture_of_format_v1_is_refused() {
    let mut corrupt = std::fs::read(golden_path()).unwrap();
    corrupt[65] ^= 0x01;
    assert!(matches!(batch::check_batch(&corrupt), Err(batch::BatchError::BadCrc { .. })));
    let corrupt_path = golden_path().with_file_name("corrupt-batch.bin");
    if std::env::var_os("WEIR_REGENERATE_FIXTURES").is_some() {
        std::fs::write(&corrupt_path, &corrupt).unwrap();
    }
    assert_eq!(std::fs::read(corrupt_path).unwrap(), corrupt);
}
