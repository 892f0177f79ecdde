//! The stream watch end to end: a fleet of 1,000 simulated devices (weir-sim, each with
//! its own certificate and QUIC connection) writes one record a second to a real
//! `weir serve` on two cores that ships to a real broker (tansu); 10 devices stop and
//! 5 restart with sequences from below. `weir alerts --json` must name exactly those
//! 15 (silence for the stopped, restart for the restarted) and nothing else, and so
//! must the upstream `_weir.alerts` topic, read with an independent Kafka client
//! (confluent-kafka).
//!
//! Needs `tools/install-broker` (tansu and confluent-kafka in ./.venv).

#[path = "common/broker.rs"]
mod broker;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::{free_port, read_upstream, Tansu};
use server::{weir, Server};

const DEVICES: usize = 1000;
const STOPPED: usize = 10;
const RESTARTED: usize = 5;
/// When the faulty devices stop or restart, after the fleet starts writing.
const FAULT_AFTER_S: u64 = 10;

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_weir")).with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (tools/test does)", path.display());
    path
}

/// The expected alerts: (device, kind).
fn expected() -> BTreeSet<(String, String)> {
    let stopped = (0..STOPPED).map(|index| (format!("sim-{index}"), "silence".to_owned()));
    let restarted = (STOPPED..STOPPED + RESTARTED).map(|index| (format!("sim-{index}"), "restart".to_owned()));
    stopped.chain(restarted).collect()
}

/// `weir alerts --json` against the server: (exit code, the open alerts as (device, kind, topic)).
fn weir_alerts(server: &Server) -> (i32, Vec<serde_json::Value>) {
    let output = weir().args(["alerts", "--json", "--admin", &server.admin]).output().unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(answer["enabled"], true);
    (output.status.code().unwrap(), answer["alerts"].as_array().unwrap().clone())
}

fn pairs(alerts: &[serde_json::Value]) -> BTreeSet<(String, String)> {
    alerts
        .iter()
        .map(|alert| (alert["device"].as_str().unwrap().into(), alert["kind"].as_str().unwrap().into()))
        .collect()
}

/// A metric's value in a `/metrics` text (the first series whose name and labels start so).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .unwrap_or_else(|| panic!("{series} not in /metrics"))
        .parse()
        .unwrap()
}

