//! What a SIGHUP may change while weir runs, decided without I/O: given the config that
//! runs and a new, already validated one (and whether the certificate files changed),
//! [`plan`] says which fields apply live and which changed but need a restart, and
//! [`merged`] is the config that runs afterwards. `shell::signals` reads the files,
//! builds the TLS config, hands the live part to the cores and logs the plan.
//!
//! Live (new handshakes and frames use them; existing connections go on):
//! - the certificates in `quic.certs_dir` (server certificate and key, device CA), and
//!   `quic.certs_dir` itself;
//! - `quic.devices_denied` (checked when a device completes its handshake, so a newly
//!   denied device is refused on its next connection; its open ones go on);
//! - `quic.topics_allowed` (checked on every frame);
//! - `quic.device_records_per_s_max` (every connection's share is recomputed);
//! - `log_level`.
//!
//! Everything else is read once at start (sockets, cores, partitions, memory, windows,
//! upstream, the watch's thresholds) and is reported as needing a restart. The
//! invariant: a field is in exactly one of the two lists; `quic` is destructured without `..`, so a new `[quic]` field
//! does not compile until it is classified here. Other sections are compared field by
//! field where listed and as a whole otherwise, so no change goes unreported.

use crate::config::{Config, QuicConfig};

/// Which certificate files differ from the ones loaded before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateFiles {
    pub ca: Vec<u8>,
    pub certificate: Vec<u8>,
    pub key: Vec<u8>,
}

impl CertificateFiles {
    /// The names of the files whose bytes differ.
    pub fn changed(&self, newer: &CertificateFiles) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.ca != newer.ca {
            changed.push("ca.pem");
        }
        if self.certificate != newer.certificate {
            changed.push("server.pem");
        }
        if self.key != newer.key {
            changed.push("server.key");
        }
        changed
    }
}

/// What a reload does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Applied now, each as `field: what changed`.
    pub applied: Vec<String>,
    /// Changed in the file, not applied: the field paths that need a restart.
    pub restart_needed: Vec<String>,
}

/// Compares the running config with `candidate`; `certificates_changed` names the
/// certificate files whose bytes differ from the loaded ones (the config cannot tell).
pub fn plan(running: &Config, candidate: &Config, certificates_changed: &[&str]) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    let Config { data_dir, engine, log, admin, quic, upstream, kafka_api, topics, watch, log_level } = candidate;
    if *log_level != running.log_level {
        plan.applied.push(format!("log_level: {:?} -> {log_level:?}", running.log_level));
    }
    quic_plan(&running.quic, quic, certificates_changed, &mut plan);
    if *data_dir != running.data_dir {
        plan.restart_needed.push("data_dir".to_owned());
    }
    section(&mut plan, "engine", &running.engine, engine, |old, new| {
        vec![("cores", old.cores != new.cores), ("io_memory_bytes", old.io_memory_bytes != new.io_memory_bytes)]
    });
    section(&mut plan, "log", &running.log, log, |old, new| {
        vec![
            ("segment_bytes_max", old.segment_bytes_max != new.segment_bytes_max),
            ("segment_age_s_max", old.segment_age_s_max != new.segment_age_s_max),
            ("index_interval_bytes", old.index_interval_bytes != new.index_interval_bytes),
            ("preallocate_bytes", old.preallocate_bytes != new.preallocate_bytes),
            ("flush_delay_us_max", old.flush_delay_us_max != new.flush_delay_us_max),
            ("flush_bytes_max", old.flush_bytes_max != new.flush_bytes_max),
            ("core_flushes_per_s_max", old.core_flushes_per_s_max != new.core_flushes_per_s_max),
            ("appends_pending_max", old.appends_pending_max != new.appends_pending_max),
            ("partition_bytes_max", old.partition_bytes_max != new.partition_bytes_max),
            ("data_dir_bytes_max", old.data_dir_bytes_max != new.data_dir_bytes_max),
            ("disk_full_policy", old.disk_full_policy != new.disk_full_policy),
        ]
    });
    section(&mut plan, "admin", &running.admin, admin, |old, new| vec![("listen", old.listen != new.listen)]);
    // The Kafka listener is bound once at start: every field takes a restart.
    section(&mut plan, "kafka_api", &running.kafka_api, kafka_api, |old, new| {
        vec![
            ("enabled", old.enabled != new.enabled),
            ("listen", old.listen != new.listen),
            ("advertised_address", old.advertised_address != new.advertised_address),
            ("connections_max", old.connections_max != new.connections_max),
            (
                "requests_in_flight_per_connection_max",
                old.requests_in_flight_per_connection_max != new.requests_in_flight_per_connection_max,
            ),
            ("request_bytes_max", old.request_bytes_max != new.request_bytes_max),
            ("response_bytes_max", old.response_bytes_max != new.response_bytes_max),
            ("fetch_wait_ms_max", old.fetch_wait_ms_max != new.fetch_wait_ms_max),
            ("groups_max", old.groups_max != new.groups_max),
            ("members_per_group_max", old.members_per_group_max != new.members_per_group_max),
            // Security: the TLS setup is built at start (its files are not reread).
            ("authentication_ms_max", old.authentication_ms_max != new.authentication_ms_max),
            ("tls", old.tls != new.tls),
            // The credentials file is read at start: a new user takes a restart too.
            ("sasl", old.sasl != new.sasl),
            ("acl", old.acl != new.acl),
        ]
    });
    section(&mut plan, "upstream", &running.upstream, upstream, |old, new| {
        vec![
            ("enabled", old.enabled != new.enabled),
            ("bootstrap_servers", old.bootstrap_servers != new.bootstrap_servers),
            ("client_id", old.client_id != new.client_id),
            ("topics", old.topics != new.topics),
            ("tls", old.tls != new.tls),
            ("sasl", old.sasl != new.sasl),
        ]
    });
    if *topics != running.topics {
        plan.restart_needed.push("topics".to_owned());
    }
    // The watch's learned state belongs to its thresholds: read at start.
    section(&mut plan, "watch", &running.watch, watch, |old, new| {
        vec![("enabled", old.enabled != new.enabled), ("streams_max", old.streams_max != new.streams_max)]
    });
    plan
}

