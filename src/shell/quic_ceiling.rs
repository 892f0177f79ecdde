//! The raw QUIC loopback ceiling: what QUIC itself does on this host with weir's TLS,
//! transport limits, sockets and driver, but with no protocol work and no storage.
//!
//! [`DiscardServer`] binds exactly what `weir serve` binds for a config
//! (`runtime::prepare_quic`: the same certificates, client-certificate check, ALPN
//! `weir/1`, transport windows, one SO_REUSEPORT socket per core with the steering
//! program) and runs the same quinn-proto driver (`quic::run_core`) on one pinned
//! glommio executor per core. Only the frame handling differs: every produce frame is
//! answered at once, through `Appender::answer_unchecked`, with an ack of the shape weir
//! sends (the frame's sequence, one part covering all its records), read from the fixed
//! root of the archive without validating it. Devices therefore see the request/answer
//! round trip they see with weir, minus frame checks, routing, the cross-core mesh,
//! group commit and fdatasync.
//!
//! `weir-bench ingest` drives it with the same device fleet as weir in the same run, and
//! `weir doctor --measure` drives it with [`measure_loopback`]; both call this code.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use glommio::{LocalExecutorBuilder, Placement};

use crate::config::ValidConfig;
use crate::core::log::batch::Record;
use crate::core::protocol::{self, AckPart, ErrorCode, KIND_PRODUCE, PROTOCOL_VERSION};
use crate::shell::quic::{self, AppendFailure, Appender, QuicStats};
use crate::shell::runtime::{self, Fatal};

/// The root of a ProduceFrame archive (docs/PROTOCOL.md §4): its size and the offsets
/// of the fields the discard answer needs.
const PRODUCE_ROOT_BYTES: usize = 32;
const ROOT_VERSION_AT: usize = 0;
const ROOT_KIND_AT: usize = 2;
const ROOT_SEQUENCE_AT: usize = 8;
const ROOT_RECORDS_LEN_AT: usize = 28;
const _: () = assert!(ROOT_RECORDS_LEN_AT + 4 == PRODUCE_ROOT_BYTES);

/// The sequence and record count of a produce frame, read from its root without any
/// check of the rest (the ceiling trusts its own clients); `None` if it has no such root.
pub fn produce_root(frame: &[u8]) -> Option<(u64, u32)> {
    if frame.len() < PRODUCE_ROOT_BYTES || frame.len() % protocol::FRAME_ALIGNMENT_BYTES != 0 {
        return None;
    }
    let root = &frame[frame.len() - PRODUCE_ROOT_BYTES..];
    let u16_at = |at: usize| u16::from_le_bytes([root[at], root[at + 1]]);
    if u16_at(ROOT_VERSION_AT) != PROTOCOL_VERSION || u16_at(ROOT_KIND_AT) != KIND_PRODUCE {
        return None;
    }
    let sequence = u64::from_le_bytes(root[ROOT_SEQUENCE_AT..ROOT_SEQUENCE_AT + 8].try_into().expect("8 bytes"));
    let records = u32::from_le_bytes(root[ROOT_RECORDS_LEN_AT..ROOT_RECORDS_LEN_AT + 4].try_into().expect("4 bytes"));
    (records > 0).then_some((sequence, records))
}

/// What one core of the discard server answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardTotals {
    pub frames: u64,
    pub records: u64,
    pub refused_frames: u64,
}

impl DiscardTotals {
    fn add(&mut self, other: DiscardTotals) {
        self.frames += other.frames;
        self.records += other.records;
        self.refused_frames += other.refused_frames;
    }
}

/// Answers every frame with an ack and stores nothing. Offsets count up per core, as
/// if one partition took every record.
#[derive(Debug, Default)]
pub struct DiscardAppender {
    next_offset: Cell<i64>,
    frames: Cell<u64>,
    records: Cell<u64>,
    refused_frames: Cell<u64>,
}

impl DiscardAppender {
    pub fn totals(&self) -> DiscardTotals {
        DiscardTotals {
            frames: self.frames.get(),
            records: self.records.get(),
            refused_frames: self.refused_frames.get(),
        }
    }

    fn take_offsets(&self, records: u32) -> i64 {
        let base = self.next_offset.get();
        self.next_offset.set(base + i64::from(records));
        self.frames.set(self.frames.get() + 1);
        self.records.set(self.records.get() + u64::from(records));
        base
    }
}

