//! `weir-bench ingest`: devices over QUIC into weir with durable acks, against the raw
//! QUIC ceiling of the same run (DESIGN.md, "Ceilings to measure against").
//!
//! One run, in this order:
//! 1. A development PKI in a temp dir (`weir::certs`), and a config: loopback QUIC and
//!    admin on port 0, one topic with `--partitions` partitions, `quic.connections_max`
//!    raised to hold every idle connection.
//! 2. `weir serve --cores N` as a child process (this binary re-executed as
//!    `weir-bench serve-weir serve ...`, which runs `weir::cli`), so its memory is its
//!    own. Idle phase first, on the fresh server: `--idle-connections` devices connect
//!    (each its own certificate and connection) and stay idle; the server's RSS is read
//!    from /proc before and after, and the difference per connection is reported.
//!    Then weir is restarted on the same data (the driver's cost per wakeup grows with
//!    its connections, so closing ones must not tax the next phase; `--keep-idle-open`
//!    keeps them connected to the same weir instead, to measure exactly that), and the fleet
//!    phase runs: `weir_sim::fleet` (the simulator's own code) with
//!    `--devices` devices writing `--record-bytes` records at `--rate` each for
//!    `--seconds`; every ack means fdatasync'ed.
//! 3. The raw ceiling: `weir::shell::quic_ceiling::DiscardServer` (the same TLS,
//!    sockets and quinn-proto driver, answering each frame with an ack of the same shape
//!    and storing nothing) on the same cores, also a child process (`weir-bench
//!    serve-ceiling`), driven by the same fleet plan.
//!
//! `ratio` is weir's acked records/s over the ceiling's. Latency is per record, from
//! the device's send call to its ack (hdrhistogram, weir-sim's). The offered load must
//! exceed both servers' capacity for the ratio to mean anything: the ceiling's
//! `raw_records_per_s` must stay below `offered_records_per_s` (`raw_saturated`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use weir::config::{Config, Host};
use weir::shell::quic_ceiling::DiscardServer;
use weir_device::{client_endpoint, DeviceClient, DeviceProfile};
use weir_sim::fleet::Outcome;

/// The targets: with 256-byte records and durable acks, at least 0.85 of the raw
/// ceiling and server CPU per record at most 1.3x the ceiling's (issue 14, raising issue
/// 3's 0.6); at most 32 KiB of server memory per idle device connection (issue 3).
pub const RATIO_TARGET_MIN: f64 = 0.85;
pub const CPU_PER_RECORD_OVER_RAW_TARGET_MAX: f64 = 1.3;
/// The closed loop's targets (issue 14, for 8 devices x 1 frame of 100 records, 8
/// partitions, 2 cores, 256 B): records/s and frame round trip p99.
pub const CLOSED_LOOP_RECORDS_PER_S_TARGET_MIN: f64 = 500_000.0;
pub const CLOSED_LOOP_FRAME_P99_US_TARGET_MAX: u64 = 3_000;
pub const IDLE_CONNECTION_BYTES_TARGET_MAX: u64 = 32 << 10;

/// Flag limits.
const IDLE_CONNECTIONS_MAX: u32 = 100_000;
const RATE_MAX: f64 = 1_000_000.0;
const QUEUE_RECORDS_MAX: usize = 4096;
pub(crate) const TOPIC: &str = "telemetry";
/// Device certificates name `bench-<n>`.
pub(crate) const DEVICE_PREFIX: &str = "bench-";
/// Devices sharing one client UDP socket.
pub(crate) const DEVICES_PER_ENDPOINT: usize = 100;
/// Handshakes in flight while devices connect (below weir's handshakes_before_retry).
pub(crate) const CONNECT_CONCURRENCY: usize = 64;
/// Connections weir allows above the bench's own (a margin for stragglers that close).
pub(crate) const CONNECTIONS_MARGIN: u32 = 1024;
/// How long weir has to report itself serving.
const SERVE_START_MAX: Duration = Duration::from_secs(60);
/// How long weir has to stop after SIGINT.
const SERVE_STOP_MAX: Duration = Duration::from_secs(30);
/// Pause before each RSS reading, so the server has processed the last handshakes.
const RSS_SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for outstanding sends after a fleet phase.
pub(crate) const DRAIN_SECONDS: f64 = 30.0;

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Cores: weir serve --cores N, and the ceiling on the same N CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cores: usize,
    /// Device connections writing in each fleet phase (weir, then the ceiling).
    #[arg(long, default_value_t = 100, value_name = "D")]
    pub devices: u32,
    /// Records per second each device offers (the sum must exceed what either server
    /// can take).
    #[arg(long, default_value_t = 5000.0, value_name = "R")]
    pub rate: f64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 256, value_name = "B")]
    pub record_bytes: usize,
    /// Seconds each fleet phase writes.
    #[arg(long, default_value_t = 5, value_name = "S")]
    pub seconds: u64,
    /// Partitions of the topic the devices write.
    #[arg(long, default_value_t = 4, value_name = "P")]
    pub partitions: u32,
    /// Idle device connections held open to measure weir's memory per connection (use
    /// a lower count for quick runs).
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub idle_connections: u32,
    /// Sends each device keeps outstanding (weir-sim --sends-in-flight). With the
    /// offered rate above capacity, each send carries up to --queue-records records, so
    /// the two bound the records in flight (and with them the ack latency).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub sends_in_flight: usize,
    /// Records one device may have queued and unacknowledged (the device profile's
    /// flow.queue_records_max; batch.records_max is lowered to it if above).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub queue_records: usize,
    /// Keep the idle connections open on the same weir during its fleet phase (the
    /// issue's scenario: idle devices connected while others write) instead of closing
    /// them and restarting weir.
    #[arg(long)]
    pub keep_idle_open: bool,
    /// Tokio threads of the device fleet (default: the CPUs available).
    #[arg(long, value_name = "T")]
    pub threads: Option<usize>,
    /// Closed loop (weir-sim --closed-loop-frames): each device keeps exactly N frames
    /// in flight and sends the next the moment one is answered; --rate is not used and
    /// the report adds each frame's round trip.
    #[arg(long, value_name = "N")]
    pub closed_loop_frames: Option<usize>,
    /// Records in each closed-loop frame.
    #[arg(long, default_value_t = 100, value_name = "R")]
    pub records_per_frame: usize,
    /// Run weir with the stream watch off (`[watch] enabled = false`), to measure the
    /// watch's CPU per record against a run with it on (the default).
    #[arg(long)]
    pub no_watch: bool,
    /// Run weir with `log.core_flushes_per_s_max` at N (the core's flush pacer; 0
    /// paces nothing) instead of the default, to measure what the pacer costs.
    #[arg(long, value_name = "N")]
    pub core_flushes_per_s: Option<u32>,
}

