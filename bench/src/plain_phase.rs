//! Phase three: the plain io_uring ceiling, one round's slice of it. Per core one plain
//! thread, pinned to the core's CPU, with its own io_uring ring (the `io-uring` crate,
//! no executor): one new scratch file per partition on the same filesystem, each with
//! one O_DIRECT write of the size weir's group commit produced linked to an
//! `fdatasync` (IOSQE_IO_LINK) in flight at a time; the thread blocks in
//! `io_uring_enter` until a pair completes and submits that file's next pair. Space is
//! preallocated (`fallocate`) in the same steps as weir's `log.preallocate_bytes`.
//!
//! It is what issue 14 asks weir's log to be measured against besides glommio's
//! `DmaFile`: the disk through the thinnest path the kernel offers, so that the cost of
//! an executor on top shows as well as the cost of weir's log. The files are deleted
//! afterwards.
//!
//! Timing: a pair's write+fdatasync time runs from its submission to the fdatasync's
//! completion; its fdatasync time from the moment the thread reaped the write's
//! completion (usually the same wake-up) to the fdatasync's completion, so it can read
//! lower than glommio's, never higher. With `--plain-durable dsync` each write carries
//! RWF_DSYNC and is its own fdatasync, so both times are the write's.
#![allow(unsafe_code)] // io_uring submission and the aligned buffer: see each SAFETY note.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use crate::options::PlainDurable;
use crate::raw_phase::RawCoreResult;
use crate::{latency_histogram, BenchError};

/// What one core measures in the plain phase.
pub struct PlainCoreInput {
    pub cpu: usize,
    pub files: Vec<PathBuf>,
    pub write_bytes: usize,
    pub preallocate_bytes: u64,
    pub duration: Duration,
    pub durable: PlainDurable,
}

/// The page-aligned buffer every write of a core sends (the kernel only reads it).
struct AlignedBuffer {
    pointer: *mut u8,
    layout: Layout,
}

impl AlignedBuffer {
    fn new(bytes: usize) -> AlignedBuffer {
        let layout = Layout::from_size_align(bytes, weir::config::DIRECT_IO_ALIGNMENT_BYTES as usize)
            .expect("the write size is a positive multiple of the alignment");
        // SAFETY: `layout` has a non-zero size (checked by the caller's assert).
        let pointer = unsafe { alloc::alloc(layout) };
        if pointer.is_null() {
            alloc::handle_alloc_error(layout);
        }
        // Not zeros: a filesystem or device must not be able to shortcut the bytes.
        for index in 0..bytes {
            // SAFETY: `index < bytes`, the allocation's size.
            unsafe { pointer.add(index).write((index % 251) as u8 | 1) };
        }
        AlignedBuffer { pointer, layout }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; no write is in flight once the
        // phase's loop has returned (every submitted pair was reaped or the ring dropped).
        unsafe { alloc::dealloc(self.pointer, self.layout) };
    }
}

/// One scratch file and where its writer is.
struct PlainFile {
    path: PathBuf,
    file: File,
    position: u64,
    allocated_bytes: u64,
    submitted: Instant,
    write_reaped: Option<Instant>,
}

fn raw_error(operation: &'static str, path: &Path, position: u64, source: io::Error) -> BenchError {
    BenchError::Raw { operation, path: path.to_owned(), position, source }
}

