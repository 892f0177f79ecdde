//! The stream watch in `weir serve`: carries every frame's outcome to the core that
//! watches its device, feeds `core::watch::Watch` there, lets its time pass, and puts
//! its alert events where operators look (`/metrics`, `/alerts`, the log, the edge
//! topic `_weir.alerts`).
//!
//! One device's connections may land on any core, and a reconnect may move them, so a
//! device is watched on one core only: its owner, `crc32c(device) mod cores`. The
//! ingest path never waits for the watch: a frame's outcome is pushed onto a bounded
//! per-owner queue (`OUTGOING_MAX`; past it the observation is dropped and counted),
//! and each core's watch task sends the queues to their owners over the core mesh
//! every `FLUSH_INTERVAL` with `try_send` (a full channel drops the batch, counted
//! too). The owner's watch sees the observations up to a flush late: detection bounds
//! in docs/WATCH.md include it. The trade-off: a dropped observation can make a stream
//! look slower (never faster) for one window; drops are exported so it shows.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::core::ingest::AppendFailure;
use crate::core::log::batch::{Header, Record};
use crate::core::protocol::{AnswerFrame, KIND_ACK};
use crate::core::session::PartitionRun;
use crate::core::watch::{AlertEvent, AlertKind, StreamKey, Watch, WatchConfig};

/// Observations queued on one core for one owner core at most, between flushes.
pub const OUTGOING_MAX: usize = 16_384;
/// How often a core sends its queued observations to their owners.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How often the watch's time passes (`Watch::handle_tick`; it asks for at least once
/// a second).
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);
/// The topic a frame refused before its topic was read counts under.
pub const UNKNOWN_TOPIC: &str = "*";
/// The record header that names the alert's kind on `_weir.alerts`.
pub const KIND_HEADER: &str = "weir.alert";

/// What became of one frame, on its way to the device's watching core.
#[derive(Debug, Clone)]
pub struct Observation {
    pub device: String,
    pub topic: String,
    /// When the frame was read (monotonic), and the wall clock then (ms since the epoch).
    pub at: Instant,
    pub arrival_ms: i64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Acknowledged: stored (or a resend of a stored frame).
    Stored { sequence: u64, records: u64, max_timestamp_ms: i64 },
    /// Answered with an error; the sequence when the frame was read that far.
    Refused { sequence: Option<u64> },
}

/// What a frame admitted for appending carries to the watch.
#[derive(Debug, Clone)]
pub struct FrameSeen {
    pub topic: String,
    pub sequence: u64,
    pub records: u64,
    pub max_timestamp_ms: i64,
}

impl FrameSeen {
    /// The frame's topic, sequence, record count and newest record timestamp.
    pub fn of_runs(topic: &str, sequence: u64, runs: &[PartitionRun]) -> FrameSeen {
        let mut records = 0u64;
        let mut max_timestamp_ms = i64::MIN;
        for run in runs {
            records += run.records.len() as u64;
            for record in &run.records {
                max_timestamp_ms = max_timestamp_ms.max(record.timestamp_ms);
            }
        }
        FrameSeen { topic: topic.to_owned(), sequence, records, max_timestamp_ms }
    }
}

/// The observation of a frame read at `received` from `device`, answered `answer`.
pub fn observation_of(device: &str, seen: Option<FrameSeen>, answer: &AnswerFrame, received: Instant) -> Observation {
    let (topic, outcome) = match seen {
        Some(seen) if answer.kind == KIND_ACK => (
            seen.topic,
            Outcome::Stored { sequence: seen.sequence, records: seen.records, max_timestamp_ms: seen.max_timestamp_ms },
        ),
        Some(seen) => (seen.topic, Outcome::Refused { sequence: Some(seen.sequence) }),
        None => (UNKNOWN_TOPIC.to_owned(), Outcome::Refused { sequence: None }),
    };
    Observation { device: device.to_owned(), topic, at: received, arrival_ms: unix_ms(SystemTime::now()), outcome }
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64)
}

/// The core a device is watched on.
pub fn owner_of(device: &str, cores: usize) -> usize {
    crc32c::crc32c(device.as_bytes()) as usize % cores.max(1)
}

/// An open alert as `/alerts` and `weir alerts` show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlertView {
    pub device: String,
    pub topic: String,
    pub kind: String,
    /// When it opened, ms since the epoch.
    pub since_ms: i64,
    pub evidence: String,
}

