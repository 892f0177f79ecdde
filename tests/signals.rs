//! Signals against a real `weir serve`: SIGHUP under device traffic reloads a new server
//! certificate and the deny list with nothing acknowledged lost (new handshakes get the
//! new certificate, a newly denied device is refused on its next handshake, connections
//! already up go on); a SIGHUP whose config or certificate does not load is logged with
//! every problem and changes nothing; stray signals are logged and survived; SIGTERM and
//! SIGQUIT stop cleanly with a log line; after SIGKILL (which nothing can log) weir
//! starts again with every acknowledged record. Devices are weir-sim (a Rust QUIC
//! fleet, which can ask for a TLS server name) and the aioquic device.
//!
//! Waits are for events (a log line, a count), bounded only so a broken build fails
//! instead of hanging; nothing asserts on timing.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use appliance::{make_certs, Appliance};
use common::{header, read_partition};
use weir::core::log::batch::Record;

/// How long a test waits for an event before it fails.
const EVENT_WAIT: Duration = Duration::from_secs(30);

/// The tests of this file each start weir and load it; they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_weir")).with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (tools/test does)", path.display());
    path
}

/// weir-sim against `appliance` with the devices of `root/certs`, writing for `seconds`.
fn sim(appliance: &Appliance, args: &[&str], seconds: &str, acked_log: Option<&Path>) -> Command {
    let mut command = Command::new(binary("weir-sim"));
    command
        .args(["--server", &appliance.quic, "--seconds", seconds, "--threads", "1", "--drain-seconds", "10"])
        .args(["--rate", "200", "--record-bytes", "64", "--device-prefix", "sim-", "--certs"])
        .arg(appliance.certs())
        .args(args);
    if let Some(path) = acked_log {
        command.arg("--acked-log").arg(path);
    }
    command
}

/// The last stdout line of weir-sim: its summary.
fn summary(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| panic!("weir-sim printed nothing: {output:?}"));
    serde_json::from_str(last).unwrap_or_else(|error| panic!("{error}: {last}"))
}

fn answers(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout).lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

/// The aioquic device as `device` sends 2 frames; whether both were acked.
fn served(appliance: &Appliance, device: &str, sequence: u64) -> bool {
    let output = appliance.aioquic(device, &["--frames", "2", "--sequence", &sequence.to_string()]);
    let got = answers(&output);
    let acked = got.len() == 2 && got.iter().all(|answer| answer["kind"] == "ack");
    if !acked {
        eprintln!("{device} not served: {got:?} {}", String::from_utf8_lossy(&output.stderr));
    }
    acked
}

/// Rewrites the appliance's config with `quic_extra` in its `[quic]` section and
/// `top` before everything.
fn rewrite_config(appliance: &Appliance, top: &str, quic_extra: &str) {
    let path = appliance.root.join("weir.toml");
    let original = appliance.root.join("weir.toml.original");
    if !original.exists() {
        std::fs::copy(&path, &original).unwrap();
    }
    let text = std::fs::read_to_string(&original).unwrap();
    let marker = "generate_dev_certs = false\n";
    assert!(text.contains(marker), "{text}");
    let text = format!("{top}{}", text.replacen(marker, &format!("{marker}{quic_extra}\n"), 1));
    std::fs::write(&path, text).unwrap();
}

/// A new server certificate (and key) from the same CA, for `server_name` too, moved
/// into the appliance's certificates directory the way an operator would: written
/// beside it, then renamed into place.
fn install_new_server_certificate(appliance: &Appliance, server_name: &str) {
    let staging = appliance.root.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(appliance.certs().join(file), staging.join(file)).unwrap();
    }
    let output = server::weir().args(["certs", "--server-name", server_name, "--dir"]).arg(&staging).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for file in ["server.pem", "server.key"] {
        std::fs::rename(staging.join(file), appliance.certs().join(file)).unwrap();
    }
}

