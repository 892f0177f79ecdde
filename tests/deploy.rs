//! The deployment kit in `firmware-config/`, proven on this host: systemd accepts the
//! unit, the sysctl keys exist, the Docker/Podman seccomp profile is exactly what the
//! single allowlist generates, and weir runs confined by a filter made from that same
//! allowlist (anything else kills the process), and the `.deb` holds what a site needs
//! and its binary runs `weir doctor`. The confined `weir serve` runs the whole appliance:
//! devices (weir-sim) writing over QUIC with mTLS, group commit to the log, and
//! shipping to a real tansu broker, then a clean stop on SIGTERM.
//!
//! The confined runs re-execute this test binary as a helper (`confined_helper`,
//! selected by environment variables) that installs the filter on its own thread with
//! `seccompiler` and then either execs `weir` (which keeps the filter) or runs log
//! appends on a glommio executor (whose threads inherit it). Needs root, as CI has.

#[path = "common/broker.rs"]
mod broker;
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const HELPER_MODE: &str = "WEIR_TEST_CONFINED_MODE";
const HELPER_ARGS: &str = "WEIR_TEST_CONFINED_ARGS";
const HELPER_DIR: &str = "WEIR_TEST_CONFINED_DIR";
const APPENDS: u64 = 300;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn weir_path() -> &'static str {
    env!("CARGO_BIN_EXE_weir")
}

// ---------------------------------------------------------------------------------------
// The allowlist and what is generated from it

/// One `##` group of the allowlist: its comment and its system call names.
struct Group {
    comment: String,
    names: Vec<String>,
}

fn allowlist() -> Vec<Group> {
    let text = std::fs::read_to_string(repo().join("firmware-config/seccomp/allowlist")).unwrap();
    let mut groups: Vec<Group> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix("##") {
            match groups.last_mut() {
                Some(group) if group.names.is_empty() => {
                    group.comment.push(' ');
                    group.comment.push_str(comment.trim());
                }
                _ => groups.push(Group { comment: comment.trim().to_owned(), names: Vec::new() }),
            }
            continue;
        }
        let name = line.split('#').next().unwrap().trim();
        if !name.is_empty() {
            assert!(
                name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_'),
                "{name}"
            );
            groups.last_mut().expect("names come after a ## group line").names.push(name.to_owned());
        }
    }
    groups
}

fn allowed_names() -> Vec<String> {
    allowlist().into_iter().flat_map(|group| group.names).collect()
}

/// The Docker/Podman profile (containers/common seccomp.json format): deny with EPERM
/// by default, allow each group of the list.
fn docker_profile() -> String {
    let syscalls: Vec<Value> = allowlist()
        .into_iter()
        .map(|group| json!({ "names": group.names, "action": "SCMP_ACT_ALLOW", "comment": group.comment }))
        .collect();
    let profile = json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "archMap": [
            { "architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"] },
            { "architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"] },
        ],
        "syscalls": syscalls,
    });
    serde_json::to_string_pretty(&profile).unwrap() + "\n"
}

#[test]
fn seccomp_profile_is_generated_from_the_single_allowlist() {
    let names = allowed_names();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "a name is listed twice");
    for io_uring in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(names.iter().any(|name| name == io_uring), "{io_uring} missing");
    }
    let path = repo().join("firmware-config/seccomp/weir.json");
    let generated = docker_profile();
    if std::env::var_os("WEIR_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is not what firmware-config/seccomp/allowlist generates; regenerate it with \
         WEIR_BLESS=1 cargo test --release --test deploy seccomp",
        path.display()
    );
    let parsed: Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(parsed["defaultAction"], "SCMP_ACT_ERRNO");
}

