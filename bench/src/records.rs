//! The records the bench appends: a pure function of (appender, sequence), so a reader
//! can verify every byte of the log without a manifest.
//!
//! For appender `a` (global, 0-based) and its sequence `s` (0-based): key `"{a}:{s}"`,
//! value byte `i` = `(s * 31 + a + i) % 251`, timestamp `1_700_000_000_000 + s` ms,
//! headers `appender = "{a}"`, `seq = "{s}"`, `nothing = null`.
//!
//! The value is a window into one shared pattern (`j % 251` for `j` in
//! `0..record_bytes + 251`), so building a record costs two small strings and no copy
//! of the value: the appenders' CPU time stays out of the measurement.

use bytes::Bytes;

use weir::core::log::batch::{Header, Record};

pub const TIMESTAMP_BASE_MS: i64 = 1_700_000_000_000;
/// The value pattern's period: a prime, so neighbouring records differ.
pub const VALUE_PERIOD: u64 = 251;
pub const VALUE_SEQUENCE_FACTOR: u64 = 31;

/// The shared value pattern for records of `record_bytes`.
pub fn value_pattern(record_bytes: usize) -> Bytes {
    let pattern: Vec<u8> = (0..record_bytes + VALUE_PERIOD as usize).map(|j| (j as u64 % VALUE_PERIOD) as u8).collect();
    Bytes::from(pattern)
}

/// Record `sequence` of appender `appender`.
pub fn record(appender: u64, sequence: u64, pattern: &Bytes, record_bytes: usize) -> Record {
    assert_eq!(pattern.len(), record_bytes + VALUE_PERIOD as usize, "pattern built for another record size");
    let start = ((sequence % VALUE_PERIOD) * VALUE_SEQUENCE_FACTOR + appender % VALUE_PERIOD) % VALUE_PERIOD;
    let start = start as usize;
    Record {
        timestamp_ms: TIMESTAMP_BASE_MS + sequence as i64,
        key: Some(Bytes::from(format!("{appender}:{sequence}"))),
        value: Some(pattern.slice(start..start + record_bytes)),
        headers: vec![
            Header { key: "appender".to_owned(), value: Some(Bytes::from(appender.to_string())) },
            Header { key: "seq".to_owned(), value: Some(Bytes::from(sequence.to_string())) },
            Header { key: "nothing".to_owned(), value: None },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_follows_the_rule_byte_for_byte() {
        let record_bytes = 700;
        let pattern = value_pattern(record_bytes);
        for (appender, sequence) in [(0u64, 0u64), (3, 17), (250, 251), (1000, 123_456), (7, u64::MAX / 64)] {
            let record = record(appender, sequence, &pattern, record_bytes);
            let value = record.value.expect("a value");
            assert_eq!(value.len(), record_bytes);
            for (index, byte) in value.iter().enumerate() {
                let expected = ((u128::from(sequence) * 31 + u128::from(appender) + index as u128) % 251) as u8;
                assert_eq!(*byte, expected, "appender {appender} sequence {sequence} byte {index}");
            }
            assert_eq!(record.key.as_deref(), Some(format!("{appender}:{sequence}").as_bytes()));
            assert_eq!(record.timestamp_ms, TIMESTAMP_BASE_MS + sequence as i64);
            assert_eq!(record.headers.len(), 3);
            assert_eq!(record.headers[2].value, None);
        }
    }
}
