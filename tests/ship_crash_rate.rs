//! Issue 19, as an operator's worst night: 50 simulated devices (weir-sim) at 40
//! records/s each (2,000 records/s) write to `weir serve` on two cores, which ships to
//! one upstream topic of 4 partitions ("kept" partitioning); weir is SIGKILLed about
//! every 8 s and started again at once on the same data directory and ports. Three
//! upstreams, one test each: tansu 0.6 with memory storage (where shippers used to
//! stop for good: a batch of the killed process still being stored when the restarted
//! one scanned, see docs/UPSTREAM.md, "How the scan reads a Fetch answer"), tansu 0.6
//! with SQLite storage, and krafka's `FakeBroker` (Kafka's de-duplication rules).
//!
//! Then the devices finish, weir ships everything, and:
//! - no shipper stopped, in any of weir's lives, and every lag is 0 at the end;
//! - every record acked to a device is upstream exactly once, at the offset its ack
//!   named, with its device and sequence, in per-device order; nothing unacked is
//!   upstream. The reader reads each partition to its end by Fetch (confluent-kafka,
//!   check.crcs), past whatever ListOffsets says (tansu's memory storage answers
//!   ListOffsets(latest) with the last batch's base offset + 1); tansu's SQLite
//!   storage is read from its database (its Fetch looks up every record's headers
//!   without an index: reading ~100,000 records back takes longer than the run), the
//!   FakeBroker from its own log.
//!
//! The suite runs `WEIR_RATE_KILLS` kills per upstream (default 6, ~1.5 min each);
//! the long run is `WEIR_LONG=1` (24 kills each; its counts are in docs/RELIABILITY.md).
//! The seed is printed; replay with WEIR_RATE_CRASH_SEED.

#[path = "common/broker.rs"]
mod broker;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::{free_port, read_tansu_sqlite, read_upstream, Tansu, TansuSqlite, UpstreamRecord};
use fleet::{binary, compare, env_u64, write_profile, FleetConfig};
use rand::{Rng, SeedableRng};
use server::Server;

const PARTITIONS: u32 = 4;
const DEVICES: u32 = 50;
/// Records per second per device.
const RATE: u32 = 40;
/// The time between two kills: about 8 s.
const KILL_SPACING_MS: std::ops::Range<u64> = 7_000..9_000;
const KILLS_SUITE: u64 = 6;
const KILLS_LONG: u64 = 24;

/// The upstream a run ships to.
enum Upstream {
    TansuMemory(Tansu),
    TansuSqlite(TansuSqlite),
    Fake { broker: krafka::testing::FakeBroker, _runtime: tokio::runtime::Runtime },
}

impl Upstream {
    fn start(kind: &str, root: &std::path::Path) -> Upstream {
        let upstream = match kind {
            "tansu-memory" => Upstream::TansuMemory(Tansu::start()),
            "tansu-sqlite" => Upstream::TansuSqlite(TansuSqlite::start(&root.join("broker"))),
            "fake" => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let broker =
                    runtime.block_on(krafka::testing::FakeBroker::start_cluster(1)).expect("FakeBroker starts");
                Upstream::Fake { broker, _runtime: runtime }
            }
            other => panic!("no upstream {other}"),
        };
        match &upstream {
            Upstream::TansuMemory(tansu) => tansu.create_topic("central", PARTITIONS),
            Upstream::TansuSqlite(tansu) => tansu.create_topic("central", PARTITIONS),
            Upstream::Fake { broker, .. } => assert!(broker.create_topic("central", PARTITIONS as i32)),
        }
        upstream
    }

    fn address(&self) -> String {
        match self {
            Upstream::TansuMemory(tansu) => tansu.address(),
            Upstream::TansuSqlite(tansu) => tansu.address(),
            Upstream::Fake { broker, .. } => broker.bootstrap_servers().split(',').next().unwrap().trim().to_owned(),
        }
    }

    /// Every record of `central`/`partition`, read to the partition's end by Fetch
    /// once at least `expect` are there.
    fn read(&self, partition: u32, expect: usize) -> Vec<UpstreamRecord> {
        match self {
            Upstream::Fake { broker, .. } => broker
                .all_records("central")
                .expect("the FakeBroker's records")
                .into_iter()
                .filter(|record| record.partition == partition as i32)
                .map(|record| UpstreamRecord {
                    offset: record.offset,
                    key: record.key.map(|key| key.to_vec()),
                    value: record.value.map(|value| value.to_vec()),
                    timestamp_ms: record.timestamp,
                    headers: record
                        .headers
                        .into_iter()
                        .map(|(name, value)| (name, value.map(|value| value.to_vec())))
                        .collect(),
                })
                .collect(),
            Upstream::TansuSqlite(tansu) => {
                let records = read_tansu_sqlite(tansu.directory(), "central", partition as i32);
                assert!(records.len() >= expect, "tansu's database holds {} records of {partition}", records.len());
                records
            }
            Upstream::TansuMemory(_) => {
                read_upstream(&self.address(), "central", partition as i32, expect, Duration::from_secs(300))
            }
        }
    }
}

/// A UDP port nobody listens on now.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What one weir process logged about its shippers before it was killed.
#[derive(Debug, Default)]
struct ShipperLog {
    stopped: Vec<String>,
    scans_retried: u64,
}

impl ShipperLog {
    fn take(&mut self, server: &Server) {
        for line in server.log_lines() {
            if line.contains("shipping stopped") {
                self.stopped.push(line);
            } else if line.contains("reconciliation with the upstream partition:") {
                self.scans_retried += 1;
            }
        }
    }
}

