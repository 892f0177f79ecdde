//! The tokio shell around `Pipeline`: one driver task per device owns the connection,
//! the stream and the pipeline, and executes what the pipeline asks (connect, write a
//! frame, persist a sequence reservation, deliver a result). A second task per
//! connection reads answers and hands them over a bounded channel, so reading never
//! waits on the driver and a cancelled read can never lose half a frame.
//!
//! Many devices can share one `quinn::Endpoint` (one UDP socket and one I/O task): each
//! device still has its own connection, since its identity is its certificate.
//! Backpressure reaches the caller through `flow.queue_records_max` permits: `send`
//! waits for permits for its records, and they come back when the records' frames are
//! answered or have failed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use weir_protocol::batch::Record;
use weir_protocol::{FRAME_LENGTH_PREFIX_BYTES, FRAME_LIMITS_V1};

use crate::batch::{check_record, check_topic};
use crate::error::{DeviceError, LinkError};
use crate::pipeline::{Output, Pipeline, PipelineSettings, REFUSALS_PER_TRY};
use crate::profile::DeviceProfile;
use crate::retry::Jitter;
use crate::tls::Credentials;
use crate::{sequence_state, Ack, WaiterId};

/// Commands queued from the handle to the driver.
const COMMANDS_MAX: usize = 64;

/// A UDP endpoint for device connections, bound to `bind` (port 0: any). One endpoint
/// can carry many devices; it must be created inside a tokio runtime.
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, DeviceError> {
    quinn::Endpoint::client(bind).map_err(|source| DeviceError::Endpoint { address: bind, source: source.into() })
}

enum Command {
    Send {
        topic: Arc<str>,
        records: Vec<Record>,
        permits: OwnedSemaphorePermit,
        reply: oneshot::Sender<Result<Ack, DeviceError>>,
    },
    Flush,
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// A device's connection to weir. Sends are batched, sequenced and retried by a driver
/// task; dropping the client stops it at once (use `close` to drain first).
pub struct DeviceClient {
    commands: mpsc::Sender<Command>,
    permits: Arc<Semaphore>,
    queue_records_max: usize,
    bytes_max: usize,
    device_id: String,
    task: JoinHandle<()>,
}

impl DeviceClient {
    /// Connects with an endpoint of its own.
    pub async fn connect(profile: &DeviceProfile) -> Result<DeviceClient, DeviceError> {
        let endpoint = client_endpoint(profile.bind_address())?;
        DeviceClient::connect_on(&endpoint, profile).await
    }

    /// Connects over a shared endpoint (see `client_endpoint`). The first connection is
    /// made here (up to `retry.attempts_max` tries, rotating through the addresses), so
    /// bad credentials or an unreachable server show at once; later reconnects happen
    /// as sends need them.
    pub async fn connect_on(endpoint: &quinn::Endpoint, profile: &DeviceProfile) -> Result<DeviceClient, DeviceError> {
        DeviceClient::connect_on_at(endpoint, profile, SystemTime::now()).await
    }

