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
//! Work per pass follows events, not connections: a datagram drives the connection its
//! id names, a finished frame drives its connection, and timers come from one heap
//! keyed by each connection's quinn deadline, where a deadline that moved later is
//! re-queued without driving the connection. A driven connection's streams are read
//! only after quinn reported them readable or reading stopped at a limit (`unread`),
//! so idle connections cost nothing per pass (issue 18).
//!
//! Limits: connections (per core), connections per device (all cores), streams per
//! connection (transport config), frame bytes and records per frame (protocol limits),
//! frames and bytes in flight per connection (unread bytes wait under QUIC flow
//! control). New connections are admitted by `core::handshake`: past
//! `handshakes_before_retry` handshakes in progress they must prove their address
//! (Retry), past `handshakes_max` they are refused at once (CONNECTION_REFUSED), and a
//! handshake not done `handshake_timeout_s` after it was accepted is closed.
//!
//! Restarts: every core's endpoint derives its stateless-reset key from the server's
//! private key, so after weir restarts (same key) a device's next packet on its old
//! connection is answered with a stateless reset the device accepts: it learns at once
//! that the connection is gone instead of after its answer timeout.
//!
//! Order on a stream: a frame is stored only after the stream's previous frame was.
//! When a frame gets a retryable error, the frames behind it on the stream are refused
//! with the same error (not stored) until the device resends a frame it already sent,
//! so a device that resends in sequence order never has a later frame stored first.
//!
//! Steering: a datagram whose connection id names another core (the reuseport
//! program could not steer it, e.g. when it is not attached) is forwarded to that
//! core over a channel mesh of datagrams.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::future;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use quinn_proto::{
    ConnectionHandle, ConnectionIdGenerator, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, StreamEvent,
    StreamId, VarInt,
};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};

use crate::certs;
use crate::core::handshake::{self, CoreLoad, HandshakeLimits};
use crate::core::ingest::{self, Admission, StreamOrder};
use crate::core::log::batch::Record;
use crate::core::protocol::{self, ErrorCode, FrameLimits};
use crate::core::quota::RecordQuota;
use crate::core::session::{self, FrameAssembler};
use crate::core::throttle::LogThrottle;
use crate::shell::metrics::QuicMetrics;
use crate::shell::shutdown;

/// How often the driver re-checks the shutdown flag while idle.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
/// How long a stopping listener waits for its connections to close.
const CLOSE_DRAIN_MAX: Duration = Duration::from_secs(2);
/// Datagrams received per `recvmmsg` call.
const RECV_BATCH: usize = 32;
/// QUIC application close codes: the protocol crate's (docs/PROTOCOL.md).
pub use crate::core::protocol::{
    CLOSE_DEVICE_DENIED, CLOSE_NO_IDENTITY, CLOSE_PROTOCOL, CLOSE_SHUTDOWN, CLOSE_TOO_MANY_CONNECTIONS,
};
/// Datagrams forwarded from other cores waiting for this core's driver.
const FORWARD_INBOX_MAX: usize = 4096;
/// Queue depth of each core-to-core datagram channel.
const FORWARD_CHANNEL_CAPACITY: usize = 1024;

pub use crate::core::ingest::AppendFailure;

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

    /// Whether `observe` wants to hear of frames.
    fn watching(&self) -> bool {
        false
    }

    /// Tells the stream watch (`shell::watch`) what became of a frame; never waits.
    /// weir's appender does when `[watch]` is on; the default ignores it.
    fn observe(
        &self,
        _device: &str,
        _seen: Option<crate::shell::watch::FrameSeen>,
        _answer: &protocol::AnswerFrame,
        _received: Instant,
    ) {
    }
}

/// Everything a core's listener needs, shared by all cores.
pub struct QuicSettings {
    /// What a SIGHUP may replace: the TLS config, the deny and allow lists, the quota.
    pub live: Arc<LiveCell>,
    pub limits: FrameLimits,
    pub connections_max: usize,
    pub handshakes_before_retry: usize,
    pub frames_in_flight_per_connection_max: usize,
    /// Topic name -> partition count and how its keys are hashed to partitions.
    pub topics: HashMap<String, (u32, session::KeyHash)>,
    /// Connections one device (certificate) may hold open, over all cores.
    pub connections_per_device_max: usize,
    /// Bytes of frames being processed (read, not yet answered) per connection.
    pub bytes_in_flight_per_connection_max: usize,
    /// Handshakes in progress per core beyond which new connections are refused.
    pub handshakes_max: usize,
    /// How long an accepted handshake may take before it is closed.
    pub handshake_timeout: Duration,
    /// The stateless-reset key every core's endpoint uses (`stateless_reset_key`).
    pub reset_key: Arc<dyn quinn_proto::crypto::HmacKey>,
    /// Open connections per device, shared by every core.
    pub device_connections: Arc<DeviceConnections>,
    /// One "denied device refused" line per device per minute, over all cores.
    pub denied_log: Mutex<LogThrottle>,
    pub metrics: QuicMetrics,
}

/// How often one denied device is logged, and how many devices the throttle tracks.
pub const DENIED_LOG_INTERVAL: Duration = Duration::from_secs(60);
pub const DENIED_LOG_DEVICES_MAX: usize = 1024;

pub use crate::shell::device_connections::DeviceConnections;
pub use crate::shell::live::{LiveCell, QuicLive};

/// Messages between the cores' listeners: who is who, and datagrams for another core.
#[derive(Debug)]
pub enum DatagramMessage {
    Hello { core: usize },
    Datagram { from: SocketAddr, to_ip: Option<std::net::IpAddr>, ecn: Option<u8>, bytes: Vec<u8> },
}

pub type DatagramMesh = MeshBuilder<DatagramMessage, Full>;

/// The mesh the listeners forward mis-steered datagrams over (one per process).
pub fn datagram_mesh(cores: usize) -> DatagramMesh {
    MeshBuilder::full(cores, FORWARD_CHANNEL_CAPACITY)
}

