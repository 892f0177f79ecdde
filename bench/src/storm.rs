//! `weir-bench fleet --storm-at S`: the reconnect storm (issue 18). The fleet writes
//! to weir; `S` seconds into the writing weir is SIGKILLed and started again at once on
//! the same data and the same port, and every device must come back by itself.
//!
//! Per round: how long the devices could not write (each device's longest time
//! between two acks, as p50/p99/max over devices: weir-sim's `ack_gap`), how long weir
//! took from the kill to serving again, what the restarted weir did with the storm
//! (handshakes started, Retry packets, refusals by reason, from its metrics), ack
//! latency over the whole run, failed sends (a device that gave up), and the acked log
//! against the log: every acked (partition, offset) distinct and as many records
//! stored as acked (`weir::inspect`), so every acked record is there exactly once.
//! The last stdout line is JSON.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fleet::FleetArgs;
use crate::ingest::{self, IngestError, ServerChild};

/// How long a restart may take to serve before the round fails.
const RESTART_WAIT_MAX: Duration = Duration::from_secs(60);
/// The documented bound (docs/ARCHITECTURE.md, "Reconnect storms"): every device
/// writing again within this of a restart of weir (issue 18's target).
pub const RECOVERY_TARGET_MAX: Duration = Duration::from_secs(30);

/// What one storm round measured.
struct StormRound {
    outcome: weir_sim::fleet::Outcome,
    /// From the SIGKILL to the restarted weir's "serving".
    restart: Duration,
    metrics: BTreeMap<String, f64>,
    acked_lines: u64,
    acked_distinct: u64,
    stored: u64,
}

impl StormRound {
    fn metric(&self, name: &str) -> f64 {
        self.metrics.get(name).copied().unwrap_or(0.0)
    }

    fn refusals(&self) -> BTreeMap<String, f64> {
        let prefix = "weir_quic_refusals_total{reason=\"";
        self.metrics
            .iter()
            .filter_map(|(name, value)| {
                name.strip_prefix(prefix)?.strip_suffix("\"}").map(|reason| (reason.to_owned(), *value))
            })
            .collect()
    }

    fn exactly_once(&self) -> bool {
        self.acked_lines == self.outcome.acked
            && self.acked_distinct == self.acked_lines
            && self.stored == self.acked_lines
    }

    fn json(&self) -> serde_json::Value {
        let outcome = &self.outcome;
        let gap = &outcome.ack_gap_us;
        json!({
            "connected": outcome.connected,
            "acked": outcome.acked,
            "errors": ingest::errors(outcome),
            "failed_sends": outcome.failed_sends,
            "restart_ms": self.restart.as_millis() as u64,
            "ack_gap_p50_us": ingest::quantile(gap, 0.5),
            "ack_gap_p99_us": ingest::quantile(gap, 0.99),
            "ack_gap_max_us": gap.max(),
            "last_ack_min_s": outcome.last_ack_min.map(|at| ingest::round(at.as_secs_f64(), 3)),
            "handshakes": self.metric("weir_quic_handshakes_started_total"),
            "retries": self.metric("weir_quic_retries_sent_total"),
            "refusals": self.refusals(),
            "p50_us": ingest::quantile(&outcome.latency_us, 0.5),
            "p99_us": ingest::quantile(&outcome.latency_us, 0.99),
            "max_us": outcome.latency_us.max(),
            "stored": self.stored,
            "acked_distinct": self.acked_distinct,
            "exactly_once": self.exactly_once(),
            "recovered_within_target": gap.max() <= RECOVERY_TARGET_MAX.as_micros() as u64,
            "first_errors": outcome.first_errors,
        })
    }
}

/// A free UDP port on loopback: weir must come back on the port the devices know.
pub fn free_udp_port() -> Result<u16, IngestError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|source| IngestError::Io {
        operation: "bind",
        path: Default::default(),
        source,
    })?;
    socket.local_addr().map(|address| address.port()).map_err(|source| IngestError::Io {
        operation: "bind",
        path: Default::default(),
        source,
    })
}

