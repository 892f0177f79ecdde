//! The operator's config: parsed from TOML, then validated as a whole before any core
//! starts. Every field has a default (the embedded `firmware-config/weir.toml` states
//! them all), a unit carried in its name, and a documented cost.
//!
//! Two tiers (TigerBeetle, Iggy): what is stamped into files (the batch format, the
//! direct I/O alignment) lives in `crate::core::log` as constants; what an operator
//! tunes lives here. Validation reports every bad field with its path and why; unknown
//! keys are errors, not silently ignored.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::core::log::batch::BATCH_BYTES_MAX;

/// The embedded default config: exactly `firmware-config/weir.toml`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../firmware-config/weir.toml");

/// The alignment of every direct I/O write position and size (stamped into the format:
/// segment files are laid out in these pages).
pub const DIRECT_IO_ALIGNMENT_BYTES: u64 = 4096;
/// The most cores weir will pin executors to.
pub const CORES_MAX: usize = 1024;
/// The most partitions of one topic.
pub const TOPIC_PARTITIONS_MAX: u32 = 4096;
/// The most topics.
pub const TOPICS_MAX: usize = 256;
/// Kafka's own topic name limit.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Index positions are u32: no segment may be larger.
pub const SEGMENT_BYTES_LIMIT: u64 = u32::MAX as u64 + 1 - DIRECT_IO_ALIGNMENT_BYTES;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub quic: QuicConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub kafka_api: KafkaApiConfig,
    #[serde(default = "default_topics")]
    pub topics: Vec<TopicConfig>,
    /// The stream watch (docs/WATCH.md).
    #[serde(default)]
    pub watch: WatchSection,
    /// What is logged: a tracing filter (`"info"`, `"warn,weir::shell::quic=debug"`).
    /// `WEIR_LOG` in the environment, when set, wins over it. Applied live on SIGHUP.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

fn default_log_level() -> String {
    "info".to_owned()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EngineConfig {
    #[serde(default)]
    pub cores: CoreSelection,
    #[serde(default = "default_io_memory_bytes")]
    pub io_memory_bytes: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LogConfig {
    #[serde(default = "default_segment_bytes_max")]
    pub segment_bytes_max: ByteSize,
    #[serde(default = "default_segment_age_s_max")]
    pub segment_age_s_max: Seconds,
    #[serde(default = "default_index_interval_bytes")]
    pub index_interval_bytes: ByteSize,
    #[serde(default = "default_preallocate_bytes")]
    pub preallocate_bytes: ByteSize,
    #[serde(default = "default_flush_delay_us_max")]
    pub flush_delay_us_max: Micros,
    #[serde(default = "default_flush_bytes_max")]
    pub flush_bytes_max: ByteSize,
    /// Small group commits (write + fdatasync) all partitions of one core may start
    /// per second; a partition waits for the core's next slot, gathering meanwhile
    /// (`core::log::pacer`). 0: unpaced.
    #[serde(default = "default_core_flushes_per_s_max")]
    pub core_flushes_per_s_max: u32,
    #[serde(default = "default_appends_pending_max")]
    pub appends_pending_max: u32,
    #[serde(default = "default_partition_bytes_max")]
    pub partition_bytes_max: ByteSize,
    /// Segment bytes all partitions together may hold; 0 is no limit but the
    /// filesystem's. See `disk_full_policy`.
    #[serde(default = "default_data_dir_bytes_max")]
    pub data_dir_bytes_max: ByteSize,
    /// What happens when the disk (the filesystem, or `data_dir_bytes_max`) is full of
    /// unshipped data.
    #[serde(default)]
    pub disk_full_policy: DiskFullPolicy,
}

/// What a partition does when an append finds no room and no shipped segment is left
/// to delete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFullPolicy {
    /// Refuse the append (devices get DiskFull with a retry-after); nothing acked is
    /// ever lost.
    #[default]
    Block,
    /// Delete the partition's oldest sealed segment, shipped or not, and append.
    DropOldest,
}

impl DiskFullPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DiskFullPolicy::Block => "block",
            DiskFullPolicy::DropOldest => "drop-oldest",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

/// `[kafka_api]`: the read-only Kafka listener for local consumers
/// (docs/KAFKA_API.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct KafkaApiConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_kafka_api_listen")]
    pub listen: String,
    /// host:port that Metadata names as the broker; default the bound address.
    #[serde(default)]
    pub advertised_address: Option<String>,
    #[serde(default = "default_kafka_api_connections_max")]
    pub connections_max: u32,
    #[serde(default = "default_kafka_api_requests_in_flight")]
    pub requests_in_flight_per_connection_max: u32,
    #[serde(default = "default_kafka_api_request_bytes_max")]
    pub request_bytes_max: ByteSize,
    #[serde(default = "default_kafka_api_response_bytes_max")]
    pub response_bytes_max: ByteSize,
    #[serde(default = "default_kafka_api_fetch_wait_ms_max")]
    pub fetch_wait_ms_max: Millis,
    #[serde(default = "default_kafka_api_groups_max")]
    pub groups_max: u32,
    #[serde(default = "default_kafka_api_members_per_group_max")]
    pub members_per_group_max: u32,
    /// From accept until the connection is authenticated (the TLS handshake and the
    /// SASL exchange): a connection that takes longer is closed.
    #[serde(default = "default_kafka_api_authentication_ms_max")]
    pub authentication_ms_max: Millis,
    /// TLS on the listener (off by default); with `client_ca_file`, mTLS.
    #[serde(default)]
    pub tls: KafkaApiTlsConfig,
    /// SASL on the listener (off by default).
    #[serde(default)]
    pub sasl: KafkaApiSaslConfig,
    /// Who may read which topic, once clients authenticate (default deny).
    #[serde(default)]
    pub acl: Vec<KafkaApiAclRule>,
}

/// `[[kafka_api.acl]]`: `principal` (`User:NAME`, or `User:*`) may read `topics`
/// (edge topic names, or `*`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KafkaApiAclRule {
    pub principal: String,
    pub topics: Vec<String>,
}

/// `[kafka_api.sasl]`: SASL authentication of Kafka clients. The users and their SCRAM
/// credentials (never passwords) are in `credentials_file`, made by `weir kafka-user`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct KafkaApiSaslConfig {
    /// The mechanisms offered; empty: no SASL.
    #[serde(default)]
    pub mechanisms: Vec<KafkaApiSaslMechanism>,
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

/// A SASL mechanism the Kafka listener offers, by its Kafka name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KafkaApiSaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaApiSaslConfig {
    pub fn enabled(&self) -> bool {
        !self.mechanisms.is_empty()
    }
}

/// `[kafka_api.tls]`: TLS (rustls) on the Kafka listener. With `client_ca_file` every
/// client must present a certificate that CA signed (mTLS); its subject CN is the
/// principal when SASL does not name one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct KafkaApiTlsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// PEM certificate chain weir presents (leaf first).
    #[serde(default)]
    pub certificate_file: Option<PathBuf>,
    /// PEM private key of `certificate_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// PEM file of the CAs trusted to sign client certificates; when set, a client
    /// certificate is required.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl KafkaApiConfig {
    /// Whether clients must prove who they are (mTLS or SASL): then every topic is
    /// denied unless an ACL permits it.
    pub fn authenticates(&self) -> bool {
        (self.tls.enabled && self.tls.client_ca_file.is_some()) || self.sasl.enabled()
    }
}

fn default_kafka_api_authentication_ms_max() -> Millis {
    Millis(10_000)
}
/// Rules `[[kafka_api.acl]]` may hold.
pub const KAFKA_API_ACL_RULES_MAX: usize = 10_000;
/// The longest `kafka_api.authentication_ms_max`.
pub const KAFKA_API_AUTHENTICATION_MS_MAX: u64 = 120_000;

/// Limits of `[kafka_api]`'s fields.
pub const KAFKA_API_CONNECTIONS_MAX: u32 = 100_000;
pub const KAFKA_API_REQUESTS_IN_FLIGHT_MAX: u32 = 1024;
pub const KAFKA_API_REQUEST_BYTES_MIN: u64 = 4 << 10;
pub const KAFKA_API_REQUEST_BYTES_MAX: u64 = 100 << 20;
pub const KAFKA_API_RESPONSE_BYTES_MAX: u64 = 1 << 30;
pub const KAFKA_API_FETCH_WAIT_MS_MAX: u64 = 300_000;

fn default_kafka_api_listen() -> String {
    "127.0.0.1:9092".to_owned()
}
fn default_kafka_api_connections_max() -> u32 {
    256
}
fn default_kafka_api_requests_in_flight() -> u32 {
    16
}
fn default_kafka_api_request_bytes_max() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_kafka_api_response_bytes_max() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_kafka_api_fetch_wait_ms_max() -> Millis {
    Millis(30_000)
}
fn default_kafka_api_groups_max() -> u32 {
    64
}
fn default_kafka_api_members_per_group_max() -> u32 {
    64
}
pub const KAFKA_API_GROUPS_MAX: u32 = 10_000;
pub const KAFKA_API_MEMBERS_PER_GROUP_MAX: u32 = 1_000;

