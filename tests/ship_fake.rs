//! Upstream shipping against `krafka`'s `FakeBroker`: a 3-broker cluster that follows
//! Kafka's own idempotence rules (de-duplication over the last 5 batches by exact
//! sequence range, OUT_OF_ORDER_SEQUENCE for a gap) and injects the faults tansu
//! cannot: a response lost after the broker appended (the classic duplicate),
//! NOT_LEADER, a broker that falls silent (request timeout), an applied request
//! answered with an error, reset connections, and partition leaders moving between
//! brokers. Upstream must still hold every record exactly once, in order.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{read_all, run, small_options};
use krafka::error::ErrorCode;
use krafka::testing::{ApiKey, Control, FakeBroker};
use weir::core::log::batch::{Header, Record};
use weir::core::ship::{ShipConfig, StopReason, UpstreamPartition};
use weir::shell::kafka::ClientOptions;
use weir::shell::log::LogOptions;
use weir::shell::log::PartitionLog;
use weir::shell::metrics::{Metrics, ShipMetrics};
use weir::shell::ship::{self, ShipError, ShipperSetup};

fn setup(directory: &Path, bootstrap: Vec<String>) -> ShipperSetup {
    ShipperSetup {
        name: "edge-0".into(),
        edge_topic: "edge".into(),
        edge_partition: 0,
        directory: directory.to_owned(),
        bootstrap_servers: bootstrap,
        client: ClientOptions {
            client_id: "weir-fake".into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_millis(800),
            security: weir::shell::kafka_secure::Security::none(),
        },
        upstream: UpstreamPartition { topic: "central".into(), partition: 0, partitions_exact: None },
        config: ShipConfig {
            batch_bytes_max: 8 << 10,
            in_flight_max: 5,
            read_ahead_bytes: 16 << 10,
            request_timeout: Duration::from_millis(800),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(200),
            persist_interval: Duration::from_millis(50),
            bandwidth_bytes_per_s_max: 0,
            reconcile_scan_bytes_max: 1 << 30,
        },
        seed: 11,
    }
}

/// Small segments, but a disk budget so large that retention never deletes: the tests
/// compare the whole log with upstream at the end.
fn roomy_options() -> LogOptions {
    LogOptions { partition_bytes_max: 1 << 30, ..small_options() }
}

fn record(seed: u64) -> Record {
    Record {
        timestamp_ms: 1_700_000_000_000 + seed as i64,
        key: Some(Bytes::from(format!("k{seed}"))),
        value: Some(Bytes::from(vec![(seed % 251) as u8; (seed * 31 % 400) as usize])),
        headers: vec![Header { key: "seed".into(), value: Some(Bytes::from(seed.to_string())) }],
    }
}

/// A FakeBroker cluster on its own Tokio runtime (weir's shipper runs on glommio).
struct Cluster {
    broker: FakeBroker,
    _runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(brokers: usize) -> Cluster {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime");
        let broker = runtime.block_on(FakeBroker::start_cluster(brokers)).expect("FakeBroker starts");
        assert!(broker.create_topic("central", 1));
        Cluster { broker, _runtime: runtime }
    }

    fn bootstrap(&self) -> Vec<String> {
        self.broker.bootstrap_servers().split(',').map(|server| server.trim().to_owned()).collect()
    }
}

struct Shipped {
    local: Vec<(i64, Record)>,
    result: Result<(), ShipError>,
    metrics: ShipMetrics,
}

