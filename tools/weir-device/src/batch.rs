//! Batching, as pure code: records from any number of sends are gathered per topic into
//! batches that become one produce frame each. A batch closes when it holds
//! `batch.records_max` records, when one more record would take its archive over
//! `batch.bytes_max`, or `batch.linger_ms` after its first record arrived, whichever
//! comes first. Each batch remembers which records belong to which send (segments), so
//! the frame's ack can be handed back to every send it carries.
//!
//! The archive size of a batch is tracked as an upper bound computed from the layout in
//! docs/PROTOCOL.md §3 (every alignment pad counted at its largest), so a closed batch
//! always encodes to at most `bytes_max` bytes; a test holds the bound to the encoder.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_protocol::batch::Record;
use weir_protocol::FRAME_LIMITS_V1;

use crate::error::DeviceError;
use crate::WaiterId;

/// Archive bytes of a produce frame beyond its records: the topic bytes, the pad before
/// the records array (at most 7), the pad before the root (at most 7) and the root (32).
pub fn frame_bytes_base(topic: &str) -> usize {
    topic.len() + 7 + 7 + 32
}

/// Upper bound of the archive bytes one record adds to a produce frame: its struct
/// (40), its key and value bytes, the pad before its headers array (at most 3), and
/// per header its struct (20) and its key and value bytes.
pub fn record_frame_bytes(record: &Record) -> usize {
    let headers: usize = record
        .headers
        .iter()
        .map(|header| 20 + header.key.len() + header.value.as_ref().map_or(0, |value| value.len()))
        .sum();
    40 + record.key.as_ref().map_or(0, |key| key.len())
        + record.value.as_ref().map_or(0, |value| value.len())
        + 3
        + headers
}

/// Checks a topic name against protocol v1 before anything is queued.
pub fn check_topic(topic: &str) -> Result<(), DeviceError> {
    let why = if topic.is_empty() {
        "empty"
    } else if topic.len() > FRAME_LIMITS_V1.topic_bytes_max {
        "longer than 249 bytes"
    } else {
        return Ok(());
    };
    Err(DeviceError::InvalidTopic { topic: topic.to_owned(), why })
}

/// Checks one record against the limits of protocol v1 and the batch size, so that a
/// record the server would refuse fails at once, locally, with its index.
pub fn check_record(index: usize, record: &Record, topic: &str, bytes_max: usize) -> Result<(), DeviceError> {
    let limits = FRAME_LIMITS_V1;
    let invalid = |why: String| Err(DeviceError::InvalidRecord { index, why });
    let key_bytes = record.key.as_ref().map_or(0, |key| key.len());
    let value_bytes = record.value.as_ref().map_or(0, |value| value.len());
    if key_bytes > limits.key_bytes_max {
        return invalid(format!("key of {key_bytes} bytes is over {}", limits.key_bytes_max));
    }
    if value_bytes > limits.value_bytes_max {
        return invalid(format!("value of {value_bytes} bytes is over {}", limits.value_bytes_max));
    }
    if record.headers.len() > limits.headers_per_record_max {
        return invalid(format!("{} headers is over {}", record.headers.len(), limits.headers_per_record_max));
    }
    for header in &record.headers {
        if header.key.len() > limits.header_key_bytes_max {
            return invalid(format!(
                "header key of {} bytes is over {}",
                header.key.len(),
                limits.header_key_bytes_max
            ));
        }
        if header.key.starts_with("weir.") {
            return invalid(format!("header key {:?}: the weir. prefix is reserved for weir", header.key));
        }
        let header_value_bytes = header.value.as_ref().map_or(0, |value| value.len());
        if header_value_bytes > limits.header_value_bytes_max {
            return invalid(format!(
                "header {:?} value of {header_value_bytes} bytes is over {}",
                header.key, limits.header_value_bytes_max
            ));
        }
    }
    let frame_bytes = frame_bytes_base(topic) + record_frame_bytes(record);
    if frame_bytes > bytes_max {
        return invalid(format!("needs a frame of up to {frame_bytes} bytes, over batch.bytes_max {bytes_max}"));
    }
    Ok(())
}

/// Consecutive records of one send inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub waiter: WaiterId,
    /// Index in the send of the first of these records.
    pub first_in_send: u32,
    pub count: u32,
}

#[derive(Debug)]
pub struct Batch {
    pub topic: Arc<str>,
    pub records: Vec<Record>,
    pub segments: Vec<Segment>,
    /// Upper bound of the archive bytes.
    pub frame_bytes: usize,
    pub opened_at: Instant,
}

