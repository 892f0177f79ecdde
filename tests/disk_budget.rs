//! The log's side of the disk budget and of the shipped lag, through `PartitionLog`:
//! - `bytes_from` is exact: for every offset, the stored batch bytes from the batch
//!   holding it to the end, as counted from the raw segment files, whatever order the
//!   offsets are asked in;
//! - partitions sharing a `log.data_dir_bytes_max` budget: `block` refuses appends once
//!   the budget is reached (in any partition), keeps every acked record, and appends
//!   resume when retention deletes shipped segments of another partition;
//! - `drop-oldest` under the budget deletes the oldest unshipped segment, reports its
//!   range, and keeps everything else.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{read_all, record, run, small_options};
use rand::{Rng, SeedableRng};
use weir::config::DiskFullPolicy;
use weir::shell::budget::DataDirBudget;
use weir::shell::log::{LogError, PartitionLog};
use weir::shell::metrics::Metrics;

/// (base offset, next offset, bytes) of every stored batch, walked from the raw files.
fn batches_on_disk(directory: &Path) -> Vec<(i64, i64, u64)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    files.sort();
    let mut batches = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let mut at = 0usize;
        while at + 61 <= bytes.len() {
            let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            if length == 0 {
                break;
            }
            let base = i64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
            let last_delta = i32::from_be_bytes(bytes[at + 23..at + 27].try_into().unwrap());
            batches.push((base, base + i64::from(last_delta) + 1, 12 + length as u64));
            at += 12 + length as usize;
        }
    }
    batches
}

#[test]
fn bytes_from_counts_exactly_the_stored_bytes_from_any_offset_to_the_end() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().to_owned();
    let (asked, on_disk) = run(move || async move {
        let log =
            PartitionLog::open(&path, "lag-0", small_options(), Metrics::new().partition("lag", 0)).await.unwrap();
        let mut random = rand::rngs::StdRng::seed_from_u64(7);
        let mut seed = 0u64;
        for _ in 0..400 {
            let count = random.gen_range(1..6);
            let records = (0..count).map(|index| record(seed + index, random.gen_range(10..900))).collect();
            log.append(records).await.unwrap();
            seed += count;
        }
        let end = log.next_offset();
        let mut offsets: Vec<i64> = (0..=end).collect(); // in order: the hint moves forward
        let mut shuffled = offsets.clone();
        for index in (1..shuffled.len()).rev() {
            shuffled.swap(index, random.gen_range(0..=index));
        }
        offsets.extend(shuffled); // any order: the hint must never mislead
        let mut asked = Vec::new();
        for offset in offsets {
            let (bytes, end_offset) = log.bytes_from(offset).await.unwrap();
            assert_eq!(end_offset, end);
            asked.push((offset, bytes));
        }
        log.close().await.unwrap();
        (asked, batches_on_disk(&path))
    });
    assert!(on_disk.len() >= 400 && on_disk.iter().filter(|batch| batch.1 - batch.0 > 1).count() > 100);
    let segments = std::fs::read_dir(directory.path()).unwrap().count();
    assert!(segments > 8, "several segments ({segments} files)");
    for (offset, bytes) in asked {
        let expected: u64 = on_disk.iter().filter(|(_, next, _)| *next > offset).map(|(_, _, bytes)| bytes).sum();
        assert_eq!(bytes, expected, "bytes from offset {offset}");
    }
}

