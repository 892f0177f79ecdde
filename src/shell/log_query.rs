//! Reads of a partition's log on the core that owns it, for the Kafka API: a fetch's
//! batches, a long poll's wait for new data, and an offset by timestamp. The Kafka
//! listener asks for them; `shell::engine` carries a query to the owning core over the
//! core mesh when the partition is another core's, and runs it here when it is its
//! own. Everything in a query and its answer is `Send` (the mesh crosses threads).
//!
//! Only durable data is visible: `PartitionLog::read` stops at the durable end, and
//! the end reported with the batches is that same end (the high watermark).

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use futures_lite::future;

use crate::core::kafka_api::{self as decide, FetchStart};
use crate::core::log::batch;
use crate::shell::log::{LogError, PartitionLog};

/// A question about one core's partitions.
#[derive(Debug)]
pub enum LogQuery {
    /// Stored batches of one partition from `offset`, about `bytes_max` of them (at
    /// least one batch when any is stored there).
    Read { topic: String, partition: u32, offset: i64, bytes_max: usize },
    /// Resolves when any of these partitions' durable end passes its offset, or at
    /// `until`.
    Wait { partitions: Vec<(String, u32, i64)>, until: Instant },
    /// The first offset whose record timestamp is at least `timestamp_ms`.
    OffsetForTimestamp { topic: String, partition: u32, timestamp_ms: i64 },
    /// The stored range (start, durable end).
    Range { topic: String, partition: u32 },
}

/// The answer to a [`LogQuery`].
#[derive(Debug)]
pub enum LogAnswer {
    Read(ReadOutcome),
    Waited,
    /// `Some((offset, timestamp_ms))`, or `None` when no record reaches it.
    Offset(Result<Option<(i64, i64)>, PartitionFailure>),
    Range(Result<(i64, i64), PartitionFailure>),
}

/// What a fetch of one partition found.
#[derive(Debug)]
pub enum ReadOutcome {
    Batches { batches: Vec<Bytes>, start: i64, end: i64 },
    Failed(PartitionFailure),
}

/// Why a partition could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionFailure {
    /// Not a partition of this appliance (or one quarantined).
    Unknown,
    /// Behind retention or past the end.
    OutOfRange { start: i64, end: i64 },
    /// A disk error or a corrupt batch: the message names file and position.
    Storage(String),
}

/// How many records the timestamp scan reads per step (bytes).
const TIMESTAMP_SCAN_BYTES: usize = 1 << 20;

/// Answers `query` against this core's partitions.
pub async fn answer(logs: &HashMap<(String, u32), PartitionLog>, query: LogQuery) -> LogAnswer {
    match query {
        LogQuery::Read { topic, partition, offset, bytes_max } => {
            LogAnswer::Read(read(logs.get(&(topic, partition)), offset, bytes_max).await)
        }
        LogQuery::Wait { partitions, until } => {
            let waits: Vec<_> = partitions
                .iter()
                .filter_map(|(topic, partition, offset)| {
                    logs.get(&(topic.clone(), *partition)).map(|log| (log.clone(), *offset))
                })
                .collect();
            wait_any(&waits, until).await;
            LogAnswer::Waited
        }
        LogQuery::OffsetForTimestamp { topic, partition, timestamp_ms } => {
            let Some(log) = logs.get(&(topic, partition)) else {
                return LogAnswer::Offset(Err(PartitionFailure::Unknown));
            };
            LogAnswer::Offset(offset_for_timestamp(log, timestamp_ms).await.map_err(storage))
        }
        LogQuery::Range { topic, partition } => LogAnswer::Range(match logs.get(&(topic, partition)) {
            Some(log) => {
                let stats = log.stats();
                Ok((stats.start_offset, stats.next_offset))
            }
            None => Err(PartitionFailure::Unknown),
        }),
    }
}

fn storage(error: LogError) -> PartitionFailure {
    PartitionFailure::Storage(error.to_string())
}

async fn read(log: Option<&PartitionLog>, offset: i64, bytes_max: usize) -> ReadOutcome {
    let Some(log) = log else { return ReadOutcome::Failed(PartitionFailure::Unknown) };
    let stats = log.stats();
    let (start, end) = (stats.start_offset, stats.next_offset);
    match decide::fetch_start(offset, start, end) {
        FetchStart::OutOfRange => return ReadOutcome::Failed(PartitionFailure::OutOfRange { start, end }),
        FetchStart::AtEnd => return ReadOutcome::Batches { batches: Vec::new(), start, end },
        FetchStart::Read => {}
    }
    match log.read(offset, bytes_max).await {
        Ok(batches) => ReadOutcome::Batches { batches, start, end },
        // Retention deleted the segment between the check and the read.
        Err(LogError::OffsetOutOfRange { start, .. }) => {
            ReadOutcome::Failed(PartitionFailure::OutOfRange { start, end: log.next_offset() })
        }
        Err(error) => ReadOutcome::Failed(storage(error)),
    }
}

/// Waits until one of `waits` has data beyond its offset, or `until`.
async fn wait_any(waits: &[(PartitionLog, i64)], until: Instant) {
    let deadline = async {
        glommio::timer::sleep(until.saturating_duration_since(Instant::now())).await;
    };
    if waits.is_empty() {
        return deadline.await;
    }
    let any = async {
        let mut futures: Vec<_> = waits.iter().map(|(log, offset)| Box::pin(log.wait_beyond(*offset))).collect();
        future::poll_fn(|context| {
            for waiting in futures.iter_mut() {
                if waiting.as_mut().poll(context).is_ready() {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        })
        .await;
    };
    future::or(any, deadline).await
}

use std::future::Future as _;

/// The first record at or after `timestamp_ms`: batch headers are scanned in offset
/// order from the log's start (the sparse index holds no timestamps), and only the
/// batch that reaches it is decoded.
async fn offset_for_timestamp(log: &PartitionLog, timestamp_ms: i64) -> Result<Option<(i64, i64)>, LogError> {
    let mut next = log.stats().start_offset;
    loop {
        let batches = log.read(next, TIMESTAMP_SCAN_BYTES).await?;
        if batches.is_empty() {
            return Ok(None);
        }
        for bytes in &batches {
            let header = batch::parse_header(bytes).map_err(|reason| corrupt(log, reason))?;
            next = header.next_offset();
            if !decide::batch_reaches(header.max_timestamp, timestamp_ms) {
                continue;
            }
            let records = batch::records(bytes).map_err(|reason| corrupt(log, reason))?;
            let mut offsets = Vec::new();
            for record in records {
                let record = record.map_err(|reason| corrupt(log, reason))?;
                offsets.push((record.offset, record.timestamp_ms));
            }
            if let Some(found) = decide::first_record_reaching(offsets, timestamp_ms) {
                return Ok(Some(found));
            }
        }
    }
}

fn corrupt(log: &PartitionLog, reason: batch::BatchError) -> LogError {
    LogError::Corrupt { partition: log.name(), path: std::path::PathBuf::new(), position: 0, reason: reason.into() }
}
