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
//!
//! Security (`auth_tls`, `auth_sasl`): with `[kafka_api.tls]` a connection first
//! completes its TLS handshake, then speaks Kafka inside it; with `[kafka_api.sasl]` it
//! may send only ApiVersions, SaslHandshake and SaslAuthenticate until it has
//! authenticated, and a failed authentication is answered and then closes it. A
//! connection that is not authenticated by `kafka_api.authentication_ms_max` after
//! accept is closed.

mod answer;
mod auth_credentials;
mod auth_sasl;
mod auth_tls;
mod groups;

pub use auth_credentials::{
    add_user, remove_user, Credentials, CredentialsError, ITERATIONS_DEFAULT as CREDENTIAL_ITERATIONS_DEFAULT,
};

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;

use crate::config::{ConfigProblem, KafkaApiConfig, ValidConfig};
use crate::core::kafka_acl::{Acl, Permissions, Rule};
use crate::core::sasl_server::allowed_before_authentication;
use crate::shell::engine::CoreAppender;
use crate::shell::shutdown;
use auth_sasl::After;

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
    /// TLS on every connection (`[kafka_api.tls]`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// From accept until a connection must be authenticated.
    pub authentication_time_max: Duration,
    /// SASL on every connection (`[kafka_api.sasl]`).
    pub sasl: Option<auth_sasl::SaslSettings>,
    /// Who reads what (`[[kafka_api.acl]]`; open without authentication).
    pub acl: Acl,
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
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Security(Vec<ConfigProblem>),
}