/// The filter the confined runs use: every allowlisted call this architecture has is
/// allowed; anything else kills the process (stricter than the profile's EPERM, so a
/// call missing from the list cannot hide behind an error path).
fn confining_filter() -> seccompiler::BpfProgram {
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into().unwrap();
    let filter = |names: &[String]| {
        let rules: Vec<Value> = names.iter().map(|name| json!({ "syscall": name })).collect();
        json!({ "weir": { "mismatch_action": "kill_process", "match_action": "allow", "filter": rules } }).to_string()
    };
    let known_on = |arch: seccompiler::TargetArch, name: &String| {
        seccompiler::compile_from_json(filter(std::slice::from_ref(name)).as_bytes(), arch).is_ok()
    };
    // Names of another architecture (arch_prctl on aarch64) are skipped, as Docker does;
    // a name no architecture has is a typo.
    let mut known = Vec::new();
    for name in allowed_names() {
        if known_on(arch, &name) {
            known.push(name);
        } else {
            let elsewhere = [seccompiler::TargetArch::x86_64, seccompiler::TargetArch::aarch64]
                .into_iter()
                .any(|other| known_on(other, &name));
            assert!(elsewhere, "{name} in the allowlist is no system call of x86_64 or aarch64");
        }
    }
    let mut programs = seccompiler::compile_from_json(filter(&known).as_bytes(), arch).unwrap();
    programs.remove("weir").unwrap()
}

// ---------------------------------------------------------------------------------------
// The confined helper

/// Not a test of its own: the entry point of the confined child processes. Without the
/// environment variables it does nothing.
#[test]
fn confined_helper() {
    let Ok(mode) = std::env::var(HELPER_MODE) else { return };
    let program = confining_filter();
    seccompiler::apply_filter(&program).unwrap();
    match mode.as_str() {
        "exec" => {
            let args: Vec<String> = serde_json::from_str(&std::env::var(HELPER_ARGS).unwrap()).unwrap();
            let error = Command::new(&args[0]).args(&args[1..]).exec();
            panic!("exec {args:?}: {error}");
        }
        "appends" => confined_appends(PathBuf::from(std::env::var(HELPER_DIR).unwrap())),
        other => panic!("unknown helper mode {other}"),
    }
}

/// Group-committed appends on two partitions, a clean close, recovery on reopen and a
/// full read back: the log's whole life, under the filter.
fn confined_appends(directory: PathBuf) {
    let total = common::run(move || async move {
        let mut recovered = 0;
        for partition in 0..2u64 {
            let path = directory.join(format!("telemetry-{partition}"));
            let log = common::open(&path, common::small_options()).await.unwrap();
            let log = std::rc::Rc::new(log);
            let mut appends = Vec::new();
            for seed in 0..APPENDS / 2 {
                let log = log.clone();
                appends.push(glommio::spawn_local(async move {
                    log.append(vec![common::record(seed, 200)]).await.unwrap()
                }));
            }
            for append in appends {
                append.await;
            }
            std::rc::Rc::try_unwrap(log).ok().unwrap().close().await.unwrap();
            let log = common::open(&path, common::small_options()).await.unwrap();
            recovered += common::read_all(&log).await.len() as u64;
            log.close().await.unwrap();
        }
        recovered
    });
    println!("confined appends: {total} records recovered");
}

fn helper() -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", "confined_helper", "--nocapture", "--test-threads=1"]);
    command
}

fn confined_weir(args: &[&str]) -> Command {
    let mut command = helper();
    let mut full = vec![weir_path()];
    full.extend_from_slice(args);
    command.env(HELPER_MODE, "exec").env(HELPER_ARGS, serde_json::to_string(&full).unwrap());
    command
}

fn explain(status: ExitStatus) -> String {
    match status.signal() {
        Some(libc::SIGSYS) => {
            "killed by SIGSYS: weir made a system call that firmware-config/seccomp/allowlist does not list \
             (find it with strace -f, add it, regenerate the profile)"
                .to_owned()
        }
        _ => format!("{status}"),
    }
}

#[test]
fn log_appends_recovery_and_reads_run_confined_to_the_allowlist() {
    let directory = tempfile::tempdir().unwrap();
    let output = helper().env(HELPER_MODE, "appends").env(HELPER_DIR, directory.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        explain(output.status),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("confined appends: {APPENDS} records recovered")), "{stdout}");
}

