//! Shared by the whole-pipeline tests (tests/chaos.rs, tests/pipeline_crash.rs):
//! the workspace's binaries, weir's metrics, the device profile weir-sim runs with,
//! and the comparison of weir-sim's acked log with what the upstream topic holds.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::broker::UpstreamRecord;
use crate::server::http_get;

/// A binary of the workspace, next to weir's.
pub fn binary(name: &str) -> PathBuf {
    let weir = PathBuf::from(env!("CARGO_BIN_EXE_weir"));
    let path = weir.with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (tools/test does)", path.display());
    path
}

/// The sum of a metric's samples (all label sets) in the admin endpoint's text.
pub fn metric(admin: &str, name: &str) -> u64 {
    let (code, text) = http_get(admin, "/metrics");
    assert_eq!(code, 200);
    text.lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The device profile weir-sim runs with (its server and TLS settings are replaced
/// by weir-sim's options): retries that outlast every scenario, the scenario's answer
/// timeout, a QUIC idle timeout beyond the cut.
pub fn write_profile(root: &Path, answer_ms: u64) -> PathBuf {
    let profile = root.join("device.toml");
    std::fs::write(
        &profile,
        format!(
            r#"[server]
addresses = ["127.0.0.1:4433"]
name = "localhost"
[tls]
ca = "certs/ca.pem"
certificate = "certs/devices/sim-0.pem"
key = "certs/devices/sim-0.key"
[retry]
attempts_max = 1000
backoff_ms_min = 50
backoff_ms_max = 2000
[timeouts]
connect_ms = 5000
answer_ms = {answer_ms}
idle_ms = 120000
keep_alive_ms = 5000
"#
        ),
    )
    .unwrap();
    profile
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub lost: u64,
    pub duplicated: u64,
    pub unacked: u64,
    pub malformed: u64,
}

fn header<'a>(record: &'a UpstreamRecord, key: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .find(|(name, _)| name == key)
        .and_then(|(_, value)| value.as_deref())
        .and_then(|value| std::str::from_utf8(value).ok())
}

/// Compares the acked log (`device sequence partition offset record_index topic` lines)
/// with what upstream holds. Upstream partition p is a fresh topic fed only by edge
/// partition p, so exactly once means upstream offset o holds edge offset o.
pub fn compare(acked_log: &str, upstream: &BTreeMap<u32, Vec<UpstreamRecord>>) -> Verdict {
    let mut verdict = Verdict::default();
    // Every upstream record names its device (header set by weir, and the key) and the
    // device's record number n (the value); each (device, n) once; per device n grows
    // with the offset and covers 0..count without a gap (nothing invented, nothing lost).
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut per_device: HashMap<String, Vec<u64>> = HashMap::new();
    for records in upstream.values() {
        for (index, record) in records.iter().enumerate() {
            let device = header(record, "weir.device");
            let value = record.value.as_deref().and_then(|value| std::str::from_utf8(value).ok());
            let n = value.and_then(|value| value.split(' ').nth(1)).and_then(|n| n.parse::<u64>().ok());
            let (Some(device), Some(n)) = (device, n) else {
                verdict.malformed += 1;
                continue;
            };
            if record.offset != index as i64
                || record.key.as_deref() != Some(device.as_bytes())
                || !value.is_some_and(|value| value.starts_with(&format!("{device} ")))
            {
                verdict.malformed += 1;
            }
            if !seen.insert((device.to_owned(), n)) {
                verdict.duplicated += 1;
            }
            per_device.entry(device.to_owned()).or_default().push(n);
        }
    }
    for numbers in per_device.values() {
        // In per-device order, without gaps: 0, 1, 2, ... by offset.
        if numbers.windows(2).any(|pair| pair[1] != pair[0] + 1) || numbers.first().is_some_and(|first| *first != 0) {
            verdict.malformed += 1;
        }
    }
    // Every acked record is upstream where its ack says, from that device and frame.
    let mut acked_places = HashSet::new();
    for line in acked_log.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [device, sequence, partition, offset, ..] = fields[..] else { panic!("acked log line {line:?}") };
        let (partition, offset): (u32, usize) = (partition.parse().unwrap(), offset.parse().unwrap());
        let found = upstream.get(&partition).and_then(|records| records.get(offset));
        let matches = found.is_some_and(|record| {
            header(record, "weir.device") == Some(device) && header(record, "weir.sequence") == Some(sequence)
        });
        if !matches || !acked_places.insert((partition, offset)) {
            verdict.lost += 1;
        }
    }
    let upstream_places = upstream.values().map(|records| records.len() as u64).sum::<u64>();
    verdict.unacked = upstream_places.saturating_sub(acked_places.len() as u64);
    verdict
}

/// A whole-number setting from the environment (a seed, a duration), else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

/// A `weir serve` config for a fleet test: topic `telemetry` with `partitions`, data
/// under `root/data`, device certificates from `root/certs` (made by `weir certs`),
/// and, with `upstream`, shipping to that broker as topic `central` (partitions kept).
pub struct FleetConfig<'a> {
    pub partitions: u32,
    /// host:port; port 0 picks one (the server logs it).
    pub admin: &'a str,
    pub quic: &'a str,
    /// More lines for the `[quic]` section.
    pub quic_extra: &'a str,
    pub upstream: Option<&'a str>,
}

impl FleetConfig<'_> {
    pub fn write(&self, root: &Path) -> PathBuf {
        let config = root.join("weir.toml");
        let mut text = format!(
            r#"data_dir = "{data}"
[engine]
io_memory_bytes = "8 MiB"
[admin]
listen = "{admin}"
[kafka_api]
listen = "127.0.0.1:0"
[quic]
listen = "{quic}"
certs_dir = "{certs}"
generate_dev_certs = false
{quic_extra}
[[topics]]
name = "telemetry"
partitions = {partitions}
"#,
            data = root.join("data").display(),
            certs = root.join("certs").display(),
            admin = self.admin,
            quic = self.quic,
            quic_extra = self.quic_extra,
            partitions = self.partitions,
        );
        if let Some(broker) = self.upstream {
            text.push_str(&format!(
                r#"[upstream]
enabled = true
bootstrap_servers = ["{broker}"]
request_timeout_ms = 5000
connect_timeout_ms = 500
retry_backoff_ms_min = 20
retry_backoff_ms_max = 500
cursor_persist_interval_ms = 100
[[upstream.topics]]
edge = "telemetry"
upstream = "central"
"#
            ));
        }
        std::fs::write(&config, text).unwrap();
        config
    }
}
