//! `weir doctor` on real hosts made broken for real: io_uring denied by a seccomp filter
//! this test installs, the data directory on a tmpfs it mounts, RLIMIT_MEMLOCK lowered
//! for a child without CAP_IPC_LOCK, a core that does not exist, an affinity mask that
//! hides a core, a socket buffer above `net.core.rmem_max`, an expired certificate, a
//! key that is not the certificate's, a foreign CA, and an upstream cluster that is out
//! of reach or lacks a topic (a real tansu broker). Each failing check's message and
//! fix are asserted, and `weir serve` under the same conditions exits with the same
//! message and exit code 6, not a panic. Needs root (mount, setpriv), as CI has.

#[path = "common/broker.rs"]
mod broker;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
use serde_json::Value;

const HOST_NOT_READY: i32 = weir::shell::runtime::exit_code::HOST_NOT_READY;

fn weir_path() -> &'static str {
    env!("CARGO_BIN_EXE_weir")
}

fn weir() -> Command {
    Command::new(weir_path())
}

/// A config with its data directory `data`, the admin endpoint and the QUIC listener on
/// any free port, and the certificates in `directory`/certs (absent unless the test
/// makes them: serve would then create a development PKI, a `warn`).
fn config_file(directory: &Path, data: &Path, extra: &str) -> PathBuf {
    let path = directory.join("weir.toml");
    let quic = if extra.contains("[quic]") {
        String::new()
    } else {
        format!("[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\n", directory.join("certs").display())
    };
    std::fs::write(
        &path,
        format!("data_dir = {:?}\n{extra}\n{quic}[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n", data.display()),
    )
    .unwrap();
    path
}

/// `weir certs --dir DIR` (a CA, a server certificate, one device).
fn make_certs(directory: &Path) {
    let output = weir().args(["certs", "--device", "dev-1", "--dir"]).arg(directory).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
}

fn doctor_json(mut command: Command) -> (i32, Value) {
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("doctor --json is not JSON ({error}): {stdout}\nstderr: {}", stderr(&output)));
    let code = output.status.code().expect("doctor exits, it is not killed");
    assert_eq!(report["exit_code"], code, "the report states the exit code");
    (code, report)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

fn saw(report: &Value, name: &str) -> String {
    check(report, name)["saw"].as_str().unwrap().to_owned()
}

fn fix(report: &Value, name: &str) -> String {
    check(report, name)["fix"].as_str().unwrap_or_default().to_owned()
}

fn doctor_args(config: &Path) -> Vec<String> {
    vec!["doctor".into(), "--json".into(), "--config".into(), config.display().to_string()]
}

