//! The partition log against real files with O_DIRECT: appends, group commit, reads,
//! rolls, retention, and recovery from torn and corrupt tails.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{copy_dir, open, read_all, record, run, seed_of, small_options};
use rand::{Rng, SeedableRng};
use weir::core::log::batch::{self, Record};
use weir::core::log::segment;
use weir::shell::log::{LogError, PartitionLog};
use weir::shell::metrics::Metrics;

/// Appends each group as its own batch (awaited one by one); returns (offset, record).
async fn append_batches(log: &PartitionLog, groups: &[Vec<Record>]) -> Vec<(i64, Record)> {
    let mut written = Vec::new();
    for group in groups {
        let base = log.append(group.clone()).await.expect("append");
        for (index, record) in group.iter().enumerate() {
            written.push((base + index as i64, record.clone()));
        }
    }
    written
}

fn groups(first_seed: u64, batches: usize, per_batch: usize, value_bytes: usize) -> Vec<Vec<Record>> {
    (0..batches)
        .map(|batch| {
            (0..per_batch).map(|index| record(first_seed + (batch * per_batch + index) as u64, value_bytes)).collect()
        })
        .collect()
}

fn segment_files(directory: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    files.sort();
    files
}

/// Byte positions of every batch in a segment file written and closed cleanly.
fn batch_positions(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap();
    let mut positions = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let header = batch::check_batch(&bytes[at..]).expect("clean segment");
        positions.push(at as u64);
        at += header.total_bytes();
    }
    positions
}

#[test]
fn appended_records_read_back_exactly_with_contiguous_offsets() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let (written, read, reopened) = run(move || async move {
        let log = open(&path, small_options()).await.unwrap();
        let written = append_batches(&log, &groups(0, 20, 3, 100)).await;
        let read = read_all(&log).await;
        log.close().await.unwrap();
        let log = open(&path, small_options()).await.unwrap();
        let reopened = read_all(&log).await;
        log.close().await.unwrap();
        (written, read, reopened)
    });
    assert_eq!(written.len(), 60);
    assert!(written.iter().enumerate().all(|(index, (offset, _))| *offset == index as i64));
    assert_eq!(read, written);
    assert_eq!(reopened, written);
}

#[test]
fn concurrent_appends_share_group_commits_and_each_gets_its_offset() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let metrics = Metrics::new().partition("test", 0);
    let flushes = metrics.flushes.clone();
    let (offsets, read) = run(move || async move {
        let mut options = small_options();
        options.appends_pending_max = 8; // also exercises backpressure
        options.flush_delay_max = Duration::from_millis(2);
        let log = PartitionLog::open(&path, "test-0", options, metrics).await.unwrap();
        let tasks: Vec<_> = (0..200u64)
            .map(|seed| {
                let log = log.clone();
                glommio::spawn_local(async move { (seed, log.append(vec![record(seed, 50)]).await.unwrap()) })
            })
            .collect();
        let mut offsets = Vec::new();
        for task in tasks {
            offsets.push(task.await);
        }
        let read = read_all(&log).await;
        log.close().await.unwrap();
        (offsets, read)
    });
    let mut seen: Vec<i64> = offsets.iter().map(|(_, offset)| *offset).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..200).collect::<Vec<i64>>(), "every append got a distinct offset");
    for (seed, offset) in &offsets {
        assert_eq!(seed_of(&read[*offset as usize].1), *seed, "the record at an append's offset is its record");
    }
    let flushes = flushes.get();
    assert!(flushes < 100, "200 concurrent appends took {flushes} flushes: no group commit");
}

#[test]
fn oversized_and_empty_appends_are_refused() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let (too_large, empty, after) = run(move || async move {
        let log = open(&path, small_options()).await.unwrap();
        let too_large = log.append(vec![record(1, 20 << 10)]).await;
        let empty = log.append(vec![]).await;
        let after = log.append(vec![record(2, 10)]).await;
        log.close().await.unwrap();
        (too_large, empty, after)
    });
    assert!(matches!(too_large, Err(LogError::TooLarge { .. })), "{too_large:?}");
    assert!(matches!(empty, Err(LogError::Empty)), "{empty:?}");
    assert_eq!(after.unwrap(), 0);
}