/// Why an ingest run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    #[error("bad flags:\n  {}", .0.join("\n  "))]
    Usage(Vec<String>),
    #[error("{operation} {path}: {source}")]
    Io { operation: &'static str, path: PathBuf, source: std::io::Error },
    #[error("certificates: {0}")]
    Certs(String),
    #[error("the generated config is refused: {0}")]
    Config(String),
    #[error("weir serve: {0}")]
    Weir(String),
    #[error("raw QUIC ceiling: {0}")]
    Ceiling(String),
    #[error("{phase} phase: {why}")]
    Fleet { phase: &'static str, why: String },
}

impl IngestError {
    pub fn is_usage(&self) -> bool {
        matches!(self, IngestError::Usage(_))
    }
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IngestError {
    let path = path.to_owned();
    move |source| IngestError::Io { operation, path, source }
}

impl IngestArgs {
    fn check(&self, host: &Host) -> Result<(), IngestError> {
        let mut problems = Vec::new();
        let shape = crate::fleet_shape::FleetShape {
            cores: self.cores,
            devices: self.devices,
            rate: self.rate,
            rate_max: RATE_MAX,
            record_bytes: self.record_bytes,
            seconds: self.seconds,
            partitions: self.partitions,
            threads: self.threads,
        };
        shape.check(host, &mut problems);
        if self.idle_connections == 0 || self.idle_connections > IDLE_CONNECTIONS_MAX {
            problems.push(format!(
                "--idle-connections {}: must be within 1..={IDLE_CONNECTIONS_MAX}",
                self.idle_connections
            ));
        }
        if self.sends_in_flight == 0 || self.sends_in_flight > 4096 {
            problems.push(format!("--sends-in-flight {}: must be within 1..=4096", self.sends_in_flight));
        }
        if self.queue_records == 0 || self.queue_records > QUEUE_RECORDS_MAX {
            problems.push(format!("--queue-records {}: must be within 1..={QUEUE_RECORDS_MAX}", self.queue_records));
        }
        let records_per_frame_max = weir::core::protocol::FRAME_LIMITS_V1.records_per_frame_max;
        if let Some(frames) = self.closed_loop_frames {
            if frames == 0 || frames > 4096 {
                problems.push(format!("--closed-loop-frames {frames}: must be within 1..=4096"));
            }
            if self.records_per_frame == 0 || self.records_per_frame > records_per_frame_max {
                problems.push(format!(
                    "--records-per-frame {}: must be within 1..={records_per_frame_max}",
                    self.records_per_frame
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(IngestError::Usage(problems))
        }
    }

    fn threads(&self) -> usize {
        crate::fleet_shape::threads(self.threads)
    }
}

/// The hidden `serve-weir` subcommand: runs weir's own command line in this process.
pub fn serve_weir(args: Vec<String>) -> i32 {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into()))
        .try_init();
    match weir::cli::Cli::try_parse_from(std::iter::once("weir".to_owned()).chain(args)) {
        Ok(cli) => weir::cli::run(cli),
        Err(error) => {
            let _ = error.print();
            2
        }
    }
}

pub(crate) fn say(message: impl std::fmt::Display) {
    eprintln!("weir-bench ingest: {message}");
}

pub fn run(args: &IngestArgs) -> Result<(), IngestError> {
    let host = Host::probe();
    args.check(&host)?;
    let root = tempfile::Builder::new()
        .prefix("weir-bench-ingest-")
        .tempdir()
        .map_err(io_error("create temp dir", &std::env::temp_dir()))?;
    let certs = root.path().join("certs");
    let device_count = args.devices.max(args.idle_connections);
    let device_ids: Vec<String> = (0..device_count).map(|index| format!("{DEVICE_PREFIX}{index}")).collect();
    say(format_args!("creating a development CA and {device_count} device certificates in {}", certs.display()));
    weir::certs::generate(&certs, &[], &device_ids, 2).map_err(|error| IngestError::Certs(error.to_string()))?;

    let connections_max = args.idle_connections.max(args.devices) + CONNECTIONS_MARGIN;
    let config_path = root.path().join("weir.toml");
    let config_text = format!(
        "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\n\
         certs_dir = {:?}\ngenerate_dev_certs = false\nconnections_max = {connections_max}\n[watch]\nenabled = {}\n\
         {}[[topics]]\nname = \"{TOPIC}\"\npartitions = {}\n",
        root.path().join("data").display().to_string(),
        certs.display().to_string(),
        !args.no_watch,
        args.core_flushes_per_s.map_or(String::new(), |pace| format!("[log]\ncore_flushes_per_s_max = {pace}\n")),
        args.partitions
    );
    std::fs::write(&config_path, config_text).map_err(io_error("write", &config_path))?;
    let valid = Config::load(&config_path)
        .and_then(|config| config.validate(&host, &config_path.display().to_string()))
        .and_then(|valid| valid.with_core_count(args.cores, &host))
        .map_err(|error| IngestError::Config(error.to_string()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads())
        .enable_all()
        .build()
        .map_err(|source| IngestError::Io { operation: "start tokio", path: PathBuf::new(), source })?;

    // weir: idle connections first (on a fresh server), then the fleet.
    say(format_args!("starting weir serve --cores {}", args.cores));
    let weir = ServerChild::weir(&config_path, args.cores)?;
    say(format_args!("weir serving QUIC on {} (pid {})", weir.address, weir.pid()));
    let idle =
        runtime.block_on(idle_phase(weir.pid(), weir.address, &certs, &device_ids[..args.idle_connections as usize]));
    let (idle, idle_devices) = match idle {
        Ok(idle) => idle,
        Err(error) => {
            let _ = weir.stop();
            return Err(error);
        }
    };
    say(format_args!(
        "idle: {} connections, server RSS {} -> {} bytes: {} bytes per connection",
        idle.connected,
        idle.rss_before_bytes,
        idle.rss_after_bytes,
        idle.bytes_per_connection()
    ));
    // A fresh weir for the fleet: the driver visits every connection on every wakeup,
    // so connections the idle phase left closing would tax the fleet phase. With
    // --keep-idle-open the idle devices stay connected to the same weir instead.
    let (weir, idle_devices) = if args.keep_idle_open {
        say("the idle devices stay connected during the fleet phase");
        (weir, Some(idle_devices))
    } else {
        runtime.block_on(idle_devices.close());
        weir.stop()?;
        let weir = ServerChild::weir(&config_path, args.cores)?;
        say(format_args!("weir restarted on {} (pid {})", weir.address, weir.pid()));
        (weir, None)
    };
    say(format_args!("fleet against weir: {} devices x {} records/s for {} s", args.devices, args.rate, args.seconds));
    let weir_plan = fleet_plan(args, weir.address, &certs, &device_ids);
    let cpu_started = (cpu_seconds(weir.pid()), cpu_seconds_self());
    let weir_outcome = runtime.block_on(weir_sim::fleet::run(&weir_plan));
    let weir_cpu = CpuUse::since(cpu_started, weir.pid());
    if let Some(idle_devices) = idle_devices {
        runtime.block_on(idle_devices.close());
    }
    let stopped = weir.stop();
    let weir_outcome = weir_outcome.map_err(|error| IngestError::Fleet { phase: "weir", why: error.to_string() })?;
    stopped?;
    if weir_outcome.connected == 0 {
        return Err(IngestError::Fleet { phase: "weir", why: first_error(&weir_outcome, "no device connected") });
    }

    // The ceiling: the same cores, the same fleet plan.
    let ceiling = ServerChild::ceiling(&config_path, args.cores)?;
    say(format_args!("raw QUIC ceiling (discard server) on {} (pid {})", ceiling.address, ceiling.pid()));
    let raw_plan = fleet_plan(args, ceiling.address, &certs, &device_ids);
    let cpu_started = (cpu_seconds(ceiling.pid()), cpu_seconds_self());
    let raw_outcome = runtime.block_on(weir_sim::fleet::run(&raw_plan));
    let raw_cpu = CpuUse::since(cpu_started, ceiling.pid());
    let discard = ceiling.stop().and_then(|stdout| {
        stdout
            .lines()
            .last()
            .and_then(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .ok_or_else(|| IngestError::Ceiling(format!("no totals line in its output: {stdout:?}")))
    });
    let raw_outcome = raw_outcome.map_err(|error| IngestError::Fleet { phase: "raw", why: error.to_string() })?;
    let discard = discard?;
    if raw_outcome.connected == 0 {
        return Err(IngestError::Fleet { phase: "raw", why: first_error(&raw_outcome, "no device connected") });
    }
    drop(runtime);

    let report = IngestReport {
        weir_cpu,
        raw_cpu,
        args,
        cpus: valid.cores.clone(),
        connections_max,
        weir: weir_outcome,
        raw: raw_outcome,
        discard,
        idle,
    };
    for line in report.human() {
        println!("{line}");
    }
    println!("{}", report.json());
    Ok(())
}

fn first_error(outcome: &Outcome, otherwise: &str) -> String {
    outcome.first_errors.first().cloned().unwrap_or_else(|| otherwise.to_owned())
}

pub(crate) fn device_profile(server: SocketAddr, certs: &Path, device: &str) -> DeviceProfile {
    let mut profile = DeviceProfile::new(
        vec![server],
        "localhost",
        certs.join("ca.pem"),
        certs.join(format!("devices/{device}.pem")),
        certs.join(format!("devices/{device}.key")),
    );
    profile.sequence.state_file = None;
    profile
}

fn fleet_plan(args: &IngestArgs, server: SocketAddr, certs: &Path, device_ids: &[String]) -> weir_sim::Plan {
    weir_sim::Plan {
        device_ids: device_ids[..args.devices as usize].to_vec(),
        rate: args.rate,
        record_bytes: args.record_bytes,
        seconds: args.seconds as f64,
        topics: vec![TOPIC.to_owned()],
        profile_template: {
            let mut profile = device_profile(server, certs, &device_ids[0]);
            profile.flow.queue_records_max = args.queue_records;
            profile.batch.records_max = profile.batch.records_max.min(args.queue_records);
            if let Some(frames) = args.closed_loop_frames {
                // One send is one frame, and every frame of the loop may be in flight.
                profile.batch.records_max = args.records_per_frame;
                profile.flow.frames_in_flight_max = profile.flow.frames_in_flight_max.max(frames);
                profile.flow.queue_records_max = profile.flow.queue_records_max.max(frames * args.records_per_frame);
            }
            profile
        },
        certs: certs.to_owned(),
        acked_log: None,
        threads: args.threads(),
        devices_per_endpoint: DEVICES_PER_ENDPOINT,
        connect_concurrency: CONNECT_CONCURRENCY,
        sends_in_flight: args.sends_in_flight,
        drain_seconds: DRAIN_SECONDS,
        rebind_every: None,
        closed_loop: args
            .closed_loop_frames
            .map(|frames| weir_sim::ClosedLoop { frames_in_flight: frames, records_per_frame: args.records_per_frame }),
        faults: weir_sim::Faults::default(),
        on_writing: None,
    }
}

/// A server in a child process (`weir serve`, or the ceiling), with its QUIC address
/// read from its log. Both run as children so that neither shares a process with the
/// device fleet, and weir's memory is its own.
pub(crate) struct ServerChild {
    name: &'static str,
    child: Child,
    pub(crate) address: SocketAddr,
    /// Its admin endpoint, when it logged one (weir does, the ceiling does not).
    pub(crate) admin: Option<SocketAddr>,
    /// Its Kafka API, when it logged one (weir with `[kafka_api]` on).
    pub(crate) kafka: Option<SocketAddr>,
}

/// What the ceiling child logs once it serves, after `quic=<address>`.
const CEILING_SERVING: &str = "ceiling serving";

impl ServerChild {
    pub(crate) fn weir(config: &Path, cores: usize) -> Result<ServerChild, IngestError> {
        let cores = cores.to_string();
        ServerChild::spawn(
            "weir serve",
            &["serve-weir", "serve", "--cores", &cores, "--config"],
            config,
            "weir serving",
        )
    }

    pub(crate) fn ceiling(config: &Path, cores: usize) -> Result<ServerChild, IngestError> {
        let cores = cores.to_string();
        ServerChild::spawn(
            "raw QUIC ceiling",
            &["serve-ceiling", "--cores", &cores, "--config"],
            config,
            CEILING_SERVING,
        )
    }

    fn spawn(name: &'static str, args: &[&str], config: &Path, serving: &str) -> Result<ServerChild, IngestError> {
        let failed =
            |why: String| if name == "weir serve" { IngestError::Weir(why) } else { IngestError::Ceiling(why) };
        let executable = std::env::current_exe().map_err(io_error("find", Path::new("weir-bench")))?;
        let mut child = Command::new(&executable)
            .args(args)
            .arg(config)
            .env("WEIR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error("start", &executable))?;
        let stderr = BufReader::new(child.stderr.take().expect("piped"));
        let (lines, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + SERVE_START_MAX;
        let mut address = None;
        let mut admin = None;
        let mut kafka = None;
        let mut seen = Vec::new();
        loop {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("not serving after {SERVE_START_MAX:?}: {}", seen.join(" | "))));
            }
            match received.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(at) = line.find("quic=") {
                        address = line[at + 5..].split_whitespace().next().and_then(|text| text.parse().ok());
                    }
                    if let Some(at) = line.find("admin=http://") {
                        admin = line[at + 13..].split_whitespace().next().and_then(|text| text.parse().ok());
                    }
                    if let Some(at) = line.find("kafka_api=") {
                        kafka = line[at + 10..].split_whitespace().next().and_then(|text| text.parse().ok());
                    }
                    let ready = line.contains(serving);
                    seen.push(line);
                    if ready {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().map(|status| status.to_string()).unwrap_or_default();
                    return Err(failed(format!("exited ({status}) before serving: {}", seen.join(" | "))));
                }
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || while received.recv().is_ok() {});
        match address {
            Some(address) => Ok(ServerChild { name, child, address, admin, kafka }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(failed(format!("no QUIC address in its log: {}", seen.join(" | "))))
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (a crash, for `weir-bench fleet --storm-at`), and wait for it.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT, then wait (bounded) for a clean exit; returns its stdout.
    pub(crate) fn stop(mut self) -> Result<String, IngestError> {
        let failed = |name: &str, why: String| {
            if name == "weir serve" {
                IngestError::Weir(why)
            } else {
                IngestError::Ceiling(why)
            }
        };
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + SERVE_STOP_MAX;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => return Err(failed(self.name, format!("exited with {status}"))),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(failed(self.name, format!("did not stop within {SERVE_STOP_MAX:?} of SIGINT")));
                }
            }
        }
        let mut stdout = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stdout);
        }
        Ok(stdout)
    }
}

/// The hidden `serve-ceiling` subcommand: the raw QUIC ceiling for a config, until
/// SIGINT; then its totals as one JSON line on stdout.
pub fn serve_ceiling(config: &Path, cores: usize) -> i32 {
    let host = Host::probe();
    let valid = match Config::load(config)
        .and_then(|loaded| loaded.validate(&host, &config.display().to_string()))
        .and_then(|valid| valid.with_core_count(cores, &host))
    {
        Ok(valid) => valid,
        Err(error) => {
            eprintln!("weir-bench serve-ceiling: {error}");
            return 2;
        }
    };
    let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Err(error) = weir::shell::runtime::shutdown_on_signals(&shutdown) {
        eprintln!("weir-bench serve-ceiling: signal handlers: {error}");
        return 1;
    }
    let server = match DiscardServer::start(&valid) {
        Ok(server) => server,
        Err(fatal) => {
            eprintln!("weir-bench serve-ceiling: {fatal}");
            return fatal.exit_code();
        }
    };
    eprintln!("weir-bench serve-ceiling: quic={} {CEILING_SERVING}", server.address());
    while !shutdown.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    match server.stop() {
        Ok(report) => {
            let totals = report.totals;
            println!(
                "{}",
                json!({
                    "frames": totals.frames,
                    "records": totals.records,
                    "refused_frames": totals.refused_frames,
                    "connections_accepted": report.connections_accepted,
                    "connections_refused": report.connections_refused,
                })
            );
            0
        }
        Err(error) => {
            eprintln!("weir-bench serve-ceiling: {error}");
            1
        }
    }
}

/// A process's resident set, from /proc/<pid>/status.
pub(crate) fn rss_bytes(pid: u32) -> Result<u64, IngestError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&path).map_err(io_error("read", &path))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| IngestError::Weir(format!("no VmRSS line in {}", path.display())))
}

