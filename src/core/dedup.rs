//! Sequence de-duplication for one partition, pure: which (device, sequence) runs the
//! partition already stored, and at which offsets.
//!
//! A produce frame's records for one partition are appended as one run carrying the
//! `weir.device` and `weir.sequence` headers, so the partition's own log is the truth:
//! at open the index is rebuilt from the log's last `horizon_records` records, and every
//! stored run is added as it is acknowledged. A device's window keeps its most recent
//! `sequences_per_device_max` sequences; the number of devices is bounded too (the least
//! recently written device is forgotten first).
//!
//! A device's window also remembers the highest sequence it dropped: a frame under a
//! sequence at or below it may have been stored, and the index cannot tell. The shell
//! answers such a frame `SequenceTooOld` instead of storing it a second time. This
//! matters for stale copies: frames a device sent on a connection it then abandoned
//! can reach weir after the device resent them elsewhere and moved far ahead (found
//! by the whole-pipeline simulation, `core::sim`, seed 123).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::core::log::batch::{Header, Record, RecordRef};
use crate::core::session::{DEVICE_HEADER, SEQUENCE_HEADER};

/// Where a stored run is: its first offset and how many records it has, and a digest
/// of its records (so a resend under the same sequence with other records is told
/// apart from a true resend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRun {
    pub base_offset: i64,
    pub record_count: u32,
    pub digest: u32,
}

/// Extends a run's digest with one record: CRC-32C over its timestamp, key, value and
/// headers (weir's own headers included; they are the same for a true resend). The
/// same function serves records about to be appended and records read back from the
/// log, so a digest rebuilt at open equals the one computed at append.
pub fn digest_record<'a>(
    digest: u32,
    timestamp_ms: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> u32 {
    fn field(digest: u32, bytes: Option<&[u8]>) -> u32 {
        match bytes {
            None => crc32c::crc32c_append(digest, &[0]),
            Some(bytes) => {
                let digest = crc32c::crc32c_append(digest, &[1]);
                let digest = crc32c::crc32c_append(digest, &(bytes.len() as u32).to_le_bytes());
                crc32c::crc32c_append(digest, bytes)
            }
        }
    }
    let mut digest = crc32c::crc32c_append(digest, &timestamp_ms.to_le_bytes());
    digest = field(digest, key);
    digest = field(digest, value);
    for (header_key, header_value) in headers {
        digest = field(digest, Some(header_key.as_bytes()));
        digest = field(digest, header_value);
    }
    crc32c::crc32c_append(digest, &[0xff])
}

/// The digest of a run about to be appended.
pub fn digest_of_records(records: &[Record]) -> u32 {
    records.iter().fold(0, |digest, record| {
        digest_record(
            digest,
            record.timestamp_ms,
            record.key.as_deref(),
            record.value.as_deref(),
            record.headers.iter().map(|header| (header.key.as_ref(), header.value.as_deref())),
        )
    })
}