impl Default for KafkaApiConfig {
    fn default() -> Self {
        KafkaApiConfig {
            enabled: true,
            listen: default_kafka_api_listen(),
            advertised_address: None,
            connections_max: default_kafka_api_connections_max(),
            requests_in_flight_per_connection_max: default_kafka_api_requests_in_flight(),
            request_bytes_max: default_kafka_api_request_bytes_max(),
            response_bytes_max: default_kafka_api_response_bytes_max(),
            fetch_wait_ms_max: default_kafka_api_fetch_wait_ms_max(),
            groups_max: default_kafka_api_groups_max(),
            members_per_group_max: default_kafka_api_members_per_group_max(),
            authentication_ms_max: default_kafka_api_authentication_ms_max(),
            tls: KafkaApiTlsConfig::default(),
            sasl: KafkaApiSaslConfig::default(),
            acl: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QuicConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_quic_listen")]
    pub listen: String,
    #[serde(default = "default_certs_dir")]
    pub certs_dir: PathBuf,
    #[serde(default = "default_true")]
    pub generate_dev_certs: bool,
    #[serde(default = "default_connections_max")]
    pub connections_max: u32,
    #[serde(default = "default_handshakes_before_retry")]
    pub handshakes_before_retry: u32,
    #[serde(default = "default_streams_per_connection_max")]
    pub streams_per_connection_max: u32,
    #[serde(default = "default_frames_in_flight_per_connection_max")]
    pub frames_in_flight_per_connection_max: u32,
    #[serde(default = "default_frame_bytes_max")]
    pub frame_bytes_max: ByteSize,
    #[serde(default = "default_records_per_frame_max")]
    pub records_per_frame_max: u32,
    #[serde(default = "default_stream_window_bytes")]
    pub stream_window_bytes: ByteSize,
    #[serde(default = "default_connection_window_bytes")]
    pub connection_window_bytes: ByteSize,
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: Seconds,
    #[serde(default)]
    pub topics_allowed: Vec<String>,
    #[serde(default)]
    pub devices_denied: Vec<String>,
    /// Sequences each partition remembers per device; unset: exactly what a device may
    /// have in flight (`dedup_sequences_per_device`). See `core::dedup`.
    #[serde(default)]
    pub dedup_sequences_per_device_max: Option<u32>,
    #[serde(default = "default_dedup_devices_max")]
    pub dedup_devices_max: u32,
    #[serde(default = "default_dedup_horizon_records")]
    pub dedup_horizon_records: u32,
    #[serde(default = "default_quic_socket_buffer_bytes")]
    pub socket_receive_buffer_bytes: ByteSize,
    #[serde(default = "default_quic_socket_buffer_bytes")]
    pub socket_send_buffer_bytes: ByteSize,
    #[serde(default = "default_connections_per_device_max")]
    pub connections_per_device_max: u32,
    /// Records per second one device may write (0: no quota); see `core::quota`.
    #[serde(default)]
    pub device_records_per_s_max: u32,
    #[serde(default = "default_bytes_in_flight_per_connection_max")]
    pub bytes_in_flight_per_connection_max: ByteSize,
    #[serde(default = "default_handshakes_max")]
    pub handshakes_max: u32,
    /// Seconds a handshake may take before weir gives it up (`core::handshake`).
    #[serde(default = "default_handshake_timeout_s")]
    pub handshake_timeout_s: Seconds,
    #[serde(default = "default_true")]
    pub reuseport_steering: bool,
}

/// The UDP socket buffers (SO_RCVBUF, SO_SNDBUF) each core's QUIC socket asks for by
/// default; the sysctl drop-in raises the kernel's caps (`net.core.rmem_max`,
/// `wmem_max`) to exactly this.
pub const QUIC_SOCKET_BUFFER_BYTES_DEFAULT: u64 = 8 << 20;
/// Limits of the socket buffer fields (the kernel takes an int and doubles it).
pub const QUIC_SOCKET_BUFFER_BYTES_MIN: u64 = 64 << 10;
pub const QUIC_SOCKET_BUFFER_BYTES_MAX: u64 = 1 << 30;

fn default_quic_socket_buffer_bytes() -> ByteSize {
    ByteSize(QUIC_SOCKET_BUFFER_BYTES_DEFAULT)
}

fn default_connections_per_device_max() -> u32 {
    4
}
fn default_bytes_in_flight_per_connection_max() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_handshakes_max() -> u32 {
    64
}
fn default_handshake_timeout_s() -> Seconds {
    Seconds(10)
}

fn default_dedup_devices_max() -> u32 {
    20_000
}
fn default_dedup_horizon_records() -> u32 {
    200_000
}

fn default_true() -> bool {
    true
}
fn default_quic_listen() -> String {
    "0.0.0.0:4433".to_owned()
}
fn default_certs_dir() -> PathBuf {
    PathBuf::from("./weir-certs")
}
fn default_connections_max() -> u32 {
    10_000
}
fn default_handshakes_before_retry() -> u32 {
    32
}
fn default_streams_per_connection_max() -> u32 {
    4
}
fn default_frames_in_flight_per_connection_max() -> u32 {
    16
}
fn default_frame_bytes_max() -> ByteSize {
    ByteSize(256 << 10)
}
fn default_records_per_frame_max() -> u32 {
    1024
}
fn default_stream_window_bytes() -> ByteSize {
    ByteSize(512 << 10)
}
fn default_connection_window_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_idle_timeout_s() -> Seconds {
    Seconds(150)
}

impl QuicConfig {
    /// The de-dup window of a device in each partition: `dedup_sequences_per_device_max`,
    /// or when unset the smallest window that covers every frame a device may have in
    /// flight under these limits (`core::dedup::sequences_per_device_min`: 64 with the
    /// defaults). `validate` makes sure a set value is not smaller.
    pub fn dedup_sequences_per_device(&self) -> u64 {
        self.dedup_sequences_per_device_max.map_or_else(
            || {
                crate::core::dedup::sequences_per_device_min(
                    self.connections_per_device_max,
                    self.frames_in_flight_per_connection_max,
                )
            },
            u64::from,
        )
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            enabled: true,
            listen: default_quic_listen(),
            certs_dir: default_certs_dir(),
            generate_dev_certs: true,
            connections_max: default_connections_max(),
            handshakes_before_retry: default_handshakes_before_retry(),
            streams_per_connection_max: default_streams_per_connection_max(),
            frames_in_flight_per_connection_max: default_frames_in_flight_per_connection_max(),
            frame_bytes_max: default_frame_bytes_max(),
            records_per_frame_max: default_records_per_frame_max(),
            stream_window_bytes: default_stream_window_bytes(),
            connection_window_bytes: default_connection_window_bytes(),
            idle_timeout_s: default_idle_timeout_s(),
            topics_allowed: Vec::new(),
            devices_denied: Vec::new(),
            dedup_sequences_per_device_max: None,
            dedup_devices_max: default_dedup_devices_max(),
            dedup_horizon_records: default_dedup_horizon_records(),
            socket_receive_buffer_bytes: default_quic_socket_buffer_bytes(),
            socket_send_buffer_bytes: default_quic_socket_buffer_bytes(),
            connections_per_device_max: default_connections_per_device_max(),
            device_records_per_s_max: 0,
            bytes_in_flight_per_connection_max: default_bytes_in_flight_per_connection_max(),
            handshakes_max: default_handshakes_max(),
            handshake_timeout_s: default_handshake_timeout_s(),
            reuseport_steering: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TopicConfig {
    pub name: String,
    pub partitions: u32,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./weir-data")
}
fn default_io_memory_bytes() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_segment_bytes_max() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_segment_age_s_max() -> Seconds {
    Seconds(3600)
}
fn default_index_interval_bytes() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_preallocate_bytes() -> ByteSize {
    ByteSize(32 << 20)
}
fn default_flush_delay_us_max() -> Micros {
    Micros(250)
}
fn default_flush_bytes_max() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_core_flushes_per_s_max() -> u32 {
    1000
}
fn default_appends_pending_max() -> u32 {
    4096
}
fn default_partition_bytes_max() -> ByteSize {
    ByteSize(8 << 30)
}
fn default_data_dir_bytes_max() -> ByteSize {
    ByteSize(0)
}
fn default_admin_listen() -> String {
    "127.0.0.1:9464".to_owned()
}
fn default_topics() -> Vec<TopicConfig> {
    vec![TopicConfig { name: "telemetry".to_owned(), partitions: 4 }]
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { cores: CoreSelection::default(), io_memory_bytes: default_io_memory_bytes() }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: default_segment_bytes_max(),
            segment_age_s_max: default_segment_age_s_max(),
            index_interval_bytes: default_index_interval_bytes(),
            preallocate_bytes: default_preallocate_bytes(),
            flush_delay_us_max: default_flush_delay_us_max(),
            flush_bytes_max: default_flush_bytes_max(),
            core_flushes_per_s_max: default_core_flushes_per_s_max(),
            appends_pending_max: default_appends_pending_max(),
            partition_bytes_max: default_partition_bytes_max(),
            data_dir_bytes_max: ByteSize(0),
            disk_full_policy: DiskFullPolicy::Block,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: default_admin_listen() }
    }
}

/// Which CPUs get an executor: `"all"` (every online CPU this process may run on) or
/// a list of CPU ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CoreSelection {
    #[default]
    All,
    List(Vec<usize>),
}

impl<'de> Deserialize<'de> for CoreSelection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CoresVisitor;
        impl<'de> Visitor<'de> for CoresVisitor {
            type Value = CoreSelection;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("\"all\" or a list of CPU ids such as [0, 1]")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                if value == "all" {
                    Ok(CoreSelection::All)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(value), &self))
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut cores = Vec::new();
                while let Some(core) = seq.next_element::<usize>()? {
                    if cores.len() >= CORES_MAX {
                        return Err(de::Error::custom(format!("more than {CORES_MAX} cores")));
                    }
                    cores.push(core);
                }
                Ok(CoreSelection::List(cores))
            }
        }
        deserializer.deserialize_any(CoresVisitor)
    }
}

/// A size in bytes: an integer, or a string with a unit (`"64 KiB"`, `"1 GiB"`, `"10 MB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A duration in microseconds: an integer, or a string with a unit (`"250us"`, `"2 ms"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Micros(pub u64);

/// A duration in milliseconds: an integer, or a string with a unit (`"500 ms"`, `"30 s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

/// A duration in seconds: an integer, or a string with a unit (`"90 s"`, `"1 h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub u64);

fn split_number_unit(text: &str) -> Option<(u64, &str)> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit() && c != '_').unwrap_or(text.len());
    if digits_end == 0 {
        return None;
    }
    let number = text[..digits_end].replace('_', "").parse().ok()?;
    Some((number, text[digits_end..].trim()))
}

fn byte_unit(unit: &str) -> Option<u64> {
    Some(match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    })
}

fn time_unit_ns(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return None,
    })
}

/// Bytes as an operator reads them, in the units the config takes: `8 MiB`, `512 KiB`,
/// `1000 B`, and one decimal where the unit does not divide them (`330.9 KiB`).
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (scale, unit) in UNITS {
        if bytes >= scale {
            return if bytes.is_multiple_of(scale) {
                format!("{} {unit}", bytes / scale)
            } else {
                format!("{:.1} {unit}", bytes as f64 / scale as f64)
            };
        }
    }
    format!("{bytes} B")
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number_unit(text).ok_or_else(|| format!("{text:?} is not a size such as \"64 KiB\""))?;
    match byte_unit(unit) {
        Some(scale) => number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large")),
        None if time_unit_ns(unit).is_some() => {
            Err(format!("wrong unit in {text:?}: this field is a size in bytes (B, KiB, MiB, GiB, KB, MB, GB)"))
        }
        None => Err(format!("unknown unit {unit:?} in {text:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")),
    }
}

fn parse_duration(text: &str, unit_ns: u64, unit_name: &str) -> Result<u64, String> {
    let (number, unit) =
        split_number_unit(text).ok_or_else(|| format!("{text:?} is not a duration such as \"250 us\""))?;
    let scale_ns = match time_unit_ns(unit) {
        Some(scale) => scale,
        None if unit.is_empty() => unit_ns,
        None if byte_unit(unit).is_some() => {
            return Err(format!("wrong unit in {text:?}: this field is a duration (ns, us, ms, s, min, h, d)"))
        }
        None => return Err(format!("unknown unit {unit:?} in {text:?}: use ns, us, ms, s, min, h or d")),
    };
    let total_ns = number.checked_mul(scale_ns).ok_or_else(|| format!("{text:?} is too large"))?;
    if total_ns % unit_ns != 0 {
        return Err(format!("{text:?} is not a whole number of {unit_name}"));
    }
    Ok(total_ns / unit_ns)
}

macro_rules! unit_deserialize {
    ($type:ident, $expecting:literal, $parse:expr) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct UnitVisitor;
                impl<'de> Visitor<'de> for UnitVisitor {
                    type Value = $type;
                    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                        formatter.write_str($expecting)
                    }
                    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
                        Ok($type(value))
                    }
                    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
                        u64::try_from(value).map($type).map_err(|_| E::custom(format!("{value} is negative")))
                    }
                    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                        let parse: fn(&str) -> Result<u64, String> = $parse;
                        parse(value).map($type).map_err(E::custom)
                    }
                }
                deserializer.deserialize_any(UnitVisitor)
            }
        }
    };
}

unit_deserialize!(ByteSize, "a size: bytes as an integer, or a string such as \"64 KiB\"", parse_bytes);
unit_deserialize!(Micros, "microseconds as an integer, or a string such as \"250 us\"", |text| parse_duration(
    text,
    1_000,
    "microseconds"
));
unit_deserialize!(Millis, "milliseconds as an integer, or a string such as \"500 ms\"", |text| parse_duration(
    text,
    1_000_000,
    "milliseconds"
));
unit_deserialize!(Seconds, "seconds as an integer, or a string such as \"1 h\"", |text| parse_duration(
    text,
    1_000_000_000,
    "seconds"
));

/// One problem with the config: the field's path and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub why: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.path, self.why)
    }
}

/// Why a config cannot be used; every problem found is listed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render_problems(origin, problems))]
    Invalid { origin: String, problems: Vec<ConfigProblem> },
}

fn render_problems(origin: &str, problems: &[ConfigProblem]) -> String {
    let mut text =
        format!("invalid config {origin} ({} problem{}):", problems.len(), if problems.len() == 1 { "" } else { "s" });
    for problem in problems {
        text.push_str(&format!("\n  {problem}"));
    }
    text
}

