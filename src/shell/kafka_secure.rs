//! The security layer of the upstream Kafka connection: TLS (rustls, ring provider)
//! over glommio's `TcpStream`, and SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) with
//! SaslHandshake v1 + SaslAuthenticate. `shell::kafka` sees only `Transport` (read,
//! write_all, flush) and the credentials; it runs the SASL exchange itself
//! (`kafka::authenticate`) once per connection, after ApiVersions.
//!
//! TLS is driven by hand (`read_tls` / `process_new_packets` / `write_tls`): the only
//! await in a read is the TCP read, and every byte read is handed to rustls before the
//! next await, so `Transport::read` stays cancel-safe as `Connection::read_frame`
//! needs. Records the broker sends after the handshake that need an answer (a key
//! update) are answered with the next request.
//!
//! A refusal — a certificate that does not verify either way, a SASL mechanism the
//! broker does not offer, a wrong password, a broker that cannot prove it knows the
//! SCRAM credential — is not a transport failure: it comes back as
//! `KafkaError::Refused`, and the shipper stops with it instead of retrying forever.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConnection};

use crate::config::{ConfigProblem, UpstreamConfig, UpstreamSaslMechanism};
use crate::core::sasl::Mechanism;
use crate::shell::kafka_error::KafkaError;
pub use crate::shell::kafka_error::Refusal;

/// SaslHandshake v1: the tokens travel in SaslAuthenticate requests (v0 sends them as
/// raw frames, which weir does not speak).
/// Ciphertext bytes read from the socket at once.
const TLS_READ_CHUNK_BYTES: usize = 32 << 10;

/// How the shipper authenticates and encrypts: built once from the config.
#[derive(Clone, Default)]
pub struct Security {
    pub tls: Option<TlsClient>,
    pub sasl: Option<SaslCredentials>,
    /// Set when the files named in the config could not be loaded at start: every
    /// connection is then refused with this reason.
    unusable: Option<String>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("sasl", &self.sasl)
            .field("unusable", &self.unusable)
            .finish()
    }
}

/// A TLS client setup: trusted CAs, optional client certificate, the name to check.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    /// The name checked in every broker's certificate; the host of the address weir
    /// connects to when `None`.
    pub server_name: Option<ServerName<'static>>,
    /// For error messages: where the trusted CAs came from.
    pub ca_file: PathBuf,
}

/// A SASL user. The password is never printed.
#[derive(Clone)]
pub struct SaslCredentials {
    pub mechanism: Mechanism,
    pub username: String,
    password: String,
}

impl std::fmt::Debug for SaslCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SaslCredentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"(redacted)")
            .finish()
    }
}

impl SaslCredentials {
    pub fn new(mechanism: Mechanism, username: &str, password: &str) -> SaslCredentials {
        SaslCredentials { mechanism, username: username.to_owned(), password: password.to_owned() }
    }

    /// The password, for the SASL exchange only (never printed: see `Debug`).
    pub fn password(&self) -> &str {
        &self.password
    }
}

/// A problem with the security settings: the config path and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {why}")]
pub struct SecurityProblem {
    pub path: &'static str,
    pub why: String,
}

fn certificates(path: &Path, field: &'static str) -> Result<Vec<CertificateDer<'static>>, SecurityProblem> {
    let problem = |why: String| SecurityProblem { path: field, why: format!("{}: {why}", path.display()) };
    let certificates: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|error| problem(error.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|error| problem(error.to_string()))?;
    if certificates.is_empty() {
        return Err(problem("holds no PEM certificate".into()));
    }
    Ok(certificates)
}

/// Builds the TLS client from PEM files: `ca_file` (every certificate in it is trusted),
/// and a client certificate chain with its key for brokers that require one.
pub fn tls_client(
    ca_file: &Path,
    client_identity: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> Result<TlsClient, SecurityProblem> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certificates(ca_file, "upstream.tls.ca_file")?);
    if added == 0 {
        return Err(SecurityProblem {
            path: "upstream.tls.ca_file",
            why: format!("{}: none of its {ignored} certificates can be a trust anchor", ca_file.display()),
        });
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| SecurityProblem { path: "upstream.tls", why: error.to_string() })?
        .with_root_certificates(roots);
    let config = match client_identity {
        None => builder.with_no_client_auth(),
        Some((certificate_file, key_file)) => {
            let chain = certificates(certificate_file, "upstream.tls.certificate_file")?;
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| SecurityProblem {
                path: "upstream.tls.key_file",
                why: format!("{}: {error}", key_file.display()),
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|error| SecurityProblem {
                path: "upstream.tls.key_file",
                why: format!("{}: does not fit upstream.tls.certificate_file: {error}", key_file.display()),
            })?
        }
    };
    let server_name = server_name
        .map(|name| {
            ServerName::try_from(name.to_owned()).map_err(|_| SecurityProblem {
                path: "upstream.tls.server_name",
                why: format!("{name:?} is neither a DNS name nor an IP address"),
            })
        })
        .transpose()?;
    Ok(TlsClient { config: Arc::new(config), server_name, ca_file: ca_file.to_owned() })
}