/// `weir serve` must refuse with exit 6 and `expected` in its message, without
/// creating anything or panicking.
fn assert_serve_refuses(output: &Output, expected: &str) {
    let stderr = stderr(output);
    assert_eq!(output.status.code(), Some(HOST_NOT_READY), "{stderr}");
    assert!(stderr.contains("weir: host not ready:"), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(stderr.contains("-- fix: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_healthy_host_reports_no_fail_and_its_json_parses() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("not-yet/data");
    let config = config_file(directory.path(), &data, "");
    make_certs(&directory.path().join("certs"));
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["summary"]["fail"], 0, "{report:#}");
    let names: Vec<&str> =
        report["checks"].as_array().unwrap().iter().map(|check| check["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "config",
            "io_uring",
            "data_dir",
            "data_dir.owner",
            "data_dir.writable",
            "data_dir.filesystem",
            "data_dir.direct_io",
            "data_dir.direct_io_alignment",
            "data_dir.free_space",
            "memlock",
            "cores",
            "udp.buffers",
            "udp.gso_gro",
            "udp.reuseport_cbpf",
            "ports.quic",
            "ports.admin",
            "certificates.files",
            "certificates.chain",
            "certificates.key",
            "certificates.expiry",
            "certificates.key_mode",
            "certificates.development_ca",
            "upstream.reachable",
            "upstream.api_versions",
            "upstream.topics",
        ]
    );
    assert_eq!(check(&report, "io_uring")["status"], "ok");
    assert!(saw(&report, "io_uring").contains("all 24 opcodes glommio and weir use are supported"));
    assert!(saw(&report, "data_dir").contains("does not exist yet; it can be created"));
    assert_eq!(check(&report, "data_dir.direct_io")["status"], "ok");
    assert_eq!(check(&report, "udp.reuseport_cbpf")["status"], "ok", "{report:#}");
    // The UDP verdict follows the kernel's real caps.
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_max").unwrap().trim().parse().unwrap();
    let expected = if rmem_max.min(wmem_max) >= 8 << 20 { "ok" } else { "warn" };
    assert_eq!(check(&report, "udp.buffers")["status"], expected);
    assert!(saw(&report, "udp.buffers").contains(&format!("net.core.rmem_max = {rmem_max}")));
    if expected == "warn" {
        assert!(fix(&report, "udp.buffers").contains("sysctl -w net.core.rmem_max=8388608"));
    }
    for name in ["certificates.files", "certificates.chain", "certificates.key", "certificates.expiry"] {
        assert_eq!(check(&report, name)["status"], "ok", "{report:#}");
    }
    assert!(saw(&report, "certificates.chain").contains("chains to"), "{report:#}");
    assert!(saw(&report, "certificates.expiry").contains("(364 days)"), "{report:#}");
    // `weir certs` wrote the keys 0600; its CA is a development CA.
    assert_eq!(check(&report, "certificates.key_mode")["status"], "ok", "{report:#}");
    assert_eq!(check(&report, "certificates.development_ca")["status"], "warn", "{report:#}");
    for name in ["upstream.reachable", "upstream.api_versions", "upstream.topics"] {
        assert_eq!(check(&report, name)["status"], "skip");
        assert_eq!(saw(&report, name), "upstream.enabled = false: nothing is shipped");
    }
    // The probe leaves nothing behind: the directories it created are gone again.
    assert!(!directory.path().join("not-yet").exists());

    let output = weir().arg("doctor").arg("--config").arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.lines().any(|line| line.starts_with("ok    io_uring: rings set up")), "{text}");
    assert!(text.lines().any(|line| line.starts_with("skip  upstream.reachable: upstream.enabled = false")), "{text}");
    assert!(text.trim_end().ends_with(" 0 fail, 3 skip: ready to serve"), "{text}");
}

/// Runs `command` from a thread that first installs a seccomp filter answering
/// `io_uring_setup` with EPERM, as Docker's default profile does; the child inherits it.
fn output_with_io_uring_denied(mut command: Command) -> Output {
    std::thread::spawn(move || {
        let filter = SeccompFilter::new(
            [(libc::SYS_io_uring_setup, vec![])].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        let program: BpfProgram = filter.try_into().unwrap();
        seccompiler::apply_filter(&program).unwrap();
        command.output().unwrap()
    })
    .join()
    .unwrap()
}

#[test]
fn io_uring_denied_by_seccomp_is_named_with_the_profile_fix_and_serve_refuses() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let config = config_file(directory.path(), &data, "");
    let mut command = weir();
    command.args(doctor_args(&config));
    let output = output_with_io_uring_denied(command);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    assert_eq!(check(&report, "io_uring")["status"], "fail");
    assert!(
        saw(&report, "io_uring").starts_with("io_uring_setup: EPERM from a seccomp filter (Seccomp: 2"),
        "{}",
        saw(&report, "io_uring")
    );
    assert!(fix(&report, "io_uring").contains("--security-opt seccomp=/usr/share/weir/seccomp.json"));
    // Only io_uring fails: the other checks still tell the truth.
    assert_eq!(report["summary"]["fail"], 1, "{report:#}");
    assert_eq!(check(&report, "data_dir.direct_io")["status"], "ok");

    let mut serve = weir();
    serve.arg("serve").arg("--config").arg(&config);
    let output = output_with_io_uring_denied(serve);
    assert_serve_refuses(&output, "fail  io_uring: io_uring_setup: EPERM from a seccomp filter");
    assert!(!data.exists(), "serve refused before any core started");
}

/// A tmpfs mounted for one test, unmounted (lazily) even when the test panics.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(point: &Path) -> Tmpfs {
        std::fs::create_dir_all(point).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "weir-doctor-tmpfs"])
            .arg(point)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root");
        Tmpfs(point.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_data_dir_on_tmpfs_fails_with_the_tmpfs_message_and_serve_refuses() {
    let directory = tempfile::tempdir().unwrap();
    let point = directory.path().join("tmpfs");
    let _tmpfs = Tmpfs::mount(&point);
    let data = point.join("data");
    let config = config_file(directory.path(), &data, "");
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "data_dir.filesystem")["status"], "fail");
    let seen = saw(&report, "data_dir.filesystem");
    assert!(seen.contains(&format!("{} is on tmpfs: memory, not disk", data.display())), "{seen}");
    assert!(seen.contains("before Linux 6.6 tmpfs refuses O_DIRECT outright"), "{seen}");
    assert!(fix(&report, "data_dir.filesystem").starts_with("put data_dir on an ext4 or xfs filesystem"));
    // The O_DIRECT probe reports what this kernel really does on tmpfs (6.6+ accepts it).
    let direct_io = check(&report, "data_dir.direct_io")["status"].as_str().unwrap().to_owned();
    assert!(direct_io == "ok" || direct_io == "fail", "{report:#}");

    let output = weir().arg("serve").arg("--config").arg(&config).output().unwrap();
    assert_serve_refuses(&output, "fail  data_dir.filesystem: ");
    assert!(stderr(&output).contains("is on tmpfs: memory, not disk"));
}

