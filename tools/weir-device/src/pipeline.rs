//! The device client's logic as a deterministic state machine, in the style of
//! quinn-proto: no sockets, no clock, no tasks. Inputs are `submit`, `handle_*` with
//! `now` as an argument; outputs are `poll_output`, `poll_connect`, `poll_transmit` and
//! `poll_timeout`. The tokio shell in `client.rs` executes what it asks and decides
//! nothing, so every retry path here is unit-tested without a network.
//!
//! Invariants:
//! - A frame is encoded once; every resend writes the very same bytes under the same
//!   sequence (the server recognises a resend by (device, sequence)).
//! - Sequences are strictly increasing in the order frames are formed, and a sequence
//!   is only used once the shell has persisted a reservation covering it.
//! - Frames are (re)sent in sequence order: a frame waiting for its retry time holds
//!   back every later frame that is not yet on the wire, so a retry cannot overtake.
//!   After a retryable error, nothing is written until every frame sent behind the
//!   failed one is answered: weir refuses those (it stores a stream's frames only in
//!   order), and the resends then go out in sequence order again. So with several
//!   frames in flight, the log still holds a device's frames in sequence order.
//! - Everything is bounded: `frames_in_flight_max` frames formed and unanswered, the
//!   records the shell admitted (it holds `queue_records_max` permits, released through
//!   `Output::Release`), and `attempts_max` tries per frame (failed connects count;
//!   connects the server refused for load, CONNECTION_REFUSED, count one try per
//!   `REFUSALS_PER_TRY`: a fleet reconnecting after a restart is refused often while
//!   weir admits its handshakes a core-load at a time, and must not give up for it).
//! - Reconnects wait a capped exponential backoff of the consecutive failures with the
//!   profile's jitter (default 1.0, full jitter: uniform in [0, cap]), so a fleet that
//!   lost its server at once comes back spread over the backoff, not in one wave.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir_protocol::batch::Record;
use weir_protocol::{
    check_answer, encode, produce_frame, with_length_prefix, AckPart, ErrorCode, FRAME_LIMITS_V1, KIND_ACK,
};

use crate::batch::{Batch, Batcher, Segment};
use crate::error::{DeviceError, LinkError};
use crate::profile::DeviceProfile;
use crate::retry::{Backoff, Jitter};
use crate::{Ack, RecordAck, Sequence, WaiterId};

/// Connects refused for load (CONNECTION_REFUSED) that count as one try of a frame.
pub const REFUSALS_PER_TRY: u32 = 8;

/// What the pipeline needs from a profile.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub addresses: Vec<SocketAddr>,
    pub records_max: usize,
    pub bytes_max: usize,
    pub linger: Duration,
    pub frames_in_flight_max: usize,
    pub attempts_max: u32,
    pub backoff: Backoff,
    pub answer_timeout: Duration,
    pub sequence_reserve: u64,
}

impl PipelineSettings {
    pub fn from_profile(profile: &DeviceProfile) -> PipelineSettings {
        PipelineSettings {
            addresses: profile.server_addresses(),
            records_max: profile.batch.records_max,
            bytes_max: profile.batch.bytes_max as usize,
            linger: Duration::from_millis(profile.batch.linger_ms),
            frames_in_flight_max: profile.flow.frames_in_flight_max,
            attempts_max: profile.retry.attempts_max,
            backoff: Backoff {
                ms_min: profile.retry.backoff_ms_min,
                ms_max: profile.retry.backoff_ms_max,
                jitter: profile.retry.jitter,
            },
            answer_timeout: Duration::from_millis(profile.timeouts.answer_ms),
            sequence_reserve: profile.sequence.reserve,
        }
    }
}

/// Something the shell must do.
#[derive(Debug)]
pub enum Output {
    /// Hand a send its result.
    Deliver { waiter: WaiterId, result: Result<Ack, DeviceError> },
    /// These records are resolved: give their queue permits back.
    Release { records: usize },
    /// Persist "the next sequence is `end`" durably, then call
    /// `handle_sequences_reserved(end)` (or `handle_sequences_failed`).
    ReserveSequences { end: Sequence },
    /// Close the current connection (the pipeline already treats it as lost).
    CloseConnection { cause: LinkError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    Unsent,
    Sent { at: Instant },
}

#[derive(Debug)]
struct Frame {
    sequence: Sequence,
    /// The length-prefixed frame, exactly as written on every try.
    bytes: Bytes,
    record_count: u32,
    segments: Vec<Segment>,
    attempts: u32,
    /// Connects refused for load while this frame waited (`REFUSALS_PER_TRY`).
    refusals: u32,
    state: FrameState,
    not_before: Instant,
    last_failure: Option<LinkError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connected,
    Connecting,
    Disconnected { retry_at: Instant },
}

#[derive(Debug)]
struct Waiter {
    results: Vec<RecordAck>,
    filled: usize,
}

#[derive(Debug)]
pub struct Pipeline {
    settings: PipelineSettings,
    batcher: Batcher,
    /// Formed and unresolved frames, in sequence order.
    frames: VecDeque<Frame>,
    /// Sequences written on the current connection and not yet answered, in order.
    awaiting: VecDeque<Sequence>,
    waiters: HashMap<WaiterId, Waiter>,
    waiter_next: u64,
    sequence_next: u64,
    sequence_reserved_end: u64,
    sequence_reserving: bool,
    link: Link,
    address_index: usize,
    failures_consecutive: u32,
    jitter: Jitter,
    outputs: VecDeque<Output>,
}

impl Pipeline {
    /// `sequence_start` is the first sequence to use; with `persistent`, sequences are
    /// used only under a reservation (see `Output::ReserveSequences`). `connected_to`
    /// is the index of the address the shell already holds a connection to, if any.
    pub fn new(
        settings: PipelineSettings,
        sequence_start: Sequence,
        persistent: bool,
        seed: u64,
        connected_to: Option<usize>,
        now: Instant,
    ) -> Pipeline {
        assert!(!settings.addresses.is_empty());
        assert!(connected_to.is_none_or(|index| index < settings.addresses.len()));
        assert!(settings.frames_in_flight_max >= 1 && settings.attempts_max >= 1 && settings.sequence_reserve >= 1);
        Pipeline {
            batcher: Batcher::new(settings.records_max, settings.bytes_max, settings.linger),
            frames: VecDeque::with_capacity(settings.frames_in_flight_max),
            awaiting: VecDeque::with_capacity(settings.frames_in_flight_max),
            waiters: HashMap::new(),
            waiter_next: 0,
            sequence_next: sequence_start.0,
            sequence_reserved_end: if persistent { sequence_start.0 } else { u64::MAX },
            sequence_reserving: false,
            link: if connected_to.is_some() { Link::Connected } else { Link::Disconnected { retry_at: now } },
            address_index: connected_to.unwrap_or(0),
            failures_consecutive: 0,
            jitter: Jitter::new(seed),
            outputs: VecDeque::new(),
            settings,
        }
    }

