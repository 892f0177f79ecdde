//! The part of the device listener's settings that a SIGHUP may replace (see
//! `crate::reload`): the TLS server config (certificate, key, device CA), the deny
//! list, the topic allow list and the record quota, as one immutable snapshot with a
//! generation number, shared by every core.
//!
//! Why a generation-checked snapshot and not a message per core: the listener already
//! reads every field from a shared `Arc`, and a snapshot swapped whole can never be
//! seen half-applied (a new deny list with the old certificate). The data path takes no
//! lock: each core's driver keeps its own `Arc<QuicLive>` and, once per pass, compares
//! its generation with one atomic load; only when a reload published a newer one does
//! it take the mutex, once, to clone the new `Arc`, and hand the new TLS config to its
//! endpoint (`Endpoint::set_server_config`: new handshakes use it, connections already
//! up keep theirs). Publishing happens on the signal thread, off every core.
//!
//! The invariant: the generation stored in the atomic is the generation of the
//! snapshot behind the mutex, and it only grows. It is stored (Release) after the
//! snapshot is replaced, so a core that sees a new generation (Acquire) finds that
//! snapshot or a later one behind the mutex.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use quinn_proto::ServerConfig;

use crate::config::QuicConfig;
use crate::reload::CertificateFiles;
use crate::shell::tls::{self, TlsError, TransportLimits};

/// The listener settings a reload may replace.
pub struct QuicLive {
    /// Set by [`LiveCell`]: 0 for the settings weir started with, +1 per reload.
    pub generation: u64,
    pub server_config: Arc<ServerConfig>,
    /// Topics devices may write (every topic when None).
    pub topics_allowed: Option<HashSet<String>>,
    /// Devices refused at the end of their handshake, however valid their certificate.
    pub devices_denied: HashSet<String>,
    /// Records per second per device (0: no quota); each connection gets its share.
    pub device_records_per_s_max: u32,
    /// The PEM files `server_config` was built from, to tell what a reload changed.
    pub certificates: CertificateFiles,
}

impl QuicLive {
    /// Reads the certificates in `quic.certs_dir` and takes the lists and the quota from
    /// `quic`; the transport of new connections follows `limits` (read at start).
    pub fn from_config(quic: &QuicConfig, limits: &TransportLimits) -> Result<QuicLive, TlsError> {
        let directory = &quic.certs_dir;
        let certificates = tls::read_pem_files(directory)?;
        let paths = [tls::CA_FILE, tls::CERTIFICATE_FILE, tls::KEY_FILE].map(|name| directory.join(name));
        let server_config = tls::server_config_from_pem(&certificates, [&paths[0], &paths[1], &paths[2]], limits)?;
        Ok(QuicLive {
            generation: 0,
            server_config: Arc::new(server_config),
            topics_allowed: (!quic.topics_allowed.is_empty()).then(|| quic.topics_allowed.iter().cloned().collect()),
            devices_denied: quic.devices_denied.iter().cloned().collect(),
            device_records_per_s_max: quic.device_records_per_s_max,
            certificates,
        })
    }
}

/// The current [`QuicLive`], shared by every core and the signal thread.
pub struct LiveCell {
    generation: AtomicU64,
    snapshot: Mutex<Arc<QuicLive>>,
}

impl LiveCell {
    pub fn new(mut first: QuicLive) -> LiveCell {
        first.generation = 0;
        LiveCell { generation: AtomicU64::new(0), snapshot: Mutex::new(Arc::new(first)) }
    }

    /// Replaces the settings; returns the new generation.
    pub fn publish(&self, mut next: QuicLive) -> u64 {
        let mut snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        next.generation = snapshot.generation + 1;
        let generation = next.generation;
        *snapshot = Arc::new(next);
        self.generation.store(generation, Ordering::Release);
        generation
    }

    /// The current settings.
    pub fn load(&self) -> Arc<QuicLive> {
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The current settings if they are newer than `generation`: one atomic load when
    /// nothing changed.
    pub fn newer_than(&self, generation: u64) -> Option<Arc<QuicLive>> {
        if self.generation.load(Ordering::Acquire) == generation {
            return None;
        }
        let current = self.load();
        assert!(current.generation > generation, "a generation only grows");
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(denied: &[&str]) -> QuicLive {
        let directory = tempfile::tempdir().unwrap();
        crate::certs::generate(directory.path(), &[], &[], 1).unwrap();
        let mut quic = crate::config::QuicConfig {
            certs_dir: directory.path().to_owned(),
            devices_denied: denied.iter().map(|device| device.to_string()).collect(),
            ..Default::default()
        };
        let mut live = QuicLive::from_config(&quic, &TransportLimits::from_config(&quic)).unwrap();
        assert_eq!(live.devices_denied.len(), denied.len());
        assert!(live.topics_allowed.is_none());
        quic.certs_dir = directory.path().join("missing");
        assert!(QuicLive::from_config(&quic, &TransportLimits::from_config(&quic)).is_err());
        live.generation = 99;
        live
    }

    #[test]
    fn a_core_sees_each_published_snapshot_once_and_whole() {
        let cell = LiveCell::new(live(&[]));
        let mut current = cell.load();
        assert_eq!(current.generation, 0);
        assert!(cell.newer_than(current.generation).is_none());
        assert_eq!(cell.publish(live(&["dev-2"])), 1);
        assert_eq!(cell.publish(live(&["dev-2", "dev-3"])), 2);
        // A core that missed generation 1 goes straight to 2.
        current = cell.newer_than(current.generation).unwrap();
        assert_eq!(current.generation, 2);
        assert!(current.devices_denied.contains("dev-3"));
        assert!(cell.newer_than(current.generation).is_none());
    }
}