/// Every record of `topic` in the data directory, by (partition, offset).
fn stored(root: &Path, topic: &str, partitions: u32) -> HashMap<(u64, u64), Record> {
    let mut records = HashMap::new();
    for partition in 0..partitions {
        for (offset, record) in read_partition(root.join(format!("data/{topic}-{partition}"))) {
            records.insert((u64::from(partition), offset as u64), record);
        }
    }
    records
}

/// Checks every line of weir-sim's acked log against the log; returns how many.
fn assert_every_acked_record_is_stored(acked_log: &Path, stored: &HashMap<(u64, u64), Record>) -> usize {
    let acked = std::fs::read_to_string(acked_log).unwrap();
    let mut count = 0;
    for line in acked.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (device, sequence) = (fields[0], fields[1]);
        let (partition, offset): (u64, u64) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        let record = stored.get(&(partition, offset)).unwrap_or_else(|| panic!("acked {line} is not in the log"));
        assert_eq!(header(record, "weir.device"), Some(device), "{line}");
        assert_eq!(header(record, "weir.sequence"), Some(sequence), "{line}");
        count += 1;
    }
    count
}

fn spawn(mut command: Command) -> Child {
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

#[test]
fn sighup_under_traffic_reloads_the_server_certificate_and_the_deny_list_and_loses_nothing() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["sim-0", "sim-1", "sim-2", "dev-9"]);
    let appliance = Appliance::start(root.path(), "", "", &[("telemetry", 2)], 2);
    // The certificate weir started with does not name reloaded.test: a device that
    // asks for that name refuses the handshake.
    let before =
        sim(&appliance, &["--devices", "1", "--device-first", "2", "--server-name", "reloaded.test"], "0.5", None)
            .output()
            .unwrap();
    assert_eq!(summary(&before)["acked"], 0, "{}", String::from_utf8_lossy(&before.stderr));

    // Two devices write through the reload.
    let acked_log = root.path().join("acked.txt");
    let traffic = spawn(sim(&appliance, &["--devices", "2"], "4", Some(&acked_log)));
    let acked_before_reload = appliance.metric("weir_quic_frames_acked_total");
    let mut waited = 0;
    while appliance.metric("weir_quic_frames_acked_total") <= acked_before_reload {
        assert!(waited < 600, "no frame acked while weir-sim writes");
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    install_new_server_certificate(&appliance, "reloaded.test");
    rewrite_config(&appliance, "", "devices_denied = [\"sim-1\"]");
    appliance.server.signal("HUP");
    let reloaded = appliance.server.wait_log(EVENT_WAIT, "reload", |line| line.contains("SIGHUP: reloaded"));
    assert!(reloaded.contains("quic certificates: new server.pem, server.key"), "{reloaded}");
    assert!(reloaded.contains("quic.devices_denied: +sim-1"), "{reloaded}");
    let log = appliance.server.log_lines();
    assert!(!log.iter().any(|line| line.contains("apply after a restart")), "nothing needs a restart");
    let traffic = traffic.wait_with_output().unwrap();
    assert!(traffic.status.success(), "{}", String::from_utf8_lossy(&traffic.stderr));
    let during = summary(&traffic);
    // Connections up before the reload go on, the denied device's too.
    assert_eq!(during["connected"], 2, "{during}");
    assert_eq!(during["errors"], 0, "{during}");
    assert!(during["acked"].as_u64().unwrap() > 0, "{during}");

    // New handshakes get the new certificate ...
    let after =
        sim(&appliance, &["--devices", "1", "--device-first", "2", "--server-name", "reloaded.test"], "0.5", None)
            .output()
            .unwrap();
    assert!(summary(&after)["acked"].as_u64().unwrap() > 0, "{}", String::from_utf8_lossy(&after.stderr));
    // ... and the newly denied device is refused on its next one; others are served.
    let denied_before = appliance.metric("weir_quic_refusals_total{reason=\"device_denied\"}");
    assert!(!served(&appliance, "sim-1", 1), "sim-1 is denied since the reload");
    assert_eq!(appliance.metric("weir_quic_refusals_total{reason=\"device_denied\"}"), denied_before + 1.0);
    assert!(served(&appliance, "dev-9", 1));

    appliance.stop();
    let stored = stored(root.path(), "telemetry", 2);
    let acked = assert_every_acked_record_is_stored(&acked_log, &stored);
    assert_eq!(acked as u64, during["acked"].as_u64().unwrap(), "weir-sim's count and its acked log agree");
}

