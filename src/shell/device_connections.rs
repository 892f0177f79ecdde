//! Open connections per device over all cores, against `quic.connections_per_device_max`.
//! A device's connections may land on any core, so the count is shared: one mutex
//! around a map, taken only when a connection is established or ends, never per
//! datagram or frame, so the lock is cheap here and keeps the check and the count in
//! one step (a check followed by a separate add let two cores both admit the device's
//! last allowed connection). `tests/loom.rs` model-checks it (it includes this file
//! with loom's `Mutex` in place of std's, through `crate::sync`).

use std::collections::HashMap;

use crate::sync::{Mutex, PoisonError};

#[derive(Debug, Default)]
pub struct DeviceConnections {
    open: Mutex<HashMap<String, usize>>,
}

impl DeviceConnections {
    /// Counts one more connection of `device`, or returns how many it holds when that
    /// would exceed `max`.
    pub fn try_open(&self, device: &str, max: usize) -> Result<(), usize> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(device.to_owned()).or_insert(0);
        if *count >= max {
            let held = *count;
            if held == 0 {
                open.remove(device); // max 0: no entry is left behind for a refusal
            }
            return Err(held);
        }
        *count += 1;
        Ok(())
    }

    /// Gives back one connection `try_open` counted for `device`.
    pub fn close(&self, device: &str) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.get_mut(device);
        assert!(count.is_some(), "device {device} closed a connection it was never counted for");
        if let Some(count) = count {
            *count -= 1;
            if *count == 0 {
                open.remove(device);
            }
        }
    }

    /// Connections `device` holds now.
    pub fn open_count(&self, device: &str) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(device).copied().unwrap_or(0)
    }

    /// Devices holding at least one connection (no entry outlives a device's last one).
    pub fn devices(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}