    /// `connect_on` for a device whose clock reads `clock`: its sequences start from
    /// it (and the state file). A simulator restarts a device that lost its state and
    /// whose clock began again at 1970 this way (`UNIX_EPOCH` + its uptime).
    pub async fn connect_on_at(
        endpoint: &quinn::Endpoint,
        profile: &DeviceProfile,
        clock: SystemTime,
    ) -> Result<DeviceClient, DeviceError> {
        profile.validate("(device profile)")?;
        let credentials = Credentials::load(profile)?;
        let state_file = profile.sequence.state_file.clone();
        let sequence_start = sequence_state::start(state_file.as_deref(), clock)?;
        let settings = PipelineSettings::from_profile(profile);
        let connect_timeout = Duration::from_millis(profile.timeouts.connect_ms);
        let (answers_tx, answers_rx) = mpsc::channel(profile.flow.frames_in_flight_max + 2);
        let mut connector = Connector {
            endpoint: endpoint.clone(),
            credentials: credentials.clone(),
            connect_timeout,
            answers: answers_tx,
            generation: 0,
        };
        // The first connection: up to retry.attempts_max tries, rotating through the
        // addresses, with the same jittered backoff as every reconnect (and, as there,
        // `REFUSALS_PER_TRY` refusals for load count as one try).
        let seed = seed_for(&credentials.device_id);
        let mut jitter = Jitter::new(seed ^ 0x5eed);
        let mut last_failure = None;
        let mut connected = None;
        let (mut tries, mut refusals, mut failures) = (0u32, 0u32, 0u32);
        while tries < settings.attempts_max {
            let address_index = failures as usize % settings.addresses.len();
            if failures > 0 {
                tokio::time::sleep(settings.backoff.delay(failures, jitter.unit())).await;
            }
            match connector.open(settings.addresses[address_index]).await {
                Ok(link) => {
                    connected = Some((address_index, link));
                    break;
                }
                Err(cause) if cause.is_credentials_refused() => return Err(DeviceError::CredentialsRefused(cause)),
                Err(cause) => {
                    failures += 1;
                    if cause.is_refused() {
                        refusals += 1;
                        tries += u32::from(refusals.is_multiple_of(REFUSALS_PER_TRY));
                    } else {
                        tries += 1;
                    }
                    last_failure = Some(cause);
                }
            }
        }
        let Some((address_index, link)) = connected else {
            return Err(DeviceError::Unreachable(last_failure.expect("attempts_max is at least 1")));
        };
        let pipeline = Pipeline::new(
            settings,
            sequence_start,
            state_file.is_some(),
            seed,
            Some(address_index),
            Instant::now().into_std(),
        );
        let permits = Arc::new(Semaphore::new(profile.flow.queue_records_max));
        let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_MAX);
        let driver = Driver {
            pipeline,
            connector,
            link: Some(link),
            answers: answers_rx,
            commands: commands_rx,
            replies: HashMap::new(),
            permits: permits.clone(),
            state_file,
            answer_timeout: Duration::from_millis(profile.timeouts.answer_ms),
            closing: Vec::new(),
        };
        let task = tokio::spawn(driver.run());
        Ok(DeviceClient {
            commands: commands_tx,
            permits,
            queue_records_max: profile.flow.queue_records_max,
            bytes_max: profile.batch.bytes_max as usize,
            device_id: credentials.device_id,
            task,
        })
    }

    /// The device id the server sees (the certificate's subject CN).
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Sends `records` to `topic` and waits until every one is acknowledged (durable on
    /// the appliance). The records may share frames with other sends and may be split
    /// over several frames; the ack lists each record's sequence, partition and offset,
    /// in the order given. An error means some records may not be stored.
    pub async fn send(&self, topic: &str, records: Vec<Record>) -> Result<Ack, DeviceError> {
        self.enqueue(topic, records).await?.await
    }

    /// The first half of `send`: waits until the records are queued, then returns the
    /// future of their ack. Records are sequenced (and stored) in the order they are
    /// queued, so a caller that needs its sends stored in order queues them one after
    /// the other and awaits the acks concurrently: concurrent `send` calls from
    /// separate tasks are queued in whatever order those tasks happen to run.
    pub async fn enqueue(&self, topic: &str, records: Vec<Record>) -> Result<PendingAck, DeviceError> {
        check_topic(topic)?;
        if records.is_empty() {
            return Ok(PendingAck { answer: None });
        }
        if records.len() > self.queue_records_max {
            return Err(DeviceError::TooManyRecords { records: records.len(), max: self.queue_records_max });
        }
        for (index, record) in records.iter().enumerate() {
            check_record(index, record, topic, self.bytes_max)?;
        }
        let count = u32::try_from(records.len()).expect("at most queue_records_max");
        let permits = self.permits.clone().acquire_many_owned(count).await.map_err(|_| DeviceError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let command = Command::Send { topic: topic.into(), records, permits, reply };
        self.commands.send(command).await.map_err(|_| DeviceError::Closed)?;
        Ok(PendingAck { answer: Some(answer) })
    }

    /// Closes the open batches now instead of at the end of their linger.
    pub async fn flush(&self) -> Result<(), DeviceError> {
        self.commands.send(Command::Flush).await.map_err(|_| DeviceError::Closed)
    }

    /// Flushes, waits until every queued record is acknowledged or has failed, then
    /// closes the connection.
    pub async fn close(self) -> Result<(), DeviceError> {
        let (reply, done) = oneshot::channel();
        self.commands.send(Command::Close { reply }).await.map_err(|_| DeviceError::Closed)?;
        done.await.map_err(|_| DeviceError::Closed)?;
        let _ = self.task.await;
        Ok(())
    }
}

/// The ack of queued records (see `DeviceClient::enqueue`).
#[must_use = "the records are sent either way; the ack says whether they are stored"]
pub struct PendingAck {
    answer: Option<oneshot::Receiver<Result<Ack, DeviceError>>>,
}

impl std::future::Future for PendingAck {
    type Output = Result<Ack, DeviceError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, context: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match self.answer.as_mut() {
            None => std::task::Poll::Ready(Ok(Ack { records: Vec::new() })),
            Some(answer) => std::pin::Pin::new(answer)
                .poll(context)
                .map(|result| result.map_err(|_| DeviceError::Closed).and_then(|result| result)),
        }
    }
}

fn seed_for(device_id: &str) -> u64 {
    let clock = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_nanos() as u64);
    device_id
        .bytes()
        .fold(clock ^ 0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3))
}