    /// Queues the records of one send (checked with `batch::check_record`, and covered
    /// by queue permits the shell holds); its result comes as `Output::Deliver`.
    pub fn submit(&mut self, topic: &Arc<str>, records: Vec<Record>, now: Instant) -> WaiterId {
        assert!(!records.is_empty());
        let waiter = WaiterId(self.waiter_next);
        self.waiter_next += 1;
        let waiter_state = Waiter { results: vec![RecordAck::default(); records.len()], filled: 0 };
        self.waiters.insert(waiter, waiter_state);
        self.batcher.push(waiter, topic, records, now);
        self.form_frames(now);
        waiter
    }

    /// Closes every open batch now instead of at the end of its linger.
    pub fn flush(&mut self, now: Instant) {
        self.batcher.close_all();
        self.form_frames(now);
    }

    pub fn handle_connected(&mut self, now: Instant) {
        assert!(self.link == Link::Connecting);
        assert!(self.awaiting.is_empty());
        self.link = Link::Connected;
        self.form_frames(now);
    }

    pub fn handle_connect_failed(&mut self, cause: LinkError, now: Instant) {
        assert!(self.link == Link::Connecting);
        self.disconnect(cause.clone(), now);
        if cause.is_credentials_refused() {
            return;
        }
        // A failed connect is a try for every frame waiting for it, so a send is bounded
        // even when no server can be reached; a refusal for load is a fraction of one.
        let refused = cause.is_refused();
        let mut index = 0;
        while index < self.frames.len() {
            let frame = &mut self.frames[index];
            frame.last_failure = Some(cause.clone());
            if refused {
                frame.refusals += 1;
                if !frame.refusals.is_multiple_of(REFUSALS_PER_TRY) {
                    index += 1;
                    continue;
                }
            }
            frame.attempts += 1;
            if frame.attempts >= self.settings.attempts_max {
                self.fail_exhausted(index);
            } else {
                index += 1;
            }
        }
    }

    /// The shell lost the connection (a read or write failed, or it ended).
    pub fn handle_connection_lost(&mut self, cause: LinkError, now: Instant) {
        if self.link == Link::Connected {
            self.disconnect(cause, now);
        }
    }

    /// One answer's archive bytes (without the length prefix), in stream order.
    pub fn handle_answer(&mut self, archive: &[u8], now: Instant) {
        if self.link != Link::Connected {
            return;
        }
        let Some(expected) = self.awaiting.pop_front() else {
            return self.violation("an answer for no outstanding frame".to_owned(), now);
        };
        let answer = match check_answer(archive, &FRAME_LIMITS_V1) {
            Ok(answer) => answer,
            Err(error) => return self.violation(format!("unusable answer: {error}"), now),
        };
        // Answers come in stream order, so this one is for `expected`; a server that could
        // not read a frame's sequence answers its error with sequence 0.
        let unreadable = answer.kind != KIND_ACK && answer.sequence == 0;
        if answer.sequence != expected.0 && !unreadable {
            return self.violation(
                format!("answer for sequence {} where {expected} was next on the stream", answer.sequence),
                now,
            );
        }
        let index = self.frame_index(expected).expect("awaited frames are held until answered");
        self.failures_consecutive = 0;
        if answer.kind == KIND_ACK {
            let offsets = match ack_offsets(&answer.parts, self.frames[index].record_count) {
                Ok(offsets) => offsets,
                Err(why) => return self.violation(format!("ack of sequence {expected}: {why}"), now),
            };
            let frame = self.frames.remove(index).expect("index is in range");
            self.deliver_ack(&frame, &offsets);
            self.outputs.push_back(Output::Release { records: frame.record_count as usize });
        } else {
            let code = ErrorCode::from_u16(answer.error_code).expect("check_answer refuses unknown codes");
            let message = String::from_utf8_lossy(&answer.message).into_owned();
            if code.is_retryable() {
                let frame = &mut self.frames[index];
                let wait = Duration::from_millis(u64::from(answer.retry_after_ms))
                    + self.settings.backoff.delay(frame.attempts, self.jitter.unit());
                frame.state = FrameState::Unsent;
                frame.not_before = now + wait;
                frame.last_failure =
                    Some(LinkError::Retryable { code, message, retry_after_ms: answer.retry_after_ms });
                if code == ErrorCode::ShuttingDown {
                    let cause = self.frames[index].last_failure.clone().expect("just set");
                    self.lose(cause, now);
                }
            } else {
                let frame = self.frames.remove(index).expect("index is in range");
                let error = DeviceError::Refused { sequence: frame.sequence, code, message };
                self.fail_frame(&frame, &error);
            }
        }
        self.form_frames(now);
    }

