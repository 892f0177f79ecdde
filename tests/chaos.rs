//! Network chaos, end to end on loopback: simulated devices (weir-sim) write to a real
//! `weir serve` (two cores, shipping to a tansu broker) through weir-relay, which
//! impairs the traffic both ways: 10% loss, 200 ms delay with jitter, reordering with
//! duplicates, a 30 s link cut, NAT rebinding every 3 s, and all of them at once. The
//! devices keep writing through it and resend unanswered frames under the same
//! sequence. Then, per scenario:
//! - every acked record is in the upstream topic exactly once, at the offset its ack
//!   named, with its device and sequence, in per-device order, and upstream holds
//!   nothing that was not acked (each device's records 0..n, each once);
//! - the relay really impaired the traffic (its counters), so no scenario passes
//!   vacuously; where the scenario is about keeping connections (cut, rebinding), weir
//!   accepted no more connections than there are devices;
//! - one line reports the ack latency p50/p99/p999 with the relay's counters.
//!
//! The scenarios run in parallel (separate weir, broker, relay, ports and directories).
//! `WEIR_CHAOS_SECONDS` sets how long devices write (default and least 20 s; the cut
//! scenario and the combined one write as much longer as their cut lasts) and
//! `WEIR_CHAOS_SEED` the first relay seed; `long_chaos_run` (ignored by default) runs
//! the same scenarios for 600 s each: see docs/CHAOS.md.
//!
//! Needs the workspace built (weir-sim, weir-relay next to weir) and
//! `tools/install-broker` (tansu and confluent-kafka in ./.venv).

#[path = "common/broker.rs"]
mod broker;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/server.rs"]
mod server;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::{read_upstream, Tansu, UpstreamRecord};
use fleet::{binary, compare, env_u64, metric, write_profile, FleetConfig};
use server::Server;

const PARTITIONS: u32 = 2;
const DEVICES: u32 = 8;
/// Records per second per device.
const RATE: u32 = 25;
const RECORD_BYTES: usize = 100;
/// How long a relay or a device fleet may run at most, whatever happens.
const PROCESS_SECONDS_MAX: u64 = 3600;

/// Whether a scenario's devices must keep their first connection throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connections {
    /// Exactly one connection per device: the impairment must not break any.
    Kept,
    /// Devices must have reconnected (their answer timeout is shorter than the cut),
    /// so resends crossed connections.
    Renewed,
    /// Either is fine.
    Any,
}

#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    relay: Vec<String>,
    /// How long devices write, in seconds.
    seconds: u64,
    /// The device's answer timeout: how long it waits for an answer before it drops
    /// the connection and resends on a new one.
    answer_ms: u64,
    connections: Connections,
    /// Relay counters that must be above zero, and their minimum.
    impaired: Vec<(&'static str, u64)>,
    /// The least ack latency p50 the impairment implies, in microseconds.
    p50_us_min: u64,
    /// Extra lines for weir's `[quic]` section.
    quic_config: &'static str,
    /// Whether datagrams must have reached the wrong core and been forwarded to their
    /// connection's core (rebinding without cBPF steering).
    forwarded: bool,
}