/// The core a datagram belongs to, when its destination connection id is one weir
/// chose (8 bytes, the core in the first 4), read from a short header or a long one.
pub fn core_of_datagram(datagram: &[u8]) -> Option<u32> {
    let first = *datagram.first()?;
    let id = if first & 0x80 == 0 {
        datagram.get(1..1 + CONNECTION_ID_BYTES)?
    } else {
        if *datagram.get(5)? as usize != CONNECTION_ID_BYTES {
            return None;
        }
        datagram.get(6..6 + CONNECTION_ID_BYTES)?
    };
    Some(u32::from_be_bytes(id[..4].try_into().expect("4 bytes")))
}

/// The shortest interval between two stateless resets of one endpoint (quinn's default,
/// 20 ms, would take 100 s to tell 10,000 devices of a restart on 2 cores). A reset is
/// one HMAC and a datagram smaller than the one that caused it.
const STATELESS_RESET_INTERVAL_MIN: Duration = Duration::from_micros(50);

/// The stateless-reset key of weir's endpoints: HMAC-SHA256 under a key derived from
/// `secret` (the server's private key PEM), so the same on every core and across
/// restarts with the same key, and secret as long as the private key is.
pub fn stateless_reset_key(secret: &[u8]) -> Arc<dyn quinn_proto::crypto::HmacKey> {
    use hmac::Mac;
    let mut derive = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    derive.update(b"weir quic stateless reset key v1");
    Arc::new(ResetKey(derive.finalize().into_bytes().into()))
}

struct ResetKey([u8; 32]);

impl ResetKey {
    fn mac(&self) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

impl quinn_proto::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        use hmac::Mac;
        let mut mac = self.mac();
        mac.update(data);
        signature_out.copy_from_slice(&mac.finalize().into_bytes());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn_proto::crypto::CryptoError> {
        use hmac::Mac;
        let mut mac = self.mac();
        mac.update(data);
        mac.verify_slice(signature).map_err(|_| quinn_proto::crypto::CryptoError)
    }
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
    bind_sockets_steered(address, cores, true)
}

/// `bind_sockets`, with the steering program attached only when `steering` (without
/// it, datagrams that land on the wrong core are forwarded, at some cost).
pub fn bind_sockets_steered(
    address: SocketAddr,
    cores: usize,
    steering: bool,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
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
    if let Some(first) = sockets.first().filter(|_| steering) {
        crate::shell::sys::attach_reuseport_steering(first)?;
    }
    Ok(sockets)
}

/// Asks for `receive_bytes` of SO_RCVBUF and `send_bytes` of SO_SNDBUF on `socket`;
/// returns what the kernel granted (Linux reports twice the usable size, capped by
/// `net.core.rmem_max` / `wmem_max`, silently).
pub fn set_socket_buffers(
    socket: &std::net::UdpSocket,
    receive_bytes: usize,
    send_bytes: usize,
) -> std::io::Result<(usize, usize)> {
    let socket = socket2::SockRef::from(socket);
    socket.set_recv_buffer_size(receive_bytes)?;
    socket.set_send_buffer_size(send_bytes)?;
    Ok((socket.recv_buffer_size()?, socket.send_buffer_size()?))
}

/// A finished frame: its answer bytes, for stream `stream` of `connection`.
struct Completion {
    connection: ConnectionHandle,
    stream: StreamId,
    frame_number: u64,
    frame_bytes: usize,
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
    order: Rc<RefCell<StreamOrder>>,
}

struct Conn {
    connection: quinn_proto::Connection,
    device: Option<String>,
    /// This connection's share of the device's record quota (`core::quota`).
    quota: Option<Rc<RefCell<RecordQuota>>>,
    streams: HashMap<StreamId, StreamState>,
    frames_in_flight: usize,
    bytes_in_flight: usize,
    /// Until the handshake completes (or the connection ends).
    handshaking: bool,
    /// Counted in `DeviceConnections`.
    registered: bool,
    /// Closed by weir for a protocol violation: nothing more is read.
    violated: bool,
    /// A stream may hold bytes not yet made into frames: quinn said readable before the
    /// device was known, or reading stopped at the in-flight limit or one frame ahead.
    /// Only then does a pass read the streams without a `Readable` event.
    unread: bool,
    /// The deadline of this connection's live entry in the core's timer heap, if any
    /// (older entries of it there are stale and skipped when they come up).
    timer_scheduled: Option<Instant>,
    /// When the handshake is given up if it has not finished (`core::handshake`).
    handshake_deadline: Instant,
}

impl Conn {
    /// A connection just accepted: handshaking, no device yet.
    fn new(
        connection: quinn_proto::Connection,
        quota: Option<Rc<RefCell<RecordQuota>>>,
        handshake_deadline: Instant,
    ) -> Conn {
        Conn {
            connection,
            device: None,
            quota,
            streams: HashMap::new(),
            frames_in_flight: 0,
            bytes_in_flight: 0,
            handshaking: true,
            registered: false,
            violated: false,
            unread: false,
            timer_scheduled: None,
            handshake_deadline,
        }
    }

