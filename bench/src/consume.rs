//! `weir-bench consume`: local consumers reading weir over its Kafka API (issue 15),
//! against ceilings of the same run. One `weir serve` child (as `ingest` starts it),
//! one topic, and three phases, in this order:
//!
//! 1. **backlog**: devices fill the topic with at least `--backlog-records` records;
//!    the same records are copied into tansu (memory storage, the test broker) by the
//!    client itself. Then, in `--rounds` alternating rounds: the client reads every
//!    stored record from weir, the same client reads the same records from tansu, and
//!    the segment files are read raw (O_DIRECT, sequential, batch headers walked to count
//!    the records): the ceiling no reader over the network can pass. Figures are the
//!    medians of the rounds; `ratio_vs_broker` is weir's records/s over tansu's.
//! 2. **tail**: a consumer assigned at the end of every partition while `--devices`
//!    weir-sim devices write at a steady `--rate`; a probe device sends one record every
//!    `--probe-interval-ms` and notes the wall clock when each is acknowledged; the
//!    consumer notes the wall clock when poll returns it. The difference is the latency
//!    from device ack to a tailing consumer (p50, p99, p999). A record the consumer got
//!    before its device saw the ack counts as 0 (and in `before_ack`): weir makes a
//!    record visible and acknowledges it at the same time, the ack then crosses QUIC.
//! 3. **ingest**: a saturating fleet (`--ingest-devices` x `--ingest-rate`) for
//!    `--ingest-seconds`, with a consumer tailing every partition and without, the
//!    order alternating by round; `ratio` is the median with over the median without.
//!    `tail_read_fraction_min` says whether the consumer kept up: the least, over the
//!    rounds, of the records it read over those the devices wrote while it tailed.
//!
//! "The same client" is confluent-kafka (librdkafka, the client most local
//! applications use), driven by bench/python/consume_client.py with one set of
//! settings for both brokers: there is no Rust Kafka consumer in the tree (weir's
//! shipper only produces), and librdkafka is what the users run. On this
//! loopback the consumer shares the CPUs with weir, so every figure is a ratio within
//! one run, not a capacity.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use serde_json::{json, Value};

use weir::config::Host;
use weir_device::{DeviceClient, Record};

use crate::ingest::{self, ServerChild, DEVICE_PREFIX, TOPIC};
use crate::ship::{python, repo, Broker};

/// The targets.
pub const TAIL_P99_US_TARGET_MAX: u64 = 5_000;
pub const BACKLOG_RATIO_TARGET_MIN: f64 = 1.0;
pub const INGEST_WITH_TAIL_RATIO_TARGET_MIN: f64 = 0.9;

/// Flag limits.
const ROUNDS_MAX: u32 = 100;
const SECONDS_MAX: u64 = 600;
const DEVICES_MAX: u32 = 10_000;
const RATE_MAX: f64 = 1_000_000.0;
const BACKLOG_RECORDS_MAX: u64 = 100_000_000;
const PARTITIONS_MAX: u32 = 64;
const RECORD_BYTES_MAX: usize = 64 << 10;
/// The probe's record key: the tailing consumer notes these records only.
const PROBE_KEY: &[u8] = b"weir-bench-probe";
/// O_DIRECT reads of the raw ceiling: alignment and size of each read.
const DIRECT_ALIGNMENT: usize = 4096;
const RAW_READ_BYTES: usize = 1 << 20;
/// Offsets of a RecordBatch v2 header: its length (after the first 12 bytes) and its
/// record count.
const BATCH_LENGTH_AT: usize = 8;
const BATCH_RECORDS_AT: usize = 57;
const BATCH_HEADER_BYTES: usize = 61;