/// The facts about this host that validation checks the config against. `Host::probe`
/// (in `shell::sys`, which reads them) is what every command uses; config itself reads
/// no file and imports nothing of the shell.
#[derive(Debug, Clone)]
pub struct Host {
    /// CPU ids that are online and in this process's affinity mask.
    pub usable_cpus: BTreeSet<usize>,
    /// Loads the files `[upstream.tls]` and `[upstream.sasl]` name (certificates, key,
    /// password) the way `serve` will, when shipping is on and the settings fit
    /// together: `shell::kafka_secure::check_files` on a probed host.
    pub upstream_files: UpstreamFilesCheck,
    /// Loads the files `[kafka_api.tls]` and `[kafka_api.sasl]` name the way `serve`
    /// will, when the listener is enabled and the settings fit together:
    /// `shell::kafka_api::check_files` on a probed host.
    pub kafka_api_files: KafkaApiFilesCheck,
}

/// How validation loads the Kafka API's TLS and SASL files: each problem names its field.
pub type KafkaApiFilesCheck = fn(&KafkaApiConfig) -> Vec<ConfigProblem>;

/// How validation loads the upstream TLS and SASL files: a problem names the field.
pub type UpstreamFilesCheck = fn(&UpstreamConfig) -> Result<(), ConfigProblem>;

impl Host {
    /// A host with these CPUs whose upstream files are not read (the fuzzer and tests
    /// that validate configs naming files that do not exist here).
    pub fn with_cpus(usable_cpus: BTreeSet<usize>) -> Host {
        Host { usable_cpus, upstream_files: |_| Ok(()), kafka_api_files: |_| Vec::new() }
    }
}

/// A config that passed validation, with the cores resolved to CPU ids.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub config: Config,
    pub cores: Vec<usize>,
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |last| last.chars().count()) + 1;
    (line, column)
}

/// The table keys of an ignored key's path, itself last (`topics[1].colour` gives
/// `["topics", "colour"]`): array indexes and options name no table.
fn table_keys(path: &serde_ignored::Path<'_>, keys: &mut Vec<String>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => table_keys(parent, keys),
        Path::Map { parent, key } => {
            table_keys(parent, keys);
            keys.push(key.clone());
        }
    }
}

/// The field names serde's derive gives `T`, read by asking `T` to deserialize from a
/// deserializer that notes the names it is offered and then refuses.
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct FieldNames<'names>(&'names mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for FieldNames<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("names noted"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut names));
    names
}

/// The keys a table of the config knows, by its path without array indexes ("" is the
/// top level). A table missing here only loses its "did you mean".
fn known_keys(table: &str) -> &'static [&'static str] {
    match table {
        "" => field_names::<Config>(),
        "engine" => field_names::<EngineConfig>(),
        "log" => field_names::<LogConfig>(),
        "admin" => field_names::<AdminConfig>(),
        "quic" => field_names::<QuicConfig>(),
        "kafka_api" => field_names::<KafkaApiConfig>(),
        "kafka_api.tls" => field_names::<KafkaApiTlsConfig>(),
        "kafka_api.sasl" => field_names::<KafkaApiSaslConfig>(),
        "kafka_api.acl" => field_names::<KafkaApiAclRule>(),
        "topics" => field_names::<TopicConfig>(),
        "watch" => field_names::<WatchSection>(),
        "upstream" => field_names::<UpstreamConfig>(),
        "upstream.tls" => field_names::<UpstreamTlsConfig>(),
        "upstream.sasl" => field_names::<UpstreamSaslConfig>(),
        "upstream.topics" => field_names::<UpstreamTopicConfig>(),
        _ => &[],
    }
}

/// The known key of `table` nearest to the unknown `key` by edit distance, if it is
/// near enough to be a typo: at most a third of the longer name's characters differ.
fn nearest_known_key(table: &str, key: &str) -> Option<&'static str> {
    known_keys(table)
        .iter()
        .map(|known| (edit_distance(key, known), *known))
        .filter(|(distance, known)| *distance * 3 <= key.chars().count().max(known.chars().count()))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, known)| known)
}

