//! What a device must not be able to do, against a real `weir serve` on loopback, with
//! an independent client (Python's aioquic) and a raw quinn-proto handshake flooder:
//! write as another device, exceed its record quota (even with more connections), reach
//! a topic it is not allowed; and floods of handshakes, of idle connections and of
//! oversized frames are held to their limits (the refusals counted in /metrics) while a
//! well-behaved device still gets its records acknowledged within a bounded number of
//! attempts. The admin endpoint listens on loopback only unless told otherwise.
//!
//! Every flood is bounded (a count or a deadline) and stops by itself; the assertions
//! are on acknowledgements, counts and the log, not on timing.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance::{make_certs, Appliance};
use common::read_partition;
use weir::core::log::batch::Record;

/// The tests of this file each start an appliance and load it; they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How many times a well-behaved device may have to try before its records are acked.
const ATTEMPTS_MAX: usize = 3;

/// Starts `command` (a `weir serve`), echoes its stderr and waits for "weir serving";
/// returns the child and every `key=value` field of the log lines up to then.
fn start_serving(mut command: Command) -> (Child, Vec<String>) {
    let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !line.contains("DEBUG") {
                eprintln!("weir: {line}");
            }
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        let Ok(line) = receiver.recv_timeout(Duration::from_millis(100)) else {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("weir exited with {status} before serving: {lines:#?}");
            }
            continue;
        };
        let serving = line.contains("weir serving");
        lines.push(line);
        if serving {
            return (child, lines);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("weir did not start serving: {lines:#?}");
}

fn field(lines: &[String], name: &str) -> Option<String> {
    lines.iter().find_map(|line| {
        line.find(name).map(|at| line[at + name.len()..].split_whitespace().next().unwrap().to_owned())
    })
}

/// weir on `cores` cores with `quic` in its `[quic]` section and the `topics`; the
/// PKI in `root/certs`.
fn start(root: &Path, quic: &str, topics: &[(&str, u32)], cores: usize) -> Appliance {
    Appliance::start(root, quic, "", topics, cores)
}

fn refusals(appliance: &Appliance, reason: &str) -> f64 {
    appliance.metric(&format!("weir_quic_refusals_total{{reason=\"{reason}\"}}"))
}

fn device_command(appliance: &Appliance, device: &str, args: &[&str]) -> Command {
    let mut command = appliance.server.aioquic_device(&appliance.certs(), device);
    command.args(args);
    command
}

/// A well-behaved device sends `frames` frames (sequences from `first_sequence`)
/// until all are acked, trying at most `ATTEMPTS_MAX` times; the attempts it took.
fn well_behaved(appliance: &Appliance, device: &str, frames: usize, first_sequence: u64) -> usize {
    let mut tried = Vec::new();
    for attempt in 1..=ATTEMPTS_MAX {
        let output = appliance.aioquic(
            device,
            &["--frames", &frames.to_string(), "--sequence", &first_sequence.to_string(), "--key-prefix", "good"],
        );
        let got = answers(&output);
        if got.len() == frames && got.iter().all(|answer| answer["kind"] == "ack") {
            return attempt;
        }
        tried.push((got, String::from_utf8_lossy(&output.stderr).into_owned()));
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{device} was not served in {ATTEMPTS_MAX} attempts: {tried:#?}");
}

fn answers(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout).lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

fn header<'a>(record: &'a Record, key: &str) -> Vec<&'a [u8]> {
    record.headers.iter().filter(|header| header.key == key).filter_map(|header| header.value.as_deref()).collect()
}

/// Every record of `topic` (partitions `0..partitions`) in the data directory.
fn stored(root: &Path, topic: &str, partitions: u32) -> Vec<Record> {
    (0..partitions)
        .flat_map(|partition| read_partition(root.join(format!("data/{topic}-{partition}"))))
        .map(|(_, record)| record)
        .collect()
}