#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    /// Cores of `weir serve`.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cores: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4, value_name = "P")]
    pub partitions: u32,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 256, value_name = "B")]
    pub record_bytes: usize,
    /// Rounds of the backlog and ingest phases (medians are reported).
    #[arg(long, default_value_t = 5, value_name = "R")]
    pub rounds: u32,
    /// Records the backlog holds at least.
    #[arg(long, default_value_t = 200_000, value_name = "N")]
    pub backlog_records: u64,
    /// Devices writing at a steady rate while the tail is measured.
    #[arg(long, default_value_t = 20, value_name = "D")]
    pub devices: u32,
    /// Records per second each of those devices writes.
    #[arg(long, default_value_t = 50.0, value_name = "R")]
    pub rate: f64,
    /// Seconds the tail is measured.
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub tail_seconds: u64,
    /// The probe device's pause between its records.
    #[arg(long, default_value_t = 5, value_name = "MS")]
    pub probe_interval_ms: u64,
    /// Devices of the saturating fleet (the backlog fill and the ingest phase).
    #[arg(long, default_value_t = 50, value_name = "D")]
    pub ingest_devices: u32,
    /// Records per second each of them offers (above what weir takes).
    #[arg(long, default_value_t = 2000.0, value_name = "R")]
    pub ingest_rate: f64,
    /// Seconds of each ingest slice (with, then without the consumer, or the reverse).
    #[arg(long, default_value_t = 3, value_name = "S")]
    pub ingest_seconds: u64,
    /// The phases to run, in order: backlog, tail, ingest.
    #[arg(long, value_delimiter = ',', default_value = "backlog,tail,ingest", value_name = "LIST")]
    pub phases: Vec<String>,
}

/// Why a consume run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    #[error("bad flags:\n  {}", .0.join("\n  "))]
    Usage(Vec<String>),
    #[error("{0}")]
    Ingest(#[from] ingest::IngestError),
    #[error("{what}: {why}")]
    Step { what: String, why: String },
}

impl ConsumeError {
    pub fn is_usage(&self) -> bool {
        matches!(self, ConsumeError::Usage(_))
    }
}

fn step(what: impl Into<String>, why: impl std::fmt::Display) -> ConsumeError {
    ConsumeError::Step { what: what.into(), why: why.to_string() }
}

fn say(message: impl std::fmt::Display) {
    eprintln!("weir-bench consume: {message}");
}

impl ConsumeArgs {
    fn check(&self, host: &Host) -> Result<(), ConsumeError> {
        let mut problems = Vec::new();
        let cpus = host.usable_cpus.len();
        if self.cores == 0 || self.cores > cpus {
            problems.push(format!("--cores {}: between 1 and the {cpus} usable CPUs", self.cores));
        }
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            problems.push(format!("--partitions {}: between 1 and {PARTITIONS_MAX}", self.partitions));
        }
        if self.record_bytes == 0 || self.record_bytes > RECORD_BYTES_MAX {
            problems.push(format!("--record-bytes {}: between 1 and {RECORD_BYTES_MAX}", self.record_bytes));
        }
        if self.rounds == 0 || self.rounds > ROUNDS_MAX {
            problems.push(format!("--rounds {}: between 1 and {ROUNDS_MAX}", self.rounds));
        }
        if self.backlog_records == 0 || self.backlog_records > BACKLOG_RECORDS_MAX {
            problems.push(format!("--backlog-records {}: between 1 and {BACKLOG_RECORDS_MAX}", self.backlog_records));
        }
        for (flag, devices) in [("--devices", self.devices), ("--ingest-devices", self.ingest_devices)] {
            if devices == 0 || devices > DEVICES_MAX {
                problems.push(format!("{flag} {devices}: between 1 and {DEVICES_MAX}"));
            }
        }
        for (flag, rate) in [("--rate", self.rate), ("--ingest-rate", self.ingest_rate)] {
            if !(rate > 0.0 && rate <= RATE_MAX) {
                problems.push(format!("{flag} {rate}: above 0, at most {RATE_MAX}"));
            }
        }
        for (flag, seconds) in [("--tail-seconds", self.tail_seconds), ("--ingest-seconds", self.ingest_seconds)] {
            if seconds == 0 || seconds > SECONDS_MAX {
                problems.push(format!("{flag} {seconds}: between 1 and {SECONDS_MAX}"));
            }
        }
        if self.probe_interval_ms == 0 || self.probe_interval_ms > 10_000 {
            problems.push(format!("--probe-interval-ms {}: between 1 and 10000", self.probe_interval_ms));
        }
        for phase in &self.phases {
            if !["backlog", "tail", "ingest"].contains(&phase.as_str()) {
                problems.push(format!("--phases {phase}: one of backlog, tail, ingest"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConsumeError::Usage(problems))
        }
    }

    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|name| name == phase)
    }
}

