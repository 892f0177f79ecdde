//! The engine: one pinned glommio `LocalExecutor` per configured core. A core opens
//! and recovers the partitions it owns (partition p on core p mod N), serves until
//! shutdown, then closes them (flush, trim, sync).
//!
//! Cores report to the main thread over a channel; a core that fails to start or
//! panics makes the whole process stop through one exit path (`Fatal`), so no sibling
//! is left half-serving. Shutdown is one shared flag (set by SIGINT/SIGTERM or by a
//! failing core) that every core polls.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::config::ValidConfig;
use crate::shell::log::{LogError, LogOptions, PartitionLog};
use crate::shell::metrics::Metrics;
use crate::shell::{admin, sys};

/// How often a core checks the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);

/// Exit codes: one per way the process can end.
pub mod exit_code {
    pub const CLEAN: i32 = 0;
    pub const PROBLEMS_FOUND: i32 = 1;
    pub const BAD_CONFIG: i32 = 2;
    pub const DATA_REFUSED: i32 = 3;
    pub const ADMIN_UNAVAILABLE: i32 = 4;
    pub const CORE_FAILED: i32 = 5;
    pub const INTERNAL_BUG: i32 = 70;
}

/// Why the process cannot go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Fatal {
    #[error("core {core} (cpu {cpu}) could not open its partitions: {source}")]
    PartitionOpen { core: usize, cpu: usize, source: LogError },
    #[error("core {core} (cpu {cpu}) could not start: {reason}")]
    CoreStart { core: usize, cpu: usize, reason: String },
    #[error("core {core} (cpu {cpu}) failed while closing: {source}")]
    PartitionClose { core: usize, cpu: usize, source: LogError },
    #[error("core {core} (cpu {cpu}) panicked")]
    CorePanicked { core: usize, cpu: usize },
    #[error("{0}")]
    Admin(#[from] admin::AdminError),
}

impl Fatal {
    pub fn exit_code(&self) -> i32 {
        match self {
            Fatal::PartitionOpen { .. } => exit_code::DATA_REFUSED,
            Fatal::Admin(_) => exit_code::ADMIN_UNAVAILABLE,
            Fatal::CorePanicked { .. } => exit_code::INTERNAL_BUG,
            Fatal::CoreStart { .. } | Fatal::PartitionClose { .. } => exit_code::CORE_FAILED,
        }
    }
}

enum CoreEvent {
    Serving {
        core: usize,
    },
    Failed(Fatal),
    Stopped {
        core: usize,
    },
    /// Sent when the core's thread ends, however it ends.
    Gone {
        core: usize,
    },
}

struct GoneGuard {
    core: usize,
    events: mpsc::Sender<CoreEvent>,
}

impl Drop for GoneGuard {
    fn drop(&mut self) {
        let _ = self.events.send(CoreEvent::Gone { core: self.core });
    }
}

/// The directory of one partition.
pub fn partition_directory(data_dir: &std::path::Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

/// Runs the engine until `shutdown` is set; returns the first fatal problem, if any.
pub fn serve(valid: ValidConfig, shutdown: Arc<AtomicBool>) -> Result<(), Fatal> {
    let metrics = Metrics::new();
    let cores = valid.cores.clone();
    let (admin_address, admin_thread) =
        admin::start(&valid.config.admin.listen, metrics.clone(), cores.len(), shutdown.clone())?;
    let partitions: usize = valid.config.topics.iter().map(|topic| topic.partitions as usize).sum();
    tracing::info!(
        cores = ?cores,
        partitions,
        data_dir = %valid.config.data_dir.display(),
        admin = %format!("http://{admin_address}"),
        "weir starting"
    );
    let (events, event_receiver) = mpsc::channel();
    let mut first_fatal: Option<Fatal> = None;
    let mut alive = 0usize;
    for (core, cpu) in cores.iter().copied().enumerate() {
        let owned = valid.partitions_of_core(core);
        let data_dir = valid.config.data_dir.clone();
        let options = LogOptions::from_config(&valid.config.log);
        let metrics = metrics.clone();
        let core_shutdown = shutdown.clone();
        let events = events.clone();
        let builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("weir-core-{core}"))
            .io_memory(valid.config.engine.io_memory_bytes.0 as usize);
        let spawned = builder.spawn(move || async move {
            let _guard = GoneGuard { core, events: events.clone() };
            let mut logs = Vec::new();
            for (topic, partition) in owned {
                let directory = partition_directory(&data_dir, &topic, partition);
                let name = format!("{topic}-{partition}");
                match PartitionLog::open(&directory, &name, options.clone(), metrics.partition(&topic, partition)).await
                {
                    Ok(log) => logs.push(log),
                    Err(source) => {
                        let _ = events.send(CoreEvent::Failed(Fatal::PartitionOpen { core, cpu, source }));
                        return;
                    }
                }
            }
            let _ = events.send(CoreEvent::Serving { core });
            metrics.cores_running.inc();
            while !core_shutdown.load(Ordering::Acquire) {
                glommio::timer::sleep(SHUTDOWN_POLL).await;
            }
            metrics.cores_running.dec();
            for log in &logs {
                if let Err(source) = log.close().await {
                    let _ = events.send(CoreEvent::Failed(Fatal::PartitionClose { core, cpu, source }));
                }
            }
            let _ = events.send(CoreEvent::Stopped { core });
        });
        match spawned {
            Ok(handle) => {
                alive += 1;
                drop(handle); // the thread reports through `events`
            }
            Err(error) => {
                first_fatal.get_or_insert(Fatal::CoreStart { core, cpu, reason: error.to_string() });
                shutdown.store(true, Ordering::Release);
                break;
            }
        }
    }
    drop(events);
    let mut stopped = vec![false; cores.len()];
    let mut serving = 0usize;
    while alive > 0 {
        let Ok(event) = event_receiver.recv() else { break };
        match event {
            CoreEvent::Serving { core } => {
                tracing::debug!(core, "core serving");
                serving += 1;
                if serving == cores.len() {
                    tracing::info!(cores = serving, "weir serving");
                }
            }
            CoreEvent::Failed(fatal) => {
                tracing::error!(error = %fatal, "core failed; stopping every core");
                first_fatal.get_or_insert(fatal);
                shutdown.store(true, Ordering::Release);
            }
            CoreEvent::Stopped { core } => stopped[core] = true,
            CoreEvent::Gone { core } => {
                alive -= 1;
                if !stopped[core] && first_fatal.is_none() {
                    first_fatal = Some(Fatal::CorePanicked { core, cpu: cores[core] });
                    shutdown.store(true, Ordering::Release);
                }
            }
        }
    }
    shutdown.store(true, Ordering::Release);
    let _ = admin_thread.join();
    match first_fatal {
        Some(fatal) => Err(fatal),
        None => {
            tracing::info!("weir stopped cleanly");
            Ok(())
        }
    }
}

/// Sets `shutdown` on SIGINT or SIGTERM.
pub fn shutdown_on_signals(shutdown: &Arc<AtomicBool>) -> std::io::Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone())?;
    }
    Ok(())
}

/// CPU ids this process can pin executors to.
pub fn usable_cpus() -> std::collections::BTreeSet<usize> {
    sys::usable_cpus()
}
