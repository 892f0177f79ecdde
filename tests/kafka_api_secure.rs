//! The Kafka API's security against real clients (confluent-kafka, kafka-python, kcat)
//! while weir-sim devices write over QUIC: with mTLS every client reads every
//! acknowledged record exactly as the segment files hold it, and a client without a
//! certificate, or with one another CA signed, is refused and reads nothing; garbage
//! in place of a TLS handshake, and a handshake that never comes, close only their
//! own connection. Over SASL_SSL, confluent-kafka (SCRAM-SHA-256), kafka-python
//! (SCRAM-SHA-512), a subscribe()d group member (SCRAM-SHA-512) and kcat (PLAIN) read
//! every record; a wrong password or an unknown user is refused with an
//! authentication error; requests before authentication, an unknown mechanism,
//! oversized auth bytes and a flood of SaslAuthenticate close only their connection;
//! `weir kafka-user` never takes a password on its command line. Per-principal read
//! permission: a principal reads only the topics a `[[kafka_api.acl]]` rule names;
//! Metadata lists only those, and every API answers TOPIC_AUTHORIZATION_FAILED for
//! the others.

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
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    fetch_request::{FetchPartition, FetchTopic},
    list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
    metadata_request::MetadataRequestTopic,
    offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic},
    offset_fetch_request::OffsetFetchRequestTopic,
    ApiVersionsRequest, BrokerId, FetchRequest, GroupId, ListOffsetsRequest, MetadataRequest, OffsetCommitRequest,
    OffsetFetchRequest, RequestHeader, ResponseHeader, SaslAuthenticateRequest, SaslHandshakeRequest,
    SaslHandshakeResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
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

