//! The Prometheus registry and every metric weir exports. Metric handles are atomics
//! (prometheus-client's `Counter`/`Gauge`): a core updates its own without locks; the
//! admin thread reads them when scraped. Label sets are created once, when a partition
//! opens, never on the data path.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::info::Info;

use crate::shell::handles::SHIP_STATES;
pub use crate::shell::handles::{PartitionMetrics, ShipMetrics};
use crate::shell::latency::LatencyHistogram;
use crate::shell::status::{DroppedRanges, ShipperState, ShipperStateCell, StatusBoard};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: u32,
}

/// Every metric family, registered once at start.
pub struct Metrics {
    pub registry: Registry,
    appended_records: Family<PartitionLabels, Counter>,
    appended_bytes: Family<PartitionLabels, Counter>,
    flushes: Family<PartitionLabels, Counter>,
    write_errors: Family<PartitionLabels, Counter>,
    fsync_errors: Family<PartitionLabels, Counter>,
    poisoned: Family<PartitionLabels, Gauge>,
    recovery_truncated_bytes: Family<PartitionLabels, Counter>,
    segments_rolled: Family<PartitionLabels, Counter>,
    disk_full_rejections: Family<PartitionLabels, Counter>,
    segments_deleted: Family<PartitionLabels, Counter>,
    next_offset: Family<PartitionLabels, Gauge>,
    disk_bytes: Family<PartitionLabels, Gauge>,
    start_offset: Family<PartitionLabels, Gauge>,
    dropped_segments: Family<PartitionLabels, Counter>,
    dropped_records: Family<PartitionLabels, Counter>,
    pub cores_running: Gauge,
    pub partitions_poisoned: Gauge,
    /// Frame read to its ack ready (the durable ack, without the network).
    ack_latency: LatencyHistogram,
    /// One group commit: the batch write and its fdatasync.
    flush_latency: LatencyHistogram,
    /// The fdatasync alone.
    sync_latency: LatencyHistogram,
    /// Sampled when scraped (`render`).
    process: ProcessGauges,
    ship: ShipFamilies,
    /// Every partition's handles, for `/status` and `/health`.
    pub status: StatusBoard,
    quic: QuicFamilies,
    /// The Kafka API's listener (one core; atomics all the same).
    pub kafka_api: KafkaApiMetrics,
    /// Each local consumer group's lag per topic, set when scraped from `/status`'s
    /// view; a group's series go when the group and its offsets are gone.
    kafka_group_lag: Family<GroupTopicLabels, Gauge>,
    /// The stream watch's figures and open alerts (`shell::watch`).
    pub watch: Arc<crate::shell::watch::WatchBoard>,
}

/// The Kafka API's metric handles. No label carries a client-chosen value but the
/// group of the lag gauge, which `kafka_api.groups_max` bounds.
#[derive(Clone, Default)]
pub struct KafkaApiMetrics {
    /// The consumer groups as the listener last published them (the lag gauge and
    /// `/status` read it).
    pub groups: Arc<crate::shell::status::KafkaGroupsBoard>,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    /// Refused at accept: `kafka_api.connections_max` reached.
    pub connections_refused: Counter,
    /// Closed by weir: a frame too large, a request that does not decode, or a key or
    /// version weir does not answer.
    pub connections_closed_bad_request: Counter,
    pub fetches: Counter,
    pub fetched_bytes: Counter,
    pub requests_refused: Counter,
    pub offset_commits: Counter,
    /// Authentications by mechanism (weir's fixed names) and result.
    pub authentications: Family<AuthenticationLabels, Counter>,
    /// Requests or topics refused for a principal without read permission.
    pub authorization_refusals: Counter,
}

/// How a Kafka API client authenticated: weir's own names, never the client's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMechanism {
    Mtls,
    Plain,
    ScramSha256,
    ScramSha512,
}

