//! The only code that does direct I/O. Files are glommio `DmaFile`s opened with
//! O_DIRECT; every position and length is aligned through `core::log::segment`'s
//! helpers; write buffers come from the executor's DMA pool (`engine.io_memory_bytes`,
//! allocated and registered with io_uring when the core starts). The partial tail page
//! is rewritten on the next append rather than padded, and space is preallocated in
//! large steps ahead of the write position.

use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, OpenOptions};

use crate::config::DIRECT_IO_ALIGNMENT_BYTES;
use crate::core::log::segment::{align_down, align_up, WritePlan};

/// The operation name of a failed preallocation: nothing was written, so the file is
/// as it was and the caller may go on (see `DiskError::is_full_before_write`).
pub const PREALLOCATE: &str = "preallocate";
/// The operation name of an append refused before any write because the data
/// directory is at `log.data_dir_bytes_max`.
pub const OVER_BUDGET: &str = "append within log.data_dir_bytes_max";

/// A failed disk operation, with what was being done and where.
#[derive(Debug, thiserror::Error)]
#[error("{operation} {path} at byte {position}: {source}")]
pub struct DiskError {
    pub operation: &'static str,
    pub path: PathBuf,
    pub position: u64,
    #[source]
    pub source: io::Error,
}

impl DiskError {
    /// The filesystem had no room for the space a write needed, and nothing was
    /// written: the file's bytes are unchanged.
    pub fn is_full_before_write(&self) -> bool {
        (self.operation == PREALLOCATE || self.operation == OVER_BUDGET)
            && self.source.kind() == io::ErrorKind::StorageFull
    }

    pub fn new(operation: &'static str, path: &Path, position: u64, source: impl Into<io::Error>) -> DiskError {
        DiskError { operation, path: path.to_owned(), position, source: source.into() }
    }
}

/// An append-only file written with O_DIRECT.
pub struct DirectFile {
    file: Rc<DmaFile>,
    path: PathBuf,
    /// Bytes preallocated (the file's size on disk, which may exceed the data).
    allocated_bytes: Cell<u64>,
}

