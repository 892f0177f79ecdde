//! This host's facts for config validation (`config::Host`), gathered where the shell's
//! listeners can be asked: kept out of `shell::sys` (the libc leaf), which the
//! listeners themselves depend on.

use crate::config::Host;

impl Host {
    /// This host's facts for config validation: its usable CPUs, and the files the
    /// upstream connection and the Kafka API name, loaded as `serve` loads them.
    pub fn probe() -> Host {
        Host {
            usable_cpus: crate::shell::sys::usable_cpus(),
            upstream_files: crate::shell::kafka_secure::check_files,
            kafka_api_files: crate::shell::kafka_api::check_files,
        }
    }
}
