//! The records the bench appends: a pure function of (appender, sequence), so a reader
//! can verify every byte of the log without a manifest.
//!
//! For appender `a` (global, 0-based) and its sequence `s` (0-based): key `"{a}:{s}"`,
//! value byte `i` = `(s * 31 + a + i) % 251`, timestamp `1_700_000_000_000 + s` ms,
//! headers `appender = "{a}"`, `seq = "{s}"`, `nothing = null`.
//!
//! The value is a window into one shared pattern (`j % 251` for `j` in
//! `0..record_bytes + 251`), the numbers are written as decimal digits by hand rather
//! than through `format!`, the two numeric header values are slices of the key and the
//! header names are static: building a record costs three small allocations and no
//! copy of the value. In `weir-bench log` every appender builds its next record between
//! an acknowledgement and its next append, while the disk waits, so what building costs
//! lowers weir's figure although it is not the log's work.

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
    let mut key = Vec::with_capacity(2 * U64_DIGITS_MAX + 1);
    push_decimal(&mut key, appender);
    let appender_digits = key.len();
    key.push(b':');
    push_decimal(&mut key, sequence);
    let key = Bytes::from(key);
    let appender_text = key.slice(..appender_digits);
    let sequence_text = key.slice(appender_digits + 1..);
    Record {
        timestamp_ms: TIMESTAMP_BASE_MS + sequence as i64,
        key: Some(key),
        value: Some(pattern.slice(start..start + record_bytes)),
        headers: vec![
            Header { key: "appender".into(), value: Some(appender_text) },
            Header { key: "seq".into(), value: Some(sequence_text) },
            Header { key: "nothing".into(), value: None },
        ],
    }
}

/// Digits of `u64::MAX` in decimal.
const U64_DIGITS_MAX: usize = 20;

/// Appends `value` in decimal ASCII, as `value.to_string()` would spell it.
fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; U64_DIGITS_MAX];
    let mut first = digits.len();
    loop {
        first -= 1;
        digits[first] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[first..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits_match_to_string() {
        for value in [0u64, 1, 9, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX / 64, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, value);
            assert_eq!(out, format!("x{value}").into_bytes());
        }
    }

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
            assert_eq!(record.headers[0].value.as_deref(), Some(appender.to_string().as_bytes()));
            assert_eq!(record.headers[1].value.as_deref(), Some(sequence.to_string().as_bytes()));
            assert_eq!(record.headers[2].value, None);
        }
    }
}
