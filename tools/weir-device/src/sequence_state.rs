//! Where a device's sequences start, and how a reservation is made durable.
//!
//! A device must never reuse a sequence for new records (the server would answer with
//! the old offsets and drop them). The start is the larger of the state file's value
//! and the clock in microseconds since the Unix epoch: the clock alone covers devices
//! with a real-time clock and no storage, the file covers devices whose clock restarts
//! at 1970, and either one moving forward keeps sequences increasing. The file holds one
//! decimal number, "every sequence below this may have been used"; the client writes it
//! (temporary file, fdatasync, rename, directory fsync) before it uses a block of
//! `sequence.reserve` sequences, so a crash loses at most a gap, never a reuse.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use crate::error::DeviceError;
use crate::Sequence;

/// Microseconds since the Unix epoch (0 for a clock before it).
pub fn clock_sequence(now: SystemTime) -> Sequence {
    let micros = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_micros());
    Sequence(u64::try_from(micros).unwrap_or(u64::MAX / 2))
}

fn state_error(path: &Path, source: std::io::Error) -> DeviceError {
    DeviceError::SequenceState { path: path.to_owned(), source: source.into() }
}

/// The first sequence to use: the larger of the file's value (when given and present)
/// and the clock.
pub fn start(state_file: Option<&Path>, now: SystemTime) -> Result<Sequence, DeviceError> {
    let clock = clock_sequence(now);
    let Some(path) = state_file else { return Ok(clock) };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(clock),
        Err(error) => return Err(state_error(path, error)),
    };
    let stored: u64 = text.trim().parse().map_err(|_| {
        state_error(path, std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a sequence: {text:?}")))
    })?;
    Ok(Sequence(stored.max(clock.0)))
}

/// Durably records that sequences below `end` may be in use.
pub fn persist(path: &Path, end: Sequence) -> Result<(), DeviceError> {
    let temporary = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        writeln!(file, "{}", end.0)?;
        file.sync_data()?;
        std::fs::rename(&temporary, path)?;
        if let Some(directory) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::File::open(directory)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|error| state_error(path, error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_start_is_the_larger_of_file_and_clock() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("sequence");
        let epoch_plus = |micros| SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
        assert_eq!(start(Some(&path), epoch_plus(500)).unwrap(), Sequence(500), "no file yet: the clock");
        persist(&path, Sequence(10_000)).unwrap();
        assert_eq!(start(Some(&path), epoch_plus(500)).unwrap(), Sequence(10_000), "clock reset to 1970");
        assert_eq!(start(Some(&path), epoch_plus(20_000)).unwrap(), Sequence(20_000));
        assert_eq!(start(None, epoch_plus(7)).unwrap(), Sequence(7));
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(start(Some(&path), epoch_plus(1)), Err(DeviceError::SequenceState { .. })));
        let missing_directory = directory.path().join("no/such/dir/sequence");
        assert!(persist(&missing_directory, Sequence(1)).is_err());
    }
}