struct IdleFigures {
    requested: usize,
    connected: usize,
    connect_failures: usize,
    first_error: Option<String>,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    connect_seconds: f64,
}

impl IdleFigures {
    fn bytes_per_connection(&self) -> u64 {
        self.rss_after_bytes.saturating_sub(self.rss_before_bytes) / self.connected.max(1) as u64
    }
}

/// Connects one idle device per id (its own certificate and connection), reads the
/// server's RSS before and after, then closes them all.
async fn idle_phase(
    pid: u32,
    server: SocketAddr,
    certs: &Path,
    device_ids: &[String],
) -> Result<(IdleFigures, IdleDevices), IngestError> {
    tokio::time::sleep(RSS_SETTLE).await;
    let rss_before_bytes = rss_bytes(pid)?;
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("a valid address");
    let endpoints = (0..device_ids.len().div_ceil(DEVICES_PER_ENDPOINT))
        .map(|_| client_endpoint(bind))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| IngestError::Fleet { phase: "idle", why: error.to_string() })?;
    let bar = ProgressBar::with_draw_target(Some(device_ids.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("idle [{bar:40}] {pos}/{len} connected {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let handshakes = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut connects = JoinSet::new();
    for (index, device) in device_ids.iter().enumerate() {
        let profile = device_profile(server, certs, device);
        let endpoint = endpoints[index / DEVICES_PER_ENDPOINT].clone();
        let handshakes = handshakes.clone();
        let bar = bar.clone();
        connects.spawn(async move {
            let _permit = handshakes.acquire().await.expect("never closed");
            let connected = DeviceClient::connect_on(&endpoint, &profile).await;
            bar.inc(1);
            connected
        });
    }
    let mut clients = Vec::with_capacity(device_ids.len());
    let mut connect_failures = 0;
    let mut first_error = None;
    while let Some(joined) = connects.join_next().await {
        match joined.expect("connect tasks do not panic") {
            Ok(client) => clients.push(client),
            Err(error) => {
                connect_failures += 1;
                first_error.get_or_insert(error.to_string());
            }
        }
    }
    bar.finish_and_clear();
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(RSS_SETTLE).await;
    let rss_after_bytes = rss_bytes(pid)?;
    let connected = clients.len();
    let figures = IdleFigures {
        requested: device_ids.len(),
        connected,
        connect_failures,
        first_error,
        rss_before_bytes,
        rss_after_bytes,
        connect_seconds,
    };
    Ok((figures, IdleDevices { clients, endpoints }))
}

/// The idle devices, still connected.
struct IdleDevices {
    clients: Vec<DeviceClient>,
    endpoints: Vec<quinn::Endpoint>,
}

impl IdleDevices {
    /// Closes them properly (bounded), so the server is not left timing them out.
    async fn close(self) {
        let mut closes = JoinSet::new();
        for client in self.clients {
            closes.spawn(client.close());
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(10), async { while closes.join_next().await.is_some() {} }).await;
        let idle = self.endpoints.iter().map(|endpoint| endpoint.wait_idle());
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            for wait in idle {
                wait.await;
            }
        })
        .await;
    }
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat; 0 when
/// unreadable (the figure is a diagnostic, not a result).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&format!("/proc/{pid}/stat"))
}

