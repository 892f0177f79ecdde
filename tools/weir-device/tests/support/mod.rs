//! A small QUIC server for tests only: quinn on tokio, mutual TLS from a `weir certs`
//! directory, device protocol v1 through `weir::core::protocol` (check_produce,
//! ack_frame, error_frame). It stores records in memory per partition, answers a
//! resent (device, sequence) with the stored offsets, and injects the faults a test
//! asks for: drop the answer by closing the connection after storing, store and never
//! answer, refuse with Backpressure, refuse topics.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weir_protocol::batch::Record;
use weir_protocol::{
    ack_frame, check_produce, encode, error_frame, with_length_prefix, AckPart, AnswerFrame, ErrorCode, ALPN,
    FRAME_LIMITS_V1,
};

pub const PARTITIONS: u32 = 2;

#[derive(Debug, Default)]
pub struct Faults {
    /// Close the connection (no answer) after storing each of the next this many frames.
    pub close_after_store: usize,
    /// Store each of the next this many frames and never answer them.
    pub silent_after_store: usize,
    /// Refuse the next this many new frames with Backpressure and this retry-after.
    pub backpressure: usize,
    pub retry_after_ms: u32,
    /// Topics refused with TopicNotAllowed.
    pub refused_topics: Vec<String>,
}

/// A stored record with who sent it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub device: String,
    pub sequence: u64,
    pub record_index: u32,
    pub record: Record,
}

/// One produce frame as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub device: String,
    pub sequence: u64,
    pub archive: Vec<u8>,
    pub at: std::time::Instant,
}

#[derive(Debug, Default)]
pub struct ServerState {
    pub received: Vec<Received>,
    pub partitions: HashMap<u32, Vec<Stored>>,
    pub answered: HashMap<(String, u64), Vec<AckPart>>,
    pub connections: usize,
    pub faults: Faults,
}

pub struct TestServer {
    pub address: SocketAddr,
    pub state: Arc<Mutex<ServerState>>,
    endpoint: quinn::Endpoint,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

fn partition_of(record: &Record) -> u32 {
    let key = record.key.as_deref().unwrap_or_default();
    key.iter().map(|byte| u32::from(*byte)).sum::<u32>() % PARTITIONS
}

impl TestServer {
    /// Serves on 127.0.0.1 with the certificates of a `weir certs` directory.
    pub fn start(certs: &Path) -> TestServer {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
            roots.add(certificate.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(certs.join("server.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap();
        let server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let address = endpoint.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ServerState::default()));
        tokio::spawn(accept_loop(endpoint.clone(), state.clone()));
        TestServer { address, state, endpoint }
    }

    pub fn faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.state.lock().unwrap().faults);
    }

    /// Every stored record of `device`, as (sequence, record_index, partition, offset).
    pub fn stored_of(&self, device: &str) -> Vec<(u64, u32, u32, i64)> {
        let state = self.state.lock().unwrap();
        let mut stored = Vec::new();
        for (partition, records) in &state.partitions {
            for (offset, record) in records.iter().enumerate() {
                if record.device == device {
                    stored.push((record.sequence, record.record_index, *partition, offset as i64));
                }
            }
        }
        stored.sort();
        stored
    }

    /// The archive bytes of every arrival of (device, sequence), in arrival order.
    pub fn arrivals(&self, device: &str, sequence: u64) -> Vec<Received> {
        let state = self.state.lock().unwrap();
        state
            .received
            .iter()
            .filter(|received| received.device == device && received.sequence == sequence)
            .cloned()
            .collect()
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<Mutex<ServerState>>) {
    while let Some(incoming) = endpoint.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else { return };
            let device = connection
                .peer_identity()
                .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|chain| chain.first().and_then(|leaf| weir_protocol::device_id::device_id_of(leaf)));
            let Some(device) = device else {
                connection.close(1u32.into(), b"no device id");
                return;
            };
            state.lock().unwrap().connections += 1;
            while let Ok((send, receive)) = connection.accept_bi().await {
                tokio::spawn(serve_stream(connection.clone(), device.clone(), send, receive, state.clone()));
            }
        });
    }
}

enum Reply {
    Answer(AnswerFrame),
    Close,
    Silent,
}

fn handle_frame(state: &Mutex<ServerState>, device: &str, archive: &[u8]) -> Reply {
    let produce = match check_produce(archive, &FRAME_LIMITS_V1) {
        Ok(produce) => produce,
        Err(error) => return Reply::Answer(error_frame(0, error.code(), &error.to_string(), 0)),
    };
    let mut state = state.lock().unwrap();
    let sequence = produce.sequence;
    state.received.push(Received {
        device: device.to_owned(),
        sequence,
        archive: archive.to_vec(),
        at: std::time::Instant::now(),
    });
    if let Some(parts) = state.answered.get(&(device.to_owned(), sequence)) {
        return Reply::Answer(ack_frame(sequence, parts.clone()));
    }
    if state.faults.refused_topics.contains(&produce.topic) {
        let message = format!("device {device} may not write to {}", produce.topic);
        return Reply::Answer(error_frame(sequence, ErrorCode::TopicNotAllowed, &message, 0));
    }
    if state.faults.backpressure > 0 {
        state.faults.backpressure -= 1;
        let retry_after_ms = state.faults.retry_after_ms;
        return Reply::Answer(error_frame(sequence, ErrorCode::Backpressure, "partition 0 is behind", retry_after_ms));
    }
    let mut parts: Vec<AckPart> = Vec::new();
    for (index, record) in produce.records.into_iter().enumerate() {
        let partition = partition_of(&record);
        let log = state.partitions.entry(partition).or_default();
        let offset = log.len() as i64;
        log.push(Stored { device: device.to_owned(), sequence, record_index: index as u32, record });
        match parts.last_mut() {
            Some(last) if last.partition == partition && last.base_offset + i64::from(last.record_count) == offset => {
                last.record_count += 1
            }
            _ => parts.push(AckPart {
                base_offset: offset,
                partition,
                first_record: index as u32,
                record_count: 1,
                reserved: 0,
            }),
        }
    }
    state.answered.insert((device.to_owned(), sequence), parts.clone());
    if state.faults.close_after_store > 0 {
        state.faults.close_after_store -= 1;
        return Reply::Close;
    }
    if state.faults.silent_after_store > 0 {
        state.faults.silent_after_store -= 1;
        return Reply::Silent;
    }
    Reply::Answer(ack_frame(sequence, parts))
}

async fn serve_stream(
    connection: quinn::Connection,
    device: String,
    mut send: quinn::SendStream,
    mut receive: quinn::RecvStream,
    state: Arc<Mutex<ServerState>>,
) {
    loop {
        let mut prefix = [0u8; 4];
        if receive.read_exact(&mut prefix).await.is_err() {
            return;
        }
        let length = u32::from_be_bytes(prefix) as usize;
        if length == 0 || length > FRAME_LIMITS_V1.frame_bytes_max {
            connection.close(2u32.into(), b"bad frame length");
            return;
        }
        let mut archive = vec![0u8; length];
        if receive.read_exact(&mut archive).await.is_err() {
            return;
        }
        match handle_frame(&state, &device, &archive) {
            Reply::Answer(answer) => {
                if send.write_all(&with_length_prefix(&encode(&answer))).await.is_err() {
                    return;
                }
            }
            Reply::Close => {
                connection.close(0u32.into(), b"test: the answer is lost");
                return;
            }
            Reply::Silent => {}
        }
    }
}
