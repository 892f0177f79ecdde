//! TLS on the Kafka listener: rustls' `ServerConnection` driven by hand over glommio's
//! `TcpStream` (`read_tls` / `process_new_packets` / `write_tls`), as
//! `shell::kafka_secure` does for the upstream client side.
//!
//! The handshake runs before a single Kafka frame is read, bounded in bytes here
//! (`HANDSHAKE_BYTES_MAX`) and in time by the connection's authentication deadline
//! (`kafka_api.authentication_ms_max`); a client that sends garbage, too much, or too
//! slowly loses its own connection and nothing else. With `client_ca_file` the client
//! must present a certificate that CA signed; its subject common name (a name of
//! `a-z A-Z 0-9 . _ -`, as device ids) becomes the principal `User:CN` unless SASL
//! names one.
//!
//! After the handshake the stream is an `AsyncRead + AsyncWrite` so the connection's
//! reader and writer halves see it as they see plain TCP. A write only queues
//! plaintext in rustls (within its 64 KiB send buffer) and pushes what it can; `flush`
//! sends the rest, and the writer flushes after every response.

use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConnection;

use crate::config::{ConfigProblem, KafkaApiTlsConfig};

/// Ciphertext bytes read from the socket at once.
const TLS_READ_CHUNK_BYTES: usize = 16 << 10;
/// The most ciphertext a client may send before its handshake completes: a
/// ClientHello and a client certificate chain fit in far less.
pub const HANDSHAKE_BYTES_MAX: usize = 64 << 10;

fn certificates(path: &std::path::Path, field: &str) -> Result<Vec<CertificateDer<'static>>, ConfigProblem> {
    let problem = |why: String| ConfigProblem { path: field.to_owned(), why: format!("{}: {why}", path.display()) };
    let certificates: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|error| problem(error.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|error| problem(error.to_string()))?;
    if certificates.is_empty() {
        return Err(problem("holds no PEM certificate".into()));
    }
    Ok(certificates)
}

/// Builds the listener's TLS setup from `[kafka_api.tls]`; every problem names its field.
pub fn server_config(tls: &KafkaApiTlsConfig) -> Result<Arc<rustls::ServerConfig>, Vec<ConfigProblem>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut problems = Vec::new();
    let (Some(certificate_file), Some(key_file)) = (&tls.certificate_file, &tls.key_file) else {
        return Err(vec![ConfigProblem {
            path: "kafka_api.tls".into(),
            why: "certificate_file and key_file are needed".into(),
        }]);
    };
    let chain =
        certificates(certificate_file, "kafka_api.tls.certificate_file").map_err(|problem| problems.push(problem));
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| {
        problems.push(ConfigProblem {
            path: "kafka_api.tls.key_file".into(),
            why: format!("{}: {error}", key_file.display()),
        })
    });
    let verifier = tls.client_ca_file.as_ref().map(|ca_file| {
        let roots = certificates(ca_file, "kafka_api.tls.client_ca_file")?;
        let mut store = rustls::RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(roots);
        if added == 0 {
            return Err(ConfigProblem {
                path: "kafka_api.tls.client_ca_file".into(),
                why: format!("{}: none of its {ignored} certificates can be a trust anchor", ca_file.display()),
            });
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone()).build().map_err(|error| {
            ConfigProblem {
                path: "kafka_api.tls.client_ca_file".into(),
                why: format!("{}: {error}", ca_file.display()),
            }
        })
    });
    let verifier = match verifier {
        None => None,
        Some(Ok(verifier)) => Some(verifier),
        Some(Err(problem)) => {
            problems.push(problem);
            None
        }
    };
    let (Ok(chain), Ok(key)) = (chain, key) else { return Err(problems) };
    if !problems.is_empty() {
        return Err(problems);
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| vec![ConfigProblem { path: "kafka_api.tls".into(), why: error.to_string() }])?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|error| {
        vec![ConfigProblem {
            path: "kafka_api.tls.key_file".into(),
            why: format!("{}: does not fit kafka_api.tls.certificate_file: {error}", key_file.display()),
        }]
    })?;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// A TLS server session over a glommio TCP stream.
pub struct TlsServerStream {
    tcp: TcpStream,
    tls: ServerConnection,
    /// Ciphertext read from the socket, `incoming_start..incoming_end` not yet given
    /// to rustls.
    incoming: Box<[u8]>,
    incoming_start: usize,
    incoming_end: usize,
    /// TLS records made by rustls, `outgoing_sent..` not yet written to the socket.
    outgoing: Vec<u8>,
    outgoing_sent: usize,
}