/// Config validation's check of the files `[kafka_api.tls]` and `[kafka_api.sasl]`
/// name (`config::Host::kafka_api_files` on a probed host): they load now as `serve`
/// will load them.
pub fn check_files(config: &KafkaApiConfig) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    if config.tls.enabled {
        if let Err(found) = auth_tls::server_config(&config.tls) {
            problems.extend(found);
        }
    }
    if config.sasl.enabled() {
        if let Err(found) = auth_sasl::SaslSettings::load(&config.sasl) {
            problems.push(found);
        }
    }
    problems
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
        if config.sasl.enabled() && !config.tls.enabled && !is_loopback(&config.listen) {
            tracing::warn!(
                listen = %config.listen,
                "kafka_api: SASL without TLS off loopback: clients authenticate, but records travel unencrypted \
                 (enable [kafka_api.tls])"
            );
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
            tls: match config.tls.enabled {
                true => Some(auth_tls::server_config(&config.tls).map_err(KafkaApiError::Security)?),
                false => None,
            },
            authentication_time_max: Duration::from_millis(config.authentication_ms_max.0),
            acl: match config.authenticates() {
                true => Acl::enforced(
                    config
                        .acl
                        .iter()
                        .map(|rule| Rule { principal: rule.principal.clone(), topics: rule.topics.clone() })
                        .collect(),
                ),
                false => Acl::open(),
            },
            sasl: match config.sasl.enabled() {
                true => Some(
                    auth_sasl::SaslSettings::load(&config.sasl)
                        .map_err(|found| KafkaApiError::Security(vec![found]))?,
                ),
                false => None,
            },
        }))
    }

    pub fn local_address(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// How long a connection refused during authentication stays open after its refusal
/// was sent (and its write side closed), so the client reads the reason.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

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
            if let Err(why) = open_and_serve(&serving, stream).await {
                if matches!(why, ConnectionEnd::Request(_) | ConnectionEnd::TooLarge { .. }) {
                    serving.metrics.connections_closed_bad_request.inc();
                }
                if let ConnectionEnd::Handshake(error) = &why {
                    if error.is_certificate_refused() {
                        serving.metrics.authentication_failed(AuthMechanism::Mtls);
                    }
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
    #[error("{0}")]
    Handshake(auth_tls::HandshakeError),
    #[error("not authenticated within kafka_api.authentication_ms_max")]
    AuthenticationTimeout,
    #[error("the client certificate's subject CN is not a principal name (1..=64 of a-z A-Z 0-9 . _ -)")]
    CertificateName,
    #[error("api key {key} before authentication (only ApiVersions, SaslHandshake, SaslAuthenticate are answered)")]
    Unauthenticated { key: i16 },
    #[error("SASL authentication failed (answered, then closed)")]
    AuthenticationFailed,
}

fn is_loopback(listen: &str) -> bool {
    listen.parse::<std::net::SocketAddr>().is_ok_and(|address| address.ip().is_loopback())
}

pub use crate::shell::metrics::AuthMechanism;

/// What a connection knows about its client.
pub(crate) struct Session {
    /// `User:NAME`: the SASL user, else the client certificate's CN; `None` without
    /// authentication.
    principal: RefCell<Option<String>>,
    /// Whether the client may send more than the authentication requests.
    authenticated: Cell<bool>,
    /// The SASL conversation, from the handshake on.
    sasl: RefCell<Option<crate::core::sasl_server::SaslConversation>>,
    mechanism: Cell<Option<crate::core::sasl::Mechanism>>,
    /// What the principal may read: decided once it is known.
    permissions: RefCell<Rc<Permissions>>,
}

impl Session {
    /// `principal` from the TLS handshake; authenticated at once unless SASL is on.
    fn new(listener: &Listener, principal: Option<String>) -> Session {
        let session = Session {
            principal: RefCell::new(principal),
            authenticated: Cell::new(listener.settings.sasl.is_none()),
            sasl: RefCell::new(None),
            mechanism: Cell::new(None),
            permissions: RefCell::new(Rc::new(Permissions::Topics(Default::default()))),
        };
        session.decide_permissions(listener);
        session
    }

    /// SASL authenticated the client as `principal`.
    fn authenticate(&self, listener: &Listener, principal: String) {
        *self.principal.borrow_mut() = Some(principal);
        self.authenticated.set(true);
        self.decide_permissions(listener);
    }

    fn decide_permissions(&self, listener: &Listener) {
        let principal = self.principal.borrow();
        let topics = listener.settings.topics.iter().map(|(name, _)| name.as_str());
        *self.permissions.borrow_mut() = Rc::new(listener.settings.acl.permissions(principal.as_deref(), topics));
    }
}

/// Runs the TLS handshake when configured, then serves the connection.
async fn open_and_serve(listener: &Rc<Listener>, stream: glommio::net::TcpStream) -> Result<(), ConnectionEnd> {
    let deadline = Instant::now() + listener.settings.authentication_time_max;
    let Some(tls) = &listener.settings.tls else {
        let session = Session::new(listener, None);
        return serve_connection(listener, stream, session, deadline).await;
    };
    let handshake = async { Some(auth_tls::accept(stream, tls.clone()).await) };
    let expired = async {
        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
        None
    };
    let stream = future::or(handshake, expired)
        .await
        .ok_or(ConnectionEnd::AuthenticationTimeout)?
        .map_err(ConnectionEnd::Handshake)?;
    let principal = match stream.client_certificate() {
        None => None,
        Some(certificate) => {
            let name = crate::certs::device_id_of(certificate).ok_or(ConnectionEnd::CertificateName)?;
            listener.metrics.authenticated(AuthMechanism::Mtls);
            Some(format!("User:{name}"))
        }
    };
    let session = Session::new(listener, principal);
    serve_connection(listener, stream, session, deadline).await
}

/// One connection: reader and writer halves until either ends.
async fn serve_connection(
    listener: &Rc<Listener>,
    stream: impl futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
    session: Session,
    deadline: Instant,
) -> Result<(), ConnectionEnd> {
    tracing::debug!(principal = session.principal.borrow().as_deref().unwrap_or("(none)"), "Kafka connection open");
    let (mut reading, mut writing) = futures_lite::io::split(stream);
    let (pending, answers) = local_channel::new_bounded(listener.settings.requests_in_flight_max);
    let read_side = async {
        loop {
            let frame = read_frame(&mut reading, listener.settings.request_bytes_max).await?;
            let request = decode_request(frame)?;
            let key = request.key();
            if !session.authenticated.get() && !allowed_before_authentication(key) {
                return Err(ConnectionEnd::Unauthenticated { key });
            }
            let (task, after) = match auth_sasl::respond(listener, &session, &request)? {
                Some((response, after)) => (glommio::spawn_local(async move { Ok(response) }), after),
                None => {
                    let listener = listener.clone();
                    let permissions = session.permissions.borrow().clone();
                    let answering = async move { answer::answer(&listener, request, &permissions).await };
                    (glommio::spawn_local(answering), After::GoOn)
                }
            };
            let closing = matches!(after, After::Close);
            if pending.send((task, after)).await.is_err() {
                return Err(ConnectionEnd::ShuttingDown);
            }
            if closing {
                // The writer sends the refusal and ends the connection; what the
                // client sends meanwhile is read and dropped, so the close is a FIN
                // after the refusal, not a reset that could discard it.
                let mut discard = [0u8; 4096];
                while matches!(reading.read(&mut discard).await, Ok(bytes) if bytes > 0) {}
                future::pending::<()>().await;
            }
        }
    };
    let write_side = async {
        while let Some((task, after)) = answers.recv().await {
            let response: Bytes = task.await?;
            writing.write_all(&response).await.map_err(ConnectionEnd::Write)?;
            writing.flush().await.map_err(ConnectionEnd::Write)?;
            if matches!(after, After::Close) {
                // TLS close_notify and FIN, then a moment for the client to read.
                let _ = writing.close().await;
                glommio::timer::sleep(CLOSE_LINGER).await;
                return Err(ConnectionEnd::AuthenticationFailed);
            }
        }
        Err(ConnectionEnd::ShuttingDown)
    };
    let stopping = async {
        while !shutdown::is_signalled(&listener.shutdown) {
            glommio::timer::sleep(SHUTDOWN_POLL).await;
            if !session.authenticated.get() && Instant::now() >= deadline {
                return Err(ConnectionEnd::AuthenticationTimeout);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError, Host};

    fn problems(text: &str) -> Vec<String> {
        let host = Host {
            usable_cpus: [0, 1].into_iter().collect(),
            upstream_files: |_| Ok(()),
            kafka_api_files: check_files,
        };
        match Config::parse(text, "test").and_then(|config| config.validate(&host, "test")) {
            Err(ConfigError::Invalid { problems, .. }) => problems.iter().map(ToString::to_string).collect(),
            Ok(_) => Vec::new(),
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn every_bad_security_field_is_named() {
        let directory = tempfile::tempdir().unwrap();
        crate::certs::generate(directory.path(), &[], &[], 2).unwrap();
        let path = |name: &str| directory.path().join(name);
        let missing = path("missing.pem");
        let found = problems(&format!(
            "[[topics]]\nname = \"telemetry\"\npartitions = 1\n\
             [kafka_api]\nlisten = \"0.0.0.0:9092\"\nadvertised_address = \"edge:9092\"\nauthentication_ms_max = 0\n\
             [kafka_api.tls]\nclient_ca_file = {missing:?}\n"
        ));
        let text = found.join("\n");
        for field in
            ["kafka_api.authentication_ms_max:", "kafka_api.tls.client_ca_file: set while", "kafka_api.listen:"]
        {
            assert!(text.contains(field), "{field} in {text}");
        }
        // TLS on: files that do not load are named with their path.
        let found = problems(&format!(
            "[kafka_api.tls]\nenabled = true\ncertificate_file = {missing:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
            path("server.key"),
            path("ca.key"),
        ));
        let text = found.join("\n");
        assert!(text.contains("kafka_api.tls.certificate_file:") && text.contains("missing.pem"), "{text}");
        assert!(text.contains("kafka_api.tls.client_ca_file:"), "{text}");
        // SASL: a credentials file needed, PLAIN off loopback needs TLS, rules name
        // principals and edge topics.
        let found = problems(
            "[[topics]]\nname = \"telemetry\"\npartitions = 1\n[kafka_api]\nlisten = \"10.1.2.3:9092\"\n\
             [kafka_api.sasl]\nmechanisms = [\"PLAIN\"]\n\
             [[kafka_api.acl]]\nprincipal = \"dashboard\"\ntopics = [\"nope\"]\n",
        );
        let text = found.join("\n");
        for field in [
            "kafka_api.sasl.credentials_file:",
            "kafka_api.sasl.mechanisms: PLAIN",
            "kafka_api.acl[0].principal:",
            "kafka_api.acl[0].topics: \"nope\"",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        // Rules without authentication are refused; a good secure config passes.
        assert!(problems("[[kafka_api.acl]]\nprincipal = \"User:x\"\ntopics = [\"*\"]\n")
            .iter()
            .any(|problem| problem.starts_with("kafka_api.acl:")));
        let users = path("users.toml");
        auth_credentials::add_user(&users, "dashboard", b"pw", 4096).unwrap();
        let good = format!(
            "[[topics]]\nname = \"telemetry\"\npartitions = 1\n[kafka_api]\nlisten = \"0.0.0.0:9092\"\n\
             advertised_address = \"edge:9092\"\n[kafka_api.tls]\nenabled = true\ncertificate_file = {:?}\n\
             key_file = {:?}\nclient_ca_file = {:?}\n[kafka_api.sasl]\nmechanisms = [\"SCRAM-SHA-512\", \"PLAIN\"]\n\
             credentials_file = {users:?}\n[[kafka_api.acl]]\nprincipal = \"User:dashboard\"\ntopics = [\"telemetry\"]\n",
            path("server.pem"),
            path("server.key"),
            path("ca.pem"),
        );
        assert_eq!(problems(&good), Vec::<String>::new());
    }
}
