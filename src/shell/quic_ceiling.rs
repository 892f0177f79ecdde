//! The raw QUIC loopback ceiling: what QUIC itself does on this host with weir's TLS,
//! transport limits, sockets and driver, but with no protocol work and no storage.
//!
//! [`DiscardServer`] binds exactly what `weir serve` binds for a config
//! (`runtime::prepare_quic`: the same certificates, client-certificate check, ALPN
//! `weir/1`, transport windows, one SO_REUSEPORT socket per core with the steering
//! program) and runs the same quinn-proto driver (`quic::run_core`) on one pinned
//! glommio executor per core. Only the frame handling differs: every produce frame is
//! answered at once, through `Appender::answer_unchecked`, with an ack of the shape weir
//! sends (the frame's sequence, one part covering all its records), read from the fixed
//! root of the archive without validating it. Devices therefore see the request/answer
//! round trip they see with weir, minus frame checks, routing, the cross-core mesh,
//! group commit and fdatasync.
//!
//! `weir-bench ingest` drives it with the same device fleet as weir in the same run, and
//! `weir doctor --measure` drives it with [`measure_loopback`]; both call this code.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::config::ValidConfig;
use crate::core::log::batch::Record;
use crate::core::protocol::{self, AckPart, ErrorCode, KIND_PRODUCE, PROTOCOL_VERSION};
use crate::shell::quic::{self, AppendFailure, Appender, QuicStats};
use crate::shell::runtime::{self, Fatal};
use crate::shell::shutdown;

/// The root of a ProduceFrame archive (docs/PROTOCOL.md §4): its size and the offsets
/// of the fields the discard answer needs.
const PRODUCE_ROOT_BYTES: usize = 32;
const ROOT_VERSION_AT: usize = 0;
const ROOT_KIND_AT: usize = 2;
const ROOT_SEQUENCE_AT: usize = 8;
const ROOT_RECORDS_LEN_AT: usize = 28;
const _: () = assert!(ROOT_RECORDS_LEN_AT + 4 == PRODUCE_ROOT_BYTES);

/// The sequence and record count of a produce frame, read from its root without any
/// check of the rest (the ceiling trusts its own clients); `None` if it has no such root.
pub fn produce_root(frame: &[u8]) -> Option<(u64, u32)> {
    if frame.len() < PRODUCE_ROOT_BYTES || !frame.len().is_multiple_of(protocol::FRAME_ALIGNMENT_BYTES) {
        return None;
    }
    let root = &frame[frame.len() - PRODUCE_ROOT_BYTES..];
    let u16_at = |at: usize| u16::from_le_bytes([root[at], root[at + 1]]);
    if u16_at(ROOT_VERSION_AT) != PROTOCOL_VERSION || u16_at(ROOT_KIND_AT) != KIND_PRODUCE {
        return None;
    }
    let sequence = u64::from_le_bytes(root[ROOT_SEQUENCE_AT..ROOT_SEQUENCE_AT + 8].try_into().expect("8 bytes"));
    let records = u32::from_le_bytes(root[ROOT_RECORDS_LEN_AT..ROOT_RECORDS_LEN_AT + 4].try_into().expect("4 bytes"));
    (records > 0).then_some((sequence, records))
}

/// What one core of the discard server answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardTotals {
    pub frames: u64,
    pub records: u64,
    pub refused_frames: u64,
}

impl DiscardTotals {
    fn add(&mut self, other: DiscardTotals) {
        self.frames += other.frames;
        self.records += other.records;
        self.refused_frames += other.refused_frames;
    }
}

/// Answers every frame with an ack and stores nothing. Offsets count up per core, as
/// if one partition took every record.
#[derive(Debug, Default)]
pub struct DiscardAppender {
    next_offset: Cell<i64>,
    frames: Cell<u64>,
    records: Cell<u64>,
    refused_frames: Cell<u64>,
}

impl DiscardAppender {
    pub fn totals(&self) -> DiscardTotals {
        DiscardTotals {
            frames: self.frames.get(),
            records: self.records.get(),
            refused_frames: self.refused_frames.get(),
        }
    }

    fn take_offsets(&self, records: u32) -> i64 {
        let base = self.next_offset.get();
        self.next_offset.set(base + i64::from(records));
        self.frames.set(self.frames.get() + 1);
        self.records.set(self.records.get() + u64::from(records));
        base
    }
}

