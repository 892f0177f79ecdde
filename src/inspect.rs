//! `weir inspect`: verifies a data directory or one partition offline. Every batch's
//! CRC, offset continuity inside and across segments, and every index entry against the
//! batch it points at. Reads with ordinary buffered I/O (it runs while weir is stopped)
//! and reuses the recovery scan from `core::log`, so it judges bytes exactly as recovery
//! would. Each partition's first problem is reported with its file and byte offset, and
//! a problem in one partition never hides the others (`inspect_each`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::core::log::batch::check_batch;
use crate::core::log::index::{self, IndexEntry};
use crate::core::log::recovery::{
    find_later_batch, scan_window, InvalidBatch, ScanCursor, ScanStop, SCAN_WINDOW_BYTES,
};
use crate::core::log::segment;

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub position: u64,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}: byte {}: {}", self.path.display(), self.position, self.what)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PartitionSummary {
    pub name: String,
    pub segments: u64,
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
    pub start_offset: i64,
    pub next_offset: i64,
    /// Zero bytes of preallocation after the data of the active segment.
    pub preallocated_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub partitions: Vec<PartitionSummary>,
}

/// Partition directories under `path`: `path` itself if it holds segments, else its
/// subdirectories that do.
pub fn partition_directories(path: &Path) -> Result<Vec<PathBuf>, Problem> {
    let problem = |what: String| Problem { path: path.to_owned(), position: 0, what };
    if !path.is_dir() {
        return Err(problem("not a directory".into()));
    }
    if !segment_bases(path)?.is_empty() {
        return Ok(vec![path.to_owned()]);
    }
    let mut found = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|error| problem(format!("cannot list: {error}")))?;
    for entry in entries {
        let entry = entry.map_err(|error| problem(format!("cannot list: {error}")))?;
        if entry.path().is_dir() && !segment_bases(&entry.path())?.is_empty() {
            found.push(entry.path());
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(problem("holds no partition (no <20-digit offset>.log segment files)".into()));
    }
    Ok(found)
}