/// confluent-kafka's Metadata with `security`: {"all": {topic: error}, "asked": error of
/// `topic` asked for by name}.
fn metadata(kafka: &str, topic: &str, security: &Value) -> Value {
    let output =
        python("kafka_api_secure.py").args(["metadata", kafka, topic, &security.to_string()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
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
        "[kafka_api.tls]\nenabled = true\ncertificate_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n\
         [[kafka_api.acl]]\nprincipal = \"User:dashboard\"\ntopics = [\"*\"]\n",
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
    let seen = metadata(&kafka, "no-such-topic", &pki.librdkafka(Some("dashboard")));
    assert!(seen["asked"].as_str().unwrap_or_default().contains("UNKNOWN_TOPIC"), "a client is served: {seen}");
    assert!(seen["all"].get(TOPIC).is_some(), "{seen}");
    // The stalled client is closed once kafka_api.authentication_ms_max passes.
    assert!(closed_by_weir(&mut stalled), "a handshake that never comes is closed");
    appliance.stop();
}

/// `weir kafka-user add NAME` with the password on stdin; the command's output.
fn add_user(credentials: &Path, name: &str, password: &str) -> String {
    let mut child = weir()
        .args(["kafka-user", "add", name, "--credentials"])
        .arg(credentials)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// librdkafka settings for SASL over TLS (the server's certificate checked against `pki`).
fn sasl_ssl(pki: &Pki, mechanism: &str, user: &str, password: &str) -> Value {
    json!({
        "security.protocol": "sasl_ssl", "ssl.ca.location": pki.ca(),
        "sasl.mechanism": mechanism, "sasl.username": user, "sasl.password": password,
    })
}

fn sasl_table(credentials: &Path) -> String {
    format!(
        "[kafka_api.sasl]\nmechanisms = [\"SCRAM-SHA-256\", \"SCRAM-SHA-512\", \"PLAIN\"]\ncredentials_file = {:?}\n",
        credentials.display()
    )
}

/// The TLS table without client certificates.
fn server_tls_table(pki: &Pki) -> String {
    format!(
        "[kafka_api.tls]\nenabled = true\ncertificate_file = {:?}\nkey_file = {:?}\n",
        pki.path("server.pem"),
        pki.path("server.key")
    )
}

#[test]
fn sasl_ssl_clients_read_with_scram_and_plain_in_a_group_too_and_bad_credentials_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(&root.join("kafka-pki"), &[]);
    let credentials = root.join("kafka-users.toml");
    assert!(add_user(&credentials, "dashboard", "correct horse battery").starts_with("added dashboard"));
    assert!(add_user(&credentials, "alarms", "staple").starts_with("added alarms"));
    let file = std::fs::read_to_string(&credentials).unwrap();
    assert!(!file.contains("correct horse") && file.contains("stored_key"), "{file}");
    let acl = "[[kafka_api.acl]]\nprincipal = \"User:*\"\ntopics = [\"*\"]\n";
    let appliance = start(root, TLS_CONFIG, &format!("{}{}{acl}", server_tls_table(&pki), sasl_table(&credentials)));
    let kafka = kafka(&appliance);
    let scram_256 = sasl_ssl(&pki, "SCRAM-SHA-256", "dashboard", "correct horse battery");
    let scram_512 = sasl_ssl(&pki, "SCRAM-SHA-512", "alarms", "staple");
    let kafka_python = json!({
        "security_protocol": "SASL_SSL", "ssl_cafile": pki.ca(), "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "dashboard", "sasl_plain_password": "correct horse battery",
    });
    let confluent = reader("confluent", &kafka, root, &scram_256, None);
    let kafka_python_reader = reader("kafka-python", &kafka, root, &kafka_python, None);
    let group = reader("group", &kafka, root, &scram_512, Some("alarms-group"));
    let ends = simulate(&appliance);
    let confluent = finish("confluent-kafka SCRAM-SHA-256", confluent);
    let kafka_python_read = finish("kafka-python SCRAM-SHA-512", kafka_python_reader);
    let group = finish("confluent-kafka subscribe() SCRAM-SHA-512", group);
    let kcat_output = kcat(&kafka, &sasl_ssl(&pki, "PLAIN", "alarms", "staple"));
    let stored = stored(&appliance, &ends);
    assert_read_exactly("confluent-kafka over SASL_SSL SCRAM-SHA-256", &confluent, &stored);
    assert_read_exactly("kafka-python over SASL_SSL SCRAM-SHA-512", &kafka_python_read, &stored);
    assert_read_exactly("a group member over SASL_SSL SCRAM-SHA-512", &group, &stored);
    assert_kcat_read_everything(&kcat_output, &stored);
    let metric = |mechanism: &str, result: &str| {
        appliance
            .metric(&format!("weir_kafka_api_authentications_total{{mechanism=\"{mechanism}\",result=\"{result}\"}}"))
    };
    assert!(
        metric("SCRAM-SHA-256", "ok") >= 1.0 && metric("SCRAM-SHA-512", "ok") >= 2.0 && metric("PLAIN", "ok") >= 1.0
    );

    // A wrong password, an unknown user, each mechanism: the client sees an
    // authentication error and reads nothing.
    for (mechanism, user, password) in [
        ("SCRAM-SHA-256", "dashboard", "wrong horse"),
        ("SCRAM-SHA-512", "nobody", "staple"),
        ("PLAIN", "dashboard", "correct horse"),
        ("PLAIN", "nobody", "x"),
    ] {
        let (error, records) = refused(&kafka, &sasl_ssl(&pki, mechanism, user, password), TOPIC);
        assert_eq!(records, 0, "{mechanism} {user}");
        assert!(error.contains("Authentication failed") || error.contains("SASL"), "{mechanism} {user}: {error}");
    }
    let output = python("kafka_api_secure.py")
        .args(["kafka-python-refused", &kafka, TOPIC])
        .arg(
            json!({
                "security_protocol": "SASL_SSL", "ssl_cafile": pki.ca(), "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_plain_username": "dashboard", "sasl_plain_password": "wrong",
            })
            .to_string(),
        )
        .output()
        .unwrap();
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    // kafka-python raises that it could not bootstrap (it reports weir's close, not the
    // refusal's text); weir counts the failure below.
    assert!(seen["error"].as_str().is_some_and(|error| error.contains("Unable to bootstrap")), "kafka-python: {seen}");
    assert!(metric("PLAIN", "failed") >= 2.0 && metric("SCRAM-SHA-256", "failed") >= 2.0);
    assert!(metric("SCRAM-SHA-512", "failed") >= 1.0);
    appliance.stop();
}

/// A raw Kafka connection: frames out, frames in.
struct Raw {
    stream: TcpStream,
    correlation_id: i32,
}

impl Raw {
    fn connect(address: &str) -> Raw {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Raw { stream, correlation_id: 0 }
    }

    fn frame<R: Request>(&mut self, request: &R, version: i16) -> BytesMut {
        self.correlation_id += 1;
        let mut header = RequestHeader::default();
        header.request_api_key = R::KEY;
        header.request_api_version = version;
        header.correlation_id = self.correlation_id;
        header.client_id = Some(StrBytes::from_static_str("raw-test"));
        let mut frame = BytesMut::new();
        frame.put_i32(0);
        header.encode(&mut frame, R::header_version(version)).unwrap();
        request.encode(&mut frame, version).unwrap();
        let size = (frame.len() - 4) as i32;
        frame[..4].copy_from_slice(&size.to_be_bytes());
        frame
    }

    /// Sends `request`; its answer, or None when weir closed the connection.
    fn send<R: Request>(&mut self, request: &R, version: i16) -> Option<R::Response> {
        let frame = self.frame(request, version);
        self.stream.write_all(&frame).ok()?;
        let mut answer = self.read_frame()?;
        let header =
            ResponseHeader::decode(&mut answer, <R::Response as HeaderVersion>::header_version(version)).unwrap();
        assert_eq!(header.correlation_id, self.correlation_id);
        Some(<R::Response as Decodable>::decode(&mut answer, version).unwrap())
    }

    fn read_frame(&mut self) -> Option<Bytes> {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size).ok()?;
        let mut frame = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut frame).ok()?;
        Some(Bytes::from(frame))
    }
}