impl Appender for DiscardAppender {
    fn append(
        &self,
        _topic: String,
        _partition: u32,
        records: Vec<Record>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, AppendFailure>>>> {
        // Not reached (every frame is answered unchecked); discards all the same.
        let base = self.take_offsets(records.len() as u32);
        Box::pin(async move { Ok(base) })
    }

    fn answer_unchecked(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let answer = match produce_root(frame) {
            Some((sequence, record_count)) => {
                let base_offset = self.take_offsets(record_count);
                let part = AckPart { base_offset, partition: 0, first_record: 0, record_count, reserved: 0 };
                protocol::ack_frame(sequence, vec![part])
            }
            None => {
                self.refused_frames.set(self.refused_frames.get() + 1);
                protocol::error_frame(0, ErrorCode::MalformedFrame, "the ceiling reads produce frames only", 0)
            }
        };
        Some(protocol::with_length_prefix(&protocol::encode(&answer)))
    }
}

/// The discard server, running until [`DiscardServer::stop`].
pub struct DiscardServer {
    address: SocketAddr,
    shutdown: Arc<AtomicBool>,
    cores: Vec<glommio::ExecutorJoinHandle<Result<(QuicStats, DiscardTotals), String>>>,
}

/// What the discard server did, over all cores.
#[derive(Debug, Clone, Default)]
pub struct DiscardReport {
    pub totals: DiscardTotals,
    pub connections_accepted: u64,
    pub connections_refused: u64,
}

impl DiscardServer {
    /// Binds what `weir serve` would bind for `valid` (its `quic.listen`, so use port 0
    /// next to a running weir) and starts one pinned executor per configured core.
    pub fn start(valid: &ValidConfig) -> Result<DiscardServer, Fatal> {
        let prepared = runtime::prepare_quic(valid)?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut server = DiscardServer { address: prepared.address, shutdown: shutdown.clone(), cores: Vec::new() };
        for (core, (cpu, socket)) in valid.cores.iter().copied().zip(prepared.sockets).enumerate() {
            let settings = prepared.settings.clone();
            let shutdown = shutdown.clone();
            let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("weir-ceiling-{core}"))
                .io_memory(valid.config.engine.io_memory_bytes.0 as usize)
                .spawn(move || async move {
                    let appender = Rc::new(DiscardAppender::default());
                    // No forwarding mesh: the cBPF program steers every datagram of a
                    // connection to its core; one that strays is dropped, not forwarded.
                    let stats = quic::run_core(core, socket, settings, appender.clone(), shutdown, None)
                        .await
                        .map_err(|error| format!("core {core}: {error}"))?;
                    Ok((stats, appender.totals()))
                });
            match spawned {
                Ok(handle) => server.cores.push(handle),
                Err(error) => {
                    let _ = server.stop();
                    return Err(Fatal::CoreStart { core, cpu, reason: error.to_string() });
                }
            }
        }
        Ok(server)
    }

    /// Where devices connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Closes every connection (bounded wait) and stops the cores.
    pub fn stop(self) -> Result<DiscardReport, String> {
        shutdown::signal(&self.shutdown);
        let mut report = DiscardReport::default();
        let mut first_error = None;
        for handle in self.cores {
            match handle.join() {
                Ok(Ok((stats, totals))) => {
                    report.totals.add(totals);
                    report.connections_accepted += stats.connections_accepted;
                    report.connections_refused += stats.connections_refused;
                }
                Ok(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                Err(error) => {
                    first_error.get_or_insert(format!("a ceiling core failed: {error}"));
                }
            }
        }
        first_error.map_or(Ok(report), Err)
    }
}

/// The loopback load of [`measure_loopback`]: connections, frames and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopbackLoad {
    pub connections: usize,
    pub record_bytes: usize,
    pub records_per_frame: usize,
    /// Frames each connection keeps unanswered (the device profile's default is 4).
    pub frames_in_flight: usize,
    pub duration: Duration,
}

/// What [`measure_loopback`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopbackCeiling {
    pub connections: usize,
    pub record_bytes: usize,
    pub records_per_frame: usize,
    pub records_per_s: f64,
    pub mb_per_s: f64,
    /// From writing a frame to reading its answer, in microseconds.
    pub round_trip_us_p50: u64,
    pub round_trip_us_p99: u64,
}

