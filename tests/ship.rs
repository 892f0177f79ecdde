//! Upstream shipping against a real Kafka-compatible broker (tansu, memory storage):
//! records appended through `PartitionLog` reach the upstream topic exactly once and in
//! order, through backlogs and link outages. An independent client (confluent-kafka,
//! check.crcs=true) reads the upstream partition and every record — key, value,
//! timestamp, headers, order — is compared with what the log acknowledged.
//!
//! Needs `tools/install-broker` (tansu and confluent-kafka in ./.venv).

#[path = "common/broker.rs"]
mod broker;
mod common;

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{assert_exactly_once, read_upstream, Relay, Tansu};
use bytes::Bytes;
use common::{read_all, run, small_options};
use rand::{Rng, SeedableRng};
use weir::core::log::batch::{Header, Record};
use weir::core::ship::{ShipConfig, UpstreamPartition};
use weir::shell::kafka::ClientOptions;
use weir::shell::log::PartitionLog;
use weir::shell::metrics::{Metrics, ShipMetrics};
use weir::shell::ship::{self, ShipperSetup};

/// Shipper logs on stderr (shown for failing tests), filtered by WEIR_LOG.
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

fn setup(directory: &Path, bootstrap: &str, topic: &str, batch_bytes_max: usize) -> ShipperSetup {
    ShipperSetup {
        name: "edge-0".into(),
        edge_topic: "edge".into(),
        edge_partition: 0,
        directory: directory.to_owned(),
        bootstrap_servers: vec![bootstrap.to_owned()],
        client: ClientOptions {
            client_id: "weir-test".into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            security: weir::shell::kafka_secure::Security::none(),
        },
        upstream: UpstreamPartition { topic: topic.to_owned(), partition: 0, partitions_exact: None },
        config: ShipConfig {
            batch_bytes_max,
            in_flight_max: 5,
            read_ahead_bytes: 2 * batch_bytes_max,
            request_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(400),
            persist_interval: Duration::from_millis(100),
            bandwidth_bytes_per_s_max: 0,
            reconcile_scan_bytes_max: 1 << 30,
        },
        seed: 7,
    }
}

/// Small segments, but a disk budget so large that retention never deletes: the test
/// compares the whole log with upstream at the end.
fn roomy_options() -> weir::shell::log::LogOptions {
    weir::shell::log::LogOptions { partition_bytes_max: 1 << 30, ..small_options() }
}

/// A record with every field in use; its content is a function of `seed`.
fn rich_record(seed: u64, rng: &mut impl Rng) -> Record {
    let value_bytes = rng.gen_range(0..600);
    Record {
        timestamp_ms: 1_700_000_000_000 + seed as i64 * 3 - rng.gen_range(0..1000),
        key: if seed.is_multiple_of(7) { None } else { Some(Bytes::from(format!("device-{}", seed % 97))) },
        value: if seed.is_multiple_of(11) {
            None
        } else {
            Some(Bytes::from((0..value_bytes).map(|index| (seed as usize + index) as u8).collect::<Vec<_>>()))
        },
        headers: (0..seed % 3)
            .map(|index| Header {
                key: format!("h{index}").into(),
                value: if index == 1 { None } else { Some(Bytes::from(seed.to_string())) },
            })
            .collect(),
    }
}