fn sasl_handshake(raw: &mut Raw, mechanism: &str) -> SaslHandshakeResponse {
    let mut request = SaslHandshakeRequest::default();
    request.mechanism = StrBytes::from_string(mechanism.to_owned());
    raw.send(&request, 1).expect("a handshake answer")
}

fn sasl_authenticate(bytes: &[u8]) -> SaslAuthenticateRequest {
    let mut request = SaslAuthenticateRequest::default();
    request.auth_bytes = Bytes::copy_from_slice(bytes);
    request
}

#[test]
fn unauthenticated_requests_auth_floods_and_oversized_auth_bytes_close_only_their_own_connection() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let credentials = root.join("kafka-users.toml");
    add_user(&credentials, "dashboard", "pw");
    // SASL without TLS: allowed on loopback (PLAIN off loopback needs TLS).
    let acl = "[[kafka_api.acl]]\nprincipal = \"User:dashboard\"\ntopics = [\"*\"]\n";
    let appliance = start(root, TLS_CONFIG, &format!("{}{acl}", sasl_table(&credentials)));
    let kafka = kafka(&appliance);
    // A connection that never authenticates (it asks ApiVersions, which is allowed).
    let mut stalled = Raw::connect(&kafka);
    let mut versions = ApiVersionsRequest::default();
    versions.client_software_name = StrBytes::from_static_str("raw-test");
    versions.client_software_version = StrBytes::from_static_str("1");
    let listed = stalled.send(&versions, 3).expect("ApiVersions is answered before authentication");
    assert!(listed.api_keys.iter().any(|api| api.api_key == 36 && api.max_version == 2), "SaslAuthenticate listed");

    // Metadata before authentication closes the connection.
    let mut early = Raw::connect(&kafka);
    assert!(early.send(&MetadataRequest::default(), 12).is_none(), "Metadata before authentication is not answered");

    // An unknown mechanism is refused with the list, then closed.
    let mut other = Raw::connect(&kafka);
    let answer = sasl_handshake(&mut other, "GSSAPI");
    assert_eq!(answer.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    assert_eq!(answer.mechanisms.len(), 3);
    assert!(other.read_frame().is_none(), "closed after the refusal");

    // Auth bytes far beyond a SCRAM message: answered SASL_AUTHENTICATION_FAILED, closed.
    let mut oversized = Raw::connect(&kafka);
    assert_eq!(sasl_handshake(&mut oversized, "SCRAM-SHA-256").error_code, 0);
    let answer = oversized.send(&sasl_authenticate(&vec![b'n'; 200_000]), 2).expect("an answer");
    assert_eq!(answer.error_code, 58, "SASL_AUTHENTICATION_FAILED");
    assert!(oversized.read_frame().is_none(), "closed after the failure");

    // A flood of SaslAuthenticate requests, pipelined: one answer, then closed.
    let mut flood = Raw::connect(&kafka);
    assert_eq!(sasl_handshake(&mut flood, "PLAIN").error_code, 0);
    let mut frames = BytesMut::new();
    for _ in 0..200 {
        frames.extend_from_slice(&flood.frame(&sasl_authenticate(b"\0dashboard\0wrong"), 2));
    }
    let _ = flood.stream.write_all(&frames);
    let first = flood.read_frame().expect("the first attempt is answered");
    assert!(first.len() > 4);
    assert!(flood.read_frame().is_none(), "no second attempt on a connection");

    // Meanwhile a real client authenticates and reads.
    let plaintext = json!({
        "security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "dashboard", "sasl.password": "pw",
    });
    let seen = metadata(&kafka, "no-such-topic", &plaintext);
    assert!(seen["asked"].as_str().unwrap_or_default().contains("UNKNOWN_TOPIC"), "a client is served: {seen}");
    assert!(seen["all"].get(TOPIC).is_some(), "{seen}");
    // The stalled connection is closed once kafka_api.authentication_ms_max passes.
    assert!(closed_by_weir(&mut stalled.stream), "a connection that never authenticates is closed");
    let failed = appliance.metric("weir_kafka_api_authentications_total{mechanism=\"PLAIN\",result=\"failed\"}");
    assert!(failed >= 1.0, "{failed}");
    appliance.stop();
}