/// Why a loopback measurement failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoopbackError {
    #[error("{0}")]
    Server(#[from] Fatal),
    #[error("development PKI in {path}: {why}")]
    Pki { path: std::path::PathBuf, why: String },
    #[error("client TLS: {0}")]
    Tls(String),
    #[error("client socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{connected} of {connections} connections within {CONNECT_WAIT_MAX:?}: {why}")]
    Connect { connected: usize, connections: usize, why: String },
    #[error("a connection was lost: {0}")]
    Lost(String),
    #[error("an answer was not an ack: {0}")]
    Answer(String),
    #[error("executor: {0}")]
    Executor(String),
    #[error("discard server: {0}")]
    Stop(String),
}

/// How long the loopback clients may take to connect.
const CONNECT_WAIT_MAX: Duration = Duration::from_secs(10);
/// The device id of the loopback clients' certificate.
const LOOPBACK_DEVICE: &str = "weir-ceiling-0";

/// The loopback QUIC ceiling of a config: a [`DiscardServer`] on its cores (its QUIC
/// settings, on 127.0.0.1 port 0, with a throwaway development PKI so no operator key
/// is needed), and `load.connections` quinn-proto clients on one more glommio executor
/// writing produce frames of `load.records_per_frame` records of `load.record_bytes`
/// each, `load.frames_in_flight` unanswered per connection, for `load.duration`.
/// The appliance has no tokio, so these clients are quinn-proto driven like the server;
/// `weir-bench ingest` drives the same server with weir-sim's quinn devices instead.
pub fn measure_loopback(valid: &ValidConfig, load: LoopbackLoad) -> Result<LoopbackCeiling, LoopbackError> {
    assert!(load.connections > 0 && load.records_per_frame > 0 && load.frames_in_flight > 0);
    let pki = std::env::temp_dir().join(format!("weir-quic-ceiling-{}-{}", std::process::id(), rand_u64()));
    let outcome = measure_with_pki(valid, load, &pki);
    let _ = std::fs::remove_dir_all(&pki);
    outcome
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    use rustls::crypto::ring::default_provider;
    default_provider().secure_random.fill(&mut bytes).expect("the system RNG works");
    u64::from_le_bytes(bytes)
}

fn measure_with_pki(valid: &ValidConfig, load: LoopbackLoad, pki: &Path) -> Result<LoopbackCeiling, LoopbackError> {
    let pki_error = |why: String| LoopbackError::Pki { path: pki.to_owned(), why };
    crate::certs::generate(pki, &[], &[LOOPBACK_DEVICE.to_owned()], 1).map_err(|error| pki_error(error.to_string()))?;
    let mut config = valid.clone();
    config.config.quic.listen = "127.0.0.1:0".to_owned();
    config.config.quic.certs_dir = pki.to_owned();
    config.config.quic.generate_dev_certs = false;
    config.config.quic.connections_max = config.config.quic.connections_max.max(load.connections as u32);
    // Every client connection presents the one throwaway device certificate.
    config.config.quic.connections_per_device_max =
        config.config.quic.connections_per_device_max.max(load.connections as u32);
    let client = client_config(pki, &config)?;
    let server = DiscardServer::start(&config)?;
    let address = server.address();
    let spawned = LocalExecutorBuilder::new(Placement::Unbound)
        .name("weir-ceiling-clients")
        .spawn(move || async move { drive_clients(client, address, load).await });
    let measured = match spawned {
        Ok(handle) => {
            handle.join().map_err(|error| LoopbackError::Executor(error.to_string())).and_then(|result| result)
        }
        Err(error) => Err(LoopbackError::Executor(error.to_string())),
    };
    let stopped = server.stop();
    let measured = measured?;
    stopped.map_err(LoopbackError::Stop)?;
    Ok(measured)
}