    /// Whether the connection has as many frames or bytes in flight as it may.
    fn in_flight_at_max(&self, settings: &QuicSettings) -> bool {
        self.frames_in_flight >= settings.frames_in_flight_per_connection_max
            || self.bytes_in_flight >= settings.bytes_in_flight_per_connection_max
    }
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

/// Runs one core's listener until `shutdown` is set. With `forward` (more than one
/// core), datagrams for another core's connections are forwarded there.
pub async fn run_core(
    core: usize,
    socket: std::net::UdpSocket,
    settings: Arc<QuicSettings>,
    appender: Rc<dyn Appender>,
    shutdown: Arc<AtomicBool>,
    forward: Option<DatagramMesh>,
) -> std::io::Result<QuicStats> {
    let mut driver = CoreDriver::start(core, socket, settings, appender, &shutdown, forward).await?;
    loop {
        let now = Instant::now();
        driver.adopt_reloaded();
        if shutdown::is_signalled(&shutdown) && driver.closing.is_none() {
            driver.begin_closing(now);
        }
        if driver.closed(now) {
            return Ok(driver.finish());
        }
        // 1. Datagrams in: from other cores, then from the socket.
        driver.receive_datagrams();
        driver.handle_arrivals(now);
        // 2. Finished frames: queue their answers in frame order.
        driver.take_completions();
        // 3. Every connection with something to do: timers, events, streams, transmits.
        driver.expire_timers(now);
        driver.expire_handshakes(now);
        driver.drive_dirty(now);
        // 4. Sleep until there is something to do.
        driver.wait_for_work().await;
    }
}

/// Everything one core's listener owns between passes of `run_core`'s loop.
struct CoreDriver {
    core: usize,
    settings: Arc<QuicSettings>,
    metrics: QuicMetrics,
    /// Generation of `intake.live`, the reloadable settings this core uses.
    live_generation: u64,
    /// Reads streams into frame tasks; their answers come back in `intake.completions`.
    intake: FrameIntake,
    wake_receiver: LocalReceiver<()>,
    endpoint: Endpoint,
    connections: HashMap<ConnectionHandle, Conn>,
    /// Only connections with something to do are driven in a pass (datagrams, finished
    /// frames, a due timer), so 10,000 idle connections cost nothing per datagram.
    dirty: HashSet<ConnectionHandle>,
    /// The dirty set of the pass being driven (a buffer kept between passes).
    driving: Vec<ConnectionHandle>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Connections of this core whose handshake is in progress.
    handshaking: usize,
    /// Handshakes accepted, by deadline (accepted in order, so deadlines grow): the
    /// ones still in progress at their deadline are closed (`expire_handshakes`).
    handshake_deadlines: VecDeque<(Instant, ConnectionHandle)>,
    handshake_limits: HandshakeLimits,
    stats: QuicStats,
    /// When shutdown began, if it did.
    closing: Option<Instant>,
    udp: Udp,
    forwarding: Option<Forwarding>,
    receive_buffers: Vec<Vec<u8>>,
    arrivals: Vec<Arrival>,
    transmit_buffer: Vec<u8>,
    response_buffer: Vec<u8>,
}

impl CoreDriver {
    async fn start(
        core: usize,
        socket: std::net::UdpSocket,
        settings: Arc<QuicSettings>,
        appender: Rc<dyn Appender>,
        shutdown: &Arc<AtomicBool>,
        forward: Option<DatagramMesh>,
    ) -> std::io::Result<CoreDriver> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let readiness = glommio::net::UdpSocket::from(socket2::Socket::from(socket.try_clone()?));
        let mut endpoint_config = EndpointConfig::new(settings.reset_key.clone());
        endpoint_config.cid_generator(move || Box::new(CoreConnectionIds::new(core)));
        endpoint_config.min_reset_interval(STATELESS_RESET_INTERVAL_MIN);
        // The reloadable settings this core uses: replaced between passes when a reload
        // publishes newer ones (`shell::live`).
        let (live_generation, live) = settings.live.load();
        let endpoint = Endpoint::new(Arc::new(endpoint_config), Some(live.server_config.clone()), true, None);
        let (wake_sender, wake_receiver) = local_channel::new_bounded::<()>(1);
        let wake = Rc::new(wake_sender);
        let completions: Rc<RefCell<VecDeque<Completion>>> = Rc::new(RefCell::new(VecDeque::new()));
        let metrics = settings.metrics.clone();
        let forwarding = match forward {
            Some(mesh) if mesh.nr_peers() > 1 => join_forwarding(core, mesh, &wake, shutdown).await,
            _ => None,
        };
        let gro = state.gro_segments().max(1);
        let receive_buffers: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; 65_535 * gro.min(8)]).collect();
        let gso_segments_max = state.max_gso_segments().max(1);
        let handshake_limits = HandshakeLimits {
            connections_max: settings.connections_max,
            handshakes_before_retry: settings.handshakes_before_retry,
            handshakes_max: settings.handshakes_max,
            handshake_timeout: settings.handshake_timeout,
        };
        Ok(CoreDriver {
            core,
            settings: settings.clone(),
            metrics,
            live_generation,
            intake: FrameIntake { core, settings, live, appender, completions, wake },
            wake_receiver,
            endpoint,
            connections: HashMap::new(),
            dirty: HashSet::new(),
            driving: Vec::new(),
            timers: BinaryHeap::new(),
            handshaking: 0,
            handshake_deadlines: VecDeque::new(),
            handshake_limits,
            stats: QuicStats::default(),
            closing: None,
            udp: Udp { socket, state, readiness, gso_segments_max },
            forwarding,
            receive_buffers,
            arrivals: Vec::with_capacity(RECV_BATCH),
            transmit_buffer: Vec::with_capacity(65_535),
            response_buffer: Vec::new(),
        })
    }

    /// Switches to the reloaded settings when a reload published newer ones.
    fn adopt_reloaded(&mut self) {
        let Some((generation, newer)) = self.settings.live.newer_than(self.live_generation) else { return };
        adopt_live(&mut self.endpoint, &mut self.connections, &self.intake.live, &newer, &self.settings);
        tracing::debug!(core = self.core, generation, "listener uses the reloaded settings");
        (self.live_generation, self.intake.live) = (generation, newer);
    }

    /// Shutdown begins: every connection is closed, and new ones are refused from now.
    fn begin_closing(&mut self, now: Instant) {
        self.closing = Some(now);
        for (handle, conn) in self.connections.iter_mut() {
            conn.connection.close(now, VarInt::from_u32(CLOSE_SHUTDOWN), "weir is shutting down".into());
            self.dirty.insert(*handle);
        }
    }

    /// Whether a shutdown is done: every connection closed, or `CLOSE_DRAIN_MAX` spent.
    fn closed(&self, now: Instant) -> bool {
        self.closing.is_some_and(|since| self.connections.is_empty() || now.duration_since(since) > CLOSE_DRAIN_MAX)
    }

    /// The listener stops: every connection left gives its device slot back.
    fn finish(self) -> QuicStats {
        for conn in self.connections.values() {
            forget_connection(conn, &self.settings);
        }
        self.stats
    }

    /// Fills `arrivals`: datagrams forwarded by other cores, then the socket's, until it
    /// has no more or `FORWARD_INBOX_MAX` wait; those for another core are forwarded.
    fn receive_datagrams(&mut self) {
        self.arrivals.clear();
        if let Some(forwarding) = &self.forwarding {
            self.arrivals.extend(forwarding.inbox.borrow_mut().drain(..));
        }
        loop {
            let mut metas = [RecvMeta::default(); RECV_BATCH];
            let mut slices: Vec<IoSliceMut<'_>> =
                self.receive_buffers.iter_mut().map(|buffer| IoSliceMut::new(buffer.as_mut_slice())).collect();
            let count = match self.udp.state.recv(UdpSockRef::from(&self.udp.socket), &mut slices, &mut metas) {
                Ok(count) => count,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(core = self.core, %error, "UDP receive failed");
                    break;
                }
            };
            drop(slices);
            for (meta, buffer) in metas.iter().zip(self.receive_buffers.iter()).take(count) {
                let received = &buffer[..meta.len];
                split_datagrams(self.core, self.forwarding.as_ref(), &self.metrics, meta, received, &mut self.arrivals);
            }
            if self.arrivals.len() >= FORWARD_INBOX_MAX {
                break; // serve what arrived before reading more
            }
        }
    }

    /// Hands every datagram in `arrivals` to the endpoint.
    fn handle_arrivals(&mut self, now: Instant) {
        let mut arrivals = std::mem::take(&mut self.arrivals);
        for arrival in arrivals.drain(..) {
            self.handle_arrival(arrival, now);
        }
        self.arrivals = arrivals;
    }

    /// One datagram to the endpoint: an event for a connection, a new connection, or a
    /// response the endpoint sends on its own.
    fn handle_arrival(&mut self, arrival: Arrival, now: Instant) {
        self.response_buffer.clear();
        let ecn = arrival.ecn.and_then(quinn_proto::EcnCodepoint::from_bits);
        match self.endpoint.handle(now, arrival.from, arrival.to_ip, ecn, arrival.bytes, &mut self.response_buffer) {
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                if let Some(conn) = self.connections.get_mut(&handle) {
                    conn.connection.handle_event(event);
                    self.dirty.insert(handle);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.admit_incoming(incoming, now),
            Some(DatagramEvent::Response(transmit)) => {
                self.udp.send(&transmit, &self.response_buffer, &mut self.stats);
            }
            None => {}
        }
    }

    /// A new connection is refused, asked to prove its address (Retry) or accepted, as
    /// `core::handshake::admit` decides from this core's load.
    fn admit_incoming(&mut self, incoming: quinn_proto::Incoming, now: Instant) {
        let load = CoreLoad {
            shutting_down: self.closing.is_some(),
            connections: self.connections.len(),
            handshaking: self.handshaking,
        };
        let validated = incoming.remote_address_validated();
        match handshake::admit(&self.handshake_limits, load, validated, incoming.may_retry()) {
            handshake::Admission::Refuse(reason) => {
                self.stats.connections_refused += 1;
                self.metrics.refused(reason.name());
                let transmit = self.endpoint.refuse(incoming, &mut self.response_buffer);
                self.udp.send(&transmit, &self.response_buffer, &mut self.stats);
            }
            handshake::Admission::Retry => {
                if let Ok(transmit) = self.endpoint.retry(incoming, &mut self.response_buffer) {
                    self.metrics.retries_sent.inc();
                    self.udp.send(&transmit, &self.response_buffer, &mut self.stats);
                }
            }
            handshake::Admission::Accept => self.accept(incoming, now),
        }
    }

    /// Handshakes still in progress at their deadline are closed: their places go to
    /// the devices waiting (`weir_quic_refusals_total{reason="handshake_timeout"}`).
    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(deadline, handle)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            let Some(conn) = self.connections.get_mut(&handle) else { continue };
            if !conn.handshaking || conn.handshake_deadline != deadline {
                continue; // done, or the handle now names a later connection
            }
            conn.handshaking = false;
            self.handshaking -= 1;
            self.metrics.handshakes_in_progress.dec();
            self.metrics.refused("handshake_timeout");
            conn.connection.close(now, VarInt::from_u32(CLOSE_SHUTDOWN), "the handshake took too long".into());
            self.dirty.insert(handle);
        }
    }

    /// Starts the handshake of an admitted connection.
    fn accept(&mut self, incoming: quinn_proto::Incoming, now: Instant) {
        match self.endpoint.accept(incoming, now, &mut self.response_buffer, None) {
            Ok((handle, connection)) => {
                self.stats.connections_accepted += 1;
                self.metrics.connections_accepted.inc();
                self.metrics.handshakes_started.inc();
                self.metrics.connections_open.inc();
                self.metrics.handshakes_in_progress.inc();
                self.handshaking += 1;
                self.dirty.insert(handle);
                let quota = connection_quota(&self.intake.live, &self.settings);
                let deadline = handshake::handshake_deadline(&self.handshake_limits, now);
                self.handshake_deadlines.push_back((deadline, handle));
                self.connections.insert(handle, Conn::new(connection, quota, deadline));
            }
            Err(error) => {
                self.metrics.refused("handshake_failed");
                if let Some(transmit) = error.response {
                    self.udp.send(&transmit, &self.response_buffer, &mut self.stats);
                }
            }
        }
    }

    /// Finished frames: their answers wait in their streams, in frame order.
    fn take_completions(&mut self) {
        let finished: Vec<Completion> = self.intake.completions.borrow_mut().drain(..).collect();
        for completion in finished {
            if let Some(conn) = self.connections.get_mut(&completion.connection) {
                self.dirty.insert(completion.connection);
                conn.frames_in_flight -= 1;
                conn.bytes_in_flight -= completion.frame_bytes;
                if let Some(stream) = conn.streams.get_mut(&completion.stream) {
                    stream.ready.insert(completion.frame_number, completion.answer);
                }
            }
        }
    }

    /// Connections whose timer is due become dirty. An entry whose connection has
    /// moved its deadline later since (an ack sent, a packet received) is put back at
    /// the new deadline without driving the connection; a stale entry is skipped. So a
    /// connection is driven for its timer only when quinn has a timeout to handle.
    fn expire_timers(&mut self, now: Instant) {
        while let Some(Reverse((deadline, index))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let handle = ConnectionHandle(index);
            let Some(conn) = self.connections.get_mut(&handle) else { continue };
            if conn.timer_scheduled != Some(deadline) {
                continue; // stale: the connection's live entry is another one
            }
            conn.timer_scheduled = None;
            match conn.connection.poll_timeout() {
                Some(current) if current <= now => {
                    self.dirty.insert(handle);
                }
                Some(current) => {
                    conn.timer_scheduled = Some(current);
                    self.timers.push(Reverse((current, index)));
                }
                None => {}
            }
        }
    }

    /// Drives every dirty connection once.
    fn drive_dirty(&mut self, now: Instant) {
        let mut driving = std::mem::take(&mut self.driving);
        driving.extend(self.dirty.drain());
        for handle in driving.drain(..) {
            self.drive_connection(handle, now);
        }
        self.driving = driving;
    }

    /// One connection with something to do: its timeout, endpoint and connection events,
    /// its streams read and answers written, its datagrams sent; then it is forgotten
    /// when drained, or its next timer is armed.
    fn drive_connection(&mut self, handle: ConnectionHandle, now: Instant) {
        let Some(conn) = self.connections.get_mut(&handle) else { return };
        if conn.connection.poll_timeout().is_some_and(|deadline| deadline <= now) {
            conn.connection.handle_timeout(now);
        }
        while let Some(event) = conn.connection.poll_endpoint_events() {
            if let Some(reply) = self.endpoint.handle_event(handle, event) {
                conn.connection.handle_event(reply);
            }
        }
        while let Some(event) = conn.connection.poll() {
            let was_handshaking = conn.handshaking;
            self.intake.handle_event(handle, conn, event, &mut self.stats);
            if was_handshaking && !conn.handshaking {
                self.handshaking -= 1;
                self.metrics.handshakes_in_progress.dec();
            }
        }
        // Streams left unread (reported before identity was known, or stopped at a
        // limit that a finished frame may have lifted) are read now.
        if conn.device.is_some() && conn.unread {
            self.intake.read_streams(handle, conn, &mut self.stats);
        }
        write_answers(conn);
        self.udp.send_transmits(&mut conn.connection, now, &mut self.transmit_buffer, &mut self.stats);
        if conn.connection.is_drained() {
            if conn.handshaking {
                self.handshaking -= 1;
                self.metrics.handshakes_in_progress.dec();
            }
            forget_connection(conn, &self.settings);
            self.connections.remove(&handle);
        } else if let Some(deadline) = conn.connection.poll_timeout() {
            // A later deadline keeps the earlier entry: when it comes up it is moved
            // (`expire_timers`), so the heap holds one live entry per connection.
            if conn.timer_scheduled.is_none_or(|scheduled| deadline < scheduled) {
                conn.timer_scheduled = Some(deadline);
                self.timers.push(Reverse((deadline, handle.0)));
            }
        }
    }

    /// Sleeps until the socket is readable, the earliest connection timer, a frame task
    /// finished or another core forwarded a datagram (`SHUTDOWN_POLL` at most); only
    /// yields when there is work already.
    async fn wait_for_work(&self) {
        let next_handshake = self.handshake_deadlines.front().map(|(deadline, _)| *deadline);
        let next_timer = self.timers.peek().map(|Reverse((deadline, _))| *deadline);
        let next_timer = match (next_timer, next_handshake) {
            (Some(timer), Some(handshake)) => Some(timer.min(handshake)),
            (timer, handshake) => timer.or(handshake),
        };
        let wait = next_timer
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
            .unwrap_or(SHUTDOWN_POLL)
            .min(SHUTDOWN_POLL);
        let forwarded_waiting =
            self.forwarding.as_ref().is_some_and(|forwarding| !forwarding.inbox.borrow().is_empty());
        if !self.intake.completions.borrow().is_empty() || forwarded_waiting || wait.is_zero() {
            glommio::yield_if_needed().await;
            return;
        }
        let mut peek = [0u8; 1];
        let readable = async {
            // Waits in io_uring until a datagram is queued; consumes nothing.
            if self.udp.readiness.peek_from(&mut peek).await.is_err() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        };
        let woken = async {
            let _ = self.wake_receiver.recv().await;
        };
        let slept = glommio::timer::sleep(wait);
        future::or(readable, future::or(woken, slept)).await;
    }
}

