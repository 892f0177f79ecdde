//! A device frame's admission and answer, pure: every decision between "a whole frame
//! was read from a stream" and "these bytes go back", with the time as an argument.
//! The shell (`shell::quic::process_frame`) reads the frame, calls [`admit`], carries
//! out the appends it asks for, and calls [`answer`] with their results; it decides
//! nothing.
//!
//! The checks, in order (the first that fails answers the frame):
//! 1. the frame itself (`protocol::check_produce`: layout, limits, UTF-8, ...);
//! 2. the stream's order: after a retryable failure on the stream, later frames are
//!    refused with the same error until the device resends a frame it already sent
//!    (a sequence at or below the highest refused one), so a device that resends in
//!    sequence order never has a later frame stored before an earlier one;
//! 3. the topic exists; the device may write it (`quic.topics_allowed`);
//! 4. the device's record quota (a retryable refusal: it also starts refusing);
//! 5. routing: the records go to their partitions (`session::route`), stamped with the
//!    device and sequence headers.
//!
//! The answer to an appended frame is an ack naming every record's partition and
//! offset, or the first failure (a retryable one starts refusing, as above).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::protocol::{self, AnswerFrame, ErrorCode, FrameLimits};
use crate::quota::RecordQuota;
use crate::session::{self, KeyHash, PartitionRun};

/// Why an append was not done, as the device is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendFailure {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: u32,
}

/// What a stream's frames must respect to keep their order (see the module docs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamOrder {
    /// Set by a retryable failure: (code, retry_after_ms) later frames are refused with.
    refusing: Option<(ErrorCode, u32)>,
    /// The highest sequence failed or refused since `refusing` was set.
    refused_sequence_max: u64,
}

impl StreamOrder {
    /// Later frames are refused with `code` until the device resends from `sequence`.
    fn refuse_from(&mut self, sequence: u64, code: ErrorCode, retry_after_ms: u32) {
        self.refusing = Some((code, retry_after_ms));
        self.refused_sequence_max = sequence;
    }

    /// The refusal `sequence` gets, if the stream is refusing; a resent frame (at or
    /// below the highest refused sequence) ends the refusing.
    fn refusal_for(&mut self, sequence: u64) -> Option<(ErrorCode, u32)> {
        let refusing = self.refusing?;
        if sequence <= self.refused_sequence_max {
            self.refusing = None;
            return None;
        }
        self.refused_sequence_max = sequence;
        Some(refusing)
    }

    pub fn is_refusing(&self) -> bool {
        self.refusing.is_some()
    }
}

/// The rules a frame is admitted under: the config's topics and the device's live
/// settings (a SIGHUP may change the allow-list and quota between two frames).
pub struct Rules<'a> {
    pub device: &'a str,
    /// Topic name -> (partitions, key hash).
    pub topics: &'a HashMap<String, (u32, KeyHash)>,
    /// `None`: every topic.
    pub topics_allowed: Option<&'a HashSet<String>>,
    /// For the quota refusal's message.
    pub device_records_per_s_max: u32,
    pub limits: &'a FrameLimits,
}

/// What to do with a frame.
#[derive(Debug)]
pub enum Admission {
    /// Answer at once; nothing is appended.
    Answer(AnswerFrame),
    /// Append every run to its partition of `topic`, then [`answer`] with the results
    /// (in the runs' order).
    Append { sequence: u64, topic: String, runs: Vec<PartitionRun> },
}

