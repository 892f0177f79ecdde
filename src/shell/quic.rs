//! The QUIC listener of one core: a `quinn_proto::Endpoint` and its connections, driven
//! by hand on the core's glommio executor (high-level quinn cannot run on glommio; see
//! DESIGN.md). Datagrams move through `quinn-udp` on the raw socket (GSO, GRO, ECN);
//! readiness comes from a 1-byte `MSG_PEEK` on a glommio socket sharing the fd.
//!
//! The driver loop owns everything and never awaits while holding state: receive
//! datagrams -> `Endpoint::handle` -> connection events -> read streams into frames ->
//! spawn one task per frame (check, route, append, build the answer) -> write finished
//! answers in frame order per stream -> `poll_transmit` -> send -> sleep until the
//! socket is readable, the earliest connection timer, or a frame task finished.
//!
//! Limits: connections, streams per connection (transport config), frame bytes and
//! records per frame (protocol limits), frames in flight per connection; past the
//! handshake limit new connections must prove their address (Retry).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::future;
use glommio::channels::local_channel::{self, LocalSender};
use quinn_proto::{
    ConnectionHandle, ConnectionIdGenerator, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig,
    StreamEvent, StreamId, VarInt,
};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};

use crate::certs;
use crate::core::log::batch::Record;
use crate::core::protocol::{self, ErrorCode, FrameLimits};
use crate::core::session::{self, FrameAssembler};

/// How often the driver re-checks the shutdown flag while idle.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
/// How long a stopping listener waits for its connections to close.
const CLOSE_DRAIN_MAX: Duration = Duration::from_secs(2);
/// Datagrams received per `recvmmsg` call.
const RECV_BATCH: usize = 32;
/// QUIC application close codes.
const CLOSE_NO_IDENTITY: u32 = 0x101;
const CLOSE_DEVICE_DENIED: u32 = 0x102;
const CLOSE_PROTOCOL: u32 = 0x103;
const CLOSE_SHUTDOWN: u32 = 0x104;

/// Why an append failed, as it crosses cores: a protocol error code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendFailure {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: u32,
}

