//! What `/status` (and so `weir status`) reports per partition: the log's offsets and
//! disk use against its budgets, the shipper's cursor, lag and state, and what the
//! disk-full policy dropped; and per local consumer group of the Kafka API, its state
//! and members and, per committed partition, its offset against the durable end. It reads the same atomics `/metrics` exports; the only
//! non-atomic parts (a shipper's state and error text, the last dropped ranges) sit
//! behind small mutexes that change only on a state transition or a drop, never per
//! record.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::config::{bytes_text, DiskFullPolicy};
use crate::shell::handles::{PartitionMetrics, ShipMetrics};

use crate::shell::status_cells::log_offsets_view;
pub use crate::shell::status_cells::{
    DroppedRange, DroppedRanges, ShipperState, ShipperStateCell, DROPPED_RANGES_KEPT,
};

/// The appliance-wide settings `/status` shows next to the partitions.
#[derive(Debug, Clone)]
pub struct StatusSettings {
    pub data_dir: PathBuf,
    pub partition_bytes_max: u64,
    pub data_dir_bytes_max: u64,
    pub disk_full_policy: DiskFullPolicy,
    /// `upstream.degraded_after_ms`: how long a shipper may fail before `/health` is 503.
    pub shipping_degraded_after: std::time::Duration,
}

struct Entry {
    log: PartitionMetrics,
    ship: Option<ShipMetrics>,
}

/// Every partition's handles, registered when its metrics are created.
#[derive(Default)]
pub struct StatusBoard {
    settings: Mutex<Option<StatusSettings>>,
    partitions: Mutex<BTreeMap<(String, u32), Entry>>,
    kafka_groups: Arc<KafkaGroupsBoard>,
}

/// A consumer group as the Kafka listener's core last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedGroup {
    pub group: String,
    pub state: &'static str,
    pub generation: i32,
    pub members: u32,
    /// (topic, partition, committed offset) of every stored offset.
    pub committed: Vec<(String, u32, i64)>,
}

/// The consumer groups, handed from the listener's core to the admin thread. Written
/// on a commit or a membership change, never per fetch.
#[derive(Debug, Default)]
pub struct KafkaGroupsBoard {
    groups: Mutex<Vec<PublishedGroup>>,
}

impl KafkaGroupsBoard {
    pub fn set(&self, groups: Vec<PublishedGroup>) {
        *self.groups.lock().unwrap_or_else(PoisonError::into_inner) = groups;
    }