/// A read-only bind mount of a directory, unmounted on drop.
struct ReadOnlyBind(PathBuf);

impl ReadOnlyBind {
    fn mount(source: &Path, point: &Path) -> ReadOnlyBind {
        std::fs::create_dir_all(point).unwrap();
        let status = Command::new("mount").arg("--bind").arg(source).arg(point).status().unwrap();
        assert!(status.success(), "a bind mount needs root");
        let bind = ReadOnlyBind(point.to_owned());
        let status = Command::new("mount").args(["-o", "remount,bind,ro"]).arg(point).status().unwrap();
        assert!(status.success(), "remounting the bind read-only");
        bind
    }
}

impl Drop for ReadOnlyBind {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_data_dir_on_a_read_only_mount_is_told_to_remount_not_to_chown_and_serve_refuses() {
    let directory = tempfile::tempdir().unwrap();
    let source = directory.path().join("source");
    std::fs::create_dir_all(source.join("data")).unwrap();
    let point = directory.path().join("read-only");
    let _bind = ReadOnlyBind::mount(&source, &point);
    assert!(std::fs::write(point.join("probe"), b"x").is_err(), "the bind is read-only");

    // The data directory exists but cannot be written.
    let data = point.join("data");
    let config = config_file(directory.path(), &data, "");
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "data_dir.writable")["status"], "fail", "{report:#}");
    let fixed = fix(&report, "data_dir.writable");
    assert!(fixed.starts_with(&format!("{} is on a read-only mount", data.display())), "{fixed}");
    assert!(fixed.contains("mount -o remount,rw"), "{fixed}");
    assert!(!fixed.contains("chown weir") && !fixed.contains("chown -R"), "{fixed}");
    let output = weir().arg("serve").arg("--config").arg(&config).output().unwrap();
    assert_serve_refuses(&output, "fail  data_dir.writable: ");
    assert!(stderr(&output).contains("is on a read-only mount"), "{}", stderr(&output));

    // The data directory does not exist and cannot be made there.
    let data = point.join("missing");
    let config = config_file(directory.path(), &data, "");
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "data_dir")["status"], "fail", "{report:#}");
    let fixed = fix(&report, "data_dir");
    assert!(fixed.starts_with(&format!("{} is on a read-only mount", data.display())), "{fixed}");
    assert!(!fixed.contains("chown weir") && !fixed.contains("chown -R"), "{fixed}");
}

/// `command` run with RLIMIT_MEMLOCK at `bytes` and without CAP_IPC_LOCK (root ignores
/// the limit otherwise).
fn with_memlock(bytes: u64, args: &[String]) -> Command {
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--memlock={bytes}:{bytes}"))
        .args(["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"])
        .arg(weir_path())
        .args(args);
    command
}