/// Reads the SASL password from the file or the environment variable the config names.
fn password(config: &UpstreamConfig) -> Result<String, SecurityProblem> {
    let sasl = &config.sasl;
    if let Some(path) = &sasl.password_file {
        let text = std::fs::read_to_string(path).map_err(|error| SecurityProblem {
            path: "upstream.sasl.password_file",
            why: format!("{}: {error}", path.display()),
        })?;
        // One trailing line end is the file's, not the password's.
        let password = text.strip_suffix('\n').map(|text| text.strip_suffix('\r').unwrap_or(text)).unwrap_or(&text);
        if password.is_empty() {
            return Err(SecurityProblem {
                path: "upstream.sasl.password_file",
                why: format!("{}: is empty", path.display()),
            });
        }
        return Ok(password.to_owned());
    }
    if let Some(variable) = &sasl.password_env {
        return match std::env::var(variable) {
            Ok(password) if !password.is_empty() => Ok(password),
            Ok(_) => Err(SecurityProblem { path: "upstream.sasl.password_env", why: format!("${variable} is empty") }),
            Err(error) => {
                Err(SecurityProblem { path: "upstream.sasl.password_env", why: format!("${variable}: {error}") })
            }
        };
    }
    Err(SecurityProblem { path: "upstream.sasl", why: "password_file or password_env is needed".into() })
}

impl Security {
    /// Plain TCP, no authentication.
    pub fn none() -> Security {
        Security::default()
    }

    pub fn with_tls(mut self, tls: TlsClient) -> Security {
        self.tls = Some(tls);
        self
    }

    pub fn with_sasl(mut self, sasl: SaslCredentials) -> Security {
        self.sasl = Some(sasl);
        self
    }

    /// Loads the files and the password `[upstream.tls]` and `[upstream.sasl]` name.
    pub fn load(config: &UpstreamConfig) -> Result<Security, SecurityProblem> {
        let mut security = Security::none();
        let tls = &config.tls;
        if tls.enabled {
            let identity = match (&tls.certificate_file, &tls.key_file) {
                (Some(certificate), Some(key)) => Some((certificate.as_path(), key.as_path())),
                _ => None,
            };
            security.tls = Some(tls_client(&tls.ca_file, identity, tls.server_name.as_deref())?);
        }
        let mechanism = match config.sasl.mechanism {
            UpstreamSaslMechanism::None => None,
            UpstreamSaslMechanism::Plain => Some(Mechanism::Plain),
            UpstreamSaslMechanism::ScramSha256 => Some(Mechanism::ScramSha256),
            UpstreamSaslMechanism::ScramSha512 => Some(Mechanism::ScramSha512),
        };
        if let Some(mechanism) = mechanism {
            security.sasl = Some(SaslCredentials::new(mechanism, &config.sasl.username, &password(config)?));
        }
        Ok(security)
    }

    /// `load`, or a `Security` that refuses every connection with the reason (files
    /// that were fine when the config was validated and are gone now).
    pub fn load_or_refuse(config: &UpstreamConfig) -> Security {
        Security::load(config)
            .unwrap_or_else(|problem| Security { unusable: Some(problem.to_string()), ..Security::none() })
    }
}

/// Config validation's check of the upstream files (`config::Host::upstream_files` on
/// a probed host): they load now as `serve` will load them.
pub fn check_files(config: &UpstreamConfig) -> Result<(), ConfigProblem> {
    Security::load(config)
        .map(drop)
        .map_err(|problem| ConfigProblem { path: problem.path.to_owned(), why: problem.why })
}