#[test]
fn kafka_user_reads_the_password_from_stdin_or_a_file_never_argv_and_lists_and_removes_users() {
    let root = tempfile::tempdir().unwrap();
    let credentials = root.path().join("users.toml");
    add_user(&credentials, "dashboard", "one");
    let password_file = root.path().join("password");
    std::fs::write(&password_file, "two\n").unwrap();
    let output = weir()
        .args(["kafka-user", "add", "alarms", "--credentials"])
        .arg(&credentials)
        .arg("--password-file")
        .arg(&password_file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let list = weir().args(["kafka-user", "list", "--credentials"]).arg(&credentials).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&list.stdout), "alarms\ndashboard\n");
    // No password on stdin: refused, nothing written.
    let output = weir()
        .args(["kafka-user", "add", "empty", "--credentials"])
        .arg(&credentials)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no password"));
    // There is no way to pass a password as an argument.
    let output = weir()
        .args(["kafka-user", "add", "x", "--password", "secret", "--credentials"])
        .arg(&credentials)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "clap refuses --password");
    let removed = weir().args(["kafka-user", "remove", "alarms", "--credentials"]).arg(&credentials).output().unwrap();
    assert!(removed.status.success());
    let list = weir().args(["kafka-user", "list", "--credentials"]).arg(&credentials).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&list.stdout), "dashboard\n");
}

/// A raw connection authenticated with SASL PLAIN (SASL without TLS on loopback).
fn raw_plain(kafka: &str, user: &str, password: &str) -> Raw {
    let mut raw = Raw::connect(kafka);
    assert_eq!(sasl_handshake(&mut raw, "PLAIN").error_code, 0);
    let answer = raw.send(&sasl_authenticate(format!("\0{user}\0{password}").as_bytes()), 2).expect("an answer");
    assert_eq!(answer.error_code, 0, "{user} authenticated: {:?}", answer.error_message);
    raw
}

