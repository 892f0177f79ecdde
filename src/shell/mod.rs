//! The thin shell: the only code that performs I/O. It executes what `crate::core`
//! decides and decides nothing of its own.

pub mod admin;
pub mod budget;
pub mod ceiling;
pub mod device_connections;
pub mod dir_lock;
pub mod disk;
pub mod engine;
pub mod handles;
pub mod host;
pub mod kafka;
pub mod kafka_api;
pub mod kafka_error;
pub mod kafka_secure;
pub mod latency;
pub mod live;
pub mod log;
pub mod log_query;
pub mod metrics;
pub mod quarantine;
pub mod quic;
pub mod quic_ceiling;
pub mod runtime;
pub mod ship;
pub mod shutdown;
pub mod signals;
pub mod snapshot;
pub mod status;
pub mod status_cells;
pub mod sys;
pub mod tls;
pub mod watch;
