//! weir's read-only Kafka API against real Kafka clients: while weir-sim devices write
//! over QUIC, confluent-kafka and kafka-python (each assigning every partition) and
//! kcat read every acknowledged record exactly as the segment files hold it — offsets,
//! keys, values, headers with `weir.device`, timestamps — with CRCs checked; a
//! partition on the other core is served by that core; ListOffsets by timestamp finds
//! the record; Produce is refused with the reason; a fetch past the end is
//! OFFSET_OUT_OF_RANGE; garbage, an oversized frame or an unknown API close only their
//! own connection; two subscribers in one group hand partitions over on leave without
//! losing or repeating a record, and committed offsets survive a SIGKILL; a consumer
//! behind retention (drop-oldest deleted its offsets) is OFFSET_OUT_OF_RANGE and its
//! own auto.offset.reset = earliest takes it to the new log start, where it reads
//! exactly the records still stored; a consumer's fetch parked at the end (20 s
//! fetch.wait.max.ms) is woken by a device's append and gets the record long before
//! its wait would have expired.

#[path = "common/appliance.rs"]
mod appliance;
mod common;
#[path = "common/server.rs"]
mod server;
#[path = "common/sim.rs"]
mod sim;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use appliance::Appliance;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    fetch_request::{FetchPartition, FetchTopic},
    produce_request::{PartitionProduceData, TopicProduceData},
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, FetchRequest, FetchResponse, ProduceRequest, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use serde_json::Value;
use server::weir;
use sim::{ends_of, sim_certs, Place};

const TOPIC: &str = "telemetry";
const PARTITIONS: u32 = 4;

fn python() -> Command {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("WEIR_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo.join(".venv/bin/python"));
    let mut command = Command::new(python);
    command.arg("-u").arg(repo.join("tests/python/kafka_api_read.py"));
    command
}

/// A config of one topic with `PARTITIONS` on two cores (partitions 1 and 3 on the
/// core without the Kafka listener), `extra` sections added, and a PKI for 16 weir-sim
/// devices.
fn start(root: &Path, extra: &str) -> Appliance {
    sim_certs(&root.join("certs"), 16);
    Appliance::start(root, "", extra, &[(TOPIC, PARTITIONS)], 2)
}

/// 16 weir-sim devices writing 40-byte records for 4 s: every record acknowledged.
fn simulate(appliance: &Appliance, acked_log: &Path) -> BTreeSet<Place> {
    let args = ["--devices", "16", "--rate", "25", "--seconds", "4", "--record-bytes", "40"];
    sim::simulate(&appliance.quic, &appliance.certs(), acked_log, &args)
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

fn finish(name: &str, child: Child) -> Vec<Value> {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    records_of(&output.stdout)
}

fn header<'a>(record: &'a Value, name: &str) -> Option<&'a str> {
    record["headers"].as_array().unwrap().iter().find(|pair| pair[0] == name).and_then(|pair| pair[1].as_str())
}

