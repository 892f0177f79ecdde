//! The QUIC engine under stress, against a real `weir serve` on two cores, checked by
//! reading the log itself: devices that rebind their socket mid-stream (with and without
//! the reuseport steering program), partitions that fall behind on disk and answer
//! Backpressure, bad input of every kind, and 10,000 idle connections (connecting
//! through Retry), while well-behaved devices keep being served.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use appliance::Appliance;
use common::{header, read_partition};
use weir::core::log::batch::Record;

const PARTITIONS: u64 = 4;

/// The tests of this file each load both cores; they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_weir")).with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (tools/test does)", path.display());
    path
}

fn python() -> PathBuf {
    let path = std::env::var_os("WEIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(path.exists(), "{} is missing: run tools/test, which creates the venv with aioquic", path.display());
    path
}

fn certs(directory: &Path, args: &[&str]) {
    let output = Command::new(binary("weir")).arg("certs").args(args).arg("--dir").arg(directory).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// weir on two cores with the topic telemetry of `PARTITIONS` partitions, `quic` in its
/// `[quic]` section and `extra` (whole sections) after it; the PKI in `root/certs`.
fn start(root: &Path, quic: &str, extra: &str) -> Appliance {
    start_on_cores(root, quic, extra, 2)
}

fn start_on_cores(root: &Path, quic: &str, extra: &str, cores: usize) -> Appliance {
    Appliance::start(root, quic, extra, &[("telemetry", PARTITIONS as u32)], cores)
}

/// weir-sim pointed at the appliance, with its devices' certificates.
fn sim(appliance: &Appliance, args: &[&str]) -> Command {
    let mut command = Command::new(binary("weir-sim"));
    command.args(["--server", &appliance.quic, "--threads", "2", "--certs"]).arg(appliance.certs()).args(args);
    command
}

fn summary(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "weir-sim failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn answers(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Reads the whole log after a weir-sim run: every record once, each device's records
/// in the order it generated them, every acked record where its ack says, and nothing
/// stored that was not acked. Returns the number of records.
fn assert_log_matches_acks(root: &Path, acked_log: &Path, acked_count: u64) -> usize {
    let logs: HashMap<u64, Vec<(i64, Record)>> = (0..PARTITIONS)
        .map(|partition| (partition, read_partition(root.join(format!("data/telemetry-{partition}")))))
        .collect();
    let mut seen = HashSet::new();
    let mut last_n: HashMap<String, u64> = HashMap::new();
    for records in logs.values() {
        for (offset, record) in records {
            let device = header(record, "weir.device").expect("stamped device").to_owned();
            let value = std::str::from_utf8(record.value.as_deref().unwrap()).unwrap();
            let n: u64 = value.split(' ').nth(1).unwrap().parse().unwrap();
            assert!(seen.insert((device.clone(), n)), "({device}, {n}) stored twice (offset {offset})");
            if let Some(previous) = last_n.insert(device.clone(), n) {
                assert!(previous < n, "{device}: record {n} stored after {previous}");
            }
        }
    }
    let acked = std::fs::read_to_string(acked_log).unwrap();
    let mut lines = 0u64;
    for line in acked.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (device, sequence, partition, offset) =
            (fields[0], fields[1], fields[2].parse::<u64>().unwrap(), fields[3].parse::<usize>().unwrap());
        let (stored_offset, record) = &logs[&partition][offset];
        assert_eq!(*stored_offset as usize, offset);
        assert_eq!(header(record, "weir.device"), Some(device));
        assert_eq!(header(record, "weir.sequence"), Some(sequence));
        lines += 1;
    }
    assert_eq!(lines, acked_count);
    let stored: usize = logs.values().map(Vec::len).sum();
    assert_eq!(stored as u64, acked_count, "nothing stored that was not acked");
    stored
}

/// Devices write with 4 frames in flight while their endpoints move to a new socket
/// every 200 ms; returns the sim summary after checking the log.
fn write_while_rebinding(steering: bool) -> (serde_json::Value, f64) {
    let root = tempfile::tempdir().unwrap();
    certs(&root.path().join("certs"), &["--device-count", "40", "--device-prefix", "sim-"]);
    let appliance = start(root.path(), &format!("reuseport_steering = {steering}"), "");
    let acked_log = root.path().join("acked.txt");
    let output = sim(
        &appliance,
        &[
            "--devices",
            "40",
            "--devices-per-endpoint",
            "4",
            "--rate",
            "40",
            "--seconds",
            "4",
            "--record-bytes",
            "64",
            "--frames-in-flight",
            "4",
            "--rebind-every-ms",
            "200",
        ],
    )
    .arg("--acked-log")
    .arg(&acked_log)
    .output()
    .unwrap();
    let summary = summary(&output);
    let accepted = appliance.metric("weir_quic_connections_accepted_total");
    let forwarded = appliance.metric("weir_quic_datagrams_forwarded_total");
    appliance.stop();
    assert_eq!(summary["connected"], 40, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert!(summary["rebinds"].as_u64().unwrap() >= 10 * 10, "{summary}");
    assert_eq!(accepted, 40.0, "no device had to reconnect: every connection survived every rebinding");
    let acked = summary["acked"].as_u64().unwrap();
    assert!(acked >= 2_000, "too little traffic to mean anything: {summary}");
    assert_log_matches_acks(root.path(), &acked_log, acked);
    (summary, forwarded)
}

#[test]
fn devices_rebinding_their_socket_mid_stream_keep_their_connections_and_lose_or_duplicate_nothing() {
    let _serial = one_at_a_time();
    write_while_rebinding(true);
}

#[test]
fn without_the_steering_program_datagrams_on_the_wrong_core_are_forwarded_to_their_connection() {
    let _serial = one_at_a_time();
    let (_, forwarded) = write_while_rebinding(false);
    assert!(forwarded > 0.0, "rebinding moved some connections' datagrams to the other core's socket");
}

#[test]
fn a_partition_behind_on_disk_answers_backpressure_and_every_record_is_acked_once_in_order() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    certs(&root.path().join("certs"), &["--device-count", "200", "--device-prefix", "sim-"]);
    // A queue of one append per partition: any burst finds the partition behind.
    let appliance = start(root.path(), "", "[log]\nappends_pending_max = 1\n");
    let profile = root.path().join("device.toml");
    std::fs::write(
        &profile,
        "[server]\naddresses = [\"127.0.0.1:4433\"]\nname = \"localhost\"\n[tls]\nca = \"ca.pem\"\ncertificate = \"d.pem\"\nkey = \"d.key\"\n[retry]\nattempts_max = 1000\nbackoff_ms_min = 1\nbackoff_ms_max = 50\n",
    )
    .unwrap();
    let acked_log = root.path().join("acked.txt");
    let output = sim(
        &appliance,
        &["--devices", "200", "--rate", "50", "--seconds", "4", "--record-bytes", "64", "--frames-in-flight", "4"],
    )
    .arg("--profile")
    .arg(&profile)
    .arg("--acked-log")
    .arg(&acked_log)
    .output()
    .unwrap();
    let summary = summary(&output);
    let backpressure = appliance.metric("weir_quic_backpressure_answers_total");
    let memory_peak_kib = std::fs::read_to_string(format!("/proc/{}/status", appliance.server.pid()))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:").map(|rest| rest.trim().trim_end_matches(" kB").parse::<u64>()))
        .unwrap()
        .unwrap();
    appliance.stop();
    eprintln!("backpressure answers: {backpressure}, weir peak RSS {memory_peak_kib} KiB, sim: {summary}");
    assert!(backpressure > 0.0, "the partitions answered Backpressure");
    assert_eq!(summary["errors"], 0, "the devices backed off and every send was acked in the end: {summary}");
    let acked = summary["acked"].as_u64().unwrap();
    assert!(acked >= 10_000, "{summary}");
    assert_log_matches_acks(root.path(), &acked_log, acked);
}

/// Issue 13: two devices (aioquic, written from docs/PROTOCOL.md alone), each at every
/// in-flight limit of the default config — 4 connections x 4 streams x 4 frames written
/// per stream, 64 unacknowledged = 4 connections x 16 frames in flight, the default
/// de-dup window — against partitions with a queue of one append, so many frames are
/// answered Backpressure and resent while later sequences of the same device are stored.
/// Every frame must be stored exactly once; none is ever answered SequenceTooOld.
#[test]
fn devices_at_every_in_flight_limit_under_backpressure_get_every_frame_stored_exactly_once() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let devices = ["dev-1", "dev-2"];
    certs(&root.path().join("certs"), &["--device", devices[0], "--device", devices[1]]);
    let appliance = start(root.path(), "", "[log]\nappends_pending_max = 1\n");
    const FRAMES: u64 = 600;
    const RECORDS: u64 = 4;
    let children: Vec<_> = devices
        .iter()
        .map(|device| {
            let certs = appliance.certs();
            Command::new(python())
                .arg("-u")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/aioquic_window_device.py"))
                .args(["--server", &appliance.quic, "--ca"])
                .arg(certs.join("ca.pem"))
                .arg("--cert")
                .arg(certs.join(format!("devices/{device}.pem")))
                .arg("--key")
                .arg(certs.join(format!("devices/{device}.key")))
                .args(["--frames", &FRAMES.to_string(), "--records", &RECORDS.to_string()])
                .args(["--connections", "4", "--streams", "4", "--pipeline", "4", "--window", "64"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children.into_iter().map(|child| child.wait_with_output().unwrap()).collect();
    let backpressure = appliance.metric("weir_quic_backpressure_answers_total");
    appliance.stop();
    for (device, output) in devices.iter().zip(&outputs) {
        let stdout = String::from_utf8_lossy(&output.stdout);
        eprintln!("{device}: {stdout}");
        assert!(output.status.success(), "{device}: {stdout} {}", String::from_utf8_lossy(&output.stderr));
        let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(summary["acked"], FRAMES, "{device}: every frame acked: {summary}");
        assert!(summary["answers"].get("SequenceTooOld").is_none(), "{device}: {summary}");
    }
    assert!(backpressure > 0.0, "the partitions answered Backpressure");
    let mut stored: HashMap<String, HashSet<(u64, u64)>> = HashMap::new();
    for partition in 0..PARTITIONS {
        for (offset, record) in read_partition(root.path().join(format!("data/telemetry-{partition}"))) {
            let device = header(&record, "weir.device").expect("stamped device").to_owned();
            let value = std::str::from_utf8(record.value.as_deref().unwrap()).unwrap();
            let (sequence, index) = value.split_once('/').unwrap();
            let id = (sequence.parse().unwrap(), index.parse().unwrap());
            assert_eq!(header(&record, "weir.sequence"), Some(sequence));
            assert!(
                stored.entry(device.clone()).or_default().insert(id),
                "{device} {id:?} stored twice (p{partition}@{offset})"
            );
        }
    }
    for device in devices {
        let expected: HashSet<(u64, u64)> =
            (1..=FRAMES).flat_map(|sequence| (0..RECORDS).map(move |index| (sequence, index))).collect();
        assert_eq!(stored.get(device), Some(&expected), "{device}: every record of every frame stored once");
    }
}

#[test]
fn bad_input_gets_its_clear_refusal_and_well_behaved_devices_keep_being_served() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    certs(&root.path().join("certs"), &["--device", "dev-1", "--device", "dev-2", "--device", "busy-1"]);
    let appliance = start(root.path(), "connections_per_device_max = 1", "");
    // A sequence reused with other records (the same keys, so the same partitions, but
    // fewer of them): refused, and the first records stay.
    let first = answers(&appliance.aioquic("dev-1", &["--frames", "1", "--sequence", "50", "--records", "4"]));
    assert_eq!(first[0]["kind"], "ack", "{}", first[0]);
    let reused = answers(&appliance.aioquic("dev-1", &["--frames", "1", "--sequence", "50", "--records", "2"]));
    assert_eq!(reused[0]["error_code"], 11, "SequenceReused: {}", reused[0]);
    assert!(reused[0]["message"].as_str().unwrap().contains("sequence 50"), "{}", reused[0]);
    let resent = answers(&appliance.aioquic("dev-1", &["--frames", "1", "--sequence", "50", "--records", "4"]));
    assert_eq!(resent[0], first[0], "the true resend still gets the original offsets");
    // A stream that ends inside a frame closes the connection with the reason.
    let truncated = appliance.aioquic("dev-1", &["--frames", "1", "--sequence", "60", "--truncate"]);
    assert_eq!(truncated.status.code(), Some(3), "{}", String::from_utf8_lossy(&truncated.stderr));
    let closed = answers(&truncated).pop().unwrap();
    assert!(closed["reason"].as_str().unwrap().contains("ended inside a frame"), "{closed}");
    // No client certificate: the handshake fails.
    let anonymous = appliance.aioquic("dev-1", &["--frames", "1", "--no-cert"]);
    assert!(!anonymous.status.success(), "a device without a certificate must be refused");
    // A certificate from another CA fails the handshake too.
    let stranger = root.path().join("stranger");
    certs(&stranger, &["--device", "dev-1"]);
    let foreign = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/aioquic_device.py"))
        .args(["--server", &appliance.quic, "--ca"])
        .arg(root.path().join("certs/ca.pem"))
        .arg("--cert")
        .arg(stranger.join("devices/dev-1.pem"))
        .arg("--key")
        .arg(stranger.join("devices/dev-1.key"))
        .output()
        .unwrap();
    assert!(!foreign.status.success(), "a certificate from an unknown CA must be refused");
    // Garbage datagrams (random bytes, and bytes shaped like short headers naming either
    // core) are dropped without harm.
    let garbage = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for index in 0..2_000u32 {
        let mut datagram = vec![0u8; 20 + (index as usize % 1200)];
        for byte in datagram.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        if index % 2 == 0 {
            datagram[0] = 0x40;
            datagram[1..5].copy_from_slice(&(index % 2 + (index / 2) % 2).to_be_bytes());
        }
        garbage.send_to(&datagram, &appliance.quic).unwrap();
    }
    // One connection per device here: a second one of busy-1 is closed with the reason.
    let accepted_before = appliance.metric("weir_quic_connections_accepted_total");
    let idle = sim(
        &appliance,
        &["--devices", "1", "--device-prefix", "busy-", "--device-first", "1", "--rate", "0", "--seconds", "8"],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while appliance.metric("weir_quic_connections_accepted_total") <= accepted_before
        || appliance.metric("weir_quic_handshakes_in_progress") > 0.0
    {
        assert!(Instant::now() < deadline, "the idle device connects");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = appliance.aioquic("busy-1", &["--frames", "1"]);
    assert_eq!(second.status.code(), Some(3), "{}", String::from_utf8_lossy(&second.stderr));
    let closed = answers(&second).pop().unwrap();
    assert!(closed["reason"].as_str().unwrap().contains("connections_per_device_max"), "{closed}");
    let mut idle = idle;
    assert!(idle.wait().unwrap().success());
    // After all that, a good device is served.
    let good = answers(&appliance.aioquic("dev-2", &["--frames", "3"]));
    assert!(good.iter().all(|answer| answer["kind"] == "ack"), "{good:?}");
    let refusals = |reason: &str| appliance.metric(&format!("weir_quic_refusals_total{{reason=\"{reason}\"}}"));
    assert!(refusals("handshake_failed") >= 2.0, "no certificate and the foreign CA are counted");
    assert_eq!(refusals("connections_per_device_max"), 1.0);
    assert_eq!(refusals("protocol"), 1.0, "the truncated stream");
    assert_eq!(appliance.metric("weir_quic_frame_errors_total{reason=\"sequence_reused\"}"), 1.0);
    appliance.stop();
}

#[test]
fn one_connection_over_connections_max_is_refused_and_served_once_one_closes() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let certs_dir = root.path().join("certs");
    certs(&certs_dir, &["--device", "dev-1"]);
    certs(&certs_dir, &["--device-count", "3", "--device-prefix", "idle-"]);
    // connections_max is per core: one core, so the limit is the appliance's.
    let appliance = start_on_cores(root.path(), "connections_max = 3", "", 1);
    let mut idle = sim(&appliance, &["--devices", "3", "--device-prefix", "idle-", "--rate", "0", "--seconds", "6"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while appliance.metric("weir_quic_connections_open") < 3.0 {
        assert!(Instant::now() < deadline, "the 3 idle devices connect");
        assert!(idle.try_wait().unwrap().is_none(), "the idle fleet ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The fourth connection is refused at its first packet, whoever it is.
    let refused = appliance.aioquic("dev-1", &["--frames", "1"]);
    assert!(!refused.status.success(), "a connection over connections_max must be refused");
    let refusals = appliance.metric("weir_quic_refusals_total{reason=\"connections_max\"}");
    assert!(refusals >= 1.0, "counted under its reason: {refusals}");
    assert_eq!(appliance.metric("weir_quic_connections_open"), 3.0);
    assert!(idle.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while appliance.metric("weir_quic_connections_open") > 0.0 {
        assert!(Instant::now() < deadline, "the idle devices' connections close");
        std::thread::sleep(Duration::from_millis(50));
    }
    let served = answers(&appliance.aioquic("dev-1", &["--frames", "2"]));
    assert!(served.iter().all(|answer| answer["kind"] == "ack"), "{served:?}");
    appliance.stop();
}

#[test]
fn ten_thousand_idle_connections_are_held_while_active_devices_are_served() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let certs_dir = root.path().join("certs");
    certs(&certs_dir, &["--device-count", "10000", "--device-prefix", "idle-"]);
    certs(&certs_dir, &["--device-count", "20", "--device-prefix", "busy-"]);
    // Few handshakes before Retry: the fleet connecting 256 at a time gets Retries.
    let appliance = start(root.path(), "handshakes_before_retry = 16", "");
    let mut idle = sim(
        &appliance,
        &[
            "--devices",
            "10000",
            "--device-prefix",
            "idle-",
            "--rate",
            "0",
            "--seconds",
            "20",
            "--connect-concurrency",
            "256",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while appliance.metric("weir_quic_connections_open") < 10_000.0 {
        assert!(Instant::now() < deadline, "10,000 idle devices connect");
        assert!(idle.try_wait().unwrap().is_none(), "the idle fleet ended early");
        std::thread::sleep(Duration::from_millis(200));
    }
    let acked_log = root.path().join("acked.txt");
    let busy = sim(
        &appliance,
        &["--devices", "20", "--device-prefix", "busy-", "--rate", "50", "--seconds", "3", "--frames-in-flight", "4"],
    )
    .arg("--acked-log")
    .arg(&acked_log)
    .output()
    .unwrap();
    let busy = summary(&busy);
    let open_meanwhile = appliance.metric("weir_quic_connections_open");
    let retries = appliance.metric("weir_quic_retries_sent_total");
    let idle_output = idle.wait_with_output().unwrap();
    let idle_summary = summary(&idle_output);
    appliance.stop();
    eprintln!("idle: {idle_summary}\nbusy: {busy}\nretries sent: {retries}");
    assert_eq!(idle_summary["connected"], 10_000, "{idle_summary}");
    assert!(open_meanwhile >= 10_000.0, "the idle connections stayed open: {open_meanwhile}");
    assert!(retries > 0.0, "clients arriving during the handshake flood proved their address with a Retry");
    assert_eq!(busy["connected"], 20, "{busy}");
    assert_eq!(busy["errors"], 0, "{busy}");
    let acked = busy["acked"].as_u64().unwrap();
    assert!(acked >= 1_000, "{busy}");
    assert_log_matches_acks(root.path(), &acked_log, acked);
}

/// The exact `weir certs` command in weir-sim's message, between the backticks after
/// "with `".
fn suggested_command(stderr: &str) -> Vec<String> {
    let start = stderr.find("with `weir certs ").unwrap_or_else(|| panic!("no command in: {stderr}")) + "with `".len();
    let command = &stderr[start..start + stderr[start..].find('`').unwrap()];
    command.split_whitespace().skip(1).map(str::to_owned).collect()
}

#[test]
fn weir_sim_fails_a_run_with_a_denied_device_naming_the_servers_reason_and_gives_the_certs_command() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    certs(&root.path().join("certs"), &["--device-prefix", "sim-", "--device-count", "2"]);
    let appliance = start_on_cores(root.path(), "devices_denied = [\"sim-1\"]", "", 1);
    let run = |args: &[&str]| {
        sim(&appliance, &["--rate", "50", "--seconds", "1", "--drain-seconds", "5"]).args(args).output().unwrap()
    };
    let stderr = |output: &Output| String::from_utf8_lossy(&output.stderr).into_owned();

    // The only device is denied: nothing acked, exit 1, the server's reason on stderr.
    let denied = run(&["--devices", "1", "--device-first", "1"]);
    assert_eq!(denied.status.code(), Some(1), "{}", stderr(&denied));
    assert!(stderr(&denied).contains("device sim-1 is denied by this appliance"), "{}", stderr(&denied));

    // One of two is denied: the other's records are acked, and the run still fails.
    let mixed = run(&["--devices", "2"]);
    assert_eq!(mixed.status.code(), Some(1), "{}", stderr(&mixed));
    assert!(stderr(&mixed).contains("weir-sim: incomplete: "), "{}", stderr(&mixed));
    assert!(stderr(&mixed).contains("device sim-1 is denied by this appliance"), "{}", stderr(&mixed));
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&mixed.stdout).lines().last().unwrap()).unwrap();
    // The refusal comes just after the handshake: it fails sim-1's connect, or (when
    // the connect completed first) its first sends; either way the run is short.
    let number = |field: &str| summary[field].as_u64().unwrap();
    assert!(number("connect_failures") == 1 || number("failed_records") > 0, "{summary}");
    assert!(number("acked") > 0 && number("acked") < number("generated"), "{summary}");

    // Every record of every device acked: exit 0.
    let fine = run(&["--devices", "1"]);
    assert!(fine.status.success(), "{}", stderr(&fine));

    // A device without a certificate: exit 2 with the exact command that makes it,
    // which works and lets the run go through.
    let missing = run(&["--devices", "3"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    let command = suggested_command(&stderr(&missing));
    assert_eq!(command[command.len() - 2..], ["--device", "sim-2"], "{command:?}");
    let made = Command::new(binary("weir")).args(&command).output().unwrap();
    assert!(made.status.success(), "{command:?}: {}", String::from_utf8_lossy(&made.stderr));
    let fine = run(&["--devices", "1", "--device-first", "2"]);
    assert!(fine.status.success(), "{}", stderr(&fine));
    // No PKI at all: the command makes the CA and every device.
    let empty = root.path().join("no-certs");
    let missing = Command::new(binary("weir-sim"))
        .args(["--server", &appliance.quic, "--devices", "2", "--certs"])
        .arg(&empty)
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    let command = suggested_command(&stderr(&missing));
    assert!(command.ends_with(&["--device-prefix", "sim-", "--device-count", "2"].map(String::from)), "{command:?}");
    let made = Command::new(binary("weir")).args(&command).output().unwrap();
    assert!(made.status.success(), "{command:?}: {}", String::from_utf8_lossy(&made.stderr));
    assert!(empty.join("ca.pem").is_file() && empty.join("devices/sim-1.key").is_file());

    // weir refused sim-1 on every try and logged it once: a denied device is throttled
    // to one line a minute, and every refusal is still counted.
    let refusals = appliance.metric("weir_quic_refusals_total{reason=\"device_denied\"}");
    assert!(refusals >= 2.0, "{refusals}");
    let logged = appliance.server.log_lines().iter().filter(|line| line.contains("denied device refused")).count();
    assert_eq!(logged, 1, "{refusals} refusals");
    appliance.stop();
}