/// Appends `appends` groups of records (with a pause between them) while shipping, then
/// waits until shipping caught up or ended.
fn ship_while_appending(bootstrap: Vec<String>, appends: u64, pause: Duration, drain: Duration) -> Shipped {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("edge-0");
    let setup = setup(&path, bootstrap);
    run(move || async move {
        let log =
            PartitionLog::open(&path, "edge-0", roomy_options(), Metrics::new().partition("edge", 0)).await.unwrap();
        let metrics = Metrics::new().ship("edge", 0);
        let shutdown = Arc::new(AtomicBool::new(false));
        let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
        let mut seed = 0u64;
        for index in 0..appends {
            let count = 1 + index % 4;
            log.append((seed..seed + count).map(record).collect()).await.unwrap();
            seed += count;
            glommio::timer::sleep(pause).await;
        }
        let deadline = Instant::now() + drain;
        while metrics.cursor_offset.get() < log.next_offset() && metrics.stopped.get() == 0 && Instant::now() < deadline
        {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        shutdown.store(true, Ordering::Release);
        let result = shipper.await;
        let local = read_all(&log).await;
        log.close().await.unwrap();
        Shipped { local, result, metrics }
    })
}

fn assert_exactly_once(broker: &FakeBroker, local: &[(i64, Record)]) {
    let upstream = broker.all_records("central").expect("records readable");
    assert_eq!(upstream.len(), local.len(), "upstream holds {} records, the log {}", upstream.len(), local.len());
    for (found, (offset, record)) in upstream.iter().zip(local) {
        assert_eq!(found.offset, *offset, "upstream offset");
        assert_eq!(found.key, record.key, "key at {offset}");
        assert_eq!(found.value, record.value, "value at {offset}");
        assert_eq!(found.timestamp, record.timestamp_ms, "timestamp at {offset}");
    }
}

#[test]
fn injected_broker_faults_and_leader_moves_still_give_exactly_once() {
    let cluster = Cluster::start(3);
    // Faults by the index of the Produce request the cluster receives.
    cluster.broker.on(ApiKey::Produce, |request| match request.api_call_index {
        // Appended, then the connection drops before the answer: the classic duplicate.
        3 | 40 => Control::ApplyThen(Box::new(Control::Disconnect)),
        8 | 9 => Control::Error(ErrorCode::NotLeaderForPartition),
        // The broker falls silent: weir's request timeout.
        14 => Control::Silence,
        // Appended, but answered REQUEST_TIMED_OUT.
        20 => Control::ApplyThen(Box::new(Control::Error(ErrorCode::RequestTimedOut))),
        // Dropped before the broker saw it.
        26 => Control::Disconnect,
        // Appended, answer held until after weir gave up on it.
        33 => Control::ApplyThen(Box::new(Control::Silence)),
        _ => Control::Pass,
    });
    let bootstrap = cluster.bootstrap();
    let shipping = std::thread::spawn(move || {
        ship_while_appending(bootstrap, 1500, Duration::from_millis(2), Duration::from_secs(60))
    });
    // Leaders move while shipping runs.
    for node in [1, 2, 0] {
        std::thread::sleep(Duration::from_millis(700));
        assert!(cluster.broker.set_leader("central", 0, node));
    }
    let shipped = shipping.join().unwrap();
    shipped.result.expect("shipping ended cleanly at shutdown");
    let produces = cluster.broker.request_count(ApiKey::Produce);
    eprintln!(
        "{} records in {produces} Produce requests: {} re-sends, {} retriable errors, {} transport failures, {} timeouts, {} duplicates",
        shipped.local.len(),
        shipped.metrics.resends.get(),
        shipped.metrics.retriable_errors.get(),
        shipped.metrics.transport_failures.get(),
        shipped.metrics.timeouts.get(),
        shipped.metrics.duplicates.get(),
    );
    assert!(produces > 40, "every injected fault was reached ({produces} Produce requests)");
    let mut leaders = cluster.broker.request_nodes(ApiKey::Produce);
    leaders.sort_unstable();
    leaders.dedup();
    assert_eq!(leaders, [0, 1, 2], "weir followed the leader to every broker");
    assert!(shipped.metrics.timeouts.get() >= 1);
    assert!(shipped.metrics.retriable_errors.get() >= 2);
    assert_exactly_once(&cluster.broker, &shipped.local);
    assert_eq!(cluster.broker.request_count(ApiKey::InitProducerId), 1, "one producer for the whole run");
}

#[test]
fn out_of_order_sequence_for_the_oldest_batch_stops_shipping_without_reinitialising() {
    let cluster = Cluster::start(1);
    cluster.broker.on(ApiKey::Produce, |request| match request.api_call_index {
        6 => Control::Error(ErrorCode::OutOfOrderSequenceNumber),
        _ => Control::Pass,
    });
    let shipped = ship_while_appending(cluster.bootstrap(), 300, Duration::from_millis(1), Duration::from_secs(20));
    match &shipped.result {
        Err(ShipError::Stopped { reason: StopReason::OutOfOrderSequence { .. }, .. }) => {}
        other => panic!("expected a stop on OUT_OF_ORDER_SEQUENCE_NUMBER, got {other:?}"),
    }
    let message = shipped.result.as_ref().unwrap_err().to_string();
    assert!(
        message.contains("OUT_OF_ORDER_SEQUENCE_NUMBER (45)") && message.contains("not re-initialised"),
        "{message}"
    );
    assert_eq!(shipped.metrics.stopped.get(), 1);
    // What /status and `weir status` show for the partition: stopped, with the error.
    match shipped.metrics.state.get() {
        weir::shell::status::ShipperState::Stopped { error } => assert_eq!(error, message),
        other => panic!("/status would show {other:?}"),
    }
    assert_eq!(cluster.broker.request_count(ApiKey::InitProducerId), 1, "no silent re-init");
    let produces = cluster.broker.request_count(ApiKey::Produce);
    assert!(produces <= 7 + 4, "at most the pipeline was in flight behind the refused batch ({produces})");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cluster.broker.request_count(ApiKey::Produce), produces, "nothing is sent after the stop");
    // The log kept every record; upstream has exactly the acknowledged prefix, once.
    let upstream = cluster.broker.all_records("central").unwrap();
    assert_eq!(upstream.len() as i64, shipped.metrics.cursor_offset.get());
    assert_eq!(shipped.local.len(), (0..300u64).map(|index| 1 + index % 4).sum::<u64>() as usize);
    assert_exactly_once(&cluster.broker, &shipped.local[..upstream.len()]);
}