fn http_get(address: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("weir did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_and_doctor_run_confined_to_the_allowlist() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[log]\nflush_bytes_max = \"256 KiB\"\n[quic]\n\
             listen = \"127.0.0.1:0\"\ncerts_dir = {:?}\n",
            directory.path().join("data").display(),
            directory.path().join("certs").display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();

    // doctor, with the disk measurement: io_uring, O_DIRECT, statfs/statx, UDP sockets,
    // the reuseport group and its cBPF program, all inside the profile.
    let output = confined_weir(&["doctor", "--json", "--measure", "--config", &config]).output().unwrap();
    assert!(output.status.code().is_some(), "{}", explain(output.status));
    // The helper's test harness prints its header before the exec: the report follows.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout[stdout.find('{').unwrap_or(0)..])
        .unwrap_or_else(|error| panic!("{error}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(output.status.code(), Some(0), "{report:#}");
    assert_eq!(report["summary"]["fail"], 0, "{report:#}");
    let io_uring = report["checks"].as_array().unwrap().iter().find(|check| check["name"] == "io_uring").unwrap();
    assert_eq!(io_uring["status"], "ok", "the profile allows io_uring: {report:#}");

    // serve: start every core, answer /health and /metrics, stop cleanly on SIGTERM.
    let mut child =
        confined_weir(&["serve", "--config", &config]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("weir: {line}");
            let _ = sender.send(line);
        }
    });
    let mut address = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "confined weir serve did not start serving");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("confined weir serve ended before serving: {}", explain(status));
        }
        let Ok(line) = receiver.recv_timeout(Duration::from_millis(100)) else { continue };
        if let Some(at) = line.find("admin=http://") {
            address = Some(line[at + "admin=http://".len()..].split_whitespace().next().unwrap().to_owned());
        }
        if line.contains("weir serving") {
            break;
        }
    }
    let address = address.unwrap();
    let health = http_get(&address, "/health");
    assert!(health.starts_with("HTTP/1.1 200") && health.contains("cores serving"), "{health}");
    assert!(http_get(&address, "/metrics").contains("weir_cores_running"));
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status = wait_for_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", explain(status));
}

/// Cores the confined appliance runs on: at most this many, fewer on a smaller host.
const CONFINED_CORES_MAX: usize = 2;
const CONFINED_DEVICES: usize = 8;

fn binary(name: &str) -> PathBuf {
    let path = Path::new(weir_path()).with_file_name(name);
    assert!(path.exists(), "{} is missing: cargo build --release -p {name} (tools/test builds it)", path.display());
    path
}

/// Starts the confined `weir serve`; returns it and the `quic=` address it logged once
/// every core serves. Its stderr is echoed with a prefix.
fn start_confined_serve(args: &[&str]) -> (Child, String) {
    let mut child = confined_weir(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("weir: {line}");
            let _ = sender.send(line);
        }
    });
    let mut quic = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "confined weir serve did not start serving");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("confined weir serve ended before serving: {}", explain(status));
        }
        let Ok(line) = receiver.recv_timeout(Duration::from_millis(100)) else { continue };
        if let Some(at) = line.find("quic=") {
            quic = Some(line[at + "quic=".len()..].split_whitespace().next().unwrap().to_owned());
        }
        if line.contains("weir serving") {
            break;
        }
    }
    (child, quic.expect("serve logs its QUIC address"))
}