#[test]
fn memlock_below_what_glommio_needs_fails_and_below_registration_warns_without_cap_ipc_lock() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let config = config_file(directory.path(), &data, "[engine]\ncores = [0]\nio_memory_bytes = \"16 MiB\"");
    let (code, report) = doctor_json(with_memlock(256 << 10, &doctor_args(&config)));
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "memlock")["status"], "fail");
    assert_eq!(
        saw(&report, "memlock"),
        "RLIMIT_MEMLOCK is 256 KiB (hard 256 KiB): glommio refuses to start an executor below 512 KiB"
    );
    assert!(fix(&report, "memlock").contains("LimitMEMLOCK=infinity in the systemd unit"));
    assert!(fix(&report, "memlock").contains("docker run --ulimit memlock=-1"));

    let (code, report) = doctor_json(with_memlock(1 << 20, &doctor_args(&config)));
    assert_eq!(code, 0, "a warning does not fail: {report:#}");
    assert_eq!(check(&report, "memlock")["status"], "warn");
    assert!(
        saw(&report, "memlock").starts_with(
            "RLIMIT_MEMLOCK is 1 MiB without CAP_IPC_LOCK, below the 48 MiB = 1 cores x engine.io_memory_bytes 16 MiB \
             x 3 rings"
        ),
        "{}",
        saw(&report, "memlock")
    );

    let serve = ["serve".to_owned(), "--config".to_owned(), config.display().to_string()];
    let output = with_memlock(256 << 10, &serve).output().unwrap();
    assert_serve_refuses(&output, "fail  memlock: RLIMIT_MEMLOCK is 256 KiB");
}

#[test]
fn a_core_that_does_not_exist_is_a_bad_config_with_exit_2() {
    let directory = tempfile::tempdir().unwrap();
    let config = config_file(directory.path(), &directory.path().join("data"), "[engine]\ncores = [0, 4096]");
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(check(&report, "config")["status"], "fail");
    assert!(saw(&report, "config").contains("engine.cores: core 4096 does not exist"), "{report:#}");
    assert_eq!(check(&report, "cores")["status"], "fail");
    assert!(saw(&report, "cores").starts_with("engine.cores: CPU 4096 does not exist (present: 0"), "{report:#}");

    let output = weir().arg("doctor").arg("--config").arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("fail  config: invalid config"), "{text}");
    assert!(text.trim_end().ends_with("bad config: fix the fields named above"), "{text}");
}

#[test]
fn an_affinity_mask_that_hides_a_core_warns_for_all_and_fails_for_a_listed_core() {
    let online = weir::shell::sys::usable_cpus();
    // The suite runs on 2-core machines; a one-core host cannot show a hidden core.
    assert!(online.len() >= 2, "this test needs two usable CPUs; this host has {online:?}");
    let first = *online.iter().next().unwrap();
    let second = *online.iter().nth(1).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let config = config_file(directory.path(), &data, "");
    let mut command = Command::new("taskset");
    command.arg("-c").arg(first.to_string()).arg(weir_path()).args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(check(&report, "cores")["status"], "warn");
    assert!(
        saw(&report, "cores").starts_with(&format!("engine.cores = \"all\" resolves to CPUs {first} only")),
        "{report:#}"
    );
    assert!(fix(&report, "cores").contains("CPUAffinity="));

    let config = config_file(directory.path(), &data, &format!("[engine]\ncores = [{second}]"));
    let mut command = Command::new("taskset");
    command.arg("-c").arg(first.to_string()).arg(weir_path()).args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 2, "{report:#}");
    assert!(
        saw(&report, "cores")
            .contains(&format!("CPU {second} is online but this process's affinity mask ({first}) excludes it")),
        "{report:#}"
    );
}

#[test]
fn measure_shows_the_disk_ceiling_next_to_the_flush_window_with_a_suggestion() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    // The largest window the config allows, far above any NVMe or virtio fdatasync (even
    // on a busy CI disk): the doctor must suggest lowering it.
    let config = config_file(directory.path(), &data, "[log]\nflush_delay_us_max = \"1 s\"");
    let mut command = weir();
    command.args(doctor_args(&config)).arg("--measure");
    let (code, report) = doctor_json(command);
    assert_eq!(code, 0, "{report:#}");
    let seen = saw(&report, "measure.disk");
    assert!(seen.contains("O_DIRECT writes of 1 MiB each followed by fdatasync"), "{seen}");
    assert!(seen.contains(" MB/s; fdatasync p50 ") && seen.contains("log.flush_delay_us_max is 1000000 us"), "{seen}");
    assert_eq!(check(&report, "measure.disk")["status"], "warn", "{seen}");
    assert!(fix(&report, "measure.disk").starts_with("suggest log.flush_delay_us_max = "), "{report:#}");
    // The loopback QUIC ceiling (shell::quic_ceiling, weir-bench ingest's server), with
    // a measured rate above zero, next to the QUIC config.
    let network = saw(&report, "measure.network");
    assert_eq!(check(&report, "measure.network")["status"], "ok", "{network}");
    assert!(network.starts_with("loopback QUIC ceiling (weir's TLS and quinn-proto driver"), "{network}");
    let rate: f64 = network.split("): ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(rate > 0.0 && network.contains(" records/s of 256 B "), "{network}");
    assert!(network.contains("quic.connections_max 10000"), "{network}");
    let leftovers: Vec<_> =
        std::fs::read_dir(directory.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["weir.toml"], "the measurement removes its file and directory");
}