/// The core's UDP socket: `quinn-udp` sends and receives on it, and `readiness`, a
/// glommio socket sharing its fd, says when a datagram is queued.
struct Udp {
    socket: std::net::UdpSocket,
    state: UdpSocketState,
    readiness: glommio::net::UdpSocket,
    /// Segments one `poll_transmit` may put in a GSO batch.
    gso_segments_max: usize,
}

impl Udp {
    /// Sends every datagram `connection` has to send now.
    fn send_transmits(
        &self,
        connection: &mut quinn_proto::Connection,
        now: Instant,
        buffer: &mut Vec<u8>,
        stats: &mut QuicStats,
    ) {
        loop {
            buffer.clear();
            let Some(transmit) = connection.poll_transmit(now, self.gso_segments_max, buffer) else { break };
            self.send(&transmit, buffer, stats);
        }
    }

    fn send(&self, transmit: &quinn_proto::Transmit, buffer: &[u8], stats: &mut QuicStats) {
        let transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn.map(|ecn| quinn_udp::EcnCodepoint::from_bits(ecn as u8).expect("valid ECN bits")),
            contents: &buffer[..transmit.size],
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        if self.state.try_send(UdpSockRef::from(&self.socket), &transmit).is_err() {
            // A full socket buffer: QUIC's loss recovery resends.
            stats.datagrams_dropped_on_send += 1;
        }
    }
}