#[test]
fn a_device_cannot_write_as_another_device() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1", "dev-2"]);
    let appliance = start(root.path(), "", &[("telemetry", 2)], 1);
    // dev-1 claims to be dev-2 in the header weir stamps: refused, nothing stored.
    let forged = answers(&appliance.aioquic(
        "dev-1",
        &["--frames", "1", "--sequence", "7", "--key-prefix", "forged", "--header", "weir.device=dev-2"],
    ));
    assert_eq!(forged[0]["kind"], "error", "{}", forged[0]);
    assert_eq!(forged[0]["error_code"], 1, "MalformedFrame: {}", forged[0]);
    assert!(forged[0]["message"].as_str().unwrap().contains("reserved"), "{}", forged[0]);
    // dev-1 writes sequence 1; dev-2 writing the same sequence is its own write, not a
    // resend of dev-1's (sequence spaces are per certificate).
    let first = answers(&appliance.aioquic("dev-1", &["--frames", "1", "--records", "4", "--key-prefix", "one"]));
    let second = answers(&appliance.aioquic("dev-2", &["--frames", "1", "--records", "3", "--key-prefix", "two"]));
    assert_eq!(first[0]["kind"], "ack", "{}", first[0]);
    assert_eq!(second[0]["kind"], "ack", "dev-2's sequence 1 is not dev-1's: {}", second[0]);
    assert_ne!(first[0]["parts"], second[0]["parts"], "dev-2 was not answered with dev-1's offsets");
    assert_eq!(appliance.metric("weir_quic_frame_errors_total{reason=\"malformed_frame\"}"), 1.0);
    appliance.stop();
    let records = stored(root.path(), "telemetry", 2);
    assert_eq!(records.len(), 4 + 3, "the forged frame stored nothing");
    for record in &records {
        let key = std::str::from_utf8(record.key.as_deref().unwrap()).unwrap();
        let device: &[u8] = if key.starts_with("one") { b"dev-1" } else { b"dev-2" };
        assert!(!key.starts_with("forged"), "{key}");
        assert_eq!(header(record, "weir.device"), vec![device], "{key}: one device header, from the certificate");
    }
}

#[test]
fn a_device_cannot_exceed_its_record_quota_even_with_more_connections() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1", "dev-2"]);
    // 2 records/s per device, split over its 2 allowed connections: each connection's
    // bucket holds one 4-record frame and refills one record a second.
    let appliance = start(
        root.path(),
        "device_records_per_s_max = 2\nconnections_per_device_max = 2\nrecords_per_frame_max = 4",
        &[("telemetry", 2)],
        1,
    );
    // dev-1 opens three connections at once, each sending three 4-record frames.
    let output = appliance.aioquic(
        "dev-1",
        &["--connections", "3", "--frames", "3", "--records", "4", "--hold-ms", "500", "--key-prefix", "greedy"],
    );
    let got = answers(&output);
    let acked: Vec<_> = got.iter().filter(|answer| answer["kind"] == "ack").collect();
    let over_quota = got.iter().filter(|answer| answer["error_code"] == 9).count();
    let closed: Vec<_> = got.iter().filter(|answer| answer["kind"] == "closed").collect();
    assert_eq!(closed.len(), 1, "the third connection is refused: {got:#?}");
    assert!(closed[0]["reason"].as_str().unwrap().contains("connections_per_device_max"), "{got:#?}");
    assert_eq!(acked.len(), 2, "one frame per connection fits its share of the quota: {got:#?}");
    assert_eq!(over_quota, 4, "the other frames are QuotaExceeded: {got:#?}");
    // Another device's quota is its own.
    let other = answers(&appliance.aioquic("dev-2", &["--frames", "1", "--records", "4", "--key-prefix", "other"]));
    assert_eq!(other[0]["kind"], "ack", "{}", other[0]);
    assert_eq!(refusals(&appliance, "connections_per_device_max"), 1.0);
    assert_eq!(appliance.metric("weir_quic_frame_errors_total{reason=\"quota_exceeded\"}"), 4.0);
    appliance.stop();
    let records = stored(root.path(), "telemetry", 2);
    let greedy = records.iter().filter(|record| header(record, "weir.device") == vec![&b"dev-1"[..]]).count();
    assert_eq!(greedy, 2 * 4, "dev-1 stored two frames' worth, whatever it opened");
    assert_eq!(records.len(), 2 * 4 + 4);
}