#[test]
fn a_principal_reads_only_the_topics_an_acl_permits_every_api_answers_topic_authorization_failed() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let credentials = root.join("kafka-users.toml");
    add_user(&credentials, "dashboard", "pw");
    add_user(&credentials, "auditor", "pw2");
    let acl = "[[kafka_api.acl]]\nprincipal = \"User:dashboard\"\ntopics = [\"telemetry\"]\n\
               [[kafka_api.acl]]\nprincipal = \"User:auditor\"\ntopics = [\"secret\"]\n";
    let appliance = start(root, TLS_CONFIG, &format!("{}{acl}", sasl_table(&credentials)));
    let kafka = kafka(&appliance);
    let ends = simulate(&appliance);
    let stored = stored(&appliance, &ends);
    // The permitted principal reads every record with confluent-kafka.
    let plaintext = |user: &str, password: &str| {
        json!({"security.protocol": "sasl_plaintext", "sasl.mechanism": "SCRAM-SHA-512",
               "sasl.username": user, "sasl.password": password})
    };
    let dashboard = finish("dashboard", reader("confluent", &kafka, root, &plaintext("dashboard", "pw"), None));
    assert_read_exactly("dashboard (permitted)", &dashboard, &stored);
    // Another principal, not permitted on telemetry, gets TOPIC_AUTHORIZATION_FAILED.
    let seen = metadata(&kafka, TOPIC, &plaintext("auditor", "pw2"));
    assert_eq!(seen["asked"], "TOPIC_AUTHORIZATION_FAILED", "{seen}");
    assert_eq!(seen["all"], json!({"secret": null}), "{seen}");
    let output = python("kafka_api_secure.py")
        .args(["metadata", &kafka, "secret", &plaintext("dashboard", "pw").to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["all"], json!({"telemetry": null}), "Metadata lists only the permitted topics");
    assert_eq!(seen["asked"], "TOPIC_AUTHORIZATION_FAILED", "a named topic not permitted");

    // Every API, raw: ListOffsets, Fetch, OffsetCommit, OffsetFetch on a topic not
    // permitted answer TOPIC_AUTHORIZATION_FAILED (29); on the permitted one they work.
    let mut raw = raw_plain(&kafka, "dashboard", "pw");
    let topic_request = |name: &str| {
        let mut topic = MetadataRequestTopic::default();
        topic.name = Some(TopicName(StrBytes::from_string(name.to_owned())));
        topic
    };
    let mut metadata = MetadataRequest::default();
    metadata.topics = Some(vec![topic_request("secret"), topic_request(TOPIC)]);
    let answer = raw.send(&metadata, 12).unwrap();
    let codes: Vec<i16> = answer.topics.iter().map(|topic| topic.error_code).collect();
    assert_eq!(codes, [29, 0]);
    for (topic, expected) in [("secret", 29), (TOPIC, 0)] {
        let mut partition = ListOffsetsPartition::default();
        partition.partition_index = 0;
        partition.timestamp = -2;
        let mut asked = ListOffsetsTopic::default();
        asked.name = TopicName(StrBytes::from_string(topic.to_owned()));
        asked.partitions = vec![partition];
        let mut request = ListOffsetsRequest::default();
        request.replica_id = BrokerId(-1);
        request.topics = vec![asked];
        assert_eq!(raw.send(&request, 6).unwrap().topics[0].partitions[0].error_code, expected, "ListOffsets {topic}");

        let mut partition = FetchPartition::default();
        partition.partition = 0;
        partition.partition_max_bytes = 1 << 20;
        let mut asked = FetchTopic::default();
        asked.topic = TopicName(StrBytes::from_string(topic.to_owned()));
        asked.partitions = vec![partition];
        let mut request = FetchRequest::default();
        request.max_bytes = 1 << 20;
        request.min_bytes = 1;
        request.replica_id = BrokerId(-1);
        request.topics = vec![asked];
        assert_eq!(raw.send(&request, 11).unwrap().responses[0].partitions[0].error_code, expected, "Fetch {topic}");

        let mut partition = OffsetCommitRequestPartition::default();
        partition.partition_index = 0;
        partition.committed_offset = 1;
        let mut asked = OffsetCommitRequestTopic::default();
        asked.name = TopicName(StrBytes::from_string(topic.to_owned()));
        asked.partitions = vec![partition];
        let mut request = OffsetCommitRequest::default();
        request.group_id = GroupId(StrBytes::from_static_str("raw-group"));
        request.generation_id_or_member_epoch = -1;
        request.topics = vec![asked];
        assert_eq!(raw.send(&request, 8).unwrap().topics[0].partitions[0].error_code, expected, "OffsetCommit {topic}");

        let mut asked = OffsetFetchRequestTopic::default();
        asked.name = TopicName(StrBytes::from_string(topic.to_owned()));
        asked.partition_indexes = vec![0];
        let mut request = OffsetFetchRequest::default();
        request.group_id = GroupId(StrBytes::from_static_str("raw-group"));
        request.topics = Some(vec![asked]);
        let answer = raw.send(&request, 7).unwrap();
        let partition = &answer.topics[0].partitions[0];
        assert_eq!(partition.error_code, expected, "OffsetFetch {topic}");
        if expected == 0 {
            assert_eq!(partition.committed_offset, 1, "the permitted commit was stored");
        }
    }
    // The whole group's offsets, as the other principal: the topic it may not read is
    // left out.
    let mut auditor = raw_plain(&kafka, "auditor", "pw2");
    let mut request = OffsetFetchRequest::default();
    request.group_id = GroupId(StrBytes::from_static_str("raw-group"));
    request.topics = None;
    assert!(auditor.send(&request, 7).unwrap().topics.is_empty());
    assert!(appliance.metric("weir_kafka_api_authorization_refusals_total") >= 5.0);
    appliance.stop();
}