#[test]
fn serve_with_devices_and_shipping_runs_confined_to_the_allowlist() {
    let cores = weir::shell::sys::usable_cpus().len().clamp(1, CONFINED_CORES_MAX);
    let partitions = 2 * cores as u32;
    let tansu = broker::Tansu::start();
    tansu.create_topic("central", partitions);
    let directory = tempfile::tempdir().unwrap();
    let certs = directory.path().join("certs");
    let made = Command::new(weir_path())
        .args(["certs", "--device-prefix", "sim-", "--device-count", &CONFINED_DEVICES.to_string(), "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let config = directory.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[log]\nflush_bytes_max = \"256 KiB\"\n\
             [quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {certs:?}\ngenerate_dev_certs = false\n\
             [upstream]\nenabled = true\nbootstrap_servers = [\"{bootstrap}\"]\nconnect_timeout_ms = 2000\n\
             request_timeout_ms = 5000\nretry_backoff_ms_min = 20\nretry_backoff_ms_max = 300\n\
             cursor_persist_interval_ms = 200\n\
             [[upstream.topics]]\nedge = \"telemetry\"\nupstream = \"central\"\n\
             [[topics]]\nname = \"telemetry\"\npartitions = {partitions}\n",
            data = directory.path().join("data").display(),
            certs = certs.display(),
            bootstrap = tansu.address(),
        ),
    )
    .unwrap();
    let config = config.display().to_string();

    // The doctor's certificate and upstream probes (weir's Kafka client on glommio)
    // inside the profile too, against the same PKI and broker.
    let output = confined_weir(&["doctor", "--json", "--config", &config]).output().unwrap();
    assert!(output.status.code().is_some(), "{}", explain(output.status));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout[stdout.find('{').unwrap_or(0)..])
        .unwrap_or_else(|error| panic!("{error}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(report["summary"]["fail"], 0, "{report:#}");
    for name in
        ["certificates.chain", "certificates.key", "certificates.expiry", "upstream.api_versions", "upstream.topics"]
    {
        let check = report["checks"].as_array().unwrap().iter().find(|check| check["name"] == name).unwrap();
        assert_eq!(check["status"], "ok", "{report:#}");
    }

    let cores_text = cores.to_string();
    let (mut child, quic) = start_confined_serve(&["serve", "--cores", &cores_text, "--config", &config]);

    // Devices write through QUIC for a few seconds (the simulator is not confined: it is
    // the devices, not the appliance).
    let acked_log = directory.path().join("acked.txt");
    let sim = Command::new(binary("weir-sim"))
        .args(["--server", &quic, "--devices", &CONFINED_DEVICES.to_string(), "--rate", "100", "--seconds", "3"])
        .args(["--record-bytes", "200", "--threads", "1", "--certs"])
        .arg(&certs)
        .arg("--acked-log")
        .arg(&acked_log)
        .output()
        .unwrap();
    if let Some(status) = child.try_wait().unwrap() {
        panic!("confined weir serve died under load: {}", explain(status));
    }
    assert!(sim.status.success(), "weir-sim: {}", String::from_utf8_lossy(&sim.stderr));
    let stdout = String::from_utf8_lossy(&sim.stdout);
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["errors"], 0, "{summary}");
    // device sequence partition offset record_index topic
    let mut acked: Vec<Vec<i64>> = vec![Vec::new(); partitions as usize];
    for line in std::fs::read_to_string(&acked_log).unwrap().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        acked[fields[2].parse::<usize>().unwrap()].push(fields[3].parse().unwrap());
    }
    let acked_total: usize = acked.iter().map(Vec::len).sum();
    assert_eq!(acked_total as u64, summary["acked"].as_u64().unwrap(), "{summary}");
    assert!(acked_total >= CONFINED_DEVICES * 100, "too little traffic to mean anything: {summary}");

    // Every acknowledged record reaches the broker, shipped by the confined process.
    for (partition, offsets) in acked.iter().enumerate() {
        let upstream = broker::read_upstream(
            &tansu.address(),
            "central",
            partition as i32,
            offsets.len(),
            Duration::from_secs(60),
        );
        let shipped: std::collections::HashSet<i64> = upstream.iter().map(|record| record.offset).collect();
        for offset in offsets {
            assert!(shipped.contains(offset), "partition {partition}: acked offset {offset} is not upstream");
        }
        assert_eq!(upstream.len(), offsets.len(), "partition {partition}: upstream holds exactly the acked records");
    }
    if let Some(status) = child.try_wait().unwrap() {
        panic!("confined weir serve died while shipping: {}", explain(status));
    }
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status = wait_for_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", explain(status));
    eprintln!("confined: {cores} cores, {acked_total} records acked and shipped; {summary}");
}