impl Batch {
    fn new(topic: Arc<str>, now: Instant) -> Batch {
        let frame_bytes = frame_bytes_base(&topic);
        Batch { topic, records: Vec::new(), segments: Vec::new(), frame_bytes, opened_at: now }
    }

    fn add(&mut self, waiter: WaiterId, index_in_send: u32, record: Record, record_bytes: usize) {
        match self.segments.last_mut() {
            Some(last) if last.waiter == waiter && last.first_in_send + last.count == index_in_send => last.count += 1,
            _ => self.segments.push(Segment { waiter, first_in_send: index_in_send, count: 1 }),
        }
        self.records.push(record);
        self.frame_bytes += record_bytes;
    }
}

/// Open batches (one per topic being written) and closed ones waiting for a frame.
#[derive(Debug)]
pub struct Batcher {
    records_max: usize,
    bytes_max: usize,
    linger: Duration,
    open: Vec<Batch>,
    closed: VecDeque<Batch>,
}

impl Batcher {
    pub fn new(records_max: usize, bytes_max: usize, linger: Duration) -> Batcher {
        assert!((1..=FRAME_LIMITS_V1.records_per_frame_max).contains(&records_max));
        assert!(bytes_max <= FRAME_LIMITS_V1.frame_bytes_max);
        Batcher { records_max, bytes_max, linger, open: Vec::new(), closed: VecDeque::new() }
    }

    /// Adds the records of one send (already checked with `check_record`).
    pub fn push(&mut self, waiter: WaiterId, topic: &Arc<str>, records: Vec<Record>, now: Instant) {
        let slot = match self.open.iter().position(|batch| *batch.topic == **topic) {
            Some(slot) => slot,
            None => {
                self.open.push(Batch::new(topic.clone(), now));
                self.open.len() - 1
            }
        };
        for (index, record) in records.into_iter().enumerate() {
            let record_bytes = record_frame_bytes(&record);
            let batch = &self.open[slot];
            assert!(frame_bytes_base(topic) + record_bytes <= self.bytes_max, "record was not checked");
            if !batch.records.is_empty() && batch.frame_bytes + record_bytes > self.bytes_max {
                let full = std::mem::replace(&mut self.open[slot], Batch::new(topic.clone(), now));
                self.closed.push_back(full);
            }
            let index_in_send = u32::try_from(index).expect("a send holds at most queue_records_max records");
            self.open[slot].add(waiter, index_in_send, record, record_bytes);
            if self.open[slot].records.len() == self.records_max {
                let full = std::mem::replace(&mut self.open[slot], Batch::new(topic.clone(), now));
                self.closed.push_back(full);
            }
        }
        if self.open[slot].records.is_empty() {
            self.open.swap_remove(slot);
        }
        if self.linger.is_zero() {
            self.close_all();
        }
    }

    /// Closes the batches whose linger ran out.
    pub fn close_due(&mut self, now: Instant) {
        let mut slot = 0;
        while slot < self.open.len() {
            if self.open[slot].opened_at + self.linger <= now {
                let batch = self.open.swap_remove(slot);
                self.closed.push_back(batch);
            } else {
                slot += 1;
            }
        }
    }

    /// Closes every open batch (a flush).
    pub fn close_all(&mut self) {
        // Oldest first, so frames keep the order records arrived in across topics.
        self.open.sort_by_key(|batch| batch.opened_at);
        self.closed.extend(self.open.drain(..));
    }

    pub fn pop_closed(&mut self) -> Option<Batch> {
        self.closed.pop_front()
    }

    pub fn has_closed(&self) -> bool {
        !self.closed.is_empty()
    }