fn cpu_seconds_self() -> f64 {
    cpu_seconds_of("/proc/self/stat")
}

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const CLOCK_TICKS_PER_S: f64 = 100.0;

fn cpu_seconds_of(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start at field 3.
    let Some(after_name) = stat.rfind(')').map(|at| &stat[at + 2..]) else { return 0.0 };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|field| field.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / CLOCK_TICKS_PER_S
}

/// CPU used during a fleet phase by the server child and by this process (the fleet).
#[derive(Debug, Clone, Copy)]
struct CpuUse {
    server_s: f64,
    fleet_s: f64,
}

impl CpuUse {
    fn since((server_started, fleet_started): (f64, f64), pid: u32) -> CpuUse {
        CpuUse { server_s: cpu_seconds(pid) - server_started, fleet_s: cpu_seconds_self() - fleet_started }
    }

    fn us_per_record(seconds: f64, records: u64) -> f64 {
        round(seconds * 1e6 / records.max(1) as f64, 2)
    }
}

struct IngestReport<'a> {
    args: &'a IngestArgs,
    cpus: Vec<usize>,
    connections_max: u32,
    weir: Outcome,
    raw: Outcome,
    /// The ceiling child's totals (frames, records, connections).
    discard: serde_json::Value,
    idle: IdleFigures,
    weir_cpu: CpuUse,
    raw_cpu: CpuUse,
}

