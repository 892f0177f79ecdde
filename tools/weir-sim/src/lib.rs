//! weir-sim as a library: the fleet runner and its summary, for the `weir-sim` binary
//! and for `weir-bench ingest`, which drives weir and the raw QUIC ceiling with the
//! very same fleet.
#![deny(unsafe_code)]

pub mod fleet;
pub mod report;

use std::path::PathBuf;

use weir_device::DeviceProfile;

/// The fleet's settings after every option was checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub device_ids: Vec<String>,
    pub rate: f64,
    pub record_bytes: usize,
    pub seconds: f64,
    pub topics: Vec<String>,
    pub profile_template: DeviceProfile,
    pub certs: PathBuf,
    pub acked_log: Option<PathBuf>,
    pub threads: usize,
    pub devices_per_endpoint: usize,
    pub connect_concurrency: usize,
    pub sends_in_flight: usize,
    pub drain_seconds: f64,
    /// Move every endpoint to a new UDP socket this often (NAT rebinding); `None`: never.
    pub rebind_every: Option<std::time::Duration>,
    /// Closed loop instead of a paced rate (`None`: paced by `rate`).
    pub closed_loop: Option<ClosedLoop>,
    /// Faults of single devices, for the stream watch's tests.
    pub faults: Faults,
    /// Told when the devices begin writing (after every one connected), for a caller
    /// that does something to the server at a set time into the run (a restart).
    pub on_writing: Option<std::sync::mpsc::Sender<std::time::Instant>>,
}

/// The closed-loop fleet mode (issue 14): each device keeps exactly `frames_in_flight`
/// frames of `records_per_frame` records in flight and sends the next the moment one is
/// answered, with no pacing tick and no linger (each send is flushed into its own
/// frame). What it measures is the server's round trip per frame, not a device queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedLoop {
    pub frames_in_flight: usize,
    pub records_per_frame: usize,
}

/// Devices that go wrong while the fleet writes: the first `stopped` devices stop
/// writing (and disconnect) `stop_after` into the run; the next `restarted` ones
/// disconnect `restart_after` into the run and connect again as a device that lost
/// its sequence state and whose clock began again at 1970, so their sequences start
/// again from below.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub stopped: usize,
    pub stop_after: std::time::Duration,
    pub restarted: usize,
    pub restart_after: std::time::Duration,
}

impl Faults {
    /// When device `index` stops writing, if it does.
    pub fn stop_of(&self, index: usize) -> Option<std::time::Duration> {
        (index < self.stopped).then_some(self.stop_after)
    }

    /// When device `index` restarts, if it does.
    pub fn restart_of(&self, index: usize) -> Option<std::time::Duration> {
        (index >= self.stopped && index < self.stopped + self.restarted).then_some(self.restart_after)
    }
}