/// The three runs take turns: each alone loads both cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn crash_loop_at_2000_records_per_second(kind: &str) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let seed = env_u64("WEIR_RATE_CRASH_SEED", rand::random());
    let long = std::env::var("WEIR_LONG").is_ok_and(|value| value == "1");
    let kills = env_u64("WEIR_RATE_KILLS", if long { KILLS_LONG } else { KILLS_SUITE });
    eprintln!("{kind}: seed {seed} (replay with WEIR_RATE_CRASH_SEED={seed}), {kills} kills");
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
    let upstream = Upstream::start(kind, root);
    let quic_port = free_udp_port();
    let (quic, admin) = (format!("127.0.0.1:{quic_port}"), format!("127.0.0.1:{}", free_port()));
    let config = FleetConfig {
        partitions: PARTITIONS,
        admin: &admin,
        quic: &quic,
        quic_extra: "",
        upstream: Some(&upstream.address()),
    }
    .write(root);
    if kind == "tansu-sqlite" {
        // tansu's SQLite storage answers a Fetch in time that grows with what it
        // holds (it looks up every record's headers without an index): the default
        // request timeout (30 s), not the fleet tests' 5 s.
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, text.replace("request_timeout_ms = 5000", "request_timeout_ms = 30000")).unwrap();
    }
    let profile = write_profile(root, 1500);
    let acked_log = root.join("acked.txt");
    // The devices write while the kills go on, and a little longer.
    let write_seconds = kills * KILL_SPACING_MS.end / 1000 + 2;
    let mut weir = Some(Server::start(&config, 2));
    let sim = Command::new(binary("weir-sim"))
        .args(["--server", &quic, "--devices", &DEVICES.to_string()])
        .args(["--rate", &RATE.to_string(), "--seconds", &write_seconds.to_string()])
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

    let mut shippers = ShipperLog::default();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(KILL_SPACING_MS)));
        let killed = weir.take().unwrap();
        shippers.take(&killed);
        drop(killed); // SIGKILL
        weir = Some(Server::start(&config, 2)); // at once, as a supervisor would
    }
    let weir = weir.take().unwrap();

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
    let drain = Duration::from_secs(env_u64("WEIR_RATE_DRAIN_SECONDS", 300));
    let status = weir.wait_status(drain, "every partition shipped", |status| {
        let partitions = status["partitions"].as_array().unwrap();
        for partition in partitions {
            // A stopped shipper never catches up: fail at once, with its error.
            assert_ne!(partition["shipper"]["state"], "stopped", "seed {seed}: a shipper stopped: {partition:#}");
        }
        partitions.iter().all(|partition| {
            partition["shipper"]["cursor_offset"].as_i64() == partition["log_end_offset"].as_i64()
                && partition["shipper"]["lag_records"].as_i64() == Some(0)
        })
    });
    let drained_at = started.elapsed();
    let log_ends: BTreeMap<u32, u64> = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|partition| {
            (partition["partition"].as_u64().unwrap() as u32, partition["log_end_offset"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(log_ends.len(), PARTITIONS as usize);
    let mut upstream_records: BTreeMap<u32, Vec<UpstreamRecord>> = BTreeMap::new();
    for (&partition, &end) in &log_ends {
        upstream_records.insert(partition, upstream.read(partition, end as usize));
    }
    shippers.take(&weir);
    assert_eq!(weir.stop(), Some(0), "weir stops cleanly at the end");

    let acked_text = std::fs::read_to_string(&acked_log).unwrap();
    let verdict = compare(&acked_text, &upstream_records);
    let stored: u64 = log_ends.values().sum();
    let upstream_count: u64 = upstream_records.values().map(|records| records.len() as u64).sum();
    let (generated, acked) = (number("generated"), number("acked"));
    eprintln!(
        "crash loop at {} records/s against {kind}: {kills} SIGKILLs of weir, drained after {:.0} s; \
         devices generated {generated}, acked {acked}; weir stored {stored}; upstream {upstream_count}; \
         lost {}, duplicated {}, unacked upstream {}; reconciliation scans retried {}; shippers stopped {}",
        DEVICES * RATE,
        drained_at.as_secs_f64(),
        verdict.lost,
        verdict.duplicated,
        verdict.unacked + verdict.malformed,
        shippers.scans_retried,
        shippers.stopped.len(),
    );
    assert!(shippers.stopped.is_empty(), "seed {seed}: shippers stopped: {:#?}", shippers.stopped);
    for field in ["failed_records", "abandoned_sends"] {
        assert_eq!(summary[field], 0, "seed {seed}: weir-sim {field}: {summary}");
    }
    assert!(
        generated >= u64::from(DEVICES * RATE) * write_seconds / 2,
        "seed {seed}: the devices kept writing ({generated} records)"
    );
    assert_eq!(acked, generated, "seed {seed}: every record the devices made was acked");
    assert_eq!(verdict.lost, 0, "seed {seed}: acked records missing upstream where acked");
    assert_eq!(verdict.duplicated, 0, "seed {seed}: records upstream more than once");
    assert_eq!(verdict.unacked + verdict.malformed, 0, "seed {seed}: upstream records never acked, or out of order");
    assert_eq!(stored, acked, "seed {seed}: weir stored each acked record once");
    assert_eq!(upstream_count, acked, "seed {seed}: upstream holds each acked record once");
}

#[test]
fn at_2000_records_per_second_sigkills_never_stop_shipping_to_tansu_memory() {
    crash_loop_at_2000_records_per_second("tansu-memory");
}

#[test]
fn at_2000_records_per_second_sigkills_never_stop_shipping_to_tansu_sqlite() {
    crash_loop_at_2000_records_per_second("tansu-sqlite");
}

#[test]
fn at_2000_records_per_second_sigkills_never_stop_shipping_to_the_fake_broker() {
    crash_loop_at_2000_records_per_second("fake");
}