impl DirectFile {
    /// Creates `path`, which must not exist.
    pub async fn create(path: &Path) -> Result<DirectFile, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(path)
            .await
            .map_err(|error| DiskError::new("create", path, 0, error))?;
        Ok(DirectFile { file: Rc::new(file), path: path.to_owned(), allocated_bytes: Cell::new(0) })
    }

    /// Opens an existing file for reading and writing.
    pub async fn open(path: &Path) -> Result<DirectFile, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(path)
            .await
            .map_err(|error| DiskError::new("open", path, 0, error))?;
        let allocated_bytes = file.file_size().await.map_err(|error| DiskError::new("stat", path, 0, error))?;
        Ok(DirectFile { file: Rc::new(file), path: path.to_owned(), allocated_bytes: Cell::new(allocated_bytes) })
    }

    /// Opens an existing file read-only (sealed segments).
    pub async fn open_read_only(path: &Path) -> Result<DirectFile, DiskError> {
        let file = DmaFile::open(path).await.map_err(|error| DiskError::new("open", path, 0, error))?;
        let allocated_bytes = file.file_size().await.map_err(|error| DiskError::new("stat", path, 0, error))?;
        Ok(DirectFile { file: Rc::new(file), path: path.to_owned(), allocated_bytes: Cell::new(allocated_bytes) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size as the filesystem reports it (data plus preallocation).
    pub fn size_bytes(&self) -> u64 {
        self.allocated_bytes.get()
    }

    /// Executes `plan`: preallocates if it says so, then writes one aligned buffer that
    /// `fill` populates (tail page bytes first, then the new bytes).
    pub async fn append(&self, plan: &WritePlan, fill: impl FnOnce(&mut [u8])) -> Result<(), DiskError> {
        assert_eq!(plan.write_position % DIRECT_IO_ALIGNMENT_BYTES, 0);
        assert_eq!(plan.write_bytes as u64 % DIRECT_IO_ALIGNMENT_BYTES, 0);
        if let Some(size) = plan.preallocate_to {
            let write_end = plan.write_position + plan.write_bytes as u64;
            let allocated = match self.file.pre_allocate(size, false).await.map_err(io::Error::from) {
                Ok(()) => size,
                // Not room for a whole step: take just what this write needs.
                Err(error) if error.kind() == io::ErrorKind::StorageFull => self
                    .file
                    .pre_allocate(write_end, false)
                    .await
                    .map(|()| write_end)
                    .map_err(|error| DiskError::new(PREALLOCATE, &self.path, write_end, error))?,
                Err(error) => return Err(DiskError::new(PREALLOCATE, &self.path, size, error)),
            };
            self.allocated_bytes.set(allocated);
        }
        let mut buffer = self.file.alloc_dma_buffer(plan.write_bytes);
        fill(buffer.as_bytes_mut());
        let written = self
            .file
            .write_at(buffer, plan.write_position)
            .await
            .map_err(|error| DiskError::new("write", &self.path, plan.write_position, error))?;
        if written != plan.write_bytes {
            return Err(DiskError::new(
                "write",
                &self.path,
                plan.write_position,
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {written} of {} bytes", plan.write_bytes),
                ),
            ));
        }
        Ok(())
    }

    /// Overwrites `[position, position + length)` with zeros (aligned outward to pages
    /// that hold no live data: the caller guarantees `position` is the logical end).
    pub async fn zero_from(&self, position: u64, length: u64, tail: &[u8]) -> Result<(), DiskError> {
        let start = align_down(position, DIRECT_IO_ALIGNMENT_BYTES);
        assert_eq!((position - start) as usize, tail.len());
        let end = align_up(position + length, DIRECT_IO_ALIGNMENT_BYTES)
            .min(align_up(self.allocated_bytes.get(), DIRECT_IO_ALIGNMENT_BYTES));
        let chunk_bytes: u64 = 1 << 20;
        let mut at = start;
        while at < end {
            let bytes = (end - at).min(chunk_bytes) as usize;
            let mut buffer = self.file.alloc_dma_buffer(bytes);
            buffer.as_bytes_mut().fill(0);
            if at == start {
                buffer.as_bytes_mut()[..tail.len()].copy_from_slice(tail);
            }
            self.file.write_at(buffer, at).await.map_err(|error| DiskError::new("zero", &self.path, at, error))?;
            at += bytes as u64;
        }
        Ok(())
    }

    pub async fn sync(&self) -> Result<(), DiskError> {
        self.file.fdatasync().await.map_err(|error| DiskError::new("fdatasync", &self.path, 0, error))
    }

    /// Reads `[position, position + length)`, clipped at the end of the file.
    pub async fn read(&self, position: u64, length: usize) -> Result<Vec<u8>, DiskError> {
        let start = align_down(position, DIRECT_IO_ALIGNMENT_BYTES);
        let end = align_up(position + length as u64, DIRECT_IO_ALIGNMENT_BYTES);
        let result = self
            .file
            .read_at_aligned(start, (end - start) as usize)
            .await
            .map_err(|error| DiskError::new("read", &self.path, position, error))?;
        let skip = (position - start) as usize;
        if result.len() <= skip {
            return Ok(Vec::new());
        }
        let available = (result.len() - skip).min(length);
        Ok(result[skip..skip + available].to_vec())
    }

    /// Sets the file's size to exactly `size` (drops preallocation beyond it).
    pub async fn truncate(&self, size: u64) -> Result<(), DiskError> {
        self.file.truncate(size).await.map_err(|error| DiskError::new("truncate", &self.path, size, error))?;
        self.allocated_bytes.set(size);
        Ok(())
    }

    pub async fn close(self) -> Result<(), DiskError> {
        let path = self.path;
        match Rc::try_unwrap(self.file) {
            Ok(file) => file.close().await.map_err(|error| DiskError::new("close", &path, 0, error)),
            Err(_) => Ok(()), // a reader still holds it; it closes when dropped
        }
    }
}

/// Checks that direct I/O works in `directory` with a real aligned write and read of a
/// scratch file, and primes this executor's per-device io_uring poll-ring detection.
///
/// Why the priming matters: glommio probes whether a device supports polled I/O with a
/// read of the first file opened on that device in each executor thread, and caches the
/// answer. If that first file is empty, the probe read completes without touching the
/// device, polled I/O is wrongly assumed, and every later read on the device fails with
/// EOPNOTSUPP. Opening a file that holds data first makes the probe do real I/O.
pub async fn probe_direct_io(directory: &Path) -> Result<(), DiskError> {
    let path = directory.join(".weir-direct-io-probe");
    let pattern: Vec<u8> = (0..DIRECT_IO_ALIGNMENT_BYTES as usize).map(|index| (index % 251) as u8).collect();
    let written = std::fs::write(&path, &pattern).and_then(|()| std::fs::File::open(&path)?.sync_all());
    if let Err(error) = written {
        let _ = std::fs::remove_file(&path);
        if error.kind() == io::ErrorKind::StorageFull {
            // A full disk must not keep weir from starting (shipping and retention are
            // what free it); the segments are read with O_DIRECT anyway.
            tracing::warn!(directory = %directory.display(), "disk full: direct I/O probe skipped");
            return Ok(());
        }
        return Err(DiskError::new("write probe", &path, 0, error));
    }
    let outcome = async {
        let file = DirectFile::open(&path).await?;
        let read = file.read(0, pattern.len()).await?;
        let closed = file.close().await;
        if read != pattern {
            return Err(DiskError::new(
                "verify probe",
                &path,
                0,
                io::Error::new(io::ErrorKind::InvalidData, "direct I/O read back different bytes"),
            ));
        }
        closed
    }
    .await;
    let _ = std::fs::remove_file(&path);
    outcome
}

/// Makes a directory entry change (create, rename, delete) durable.
pub fn sync_directory(path: &Path) -> Result<(), DiskError> {
    std::fs::File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| DiskError::new("fsync directory", path, 0, error))
}