    pub fn get(&self) -> Vec<PublishedGroup> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A local consumer group in `/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KafkaGroupStatus {
    pub group: String,
    /// Empty, PreparingRebalance, CompletingRebalance, Stable; "not running" offline.
    pub state: String,
    pub generation: i32,
    pub members: u32,
    /// Summed over `topics`.
    pub lag_records: i64,
    pub topics: Vec<KafkaGroupTopic>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KafkaGroupTopic {
    pub topic: String,
    /// Summed over the partitions the group committed.
    pub lag_records: i64,
    pub partitions: Vec<KafkaGroupPartition>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KafkaGroupPartition {
    pub partition: u32,
    pub committed_offset: i64,
    pub log_end_offset: i64,
    pub lag_records: i64,
}

/// The groups' lag against the partitions' offsets. A committed partition that is no
/// longer in the config (its topic was removed) is left out.
pub fn kafka_group_status(published: &[PublishedGroup], partitions: &[PartitionStatus]) -> Vec<KafkaGroupStatus> {
    let logs: BTreeMap<(&str, u32), &PartitionStatus> =
        partitions.iter().map(|partition| ((partition.topic.as_str(), partition.partition), partition)).collect();
    published
        .iter()
        .map(|group| {
            let mut topics: BTreeMap<&str, KafkaGroupTopic> = BTreeMap::new();
            for (topic, partition, committed_offset) in &group.committed {
                let Some(log) = logs.get(&(topic.as_str(), *partition)) else { continue };
                let lag_records = crate::core::consumer_group::lag_records(
                    *committed_offset,
                    log.log_start_offset,
                    log.log_end_offset,
                );
                let entry = topics.entry(topic.as_str()).or_insert_with(|| KafkaGroupTopic {
                    topic: topic.clone(),
                    lag_records: 0,
                    partitions: Vec::new(),
                });
                entry.lag_records += lag_records;
                entry.partitions.push(KafkaGroupPartition {
                    partition: *partition,
                    committed_offset: *committed_offset,
                    log_end_offset: log.log_end_offset,
                    lag_records,
                });
            }
            let mut topics: Vec<KafkaGroupTopic> = topics.into_values().collect();
            for topic in &mut topics {
                topic.partitions.sort_by_key(|partition| partition.partition);
            }
            KafkaGroupStatus {
                group: group.group.clone(),
                state: group.state.to_owned(),
                generation: group.generation,
                members: group.members,
                lag_records: topics.iter().map(|topic| topic.lag_records).sum(),
                topics,
            }
        })
        .collect()
}

/// `/status` as JSON (also what `weir status --json` prints).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub source: String,
    pub data_dir: Option<PathBuf>,
    pub disk_full_policy: Option<String>,
    /// Segment bytes of every partition together.
    pub data_dir_bytes: u64,
    /// 0: no limit but the filesystem's.
    pub data_dir_bytes_max: u64,
    /// Bytes the filesystem holding the data directory has free (for unprivileged use).
    pub filesystem_free_bytes: Option<u64>,
    pub partitions: Vec<PartitionStatus>,
    /// Partitions `serve --quarantine` left closed (not in `partitions`).
    #[serde(default)]
    pub quarantined: Vec<String>,
    /// The Kafka API's local consumer groups: live ones and those with stored offsets.
    #[serde(default)]
    pub kafka_groups: Vec<KafkaGroupStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: u32,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
    pub disk_bytes: u64,
    pub partition_bytes_max: u64,
    pub disk_full_rejections: u64,
    pub dropped_segments: u64,
    pub dropped_records: u64,
    pub dropped_ranges: Vec<DroppedRange>,
    /// `None` when the partition is not shipped.
    pub shipper: Option<ShipperStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ShipperStatus {
    #[serde(flatten)]
    pub state: ShipperState,
    /// Next local offset to ship: every offset below it is acknowledged upstream.
    pub cursor_offset: i64,
    pub lag_records: i64,
    /// `None` where it is not known (offline status).
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
    pub shipped_records: u64,
    /// Records the shipper skipped because drop-oldest deleted them first.
    pub skipped_records: u64,
    /// When the current failing stretch began (seconds since the epoch); `None` while
    /// shipping is healthy or weir is not running.
    #[serde(default)]
    pub failing_since_s: Option<f64>,
    /// When the upstream last acknowledged a batch, granted a producer or answered a
    /// reconciliation (seconds since the epoch); `None` if not since start.
    #[serde(default)]
    pub last_success_s: Option<f64>,
}

impl StatusBoard {
    pub fn set_settings(&self, settings: StatusSettings) {
        *self.settings.lock().unwrap_or_else(PoisonError::into_inner) = Some(settings);
    }

    /// The board the Kafka listener publishes its groups to.
    pub fn kafka_groups(&self) -> Arc<KafkaGroupsBoard> {
        self.kafka_groups.clone()
    }

    pub fn register_partition(&self, topic: &str, partition: u32, log: PartitionMetrics) {
        let mut partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = partitions.entry((topic.to_owned(), partition)).or_insert(Entry { log: log.clone(), ship: None });
        entry.log = log;
    }

    pub fn register_shipper(&self, topic: &str, partition: u32, ship: ShipMetrics) {
        let mut partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = partitions.get_mut(&(topic.to_owned(), partition)) {
            entry.ship = Some(ship);
        }
    }

    /// Shipped partitions whose shipper stopped, as `topic-partition: error`.
    pub fn stopped_shippers(&self) -> Vec<String> {
        let partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        partitions
            .iter()
            .filter_map(|((topic, partition), entry)| match entry.ship.as_ref()?.state.get() {
                ShipperState::Stopped { error } => Some(format!("{topic}-{partition}: {error}")),
                _ => None,
            })
            .collect()
    }

    /// Shipped partitions whose shipper has been failing (retrying) for longer than
    /// `upstream.degraded_after_ms` at `now_s` (seconds since the epoch), as
    /// `topic-partition: failing for N s: problem`.
    pub fn failing_shippers(&self, now_s: f64) -> Vec<String> {
        let Some(bound) = self
            .settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|settings| settings.shipping_degraded_after)
        else {
            return Vec::new();
        };
        let partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        partitions
            .iter()
            .filter_map(|((topic, partition), entry)| {
                let ship = entry.ship.as_ref()?;
                let since = ship.failing_since.get();
                let failing_for = now_s - since;
                if since <= 0.0 || failing_for < bound.as_secs_f64() {
                    return None;
                }
                let problem = match ship.state.get() {
                    ShipperState::Retrying { problem } => problem,
                    other => other.name().to_owned(),
                };
                Some(format!("{topic}-{partition}: failing for {failing_for:.0} s: {problem}"))
            })
            .collect()
    }

    pub fn snapshot(&self) -> Status {
        let settings = self.settings.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list = Vec::with_capacity(partitions.len());
        for ((topic, partition), entry) in partitions.iter() {
            let log = &entry.log;
            let (log_start_offset, log_end_offset) =
                log_offsets_view(|| log.start_offset.get(), || log.next_offset.get());
            let shipper = entry.ship.as_ref().map(|ship| ShipperStatus {
                state: ship.state.get(),
                cursor_offset: ship.cursor_offset.get(),
                lag_records: ship.lag_records.get(),
                lag_bytes: Some(ship.lag_bytes.get()),
                lag_seconds: Some(ship.lag_seconds.get()),
                failing_since_s: Some(ship.failing_since.get()).filter(|since| *since > 0.0),
                last_success_s: Some(ship.last_success.get()).filter(|at| *at > 0.0),
                shipped_records: ship.shipped_records.get(),
                skipped_records: ship.skipped_records.get(),
            });
            list.push(PartitionStatus {
                topic: topic.clone(),
                partition: *partition,
                log_start_offset,
                log_end_offset,
                disk_bytes: log.disk_bytes.get().max(0) as u64,
                partition_bytes_max: settings.as_ref().map_or(0, |settings| settings.partition_bytes_max),
                disk_full_rejections: log.disk_full_rejections.get(),
                dropped_segments: log.dropped_segments.get(),
                dropped_records: log.dropped_records.get(),
                dropped_ranges: log.dropped_ranges.list(),
                shipper,
            });
        }
        let free = settings.as_ref().and_then(|settings| crate::shell::sys::available_bytes(&settings.data_dir).ok());
        let kafka_groups = kafka_group_status(&self.kafka_groups.get(), &list);
        Status {
            source: "server".to_owned(),
            data_dir: settings.as_ref().map(|settings| settings.data_dir.clone()),
            disk_full_policy: settings.as_ref().map(|settings| settings.disk_full_policy.name().to_owned()),
            data_dir_bytes: list.iter().map(|partition| partition.disk_bytes).sum(),
            data_dir_bytes_max: settings.as_ref().map_or(0, |settings| settings.data_dir_bytes_max),
            filesystem_free_bytes: free,
            partitions: list,
            quarantined: crate::shell::quarantine::names(),
            kafka_groups,
        }
    }
}

/// The human-readable table `weir status` prints.
pub fn render_text(status: &Status) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let max = |bytes: u64| if bytes == 0 { "no limit".to_owned() } else { bytes_text(bytes) };
    let _ = writeln!(
        text,
        "source: {}  data_dir: {}  disk: {} of {}  filesystem free: {}  policy: {}",
        status.source,
        status.data_dir.as_ref().map_or("?".to_owned(), |path| path.display().to_string()),
        bytes_text(status.data_dir_bytes),
        max(status.data_dir_bytes_max),
        status.filesystem_free_bytes.map_or("?".to_owned(), bytes_text),
        status.disk_full_policy.as_deref().unwrap_or("?"),
    );
    let _ = writeln!(
        text,
        "{:<24} {:>12} {:>12} {:>12} {:>10} {:>10} {:>9} {:>21} {:>9}  shipper",
        "partition", "log_start", "log_end", "cursor", "lag_recs", "lag", "lag_s", "disk/budget", "dropped"
    );
    for partition in &status.partitions {
        let name = format!("{}-{}", partition.topic, partition.partition);
        let (cursor, lag_records, lag_bytes, lag_seconds, state) = match &partition.shipper {
            None => ("-".to_owned(), "-".to_owned(), "-".to_owned(), "-".to_owned(), "not shipped".to_owned()),
            Some(shipper) => (
                shipper.cursor_offset.to_string(),
                shipper.lag_records.to_string(),
                shipper.lag_bytes.map_or("?".to_owned(), |bytes| bytes_text(bytes.max(0) as u64)),
                shipper.lag_seconds.map_or("?".to_owned(), |seconds| format!("{seconds:.1}")),
                match &shipper.state {
                    ShipperState::Starting => "starting".to_owned(),
                    ShipperState::Running => "running".to_owned(),
                    ShipperState::Retrying { problem } => match shipper.failing_since_s {
                        Some(since) => format!("retrying (failing for {:.0} s): {problem}", (now_s() - since).max(0.0)),
                        None => format!("retrying: {problem}"),
                    },
                    ShipperState::Stopped { error } => format!("STOPPED: {error}"),
                    ShipperState::NotRunning => "not running".to_owned(),
                },
            ),
        };
        let _ = writeln!(
            text,
            "{name:<24} {:>12} {:>12} {cursor:>12} {lag_records:>10} {lag_bytes:>10} {lag_seconds:>9} {:>21} {:>9}  {state}",
            partition.log_start_offset,
            partition.log_end_offset,
            format!("{}/{}", bytes_text(partition.disk_bytes), max(partition.partition_bytes_max)),
            partition.dropped_records,
        );
        for range in &partition.dropped_ranges {
            let _ = writeln!(
                text,
                "  dropped by drop-oldest: offsets {}..={} ({})",
                range.first_offset,
                range.last_offset,
                bytes_text(range.bytes)
            );
        }
    }
    for name in &status.quarantined {
        let _ = writeln!(text, "{name:<24} QUARANTINED (weir serve --quarantine): not opened, not shipped");
    }
    render_kafka_groups(&mut text, &status.kafka_groups);
    text
}

/// The local consumer groups: a line per group, then one per committed partition.
fn render_kafka_groups(text: &mut String, groups: &[KafkaGroupStatus]) {
    use std::fmt::Write;
    for group in groups {
        let _ = writeln!(
            text,
            "kafka group {:?}: {}, generation {}, {} members, lag {} records",
            group.group, group.state, group.generation, group.members, group.lag_records
        );
        for topic in &group.topics {
            for partition in &topic.partitions {
                let _ = writeln!(
                    text,
                    "  {:<22} committed {:>12}  log_end {:>12}  lag {:>10}",
                    format!("{}-{}", topic.topic, partition.partition),
                    partition.committed_offset,
                    partition.log_end_offset,
                    partition.lag_records,
                );
            }
        }
    }
}

fn now_s() -> f64 {
    crate::shell::status_cells::unix_seconds(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(disk_bytes: u64, partition_bytes_max: u64, lag_bytes: Option<i64>) -> PartitionStatus {
        PartitionStatus {
            topic: "telemetry".to_owned(),
            partition: 0,
            log_start_offset: 0,
            log_end_offset: 1200,
            disk_bytes,
            partition_bytes_max,
            disk_full_rejections: 0,
            dropped_segments: 0,
            dropped_records: 0,
            dropped_ranges: vec![DroppedRange { first_offset: 0, last_offset: 99, bytes: 3 << 20 }],
            shipper: Some(ShipperStatus {
                state: ShipperState::Running,
                cursor_offset: 1000,
                lag_records: 200,
                lag_bytes,
                lag_seconds: Some(1.5),
                shipped_records: 1000,
                skipped_records: 0,
                failing_since_s: None,
                last_success_s: None,
            }),
        }
    }

    #[test]
    fn the_table_shows_sizes_in_binary_units_and_no_limit_in_words() {
        let status = Status {
            source: "server".to_owned(),
            data_dir: Some(PathBuf::from("/var/lib/weir")),
            disk_full_policy: Some("reject".to_owned()),
            data_dir_bytes: 338_830,
            data_dir_bytes_max: 0,
            filesystem_free_bytes: Some(12_884_901_888 + (300 << 20)),
            partitions: vec![partition(338_830, 1 << 30, Some(1536))],
            quarantined: Vec::new(),
            kafka_groups: Vec::new(),
        };
        let text = render_text(&status);
        let first = text.lines().next().unwrap();
        assert!(first.contains("disk: 330.9 KiB of no limit  filesystem free: 12.3 GiB"), "{text}");
        let row = text.lines().find(|line| line.starts_with("telemetry-0")).unwrap();
        assert!(row.contains(" 1.5 KiB "), "{text}");
        assert!(row.contains(" 330.9 KiB/1 GiB "), "{text}");
        assert!(text.contains("dropped by drop-oldest: offsets 0..=99 (3 MiB)"), "{text}");
        assert!(!text.contains("338830") && !text.contains("bytes"), "no raw byte counts: {text}");
        // A budget set shows as a size; an unknown lag stays unknown.
        let limited = Status { data_dir_bytes_max: 10 << 30, partitions: vec![partition(100, 0, None)], ..status };
        let text = render_text(&limited);
        assert!(text.lines().next().unwrap().contains("disk: 330.9 KiB of 10 GiB"), "{text}");
        let row = text.lines().find(|line| line.starts_with("telemetry-0")).unwrap();
        assert!(row.contains(" 100 B/no limit "), "{text}");
        assert!(row.contains(" ? "), "{text}");
    }
}