#[test]
fn segments_roll_by_size_with_exact_sealed_files_and_reads_span_them() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let task_path = path.clone();
    let (written, read, middle) = run(move || async move {
        let log = open(&task_path, small_options()).await.unwrap();
        let written = append_batches(&log, &groups(0, 100, 4, 500)).await;
        let read = read_all(&log).await;
        let middle = log.read(277, 1).await.unwrap();
        log.close().await.unwrap();
        (written, read, middle)
    });
    assert_eq!(read, written);
    // A read from the middle returns the whole batch holding the offset, and only it.
    assert_eq!(middle.len(), 1);
    let header = batch::check_batch(&middle[0]).unwrap();
    assert!(header.base_offset <= 277 && 277 <= header.last_offset());
    let files = segment_files(&path);
    assert!(files.len() >= 4, "expected rolls, got {files:?}");
    let mut expected_base = 0;
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(segment::parse_log_file_name(name), Some(expected_base), "{name}");
        let size = std::fs::metadata(file).unwrap().len();
        assert!(size <= small_options().segment_bytes_max);
        let positions = batch_positions(file); // panics unless the file is exactly batches
        let bytes = std::fs::read(file).unwrap();
        let last = batch::check_batch(&bytes[*positions.last().unwrap() as usize..]).unwrap();
        expected_base = last.next_offset();
        let index = std::fs::read(file.with_extension("index")).unwrap();
        assert!(!index.is_empty() && index.len() % 8 == 0, "{name}: index of {} bytes", index.len());
    }
    assert_eq!(expected_base, 400);
}

/// This process's open descriptors of segment and index files under `directory` (not
/// the partition's `weir.lock`, held while it is open).
fn descriptors_under(directory: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.starts_with(directory) && !target.ends_with("weir.lock"))
        .count()
}

#[test]
fn sealed_segments_hold_no_descriptor_while_reads_still_reach_them() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let task_path = path.clone();
    let (written, held_after_appends, read, held_after_reopen, reread) = run(move || async move {
        let log = open(&task_path, small_options()).await.unwrap();
        let written = append_batches(&log, &groups(0, 100, 4, 500)).await;
        let held_after_appends = descriptors_under(&task_path);
        let read = read_all(&log).await;
        log.close().await.unwrap();
        let log = open(&task_path, small_options()).await.unwrap();
        let held_after_reopen = descriptors_under(&task_path);
        let reread = read_all(&log).await;
        log.close().await.unwrap();
        (written, held_after_appends, read, held_after_reopen, reread)
    });
    let segments = segment_files(&path).len();
    assert!(segments >= 4, "expected rolls, got {segments} segments");
    // The active segment's log and index, whatever the number of sealed segments.
    assert_eq!(held_after_appends, 2, "{segments} segments");
    assert_eq!(held_after_reopen, 2, "{segments} segments");
    assert_eq!(read, written);
    assert_eq!(reread, written);
}

#[test]
fn segments_roll_by_age() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let task_path = path.clone();
    run(move || async move {
        let mut options = small_options();
        options.segment_age_max = Duration::from_millis(50);
        let log = open(&task_path, options).await.unwrap();
        log.append(vec![record(0, 10)]).await.unwrap();
        glommio::timer::sleep(Duration::from_millis(80)).await;
        log.append(vec![record(1, 10)]).await.unwrap();
        log.close().await.unwrap();
    });
    let names: Vec<_> = segment_files(&path).iter().map(|file| file.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, ["00000000000000000000.log", "00000000000000000001.log"]);
}

#[test]
fn retention_deletes_only_sealed_segments_below_the_offset_while_over_budget() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let task_path = path.clone();
    let (segments_before, partial, everything, out_of_range, remaining, reopened_start) = run(move || async move {
        let log = open(&task_path, small_options()).await.unwrap();
        append_batches(&log, &groups(0, 150, 4, 500)).await;
        let segments_before = log.stats().segments;
        // Only segments wholly below offset 200 may go.
        let partial = log.retain(200).await.unwrap();
        let everything = log.retain(i64::MAX).await.unwrap();
        let out_of_range = log.read(0, 100).await;
        let remaining = read_all(&log).await;
        log.close().await.unwrap();
        let log = open(&task_path, small_options()).await.unwrap();
        let reopened_start = log.stats().start_offset;
        log.close().await.unwrap();
        (segments_before, partial, everything, out_of_range, remaining, reopened_start)
    });
    assert!(segments_before >= 5);
    assert!(partial.segments_deleted >= 1);
    assert!(partial.start_offset <= 200, "a segment holding offset 200 or above was deleted: {partial:?}");
    // Over budget (128 KiB) with everything shipped: delete down to the budget, never the active segment.
    let after = segment_files(&path);
    assert!(!after.is_empty());
    let kept_bytes: u64 = after.iter().map(|file| std::fs::metadata(file).unwrap().len()).sum();
    assert!(kept_bytes <= small_options().partition_bytes_max, "kept {kept_bytes} bytes");
    assert!(everything.segments_deleted >= 1);
    assert!(matches!(out_of_range, Err(LogError::OffsetOutOfRange { start, .. }) if start == everything.start_offset));
    assert_eq!(remaining.first().unwrap().0, everything.start_offset);
    assert_eq!(remaining.last().unwrap().0, 599);
    assert_eq!(reopened_start, everything.start_offset);
    let indexes = std::fs::read_dir(&path)
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().path().extension().is_some_and(|extension| extension == "index"))
        .count();
    assert_eq!(indexes, after.len(), "deleted segments leave no index behind");
}