/// Appends records to a partition wherever it lives (this core or another).
pub trait Appender {
    fn append(
        &self,
        topic: String,
        partition: u32,
        records: Vec<Record>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, AppendFailure>>>>;

    /// The whole answer (length prefix included) to a frame, given before any check,
    /// route or append: only the raw QUIC ceiling (`shell::quic_ceiling`) answers here,
    /// so it measures this driver with no protocol work and no storage. weir's
    /// appenders keep the default, `None`.
    fn answer_unchecked(&self, _frame: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// Everything a core's listener needs, shared by all cores.
pub struct QuicSettings {
    pub server_config: Arc<ServerConfig>,
    pub limits: FrameLimits,
    pub connections_max: usize,
    pub handshakes_before_retry: usize,
    pub frames_in_flight_per_connection_max: usize,
    /// Topic name -> partition count.
    pub topics: HashMap<String, u32>,
    /// Topics devices may write (every topic when None).
    pub topics_allowed: Option<HashSet<String>>,
    pub devices_denied: HashSet<String>,
}

/// Connection ids carry the owning core in their first 4 bytes (for reuseport steering);
/// the other 4 are random.
pub struct CoreConnectionIds {
    core: u32,
}

pub const CONNECTION_ID_BYTES: usize = 8;

impl CoreConnectionIds {
    pub fn new(core: usize) -> CoreConnectionIds {
        CoreConnectionIds { core: core as u32 }
    }
}

impl ConnectionIdGenerator for CoreConnectionIds {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let mut bytes = [0u8; CONNECTION_ID_BYTES];
        bytes[..4].copy_from_slice(&self.core.to_be_bytes());
        bytes[4..].copy_from_slice(&rand_u32().to_be_bytes());
        quinn_proto::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CONNECTION_ID_BYTES
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    ring_fill(&mut bytes);
    u32::from_be_bytes(bytes)
}

fn ring_fill(bytes: &mut [u8]) {
    use rustls::crypto::ring::default_provider;
    default_provider().secure_random.fill(bytes).expect("the system RNG works");
}

/// Binds one SO_REUSEPORT UDP socket per core on `address`, in core order (the
/// reuseport group index is the bind order), and attaches the steering program that
/// sends each short-header packet to the core named in its connection id. With port 0
/// the first socket's port is used for the rest. A fresh port per start keeps a
/// restarted process out of a stale group (SO_REUSEPORT groups need the same user).
pub fn bind_sockets(address: SocketAddr, cores: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let mut sockets = Vec::with_capacity(cores);
    let mut address = address;
    for _ in 0..cores {
        let domain = if address.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        let bound: std::net::UdpSocket = socket.into();
        address = bound.local_addr()?;
        sockets.push(bound);
    }
    if let Some(first) = sockets.first() {
        crate::shell::sys::attach_reuseport_steering(first)?;
    }
    Ok(sockets)
}

/// A finished frame: its answer bytes, for stream `stream` of `connection`.
struct Completion {
    connection: ConnectionHandle,
    stream: StreamId,
    frame_number: u64,
    answer: Vec<u8>,
}

#[derive(Default)]
struct StreamState {
    assembler: Option<FrameAssembler>,
    next_frame_number: u64,
    next_answer_number: u64,
    ready: BTreeMap<u64, Vec<u8>>,
    unsent: Vec<u8>,
    peer_finished: bool,
    /// Resolves when the stream's latest frame is stored: the next frame waits for it,
    /// so a stream's frames are stored in the order they were sent.
    previous_stored: Option<futures_channel::oneshot::Receiver<()>>,
}

struct Conn {
    connection: quinn_proto::Connection,
    device: Option<String>,
    streams: HashMap<StreamId, StreamState>,
    frames_in_flight: usize,
}

/// Counters of one core's listener.
#[derive(Debug, Default, Clone)]
pub struct QuicStats {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub frames_accepted: u64,
    pub frames_refused: u64,
    pub datagrams_dropped_on_send: u64,
}

/// Runs one core's listener until `shutdown` is set.
pub async fn run_core(
    core: usize,
    socket: std::net::UdpSocket,
    settings: Arc<QuicSettings>,
    appender: Rc<dyn Appender>,
    shutdown: Arc<AtomicBool>,
) -> std::io::Result<QuicStats> {
    let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
    let readiness = glommio::net::UdpSocket::from(socket2::Socket::from(socket.try_clone()?));
    let mut endpoint_config = EndpointConfig::default();
    endpoint_config.cid_generator(move || Box::new(CoreConnectionIds::new(core)));
    let mut endpoint = Endpoint::new(Arc::new(endpoint_config), Some(settings.server_config.clone()), true, None);
    let (wake_sender, wake_receiver) = local_channel::new_bounded::<()>(1);
    let wake = Rc::new(wake_sender);
    let completions: Rc<RefCell<VecDeque<Completion>>> = Rc::new(RefCell::new(VecDeque::new()));
    let mut connections: HashMap<ConnectionHandle, Conn> = HashMap::new();
    let mut stats = QuicStats::default();
    let gro = state.gro_segments().max(1);
    let mut receive_buffers: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; 65_535 * gro.min(8)]).collect();
    let mut transmit_buffer: Vec<u8> = Vec::with_capacity(65_535);
    let mut response_buffer: Vec<u8> = Vec::new();
    let max_gso = state.max_gso_segments().max(1);
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if shutdown.load(Ordering::Acquire) && closing.is_none() {
            closing = Some(now);
            for conn in connections.values_mut() {
                conn.connection.close(now, VarInt::from_u32(CLOSE_SHUTDOWN), "weir is shutting down".into());
            }
        }
        if let Some(since) = closing {
            if connections.is_empty() || now.duration_since(since) > CLOSE_DRAIN_MAX {
                return Ok(stats);
            }
        }
        // 1. Datagrams in.
        loop {
            let mut metas = [RecvMeta::default(); RECV_BATCH];
            let mut slices: Vec<IoSliceMut<'_>> =
                receive_buffers.iter_mut().map(|buffer| IoSliceMut::new(buffer.as_mut_slice())).collect();
            let count = match state.recv(UdpSockRef::from(&socket), &mut slices, &mut metas) {
                Ok(count) => count,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(core, %error, "UDP receive failed");
                    break;
                }
            };
            drop(slices);
            for (meta, buffer) in metas.iter().zip(receive_buffers.iter()).take(count) {
                let mut data = &buffer[..meta.len];
                while !data.is_empty() {
                    let length = data.len().min(meta.stride.max(1));
                    let datagram = BytesMut::from(&data[..length]);
                    data = &data[length..];
                    response_buffer.clear();
                    let ecn = meta.ecn.and_then(|ecn| quinn_proto::EcnCodepoint::from_bits(ecn as u8));
                    match endpoint.handle(now, meta.addr, meta.dst_ip, ecn, datagram, &mut response_buffer) {
                        Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                            if let Some(conn) = connections.get_mut(&handle) {
                                conn.connection.handle_event(event);
                            }
                        }
                        Some(DatagramEvent::NewConnection(incoming)) => {
                            if closing.is_some() || connections.len() >= settings.connections_max {
                                stats.connections_refused += 1;
                                let transmit = endpoint.refuse(incoming, &mut response_buffer);
                                send(&state, &socket, &transmit, &response_buffer, &mut stats);
                            } else if !incoming.remote_address_validated()
                                && endpoint.open_connections() >= settings.handshakes_before_retry
                                && incoming.may_retry()
                            {
                                if let Ok(transmit) = endpoint.retry(incoming, &mut response_buffer) {
                                    send(&state, &socket, &transmit, &response_buffer, &mut stats);
                                }
                            } else {
                                match endpoint.accept(incoming, now, &mut response_buffer, None) {
                                    Ok((handle, connection)) => {
                                        stats.connections_accepted += 1;
                                        connections.insert(
                                            handle,
                                            Conn {
                                                connection,
                                                device: None,
                                                streams: HashMap::new(),
                                                frames_in_flight: 0,
                                            },
                                        );
                                    }
                                    Err(error) => {
                                        if let Some(transmit) = error.response {
                                            send(&state, &socket, &transmit, &response_buffer, &mut stats);
                                        }
                                    }
                                }
                            }
                        }
                        Some(DatagramEvent::Response(transmit)) => {
                            send(&state, &socket, &transmit, &response_buffer, &mut stats);
                        }
                        None => {}
                    }
                }
            }
        }
        // 2. Finished frames: queue their answers in frame order.
        let finished: Vec<Completion> = completions.borrow_mut().drain(..).collect();
        for completion in finished {
            if let Some(conn) = connections.get_mut(&completion.connection) {
                conn.frames_in_flight -= 1;
                if let Some(stream) = conn.streams.get_mut(&completion.stream) {
                    stream.ready.insert(completion.frame_number, completion.answer);
                }
            }
        }
        // 3. Every connection: timers, events, streams, transmits.
        let handles: Vec<ConnectionHandle> = connections.keys().copied().collect();
        for handle in handles {
            let conn = connections.get_mut(&handle).expect("listed above");
            if conn.connection.poll_timeout().is_some_and(|deadline| deadline <= now) {
                conn.connection.handle_timeout(now);
            }
            while let Some(event) = conn.connection.poll_endpoint_events() {
                if let Some(reply) = endpoint.handle_event(handle, event) {
                    conn.connection.handle_event(reply);
                }
            }
            while let Some(event) = conn.connection.poll() {
                handle_event(core, handle, conn, event, &settings, &appender, &completions, &wake, &mut stats);
            }
            // Readable streams may have been reported before identity was known; read all.
            if conn.device.is_some() {
                read_streams(handle, conn, &settings, &appender, &completions, &wake, &mut stats);
            }
            write_answers(conn);
            loop {
                transmit_buffer.clear();
                let Some(transmit) = conn.connection.poll_transmit(now, max_gso, &mut transmit_buffer) else { break };
                send(&state, &socket, &transmit, &transmit_buffer, &mut stats);
            }
            if conn.connection.is_drained() {
                connections.remove(&handle);
            }
        }
        // 4. Sleep until there is something to do.
        let next_timer = connections.values_mut().filter_map(|conn| conn.connection.poll_timeout()).min();
        let wait = next_timer
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
            .unwrap_or(SHUTDOWN_POLL)
            .min(SHUTDOWN_POLL);
        if !completions.borrow().is_empty() || wait.is_zero() {
            glommio::yield_if_needed().await;
            continue;
        }
        let mut peek = [0u8; 1];
        let readable = async {
            // Waits in io_uring until a datagram is queued; consumes nothing.
            if readiness.peek_from(&mut peek).await.is_err() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        };
        let woken = async {
            let _ = wake_receiver.recv().await;
        };
        let slept = glommio::timer::sleep(wait);
        future::or(readable, future::or(woken, slept)).await;
    }
}