// ---------------------------------------------------------------------------------------
// UDP buffers against the kernel's caps

#[test]
fn a_socket_buffer_above_rmem_max_warns_with_what_the_socket_really_got_and_the_sysctl() {
    let rmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
    let asked = (2 * rmem_max).clamp(64 << 10, 1 << 30);
    assert!(asked > rmem_max, "this host's rmem_max ({rmem_max}) is above what the config may ask for");
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let config = config_file(
        directory.path(),
        &data,
        &format!(
            "[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\nsocket_receive_buffer_bytes = {asked}\n\
             socket_send_buffer_bytes = \"64 KiB\"",
            directory.path().join("certs").display()
        ),
    );
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 0, "a warning does not fail: {report:#}");
    assert_eq!(check(&report, "udp.buffers")["status"], "warn", "{report:#}");
    let seen = saw(&report, "udp.buffers");
    let text = weir::doctor::verdict::bytes_text;
    assert!(
        seen.starts_with(&format!(
            "quic.socket_receive_buffer_bytes = {} and quic.socket_send_buffer_bytes = 64 KiB; net.core.rmem_max = \
             {rmem_max}",
            text(asked)
        )),
        "{seen}"
    );
    // What a real socket was granted: the kernel's cap, not what was asked.
    assert!(seen.contains(&format!("; a UDP socket asking for them got {} and 64 KiB", text(rmem_max))), "{seen}");
    assert!(seen.contains("the kernel silently caps SO_RCVBUF/SO_SNDBUF below what the config asks for"), "{seen}");
    assert!(
        fix(&report, "udp.buffers")
            .starts_with(&format!("sysctl -w net.core.rmem_max={asked} and persist it in /etc/sysctl.d/60-weir.conf")),
        "{report:#}"
    );

    // serve asks its QUIC sockets for the same buffers, gets the same cap, says so, and
    // serves anyway (a warning, not a refusal).
    let mut child = weir()
        .args(["serve", "--cores", "1", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let (sender, receiver) = std::sync::mpsc::channel();
    // Read stderr to its end (serve must not write into a closed pipe).
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let mut capped = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Ok(line) = receiver.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
        if line.contains("the kernel capped the QUIC socket buffers") {
            capped = Some(line.clone());
        }
        if line.contains("weir serving") || line.starts_with("weir: ") {
            break;
        }
    }
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status = child.wait().unwrap();
    let capped = capped.expect("serve warns that the kernel capped the socket buffers");
    assert!(capped.contains(&format!("receive_asked={asked} receive_granted={rmem_max}")), "{capped}");
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// Certificates

/// Replaces `certs`/server.pem and server.key with a certificate from the same CA whose
/// validity ended `days_ago` days ago.
fn install_expired_server_certificate(certs: &Path, days_ago: u64) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(certs.join("ca.pem")).unwrap(), ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(400 * 86_400)).into();
    params.not_after = (now - std::time::Duration::from_secs(days_ago * 86_400 + 3600)).into();
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(certs.join("server.pem"), certificate.pem()).unwrap();
    std::fs::write(certs.join("server.key"), key.serialize_pem()).unwrap();
}

fn serve_output(config: &Path) -> Output {
    weir().arg("serve").arg("--config").arg(config).output().unwrap()
}

#[test]
fn an_expired_certificate_fails_with_the_reissue_fix_and_serve_refuses() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let config = config_file(directory.path(), &data, "");
    let certs = directory.path().join("certs");
    make_certs(&certs);
    install_expired_server_certificate(&certs, 3);
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["summary"]["fail"], 1, "only the expiry fails: {report:#}");
    // The chain and the key are still right: the expiry is reported once.
    assert_eq!(check(&report, "certificates.chain")["status"], "ok", "{report:#}");
    assert_eq!(check(&report, "certificates.key")["status"], "ok", "{report:#}");
    assert_eq!(check(&report, "certificates.expiry")["status"], "fail");
    let seen = saw(&report, "certificates.expiry");
    assert!(seen.starts_with(&format!("{}/server.pem expired on ", certs.display())), "{seen}");
    assert!(seen.ends_with("(3 days ago)"), "{seen}");
    assert!(fix(&report, "certificates.expiry").starts_with("issue a new certificate and install it"), "{report:#}");

    let output = serve_output(&config);
    assert_serve_refuses(&output, &format!("fail  certificates.expiry: {}/server.pem expired on ", certs.display()));
    assert!(!data.exists(), "serve refused before any core started");
}

