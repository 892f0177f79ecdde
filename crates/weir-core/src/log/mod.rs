//! The partition log's pure core: the RecordBatch v2 codec, the offset index, segment
//! write planning, the recovery scan, retention planning and the core's flush pacer. No I/O and no clock here;
//! `weir::shell::log` executes what these functions decide.

/// The RecordBatch v2 codec lives in the protocol crate (device-side code uses it too).
pub use weir_protocol::{batch, varint};

pub mod index;
pub mod pacer;
pub mod partition;
pub mod recovery;
pub mod retention;
pub mod segment;
