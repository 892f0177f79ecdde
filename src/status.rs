//! `weir status`: per partition, the log's start and end, the shipped cursor, the lag
//! in records, bytes and seconds, the shipper's state (with its error when stopped),
//! and disk use against the budgets.
//!
//! It asks the running server first (`GET /status` on `admin.listen`, the same atomics
//! `/metrics` exports). When nothing answers there, it reads the data directory
//! instead: offsets by verifying every segment (as `weir inspect`, so it takes as long
//! as reading the log) and the cursor from `ship.state`; the lag in bytes and seconds
//! and the shipper's live state are then unknown. The Kafka API's consumer groups are
//! then those with offsets in `kafka-offsets.json`, in state "not running".

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use crate::config::ValidConfig;
use crate::shell::runtime::{exit_code, partition_directory};
use crate::shell::ship::read_state;
use crate::shell::status::{
    kafka_group_status, render_text, KafkaGroupStatus, PartitionStatus, PublishedGroup, ShipperState, ShipperStatus,
    Status,
};

/// How long `weir status` waits for the admin endpoint.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes of a /status answer read.
const ANSWER_BYTES_MAX: u64 = 64 << 20;

/// Why the server's status could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    #[error("{address}: {source}")]
    Unreachable { address: String, source: std::io::Error },
    #[error("{address}: {why}")]
    BadAnswer { address: String, why: String },
}

/// `GET /status` from the admin endpoint at `address`.
pub fn fetch(address: &str) -> Result<Status, StatusError> {
    let body = fetch_path(address, "/status")?;
    serde_json::from_slice(&body).map_err(|error| StatusError::BadAnswer {
        address: address.to_owned(),
        why: format!("not a /status answer: {error}"),
    })
}

/// The body of `GET path` from the admin endpoint at `address` (answered 200).
pub fn fetch_path(address: &str, path: &str) -> Result<Vec<u8>, StatusError> {
    let unreachable = |source| StatusError::Unreachable { address: address.to_owned(), source };
    let bad = |why: String| StatusError::BadAnswer { address: address.to_owned(), why };
    let mut target: SocketAddr =
        address.to_socket_addrs().map_err(unreachable)?.next().ok_or_else(|| bad("resolves to no address".into()))?;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    if target.port() == 0 {
        return Err(bad("port 0: pass the port the server logged with --admin".into()));
    }
    let mut stream = TcpStream::connect_timeout(&target, ADMIN_TIMEOUT).map_err(unreachable)?;
    stream.set_read_timeout(Some(ADMIN_TIMEOUT)).map_err(unreachable)?;
    stream.set_write_timeout(Some(ADMIN_TIMEOUT)).map_err(unreachable)?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: weir\r\n\r\n").as_bytes()).map_err(unreachable)?;
    let mut answer = Vec::new();
    stream.take(ANSWER_BYTES_MAX).read_to_end(&mut answer).map_err(unreachable)?;
    let split =
        answer.windows(4).position(|window| window == b"\r\n\r\n").ok_or_else(|| bad("no HTTP answer".into()))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status_line = head.lines().next().unwrap_or("");
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!("answered {status_line:?}")));
    }
    Ok(answer[split + 4..].to_vec())
}

/// Status read from the data directory while weir is not running.
pub fn offline(valid: &ValidConfig) -> Status {
    let config = &valid.config;
    let mut partitions = Vec::new();
    for topic in &config.topics {
        for partition in 0..topic.partitions {
            let directory = partition_directory(&config.data_dir, &topic.name, partition);
            partitions.push(offline_partition(valid, &topic.name, partition, &directory));
        }
    }
    let free = crate::shell::sys::available_bytes(&config.data_dir).ok();
    let kafka_groups = offline_kafka_groups(&config.data_dir, &partitions);
    Status {
        source: "data directory (weir is not answering on admin.listen)".to_owned(),
        data_dir: Some(config.data_dir.clone()),
        disk_full_policy: Some(config.log.disk_full_policy.name().to_owned()),
        data_dir_bytes: partitions.iter().map(|partition| partition.disk_bytes).sum(),
        data_dir_bytes_max: config.log.data_dir_bytes_max.0,
        filesystem_free_bytes: free,
        partitions,
        quarantined: Vec::new(),
        kafka_groups,
    }
}

