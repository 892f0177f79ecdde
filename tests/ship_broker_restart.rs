//! Upstream shipping against a broker that is itself stopped and started again with
//! its state: tansu with SQLite storage (`tools/install-broker` builds it into
//! ./.tools), the database kept across restarts. An independent reader
//! (confluent-kafka, check.crcs=true) must find every acknowledged record upstream
//! exactly once, in order, every field equal.
//!
//! - `a_broker_outage_with_appends_meanwhile_drains_exactly_once_when_it_returns`: the
//!   broker goes down while records keep being appended (and acknowledged) for a
//!   bounded time; it comes back on the same database; the backlog drains.

#[path = "common/broker.rs"]
mod broker;
mod common;

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{assert_exactly_once, read_upstream, TansuSqlite};
use bytes::Bytes;
use common::{read_all, run};
use rand::{Rng, SeedableRng};
use weir::core::log::batch::{Header, Record};
use weir::core::ship::{ShipConfig, UpstreamPartition};
use weir::shell::kafka::ClientOptions;
use weir::shell::log::{LogOptions, PartitionLog};
use weir::shell::metrics::{Metrics, ShipMetrics};
use weir::shell::ship::{self, ShipperSetup};

/// Shipper logs on stderr (shown for failing tests), filtered by WEIR_LOG.
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

fn log_options() -> LogOptions {
    LogOptions {
        segment_bytes_max: 256 << 10,
        segment_age_max: Duration::from_secs(3600),
        index_interval_bytes: 16 << 10,
        preallocate_bytes: 1 << 20,
        flush_delay_max: Duration::from_micros(200),
        flush_bytes_max: 64 << 10,
        core_flushes_per_s_max: 1000,
        appends_pending_max: 256,
        partition_bytes_max: 1 << 30,
    }
}

/// A record with every field in use; a function of `seed` alone.
fn record(seed: u64) -> Record {
    let value_bytes = (seed * 7919 % 400) as usize;
    Record {
        timestamp_ms: 1_700_000_000_000 + seed as i64,
        key: if seed.is_multiple_of(13) { None } else { Some(Bytes::from(format!("k{seed}"))) },
        value: Some(Bytes::from((0..value_bytes).map(|index| (seed as usize ^ index) as u8).collect::<Vec<_>>())),
        headers: vec![
            Header { key: "seed".into(), value: Some(Bytes::from(seed.to_string())) },
            Header { key: "empty".into(), value: None },
        ],
    }
}

fn setup(directory: &Path, bootstrap: &str) -> ShipperSetup {
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
        upstream: UpstreamPartition { topic: "central".into(), partition: 0, partitions_exact: None },
        config: ShipConfig {
            batch_bytes_max: 32 << 10,
            in_flight_max: 5,
            read_ahead_bytes: 64 << 10,
            request_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(300),
            persist_interval: Duration::from_millis(100),
            bandwidth_bytes_per_s_max: 0,
            reconcile_scan_bytes_max: 1 << 30,
        },
        seed: 11,
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
fn a_broker_outage_with_appends_meanwhile_drains_exactly_once_when_it_returns() {
    logs();
    let directory = tempfile::tempdir().unwrap();
    let mut broker = TansuSqlite::start(&directory.path().join("broker"));
    broker.create_topic("central", 1);
    let path = directory.path().join("edge-0");
    let setup = setup(&path, &broker.address());
    let outage = Arc::new(AtomicBool::new(false));
    let executor_outage = outage.clone();
    let executor = std::thread::spawn(move || {
        run(move || async move {
            let log =
                PartitionLog::open(&path, "edge-0", log_options(), Metrics::new().partition("edge", 0)).await.unwrap();
            let metrics = Metrics::new().ship("edge", 0);
            let shutdown = Arc::new(AtomicBool::new(false));
            let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
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
            // About 4 s of steady appends from two appenders, each acknowledged by the
            // log; the broker is down for 2 s of them.
            let appenders: Vec<_> = (0..2u64)
                .map(|appender| {
                    let log = log.clone();
                    glommio::spawn_local(async move {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(appender);
                        for index in 0..1000u64 {
                            let first = appender * 1_000_000 + index * 10;
                            let count = rng.gen_range(1..=4u64);
                            log.append((first..first + count).map(record).collect()).await.expect("append");
                            glommio::timer::sleep(Duration::from_millis(3)).await;
                        }
                    })
                })
                .collect();
            for appender in appenders {
                appender.await;
            }
            assert!(executor_outage.load(Ordering::Acquire), "the outage happened while appending");
            drop(watcher);
            drained(&log, &metrics, Duration::from_secs(90)).await;
            shutdown.store(true, Ordering::Release);
            shipper.await.expect("the shipper ends cleanly");
            let local = read_all(&log).await;
            log.close().await.unwrap();
            (local, metrics.transport_failures.get(), metrics.retriable_errors.get(), lag_max.get())
        })
    });
    std::thread::sleep(Duration::from_millis(800));
    broker.stop();
    outage.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(2000));
    broker.resume();
    let (local, transport_failures, retriable_errors, lag_max) = executor.join().unwrap();
    eprintln!(
        "{} records; {transport_failures} transport failures, {retriable_errors} retriable errors, backlog up to \
         {lag_max} records",
        local.len()
    );
    assert!(transport_failures >= 1, "the shipper saw the broker go");
    assert!(lag_max > 500, "a backlog built up while the broker was down ({lag_max} records at most)");
    let upstream = read_upstream(&broker.address(), "central", 0, local.len(), Duration::from_secs(60));
    assert_exactly_once("after the outage", &upstream, &local);
}