fn say(message: impl std::fmt::Display) {
    eprintln!("weir-bench fleet: {message}");
}

/// Every round of the storm; prints the rounds and a JSON summary.
pub fn run(
    args: &FleetArgs,
    storm_at: u64,
    runtime: &tokio::runtime::Runtime,
    (root, config, certs): (&Path, &Path, &Path),
    device_ids: &[String],
) -> Result<(), IngestError> {
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let data = root.join("data");
        let _ = std::fs::remove_dir_all(&data);
        let server = ServerChild::weir(config, args.cores)?;
        say(format_args!(
            "storm round {round}/{}: weir on {} (pid {}): {} devices x {} records/s for {} s, SIGKILL at {storm_at} s",
            args.rounds,
            server.address,
            server.pid(),
            args.devices,
            args.rate,
            args.seconds
        ));
        let figures = storm_round(args, storm_at, runtime, server, (root, config, certs), device_ids, round)?;
        say(format_args!("storm round {round}: {}", figures.json()));
        rounds.push(figures);
    }
    let of = |figure: &dyn Fn(&StormRound) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(figure).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let gap_max_s = of(&|round| round.outcome.ack_gap_us.max() as f64 / 1e6);
    let gap_p99_s = of(&|round| ingest::quantile(&round.outcome.ack_gap_us, 0.99) as f64 / 1e6);
    let gap_p50_s = of(&|round| ingest::quantile(&round.outcome.ack_gap_us, 0.5) as f64 / 1e6);
    let handshakes = of(&|round| round.metric("weir_quic_handshakes_started_total"));
    let retries = of(&|round| round.metric("weir_quic_retries_sent_total"));
    let refused = of(&|round| round.refusals().values().fold(0.0, |sum, value| sum + value));
    let failed: u64 = rounds.iter().map(|round| ingest::errors(&round.outcome)).sum();
    let exactly_once = rounds.iter().all(StormRound::exactly_once);
    println!(
        "weir-bench fleet --storm-at {storm_at}: {} devices x {} records/s on {} core(s), medians of {} rounds: \
         devices writing again after p50 {gap_p50_s:.1} s, p99 {gap_p99_s:.1} s, max {gap_max_s:.1} s (target <= {} s: \
         {}); {handshakes:.0} handshakes, {retries:.0} Retry, {refused:.0} refused; {failed} failed sends; every acked \
         record in the log exactly once: {exactly_once}",
        args.devices,
        args.rate,
        args.cores,
        rounds.len(),
        RECOVERY_TARGET_MAX.as_secs(),
        if gap_max_s <= RECOVERY_TARGET_MAX.as_secs_f64() { "met" } else { "MISSED" },
    );
    println!(
        "{}",
        json!({
            "bench": "fleet-storm",
            "cores": args.cores,
            "devices": args.devices,
            "rate": args.rate,
            "seconds": args.seconds,
            "storm_at": storm_at,
            "rounds": args.rounds,
            "quic_config": args.quic_config,
            "ack_gap_p50_s": ingest::round(gap_p50_s, 3),
            "ack_gap_p99_s": ingest::round(gap_p99_s, 3),
            "ack_gap_max_s": ingest::round(gap_max_s, 3),
            "handshakes": handshakes,
            "retries": retries,
            "refused": refused,
            "failed_sends": failed,
            "exactly_once": exactly_once,
            "storm_rounds": rounds.iter().map(StormRound::json).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

fn storm_round(
    args: &FleetArgs,
    storm_at: u64,
    runtime: &tokio::runtime::Runtime,
    server: ServerChild,
    (root, config, certs): (&Path, &Path, &Path),
    device_ids: &[String],
    round: u32,
) -> Result<StormRound, IngestError> {
    let acked_log = root.join(format!("acked-{round}.txt"));
    let (on_writing, writing) = std::sync::mpsc::channel();
    let plan = weir_sim::Plan {
        device_ids: device_ids.to_vec(),
        rate: args.rate,
        record_bytes: args.record_bytes,
        seconds: args.seconds as f64,
        topics: vec![ingest::TOPIC.to_owned()],
        profile_template: ingest::device_profile(server.address, certs, &device_ids[0]),
        certs: certs.to_owned(),
        acked_log: Some(acked_log.clone()),
        threads: args.threads(),
        devices_per_endpoint: ingest::DEVICES_PER_ENDPOINT,
        connect_concurrency: ingest::CONNECT_CONCURRENCY,
        sends_in_flight: 1,
        drain_seconds: ingest::DRAIN_SECONDS,
        rebind_every: None,
        closed_loop: None,
        faults: weir_sim::Faults::default(),
        on_writing: Some(on_writing),
    };
    let (config_owned, cores) = (config.to_owned(), args.cores);
    // The storm: SIGKILL at `storm_at` into the writing, then weir again at once.
    let storm = std::thread::spawn(move || -> Result<(ServerChild, Duration), IngestError> {
        let Ok(writing_from) = writing.recv() else { return Ok((server, Duration::ZERO)) };
        std::thread::sleep((writing_from + Duration::from_secs(storm_at)).saturating_duration_since(Instant::now()));
        server.kill();
        let killed = Instant::now();
        loop {
            match ServerChild::weir(&config_owned, cores) {
                Ok(server) => return Ok((server, killed.elapsed())),
                Err(error) if killed.elapsed() > RESTART_WAIT_MAX => return Err(error),
                Err(error) => {
                    say(format_args!("restart failed, trying again: {error}"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    });
    let outcome = runtime.block_on(weir_sim::fleet::run(&plan));
    let (server, restart) = storm.join().expect("the storm thread does not panic")?;
    let metrics = server.admin.map(scrape_quic_metrics).unwrap_or_default();
    server.stop()?;
    let outcome = outcome.map_err(|error| IngestError::Fleet { phase: "storm", why: error.to_string() })?;
    let (acked_lines, acked_distinct) = read_acked_log(&acked_log)?;
    let data = root.join("data");
    let summary = weir::inspect::inspect(&data, |_| {})
        .map_err(|problem| IngestError::Fleet { phase: "storm", why: format!("inspect: {problem:?}") })?;
    let topic_prefix = format!("{}-", ingest::TOPIC);
    let stored = summary
        .partitions
        .iter()
        .filter(|partition| partition.name.starts_with(&topic_prefix))
        .map(|p| p.records)
        .sum();
    Ok(StormRound { outcome, restart, metrics, acked_lines, acked_distinct, stored })
}

/// Lines of the acked log, and how many distinct (partition, offset) they name.
fn read_acked_log(path: &Path) -> Result<(u64, u64), IngestError> {
    let file = std::fs::File::open(path).map_err(|source| IngestError::Io {
        operation: "open",
        path: path.to_owned(),
        source,
    })?;
    let mut offsets = HashSet::new();
    let mut lines = 0u64;
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        let fields: Vec<&str> = line.split(' ').collect();
        if let (Some(partition), Some(offset)) = (fields.get(2), fields.get(3)) {
            offsets.insert((partition.to_string(), offset.to_string()));
        }
        lines += 1;
    }
    Ok((lines, offsets.len() as u64))
}

/// weir's `weir_quic_*` series from its admin endpoint (name with labels -> value).
fn scrape_quic_metrics(admin: SocketAddr) -> BTreeMap<String, f64> {
    let mut text = String::new();
    let scraped = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).and_then(|mut stream| {
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        stream.read_to_string(&mut text)
    });
    if scraped.is_err() {
        return BTreeMap::new();
    }
    text.lines()
        .filter(|line| line.starts_with("weir_quic_"))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}
