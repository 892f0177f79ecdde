//! The engine: one pinned glommio `LocalExecutor` per configured core. A core opens
//! and recovers the partitions it owns (partition p on core p mod N), serves until
//! shutdown, then closes them (flush, trim, sync).
//!
//! Cores report to the main thread over a channel; a core that fails to start or
//! panics makes the whole process stop through one exit path (`Fatal`), so no sibling
//! is left half-serving. Shutdown is one shared flag (set by SIGINT/SIGTERM or by a
//! failing core) that every core polls.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::config::{DiskFullPolicy, ValidConfig};
use crate::core::log::pacer::FlushPacer;
use crate::shell::log::{LogError, LogOptions, PartitionLog};
use crate::shell::metrics::Metrics;
use crate::shell::quic::{self, Appender, QuicSettings};
use crate::shell::ship::{self, ShipperSetup};
use crate::shell::{admin, engine, kafka_api, shutdown, sys, tls};

/// How often a core checks the shutdown flag.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);
/// How long a core waits at shutdown, in all, for its upstream shippers to persist
/// and end.
const SHIPPER_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Exit codes: one per way the process can end.
pub mod exit_code {
    pub const CLEAN: i32 = 0;
    pub const PROBLEMS_FOUND: i32 = 1;
    pub const BAD_CONFIG: i32 = 2;
    pub const DATA_REFUSED: i32 = 3;
    pub const ADMIN_UNAVAILABLE: i32 = 4;
    pub const CORE_FAILED: i32 = 5;
    /// `weir serve` refused to start: a `weir doctor` fail-level check failed.
    pub const HOST_NOT_READY: i32 = 6;
    pub const QUIC_UNAVAILABLE: i32 = 7;
    /// `weir serve` refused to start: another live process holds the data directory
    /// (or one of its partitions). Nothing was written.
    pub const DATA_DIR_IN_USE: i32 = 8;
    /// The Kafka API's listener could not bind `kafka_api.listen`.
    pub const KAFKA_API_UNAVAILABLE: i32 = 9;
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
    #[error("the QUIC listener cannot start: {reason}")]
    Quic { reason: String },
    #[error("the Kafka API cannot start: {0}")]
    KafkaApi(#[from] kafka_api::KafkaApiError),
}

impl Fatal {
    pub fn exit_code(&self) -> i32 {
        match self {
            Fatal::PartitionOpen { source: LogError::Locked { .. }, .. } => exit_code::DATA_DIR_IN_USE,
            Fatal::PartitionOpen { .. } => exit_code::DATA_REFUSED,
            Fatal::Admin(_) => exit_code::ADMIN_UNAVAILABLE,
            Fatal::Quic { .. } => exit_code::QUIC_UNAVAILABLE,
            Fatal::KafkaApi(_) => exit_code::KAFKA_API_UNAVAILABLE,
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
/// The device listener's reloadable settings are put in `listener` once it is
/// prepared, for SIGHUP (`shell::signals`).
pub fn serve(valid: ValidConfig, shutdown: Arc<AtomicBool>, listener: &ListenerSlot) -> Result<(), Fatal> {
    let metrics = engine_metrics(&valid);
    let cores = valid.cores.clone();
    let (admin_address, admin_thread) =
        admin::start(&valid.config.admin.listen, metrics.clone(), cores.len(), shutdown.clone())?;
    let quic = if valid.config.quic.enabled { Some(prepare_quic_measured(&valid, &metrics)?) } else { None };
    if let Some(quic) = &quic {
        let _ = listener.set(quic.settings.live.clone());
    }
    let kafka = kafka_api::KafkaApiSettings::prepare(&valid)?;
    let kafka_address = kafka.as_ref().and_then(|kafka| kafka.local_address().ok());
    tracing::info!(
        cores = ?cores,
        partitions = valid.config.topics.iter().map(|topic| topic.partitions as usize).sum::<usize>(),
        quic = %quic.as_ref().map_or("disabled".to_owned(), |quic| quic.address.to_string()),
        data_dir = %valid.config.data_dir.display(),
        admin = %format!("http://{admin_address}"),
        kafka_api = %kafka_address.map_or("disabled".to_owned(), |address| address.to_string()),
        "weir listening; opening partitions"
    );
    let (events, event_receiver) = mpsc::channel();
    let common = CoreCommon::new(&valid, metrics, &shutdown, events);
    let (alive, start_fatal) = start_cores(&valid, quic.as_ref(), kafka, &common, &shutdown);
    drop(common); // its event sender: the channel ends when every core is gone
    let first_fatal = supervise(&event_receiver, alive, &cores, start_fatal, &shutdown);
    shutdown::signal(&shutdown);
    let _ = admin_thread.join();
    match first_fatal {
        Some(fatal) => Err(fatal),
        None => {
            tracing::info!("weir stopped cleanly");
            Ok(())
        }
    }
}

/// The process's metrics, with the settings `/status` reports.
fn engine_metrics(valid: &ValidConfig) -> Arc<Metrics> {
    let metrics = Metrics::new();
    metrics.watch.enabled.store(valid.config.watch.enabled, std::sync::atomic::Ordering::Relaxed);
    let log_config = &valid.config.log;
    metrics.status.set_settings(crate::shell::status::StatusSettings {
        data_dir: valid.config.data_dir.clone(),
        partition_bytes_max: log_config.partition_bytes_max.0,
        data_dir_bytes_max: log_config.data_dir_bytes_max.0,
        disk_full_policy: log_config.disk_full_policy,
        shipping_degraded_after: std::time::Duration::from_millis(valid.config.upstream.degraded_after_ms.0),
    });
    metrics
}

/// What every core gets a copy of.
#[derive(Clone)]
struct CoreCommon {
    data_dir: PathBuf,
    options: LogOptions,
    metrics: Arc<Metrics>,
    budget: Arc<crate::shell::budget::DataDirBudget>,
    shutdown: Arc<AtomicBool>,
    events: mpsc::Sender<CoreEvent>,
    mesh: engine::Mesh,
    datagram_mesh: quic::DatagramMesh,
    core_count: usize,
    dedup: engine::DedupSettings,
    /// The stream watch's thresholds, when `[watch]` is on, and whether its events go
    /// to `_weir.alerts`.
    watch: Option<crate::core::watch::WatchConfig>,
    watch_alerts_topic: bool,
}

impl CoreCommon {
    fn new(
        valid: &ValidConfig,
        metrics: Arc<Metrics>,
        shutdown: &Arc<AtomicBool>,
        events: mpsc::Sender<CoreEvent>,
    ) -> Self {
        let log_config = &valid.config.log;
        let core_count = valid.cores.len();
        CoreCommon {
            data_dir: valid.config.data_dir.clone(),
            options: LogOptions::from_config(log_config),
            metrics,
            budget: Arc::new(crate::shell::budget::DataDirBudget::new(
                log_config.data_dir_bytes_max.0,
                log_config.segment_bytes_max.0,
                log_config.disk_full_policy,
            )),
            shutdown: shutdown.clone(),
            events,
            mesh: engine::mesh(core_count),
            datagram_mesh: quic::datagram_mesh(core_count),
            core_count,
            dedup: engine::DedupSettings {
                limits: crate::core::dedup::DedupLimits {
                    sequences_per_device_max: valid.config.quic.dedup_sequences_per_device() as usize,
                    devices_max: valid.config.quic.dedup_devices_max as usize,
                },
                horizon_records: i64::from(valid.config.quic.dedup_horizon_records),
            },
            watch: valid.config.watch.enabled.then(|| valid.config.watch_config()),
            watch_alerts_topic: valid.config.watch_alerts_topic(),
        }
    }
}

/// One core's share of the work: its partitions (quarantined ones left out), their
/// shippers, and its listener socket.
struct CorePlan {
    core: usize,
    cpu: usize,
    partitions: Vec<(String, u32)>,
    shippers: Vec<Option<ShipperSetup>>,
    listener: Option<(std::net::UdpSocket, Arc<QuicSettings>)>,
    /// The Kafka API's listener: on the first core only.
    kafka: Option<kafka_api::KafkaApiSettings>,
}

/// Starts one executor per core; returns how many started and the first failure.
fn start_cores(
    valid: &ValidConfig,
    quic: Option<&PreparedQuic>,
    mut kafka: Option<kafka_api::KafkaApiSettings>,
    common: &CoreCommon,
    shutdown: &Arc<AtomicBool>,
) -> (usize, Option<Fatal>) {
    let mut alive = 0usize;
    let mut sockets = quic.map(|quic| quic.sockets.iter().map(|socket| socket.try_clone()).collect::<Vec<_>>());
    for (core, cpu) in valid.cores.iter().copied().enumerate() {
        let listener = match (quic, sockets.as_mut()) {
            (Some(quic), Some(sockets)) => {
                match std::mem::replace(&mut sockets[core], Err(std::io::ErrorKind::Other.into())) {
                    Ok(socket) => Some((socket, quic.settings.clone())),
                    Err(error) => {
                        shutdown::signal(shutdown);
                        return (alive, Some(Fatal::Quic { reason: format!("socket of core {core}: {error}") }));
                    }
                }
            }
            _ => None,
        };
        let mut plan = plan_core(valid, core, cpu, listener);
        plan.kafka = kafka.take();
        let common = common.clone();
        let builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("weir-core-{core}"))
            .io_memory(valid.config.engine.io_memory_bytes.0 as usize);
        match builder.spawn(move || run_core(plan, common)) {
            Ok(handle) => {
                alive += 1;
                drop(handle); // the thread reports through `events`
            }
            Err(error) => {
                shutdown::signal(shutdown);
                return (alive, Some(Fatal::CoreStart { core, cpu, reason: error.to_string() }));
            }
        }
    }
    (alive, None)
}

/// The partitions core `core` owns, less the quarantined ones (logged), and their
/// shippers.
fn plan_core(
    valid: &ValidConfig,
    core: usize,
    cpu: usize,
    listener: Option<(std::net::UdpSocket, Arc<QuicSettings>)>,
) -> CorePlan {
    let (quarantined, partitions): (Vec<_>, Vec<_>) = valid
        .partitions_of_core(core)
        .into_iter()
        .partition(|(topic, partition)| crate::shell::quarantine::contains(topic, *partition));
    for (topic, partition) in quarantined {
        tracing::warn!(
            partition = %crate::shell::quarantine::name_of(&topic, partition),
            core,
            "partition quarantined (--quarantine): not opened, not shipped; devices writing to it are answered StorageFailed"
        );
    }
    let shippers = partitions
        .iter()
        .map(|(topic, partition)| {
            let directory = partition_directory(&valid.config.data_dir, topic, *partition);
            ShipperSetup::from_config(valid, topic, *partition, &directory)
        })
        .collect();
    CorePlan { core, cpu, partitions, shippers, listener, kafka: None }
}

/// The tasks a serving core runs beside its partitions.
struct CoreTasks {
    listener: Option<glommio::Task<std::io::Result<quic::QuicStats>>>,
    shippers: Vec<glommio::Task<Result<(), ship::ShipError>>>,
    room_keeper: Option<glommio::Task<()>>,
    kafka: Option<glommio::Task<()>>,
    watch: Option<glommio::Task<()>>,
}

/// One core's life on its executor: open its partitions, join the other cores, serve
/// (listener, shippers, room keeper) until shutdown, then stop them and close the
/// partitions. Every way it ends is reported through `common.events`.
async fn run_core(plan: CorePlan, common: CoreCommon) {
    let CorePlan { core, cpu, partitions, shippers, listener, kafka } = plan;
    let _guard = GoneGuard { core, events: common.events.clone() };
    let Some((logs, by_partition)) = open_partitions(core, cpu, partitions, &common).await else { return };
    tracing::debug!(core, "partitions open; joining the mesh");
    let joined = match join_mesh(core, by_partition, &common).await {
        Some(Ok(appender)) => Some(appender),
        Some(Err(source)) => {
            let _ = common.events.send(CoreEvent::Failed(Fatal::PartitionOpen { core, cpu, source }));
            return;
        }
        None => None, // stopping before every core joined
    };
    tracing::debug!(core, joined = joined.is_some(), "mesh joined");
    let tasks = start_tasks(core, joined, (listener, kafka), &logs, shippers, &common);
    // Counted before it is reported, so /health agrees once "serving" is logged.
    common.metrics.cores_running.inc();
    let _ = common.events.send(CoreEvent::Serving { core });
    while !shutdown::is_signalled(&common.shutdown) {
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
    common.metrics.cores_running.dec();
    stop_tasks(core, tasks).await;
    for log in &logs {
        if let Err(source) = log.close().await {
            let _ = common.events.send(CoreEvent::Failed(Fatal::PartitionClose { core, cpu, source }));
        }
    }
    let _ = common.events.send(CoreEvent::Stopped { core });
}

/// Opens (and recovers) the core's partitions, with the data directory's budget set;
/// `None` after reporting the first that cannot be opened.
async fn open_partitions(
    core: usize,
    cpu: usize,
    partitions: Vec<(String, u32)>,
    common: &CoreCommon,
) -> Option<(Vec<PartitionLog>, HashMap<(String, u32), PartitionLog>)> {
    let mut logs = Vec::new();
    let mut by_partition = HashMap::new();
    // One flush pacer for the core's partitions: they share its disk's syncs.
    let pacer = Rc::new(RefCell::new(FlushPacer::new(common.options.core_flushes_per_s_max)));
    for (topic, partition) in partitions {
        let directory = partition_directory(&common.data_dir, &topic, partition);
        let name = format!("{topic}-{partition}");
        let metrics = common.metrics.partition(&topic, partition);
        match PartitionLog::open_paced(&directory, &name, common.options.clone(), metrics, pacer.clone()).await {
            Ok(log) => {
                log.set_budget(common.budget.clone());
                by_partition.insert((topic, partition), log.clone());
                logs.push(log);
            }
            Err(source) => {
                let _ = common.events.send(CoreEvent::Failed(Fatal::PartitionOpen { core, cpu, source }));
                return None;
            }
        }
    }
    Some((logs, by_partition))
}

/// Joins the other cores' mesh, or gives up (`None`) when the process is stopping.
async fn join_mesh(
    core: usize,
    by_partition: HashMap<(String, u32), PartitionLog>,
    common: &CoreCommon,
) -> Option<Result<Rc<engine::CoreAppender>, LogError>> {
    let shutdown_seen = async {
        while !shutdown::is_signalled(&common.shutdown) {
            glommio::timer::sleep(SHUTDOWN_POLL).await;
        }
        None
    };
    let mesh = common.mesh.clone();
    let watch = common.watch.map(|config| {
        Rc::new(crate::shell::watch::CoreWatch::new(core, common.core_count, config, common.metrics.watch.clone()))
    });
    let start = engine::CoreAppender::start(core, common.core_count, by_partition, common.dedup, Some(mesh), watch);
    futures_lite::future::or(async { Some(start.await) }, shutdown_seen).await
}

/// Spawns the core's device listener (once it joined the mesh), one upstream shipper
/// per shipped partition, and under drop-oldest the room keeper.
fn start_tasks(
    core: usize,
    joined: Option<Rc<engine::CoreAppender>>,
    listeners: (Option<(std::net::UdpSocket, Arc<QuicSettings>)>, Option<kafka_api::KafkaApiSettings>),
    logs: &[PartitionLog],
    shippers: Vec<Option<ShipperSetup>>,
    common: &CoreCommon,
) -> CoreTasks {
    let (listener, kafka) = listeners;
    let kafka = match (joined.clone(), kafka) {
        (Some(reader), Some(settings)) => {
            let metrics = common.metrics.kafka_api.clone();
            Some(glommio::spawn_local(kafka_api::run(settings, reader, metrics, common.shutdown.clone())))
        }
        _ => None,
    };
    let watch = joined.as_ref().and_then(|appender| {
        let watch = appender.watch()?;
        let stopping = common.shutdown.clone();
        let link: Box<dyn crate::shell::watch::WatchLink> = Box::new(appender.clone());
        Some(glommio::spawn_local(crate::shell::watch::run(watch, link, common.watch_alerts_topic, move || {
            shutdown::is_signalled(&stopping)
        })))
    });
    let listener = match (joined, listener) {
        (Some(appender), Some((socket, settings))) => {
            let appender: Rc<dyn Appender> = Rc::new(appender);
            let forward = Some(common.datagram_mesh.clone());
            Some(glommio::spawn_local(quic::run_core(
                core,
                socket,
                settings,
                appender,
                common.shutdown.clone(),
                forward,
            )))
        }
        _ => None,
    };
    let mut shipper_tasks = Vec::new();
    for (log, setup) in logs.iter().zip(shippers) {
        let Some(setup) = setup else { continue };
        let ship_metrics = common.metrics.ship(&setup.edge_topic, setup.edge_partition);
        let task = ship::run(log.clone(), setup, ship_metrics, common.shutdown.clone());
        shipper_tasks.push(glommio::spawn_local(task));
    }
    // Under drop-oldest, this core frees room for partitions (on any core) that have
    // no segment of their own left to drop.
    let budget = common.budget.clone();
    let room_keeper = (budget.policy() == DiskFullPolicy::DropOldest).then(|| {
        let stopping = common.shutdown.clone();
        glommio::spawn_local(crate::shell::log::keep_room(logs.to_vec(), budget.clone(), move || {
            shutdown::is_signalled(&stopping)
        }))
    });
    CoreTasks { listener, shippers: shipper_tasks, room_keeper, kafka, watch }
}

/// Waits for the listener to close its connections, for the shippers to persist their
/// cursors (one stuck on a broker is dropped after a grace period: a restart
/// reconciles), and for the room keeper.
async fn stop_tasks(core: usize, tasks: CoreTasks) {
    if let Some(task) = tasks.listener {
        if let Err(error) = task.await {
            tracing::warn!(core, %error, "QUIC listener ended with an error");
        }
    }
    let grace_end = std::time::Instant::now() + SHIPPER_SHUTDOWN_GRACE;
    for task in tasks.shippers {
        let grace = grace_end.saturating_duration_since(std::time::Instant::now());
        let _ = futures_lite::future::or(async { Some(task.await) }, async {
            glommio::timer::sleep(grace).await;
            None
        })
        .await;
    }
    if let Some(task) = tasks.room_keeper {
        task.await;
    }
    if let Some(task) = tasks.kafka {
        task.await;
    }
    if let Some(task) = tasks.watch {
        task.await;
    }
}

/// Follows the cores' reports until every started core is gone: the first failure
/// stops them all, and a core that ended without stopping is a failure too.
fn supervise(
    event_receiver: &mpsc::Receiver<CoreEvent>,
    mut alive: usize,
    cores: &[usize],
    mut first_fatal: Option<Fatal>,
    shutdown: &Arc<AtomicBool>,
) -> Option<Fatal> {
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
                shutdown::signal(shutdown);
            }
            CoreEvent::Stopped { core } => stopped[core] = true,
            CoreEvent::Gone { core } => {
                alive -= 1;
                if !stopped[core] && first_fatal.is_none() {
                    first_fatal = Some(Fatal::CorePanicked { core, cpu: cores[core] });
                    shutdown::signal(shutdown);
                }
            }
        }
    }
    // A core whose executor thread ended before weir's future ran on it (glommio
    // could not set it up) sends neither `Stopped` nor `Gone`: that is a failure too,
    // never a clean stop.
    if first_fatal.is_none() {
        if let Some(core) = (0..cores.len()).find(|core| !stopped[*core]) {
            first_fatal = Some(Fatal::CoreStart {
                core,
                cpu: cores[core],
                reason: "its executor thread ended before weir ran on it (see the error above)".to_owned(),
            });
        }
    }
    first_fatal
}

/// Where `serve` leaves the device listener's reloadable settings (empty until the
/// listener is prepared, and with QUIC off).
pub type ListenerSlot = std::sync::OnceLock<Arc<quic::LiveCell>>;

/// Sets `shutdown` on SIGINT or SIGTERM (for tools that embed the engine; `weir serve`
/// handles every signal in `shell::signals`).
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

/// The device listener, prepared on the main thread before any core starts: the TLS
/// config (development certificates made if allowed and missing) and one socket per
/// core, bound in core order.
pub struct PreparedQuic {
    pub settings: Arc<QuicSettings>,
    pub sockets: Vec<std::net::UdpSocket>,
    pub address: SocketAddr,
}

pub fn prepare_quic(valid: &ValidConfig) -> Result<PreparedQuic, Fatal> {
    prepare_quic_measured(valid, &Metrics::new())
}

/// `prepare_quic`, with the listener's metrics registered in `metrics`.
pub fn prepare_quic_measured(valid: &ValidConfig, metrics: &Metrics) -> Result<PreparedQuic, Fatal> {
    let config = &valid.config.quic;
    let directory = &config.certs_dir;
    let (ca, certificate, key) = (directory.join("ca.pem"), directory.join("server.pem"), directory.join("server.key"));
    let missing: Vec<_> = [&ca, &certificate, &key].into_iter().filter(|path| !path.exists()).collect();
    if !missing.is_empty() {
        if !config.generate_dev_certs {
            return Err(Fatal::Quic {
                reason: format!(
                    "missing {}; run `weir certs --dir {}` or point quic.certs_dir at your PKI",
                    missing.iter().map(|path| path.display().to_string()).collect::<Vec<_>>().join(", "),
                    directory.display()
                ),
            });
        }
        tracing::warn!(dir = %directory.display(), "no certificates: creating a development PKI (set quic.generate_dev_certs = false in production)");
        crate::certs::generate(directory, &[], &[], 365).map_err(|error| Fatal::Quic { reason: error.to_string() })?;
    }
    let live = quic::QuicLive::from_config(config, &tls::TransportLimits::from_config(config))
        .map_err(|error| Fatal::Quic { reason: error.to_string() })?;
    let address: SocketAddr =
        config.listen.parse().map_err(|_| Fatal::Quic { reason: format!("bad address {}", config.listen) })?;
    let sockets = quic::bind_sockets_steered(address, valid.cores.len(), config.reuseport_steering)
        .map_err(|error| Fatal::Quic { reason: format!("cannot bind {address}: {error}") })?;
    let address = sockets[0].local_addr().map_err(|error| Fatal::Quic { reason: error.to_string() })?;
    let (receive_bytes, send_bytes) =
        (config.socket_receive_buffer_bytes.0 as usize, config.socket_send_buffer_bytes.0 as usize);
    let mut capped_warned = false;
    for socket in &sockets {
        let (receive_granted, send_granted) = quic::set_socket_buffers(socket, receive_bytes, send_bytes)
            .map_err(|error| Fatal::Quic { reason: format!("socket buffers on {address}: {error}") })?;
        // Linux reports twice the usable size.
        if (receive_granted / 2 < receive_bytes || send_granted / 2 < send_bytes) && !capped_warned {
            capped_warned = true;
            tracing::warn!(
                receive_asked = receive_bytes,
                receive_granted = receive_granted / 2,
                send_asked = send_bytes,
                send_granted = send_granted / 2,
                "the kernel capped the QUIC socket buffers (net.core.rmem_max / wmem_max); `weir doctor` shows the fix"
            );
        }
    }
    // The stateless-reset key is derived from the server's private key (the same after
    // a restart, so devices learn at once that their connections are gone).
    let reset_secret =
        tls::read_pem_files(&config.certs_dir).map_err(|error| Fatal::Quic { reason: error.to_string() })?.key;
    let v1 = crate::core::protocol::FRAME_LIMITS_V1;
    let settings = QuicSettings {
        live: Arc::new(quic::LiveCell::new(live)),
        limits: crate::core::protocol::FrameLimits {
            frame_bytes_max: config.frame_bytes_max.0 as usize,
            records_per_frame_max: config.records_per_frame_max as usize,
            ..v1
        },
        connections_max: config.connections_max as usize,
        handshakes_before_retry: config.handshakes_before_retry as usize,
        frames_in_flight_per_connection_max: config.frames_in_flight_per_connection_max as usize,
        topics: valid
            .config
            .topics
            .iter()
            // weir's own topics (`_weir.alerts`) are not the devices' to write.
            .filter(|topic| !topic.name.starts_with(crate::config::RESERVED_TOPIC_PREFIX))
            .map(|topic| (topic.name.clone(), (topic.partitions, valid.config.upstream.key_hash(&topic.name))))
            .collect(),
        connections_per_device_max: config.connections_per_device_max as usize,
        bytes_in_flight_per_connection_max: config.bytes_in_flight_per_connection_max.0 as usize,
        handshakes_max: config.handshakes_max as usize,
        handshake_timeout: std::time::Duration::from_secs(config.handshake_timeout_s.0),
        reset_key: quic::stateless_reset_key(&reset_secret),
        device_connections: Arc::new(quic::DeviceConnections::default()),
        denied_log: std::sync::Mutex::new(crate::core::throttle::LogThrottle::new(
            quic::DENIED_LOG_INTERVAL,
            quic::DENIED_LOG_DEVICES_MAX,
        )),
        metrics: metrics.quic(),
    };
    Ok(PreparedQuic { settings: Arc::new(settings), sockets, address })
}