/// What every phase shares: weir, its PKI and data, the tokio runtime of the devices.
struct Bench<'a> {
    args: &'a ConsumeArgs,
    root: PathBuf,
    certs: PathBuf,
    device_ids: Vec<String>,
    weir: ServerChild,
    kafka: String,
    runtime: tokio::runtime::Runtime,
}

pub fn run(args: &ConsumeArgs) -> Result<(), ConsumeError> {
    let host = Host::probe();
    args.check(&host)?;
    if !python().exists() {
        return Err(step(python().display().to_string(), "missing: run tools/install-broker (or set WEIR_PYTHON)"));
    }
    let root = tempfile::Builder::new()
        .prefix("weir-bench-consume-")
        .tempdir()
        .map_err(|error| step("create temp dir", error))?;
    let certs = root.path().join("certs");
    // The last certificate is the probe's.
    let device_count = args.devices.max(args.ingest_devices) + 1;
    let device_ids: Vec<String> = (0..device_count).map(|index| format!("{DEVICE_PREFIX}{index}")).collect();
    weir::certs::generate(&certs, &[], &device_ids, 2).map_err(|error| step("certificates", error))?;
    let config_path = root.path().join("weir.toml");
    let config_text = format!(
        "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[quic]\n\
         listen = \"127.0.0.1:0\"\ncerts_dir = {:?}\ngenerate_dev_certs = false\nconnections_max = {}\n\
         [[topics]]\nname = \"{TOPIC}\"\npartitions = {}\n",
        root.path().join("data").display().to_string(),
        certs.display().to_string(),
        device_count + ingest::CONNECTIONS_MARGIN,
        args.partitions
    );
    std::fs::write(&config_path, config_text).map_err(|error| step("write the config", error))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(host.usable_cpus.len().max(1))
        .enable_all()
        .build()
        .map_err(|error| step("start tokio", error))?;
    let weir = ServerChild::weir(&config_path, args.cores)?;
    let kafka =
        weir.kafka.map(|address| address.to_string()).ok_or_else(|| step("weir serve", "no Kafka API address"))?;
    say(format_args!("weir serving QUIC on {}, Kafka API on {kafka} (pid {})", weir.address, weir.pid()));
    let bench = Bench { args, root: root.path().to_owned(), certs, device_ids, weir, kafka, runtime };
    let outcome = bench.phases();
    let Bench { weir, .. } = bench;
    let stopped = weir.stop();
    let report = outcome?;
    stopped?;
    println!("{}", report);
    Ok(())
}

