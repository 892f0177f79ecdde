//! TLS for the device listener: rustls (ring provider), TLS 1.3 only, client
//! certificates required and verified against the configured CA, ALPN `weir/1`.
//! Identity (the device id) is read from the verified leaf after the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::{IdleTimeout, ServerConfig, TransportConfig, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::core::protocol::ALPN;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto: {0}")]
    Quic(String),
}

/// The transport limits of a device connection (from `[quic]`).
#[derive(Debug, Clone)]
pub struct TransportLimits {
    pub streams_per_connection_max: u32,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    pub idle_timeout: Duration,
}

impl TransportLimits {
    pub fn from_config(config: &crate::config::QuicConfig) -> TransportLimits {
        TransportLimits {
            streams_per_connection_max: config.streams_per_connection_max,
            stream_window_bytes: config.stream_window_bytes.0 as u32,
            connection_window_bytes: config.connection_window_bytes.0 as u32,
            idle_timeout: Duration::from_secs(config.idle_timeout_s.0),
        }
    }
}

fn certificates(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |why: String| TlsError::File { path: path.to_owned(), why };
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|error| file_error(error.to_string()))?;
    if certificates.is_empty() {
        return Err(file_error("holds no PEM certificate".into()));
    }
    Ok(certificates)
}

/// The bytes of the three PEM files of a certificates directory, read once so that
/// what is compared on a reload is exactly what was loaded.
pub fn read_pem_files(directory: &Path) -> Result<crate::reload::CertificateFiles, TlsError> {
    let read = |name: &str| {
        let path = directory.join(name);
        std::fs::read(&path).map_err(|error| TlsError::File { path, why: error.to_string() })
    };
    Ok(crate::reload::CertificateFiles {
        ca: read(CA_FILE)?,
        certificate: read(CERTIFICATE_FILE)?,
        key: read(KEY_FILE)?,
    })
}

/// The file names in a certificates directory (`quic.certs_dir`).
pub const CA_FILE: &str = "ca.pem";
pub const CERTIFICATE_FILE: &str = "server.pem";
pub const KEY_FILE: &str = "server.key";

/// Builds the QUIC server config from PEM files.
pub fn server_config(
    ca: &Path,
    certificate: &Path,
    key: &Path,
    limits: &TransportLimits,
) -> Result<ServerConfig, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| TlsError::File { path: path.to_owned(), why: error.to_string() })
    };
    let files = crate::reload::CertificateFiles { ca: read(ca)?, certificate: read(certificate)?, key: read(key)? };
    server_config_from_pem(&files, [ca, certificate, key], limits)
}

/// Builds the QUIC server config from the PEM bytes of `files`; `paths` (CA,
/// certificate, key) name them in errors.
pub fn server_config_from_pem(
    files: &crate::reload::CertificateFiles,
    [ca, certificate, key]: [&Path; 3],
    limits: &TransportLimits,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for root in certificates(&files.ca, ca)? {
        roots.add(root).map_err(|error| TlsError::File { path: ca.to_owned(), why: error.to_string() })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| TlsError::Verifier(error.to_string()))?;
    let chain = certificates(&files.certificate, certificate)?;
    let key_path = key;
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|error| TlsError::File { path: key_path.to_owned(), why: error.to_string() })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::File {
            path: key_path.to_owned(),
            why: format!("not a usable key for {}: {error}", certificate.display()),
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|error| TlsError::Quic(error.to_string()))?;
    let mut server = ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.streams_per_connection_max))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(limits.stream_window_bytes))
        .receive_window(VarInt::from_u32(limits.connection_window_bytes))
        .send_window(u64::from(limits.connection_window_bytes))
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(
            IdleTimeout::try_from(limits.idle_timeout).map_err(|error| TlsError::Quic(error.to_string()))?,
        ));
    server.transport_config(Arc::new(transport));
    Ok(server)
}
