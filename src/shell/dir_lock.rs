//! One owner per directory: `weir serve` holds an exclusive lock on its data directory,
//! and each partition holds one on its own directory, for as long as the process lives.
//!
//! Two processes appending to one partition overwrite each other's tail pages and both
//! acknowledge records that end up as zeros; nothing in the log format can tell that
//! afterwards. So the lock is taken before any file is opened for writing and a second
//! `weir serve` refuses to start, naming the holder. The partition locks catch what the
//! data-directory lock cannot: two configurations whose data directories nest or reach
//! the same partition through a symlink.
//!
//! The lock is `flock(2)` (through `std::fs::File::try_lock`) on a file `weir.lock` that
//! holds the owner's PID as text. The kernel drops the lock when the process ends,
//! however it ends (SIGKILL, power loss), so a stale file never blocks a restart: only a
//! live holder does. Readers (`weir inspect`, `weir status`, `weir doctor`) never take
//! the lock; they ask the kernel who holds it (`/proc/locks`), which cannot interfere
//! with a starting server.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The lock file in a locked directory.
pub const LOCK_FILE_NAME: &str = "weir.lock";
/// The longest PID text read back from a lock file.
const PID_TEXT_BYTES_MAX: usize = 32;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirLockError {
    #[error(
        "{path} is in use by another weir process{}: two processes on one directory overwrite each other's records; stop the other one (`systemctl stop weir`, or `kill {}`) or give this one its own data_dir",
        holder_text(*.pid), pid.map_or("PID".to_owned(), |pid| pid.to_string())
    )]
    Held { path: PathBuf, pid: Option<u32> },
    #[error("cannot lock {path}: {operation}: {source}")]
    Io { path: PathBuf, operation: &'static str, source: std::io::Error },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!(" (PID {pid})"),
        None => String::new(),
    }
}

/// An exclusive lock on a directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    _file: File,
}

impl DirLock {
    /// Creates `directory` if needed and locks it for this process. Fails with
    /// `DirLockError::Held` when another process holds it.
    pub fn acquire(directory: &Path) -> Result<DirLock, DirLockError> {
        let path = directory.join(LOCK_FILE_NAME);
        let io = |operation: &'static str| {
            let path = path.clone();
            move |source| DirLockError::Io { path, operation, source }
        };
        std::fs::create_dir_all(directory).map_err(io("create the directory"))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("open"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(DirLockError::Held { path: directory.to_owned(), pid: read_pid(&file) })
            }
            Err(TryLockError::Error(source)) => return Err(DirLockError::Io { path, operation: "flock", source }),
        }
        // Positioned writes and reads only (pwrite64, pread64): the seccomp allowlist has
        // no lseek.
        file.set_len(0).map_err(io("truncate"))?;
        file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0).map_err(io("write the PID"))?;
        Ok(DirLock { path: directory.to_owned(), _file: file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_pid(file: &File) -> Option<u32> {
    let mut bytes = [0u8; PID_TEXT_BYTES_MAX];
    let count = file.read_at(&mut bytes, 0).ok()?;
    std::str::from_utf8(&bytes[..count]).ok()?.trim().parse().ok()
}

/// The PID of the live process holding `directory`'s lock, if any. Takes no lock: it
/// reads the kernel's table of `flock` locks (`/proc/locks`) for the lock file's inode.
pub fn holder(directory: &Path) -> Option<u32> {
    let metadata = std::fs::metadata(directory.join(LOCK_FILE_NAME)).ok()?;
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in_table(&table, metadata.dev(), metadata.ino())
}

/// Finds the writer of a `FLOCK` lock on (device, inode) in `/proc/locks` text. Its
/// lines read `1: FLOCK  ADVISORY  WRITE 4711 fe:01:131 0 EOF`: the device as hex
/// major:minor, the inode in decimal. Lines of waiters (`-> FLOCK ...`) are skipped.
pub fn holder_in_table(table: &str, device: u64, inode: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{inode}", libc::major(device), libc::minor(device));
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, id, ..] if *id == want => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_with_the_holders_pid() {
        let directory = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(directory.path()).unwrap();
        // flock locks belong to the open file description, so a second open in the same
        // process contends exactly as another process would.
        match DirLock::acquire(directory.path()) {
            Err(DirLockError::Held { pid, path }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert_eq!(path, directory.path());
            }
            other => panic!("expected Held, got {other:?}"),
        }
        assert_eq!(holder(directory.path()), Some(std::process::id()));
        drop(first);
        assert_eq!(holder(directory.path()), None);
        let again = DirLock::acquire(directory.path()).unwrap();
        assert_eq!(again.path(), directory.path());
    }

    #[test]
    fn a_missing_directory_is_created_and_a_stale_lock_file_does_not_block() {
        let parent = tempfile::tempdir().unwrap();
        let directory = parent.path().join("data");
        std::fs::create_dir(&directory).unwrap();
        std::fs::write(directory.join(LOCK_FILE_NAME), "999999\n").unwrap();
        let lock = DirLock::acquire(&directory).unwrap();
        let text = std::fs::read_to_string(directory.join(LOCK_FILE_NAME)).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        drop(lock);
        let nested = parent.path().join("a/b");
        let _lock = DirLock::acquire(&nested).unwrap();
        assert!(nested.join(LOCK_FILE_NAME).is_file());
    }

    #[test]
    fn the_lock_table_is_read_for_writers_of_the_exact_inode_only() {
        let table = "1: POSIX  ADVISORY  WRITE 10 fe:01:131 0 EOF\n\
                     2: FLOCK  ADVISORY  READ 11 fe:01:131 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 12 fe:01:1310 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 14 fe:01:131 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 13 fe:01:131 0 EOF\n";
        let device = libc::makedev(0xfe, 0x01);
        assert_eq!(holder_in_table(table, device, 131), Some(13));
        assert_eq!(holder_in_table(table, device, 132), None);
        assert_eq!(holder_in_table(table, libc::makedev(0xfe, 0x02), 131), None);
    }
}