/// Levenshtein distance: the fewest single-character insertions, deletions and
/// substitutions that turn `from` into `to`.
fn edit_distance(from: &str, to: &str) -> usize {
    let to: Vec<char> = to.chars().collect();
    let mut previous: Vec<usize> = (0..=to.len()).collect();
    let mut current = vec![0; to.len() + 1];
    for (row, from_char) in from.chars().enumerate() {
        current[0] = row + 1;
        for (column, to_char) in to.iter().enumerate() {
            let substitution = previous[column] + usize::from(from_char != *to_char);
            current[column + 1] = substitution.min(previous[column + 1] + 1).min(current[column] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[to.len()]
}

impl Config {
    /// Parses TOML; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut unknown = Vec::new();
        let deserializer = toml::Deserializer::new(text);
        let mut note_unknown = |path: serde_ignored::Path<'_>| {
            let mut keys = Vec::new();
            table_keys(&path, &mut keys);
            unknown.push((path.to_string(), keys));
        };
        let result: Result<Config, _> =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(deserializer, &mut note_unknown));
        let mut problems: Vec<ConfigProblem> = unknown
            .into_iter()
            .map(|(path, keys)| {
                let why = match keys.split_last().and_then(|(key, table)| nearest_known_key(&table.join("."), key)) {
                    Some(known) => format!("unknown key; did you mean `{known}`?"),
                    None => "unknown key".to_owned(),
                };
                ConfigProblem { path, why }
            })
            .collect();
        match result {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError::Invalid { origin: origin.to_owned(), problems }),
            Err(error) => {
                let path = error.path().to_string();
                let inner = error.into_inner();
                // toml's messages may run over lines ("invalid string\nexpected ..."); a
                // problem is one line.
                let message = inner
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                // A syntax error, or a value refused where the parser knows its place:
                // say where, as an editor counts (line and column from 1).
                let why = match inner.span() {
                    Some(span) => {
                        let (line, column) = line_and_column(text, span.start);
                        format!("line {line}, column {column}: {message}")
                    }
                    None => message.to_owned(),
                };
                let path = if path == "." { "(top level)".to_owned() } else { path };
                problems.push(ConfigProblem { path, why });
                Err(ConfigError::Invalid { origin: origin.to_owned(), problems })
            }
        }
    }

    /// The embedded default config.
    pub fn embedded() -> Config {
        Config::parse(DEFAULT_CONFIG_TOML, "(embedded default)").expect("the embedded default config parses")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Checks every field against the others and against `host`; every problem found
    /// is listed, section by section.
    pub fn validate(self, host: &Host, origin: &str) -> Result<ValidConfig, ConfigError> {
        let mut problems = Vec::new();
        let mut problem = |path: &str, why: String| problems.push(ConfigProblem { path: path.to_owned(), why });
        let cores = self.validate_cores(host, &mut problem);
        self.validate_log(&mut problem);
        self.validate_admin(&mut problem);
        self.validate_kafka_api(&mut problem);
        self.validate_kafka_api_security(host.kafka_api_files, &mut problem);
        self.validate_quic(&mut problem);
        self.validate_process(&mut problem);
        self.validate_topics(&mut problem);
        self.validate_watch(&mut problem);
        let topic_names: BTreeSet<&str> = self.topics.iter().map(|topic| topic.name.as_str()).collect();
        self.upstream.validate(&topic_names, host.upstream_files, &mut problems);
        if problems.is_empty() {
            Ok(ValidConfig { config: self, cores })
        } else {
            Err(ConfigError::Invalid { origin: origin.to_owned(), problems })
        }
    }

    /// `engine.cores`: each named once and usable here; the CPU ids to run on.
    fn validate_cores(&self, host: &Host, problem: &mut impl FnMut(&str, String)) -> Vec<usize> {
        let cores: Vec<usize> = match &self.engine.cores {
            CoreSelection::All => host.usable_cpus.iter().copied().collect(),
            CoreSelection::List(list) => list.clone(),
        };
        if cores.is_empty() {
            problem("engine.cores", "no cores: name at least one CPU id, or \"all\"".into());
        }
        let mut seen = BTreeSet::new();
        for core in &cores {
            if !seen.insert(*core) {
                problem("engine.cores", format!("core {core} is listed twice"));
            } else if !host.usable_cpus.contains(core) {
                problem(
                    "engine.cores",
                    format!(
                        "core {core} does not exist or is not usable here (usable: {})",
                        cpu_list(&host.usable_cpus)
                    ),
                );
            }
        }

        cores
    }

    /// `[log]` and the direct-I/O memory one flush needs (`engine.io_memory_bytes`).
    fn validate_log(&self, problem: &mut impl FnMut(&str, String)) {
        let log = &self.log;
        let alignment = DIRECT_IO_ALIGNMENT_BYTES;
        let aligned = |value: u64| value.is_multiple_of(alignment);
        if !aligned(log.segment_bytes_max.0) {
            problem(
                "log.segment_bytes_max",
                format!("{} is not a multiple of the {alignment}-byte direct I/O alignment", log.segment_bytes_max.0),
            );
        }
        if log.segment_bytes_max.0 < 16 * alignment || log.segment_bytes_max.0 > SEGMENT_BYTES_LIMIT {
            problem(
                "log.segment_bytes_max",
                format!("{} is outside 64 KiB..={SEGMENT_BYTES_LIMIT} bytes", log.segment_bytes_max.0),
            );
        }
        if log.segment_bytes_max.0 < log.flush_bytes_max.0 {
            problem(
                "log.segment_bytes_max",
                "must be at least log.flush_bytes_max: a batch never spans segments".into(),
            );
        }
        if !aligned(log.preallocate_bytes.0) || log.preallocate_bytes.0 == 0 {
            problem(
                "log.preallocate_bytes",
                format!(
                    "{} is not a positive multiple of the {alignment}-byte direct I/O alignment",
                    log.preallocate_bytes.0
                ),
            );
        }
        if log.flush_bytes_max.0 < alignment || log.flush_bytes_max.0 > BATCH_BYTES_MAX as u64 {
            problem(
                "log.flush_bytes_max",
                format!(
                    "{} is outside {alignment}..={BATCH_BYTES_MAX} bytes (the largest batch)",
                    log.flush_bytes_max.0
                ),
            );
        }
        if log.flush_delay_us_max.0 > 1_000_000 {
            problem("log.flush_delay_us_max", format!("{} us is over the 1 s limit", log.flush_delay_us_max.0));
        }
        if log.index_interval_bytes.0 < alignment || log.index_interval_bytes.0 > log.segment_bytes_max.0 {
            problem("log.index_interval_bytes", format!("must be within {alignment}..=log.segment_bytes_max"));
        }
        if log.segment_age_s_max.0 == 0 {
            problem("log.segment_age_s_max", "must be at least 1 s".into());
        }
        if log.core_flushes_per_s_max > crate::core::log::pacer::FLUSHES_PER_S_MAX {
            problem(
                "log.core_flushes_per_s_max",
                format!("must be within 0..={} (0: unpaced)", crate::core::log::pacer::FLUSHES_PER_S_MAX),
            );
        }
        if log.appends_pending_max == 0 || log.appends_pending_max > 1 << 20 {
            problem("log.appends_pending_max", "must be within 1..=1048576".into());
        }
        if log.partition_bytes_max.0 < 2 * log.segment_bytes_max.0 {
            problem("log.partition_bytes_max", "must be at least twice log.segment_bytes_max".into());
        }
        if log.data_dir_bytes_max.0 != 0 && log.data_dir_bytes_max.0 < 2 * log.segment_bytes_max.0 {
            problem(
                "log.data_dir_bytes_max",
                "must be 0 (no limit but the filesystem's) or at least twice log.segment_bytes_max".into(),
            );
        }
        // One flush holds two buffers of log.flush_bytes_max, each with an alignment
        // page of slack (the rewritten tail page).
        let io_memory_needed = 2 * log.flush_bytes_max.0 + 2 * alignment;
        let io_memory = self.engine.io_memory_bytes.0;
        if io_memory < io_memory_needed {
            let flush_bytes_fitting = (io_memory.saturating_sub(2 * alignment) / 2) / alignment * alignment;
            let or_flush = if flush_bytes_fitting >= alignment {
                format!(", or lower log.flush_bytes_max to at most {flush_bytes_fitting}")
            } else {
                String::new()
            };
            problem(
                "engine.io_memory_bytes",
                format!(
                    "{io_memory} is less than what one flush needs: 2 x log.flush_bytes_max + 2 x {alignment} \
                     (the direct I/O alignment) = 2 x {} + {} = {io_memory_needed} bytes; set \
                     engine.io_memory_bytes to at least {io_memory_needed}{or_flush}",
                    log.flush_bytes_max.0,
                    2 * alignment,
                ),
            );
        }
    }

    /// `[admin]`.
    fn validate_admin(&self, problem: &mut impl FnMut(&str, String)) {
        if self.admin.listen.parse::<SocketAddr>().is_err() {
            problem("admin.listen", format!("{:?} is not an address such as 127.0.0.1:9464", self.admin.listen));
        }
    }

    /// `[kafka_api]`: addresses that parse, an advertised address clients can reach,
    /// limits within their bounds, and a response that holds the largest batch.
    fn validate_kafka_api(&self, problem: &mut impl FnMut(&str, String)) {
        let api = &self.kafka_api;
        match api.listen.parse::<SocketAddr>() {
            Err(_) => problem("kafka_api.listen", format!("{:?} is not an address such as 127.0.0.1:9092", api.listen)),
            Ok(address) if address.ip().is_unspecified() && api.advertised_address.is_none() => problem(
                "kafka_api.advertised_address",
                format!(
                    "kafka_api.listen = {:?} binds every interface, so clients need the address to reach weir at: \
                     set advertised_address (such as \"edge-7.plant.example:9092\")",
                    api.listen
                ),
            ),
            Ok(_) => {}
        }
        if let Some(advertised) = &api.advertised_address {
            let port_ok = advertised
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0));
            if !port_ok {
                problem("kafka_api.advertised_address", format!("{advertised:?} is not host:port"));
            }
        }
        if !(1..=KAFKA_API_CONNECTIONS_MAX).contains(&api.connections_max) {
            problem("kafka_api.connections_max", format!("must be within 1..={KAFKA_API_CONNECTIONS_MAX}"));
        }
        if !(1..=KAFKA_API_REQUESTS_IN_FLIGHT_MAX).contains(&api.requests_in_flight_per_connection_max) {
            problem(
                "kafka_api.requests_in_flight_per_connection_max",
                format!("must be within 1..={KAFKA_API_REQUESTS_IN_FLIGHT_MAX}"),
            );
        }
        if !(KAFKA_API_REQUEST_BYTES_MIN..=KAFKA_API_REQUEST_BYTES_MAX).contains(&api.request_bytes_max.0) {
            problem(
                "kafka_api.request_bytes_max",
                format!("must be within {KAFKA_API_REQUEST_BYTES_MIN}..={KAFKA_API_REQUEST_BYTES_MAX} bytes"),
            );
        }
        if api.response_bytes_max.0 < self.log.flush_bytes_max.0
            || api.response_bytes_max.0 > KAFKA_API_RESPONSE_BYTES_MAX
        {
            problem(
                "kafka_api.response_bytes_max",
                format!(
                    "must hold the largest stored batch (log.flush_bytes_max = {} bytes) and be at most \
                     {KAFKA_API_RESPONSE_BYTES_MAX} bytes",
                    self.log.flush_bytes_max.0
                ),
            );
        }
        if !(1..=KAFKA_API_GROUPS_MAX).contains(&api.groups_max) {
            problem("kafka_api.groups_max", format!("must be within 1..={KAFKA_API_GROUPS_MAX}"));
        }
        if !(1..=KAFKA_API_MEMBERS_PER_GROUP_MAX).contains(&api.members_per_group_max) {
            problem("kafka_api.members_per_group_max", format!("must be within 1..={KAFKA_API_MEMBERS_PER_GROUP_MAX}"));
        }
        if api.fetch_wait_ms_max.0 > KAFKA_API_FETCH_WAIT_MS_MAX {
            problem("kafka_api.fetch_wait_ms_max", format!("must be at most {KAFKA_API_FETCH_WAIT_MS_MAX} ms"));
        }
    }

    /// `[kafka_api.tls]` (and `.sasl`, `.acl`): the settings fit together, a listener
    /// off loopback authenticates its clients, and when the listener is enabled the
    /// files load (`files`).
    fn validate_kafka_api_security(&self, files: KafkaApiFilesCheck, problem: &mut impl FnMut(&str, String)) {
        let api = &self.kafka_api;
        let tls = &api.tls;
        let mut consistent = true;
        if !(1..=KAFKA_API_AUTHENTICATION_MS_MAX).contains(&api.authentication_ms_max.0) {
            problem(
                "kafka_api.authentication_ms_max",
                format!("must be within 1..={KAFKA_API_AUTHENTICATION_MS_MAX} ms"),
            );
        }
        if tls.enabled {
            for (path, set) in
                [("kafka_api.tls.certificate_file", &tls.certificate_file), ("kafka_api.tls.key_file", &tls.key_file)]
            {
                if set.is_none() {
                    consistent = false;
                    problem(path, "needed with kafka_api.tls.enabled = true".into());
                }
            }
        } else {
            for (path, set) in [
                ("kafka_api.tls.certificate_file", tls.certificate_file.is_some()),
                ("kafka_api.tls.key_file", tls.key_file.is_some()),
                ("kafka_api.tls.client_ca_file", tls.client_ca_file.is_some()),
            ] {
                if set {
                    consistent = false;
                    problem(
                        path,
                        "set while kafka_api.tls.enabled = false: enable TLS or remove it (weir never serves \
                         in plain text by surprise)"
                            .into(),
                    );
                }
            }
        }
        let loopback = api.listen.parse::<SocketAddr>().is_ok_and(|address| address.ip().is_loopback());
        let sasl = &api.sasl;
        match (sasl.enabled(), &sasl.credentials_file) {
            (true, None) => {
                consistent = false;
                problem(
                    "kafka_api.sasl.credentials_file",
                    "needed with kafka_api.sasl.mechanisms (make it with `weir kafka-user add`)".into(),
                );
            }
            (false, Some(_)) => {
                consistent = false;
                problem(
                    "kafka_api.sasl.mechanisms",
                    "empty while credentials_file is set: name the mechanisms to offer (\"SCRAM-SHA-256\", \
                     \"SCRAM-SHA-512\", \"PLAIN\") or remove credentials_file"
                        .into(),
                );
            }
            _ => {}
        }
        let mut offered = BTreeSet::new();
        for mechanism in &sasl.mechanisms {
            if !offered.insert(format!("{mechanism:?}")) {
                problem("kafka_api.sasl.mechanisms", format!("{mechanism:?} is named twice"));
            }
        }
        if sasl.mechanisms.contains(&KafkaApiSaslMechanism::Plain) && !tls.enabled && !loopback {
            problem(
                "kafka_api.sasl.mechanisms",
                "PLAIN sends the password as it is: off loopback it needs [kafka_api.tls] enabled".into(),
            );
        }
        if api.enabled && !loopback && !api.authenticates() {
            problem(
                "kafka_api.listen",
                format!(
                    "{:?} is reachable from the network but clients are not authenticated, so anyone there \
                     could read every topic: configure mTLS ([kafka_api.tls] with client_ca_file) or SASL \
                     ([kafka_api.sasl]), or listen on loopback",
                    api.listen
                ),
            );
        }
        self.validate_kafka_api_acl(problem);
        if consistent && api.enabled {
            for found in files(api) {
                problem(&found.path, found.why);
            }
        }
    }

    /// `[[kafka_api.acl]]`: rules only where clients authenticate, each naming a
    /// principal weir can make and edge topics.
    fn validate_kafka_api_acl(&self, problem: &mut impl FnMut(&str, String)) {
        let api = &self.kafka_api;
        if !api.acl.is_empty() && !api.authenticates() {
            problem(
                "kafka_api.acl",
                "rules need principals, but clients do not authenticate: configure mTLS ([kafka_api.tls] \
                 client_ca_file) or [kafka_api.sasl], or remove the rules (without authentication every \
                 client reads every topic)"
                    .into(),
            );
        }
        if api.acl.len() > KAFKA_API_ACL_RULES_MAX {
            problem("kafka_api.acl", format!("at most {KAFKA_API_ACL_RULES_MAX} rules"));
        }
        let edge: BTreeSet<&str> = self.topics.iter().map(|topic| topic.name.as_str()).collect();
        for (index, rule) in api.acl.iter().enumerate() {
            let name = rule.principal.strip_prefix("User:").unwrap_or_default();
            let named = name == "*"
                || (!name.is_empty()
                    && name.len() <= 255
                    && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-@".contains(&byte)));
            if !named {
                problem(
                    &format!("kafka_api.acl[{index}].principal"),
                    format!(
                        "{:?} is not User:NAME (a SASL user or a certificate CN: 1..=255 of a-z A-Z 0-9 . _ - @) \
                         or User:*",
                        rule.principal
                    ),
                );
            }
            if rule.topics.is_empty() {
                problem(&format!("kafka_api.acl[{index}].topics"), "names no topic (an edge topic, or \"*\")".into());
            }
            for topic in &rule.topics {
                if topic != "*" && !edge.contains(topic.as_str()) {
                    problem(
                        &format!("kafka_api.acl[{index}].topics"),
                        format!("{topic:?} is not an edge topic ([[topics]]) nor \"*\""),
                    );
                }
            }
        }
    }

    /// `[quic]`: the listener's limits, the de-dup window against what a device may
    /// have in flight, the allow and deny lists.
    fn validate_quic(&self, problem: &mut impl FnMut(&str, String)) {
        let quic = &self.quic;
        if quic.listen.parse::<SocketAddr>().is_err() {
            problem("quic.listen", format!("{:?} is not an address such as 0.0.0.0:4433", quic.listen));
        }
        let v1 = crate::core::protocol::FRAME_LIMITS_V1;
        if quic.frame_bytes_max.0 < 1024 || quic.frame_bytes_max.0 > v1.frame_bytes_max as u64 {
            problem(
                "quic.frame_bytes_max",
                format!("must be within 1 KiB..={} bytes (protocol v1)", v1.frame_bytes_max),
            );
        }
        if quic.records_per_frame_max == 0 || quic.records_per_frame_max as usize > v1.records_per_frame_max {
            problem("quic.records_per_frame_max", format!("must be within 1..={}", v1.records_per_frame_max));
        }
        if quic.stream_window_bytes.0 < quic.frame_bytes_max.0 + 4 || quic.stream_window_bytes.0 > u32::MAX as u64 {
            problem(
                "quic.stream_window_bytes",
                "must hold one whole frame (quic.frame_bytes_max + 4) and fit u32".into(),
            );
        }
        if quic.connection_window_bytes.0 < quic.stream_window_bytes.0
            || quic.connection_window_bytes.0 > u32::MAX as u64
        {
            problem("quic.connection_window_bytes", "must be at least quic.stream_window_bytes and fit u32".into());
        }
        if quic.connections_max == 0 || quic.connections_max > 1_000_000 {
            problem("quic.connections_max", "must be within 1..=1000000".into());
        }
        if quic.streams_per_connection_max == 0 || quic.streams_per_connection_max > 1024 {
            problem("quic.streams_per_connection_max", "must be within 1..=1024".into());
        }
        if quic.frames_in_flight_per_connection_max == 0 || quic.frames_in_flight_per_connection_max > 4096 {
            problem("quic.frames_in_flight_per_connection_max", "must be within 1..=4096".into());
        }
        for (field, value) in [
            ("quic.socket_receive_buffer_bytes", quic.socket_receive_buffer_bytes),
            ("quic.socket_send_buffer_bytes", quic.socket_send_buffer_bytes),
        ] {
            if !(QUIC_SOCKET_BUFFER_BYTES_MIN..=QUIC_SOCKET_BUFFER_BYTES_MAX).contains(&value.0) {
                problem(field, "must be within 64 KiB..=1 GiB".into());
            }
        }
        if quic.idle_timeout_s.0 == 0 || quic.idle_timeout_s.0 > 3600 {
            problem("quic.idle_timeout_s", "must be within 1..=3600 s".into());
        }
        for topic in &quic.topics_allowed {
            if topic.starts_with(RESERVED_TOPIC_PREFIX) {
                problem("quic.topics_allowed", format!("{topic:?} is weir's own: devices never write it"));
            } else if !self.topics.iter().any(|configured| &configured.name == topic) {
                problem("quic.topics_allowed", format!("{topic:?} is not a configured topic"));
            }
        }
        self.validate_dedup_window(problem);
        if quic.connections_per_device_max == 0 || quic.connections_per_device_max > 1_000_000 {
            problem("quic.connections_per_device_max", "must be within 1..=1000000".into());
        }
        if quic.bytes_in_flight_per_connection_max.0 < quic.frame_bytes_max.0
            || quic.bytes_in_flight_per_connection_max.0 > 1 << 30
        {
            problem(
                "quic.bytes_in_flight_per_connection_max",
                "must be at least quic.frame_bytes_max and at most 1 GiB".into(),
            );
        }
        if quic.handshakes_max == 0 || quic.handshakes_max > 1_000_000 {
            problem("quic.handshakes_max", "must be within 1..=1000000".into());
        }
        if quic.handshake_timeout_s.0 == 0 || quic.handshake_timeout_s.0 > 600 {
            problem("quic.handshake_timeout_s", "must be within 1..=600 s".into());
        }
        if quic.dedup_devices_max == 0 || quic.dedup_devices_max > 1_000_000 {
            problem("quic.dedup_devices_max", "must be within 1..=1000000".into());
        }
        for device in &quic.devices_denied {
            if !crate::certs::is_device_id(device) {
                problem("quic.devices_denied", format!("{device:?} is not a device id"));
            }
        }
    }

    /// `quic.dedup_sequences_per_device_max` against what a device may have in flight.
    fn validate_dedup_window(&self, problem: &mut impl FnMut(&str, String)) {
        let quic = &self.quic;
        // A frame refused with a retryable answer must stay storable on resend for as long
        // as the limits let a device keep frames in flight (docs/PROTOCOL.md section 6).
        let window_min = crate::core::dedup::sequences_per_device_min(
            quic.connections_per_device_max,
            quic.frames_in_flight_per_connection_max,
        );
        let window_max = crate::core::dedup::SEQUENCES_PER_DEVICE_MAX;
        if window_min > window_max {
            problem(
                "quic.connections_per_device_max",
                format!(
                    "x quic.frames_in_flight_per_connection_max ({} x {} = {window_min}) is over {window_max}, the \
                     most sequences a device's de-dup window may hold (quic.dedup_sequences_per_device_max)",
                    quic.connections_per_device_max, quic.frames_in_flight_per_connection_max
                ),
            );
        } else if let Some(window) = quic.dedup_sequences_per_device_max {
            if !(window_min.max(1)..=window_max).contains(&u64::from(window)) {
                problem(
                    "quic.dedup_sequences_per_device_max",
                    format!(
                        "must be within {}..={window_max}: at least quic.connections_per_device_max ({}) x \
                         quic.frames_in_flight_per_connection_max ({}), the frames a device may have in flight, or \
                         a device resending a refused frame can find it forgotten (unset: exactly that product)",
                        window_min.max(1),
                        quic.connections_per_device_max,
                        quic.frames_in_flight_per_connection_max
                    ),
                );
            }
        }
    }

    /// `data_dir` and `log_level`.
    fn validate_process(&self, problem: &mut impl FnMut(&str, String)) {
        if self.data_dir.as_os_str().is_empty() {
            problem("data_dir", "is empty".into());
        }
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&self.log_level) {
            problem(
                "log_level",
                format!(
                    "{:?} is not a log filter such as \"info\" or \"warn,weir::shell::quic=debug\": {error}",
                    self.log_level
                ),
            );
        }
    }

    /// `[[topics]]`: names, uniqueness, partition counts.
    fn validate_topics(&self, problem: &mut impl FnMut(&str, String)) {
        if self.topics.is_empty() {
            problem("topics", "at least one topic is needed".into());
        }
        if self.topics.len() > TOPICS_MAX {
            problem("topics", format!("more than {TOPICS_MAX} topics"));
        }
        let mut names = BTreeSet::new();
        for (index, topic) in self.topics.iter().enumerate() {
            let path = format!("topics[{index}]");
            let name_ok = !topic.name.is_empty()
                && topic.name.len() <= TOPIC_NAME_BYTES_MAX
                && topic.name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
                && topic.name != "."
                && topic.name != "..";
            if !name_ok {
                problem(
                    &format!("{path}.name"),
                    format!("{:?} is not a topic name (1..=249 of a-z A-Z 0-9 . _ -)", topic.name),
                );
            }
            if topic.name.starts_with(RESERVED_TOPIC_PREFIX) && topic.name != WATCH_ALERTS_TOPIC {
                problem(
                    &format!("{path}.name"),
                    format!(
                        "{:?}: names starting with {RESERVED_TOPIC_PREFIX:?} are weir's own; the only one to declare \
                         is {WATCH_ALERTS_TOPIC:?}",
                        topic.name
                    ),
                );
            }
            if topic.name == WATCH_ALERTS_TOPIC && topic.partitions != 1 {
                problem(
                    &format!("{path}.partitions"),
                    format!("{WATCH_ALERTS_TOPIC:?} has exactly 1 partition (alert events in one order)"),
                );
            }
            if !names.insert(topic.name.clone()) {
                problem(&format!("{path}.name"), format!("topic {:?} is defined twice", topic.name));
            }
            if topic.partitions == 0 || topic.partitions > TOPIC_PARTITIONS_MAX {
                problem(
                    &format!("{path}.partitions"),
                    format!("{} is outside 1..={TOPIC_PARTITIONS_MAX}", topic.partitions),
                );
            }
        }
    }
}