fn client_config(pki: &Path, valid: &ValidConfig) -> Result<quinn_proto::ClientConfig, LoopbackError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |error: &dyn std::fmt::Display| LoopbackError::Tls(error.to_string());
    let read_chain = |path: std::path::PathBuf| -> Result<Vec<CertificateDer<'static>>, LoopbackError> {
        CertificateDer::pem_file_iter(&path)
            .map_err(|error| tls(&error))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| tls(&error))
    };
    let mut roots = rustls::RootCertStore::empty();
    for root in read_chain(pki.join("ca.pem"))? {
        roots.add(root).map_err(|error| tls(&error))?;
    }
    let chain = read_chain(pki.join(format!("devices/{LOOPBACK_DEVICE}.pem")))?;
    let key = PrivateKeyDer::from_pem_file(pki.join(format!("devices/{LOOPBACK_DEVICE}.key")))
        .map_err(|error| tls(&error))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| tls(&error))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|error| tls(&error))?;
    crypto.alpn_protocols = vec![protocol::ALPN.to_vec()];
    let quic = quinn_proto::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|error| tls(&error))?;
    let mut client = quinn_proto::ClientConfig::new(Arc::new(quic));
    // A device's transport: its own stream only, windows as large as the server's.
    let window = valid.config.quic.stream_window_bytes.0 as u32;
    let mut transport = quinn_proto::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(window.into())
        .receive_window(window.into())
        .datagram_receive_buffer_size(None);
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// One loopback client connection.
struct LoopbackConnection {
    connection: quinn_proto::Connection,
    stream: Option<quinn_proto::StreamId>,
    /// Bytes of the current frame not yet accepted by the stream.
    unsent_from: Option<usize>,
    /// When each unanswered frame was written, oldest first.
    sent_at: std::collections::VecDeque<Instant>,
    answers: Vec<u8>,
}