/// Splits what one receive gave (`received`, GRO segments of `meta.stride` bytes) into
/// datagrams: one whose connection id names another core is forwarded there, the rest
/// go to `arrivals`.
fn split_datagrams(
    core: usize,
    forwarding: Option<&Forwarding>,
    metrics: &QuicMetrics,
    meta: &RecvMeta,
    received: &[u8],
    arrivals: &mut Vec<Arrival>,
) {
    let mut data = received;
    while !data.is_empty() {
        let length = data.len().min(meta.stride.max(1));
        let datagram = &data[..length];
        data = &data[length..];
        let owner = core_of_datagram(datagram).map(|owner| owner as usize);
        if let (Some(forwarding), Some(owner)) = (forwarding, owner) {
            if owner != core && owner < forwarding.cores {
                let message = DatagramMessage::Datagram {
                    from: meta.addr,
                    to_ip: meta.dst_ip,
                    ecn: meta.ecn.map(|ecn| ecn as u8),
                    bytes: datagram.to_vec(),
                };
                if forwarding.forward(owner, message) {
                    metrics.datagrams_forwarded.inc();
                } else {
                    metrics.datagrams_forward_dropped.inc();
                }
                continue;
            }
        }
        arrivals.push(Arrival {
            from: meta.addr,
            to_ip: meta.dst_ip,
            ecn: meta.ecn.map(|ecn| ecn as u8),
            bytes: BytesMut::from(datagram),
        });
    }
}