#[test]
fn a_shared_data_dir_budget_blocks_every_partition_and_retention_of_shipped_data_frees_it() {
    let root = tempfile::tempdir().unwrap();
    let (first, second) = (root.path().join("a-0"), root.path().join("b-0"));
    let (acked_first, reread_first, refused_second, resumed) = run(move || async move {
        let mut options = small_options(); // 64 KiB segments
        options.partition_bytes_max = 64 << 20; // only the data-dir budget binds
        let budget = Arc::new(DataDirBudget::new(1 << 20, options.segment_bytes_max, DiskFullPolicy::Block));
        let metrics = Metrics::new();
        let a = PartitionLog::open(&first, "a-0", options.clone(), metrics.partition("a", 0)).await.unwrap();
        let b = PartitionLog::open(&second, "b-0", options, metrics.partition("b", 0)).await.unwrap();
        a.set_budget(budget.clone());
        b.set_budget(budget.clone());
        let mut acked = Vec::new();
        let mut seed = 0u64;
        let full = loop {
            match a.append(vec![record(seed, 4000)]).await {
                Ok(offset) => acked.push((offset, record(seed, 4000))),
                Err(error) => break error,
            }
            seed += 1;
            assert!(seed < 10_000, "the budget never bound");
        };
        assert!(matches!(full, LogError::DiskFull { .. }), "{full}");
        assert!(budget.used_bytes() <= 1 << 20);
        // The other partition shares the budget: refused too, nothing written.
        let refused_second = matches!(b.append(vec![record(1, 4000)]).await, Err(LogError::DiskFull { .. }));
        // Partition a's first half is shipped: retention deletes it (the data directory
        // is over its retention threshold, the partition is not over its own budget).
        let shipped_below = acked[acked.len() / 2].0;
        let report = a.retain(shipped_below).await.unwrap();
        assert!(report.segments_deleted > 0);
        let resumed = b.append(vec![record(2, 4000)]).await.is_ok();
        let reread = read_all(&a).await;
        a.close().await.unwrap();
        b.close().await.unwrap();
        let start = reread.first().map_or(0, |(offset, _)| *offset);
        assert!(start > 0 && start <= shipped_below, "only shipped segments went: start {start}");
        let kept: Vec<_> = acked.into_iter().filter(|(offset, _)| *offset >= start).collect();
        (kept, reread, refused_second, resumed)
    });
    assert_eq!(reread_first, acked_first, "every acked record not shipped is still in the log");
    assert!(refused_second, "the budget is shared by every partition");
    assert!(resumed, "space freed by retention of shipped data is used again");
}

#[test]
fn drop_oldest_under_the_budget_deletes_the_oldest_unshipped_segment_and_reports_it() {
    let root = tempfile::tempdir().unwrap();
    let directory = root.path().join("d-0");
    let metrics = Metrics::new().partition("d", 0);
    let observed = metrics.clone();
    let (acked, reread) = run(move || async move {
        let mut options = small_options();
        options.partition_bytes_max = 64 << 20;
        let log = PartitionLog::open(&directory, "d-0", options.clone(), metrics).await.unwrap();
        log.set_budget(Arc::new(DataDirBudget::new(512 << 10, options.segment_bytes_max, DiskFullPolicy::DropOldest)));
        let mut acked = Vec::new();
        for seed in 0..600u64 {
            let offset = log.append(vec![record(seed, 3000)]).await.expect("drop-oldest keeps accepting");
            acked.push((offset, record(seed, 3000)));
        }
        let reread = read_all(&log).await;
        log.close().await.unwrap();
        (acked, reread)
    });
    let ranges = observed.dropped_ranges.list();
    assert!(ranges.len() >= 2, "{ranges:?}");
    assert_eq!(ranges[0].first_offset, 0);
    for pair in ranges.windows(2) {
        assert_eq!(pair[1].first_offset, pair[0].last_offset + 1);
    }
    let start = ranges.last().unwrap().last_offset + 1;
    let dropped: i64 = ranges.iter().map(|range| range.last_offset - range.first_offset + 1).sum();
    assert_eq!(observed.dropped_records.get() as i64, dropped);
    assert_eq!(observed.dropped_segments.get() as usize, ranges.len());
    assert_eq!(observed.start_offset.get(), start);
    let kept: Vec<_> = acked.into_iter().filter(|(offset, _)| *offset >= start).collect();
    assert_eq!(reread, kept, "exactly the dropped ranges are missing");
}