fn unhex(text: &str) -> String {
    let bytes: Vec<u8> =
        (0..text.len()).step_by(2).map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap()).collect();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn kafka_clients_read_every_acknowledged_record_exactly_as_stored_while_devices_write() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let appliance = start(root, "");
    let kafka = appliance.server.kafka.clone().expect("the Kafka API address is logged");
    let ends_file = root.join("ends.json");
    let consumer = |client: &str| {
        python()
            .args([client, &kafka, TOPIC, &PARTITIONS.to_string()])
            .arg(&ends_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (confluent, kafka_python) = (consumer("confluent"), consumer("kafka-python"));

    let acked = simulate(&appliance, &root.join("acked.log"));
    assert!(acked.len() > 100, "weir-sim acknowledged only {} records", acked.len());
    let ends = ends_of(&acked, PARTITIONS);
    // Partitions 0 and 2 live on the listener's core, 1 and 3 on the other.
    assert!(ends[&0] + ends[&2] > 0 && ends[&1] + ends[&3] > 0, "both cores' partitions got records: {ends:?}");
    let ends_json: BTreeMap<String, i64> = ends.iter().map(|(partition, end)| (partition.to_string(), *end)).collect();
    std::fs::write(&ends_file, serde_json::to_string(&ends_json).unwrap()).unwrap();
    let confluent = by_place(finish("confluent-kafka", confluent));
    let kafka_python = by_place(finish("kafka-python", kafka_python));

    let kcat = Command::new("kcat")
        .args(["-C", "-b", &kafka, "-t", TOPIC, "-o", "beginning", "-e", "-q", "-X", "check.crcs=true"])
        .args(["-f", "%p %o %T %k %h|%s\n"])
        .output()
        .unwrap();
    assert!(kcat.status.success(), "kcat: {}", String::from_utf8_lossy(&kcat.stderr));
    let kcat_lines: Vec<String> = String::from_utf8_lossy(&kcat.stdout).lines().map(str::to_owned).collect();

    // ListOffsets by timestamp: the first record at or after a stored record's time.
    let probe = confluent.values().find(|record| record["partition"] == 1).unwrap().clone();
    let found =
        python().args(["offset-for-time", &kafka, TOPIC, "1", &probe["timestamp"].to_string()]).output().unwrap();
    assert!(found.status.success(), "{}", String::from_utf8_lossy(&found.stderr));
    let found: Value = serde_json::from_slice(&found.stdout).unwrap();
    let expected_offset = confluent
        .values()
        .filter(|record| record["partition"] == 1 && record["timestamp"].as_i64() >= probe["timestamp"].as_i64())
        .map(|record| record["offset"].as_i64().unwrap())
        .min()
        .unwrap();
    assert_eq!(found["offset"].as_i64(), Some(expected_offset), "{found}");

    // Produce: refused (the reason's text is checked on the wire in the raw test).
    let produce = python().args(["produce", &kafka, TOPIC]).output().unwrap();
    assert!(produce.status.success(), "{}", String::from_utf8_lossy(&produce.stderr));
    let produce: Value = serde_json::from_slice(&produce.stdout).unwrap();
    let produce_error = produce["error"].as_str().unwrap_or_default();
    assert!(produce_error.contains("INVALID_REQUEST"), "{produce}");

    appliance.stop();
    let stored = stored_records(root, &ends);

    // Every client read exactly the stored records up to the ends, field for field.
    assert_eq!(confluent.len(), stored.len());
    for (name, read) in [("confluent-kafka", &confluent), ("kafka-python", &kafka_python)] {
        let read: BTreeMap<_, _> = read.iter().filter(|(place, _)| stored.contains_key(place)).collect();
        assert_eq!(read.len(), stored.len(), "{name} read {} of {} records", read.len(), stored.len());
        for (place, record) in read {
            assert_eq!(record, &stored[place], "{name} at {place:?}");
        }
    }
    // Every acknowledged record, at its acknowledged place, from its device.
    for (device, sequence, partition, offset) in &acked {
        let record = &stored[&(u64::from(*partition), *offset)];
        assert_eq!(header(record, "weir.device").map(unhex).as_deref(), Some(device.as_str()));
        assert_eq!(header(record, "weir.sequence").map(unhex), Some(sequence.to_string()));
    }
    // kcat (Debian's librdkafka): the same records, in each partition's order.
    let mut kcat_places = BTreeSet::new();
    for line in &kcat_lines {
        let (head, value) = line.split_once('|').unwrap();
        let fields: Vec<&str> = head.splitn(5, ' ').collect();
        let place = (fields[0].parse::<u64>().unwrap(), fields[1].parse::<i64>().unwrap());
        let Some(record) = stored.get(&place) else { continue }; // beyond the ends
        assert_eq!(fields[2], record["timestamp"].to_string(), "kcat timestamp at {place:?}");
        assert_eq!(fields[3], unhex(record["key"].as_str().unwrap()), "kcat key at {place:?}");
        let device = unhex(header(record, "weir.device").unwrap());
        assert!(fields[4].contains(&format!("weir.device={device}")), "kcat headers at {place:?}: {}", fields[4]);
        assert_eq!(value, unhex(record["value"].as_str().unwrap()), "kcat value at {place:?}");
        kcat_places.insert(place);
    }
    assert_eq!(kcat_places.len(), stored.len(), "kcat read every stored record");
}

/// A raw Kafka connection: frames out, frames in.
struct Raw {
    stream: TcpStream,
    correlation_id: i32,
}

impl Raw {
    fn connect(address: &str) -> Raw {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw { stream, correlation_id: 0 }
    }

    fn send<R: Request>(&mut self, request: &R, version: i16) -> R::Response {
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
        self.stream.write_all(&frame).unwrap();
        let mut answer = self.read_frame().expect("an answer");
        let header =
            ResponseHeader::decode(&mut answer, <R::Response as HeaderVersion>::header_version(version)).unwrap();
        assert_eq!(header.correlation_id, self.correlation_id);
        <R::Response as Decodable>::decode(&mut answer, version).unwrap()
    }

    /// The next frame, or None when weir closed the connection.
    fn read_frame(&mut self) -> Option<Bytes> {
        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size).ok()?;
        let mut frame = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut frame).ok()?;
        Some(Bytes::from(frame))
    }

    fn closed_by_weir(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0)) || self.stream.read(&mut byte).is_err()
    }
}

