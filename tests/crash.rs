//! acked_records_survive_sigkill_at_random_moments
//!
//! A child process appends under load (concurrent appenders, group commit, segment
//! rolls) and prints each acknowledged append; the parent SIGKILLs it at a random
//! moment, reopens the log, and checks that every acknowledged record is present,
//! intact and in order, and that nothing unacknowledged was invented (every record in
//! the log is one the child made, exactly once). 50 rounds on one log; the seed is
//! printed so a failure can be replayed with WEIR_CRASH_SEED.
//!
//! A custom harness (`harness = false`): the same binary is the child when run with
//! `--child`.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{read_all, record, run, seed_of};
use rand::{Rng, SeedableRng};
use weir::shell::log::{LogOptions, PartitionLog};
use weir::shell::metrics::Metrics;

const ROUNDS: u64 = 50;
const APPENDERS: u64 = 16;
const SEEDS_PER_ROUND: u64 = 100_000_000;
const SEEDS_PER_APPENDER: u64 = 1_000_000;

fn options() -> LogOptions {
    LogOptions {
        // Rolls happen every few rounds: small enough to exercise them and recovery
        // across sealed segments, large enough to keep the segment count modest.
        segment_bytes_max: 4 << 20,
        segment_age_max: Duration::from_secs(3600),
        index_interval_bytes: 8 << 10,
        preallocate_bytes: 1 << 20,
        flush_delay_max: Duration::from_micros(100),
        flush_bytes_max: 64 << 10,
        core_flushes_per_s_max: 1000,
        appends_pending_max: 64,
        partition_bytes_max: 1 << 30,
    }
}

fn value_bytes(seed: u64) -> usize {
    (seed % 1500) as usize
}

fn records_in(seed: u64) -> u64 {
    1 + seed % 3
}

fn child(directory: PathBuf, first_seed: u64) {
    run(move || async move {
        let log = PartitionLog::open(&directory, "crash-0", options(), Metrics::new().partition("crash", 0))
            .await
            .expect("child opens the log");
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|appender| {
                let log = log.clone();
                glommio::spawn_local(async move {
                    let mut seed = first_seed + appender * SEEDS_PER_APPENDER;
                    loop {
                        let count = records_in(seed);
                        let records = (seed..seed + count).map(|each| record(each, value_bytes(each))).collect();
                        let offset = log.append(records).await.expect("append");
                        let mut stdout = std::io::stdout().lock();
                        writeln!(stdout, "{seed} {count} {offset}").unwrap();
                        stdout.flush().unwrap();
                        seed += count;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
    });
}

/// Acked appends: offset -> (first seed, record count).
type Acked = BTreeMap<i64, (u64, u64)>;

fn run_round(directory: &Path, round: u64, kill_after: Duration, acked: &mut Acked) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .arg(directory)
        .arg((round * SEEDS_PER_ROUND).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if line.ends_with('\n') {
                lines.push(line.trim_end().to_owned());
            }
            line.clear();
        }
        lines
    });
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL the child");
    let status = child.wait().unwrap();
    assert!(!status.success(), "round {round}: the child must die by SIGKILL, got {status}");
    for line in reader.join().unwrap() {
        let fields: Vec<i64> = line.split(' ').map(|field| field.parse().unwrap()).collect();
        let previous = acked.insert(fields[2], (fields[0] as u64, fields[1] as u64));
        assert!(previous.is_none(), "round {round}: offset {} acked twice", fields[2]);
    }
}

fn verify(directory: &Path, round: u64, acked: &Acked) -> usize {
    let task_directory = directory.to_owned();
    let records = run(move || async move {
        let log = PartitionLog::open(&task_directory, "crash-0", options(), Metrics::new().partition("crash", 0))
            .await
            .unwrap_or_else(|error| panic!("round {round}: reopen failed: {error}"));
        let records = read_all(&log).await;
        log.close().await.unwrap();
        records
    });
    let mut seen = HashSet::new();
    let mut last_seed_of_appender: BTreeMap<u64, u64> = BTreeMap::new();
    for (index, (offset, stored)) in records.iter().enumerate() {
        assert_eq!(*offset, index as i64, "round {round}: offsets are contiguous from 0");
        let seed = seed_of(stored);
        assert_eq!(stored, &record(seed, value_bytes(seed)), "round {round}: record at offset {offset} was altered");
        assert!(seen.insert(seed), "round {round}: record {seed} appears twice");
        let appender = seed / SEEDS_PER_APPENDER;
        if let Some(previous) = last_seed_of_appender.insert(appender, seed) {
            assert!(previous < seed, "round {round}: appender {appender} out of order at offset {offset}");
        }
    }
    for (offset, (first_seed, count)) in acked {
        for each in 0..*count {
            let at = (*offset + each as i64) as usize;
            assert!(at < records.len(), "round {round}: acked offset {at} lost (log ends at {})", records.len());
            assert_eq!(
                seed_of(&records[at].1),
                first_seed + each,
                "round {round}: acked offset {at} holds another record"
            );
        }
    }
    records.len()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(PathBuf::from(&args[2]), args[3].parse().unwrap());
        return;
    }
    let seed: u64 = std::env::var("WEIR_CRASH_SEED").ok().and_then(|text| text.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("acked_records_survive_sigkill_at_random_moments: seed {seed} (replay with WEIR_CRASH_SEED={seed})");
    let mut random = rand::rngs::StdRng::seed_from_u64(seed);
    let root = tempfile::tempdir().unwrap();
    let directory = root.path().join("crash-0");
    let mut acked = Acked::new();
    let started = Instant::now();
    let mut records = 0;
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(random.gen_range(5..300));
        run_round(&directory, round, kill_after, &mut acked);
        records = verify(&directory, round, &acked);
    }
    let acked_records: u64 = acked.values().map(|(_, count)| count).sum();
    assert!(acked_records > 1000, "too little load to mean anything: {acked_records} acked records");
    println!(
        "acked_records_survive_sigkill_at_random_moments: {ROUNDS} kills, {} acked appends ({acked_records} records), {records} records in the log, {:.1} s: ok",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
    println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}
