//! The partition log's pure core: the RecordBatch v2 codec, the offset index, segment
//! write planning, the recovery scan and retention planning. No I/O and no clock here;
//! `crate::shell::log` executes what these functions decide.

pub mod batch;
pub mod index;
pub mod partition;
pub mod recovery;
pub mod retention;
pub mod segment;
pub mod varint;