fn api_versions(raw: &mut Raw) -> ApiVersionsResponse {
    let mut request = ApiVersionsRequest::default();
    request.client_software_name = StrBytes::from_static_str("raw-test");
    request.client_software_version = StrBytes::from_static_str("1");
    raw.send(&request, 3)
}

fn fetch_one(raw: &mut Raw, partition: i32, offset: i64) -> FetchResponse {
    let mut asked = FetchPartition::default();
    asked.partition = partition;
    asked.fetch_offset = offset;
    asked.partition_max_bytes = 1 << 20;
    let mut topic = FetchTopic::default();
    topic.topic = TopicName(StrBytes::from_static_str(TOPIC));
    topic.partitions = vec![asked];
    let mut request = FetchRequest::default();
    request.max_wait_ms = 0;
    request.min_bytes = 1;
    request.max_bytes = 1 << 20;
    request.topics = vec![topic];
    raw.send(&request, 11)
}

#[test]
fn bad_requests_close_only_their_own_connection_and_offsets_past_the_end_are_out_of_range() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    appliance::make_certs(&root.join("certs"), &["sensor-1"]);
    let appliance = Appliance::start(root, "", "", &[(TOPIC, 2)], 1);
    let kafka = appliance.server.kafka.clone().expect("the Kafka API address is logged");
    let mut healthy = Raw::connect(&kafka);
    let versions = api_versions(&mut healthy);
    assert_eq!(versions.error_code, 0);
    assert!(versions.api_keys.iter().any(|api| api.api_key == ApiKey::Fetch as i16));

    // Garbage: a size, then bytes that are no request header.
    let mut garbage = Raw::connect(&kafka);
    garbage.stream.write_all(&[0, 0, 0, 16, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).unwrap();
    assert!(garbage.closed_by_weir(), "garbage closes its connection");
    // A frame larger than kafka_api.request_bytes_max (1 MiB by default).
    let mut oversized = Raw::connect(&kafka);
    oversized.stream.write_all(&(64i32 << 20).to_be_bytes()).unwrap();
    assert!(oversized.closed_by_weir(), "an oversized frame closes its connection");
    // An API weir does not answer (DescribeAcls, key 29).
    let mut unknown = Raw::connect(&kafka);
    let mut frame = BytesMut::new();
    frame.put_i32(10);
    frame.put_i16(29);
    frame.put_i16(1);
    frame.put_i32(7);
    frame.put_i16(-1);
    unknown.stream.write_all(&frame).unwrap();
    assert!(unknown.closed_by_weir(), "an unanswered API closes its connection");

    // The healthy connection still works: an empty partition answers at its end, and
    // a fetch past the end is OFFSET_OUT_OF_RANGE with the range.
    let at_end = fetch_one(&mut healthy, 0, 0);
    let partition = &at_end.responses[0].partitions[0];
    assert_eq!((partition.error_code, partition.high_watermark), (0, 0));
    assert!(partition.records.as_ref().is_none_or(|records| !records.has_remaining()));
    let past = fetch_one(&mut healthy, 1, 5);
    let partition = &past.responses[0].partitions[0];
    assert_eq!(partition.error_code, 1, "OFFSET_OUT_OF_RANGE");
    assert_eq!((partition.log_start_offset, partition.high_watermark), (0, 0));
    let unknown_partition = fetch_one(&mut healthy, 9, 0);
    assert_eq!(unknown_partition.responses[0].partitions[0].error_code, 3, "UNKNOWN_TOPIC_OR_PARTITION");

    // Produce: every partition refused with the reason.
    let mut data = PartitionProduceData::default();
    data.index = 0;
    let record = weir::core::log::batch::Record {
        timestamp_ms: 1,
        key: None,
        value: Some(Bytes::from_static(b"from a Kafka client")),
        headers: Vec::new(),
    };
    data.records = Some(Bytes::from(weir::core::log::batch::encode_to_vec(0, &[record])));
    let mut topic = TopicProduceData::default();
    topic.name = TopicName(StrBytes::from_static_str(TOPIC));
    topic.partition_data = vec![data];
    let mut produce = ProduceRequest::default();
    produce.acks = -1;
    produce.timeout_ms = 1000;
    produce.topic_data = vec![topic];
    let refused = healthy.send(&produce, 9);
    let partition = &refused.responses[0].partition_responses[0];
    assert_eq!(partition.error_code, 42, "INVALID_REQUEST");
    let message = partition.error_message.as_ref().map(|message| message.to_string()).unwrap_or_default();
    assert!(message.contains("read-only") && message.contains("devices write over QUIC"), "{message}");

    // The metrics saw it: three connections closed for a bad request, fetches, a refusal.
    assert_eq!(appliance.metric("weir_kafka_api_connections_closed_bad_request_total"), 3.0);
    assert_eq!(appliance.metric("weir_kafka_api_fetches_total"), 3.0);
    assert_eq!(appliance.metric("weir_kafka_api_requests_refused_total"), 1.0);
    assert_eq!(appliance.metric("weir_kafka_api_connections_open"), 1.0, "only the healthy connection is open");
    appliance.stop();
}
/// Stored records of every partition below `ends`, by place, read from the segment
/// files with kafka-python while weir is stopped.
fn stored_records(root: &Path, ends: &BTreeMap<u32, i64>) -> BTreeMap<(u64, i64), Value> {
    let stored =
        python().arg("segments").arg(root.join("data")).args([TOPIC, &PARTITIONS.to_string()]).output().unwrap();
    assert!(stored.status.success(), "{}", String::from_utf8_lossy(&stored.stderr));
    by_place(records_of(&stored.stdout))
        .into_iter()
        .filter(|((partition, offset), _)| *offset < ends[&(*partition as u32)])
        .collect()
}

