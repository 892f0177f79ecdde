//! weir-sim: a device fleet simulator. Many devices, each with its own certificate and
//! its own QUIC connection, write records at a fixed rate through the weir-device
//! client for a bounded time; at the end it prints throughput and ack latency, and as
//! its last stdout line one JSON object for scripts.
//!
//! Devices share a few tokio threads and a few UDP endpoints (one per
//! `--devices-per-endpoint` devices), so 1,000 devices fit on 2 cores. Exit codes: 0
//! when every device connected and every record it made was acked; 1 when not (a
//! device that could not connect or was refused, a record failed or still unacked
//! after the drain: stderr says how many and the server's first answers) or the
//! runtime failed; 2 for bad options or missing certificates.

#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use weir_device::DeviceProfile;
use weir_sim::{fleet, report, Plan};

/// The largest fleet one simulator runs.
const DEVICES_MAX: u32 = 100_000;
/// The highest rate one simulated device writes at.
const RATE_MAX: f64 = 1_000_000.0;

#[derive(Debug, Parser)]
#[command(
    name = "weir-sim",
    version,
    about = "Simulate a fleet of devices writing records to weir over QUIC",
    after_help = "Certificates: `weir certs` writes DIR/ca.pem and DIR/devices/<id>.pem/.key; \
                  weir-sim uses the ids <device-prefix><n> for n in device-first..device-first+devices \
                  (for the defaults: weir certs --dir DIR --device-prefix sim- --device-count 10).\n\
                  Exit status: 0 when every device connected and every record it made was acked; 1 when \
                  any device did not connect or was refused, or any record failed or was still unacked \
                  after --drain-seconds (stderr says how many, with the server's answers, such as a \
                  denied device), or the run could not start; 2 for bad options or missing certificates.\n\
                  Last stdout line: {\"acked\",\"errors\",\"records_per_s\",\"mb_per_s\",\"p50_us\",\"p99_us\",\"p999_us\",...}"
)]
struct Options {
    /// Number of simulated devices, each with its own certificate and connection.
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Records per second each device writes (0: connect and stay idle).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Bytes of each record's value (the key is the device id).
    #[arg(long, default_value_t = 256)]
    record_bytes: usize,
    /// How long devices write, in seconds; then outstanding sends drain.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Topic to write (repeatable or comma-separated); each device rotates through them.
    #[arg(long = "topic", value_delimiter = ',', default_value = "telemetry")]
    topics: Vec<String>,
    /// Server address (ip:port); default from --profile, else 127.0.0.1:4433.
    #[arg(long)]
    server: Option<SocketAddr>,
    /// TLS server name; default from --profile, else localhost.
    #[arg(long)]
    server_name: Option<String>,
    /// Directory written by `weir certs` (ca.pem, devices/<id>.pem and .key).
    #[arg(long)]
    certs: PathBuf,
    /// Device ids are <prefix><n>.
    #[arg(long, default_value = "sim-")]
    device_prefix: String,
    /// First n of the device ids.
    #[arg(long, default_value_t = 0)]
    device_first: u32,
    /// Device profile whose batching, flow, retry and timeout settings every device
    /// uses (its server and TLS settings are replaced by the options above).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Overrides batch.linger_ms of the profile.
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Overrides batch.records_max of the profile.
    #[arg(long)]
    batch_records: Option<usize>,
    /// Overrides flow.frames_in_flight_max of the profile.
    #[arg(long)]
    frames_in_flight: Option<usize>,
    /// Write every acked record as a line `device sequence partition offset record_index topic`.
    #[arg(long)]
    acked_log: Option<PathBuf>,
    /// Tokio worker threads (default: the CPUs available).
    #[arg(long)]
    threads: Option<usize>,
    /// Devices sharing one UDP endpoint (socket).
    #[arg(long, default_value_t = 100)]
    devices_per_endpoint: u32,
    /// Handshakes in progress at once while the fleet connects.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Sends one device keeps outstanding before it waits (records due meanwhile are
    /// sent together once one completes).
    #[arg(long, default_value_t = 64)]
    sends_in_flight: usize,
    /// Longest wait for outstanding sends after --seconds, in seconds.
    #[arg(long, default_value_t = 30.0)]
    drain_seconds: f64,
    /// Move every endpoint to a new UDP socket (a new source port, as after a NAT
    /// rebinding) every this many milliseconds while devices write; 0: never.
    #[arg(long, default_value_t = 0)]
    rebind_every_ms: u64,
    /// Closed loop: each device keeps exactly N frames in flight and sends the next the
    /// moment one is answered (no pacing tick, no linger; --rate is not used). The
    /// summary adds each frame's round trip (frame_rtt_p50_us, ...).
    #[arg(long, value_name = "N")]
    closed_loop_frames: Option<usize>,
    /// Records in each closed-loop frame.
    #[arg(long, default_value_t = 100, value_name = "R")]
    records_per_frame: usize,
    /// Devices (the first ones) that stop writing and disconnect after --stop-after-seconds.
    #[arg(long, default_value_t = 0)]
    stop_devices: u32,
    #[arg(long, default_value_t = 0.0)]
    stop_after_seconds: f64,
    /// Devices (after the stopped ones) that disconnect after --restart-after-seconds and
    /// connect again as a device that lost its sequence state and whose clock began
    /// again at 1970: their sequences start again from below.
    #[arg(long, default_value_t = 0)]
    restart_devices: u32,
    #[arg(long, default_value_t = 0.0)]
    restart_after_seconds: f64,
}