/// firmware-config/examples/kafka-api-secure.toml as an operator would use it: with its
/// /etc/weir and /var/lib/weir paths moved into `root`, `weir check-config` accepts it
/// as it stands (listening off loopback, which needs authentication); served on
/// loopback, kcat as `User:dashboard` over SCRAM-SHA-512 reads every acknowledged
/// record, and confluent-kafka as `User:alarms` over SCRAM-SHA-512 is refused
/// telemetry (its rule names only alarms).
#[test]
fn the_secure_example_config_validates_and_serves_as_its_comments_say() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(&root.join("kafka"), &[]);
    let credentials = root.join("kafka/users.toml");
    add_user(&credentials, "dashboard", "dashboard-password");
    add_user(&credentials, "alarms", "alarms-password");
    let devices = weir()
        .args(["certs", "--device-count", "16", "--device-prefix", "sim-", "--dir"])
        .arg(root.join("certs"))
        .output()
        .unwrap();
    assert!(devices.status.success(), "{}", String::from_utf8_lossy(&devices.stderr));
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-config/examples/kafka-api-secure.toml"),
    )
    .unwrap();
    assert!(example.contains("listen = \"0.0.0.0:9093\""), "the example listens off loopback");
    let moved = example
        .replace("/etc/weir/kafka/", &format!("{}/", pki.directory.display()))
        .replace("/etc/weir/certs", &root.join("certs").display().to_string())
        .replace("/var/lib/weir", &root.join("data").display().to_string());
    let as_shipped = root.join("as-shipped.toml");
    std::fs::write(&as_shipped, &moved).unwrap();
    let check = weir().arg("check-config").arg("--config").arg(&as_shipped).output().unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Served on loopback (tests send traffic only there), everything else as shipped.
    let served = moved
        .replace("listen = \"0.0.0.0:9093\"", "listen = \"127.0.0.1:0\"")
        .replace("advertised_address = \"127.0.0.1:9093\"\n", "")
        .replace("[quic]\n", "[quic]\nlisten = \"127.0.0.1:0\"\ngenerate_dev_certs = false\n")
        + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let config = root.join("weir.toml");
    std::fs::write(&config, served).unwrap();
    let server = Server::start(&config, 2);
    let quic = server.quic.clone().expect("the QUIC address is logged");
    let appliance = Appliance { server, quic, root: root.to_owned() };
    let kafka = kafka(&appliance);
    let ends = simulate(&appliance);
    let stored = stored(&appliance, &ends);
    // kcat's librdkafka (Debian's 2.0.2) repeats its nonce in the client-final
    // message (core::sasl_server accepts it, as Kafka does).
    let dashboard = sasl_ssl(&pki, "SCRAM-SHA-512", "dashboard", "dashboard-password");
    assert_kcat_read_everything(&kcat(&kafka, &dashboard), &stored);
    let alarms = sasl_ssl(&pki, "SCRAM-SHA-512", "alarms", "alarms-password");
    let seen = metadata(&kafka, TOPIC, &alarms);
    assert_eq!(seen["asked"], "TOPIC_AUTHORIZATION_FAILED", "{seen}");
    assert_eq!(seen["all"], json!({"alarms": null}), "{seen}");
    appliance.stop();
}
