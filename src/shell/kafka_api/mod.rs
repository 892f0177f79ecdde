//! The read-only Kafka listener: local consumers read the edge topics with any Kafka
//! client (docs/KAFKA_API.md). It runs on the first core; a partition another core
//! owns is read by that core (`CoreAppender::query` over the core mesh).
//!
//! A connection is two halves: the reader takes frames (a 4-byte size, then the
//! request), refuses one larger than `request_bytes_max` by closing, and starts each
//! request's answer as its own task; the writer sends the answers in request order, as
//! Kafka requires. At most `requests_in_flight_per_connection_max` answers are pending;
//! the reader waits for room. A request that does not decode, or whose key or version
//! weir does not answer, closes its own connection and nothing else. What to answer is
//! decided in `core::kafka_api`; `answer` builds the responses.

mod answer;
mod groups;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;

use crate::config::ValidConfig;
use crate::shell::engine::CoreAppender;
use crate::shell::shutdown;

pub use answer::{decode_request, DecodedRequest, RequestError};
pub use groups::{load_offsets, OffsetsFile};

/// What the listener needs, prepared in `serve` (the socket is bound there, so a taken
/// port stops the start with a clear error).
pub struct KafkaApiSettings {
    pub listener: std::net::TcpListener,
    /// host and port Metadata names as the one broker.
    pub advertised_host: String,
    pub advertised_port: i32,
    /// Every edge topic and its partition count.
    pub topics: Vec<(String, u32)>,
    pub connections_max: u32,
    pub requests_in_flight_max: usize,
    pub request_bytes_max: usize,
    pub response_bytes_max: usize,
    pub fetch_wait_max: Duration,
    pub group_limits: crate::core::consumer_group::GroupLimits,
    /// The committed offsets, loaded at start, and their file.
    pub offsets: (std::path::PathBuf, groups::OffsetsFile),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaApiError {
    #[error("kafka_api.listen = {listen:?}: cannot bind: {source} (another Kafka broker or weir on that port?)")]
    Bind { listen: String, source: std::io::Error },
    #[error("kafka_api.advertised_address = {address:?} is not host:port")]
    Advertised { address: String },
    #[error("the committed offsets cannot be read: {0}")]
    Offsets(#[from] groups::OffsetsError),
}

/// Session timeouts a group member may ask for (Kafka's broker defaults).
pub const SESSION_TIMEOUT_MS_MIN: i32 = 6_000;
pub const SESSION_TIMEOUT_MS_MAX: i32 = 1_800_000;

impl KafkaApiSettings {
    /// Binds `[kafka_api].listen`; `None` when the API is disabled.
    pub fn prepare(valid: &ValidConfig) -> Result<Option<KafkaApiSettings>, KafkaApiError> {
        let config = &valid.config.kafka_api;
        if !config.enabled {
            return Ok(None);
        }
        let listener = std::net::TcpListener::bind(&config.listen)
            .map_err(|source| KafkaApiError::Bind { listen: config.listen.clone(), source })?;
        let bound =
            listener.local_addr().map_err(|source| KafkaApiError::Bind { listen: config.listen.clone(), source })?;
        let (advertised_host, advertised_port) = match &config.advertised_address {
            Some(address) => {
                let (host, port) = address
                    .rsplit_once(':')
                    .and_then(|(host, port)| Some((host.to_owned(), port.parse::<u16>().ok()?)))
                    .ok_or_else(|| KafkaApiError::Advertised { address: address.clone() })?;
                (host, i32::from(port))
            }
            None => (bound.ip().to_string(), i32::from(bound.port())),
        };
        Ok(Some(KafkaApiSettings {
            listener,
            advertised_host,
            advertised_port,
            topics: valid.config.topics.iter().map(|topic| (topic.name.clone(), topic.partitions)).collect(),
            connections_max: config.connections_max,
            requests_in_flight_max: config.requests_in_flight_per_connection_max as usize,
            request_bytes_max: config.request_bytes_max.0 as usize,
            response_bytes_max: config.response_bytes_max.0 as usize,
            fetch_wait_max: Duration::from_millis(config.fetch_wait_ms_max.0),
            group_limits: crate::core::consumer_group::GroupLimits {
                groups_max: config.groups_max as usize,
                members_per_group_max: config.members_per_group_max as usize,
                session_timeout_ms_min: SESSION_TIMEOUT_MS_MIN,
                session_timeout_ms_max: SESSION_TIMEOUT_MS_MAX,
            },
            offsets: groups::load_offsets(&valid.config.data_dir)?,
        }))
    }

    pub fn local_address(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// How often the accept loop checks the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// What every connection's answers share.
pub(crate) struct Listener {
    pub(crate) settings: KafkaApiSettings,
    pub(crate) metrics: crate::shell::metrics::KafkaApiMetrics,
    pub(crate) reader: Rc<CoreAppender>,
    pub(crate) shutdown: Arc<AtomicBool>,
    pub(crate) groups: Rc<groups::Groups>,
    connections: Cell<u32>,
}

/// Accepts connections until shutdown. Runs on the first core's executor.
pub async fn run(
    mut settings: KafkaApiSettings,
    reader: Rc<CoreAppender>,
    metrics: crate::shell::metrics::KafkaApiMetrics,
    shutdown: Arc<AtomicBool>,
) {
    let socket = match settings.listener.try_clone() {
        Ok(socket) => crate::shell::sys::glommio_tcp_listener(socket),
        Err(error) => {
            tracing::error!(%error, "the Kafka listener's socket cannot be handed to the core; Kafka API off");
            return;
        }
    };
    let (path, offsets) = std::mem::take(&mut settings.offsets);
    let groups = Rc::new(groups::Groups::new(path, offsets, settings.group_limits, metrics.groups.clone()));
    let stopping = shutdown.clone();
    glommio::spawn_local(groups::keep_time(groups.clone(), move || shutdown::is_signalled(&stopping))).detach();
    let listener = Rc::new(Listener { settings, metrics, reader, shutdown, groups, connections: Cell::new(0) });
    loop {
        let accepted = future::or(async { Some(socket.accept().await) }, async {
            while !shutdown::is_signalled(&listener.shutdown) {
                glommio::timer::sleep(SHUTDOWN_POLL).await;
            }
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                tracing::warn!(%error, "Kafka listener: accept failed");
                glommio::timer::sleep(SHUTDOWN_POLL).await;
                continue;
            }
        };
        if listener.connections.get() >= listener.settings.connections_max {
            tracing::warn!(
                peer = ?stream.peer_addr().ok(),
                connections_max = listener.settings.connections_max,
                "Kafka listener: connection refused, kafka_api.connections_max reached"
            );
            listener.metrics.connections_refused.inc();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        listener.connections.set(listener.connections.get() + 1);
        listener.metrics.connections_accepted.inc();
        listener.metrics.connections_open.inc();
        let serving = listener.clone();
        // Detached: the connection watches the shutdown flag itself.
        glommio::spawn_local(async move {
            let peer = stream.peer_addr().ok();
            if let Err(why) = serve_connection(&serving, stream).await {
                if matches!(why, ConnectionEnd::Request(_) | ConnectionEnd::TooLarge { .. }) {
                    serving.metrics.connections_closed_bad_request.inc();
                }
                tracing::info!(?peer, %why, "Kafka connection closed");
            }
            serving.connections.set(serving.connections.get() - 1);
            serving.metrics.connections_open.dec();
        })
        .detach();
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("the client closed it")]
    ClientClosed,
    #[error("reading: {0}")]
    Read(std::io::Error),
    #[error("writing: {0}")]
    Write(std::io::Error),
    #[error("{0}")]
    Request(#[from] RequestError),
    #[error("a request frame of {bytes} bytes is larger than kafka_api.request_bytes_max ({max})")]
    TooLarge { bytes: i64, max: usize },
    #[error("weir is stopping")]
    ShuttingDown,
}

/// One connection: reader and writer halves until either ends.
async fn serve_connection(listener: &Rc<Listener>, stream: glommio::net::TcpStream) -> Result<(), ConnectionEnd> {
    let (mut reading, mut writing) = futures_lite::io::split(stream);
    let (pending, answers) = local_channel::new_bounded(listener.settings.requests_in_flight_max);
    let read_side = async {
        loop {
            let frame = read_frame(&mut reading, listener.settings.request_bytes_max).await?;
            let request = decode_request(frame)?;
            let listener = listener.clone();
            let task = glommio::spawn_local(async move { answer::answer(&listener, request).await });
            if pending.send(task).await.is_err() {
                return Err(ConnectionEnd::ShuttingDown);
            }
        }
    };
    let write_side = async {
        while let Some(task) = answers.recv().await {
            let response: Bytes = task.await?;
            writing.write_all(&response).await.map_err(ConnectionEnd::Write)?;
        }
        Err(ConnectionEnd::ShuttingDown)
    };
    let stopping = async {
        while !shutdown::is_signalled(&listener.shutdown) {
            glommio::timer::sleep(SHUTDOWN_POLL).await;
        }
        Err(ConnectionEnd::ShuttingDown)
    };
    let result: Result<(), ConnectionEnd> = future::or(future::or(read_side, write_side), stopping).await;
    match result {
        Err(ConnectionEnd::ClientClosed) => Ok(()),
        other => other,
    }
}

/// One request frame's bytes (after its size), refusing sizes beyond `bytes_max`.
async fn read_frame(
    reading: &mut (impl futures_lite::AsyncRead + Unpin),
    bytes_max: usize,
) -> Result<Bytes, ConnectionEnd> {
    let mut size = [0u8; 4];
    match reading.read_exact(&mut size).await {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ConnectionEnd::ClientClosed),
        Err(error) => return Err(ConnectionEnd::Read(error)),
    }
    let size = i32::from_be_bytes(size);
    if size < 0 || size as usize > bytes_max {
        return Err(ConnectionEnd::TooLarge { bytes: i64::from(size), max: bytes_max });
    }
    let mut frame = BytesMut::zeroed(size as usize);
    reading.read_exact(&mut frame).await.map_err(ConnectionEnd::Read)?;
    Ok(frame.freeze())
}