fn segment_bases(directory: &Path) -> Result<Vec<i64>, Problem> {
    let mut bases = Vec::new();
    let entries = std::fs::read_dir(directory).map_err(|error| Problem {
        path: directory.to_owned(),
        position: 0,
        what: format!("cannot list: {error}"),
    })?;
    for entry in entries.flatten() {
        if let Some(base) = entry.file_name().to_str().and_then(segment::parse_log_file_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Verifies every partition under `path`, calling `progress(bytes)` as it reads.
pub fn inspect(path: &Path, mut progress: impl FnMut(u64)) -> Result<Summary, Problem> {
    let mut summary = Summary::default();
    for directory in partition_directories(path)? {
        summary.partitions.push(inspect_partition(&directory, &mut progress)?);
    }
    Ok(summary)
}

/// One partition's verdict: its summary, or its first problem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionReport {
    /// Zero but for its name when the partition has a problem.
    #[serde(flatten)]
    pub summary: PartitionSummary,
    /// `path: byte N: what`, when the partition does not verify.
    pub problem: Option<String>,
}

/// Every partition under `path`, verified independently.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub partitions: Vec<PartitionReport>,
    /// How many partitions have a problem.
    pub problems: usize,
}

/// Verifies every partition under `path`, each to its own end: a corrupt partition is
/// reported and the next one is checked anyway. `Err` only when `path` holds no
/// partition at all.
pub fn inspect_each(path: &Path, mut progress: impl FnMut(u64)) -> Result<Report, Problem> {
    let mut report = Report::default();
    for directory in partition_directories(path)? {
        let name = directory.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let (summary, problem) = match inspect_partition(&directory, &mut progress) {
            Ok(summary) => (summary, None),
            Err(problem) => (PartitionSummary { name, ..PartitionSummary::default() }, Some(problem.to_string())),
        };
        report.problems += usize::from(problem.is_some());
        report.partitions.push(PartitionReport { summary, problem });
    }
    Ok(report)
}

/// Total bytes of segment files under `path` (for a progress bar).
pub fn total_bytes(path: &Path) -> u64 {
    let Ok(directories) = partition_directories(path) else { return 0 };
    let mut total = 0;
    for directory in directories {
        for base in segment_bases(&directory).unwrap_or_default() {
            total += std::fs::metadata(segment::log_path(&directory, base)).map_or(0, |metadata| metadata.len());
        }
    }
    total
}

fn inspect_partition(directory: &Path, progress: &mut impl FnMut(u64)) -> Result<PartitionSummary, Problem> {
    let bases = segment_bases(directory)?;
    let mut summary = PartitionSummary {
        name: directory.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
        start_offset: bases.first().copied().unwrap_or(0),
        next_offset: bases.first().copied().unwrap_or(0),
        ..PartitionSummary::default()
    };
    for (position, base) in bases.iter().enumerate() {
        let is_active = position + 1 == bases.len();
        let path = segment::log_path(directory, *base);
        if *base != summary.next_offset {
            return Err(Problem {
                path,
                position: 0,
                what: format!("segment starts at offset {base}, but the previous one ends at {}", summary.next_offset),
            });
        }
        let checked = inspect_segment(directory, *base, is_active, progress)?;
        summary.segments += 1;
        summary.batches += checked.cursor.batches;
        summary.records += checked.cursor.records;
        summary.bytes += checked.cursor.position;
        summary.next_offset = checked.cursor.next_offset;
        summary.preallocated_bytes += checked.preallocated_bytes;
    }
    Ok(summary)
}

struct CheckedSegment {
    cursor: ScanCursor,
    preallocated_bytes: u64,
}

fn inspect_segment(
    directory: &Path,
    base: i64,
    is_active: bool,
    progress: &mut impl FnMut(u64),
) -> Result<CheckedSegment, Problem> {
    let path = segment::log_path(directory, base);
    let io_problem =
        |position: u64, error: std::io::Error| Problem { path: path.clone(), position, what: error.to_string() };
    let file = File::open(&path).map_err(|error| io_problem(0, error))?;
    let file_bytes = file.metadata().map_err(|error| io_problem(0, error))?.len();
    let index_path = segment::index_path(directory, base);
    let index_bytes = match std::fs::read(&index_path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => return Err(Problem { path: index_path, position: 0, what: error.to_string() }),
    };
    let (entries, garbage) = index::parse_entries(&index_bytes);
    if garbage {
        let position = (entries.len() * index::INDEX_ENTRY_BYTES) as u64;
        return Err(Problem {
            path: index_path,
            position,
            what: "index entry does not grow in offset and position".into(),
        });
    }
    let mut pending_entries = entries.iter().copied().peekable();
    let mut index_problem: Option<Problem> = None;
    let mut cursor = ScanCursor { position: 0, next_offset: base, batches: 0, records: 0 };
    let mut window = vec![0u8; SCAN_WINDOW_BYTES];
    loop {
        let window_position = cursor.position;
        let want = SCAN_WINDOW_BYTES.min(file_bytes.saturating_sub(window_position) as usize);
        let read = read_fully(&file, &mut window[..want], window_position)
            .map_err(|error| io_problem(window_position, error))?;
        let at_end = window_position + read as u64 >= file_bytes;
        let stop = scan_window(&window[..read], window_position, at_end, &mut cursor, |position, header| {
            check_index_entries(
                &mut pending_entries,
                position,
                header.base_offset,
                base,
                &index_path,
                &mut index_problem,
            );
        });
        progress(cursor.position - window_position);
        if let Some(problem) = index_problem.take() {
            return Err(problem);
        }
        match stop {
            ScanStop::NeedMore if !at_end => continue,
            ScanStop::NeedMore => break,
            ScanStop::Invalid(reason) => {
                let bad_at = cursor.position - window_position;
                let rest = &window[bad_at as usize..read];
                if reason.is_zero_length()
                    && is_active
                    && rest.iter().all(|byte| *byte == 0)
                    && read_all_zero(&file, window_position + read as u64, file_bytes)
                {
                    let preallocated_bytes = file_bytes - cursor.position;
                    if let Some(entry) = pending_entries.next() {
                        return Err(Problem {
                            path: index_path,
                            position: 0,
                            what: format!("index entry {entry:?} points past the end of the log ({})", cursor.position),
                        });
                    }
                    return Ok(CheckedSegment { cursor, preallocated_bytes });
                }
                let what = if find_later_batch(rest, cursor.position, cursor.next_offset).is_some() {
                    format!("{reason}; valid batches follow (corruption before the tail)")
                } else if is_active {
                    format!("{reason}; torn tail (recovery will cut it)")
                } else {
                    format!("{reason} in a sealed segment")
                };
                return Err(Problem { path: path.clone(), position: cursor.position, what });
            }
        }
    }
    if let Some(entry) = pending_entries.next() {
        return Err(Problem {
            path: index_path,
            position: 0,
            what: format!("index entry {entry:?} points past the end of the log ({})", cursor.position),
        });
    }
    Ok(CheckedSegment { cursor, preallocated_bytes: 0 })
}

fn check_index_entries(
    pending: &mut std::iter::Peekable<impl Iterator<Item = IndexEntry>>,
    position: u64,
    base_offset: i64,
    segment_base: i64,
    index_path: &Path,
    problem: &mut Option<Problem>,
) {
    while let Some(entry) = pending.peek().copied() {
        let entry_position = u64::from(entry.position);
        if entry_position > position {
            return;
        }
        pending.next();
        let expected = segment_base + i64::from(entry.relative_offset);
        if entry_position < position || expected != base_offset {
            problem.get_or_insert(Problem {
                path: index_path.to_owned(),
                position: 0,
                what: format!(
                    "index entry (offset {expected}, byte {entry_position}) does not match the batch there (offset {base_offset} at byte {position})"
                ),
            });
        }
    }
}

/// Reads into `buffer` from `position` until it is full or the file ends; returns the
/// bytes read (fewer than asked only at the end of the file). Also `weir tail`'s reader.
pub fn read_fully(file: &File, buffer: &mut [u8], position: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buffer.len() {
        let count = file.read_at(&mut buffer[done..], position + done as u64)?;
        if count == 0 {
            break;
        }
        done += count;
    }
    Ok(done)
}

fn read_all_zero(file: &File, mut position: u64, end: u64) -> bool {
    let mut buffer = vec![0u8; 1 << 20];
    while position < end {
        let want = buffer.len().min((end - position) as usize);
        match read_fully(file, &mut buffer[..want], position) {
            Ok(0) | Err(_) => return false,
            Ok(count) => {
                if buffer[..count].iter().any(|byte| *byte != 0) {
                    return false;
                }
                position += count as u64;
            }
        }
    }
    true
}

/// Checks that `bytes` (a batch read from the log) is valid: used by tools and tests.
pub fn check_stored_batch(bytes: &[u8]) -> Result<(), InvalidBatch> {
    check_batch(bytes).map(|_| ()).map_err(InvalidBatch::from)
}
