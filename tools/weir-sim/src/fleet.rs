//! Running the fleet: connect every device (a bounded number of handshakes at once),
//! let each write at its rate until the end of the run, drain what is outstanding, and
//! account every send: acked records with their latency (send call to ack, which
//! includes the client's linger and queueing), failed sends with their first errors.
//!
//! Each device's records have the device id as key (so one device's records of a topic
//! land in one partition, in order) and a value that starts with `<device> <n> `, n
//! counting that device's records from 0, padded with '.' to --record-bytes; a test can
//! check the server's log against the acked log by these.
//!
//! Per device, the longest time between two of its acks (`ack_gap_us`, one value per
//! device that got two): with a device sending every second it is about one second,
//! and after the server went away and came back (a reconnect storm) it is how long that
//! device could not write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use weir_device::{client_endpoint, DeviceClient, DeviceError, PendingAck, Record, RecordAck};

use crate::Plan;

/// The longest ack latency the histogram holds (longer ones count as this).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Distinct error messages kept for the summary.
const ERRORS_KEPT_MAX: usize = 8;
/// Acked batches queued for the acked-log writer thread.
const ACKED_LOG_QUEUE_MAX: usize = 4096;
/// The shortest interval between two sends of one device.
const TICK_MIN: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    #[error("{0}")]
    Endpoint(DeviceError),
    #[error("acked log {path}: {source}")]
    AckedLog { path: PathBuf, source: std::io::Error },
}

/// What a run did.
#[derive(Debug)]
pub struct Outcome {
    pub devices: usize,
    pub connected: usize,
    pub connect_failures: u64,
    pub endpoints: usize,
    pub generated: u64,
    pub acked: u64,
    pub failed_sends: u64,
    pub failed_records: u64,
    /// Sends still unresolved when the drain time ran out.
    pub abandoned_sends: u64,
    pub latency_us: Histogram<u64>,
    /// One send's round trip, from the send call to its ack (in the closed loop a send
    /// is one frame), counted once per send.
    pub send_rtt_us: Histogram<u64>,
    /// Sends acked.
    pub sends_acked: u64,
    /// Times the endpoints moved to a new socket (--rebind-every-ms), in all.
    pub rebinds: u64,
    /// From the start of writing to the last resolved send.
    pub elapsed: Duration,
    /// When the devices began writing and when they stopped (the drain follows), for a
    /// caller that samples the server over the writing time only.
    pub writing_from: std::time::Instant,
    pub writing_until: std::time::Instant,
    pub first_errors: Vec<String>,
    /// Each device's longest time between two of its acks (devices with two or more).
    pub ack_gap_us: Histogram<u64>,
    /// The earliest of the devices' last acks, from the start of writing (`None` when
    /// some device got no ack at all): every device wrote until at least then.
    pub last_ack_min: Option<Duration>,
}

/// When one device's sends were acked, from the start of writing.
#[derive(Default)]
struct DeviceAcks {
    /// The latest ack, in microseconds + 1 (0: none yet).
    last_us: AtomicU64,
    longest_gap_us: AtomicU64,
}

impl DeviceAcks {
    fn note(&self, at_us: u64) {
        let previous = self.last_us.fetch_max(at_us + 1, Ordering::Relaxed);
        if previous > 0 && at_us + 1 > previous {
            self.longest_gap_us.fetch_max(at_us + 1 - previous, Ordering::Relaxed);
        }
    }
}

struct Stats {
    connect_failures: AtomicU64,
    generated: AtomicU64,
    acked: AtomicU64,
    failed_sends: AtomicU64,
    failed_records: AtomicU64,
    abandoned_sends: AtomicU64,
    last_resolved_us: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    send_rtt_us: Mutex<Histogram<u64>>,
    sends_acked: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn note_error(&self, error: String) {
        let mut errors = self.errors.lock().expect("no panics while held");
        if errors.len() < ERRORS_KEPT_MAX && !errors.contains(&error) {
            errors.push(error);
        }
    }
}

struct AckedBatch {
    device: Arc<str>,
    topic: Arc<str>,
    records: Vec<RecordAck>,
}