#[test]
fn a_key_that_is_not_the_certificates_and_a_foreign_ca_fail_and_serve_refuses() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let config = config_file(directory.path(), &data, "");
    let certs = directory.path().join("certs");
    let other = directory.path().join("other-pki");
    make_certs(&certs);
    make_certs(&other);
    let own_key = std::fs::read(certs.join("server.key")).unwrap();
    std::fs::copy(other.join("server.key"), certs.join("server.key")).unwrap();
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "certificates.key")["status"], "fail", "{report:#}");
    let seen = saw(&report, "certificates.key");
    assert!(
        seen.starts_with(&format!(
            "{0}/server.key does not belong to the certificate in {0}/server.pem",
            certs.display()
        )),
        "{seen}"
    );
    assert!(fix(&report, "certificates.key").starts_with("install the key the certificate was issued for"));
    assert_serve_refuses(&serve_output(&config), "fail  certificates.key: ");

    std::fs::write(certs.join("server.key"), own_key).unwrap();
    std::fs::copy(other.join("ca.pem"), certs.join("ca.pem")).unwrap();
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["summary"]["fail"], 1, "{report:#}");
    assert_eq!(check(&report, "certificates.chain")["status"], "fail", "{report:#}");
    let seen = saw(&report, "certificates.chain");
    // Both development CAs have the same name: only the signature tells them apart.
    assert!(
        seen.contains(&format!(
            "does not chain to {0}/ca.pem: {0}/ca.pem holds a CA with its issuer's name (CN=weir development CA, \
             O=weir development PKI) but the signature does not verify with that CA's key: a different CA of the same \
             name; devices will refuse the handshake",
            certs.display()
        )),
        "{seen}"
    );
    assert!(fix(&report, "certificates.chain").starts_with("put the CA that issued server.pem in"));
    assert_serve_refuses(&serve_output(&config), "fail  certificates.chain: ");
}

#[test]
fn missing_certificates_fail_when_serve_may_not_make_a_development_pki() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let certs = directory.path().join("nowhere");
    let extra =
        format!("[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\ngenerate_dev_certs = false", certs.display());
    let config = config_file(directory.path(), &data, &extra);
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        saw(&report, "certificates.files"),
        format!(
            "missing {0}/ca.pem, {0}/server.pem, {0}/server.key (quic.generate_dev_certs = false): serve cannot start \
             the QUIC listener",
            certs.display()
        )
    );
    assert_serve_refuses(&serve_output(&config), "fail  certificates.files: missing ");
}

// ---------------------------------------------------------------------------------------
// Upstream, against a real tansu broker

fn upstream_config(directory: &Path, bootstrap: &[String], mapping: &str) -> PathBuf {
    let servers: Vec<String> = bootstrap.iter().map(|server| format!("{server:?}")).collect();
    config_file(
        directory,
        &directory.join("data"),
        &format!(
            "[upstream]\nenabled = true\nbootstrap_servers = [{}]\nconnect_timeout_ms = 2000\nrequest_timeout_ms = \
             5000\n{mapping}\n[[topics]]\nname = \"telemetry\"\npartitions = 4\n[[topics]]\nname = \"audit\"\n\
             partitions = 1",
            servers.join(", ")
        ),
    )
}

const MAPPING: &str = "[[upstream.topics]]\nedge = \"telemetry\"\nupstream = \"central\"\n[[upstream.topics]]\n\
                       edge = \"audit\"\nupstream = \"central-audit\"";

