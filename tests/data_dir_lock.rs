//! One owner per data directory. Two `weir serve` processes on one data directory
//! overwrite each other's tail pages and lose acknowledged records (issue 17), so a
//! second `serve` must refuse to start — through the same config, through another
//! config with other ports, through a symlinked data directory, and through a
//! partition directory reached from another data directory — naming the holder's PID,
//! exiting 8 and writing nothing. `weir inspect`, `weir status` and `weir doctor` read
//! beside the serving process; a crashed holder (SIGKILL) never blocks the restart.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use appliance::{make_certs, Appliance};
use common::read_partition;
use server::{weir, Server};

const DATA_DIR_IN_USE: i32 = 8;

/// Every file under `directory` with its bytes.
fn snapshot(directory: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![directory.to_owned()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.insert(path.strip_prefix(directory).unwrap().to_owned(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// A config for `data_dir` with the given admin and QUIC addresses and the appliance's
/// certificates and topic.
fn config(root: &Path, name: &str, data_dir: &Path, admin: &str, quic: &str) -> PathBuf {
    let path = root.join(name);
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"{admin}\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"{quic}\"\ncerts_dir = {:?}\n\
             generate_dev_certs = false\n[[topics]]\nname = \"telemetry\"\npartitions = 2\n",
            data_dir.display(),
            root.join("certs").display()
        ),
    )
    .unwrap();
    path
}

fn serve(config: &Path) -> Output {
    weir().args(["serve", "--cores", "1", "--config"]).arg(config).output().unwrap()
}

fn assert_refused(output: &Output, holder: u32, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(DATA_DIR_IN_USE), "{what}: {stderr}");
    assert!(stderr.contains("in use by another weir process"), "{what}: {stderr}");
    assert!(stderr.contains(&format!("(PID {holder})")), "{what}: the holder's PID is named: {stderr}");
}

fn acked_frames(output: &Output) -> usize {
    assert!(output.status.success(), "device failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answers: Vec<serde_json::Value> = stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert!(answers.iter().all(|answer| answer["kind"] == "ack"), "{stdout}");
    answers.len()
}

#[test]
fn a_second_serve_on_the_same_data_directory_is_refused_and_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    make_certs(&root.join("certs"), &["dev-1"]);
    let appliance = Appliance::start(root, "", "", &[("telemetry", 2)], 1);
    let holder = appliance.server.pid();
    let data = root.join("data");
    assert_eq!(acked_frames(&appliance.aioquic("dev-1", &["--frames", "10", "--records", "4"])), 10);
    let before = snapshot(&data);

    // The same config, its ports still free of the second process.
    assert_refused(&serve(&root.join("weir.toml")), holder, "the same config");
    // The holder's exact admin and QUIC ports: refused for the directory, not the ports.
    let quic = appliance.quic.clone();
    let same_ports = config(root, "same-ports.toml", &data, &appliance.server.admin, &quic);
    assert_refused(&serve(&same_ports), holder, "the same ports");
    // Other ports: SO_REUSEPORT would have let it share the UDP port before.
    let other_ports = config(root, "other-ports.toml", &data, "127.0.0.1:0", "127.0.0.1:0");
    assert_refused(&serve(&other_ports), holder, "other ports");
    // The same directory through a symlink.
    std::os::unix::fs::symlink(&data, root.join("data-link")).unwrap();
    let through_link = config(root, "link.toml", &root.join("data-link"), "127.0.0.1:0", "127.0.0.1:0");
    assert_refused(&serve(&through_link), holder, "a symlinked data directory");
    // Another data directory whose partition is the serving one's: the partition lock.
    let other = root.join("other");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::symlink(data.join("telemetry-0"), other.join("telemetry-0")).unwrap();
    let shared_partition = config(root, "partition.toml", &other, "127.0.0.1:0", "127.0.0.1:0");
    let output = serve(&shared_partition);
    assert_eq!(output.status.code(), Some(DATA_DIR_IN_USE), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("telemetry-0"));

    assert_eq!(snapshot(&data), before, "no refused process wrote a byte in the data directory");

    // Readers work beside the server and take no lock.
    let inspect = weir().arg("inspect").arg(&data).output().unwrap();
    assert_eq!(inspect.status.code(), Some(0), "{}", String::from_utf8_lossy(&inspect.stderr));
    let status = weir()
        .args(["status", "--admin", &appliance.server.admin, "--config"])
        .arg(root.join("weir.toml"))
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", String::from_utf8_lossy(&status.stderr));
    let doctor = weir().args(["doctor", "--json", "--config"]).arg(root.join("weir.toml")).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let owner = report["checks"].as_array().unwrap().iter().find(|check| check["name"] == "data_dir.owner").unwrap();
    assert_eq!(owner["status"], "warn", "{owner}");
    assert!(owner["saw"].as_str().unwrap().contains(&format!("weir (PID {holder}) is serving")), "{owner}");

    // The holder kept serving through all of it.
    assert_eq!(
        acked_frames(&appliance.aioquic("dev-1", &["--frames", "10", "--records", "4", "--sequence", "11"])),
        10
    );
    appliance.stop();
    let stored: usize = (0..2).map(|partition| read_partition(data.join(format!("telemetry-{partition}"))).len()).sum();
    assert_eq!(stored, 20 * 4, "every acknowledged record is in the log, once");

    // Once the holder is gone, the directory is free again.
    let server = Server::start(&other_ports, 1);
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn a_killed_holder_never_blocks_the_restart() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    make_certs(&root.join("certs"), &["dev-1"]);
    let appliance = Appliance::start(root, "", "", &[("telemetry", 2)], 1);
    assert_eq!(acked_frames(&appliance.aioquic("dev-1", &["--frames", "5", "--records", "2"])), 5);
    let config = root.join("weir.toml");
    drop(appliance); // SIGKILL: the lock file stays, holding the dead PID
    assert!(root.join("data/weir.lock").is_file());
    let server = Server::start(&config, 1);
    let doctor = weir().args(["doctor", "--json", "--config"]).arg(&config).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let owner = report["checks"].as_array().unwrap().iter().find(|check| check["name"] == "data_dir.owner").unwrap();
    assert!(owner["saw"].as_str().unwrap().contains(&format!("(PID {})", server.pid())), "{owner}");
    assert_eq!(server.stop(), Some(0));
    let doctor = weir().args(["doctor", "--json", "--config"]).arg(&config).output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let owner = report["checks"].as_array().unwrap().iter().find(|check| check["name"] == "data_dir.owner").unwrap();
    assert_eq!(owner["status"], "ok", "{owner}");
    let stored: usize =
        (0..2).map(|partition| read_partition(root.join(format!("data/telemetry-{partition}"))).len()).sum();
    assert_eq!(stored, 5 * 2);
}
