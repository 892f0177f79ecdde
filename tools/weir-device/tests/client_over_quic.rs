//! The device client against a real QUIC server (quinn, mutual TLS, protocol v1 through
//! weir's own frame codec) on 127.0.0.1, with faults injected by the server: lost
//! answers, unanswered frames, backpressure, refused topics and foreign certificates.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::TestServer;
use weir_device::{DeviceClient, DeviceError, DeviceProfile, ErrorCode, LinkError, Record};

fn certs(directory: &Path, devices: &[&str]) {
    let devices: Vec<String> = devices.iter().map(|device| (*device).to_owned()).collect();
    weir::certs::generate(directory, &[], &devices, 1).unwrap();
}

fn profile(certs: &Path, server: &TestServer, device: &str) -> DeviceProfile {
    let mut profile = DeviceProfile::new(
        vec![server.address],
        "localhost",
        certs.join("ca.pem"),
        certs.join(format!("devices/{device}.pem")),
        certs.join(format!("devices/{device}.key")),
    );
    profile.retry.backoff_ms_min = 10;
    profile.retry.backoff_ms_max = 100;
    profile.timeouts.connect_ms = 2_000;
    profile.timeouts.answer_ms = 2_000;
    profile.validate("test").unwrap();
    profile
}

fn records(device: &str, count: usize) -> Vec<Record> {
    (0..count)
        .map(|index| Record {
            timestamp_ms: 1_700_000_000_000 + index as i64,
            key: Some(Bytes::from(format!("{device}-key-{}", index % 3))),
            value: Some(Bytes::from(format!("{device} reading {index}"))),
            headers: vec![],
        })
        .collect()
}