/// One connection's share of its device's record quota under `live` (None: no quota).
fn connection_quota(live: &QuicLive, settings: &QuicSettings) -> Option<Rc<RefCell<RecordQuota>>> {
    RecordQuota::for_connection(
        live.device_records_per_s_max,
        settings.connections_per_device_max as u32,
        settings.limits.records_per_frame_max as u32,
    )
    .map(|quota| Rc::new(RefCell::new(quota)))
}

/// Puts reloaded settings to use on this core: new handshakes get the new TLS config
/// (connections already up keep the keys they agreed on); the deny list applies at the
/// end of each later handshake and the topic allow list to each later frame, because
/// both are read from `live` there; a changed quota gives every connection its new
/// share now (with a full bucket: one burst per reload at most).
fn adopt_live(
    endpoint: &mut Endpoint,
    connections: &mut HashMap<ConnectionHandle, Conn>,
    old: &QuicLive,
    new: &Arc<QuicLive>,
    settings: &QuicSettings,
) {
    endpoint.set_server_config(Some(new.server_config.clone()));
    if new.device_records_per_s_max != old.device_records_per_s_max {
        for conn in connections.values_mut() {
            conn.quota = connection_quota(new, settings);
        }
    }
}

/// A datagram to feed the endpoint: read from the socket or forwarded by another core.
struct Arrival {
    from: SocketAddr,
    to_ip: Option<std::net::IpAddr>,
    ecn: Option<u8>,
    bytes: BytesMut,
}

/// This core's end of the datagram mesh.
struct Forwarding {
    cores: usize,
    senders: Senders<DatagramMessage>,
    /// Mesh peer id of each core that announced itself.
    peer_of_core: Rc<RefCell<HashMap<usize, usize>>>,
    inbox: Rc<RefCell<VecDeque<Arrival>>>,
}

impl Forwarding {
    /// Hands a datagram to its owner core; false when it had to be dropped (QUIC's
    /// loss recovery resends).
    fn forward(&self, owner: usize, message: DatagramMessage) -> bool {
        let Some(peer) = self.peer_of_core.borrow().get(&owner).copied() else { return false };
        self.senders.try_send_to(peer, message).is_ok()
    }
}

/// Joins the datagram mesh (or gives up when the process stops first) and starts the
/// tasks that put datagrams from other cores into the inbox.
async fn join_forwarding(
    core: usize,
    mesh: DatagramMesh,
    wake: &Rc<LocalSender<()>>,
    shutdown: &Arc<AtomicBool>,
) -> Option<Forwarding> {
    let cores = mesh.nr_peers();
    let stopped = async {
        while !shutdown::is_signalled(shutdown) {
            glommio::timer::sleep(SHUTDOWN_POLL).await;
        }
        None
    };
    let (senders, mut receivers) = future::or(async { mesh.join().await.ok() }, stopped).await?;
    let forwarding = Forwarding {
        cores,
        senders,
        peer_of_core: Rc::new(RefCell::new(HashMap::new())),
        inbox: Rc::new(RefCell::new(VecDeque::new())),
    };
    for (peer, receiver) in receivers.streams() {
        let peer_of_core = forwarding.peer_of_core.clone();
        let inbox = forwarding.inbox.clone();
        let wake = wake.clone();
        glommio::spawn_local(async move {
            use futures_lite::StreamExt;
            let mut receiver = receiver;
            while let Some(message) = receiver.next().await {
                match message {
                    DatagramMessage::Hello { core } => {
                        peer_of_core.borrow_mut().insert(core, peer);
                    }
                    DatagramMessage::Datagram { from, to_ip, ecn, bytes } => {
                        let mut inbox = inbox.borrow_mut();
                        if inbox.len() < FORWARD_INBOX_MAX {
                            inbox.push_back(Arrival { from, to_ip, ecn, bytes: BytesMut::from(&bytes[..]) });
                        }
                        let _ = wake.try_send(());
                    }
                }
            }
        })
        .detach();
    }
    for peer in 0..forwarding.senders.nr_consumers() {
        if peer != forwarding.senders.peer_id() {
            let _ = forwarding.senders.send_to(peer, DatagramMessage::Hello { core }).await;
        }
    }
    Some(forwarding)
}

