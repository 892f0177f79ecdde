//! README.md's "First record" block, run as written: `weir serve` on the embedded
//! default in a fresh directory, then the block's commands in a shell (with the built
//! binaries first on PATH, as its first line sets). Each command must succeed, the
//! simulated device's records must be acked, and `weir tail` must print them with the
//! device id weir stamped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn first_record_block() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme.find("<!-- first-record").expect("README.md has the first-record block");
    let block = &readme[start..readme.find("<!-- /first-record -->").unwrap()];
    let code = &block[block.find("```sh\n").unwrap() + 6..];
    code[..code.find("```").unwrap()].to_owned()
}

#[test]
fn the_readme_first_record_block_runs_and_tail_shows_the_records() {
    let root = tempfile::tempdir().unwrap();
    let binaries: PathBuf = PathBuf::from(env!("CARGO_BIN_EXE_weir")).parent().unwrap().to_owned();
    // The block's PATH line points at $PWD/target/release: give the directory one.
    std::fs::create_dir_all(root.path().join("target")).unwrap();
    std::os::unix::fs::symlink(&binaries, root.path().join("target/release")).unwrap();
    let mut serve = Command::new(binaries.join("weir"))
        .args(["serve", "--cores", "1"])
        .current_dir(root.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    let stderr = serve.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("weir: {line}");
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "weir serve did not start serving");
        if receiver.recv_timeout(Duration::from_millis(100)).is_ok_and(|line| line.contains("weir serving")) {
            break;
        }
    }
    let script = format!("set -euo pipefail\n{}", first_record_block());
    let output = Command::new("bash").arg("-c").arg(&script).current_dir(root.path()).output().unwrap();
    Command::new("kill").arg("-TERM").arg(serve.id().to_string()).status().unwrap();
    let stopped = serve.wait().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{script}\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stopped.code(), Some(0));
    let summary = stdout.lines().find(|line| line.starts_with('{')).expect("weir-sim's JSON summary line");
    let summary: serde_json::Value = serde_json::from_str(summary).unwrap();
    assert!(summary["acked"].as_u64().unwrap() >= 20, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    let tailed: Vec<&str> = stdout.lines().filter(|line| line.starts_with("telemetry-")).collect();
    assert!(tailed.len() >= 5, "{stdout}");
    let records: Vec<&str> = tailed.iter().filter(|line| line.contains(" device=sim-0 seq=")).copied().collect();
    assert_eq!(records.len(), 5, "weir tail printed 5 records from sim-0: {stdout}");
}