    /// Call at (or after) `poll_timeout`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link == Link::Connected {
            if let Some(sent_at) = self.oldest_awaiting_sent_at() {
                if sent_at + self.settings.answer_timeout <= now {
                    let address = self.current_address();
                    let timeout_ms = self.settings.answer_timeout.as_millis() as u64;
                    self.lose(LinkError::AnswerTimeout { address, timeout_ms }, now);
                }
            }
        }
        self.form_frames(now);
    }

    pub fn handle_sequences_reserved(&mut self, end: Sequence, now: Instant) {
        assert!(self.sequence_reserving && end.0 > self.sequence_next);
        self.sequence_reserving = false;
        self.sequence_reserved_end = end.0;
        self.form_frames(now);
    }

    /// The reservation could not be persisted: the batches waiting for a sequence fail.
    pub fn handle_sequences_failed(&mut self, error: DeviceError) {
        assert!(self.sequence_reserving);
        self.sequence_reserving = false;
        for batch in self.batcher.take_all() {
            self.fail_batch(&batch, &error);
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Whether `poll_output` has something (`poll_transmit` can fail a frame).
    pub fn has_output(&self) -> bool {
        !self.outputs.is_empty()
    }

    /// The address to connect to, when the pipeline has frames to send and no link.
    pub fn poll_connect(&mut self, now: Instant) -> Option<SocketAddr> {
        match self.link {
            Link::Disconnected { retry_at } if !self.frames.is_empty() && retry_at <= now => {
                self.link = Link::Connecting;
                Some(self.current_address())
            }
            _ => None,
        }
    }

    /// The next frame to write on the current connection's stream.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        if self.link != Link::Connected {
            return None;
        }
        let mut index = 0;
        while index < self.frames.len() {
            let frame = &self.frames[index];
            if frame.state != FrameState::Unsent {
                index += 1;
                continue;
            }
            if frame.not_before > now {
                return None; // keep the order: nothing overtakes a frame waiting to retry
            }
            if self.frames.iter().skip(index + 1).any(|later| later.state != FrameState::Unsent) {
                // Frames behind this one are on the wire: wait for their answers (weir
                // refuses them after this one's failure), then resend all in order.
                return None;
            }
            if frame.attempts >= self.settings.attempts_max {
                self.fail_exhausted(index);
                continue;
            }
            let frame = &mut self.frames[index];
            frame.attempts += 1;
            frame.state = FrameState::Sent { at: now };
            self.awaiting.push_back(frame.sequence);
            return Some(frame.bytes.clone());
        }
        None
    }

    /// When `handle_timeout` must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // A batch's linger matters only when a frame slot is free (see `form_frames`).
        let mut deadline = self.has_frame_room().then(|| self.batcher.deadline()).flatten();
        let mut consider = |candidate: Option<Instant>| {
            deadline = match (deadline, candidate) {
                (Some(current), Some(candidate)) => Some(current.min(candidate)),
                (current, candidate) => current.or(candidate),
            }
        };
        match self.link {
            Link::Connected => {
                consider(self.oldest_awaiting_sent_at().map(|at| at + self.settings.answer_timeout));
                consider(
                    self.frames.iter().find(|frame| frame.state == FrameState::Unsent).map(|frame| frame.not_before),
                );
            }
            Link::Disconnected { retry_at } if !self.frames.is_empty() => consider(Some(retry_at)),
            _ => {}
        }
        deadline
    }

    /// Nothing queued, batched or unanswered.
    pub fn is_idle(&self) -> bool {
        self.frames.is_empty() && self.batcher.is_empty()
    }

    /// Frames formed and not yet resolved.
    pub fn frames_pending(&self) -> usize {
        self.frames.len()
    }

    fn current_address(&self) -> SocketAddr {
        self.settings.addresses[self.address_index]
    }

    fn frame_index(&self, sequence: Sequence) -> Option<usize> {
        self.frames.iter().position(|frame| frame.sequence == sequence)
    }

    fn oldest_awaiting_sent_at(&self) -> Option<Instant> {
        let sequence = *self.awaiting.front()?;
        match self.frames[self.frame_index(sequence)?].state {
            FrameState::Sent { at } => Some(at),
            FrameState::Unsent => unreachable!("an awaited frame is sent"),
        }
    }

    fn has_frame_room(&self) -> bool {
        self.frames.len() < self.settings.frames_in_flight_max
    }

    /// Closes the batches whose linger ran out, then encodes closed batches into frames
    /// while there is room and a sequence. Batches are closed by their linger only when
    /// a frame slot is free: while every slot is taken an open batch keeps growing (up
    /// to `records_max` / `bytes_max`), so a device whose round trip is longer than
    /// `frames_in_flight_max` records' worth of its rate sends fuller frames instead of
    /// falling behind at one record per frame.
    fn form_frames(&mut self, now: Instant) {
        if self.has_frame_room() {
            self.batcher.close_due(now);
        }
        while self.has_frame_room() && self.batcher.has_closed() {
            if self.sequence_next >= self.sequence_reserved_end {
                if !self.sequence_reserving {
                    self.sequence_reserving = true;
                    let end = self.sequence_next.saturating_add(self.settings.sequence_reserve);
                    self.outputs.push_back(Output::ReserveSequences { end: Sequence(end) });
                }
                return;
            }
            let batch = self.batcher.pop_closed().expect("has_closed");
            let sequence = Sequence(self.sequence_next);
            self.sequence_next += 1;
            assert!(self.frames.back().is_none_or(|last| last.sequence < sequence));
            let archive = encode(&produce_frame(sequence.0, &batch.topic, &batch.records));
            assert!(archive.len() <= batch.frame_bytes && archive.len() <= self.settings.bytes_max);
            self.frames.push_back(Frame {
                sequence,
                bytes: Bytes::from(with_length_prefix(&archive)),
                record_count: u32::try_from(batch.records.len()).expect("records_max fits u32"),
                segments: batch.segments,
                attempts: 0,
                refusals: 0,
                state: FrameState::Unsent,
                not_before: now,
                last_failure: None,
            });
        }
    }

    /// The link is gone (lost, timed out, refused): every frame on it goes back to
    /// unsent, and the next connect waits out the backoff on the next address.
    fn disconnect(&mut self, cause: LinkError, now: Instant) {
        self.awaiting.clear();
        for frame in self.frames.iter_mut() {
            if let FrameState::Sent { .. } = frame.state {
                frame.state = FrameState::Unsent;
                frame.last_failure = Some(cause.clone());
            }
        }
        self.failures_consecutive = self.failures_consecutive.saturating_add(1);
        self.address_index = (self.address_index + 1) % self.settings.addresses.len();
        let retry_at = now + self.settings.backoff.delay(self.failures_consecutive, self.jitter.unit());
        self.link = Link::Disconnected { retry_at };
        if cause.is_credentials_refused() {
            // No retry can fix refused credentials: fail everything now.
            let error = DeviceError::CredentialsRefused(cause);
            while let Some(frame) = self.frames.pop_front() {
                self.fail_frame(&frame, &error);
            }
            for batch in self.batcher.take_all() {
                self.fail_batch(&batch, &error);
            }
        }
    }

    /// The pipeline itself gives up on the connection.
    fn lose(&mut self, cause: LinkError, now: Instant) {
        self.disconnect(cause.clone(), now);
        self.outputs.push_back(Output::CloseConnection { cause });
    }

    fn violation(&mut self, why: String, now: Instant) {
        let address = self.current_address();
        self.lose(LinkError::Protocol { address, why }, now);
    }

    fn fail_exhausted(&mut self, index: usize) {
        let frame = self.frames.remove(index).expect("index is in range");
        let last = frame.last_failure.clone().expect("a frame is retried only after a failure");
        let error = DeviceError::RetriesExhausted { sequence: frame.sequence, attempts: frame.attempts, last };
        self.fail_frame(&frame, &error);
    }

    fn fail_segments(&mut self, segments: &[Segment], records: usize, error: &DeviceError) {
        for segment in segments {
            if self.waiters.remove(&segment.waiter).is_some() {
                self.outputs.push_back(Output::Deliver { waiter: segment.waiter, result: Err(error.clone()) });
            }
        }
        self.outputs.push_back(Output::Release { records });
    }

    fn fail_frame(&mut self, frame: &Frame, error: &DeviceError) {
        self.fail_segments(&frame.segments, frame.record_count as usize, error);
    }

    fn fail_batch(&mut self, batch: &Batch, error: &DeviceError) {
        self.fail_segments(&batch.segments, batch.records.len(), error);
    }

    fn deliver_ack(&mut self, frame: &Frame, offsets: &[(u32, i64)]) {
        let mut record_index = 0u32;
        for segment in &frame.segments {
            let Some(waiter) = self.waiters.get_mut(&segment.waiter) else {
                record_index += segment.count;
                continue; // that send already failed through another of its frames
            };
            for index_in_segment in 0..segment.count {
                let (partition, offset) = offsets[record_index as usize];
                waiter.results[(segment.first_in_send + index_in_segment) as usize] =
                    RecordAck { sequence: frame.sequence, record_index, partition, offset };
                record_index += 1;
            }
            waiter.filled += segment.count as usize;
            assert!(waiter.filled <= waiter.results.len());
            if waiter.filled == waiter.results.len() {
                let waiter_state = self.waiters.remove(&segment.waiter).expect("present");
                let ack = Ack { records: waiter_state.results };
                self.outputs.push_back(Output::Deliver { waiter: segment.waiter, result: Ok(ack) });
            }
        }
        assert_eq!(record_index, frame.record_count);
    }
}

