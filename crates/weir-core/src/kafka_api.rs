//! The read-only Kafka API's decisions: which requests weir answers and in which
//! versions, which it refuses and why, where a fetch starts, what ListOffsets answers,
//! when a long poll is done, and how the response's byte budget is shared.
//!
//! The shell (`shell::kafka_api`) decodes requests with `kafka-protocol`, asks these
//! functions what to do, and carries it out; nothing here does I/O or reads a clock
//! (a long poll's deadline is an argument). Offsets are the log's: `start` is the first
//! offset still stored, `end` the durable end (one past the last acknowledged record),
//! so a consumer never sees bytes that are not synced.

/// Kafka's error codes that the API answers with (the protocol's numbering).
pub mod error_code {
    pub const NONE: i16 = 0;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const LEADER_NOT_AVAILABLE: i16 = 5;
    pub const NOT_LEADER_OR_FOLLOWER: i16 = 6;
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const INVALID_REQUEST: i16 = 42;
    pub const POLICY_VIOLATION: i16 = 44;
    pub const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
    pub const ILLEGAL_SASL_STATE: i16 = 34;
    pub const SASL_AUTHENTICATION_FAILED: i16 = 58;
}

/// Kafka's API keys that weir knows by name.
pub mod api_key {
    pub const PRODUCE: i16 = 0;
    pub const FETCH: i16 = 1;
    pub const LIST_OFFSETS: i16 = 2;
    pub const METADATA: i16 = 3;
    pub const OFFSET_COMMIT: i16 = 8;
    pub const OFFSET_FETCH: i16 = 9;
    pub const FIND_COORDINATOR: i16 = 10;
    pub const JOIN_GROUP: i16 = 11;
    pub const HEARTBEAT: i16 = 12;
    pub const LEAVE_GROUP: i16 = 13;
    pub const SYNC_GROUP: i16 = 14;
    pub const API_VERSIONS: i16 = 18;
    pub const CREATE_TOPICS: i16 = 19;
    pub const DELETE_TOPICS: i16 = 20;
    pub const DELETE_RECORDS: i16 = 21;
    pub const INIT_PRODUCER_ID: i16 = 22;
    pub const CREATE_PARTITIONS: i16 = 37;
    pub const SASL_HANDSHAKE: i16 = 17;
    pub const SASL_AUTHENTICATE: i16 = 36;
}

/// One API weir answers, with the versions it answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiRange {
    pub key: i16,
    pub version_min: i16,
    pub version_max: i16,
}

const fn range(key: i16, version_min: i16, version_max: i16) -> ApiRange {
    ApiRange { key, version_min, version_max }
}

/// Every API weir answers (what ApiVersions lists). Reads are served; the write and
/// admin APIs here are answered with an error that says why (`refusal`), so a client
/// reports weir's reason instead of "unsupported". Versions stop where a field weir
/// would have to invent begins (topic ids in Fetch v13+, for instance).
pub const APIS_ANSWERED: &[ApiRange] = &[
    range(api_key::PRODUCE, 3, 9),
    range(api_key::FETCH, 4, 12),
    range(api_key::LIST_OFFSETS, 1, 6),
    range(api_key::METADATA, 1, 12),
    range(api_key::API_VERSIONS, 0, 3),
    range(api_key::OFFSET_COMMIT, 2, 8),
    range(api_key::OFFSET_FETCH, 1, 7),
    range(api_key::FIND_COORDINATOR, 0, 3),
    range(api_key::JOIN_GROUP, 0, 7),
    range(api_key::HEARTBEAT, 0, 4),
    range(api_key::LEAVE_GROUP, 0, 4),
    range(api_key::SYNC_GROUP, 0, 5),
    range(api_key::CREATE_TOPICS, 2, 7),
    range(api_key::DELETE_TOPICS, 1, 6),
    range(api_key::DELETE_RECORDS, 0, 2),
    range(api_key::INIT_PRODUCER_ID, 0, 4),
    range(api_key::CREATE_PARTITIONS, 0, 3),
    // SASL (answered by the connection, `sasl_server`). SaslHandshake v0 is listed
    // because librdkafka (2.0's feature map) looks for it before it uses v1; clients
    // send v1, whose tokens travel in SaslAuthenticate. A v0 handshake is answered,
    // but the raw token frames v0 would go on with do not decode: the connection is
    // closed then.
    range(api_key::SASL_HANDSHAKE, 0, 1),
    range(api_key::SASL_AUTHENTICATE, 0, 2),
];

