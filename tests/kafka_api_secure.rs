//! The Kafka API's security against real clients (confluent-kafka, kafka-python, kcat)
//! while weir-sim devices write over QUIC: with mTLS every client reads every
//! acknowledged record exactly as the segment files hold it, and a client without a
//! certificate, or with one another CA signed, is refused and reads nothing; garbage
//! in place of a TLS handshake, and a handshake that never comes, close only their
//! own connection.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use appliance::Appliance;
use serde_json::{json, Value};
use server::{weir, Server};

const TOPIC: &str = "telemetry";
const PARTITIONS: u32 = 4;

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_weir")).with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (tools/test does)", path.display());
    path
}

fn python(script: &str) -> Command {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("WEIR_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo.join(".venv/bin/python"));
    let mut command = Command::new(python);
    command.arg("-u").arg(repo.join("tests/python").join(script));
    command
}

/// A Kafka PKI made with weir's certs helpers (rcgen): `ca.pem`, `server.pem` +
/// `server.key` (for localhost and 127.0.0.1), and a client certificate per name in
/// `clients/NAME.pem` + `.key` (the subject CN is the name).
struct Pki {
    directory: PathBuf,
}

impl Pki {
    fn new(directory: &Path, clients: &[&str]) -> Pki {
        let clients: Vec<String> = clients.iter().map(|name| (*name).to_owned()).collect();
        weir::certs::generate(directory, &[], &clients, 2).expect("the test PKI is made");
        Pki { directory: directory.to_owned() }
    }
    fn path(&self, name: &str) -> String {
        self.directory.join(name).display().to_string()
    }
    fn ca(&self) -> String {
        self.path("ca.pem")
    }
    /// confluent-kafka / kcat settings for TLS, with `client`'s certificate if any.
    fn librdkafka(&self, client: Option<&str>) -> Value {
        let mut settings = json!({"security.protocol": "ssl", "ssl.ca.location": self.ca()});
        if let Some(client) = client {
            settings["ssl.certificate.location"] = json!(self.path(&format!("devices/{client}.pem")));
            settings["ssl.key.location"] = json!(self.path(&format!("devices/{client}.key")));
        }
        settings
    }
    /// kafka-python settings for TLS, with `client`'s certificate if any.
    fn kafka_python(&self, client: Option<&str>) -> Value {
        let mut settings = json!({"security_protocol": "SSL", "ssl_cafile": self.ca()});
        if let Some(client) = client {
            settings["ssl_certfile"] = json!(self.path(&format!("devices/{client}.pem")));
            settings["ssl_keyfile"] = json!(self.path(&format!("devices/{client}.key")));
        }
        settings
    }
}

/// `weir serve` with two cores, devices' PKI in `root/certs`, and `kafka_api` (lines of
/// the `[kafka_api]` table) and `more` (whole tables) in its config.
fn start(root: &Path, kafka_api: &str, more: &str) -> Appliance {
    let devices = weir()
        .args(["certs", "--device-count", "16", "--device-prefix", "sim-", "--dir"])
        .arg(root.join("certs"))
        .output()
        .unwrap();
    assert!(devices.status.success(), "{}", String::from_utf8_lossy(&devices.stderr));
    let config = root.join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\n\
             generate_dev_certs = false\n[[topics]]\nname = \"{TOPIC}\"\npartitions = {PARTITIONS}\n\
             [[topics]]\nname = \"secret\"\npartitions = 1\n\
             [kafka_api]\nlisten = \"127.0.0.1:0\"\n{kafka_api}\n{more}\n",
            root.join("data").display(),
            root.join("certs").display()
        ),
    )
    .unwrap();
    let server = Server::start(&config, 2);
    let quic = server.quic.clone().expect("the QUIC address is logged");
    Appliance { server, quic, root: root.to_owned() }
}

fn kafka(appliance: &Appliance) -> String {
    appliance.server.kafka.clone().expect("the Kafka API address is logged")
}

/// weir-sim devices write for a few seconds; the end offset of every partition.
fn simulate(appliance: &Appliance) -> BTreeMap<u32, i64> {
    let acked_log = appliance.root.join("acked.log");
    let sim = Command::new(binary("weir-sim"))
        .args(["--server", &appliance.quic, "--devices", "16", "--rate", "25", "--seconds", "3"])
        .args(["--record-bytes", "40", "--certs"])
        .arg(appliance.certs())
        .arg("--acked-log")
        .arg(&acked_log)
        .output()
        .unwrap();
    assert!(sim.status.success(), "weir-sim failed: {}", String::from_utf8_lossy(&sim.stderr));
    let mut ends: BTreeMap<u32, i64> = (0..PARTITIONS).map(|partition| (partition, 0)).collect();
    let mut acked = 0;
    for line in std::fs::read_to_string(&acked_log).unwrap().lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (partition, offset): (u32, i64) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        let end = ends.get_mut(&partition).unwrap();
        *end = (*end).max(offset + 1);
        acked += 1;
    }
    assert!(acked > 50, "weir-sim acknowledged only {acked} records");
    let ends_json: BTreeMap<String, i64> = ends.iter().map(|(partition, end)| (partition.to_string(), *end)).collect();
    std::fs::write(appliance.root.join("ends.json"), serde_json::to_string(&ends_json).unwrap()).unwrap();
    ends
}