impl Appender for DiscardAppender {
    fn append(
        &self,
        _topic: String,
        _partition: u32,
        records: Vec<Record>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, AppendFailure>>>> {
        // Not reached (every frame is answered unchecked); discards all the same.
        let base = self.take_offsets(records.len() as u32);
        Box::pin(async move { Ok(base) })
    }

    fn answer_unchecked(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let answer = match produce_root(frame) {
            Some((sequence, record_count)) => {
                let base_offset = self.take_offsets(record_count);
                let part = AckPart { base_offset, partition: 0, first_record: 0, record_count, reserved: 0 };
                protocol::ack_frame(sequence, vec![part])
            }
            None => {
                self.refused_frames.set(self.refused_frames.get() + 1);
                protocol::error_frame(0, ErrorCode::MalformedFrame, "the ceiling reads produce frames only", 0)
            }
        };
        Some(protocol::with_length_prefix(&protocol::encode(&answer)))
    }
}

/// The discard server, running until [`DiscardServer::stop`].
pub struct DiscardServer {
    address: SocketAddr,
    shutdown: Arc<AtomicBool>,
    cores: Vec<glommio::ExecutorJoinHandle<Result<(QuicStats, DiscardTotals), String>>>,
}

/// What the discard server did, over all cores.
#[derive(Debug, Clone, Default)]
pub struct DiscardReport {
    pub totals: DiscardTotals,
    pub connections_accepted: u64,
    pub connections_refused: u64,
}

impl DiscardServer {
    /// Binds what `weir serve` would bind for `valid` (its `quic.listen`, so use port 0
    /// next to a running weir) and starts one pinned executor per configured core.
    pub fn start(valid: &ValidConfig) -> Result<DiscardServer, Fatal> {
        let prepared = runtime::prepare_quic(valid)?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut server = DiscardServer { address: prepared.address, shutdown: shutdown.clone(), cores: Vec::new() };
        for (core, (cpu, socket)) in valid.cores.iter().copied().zip(prepared.sockets).enumerate() {
            let settings = prepared.settings.clone();
            let shutdown = shutdown.clone();
            let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("weir-ceiling-{core}"))
                .io_memory(valid.config.engine.io_memory_bytes.0 as usize)
                .spawn(move || async move {
                    let appender = Rc::new(DiscardAppender::default());
                    let stats = quic::run_core(core, socket, settings, appender.clone(), shutdown)
                        .await
                        .map_err(|error| format!("core {core}: {error}"))?;
                    Ok((stats, appender.totals()))
                });
            match spawned {
                Ok(handle) => server.cores.push(handle),
                Err(error) => {
                    let _ = server.stop();
                    return Err(Fatal::CoreStart { core, cpu, reason: error.to_string() });
                }
            }
        }
        Ok(server)
    }

    /// Where devices connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Closes every connection (bounded wait) and stops the cores.
    pub fn stop(self) -> Result<DiscardReport, String> {
        self.shutdown.store(true, Ordering::Release);
        let mut report = DiscardReport::default();
        let mut first_error = None;
        for handle in self.cores {
            match handle.join() {
                Ok(Ok((stats, totals))) => {
                    report.totals.add(totals);
                    report.connections_accepted += stats.connections_accepted;
                    report.connections_refused += stats.connections_refused;
                }
                Ok(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                Err(error) => {
                    first_error.get_or_insert(format!("a ceiling core failed: {error}"));
                }
            }
        }
        first_error.map_or(Ok(report), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::{check_answer, encode, produce_frame, FRAME_LIMITS_V1, KIND_ACK};

    fn records(count: usize) -> Vec<Record> {
        (0..count)
            .map(|index| Record {
                timestamp_ms: 1_700_000_000_000 + index as i64,
                key: Some(bytes::Bytes::from(format!("k{index}"))),
                value: Some(bytes::Bytes::from(vec![7u8; 256])),
                headers: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn the_root_gives_the_sequence_and_record_count_of_a_real_frame() {
        for (sequence, count) in [(0u64, 1usize), (42, 3), (u64::MAX - 1, 256)] {
            let archive = encode(&produce_frame(sequence, "telemetry", &records(count)));
            assert_eq!(produce_root(&archive), Some((sequence, count as u32)));
        }
        assert_eq!(produce_root(&[0u8; 16]), None, "too short");
        let answer = encode(&protocol::ack_frame(5, Vec::new()));
        assert_eq!(produce_root(&answer), None, "not a produce frame");
    }

    #[test]
    fn the_discard_answer_is_an_ack_covering_every_record_with_growing_offsets() {
        let appender = DiscardAppender::default();
        for (sequence, count, base) in [(9u64, 3usize, 0i64), (10, 5, 3)] {
            let archive = encode(&produce_frame(sequence, "telemetry", &records(count)));
            let answer = appender.answer_unchecked(&archive).expect("always answers");
            let length = u32::from_be_bytes(answer[..4].try_into().unwrap()) as usize;
            assert_eq!(length + 4, answer.len());
            let frame = check_answer(&answer[4..], &FRAME_LIMITS_V1).expect("a valid answer");
            assert_eq!((frame.kind, frame.sequence), (KIND_ACK, sequence));
            assert_eq!(frame.parts.len(), 1);
            assert_eq!((frame.parts[0].base_offset, frame.parts[0].record_count), (base, count as u32));
        }
        assert_eq!(appender.totals(), DiscardTotals { frames: 2, records: 8, refused_frames: 0 });
        let refused = appender.answer_unchecked(&[1u8; 8]).expect("always answers");
        assert_eq!(check_answer(&refused[4..], &FRAME_LIMITS_V1).unwrap().kind, protocol::KIND_ERROR);
        assert_eq!(appender.totals().refused_frames, 1);
    }
}