impl AuthMechanism {
    pub fn label(self) -> &'static str {
        match self {
            AuthMechanism::Mtls => "mtls",
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::ScramSha256 => "SCRAM-SHA-256",
            AuthMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthenticationLabels {
    pub mechanism: &'static str,
    pub result: &'static str,
}

impl KafkaApiMetrics {
    pub fn authenticated(&self, mechanism: AuthMechanism) {
        self.authentications.get_or_create(&AuthenticationLabels { mechanism: mechanism.label(), result: "ok" }).inc();
    }

    pub fn authentication_failed(&self, mechanism: AuthMechanism) {
        self.authentications
            .get_or_create(&AuthenticationLabels { mechanism: mechanism.label(), result: "failed" })
            .inc();
    }
}

/// The process and the data directory, sampled when `/metrics` is scraped.
#[derive(Default)]
struct ProcessGauges {
    resident_memory_bytes: Gauge,
    open_fds: Gauge,
    threads: Gauge,
    start_time_seconds: Gauge<f64, AtomicU64>,
    data_dir_bytes: Gauge,
    data_dir_bytes_max: Gauge,
    partition_bytes_max: Gauge,
    filesystem_free_bytes: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShipStateLabels {
    pub topic: String,
    pub partition: u32,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupTopicLabels {
    pub group: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// The device listener's metric families (see `QuicMetrics`).
#[derive(Default)]
struct QuicFamilies {
    connections_open: Gauge,
    connections_accepted: Counter,
    handshakes_started: Counter,
    handshakes_in_progress: Gauge,
    retries_sent: Counter,
    refusals: Family<ReasonLabels, Counter>,
    frames_received: Counter,
    frames_acked: Counter,
    frame_errors: Family<ReasonLabels, Counter>,
    backpressure_answers: Counter,
    datagrams_forwarded: Counter,
    datagrams_forward_dropped: Counter,
}

/// The device listener's metric handles, shared by every core (atomics).
#[derive(Clone, Default)]
pub struct QuicMetrics {
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    pub handshakes_started: Counter,
    pub handshakes_in_progress: Gauge,
    pub retries_sent: Counter,
    refusals: Family<ReasonLabels, Counter>,
    pub frames_received: Counter,
    pub frames_acked: Counter,
    frame_errors: Family<ReasonLabels, Counter>,
    pub backpressure_answers: Counter,
    pub datagrams_forwarded: Counter,
    pub datagrams_forward_dropped: Counter,
    /// Frame read to its ack ready.
    pub ack_latency: LatencyHistogram,
}

impl QuicMetrics {
    /// Counts a refused or closed connection under `reason` (a fixed, short name).
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Counts an error answer under its error code's name, in snake_case as every
    /// label value weir exports (`UnknownTopic` is `unknown_topic`).
    pub fn frame_error(&self, code: &'static str) {
        self.frame_errors.get_or_create(&ReasonLabels { reason: snake_case(code) }).inc();
    }
}

/// The upstream shipper's metric families (see `ShipMetrics`).
#[derive(Default)]
struct ShipFamilies {
    shipped_records: Family<PartitionLabels, Counter>,
    shipped_bytes: Family<PartitionLabels, Counter>,
    lag_records: Family<PartitionLabels, Gauge>,
    lag_bytes: Family<PartitionLabels, Gauge>,
    lag_seconds: Family<PartitionLabels, Gauge<f64, AtomicU64>>,
    cursor_offset: Family<PartitionLabels, Gauge>,
    requests: Family<PartitionLabels, Counter>,
    resends: Family<PartitionLabels, Counter>,
    retriable_errors: Family<PartitionLabels, Counter>,
    transport_failures: Family<PartitionLabels, Counter>,
    timeouts: Family<PartitionLabels, Counter>,
    duplicates: Family<PartitionLabels, Counter>,
    reconciled_batches: Family<PartitionLabels, Counter>,
    stopped: Family<PartitionLabels, Gauge>,
    skipped_records: Family<PartitionLabels, Counter>,
    refused: Family<PartitionLabels, Gauge>,
    state: Family<ShipStateLabels, Gauge>,
    last_success: Family<PartitionLabels, Gauge<f64, AtomicU64>>,
    failing_since: Family<PartitionLabels, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("weir");
        let status = StatusBoard::default();
        let kafka_api = KafkaApiMetrics { groups: status.kafka_groups(), ..KafkaApiMetrics::default() };
        let metrics = Metrics {
            appended_records: Family::default(),
            appended_bytes: Family::default(),
            flushes: Family::default(),
            write_errors: Family::default(),
            fsync_errors: Family::default(),
            poisoned: Family::default(),
            recovery_truncated_bytes: Family::default(),
            segments_rolled: Family::default(),
            disk_full_rejections: Family::default(),
            segments_deleted: Family::default(),
            next_offset: Family::default(),
            disk_bytes: Family::default(),
            start_offset: Family::default(),
            dropped_segments: Family::default(),
            dropped_records: Family::default(),
            cores_running: Gauge::default(),
            partitions_poisoned: Gauge::default(),
            ack_latency: LatencyHistogram::default(),
            flush_latency: LatencyHistogram::default(),
            sync_latency: LatencyHistogram::default(),
            process: ProcessGauges::default(),
            registry: Registry::default(),
            ship: ShipFamilies::default(),
            status,
            quic: QuicFamilies::default(),
            kafka_api,
            kafka_group_lag: Family::default(),
            watch: Arc::default(),
        };
        metrics.watch.register(&mut registry);
        registry.register("log_appended_records", "Records made durable in the log", metrics.appended_records.clone());
        registry.register("log_appended_bytes", "Batch bytes made durable in the log", metrics.appended_bytes.clone());
        registry.register("log_flushes", "Group commits (one write and one fdatasync each)", metrics.flushes.clone());
        registry.register(
            "log_write_errors",
            "Failed log writes (each poisons its partition)",
            metrics.write_errors.clone(),
        );
        registry.register(
            "log_fsync_errors",
            "Failed fdatasyncs (each poisons its partition)",
            metrics.fsync_errors.clone(),
        );
        registry.register(
            "log_poisoned",
            "1 when the partition refuses appends after a disk error",
            metrics.poisoned.clone(),
        );
        registry.register(
            "log_recovery_truncated_bytes",
            "Bytes of torn tail cut by recovery",
            metrics.recovery_truncated_bytes.clone(),
        );
        registry.register("log_segments_rolled", "Segments sealed and rolled", metrics.segments_rolled.clone());
        registry.register(
            "log_disk_full_rejections",
            "Appends rejected because the filesystem was full (nothing written)",
            metrics.disk_full_rejections.clone(),
        );
        registry.register("log_segments_deleted", "Segments deleted by retention", metrics.segments_deleted.clone());
        registry.register("log_next_offset", "Next offset of the partition (durable end)", metrics.next_offset.clone());
        registry.register("log_disk_bytes", "Bytes of segment data the partition holds", metrics.disk_bytes.clone());
        registry.register("log_start_offset", "First offset the partition still holds", metrics.start_offset.clone());
        registry.register(
            "log_dropped_segments",
            "Unshipped segments deleted by disk_full_policy = drop-oldest",
            metrics.dropped_segments.clone(),
        );
        registry.register(
            "log_dropped_records",
            "Unshipped records deleted by disk_full_policy = drop-oldest",
            metrics.dropped_records.clone(),
        );
        registry.register("cores_running", "Executors serving", metrics.cores_running.clone());
        registry.register(
            "partitions_poisoned",
            "Partitions refusing appends after a disk error",
            metrics.partitions_poisoned.clone(),
        );
        registry.register(
            "quic_ack_seconds",
            "Device frame read to its ack ready: checks, routing, the durable append (excludes the network)",
            metrics.ack_latency.clone(),
        );
        registry.register(
            "log_flush_seconds",
            "One group commit: the batch write and its fdatasync",
            metrics.flush_latency.clone(),
        );
        registry.register("log_sync_seconds", "The fdatasync of a group commit", metrics.sync_latency.clone());
        registry.register("build", "weir's version (value 1)", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        let process = &metrics.process;
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the weir process",
            process.resident_memory_bytes.clone(),
        );
        registry.register("process_open_fds", "Open file descriptors of the weir process", process.open_fds.clone());
        registry.register("process_threads", "Threads of the weir process", process.threads.clone());
        registry.register(
            "process_start_time_seconds",
            "When the weir process started (seconds since the epoch)",
            process.start_time_seconds.clone(),
        );
        registry.register(
            "data_dir_bytes",
            "Segment bytes of every partition together (what log.data_dir_bytes_max limits)",
            process.data_dir_bytes.clone(),
        );
        registry.register(
            "data_dir_bytes_max",
            "log.data_dir_bytes_max (0: no limit but the filesystem's)",
            process.data_dir_bytes_max.clone(),
        );
        registry.register(
            "log_partition_bytes_max",
            "log.partition_bytes_max, each partition's budget (0: no limit)",
            process.partition_bytes_max.clone(),
        );
        registry.register(
            "data_dir_filesystem_free_bytes",
            "Bytes free for weir on the filesystem holding the data directory",
            process.filesystem_free_bytes.clone(),
        );
        process.start_time_seconds.set(process_start_time_seconds());
        let ship = &metrics.ship;
        registry.register(
            "ship_shipped_records",
            "Records acknowledged by the upstream cluster (acks=all)",
            ship.shipped_records.clone(),
        );
        registry.register(
            "ship_shipped_bytes",
            "Bytes of upstream batches acknowledged by the upstream cluster",
            ship.shipped_bytes.clone(),
        );
        registry.register(
            "ship_lag_records",
            "Records in the log not yet acknowledged upstream",
            ship.lag_records.clone(),
        );
        registry.register(
            "ship_lag_bytes",
            "Stored batch bytes from the cursor to the log's durable end (exact, sampled with lag_records)",
            ship.lag_bytes.clone(),
        );
        registry.register(
            "ship_lag_seconds",
            "Age of the oldest record not yet acknowledged upstream: seconds since it became durable (0 when caught up)",
            ship.lag_seconds.clone(),
        );
        registry.register(
            "ship_cursor_offset",
            "Next local offset to ship: every offset below is acknowledged upstream",
            ship.cursor_offset.clone(),
        );
        registry.register("ship_requests", "Produce requests sent upstream", ship.requests.clone());
        registry.register("ship_resends", "Produce requests that re-sent a batch", ship.resends.clone());
        registry.register(
            "ship_retriable_errors",
            "Produce answers with a retriable error (leader moved, timeout, ...)",
            ship.retriable_errors.clone(),
        );
        registry.register(
            "ship_transport_failures",
            "Broker connections that failed or could not be made",
            ship.transport_failures.clone(),
        );
        registry.register("ship_timeouts", "Produce requests past upstream.request_timeout_ms", ship.timeouts.clone());
        registry.register(
            "ship_duplicates",
            "Re-sent batches the broker already held (de-duplicated)",
            ship.duplicates.clone(),
        );
        registry.register(
            "ship_reconciled_batches",
            "In-doubt batches found upstream by reconciliation after a restart",
            ship.reconciled_batches.clone(),
        );
        registry.register(
            "ship_skipped_records",
            "Records never shipped because drop-oldest deleted them from the log first",
            ship.skipped_records.clone(),
        );
        registry.register(
            "ship_stopped",
            "1 when the partition's shipping stopped on an error only an operator can resolve",
            ship.stopped.clone(),
        );
        registry.register(
            "ship_refused",
            "1 when the partition's shipping stopped because the broker refused TLS or SASL (certificate, mechanism, password)",
            ship.refused.clone(),
        );
        registry.register(
            "ship_state",
            "1 on the series of the shipper's state: starting, running, retrying (failing, retries by itself) or stopped",
            ship.state.clone(),
        );
        registry.register(
            "ship_last_success_timestamp_seconds",
            "When the upstream last acknowledged a batch, granted a producer or answered a reconciliation (0: not since start; does not move while there is nothing to ship)",
            ship.last_success.clone(),
        );
        registry.register(
            "ship_failing_since_timestamp_seconds",
            "When the shipper's current failing stretch began (0: not failing); /health is degraded once it is older than upstream.degraded_after_ms",
            ship.failing_since.clone(),
        );
        let quic = &metrics.quic;
        registry.register(
            "quic_connections_open",
            "Device connections open (handshaking or established)",
            quic.connections_open.clone(),
        );
        registry.register(
            "quic_connections_accepted",
            "Device connections accepted (handshake started)",
            quic.connections_accepted.clone(),
        );
        registry.register("quic_handshakes_started", "QUIC handshakes started", quic.handshakes_started.clone());
        registry.register(
            "quic_handshakes_in_progress",
            "QUIC handshakes not yet complete",
            quic.handshakes_in_progress.clone(),
        );
        registry.register(
            "quic_retries_sent",
            "Retry packets sent (address validation under handshake load)",
            quic.retries_sent.clone(),
        );
        registry.register("quic_refusals", "Connections refused or closed by weir, by reason", quic.refusals.clone());
        registry.register(
            "quic_frames_received",
            "Produce frames read from device streams",
            quic.frames_received.clone(),
        );
        registry.register("quic_frames_acked", "Produce frames answered with an ack", quic.frames_acked.clone());
        registry.register(
            "quic_frame_errors",
            "Produce frames answered with an error, by error code",
            quic.frame_errors.clone(),
        );
        registry.register(
            "quic_backpressure_answers",
            "Frames answered Backpressure with retry-after (a partition was behind on disk)",
            quic.backpressure_answers.clone(),
        );
        registry.register(
            "quic_datagrams_forwarded",
            "Datagrams that landed on the wrong core and were forwarded to their owner",
            quic.datagrams_forwarded.clone(),
        );
        registry.register(
            "quic_datagrams_forward_dropped",
            "Datagrams for another core dropped (its queue was full or it had not joined)",
            quic.datagrams_forward_dropped.clone(),
        );
        let kafka = &metrics.kafka_api;
        registry.register("kafka_api_connections_open", "Kafka API connections open", kafka.connections_open.clone());
        registry.register(
            "kafka_api_connections_accepted",
            "Kafka API connections accepted",
            kafka.connections_accepted.clone(),
        );
        registry.register(
            "kafka_api_connections_refused",
            "Kafka API connections closed at accept (kafka_api.connections_max reached)",
            kafka.connections_refused.clone(),
        );
        registry.register(
            "kafka_api_connections_closed_bad_request",
            "Kafka API connections closed for a bad request (too large, not decodable, or an API weir does not answer)",
            kafka.connections_closed_bad_request.clone(),
        );
        registry.register("kafka_api_fetches", "Fetch requests answered", kafka.fetches.clone());
        registry.register("kafka_api_fetched_bytes", "Record batch bytes served by Fetch", kafka.fetched_bytes.clone());
        registry.register(
            "kafka_api_requests_refused",
            "Write and admin requests refused (Produce, CreateTopics, ...)",
            kafka.requests_refused.clone(),
        );
        registry.register("kafka_api_offset_commits", "OffsetCommit requests stored", kafka.offset_commits.clone());
        registry.register(
            "kafka_api_authentications",
            "Kafka API authentications by mechanism (mtls, PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and result (ok, failed)",
            kafka.authentications.clone(),
        );
        registry.register(
            "kafka_api_authorization_refusals",
            "Kafka API topics refused to a principal without read permission (TOPIC_AUTHORIZATION_FAILED)",
            kafka.authorization_refusals.clone(),
        );
        registry.register(
            "kafka_api_group_lag_records",
            "A local consumer group's lag: stored records from its committed offsets to the durable end, summed over the topic's committed partitions",
            metrics.kafka_group_lag.clone(),
        );
        Arc::new(Metrics { registry, ..metrics })
    }

    /// The device listener's metric handles.
    pub fn quic(&self) -> QuicMetrics {
        let quic = &self.quic;
        QuicMetrics {
            connections_open: quic.connections_open.clone(),
            connections_accepted: quic.connections_accepted.clone(),
            handshakes_started: quic.handshakes_started.clone(),
            handshakes_in_progress: quic.handshakes_in_progress.clone(),
            retries_sent: quic.retries_sent.clone(),
            refusals: quic.refusals.clone(),
            frames_received: quic.frames_received.clone(),
            frames_acked: quic.frames_acked.clone(),
            frame_errors: quic.frame_errors.clone(),
            backpressure_answers: quic.backpressure_answers.clone(),
            datagrams_forwarded: quic.datagrams_forwarded.clone(),
            datagrams_forward_dropped: quic.datagrams_forward_dropped.clone(),
            ack_latency: self.ack_latency.clone(),
        }
    }

    pub fn partition(&self, topic: &str, partition: u32) -> PartitionMetrics {
        let labels = PartitionLabels { topic: topic.to_owned(), partition };
        let handles = PartitionMetrics {
            appended_records: self.appended_records.get_or_create(&labels).clone(),
            appended_bytes: self.appended_bytes.get_or_create(&labels).clone(),
            flushes: self.flushes.get_or_create(&labels).clone(),
            write_errors: self.write_errors.get_or_create(&labels).clone(),
            fsync_errors: self.fsync_errors.get_or_create(&labels).clone(),
            poisoned: self.poisoned.get_or_create(&labels).clone(),
            recovery_truncated_bytes: self.recovery_truncated_bytes.get_or_create(&labels).clone(),
            segments_rolled: self.segments_rolled.get_or_create(&labels).clone(),
            disk_full_rejections: self.disk_full_rejections.get_or_create(&labels).clone(),
            segments_deleted: self.segments_deleted.get_or_create(&labels).clone(),
            next_offset: self.next_offset.get_or_create(&labels).clone(),
            disk_bytes: self.disk_bytes.get_or_create(&labels).clone(),
            partitions_poisoned: self.partitions_poisoned.clone(),
            start_offset: self.start_offset.get_or_create(&labels).clone(),
            dropped_segments: self.dropped_segments.get_or_create(&labels).clone(),
            dropped_records: self.dropped_records.get_or_create(&labels).clone(),
            dropped_ranges: DroppedRanges::default(),
            flush_latency: self.flush_latency.clone(),
            sync_latency: self.sync_latency.clone(),
        };
        self.status.register_partition(topic, partition, handles.clone());
        handles
    }

    pub fn ship(&self, topic: &str, partition: u32) -> ShipMetrics {
        let labels = PartitionLabels { topic: topic.to_owned(), partition };
        let ship = &self.ship;
        let handles = ShipMetrics {
            shipped_records: ship.shipped_records.get_or_create(&labels).clone(),
            shipped_bytes: ship.shipped_bytes.get_or_create(&labels).clone(),
            lag_records: ship.lag_records.get_or_create(&labels).clone(),
            lag_bytes: ship.lag_bytes.get_or_create(&labels).clone(),
            lag_seconds: ship.lag_seconds.get_or_create(&labels).clone(),
            cursor_offset: ship.cursor_offset.get_or_create(&labels).clone(),
            requests: ship.requests.get_or_create(&labels).clone(),
            resends: ship.resends.get_or_create(&labels).clone(),
            retriable_errors: ship.retriable_errors.get_or_create(&labels).clone(),
            transport_failures: ship.transport_failures.get_or_create(&labels).clone(),
            timeouts: ship.timeouts.get_or_create(&labels).clone(),
            duplicates: ship.duplicates.get_or_create(&labels).clone(),
            reconciled_batches: ship.reconciled_batches.get_or_create(&labels).clone(),
            stopped: ship.stopped.get_or_create(&labels).clone(),
            skipped_records: ship.skipped_records.get_or_create(&labels).clone(),
            state: ShipperStateCell::default(),
            refused: ship.refused.get_or_create(&labels).clone(),
            state_gauges: SHIP_STATES.map(|state| {
                let labels = ShipStateLabels { topic: topic.to_owned(), partition, state };
                ship.state.get_or_create(&labels).clone()
            }),
            last_success: ship.last_success.get_or_create(&labels).clone(),
            failing_since: ship.failing_since.get_or_create(&labels).clone(),
        };
        handles.set_state(ShipperState::Starting);
        self.status.register_shipper(topic, partition, handles.clone());
        handles
    }

    /// The Prometheus text exposition of every metric (the process and data-directory
    /// gauges sampled now).
    pub fn render(&self) -> String {
        self.sample_process();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

impl Metrics {
    /// Samples the process (`/proc/self`) and the data directory's use against its budgets.
    fn sample_process(&self) {
        let process = &self.process;
        // VmRSS is in kB (KiB) in /proc/self/status.
        let resident_kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
            status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse::<i64>().ok()
        });
        if let Some(kib) = resident_kib {
            process.resident_memory_bytes.set(kib * 1024);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            process.open_fds.set(entries.count() as i64);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/task") {
            process.threads.set(entries.count() as i64);
        }
        let status = self.status.snapshot();
        process.data_dir_bytes.set(status.data_dir_bytes as i64);
        process.data_dir_bytes_max.set(status.data_dir_bytes_max as i64);
        process
            .partition_bytes_max
            .set(status.partitions.first().map_or(0, |partition| partition.partition_bytes_max) as i64);
        if let Some(free) = status.filesystem_free_bytes {
            process.filesystem_free_bytes.set(free as i64);
        }
        // Rebuilt whole: a group gone from `/status` loses its series.
        self.kafka_group_lag.clear();
        for group in &status.kafka_groups {
            for topic in &group.topics {
                let labels = GroupTopicLabels { group: group.group.clone(), topic: topic.topic.clone() };
                self.kafka_group_lag.get_or_create(&labels).set(topic.lag_records);
            }
        }
    }
}

/// When this process started: its start in clock ticks after boot (`/proc/self/stat`,
/// field 22) plus the boot time (`/proc/stat`, `btime`); now if either cannot be read.
fn process_start_time_seconds() -> f64 {
    // /proc counts in USER_HZ, which the kernel's ABI fixes at 100 on every
    // architecture weir builds for.
    const USER_HZ: f64 = 100.0;
    let started = || -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command name (which may hold spaces and parentheses)
        // start after its last ')': state is field 3, starttime field 22.
        let ticks: f64 = stat[stat.rfind(')')? + 1..].split_whitespace().nth(19)?.parse().ok()?;
        let boot: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(boot + ticks / USER_HZ)
    };
    started().unwrap_or_else(|| crate::shell::status_cells::unix_seconds(std::time::SystemTime::now()))
}

/// `UnknownTopic` -> `unknown_topic`.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() {
            if index > 0 {
                out.push('_');
            }
            out.push(character.to_ascii_lowercase());
        } else {
            out.push(character);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_snake_case() {
        assert_eq!(snake_case("UnknownTopic"), "unknown_topic");
        assert_eq!(snake_case("MalformedFrame"), "malformed_frame");
        assert_eq!(snake_case("protocol"), "protocol");
    }

    #[test]
    fn the_scrape_has_build_info_process_and_state_series() {
        let metrics = Metrics::new();
        metrics.partition("telemetry", 0);
        let ship = metrics.ship("telemetry", 0);
        ship.set_state(ShipperState::Retrying { problem: "down".into() });
        let text = metrics.render();
        assert!(text.contains(&format!("weir_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{text}");
        let value = |series: &str| -> f64 {
            let line = text.lines().find(|line| line.starts_with(series)).unwrap_or_else(|| panic!("{series}: {text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("weir_process_resident_memory_bytes") > 1e6);
        assert!(value("weir_process_open_fds") >= 3.0);
        let started = value("weir_process_start_time_seconds");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(started <= now + 1.0 && started > now - 3600.0, "{started} vs {now}");
        assert_eq!(value("weir_ship_state{topic=\"telemetry\",partition=\"0\",state=\"retrying\"}"), 1.0);
        assert_eq!(value("weir_ship_state{topic=\"telemetry\",partition=\"0\",state=\"running\"}"), 0.0);
    }
}
