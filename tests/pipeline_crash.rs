//! The whole pipeline under crashes: simulated devices (weir-sim, each with its own
//! certificate and connection) write to `weir serve` (two cores), which ships to tansu
//! with SQLite storage; weir is SIGKILLed at random moments 100 times and started
//! again on the same data directory and ports, and every tenth round the broker is
//! stopped too (SIGTERM or SIGKILL) and started again on its database, mid-shipping.
//! The devices keep writing throughout: a frame unanswered when weir died is sent
//! again under the same sequence once they reconnect, and weir answers it from its
//! de-duplication state (rebuilt from the log at start) instead of storing it twice.
//!
//! Then weir runs until the devices are done and everything is shipped, and:
//! - every record acked to a device is upstream exactly once, at the offset its ack
//!   named, with its device and sequence, in per-device order;
//! - upstream holds nothing that was not acked, and every record the devices made was
//!   acked (none given up on).
//!
//! The seed is printed; replay with WEIR_PIPELINE_CRASH_SEED. WEIR_PIPELINE_KILLS sets
//! the number of kills (default 100).

#[path = "common/broker.rs"]
mod broker;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::{free_port, read_upstream, TansuSqlite, UpstreamRecord};
use fleet::{binary, compare, env_u64, write_profile, FleetConfig};
use rand::{Rng, SeedableRng};
use server::Server;

const PARTITIONS: u32 = 2;
const DEVICES: u32 = 8;
/// Records per second per device.
const RATE: u32 = 20;
/// How long the devices write; the kills go on after that while they drain.
const WRITE_SECONDS: u64 = 90;

/// A UDP port nobody listens on now.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn every_acked_record_reaches_upstream_exactly_once_across_100_sigkills_and_broker_restarts() {
    let seed = env_u64("WEIR_PIPELINE_CRASH_SEED", rand::random());
    let kills = env_u64("WEIR_PIPELINE_KILLS", 100);
    eprintln!("seed {seed} (replay with WEIR_PIPELINE_CRASH_SEED={seed}), {kills} kills");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path();
    let output = Command::new(binary("weir"))
        .args(["certs", "--device-count", &DEVICES.to_string(), "--device-prefix", "sim-", "--dir"])
        .arg(root.join("certs"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut tansu = TansuSqlite::start(&root.join("broker"));
    tansu.create_topic("central", PARTITIONS);
    let quic_port = free_udp_port();
    let (quic, admin) = (format!("127.0.0.1:{quic_port}"), format!("127.0.0.1:{}", free_port()));
    let config = FleetConfig {
        partitions: PARTITIONS,
        admin: &admin,
        quic: &quic,
        quic_extra: "",
        upstream: Some(&tansu.address()),
    }
    .write(root);
    // A short answer timeout: a device whose weir died reconnects and resends soon.
    let profile = write_profile(root, 1500);
    let acked_log = root.join("acked.txt");
    let mut weir = Some(Server::start(&config, 2));
    let sim = Command::new(binary("weir-sim"))
        .args(["--server", &format!("127.0.0.1:{quic_port}"), "--devices", &DEVICES.to_string()])
        .args(["--rate", &RATE.to_string(), "--seconds", &WRITE_SECONDS.to_string()])
        .args(["--record-bytes", "100", "--threads", "1", "--frames-in-flight", "4"])
        .args(["--devices-per-endpoint", "1", "--drain-seconds", "900"])
        .arg("--profile")
        .arg(&profile)
        .arg("--certs")
        .arg(root.join("certs"))
        .arg("--acked-log")
        .arg(&acked_log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let mut broker_restarts = 0;
    for round in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        if round % 10 == 5 {
            if rng.gen_bool(0.5) {
                tansu.stop();
            } else {
                tansu.kill();
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(50..500)));
            tansu.resume();
            broker_restarts += 1;
            std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
        }
        drop(weir.take()); // SIGKILL
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        weir = Some(Server::start(&config, 2));
    }
    let weir = weir.take().unwrap();

    // The devices finish (every record acked, or given up on) against the last weir.
    let sim_output = sim.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&sim_output.stdout);
    assert!(
        sim_output.status.success(),
        "weir-sim failed ({}): {stdout}\n{}",
        sim_output.status,
        String::from_utf8_lossy(&sim_output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|error| panic!("weir-sim's summary ({error}): {stdout}"));
    let number = |name: &str| summary[name].as_u64().unwrap_or_else(|| panic!("{name} in {summary}"));
    let status = weir.wait_status(Duration::from_secs(180), "every partition shipped", |status| {
        status["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|partition| partition["shipper"]["cursor_offset"].as_i64() == partition["log_end_offset"].as_i64())
    });
    let log_ends: BTreeMap<u32, u64> = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|partition| {
            (partition["partition"].as_u64().unwrap() as u32, partition["log_end_offset"].as_u64().unwrap())
        })
        .collect();
    let mut upstream: BTreeMap<u32, Vec<UpstreamRecord>> = BTreeMap::new();
    for (&partition, &end) in &log_ends {
        let records =
            read_upstream(&tansu.address(), "central", partition as i32, end as usize, Duration::from_secs(180));
        upstream.insert(partition, records);
    }
    let weir_log = weir.log_lines().join("\n");
    assert_eq!(weir.stop(), Some(0), "weir stops cleanly at the end");
    assert!(!weir_log.contains("shipping stopped"), "no shipper stopped");

    let acked_text = std::fs::read_to_string(&acked_log).unwrap();
    let verdict = compare(&acked_text, &upstream);
    let stored: u64 = log_ends.values().sum();
    let upstream_count: u64 = upstream.values().map(|records| records.len() as u64).sum();
    let (generated, acked) = (number("generated"), number("acked"));
    eprintln!(
        "pipeline crash loop: {kills} SIGKILLs of weir, {broker_restarts} broker restarts, {:.0} s; \
         devices generated {generated}, acked {acked}; weir stored {stored}; upstream {upstream_count}; \
         lost {}, duplicated {}, unacked upstream {}; ack latency p50 {} us, p99 {} us, max {} us",
        started.elapsed().as_secs_f64(),
        verdict.lost,
        verdict.duplicated,
        verdict.unacked + verdict.malformed,
        number("p50_us"),
        number("p99_us"),
        number("max_us"),
    );
    for field in ["failed_records", "abandoned_sends"] {
        assert_eq!(summary[field], 0, "seed {seed}: weir-sim {field}: {summary}");
    }
    assert!(generated >= u64::from(DEVICES * RATE) * WRITE_SECONDS / 2, "seed {seed}: the devices kept writing");
    assert_eq!(acked, generated, "seed {seed}: every record the devices made was acked");
    assert_eq!(verdict.lost, 0, "seed {seed}: acked records missing upstream where acked");
    assert_eq!(verdict.duplicated, 0, "seed {seed}: records upstream more than once");
    assert_eq!(verdict.unacked + verdict.malformed, 0, "seed {seed}: upstream records never acked, or out of order");
    assert_eq!(stored, acked, "seed {seed}: weir stored each acked record once");
    assert_eq!(upstream_count, acked, "seed {seed}: upstream holds each acked record once");
    assert!(broker_restarts >= kills / 10, "the broker was restarted");
}
