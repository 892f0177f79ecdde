//! From a profile to a quinn client config: TLS 1.3 only (rustls with the ring
//! provider), the profile's CA as the only trust anchor, the device certificate as the
//! client certificate, ALPN `weir/1`, and a QUIC transport sized for a telemetry device
//! (one bidirectional stream of its own, none opened by the server, no datagrams).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weir_protocol::ALPN;

use crate::error::DeviceError;
use crate::profile::DeviceProfile;

/// A device's connection settings, built once and reused for every reconnect.
#[derive(Clone)]
pub struct Credentials {
    pub client_config: quinn::ClientConfig,
    /// The certificate's subject CN, as the server will see it.
    pub device_id: String,
    pub server_name: String,
}

fn credentials_error(path: &Path, why: impl std::fmt::Display) -> DeviceError {
    DeviceError::Credentials { path: path.to_owned(), why: why.to_string() }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, DeviceError> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|error| credentials_error(path, error))?
        .collect::<Result<_, _>>()
        .map_err(|error| credentials_error(path, error))?;
    if certificates.is_empty() {
        return Err(credentials_error(path, "no PEM certificate in the file"));
    }
    Ok(certificates)
}

impl Credentials {
    pub fn load(profile: &DeviceProfile) -> Result<Credentials, DeviceError> {
        let tls = &profile.tls;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_certificates(&tls.ca)? {
            roots.add(certificate).map_err(|error| credentials_error(&tls.ca, error))?;
        }
        let chain = read_certificates(&tls.certificate)?;
        let device_id = weir_protocol::device_id::device_id_of(&chain[0]).ok_or_else(|| {
            credentials_error(&tls.certificate, "the subject CN is not a device id (1..=64 of a-z A-Z 0-9 . _ -)")
        })?;
        let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|error| credentials_error(&tls.key, error))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(crypto))
            .map_err(|error| credentials_error(&tls.certificate, error))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
        client_config.transport_config(Arc::new(transport(profile)));
        Ok(Credentials { client_config, device_id, server_name: profile.server.name.clone() })
    }
}

fn transport(profile: &DeviceProfile) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let receive_window = quinn::VarInt::from_u64(profile.flow.receive_window_bytes).unwrap_or(quinn::VarInt::MAX);
    transport
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(receive_window)
        .receive_window(receive_window)
        .send_window(profile.flow.send_window_bytes)
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_millis(profile.timeouts.idle_ms)).ok())
        .keep_alive_interval(match profile.timeouts.keep_alive_ms {
            0 => None,
            keep_alive_ms => Some(Duration::from_millis(keep_alive_ms)),
        });
    transport
}