impl Bench<'_> {
    fn phases(&self) -> Result<Value, ConsumeError> {
        let mut report = json!({
            "cores": self.args.cores,
            "partitions": self.args.partitions,
            "record_bytes": self.args.record_bytes,
            "rounds": self.args.rounds,
            "client": "confluent-kafka (librdkafka), bench/python/consume_client.py",
            "targets": {
                "tail_p99_us_max": TAIL_P99_US_TARGET_MAX,
                "backlog_ratio_vs_broker_min": BACKLOG_RATIO_TARGET_MIN,
                "ingest_with_tail_ratio_min": INGEST_WITH_TAIL_RATIO_TARGET_MIN,
            },
        });
        if self.args.runs("backlog") {
            report["backlog"] = self.backlog()?;
        }
        if self.args.runs("tail") {
            report["tail"] = self.tail()?;
        }
        if self.args.runs("ingest") {
            report["ingest"] = self.ingest()?;
        }
        Ok(report)
    }

    /// A fleet plan of the first `devices` devices at `rate` for `seconds`.
    fn fleet_plan(&self, devices: u32, rate: f64, seconds: f64) -> weir_sim::Plan {
        let mut profile = ingest::device_profile(self.weir.address, &self.certs, &self.device_ids[0]);
        profile.sequence.state_file = None;
        weir_sim::Plan {
            device_ids: self.device_ids[..devices as usize].to_vec(),
            rate,
            record_bytes: self.args.record_bytes,
            seconds,
            topics: vec![TOPIC.to_owned()],
            profile_template: profile,
            certs: self.certs.clone(),
            acked_log: None,
            threads: self.runtime.metrics().num_workers(),
            devices_per_endpoint: ingest::DEVICES_PER_ENDPOINT,
            connect_concurrency: ingest::CONNECT_CONCURRENCY,
            sends_in_flight: 1,
            drain_seconds: ingest::DRAIN_SECONDS,
            rebind_every: None,
            closed_loop: None,
            faults: weir_sim::Faults::default(),
            on_writing: None,
        }
    }

    /// Runs a fleet to its end: (records acknowledged, seconds of writing).
    fn fleet(&self, devices: u32, rate: f64, seconds: f64) -> Result<(u64, f64), ConsumeError> {
        let outcome = self
            .runtime
            .block_on(weir_sim::fleet::run(&self.fleet_plan(devices, rate, seconds)))
            .map_err(|error| step("fleet", error))?;
        if outcome.connected == 0 || outcome.acked == 0 {
            return Err(step("fleet", format!("nothing acknowledged: {:?}", outcome.first_errors.first())));
        }
        Ok((outcome.acked, (outcome.writing_until - outcome.writing_from).as_secs_f64()))
    }

    /// Records stored in the topic (the sum of the partitions' durable ends).
    fn stored_records(&self) -> Result<u64, ConsumeError> {
        let admin = self.weir.admin.ok_or_else(|| step("weir serve", "no admin address"))?;
        let status = weir::status::fetch(&admin.to_string()).map_err(|error| step("/status", error))?;
        Ok(status
            .partitions
            .iter()
            .map(|partition| (partition.log_end_offset - partition.log_start_offset) as u64)
            .sum())
    }

    fn backlog(&self) -> Result<Value, ConsumeError> {
        let args = self.args;
        let offered = f64::from(args.ingest_devices) * args.ingest_rate;
        while self.stored_records()? < args.backlog_records {
            let missing = args.backlog_records - self.stored_records()?;
            let seconds = (missing as f64 / offered).clamp(1.0, SECONDS_MAX as f64);
            say(format_args!("backlog: filling {missing} more records"));
            self.fleet(args.ingest_devices, args.ingest_rate, seconds)?;
        }
        let records = self.stored_records()?;
        let broker = Broker::start().map_err(|error| step("tansu", error))?;
        broker.create_topic(TOPIC, args.partitions).map_err(|error| step("tansu", error))?;
        say(format_args!("backlog: copying the {records} records into tansu with the client"));
        let copied = client(&[
            "copy",
            &self.kafka,
            &broker.address(),
            TOPIC,
            &args.partitions.to_string(),
            &records.to_string(),
        ])?;
        if copied["copied"].as_u64() != Some(records) {
            return Err(step("copy into tansu", copied));
        }
        let mut weir_rates = Vec::new();
        let mut broker_rates = Vec::new();
        let mut raw_rates = Vec::new();
        let mut value_bytes = None;
        for round in 0..args.rounds {
            let weir = self.client_read(&self.kafka, records)?;
            let broker_read = self.client_read(&broker.address(), records)?;
            let raw = self.raw_read()?;
            if raw.0 != records {
                return Err(step("raw read", format!("{} records in the segment files, {records} stored", raw.0)));
            }
            value_bytes.get_or_insert(weir.1);
            say(format_args!(
                "backlog round {round}: weir {:.0} records/s, tansu {:.0}, raw {:.0}",
                records as f64 / weir.2,
                records as f64 / broker_read.2,
                records as f64 / raw.2
            ));
            weir_rates.push(records as f64 / weir.2);
            broker_rates.push(records as f64 / broker_read.2);
            raw_rates.push(records as f64 / raw.2);
        }
        let (weir, broker_median, raw) = (median(&weir_rates), median(&broker_rates), median(&raw_rates));
        Ok(json!({
            "records": records,
            "value_bytes": value_bytes,
            "weir_records_per_s": weir,
            "broker_records_per_s": broker_median,
            "raw_records_per_s": raw,
            "ratio_vs_broker": weir / broker_median,
            "ratio_vs_raw": weir / raw,
            "weir_rounds": weir_rates,
            "broker_rounds": broker_rates,
            "raw_rounds": raw_rates,
        }))
    }

    /// The client reads `records` from `bootstrap`: (records, value bytes, seconds).
    fn client_read(&self, bootstrap: &str, records: u64) -> Result<(u64, u64, f64), ConsumeError> {
        let read = client(&["read", bootstrap, TOPIC, &self.args.partitions.to_string(), &records.to_string()])?;
        let field = |name: &str| read[name].as_f64().ok_or_else(|| step("read", read.clone()));
        Ok((field("records")? as u64, field("value_bytes")? as u64, field("seconds")?))
    }

    /// The segment files read with O_DIRECT, their batches walked: (records, bytes, seconds).
    fn raw_read(&self) -> Result<(u64, u64, f64), ConsumeError> {
        let started = Instant::now();
        let mut buffer = vec![0u8; RAW_READ_BYTES + DIRECT_ALIGNMENT];
        let aligned = buffer.as_ptr().align_offset(DIRECT_ALIGNMENT);
        let chunk = &mut buffer[aligned..aligned + RAW_READ_BYTES];
        let (mut records, mut bytes) = (0u64, 0u64);
        for partition in 0..self.args.partitions {
            let directory = weir::shell::runtime::partition_directory(&self.root.join("data"), TOPIC, partition);
            let mut segments: Vec<PathBuf> = std::fs::read_dir(&directory)
                .map_err(|error| step(format!("read {}", directory.display()), error))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
                .collect();
            segments.sort();
            for segment in segments {
                let (segment_records, segment_bytes) = read_segment(&segment, chunk)?;
                records += segment_records;
                bytes += segment_bytes;
            }
        }
        Ok((records, bytes, started.elapsed().as_secs_f64()))
    }

    fn tail(&self) -> Result<Value, ConsumeError> {
        let args = self.args;
        let out = self.root.join("tail-probe.txt");
        let stop = self.root.join("tail-stop");
        let consumer = TailConsumer::start(&self.kafka, args.partitions, Some(PROBE_KEY), &out, &stop)?;
        say(format_args!(
            "tail: {} devices x {} records/s for {} s, a probe every {} ms",
            args.devices, args.rate, args.tail_seconds, args.probe_interval_ms
        ));
        let plan = self.fleet_plan(args.devices, args.rate, args.tail_seconds as f64);
        let probe_id = self.device_ids.last().expect("the probe's certificate").clone();
        let mut profile = ingest::device_profile(self.weir.address, &self.certs, &probe_id);
        profile.sequence.state_file = None;
        let probe_plan = Probe {
            profile,
            record_bytes: args.record_bytes,
            interval: Duration::from_millis(args.probe_interval_ms),
            seconds: args.tail_seconds,
        };
        let (fleet, acks) = self.runtime.block_on(async {
            let fleet = tokio::spawn(async move { weir_sim::fleet::run(&plan).await });
            let acks = probe_plan.run().await;
            (fleet.await, acks)
        });
        let fleet = fleet.map_err(|error| step("fleet", error))?.map_err(|error| step("fleet", error))?;
        let acks = acks?;
        // Time for the last probe records to reach the consumer.
        std::thread::sleep(Duration::from_secs(1));
        let consumed = consumer.stop()?;
        let received = std::fs::read_to_string(&out).map_err(|error| step(format!("read {}", out.display()), error))?;
        let mut latency_us = crate::latency_histogram();
        let (mut matched, mut before_ack) = (0u64, 0u64);
        for line in received.lines() {
            let fields: Vec<i64> = line.split(' ').filter_map(|field| field.parse().ok()).collect();
            let [partition, offset, received_ns] = fields[..] else {
                return Err(step("tail output", line));
            };
            let Some(acked_ns) = acks.get(&(partition as u32, offset)) else { continue };
            matched += 1;
            let latency_ns = received_ns - *acked_ns;
            if latency_ns < 0 {
                before_ack += 1;
            }
            latency_us.record((latency_ns.max(0) as u64 / 1000).max(1)).expect("within the histogram's bounds");
        }
        if matched as usize != acks.len() {
            return Err(step("tail", format!("the consumer got {matched} of the {} probe records", acks.len())));
        }
        let p = |quantile: f64| latency_us.value_at_quantile(quantile);
        say(format_args!("tail: {matched} probes, p50 {} us, p99 {} us, p999 {} us", p(0.5), p(0.99), p(0.999)));
        Ok(json!({
            "probes": matched,
            "before_ack": before_ack,
            "latency_us_p50": p(0.5),
            "latency_us_p99": p(0.99),
            "latency_us_p999": p(0.999),
            "latency_us_max": latency_us.max(),
            "background_records_acked": fleet.acked,
            "background_records_per_s": fleet.acked as f64 / (fleet.writing_until - fleet.writing_from).as_secs_f64(),
            "consumer_records": consumed,
        }))
    }

    fn ingest(&self) -> Result<Value, ConsumeError> {
        let args = self.args;
        let (mut with_tail, mut without) = (Vec::new(), Vec::new());
        // Per round, what the tailing consumer read of what the devices wrote meanwhile
        // (1: it kept up; the ratio means little if it did not).
        let mut read_fractions = Vec::new();
        for round in 0..args.rounds {
            // The order alternates, so a drift of the machine falls on both.
            for tailing in if round % 2 == 0 { [true, false] } else { [false, true] } {
                let stop = self.root.join(format!("ingest-stop-{round}-{tailing}"));
                let consumer = if tailing {
                    Some(TailConsumer::start(&self.kafka, args.partitions, None, &self.root.join("unused"), &stop)?)
                } else {
                    None
                };
                let (acked, seconds) = self.fleet(args.ingest_devices, args.ingest_rate, args.ingest_seconds as f64)?;
                if let Some(consumer) = consumer {
                    // A second to read what the last acks made visible.
                    std::thread::sleep(Duration::from_secs(1));
                    let consumed = consumer.stop()?;
                    read_fractions.push(consumed as f64 / acked as f64);
                }
                let rate = acked as f64 / seconds;
                say(format_args!(
                    "ingest round {round}: {} a tailing consumer: {rate:.0} records/s",
                    if tailing { "with" } else { "without" }
                ));
                if tailing {
                    with_tail.push(rate);
                } else {
                    without.push(rate);
                }
            }
        }
        let (with_median, without_median) = (median(&with_tail), median(&without));
        Ok(json!({
            "devices": args.ingest_devices,
            "offered_records_per_s": f64::from(args.ingest_devices) * args.ingest_rate,
            "with_tail_records_per_s": with_median,
            "without_records_per_s": without_median,
            "ratio": with_median / without_median,
            "with_tail_rounds": with_tail,
            "without_rounds": without,
            "tail_read_fraction_min": read_fractions.iter().copied().fold(f64::INFINITY, f64::min),
        }))
    }
}