// ----- [watch]: the stream watch -----

/// Topic names starting with this are weir's own: devices cannot write them.
pub const RESERVED_TOPIC_PREFIX: &str = "_weir.";
/// The edge topic the watch appends every alert event to, when it is declared in
/// `[[topics]]` (with 1 partition); shipped upstream like any topic.
pub const WATCH_ALERTS_TOPIC: &str = "_weir.alerts";
/// The most streams the watch may be asked to track.
pub const WATCH_STREAMS_MAX: u32 = 10_000_000;

/// `[watch]`: thresholds of the stream watch (`core::watch`). Read at start: a change
/// needs a restart (the learned state would not fit other thresholds anyway).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WatchSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_watch_streams_max")]
    pub streams_max: u32,
    #[serde(default = "default_watch_silence_factor")]
    pub silence_factor: f64,
    #[serde(default = "default_watch_silence_s_min")]
    pub silence_s_min: Seconds,
    #[serde(default = "default_watch_silence_s_max")]
    pub silence_s_max: Seconds,
    #[serde(default = "default_watch_learn_records")]
    pub learn_records: u32,
    #[serde(default = "default_watch_rate_factor")]
    pub rate_factor: f64,
    #[serde(default = "default_watch_rate_window_s")]
    pub rate_window_s: Seconds,
    #[serde(default = "default_watch_clock_skew_s_max")]
    pub clock_skew_s_max: Seconds,
    #[serde(default = "default_watch_restart_hold_s")]
    pub restart_hold_s: Seconds,
    #[serde(default = "default_watch_refusals_per_minute_max")]
    pub refusals_per_minute_max: u32,
}

fn default_watch_streams_max() -> u32 {
    100_000
}
fn default_watch_silence_factor() -> f64 {
    5.0
}
fn default_watch_silence_s_min() -> Seconds {
    Seconds(10)
}
fn default_watch_silence_s_max() -> Seconds {
    Seconds(300)
}
fn default_watch_learn_records() -> u32 {
    10
}
fn default_watch_rate_factor() -> f64 {
    4.0
}
fn default_watch_rate_window_s() -> Seconds {
    Seconds(60)
}
fn default_watch_clock_skew_s_max() -> Seconds {
    Seconds(60)
}
fn default_watch_restart_hold_s() -> Seconds {
    Seconds(600)
}
fn default_watch_refusals_per_minute_max() -> u32 {
    60
}

impl Default for WatchSection {
    fn default() -> Self {
        WatchSection {
            enabled: true,
            streams_max: default_watch_streams_max(),
            silence_factor: default_watch_silence_factor(),
            silence_s_min: default_watch_silence_s_min(),
            silence_s_max: default_watch_silence_s_max(),
            learn_records: default_watch_learn_records(),
            rate_factor: default_watch_rate_factor(),
            rate_window_s: default_watch_rate_window_s(),
            clock_skew_s_max: default_watch_clock_skew_s_max(),
            restart_hold_s: default_watch_restart_hold_s(),
            refusals_per_minute_max: default_watch_refusals_per_minute_max(),
        }
    }
}

impl Config {
    /// The watch's thresholds for the core: the restart tolerance is what one device
    /// may have in flight (a resend may come after later frames were stored).
    pub fn watch_config(&self) -> crate::core::watch::WatchConfig {
        let watch = &self.watch;
        let in_flight =
            u64::from(self.quic.connections_per_device_max) * u64::from(self.quic.frames_in_flight_per_connection_max);
        crate::core::watch::WatchConfig {
            streams_max: watch.streams_max as usize,
            silence_factor: watch.silence_factor,
            silence_min: std::time::Duration::from_secs(watch.silence_s_min.0),
            silence_max: std::time::Duration::from_secs(watch.silence_s_max.0),
            learn_records: watch.learn_records,
            rate_factor: watch.rate_factor,
            rate_window: std::time::Duration::from_secs(watch.rate_window_s.0),
            skew_max: std::time::Duration::from_secs(watch.clock_skew_s_max.0),
            restart_hold: std::time::Duration::from_secs(watch.restart_hold_s.0),
            restart_tolerance: in_flight,
            refusals_per_minute_max: watch.refusals_per_minute_max,
        }
    }

    /// Whether the watch appends its events to `WATCH_ALERTS_TOPIC` (it is declared).
    pub fn watch_alerts_topic(&self) -> bool {
        self.watch.enabled && self.topics.iter().any(|topic| topic.name == WATCH_ALERTS_TOPIC)
    }

    /// `[watch]`: every threshold within its range, each checked even when the watch is
    /// off (turning it on must not reveal an old mistake).
    fn validate_watch(&self, problem: &mut impl FnMut(&str, String)) {
        let watch = &self.watch;
        if watch.streams_max == 0 || watch.streams_max > WATCH_STREAMS_MAX {
            problem("watch.streams_max", format!("{} is outside 1..={WATCH_STREAMS_MAX}", watch.streams_max));
        }
        for (field, value) in [("watch.silence_factor", watch.silence_factor), ("watch.rate_factor", watch.rate_factor)]
        {
            if !value.is_finite() || value <= 1.0 || value > 1000.0 {
                problem(field, format!("{value} is not a factor above 1 and at most 1000"));
            }
        }
        const DAY_S: u64 = 86_400;
        if watch.silence_s_min.0 == 0 || watch.silence_s_min.0 > watch.silence_s_max.0 {
            problem("watch.silence_s_min", "must be at least 1 s and at most watch.silence_s_max".into());
        }
        for (field, value) in [
            ("watch.silence_s_max", watch.silence_s_max),
            ("watch.rate_window_s", watch.rate_window_s),
            ("watch.clock_skew_s_max", watch.clock_skew_s_max),
            ("watch.restart_hold_s", watch.restart_hold_s),
        ] {
            if value.0 == 0 || value.0 > DAY_S {
                problem(field, format!("{} s is outside 1..={DAY_S} s", value.0));
            }
        }
        if watch.learn_records == 0 || watch.learn_records > 1_000_000 {
            problem("watch.learn_records", format!("{} is outside 1..=1000000", watch.learn_records));
        }
        if watch.refusals_per_minute_max == 0 {
            problem("watch.refusals_per_minute_max", "must be at least 1".into());
        }
    }
}

// ----- [upstream]: shipping the log to the central Kafka cluster -----

