//! Kafka's zig-zag varints (protobuf style), as used inside RecordBatch v2 records.
//!
//! Decoding is strict: an encoding longer than the type allows is an error, never a
//! silent wrap, because these bytes come from disk and may be corrupt.

/// The longest encoding of a 64-bit varint.
pub const VARLONG_BYTES_MAX: usize = 10;
/// The longest encoding of a 32-bit varint.
pub const VARINT_BYTES_MAX: usize = 5;

fn zigzag_64(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag_64(raw: u64) -> i64 {
    ((raw >> 1) as i64) ^ -((raw & 1) as i64)
}

/// Bytes needed to encode `value` as a zig-zag varlong.
pub fn varlong_len(value: i64) -> usize {
    let mut raw = zigzag_64(value);
    let mut len = 1;
    while raw >= 0x80 {
        raw >>= 7;
        len += 1;
    }
    len
}

/// Bytes needed to encode `value` as a zig-zag varint.
pub fn varint_len(value: i32) -> usize {
    varlong_len(i64::from(value))
}

/// Writes `value` at the start of `out`, returns the bytes written.
/// `out` must hold at least `varlong_len(value)` bytes.
pub fn put_varlong(out: &mut [u8], value: i64) -> usize {
    let mut raw = zigzag_64(value);
    let mut index = 0;
    while raw >= 0x80 {
        out[index] = (raw as u8) | 0x80;
        raw >>= 7;
        index += 1;
    }
    out[index] = raw as u8;
    index + 1
}

pub fn put_varint(out: &mut [u8], value: i32) -> usize {
    put_varlong(out, i64::from(value))
}

/// Reads a varlong from the start of `input`: the value and the bytes it used.
pub fn get_varlong(input: &[u8]) -> Option<(i64, usize)> {
    let mut raw: u64 = 0;
    for (index, byte) in input.iter().take(VARLONG_BYTES_MAX).enumerate() {
        let bits = u64::from(byte & 0x7f);
        if index == VARLONG_BYTES_MAX - 1 && bits > 1 {
            return None; // more than 64 bits
        }
        raw |= bits << (7 * index);
        if byte & 0x80 == 0 {
            return Some((unzigzag_64(raw), index + 1));
        }
    }
    None
}

/// Reads a varint from the start of `input`: the value and the bytes it used.
pub fn get_varint(input: &[u8]) -> Option<(i32, usize)> {
    let (value, len) = get_varlong(&input[..input.len().min(VARINT_BYTES_MAX)])?;
    let value = i32::try_from(value).ok()?;
    Some((value, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edges() {
        for value in [0i64, 1, -1, 63, -64, 64, 300, -300, i64::from(i32::MAX), i64::from(i32::MIN), i64::MAX, i64::MIN]
        {
            let mut buf = [0u8; VARLONG_BYTES_MAX];
            let len = put_varlong(&mut buf, value);
            assert_eq!(len, varlong_len(value));
            assert_eq!(get_varlong(&buf[..len]), Some((value, len)));
        }
    }

    #[test]
    fn known_encodings_match_kafka() {
        let encoded = |value: i32| {
            let mut buf = [0u8; 10];
            let len = put_varint(&mut buf, value);
            buf[..len].to_vec()
        };
        assert_eq!(encoded(0), [0x00]);
        assert_eq!(encoded(-1), [0x01]);
        assert_eq!(encoded(1), [0x02]);
        assert_eq!(encoded(150), [0xac, 0x02]);
    }

    #[test]
    fn rejects_overlong_and_truncated() {
        assert_eq!(get_varlong(&[0x80; 11]), None);
        assert_eq!(get_varlong(&[0x80, 0x80]), None);
        assert_eq!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0x7f]), None);
    }
}