/// Writes `device sequence partition offset record_index topic` lines on its own
/// thread, so file I/O never blocks a runtime thread.
fn start_acked_log(
    path: &PathBuf,
) -> Result<(mpsc::Sender<AckedBatch>, std::thread::JoinHandle<std::io::Result<()>>), FleetError> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(|source| FleetError::AckedLog { path: path.clone(), source })?;
    let (sender, mut receiver) = mpsc::channel::<AckedBatch>(ACKED_LOG_QUEUE_MAX);
    let writer = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        while let Some(batch) = receiver.blocking_recv() {
            for record in &batch.records {
                writeln!(
                    out,
                    "{} {} {} {} {} {}",
                    batch.device, record.sequence, record.partition, record.offset, record.record_index, batch.topic
                )?;
            }
        }
        out.flush()?;
        out.into_inner().map_err(|error| error.into_error())?.sync_all()
    });
    Ok((sender, writer))
}

fn progress_bar(length: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

pub async fn run(plan: &Plan) -> Result<Outcome, FleetError> {
    let stats = Arc::new(Stats {
        connect_failures: AtomicU64::new(0),
        generated: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        failed_sends: AtomicU64::new(0),
        failed_records: AtomicU64::new(0),
        abandoned_sends: AtomicU64::new(0),
        last_resolved_us: AtomicU64::new(0),
        latency_us: Mutex::new(Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds")),
        send_rtt_us: Mutex::new(Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds")),
        sends_acked: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
    });
    let (acked_log, acked_log_writer) = match &plan.acked_log {
        Some(path) => {
            let (sender, writer) = start_acked_log(path)?;
            (Some(sender), Some(writer))
        }
        None => (None, None),
    };

    // One endpoint (UDP socket) per devices_per_endpoint devices.
    let devices = plan.device_ids.len();
    let endpoint_count = devices.div_ceil(plan.devices_per_endpoint);
    let bind = plan.profile_template.bind_address();
    let endpoints: Vec<quinn::Endpoint> =
        (0..endpoint_count).map(|_| client_endpoint(bind)).collect::<Result<_, _>>().map_err(FleetError::Endpoint)?;

    // Connect, a bounded number of handshakes at once.
    let connecting = progress_bar(devices as u64, "connecting {pos}/{len} devices [{bar:30}] {elapsed}");
    let handshakes = Arc::new(Semaphore::new(plan.connect_concurrency));
    let mut connects = JoinSet::new();
    for (index, device_id) in plan.device_ids.iter().enumerate() {
        let mut profile = plan.profile_template.clone();
        profile.tls.certificate = plan.certs.join(format!("devices/{device_id}.pem"));
        profile.tls.key = plan.certs.join(format!("devices/{device_id}.key"));
        let endpoint = endpoints[index / plan.devices_per_endpoint].clone();
        let handshakes = handshakes.clone();
        let stats = stats.clone();
        let connecting = connecting.clone();
        connects.spawn(async move {
            let _permit = handshakes.acquire().await.expect("never closed");
            let result = DeviceClient::connect_on(&endpoint, &profile).await;
            connecting.inc(1);
            match result {
                Ok(client) => Some((index, client)),
                Err(error) => {
                    stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    stats.note_error(format!("connect {}: {error}", profile.tls.certificate.display()));
                    None
                }
            }
        });
    }
    let mut clients = Vec::with_capacity(devices);
    while let Some(joined) = connects.join_next().await {
        if let Some(connected) = joined.expect("connect tasks do not panic") {
            clients.push(connected);
        }
    }
    connecting.finish_and_clear();
    let connected = clients.len();

    // Write until `end`, drain until `drain_end`.
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(plan.seconds);
    let drain_end = end + Duration::from_secs_f64(plan.drain_seconds);
    if let Some(on_writing) = &plan.on_writing {
        let _ = on_writing.send(start.into_std());
    }
    let topics: Arc<Vec<Arc<str>>> = Arc::new(plan.topics.iter().map(|topic| Arc::from(topic.as_str())).collect());
    let records_per_send_max = plan.profile_template.flow.queue_records_max.min(4096);
    let running = progress_bar((plan.seconds * 10.0).ceil() as u64, "{elapsed_precise} [{bar:30}] {msg}");
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut fleet = JoinSet::new();
    let mut device_acks = Vec::with_capacity(clients.len());
    for (index, client) in clients {
        let acks = Arc::new(DeviceAcks::default());
        device_acks.push(acks.clone());
        let restart = plan.faults.restart_of(index).map(|after| {
            let device_id = &plan.device_ids[index];
            let mut profile = plan.profile_template.clone();
            profile.tls.certificate = plan.certs.join(format!("devices/{device_id}.pem"));
            profile.tls.key = plan.certs.join(format!("devices/{device_id}.key"));
            Restart { at: start + after, endpoint: endpoints[index / plan.devices_per_endpoint].clone(), profile }
        });
        let device = DeviceRun {
            stop_at: plan.faults.stop_of(index).map(|after| start + after),
            restart,
            client: Arc::new(client),
            index,
            rate: plan.rate,
            record_bytes: plan.record_bytes,
            topics: topics.clone(),
            sends_in_flight: plan.sends_in_flight,
            records_per_send_max,
            stats: stats.clone(),
            acked_log: acked_log.clone(),
            start,
            end,
            drain_end,
            in_flight: in_flight.clone(),
            closed_loop: plan.closed_loop,
            acks,
        };
        fleet.spawn(device.run());
    }
    drop(acked_log);
    let ticker = {
        let stats = stats.clone();
        let in_flight = in_flight.clone();
        let running = running.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(250));
            loop {
                interval.tick().await;
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(start);
                running.set_position((elapsed.as_secs_f64() * 10.0) as u64);
                let acked = stats.acked.load(Ordering::Relaxed);
                let rate = if elapsed.is_zero() { 0.0 } else { acked as f64 / elapsed.as_secs_f64() };
                running.set_message(format!(
                    "acked {acked} ({rate:.0}/s), sends in flight {}, failed sends {}{}",
                    in_flight.load(Ordering::Relaxed),
                    stats.failed_sends.load(Ordering::Relaxed),
                    if now > end { ", draining" } else { "" }
                ));
            }
        })
    };
    // NAT rebinding: every endpoint moves to a fresh socket (new source port) now and
    // then while devices write; their connections must carry on.
    let rebinds = Arc::new(AtomicU64::new(0));
    let rebinder = plan.rebind_every.map(|every| {
        let endpoints = endpoints.clone();
        let rebinds = rebinds.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut next = start + every;
            while next < end {
                tokio::time::sleep_until(next).await;
                for endpoint in &endpoints {
                    match std::net::UdpSocket::bind(bind).and_then(|socket| endpoint.rebind(socket)) {
                        Ok(()) => {
                            rebinds.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => stats.note_error(format!("rebind: {error}")),
                    }
                }
                next += every;
            }
        })
    });
    while let Some(joined) = fleet.join_next().await {
        joined.expect("device tasks do not panic");
    }
    if let Some(rebinder) = rebinder {
        rebinder.abort();
    }
    ticker.abort();
    running.finish_and_clear();
    // Let the endpoints send the connections' close frames.
    let idle = endpoints.iter().map(|endpoint| endpoint.wait_idle());
    let _ = tokio::time::timeout(Duration::from_secs(2), join_all(idle)).await;

    if let (Some(writer), Some(path)) = (acked_log_writer, &plan.acked_log) {
        let written = tokio::task::spawn_blocking(move || writer.join()).await.expect("join the writer thread");
        written
            .expect("the acked-log writer does not panic")
            .map_err(|source| FleetError::AckedLog { path: path.clone(), source })?;
    }
    let last_resolved = Duration::from_micros(stats.last_resolved_us.load(Ordering::Relaxed));
    let elapsed = if last_resolved.is_zero() { Duration::from_secs_f64(plan.seconds) } else { last_resolved };
    let latency_us = std::mem::replace(
        &mut *stats.latency_us.lock().expect("no panics while held"),
        Histogram::new(1).expect("valid"),
    );
    let send_rtt_us = std::mem::replace(
        &mut *stats.send_rtt_us.lock().expect("no panics while held"),
        Histogram::new(1).expect("valid"),
    );
    let first_errors = std::mem::take(&mut *stats.errors.lock().expect("no panics while held"));
    let mut ack_gap_us = Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds");
    let mut last_ack_min = (!device_acks.is_empty() && connected == devices).then_some(Duration::MAX);
    for acks in &device_acks {
        let gap = acks.longest_gap_us.load(Ordering::Relaxed);
        if gap > 0 {
            ack_gap_us.saturating_record(gap.clamp(1, LATENCY_US_MAX));
        }
        last_ack_min = match acks.last_us.load(Ordering::Relaxed) {
            0 => None,
            last => last_ack_min.map(|least| least.min(Duration::from_micros(last - 1))),
        };
    }
    Ok(Outcome {
        devices,
        connected,
        connect_failures: stats.connect_failures.load(Ordering::Relaxed),
        endpoints: endpoint_count,
        generated: stats.generated.load(Ordering::Relaxed),
        acked: stats.acked.load(Ordering::Relaxed),
        failed_sends: stats.failed_sends.load(Ordering::Relaxed),
        failed_records: stats.failed_records.load(Ordering::Relaxed),
        abandoned_sends: stats.abandoned_sends.load(Ordering::Relaxed),
        latency_us,
        send_rtt_us,
        sends_acked: stats.sends_acked.load(Ordering::Relaxed),
        rebinds: rebinds.load(Ordering::Relaxed),
        elapsed,
        writing_from: start.into_std(),
        writing_until: end.into_std(),
        first_errors,
        ack_gap_us,
        last_ack_min,
    })
}