    /// When the next open batch's linger runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.iter().map(|batch| batch.opened_at + self.linger).min()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.closed.is_empty()
    }

    /// Takes every batch, open and closed (to fail them).
    pub fn take_all(&mut self) -> Vec<Batch> {
        self.closed.drain(..).chain(self.open.drain(..)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use weir_protocol::batch::Header;
    use weir_protocol::{encode, produce_frame};

    fn record(value_bytes: usize) -> Record {
        Record {
            timestamp_ms: 1,
            key: Some(Bytes::from_static(b"k")),
            value: Some(vec![7; value_bytes].into()),
            headers: vec![],
        }
    }

    #[test]
    fn the_size_bound_holds_for_the_real_encoder_and_is_tight() {
        let shapes = [
            Record { timestamp_ms: 0, key: None, value: None, headers: vec![] },
            record(1),
            record(255),
            Record {
                timestamp_ms: -1,
                key: Some(Bytes::from_static(b"abc")),
                value: Some(Bytes::from_static(b"12345")),
                headers: vec![
                    Header { key: "u".into(), value: Some(Bytes::from_static(b"C")) },
                    Header { key: "none".into(), value: None },
                ],
            },
        ];
        for count in 1..6 {
            for topic in ["t", "telemetry", "a-much-longer-topic-name"] {
                let records: Vec<Record> = shapes.iter().cycle().take(count * 3).cloned().collect();
                let actual = encode(&produce_frame(u64::MAX, topic, &records)).len();
                let bound = frame_bytes_base(topic) + records.iter().map(record_frame_bytes).sum::<usize>();
                assert!(actual <= bound, "{actual} > {bound}");
                assert!(bound - actual <= 7 + 7 + 3 * records.len(), "{bound} vs {actual}");
            }
        }
    }

    #[test]
    fn batches_close_on_records_max_bytes_max_and_linger() {
        let now = Instant::now();
        let topic: Arc<str> = "t".into();
        let mut batcher = Batcher::new(3, 1024, Duration::from_millis(5));
        batcher.push(WaiterId(1), &topic, vec![record(1); 7], now);
        let sizes: Vec<usize> = std::iter::from_fn(|| batcher.pop_closed()).map(|batch| batch.records.len()).collect();
        assert_eq!(sizes, [3, 3]);
        assert_eq!(batcher.deadline(), Some(now + Duration::from_millis(5)));
        batcher.close_due(now + Duration::from_millis(4));
        assert!(!batcher.has_closed());
        batcher.close_due(now + Duration::from_millis(5));
        assert_eq!(batcher.pop_closed().unwrap().records.len(), 1);
        assert!(batcher.is_empty());

        // 300-byte values: 2 fit in 1024 bytes with the frame's overhead, 3 do not.
        let mut batcher = Batcher::new(100, 1024, Duration::from_millis(5));
        batcher.push(WaiterId(1), &topic, vec![record(300); 5], now);
        batcher.close_all();
        let batches: Vec<Batch> = std::iter::from_fn(|| batcher.pop_closed()).collect();
        assert_eq!(batches.iter().map(|batch| batch.records.len()).collect::<Vec<_>>(), [2, 2, 1]);
        for batch in &batches {
            assert!(encode(&produce_frame(1, "t", &batch.records)).len() <= 1024);
        }
    }

    #[test]
    fn sends_share_a_batch_and_keep_their_segments() {
        let now = Instant::now();
        let topic: Arc<str> = "t".into();
        let other: Arc<str> = "u".into();
        let mut batcher = Batcher::new(4, 1 << 20, Duration::from_millis(5));
        batcher.push(WaiterId(1), &topic, vec![record(1); 3], now);
        batcher.push(WaiterId(2), &other, vec![record(1); 1], now);
        batcher.push(WaiterId(3), &topic, vec![record(1); 2], now);
        let first = batcher.pop_closed().unwrap();
        assert_eq!(&*first.topic, "t");
        assert_eq!(
            first.segments,
            [
                Segment { waiter: WaiterId(1), first_in_send: 0, count: 3 },
                Segment { waiter: WaiterId(3), first_in_send: 0, count: 1 }
            ]
        );
        batcher.close_all();
        let rest: Vec<Batch> = std::iter::from_fn(|| batcher.pop_closed()).collect();
        assert_eq!(rest.len(), 2);
        let t = rest.iter().find(|batch| &*batch.topic == "t").unwrap();
        assert_eq!(t.segments, [Segment { waiter: WaiterId(3), first_in_send: 1, count: 1 }]);
    }

    #[test]
    fn records_the_server_would_refuse_fail_locally_with_their_index() {
        let big = record(FRAME_LIMITS_V1.value_bytes_max + 1);
        assert!(matches!(check_record(4, &big, "t", 1 << 20), Err(DeviceError::InvalidRecord { index: 4, .. })));
        let reserved = Record { headers: vec![Header { key: "weir.device".into(), value: None }], ..record(1) };
        assert!(check_record(0, &reserved, "t", 1 << 20).is_err());
        assert!(check_record(0, &record(2000), "t", 1024).is_err());
        assert!(check_record(0, &record(900), "t", 1024).is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic(&"x".repeat(250)).is_err());
    }
}