struct Fleet(Child);

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stopped_and_restarted_devices_of_a_thousand_are_alerted_exactly_and_shipped_upstream() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("certs");
    let output = weir()
        .args(["certs", "--device-count", &DEVICES.to_string(), "--device-prefix", "sim-", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let tansu = Tansu::start();
    tansu.create_topic("telemetry", 4);
    tansu.create_topic("_weir.alerts", 1);
    let config = root.path().join("weir.toml");
    // Silence after 5 x the learned interval (about 1 s), at least 5 s; a restart stays
    // open 10 minutes; rate windows too long to judge within the test.
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {certs:?}\ngenerate_dev_certs = false\n\
             [upstream]\nenabled = true\nbootstrap_servers = [\"{broker}\"]\nrequest_timeout_ms = 5000\n\
             connect_timeout_ms = 1000\nretry_backoff_ms_min = 20\nretry_backoff_ms_max = 200\n\
             [watch]\nsilence_factor = 5.0\nsilence_s_min = 5\nsilence_s_max = 20\nlearn_records = 5\n\
             rate_window_s = 3600\nrestart_hold_s = 600\n\
             [[topics]]\nname = \"telemetry\"\npartitions = 4\n\
             [[topics]]\nname = \"_weir.alerts\"\npartitions = 1\n",
            data = root.path().join("data").display(),
            admin = free_port(),
            certs = certs.display(),
            broker = tansu.address(),
        ),
    )
    .unwrap();
    let server = Server::start(&config, 2);
    let quic = server.quic.clone().expect("the QUIC listener is on");
    let fleet = Fleet(
        Command::new(binary("weir-sim"))
            .args(["--server", &quic, "--devices", &DEVICES.to_string(), "--rate", "1", "--record-bytes", "64"])
            .args(["--seconds", "120", "--threads", "2", "--certs"])
            .arg(&certs)
            .args(["--stop-devices", &STOPPED.to_string(), "--stop-after-seconds", &FAULT_AFTER_S.to_string()])
            .args(["--restart-devices", &RESTARTED.to_string(), "--restart-after-seconds", &FAULT_AFTER_S.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Every device writes: the watch tracks 1,000 streams, all healthy.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = server.get("/metrics");
        if metric(&metrics, "weir_watch_streams") as usize == DEVICES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watch never saw every device: {}",
            metric(&metrics, "weir_watch_streams")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, alerts) = weir_alerts(&server);
    assert!(alerts.is_empty() && code == 0, "alerts before any fault: {alerts:?}");
    // The faults happen FAULT_AFTER_S into the run; within the bound (docs/WATCH.md:
    // silence_s_min + a tick + a flush for the silenced, at once for the restarted)
    // exactly those devices are alerted, and while the fleet goes on nothing else is.
    let expected = expected();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, alerts) = weir_alerts(&server);
        let found = pairs(&alerts);
        assert!(found.is_subset(&expected), "unexpected alerts: {:?}", found.difference(&expected).collect::<Vec<_>>());
        if found == expected {
            break;
        }
        assert!(Instant::now() < deadline, "not every fault was alerted: missing {:?}", expected.difference(&found));
        std::thread::sleep(Duration::from_millis(250));
    }
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(250));
        let (code, alerts) = weir_alerts(&server);
        assert_eq!(pairs(&alerts), expected, "the alerts changed while the fleet went on");
        assert_eq!(code, 1, "open alerts make `weir alerts` exit 1");
        for alert in &alerts {
            assert_eq!(alert["topic"], "telemetry");
            let evidence = alert["evidence"].as_str().unwrap();
            match alert["kind"].as_str().unwrap() {
                "silence" => assert!(evidence.starts_with("no record for "), "{evidence}"),
                _ => assert!(evidence.contains(" after "), "{evidence}"),
            }
        }
    }
    // The same 15 open events reached the broker as records of _weir.alerts.
    let upstream = read_upstream(&tansu.address(), "_weir.alerts", 0, expected.len(), Duration::from_secs(30));
    let mut shipped = BTreeSet::new();
    for record in &upstream {
        let event: serde_json::Value = serde_json::from_slice(record.value.as_deref().unwrap()).unwrap();
        assert_eq!(record.key.as_deref(), Some(event["device"].as_str().unwrap().as_bytes()));
        assert_eq!(event["state"], "open", "{event}");
        assert!(
            shipped.insert((event["device"].as_str().unwrap().to_owned(), event["kind"].as_str().unwrap().to_owned())),
            "{event} twice"
        );
    }
    assert_eq!(shipped, expected);
    // The fleet was still writing through it all (its end would silence everyone).
    let mut fleet = fleet;
    assert!(fleet.0.try_wait().unwrap().is_none(), "weir-sim ended early");
    let (_, metrics) = server.get("/metrics");
    assert_eq!(metric(&metrics, "weir_watch_alerts_open{kind=\"silence\"}"), STOPPED as f64);
    assert_eq!(metric(&metrics, "weir_watch_alerts_open{kind=\"restart\"}"), RESTARTED as f64);
    assert_eq!(metric(&metrics, "weir_watch_events_total{kind=\"silence\",state=\"open\"}"), STOPPED as f64);
    assert_eq!(metric(&metrics, "weir_watch_observations_dropped_total"), 0.0);
    drop(fleet);
    // `_weir.alerts` is weir's own: a device that writes it is refused.
    let intruder = Command::new(binary("weir-sim"))
        .args(["--server", &quic, "--devices", "1", "--device-first", "999", "--rate", "5", "--seconds", "1"])
        .args(["--topic", "_weir.alerts", "--threads", "1", "--drain-seconds", "5", "--certs"])
        .arg(&certs)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&intruder.stderr);
    assert_eq!(intruder.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no topic \"_weir.alerts\""), "{stderr}");
    assert_eq!(server.stop(), Some(0));
}