/// Why a write request is refused: weir's log is written by devices only.
pub const WRITE_REFUSED: &str = "weir's Kafka API is read-only: devices write over QUIC (docs/PROTOCOL.md), \
     so Produce, InitProducerId and DeleteRecords are refused";
/// Why an admin request is refused: the topics are the appliance's config.
pub const ADMIN_REFUSED: &str = "weir's topics and partitions come from its config ([[topics]] in weir.toml), \
     not from the Kafka API: CreateTopics, DeleteTopics and CreatePartitions are refused";

/// What the shell does with a request, by its key and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A read weir serves.
    Serve,
    /// A write or admin request: answered, every part with `code` and `reason`.
    Refuse { code: i16, reason: &'static str },
    /// ApiVersions in a version weir does not know: answered in v0 with
    /// UNSUPPORTED_VERSION and the list, as Kafka does, so the client can pick.
    UnsupportedApiVersions,
    /// A key or version weir does not answer: the connection is closed (Kafka does the
    /// same; a client only sends what ApiVersions listed).
    Close,
}

pub fn disposition(key: i16, version: i16) -> Disposition {
    let Some(api) = APIS_ANSWERED.iter().find(|api| api.key == key) else {
        return Disposition::Close;
    };
    if version < api.version_min || version > api.version_max {
        return if key == api_key::API_VERSIONS && version > api.version_max {
            Disposition::UnsupportedApiVersions
        } else {
            Disposition::Close
        };
    }
    match key {
        api_key::PRODUCE | api_key::INIT_PRODUCER_ID | api_key::DELETE_RECORDS => {
            Disposition::Refuse { code: error_code::INVALID_REQUEST, reason: WRITE_REFUSED }
        }
        api_key::CREATE_TOPICS | api_key::DELETE_TOPICS | api_key::CREATE_PARTITIONS => {
            Disposition::Refuse { code: error_code::POLICY_VIOLATION, reason: ADMIN_REFUSED }
        }
        _ => Disposition::Serve,
    }
}

/// Where a partition's fetch stands against the stored range `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStart {
    /// Stored batches hold the offset: read from it.
    Read,
    /// The offset is the durable end: nothing yet (a long poll may wait for it).
    AtEnd,
    /// Behind retention or past the end: OFFSET_OUT_OF_RANGE, so the client resets
    /// by its own policy (`auto.offset.reset`).
    OutOfRange,
}

pub fn fetch_start(offset: i64, start: i64, end: i64) -> FetchStart {
    assert!(0 <= start && start <= end, "the stored range is {start}..{end}");
    if offset < start || offset > end {
        FetchStart::OutOfRange
    } else if offset == end {
        FetchStart::AtEnd
    } else {
        FetchStart::Read
    }
}

/// ListOffsets' special timestamps.
pub const TIMESTAMP_LATEST: i64 = -1;
pub const TIMESTAMP_EARLIEST: i64 = -2;

/// What ListOffsets answers for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOffsetsPlan {
    /// This offset, with timestamp -1 (earliest and latest).
    Offset(i64),
    /// The first record whose timestamp is at least this: the shell scans batch headers
    /// (`first_batch_reaching`) and records (`first_record_reaching`).
    ByTimestamp(i64),
    /// A timestamp weir does not know (another negative value, such as KIP-734's -3,
    /// which needs ListOffsets v7): INVALID_REQUEST.
    Invalid,
}

pub fn list_offsets(timestamp: i64, start: i64, end: i64) -> ListOffsetsPlan {
    assert!(0 <= start && start <= end, "the stored range is {start}..{end}");
    match timestamp {
        TIMESTAMP_LATEST => ListOffsetsPlan::Offset(end),
        TIMESTAMP_EARLIEST => ListOffsetsPlan::Offset(start),
        timestamp if timestamp >= 0 => ListOffsetsPlan::ByTimestamp(timestamp),
        _ => ListOffsetsPlan::Invalid,
    }
}

/// Whether a batch whose largest timestamp is `max_timestamp` may hold the first
/// record at or after `target` (batches are scanned in offset order; timestamps are
/// the devices' and need not grow, so the first batch reaching it is the answer).
pub fn batch_reaches(max_timestamp: i64, target: i64) -> bool {
    max_timestamp >= target
}

/// The first `(offset, timestamp)` at or after `target`, from records in offset order.
pub fn first_record_reaching(records: impl IntoIterator<Item = (i64, i64)>, target: i64) -> Option<(i64, i64)> {
    records.into_iter().find(|(_, timestamp)| *timestamp >= target)
}