/// The `[upstream]` section: where and how the partition logs are shipped. Disabled by
/// default, so an appliance without a reachable cluster runs (and keeps everything).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UpstreamConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub bootstrap_servers: Vec<String>,
    #[serde(default = "default_upstream_client_id")]
    pub client_id: String,
    #[serde(default)]
    pub topics: Vec<UpstreamTopicConfig>,
    #[serde(default = "default_upstream_batch_bytes_max")]
    pub batch_bytes_max: ByteSize,
    #[serde(default = "default_upstream_in_flight_max")]
    pub in_flight_max: u32,
    #[serde(default = "default_upstream_bandwidth_bytes_per_s_max")]
    pub bandwidth_bytes_per_s_max: ByteSize,
    #[serde(default = "default_upstream_connect_timeout_ms")]
    pub connect_timeout_ms: Millis,
    #[serde(default = "default_upstream_request_timeout_ms")]
    pub request_timeout_ms: Millis,
    #[serde(default = "default_upstream_retry_backoff_ms_min")]
    pub retry_backoff_ms_min: Millis,
    #[serde(default = "default_upstream_retry_backoff_ms_max")]
    pub retry_backoff_ms_max: Millis,
    #[serde(default = "default_upstream_cursor_persist_interval_ms")]
    pub cursor_persist_interval_ms: Millis,
    #[serde(default = "default_upstream_reconcile_scan_bytes_max")]
    pub reconcile_scan_bytes_max: ByteSize,
    /// `/health` answers degraded once a shipper has been failing (retrying) this long.
    #[serde(default = "default_upstream_degraded_after_ms")]
    pub degraded_after_ms: Millis,
    /// TLS to the brokers (off by default).
    #[serde(default)]
    pub tls: UpstreamTlsConfig,
    /// SASL authentication to the brokers (none by default).
    #[serde(default)]
    pub sasl: UpstreamSaslConfig,
}

/// `[upstream.tls]`: TLS (rustls) to every broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UpstreamTlsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// PEM file of the CAs trusted to sign broker certificates.
    #[serde(default = "default_upstream_tls_ca_file")]
    pub ca_file: PathBuf,
    /// PEM client certificate chain, for brokers that require one (mTLS).
    #[serde(default)]
    pub certificate_file: Option<PathBuf>,
    /// PEM private key of `certificate_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name checked in every broker's certificate instead of the host connected to.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Debian's bundle of the system's trusted CAs.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn default_upstream_tls_ca_file() -> PathBuf {
    PathBuf::from(SYSTEM_CA_FILE)
}

impl Default for UpstreamTlsConfig {
    fn default() -> Self {
        UpstreamTlsConfig {
            enabled: false,
            ca_file: default_upstream_tls_ca_file(),
            certificate_file: None,
            key_file: None,
            server_name: None,
        }
    }
}

/// `[upstream.sasl]`: how weir authenticates to the brokers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct UpstreamSaslConfig {
    #[serde(default)]
    pub mechanism: UpstreamSaslMechanism,
    #[serde(default)]
    pub username: String,
    /// A file holding the password (one trailing line end is ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Refused: present only to say why (a config file is no place for a password).
    #[serde(default)]
    pub password: Option<toml::Value>,
}

/// The SASL mechanisms weir speaks, by their Kafka names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum UpstreamSaslMechanism {
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

/// The longest SASL user name accepted.
pub const UPSTREAM_SASL_USERNAME_BYTES_MAX: usize = 255;

/// One edge topic's upstream mapping.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UpstreamTopicConfig {
    /// The edge topic (one of `[[topics]]`).
    pub edge: String,
    /// The upstream topic; the edge topic's name when absent.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub partitioning: UpstreamPartitioning,
}

/// How edge partitions map to upstream partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamPartitioning {
    /// Edge partition p goes to upstream partition p.
    #[default]
    Kept,
    /// By record key, as Kafka's default partitioner: devices' records are routed to
    /// edge partitions with Kafka's murmur2 (`session::KeyHash::KafkaMurmur2`) and edge
    /// partition p ships to upstream partition p of a topic with exactly as many
    /// partitions (the shipper checks the count and retries until it matches).
    ByKey,
}

/// Kafka allows at most 5 unacknowledged batches per idempotent producer and partition.
pub const UPSTREAM_IN_FLIGHT_MAX: u32 = 5;
/// The smallest upstream batch limit accepted.
pub const UPSTREAM_BATCH_BYTES_MIN: u64 = 4096;

fn default_upstream_client_id() -> String {
    "weir".to_owned()
}
fn default_upstream_batch_bytes_max() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_upstream_in_flight_max() -> u32 {
    UPSTREAM_IN_FLIGHT_MAX
}
fn default_upstream_bandwidth_bytes_per_s_max() -> ByteSize {
    ByteSize(0)
}
fn default_upstream_connect_timeout_ms() -> Millis {
    Millis(10_000)
}
fn default_upstream_request_timeout_ms() -> Millis {
    Millis(30_000)
}
fn default_upstream_retry_backoff_ms_min() -> Millis {
    Millis(100)
}
fn default_upstream_retry_backoff_ms_max() -> Millis {
    Millis(30_000)
}
fn default_upstream_cursor_persist_interval_ms() -> Millis {
    Millis(500)
}
fn default_upstream_reconcile_scan_bytes_max() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_upstream_degraded_after_ms() -> Millis {
    Millis(300_000)
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            enabled: false,
            bootstrap_servers: Vec::new(),
            client_id: default_upstream_client_id(),
            topics: Vec::new(),
            batch_bytes_max: default_upstream_batch_bytes_max(),
            in_flight_max: default_upstream_in_flight_max(),
            bandwidth_bytes_per_s_max: default_upstream_bandwidth_bytes_per_s_max(),
            connect_timeout_ms: default_upstream_connect_timeout_ms(),
            request_timeout_ms: default_upstream_request_timeout_ms(),
            retry_backoff_ms_min: default_upstream_retry_backoff_ms_min(),
            retry_backoff_ms_max: default_upstream_retry_backoff_ms_max(),
            cursor_persist_interval_ms: default_upstream_cursor_persist_interval_ms(),
            reconcile_scan_bytes_max: default_upstream_reconcile_scan_bytes_max(),
            degraded_after_ms: default_upstream_degraded_after_ms(),
            tls: UpstreamTlsConfig::default(),
            sasl: UpstreamSaslConfig::default(),
        }
    }
}

fn topic_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TOPIC_NAME_BYTES_MAX
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
        && name != "."
        && name != ".."
}

impl UpstreamConfig {
    fn validate(&self, edge_topics: &BTreeSet<&str>, files: UpstreamFilesCheck, problems: &mut Vec<ConfigProblem>) {
        let mut problem = |path: &str, why: String| problems.push(ConfigProblem { path: path.to_owned(), why });
        self.validate_security(files, &mut problem);
        if self.enabled && self.bootstrap_servers.is_empty() {
            problem("upstream.bootstrap_servers", "at least one \"host:port\" is needed when upstream.enabled".into());
        }
        for (index, server) in self.bootstrap_servers.iter().enumerate() {
            let port_ok = server
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0));
            if !port_ok {
                problem(&format!("upstream.bootstrap_servers[{index}]"), format!("{server:?} is not \"host:port\""));
            }
        }
        if self.client_id.is_empty() || self.client_id.len() > 255 {
            problem("upstream.client_id", "must be 1..=255 bytes".into());
        }
        let mut mapped = BTreeSet::new();
        for (index, topic) in self.topics.iter().enumerate() {
            let path = format!("upstream.topics[{index}]");
            if !edge_topics.contains(topic.edge.as_str()) {
                problem(&format!("{path}.edge"), format!("{:?} is not one of the [[topics]]", topic.edge));
            }
            if !mapped.insert(topic.edge.as_str()) {
                problem(&format!("{path}.edge"), format!("{:?} is mapped twice", topic.edge));
            }
            if let Some(upstream) = &topic.upstream {
                if !topic_name_ok(upstream) {
                    problem(
                        &format!("{path}.upstream"),
                        format!("{upstream:?} is not a Kafka topic name (1..=249 of a-z A-Z 0-9 . _ -)"),
                    );
                }
            }
        }
        let batch_bytes = self.batch_bytes_max.0;
        if !(UPSTREAM_BATCH_BYTES_MIN..=BATCH_BYTES_MAX as u64).contains(&batch_bytes) {
            problem(
                "upstream.batch_bytes_max",
                format!("{batch_bytes} is outside {UPSTREAM_BATCH_BYTES_MIN}..={BATCH_BYTES_MAX} bytes"),
            );
        }
        if !(1..=UPSTREAM_IN_FLIGHT_MAX).contains(&self.in_flight_max) {
            problem(
                "upstream.in_flight_max",
                format!(
                    "{} is outside 1..={UPSTREAM_IN_FLIGHT_MAX} (Kafka keeps 5 batches per idempotent producer)",
                    self.in_flight_max
                ),
            );
        }
        for (path, value, min_ms, max_ms) in [
            ("upstream.connect_timeout_ms", self.connect_timeout_ms, 10, 600_000),
            ("upstream.request_timeout_ms", self.request_timeout_ms, 100, i32::MAX as u64),
            ("upstream.retry_backoff_ms_min", self.retry_backoff_ms_min, 1, 3_600_000),
            ("upstream.retry_backoff_ms_max", self.retry_backoff_ms_max, 1, 3_600_000),
            ("upstream.cursor_persist_interval_ms", self.cursor_persist_interval_ms, 1, 60_000),
            ("upstream.degraded_after_ms", self.degraded_after_ms, 100, 86_400_000),
        ] {
            if value.0 < min_ms || value.0 > max_ms {
                problem(path, format!("{} ms is outside {min_ms}..={max_ms} ms", value.0));
            }
        }
        if self.retry_backoff_ms_min > self.retry_backoff_ms_max {
            problem("upstream.retry_backoff_ms_min", "must not exceed upstream.retry_backoff_ms_max".into());
        }
        if self.reconcile_scan_bytes_max.0 < (1 << 20) {
            problem("upstream.reconcile_scan_bytes_max", "must be at least 1 MiB".into());
        }
    }

    /// `[upstream.tls]` and `[upstream.sasl]`: the settings fit together, and when
    /// shipping is on, the files and the password they name load (`files`).
    fn validate_security(&self, files: UpstreamFilesCheck, problem: &mut impl FnMut(&str, String)) {
        let tls = &self.tls;
        let mut consistent = true;
        if !tls.enabled {
            for (path, set) in [
                ("upstream.tls.certificate_file", tls.certificate_file.is_some()),
                ("upstream.tls.key_file", tls.key_file.is_some()),
                ("upstream.tls.server_name", tls.server_name.is_some()),
                ("upstream.tls.ca_file", tls.ca_file != Path::new(SYSTEM_CA_FILE)),
            ] {
                if set {
                    consistent = false;
                    problem(path, "set while upstream.tls.enabled = false: enable TLS or remove it (weir never ships in plain text by surprise)".into());
                }
            }
        }
        match (&tls.certificate_file, &tls.key_file) {
            (Some(_), None) => {
                consistent = false;
                problem(
                    "upstream.tls.key_file",
                    "needed with upstream.tls.certificate_file (client certificate)".into(),
                );
            }
            (None, Some(_)) => {
                consistent = false;
                problem(
                    "upstream.tls.certificate_file",
                    "needed with upstream.tls.key_file (client certificate)".into(),
                );
            }
            _ => {}
        }
        let sasl = &self.sasl;
        if sasl.password.is_some() {
            consistent = false;
            problem(
                "upstream.sasl.password",
                "a password is not accepted in the config file: put it in a file only weir can read (password_file) or in an environment variable (password_env)".into(),
            );
        }
        if sasl.mechanism == UpstreamSaslMechanism::None {
            if !sasl.username.is_empty() || sasl.password_file.is_some() || sasl.password_env.is_some() {
                consistent = false;
                problem("upstream.sasl.mechanism", "\"none\" with a user or password set: choose \"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\", or remove them".into());
            }
        } else {
            if sasl.username.is_empty() || sasl.username.len() > UPSTREAM_SASL_USERNAME_BYTES_MAX {
                consistent = false;
                problem("upstream.sasl.username", format!("must be 1..={UPSTREAM_SASL_USERNAME_BYTES_MAX} bytes"));
            }
            if sasl.password_file.is_some() == sasl.password_env.is_some() {
                consistent = false;
                problem("upstream.sasl", "exactly one of password_file and password_env is needed".into());
            }
        }
        if let Some(variable) = &sasl.password_env {
            if variable.is_empty() || variable.contains('=') || variable.contains('\0') {
                consistent = false;
                problem("upstream.sasl.password_env", format!("{variable:?} is not an environment variable name"));
            }
        }
        if consistent && self.enabled {
            if let Err(found) = files(self) {
                problem(&found.path, found.why);
            }
        }
    }

    /// The upstream topic and partition edge `topic`/`partition` ships to, or `None`
    /// when shipping is off or the topic is not mapped. With no `[[upstream.topics]]`
    /// every edge topic ships to the upstream topic of the same name, partitions kept.
    /// How devices' record keys of edge `topic` are hashed to its partitions: Kafka's
    /// partitioner when the topic is mapped `by-key` (whether or not shipping is enabled
    /// now, so that turning shipping on or off never moves a key), weir's own otherwise.
    pub fn key_hash(&self, topic: &str) -> crate::core::session::KeyHash {
        match self.topics.iter().find(|mapping| mapping.edge == topic) {
            Some(mapping) if mapping.partitioning == UpstreamPartitioning::ByKey => {
                crate::core::session::KeyHash::KafkaMurmur2
            }
            _ => crate::core::session::KeyHash::Crc32c,
        }
    }

    /// The partition count edge `topic`'s upstream topic must have: exactly the edge
    /// topic's when it is mapped `by-key`, else `None` (at least as many will do).
    pub fn partitions_exact(&self, topic: &str, topics: &[TopicConfig]) -> Option<u32> {
        if self.key_hash(topic) != crate::core::session::KeyHash::KafkaMurmur2 {
            return None;
        }
        topics.iter().find(|edge| edge.name == topic).map(|edge| edge.partitions)
    }

    pub fn destination(&self, topic: &str, partition: u32) -> Option<(String, i32)> {
        if !self.enabled {
            return None;
        }
        let partition = i32::try_from(partition).ok()?;
        if self.topics.is_empty() {
            return Some((topic.to_owned(), partition));
        }
        let mapping = self.topics.iter().find(|mapping| mapping.edge == topic)?;
        Some((mapping.upstream.clone().unwrap_or_else(|| topic.to_owned()), partition))
    }
}

