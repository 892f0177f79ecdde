//! Runs one phase on pinned glommio executors, one per core, built exactly as weir's
//! runtime builds them (`Placement::Fixed(cpu)`, `engine.io_memory_bytes`).
//!
//! A phase has a setup (open files) and a timed part. Setup time must not count, and
//! the cores must run concurrently, so every core reports ready and then waits at a
//! start gate that the main thread opens once all are ready (or aborts, if a core
//! failed or could not be spawned, so no core is left waiting). The main thread draws
//! the progress bar meanwhile and joins the executors, which return their results.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::BenchError;

const GATE_WAITING: u8 = 0;
const GATE_OPEN: u8 = 1;
const GATE_ABORTED: u8 = 2;
/// How often a waiting core looks at the gate, and the main thread at the cores.
const GATE_POLL: Duration = Duration::from_micros(500);
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// What every core of a phase shares with the main thread.
struct Coordination {
    gate: AtomicU8,
    ready_cores: AtomicUsize,
    finished_cores: AtomicUsize,
    /// Bytes the phase has made durable so far (for the progress bar only).
    progress_bytes: AtomicU64,
}

/// A core's view of its phase.
#[derive(Clone)]
pub struct CoreContext {
    pub core: usize,
    pub cpu: usize,
    coordination: Arc<Coordination>,
}

impl CoreContext {
    /// Reports this core ready and waits for the gate; `Err` if the phase was aborted.
    pub async fn start_gate(&self) -> Result<(), BenchError> {
        self.coordination.ready_cores.fetch_add(1, Ordering::AcqRel);
        loop {
            match self.coordination.gate.load(Ordering::Acquire) {
                GATE_OPEN => return Ok(()),
                GATE_ABORTED => return Err(BenchError::Aborted),
                _ => glommio::timer::sleep(GATE_POLL).await,
            }
        }
    }

    pub fn add_progress_bytes(&self, bytes: u64) {
        self.coordination.progress_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Counts a core finished however its future ends (result, error or panic).
struct FinishedGuard(Arc<Coordination>);

impl Drop for FinishedGuard {
    fn drop(&mut self) {
        self.0.finished_cores.fetch_add(1, Ordering::AcqRel);
    }
}

/// Runs `phase` on every core of `cpus` (core i gets `inputs[i]`) and returns the
/// cores' results in core order. The first failure wins.
pub fn run_phase<I, T, F, Fut>(
    label: &'static str,
    cpus: &[usize],
    io_memory_bytes: usize,
    duration: Duration,
    inputs: Vec<I>,
    phase: F,
) -> Result<Vec<T>, BenchError>
where
    I: Send + 'static,
    T: Send + 'static,
    F: Fn(CoreContext, I) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = Result<T, BenchError>> + 'static,
{
    assert_eq!(cpus.len(), inputs.len());
    let coordination = Arc::new(Coordination {
        gate: AtomicU8::new(GATE_WAITING),
        ready_cores: AtomicUsize::new(0),
        finished_cores: AtomicUsize::new(0),
        progress_bytes: AtomicU64::new(0),
    });
    let mut handles = Vec::with_capacity(cpus.len());
    let mut spawn_error = None;
    for (core, (cpu, input)) in cpus.iter().copied().zip(inputs).enumerate() {
        let context = CoreContext { core, cpu, coordination: coordination.clone() };
        let phase = phase.clone();
        let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("weir-bench-{label}-{core}"))
            .io_memory(io_memory_bytes)
            .spawn(move || async move {
                let _finished = FinishedGuard(context.coordination.clone());
                phase(context, input).await
            });
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                spawn_error = Some(BenchError::Executor { core, cpu, reason: error.to_string() });
                break;
            }
        }
    }

    // Open the gate when every core is ready; abort if any could not get there.
    let spawned_cores = handles.len();
    loop {
        let ready = coordination.ready_cores.load(Ordering::Acquire);
        let finished = coordination.finished_cores.load(Ordering::Acquire);
        if spawn_error.is_some() || finished > 0 {
            coordination.gate.store(GATE_ABORTED, Ordering::Release);
            break;
        }
        if ready == spawned_cores {
            coordination.gate.store(GATE_OPEN, Ordering::Release);
            break;
        }
        std::thread::sleep(GATE_POLL);
    }

    let bar = progress_bar(label, duration);
    let started = Instant::now();
    while coordination.finished_cores.load(Ordering::Acquire) < spawned_cores {
        let elapsed = started.elapsed();
        let bytes = coordination.progress_bytes.load(Ordering::Relaxed);
        bar.set_position(elapsed.as_millis().min(duration.as_millis()) as u64);
        bar.set_message(format!("{:.1} MB/s", bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-3)));
        std::thread::sleep(PROGRESS_TICK);
    }
    bar.finish_and_clear();

    let mut results = Vec::with_capacity(spawned_cores);
    let mut first_error = spawn_error;
    let mut aborted = false;
    for (core, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(result)) => results.push(result),
            // A core that only saw the abort is not the cause; keep looking.
            Ok(Err(BenchError::Aborted)) => aborted = true,
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(error) => {
                first_error.get_or_insert(BenchError::Executor { core, cpu: cpus[core], reason: error.to_string() });
            }
        }
    }
    match (first_error, aborted) {
        (Some(error), _) => Err(error),
        (None, true) => Err(BenchError::Aborted),
        (None, false) => Ok(results),
    }
}

/// A bar of the phase's seconds on stderr; indicatif draws nothing when stderr is not
/// a terminal.
fn progress_bar(label: &str, duration: Duration) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(duration.as_millis() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix:>4} [{bar:40}] {elapsed:>4}/{len_s} {msg}")
            .expect("static template")
            .with_key("len_s", |state: &indicatif::ProgressState, writer: &mut dyn std::fmt::Write| {
                let _ = write!(writer, "{}s", state.len().unwrap_or(0) / 1000);
            })
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}