/// A connection leaves this core: its device slot is given back.
fn forget_connection(conn: &Conn, settings: &QuicSettings) {
    settings.metrics.connections_open.dec();
    if conn.registered {
        if let Some(device) = &conn.device {
            settings.device_connections.close(device);
        }
    }
}

/// What turns a connection's events and stream bytes into frame tasks: the settings in
/// force on this core, where records are appended, and the queue finished frames come
/// back on (with the wake that tells the driver).
struct FrameIntake {
    core: usize,
    settings: Arc<QuicSettings>,
    /// The reloadable settings this core uses: replaced between passes when a reload
    /// publishes newer ones (`shell::live`).
    live: Arc<QuicLive>,
    appender: Rc<dyn Appender>,
    completions: Rc<RefCell<VecDeque<Completion>>>,
    wake: Rc<LocalSender<()>>,
}

impl FrameIntake {
    fn handle_event(&self, handle: ConnectionHandle, conn: &mut Conn, event: Event, stats: &mut QuicStats) {
        match event {
            Event::Connected => self.identify(conn),
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                while let Some(id) = conn.connection.streams().accept(Dir::Bi) {
                    conn.streams.entry(id).or_default();
                }
                if conn.device.is_some() {
                    self.read_streams(handle, conn, stats);
                } else {
                    conn.unread = true;
                }
            }
            Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                while let Some(id) = conn.connection.streams().accept(Dir::Uni) {
                    let _ = conn.connection.recv_stream(id).stop(VarInt::from_u32(CLOSE_PROTOCOL));
                }
            }
            Event::Stream(StreamEvent::Readable { .. }) if conn.device.is_some() => {
                self.read_streams(handle, conn, stats);
            }
            Event::Stream(StreamEvent::Readable { .. }) => conn.unread = true,
            Event::ConnectionLost { reason } => {
                if conn.handshaking {
                    // Unknown CA, no certificate, wrong ALPN, or the peer gave up.
                    conn.handshaking = false;
                    self.settings.metrics.refused("handshake_failed");
                }
                tracing::debug!(core = self.core, device = ?conn.device, %reason, "connection lost");
            }
            _ => {}
        }
    }

    /// The handshake completed: the device the client certificate names is registered,
    /// or the connection is closed (no device named, the device denied, or at
    /// `connections_per_device_max`).
    fn identify(&self, conn: &mut Conn) {
        conn.handshaking = false;
        match device_of(&conn.connection) {
            None => {
                self.settings.metrics.refused("no_identity");
                conn.connection.close(
                    Instant::now(),
                    VarInt::from_u32(CLOSE_NO_IDENTITY),
                    "the client certificate names no device (subject CN)".into(),
                )
            }
            Some(device) if self.live.devices_denied.contains(&device) => self.refuse_denied(conn, device),
            Some(device) => self.register_device(conn, device),
        }
    }

    fn refuse_denied(&self, conn: &mut Conn, device: String) {
        let settings = &self.settings;
        let logged = settings.denied_log.lock().unwrap_or_else(PoisonError::into_inner).admit(&device, Instant::now());
        if let Some(suppressed) = logged {
            tracing::warn!(
                core = self.core,
                device,
                suppressed,
                "denied device refused (logged once a minute per device)"
            );
        }
        settings.metrics.refused("device_denied");
        conn.connection.close(
            Instant::now(),
            VarInt::from_u32(CLOSE_DEVICE_DENIED),
            format!("device {device} is denied by this appliance").into(),
        )
    }

    fn register_device(&self, conn: &mut Conn, device: String) {
        let settings = &self.settings;
        match settings.device_connections.try_open(&device, settings.connections_per_device_max) {
            Ok(()) => {
                tracing::debug!(core = self.core, device, remote = %conn.connection.remote_address(), "device connected");
                conn.registered = true;
                conn.device = Some(device);
            }
            Err(open) => {
                settings.metrics.refused("connections_per_device_max");
                conn.connection.close(
                    Instant::now(),
                    VarInt::from_u32(CLOSE_TOO_MANY_CONNECTIONS),
                    format!(
                        "device {device} already holds {open} connections (quic.connections_per_device_max = {})",
                        settings.connections_per_device_max
                    )
                    .into(),
                )
            }
        }
    }

    /// Reads the connection's streams and starts a task per whole frame, as long as its
    /// frames and bytes in flight allow; a stream that breaks the protocol closes the
    /// connection.
    fn read_streams(&self, handle: ConnectionHandle, conn: &mut Conn, stats: &mut QuicStats) {
        if conn.violated {
            return;
        }
        let device = conn.device.clone().expect("identity is known before streams are read");
        conn.unread = false;
        let ids: Vec<StreamId> = conn.streams.keys().copied().collect();
        for id in ids {
            if conn.in_flight_at_max(&self.settings) {
                conn.unread = true;
                return; // leave bytes unread: flow control pushes back on the device
            }
            if !self.buffer_stream(conn, id) {
                continue;
            }
            if let Some(reason) = self.take_frames(handle, conn, id, &device, stats) {
                stats.frames_refused += 1;
                self.settings.metrics.refused("protocol");
                conn.violated = true;
                conn.connection.close(Instant::now(), VarInt::from_u32(CLOSE_PROTOCOL), reason.into_bytes().into());
                return;
            }
        }
    }

    /// Moves what stream `id` received into its frame assembler; false when quinn
    /// refuses the read (the stream is passed over this time).
    fn buffer_stream(&self, conn: &mut Conn, id: StreamId) -> bool {
        let limits = &self.settings.limits;
        let stream = conn.streams.get_mut(&id).expect("listed above");
        let assembler = stream.assembler.get_or_insert_with(|| FrameAssembler::new(limits.frame_bytes_max));
        if stream.peer_finished {
            return true;
        }
        let mut recv = conn.connection.recv_stream(id);
        let mut chunks = match recv.read(true) {
            Ok(chunks) => chunks,
            Err(_) => return false,
        };
        loop {
            // Read no more than one frame ahead of what is being processed.
            if assembler.buffered_bytes() > limits.frame_bytes_max + protocol::FRAME_LENGTH_PREFIX_BYTES {
                conn.unread = true;
                break;
            }
            match chunks.next(limits.frame_bytes_max) {
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
        true
    }

    /// Starts a task for each whole frame in stream `id`'s assembler while the
    /// connection's frames and bytes in flight allow; returns why the stream broke the
    /// protocol, if it did.
    fn take_frames(
        &self,
        handle: ConnectionHandle,
        conn: &mut Conn,
        id: StreamId,
        device: &str,
        stats: &mut QuicStats,
    ) -> Option<String> {
        loop {
            if conn.in_flight_at_max(&self.settings) {
                conn.unread = true;
                return None;
            }
            let stream = conn.streams.get_mut(&id).expect("listed above");
            let assembler = stream.assembler.as_mut().expect("made in buffer_stream");
            let frame = match assembler.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) if stream.peer_finished && assembler.buffered_bytes() > 0 => {
                    return Some(format!(
                        "the stream ended inside a frame ({} bytes of it arrived)",
                        assembler.buffered_bytes()
                    ));
                }
                Ok(None) => return None,
                Err(error) => return Some(error.to_string()),
            };
            self.start_frame(handle, conn, id, frame, device, stats);
        }
    }

    /// Counts `frame` in flight and spawns its task: it waits for the stream's previous
    /// frame to be stored, processes the frame, and queues the answer as a completion.
    fn start_frame(
        &self,
        handle: ConnectionHandle,
        conn: &mut Conn,
        id: StreamId,
        frame: Vec<u8>,
        device: &str,
        stats: &mut QuicStats,
    ) {
        let stream = conn.streams.get_mut(&id).expect("listed above");
        let frame_number = stream.next_frame_number;
        stream.next_frame_number += 1;
        let (stored, next_waits) = futures_channel::oneshot::channel();
        let previous = stream.previous_stored.replace(next_waits);
        let frame_bytes = frame.len();
        conn.frames_in_flight += 1;
        conn.bytes_in_flight += frame_bytes;
        let order = stream.order.clone();
        let task = process_frame(
            (frame, Instant::now()),
            device.to_owned(),
            (self.settings.clone(), self.live.clone()),
            self.appender.clone(),
            order,
            conn.quota.clone(),
        );
        let completions = self.completions.clone();
        let wake = self.wake.clone();
        stats.frames_accepted += 1;
        self.settings.metrics.frames_received.inc();
        glommio::spawn_local(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let answer = task.await;
            let _ = stored.send(());
            completions.borrow_mut().push_back(Completion {
                connection: handle,
                stream: id,
                frame_number,
                frame_bytes,
                answer,
            });
            let _ = wake.try_send(());
        })
        .detach();
    }
}