#[test]
fn a_healthy_upstream_is_reachable_answers_api_versions_and_has_the_topics() {
    let tansu = broker::Tansu::start();
    tansu.create_topic("central", 4);
    tansu.create_topic("central-audit", 1);
    let directory = tempfile::tempdir().unwrap();
    let config = upstream_config(directory.path(), &[tansu.address()], MAPPING);
    let mut command = weir();
    command.args(doctor_args(&config));
    let (_, report) = doctor_json(command);
    for name in ["upstream.reachable", "upstream.api_versions", "upstream.topics"] {
        assert_eq!(check(&report, name)["status"], "ok", "{report:#}");
    }
    let address = tansu.address();
    assert_eq!(saw(&report, "upstream.reachable"), format!("{address}: connected"));
    let versions = saw(&report, "upstream.api_versions");
    assert!(versions.starts_with(&format!("{address}: connected and answered ApiVersions in ")), "{versions}");
    assert!(versions.contains("; weir will speak ApiVersions v") && versions.contains(", Produce v"), "{versions}");
    assert_eq!(
        saw(&report, "upstream.topics"),
        format!(
            "{address}: central: 4 partitions (edge telemetry has 4); central-audit: 1 partitions (edge audit has 1)"
        )
    );
}

#[test]
fn an_unreachable_bootstrap_server_fails_and_one_of_two_warns() {
    let tansu = broker::Tansu::start();
    tansu.create_topic("central", 4);
    tansu.create_topic("central-audit", 1);
    let nobody = format!("127.0.0.1:{}", broker::free_port());
    let directory = tempfile::tempdir().unwrap();
    let config = upstream_config(directory.path(), std::slice::from_ref(&nobody), MAPPING);
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "upstream.reachable")["status"], "fail");
    let seen = saw(&report, "upstream.reachable");
    assert!(seen.starts_with(&format!("{nobody}: no TCP connection (")), "{seen}");
    assert!(seen.ends_with(": no bootstrap server is reachable, nothing can ship"), "{seen}");
    assert!(fix(&report, "upstream.reachable").starts_with(&format!("check that a broker listens at {nobody}")));
    assert_eq!(check(&report, "upstream.api_versions")["status"], "skip");
    assert_eq!(check(&report, "upstream.topics")["status"], "skip");
    // serve does not refuse over it: an unreachable cluster is ridden out, not fatal.
    // (Not started here: the preflight list is asserted by the serve tests above.)

    let config = upstream_config(directory.path(), &[nobody.clone(), tansu.address()], MAPPING);
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(check(&report, "upstream.reachable")["status"], "warn", "{report:#}");
    assert!(saw(&report, "upstream.reachable").ends_with("shipping works through the others"));
    assert_eq!(check(&report, "upstream.topics")["status"], "ok", "{report:#}");
}

#[test]
fn a_missing_topic_and_too_few_partitions_fail_with_the_kafka_topics_command() {
    let tansu = broker::Tansu::start();
    tansu.create_topic("central", 2);
    let directory = tempfile::tempdir().unwrap();
    let config = upstream_config(directory.path(), &[tansu.address()], MAPPING);
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "upstream.reachable")["status"], "ok", "{report:#}");
    assert_eq!(check(&report, "upstream.topics")["status"], "fail", "{report:#}");
    let address = tansu.address();
    assert_eq!(
        saw(&report, "upstream.topics"),
        format!(
            "{address}: topic central has 2 partitions, fewer than the 4 it needs (edge telemetry has 4; edge \
             partition p ships to upstream partition p); topic central-audit does not exist (edge audit has 1 \
             partitions)"
        )
    );
    assert_eq!(
        fix(&report, "upstream.topics"),
        format!(
            "kafka-topics.sh --bootstrap-server {address} --alter --topic central --partitions 4; kafka-topics.sh \
             --bootstrap-server {address} --create --topic central-audit --partitions 1"
        )
    );
}