/// Decides what becomes of one frame read from a stream whose order is `order`,
/// taking from the device's `quota` (if it has one) at `now`.
pub fn admit(
    frame: &[u8],
    rules: &Rules<'_>,
    order: &mut StreamOrder,
    quota: Option<&mut RecordQuota>,
    now: Instant,
) -> Admission {
    let produce = match protocol::check_produce(frame, rules.limits) {
        Ok(produce) => produce,
        Err(error) => {
            return Admission::Answer(protocol::error_frame(
                protocol::sequence_of_unchecked(frame),
                error.code(),
                &error.to_string(),
                0,
            ))
        }
    };
    let sequence = produce.sequence;
    let device = rules.device;
    if let Some((code, retry_after_ms)) = order.refusal_for(sequence) {
        return Admission::Answer(protocol::error_frame(
            sequence,
            code,
            "an earlier frame on this stream was not stored: resend the frames in sequence order",
            retry_after_ms,
        ));
    }
    let Some((partitions, key_hash)) = rules.topics.get(&produce.topic) else {
        return Admission::Answer(protocol::error_frame(
            sequence,
            ErrorCode::UnknownTopic,
            &format!("no topic {:?}", produce.topic),
            0,
        ));
    };
    if rules.topics_allowed.is_some_and(|allowed| !allowed.contains(&produce.topic)) {
        return Admission::Answer(protocol::error_frame(
            sequence,
            ErrorCode::TopicNotAllowed,
            &format!("device {device} may not write topic {:?}", produce.topic),
            0,
        ));
    }
    if let Some(Err(wait)) = quota.map(|quota| quota.take(produce.records.len() as u32, now)) {
        let retry_after_ms = u32::try_from(wait.as_millis().max(1)).unwrap_or(u32::MAX);
        order.refuse_from(sequence, ErrorCode::QuotaExceeded, retry_after_ms);
        return Admission::Answer(protocol::error_frame(
            sequence,
            ErrorCode::QuotaExceeded,
            &format!(
                "device {device} is over its quota of {} records/s (quic.device_records_per_s_max)",
                rules.device_records_per_s_max
            ),
            retry_after_ms,
        ));
    }
    let runs = session::route(produce.records, device, sequence, *partitions, *key_hash);
    Admission::Append { sequence, topic: produce.topic, runs }
}