/// The (partition, offset) of each record of a frame from an ack's parts, which must
/// cover the frame's records exactly once.
pub fn ack_offsets(parts: &[AckPart], record_count: u32) -> Result<Vec<(u32, i64)>, String> {
    let mut offsets: Vec<Option<(u32, i64)>> = vec![None; record_count as usize];
    for part in parts {
        let end = part.first_record.checked_add(part.record_count).filter(|end| *end <= record_count);
        let Some(end) = end else {
            return Err(format!(
                "part {}+{} outside the frame's {record_count} records",
                part.first_record, part.record_count
            ));
        };
        if part.base_offset < 0 || part.base_offset.checked_add(i64::from(part.record_count)).is_none() {
            return Err(format!("part base offset {} out of range", part.base_offset));
        }
        for (delta, index) in (part.first_record..end).enumerate() {
            let slot = &mut offsets[index as usize];
            if slot.is_some() {
                return Err(format!("record {index} acknowledged twice"));
            }
            *slot = Some((part.partition, part.base_offset + delta as i64));
        }
    }
    offsets
        .into_iter()
        .enumerate()
        .map(|(index, slot)| slot.ok_or(format!("record {index} not acknowledged")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::{ack_frame, check_produce, encode, error_frame};

    fn settings() -> PipelineSettings {
        PipelineSettings {
            addresses: vec!["127.0.0.1:4433".parse().unwrap(), "127.0.0.1:4434".parse().unwrap()],
            records_max: 4,
            bytes_max: 64 << 10,
            linger: Duration::from_millis(5),
            frames_in_flight_max: 3,
            attempts_max: 4,
            backoff: Backoff { ms_min: 10, ms_max: 100, jitter: 0.0 },
            answer_timeout: Duration::from_millis(1000),
            sequence_reserve: 100,
        }
    }

    fn records(count: usize) -> Vec<Record> {
        (0..count)
            .map(|index| Record {
                timestamp_ms: index as i64,
                key: Some(Bytes::from_static(b"k")),
                value: Some(Bytes::from(format!("v{index}"))),
                headers: vec![],
            })
            .collect()
    }

    fn topic() -> Arc<str> {
        "telemetry".into()
    }

    type Delivered = Vec<(WaiterId, Result<Ack, DeviceError>)>;

    /// Drains the outputs into (deliveries, records released, everything else).
    fn drain(pipeline: &mut Pipeline) -> (Delivered, usize, Vec<Output>) {
        let (mut delivered, mut released, mut others) = (Vec::new(), 0, Vec::new());
        while let Some(output) = pipeline.poll_output() {
            match output {
                Output::Deliver { waiter, result } => delivered.push((waiter, result)),
                Output::Release { records } => released += records,
                other => others.push(other),
            }
        }
        (delivered, released, others)
    }

    fn transmit_all(pipeline: &mut Pipeline, now: Instant) -> Vec<Bytes> {
        std::iter::from_fn(|| pipeline.poll_transmit(now)).collect()
    }

    fn sequence_of(frame: &Bytes) -> u64 {
        check_produce(&frame[4..], &FRAME_LIMITS_V1).unwrap().sequence
    }

    fn ack_all(sequence: u64, count: u32, base: i64) -> Vec<u8> {
        let parts =
            vec![AckPart { base_offset: base, partition: 1, first_record: 0, record_count: count, reserved: 0 }];
        encode(&ack_frame(sequence, parts)).to_vec()
    }

    #[test]
    fn records_arriving_while_every_frame_slot_is_taken_fill_one_frame_not_one_each() {
        // Regression (found through weir-relay's 200 ms delay): batches closed by their
        // linger while the window was full waited as one-record frames, so a device
        // could send at most frames_in_flight_max records per round trip and fell
        // further behind every second. A batch now keeps growing until a slot frees.
        let now = Instant::now();
        let settings = PipelineSettings { frames_in_flight_max: 1, records_max: 16, ..settings() };
        let mut pipeline = Pipeline::new(settings, Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(1), now);
        pipeline.flush(now);
        assert_eq!(transmit_all(&mut pipeline, now).len(), 1);
        let mut at = now;
        for _ in 0..6 {
            // The shell: run every timeout due by now, then the next send comes.
            while let Some(deadline) = pipeline.poll_timeout().filter(|deadline| *deadline <= at) {
                pipeline.handle_timeout(deadline);
            }
            assert!(pipeline.poll_transmit(at).is_none(), "the window is full");
            if at < now + Duration::from_millis(200) {
                at += Duration::from_millis(40); // each send's linger runs out before the next
                pipeline.submit(&topic(), records(1), at);
            }
        }
        assert_eq!(pipeline.frames_pending(), 1, "nothing formed while no slot is free");
        pipeline.handle_answer(&ack_all(1, 1, 0), at);
        let frames = transmit_all(&mut pipeline, at);
        assert_eq!(frames.len(), 1);
        let checked = check_produce(&frames[0][4..], &FRAME_LIMITS_V1).unwrap();
        assert_eq!((checked.sequence, checked.records.len()), (2, 5), "the five sends share one frame");
    }

    #[test]
    fn concurrent_sends_share_a_frame_and_each_gets_its_offsets() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(10), false, 1, Some(0), now);
        let first = pipeline.submit(&topic(), records(1), now);
        let second = pipeline.submit(&topic(), records(2), now);
        assert!(pipeline.poll_transmit(now).is_none(), "lingering");
        assert_eq!(pipeline.poll_timeout(), Some(now + Duration::from_millis(5)));
        let later = now + Duration::from_millis(5);
        pipeline.handle_timeout(later);
        let frames = transmit_all(&mut pipeline, later);
        assert_eq!(frames.len(), 1);
        let checked = check_produce(&frames[0][4..], &FRAME_LIMITS_V1).unwrap();
        assert_eq!((checked.sequence, checked.records.len()), (10, 3));
        pipeline.handle_answer(&ack_all(10, 3, 500), later);
        let (delivered, released, _) = drain(&mut pipeline);
        assert_eq!(released, 3);
        let acks: HashMap<WaiterId, Ack> =
            delivered.into_iter().map(|(waiter, result)| (waiter, result.unwrap())).collect();
        let offsets =
            |waiter| acks[&waiter].records.iter().map(|ack| (ack.record_index, ack.offset)).collect::<Vec<_>>();
        assert_eq!(offsets(first), [(0, 500)]);
        assert_eq!(offsets(second), [(1, 501), (2, 502)]);
        assert!(pipeline.is_idle());
    }

    #[test]
    fn a_large_send_spans_frames_with_increasing_sequences_bounded_in_flight() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(0), false, 1, Some(0), now);
        let waiter = pipeline.submit(&topic(), records(18), now);
        pipeline.flush(now);
        let frames = transmit_all(&mut pipeline, now);
        assert_eq!(frames.iter().map(sequence_of).collect::<Vec<_>>(), [0, 1, 2], "frames_in_flight_max is 3");
        let mut base = 0;
        for sequence in 0..5u64 {
            let count = if sequence == 4 { 2 } else { 4 };
            pipeline.handle_answer(&ack_all(sequence, count, base), now);
            base += i64::from(count);
            let more = transmit_all(&mut pipeline, now);
            assert!(more.iter().map(sequence_of).all(|next| next > sequence));
        }
        let (delivered, released, _) = drain(&mut pipeline);
        assert_eq!(released, 18);
        let (done, result) = &delivered[0];
        assert_eq!(*done, waiter);
        let ack = result.as_ref().unwrap();
        assert_eq!(ack.records.iter().map(|record| record.offset).collect::<Vec<_>>(), (0..18).collect::<Vec<_>>());
        assert_eq!(ack.records[17].sequence, Sequence(4));
    }

    #[test]
    fn a_lost_answer_resends_the_same_bytes_after_reconnecting_to_the_next_address() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(7), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(2), now);
        pipeline.flush(now);
        let first = transmit_all(&mut pipeline, now);
        let address = "127.0.0.1:4433".parse().unwrap();
        let cause = LinkError::StreamEnded { address };
        pipeline.handle_connection_lost(cause, now);
        assert!(pipeline.poll_transmit(now).is_none());
        assert!(pipeline.poll_connect(now).is_none(), "backoff first");
        let retry_at = now + Duration::from_millis(10);
        assert_eq!(pipeline.poll_timeout(), Some(retry_at));
        assert_eq!(pipeline.poll_connect(retry_at), Some("127.0.0.1:4434".parse().unwrap()));
        pipeline.handle_connected(retry_at);
        let second = transmit_all(&mut pipeline, retry_at);
        assert_eq!(first, second, "same frame bytes, same sequence");
        pipeline.handle_answer(&ack_all(7, 2, 0), retry_at);
        let (delivered, _, _) = drain(&mut pipeline);
        assert!(delivered[0].1.is_ok());
    }

    #[test]
    fn an_answer_timeout_closes_the_connection_and_resends() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(1), now);
        pipeline.flush(now);
        let first = transmit_all(&mut pipeline, now);
        let deadline = now + Duration::from_millis(1000);
        assert_eq!(pipeline.poll_timeout(), Some(deadline));
        pipeline.handle_timeout(deadline);
        let (_, _, others) = drain(&mut pipeline);
        assert!(matches!(others[..], [Output::CloseConnection { cause: LinkError::AnswerTimeout { .. } }]));
        let at = pipeline.poll_timeout().unwrap();
        assert!(pipeline.poll_connect(at).is_some());
        pipeline.handle_connected(at);
        assert_eq!(transmit_all(&mut pipeline, at), first);
    }

    #[test]
    fn a_retryable_error_waits_retry_after_plus_backoff_and_holds_later_frames_back() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(8), now);
        let frames = transmit_all(&mut pipeline, now);
        assert_eq!(frames.len(), 2);
        let backpressure = encode(&error_frame(1, ErrorCode::Backpressure, "partition behind", 200)).to_vec();
        pipeline.handle_answer(&backpressure, now);
        // Sequence 2 is already on the wire; nothing new goes out before sequence 1.
        pipeline.submit(&topic(), records(4), now);
        assert!(pipeline.poll_transmit(now).is_none());
        let resend_at = now + Duration::from_millis(200 + 10);
        assert_eq!(pipeline.poll_timeout(), Some(resend_at));
        assert!(pipeline.poll_transmit(resend_at - Duration::from_millis(1)).is_none());
        pipeline.handle_answer(&ack_all(2, 4, 4), now);
        let resent = transmit_all(&mut pipeline, resend_at);
        assert_eq!(resent.iter().map(sequence_of).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(resent[0], frames[0]);
    }

    #[test]
    fn after_a_retryable_error_nothing_is_written_until_the_frames_behind_it_are_answered() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(12), now);
        let frames = transmit_all(&mut pipeline, now);
        assert_eq!(frames.iter().map(sequence_of).collect::<Vec<_>>(), [1, 2, 3]);
        let refused = |sequence| encode(&error_frame(sequence, ErrorCode::Backpressure, "behind", 20)).to_vec();
        pipeline.handle_answer(&refused(1), now);
        let later = now + Duration::from_secs(5);
        assert!(pipeline.poll_transmit(later).is_none(), "2 and 3 are still on the wire");
        pipeline.handle_answer(&refused(2), later);
        assert!(pipeline.poll_transmit(later).is_none(), "3 is still on the wire");
        pipeline.handle_answer(&refused(3), later);
        let mut resent = Vec::new();
        let mut at = later;
        while resent.len() < 3 {
            resent.extend(transmit_all(&mut pipeline, at));
            at += Duration::from_millis(10);
        }
        assert_eq!(resent.iter().map(sequence_of).collect::<Vec<_>>(), [1, 2, 3], "resent in sequence order");
        assert_eq!(resent, frames, "the very same bytes");
    }

    #[test]
    fn a_non_retryable_error_fails_the_send_with_its_code() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1), false, 1, Some(0), now);
        let waiter = pipeline.submit(&topic(), records(1), now);
        pipeline.flush(now);
        transmit_all(&mut pipeline, now);
        pipeline.handle_answer(&encode(&error_frame(1, ErrorCode::TopicNotAllowed, "no", 0)), now);
        let (delivered, released, _) = drain(&mut pipeline);
        assert_eq!(released, 1);
        assert_eq!(delivered[0].0, waiter);
        let Err(DeviceError::Refused { code, sequence, .. }) = &delivered[0].1 else { panic!("{delivered:?}") };
        assert_eq!((*code, *sequence), (ErrorCode::TopicNotAllowed, Sequence(1)));
    }

    #[test]
    fn retries_are_bounded_and_failed_connects_count() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(1), now);
        pipeline.flush(now);
        let mut at = now;
        let backpressure = encode(&error_frame(1, ErrorCode::DiskFull, "full", 5)).to_vec();
        for _ in 0..2 {
            assert_eq!(transmit_all(&mut pipeline, at).len(), 1);
            pipeline.handle_answer(&backpressure, at);
            at = pipeline.poll_timeout().unwrap();
        }
        // Third try: the connection drops; then a connect fails: 4 tries in all.
        assert_eq!(transmit_all(&mut pipeline, at).len(), 1);
        let address = "127.0.0.1:4433".parse().unwrap();
        pipeline.handle_connection_lost(LinkError::StreamEnded { address }, at);
        at = pipeline.poll_timeout().unwrap();
        assert!(pipeline.poll_connect(at).is_some());
        pipeline.handle_connect_failed(LinkError::ConnectTimeout { address, timeout_ms: 1 }, at);
        let (delivered, released, _) = drain(&mut pipeline);
        assert_eq!(released, 1);
        let Err(DeviceError::RetriesExhausted { attempts: 4, last: LinkError::ConnectTimeout { .. }, .. }) =
            &delivered[0].1
        else {
            panic!("{delivered:?}")
        };
        assert!(pipeline.is_idle());
        assert!(pipeline.poll_connect(at + Duration::from_secs(1)).is_none(), "nothing to send, no reconnect");
    }

    #[test]
    fn a_frame_exhausted_inside_poll_transmit_leaves_its_failure_to_deliver() {
        // Regression: the shell must drain outputs when poll_transmit fails a frame and
        // returns nothing, or the send waits forever.
        let now = Instant::now();
        let settings = PipelineSettings { attempts_max: 1, ..settings() };
        let mut pipeline = Pipeline::new(settings, Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(1), now);
        pipeline.flush(now);
        assert_eq!(transmit_all(&mut pipeline, now).len(), 1);
        pipeline.handle_answer(&encode(&error_frame(1, ErrorCode::QuotaExceeded, "slow down", 1)), now);
        drain(&mut pipeline);
        let later = pipeline.poll_timeout().unwrap();
        assert!(pipeline.poll_transmit(later).is_none());
        assert!(pipeline.has_output());
        let (delivered, released, _) = drain(&mut pipeline);
        assert_eq!(released, 1);
        assert!(matches!(delivered[0].1, Err(DeviceError::RetriesExhausted { attempts: 1, .. })));
    }

    #[test]
    fn an_error_for_an_unreadable_frame_may_carry_sequence_zero() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(40), false, 1, Some(0), now);
        let waiter = pipeline.submit(&topic(), records(1), now);
        pipeline.flush(now);
        transmit_all(&mut pipeline, now);
        pipeline.handle_answer(&encode(&error_frame(0, ErrorCode::MalformedFrame, "records.flags", 0)), now);
        let (delivered, _, others) = drain(&mut pipeline);
        assert!(others.is_empty(), "{others:?}");
        assert_eq!(delivered[0].0, waiter);
        assert!(matches!(delivered[0].1, Err(DeviceError::Refused { code: ErrorCode::MalformedFrame, .. })));
    }

    #[test]
    fn sequences_are_used_only_under_a_persisted_reservation() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1000), true, 1, Some(0), now);
        pipeline.submit(&topic(), records(4), now);
        assert!(pipeline.poll_transmit(now).is_none());
        let (_, _, others) = drain(&mut pipeline);
        let [Output::ReserveSequences { end }] = others[..] else { panic!("{others:?}") };
        assert_eq!(end, Sequence(1100));
        pipeline.handle_sequences_reserved(end, now);
        let frames = transmit_all(&mut pipeline, now);
        assert_eq!(sequence_of(&frames[0]), 1000);

        let mut failing = Pipeline::new(settings(), Sequence(5), true, 1, Some(0), now);
        let waiter = failing.submit(&topic(), records(4), now);
        drain(&mut failing);
        let path = std::path::PathBuf::from("/nonexistent/state");
        let source = Arc::new(std::io::Error::other("disk gone"));
        failing.handle_sequences_failed(DeviceError::SequenceState { path, source });
        let (delivered, released, _) = drain(&mut failing);
        assert_eq!((delivered[0].0, released), (waiter, 4));
        assert!(failing.is_idle());
    }

    #[test]
    fn protocol_violations_drop_the_connection_and_resend() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(2), now);
        pipeline.flush(now);
        transmit_all(&mut pipeline, now);
        // An ack that misses a record.
        let parts = vec![AckPart { base_offset: 0, partition: 0, first_record: 0, record_count: 1, reserved: 0 }];
        pipeline.handle_answer(&encode(&ack_frame(1, parts)), now);
        let (delivered, _, others) = drain(&mut pipeline);
        assert!(delivered.is_empty());
        assert!(
            matches!(&others[..], [Output::CloseConnection { cause: LinkError::Protocol { why, .. } }] if why.contains("not acknowledged"))
        );
    }

    #[test]
    fn connects_refused_for_load_count_one_try_per_refusals_per_try_and_back_off_exponentially() {
        let now = Instant::now();
        let settings = PipelineSettings { attempts_max: 2, ..settings() };
        let mut pipeline = Pipeline::new(settings, Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(1), now);
        pipeline.flush(now);
        assert_eq!(transmit_all(&mut pipeline, now).len(), 1);
        let address = "127.0.0.1:4433".parse().unwrap();
        pipeline.handle_connection_lost(LinkError::StreamEnded { address }, now); // try 1
        let refused = || LinkError::Connection {
            address,
            source: quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::CONNECTION_REFUSED,
                frame_type: None,
                reason: Bytes::new(),
            }),
        };
        assert!(refused().is_refused() && !refused().is_credentials_refused());
        let mut at = now;
        let mut waits = Vec::new();
        for _ in 0..REFUSALS_PER_TRY - 1 {
            let retry_at = pipeline.poll_timeout().unwrap();
            waits.push(retry_at - at);
            at = retry_at;
            assert!(pipeline.poll_connect(at).is_some());
            pipeline.handle_connect_failed(refused(), at);
            let (delivered, _, _) = drain(&mut pipeline);
            assert!(delivered.is_empty(), "a refusal is not a whole try");
        }
        // Jitter 0 in these settings: the waits double up to the cap (10 ms .. 100 ms).
        let waits_ms: Vec<u64> = waits.iter().map(|wait| wait.as_millis() as u64).collect();
        assert_eq!(waits_ms, [10, 20, 40, 80, 100, 100, 100]);
        at = pipeline.poll_timeout().unwrap();
        assert!(pipeline.poll_connect(at).is_some());
        pipeline.handle_connect_failed(refused(), at); // the 8th refusal: try 2 of 2
        let (delivered, _, _) = drain(&mut pipeline);
        let Err(DeviceError::RetriesExhausted { attempts: 2, .. }) = &delivered[0].1 else { panic!("{delivered:?}") };
    }

    #[test]
    fn refused_credentials_fail_everything_at_once() {
        let now = Instant::now();
        let mut pipeline = Pipeline::new(settings(), Sequence(1), false, 1, Some(0), now);
        pipeline.submit(&topic(), records(2), now);
        pipeline.flush(now);
        pipeline.submit(&topic(), records(1), now);
        transmit_all(&mut pipeline, now);
        let close = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(42),
            frame_type: None,
            reason: Bytes::from_static(b"bad certificate"),
        });
        let address = "127.0.0.1:4433".parse().unwrap();
        pipeline.handle_connection_lost(LinkError::Connection { address, source: close }, now);
        let (delivered, released, _) = drain(&mut pipeline);
        assert_eq!((delivered.len(), released), (2, 3));
        assert!(delivered.iter().all(|(_, result)| matches!(result, Err(DeviceError::CredentialsRefused(_)))));
    }

    #[test]
    fn ack_parts_must_cover_the_frame_exactly_once() {
        let part = |first, count, base| AckPart {
            base_offset: base,
            partition: 2,
            first_record: first,
            record_count: count,
            reserved: 0,
        };
        assert_eq!(ack_offsets(&[part(1, 2, 10), part(0, 1, 5)], 3).unwrap(), [(2, 5), (2, 10), (2, 11)]);
        assert!(ack_offsets(&[part(0, 2, 0), part(1, 2, 0)], 3).is_err());
        assert!(ack_offsets(&[part(0, 4, 0)], 3).is_err());
        assert!(ack_offsets(&[part(0, 3, -1)], 3).is_err());
        assert!(ack_offsets(&[part(u32::MAX, 2, 0)], 3).is_err());
    }
}