/// A bad option: reported on stderr, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn usage(message: impl Into<String>) -> UsageError {
    UsageError(message.into())
}

fn plan(options: Options) -> Result<Plan, UsageError> {
    if options.devices == 0 || options.devices > DEVICES_MAX {
        return Err(usage(format!("--devices {} is not in 1..={DEVICES_MAX}", options.devices)));
    }
    if !options.rate.is_finite() || !(0.0..=RATE_MAX).contains(&options.rate) {
        return Err(usage(format!("--rate {} is not in 0..={RATE_MAX} records/s", options.rate)));
    }
    let value_bytes_max = weir::core::protocol::FRAME_LIMITS_V1.value_bytes_max;
    if options.record_bytes > value_bytes_max {
        return Err(usage(format!("--record-bytes {} is over protocol v1's {value_bytes_max}", options.record_bytes)));
    }
    if !options.seconds.is_finite() || options.seconds <= 0.0 || options.seconds > 7.0 * 86_400.0 {
        return Err(usage(format!("--seconds {} is not in (0, 604800]", options.seconds)));
    }
    if !options.drain_seconds.is_finite() || !(0.0..=3600.0).contains(&options.drain_seconds) {
        return Err(usage(format!("--drain-seconds {} is not in 0..=3600", options.drain_seconds)));
    }
    for topic in &options.topics {
        weir_device::batch::check_topic(topic).map_err(|error| usage(format!("--topic: {error}")))?;
    }
    if options.devices_per_endpoint == 0 {
        return Err(usage("--devices-per-endpoint must be at least 1"));
    }
    if options.rebind_every_ms > 3_600_000 {
        return Err(usage(format!("--rebind-every-ms {} is over an hour", options.rebind_every_ms)));
    }
    if options.connect_concurrency == 0 || options.sends_in_flight == 0 {
        return Err(usage("--connect-concurrency and --sends-in-flight must be at least 1"));
    }
    if u64::from(options.stop_devices) + u64::from(options.restart_devices) > u64::from(options.devices) {
        return Err(usage("--stop-devices and --restart-devices together exceed --devices"));
    }
    for (name, seconds) in [
        ("--stop-after-seconds", options.stop_after_seconds),
        ("--restart-after-seconds", options.restart_after_seconds),
    ] {
        if !seconds.is_finite() || seconds < 0.0 || seconds > options.seconds {
            return Err(usage(format!("{name} {seconds} is not within the run (0..={})", options.seconds)));
        }
    }
    let faults = weir_sim::Faults {
        stopped: options.stop_devices as usize,
        stop_after: std::time::Duration::from_secs_f64(options.stop_after_seconds),
        restarted: options.restart_devices as usize,
        restart_after: std::time::Duration::from_secs_f64(options.restart_after_seconds),
    };
    let threads = match options.threads {
        Some(0) => return Err(usage("--threads must be at least 1")),
        Some(threads) => threads,
        None => std::thread::available_parallelism().map_or(2, |count| count.get()),
    };
    let last = options.device_first.checked_add(options.devices - 1).ok_or_else(|| usage("device ids overflow"))?;
    let device_ids: Vec<String> =
        (options.device_first..=last).map(|index| format!("{}{index}", options.device_prefix)).collect();
    if let Some(bad) = device_ids.iter().find(|id| !weir::certs::is_device_id(id)) {
        return Err(usage(format!("{bad:?} is not a device id (1..=64 of a-z A-Z 0-9 . _ -); check --device-prefix")));
    }
    let ca = options.certs.join("ca.pem");
    let missing: Vec<&String> = device_ids
        .iter()
        .filter(|id| {
            let devices = options.certs.join("devices");
            !devices.join(format!("{id}.pem")).is_file() || !devices.join(format!("{id}.key")).is_file()
        })
        .collect();
    let make = certs_command(&options.certs, &options.device_prefix, options.device_first, &missing, &device_ids);
    if !ca.is_file() {
        return Err(usage(format!(
            "{} not found: --certs must be a directory written by `weir certs`; make one (a CA, a server \
             certificate and these devices) with `{make}`, and give the server the same directory as \
             quic.certs_dir",
            ca.display()
        )));
    }
    if let Some(first) = missing.first() {
        return Err(usage(format!(
            "{} of {} device certificates are missing under {}, the first {first}; make them with `{make}` \
             (it reuses the CA in {})",
            missing.len(),
            device_ids.len(),
            options.certs.join("devices").display(),
            options.certs.display(),
        )));
    }
    let mut profile = match &options.profile {
        Some(path) => DeviceProfile::load(path).map_err(|error| usage(format!("--profile: {error}")))?,
        None => DeviceProfile::new(
            vec!["127.0.0.1:4433".parse().expect("a valid address")],
            "localhost",
            PathBuf::new(),
            PathBuf::new(),
            PathBuf::new(),
        ),
    };
    if let Some(server) = options.server {
        profile.server.addresses = vec![server.to_string()];
    }
    if let Some(name) = options.server_name {
        profile.server.name = name;
    }
    if let Some(linger_ms) = options.linger_ms {
        profile.batch.linger_ms = linger_ms;
    }
    if let Some(records) = options.batch_records {
        profile.batch.records_max = records;
    }
    if let Some(frames) = options.frames_in_flight {
        profile.flow.frames_in_flight_max = frames;
    }
    let closed_loop = match options.closed_loop_frames {
        None => None,
        Some(0) => return Err(usage("--closed-loop-frames must be at least 1")),
        Some(frames) => {
            if options.records_per_frame == 0 {
                return Err(usage("--records-per-frame must be at least 1"));
            }
            // One send is one frame: the batch holds exactly a send, and the device
            // lets every frame of the loop be in flight and queued.
            profile.batch.records_max = options.records_per_frame;
            profile.flow.frames_in_flight_max = profile.flow.frames_in_flight_max.max(frames);
            profile.flow.queue_records_max =
                profile.flow.queue_records_max.max(frames.saturating_mul(options.records_per_frame));
            Some(weir_sim::ClosedLoop { frames_in_flight: frames, records_per_frame: options.records_per_frame })
        }
    };
    profile.tls.ca = ca;
    profile.tls.certificate = options.certs.join("devices/placeholder.pem");
    profile.tls.key = options.certs.join("devices/placeholder.key");
    profile.sequence.state_file = None; // simulated devices start from the clock
    profile.validate("(weir-sim options)").map_err(|error| usage(error.to_string()))?;
    Ok(Plan {
        device_ids,
        rate: options.rate,
        record_bytes: options.record_bytes,
        seconds: options.seconds,
        topics: options.topics,
        profile_template: profile,
        certs: options.certs,
        acked_log: options.acked_log,
        threads,
        devices_per_endpoint: options.devices_per_endpoint as usize,
        connect_concurrency: options.connect_concurrency,
        sends_in_flight: options.sends_in_flight,
        drain_seconds: options.drain_seconds,
        rebind_every: (options.rebind_every_ms > 0).then(|| std::time::Duration::from_millis(options.rebind_every_ms)),
        closed_loop,
        faults,
        on_writing: None,
    })
}

