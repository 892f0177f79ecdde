//! Phase two: the raw ceiling. The same cores, one scratch file per partition on the
//! same filesystem, each written by one task as weir's flusher writes a segment:
//! sequential O_DIRECT writes (glommio `DmaFile`, one aligned DMA buffer) of the size
//! weir's group commit produced, each followed by `fdatasync`, with space preallocated
//! (`fallocate`) in the same steps as weir's `log.preallocate_bytes`.
//!
//! What it leaves out is exactly what weir adds on top of the disk: the group-commit
//! window, encoding and CRC, the rewritten tail page, index writes and segment rolls.
//! The files are deleted afterwards.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::{DmaFile, OpenOptions};
use hdrhistogram::Histogram;

use crate::cores::CoreContext;
use crate::{latency_histogram, BenchError};

/// Everything one core needs for the raw phase.
pub struct RawCoreInput {
    pub files: Vec<PathBuf>,
    pub write_bytes: usize,
    pub preallocate_bytes: u64,
    pub duration: Duration,
}

/// What one core measured.
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

fn raw_error(
    operation: &'static str,
    path: &std::path::Path,
    position: u64,
    error: glommio::GlommioError<()>,
) -> BenchError {
    BenchError::Raw { operation, path: path.to_owned(), position, source: error.into() }
}

pub async fn run_core(context: CoreContext, input: RawCoreInput) -> Result<RawCoreResult, BenchError> {
    let mut files = Vec::with_capacity(input.files.len());
    for path in &input.files {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(path)
            .await
            .map_err(|error| raw_error("create", path, 0, error))?;
        files.push((path.clone(), Rc::new(file)));
    }
    let gate = context.start_gate().await;
    let mut outcome = match gate {
        Ok(()) => measure(&context, &files, &input).await,
        Err(error) => Err(error),
    };
    for (path, file) in files {
        if let Ok(file) = Rc::try_unwrap(file) {
            if let Err(error) = file.close().await {
                outcome = outcome.and(Err(raw_error("close", &path, 0, error)));
            }
        }
        if let Err(source) = std::fs::remove_file(&path) {
            outcome = outcome.and(Err(BenchError::Raw { operation: "remove", path, position: 0, source }));
        }
    }
    outcome
}

async fn measure(
    context: &CoreContext,
    files: &[(PathBuf, Rc<DmaFile>)],
    input: &RawCoreInput,
) -> Result<RawCoreResult, BenchError> {
    let started = Instant::now();
    let deadline = started + input.duration;
    let histograms =
        Rc::new(RefCell::new(Histograms { fsync_ns: latency_histogram(), write_and_fsync_ns: latency_histogram() }));
    let mut tasks = Vec::with_capacity(files.len());
    for (path, file) in files {
        let task = writer_loop(
            context.clone(),
            path.clone(),
            file.clone(),
            input.write_bytes,
            input.preallocate_bytes,
            deadline,
            histograms.clone(),
        );
        tasks.push(glommio::spawn_local(task));
    }
    let (mut writes, mut bytes) = (0u64, 0u64);
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok((task_writes, task_bytes)) => {
                writes += task_writes;
                bytes += task_bytes;
            }
            Err(error) => {
                first_error.get_or_insert(error);
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

async fn writer_loop(
    context: CoreContext,
    path: PathBuf,
    file: Rc<DmaFile>,
    write_bytes: usize,
    preallocate_bytes: u64,
    deadline: Instant,
    histograms: Rc<RefCell<Histograms>>,
) -> Result<(u64, u64), BenchError> {
    assert_eq!(write_bytes as u64 % file.alignment().max(1), 0, "raw writes are aligned");
    let mut buffer = file.alloc_dma_buffer(write_bytes);
    // Not zeros: a filesystem or device must not be able to shortcut the bytes.
    for (index, byte) in buffer.as_bytes_mut().iter_mut().enumerate() {
        *byte = (index % 251) as u8 | 1;
    }
    let buffer = Rc::new(buffer);
    let (mut position, mut allocated_bytes, mut writes) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        let write_end = position + write_bytes as u64;
        if write_end > allocated_bytes {
            // The same policy as weir's write plan: whole steps past the allocated end.
            allocated_bytes += (write_end - allocated_bytes).div_ceil(preallocate_bytes) * preallocate_bytes;
            file.pre_allocate(allocated_bytes, false)
                .await
                .map_err(|error| raw_error("preallocate", &path, allocated_bytes, error))?;
        }
        let write_started = Instant::now();
        let written = file
            .write_rc_at(buffer.clone(), position)
            .await
            .map_err(|error| raw_error("write", &path, position, error))?;
        if written != write_bytes {
            return Err(BenchError::Raw {
                operation: "write",
                path,
                position,
                source: std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write: {written} of {write_bytes} bytes"),
                ),
            });
        }
        let sync_started = Instant::now();
        file.fdatasync().await.map_err(|error| raw_error("fdatasync", &path, position, error))?;
        let synced = Instant::now();
        {
            let mut histograms = histograms.borrow_mut();
            histograms.fsync_ns.saturating_record((synced - sync_started).as_nanos() as u64);
            histograms.write_and_fsync_ns.saturating_record((synced - write_started).as_nanos() as u64);
        }
        context.add_progress_bytes(write_bytes as u64);
        position = write_end;
        writes += 1;
    }
    Ok((writes, position))
}
