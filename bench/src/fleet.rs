//! `weir-bench fleet`: the appliance's real workload, many devices each sending a small
//! record now and then (issue 18), against weir and against the raw QUIC ceiling with
//! the very same fleet, in alternating rounds (weir, ceiling, weir, ceiling, ...), so a
//! noisy spell of the shared machine falls on both.
//!
//! One phase: the server starts as a child process (a fresh one each phase, on the same
//! data for weir), `weir_sim::fleet` connects every device and lets each write
//! `--rate` records/s of `--record-bytes` for `--seconds`, then drains. A sampler
//! thread reads the server's CPU time and RSS from /proc every `SAMPLE_INTERVAL`, and
//! weir's `weir_log_flushes_total` from its admin endpoint. CPU, flushes and RSS are
//! taken over the writing time less the first `--warmup-seconds` (connecting 10,000
//! devices costs far more than their records and must not be averaged in); latency is
//! every acked record's, send call to ack (weir-sim's histogram).
//!
//! Per phase: ack p50/p99/p999/max, server CPU in cores, per record (us) and per
//! connection (us of CPU per second), RSS per connection (peak while writing over the
//! RSS before the fleet connected), and for weir flushes per second and records per
//! flush. The summary holds the medians over the rounds and weir's ratios to the
//! ceiling; the last line is JSON.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use weir::config::{Config, Host};
use weir_sim::fleet::Outcome;

use crate::fleet_shape::{self, FleetShape};
use crate::ingest::{self, IngestError, ServerChild};

/// The targets (issue 18) for 10,000 devices x 1 record/s on 2 cores.
pub const P99_US_TARGET_MAX: u64 = 20_000;
pub const P999_US_TARGET_MAX: u64 = 50_000;
pub const CPU_CORES_TARGET_MAX: f64 = 0.25;

const ROUNDS_MAX: u32 = 100;
const RATE_MAX: f64 = 10_000.0;
/// How often the sampler reads /proc and weir's metrics.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// How long an admin scrape may take before the sample goes without flushes.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);
/// The Prometheus series summed for weir's flushes (one per partition).
const FLUSHES_SERIES: &str = "weir_log_flushes_total";

#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    /// Cores: weir serve --cores N, and the ceiling on the same N CPUs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub cores: usize,
    /// Devices, each its own certificate and connection.
    #[arg(long, default_value_t = 1000, value_name = "D")]
    pub devices: u32,
    /// Records per second each device sends (one record per send at 1/s).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub rate: f64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 256, value_name = "B")]
    pub record_bytes: usize,
    /// Seconds each phase writes.
    #[arg(long, default_value_t = 20, value_name = "S")]
    pub seconds: u64,
    /// Seconds at the start of writing left out of the CPU, flush and RSS figures.
    #[arg(long, default_value_t = 3, value_name = "S")]
    pub warmup_seconds: u64,
    /// Rounds of (weir, ceiling); the summary gives medians over them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub rounds: u32,
    /// Partitions of the topic (the embedded default's 4).
    #[arg(long, default_value_t = 4, value_name = "P")]
    pub partitions: u32,
    /// Tokio threads of the device fleet (default: the CPUs available).
    #[arg(long, value_name = "T")]
    pub threads: Option<usize>,
    /// Extra lines for the generated weir config's `[log]` section (e.g.
    /// "core_flushes_per_s_max = 0"), to compare settings.
    #[arg(long, value_name = "TOML")]
    pub log_config: Option<String>,
    /// Extra lines for the generated weir config's `[quic]` section (e.g.
    /// "handshakes_max = 4096"), to compare settings.
    #[arg(long, value_name = "TOML")]
    pub quic_config: Option<String>,
    /// The reconnect storm: SIGKILL weir S seconds into the writing and start it again
    /// at once on the same data and port; reports how long the devices took to write
    /// again, the restarted weir's handshakes, Retry and refusals, and checks the
    /// acked log against the log. weir rounds only (no ceiling).
    #[arg(long, value_name = "S")]
    pub storm_at: Option<u64>,
}