#[test]
fn a_device_cannot_reach_a_topic_it_is_not_allowed() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1"]);
    let appliance = start(root.path(), "topics_allowed = [\"telemetry\"]", &[("telemetry", 2), ("audit", 1)], 1);
    let forbidden = answers(&appliance.aioquic("dev-1", &["--topic", "audit", "--frames", "3", "--sequence", "1"]));
    assert_eq!(forbidden.len(), 3);
    for answer in &forbidden {
        assert_eq!(answer["error_code"], 3, "TopicNotAllowed: {answer}");
    }
    let allowed = answers(&appliance.aioquic("dev-1", &["--topic", "telemetry", "--frames", "1", "--sequence", "10"]));
    assert_eq!(allowed[0]["kind"], "ack", "{}", allowed[0]);
    assert!(appliance.metric("weir_quic_frame_errors_total{reason=\"topic_not_allowed\"}") >= 1.0);
    appliance.stop();
    assert_eq!(stored(root.path(), "audit", 1).len(), 0, "nothing reached the topic devices may not write");
    assert_eq!(stored(root.path(), "telemetry", 2).len(), 4);
}

/// Sends the first flight of a new QUIC connection (a client Initial with weir's ALPN)
/// to `server` every `pause` until `stop` is set or `count_max` were sent, and never
/// answers anything: handshakes that never finish, from one address. Returns how many.
fn flood_handshakes(server: SocketAddr, pause: Duration, count_max: usize, stop: &AtomicBool) -> usize {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"weir/1".to_vec()];
    let quic = quinn_proto::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let client = quinn_proto::ClientConfig::new(Arc::new(quic));
    let mut endpoint = quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, true, None);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buffer = Vec::new();
    let mut sent = 0;
    while sent < count_max && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let (_handle, mut connection) = endpoint.connect(now, client.clone(), server, "localhost").unwrap();
        buffer.clear();
        while let Some(transmit) = connection.poll_transmit(now, 1, &mut buffer) {
            let _ = socket.send_to(&buffer[..transmit.size], server);
            buffer.clear();
        }
        sent += 1;
        std::thread::sleep(pause);
    }
    sent
}

#[test]
fn a_handshake_flood_is_held_to_its_limits_and_well_behaved_devices_are_still_served() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1", "dev-2"]);
    // Past 4 handshakes in progress a new address must answer a Retry first; a flood
    // that never answers holds at most those 4 (until they time out).
    let appliance = start(
        root.path(),
        "handshakes_before_retry = 4\nhandshakes_max = 64\nidle_timeout_s = 5",
        &[("telemetry", 2)],
        1,
    );
    let server: SocketAddr = appliance.quic.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || flood_handshakes(server, Duration::from_micros(500), 20_000, &stop))
    };
    let mut in_progress_max = 0.0f64;
    let mut attempts = Vec::new();
    let flood_started = Instant::now();
    while flood_started.elapsed() < Duration::from_secs(4) {
        in_progress_max = in_progress_max.max(appliance.metric("weir_quic_handshakes_in_progress"));
        std::thread::sleep(Duration::from_millis(50));
    }
    for (round, device) in ["dev-1", "dev-2", "dev-1"].into_iter().enumerate() {
        attempts.push(well_behaved(&appliance, device, 2, 1 + 10 * round as u64));
        in_progress_max = in_progress_max.max(appliance.metric("weir_quic_handshakes_in_progress"));
    }
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.join().unwrap();
    let flood_seconds = flood_started.elapsed().as_secs_f64();
    let retries = appliance.metric("weir_quic_retries_sent_total");
    let accepted = appliance.metric("weir_quic_connections_accepted_total");
    eprintln!("flood: {flooded} handshakes, {retries} retries, in progress at most {in_progress_max}, good device attempts {attempts:?}");
    assert!(flooded >= 1_000, "the flood ran: {flooded}");
    assert!(
        in_progress_max <= 4.0 + 1.0,
        "the flood held at most 4 handshakes (+ the good device's): {in_progress_max}"
    );
    assert!(retries >= flooded as f64 - 64.0, "all but a few flood handshakes got a Retry: {retries} of {flooded}");
    // The flood's handshakes that were not sent a Retry: 4 at a time, each window
    // ending when they time out (idle_timeout_s = 5).
    let flood_accepted = accepted - 3.0;
    let windows = (flood_seconds / 5.0).ceil() + 1.0;
    assert!(flood_accepted <= 4.0 * windows, "{flood_accepted} flood handshakes in {flood_seconds:.1} s");
    appliance.stop();
    assert_eq!(stored(root.path(), "telemetry", 2).len(), 3 * 2 * 4, "every acked record is stored");
}

