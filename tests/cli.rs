//! The `weir` binary as an operator meets it: configs, serve's lifecycle, inspect.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{record, run, small_options};
use weir::config::{Config, Host};

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_example_config_loads_and_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("firmware-config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|extension| extension == "toml") && path.file_name().unwrap() != "device.toml" {
            let config = Config::load(&path).unwrap_or_else(|error| panic!("{error}"));
            config.validate(&Host::probe(), &path.display().to_string()).unwrap_or_else(|error| panic!("{error}"));
            let output = weir().arg("check-config").arg("--config").arg(&path).output().unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 1);
    // The embedded default is exactly firmware-config/weir.toml.
    let embedded = weir().arg("check-config").output().unwrap();
    assert!(embedded.status.success());
    assert!(String::from_utf8_lossy(&embedded.stdout).starts_with("config ok:"));
}

#[test]
fn a_bad_config_is_refused_with_every_field_path_and_exit_2() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("bad.toml");
    let data = directory.path().join("data");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\ncolour = \"blue\"\n[engine]\ncores = [0, 4096]\n[log]\nsegment_bytes_max = 1000000\nflush_delay_us_max = \"5 MiB\"\n",
            data.display()
        ),
    )
    .unwrap();
    for command in ["check-config", "serve"] {
        let output = weir().arg(command).arg("--config").arg(&path).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("colour: unknown key"), "{command}: {stderr}");
        assert!(stderr.contains("log.flush_delay_us_max") && stderr.contains("wrong unit"), "{command}: {stderr}");
    }
    // With the unit fixed, the remaining problems are all reported at once.
    std::fs::write(
        &path,
        format!("data_dir = {:?}\n[engine]\ncores = [0, 4096]\n[log]\nsegment_bytes_max = 1000000\n", data.display()),
    )
    .unwrap();
    let output = weir().arg("serve").arg("--config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("engine.cores: core 4096 does not exist"), "{stderr}");
    assert!(stderr.contains("log.segment_bytes_max: 1000000 is not a multiple of the 4096-byte"), "{stderr}");
    assert!(!data.exists(), "nothing starts before the config is valid");
    let output = weir().args(["serve", "--cores", "4096"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_config_typo_is_placed_by_line_and_column_and_a_mistyped_key_gets_a_suggestion() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("typo.toml");
    std::fs::write(&path, "[log]\nflush_delay_us_max = 250\nsegment_bytes_max = = 5\n").unwrap();
    let output = weir().arg("check-config").arg("--config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3, column 21: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 2, "one line per problem: {stderr}");

    std::fs::write(&path, "log_levl = \"debug\"\n[log]\nsegment_bytez_max = \"1 MiB\"\n").unwrap();
    let output = weir().arg("check-config").arg("--config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("log_levl: unknown key; did you mean `log_level`?"), "{stderr}");
    assert!(stderr.contains("log.segment_bytez_max: unknown key; did you mean `segment_bytes_max`?"), "{stderr}");
}

/// Runs `weir serve` with `extra` arguments until it logs "weir serving"; returns every
/// stderr line up to that one, then stops it (SIGTERM, exit 0).
fn serve_lines_until_serving(config: &Path, extra: &[&str]) -> Vec<String> {
    let mut child = weir()
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--cores", "1"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let serving = line.contains("weir serving");
        lines.push(line);
        if serving {
            break;
        }
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{lines:#?}");
    assert!(lines.last().is_some_and(|line| line.contains("weir serving")), "{lines:#?}");
    lines
}

#[test]
fn serve_names_its_version_in_its_first_line_and_logs_json_on_request() {
    let directory = tempfile::tempdir().unwrap();
    let config = config_file(directory.path());
    let version = env!("CARGO_PKG_VERSION");

    let lines = serve_lines_until_serving(&config, &[]);
    assert!(lines[0].contains(&format!("weir {version} starting")), "{lines:#?}");
    assert!(lines[0].contains(&format!("version=\"{version}\"")), "{lines:#?}");
    assert!(lines[0].contains(&format!("config={}", config.display())), "{lines:#?}");

    let lines = serve_lines_until_serving(&config, &["--log-format", "json"]);
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}")))
        .collect();
    assert_eq!(parsed[0]["message"], format!("weir {version} starting"), "{lines:#?}");
    assert_eq!(parsed[0]["version"], version);
    assert_eq!(parsed[0]["level"], "INFO");
    assert!(parsed[0]["timestamp"].is_string(), "{lines:#?}");
    let serving = parsed.last().unwrap();
    assert_eq!(serving["message"], "weir serving");
    assert_eq!(serving["cores"], 1, "an event's fields sit beside the message: {serving}");
    // The flag goes after the subcommand or before it.
    let before = weir().args(["--log-format", "json", "check-config"]).output().unwrap();
    assert!(before.status.success(), "{}", String::from_utf8_lossy(&before.stderr));
    let bad = weir().args(["serve", "--log-format", "yaml"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

fn config_file(directory: &Path) -> std::path::PathBuf {
    let path = directory.join("weir.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\n[[topics]]\nname = \"telemetry\"\npartitions = 3\n",
            directory.join("data").display(),
            directory.join("certs").display()
        ),
    )
    .unwrap();
    path
}

/// Starts `weir serve`; returns the child and its admin address once it is serving.
fn start_serving(config: &Path, cores: usize) -> (Child, String) {
    let mut child = weir()
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--cores")
        .arg(cores.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("weir: {line}");
            let _ = sender.send(line);
        }
    });
    let mut address = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Ok(line) = receiver.recv_timeout(Duration::from_millis(100)) else { continue };
        if let Some(at) = line.find("admin=http://") {
            address = Some(line[at + "admin=http://".len()..].split_whitespace().next().unwrap().to_owned());
        }
        if line.contains("weir serving") {
            return (child, address.expect("the admin address is logged before serving"));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("weir did not start serving");
}

fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id() as i32;
    // Through the `kill` command: the tests stay free of unsafe code.
    Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "weir did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_opens_partitions_serves_metrics_and_health_and_stops_cleanly_on_sigterm() {
    let directory = tempfile::tempdir().unwrap();
    let config = config_file(directory.path());
    // Records from an earlier life of the partition: serve must recover them.
    let partition = directory.path().join("data/telemetry-1");
    let task_partition = partition.clone();
    run(move || async move {
        let log = common::open(&task_partition, small_options()).await.unwrap();
        for seed in 0..5 {
            log.append(vec![record(seed, 100)]).await.unwrap();
        }
        log.close().await.unwrap();
    });
    let (mut child, address) = start_serving(&config, 2);
    let (status, body) = http_get(&address, "/health");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok: 2 cores serving"), "{body}");
    let (status, metrics) = http_get(&address, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("weir_log_next_offset{topic=\"telemetry\",partition=\"1\"} 5"), "{metrics}");
    assert!(metrics.contains("weir_log_next_offset{topic=\"telemetry\",partition=\"2\"} 0"), "{metrics}");
    assert!(metrics.contains("weir_cores_running 2"), "{metrics}");
    assert_eq!(http_get(&address, "/nope").0, 404);
    let status = terminate(&mut child);
    assert_eq!(status.code(), Some(0), "clean shutdown exits 0");
    // With no PKI configured, serve made a development one for the QUIC listener.
    assert!(directory.path().join("certs/ca.pem").exists() && directory.path().join("certs/server.key").exists());
    for index in 0..3 {
        assert!(directory.path().join(format!("data/telemetry-{index}/00000000000000000000.log")).exists());
    }
    let inspect = weir().arg("inspect").arg(directory.path().join("data")).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let summary = String::from_utf8_lossy(&inspect.stdout);
    assert!(summary.contains("telemetry-1: 1 segments, 5 batches, 5 records"), "{summary}");
    assert!(summary.contains("ok: 3 partitions"), "{summary}");
}

#[test]
fn serve_refuses_a_partition_corrupt_before_its_tail_with_exit_3_naming_file_and_byte() {
    let directory = tempfile::tempdir().unwrap();
    let config = config_file(directory.path());
    let partition = directory.path().join("data/telemetry-0");
    let task_partition = partition.clone();
    run(move || async move {
        let log = common::open(&task_partition, small_options()).await.unwrap();
        for seed in 0..6 {
            log.append(vec![record(seed, 100)]).await.unwrap();
        }
        log.close().await.unwrap();
    });
    let file = partition.join("00000000000000000000.log");
    let mut bytes = std::fs::read(&file).unwrap();
    let second_batch = weir::core::log::batch::check_batch(&bytes).unwrap().total_bytes();
    bytes[second_batch + 80] ^= 0x04;
    std::fs::write(&file, &bytes).unwrap();
    let output = weir().arg("serve").arg("--config").arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("{}: byte {second_batch}", file.display())), "{stderr}");
    let inspect = weir().arg("inspect").arg(&partition).output().unwrap();
    assert_eq!(inspect.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&inspect.stderr);
    assert!(stderr.contains(&format!("{}: byte {second_batch}: crc mismatch", file.display())), "{stderr}");
    assert!(stderr.contains("corruption before the tail"), "{stderr}");
}

#[test]
fn inspect_reports_a_torn_tail_and_index_disagreement() {
    let directory = tempfile::tempdir().unwrap();
    let partition = directory.path().join("p");
    let task_partition = partition.clone();
    run(move || async move {
        let log = common::open(&task_partition, small_options()).await.unwrap();
        for seed in 0..40 {
            log.append(vec![record(seed, 300), record(seed + 1000, 300)]).await.unwrap();
        }
        log.close().await.unwrap();
    });
    let ok = weir().arg("inspect").arg("--json").arg(&partition).output().unwrap();
    assert!(ok.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(summary["partitions"][0]["records"], 80);
    let file = partition.join("00000000000000000000.log");
    let length = std::fs::metadata(&file).unwrap().len();
    let torn = directory.path().join("torn");
    common::copy_dir(&partition, &torn);
    std::fs::OpenOptions::new()
        .write(true)
        .open(torn.join("00000000000000000000.log"))
        .unwrap()
        .set_len(length - 5)
        .unwrap();
    let output = weir().arg("inspect").arg(&torn).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("torn tail"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let index = partition.join("00000000000000000000.index");
    let mut entries = std::fs::read(&index).unwrap();
    assert!(entries.len() >= 8);
    entries[7] ^= 0x01; // the first entry's position, off by one
    std::fs::write(&index, &entries).unwrap();
    let output = weir().arg("inspect").arg(&partition).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("{}: byte 0: index entry", index.display())), "{stderr}");
}

#[test]
fn inspect_reports_every_corrupt_partition_and_its_json_report_always_prints() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    for name in ["telemetry-0", "telemetry-1", "telemetry-2"] {
        let partition = data.join(name);
        run(move || async move {
            let log = common::open(&partition, small_options()).await.unwrap();
            for seed in 0..6 {
                log.append(vec![record(seed, 100)]).await.unwrap();
            }
            log.close().await.unwrap();
        });
    }
    let mut corrupted = Vec::new();
    for name in ["telemetry-0", "telemetry-2"] {
        let file = data.join(name).join("00000000000000000000.log");
        let mut bytes = std::fs::read(&file).unwrap();
        let second_batch = weir::core::log::batch::check_batch(&bytes).unwrap().total_bytes();
        bytes[second_batch + 80] ^= 0x04;
        std::fs::write(&file, &bytes).unwrap();
        corrupted.push(format!("{}: byte {second_batch}: crc mismatch", file.display()));
    }
    let output = weir().arg("inspect").arg(&data).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    for problem in &corrupted {
        assert!(stderr.contains(problem.as_str()), "{problem} in {stderr}");
        assert!(stdout.contains(problem.as_str()), "{problem} in {stdout}");
    }
    assert!(stdout.contains("telemetry-1: 1 segments, 6 batches, 6 records"), "the healthy one is checked: {stdout}");
    assert!(stdout.contains("2 of 3 partitions have problems"), "{stdout}");

    let output = weir().args(["inspect", "--json"]).arg(&data).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["problems"], 2);
    let partitions = report["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    assert!(partitions[0]["problem"].as_str().unwrap().contains(corrupted[0].as_str()));
    assert_eq!(partitions[1]["problem"], serde_json::Value::Null);
    assert_eq!(partitions[1]["records"], 6);
    assert!(partitions[2]["problem"].as_str().unwrap().contains(corrupted[1].as_str()));
}