fn send(
    state: &UdpSocketState,
    socket: &std::net::UdpSocket,
    transmit: &quinn_proto::Transmit,
    buffer: &[u8],
    stats: &mut QuicStats,
) {
    let transmit = quinn_udp::Transmit {
        destination: transmit.destination,
        ecn: transmit.ecn.map(|ecn| quinn_udp::EcnCodepoint::from_bits(ecn as u8).expect("valid ECN bits")),
        contents: &buffer[..transmit.size],
        segment_size: transmit.segment_size,
        src_ip: transmit.src_ip,
    };
    if state.try_send(UdpSockRef::from(socket), &transmit).is_err() {
        // A full socket buffer: QUIC's loss recovery resends.
        stats.datagrams_dropped_on_send += 1;
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_event(
    core: usize,
    handle: ConnectionHandle,
    conn: &mut Conn,
    event: Event,
    settings: &Arc<QuicSettings>,
    appender: &Rc<dyn Appender>,
    completions: &Rc<RefCell<VecDeque<Completion>>>,
    wake: &Rc<LocalSender<()>>,
    stats: &mut QuicStats,
) {
    match event {
        Event::Connected => {
            let device = conn
                .connection
                .crypto_session()
                .peer_identity()
                .and_then(|identity| identity.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
                .and_then(|chain| chain.first().and_then(|leaf| certs::device_id_of(leaf)));
            match device {
                None => conn.connection.close(
                    Instant::now(),
                    VarInt::from_u32(CLOSE_NO_IDENTITY),
                    "the client certificate names no device (subject CN)".into(),
                ),
                Some(device) if settings.devices_denied.contains(&device) => {
                    tracing::warn!(core, device, "denied device refused");
                    conn.connection.close(
                        Instant::now(),
                        VarInt::from_u32(CLOSE_DEVICE_DENIED),
                        format!("device {device} is denied by this appliance").into(),
                    )
                }
                Some(device) => {
                    tracing::debug!(core, device, remote = %conn.connection.remote_address(), "device connected");
                    conn.device = Some(device);
                }
            }
        }
        Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
            while let Some(id) = conn.connection.streams().accept(Dir::Bi) {
                conn.streams.entry(id).or_default();
            }
            if conn.device.is_some() {
                read_streams(handle, conn, settings, appender, completions, wake, stats);
            }
        }
        Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
            while let Some(id) = conn.connection.streams().accept(Dir::Uni) {
                let _ = conn.connection.recv_stream(id).stop(VarInt::from_u32(CLOSE_PROTOCOL));
            }
        }
        Event::Stream(StreamEvent::Readable { .. }) if conn.device.is_some() => {
            read_streams(handle, conn, settings, appender, completions, wake, stats);
        }
        Event::ConnectionLost { reason } => {
            tracing::debug!(core, device = ?conn.device, %reason, "connection lost");
        }
        _ => {}
    }
}

fn read_streams(
    handle: ConnectionHandle,
    conn: &mut Conn,
    settings: &Arc<QuicSettings>,
    appender: &Rc<dyn Appender>,
    completions: &Rc<RefCell<VecDeque<Completion>>>,
    wake: &Rc<LocalSender<()>>,
    stats: &mut QuicStats,
) {
    let device = conn.device.clone().expect("identity is known before streams are read");
    let ids: Vec<StreamId> = conn.streams.keys().copied().collect();
    for id in ids {
        if conn.frames_in_flight >= settings.frames_in_flight_per_connection_max {
            return; // leave bytes unread: flow control pushes back on the device
        }
        let mut protocol_error = None;
        {
            let stream = conn.streams.get_mut(&id).expect("listed above");
            let assembler =
                stream.assembler.get_or_insert_with(|| FrameAssembler::new(settings.limits.frame_bytes_max));
            if !stream.peer_finished {
                let mut recv = conn.connection.recv_stream(id);
                let mut chunks = match recv.read(true) {
                    Ok(chunks) => chunks,
                    Err(_) => continue,
                };
                loop {
                    // Read no more than one frame ahead of what is being processed.
                    if assembler.buffered_bytes()
                        > settings.limits.frame_bytes_max + protocol::FRAME_LENGTH_PREFIX_BYTES
                    {
                        break;
                    }
                    match chunks.next(settings.limits.frame_bytes_max) {
                        Ok(Some(chunk)) => assembler.push(&chunk.bytes),
                        Ok(None) => {
                            stream.peer_finished = true;
                            break;
                        }
                        Err(quinn_proto::ReadError::Blocked) => break,
                        Err(_) => {
                            stream.peer_finished = true;
                            break;
                        }
                    }
                }
                let _ = chunks.finalize();
            }
        }
        loop {
            if conn.frames_in_flight >= settings.frames_in_flight_per_connection_max {
                break;
            }
            let stream = conn.streams.get_mut(&id).expect("listed above");
            let assembler = stream.assembler.as_mut().expect("made above");
            let frame = match assembler.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    protocol_error = Some(error.to_string());
                    break;
                }
            };
            let frame_number = stream.next_frame_number;
            stream.next_frame_number += 1;
            let (stored, next_waits) = futures_channel::oneshot::channel();
            let previous = stream.previous_stored.replace(next_waits);
            conn.frames_in_flight += 1;
            let task = process_frame(frame, device.clone(), settings.clone(), appender.clone());
            let completions = completions.clone();
            let wake = wake.clone();
            stats.frames_accepted += 1;
            glommio::spawn_local(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                let answer = task.await;
                let _ = stored.send(());
                completions.borrow_mut().push_back(Completion { connection: handle, stream: id, frame_number, answer });
                let _ = wake.try_send(());
            })
            .detach();
        }
        if let Some(reason) = protocol_error {
            stats.frames_refused += 1;
            conn.connection.close(Instant::now(), VarInt::from_u32(CLOSE_PROTOCOL), reason.into_bytes().into());
            return;
        }
    }
}