/// Every acked record is stored exactly once, at the acked place, with its value.
fn assert_acks_match_the_log(server: &TestServer, device: &str, sent: &[Record], ack: &weir_device::Ack) {
    assert_eq!(ack.records.len(), sent.len());
    let state = server.state.lock().unwrap();
    for (record, acked) in sent.iter().zip(&ack.records) {
        let stored = &state.partitions[&acked.partition][acked.offset as usize];
        assert_eq!((stored.device.as_str(), stored.sequence), (device, acked.sequence.0));
        assert_eq!(stored.record_index, acked.record_index);
        assert_eq!(stored.record.value, record.value);
    }
    let mut seen = std::collections::HashSet::new();
    for records in state.partitions.values() {
        for stored in records.iter().filter(|stored| stored.device == device) {
            assert!(seen.insert((stored.sequence, stored.record_index)), "stored twice: {stored:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_batched_and_every_ack_points_at_the_stored_record() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    let client = DeviceClient::connect(&profile(directory.path(), &server, "dev-1")).await.unwrap();
    assert_eq!(client.device_id(), "dev-1");
    let client = std::sync::Arc::new(client);
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        sends.spawn(async move {
            let sent = records("dev-1", 7);
            let ack = client.send("telemetry", sent.clone()).await;
            (sent, ack)
        });
    }
    let mut sequences = std::collections::BTreeSet::new();
    while let Some(joined) = sends.join_next().await {
        let (sent, ack) = joined.unwrap();
        let ack = ack.unwrap();
        assert_acks_match_the_log(&server, "dev-1", &sent, &ack);
        sequences.extend(ack.records.iter().map(|record| record.sequence));
    }
    let frames = server.state.lock().unwrap().received.len();
    assert!(frames < 20, "140 records in 20 concurrent sends were batched into {frames} frames");
    assert_eq!(frames, sequences.len());
    let Ok(client) = std::sync::Arc::try_unwrap(client) else { panic!("every send is done") };
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_resend_after_lost_answer_reuses_sequence_and_frame_bytes_and_is_not_duplicated() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    server.faults(|faults| faults.close_after_store = 1);
    let client = DeviceClient::connect(&profile(directory.path(), &server, "dev-1")).await.unwrap();
    let sent = records("dev-1", 5);
    let ack = client.send("telemetry", sent.clone()).await.unwrap();
    let sequence = ack.records[0].sequence.0;
    let arrivals = server.arrivals("dev-1", sequence);
    assert_eq!(arrivals.len(), 2, "stored once, answer lost, resent once");
    assert_eq!(arrivals[0].archive, arrivals[1].archive, "the resend is the same frame bytes");
    assert_eq!(server.state.lock().unwrap().connections, 2, "the resend went over a new connection");
    assert_acks_match_the_log(&server, "dev-1", &sent, &ack);
    assert_eq!(server.stored_of("dev-1").len(), 5);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_frame_times_out_and_is_resent_on_a_new_connection() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    server.faults(|faults| faults.silent_after_store = 1);
    let mut profile = profile(directory.path(), &server, "dev-1");
    profile.timeouts.answer_ms = 300;
    let client = DeviceClient::connect(&profile).await.unwrap();
    let started = Instant::now();
    let sent = records("dev-1", 3);
    let ack = client.send("telemetry", sent.clone()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let arrivals = server.arrivals("dev-1", ack.records[0].sequence.0);
    assert_eq!(arrivals.len(), 2);
    assert_eq!(arrivals[0].archive, arrivals[1].archive);
    assert_acks_match_the_log(&server, "dev-1", &sent, &ack);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_with_retry_after_is_waited_out_then_the_same_frame_is_resent() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    server.faults(|faults| {
        faults.backpressure = 2;
        faults.retry_after_ms = 200;
    });
    let client = DeviceClient::connect(&profile(directory.path(), &server, "dev-1")).await.unwrap();
    let sent = records("dev-1", 4);
    let ack = client.send("telemetry", sent.clone()).await.unwrap();
    let arrivals = server.arrivals("dev-1", ack.records[0].sequence.0);
    assert_eq!(arrivals.len(), 3, "refused twice, stored on the third try");
    for pair in arrivals.windows(2) {
        assert_eq!(pair[0].archive, pair[1].archive);
        let waited = pair[1].at - pair[0].at;
        assert!(waited >= Duration::from_millis(200), "resent after {waited:?}, before retry_after_ms");
    }
    assert_eq!(server.state.lock().unwrap().connections, 1, "backpressure keeps the connection");
    assert_acks_match_the_log(&server, "dev-1", &sent, &ack);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_that_never_ends_exhausts_the_bounded_retries() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    server.faults(|faults| {
        faults.backpressure = usize::MAX;
        faults.retry_after_ms = 10;
    });
    let mut profile = profile(directory.path(), &server, "dev-1");
    profile.retry.attempts_max = 3;
    let client = DeviceClient::connect(&profile).await.unwrap();
    let error = client.send("telemetry", records("dev-1", 1)).await.unwrap_err();
    let DeviceError::RetriesExhausted { attempts: 3, last: LinkError::Retryable { code, .. }, .. } = &error else {
        panic!("{error}")
    };
    assert_eq!(*code, ErrorCode::Backpressure);
    assert_eq!(server.state.lock().unwrap().received.len(), 3);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_device_may_not_write_is_a_typed_refusal_and_the_client_goes_on() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    server.faults(|faults| faults.refused_topics = vec!["secret".into()]);
    let client = DeviceClient::connect(&profile(directory.path(), &server, "dev-1")).await.unwrap();
    let error = client.send("secret", records("dev-1", 2)).await.unwrap_err();
    let DeviceError::Refused { code, message, .. } = &error else { panic!("{error}") };
    assert_eq!(*code, ErrorCode::TopicNotAllowed);
    assert!(message.contains("dev-1"), "{message}");
    assert_eq!(server.state.lock().unwrap().received.len(), 1, "a non-retryable refusal is not resent");
    let sent = records("dev-1", 2);
    let ack = client.send("telemetry", sent.clone()).await.unwrap();
    assert_acks_match_the_log(&server, "dev-1", &sent, &ack);
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_certificate_from_another_ca_is_refused_with_a_typed_error() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let rogue = tempfile::tempdir().unwrap();
    certs(rogue.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    let mut profile = profile(directory.path(), &server, "dev-1");
    profile.tls.certificate = rogue.path().join("devices/dev-1.pem");
    profile.tls.key = rogue.path().join("devices/dev-1.key");
    // TLS 1.3: the client may finish its handshake before the server checks the
    // certificate, so the refusal shows at connect or at the first send.
    let error = match DeviceClient::connect(&profile).await {
        Err(error) => error,
        Ok(client) => client.send("telemetry", records("dev-1", 1)).await.unwrap_err(),
    };
    assert!(matches!(error, DeviceError::CredentialsRefused(_)), "{error}");
    assert!(server.state.lock().unwrap().received.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_server_ca_is_refused_at_connect() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let other = tempfile::tempdir().unwrap();
    certs(other.path(), &[]);
    let server = TestServer::start(directory.path());
    let mut profile = profile(directory.path(), &server, "dev-1");
    profile.tls.ca = other.path().join("ca.pem");
    let error = DeviceClient::connect(&profile).await.err().expect("the server's CA is not trusted");
    assert!(matches!(error, DeviceError::CredentialsRefused(_)), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_increase_across_restarts_and_the_state_file_stays_ahead() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    let mut profile = profile(directory.path(), &server, "dev-1");
    let state_file = directory.path().join("dev-1.sequence");
    profile.sequence.state_file = Some(state_file.clone());
    profile.sequence.reserve = 2;
    profile.batch.linger_ms = 0;
    let mut last = 0;
    for _restart in 0..3 {
        let client = DeviceClient::connect(&profile).await.unwrap();
        for _ in 0..3 {
            let ack = client.send("telemetry", records("dev-1", 1)).await.unwrap();
            let sequence = ack.records[0].sequence.0;
            assert!(sequence > last, "{sequence} after {last}");
            last = sequence;
            let stored: u64 = std::fs::read_to_string(&state_file).unwrap().trim().parse().unwrap();
            assert!(stored > sequence, "the file ({stored}) must be ahead of every used sequence ({sequence})");
        }
        client.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_protocol_refuses_fail_locally_before_anything_is_sent() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    let mut profile = profile(directory.path(), &server, "dev-1");
    profile.flow.queue_records_max = 300;
    let client = DeviceClient::connect(&profile).await.unwrap();
    let mut bad = records("dev-1", 3);
    bad[2].headers.push(weir_device::Header { key: "weir.device".into(), value: None });
    assert!(matches!(client.send("telemetry", bad).await, Err(DeviceError::InvalidRecord { index: 2, .. })));
    assert!(matches!(client.send("", records("dev-1", 1)).await, Err(DeviceError::InvalidTopic { .. })));
    assert!(matches!(
        client.send("telemetry", records("dev-1", 301)).await,
        Err(DeviceError::TooManyRecords { records: 301, max: 300 })
    ));
    assert!(server.state.lock().unwrap().received.is_empty());
    client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_address_is_tried_a_bounded_number_of_times_then_the_next_one_is_used() {
    let directory = tempfile::tempdir().unwrap();
    certs(directory.path(), &["dev-1"]);
    let server = TestServer::start(directory.path());
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap(); // bound, never answers
    let mut profile = profile(directory.path(), &server, "dev-1");
    profile.timeouts.connect_ms = 200;
    profile.retry.attempts_max = 2;
    profile.server.addresses = vec![black_hole.local_addr().unwrap().to_string()];
    let started = Instant::now();
    let error = DeviceClient::connect(&profile).await.err().expect("nothing answers");
    assert!(matches!(error, DeviceError::Unreachable(LinkError::ConnectTimeout { .. })), "{error}");
    assert!(started.elapsed() >= Duration::from_millis(400), "two tries of 200 ms");
    profile.server.addresses.push(server.address.to_string());
    let client = DeviceClient::connect(&profile).await.unwrap();
    let sent = records("dev-1", 2);
    let ack = client.send("telemetry", sent.clone()).await.unwrap();
    assert_acks_match_the_log(&server, "dev-1", &sent, &ack);
    client.close().await.unwrap();
}