/// Runs the plain phase on every core at once (one pinned thread each), started
/// together after every thread has created its files; returns results in core order.
pub fn run_phase(inputs: Vec<PlainCoreInput>) -> Result<Vec<RawCoreResult>, BenchError> {
    let start = Arc::new(Barrier::new(inputs.len()));
    let threads = inputs
        .into_iter()
        .map(|input| {
            let start = start.clone();
            std::thread::Builder::new()
                .name(format!("plain-ring-{}", input.cpu))
                .spawn(move || run_core(input, &start))
                .map_err(|source| raw_error("spawn thread", Path::new("plain-ring"), 0, source))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut results = Vec::with_capacity(threads.len());
    let mut first_error = None;
    for thread in threads {
        match thread.join().expect("a plain-ring thread does not panic") {
            Ok(result) => results.push(result),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(results), Err)
}

fn run_core(input: PlainCoreInput, start: &Barrier) -> Result<RawCoreResult, BenchError> {
    pin_to_cpu(input.cpu);
    let opened = open_files(&input.files);
    // Every thread passes the barrier, failed or not, so none waits forever.
    start.wait();
    let mut files = opened?;
    let outcome = measure(&mut files, &input);
    let mut removed = Ok(());
    for file in files {
        if let Err(source) = std::fs::remove_file(&file.path) {
            removed = removed.and(Err(raw_error("remove", &file.path, 0, source)));
        }
    }
    let result = outcome?;
    removed.map(|()| result)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity
    // only read and write that local set. Failure leaves the thread unpinned, which the
    // bench tolerates (the glommio phases pin; this one would only be noisier).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn open_files(paths: &[PathBuf]) -> Result<Vec<PlainFile>, BenchError> {
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|source| raw_error("create", path, 0, source));
        match file {
            Ok(file) => files.push(PlainFile {
                path: path.clone(),
                file,
                position: 0,
                allocated_bytes: 0,
                submitted: Instant::now(),
                write_reaped: None,
            }),
            Err(error) => {
                for file in files {
                    let _ = std::fs::remove_file(&file.path);
                }
                return Err(error);
            }
        }
    }
    Ok(files)
}

/// The user data of a completion: the file's index, and whether it is the fdatasync.
fn user_data(file: usize, is_sync: bool) -> u64 {
    (file as u64) << 1 | u64::from(is_sync)
}

fn measure(files: &mut [PlainFile], input: &PlainCoreInput) -> Result<RawCoreResult, BenchError> {
    assert!(input.write_bytes > 0 && input.preallocate_bytes > 0);
    let buffer = AlignedBuffer::new(input.write_bytes);
    let entries = (files.len() * 2).next_power_of_two().max(8) as u32;
    let mut ring = IoUring::new(entries).map_err(|source| raw_error("io_uring_setup", &files[0].path, 0, source))?;
    let (mut fsync_ns, mut write_and_fsync_ns) = (latency_histogram(), latency_histogram());
    let started = Instant::now();
    let deadline = started + input.duration;
    let mut in_flight = 0usize;
    let mut writes = 0u64;
    let mut first_error = None;
    for index in 0..files.len() {
        match submit_pair(&mut ring, files, index, &buffer, input) {
            Ok(()) => in_flight += 1,
            Err(error) => {
                first_error.get_or_insert(error);
                break;
            }
        }
    }
    while in_flight > 0 {
        if let Err(source) = ring.submit_and_wait(1) {
            if source.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            first_error.get_or_insert(raw_error("io_uring_enter", &files[0].path, 0, source));
            break;
        }
        let reaped = Instant::now();
        let completions = ring.completion().map(|entry| (entry.user_data(), entry.result())).collect::<Vec<_>>();
        for (data, result) in completions {
            let (index, is_sync) = ((data >> 1) as usize, data & 1 == 1);
            let file = &mut files[index];
            if result < 0 {
                let operation = if is_sync { "fdatasync" } else { "write" };
                first_error.get_or_insert(raw_error(
                    operation,
                    &file.path,
                    file.position,
                    io::Error::from_raw_os_error(-result),
                ));
            } else if (!is_sync || input.durable == PlainDurable::Dsync) && result as usize != input.write_bytes {
                first_error.get_or_insert(raw_error(
                    "write",
                    &file.path,
                    file.position,
                    io::Error::new(io::ErrorKind::WriteZero, format!("short write: {result} of {}", input.write_bytes)),
                ));
            }
            if !is_sync {
                file.write_reaped = Some(reaped);
                if input.durable == PlainDurable::Separate && result >= 0 {
                    if let Err(error) = submit_sync(&mut ring, &files[index], index) {
                        first_error.get_or_insert(error);
                        in_flight -= 1;
                    }
                }
                continue;
            }
            // The pair is done (a failed write cancels its linked fdatasync, which
            // then completes with ECANCELED and is counted above).
            in_flight -= 1;
            if result >= 0 && first_error.is_none() {
                // A RWF_DSYNC write is its own fdatasync: its whole time counts as both.
                let write_reaped = file.write_reaped.take().unwrap_or(file.submitted);
                fsync_ns.saturating_record((reaped - write_reaped).as_nanos().max(1) as u64);
                write_and_fsync_ns.saturating_record((reaped - file.submitted).as_nanos().max(1) as u64);
                file.position += input.write_bytes as u64;
                writes += 1;
                if reaped < deadline {
                    match submit_pair(&mut ring, files, index, &buffer, input) {
                        Ok(()) => in_flight += 1,
                        Err(error) => {
                            first_error.get_or_insert(error);
                        }
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();
    if in_flight > 0 {
        // The kernel may still read the buffer for writes the failed loop left in
        // flight: leak it rather than free memory under them.
        std::mem::forget(buffer);
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    Ok(RawCoreResult { fsync_ns, write_and_fsync_ns, writes, bytes: writes * input.write_bytes as u64, elapsed })
}

/// Queues file `index`'s next write linked to its fdatasync (preallocating first, as
/// weir's write plan does, in whole steps past the allocated end).
fn submit_pair(
    ring: &mut IoUring,
    files: &mut [PlainFile],
    index: usize,
    buffer: &AlignedBuffer,
    input: &PlainCoreInput,
) -> Result<(), BenchError> {
    let file = &mut files[index];
    let write_end = file.position + input.write_bytes as u64;
    if write_end > file.allocated_bytes {
        let step = (write_end - file.allocated_bytes).div_ceil(input.preallocate_bytes) * input.preallocate_bytes;
        // SAFETY: fallocate on an open descriptor with plain integer arguments.
        let result = unsafe { libc::fallocate(file.file.as_raw_fd(), 0, file.allocated_bytes as i64, step as i64) };
        if result != 0 {
            return Err(raw_error(
                weir::shell::disk::PREALLOCATE,
                &file.path,
                file.allocated_bytes,
                io::Error::last_os_error(),
            ));
        }
        file.allocated_bytes += step;
    }
    let fd = types::Fd(file.file.as_raw_fd());
    let write = opcode::Write::new(fd, buffer.pointer, input.write_bytes as u32).offset(file.position);
    file.submitted = Instant::now();
    file.write_reaped = None;
    match input.durable {
        PlainDurable::Linked => {
            let write = write.build().flags(squeue::Flags::IO_LINK).user_data(user_data(index, false));
            let sync =
                opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(user_data(index, true));
            // SAFETY: the buffer outlives every submission (it is dropped after
            // `measure`'s loop has reaped every pair) and the kernel only reads it; the
            // descriptor stays open until the files are removed after the loop.
            unsafe {
                let mut submission = ring.submission();
                submission.push(&write).map_err(|_| ring_full(&file.path))?;
                submission.push(&sync).map_err(|_| ring_full(&file.path))?;
            }
        }
        PlainDurable::Separate => {
            let write = write.build().user_data(user_data(index, false));
            // SAFETY: as for the linked pair.
            unsafe { ring.submission().push(&write).map_err(|_| ring_full(&file.path))? };
        }
        PlainDurable::Dsync => {
            // One operation that is the write and its durability: its completion counts
            // as the pair's (user data of the "sync").
            let write = write.rw_flags(libc::RWF_DSYNC).build().user_data(user_data(index, true));
            // SAFETY: as above.
            unsafe { ring.submission().push(&write).map_err(|_| ring_full(&file.path))? };
        }
    }
    Ok(())
}

/// Queues the fdatasync of file `index`'s completed write (`--plain-durable separate`).
fn submit_sync(ring: &mut IoUring, file: &PlainFile, index: usize) -> Result<(), BenchError> {
    let sync = opcode::Fsync::new(types::Fd(file.file.as_raw_fd()))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(user_data(index, true));
    // SAFETY: an fdatasync refers to no memory; the descriptor stays open (see above).
    unsafe { ring.submission().push(&sync).map_err(|_| ring_full(&file.path)) }
}

fn ring_full(path: &Path) -> BenchError {
    raw_error("io_uring submit", path, 0, io::Error::other("submission queue full"))
}