/// Checks, routes and appends one frame; returns the answer frame's bytes.
async fn process_frame(
    frame: Vec<u8>,
    device: String,
    settings: Arc<QuicSettings>,
    appender: Rc<dyn Appender>,
) -> Vec<u8> {
    if let Some(answer) = appender.answer_unchecked(&frame) {
        return answer;
    }
    let answer = match protocol::check_produce(&frame, &settings.limits) {
        Err(error) => protocol::error_frame(sequence_of(&frame), error.code(), &error.to_string(), 0),
        Ok(produce) => {
            let sequence = produce.sequence;
            match settings.topics.get(&produce.topic) {
                None => protocol::error_frame(
                    sequence,
                    ErrorCode::UnknownTopic,
                    &format!("no topic {:?}", produce.topic),
                    0,
                ),
                Some(_)
                    if settings.topics_allowed.as_ref().is_some_and(|allowed| !allowed.contains(&produce.topic)) =>
                {
                    protocol::error_frame(
                        sequence,
                        ErrorCode::TopicNotAllowed,
                        &format!("device {device} may not write topic {:?}", produce.topic),
                        0,
                    )
                }
                Some(partitions) => {
                    let runs = session::route(produce.records, &device, sequence, *partitions);
                    let appends = runs
                        .iter()
                        .map(|run| appender.append(produce.topic.clone(), run.partition, run.records.clone()))
                        .collect::<Vec<_>>();
                    let mut base_offsets = Vec::with_capacity(appends.len());
                    let mut failure = None;
                    for append in appends {
                        match append.await {
                            Ok(offset) => base_offsets.push(offset),
                            Err(error) => {
                                failure.get_or_insert(error);
                                base_offsets.push(-1);
                            }
                        }
                    }
                    match failure {
                        Some(failure) => {
                            protocol::error_frame(sequence, failure.code, &failure.message, failure.retry_after_ms)
                        }
                        None => protocol::ack_frame(sequence, session::ack_parts(&runs, &base_offsets)),
                    }
                }
            }
        }
    };
    protocol::with_length_prefix(&protocol::encode(&answer))
}

