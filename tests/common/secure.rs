//! Real peers for the upstream security tests, all on loopback:
//! - `Stunnel`: Debian's stunnel4 (OpenSSL) terminating TLS in front of a port, with
//!   the client certificate required and verified against a CA (tansu 0.6 has no TLS
//!   of its own: its --cert/--key are parsed and never used);
//! - `SaslProxy`: tests/python/sasl_proxy.py, which answers SaslHandshake /
//!   SaslAuthenticate with the independent `scramp` SCRAM server (and PLAIN), then
//!   relays to the broker (tansu 0.6 offers SCRAM only with users it cannot create
//!   under its memory storage, and no PLAIN).
//!
//! Every process stops on Drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
}

/// A development PKI made by `weir certs` code (rcgen): `ca.pem`, `server.pem` +
/// `server.key` (for localhost, 127.0.0.1 and `broker.weir.test`),
/// `devices/weir-shipper.pem` + `.key` (a client certificate).
pub struct Pki {
    pub directory: PathBuf,
}

pub const BROKER_NAME: &str = "broker.weir.test";

impl Pki {
    pub fn new(directory: &Path) -> Pki {
        weir::certs::generate(directory, &[BROKER_NAME.to_owned()], &["weir-shipper".to_owned()], 2)
            .expect("the test PKI is made");
        Pki { directory: directory.to_owned() }
    }
    pub fn ca(&self) -> PathBuf {
        self.directory.join("ca.pem")
    }
    pub fn server_certificate(&self) -> PathBuf {
        self.directory.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.directory.join("server.key")
    }
    pub fn client_certificate(&self) -> PathBuf {
        self.directory.join("devices/weir-shipper.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.directory.join("devices/weir-shipper.key")
    }
}

/// A self-signed CA of another name than the test PKI's (made with rcgen): `ca.pem`
/// in `directory`. Nothing the test PKI issued chains to it.
pub fn unrelated_ca(directory: &Path) -> PathBuf {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "some other CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let key = rcgen::KeyPair::generate().unwrap();
    let certificate = params.self_signed(&key).unwrap();
    std::fs::create_dir_all(directory).unwrap();
    let path = directory.join("ca.pem");
    std::fs::write(&path, certificate.pem()).unwrap();
    path
}

/// stunnel in server mode: TLS on `port`, plain TCP to `target_port`, client
/// certificates required and checked against the PKI's CA.
pub struct Stunnel {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl Stunnel {
    pub fn start(pki: &Pki, port: u16, target_port: u16, directory: &Path) -> Stunnel {
        let config = directory.join("stunnel.conf");
        let log = directory.join("stunnel.log");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\nsyslog = no\ndebug = info\noutput = {log}\n\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target_port}\ncert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\nrequireCert = yes\n",
                log = log.display(),
                cert = pki.server_certificate().display(),
                key = pki.server_key().display(),
                ca = pki.ca().display(),
            ),
        )
        .unwrap();
        let child = Command::new("stunnel4")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel4 starts (tools/install-broker installs it)");
        let stunnel = Stunnel { child: Some(child), port, log };
        wait_for_port(port, Duration::from_secs(20));
        stunnel
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// tests/python/sasl_proxy.py in front of `target_port`.
pub struct SaslProxy {
    child: Option<Child>,
    pub port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl SaslProxy {
    /// `users`: (name, password); `forge`: answer SCRAM with a wrong server signature.
    pub fn start(target_port: u16, users: &[(&str, &str)], forge: bool) -> SaslProxy {
        SaslProxy::start_offering(target_port, users, forge, "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512")
    }

    /// `start`, offering only `mechanisms` (comma-separated Kafka names).
    pub fn start_offering(target_port: u16, users: &[(&str, &str)], forge: bool, mechanisms: &str) -> SaslProxy {
        let mut arguments = vec!["--mechanisms".to_owned(), mechanisms.to_owned()];
        if forge {
            arguments.push("--forge-server-signature".to_owned());
        }
        SaslProxy::start_with(target_port, users, &arguments)
    }

    /// The proxy with extra command-line `arguments` (see tests/python/sasl_proxy.py).
    pub fn start_with(target_port: u16, users: &[(&str, &str)], arguments: &[String]) -> SaslProxy {
        let mut command = Command::new(crate::broker::python());
        command.arg(repo().join("tests/python/sasl_proxy.py")).args(["--target", &target_port.to_string()]);
        command.args(arguments);
        for (name, password) in users {
            command.args(["--user", &format!("{name}:{password}")]);
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("the SASL proxy starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let port: u16 = first
            .strip_prefix("listening ")
            .and_then(|port| port.trim().parse().ok())
            .unwrap_or_else(|| panic!("the SASL proxy said {first:?}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect(stdout, lines.clone());
        SaslProxy { child: Some(child), port, lines }
    }

    /// The proxy's "authenticated ..." / "refused ..." / "session expired" lines so far.
    pub fn events(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

fn collect(stdout: BufReader<ChildStdout>, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    });
}

impl Drop for SaslProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
