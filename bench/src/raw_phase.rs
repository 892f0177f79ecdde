//! Phase two: the raw ceiling, one round's slice of it. The same cores, one new scratch
//! file per partition and round on the same filesystem (so, with the default rounds, a
//! file stays below a segment's size, as weir's active segment does), each written by one task as weir's flusher writes a segment:
//! sequential O_DIRECT writes (glommio `DmaFile`, one aligned DMA buffer) of the size
//! weir's group commit produced, each followed by `fdatasync`, with space preallocated
//! (`fallocate`) in the same steps as weir's `log.preallocate_bytes`.
//!
//! The writing itself is `weir::shell::ceiling`, the code `weir doctor --measure` runs,
//! so the bench and the doctor report one measurement. What it leaves out is exactly
//! what weir adds on top of the disk: the group-commit window, encoding and CRC, the
//! rewritten tail page, index writes and segment rolls. The files are deleted afterwards.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use weir::shell::ceiling::{self, CeilingFile, CeilingSample};
use weir::shell::disk::DiskError;

use crate::cores::CoreContext;
use crate::{latency_histogram, BenchError};

/// Everything one core needs for the raw phase.
pub struct RawCoreInput {
    pub files: Vec<PathBuf>,
    pub write_bytes: usize,
    pub preallocate_bytes: u64,
    pub duration: Duration,
}

/// What one core measured, in the raw phase or the plain one.
pub struct RawCoreResult {
    pub fsync_ns: Histogram<u64>,
    /// One write plus its fdatasync.
    pub write_and_fsync_ns: Histogram<u64>,
    pub writes: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

struct Histograms {
    fsync_ns: Histogram<u64>,
    write_and_fsync_ns: Histogram<u64>,
}

fn raw_error(error: DiskError) -> BenchError {
    BenchError::Raw { operation: error.operation, path: error.path, position: error.position, source: error.source }
}

pub async fn run_core(context: CoreContext, input: RawCoreInput) -> Result<RawCoreResult, BenchError> {
    let mut files = Vec::with_capacity(input.files.len());
    for path in &input.files {
        match CeilingFile::create(path).await {
            Ok(file) => files.push(Rc::new(file)),
            Err(error) => {
                // The create error is the one to report; removing the others is best effort.
                let _ = remove_all(files).await;
                return Err(raw_error(error));
            }
        }
    }
    let gate = context.start_gate().await;
    let mut outcome = match gate {
        Ok(()) => measure(&context, &files, &input).await,
        Err(error) => Err(error),
    };
    if let Err(error) = remove_all(files).await {
        outcome = outcome.and(Err(error));
    }
    outcome
}

/// Closes and deletes every scratch file; the first failure is returned.
async fn remove_all(files: Vec<Rc<CeilingFile>>) -> Result<(), BenchError> {
    let mut first_error = None;
    for file in files {
        let file = Rc::try_unwrap(file).ok().expect("every writer task has finished");
        if let Err(error) = file.remove().await {
            first_error.get_or_insert(raw_error(error));
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn measure(
    context: &CoreContext,
    files: &[Rc<CeilingFile>],
    input: &RawCoreInput,
) -> Result<RawCoreResult, BenchError> {
    let started = Instant::now();
    let deadline = started + input.duration;
    let histograms =
        Rc::new(RefCell::new(Histograms { fsync_ns: latency_histogram(), write_and_fsync_ns: latency_histogram() }));
    let mut tasks = Vec::with_capacity(files.len());
    for file in files {
        let (context, histograms) = (context.clone(), histograms.clone());
        let observe = move |sample: CeilingSample| {
            let mut histograms = histograms.borrow_mut();
            histograms.fsync_ns.saturating_record(sample.fsync_ns);
            histograms.write_and_fsync_ns.saturating_record(sample.write_and_fsync_ns);
            context.add_progress_bytes(sample.bytes);
        };
        let task =
            ceiling::write_and_sync_until(file.clone(), input.write_bytes, input.preallocate_bytes, deadline, observe);
        tasks.push(glommio::spawn_local(task));
    }
    let (mut writes, mut bytes) = (0u64, 0u64);
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(totals) => {
                writes += totals.writes;
                bytes += totals.bytes;
            }
            Err(error) => {
                first_error.get_or_insert(raw_error(error));
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(error) = first_error {
        return Err(error);
    }
    let histograms = Rc::try_unwrap(histograms).ok().expect("every writer task has finished").into_inner();
    Ok(RawCoreResult {
        fsync_ns: histograms.fsync_ns,
        write_and_fsync_ns: histograms.write_and_fsync_ns,
        writes,
        bytes,
        elapsed,
    })
}