async fn drive_clients(
    client: quinn_proto::ClientConfig,
    server: SocketAddr,
    load: LoopbackLoad,
) -> Result<LoopbackCeiling, LoopbackError> {
    use std::collections::HashMap;
    use std::io::IoSliceMut;

    use bytes::BytesMut;
    use quinn_proto::{DatagramEvent, Dir, Endpoint, EndpointConfig, Event};
    use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};

    const RECV_BATCH: usize = 32;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.set_nonblocking(true)?;
    let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
    let readiness = glommio::net::UdpSocket::from(socket2::Socket::from(socket.try_clone()?));
    let mut endpoint = Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None);
    let record = Record {
        timestamp_ms: 1_700_000_000_000,
        key: Some(bytes::Bytes::from_static(LOOPBACK_DEVICE.as_bytes())),
        value: Some(bytes::Bytes::from(vec![b'.'; load.record_bytes])),
        headers: Vec::new(),
    };
    let records = vec![record; load.records_per_frame];
    let frame = protocol::with_length_prefix(&protocol::encode(&protocol::produce_frame(1, "telemetry", &records)));
    let started = Instant::now();
    let mut connections: HashMap<quinn_proto::ConnectionHandle, LoopbackConnection> = HashMap::new();
    for _ in 0..load.connections {
        let (handle, connection) = endpoint
            .connect(started, client.clone(), server, "localhost")
            .map_err(|error| LoopbackError::Tls(error.to_string()))?;
        connections.insert(
            handle,
            LoopbackConnection {
                connection,
                stream: None,
                unsent_from: None,
                sent_at: Default::default(),
                answers: Vec::new(),
            },
        );
    }
    let gro = state.gro_segments().max(1);
    let mut receive_buffers: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; 65_535 * gro.min(8)]).collect();
    let mut transmit_buffer: Vec<u8> = Vec::with_capacity(65_535);
    let mut response_buffer: Vec<u8> = Vec::new();
    let max_gso = state.max_gso_segments().max(1);
    let mut round_trips_us: Vec<u64> = Vec::new();
    let mut measuring_since: Option<Instant> = None;
    let mut answered_frames = 0u64;
    let send = |transmit: &quinn_proto::Transmit, buffer: &[u8]| {
        let transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: None,
            contents: &buffer[..transmit.size],
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        // A full socket buffer drops the datagram; QUIC's loss recovery resends it.
        let _ = state.try_send(UdpSockRef::from(&socket), &transmit);
    };
    loop {
        let now = Instant::now();
        let connected = connections.values().filter(|conn| conn.stream.is_some()).count();
        match measuring_since {
            None if connected == load.connections => measuring_since = Some(now),
            None if now.duration_since(started) > CONNECT_WAIT_MAX => {
                return Err(LoopbackError::Connect {
                    connected,
                    connections: load.connections,
                    why: "handshakes did not finish".into(),
                })
            }
            Some(since) if now.duration_since(since) >= load.duration => break,
            _ => {}
        }
        loop {
            let mut metas = [RecvMeta::default(); RECV_BATCH];
            let mut slices: Vec<IoSliceMut<'_>> =
                receive_buffers.iter_mut().map(|buffer| IoSliceMut::new(buffer.as_mut_slice())).collect();
            let count = match state.recv(UdpSockRef::from(&socket), &mut slices, &mut metas) {
                Ok(count) => count,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error.into()),
            };
            drop(slices);
            for (meta, buffer) in metas.iter().zip(receive_buffers.iter()).take(count) {
                let mut data = &buffer[..meta.len];
                while !data.is_empty() {
                    let length = data.len().min(meta.stride.max(1));
                    let datagram = BytesMut::from(&data[..length]);
                    data = &data[length..];
                    response_buffer.clear();
                    match endpoint.handle(now, meta.addr, meta.dst_ip, None, datagram, &mut response_buffer) {
                        Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                            if let Some(conn) = connections.get_mut(&handle) {
                                conn.connection.handle_event(event);
                            }
                        }
                        Some(DatagramEvent::Response(transmit)) => send(&transmit, &response_buffer),
                        _ => {}
                    }
                }
            }
        }
        for (handle, conn) in connections.iter_mut() {
            if conn.connection.poll_timeout().is_some_and(|deadline| deadline <= now) {
                conn.connection.handle_timeout(now);
            }
            while let Some(event) = conn.connection.poll_endpoint_events() {
                if let Some(reply) = endpoint.handle_event(*handle, event) {
                    conn.connection.handle_event(reply);
                }
            }
            while let Some(event) = conn.connection.poll() {
                match event {
                    Event::Connected => conn.stream = conn.connection.streams().open(Dir::Bi),
                    Event::ConnectionLost { reason } => return Err(LoopbackError::Lost(reason.to_string())),
                    _ => {}
                }
            }
            if let Some(stream) = conn.stream {
                exchange_frames(
                    conn,
                    stream,
                    &frame,
                    now,
                    &load,
                    measuring_since,
                    &mut answered_frames,
                    &mut round_trips_us,
                )?;
            }
            loop {
                transmit_buffer.clear();
                let Some(transmit) = conn.connection.poll_transmit(now, max_gso, &mut transmit_buffer) else { break };
                send(&transmit, &transmit_buffer);
            }
        }
        let next_timer = connections.values_mut().filter_map(|conn| conn.connection.poll_timeout()).min();
        let wait = next_timer
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        if wait.is_zero() {
            glommio::yield_if_needed().await;
            continue;
        }
        let mut peek = [0u8; 1];
        let readable = async {
            if readiness.peek_from(&mut peek).await.is_err() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        };
        futures_lite::future::or(readable, glommio::timer::sleep(wait)).await;
    }
    let elapsed = measuring_since.map_or(Duration::ZERO, |since| since.elapsed()).as_secs_f64().max(1e-9);
    for conn in connections.values_mut() {
        conn.connection.close(Instant::now(), 0u32.into(), bytes::Bytes::from_static(b"measured"));
        transmit_buffer.clear();
        if let Some(transmit) = conn.connection.poll_transmit(Instant::now(), 1, &mut transmit_buffer) {
            send(&transmit, &transmit_buffer);
        }
    }
    round_trips_us.sort_unstable();
    let percentile = |percent: usize| -> u64 {
        if round_trips_us.is_empty() {
            return 0;
        }
        let rank = (round_trips_us.len() * percent).div_ceil(100).max(1);
        round_trips_us[rank.min(round_trips_us.len()) - 1]
    };
    let records_per_s = answered_frames as f64 * load.records_per_frame as f64 / elapsed;
    Ok(LoopbackCeiling {
        connections: load.connections,
        record_bytes: load.record_bytes,
        records_per_frame: load.records_per_frame,
        records_per_s,
        mb_per_s: records_per_s * load.record_bytes as f64 / 1e6,
        round_trip_us_p50: percentile(50),
        round_trip_us_p99: percentile(99),
    })
}

