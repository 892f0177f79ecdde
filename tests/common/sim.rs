//! Devices for the tests that need many: a `weir certs` PKI for weir-sim's devices
//! (`sim-0`, `sim-1`, ...) and weir-sim runs whose acknowledged records are read back
//! from its `--acked-log`. Needs `#[path = "common/server.rs"] mod server;` beside it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::server::weir;

/// (device, sequence, partition, offset) of a record weir-sim saw acknowledged.
pub type Place = (String, u64, u32, i64);

/// A binary built beside `weir` (weir-sim, weir-bench, ...).
pub fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_weir")).with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (tools/test does)", path.display());
    path
}

/// `weir certs` for `devices` weir-sim devices into `directory`.
pub fn sim_certs(directory: &Path, devices: u32) {
    let output = weir()
        .args(["certs", "--device-count", &devices.to_string(), "--device-prefix", "sim-", "--dir"])
        .arg(directory)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// Runs weir-sim against `quic` with the PKI in `certs` and `args` (devices, rate,
/// seconds, record size) to its end; every record it saw acknowledged.
pub fn simulate(quic: &str, certs: &Path, acked_log: &Path, args: &[&str]) -> BTreeSet<Place> {
    let sim = Command::new(binary("weir-sim"))
        .args(["--server", quic, "--certs"])
        .arg(certs)
        .arg("--acked-log")
        .arg(acked_log)
        .args(args)
        .output()
        .unwrap();
    assert!(sim.status.success(), "weir-sim failed: {}", String::from_utf8_lossy(&sim.stderr));
    acked_places(acked_log)
}

/// The places in a weir-sim `--acked-log`.
pub fn acked_places(acked_log: &Path) -> BTreeSet<Place> {
    std::fs::read_to_string(acked_log)
        .unwrap()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields[0].to_owned(), fields[1].parse().unwrap(), fields[2].parse().unwrap(), fields[3].parse().unwrap())
        })
        .collect()
}

/// Each of `partitions`' end: one past its last acknowledged offset (0: none).
pub fn ends_of(acked: &BTreeSet<Place>, partitions: u32) -> BTreeMap<u32, i64> {
    let mut ends: BTreeMap<u32, i64> = (0..partitions).map(|partition| (partition, 0)).collect();
    for (_, _, partition, offset) in acked {
        let end = ends.get_mut(partition).unwrap();
        *end = (*end).max(offset + 1);
    }
    ends
}