/// The probe device: one record at a time, each acknowledged before the next.
struct Probe {
    profile: weir_device::DeviceProfile,
    record_bytes: usize,
    interval: Duration,
    seconds: u64,
}

impl Probe {
    /// (partition, offset) -> the wall clock (ns since the epoch) when it was acked.
    async fn run(self) -> Result<HashMap<(u32, i64), i64>, ConsumeError> {
        let device = DeviceClient::connect(&self.profile).await.map_err(|error| step("probe connect", error))?;
        let mut acks = HashMap::new();
        let until = Instant::now() + Duration::from_secs(self.seconds);
        let value = bytes::Bytes::from(vec![b'p'; self.record_bytes]);
        while Instant::now() < until {
            let record = Record {
                timestamp_ms: wall_clock_ns() / 1_000_000,
                key: Some(bytes::Bytes::from_static(PROBE_KEY)),
                value: Some(value.clone()),
                headers: Vec::new(),
            };
            let pending = device.enqueue(TOPIC, vec![record]).await.map_err(|error| step("probe send", error))?;
            device.flush().await.map_err(|error| step("probe flush", error))?;
            let ack = pending.await.map_err(|error| step("probe ack", error))?;
            let acked_ns = wall_clock_ns();
            for record in ack.records {
                acks.insert((record.partition, record.offset), acked_ns);
            }
            tokio::time::sleep(self.interval).await;
        }
        let _ = device.close().await;
        Ok(acks)
    }
}

