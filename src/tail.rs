//! `weir tail`: prints the records of the local log, for a technician at the box —
//! offset, time, device, sequence, key and value (as text, or hex when it is not) — from
//! a given offset, and with `--follow` as they become durable.
//!
//! It reads segment files with ordinary buffered reads beside a serving weir and takes
//! no lock. A batch is printed only once it reads back whole with a valid CRC, so a
//! tail page the server is rewriting right now is never half-printed: the reader stops
//! there and, when following, looks again. It hops batch headers to the first batch at
//! or after `--from`, so starting deep in a large segment reads only headers.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::core::log::batch::{self, RecordRef, BATCH_HEADER_BYTES};
use crate::core::log::segment;
use crate::inspect::read_fully;

/// How often `--follow` looks for new records.
pub const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The largest batch read (a stored batch is at most `log.flush_bytes_max`, 64 MiB max).
const BATCH_BYTES_MAX: usize = 64 << 20;
/// Text of a key or value longer than this is cut, with the count of bytes left out.
pub const VALUE_CHARS_SHOWN_MAX: usize = 512;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: byte {position}: {why}; `weir inspect {directory}` tells more", directory = .path.parent().map_or(String::new(), |parent| parent.display().to_string()))]
    Corrupt { path: PathBuf, position: u64, why: String },
}

/// Where one partition's reader stands.
#[derive(Debug)]
pub struct PartitionTail {
    pub topic: String,
    pub partition: u32,
    directory: PathBuf,
    /// The next offset to print.
    next_offset: i64,
    /// The segment being read and the byte position of the next batch in it.
    at: Option<(i64, u64)>,
    /// The offset at which a segment stopped short of the next one's base, once.
    stalled_at: Option<i64>,
}

impl PartitionTail {
    pub fn new(topic: &str, partition: u32, directory: &Path, from_offset: i64) -> PartitionTail {
        PartitionTail {
            topic: topic.to_owned(),
            partition,
            directory: directory.to_owned(),
            next_offset: from_offset,
            at: None,
            stalled_at: None,
        }
    }

    /// Reads every durable record at or after the next offset, in order, handing each to
    /// `print` until it answers `false`; returns how many were printed.
    pub fn read_available(&mut self, print: &mut impl FnMut(&str, u32, &RecordRef) -> bool) -> Result<u64, TailError> {
        let mut printed = 0;
        loop {
            let bases = self.segment_bases()?;
            let Some((base, position)) = self.position(&bases) else { return Ok(printed) };
            let path = segment::log_path(&self.directory, base);
            let file = match File::open(&path) {
                Ok(file) => file,
                // Retention deleted it meanwhile: look again from the list.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    self.at = None;
                    continue;
                }
                Err(source) => return Err(TailError::Io { path, source }),
            };
            let (end_position, wanted) = self.read_segment(&file, &path, position, print, &mut printed)?;
            self.at = Some((base, end_position));
            if !wanted {
                return Ok(printed);
            }
            // The segment's durable bytes end here. Move on when the next segment starts
            // where this one stopped (it was sealed there). When it starts later, the
            // server may have sealed this one while it was being read: read on once
            // more, and only a second stop at the same offset is a gap in the log.
            match bases.iter().find(|next| **next > base) {
                Some(next) if *next <= self.next_offset => self.at = Some((*next, 0)),
                Some(_) if self.stalled_at != Some(self.next_offset) => self.stalled_at = Some(self.next_offset),
                Some(next) => {
                    return Err(TailError::Corrupt {
                        path,
                        position: end_position,
                        why: format!(
                            "the segment stops at offset {} but the next one starts at {next}",
                            self.next_offset
                        ),
                    })
                }
                None => return Ok(printed),
            }
        }
    }

    fn segment_bases(&self) -> Result<Vec<i64>, TailError> {
        let entries = match std::fs::read_dir(&self.directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(TailError::Io { path: self.directory.clone(), source }),
        };
        let mut bases: Vec<i64> = entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().and_then(segment::parse_log_file_name))
            .collect();
        bases.sort_unstable();
        Ok(bases)
    }

    /// The segment and byte position to read next: where the last read stopped, or the
    /// segment holding the next offset (the first one when retention passed it).
    fn position(&mut self, bases: &[i64]) -> Option<(i64, u64)> {
        if let Some((base, position)) = self.at {
            if bases.contains(&base) {
                return Some((base, position));
            }
        }
        let base = bases.iter().rev().find(|base| **base <= self.next_offset).or(bases.first()).copied()?;
        self.next_offset = self.next_offset.max(base);
        Some((base, 0))
    }

    /// Prints the segment's whole, valid batches from `position` on. Returns the
    /// position after the last batch read and whether `print` wants more.
    fn read_segment(
        &mut self,
        file: &File,
        path: &Path,
        mut position: u64,
        print: &mut impl FnMut(&str, u32, &RecordRef) -> bool,
        printed: &mut u64,
    ) -> Result<(u64, bool), TailError> {
        let io = |source| TailError::Io { path: path.to_owned(), source };
        let mut header = [0u8; BATCH_HEADER_BYTES];
        loop {
            if read_fully(file, &mut header, position).map_err(io)? < BATCH_HEADER_BYTES {
                return Ok((position, true)); // the end of what is written
            }
            let Ok(total) = batch::peek_total_bytes(&header) else { return Ok((position, true)) };
            let base_offset = i64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
            let last_offset_delta = i32::from_be_bytes(header[23..27].try_into().expect("4 bytes"));
            if total <= BATCH_HEADER_BYTES || total > BATCH_BYTES_MAX || last_offset_delta < 0 {
                return Ok((position, true)); // preallocated zeros, or a tail being written
            }
            let next_offset = base_offset + i64::from(last_offset_delta) + 1;
            if next_offset <= self.next_offset {
                position += total as u64; // before --from: headers only
                continue;
            }
            let mut bytes = vec![0u8; total];
            if read_fully(file, &mut bytes, position).map_err(io)? < total {
                return Ok((position, true));
            }
            let records = match batch::records(&bytes) {
                Ok(records) => records,
                Err(_) => return Ok((position, true)), // a tail page in flight: look again later
            };
            for record in records {
                let record = record.map_err(|error| TailError::Corrupt {
                    path: path.to_owned(),
                    position,
                    why: error.to_string(),
                })?;
                if record.offset < self.next_offset {
                    continue;
                }
                self.next_offset = record.offset + 1;
                *printed += 1;
                if !print(&self.topic, self.partition, &record) {
                    return Ok((position, false));
                }
            }
            position += total as u64;
        }
    }
}