impl FleetArgs {
    fn check(&self, host: &Host) -> Result<(), IngestError> {
        let mut problems = Vec::new();
        self.shape().check(host, &mut problems);
        if self.warmup_seconds >= self.seconds {
            problems.push(format!(
                "--warmup-seconds {}: must be below --seconds {} (something must be measured)",
                self.warmup_seconds, self.seconds
            ));
        }
        if self.rounds == 0 || self.rounds > ROUNDS_MAX {
            problems.push(format!("--rounds {}: must be within 1..={ROUNDS_MAX}", self.rounds));
        }
        if let Some(storm_at) = self.storm_at.filter(|storm_at| *storm_at == 0 || *storm_at >= self.seconds) {
            problems.push(format!("--storm-at {storm_at}: must be within 1..--seconds {}", self.seconds));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(IngestError::Usage(problems))
        }
    }

    fn shape(&self) -> FleetShape {
        FleetShape {
            cores: self.cores,
            devices: self.devices,
            rate: self.rate,
            rate_max: RATE_MAX,
            record_bytes: self.record_bytes,
            seconds: self.seconds,
            partitions: self.partitions,
            threads: self.threads,
        }
    }

    pub(crate) fn threads(&self) -> usize {
        fleet_shape::threads(self.threads)
    }
}

/// One reading of the server process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    cpu_s: f64,
    rss_bytes: u64,
    flushes: Option<u64>,
}

/// Reads the server every `SAMPLE_INTERVAL` on its own thread until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(pid: u32, admin: Option<SocketAddr>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stopped.load(Ordering::Acquire) {
                samples.push(sample(pid, admin));
                std::thread::sleep(SAMPLE_INTERVAL);
            }
            samples.push(sample(pid, admin));
            samples
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the sampler does not panic")
    }
}

fn sample(pid: u32, admin: Option<SocketAddr>) -> Sample {
    Sample {
        at: Instant::now(),
        cpu_s: ingest::cpu_seconds(pid),
        rss_bytes: ingest::rss_bytes(pid).unwrap_or(0),
        flushes: admin.and_then(scrape_flushes),
    }
}