/// Pushes `prefix.field` for every listed field that differs, or `prefix` alone when the
/// section differs in a field not listed.
fn section<T: PartialEq>(
    plan: &mut ReloadPlan,
    prefix: &str,
    old: &T,
    new: &T,
    fields: impl Fn(&T, &T) -> Vec<(&'static str, bool)>,
) {
    if old == new {
        return;
    }
    let before = plan.restart_needed.len();
    for (field, differs) in fields(old, new) {
        if differs {
            plan.restart_needed.push(format!("{prefix}.{field}"));
        }
    }
    if plan.restart_needed.len() == before {
        plan.restart_needed.push(prefix.to_owned());
    }
}

fn quic_plan(old: &QuicConfig, new: &QuicConfig, certificates_changed: &[&str], plan: &mut ReloadPlan) {
    let QuicConfig {
        enabled,
        listen,
        certs_dir,
        generate_dev_certs,
        connections_max,
        handshakes_before_retry,
        streams_per_connection_max,
        frames_in_flight_per_connection_max,
        frame_bytes_max,
        records_per_frame_max,
        stream_window_bytes,
        connection_window_bytes,
        idle_timeout_s,
        topics_allowed,
        devices_denied,
        dedup_sequences_per_device_max,
        dedup_devices_max,
        dedup_horizon_records,
        socket_receive_buffer_bytes,
        socket_send_buffer_bytes,
        connections_per_device_max,
        device_records_per_s_max,
        bytes_in_flight_per_connection_max,
        handshakes_max,
        handshake_timeout_s,
        reuseport_steering,
    } = new;
    // Live.
    if *certs_dir != old.certs_dir {
        plan.applied.push(format!("quic.certs_dir: {} -> {}", old.certs_dir.display(), certs_dir.display()));
    }
    if !certificates_changed.is_empty() {
        plan.applied.push(format!("quic certificates: new {}", certificates_changed.join(", ")));
    }
    if let Some(change) = list_change(&old.devices_denied, devices_denied) {
        plan.applied.push(format!("quic.devices_denied: {change}"));
    }
    if let Some(change) = list_change(&old.topics_allowed, topics_allowed) {
        plan.applied.push(format!("quic.topics_allowed: {change}"));
    }
    if *device_records_per_s_max != old.device_records_per_s_max {
        plan.applied.push(format!(
            "quic.device_records_per_s_max: {} -> {device_records_per_s_max}",
            old.device_records_per_s_max
        ));
    }
    // Read once at start.
    let restart = [
        ("enabled", *enabled != old.enabled),
        ("listen", *listen != old.listen),
        ("generate_dev_certs", *generate_dev_certs != old.generate_dev_certs),
        ("connections_max", *connections_max != old.connections_max),
        ("handshakes_before_retry", *handshakes_before_retry != old.handshakes_before_retry),
        ("streams_per_connection_max", *streams_per_connection_max != old.streams_per_connection_max),
        (
            "frames_in_flight_per_connection_max",
            *frames_in_flight_per_connection_max != old.frames_in_flight_per_connection_max,
        ),
        ("frame_bytes_max", *frame_bytes_max != old.frame_bytes_max),
        ("records_per_frame_max", *records_per_frame_max != old.records_per_frame_max),
        ("stream_window_bytes", *stream_window_bytes != old.stream_window_bytes),
        ("connection_window_bytes", *connection_window_bytes != old.connection_window_bytes),
        ("idle_timeout_s", *idle_timeout_s != old.idle_timeout_s),
        ("dedup_sequences_per_device_max", *dedup_sequences_per_device_max != old.dedup_sequences_per_device_max),
        ("dedup_devices_max", *dedup_devices_max != old.dedup_devices_max),
        ("dedup_horizon_records", *dedup_horizon_records != old.dedup_horizon_records),
        ("socket_receive_buffer_bytes", *socket_receive_buffer_bytes != old.socket_receive_buffer_bytes),
        ("socket_send_buffer_bytes", *socket_send_buffer_bytes != old.socket_send_buffer_bytes),
        // It also divides the record quota among a device's connections (`core::quota`).
        ("connections_per_device_max", *connections_per_device_max != old.connections_per_device_max),
        (
            "bytes_in_flight_per_connection_max",
            *bytes_in_flight_per_connection_max != old.bytes_in_flight_per_connection_max,
        ),
        ("handshakes_max", *handshakes_max != old.handshakes_max),
        ("handshake_timeout_s", *handshake_timeout_s != old.handshake_timeout_s),
        ("reuseport_steering", *reuseport_steering != old.reuseport_steering),
    ];
    for (field, differs) in restart {
        if differs {
            plan.restart_needed.push(format!("quic.{field}"));
        }
    }
}

/// `+added -removed` between two lists read as sets, or None when they hold the same.
fn list_change(old: &[String], new: &[String]) -> Option<String> {
    let added: Vec<&str> = new.iter().filter(|item| !old.contains(item)).map(String::as_str).collect();
    let removed: Vec<&str> = old.iter().filter(|item| !new.contains(item)).map(String::as_str).collect();
    if added.is_empty() && removed.is_empty() {
        return None;
    }
    let mut parts: Vec<String> = added.iter().map(|item| format!("+{item}")).collect();
    parts.extend(removed.iter().map(|item| format!("-{item}")));
    Some(parts.join(" "))
}

/// The config that runs after the reload: `running` with `candidate`'s live fields.
/// Fields that need a restart keep their running values, so the next reload reports
/// them again until weir restarts.
pub fn merged(running: &Config, candidate: &Config) -> Config {
    let mut next = running.clone();
    next.log_level = candidate.log_level.clone();
    next.quic.certs_dir = candidate.quic.certs_dir.clone();
    next.quic.devices_denied = candidate.quic.devices_denied.clone();
    next.quic.topics_allowed = candidate.quic.topics_allowed.clone();
    next.quic.device_records_per_s_max = candidate.quic.device_records_per_s_max;
    next
}

/// The log filter that applies: `WEIR_LOG` when the environment sets it, else the
/// config's `log_level`.
pub fn log_filter(environment: Option<&str>, config: &Config) -> String {
    environment.map_or_else(|| config.log_level.clone(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "test").unwrap()
    }

    #[test]
    fn the_same_config_and_certificates_change_nothing() {
        let running = Config::embedded();
        assert_eq!(plan(&running, &running.clone(), &[]), ReloadPlan::default());
        assert_eq!(merged(&running, &running), running);
    }

    #[test]
    fn deny_list_allow_list_quota_level_and_certificates_apply_live() {
        let running = config("[quic]\ndevices_denied = [\"old-1\"]\n");
        let candidate = config(
            "log_level = \"debug\"\n[quic]\ndevices_denied = [\"dev-2\", \"dev-3\"]\ntopics_allowed = [\"telemetry\"]\n\
             device_records_per_s_max = 100\ncerts_dir = \"/etc/weir/certs\"\n",
        );
        let plan = plan(&running, &candidate, &["server.pem", "server.key"]);
        assert_eq!(
            plan.applied,
            [
                "log_level: \"info\" -> \"debug\"",
                "quic.certs_dir: ./weir-certs -> /etc/weir/certs",
                "quic certificates: new server.pem, server.key",
                "quic.devices_denied: +dev-2 +dev-3 -old-1",
                "quic.topics_allowed: +telemetry",
                "quic.device_records_per_s_max: 0 -> 100",
            ]
        );
        assert!(plan.restart_needed.is_empty(), "{plan:?}");
        assert_eq!(merged(&running, &candidate), candidate);
    }

    #[test]
    fn fields_read_at_start_are_reported_as_needing_a_restart_and_keep_running() {
        let running = Config::embedded();
        let candidate = config(
            "data_dir = \"/srv/weir\"\n[engine]\ncores = [0]\n[log]\nflush_delay_us_max = 500\n[admin]\n\
             listen = \"127.0.0.1:9999\"\n[quic]\nlisten = \"0.0.0.0:5000\"\nconnections_per_device_max = 2\n\
             devices_denied = [\"dev-9\"]\n[upstream]\nenabled = true\nbootstrap_servers = [\"k:9092\"]\n\
             [[topics]]\nname = \"other\"\npartitions = 1\n[watch]\nenabled = false\n",
        );
        let plan = plan(&running, &candidate, &[]);
        assert_eq!(plan.applied, ["quic.devices_denied: +dev-9"]);
        assert_eq!(
            plan.restart_needed,
            [
                "quic.listen",
                "quic.connections_per_device_max",
                "data_dir",
                "engine.cores",
                "log.flush_delay_us_max",
                "admin.listen",
                "upstream.enabled",
                "upstream.bootstrap_servers",
                "topics",
                "watch.enabled",
            ]
        );
        let next = merged(&running, &candidate);
        assert_eq!(next.quic.devices_denied, ["dev-9"]);
        assert_eq!((next.data_dir, next.quic.listen), (running.data_dir.clone(), running.quic.listen.clone()));
        // Not applied, so the next reload of the same file reports them again.
        assert_eq!(super::plan(&merged(&running, &candidate), &candidate, &[]).restart_needed.len(), 10);
        assert!(next.watch.enabled);
    }

    #[test]
    fn a_change_in_a_field_not_listed_is_still_reported_by_its_section() {
        let running = Config::embedded();
        let candidate = config("[upstream]\nretry_backoff_ms_max = 12345\n");
        assert_eq!(plan(&running, &candidate, &[]).restart_needed, ["upstream"]);
        let candidate = config("[watch]\nsilence_s_min = 20\n");
        assert_eq!(plan(&running, &candidate, &[]).restart_needed, ["watch"]);
    }

    #[test]
    fn certificate_files_are_compared_by_their_bytes() {
        let loaded = CertificateFiles { ca: b"ca".to_vec(), certificate: b"cert".to_vec(), key: b"key".to_vec() };
        assert!(loaded.changed(&loaded.clone()).is_empty());
        let renewed = CertificateFiles { certificate: b"cert 2".to_vec(), key: b"key 2".to_vec(), ..loaded.clone() };
        assert_eq!(loaded.changed(&renewed), ["server.pem", "server.key"]);
    }

    #[test]
    fn weir_log_wins_over_the_configured_level() {
        let running = config("log_level = \"warn\"\n");
        assert_eq!(log_filter(None, &running), "warn");
        assert_eq!(log_filter(Some("debug"), &running), "debug");
    }
}