/// The groups with stored offsets, against the offsets read from the segments. A file
/// that cannot be read is reported on stderr and shows no groups.
fn offline_kafka_groups(data_dir: &Path, partitions: &[PartitionStatus]) -> Vec<KafkaGroupStatus> {
    let offsets = match crate::shell::kafka_api::load_offsets(data_dir) {
        Ok((_, offsets)) => offsets,
        Err(error) => {
            eprintln!("weir status: the Kafka API's committed offsets are not shown: {error}");
            return Vec::new();
        }
    };
    let mut published: Vec<PublishedGroup> = Vec::new();
    for (group, topic, partition, offset) in offsets.entries() {
        if published.last().is_none_or(|last| last.group != group) {
            published.push(PublishedGroup {
                group: group.to_owned(),
                state: "not running",
                generation: 0,
                members: 0,
                committed: Vec::new(),
            });
        }
        published.last_mut().expect("just pushed").committed.push((topic.to_owned(), partition, offset));
    }
    kafka_group_status(&published, partitions)
}

fn offline_partition(valid: &ValidConfig, topic: &str, partition: u32, directory: &Path) -> PartitionStatus {
    let (start, end, bytes, problem) = if directory.is_dir() {
        match crate::inspect::inspect(directory, |_| {}) {
            Ok(summary) => summary
                .partitions
                .first()
                .map_or((0, 0, 0, None), |found| (found.start_offset, found.next_offset, found.bytes, None)),
            Err(problem) => (0, 0, 0, Some(problem.to_string())),
        }
    } else {
        (0, 0, 0, None)
    };
    let shipper = valid.config.upstream.destination(topic, partition).map(|_| {
        let (state, cursor) = match (problem, read_state(directory)) {
            (Some(problem), _) => (ShipperState::Stopped { error: format!("the log does not verify: {problem}") }, 0),
            (None, Ok(state)) => (ShipperState::NotRunning, state.map_or(start, |state| state.cursor_offset)),
            (None, Err(error)) => (ShipperState::Stopped { error: error.to_string() }, start),
        };
        let from = cursor.max(start);
        ShipperStatus {
            state,
            cursor_offset: cursor,
            lag_records: (end - from).max(0),
            lag_bytes: None,
            lag_seconds: None,
            shipped_records: 0,
            skipped_records: 0,
            failing_since_s: None,
            last_success_s: None,
        }
    });
    PartitionStatus {
        topic: topic.to_owned(),
        partition,
        log_start_offset: start,
        log_end_offset: end,
        disk_bytes: bytes,
        partition_bytes_max: valid.config.log.partition_bytes_max.0,
        disk_full_rejections: 0,
        dropped_segments: 0,
        dropped_records: 0,
        dropped_ranges: Vec::new(),
        shipper,
    }
}

/// Runs `weir status`; returns the exit code: 0, 1 when a shipper is stopped, 4 when
/// there is nothing true to report: an `--admin` that does not answer (never a silent
/// fallback to some local directory), or no server and no data directory.
pub fn command(valid: &ValidConfig, admin: Option<&str>, json: bool) -> i32 {
    let address = admin.unwrap_or(&valid.config.admin.listen);
    let status = match fetch(address) {
        Ok(status) => status,
        Err(error @ StatusError::Unreachable { .. }) if admin.is_some() => {
            eprintln!("weir status: {error}: no weir answers on the --admin address given");
            return exit_code::ADMIN_UNAVAILABLE;
        }
        Err(StatusError::Unreachable { address, source }) => {
            let data_dir = &valid.config.data_dir;
            if !data_dir.is_dir() {
                eprintln!(
                    "weir status: no answer from {address} ({source}), and the data directory {} does not exist: \
                     nothing to report (is weir running with another config? pass its --config, or --admin HOST:PORT)",
                    data_dir.display()
                );
                return exit_code::ADMIN_UNAVAILABLE;
            }
            match crate::shell::dir_lock::holder(data_dir) {
                Some(pid) => eprintln!(
                    "weir status: no answer from {address} ({source}), though weir (PID {pid}) holds {}; reading the \
                     data directory",
                    data_dir.display()
                ),
                None => eprintln!("weir status: no answer from {address} ({source}); reading the data directory"),
            }
            offline(valid)
        }
        Err(error) => {
            eprintln!("weir status: {error}");
            return exit_code::ADMIN_UNAVAILABLE;
        }
    };
    if json {
        println!("{}", serde_json::to_string(&status).expect("status serializes"));
    } else {
        print!("{}", render_text(&status));
    }
    let stopped = status
        .partitions
        .iter()
        .any(|partition| partition.shipper.as_ref().is_some_and(|shipper| shipper.state.is_stopped()));
    if stopped {
        exit_code::PROBLEMS_FOUND
    } else {
        exit_code::CLEAN
    }
}