pub(crate) fn quantile(histogram: &Histogram<u64>, quantile: f64) -> u64 {
    if histogram.is_empty() {
        0
    } else {
        histogram.value_at_quantile(quantile)
    }
}

fn records_per_s(outcome: &Outcome) -> f64 {
    outcome.acked as f64 / outcome.elapsed.as_secs_f64().max(1e-9)
}

pub(crate) fn errors(outcome: &Outcome) -> u64 {
    outcome.failed_sends + outcome.connect_failures + outcome.abandoned_sends
}

pub(crate) fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

impl IngestReport<'_> {
    fn offered_records_per_s(&self) -> f64 {
        self.args.rate * f64::from(self.args.devices)
    }

    fn ratio(&self) -> f64 {
        records_per_s(&self.weir) / records_per_s(&self.raw).max(1e-9)
    }

    fn mb_per_s(&self, outcome: &Outcome) -> f64 {
        records_per_s(outcome) * self.args.record_bytes as f64 / 1e6
    }

    /// The ceiling took less than was offered, so it ran at its own limit (a closed
    /// loop offers as fast as it is answered, so it always does).
    fn raw_saturated(&self) -> bool {
        self.args.closed_loop_frames.is_some() || records_per_s(&self.raw) < 0.9 * self.offered_records_per_s()
    }

    /// Weir's server CPU per record over the ceiling's.
    fn cpu_per_record_over_raw(&self) -> f64 {
        let weir = CpuUse::us_per_record(self.weir_cpu.server_s, self.weir.acked);
        let raw = CpuUse::us_per_record(self.raw_cpu.server_s, self.raw.acked);
        if raw > 0.0 {
            weir / raw
        } else {
            0.0
        }
    }

    /// The closed loop's figures and targets, if it ran closed.
    fn closed_loop_json(&self) -> serde_json::Value {
        let Some(frames) = self.args.closed_loop_frames else {
            return serde_json::Value::Null;
        };
        let (weir, raw) = (&self.weir, &self.raw);
        let frame_p99_us = quantile(&weir.send_rtt_us, 0.99);
        json!({
            "frames_in_flight": frames,
            "records_per_frame": self.args.records_per_frame,
            "frames": weir.sends_acked,
            "frame_rtt_p50_us": quantile(&weir.send_rtt_us, 0.5),
            "frame_rtt_p99_us": frame_p99_us,
            "frame_rtt_p999_us": quantile(&weir.send_rtt_us, 0.999),
            "raw_frames": raw.sends_acked,
            "raw_frame_rtt_p50_us": quantile(&raw.send_rtt_us, 0.5),
            "raw_frame_rtt_p99_us": quantile(&raw.send_rtt_us, 0.99),
            "raw_frame_rtt_p999_us": quantile(&raw.send_rtt_us, 0.999),
            "records_per_s_target_met": records_per_s(weir) >= CLOSED_LOOP_RECORDS_PER_S_TARGET_MIN,
            "frame_p99_target_met": !weir.send_rtt_us.is_empty() && frame_p99_us <= CLOSED_LOOP_FRAME_P99_US_TARGET_MAX,
        })
    }

    fn json(&self) -> serde_json::Value {
        let (weir, raw, idle, args) = (&self.weir, &self.raw, &self.idle, self.args);
        let figures = json!({
            "records_per_s": round(records_per_s(weir), 1),
            "mb_per_s": round(self.mb_per_s(weir), 3),
            "raw_records_per_s": round(records_per_s(raw), 1),
            "raw_mb_per_s": round(self.mb_per_s(raw), 3),
            "ratio": round(self.ratio(), 3),
            "ratio_target_met": self.ratio() >= RATIO_TARGET_MIN,
            "raw_saturated": self.raw_saturated(),
            // A closed loop offers as fast as it is answered: no offered rate.
            "offered_records_per_s": if args.closed_loop_frames.is_some() {
                serde_json::Value::Null
            } else {
                round(self.offered_records_per_s(), 1).into()
            },
            "p50_us": quantile(&weir.latency_us, 0.5),
            "p99_us": quantile(&weir.latency_us, 0.99),
            "p999_us": quantile(&weir.latency_us, 0.999),
            "raw_p50_us": quantile(&raw.latency_us, 0.5),
            "raw_p99_us": quantile(&raw.latency_us, 0.99),
            "raw_p999_us": quantile(&raw.latency_us, 0.999),
            "acked": weir.acked,
            "errors": errors(weir),
            "raw_acked": raw.acked,
            "raw_errors": errors(raw),
            "raw_server_records": self.discard["records"],
            "raw_server_frames": self.discard["frames"],
        });
        let shape = json!({
            "rss_bytes_per_idle_connection": idle.bytes_per_connection(),
            "rss_target_met": idle.connected > 0 && idle.bytes_per_connection() <= IDLE_CONNECTION_BYTES_TARGET_MAX,
            "idle_connections": idle.requested,
            "idle_connected": idle.connected,
            "idle_connect_failures": idle.connect_failures,
            "idle_connect_s": round(idle.connect_seconds, 3),
            "rss_before_bytes": idle.rss_before_bytes,
            "rss_after_bytes": idle.rss_after_bytes,
            "connections_max": self.connections_max,
            "weir_elapsed_s": round(weir.elapsed.as_secs_f64(), 3),
            "raw_elapsed_s": round(raw.elapsed.as_secs_f64(), 3),
            "cores": args.cores,
            "cpus": self.cpus,
            "devices": args.devices,
            "connected": weir.connected,
            "raw_connected": raw.connected,
            "rate": args.rate,
            "sends_in_flight": args.sends_in_flight,
            "queue_records": args.queue_records,
            "keep_idle_open": args.keep_idle_open,
            "record_bytes": args.record_bytes,
            "seconds": args.seconds,
            "partitions": args.partitions,
            "threads": args.threads(),
            "server_cpu_s": round(self.weir_cpu.server_s, 2),
            "fleet_cpu_s": round(self.weir_cpu.fleet_s, 2),
            "raw_server_cpu_s": round(self.raw_cpu.server_s, 2),
            "raw_fleet_cpu_s": round(self.raw_cpu.fleet_s, 2),
            "server_cpu_us_per_record": CpuUse::us_per_record(self.weir_cpu.server_s, weir.acked),
            "raw_server_cpu_us_per_record": CpuUse::us_per_record(self.raw_cpu.server_s, raw.acked),
            "cpu_per_record_over_raw": round(self.cpu_per_record_over_raw(), 3),
            "cpu_target_met": self.cpu_per_record_over_raw() <= CPU_PER_RECORD_OVER_RAW_TARGET_MAX,
            "closed_loop": self.closed_loop_json(),
            "fleet_cpu_us_per_record": CpuUse::us_per_record(self.weir_cpu.fleet_s, weir.acked),
            "raw_fleet_cpu_us_per_record": CpuUse::us_per_record(self.raw_cpu.fleet_s, raw.acked),
        });
        let (serde_json::Value::Object(mut all), serde_json::Value::Object(rest)) = (figures, shape) else {
            unreachable!("json! objects are objects")
        };
        all.extend(rest);
        serde_json::Value::Object(all)
    }

    fn human(&self) -> Vec<String> {
        let (weir, raw, idle, args) = (&self.weir, &self.raw, &self.idle, self.args);
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        let mut lines = vec![
            format!(
                "weir-bench ingest: {} core(s) (cpus {:?}), {} devices x {}, {}-byte records, {} s per phase, {} partitions",
                args.cores,
                self.cpus,
                args.devices,
                match args.closed_loop_frames {
                    Some(frames) => format!("{frames} frame(s) of {} records in a closed loop", args.records_per_frame),
                    None => format!("{} records/s offered", args.rate),
                },
                args.record_bytes,
                args.seconds,
                args.partitions
            ),
            format!(
                "weir: {:.0} records/s ({:.3} MB/s) acked durably; ack latency p50 {} us, p99 {} us, p999 {} us; \
                 {} acked, {} errors",
                records_per_s(weir),
                self.mb_per_s(weir),
                quantile(&weir.latency_us, 0.5),
                quantile(&weir.latency_us, 0.99),
                quantile(&weir.latency_us, 0.999),
                weir.acked,
                errors(weir)
            ),
            format!(
                "raw:  {:.0} records/s ({:.3} MB/s) acked by the discard server; p50 {} us, p99 {} us; {} acked, {} errors",
                records_per_s(raw),
                self.mb_per_s(raw),
                quantile(&raw.latency_us, 0.5),
                quantile(&raw.latency_us, 0.99),
                raw.acked,
                errors(raw)
            ),
            format!(
                "cpu:  weir server {:.2} s ({:.2} us/record), fleet {:.2} s ({:.2} us/record); ceiling server {:.2} s \
                 ({:.2} us/record), fleet {:.2} s ({:.2} us/record)",
                self.weir_cpu.server_s,
                CpuUse::us_per_record(self.weir_cpu.server_s, weir.acked),
                self.weir_cpu.fleet_s,
                CpuUse::us_per_record(self.weir_cpu.fleet_s, weir.acked),
                self.raw_cpu.server_s,
                CpuUse::us_per_record(self.raw_cpu.server_s, raw.acked),
                self.raw_cpu.fleet_s,
                CpuUse::us_per_record(self.raw_cpu.fleet_s, raw.acked)
            ),
            format!(
                "idle: {} of {} connections held; server RSS {} -> {} bytes, {} bytes per connection",
                idle.connected,
                idle.requested,
                idle.rss_before_bytes,
                idle.rss_after_bytes,
                idle.bytes_per_connection()
            ),
            format!(
                "targets: ratio {:.3} (>= {RATIO_TARGET_MIN}: {}){}; {} bytes per idle connection (<= {}: {})",
                self.ratio(),
                met(self.ratio() >= RATIO_TARGET_MIN),
                if self.raw_saturated() { "" } else { " [the ceiling was not saturated: raise --rate]" },
                idle.bytes_per_connection(),
                IDLE_CONNECTION_BYTES_TARGET_MAX,
                met(idle.connected > 0 && idle.bytes_per_connection() <= IDLE_CONNECTION_BYTES_TARGET_MAX)
            ),
        ];
        if let Some(frames) = args.closed_loop_frames {
            lines.push(format!(
                "closed loop: {frames} frame(s) of {} records in flight per device; frame round trip weir p50 {} us, \
                 p99 {} us, p999 {} us ({} frames); ceiling p50 {} us, p99 {} us ({} frames); targets >= {} \
                 records/s: {}, p99 <= {} us: {}",
                args.records_per_frame,
                quantile(&weir.send_rtt_us, 0.5),
                quantile(&weir.send_rtt_us, 0.99),
                quantile(&weir.send_rtt_us, 0.999),
                weir.sends_acked,
                quantile(&raw.send_rtt_us, 0.5),
                quantile(&raw.send_rtt_us, 0.99),
                raw.sends_acked,
                CLOSED_LOOP_RECORDS_PER_S_TARGET_MIN,
                met(records_per_s(weir) >= CLOSED_LOOP_RECORDS_PER_S_TARGET_MIN),
                CLOSED_LOOP_FRAME_P99_US_TARGET_MAX,
                met(!weir.send_rtt_us.is_empty()
                    && quantile(&weir.send_rtt_us, 0.99) <= CLOSED_LOOP_FRAME_P99_US_TARGET_MAX)
            ));
        }
        lines.push(format!(
            "cpu per record weir / ceiling {:.3} (<= {CPU_PER_RECORD_OVER_RAW_TARGET_MAX}: {})",
            self.cpu_per_record_over_raw(),
            met(self.cpu_per_record_over_raw() <= CPU_PER_RECORD_OVER_RAW_TARGET_MAX)
        ));
        for error in weir.first_errors.iter().chain(&raw.first_errors).chain(&idle.first_error) {
            lines.push(format!("error: {error}"));
        }
        lines
    }
}