/// Reads a client connection's answers (counting the frames answered while measuring)
/// and writes frames up to the window.
#[allow(clippy::too_many_arguments)]
fn exchange_frames(
    conn: &mut LoopbackConnection,
    stream: quinn_proto::StreamId,
    frame: &[u8],
    now: Instant,
    load: &LoopbackLoad,
    measuring_since: Option<Instant>,
    answered_frames: &mut u64,
    round_trips_us: &mut Vec<u64>,
) -> Result<(), LoopbackError> {
    // Answers in: count whole answer frames.
    if let Ok(mut chunks) = conn.connection.recv_stream(stream).read(true) {
        while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
            conn.answers.extend_from_slice(&chunk.bytes);
        }
        let _ = chunks.finalize();
    }
    let mut consumed = 0;
    while conn.answers.len() - consumed >= protocol::FRAME_LENGTH_PREFIX_BYTES {
        let prefix = &conn.answers[consumed..consumed + protocol::FRAME_LENGTH_PREFIX_BYTES];
        let length = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        let end = consumed + protocol::FRAME_LENGTH_PREFIX_BYTES + length;
        if conn.answers.len() < end {
            break;
        }
        let answer = protocol::check_answer(
            &conn.answers[consumed + protocol::FRAME_LENGTH_PREFIX_BYTES..end],
            &protocol::FRAME_LIMITS_V1,
        )
        .map_err(|error| LoopbackError::Answer(error.to_string()))?;
        if answer.kind != protocol::KIND_ACK {
            return Err(LoopbackError::Answer(String::from_utf8_lossy(&answer.message).into_owned()));
        }
        consumed = end;
        if let Some(sent) = conn.sent_at.pop_front() {
            if measuring_since.is_some_and(|since| sent >= since) {
                *answered_frames += 1;
                round_trips_us.push(now.duration_since(sent).as_micros() as u64);
            }
        }
    }
    conn.answers.drain(..consumed);
    // Frames out, up to the window.
    loop {
        let from = match conn.unsent_from {
            Some(from) => from,
            None if conn.sent_at.len() < load.frames_in_flight => {
                conn.sent_at.push_back(now);
                0
            }
            None => break,
        };
        match conn.connection.send_stream(stream).write(&frame[from..]) {
            Ok(written) if from + written == frame.len() => conn.unsent_from = None,
            Ok(written) => {
                conn.unsent_from = Some(from + written);
                break;
            }
            Err(_) => {
                conn.unsent_from = Some(from);
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::{check_answer, encode, produce_frame, FRAME_LIMITS_V1, KIND_ACK};

    fn records(count: usize) -> Vec<Record> {
        (0..count)
            .map(|index| Record {
                timestamp_ms: 1_700_000_000_000 + index as i64,
                key: Some(bytes::Bytes::from(format!("k{index}"))),
                value: Some(bytes::Bytes::from(vec![7u8; 256])),
                headers: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn the_root_gives_the_sequence_and_record_count_of_a_real_frame() {
        for (sequence, count) in [(0u64, 1usize), (42, 3), (u64::MAX - 1, 256)] {
            let archive = encode(&produce_frame(sequence, "telemetry", &records(count)));
            assert_eq!(produce_root(&archive), Some((sequence, count as u32)));
        }
        assert_eq!(produce_root(&[0u8; 16]), None, "too short");
        let answer = encode(&protocol::ack_frame(5, Vec::new()));
        assert_eq!(produce_root(&answer), None, "not a produce frame");
    }

    #[test]
    fn the_discard_answer_is_an_ack_covering_every_record_with_growing_offsets() {
        let appender = DiscardAppender::default();
        for (sequence, count, base) in [(9u64, 3usize, 0i64), (10, 5, 3)] {
            let archive = encode(&produce_frame(sequence, "telemetry", &records(count)));
            let answer = appender.answer_unchecked(&archive).expect("always answers");
            let length = u32::from_be_bytes(answer[..4].try_into().unwrap()) as usize;
            assert_eq!(length + 4, answer.len());
            let frame = check_answer(&answer[4..], &FRAME_LIMITS_V1).expect("a valid answer");
            assert_eq!((frame.kind, frame.sequence), (KIND_ACK, sequence));
            assert_eq!(frame.parts.len(), 1);
            assert_eq!((frame.parts[0].base_offset, frame.parts[0].record_count), (base, count as u32));
        }
        assert_eq!(appender.totals(), DiscardTotals { frames: 2, records: 8, refused_frames: 0 });
        let refused = appender.answer_unchecked(&[1u8; 8]).expect("always answers");
        assert_eq!(check_answer(&refused[4..], &FRAME_LIMITS_V1).unwrap().kind, protocol::KIND_ERROR);
        assert_eq!(appender.totals().refused_frames, 1);
    }
}
