//! A faulty file for the simulation: what the disk holds for sure (`durable`) and the
//! writes since the last successful sync (`pending`). Reads see both, as a page cache
//! would. A sync makes every pending write durable. A crash keeps the durable bytes and
//! a prefix of the pending writes in issue order, the last kept one possibly torn at
//! any byte (stricter than the sector-sized tears of a real device). Whether a write or
//! a sync fails, and how long it takes, is the world's decision (`world.rs`), drawn
//! from the run's seed.

use super::SimRandom;

#[derive(Debug, Default, Clone)]
pub(crate) struct SimFile {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

fn apply(into: &mut Vec<u8>, position: u64, bytes: &[u8]) {
    let start = position as usize;
    let end = start + bytes.len();
    if into.len() < end {
        into.resize(end, 0);
    }
    into[start..end].copy_from_slice(bytes);
}

impl SimFile {
    /// Issues a write; it is durable only after the next successful `sync`.
    pub(crate) fn write(&mut self, position: u64, bytes: Vec<u8>) {
        self.pending.push((position, bytes));
    }

    pub(crate) fn sync(&mut self) {
        for (position, bytes) in std::mem::take(&mut self.pending) {
            apply(&mut self.durable, position, &bytes);
        }
    }

    /// What a read sees now.
    pub(crate) fn contents(&self) -> Vec<u8> {
        let mut bytes = self.durable.clone();
        for (position, write) in &self.pending {
            apply(&mut bytes, *position, write);
        }
        bytes
    }

    /// Bytes `[position, position + length)` as a read sees them (zeros past the end).
    pub(crate) fn read(&self, position: u64, length: usize) -> Vec<u8> {
        let mut out = vec![0u8; length];
        let start = position as usize;
        let copy = |out: &mut [u8], source: &[u8], source_position: usize| {
            let from = start.max(source_position);
            let to = (start + length).min(source_position + source.len());
            if from < to {
                out[from - start..to - start].copy_from_slice(&source[from - source_position..to - source_position]);
            }
        };
        copy(&mut out, &self.durable, 0);
        for (write_position, write) in &self.pending {
            copy(&mut out, write, *write_position as usize);
        }
        out
    }

    /// The machine lost power: keeps the durable bytes and a torn prefix of the
    /// pending writes. Returns how many pending bytes survived, of how many.
    pub(crate) fn crash(&mut self, random: &mut SimRandom) -> (usize, usize) {
        let pending = std::mem::take(&mut self.pending);
        let total: usize = pending.iter().map(|(_, bytes)| bytes.len()).sum();
        let mut keep = random.below_or_equal(total as u64) as usize;
        let kept = keep;
        for (position, bytes) in pending {
            if keep == 0 {
                break;
            }
            let length = bytes.len().min(keep);
            apply(&mut self.durable, position, &bytes[..length]);
            keep -= length;
        }
        (kept, total)
    }

    /// Zeroes `[position, ..)` and makes it durable (recovery cutting a torn tail).
    pub(crate) fn zero_from(&mut self, position: u64) {
        self.sync();
        let start = (position as usize).min(self.durable.len());
        self.durable[start..].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_durable_bytes_and_a_prefix_of_pending_ones() {
        for seed in 0..50 {
            let mut random = SimRandom::new(seed);
            let mut file = SimFile::default();
            file.write(0, vec![1; 10]);
            file.sync();
            file.write(10, vec![2; 10]);
            file.write(5, vec![3; 10]);
            assert_eq!(file.read(8, 4), vec![3, 3, 3, 3]);
            let (kept, total) = file.crash(&mut random);
            assert_eq!(total, 20);
            let mut expected = vec![1u8; 10];
            expected.resize(10 + kept.min(10), 2);
            if kept > 10 {
                let second = kept - 10;
                expected.resize(expected.len().max(5 + second), 0);
                expected[5..5 + second].fill(3);
            }
            assert_eq!(file.contents(), expected, "kept {kept}");
        }
    }
}