fn cpu_list(cpus: &BTreeSet<usize>) -> String {
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

impl ValidConfig {
    /// The partitions core `core_index` (0-based position in `cores`) owns: partition p
    /// of every topic lives on core p mod N.
    pub fn partitions_of_core(&self, core_index: usize) -> Vec<(String, u32)> {
        let core_count = self.cores.len();
        let mut owned = Vec::new();
        for topic in &self.config.topics {
            for partition in 0..topic.partitions {
                if partition as usize % core_count == core_index {
                    owned.push((topic.name.clone(), partition));
                }
            }
        }
        owned
    }

    /// Replaces the cores with the first `count` usable CPUs (the `--cores N` option).
    pub fn with_core_count(mut self, count: usize, host: &Host) -> Result<ValidConfig, ConfigError> {
        if count == 0 || count > host.usable_cpus.len() {
            return Err(ConfigError::Invalid {
                origin: "--cores".to_owned(),
                problems: vec![ConfigProblem {
                    path: "--cores".to_owned(),
                    why: format!("{count} cores asked for, this host has {} usable", host.usable_cpus.len()),
                }],
            });
        }
        self.cores = host.usable_cpus.iter().copied().take(count).collect();
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host::with_cpus([0, 1].into_iter().collect())
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        let result = Config::parse(text, "test").and_then(|config| config.validate(&host(), "test"));
        match result {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let valid = Config::embedded().validate(&host(), "embedded").unwrap();
        assert_eq!(valid.cores, vec![0, 1]);
        assert_eq!(valid.config.data_dir, PathBuf::from("./weir-data"));
        assert_eq!(valid.config.log.flush_bytes_max, ByteSize(1 << 20));
    }

    #[test]
    fn the_admin_endpoint_binds_to_loopback_unless_told_otherwise() {
        let appliance = Config::parse(include_str!("../firmware-config/appliance.toml"), "appliance").unwrap();
        let bare = Config::parse("", "bare").unwrap();
        for (name, config) in [("embedded", Config::embedded()), ("appliance", appliance), ("no [admin]", bare)] {
            let address: std::net::SocketAddr = config.admin.listen.parse().unwrap();
            assert!(address.ip().is_loopback(), "{name}: admin.listen = {address}");
        }
    }

    #[test]
    fn the_packaged_appliance_config_never_makes_a_development_pki() {
        let appliance = Config::parse(include_str!("../firmware-config/appliance.toml"), "appliance").unwrap();
        assert!(!appliance.quic.generate_dev_certs);
        assert!(appliance.quic.certs_dir.is_absolute(), "{}", appliance.quic.certs_dir.display());
        appliance.validate(&host(), "appliance").unwrap();
    }

    #[test]
    fn the_disk_budget_and_policy_are_parsed_and_checked() {
        let text = "[log]\ndata_dir_bytes_max = \"1 GiB\"\ndisk_full_policy = \"drop-oldest\"\n";
        let valid = Config::parse(text, "test").unwrap().validate(&host(), "test").unwrap();
        assert_eq!(valid.config.log.data_dir_bytes_max, ByteSize(1 << 30));
        assert_eq!(valid.config.log.disk_full_policy, DiskFullPolicy::DropOldest);
        assert_eq!(Config::embedded().log.disk_full_policy, DiskFullPolicy::Block);
        assert_eq!(Config::embedded().log.data_dir_bytes_max, ByteSize(0));
        let found = problems("[log]\ndata_dir_bytes_max = \"1 MiB\"\n");
        assert_eq!(found[0].path, "log.data_dir_bytes_max", "{found:?}");
        let found = problems("[log]\ndisk_full_policy = \"panic\"\n");
        assert_eq!(found[0].path, "log.disk_full_policy", "{found:?}");
    }

    #[test]
    fn the_dedup_window_covers_every_frame_a_device_may_have_in_flight() {
        // Unset: exactly connections_per_device_max x frames_in_flight_per_connection_max.
        assert_eq!(Config::embedded().quic.dedup_sequences_per_device(), 64);
        let text = "[quic]\nconnections_per_device_max = 2\nframes_in_flight_per_connection_max = 5\n";
        let valid = Config::parse(text, "test").unwrap().validate(&host(), "test").unwrap();
        assert_eq!(valid.config.quic.dedup_sequences_per_device(), 10);
        let text = "[quic]\nconnections_per_device_max = 2\nframes_in_flight_per_connection_max = 5\n\
                    dedup_sequences_per_device_max = 10\n";
        let valid = Config::parse(text, "test").unwrap().validate(&host(), "test").unwrap();
        assert_eq!(valid.config.quic.dedup_sequences_per_device(), 10);
        // Smaller than what a device may have in flight: refused, naming both limits.
        let found = problems("[quic]\ndedup_sequences_per_device_max = 32\n");
        assert_eq!(found[0].path, "quic.dedup_sequences_per_device_max", "{found:?}");
        assert!(found[0].why.contains("connections_per_device_max (4)"), "{found:?}");
        // A product over the largest window is refused on its own.
        let found = problems("[quic]\nconnections_per_device_max = 1000\n");
        assert_eq!(found[0].path, "quic.connections_per_device_max", "{found:?}");
        let found = problems("[quic]\ndedup_sequences_per_device_max = 4097\n");
        assert_eq!(found[0].path, "quic.dedup_sequences_per_device_max", "{found:?}");
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_path() {
        let found = problems("colour = 1\n[log]\nsegment_bytez_max = 5\n[engine]\nfoo = 2\n");
        let paths: Vec<_> = found.iter().map(|problem| problem.path.as_str()).collect();
        assert_eq!(paths, ["colour", "log.segment_bytez_max", "engine.foo"]);
        let whys: Vec<_> = found.iter().map(|problem| problem.why.as_str()).collect();
        assert_eq!(whys, ["unknown key", "unknown key; did you mean `segment_bytes_max`?", "unknown key"]);
    }

    #[test]
    fn a_mistyped_key_gets_the_nearest_known_key_of_its_own_table() {
        let why = |text: &str| {
            let found = problems(text);
            assert_eq!(found.len(), 1, "{found:?}");
            found[0].to_string()
        };
        assert_eq!(why("log_levl = \"info\"\n"), "log_levl: unknown key; did you mean `log_level`?");
        assert_eq!(why("[quic]\ncert_dir = \"c\"\n"), "quic.cert_dir: unknown key; did you mean `certs_dir`?");
        assert_eq!(
            why("[log]\nflush_delay_ms_max = 5\n"),
            "log.flush_delay_ms_max: unknown key; did you mean `flush_delay_us_max`?"
        );
        // Arrays of tables: the index names no table.
        assert_eq!(
            why("[[topics]]\nname = \"t\"\npartitions = 1\npartitons = 2\n"),
            "topics.0.partitons: unknown key; did you mean `partitions`?"
        );
        assert_eq!(
            why("[upstream.tls]\nca_fil = \"ca.pem\"\n"),
            "upstream.tls.ca_fil: unknown key; did you mean `ca_file`?"
        );
        // A key of another table is not offered, nor a name too far to be a typo.
        assert_eq!(why("[engine]\nflush_bytes_max = 5\n"), "engine.flush_bytes_max: unknown key");
        assert_eq!(why("[admin]\nport = 9464\n"), "admin.port: unknown key");
    }

    #[test]
    fn every_key_of_the_example_configs_is_known_to_the_suggestions() {
        fn walk(table: &toml::Table, path: &str, seen: &mut usize) {
            for (key, value) in table {
                assert!(known_keys(path).contains(&key.as_str()), "{path}.{key} is missing from known_keys");
                *seen += 1;
                let inner = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match value {
                    toml::Value::Table(table) => walk(table, &inner, seen),
                    toml::Value::Array(items) => {
                        for item in items {
                            if let toml::Value::Table(table) = item {
                                walk(table, &inner, seen);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        // The default's commented-out [[upstream.topics]] example, as an operator writes it.
        let upstream_topics = format!(
            "{DEFAULT_CONFIG_TOML}\n[[upstream.topics]]\nedge = \"telemetry\"\nupstream = \"t\"\npartitioning = \"kept\"\n"
        );
        for (text, keys_min) in
            [(DEFAULT_CONFIG_TOML, 71), (&upstream_topics, 74), (include_str!("../firmware-config/appliance.toml"), 8)]
        {
            let mut seen = 0;
            walk(&text.parse::<toml::Table>().unwrap(), "", &mut seen);
            assert!(seen >= keys_min, "only {seen} keys walked");
        }
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("certs_dir", "cert_dir"), 1);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn a_syntax_error_names_its_line_and_column() {
        let found = problems("[log]\nflush_delay_us_max = 250\nsegment_bytes_max = = 5\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].why.starts_with("line 3, column 21: "), "{found:?}");
        // A value of the wrong kind is placed too.
        let found = problems("\n\n[quic]\nconnections_max = \"many\"\n");
        assert_eq!(found[0].path, "quic.connections_max");
        assert!(found[0].why.starts_with("line 4, column 19: "), "{found:?}");
        assert_eq!(line_and_column("ab\ncdé\nf", 8), (3, 1));
        assert_eq!(line_and_column("ab\ncdé\nf", 7), (2, 4));
        assert_eq!(line_and_column("ab\ncdé\nf", 6), (2, 3), "inside a character: that character");
    }

    #[test]
    fn io_memory_too_small_for_a_flush_states_the_formula_and_both_fixes() {
        let found = problems("[engine]\nio_memory_bytes = \"1 MiB\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, "engine.io_memory_bytes");
        assert_eq!(
            found[0].why,
            "1048576 is less than what one flush needs: 2 x log.flush_bytes_max + 2 x 4096 (the direct I/O \
             alignment) = 2 x 1048576 + 8192 = 2105344 bytes; set engine.io_memory_bytes to at least 2105344, or \
             lower log.flush_bytes_max to at most 520192"
        );
        // Either fix, as stated, is accepted; one byte or one page less is not.
        let valid = |text: &str| Config::parse(text, "test").unwrap().validate(&host(), "test");
        assert!(valid("[engine]\nio_memory_bytes = 2105344\n").is_ok());
        assert!(valid("[engine]\nio_memory_bytes = 2105343\n").is_err());
        assert!(valid("[engine]\nio_memory_bytes = \"1 MiB\"\n[log]\nflush_bytes_max = 520192\n").is_ok());
        assert!(valid("[engine]\nio_memory_bytes = \"1 MiB\"\n[log]\nflush_bytes_max = 524288\n").is_err());
        // Too small for even the smallest flush: only the first fix is offered.
        let found = problems("[engine]\nio_memory_bytes = 8192\n");
        assert!(found[0].why.ends_with("set engine.io_memory_bytes to at least 2105344"), "{found:?}");
    }

    #[test]
    fn wrong_unit_is_reported() {
        let found = problems("[log]\nsegment_bytes_max = \"5 ms\"\n");
        assert_eq!(found[0].path, "log.segment_bytes_max");
        assert!(found[0].why.contains("wrong unit"), "{}", found[0].why);
        let found = problems("[log]\nflush_delay_us_max = \"4 KiB\"\n");
        assert!(found[0].why.contains("wrong unit"), "{}", found[0].why);
    }

    #[test]
    fn units_convert() {
        let config = Config::parse(
            "[log]\nsegment_bytes_max = \"64 MiB\"\nflush_delay_us_max = \"2ms\"\nsegment_age_s_max = \"1 h\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(config.log.segment_bytes_max, ByteSize(64 << 20));
        assert_eq!(config.log.flush_delay_us_max, Micros(2000));
        assert_eq!(config.log.segment_age_s_max, Seconds(3600));
    }

    #[test]
    fn misalignment_missing_core_and_bad_topic_are_all_reported() {
        let found = problems(
            "[engine]\ncores = [0, 7]\n[log]\nsegment_bytes_max = 1000000\n[[topics]]\nname = \"a b\"\npartitions = 0\n",
        );
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|line| line.starts_with("engine.cores: core 7 does not exist")), "{text:?}");
        assert!(
            text.iter().any(|line| line.starts_with("log.segment_bytes_max: 1000000 is not a multiple")),
            "{text:?}"
        );
        assert!(text.iter().any(|line| line.starts_with("topics[0].name:")), "{text:?}");
        assert!(text.iter().any(|line| line.starts_with("topics[0].partitions:")), "{text:?}");
    }

    #[test]
    fn the_watch_is_on_by_default_with_the_core_thresholds_and_every_bad_field_is_named() {
        let config = Config::embedded();
        assert!(config.watch.enabled);
        let core = config.watch_config();
        let defaults = crate::core::watch::WatchConfig::default();
        assert_eq!(core.silence_max, defaults.silence_max);
        assert_eq!(core.rate_window, defaults.rate_window);
        assert_eq!(core.skew_max, defaults.skew_max);
        assert_eq!(core.streams_max, defaults.streams_max);
        // A resend may come this far behind: every frame of every connection in flight.
        assert_eq!(
            core.restart_tolerance,
            u64::from(config.quic.connections_per_device_max)
                * u64::from(config.quic.frames_in_flight_per_connection_max)
        );
        assert!(!config.watch_alerts_topic(), "the default config declares no alerts topic");
        let found = problems(
            "[watch]\nstreams_max = 0\nsilence_factor = 1.0\nrate_factor = nan\nsilence_s_min = 400\n\
             rate_window_s = 0\nclock_skew_s_max = \"2 d\"\nlearn_records = 0\nrefusals_per_minute_max = 0\n",
        );
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        for field in [
            "watch.streams_max:",
            "watch.silence_factor:",
            "watch.rate_factor:",
            "watch.silence_s_min:",
            "watch.rate_window_s:",
            "watch.clock_skew_s_max:",
            "watch.learn_records:",
            "watch.refusals_per_minute_max:",
        ] {
            assert!(text.iter().any(|line| line.starts_with(field)), "{field} missing from {text:?}");
        }
        assert_eq!(text.len(), 8, "{text:?}");
    }

    #[test]
    fn the_alerts_topic_is_the_only_reserved_name_has_one_partition_and_no_device_may_be_allowed_it() {
        let declared =
            "[[topics]]\nname = \"telemetry\"\npartitions = 2\n[[topics]]\nname = \"_weir.alerts\"\npartitions = 1\n";
        let config = Config::parse(declared, "test").unwrap().validate(&host(), "test").unwrap().config;
        assert!(config.watch_alerts_topic());
        let off = format!("{declared}[watch]\nenabled = false\n");
        assert!(!Config::parse(&off, "test").unwrap().watch_alerts_topic());
        let found = problems(
            "[quic]\ntopics_allowed = [\"_weir.alerts\"]\n[[topics]]\nname = \"_weir.alerts\"\npartitions = 2\n\
             [[topics]]\nname = \"_weir.other\"\npartitions = 1\n",
        );
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|line| line.starts_with("topics[0].partitions: \"_weir.alerts\" has exactly 1")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|line| line.starts_with("topics[1].name: \"_weir.other\": names starting with")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|line| line.starts_with("quic.topics_allowed: \"_weir.alerts\" is weir's own")),
            "{text:?}"
        );
    }

    #[test]
    fn upstream_is_disabled_by_default_and_maps_nothing() {
        let valid = Config::embedded().validate(&host(), "embedded").unwrap();
        assert!(!valid.config.upstream.enabled);
        assert_eq!(valid.config.upstream.destination("telemetry", 0), None);
        assert_eq!(valid.config.upstream.in_flight_max, 5);
        assert_eq!(valid.config.upstream.batch_bytes_max, ByteSize(1 << 20));
    }

    #[test]
    fn upstream_topics_map_by_name_or_explicitly() {
        let config = Config::parse(
            "[upstream]\nenabled = true\nbootstrap_servers = [\"10.0.0.1:9092\"]\nrequest_timeout_ms = \"5 s\"\n",
            "test",
        )
        .unwrap();
        let valid = config.validate(&host(), "test").unwrap();
        assert_eq!(valid.config.upstream.destination("telemetry", 3), Some(("telemetry".into(), 3)));
        assert_eq!(valid.config.upstream.request_timeout_ms, Millis(5000));
        let config = Config::parse(
            "[upstream]\nenabled = true\nbootstrap_servers = [\"k:9092\"]\n[[upstream.topics]]\nedge = \"telemetry\"\nupstream = \"central.telemetry\"\n",
            "test",
        )
        .unwrap();
        let valid = config.validate(&host(), "test").unwrap();
        assert_eq!(valid.config.upstream.destination("telemetry", 1), Some(("central.telemetry".into(), 1)));
        assert_eq!(valid.config.upstream.destination("other", 1), None);
    }

    #[test]
    fn upstream_by_key_hashes_that_topic_like_kafka_and_ships_to_exactly_as_many_partitions() {
        let config = Config::parse(
            "[[topics]]\nname = \"telemetry\"\npartitions = 4\n[[topics]]\nname = \"other\"\npartitions = 2\n[upstream]\nenabled = true\nbootstrap_servers = [\"k:9092\"]\n[[upstream.topics]]\nedge = \"telemetry\"\npartitioning = \"by-key\"\n[[upstream.topics]]\nedge = \"other\"\n",
            "test",
        )
        .unwrap();
        let valid = config.validate(&host(), "test").unwrap();
        let upstream = &valid.config.upstream;
        assert_eq!(upstream.key_hash("telemetry"), crate::core::session::KeyHash::KafkaMurmur2);
        assert_eq!(upstream.key_hash("other"), crate::core::session::KeyHash::Crc32c);
        assert_eq!(upstream.partitions_exact("telemetry", &valid.config.topics), Some(4));
        assert_eq!(upstream.partitions_exact("other", &valid.config.topics), None);
    }

    #[test]
    fn upstream_tls_and_sasl_settings_that_do_not_fit_are_reported_with_their_paths() {
        let found = problems(
            "[upstream]\nenabled = true\nbootstrap_servers = [\"k:9092\"]\n[upstream.tls]\nca_file = \"ca.pem\"\ncertificate_file = \"client.pem\"\n[upstream.sasl]\nmechanism = \"SCRAM-SHA-512\"\npassword = \"hunter2\"\npassword_env = \"A=B\"\n",
        );
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        for (path, why) in [
            ("upstream.tls.ca_file:", "upstream.tls.enabled = false"),
            ("upstream.tls.certificate_file:", "upstream.tls.enabled = false"),
            ("upstream.tls.key_file:", "needed with upstream.tls.certificate_file"),
            ("upstream.sasl.password:", "not accepted in the config file"),
            ("upstream.sasl.username:", "must be 1..=255 bytes"),
            ("upstream.sasl.password_env:", "not an environment variable name"),
        ] {
            assert!(text.iter().any(|line| line.starts_with(path) && line.contains(why)), "{path} {why}: {text:?}");
        }
        let found = problems("[upstream.sasl]\nmechanism = \"SCRAM-SHA-1\"\n");
        assert!(found[0].to_string().contains("SCRAM-SHA-256"), "{found:?}");
    }

    #[test]
    fn upstream_bad_fields_are_all_reported() {
        let found = problems(
            "[upstream]\nenabled = true\nin_flight_max = 6\nbatch_bytes_max = \"16 MiB\"\nretry_backoff_ms_min = 500\nretry_backoff_ms_max = 100\n[[upstream.topics]]\nedge = \"nope\"\nupstream = \"a b\"\n",
        );
        let paths: Vec<&str> = found.iter().map(|problem| problem.path.as_str()).collect();
        for expected in [
            "upstream.bootstrap_servers",
            "upstream.in_flight_max",
            "upstream.batch_bytes_max",
            "upstream.retry_backoff_ms_min",
            "upstream.topics[0].edge",
            "upstream.topics[0].upstream",
        ] {
            assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
        }
        let found = problems("[upstream]\nbootstrap_servers = [\"no-port\"]\ncolour = 1\n");
        let paths: Vec<&str> = found.iter().map(|problem| problem.path.as_str()).collect();
        assert_eq!(paths, ["upstream.colour"], "unknown keys are reported first, alone");
        let found = problems("[upstream]\nbootstrap_servers = [\"no-port\"]\n");
        assert_eq!(found[0].path, "upstream.bootstrap_servers[0]");
    }

    #[test]
    fn partitions_spread_over_cores() {
        let valid = Config::embedded().validate(&host(), "embedded").unwrap();
        assert_eq!(valid.partitions_of_core(0), vec![("telemetry".into(), 0), ("telemetry".into(), 2)]);
        assert_eq!(valid.partitions_of_core(1), vec![("telemetry".into(), 1), ("telemetry".into(), 3)]);
    }

    #[test]
    fn quic_socket_buffers_default_to_8_mib_and_are_bounded() {
        let valid = Config::embedded().validate(&host(), "embedded").unwrap();
        assert_eq!(valid.config.quic.socket_receive_buffer_bytes.0, QUIC_SOCKET_BUFFER_BYTES_DEFAULT);
        assert_eq!(valid.config.quic.socket_send_buffer_bytes.0, 8 << 20);
        let found = problems("[quic]\nsocket_receive_buffer_bytes = \"2 GiB\"\nsocket_send_buffer_bytes = 1000\n");
        let paths: Vec<_> = found.iter().map(|problem| problem.path.as_str()).collect();
        assert_eq!(paths, ["quic.socket_receive_buffer_bytes", "quic.socket_send_buffer_bytes"]);
        assert_eq!(found[0].why, "must be within 64 KiB..=1 GiB");
    }
}
