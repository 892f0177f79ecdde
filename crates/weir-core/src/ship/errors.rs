//! What a Produce error code means for the shipper. Kafka's codes, with the classes
//! its own idempotent producer uses: retriable (send the same bytes again later; the
//! broker de-duplicates), already appended (a duplicate of a batch it holds), out of
//! order (the sequence does not continue: stop, never re-initialise silently), and
//! fatal (nothing a retry can fix: stop that partition with the code's name).

/// How the shipper treats one error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Retriable,
    /// DUPLICATE_SEQUENCE_NUMBER: the batch is already in the log (tansu answers a
    /// retried duplicate this way; Kafka answers success with the old offset).
    AlreadyAppended,
    OutOfOrderSequence,
    Fatal,
}

pub const NONE: i16 = 0;
pub const OFFSET_OUT_OF_RANGE: i16 = 1;
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
pub const DUPLICATE_SEQUENCE_NUMBER: i16 = 46;

/// Kafka's name for an error code (as in its protocol docs).
pub fn error_name(code: i16) -> &'static str {
    match code {
        -1 => "UNKNOWN_SERVER_ERROR",
        0 => "NONE",
        1 => "OFFSET_OUT_OF_RANGE",
        2 => "CORRUPT_MESSAGE",
        3 => "UNKNOWN_TOPIC_OR_PARTITION",
        4 => "INVALID_FETCH_SIZE",
        5 => "LEADER_NOT_AVAILABLE",
        6 => "NOT_LEADER_OR_FOLLOWER",
        7 => "REQUEST_TIMED_OUT",
        8 => "BROKER_NOT_AVAILABLE",
        9 => "REPLICA_NOT_AVAILABLE",
        10 => "MESSAGE_TOO_LARGE",
        13 => "NETWORK_EXCEPTION",
        14 => "COORDINATOR_LOAD_IN_PROGRESS",
        15 => "COORDINATOR_NOT_AVAILABLE",
        16 => "NOT_COORDINATOR",
        17 => "INVALID_TOPIC_EXCEPTION",
        18 => "RECORD_LIST_TOO_LARGE",
        19 => "NOT_ENOUGH_REPLICAS",
        20 => "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        21 => "INVALID_REQUIRED_ACKS",
        29 => "TOPIC_AUTHORIZATION_FAILED",
        31 => "CLUSTER_AUTHORIZATION_FAILED",
        32 => "INVALID_TIMESTAMP",
        33 => "UNSUPPORTED_SASL_MECHANISM",
        34 => "ILLEGAL_SASL_STATE",
        35 => "UNSUPPORTED_VERSION",
        43 => "UNSUPPORTED_FOR_MESSAGE_FORMAT",
        45 => "OUT_OF_ORDER_SEQUENCE_NUMBER",
        46 => "DUPLICATE_SEQUENCE_NUMBER",
        47 => "INVALID_PRODUCER_EPOCH",
        51 => "CONCURRENT_TRANSACTIONS",
        53 => "INVALID_PRODUCER_ID_MAPPING",
        56 => "KAFKA_STORAGE_ERROR",
        58 => "SASL_AUTHENTICATION_FAILED",
        59 => "UNKNOWN_PRODUCER_ID",
        74 => "FENCED_LEADER_EPOCH",
        75 => "UNKNOWN_LEADER_EPOCH",
        87 => "INVALID_RECORD",
        89 => "THROTTLING_QUOTA_EXCEEDED",
        90 => "PRODUCER_FENCED",
        _ => "(unlisted error code)",
    }
}

/// The class of a non-zero Produce error code.
pub fn classify(code: i16) -> ErrorClass {
    assert_ne!(code, NONE, "NONE is not an error");
    match code {
        // UNKNOWN_SERVER_ERROR is retried: a store-and-forward appliance waits out a
        // confused broker rather than stop shipping; every retry is logged.
        -1 | 2 | 3 | 5 | 6 | 7 | 8 | 9 | 13 | 14 | 15 | 16 | 19 | 20 | 51 | 56 | 74 | 75 | 89 => ErrorClass::Retriable,
        DUPLICATE_SEQUENCE_NUMBER => ErrorClass::AlreadyAppended,
        OUT_OF_ORDER_SEQUENCE_NUMBER => ErrorClass::OutOfOrderSequence,
        _ => ErrorClass::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_and_timeouts_are_retried() {
        for code in [6, 5, 7, 19, 20, 56, 74, -1] {
            assert_eq!(classify(code), ErrorClass::Retriable, "{} ({code})", error_name(code));
        }
    }

    #[test]
    fn idempotence_violations_are_never_retried() {
        assert_eq!(classify(45), ErrorClass::OutOfOrderSequence);
        for code in [47, 59, 90, 10, 87, 29, 1234] {
            assert_eq!(classify(code), ErrorClass::Fatal, "{} ({code})", error_name(code));
        }
        assert_eq!(classify(46), ErrorClass::AlreadyAppended);
    }
}