/// Two cores, one partition each, sharing a `drop-oldest` budget: once partition `a`
/// filled it, partition `b`, whose only segment is its active one (so nothing of its
/// own may go), keeps accepting because `a`'s core drops `a`'s oldest segments for it
/// (`log::keep_room`). Exactly the reported ranges are missing from `a`; `b` has all.
#[test]
fn drop_oldest_frees_room_on_another_core_for_a_partition_with_nothing_of_its_own_to_drop() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use weir::shell::log::keep_room;

    let root = tempfile::tempdir().unwrap();
    let (first, second) = (root.path().join("a-0"), root.path().join("b-0"));
    let mut options = small_options(); // 64 KiB segments
    options.partition_bytes_max = 64 << 20; // only the data-dir budget binds
    let budget = Arc::new(DataDirBudget::new(512 << 10, options.segment_bytes_max, DiskFullPolicy::DropOldest));
    let a_full = Arc::new(AtomicBool::new(false));
    let b_done = Arc::new(AtomicBool::new(false));
    let dropped_before_b = Arc::new(AtomicU64::new(0));
    let metrics_a = Metrics::new().partition("a", 0);
    let observed_a = metrics_a.clone();

    let core_a = {
        let (budget, options, a_full, b_done, dropped_before_b) =
            (budget.clone(), options.clone(), a_full.clone(), b_done.clone(), dropped_before_b.clone());
        let metrics = metrics_a;
        std::thread::spawn(move || {
            run(move || async move {
                let a = PartitionLog::open(&first, "a-0", options, metrics.clone()).await.unwrap();
                a.set_budget(budget.clone());
                let keeper = {
                    let b_done = b_done.clone();
                    glommio::spawn_local(keep_room(vec![a.clone()], budget.clone(), move || {
                        b_done.load(Ordering::Acquire)
                    }))
                };
                let mut acked = Vec::new();
                for seed in 0..400u64 {
                    let offset = a.append(vec![record(seed, 3000)]).await.expect("drop-oldest keeps accepting");
                    acked.push((offset, record(seed, 3000)));
                }
                dropped_before_b.store(metrics.dropped_records.get(), Ordering::Release);
                a_full.store(true, Ordering::Release);
                keeper.await;
                let reread = read_all(&a).await;
                a.close().await.unwrap();
                (acked, reread)
            })
        })
    };
    let core_b = {
        let (budget, a_full, b_done) = (budget.clone(), a_full.clone(), b_done.clone());
        std::thread::spawn(move || {
            run(move || async move {
                while !a_full.load(Ordering::Acquire) {
                    glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
                }
                let b = PartitionLog::open(&second, "b-0", options, Metrics::new().partition("b", 0)).await.unwrap();
                b.set_budget(budget.clone());
                let mut acked = Vec::new();
                // Under one segment's worth: b never has a sealed segment of its own.
                for seed in 0..18u64 {
                    let result = b.append(vec![record(1000 + seed, 3000)]).await;
                    acked.push((result.map_err(|error| error.to_string()), record(1000 + seed, 3000)));
                }
                let segments = b.segment_ends().len();
                let reread = read_all(&b).await;
                b.close().await.unwrap();
                b_done.store(true, Ordering::Release);
                (acked, reread, segments)
            })
        })
    };
    let (acked_b, reread_b, segments_b) = core_b.join().unwrap();
    let (acked_a, reread_a) = core_a.join().unwrap();
    assert_eq!(segments_b, 1, "b never had a segment of its own to drop");
    let acked_b: Vec<(i64, weir::core::log::batch::Record)> = acked_b
        .into_iter()
        .map(|(result, record)| (result.unwrap_or_else(|error| panic!("b refused an append: {error}")), record))
        .collect();
    assert_eq!(reread_b, acked_b, "every record b acknowledged is in b");
    let dropped_for_b = observed_a.dropped_records.get() - dropped_before_b.load(Ordering::Acquire);
    assert!(dropped_for_b > 0, "a's core dropped a's oldest segments to make room for b");
    assert!(budget.used_bytes() <= 512 << 10, "the budget held: {} bytes used", budget.used_bytes());
    // Exactly the reported ranges are missing from a, and they are its oldest.
    let ranges = observed_a.dropped_ranges.list();
    assert_eq!(ranges[0].first_offset, 0);
    for pair in ranges.windows(2) {
        assert_eq!(pair[1].first_offset, pair[0].last_offset + 1, "{ranges:?}");
    }
    let start = ranges.last().unwrap().last_offset + 1;
    let dropped: i64 = ranges.iter().map(|range| range.last_offset - range.first_offset + 1).sum();
    assert_eq!(observed_a.dropped_records.get() as i64, dropped);
    let kept: Vec<_> = acked_a.into_iter().filter(|(offset, _)| *offset >= start).collect();
    assert_eq!(reread_a, kept, "exactly the dropped ranges are missing from a");
}