fn wall_clock_ns() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_nanos() as i64)
}

/// The client tailing every partition (`consume_client.py tail`), stopped by a file.
struct TailConsumer {
    child: Child,
    stop: PathBuf,
}

impl TailConsumer {
    fn start(
        bootstrap: &str,
        partitions: u32,
        key: Option<&[u8]>,
        out: &Path,
        stop: &Path,
    ) -> Result<TailConsumer, ConsumeError> {
        let key = key.map_or("-".to_owned(), |key| key.iter().map(|byte| format!("{byte:02x}")).collect());
        let mut child = Command::new(python())
            .arg(repo().join("bench/python/consume_client.py"))
            .args(["tail", bootstrap, TOPIC, &partitions.to_string(), &key])
            .arg(out)
            .arg(stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|error| step("start the tailing consumer", error))?;
        let mut ready = String::new();
        let stdout = child.stdout.as_mut().expect("piped");
        let _ = BufReader::new(stdout).read_line(&mut ready);
        if ready.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(step("the tailing consumer", format!("did not get ready: {ready:?}")));
        }
        Ok(TailConsumer { child, stop: stop.to_owned() })
    }

    /// Stops it; the records it read in all.
    fn stop(mut self) -> Result<u64, ConsumeError> {
        std::fs::write(&self.stop, "").map_err(|error| step("write the stop file", error))?;
        let mut stdout = String::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            let _ = pipe.read_to_string(&mut stdout);
        }
        let status = self.child.wait().map_err(|error| step("the tailing consumer", error))?;
        let summary: Value = stdout
            .lines()
            .last()
            .and_then(|line| serde_json::from_str(line).ok())
            .ok_or_else(|| step("the tailing consumer", format!("{status}, no summary: {stdout:?}")))?;
        summary["records"].as_u64().ok_or_else(|| step("the tailing consumer", summary))
    }
}