#[test]
fn a_private_key_readable_by_others_fails_the_doctor_and_serve_logs_it_but_serves() {
    use std::os::unix::fs::PermissionsExt;
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let config = config_file(directory.path(), &data, "");
    let certs = directory.path().join("certs");
    make_certs(&certs);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&certs), 0o700);
    assert_eq!(mode(&certs.join("server.key")), 0o600);
    assert_eq!(mode(&certs.join("devices/dev-1.key")), 0o600);
    // What an older weir wrote, or `chmod 0644` by hand.
    let key = certs.join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["summary"]["fail"], 1, "only the key mode fails: {report:#}");
    assert_eq!(check(&report, "certificates.key_mode")["status"], "fail");
    let seen = saw(&report, "certificates.key_mode");
    assert!(seen.contains(&format!("{} is 0644 (group and others have access)", key.display())), "{seen}");
    assert!(fix(&report, "certificates.key_mode").starts_with(&format!("chmod 0600 {}", key.display())));

    // serve does not refuse over it (that would keep a running site down after an
    // upgrade): it logs the failure with the fix, and serves.
    let mut serve = weir()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--cores", "1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(serve.stderr.take().unwrap()));
    let mut seen_lines = Vec::new();
    loop {
        let line = lines.next().expect("serve logs until it serves").unwrap();
        let serving = line.contains("weir serving");
        seen_lines.push(line);
        if serving {
            break;
        }
    }
    Command::new("kill").args(["-TERM", &serve.id().to_string()]).status().unwrap();
    assert_eq!(serve.wait().unwrap().code(), Some(0));
    let logged = seen_lines.iter().find(|line| line.contains("certificates.key_mode")).expect("the key mode is logged");
    assert!(logged.contains("ERROR") && logged.contains("chmod 0600"), "{logged}");

    // Fixed, the check passes.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!((code, check(&report, "certificates.key_mode")["status"].as_str()), (0, Some("ok")), "{report:#}");
}

/// A port free now on loopback (bound to port 0 and let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_weir_already_on_the_ports_is_named_and_told_apart_from_another_program() {
    let directory = tempfile::tempdir().unwrap();
    let (quic_port, admin_port) = (free_port(), free_port());
    let ports = format!(
        "[quic]\nlisten = \"127.0.0.1:{quic_port}\"\ncerts_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n",
        directory.path().join("certs").display()
    );
    let write = |name: &str, data: &Path| {
        let path = directory.path().join(name);
        std::fs::write(&path, format!("data_dir = {:?}\n{ports}", data.display())).unwrap();
        path
    };
    let config = write("weir.toml", &directory.path().join("data"));

    // Nothing there yet.
    let mut command = weir();
    command.args(doctor_args(&config));
    let (_, report) = doctor_json(command);
    assert_eq!(check(&report, "ports.quic")["status"], "ok", "{report:#}");
    assert_eq!(saw(&report, "ports.quic"), format!("UDP 127.0.0.1:{quic_port} is free"));
    assert_eq!(check(&report, "ports.admin")["status"], "ok", "{report:#}");

    let mut serve = weir()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--cores", "1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = serve.id();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(serve.stderr.take().unwrap()));
    while !lines.next().expect("serve logs until it serves").unwrap().contains("weir serving") {}

    // The same config: this weir is running (warn, naming it).
    let mut command = weir();
    command.args(doctor_args(&config));
    let (_, report) = doctor_json(command);
    for name in ["ports.quic", "ports.admin"] {
        assert_eq!(check(&report, name)["status"], "warn", "{report:#}");
    }
    assert_eq!(
        saw(&report, "ports.quic"),
        format!(
            "weir (PID {pid}) already listens on UDP 127.0.0.1:{quic_port}: it is the weir serving this config's \
             data_dir, so this weir is running"
        )
    );
    assert!(saw(&report, "ports.admin").starts_with(&format!("weir (PID {pid}) already listens on TCP")));

    // Another data directory on the same ports: another weir holds them (fail).
    let other = write("other.toml", &directory.path().join("other-data"));
    let mut command = weir();
    command.args(doctor_args(&other));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "ports.quic")["status"], "fail", "{report:#}");
    assert!(
        saw(&report, "ports.quic").contains(&format!("another weir (PID {pid}, not the one serving this data_dir)"))
    );
    assert!(saw(&report, "ports.quic").contains("SO_REUSEPORT"), "{report:#}");
    assert_eq!(
        fix(&report, "ports.admin"),
        format!("stop it (`kill {pid}`), or set admin.listen to a port of its own")
    );

    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert_eq!(serve.wait().unwrap().code(), Some(0));

    // A program that is not weir (this test) on the QUIC port.
    let holder = std::net::UdpSocket::bind(("127.0.0.1", quic_port)).unwrap();
    let mut command = weir();
    command.args(doctor_args(&config));
    let (code, report) = doctor_json(command);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "ports.quic")["status"], "fail", "{report:#}");
    let seen = saw(&report, "ports.quic");
    assert!(seen.starts_with(&format!("UDP 127.0.0.1:{quic_port} is in use by ")), "{seen}");
    assert!(seen.contains(&format!("(PID {})", std::process::id())), "{seen}");
    assert_eq!(check(&report, "ports.admin")["status"], "ok", "the admin port is free again: {report:#}");
    drop(holder);
}