/// The device the connection's client certificate names (its subject CN), if any.
fn device_of(connection: &quinn_proto::Connection) -> Option<String> {
    connection
        .crypto_session()
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|leaf| certs::device_id_of(leaf)))
}

/// Carries out what `core::ingest` decides for one frame (read at `received`): the
/// appends it asks for, then the answer; returns the answer frame's bytes. Runs once
/// the stream's previous frame is done, so `order` reflects every earlier frame.
async fn process_frame(
    (frame, received): (Vec<u8>, Instant),
    device: String,
    (settings, live): (Arc<QuicSettings>, Arc<QuicLive>),
    appender: Rc<dyn Appender>,
    order: Rc<RefCell<StreamOrder>>,
    quota: Option<Rc<RefCell<RecordQuota>>>,
) -> Vec<u8> {
    if let Some(answer) = appender.answer_unchecked(&frame) {
        return answer;
    }
    let rules = ingest::Rules {
        device: &device,
        topics: &settings.topics,
        topics_allowed: live.topics_allowed.as_ref(),
        device_records_per_s_max: live.device_records_per_s_max,
        limits: &settings.limits,
    };
    let admission = {
        let mut quota = quota.as_ref().map(|quota| quota.borrow_mut());
        ingest::admit(&frame, &rules, &mut order.borrow_mut(), quota.as_deref_mut(), Instant::now())
    };
    let mut seen = None;
    let answer = match admission {
        Admission::Answer(answer) => answer,
        Admission::Append { sequence, topic, mut runs } => {
            seen = appender.watching().then(|| crate::shell::watch::FrameSeen::of_runs(&topic, sequence, &runs));
            // The records move to the log; the answer needs only each run's partition
            // and stretches (no record is cloned on the way to the disk).
            let appends = runs
                .iter_mut()
                .map(|run| appender.append(topic.clone(), run.partition, std::mem::take(&mut run.records)))
                .collect::<Vec<_>>();
            let mut results = Vec::with_capacity(appends.len());
            for append in appends {
                results.push(append.await);
            }
            ingest::answer(sequence, &runs, results, &mut order.borrow_mut())
        }
    };
    appender.observe(&device, seen, &answer, received);
    if answer.kind == protocol::KIND_ACK {
        settings.metrics.frames_acked.inc();
        settings.metrics.ack_latency.record(received.elapsed());
    } else if let Some(code) = ErrorCode::from_u16(answer.error_code) {
        settings.metrics.frame_error(code.name());
        if code == ErrorCode::Backpressure {
            settings.metrics.backpressure_answers.inc();
        }
    }
    protocol::with_length_prefix(&protocol::encode(&answer))
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