/// weir's flushes so far, summed over partitions, from its admin endpoint.
fn scrape_flushes(admin: SocketAddr) -> Option<u64> {
    let mut stream = TcpStream::connect_timeout(&admin, SCRAPE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let flushes = text
        .lines()
        .filter(|line| line.starts_with(FLUSHES_SERIES))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Some(flushes as u64)
}

/// What one phase measured.
struct PhaseFigures {
    outcome: Outcome,
    /// Seconds of the measured window (writing less warm-up).
    window_s: f64,
    cpu_cores: f64,
    rss_before_bytes: u64,
    rss_peak_bytes: u64,
    flushes_per_s: Option<f64>,
}

impl PhaseFigures {
    fn from_samples(outcome: Outcome, samples: &[Sample], rss_before_bytes: u64, warmup: Duration) -> PhaseFigures {
        let from = outcome.writing_from + warmup;
        let until = outcome.writing_until;
        let first = samples.iter().find(|sample| sample.at >= from).or(samples.last());
        let last = samples.iter().rev().find(|sample| sample.at <= until).or(samples.last());
        let (Some(first), Some(last)) = (first, last) else {
            return PhaseFigures {
                outcome,
                window_s: 0.0,
                cpu_cores: 0.0,
                rss_before_bytes,
                rss_peak_bytes: rss_before_bytes,
                flushes_per_s: None,
            };
        };
        let window_s = last.at.saturating_duration_since(first.at).as_secs_f64();
        let per_s = |amount: f64| if window_s > 0.0 { amount / window_s } else { 0.0 };
        let rss_peak_bytes = samples
            .iter()
            .filter(|sample| sample.at >= from && sample.at <= until)
            .map(|sample| sample.rss_bytes)
            .max()
            .unwrap_or(last.rss_bytes);
        let flushes_per_s = match (first.flushes, last.flushes) {
            (Some(before), Some(after)) => Some(per_s(after.saturating_sub(before) as f64)),
            _ => None,
        };
        PhaseFigures {
            outcome,
            window_s,
            cpu_cores: per_s(last.cpu_s - first.cpu_s),
            rss_before_bytes,
            rss_peak_bytes,
            flushes_per_s,
        }
    }

    fn records_per_s(&self, args: &FleetArgs) -> f64 {
        // Every device writes at its rate when nothing holds it back; the acked count
        // over the writing time says whether it did.
        let writing_s = self.outcome.writing_until.saturating_duration_since(self.outcome.writing_from).as_secs_f64();
        let acked_per_s = self.outcome.acked as f64 / writing_s.max(1e-9);
        acked_per_s.min(args.rate * f64::from(args.devices))
    }

    fn cpu_us_per_record(&self, args: &FleetArgs) -> f64 {
        self.cpu_cores * 1e6 / self.records_per_s(args).max(1e-9)
    }

    /// Microseconds of server CPU per second per connection.
    fn cpu_us_per_connection_s(&self) -> f64 {
        self.cpu_cores * 1e6 / self.outcome.connected.max(1) as f64
    }

    fn rss_bytes_per_connection(&self) -> u64 {
        self.rss_peak_bytes.saturating_sub(self.rss_before_bytes) / self.outcome.connected.max(1) as u64
    }

    fn json(&self, args: &FleetArgs) -> serde_json::Value {
        let outcome = &self.outcome;
        let round = ingest::round;
        json!({
            "connected": outcome.connected,
            "acked": outcome.acked,
            "errors": ingest::errors(outcome),
            "records_per_s": round(self.records_per_s(args), 1),
            "p50_us": ingest::quantile(&outcome.latency_us, 0.5),
            "p99_us": ingest::quantile(&outcome.latency_us, 0.99),
            "p999_us": ingest::quantile(&outcome.latency_us, 0.999),
            "max_us": outcome.latency_us.max(),
            "window_s": round(self.window_s, 2),
            "cpu_cores": round(self.cpu_cores, 4),
            "cpu_us_per_record": round(self.cpu_us_per_record(args), 2),
            "cpu_us_per_connection_s": round(self.cpu_us_per_connection_s(), 3),
            "rss_bytes_per_connection": self.rss_bytes_per_connection(),
            "rss_before_bytes": self.rss_before_bytes,
            "rss_peak_bytes": self.rss_peak_bytes,
            "flushes_per_s": self.flushes_per_s.map(|flushes| round(flushes, 1)),
            "records_per_flush": self.flushes_per_s.filter(|flushes| *flushes > 0.0)
                .map(|flushes| round(self.records_per_s(args) / flushes, 2)),
        })
    }
}

fn say(message: impl std::fmt::Display) {
    eprintln!("weir-bench fleet: {message}");
}

pub fn run(args: &FleetArgs) -> Result<(), IngestError> {
    let host = Host::probe();
    args.check(&host)?;
    let root = tempfile::Builder::new().prefix("weir-bench-fleet-").tempdir().map_err(|source| IngestError::Io {
        operation: "create temp dir",
        path: std::env::temp_dir(),
        source,
    })?;
    let certs = root.path().join("certs");
    let device_ids: Vec<String> = (0..args.devices).map(|index| format!("{}{index}", ingest::DEVICE_PREFIX)).collect();
    say(format_args!("creating a development CA and {} device certificates", device_ids.len()));
    weir::certs::generate(&certs, &[], &device_ids, 2).map_err(|error| IngestError::Certs(error.to_string()))?;

    let connections_max = args.devices + ingest::CONNECTIONS_MARGIN;
    let config_path = root.path().join("weir.toml");
    // A restarted weir must come back on the port the devices know.
    let port = if args.storm_at.is_some() { crate::storm::free_udp_port()? } else { 0 };
    let config_text = format!(
        "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:{port}\"\ncerts_dir = {:?}\n\
         generate_dev_certs = false\nconnections_max = {connections_max}\n{}\n[log]\n{}\n[[topics]]\nname = \"{}\"\n\
         partitions = {}\n",
        root.path().join("data").display().to_string(),
        certs.display().to_string(),
        args.quic_config.as_deref().unwrap_or(""),
        args.log_config.as_deref().unwrap_or(""),
        ingest::TOPIC,
        args.partitions
    );
    std::fs::write(&config_path, config_text).map_err(|source| IngestError::Io {
        operation: "write",
        path: config_path.clone(),
        source,
    })?;
    let valid = Config::load(&config_path)
        .and_then(|config| config.validate(&host, &config_path.display().to_string()))
        .and_then(|valid| valid.with_core_count(args.cores, &host))
        .map_err(|error| IngestError::Config(error.to_string()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads())
        .enable_all()
        .build()
        .map_err(|source| IngestError::Io { operation: "start tokio", path: Default::default(), source })?;

    if let Some(storm_at) = args.storm_at {
        let paths = (root.path(), config_path.as_path(), certs.as_path());
        return crate::storm::run(args, storm_at, &runtime, paths, &device_ids);
    }
    let mut weir_rounds = Vec::new();
    let mut raw_rounds = Vec::new();
    for round in 1..=args.rounds {
        for ceiling in [false, true] {
            let name = if ceiling { "ceiling" } else { "weir" };
            let server = if ceiling {
                ServerChild::ceiling(&config_path, args.cores)?
            } else {
                ServerChild::weir(&config_path, args.cores)?
            };
            say(format_args!(
                "round {round}/{}: {name} on {} (pid {}): {} devices x {} records/s for {} s",
                args.rounds,
                server.address,
                server.pid(),
                args.devices,
                args.rate,
                args.seconds
            ));
            let figures = phase(args, &runtime, &server, &certs, &device_ids);
            let stopped = server.stop();
            let figures = figures?;
            stopped?;
            if figures.outcome.connected == 0 {
                let why = figures.outcome.first_errors.first().cloned().unwrap_or_else(|| "no device connected".into());
                return Err(IngestError::Fleet { phase: name, why });
            }
            let line = figures.json(args);
            say(format_args!("round {round} {name}: {line}"));
            if ceiling {
                raw_rounds.push(figures);
            } else {
                weir_rounds.push(figures);
            }
        }
    }
    drop(runtime);
    let report = FleetReport { args, cpus: valid.cores.clone(), weir: &weir_rounds, raw: &raw_rounds };
    for line in report.human() {
        println!("{line}");
    }
    println!("{}", report.json());
    Ok(())
}

/// One fleet against one server, sampled while it writes.
fn phase(
    args: &FleetArgs,
    runtime: &tokio::runtime::Runtime,
    server: &ServerChild,
    certs: &Path,
    device_ids: &[String],
) -> Result<PhaseFigures, IngestError> {
    let rss_before_bytes = ingest::rss_bytes(server.pid())?;
    let plan = weir_sim::Plan {
        device_ids: device_ids.to_vec(),
        rate: args.rate,
        record_bytes: args.record_bytes,
        seconds: args.seconds as f64,
        topics: vec![ingest::TOPIC.to_owned()],
        profile_template: ingest::device_profile(server.address, certs, &device_ids[0]),
        certs: certs.to_owned(),
        acked_log: None,
        threads: args.threads(),
        devices_per_endpoint: ingest::DEVICES_PER_ENDPOINT,
        connect_concurrency: ingest::CONNECT_CONCURRENCY,
        sends_in_flight: 1,
        drain_seconds: ingest::DRAIN_SECONDS,
        rebind_every: None,
        closed_loop: None,
        faults: weir_sim::Faults::default(),
        on_writing: None,
    };
    let sampler = Sampler::start(server.pid(), server.admin);
    let outcome = runtime.block_on(weir_sim::fleet::run(&plan));
    let samples = sampler.finish();
    let outcome = outcome.map_err(|error| IngestError::Fleet { phase: "fleet", why: error.to_string() })?;
    Ok(PhaseFigures::from_samples(outcome, &samples, rss_before_bytes, Duration::from_secs(args.warmup_seconds)))
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

struct FleetReport<'a> {
    args: &'a FleetArgs,
    cpus: Vec<usize>,
    weir: &'a [PhaseFigures],
    raw: &'a [PhaseFigures],
}

/// The medians of one server's rounds.
struct Medians {
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    cpu_cores: f64,
    cpu_us_per_record: f64,
    cpu_us_per_connection_s: f64,
    rss_bytes_per_connection: f64,
    flushes_per_s: Option<f64>,
    records_per_s: f64,
    acked: u64,
    errors: u64,
}

impl Medians {
    fn of(rounds: &[PhaseFigures], args: &FleetArgs) -> Medians {
        let of = |figure: &dyn Fn(&PhaseFigures) -> f64| median(rounds.iter().map(figure).collect());
        let quantile = |at: f64| of(&|round| ingest::quantile(&round.outcome.latency_us, at) as f64);
        let flushes: Vec<f64> = rounds.iter().filter_map(|round| round.flushes_per_s).collect();
        Medians {
            p50_us: quantile(0.5),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            max_us: of(&|round| round.outcome.latency_us.max() as f64),
            cpu_cores: of(&|round| round.cpu_cores),
            cpu_us_per_record: of(&|round| round.cpu_us_per_record(args)),
            cpu_us_per_connection_s: of(&|round| round.cpu_us_per_connection_s()),
            rss_bytes_per_connection: of(&|round| round.rss_bytes_per_connection() as f64),
            flushes_per_s: (!flushes.is_empty()).then(|| median(flushes)),
            records_per_s: of(&|round| round.records_per_s(args)),
            acked: rounds.iter().map(|round| round.outcome.acked).sum(),
            errors: rounds.iter().map(|round| ingest::errors(&round.outcome)).sum(),
        }
    }

    fn json(&self) -> serde_json::Value {
        let round = ingest::round;
        json!({
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "cpu_cores": round(self.cpu_cores, 4),
            "cpu_us_per_record": round(self.cpu_us_per_record, 2),
            "cpu_us_per_connection_s": round(self.cpu_us_per_connection_s, 3),
            "rss_bytes_per_connection": self.rss_bytes_per_connection,
            "flushes_per_s": self.flushes_per_s.map(|flushes| round(flushes, 1)),
            "records_per_s": round(self.records_per_s, 1),
            "acked": self.acked,
            "errors": self.errors,
        })
    }
}

impl FleetReport<'_> {
    fn json(&self) -> serde_json::Value {
        let (weir, raw) = (Medians::of(self.weir, self.args), Medians::of(self.raw, self.args));
        let ratio = |a: f64, b: f64| ingest::round(a / b.max(1e-9), 3);
        let args = self.args;
        json!({
            "bench": "fleet",
            "cores": args.cores,
            "cpus": self.cpus,
            "devices": args.devices,
            "rate": args.rate,
            "record_bytes": args.record_bytes,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup_seconds,
            "rounds": args.rounds,
            "partitions": args.partitions,
            "threads": args.threads(),
            "log_config": args.log_config,
            "weir": weir.json(),
            "raw": raw.json(),
            "p99_ratio": ratio(weir.p99_us, raw.p99_us),
            "p999_ratio": ratio(weir.p999_us, raw.p999_us),
            "cpu_ratio": ratio(weir.cpu_cores, raw.cpu_cores),
            "targets": {
                "p99_met": weir.p99_us <= P99_US_TARGET_MAX as f64,
                "p999_met": weir.p999_us <= P999_US_TARGET_MAX as f64,
                "cpu_met": weir.cpu_cores <= CPU_CORES_TARGET_MAX,
            },
            "weir_rounds": self.weir.iter().map(|round| round.json(args)).collect::<Vec<_>>(),
            "raw_rounds": self.raw.iter().map(|round| round.json(args)).collect::<Vec<_>>(),
        })
    }

    fn human(&self) -> Vec<String> {
        let (weir, raw) = (Medians::of(self.weir, self.args), Medians::of(self.raw, self.args));
        let args = self.args;
        let line = |name: &str, medians: &Medians| {
            format!(
                "{name}: ack p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms, max {:.1} ms; CPU {:.3} cores ({:.1} us/record, \
                 {:.2} us/s per connection); RSS {:.0} B per connection{}; {:.0} records/s, {} acked, {} errors",
                medians.p50_us / 1e3,
                medians.p99_us / 1e3,
                medians.p999_us / 1e3,
                medians.max_us / 1e3,
                medians.cpu_cores,
                medians.cpu_us_per_record,
                medians.cpu_us_per_connection_s,
                medians.rss_bytes_per_connection,
                medians.flushes_per_s.map_or(String::new(), |flushes| format!("; {flushes:.0} flushes/s")),
                medians.records_per_s,
                medians.acked,
                medians.errors
            )
        };
        vec![
            format!(
                "weir-bench fleet: {} core(s) (cpus {:?}), {} devices x {} records/s, {}-byte records, {} s per phase \
                 ({} s warm-up), {} partitions, medians of {} alternating rounds",
                args.cores,
                self.cpus,
                args.devices,
                args.rate,
                args.record_bytes,
                args.seconds,
                args.warmup_seconds,
                args.partitions,
                args.rounds
            ),
            line("weir", &weir),
            line("raw ", &raw),
            format!(
                "ratios weir/raw: p99 {:.2}, p999 {:.2}, CPU {:.2}; targets (10,000 x 1/s): p99 <= {} ms {}, p999 <= {} \
                 ms {}, CPU <= {} cores {}",
                weir.p99_us / raw.p99_us.max(1e-9),
                weir.p999_us / raw.p999_us.max(1e-9),
                weir.cpu_cores / raw.cpu_cores.max(1e-9),
                P99_US_TARGET_MAX / 1000,
                met(weir.p99_us <= P99_US_TARGET_MAX as f64),
                P999_US_TARGET_MAX / 1000,
                met(weir.p999_us <= P999_US_TARGET_MAX as f64),
                CPU_CORES_TARGET_MAX,
                met(weir.cpu_cores <= CPU_CORES_TARGET_MAX)
            ),
        ]
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}