/// The records a group member printed so far (its stdout file).
fn printed(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The last line may be half written.
    text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

fn committed(kafka: &str, group: &str) -> BTreeMap<u32, i64> {
    let output = python().args(["committed", kafka, TOPIC, group, &PARTITIONS.to_string()]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let found: BTreeMap<String, i64> = serde_json::from_slice(&output.stdout).unwrap();
    found.into_iter().map(|(partition, offset)| (partition.parse().unwrap(), offset)).collect()
}

#[test]
fn two_subscribers_share_a_group_hand_over_on_leave_and_committed_offsets_survive_sigkill() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let appliance = start(root, "");
    let kafka = appliance.server.kafka.clone().expect("the Kafka API address is logged");

    let member = |name: &str| {
        let stop = root.join(format!("stop-{name}"));
        let out = root.join(format!("{name}.jsonl"));
        let child = python()
            .args(["group-member", &kafka, TOPIC, "edge-readers"])
            .arg(&stop)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, stop, out)
    };
    let (first, stop_first, out_first) = member("first");
    let (second, stop_second, out_second) = member("second");
    // Devices write while both members are in the group.
    let mut acked = simulate(&appliance, &root.join("acked-1.log"));
    // The first member reads its share (range assignment: partitions 0 and 1 once
    // both joined), then leaves.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut first = first;
    while printed(&out_first).is_empty() {
        if let Some(status) = first.try_wait().unwrap() {
            let mut stderr = String::new();
            first.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            panic!("the first member exited with {status}: {stderr}");
        }
        assert!(std::time::Instant::now() < deadline, "the first member read within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The first leaves: the second takes its partitions over from the committed offsets,
    // while devices write more.
    std::fs::write(&stop_first, "").unwrap();
    let first_output = first.wait_with_output().unwrap();
    assert!(first_output.status.success(), "first member: {}", String::from_utf8_lossy(&first_output.stderr));
    acked.extend(simulate(&appliance, &root.join("acked-2.log")));
    let ends = ends_of(&acked, PARTITIONS);
    let total: i64 = ends.values().sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while (printed(&out_first).len() + printed(&out_second).len()) < total as usize {
        assert!(std::time::Instant::now() < deadline, "the group read every record within 90 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&stop_second, "").unwrap();
    let second_output = second.wait_with_output().unwrap();
    assert!(second_output.status.success(), "second member: {}", String::from_utf8_lossy(&second_output.stderr));

    // Committed offsets: every partition at its end, and the same after a SIGKILL.
    let before = committed(&kafka, "edge-readers");
    // A partition that got no record has no committed offset (librdkafka's -1001).
    let expected: BTreeMap<u32, i64> =
        ends.iter().map(|(partition, end)| (*partition, if *end > 0 { *end } else { -1001 })).collect();
    assert_eq!(before, expected, "the group committed every record it read");
    let kill = Command::new("kill").args(["-KILL", &appliance.server.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    let Appliance { server, .. } = appliance;
    let status = server.wait();
    assert!(!status.success(), "weir was killed");
    let config = root.join("weir.toml");
    let restarted = server::Server::start(&config, 2);
    let kafka_after = restarted.kafka.clone().expect("the Kafka API address is logged");
    assert_eq!(committed(&kafka_after, "edge-readers"), before, "committed offsets survive SIGKILL");
    assert_eq!(restarted.stop(), Some(0));

    // A partition the first member read was read on by the second after it left.
    let partitions_of = |path: &Path| -> BTreeSet<u64> {
        printed(path).iter().map(|record| record["partition"].as_u64().unwrap()).collect()
    };
    let handed_over: Vec<u64> = partitions_of(&out_first).intersection(&partitions_of(&out_second)).copied().collect();
    assert!(!handed_over.is_empty(), "no partition was handed over from the first member to the second");
    // Across the handover: every stored record read exactly once by the group.
    let stored = stored_records(root, &ends);
    let mut read: BTreeMap<(u64, i64), Value> = BTreeMap::new();
    for record in printed(&out_first).into_iter().chain(printed(&out_second)) {
        let place = (record["partition"].as_u64().unwrap(), record["offset"].as_i64().unwrap());
        assert!(read.insert(place, record).is_none(), "{place:?} read twice across the handover");
    }
    assert_eq!(read.len(), stored.len(), "no record lost across the handover");
    for (place, record) in &read {
        assert_eq!(record, &stored[place], "at {place:?}");
    }
}

#[test]
fn a_consumer_behind_retention_is_out_of_range_and_resets_by_its_own_policy_to_what_is_stored() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    // Small segments and a data directory budget of four: with nothing shipped,
    // drop-oldest deletes the oldest segments as devices write, moving log starts.
    let log = "[log]\nsegment_bytes_max = \"64 KiB\"\ndata_dir_bytes_max = \"256 KiB\"\nflush_bytes_max = \"64 KiB\"\n\
               index_interval_bytes = \"4 KiB\"\npreallocate_bytes = \"64 KiB\"\ndisk_full_policy = \"drop-oldest\"\n";
    let appliance = start(root, log);
    let kafka = appliance.server.kafka.clone().expect("the Kafka API address is logged");
    let args = ["--devices", "16", "--rate", "25", "--seconds", "4", "--record-bytes", "1000"];
    let acked = sim::simulate(&appliance.quic, &appliance.certs(), &root.join("acked.log"), &args);
    let ends = ends_of(&acked, PARTITIONS);
    let stored = stored_records(root, &ends);
    // Where each partition's log starts now: past offset 0, or the test proves nothing.
    let starts: BTreeMap<u64, i64> = stored.keys().fold(BTreeMap::new(), |mut starts, (partition, offset)| {
        let start = starts.entry(*partition).or_insert(*offset);
        *start = (*start).min(*offset);
        starts
    });
    let written = ends.values().filter(|end| **end > 0).count();
    assert_eq!(starts.len(), written, "every partition written to still holds records: {starts:?}");
    assert!(
        starts.values().all(|start| *start > 0),
        "retention deleted every written partition's first segment: {starts:?}"
    );
    // On the wire: a fetch at a deleted offset is OFFSET_OUT_OF_RANGE with the new log start.
    let mut raw = Raw::connect(&kafka);
    for (partition, start) in &starts {
        let behind = fetch_one(&mut raw, *partition as i32, 0);
        let answer = &behind.responses[0].partitions[0];
        assert_eq!(answer.error_code, 1, "OFFSET_OUT_OF_RANGE at offset 0 of partition {partition}");
        assert_eq!(answer.log_start_offset, *start, "the new log start of partition {partition}");
    }

    // confluent-kafka at offset 0 of every partition: OFFSET_OUT_OF_RANGE, then its
    // own auto.offset.reset = earliest takes it to the new log start.
    let ends_file = root.join("ends.json");
    let ends_json: BTreeMap<String, i64> = ends.iter().map(|(partition, end)| (partition.to_string(), *end)).collect();
    std::fs::write(&ends_file, serde_json::to_string(&ends_json).unwrap()).unwrap();
    let reader = python()
        .args(["from-zero", &kafka, TOPIC, &PARTITIONS.to_string()])
        .arg(&ends_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = by_place(finish("from-zero", reader));
    appliance.stop();
    // Nothing deleted meanwhile (no device wrote): exactly the records still stored.
    assert_eq!(stored_records(root, &ends).len(), stored.len());
    for (partition, start) in &starts {
        let first = read.keys().find(|(read_partition, _)| read_partition == partition).map(|(_, offset)| *offset);
        assert_eq!(first, Some(*start), "partition {partition} was read from its new log start");
    }
    assert_eq!(read.len(), stored.len(), "every stored record read once, no other");
    for (place, record) in &read {
        assert_eq!(record, &stored[place], "at {place:?}");
    }
}

#[test]
fn a_long_poll_parked_at_the_end_is_woken_by_a_device_append_before_its_wait_expires() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let appliance = start(root, "");
    let kafka = appliance.server.kafka.clone().expect("the Kafka API address is logged");

    // confluent-kafka at the end (offset 0) of every partition of the empty topic, each
    // fetch allowed to wait 20 s (kafka_api.fetch_wait_ms_max is 30 s).
    let out = root.join("long-poll.jsonl");
    let mut reader = python()
        .args(["long-poll", &kafka, TOPIC, &PARTITIONS.to_string(), "20000"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !printed(&out).contains(&Value::from("parked")) {
        if let Some(status) = reader.try_wait().unwrap() {
            let mut stderr = String::new();
            reader.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            panic!("the consumer exited with {status}: {stderr}");
        }
        assert!(std::time::Instant::now() < deadline, "the consumer parked within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its fetch is parked: none answered in the 2 s it polled empty.
    let answered = appliance.metric("weir_kafka_api_fetches_total");
    assert!(answered <= 1.0, "the consumer's fetch waits at the end instead of being answered empty: {answered}");
    // A device appends while the consumer's fetch is parked.
    let appended_from = std::time::Instant::now();
    let args = ["--devices", "1", "--rate", "1", "--seconds", "1", "--record-bytes", "40"];
    let acked = sim::simulate(&appliance.quic, &appliance.certs(), &root.join("acked.log"), &args);
    let (_, _, partition, offset) = acked.first().expect("weir-sim got an append acknowledged").clone();
    let (partition, offset) = (u64::from(partition), offset);
    let output = reader.wait_with_output().unwrap();
    let woken_within = appended_from.elapsed();
    assert!(output.status.success(), "long-poll: {}", String::from_utf8_lossy(&output.stderr));
    let read: Vec<Value> = printed(&out).into_iter().filter(Value::is_object).collect();
    assert_eq!(read.len(), 1, "{read:?}");
    assert_eq!((read[0]["partition"].as_u64(), read[0]["offset"].as_i64()), (Some(partition), Some(offset)));
    // Behaviour, not speed: unwoken, the fetch would have answered only when its 20 s
    // wait expired, which is later than this.
    assert!(woken_within < Duration::from_secs(10), "the parked fetch was woken by the append: {woken_within:?}");
    assert!(appliance.metric("weir_kafka_api_fetches_total") > answered, "the woken fetch was answered");
    appliance.stop();
    let ends: BTreeMap<u32, i64> = (0..PARTITIONS).map(|partition| (partition, i64::MAX)).collect();
    let stored = stored_records(root, &ends);
    assert_eq!(&read[0], &stored[&(partition, offset)], "the record as stored");
}

/// `weir status` with `args` (and the test's config): (exit code, stdout).
fn weir_status(root: &Path, args: &[&str]) -> (Option<i32>, String) {
    let output = weir().arg("status").args(args).arg("--config").arg(root.join("weir.toml")).output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The group `name` in a `weir status --json` answer.
fn status_group(json: &str, name: &str) -> Value {
    let status: Value = serde_json::from_str(json).unwrap_or_else(|error| panic!("{error}: {json}"));
    let groups = status["kafka_groups"].as_array().unwrap_or_else(|| panic!("no kafka_groups: {status}"));
    groups.iter().find(|group| group["group"] == name).unwrap_or_else(|| panic!("no group {name}: {status}")).clone()
}

/// (partition, committed, log end, lag) of the group's one topic.
fn group_partitions(group: &Value) -> Vec<(u64, i64, i64, i64)> {
    let topics = group["topics"].as_array().unwrap();
    assert_eq!(topics.len(), 1, "{group}");
    assert_eq!(topics[0]["topic"], TOPIC);
    let partitions: Vec<(u64, i64, i64, i64)> = topics[0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|partition| {
            let field = |name: &str| partition[name].as_i64().unwrap();
            (
                partition["partition"].as_u64().unwrap(),
                field("committed_offset"),
                field("log_end_offset"),
                field("lag_records"),
            )
        })
        .collect();
    let lag: i64 = partitions.iter().map(|partition| partition.3).sum();
    assert_eq!(topics[0]["lag_records"].as_i64(), Some(lag), "the topic's lag is its partitions' sum: {group}");
    assert_eq!(group["lag_records"].as_i64(), Some(lag), "{group}");
    partitions
}

#[test]
fn weir_status_and_the_lag_metric_show_a_group_committed_at_known_offsets() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let appliance = start(root, "");
    let kafka = appliance.server.kafka.clone().expect("the Kafka API address is logged");
    let ends = ends_of(&simulate(&appliance, &root.join("acked.log")), PARTITIONS);
    // weir-sim's devices land on some partitions only (by key): two written ones are needed.
    let written: Vec<u64> =
        ends.iter().filter(|(_, end)| **end > 2).map(|(partition, _)| u64::from(*partition)).collect();
    assert!(written.len() >= 2, "two partitions got records: {ends:?}");
    let unwritten: Vec<u64> =
        ends.iter().filter(|(_, end)| **end == 0).map(|(partition, _)| u64::from(*partition)).collect();

    // A confluent-kafka member of "lagging" commits half of one written partition, one
    // record of another, offset 0 of an empty one (lag 0) and nothing of the rest, then
    // stays in the group.
    let mut committed: BTreeMap<u64, i64> = [(written[0], ends[&(written[0] as u32)] / 2), (written[1], 1)].into();
    if let Some(empty) = unwritten.first() {
        committed.insert(*empty, 0);
    }
    let left_out = (0..u64::from(PARTITIONS)).filter(|partition| !committed.contains_key(partition)).count();
    assert!(left_out >= 1, "a partition stays uncommitted: {committed:?}");
    let offsets_json: BTreeMap<String, i64> =
        committed.iter().map(|(partition, offset)| (partition.to_string(), *offset)).collect();
    let stop = root.join("stop");
    let mut member = python()
        .args(["commit-at", &kafka, TOPIC, "lagging", &serde_json::to_string(&offsets_json).unwrap()])
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(member.stdout.take().unwrap()), &mut said).unwrap();
    if said.trim() != "committed" {
        let output = member.wait_with_output().unwrap();
        panic!("commit-at: {said:?} {}", String::from_utf8_lossy(&output.stderr));
    }
    let expected: Vec<(u64, i64, i64, i64)> = committed
        .iter()
        .map(|(partition, offset)| {
            let end = ends[&(*partition as u32)];
            (*partition, *offset, end, end - offset)
        })
        .collect();
    let lag: i64 = expected.iter().map(|partition| partition.3).sum();
    assert!(lag > 0);

    // /status (weir status --json): the live group, its member, and each partition's lag.
    let (code, json) = weir_status(root, &["--json", "--admin", &appliance.server.admin]);
    assert_eq!(code, Some(0), "{json}");
    let group = status_group(&json, "lagging");
    assert_eq!((group["state"].as_str(), group["members"].as_u64()), (Some("Stable"), Some(1)), "{group}");
    assert!(group["generation"].as_i64() >= Some(1), "{group}");
    assert_eq!(group_partitions(&group), expected, "committed vs end; a partition never committed is left out");
    // The same in the table, and in the metric, summed over the topic's partitions.
    let (code, text) = weir_status(root, &["--admin", &appliance.server.admin]);
    assert_eq!(code, Some(0), "{text}");
    let title =
        format!("kafka group \"lagging\": Stable, generation {}, 1 members, lag {lag} records", group["generation"]);
    assert!(text.contains(&title), "{text}");
    for (partition, offset, end, partition_lag) in &expected {
        let row = text
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{TOPIC}-{partition} ")) && line.contains("committed"))
            .unwrap_or_else(|| panic!("no row of partition {partition}: {text}"));
        let words: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            words[1..],
            ["committed", &offset.to_string(), "log_end", &end.to_string(), "lag", &partition_lag.to_string()]
        );
    }
    let series = format!("weir_kafka_api_group_lag_records{{group=\"lagging\",topic=\"{TOPIC}\"}}");
    assert_eq!(appliance.metric(&series), lag as f64);

    // The member leaves: the group is empty, its offsets and lag stay.
    std::fs::write(&stop, "").unwrap();
    let output = member.wait_with_output().unwrap();
    assert!(output.status.success(), "commit-at: {}", String::from_utf8_lossy(&output.stderr));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let group = loop {
        let (_, json) = weir_status(root, &["--json", "--admin", &appliance.server.admin]);
        let group = status_group(&json, "lagging");
        if group["members"] == 0 {
            break group;
        }
        assert!(std::time::Instant::now() < deadline, "the group is empty within 10 s of the leave: {group}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(group["state"], "Empty", "{group}");
    assert_eq!(group_partitions(&group), expected);
    assert_eq!(appliance.metric(&series), lag as f64, "the series stays while the offsets do");
    appliance.stop();

    // weir stopped: `weir status` reads the committed offsets from the data directory
    // (with admin.listen on a port nothing answers: port 0 cannot be asked).
    let config = std::fs::read_to_string(root.join("weir.toml")).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = config.replacen("[admin]\nlisten = \"127.0.0.1:0\"", &format!("[admin]\nlisten = \"{closed}\""), 1);
    assert!(config.contains(&closed.to_string()));
    std::fs::write(root.join("weir.toml"), config).unwrap();
    let (code, json) = weir_status(root, &["--json"]);
    assert_eq!(code, Some(0), "{json}");
    let group = status_group(&json, "lagging");
    assert_eq!(group["state"], "not running", "{group}");
    assert_eq!(group_partitions(&group), expected);
}
