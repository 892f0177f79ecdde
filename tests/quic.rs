//! Devices over QUIC, against a real `weir serve`: an independent client (Python's
//! aioquic, with frames written from docs/PROTOCOL.md alone) writes records over mTLS
//! and every acknowledged record is in the log at the acknowledged offset, stamped with
//! the device id from its certificate. Bad certificates, denied devices, unknown or
//! forbidden topics and malformed frames are refused with their reasons.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use appliance::{make_certs, Appliance};
use common::read_partition;
use weir::core::log::batch::Record;

fn python() -> PathBuf {
    let path = std::env::var_os("WEIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(path.exists(), "{} is missing: run tools/test, which creates the venv with aioquic", path.display());
    path
}

/// weir on `cores` cores with the devices dev-1, dev-2 and banned-1, the topics
/// telemetry (4 partitions) and secret (1), and `extra_quic` in `[quic]`.
fn start(root: &Path, extra_quic: &str, cores: usize) -> Appliance {
    if !root.join("certs/ca.pem").exists() {
        make_certs(&root.join("certs"), &["dev-1", "dev-2", "banned-1"]);
    }
    Appliance::start(root, extra_quic, "", &[("telemetry", 4), ("secret", 1)], cores)
}

fn answers(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(output.status.success(), "device failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn header<'a>(record: &'a Record, key: &str) -> Option<&'a [u8]> {
    record.headers.iter().find(|header| header.key == key).and_then(|header| header.value.as_deref())
}

#[test]
fn an_aioquic_device_writes_over_mtls_and_every_acked_record_is_in_the_log() {
    let root = tempfile::tempdir().unwrap();
    let appliance = start(root.path(), "", 2);
    let acks = answers(&appliance.aioquic("dev-1", &["--frames", "20", "--records", "5", "--key-prefix", "a"]));
    let more = answers(
        &appliance.aioquic("dev-2", &["--frames", "5", "--records", "3", "--sequence", "100", "--key-prefix", "b"]),
    );
    appliance.stop();
    assert_eq!(acks.len(), 20);
    assert_eq!(more.len(), 5);
    let logs: HashMap<u64, Vec<(i64, Record)>> = (0..4u64)
        .map(|partition| (partition, read_partition(root.path().join(format!("data/telemetry-{partition}")))))
        .collect();
    let total: usize = logs.values().map(Vec::len).sum();
    assert_eq!(total, 20 * 5 + 5 * 3, "the log holds exactly the acknowledged records");
    for (device, prefix, acks, first_sequence) in [("dev-1", "a", &acks, 1u64), ("dev-2", "b", &more, 100)] {
        for (frame, ack) in acks.iter().enumerate() {
            assert_eq!(ack["kind"], "ack", "{ack}");
            assert_eq!(ack["sequence"], first_sequence + frame as u64);
            let mut covered = 0;
            for part in ack["parts"].as_array().unwrap() {
                let partition = part["partition"].as_u64().unwrap();
                let base = part["base_offset"].as_i64().unwrap();
                for index in 0..part["record_count"].as_u64().unwrap() {
                    let record_index = part["first_record"].as_u64().unwrap() + index;
                    let (offset, record) = &logs[&partition][(base + index as i64) as usize];
                    assert_eq!(*offset, base + index as i64);
                    assert_eq!(record.key.as_deref(), Some(format!("{prefix}{frame}-{record_index}").as_bytes()));
                    assert_eq!(
                        header(record, "weir.device"),
                        Some(device.as_bytes()),
                        "the device id comes from the certificate"
                    );
                    assert_eq!(
                        header(record, "weir.sequence"),
                        Some((first_sequence + frame as u64).to_string().as_bytes())
                    );
                    assert_eq!(header(record, "frame"), Some(frame.to_string().as_bytes()));
                    covered += 1;
                }
            }
            assert_eq!(
                covered,
                ack["parts"].as_array().unwrap().iter().map(|part| part["record_count"].as_u64().unwrap()).sum::<u64>()
            );
        }
    }
    // Per device and partition, records are in the order the device sent them.
    for records in logs.values() {
        let mut last: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        for (_, record) in records {
            let device = header(record, "weir.device").unwrap().to_vec();
            let sequence: u64 = std::str::from_utf8(header(record, "weir.sequence").unwrap()).unwrap().parse().unwrap();
            let key = std::str::from_utf8(record.key.as_deref().unwrap()).unwrap();
            let index: u64 = key.rsplit('-').next().unwrap().parse().unwrap();
            if let Some(previous) = last.insert(device, (sequence, index)) {
                assert!(previous < (sequence, index), "out of order: {previous:?} then {:?}", (sequence, index));
            }
        }
    }
}

/// A certificate for `device` from the CA in `certs` whose validity ended a day ago;
/// returns the paths of its PEM and key.
fn expired_device_certificate(certs: &Path, device: &str) -> (PathBuf, PathBuf) {
    use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(certs.join("ca.pem")).unwrap(), ca_key).unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, device);
    params.distinguished_name = name;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(30 * 86_400)).into();
    params.not_after = (now - Duration::from_secs(86_400)).into();
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, &issuer).unwrap();
    let (pem, key_path) = (certs.join(format!("expired-{device}.pem")), certs.join(format!("expired-{device}.key")));
    std::fs::write(&pem, certificate.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (pem, key_path)
}