/// The byte stream under a Kafka connection.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Transport {
    /// Wraps a connected socket as `security` asks: runs the TLS handshake (bounded by
    /// the caller's timeout).
    pub async fn open(stream: TcpStream, address: &str, security: &Security) -> Result<Transport, KafkaError> {
        if let Some(reason) = &security.unusable {
            return Err(KafkaError::Refused(Refusal::Setup { reason: reason.clone() }));
        }
        let Some(tls) = &security.tls else { return Ok(Transport::Plain(stream)) };
        let server_name = match &tls.server_name {
            Some(name) => name.clone(),
            None => {
                let host = host_of(address);
                ServerName::try_from(host.to_owned()).map_err(|_| {
                    KafkaError::Refused(Refusal::Tls {
                        address: address.to_owned(),
                        reason: format!(
                            "{host:?} is not a name to check a certificate against; set upstream.tls.server_name"
                        ),
                    })
                })?
            }
        };
        let connection = ClientConnection::new(tls.config.clone(), server_name).map_err(|error| {
            KafkaError::Refused(Refusal::Tls { address: address.to_owned(), reason: error.to_string() })
        })?;
        let mut stream = TlsStream {
            tcp: stream,
            tls: connection,
            incoming: vec![0u8; TLS_READ_CHUNK_BYTES].into_boxed_slice(),
            incoming_start: 0,
            incoming_end: 0,
            outgoing: Vec::new(),
        };
        stream.handshake().await.map_err(|source| {
            refine(address, tls, KafkaError::Io { address: address.to_owned(), operation: "TLS handshake", source })
        })?;
        Ok(Transport::Tls(Box::new(stream)))
    }

    pub async fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read(buffer).await,
            Transport::Tls(stream) => stream.read(buffer).await,
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.write_all(bytes).await,
            Transport::Tls(stream) => stream.write_all(bytes).await,
        }
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Transport::Plain(stream) => stream.flush().await,
            Transport::Tls(stream) => stream.flush().await,
        }
    }
}

/// The host part of "host:port" (brackets of an IPv6 address removed).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host)
}

/// A TLS client session over a glommio TCP stream.
pub struct TlsStream {
    tcp: TcpStream,
    tls: ClientConnection,
    /// Ciphertext read from the socket, `incoming_start..incoming_end` not yet given
    /// to rustls.
    incoming: Box<[u8]>,
    incoming_start: usize,
    incoming_end: usize,
    outgoing: Vec<u8>,
}

fn tls_io_error(error: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, error)
}

impl TlsStream {
    async fn handshake(&mut self) -> std::io::Result<()> {
        while self.tls.is_handshaking() {
            if self.tls.wants_write() {
                self.write_pending().await?;
            } else if !self.fill().await? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the broker closed the connection during the TLS handshake",
                ));
            }
        }
        self.write_pending().await
    }

    /// Writes every TLS record rustls has queued.
    async fn write_pending(&mut self) -> std::io::Result<()> {
        while self.tls.wants_write() {
            self.outgoing.clear();
            self.tls.write_tls(&mut self.outgoing)?;
            self.tcp.write_all(&self.outgoing).await?;
        }
        Ok(())
    }

    /// Gives rustls the next ciphertext: what is buffered, else one socket read (the
    /// only await). False at the end of the TCP stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        if self.incoming_start == self.incoming_end {
            let bytes = self.tcp.read(&mut self.incoming).await?;
            self.incoming_start = 0;
            self.incoming_end = bytes;
            if bytes == 0 {
                // Tell rustls: it then reports a close without close_notify.
                self.tls.read_tls(&mut std::io::empty())?;
                self.tls.process_new_packets().map_err(tls_io_error)?;
                return Ok(false);
            }
        }
        let mut pending = &self.incoming[self.incoming_start..self.incoming_end];
        let before = pending.len();
        self.tls.read_tls(&mut pending)?;
        self.incoming_start += before - pending.len();
        self.tls.process_new_packets().map_err(tls_io_error)?;
        Ok(true)
    }

    async fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.tls.reader().read(buffer) {
                Ok(bytes) => return Ok(bytes), // 0: the broker sent close_notify
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
            if !self.fill().await? {
                // The TCP stream ended: rustls says whether cleanly (close_notify: 0)
                // or not (an error).
                return match self.tls.reader().read(buffer) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                };
            }
        }
    }

    async fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let written = self.tls.writer().write(bytes)?;
            bytes = &bytes[written..];
            assert!(written > 0 || self.tls.wants_write(), "rustls takes plaintext or has records to send");
            self.write_pending().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.write_pending().await?;
        self.tcp.flush().await
    }
}

