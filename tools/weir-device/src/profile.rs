//! The device profile: everything a device needs to reach weir (addresses, server name,
//! its certificate), how it batches, how it retries and how long it waits. Parsed from
//! TOML (`firmware-config/device.toml` documents every field), then validated as a
//! whole: every problem is reported with its path, and unknown keys are errors rather
//! than silently ignored, so a typo in a field name cannot fall back to a default.
//!
//! Paths in a profile are relative to the profile file's directory, so a profile and
//! its certificates can move together.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use weir_protocol::FRAME_LIMITS_V1;

/// The only ALPN of protocol v1.
pub const PROFILE_ALPN: &str = "weir/1";
/// The most server addresses a profile lists.
pub const SERVER_ADDRESSES_MAX: usize = 16;
/// The most frames one device keeps unanswered.
pub const FRAMES_IN_FLIGHT_LIMIT: usize = 64;
/// The most records one device queues (in batches and unanswered frames).
pub const QUEUE_RECORDS_LIMIT: usize = 1 << 20;
/// The smallest batch size in bytes a profile may ask for.
pub const BATCH_BYTES_MIN: u64 = 1 << 10;
/// The longest linger, retry backoff and timeout a profile may ask for.
pub const DURATION_MS_MAX: u64 = 3_600_000;
/// The most tries of one frame.
pub const ATTEMPTS_LIMIT: u32 = 1000;
/// The largest sequence reservation step.
pub const SEQUENCE_RESERVE_MAX: u64 = 1 << 20;