fn records_of(output: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(output).lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn by_place(records: Vec<Value>) -> BTreeMap<(u64, i64), Value> {
    let mut places = BTreeMap::new();
    for record in records {
        let place = (record["partition"].as_u64().unwrap(), record["offset"].as_i64().unwrap());
        assert!(places.insert(place, record).is_none(), "{place:?} read twice");
    }
    places
}

/// Every stored record below `ends`, read from the segment files (the oracle).
fn stored(appliance: &Appliance, ends: &BTreeMap<u32, i64>) -> BTreeMap<(u64, i64), Value> {
    let output = python("kafka_api_read.py")
        .arg("segments")
        .arg(appliance.root.join("data"))
        .args([TOPIC, &PARTITIONS.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    by_place(records_of(&output.stdout))
        .into_iter()
        .filter(|((partition, offset), _)| *offset < ends[&(*partition as u32)])
        .collect()
}

/// A reading client (`confluent`, `kafka-python`, `group`) started in the background.
fn reader(mode: &str, kafka: &str, root: &Path, security: &Value, group: Option<&str>) -> Child {
    let mut command = python("kafka_api_secure.py");
    command.args([mode, kafka, TOPIC]);
    match group {
        Some(group) => command.arg(group),
        None => command.arg(PARTITIONS.to_string()),
    };
    command
        .arg(root.join("ends.json"))
        .arg(security.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(name: &str, child: Child) -> BTreeMap<(u64, i64), Value> {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    by_place(records_of(&output.stdout))
}

/// What a confluent-kafka consumer that should be refused saw: (first error, records).
fn refused(kafka: &str, security: &Value, topic: &str) -> (String, u64) {
    let output = python("kafka_api_secure.py").args(["refused", kafka, topic, &security.to_string()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    (seen["error"].as_str().unwrap_or_default().to_owned(), seen["records"].as_u64().unwrap())
}

/// kcat with `security` (librdkafka settings): every record of the topic, then exit.
fn kcat(kafka: &str, security: &Value) -> std::process::Output {
    let mut command = Command::new("kcat");
    command.args(["-C", "-b", kafka, "-t", TOPIC, "-o", "beginning", "-e", "-q", "-X", "check.crcs=true"]);
    for (name, value) in security.as_object().unwrap() {
        command.args(["-X", &format!("{name}={}", value.as_str().unwrap())]);
    }
    command.args(["-f", "%p %o %k|%s\n"]).output().unwrap()
}

fn unhex(text: &str) -> String {
    let bytes: Vec<u8> =
        (0..text.len()).step_by(2).map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap()).collect();
    String::from_utf8(bytes).unwrap()
}

/// kcat's lines hold exactly the stored records (partition, offset, key, value).
fn assert_kcat_read_everything(output: &std::process::Output, stored: &BTreeMap<(u64, i64), Value>) {
    assert!(output.status.success(), "kcat: {}", String::from_utf8_lossy(&output.stderr));
    let mut places = BTreeSet::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let (fields, value) = line.split_once('|').unwrap();
        let fields: Vec<&str> = fields.split(' ').collect();
        let place = (fields[0].parse::<u64>().unwrap(), fields[1].parse::<i64>().unwrap());
        let Some(record) = stored.get(&place) else { continue }; // written after the ends
        assert_eq!(fields[2], unhex(record["key"].as_str().unwrap()), "kcat key at {place:?}");
        assert_eq!(value, unhex(record["value"].as_str().unwrap()), "kcat value at {place:?}");
        places.insert(place);
    }
    assert_eq!(places.len(), stored.len(), "kcat read every stored record");
}

fn assert_read_exactly(name: &str, read: &BTreeMap<(u64, i64), Value>, stored: &BTreeMap<(u64, i64), Value>) {
    let read: BTreeMap<_, _> = read.iter().filter(|(place, _)| stored.contains_key(place)).collect();
    assert_eq!(read.len(), stored.len(), "{name} read every stored record");
    for (place, record) in read {
        assert_eq!(record, &stored[place], "{name} at {place:?}");
    }
}

const TLS_CONFIG: &str = "authentication_ms_max = 3000\n";

fn tls_table(pki: &Pki) -> String {
    format!(
        "[kafka_api.tls]\nenabled = true\ncertificate_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.ca()
    )
}

#[test]
fn mtls_clients_read_every_acknowledged_record_and_clients_without_a_trusted_certificate_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(&root.join("kafka-pki"), &["dashboard"]);
    let other = Pki::new(&root.join("other-pki"), &["dashboard"]);
    let appliance = start(root, TLS_CONFIG, &tls_table(&pki));
    let kafka = kafka(&appliance);
    let confluent = reader("confluent", &kafka, root, &pki.librdkafka(Some("dashboard")), None);
    let kafka_python = reader("kafka-python", &kafka, root, &pki.kafka_python(Some("dashboard")), None);
    let ends = simulate(&appliance);
    let confluent = finish("confluent-kafka", confluent);
    let kafka_python = finish("kafka-python", kafka_python);
    let kcat_output = kcat(&kafka, &pki.librdkafka(Some("dashboard")));
    let stored = stored(&appliance, &ends);
    assert_read_exactly("confluent-kafka over mTLS", &confluent, &stored);
    assert_read_exactly("kafka-python over mTLS", &kafka_python, &stored);
    assert_kcat_read_everything(&kcat_output, &stored);
    let accepted = appliance.metric("weir_kafka_api_authentications_total{mechanism=\"mtls\",result=\"ok\"}");
    assert!(accepted >= 3.0, "three clients authenticated with their certificate: {accepted}");

    // No client certificate; a certificate another CA signed; kafka-python without one.
    let (error, records) = refused(&kafka, &pki.librdkafka(None), TOPIC);
    assert_eq!(records, 0, "no certificate: {error}");
    assert!(error.contains("SSL") || error.contains("ssl") || error.contains("certificate"), "{error}");
    let mut foreign = other.librdkafka(Some("dashboard"));
    foreign["ssl.ca.location"] = json!(pki.ca());
    let (error, records) = refused(&kafka, &foreign, TOPIC);
    assert_eq!(records, 0, "a foreign certificate: {error}");
    assert!(error.contains("SSL") || error.contains("ssl") || error.contains("certificate"), "{error}");
    let output = python("kafka_api_secure.py")
        .args(["kafka-python-refused", &kafka, TOPIC, &pki.kafka_python(None).to_string()])
        .output()
        .unwrap();
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(seen["error"].is_string(), "kafka-python without a certificate: {seen}");
    let failed = appliance.metric("weir_kafka_api_authentications_total{mechanism=\"mtls\",result=\"failed\"}");
    assert!(failed >= 2.0, "the refused certificates are counted: {failed}");
    appliance.stop();
}

/// Reads until weir closes the connection; false if it is still open after 60 s.
fn closed_by_weir(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue, // an alert
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn garbage_and_stalled_tls_handshakes_close_only_their_own_connection() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(&root.join("kafka-pki"), &["dashboard"]);
    let appliance = start(root, TLS_CONFIG, &tls_table(&pki));
    let kafka = kafka(&appliance);
    // A client that connects and never says anything.
    let mut stalled = TcpStream::connect(&kafka).unwrap();
    // Garbage where a ClientHello belongs.
    let mut garbage = TcpStream::connect(&kafka).unwrap();
    garbage.write_all(&[0x47u8; 20_000]).unwrap_or(());
    assert!(closed_by_weir(&mut garbage), "garbage closes its connection");
    // A handshake record that claims to go on past the handshake byte limit.
    let mut flood = TcpStream::connect(&kafka).unwrap();
    let mut written = 0usize;
    while written < (256 << 10) {
        // handshake records of 16 KiB holding an endless ClientHello
        let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        if written == 0 {
            record.extend_from_slice(&[0x01, 0xff, 0xff, 0xff]);
            record.extend(std::iter::repeat_n(0u8, (16 << 10) - 4));
        } else {
            record.extend(std::iter::repeat_n(0u8, 16 << 10));
        }
        if flood.write_all(&record).is_err() {
            break;
        }
        written += record.len();
    }
    assert!(closed_by_weir(&mut flood), "an endless handshake closes its connection");
    // Meanwhile a real client is served.
    let (error, records) = refused(&kafka, &pki.librdkafka(Some("dashboard")), "no-such-topic");
    assert_eq!(records, 0);
    assert!(error.contains("UNKNOWN_TOPIC"), "a served client sees the topic is unknown: {error}");
    // The stalled client is closed once kafka_api.authentication_ms_max passes.
    assert!(closed_by_weir(&mut stalled), "a handshake that never comes is closed");
    appliance.stop();
}