/// The digest of one record read from the log, extending `digest`.
pub fn digest_of_stored(digest: u32, record: &RecordRef<'_>) -> u32 {
    digest_record(digest, record.timestamp_ms, record.key, record.value, record.headers.iter().copied())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupLimits {
    pub sequences_per_device_max: usize,
    pub devices_max: usize,
}

/// One device's remembered runs, and the highest sequence dropped from them.
#[derive(Debug, Default)]
struct DeviceWindow {
    runs: BTreeMap<u64, StoredRun>,
    forgotten_through: Option<u64>,
}

#[derive(Debug)]
pub struct DedupIndex {
    limits: DedupLimits,
    devices: HashMap<String, DeviceWindow>,
    /// Devices in the order they were last written (front: least recent).
    recency: VecDeque<String>,
}

/// The (device, sequence) a run's first record carries, if weir stamped it.
pub fn run_key(headers: &[Header]) -> Option<(String, u64)> {
    let device = headers.iter().find(|header| header.key == DEVICE_HEADER)?.value.as_ref()?;
    let sequence = headers.iter().find(|header| header.key == SEQUENCE_HEADER)?.value.as_ref()?;
    let device = std::str::from_utf8(device).ok()?.to_owned();
    let sequence = std::str::from_utf8(sequence).ok()?.parse().ok()?;
    Some((device, sequence))
}

/// The same, for a record read from the log.
pub fn run_key_of_stored(record: &RecordRef<'_>) -> Option<(String, u64)> {
    let find = |name: &str| record.headers.iter().find(|(key, _)| *key == name).and_then(|(_, value)| *value);
    let device = std::str::from_utf8(find(DEVICE_HEADER)?).ok()?.to_owned();
    let sequence = std::str::from_utf8(find(SEQUENCE_HEADER)?).ok()?.parse().ok()?;
    Some((device, sequence))
}

/// The key of a run about to be appended (all its records carry the same one).
pub fn key_of_records(records: &[Record]) -> Option<(String, u64)> {
    records.first().and_then(|record| run_key(&record.headers))
}

impl DedupIndex {
    pub fn new(limits: DedupLimits) -> DedupIndex {
        assert!(limits.sequences_per_device_max > 0 && limits.devices_max > 0);
        DedupIndex { limits, devices: HashMap::new(), recency: VecDeque::new() }
    }

    pub fn lookup(&self, device: &str, sequence: u64) -> Option<StoredRun> {
        self.devices.get(device)?.runs.get(&sequence).copied()
    }

    /// Whether the device's window dropped `sequence` or a later one: a frame under
    /// `sequence` that `lookup` does not find may still have been stored.
    pub fn forgot(&self, device: &str, sequence: u64) -> bool {
        self.devices
            .get(device)
            .and_then(|window| window.forgotten_through)
            .is_some_and(|forgotten| sequence <= forgotten)
    }

    /// Notes that (device, sequence) is stored at `run`. A record at an offset already
    /// known extends the run (rebuilding from the log sees a run record by record).
    pub fn insert(&mut self, device: &str, sequence: u64, run: StoredRun) {
        if !self.devices.contains_key(device) {
            if self.devices.len() >= self.limits.devices_max {
                if let Some(evicted) = self.recency.pop_front() {
                    self.devices.remove(&evicted);
                }
            }
            self.devices.insert(device.to_owned(), DeviceWindow::default());
        } else if let Some(position) = self.recency.iter().position(|known| known == device) {
            self.recency.remove(position);
        }
        self.recency.push_back(device.to_owned());
        let window = self.devices.get_mut(device).expect("inserted above");
        window.runs.insert(sequence, run);
        while window.runs.len() > self.limits.sequences_per_device_max {
            if let Some((dropped, _)) = window.runs.pop_first() {
                window.forgotten_through = window.forgotten_through.max(Some(dropped));
            }
        }
    }

    /// Feeds one stored record (rebuilding at open): consecutive records with the same
    /// key form one run. `record_digest` extends a run's digest by this record.
    pub fn observe(&mut self, offset: i64, key: Option<(String, u64)>, record_digest: impl Fn(u32) -> u32) {
        let Some((device, sequence)) = key else { return };
        let run = match self.lookup(&device, sequence) {
            Some(run) if run.base_offset + i64::from(run.record_count) == offset => StoredRun {
                base_offset: run.base_offset,
                record_count: run.record_count + 1,
                digest: record_digest(run.digest),
            },
            Some(run) => run, // a later duplicate of an old sequence: keep the first
            None => StoredRun { base_offset: offset, record_count: 1, digest: record_digest(0) },
        };
        self.insert(&device, sequence, run);
    }

    pub fn devices(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DedupLimits {
        DedupLimits { sequences_per_device_max: 3, devices_max: 2 }
    }

    #[test]
    fn runs_rebuild_record_by_record_and_windows_are_bounded() {
        let mut index = DedupIndex::new(limits());
        for offset in 10..13 {
            index.observe(offset, Some(("a".into(), 5)), |digest| digest + 1);
        }
        index.observe(13, Some(("b".into(), 1)), |digest| digest + 1);
        assert_eq!(index.lookup("a", 5), Some(StoredRun { base_offset: 10, record_count: 3, digest: 3 }));
        assert_eq!(index.lookup("b", 1), Some(StoredRun { base_offset: 13, record_count: 1, digest: 1 }));
        for sequence in 6..10 {
            index.insert("a", sequence, StoredRun { base_offset: 100 + sequence as i64, record_count: 1, digest: 0 });
        }
        assert_eq!(index.lookup("a", 5), None, "only the last 3 sequences are kept");
        assert!(index.forgot("a", 5) && index.forgot("a", 6) && !index.forgot("a", 7), "it knows what it dropped");
        assert!(!index.forgot("b", 0), "nothing dropped for b");
        assert!(index.lookup("a", 9).is_some());
        index.insert("c", 1, StoredRun { base_offset: 0, record_count: 1, digest: 0 });
        assert_eq!(index.devices(), 2);
        assert_eq!(index.lookup("b", 1), None, "the least recently written device is forgotten first");
    }

    #[test]
    fn a_run_digest_rebuilt_from_the_log_equals_the_digest_at_append() {
        use bytes::Bytes;
        let records = vec![
            Record {
                timestamp_ms: 7,
                key: Some(Bytes::from_static(b"k")),
                value: None,
                headers: vec![Header { key: "h".into(), value: Some(Bytes::from_static(b"v")) }],
            },
            Record { timestamp_ms: 8, key: None, value: Some(Bytes::from_static(b"x")), headers: vec![] },
        ];
        let batch = crate::core::log::batch::encode_to_vec(0, &records);
        let mut rebuilt = 0;
        for record in crate::core::log::batch::records(&batch).unwrap() {
            rebuilt = digest_of_stored(rebuilt, &record.unwrap());
        }
        assert_eq!(rebuilt, digest_of_records(&records));
        let mut other = records.clone();
        other[1].value = Some(Bytes::from_static(b"y"));
        assert_ne!(digest_of_records(&other), digest_of_records(&records));
    }
}