fn arguments(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

fn scenarios(seconds: u64) -> Vec<Scenario> {
    // Each device has its own UDP socket, so each is its own relay session.
    let rebind_epochs = seconds / 3;
    let cut_at = seconds / 4;
    vec![
        Scenario {
            name: "loss 10%",
            relay: arguments("--loss 0.1"),
            seconds,
            answer_ms: 10_000,
            connections: Connections::Any,
            impaired: vec![("dropped", 100)],
            p50_us_min: 0,
            quic_config: "",
            forwarded: false,
        },
        Scenario {
            name: "delay 200 ms +-50 ms",
            relay: arguments("--delay-ms 200 --jitter-ms 50"),
            seconds,
            answer_ms: 10_000,
            connections: Connections::Any,
            impaired: vec![],
            // Every answer crosses the relay twice: at least 2 x 150 ms.
            p50_us_min: 300_000,
            quic_config: "",
            forwarded: false,
        },
        Scenario {
            name: "reorder 20% + duplicate 5%",
            relay: arguments("--reorder 0.2 --reorder-ms 30 --duplicate 0.05"),
            seconds,
            answer_ms: 10_000,
            connections: Connections::Any,
            impaired: vec![("reordered", 100), ("duplicated", 20)],
            p50_us_min: 0,
            quic_config: "",
            forwarded: false,
        },
        Scenario {
            name: "cut 30 s",
            relay: arguments(&format!("--cut-at-s {cut_at} --cut-for-s 30")),
            // As long with the link up as the other scenarios, plus the cut.
            seconds: seconds + 30,
            // The connection outlives the cut (weir's idle timeout is 120 s here).
            answer_ms: 60_000,
            connections: Connections::Kept,
            impaired: vec![("cut_dropped", 10)],
            p50_us_min: 0,
            quic_config: "",
            forwarded: false,
        },
        Scenario {
            name: "rebind every 3 s",
            relay: arguments("--rebind-every-s 3"),
            seconds,
            answer_ms: 10_000,
            connections: Connections::Kept,
            impaired: vec![("rebinds", u64::from(DEVICES) * rebind_epochs.saturating_sub(1))],
            p50_us_min: 0,
            quic_config: "",
            forwarded: false,
        },
        Scenario {
            name: "rebind every 3 s, no steering",
            relay: arguments("--rebind-every-s 3"),
            seconds,
            answer_ms: 10_000,
            connections: Connections::Kept,
            impaired: vec![("rebinds", u64::from(DEVICES) * rebind_epochs.saturating_sub(1))],
            p50_us_min: 0,
            // Without the cBPF program the kernel's 4-tuple hash picks the core after each
            // rebind: datagrams on the wrong core must be forwarded over the mesh.
            quic_config: "reuseport_steering = false",
            forwarded: true,
        },
        Scenario {
            name: "combined",
            relay: arguments(&format!(
                "--loss 0.05 --delay-ms 50 --jitter-ms 20 --reorder 0.05 --reorder-ms 30 --duplicate 0.02 \
                 --rebind-every-s 4 --cut-at-s {cut_at} --cut-for-s 12"
            )),
            seconds: seconds + 12,
            // Shorter than the cut: devices give their connection up and resend the
            // unanswered frames on a new one.
            answer_ms: 5_000,
            connections: Connections::Renewed,
            impaired: vec![("dropped", 10), ("cut_dropped", 10), ("rebinds", 1), ("reordered", 1)],
            p50_us_min: 100_000,
            quic_config: "",
            forwarded: false,
        },
    ]
}

/// What one scenario measured.
#[derive(Debug)]
struct Measured {
    name: &'static str,
    seed: u64,
    seconds: u64,
    generated: u64,
    acked: u64,
    stored: u64,
    upstream: u64,
    /// Acked records not found upstream where their ack said.
    lost: u64,
    /// (device, n) found upstream more than once.
    duplicated: u64,
    /// Upstream records that no ack names.
    unacked_upstream: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    connections_accepted: u64,
    /// Datagrams weir forwarded from the core that read them to their connection's core.
    datagrams_forwarded: u64,
    /// Produce frames weir received beyond one per acked frame: resends after a lost
    /// answer (acknowledged again from the dedup state, not stored again).
    frames_resent: u64,
    relay: serde_json::Value,
    sim: serde_json::Value,
}

impl Measured {
    fn line(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "chaos [{}] seed {} {} s: generated {}, acked {}, upstream {}, lost {}, duplicated {}, unacked upstream {}; \
             ack latency p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms, max {:.1} ms; connections accepted {}, frames resent {}, datagrams forwarded between cores {}; relay {}",
            self.name,
            self.seed,
            self.seconds,
            self.generated,
            self.acked,
            self.upstream,
            self.lost,
            self.duplicated,
            self.unacked_upstream,
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.connections_accepted,
            self.frames_resent,
            self.datagrams_forwarded,
            self.relay
        )
    }

    fn table_row(&self) -> String {
        let ms = |us: u64| format!("{:.0}", us as f64 / 1000.0);
        let relay = |name: &str| self.relay[name].as_u64().unwrap_or(0);
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | dropped {}, cut {}, reordered {}, duplicated {}, rebinds {} |",
            self.name,
            self.seconds,
            self.acked,
            self.upstream,
            self.lost,
            self.duplicated,
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.connections_accepted,
            self.frames_resent,
            self.datagrams_forwarded,
            relay("dropped"),
            relay("cut_dropped"),
            relay("reordered"),
            relay("duplicated"),
            relay("rebinds"),
        )
    }

    /// Every way this scenario failed, in words (empty: it passed).
    fn problems(&self, scenario: &Scenario) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        for field in ["failed_records", "abandoned_sends", "connect_failures"] {
            check(self.sim[field] == 0, format!("weir-sim {field} = {}", self.sim[field]));
        }
        check(self.sim["connected"] == DEVICES, format!("{} of {DEVICES} devices connected", self.sim["connected"]));
        // Devices kept writing through the impairment: every record due was made.
        let due = u64::from(DEVICES * RATE) * scenario.seconds;
        check(self.generated * 10 >= due * 9, format!("only {} of {due} records due were generated", self.generated));
        check(self.acked == self.generated, format!("acked {} of {} generated", self.acked, self.generated));
        check(self.stored == self.acked, format!("weir stored {} records, {} acked", self.stored, self.acked));
        check(self.upstream == self.acked, format!("upstream holds {} records, {} acked", self.upstream, self.acked));
        check(self.lost == 0, format!("{} acked records are not upstream where acked", self.lost));
        check(self.duplicated == 0, format!("{} records upstream more than once", self.duplicated));
        check(self.unacked_upstream == 0, format!("{} upstream records were never acked", self.unacked_upstream));
        for (counter, minimum) in &scenario.impaired {
            let value = self.relay[counter].as_u64().unwrap_or(0);
            check(value >= (*minimum).max(1), format!("the relay's {counter} is {value}, expected >= {minimum}"));
        }
        check(
            self.p50_us >= scenario.p50_us_min,
            format!("ack latency p50 {} us, below the {} us the impairment implies", self.p50_us, scenario.p50_us_min),
        );
        if scenario.forwarded {
            check(self.datagrams_forwarded > 0, "no datagram reached the wrong core after a rebind".into());
        }
        let devices = u64::from(DEVICES);
        match scenario.connections {
            Connections::Kept => check(
                self.connections_accepted == devices,
                format!("weir accepted {} connections for {devices} devices: some broke", self.connections_accepted),
            ),
            Connections::Renewed => check(
                self.connections_accepted > devices,
                format!("weir accepted {} connections for {devices} devices: none renewed", self.connections_accepted),
            ),
            Connections::Any => {}
        }
        problems
    }
}

