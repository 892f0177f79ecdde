//! The raw disk ceiling: what the filesystem under the data directory does with no log
//! on top. One scratch file written as weir's flusher writes a segment — sequential
//! O_DIRECT writes of one size from one aligned DMA buffer, each followed by
//! `fdatasync`, with space preallocated (`fallocate`) in whole steps of the log's
//! `log.preallocate_bytes` — and every write timed.
//!
//! `weir-bench` measures weir's group commit against this, and `weir doctor --measure`
//! shows it next to the config's flush window. Both call this code, so the two numbers
//! are one measurement, not two that drift apart. What it leaves out is exactly what
//! weir adds on top of the disk: the group-commit window, encoding and CRC, the
//! rewritten tail page, index writes and segment rolls.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use glommio::io::{DmaFile, OpenOptions};

use crate::shell::disk::DiskError;

/// One scratch file of the ceiling measurement; delete it with [`CeilingFile::remove`].
pub struct CeilingFile {
    path: PathBuf,
    file: DmaFile,
}

/// The timing of one write and its `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CeilingSample {
    pub fsync_ns: u64,
    /// The write plus its fdatasync.
    pub write_and_fsync_ns: u64,
    pub bytes: u64,
}

/// What one file's writer did before its deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CeilingTotals {
    pub writes: u64,
    pub bytes: u64,
}

impl CeilingFile {
    /// Creates `path` with O_DIRECT; it must not exist.
    pub async fn create(path: &Path) -> Result<CeilingFile, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(path)
            .await
            .map_err(|error| DiskError::new("create", path, 0, error))?;
        Ok(CeilingFile { path: path.to_owned(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file and deletes it.
    pub async fn remove(self) -> Result<(), DiskError> {
        let closed = self.file.close().await.map_err(|error| DiskError::new("close", &self.path, 0, error));
        let removed = std::fs::remove_file(&self.path).map_err(|error| DiskError::new("remove", &self.path, 0, error));
        closed.and(removed)
    }
}

/// Writes `write_bytes` at a time from the start of `file`, each write followed by one
/// `fdatasync`, until `deadline`; calls `observe` after every write. `write_bytes` must
/// be a multiple of the file's direct I/O alignment and `preallocate_bytes` positive.
pub async fn write_and_sync_until(
    file: Rc<CeilingFile>,
    write_bytes: usize,
    preallocate_bytes: u64,
    deadline: Instant,
    mut observe: impl FnMut(CeilingSample),
) -> Result<CeilingTotals, DiskError> {
    assert!(write_bytes > 0 && preallocate_bytes > 0);
    assert_eq!(write_bytes as u64 % file.file.alignment().max(1), 0, "ceiling writes are aligned");
    let path = &file.path;
    let mut buffer = file.file.alloc_dma_buffer(write_bytes);
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
            file.file
                .pre_allocate(allocated_bytes, false)
                .await
                .map_err(|error| DiskError::new(crate::shell::disk::PREALLOCATE, path, allocated_bytes, error))?;
        }
        let write_started = Instant::now();
        let written = file
            .file
            .write_rc_at(buffer.clone(), position)
            .await
            .map_err(|error| DiskError::new("write", path, position, error))?;
        if written != write_bytes {
            return Err(DiskError::new(
                "write",
                path,
                position,
                io::Error::new(io::ErrorKind::WriteZero, format!("short write: {written} of {write_bytes} bytes")),
            ));
        }
        let sync_started = Instant::now();
        file.file.fdatasync().await.map_err(|error| DiskError::new("fdatasync", path, position, error))?;
        let synced = Instant::now();
        observe(CeilingSample {
            fsync_ns: (synced - sync_started).as_nanos() as u64,
            write_and_fsync_ns: (synced - write_started).as_nanos() as u64,
            bytes: write_bytes as u64,
        });
        position = write_end;
        writes += 1;
    }
    Ok(CeilingTotals { writes, bytes: position })
}