/// The sequence of a frame that failed its checks, when its root is readable at all
/// (so the device can match the error to its frame); 0 otherwise.
fn sequence_of(frame: &[u8]) -> u64 {
    if frame.len() >= 32 && frame.len() % 8 == 0 {
        let root = frame.len() - 32;
        u64::from_le_bytes(frame[root + 8..root + 16].try_into().expect("8 bytes"))
    } else {
        0
    }
}

/// Writes the answers that are ready, strictly in frame order, as stream credit allows.
fn write_answers(conn: &mut Conn) {
    let ids: Vec<StreamId> = conn.streams.keys().copied().collect();
    for id in ids {
        let stream = conn.streams.get_mut(&id).expect("listed above");
        while let Some(answer) = stream.ready.remove(&stream.next_answer_number) {
            stream.unsent.extend_from_slice(&answer);
            stream.next_answer_number += 1;
        }
        if !stream.unsent.is_empty() {
            match conn.connection.send_stream(id).write(&stream.unsent) {
                Ok(written) => {
                    stream.unsent.drain(..written);
                }
                Err(quinn_proto::WriteError::Blocked) => {}
                Err(_) => stream.unsent.clear(), // the device stopped reading
            }
        }
        let done = stream.peer_finished
            && stream.assembler.as_ref().is_none_or(|assembler| assembler.buffered_bytes() == 0)
            && stream.unsent.is_empty()
            && stream.ready.is_empty()
            && stream.next_answer_number == stream.next_frame_number;
        if done {
            let _ = conn.connection.send_stream(id).finish();
            conn.streams.remove(&id);
        }
    }
}