/// Turns an I/O error that carries a TLS refusal into `KafkaError::Refused`; any other
/// error is returned as it is (a transport failure: retried).
pub fn refine(address: &str, tls: &TlsClient, error: KafkaError) -> KafkaError {
    let rustls_error = match &error {
        KafkaError::Io { source, .. } => source.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    let Some(rustls_error) = rustls_error else { return error };
    let reason = match rustls_error {
        rustls::Error::InvalidCertificate(why) => format!(
            "the broker's certificate is refused ({why:?}): it must be signed by a CA in upstream.tls.ca_file ({}) and name {}",
            tls.ca_file.display(),
            tls.server_name.as_ref().map_or_else(|| format!("the host {:?}", host_of(address)), |name| format!("{:?} (upstream.tls.server_name)", name.to_str()))
        ),
        rustls::Error::NoCertificatesPresented => "the broker presented no certificate".to_owned(),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
            | AlertDescription::HandshakeFailure),
        ) => format!(
            "the broker refused the TLS session ({alert:?}): it wants a client certificate it trusts (upstream.tls.certificate_file, upstream.tls.key_file)"
        ),
        _ => return error,
    };
    KafkaError::Refused(Refusal::Tls { address: address.to_owned(), reason })
}

/// Refines the errors of a connection's opening exchange (the first read may carry the
/// broker's TLS alert about our certificate).
pub fn refine_opening(address: &str, security: &Security, error: KafkaError) -> KafkaError {
    match &security.tls {
        Some(tls) => refine(address, tls, error),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError, Host};

    fn problems(text: &str) -> Vec<ConfigProblem> {
        let host = Host {
            usable_cpus: [0, 1].into_iter().collect(),
            upstream_files: check_files,
            kafka_api_files: |_| Vec::new(),
        };
        match Config::parse(text, "test").and_then(|config| config.validate(&host, "test")) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn upstream_tls_and_sasl_files_are_loaded_when_shipping_is_on() {
        let directory = tempfile::tempdir().unwrap();
        let password = directory.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let missing = directory.path().join("missing-ca.pem");
        let text = format!(
            "[upstream]\nenabled = true\nbootstrap_servers = [\"k:9093\"]\n[upstream.tls]\nenabled = true\nca_file = {missing:?}\n[upstream.sasl]\nmechanism = \"SCRAM-SHA-256\"\nusername = \"weir\"\npassword_file = {password:?}\n"
        );
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].to_string().starts_with("upstream.tls.ca_file:"), "{found:?}");
        assert!(found[0].to_string().contains("missing-ca.pem"), "{found:?}");
        // The system's CA bundle (the default) and the password file load.
        let text = format!(
            "[upstream]\nenabled = true\nbootstrap_servers = [\"k:9093\"]\n[upstream.tls]\nenabled = true\n[upstream.sasl]\nmechanism = \"SCRAM-SHA-256\"\nusername = \"weir\"\npassword_file = {password:?}\n"
        );
        let host = Host {
            usable_cpus: [0, 1].into_iter().collect(),
            upstream_files: check_files,
            kafka_api_files: |_| Vec::new(),
        };
        let valid = Config::parse(&text, "test").unwrap().validate(&host, "test").unwrap();
        let security = Security::load(&valid.config.upstream).unwrap();
        assert!(security.tls.is_some());
        assert_eq!(security.sasl.unwrap().username, "weir");
        // An empty password file is refused, with its path.
        std::fs::write(&password, "\n").unwrap();
        let found = problems(&text.replace("[upstream.tls]\nenabled = true\n", ""));
        assert!(
            found[0].to_string().starts_with("upstream.sasl.password_file:")
                && found[0].to_string().contains("is empty"),
            "{found:?}"
        );
    }

    #[test]
    fn the_host_is_taken_from_the_address_for_the_certificate_check() {
        assert_eq!(host_of("broker-1.example.com:9093"), "broker-1.example.com");
        assert_eq!(host_of("127.0.0.1:9093"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9093"), "::1");
    }

    #[test]
    fn credentials_never_print_the_password() {
        let credentials = SaslCredentials::new(Mechanism::ScramSha256, "alice", "hunter2");
        let text = format!("{:?}", Security::none().with_sasl(credentials));
        assert!(text.contains("alice") && !text.contains("hunter2"), "{text}");
    }

    #[test]
    fn a_missing_ca_file_names_the_field_and_the_path() {
        let problem = tls_client(Path::new("/nonexistent/ca.pem"), None, None).err().unwrap();
        assert_eq!(problem.path, "upstream.tls.ca_file");
        assert!(problem.why.contains("/nonexistent/ca.pem"), "{problem}");
    }
}
