//! Segment files: names, and where each write goes inside one.
//!
//! A segment is `<base offset, 20 digits>.log` with its index `<base>.index`. Writes are
//! planned here as pure arithmetic so the shell only executes them: every write starts
//! at the aligned position holding the partial tail page (which is rewritten with the
//! new bytes after it, never padded), and space is preallocated in large steps ahead of
//! the write position.

use std::path::{Path, PathBuf};

pub const OFFSET_DIGITS: usize = 20;
pub const LOG_SUFFIX: &str = "log";
pub const INDEX_SUFFIX: &str = "index";

pub fn log_file_name(base_offset: i64) -> String {
    format!("{base_offset:0width$}.{LOG_SUFFIX}", width = OFFSET_DIGITS)
}

pub fn index_file_name(base_offset: i64) -> String {
    format!("{base_offset:0width$}.{INDEX_SUFFIX}", width = OFFSET_DIGITS)
}

/// The base offset named by a segment log file, or None if `name` is not one.
pub fn parse_log_file_name(name: &str) -> Option<i64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != OFFSET_DIGITS || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn log_path(directory: &Path, base_offset: i64) -> PathBuf {
    directory.join(log_file_name(base_offset))
}

pub fn index_path(directory: &Path, base_offset: i64) -> PathBuf {
    directory.join(index_file_name(base_offset))
}

pub fn align_down(value: u64, alignment: u64) -> u64 {
    debug_assert!(alignment.is_power_of_two());
    value & !(alignment - 1)
}

pub fn align_up(value: u64, alignment: u64) -> u64 {
    align_down(value + alignment - 1, alignment)
}

/// One write of new bytes at the end of an append-only file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritePlan {
    /// Aligned file position the write starts at.
    pub write_position: u64,
    /// Bytes of the existing partial tail page copied to the front of the buffer.
    pub tail_bytes: usize,
    /// Aligned length of the write.
    pub write_bytes: usize,
    /// The file's logical end after the write.
    pub end_position: u64,
    /// Preallocate the file up to this size first, if set.
    pub preallocate_to: Option<u64>,
}

/// Plans appending `new_bytes` at logical position `end_position` of a file whose
/// space is allocated up to `allocated_bytes`.
pub fn plan_append(
    end_position: u64,
    new_bytes: usize,
    alignment: u64,
    allocated_bytes: u64,
    preallocate_step_bytes: u64,
) -> WritePlan {
    assert!(new_bytes > 0);
    let write_position = align_down(end_position, alignment);
    let tail_bytes = (end_position - write_position) as usize;
    let new_end = end_position + new_bytes as u64;
    let write_end = align_up(new_end, alignment);
    let preallocate_to = (write_end > allocated_bytes).then(|| {
        let steps = (write_end - allocated_bytes).div_ceil(preallocate_step_bytes);
        allocated_bytes + steps * preallocate_step_bytes
    });
    WritePlan {
        write_position,
        tail_bytes,
        write_bytes: (write_end - write_position) as usize,
        end_position: new_end,
        preallocate_to,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(log_file_name(42), "00000000000000000042.log");
        assert_eq!(parse_log_file_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_log_file_name("42.log"), None);
        assert_eq!(parse_log_file_name("0000000000000000004x.log"), None);
        assert_eq!(parse_log_file_name("00000000000000000042.index"), None);
    }

    #[test]
    fn append_rewrites_the_tail_page_and_preallocates_in_steps() {
        let plan = plan_append(5000, 100, 4096, 0, 1 << 20);
        assert_eq!(plan.write_position, 4096);
        assert_eq!(plan.tail_bytes, 904);
        assert_eq!(plan.write_bytes, 4096);
        assert_eq!(plan.end_position, 5100);
        assert_eq!(plan.preallocate_to, Some(1 << 20));
        let plan = plan_append(8192, 4096, 4096, 1 << 20, 1 << 20);
        assert_eq!((plan.tail_bytes, plan.write_bytes, plan.preallocate_to), (0, 4096, None));
        let plan = plan_append((1 << 20) - 10, 3 << 20, 4096, 1 << 20, 1 << 20);
        assert_eq!(plan.preallocate_to, Some(4 << 20));
    }
}