/// An alert event as it is appended to `_weir.alerts` (the record's value, JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlertRecord {
    pub device: String,
    pub topic: String,
    pub kind: String,
    /// "open" or "close".
    pub state: String,
    /// When it opened or closed, ms since the epoch.
    pub at_ms: i64,
    pub evidence: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct EventLabels {
    pub kind: &'static str,
    /// "open" or "close".
    pub state: &'static str,
}

/// The watch's figures for `/metrics` (no per-device labels: a fleet's devices would
/// be a cardinality bomb) and its open alerts for `/alerts`, shared by every core:
/// atomics, and the open alerts under a lock each core takes once per tick at most.
#[derive(Default)]
pub struct WatchBoard {
    pub enabled: AtomicBool,
    pub events: Family<EventLabels, Counter>,
    pub open: Family<KindLabels, Gauge>,
    pub streams: Gauge,
    pub observations_dropped: Counter,
    pub streams_evicted: Counter,
    pub alert_records_failed: Counter,
    /// Each core's open alerts, replaced after each tick that changed them.
    open_by_core: Mutex<Vec<Vec<AlertView>>>,
}

impl WatchBoard {
    /// Creates every kind's series, so each shows (at 0) before its first alert.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        for kind in AlertKind::ALL {
            let kind = kind.name();
            let _ = self.open.get_or_create(&KindLabels { kind });
            for state in ["open", "close"] {
                let _ = self.events.get_or_create(&EventLabels { kind, state });
            }
        }
        registry.register("watch_alerts_open", "Stream watch alerts open now, by kind", self.open.clone());
        registry.register("watch_events", "Stream watch alerts opened and closed, by kind", self.events.clone());
        registry.register("watch_streams", "Streams (device, topic) the watch tracks", self.streams.clone());
        registry.register(
            "watch_observations_dropped",
            "Frame outcomes the watch never saw: its queue to the watching core was full",
            self.observations_dropped.clone(),
        );
        registry.register(
            "watch_streams_evicted",
            "Streams forgotten past watch.streams_max (the longest silent first)",
            self.streams_evicted.clone(),
        );
        registry.register(
            "watch_alert_records_failed",
            "Alert events that could not be appended to _weir.alerts",
            self.alert_records_failed.clone(),
        );
    }

    /// Every open alert, by device, topic and kind.
    pub fn open_alerts(&self) -> Vec<AlertView> {
        let by_core = self.open_by_core.lock().unwrap_or_else(PoisonError::into_inner);
        let mut alerts: Vec<AlertView> = by_core.iter().flatten().cloned().collect();
        alerts.sort_by(|a, b| (&a.device, &a.topic, &a.kind).cmp(&(&b.device, &b.topic, &b.kind)));
        alerts
    }

    fn publish(&self, core: usize, alerts: Vec<AlertView>) {
        let mut by_core = self.open_by_core.lock().unwrap_or_else(PoisonError::into_inner);
        if by_core.len() <= core {
            by_core.resize(core + 1, Vec::new());
        }
        by_core[core] = alerts;
    }
}

/// `/alerts`: the open alerts as JSON.
pub fn alerts_json(board: &WatchBoard) -> String {
    #[derive(serde::Serialize)]
    struct Alerts {
        enabled: bool,
        alerts: Vec<AlertView>,
    }
    serde_json::to_string(&Alerts { enabled: board.enabled.load(Ordering::Relaxed), alerts: board.open_alerts() })
        .unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}

/// How a core's watch reaches the others and the log: the core mesh and the
/// appender (implemented by `shell::engine`).
pub trait WatchLink {
    /// Sends `batch` to core `owner` without waiting; how many were dropped when it cannot.
    fn send_observations(&self, owner: usize, batch: Vec<Observation>) -> Result<(), usize>;
    /// Appends alert records to `_weir.alerts` (partition 0, wherever it lives).
    fn append_alerts(&self, records: Vec<Record>) -> Pin<Box<dyn Future<Output = Result<i64, AppendFailure>>>>;
}

/// One core's part of the watch: the streams of the devices it owns, and the
/// observations it queued for the other owners.
pub struct CoreWatch {
    core: usize,
    cores: usize,
    watch: RefCell<Watch>,
    outgoing: RefCell<Vec<Vec<Observation>>>,
    board: Arc<WatchBoard>,
    /// What this core added to the shared gauges last (open alerts per kind, streams).
    published_open: RefCell<[i64; 5]>,
    published_streams: RefCell<i64>,
    published_counters: RefCell<crate::core::watch::WatchCounters>,
}