/// Bytes as text when they are UTF-8 without control characters, else as hex; cut
/// after `VALUE_CHARS_SHOWN_MAX` characters with the count left out.
pub fn show_bytes(bytes: &[u8]) -> String {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(|character| character.is_control() && character != '\t') => text.to_owned(),
        _ => format!("hex:{}", bytes.iter().map(|byte| format!("{byte:02x}")).collect::<String>()),
    };
    let total = text.chars().count();
    if total <= VALUE_CHARS_SHOWN_MAX {
        text
    } else {
        let shown: String = text.chars().take(VALUE_CHARS_SHOWN_MAX).collect();
        format!("{shown}...(+{} more)", total - VALUE_CHARS_SHOWN_MAX)
    }
}

/// A record's timestamp as RFC 3339 UTC with milliseconds.
pub fn show_time(timestamp_ms: i64) -> String {
    let nanos = i128::from(timestamp_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|time| time.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{timestamp_ms}ms"))
}

fn header_text<'a>(record: &'a RecordRef, key: &str) -> Option<&'a str> {
    record.headers.iter().find(|(name, _)| *name == key).and_then(|(_, value)| std::str::from_utf8((*value)?).ok())
}

/// One line of `weir tail`'s text output.
pub fn render_line(topic: &str, partition: u32, record: &RecordRef) -> String {
    format!(
        "{topic}-{partition} {} {} device={} seq={} key={} value={}",
        record.offset,
        show_time(record.timestamp_ms),
        header_text(record, "weir.device").unwrap_or("-"),
        header_text(record, "weir.sequence").unwrap_or("-"),
        record.key.map_or("-".to_owned(), show_bytes),
        record.value.map_or("-".to_owned(), show_bytes),
    )
}

/// One record of `weir tail --json`: one JSON object per line.
pub fn render_json(topic: &str, partition: u32, record: &RecordRef) -> String {
    let headers: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|(name, value)| {
            ((*name).to_owned(), value.map_or(serde_json::Value::Null, |value| show_bytes(value).into()))
        })
        .collect();
    serde_json::json!({
        "topic": topic,
        "partition": partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp_ms,
        "time": show_time(record.timestamp_ms),
        "device": header_text(record, "weir.device"),
        "sequence": header_text(record, "weir.sequence"),
        "key": record.key.map(show_bytes),
        "value": record.value.map(show_bytes),
        "headers": headers,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_show_as_text_when_printable_else_as_hex_and_long_ones_are_cut() {
        assert_eq!(show_bytes(b"temp=21.5"), "temp=21.5");
        assert_eq!(show_bytes(&[0, 1, 0xff]), "hex:0001ff");
        assert_eq!(show_bytes(b"a\nb"), "hex:610a62");
        let long = "x".repeat(VALUE_CHARS_SHOWN_MAX + 7);
        assert_eq!(show_bytes(long.as_bytes()), format!("{}...(+7 more)", "x".repeat(VALUE_CHARS_SHOWN_MAX)));
    }

    #[test]
    fn times_show_in_utc_with_milliseconds() {
        assert_eq!(show_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(show_time(1_796_616_000_123), "2026-12-07T04:00:00.123Z");
    }
}