#[test]
fn an_idle_connection_flood_is_held_to_the_per_device_limit_and_well_behaved_devices_are_still_served() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1", "hog-1", "hog-2", "hog-3"]);
    // 3 hogs may hold 2 connections each: 6, however many they open (24 here; the
    // core's connections_max is above that, so only the per-device limit refuses).
    let appliance = start(root.path(), "connections_max = 32\nconnections_per_device_max = 2", &[("telemetry", 2)], 1);
    let hogs: Vec<Child> = ["hog-1", "hog-2", "hog-3"]
        .iter()
        .map(|hog| {
            device_command(&appliance, hog, &["--connections", "8", "--frames", "0", "--hold-ms", "8000"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Wait until the flood has settled: every hog connection admitted or refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    while refusals(&appliance, "connections_per_device_max") < 3.0 * 6.0 {
        assert!(Instant::now() < deadline, "the hogs' extra connections are refused");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Refused connections drain for a moment (QUIC's closing period), then only the
    // hogs' admitted connections stay open.
    let deadline = Instant::now() + Duration::from_secs(4);
    while appliance.metric("weir_quic_connections_open") > 6.0 {
        assert!(Instant::now() < deadline, "the refused connections drain");
        std::thread::sleep(Duration::from_millis(50));
    }
    let open_during = appliance.metric("weir_quic_connections_open");
    let attempts = well_behaved(&appliance, "dev-1", 3, 1);
    let open_after = appliance.metric("weir_quic_connections_open");
    let outputs: Vec<Output> = hogs.into_iter().map(|hog| hog.wait_with_output().unwrap()).collect();
    let per_device = refusals(&appliance, "connections_per_device_max");
    let at_max = refusals(&appliance, "connections_max");
    eprintln!("open during the flood {open_during}, after {open_after}; refused per device {per_device}, at connections_max {at_max}; good device attempts {attempts}");
    assert_eq!(open_during, 6.0, "the hogs hold 2 connections each, no more: {open_during}");
    assert_eq!(per_device, 3.0 * 6.0, "every connection past a hog's 2 is refused and counted");
    assert_eq!(at_max, 0.0, "the flood never filled the core");
    for output in &outputs {
        let got = answers(output);
        let refused = got.iter().filter(|answer| answer["kind"] == "closed" || answer["kind"] == "failed").count();
        assert_eq!(refused, 6, "each hog had 6 of its 8 connections refused: {got:#?}");
    }
    appliance.stop();
}

#[test]
fn a_flood_of_oversized_frames_is_refused_and_well_behaved_devices_are_still_served() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1", "big-1", "big-2", "big-3", "crowd-1"]);
    let appliance = start(
        root.path(),
        // Per-device room for a round's 4 connections while the last round's drain.
        "records_per_frame_max = 16\nframe_bytes_max = \"64 KiB\"\nconnections_per_device_max = 16",
        &[("telemetry", 2)],
        1,
    );
    let rounds = 3;
    let flood = {
        let commands: Vec<Vec<String>> = ["big-1", "big-2", "big-3"]
            .iter()
            .map(|device| {
                let command = device_command(
                    &appliance,
                    device,
                    // A frame header declaring 300 MB: the connection is closed at once.
                    &["--connections", "4", "--declare-length", "300000000", "--frames", "1"],
                );
                std::iter::once(command.get_program().to_string_lossy().into_owned())
                    .chain(command.get_args().map(|arg| arg.to_string_lossy().into_owned()))
                    .collect()
            })
            .collect();
        std::thread::spawn(move || {
            let mut closed = 0;
            for _ in 0..rounds {
                let children: Vec<Child> = commands
                    .iter()
                    .map(|argv| Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::piped()).spawn().unwrap())
                    .collect();
                for child in children {
                    let output = child.wait_with_output().unwrap();
                    closed += answers(&output).iter().filter(|answer| answer["kind"] == "closed").count();
                }
            }
            closed
        })
    };
    // Frames over records_per_frame_max, sent whole: answered FrameTooLarge, not stored.
    let crowded = answers(&appliance.aioquic("crowd-1", &["--frames", "4", "--records", "40", "--sequence", "100"]));
    let attempts: Vec<usize> = (0..3).map(|round| well_behaved(&appliance, "dev-1", 3, 1 + 10 * round)).collect();
    let closed = flood.join().unwrap();
    let protocol = refusals(&appliance, "protocol");
    let memory_peak_kib = std::fs::read_to_string(format!("/proc/{}/status", appliance.server.pid()))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:").map(|rest| rest.trim().trim_end_matches(" kB").parse::<u64>()))
        .unwrap()
        .unwrap();
    eprintln!("oversized: {closed} connections closed, {protocol} counted; weir peak RSS {memory_peak_kib} KiB; good device attempts {attempts:?}");
    assert_eq!(closed, rounds * 3 * 4, "every oversized frame closed its connection");
    assert_eq!(protocol, (rounds * 3 * 4) as f64, "and each was counted");
    assert!(memory_peak_kib < 512 * 1024, "no declared 300 MB frame was buffered: peak {memory_peak_kib} KiB");
    assert_eq!(crowded.len(), 4);
    assert!(crowded.iter().all(|answer| answer["error_code"] == 2), "FrameTooLarge: {crowded:#?}");
    assert_eq!(appliance.metric("weir_quic_frame_errors_total{reason=\"frame_too_large\"}"), 4.0);
    appliance.stop();
    let records = stored(root.path(), "telemetry", 2);
    let mut by_device: HashMap<Vec<u8>, usize> = HashMap::new();
    for record in &records {
        *by_device.entry(header(record, "weir.device")[0].to_vec()).or_default() += 1;
    }
    assert_eq!(by_device, HashMap::from([(b"dev-1".to_vec(), 3 * 3 * 4)]), "only the good device's records");
}

#[test]
fn the_admin_endpoint_and_the_kafka_api_bind_to_loopback_by_default() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1"]);
    // No [admin] section: the default address. Run in a network namespace of its own so
    // the default port cannot collide with anything else on this machine.
    let config = root.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\ngenerate_dev_certs = false\n",
            root.path().join("data").display(),
            root.path().join("certs").display()
        ),
    )
    .unwrap();
    let mut command = Command::new("unshare");
    command
        .args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" serve --cores 1 --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_weir"))
        .arg(&config);
    let (mut child, lines) = start_serving(command);
    let admin: SocketAddr = field(&lines, "admin=http://").expect("the admin address is logged").parse().unwrap();
    let kafka_api: SocketAddr = field(&lines, "kafka_api=").expect("the Kafka API address is logged").parse().unwrap();
    // Every TCP socket weir listens on (its TCP listeners are the admin endpoint and the
    // read-only Kafka API, both on by default).
    let listening: Vec<String> = ["tcp", "tcp6"]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(format!("/proc/{}/net/{table}", child.id()))
                .unwrap()
                .lines()
                .skip(1)
                .filter(|line| line.split_whitespace().nth(3) == Some("0A"))
                .map(|line| line.split_whitespace().nth(1).unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    Command::new("kill").arg("-INT").arg(child.id().to_string()).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "weir stops cleanly");
    assert!(admin.ip().is_loopback(), "admin endpoint on {admin}");
    assert!(kafka_api.ip().is_loopback(), "Kafka API on {kafka_api}");
    let mut listening = listening;
    listening.sort();
    let mut expected = vec![format!("0100007F:{:04X}", admin.port()), format!("0100007F:{:04X}", kafka_api.port())];
    expected.sort();
    assert_eq!(listening, expected, "the admin and Kafka API listeners, both on 127.0.0.1 (never 0.0.0.0 or ::)");
}