/// journald restarting (or any reader going away) closes serve's stderr: log lines are
/// then dropped, and serve keeps serving and stops cleanly.
#[test]
fn serve_keeps_serving_when_its_stderr_is_closed() {
    let directory = tempfile::tempdir().unwrap();
    let admin = broker::free_port();
    let config = directory.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\n",
            directory.path().join("data").display(),
            directory.path().join("certs").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(weir_path())
        .args(["serve", "--cores", "1", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let address = format!("127.0.0.1:{admin}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("weir serve ended with its stderr closed: {status}");
        }
        assert!(Instant::now() < deadline, "weir serve did not answer /health");
        if std::net::TcpStream::connect(&address).is_ok() && http_get(&address, "/health").starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status = wait_for_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status}");
}

// ---------------------------------------------------------------------------------------
// systemd, sysctl

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    // A root holding systemd's own units, the unit, and the binary at its packaged path,
    // so verify checks ExecStart= too without installing anything on this host.
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), units.join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(repo().join("firmware-config/weir.service"), units.join("weir.service")).unwrap();
    let binary = root.path().join("usr/bin/weir");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    if std::fs::hard_link(weir_path(), &binary).is_err() {
        std::fs::copy(weir_path(), &binary).unwrap();
    }
    // ExecReload= runs /bin/kill (procps, or util-linux; /usr/bin/kill under usrmerge).
    let kill = root.path().join("bin/kill");
    std::fs::create_dir_all(kill.parent().unwrap()).unwrap();
    std::fs::copy(std::fs::canonicalize("/bin/kill").expect("/bin/kill on this host"), &kill).unwrap();
    let output = Command::new("systemd-analyze")
        .args(["--man=no", "verify"])
        .arg(format!("--root={}", root.path().display()))
        .arg("weir.service")
        .current_dir(root.path())
        .output()
        .expect("systemd-analyze (tools/install-deploy-tools installs systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // Unknown keys and bad values are only warnings to systemd: there must be none.
    assert!(stderr.trim().is_empty(), "{stderr}");

    let unit = std::fs::read_to_string(repo().join("firmware-config/weir.service")).unwrap();
    for line in [
        "User=weir",
        "ExecStart=/usr/bin/weir serve --config /etc/weir/weir.toml",
        "LimitMEMLOCK=infinity",
        "LimitNOFILE=1048576",
        "Restart=always",
        "RestartPreventExitStatus=2 6",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/weir",
    ] {
        assert!(unit.lines().any(|unit_line| unit_line == line), "{line} missing from the unit");
    }
    assert!(
        !unit.lines().any(|line| line.starts_with("SystemCallFilter=")),
        "systemd's @system-service set lacks the io_uring calls"
    );
    // A death by signal must restart weir: with on-failure, on-abnormal or no, systemd
    // counts SIGHUP, SIGINT, SIGTERM and SIGPIPE deaths as clean and leaves it down;
    // SuccessExitStatus= naming a signal would do the same with always.
    let directives: Vec<&str> = unit.lines().filter(|line| line.starts_with("Restart=")).collect();
    assert_eq!(directives, ["Restart=always"], "{unit}");
    for line in unit.lines() {
        assert!(!line.starts_with("SuccessExitStatus="), "{line}: a signal death would count as success");
        assert!(!line.starts_with("RestartPreventExitStatus=") || !line.contains("SIG"), "{line}");
    }
}

