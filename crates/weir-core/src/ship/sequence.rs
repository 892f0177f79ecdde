//! Kafka producer sequence numbers as a pure function of local offsets.
//!
//! The rule (documented in docs/UPSTREAM.md): within one producer epoch, the record at
//! local offset `o` carries sequence `(o - epoch_start_offset) mod 2^31`, where
//! `epoch_start_offset` is the cursor at the moment the producer id was granted and is
//! persisted with it. An upstream batch's `baseSequence` is its first record's sequence;
//! its last sequence is the last record's. Kafka wraps sequences the same way (after
//! `i32::MAX` comes 0), so consecutive batches always continue the sequence exactly as
//! the broker expects, whatever the batch boundaries are.
//!
//! Because the mapping is a function of the offset alone, a batch re-built after a
//! crash from the same offsets carries the same sequences, and a sequence found
//! upstream maps back to exactly one local offset near the cursor (`offset_near`).

/// Sequences live in `0 .. 2^31`.
pub const SEQUENCE_MODULUS: i64 = 1 << 31;

/// How far from a reference offset `offset_near` can map a sequence back: half the
/// sequence space either way.
pub const UNWRAP_RADIUS: i64 = SEQUENCE_MODULUS / 2;

/// A Kafka producer sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sequence(pub i32);

impl Sequence {
    /// The sequence of the record at `offset` in the epoch that started at
    /// `epoch_start_offset`.
    pub fn of_offset(offset: i64, epoch_start_offset: i64) -> Sequence {
        assert!(offset >= epoch_start_offset, "offset {offset} precedes its epoch start {epoch_start_offset}");
        Sequence(((offset - epoch_start_offset) % SEQUENCE_MODULUS) as i32)
    }

    /// `self + count`, wrapping at 2^31 as Kafka does.
    pub fn plus(self, count: i64) -> Sequence {
        assert!(count >= 0);
        Sequence(((i64::from(self.0) + count) % SEQUENCE_MODULUS) as i32)
    }

    /// The last sequence of a batch of `record_count` records starting at `self`.
    pub fn last_of_batch(self, record_count: i32) -> Sequence {
        assert!(record_count >= 1);
        self.plus(i64::from(record_count) - 1)
    }
}

/// The local offset whose sequence is `sequence`, choosing the one within
/// `UNWRAP_RADIUS` of `near_offset` (offsets before the epoch start are impossible and
/// pull the answer forward).
pub fn offset_near(sequence: Sequence, epoch_start_offset: i64, near_offset: i64) -> i64 {
    assert!(sequence.0 >= 0, "a negative sequence is not a producer sequence");
    let near_relative = (near_offset - epoch_start_offset).max(0);
    let near_sequence = near_relative % SEQUENCE_MODULUS;
    let mut delta = i64::from(sequence.0) - near_sequence;
    if delta > UNWRAP_RADIUS {
        delta -= SEQUENCE_MODULUS;
    } else if delta <= -UNWRAP_RADIUS {
        delta += SEQUENCE_MODULUS;
    }
    let relative = near_relative + delta;
    let relative = if relative < 0 { relative + SEQUENCE_MODULUS } else { relative };
    epoch_start_offset + relative
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_counts_from_the_epoch_start() {
        assert_eq!(Sequence::of_offset(100, 100), Sequence(0));
        assert_eq!(Sequence::of_offset(107, 100), Sequence(7));
        assert_eq!(Sequence::of_offset(100 + SEQUENCE_MODULUS, 100), Sequence(0));
        assert_eq!(Sequence::of_offset(99 + SEQUENCE_MODULUS, 100), Sequence(i32::MAX));
    }

    #[test]
    fn sequences_wrap_like_kafka() {
        // Kafka: incrementSequence(MAX, 1) == 0.
        assert_eq!(Sequence(i32::MAX).plus(1), Sequence(0));
        assert_eq!(Sequence(i32::MAX - 1).last_of_batch(3), Sequence(0));
        assert_eq!(Sequence(5).last_of_batch(1), Sequence(5));
    }

    #[test]
    fn consecutive_batches_continue_the_sequence_across_the_wrap() {
        let epoch_start = 3;
        let mut offset = SEQUENCE_MODULUS - 10;
        let mut previous_last: Option<Sequence> = None;
        for count in [4, 5, 6, 7] {
            let base = Sequence::of_offset(offset, epoch_start);
            if let Some(last) = previous_last {
                assert_eq!(last.plus(1), base, "batch at {offset} continues the previous one");
            }
            previous_last = Some(base.last_of_batch(count));
            offset += i64::from(count);
        }
    }

    #[test]
    fn offset_near_inverts_of_offset_around_the_reference() {
        for epoch_start in [0i64, 17, 5_000_000_000] {
            for near in [
                epoch_start,
                epoch_start + 1000,
                epoch_start + SEQUENCE_MODULUS - 3,
                epoch_start + 3 * SEQUENCE_MODULUS,
            ] {
                for delta in [-1000i64, -1, 0, 1, 2, 999, UNWRAP_RADIUS - 1, -(UNWRAP_RADIUS - 1)] {
                    let offset = near + delta;
                    if offset < epoch_start {
                        continue;
                    }
                    let sequence = Sequence::of_offset(offset, epoch_start);
                    assert_eq!(
                        offset_near(sequence, epoch_start, near),
                        offset,
                        "start {epoch_start} near {near} delta {delta}"
                    );
                }
            }
        }
    }

    #[test]
    fn offset_near_never_returns_an_offset_before_the_epoch() {
        // Near the epoch start a "previous" sequence would be before it: take the next.
        let found = offset_near(Sequence(i32::MAX), 50, 50);
        assert_eq!(found, 50 + i64::from(i32::MAX));
    }
}