/// Runs consume_client.py with `args`; its last stdout line as JSON.
fn client(args: &[&str]) -> Result<Value, ConsumeError> {
    let output = Command::new(python())
        .arg(repo().join("bench/python/consume_client.py"))
        .args(args)
        .output()
        .map_err(|error| step("run consume_client.py", error))?;
    let what = format!("consume_client.py {}", args[0]);
    if !output.status.success() {
        return Err(step(what, String::from_utf8_lossy(&output.stderr)));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().last().and_then(|line| serde_json::from_str(line).ok()).ok_or_else(|| step(what, stdout))
}

/// One segment file read with O_DIRECT in `chunk`-sized reads, its batches walked up to
/// the first empty header (the preallocated tail): (records, batch bytes).
fn read_segment(path: &Path, chunk: &mut [u8]) -> Result<(u64, u64), ConsumeError> {
    let failed = |error: std::io::Error| step(format!("read {}", path.display()), error);
    let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).map_err(failed)?;
    // The bytes read but not yet walked (a batch may straddle two reads).
    let mut pending: Vec<u8> = Vec::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    loop {
        let read = file.read(chunk).map_err(failed)?;
        if read == 0 {
            return Ok((records, bytes));
        }
        pending.extend_from_slice(&chunk[..read]);
        let mut at = 0;
        while pending.len() - at >= BATCH_HEADER_BYTES {
            let length_bytes: [u8; 4] =
                pending[at + BATCH_LENGTH_AT..at + BATCH_LENGTH_AT + 4].try_into().expect("4 bytes");
            let length = i32::from_be_bytes(length_bytes);
            if length <= 0 {
                return Ok((records, bytes)); // the preallocated, unwritten tail
            }
            let total = 12 + length as usize;
            if pending.len() - at < total {
                break;
            }
            let count_bytes: [u8; 4] =
                pending[at + BATCH_RECORDS_AT..at + BATCH_RECORDS_AT + 4].try_into().expect("4 bytes");
            records += u64::from(u32::from_be_bytes(count_bytes));
            bytes += total as u64;
            at += total;
        }
        pending.drain(..at);
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        count if count % 2 == 1 => sorted[count / 2],
        count => (sorted[count / 2 - 1] + sorted[count / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