/// The exact `weir certs` command that makes the `missing` device certificates: the
/// compact `--device-count` form when it makes exactly those, else one `--device` per id
/// (`weir certs` never overwrites, so it must not name an id that exists).
fn certs_command(certs: &Path, prefix: &str, first: u32, missing: &[&String], all: &[String]) -> String {
    let directory = certs.display().to_string();
    let directory = if directory.contains(char::is_whitespace) { format!("{directory:?}") } else { directory };
    if first == 0 && missing.len() == all.len() {
        format!("weir certs --dir {directory} --device-prefix {prefix} --device-count {}", all.len())
    } else {
        let devices: Vec<String> = missing.iter().map(|id| format!("--device {id}")).collect();
        format!("weir certs --dir {directory} {}", devices.join(" "))
    }
}

fn main() -> ExitCode {
    let options = Options::parse(); // clap reports its own errors with exit code 2
    let plan = match plan(options) {
        Ok(plan) => plan,
        Err(error) => {
            eprintln!("weir-sim: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(plan.threads).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("weir-sim: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(fleet::run(&plan)) {
        Ok(outcome) => {
            let summary = report::Summary::of(&plan, &outcome);
            for line in summary.human_lines() {
                println!("{line}");
            }
            println!("{}", summary.json());
            if outcome.connected == 0 {
                eprintln!("weir-sim: no device could connect");
                for error in &outcome.first_errors {
                    eprintln!("weir-sim: {error}");
                }
                return ExitCode::from(1);
            }
            let unacked = outcome.generated.saturating_sub(outcome.acked);
            if unacked > 0 || outcome.connect_failures > 0 {
                eprintln!(
                    "weir-sim: incomplete: {unacked} of {} records not acked ({} failed, the rest in {} abandoned \
                     sends); {} of {} devices did not connect",
                    outcome.generated,
                    outcome.failed_records,
                    outcome.abandoned_sends,
                    outcome.connect_failures,
                    outcome.devices
                );
                // The server's own words (a denied device, a refused frame) first.
                for error in &outcome.first_errors {
                    eprintln!("weir-sim: {error}");
                }
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("weir-sim: {error}");
            ExitCode::from(1)
        }
    }
}