impl CoreWatch {
    /// Core `core`'s watch: `config.streams_max` is split evenly over the cores (each
    /// watches the devices it owns), so all together track at most about that many.
    pub fn new(core: usize, cores: usize, config: WatchConfig, board: Arc<WatchBoard>) -> CoreWatch {
        assert!(core < cores);
        let config = WatchConfig { streams_max: config.streams_max.div_ceil(cores), ..config };
        CoreWatch {
            core,
            cores,
            watch: RefCell::new(Watch::new(config)),
            outgoing: RefCell::new(vec![Vec::new(); cores]),
            board,
            published_open: RefCell::new([0; 5]),
            published_streams: RefCell::new(0),
            published_counters: RefCell::new(Default::default()),
        }
    }

    /// Queues `observation` for its device's owner; never waits (full: dropped, counted).
    pub fn observe(&self, observation: Observation) {
        let owner = owner_of(&observation.device, self.cores);
        let mut outgoing = self.outgoing.borrow_mut();
        let queue = &mut outgoing[owner];
        if queue.len() >= OUTGOING_MAX {
            self.board.observations_dropped.inc();
            return;
        }
        queue.push(observation);
    }

    /// Observations another core sent: this core owns their devices.
    pub fn receive(&self, batch: Vec<Observation>) {
        let mut watch = self.watch.borrow_mut();
        for observation in batch {
            debug_assert_eq!(owner_of(&observation.device, self.cores), self.core);
            let stream = StreamKey { device: observation.device, topic: observation.topic };
            match observation.outcome {
                Outcome::Stored { sequence, records, max_timestamp_ms } => watch.handle_records(
                    observation.at,
                    &stream,
                    sequence,
                    records,
                    max_timestamp_ms,
                    observation.arrival_ms,
                ),
                Outcome::Refused { sequence } => watch.handle_refusal(observation.at, &stream, sequence),
            }
        }
    }

    /// Sends every queued batch to its owner (this core's own are applied here).
    fn flush(&self, link: &dyn WatchLink) {
        let batches: Vec<(usize, Vec<Observation>)> = self
            .outgoing
            .borrow_mut()
            .iter_mut()
            .enumerate()
            .filter(|(_, queue)| !queue.is_empty())
            .map(|(owner, queue)| (owner, std::mem::take(queue)))
            .collect();
        for (owner, batch) in batches {
            if owner == self.core {
                self.receive(batch);
            } else if let Err(dropped) = link.send_observations(owner, batch) {
                self.board.observations_dropped.inc_by(dropped as u64);
            }
        }
    }

    /// Lets the watch's time pass; returns its events as records for `_weir.alerts`,
    /// after counting and logging them and publishing the open alerts.
    fn tick(&self, now: Instant, wall_ms: i64) -> Vec<AlertRecord> {
        let mut watch = self.watch.borrow_mut();
        watch.handle_tick(now);
        let mut records = Vec::new();
        while let Some(event) = watch.poll_event() {
            log_event(&event);
            records.push(record_of(&event, now, wall_ms));
        }
        let counters = watch.counters().clone();
        let mut published = self.published_counters.borrow_mut();
        for kind in AlertKind::ALL {
            let (index, name) = (kind as usize, kind.name());
            let board = &self.board;
            board
                .events
                .get_or_create(&EventLabels { kind: name, state: "open" })
                .inc_by(counters.opened[index] - published.opened[index]);
            board
                .events
                .get_or_create(&EventLabels { kind: name, state: "close" })
                .inc_by(counters.closed[index] - published.closed[index]);
        }
        self.board.streams_evicted.inc_by(counters.streams_evicted - published.streams_evicted);
        *published = counters;
        let streams = watch.streams() as i64;
        let previous_streams = self.published_streams.replace(streams);
        self.board.streams.inc_by(streams - previous_streams);
        let open = watch.open_alerts();
        let mut open_by_kind = [0i64; 5];
        for alert in &open {
            open_by_kind[alert.kind as usize] += 1;
        }
        let previous_open = self.published_open.replace(open_by_kind);
        for kind in AlertKind::ALL {
            let index = kind as usize;
            self.board
                .open
                .get_or_create(&KindLabels { kind: kind.name() })
                .inc_by(open_by_kind[index] - previous_open[index]);
        }
        if !records.is_empty() || open.len() as i64 != previous_open.iter().sum::<i64>() {
            let views = open
                .into_iter()
                .map(|alert| AlertView {
                    device: alert.stream.device,
                    topic: alert.stream.topic,
                    kind: alert.kind.name().to_owned(),
                    since_ms: wall_ms - now.saturating_duration_since(alert.since).as_millis() as i64,
                    evidence: alert.evidence,
                })
                .collect();
            self.board.publish(self.core, views);
        }
        records
    }
}

