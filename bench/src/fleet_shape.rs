//! The flags `weir-bench ingest` and `weir-bench fleet` share, the shape of a device
//! fleet against a server on some cores, checked in one place.

use weir::config::Host;

/// The most devices a run may simulate.
pub(crate) const DEVICES_MAX: u32 = 100_000;
/// The longest phase.
pub(crate) const SECONDS_MAX: u64 = 3600;

/// A fleet's shape as the flags gave it.
pub(crate) struct FleetShape {
    pub cores: usize,
    pub devices: u32,
    pub rate: f64,
    /// The highest `--rate` this bench takes.
    pub rate_max: f64,
    pub record_bytes: usize,
    pub seconds: u64,
    pub partitions: u32,
    pub threads: Option<usize>,
}

impl FleetShape {
    /// Adds a line to `problems` for each flag out of range.
    pub(crate) fn check(&self, host: &Host, problems: &mut Vec<String>) {
        let usable = host.usable_cpus.len();
        if self.cores == 0 || self.cores > usable {
            problems.push(format!("--cores {}: must be within 1..={usable} (the usable CPUs here)", self.cores));
        }
        if self.devices == 0 || self.devices > DEVICES_MAX {
            problems.push(format!("--devices {}: must be within 1..={DEVICES_MAX}", self.devices));
        }
        if !self.rate.is_finite() || self.rate <= 0.0 || self.rate > self.rate_max {
            problems.push(format!("--rate {}: must be within (0, {}] records/s", self.rate, self.rate_max));
        }
        let value_bytes_max = weir::core::protocol::FRAME_LIMITS_V1.value_bytes_max;
        if self.record_bytes == 0 || self.record_bytes > value_bytes_max {
            problems.push(format!("--record-bytes {}: must be within 1..={value_bytes_max}", self.record_bytes));
        }
        if self.seconds == 0 || self.seconds > SECONDS_MAX {
            problems.push(format!("--seconds {}: must be within 1..={SECONDS_MAX}", self.seconds));
        }
        if self.partitions == 0 || self.partitions > weir::config::TOPIC_PARTITIONS_MAX {
            problems.push(format!(
                "--partitions {}: must be within 1..={}",
                self.partitions,
                weir::config::TOPIC_PARTITIONS_MAX
            ));
        }
        if self.threads == Some(0) {
            problems.push("--threads 0: must be at least 1".to_owned());
        }
    }
}

/// The fleet's tokio threads: `--threads`, or the CPUs available.
pub(crate) fn threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |count| count.get()))
}