fn tls_io_error(error: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, error)
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("TLS handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake: the client sent more than {HANDSHAKE_BYTES_MAX} bytes before finishing it")]
    TooLarge,
    #[error("TLS handshake: the client closed the connection")]
    Closed,
}

impl HandshakeError {
    /// Whether rustls refused the client's certificate (or its absence).
    pub fn is_certificate_refused(&self) -> bool {
        let HandshakeError::Io(error) = self else { return false };
        matches!(
            error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
        )
    }
}

/// Runs the server handshake on `tcp`; the caller bounds it in time.
pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<TlsServerStream, HandshakeError> {
    let tls = ServerConnection::new(config).map_err(tls_io_error)?;
    let mut stream = TlsServerStream {
        tcp,
        tls,
        incoming: vec![0u8; TLS_READ_CHUNK_BYTES].into_boxed_slice(),
        incoming_start: 0,
        incoming_end: 0,
        outgoing: Vec::new(),
        outgoing_sent: 0,
    };
    let mut received = 0usize;
    while stream.tls.is_handshaking() {
        if stream.tls.wants_write() {
            futures_lite::future::poll_fn(|cx| stream.poll_send(cx)).await?;
            continue;
        }
        let result = futures_lite::future::poll_fn(|cx| stream.poll_receive(cx)).await;
        match result {
            Ok(None) => return Err(HandshakeError::Closed),
            Ok(Some(bytes)) => received += bytes,
            Err(error) => {
                // The alert rustls queued (bad certificate, decode error) tells the
                // client why; sending it is best effort.
                let _ = futures_lite::future::poll_fn(|cx| stream.poll_send(cx)).await;
                return Err(error.into());
            }
        }
        if received > HANDSHAKE_BYTES_MAX {
            return Err(HandshakeError::TooLarge);
        }
    }
    futures_lite::future::poll_fn(|cx| stream.poll_send(cx)).await?;
    Ok(stream)
}

impl TlsServerStream {
    /// The verified client certificate's leaf, when the client presented one.
    pub fn client_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.tls.peer_certificates().and_then(|chain| chain.first())
    }

    /// Writes every TLS record rustls has queued.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if self.outgoing_sent < self.outgoing.len() {
                let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.outgoing_sent..]))?;
                if written == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.outgoing_sent += written;
                continue;
            }
            if !self.tls.wants_write() {
                return Poll::Ready(Ok(()));
            }
            self.outgoing.clear();
            self.outgoing_sent = 0;
            self.tls.write_tls(&mut self.outgoing)?;
        }
    }

    /// Gives rustls the next ciphertext: what is buffered, else one socket read. The
    /// bytes read from the socket (0 when buffered bytes were given), `None` at its end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Option<usize>>> {
        let mut read = 0;
        if self.incoming_start == self.incoming_end {
            read = ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut self.incoming))?;
            self.incoming_start = 0;
            self.incoming_end = read;
            if read == 0 {
                // Tell rustls: it then reports a close without close_notify.
                self.tls.read_tls(&mut std::io::empty())?;
                self.tls.process_new_packets().map_err(tls_io_error)?;
                return Poll::Ready(Ok(None));
            }
        }
        let mut pending = &self.incoming[self.incoming_start..self.incoming_end];
        let before = pending.len();
        self.tls.read_tls(&mut pending)?;
        self.incoming_start += before - pending.len();
        self.tls.process_new_packets().map_err(tls_io_error)?;
        Poll::Ready(Ok(Some(read)))
    }
}

impl AsyncRead for TlsServerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buffer: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        loop {
            match this.tls.reader().read(buffer) {
                Ok(bytes) => return Poll::Ready(Ok(bytes)), // 0: close_notify
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
            // Records rustls wants to answer with (a key update) go out first; a
            // socket not ready for them does not stop the read.
            if this.tls.wants_write() {
                if let Poll::Ready(Err(error)) = this.poll_send(cx) {
                    return Poll::Ready(Err(error));
                }
            }
            if ready!(this.poll_receive(cx))?.is_none() {
                // The TCP stream ended: rustls says whether cleanly (close_notify: 0)
                // or not (an error).
                return Poll::Ready(match this.tls.reader().read(buffer) {
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                });
            }
        }
    }
}

impl AsyncWrite for TlsServerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        loop {
            let taken = this.tls.writer().write(bytes)?;
            if taken > 0 || bytes.is_empty() {
                // Push what the socket takes now; `poll_flush` sends the rest.
                if let Poll::Ready(Err(error)) = this.poll_send(cx) {
                    return Poll::Ready(Err(error));
                }
                return Poll::Ready(Ok(taken));
            }
            // rustls' send buffer is full: empty it first.
            ready!(this.poll_send(cx))?;
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.tls.send_close_notify();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_close(cx)
    }
}