#[test]
fn every_sysctl_key_of_the_drop_in_exists_on_this_kernel() {
    // `sysctl -p` in a network namespace would still write net.core.rmem_max and the
    // kernel.* keys for the whole host (they are not per namespace), so the test checks
    // the keys and values instead of applying them.
    let text = std::fs::read_to_string(repo().join("firmware-config/sysctl.d/60-weir.conf")).unwrap();
    let mut keys = 0;
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')) {
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key = value: {line}"));
        let (key, optional) = match key.trim().strip_prefix('-') {
            Some(key) => (key, true),
            None => (key.trim(), false),
        };
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let exists = path.exists();
        assert!(exists || optional, "{key} does not exist under /proc/sys");
        value.trim().parse::<i64>().unwrap_or_else(|_| panic!("{key}: {value} is not an integer"));
        if key.starts_with("net.core.") && key.ends_with("mem_max") {
            assert_eq!(value.trim().parse::<u64>().unwrap(), weir::config::QUIC_SOCKET_BUFFER_BYTES_DEFAULT);
        }
        keys += 1;
    }
    assert_eq!(keys, 4);
}

// ---------------------------------------------------------------------------------------
// The Debian package

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_deb_holds_binary_unit_sysctl_config_and_data_dir_and_its_binary_runs_doctor() {
    // Package the binary this test run built (`--no-build`): no second release build.
    let binary = Path::new(weir_path());
    let profile_dir = binary.parent().unwrap();
    let profile = profile_dir.file_name().unwrap().to_str().unwrap();
    let output_dir = tempfile::tempdir().unwrap();
    let deb = output_dir.path().join("weir.deb");
    let mut cargo_deb = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo_deb
        .args(["deb", "--no-build", "--no-strip", "--fast", "-p", "weir", "--output"])
        .arg(&deb)
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .current_dir(repo());
    if profile != "release" {
        cargo_deb.args(["--profile", if profile == "debug" { "dev" } else { profile }]);
    }
    let started = Instant::now();
    let output = cargo_deb.output().expect("cargo deb (tools/install-deploy-tools installs cargo-deb)");
    assert!(
        output.status.success(),
        "cargo deb failed (tools/install-deploy-tools installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("cargo deb --no-build took {:?}", started.elapsed());

    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for expected in ["Package: weir", "Depends:", "adduser", " postinst", " postrm", " conffiles"] {
        assert!(info.contains(expected), "{expected} not in dpkg-deb --info:\n{info}");
    }
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for expected in [
        "./usr/bin/weir",
        "/systemd/system/weir.service",
        "./etc/sysctl.d/60-weir.conf",
        "./etc/weir/weir.toml",
        "./var/lib/weir/",
        "./usr/share/weir/seccomp.json",
        "./usr/share/doc/weir/DEPLOY.md",
    ] {
        assert!(contents.lines().any(|line| line.contains(expected)), "{expected} not in the package:\n{contents}");
    }

    // Maintainer scripts: create the user, never delete the data.
    let control = output_dir.path().join("control");
    run(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(&control));
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --quiet --system --ingroup weir --home /var/lib/weir"), "{postinst}");
    assert!(postinst.contains("install -d -o weir -g weir -m 0750 /var/lib/weir"), "{postinst}");
    assert!(!postinst.contains("systemctl enable") && !postinst.contains("deb-systemd-invoke start"), "{postinst}");
    for script in ["postinst", "postrm", "prerm", "preinst"] {
        let Ok(text) = std::fs::read_to_string(control.join(script)) else { continue };
        run(Command::new("sh").arg("-n").arg(control.join(script)));
        for line in text.lines().filter(|line| !line.trim_start().starts_with('#')) {
            let removes = line.contains("rm ") || line.contains("rmdir") || line.contains("rm -");
            assert!(!(removes && line.contains("/var/lib/weir")), "{script} deletes data: {line}");
            assert!(!line.contains("deluser") && !line.contains("userdel"), "{script} deletes the user: {line}");
        }
    }
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(conffiles.lines().any(|line| line == "/etc/weir/weir.toml"), "{conffiles}");

    install_run_remove_and_purge_in_a_private_mount_namespace(&deb, output_dir.path());

    // The packaged binary runs the doctor, and the packaged config is valid.
    let root = output_dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let packaged_config = std::fs::read_to_string(root.join("etc/weir/weir.toml")).unwrap();
    assert!(packaged_config.contains("data_dir = \"/var/lib/weir\""));
    let config = output_dir.path().join("weir.toml");
    std::fs::write(
        &config,
        packaged_config
            .replace("/var/lib/weir", &output_dir.path().join("data").display().to_string())
            .replace("127.0.0.1:9464", "127.0.0.1:0"),
    )
    .unwrap();
    let output =
        Command::new(root.join("usr/bin/weir")).args(["doctor", "--json", "--config"]).arg(&config).output().unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    assert_only_the_site_pki_is_missing(&report, &output_dir.path().join("data/weir-certs").display().to_string());
}

/// Installs the package for real, with dpkg, in a mount namespace where /etc, /usr and
/// /var are overlays over the host's (so the host sees nothing): the postinst creates
/// the user and /var/lib/weir, `weir doctor` runs as that user on the installed config,
/// and neither removing nor purging the package deletes a partition in the data dir.
fn install_run_remove_and_purge_in_a_private_mount_namespace(deb: &Path, scratch: &Path) {
    let layers = scratch.join("layers");
    let script = format!(
        r#"set -e
for d in etc usr var; do
  mkdir -p {layers}/$d-upper {layers}/$d-work
  mount -t overlay overlay -o lowerdir=/$d,upperdir={layers}/$d-upper,workdir={layers}/$d-work /$d
done
dpkg -i {deb} >/dev/null
echo "user: $(id -un weir) group: $(id -gn weir)"
echo "data dir: $(stat -c '%U:%G %a' /var/lib/weir)"
cd /var/lib/weir
set +e
runuser -u weir -- /usr/bin/weir doctor --json --config /etc/weir/weir.toml > {scratch}/doctor.json
echo "doctor exit: $?"
set -e
mkdir /var/lib/weir/telemetry-0
echo records > /var/lib/weir/telemetry-0/00000000000000000000.log
dpkg -r weir >/dev/null
echo "after remove: $(cat /var/lib/weir/telemetry-0/00000000000000000000.log)"
dpkg --purge weir >/dev/null 2>&1
echo "after purge: $(cat /var/lib/weir/telemetry-0/00000000000000000000.log) user: $(id -un weir)"
"#,
        layers = layers.display(),
        deb = deb.display(),
        scratch = scratch.display()
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--fork", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    for expected in [
        "user: weir group: weir",
        "data dir: weir:weir 750",
        // The one failure: the site's PKI is not installed yet (see below).
        "doctor exit: 1",
        "after remove: records",
        "after purge: records user: weir",
    ] {
        assert!(stdout.lines().any(|line| line == expected), "{expected:?} not in:\n{stdout}");
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(scratch.join("doctor.json")).unwrap()).unwrap();
    assert_eq!(report["config"], "/etc/weir/weir.toml");
    assert_only_the_site_pki_is_missing(&report, "/var/lib/weir/weir-certs");
}

/// The packaged config never makes a development PKI: on a fresh install the doctor's
/// one failure is the site's PKI, missing from `certs_dir`, with the fix.
fn assert_only_the_site_pki_is_missing(report: &Value, certs_dir: &str) {
    let failed: Vec<&Value> =
        report["checks"].as_array().unwrap().iter().filter(|check| check["status"] == "fail").collect();
    assert_eq!(failed.len(), 1, "{report:#}");
    assert_eq!(failed[0]["name"], "certificates.files", "{report:#}");
    let saw = failed[0]["saw"].as_str().unwrap();
    assert!(saw.starts_with(&format!("missing {certs_dir}/ca.pem")), "{saw}");
    assert!(saw.contains("quic.generate_dev_certs = false"), "{saw}");
    assert!(failed[0]["fix"].as_str().unwrap().starts_with("install the site's PKI there"), "{report:#}");
}