/// An answer (archive bytes) or why the stream stopped, tagged with the connection's
/// generation so answers from a replaced connection are ignored.
type AnswerMessage = (u64, Result<Vec<u8>, LinkError>);

struct Link {
    connection: quinn::Connection,
    send: quinn::SendStream,
    reader: JoinHandle<()>,
    address: SocketAddr,
    generation: u64,
}

impl Link {
    fn close(self, reason: &[u8]) {
        self.reader.abort();
        self.connection.close(0u32.into(), reason);
    }
}

struct Connector {
    endpoint: quinn::Endpoint,
    credentials: Credentials,
    connect_timeout: Duration,
    answers: mpsc::Sender<AnswerMessage>,
    generation: u64,
}

impl Connector {
    async fn open(&mut self, address: SocketAddr) -> Result<Link, LinkError> {
        let config = self.credentials.client_config.clone();
        let connecting = self
            .endpoint
            .connect_with(config, address, &self.credentials.server_name)
            .map_err(|source| LinkError::Connect { address, source })?;
        let timeout_ms = self.connect_timeout.as_millis() as u64;
        let handshake = async {
            let connection = connecting.await?;
            let (send, receive) = connection.open_bi().await?;
            Ok::<_, quinn::ConnectionError>((connection, send, receive))
        };
        let (connection, send, receive) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| LinkError::ConnectTimeout { address, timeout_ms })?
            .map_err(|source| LinkError::Connection { address, source })?;
        self.generation += 1;
        let generation = self.generation;
        let reader = tokio::spawn(read_answers(receive, generation, self.answers.clone(), address));
        Ok(Link { connection, send, reader, address, generation })
    }
}

fn read_failure(address: SocketAddr, error: quinn::ReadExactError) -> LinkError {
    match error {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(source)) => {
            LinkError::Connection { address, source }
        }
        quinn::ReadExactError::FinishedEarly(0) => LinkError::StreamEnded { address },
        source => LinkError::Read { address, source },
    }
}

fn write_failure(address: SocketAddr, error: quinn::WriteError) -> LinkError {
    match error {
        quinn::WriteError::ConnectionLost(source) => LinkError::Connection { address, source },
        source => LinkError::Write { address, source },
    }
}

/// Reads length-prefixed answers until the stream fails; the failure is the last message.
async fn read_answers(
    mut receive: quinn::RecvStream,
    generation: u64,
    answers: mpsc::Sender<AnswerMessage>,
    address: SocketAddr,
) {
    loop {
        let mut prefix = [0u8; FRAME_LENGTH_PREFIX_BYTES];
        let result = match receive.read_exact(&mut prefix).await {
            Err(error) => Err(read_failure(address, error)),
            Ok(()) => {
                let length = u32::from_be_bytes(prefix) as usize;
                if length == 0 || length > FRAME_LIMITS_V1.frame_bytes_max {
                    Err(LinkError::Protocol { address, why: format!("answer length {length}") })
                } else {
                    let mut archive = vec![0u8; length];
                    match receive.read_exact(&mut archive).await {
                        Ok(()) => Ok(archive),
                        Err(error) => Err(read_failure(address, error)),
                    }
                }
            }
        };
        let stop = result.is_err();
        if answers.send((generation, result)).await.is_err() || stop {
            return;
        }
    }
}

