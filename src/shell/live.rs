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
//! The cell is `shell::snapshot` (model-checked with loom in `tests/loom.rs`): a
//! core that sees a new generation finds that snapshot or a later one, never an older.

use std::collections::HashSet;
use std::sync::Arc;

use quinn_proto::ServerConfig;

use crate::config::QuicConfig;
use crate::reload::CertificateFiles;
use crate::shell::snapshot::SnapshotCell;
use crate::shell::tls::{self, TlsError, TransportLimits};

/// The listener settings a reload may replace.
pub struct QuicLive {
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
    cell: SnapshotCell<QuicLive>,
}

impl LiveCell {
    pub fn new(first: QuicLive) -> LiveCell {
        LiveCell { cell: SnapshotCell::new(first) }
    }

    /// Replaces the settings; returns the new generation.
    pub fn publish(&self, next: QuicLive) -> u64 {
        self.cell.publish(next)
    }

    /// The current settings and their generation.
    pub fn load(&self) -> (u64, Arc<QuicLive>) {
        self.cell.load()
    }

    /// The current settings if they are newer than `generation`: one atomic load when
    /// nothing changed.
    pub fn newer_than(&self, generation: u64) -> Option<(u64, Arc<QuicLive>)> {
        self.cell.newer_than(generation)
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
        live.device_records_per_s_max = 7;
        live
    }

    #[test]
    fn a_core_sees_each_published_snapshot_once_and_whole() {
        let cell = LiveCell::new(live(&[]));
        let (mut generation, current) = cell.load();
        assert_eq!(generation, 0);
        assert!(current.devices_denied.is_empty());
        assert!(cell.newer_than(generation).is_none());
        assert_eq!(cell.publish(live(&["dev-2"])), 1);
        assert_eq!(cell.publish(live(&["dev-2", "dev-3"])), 2);
        // A core that missed generation 1 goes straight to 2.
        let (newer, current) = cell.newer_than(generation).unwrap();
        generation = newer;
        assert_eq!(generation, 2);
        assert!(current.devices_denied.contains("dev-3"));
        assert!(cell.newer_than(generation).is_none());
    }
}