#[test]
fn refusals_carry_their_reasons() {
    let root = tempfile::tempdir().unwrap();
    let appliance = start(root.path(), "topics_allowed = [\"telemetry\"]\ndevices_denied = [\"banned-1\"]", 1);
    // A topic the config does not allow, and one that does not exist.
    let forbidden = answers(&appliance.aioquic("dev-1", &["--topic", "secret", "--frames", "1"]));
    assert_eq!(forbidden[0]["kind"], "error");
    assert_eq!(forbidden[0]["error_code"], 3, "{}", forbidden[0]);
    let unknown = answers(&appliance.aioquic("dev-1", &["--topic", "nope", "--frames", "1"]));
    assert_eq!(unknown[0]["error_code"], 4, "{}", unknown[0]);
    assert!(unknown[0]["message"].as_str().unwrap().contains("nope"));
    // A denied device is disconnected after the handshake.
    let denied = appliance.aioquic("banned-1", &["--frames", "1"]);
    assert!(!denied.status.success(), "a denied device must not get an answer");
    // A certificate from another CA fails the handshake.
    let stranger = root.path().join("stranger");
    make_certs(&stranger, &["dev-1"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/aioquic_device.py");
    let foreign = Command::new(python())
        .arg(script)
        .args(["--server", &appliance.quic, "--ca"])
        .arg(root.path().join("certs/ca.pem"))
        .arg("--cert")
        .arg(stranger.join("devices/dev-1.pem"))
        .arg("--key")
        .arg(stranger.join("devices/dev-1.key"))
        .args(["--frames", "1"])
        .output()
        .unwrap();
    assert!(!foreign.status.success(), "a certificate from an unknown CA must be refused");
    // A certificate from the right CA whose validity has ended fails the handshake, and
    // the device is told why (rustls' alert, carried in QUIC's CONNECTION_CLOSE).
    let (expired_pem, expired_key) = expired_device_certificate(&root.path().join("certs"), "dev-1");
    let expired = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/aioquic_device.py"))
        .args(["--server", &appliance.quic, "--ca"])
        .arg(root.path().join("certs/ca.pem"))
        .arg("--cert")
        .arg(&expired_pem)
        .arg("--key")
        .arg(&expired_key)
        .args(["--frames", "1"])
        .output()
        .unwrap();
    assert_eq!(expired.status.code(), Some(3), "an expired device certificate must be refused");
    let closed: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&expired.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(closed["error_code"], 0x100 + 45, "TLS alert certificate_expired as a QUIC crypto error: {closed}");
    assert!(closed["reason"].as_str().unwrap().contains("certificate expired"), "{closed}");
    // A frame that is no valid archive is answered with MalformedFrame.
    let garbage = answers(&appliance.aioquic("dev-1", &["--garbage"]));
    assert_eq!(garbage[0]["error_code"], 1, "{}", garbage[0]);
    assert!(garbage[0]["message"].as_str().unwrap().contains("archive"), "{}", garbage[0]);
    // A frame declared larger than the limit closes the connection without buffering it.
    let oversized = appliance.aioquic("dev-1", &["--declare-length", "300000000"]);
    assert!(!oversized.status.success());
    // After all that, a good device still works.
    let good = answers(&appliance.aioquic("dev-2", &["--frames", "2"]));
    assert!(good.iter().all(|answer| answer["kind"] == "ack"));
    appliance.stop();
}

#[test]
fn a_resent_frame_gets_its_original_offsets_and_is_not_stored_again_even_after_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let appliance = start(root.path(), "", 2);
    let first = answers(&appliance.aioquic("dev-1", &["--frames", "3", "--records", "6", "--resend-last"]));
    appliance.stop();
    assert_eq!(first.len(), 4);
    assert_eq!(first[3], first[2], "the resent frame is answered exactly as the original");
    let stored = |root: &Path| -> usize {
        (0..4).map(|partition| read_partition(root.join(format!("data/telemetry-{partition}"))).len()).sum()
    };
    assert_eq!(stored(root.path()), 18, "three frames of six records, stored once");
    // After a restart the appliance rebuilds what it remembers from its log.
    let appliance = start(root.path(), "", 2);
    let again = answers(
        &appliance.aioquic("dev-1", &["--frames", "1", "--records", "6", "--sequence", "3", "--first-frame", "2"]),
    );
    let fresh = answers(
        &appliance.aioquic("dev-1", &["--frames", "1", "--records", "6", "--sequence", "4", "--first-frame", "3"]),
    );
    appliance.stop();
    assert_eq!(again[0], first[2], "the resend after a restart gets the original offsets");
    assert_eq!(fresh[0]["kind"], "ack");
    assert_eq!(stored(root.path()), 24, "only the new frame was stored");
}

#[test]
fn a_stale_frame_below_what_its_partition_remembers_is_refused_as_too_old_and_not_stored_again() {
    let root = tempfile::tempdir().unwrap();
    // A window of 2 needs limits that let a device have at most 2 frames in flight
    // (quic.dedup_sequences_per_device_max >= connections x frames in flight).
    let appliance = start(
        root.path(),
        "dedup_sequences_per_device_max = 2\nconnections_per_device_max = 1\nframes_in_flight_per_connection_max = 2",
        1,
    );
    let first = answers(&appliance.aioquic("dev-1", &["--frames", "40", "--records", "1"]));
    assert!(first.iter().all(|answer| answer["kind"] == "ack"), "{first:?}");
    // The first frame once more, as a copy from a connection the device abandoned
    // arrives after the device moved on (found by the simulation, docs/SIMULATION.md).
    let stale = answers(
        &appliance.aioquic("dev-1", &["--frames", "1", "--records", "1", "--sequence", "1", "--first-frame", "0"]),
    );
    let recent = answers(
        &appliance.aioquic("dev-1", &["--frames", "1", "--records", "1", "--sequence", "40", "--first-frame", "39"]),
    );
    appliance.stop();
    assert_eq!(stale[0]["error_code"], 8, "SequenceTooOld: {}", stale[0]);
    assert_eq!(recent[0], first[39], "a resend within the window still gets its original offsets");
    let stored: usize =
        (0..4).map(|partition| read_partition(root.path().join(format!("data/telemetry-{partition}"))).len()).sum();
    assert_eq!(stored, 40, "nothing was stored twice");
}

#[test]
fn a_device_over_its_record_quota_is_refused_with_retry_after_and_nothing_past_it_is_stored() {
    let root = tempfile::tempdir().unwrap();
    // 50 records/s, one connection per device (it gets the whole quota), 40-record frames.
    let appliance = start(
        root.path(),
        "device_records_per_s_max = 50\nconnections_per_device_max = 1\nrecords_per_frame_max = 40",
        1,
    );
    let first = answers(&appliance.aioquic("dev-1", &["--frames", "4", "--records", "40", "--sequence", "1"]));
    assert_eq!(first.len(), 4);
    assert_eq!(first[0]["kind"], "ack", "the burst holds one frame: {}", first[0]);
    // 10 records left of the 50-record burst: the next 40 need 30 more, 600 ms at 50/s.
    assert_eq!(first[1]["error_code"], 9, "QuotaExceeded: {}", first[1]);
    let retry_after_ms = first[1]["retry_after_ms"].as_u64().unwrap();
    assert!((500..=600).contains(&retry_after_ms), "{}", first[1]);
    assert!(first[1]["message"].as_str().unwrap().contains("quota of 50 records/s"), "{}", first[1]);
    for later in &first[2..] {
        assert_eq!(later["error_code"], 9, "frames behind a refused one are refused too: {later}");
    }
    // After the wait, the refused frames are accepted, resent in order.
    std::thread::sleep(Duration::from_millis(retry_after_ms + 100));
    let resent = answers(
        &appliance.aioquic("dev-1", &["--frames", "1", "--records", "40", "--sequence", "2", "--first-frame", "1"]),
    );
    assert_eq!(resent[0]["kind"], "ack", "{}", resent[0]);
    // A frame over quic.records_per_frame_max is refused before the quota is consulted.
    let crowded = answers(&appliance.aioquic("dev-1", &["--frames", "1", "--records", "41", "--sequence", "10"]));
    assert_eq!(crowded[0]["error_code"], 2, "FrameTooLarge: {}", crowded[0]);
    assert!(crowded[0]["message"].as_str().unwrap().contains("over the limit: 41 > 40"), "{}", crowded[0]);
    appliance.stop();
    // The log holds exactly the two acknowledged frames: 80 records.
    let stored: usize =
        (0..4).map(|partition| read_partition(root.path().join(format!("data/telemetry-{partition}"))).len()).sum();
    assert_eq!(stored, 80);
}