const _: () = assert!(BATCH_BYTES_MIN < FRAME_LIMITS_V1.frame_bytes_max as u64);

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DeviceProfile {
    pub server: ServerProfile,
    pub tls: TlsProfile,
    #[serde(default)]
    pub batch: BatchProfile,
    #[serde(default)]
    pub flow: FlowProfile,
    #[serde(default)]
    pub retry: RetryProfile,
    #[serde(default)]
    pub timeouts: TimeoutProfile,
    #[serde(default)]
    pub sequence: SequenceProfile,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerProfile {
    /// `ip:port` of each appliance; the client starts with the first and moves to the
    /// next after a failed connect or a lost connection.
    pub addresses: Vec<String>,
    /// The TLS server name checked against the server certificate.
    pub name: String,
    /// Must be `weir/1`.
    #[serde(default = "default_alpn")]
    pub alpn: String,
    /// Local address to bind; default: any address of the server's family (loopback
    /// when the first server address is loopback), port chosen by the OS.
    #[serde(default)]
    pub bind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TlsProfile {
    /// PEM file with the CA certificate(s) the server certificate must chain to.
    pub ca: PathBuf,
    /// PEM file with the device certificate (chain); its subject CN is the device id.
    pub certificate: PathBuf,
    /// PEM file with the device's private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct BatchProfile {
    #[serde(default = "default_records_max")]
    pub records_max: usize,
    #[serde(default = "default_batch_bytes_max")]
    pub bytes_max: u64,
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct FlowProfile {
    #[serde(default = "default_frames_in_flight_max")]
    pub frames_in_flight_max: usize,
    #[serde(default = "default_queue_records_max")]
    pub queue_records_max: usize,
    #[serde(default = "default_send_window_bytes")]
    pub send_window_bytes: u64,
    #[serde(default = "default_receive_window_bytes")]
    pub receive_window_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct RetryProfile {
    #[serde(default = "default_attempts_max")]
    pub attempts_max: u32,
    #[serde(default = "default_backoff_ms_min")]
    pub backoff_ms_min: u64,
    #[serde(default = "default_backoff_ms_max")]
    pub backoff_ms_max: u64,
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct TimeoutProfile {
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    #[serde(default = "default_answer_ms")]
    pub answer_ms: u64,
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SequenceProfile {
    /// File holding the device's next sequence; without it, sequences start from the
    /// clock (microseconds since the Unix epoch) at every start.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    #[serde(default = "default_sequence_reserve")]
    pub reserve: u64,
}

fn default_alpn() -> String {
    PROFILE_ALPN.to_owned()
}
fn default_records_max() -> usize {
    256
}
fn default_batch_bytes_max() -> u64 {
    64 << 10
}
fn default_linger_ms() -> u64 {
    5
}
fn default_frames_in_flight_max() -> usize {
    4
}
fn default_queue_records_max() -> usize {
    8192
}
fn default_send_window_bytes() -> u64 {
    256 << 10
}
fn default_receive_window_bytes() -> u64 {
    64 << 10
}
fn default_attempts_max() -> u32 {
    10
}
fn default_backoff_ms_min() -> u64 {
    50
}
fn default_backoff_ms_max() -> u64 {
    5_000
}
fn default_jitter() -> f64 {
    1.0
}
fn default_connect_ms() -> u64 {
    5_000
}
fn default_answer_ms() -> u64 {
    10_000
}
fn default_idle_ms() -> u64 {
    150_000
}
fn default_keep_alive_ms() -> u64 {
    60_000
}
fn default_sequence_reserve() -> u64 {
    1024
}

impl Default for BatchProfile {
    fn default() -> Self {
        BatchProfile {
            records_max: default_records_max(),
            bytes_max: default_batch_bytes_max(),
            linger_ms: default_linger_ms(),
        }
    }
}

impl Default for FlowProfile {
    fn default() -> Self {
        FlowProfile {
            frames_in_flight_max: default_frames_in_flight_max(),
            queue_records_max: default_queue_records_max(),
            send_window_bytes: default_send_window_bytes(),
            receive_window_bytes: default_receive_window_bytes(),
        }
    }
}

impl Default for RetryProfile {
    fn default() -> Self {
        RetryProfile {
            attempts_max: default_attempts_max(),
            backoff_ms_min: default_backoff_ms_min(),
            backoff_ms_max: default_backoff_ms_max(),
            jitter: default_jitter(),
        }
    }
}

impl Default for TimeoutProfile {
    fn default() -> Self {
        TimeoutProfile {
            connect_ms: default_connect_ms(),
            answer_ms: default_answer_ms(),
            idle_ms: default_idle_ms(),
            keep_alive_ms: default_keep_alive_ms(),
        }
    }
}

impl Default for SequenceProfile {
    fn default() -> Self {
        SequenceProfile { state_file: None, reserve: default_sequence_reserve() }
    }
}

/// One problem with a profile: the field's path and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileProblem {
    pub path: String,
    pub why: String,
}

impl fmt::Display for ProfileProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.path, self.why)
    }
}

/// Why a profile cannot be used; every problem found is listed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    #[error("cannot read device profile {path}: {source}")]
    Read { path: PathBuf, source: std::sync::Arc<std::io::Error> },
    #[error("{}", render_problems(origin, problems))]
    Invalid { origin: String, problems: Vec<ProfileProblem> },
}

fn render_problems(origin: &str, problems: &[ProfileProblem]) -> String {
    let mut text = format!(
        "invalid device profile {origin} ({} problem{}):",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for problem in problems {
        text.push_str(&format!("\n  {problem}"));
    }
    text
}

impl DeviceProfile {
    /// A profile with every optional field at its default.
    pub fn new(addresses: Vec<SocketAddr>, server_name: &str, ca: PathBuf, certificate: PathBuf, key: PathBuf) -> Self {
        DeviceProfile {
            server: ServerProfile {
                addresses: addresses.iter().map(ToString::to_string).collect(),
                name: server_name.to_owned(),
                alpn: default_alpn(),
                bind: None,
            },
            tls: TlsProfile { ca, certificate, key },
            batch: BatchProfile::default(),
            flow: FlowProfile::default(),
            retry: RetryProfile::default(),
            timeouts: TimeoutProfile::default(),
            sequence: SequenceProfile::default(),
        }
    }

    /// Parses and validates TOML; `origin` names the source in errors and relative
    /// paths are taken relative to `base_directory`.
    pub fn parse(text: &str, origin: &str, base_directory: &Path) -> Result<DeviceProfile, ProfileError> {
        let invalid = |problems| ProfileError::Invalid { origin: origin.to_owned(), problems };
        let mut unknown = Vec::new();
        let deserializer = toml::Deserializer::new(text);
        let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let result: Result<DeviceProfile, _> =
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(deserializer, &mut note_unknown));
        let mut problems: Vec<ProfileProblem> =
            unknown.into_iter().map(|path| ProfileProblem { path, why: "unknown key".to_owned() }).collect();
        let mut profile = match result {
            Ok(profile) => profile,
            Err(error) => {
                let path = error.path().to_string();
                let why = error.into_inner().message().trim().to_owned();
                let path = if path == "." { "(top level)".to_owned() } else { path };
                problems.push(ProfileProblem { path, why });
                return Err(invalid(problems));
            }
        };
        problems.extend(profile.problems());
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        profile.resolve_paths(base_directory);
        Ok(profile)
    }

    /// Reads, parses and validates a profile file.
    pub fn load(path: &Path) -> Result<DeviceProfile, ProfileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProfileError::Read { path: path.to_owned(), source: source.into() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        DeviceProfile::parse(&text, &path.display().to_string(), base)
    }

    /// Checks a profile built in code (`parse` and `load` run this already).
    pub fn validate(&self, origin: &str) -> Result<(), ProfileError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ProfileError::Invalid { origin: origin.to_owned(), problems })
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        resolve(&mut self.tls.ca);
        resolve(&mut self.tls.certificate);
        resolve(&mut self.tls.key);
        if let Some(path) = self.sequence.state_file.as_mut() {
            resolve(path);
        }
    }

    /// The server addresses, parsed (valid profiles only).
    pub fn server_addresses(&self) -> Vec<SocketAddr> {
        self.server.addresses.iter().filter_map(|address| address.parse().ok()).collect()
    }

    /// The local address to bind: the configured one, or any port on an address of the
    /// first server's family (loopback for a loopback server).
    pub fn bind_address(&self) -> SocketAddr {
        if let Some(bind) = self.server.bind.as_deref().and_then(|bind| bind.parse().ok()) {
            return bind;
        }
        match self.server_addresses().first() {
            Some(SocketAddr::V4(server)) if server.ip().is_loopback() => (std::net::Ipv4Addr::LOCALHOST, 0).into(),
            Some(SocketAddr::V6(server)) if server.ip().is_loopback() => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
            Some(SocketAddr::V6(_)) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            _ => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        }
    }

    fn problems(&self) -> Vec<ProfileProblem> {
        let mut problems = Vec::new();
        let mut problem = |path: &str, why: String| problems.push(ProfileProblem { path: path.to_owned(), why });
        let server = &self.server;
        if server.addresses.is_empty() || server.addresses.len() > SERVER_ADDRESSES_MAX {
            problem("server.addresses", format!("list 1..={SERVER_ADDRESSES_MAX} addresses"));
        }
        for (index, address) in server.addresses.iter().enumerate() {
            match address.parse::<SocketAddr>() {
                Ok(parsed) if parsed.port() == 0 => problem(&format!("server.addresses[{index}]"), "port 0".into()),
                Ok(_) => {}
                Err(_) => problem(
                    &format!("server.addresses[{index}]"),
                    format!("{address:?} is not an ip:port such as 127.0.0.1:4433 or [::1]:4433"),
                ),
            }
        }
        if rustls_pki_types::ServerName::try_from(server.name.as_str()).is_err() {
            problem("server.name", format!("{:?} is not a DNS name or IP address", server.name));
        }
        if server.alpn != PROFILE_ALPN {
            problem("server.alpn", format!("{:?}: protocol v1 speaks only {PROFILE_ALPN:?}", server.alpn));
        }
        if let Some(bind) = &server.bind {
            if bind.parse::<SocketAddr>().is_err() {
                problem("server.bind", format!("{bind:?} is not an ip:port such as 0.0.0.0:0"));
            }
        }
        for (path, value) in
            [("tls.ca", &self.tls.ca), ("tls.certificate", &self.tls.certificate), ("tls.key", &self.tls.key)]
        {
            if value.as_os_str().is_empty() {
                problem(path, "empty path".into());
            }
        }
        let batch = &self.batch;
        if batch.records_max == 0 || batch.records_max > FRAME_LIMITS_V1.records_per_frame_max {
            problem(
                "batch.records_max",
                format!("{} is not in 1..={}", batch.records_max, FRAME_LIMITS_V1.records_per_frame_max),
            );
        }
        let frame_bytes_max = FRAME_LIMITS_V1.frame_bytes_max as u64;
        if !(BATCH_BYTES_MIN..=frame_bytes_max).contains(&batch.bytes_max) {
            problem("batch.bytes_max", format!("{} is not in {BATCH_BYTES_MIN}..={frame_bytes_max}", batch.bytes_max));
        }
        if batch.linger_ms > DURATION_MS_MAX {
            problem("batch.linger_ms", format!("{} is over {DURATION_MS_MAX}", batch.linger_ms));
        }
        let flow = &self.flow;
        if flow.frames_in_flight_max == 0 || flow.frames_in_flight_max > FRAMES_IN_FLIGHT_LIMIT {
            problem(
                "flow.frames_in_flight_max",
                format!("{} is not in 1..={FRAMES_IN_FLIGHT_LIMIT}", flow.frames_in_flight_max),
            );
        }
        if flow.queue_records_max < batch.records_max || flow.queue_records_max > QUEUE_RECORDS_LIMIT {
            problem(
                "flow.queue_records_max",
                format!(
                    "{} is not in batch.records_max ({})..={QUEUE_RECORDS_LIMIT}",
                    flow.queue_records_max, batch.records_max
                ),
            );
        }
        if flow.send_window_bytes < batch.bytes_max || flow.send_window_bytes > 1 << 30 {
            problem(
                "flow.send_window_bytes",
                format!("{} is not in batch.bytes_max ({})..=1 GiB", flow.send_window_bytes, batch.bytes_max),
            );
        }
        if !(1 << 10..=16 << 20).contains(&flow.receive_window_bytes) {
            problem("flow.receive_window_bytes", format!("{} is not in 1 KiB..=16 MiB", flow.receive_window_bytes));
        }
        let retry = &self.retry;
        if retry.attempts_max == 0 || retry.attempts_max > ATTEMPTS_LIMIT {
            problem("retry.attempts_max", format!("{} is not in 1..={ATTEMPTS_LIMIT}", retry.attempts_max));
        }
        if retry.backoff_ms_min == 0 || retry.backoff_ms_min > retry.backoff_ms_max {
            problem("retry.backoff_ms_min", format!("{} is not in 1..=retry.backoff_ms_max", retry.backoff_ms_min));
        }
        if retry.backoff_ms_max > DURATION_MS_MAX {
            problem("retry.backoff_ms_max", format!("{} is over {DURATION_MS_MAX}", retry.backoff_ms_max));
        }
        if !(0.0..=1.0).contains(&retry.jitter) {
            problem("retry.jitter", format!("{} is not in 0.0..=1.0", retry.jitter));
        }
        let timeouts = &self.timeouts;
        for (path, value) in [
            ("timeouts.connect_ms", timeouts.connect_ms),
            ("timeouts.answer_ms", timeouts.answer_ms),
            ("timeouts.idle_ms", timeouts.idle_ms),
        ] {
            if value == 0 || value > DURATION_MS_MAX {
                problem(path, format!("{value} is not in 1..={DURATION_MS_MAX}"));
            }
        }
        if timeouts.keep_alive_ms >= timeouts.idle_ms {
            problem(
                "timeouts.keep_alive_ms",
                format!(
                    "{} must be below timeouts.idle_ms ({}), or 0 for none",
                    timeouts.keep_alive_ms, timeouts.idle_ms
                ),
            );
        }
        let sequence = &self.sequence;
        if sequence.reserve == 0 || sequence.reserve > SEQUENCE_RESERVE_MAX {
            problem("sequence.reserve", format!("{} is not in 1..={SEQUENCE_RESERVE_MAX}", sequence.reserve));
        }
        if sequence.state_file.as_ref().is_some_and(|path| path.as_os_str().is_empty()) {
            problem("sequence.state_file", "empty path".into());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
addresses = ["127.0.0.1:4433"]
name = "localhost"
[tls]
ca = "certs/ca.pem"
certificate = "certs/devices/dev-1.pem"
key = "certs/devices/dev-1.key"
"#;

    #[test]
    fn a_minimal_profile_takes_every_default_and_resolves_paths() {
        let profile = DeviceProfile::parse(MINIMAL, "test", Path::new("/etc/weir")).unwrap();
        assert_eq!(profile.batch, BatchProfile::default());
        assert_eq!(profile.retry, RetryProfile::default());
        assert_eq!(profile.tls.ca, Path::new("/etc/weir/certs/ca.pem"));
        assert_eq!(profile.server.alpn, "weir/1");
        assert_eq!(profile.bind_address(), "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_all_reported_with_their_paths() {
        let text = format!("{MINIMAL}\n[batch]\nrecords_max = 0\nlinger = 5\n[retry]\njitter = 2.0\n");
        let error = DeviceProfile::parse(&text, "test", Path::new(".")).unwrap_err();
        let ProfileError::Invalid { problems, .. } = &error else { panic!("{error}") };
        let paths: Vec<&str> = problems.iter().map(|problem| problem.path.as_str()).collect();
        assert_eq!(paths, ["batch.linger", "batch.records_max", "retry.jitter"], "{error}");
        let text =
            MINIMAL.replace("weir/1", "x").replace("name = \"localhost\"", "name = \"localhost\"\nalpn = \"h3\"");
        let error = DeviceProfile::parse(&text, "test", Path::new(".")).unwrap_err();
        assert!(error.to_string().contains("server.alpn"), "{error}");
        let error = DeviceProfile::parse("[server]\naddresses = [\"nohost\"]\n", "test", Path::new(".")).unwrap_err();
        assert!(error.to_string().contains("server: missing field `name`"), "{error}");
    }

    #[test]
    fn a_type_error_names_its_path() {
        let text = MINIMAL.replace("[\"127.0.0.1:4433\"]", "\"127.0.0.1:4433\"");
        let error = DeviceProfile::parse(&text, "test", Path::new(".")).unwrap_err();
        assert!(error.to_string().contains("server.addresses"), "{error}");
    }
}