/// The answer to frame `sequence` once its `runs` were appended with `results` (one
/// per run, in order): an ack naming every record's place, or the first failure. Only
/// each run's partition and stretches are read: the shell moves the records themselves
/// to the log.
pub fn answer(
    sequence: u64,
    runs: &[PartitionRun],
    results: Vec<Result<i64, AppendFailure>>,
    order: &mut StreamOrder,
) -> AnswerFrame {
    assert_eq!(runs.len(), results.len(), "one result per run");
    let mut base_offsets = Vec::with_capacity(results.len());
    let mut failure = None;
    for result in results {
        match result {
            Ok(offset) => base_offsets.push(offset),
            Err(error) => {
                failure.get_or_insert(error);
                base_offsets.push(-1);
            }
        }
    }
    match failure {
        Some(failure) => {
            if failure.code.is_retryable() {
                order.refuse_from(sequence, failure.code, failure.retry_after_ms);
            }
            protocol::error_frame(sequence, failure.code, &failure.message, failure.retry_after_ms)
        }
        None => protocol::ack_frame(sequence, session::ack_parts(runs, &base_offsets)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::Record;
    use crate::protocol::{FRAME_LIMITS_V1, KIND_ACK};

    fn frame(sequence: u64, topic: &str, records: usize) -> Vec<u8> {
        let records: Vec<Record> = (0..records)
            .map(|index| Record {
                timestamp_ms: 1_700_000_000_000,
                key: Some(bytes::Bytes::from(format!("key-{index}"))),
                value: Some(bytes::Bytes::from_static(b"value")),
                headers: Vec::new(),
            })
            .collect();
        protocol::encode(&protocol::produce_frame(sequence, topic, &records)).to_vec()
    }

    struct World {
        topics: HashMap<String, (u32, KeyHash)>,
        allowed: HashSet<String>,
    }

    impl World {
        fn new() -> World {
            let mut topics = HashMap::new();
            topics.insert("telemetry".to_owned(), (4, KeyHash::Crc32c));
            topics.insert("alarms".to_owned(), (1, KeyHash::Crc32c));
            World { topics, allowed: ["telemetry".to_owned()].into_iter().collect() }
        }

        fn rules(&self, allow_list: bool) -> Rules<'_> {
            Rules {
                device: "dev-1",
                topics: &self.topics,
                topics_allowed: allow_list.then_some(&self.allowed),
                device_records_per_s_max: 10,
                limits: &FRAME_LIMITS_V1,
            }
        }
    }

    fn refused(admission: &Admission) -> Option<(u64, ErrorCode)> {
        match admission {
            Admission::Answer(answer) => Some((answer.sequence, ErrorCode::from_u16(answer.error_code).unwrap())),
            Admission::Append { .. } => None,
        }
    }

    #[test]
    fn a_good_frame_is_routed_and_acked_with_every_records_place() {
        let world = World::new();
        let mut order = StreamOrder::default();
        let admission = admit(&frame(7, "telemetry", 5), &world.rules(true), &mut order, None, Instant::now());
        let Admission::Append { sequence, topic, runs } = admission else { panic!("{admission:?}") };
        assert_eq!((sequence, topic.as_str()), (7, "telemetry"));
        assert_eq!(runs.iter().map(|run| run.records.len()).sum::<usize>(), 5);
        let results = runs.iter().map(|run| Ok(100 * i64::from(run.partition))).collect();
        let ack = answer(7, &runs, results, &mut order);
        assert_eq!((ack.kind, ack.sequence), (KIND_ACK, 7));
        assert_eq!(ack.parts.iter().map(|part| part.record_count as usize).sum::<usize>(), 5);
        assert!(!order.is_refusing());
    }

    #[test]
    fn bad_frames_unknown_and_forbidden_topics_are_answered_without_an_append() {
        let world = World::new();
        let mut order = StreamOrder::default();
        let now = Instant::now();
        let mut garbled = frame(9, "telemetry", 1);
        let last = garbled.len() - 1;
        garbled[last] ^= 0xff;
        assert!(matches!(
            refused(&admit(&garbled, &world.rules(false), &mut order, None, now)),
            Some((_, ErrorCode::MalformedFrame))
        ));
        assert_eq!(
            refused(&admit(&frame(10, "nope", 1), &world.rules(false), &mut order, None, now)),
            Some((10, ErrorCode::UnknownTopic))
        );
        assert_eq!(
            refused(&admit(&frame(11, "alarms", 1), &world.rules(true), &mut order, None, now)),
            Some((11, ErrorCode::TopicNotAllowed))
        );
        assert!(refused(&admit(&frame(12, "alarms", 1), &world.rules(false), &mut order, None, now)).is_none());
        assert!(!order.is_refusing(), "non-retryable refusals do not hold the stream");
    }

    #[test]
    fn a_retryable_failure_refuses_later_frames_until_the_device_resends_in_order() {
        let world = World::new();
        let rules = world.rules(false);
        let mut order = StreamOrder::default();
        let now = Instant::now();
        let Admission::Append { runs, .. } = admit(&frame(1, "telemetry", 3), &rules, &mut order, None, now) else {
            panic!()
        };
        let backpressure =
            AppendFailure { code: ErrorCode::Backpressure, message: "behind".into(), retry_after_ms: 50 };
        let results: Vec<_> = runs.iter().map(|_| Err(backpressure.clone())).collect();
        let failed = answer(1, &runs, results, &mut order);
        assert_eq!((failed.error_code, failed.retry_after_ms), (ErrorCode::Backpressure as u16, 50));
        // Frames 2 and 3 were already in flight: refused with the same error.
        assert_eq!(
            refused(&admit(&frame(2, "telemetry", 1), &rules, &mut order, None, now)),
            Some((2, ErrorCode::Backpressure))
        );
        assert_eq!(
            refused(&admit(&frame(3, "telemetry", 1), &rules, &mut order, None, now)),
            Some((3, ErrorCode::Backpressure))
        );
        // The device resends from frame 1: admitted, and so are 2 and 3 after it.
        for sequence in 1..=3 {
            assert!(refused(&admit(&frame(sequence, "telemetry", 1), &rules, &mut order, None, now)).is_none());
        }
        // A failure that retrying cannot fix does not hold the stream.
        let Admission::Append { runs, .. } = admit(&frame(4, "telemetry", 1), &rules, &mut order, None, now) else {
            panic!()
        };
        let reused = AppendFailure { code: ErrorCode::SequenceReused, message: "reused".into(), retry_after_ms: 0 };
        answer(4, &runs, runs.iter().map(|_| Err(reused.clone())).collect(), &mut order);
        assert!(!order.is_refusing());
    }

    #[test]
    fn over_quota_is_refused_with_the_wait_and_holds_the_stream() {
        let world = World::new();
        let rules = world.rules(false);
        let mut order = StreamOrder::default();
        let start = Instant::now();
        let mut quota = RecordQuota::for_connection(10, 1, 10).expect("a quota");
        assert!(refused(&admit(&frame(1, "telemetry", 10), &rules, &mut order, Some(&mut quota), start)).is_none());
        let admission = admit(&frame(2, "telemetry", 5), &rules, &mut order, Some(&mut quota), start);
        let Admission::Answer(answer) = admission else { panic!("over quota: {admission:?}") };
        assert_eq!(answer.error_code, ErrorCode::QuotaExceeded as u16);
        assert!(answer.retry_after_ms >= 400, "5 records at 10/s: {} ms", answer.retry_after_ms);
        assert!(order.is_refusing());
    }
}