/// Writes 8 small batches (no index entry yet) then one last batch; returns the partition
/// directory, everything written, and the byte position and length of the last batch.
fn log_with_small_last_batch(root: &Path) -> (PathBuf, Vec<(i64, Record)>, u64, u64) {
    let path = root.join("original");
    let task_path = path.clone();
    let written = run(move || async move {
        let log = open(&task_path, small_options()).await.unwrap();
        let mut all = groups(0, 8, 2, 120);
        all.push(vec![record(100, 3), record(101, 0), record(102, 5)]);
        let written = append_batches(&log, &all).await;
        log.close().await.unwrap();
        written
    });
    let file = &segment_files(&path)[0];
    let positions = batch_positions(file);
    let last = *positions.last().unwrap();
    let length = std::fs::metadata(file).unwrap().len() - last;
    (path, written, last, length)
}

#[test]
fn recovery_cuts_the_last_batch_torn_at_every_byte_boundary() {
    let root = tempfile::tempdir().unwrap();
    let (original, written, last_position, last_bytes) = log_with_small_last_batch(root.path());
    let before_last: Vec<_> = written.iter().filter(|(offset, _)| *offset < 16).cloned().collect();
    let root_path = root.path().to_owned();
    let outcomes = run(move || async move {
        let mut outcomes = Vec::new();
        for cut in 0..=last_bytes {
            let copy = root_path.join(format!("cut-{cut}"));
            copy_dir(&original, &copy);
            let file = segment_files(&copy)[0].clone();
            let handle = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            handle.set_len(last_position + cut).unwrap();
            if cut % 2 == 1 {
                // As after a crash with preallocated space: zeros after the torn bytes.
                handle.set_len(last_position + last_bytes + 8192).unwrap();
            }
            drop(handle);
            let log = open(&copy, small_options()).await.unwrap();
            let read = read_all(&log).await;
            // The log keeps working after the cut.
            let offset = log.append(vec![record(999, 7)]).await.unwrap();
            log.close().await.unwrap();
            outcomes.push((cut, read, offset));
            std::fs::remove_dir_all(&copy).unwrap();
        }
        outcomes
    });
    for (cut, read, offset) in outcomes {
        if cut == last_bytes {
            assert_eq!(read, written, "uncut log must be whole");
            assert_eq!(offset, 19);
        } else {
            assert_eq!(read, before_last, "cut at byte {cut} of the last batch");
            assert_eq!(offset, 16, "cut at byte {cut}: the next append continues the log");
        }
    }
}

#[test]
fn recovery_cuts_or_keeps_a_tail_batch_with_a_flipped_bit_but_never_returns_it_changed() {
    let root = tempfile::tempdir().unwrap();
    let (original, written, last_position, last_bytes) = log_with_small_last_batch(root.path());
    let root_path = root.path().to_owned();
    let outcomes = run(move || async move {
        let mut random = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut outcomes = Vec::new();
        for trial in 0..150 {
            let copy = root_path.join(format!("flip-{trial}"));
            copy_dir(&original, &copy);
            let file = segment_files(&copy)[0].clone();
            let mut bytes = std::fs::read(&file).unwrap();
            let position = last_position + random.gen_range(0..last_bytes);
            let bit = random.gen_range(0..8);
            bytes[position as usize] ^= 1 << bit;
            std::fs::write(&file, &bytes).unwrap();
            let log = open(&copy, small_options()).await.unwrap();
            outcomes.push((position, read_all(&log).await));
            log.close().await.unwrap();
            std::fs::remove_dir_all(&copy).unwrap();
        }
        outcomes
    });
    let mut cut = 0;
    for (position, read) in outcomes {
        assert!(read.len() == 16 || read.len() == 19, "flip at byte {position}: {} records", read.len());
        assert_eq!(read[..], written[..read.len()], "flip at byte {position} changed a record");
        if read.len() == 16 {
            cut += 1;
        } else {
            // Only the leader epoch lies outside the CRC and the offset checks.
            assert!((12..16).contains(&(position - last_position)), "flip at byte {position} went unnoticed");
        }
    }
    assert!(cut > 100, "most flips must cut the batch, {cut} did");
}