#[test]
fn sighup_with_a_broken_config_or_certificate_keeps_serving_and_logs_every_problem() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1", "dev-2"]);
    let appliance = Appliance::start(root.path(), "", "", &[("telemetry", 1)], 1);
    let refusals = |appliance: &Appliance| {
        appliance.server.log_lines().iter().filter(|line| line.contains("SIGHUP: reload refused")).count()
    };

    // Three bad fields: every one is named, nothing is applied, devices are served.
    rewrite_config(
        &appliance,
        "log_level = \"info,weir=loud\"\n",
        "connections_max = 0\ndevices_denied = [\"dev-2\", \"not a device\"]",
    );
    appliance.server.signal("HUP");
    let refused = appliance.server.wait_log(EVENT_WAIT, "refusal", |line| line.contains("SIGHUP: reload refused"));
    for field in ["log_level:", "quic.connections_max:", "quic.devices_denied: \"not a device\" is not a device id"] {
        assert!(refused.contains(field), "{field} missing: {refused}");
    }
    assert!(refused.contains("(3 problems)"), "{refused}");
    assert!(served(&appliance, "dev-1", 1));
    assert!(served(&appliance, "dev-2", 1), "the broken config's deny list was not applied");

    // A good config with a server key that does not load: refused as a whole (the deny
    // list in the same reload is not applied either), with the file named.
    rewrite_config(&appliance, "", "devices_denied = [\"dev-2\"]");
    let key = appliance.certs().join("server.key");
    let good_key = std::fs::read(&key).unwrap();
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n").unwrap();
    appliance.server.signal("HUP");
    let mut waited = 0;
    while refusals(&appliance) < 2 {
        assert!(waited < 600, "the second reload was not refused");
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    let refused =
        appliance.server.log_lines().into_iter().filter(|line| line.contains("reload refused")).nth(1).unwrap();
    assert!(refused.contains(&key.display().to_string()), "{refused}");
    assert!(served(&appliance, "dev-2", 10), "new handshakes still use the running certificate and lists");

    // Fixed: the same reload now applies.
    std::fs::write(&key, good_key).unwrap();
    appliance.server.signal("HUP");
    let reloaded = appliance.server.wait_log(EVENT_WAIT, "reload", |line| line.contains("SIGHUP: reloaded"));
    assert!(reloaded.contains("quic.devices_denied: +dev-2"), "{reloaded}");
    assert!(!reloaded.contains("quic certificates"), "the certificate files are the ones loaded at start: {reloaded}");
    assert!(!served(&appliance, "dev-2", 20));
    assert!(served(&appliance, "dev-1", 20));
    appliance.stop();
}

