//! Phase one: weir's own appends, one round's slice of them. Each core opens (in later
//! rounds: reopens and recovers) its partitions with `PartitionLog::open`, then runs
//! `appenders_per_partition` tasks per partition, each looping
//! `append(vec![record]).await` until the deadline, its sequence numbers carrying on
//! from the round before. An append's latency is from
//! the call to its durable acknowledgement (written and `fdatasync`ed by the group
//! commit), recorded in nanoseconds into the core's histogram.
//!
//! Throughput counts record payload (`Record::payload_len`: key, value, header keys and
//! values) of acknowledged appends, over the time from the start gate until the last
//! appender's last acknowledgement. The partition metrics give the batches weir wrote,
//! which size the raw phase's writes.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use weir::shell::log::{LogOptions, PartitionLog};
use weir::shell::metrics::PartitionMetrics;

use crate::cores::CoreContext;
use crate::{latency_histogram, records, BenchError};

/// One partition a core owns.
pub struct PartitionSpec {
    /// Global partition index: the directory is `bench-<partition>`.
    pub partition: u32,
    pub directory: PathBuf,
    pub metrics: PartitionMetrics,
}

/// Everything one core needs for the weir phase.
pub struct WeirCoreInput {
    pub partitions: Vec<PartitionSpec>,
    pub appenders_per_partition: u32,
    pub record_bytes: usize,
    pub duration: Duration,
    pub log_options: LogOptions,
    /// Each appender's first sequence number in this round (the records it appended in
    /// earlier rounds come before), in partition order, then appender order.
    pub first_sequences: Vec<u64>,
}

/// What one core measured.
pub struct WeirCoreResult {
    pub latency_ns: Histogram<u64>,
    pub appends: u64,
    pub records: u64,
    pub payload_bytes: u64,
    /// From the start gate to the last acknowledgement on this core.
    pub elapsed: Duration,
    /// Each appender's next sequence number, in the order of `first_sequences`.
    pub next_sequences: Vec<u64>,
}

/// Who an appender is (its global index) and where its sequence numbers start.
struct Appender {
    appender: u64,
    first_sequence: u64,
}

struct AppenderTotals {
    appends: u64,
    payload_bytes: u64,
    next_sequence: u64,
}

pub async fn run_core(context: CoreContext, input: WeirCoreInput) -> Result<WeirCoreResult, BenchError> {
    let mut logs = Vec::with_capacity(input.partitions.len());
    for spec in &input.partitions {
        let name = format!("bench-{}", spec.partition);
        let log = PartitionLog::open(&spec.directory, &name, input.log_options.clone(), spec.metrics.clone())
            .await
            .map_err(|source| BenchError::Log { core: context.core, cpu: context.cpu, source })?;
        logs.push((spec.partition, log));
    }
    if let Err(error) = context.start_gate().await {
        close_all(&context, &logs).await?;
        return Err(error);
    }

    let started = Instant::now();
    let deadline = started + input.duration;
    let histogram = Rc::new(RefCell::new(latency_histogram()));
    let pattern = records::value_pattern(input.record_bytes);
    let mut tasks = Vec::with_capacity(logs.len() * input.appenders_per_partition as usize);
    let mut first_sequences = input.first_sequences.iter().copied();
    for (partition, log) in &logs {
        for local in 0..input.appenders_per_partition {
            let appender = u64::from(*partition) * u64::from(input.appenders_per_partition) + u64::from(local);
            let first_sequence = first_sequences.next().expect("one first sequence per appender");
            let task = appender_loop(
                context.clone(),
                log.clone(),
                Appender { appender, first_sequence },
                deadline,
                pattern.clone(),
                input.record_bytes,
                histogram.clone(),
            );
            tasks.push(glommio::spawn_local(task));
        }
    }
    let (mut appends, mut payload_bytes) = (0, 0);
    let mut next_sequences = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(appender) => {
                appends += appender.appends;
                payload_bytes += appender.payload_bytes;
                next_sequences.push(appender.next_sequence);
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    let elapsed = started.elapsed();
    close_all(&context, &logs).await?;
    if let Some(error) = first_error {
        return Err(error);
    }
    let latency_ns =
        Rc::try_unwrap(histogram).map(RefCell::into_inner).unwrap_or_else(|shared| shared.borrow().clone());
    Ok(WeirCoreResult {
        latency_ns,
        appends,
        // One record per append.
        records: appends,
        payload_bytes,
        elapsed,
        next_sequences,
    })
}

async fn close_all(context: &CoreContext, logs: &[(u32, PartitionLog)]) -> Result<(), BenchError> {
    let mut first_error = None;
    for (_, log) in logs {
        if let Err(source) = log.close().await {
            first_error.get_or_insert(BenchError::Log { core: context.core, cpu: context.cpu, source });
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn appender_loop(
    context: CoreContext,
    log: PartitionLog,
    Appender { appender, first_sequence }: Appender,
    deadline: Instant,
    pattern: bytes::Bytes,
    record_bytes: usize,
    histogram: Rc<RefCell<Histogram<u64>>>,
) -> Result<AppenderTotals, BenchError> {
    let mut totals = AppenderTotals { appends: 0, payload_bytes: 0, next_sequence: first_sequence };
    let mut sequence = first_sequence;
    let mut previous_offset = -1i64;
    while Instant::now() < deadline {
        let record = records::record(appender, sequence, &pattern, record_bytes);
        let payload_bytes = record.payload_len() as u64;
        let called = Instant::now();
        let offset = log.append(vec![record]).await.map_err(|source| BenchError::Log {
            core: context.core,
            cpu: context.cpu,
            source,
        })?;
        let latency = called.elapsed();
        histogram.borrow_mut().saturating_record(latency.as_nanos() as u64);
        // One appender's records are acknowledged in the order it appended them.
        assert!(offset > previous_offset, "appender {appender}: offset {offset} after {previous_offset}");
        previous_offset = offset;
        totals.appends += 1;
        totals.payload_bytes += payload_bytes;
        context.add_progress_bytes(payload_bytes);
        sequence += 1;
    }
    totals.next_sequence = sequence;
    Ok(totals)
}
