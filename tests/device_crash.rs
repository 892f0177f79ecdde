//! Devices killed mid-write: a device (aioquic, an independent QUIC stack) sends frames
//! with consecutive sequences and is SIGKILLed after a random number of answers, with
//! frames still in flight. It then starts again and sends every frame once more, with
//! the same sequences and bytes, as a device that keeps its unsent frames on flash
//! does after a reboot (it cannot know which of the frames in flight weir stored). In
//! every other round weir itself is SIGKILLed and restarted between the two, so the
//! de-duplication state the resends meet is the one rebuilt from the log.
//!
//! weir must answer each resent frame with the offsets it stored it at the first time,
//! and the log must hold every frame exactly once. The device has all its frames in
//! flight at once, 24 of them: within the 32 sequences per device weir remembers by
//! default (`quic.dedup_sequences_per_device_max`; docs/PROTOCOL.md section 6: a frame
//! below what weir remembers is answered SequenceTooOld and not stored). The seed is printed; replay with
//! WEIR_DEVICE_CRASH_SEED.

#[path = "common/broker.rs"]
mod broker;
mod common;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::read_partition;
use fleet::{env_u64, FleetConfig};
use rand::{Rng, SeedableRng};
use server::{weir, Server};

const ROUNDS: u64 = 6;
const FRAMES: u64 = 24;
const RECORDS: u64 = 20;

fn device(certs: &Path, server: &Server, round: u64) -> Command {
    let mut command = server.aioquic_device(certs, "dev-1");
    command
        .args(["--frames", &FRAMES.to_string(), "--records", &RECORDS.to_string()])
        .args(["--sequence", &(1000 * (round + 1)).to_string(), "--key-prefix", &format!("r{round}-")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// An ack's base offset (one partition: one part).
fn offset_of(line: &str) -> i64 {
    let answer: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"));
    assert_eq!(answer["kind"], "ack", "{answer}");
    let parts = answer["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{answer}");
    assert_eq!(parts[0]["record_count"], RECORDS, "{answer}");
    parts[0]["base_offset"].as_i64().unwrap()
}

#[test]
fn frames_resent_after_a_device_is_killed_mid_write_are_stored_once() {
    let seed = env_u64("WEIR_DEVICE_CRASH_SEED", rand::random());
    eprintln!("seed {seed} (replay with WEIR_DEVICE_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path();
    let certs = root.join("certs");
    let output = weir().args(["certs", "--device", "dev-1", "--dir"]).arg(&certs).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let config =
        FleetConfig { partitions: 1, admin: "127.0.0.1:0", quic: "127.0.0.1:0", quic_extra: "", upstream: None }
            .write(root);
    let mut server = Server::start(&config, 1);
    // (round, frame) -> base offset of its first ack.
    let mut acked: BTreeMap<(u64, u64), i64> = BTreeMap::new();
    let mut killed_in_flight = 0;
    for round in 0..ROUNDS {
        let kill_after = rng.gen_range(1..FRAMES - 4);
        let mut child = device(&certs, &server, round).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for frame in 0..kill_after {
            let line = lines.next().expect("an answer").unwrap();
            acked.insert((round, frame), offset_of(&line));
        }
        child.kill().unwrap(); // SIGKILL, frames in flight
        child.wait().unwrap();
        drop(lines);
        // What weir stored beyond the answers the device saw: in flight when it died.
        let stored_before = server.status()["partitions"][0]["log_end_offset"].as_i64().unwrap();
        let answered_end = acked[&(round, kill_after - 1)] + RECORDS as i64;
        killed_in_flight += (stored_before - answered_end) / RECORDS as i64;
        if round % 2 == 1 {
            drop(server); // SIGKILL weir too
            server = Server::start(&config, 1);
        }
        let output = device(&certs, &server, round).output().unwrap();
        assert!(output.status.success(), "round {round}: the resending device failed");
        let answers: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
        assert_eq!(answers.len() as u64, FRAMES, "round {round}: one answer per frame");
        for (frame, line) in answers.iter().enumerate() {
            let frame = frame as u64;
            let offset = offset_of(line);
            if let Some(first) = acked.get(&(round, frame)) {
                assert_eq!(offset, *first, "round {round} frame {frame}: a resend is answered with the first offsets");
            } else {
                acked.insert((round, frame), offset);
            }
        }
    }
    let data = root.join("data/telemetry-0");
    assert_eq!(server.stop(), Some(0));
    let records = read_partition(data);
    assert_eq!(records.len() as u64, ROUNDS * FRAMES * RECORDS, "every frame stored exactly once");
    let by_offset: BTreeMap<i64, Vec<u8>> =
        records.into_iter().map(|(offset, record)| (offset, record.key.unwrap().to_vec())).collect();
    for ((round, frame), base) in &acked {
        for index in 0..RECORDS {
            let key = format!("r{round}-{frame}-{index}").into_bytes();
            assert_eq!(by_offset.get(&(base + index as i64)), Some(&key), "round {round} frame {frame} record {index}");
        }
    }
    eprintln!(
        "{ROUNDS} device kills ({} with weir killed too), {killed_in_flight} frames stored but unanswered when the \
         device died, all resent and answered with their first offsets; {} records, each once",
        ROUNDS / 2,
        ROUNDS * FRAMES * RECORDS
    );
    assert!(killed_in_flight > 0, "some kills caught frames weir stored but the device never saw answered");
}