#[test]
fn a_restart_after_the_broker_forgot_the_producer_sends_nothing_twice() {
    let cluster = Cluster::start(1);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("edge-0");
    // First run: the cursor is never written after the producer (a long interval), so
    // everything shipped is in doubt when the shipper dies.
    let mut first = setup(&path, cluster.bootstrap());
    first.config.persist_interval = Duration::from_secs(3600);
    let first_path = path.clone();
    let shipped_before = run(move || async move {
        let log = PartitionLog::open(&first_path, "edge-0", roomy_options(), Metrics::new().partition("edge", 0))
            .await
            .unwrap();
        let metrics = Metrics::new().ship("edge", 0);
        let shutdown = Arc::new(AtomicBool::new(false));
        let shipper = glommio::spawn_local(ship::run(log.clone(), first, metrics.clone(), shutdown));
        for index in 0..600u64 {
            log.append((index * 4..index * 4 + 4).map(record).collect()).await.unwrap();
        }
        while metrics.cursor_offset.get() < 1000 {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        drop(shipper); // dies mid-shipping: no final cursor write
        let shipped = metrics.cursor_offset.get();
        log.close().await.unwrap();
        shipped
    });
    let state = ship::read_state(&path).unwrap().expect("the producer was persisted");
    assert_eq!(state.cursor_offset, 0, "the persisted cursor is far behind what was shipped");
    // Down long enough for the broker to forget the producer: any sequence is accepted.
    assert!(cluster.broker.clear_producer_state("central", 0));
    let second = setup(&path, cluster.bootstrap());
    let (local, reconciled) = run(move || async move {
        let log =
            PartitionLog::open(&path, "edge-0", roomy_options(), Metrics::new().partition("edge", 0)).await.unwrap();
        let metrics = Metrics::new().ship("edge", 0);
        let shutdown = Arc::new(AtomicBool::new(false));
        let shipper = glommio::spawn_local(ship::run(log.clone(), second, metrics.clone(), shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while metrics.cursor_offset.get() < log.next_offset() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        shutdown.store(true, Ordering::Release);
        shipper.await.expect("the shipper ends cleanly");
        let local = read_all(&log).await;
        log.close().await.unwrap();
        (local, metrics.reconciled_batches.get())
    });
    eprintln!(
        "{shipped_before} records shipped before the crash; {reconciled} batches found upstream by reconciliation"
    );
    assert!(reconciled > 0, "reconciliation found the in-doubt batches upstream");
    assert_exactly_once(&cluster.broker, &local);
    assert_eq!(cluster.broker.request_count(ApiKey::InitProducerId), 1, "the restart kept its producer");
}
