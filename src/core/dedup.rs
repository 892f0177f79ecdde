//! Sequence de-duplication for one partition, pure: which (device, sequence) runs the
//! partition already stored, and at which offsets.
//!
//! A produce frame's records for one partition are appended as one run carrying the
//! `weir.device` and `weir.sequence` headers, so the partition's own log is the truth:
//! at open the index is rebuilt from the log's last `horizon_records` records, and every
//! stored run is added as it is acknowledged. A device's window keeps its most recent
//! `sequences_per_device_max` sequences; the number of devices is bounded too (the least
//! recently written device is forgotten first).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::core::log::batch::{Header, Record, RecordRef};
use crate::core::session::{DEVICE_HEADER, SEQUENCE_HEADER};

/// Where a stored run is: its first offset and how many records it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRun {
    pub base_offset: i64,
    pub record_count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupLimits {
    pub sequences_per_device_max: usize,
    pub devices_max: usize,
}

#[derive(Debug)]
pub struct DedupIndex {
    limits: DedupLimits,
    devices: HashMap<String, BTreeMap<u64, StoredRun>>,
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
        self.devices.get(device)?.get(&sequence).copied()
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
            self.devices.insert(device.to_owned(), BTreeMap::new());
        } else if let Some(position) = self.recency.iter().position(|known| known == device) {
            self.recency.remove(position);
        }
        self.recency.push_back(device.to_owned());
        let window = self.devices.get_mut(device).expect("inserted above");
        window.insert(sequence, run);
        while window.len() > self.limits.sequences_per_device_max {
            window.pop_first();
        }
    }

    /// Feeds one stored record (rebuilding at open): consecutive records with the same
    /// key form one run.
    pub fn observe(&mut self, offset: i64, key: Option<(String, u64)>) {
        let Some((device, sequence)) = key else { return };
        let run = match self.lookup(&device, sequence) {
            Some(run) if run.base_offset + i64::from(run.record_count) == offset => {
                StoredRun { base_offset: run.base_offset, record_count: run.record_count + 1 }
            }
            Some(run) => run, // a later duplicate of an old sequence: keep the first
            None => StoredRun { base_offset: offset, record_count: 1 },
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
            index.observe(offset, Some(("a".into(), 5)));
        }
        index.observe(13, Some(("b".into(), 1)));
        assert_eq!(index.lookup("a", 5), Some(StoredRun { base_offset: 10, record_count: 3 }));
        assert_eq!(index.lookup("b", 1), Some(StoredRun { base_offset: 13, record_count: 1 }));
        for sequence in 6..10 {
            index.insert("a", sequence, StoredRun { base_offset: 100 + sequence as i64, record_count: 1 });
        }
        assert_eq!(index.lookup("a", 5), None, "only the last 3 sequences are kept");
        assert!(index.lookup("a", 9).is_some());
        index.insert("c", 1, StoredRun { base_offset: 0, record_count: 1 });
        assert_eq!(index.devices(), 2);
        assert_eq!(index.lookup("b", 1), None, "the least recently written device is forgotten first");
    }
}
