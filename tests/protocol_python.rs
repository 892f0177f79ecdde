//! docs/PROTOCOL.md is enough to implement the device side: a Python encoder written
//! from it alone (tests/python/weir_frames.py) produces frames that weir accepts and
//! that equal weir's own encoding byte for byte, and decodes weir's answers.

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use weir::core::log::batch::{Header, Record};
use weir::core::protocol::{self, AckPart, ErrorCode, FRAME_LIMITS_V1};

fn python() -> PathBuf {
    let path = std::env::var_os("WEIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(path.exists(), "{} is missing: run tools/test, which creates the venv", path.display());
    path
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/weir_frames.py")
}

fn frames() -> Vec<(u64, &'static str, Vec<Record>)> {
    vec![
        (
            7,
            "telemetry",
            vec![Record {
                timestamp_ms: 1_700_000_000_000,
                key: Some(Bytes::from_static(b"k1")),
                value: Some(Bytes::from_static(b"21.5")),
                headers: vec![Header { key: "unit".into(), value: Some(Bytes::from_static(b"C")) }],
            }],
        ),
        (
            u64::MAX - 1,
            "t",
            vec![
                Record { timestamp_ms: -1, key: None, value: None, headers: vec![] },
                Record {
                    timestamp_ms: 0,
                    key: Some(Bytes::new()),
                    value: Some(Bytes::from(vec![0xee; 3000])),
                    headers: vec![
                        Header { key: "é".into(), value: None },
                        Header { key: "".into(), value: Some(Bytes::new()) },
                        Header { key: "x".into(), value: Some(Bytes::from_static(b"yz")) },
                    ],
                },
                Record { timestamp_ms: i64::MIN, key: Some(Bytes::from_static(b"odd")), value: None, headers: vec![] },
            ],
        ),
    ]
}

fn hex(bytes: &Option<Bytes>) -> serde_json::Value {
    bytes.as_ref().map_or(serde_json::Value::Null, |bytes| {
        serde_json::Value::String(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
    })
}

#[test]
fn frames_written_from_the_docs_alone_are_weirs_frames_byte_for_byte() {
    let directory = tempfile::tempdir().unwrap();
    let spec: Vec<serde_json::Value> = frames()
        .iter()
        .map(|(sequence, topic, records)| {
            serde_json::json!({
                "sequence": sequence,
                "topic": topic,
                "records": records.iter().map(|record| serde_json::json!({
                    "timestamp_ms": record.timestamp_ms,
                    "key": hex(&record.key),
                    "value": hex(&record.value),
                    "headers": record.headers.iter().map(|header| serde_json::json!([header.key, hex(&header.value)])).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let spec_path = directory.path().join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let output =
        Command::new(python()).arg(script()).arg("encode").arg(&spec_path).arg(directory.path()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for (index, (sequence, topic, records)) in frames().into_iter().enumerate() {
        let from_python = std::fs::read(directory.path().join(format!("frame-{index}.bin"))).unwrap();
        let from_rust = protocol::encode(&protocol::produce_frame(sequence, topic, &records));
        if from_python != from_rust.as_slice() {
            let dump = |bytes: &[u8]| {
                bytes
                    .chunks(16)
                    .map(|line| line.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            eprintln!("python:\n{}\nrust:\n{}", dump(&from_python), dump(&from_rust));
        }
        let checked = protocol::check_produce(&from_python, &FRAME_LIMITS_V1)
            .unwrap_or_else(|error| panic!("frame {index} from Python refused: {error}"));
        assert_eq!((checked.sequence, checked.topic.as_str()), (sequence, topic));
        assert_eq!(checked.records, records);
        assert_eq!(from_python, from_rust.as_slice(), "frame {index}: Python and Rust bytes differ");
    }
}

#[test]
fn answers_from_weir_decode_in_python() {
    let directory = tempfile::tempdir().unwrap();
    let answers = [
        protocol::ack_frame(
            42,
            vec![
                AckPart { base_offset: 1000, partition: 2, first_record: 0, record_count: 3, reserved: 0 },
                AckPart { base_offset: 7, partition: 0, first_record: 3, record_count: 1, reserved: 0 },
            ],
        ),
        protocol::error_frame(43, ErrorCode::Backpressure, "partition 2 is behind, résumé later", 250),
    ];
    for (index, answer) in answers.iter().enumerate() {
        let path = directory.path().join(format!("answer-{index}.bin"));
        std::fs::write(&path, protocol::encode(answer).as_slice()).unwrap();
        let output = Command::new(python()).arg(script()).arg("decode-answer").arg(&path).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let decoded: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(decoded["sequence"], answer.sequence);
        assert_eq!(decoded["retry_after_ms"], answer.retry_after_ms);
        assert_eq!(decoded["error_code"], answer.error_code);
        assert_eq!(decoded["message"], String::from_utf8(answer.message.clone()).unwrap());
        assert_eq!(decoded["parts"].as_array().unwrap().len(), answer.parts.len());
        for (part, expected) in decoded["parts"].as_array().unwrap().iter().zip(&answer.parts) {
            assert_eq!(part["base_offset"], expected.base_offset);
            assert_eq!(part["partition"], expected.partition);
            assert_eq!(part["first_record"], expected.first_record);
            assert_eq!(part["record_count"], expected.record_count);
        }
    }
}