#[test]
fn a_field_read_at_start_is_reported_as_needing_a_restart_and_the_log_level_applies_live() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1"]);
    let appliance = Appliance::start(root.path(), "", "", &[("telemetry", 1)], 1);
    rewrite_config(&appliance, "log_level = \"debug\"\n", "connections_max = 77");
    appliance.server.signal("HUP");
    let reloaded = appliance.server.wait_log(EVENT_WAIT, "reload", |line| line.contains("SIGHUP: reloaded"));
    assert!(reloaded.contains("log_level: \"info\" -> \"debug\""), "{reloaded}");
    let restart = appliance.server.wait_log(EVENT_WAIT, "restart list", |line| line.contains("apply after a restart"));
    assert!(restart.contains("fields=quic.connections_max"), "{restart}");
    match std::env::var("WEIR_LOG") {
        // WEIR_LOG wins over log_level, and weir says so.
        Ok(_) => {
            appliance.server.wait_log(EVENT_WAIT, "WEIR_LOG note", |line| line.contains("WEIR_LOG is set"));
        }
        // Debug lines appear from the reload on (a device's connection is one).
        Err(_) => {
            let debug_before = appliance.server.log_lines().iter().filter(|line| line.contains("DEBUG")).count();
            assert!(served(&appliance, "dev-1", 1));
            appliance.server.wait_log(EVENT_WAIT, "a debug line", |line| {
                line.contains("DEBUG") && line.contains("device connected")
            });
            assert!(debug_before < appliance.server.log_lines().iter().filter(|line| line.contains("DEBUG")).count());
        }
    }
    appliance.stop();
}

#[test]
fn stray_signals_are_logged_and_survived() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["dev-1"]);
    let appliance = Appliance::start(root.path(), "", "", &[("telemetry", 1)], 1);
    for signal in ["USR1", "USR2", "ALRM", "PIPE", "RTMIN+3"] {
        appliance.server.signal(signal);
    }
    for logged in ["SIGUSR1: ignored", "SIGUSR2: ignored", "SIGALRM: ignored", "SIGRTMIN+3: ignored"] {
        appliance.server.wait_log(EVENT_WAIT, logged, |line| line.contains(logged));
    }
    assert!(served(&appliance, "dev-1", 1), "weir still serves");
    assert_eq!(appliance.server.get("/health").0, 200);
    appliance.stop();
}

#[test]
fn sigterm_and_sigquit_are_logged_and_stop_cleanly() {
    let _serial = one_at_a_time();
    for (signal, logged) in [("TERM", "SIGTERM: stopping cleanly"), ("QUIT", "SIGQUIT: stopping cleanly")] {
        let root = tempfile::tempdir().unwrap();
        make_certs(&root.path().join("certs"), &["dev-1"]);
        let appliance = Appliance::start(root.path(), "", "", &[("telemetry", 1)], 1);
        assert!(served(&appliance, "dev-1", 1));
        appliance.server.signal(signal);
        appliance.server.wait_log(EVENT_WAIT, logged, |line| line.contains(logged));
        appliance.server.wait_log(EVENT_WAIT, "stopped", |line| line.contains("weir stopped cleanly"));
        let status = appliance.server.wait();
        assert_eq!(status.code(), Some(0), "{signal}: {status}");
        let stored = stored(root.path(), "telemetry", 1);
        assert_eq!(stored.len(), 2 * 4, "the 2 acked frames of 4 records each");
    }
}

#[test]
fn after_sigkill_under_traffic_weir_starts_again_with_every_acked_record() {
    let _serial = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    make_certs(&root.path().join("certs"), &["sim-0", "sim-1"]);
    let appliance = Appliance::start(root.path(), "", "", &[("telemetry", 2)], 2);
    let acked_log = root.path().join("acked.txt");
    let traffic = spawn(sim(&appliance, &["--devices", "2"], "3", Some(&acked_log)));
    let mut waited = 0;
    while appliance.metric("weir_quic_frames_acked_total") < 10.0 {
        assert!(waited < 600, "no frames acked while weir-sim writes");
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    appliance.server.signal("KILL");
    let status = appliance.server.wait();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let _ = traffic.wait_with_output().unwrap();
    // What systemd's Restart=always does: start it again on the same directory.
    let again = Appliance::start(root.path(), "", "", &[("telemetry", 2)], 2);
    again.stop();
    let acked = assert_every_acked_record_is_stored(&acked_log, &stored(root.path(), "telemetry", 2));
    assert!(acked >= 10, "{acked} acked records checked");
}