async fn join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    std::future::poll_fn(|context| {
        pinned.retain_mut(|future| future.as_mut().poll(context).is_pending());
        if pinned.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// A device that connects again, as one that lost its sequence state.
struct Restart {
    at: Instant,
    endpoint: quinn::Endpoint,
    profile: weir_device::DeviceProfile,
}

struct DeviceRun {
    stop_at: Option<Instant>,
    restart: Option<Restart>,
    client: Arc<DeviceClient>,
    index: usize,
    rate: f64,
    record_bytes: usize,
    topics: Arc<Vec<Arc<str>>>,
    sends_in_flight: usize,
    records_per_send_max: usize,
    stats: Arc<Stats>,
    acked_log: Option<mpsc::Sender<AckedBatch>>,
    start: Instant,
    end: Instant,
    drain_end: Instant,
    in_flight: Arc<AtomicUsize>,
    closed_loop: Option<crate::ClosedLoop>,
    acks: Arc<DeviceAcks>,
}

impl DeviceRun {
    /// Waits for the device's sends, closes its connection, and connects again with a
    /// clock that began at 1970 `uptime` ago and no sequence state: its sequences start
    /// again from below. False when it could not connect (noted).
    async fn restart(&mut self, restart: &Restart, sends: &mut JoinSet<()>) -> bool {
        while sends.join_next().await.is_some() {}
        let uptime = Instant::now().saturating_duration_since(self.start);
        let mut profile = restart.profile.clone();
        profile.sequence.state_file = None;
        match DeviceClient::connect_on_at(&restart.endpoint, &profile, SystemTime::UNIX_EPOCH + uptime).await {
            Ok(client) => {
                let previous = std::mem::replace(&mut self.client, Arc::new(client));
                if let Ok(previous) = Arc::try_unwrap(previous) {
                    let _ = tokio::time::timeout(Duration::from_secs(2), previous.close()).await;
                }
                true
            }
            Err(error) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                self.stats.note_error(format!("reconnect {}: {error}", self.client.device_id()));
                false
            }
        }
    }

    async fn run(mut self) {
        let device: Arc<str> = self.client.device_id().into();
        let key = Bytes::from(device.as_bytes().to_vec());
        let mut sends = JoinSet::new();
        if let Some(closed_loop) = self.closed_loop {
            self.write_closed_loop(closed_loop, &device, &key, &mut sends).await;
        } else if self.rate > 0.0 {
            let tick = Duration::from_secs_f64(1.0 / self.rate).max(TICK_MIN);
            // Spread the devices' ticks over one tick (golden-ratio sequence).
            let phase = tick.mul_f64((self.index as f64 * 0.618_033_988_75).fract());
            let mut next = self.start + phase;
            let mut generated = 0u64;
            let mut topic_rotation = self.index;
            let mut restart = self.restart.take();
            while next < self.end {
                if self.stop_at.is_some_and(|at| next >= at) {
                    break;
                }
                if let Some(due) = restart.take_if(|restart| next >= restart.at) {
                    if !self.restart(&due, &mut sends).await {
                        break;
                    }
                }
                tokio::time::sleep_until(next).await;
                while sends.len() >= self.sends_in_flight {
                    tokio::select! {
                        _ = sends.join_next() => {}
                        () = tokio::time::sleep_until(self.end) => break,
                    }
                }
                if Instant::now() >= self.end {
                    break;
                }
                while sends.try_join_next().is_some() {}
                let due = (next.duration_since(self.start).as_secs_f64() * self.rate) as u64 + 1;
                let count = due.saturating_sub(generated).min(self.records_per_send_max as u64);
                if count > 0 {
                    let records = make_records(&device, &key, generated, count as usize, self.record_bytes);
                    generated += count;
                    self.stats.generated.fetch_add(count, Ordering::Relaxed);
                    let topic = self.topics[topic_rotation % self.topics.len()].clone();
                    topic_rotation += 1;
                    // Queued here, in generation order (a spawned task per send could be
                    // queued after a later one); the ack is awaited in a task.
                    let began = Instant::now();
                    let pending = self.client.enqueue(&topic, records).await;
                    sends.spawn(send(
                        pending,
                        began,
                        count,
                        device.clone(),
                        topic,
                        self.stats.clone(),
                        self.acked_log.clone(),
                        (self.start, self.acks.clone()),
                        self.in_flight.clone(),
                    ));
                }
                next += tick;
            }
        } else {
            tokio::time::sleep_until(self.end).await;
        }
        let drained =
            tokio::time::timeout_at(self.drain_end, async { while sends.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            self.stats.abandoned_sends.fetch_add(sends.len() as u64, Ordering::Relaxed);
            sends.abort_all();
            while sends.join_next().await.is_some() {}
        }
        if let Ok(client) = Arc::try_unwrap(self.client) {
            let remaining = self.drain_end.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
            let _ = tokio::time::timeout(remaining, client.close()).await;
        }
    }
}

impl DeviceRun {
    /// Keeps exactly `frames_in_flight` sends of `records_per_frame` records in flight
    /// until the end of the run: each is flushed into its own frame at once, and the
    /// next goes the moment one is answered.
    async fn write_closed_loop(
        &self,
        closed_loop: crate::ClosedLoop,
        device: &Arc<str>,
        key: &Bytes,
        sends: &mut JoinSet<()>,
    ) {
        tokio::time::sleep_until(self.start).await;
        let (mut generated, mut topic_rotation) = (0u64, self.index);
        let count = closed_loop.records_per_frame;
        loop {
            while sends.len() < closed_loop.frames_in_flight && Instant::now() < self.end {
                let records = make_records(device, key, generated, count, self.record_bytes);
                generated += count as u64;
                self.stats.generated.fetch_add(count as u64, Ordering::Relaxed);
                let topic = self.topics[topic_rotation % self.topics.len()].clone();
                topic_rotation += 1;
                let began = Instant::now();
                let pending = self.client.enqueue(&topic, records).await;
                // No linger: the send is its own frame now.
                if let Err(error) = self.client.flush().await {
                    self.stats.note_error(format!("{device}: flush: {error}"));
                }
                sends.spawn(send(
                    pending,
                    began,
                    count as u64,
                    device.clone(),
                    topic,
                    self.stats.clone(),
                    self.acked_log.clone(),
                    (self.start, self.acks.clone()),
                    self.in_flight.clone(),
                ));
            }
            if Instant::now() >= self.end {
                return;
            }
            tokio::select! {
                _ = sends.join_next() => {}
                () = tokio::time::sleep_until(self.end) => return,
            }
        }
    }
}

fn make_records(device: &str, key: &Bytes, first: u64, count: usize, record_bytes: usize) -> Vec<Record> {
    let timestamp_ms =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_millis() as i64);
    (0..count as u64)
        .map(|offset| {
            let mut value = format!("{device} {} ", first + offset).into_bytes();
            value.resize(record_bytes, b'.');
            Record { timestamp_ms, key: Some(key.clone()), value: Some(Bytes::from(value)), headers: Vec::new() }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn send(
    pending: Result<PendingAck, DeviceError>,
    began: Instant,
    count: u64,
    device: Arc<str>,
    topic: Arc<str>,
    stats: Arc<Stats>,
    acked_log: Option<mpsc::Sender<AckedBatch>>,
    (start, acks): (Instant, Arc<DeviceAcks>),
    in_flight: Arc<AtomicUsize>,
) {
    in_flight.fetch_add(1, Ordering::Relaxed);
    let result = match pending {
        Ok(pending) => pending.await,
        Err(error) => Err(error),
    };
    let resolved = Instant::now();
    in_flight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(ack) => {
            let latency_us = resolved.duration_since(began).as_micros() as u64;
            stats
                .latency_us
                .lock()
                .expect("no panics while held")
                .saturating_record_n(latency_us.clamp(1, LATENCY_US_MAX), count);
            stats
                .send_rtt_us
                .lock()
                .expect("no panics while held")
                .saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
            stats.sends_acked.fetch_add(1, Ordering::Relaxed);
            acks.note(resolved.saturating_duration_since(start).as_micros() as u64);
            stats.acked.fetch_add(count, Ordering::Relaxed);
            if let Some(log) = acked_log {
                let _ = log.send(AckedBatch { device, topic, records: ack.records }).await;
            }
        }
        Err(error) => {
            stats.failed_sends.fetch_add(1, Ordering::Relaxed);
            stats.failed_records.fetch_add(count, Ordering::Relaxed);
            stats.note_error(format!("{device}: {error}"));
        }
    }
    let since_start = resolved.saturating_duration_since(start).as_micros() as u64;
    stats.last_resolved_us.fetch_max(since_start, Ordering::Relaxed);
}