fn log_event(event: &AlertEvent) {
    let kind = event.kind.name();
    let (device, topic, evidence) = (&event.stream.device, &event.stream.topic, &event.evidence);
    if event.open {
        tracing::warn!(device = %device, topic = %topic, kind, evidence = %evidence, "watch: alert opened");
    } else {
        tracing::info!(device = %device, topic = %topic, kind, evidence = %evidence, "watch: alert closed");
    }
}

fn record_of(event: &AlertEvent, now: Instant, wall_ms: i64) -> AlertRecord {
    AlertRecord {
        device: event.stream.device.clone(),
        topic: event.stream.topic.clone(),
        kind: event.kind.name().to_owned(),
        state: if event.open { "open" } else { "close" }.to_owned(),
        at_ms: wall_ms - now.saturating_duration_since(event.at).as_millis() as i64,
        evidence: event.evidence.clone(),
    }
}

/// The `_weir.alerts` record of an event: key the device id, value the JSON, a header
/// naming the kind, timestamped when it happened.
pub fn alert_record(alert: &AlertRecord) -> Record {
    let value = serde_json::to_vec(alert).expect("an alert record serializes");
    Record {
        timestamp_ms: alert.at_ms,
        key: Some(Bytes::from(alert.device.clone())),
        value: Some(Bytes::from(value)),
        headers: vec![Header { key: KIND_HEADER.into(), value: Some(Bytes::from(alert.kind.clone())) }],
    }
}

/// A core's watch task: flushes observations every `FLUSH_INTERVAL`, lets time pass
/// every `TICK_INTERVAL`, appends the events to `_weir.alerts` when `alerts_topic`,
/// until `stopping()`.
pub async fn run(
    watch: std::rc::Rc<CoreWatch>,
    link: Box<dyn WatchLink>,
    alerts_topic: bool,
    stopping: impl Fn() -> bool,
) {
    let mut last_tick = Instant::now();
    while !stopping() {
        glommio::timer::sleep(FLUSH_INTERVAL).await;
        watch.flush(&*link);
        let now = Instant::now();
        if now.saturating_duration_since(last_tick) < TICK_INTERVAL {
            continue;
        }
        last_tick = now;
        let records = watch.tick(now, unix_ms(SystemTime::now()));
        if !alerts_topic || records.is_empty() {
            continue;
        }
        let count = records.len() as u64;
        let records: Vec<Record> = records.iter().map(alert_record).collect();
        if let Err(failure) = link.append_alerts(records).await {
            watch.board.alert_records_failed.inc_by(count);
            tracing::warn!(error = %failure.message, records = count, "watch: alert events not appended to _weir.alerts");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_has_one_owner_and_devices_spread_over_the_cores() {
        let mut per_core = [0usize; 4];
        for index in 0..1000 {
            let device = format!("sim-{index}");
            assert_eq!(owner_of(&device, 4), owner_of(&device, 4));
            per_core[owner_of(&device, 4)] += 1;
        }
        assert!(per_core.iter().all(|count| (150..=350).contains(count)), "{per_core:?}");
        assert_eq!(owner_of("anything", 1), 0);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let board = Arc::new(WatchBoard::default());
        let watch = CoreWatch::new(0, 2, WatchConfig::default(), board.clone());
        let observation = |device: &str| Observation {
            device: device.into(),
            topic: "t".into(),
            at: Instant::now(),
            arrival_ms: 0,
            outcome: Outcome::Refused { sequence: None },
        };
        let device = (0..).map(|index| format!("d-{index}")).find(|device| owner_of(device, 2) == 1).unwrap();
        for _ in 0..OUTGOING_MAX + 5 {
            watch.observe(observation(&device));
        }
        assert_eq!(board.observations_dropped.get(), 5);
        assert_eq!(watch.outgoing.borrow()[1].len(), OUTGOING_MAX);
    }

    #[test]
    fn an_alert_record_is_keyed_by_device_with_the_event_as_json() {
        let alert = AlertRecord {
            device: "sim-3".into(),
            topic: "telemetry".into(),
            kind: AlertKind::Silence.name().into(),
            state: "open".into(),
            at_ms: 1_796_601_600_000,
            evidence: "no record for 12.0 s".into(),
        };
        let record = alert_record(&alert);
        assert_eq!(record.key.as_deref(), Some(&b"sim-3"[..]));
        let back: AlertRecord = serde_json::from_slice(record.value.as_deref().unwrap()).unwrap();
        assert_eq!(back, alert);
        assert_eq!(record.timestamp_ms, alert.at_ms);
    }
}
