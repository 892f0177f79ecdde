//! Replays every input kept in `tests/fuzz/corpus/<target>` through the fuzz target's
//! entry point in `weir::fuzzing` (the same function `tools/fuzz` fuzzes): seeds,
//! inputs the fuzzer found interesting, and every crash ever found and fixed. An input
//! that panics fails the test with its path.

use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

/// The allocator `weir` runs with: the kafka_response regressions decode under it.
#[global_allocator]
static ALLOCATOR: weir::shell::sys::ReserveLargeAllocator = weir::shell::sys::ReserveLargeAllocator;

const TARGETS: &[(&str, Target)] = &[
    ("device_stream", weir::fuzzing::device_stream),
    ("record_batch", weir::fuzzing::record_batch),
    ("recovery_scan", weir::fuzzing::recovery_scan),
    ("index_file", weir::fuzzing::index_file),
    ("kafka_response", weir::fuzzing::kafka_response),
    ("config_file", weir::fuzzing::config_file),
    ("kafka_request", weir::fuzzing::kafka_request),
    ("scram_server", weir::fuzzing::scram_server),
];

fn corpus(target: &str) -> Vec<PathBuf> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn every_target_has_a_corpus_and_every_input_passes() {
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let inputs = corpus(name);
        assert!(!inputs.is_empty(), "tests/fuzz/corpus/{name} is empty: keep at least its seeds");
        for path in inputs {
            let bytes = std::fs::read(&path).unwrap();
            // Named first, so an input that aborts the process (not a panic) is known.
            if std::env::var_os("WEIR_FUZZ_CORPUS_VERBOSE").is_some() {
                eprintln!("replaying {}", path.display());
            }
            if std::panic::catch_unwind(|| target(&bytes)).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "inputs that crash: {failures:#?}");
}

#[test]
fn every_fuzz_target_file_is_replayed_here() {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/fuzz_targets");
    let mut files: Vec<String> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut replayed: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    replayed.sort();
    assert_eq!(files, replayed);
}
