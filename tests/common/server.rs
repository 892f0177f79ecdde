//! A real `weir serve` as a child process: started on a config, ready once it logs
//! "weir serving"; its stderr is echoed and kept for assertions; the admin endpoint is
//! reached with plain HTTP/1.0 over TCP. Killed on Drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

pub struct Server {
    child: Child,
    /// host:port of the admin endpoint.
    pub admin: String,
    /// host:port of the QUIC listener, when enabled.
    pub quic: Option<String>,
    /// host:port of the Kafka API, when enabled.
    pub kafka: Option<String>,
    lines: Arc<Mutex<Vec<String>>>,
}

fn field_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(key)?;
    line[at + key.len()..].split_whitespace().next()
}

impl Server {
    pub fn start(config: &Path, cores: usize) -> Server {
        Server::start_with(config, cores, &[])
    }

    /// `weir serve` with `args` after its config and cores.
    pub fn start_with(config: &Path, cores: usize, args: &[&str]) -> Server {
        let mut child = weir()
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--cores")
            .arg(cores.to_string())
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("weir: {line}");
                kept.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut admin, mut quic, mut kafka) = (None, None, None);
        while Instant::now() < deadline {
            for line in lines.lock().unwrap().iter() {
                if let Some(address) = field_after(line, "admin=http://") {
                    admin = Some(address.to_owned());
                }
                if let Some(address) = field_after(line, "quic=").filter(|address| *address != "disabled") {
                    quic = Some(address.to_owned());
                }
                if let Some(address) = field_after(line, "kafka_api=").filter(|address| *address != "disabled") {
                    kafka = Some(address.to_owned());
                }
                if line.contains("weir serving") {
                    let admin = admin.clone().expect("the admin address is logged");
                    return Server { child, admin, quic, kafka, lines: lines.clone() };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("weir serve exited with {status} before serving");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("weir did not start serving within 30 s");
    }

    /// GET `path` on the admin endpoint: (HTTP status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin, path)
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.get("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Polls /status until `ready` holds for it, for at most `timeout`.
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if ready(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}: not reached within {timeout:?}; last /status: {status:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `weir serve` process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The aioquic device (`tests/python/aioquic_device.py`, an independent QUIC stack)
    /// as `device`, with its certificate from `certs` (a `weir certs` directory), pointed
    /// at this server's QUIC listener, its output unbuffered; the caller adds what it
    /// sends.
    pub fn aioquic_device(&self, certs: &Path, device: &str) -> Command {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = std::env::var_os("WEIR_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| repo.join(".venv/bin/python"));
        let mut command = Command::new(python);
        command
            .arg("-u")
            .arg(repo.join("tests/python/aioquic_device.py"))
            .args(["--server", self.quic.as_deref().expect("QUIC is on"), "--ca"])
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join(format!("devices/{device}.pem")))
            .arg("--key")
            .arg(certs.join(format!("devices/{device}.key")));
        command
    }

    /// Sends `signal` (a name for kill(1): HUP, TERM, USR1, ...) to weir.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -s {signal} failed");
    }

    /// Waits until a log line satisfies `found` (at most `timeout`); returns it.
    pub fn wait_log(&self, timeout: Duration, what: &str, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|line| found(line)) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "{what}: no such log line within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for weir to exit by itself (after a signal the test sent).
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// SIGINT, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        Command::new("kill").arg("-INT").arg(self.child.id().to_string()).status().unwrap();
        self.child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: weir\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

/// The partition `topic`-`partition` in a /status document.
pub fn partition<'a>(status: &'a serde_json::Value, topic: &str, partition: u64) -> &'a serde_json::Value {
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["topic"] == topic && entry["partition"] == partition)
        .unwrap_or_else(|| panic!("no {topic}-{partition} in {status}"))
}