/// Appends `appends` groups of 1..=4 rich records from `appenders` concurrent tasks,
/// pausing `pause` between appends.
async fn append_load(log: &PartitionLog, appenders: u64, appends: u64, pause: Duration) {
    let tasks: Vec<_> = (0..appenders)
        .map(|appender| {
            let log = log.clone();
            glommio::spawn_local(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(appender);
                for index in 0..appends {
                    let count = rng.gen_range(1..=4u64);
                    let first = appender * 1_000_000 + index * 10;
                    let records = (first..first + count).map(|seed| rich_record(seed, &mut rng)).collect();
                    log.append(records).await.expect("append");
                    if !pause.is_zero() {
                        glommio::timer::sleep(pause).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
}

/// Waits until the shipper's cursor reaches the log's end.
async fn drained(log: &PartitionLog, metrics: &ShipMetrics, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while metrics.cursor_offset.get() < log.next_offset() {
        assert!(
            Instant::now() < deadline,
            "not drained: cursor {} of {}",
            metrics.cursor_offset.get(),
            log.next_offset()
        );
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn records_appended_through_the_log_reach_upstream_exactly_once_in_order() {
    logs();
    let tansu = Tansu::start();
    tansu.create_topic("central", 1);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("edge-0");
    let setup = setup(&path, &tansu.address(), "central", 64 << 10);
    let started = Instant::now();
    let (local, requests, shipped_bytes) = run(move || async move {
        let log =
            PartitionLog::open(&path, "edge-0", roomy_options(), Metrics::new().partition("edge", 0)).await.unwrap();
        let metrics = Metrics::new().ship("edge", 0);
        let shutdown = Arc::new(AtomicBool::new(false));
        let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
        // A backlog first (coalesced upstream), then live appends while shipping.
        append_load(&log, 4, 300, Duration::ZERO).await;
        append_load(&log, 4, 300, Duration::from_micros(300)).await;
        drained(&log, &metrics, Duration::from_secs(60)).await;
        shutdown.store(true, Ordering::Release);
        shipper.await.expect("the shipper ends cleanly on shutdown");
        let local = read_all(&log).await;
        log.close().await.unwrap();
        (local, metrics.requests.get(), metrics.shipped_bytes.get())
    });
    let elapsed = started.elapsed();
    let upstream = read_upstream(&tansu.address(), "central", 0, local.len(), Duration::from_secs(60));
    assert_exactly_once("shipping", &upstream, &local);
    eprintln!(
        "shipped {} records ({shipped_bytes} bytes) in {requests} Produce requests, {:.1} s",
        local.len(),
        elapsed.as_secs_f64()
    );
    assert!((requests as usize) < local.len() / 4, "small stored batches were coalesced: {requests} requests");
    // The durable state says where shipping stands.
    let state = ship::read_state(&directory.path().join("edge-0")).unwrap().expect("ship.state exists");
    assert_eq!(state.cursor_offset, local.len() as i64);
    assert_eq!(state.upstream_topic, "central");
}

#[test]
fn a_link_outage_mid_stream_drains_the_backlog_exactly_once() {
    logs();
    let tansu_port = broker::free_port();
    let relay = Relay::start(tansu_port);
    // Clients learn the relay's address from metadata, so every connection crosses it.
    let tansu = Tansu::start_on(tansu_port, relay.port);
    tansu.create_topic("central", 1);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("edge-0");
    let setup = setup(&path, &format!("127.0.0.1:{}", relay.port), "central", 32 << 10);
    let outage = Arc::new(AtomicBool::new(false));
    let executor_outage = outage.clone();
    let executor = std::thread::spawn(move || {
        run(move || async move {
            let log = PartitionLog::open(&path, "edge-0", roomy_options(), Metrics::new().partition("edge", 0))
                .await
                .unwrap();
            let metrics = Metrics::new().ship("edge", 0);
            let shutdown = Arc::new(AtomicBool::new(false));
            let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
            // The largest backlog seen while appending.
            let lag_max = Rc::new(Cell::new(0i64));
            let watcher = {
                let (metrics, lag_max) = (metrics.clone(), lag_max.clone());
                glommio::spawn_local(async move {
                    loop {
                        lag_max.set(lag_max.get().max(metrics.lag_records.get()));
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                })
            };
            // About 3 s of steady appends; the link is down for 1.5 s of them.
            append_load(&log, 2, 1500, Duration::from_millis(2)).await;
            assert!(executor_outage.load(Ordering::Acquire), "the outage happened while appending");
            let lag_at_end = metrics.lag_records.get();
            drop(watcher);
            let lag_max = lag_max.get();
            drained(&log, &metrics, Duration::from_secs(60)).await;
            shutdown.store(true, Ordering::Release);
            shipper.await.expect("the shipper ends cleanly");
            let local = read_all(&log).await;
            log.close().await.unwrap();
            (local, metrics.transport_failures.get(), metrics.resends.get(), lag_at_end, lag_max)
        })
    });
    std::thread::sleep(Duration::from_millis(700));
    relay.cut();
    outage.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(1500));
    relay.restore();
    let (local, transport_failures, resends, lag_at_end, lag_max) = executor.join().unwrap();
    eprintln!(
        "{} records; {transport_failures} transport failures, {resends} re-sends, backlog up to {lag_max} records, \
         {lag_at_end} when appends ended",
        local.len()
    );
    assert!(transport_failures >= 1, "the shipper saw the outage");
    assert!(lag_max > 1000, "a backlog built up during the outage ({lag_max} records at most)");
    let upstream = read_upstream(&tansu.address(), "central", 0, local.len(), Duration::from_secs(60));
    assert_exactly_once("shipping", &upstream, &local);
}

#[test]
fn shipped_segments_are_deleted_over_budget_and_unshipped_ones_never() {
    logs();
    let tansu_port = broker::free_port();
    let relay = Relay::start(tansu_port);
    let tansu = Tansu::start_on(tansu_port, relay.port);
    tansu.create_topic("central", 1);
    relay.cut(); // the link is down from the start
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("edge-0");
    let setup = setup(&path, &format!("127.0.0.1:{}", relay.port), "central", 32 << 10);
    let (link_down_tx, link_down_rx) = std::sync::mpsc::channel::<()>();
    let (restored_tx, restored_rx) = std::sync::mpsc::channel::<()>();
    let executor = std::thread::spawn(move || {
        run(move || async move {
            // small_options: 64 KiB segments, a 128 KiB partition budget.
            let log = PartitionLog::open(&path, "edge-0", small_options(), Metrics::new().partition("edge", 0))
                .await
                .unwrap();
            let metrics = Metrics::new().ship("edge", 0);
            let shutdown = Arc::new(AtomicBool::new(false));
            let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
            append_load(&log, 2, 400, Duration::ZERO).await;
            glommio::timer::sleep(Duration::from_millis(500)).await;
            let before = log.stats();
            assert!(before.disk_bytes > 4 * (128 << 10), "the backlog is well over budget: {before:?}");
            assert_eq!(before.start_offset, 0, "nothing unshipped is ever deleted: {before:?}");
            let everything = read_all(&log).await;
            link_down_tx.send(()).unwrap();
            while restored_rx.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            drained(&log, &metrics, Duration::from_secs(60)).await;
            // Retention runs after the next cursor write.
            let deadline = Instant::now() + Duration::from_secs(5);
            while log.stats().disk_bytes > 3 * (128 << 10) && Instant::now() < deadline {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            let after = log.stats();
            shutdown.store(true, Ordering::Release);
            shipper.await.expect("the shipper ends cleanly");
            log.close().await.unwrap();
            (everything, before, after)
        })
    });
    link_down_rx.recv().unwrap();
    relay.restore();
    restored_tx.send(()).unwrap();
    let (everything, before, after) = executor.join().unwrap();
    eprintln!("before shipping: {before:?}; after: {after:?}");
    assert!(after.start_offset > 0, "shipped segments were deleted: {after:?}");
    assert!(after.disk_bytes < before.disk_bytes / 2, "{after:?}");
    let upstream = read_upstream(&tansu.address(), "central", 0, everything.len(), Duration::from_secs(60));
    assert_exactly_once("shipping", &upstream, &everything);
}
