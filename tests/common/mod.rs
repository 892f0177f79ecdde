//! Helpers shared by the integration tests: run a future on a glommio executor, make
//! deterministic records, open partitions with small test options.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use weir::core::log::batch::{self, Header, Record};
use weir::shell::log::{LogError, LogOptions, PartitionLog};
use weir::shell::metrics::{Metrics, PartitionMetrics};

/// Runs `make()`'s future to completion on a fresh (unpinned) glommio executor.
pub fn run<T, F>(make: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: Future<Output = T> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(8 << 20)
        .spawn(make)
        .expect("executor starts")
        .join()
        .expect("executor thread ends")
}

/// Options that make rolls and index entries happen with little data.
pub fn small_options() -> LogOptions {
    LogOptions {
        segment_bytes_max: 64 << 10,
        segment_age_max: Duration::from_secs(3600),
        index_interval_bytes: 4096,
        preallocate_bytes: 128 << 10,
        flush_delay_max: Duration::from_micros(200),
        flush_bytes_max: 16 << 10,
        core_flushes_per_s_max: 1000,
        appends_pending_max: 256,
        partition_bytes_max: 128 << 10,
    }
}

pub fn metrics() -> PartitionMetrics {
    Metrics::new().partition("test", 0)
}

/// A deterministic record: its contents are a function of `seed`.
pub fn record(seed: u64, value_bytes: usize) -> Record {
    Record {
        timestamp_ms: 1_700_000_000_000 + seed as i64,
        key: Some(Bytes::from(format!("key-{seed}"))),
        value: Some(Bytes::from((0..value_bytes).map(|index| (seed as usize * 31 + index) as u8).collect::<Vec<_>>())),
        headers: vec![Header { key: "seed".into(), value: Some(Bytes::from(seed.to_string())) }],
    }
}

/// Parses the seed back from a record made by `record`.
pub fn seed_of(record: &Record) -> u64 {
    let key = record.key.as_ref().expect("test records have keys");
    std::str::from_utf8(key).unwrap().strip_prefix("key-").unwrap().parse().unwrap()
}

pub async fn open(directory: &Path, options: LogOptions) -> Result<PartitionLog, LogError> {
    PartitionLog::open(directory, "test-0", options, metrics()).await
}

/// Every record of the log with its offset, read through the public read path.
pub async fn read_all(log: &PartitionLog) -> Vec<(i64, Record)> {
    let mut found = Vec::new();
    let mut next = log.stats().start_offset;
    loop {
        let batches = log.read(next, 64 << 10).await.expect("read");
        if batches.is_empty() {
            break;
        }
        for bytes in batches {
            for record in batch::records(&bytes).expect("stored batches are valid") {
                let record = record.expect("stored records are valid");
                if record.offset >= next {
                    found.push((record.offset, record.to_record(&bytes)));
                }
            }
        }
        next = found.last().map_or(next, |(offset, _)| offset + 1);
    }
    found
}

/// Every record of the partition in `directory` (as `weir serve` left it), opened and
/// recovered with the default options on a test executor.
pub fn read_partition(directory: std::path::PathBuf) -> Vec<(i64, Record)> {
    run(move || async move {
        let metrics = weir::shell::metrics::Metrics::new().partition("t", 0);
        let log = PartitionLog::open(&directory, "p", LogOptions::default(), metrics).await.unwrap();
        let records = read_all(&log).await;
        log.close().await.unwrap();
        records
    })
}

/// The UTF-8 value of `record`'s header `key`, if it has one.
pub fn header<'a>(record: &'a Record, key: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .find(|header| header.key == key)
        .and_then(|header| header.value.as_deref())
        .map(|value| std::str::from_utf8(value).unwrap())
}

/// Copies a partition directory.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