/// weir-relay as a child process; killed on Drop.
struct Relay {
    child: Option<Child>,
    address: String,
}

impl Relay {
    fn start(to: &str, seed: u64, impairments: &[String]) -> Relay {
        let mut child = Command::new(binary("weir-relay"))
            .args(["--listen", "127.0.0.1:0", "--to", to, "--seed", &seed.to_string()])
            .args(["--seconds", &PROCESS_SECONDS_MAX.to_string()])
            .args(impairments)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let address = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("weir-relay did not start: {line:?}"))
            .to_owned();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("weir-relay: {line}");
            }
        });
        Relay { child: Some(child), address }
    }

    /// SIGTERM, then its counters.
    fn stop(mut self) -> serde_json::Value {
        let child = self.child.take().unwrap();
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "weir-relay exited with {}", output.status);
        let stdout = String::from_utf8(output.stdout).unwrap();
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|error| panic!("weir-relay's counters ({error}): {stdout:?}"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run_scenario(scenario: &Scenario, seed: u64) -> Measured {
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path();
    let output = Command::new(binary("weir"))
        .args(["certs", "--device-count", &DEVICES.to_string(), "--device-prefix", "sim-", "--dir"])
        .arg(root.join("certs"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let tansu = Tansu::start();
    tansu.create_topic("central", PARTITIONS);
    // The QUIC idle timeout outlives the 30 s cut: a connection waiting it out is kept.
    let quic_extra = format!("idle_timeout_s = 120\n{}", scenario.quic_config);
    let config = FleetConfig {
        partitions: PARTITIONS,
        admin: "127.0.0.1:0",
        quic: "127.0.0.1:0",
        quic_extra: &quic_extra,
        upstream: Some(&tansu.address()),
    }
    .write(root);
    let profile = write_profile(root, scenario.answer_ms);
    let server = Server::start(&config, 2);
    let relay = Relay::start(server.quic.as_deref().expect("QUIC is on"), seed, &scenario.relay);

    let acked_log = root.join("acked.txt");
    let sim = Command::new(binary("weir-sim"))
        .args(["--server", &relay.address, "--devices", &DEVICES.to_string()])
        .args(["--rate", &RATE.to_string(), "--seconds", &scenario.seconds.to_string()])
        .args(["--record-bytes", &RECORD_BYTES.to_string(), "--threads", "1", "--frames-in-flight", "4"])
        // One socket per device: each device is its own relay session (own rebinding).
        .args(["--devices-per-endpoint", "1", "--drain-seconds", "120"])
        .arg("--profile")
        .arg(&profile)
        .arg("--certs")
        .arg(root.join("certs"))
        .arg("--acked-log")
        .arg(&acked_log)
        .output()
        .unwrap();
    let relay_counters = relay.stop();
    let stdout = String::from_utf8_lossy(&sim.stdout);
    assert!(
        sim.status.success(),
        "[{}] weir-sim failed ({}): {stdout}\n{}",
        scenario.name,
        sim.status,
        String::from_utf8_lossy(&sim.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|error| panic!("[{}] weir-sim's summary ({error}): {stdout}", scenario.name));
    let number = |name: &str| summary[name].as_u64().unwrap_or_else(|| panic!("{name} in {summary}"));
    let acked = number("acked");

    // Everything stored is shipped before upstream is read.
    let status = server.wait_status(Duration::from_secs(120), "every partition shipped", |status| {
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
    let stored: u64 = log_ends.values().sum();
    let connections_accepted = metric(&server.admin, "weir_quic_connections_accepted_total");
    let datagrams_forwarded = metric(&server.admin, "weir_quic_datagrams_forwarded_total");
    let frames_received = metric(&server.admin, "weir_quic_frames_received_total");

    let mut upstream: BTreeMap<u32, Vec<UpstreamRecord>> = BTreeMap::new();
    for (&partition, &end) in &log_ends {
        let records =
            read_upstream(&tansu.address(), "central", partition as i32, end as usize, Duration::from_secs(60));
        upstream.insert(partition, records);
    }
    assert_eq!(server.stop(), Some(0), "[{}] weir stops cleanly", scenario.name);

    let acked_text = std::fs::read_to_string(&acked_log).unwrap();
    let verdict = compare(&acked_text, &upstream);
    let frames: HashSet<(&str, &str)> = acked_text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            Some((fields.next()?, fields.next()?))
        })
        .collect();
    Measured {
        name: scenario.name,
        seed,
        seconds: scenario.seconds,
        generated: number("generated"),
        acked,
        stored,
        upstream: upstream.values().map(|records| records.len() as u64).sum(),
        lost: verdict.lost,
        duplicated: verdict.duplicated,
        unacked_upstream: verdict.unacked + verdict.malformed,
        p50_us: number("p50_us"),
        p99_us: number("p99_us"),
        p999_us: number("p999_us"),
        max_us: number("max_us"),
        connections_accepted,
        datagrams_forwarded,
        frames_resent: frames_received.saturating_sub(frames.len() as u64),
        relay: relay_counters,
        sim: summary,
    }
}

fn run_all(seconds: u64) {
    // Shorter runs leave too little time after a cut for the devices to catch up.
    assert!(seconds >= 20, "WEIR_CHAOS_SECONDS={seconds}: at least 20 s");
    let seed_base = env_u64("WEIR_CHAOS_SEED", 1);
    let started = Instant::now();
    let runs: Vec<_> = scenarios(seconds)
        .into_iter()
        .enumerate()
        .map(|(index, scenario)| {
            let seed = seed_base + index as u64;
            std::thread::spawn(move || {
                let measured = run_scenario(&scenario, seed);
                (scenario, measured)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for run in runs {
        match run.join() {
            Ok((scenario, measured)) => {
                println!("{}", measured.line());
                rows.push(measured.table_row());
                for problem in measured.problems(&scenario) {
                    failures.push(format!("[{}] seed {}: {problem}", scenario.name, measured.seed));
                }
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_default();
                failures.push(format!("a scenario panicked: {why}"));
            }
        }
    }
    println!(
        "| scenario | s | acked | upstream | lost | duplicated | p50 ms | p99 ms | p999 ms | max ms | connections | \
         frames resent | datagrams forwarded | relay |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for row in rows {
        println!("{row}");
    }
    println!("chaos: {} s in all", started.elapsed().as_secs());
    assert!(failures.is_empty(), "chaos scenarios failed:\n{}", failures.join("\n"));
}

#[test]
fn every_acked_record_reaches_upstream_exactly_once_through_loss_delay_reordering_cuts_and_rebinding() {
    run_all(env_u64("WEIR_CHAOS_SECONDS", 20));
}

/// The same scenarios for longer: `WEIR_CHAOS_SECONDS` (default 600) each.
#[test]
#[ignore = "long: run on purpose, see docs/CHAOS.md"]
fn long_chaos_run() {
    run_all(env_u64("WEIR_CHAOS_SECONDS", 600));
}

/// The checker itself: a correct upstream passes, and each kind of damage is counted.
#[test]
fn the_upstream_check_counts_lost_duplicated_and_unacked_records() {
    let record = |offset: i64, device: &str, n: u64, sequence: u64| UpstreamRecord {
        offset,
        key: Some(device.as_bytes().to_vec()),
        value: Some(format!("{device} {n} ....").into_bytes()),
        timestamp_ms: 1,
        headers: vec![
            ("weir.device".to_owned(), Some(device.as_bytes().to_vec())),
            ("weir.sequence".to_owned(), Some(sequence.to_string().into_bytes())),
        ],
    };
    let acked = "sim-0 7 0 0 0 telemetry\nsim-0 7 0 1 1 telemetry\nsim-1 9 1 0 0 telemetry\n";
    let good: BTreeMap<u32, Vec<UpstreamRecord>> = BTreeMap::from([
        (0, vec![record(0, "sim-0", 0, 7), record(1, "sim-0", 1, 7)]),
        (1, vec![record(0, "sim-1", 0, 9)]),
    ]);
    let verdict = compare(acked, &good);
    assert_eq!((verdict.lost, verdict.duplicated, verdict.unacked, verdict.malformed), (0, 0, 0, 0), "{verdict:?}");

    // sim-0's second record stored twice (a resend appended again).
    let mut twice = good.clone();
    twice.get_mut(&0).unwrap().push(record(2, "sim-0", 1, 8));
    let verdict = compare(acked, &twice);
    assert_eq!((verdict.duplicated, verdict.unacked), (1, 1), "{verdict:?}");
    assert!(verdict.malformed > 0, "n does not grow: {verdict:?}");

    // sim-1's record never shipped.
    let mut missing = good.clone();
    missing.get_mut(&1).unwrap().clear();
    assert_eq!(compare(acked, &missing).lost, 1);

    // A device's records upstream in another order than it wrote them (both from one
    // frame, so the acks' device and sequence still match: the order check catches it).
    let mut swapped = good.clone();
    let partition = swapped.get_mut(&0).unwrap();
    partition.swap(0, 1);
    for (offset, record) in partition.iter_mut().enumerate() {
        record.offset = offset as i64;
    }
    let verdict = compare(acked, &swapped);
    assert!(verdict.malformed > 0 && verdict.lost == 0, "{verdict:?}");

    // An acked record replaced by one of another frame.
    let mut replaced = good;
    replaced.get_mut(&1).unwrap()[0] = record(0, "sim-1", 0, 10);
    assert_eq!(compare(acked, &replaced).lost, 1);
}
