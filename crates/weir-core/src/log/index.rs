//! The sparse offset index of a segment: fixed-width 8-byte entries, big-endian
//! `(offset - segment base: u32, byte position in the segment: u32)`, one entry each
//! time at least `index_interval_bytes` of batches were written since the last one.
//!
//! The index is a hint, never the truth: recovery checks an entry against the batch it
//! points at before trusting it, so the index is written with the log but only synced
//! when a segment is sealed. The first batch (position 0) is never indexed, so an
//! all-zero entry marks the end of the entries.

pub const INDEX_ENTRY_BYTES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
}

impl IndexEntry {
    pub fn encode(&self) -> [u8; INDEX_ENTRY_BYTES] {
        let mut out = [0u8; INDEX_ENTRY_BYTES];
        out[..4].copy_from_slice(&self.relative_offset.to_be_bytes());
        out[4..].copy_from_slice(&self.position.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> IndexEntry {
        IndexEntry {
            relative_offset: u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")),
            position: u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")),
        }
    }
}

/// Entries from an index file's bytes: stops at the first all-zero entry, at a partial
/// entry, or at the first entry that does not grow in both offset and position
/// (garbage); the second value says whether it stopped on garbage.
pub fn parse_entries(bytes: &[u8]) -> (Vec<IndexEntry>, bool) {
    let mut entries: Vec<IndexEntry> = Vec::with_capacity(bytes.len() / INDEX_ENTRY_BYTES);
    for chunk in bytes.chunks_exact(INDEX_ENTRY_BYTES) {
        let entry = IndexEntry::decode(chunk);
        if entry.position == 0 && entry.relative_offset == 0 {
            return (entries, false);
        }
        let grows = entries
            .last()
            .is_none_or(|last| entry.relative_offset > last.relative_offset && entry.position > last.position);
        if entry.position == 0 || !grows {
            return (entries, true);
        }
        entries.push(entry);
    }
    (entries, false)
}

/// The byte position to start reading for `relative_offset`: the position of the last
/// entry at or below it, or 0.
pub fn lookup(entries: &[IndexEntry], relative_offset: u32) -> IndexEntry {
    let count = entries.partition_point(|entry| entry.relative_offset <= relative_offset);
    if count == 0 {
        IndexEntry { relative_offset: 0, position: 0 }
    } else {
        entries[count - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(relative_offset: u32, position: u32) -> IndexEntry {
        IndexEntry { relative_offset, position }
    }

    #[test]
    fn parse_stops_at_zero_and_garbage() {
        let mut bytes = Vec::new();
        for item in [entry(10, 4096), entry(20, 9000)] {
            bytes.extend_from_slice(&item.encode());
        }
        bytes.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_entries(&bytes), (vec![entry(10, 4096), entry(20, 9000)], false));
        let mut garbage = bytes[..16].to_vec();
        garbage.extend_from_slice(&entry(15, 10_000).encode());
        assert_eq!(parse_entries(&garbage), (vec![entry(10, 4096), entry(20, 9000)], true));
    }

    #[test]
    fn lookup_finds_floor_entry() {
        let entries = [entry(10, 4096), entry(20, 9000)];
        assert_eq!(lookup(&entries, 0), entry(0, 0));
        assert_eq!(lookup(&entries, 10), entry(10, 4096));
        assert_eq!(lookup(&entries, 19), entry(10, 4096));
        assert_eq!(lookup(&entries, 1000), entry(20, 9000));
    }
}