#[test]
fn corruption_before_the_tail_refuses_the_open_naming_file_and_byte() {
    let root = tempfile::tempdir().unwrap();
    let (original, _, _, _) = log_with_small_last_batch(root.path());
    let file = segment_files(&original)[0].clone();
    let positions = batch_positions(&file);
    let victim = positions[4];
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[victim as usize + 70] ^= 0x01; // inside the records: a CRC mismatch
    std::fs::write(&file, &bytes).unwrap();
    let task_path = original.clone();
    let result = run(move || async move { open(&task_path, small_options()).await.map(|_| ()) });
    let error = result.unwrap_err();
    match &error {
        LogError::Corrupt { path, position, .. } => {
            assert_eq!(path, &file);
            assert_eq!(*position, victim);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let text = error.to_string();
    assert!(text.contains(&file.display().to_string()) && text.contains(&format!("byte {victim}")), "{text}");
    // Refusing must not have changed the file.
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
}

#[test]
fn corruption_at_an_index_point_is_found_by_scanning_from_the_previous_one() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let task_path = path.clone();
    run(move || async move {
        let mut options = small_options();
        options.segment_bytes_max = 1 << 20;
        let log = open(&task_path, options).await.unwrap();
        append_batches(&log, &groups(0, 60, 2, 300)).await;
        log.close().await.unwrap();
    });
    let file = segment_files(&path)[0].clone();
    let index = std::fs::read(file.with_extension("index")).unwrap();
    let (entries, _) = weir::core::log::index::parse_entries(&index);
    assert!(entries.len() >= 3, "need index entries, got {entries:?}");
    let victim = u64::from(entries.last().unwrap().position);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[victim as usize + 80] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let task_path = path.clone();
    let mut options = small_options();
    options.segment_bytes_max = 1 << 20;
    let result = run(move || async move { open(&task_path, options).await.map(|_| ()) });
    assert!(
        matches!(result, Err(LogError::Corrupt { position, .. }) if position == victim),
        "expected corruption at byte {victim}: {result:?}"
    );
}

#[test]
fn a_stale_index_pointing_past_the_end_is_dropped() {
    let root = tempfile::tempdir().unwrap();
    let directory = root.path().join("p");
    let task_path = directory.clone();
    let written = run(move || async move {
        let mut options = small_options();
        options.segment_bytes_max = 1 << 20;
        let log = open(&task_path, options).await.unwrap();
        let written = append_batches(&log, &groups(0, 60, 2, 300)).await;
        log.close().await.unwrap();
        written
    });
    // Keep the index but cut the log in the middle: entries now point past its end
    // (as after power loss with the index written and the log not yet synced).
    let file = segment_files(&directory)[0].clone();
    let positions = batch_positions(&file);
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(positions[30]).unwrap();
    let task_path = directory.clone();
    let read = run(move || async move {
        let mut options = small_options();
        options.segment_bytes_max = 1 << 20;
        let log = open(&task_path, options).await.unwrap();
        let read = read_all(&log).await;
        log.append(vec![record(5000, 10)]).await.unwrap();
        log.close().await.unwrap();
        read
    });
    assert_eq!(read[..], written[..60]);
    let inspect =
        std::process::Command::new(env!("CARGO_BIN_EXE_weir")).arg("inspect").arg(&directory).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
}

#[test]
fn a_batch_larger_than_the_read_window_is_returned_whole() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("p");
    let (written, first, second) = run(move || async move {
        let mut options = small_options();
        options.flush_bytes_max = 1 << 20;
        options.segment_bytes_max = 4 << 20;
        let log = open(&path, options).await.unwrap();
        let written = append_batches(&log, &[vec![record(1, 100)], vec![record(2, 700 << 10)]]).await;
        let first = log.read(0, 1).await.unwrap();
        let second = log.read(1, 1).await.unwrap();
        log.close().await.unwrap();
        (written, first, second)
    });
    assert_eq!(first.len(), 1, "bytes_max 1 still returns one whole batch");
    assert_eq!(second.len(), 1);
    let records: Vec<_> =
        batch::records(&second[0]).unwrap().map(|record| record.unwrap().to_record(&second[0])).collect();
    assert_eq!(records, vec![written[1].1.clone()]);
}