/// Whether a fetch answers now: it has `min_bytes` (at least one byte when the client
/// asked for zero or one), or its wait is over.
pub fn fetch_done(bytes: usize, min_bytes: i32, now_ms: u64, deadline_ms: u64) -> bool {
    bytes >= (min_bytes.max(1) as usize) || now_ms >= deadline_ms
}

/// Bytes one partition may add to a fetch response: its own limit, within what the
/// response has left. The first batch of the response is always whole (Kafka's rule,
/// KIP-74: a consumer must be able to make progress past a batch larger than its
/// limits), so a partition with a zero budget still reads one batch when the response
/// is empty.
pub fn partition_budget(partition_max_bytes: i32, response_left_bytes: usize) -> usize {
    (partition_max_bytes.max(0) as usize).min(response_left_bytes)
}

/// The response's byte limit: the client's `max_bytes` within weir's own.
pub fn response_budget(client_max_bytes: i32, response_bytes_max: usize) -> usize {
    (client_max_bytes.max(0) as usize).min(response_bytes_max)
}

/// Whether a read of a partition goes ahead: a partition whose budget is spent
/// still reads (one batch) while the response is empty.
pub fn partition_reads(budget_bytes: usize, response_bytes: usize) -> bool {
    budget_bytes > 0 || response_bytes == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_served_writes_and_admin_refused_with_the_reason() {
        assert_eq!(disposition(api_key::FETCH, 11), Disposition::Serve);
        assert_eq!(disposition(api_key::METADATA, 1), Disposition::Serve);
        match disposition(api_key::PRODUCE, 7) {
            Disposition::Refuse { code, reason } => {
                assert_eq!(code, error_code::INVALID_REQUEST);
                assert!(reason.contains("devices write over QUIC"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(disposition(api_key::CREATE_TOPICS, 5), Disposition::Refuse { code: 44, .. }));
    }

    #[test]
    fn unknown_keys_and_versions_close_except_a_newer_api_versions() {
        assert_eq!(disposition(57, 0), Disposition::Close);
        assert_eq!(disposition(api_key::FETCH, 13), Disposition::Close);
        assert_eq!(disposition(api_key::FETCH, 3), Disposition::Close);
        assert_eq!(disposition(api_key::API_VERSIONS, 4), Disposition::UnsupportedApiVersions);
        assert_eq!(disposition(api_key::API_VERSIONS, -1), Disposition::Close);
    }

    #[test]
    fn a_fetch_behind_retention_or_past_the_end_is_out_of_range() {
        assert_eq!(fetch_start(4, 5, 10), FetchStart::OutOfRange);
        assert_eq!(fetch_start(11, 5, 10), FetchStart::OutOfRange);
        assert_eq!(fetch_start(10, 5, 10), FetchStart::AtEnd);
        assert_eq!(fetch_start(5, 5, 10), FetchStart::Read);
        assert_eq!(fetch_start(0, 0, 0), FetchStart::AtEnd);
    }

    #[test]
    fn list_offsets_answers_earliest_latest_and_plans_the_rest() {
        assert_eq!(list_offsets(TIMESTAMP_EARLIEST, 3, 9), ListOffsetsPlan::Offset(3));
        assert_eq!(list_offsets(TIMESTAMP_LATEST, 3, 9), ListOffsetsPlan::Offset(9));
        assert_eq!(list_offsets(-3, 3, 9), ListOffsetsPlan::Invalid);
        assert_eq!(list_offsets(1_700_000_000_000, 3, 9), ListOffsetsPlan::ByTimestamp(1_700_000_000_000));
        assert_eq!(list_offsets(-4, 3, 9), ListOffsetsPlan::Invalid);
        assert_eq!(first_record_reaching([(3, 10), (4, 30), (5, 20)], 20), Some((4, 30)));
        assert_eq!(first_record_reaching([(3, 10)], 20), None);
        assert!(batch_reaches(20, 20) && !batch_reaches(19, 20));
    }

    #[test]
    fn a_long_poll_answers_at_min_bytes_or_its_deadline() {
        assert!(!fetch_done(0, 1, 10, 20));
        assert!(fetch_done(1, 0, 10, 20));
        assert!(!fetch_done(99, 100, 10, 20));
        assert!(fetch_done(0, 100, 20, 20));
    }

    #[test]
    fn budgets_keep_within_the_response_and_the_first_batch_is_whole() {
        assert_eq!(response_budget(50 << 20, 8 << 20), 8 << 20);
        assert_eq!(response_budget(-1, 8 << 20), 0);
        assert_eq!(partition_budget(1 << 20, 300), 300);
        assert_eq!(partition_budget(-5, 300), 0);
        assert!(partition_reads(0, 0));
        assert!(!partition_reads(0, 10));
    }
}