struct Driver {
    pipeline: Pipeline,
    connector: Connector,
    link: Option<Link>,
    answers: mpsc::Receiver<AnswerMessage>,
    commands: mpsc::Receiver<Command>,
    replies: HashMap<WaiterId, oneshot::Sender<Result<Ack, DeviceError>>>,
    permits: Arc<Semaphore>,
    state_file: Option<std::path::PathBuf>,
    answer_timeout: Duration,
    closing: Vec<oneshot::Sender<()>>,
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

impl Driver {
    async fn run(mut self) {
        loop {
            self.execute().await;
            if !self.closing.is_empty() && self.pipeline.is_idle() {
                if let Some(link) = self.link.take() {
                    link.close(b"device closing");
                }
                for reply in self.closing.drain(..) {
                    let _ = reply.send(());
                }
                return;
            }
            let deadline = self.pipeline.poll_timeout().map(Instant::from_std);
            tokio::select! {
                biased;
                Some((generation, answer)) = self.answers.recv() => self.handle_answer(generation, answer),
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break, // every handle is gone
                },
                () = sleep_until(deadline), if deadline.is_some() => self.pipeline.handle_timeout(now()),
            }
        }
        if let Some(link) = self.link.take() {
            link.close(b"device client dropped");
        }
    }

    fn handle_answer(&mut self, generation: u64, answer: Result<Vec<u8>, LinkError>) {
        if self.link.as_ref().is_none_or(|link| link.generation != generation) {
            return; // from a connection already replaced
        }
        match answer {
            Ok(archive) => self.pipeline.handle_answer(&archive, now()),
            Err(cause) => self.lose_link(cause),
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Send { topic, records, permits, reply } => {
                permits.forget(); // given back through Output::Release
                let waiter = self.pipeline.submit(&topic, records, now());
                self.replies.insert(waiter, reply);
            }
            Command::Flush => self.pipeline.flush(now()),
            Command::Close { reply } => {
                self.pipeline.flush(now());
                self.closing.push(reply);
            }
        }
    }

    fn lose_link(&mut self, cause: LinkError) {
        if let Some(link) = self.link.take() {
            link.close(b"lost");
        }
        self.pipeline.handle_connection_lost(cause, now());
    }

    /// Runs everything the pipeline asks for until it asks for nothing.
    async fn execute(&mut self) {
        loop {
            while let Some(output) = self.pipeline.poll_output() {
                self.handle_output(output);
            }
            if let Some(address) = self.pipeline.poll_connect(now()) {
                match self.connector.open(address).await {
                    Ok(link) => {
                        self.link = Some(link);
                        self.pipeline.handle_connected(now());
                    }
                    Err(cause) => self.pipeline.handle_connect_failed(cause, now()),
                }
                continue;
            }
            if let Some(frame) = self.pipeline.poll_transmit(now()) {
                let link = self.link.as_mut().expect("the pipeline transmits only when connected");
                let address = link.address;
                match tokio::time::timeout(self.answer_timeout, link.send.write_chunk(frame)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => self.lose_link(write_failure(address, error)),
                    Err(_) => {
                        let timeout_ms = self.answer_timeout.as_millis() as u64;
                        self.lose_link(LinkError::AnswerTimeout { address, timeout_ms });
                    }
                }
                continue;
            }
            if !self.pipeline.has_output() {
                return;
            }
        }
    }

    fn handle_output(&mut self, output: Output) {
        match output {
            Output::Deliver { waiter, result } => {
                if let Some(reply) = self.replies.remove(&waiter) {
                    let _ = reply.send(result);
                }
            }
            Output::Release { records } => self.permits.add_permits(records),
            Output::ReserveSequences { end } => {
                let path = self.state_file.as_deref().expect("reservations only with a state file");
                match sequence_state::persist(path, end) {
                    Ok(()) => self.pipeline.handle_sequences_reserved(end, now()),
                    Err(error) => self.pipeline.handle_sequences_failed(error),
                }
            }
            Output::CloseConnection { cause } => {
                if let Some(link) = self.link.take() {
                    tracing::debug!(%cause, "closing the connection");
                    link.close(b"device gave up on this connection");
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
